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

The word read as "ports" is bytes 20..23 of the inner packet: the TCP/UDP ports when the header
has no options; for anything else it is some other, still per-packet-deterministic, data. A
datagram too short for a load makes the program return 0 (the first socket).

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

# classic BPF opcodes (linux/filter.h)
_LD_W_ABS = 0x20  # A = word at [k]
_TAX = 0x07  # X = A
_XOR_X = 0xAC  # A ^= X
_RSH_K = 0x74  # A >>= k
_MOD_K = 0x94  # A %= k
_MUL_K = 0x24  # A *= k
_GOLDEN = 0x9E3779B1
_RET_A = 0x16  # return A

_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k


def inner_flow_program(n: int) -> list[tuple[int, int, int, int]]:
    """The program's instructions (code, jt, jf, k) for a group of ``n`` sockets."""
    if not 1 <= n <= 0xFFFF:
        raise ValueError(f"socket count {n} is not in 1..65535")
    return [
        (_LD_W_ABS, 0, 0, 12),  # A = inner source address
        (_TAX, 0, 0, 0),
        (_LD_W_ABS, 0, 0, 16),  # A = inner destination address
        (_XOR_X, 0, 0, 0),
        (_TAX, 0, 0, 0),
        (_LD_W_ABS, 0, 0, 20),  # A = source and destination port (IHL 5)
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
