"""Helpers shared by the unit tests of systemd.py and handover.py: a stand-in for systemd's
notify socket, and a Python child started the way systemd would start the daemon."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


def python_under_sh(script: str, code: str, env: dict[str, str] | None = None) -> Any:
    """Run ``sh -c script`` with ``$0`` = this Python and ``$1`` = ``code``: the script sets up
    the descriptors and variables and execs ``"$0" -c "$1"``, so ``$$`` there is the child's
    own PID (as LISTEN_PID is under systemd). Returns the JSON the child printed."""
    res = subprocess.run(
        ["sh", "-c", script, sys.executable, code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)
