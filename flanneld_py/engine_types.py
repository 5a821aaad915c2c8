"""What both data-plane engines share: their configuration and their names.

A neutral module: the C engine's facade (``engine.py``) and the Python engine (``pyengine.py``)
both import it, neither imports the other for these.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

__all__ = [
    "COUNTERS",
    "DIAGNOSTIC_COUNTERS",
    "KINDS",
    "OFFLOAD_MODES",
    "PEER_COUNTERS",
    "EngineConfig",
]

#: ``--engine``: "auto" = C if built, else Python
KINDS = ("auto", "c", "python")
#: ``--offload``: "auto" = every segmentation offload the kernel accepts (C engine), "off" = none
OFFLOAD_MODES = ("auto", "off")

#: Counter names, identical in both engines (``_engine.COUNTERS`` lists the same names).
COUNTERS: tuple[str, ...] = (
    # TUN -> UDP
    "tun_rx_packets",
    "tun_rx_bytes",
    "tun_rx_batches",
    "tun_rx_errors",
    "drop_tun_ipv6",
    "drop_tun_malformed",
    "drop_no_route",
    "drop_tun_ttl",
    "udp_tx_packets",
    "udp_tx_bytes",
    "udp_tx_batches",
    "udp_tx_errors",
    "udp_tx_stalls",
    # UDP -> TUN
    "udp_rx_packets",
    "udp_rx_bytes",
    "udp_rx_batches",
    "udp_rx_errors",
    "drop_udp_truncated",
    "drop_udp_short",
    "drop_udp_not_ipv4",
    "drop_udp_bad_header",
    "drop_udp_bad_length",
    "drop_udp_bad_checksum",
    "drop_udp_unknown_src",
    "drop_udp_wrong_peer",
    "drop_udp_not_local",
    "drop_udp_ttl",
    "rx_oversize",
    "tun_tx_packets",
    "tun_tx_bytes",
    "tun_tx_errors",
    "tun_tx_stalls",
    # ICMP errors we generate
    "icmp_unreachable_sent",
    "icmp_time_exceeded_sent",
    "icmp_suppressed",
    "icmp_ratelimited",
    # route commands
    "route_commands",
    "route_errors",
)

#: Per-peer counters (``peer_stats()``), kept per route from when it was set or its peer
#: changed: packets and bytes sent to the peer (taken by the kernel) and received from it (those
#: that passed every check); bytes are inner IP packets, as ``udp_tx_bytes``/``udp_rx_bytes``.
PEER_COUNTERS: tuple[str, ...] = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")

#: Counters whose values depend on how each engine batches and schedules, not on the traffic.
DIAGNOSTIC_COUNTERS = frozenset(
    {"tun_rx_batches", "udp_tx_batches", "udp_rx_batches", "udp_tx_stalls", "tun_tx_stalls"}
)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is made with (``make_engine(kind, cfg)``; checked there).

    ``tun_fd`` (``IFF_TUN | IFF_NO_PI``) and ``udp_fd`` (bound to ``<public ip>:<port>``) are
    non-blocking and stay the caller's: the engine never closes them. ``local_subnet`` is this
    host's lease (inner destinations accepted from peers), ``local_addr`` the TUN's address: the
    source of the ICMP errors the engine writes into the TUN. ``port`` is every host's UDP port,
    ``mtu`` the TUN's (larger inbound packets are delivered and counted as ``rx_oversize``).

    Offloads (C engine only): ``offload`` is one of ``OFFLOAD_MODES``; ``vnet_hdr``: the TUN fd was
    opened with ``IFF_VNET_HDR``; ``tun_offloads``: what ``tun.probe_offloads`` enabled on it.
    The Python engine ignores ``offload`` and cannot take a ``vnet_hdr`` TUN.
    """

    tun_fd: int
    udp_fd: int
    local_subnet: IPv4Network
    local_addr: IPv4Address
    port: int
    mtu: int
    offload: str = "off"
    vnet_hdr: bool = False
    tun_offloads: frozenset[str] = frozenset()
