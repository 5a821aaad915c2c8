"""The vxlan backend: the kernel's VXLAN device carries the overlay, as flannel v0.20.2 runs it.

One device ``flannel.<VNI>`` (``vxlan id VNI local <iface addr> dev <iface> dstport <Port>
nolearning``), holding our lease's network address as a /32. Per peer, in this order (so the
kernel never ARPs for the peer's ``sn.0``)::

    ip neigh replace <sn.0> lladdr <VtepMAC> dev flannel.N nud permanent
    bridge fdb replace <VtepMAC> dev flannel.N dst <PublicIP> self permanent
    ip route replace <sn> via <sn.0> dev flannel.N onlink proto 102

With ``DirectRouting``, a peer whose PublicIP is on one of our links (``ip route get`` gives no
gateway) gets ``<sn> via <PublicIP> dev <that link>`` instead, and no neighbour/FDB entry.

Where flannel is weak, this backend is not: the device is recreated when its port or learning
setting differs from the config (flannel keeps a ``dstport 4789`` device and blackholes), the
VtepMAC of a new device is derived from (PublicIP, VNI) so it survives reboots, a peer whose MAC
changed loses its old FDB entry, and :meth:`VxlanBackend.reconcile` (every 10 s) puts back
deleted entries and removes those of peers that are gone, including peers that vanished while
the daemon was down. Like flannel, the device and every entry stay when the daemon stops: the
data path is the kernel's and keeps working.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flanneld_py.backend._base import BackendError, LeaseAttrs
from flanneld_py.backend._netops import (
    LinkExistsError,
    LinkInfo,
    NetlinkError,
    NetOps,
    RouteInfo,
    VxlanSpec,
)
from flanneld_py.config import BackendConfig
from flanneld_py.lease import Lease, LeaseAdded, LeaseEvent, LeaseRemoved
from flanneld_py.netlink import RTN_UNICAST, RTPROT_FLANNELD_PY, ExternalInterface

__all__ = [
    "ENCAP_OVERHEAD",
    "VxlanBackend",
    "device_name",
    "incompatibilities",
    "lease_vtep_mac",
    "parse_mac",
    "vtep_mac",
]

log = logging.getLogger("flanneld_py.backend.vxlan")

#: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14)
ENCAP_OVERHEAD = 50
IFNAMSIZ = 15
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}")


def device_name(vni: int) -> str:
    """``flannel.<VNI>``, flannel's name for the device."""
    return f"flannel.{vni}"


def vtep_mac(public_ip: IPv4Address, vni: int) -> str:
    """The MAC of a device we create: locally administered unicast, derived from (PublicIP, VNI)
    so that the VtepMAC in our lease is the same after a restart, a reboot or a recreation."""
    digest = hashlib.sha256(f"flanneld-py vxlan vtep {public_ip} vni {vni}".encode()).digest()
    octets = bytearray(digest[:6])
    octets[0] = (octets[0] & 0xFC) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in octets)


def parse_mac(value: object) -> str | None:
    """A unicast MAC in lower-case colon form, or None if ``value`` is not one."""
    if not isinstance(value, str) or not _MAC_RE.fullmatch(value):
        return None
    mac = value.lower().replace("-", ":")
    first = int(mac[:2], 16)
    if first & 1 or mac == "00:00:00:00:00:00":
        return None
    return mac


def lease_vtep_mac(lease: Lease) -> tuple[str | None, object]:
    """(the peer's VtepMAC or None, the raw value) from its BackendData (field names are
    case-insensitive, as Go's decoder; a v0.13-style ``{"VtepMAC": …}`` without VNI is fine)."""
    data = lease.backend_data or {}
    raw: object = None
    for key, val in data.items():
        if str(key).lower() == "vtepmac":
            raw = val
            if key == "VtepMAC":
                break
    return parse_mac(raw), raw


def incompatibilities(info: LinkInfo, want: VxlanSpec, dev_index: int) -> list[str]:
    """Why an existing device cannot be reused for ``want`` ("what: existing vs wanted"); empty
    if it can. Stricter than flannel: the effective port and learning are compared too."""
    vx = info.vxlan
    if info.kind != "vxlan" or vx is None:
        return [f"type: {info.kind or 'unknown'} vs vxlan"]
    out = []
    if vx.vni != want.vni:
        out.append(f"vni: {vx.vni} vs {want.vni}")
    if vx.gbp != want.gbp:
        out.append(f"gbp: {str(vx.gbp).lower()} vs {str(want.gbp).lower()}")
    if vx.l2miss:
        out.append("l2miss: true vs false")
    if vx.local != want.local:
        out.append(f"local: {vx.local or 'none'} vs {want.local}")
    if vx.link != dev_index:
        out.append(f"dev: ifindex {vx.link or 'none'} vs {want.dev} (ifindex {dev_index})")
    if vx.port != want.port:
        out.append(f"port: {vx.port} vs {want.port}")
    if vx.learning != want.learning:
        out.append(f"learning: {str(vx.learning).lower()} vs {str(want.learning).lower()}")
    return out


@dataclass(frozen=True)
class _Entry:
    """What we programmed for a peer."""

    #: "vxlan" (neighbour + FDB + onlink route) or "direct" (plain route via PublicIP)
    path: str
    public_ip: IPv4Address
    #: the peer's VtepMAC (vxlan path)
    mac: str | None
    gateway: IPv4Address
    dev: str


class VxlanBackend:
    """flannel's vxlan backend (see the module doc)."""

    name = "vxlan"
    reconcile_interval = 10.0

    def __init__(
        self, cfg: BackendConfig, network: IPv4Network, ext: ExternalInterface, net: NetOps
    ) -> None:
        self.cfg = cfg
        self.network = IPv4Network(network)
        self.ext = ext
        self.net = net
        self.vni = cfg.vni
        self.dev = device_name(cfg.vni)
        self.port = cfg.port
        self._mac: str | None = None
        self._lease: Lease | None = None
        self._lock = asyncio.Lock()
        #: the accepted peer view as we last saw it
        self._leases: dict[IPv4Network, Lease] = {}
        #: what is in the kernel for each peer, as far as we know
        self._entries: dict[IPv4Network, _Entry] = {}
        #: peers that could not be programmed, and why (one line each)
        self._problems: dict[IPv4Network, str] = {}
        #: peers whose lease is unusable (bad VtepMAC): not retried until the lease changes
        self._bad_lease: set[IPv4Network] = set()
        self._down: str | None = "not prepared"
        self._closed = False

    # --- the Backend protocol ---------------------------------------------------------------
    @property
    def mtu(self) -> int:
        return (self.cfg.mtu or self.ext.mtu) - ENCAP_OVERHEAD

    @property
    def vtep_mac(self) -> str | None:
        return self._mac

    def _spec(self, mac: str) -> VxlanSpec:
        return VxlanSpec(
            name=self.dev,
            vni=self.vni,
            mac=mac,
            local=self.ext.address,
            dev=self.ext.name,
            port=self.port,
            learning=self.cfg.learning,
            gbp=self.cfg.gbp,
            mtu=self.mtu if self.cfg.mtu else None,
        )

    async def prepare(self) -> LeaseAttrs:
        if len(self.dev) > IFNAMSIZ:
            raise BackendError(
                f"VNI {self.vni}: the device name {self.dev} is longer than {IFNAMSIZ} "
                "characters; use a VNI below 10000000"
            )
        try:
            self._mac = await self._ensure_device()
        except NetlinkError as exc:
            raise BackendError(str(exc)) from None
        self._down = f"{self.dev} is down (not started)"
        return LeaseAttrs("vxlan", {"VNI": self.vni & 0xFFFF, "VtepMAC": self._mac})

    async def _ensure_device(self) -> str:
        """Reuse a compatible ``flannel.<VNI>`` (keeping its MAC) or (re)create it."""
        spec = self._spec(self._mac or vtep_mac(self.ext.public_ip, self.vni))
        for attempt in range(2):
            info = await self.net.link(self.dev)
            if info is not None:
                reasons = incompatibilities(info, spec, self.ext.index)
                if not reasons and info.mac:
                    log.info("reusing %s (MAC %s, dstport %d)", self.dev, info.mac, self.port)
                    return info.mac
                log.warning(
                    "%s has an incompatible configuration (%s; existing vs wanted); "
                    "recreating the device",
                    self.dev,
                    "; ".join(reasons) or "no MAC",
                )
                await self.net.delete_link(self.dev)
            try:
                await self.net.create_vxlan(spec)
            except LinkExistsError:
                if attempt == 0 and await self.net.link(self.dev) is not None:
                    continue  # created meanwhile by someone else: check it again
                raise NetlinkError(await self._exists_why(spec)) from None
            log.info(
                "created %s: vxlan id %d local %s dev %s dstport %d %s%s, MAC %s",
                self.dev,
                self.vni,
                self.ext.address,
                self.ext.name,
                self.port,
                "learning" if self.cfg.learning else "nolearning",
                " gbp" if self.cfg.gbp else "",
                spec.mac,
            )
            return spec.mac
        raise NetlinkError(f"cannot create {self.dev}: it keeps being recreated by someone else")

    async def _exists_why(self, spec: VxlanSpec) -> str:
        try:
            others = [
                lk.name
                for lk in await self.net.links("vxlan")
                if lk.vxlan is not None and lk.vxlan.vni == spec.vni and lk.name != spec.name
            ]
        except NetlinkError:
            others = []
        who = f" ({', '.join(others)})" if others else ""
        return (
            f"cannot create {spec.name}: another vxlan device{who} already uses VNI {spec.vni} "
            f"on port {spec.port}; delete it or choose another VNI"
        )

    async def start(self, lease: Lease) -> None:
        if self._mac is None:
            raise BackendError("vxlan backend: start() called before prepare()")
        async with self._lock:
            self._lease = lease
            try:
                await self._configure_device()
            except NetlinkError as exc:
                self._down = str(exc)
                raise BackendError(str(exc)) from None
            # our own subnet is not a peer
            await self._forget(lease.subnet)

    async def _configure_device(self) -> None:
        assert self._lease is not None
        addr = self._lease.subnet.network_address
        for old in await self.net.ensure_v4_address(self.dev, addr, self.network):
            log.info("removed address %s from %s (inside %s)", old, self.dev, self.network)
        info = await self.net.link(self.dev)
        mtu = self.mtu if info is not None and info.mtu != self.mtu else None
        if mtu is not None and info is not None:
            log.info("setting the MTU of %s from %d to %d", self.dev, info.mtu, mtu)
        await self.net.set_link_up(self.dev, mtu)
        self._down = None
        log.info("%s: address %s/32, mtu %d, up", self.dev, addr, self.mtu)

    def accepts(self, lease: Lease) -> bool:
        return lease.backend_type == "vxlan"

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        async with self._lock:
            for ev in events:
                if isinstance(ev, LeaseAdded):
                    lease = ev.lease
                    if not self.accepts(lease):
                        log.debug(
                            "ignoring non-vxlan lease %s (type=%s)",
                            lease.subnet,
                            lease.backend_type or "",
                        )
                        continue
                    if self._is_own(lease.subnet):
                        continue
                    self._leases[lease.subnet] = lease
                    await self._add(lease)
                elif isinstance(ev, LeaseRemoved):
                    if self._is_own(ev.subnet):
                        continue
                    self._leases.pop(ev.subnet, None)
                    await self._remove(ev.subnet)

    async def reconcile(self, peers: Mapping[IPv4Network, Lease]) -> list[str]:
        async with self._lock:
            return await self._reconcile(peers)

    def alive(self) -> str | None:
        if self._closed:
            return "vxlan backend closed"
        return self._down

    def status(self) -> dict[str, Any]:
        peers = {
            str(sn): {
                "public_ip": str(e.public_ip),
                "path": e.path,
                "vtep_mac": e.mac,
                "route": f"{sn} via {e.gateway} dev {e.dev}"
                + (" onlink" if e.path == "vxlan" else ""),
            }
            for sn, e in sorted(self._entries.items())
        }
        problems = [self._problems[sn] for sn in sorted(self._problems)]
        if self._down is not None:
            problems.insert(0, self._down)
        return {
            "backend": self.name,
            "device": self.dev,
            "vni": self.vni,
            "port": self.port,
            "vtep_mac": self._mac,
            "mtu": self.mtu,
            "direct_routing": self.cfg.direct_routing,
            "up": self._down is None,
            "peers_programmed": {
                "vxlan": sum(1 for e in self._entries.values() if e.path == "vxlan"),
                "direct": sum(1 for e in self._entries.values() if e.path == "direct"),
            },
            "peers": peers,
            "problems": problems,
        }

    async def activate(self) -> None:
        """Nothing to start: the kernel moves the packets."""

    async def close(self, *, restarting: bool = False) -> None:
        # the device and every entry stay: the kernel path keeps working while we are down
        # (for a stop and a restart alike)
        self._closed = True

    # --- per peer ---------------------------------------------------------------------------
    def _is_own(self, subnet: IPv4Network) -> bool:
        return self._lease is not None and subnet == self._lease.subnet

    def _problem(self, subnet: IPv4Network, text: str) -> None:
        if self._problems.get(subnet) != text:
            log.warning("%s", text)
        self._problems[subnet] = text

    def _clear_problem(self, subnet: IPv4Network) -> None:
        if self._problems.pop(subnet, None) is not None:
            log.info("peer %s: programmed now (problem cleared)", subnet)

    def _mac_users(self, mac: str, but: IPv4Network) -> list[_Entry]:
        return [e for sn, e in self._entries.items() if sn != but and e.mac == mac]

    async def _direct_dev(self, public_ip: IPv4Address) -> str | None:
        """DirectRouting: the link ``public_ip`` is on (``ip route get`` gives exactly one route,
        without gateway), or None for the vxlan path."""
        try:
            r = await self.net.route_get(public_ip)
        except NetlinkError:
            return None
        if r.gateway is not None or r.dev is None or r.dev in (self.dev, "lo"):
            return None
        return r.dev

    async def _add(self, lease: Lease) -> bool:
        """Program one peer (§9 order, undo on failure). True if programmed."""
        sn, pip = lease.subnet, lease.public_ip
        mac, raw = lease_vtep_mac(lease)
        old = self._entries.get(sn)
        if mac is None:
            self._bad_lease.add(sn)
            what = "has no VtepMAC" if raw is None else f"has a malformed VtepMAC {raw!r}"
            self._problem(sn, f"peer {sn} ({pip}): its vxlan lease {what}; skipped")
            if old is not None:
                await self._unprogram(sn, old)
            return False
        self._bad_lease.discard(sn)
        direct = await self._direct_dev(pip) if self.cfg.direct_routing else None
        if direct is not None:
            entry = _Entry("direct", pip, None, pip, direct)
            try:
                await self.net.replace_route(sn, gateway=pip, dev=direct)
            except NetlinkError as exc:
                self._entries.pop(sn, None)
                self._problem(sn, f"peer {sn} ({pip}): {exc}; skipped until the next check")
                return False
        else:
            entry = _Entry("vxlan", pip, mac, sn.network_address, self.dev)
            if not await self._program_vxlan(sn, entry):
                return False
        self._entries[sn] = entry
        await self._drop_old(sn, old, entry)
        self._clear_problem(sn)
        if old != entry:
            log.info(
                "peer %s: %s via %s dev %s%s",
                sn,
                entry.path,
                entry.gateway,
                entry.dev,
                f" (VtepMAC {mac}, PublicIP {pip})" if entry.path == "vxlan" else "",
            )
        return True

    async def _program_vxlan(self, sn: IPv4Network, e: _Entry) -> bool:
        assert e.mac is not None
        gw = e.gateway
        try:
            await self.net.replace_neigh(self.dev, gw, e.mac)
        except NetlinkError as exc:
            return await self._failed(sn, e, exc, undo=())
        try:
            await self.net.replace_fdb(self.dev, e.mac, e.public_ip)
        except NetlinkError as exc:
            return await self._failed(sn, e, exc, undo=("neighbour",))
        try:
            await self.net.replace_route(sn, gateway=gw, dev=self.dev, onlink=True)
        except NetlinkError as exc:
            return await self._failed(sn, e, exc, undo=("neighbour", "fdb"))
        return True

    async def _failed(
        self, sn: IPv4Network, e: _Entry, exc: NetlinkError, undo: Sequence[str]
    ) -> bool:
        """flannel's undo: a failed FDB entry undoes the neighbour, a failed route both; the
        peer is then skipped (the next reconcile tries again)."""
        assert e.mac is not None
        for what in undo:
            try:
                if what == "neighbour":
                    await self.net.delete_neigh(self.dev, e.gateway)
                elif not self._mac_users(e.mac, sn):
                    await self.net.delete_fdb(self.dev, e.mac, e.public_ip)
            except NetlinkError as uexc:
                log.warning("peer %s: undo failed: %s", sn, uexc)
        old = self._entries.pop(sn, None)
        if old is not None and old.path == "direct":
            await self._try(sn, self.net.delete_route(sn))
        self._problem(sn, f"peer {sn} ({e.public_ip}): {exc}; skipped until the next check")
        return False

    async def _drop_old(self, sn: IPv4Network, old: _Entry | None, new: _Entry) -> None:
        """Remove what the previous programming of ``sn`` left that the new one does not
        overwrite: the old FDB entry when the MAC changed (flannel keeps it), the neighbour and
        FDB entry when the peer moved to the direct path."""
        if old is None or old.path != "vxlan" or old.mac is None:
            return
        if new.path == "direct":
            await self._try(sn, self.net.delete_neigh(self.dev, old.gateway))
        if (new.mac != old.mac or new.path == "direct") and not self._mac_users(old.mac, sn):
            await self._try(sn, self.net.delete_fdb(self.dev, old.mac, old.public_ip))
            if new.path == "vxlan":
                log.info(
                    "peer %s: VtepMAC changed %s -> %s; old FDB entry removed", sn, old.mac, new.mac
                )

    async def _try(self, what: object, op: Awaitable[bool]) -> bool:
        """Await a delete; a failure is logged (``what``: the peer or entry) and gives False."""
        try:
            return await op
        except NetlinkError as exc:
            log.warning(
                "%s: %s", what if not isinstance(what, IPv4Network) else f"peer {what}", exc
            )
            return False

    async def _unprogram(self, sn: IPv4Network, e: _Entry | None) -> list[str]:
        """Delete neighbour, FDB entry and route of ``sn``, each tried even if one fails.
        Returns what was deleted."""
        self._entries.pop(sn, None)
        done: list[str] = []
        gw = sn.network_address
        mac = e.mac if e is not None else None
        pip = e.public_ip if e is not None else None
        if e is None or e.path == "vxlan":
            if e is None:  # not ours in this run: find the MAC through the neighbour
                try:
                    for n in await self.net.neighbours(self.dev):
                        if n.ip == gw:
                            mac = n.mac
                except NetlinkError as exc:
                    log.warning("peer %s: %s", sn, exc)
            if await self._try(sn, self.net.delete_neigh(self.dev, gw)):
                done.append(f"neighbour {gw}")
            if (
                mac is not None
                and not self._mac_users(mac, sn)
                and await self._try(sn, self.net.delete_fdb(self.dev, mac, pip))
            ):
                done.append(f"FDB entry {mac}")
        if await self._try(sn, self.net.delete_route(sn)):
            done.append(f"route {sn}")
        return done

    async def _remove(self, sn: IPv4Network) -> None:
        self._problems.pop(sn, None)
        self._bad_lease.discard(sn)
        done = await self._unprogram(sn, self._entries.get(sn))
        if done:
            log.info("peer %s removed: deleted %s", sn, ", ".join(done))

    async def _forget(self, sn: IPv4Network) -> None:
        self._leases.pop(sn, None)
        self._problems.pop(sn, None)
        self._bad_lease.discard(sn)
        e = self._entries.get(sn)
        if e is not None:
            await self._unprogram(sn, e)

    # --- reconcile --------------------------------------------------------------------------
    async def _reconcile(self, peers: Mapping[IPv4Network, Lease]) -> list[str]:
        lines: list[str] = []
        if not await self._check_device(lines):
            return lines
        wanted = {
            sn: lease for sn, lease in peers.items() if self.accepts(lease) and not self._is_own(sn)
        }
        # events we missed
        for sn in [sn for sn in self._leases if sn not in wanted]:
            del self._leases[sn]
            self._problems.pop(sn, None)
            self._bad_lease.discard(sn)
            done = await self._unprogram(sn, self._entries.get(sn))
            if done:
                lines.append(f"peer {sn} is gone: deleted {', '.join(done)}")
        for sn, lease in wanted.items():
            if self._leases.get(sn) != lease:
                self._leases[sn] = lease
                if await self._add(lease):
                    lines.append(f"peer {sn} programmed (its lease had not been applied)")
        try:
            neighs = await self.net.neighbours(self.dev)
            fdb = await self.net.fdb(self.dev)
            routes = await self.net.routes()
        except NetlinkError as exc:
            lines.append(f"cannot check the kernel state: {exc}")
            return lines
        have_neigh = {(n.ip, n.mac) for n in neighs if n.permanent}
        have_fdb = {(f.mac, f.dst) for f in fdb if f.permanent}
        have_route = {
            (r.dst, r.gateway, r.dev, r.onlink) for r in routes if self._ours(r) and r.metric == 0
        }
        # put back what is missing
        for sn, lease in wanted.items():
            if sn in self._bad_lease:
                continue  # waits for a new lease
            e = self._entries.get(sn)
            if e is None:
                if await self._add(lease):
                    lines.append(f"peer {sn} programmed on retry")
                continue
            missing = []
            if e.path == "vxlan":
                if (e.gateway, e.mac) not in have_neigh:
                    missing.append(f"neighbour {e.gateway}")
                if (e.mac, e.public_ip) not in have_fdb:
                    missing.append(f"FDB entry {e.mac}")
            if (sn, e.gateway, e.dev, e.path == "vxlan") not in have_route:
                missing.append(f"route {sn}")
            if missing and await self._add(lease):
                lines.append(f"peer {sn}: recovered {', '.join(missing)}")
        # remove what no peer wants
        want_neigh = {e.gateway for e in self._entries.values() if e.path == "vxlan"}
        want_fdb = {(e.mac, e.public_ip) for e in self._entries.values() if e.path == "vxlan"}
        for n in neighs:
            if (
                n.permanent
                and n.ip not in want_neigh
                and await self._try(n.ip, self.net.delete_neigh(self.dev, n.ip))
            ):
                lines.append(f"removed stale neighbour {n.ip} lladdr {n.mac} dev {self.dev}")
        for f in fdb:
            if (
                f.permanent
                and f.dst is not None
                and (f.mac, f.dst) not in want_fdb
                and await self._try(f.mac, self.net.delete_fdb(self.dev, f.mac, f.dst))
            ):
                lines.append(f"removed stale FDB entry {f.mac} dst {f.dst} dev {self.dev}")
        for r in routes:
            if self._ours(r) and r.dst not in self._entries:
                deleted = await self._try(
                    r.dst, self.net.delete_route(r.dst, gateway=r.gateway, dev=r.dev)
                )
                if deleted:
                    lines.append(f"removed stale route {_route_text(r)}")
        return lines

    def _ours(self, r: RouteInfo) -> bool:
        """A route this backend may own: proto 102, unicast, inside Network."""
        return (
            r.proto == RTPROT_FLANNELD_PY
            and r.type == RTN_UNICAST
            and r.dst.subnet_of(self.network)
        )

    async def _check_device(self, lines: list[str]) -> bool:
        """The device exists and is up; recreate it (same MAC) or bring it up if not."""
        if self._lease is None or self._mac is None:
            return False
        try:
            info = await self.net.link(self.dev)
            if info is None or incompatibilities(info, self._spec(self._mac), self.ext.index):
                why = "missing" if info is None else "changed"
                if info is not None:
                    await self.net.delete_link(self.dev)
                await self.net.create_vxlan(self._spec(self._mac))
                await self._configure_device()
                # everything on the old device went with it
                self._entries.clear()
                self._leases.clear()
                lines.append(f"{self.dev} was {why}: recreated with MAC {self._mac}")
            elif not info.up or info.mtu != self.mtu:
                await self._configure_device()
                lines.append(f"{self.dev} was down or had MTU {info.mtu}: set up, mtu {self.mtu}")
        except NetlinkError as exc:
            self._down = f"{self.dev}: {exc}"
            lines.append(self._down)
            return False
        self._down = None
        return True


def _route_text(r: RouteInfo) -> str:
    text = str(r.dst)
    if r.gateway is not None:
        text += f" via {r.gateway}"
    if r.dev is not None:
        text += f" dev {r.dev}"
    if r.onlink:
        text += " onlink"
    return text + f" proto {r.proto}"
