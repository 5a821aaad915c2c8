"""Self-test of lab/netns.py: topologies work and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.netns import Lab, LabCommandError, LabError, lab_namespaces

ROOT = Path(__file__).resolve().parents[2]


def test_hosts_ping_across_underlay_and_teardown_leaves_nothing() -> None:
    with Lab() as lab:
        topo = lab.flannel_topology(n_hosts=2)
        h1, h2 = topo.hosts
        assert h1.name == f"{lab.prefix}-h1"
        assert str(h2.address) == "10.99.0.12"
        assert h1.ping(h2.address)
        assert h2.ping(topo.etcd_address)
        # the default route points at eth0 (what "interface of the default route" logic needs)
        (default,) = [r for r in h1.ip_json("-4", "route", "show", "default")]
        assert default["dev"] == "eth0" and default["gateway"] == "10.99.0.1"
        assert h1.ip_json("link", "show", "eth0")[0]["mtu"] == 1500
        proc = h2.popen(["sleep", "60"])
        assert proc.poll() is None
        prefix = lab.prefix
        assert len(lab_namespaces(prefix + "-")) == 3
    assert lab_namespaces(prefix + "-") == []
    assert proc.returncode is not None
    lab.close()  # idempotent


def test_container_bridge_routes_between_hosts() -> None:
    with Lab() as lab:
        h1, h2 = lab.flannel_topology(n_hosts=2, mtu=1400).hosts
        c1 = lab.add_container_bridge(h1, "10.5.1.0/24", mtu=1372)
        c2 = lab.add_container_bridge(h2, "10.5.2.0/24", address="10.5.2.7")
        assert c1.name == f"{lab.prefix}-c1" and str(c2.address) == "10.5.2.7"
        assert h1.read_sysctl("net.ipv4.ip_forward") == "1"
        # host-gw style routes stand in for the overlay
        h1.add_route("10.5.2.0/24", via=h2.address)
        h2.add_route("10.5.1.0/24", via=h1.address)
        assert c1.ping(c2.address)
        assert h1.ip_json("link", "show", "eth0")[0]["mtu"] == 1400
        assert c1.ip_json("link", "show", "eth0")[0]["mtu"] == 1372
        assert h1.ip_json("link", "show", "cbr0")[0]["mtu"] == 1372


def test_failure_mid_build_still_tears_down() -> None:
    prefix = ""
    with pytest.raises(LabCommandError), Lab() as lab:
        prefix = lab.prefix
        h1 = lab.flannel_topology(n_hosts=1).hosts[0]
        lab.add_container_bridge(h1, "10.5.1.0/24")
        h1.popen(["sh", "-c", "trap '' TERM; sleep 60"], stop_timeout=0.3)
        h1.ip("link", "add", "eth0", "type", "bridge")  # exists already: fails
    assert prefix and lab_namespaces(prefix + "-") == []
    assert all(p.returncode is not None for p in lab.processes)  # SIGKILL after SIGTERM


def test_failure_inside_a_builder_still_tears_down() -> None:
    lab = Lab()
    try:
        with pytest.raises(LabCommandError, match="mtu"):
            lab.flannel_topology(n_hosts=2, mtu=70000)  # the bridge refuses this MTU
        assert lab_namespaces(lab.prefix + "-") == [f"{lab.prefix}-ul"]
    finally:
        lab.close()
    assert lab_namespaces(lab.prefix + "-") == []
    assert lab.cleanup_errors == []


def test_bad_arguments_are_one_line_errors() -> None:
    with Lab() as lab:
        h1 = lab.flannel_topology(n_hosts=1).hosts[0]
        with pytest.raises(LabError, match="not a usable host address"):
            lab.add_container_bridge(h1, "10.5.1.0/24", address="10.5.1.1")
        with pytest.raises(LabError, match="1-15 characters"):
            lab.veth(h1, "x" * 16, lab.namespaces[f"{lab.prefix}-ul"], "y")
        with pytest.raises(LabError, match="already exists"):
            lab.netns("h1")
    assert lab_namespaces(lab.prefix + "-") == []
    with pytest.raises(LabError, match="closed"):
        lab.netns("late")


def test_namespaces_of_a_killed_run_are_reaped() -> None:
    code = (
        "import os, signal\n"
        "from lab.netns import Lab\n"
        "lab = Lab(reap_stale=False)\n"
        "lab.netns('x')\n"
        "print(lab.prefix, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    prefix = out.stdout.strip()
    assert prefix, out.stderr
    try:
        assert lab_namespaces(prefix + "-") == [f"{prefix}-x"]
        deadline = time.monotonic() + 5
        with Lab():  # reaps stale labs on creation
            pass
        while lab_namespaces(prefix + "-") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lab_namespaces(prefix + "-") == []
    finally:
        for name in lab_namespaces(prefix + "-"):
            subprocess.run(["ip", "netns", "del", name], check=False)
