"""The shipped units under a real systemd: Debian bookworm booted in systemd-nspawn (root).

Host 1 of a two-host lab is a booted system (``lab/nspawn.py``): systemd 252 as its PID 1, our
``systemd/flanneld-py.service`` and docker's drop-in installed and enabled as systemd/README.md
says, Debian's own docker.io, and the repository's virtualenv bound in. Host 2 runs a plain lab
daemon; etcd runs on the underlay. The tests run in order on one boot:

1. boot order: with no network config in etcd, flanneld-py waits (activating) and docker, which
   wants it, waits too; once the config is stored, flanneld-py sends READY=1 and only then does
   dockerd start, with ``--bip``/``--mtu`` of the lease;
2. ``systemctl restart flanneld-py``: dockerd's PID and the container stay, the new daemon takes
   the TUN and the sockets over from systemd's fd store, and a 100/s ping from host 2 to the
   container loses at most one reply;
3. a hung daemon (SIGSTOP) is killed by the watchdog and restarted, and the path works again;
4. ``systemctl stop flanneld-py`` removes our iptables rules and flannel0, and leaves docker;
5. the seed's mistake, ``bip`` in /etc/docker/daemon.json next to ``--bip``: dockerd refuses to
   start, and ``flanneld-py doctor`` names the conflict in one line.

The only setting changed from the shipped unit (a drop-in): ExecStart (the virtualenv's console
script) and a 5 s watchdog with a 1 s restart delay instead of 30 s and 5 s, to keep the test short.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from lab.docker import TEST_IMAGE, image_tarball
from lab.flanneld import DEFAULT_CONFIG, ETCD_PREFIX, FlannelCluster, Flanneld
from lab.netns import Lab, Netns, ping_argv, wait_for
from lab.nspawn import Bind, SystemdHost, build_rootfs, python_binds
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "flanneld-py.service"
DROPIN = ROOT / "systemd" / "docker.service.d" / "10-flanneld-py.conf"
SERVICE = "flanneld-py.service"
WATCHDOG_S = 5

pytestmark = pytest.mark.timeout(600)
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ping")


@dataclass
class Booted:
    lab: Lab
    cluster: FlannelCluster
    host: SystemdHost
    peer: Flanneld

    def main_pid(self, unit: str) -> int:
        return int(self.host.show(unit, "MainPID"))

    def active(self, unit: str) -> str:
        return self.host.show(unit, "ActiveState")

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.run(["docker", *args], check=check, timeout=120)

    def doctor_argv(self) -> list[str]:
        return [
            f"{ROOT}/.venv/bin/flanneld-py", "doctor",
            "--etcd-endpoints", self.cluster.etcd.endpoint,
        ]  # fmt: skip

    def iptables_rules(self) -> str:
        return self.host.run(["iptables-save"]).stdout


def _write_units(host: SystemdHost, etcd_endpoint: str) -> None:
    """Install the shipped files as systemd/README.md says, and enable flanneld-py."""
    host.write_file("/etc/systemd/system/" + SERVICE, UNIT.read_text())
    host.write_file("/etc/systemd/system/docker.service.d/10-flanneld-py.conf", DROPIN.read_text())
    host.write_file(
        f"/etc/systemd/system/{SERVICE}.d/50-test.conf",
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart={ROOT}/.venv/bin/flanneld-py $FLANNEL_OPTIONS\n"
        # PrivateTmp= hides a checkout under /tmp from the service: bind it back in
        + (f"BindReadOnlyPaths={ROOT}\n" if ROOT.is_relative_to("/tmp") else "")
        + f"WatchdogSec={WATCHDOG_S}\n"
        "RestartSec=1\n",
    )
    host.write_file(
        "/etc/default/flanneld-py",
        f"FLANNELD_ETCD_ENDPOINTS={etcd_endpoint}\nFLANNELD_IFACE=eth0\n",
    )
    # `systemctl enable flanneld-py`: the [Install] section's WantedBy=
    for wants in ("multi-user.target.wants", "docker.service.wants"):
        host.symlink(f"/etc/systemd/system/{wants}/{SERVICE}", f"/etc/systemd/system/{SERVICE}")


@pytest.fixture(scope="module")
def booted() -> Iterator[Booted]:
    require("nspawn", "netns", "etcd")
    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=2, config=None)  # the config comes during the boot
        cl.start_etcd()
        h1 = cl.topo.hosts[0]
        # the repository is bound read-only: compile it now, not at every start inside
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "flanneld_py")],
                       check=True, timeout=120)  # fmt: skip
        tarball = image_tarball()
        host = SystemdHost(lab, h1, build_rootfs(), binds=[*python_binds(), Bind(tarball.parent)])
        _write_units(host, cl.etcd.endpoint)
        host.start(timeout=120, until=("starting", "running", "degraded"))
        yield Booted(lab, cl, host, cl.hosts[1])


def _lease_of(b: Booted) -> IPv4Network:
    env = dict(
        line.split("=", 1)
        for line in b.host.run(["cat", "/run/flannel/subnet.env"]).stdout.splitlines()
        if "=" in line
    )
    return IPv4Network(env["FLANNEL_SUBNET"], strict=False)


def _dockerd_args(b: Booted) -> list[str]:
    pid = b.main_pid("docker.service")
    raw = b.host.run(["cat", f"/proc/{pid}/cmdline"]).stdout
    return [a for a in raw.split("\0") if a]


def test_docker_starts_only_after_flanneld_py_is_ready(booted: Booted) -> None:
    b, host = booted, booted.host
    # no config in etcd: we wait for it, and docker (it wants us, After=) waits for us
    wait_for(
        lambda: "waiting for the network config" in host.show(SERVICE, "StatusText"),
        timeout=60,
        what="flanneld-py waiting for the config",
    )
    time.sleep(1)
    assert b.active(SERVICE) == "activating"
    assert b.active("docker.service") == "inactive"
    assert host.run(["test", "-e", "/run/flannel/docker"], check=False).returncode != 0

    b.cluster.etcdctl("put", f"{ETCD_PREFIX}/config", DEFAULT_CONFIG)
    wait_for(lambda: b.active("docker.service") == "active", timeout=90, what="docker active")
    assert b.active(SERVICE) == "active"
    ready_at = int(host.show(SERVICE, "ActiveEnterTimestampMonotonic"))
    docker_started = int(host.show("docker.service", "ExecMainStartTimestampMonotonic"))
    assert 0 < ready_at < docker_started, (ready_at, docker_started)

    lease = _lease_of(b)
    mtu = int(host.run(["cat", "/sys/class/net/flannel0/mtu"]).stdout)
    args = _dockerd_args(b)
    assert f"--bip={lease.network_address + 1}/{lease.prefixlen}" in args, args
    # without FLANNELD_IP_MASQ docker masquerades itself, as with flannel
    assert f"--mtu={mtu}" in args and "--ip-masq=true" in args, args
    addr = json.loads(host.run(["ip", "-j", "-4", "addr", "show", "docker0"]).stdout)
    docker0 = addr[0]["addr_info"][0]
    assert IPv4Address(docker0["local"]) in lease and docker0["prefixlen"] == lease.prefixlen
    # the whole boot order, as systemd recorded it
    assert "flanneld-py.service" in host.show("docker.service", "After").split()


def _start_container(b: Booted) -> tuple[str, IPv4Address]:
    if b.docker("image", "inspect", TEST_IMAGE, check=False).returncode != 0:
        b.docker("import", "-c", 'CMD ["/bin/sh"]', str(image_tarball()), TEST_IMAGE)
    b.docker("run", "-d", "--name", "c1", TEST_IMAGE, "sleep", "100000")
    ip = b.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "c1").stdout.strip()
    return "c1", IPv4Address(ip)


def _ping_from_peer(b: Booted, dst: IPv4Address, count: int, interval: float) -> Future[str]:
    """``ping -c count -i interval dst`` from host 2, in the background; its summary text."""

    def ping() -> str:
        argv = ping_argv("-c", count, "-i", interval, "-W", 5, dst)
        res = b.peer.ns.run(argv, check=False, timeout=count * interval + 60)
        return res.stdout + res.stderr

    return _POOL.submit(ping)


def _ping_result(ping: Future[str]) -> tuple[int, int, str]:
    text = ping.result(timeout=120)
    m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", text)
    assert m, text
    seen = {int(n) for n in re.findall(r"seq=(\d+)", text)}
    first = 1 if ping_argv()[0] == "ping" else 0  # iputils counts from 1, busybox from 0
    lost = sorted(set(range(first, first + int(m.group(1)))) - seen)
    summary = text[text.index("---") :].strip() if "---" in text else text
    return int(m.group(1)), int(m.group(2)), f"{summary}; lost icmp_seq {lost}"


def _rx_packets(ns: Netns, ifname: str) -> int:
    return int(ns.run(["cat", f"/sys/class/net/{ifname}/statistics/rx_packets"]).stdout)


def test_restart_keeps_docker_and_loses_at_most_one_reply(booted: Booted) -> None:
    b, host = booted, booted.host
    b.peer.start(timeout=60)
    b.cluster.add_container(1)  # host 2's docker0 stand-in (doctor's peer probe pings its .1)
    b.cluster.wait_peers(1, timeout=30)
    name, ip = _start_container(b)
    # the overlay works before anything is restarted
    wait_for(lambda: b.peer.ns.ping(ip, count=1, timeout=1), timeout=20, what="ping c1")

    docker_pid = b.main_pid("docker.service")
    started_at = b.docker("inspect", "-f", "{{.State.StartedAt}}", name).stdout.strip()
    old_pid = b.main_pid(SERVICE)
    rx_before = _rx_packets(b.peer.ns, "flannel0")
    ping = _ping_from_peer(b, ip, count=500, interval=0.01)  # 5 s at 100/s
    try:
        time.sleep(1.0)
        t0 = time.monotonic()
        host.systemctl("restart", SERVICE)
        restart_s = time.monotonic() - t0
    finally:
        sent, received, text = _ping_result(ping)
    # what reached host 2's flannel0 through the overlay (the pinger's own socket is not ours)
    replies = _rx_packets(b.peer.ns, "flannel0") - rx_before
    print(f"restart {restart_s:.2f}s; {replies} packets came back through the overlay; {text}")
    assert sent == 500
    assert sent - received <= 1 and replies >= sent - 1, (
        f"restart took {restart_s:.2f}s; {replies} replies reached flannel0 of host 2; ping: "
        f"{text}\n{host.journal(SERVICE, lines=40)}"
    )

    assert b.active(SERVICE) == "active" and b.main_pid(SERVICE) != old_pid
    assert b.main_pid("docker.service") == docker_pid
    assert b.active("docker.service") == "active"
    state = b.docker("inspect", "-f", "{{.State.Running}} {{.State.StartedAt}}", name).stdout
    assert state.split() == ["true", started_at]
    journal = host.journal(SERVICE)
    assert "systemd is restarting us" in journal
    assert re.search(r"took over flannel0 \(\d+ queues\) and \d+ UDP sockets", journal), journal


def test_watchdog_restarts_a_hung_daemon(booted: Booted) -> None:
    b, host = booted, booted.host
    pid = b.main_pid(SERVICE)
    assert pid > 0, host.journal(SERVICE, lines=30)
    host.run(["kill", "-STOP", str(pid)])
    wait_for(
        lambda: b.main_pid(SERVICE) not in (0, pid) and b.active(SERVICE) == "active",
        timeout=WATCHDOG_S + 40,
        interval=0.5,
        what="flanneld-py restarted by the watchdog",
    )
    assert "Watchdog timeout" in host.journal(SERVICE)
    ip = IPv4Address(
        b.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "c1").stdout.strip()
    )
    sent, received, text = _ping_result(_ping_from_peer(b, ip, count=20, interval=0.05))
    assert received == sent, text


def test_stop_removes_our_rules_and_leaves_docker(booted: Booted) -> None:
    b, host = booted, booted.host
    docker_pid = b.main_pid("docker.service")
    assert "FLANNEL-FWD" in b.iptables_rules()
    host.systemctl("stop", SERVICE)
    assert b.active(SERVICE) == "inactive"
    rules = b.iptables_rules()
    assert "FLANNEL" not in rules and "flanneld" not in rules, rules
    # the fd store was emptied: flannel0 went with the daemon
    wait_for(
        lambda: host.run(["ip", "link", "show", "flannel0"], check=False).returncode != 0,
        timeout=10,
        what="flannel0 gone",
    )
    assert b.main_pid("docker.service") == docker_pid and b.active("docker.service") == "active"


def test_doctor_names_the_seeds_daemon_json_bip_conflict(booted: Booted) -> None:
    b, host = booted, booted.host
    host.systemctl("start", SERVICE)
    assert b.active(SERVICE) == "active"
    b.docker("rm", "-f", "c1")
    # the seed's 方案1 left in place when moving to flannel (方案四): bip in daemon.json
    host.run(["sh", "-c", 'echo \'{"bip": "172.30.0.1/16"}\' > /etc/docker/daemon.json'])
    assert host.systemctl("restart", "docker.service", check=False).returncode != 0
    assert "bip" in host.journal("docker.service")
    res = host.run(b.doctor_argv(), check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if "daemon.json" in ln and "bip" in ln]
    assert len(lines) == 1 and lines[0].startswith("[FAIL] docker-config:"), res.stdout
    print(lines[0])
    # fixed: the finding goes and docker starts
    host.run(["rm", "/etc/docker/daemon.json"])
    host.systemctl("reset-failed", "docker.service", check=False)
    host.systemctl("start", "docker.service")
    res = host.run(b.doctor_argv(), check=False)
    assert res.returncode == 0, res.stdout  # the peer answers through the overlay, too
    assert "[ok] docker-config: /etc/docker/daemon.json does not exist" in res.stdout
