"""Shared pytest wiring.

Markers by folder: tests/unit and tests/engine are ``unit``, tests/etcd ``etcd``, tests/netns
``netns``, tests/docker ``docker``. A test that needs something missing here (root, etcd, dockerd)
skips with the reason; under ``FLANNELD_TEST_REQUIRE_ALL=1`` (set by ``make test``, hence CI) any
skip fails the run instead, so a green CI means every test really ran.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `lab` lives beside the package
    sys.path.insert(0, str(ROOT))

REQUIRE_ALL = os.environ.get("FLANNELD_TEST_REQUIRE_ALL") == "1"

_FOLDER_MARKERS = {
    "unit": "unit",
    "engine": "unit",
    "etcd": "etcd",
    "netns": "netns",
    "docker": "docker",
    "systemd": "systemd",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        marker = _FOLDER_MARKERS.get(parts[0]) if len(parts) > 1 else None
        if marker and not any(item.iter_markers(marker)):
            item.add_marker(getattr(pytest.mark, marker))


def missing_requirements(*needs: str) -> str | None:
    """Return why this machine cannot run a test needing ``needs`` (root/etcd/netns/docker)."""
    for need in needs:
        if need in ("root", "netns", "docker", "nspawn") and os.geteuid() != 0:
            return f"needs root for {need} (run as root, e.g. `sudo make test`)"
        if need == "etcd" and shutil.which("etcd") is None:
            return "needs the etcd binary (apt-get install etcd-server, or `make setup`)"
        if need == "netns":
            for tool in ("ip", "iptables"):
                if shutil.which(tool) is None:
                    return f"needs `{tool}` (apt-get install iproute2 iptables)"
            if not os.path.exists("/dev/net/tun"):
                return "needs /dev/net/tun"
        if need == "docker" and shutil.which("dockerd") is None:
            return "needs dockerd (apt-get install docker.io, or `make setup`)"
        if need == "nspawn":
            tools = (("systemd-nspawn", "systemd-container"), ("mmdebstrap", "mmdebstrap"))
            for tool, pkg in tools:
                if shutil.which(tool) is None:
                    return f"needs `{tool}` (apt-get install {pkg}, or `make setup`)"
    return None


def require(*needs: str) -> None:
    """Skip the calling test/fixture if ``needs`` are missing; fail instead under REQUIRE_ALL."""
    why = missing_requirements(*needs)
    if why is None:
        return
    if REQUIRE_ALL:
        pytest.fail(f"FLANNELD_TEST_REQUIRE_ALL=1 but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(autouse=True)
def _requirements_by_marker(request: pytest.FixtureRequest) -> None:
    node = request.node
    if node.get_closest_marker("etcd"):
        require("etcd")
    if node.get_closest_marker("netns"):
        require("netns", "etcd")
    if node.get_closest_marker("docker"):
        require("docker", "netns", "etcd")
    if node.get_closest_marker("systemd"):
        require("nspawn", "netns", "etcd")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not REQUIRE_ALL:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped:
        sys.stderr.write(
            f"\nFLANNELD_TEST_REQUIRE_ALL=1: {skipped} test(s) were skipped; CI must run them all\n"
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
