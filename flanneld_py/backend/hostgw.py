"""The host-gw backend: a plain route per peer, ``<sn> via <PublicIP> dev <iface> proto 102``, as
flannel v0.20.2 runs it (``backend/hostgw``, ``backend/route_network.go``).

It needs every host on one L2 network without NAT: ``prepare()`` refuses a PublicIP that is not
the interface's address, and a peer whose PublicIP is not on our link (``ip route get`` gives a
gateway) is reported once and listed in ``status()`` instead of failing silently every 10 s as in
flannel; :meth:`HostGwBackend.reconcile` re-checks it and programs it when it becomes reachable.
Every 10 s reconcile also puts back a deleted route ("route recovered") and removes our routes
that no peer wants (flannel never does). Routes stay when the daemon stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flanneld_py.backend._base import BackendError, LeaseAttrs
from flanneld_py.backend._netops import NetlinkError, NetOps, RouteInfo
from flanneld_py.config import BackendConfig
from flanneld_py.lease import Lease, LeaseAdded, LeaseEvent, LeaseRemoved
from flanneld_py.netlink import RTN_UNICAST, RTPROT_FLANNELD_PY, ExternalInterface

__all__ = ["HostGwBackend"]

log = logging.getLogger("flanneld_py.backend.hostgw")


class HostGwBackend:
    """flannel's host-gw backend (see the module doc)."""

    name = "host-gw"
    reconcile_interval = 10.0

    def __init__(
        self, cfg: BackendConfig, network: IPv4Network, ext: ExternalInterface, net: NetOps
    ) -> None:
        self.cfg = cfg
        self.network = IPv4Network(network)
        self.ext = ext
        self.net = net
        self._lease: Lease | None = None
        self._lock = asyncio.Lock()
        #: the accepted peer view as we last saw it
        self._leases: dict[IPv4Network, Lease] = {}
        #: peer subnet -> the gateway of the route we installed
        self._routes: dict[IPv4Network, IPv4Address] = {}
        #: peers that cannot be programmed, and why (one line each)
        self._problems: dict[IPv4Network, str] = {}
        self._closed = False

    # --- the Backend protocol ---------------------------------------------------------------
    @property
    def mtu(self) -> int:
        return self.ext.mtu

    async def prepare(self) -> LeaseAttrs:
        if self.ext.public_ip != self.ext.address:
            raise BackendError(
                f"host-gw: PublicIP {self.ext.public_ip} differs from the address "
                f"{self.ext.address} of {self.ext.name}; host-gw needs all hosts on one L2 "
                "network without NAT (drop --public-ip, or use the vxlan backend)"
            )
        return LeaseAttrs("host-gw", None)

    async def start(self, lease: Lease) -> None:
        async with self._lock:
            self._lease = lease
            # our own subnet is not a peer
            self._leases.pop(lease.subnet, None)
            self._problems.pop(lease.subnet, None)
            if self._routes.pop(lease.subnet, None) is not None:
                await self._delete(lease.subnet)

    def accepts(self, lease: Lease) -> bool:
        return lease.backend_type == "host-gw"

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        async with self._lock:
            for ev in events:
                if isinstance(ev, LeaseAdded):
                    lease = ev.lease
                    if not self.accepts(lease):
                        log.debug(
                            "ignoring non-host-gw lease %s (type=%s)",
                            lease.subnet,
                            lease.backend_type or "",
                        )
                        continue
                    if self._is_own(lease.subnet):
                        continue
                    self._leases[lease.subnet] = lease
                    await self._add(lease, None)
                elif isinstance(ev, LeaseRemoved):
                    if self._is_own(ev.subnet):
                        continue
                    self._leases.pop(ev.subnet, None)
                    self._problems.pop(ev.subnet, None)
                    gw = self._routes.pop(ev.subnet, None)
                    if await self._delete(ev.subnet):
                        log.info(
                            "peer %s removed: deleted route %s via %s",
                            ev.subnet,
                            ev.subnet,
                            gw or "?",
                        )

    async def reconcile(self, peers: Mapping[IPv4Network, Lease]) -> list[str]:
        async with self._lock:
            return await self._reconcile(peers)

    def alive(self) -> str | None:
        return "host-gw backend closed" if self._closed else None

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "interface": self.ext.name,
            "mtu": self.mtu,
            "peers_programmed": len(self._routes),
            "routes": [
                f"{sn} via {gw} dev {self.ext.name}" for sn, gw in sorted(self._routes.items())
            ],
            "problems": [self._problems[sn] for sn in sorted(self._problems)],
        }

    async def activate(self) -> None:
        """Nothing to start: the kernel moves the packets."""

    async def close(self, *, restarting: bool = False) -> None:
        # routes stay: the kernel keeps forwarding while we are down
        # (for a stop and a restart alike)
        self._closed = True

    # --- per peer ---------------------------------------------------------------------------
    def _is_own(self, subnet: IPv4Network) -> bool:
        return self._lease is not None and subnet == self._lease.subnet

    def _problem(self, sn: IPv4Network, text: str) -> None:
        if self._problems.get(sn) != text:
            log.warning("%s", text)
        self._problems[sn] = text

    async def _on_link(self, public_ip: IPv4Address) -> str | None:
        """None if ``public_ip`` is directly on our interface, else why not."""
        try:
            r = await self.net.route_get(public_ip)
        except NetlinkError as exc:
            return f"no route to it ({exc})"
        if r.gateway is not None:
            return f"it is reached via the gateway {r.gateway} dev {r.dev}"
        if r.dev != self.ext.name:
            return f"it is reached by {r.dev}, not {self.ext.name}"
        return None

    async def _add(self, lease: Lease, routes: list[RouteInfo] | None) -> bool:
        """Program one peer; True if its route is in place. ``routes``: a snapshot to compare
        with (read here if None)."""
        sn, pip = lease.subnet, lease.public_ip
        why = await self._on_link(pip)
        if why is not None:
            self._problem(
                sn,
                f"peer {sn}: PublicIP {pip} is unreachable as a host-gw gateway, not on "
                f"{self.ext.name}'s network ({why}); host-gw needs all hosts on one L2 "
                "network (use vxlan otherwise)",
            )
            if self._routes.pop(sn, None) is not None:
                await self._delete(sn)
            return False
        try:
            if routes is None:
                routes = await self.net.routes()
            current = [r for r in routes if r.dst == sn and r.type == RTN_UNICAST]
            first = min(current, key=lambda r: r.metric, default=None)
            same = (
                first is not None
                and first.gateway == pip
                and first.dev == self.ext.name
                and first.metric == 0
            )
            if not (same and first is not None and first.proto == RTPROT_FLANNELD_PY):
                if first is not None and not same:
                    log.info(
                        "peer %s: replacing existing route %s with via %s dev %s",
                        sn,
                        _route_text(first),
                        pip,
                        self.ext.name,
                    )
                await self.net.replace_route(sn, gateway=pip, dev=self.ext.name)
        except NetlinkError as exc:
            self._routes.pop(sn, None)
            self._problem(sn, f"peer {sn}: {exc}")
            return False
        old = self._routes.get(sn)
        self._routes[sn] = pip
        if self._problems.pop(sn, None) is not None:
            log.info(
                "peer %s: PublicIP %s reachable now; route %s via %s dev %s added",
                sn,
                pip,
                sn,
                pip,
                self.ext.name,
            )
        elif old != pip:
            log.info("peer %s: route via %s dev %s", sn, pip, self.ext.name)
        return True

    async def _delete(self, sn: IPv4Network) -> bool:
        try:
            return await self.net.delete_route(sn)
        except NetlinkError as exc:
            log.warning("peer %s: %s", sn, exc)
            return False

    # --- reconcile --------------------------------------------------------------------------
    async def _reconcile(self, peers: Mapping[IPv4Network, Lease]) -> list[str]:
        lines: list[str] = []
        wanted = {
            sn: lease for sn, lease in peers.items() if self.accepts(lease) and not self._is_own(sn)
        }
        try:
            routes = await self.net.routes()
        except NetlinkError as exc:
            return [f"cannot check the routes: {exc}"]
        for sn in [sn for sn in self._leases if sn not in wanted]:
            del self._leases[sn]
            self._problems.pop(sn, None)
            self._routes.pop(sn, None)
        for sn, lease in wanted.items():
            changed = self._leases.get(sn) != lease
            self._leases[sn] = lease
            gw = self._routes.get(sn)
            if not changed and gw is not None:
                if any(
                    r.dst == sn
                    and r.type == RTN_UNICAST
                    and r.proto == RTPROT_FLANNELD_PY
                    and r.gateway == gw
                    and r.dev == self.ext.name
                    and r.metric == 0
                    for r in routes
                ):
                    continue
                if await self._add(lease, routes):
                    lines.append(f"route recovered {sn} via {gw} dev {self.ext.name}")
                continue
            had_problem = sn in self._problems
            if await self._add(lease, routes):
                if had_problem:
                    lines.append(f"peer {sn}: PublicIP {lease.public_ip} reachable now, routed")
                else:
                    lines.append(f"peer {sn}: route {sn} via {lease.public_ip} added")
        for r in routes:
            if (
                r.proto == RTPROT_FLANNELD_PY
                and r.type == RTN_UNICAST
                and r.dst.subnet_of(self.network)
                and self._routes.get(r.dst) != r.gateway
            ):
                try:
                    deleted = await self.net.delete_route(r.dst, gateway=r.gateway, dev=r.dev)
                except NetlinkError as exc:
                    log.warning("cannot remove stale route %s: %s", _route_text(r), exc)
                    continue
                if deleted:
                    lines.append(f"removed stale route {_route_text(r)}")
        return lines


def _route_text(r: RouteInfo) -> str:
    text = str(r.dst)
    if r.gateway is not None:
        text += f" via {r.gateway}"
    if r.dev is not None:
        text += f" dev {r.dev}"
    return text + f" proto {r.proto}"
