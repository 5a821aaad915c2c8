"""Garbage in: random and scapy-fuzzed datagrams on both sides. No crash, every packet counted."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest
from enginebench import Bench, mutate, nonzero, templates

from flanneld_py.packet import checksum
from flanneld_py.pyengine import COUNTERS

UDP_DROPS = [k for k in COUNTERS if k.startswith("drop_udp_")]
TUN_DROPS = ["drop_tun_ipv6", "drop_tun_malformed", "drop_no_route", "drop_tun_ttl"]
#: hundreds of thousands for the C engine; the Python engine is ~10x slower per packet
N_UDP = {"c": 300_000, "python": 100_000}
N_TUN = {"c": 50_000, "python": 20_000}
CHUNK = 500


class Drain(threading.Thread):
    """Reads one socket until closed, counting datagrams and checking the delivered ones."""

    def __init__(self, sock: socket.socket, check: bool, csum: bool = True) -> None:
        super().__init__()
        # our own socket object (its own timeout) on a duplicate of the fd
        self.sock = socket.socket(fileno=os.dup(sock.fileno()))
        self.check, self.csum = check, csum
        self.count = 0
        self.bad: list[bytes] = []
        self.stop = False
        self.sock.settimeout(0.2)

    def wait_for(self, count: int, timeout: float = 20.0) -> int:
        """Wait until ``count`` datagrams arrived; fail if more or fewer do."""
        deadline = time.monotonic() + timeout
        while self.count < count and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # a straggler would show up now
        assert self.count == count
        return count

    def run(self) -> None:
        while not self.stop:
            try:
                pkt = self.sock.recv(70000)
            except TimeoutError:
                continue
            except OSError:
                break
            self.count += 1
            if self.check and (
                len(pkt) < 20
                or pkt[0] >> 4 != 4
                or (self.csum and checksum(pkt[: (pkt[0] & 15) * 4]) != 0)
                or ((pkt[2] << 8) | pkt[3]) != len(pkt)
            ):
                self.bad.append(pkt)
        self.sock.close()


def test_udp_garbage(kind: str) -> None:
    n = N_UDP[kind]
    rng = random.Random(7)
    random.seed(7)
    tpl = templates(rng, 500)
    b = Bench(kind, npeers=4, routes=False)
    drains = [Drain(b.tun, True)] + [Drain(s, False) for s in b.peers]
    try:
        for i in range(3):
            b.set_route(f"10.5.{10 + i}.0/24", f"127.0.0.{2 + i}")
        for d in drains:
            d.start()
        peers = b.peers
        dest = ("127.0.0.1", b.port)
        for k in range(0, n, CHUNK):
            for _ in range(CHUNK):
                peers[rng.randrange(4)].sendto(mutate(rng, tpl), dest)
            b.wait_stats(timeout=30, udp_rx_packets=k + CHUNK)
        stats = b.settled_stats()
        assert b.call(b.engine.alive), b.call(b.engine.error)
        assert stats["udp_rx_packets"] == n  # nothing lost before the engine
        delivered = stats["tun_tx_packets"]
        dropped = sum(stats[k] for k in UDP_DROPS)
        assert dropped + delivered + stats["tun_tx_errors"] == n, nonzero(stats)
        assert stats["tun_tx_errors"] == stats["udp_rx_errors"] == 0
        assert stats["drop_udp_truncated"] == 0
        assert delivered > 0 and all(stats[k] > 0 for k in UDP_DROPS if k != "drop_udp_truncated")
        drains[0].wait_for(delivered)
    finally:
        for d in drains:
            d.stop = True
        b.close()
        for d in drains:
            d.join(5)
    assert not drains[0].bad, f"malformed packet delivered into the TUN: {drains[0].bad[0][:64]!r}"


def test_tun_garbage(kind: str) -> None:
    n = N_TUN[kind]
    rng = random.Random(11)
    random.seed(11)
    tpl = templates(rng, 300)
    b = Bench(kind)
    # the TUN side trusts the kernel's header checksum (a bad one stays bad, as in a router)
    drains = [Drain(b.tun, True)] + [Drain(s, True, csum=False) for s in b.peers]
    try:
        b.set_route("10.7.0.0/16", "127.0.0.3")
        for d in drains:
            d.start()
        for k in range(0, n, CHUNK):
            for _ in range(CHUNK):
                b.to_tun(mutate(rng, tpl, tun=True))
            b.wait_stats(timeout=30, tun_rx_packets=k + CHUNK)
        stats = b.settled_stats()
        assert b.call(b.engine.alive), b.call(b.engine.error)
        sent = stats["udp_tx_packets"]
        dropped = sum(stats[k] for k in TUN_DROPS)
        assert dropped + sent + stats["udp_tx_errors"] == n, nonzero(stats)
        icmp = stats["icmp_unreachable_sent"] + stats["icmp_time_exceeded_sent"]
        not_sent = stats["icmp_suppressed"] + stats["icmp_ratelimited"] + stats["tun_tx_errors"]
        assert icmp + not_sent == stats["drop_no_route"] + stats["drop_tun_ttl"]
        assert icmp == stats["tun_tx_packets"] > 0
        drains[0].wait_for(icmp)
        deadline = time.monotonic() + 20
        while sum(d.count for d in drains[1:]) < sent and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sum(d.count for d in drains[1:]) == sent
    finally:
        for d in drains:
            d.stop = True
        b.close()
        for d in drains:
            d.join(5)
    for d in drains:
        assert not d.bad, f"malformed packet sent: {d.bad[0][:64]!r}"


@pytest.mark.parametrize("size", [65507, 1])
def test_extreme_datagram_sizes(kind: str, size: int) -> None:
    b = Bench(kind)
    try:
        b.peer_send(0, b"\x45" + b"\0" * (size - 1))
        b.sync_udp_side()
        stats = b.stats()
        assert stats["udp_rx_bytes"] >= size and stats["drop_udp_truncated"] == 0
    finally:
        b.close()
