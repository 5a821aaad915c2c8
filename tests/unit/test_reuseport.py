"""The inner-flow steering program of ``flanneld_py.reuseport``, run by a model of the kernel.

``Cbpf`` below interprets exactly the classic BPF instructions the program may use (their codes
built here from linux/filter.h's parts, not taken from the module), with the kernel's semantics:
32-bit unsigned arithmetic, and a load past the end of the data ends the program with 0. The
kernel runs a UDP reuseport program on the datagram from its payload on, so the "packet" given to
the model is the UDP payload: an inner IPv4 packet. tests/netns/test_reuseport_kernel.py checks
that the kernel picks the socket this model predicts.
"""

from __future__ import annotations

import random
import socket
import struct
from collections import Counter
from collections.abc import Sequence
from ipaddress import IPv4Address

import pytest

from flanneld_py.reuseport import attach_inner_flow_steering, inner_flow_program

# linux/filter.h (uapi/linux/bpf_common.h): class | size | mode, class | op | source
BPF_LD, BPF_LDX, BPF_JMP, BPF_ALU, BPF_RET, BPF_MISC = 0x00, 0x01, 0x05, 0x04, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MSH = 0x00, 0x20, 0x40, 0xA0
BPF_MUL, BPF_RSH, BPF_MOD, BPF_XOR = 0x20, 0x70, 0x90, 0xA0
BPF_JA, BPF_JEQ, BPF_JSET = 0x00, 0x10, 0x40
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10
BPF_TAX = 0x00

LD_IMM = BPF_LD | BPF_W | BPF_IMM
LD_B_ABS = BPF_LD | BPF_B | BPF_ABS
LD_H_ABS = BPF_LD | BPF_H | BPF_ABS
LD_W_ABS = BPF_LD | BPF_W | BPF_ABS
LD_W_IND = BPF_LD | BPF_W | BPF_IND
LDX_B_MSH = BPF_LDX | BPF_B | BPF_MSH
JA = BPF_JMP | BPF_JA
JEQ_K = BPF_JMP | BPF_JEQ | BPF_K
JSET_K = BPF_JMP | BPF_JSET | BPF_K
TAX = BPF_MISC | BPF_TAX
XOR_X = BPF_ALU | BPF_XOR | BPF_X
RSH_K = BPF_ALU | BPF_RSH | BPF_K
MUL_K = BPF_ALU | BPF_MUL | BPF_K
MOD_K = BPF_ALU | BPF_MOD | BPF_K
RET_A = BPF_RET | BPF_A
OPCODES = {LD_IMM, LD_B_ABS, LD_H_ABS, LD_W_ABS, LD_W_IND, LDX_B_MSH, JA, JEQ_K, JSET_K}
OPCODES |= {TAX, XOR_X, RSH_K, MUL_K, MOD_K, RET_A}
JUMPS = {JA, JEQ_K, JSET_K}
LOAD_SIZE = {LD_B_ABS: 1, LD_H_ABS: 2, LD_W_ABS: 4, LD_W_IND: 4}

M32 = 0xFFFFFFFF
#: the module docstring's multiplier (32-bit golden ratio)
GOLDEN = 0x9E3779B1

Insn = tuple[int, int, int, int]


class OutOfBounds(Exception):
    pass


class Cbpf:
    """A classic BPF machine for the instructions in ``OPCODES`` only."""

    def __init__(self, prog: Sequence[Insn]) -> None:
        self.prog = list(prog)

    @staticmethod
    def _load(data: bytes, off: int, size: int) -> int:
        if off < 0 or off + size > len(data):
            raise OutOfBounds  # the kernel: a load out of bounds aborts the program with 0
        return int.from_bytes(data[off : off + size], "big")

    def run(self, data: bytes) -> int:
        try:
            return self._run(data)
        except OutOfBounds:
            return 0

    def _run(self, data: bytes) -> int:
        a = x = 0
        pc = 0
        steps = 0
        while pc < len(self.prog):
            code, jt, jf, k = self.prog[pc]
            pc += 1
            steps += 1
            assert steps <= len(self.prog), "classic BPF only jumps forward: no loops"
            if code in (LD_B_ABS, LD_H_ABS, LD_W_ABS):
                a = self._load(data, k, LOAD_SIZE[code])
            elif code == LD_W_IND:
                a = self._load(data, x + k, 4)
            elif code == LDX_B_MSH:
                x = 4 * (self._load(data, k, 1) & 0xF)
            elif code == LD_IMM:
                a = k
            elif code == JA:
                pc += k
            elif code == JEQ_K:
                pc += jt if a == k else jf
            elif code == JSET_K:
                pc += jt if a & k else jf
            elif code == TAX:
                x = a
            elif code == XOR_X:
                a ^= x
            elif code == RSH_K:
                a >>= k
            elif code == MUL_K:
                a = (a * k) & M32
            elif code == MOD_K:
                assert k != 0, "the kernel's checker refuses a division by a zero constant"
                a %= k
            elif code == RET_A:
                return a
            else:
                raise AssertionError(f"opcode {code:#04x} is not modelled")
            assert 0 <= a <= M32 and 0 <= x <= M32
        raise AssertionError("the program fell off its end without a return")


def index_for(n: int, data: bytes) -> int:
    """The socket index the program picks in a group of ``n`` for this UDP payload."""
    return Cbpf(inner_flow_program(n)).run(data)


def docstring_mix(src: str, dst: str, sport: int, dport: int, n: int) -> int:
    """The module docstring's rule, written out independently of the program (ports 0 and 0
    for a packet steered by its addresses alone)."""
    v = int(IPv4Address(src)) ^ int(IPv4Address(dst)) ^ (sport << 16 | dport)
    v ^= v >> 16  # fold the high half into the low one
    v = (v * GOLDEN) & M32
    return (v >> 16) % n


def internet_checksum(data: bytes) -> int:
    """RFC 1071."""
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def inner(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    *,
    proto: int = socket.IPPROTO_TCP,
    payload: bytes = b"",
    ident: int = 0,
    ttl: int = 64,
    options: bytes = b"",
    frag: int = 0x4000,
) -> bytes:
    """An inner IPv4 packet with a TCP, UDP or ICMP echo header: the overlay's UDP payload.
    ``options`` (a multiple of 4 bytes) go into the IP header; ``frag`` is the flags and
    fragment offset half-word (0x4000: don't fragment). For ICMP, ``sport`` and ``dport`` are
    the echo identifier and sequence number."""
    assert len(options) % 4 == 0 and len(options) <= 40
    if proto == socket.IPPROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    elif proto == socket.IPPROTO_UDP:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    else:
        head = struct.pack("!BBHHH", 8, 0, 0, sport, dport)
        l4 = head[:2] + struct.pack("!H", internet_checksum(head + payload)) + head[4:]
    total = 20 + len(options) + len(l4) + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | (5 + len(options) // 4),
        0,
        total,
        ident,
        frag,
        ttl,
        proto,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    return ip + options + l4 + payload


def random_flow(rng: random.Random) -> tuple[str, str, int, int, int]:
    def addr() -> str:
        return str(IPv4Address("10.5.0.0") + rng.randrange(1, 1 << 16))

    proto = rng.choice((socket.IPPROTO_TCP, socket.IPPROTO_UDP))
    return addr(), addr(), rng.randrange(1024, 65536), rng.randrange(1, 65536), proto


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 64, 0xFFFF])
def test_the_program_uses_only_the_modelled_instructions(n: int) -> None:
    prog = inner_flow_program(n)
    assert all(len(i) == 4 for i in prog)
    assert {code for code, _, _, _ in prog} <= OPCODES
    for pc, (code, jt, jf, k) in enumerate(prog):
        if code == JA:
            assert jt == jf == 0 and pc + 1 + k < len(prog)
        elif code in JUMPS:
            assert pc + 1 + max(jt, jf) < len(prog)  # forward, and inside the program
        else:
            assert jt == jf == 0
    assert prog[-1][0] == RET_A and all(c != RET_A for c, _, _, _ in prog[:-1])
    assert [k for c, _, _, k in prog if c == MOD_K] == [n]  # one "% n", by the group size
    assert all(0 <= k <= M32 for _, _, _, k in prog)
    # loads stay in the inner IPv4 header, and the first word after it (the ports)
    absolute = sorted(
        (LOAD_SIZE[c], k) for c, _, _, k in prog if c in (LD_B_ABS, LD_H_ABS, LD_W_ABS)
    )
    assert absolute == [(1, 9), (2, 6), (4, 12), (4, 16)]  # protocol, fragment, addresses
    assert [k for c, _, _, k in prog if c in (LD_W_IND, LDX_B_MSH)] == [0, 0]
    assert len(prog) <= 4096  # BPF_MAXINSNS


def test_the_model_agrees_with_the_module_docstring() -> None:
    rng = random.Random(7)
    for _ in range(500):
        src, dst, sport, dport, proto = random_flow(rng)
        n = rng.choice((2, 3, 4, 7, 64))
        pkt = inner(src, dst, sport, dport, proto=proto)
        assert index_for(n, pkt) == docstring_mix(src, dst, sport, dport, n)


def test_a_flow_always_gets_the_same_index() -> None:
    rng = random.Random(11)
    for _ in range(50):
        src, dst, sport, dport, proto = random_flow(rng)
        for n in (2, 3, 4):
            picks = {
                index_for(
                    n,
                    inner(
                        src,
                        dst,
                        sport,
                        dport,
                        proto=proto,
                        payload=rng.randbytes(rng.randrange(0, 1400)),
                        ident=rng.randrange(65536),
                        ttl=rng.randrange(1, 256),
                    ),
                )
                for _ in range(20)
            }
            assert len(picks) == 1, (src, dst, sport, dport, n, picks)
            assert picks.pop() < n


def test_even_consecutive_source_ports_do_not_all_land_on_one_socket() -> None:
    """Linux connect() picks even ephemeral ports: ``-P 4`` to one server gets e.g. 40000..40006.
    With only the low bit of the ports deciding (``% 2``), all four would share one socket."""
    ports = [40000, 40002, 40004, 40006]
    picks = [index_for(2, inner("10.5.1.2", "10.5.2.2", p, 5201)) for p in ports]
    assert len(set(picks)) == 2, picks
    # and the same for the other end's answers (server port first)
    back = [index_for(2, inner("10.5.2.2", "10.5.1.2", 5201, p)) for p in ports]
    assert len(set(back)) == 2, back


def test_random_flows_spread_over_four_sockets() -> None:
    rng = random.Random(2024)
    picks = Counter(
        index_for(4, inner(src, dst, sport, dport, proto=proto))
        for src, dst, sport, dport, proto in (random_flow(rng) for _ in range(200))
    )
    assert set(picks) == {0, 1, 2, 3}, picks
    assert min(picks.values()) >= 20, picks  # at least 10 % each


@pytest.mark.parametrize("size", [0, 1, 9, 10, 15, 19])
def test_a_datagram_too_short_for_a_load_goes_to_the_first_socket(size: int) -> None:
    data = bytes(range(0x80, 0x80 + size))
    for n in (2, 3, 4):
        assert index_for(n, data) == 0


def test_a_tcp_header_cut_short_goes_to_the_first_socket() -> None:
    pkt = inner("10.5.1.2", "10.5.2.2", 40000, 5201)
    for n in (2, 3, 4):
        assert index_for(n, pkt[:23]) == 0  # the ports' word is not all there


def test_every_echo_request_of_a_ping_lands_on_one_socket() -> None:
    """An ICMP header has no ports: its checksum (where a TCP header's ports would be) changes
    with every sequence number. The program steers it by its addresses alone."""
    for src, dst in (("10.5.1.2", "10.5.2.2"), ("10.5.2.2", "10.5.1.2"), ("10.5.7.9", "10.5.3.1")):
        for n in (2, 3, 4):
            picks = {
                index_for(n, inner(src, dst, 77, seq, proto=socket.IPPROTO_ICMP, payload=b"x" * 56))
                for seq in range(200)
            }
            assert picks == {docstring_mix(src, dst, 0, 0, n)}, (src, dst, n, picks)


def test_fragments_of_a_flow_are_steered_by_their_addresses() -> None:
    """Only the first fragment has the ports; every fragment (more-fragments flag or an offset)
    goes by its addresses, so the fragments of one datagram stay together."""
    rng = random.Random(5)
    for _ in range(100):
        src, dst, sport, dport, proto = random_flow(rng)
        n = rng.choice((2, 3, 4, 7))
        want = docstring_mix(src, dst, 0, 0, n)
        first = inner(src, dst, sport, dport, proto=proto, frag=0x2000)  # MF, offset 0
        later = inner(src, dst, sport, dport, proto=proto, frag=rng.randrange(1, 0x2000))
        last = inner(src, dst, sport, dport, proto=proto, frag=0x4000 | rng.randrange(1, 0x2000))
        assert index_for(n, first) == index_for(n, later) == index_for(n, last) == want


def test_ip_options_do_not_move_the_ports() -> None:
    rng = random.Random(6)
    for _ in range(100):
        src, dst, sport, dport, proto = random_flow(rng)
        n = rng.choice((2, 3, 4, 7))
        opts = bytes([1]) * (4 * rng.randrange(1, 11))  # NOPs, 4..40 bytes
        pkt = inner(src, dst, sport, dport, proto=proto, options=opts)
        assert index_for(n, pkt) == docstring_mix(src, dst, sport, dport, n)


def test_a_datagram_of_exactly_24_bytes_is_steered_like_a_full_packet() -> None:
    pkt = inner("10.5.1.2", "10.5.2.2", 40000, 5201, proto=socket.IPPROTO_UDP)
    assert len(pkt) == 28
    for n in (2, 3, 4):
        assert index_for(n, pkt[:24]) == index_for(n, pkt)


@pytest.mark.parametrize("n", [0, -1, 0x10000, 70000])
def test_a_group_size_out_of_range_is_refused(n: int) -> None:
    with pytest.raises(ValueError):
        inner_flow_program(n)


def test_the_kernel_accepts_the_program_on_a_reuseport_socket() -> None:
    """No root needed: attaching a reuseport program is open to any user."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        attach_inner_flow_steering(s, 3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # bound, but in no group
        s.bind(("127.0.0.1", 0))
        with pytest.raises(OSError):
            attach_inner_flow_steering(s, 3)
