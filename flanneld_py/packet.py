"""IPv4/ICMP helpers for the data plane (pure; the C engine implements the same rules).

Offsets are those of the IPv4 header (RFC 791): version/IHL 0, total length 2, flags/fragment
offset 6, TTL 8, protocol 9, header checksum 10, source 12, destination 16.
"""

from __future__ import annotations

import struct

__all__ = [
    "ICMP_DEST_UNREACH",
    "ICMP_NET_UNREACH",
    "ICMP_TIME_EXCEEDED",
    "ICMP_TTL_EXCEEDED",
    "IPPROTO_ICMP",
    "checksum",
    "csum_replace16",
    "decrement_ttl",
    "header_checksum_ok",
    "icmp_error",
    "icmp_error_allowed",
]

IPPROTO_ICMP = 1
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0  # code of type 3
ICMP_TIME_EXCEEDED = 11
ICMP_TTL_EXCEEDED = 0  # code of type 11

#: ICMP types that are errors (RFC 1812 4.3.2.7: never answer one with another error).
_ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})
#: Highest ICMP type we know; unknown types are treated like errors (as Linux does).
_ICMP_MAX_KNOWN = 18
#: TOS of the ICMP errors we generate: precedence "internetwork control", as Linux uses.
_ICMP_TOS = 0xC0
_ICMP_TTL = 64


def checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 Internet checksum of ``data`` (0 when ``data`` holds a valid checksum)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def header_checksum_ok(pkt: bytes | bytearray | memoryview, ihl: int) -> bool:
    """Whether the IPv4 header (the first ``ihl`` bytes) has a valid checksum."""
    return checksum(pkt[:ihl]) == 0


def csum_replace16(csum: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: the checksum once a 16-bit header word went from ``old`` to ``new``."""
    total = (~csum & 0xFFFF) + (~old & 0xFFFF) + new
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def decrement_ttl(pkt: bytearray) -> None:
    """Decrement the TTL of the IPv4 header in ``pkt`` (TTL ≥ 1) and fix its checksum in place."""
    old = (pkt[8] << 8) | pkt[9]
    pkt[8] -= 1
    csum = csum_replace16((pkt[10] << 8) | pkt[11], old, old - 0x100)
    pkt[10] = csum >> 8
    pkt[11] = csum & 0xFF


def icmp_error_allowed(pkt: bytes | bytearray | memoryview, ihl: int) -> bool:
    """Whether an ICMP error may be sent about the well-formed IPv4 packet ``pkt``.

    Not about: a non-first fragment; a source that is not a unicast host (0/8, 127/8, multicast,
    240/4 incl. broadcast); a multicast/broadcast destination; an ICMP error or an ICMP message of
    unknown type (RFC 1812 4.3.2.7, as Linux does). ICMP queries (echo etc.) do get errors: flannel
    suppresses errors for all ICMP, which leaves ``ping`` to an unknown subnet hanging.
    """
    if ((pkt[6] << 8) | pkt[7]) & 0x1FFF:
        return False
    if pkt[12] == 0 or pkt[12] == 127 or pkt[12] >= 224 or pkt[16] >= 224:
        return False
    if pkt[9] == IPPROTO_ICMP:
        if len(pkt) <= ihl:
            return False
        icmp_type = pkt[ihl]
        if icmp_type > _ICMP_MAX_KNOWN or icmp_type in _ICMP_ERROR_TYPES:
            return False
    return True


def icmp_error(
    offender: bytes | bytearray | memoryview, ihl: int, icmp_type: int, code: int, src: bytes
) -> bytes:
    """An IPv4 ICMP error from ``src`` (4 bytes) to the offender's source, quoting its header
    (``ihl`` bytes) and the first 8 bytes after it."""
    quoted = bytes(offender[: ihl + 8])
    icmp = bytearray(struct.pack("!BBHI", icmp_type, code, 0, 0) + quoted)
    struct.pack_into("!H", icmp, 2, checksum(icmp))
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            _ICMP_TOS,
            20 + len(icmp),
            0,
            0,
            _ICMP_TTL,
            IPPROTO_ICMP,
            0,
            src,
            bytes(offender[12:16]),
        )
    )
    struct.pack_into("!H", header, 10, checksum(header))
    return bytes(header + icmp)
