"""Fixtures shared by the unit tests of systemd.py and handover.py: a stand-in for systemd's
notify socket."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd; NOTIFY_SOCKET points at it."""
    path = tmp_path / "notify"
    short_dir = None
    if len(str(path)) > 100:  # sun_path is 108 bytes
        short_dir = tempfile.mkdtemp(prefix="sdn")
        path = Path(short_dir) / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)


def nothing_more(sock: socket.socket) -> None:
    """Assert that nothing else arrives on the notify socket within 0.1 s."""
    sock.settimeout(0.1)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
    sock.settimeout(2)
