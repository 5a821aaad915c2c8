"""Hardening in namespaces: the overlay port and the host are the daemon's alone, nothing leaks
by the default route while it is down, and liveness survives an etcd outage.

Two hosts on the lab underlay, whose namespace ``ul`` is every host's default gateway: a packet
for the overlay that is not encapsulated would go there, so ``ul`` counts what it receives for the
network (an iptables counter in its raw table).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from lab.flanneld import DEFAULT_NETWORK, FlannelCluster, Flanneld
from lab.netns import Container, Lab, Netns, wait_for
from tests.conftest import require

Cluster = tuple[FlannelCluster, list[Container]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require("netns", "etcd")
    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=2).start()
        containers = [cl.add_container(i) for i in range(2)]
        cl.wait_peers(1)
        ul = cl.topo.underlay
        ul.run(["iptables", "-t", "raw", "-A", "PREROUTING", "-d", DEFAULT_NETWORK, "-j", "ACCEPT"])
        yield cl, containers


def leaked_to_gateway(ul: Netns) -> int:
    """Packets for the overlay network that reached the default gateway unencapsulated."""
    out = ul.run(["iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"]).stdout
    for line in out.splitlines():
        if DEFAULT_NETWORK in line:
            return int(line.split()[0])
    raise AssertionError(f"no counter rule in ul: {out}")


def ensure_running(cl: FlannelCluster) -> None:
    for h in cl.hosts:
        if not h.running:
            h.start()
    cl.wait_peers(1)


UNREACH = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.setsockopt(socket.SOL_IP, 11, 1)  # IP_RECVERR: report ICMP unreachable, a soft error
try:
    s.connect((sys.argv[1], 9)); s.send(b"x"); s.recv(100); print("answer")
except socket.timeout:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
"""

BIND_AS_NOBODY = r"""
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
try:
    s.bind((sys.argv[1], 8285))
except OSError as e:
    print("refused", e.errno)
else:
    print("bound")
"""


def test_another_user_cannot_bind_the_overlay_port(cluster: Cluster) -> None:
    cl, (c1, c2) = cluster
    ensure_running(cl)
    h = cl.hosts[0]
    out = h.ns.run([sys.executable, "-c", BIND_AS_NOBODY, str(h.ns.address)]).stdout.split()
    assert out[0] == "refused", out
    # and the daemon still gets its traffic
    assert c2.ping(c1.address, count=2, timeout=2)


def test_second_daemon_is_refused_and_the_first_keeps_working(cluster: Cluster) -> None:
    cl, (c1, c2) = cluster
    ensure_running(cl)
    first = cl.hosts[0]
    routes_before = first.ns.ip("route", "show").stdout
    rules_before = first.ns.run(["iptables-save"]).stdout
    second = Flanneld(
        cl.lab,
        first.ns,
        [cl.etcd.endpoint],
        workdir=cl.lab.tmpdir / "second",
        healthz_port=0,
        extra_args=["--tun-name", "flannel9"],
    )
    second.start(wait=False)
    wait_for(lambda: not second.running, 20, 0.1, "the second daemon to exit")
    assert second.returncode == 1
    log = second.log_text()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "already runs in this network namespace" in errors[0], log
    assert f"pid {first.pid}" in errors[0]
    assert "Traceback" not in log
    assert not second.subnet_file.exists()
    # it touched nothing: no TUN of its own, the first one's route, rules and traffic intact
    links = {link["ifname"] for link in first.ns.ip_json("link", "show")}
    assert "flannel9" not in links
    assert first.ns.ip("route", "show").stdout == routes_before
    assert first.ns.run(["iptables-save"]).stdout.count("FLANNEL") == rules_before.count("FLANNEL")
    assert c1.ping(c2.address, count=2, timeout=2)
    assert first.healthz()[0] == 200


def test_nothing_leaves_by_the_default_route_while_the_daemon_is_down(cluster: Cluster) -> None:
    cl, (c1, c2) = cluster
    ensure_running(cl)
    h1 = cl.hosts[0]
    ul = cl.topo.underlay
    assert c1.ping(c2.address, count=1, timeout=2)
    before = leaked_to_gateway(ul)
    guard = h1.ns.ip("route", "show", "type", "unreachable").stdout
    assert f"unreachable {DEFAULT_NETWORK} proto 102 metric" in guard, guard
    assert h1.pid is not None
    os.kill(h1.pid, signal.SIGKILL)
    wait_for(lambda: not h1.running, 10, 0.05, "flanneld-py to die")
    wait_for(
        lambda: "flannel0" not in {lk["ifname"] for lk in h1.ns.ip_json("link", "show")},
        10,
        0.05,
        "flannel0 to vanish",
    )
    # from a container and from the host itself: refused (ICMP host unreachable, the kernel's
    # answer for an unreachable route), not routed to the gateway
    for ns in (c1, h1.ns):
        assert ns.run([sys.executable, "-c", UNREACH, str(c2.address)]).stdout.strip() == (
            "EHOSTUNREACH"
        )
    assert not c1.ping(c2.address, count=5, timeout=1)
    assert not h1.ns.ping(c2.address, count=3, timeout=1)
    assert leaked_to_gateway(ul) == before
    # the guard outlives the process, and a restart brings traffic back
    assert "unreachable" in h1.ns.ip("route", "show", "type", "unreachable").stdout
    h1.start()
    cl.wait_peers(1)
    wait_for(lambda: c1.ping(c2.address, count=1, timeout=1), 10, 0.1, "traffic to come back")
    # a clean stop leaves the guard too
    h1.stop()
    assert (
        f"unreachable {DEFAULT_NETWORK}" in h1.ns.ip("route", "show", "type", "unreachable").stdout
    )
    assert not c1.ping(c2.address, count=2, timeout=1)
    assert leaked_to_gateway(ul) == before
    h1.start()


def test_healthz_stays_200_while_etcd_is_down_and_packets_flow(cluster: Cluster) -> None:
    cl, (c1, c2) = cluster
    ensure_running(cl)
    h = cl.hosts[0]
    assert h.healthz() == (200, "ok\n")
    assert h.readyz() == (200, "ok\n")
    cl.etcd.kill()
    try:
        wait_for(lambda: h.readyz()[0] == 503, 30, 0.2, "readiness to drop with etcd")
        code, body = h.healthz()
        assert code == 200, body
        assert body.startswith("ok; degraded: lease watch on etcd down for "), body
        assert "\n" not in body.rstrip("\n")
        assert c1.ping(c2.address, count=3, timeout=2)
        assert c2.ping(c1.address, count=3, timeout=2)
        st = h.status()
        assert st["watch_live"] is False
        assert st["alive"].startswith("ok; degraded")
    finally:
        cl.etcd.start()
    wait_for(lambda: h.readyz() == (200, "ok\n"), 30, 0.2, "readiness to come back")
    assert h.healthz() == (200, "ok\n")
    text = h.log_text()
    # "watching ... from revision N" only when a watch was really established: start + resume
    assert text.count("watching /coreos.com/network/subnets/ from revision") == 2, text


def test_watchdog_follows_liveness_not_readiness(tmp_path: object) -> None:
    """The systemd watchdog is fed during an etcd outage (checked through a real notify socket in
    the daemon's namespace)."""
    require("netns", "etcd")
    import socket

    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=1)
        sock_path = lab.tmpdir / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(sock_path))
        notify.settimeout(0.2)
        lab.defer("notify socket", notify.close)
        h = cl.hosts[0]
        h.env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "600000"}
        cl.start()

        def messages(seconds: float) -> list[str]:
            got: list[str] = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    got += notify.recv(4096).decode().splitlines()
                except TimeoutError:
                    pass
            return got

        assert "WATCHDOG=1" in messages(1.5)
        cl.etcd.kill()
        wait_for(lambda: h.readyz()[0] == 503, 30, 0.2, "readiness to drop with etcd")
        assert messages(1.5).count("WATCHDOG=1") >= 2
        # a dead data path stops the feeding
        h.ns.ip("link", "set", "flannel0", "down")
        wait_for(lambda: h.healthz()[0] == 503, 10, 0.1, "liveness to drop")
        assert "TUN device flannel0 is down" in h.healthz()[1]
        messages(0.5)  # drain what was already queued
        assert "WATCHDOG=1" not in messages(1.5)
        assert "no longer feeding the systemd watchdog" in h.log_text()
