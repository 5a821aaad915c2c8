"""The host-gw backend (flannel-compat §10) and the start-up cleanup, against FakeNetOps."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from fakenet import FakeNetOps

from flanneld_py.backend._base import BackendError
from flanneld_py.backend.cleanup import remove_other_backends
from flanneld_py.backend.hostgw import HostGwBackend
from flanneld_py.config import BackendConfig
from flanneld_py.lease import Lease, LeaseAdded, LeaseRemoved, encode_lease_value

NET = IPv4Network("10.5.0.0/16")
CFG = BackendConfig(type="host-gw", port=0)
OWN = Lease(IPv4Network("10.5.1.0/24"), IPv4Address("10.99.0.11"), backend_type="host-gw")
LOG = "flanneld_py.backend.hostgw"


def peer(sn: str, ip: str, btype: str | None = "host-gw") -> Lease:
    return Lease(IPv4Network(sn), IPv4Address(ip), backend_type=btype)


P2 = peer("10.5.2.0/24", "10.99.0.12")
FAR = peer("10.5.3.0/24", "10.88.0.5")


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())  # type: ignore[arg-type]


async def started(net: FakeNetOps) -> HostGwBackend:
    b = HostGwBackend(CFG, NET, net.ext(), net)
    attrs = await b.prepare()
    assert (attrs.backend_type, attrs.backend_data) == ("host-gw", None)
    await b.start(OWN)
    net.calls.clear()
    return b


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_public_ip_differs_from_interface_is_refused() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = HostGwBackend(CFG, NET, net.ext(public_ip="10.77.0.200"), net)
        with pytest.raises(BackendError) as exc:
            await b.prepare()
        msg = str(exc.value)
        assert "PublicIP 10.77.0.200 differs" in msg and "NAT" in msg and "\n" not in msg

    run(main)


def test_lease_and_mtu() -> None:
    async def main() -> None:
        net = FakeNetOps.host("10.77.0.1/24")
        b = HostGwBackend(CFG, NET, net.ext(), net)
        attrs = await b.prepare()
        assert b.mtu == 1500 and b.name == "host-gw" and b.reconcile_interval == 10
        value = encode_lease_value(IPv4Address("10.77.0.1"), attrs.backend_type, None)
        assert value == b'{"PublicIP":"10.77.0.1","PublicIPv6":null,"BackendType":"host-gw"}'

    run(main)


def test_add_and_remove() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        await b.apply([LeaseAdded(P2)])
        assert net.ops() == [("replace_route", "10.5.2.0/24", "10.99.0.12", "eth0", "")]
        assert [c[0] for c in net.calls][:1] == ["route_get"]
        assert net.our_routes() == ["10.5.2.0/24 via 10.99.0.12 dev eth0"]
        assert b.status()["routes"] == ["10.5.2.0/24 via 10.99.0.12 dev eth0"]
        # a renewal with an equal route: kept, nothing written
        net.calls.clear()
        await b.apply([LeaseAdded(P2)])
        assert net.ops() == []
        await b.apply([LeaseRemoved(P2.subnet)])
        assert net.ops() == [("delete_route", "10.5.2.0/24", "", "")]
        assert net.our_routes() == [] and b.status()["peers_programmed"] == 0

    run(main)


def test_existing_different_route_replaced_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        caplog.set_level(logging.INFO, LOG)
        net = FakeNetOps.host()
        net.add_raw_route("10.5.2.0/24", "10.99.0.99", "eth0")
        b = await started(net)
        await b.apply([LeaseAdded(P2)])
        assert net.our_routes() == ["10.5.2.0/24 via 10.99.0.12 dev eth0"]
        assert [r.proto for r in net.route_table if r.dst == P2.subnet] == [102]
        assert any(
            "replacing existing route 10.5.2.0/24 via 10.99.0.99" in r.getMessage()
            for r in caplog.records
        )

    run(main)


def test_removal_error_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        await b.apply([LeaseAdded(P2)])
        net.fail("delete_route", "cannot delete route 10.5.2.0/24: Operation not permitted")
        await b.apply([LeaseRemoved(P2.subnet)])
        assert any("Operation not permitted" in w for w in warnings(caplog))

    run(main)


def test_off_link_peer_reported_once_then_programmed_when_reachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        caplog.set_level(logging.INFO, LOG)
        net = FakeNetOps.host()
        b = await started(net)
        await b.apply([LeaseAdded(FAR)])
        peers = {FAR.subnet: FAR}
        for _ in range(3):
            assert await b.reconcile(peers) == []
        assert net.ops() == []
        (w,) = warnings(caplog)
        assert "10.88.0.5" in w and "unreachable" in w and "gateway 10.99.0.1" in w
        assert b.status()["problems"] == [w]
        # the peer's network becomes directly attached (e.g. a second address on eth0)
        net.add_address("eth0", "10.88.0.1/24")
        assert await b.reconcile(peers) == [
            "peer 10.5.3.0/24: PublicIP 10.88.0.5 reachable now, routed"
        ]
        assert net.our_routes() == ["10.5.3.0/24 via 10.88.0.5 dev eth0"]
        assert b.status()["problems"] == [] and len(warnings(caplog)) == 1

    run(main)


def test_peer_on_another_interface_is_a_problem() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        net.add_link("eth1")
        net.add_address("eth1", "10.98.0.1/24")
        b = await started(net)
        await b.apply([LeaseAdded(peer("10.5.4.0/24", "10.98.0.7"))])
        assert net.our_routes() == []
        assert "reached by eth1, not eth0" in b.status()["problems"][0]

    run(main)


def test_reconcile_recovers_deleted_route_and_removes_stale() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        p3 = peer("10.5.3.0/24", "10.99.0.13")
        await b.apply([LeaseAdded(P2), LeaseAdded(p3)])
        peers = {P2.subnet: P2, p3.subnet: p3}
        assert await b.reconcile(peers) == []
        assert await net.delete_route(P2.subnet)
        # leftovers: a vanished peer's route, a user's route, the guard, a route outside Network
        net.add_raw_route("10.5.7.0/24", "10.99.0.17", "eth0", proto=102)
        net.add_raw_route("10.5.8.0/24", "10.99.0.18", "eth0")
        net.add_raw_route("10.5.0.0/16", type=7, proto=102, metric=0x7FFF0000)
        net.add_raw_route("10.6.0.0/24", "10.99.0.19", "eth0", proto=102)
        lines = await b.reconcile(peers)
        assert sorted(lines) == [
            "removed stale route 10.5.7.0/24 via 10.99.0.17 dev eth0 proto 102",
            "route recovered 10.5.2.0/24 via 10.99.0.12 dev eth0",
        ]
        assert net.our_routes() == [
            "10.5.2.0/24 via 10.99.0.12 dev eth0",
            "10.5.3.0/24 via 10.99.0.13 dev eth0",
            "10.6.0.0/24 via 10.99.0.19 dev eth0",
        ]
        assert len(net.route_table) == 7  # + default, connected, user's, guard

    run(main)


def test_reconcile_missed_events_and_other_types() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        await b.apply([LeaseAdded(P2)])
        vx = peer("10.5.5.0/24", "10.99.0.15", "vxlan")
        udp = peer("10.5.6.0/24", "10.99.0.16", None)
        assert not b.accepts(vx) and not b.accepts(udp)
        await b.apply([LeaseAdded(vx), LeaseAdded(udp)])
        p3 = peer("10.5.3.0/24", "10.99.0.13")
        lines = await b.reconcile({p3.subnet: p3, vx.subnet: vx, udp.subnet: udp})
        assert sorted(lines) == [
            "peer 10.5.3.0/24: route 10.5.3.0/24 via 10.99.0.13 added",
            "removed stale route 10.5.2.0/24 via 10.99.0.12 dev eth0 proto 102",
        ]
        assert net.our_routes() == ["10.5.3.0/24 via 10.99.0.13 dev eth0"]

    run(main)


def test_routes_stay_after_close() -> None:
    async def main() -> None:
        net = FakeNetOps.host()
        b = await started(net)
        await b.apply([LeaseAdded(P2)])
        await b.close()
        assert net.our_routes() == ["10.5.2.0/24 via 10.99.0.12 dev eth0"]
        assert b.alive() is not None

    run(main)


# --- cleanup of other backends' leftovers --------------------------------------------------


def leftovers() -> FakeNetOps:
    net = FakeNetOps.host()
    net.premake_vxlan("flannel.1", 1)
    net.premake_vxlan("flannel.2", 2, port=8473)
    net.add_link("vx0", kind="vxlan")  # not ours by name
    net.add_raw_route("10.5.2.0/24", "10.99.0.12", "eth0", proto=102)  # host-gw's
    net.add_raw_route("10.5.8.0/24", "10.99.0.18", "eth0")  # a user's
    net.add_raw_route("10.5.0.0/16", type=7, proto=102, metric=0x7FFF0000)  # the guard
    return net


@pytest.mark.parametrize(
    ("current", "vni", "gone", "routes_gone"),
    [
        ("udp", 1, ["flannel.1", "flannel.2"], True),
        ("host-gw", 1, ["flannel.1", "flannel.2"], False),
        ("vxlan", 1, ["flannel.2"], False),
        ("vxlan", 2, ["flannel.1"], False),
    ],
)
def test_cleanup(current: str, vni: int, gone: list[str], routes_gone: bool) -> None:
    async def main() -> None:
        net = leftovers()
        cfg = BackendConfig(type=current, vni=vni)
        lines = await remove_other_backends(current, cfg, NET, net.ext(), net)
        assert sorted(c[1] for c in net.ops("delete_link")) == gone
        for name in gone:
            assert name not in net.links_by_name
        assert "vx0" in net.links_by_name
        assert sum("removed vxlan device" in line for line in lines) == len(gone)
        hostgw_route = "10.5.2.0/24 via 10.99.0.12 dev eth0"
        assert (hostgw_route not in net.our_routes()) == routes_gone
        assert any(r.type == 7 for r in net.route_table)  # the guard stays
        assert any(r.dst == IPv4Network("10.5.8.0/24") for r in net.route_table)
        if routes_gone:
            assert (
                "removed route 10.5.2.0/24 via 10.99.0.12 dev eth0 proto 102 left by an earlier "
                "vxlan/host-gw run"
            ) in lines
        assert all("\n" not in line for line in lines)

    run(main)


def test_cleanup_errors_are_lines_not_exceptions() -> None:
    async def main() -> None:
        net = leftovers()
        net.fail("delete_link", "cannot delete interface flannel.2: Operation not permitted")
        kw: dict[str, Any] = {"type": "udp"}
        lines = await remove_other_backends("udp", BackendConfig(**kw), NET, net.ext(), net)
        assert any("Operation not permitted" in line for line in lines)

    run(main)
