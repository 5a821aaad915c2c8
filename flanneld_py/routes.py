"""Longest-prefix-match route table: IPv4 subnet -> peer PublicIP (pure).

This is the reference the C engine's table (``_engine.RouteTable``) is tested against, and the
table the pure-Python engine uses. Both have the same shape: one hash table per prefix length
present, probed from the longest length to the shortest. A lookup therefore costs one hash probe
per *distinct prefix length* in the table, whatever the number of peers (in a flannel network every
lease has the same ``SubnetLen``, so a lookup is a single probe); flannel's own table is a linear
scan.

Addresses and networks are host-order ``int`` in the hot methods (``set``/``remove``/``lookup``/
``peer``); ``set_route``/``del_route``/``to_dict`` take and give ``ipaddress`` objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

__all__ = ["MASKS", "RouteOps", "RouteTable", "diff"]

#: MASKS[n] is the netmask of a /n as a host-order int.
MASKS: tuple[int, ...] = tuple((0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF for n in range(33))


class RouteTable:
    """subnet (net, prefixlen) -> peer, with longest-prefix-match lookup."""

    __slots__ = ("_by_len", "_order")

    def __init__(self) -> None:
        self._by_len: dict[int, dict[int, int]] = {}
        # (prefixlen, mask, table) for every length present, longest first
        self._order: tuple[tuple[int, int, dict[int, int]], ...] = ()

    def _reorder(self) -> None:
        self._order = tuple(
            (plen, MASKS[plen], self._by_len[plen]) for plen in sorted(self._by_len, reverse=True)
        )

    def set(self, net: int, prefixlen: int, peer: int) -> None:
        """Add or replace the route for ``net/prefixlen`` (host bits of ``net`` are ignored)."""
        if not 0 <= prefixlen <= 32:
            raise ValueError(f"prefix length {prefixlen} is not in 0..32")
        table = self._by_len.get(prefixlen)
        if table is None:
            table = self._by_len[prefixlen] = {}
            self._reorder()
        table[net & MASKS[prefixlen]] = peer

    def remove(self, net: int, prefixlen: int) -> bool:
        """Remove the route for ``net/prefixlen``; return whether there was one."""
        if not 0 <= prefixlen <= 32:
            return False
        table = self._by_len.get(prefixlen)
        if table is None or table.pop(net & MASKS[prefixlen], None) is None:
            return False
        if not table:
            del self._by_len[prefixlen]
            self._reorder()
        return True

    def lookup(self, addr: int) -> tuple[int, int, int] | None:
        """The most specific route covering ``addr``, as (net, prefixlen, peer), or None."""
        for plen, mask, table in self._order:
            peer = table.get(addr & mask)
            if peer is not None:
                return addr & mask, plen, peer
        return None

    def get(self, net: int, prefixlen: int) -> int | None:
        """The peer of exactly ``net/prefixlen`` (host bits ignored), or None."""
        table = self._by_len.get(prefixlen)
        return None if table is None else table.get(net & MASKS[prefixlen])

    def peer(self, addr: int) -> int | None:
        """Just the peer of :meth:`lookup` (the engine's hot path)."""
        for _plen, mask, table in self._order:
            peer = table.get(addr & mask)
            if peer is not None:
                return peer
        return None

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_len.values())

    def items(self) -> Iterator[tuple[int, int, int]]:
        """(net, prefixlen, peer) for every route, longest prefixes first."""
        for plen, _mask, table in self._order:
            for net, peer in table.items():
                yield net, plen, peer

    # --- ipaddress conveniences -------------------------------------------------------------
    def set_route(self, subnet: IPv4Network, peer: IPv4Address) -> None:
        self.set(int(subnet.network_address), subnet.prefixlen, int(peer))

    def del_route(self, subnet: IPv4Network) -> bool:
        return self.remove(int(subnet.network_address), subnet.prefixlen)

    def to_dict(self) -> dict[IPv4Network, IPv4Address]:
        return {IPv4Network((net, plen)): IPv4Address(peer) for net, plen, peer in self.items()}


@dataclass(frozen=True)
class RouteOps:
    """What turns one route set into another: routes to set (add or replace), then delete."""

    set: dict[IPv4Network, IPv4Address]
    delete: tuple[IPv4Network, ...]

    def __bool__(self) -> bool:
        return bool(self.set or self.delete)


def diff(
    old: Mapping[IPv4Network, IPv4Address], new: Mapping[IPv4Network, IPv4Address]
) -> RouteOps:
    """The operations that turn ``old`` into ``new`` (e.g. after re-listing the leases)."""
    to_set = {net: peer for net, peer in new.items() if old.get(net) != peer}
    to_delete = tuple(sorted((net for net in old if net not in new), key=_net_key))
    return RouteOps(
        set=dict(sorted(to_set.items(), key=lambda kv: _net_key(kv[0]))), delete=to_delete
    )


def _net_key(net: IPv4Network) -> tuple[int, int]:
    return int(net.network_address), net.prefixlen
