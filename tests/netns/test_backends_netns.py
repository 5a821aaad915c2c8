"""The vxlan and host-gw backends on real kernels: two hosts on the lab underlay, each running the
backend with RealNetOps in a child process (``ip netns exec``), checked from outside with
``ip``/``bridge`` against flannel-compat §9 and §10.

A child builds the backend, runs ``prepare()`` and ``start()`` with a fixed lease, then the
steps it is given (apply events, run a command, reconcile) and prints one JSON line: the lease
attributes, the result of each step, ``status()`` and ``alive()``. The kernel state stays when it
exits (as with flannel), so the two hosts can then talk to each other.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.netns import Container, Lab, Netns

ROOT = Path(__file__).resolve().parents[2]
PRELUDE = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
NETWORK = "10.5.0.0/16"
SUBNETS = ["10.5.1.0/24", "10.5.2.0/24"]

CHILD = """
import asyncio, json, logging, subprocess, sys
from ipaddress import IPv4Address, IPv4Network
from flanneld_py import netlink
from flanneld_py.backend._netops import RealNetOps
from flanneld_py.backend.hostgw import HostGwBackend
from flanneld_py.backend.vxlan import VxlanBackend
from flanneld_py.config import BackendConfig
from flanneld_py.lease import Lease, LeaseAdded, LeaseRemoved

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
args = json.loads(sys.argv[1])


def lease(d):
    return Lease(IPv4Network(d["subnet"]), IPv4Address(d["public_ip"]),
                 backend_type=d.get("type"), backend_data=d.get("data"))


def event(e):
    return LeaseAdded(lease(e["add"])) if "add" in e else LeaseRemoved(IPv4Network(e["remove"]))


async def main(ext):
    cfg = BackendConfig(**args["cfg"])
    cls = VxlanBackend if cfg.type == "vxlan" else HostGwBackend
    b = cls(cfg, IPv4Network(args["network"]), ext, RealNetOps())
    out = {"results": []}
    try:
        attrs = await b.prepare()
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["attrs"] = [attrs.backend_type, attrs.backend_data]
    out["mtu"] = b.mtu
    if "lease" in args:
        await b.start(lease(args["lease"]))
    for kind, arg in args.get("steps", []):
        if kind == "apply":
            await b.apply([event(e) for e in arg])
            out["results"].append(None)
        elif kind == "run":
            p = await asyncio.to_thread(subprocess.run, arg, capture_output=True, text=True)
            out["results"].append(p.returncode)
        elif kind == "reconcile":
            peers = {l.subnet: l for l in map(lease, arg)}
            out["results"].append(await b.reconcile(peers))
    out["status"] = b.status()
    out["alive"] = b.alive()
    await b.close()
    return out


print(json.dumps(asyncio.run(main(netlink.find_external_interface(args.get("iface", []))))))
"""


@dataclass
class Run:
    out: dict[str, Any]
    log: str

    @property
    def attrs(self) -> list[Any]:
        result: list[Any] = self.out["attrs"]
        return result

    def lease(self, host: Netns, subnet: str) -> dict[str, Any]:
        """Our lease as a peer sees it (built from our ``prepare()`` output)."""
        btype, data = self.attrs
        return {"subnet": subnet, "public_ip": str(host.address), "type": btype, "data": data}


def backend(
    host: Netns,
    cfg: dict[str, Any],
    lease: dict[str, Any] | None = None,
    steps: list[Any] | None = None,
    **extra: Any,
) -> Run:
    args: dict[str, Any] = {"cfg": cfg, "network": NETWORK, "steps": steps or [], **extra}
    if lease is not None:
        args["lease"] = lease
    code = PRELUDE + textwrap.dedent(CHILD)
    proc = host.run([sys.executable, "-c", code, json.dumps(args)], timeout=60)
    return Run(json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr)


def own(host: Netns, subnet: str, btype: str) -> dict[str, Any]:
    return {"subnet": subnet, "public_ip": str(host.address), "type": btype}


def lines(host: Netns, *argv: str) -> list[str]:
    out = host.run(list(argv)).stdout
    return sorted(" ".join(line.split()) for line in out.splitlines() if line.strip())


def fdb(host: Netns, dev: str = "flannel.1") -> list[str]:
    return lines(host, "bridge", "fdb", "show", "dev", dev)


def neigh(host: Netns, dev: str = "flannel.1") -> list[str]:
    return lines(host, "ip", "-4", "neigh", "show", "dev", dev)


def peer_routes(host: Netns) -> list[str]:
    """Our routes (proto 102) for destinations inside the Network, as ``ip route`` prints
    them (the bridges' connected routes are left out)."""
    return [
        r for r in lines(host, "ip", "route", "show") if r.startswith("10.5.") and " proto 102" in r
    ]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@pytest.fixture
def hosts(lab: Lab) -> list[Netns]:
    return lab.flannel_topology(n_hosts=2).hosts


VXLAN = {"type": "vxlan", "port": 8472, "vni": 1}
HOSTGW = {"type": "host-gw", "port": 0}


def vxlan_pair(hosts: list[Netns], cfg: dict[str, Any]) -> list[Run]:
    """prepare() on both hosts, then start + apply of the other's lease on each."""
    first = [backend(h, cfg) for h in hosts]
    runs = []
    for i, h in enumerate(hosts):
        other = 1 - i
        peer = first[other].lease(hosts[other], SUBNETS[other])
        runs.append(backend(h, cfg, own(h, SUBNETS[i], "vxlan"), [["apply", [{"add": peer}]]]))
    return runs


def containers(lab: Lab, hosts: list[Netns]) -> list[Container]:
    return [lab.add_container_bridge(h, SUBNETS[i]) for i, h in enumerate(hosts)]


# --- vxlan -----------------------------------------------------------------------------------


def test_vxlan_entries_ping_removal_and_reconcile(lab: Lab, hosts: list[Netns]) -> None:
    h1, h2 = hosts
    r1, r2 = vxlan_pair(hosts, VXLAN)
    mac1, mac2 = r1.attrs[1]["VtepMAC"], r2.attrs[1]["VtepMAC"]
    assert r1.attrs == ["vxlan", {"VNI": 1, "VtepMAC": mac1}] and mac1 != mac2
    assert list(r1.attrs[1]) == ["VNI", "VtepMAC"]
    assert r1.out["mtu"] == 1450 and r1.out["alive"] is None
    assert r1.out["status"]["peers_programmed"] == {"vxlan": 1, "direct": 0}

    # the device, as `ip -d link show` prints it
    detail = " ".join(h1.ip("-d", "link", "show", "flannel.1").stdout.split())
    assert "mtu 1450" in detail and f"link/ether {mac1}" in detail
    assert "vxlan id 1 local 10.99.0.11 dev eth0" in detail
    assert "dstport 8472 nolearning ttl auto" in detail
    assert "UP" in h1.ip_json("link", "show", "flannel.1")[0]["flags"]
    accept_ra = h1.run(["cat", "/proc/sys/net/ipv6/conf/flannel.1/accept_ra"]).stdout
    assert accept_ra.strip() == "0"
    assert [str(a) for a in h1.addresses("flannel.1")] == ["10.5.1.0/32"]

    # §9's three entries on each host, and nothing else
    assert peer_routes(h1) == ["10.5.2.0/24 via 10.5.2.0 dev flannel.1 proto 102 onlink"]
    assert neigh(h1) == [f"10.5.2.0 lladdr {mac2} PERMANENT"]
    assert fdb(h1) == [f"{mac2} dst 10.99.0.12 self permanent"]
    assert peer_routes(h2) == ["10.5.1.0/24 via 10.5.1.0 dev flannel.1 proto 102 onlink"]
    assert neigh(h2) == [f"10.5.1.0 lladdr {mac1} PERMANENT"]
    assert fdb(h2) == [f"{mac1} dst 10.99.0.11 self permanent"]

    # the overlay works both ways: flannel.1 to flannel.1, and container to container
    assert h1.ping("10.5.2.0", count=2) and h2.ping("10.5.1.0", count=2)
    c1, c2 = containers(lab, hosts)
    assert c1.ping(c2.address, count=2) and c2.ping(c1.address, count=2)

    # a restart: the device is reused, VtepMAC unchanged
    again = backend(h1, VXLAN)
    assert again.attrs[1]["VtepMAC"] == mac1 and "reusing flannel.1" in again.log

    # a deleted route (and neighbour) come back at reconcile; a stale peer's entries go
    p2 = r2.lease(h2, SUBNETS[1])
    stale = {
        "subnet": "10.5.9.0/24",
        "public_ip": "10.99.0.19",
        "type": "vxlan",
        "data": {"VNI": 1, "VtepMAC": "62:57:00:00:00:09"},
    }
    rec = backend(
        h1,
        VXLAN,
        own(h1, SUBNETS[0], "vxlan"),
        [
            ["apply", [{"add": p2}, {"add": stale}]],
            ["run", ["ip", "route", "del", "10.5.2.0/24"]],
            ["run", ["ip", "neigh", "del", "10.5.2.0", "dev", "flannel.1"]],
            ["reconcile", [p2]],
        ],
    )
    assert rec.out["results"][1:3] == [0, 0]
    assert sorted(rec.out["results"][3]) == sorted(
        [
            "peer 10.5.9.0/24 is gone: deleted neighbour 10.5.9.0, FDB entry 62:57:00:00:00:09, "
            "route 10.5.9.0/24",
            "peer 10.5.2.0/24: recovered neighbour 10.5.2.0, route 10.5.2.0/24",
        ]
    )
    assert peer_routes(h1) == ["10.5.2.0/24 via 10.5.2.0 dev flannel.1 proto 102 onlink"]
    assert neigh(h1) == [f"10.5.2.0 lladdr {mac2} PERMANENT"]
    assert fdb(h1) == [f"{mac2} dst 10.99.0.12 self permanent"]
    assert c1.ping(c2.address)

    # entries of a peer that vanished while we were down go at the first reconcile
    start = backend(h1, VXLAN, own(h1, SUBNETS[0], "vxlan"), [["reconcile", []]])
    assert start.out["results"] == [
        [
            f"removed stale neighbour 10.5.2.0 lladdr {mac2} dev flannel.1",
            f"removed stale FDB entry {mac2} dst 10.99.0.12 dev flannel.1",
            "removed stale route 10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink proto 102",
        ]
    ]
    assert peer_routes(h1) == [] and neigh(h1) == [] and fdb(h1) == []

    # removal: all three gone
    backend(h2, VXLAN, own(h2, SUBNETS[1], "vxlan"), [["apply", [{"remove": SUBNETS[0]}]]])
    assert peer_routes(h2) == [] and neigh(h2) == [] and fdb(h2) == []
    assert not c1.ping(c2.address, timeout=1)


def test_vxlan_premade_4789_device_is_recreated(lab: Lab, hosts: list[Netns]) -> None:
    h1, h2 = hosts
    h1.ip(
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        "10.99.0.11",
        "dev",
        "eth0",
        "dstport",
        "4789",
    )
    made = backend(h1, VXLAN)  # what the daemon's prepare() does at start
    assert "incompatible configuration (port: 4789 vs 8472" in made.log
    assert "recreating the device" in made.log
    vxlan_pair(hosts, VXLAN)
    detail = " ".join(h1.ip("-d", "link", "show", "flannel.1").stdout.split())
    assert "dstport 8472 nolearning" in detail
    assert h1.ping("10.5.2.0", count=2) and h2.ping("10.5.1.0", count=2)


def test_vxlan_direct_routing(lab: Lab, hosts: list[Netns]) -> None:
    h1, h2 = hosts
    cfg = {**VXLAN, "direct_routing": True}
    r1, _ = vxlan_pair(hosts, cfg)
    assert r1.out["mtu"] == 1450
    assert r1.out["status"]["peers_programmed"] == {"vxlan": 0, "direct": 1}
    assert peer_routes(h1) == ["10.5.2.0/24 via 10.99.0.12 dev eth0 proto 102"]
    assert peer_routes(h2) == ["10.5.1.0/24 via 10.99.0.11 dev eth0 proto 102"]
    assert fdb(h1) == [] and neigh(h1) == [] and fdb(h2) == []
    c1, c2 = containers(lab, hosts)
    assert c1.ping(c2.address, count=2) and c2.ping(c1.address, count=2)
    # an off-link peer (behind the underlay's router) takes the vxlan path
    far = {
        "subnet": "10.5.3.0/24",
        "public_ip": "10.88.0.5",
        "type": "vxlan",
        "data": {"VNI": 1, "VtepMAC": "62:57:00:00:00:05"},
    }
    backend(h1, cfg, own(h1, SUBNETS[0], "vxlan"), [["apply", [{"add": far}]]])
    assert "10.5.3.0/24 via 10.5.3.0 dev flannel.1 proto 102 onlink" in peer_routes(h1)
    assert fdb(h1) == ["62:57:00:00:00:05 dst 10.88.0.5 self permanent"]


# --- host-gw ---------------------------------------------------------------------------------


def test_hostgw_routes_reconcile_and_off_link_peer(lab: Lab, hosts: list[Netns]) -> None:
    h1, h2 = hosts
    p1 = {**own(h1, SUBNETS[0], "host-gw")}
    p2 = {**own(h2, SUBNETS[1], "host-gw")}
    far = {"subnet": "10.5.3.0/24", "public_ip": "10.88.0.5", "type": "host-gw"}
    r2 = backend(h2, HOSTGW, p2, [["apply", [{"add": p1}]]])
    assert r2.attrs == ["host-gw", None] and r2.out["mtu"] == 1500
    r1 = backend(
        h1,
        HOSTGW,
        p1,
        [
            ["apply", [{"add": p2}, {"add": far}]],
            ["run", ["ip", "route", "del", "10.5.2.0/24"]],
            ["reconcile", [p2, far]],
            ["reconcile", [p2, far]],
        ],
    )
    assert r1.out["results"][2] == ["route recovered 10.5.2.0/24 via 10.99.0.12 dev eth0"]
    assert r1.out["results"][3] == []
    assert peer_routes(h1) == ["10.5.2.0/24 via 10.99.0.12 dev eth0 proto 102"]
    assert peer_routes(h2) == ["10.5.1.0/24 via 10.99.0.11 dev eth0 proto 102"]
    # the off-link peer: reported once, clearly, and in status
    (problem,) = r1.out["status"]["problems"]
    assert "10.88.0.5" in problem and "unreachable" in problem and "gateway 10.99.0.1" in problem
    assert r1.log.count("10.88.0.5") == 1 and f"WARNING {problem}" in r1.log
    # end to end through docker0-like bridges
    c1, c2 = containers(lab, hosts)
    assert c1.ping(c2.address, count=2) and c2.ping(c1.address, count=2)
    # removal
    backend(h1, HOSTGW, p1, [["apply", [{"remove": SUBNETS[1]}]]])
    assert peer_routes(h1) == []


def test_hostgw_refuses_public_ip_not_on_interface(hosts: list[Netns]) -> None:
    h1 = hosts[0]
    h1.add_addr("eth0", "10.77.0.200/24")
    proc = h1.run(
        [
            sys.executable,
            "-c",
            PRELUDE
            + textwrap.dedent(
                """
            from flanneld_py import netlink
            from flanneld_py.backend.hostgw import HostGwBackend
            from flanneld_py.backend._base import BackendError
            from flanneld_py.backend._netops import RealNetOps
            from flanneld_py.config import BackendConfig
            import asyncio
            from ipaddress import IPv4Network
            ext = netlink.find_external_interface(["eth0"], public_ip="10.77.0.200")
            net = IPv4Network("10.5.0.0/16")
            b = HostGwBackend(BackendConfig(type="host-gw"), net, ext, RealNetOps())
            try:
                asyncio.run(b.prepare())
            except BackendError as e:
                print(e)
            """
            ),
        ]
    )
    assert "PublicIP 10.77.0.200 differs from the address 10.99.0.11 of eth0" in proc.stdout


def test_cleanup_removes_other_vni_device(hosts: list[Netns]) -> None:
    h1 = hosts[0]
    backend(h1, {**VXLAN, "vni": 2})
    assert h1.ip("link", "show", "flannel.2", check=False).returncode == 0
    proc = h1.run(
        [
            sys.executable,
            "-c",
            PRELUDE
            + textwrap.dedent(
                """
            import asyncio, json
            from ipaddress import IPv4Network
            from flanneld_py import netlink
            from flanneld_py.backend._netops import RealNetOps
            from flanneld_py.backend.cleanup import remove_other_backends
            from flanneld_py.config import BackendConfig
            ext = netlink.find_external_interface()
            cfg = BackendConfig(type="vxlan", port=8472, vni=1)
            NET = "10.5.0.0/16"
            print(json.dumps(asyncio.run(
                remove_other_backends("vxlan", cfg, IPv4Network(NET), ext, RealNetOps()))))
            """
            ),
        ]
    )
    (line,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line.startswith("removed vxlan device flannel.2 (VNI 2)")
    assert h1.ip("link", "show", "flannel.2", check=False).returncode != 0
