"""The vxlan backend against FakeNetOps: flannel-compat §9, call by call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from fakenet import FakeNetOps

from flanneld_py.backend._base import BackendError
from flanneld_py.backend.vxlan import VxlanBackend, parse_mac, vtep_mac
from flanneld_py.config import BackendConfig
from flanneld_py.lease import Lease, LeaseAdded, LeaseRemoved, encode_lease_value

NET = IPv4Network("10.5.0.0/16")
OWN = Lease(IPv4Network("10.5.1.0/24"), IPv4Address("10.99.0.11"), backend_type="vxlan")
MAC2 = "62:57:aa:bb:cc:02"
MAC3 = "62:57:aa:bb:cc:03"
LOG = "flanneld_py.backend.vxlan"


def cfg(**kw: Any) -> BackendConfig:
    kw.setdefault("port", 8472)
    return BackendConfig(type="vxlan", **kw)


def peer(sn: str, ip: str, mac: str | None = MAC2, **data: Any) -> Lease:
    bd: dict[str, Any] = {"VNI": 1, **data}
    if mac is not None:
        bd["VtepMAC"] = mac
    return Lease(IPv4Network(sn), IPv4Address(ip), backend_type="vxlan", backend_data=bd)


P2 = peer("10.5.2.0/24", "10.99.0.12")


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())  # type: ignore[arg-type]


async def started(net: FakeNetOps, **kw: Any) -> VxlanBackend:
    b = VxlanBackend(cfg(**kw), NET, net.ext(), net)
    await b.prepare()
    await b.start(OWN)
    net.calls.clear()
    return b


# --- device and lease ------------------------------------------------------------------------


def test_new_device_created_with_derived_mac_and_lease_attrs() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = VxlanBackend(cfg(), NET, net.ext(), net)
        attrs = await b.prepare()
        mac = vtep_mac(IPv4Address("10.99.0.11"), 1)
        assert net.ops() == [
            ("create_vxlan", "flannel.1", "1", mac, "10.99.0.11", "eth0", "8472", "nolearning", "")
        ]
        assert net.sysctls == {"net.ipv6.conf.flannel.1.accept_ra": "0"}
        assert attrs.backend_type == "vxlan"
        assert attrs.backend_data == {"VNI": 1, "VtepMAC": mac}
        assert list(attrs.backend_data) == ["VNI", "VtepMAC"]
        assert b.mtu == 1450 and net.vxlan_link("flannel.1").mtu == 1450
        assert b.alive() is not None  # down until start

        await b.start(OWN)
        link = net.vxlan_link("flannel.1")
        assert link.up and [str(a) for a in link.addrs] == ["10.5.1.0/32"]
        assert net.our_routes() == []  # no route for the whole Network
        assert b.alive() is None

    run(main)


def test_mac_is_deterministic_locally_administered_unicast() -> None:
    a = vtep_mac(IPv4Address("10.99.0.11"), 1)
    assert a == vtep_mac(IPv4Address("10.99.0.11"), 1)
    assert a != vtep_mac(IPv4Address("10.99.0.12"), 1)
    assert a != vtep_mac(IPv4Address("10.99.0.11"), 2)
    first = int(a[:2], 16)
    assert first & 0x02 and not first & 0x01
    assert parse_mac(a) == a

    async def main() -> None:  # a "reboot": a fresh host, the same VtepMAC
        macs = []
        for _ in range(2):
            net = FakeNetOps.host()
            attrs = await VxlanBackend(cfg(), NET, net.ext(), net).prepare()
            assert attrs.backend_data is not None
            macs.append(attrs.backend_data["VtepMAC"])
        assert macs == [a, a]

    run(main)


def test_lease_json_byte_equal_to_flannel() -> None:
    async def main() -> None:
        net = FakeNetOps.host("10.77.0.1/24", gateway=None)
        net.premake_vxlan(local="10.77.0.1", mac="7a:21:bb:fd:37:49")
        attrs = await VxlanBackend(cfg(), NET, net.ext(), net).prepare()
        assert net.ops() == []  # compatible: reused untouched
        value = encode_lease_value(IPv4Address("10.77.0.1"), attrs.backend_type, attrs.backend_data)
        assert value == (
            b'{"PublicIP":"10.77.0.1","PublicIPv6":null,"BackendType":"vxlan",'
            b'"BackendData":{"VNI":1,"VtepMAC":"7a:21:bb:fd:37:49"}}'
        )

    run(main)


def test_vni_70000_device_name_and_uint16_in_lease() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = VxlanBackend(cfg(vni=70000), NET, net.ext(), net)
        attrs = await b.prepare()
        assert b.dev == "flannel.70000" and "flannel.70000" in net.links_by_name
        assert attrs.backend_data is not None and attrs.backend_data["VNI"] == 4464
        link = net.vxlan_link("flannel.70000")
        assert link.vxlan is not None and link.vxlan.vni == 70000

    run(main)


def test_vni_with_a_too_long_device_name_is_refused() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        with pytest.raises(BackendError, match="longer than 15"):
            await VxlanBackend(cfg(vni=10_000_000), NET, net.ext(), net).prepare()

    run(main)


@pytest.mark.parametrize(
    ("premade", "reason"),
    [
        ({"port": 4789}, "port: 4789 vs 8472"),
        ({"learning": True}, "learning: true vs false"),
        ({"gbp": True}, "gbp: true vs false"),
        ({"vni": 2}, "vni: 2 vs 1"),
        ({"local": "10.99.0.99"}, "local: 10.99.0.99 vs 10.99.0.11"),
    ],
)
def test_incompatible_device_is_recreated(
    premade: dict[str, Any], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        net.premake_vxlan(**premade)
        caplog.set_level(logging.INFO, LOG)
        attrs = await VxlanBackend(cfg(), NET, net.ext(), net).prepare()
        mac = vtep_mac(IPv4Address("10.99.0.11"), 1)
        assert [c[0] for c in net.ops()] == ["delete_link", "create_vxlan"]
        assert attrs.backend_data == {"VNI": 1, "VtepMAC": mac}
        vx = net.vxlan_link("flannel.1").vxlan
        assert vx is not None
        assert (vx.port, vx.learning, vx.gbp, vx.vni, str(vx.local)) == (
            8472,
            False,
            False,
            1,
            "10.99.0.11",
        )
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and reason in warnings[0] and "recreating" in warnings[0]
        assert "\n" not in warnings[0]

    run(main)


def test_device_of_another_type_or_lower_dev_is_recreated() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        net.add_link("flannel.1", kind="bridge")
        await VxlanBackend(cfg(), NET, net.ext(), net).prepare()
        assert net.vxlan_link("flannel.1").kind == "vxlan"

        net = FakeNetOps.host()
        net.add_link("eth1")
        net.premake_vxlan(dev="eth1")
        await VxlanBackend(cfg(), NET, net.ext(), net).prepare()
        vx = net.vxlan_link("flannel.1").vxlan
        assert vx is not None and vx.link == net.links_by_name["eth0"].index

    run(main)


def test_config_port_and_learning_and_gbp_reach_the_device() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = VxlanBackend(cfg(port=4789, learning=True, gbp=True), NET, net.ext(), net)
        await b.prepare()
        (create,) = net.ops("create_vxlan")
        assert create[6:] == ("4789", "learning", "gbp")
        # and a restart with the same config reuses it
        net.calls.clear()
        await VxlanBackend(cfg(port=4789, learning=True, gbp=True), NET, net.ext(), net).prepare()
        assert net.ops() == []

    run(main)


def test_underlay_mtu_from_config() -> None:
    async def main() -> None:
        net = FakeNetOps.host(mtu=9000)
        b = VxlanBackend(cfg(mtu=1500), NET, net.ext(), net)
        await b.prepare()
        await b.start(OWN)
        assert b.mtu == 1450 and net.vxlan_link("flannel.1").mtu == 1450
        b2 = VxlanBackend(cfg(), NET, net.ext(), net)
        assert b2.mtu == 8950

    run(main)


def test_start_keeps_addresses_outside_network_and_removes_inside() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        link = net.premake_vxlan()
        net.add_address("flannel.1", "10.5.200.0/32")
        net.add_address("flannel.1", "192.168.9.9/32")
        b = VxlanBackend(cfg(), NET, net.ext(), net)
        attrs = await b.prepare()
        assert attrs.backend_data == {"VNI": 1, "VtepMAC": "66:77:88:99:aa:bb"}  # MAC kept
        await b.start(OWN)
        assert sorted(str(a) for a in link.addrs) == ["10.5.1.0/32", "192.168.9.9/32"]

    run(main)


# --- peers -----------------------------------------------------------------------------------


def test_added_peer_in_flannel_order() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        await b.apply([LeaseAdded(P2)])
        assert net.ops() == [
            ("replace_neigh", "flannel.1", "10.5.2.0", MAC2),
            ("replace_fdb", "flannel.1", MAC2, "10.99.0.12"),
            ("replace_route", "10.5.2.0/24", "10.5.2.0", "flannel.1", "onlink"),
        ]
        assert net.our_routes() == ["10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink"]
        assert net.neigh_table("flannel.1") == {"10.5.2.0": MAC2}
        assert net.fdb_table("flannel.1") == {MAC2: "10.99.0.12"}
        st = b.status()
        assert st["peers_programmed"] == {"vxlan": 1, "direct": 0}
        assert st["problems"] == [] and st["vtep_mac"] == b.vtep_mac and st["port"] == 8472

    run(main)


def test_fdb_failure_undoes_neighbour_and_reconcile_retries() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        net.fail("replace_fdb", "cannot set FDB entry: Invalid argument")
        await b.apply([LeaseAdded(P2)])
        assert [c[0] for c in net.ops()] == ["replace_neigh", "replace_fdb", "delete_neigh"]
        assert net.neigh_table("flannel.1") == {} and net.our_routes() == []
        assert any("Invalid argument" in p for p in b.status()["problems"])
        lines = await b.reconcile({P2.subnet: P2})
        assert lines == ["peer 10.5.2.0/24 programmed on retry"]
        assert net.our_routes() == ["10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink"]
        assert b.status()["problems"] == []

    run(main)


def test_route_failure_undoes_neighbour_and_fdb() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        net.fail("replace_route", "cannot set route: Network is unreachable")
        await b.apply([LeaseAdded(P2)])
        assert [c[0] for c in net.ops()] == [
            "replace_neigh",
            "replace_fdb",
            "replace_route",
            "delete_neigh",
            "delete_fdb",
        ]
        assert net.neigh_table("flannel.1") == {} and net.fdb_table("flannel.1") == {}
        assert b.status()["peers_programmed"]["vxlan"] == 0

    run(main)


def test_neighbour_failure_skips_peer() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        net.fail("replace_neigh")
        await b.apply([LeaseAdded(P2)])
        assert [c[0] for c in net.ops()] == ["replace_neigh"]

    run(main)


def test_mac_change_drops_old_fdb_entry() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        await b.apply([LeaseAdded(P2)])
        await b.apply([LeaseAdded(peer("10.5.2.0/24", "10.99.0.12", MAC3))])
        assert net.fdb_table("flannel.1") == {MAC3: "10.99.0.12"}
        assert net.neigh_table("flannel.1") == {"10.5.2.0": MAC3}
        assert ("delete_fdb", "flannel.1", MAC2, "10.99.0.12") in net.ops()

    run(main)


def test_shared_mac_is_kept_while_another_subnet_uses_it() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        other = peer("10.5.9.0/24", "10.99.0.12")  # same host, an older lease
        await b.apply([LeaseAdded(P2), LeaseAdded(other), LeaseRemoved(other.subnet)])
        assert net.fdb_table("flannel.1") == {MAC2: "10.99.0.12"}
        assert net.our_routes() == ["10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink"]

    run(main)


def test_removal_deletes_all_three_even_if_one_fails() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        await b.apply([LeaseAdded(P2)])
        net.calls.clear()
        net.fail("delete_neigh", "cannot delete neighbour: Device or resource busy")
        await b.apply([LeaseRemoved(P2.subnet)])
        assert net.ops() == [
            ("delete_neigh", "flannel.1", "10.5.2.0"),
            ("delete_fdb", "flannel.1", MAC2, "10.99.0.12"),
            ("delete_route", "10.5.2.0/24", "", ""),
        ]
        assert net.fdb_table("flannel.1") == {} and net.our_routes() == []
        await b.apply([LeaseRemoved(P2.subnet)])  # stale neighbour goes now
        assert net.neigh_table("flannel.1") == {}

    run(main)


def test_removal_after_restart_finds_the_mac_through_the_neighbour() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        await b.apply([LeaseAdded(P2)])
        b2 = await started(net)  # a restart: knows nothing
        await b2.apply([LeaseRemoved(P2.subnet)])
        assert net.fdb_table("flannel.1") == {} and net.neigh_table("flannel.1") == {}
        assert net.our_routes() == []

    run(main)


def test_bad_vtep_mac_skipped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        caplog.set_level(logging.INFO, LOG)
        net = FakeNetOps.host()
        b = await started(net)
        no_mac = peer("10.5.3.0/24", "10.99.0.13", None)
        bad = peer("10.5.4.0/24", "10.99.0.14", "zz:zz")
        mcast = peer("10.5.5.0/24", "10.99.0.15", "01:00:5e:00:00:01")
        await b.apply([LeaseAdded(no_mac), LeaseAdded(bad), LeaseAdded(mcast)])
        await b.apply([LeaseAdded(no_mac), LeaseAdded(bad)])  # renewals
        peers = {lease.subnet: lease for lease in (no_mac, bad, mcast)}
        assert await b.reconcile(peers) == []
        assert await b.reconcile(peers) == []
        assert net.ops() == []
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 3
        assert "10.5.3.0/24" in warnings[0] and "no VtepMAC" in warnings[0]
        assert "malformed VtepMAC 'zz:zz'" in warnings[1]
        assert len(b.status()["problems"]) == 3
        # fixed lease: programmed, problem gone
        await b.apply([LeaseAdded(peer("10.5.3.0/24", "10.99.0.13", MAC3))])
        assert "10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink" in net.our_routes()
        assert len(b.status()["problems"]) == 2

    run(main)


def test_v013_backend_data_without_vni_and_case_insensitive_key() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        old = Lease(
            IPv4Network("10.5.2.0/24"),
            IPv4Address("10.99.0.12"),
            backend_type="vxlan",
            backend_data={"VtepMAC": "FA:5D:EB:8F:A1:83"},
        )
        lower = Lease(
            IPv4Network("10.5.3.0/24"),
            IPv4Address("10.99.0.13"),
            backend_type="vxlan",
            backend_data={"vtepmac": MAC3},
        )
        await b.apply([LeaseAdded(old), LeaseAdded(lower)])
        assert net.fdb_table("flannel.1") == {"fa:5d:eb:8f:a1:83": "10.99.0.12", MAC3: "10.99.0.13"}

    run(main)


def test_other_backend_types_not_accepted() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        hostgw = Lease(IPv4Network("10.5.3.0/24"), IPv4Address("10.99.0.13"), None, "host-gw")
        udp = Lease(IPv4Network("10.5.4.0/24"), IPv4Address("10.99.0.14"))
        assert not b.accepts(hostgw) and not b.accepts(udp) and b.accepts(P2)
        await b.apply([LeaseAdded(hostgw), LeaseAdded(udp)])
        assert net.ops() == []
        assert await b.reconcile({hostgw.subnet: hostgw, udp.subnet: udp}) == []

    run(main)


def test_own_subnet_is_never_programmed() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        me = peer("10.5.1.0/24", "10.99.0.11", b.vtep_mac)
        await b.apply([LeaseAdded(me)])
        assert net.ops() == [] and await b.reconcile({me.subnet: me}) == []

    run(main)


# --- DirectRouting ---------------------------------------------------------------------------


def test_direct_routing_on_link_gives_plain_route() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net, direct_routing=True)
        await b.apply([LeaseAdded(P2)])
        assert net.ops() == [("replace_route", "10.5.2.0/24", "10.99.0.12", "eth0", "")]
        assert net.our_routes() == ["10.5.2.0/24 via 10.99.0.12 dev eth0"]
        assert net.fdb_table("flannel.1") == {} and net.neigh_table("flannel.1") == {}
        assert b.status()["peers_programmed"] == {"vxlan": 0, "direct": 1}
        assert b.mtu == 1450
        assert await b.reconcile({P2.subnet: P2}) == []
        await b.apply([LeaseRemoved(P2.subnet)])
        assert net.our_routes() == []

    run(main)


def test_direct_routing_off_link_uses_vxlan() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net, direct_routing=True)
        far = peer("10.5.3.0/24", "10.88.0.5", MAC3)  # via the default gateway
        await b.apply([LeaseAdded(far)])
        assert net.our_routes() == ["10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink"]
        assert net.fdb_table("flannel.1") == {MAC3: "10.88.0.5"}

    run(main)


def test_direct_routing_path_switch_cleans_vxlan_entries() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net, direct_routing=True)
        moving = peer("10.5.3.0/24", "10.88.0.5", MAC3)
        await b.apply([LeaseAdded(moving)])
        # the peer moved onto our link
        await b.apply([LeaseAdded(peer("10.5.3.0/24", "10.99.0.13", MAC3))])
        assert net.our_routes() == ["10.5.3.0/24 via 10.99.0.13 dev eth0"]
        assert net.fdb_table("flannel.1") == {} and net.neigh_table("flannel.1") == {}

    run(main)


# --- reconcile -------------------------------------------------------------------------------


def test_reconcile_puts_back_deleted_entries() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        await b.apply([LeaseAdded(P2)])
        peers = {P2.subnet: P2}
        assert await b.reconcile(peers) == []
        undos: list[tuple[str, Callable[[], Awaitable[bool]]]] = [
            ("route 10.5.2.0/24", lambda: net.delete_route(P2.subnet)),
            ("neighbour 10.5.2.0", lambda: net.delete_neigh("flannel.1", IPv4Address("10.5.2.0"))),
            ("FDB entry " + MAC2, lambda: net.delete_fdb("flannel.1", MAC2)),
        ]
        for what, undo in undos:
            assert await undo()
            assert await b.reconcile(peers) == [f"peer 10.5.2.0/24: recovered {what}"]
            assert net.our_routes() == ["10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink"]
            assert net.neigh_table("flannel.1") == {"10.5.2.0": MAC2}
            assert net.fdb_table("flannel.1") == {MAC2: "10.99.0.12"}

    run(main)


def test_reconcile_removes_stale_entries_and_keeps_foreign_ones() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        # a peer programmed in an earlier run that vanished while we were down
        await net.replace_neigh("flannel.1", IPv4Address("10.5.7.0"), MAC3)
        await net.replace_fdb("flannel.1", MAC3, IPv4Address("10.99.0.17"))
        await net.replace_route(
            IPv4Network("10.5.7.0/24"),
            gateway=IPv4Address("10.5.7.0"),
            dev="flannel.1",
            onlink=True,
        )
        net.add_raw_route("10.5.8.0/24", "10.99.0.18", "eth0")  # a user's (proto static)
        net.add_raw_route("10.5.0.0/16", type=7, proto=102, metric=0x7FFF0000)  # the guard
        net.add_raw_route("10.6.0.0/24", "10.99.0.19", "eth0", proto=102)  # outside Network
        await b.apply([LeaseAdded(P2)])
        lines = await b.reconcile({P2.subnet: P2})
        assert sorted(lines) == [
            f"removed stale FDB entry {MAC3} dst 10.99.0.17 dev flannel.1",
            f"removed stale neighbour 10.5.7.0 lladdr {MAC3} dev flannel.1",
            "removed stale route 10.5.7.0/24 via 10.5.7.0 dev flannel.1 onlink proto 102",
        ]
        assert net.our_routes() == [
            "10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink",
            "10.6.0.0/24 via 10.99.0.19 dev eth0",
        ]
        assert any(r.dst == IPv4Network("10.5.8.0/24") for r in net.route_table)
        assert any(r.type == 7 for r in net.route_table)

    run(main)


def test_reconcile_applies_missed_events() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        p3 = peer("10.5.3.0/24", "10.99.0.13", MAC3)
        await b.apply([LeaseAdded(P2)])
        lines = await b.reconcile({p3.subnet: p3})
        assert (
            "peer 10.5.2.0/24 is gone: deleted neighbour 10.5.2.0, FDB entry "
            + MAC2
            + (", route 10.5.2.0/24")
            in lines
        )
        assert "peer 10.5.3.0/24 programmed (its lease had not been applied)" in lines
        assert net.our_routes() == ["10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink"]

    run(main)


def test_deleted_device_recreated_with_same_mac() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        mac = b.vtep_mac
        await b.apply([LeaseAdded(P2)])
        await net.delete_link("flannel.1")
        lines = await b.reconcile({P2.subnet: P2})
        assert lines[0] == f"flannel.1 was missing: recreated with MAC {mac}"
        assert net.vxlan_link("flannel.1").mac == mac and b.alive() is None
        assert net.our_routes() == ["10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink"]
        assert net.fdb_table("flannel.1") == {MAC2: "10.99.0.12"}

    run(main)


def test_device_down_brought_up_and_alive_reports() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        net.vxlan_link("flannel.1").up = False
        assert await b.reconcile({}) != []
        assert net.vxlan_link("flannel.1").up and b.alive() is None
        net.fail("link", "cannot read interface flannel.1: Operation not permitted")
        assert await b.reconcile({}) == [
            "flannel.1: cannot read interface flannel.1: Operation not permitted"
        ]
        assert b.alive() is not None and b.status()["up"] is False

    run(main)


def test_close_leaves_everything() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        await b.apply([LeaseAdded(P2)])
        net.calls.clear()
        await b.close()
        await b.close()
        assert net.ops() == [] and "flannel.1" in net.links_by_name
        assert net.our_routes() == ["10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink"]

    run(main)
