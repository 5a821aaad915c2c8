"""Typing stub of the C data-plane engine (built from ``_engine_c/*.c``; ``_engine_c/engine.h``
describes it). Import it only through ``engine.py``.

Addresses and networks are host-order ints (``int(IPv4Address(...))``).
"""

from typing import Final

#: Packets per batch (per direction).
BATCH: Final[int]
#: Bytes per packet buffer (any IPv4 datagram fits).
BUFFER_SIZE: Final[int]
#: Counter names, the keys of ``Engine.stats()`` (same as ``engine_types.COUNTERS``).
COUNTERS: Final[tuple[str, ...]]
#: Keys of ``Engine.offloads()``: state flags ``vnet_hdr``, ``udp_gso``, ``udp_gro``, ``tun_gso``
#: (0/1, as in effect now), then offload counters (``gso_errno``/``tun_gso_errno``: the errno that
#: turned that offload off, else 0).
OFFLOAD_COUNTERS: Final[tuple[str, ...]]
#: Most packets per UDP GSO send and per coalesced TUN write.
MAX_SEGMENTS: Final[int]
#: Routes with per-peer counters (``Engine.peer_stats()``); routes beyond are not counted per peer.
PEER_SLOTS: Final[int]
#: Bytes of the virtio_net_hdr in front of every TUN read/write when ``vnet_hdr``.
VNET_HDR_LEN: Final[int]
#: The ICMP error token bucket's defaults: the kernel's ``net.ipv4.icmp_msgs_burst`` (50) and
#: ``net.ipv4.icmp_msgs_per_sec`` (1000) (same as ``pyengine.ICMP_MSGS_BURST``/``_PER_SEC``).
ICMP_MSGS_BURST: Final[int]
ICMP_MSGS_PER_SEC: Final[int]

class Engine:
    """The loop in a native thread; it owns its route table (commands over a socketpair).

    ``vnet_hdr``: the TUN fd was opened with ``IFF_VNET_HDR`` (TSO/CSUM reads are handled);
    ``udp_gso``/``udp_gro``: use them if the kernel accepts (probed in ``start()``, GRO is set on
    the socket there and cleared at ``stop()``); ``tun_gso``: coalesced writes (needs vnet_hdr),
    and TCP/UDP packets written alone with NEEDS_CSUM; ``tun_uso``: UDP datagrams coalesced too
    (GSO_UDP_L4 writes: the TUN accepted USO; needs tun_gso).
    """

    def __init__(
        self,
        tun_fd: int,
        udp_fd: int,
        local_net: int,
        local_prefixlen: int,
        local_addr: int,
        port: int,
        mtu: int,
        *,
        vnet_hdr: bool = False,
        udp_gso: bool = False,
        udp_gro: bool = False,
        tun_gso: bool = False,
        tun_uso: bool = False,
    ) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def set_route(
        self, net: int, prefixlen: int, peer: int, partial_csum: bool = False, /
    ) -> None: ...
    def del_route(self, net: int, prefixlen: int, /) -> None: ...
    def set_icmp_ratelimit(self, burst: int, per_sec: int, /) -> None:
        """Before ``start()``: replace the ICMP error token bucket (it starts full; ``per_sec``
        0: no refill). Without a token an ICMP error is not sent (``icmp_ratelimited``)."""
    def stats(self) -> dict[str, int]: ...
    def offloads(self) -> dict[str, int]: ...
    def peer_stats(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """One ``(net, prefixlen, peer, tx_packets, tx_bytes, rx_packets, rx_bytes)`` per route,
        counted since the route was set or its peer changed: sent = messages the kernel took,
        received = datagrams from that peer that passed every check."""
    def alive(self) -> bool: ...
    def error(self) -> str | None: ...

class RouteTable:
    """The engine's longest-prefix-match table, on its own (for tests against ``routes.py``)."""

    def __init__(self) -> None: ...
    def insert(self, net: int, prefixlen: int, peer: int, /) -> None: ...
    def remove(self, net: int, prefixlen: int, /) -> bool: ...
    def lookup(self, addr: int, /) -> tuple[int, int, int] | None: ...
    def __len__(self) -> int: ...
