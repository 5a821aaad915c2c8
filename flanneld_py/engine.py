"""The data-plane engine behind one interface: the C engine when built, else the Python one.

``make_engine(kind, cfg)`` is the only entry point (``cfg``: an :class:`EngineConfig`); this module
is the only importer of ``_engine``. The configuration, the counter names, the engine kinds and
the offload modes live in the neutral ``engine_types`` (re-exported here).

An engine moves packets between a TUN fd (``IFF_TUN | IFF_NO_PI``: one bare IP packet per read/
write) and a UDP socket fd bound to ``<public ip>:<port>``. Both fds are given non-blocking and stay
the caller's: the engine never closes them. See ``pyengine.py`` for the exact per-packet rules and
``_engine_c/`` for the C loop; both keep the same counters (``COUNTERS``).

Segmentation offloads (C engine only, ``offload="auto"``): the TUN opened with ``IFF_VNET_HDR``
(see :func:`wants_vnet_hdr`; then every read/write carries a virtio_net_hdr) hands over TCP
super-packets that the engine cuts into MSS segments; UDP GSO sends runs of them in one syscall;
UDP GRO receives several datagrams per read, and in-order segments of one TCP flow are written into
the TUN as one GSO packet. The wire format stays one bare inner IPv4 packet per UDP datagram, so
peers without offloads (``--offload off``, the Python engine, real flanneld) interoperate. Whatever
the kernel does not accept is off (probed at start; a refused GSO send turns GSO off at runtime).
``offload_status()`` tells what is active.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

from flanneld_py.engine_types import (
    COUNTERS,
    DIAGNOSTIC_COUNTERS,
    KINDS,
    OFFLOAD_MODES,
    PEER_COUNTERS,
    EngineConfig,
)
from flanneld_py.pyengine import PyEngine

try:
    import flanneld_py._engine as _engine
except ImportError as exc:  # not built (optional extension)
    _ENGINE_IMPORT_ERROR: str | None = str(exc) or type(exc).__name__
else:
    _ENGINE_IMPORT_ERROR = None

__all__ = [
    "COUNTERS",
    "DIAGNOSTIC_COUNTERS",
    "KINDS",
    "OFFLOAD_MODES",
    "PEER_COUNTERS",
    "CEngine",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineGroup",
    "EngineUnavailable",
    "c_engine_available",
    "make_engine",
    "offload_status",
    "resolve_kind",
    "sum_counters",
    "wants_vnet_hdr",
]

#: C engine offload state flags (``_engine.Engine.offloads()``), in the order they are listed
_STATE_FLAGS = ("udp_gso", "udp_gro", "tun_gso")


class EngineError(Exception):
    """An engine cannot be made as asked (the message is one line, for the user)."""


class EngineUnavailable(EngineError):
    """The C engine was asked for but is not built."""


class Engine(Protocol):
    """What the daemon drives. All addresses are ``ipaddress`` objects."""

    #: "c" or "python"
    kind: str

    def start(self) -> None:
        """Start moving packets (the Python engine: call from inside the running event loop)."""

    def set_route(
        self, subnet: IPv4Network, peer: IPv4Address, *, partial_csum: bool = False
    ) -> None:
        """Add or replace the route ``subnet -> peer PublicIP``; effective for every packet that
        the engine reads after this returns. ``partial_csum``: the peer completes TCP/UDP
        checksums left partial (its lease advertises ``PARTIAL_CSUM``), so the C engine sends
        TSO segments and NEEDS_CSUM packets without computing them; otherwise every packet goes
        out with a complete checksum."""

    def del_route(self, subnet: IPv4Network) -> None:
        """Remove the route for exactly ``subnet`` (no-op when absent)."""

    def routes(self) -> dict[IPv4Network, IPv4Address]:
        """The routes as set (a snapshot)."""

    def stats(self) -> dict[str, int]:
        """Counters (``COUNTERS``): a cheap snapshot, callable at any time."""

    def peer_stats(self) -> dict[IPv4Network, dict[str, int]]:
        """Per route: its ``PEER_COUNTERS``, counted since it was set or its peer changed."""

    def alive(self) -> bool:
        """Started, not stopped, and not failed."""

    def error(self) -> str | None:
        """Why the engine stopped on its own (e.g. the TUN fd failed), else None."""

    def stop(self) -> None:
        """Stop (idempotent): the C loop thread is joined before this returns. fds stay open."""


def c_engine_available() -> bool:
    return _ENGINE_IMPORT_ERROR is None


def resolve_kind(kind: str) -> str:
    """The engine ``make_engine(kind)`` builds: "c" or "python" (``kind`` is assumed valid)."""
    if kind == "python" or (kind == "auto" and _ENGINE_IMPORT_ERROR is not None):
        return "python"
    return "c"


def wants_vnet_hdr(kind: str, offload: str) -> bool:
    """Whether the TUN for this engine should be opened with ``IFF_VNET_HDR`` (and TSO probed):
    only the C engine with offloads on. The Python engine always gets a plain TUN."""
    return offload == "auto" and kind in KINDS and resolve_kind(kind) == "c"


class CEngine:
    """The C engine (``_engine.Engine``): a native thread that owns its route table.

    Route changes reach the thread as fixed-size commands on a socketpair; ``routes()`` answers from
    a mirror kept here.
    """

    kind = "c"

    def __init__(self, cfg: EngineConfig) -> None:
        if _ENGINE_IMPORT_ERROR is not None:
            raise EngineUnavailable(_unavailable_message())
        on = cfg.offload == "auto"
        self._engine = _engine.Engine(
            tun_fd=cfg.tun_fd,
            udp_fd=cfg.udp_fd,
            local_net=int(cfg.local_subnet.network_address),
            local_prefixlen=cfg.local_subnet.prefixlen,
            local_addr=int(cfg.local_addr),
            port=cfg.port,
            mtu=cfg.mtu,
            vnet_hdr=cfg.vnet_hdr,
            udp_gso=on,
            udp_gro=on,
            tun_gso=on and cfg.vnet_hdr,
            tun_uso=on and cfg.vnet_hdr and {"uso4", "uso6"} <= cfg.tun_offloads,
        )
        self._vnet_hdr = cfg.vnet_hdr
        self._tun_offloads = frozenset(cfg.tun_offloads) if cfg.vnet_hdr else frozenset()
        self._routes: dict[IPv4Network, IPv4Address] = {}

    def start(self) -> None:
        self._engine.start()

    def set_route(
        self, subnet: IPv4Network, peer: IPv4Address, *, partial_csum: bool = False
    ) -> None:
        self._engine.set_route(
            int(subnet.network_address), subnet.prefixlen, int(peer), partial_csum
        )
        self._routes[subnet] = peer

    def del_route(self, subnet: IPv4Network) -> None:
        self._engine.del_route(int(subnet.network_address), subnet.prefixlen)
        self._routes.pop(subnet, None)

    def routes(self) -> dict[IPv4Network, IPv4Address]:
        return dict(self._routes)

    def stats(self) -> dict[str, int]:
        return self._engine.stats()

    def peer_stats(self) -> dict[IPv4Network, dict[str, int]]:
        return {
            IPv4Network((net, plen)): dict(zip(PEER_COUNTERS, counts, strict=True))
            for net, plen, _peer, *counts in self._engine.peer_stats()
        }

    def offloads(self) -> dict[str, int]:
        """The C engine's offload state (0/1 as in effect now) and offload counters."""
        return self._engine.offloads()

    def offload_status(self) -> dict[str, Any]:
        """What :func:`offload_status` reports for this engine."""
        raw = self._engine.offloads()
        active: list[str] = []
        if self._vnet_hdr:
            active += [f"tun_{name}" for name in ("csum", "tso4", "tso6", "tso_ecn", "uso4", "uso6")
                       if name in self._tun_offloads]  # fmt: skip
        active += [name for name in _STATE_FLAGS if raw[name]]
        return {
            "active": active,
            "vnet_hdr": bool(raw["vnet_hdr"]),
            "tun_offloads": sorted(self._tun_offloads),
            "counters": {k: v for k, v in raw.items() if k not in (*_STATE_FLAGS, "vnet_hdr")},
        }

    def alive(self) -> bool:
        return self._engine.alive()

    def error(self) -> str | None:
        return self._engine.error()

    def stop(self) -> None:
        self._engine.stop()


class EngineGroup:
    """Several C engines that act as one (``--engine-threads``): engine i moves the packets of TUN
    queue i (``IFF_MULTI_QUEUE``: the kernel spreads the flows over the queues) and of UDP socket
    i (one ``SO_REUSEPORT`` group, steered by the inner flow: ``reuseport.py``). Every route
    command goes to every engine (each thread keeps its own table); counters are summed;
    ``thread_stats()`` gives them per engine."""

    kind = "c"

    def __init__(self, engines: Sequence[CEngine]) -> None:
        if not engines:
            raise EngineError("an engine group needs at least one engine")
        self.engines = list(engines)

    def start(self) -> None:
        started: list[CEngine] = []
        try:
            for e in self.engines:
                e.start()
                started.append(e)
        except BaseException:
            for e in started:
                e.stop()
            raise

    def set_route(
        self, subnet: IPv4Network, peer: IPv4Address, *, partial_csum: bool = False
    ) -> None:
        for e in self.engines:
            e.set_route(subnet, peer, partial_csum=partial_csum)

    def del_route(self, subnet: IPv4Network) -> None:
        for e in self.engines:
            e.del_route(subnet)

    def routes(self) -> dict[IPv4Network, IPv4Address]:
        return self.engines[0].routes()

    def stats(self) -> dict[str, int]:
        return sum_counters(e.stats() for e in self.engines)

    def thread_stats(self) -> list[dict[str, int]]:
        """Each engine's counters, in queue order."""
        return [e.stats() for e in self.engines]

    def peer_stats(self) -> dict[IPv4Network, dict[str, int]]:
        """Summed over the engines (each thread counts the flows steered to it)."""
        out: dict[IPv4Network, dict[str, int]] = {}
        for e in self.engines:
            for subnet, counts in e.peer_stats().items():
                mine = out.get(subnet)
                out[subnet] = counts if mine is None else sum_counters((mine, counts))
        return out

    def offloads(self) -> dict[str, int]:
        """State flags: on only where on in every engine; counters summed (errnos: the first)."""
        each = [e.offloads() for e in self.engines]
        out = sum_counters(each)
        for k in ("vnet_hdr", *_STATE_FLAGS):
            out[k] = min(o[k] for o in each)
        for k in ("gso_errno", "tun_gso_errno"):
            out[k] = next((o[k] for o in each if o[k]), 0)
        return out

    def offload_status(self) -> dict[str, Any]:
        st = self.engines[0].offload_status()
        raw = self.offloads()
        flags = [n for n in st["active"] if n.startswith("tun_") and n != "tun_gso"]
        st["active"] = flags + [name for name in _STATE_FLAGS if raw[name]]
        st["counters"] = {k: v for k, v in raw.items() if k not in (*_STATE_FLAGS, "vnet_hdr")}
        return st

    def alive(self) -> bool:
        return all(e.alive() for e in self.engines)

    def error(self) -> str | None:
        return next((err for e in self.engines if (err := e.error()) is not None), None)

    def stop(self) -> None:
        for e in self.engines:
            e.stop()


def sum_counters(each: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counter dicts added up key by key."""
    out: dict[str, int] = {}
    for c in each:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _unavailable_message() -> str:
    return (
        f"the C engine (flanneld_py._engine) is not built ({_ENGINE_IMPORT_ERROR}): "
        "rebuild with `pip install -e . --no-build-isolation --no-deps`, or use --engine python"
    )


def make_engine(kind: str, cfg: EngineConfig) -> Engine:
    """An engine of ``kind``: "auto" (C if built, else Python), "c" or "python", made with ``cfg``.

    ``cfg.local_subnet`` is this host's lease (inner destinations accepted from peers),
    ``cfg.local_addr`` the TUN's address: the source of the ICMP errors the engine writes into the
    TUN. The kernel drops packets arriving with one of its own addresses as source unless the TUN
    has ``net.ipv4.conf.<tun>.accept_local=1`` (flannel's own ICMP errors are lost that way).
    ``cfg.port`` is every host's UDP port, ``cfg.mtu`` the TUN's (larger inbound packets are
    delivered and counted as ``rx_oversize``).

    ``cfg.offload``: "auto" lets the C engine use UDP GSO/GRO and, when ``cfg.vnet_hdr`` (the TUN
    fd was opened with ``IFF_VNET_HDR``; ``cfg.tun_offloads`` = what ``tun.probe_offloads``
    enabled on it), TSO reads and coalesced GSO writes; "off" = the plain batched loop. The Python
    engine never uses offloads and cannot take a ``vnet_hdr`` TUN (``wants_vnet_hdr`` says how to
    open it).

    Raises ``EngineUnavailable`` for "c" when the extension is not built and ``EngineError`` for
    a bad kind, offload mode, port or MTU (each with a one-line message).
    """
    if kind not in KINDS:
        raise EngineError(f"unknown engine {kind!r}: choose one of {', '.join(KINDS)}")
    if cfg.offload not in OFFLOAD_MODES:
        raise EngineError(
            f"unknown offload mode {cfg.offload!r}: choose one of {', '.join(OFFLOAD_MODES)}"
        )
    if not 1 <= cfg.port <= 65535:
        raise EngineError(f"UDP port {cfg.port} is not in 1..65535")
    if not 68 <= cfg.mtu <= 65535:
        raise EngineError(f"MTU {cfg.mtu} is not in 68..65535")
    if kind == "c" and _ENGINE_IMPORT_ERROR is not None:
        raise EngineUnavailable(_unavailable_message())
    if kind == "python" or _ENGINE_IMPORT_ERROR is not None:
        if cfg.vnet_hdr:
            raise EngineError(
                "the Python engine cannot use a TUN opened with a virtio header (vnet_hdr): "
                "open it without, or use --engine c"
            )
        return PyEngine(cfg)
    return CEngine(cfg)


def offload_status(engine: Engine) -> dict[str, Any]:
    """Which segmentation offloads ``engine`` uses now, for logs and ``/status``:
    ``{"active": [...], "vnet_hdr": bool, "tun_offloads": [...], "counters": {...}}``.
    ``active`` names ``tun_csum``/``tun_tso4``/``tun_tso6``/``tun_tso_ecn`` (what the TUN hands
    over), ``udp_gso``, ``udp_gro``, ``tun_gso`` (coalesced writes); the Python engine: none."""
    if isinstance(engine, CEngine | EngineGroup):
        return engine.offload_status()
    return {"active": [], "vnet_hdr": False, "tun_offloads": [], "counters": {}}
