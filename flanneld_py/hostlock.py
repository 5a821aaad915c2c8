"""One flanneld-py per network namespace, whatever its flags.

The lock is an abstract unix socket (``@flanneld-py``) bound and listening for as long as the
process lives. Abstract socket names belong to the network namespace, so each host namespace (and
each container of a lab) has its own, and the kernel drops the name when the process dies, even by
SIGKILL: no stale lock file. A second daemon finds the name taken and learns who holds it from the
listener's credentials (``SO_PEERCRED``), then exits before it has touched anything.
"""

from __future__ import annotations

import errno
import socket
import struct

__all__ = ["LOCK_NAME", "LockHeld", "acquire"]

LOCK_NAME = "flanneld-py"

_UCRED = struct.Struct("3i")  # pid, uid, gid


class LockHeld(Exception):
    """Another process holds the lock; ``str(e)`` is one line saying which and what to do."""


def _holder(address: str) -> tuple[int, int] | None:
    """(pid, uid) of the process listening on ``address``, if it can be asked."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(address)
            raw = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return None
    pid, uid, _gid = _UCRED.unpack(raw)
    return pid, uid


def acquire(name: str = LOCK_NAME) -> socket.socket:
    """Take the lock for this network namespace; keep the returned socket open to hold it.

    Raises :class:`LockHeld` if another process holds it.
    """
    address = "\0" + name
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(address)
        sock.listen(8)
    except OSError as e:
        sock.close()
        if e.errno != errno.EADDRINUSE:
            raise LockHeld(f"cannot take the lock @{name}: {e.strerror}") from None
        who = _holder(address)
        if who is None:
            holder = "another process"
        elif who[1] == 0:
            holder = f"another flanneld-py (pid {who[0]})"
        else:
            holder = f"a process of uid {who[1]} (pid {who[0]}), not flanneld-py"
        raise LockHeld(
            f"{holder} already runs in this network namespace (it holds @{name}); "
            "stop it first (systemctl stop flanneld-py), one flanneld-py per host"
        ) from None
    return sock
