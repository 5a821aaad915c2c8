"""One daemon per network namespace: the abstract-socket lock (unique names, so that a
flanneld-py running on this machine is never disturbed)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from flanneld_py import hostlock


def test_second_holder_is_refused_with_the_first_ones_pid() -> None:
    name = f"flanneld-py-test-{uuid.uuid4().hex[:12]}"
    held = hostlock.acquire(name)
    try:
        with pytest.raises(hostlock.LockHeld) as ei:
            hostlock.acquire(name)
        msg = str(ei.value)
        assert "\n" not in msg
        if os.geteuid() == 0:
            assert msg.startswith(f"another flanneld-py (pid {os.getpid()}) already runs")
        else:
            assert f"(pid {os.getpid()}), not flanneld-py" in msg
        assert "stop it first" in msg
    finally:
        held.close()
    hostlock.acquire(name).close()  # released: free again


def test_the_lock_dies_with_its_process() -> None:
    name = f"flanneld-py-test-{uuid.uuid4().hex[:12]}"
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[2]); from flanneld_py import hostlock; "
        "hostlock.acquire(sys.argv[1]); os._exit(0)"  # no close(): the kernel releases it
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code, name, root], check=True, timeout=30)
    hostlock.acquire(name).close()
