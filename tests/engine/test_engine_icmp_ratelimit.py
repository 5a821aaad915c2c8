"""ICMP errors are rate-limited like the kernel's: a token bucket of ``net.ipv4.icmp_msgs_burst``
tokens refilled at ``net.ipv4.icmp_msgs_per_sec``, shared by every ICMP error; without a token the
error is not sent and counted as ``icmp_ratelimited``. Both engines alike."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from enginebench import (
    Bench,
    local_host,
    nonzero,
    peer_host,
    raw_engine,
    require_kind,
    udp_packet,
)

from flanneld_py import pyengine

BURST = pyengine.ICMP_MSGS_BURST
RATE = pyengine.ICMP_MSGS_PER_SEC
FLOOD = 500
CHUNK = 100  # datagrams from a peer between waits: never overflow the engine's socket buffer


def test_kernel_defaults_in_both_engines() -> None:
    require_kind("c")
    from flanneld_py import _engine

    assert (BURST, RATE) == (50, 1000)  # net.ipv4.icmp_msgs_burst, net.ipv4.icmp_msgs_per_sec
    assert (_engine.ICMP_MSGS_BURST, _engine.ICMP_MSGS_PER_SEC) == (BURST, RATE)
    assert "icmp_ratelimited" in _engine.COUNTERS and "icmp_ratelimited" in pyengine.COUNTERS


class Collector(threading.Thread):
    """Reads every datagram arriving on a socket (its own duplicate of the fd) until finished."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = socket.socket(fileno=os.dup(sock.fileno()))
        self.sock.settimeout(0.05)
        self.got: list[bytes] = []
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.got.append(self.sock.recv(70000))
            except TimeoutError:
                continue
            except OSError:
                break

    def wait_for(self, count: int, timeout: float = 15.0) -> list[bytes]:
        """Wait until ``count`` datagrams arrived (and no more, a moment later)."""
        deadline = time.monotonic() + timeout
        while len(self.got) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # a straggler would show up now
        assert len(self.got) == count
        return list(self.got)

    def finish(self) -> None:
        self._done.set()
        self.join(5)
        self.sock.close()


@dataclass(frozen=True)
class Path:
    """One way to make the engine send ICMP errors."""

    offender: Callable[[int], bytes]  # packet number i (its IP id) -> the packet
    from_peer: bool  # sent by peer 0 (ICMP back to it), else written into the TUN
    drop: str  # the drop counter of the offending packets
    sent: str  # the counter of the ICMP errors sent
    icmp_type: int

    def send(self, b: Bench, pkt: bytes) -> None:
        if self.from_peer:
            b.peer_send(0, pkt)
        else:
            b.to_tun(pkt)

    def inbox(self, b: Bench) -> socket.socket:
        return b.peers[0] if self.from_peer else b.tun


PATHS = {
    "no-route": Path(
        lambda i: udp_packet(local_host(), "10.99.0.1", b"flood", id=i),
        False,
        "drop_no_route",
        "icmp_unreachable_sent",
        3,
    ),
    "tun-ttl": Path(
        lambda i: udp_packet(local_host(), peer_host(1), b"flood", ttl=1, id=i),
        False,
        "drop_tun_ttl",
        "icmp_time_exceeded_sent",
        11,
    ),
    "udp-ttl": Path(
        lambda i: udp_packet(peer_host(0), local_host(), b"flood", ttl=1, id=i),
        True,
        "drop_udp_ttl",
        "icmp_time_exceeded_sent",
        11,
    ),
}


def _quoted_ids(icmps: list[bytes], icmp_type: int) -> list[int]:
    """The IP ids of the offenders the ICMP errors quote (their header starts at byte 28)."""
    assert all(len(p) >= 56 and p[9] == 1 and p[20] == icmp_type for p in icmps)
    return [int.from_bytes(p[32:34], "big") for p in icmps]


@pytest.mark.parametrize("name", list(PATHS))
def test_flood_is_rate_limited_then_recovers(kind: str, name: str) -> None:
    path = PATHS[name]
    flood = [path.offender(i) for i in range(FLOOD + BURST)]  # built first: scapy is slow
    b = Bench(kind)
    inbox = Collector(path.inbox(b))
    try:
        t0 = time.monotonic()
        for k in range(0, FLOOD, CHUNK):
            for pkt in flood[k : k + CHUNK]:
                path.send(b, pkt)
            if path.from_peer:
                b.wait_stats(**{path.drop: k + CHUNK})
        b.wait_stats(**{path.drop: FLOOD})
        stats = b.settled_stats()  # every token taken: at most 1000/s of them since t0
        elapsed = time.monotonic() - t0
        sent, limited = stats[path.sent], stats["icmp_ratelimited"]
        # the packets are dropped and counted as ever; each ICMP error either sent or rate-limited
        assert stats[path.drop] == FLOOD and stats["icmp_suppressed"] == 0, nonzero(stats)
        assert stats["tun_tx_errors"] == stats["udp_tx_errors"] == 0
        assert sent + limited == FLOOD
        assert stats["udp_tx_packets" if path.from_peer else "tun_tx_packets"] == sent
        assert stats["tun_tx_packets" if path.from_peer else "udp_tx_packets"] == 0
        # a full bucket at first, then the refill, and nothing more
        assert BURST <= sent <= BURST + RATE * elapsed + 1, (sent, elapsed)
        assert limited > 0, f"{FLOOD} ICMP errors in {elapsed:.3f} s and none rate-limited"
        ids = _quoted_ids(inbox.wait_for(sent), path.icmp_type)
        assert ids == sorted(ids) and ids[:BURST] == list(range(BURST))  # the first BURST
        # idle for 0.1 s (>= BURST / RATE): the bucket is full again, BURST errors go out at once
        time.sleep(0.1)
        for pkt in flood[FLOOD:]:
            path.send(b, pkt)
        b.wait_stats(**{path.drop: FLOOD + BURST})
        stats = b.settled_stats()
        assert stats[path.sent] == sent + BURST, nonzero(stats)
        assert stats["icmp_ratelimited"] == limited
        ids = _quoted_ids(inbox.wait_for(sent + BURST), path.icmp_type)
        assert ids[-BURST:] == list(range(FLOOD, FLOOD + BURST))
    finally:
        inbox.finish()
        b.close()


def test_one_bucket_for_every_icmp_error(kind: str) -> None:
    """Without refill (exact): 3 tokens, shared by both directions and both ICMP types; an ICMP
    error that may not be sent at all (suppressed) takes no token."""
    b = Bench(kind, icmp_ratelimit=(3, 0))
    try:
        unroutable = udp_packet(local_host(), "10.99.0.1", b"no route")
        tun_ttl = udp_packet(local_host(), peer_host(1), b"tun ttl", ttl=1)
        udp_ttl = udp_packet(peer_host(0), local_host(), b"udp ttl", ttl=1)
        b.to_tun(udp_packet(local_host(), "224.0.0.251"))  # no route, but never answered
        b.to_tun(unroutable)
        assert b.from_tun()[28:48] == unroutable[:20]
        b.to_tun(unroutable)
        assert b.from_tun()[28:48] == unroutable[:20]
        b.peer_send(0, udp_ttl)
        assert b.from_peer(0)[28:48] == udp_ttl[:20]  # the last token
        b.peer_send(0, udp_ttl)
        b.sync_udp_side()  # fails if anything but the marker reaches the TUN
        assert b.peer_empty(0)
        for pkt in (tun_ttl, unroutable):
            b.to_tun(pkt)
        b.sync_tun_side()  # fails if anything reaches peer 0 first
        assert b.tun_empty()
        stats = b.settled_stats()
        counts = {k: stats[k] for k in stats if k.startswith("icmp_")}
        assert counts == {
            "icmp_unreachable_sent": 2,
            "icmp_time_exceeded_sent": 1,
            "icmp_suppressed": 1,
            "icmp_ratelimited": 3,
        }
        assert stats["drop_no_route"] == 4
        assert stats["drop_udp_ttl"] == 2 and stats["drop_tun_ttl"] == 1
    finally:
        b.close()


def test_empty_bucket_sends_no_icmp(kind: str) -> None:
    b = Bench(kind, icmp_ratelimit=(0, RATE))
    try:
        b.to_tun(udp_packet(local_host(), "10.99.0.1"))
        b.sync_tun_side()
        assert b.tun_empty()
        stats = b.settled_stats()
        assert stats["drop_no_route"] == 1 and stats["icmp_ratelimited"] == 1
        assert stats["icmp_unreachable_sent"] == 0
    finally:
        b.close()


def test_set_icmp_ratelimit_checks(kind: str) -> None:
    b = Bench(kind, start=False)
    try:
        raw = raw_engine(b.engine)
        for bad in ((-1, 1000), (50, -1), (2**31, 1000), (50, 2**31)):
            with pytest.raises(ValueError):
                b.call(raw.set_icmp_ratelimit, *bad)
        b.call(raw.set_icmp_ratelimit, 2**31 - 1, 2**31 - 1)
        b.start()
        with pytest.raises(RuntimeError):
            b.call(raw.set_icmp_ratelimit, BURST, RATE)
    finally:
        b.close()
