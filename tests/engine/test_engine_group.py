"""Several C engines acting as one (``EngineGroup``, ``--engine-threads``), without root.

Each engine has its own "TUN" (a SOCK_DGRAM socketpair) and its own UDP socket; the sockets share
127.0.0.1:P in one SO_REUSEPORT group steered by the inner flow (``reuseport.py``), as the udp
backend sets them up. A plain peer socket sits at 127.0.0.2:P and owns 10.5.10.0/24.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from enginebench import (
    LOCAL_ADDR,
    LOCAL_SUBNET,
    local_host,
    peer_host,
    peer_ip,
    peer_subnet,
    require_kind,
    udp_packet,
)
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from flanneld_py.engine import CEngine, EngineConfig, EngineGroup, make_engine, offload_status
from flanneld_py.reuseport import attach_inner_flow_steering

N = 3


@pytest.fixture(autouse=True)
def _c_engine() -> None:
    require_kind("c")


class Group:
    def __init__(self, n: int = N) -> None:
        self._closers: list[Callable[[], None]] = []
        try:
            self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._closers.append(self.peer.close)
            self.peer.bind((str(peer_ip(0)), 0))
            self.port = self.peer.getsockname()[1]
            self.peer.settimeout(5)
            self.tuns: list[socket.socket] = []
            self.socks: list[socket.socket] = []
            engines: list[CEngine] = []
            for _ in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._closers.append(s.close)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.bind(("127.0.0.1", self.port))
                s.setblocking(False)
                self.socks.append(s)
                mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._closers += [mine.close, theirs.close]
                mine.setblocking(False)
                theirs.settimeout(5)
                self.tuns.append(theirs)
                e = make_engine(
                    "c",
                    EngineConfig(
                        tun_fd=mine.fileno(),
                        udp_fd=s.fileno(),
                        local_subnet=LOCAL_SUBNET,
                        local_addr=LOCAL_ADDR,
                        port=self.port,
                        mtu=1472,
                    ),
                )
                assert isinstance(e, CEngine)
                engines.append(e)
            attach_inner_flow_steering(self.socks[0], n)
            self.group = EngineGroup(engines)
            self._closers.append(self.group.stop)
            self.group.start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fn in reversed(self._closers):
            with contextlib.suppress(Exception):
                fn()
        self._closers.clear()

    def wait(self, timeout: float = 10.0, **at_least: int) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            c = self.group.stats()
            if all(c[k] >= v for k, v in at_least.items()):
                return c
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {at_least}: {c}")
            time.sleep(0.005)


@pytest.fixture
def grp() -> Iterator[Group]:
    g = Group()
    try:
        yield g
    finally:
        g.close()


def test_route_commands_reach_every_engine(grp: Group) -> None:
    g = grp
    g.group.set_route(peer_subnet(0), peer_ip(0))
    assert g.group.routes() == {peer_subnet(0): peer_ip(0)}
    for i, tun in enumerate(g.tuns):  # every engine sends to the peer
        pkt = udp_packet(local_host(), peer_host(0), f"via {i}".encode())
        tun.send(pkt)
        assert g.peer.recv(2000)[28:] == f"via {i}".encode()
    g.group.del_route(peer_subnet(0))
    for tun in g.tuns:  # ... and every engine forgot the route
        tun.send(udp_packet(local_host(), peer_host(0)))
    c = g.wait(drop_no_route=N)
    assert c["udp_tx_packets"] == N
    assert all(e.routes() == {} for e in g.group.engines)
    each = g.group.thread_stats()
    assert all(t["route_commands"] == 2 for t in each)
    assert c["route_commands"] == 2 * N  # summed, like every counter


def test_flows_spread_over_engines_and_counters_sum(grp: Group) -> None:
    """Datagrams of many inner flows from one peer (one outer 4-tuple) reach every engine, each
    flow only one; the group's counters are the per-engine sums."""
    g = grp
    g.group.set_route(peer_subnet(0), peer_ip(0))
    flows = 60
    for f in range(flows):
        for k in range(3):
            pkt = bytes(
                IP(src=peer_host(0), dst=local_host(), id=f * 3 + k)
                / TCP(sport=40000 + 2 * f, dport=5201, flags="A", seq=k)
                / Raw(b"%d" % f)
            )
            g.peer.sendto(pkt, ("127.0.0.1", g.port))
    c = g.wait(tun_tx_packets=3 * flows)
    seen: list[set[int]] = []
    for tun in g.tuns:
        ports: set[int] = set()
        tun.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                ports.add(IP(tun.recv(2000))[TCP].sport)
        seen.append(ports)
    assert all(len(s) >= flows // (2 * N) for s in seen), [len(s) for s in seen]
    assert sum(len(s) for s in seen) == flows  # no flow on two engines
    each = g.group.thread_stats()
    for k in ("udp_rx_packets", "udp_rx_bytes", "tun_tx_packets", "tun_tx_bytes"):
        assert c[k] == sum(t[k] for t in each)
    assert c["udp_rx_packets"] == 3 * flows
    # the peer's counters: each engine counted its own flows, the group sums them
    per_engine = [e.peer_stats()[peer_subnet(0)] for e in g.group.engines]
    assert sum(1 for pe in per_engine if pe["rx_packets"]) >= 2, per_engine
    assert g.group.peer_stats() == {
        peer_subnet(0): {"tx_packets": 0, "tx_bytes": 0,
                         "rx_packets": 3 * flows, "rx_bytes": c["udp_rx_bytes"]}
    }  # fmt: skip


def test_offloads_and_status_of_a_group(grp: Group) -> None:
    g = grp
    off = g.group.offloads()
    assert off["vnet_hdr"] == 0 and off["tun_gso"] == 0
    st = offload_status(g.group)
    assert st["active"] == [] and st["vnet_hdr"] is False
    assert g.group.alive() and g.group.error() is None


def test_clean_stop_under_load(grp: Group) -> None:
    """stop() joins every engine thread promptly while packets keep coming from both sides."""
    g = grp
    g.group.set_route(peer_subnet(0), peer_ip(0))
    stop = threading.Event()
    pkt_out = udp_packet(local_host(), peer_host(0), b"o" * 1000)
    pkt_in = udp_packet(peer_host(0), local_host(), b"i" * 1000)

    def pump() -> None:
        while not stop.is_set():
            for tun in g.tuns:
                with contextlib.suppress(OSError):
                    tun.send(pkt_out)
            with contextlib.suppress(OSError):
                g.peer.sendto(pkt_in, ("127.0.0.1", g.port))

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        g.wait(udp_tx_packets=300, udp_rx_packets=50)  # the TUN side stalls: nobody reads it
        t0 = time.monotonic()
        g.group.stop()
        assert time.monotonic() - t0 < 5
        assert not g.group.alive()
        assert all(not e.alive() for e in g.group.engines)
    finally:
        stop.set()
        t.join(5)
