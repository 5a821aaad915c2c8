"""sd_notify(3) and sd_listen_fds(3) in the standard library.

Notifications: READY, STATUS, STOPPING, WATCHDOG, EXTEND_TIMEOUT, and the file-descriptor store
(FDSTORE, FDSTOREREMOVE). Every function is a no-op returning False outside systemd (no
``$NOTIFY_SOCKET``) and never raises: losing a notification must not take the daemon down. The
unit uses ``Type=notify`` and ``WatchdogSec=``; the daemon calls :func:`ready` once the lease is
held and the files are written, :func:`watchdog` every :func:`watchdog_interval` seconds, and
:func:`stopping` on SIGTERM.

The fd store (``FileDescriptorStoreMax=`` in the unit) keeps descriptors across a restart of the
service: :func:`fdstore` hands systemd copies, and the next run of the service gets them back in
``$LISTEN_FDS`` / ``$LISTEN_FDNAMES`` (:func:`listen_fds`). :func:`restart_pending` tells a
stopping daemon whether systemd is restarting it or stopping it for good.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import re
import socket
import subprocess
from collections.abc import Mapping, MutableMapping, Sequence

__all__ = [
    "LISTEN_FDS_START",
    "extend_timeout",
    "fdstore",
    "fdstore_remove",
    "listen_fds",
    "notify",
    "own_unit",
    "ready",
    "restart_pending",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger("flanneld_py.systemd")


def _address(environ: Mapping[str, str]) -> str | None:
    """``$NOTIFY_SOCKET`` as an AF_UNIX address (``@name`` = abstract), or None."""
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None  # unset, or a kind we do not speak (e.g. vsock:)


def notify(state: str, fds: Sequence[int] = ()) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` lines) to systemd, with ``fds`` attached
    (SCM_RIGHTS) if given; True if it was sent."""
    address = _address(os.environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            data = state.encode("utf-8", "replace")
            if fds:
                rights = array.array("i", fds).tobytes()
                sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, address)
            else:
                sock.sendto(data, address)
    except OSError as e:
        log.debug("sd_notify %r to %r failed: %s", state, os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status: str | None = None) -> bool:
    """Startup finished (``READY=1``), with an optional status line for ``systemctl status``."""
    state = "READY=1"
    if status:
        state += f"\nSTATUS={_one_line(status)}"
    return notify(state)


def status(text: str) -> bool:
    """Free-form one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def stopping() -> bool:
    """Shutdown has begun (``STOPPING=1``)."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Keep-alive ping (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the start/stop timeout fires (``EXTEND_TIMEOUT_USEC``)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval() -> float | None:
    """Seconds between :func:`watchdog` calls (half of ``WatchdogSec``), or None if not enabled.

    Reads ``$WATCHDOG_USEC``; if ``$WATCHDOG_PID`` is set it must be our PID (otherwise the
    variables were inherited from a parent and are not meant for us).
    """
    usec_text = os.environ.get("WATCHDOG_USEC", "")
    pid_text = os.environ.get("WATCHDOG_PID", "")
    try:
        usec = int(usec_text)
        if pid_text and int(pid_text) != os.getpid():
            return None
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


#: the first descriptor systemd passes (sd_listen_fds(3): SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
#: what an FDNAME may be (fd names are listed with ':' between them)
_FDNAME = re.compile(r"[A-Za-z0-9_.\-]{1,255}")


def fdstore(fds: Sequence[int], name: str) -> bool:
    """Keep copies of ``fds`` in the service's fd store under ``name`` (``FDSTORE=1``).

    systemd ignores the message unless the unit sets ``FileDescriptorStoreMax=``; it drops a
    descriptor that is a duplicate of one it holds already.
    """
    if not fds or not _FDNAME.fullmatch(name):
        return False
    return notify(f"FDSTORE=1\nFDNAME={name}", fds)


def fdstore_remove(name: str) -> bool:
    """Close every descriptor of the fd store named ``name`` (``FDSTOREREMOVE=1``)."""
    if not _FDNAME.fullmatch(name):
        return False
    return notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def listen_fds(environ: MutableMapping[str, str] | None = None) -> dict[str, list[int]]:
    """The descriptors systemd passed to this process, by name (``$LISTEN_FDS``,
    ``$LISTEN_FDNAMES``; an unnamed one is "unknown"), made close-on-exec.

    Only when ``$LISTEN_PID`` is our PID (the variables may be inherited from a parent). The
    variables are removed, so that no child of ours takes them for its own.
    """
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return {}
    out: dict[str, list[int]] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:  # not open after all
            continue
        name = names[i] if i < len(names) and names[i] else "unknown"
        out.setdefault(name, []).append(fd)
    return out


def own_unit(cgroup_text: str | None = None) -> str | None:
    """The systemd unit this process runs in (from ``/proc/self/cgroup``: the last path
    component ending in ``.service``), or None when it is not in a service."""
    if cgroup_text is None:
        try:
            with open("/proc/self/cgroup", encoding="ascii", errors="replace") as f:
                cgroup_text = f.read()
        except OSError:
            return None
    for line in cgroup_text.splitlines():
        hierarchy, _, path = line.partition(":")[2].partition(":")
        if hierarchy not in ("", "name=systemd"):  # cgroup v2, or v1's systemd hierarchy
            continue
        for part in reversed(path.split("/")):
            if part.endswith(".service"):
                return part
    return None


def restart_pending(unit: str | None = None, *, timeout: float = 3.0) -> bool:
    """Whether systemd is restarting ``unit`` (default: ours) rather than stopping it: a
    ``restart`` job is queued for it (``systemctl list-jobs``). False outside systemd, and when
    it cannot tell (then the daemon cleans up as for a stop)."""
    if _address(os.environ) is None:
        return False
    unit = unit or own_unit()
    if unit is None:
        return False
    try:
        res = subprocess.run(
            ["systemctl", "list-jobs", "--no-legend", "--plain", "--no-pager", unit],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("systemctl list-jobs failed: %s", e)
        return False
    for line in res.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit:
            return fields[2] in ("restart", "try-restart")
    return False
