"""FakeNetOps: an in-memory network namespace behind the backends' ``NetOps`` seam.

It models links (with vxlan attributes), IPv4 addresses, main-table routes (type, proto, metric,
onlink), neighbours and FDB entries, and enforces the kernel rules the backends depend on, with
the same one-line messages as :mod:`flanneld_py.netlink`:

- creating an interface whose name is taken, or a second vxlan device with the same VNI and
  port, raises LinkExistsError ("File exists");
- a gateway that no connected route of the device covers is refused ("Network is unreachable")
  unless ``onlink``; ``onlink`` needs the device up ("Network is down");
- deleting something absent returns False, as the real functions do;
- deleting a link removes its addresses, neighbours, FDB entries and routes;
- ``route_get`` answers from the routes (longest prefix, lowest metric; local addresses go to
  ``lo``; an unreachable route gives "No route to host", no route "Network is unreachable").

Every call is appended to ``calls`` as a tuple of strings (``("replace_neigh", "flannel.1",
"10.5.2.0", "aa:…")``) so tests can assert the order of operations; ``fail()`` makes the next
matching call raise.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from flanneld_py.backend._netops import (
    FdbEntry,
    LinkExistsError,
    LinkInfo,
    Neighbour,
    NetlinkError,
    Route,
    RouteInfo,
    VxlanAttrs,
    VxlanSpec,
)
from flanneld_py.netlink import (
    NUD_PERMANENT,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RTN_UNICAST,
    RTN_UNREACHABLE,
    RTPROT_FLANNELD_PY,
    RTPROT_KERNEL,
    ExternalInterface,
)

__all__ = ["FakeLink", "FakeNetOps"]

RTPROT_BOOT = 3
RTPROT_STATIC = 4


def _err(what: str, code: int) -> NetlinkError:
    return NetlinkError(f"{what}: {os.strerror(code)}")


def _route_what(
    verb: str, dst: IPv4Network, gateway: IPv4Address | None, dev: str | None, onlink: bool
) -> str:
    what = f"cannot {verb} route {dst}"
    if gateway is not None:
        what += f" via {gateway}"
    if dev is not None:
        what += f" dev {dev}"
    if onlink:
        what += " onlink"
    return what


@dataclass
class FakeLink:
    name: str
    index: int
    kind: str | None
    mac: str | None
    mtu: int
    up: bool = True
    vxlan: VxlanAttrs | None = None
    addrs: list[IPv4Interface] = field(default_factory=list)
    neigh: dict[IPv4Address, Neighbour] = field(default_factory=dict)
    #: vxlan FDB: MAC -> entry (one remote per MAC, as ``bridge fdb replace`` leaves it)
    fdb: dict[str, FdbEntry] = field(default_factory=dict)

    def info(self) -> LinkInfo:
        return LinkInfo(self.name, self.index, self.kind, self.mac, self.mtu, self.up, self.vxlan)


@dataclass
class _Failure:
    op: str
    match: Callable[[tuple[str, ...]], bool] | None
    exc: NetlinkError
    times: int


class FakeNetOps:
    """See the module doc. ``FakeNetOps.host()`` builds the usual lab host."""

    def __init__(self) -> None:
        self.links_by_name: dict[str, FakeLink] = {}
        self.route_table: list[RouteInfo] = []
        self.calls: list[tuple[str, ...]] = []
        self.sysctls: dict[str, str] = {}
        self._failures: list[_Failure] = []
        self._next_index = 1
        self._mac_seq = 0
        self.add_link("lo", kind=None, mtu=65536, mac="00:00:00:00:00:00")
        self.add_address("lo", "127.0.0.1/8", connected=False)

    # --- building the namespace (no call log, no checks beyond the obvious) --------------------
    @classmethod
    def host(
        cls,
        address: str = "10.99.0.11/24",
        gateway: str | None = "10.99.0.1",
        dev: str = "eth0",
        mtu: int = 1500,
    ) -> FakeNetOps:
        """A host like the lab's: ``dev`` with ``address``, default route via ``gateway``."""
        net = cls()
        net.add_link(dev, kind="veth", mtu=mtu)
        net.add_address(dev, address)
        if gateway is not None:
            net.add_raw_route("0.0.0.0/0", gateway=gateway, dev=dev, proto=RTPROT_BOOT)
        return net

    def ext(self, dev: str = "eth0", public_ip: str | None = None) -> ExternalInterface:
        link = self.links_by_name[dev]
        addr = link.addrs[0].ip
        return ExternalInterface(
            dev, link.index, addr, link.mtu, IPv4Address(public_ip) if public_ip else addr
        )

    def add_link(
        self,
        name: str,
        kind: str | None = "veth",
        mtu: int = 1500,
        mac: str | None = None,
        up: bool = True,
        vxlan: VxlanAttrs | None = None,
    ) -> FakeLink:
        if name in self.links_by_name:
            raise LinkExistsError(f"cannot create {name}: {os.strerror(errno.EEXIST)}")
        if mac is None:
            self._mac_seq += 1
            mac = f"02:00:00:00:{self._mac_seq >> 8:02x}:{self._mac_seq & 0xFF:02x}"
        link = FakeLink(name, self._next_index, kind, mac, mtu, up, vxlan)
        self._next_index += 1
        self.links_by_name[name] = link
        return link

    def add_address(self, dev: str, cidr: str, connected: bool = True) -> None:
        iface = IPv4Interface(cidr)
        self.links_by_name[dev].addrs.append(iface)
        if connected and iface.network.prefixlen < 32:
            self.route_table.append(
                RouteInfo(
                    iface.network, RTN_UNICAST, RTPROT_KERNEL, None, dev, 0, False, RT_SCOPE_LINK
                )
            )

    def add_raw_route(
        self,
        dst: str | IPv4Network,
        gateway: str | IPv4Address | None = None,
        dev: str | None = None,
        *,
        type: int = RTN_UNICAST,
        proto: int = RTPROT_STATIC,
        metric: int = 0,
        onlink: bool = False,
    ) -> None:
        """Install a route without any check (``ip route add …`` by the test's "user")."""
        gw = IPv4Address(gateway) if gateway is not None else None
        scope = RT_SCOPE_LINK if gw is None and type == RTN_UNICAST else RT_SCOPE_UNIVERSE
        self.route_table.append(
            RouteInfo(IPv4Network(dst), type, proto, gw, dev, metric, onlink, scope)
        )

    def fail(
        self,
        op: str,
        message: str = "injected failure: Operation not permitted",
        *,
        match: Callable[[tuple[str, ...]], bool] | None = None,
        times: int = 1,
    ) -> None:
        """Make the next ``times`` calls of ``op`` (whose call tuple ``match`` accepts) raise
        NetlinkError(message)."""
        self._failures.append(_Failure(op, match, NetlinkError(message), times))

    # --- views for tests ---------------------------------------------------------------------
    def ops(self, *names: str) -> list[tuple[str, ...]]:
        """The call log, only the mutating calls (or only ``names``)."""
        mutating = names or (
            "create_vxlan",
            "delete_link",
            "set_link_up",
            "ensure_v4_address",
            "replace_neigh",
            "delete_neigh",
            "replace_fdb",
            "delete_fdb",
            "replace_route",
            "delete_route",
        )
        return [c for c in self.calls if c[0] in mutating]

    def our_routes(self) -> list[str]:
        """Proto-102 unicast routes as ``ip route`` would print them, sorted."""
        out = []
        for r in self.route_table:
            if r.proto != RTPROT_FLANNELD_PY or r.type != RTN_UNICAST:
                continue
            text = str(r.dst)
            if r.gateway is not None:
                text += f" via {r.gateway}"
            if r.dev is not None:
                text += f" dev {r.dev}"
            if r.onlink:
                text += " onlink"
            out.append(text)
        return sorted(out)

    def neigh_table(self, dev: str) -> dict[str, str | None]:
        link = self.links_by_name.get(dev)
        return {} if link is None else {str(ip): n.mac for ip, n in link.neigh.items()}

    def fdb_table(self, dev: str) -> dict[str, str | None]:
        link = self.links_by_name.get(dev)
        return (
            {}
            if link is None
            else {m: (str(e.dst) if e.dst else None) for m, e in link.fdb.items()}
        )

    # --- plumbing ----------------------------------------------------------------------------
    def _call(self, op: str, *args: object) -> None:
        call = (op, *(str(a) for a in args))
        self.calls.append(call)
        for f in self._failures:
            if f.op == op and f.times > 0 and (f.match is None or f.match(call)):
                f.times -= 1
                raise f.exc

    def _link(self, name: str) -> FakeLink:
        link = self.links_by_name.get(name)
        if link is None:
            raise NetlinkError(f"no network interface named {name}")
        return link

    def _connected(self, gateway: IPv4Address, dev: str | None) -> RouteInfo | None:
        """The connected (link-scope, gateway-less) route covering ``gateway``."""
        best: RouteInfo | None = None
        for r in self.route_table:
            if (
                r.type == RTN_UNICAST
                and r.gateway is None
                and r.dev is not None
                and gateway in r.dst
                and (dev is None or r.dev == dev)
                and self.links_by_name[r.dev].up
                and (best is None or r.dst.prefixlen > best.dst.prefixlen)
            ):
                best = r
        return best

    # --- NetOps: links -------------------------------------------------------------------------
    async def link(self, name: str) -> LinkInfo | None:
        self._call("link", name)
        link = self.links_by_name.get(name)
        return None if link is None else link.info()

    async def links(self, kind: str | None = None) -> list[LinkInfo]:
        self._call("links", kind or "")
        return [
            lk.info()
            for lk in sorted(self.links_by_name.values(), key=lambda lk: lk.index)
            if kind is None or lk.kind == kind
        ]

    async def create_vxlan(self, spec: VxlanSpec) -> None:
        self._call(
            "create_vxlan",
            spec.name,
            spec.vni,
            spec.mac,
            spec.local,
            spec.dev,
            spec.port,
            "learning" if spec.learning else "nolearning",
            "gbp" if spec.gbp else "",
        )
        what = f"cannot create vxlan device {spec.name}"
        if spec.name in self.links_by_name:
            raise LinkExistsError(f"{what}: {os.strerror(errno.EEXIST)}")
        for lk in self.links_by_name.values():
            vx = lk.vxlan  # the kernel's "VNI in use": same VNI, port and receive flags
            if vx is not None and (vx.vni, vx.port, vx.gbp) == (spec.vni, spec.port, spec.gbp):
                raise LinkExistsError(f"{what}: {os.strerror(errno.EEXIST)}")
        lower = self.links_by_name.get(spec.dev)
        if lower is None:
            raise NetlinkError(f"{what}: no network interface named {spec.dev}")
        attrs = VxlanAttrs(
            vni=spec.vni,
            local=spec.local,
            link=lower.index,
            port=spec.port,
            learning=spec.learning,
            gbp=spec.gbp,
        )
        self.add_link(
            spec.name,
            kind="vxlan",
            mtu=spec.mtu or lower.mtu - 50,
            mac=spec.mac,
            up=False,
            vxlan=attrs,
        )
        self.sysctls[f"net.ipv6.conf.{spec.name}.accept_ra"] = "0"

    async def delete_link(self, name: str) -> bool:
        self._call("delete_link", name)
        if self.links_by_name.pop(name, None) is None:
            return False
        self.route_table = [r for r in self.route_table if r.dev != name]
        return True

    async def set_link_up(self, name: str, mtu: int | None = None) -> None:
        self._call("set_link_up", name, mtu or "")
        link = self._link(name)
        link.up = True
        if mtu is not None:
            link.mtu = mtu

    # --- NetOps: addresses ---------------------------------------------------------------------
    async def addresses(self, name: str) -> list[IPv4Interface]:
        self._call("addresses", name)
        return list(self._link(name).addrs)

    async def ensure_v4_address(
        self, name: str, address: IPv4Address, network: IPv4Network
    ) -> list[IPv4Interface]:
        self._call("ensure_v4_address", name, address, network)
        link = self._link(name)
        removed, kept, have = [], [], False
        for cur in link.addrs:
            if cur.ip == address and cur.network.prefixlen == 32:
                have = True
                kept.append(cur)
            elif cur.ip in network:
                removed.append(cur)
            else:
                kept.append(cur)
        for old in removed:
            self.route_table = [
                r
                for r in self.route_table
                if not (r.proto == RTPROT_KERNEL and r.dev == name and r.dst == old.network)
            ]
        if not have:
            kept.append(IPv4Interface(f"{address}/32"))
        link.addrs = kept
        return removed

    # --- NetOps: neighbours --------------------------------------------------------------------
    async def replace_neigh(self, dev: str, ip: IPv4Address, mac: str) -> None:
        self._call("replace_neigh", dev, ip, mac)
        self._link(dev).neigh[IPv4Address(ip)] = Neighbour(IPv4Address(ip), mac, NUD_PERMANENT)

    async def delete_neigh(self, dev: str, ip: IPv4Address) -> bool:
        self._call("delete_neigh", dev, ip)
        link = self.links_by_name.get(dev)
        return link is not None and link.neigh.pop(IPv4Address(ip), None) is not None

    async def neighbours(self, dev: str) -> list[Neighbour]:
        self._call("neighbours", dev)
        return list(self._link(dev).neigh.values())

    # --- NetOps: FDB ---------------------------------------------------------------------------
    async def replace_fdb(self, dev: str, mac: str, dst: IPv4Address) -> None:
        self._call("replace_fdb", dev, mac, dst)
        link = self._link(dev)
        if link.kind != "vxlan":
            raise _err(f"cannot set FDB entry {mac} dst {dst} on {dev}", errno.EINVAL)
        link.fdb[mac] = FdbEntry(mac, IPv4Address(dst), NUD_PERMANENT)

    async def delete_fdb(self, dev: str, mac: str, dst: IPv4Address | None = None) -> bool:
        self._call("delete_fdb", dev, mac, dst or "")
        link = self.links_by_name.get(dev)
        if link is None:
            return False
        entry = link.fdb.get(mac)
        if entry is None or (dst is not None and entry.dst != IPv4Address(dst)):
            return False
        del link.fdb[mac]
        return True

    async def fdb(self, dev: str) -> list[FdbEntry]:
        self._call("fdb", dev)
        return list(self._link(dev).fdb.values())

    # --- NetOps: routes ------------------------------------------------------------------------
    async def route_get(self, dst: IPv4Address) -> Route:
        self._call("route_get", dst)
        dst = IPv4Address(dst)
        what = f"cannot look up the route to {dst}"
        for lk in self.links_by_name.values():
            if any(a.ip == dst for a in lk.addrs):
                return Route(IPv4Network(f"{dst}/32"), "lo", None, dst)
        best: RouteInfo | None = None
        for r in self.route_table:
            if dst not in r.dst or (r.dev is not None and not self.links_by_name[r.dev].up):
                continue
            if best is None or (r.dst.prefixlen, -r.metric) > (best.dst.prefixlen, -best.metric):
                best = r
        if best is None:
            raise _err(what, errno.ENETUNREACH)
        if best.type == RTN_UNREACHABLE:
            raise _err(what, errno.EHOSTUNREACH)
        src = None
        if best.dev is not None and self.links_by_name[best.dev].addrs:
            src = self.links_by_name[best.dev].addrs[0].ip
        return Route(IPv4Network(f"{dst}/32"), best.dev, best.gateway, src)

    async def replace_route(
        self,
        dst: IPv4Network,
        *,
        gateway: IPv4Address | None = None,
        dev: str | None = None,
        onlink: bool = False,
    ) -> None:
        self._call("replace_route", dst, gateway or "", dev or "", "onlink" if onlink else "")
        dst = IPv4Network(dst)
        gw = IPv4Address(gateway) if gateway is not None else None
        what = _route_what("set", dst, gw, dev, onlink)
        link = self._link(dev) if dev is not None else None
        if gw is None:
            if link is None:
                raise _err(what, errno.EINVAL)
        elif onlink:
            if link is None:
                raise _err(what, errno.EINVAL)
            if not link.up:
                raise _err(what, errno.ENETDOWN)
        else:
            conn = self._connected(gw, dev)
            if conn is None:
                raise _err(what, errno.ENETUNREACH)
            dev = conn.dev
        scope = RT_SCOPE_LINK if gw is None else RT_SCOPE_UNIVERSE
        new = RouteInfo(
            dst, RTN_UNICAST, RTPROT_FLANNELD_PY, gw, dev, 0, onlink and gw is not None, scope
        )
        for i, r in enumerate(self.route_table):
            if r.dst == dst and r.metric == 0:
                self.route_table[i] = new
                return
        self.route_table.append(new)

    async def delete_route(
        self, dst: IPv4Network, *, gateway: IPv4Address | None = None, dev: str | None = None
    ) -> bool:
        self._call("delete_route", dst, gateway or "", dev or "")
        dst = IPv4Network(dst)
        if dev is not None and dev not in self.links_by_name:
            return False
        cands = [
            (r.metric, i)
            for i, r in enumerate(self.route_table)
            if r.dst == dst
            and r.proto == RTPROT_FLANNELD_PY
            and (gateway is None or r.gateway == IPv4Address(gateway))
            and (dev is None or r.dev == dev)
        ]
        if not cands:
            return False
        del self.route_table[min(cands)[1]]
        return True

    async def routes(self) -> list[RouteInfo]:
        self._call("routes")
        return sorted(self.route_table, key=lambda r: (r.dst, r.metric))

    # --- helpers for tests ---------------------------------------------------------------------
    def vxlan_link(self, name: str) -> FakeLink:
        return self.links_by_name[name]

    def premake_vxlan(
        self,
        name: str = "flannel.1",
        vni: int = 1,
        *,
        local: str = "10.99.0.11",
        dev: str = "eth0",
        port: int = 8472,
        learning: bool = False,
        gbp: bool = False,
        mac: str = "66:77:88:99:aa:bb",
        up: bool = True,
    ) -> FakeLink:
        """A vxlan device left by an earlier run or made by hand (``ip link add … type vxlan``)."""
        lower = self.links_by_name[dev]
        attrs = VxlanAttrs(vni, IPv4Address(local), lower.index, port, learning, gbp)
        return self.add_link(name, kind="vxlan", mtu=lower.mtu - 50, mac=mac, up=up, vxlan=attrs)

    def set_vxlan(self, name: str, **changes: object) -> None:
        """Change vxlan attributes of an existing device (a device "someone else" made)."""
        link = self.links_by_name[name]
        assert link.vxlan is not None
        link.vxlan = replace(link.vxlan, **changes)  # type: ignore[arg-type]
