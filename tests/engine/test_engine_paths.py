"""Both engines, packet by packet: forwarding, ICMP errors, every drop reason, routes, stop."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest
from enginebench import (
    LOCAL_ADDR,
    Bench,
    dec_ttl,
    engine_threads,
    ip_checksum_ok,
    local_host,
    nonzero,
    peer_host,
    peer_ip,
    peer_subnet,
    udp_packet,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import ICMPv6ND_RS, IPv6

from flanneld_py.pyengine import COUNTERS

DROPS = [k for k in COUNTERS if k.startswith("drop_")]


def only_drop(stats: dict[str, int], name: str, count: int = 1) -> None:
    """Exactly ``count`` of drop ``name`` and no other drop."""
    drops = {k: stats[k] for k in DROPS if stats[k]}
    assert drops == {name: count}, nonzero(stats)


# --- forwarding --------------------------------------------------------------------------------


def test_tun_to_udp_exact_bytes(bench: Bench) -> None:
    sent = {
        0: bytes(
            IP(src=local_host(), dst=peer_host(0), ttl=64) / UDP(sport=1, dport=2) / (b"x" * 100)
        ),
        1: bytes(IP(src=local_host(), dst=peer_host(1), ttl=2) / TCP(sport=3, dport=4, flags="S")),
        2: bytes(IP(src=local_host(), dst=peer_host(2, 200)) / ICMP(type=8, id=7, seq=1) / b"ping"),
    }
    for pkt in sent.values():
        bench.to_tun(pkt)
    for i, pkt in sent.items():
        got = bench.from_peer(i)
        assert got == dec_ttl(pkt)
        assert IP(got).ttl == IP(pkt).ttl - 1
        assert ip_checksum_ok(got)
    stats = bench.settled_stats()
    size = sum(len(p) for p in sent.values())
    assert stats["tun_rx_packets"] == 3 and stats["tun_rx_bytes"] == size
    assert stats["udp_tx_packets"] == 3 and stats["udp_tx_bytes"] == size
    assert not any(stats[k] for k in DROPS)


def test_udp_to_tun_exact_bytes(bench: Bench) -> None:
    sent = [
        (i, bytes(IP(src=peer_host(i), dst=local_host(5 + i), ttl=63) / UDP() / os.urandom(300)))
        for i in range(3)
    ]
    for i, pkt in sent:
        bench.peer_send(i, pkt)
        got = bench.from_tun()
        assert got == dec_ttl(pkt)
        assert ip_checksum_ok(got)
    stats = bench.settled_stats()
    assert stats["udp_rx_packets"] == 3 and stats["tun_tx_packets"] == 3
    assert stats["tun_tx_bytes"] == stats["udp_rx_bytes"] == sum(len(p) for _, p in sent)
    assert not any(stats[k] for k in DROPS) and stats["rx_oversize"] == 0


def test_options_fragments_and_lan_to_local_address(bench: Bench) -> None:
    """IHL > 5, fragments, and the TUN's own address as destination all forward unchanged."""
    with_opts = bytes(
        IP(src=local_host(), dst=peer_host(0), options=[IPOption_RR()]) / UDP() / b"o"
    )
    assert IP(with_opts).ihl > 5
    frag = bytes(IP(src=local_host(), dst=peer_host(0), flags="MF", frag=0, id=9) / (b"a" * 64))
    frag2 = bytes(IP(src=local_host(), dst=peer_host(0), frag=8, id=9, proto=17) / (b"b" * 16))
    for pkt in (with_opts, frag, frag2):
        bench.to_tun(pkt)
        got = bench.from_peer(0)
        assert got == dec_ttl(pkt) and ip_checksum_ok(got)
    inbound = bytes(IP(src=peer_host(1), dst=str(LOCAL_ADDR), options=[IPOption_RR()]) / ICMP())
    bench.peer_send(1, inbound)
    assert bench.from_tun() == dec_ttl(inbound)


def test_checksum_update_all_ttls(bench: Bench) -> None:
    """RFC 1624 update stays valid for every TTL and many header checksums (both directions)."""
    for ttl in range(2, 256, 3):
        pkt = udp_packet(
            local_host(ttl % 250 + 1), peer_host(0), bytes([ttl]), ttl=ttl, id=ttl * 251
        )
        bench.to_tun(pkt)
        assert bench.from_peer(0) == dec_ttl(pkt)
        back = udp_packet(peer_host(0, ttl % 250 + 1), local_host(), bytes([ttl]), ttl=ttl, tos=ttl)
        bench.peer_send(0, back)
        assert bench.from_tun() == dec_ttl(back)


def test_oversize_is_delivered_and_counted(kind: str) -> None:
    b = Bench(kind, mtu=1400)
    try:
        for size in (1400, 1401, 9000, 60000):
            pkt = udp_packet(peer_host(0), local_host(), b"z" * (size - 28))
            assert len(pkt) == size
            b.peer_send(0, pkt)
            assert b.from_tun() == dec_ttl(pkt)
        assert b.settled_stats()["rx_oversize"] == 3
    finally:
        b.close()


# --- ICMP errors into the TUN --------------------------------------------------------------------


def check_icmp_error(icmp: bytes, offender: bytes, icmp_type: int) -> None:
    p = IP(icmp)
    off = IP(offender)
    assert p.src == str(LOCAL_ADDR) and p.dst == off.src
    assert p.proto == 1 and p.ttl == 64 and p.flags == 0 and p.frag == 0
    assert ICMP in p and p[ICMP].type == icmp_type and p[ICMP].code == 0
    assert ip_checksum_ok(icmp)
    quoted = offender[: off.ihl * 4 + 8]
    assert icmp[28:] == quoted and p.len == 28 + len(quoted)
    q = p[ICMP].copy()
    del q.chksum
    assert ICMP(bytes(q)).chksum == p[ICMP].chksum


@pytest.mark.parametrize(
    "offender",
    [
        udp_packet(local_host(), "10.99.0.1", b"payload-longer-than-8"),
        bytes(IP(src=local_host(), dst="10.99.0.1", options=[IPOption_RR()]) / TCP()),
        bytes(IP(src=local_host(), dst="10.99.0.1", proto=17) / b"abc"),  # < 8 bytes after header
        bytes(IP(src=local_host(), dst="10.99.0.1") / ICMP(type=8) / b"echo"),  # a query: answered
        bytes(IP(src=local_host(), dst="10.99.0.1", flags="MF", proto=6) / (b"f" * 40)),  # 1st frag
    ],
    ids=["udp", "options", "short", "icmp-echo", "first-fragment"],
)
def test_no_route_sends_net_unreachable(bench: Bench, offender: bytes) -> None:
    bench.to_tun(offender)
    check_icmp_error(bench.from_tun(), offender, 3)
    stats = bench.settled_stats()
    only_drop(stats, "drop_no_route")
    assert stats["icmp_unreachable_sent"] == 1 and stats["tun_tx_packets"] == 1
    assert stats["udp_tx_packets"] == 0


@pytest.mark.parametrize(
    "offender",
    [
        bytes(IP(src=local_host(), dst="10.99.0.1") / ICMP(type=3, code=1) / (b"q" * 28)),
        bytes(IP(src=local_host(), dst="10.99.0.1") / ICMP(type=11) / (b"q" * 28)),
        bytes(IP(src=local_host(), dst="10.99.0.1") / ICMP(type=12) / (b"q" * 28)),
        bytes(IP(src=local_host(), dst="10.99.0.1") / ICMP(type=5) / (b"q" * 28)),
        bytes(IP(src=local_host(), dst="10.99.0.1") / ICMP(type=44)),  # unknown type
        bytes(IP(src=local_host(), dst="10.99.0.1", proto=1)),  # ICMP without a type byte
        bytes(IP(src=local_host(), dst="10.99.0.1", frag=3, proto=17) / (b"x" * 16)),
        udp_packet("0.0.0.0", "10.99.0.1"),
        udp_packet("224.0.0.1", "10.99.0.1"),
        udp_packet(local_host(), "224.0.0.251"),
        udp_packet(local_host(), "255.255.255.255"),
    ],
    ids=[
        "icmp-unreach",
        "icmp-time-exceeded",
        "icmp-param-problem",
        "icmp-redirect",
        "icmp-unknown-type",
        "icmp-truncated",
        "non-first-fragment",
        "src-zero",
        "src-multicast",
        "dst-multicast",
        "dst-broadcast",
    ],
)
def test_no_route_icmp_suppressed(bench: Bench, offender: bytes) -> None:
    bench.to_tun(offender)
    bench.sync_tun_side()
    assert bench.tun_empty()
    stats = bench.settled_stats()
    only_drop(stats, "drop_no_route")
    assert stats["icmp_suppressed"] == 1 and stats["icmp_unreachable_sent"] == 0


@pytest.mark.parametrize("ttl", [1, 0])
def test_tun_ttl_expired_sends_time_exceeded(bench: Bench, ttl: int) -> None:
    offender = udp_packet(local_host(), peer_host(1), b"traceroute", ttl=ttl)
    bench.to_tun(offender)
    check_icmp_error(bench.from_tun(), offender, 11)
    bench.sync_tun_side()
    assert bench.peer_empty(1)
    stats = bench.settled_stats()
    only_drop(stats, "drop_tun_ttl")
    assert stats["icmp_time_exceeded_sent"] == 1


def test_tun_ttl_expired_icmp_error_not_answered(bench: Bench) -> None:
    offender = bytes(IP(src=local_host(), dst=peer_host(1), ttl=1) / ICMP(type=11) / (b"q" * 28))
    bench.to_tun(offender)
    bench.sync_tun_side()
    assert bench.tun_empty()
    stats = bench.settled_stats()
    only_drop(stats, "drop_tun_ttl")
    assert stats["icmp_suppressed"] == 1 and stats["icmp_time_exceeded_sent"] == 0


def test_udp_ttl_expired_answers_the_peer(bench: Bench) -> None:
    offender = udp_packet(peer_host(2), local_host(), b"traceroute", ttl=1)
    bench.peer_send(2, offender)
    reply = bench.from_peer(2)
    check_icmp_error(reply, offender, 11)
    assert IP(reply).dst == peer_host(2)
    bench.sync_udp_side()
    stats = bench.settled_stats()
    only_drop(stats, "drop_udp_ttl")
    assert stats["icmp_time_exceeded_sent"] == 1 and stats["udp_tx_packets"] == 1


# --- drops -------------------------------------------------------------------------------------


def _ipv4_with(pkt: bytes, **changes: int) -> bytes:
    """Raw header surgery, keeping (or fixing) the checksum as asked."""
    b = bytearray(pkt)
    if "first_byte" in changes:
        b[0] = changes["first_byte"]
    if "total_length" in changes:
        b[2:4] = changes["total_length"].to_bytes(2, "big")
    if changes.get("fix_checksum", 1):
        b[10:12] = b"\0\0"
        ihl = (b[0] & 15) * 4
        from flanneld_py.packet import checksum

        b[10:12] = checksum(b[:ihl]).to_bytes(2, "big")
    return bytes(b)


GOOD_IN = udp_packet(peer_host(0), local_host(), b"0123456789abcdef")
N = len(GOOD_IN)


def _flip_checksum() -> bytes:
    return GOOD_IN[:10] + bytes([GOOD_IN[10] ^ 1]) + GOOD_IN[11:]


def _v6() -> bytes:
    return bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP() / b"v6")


def _ihl_past_end() -> bytes:
    return _ipv4_with(GOOD_IN[:40], first_byte=0x4F, total_length=40, fix_checksum=0)


UDP_DROPS: list[tuple[str, int, Callable[[], bytes], str]] = [
    ("empty", 0, lambda: b"", "drop_udp_short"),
    ("19-bytes", 0, lambda: GOOD_IN[:19], "drop_udp_short"),
    ("ipv6", 0, _v6, "drop_udp_not_ipv4"),
    ("version-5", 0, lambda: _ipv4_with(GOOD_IN, first_byte=0x55), "drop_udp_not_ipv4"),
    (
        "ihl-4",
        0,
        lambda: _ipv4_with(GOOD_IN, first_byte=0x44, fix_checksum=0),
        "drop_udp_bad_header",
    ),
    ("ihl-past-end", 0, _ihl_past_end, "drop_udp_bad_header"),
    ("length-short", 0, lambda: _ipv4_with(GOOD_IN, total_length=N - 1), "drop_udp_bad_length"),
    ("length-long", 0, lambda: _ipv4_with(GOOD_IN, total_length=N + 1), "drop_udp_bad_length"),
    ("trailing-bytes", 0, lambda: GOOD_IN + b"\0\0", "drop_udp_bad_length"),
    ("bad-checksum", 0, _flip_checksum, "drop_udp_bad_checksum"),
    ("unknown-src", 0, lambda: udp_packet("10.7.0.1", local_host()), "drop_udp_unknown_src"),
    ("own-subnet-src", 0, lambda: udp_packet(local_host(3), local_host()), "drop_udp_unknown_src"),
    ("other-peers-src", 0, lambda: udp_packet(peer_host(1), local_host()), "drop_udp_wrong_peer"),
    ("from-non-peer", 3, lambda: udp_packet(peer_host(0), local_host()), "drop_udp_wrong_peer"),
    ("dst-not-local", 0, lambda: udp_packet(peer_host(0), "10.5.2.3"), "drop_udp_not_local"),
    ("dst-peer-subnet", 0, lambda: udp_packet(peer_host(0), peer_host(1)), "drop_udp_not_local"),
    ("ttl-0", 0, lambda: udp_packet(peer_host(0), local_host(), ttl=0), "drop_udp_ttl"),
]


@pytest.mark.parametrize(
    ("sender", "make", "counter"), [d[1:] for d in UDP_DROPS], ids=[d[0] for d in UDP_DROPS]
)
def test_udp_drop_reasons(kind: str, sender: int, make: Callable[[], bytes], counter: str) -> None:
    b = Bench(kind, npeers=4, routes=False)  # peer 3 (127.0.0.5) has no subnet: not a peer
    try:
        for i in range(3):
            b.set_route(peer_subnet(i), peer_ip(i))
        b.peer_send(sender, make())
        b.sync_udp_side()
        stats = b.settled_stats()
        only_drop(stats, counter)
        assert stats["udp_rx_packets"] == 2 and stats["tun_tx_packets"] == 1
    finally:
        b.close()


def _out(ttl: int = 64) -> bytes:
    return udp_packet(local_host(), peer_host(0), ttl=ttl)


def _rs() -> bytes:
    return bytes(IPv6(src="fe80::1", dst="ff02::2") / ICMPv6ND_RS())


TUN_DROPS: list[tuple[str, Callable[[], bytes], str]] = [
    ("ipv6-router-solicitation", _rs, "drop_tun_ipv6"),
    ("ipv6-1-byte", lambda: b"\x60", "drop_tun_ipv6"),
    ("short", lambda: _out()[:19], "drop_tun_malformed"),
    ("version-5", lambda: b"\x55" + _out()[1:], "drop_tun_malformed"),
    ("ihl-4", lambda: b"\x44" + _out()[1:], "drop_tun_malformed"),
    ("bad-length", lambda: _out() + b"\0", "drop_tun_malformed"),
    ("no-route", lambda: udp_packet(local_host(), "192.168.1.1"), "drop_no_route"),
    ("ttl-1", lambda: _out(ttl=1), "drop_tun_ttl"),
]


@pytest.mark.parametrize(
    ("make", "counter"), [d[1:] for d in TUN_DROPS], ids=[d[0] for d in TUN_DROPS]
)
def test_tun_drop_reasons(bench: Bench, make: Callable[[], bytes], counter: str) -> None:
    bench.to_tun(make())
    bench.sync_tun_side()
    stats = bench.settled_stats()
    only_drop(stats, counter)
    assert stats["tun_rx_packets"] == 2 and stats["udp_tx_packets"] == 1
    icmp = stats["icmp_unreachable_sent"] + stats["icmp_time_exceeded_sent"]
    assert icmp == (1 if counter in ("drop_no_route", "drop_tun_ttl") else 0)


# --- batches -------------------------------------------------------------------------------------


def _reader(sock: socket.socket, n: int, out: list[bytes]) -> threading.Thread:
    def run() -> None:
        for _ in range(n):
            out.append(sock.recv(70000))

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000])
def test_burst_arrives_complete_and_in_order(bench: Bench, n: int) -> None:
    out_tun: list[bytes] = []
    out_peer: list[bytes] = []
    t1 = _reader(bench.peers[1], n, out_peer)
    t2 = _reader(bench.tun, n, out_tun)
    try:
        tun_in = [udp_packet(local_host(), peer_host(1), i.to_bytes(4, "big")) for i in range(n)]
        udp_in = [udp_packet(peer_host(1), local_host(), i.to_bytes(4, "big")) for i in range(n)]
        for a, b in zip(tun_in, udp_in, strict=True):
            bench.to_tun(a)
            bench.peer_send(1, b)
    finally:
        t1.join(30)
        t2.join(30)
    assert out_peer == [dec_ttl(p) for p in tun_in]
    assert out_tun == [dec_ttl(p) for p in udp_in]
    stats = bench.settled_stats()
    assert stats["udp_tx_packets"] == stats["tun_tx_packets"] == n
    assert stats["tun_rx_batches"] <= n and stats["udp_rx_batches"] <= n


# --- routes ------------------------------------------------------------------------------------


def test_route_add_replace_remove(bench: Bench) -> None:
    dst = "10.6.0.77"
    pkt = udp_packet(local_host(), dst)

    def goes_to() -> int | str:
        bench.to_tun(pkt)
        bench.sync_tun_side()  # a marker to peer 0: everything before it has been handled
        for i in (1, 2):
            if not bench.peer_empty(i):
                return i
        return "nowhere" if bench.tun_empty() else "unreachable"

    def check(expect: int | str) -> None:
        assert goes_to() == expect

    check("unreachable")
    bench.set_route("10.6.0.0/16", peer_ip(1))
    check(1)
    bench.set_route("10.6.0.0/16", peer_ip(2))  # replace
    check(2)
    bench.set_route("10.6.0.64/26", peer_ip(1))  # more specific wins
    check(1)
    bench.set_route("0.0.0.0/0", peer_ip(2))  # default route does not beat /26
    check(1)
    bench.del_route("10.6.0.64/26")
    check(2)
    bench.del_route("10.6.0.0/16")
    check(2)  # via 0.0.0.0/0
    bench.del_route("0.0.0.0/0")
    bench.del_route("10.99.0.0/16")  # absent: no-op
    check("unreachable")
    routes = bench.call(bench.engine.routes)
    assert {str(k): str(v) for k, v in routes.items()} == {
        str(peer_subnet(i)): str(peer_ip(i)) for i in range(3)
    }


def test_sender_check_follows_routes(bench: Bench) -> None:
    pkt = udp_packet(peer_host(0), local_host())
    bench.set_route(peer_subnet(0), peer_ip(1))  # subnet 0 moved to host 1
    bench.peer_send(0, pkt)
    bench.peer_send(1, pkt)
    assert bench.from_tun() == dec_ttl(pkt)
    bench.sync_udp_side(1)
    assert bench.settled_stats()["drop_udp_wrong_peer"] == 1
    bench.del_route(peer_subnet(0))
    bench.peer_send(1, pkt)
    bench.sync_udp_side(1)
    assert bench.settled_stats()["drop_udp_unknown_src"] == 1


def test_routes_before_start(kind: str) -> None:
    b = Bench(kind, start=False, routes=False)
    try:
        b.set_route(peer_subnet(1), peer_ip(1))
        b.set_route("10.8.0.0/16", peer_ip(0))
        b.del_route("10.8.0.0/16")
        b.start()
        pkt = udp_packet(local_host(), peer_host(1))
        b.to_tun(pkt)
        assert b.from_peer(1) == dec_ttl(pkt)
        assert b.stats()["route_commands"] == 3
    finally:
        b.close()


def test_many_routes(bench: Bench) -> None:
    for k in range(2000):
        bench.set_route(f"10.{100 + k // 256}.{k % 256}.0/24", peer_ip(k % 3))
    for k in (0, 777, 1999):
        pkt = udp_packet(local_host(), f"10.{100 + k // 256}.{k % 256}.1")
        bench.to_tun(pkt)
        assert bench.from_peer(k % 3) == dec_ttl(pkt)
    assert len(bench.call(bench.engine.routes)) == 2003


# --- lifecycle ---------------------------------------------------------------------------------


def test_clean_stop(kind: str) -> None:
    before = set(engine_threads())
    b = Bench(kind)
    try:
        assert b.call(b.engine.alive)
        mine = set(engine_threads()) - before
        assert len(mine) == (1 if kind == "c" else 0)
        b.stop()
        b.stop()  # idempotent
        assert not b.call(b.engine.alive) and b.call(b.engine.error) is None
        assert not (set(engine_threads()) & mine), "the engine thread is still there"
        for s in (b.tun_engine, b.udp):  # fds left open
            os.fstat(s.fileno())
        with pytest.raises(RuntimeError):
            b.start()
        # nothing moves any more
        b.to_tun(udp_packet(local_host(), peer_host(0)))
        b.peer_send(0, udp_packet(peer_host(0), local_host()))
        stats = b.stats()
        assert stats["tun_rx_packets"] == stats["udp_rx_packets"] == 0
        if kind == "python":
            assert b.loop_thread is not None
            loop = b.loop_thread.loop
            assert not b.call(loop.remove_reader, b.tun_engine.fileno())
            assert not b.call(loop.remove_reader, b.udp.fileno())
    finally:
        b.close()


def test_stop_while_busy(kind: str) -> None:
    """Stop with traffic in flight in both directions: returns, thread gone."""
    before = set(engine_threads())
    b = Bench(kind)
    try:
        pkt_in = udp_packet(peer_host(0), local_host())
        pkt_out = udp_packet(local_host(), peer_host(0))
        for _ in range(200):
            b.peer_send(0, pkt_in)
            b.to_tun(pkt_out)
        b.stop()
        assert set(engine_threads()) <= before
    finally:
        b.close()


@pytest.mark.parametrize("how", ["hang-up", "empty-read", "udp-hang-up"])
def test_fd_failure_stops_the_engine(kind: str, how: str) -> None:
    """A TUN fd that hangs up or reads EOF (a TUN never reads empty), or a UDP socket shut down,
    stops the engine with a reason; it does not spin."""
    before = set(engine_threads())
    b = Bench(kind)
    try:
        pkt = udp_packet(local_host(), peer_host(0))
        b.to_tun(pkt)
        assert b.from_peer(0) == dec_ttl(pkt)
        if how == "hang-up":
            b.tun_engine.shutdown(socket.SHUT_RDWR)
        elif how == "empty-read":
            b.to_tun(b"")
        else:
            with contextlib.suppress(OSError):  # ENOTCONN, but the socket is shut down
                b.udp.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 10
        while b.call(b.engine.alive) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not b.call(b.engine.alive)
        error = b.call(b.engine.error)
        assert error is not None and ("UDP" if how == "udp-hang-up" else "TUN") in error
        # routes can still be changed (no thread to talk to), stop still works
        b.set_route("10.9.0.0/16", peer_ip(0))
        b.stop()
        assert b.call(b.engine.error) == error
        assert set(engine_threads()) <= before
    finally:
        b.close()


def test_stop_before_start(kind: str) -> None:
    b = Bench(kind, start=False)
    try:
        b.stop()
        assert not b.call(b.engine.alive)
        with pytest.raises(RuntimeError):
            b.start()
    finally:
        b.close()


def test_python_engine_on_uvloop() -> None:
    """The daemon runs the Python engine on uvloop: same behaviour there."""
    uvloop = pytest.importorskip("uvloop")
    b = Bench("python", loop_factory=uvloop.new_event_loop)
    try:
        for n in range(300):
            pkt = udp_packet(local_host(), peer_host(n % 3), n.to_bytes(2, "big"))
            b.to_tun(pkt)
            assert b.from_peer(n % 3) == dec_ttl(pkt)
            back = udp_packet(peer_host(n % 3), local_host(), n.to_bytes(2, "big"))
            b.peer_send(n % 3, back)
            assert b.from_tun() == dec_ttl(back)
        b.to_tun(udp_packet(local_host(), "10.99.0.1"))
        assert IP(b.from_tun())[ICMP].type == 3
        b.tun_engine.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 10
        while b.call(b.engine.alive) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "TUN" in (b.call(b.engine.error) or "")
    finally:
        b.close()
