"""The vxlan and host-gw backends through the real daemon: three hosts per backend in namespaces,
real etcd, real kernel VXLAN devices and routes, as flannel-compat §9 and §10 describe them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab.flanneld import ETCD_PREFIX as PREFIX
from lab.flanneld import FlannelCluster, Flanneld
from lab.netns import Container, Lab, Netns, wait_for
from tests.conftest import require
from tests.netns.test_daemon import tcp_transfer

Cluster = tuple[FlannelCluster, list[Container]]


def config(backend: dict[str, Any]) -> str:
    return json.dumps({"Network": "10.5.0.0/16", "Backend": backend}, separators=(",", ":"))


def cluster_of(backend: dict[str, Any], n_hosts: int = 3) -> Iterator[Cluster]:
    require("netns", "etcd")
    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=n_hosts, config=config(backend)).start()
        containers = [cl.add_container(i) for i in range(n_hosts)]
        cl.wait_peers(n_hosts - 1)
        yield cl, containers


@pytest.fixture(scope="module")
def vxlan() -> Iterator[Cluster]:
    yield from cluster_of({"Type": "vxlan"})


@pytest.fixture(scope="module")
def hostgw() -> Iterator[Cluster]:
    yield from cluster_of({"Type": "host-gw"})


def fdb(ns: Netns, dev: str = "flannel.1") -> list[str]:
    out = ns.run(["bridge", "fdb", "show", "dev", dev]).stdout
    return sorted(line.strip() for line in out.splitlines() if " dst " in line)


def neigh(ns: Netns, dev: str = "flannel.1") -> list[str]:
    out = ns.run(["ip", "neigh", "show", "dev", dev]).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def routes(ns: Netns, *what: str) -> list[str]:
    out = ns.run(["ip", "route", "show", *what]).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def mac_of(cl: FlannelCluster, h: Flanneld) -> str:
    lease = cl.leases_by_subnet()[str(h.subnet)]
    return str(lease["BackendData"]["VtepMAC"])


def all_ping(containers: list[Container]) -> None:
    for a in containers:
        for b in containers:
            if a is not b:
                assert a.ping(b.address, count=2, timeout=2), f"{a.address} -> {b.address}"


# ---------------------------------------------------------------------------------------------
# vxlan


def test_vxlan_leases_are_byte_compatible_with_flannel(vxlan: Cluster) -> None:
    cl, _ = vxlan
    raw = cl.etcdctl("get", "--prefix", f"{PREFIX}/subnets/").splitlines()
    values = dict(zip(raw[0::2], raw[1::2], strict=True))
    for h in cl.hosts:
        key = f"{PREFIX}/subnets/{h.subnet.network_address}-24"
        mac = h.ns.ip_json("link", "show", "flannel.1")[0]["address"]
        assert values[key] == (
            f'{{"PublicIP":"{h.ns.address}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}'
        )
        assert h.subnet_env()["FLANNEL_MTU"] == "1450"


def test_vxlan_device_and_per_peer_entries_are_flannels(vxlan: Cluster) -> None:
    cl, _ = vxlan
    for h in cl.hosts:
        link = h.ns.ip_json("-d", "link", "show", "flannel.1")[0]
        info = link["linkinfo"]["info_data"]
        assert link["mtu"] == 1450
        assert (info["id"], info["local"], info["port"], info["learning"]) == (
            1,
            str(h.ns.address),
            8472,
            False,
        )
        assert [str(a) for a in h.ns.addresses("flannel.1")] == [f"{h.subnet.network_address}/32"]
        others = [o for o in cl.hosts if o is not h]
        assert fdb(h.ns) == sorted(
            f"{mac_of(cl, o)} dst {o.ns.address} self permanent" for o in others
        )
        assert neigh(h.ns) == sorted(
            f"{o.subnet.network_address} lladdr {mac_of(cl, o)} PERMANENT" for o in others
        )
        for o in others:
            sn = o.subnet
            assert routes(h.ns, str(sn)) == [
                f"{sn} via {sn.network_address} dev flannel.1 proto 102 onlink"
            ]
        # no route for the whole network on flannel.1, only the guard
        assert routes(h.ns, "10.5.0.0/16") == [
            "unreachable 10.5.0.0/16 proto 102 metric 2147418112"
        ]


def test_vxlan_containers_reach_each_other_and_tcp_is_exact(vxlan: Cluster, tmp_path: Any) -> None:
    _, containers = vxlan
    all_ping(containers)
    c1, c2, _ = containers
    peer, n, got, want = tcp_transfer(c1, c2, tmp_path, 4 << 20)
    assert (n, got, peer) == (4 << 20, want, str(c1.address))


def test_vxlan_deleted_route_neighbour_and_fdb_entry_come_back(vxlan: Cluster) -> None:
    cl, containers = vxlan
    h, o = cl.hosts[0], cl.hosts[1]
    sn = o.subnet
    h.ns.ip("route", "del", str(sn))
    h.ns.ip("neigh", "del", str(sn.network_address), "dev", "flannel.1")
    h.ns.run(["bridge", "fdb", "del", mac_of(cl, o), "dev", "flannel.1", "dst", str(o.ns.address)])
    wait_for(lambda: routes(h.ns, str(sn)), 15, 0.2, "the route to come back")
    wait_for(lambda: len(fdb(h.ns)) == 2 and len(neigh(h.ns)) == 2, 15, 0.2, "neigh + fdb")
    assert containers[0].ping(containers[1].address, count=2, timeout=2)
    assert "Traceback" not in h.log_text()


def test_vxlan_lease_removal_removes_the_entries_and_restart_keeps_the_mac(
    vxlan: Cluster,
) -> None:
    cl, containers = vxlan
    h1, h3 = cl.hosts[0], cl.hosts[2]
    sn, mac = h3.subnet, mac_of(cl, h3)
    assert h3.stop() == 0
    # the kernel path stays while our daemon is down (flannel keeps it too)
    assert fdb(h3.ns) and routes(h3.ns, str(h1.subnet))
    cl.etcdctl("del", f"{PREFIX}/subnets/{sn.network_address}-24")
    wait_for(lambda: not routes(h1.ns, str(sn)), 10, 0.1, "the route to go")
    assert all(mac not in line for line in fdb(h1.ns) + neigh(h1.ns))
    h3.start()
    assert h3.subnet == sn and mac_of(cl, h3) == mac
    cl.wait_peers(2)
    wait_for(lambda: routes(h1.ns, str(sn)), 10, 0.1, "the route to come back")
    all_ping(containers)


def test_vxlan_a_wrong_premade_device_is_recreated() -> None:
    require("netns", "etcd")
    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=2, config=config({"Type": "vxlan"}))
        h = cl.hosts[1].ns
        h.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "4789",
             "dev", "eth0", "local", str(h.address))  # fmt: skip
        cl.start()
        containers = [cl.add_container(i) for i in range(2)]
        cl.wait_peers(1)
        info = h.ip_json("-d", "link", "show", "flannel.1")[0]["linkinfo"]["info_data"]
        assert info["port"] == 8472
        assert "recreat" in cl.hosts[1].log_text()
        all_ping(containers)


def test_vxlan_direct_routing_uses_plain_routes_on_the_link() -> None:
    require("netns", "etcd")
    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=2, config=config({"Type": "vxlan", "DirectRouting": True}))
        cl.start()
        containers = [cl.add_container(i) for i in range(2)]
        cl.wait_peers(1)
        h1, h2 = cl.hosts
        assert routes(h1.ns, str(h2.subnet)) == [
            f"{h2.subnet} via {h2.ns.address} dev eth0 proto 102"
        ]
        assert fdb(h1.ns) == [] and neigh(h1.ns) == []
        all_ping(containers)


def test_changing_the_backend_type_removes_the_old_backends_state() -> None:
    require("netns", "etcd")
    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=2, config=config({"Type": "vxlan"})).start()
        cl.wait_peers(1)
        h1 = cl.hosts[0]
        assert "flannel.1" in {lk["ifname"] for lk in h1.ns.ip_json("link", "show")}
        for h in cl.hosts:
            h.stop()
        cl.etcdctl("put", f"{PREFIX}/config", config({"Type": "host-gw"}))
        cl.start_daemons()
        containers = [cl.add_container(i) for i in range(2)]
        cl.wait_peers(1)
        assert "flannel.1" not in {lk["ifname"] for lk in h1.ns.ip_json("link", "show")}
        h2 = cl.hosts[1]
        assert routes(h1.ns, str(h2.subnet)) == [
            f"{h2.subnet} via {h2.ns.address} dev eth0 proto 102"
        ]
        all_ping(containers)


# ---------------------------------------------------------------------------------------------
# host-gw


def test_hostgw_routes_mtu_and_traffic(hostgw: Cluster, tmp_path: Any) -> None:
    cl, containers = hostgw
    for h in cl.hosts:
        assert h.subnet_env()["FLANNEL_MTU"] == "1500"
        lease = cl.leases_by_subnet()[str(h.subnet)]
        assert lease == {
            "PublicIP": str(h.ns.address),
            "PublicIPv6": None,
            "BackendType": "host-gw",
        }
        for o in cl.hosts:
            if o is not h:
                assert routes(h.ns, str(o.subnet)) == [
                    f"{o.subnet} via {o.ns.address} dev eth0 proto 102"
                ]
    all_ping(containers)
    c1, _, c3 = containers
    peer, n, got, want = tcp_transfer(c3, c1, tmp_path, 4 << 20)
    assert (n, got, peer) == (4 << 20, want, str(c3.address))


def test_hostgw_deleted_route_comes_back_within_10s(hostgw: Cluster) -> None:
    cl, containers = hostgw
    h, o = cl.hosts[0], cl.hosts[1]
    h.ns.ip("route", "del", str(o.subnet))
    t0 = time.monotonic()
    wait_for(lambda: routes(h.ns, str(o.subnet)), 15, 0.1, "the route to come back")
    assert time.monotonic() - t0 < 11
    assert containers[0].ping(containers[1].address, count=2, timeout=2)


def test_hostgw_off_link_peer_is_reported_once(hostgw: Cluster) -> None:
    cl, containers = hostgw
    h = cl.hosts[0]
    key = f"{PREFIX}/subnets/10.5.250.0-24"
    cl.etcdctl("put", key, '{"PublicIP":"10.88.0.5","PublicIPv6":null,"BackendType":"host-gw"}')
    try:
        wait_for(lambda: "10.88.0.5" in json.dumps(h.status()["backend"]), 10, 0.2, "status")
        time.sleep(11)  # one reconcile round later: still one line, no route
        lines = [line for line in h.log_text().splitlines() if "10.88.0.5" in line]
        assert len([line for line in lines if "WARNING" in line or "ERROR" in line]) == 1, lines
        assert routes(h.ns, "10.5.250.0/24") == []
        assert h.running and containers[0].ping(containers[1].address, count=1, timeout=2)
    finally:
        cl.etcdctl("del", key)


def test_hostgw_refuses_a_public_ip_other_than_the_interface_address(hostgw: Cluster) -> None:
    cl, _ = hostgw
    lab, ns = cl.lab, cl.hosts[2].ns
    cl.hosts[2].stop()
    try:
        other = Flanneld(lab, ns, [cl.etcd.endpoint], workdir=lab.tmpdir / "natted",
                         healthz_port=0, extra_args=["--public-ip", "10.99.0.200"])  # fmt: skip
        other.start(wait=False)
        wait_for(lambda: not other.running, 20, 0.1, "the daemon to exit")
        assert other.returncode == 1
        errors = [line for line in other.log_text().splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "PublicIP" in errors[0], other.log_text()
    finally:
        cl.hosts[2].start()
