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
    "delete_route",
    "find_external_interface",
    "link_mtu",
    "replace_route",
    "route_get",
    "routes",
]

RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253


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


def link_mtu(name: str) -> int:
    with _ipr(f"cannot read the MTU of {name}") as ipr:
        (msg,) = ipr.get_links(_index(ipr, name))
        return int(msg.get("mtu"))


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


def routes(dev: str | None = None) -> list[Route]:
    """IPv4 unicast routes of the main table (optionally only those leaving by ``dev``)."""
    with _ipr("cannot list routes") as ipr:
        names = {int(m["index"]): str(m.get("ifname")) for m in ipr.get_links()}
        out = []
        for msg in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
            if msg.get("table") != RT_TABLE_MAIN or msg["type"] != 1:  # RTN_UNICAST
                continue
            r = _route_from_msg(msg, names)
            if dev is None or r.dev == dev:
                out.append(r)
        return out


def route_get(dst: IPv4Address | str) -> Route:
    """What the kernel would do with a packet to ``dst`` (``ip route get``)."""
    dst = IPv4Address(dst)
    with _ipr(f"cannot look up the route to {dst}") as ipr:
        names = {int(m["index"]): str(m.get("ifname")) for m in ipr.get_links()}
        (msg,) = ipr.route("get", dst=str(dst))
        return _route_from_msg(msg, names)


def replace_route(
    dst: IPv4Network, gateway: IPv4Address | None = None, dev: str | None = None
) -> None:
    """``ip route replace dst [via gateway] [dev dev]`` in the main table."""
    dst = IPv4Network(dst)
    with _ipr(f"cannot set route {dst}") as ipr:
        kw: dict[str, Any] = {
            "dst": str(dst.network_address),
            "dst_len": dst.prefixlen,
            "table": RT_TABLE_MAIN,
        }
        if gateway is not None:
            kw["gateway"] = str(gateway)
        else:
            kw["scope"] = RT_SCOPE_LINK
        if dev is not None:
            kw["oif"] = _index(ipr, dev)
        ipr.route("replace", **kw)


def delete_route(dst: IPv4Network, dev: str | None = None) -> bool:
    """Delete the main-table route to ``dst`` (leaving by ``dev`` if given); False if absent."""
    dst = IPv4Network(dst)
    with _ipr(f"cannot delete route {dst}") as ipr:
        kw: dict[str, Any] = {
            "dst": str(dst.network_address),
            "dst_len": dst.prefixlen,
            "table": RT_TABLE_MAIN,
        }
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
