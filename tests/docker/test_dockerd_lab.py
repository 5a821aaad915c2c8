"""Self-test of lab/docker.py without flanneld-py: two hosts, a dockerd each, host-gw routes.

The docker options come from hand-written ``/run/flannel/docker``-format files; the hosts route
each other's container subnets over the underlay (what the overlay will do later), and the test
shows docker's FORWARD DROP policy blocking that traffic until ACCEPT rules exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from lab.docker import Dockerd, RunningContainer, build_test_image, leftovers
from lab.netns import Lab, Netns

MTU = 1472
SUBNETS = (IPv4Network("10.5.1.0/24"), IPv4Network("10.5.2.0/24"))


def docker_opts_text(bip: str, mtu: int) -> str:
    """A ``/run/flannel/docker`` file as flannel's mk-docker-opts.sh writes it (flannel
    masquerades, so docker must not)."""
    return (
        f'DOCKER_OPT_BIP="--bip={bip}"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
        f'DOCKER_OPT_MTU="--mtu={mtu}"\n'
        f'DOCKER_NETWORK_OPTIONS=" --bip={bip} --ip-masq=false --mtu={mtu}"\n'
    )


@dataclass
class World:
    lab: Lab
    hosts: list[Netns]
    engines: list[Dockerd]
    containers: list[RunningContainer]
    opts_files: list[Path]


@pytest.fixture(scope="module")
def world(docker_ok: None, image_tar: Path) -> Iterator[World]:
    lab = Lab()
    try:
        hosts = lab.flannel_topology(n_hosts=2).hosts
        engines, containers, files = [], [], []
        for i, (h, net) in enumerate(zip(hosts, SUBNETS, strict=True), 1):
            f = lab.tmpdir / f"flannel-h{i}" / "docker"
            f.parent.mkdir()
            f.write_text(docker_opts_text(f"{net.network_address + 1}/{net.prefixlen}", MTU))
            d = Dockerd(lab, h, options_file=f).start()
            build_test_image(d, tarball=image_tar)
            engines.append(d)
            containers.append(d.run_container(f"c{i}"))
            files.append(f)
        yield World(lab, hosts, engines, containers, files)
    finally:
        lab.close()


def test_options_file_read_like_systemd_environmentfile(world: World) -> None:
    for d, net in zip(world.engines, SUBNETS, strict=True):
        bip = f"{net.network_address + 1}/{net.prefixlen}"
        assert d.args[-3:] == [f"--bip={bip}", "--ip-masq=false", f"--mtu={MTU}"]
        assert d.bridge_addresses() == [bip]


def test_containers_get_an_address_in_the_bip_subnet_and_the_mtu(world: World) -> None:
    for c, net in zip(world.containers, SUBNETS, strict=True):
        assert c.ip in net, c
        assert c.mtu() == MTU
        link = c.exec(["ip", "-o", "link", "show", "eth0"], check=True).stdout
        assert f" mtu {MTU} " in link
        addr = c.exec(["ip", "-o", "-4", "addr", "show", "eth0"], check=True).stdout
        assert f"inet {c.ip}/{net.prefixlen} " in addr


def test_dockerd_sets_forward_policy_drop_on_a_fresh_host(world: World) -> None:
    for h in world.hosts:
        rules = h.run(["iptables", "-S", "FORWARD"]).stdout.splitlines()
        assert rules[0] == "-P FORWARD DROP", rules
        assert h.read_sysctl("net.ipv4.ip_forward") == "1"  # dockerd switched it on


def test_engine_is_private(world: World) -> None:
    d = world.engines[0]
    assert (d.workdir / "key.json").exists()  # not /etc/docker/key.json
    assert d.containerd_pid is not None and d.pid is not None
    info = json.loads(d.docker("info", "--format", "{{json .}}").stdout)
    assert info["DockerRootDir"] == str(d.data_root)
    assert info["Driver"] == "overlay2"
    cid = world.containers[0].id
    cgroups = [p for p in Path("/sys/fs/cgroup").glob(f"*{d.cgroup_parent}/{cid}") if p.is_dir()]
    assert cgroups, f"no cgroup {d.cgroup_parent}/{cid}"


def test_cross_host_traffic_needs_forward_accept_then_keeps_container_ips(world: World) -> None:
    (h1, h2), (c1, c2) = world.hosts, world.containers
    assert h1.address is not None and h2.address is not None
    # host-gw routes stand in for the overlay
    h1.add_route(SUBNETS[1], via=h2.address)
    h2.add_route(SUBNETS[0], via=h1.address)
    # docker's FORWARD policy DROP stops new connections into the far docker0
    assert not c1.ping(c2.ip, timeout=1)
    for h in world.hosts:
        h.run(["iptables", "-I", "FORWARD", "-s", "10.5.0.0/16", "-j", "ACCEPT"])
        h.run(["iptables", "-I", "FORWARD", "-d", "10.5.0.0/16", "-j", "ACCEPT"])
    assert c1.ping(c2.ip) and c2.ping(c1.ip)
    # --ip-masq=false: the far side sees the container's own address
    assert c1.peer_address(c2.ip) == str(c1.ip)
    assert c2.peer_address(c1.ip) == str(c2.ip)


def test_stop_and_start_again_keeps_images(world: World) -> None:
    d = world.engines[1]
    t0 = time.monotonic()
    d.stop()
    stopped = time.monotonic() - t0
    assert d.leftovers() == []
    d.start()
    assert stopped < 5 and d.timings["total"] < 10, (stopped, d.timings)
    assert d.containers() == []  # stop removed them
    assert d.docker("image", "inspect", "flanneld-test:1", check=False).returncode == 0
    c = d.run_container("again")
    assert c.ip in SUBNETS[1]


def test_zz_teardown_leaves_nothing(world: World) -> None:
    pids = [p for d in world.engines for p in (d.pid, d.containerd_pid) if p]
    assert len(pids) == 4
    world.lab.close()
    assert world.lab.cleanup_errors == []
    assert leftovers(world.lab, world.engines) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), pid
    for d in world.engines:
        assert not d.workdir.exists()


def test_crashed_engine_is_swept(docker_ok: None, image_tar: Path, lab: Lab) -> None:
    """dockerd and containerd SIGKILLed with a container running: close() still removes the
    shim, the container's processes, the mounts and the cgroups."""
    (h,) = lab.flannel_topology(n_hosts=1).hosts
    d = Dockerd(lab, h, network_options=["--bip=10.5.3.1/24"]).start()
    build_test_image(d, tarball=image_tar)
    c = d.run_container("doomed")
    cg_procs = next(Path("/sys/fs/cgroup").glob(f"pids{d.cgroup_parent}/{c.id}/cgroup.procs"))
    in_container = [int(p) for p in cg_procs.read_text().split()]
    assert in_container
    shim_sockets = [
        Path("/run/containerd/s")
        / hashlib.sha256(f"{d.containerd_socket}/moby/{c.id}".encode()).hexdigest()
    ]
    assert shim_sockets[0].exists()
    for pid in (d.pid, d.containerd_pid):
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    d.close()
    assert d.leftovers() == []
    assert not shim_sockets[0].exists()  # a killed shim does not remove its socket itself
    # killed; their zombies may wait a moment for PID 1 to reap them
    assert not [p for p in in_container if _running(p)]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
