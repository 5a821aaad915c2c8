"""packet.py against scapy: checksums, RFC 1624 TTL update, ICMP error building and suppression."""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import ICMP, IP, UDP

from flanneld_py.packet import (
    checksum,
    csum_replace16,
    decrement_ttl,
    header_checksum_ok,
    icmp_error,
    icmp_error_allowed,
)


def test_checksum_matches_scapy() -> None:
    rng = random.Random(3)
    for _ in range(300):
        pkt = bytes(
            IP(
                src=f"10.0.0.{rng.randrange(256)}",
                dst="10.1.2.3",
                ttl=rng.randrange(256),
                id=rng.randrange(65536),
            )
            / UDP()
            / rng.randbytes(rng.randrange(30))
        )
        assert header_checksum_ok(pkt, 20)
        hdr = bytearray(pkt[:20])
        hdr[10:12] = b"\0\0"
        assert checksum(hdr) == IP(pkt).chksum
    assert checksum(b"\x01") == 0xFEFF  # odd length: padded


def test_incremental_update_equals_recompute() -> None:
    rng = random.Random(4)
    for _ in range(5000):
        words = [rng.randrange(65536) for _ in range(10)]
        words[5] = 0
        data = b"".join(w.to_bytes(2, "big") for w in words)
        csum = checksum(data)
        k = rng.randrange(10)
        if k == 5:
            continue
        new = rng.randrange(65536)
        words2 = list(words)
        words2[k] = new
        full = checksum(b"".join(w.to_bytes(2, "big") for w in words2))
        inc = csum_replace16(csum, words[k], new)
        assert inc == full or {inc, full} == {0x0000, 0xFFFF}


@pytest.mark.parametrize("ttl", [1, 2, 64, 128, 255])
def test_decrement_ttl(ttl: int) -> None:
    for ident in range(0, 65536, 997):
        pkt = bytearray(bytes(IP(src="10.5.1.7", dst="10.5.2.7", ttl=ttl, id=ident) / UDP()))
        decrement_ttl(pkt)
        p = IP(bytes(pkt))
        assert p.ttl == ttl - 1
        q = p.copy()
        del q.chksum
        assert IP(bytes(q)).chksum == p.chksum


def test_icmp_error_layout() -> None:
    off = bytes(IP(src="10.5.1.7", dst="10.9.9.9", id=5) / UDP(sport=1, dport=2) / b"payload!!")
    msg = icmp_error(off, 20, 3, 0, bytes([10, 5, 1, 0]))
    p = IP(msg)
    assert (p.src, p.dst, p.ttl, p.proto, p.tos) == ("10.5.1.0", "10.5.1.7", 64, 1, 0xC0)
    assert p[ICMP].type == 3 and p[ICMP].code == 0 and msg[28:] == off[:28]
    assert checksum(msg[:20]) == 0 and checksum(msg[20:]) == 0


@pytest.mark.parametrize(
    ("pkt", "allowed"),
    [
        (bytes(IP(src="10.5.1.7", dst="10.9.9.9") / UDP()), True),
        (bytes(IP(src="10.5.1.7", dst="10.9.9.9") / ICMP(type=8)), True),
        (bytes(IP(src="10.5.1.7", dst="10.9.9.9") / ICMP(type=0)), True),
        (bytes(IP(src="10.5.1.7", dst="10.9.9.9") / ICMP(type=3)), False),
        (bytes(IP(src="10.5.1.7", dst="10.9.9.9") / ICMP(type=11)), False),
        (bytes(IP(src="10.5.1.7", dst="10.9.9.9") / ICMP(type=19)), False),
        (bytes(IP(src="10.5.1.7", dst="10.9.9.9", proto=1)), False),
        (bytes(IP(src="10.5.1.7", dst="10.9.9.9", frag=1) / (b"x" * 8)), False),
        (bytes(IP(src="127.0.0.1", dst="10.9.9.9") / UDP()), False),
        (bytes(IP(src="10.5.1.7", dst="239.1.1.1") / UDP()), False),
    ],
)
def test_icmp_error_allowed(pkt: bytes, allowed: bool) -> None:
    assert icmp_error_allowed(pkt, 20) is allowed
