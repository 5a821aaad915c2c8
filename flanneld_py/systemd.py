"""sd_notify(3) in the standard library: READY, STATUS, STOPPING, WATCHDOG, EXTEND_TIMEOUT.

Every function is a no-op returning False outside systemd (no ``$NOTIFY_SOCKET``) and never
raises: losing a notification must not take the daemon down. The unit uses ``Type=notify`` and
``WatchdogSec=``; the daemon calls :func:`ready` once the lease is held and the files are written,
:func:`watchdog` every :func:`watchdog_interval` seconds, and :func:`stopping` on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = [
    "extend_timeout",
    "notify",
    "ready",
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


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` lines) to systemd; True if it was sent."""
    address = _address(os.environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8", "replace"), address)
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
