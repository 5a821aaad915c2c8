"""The data-plane engine behind one interface: the C engine when built, else the Python one.

``make_engine()`` is the only entry point; this module is the only importer of ``_engine``.

An engine moves packets between a TUN fd (``IFF_TUN | IFF_NO_PI``: one bare IP packet per read/
write) and a UDP socket fd bound to ``<public ip>:<port>``. Both fds are given non-blocking and stay
the caller's: the engine never closes them. See ``pyengine.py`` for the exact per-packet rules and
``_engine.c`` for the C loop; both keep the same counters (``COUNTERS``).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from flanneld_py.pyengine import COUNTERS, DIAGNOSTIC_COUNTERS, PyEngine

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
    "CEngine",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "c_engine_available",
    "make_engine",
]

KINDS = ("auto", "c", "python")


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

    def set_route(self, subnet: IPv4Network, peer: IPv4Address) -> None:
        """Add or replace the route ``subnet -> peer PublicIP``; effective for every packet that
        the engine reads after this returns."""

    def del_route(self, subnet: IPv4Network) -> None:
        """Remove the route for exactly ``subnet`` (no-op when absent)."""

    def routes(self) -> dict[IPv4Network, IPv4Address]:
        """The routes as set (a snapshot)."""

    def stats(self) -> dict[str, int]:
        """Counters (``COUNTERS``): a cheap snapshot, callable at any time."""

    def alive(self) -> bool:
        """Started, not stopped, and not failed."""

    def error(self) -> str | None:
        """Why the engine stopped on its own (e.g. the TUN fd failed), else None."""

    def stop(self) -> None:
        """Stop (idempotent): the C loop thread is joined before this returns. fds stay open."""


def c_engine_available() -> bool:
    return _ENGINE_IMPORT_ERROR is None


class CEngine:
    """The C engine (``_engine.Engine``): a native thread that owns its route table.

    Route changes reach the thread as fixed-size commands on a socketpair; ``routes()`` answers from
    a mirror kept here.
    """

    kind = "c"

    def __init__(
        self,
        *,
        tun_fd: int,
        udp_fd: int,
        local_subnet: IPv4Network,
        local_addr: IPv4Address,
        port: int,
        mtu: int,
    ) -> None:
        if _ENGINE_IMPORT_ERROR is not None:
            raise EngineUnavailable(_unavailable_message())
        self._engine = _engine.Engine(
            tun_fd=tun_fd,
            udp_fd=udp_fd,
            local_net=int(local_subnet.network_address),
            local_prefixlen=local_subnet.prefixlen,
            local_addr=int(local_addr),
            port=port,
            mtu=mtu,
        )
        self._routes: dict[IPv4Network, IPv4Address] = {}

    def start(self) -> None:
        self._engine.start()

    def set_route(self, subnet: IPv4Network, peer: IPv4Address) -> None:
        self._engine.set_route(int(subnet.network_address), subnet.prefixlen, int(peer))
        self._routes[subnet] = peer

    def del_route(self, subnet: IPv4Network) -> None:
        self._engine.del_route(int(subnet.network_address), subnet.prefixlen)
        self._routes.pop(subnet, None)

    def routes(self) -> dict[IPv4Network, IPv4Address]:
        return dict(self._routes)

    def stats(self) -> dict[str, int]:
        return self._engine.stats()

    def alive(self) -> bool:
        return self._engine.alive()

    def error(self) -> str | None:
        return self._engine.error()

    def stop(self) -> None:
        self._engine.stop()


def _unavailable_message() -> str:
    return (
        f"the C engine (flanneld_py._engine) is not built ({_ENGINE_IMPORT_ERROR}): "
        "rebuild with `pip install -e . --no-build-isolation --no-deps`, or use --engine python"
    )


def make_engine(
    kind: str = "auto",
    *,
    tun_fd: int,
    udp_fd: int,
    local_subnet: IPv4Network,
    local_addr: IPv4Address,
    port: int,
    mtu: int,
) -> Engine:
    """An engine of ``kind``: "auto" (C if built, else Python), "c" or "python".

    ``local_subnet`` is this host's lease (inner destinations accepted from peers), ``local_addr``
    the TUN's address: the source of the ICMP errors the engine writes into the TUN. The kernel
    drops packets arriving with one of its own addresses as source unless the TUN has
    ``net.ipv4.conf.<tun>.accept_local=1`` (flannel's own ICMP errors are lost that way).
    ``port`` is every host's UDP port, ``mtu`` the TUN's (larger inbound packets are delivered and
    counted as ``rx_oversize``).

    Raises ``EngineUnavailable`` for "c" when the extension is not built and ``EngineError`` for
    a bad kind, port or MTU (each with a one-line message).
    """
    if kind not in KINDS:
        raise EngineError(f"unknown engine {kind!r}: choose one of {', '.join(KINDS)}")
    if not 1 <= port <= 65535:
        raise EngineError(f"UDP port {port} is not in 1..65535")
    if not 68 <= mtu <= 65535:
        raise EngineError(f"MTU {mtu} is not in 68..65535")
    if kind == "c" and _ENGINE_IMPORT_ERROR is not None:
        raise EngineUnavailable(_unavailable_message())
    if kind == "python" or _ENGINE_IMPORT_ERROR is not None:
        return PyEngine(
            tun_fd=tun_fd,
            udp_fd=udp_fd,
            local_subnet=local_subnet,
            local_addr=local_addr,
            port=port,
            mtu=mtu,
        )
    return CEngine(
        tun_fd=tun_fd,
        udp_fd=udp_fd,
        local_subnet=local_subnet,
        local_addr=local_addr,
        port=port,
        mtu=mtu,
    )
