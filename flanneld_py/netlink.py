"""Links, addresses and routes over rtnetlink. The only module that imports pyroute2.

Everything here is synchronous (pyroute2's ``IPRoute``): ``AsyncIPRoute`` does not work under
uvloop, and the sync ``IPRoute`` refuses to run inside a running event loop, so the daemon calls
these functions from a worker thread (``asyncio.to_thread``); called inside a running loop they
raise RuntimeError. Each call opens and closes its own netlink socket on a private stdlib event
loop, so calls from different threads never share one and a global ``uvloop.install()`` cannot
break them.

Every failure is a :class:`NetlinkError` whose message is one line saying what failed and how to
fix it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import NetlinkError as _PyrouteNetlinkError

__all__ = [
    "ExternalInterface",
    "NetlinkError",
    "Route",
    "addresses",
    "configure_tun",
    "delete_link",
    "ensure_guard_route",
    "find_external_interface",
    "guard_routes",
    "route_get",
]

RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
RTN_UNREACHABLE = 7
#: ``proto`` of the routes flanneld-py installs (``ip route ... proto 102``), so that ours can be
#: told from the user's and from other daemons' (unassigned in iproute2's rt_protos)
RTPROT_FLANNELD_PY = 102
#: metric of the guard route: far below any route a backend or a user installs for the network
GUARD_METRIC = 0x7FFF0000


class NetlinkError(Exception):
    """A netlink operation failed; ``str(e)`` is one line."""


@dataclass(frozen=True)
class ExternalInterface:
    """The interface the overlay's UDP traffic leaves by (flannel's "external interface")."""

    name: str
    index: int
    #: the interface's address the UDP socket binds to
    address: IPv4Address
    mtu: int
    #: the address peers send to (``--public-ip``; defaults to ``address``)
    public_ip: IPv4Address = field(default=IPv4Address(0))

    def __post_init__(self) -> None:
        if self.public_ip == IPv4Address(0):
            object.__setattr__(self, "public_ip", self.address)


@dataclass(frozen=True)
class Route:
    """A main-table IPv4 route (or the answer of :func:`route_get`)."""

    dst: IPv4Network
    dev: str | None
    gateway: IPv4Address | None = None
    #: preferred source address
    src: IPv4Address | None = None
    metric: int = 0


# ---------------------------------------------------------------------------------------------
# plumbing


def _fail(what: str, exc: BaseException) -> NetlinkError:
    code = exc.code if isinstance(exc, _PyrouteNetlinkError) else getattr(exc, "errno", None)
    if code in (errno.EPERM, errno.EACCES):
        return NetlinkError(f"{what}: needs CAP_NET_ADMIN (run as root)")
    if isinstance(code, int) and code > 0:
        return NetlinkError(f"{what}: {os.strerror(code)}")
    return NetlinkError(f"{what}: {str(exc).strip() or type(exc).__name__}")


@contextmanager
def _ipr(what: str) -> Iterator[Any]:
    """An IPRoute socket; any netlink/OS error inside becomes NetlinkError(what: reason).

    pyroute2's sync API drives an asyncio loop internally. It gets a private stdlib selector loop:
    a loop from the current policy would be uvloop's after ``uvloop.install()``, and pyroute2's
    netlink transport fails on uvloop ("cannot open a UDP handle, invalid family 16").
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "flanneld_py.netlink is synchronous: call it from a worker thread (asyncio.to_thread)"
        )
    loop = asyncio.SelectorEventLoop()
    try:
        try:
            ipr = IPRoute(use_event_loop=loop)
        except (OSError, _PyrouteNetlinkError) as exc:
            raise _fail(f"{what}: cannot open a netlink socket", exc) from None
        try:
            yield ipr
        except (OSError, _PyrouteNetlinkError) as exc:
            raise _fail(what, exc) from None
        finally:
            ipr.close()
            # let the transport's close callbacks run, or it warns "unclosed transport"
            loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetlinkError(f"no network interface named {name}")
    return int(found[0])


@dataclass
class _Link:
    name: str
    index: int
    mtu: int
    #: IPv4 addresses in kernel order: (address, prefixlen, scope)
    addrs: list[tuple[IPv4Address, int, int]]


def _snapshot(ipr: Any) -> list[_Link]:
    links: dict[int, _Link] = {}
    for msg in ipr.get_links():
        idx = int(msg["index"])
        links[idx] = _Link(str(msg.get("ifname")), idx, int(msg.get("mtu") or 0), [])
    for msg in ipr.get_addr(family=socket.AF_INET):
        link = links.get(int(msg["index"]))
        addr = msg.get("local") or msg.get("address")
        if link is not None and addr:
            link.addrs.append((IPv4Address(addr), int(msg["prefixlen"]), int(msg["scope"])))
    return sorted(links.values(), key=lambda lk: lk.index)


# ---------------------------------------------------------------------------------------------
# links


def delete_link(name: str) -> bool:
    """Delete interface ``name``; False if it did not exist."""
    with _ipr(f"cannot delete interface {name}") as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except _PyrouteNetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise
        return True


def addresses(name: str) -> list[IPv4Interface]:
    """IPv4 addresses of interface ``name``, in kernel order."""
    with _ipr(f"cannot read the addresses of {name}") as ipr:
        idx = _index(ipr, name)
        return [
            IPv4Interface(f"{msg.get('local') or msg.get('address')}/{msg['prefixlen']}")
            for msg in ipr.get_addr(family=socket.AF_INET, index=idx)
        ]


# ---------------------------------------------------------------------------------------------
# the TUN


def configure_tun(name: str, address: IPv4Address, network: IPv4Network, mtu: int) -> None:
    """Give the TUN ``name`` its MTU, ``address``/32, link up, and ``network dev name``.

    Idempotent (a restart re-applies it): other IPv4 addresses on the device are removed and the
    network route replaces any route for the same destination (and metric 0), e.g. one left by a
    previous run or pointing elsewhere.
    """
    address = IPv4Address(address)
    network = IPv4Network(network)
    with _ipr(f"cannot configure {name}") as ipr:
        idx = _index(ipr, name)
        with _step(f"cannot set the MTU of {name} to {mtu}"):
            ipr.link("set", index=idx, mtu=mtu)
        for msg in ipr.get_addr(family=socket.AF_INET, index=idx):
            old = IPv4Address(msg.get("local") or msg.get("address"))
            plen = int(msg["prefixlen"])
            if (old, plen) != (address, 32):
                with _step(f"cannot remove stale address {old}/{plen} from {name}"):
                    ipr.addr("del", index=idx, address=str(old), prefixlen=plen)
        if address not in {a.ip for a in _addrs(ipr, idx) if a.network.prefixlen == 32}:
            with _step(f"cannot add address {address}/32 to {name}"):
                ipr.addr("add", index=idx, address=str(address), prefixlen=32)
        with _step(f"cannot bring {name} up"):
            ipr.link("set", index=idx, state="up")
        with _step(f"cannot set accept_local on {name}"):
            # the engine's ICMP errors (unreachable, time exceeded) come from the TUN's own
            # address; without accept_local the kernel drops them as martians. Safe: the engine
            # never accepts a peer packet whose source is inside our own subnet.
            Path(f"/proc/sys/net/ipv4/conf/{name}/accept_local").write_text("1\n")
        with _step(f"cannot add route {network} dev {name}"):
            ipr.route(
                "replace",
                dst=str(network.network_address),
                dst_len=network.prefixlen,
                oif=idx,
                scope=RT_SCOPE_LINK,
                table=RT_TABLE_MAIN,
            )


def _addrs(ipr: Any, idx: int) -> list[IPv4Interface]:
    return [
        IPv4Interface(f"{msg.get('local') or msg.get('address')}/{msg['prefixlen']}")
        for msg in ipr.get_addr(family=socket.AF_INET, index=idx)
    ]


@contextmanager
def _step(what: str) -> Iterator[None]:
    try:
        yield
    except (OSError, _PyrouteNetlinkError) as exc:
        raise _fail(what, exc) from None


# ---------------------------------------------------------------------------------------------
# routes


def _route_from_msg(msg: Any, names: dict[int, str]) -> Route:
    dst = msg.get("dst") or "0.0.0.0"
    oif = msg.get("oif")
    gw = msg.get("gateway")
    if oif is None and msg.get("multipath"):
        hop = msg.get("multipath")[0]
        oif = hop.get("oif")
        gw = gw or hop.get("gateway")
    src = msg.get("prefsrc")
    return Route(
        dst=IPv4Network(f"{dst}/{msg['dst_len']}", strict=False),
        dev=names.get(int(oif)) if oif is not None else None,
        gateway=IPv4Address(gw) if gw else None,
        src=IPv4Address(src) if src else None,
        metric=int(msg.get("priority") or 0),
    )


def route_get(dst: IPv4Address | str) -> Route:
    """What the kernel would do with a packet to ``dst`` (``ip route get``)."""
    dst = IPv4Address(dst)
    with _ipr(f"cannot look up the route to {dst}") as ipr:
        names = {int(m["index"]): str(m.get("ifname")) for m in ipr.get_links()}
        (msg,) = ipr.route("get", dst=str(dst))
        return _route_from_msg(msg, names)


# ---------------------------------------------------------------------------------------------
# the guard route: while no backend route covers a destination in the network (daemon down,
# peer unknown), packets for it are refused with ICMP host unreachable instead of leaving by the
# default route unencapsulated. It outlives the process on purpose.


def guard_routes() -> list[IPv4Network]:
    """Destinations of our guard routes (``unreachable <net> proto 102 metric GUARD_METRIC``)."""
    with _ipr("cannot list routes") as ipr:
        return [
            IPv4Network(f"{msg.get('dst') or '0.0.0.0'}/{msg['dst_len']}")
            for msg in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN)
            if msg["type"] == RTN_UNREACHABLE
            and msg["proto"] == RTPROT_FLANNELD_PY
            and int(msg.get("priority") or 0) == GUARD_METRIC
        ]


def ensure_guard_route(network: IPv4Network) -> list[IPv4Network]:
    """Install the guard route for ``network`` and remove our guards for any other network (a
    changed config). Returns the removed ones. Idempotent."""
    network = IPv4Network(network)
    removed = []
    for old in guard_routes():
        if old != network:
            with _ipr(f"cannot remove the old guard route for {old}") as ipr:
                ipr.route(
                    "del",
                    type=RTN_UNREACHABLE,
                    dst=str(old.network_address),
                    dst_len=old.prefixlen,
                    priority=GUARD_METRIC,
                    table=RT_TABLE_MAIN,
                )
            removed.append(old)
    with _ipr(f"cannot add the guard route unreachable {network} metric {GUARD_METRIC}") as ipr:
        ipr.route(
            "replace",
            type=RTN_UNREACHABLE,
            dst=str(network.network_address),
            dst_len=network.prefixlen,
            priority=GUARD_METRIC,
            proto=RTPROT_FLANNELD_PY,
            table=RT_TABLE_MAIN,
        )
    return removed


# ---------------------------------------------------------------------------------------------
# the external interface


def _usable_addr(link: _Link) -> IPv4Address | None:
    for addr, _plen, scope in link.addrs:
        if scope == RT_SCOPE_UNIVERSE:
            return addr
    return None


def _available(links: list[_Link]) -> str:
    parts = []
    for lk in links:
        addrs = ", ".join(str(a) for a, _, _ in lk.addrs)
        parts.append(f"{lk.name} ({addrs})" if addrs else lk.name)
    return ", ".join(parts) or "none"


def _pick(link: _Link, address: IPv4Address | None, why: str) -> tuple[_Link, IPv4Address]:
    if address is None:
        address = _usable_addr(link)
        if address is None:
            raise NetlinkError(
                f"interface {link.name} ({why}) has no global IPv4 address; "
                "give it one or choose another with --iface"
            )
    return link, address


def _choose(
    links: list[_Link],
    default_oif: int | None,
    ifaces: Sequence[str],
    iface_regex: Sequence[str],
) -> tuple[_Link, IPv4Address]:
    if ifaces:
        problems: list[str] = []
        for entry in ifaces:
            try:
                ip: IPv4Address | None = IPv4Address(entry)
            except ValueError:
                ip = None
            for lk in links:
                if ip is not None and any(a == ip for a, _, _ in lk.addrs):
                    return lk, ip
                if ip is None and lk.name == entry:
                    addr = _usable_addr(lk)
                    if addr is not None:
                        return lk, addr
                    problems.append(f"{entry} has no global IPv4 address")
        why = f" ({'; '.join(problems)})" if problems else ""
        raise NetlinkError(
            f"no interface matches --iface {', '.join(ifaces)}{why}; available: {_available(links)}"
        )
    if iface_regex:
        rx_problems: list[str] = []
        for expr in iface_regex:
            try:
                rx = re.compile(expr)
            except re.error as exc:
                raise NetlinkError(f"invalid --iface-regex {expr!r}: {exc}") from None
            for lk in links:  # addresses first, as flannel does
                for a, _, _ in lk.addrs:
                    if rx.search(str(a)):
                        return lk, a
            for lk in links:
                if rx.search(lk.name):
                    addr = _usable_addr(lk)
                    if addr is not None:
                        return lk, addr
                    rx_problems.append(f"{lk.name} has no global IPv4 address")
        why = f" ({'; '.join(rx_problems)})" if rx_problems else ""
        raise NetlinkError(
            f"no interface matches --iface-regex {', '.join(iface_regex)}{why}; "
            f"available: {_available(links)}"
        )
    if default_oif is None:
        raise NetlinkError(
            "no IPv4 default route to choose the external interface from; "
            "add one or pass --iface/--iface-regex"
        )
    for lk in links:
        if lk.index == default_oif:
            return _pick(lk, None, "default route")
    raise NetlinkError("the IPv4 default route has no usable interface; pass --iface")


def _default_oif(ipr: Any) -> int | None:
    best: tuple[int, int] | None = None  # (metric, oif)
    for msg in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
        if msg["dst_len"] != 0 or msg.get("table") != RT_TABLE_MAIN or msg["type"] != 1:
            continue
        oif = msg.get("oif")
        if oif is None and msg.get("multipath"):
            oif = msg.get("multipath")[0].get("oif")
        if oif is None:
            continue
        cand = (int(msg.get("priority") or 0), int(oif))
        if best is None or cand < best:
            best = cand
    return None if best is None else best[1]


def find_external_interface(
    ifaces: Sequence[str] = (),
    iface_regex: Sequence[str] = (),
    public_ip: str | None = None,
) -> ExternalInterface:
    """Choose the external interface as flannel does.

    - ``ifaces`` (``--iface``, repeatable): interface names or IPv4 addresses, tried in order;
      an address selects the interface holding it, and that address.
    - otherwise ``iface_regex`` (``--iface-regex``): each expression is searched first in the
      interfaces' IPv4 addresses, then in their names.
    - otherwise: the interface of the IPv4 default route (lowest metric).

    The address is the chosen IP, or the interface's first global IPv4 address. ``public_ip``
    (``--public-ip``) only changes what peers are told.
    """
    pub: IPv4Address | None = None
    if public_ip:
        try:
            parsed = ip_address(public_ip)
        except ValueError:
            raise NetlinkError(f"invalid --public-ip {public_ip!r}: not an IP address") from None
        if not isinstance(parsed, IPv4Address):
            raise NetlinkError(f"invalid --public-ip {public_ip}: only IPv4 is supported")
        pub = parsed
    with _ipr("cannot list network interfaces") as ipr:
        links = _snapshot(ipr)
        default_oif = None if ifaces or iface_regex else _default_oif(ipr)
    link, address = _choose(links, default_oif, list(ifaces), list(iface_regex))
    if link.mtu <= 0:
        raise NetlinkError(f"cannot determine the MTU of {link.name}")
    return ExternalInterface(
        name=link.name,
        index=link.index,
        address=address,
        mtu=link.mtu,
        public_ip=pub if pub is not None else address,
    )


# ---------------------------------------------------------------------------------------------
# vxlan and host-gw backends: vxlan devices, addresses, neighbours, FDB entries and our routes.
# Every route installed here carries ``proto RTPROT_FLANNELD_PY``; the guard route (type
# unreachable) is never touched by these functions.

__all__ += [
    "FdbEntry",
    "LinkExistsError",
    "LinkInfo",
    "Neighbour",
    "RouteInfo",
    "VxlanAttrs",
    "VxlanSpec",
    "create_vxlan",
    "delete_fdb",
    "delete_neigh",
    "delete_proto_route",
    "ensure_v4_address",
    "fdb_entries",
    "link_info",
    "links_by_kind",
    "neighbours",
    "replace_fdb",
    "replace_neigh",
    "replace_proto_route",
    "route_entries",
    "set_link_up",
]

RTPROT_KERNEL = 2
RT_SCOPE_HOST = 254
#: ``onlink`` (rtmsg flags): the gateway is on the link even without a covering connected route
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
#: neighbour flag ``self`` (the device's own FDB, not its master bridge's)
NTF_SELF = 0x02
_IFF_UP = 0x1
_AF_BRIDGE = 7


class LinkExistsError(NetlinkError):
    """The interface to create already exists (EEXIST)."""


@dataclass(frozen=True)
class VxlanAttrs:
    """The vxlan attributes of a link (``ip -d link show``)."""

    vni: int
    #: ``local`` (source address of the encapsulated packets)
    local: IPv4Address | None
    #: ifindex of the lower device (``dev``), None if not bound to one
    link: int | None
    #: destination UDP port (``dstport``)
    port: int
    learning: bool
    gbp: bool
    l2miss: bool = False
    l3miss: bool = False
    proxy: bool = False
    #: multicast group / default remote, None if unset
    group: IPv4Address | None = None


@dataclass(frozen=True)
class LinkInfo:
    name: str
    index: int
    #: ``IFLA_INFO_KIND`` ("vxlan", "veth", "bridge", "tun", ...), None for plain devices
    kind: str | None
    #: lower-case colon form, None without an L2 address
    mac: str | None
    mtu: int
    #: administratively up (IFF_UP)
    up: bool
    vxlan: VxlanAttrs | None = None


@dataclass(frozen=True)
class VxlanSpec:
    """What :func:`create_vxlan` builds: ``ip link add NAME address MAC type vxlan id VNI local
    LOCAL dev DEV dstport PORT nolearning|learning [gbp]`` (ttl auto, no group, no l2miss/l3miss
    /proxy); ``mtu`` None = the kernel's choice (lower device MTU - 50)."""

    name: str
    vni: int
    mac: str
    local: IPv4Address
    dev: str
    port: int
    learning: bool = False
    gbp: bool = False
    mtu: int | None = None


@dataclass(frozen=True)
class Neighbour:
    ip: IPv4Address
    mac: str | None
    #: NUD state bits (NUD_PERMANENT = 0x80)
    state: int

    @property
    def permanent(self) -> bool:
        return bool(self.state & NUD_PERMANENT)


@dataclass(frozen=True)
class FdbEntry:
    mac: str
    #: remote VTEP (``dst``), None for entries without one
    dst: IPv4Address | None
    state: int

    @property
    def permanent(self) -> bool:
        return bool(self.state & NUD_PERMANENT)


@dataclass(frozen=True)
class RouteInfo:
    """A main-table IPv4 route of any type, with what tells ours from others'."""

    dst: IPv4Network
    #: RTN_* (1 unicast, 7 unreachable, ...)
    type: int
    #: RTPROT_* (2 kernel, 3 boot, 4 static, 102 ours)
    proto: int
    gateway: IPv4Address | None
    dev: str | None
    metric: int = 0
    onlink: bool = False
    scope: int = RT_SCOPE_UNIVERSE


def _mac(value: Any) -> str | None:
    return str(value).lower() if value else None


def _link_info(msg: Any) -> LinkInfo:
    info = msg.get("linkinfo")
    kind = info.get("kind") if info is not None else None
    vx: VxlanAttrs | None = None
    if kind == "vxlan" and info is not None:
        data = info.get("data")
        if data is not None:
            local = data.get("vxlan_local")
            group = data.get("vxlan_group")
            link = data.get("vxlan_link")
            vx = VxlanAttrs(
                vni=int(data.get("vxlan_id") or 0),
                local=IPv4Address(local) if local else None,
                link=int(link) if link else None,
                port=int(data.get("vxlan_port") or 0),
                learning=bool(data.get("vxlan_learning")),
                gbp=bool(data.get("vxlan_gbp")),
                l2miss=bool(data.get("vxlan_l2miss")),
                l3miss=bool(data.get("vxlan_l3miss")),
                proxy=bool(data.get("vxlan_proxy")),
                group=IPv4Address(group) if group and group != "0.0.0.0" else None,
            )
    return LinkInfo(
        name=str(msg.get("ifname")),
        index=int(msg["index"]),
        kind=str(kind) if kind else None,
        mac=_mac(msg.get("address")),
        mtu=int(msg.get("mtu") or 0),
        up=bool(int(msg["flags"]) & _IFF_UP),
        vxlan=vx,
    )


def link_info(name: str) -> LinkInfo | None:
    """Kind, MAC, MTU, state and vxlan attributes of interface ``name``; None if absent."""
    with _ipr(f"cannot read interface {name}") as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        try:
            (msg,) = ipr.get_links(found[0])
        except _PyrouteNetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        return _link_info(msg)


def links_by_kind(kind: str | None = None) -> list[LinkInfo]:
    """All interfaces (of ``kind`` if given, e.g. "vxlan"), by index."""
    with _ipr("cannot list network interfaces") as ipr:
        out = [_link_info(msg) for msg in ipr.get_links()]
    out.sort(key=lambda lk: lk.index)
    return [lk for lk in out if kind is None or lk.kind == kind]


def create_vxlan(spec: VxlanSpec) -> None:
    """Create the vxlan device ``spec`` describes, then set ``accept_ra=0`` on it (when IPv6 is
    on). LinkExistsError if an interface of that name exists."""
    what = f"cannot create vxlan device {spec.name}"
    with _ipr(what) as ipr:
        lower = ipr.link_lookup(ifname=spec.dev)
        if not lower:
            raise NetlinkError(f"{what}: no network interface named {spec.dev}")
        kw: dict[str, Any] = {
            "ifname": spec.name,
            "kind": "vxlan",
            "address": spec.mac,
            "vxlan_id": spec.vni,
            "vxlan_local": str(spec.local),
            "vxlan_link": lower[0],
            "vxlan_port": spec.port,
            "vxlan_learning": 1 if spec.learning else 0,
            "vxlan_ttl": 0,
        }
        if spec.gbp:
            kw["vxlan_gbp"] = True
        if spec.mtu is not None:
            kw["mtu"] = spec.mtu
        try:
            ipr.link("add", **kw)
        except _PyrouteNetlinkError as exc:
            if exc.code == errno.EEXIST:
                raise LinkExistsError(f"{what}: {os.strerror(errno.EEXIST)}") from None
            raise
    accept_ra = Path(f"/proc/sys/net/ipv6/conf/{spec.name}/accept_ra")
    if accept_ra.exists():
        with _step(f"cannot set net.ipv6.conf.{spec.name}.accept_ra=0"):
            accept_ra.write_text("0\n")


def set_link_up(name: str, mtu: int | None = None) -> None:
    """``ip link set NAME [mtu MTU] up``."""
    with _ipr(f"cannot bring {name} up") as ipr:
        kw: dict[str, Any] = {"index": _index(ipr, name), "state": "up"}
        if mtu is not None:
            kw["mtu"] = mtu
        ipr.link("set", **kw)


def ensure_v4_address(name: str, address: IPv4Address, network: IPv4Network) -> list[IPv4Interface]:
    """Give ``name`` the address ``address``/32, removing its other IPv4 addresses that lie inside
    ``network`` and keeping the rest (flannel v0.20.2's EnsureV4AddressOnLink). Returns the
    removed addresses."""
    address = IPv4Address(address)
    network = IPv4Network(network)
    removed: list[IPv4Interface] = []
    with _ipr(f"cannot set address {address}/32 on {name}") as ipr:
        idx = _index(ipr, name)
        have = False
        for cur in _addrs(ipr, idx):
            if cur.ip == address and cur.network.prefixlen == 32:
                have = True
            elif cur.ip in network:
                with _step(f"cannot remove address {cur} from {name}"):
                    ipr.addr("del", index=idx, address=str(cur.ip), prefixlen=cur.network.prefixlen)
                removed.append(cur)
        if not have:
            ipr.addr("add", index=idx, address=str(address), prefixlen=32)
    return removed


def replace_neigh(dev: str, ip: IPv4Address, mac: str) -> None:
    """``ip neigh replace IP lladdr MAC dev DEV nud permanent``."""
    with _ipr(f"cannot set neighbour {ip} lladdr {mac} on {dev}") as ipr:
        ipr.neigh("replace", dst=str(ip), lladdr=mac, ifindex=_index(ipr, dev), state=NUD_PERMANENT)


def delete_neigh(dev: str, ip: IPv4Address) -> bool:
    """``ip neigh del IP dev DEV``; False if there was no such entry (or no such device)."""
    with _ipr(f"cannot delete neighbour {ip} on {dev}") as ipr:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            return False
        try:
            ipr.neigh("del", dst=str(ip), ifindex=found[0])
        except _PyrouteNetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
                return False
            raise
        return True


def neighbours(dev: str) -> list[Neighbour]:
    """IPv4 neighbour entries of ``dev`` (``ip -4 neigh show dev DEV``)."""
    with _ipr(f"cannot list the neighbours of {dev}") as ipr:
        idx = _index(ipr, dev)
        out = []
        for msg in ipr.neigh("dump", ifindex=idx, family=socket.AF_INET):
            if int(msg["ifindex"]) != idx or not msg.get("dst"):
                continue
            out.append(
                Neighbour(IPv4Address(msg.get("dst")), _mac(msg.get("lladdr")), int(msg["state"]))
            )
        return out


def replace_fdb(dev: str, mac: str, dst: IPv4Address) -> None:
    """``bridge fdb replace MAC dev DEV dst DST self permanent``."""
    with _ipr(f"cannot set FDB entry {mac} dst {dst} on {dev}") as ipr:
        ipr.fdb(
            "replace",
            ifindex=_index(ipr, dev),
            lladdr=mac,
            dst=str(dst),
            state=NUD_PERMANENT,
            flags=NTF_SELF,
        )


def delete_fdb(dev: str, mac: str, dst: IPv4Address | None = None) -> bool:
    """``bridge fdb del MAC dev DEV [dst DST] self``; False if absent (or no such device).

    The kernel acknowledges a delete whose ``dst`` matches no remote of the MAC without deleting
    anything, so the entry is looked up first."""
    mac = mac.lower()
    with _ipr(f"cannot delete FDB entry {mac} on {dev}") as ipr:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            return False
        present = False
        for msg in ipr.fdb("dump", ifindex=found[0]):
            if int(msg["ifindex"]) == found[0] and _mac(msg.get("lladdr")) == mac:
                cur = msg.get("dst")
                present = present or dst is None or (cur is not None and IPv4Address(cur) == dst)
        if not present:
            return False
        kw: dict[str, Any] = {"ifindex": found[0], "lladdr": mac}
        if dst is not None:
            kw["dst"] = str(dst)
        try:
            ipr.fdb("del", **kw)
        except _PyrouteNetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
                return False
            raise
        return True


def fdb_entries(dev: str) -> list[FdbEntry]:
    """FDB entries of ``dev`` itself (``bridge fdb show dev DEV``, ``self`` entries)."""
    with _ipr(f"cannot list the FDB of {dev}") as ipr:
        idx = _index(ipr, dev)
        out = []
        for msg in ipr.fdb("dump", ifindex=idx):
            mac = _mac(msg.get("lladdr"))
            if int(msg["ifindex"]) != idx or mac is None:
                continue
            dst = msg.get("dst")
            out.append(FdbEntry(mac, IPv4Address(dst) if dst else None, int(msg["state"])))
        return out


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


def replace_proto_route(
    dst: IPv4Network,
    gateway: IPv4Address | None = None,
    dev: str | None = None,
    onlink: bool = False,
) -> None:
    """``ip route replace DST [via GW] [dev DEV] [onlink] proto 102`` in the main table (metric
    0). An off-link gateway without ``onlink`` fails with "Network is unreachable"."""
    dst = IPv4Network(dst)
    with _ipr(_route_what("set", dst, gateway, dev, onlink)) as ipr:
        kw: dict[str, Any] = {
            "dst": str(dst.network_address),
            "dst_len": dst.prefixlen,
            "table": RT_TABLE_MAIN,
            "proto": RTPROT_FLANNELD_PY,
        }
        if gateway is not None:
            kw["gateway"] = str(gateway)
        else:
            kw["scope"] = RT_SCOPE_LINK
        if dev is not None:
            kw["oif"] = _index(ipr, dev)
        if onlink:
            kw["flags"] = RTNH_F_ONLINK
        ipr.route("replace", **kw)


def delete_proto_route(
    dst: IPv4Network, gateway: IPv4Address | None = None, dev: str | None = None
) -> bool:
    """Delete our (proto 102) main-table route to ``dst`` (matching ``gateway``/``dev`` when
    given); False if there is none. Routes of other protos are never touched."""
    dst = IPv4Network(dst)
    with _ipr(_route_what("delete", dst, gateway, dev, False)) as ipr:
        kw: dict[str, Any] = {
            "dst": str(dst.network_address),
            "dst_len": dst.prefixlen,
            "table": RT_TABLE_MAIN,
            "proto": RTPROT_FLANNELD_PY,
        }
        if gateway is not None:
            kw["gateway"] = str(gateway)
        if dev is not None:
            found = ipr.link_lookup(ifname=dev)
            if not found:
                return False
            kw["oif"] = found[0]
        try:
            ipr.route("del", **kw)
        except _PyrouteNetlinkError as exc:
            if exc.code == errno.ESRCH:
                return False
            raise
        return True


def route_entries() -> list[RouteInfo]:
    """Every IPv4 route of the main table, of any type and proto."""
    with _ipr("cannot list routes") as ipr:
        names = {int(m["index"]): str(m.get("ifname")) for m in ipr.get_links()}
        out = []
        for msg in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
            if msg.get("table") != RT_TABLE_MAIN:
                continue
            base = _route_from_msg(msg, names)
            out.append(
                RouteInfo(
                    dst=base.dst,
                    type=int(msg["type"]),
                    proto=int(msg["proto"]),
                    gateway=base.gateway,
                    dev=base.dev,
                    metric=base.metric,
                    onlink=bool(int(msg["flags"]) & RTNH_F_ONLINK),
                    scope=int(msg["scope"]),
                )
            )
        return out
