"""``flanneld-py doctor`` against real broken states, built in network namespaces.

One 2-host udp cluster (real etcd, real flanneld-py, a docker0-like bridge ``cbr0`` with a
"container" namespace on each host). Each test breaks one thing on host 1 (or on its peer, or in
etcd), runs the doctor inside host 1's namespace, checks the exact finding, repairs the state
the way the finding's fix says, and checks that the doctor is then happy again (exit 0). Docker
itself (daemon.json, docker0, container MTUs) is in tests/docker/test_doctor_docker.py; the
decisions on crafted facts are in tests/unit/test_doctor.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.flanneld import ETCD_PREFIX, FlannelCluster, Flanneld
from lab.netns import Container, Lab
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
#: the daemons check their iptables rules this rarely, so that a rule deleted by a test stays
#: deleted (the default is 5 s)
RESYNC = "--iptables-resync=3600"


@dataclass
class World:
    lab: Lab
    cl: FlannelCluster
    h1: Flanneld
    h2: Flanneld
    c1: Container
    c2: Container
    args: list[str]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    require("netns", "etcd")
    with Lab() as lab:
        cl = FlannelCluster(lab, 2, extra_args=[RESYNC]).start()
        h1, h2 = cl.hosts
        c1, c2 = (lab.add_container_bridge(h.ns, h.subnet, mtu=h.mtu) for h in cl.hosts)
        cl.wait_peers(1)
        # as dockerd leaves a fresh host: FORWARD policy DROP (flanneld-py's FLANNEL-FWD lets the
        # overlay through)
        for h in cl.hosts:
            h.ns.run(["iptables", "-P", "FORWARD", "DROP"])
        assert h1.docker_opts_file is not None
        args = [
            "--subnet-file", str(h1.subnet_file),
            "--docker-opts-file", str(h1.docker_opts_file),
            "--docker-config", str(lab.tmpdir / "no-daemon.json"),
            "--docker-bridge", "cbr0",
            "--docker-host", f"unix://{lab.tmpdir}/no-docker.sock",
            "--etcd-endpoints", cl.etcd.endpoint,
            "--probe-timeout", "1",
        ]  # fmt: skip
        yield World(lab, cl, h1, h2, c1, c2, args)


def run_doctor(w: World, *extra: str, json_out: bool = True) -> tuple[int, Any]:
    """The doctor as an operator runs it: a process in host 1's namespace."""
    argv = [*w.args, *(["--json"] if json_out else []), *extra]
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from flanneld_py.doctor import main; "
        f"sys.exit(main({argv!r}))"
    )
    proc = w.h1.ns.run([sys.executable, "-c", code], check=False, timeout=60)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout) if json_out else proc.stdout


def failures(found: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in found:
        if not f["ok"]:
            out.setdefault(f["check"], []).append(f["message"])
    return out


def messages(found: list[dict[str, Any]], check: str) -> list[str]:
    return [f["message"] for f in found if f["check"] == check]


def assert_healthy(w: World) -> list[dict[str, Any]]:
    rc, found = run_doctor(w)
    assert failures(found) == {}
    assert rc == 0
    return list(found)


def test_a_healthy_host_passes_every_check(world: World) -> None:
    w = world
    found = assert_healthy(w)
    assert {f["check"] for f in found} == {
        "subnet-file", "docker-config", "docker-bridge", "forward", "ip-forward", "mtu",
        "rp-filter", "etcd", "peers", "duplicate-public-ip",
    }  # fmt: skip
    net, sn1, sn2 = "10.5.0.0/16", w.h1.subnet, w.h2.subnet
    assert messages(found, "forward") == [
        f"FORWARD policy is DROP; flanneld-py's FLANNEL-FWD rules accept the overlay {net}"
    ]
    assert messages(found, "docker-bridge") == [
        f"cbr0 has {sn1.network_address + 1}/24, inside the lease {sn1}"
    ]
    assert messages(found, "peers") == [
        f"1 peer answers through the overlay ({sn2.network_address + 1})"
    ]
    assert messages(found, "etcd") == [f"{ETCD_PREFIX}/config: Network {net}, Backend.Type udp"]
    # the text form: one line per finding, then the summary
    rc, text = run_doctor(w, json_out=False)
    lines = text.splitlines()
    assert rc == 0 and lines[-1] == "flanneld-py doctor: all checks passed"
    assert len(lines) == len(found) + 1
    assert all(line.startswith(("[ok] ", "[info] ")) for line in lines[:-1])
    assert "[info] mtu: container MTUs not checked: no docker socket at" in text


def test_forward_policy_drop_without_our_rules(world: World) -> None:
    w, ns = world, world.h1.ns
    # what a flanneld-py that is gone (or runs with --iptables-forward-rules=false) leaves
    ns.run(["iptables", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld-py forward",
            "-j", "FLANNEL-FWD"])  # fmt: skip
    ns.run(["iptables", "-F", "FLANNEL-FWD"])
    ns.run(["iptables", "-X", "FLANNEL-FWD"])
    try:
        assert not w.c2.ping(w.c1.address, timeout=1)  # really broken: h1 drops the forward
        rc, found = run_doctor(w)
        assert rc == 1
        assert failures(found) == {
            "forward": [
                "FORWARD policy is DROP and no rule accepts the overlay 10.5.0.0/16 (flanneld-py's "
                "FLANNEL-FWD chain and its jump are missing): packets between other hosts' "
                "containers and this host's containers are dropped"
            ]
        }
    finally:
        w.h1.restart()  # the fix: flanneld-py installs FLANNEL-FWD again
    assert_healthy(w)
    assert w.c2.ping(w.c1.address, timeout=2)


def test_ip_forward_off(world: World) -> None:
    w = world
    w.h1.ns.sysctl("net.ipv4.ip_forward", 0)
    try:
        assert not w.c2.ping(w.c1.address, timeout=1)
        rc, found = run_doctor(w)
        assert rc == 1
        assert failures(found) == {
            "ip-forward": [
                "net.ipv4.ip_forward is 0: this host does not forward packets between the overlay "
                "and its containers"
            ]
        }
    finally:
        w.h1.ns.sysctl("net.ipv4.ip_forward", 1)
    assert messages(assert_healthy(w), "ip-forward") == ["net.ipv4.ip_forward is 1"]


def test_bridge_mtu_larger_than_the_lease(world: World) -> None:
    w = world
    w.h1.ns.set_mtu("cbr0", 1500)
    try:
        rc, found = run_doctor(w)
        assert rc == 1
        assert failures(found) == {
            "mtu": [
                "cbr0 MTU 1500 is larger than the lease MTU 1472 (FLANNEL_MTU): packets over 1472 "
                "bytes do not fit the overlay and are dropped"
            ]
        }
        fix = next(f["fix"] for f in found if not f["ok"])
        assert fix.startswith("ip link set cbr0 mtu 1472")
    finally:
        w.h1.ns.set_mtu("cbr0", 1472)
    assert "cbr0 MTU 1472 fits the lease MTU 1472" in messages(assert_healthy(w), "mtu")


def test_strict_rp_filter_with_a_leftover_static_route(world: World) -> None:
    w, ns = world, world.h1.ns
    sn2 = w.h2.subnet
    saved = {k: ns.read_sysctl(f"net.ipv4.conf.{k}.rp_filter") for k in ("all", "flannel0")}
    # strict alone is fine: every peer's route back leaves via flannel0
    ns.sysctl("net.ipv4.conf.all.rp_filter", 1)
    try:
        found = assert_healthy(w)
        assert any("flannel0 strict (1), but every peer's route back leaves via flannel0" in m
                   for m in messages(found, "rp-filter"))  # fmt: skip
        # the static route of a hand-made setup (the seed's 方案1) still sends sn2 via eth0
        ns.add_route(sn2, via=w.h2.ns.address, dev="eth0")
        assert not w.c2.ping(w.c1.address, timeout=1)  # h1 drops c2's packets on flannel0
        rc, found = run_doctor(w)
        assert rc == 1
        assert failures(found) == {
            "rp-filter": [
                "rp_filter is strict on flannel0 (net.ipv4.conf.all.rp_filter=1): packets from "
                f"{sn2} arriving on flannel0 are dropped, because the route back to them leaves "
                "via eth0, not flannel0"
            ]
        }
        fix = next(f["fix"] for f in found if not f["ok"])
        assert fix == (
            "sysctl -w net.ipv4.conf.all.rp_filter=2 (loose mode), or remove the route that "
            f"sends {sn2} via eth0"
        )
        ns.sysctl("net.ipv4.conf.all.rp_filter", 2)  # the fix
        assert "rp_filter: flannel0 loose (2); eth0 loose (2)" in messages(
            assert_healthy(w), "rp-filter"
        )
    finally:
        ns.ip("route", "del", str(sn2), "via", str(w.h2.ns.address), check=False)
        for k, v in saved.items():
            ns.sysctl(f"net.ipv4.conf.{k}.rp_filter", v)
    assert_healthy(w)


def test_a_peer_that_drops_the_overlay_port(world: World) -> None:
    w = world
    rule = ["INPUT", "-p", "udp", "--dport", "8285", "-j", "DROP"]
    w.h2.ns.run(["iptables", "-I", *rule])
    try:
        rc, found = run_doctor(w)
        assert rc == 1
        sn2, ip2 = w.h2.subnet, w.h2.ns.address
        assert failures(found) == {
            "peers": [
                f"peer {sn2} (PublicIP {ip2}) does not answer through the overlay: no echo reply "
                f"from {sn2.network_address + 1} within 1s"
            ]
        }
        fix = next(f["fix"] for f in found if not f["ok"])
        assert fix.endswith(
            f"and that UDP 8285 (udp) passes between this host and {ip2} (firewalls, security "
            "groups)"
        )
    finally:
        w.h2.ns.run(["iptables", "-D", *rule])
    assert_healthy(w)


def test_two_leases_with_one_public_ip(world: World) -> None:
    w = world
    # a stale lease of host 1: it lost its subnet file once and took another subnet
    key = f"{ETCD_PREFIX}/subnets/10.5.200.0-24"
    ip1 = w.h1.ns.address
    w.cl.etcdctl("put", key, json.dumps({"PublicIP": str(ip1), "PublicIPv6": None}))
    try:
        rc, found = run_doctor(w)
        assert rc == 1
        sn1 = w.h1.subnet
        assert failures(found) == {
            "duplicate-public-ip": [
                f"PublicIP {ip1} holds 2 leases ({sn1}, 10.5.200.0/24): one is stale (a host "
                "that lost its subnet file took a new subnet) or two hosts announce the same "
                "address"
            ]
        }
        fix = next(f["fix"] for f in found if not f["ok"])
        assert fix == f"delete the stale lease (this host holds {sn1}): etcdctl del {key}"
    finally:
        w.cl.etcdctl("del", key)
    assert messages(assert_healthy(w), "duplicate-public-ip") == [
        "every lease has its own PublicIP (2 leases)"
    ]


def test_network_config_invalid_or_missing(world: World) -> None:
    w = world
    key = f"{ETCD_PREFIX}/config"
    good = w.cl.config
    assert good is not None
    try:
        w.cl.etcdctl("put", key, '{"Backend": {"Type": "udp"}}')
        rc, found = run_doctor(w)
        assert rc == 1
        assert failures(found) == {
            "etcd": [f'{key} is invalid: Network is missing (e.g. "Network": "10.5.0.0/16")']
        }
        w.cl.etcdctl("del", key)
        rc, found = run_doctor(w)
        assert rc == 1
        assert failures(found) == {
            "etcd": [f"{key} is missing in etcd: flanneld-py waits for it and gets no lease"]
        }
    finally:
        w.cl.etcdctl("put", key, good)
    assert_healthy(w)


def test_etcd_stopped(world: World) -> None:
    w = world
    w.cl.etcd.stop()
    try:
        rc, found = run_doctor(w)
        assert rc == 1
        assert failures(found) == {
            "etcd": [f"etcd unreachable at {w.cl.etcd.endpoint}: connection refused"]
        }
        assert messages(found, "peers") == ["not checked: etcd unreachable"]
        assert messages(found, "duplicate-public-ip") == ["not checked: etcd unreachable"]
    finally:
        w.cl.etcd.start()
    assert_healthy(w)
