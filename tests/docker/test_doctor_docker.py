"""``flanneld-py doctor`` against a real dockerd (lab/docker.py) next to a real flanneld-py.

The docker findings, each from the state that really produces it:

- docker started before flanneld-py (no ``--bip``/``--mtu``): docker0 at 172.17.0.1/16 outside
  the lease, and its containers at MTU 1500 > FLANNEL_MTU;
- the seed's trap: a ``bip`` left in daemon.json next to flanneld-py's ``--bip``: dockerd
  refuses to start, and the doctor names the key and the file in one line.

Each is then fixed as the finding's fix says, and the doctor exits 0.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.docker import Dockerd, DockerLabError, build_test_image
from lab.flanneld import FlannelCluster, Flanneld
from lab.netns import Lab

ROOT = Path(__file__).resolve().parents[2]
CONFLICT = "the following directives are specified both as a flag and in the configuration file"


@dataclass
class World:
    lab: Lab
    cl: FlannelCluster
    host: Flanneld
    dockerd: Dockerd
    tarball: Path


@pytest.fixture(scope="module")
def world(docker_ok: None, image_tar: Path) -> Iterator[World]:
    with Lab() as lab:
        cl = FlannelCluster(lab, 1).start()
        host = cl.hosts[0]
        # docker started before flanneld-py: no options file, so its own defaults
        d = Dockerd(lab, host.ns)
        yield World(lab, cl, host, d, image_tar)


def run_doctor(w: World) -> tuple[int, list[dict[str, Any]]]:
    assert w.host.docker_opts_file is not None
    argv = [
        "--subnet-file", str(w.host.subnet_file),
        "--docker-opts-file", str(w.host.docker_opts_file),
        "--docker-config", str(w.dockerd.daemon_json_path),
        "--docker-host", w.dockerd.host,
        "--etcd-endpoints", w.cl.etcd.endpoint,
        "--probe-timeout", "1",
        "--json",
    ]  # fmt: skip
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from flanneld_py.doctor import main; "
        f"sys.exit(main({argv!r}))"
    )
    proc = w.host.ns.run([sys.executable, "-c", code], check=False, timeout=60)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    found: list[dict[str, Any]] = json.loads(proc.stdout)
    return proc.returncode, found


def failures(found: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in found:
        if not f["ok"]:
            out.setdefault(f["check"], []).append(f["message"])
    return out


def test_docker_started_before_flanneld(world: World) -> None:
    w, d = world, world.dockerd
    lease = w.host.subnet
    bip = f"{lease.network_address + 1}/24"
    d.start()
    build_test_image(d, tarball=w.tarball)
    d.run_container("c1")
    rc, found = run_doctor(w)
    assert rc == 1
    assert failures(found) == {
        "docker-bridge": [
            f"docker0 has 172.17.0.1/16, outside the lease {lease} (FLANNEL_SUBNET={bip}): docker "
            "started before flanneld-py, or was not restarted after the lease changed; no other "
            "host routes its containers' addresses here"
        ],
        "mtu": [
            "docker0 MTU 1500 is larger than the lease MTU 1472 (FLANNEL_MTU): packets over 1472 "
            "bytes do not fit the overlay and are dropped",
            "container c1: eth0 MTU 1500 is larger than the lease MTU 1472 (FLANNEL_MTU): its "
            "packets over 1472 bytes do not fit the overlay (docker started without "
            "flanneld-py's --mtu?)",
        ],
    }
    fixes = [f["fix"] for f in found if not f["ok"]]
    assert fixes[0] == (
        f"restart docker so that it starts with --bip={bip} from {w.host.docker_opts_file}"
    )
    # dockerd set the FORWARD policy to DROP; flanneld-py's rules let the overlay through
    assert any(
        f["check"] == "forward" and f["message"].startswith("FORWARD policy is DROP; flanneld-py")
        for f in found
    )
    # the fix: docker restarted with flanneld-py's options, the container recreated
    d.stop()
    d.options_file = w.host.docker_opts_file
    d.start()
    c = d.run_container("c1")
    assert c.ip in lease and c.mtu() == 1472
    rc, found = run_doctor(w)
    assert failures(found) == {} and rc == 0
    assert [f["message"] for f in found if f["check"] == "mtu"] == [
        "docker0 MTU 1472 fits the lease MTU 1472",
        "1 container on docker0: none above the lease MTU 1472",
    ]


def test_bip_in_daemon_json_next_to_flanneld_options(world: World) -> None:
    w, d = world, world.dockerd
    assert d.options_file is not None  # the previous test left docker configured by flanneld-py
    d.stop()
    # the seed's daemon.json, from the days of hand-made static routes
    d.daemon_json = {"bip": "192.168.100.1/24", "insecure-registries": ["http://10.0.0.200"]}
    with pytest.raises(DockerLabError, match=CONFLICT):
        d.start()
    d.stop()  # its containerd
    rc, found = run_doctor(w)
    assert rc == 1
    bip = f"{w.host.subnet.network_address + 1}/24"
    path, opts = d.daemon_json_path, w.host.docker_opts_file
    assert failures(found) == {
        "docker-config": [
            f'{path} sets "bip": "192.168.100.1/24" and {opts} passes --bip={bip}: dockerd '
            f'refuses to start ("{CONFLICT}")'
        ],
        # a fresh host (the lab's dockerd starts on one): dockerd never got to switch it on
        "ip-forward": [
            "net.ipv4.ip_forward is 0: this host does not forward packets between the overlay "
            "and its containers"
        ],
    }
    fix = next(f["fix"] for f in found if f["check"] == "docker-config")
    assert fix == (
        f'remove "bip" from {path} (flanneld-py sets it through {opts}), then restart docker'
    )
    # the fix: remove the key (as the operator edits the file), then docker starts
    doc = json.loads(path.read_text())
    del doc["bip"]
    path.write_text(json.dumps(doc) + "\n")
    rc, found = run_doctor(w)
    assert list(failures(found)) == ["ip-forward"]
    del d.daemon_json["bip"]
    d.start()
    d.run_container("c2")
    rc, found = run_doctor(w)
    assert failures(found) == {} and rc == 0
