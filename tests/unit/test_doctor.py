"""``flanneld-py doctor``'s decisions on crafted facts (pure: no root, no network), its flags
and its output format."""

from __future__ import annotations

import argparse
import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from flanneld_py import doctor
from flanneld_py.doctor import (
    ContainerMtu,
    Finding,
    LeaseInfo,
    PeerProbe,
    PeerRoute,
    SubnetEnv,
    check_docker_bridge,
    check_docker_config,
    check_duplicate_public_ips,
    check_etcd,
    check_forward,
    check_ip_forward,
    check_mtu,
    check_peers,
    check_rp_filter,
    check_subnet_file,
    docker_flags,
    parse_subnet_env,
)

NET = IPv4Network("10.5.0.0/16")
LEASE = SubnetEnv(NET, IPv4Interface("10.5.7.1/24"), 1472)
OPTS_PATH = "/run/flannel/docker"
CONF_PATH = "/etc/docker/daemon.json"
OPTS = {"DOCKER_NETWORK_OPTIONS": " --bip=10.5.7.1/24 --ip-masq=true --mtu=1472"}
PREFIX = "/coreos.com/network"


def one(findings: list[Finding]) -> Finding:
    assert len(findings) == 1, findings
    return findings[0]


def lease(subnet: str, ip: str, btype: str | None = None) -> LeaseInfo:
    net = IPv4Network(subnet)
    key = f"{PREFIX}/subnets/{net.network_address}-{net.prefixlen}"
    return LeaseInfo(key, net, IPv4Address(ip), btype)


# -- the finding line ----------------------------------------------------------------------------


def test_finding_lines_and_json() -> None:
    bad = Finding("x", False, "what\nis wrong", "do  this")
    assert bad.line() == "[FAIL] x: what is wrong -- fix: do this"
    assert bad.as_json() == {
        "check": "x",
        "ok": False,
        "message": "what is wrong",
        "fix": "do this",
    }
    assert Finding("x", True, "fine").line() == "[ok] x: fine"
    assert Finding("x", True, "not checked", skipped=True).line() == "[info] x: not checked"


# -- subnet.env ----------------------------------------------------------------------------------


def test_subnet_file() -> None:
    env = {"FLANNEL_NETWORK": "10.5.0.0/16", "FLANNEL_SUBNET": "10.5.7.1/24", "FLANNEL_MTU": "1472"}
    finding, parsed = check_subnet_file("/run/flannel/subnet.env", env)
    assert parsed == LEASE
    assert finding.line() == (
        "[ok] subnet-file: /run/flannel/subnet.env: lease 10.5.7.0/24 in 10.5.0.0/16, MTU 1472"
    )
    finding, parsed = check_subnet_file("/run/flannel/subnet.env", None)
    assert parsed is None
    assert finding.line() == (
        "[FAIL] subnet-file: /run/flannel/subnet.env does not exist: flanneld-py is not running, "
        "has no lease yet, or writes another --subnet-file -- fix: start flanneld-py and read its "
        "log (journalctl -u flanneld-py)"
    )
    finding, parsed = check_subnet_file("/s", {**env, "FLANNEL_MTU": ""})
    assert parsed is None
    assert finding.message.startswith("/s holds no valid lease (")
    assert parse_subnet_env({k: v for k, v in env.items() if k != "FLANNEL_SUBNET"}) == (
        "FLANNEL_SUBNET is missing"
    )
    assert parse_subnet_env({**env, "FLANNEL_SUBNET": "10.6.0.1/24"}) == (
        "FLANNEL_SUBNET=10.6.0.1/24 is not inside FLANNEL_NETWORK=10.5.0.0/16"
    )


# -- 1. daemon.json against /run/flannel/docker --------------------------------------------------


def test_docker_flags() -> None:
    assert docker_flags(OPTS) == {"bip": "10.5.7.1/24", "ip-masq": "true", "mtu": "1472"}
    assert docker_flags({"DOCKER_NETWORK_OPTIONS": "--bip 10.5.7.1/24 --label a"}) == {
        "bip": "10.5.7.1/24"
    }
    assert docker_flags({"DOCKER_NETWORK_OPTIONS": "'unterminated"}) == {}
    assert docker_flags({}) == {}


def test_bip_in_daemon_json_is_the_seed_case() -> None:
    text = '{"bip":"192.168.100.1/24", "registry-mirrors": ["https://m.example"]}'
    f = one(check_docker_config(CONF_PATH, text, OPTS_PATH, OPTS))
    assert f.line() == (
        '[FAIL] docker-config: /etc/docker/daemon.json sets "bip": "192.168.100.1/24" and '
        '/run/flannel/docker passes --bip=10.5.7.1/24: dockerd refuses to start ("the following '
        'directives are specified both as a flag and in the configuration file") -- fix: remove '
        '"bip" from /etc/docker/daemon.json (flanneld-py sets it through /run/flannel/docker), '
        "then restart docker"
    )


def test_every_conflicting_key_is_one_line() -> None:
    text = '{"mtu": 1500, "ip-masq": false, "bip": "192.168.100.1/24", "debug": true}'
    found = check_docker_config(CONF_PATH, text, OPTS_PATH, OPTS)
    assert [f.ok for f in found] == [False, False, False]
    assert [f.message.split(" and ")[0] for f in found] == [
        '/etc/docker/daemon.json sets "bip": "192.168.100.1/24"',
        '/etc/docker/daemon.json sets "mtu": 1500',
        '/etc/docker/daemon.json sets "ip-masq": false',
    ]
    assert "passes --mtu=1472:" in found[1].message
    assert "passes --ip-masq=true:" in found[2].message


def test_daemon_json_without_conflicts() -> None:
    f = one(check_docker_config(CONF_PATH, '{"debug": true}', OPTS_PATH, OPTS))
    assert f.line() == (
        "[ok] docker-config: /etc/docker/daemon.json repeats none of /run/flannel/docker's "
        "options (--bip, --ip-masq, --mtu)"
    )
    f = one(check_docker_config(CONF_PATH, None, OPTS_PATH, OPTS))
    assert f.line() == (
        "[ok] docker-config: /etc/docker/daemon.json does not exist: nothing conflicts with "
        "/run/flannel/docker"
    )
    assert one(check_docker_config(CONF_PATH, "", OPTS_PATH, OPTS)).ok
    # a bip without flanneld-py's --bip is no conflict (docker-bridge judges the address)
    assert one(check_docker_config(CONF_PATH, '{"bip": "1.2.3.1/24"}', OPTS_PATH, {})).ok


def test_daemon_json_that_dockerd_cannot_read() -> None:
    f = one(check_docker_config(CONF_PATH, "{bip: 1}", OPTS_PATH, OPTS))
    assert f.line() == (
        "[FAIL] docker-config: /etc/docker/daemon.json is not valid JSON (Expecting property "
        "name enclosed in double quotes: line 1 column 2 (char 1)): dockerd refuses to start -- "
        "fix: correct /etc/docker/daemon.json or remove it, then restart docker"
    )
    f = one(check_docker_config(CONF_PATH, "[]", OPTS_PATH, OPTS))
    assert f.message == "/etc/docker/daemon.json is not a JSON object: dockerd refuses to start"


def test_docker_config_without_options_file() -> None:
    f = one(check_docker_config(CONF_PATH, '{"bip": "x"}', OPTS_PATH, None))
    assert f.line() == (
        "[info] docker-config: not checked: /run/flannel/docker does not exist (flanneld-py "
        "writes it once it has a lease)"
    )
    f = one(check_docker_config(CONF_PATH, '{"bip": "x"}', "", None))
    assert f.line() == (
        '[info] docker-config: not checked: no docker options file (--docker-opts-file "")'
    )


# -- 2. docker0 inside the lease -----------------------------------------------------------------


def test_docker_bridge_outside_the_lease() -> None:
    f = check_docker_bridge("docker0", [IPv4Interface("172.17.0.1/16")], LEASE, OPTS_PATH)
    assert f.line() == (
        "[FAIL] docker-bridge: docker0 has 172.17.0.1/16, outside the lease 10.5.7.0/24 "
        "(FLANNEL_SUBNET=10.5.7.1/24): docker started before flanneld-py, or was not restarted "
        "after the lease changed; no other host routes its containers' addresses here -- fix: "
        "restart docker so that it starts with --bip=10.5.7.1/24 from /run/flannel/docker"
    )
    # an old lease of ours (the subnet changed) or a wrong prefix length: outside too
    assert not check_docker_bridge("docker0", [IPv4Interface("10.5.9.1/24")], LEASE, OPTS_PATH).ok
    assert not check_docker_bridge("docker0", [IPv4Interface("10.5.7.1/16")], LEASE, OPTS_PATH).ok
    f = check_docker_bridge("docker0", [], LEASE, "")
    assert f.message.startswith("docker0 has no IPv4 address, outside the lease 10.5.7.0/24")
    assert (
        f.fix
        == "restart docker so that it starts with --bip=10.5.7.1/24 (flanneld-py's docker options)"
    )


def test_docker_bridge_inside_the_lease_or_absent() -> None:
    f = check_docker_bridge("docker0", [IPv4Interface("10.5.7.1/24")], LEASE, OPTS_PATH)
    assert f.line() == "[ok] docker-bridge: docker0 has 10.5.7.1/24, inside the lease 10.5.7.0/24"
    f = check_docker_bridge("docker0", None, LEASE, OPTS_PATH)
    assert f.line() == (
        "[info] docker-bridge: docker0 does not exist (docker not started yet?): nothing to "
        "compare with the lease 10.5.7.0/24"
    )
    f = check_docker_bridge("docker0", None, None, OPTS_PATH)
    assert f.line() == "[info] docker-bridge: not checked: no lease (see subnet-file)"


# -- 3. FORWARD ----------------------------------------------------------------------------------

TAG = ["-m", "comment", "--comment", "flanneld-py forward"]
JUMP = [*TAG, "-j", "FLANNEL-FWD"]
OURS = [["-s", "10.5.0.0/16", *TAG, "-j", "ACCEPT"], ["-d", "10.5.0.0/16", *TAG, "-j", "ACCEPT"]]
DOCKER = [["-j", "DOCKER-USER"], ["-i", "docker0", "!", "-o", "docker0", "-j", "ACCEPT"]]


def test_forward_drop_with_our_rules() -> None:
    f = check_forward(NET, "DROP", [JUMP, *DOCKER], OURS)
    assert f.line() == (
        "[ok] forward: FORWARD policy is DROP; flanneld-py's FLANNEL-FWD rules accept the overlay "
        "10.5.0.0/16"
    )
    f = check_forward(NET, "DROP", [["-s", "10.5.0.0/16", "-j", "ACCEPT"], ["-d", "10.5.0.0/16",
                                   "-j", "ACCEPT"]], None)  # fmt: skip
    assert f.message == "FORWARD policy is DROP; FORWARD rules accept the overlay 10.5.0.0/16"
    assert check_forward(NET, "ACCEPT", [], None).line() == "[ok] forward: FORWARD policy is ACCEPT"


def test_forward_drop_without_our_rules() -> None:
    f = check_forward(NET, "DROP", DOCKER, None)
    assert f.line() == (
        "[FAIL] forward: FORWARD policy is DROP and no rule accepts the overlay 10.5.0.0/16 "
        "(flanneld-py's FLANNEL-FWD chain and its jump are missing): packets between other hosts' "
        "containers and this host's containers are dropped -- fix: restart flanneld-py with "
        "--iptables-forward-rules=true (the default; it installs and keeps FLANNEL-FWD), or accept "
        "the overlay by hand: iptables -I FORWARD 1 -s 10.5.0.0/16 -j ACCEPT && iptables -I "
        "FORWARD 1 -d 10.5.0.0/16 -j ACCEPT"
    )


@pytest.mark.parametrize(
    ("rules", "chain", "missing"),
    [
        (DOCKER, OURS, "the jump FORWARD -> FLANNEL-FWD is missing"),
        ([JUMP], None, "the chain FLANNEL-FWD is missing"),
        ([JUMP], OURS[:1], "FLANNEL-FWD lacks `-d 10.5.0.0/16 -j ACCEPT`"),
        ([JUMP], [], "FLANNEL-FWD lacks `-s 10.5.0.0/16 -j ACCEPT` and `-d 10.5.0.0/16 -j ACCEPT`"),
        # a rule for another network (a stale chain of an old config) does not count
        ([JUMP], [["-s", "10.6.0.0/16", "-j", "ACCEPT"], ["-d", "10.6.0.0/16", "-j", "ACCEPT"]],
         "FLANNEL-FWD lacks `-s 10.5.0.0/16 -j ACCEPT` and `-d 10.5.0.0/16 -j ACCEPT`"),
    ],
)  # fmt: skip
def test_forward_what_is_missing(
    rules: list[list[str]], chain: list[list[str]] | None, missing: str
) -> None:
    f = check_forward(NET, "DROP", rules, chain)
    assert not f.ok
    assert f"10.5.0.0/16 ({missing}): packets" in f.message


def test_forward_not_checkable() -> None:
    f = check_forward(NET, None, [], None, "iptables -S failed: Permission denied")
    assert f.line() == "[info] forward: not checked: iptables -S failed: Permission denied"
    f = check_forward(None, "DROP", [], None)
    assert (
        f.line() == "[info] forward: FORWARD policy is DROP; not checked further: no Network known"
    )


# -- 4. ip_forward -------------------------------------------------------------------------------


def test_ip_forward() -> None:
    assert check_ip_forward("0\n").line() == (
        "[FAIL] ip-forward: net.ipv4.ip_forward is 0: this host does not forward packets between "
        "the overlay and its containers -- fix: sysctl -w net.ipv4.ip_forward=1 (and put "
        "net.ipv4.ip_forward=1 into a file in /etc/sysctl.d/ to keep it after a reboot)"
    )
    assert check_ip_forward("1\n").line() == "[ok] ip-forward: net.ipv4.ip_forward is 1"
    assert check_ip_forward(None).skipped


# -- 5. MTU --------------------------------------------------------------------------------------


def test_bridge_mtu_too_large() -> None:
    found = check_mtu("docker0", LEASE, 1500, 2, [], None, OPTS_PATH)
    assert [f.line() for f in found] == [
        "[FAIL] mtu: docker0 MTU 1500 is larger than the lease MTU 1472 (FLANNEL_MTU): packets "
        "over 1472 bytes do not fit the overlay and are dropped -- fix: ip link set docker0 mtu "
        "1472, and start docker with --mtu=1472 from /run/flannel/docker",
        "[ok] mtu: no running container on docker0: none above the lease MTU 1472",
    ]


def test_bridge_without_ports_keeps_1500_until_a_container_joins() -> None:
    # dockerd --mtu=1472 leaves an empty docker0 at 1500; the first veth brings it down
    found = check_mtu("docker0", LEASE, 1500, 0, None, "no docker socket at /x.sock", OPTS_PATH)
    assert [f.line() for f in found] == [
        "[ok] mtu: docker0 MTU 1500 but no container on it yet (a bridge takes the MTU of its "
        "ports)",
        "[info] mtu: container MTUs not checked: no docker socket at /x.sock",
    ]


def test_container_mtu_too_large() -> None:
    cs = [ContainerMtu("web", "eth0", 1500), ContainerMtu("db", "eth0", 1472)]
    found = check_mtu("docker0", LEASE, 1472, 2, cs, None, OPTS_PATH)
    assert [f.line() for f in found] == [
        "[ok] mtu: docker0 MTU 1472 fits the lease MTU 1472",
        "[FAIL] mtu: container web: eth0 MTU 1500 is larger than the lease MTU 1472 (FLANNEL_MTU): "
        "its packets over 1472 bytes do not fit the overlay (docker started without flanneld-py's "
        "--mtu?) -- fix: start docker with --mtu=1472 from /run/flannel/docker, then recreate web",
    ]
    found = check_mtu("docker0", LEASE, 1472, 2, cs[1:], None, OPTS_PATH)
    assert found[1].line() == "[ok] mtu: 1 container on docker0: none above the lease MTU 1472"


def test_mtu_without_lease_or_bridge() -> None:
    assert one(check_mtu("docker0", None, 1500, 1, [], None, OPTS_PATH)).line() == (
        "[info] mtu: not checked: no lease (see subnet-file)"
    )
    found = check_mtu("docker0", LEASE, None, 0, [], None, OPTS_PATH)
    assert found[0].line() == (
        "[info] mtu: docker0 does not exist: no bridge MTU to compare with 1472"
    )


# -- 6. rp_filter --------------------------------------------------------------------------------

P2 = PeerRoute(IPv4Network("10.5.2.0/24"), IPv4Address("10.99.0.12"), "flannel0", "eth0")
P3 = PeerRoute(IPv4Network("10.5.3.0/24"), IPv4Address("10.99.0.13"), "flannel0", "eth0")
LEFTOVER = PeerRoute(IPv4Network("10.5.2.0/24"), IPv4Address("10.99.0.12"), "eth0", "eth0")


def test_rp_filter_strict_with_a_route_back_elsewhere() -> None:
    conf = {"all": 1, "default": 1, "flannel0": 0, "eth0": 0}
    ok, f = check_rp_filter(conf, "flannel0", "eth0", [LEFTOVER, P3])
    assert ok.line() == (
        "[ok] rp-filter: rp_filter: eth0 strict (1), but every peer's route back leaves via eth0"
    )
    assert f.line() == (
        "[FAIL] rp-filter: rp_filter is strict on flannel0 (net.ipv4.conf.all.rp_filter=1): "
        "packets from 10.5.2.0/24 arriving on flannel0 are dropped, because the route back to "
        "them leaves via eth0, not flannel0 -- fix: sysctl -w net.ipv4.conf.all.rp_filter=2 "
        "(loose mode), or remove the route that sends 10.5.2.0/24 via eth0"
    )


def test_rp_filter_strict_on_the_device_and_default() -> None:
    conf = {"all": 0, "default": 1, "flannel0": 1, "eth0": 2}
    found = check_rp_filter(conf, "flannel0", "eth0", [LEFTOVER])
    assert [f.line() for f in found] == [
        "[ok] rp-filter: rp_filter: eth0 loose (2)",
        "[FAIL] rp-filter: rp_filter is strict on flannel0 (net.ipv4.conf.flannel0.rp_filter=1): "
        "packets from 10.5.2.0/24 arriving on flannel0 are dropped, because the route back to "
        "them leaves via eth0, not flannel0 -- fix: sysctl -w net.ipv4.conf.flannel0.rp_filter=2 "
        "net.ipv4.conf.default.rp_filter=2 (loose mode), or remove the route that sends "
        "10.5.2.0/24 via eth0",
    ]
    # flannel0 not there (daemon stopped): it will get `default` when created
    absent: dict[str, int | None] = {"all": 0, "default": 1, "flannel0": None, "eth0": 0}
    f = check_rp_filter(absent, "flannel0", "eth0", [LEFTOVER])[1]
    assert f.message.startswith(
        "rp_filter is strict on flannel0 (net.ipv4.conf.default.rp_filter=1, which flannel0 gets "
        "when created): packets from 10.5.2.0/24"
    )


def test_rp_filter_strict_on_the_underlay() -> None:
    conf = {"all": 0, "default": 0, "flannel0": 0, "eth0": 1}
    asym = PeerRoute(IPv4Network("10.5.2.0/24"), IPv4Address("10.99.0.12"), "flannel0", "eth1")
    found = check_rp_filter(conf, "flannel0", "eth0", [asym, P3])
    assert found[1].line() == (
        "[FAIL] rp-filter: rp_filter is strict on eth0 (net.ipv4.conf.eth0.rp_filter=1): "
        "encapsulated packets from peers 10.99.0.12 arriving on eth0 are dropped, because the "
        "route back to them leaves via eth1, not eth0 -- fix: sysctl -w "
        "net.ipv4.conf.eth0.rp_filter=2 (loose mode), or remove the route that sends 10.99.0.12 "
        "via eth1"
    )


def test_rp_filter_strict_but_symmetric_is_fine() -> None:
    conf = {"all": 1, "default": 1, "flannel0": 1, "eth0": 1}
    f = one(check_rp_filter(conf, "flannel0", "eth0", [P2, P3]))
    assert f.line() == (
        "[ok] rp-filter: rp_filter: flannel0 strict (1), but every peer's route back leaves via "
        "flannel0; eth0 strict (1), but every peer's route back leaves via eth0"
    )
    conf = {"all": 0, "default": 0, "flannel0": 2, "eth0": 0}
    assert one(check_rp_filter(conf, "flannel0", "eth0", [LEFTOVER])).line() == (
        "[ok] rp-filter: rp_filter: flannel0 loose (2); eth0 off (0)"
    )


def test_rp_filter_vxlan_direct_routing_and_host_gw() -> None:
    conf = {"all": 1, "default": 1, "flannel.1": 1, "eth0": 1}
    direct = PeerRoute(IPv4Network("10.5.2.0/24"), IPv4Address("10.99.0.12"), "eth0", "eth0")
    assert one(check_rp_filter(conf, "flannel.1", "eth0", [direct], direct_routing=True)).ok
    found = check_rp_filter(conf, "flannel.1", "eth0", [direct], backend="vxlan")
    assert [f.ok for f in found] == [True, False]
    assert found[1].message.startswith("rp_filter is strict on flannel.1")
    # host-gw: the peers' packets arrive on the external interface, routed via it
    f = one(check_rp_filter({"all": 1, "eth0": 1}, "eth0", "eth0", [direct], backend="host-gw"))
    assert f.line() == (
        "[ok] rp-filter: rp_filter: eth0 strict (1), but every peer's route back leaves via eth0"
    )


def test_rp_filter_not_checkable() -> None:
    assert one(check_rp_filter({"all": 1}, None, None, [])).line() == (
        "[info] rp-filter: not checked: backend and overlay device unknown (see etcd)"
    )
    found = check_rp_filter({"all": 1, "flannel0": 0, "eth0": 0}, "flannel0", "eth0", None)
    assert [f.line() for f in found] == [
        "[info] rp-filter: rp_filter is strict on flannel0; not checked whether it drops overlay "
        "packets: no peer list (see etcd)",
        "[info] rp-filter: rp_filter is strict on eth0; not checked whether it drops overlay "
        "packets: no peer list (see etcd)",
    ]


# -- 7. peers ------------------------------------------------------------------------------------


def probe(subnet: str, ip: str, answered: bool | None, btype: str | None = None) -> PeerProbe:
    x = lease(subnet, ip, btype)
    return PeerProbe(x, x.subnet.network_address + 1, answered)


def test_peers_answer_or_not() -> None:
    probes = [probe("10.5.2.0/24", "10.99.0.12", True), probe("10.5.3.0/24", "10.99.0.13", False)]
    found = check_peers("udp", 8285, probes, 1.0, PREFIX)
    assert [f.line() for f in found] == [
        "[ok] peers: 1 peer answers through the overlay (10.5.2.1)",
        "[FAIL] peers: peer 10.5.3.0/24 (PublicIP 10.99.0.13) does not answer through the "
        "overlay: no echo reply from 10.5.3.1 within 1s -- fix: check that flanneld-py and docker "
        "run on 10.99.0.13 (the probe pings its docker0 address 10.5.3.1) and that UDP 8285 (udp) "
        "passes between this host and 10.99.0.13 (firewalls, security groups)",
    ]
    probes = [probe("10.5.2.0/24", "10.99.0.12", True), probe("10.5.3.0/24", "10.99.0.13", True)]
    assert one(check_peers("udp", 8285, probes, 2, PREFIX)).line() == (
        "[ok] peers: 2 peers answer through the overlay (10.5.2.1, 10.5.3.1)"
    )
    f = one(check_peers("host-gw", 0, [probe("10.5.3.0/24", "10.99.0.13", False, "host-gw")], 2,
                        PREFIX))  # fmt: skip
    assert f.fix.endswith("and that 10.99.0.13 is on this host's link (host-gw routes via it)")


def test_peer_of_another_backend() -> None:
    f = one(
        check_peers("udp", 8285, [probe("10.5.4.0/24", "10.99.0.14", None, "vxlan")], 1, PREFIX)
    )
    assert f.line() == (
        "[FAIL] peers: peer 10.5.4.0/24 (PublicIP 10.99.0.14) announces backend vxlan, but the "
        "network's Backend.Type is udp: flanneld-py ignores it, so its containers are unreachable "
        "-- fix: run every host with the network's backend: restart flanneld-py on 10.99.0.14 (it "
        "reads /coreos.com/network/config at start)"
    )


def test_peers_not_checkable() -> None:
    assert one(check_peers("udp", 8285, [], 1, PREFIX)).line() == (
        "[ok] peers: no peers in etcd (this is the only host)"
    )
    assert one(check_peers("udp", 8285, None, 1, PREFIX, "etcd unreachable")).line() == (
        "[info] peers: not checked: etcd unreachable"
    )
    f = one(
        check_peers("udp", 8285, [probe("10.5.2.0/24", "10.99.0.12", None)], 1, PREFIX, "no ping")
    )
    assert f.line() == "[info] peers: peer 10.5.2.0/24 (PublicIP 10.99.0.12) not probed: no ping"


# -- 8. etcd -------------------------------------------------------------------------------------


def test_etcd() -> None:
    f = check_etcd(PREFIX, "etcd unreachable at http://10.99.0.1:2379: connection refused", None)
    assert f.line() == (
        "[FAIL] etcd: etcd unreachable at http://10.99.0.1:2379: connection refused -- fix: start "
        "etcd, or point --etcd-endpoints (FLANNELD_ETCD_ENDPOINTS) at a running member"
    )
    f = check_etcd(PREFIX, "etcd rejected username/password: x", None, unreachable=False)
    assert f.fix == "correct the etcd settings named in the message"
    f = check_etcd(PREFIX + "/", None, None)
    assert f.line() == (
        "[FAIL] etcd: /coreos.com/network/config is missing in etcd: flanneld-py waits for it and "
        'gets no lease -- fix: etcdctl put /coreos.com/network/config \'{"Network": '
        '"10.5.0.0/16", "Backend": {"Type": "udp"}}\' (with your Network and backend)'
    )
    f = check_etcd(PREFIX, None, b'{"Backend": {"Type": "udp"}}')
    assert f.line() == (
        '[FAIL] etcd: /coreos.com/network/config is invalid: Network is missing (e.g. "Network": '
        '"10.5.0.0/16") -- fix: correct it: etcdctl put /coreos.com/network/config \'{"Network": '
        '"10.5.0.0/16", "Backend": {"Type": "udp"}}\' (with your Network and backend)'
    )
    f = check_etcd(PREFIX, None, b'{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}')
    assert f.line() == (
        "[ok] etcd: /coreos.com/network/config: Network 10.5.0.0/16, Backend.Type vxlan"
    )


# -- 9. one PublicIP, two leases -----------------------------------------------------------------


def test_duplicate_public_ip_with_our_stale_lease() -> None:
    leases = [
        lease("10.5.7.0/24", "10.99.0.11"),
        lease("10.5.2.0/24", "10.99.0.12"),
        lease("10.5.200.0/24", "10.99.0.11"),
    ]
    f = one(check_duplicate_public_ips(PREFIX, leases, IPv4Network("10.5.7.0/24")))
    assert f.line() == (
        "[FAIL] duplicate-public-ip: PublicIP 10.99.0.11 holds 2 leases (10.5.7.0/24, "
        "10.5.200.0/24): one is stale (a host that lost its subnet file took a new subnet) or two "
        "hosts announce the same address -- fix: delete the stale lease (this host holds "
        "10.5.7.0/24): etcdctl del /coreos.com/network/subnets/10.5.200.0-24"
    )


def test_duplicate_public_ip_of_other_hosts() -> None:
    leases = [lease("10.5.2.0/24", "10.99.0.12"), lease("10.5.3.0/24", "10.99.0.12")]
    f = one(check_duplicate_public_ips(PREFIX, leases, IPv4Network("10.5.7.0/24")))
    assert f.fix == (
        "delete the stale one (etcdctl del /coreos.com/network/subnets/<net>-<len>), or give each "
        "host its own address (--public-ip, --iface)"
    )


def test_no_duplicate_public_ip() -> None:
    leases = [lease("10.5.2.0/24", "10.99.0.12"), lease("10.5.3.0/24", "10.99.0.13")]
    assert one(check_duplicate_public_ips(PREFIX, leases, None)).line() == (
        "[ok] duplicate-public-ip: every lease has its own PublicIP (2 leases)"
    )
    assert one(check_duplicate_public_ips(PREFIX, None, None, "etcd unreachable")).line() == (
        "[info] duplicate-public-ip: not checked: etcd unreachable"
    )


# -- flags and main ------------------------------------------------------------------------------


def test_flags_default_like_the_daemon() -> None:
    args = doctor.parse_args([], {})
    assert args.subnet_file == "/run/flannel/subnet.env"
    assert args.docker_opts_file == "/run/flannel/docker"
    assert args.docker_config == "/etc/docker/daemon.json"
    assert args.etcd_endpoints == "http://127.0.0.1:4001,http://127.0.0.1:2379"
    assert args.etcd_prefix == "/coreos.com/network"
    assert args.docker_bridge == "docker0"
    assert args.docker_host == "unix:///var/run/docker.sock"
    assert args.probe_timeout == 2.0
    assert args.json is False


def test_flags_from_the_environment_and_the_command_line() -> None:
    env = {
        "FLANNELD_ETCD_ENDPOINTS": "http://10.0.0.1:2379",
        "FLANNELD_ETCD_PREFIX": "/atomic.io/network",
        "FLANNELD_SUBNET_FILE": "/tmp/s.env",
        "DOCKER_HOST": "unix:///tmp/d.sock",
    }
    args = doctor.parse_args([], env)
    assert (args.etcd_endpoints, args.etcd_prefix) == ("http://10.0.0.1:2379", "/atomic.io/network")
    assert (args.subnet_file, args.docker_host) == ("/tmp/s.env", "unix:///tmp/d.sock")
    args = doctor.parse_args(["--etcd-prefix", "/x", "--probe-timeout=0.5", "--json"], env)
    assert (args.etcd_prefix, args.probe_timeout, args.json) == ("/x", 0.5, True)
    # CentOS flannel's /etc/sysconfig/flanneld names, as the daemon reads them
    legacy = {"FLANNEL_ETCD_ENDPOINTS": "http://10.0.0.2:2379", "FLANNEL_ETCD_KEY": "/a"}
    args = doctor.parse_args([], legacy)
    assert (args.etcd_endpoints, args.etcd_prefix) == ("http://10.0.0.2:2379", "/a")
    assert doctor.parse_args(["--docker-opts-file", ""], {}).docker_opts_file == ""


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--probe-timeout", "0"], ["--probe-timeout", "x"], ["--nope"]):
        with pytest.raises(SystemExit) as exc:
            doctor.main(argv)
        assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


FOUND = [
    Finding("etcd", True, "fine"),
    Finding("peers", False, "peer x does not answer", "check it"),
    Finding("mtu", True, "not checked", skipped=True),
]


def test_main_prints_one_line_per_finding_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(doctor, "run_checks", lambda args: FOUND)
    assert doctor.main([]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "[ok] etcd: fine",
        "[FAIL] peers: peer x does not answer -- fix: check it",
        "[info] mtu: not checked",
        "flanneld-py doctor: 1 problem found",
    ]
    assert doctor.main(["--json"]) == 1
    assert json.loads(capsys.readouterr().out) == [
        {"check": "etcd", "ok": True, "message": "fine", "fix": ""},
        {"check": "peers", "ok": False, "message": "peer x does not answer", "fix": "check it"},
        {"check": "mtu", "ok": True, "message": "not checked", "fix": ""},
    ]
    monkeypatch.setattr(doctor, "run_checks", lambda args: [FOUND[0], FOUND[2]])
    assert doctor.main([]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "flanneld-py doctor: all checks passed"


def test_main_never_prints_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(args: argparse.Namespace) -> list[Finding]:
        raise RuntimeError("surprise\nsecond line")

    monkeypatch.setattr(doctor, "run_checks", boom)
    assert doctor.main([]) == 1
    err = capsys.readouterr().err
    assert err == "flanneld-py doctor: internal error: RuntimeError: surprise second line\n"


def test_a_failing_collector_is_one_line() -> None:
    def collector() -> list[Finding]:
        raise OSError("disk on fire")

    assert one(doctor._guarded("mtu", collector)).line() == (
        "[FAIL] mtu: could not check: OSError: disk on fire -- fix: report this as a bug"
    )
