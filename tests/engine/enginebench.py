"""Test bench for both data-plane engines, without root.

The "TUN" is one end of a SOCK_DGRAM socketpair (one datagram = one packet, like IFF_NO_PI); the
engine's UDP socket is bound to 127.0.0.1:P and each peer to 127.0.0.<2+i>:P (loopback accepts all
of 127/8), so the engine's "send to <peer>:<port>" reaches the peer sockets and a datagram from a
peer arrives with that peer's address as source. Peer i owns subnet 10.5.<10+i>.0/24; the local
subnet is 10.5.1.0/24 with local_addr 10.5.1.0.

The Python engine runs in an asyncio loop on a background thread (``Bench.call`` runs engine
methods there); the C engine runs its own thread. Tests talk to both the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import ICMPv6ND_RS, IPv6
from scapy.packet import Packet, Raw, fuzz

from flanneld_py import engine as engine_mod
from flanneld_py.engine import CEngine, Engine, EngineConfig, make_engine
from flanneld_py.packet import checksum
from flanneld_py.pyengine import PyEngine

KINDS = ["c", "python"]
REQUIRE_ALL = os.environ.get("FLANNELD_TEST_REQUIRE_ALL") == "1"

LOCAL_SUBNET = IPv4Network("10.5.1.0/24")
LOCAL_ADDR = IPv4Address("10.5.1.0")
T = TypeVar("T")


def require_kind(kind: str) -> None:
    """Skip (or, under FLANNELD_TEST_REQUIRE_ALL=1, fail) a C-engine test when it is not built."""
    if kind == "c" and not engine_mod.c_engine_available():
        why = (
            f"C engine not built ({engine_mod._ENGINE_IMPORT_ERROR}); "
            "build it: pip install -e . --no-build-isolation --no-deps"
        )
        if REQUIRE_ALL:
            pytest.fail(f"FLANNELD_TEST_REQUIRE_ALL=1 but {why}", pytrace=False)
        pytest.skip(why)


def peer_ip(i: int) -> IPv4Address:
    return IPv4Address(f"127.0.0.{2 + i}")


def peer_subnet(i: int) -> IPv4Network:
    return IPv4Network(f"10.5.{10 + i}.0/24")


def peer_host(i: int, host: int = 7) -> str:
    return f"10.5.{10 + i}.{host}"


def local_host(host: int = 7) -> str:
    return f"10.5.1.{host}"


def udp_packet(src: str, dst: str, payload: bytes = b"hello", ttl: int = 64, **ip: Any) -> bytes:
    return bytes(IP(src=src, dst=dst, ttl=ttl, **ip) / UDP(sport=4000, dport=5000) / Raw(payload))


def dec_ttl(pkt: bytes) -> bytes:
    """What the engine must forward: TTL-1 and the header checksum recomputed (by scapy)."""
    p = IP(pkt)
    p.ttl -= 1
    del p.chksum
    return bytes(p)


def ip_checksum_ok(pkt: bytes) -> bool:
    p = IP(pkt)
    q = p.copy()
    del q.chksum
    return bool(IP(bytes(q)).chksum == p.chksum)


def _grow_buffers(sock: socket.socket, size: int = 4 << 20) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, size)


def _nothing_queued(sock: socket.socket) -> bool:
    """True if no datagram is waiting on ``sock`` (consumes one if there is)."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        sock.recv(70000)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(timeout)
    return False


class LoopThread:
    """An asyncio event loop on its own thread (where the Python engine lives)."""

    def __init__(self, factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> None:
        self.loop = (factory or asyncio.new_event_loop)()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop")
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


class Bench:
    """One engine between a fake TUN and ``npeers`` loopback peers."""

    def __init__(
        self,
        kind: str,
        *,
        npeers: int = 3,
        mtu: int = 1472,
        routes: bool = True,
        start: bool = True,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
        icmp_ratelimit: tuple[int, int] | None = None,
    ) -> None:
        """``icmp_ratelimit``: (burst, per_sec) of the engine's ICMP token bucket instead of the
        kernel's defaults (``per_sec`` 0: no refill, so which ICMP errors go out is exact)."""
        self.kind = kind
        self._loop_factory = loop_factory
        self._closers: list[Callable[[], None]] = []
        try:
            self._setup(npeers, mtu)
            if icmp_ratelimit is not None:
                self.call(raw_engine(self.engine).set_icmp_ratelimit, *icmp_ratelimit)
            if start:
                self.start()
            if routes:
                for i in range(npeers):
                    self.set_route(peer_subnet(i), peer_ip(i))
        except BaseException:
            self.close()
            raise

    def _setup(self, npeers: int, mtu: int) -> None:
        self.tun_engine, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._closers += [self.tun.close, self.tun_engine.close]
        self.tun_engine.setblocking(False)
        self.tun.settimeout(10)
        _grow_buffers(self.tun_engine)
        _grow_buffers(self.tun)
        for _attempt in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            peers: list[socket.socket] = []
            try:
                for i in range(npeers):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    peers.append(s)
                    s.bind((str(peer_ip(i)), port))
            except OSError as exc:
                for s in [udp, *peers]:
                    s.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            break
        else:
            raise RuntimeError("no free UDP port for the bench")
        self.udp, self.port, self.peers = udp, port, peers
        self._closers += [udp.close] + [s.close for s in peers]
        udp.setblocking(False)
        _grow_buffers(udp)
        for s in peers:
            s.settimeout(10)
            _grow_buffers(s)
        self.loop_thread: LoopThread | None = None
        if self.kind == "python":
            self.loop_thread = LoopThread(self._loop_factory)
            self._closers.append(self.loop_thread.close)
        self.engine: Engine = make_engine(
            self.kind,
            EngineConfig(
                tun_fd=self.tun_engine.fileno(),
                udp_fd=self.udp.fileno(),
                local_subnet=LOCAL_SUBNET,
                local_addr=LOCAL_ADDR,
                port=self.port,
                mtu=mtu,
            ),
        )
        self._closers.append(lambda: self.call(self.engine.stop))

    # --- engine calls (in the loop thread for the Python engine) ------------------------------
    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if self.loop_thread is not None:
            return self.loop_thread.call(fn, *args)
        return fn(*args)

    def start(self) -> None:
        self.call(self.engine.start)

    def stop(self) -> None:
        self.call(self.engine.stop)

    def set_route(self, subnet: IPv4Network | str, peer: IPv4Address | str) -> None:
        self.call(self.engine.set_route, IPv4Network(subnet), IPv4Address(peer))

    def del_route(self, subnet: IPv4Network | str) -> None:
        self.call(self.engine.del_route, IPv4Network(subnet))

    def stats(self) -> dict[str, int]:
        return self.call(self.engine.stats)

    def peer_stats(self) -> dict[IPv4Network, dict[str, int]]:
        return self.call(self.engine.peer_stats)

    def settled_peer_stats(self) -> dict[IPv4Network, dict[str, int]]:
        """Per-peer counters once every batch begun before this call is complete (see below)."""
        self.settled_stats()
        return self.peer_stats()

    def settled_stats(self) -> dict[str, int]:
        """Counters once every batch the engine began before this call is complete.

        The C loop updates counters just after its syscalls, so a test that has seen a packet
        arrive may read them a moment early. It applies commands only between batches and
        publishes ``route_commands`` last (release/acquire): a no-op command, once counted, fences
        everything before it. (For the Python engine every call is already ordered.)
        """
        n = self.stats()["route_commands"]
        self.del_route("255.255.255.255/32")  # never set: a no-op
        return self.wait_stats(route_commands=n + 1)

    def wait_stats(self, timeout: float = 15.0, **at_least: int) -> dict[str, int]:
        """Wait until every named counter reaches at least the given value."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if all(stats[k] >= v for k, v in at_least.items()):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {at_least}; counters: {nonzero(stats)}"
                )
            time.sleep(0.002)

    # --- traffic --------------------------------------------------------------------------------
    def to_tun(self, pkt: bytes) -> None:
        """Write a packet "into the TUN", as the kernel would (the engine reads it)."""
        self.tun.send(pkt)

    def from_tun(self) -> bytes:
        return self.tun.recv(70000)

    def from_peer(self, i: int) -> bytes:
        return self.peers[i].recv(70000)

    def peer_send(self, i: int, pkt: bytes) -> None:
        self.peers[i].sendto(pkt, ("127.0.0.1", self.port))

    def tun_empty(self) -> bool:
        return _nothing_queued(self.tun)

    def peer_empty(self, i: int) -> bool:
        return _nothing_queued(self.peers[i])

    def sync_tun_side(self) -> None:
        """Push a marker TUN->peer 0 and wait for it: everything written into the TUN before has
        been handled (and any ICMP for it written back) once it arrives."""
        marker = udp_packet(local_host(9), peer_host(0), os.urandom(16))
        self.to_tun(marker)
        got = self.from_peer(0)
        assert got == dec_ttl(marker), "unexpected datagram at peer 0 before the marker"

    def sync_udp_side(self, i: int = 0) -> None:
        """Push a marker peer i->TUN and wait for it: all datagrams sent before are handled."""
        marker = udp_packet(peer_host(i, 9), local_host(9), os.urandom(16))
        self.peer_send(i, marker)
        got = self.from_tun()
        assert got == dec_ttl(marker), f"unexpected packet on the TUN before the marker: {got!r}"

    def close(self) -> None:
        for fn in reversed(self._closers):
            with contextlib.suppress(Exception):
                fn()
        self._closers.clear()


def raw_engine(engine: Engine) -> Any:
    """The engine object itself: ``_engine.Engine`` inside a ``CEngine``, else the ``PyEngine``
    (for what the facade does not offer, e.g. ``set_icmp_ratelimit``)."""
    if isinstance(engine, CEngine):
        return engine._engine
    assert isinstance(engine, PyEngine)
    return engine


def nonzero(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if v}


def engine_threads() -> list[str]:
    """Names of this process's threads called flanneld-engine (the C loop)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as f:
            name = f.read().strip()
            if name == "flanneld-engine":
                names.append(tid)
    return names


# --- generated traffic (comparison and fuzz tests) ----------------------------------------------

_ADDRS = [
    *(peer_host(i, h) for i in range(4) for h in (0, 1, 77, 255)),
    *(local_host(h) for h in (0, 1, 9, 255)),
    "10.5.2.3",
    "10.7.0.1",
    "192.168.1.1",
    "0.0.0.0",
    "127.0.0.1",
    "224.0.0.5",
    "255.255.255.255",
]


def _fix_checksum(b: bytearray) -> None:
    ihl = (b[0] & 15) * 4
    if len(b) >= 20 and 20 <= ihl <= len(b):
        b[10:12] = b"\0\0"
        b[10:12] = checksum(bytes(b[:ihl])).to_bytes(2, "big")


def templates(rng: random.Random, n: int = 300) -> list[bytes]:
    """Well-formed IPv4 packets (scapy-built, some scapy-fuzzed) between interesting addresses."""
    out = []
    for _ in range(n):
        src, dst = rng.choice(_ADDRS), rng.choice(_ADDRS)
        ttl = rng.choice([0, 1, 2, 64, 255])
        r = rng.random()
        pkt: Packet
        payload = Raw(rng.randbytes(rng.choice([0, 3, 8, 40, 500, 1400])))
        if r < 0.3:
            pkt = IP(src=src, dst=dst, ttl=ttl) / UDP(sport=rng.randrange(65536)) / payload
        elif r < 0.45:
            pkt = (
                IP(src=src, dst=dst, ttl=ttl)
                / ICMP(type=rng.choice([0, 3, 5, 8, 11, 13, 40]))
                / payload
            )
        elif r < 0.55:
            pkt = IP(src=src, dst=dst, ttl=ttl, options=[IPOption_RR()]) / TCP() / payload
        elif r < 0.65:
            pkt = IP(src=src, dst=dst, ttl=ttl, flags="MF", frag=rng.choice([0, 0, 5])) / payload
        elif r < 0.8:
            pkt = fuzz(IP(src=src, dst=dst) / UDP()) / payload
        elif r < 0.9:
            pkt = fuzz(IP(src=src, dst=dst) / ICMP())
        else:
            pkt = IPv6(src="fe80::1", dst="ff02::2") / ICMPv6ND_RS()
        out.append(bytes(pkt))
    return out


def mutate(rng: random.Random, tpl: list[bytes], tun: bool = False) -> bytes:
    """A datagram derived from a template: kept, bit-flipped, cut, extended, or plain garbage.

    ``tun``: for the TUN side, where an empty read means end of file (never empty)."""
    while not (pkt := _mutate(rng, tpl)) and tun:
        pass
    return pkt


def _mutate(rng: random.Random, tpl: list[bytes]) -> bytes:
    r = rng.random()
    b = bytearray(rng.choice(tpl))
    if r < 0.25:
        return bytes(b)
    if r < 0.5 and b:
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(min(len(b), 28))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.6:
            _fix_checksum(b)
        return bytes(b)
    if r < 0.6:
        return bytes(b[: rng.randrange(len(b) + 1)])
    if r < 0.65:
        return bytes(b) + rng.randbytes(rng.randint(1, 40))
    if r < 0.8:
        return rng.randbytes(rng.choice([0, 1, 19, 20, 21, 28, 60, 200]))
    g = bytearray(rng.randbytes(rng.randint(20, 120)))
    g[0] = 0x45 if rng.random() < 0.8 else 0x40 | rng.randrange(16)
    g[2:4] = len(g).to_bytes(2, "big")
    g[6] &= rng.choice([0x00, 0x20, 0xFF])
    g[12:16] = socket.inet_aton(rng.choice(_ADDRS))
    g[16:20] = socket.inet_aton(rng.choice(_ADDRS))
    _fix_checksum(g)
    return bytes(g)
