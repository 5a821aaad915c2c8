"""flanneld-py end to end in network namespaces: real etcd, real TUN, real CLI, real packets.

Three hosts on an underlay bridge, etcd on the underlay, each host with a docker0-like bridge on
its leased /24 and a "container" namespace on it. Hosts run different engines (C, Python, C), so
these tests also prove the two engines interoperate on the wire.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest

from lab.flanneld import ETCD_PREFIX as PREFIX
from lab.flanneld import FlannelCluster
from lab.netns import Container, Lab, wait_for
from lab.transfer import tcp_receiver
from tests.conftest import require


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[FlannelCluster, list[Container]]]:
    require("netns", "etcd")
    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=3, engines=["c", "python", "c"]).start()
        containers = [cl.add_container(i) for i in range(3)]
        cl.wait_peers(2)
        yield cl, containers


def test_three_hosts_three_leases_and_flannel_files(
    cluster: tuple[FlannelCluster, list[Container]],
) -> None:
    cl, _ = cluster
    leases = cl.leases()
    assert len(leases) == 3
    by_ip = {v["PublicIP"]: k for k, v in leases.items()}
    for h in cl.hosts:
        key = by_ip[str(h.ns.address)]
        subnet = h.subnet
        assert key == f"{PREFIX}/subnets/{subnet.network_address}-24"
        want: dict[str, object] = {"PublicIP": str(h.ns.address), "PublicIPv6": None}
        if h.engine == "c":  # offload auto: it completes partial checksums, and says so
            want["BackendData"] = {"Capabilities": ["partial-csum"]}
        assert leases[key] == want
        assert h.subnet_file.read_text() == (
            "FLANNEL_NETWORK=10.5.0.0/16\n"
            f"FLANNEL_SUBNET={subnet.network_address + 1}/24\n"
            "FLANNEL_MTU=1472\n"
            "FLANNEL_IPMASQ=false\n"
        )
        assert h.docker_opts_file.read_text() == (
            f'DOCKER_OPT_BIP="--bip={subnet.network_address + 1}/24"\n'
            'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
            'DOCKER_OPT_MTU="--mtu=1472"\n'
            f'DOCKER_NETWORK_OPTIONS=" --bip={subnet.network_address + 1}/24 --ip-masq=true '
            '--mtu=1472"\n'
        )
        assert oct(h.subnet_file.stat().st_mode & 0o777) == "0o644"
        st = h.status()
        others = {str(o.subnet): str(o.ns.address) for o in cl.hosts if o is not h}
        assert st["peers"] == others
        assert st["lease"]["subnet"] == str(subnet)
        assert h.healthz() == (200, "ok\n")
        # flannel0: lease address /32, MTU = eth0 - 28, a route for the whole network
        link = h.ns.ip_json("link", "show", "flannel0")[0]
        assert link["mtu"] == 1472
        assert [str(a) for a in h.ns.addresses("flannel0")] == [f"{subnet.network_address}/32"]
        routes = h.ns.ip_json("route", "show", "10.5.0.0/16")
        assert routes and routes[0]["dev"] == "flannel0"
    assert len({h.subnet for h in cl.hosts}) == 3


def test_every_container_reaches_every_other(
    cluster: tuple[FlannelCluster, list[Container]],
) -> None:
    _, containers = cluster
    for a in containers:
        for b in containers:
            if a is not b:
                assert a.ping(b.address, count=2, timeout=2), f"{a.address} -> {b.address}"


RECEIVER = tcp_receiver(5201, timeout=30)

SENDER = r"""
import socket, sys
data = open(sys.argv[2], "rb").read()
c = socket.create_connection((sys.argv[1], 5201), timeout=30); c.sendall(data); c.close()
"""


def tcp_transfer(src: Container, dst: Container, tmp: Any, size: int) -> tuple[str, int, str, str]:
    payload = tmp / f"payload-{size}"
    data = bytes(
        b for i in range(size // 32) for b in hashlib.sha256(i.to_bytes(8, "big")).digest()
    )
    payload.write_bytes(data)
    log = tmp / f"receiver-{src.name}-{dst.name}.log"
    rx = dst.popen([sys.executable, "-c", RECEIVER], log_path=log)
    wait_for(lambda: "listening" in log.read_text(), 10, 0.05, "receiver")
    src.run([sys.executable, "-c", SENDER, str(dst.address), str(payload)], timeout=60)
    wait_for(lambda: rx.poll() is not None, 30, 0.05, "receiver to finish")
    peer, n, digest = log.read_text().split()[1:4]
    return peer, int(n), digest, hashlib.sha256(data).hexdigest()


def test_tcp_transfer_arrives_intact_with_source_ip_kept(
    cluster: tuple[FlannelCluster, list[Container]], tmp_path: Any
) -> None:
    _, (c1, c2, c3) = cluster
    for src, dst in ((c1, c2), (c3, c1)):  # C->Python engine, C->C engine
        peer, n, got, want = tcp_transfer(src, dst, tmp_path, 4 << 20)
        assert (n, got) == (4 << 20, want)
        assert peer == str(src.address)  # no SNAT inside the overlay


FORGE = r"""
import socket, sys
from scapy.layers.inet import IP, UDP
pkt = bytes(IP(src=sys.argv[2], dst=sys.argv[3], ttl=64) / UDP(sport=1234, dport=9999) / b"forged")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(pkt, (sys.argv[1], 8285))
"""

LISTEN = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9999)); s.settimeout(3)
print("listening", flush=True)
try:
    data, peer = s.recvfrom(2048); print("GOT", peer[0], data, flush=True)
except socket.timeout:
    print("nothing", flush=True)
"""


def drops(st: dict[str, Any]) -> int:
    return int(st["engine"]["drop_udp_wrong_peer"]) + int(st["engine"]["drop_udp_unknown_src"])


def test_forged_datagram_from_a_non_peer_is_dropped_and_counted(
    cluster: tuple[FlannelCluster, list[Container]], tmp_path: Any
) -> None:
    cl, (c1, c2, _) = cluster
    h1 = cl.hosts[0]
    before = drops(h1.status())
    log = tmp_path / "listen.log"
    listener = c1.popen([sys.executable, "-c", LISTEN], log_path=log)
    wait_for(lambda: "listening" in log.read_text(), 10, 0.05, "listener")
    # from the underlay (10.99.0.1: not a peer), pretending to be c2 (a real peer's container)
    cl.topo.underlay.run(
        [sys.executable, "-c", FORGE, str(h1.ns.address), str(c2.address), str(c1.address)]
    )
    wait_for(lambda: listener.poll() is not None, 10, 0.05, "listener to finish")
    assert "nothing" in log.read_text()
    assert drops(h1.status()) >= before + 5


def test_lease_removal_removes_routes_and_restart_takes_the_subnet_back(
    cluster: tuple[FlannelCluster, list[Container]],
) -> None:
    cl, (c1, _, c3) = cluster
    h3 = cl.hosts[2]
    subnet = h3.subnet
    t0 = time.monotonic()
    assert h3.stop() == 0
    assert time.monotonic() - t0 < 2.5  # clean SIGTERM shutdown within 2 s (+ process reaping)
    assert "flannel0" not in h3.ns.run(["ip", "-o", "link"]).stdout
    # normal shutdown keeps the lease: peers keep their route
    assert any(v["PublicIP"] == str(h3.ns.address) for v in cl.leases().values())
    cl.etcdctl("del", f"{PREFIX}/subnets/{subnet.network_address}-24")
    wait_for(lambda: str(subnet) not in cl.hosts[0].status()["peers"], 10, 0.1, "route removal")
    assert str(subnet) not in cl.hosts[1].status()["peers"]
    assert not c1.ping(c3.address, count=1, timeout=1)
    # restart: the subnet file brings the same subnet back (nobody took it meanwhile)
    h3.start()
    assert h3.subnet == subnet
    cl.wait_peers(2)
    assert c1.ping(c3.address, count=3, timeout=2)
    assert c3.ping(c1.address, count=1, timeout=2)


def test_restart_with_lease_kept_reuses_subnet_by_public_ip(
    cluster: tuple[FlannelCluster, list[Container]],
) -> None:
    cl, (c1, c2, _) = cluster
    h1 = cl.hosts[0]
    subnet = h1.subnet
    h1.subnet_file.unlink()  # only the lease in etcd (same PublicIP) can bring it back
    assert h1.stop() == 0
    h1.start()
    assert h1.subnet == subnet
    cl.wait_peers(2)
    assert c2.ping(c1.address, count=3, timeout=2)


def test_unreachable_etcd_waits_and_reports_unhealthy(
    cluster: tuple[FlannelCluster, list[Container]],
) -> None:
    cl, _ = cluster
    h = cl.hosts[1]
    assert h.stop() == 0
    h.etcd_endpoints = ["http://10.99.0.1:2999"]  # nothing listens there
    try:
        h.start(wait=False)
        wait_for(lambda: h.healthz()[0] == 503, 15, 0.2, "healthz 503")
        body = h.healthz()[1]
        assert "lease" in body and body.endswith("\n") and body.count("\n") == 1
        wait_for(lambda: "etcd" in h.log_tail(), 15, 0.2, "a log line about etcd")
        assert "Traceback" not in h.log_text()
        assert h.proc is not None and h.proc.poll() is None  # waits, does not exit
        t0 = time.monotonic()
        assert h.stop() == 0
        assert time.monotonic() - t0 < 2.5
    finally:
        h.etcd_endpoints = [cl.etcd.endpoint]
        if h.proc is None or h.proc.poll() is not None:
            h.start()


def test_peer_address_is_the_underlay_address(
    cluster: tuple[FlannelCluster, list[Container]],
) -> None:
    cl, _ = cluster
    for h in cl.hosts:
        assert IPv4Address(h.status()["lease"]["public_ip"]) == h.ns.address


UNREACH = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.setsockopt(socket.SOL_IP, 11, 1)  # IP_RECVERR: report "net unreachable", a soft error
s.connect((sys.argv[1], 9)); s.send(b"x")
try:
    s.recv(100); print("answer")
except socket.timeout:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
"""


def test_unleased_destination_gets_icmp_net_unreachable(
    cluster: tuple[FlannelCluster, list[Container]],
) -> None:
    cl, (c1, _, _) = cluster
    leased = {h.subnet for h in cl.hosts}
    free = next(
        f"10.5.{i}.7"
        for i in range(1, 255)
        if not any(IPv4Address(f"10.5.{i}.7") in s for s in leased)
    )
    assert all(IPv4Address(free) not in s for s in leased)
    before = cl.hosts[0].status()["engine"]["icmp_unreachable_sent"]
    out = c1.run([sys.executable, "-c", UNREACH, free]).stdout.strip()
    # the engine's ICMP (from flannel0's address) made it back to the container's socket
    assert out == "ENETUNREACH"
    assert cl.hosts[0].status()["engine"]["icmp_unreachable_sent"] >= before + 1
