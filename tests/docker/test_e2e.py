"""flanneld-py end to end with Docker: etcd on the underlay, flanneld-py and dockerd on 3 hosts,
once per backend (udp, vxlan, host-gw).

dockerd takes its options from the file flanneld-py wrote and finds ip_forward off (so it sets the
FORWARD policy to DROP, as on a fresh host): cross-host container traffic then works only through
flanneld-py's tunnel, routes and FORWARD rules. If flanneld-py does not come up, every test fails
at the fixture with the daemon's log tail.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from lab.demo import Overlay, build_overlay, ping, transfer, underlay_peer_server
from lab.docker import RunningContainer, leftovers
from lab.flanneld import FlanneldNotReady
from lab.netns import Lab, wait_for

N_HOSTS = 3
NETWORK = IPv4Network("10.5.0.0/16")
#: the containers' MTU per backend: the underlay's 1500 minus the encapsulation
MTU = {"udp": 1500 - 28, "vxlan": 1500 - 50, "host-gw": 1500}
#: extra flanneld-py flags for a run, e.g. FLANNELD_E2E_ARGS="--event-loop=asyncio --engine=python"
EXTRA_ARGS = shlex.split(os.environ.get("FLANNELD_E2E_ARGS", ""))


def _cross_pairs(ov: Overlay) -> list[tuple[RunningContainer, RunningContainer]]:
    cs = ov.containers()
    return [(a, b) for a in cs for b in cs if ov.host_of(a) is not ov.host_of(b)]


@pytest.fixture(scope="module", params=list(MTU))
def overlay(request: pytest.FixtureRequest, docker_ok: None, image_tar: Path) -> Iterator[Overlay]:
    lab = Lab()
    try:
        failure = ""
        try:
            ov = build_overlay(
                lab,
                N_HOSTS,
                network=str(NETWORK),
                flanneld_args=EXTRA_ARGS,
                tarball=image_tar,
                backend=request.param,
            )
        except FlanneldNotReady as exc:
            failure = str(exc)  # failed outside the except: no chained traceback
        if failure:
            pytest.fail(failure, pytrace=False)
        yield ov
    finally:
        lab.close()


def test_files_written_by_flanneld_feed_dockerd(overlay: Overlay) -> None:
    leases = []
    for h in overlay.hosts:
        env = h.flanneld.subnet_env()
        assert env["FLANNEL_NETWORK"] == str(NETWORK)
        bip = IPv4Interface(env["FLANNEL_SUBNET"])
        assert bip.network.subnet_of(NETWORK) and bip.ip == bip.network.network_address + 1
        mtu = MTU[overlay.backend]
        assert env["FLANNEL_MTU"] == str(mtu) and env["FLANNEL_IPMASQ"] == "true"
        opts = h.flanneld.docker_options()
        assert opts == [f"--bip={bip}", "--ip-masq=false", f"--mtu={mtu}"]
        assert h.dockerd is not None and h.dockerd.args[-3:] == opts
        assert h.dockerd.bridge_addresses() == [str(bip)]
        leases.append(bip.network)
    assert len(set(leases)) == N_HOSTS, leases
    stored = overlay.cluster.leases_by_subnet()
    assert sorted(stored) == sorted(str(n) for n in leases)
    for h in overlay.hosts:
        lease = stored[str(h.flanneld.subnet)]
        assert lease.get("PublicIP") == str(h.address)
        assert lease.get("BackendType") == (None if overlay.backend == "udp" else overlay.backend)


def test_status_reports_lease_and_peers(overlay: Overlay) -> None:
    for h in overlay.hosts:
        st = h.flanneld.status()
        assert st["lease"]["subnet"] == str(h.flanneld.subnet)
        assert st["lease"]["public_ip"] == str(h.address)
        others = {str(o.flanneld.subnet): str(o.address) for o in overlay.hosts if o is not h}
        assert st["peers"] == others


def test_containers_get_the_lease_and_its_mtu(overlay: Overlay) -> None:
    for h in overlay.hosts:
        for c in h.containers:
            assert c.ip in h.flanneld.subnet, (c, h.flanneld.subnet)
            assert c.mtu() == h.flanneld.mtu == MTU[overlay.backend]


def test_forward_policy_is_drop(overlay: Overlay) -> None:
    # so the pings below prove flanneld-py's FORWARD rules are in place
    for h in overlay.hosts:
        rules = h.ns.run(["iptables", "-S", "FORWARD"]).stdout.splitlines()
        assert rules[0] == "-P FORWARD DROP", rules


def test_every_container_pings_every_other_across_hosts(overlay: Overlay) -> None:
    failed = [f"{a.name}->{b.name}" for a, b in _cross_pairs(overlay) if not ping(a, b)]
    assert failed == []


def test_far_side_sees_the_container_address(overlay: Overlay) -> None:
    seen = {(a.name, b.name): (a.peer_address(b.ip), str(a.ip)) for a, b in _cross_pairs(overlay)}
    wrong = {pair: got for pair, (got, own) in seen.items() if got != own}
    assert wrong == {}, "SNAT inside the overlay"


def test_traffic_leaving_the_overlay_is_masqueraded(overlay: Overlay) -> None:
    ul = overlay.topo.underlay
    underlay_peer_server(overlay.lab, ul, overlay.topo.gateway)
    for h in overlay.hosts:
        for c in h.containers:
            assert c.peer_address(overlay.topo.gateway) == str(h.address), c


def test_tcp_transfer_arrives_intact(overlay: Overlay) -> None:
    a, b = overlay.hosts[0].containers[0], overlay.hosts[-1].containers[0]
    sent, got = transfer(a, b, size_kib=4096)
    assert sent == got
    sent, got = transfer(b, a, size_kib=1024)
    assert sent == got


def test_flanneld_restart_keeps_subnet_and_traffic_resumes(overlay: Overlay) -> None:
    h = overlay.hosts[0]
    other = overlay.hosts[1]
    assert h.dockerd is not None
    before = h.flanneld.subnet
    dockerd_pid = h.dockerd.pid
    rc = h.flanneld.stop()
    assert rc == 0, f"flanneld-py exited {rc} on SIGTERM:\n{h.flanneld.log_tail()}"
    h.flanneld.start()
    assert h.flanneld.subnet == before
    assert h.flanneld.status()["lease"]["subnet"] == str(before)
    assert h.dockerd.pid == dockerd_pid and h.dockerd.bridge_addresses() == [
        f"{before.network_address + 1}/{before.prefixlen}"
    ]
    a, b = h.containers[0], other.containers[0]
    wait_for(lambda: a.ping(b.ip) and b.ping(a.ip), 15, 0.2, "traffic after the restart")
    assert a.peer_address(b.ip) == str(a.ip)
    # the peers learnt nothing new: same lease, same public IP
    st = other.flanneld.status()
    assert st["peers"][str(before)] == str(h.address)


def test_zz_teardown_leaves_nothing(overlay: Overlay) -> None:
    engines = [h.dockerd for h in overlay.hosts if h.dockerd is not None]
    pids = [h.flanneld.pid for h in overlay.hosts] + [overlay.etcd.pid]
    overlay.lab.close()
    assert overlay.lab.cleanup_errors == []
    assert leftovers(overlay.lab, engines) == []
    assert all(p is None or not Path(f"/proc/{p}").exists() for p in pids)
