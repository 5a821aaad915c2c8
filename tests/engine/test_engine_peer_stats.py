"""Per-peer counters (``Engine.peer_stats()``), both engines, without root.

Each route counts what went to its peer (datagrams the kernel took, inner-packet bytes) and what
came from it (datagrams that passed every check): the same figures in the C and Python engines,
adding up to the engine's own ``udp_tx_*``/``udp_rx_*`` counters, kept while the route is re-set to
the same peer, restarted when its peer changes, gone with the route.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Network

from enginebench import (
    Bench,
    dec_ttl,
    local_host,
    peer_host,
    peer_ip,
    peer_subnet,
    require_kind,
    udp_packet,
)

from flanneld_py.engine import PEER_COUNTERS

ZERO = dict.fromkeys(PEER_COUNTERS, 0)


def send_out(bench: Bench, i: int, sizes: list[int]) -> int:
    """Packets TUN -> peer i, each arriving; returns their bytes as sent (TTL-1, same length)."""
    total = 0
    for n in sizes:
        pkt = udp_packet(local_host(), peer_host(i), os.urandom(n))
        bench.to_tun(pkt)
        assert bench.from_peer(i) == dec_ttl(pkt)
        total += len(pkt)
    return total


def send_in(bench: Bench, i: int, sizes: list[int]) -> int:
    total = 0
    for n in sizes:
        pkt = udp_packet(peer_host(i), local_host(), os.urandom(n))
        bench.peer_send(i, pkt)
        assert bench.from_tun() == dec_ttl(pkt)
        total += len(pkt)
    return total


def test_counts_per_route_add_up_to_the_engine_counters(bench: Bench) -> None:
    assert bench.peer_stats() == {peer_subnet(i): ZERO for i in range(3)}
    want = {}
    for i, (out_sizes, in_sizes) in enumerate([([10, 200, 1400], [30]), ([], [5, 6]), ([99], [])]):
        tx = send_out(bench, i, out_sizes)
        rx = send_in(bench, i, in_sizes)
        want[peer_subnet(i)] = {
            "tx_packets": len(out_sizes),
            "tx_bytes": tx,
            "rx_packets": len(in_sizes),
            "rx_bytes": rx,
        }
    got = bench.settled_peer_stats()
    assert got == want
    stats = bench.settled_stats()
    for name in PEER_COUNTERS:
        assert sum(c[name] for c in got.values()) == stats[f"udp_{name}"], name


def test_drops_count_for_no_peer(bench: Bench) -> None:
    # from peer 1, claiming an address of peer 0's subnet: wrong peer
    bench.peer_send(1, udp_packet(peer_host(0), local_host(), b"spoofed"))
    # from peer 0, to an address that is not local
    bench.peer_send(0, udp_packet(peer_host(0), peer_host(2), b"elsewhere"))
    # from peer 0, TTL 1: dropped here (time exceeded goes back, not counted as traffic)
    bench.peer_send(0, udp_packet(peer_host(0), local_host(), b"late", ttl=1))
    assert bench.from_peer(0)  # the ICMP time exceeded
    # into the TUN: no route, and TTL 1
    bench.to_tun(udp_packet(local_host(), "10.99.0.1", b"nowhere"))
    bench.from_tun()  # net unreachable
    bench.to_tun(udp_packet(local_host(), peer_host(2), b"late", ttl=1))
    bench.from_tun()  # time exceeded
    stats = bench.wait_stats(
        drop_udp_wrong_peer=1, drop_udp_not_local=1, drop_udp_ttl=1, drop_no_route=1, drop_tun_ttl=1
    )
    assert bench.settled_peer_stats() == {peer_subnet(i): ZERO for i in range(3)}, stats


def test_route_changes(bench: Bench) -> None:
    a, b = peer_subnet(0), peer_subnet(1)
    tx = send_out(bench, 0, [100, 100])
    bench.set_route(a, peer_ip(0))  # the same peer again (a lease renewal): counts stay
    assert bench.settled_peer_stats()[a] == {**ZERO, "tx_packets": 2, "tx_bytes": tx}
    # subnet a moves to peer 1's host: its counts start anew, and go to that host
    bench.set_route(a, peer_ip(1))
    assert bench.settled_peer_stats()[a] == ZERO
    pkt = udp_packet(local_host(), peer_host(0), b"x" * 50)
    bench.to_tun(pkt)
    assert bench.from_peer(1) == dec_ttl(pkt)
    got = bench.settled_peer_stats()
    assert got[a] == {**ZERO, "tx_packets": 1, "tx_bytes": len(pkt)}
    assert got[b] == ZERO  # the other route of that host is apart
    # removed: gone; set again: from zero
    bench.del_route(a)
    assert a not in bench.settled_peer_stats()
    bench.set_route(a, peer_ip(0))
    assert bench.settled_peer_stats()[a] == ZERO


def test_many_routes_come_and_go(bench: Bench) -> None:
    """Entries are reused: 1000 routes set and removed in waves; the survivors count right."""
    for wave in range(4):
        subnets = [IPv4Network(f"10.{100 + wave}.{k}.0/24") for k in range(250)]
        for k, sn in enumerate(subnets):
            bench.set_route(sn, peer_ip(k % 3))
        for sn in subnets[1:]:
            bench.del_route(sn)
        bench.to_tun(udp_packet(local_host(), f"10.{100 + wave}.0.9", b"survivor"))
        bench.from_peer(0)
    got = bench.settled_peer_stats()
    assert set(got) == {peer_subnet(i) for i in range(3)} | {
        IPv4Network(f"10.{100 + w}.0.0/24") for w in range(4)
    }
    for w in range(4):
        assert got[IPv4Network(f"10.{100 + w}.0.0/24")]["tx_packets"] == 1


def test_before_start_and_after_stop(kind: str) -> None:
    require_kind(kind)
    b = Bench(kind, start=False)
    try:
        assert b.peer_stats() == {peer_subnet(i): ZERO for i in range(3)}
        b.start()
        tx = send_out(b, 2, [40])
        b.settled_stats()
        b.stop()
        assert b.peer_stats()[peer_subnet(2)] == {**ZERO, "tx_packets": 1, "tx_bytes": tx}
    finally:
        b.close()


def test_c_routes_beyond_the_entries_forward_uncounted() -> None:
    """All PEER_SLOTS entries in use: one more route still forwards, without per-peer counts;
    a freed entry serves the next route; set and removed again and again, entries are reused."""
    require_kind("c")
    from flanneld_py import _engine

    b = Bench("c", routes=False)
    try:
        many = [IPv4Network((0x0B000000 + (k << 8), 24)) for k in range(_engine.PEER_SLOTS)]
        for sn in many:
            b.set_route(sn, peer_ip(1))
        b.set_route(peer_subnet(0), peer_ip(0))  # one too many
        send_out(b, 0, [64])
        got = b.settled_peer_stats()
        assert len(got) == _engine.PEER_SLOTS and peer_subnet(0) not in got
        assert b.stats()["udp_tx_packets"] == 1
        b.del_route(many[7])
        b.set_route(peer_subnet(2), peer_ip(2))
        for _ in range(3):  # set, removed, set again: always on the freed entry
            b.del_route(peer_subnet(2))
            b.set_route(peer_subnet(2), peer_ip(2))
        tx = send_out(b, 2, [80])
        got = b.settled_peer_stats()
        assert got[peer_subnet(2)] == {**ZERO, "tx_packets": 1, "tx_bytes": tx}
        assert len(got) == _engine.PEER_SLOTS and many[7] not in got
    finally:
        b.close()
