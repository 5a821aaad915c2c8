"""The kernel operations the vxlan and host-gw backends need, as one async interface.

``NetOps`` is the seam between a backend's logic and the kernel: ``RealNetOps`` runs the
synchronous functions of :mod:`flanneld_py.netlink` in a worker thread (they refuse to run inside
the event loop), and the unit tests use an in-memory model (``tests/unit/fakenet.py``) that
enforces the kernel rules the backends rely on.

Every failure is a :class:`~flanneld_py.netlink.NetlinkError` (one line); creating an interface
that exists raises its subclass :class:`~flanneld_py.netlink.LinkExistsError`. Deleting something
absent is not an error: the delete methods return False. Every route set or deleted here carries
``proto 102`` (:data:`~flanneld_py.netlink.RTPROT_FLANNELD_PY`), so a backend never removes a
route it did not install.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Protocol

from flanneld_py import netlink
from flanneld_py.netlink import (
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

__all__ = [
    "FdbEntry",
    "LinkExistsError",
    "LinkInfo",
    "Neighbour",
    "NetOps",
    "NetlinkError",
    "RealNetOps",
    "Route",
    "RouteInfo",
    "VxlanAttrs",
    "VxlanSpec",
]


class NetOps(Protocol):
    """Links, addresses, neighbours, FDB entries and routes of the current network namespace."""

    # --- links ------------------------------------------------------------------------------
    async def link(self, name: str) -> LinkInfo | None:
        """The interface ``name`` (kind, MAC, MTU, up, vxlan attributes); None if absent."""
        ...

    async def links(self, kind: str | None = None) -> list[LinkInfo]:
        """All interfaces, or those of ``kind`` ("vxlan")."""
        ...

    async def create_vxlan(self, spec: VxlanSpec) -> None:
        """``ip link add`` the vxlan device, then ``accept_ra=0``. LinkExistsError if taken."""
        ...

    async def delete_link(self, name: str) -> bool:
        """Delete an interface (its addresses, neighbours, FDB and routes go with it)."""
        ...

    async def set_link_up(self, name: str, mtu: int | None = None) -> None:
        """``ip link set NAME [mtu MTU] up``."""
        ...

    # --- addresses --------------------------------------------------------------------------
    async def addresses(self, name: str) -> list[IPv4Interface]:
        """IPv4 addresses of ``name``."""
        ...

    async def ensure_v4_address(
        self, name: str, address: IPv4Address, network: IPv4Network
    ) -> list[IPv4Interface]:
        """``address``/32 on ``name``; other addresses inside ``network`` are removed (returned),
        the rest kept."""
        ...

    # --- neighbours -------------------------------------------------------------------------
    async def replace_neigh(self, dev: str, ip: IPv4Address, mac: str) -> None:
        """``ip neigh replace IP lladdr MAC dev DEV nud permanent``."""
        ...

    async def delete_neigh(self, dev: str, ip: IPv4Address) -> bool: ...

    async def neighbours(self, dev: str) -> list[Neighbour]:
        """IPv4 neighbours of ``dev``."""
        ...

    # --- FDB --------------------------------------------------------------------------------
    async def replace_fdb(self, dev: str, mac: str, dst: IPv4Address) -> None:
        """``bridge fdb replace MAC dev DEV dst DST self permanent``."""
        ...

    async def delete_fdb(self, dev: str, mac: str, dst: IPv4Address | None = None) -> bool: ...

    async def fdb(self, dev: str) -> list[FdbEntry]:
        """The device's own FDB entries."""
        ...

    # --- routes -----------------------------------------------------------------------------
    async def route_get(self, dst: IPv4Address) -> Route:
        """``ip route get DST``."""
        ...

    async def replace_route(
        self,
        dst: IPv4Network,
        *,
        gateway: IPv4Address | None = None,
        dev: str | None = None,
        onlink: bool = False,
    ) -> None:
        """``ip route replace DST [via GW] [dev DEV] [onlink] proto 102``."""
        ...

    async def delete_route(
        self, dst: IPv4Network, *, gateway: IPv4Address | None = None, dev: str | None = None
    ) -> bool:
        """Delete our proto-102 route to ``dst``; False if there is none."""
        ...

    async def routes(self) -> list[RouteInfo]:
        """Every main-table IPv4 route (any type, any proto)."""
        ...


class RealNetOps:
    """:class:`NetOps` on the kernel: each call runs a :mod:`flanneld_py.netlink` function in a
    worker thread with its own netlink socket."""

    async def link(self, name: str) -> LinkInfo | None:
        return await asyncio.to_thread(netlink.link_info, name)

    async def links(self, kind: str | None = None) -> list[LinkInfo]:
        return await asyncio.to_thread(netlink.links_by_kind, kind)

    async def create_vxlan(self, spec: VxlanSpec) -> None:
        await asyncio.to_thread(netlink.create_vxlan, spec)

    async def delete_link(self, name: str) -> bool:
        return await asyncio.to_thread(netlink.delete_link, name)

    async def set_link_up(self, name: str, mtu: int | None = None) -> None:
        await asyncio.to_thread(netlink.set_link_up, name, mtu)

    async def addresses(self, name: str) -> list[IPv4Interface]:
        return await asyncio.to_thread(netlink.addresses, name)

    async def ensure_v4_address(
        self, name: str, address: IPv4Address, network: IPv4Network
    ) -> list[IPv4Interface]:
        return await asyncio.to_thread(netlink.ensure_v4_address, name, address, network)

    async def replace_neigh(self, dev: str, ip: IPv4Address, mac: str) -> None:
        await asyncio.to_thread(netlink.replace_neigh, dev, ip, mac)

    async def delete_neigh(self, dev: str, ip: IPv4Address) -> bool:
        return await asyncio.to_thread(netlink.delete_neigh, dev, ip)

    async def neighbours(self, dev: str) -> list[Neighbour]:
        return await asyncio.to_thread(netlink.neighbours, dev)

    async def replace_fdb(self, dev: str, mac: str, dst: IPv4Address) -> None:
        await asyncio.to_thread(netlink.replace_fdb, dev, mac, dst)

    async def delete_fdb(self, dev: str, mac: str, dst: IPv4Address | None = None) -> bool:
        return await asyncio.to_thread(netlink.delete_fdb, dev, mac, dst)

    async def fdb(self, dev: str) -> list[FdbEntry]:
        return await asyncio.to_thread(netlink.fdb_entries, dev)

    async def route_get(self, dst: IPv4Address) -> Route:
        return await asyncio.to_thread(netlink.route_get, dst)

    async def replace_route(
        self,
        dst: IPv4Network,
        *,
        gateway: IPv4Address | None = None,
        dev: str | None = None,
        onlink: bool = False,
    ) -> None:
        await asyncio.to_thread(netlink.replace_proto_route, dst, gateway, dev, onlink)

    async def delete_route(
        self, dst: IPv4Network, *, gateway: IPv4Address | None = None, dev: str | None = None
    ) -> bool:
        return await asyncio.to_thread(netlink.delete_proto_route, dst, gateway, dev)

    async def routes(self) -> list[RouteInfo]:
        return await asyncio.to_thread(netlink.route_entries)
