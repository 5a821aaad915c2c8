"""Segmentation offloads of the C engine, without root.

The "TUN" is a SOCK_DGRAM socketpair whose datagrams carry what a TUN opened with IFF_VNET_HDR
carries: a 10-byte virtio_net_hdr, then the IP packet. Engines and peers sit on loopback
(127.0.0.x, one port), where UDP GSO sends and UDP GRO receives work as on a real device: a
GSO send reaches a socket with UDP_GRO as one read (cmsg: segment size), and a socket without it
as one datagram per segment.

What is checked: TSO super-packets read from the TUN are cut into MSS segments with right
lengths, IP ids, checksums, seq numbers and flags (scapy recomputes every checksum); NEEDS_CSUM
packets get their checksum completed; GSO sends produce one datagram per inner packet; a refused
GSO send turns GSO off at runtime and loses nothing; GRO reads are split and every datagram is
validated as usual; consecutive in-order segments of one TCP flow are written back as one
GSO_TCPV4 super-packet (and only those: other flows, gaps, odd flags, options that differ, bad
checksums break a run); a super-packet split by one engine and re-coalesced by another is
byte-identical to the original.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from enginebench import (
    LOCAL_ADDR,
    LOCAL_SUBNET,
    local_host,
    nonzero,
    peer_host,
    peer_ip,
    peer_subnet,
    require_kind,
    udp_packet,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.packet import Raw

from flanneld_py import engine as engine_mod
from flanneld_py.engine import CEngine, EngineConfig, EngineError, make_engine, offload_status

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_NO_CHECK = 11
VNET = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_ECN = 0, 1, 0x80
ZERO_VNET = bytes(10)
MTU = 1472
TS_OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (4242, 77))]


@pytest.fixture(autouse=True)
def _c_engine() -> None:
    require_kind("c")


# --- checksum helpers (independent of the engine and of scapy) --------------------------------


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inet_sum(b: bytes) -> int:
    """Ones' complement sum (not complemented) of b, zero-padded to even length."""
    if len(b) % 2:
        b += b"\0"
    return _fold(sum(struct.unpack(f"!{len(b) // 2}H", b)))


def pseudo_sum(ip: bytes, l4len: int) -> int:
    return inet_sum(ip[12:20] + struct.pack("!BBH", 0, ip[9], l4len))


def set_partial(pkt: bytes) -> bytes:
    """pkt with its TCP/UDP checksum field holding the pseudo-header sum, as a NEEDS_CSUM packet
    read from a TUN does."""
    b = bytearray(pkt)
    ihl = (b[0] & 15) * 4
    off = ihl + (16 if b[9] == 6 else 6)
    b[off : off + 2] = struct.pack("!H", pseudo_sum(bytes(b), len(b) - ihl))
    return bytes(b)


def complete_partial(pkt: bytes, start: int, offset: int) -> bytes:
    """What the kernel does with a NEEDS_CSUM packet: checksum from start on, stored at
    start + offset (the field holds the pseudo-header sum)."""
    b = bytearray(pkt)
    b[start + offset : start + offset + 2] = struct.pack("!H", 0xFFFF ^ inet_sum(bytes(b[start:])))
    return bytes(b)


def checksums_ok(pkt: bytes) -> bool:
    """IP header checksum and TCP/UDP checksum valid, as scapy recomputes them."""
    p = IP(pkt)
    q = IP(pkt)
    del q.chksum
    layer = TCP if TCP in q else UDP if UDP in q else None
    if layer is not None:
        del q[layer].chksum
    r = IP(bytes(q))
    ok = bool(r.chksum == p.chksum)
    if layer is not None:
        ok = ok and r[layer].chksum == p[layer].chksum
    return ok


# --- packets ------------------------------------------------------------------------------------


def tcp_packet(
    src: str,
    dst: str,
    payload: bytes,
    *,
    seq: int = 1000,
    ack: int = 555,
    flags: str = "A",
    ip_id: int = 100,
    ttl: int = 64,
    tos: int = 0,
    window: int = 502,
    options: Sequence[tuple[str, Any]] = (),
    sport: int = 40000,
    dport: int = 5201,
    ip_flags: str = "DF",
) -> bytes:
    return bytes(
        IP(src=src, dst=dst, id=ip_id, ttl=ttl, tos=tos, flags=ip_flags)
        / TCP(
            sport=sport,
            dport=dport,
            seq=seq,
            ack=ack,
            flags=flags,
            window=window,
            options=list(options),
        )
        / Raw(payload)
    )


def headers_len(pkt: bytes) -> int:
    ihl = (pkt[0] & 15) * 4
    return ihl + (pkt[ihl + 12] >> 4) * 4


def tso_read(pkt: bytes, mss: int, ecn: bool = False) -> bytes:
    """What a TUN with TSO hands over for this super-packet: vnet header + packet with a partial
    checksum."""
    ihl = (pkt[0] & 15) * 4
    hdr = VNET.pack(
        F_NEEDS_CSUM, GSO_TCPV4 | (GSO_ECN if ecn else 0), headers_len(pkt), mss, ihl, 16
    )
    return hdr + set_partial(pkt)


def expected_segments(pkt: bytes, mss: int, ttl_dec: int = 1) -> list[bytes]:
    """The segments a correct TSO split of pkt produces (TTL already decremented), by scapy."""
    p = IP(pkt)
    data = bytes(p[TCP].payload)
    flags = int(p[TCP].flags)
    out = []
    n = max(1, -(-len(data) // mss))
    for i in range(n):
        chunk = data[i * mss : (i + 1) * mss]
        f = flags
        if i < n - 1:
            f &= ~(0x01 | 0x08)  # FIN, PSH only on the last
        if i > 0:
            f &= ~0x80  # CWR only on the first
        q = IP(pkt)
        q.ttl -= ttl_dec
        q.id = (p.id + i) & 0xFFFF
        del q.len, q.chksum
        q[TCP].seq = (p[TCP].seq + i * mss) & 0xFFFFFFFF
        q[TCP].flags = f
        del q[TCP].chksum
        q[TCP].remove_payload()
        out.append(bytes(q / Raw(chunk)))
    return out


def dec_ttl(pkt: bytes, by: int = 1) -> bytes:
    b = bytearray(pkt)
    b[8] -= by
    ihl = (b[0] & 15) * 4
    b[10:12] = b"\0\0"
    b[10:12] = struct.pack("!H", 0xFFFF ^ inet_sum(bytes(b[:ihl])))
    return bytes(b)


# --- the bench ----------------------------------------------------------------------------------


def _grow(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)


def _free_port(addrs: Sequence[str]) -> tuple[int, list[socket.socket]]:
    """A port free on every address in addrs, with UDP sockets bound there."""
    for _ in range(50):
        first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        first.bind((addrs[0], 0))
        port = first.getsockname()[1]
        socks = [first]
        try:
            for a in addrs[1:]:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((a, port))
        except OSError as exc:
            for s in socks:
                s.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return port, socks
    raise RuntimeError("no free UDP port")


@dataclass
class Node:
    """One C engine: its fake TUN (``tun``: the test's end) and its UDP socket."""

    engine: CEngine
    tun: socket.socket
    tun_engine: socket.socket
    udp: socket.socket
    vnet_hdr: bool

    def to_tun(self, data: bytes) -> None:
        self.tun.send(data)

    def from_tun(self, timeout: float = 10.0) -> tuple[tuple[int, ...] | None, bytes]:
        """(vnet header fields or None, packet)."""
        self.tun.settimeout(timeout)
        d = self.tun.recv(70000)
        if not self.vnet_hdr:
            return None, d
        return VNET.unpack(d[:10]), d[10:]

    def tun_empty(self, wait: float = 0.05) -> bool:
        self.tun.settimeout(wait)
        try:
            self.tun.recv(70000)
        except (TimeoutError, BlockingIOError):
            return True
        return False

    def wait(self, timeout: float = 10.0, **at_least: int) -> dict[str, int]:
        """Until every named counter (stats() or offloads()) reaches the value."""
        deadline = time.monotonic() + timeout
        while True:
            c = {**self.engine.stats(), **self.engine.offloads()}
            if all(c[k] >= v for k, v in at_least.items()):
                return c
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {at_least}: {nonzero(c)}")
            time.sleep(0.002)

    def counters(self) -> dict[str, int]:
        return {**self.engine.stats(), **self.engine.offloads()}


class Bench:
    """Engines and plain peer sockets on loopback, one port.

    ``self.node``: the engine under test at 127.0.0.1, local subnet 10.5.1.0/24, routes to peer
    i's subnet 10.5.<10+i>.0/24 via 127.0.0.<2+i>. ``self.peers[i]``: a plain socket at
    127.0.0.<2+i> (no GRO: it gets one datagram per packet). With ``twin``, peer 0 is a second
    engine instead (``self.twin``, local subnet 10.5.10.0/24, route back to 10.5.1.0/24).
    """

    def __init__(
        self,
        *,
        vnet_hdr: bool = True,
        offload: str = "auto",
        npeers: int = 2,
        twin: bool = False,
        twin_vnet_hdr: bool = True,
        twin_offload: str = "auto",
        start: bool = True,
        uso: bool = False,
    ) -> None:
        self._closers: list[Callable[[], None]] = []
        #: what the fake TUNs "accepted" (TUNSETOFFLOAD): uso adds uso4+uso6 (UDP coalescing)
        self.tun_offloads = frozenset({"csum", "tso4"} | ({"uso4", "uso6"} if uso else set()))
        try:
            addrs = ["127.0.0.1", *(str(peer_ip(i)) for i in range(npeers))]
            self.port, socks = _free_port(addrs)
            self._closers += [s.close for s in socks]
            for s in socks:
                _grow(s)
            self.node = self._node(socks[0], LOCAL_SUBNET, LOCAL_ADDR, vnet_hdr, offload)
            for i in range(npeers):
                self.node.engine.set_route(peer_subnet(i), peer_ip(i))
            self.peers = socks[1:]
            for s in self.peers:
                s.settimeout(10)
            self.twin: Node | None = None
            if twin:
                sub = peer_subnet(0)
                self.twin = self._node(
                    socks[1], sub, sub.network_address, twin_vnet_hdr, twin_offload
                )
                self.twin.engine.set_route(LOCAL_SUBNET, IPv4Address("127.0.0.1"))
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    def _node(
        self,
        udp: socket.socket,
        subnet: IPv4Network,
        addr: IPv4Address,
        vnet_hdr: bool,
        offload: str,
    ) -> Node:
        tun_engine, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._closers += [tun.close, tun_engine.close]
        for s in (tun_engine, tun):
            _grow(s)
        tun_engine.setblocking(False)
        udp.setblocking(False)
        e = make_engine(
            "c",
            EngineConfig(
                tun_fd=tun_engine.fileno(),
                udp_fd=udp.fileno(),
                local_subnet=subnet,
                local_addr=addr,
                port=udp.getsockname()[1],
                mtu=MTU,
                offload=offload,
                vnet_hdr=vnet_hdr,
                tun_offloads=self.tun_offloads if vnet_hdr else frozenset(),
            ),
        )
        assert isinstance(e, CEngine)
        self._closers.append(e.stop)
        return Node(e, tun, tun_engine, udp, vnet_hdr)

    def start(self) -> None:
        self.node.engine.start()
        if self.twin is not None:
            self.twin.engine.start()

    def from_peer(self, i: int, timeout: float = 10.0) -> bytes:
        self.peers[i].settimeout(timeout)
        return self.peers[i].recv(70000)

    def peer_send(self, i: int, pkt: bytes) -> None:
        self.peers[i].sendto(pkt, ("127.0.0.1", self.port))

    def peer_send_gso(self, i: int, pkts: Sequence[bytes]) -> None:
        """One sendmsg with UDP_SEGMENT: all but the last of one size, the last not longer."""
        size = len(pkts[0])
        assert all(len(p) == size for p in pkts[:-1]) and len(pkts[-1]) <= size
        self.peers[i].sendmsg(
            [b"".join(pkts)],
            [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))],
            0,
            ("127.0.0.1", self.port),
        )

    def close(self) -> None:
        for fn in reversed(self._closers):
            with contextlib.suppress(Exception):
                fn()
        self._closers.clear()


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench()
    try:
        yield b
    finally:
        b.close()


def collect_peer(b: Bench, i: int, n: int) -> list[bytes]:
    return [b.from_peer(i) for _ in range(n)]


# --- TUN side: TSO split ------------------------------------------------------------------------


@pytest.mark.parametrize("offload", ["auto", "off"])
@pytest.mark.parametrize(
    ("size", "mss", "flags", "options"),
    [
        (20000, 1400, "PA", ()),  # last segment short (400)
        (14000, 1400, "A", ()),  # exact multiple: all full
        (1000, 1400, "PA", ()),  # one segment only
        (9001, 1388, "FPA", TS_OPTS),  # timestamps; FIN+PSH only on the last
        (7000, 1000, "EA", ()),  # ECE on all
        (4001, 999, "A", ()),  # odd MSS and length: odd-length payload checksums
    ],
    ids=["short-last", "exact", "single", "timestamps-fin", "ece", "odd"],
)
def test_tso_split(offload: str, size: int, mss: int, flags: str, options: Any) -> None:
    """A super-packet read from the TUN leaves as MSS segments, each one datagram, each exactly
    what a correct segmentation gives (lengths, ids, seq, flags, checksums), TTL-1."""
    b = Bench(offload=offload)
    try:
        data = bytes((i * 7 + 3) & 0xFF for i in range(size))
        pkt = tcp_packet(local_host(), peer_host(0), data, flags=flags, options=options)
        b.node.to_tun(tso_read(pkt, mss))
        want = expected_segments(pkt, mss)
        got = collect_peer(b, 0, len(want))
        assert [len(g) for g in got] == [len(w) for w in want]
        for g, w in zip(got, want, strict=True):
            assert g == w
            assert checksums_ok(g)
        assert b"".join(bytes(IP(g)[TCP].payload) for g in got) == data
        seqs = [IP(g)[TCP].seq for g in got]
        assert seqs == [1000 + i * mss for i in range(len(want))]
        c = b.node.wait(udp_tx_packets=len(want), tso_segments=len(want))
        assert c["tun_rx_packets"] == c["udp_tx_packets"] == len(want)
        assert c["tun_rx_bytes"] == c["udp_tx_bytes"] == sum(len(w) for w in want)
        assert c["tso_packets"] == 1
        if offload == "auto" and len(want) > 1:
            assert c["gso_sends"] == 1 and c["gso_segments"] == len(want)
        else:
            assert c["gso_sends"] == 0
        assert not any(c[k] for k in c if k.startswith("drop_"))
    finally:
        b.close()


def test_tso_cwr_on_first_only_and_ip_options(bench: Bench) -> None:
    """CWR (GSO_ECN set) stays on the first segment only; an IPv4 header with options is copied
    into every segment."""
    data = bytes(range(256)) * 20
    pkt = tcp_packet(local_host(), peer_host(1), data, flags="CA")
    b = bench
    b.node.to_tun(tso_read(pkt, 1200, ecn=True))
    want = expected_segments(pkt, 1200)
    got = collect_peer(b, 1, len(want))
    assert got == want
    assert [bool(IP(g)[TCP].flags.C) for g in got] == [True] + [False] * (len(want) - 1)
    # IPv4 options (record route): copied into every segment
    opt = bytes(
        IP(src=local_host(), dst=peer_host(1), id=9, options=[IPOption_RR()])
        / TCP(seq=5, flags="A")
        / Raw(data[:3000])
    )
    assert (opt[0] & 15) > 5
    b.node.to_tun(tso_read(opt, 1000))
    want = expected_segments(opt, 1000)
    got = collect_peer(b, 1, len(want))
    assert got == want and all(checksums_ok(g) for g in got)


def test_needs_csum_completed(bench: Bench) -> None:
    """Non-GSO packets with NEEDS_CSUM get their TCP/UDP checksum completed; plain packets (zero
    header) pass unchanged."""
    b = bench
    tcp = tcp_packet(local_host(), peer_host(0), b"hello, odd length!!", flags="PA")
    udp = udp_packet(local_host(), peer_host(0), b"x" * 333)
    for pkt in (tcp, udp):
        ihl = (pkt[0] & 15) * 4
        off = 16 if pkt[9] == 6 else 6
        b.node.to_tun(VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, ihl, off) + set_partial(pkt))
        got = b.from_peer(0)
        assert got == dec_ttl(pkt) and checksums_ok(got)
    b.node.to_tun(ZERO_VNET + udp)
    assert b.from_peer(0) == dec_ttl(udp)
    c = b.node.wait(udp_tx_packets=3)
    assert c["csum_completed"] == 2 and c["tso_packets"] == 0


def test_partial_checksums_to_a_peer_that_takes_them() -> None:
    """A route set with partial_csum (the peer's lease advertises it): TSO segments and NEEDS_CSUM
    packets leave with the checksum field holding the pseudo-header sum, no pass over their
    payload. Completed by the reference (the kernel's way) they equal, byte for byte, what a peer
    without it gets: fully checksummed packets, as before."""
    b = Bench(start=False)
    try:
        b.node.engine.set_route(peer_subnet(0), peer_ip(0), partial_csum=True)
        b.start()
        data = bytes((i * 7) & 0xFF for i in range(9001))
        for peer in (0, 1):
            tcp = tcp_packet(local_host(), peer_host(peer), b"hello, odd length!!", flags="PA")
            udp = udp_packet(local_host(), peer_host(peer), b"x" * 333)
            sup = tcp_packet(local_host(), peer_host(peer), data, options=TS_OPTS, flags="PA")
            want = expected_segments(sup, 1388)
            b.node.to_tun(tso_read(sup, 1388))
            got = collect_peer(b, peer, len(want))
            singles = []
            for pkt in (tcp, udp):
                ihl = (pkt[0] & 15) * 4
                off = 16 if pkt[9] == 6 else 6
                b.node.to_tun(VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, ihl, off) + set_partial(pkt))
                singles.append((pkt, b.from_peer(peer)))
            if peer == 1:  # complete checksums, exactly as without the capability
                assert got == want and all(checksums_ok(g) for g in got)
                assert [g for _, g in singles] == [dec_ttl(p) for p, _ in singles]
                continue
            for g, w in zip(got, want, strict=True):
                assert g[36:38] == struct.pack("!H", pseudo_sum(g, len(g) - 20))
                assert not checksums_ok(g)
                assert complete_partial(g, 20, 16) == w
            for pkt, g in singles:
                ihl, off = 20, 16 if pkt[9] == 6 else 6
                assert g == dec_ttl(set_partial(pkt))
                assert complete_partial(g, ihl, off) == dec_ttl(pkt)
        n = len(expected_segments(sup, 1388))
        c = b.node.wait(udp_tx_packets=2 * (n + 2))
        assert (c["csum_partial_sent"], c["csum_completed"]) == (n + 2, n + 2), nonzero(c)
    finally:
        b.close()


def test_inner_checksums_not_verified_on_receive(bench: Bench) -> None:
    """The receive path makes no pass over payload bytes: the outer UDP checksum, checked by the
    kernel, covered them. A TCP segment whose own checksum is wrong (or left partial) is written
    with NEEDS_CSUM like any other, and coalesced into a run like any other; packets that are not
    TCP/UDP, a UDP datagram without checksum and a fragment are written as they came."""
    b = bench
    a = flow(3, mss=1000)
    bad = bytearray(a[1])
    bad[36:38] = b"\x12\x34"  # wrong TCP checksum in the middle of a run
    b.peer_send_gso(0, [a[0], bytes(bad), a[2]])
    hdr, sp = b.node.from_tun()
    check_super(hdr, sp, a)  # as if it had been right: the kernel computes a fresh one
    lone = bytearray(tcp_packet(peer_host(0), local_host(), b"lone", flags="PA"))
    lone[36:38] = b"\xde\xad"
    nocsum = bytearray(udp_packet(peer_host(0), local_host(), b"u" * 100))
    nocsum[26:28] = b"\0\0"  # UDP: no checksum
    frag = bytes(IP(src=peer_host(0), dst=local_host(), flags="MF") / UDP() / Raw(b"f" * 64))
    ping = bytes(IP(src=peer_host(0), dst=local_host()) / ICMP() / Raw(b"p" * 56))
    for pkt in (bytes(lone), bytes(nocsum), frag, ping):
        b.peer_send(0, pkt)
    h, p = b.node.from_tun()
    assert h == (F_NEEDS_CSUM, GSO_NONE, 40, 0, 20, 16) and checksums_ok(delivered((h, p)))
    assert delivered((h, p))[40:] == b"lone"
    for pkt in (bytes(nocsum), frag, ping):
        assert b.node.from_tun() == ((0,) * 6, dec_ttl(pkt))
    c = b.node.wait(tun_tx_packets=7)
    assert (c["tun_gso_writes"], c["tun_csum_writes"]) == (1, 1), nonzero(c)


def test_partial_checksums_between_two_engines() -> None:
    """Engine A sends partial checksums to engine B (its route says B takes them): B's writes,
    completed as the kernel completes them, are valid, and the byte stream is intact, for
    super-packets (coalesced) as for lone segments and UDP datagrams."""
    b = Bench(twin=True, npeers=1, start=False)
    try:
        assert b.twin is not None
        b.node.engine.set_route(peer_subnet(0), peer_ip(0), partial_csum=True)
        b.start()
        data = bytes(((i * 31) ^ (i >> 8)) & 0xFF for i in range(20000))
        sup = tcp_packet(local_host(), peer_host(0), data, flags="PA", options=TS_OPTS)
        read = tso_read(sup, 1388)
        b.node.to_tun(read)
        hdr, sp = b.twin.from_tun()  # the same super-packet, as without partial checksums
        assert sp == dec_ttl(read[10:], 2) and hdr == VNET.unpack(read[:10])
        assert checksums_ok(complete_partial(sp, 20, 16))
        assert bytes(IP(sp)[TCP].payload) == data
        small = tcp_packet(local_host(), peer_host(0), b"s" * 100, flags="PA")
        udp = udp_packet(local_host(), peer_host(0), b"d" * 999)
        for pkt in (small, udp):
            off = 16 if pkt[9] == 6 else 6
            b.node.to_tun(VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, off) + set_partial(pkt))
            assert delivered(b.twin.from_tun()) == dec_ttl(pkt, 2)
        ca = b.node.wait(csum_partial_sent=-(-20000 // 1388) + 2)
        assert ca["csum_completed"] == 0
        assert b.twin.wait(tun_csum_writes=2)["tun_gso_writes"] == 1
    finally:
        b.close()


@pytest.mark.parametrize(
    "read",
    [
        b"\x01\x01",  # shorter than the vnet header
        VNET.pack(1, GSO_TCPV4, 40, 0, 20, 16),  # GSO with gso_size 0
        VNET.pack(1, 5, 28, 1000, 20, 6),  # GSO_UDP_L4: never enabled, not handled
        VNET.pack(1, 0, 0, 0, 20, 5000),  # NEEDS_CSUM field past the end
    ],
    ids=["short", "gso-size-0", "uso", "csum-out-of-range"],
)
def test_bad_vnet_reads_dropped(bench: Bench, read: bytes) -> None:
    b = bench
    pkt = tcp_packet(local_host(), peer_host(0), b"z" * 3000)
    b.node.to_tun(read + (pkt if len(read) == 10 else b""))
    c = b.node.wait(drop_tun_malformed=1)
    assert c["vnet_errors"] == 1 and c["udp_tx_packets"] == 0
    # still alive and forwarding
    good = udp_packet(local_host(), peer_host(0), b"after")
    b.node.to_tun(ZERO_VNET + good)
    assert b.from_peer(0) == dec_ttl(good)


def test_tso_bad_super_packets_dropped(bench: Bench) -> None:
    b = bench
    pkt = tcp_packet(local_host(), peer_host(0), b"q" * 5000)
    wrong_len = bytearray(pkt)
    wrong_len[2:4] = struct.pack("!H", len(pkt) - 1)
    not_tcp = udp_packet(local_host(), peer_host(0), b"u" * 5000)
    fragment = tcp_packet(local_host(), peer_host(0), b"f" * 5000, ip_flags="MF")
    for bad in (bytes(wrong_len), not_tcp, fragment):
        b.node.to_tun(VNET.pack(1, GSO_TCPV4, 40, 1000, 20, 16) + bad)
    c = b.node.wait(drop_tun_malformed=3)
    assert c["tso_packets"] == 0 and c["udp_tx_packets"] == 0


def test_tso_ipv6_dropped_once(bench: Bench) -> None:
    b = bench
    v6 = bytes.fromhex("6000000000140640") + bytes(32) + bytes(20) + b"p" * 3000
    b.node.to_tun(VNET.pack(1, 4, 80, 1000, 40, 16) + v6)  # GSO_TCPV6
    c = b.node.wait(drop_tun_ipv6=1)
    assert c["tun_rx_packets"] == 1 and c["tso_packets"] == 0


def test_segments_go_through_classify(bench: Bench) -> None:
    """Each segment is routed, TTL-checked and counted on its own: no route -> one ICMP
    unreachable per segment, written into the TUN behind a zero vnet header."""
    b = bench
    pkt = tcp_packet(local_host(), "10.99.0.5", b"n" * 3500)
    b.node.to_tun(tso_read(pkt, 1400))
    want = expected_segments(pkt, 1400, ttl_dec=0)
    for w in want:
        hdr, icmp = b.node.from_tun()
        assert hdr == (0, 0, 0, 0, 0, 0)
        p = IP(icmp)
        assert p[ICMP].type == 3 and icmp[28:] == w[:28]  # quotes the segment's header + 8
        assert checksums_ok(icmp)
    c = b.node.wait(drop_no_route=3)
    assert c["icmp_unreachable_sent"] == 3 and c["tun_rx_packets"] == 3
    # TTL 1: time exceeded per segment
    b.node.to_tun(tso_read(tcp_packet(local_host(), peer_host(0), b"t" * 2500, ttl=1), 1400))
    for _ in range(2):
        assert IP(b.node.from_tun()[1])[ICMP].type == 11
    assert b.node.wait(drop_tun_ttl=2)["icmp_time_exceeded_sent"] == 2


# --- UDP GSO send ---------------------------------------------------------------------------------


def test_gso_runs_per_peer_and_size() -> None:
    """Packets queued before the loop starts are one batch: GSO groups consecutive same-peer
    packets of one size (the last of a run may be shorter); every peer gets one datagram per
    packet, in order."""
    b = Bench(start=False, npeers=2)
    try:
        p0 = [udp_packet(local_host(), peer_host(0), bytes([i]) * 1000) for i in range(5)]
        p0.append(udp_packet(local_host(), peer_host(0), b"s" * 300))  # shorter: ends the run
        p1 = [udp_packet(local_host(), peer_host(1), bytes([i]) * 1200) for i in range(3)]
        tail = [udp_packet(local_host(), peer_host(0), b"t" * 1000) for _ in range(2)]
        for pkt in p0 + p1 + tail:
            b.node.to_tun(ZERO_VNET + pkt)
        big = tcp_packet(local_host(), peer_host(1), bytes(range(256)) * 100)
        b.node.to_tun(tso_read(big, 1400))
        b.start()
        got0 = collect_peer(b, 0, len(p0) + len(tail))
        assert got0 == [dec_ttl(p) for p in p0 + tail]
        want1 = [dec_ttl(p) for p in p1] + expected_segments(big, 1400)
        assert collect_peer(b, 1, len(want1)) == want1
        c = b.node.wait(udp_tx_packets=len(got0) + len(want1))
        # runs: p0 (6), p1 (3), tail (2), big's segments (19) = 4 GSO sends
        assert (c["gso_sends"], c["gso_segments"]) == (4, 6 + 3 + 2 + 19), nonzero(c)
        assert c["udp_tx_batches"] == 1
    finally:
        b.close()


def test_gso_runs_keep_to_one_inner_flow() -> None:
    """A GSO send carries one inner flow only (same addresses, protocol and ports): the receiving
    kernel steers a whole GSO bundle to one engine thread by its first datagram, so flows mixed
    in one send could be split over threads and reordered."""
    b = Bench(start=False, npeers=1)
    try:

        def pkt(sport: int, i: int) -> bytes:
            return bytes(
                IP(src=local_host(), dst=peer_host(0))
                / UDP(sport=sport, dport=5000)
                / Raw(bytes([i]) * 1000)
            )

        sent = [pkt(4000, 0), pkt(4000, 1), pkt(4002, 2), pkt(4002, 3), pkt(4000, 4)]
        sent.append(bytes(IP(src=local_host(), dst=peer_host(0, 8)) / UDP(sport=4000, dport=5000)
                          / Raw(b"\x05" * 1000)))  # fmt: skip
        for p in sent:
            b.node.to_tun(ZERO_VNET + p)
        b.start()
        assert collect_peer(b, 0, len(sent)) == [dec_ttl(p) for p in sent]
        c = b.node.wait(udp_tx_packets=len(sent))
        # runs: [0 1] [2 3] [4] [5]: two GSO sends of two, two plain ones
        assert (c["gso_sends"], c["gso_segments"]) == (2, 4), nonzero(c)
    finally:
        b.close()


def test_gso_run_limits() -> None:
    """At most MAX_SEGMENTS packets and 65507 bytes per GSO send; oversize packets (> MTU) are
    sent alone."""
    b = Bench(start=False, npeers=1)
    try:
        small = [udp_packet(local_host(), peer_host(0), b"m" * 72) for _ in range(130)]  # 100 B
        big = [udp_packet(local_host(), peer_host(0), b"B" * 1400) for _ in range(50)]
        oversize = [udp_packet(local_host(), peer_host(0), b"O" * 3000) for _ in range(3)]
        pkts = small + big + oversize
        for pkt in pkts:
            b.node.to_tun(ZERO_VNET + pkt)
        b.start()
        assert collect_peer(b, 0, len(pkts)) == [dec_ttl(p) for p in pkts]
        c = b.node.wait(udp_tx_packets=len(pkts))
        # 130 = 64 + 64 + 2; 50 x 1428 B = 45 + 5 (45 * 1428 = 64260 <= 65507 < 46 * 1428)
        assert c["gso_sends"] == 5 and c["gso_segments"] == 180, nonzero(c)
    finally:
        b.close()


def test_gso_refused_turns_off_and_resends() -> None:
    """SO_NO_CHECK makes the kernel refuse GSO sends (EINVAL): the engine turns GSO off, counts
    it once, and every packet still arrives, one datagram each."""
    b = Bench(start=False)
    try:
        b.node.udp.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        b.start()
        assert b.node.engine.offloads()["udp_gso"] == 1
        pkt = tcp_packet(local_host(), peer_host(0), bytes(range(256)) * 40, flags="PA")
        b.node.to_tun(tso_read(pkt, 1300))
        want = expected_segments(pkt, 1300)
        assert collect_peer(b, 0, len(want)) == want
        c = b.node.wait(udp_tx_packets=len(want))
        assert (c["udp_gso"], c["gso_errors"], c["gso_errno"]) == (0, 1, errno.EINVAL)
        assert c["gso_sends"] == 0 and c["udp_tx_errors"] == 0
        b.node.to_tun(tso_read(pkt, 1300))
        assert collect_peer(b, 0, len(want)) == want
        assert b.node.wait(udp_tx_packets=2 * len(want))["gso_errors"] == 1
        st = offload_status(b.node.engine)
        assert "udp_gso" not in st["active"] and "udp_gro" in st["active"]
    finally:
        b.close()


# --- UDP GRO receive + coalesced TUN writes ------------------------------------------------------


def flow(
    n: int, mss: int = 1400, last: int | None = None, seq0: int = 7000, id0: int = 300, **kw: Any
) -> list[bytes]:
    """n consecutive segments peer 0 -> local of one flow (the last of ``last`` bytes)."""
    out = []
    seq = seq0
    for i in range(n):
        size = last if (last is not None and i == n - 1) else mss
        data = bytes(((seq + j) * 13) & 0xFF for j in range(size))
        out.append(tcp_packet(peer_host(0), local_host(), data, seq=seq, ip_id=id0 + i, **kw))
        seq += size
    return out


def check_super(hdr: tuple[int, ...] | None, sp: bytes, segs: Sequence[bytes]) -> None:
    """sp (written with vnet header hdr) is the coalesced form of segs (as sent, TTL not yet
    decremented): the first's headers with the total length, TTL-1, the PSH of the last and the
    pseudo-header sum as checksum; then every segment's payload."""
    assert hdr is not None
    first = segs[0]
    hl = headers_len(first)
    mss = len(first) - hl
    assert hdr == (F_NEEDS_CSUM, GSO_TCPV4, hl, mss, 20, 16)
    assert len(sp) == hl + sum(len(s) - hl for s in segs)
    assert sp[hl:] == b"".join(s[hl:] for s in segs)
    head = bytearray(dec_ttl(first)[:hl])
    head[2:4] = struct.pack("!H", len(sp))
    head[10:12] = b"\0\0"
    head[10:12] = struct.pack("!H", 0xFFFF ^ inet_sum(bytes(head[:20])))
    head[33] |= segs[-1][33] & 0x08
    head[36:38] = struct.pack("!H", pseudo_sum(sp, len(sp) - 20))
    assert sp[:hl] == bytes(head)
    assert checksums_ok(complete_partial(sp, 20, 16))


Write = tuple[tuple[int, ...] | None, bytes]


def delivered(write: Write) -> bytes:
    """The packet a single TUN write stands for, as the kernel delivers it. A write with offload
    auto carries a TCP/UDP packet with NEEDS_CSUM: its header must say exactly where the checksum
    is, the field must hold the pseudo-header sum, and the packet is completed the kernel's way
    (``complete_partial``, the reference). Other writes carry the packet as it is."""
    hdr, pkt = write
    if hdr is None or hdr == (0,) * 6:
        return pkt
    ihl = (pkt[0] & 15) * 4
    off = 16 if pkt[9] == 6 else 6
    l4hdr = (pkt[ihl + 12] >> 4) * 4 if pkt[9] == 6 else 8
    assert hdr == (F_NEEDS_CSUM, GSO_NONE, ihl + l4hdr, 0, ihl, off), hdr
    assert pkt[ihl + off : ihl + off + 2] == struct.pack("!H", pseudo_sum(pkt, len(pkt) - ihl))
    return complete_partial(pkt, ihl, off)


def segments_of(writes: Sequence[Write]) -> list[bytes]:
    """The packets the writes stand for: a GSO write cut up again (as the kernel would), TTL
    kept; plain writes as they are."""
    out = []
    for hdr, pkt in writes:
        if hdr is not None and hdr[1] == GSO_TCPV4:
            out += expected_segments(pkt, hdr[3], ttl_dec=0)
        elif hdr is not None and hdr[1] == GSO_UDP_L4:
            out += expected_datagrams(pkt, hdr[3], ttl_dec=0)
        else:
            out.append(delivered((hdr, pkt)))
    return out


def read_writes(node: Node, n_packets: int) -> list[Write]:
    """TUN writes until they stand for n_packets packets."""
    out: list[Write] = []
    while len(segments_of(out)) < n_packets:
        out.append(node.from_tun())
    return out


def shape(writes: Sequence[Write]) -> list[tuple[int | None, int]]:
    """(gso_type or None, packets) per write."""
    return [(h[1] if h else None, len(segments_of([(h, p)]))) for h, p in writes]


def test_gro_read_coalesced_into_one_write(bench: Bench) -> None:
    """One GSO send from a peer = one GRO read: split, validated, and written as one super-packet
    (PSH of the last segment kept)."""
    b = bench
    segs = flow(10, last=600, flags="A")
    segs[-1] = tcp_packet(
        peer_host(0), local_host(), segs[-1][40:], seq=IP(segs[-1])[TCP].seq, ip_id=309, flags="PA"
    )
    b.peer_send_gso(0, segs)
    hdr, sp = b.node.from_tun()
    check_super(hdr, sp, segs)
    assert IP(sp)[TCP].flags.P
    c = b.node.wait(tun_gso_writes=1)
    assert (c["gro_reads"], c["gro_segments"]) == (1, 10)
    assert (c["udp_rx_packets"], c["tun_tx_packets"], c["tun_gso_segments"]) == (10, 10, 10)
    assert c["udp_rx_bytes"] == c["tun_tx_bytes"] == sum(len(s) for s in segs)
    assert b.node.tun_empty()


def test_coalesce_with_timestamps_and_ece(bench: Bench) -> None:
    b = bench
    segs = flow(6, last=100, options=TS_OPTS, flags="EA")
    b.peer_send_gso(0, segs)
    hdr, sp = b.node.from_tun()
    check_super(hdr, sp, segs)
    assert headers_len(sp) == 52


def test_coalesce_breaks() -> None:
    """What ends a run: another flow in the middle, a gap or a step back (out of order), PSH (it
    is the last), another ack, CWR. The packets stay in order and unchanged; the ones written
    alone go with NEEDS_CSUM (``delivered`` checks and completes them)."""
    b = Bench(start=False)
    try:
        a = flow(14, mss=1000)
        other = tcp_packet(peer_host(0, 9), local_host(), b"o" * 1000, seq=1, sport=1234)

        def variant(p: bytes, **kw: Any) -> bytes:
            q = IP(p)
            args: dict[str, Any] = {"seq": q[TCP].seq, "ip_id": q.id, "flags": str(q[TCP].flags)}
            args.update(kw)
            return tcp_packet(peer_host(0), local_host(), bytes(q[TCP].payload), **args)

        sent = [
            a[0], a[1], other, a[2], a[3],  # another flow's segment in the middle
            a[5], a[4],  # out of order
            a[6], variant(a[7], flags="PA"),  # PSH on the last: still one run
            a[8], variant(a[9], ack=1),  # another ack
            a[10], a[11], a[12],  # one run
            variant(a[13], flags="CA"),  # CWR: alone
        ]  # fmt: skip
        for p in sent:
            b.peer_send(0, p)
        b.start()
        writes = read_writes(b.node, len(sent))
        assert segments_of(writes) == [dec_ttl(p) for p in sent]
        G, N = GSO_TCPV4, GSO_NONE
        assert shape(writes) == [
            (G, 2), (N, 1), (G, 2),  # [a0 a1] other [a2 a3]
            (N, 1), (N, 1),  # a5, a4
            (G, 2),  # [a6 a7+PSH]
            (N, 1), (N, 1),  # a8, a9 with another ack
            (G, 3),  # [a10 a11 a12]
            (N, 1),  # a13 CWR
        ]  # fmt: skip
        check_super(*writes[0], sent[0:2])
        check_super(*writes[5], sent[7:9])
        check_super(*writes[8], sent[11:14])
        c = b.node.wait(tun_tx_packets=len(sent))
        assert c["tun_gso_writes"] == 4 and c["tun_csum_writes"] == 6
        assert c["tun_tx_packets"] == len(sent) and c["tun_gso_segments"] == 9
    finally:
        b.close()


@pytest.mark.parametrize(
    "change",
    ["window", "timestamp", "ip_id", "longer", "ttl", "tos", "syn", "fin", "rst", "urg", "no-df"],
)
def test_coalesce_refuses(change: str) -> None:
    """Two segments that differ in one way that matters are written separately."""
    b = Bench(start=False)
    try:
        a0, a1 = flow(2, mss=1000, options=TS_OPTS)
        q = IP(a1)
        kw: dict[str, Any] = {"seq": q[TCP].seq, "ip_id": q.id, "options": TS_OPTS}
        data = bytes(q[TCP].payload)
        if change == "window":
            kw["window"] = 1000
        elif change == "timestamp":
            kw["options"] = [("NOP", None), ("NOP", None), ("Timestamp", (4243, 77))]
        elif change == "ip_id":
            kw["ip_id"] = q.id + 5
        elif change == "longer":
            data += b"+"
        elif change == "ttl":
            kw["ttl"] = 63
        elif change == "tos":
            kw["tos"] = 2
        elif change == "no-df":
            kw["ip_flags"] = 0
        else:
            kw["flags"] = {"syn": "SA", "fin": "FA", "rst": "RA", "urg": "UA"}[change]
        a1 = tcp_packet(peer_host(0), local_host(), data, **kw)
        b.peer_send(0, a0)
        b.peer_send(0, a1)
        b.start()
        w = [b.node.from_tun(), b.node.from_tun()]
        assert [h[1] for h, _ in w if h] == [GSO_NONE, GSO_NONE]
        assert [delivered(x) for x in w] == [dec_ttl(a0), dec_ttl(a1)]
    finally:
        b.close()


def test_coalesce_limits() -> None:
    """At most MAX_SEGMENTS segments and 65535 bytes per coalesced write."""
    b = Bench(start=False)
    try:
        tiny = flow(70, mss=100, id0=1)
        big = flow(50, mss=1400, seq0=10_000_000, id0=2000)
        for p in tiny + big:
            b.peer_send(0, p)
        b.start()
        writes = read_writes(b.node, len(tiny) + len(big))
        assert segments_of(writes) == [dec_ttl(p) for p in tiny + big]
        # 46 * 1400 + 40 = 64440 <= 65535 < 47 * 1400 + 40
        assert shape(writes) == [(GSO_TCPV4, 64), (GSO_TCPV4, 6), (GSO_TCPV4, 46), (GSO_TCPV4, 4)]
    finally:
        b.close()


def test_gro_every_datagram_validated() -> None:
    """A GRO read holding bad datagrams: every receive check applies to each one (wrong peer,
    unknown source, bad header checksum, not local, bad length, TTL 1), the good ones are
    delivered, and each drop is counted once."""
    b = Bench()
    try:
        size = 600

        def pkt(src: str, dst: str, ttl: int = 64) -> bytes:
            return udp_packet(src, dst, b"g" * (size - 28), ttl=ttl)

        good1 = pkt(peer_host(0, 3), local_host(4))
        wrong_peer = pkt(peer_host(1), local_host())
        unknown = pkt("10.77.0.1", local_host())
        bad_sum = bytearray(pkt(peer_host(0), local_host()))
        bad_sum[10] ^= 1
        not_local = pkt(peer_host(0), "10.5.2.9")
        bad_len = bytearray(pkt(peer_host(0), local_host()))
        bad_len[2:4] = struct.pack("!H", size - 2)
        bad_len[10:12] = b"\0\0"
        bad_len[10:12] = struct.pack("!H", 0xFFFF ^ inet_sum(bytes(bad_len[:20])))
        ttl1 = pkt(peer_host(0), local_host(), ttl=1)
        good2 = pkt(peer_host(0, 5), local_host(6))
        short = b"\x45" * 10
        batch = [
            good1, wrong_peer, unknown, bytes(bad_sum), not_local, bytes(bad_len), ttl1, good2,
            short,
        ]  # fmt: skip
        b.peer_send_gso(0, batch)
        assert delivered(b.node.from_tun()) == dec_ttl(good1)
        assert delivered(b.node.from_tun()) == dec_ttl(good2)
        icmp = b.from_peer(0)  # time exceeded back to the sending peer
        assert IP(icmp)[ICMP].type == 11 and icmp[28:] == ttl1[:28]
        c = b.node.wait(udp_rx_packets=9, tun_tx_packets=2)
        for k in (
            "drop_udp_wrong_peer",
            "drop_udp_unknown_src",
            "drop_udp_bad_checksum",
            "drop_udp_not_local",
            "drop_udp_bad_length",
            "drop_udp_ttl",
            "drop_udp_short",
        ):
            assert c[k] == 1, (k, nonzero(c))
        assert (c["gro_reads"], c["gro_segments"]) == (1, 9)
    finally:
        b.close()


def test_gro_from_wrong_sender_dropped() -> None:
    """A GRO read from a sender that is not the peer owning the inner sources: all dropped."""
    b = Bench()
    try:
        segs = flow(5)
        b.peer_send_gso(1, segs)  # peer 1 sends peer 0's packets
        c = b.node.wait(drop_udp_wrong_peer=5)
        assert c["tun_tx_packets"] == 0 and b.node.tun_empty()
    finally:
        b.close()


def test_no_vnet_hdr_no_coalescing() -> None:
    """offload auto on a TUN without vnet header: GRO reads are split, packets written one by one
    (bare); GSO still used for sending."""
    b = Bench(vnet_hdr=False)
    try:
        assert offload_status(b.node.engine)["active"] == ["udp_gso", "udp_gro"]
        segs = flow(5)
        b.peer_send_gso(0, segs)
        for s in segs:
            assert b.node.from_tun() == (None, dec_ttl(s))
        c = b.node.wait(tun_tx_packets=5)
        assert c["gro_reads"] == 1 and c["tun_gso_writes"] == 0 and c["tun_gso"] == 0
    finally:
        b.close()


def test_offload_off_with_vnet_hdr() -> None:
    """vnet header but offload off: every write gets a zero header, nothing is coalesced, no GRO
    on the socket (a GSO send from a peer arrives as separate datagrams)."""
    b = Bench(offload="off")
    try:
        o = b.node.engine.offloads()
        assert (o["vnet_hdr"], o["udp_gso"], o["udp_gro"], o["tun_gso"]) == (1, 0, 0, 0)
        segs = flow(4)
        b.peer_send_gso(0, segs)
        for s in segs:
            assert b.node.from_tun() == ((0,) * 6, dec_ttl(s))
        assert b.node.wait(tun_tx_packets=4)["gro_reads"] == 0
    finally:
        b.close()


def test_tun_refuses_gso_write_falls_back() -> None:
    """A TUN that refuses a coalesced write (here: the socketpair refuses datagrams larger than its
    small send buffer, EMSGSIZE) turns coalescing off for good; the packets are written one by
    one and nothing is lost."""
    b = Bench(start=False)
    try:
        b.node.tun_engine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        b.start()
        segs = flow(20)  # 28 KiB coalesced > the 16 KiB the kernel allows for 8192 asked
        b.peer_send_gso(0, segs)
        got = [b.node.from_tun() for _ in segs]
        assert [delivered(g) for g in got] == [dec_ttl(s) for s in segs]
        assert all(h and h[1] == GSO_NONE for h, _ in got)
        c = b.node.wait(tun_tx_packets=len(segs))
        assert (c["tun_gso"], c["tun_gso_errors"], c["tun_gso_errno"]) == (0, 1, errno.EMSGSIZE)
        assert c["tun_gso_writes"] == 0 and c["tun_tx_errors"] == 0
        b.peer_send_gso(0, segs)
        assert [b.node.from_tun() for _ in segs] == got
        assert b.node.wait(tun_tx_packets=2 * len(segs))["tun_gso_errors"] == 1
        assert "tun_gso" not in offload_status(b.node.engine)["active"]
    finally:
        b.close()


def test_vector_full_tso_reads_continue_next_batch() -> None:
    """Super-packets with a tiny MSS fill the segment vector: reading stops before it overflows
    and goes on in the next batch; every segment arrives, in order."""
    b = Bench(start=False, npeers=1)
    try:
        b.peers[0].setsockopt(SOL_UDP, UDP_GRO, 1)  # whole GSO sends: no receive buffer overrun
        want: list[bytes] = []
        for k in range(8):  # 8 x 400 segments: more than one vector holds
            data = bytes((k * 5 + i) & 0xFF for i in range(40000))
            pkt = tcp_packet(local_host(), peer_host(0), data, seq=k * 40000, ip_id=k * 400)
            b.node.to_tun(tso_read(pkt, 100))
            want += expected_segments(pkt, 100)
        b.start()
        got: list[bytes] = []
        while len(got) < len(want):
            got += recv_gro(b.peers[0])
        assert got == want
        c = b.node.wait(udp_tx_packets=len(want))
        assert c["tun_rx_batches"] == 2 and c["tso_segments"] == 3200
    finally:
        b.close()


def recv_gro(sock: socket.socket) -> list[bytes]:
    """One read of a UDP_GRO socket, split into its datagrams."""
    data, anc, _flags, _addr = sock.recvmsg(70000, socket.CMSG_SPACE(4))
    size = next(
        (struct.unpack("=i", d)[0] for lvl, t, d in anc if (lvl, t) == (SOL_UDP, UDP_GRO)), 0
    )
    if not size:
        return [data]
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_gro_split_resumes_when_vector_full() -> None:
    """GRO reads holding more datagrams than one vector: splitting stops in the middle of a read
    and resumes there (also across a stalled TUN); all delivered in order, each validated. Needs
    reads of > 64 datagrams: kernels whose UDP GSO takes 128 segments per send (6.x)."""
    b = Bench(start=False, npeers=1)
    try:
        b.node.udp.setsockopt(SOL_UDP, UDP_GRO, 1)  # queued as GRO reads before the loop runs
        b.node.tun_engine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # stalls
        per, reads = 100, 50  # 5000 datagrams in one batch of reads: the vector holds 4096
        pkts = [
            udp_packet(peer_host(0), local_host(), i.to_bytes(4, "big")) for i in range(per * reads)
        ]
        try:
            b.peer_send_gso(0, pkts[:per])
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                pytest.skip("this kernel takes at most 64 segments per UDP GSO send")
            raise
        for m in range(1, reads):
            b.peer_send_gso(0, pkts[m * per : (m + 1) * per])
        b.start()
        got = [delivered(b.node.from_tun()) for _ in pkts]
        assert got == [dec_ttl(p) for p in pkts]
        c = b.node.wait(tun_tx_packets=len(pkts))
        assert (c["gro_reads"], c["gro_segments"], c["udp_rx_packets"]) == (reads, 5000, 5000)
        assert c["udp_rx_batches"] == 1 and c["tun_tx_stalls"] >= 1, nonzero(c)
    finally:
        b.close()


# --- inner UDP: USO reads, coalesced GSO_UDP_L4 writes ------------------------------------------

GSO_UDP_L4 = 5


def udp_super(src: str, dst: str, payload: bytes, *, ip_id: int = 500, sport: int = 4000) -> bytes:
    """A UDP super-packet as a TUN with USO hands it over: one IPv4 + UDP header for all."""
    return bytes(
        IP(src=src, dst=dst, id=ip_id, flags="DF") / UDP(sport=sport, dport=5000) / Raw(payload)
    )


def uso_read(pkt: bytes, gso: int) -> bytes:
    return VNET.pack(F_NEEDS_CSUM, GSO_UDP_L4, 28, gso, 20, 6) + set_partial(pkt)


def expected_datagrams(pkt: bytes, gso: int, ttl_dec: int = 1) -> list[bytes]:
    """The datagrams the kernel's UDP GSO makes of pkt (id + i, lengths, checksums), by scapy."""
    p = IP(pkt)
    data = bytes(p[UDP].payload)
    out = []
    for i in range(-(-len(data) // gso)):
        q = IP(src=p.src, dst=p.dst, id=(p.id + i) & 0xFFFF, ttl=p.ttl - ttl_dec, tos=p.tos,
               flags=p.flags)  # fmt: skip
        u = UDP(sport=p[UDP].sport, dport=p[UDP].dport)
        out.append(bytes(q / u / Raw(data[i * gso : (i + 1) * gso])))
    return out


def test_uso_read_split_into_datagrams(bench: Bench) -> None:
    """A GSO_UDP_L4 read is cut into its datagrams, each a complete, valid UDP datagram (for a
    peer without partial-csum), the last one shorter; one GSO send carries them."""
    b = bench
    pkt = udp_super(local_host(), peer_host(0), bytes(range(256)) * 14 + b"tail")  # 3588 bytes
    b.node.to_tun(uso_read(pkt, 1000))
    want = expected_datagrams(pkt, 1000)
    got = collect_peer(b, 0, len(want))
    assert got == want and all(checksums_ok(g) for g in got)
    c = b.node.wait(udp_tx_packets=4)
    assert (c["uso_packets"], c["uso_segments"], c["gso_sends"]) == (1, 4, 1), nonzero(c)
    assert c["csum_completed"] == 4


def test_uso_read_malformed_dropped(bench: Bench) -> None:
    b = bench
    tcp = tcp_packet(local_host(), peer_host(0), b"t" * 3000)
    b.node.to_tun(VNET.pack(F_NEEDS_CSUM, GSO_UDP_L4, 28, 1000, 20, 6) + tcp)  # not UDP
    pkt = udp_super(local_host(), peer_host(0), b"u" * 3000)
    b.node.to_tun(VNET.pack(F_NEEDS_CSUM, GSO_UDP_L4, 28, 0, 20, 6) + pkt)  # gso_size 0
    c = b.node.wait(drop_tun_malformed=2)
    assert c["vnet_errors"] == 2 and c["udp_tx_packets"] == 0


def test_udp_flow_coalesced_into_one_write() -> None:
    """Datagrams of one UDP flow (ids one up each, one size, the last may be shorter) received in
    one GRO read are written as one GSO_UDP_L4 packet; cut up the kernel's way it gives back
    exactly the datagrams (TTL-1)."""
    b = Bench(uso=True)
    try:
        pkt = udp_super(peer_host(0), local_host(), bytes(range(200)) * 50 + b"end")
        dgrams = expected_datagrams(pkt, 1200, ttl_dec=0)
        b.peer_send_gso(0, dgrams)
        hdr, sp = b.node.from_tun()
        assert hdr == (F_NEEDS_CSUM, GSO_UDP_L4, 28, 1200, 20, 6)
        assert len(sp) == 28 + sum(len(d) - 28 for d in dgrams)
        assert sp[24:26] == struct.pack("!H", len(sp) - 20)
        assert sp[26:28] == struct.pack("!H", pseudo_sum(sp, len(sp) - 20))
        assert expected_datagrams(sp, 1200, ttl_dec=0) == [dec_ttl(d) for d in dgrams]
        c = b.node.wait(tun_uso_writes=1)
        assert (c["tun_uso_segments"], c["tun_tx_packets"]) == (len(dgrams), len(dgrams))
    finally:
        b.close()


def test_udp_coalesce_breaks() -> None:
    """Another flow, an id that is not one up, a longer datagram, no checksum: each ends a run
    (or stays alone); everything arrives, in order, unchanged."""
    b = Bench(uso=True, start=False)
    try:
        a = expected_datagrams(udp_super(peer_host(0), local_host(), b"a" * 6000), 1000, 0)
        other = expected_datagrams(
            udp_super(peer_host(0), local_host(), b"o" * 1000, sport=4001, ip_id=900), 1000, 0
        )[0]
        gap = expected_datagrams(
            udp_super(peer_host(0), local_host(), b"a" * 1000, ip_id=a[3][5] + 5), 1000, 0
        )[0]
        longer = expected_datagrams(
            udp_super(peer_host(0), local_host(), b"l" * 1100, ip_id=506), 1100, 0
        )[0]
        nocsum = bytearray(expected_datagrams(
            udp_super(peer_host(0), local_host(), b"n" * 1000, ip_id=507), 1000, 0
        )[0])  # fmt: skip
        nocsum[26:28] = b"\0\0"
        sent = [a[0], a[1], other, a[2], a[3], gap, a[4], longer, bytes(nocsum), a[5]]
        for p in sent:
            b.peer_send(0, p)
        b.start()
        writes = read_writes(b.node, len(sent))
        assert segments_of(writes) == [dec_ttl(p) for p in sent]
        U, N = GSO_UDP_L4, GSO_NONE
        assert [(h[1] if h else None) for h, _ in writes] == [U, N, U, N, N, N, N, N]
    finally:
        b.close()


# --- through two engines ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "mss", "opts"),
    [(30 * 1400 - 17, 1400, ()), (20000, 1388, TS_OPTS), (40 * 1000, 1000, ())],
    ids=["short-last", "timestamps", "exact"],
)
def test_split_and_recoalesce_identical(size: int, mss: int, opts: Any) -> None:
    """A super-packet read by engine A is split, sent with GSO, received by engine B with GRO and
    re-coalesced: B writes the same super-packet (TTL-2, header checksum updated), byte for
    byte, with the same vnet header."""
    b = Bench(twin=True, npeers=1)
    try:
        assert b.twin is not None
        data = bytes(((i * 31) ^ (i >> 8)) & 0xFF for i in range(size))
        pkt = tcp_packet(local_host(), peer_host(0), data, flags="PA", options=opts, ip_id=65530)
        read = tso_read(pkt, mss)
        b.node.to_tun(read)
        hdr, sp = b.twin.from_tun()
        original = read[10:]
        assert sp == dec_ttl(original, 2)
        assert hdr == VNET.unpack(read[:10])
        assert checksums_ok(complete_partial(sp, 20, 16))
        n = -(-len(data) // mss)
        ca = b.node.wait(gso_segments=n)
        cb = b.twin.wait(tun_gso_segments=n)
        assert (ca["tso_packets"], ca["gso_sends"]) == (1, 1)
        assert (cb["gro_reads"], cb["gro_segments"], cb["tun_gso_writes"]) == (1, n, 1)
    finally:
        b.close()


@pytest.mark.parametrize(
    ("a_offload", "b_vnet", "b_offload"),
    [("off", True, "auto"), ("auto", True, "off"), ("auto", False, "auto"), ("off", False, "off")],
)
def test_mixed_offloads_stream_identical(a_offload: str, b_vnet: bool, b_offload: str) -> None:
    """Whatever each side has on, the TCP byte stream and every segment arrive intact."""
    b = Bench(twin=True, npeers=1, offload=a_offload, twin_vnet_hdr=b_vnet, twin_offload=b_offload)
    try:
        assert b.twin is not None
        stream = b""
        want: list[bytes] = []
        seq = 1
        for k in range(3):
            data = bytes((k + i) & 0xFF for i in range(15000 + k * 777))
            pkt = tcp_packet(local_host(), peer_host(0), data, seq=seq, ip_id=10 * k, flags="A")
            b.node.to_tun(tso_read(pkt, 1400))
            want += expected_segments(pkt, 1400, ttl_dec=2)
            stream += data
            seq += len(data)
        writes = read_writes(b.twin, len(want))
        for hdr, pkt in writes:
            if hdr is not None and hdr[1] == GSO_TCPV4:
                check_super(hdr, pkt, segments_of([(hdr, dec_ttl(pkt, -1))]))
        got = segments_of(writes)
        assert got == want
        assert b"".join(bytes(IP(g)[TCP].payload) for g in got) == stream
        assert all(checksums_ok(g) for g in got)
    finally:
        b.close()


def test_uso_split_and_recoalesce_identical() -> None:
    """A UDP super-packet read by engine A (USO) is split into datagrams, sent with GSO, received
    by engine B with GRO and coalesced again: B writes the same super-packet (TTL-2), with the
    same vnet header; the datagrams go partial (B advertises it) and come out valid."""
    b = Bench(twin=True, npeers=1, uso=True, start=False)
    try:
        assert b.twin is not None
        b.node.engine.set_route(peer_subnet(0), peer_ip(0), partial_csum=True)
        b.start()
        pkt = udp_super(local_host(), peer_host(0), bytes(i & 0xFF for i in range(30001)))
        read = uso_read(pkt, 1400)
        b.node.to_tun(read)
        hdr, sp = b.twin.from_tun()
        assert hdr == VNET.unpack(read[:10])
        assert sp == dec_ttl(read[10:], 2)
        assert all(checksums_ok(d) for d in expected_datagrams(sp, 1400, ttl_dec=0))
        ca = b.node.wait(uso_segments=22)
        assert ca["csum_partial_sent"] == 22 and ca["csum_completed"] == 0
        assert b.twin.wait(tun_uso_segments=22)["tun_uso_writes"] == 1
    finally:
        b.close()


# --- API ----------------------------------------------------------------------------------------


def test_make_engine_offload_arguments() -> None:
    a, c = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for s in (a, u):
            s.setblocking(False)
        cfg = EngineConfig(
            tun_fd=a.fileno(),
            udp_fd=u.fileno(),
            local_subnet=LOCAL_SUBNET,
            local_addr=LOCAL_ADDR,
            port=8285,
            mtu=MTU,
        )
        with pytest.raises(EngineError, match="unknown offload mode 'on'"):
            make_engine("c", replace(cfg, offload="on"))
        with pytest.raises(EngineError, match="Python engine cannot use a TUN opened with"):
            make_engine("python", replace(cfg, vnet_hdr=True))
        py = make_engine("python", replace(cfg, offload="auto"))
        assert offload_status(py)["active"] == []
        assert engine_mod.wants_vnet_hdr("c", "auto") and engine_mod.wants_vnet_hdr("auto", "auto")
        assert not engine_mod.wants_vnet_hdr("python", "auto")
        assert not engine_mod.wants_vnet_hdr("c", "off")
        e = make_engine("c", cfg)  # default: off
        assert isinstance(e, CEngine)
        assert offload_status(e)["active"] == [] and not any(e.offloads().values())
        e2 = make_engine(
            "c", replace(cfg, offload="auto", vnet_hdr=True, tun_offloads=frozenset({"tso4"}))
        )
        e2.start()
        try:
            st = offload_status(e2)
            assert st["active"] == ["tun_tso4", "udp_gso", "udp_gro", "tun_gso"]
            assert u.getsockopt(SOL_UDP, UDP_GRO) == 1  # UDP_GRO set on the socket
        finally:
            e2.stop()
        assert u.getsockopt(SOL_UDP, UDP_GRO) == 0  # and cleared at stop
        from flanneld_py import _engine

        with pytest.raises(ValueError, match="tun_gso needs"):
            _engine.Engine(a.fileno(), u.fileno(), 0, 24, 0, 8285, MTU, tun_gso=True)
        assert _engine.OFFLOAD_COUNTERS[:4] == ("vnet_hdr", "udp_gso", "udp_gro", "tun_gso")
    finally:
        for s in (a, c, u):
            s.close()
