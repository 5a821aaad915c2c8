"""Spread the overlay's datagrams over several sockets by the inner flow (``SO_REUSEPORT``).

All datagrams between two hosts share one outer 4-tuple (``<PublicIP>:8285`` both ends), so the
kernel's own reuseport hash would hand them all to one socket. The classic BPF program attached
here to the group (``SO_ATTACH_REUSEPORT_CBPF``) picks the socket from the *inner* packet
instead: for UDP the program sees the datagram from its payload on, i.e. the inner IPv4 header,
and returns ``mix(src ^ dst ^ ports) % n``, where mix folds the high half into the low one,
multiplies by a 32-bit golden-ratio constant and keeps the high half (Linux's connect() picks
even source ports, so the low bits of the ports alone would put every flow on one socket).
Packets of one inner flow always land on the same socket (so on the same engine thread: no
reordering), different flows spread.

Only TCP and UDP have ports, and only a packet that is not a fragment carries them: for those
the program reads the word at the inner header's own length (options included) as "ports". Any
other packet (ICMP, a fragment, another protocol) is steered by its addresses alone, ports = 0, so
that, for example, every echo request of a ping lands on one socket, not on one picked by its
changing checksum. A datagram too short for a load makes the program return 0 (the first socket).

Only the group's first ``n`` sockets are ever chosen (``% n``): a socket that joins the group
later (it would have to be of the same user, root, for the kernel to let it) gets nothing.
"""

from __future__ import annotations

import ctypes
import socket
import struct

__all__ = ["SO_ATTACH_REUSEPORT_CBPF", "attach_inner_flow_steering", "inner_flow_program"]

#: setsockopt(SOL_SOCKET, ...) (asm-generic/socket.h)
SO_ATTACH_REUSEPORT_CBPF = 51

# classic BPF opcodes (linux/filter.h, uapi/linux/bpf_common.h)
_LD_IMM = 0x00  # A = k
_LD_B_ABS = 0x30  # A = byte at [k]
_LD_H_ABS = 0x28  # A = half-word at [k]
_LD_W_ABS = 0x20  # A = word at [k]
_LD_W_IND = 0x40  # A = word at [X + k]
_LDX_B_MSH = 0xB1  # X = 4 * (byte at [k] & 0xf): an IPv4 header's length
_JA = 0x05  # skip k instructions
_JEQ_K = 0x15  # A == k ? skip jt : skip jf
_JSET_K = 0x45  # A & k ? skip jt : skip jf
_TAX = 0x07  # X = A
_XOR_X = 0xAC  # A ^= X
_RSH_K = 0x74  # A >>= k
_MOD_K = 0x94  # A %= k
_MUL_K = 0x24  # A *= k
_GOLDEN = 0x9E3779B1
_RET_A = 0x16  # return A
_IPPROTO_TCP, _IPPROTO_UDP = 6, 17
_FRAGMENT = 0x3FFF  # the IPv4 flags/offset half-word: "more fragments" or an offset

_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k


def inner_flow_program(n: int) -> list[tuple[int, int, int, int]]:
    """The program's instructions (code, jt, jf, k) for a group of ``n`` sockets."""
    if not 1 <= n <= 0xFFFF:
        raise ValueError(f"socket count {n} is not in 1..65535")
    return [
        (_LD_B_ABS, 0, 0, 9),  # 0: A = protocol
        (_JEQ_K, 1, 0, _IPPROTO_TCP),  # 1: TCP -> 3
        (_JEQ_K, 0, 5, _IPPROTO_UDP),  # 2: not UDP either -> 8 (no ports)
        (_LD_H_ABS, 0, 0, 6),  # 3: A = flags and fragment offset
        (_JSET_K, 3, 0, _FRAGMENT),  # 4: a fragment -> 8 (no ports)
        (_LDX_B_MSH, 0, 0, 0),  # 5: X = header length
        (_LD_W_IND, 0, 0, 0),  # 6: A = source and destination port
        (_JA, 0, 0, 1),  # 7: -> 9
        (_LD_IMM, 0, 0, 0),  # 8: A = 0 (no ports)
        (_TAX, 0, 0, 0),  # 9: X = ports
        (_LD_W_ABS, 0, 0, 12),  # A = inner source address
        (_XOR_X, 0, 0, 0),
        (_TAX, 0, 0, 0),
        (_LD_W_ABS, 0, 0, 16),  # A = inner destination address
        (_XOR_X, 0, 0, 0),
        (_TAX, 0, 0, 0),
        (_RSH_K, 0, 0, 16),
        (_XOR_X, 0, 0, 0),  # fold the high half into the low one
        (_MUL_K, 0, 0, _GOLDEN),  # every low bit reaches the high half
        (_RSH_K, 0, 0, 16),
        (_MOD_K, 0, 0, n),
        (_RET_A, 0, 0, 0),
    ]


def attach_inner_flow_steering(sock: socket.socket, n: int) -> None:
    """Attach the program to ``sock``'s reuseport group of ``n`` sockets. Raises OSError."""
    prog = inner_flow_program(n)
    buf = ctypes.create_string_buffer(b"".join(_INSN.pack(*i) for i in prog))
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
