"""The udp backend's ``partial-csum`` capability without root: which leases advertise it, what
our own lease says, and what ``UdpBackend.apply()`` tells the engine (a fake one, recording)."""

from __future__ import annotations

import asyncio
import os
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from flanneld_py import engine as engine_mod
from flanneld_py.backend import LeaseAttrs, udp
from flanneld_py.backend.udp import CAPABILITIES, PARTIAL_CSUM, UdpBackend, takes_partial_csum
from flanneld_py.config import BackendConfig
from flanneld_py.lease import (
    Lease,
    LeaseAdded,
    LeaseEvent,
    LeaseRemoved,
    decode_lease,
    encode_lease_value,
)
from flanneld_py.netlink import ExternalInterface

NET = IPv4Network("10.5.0.0/16")
EXT = ExternalInterface("eth0", 2, IPv4Address("10.99.0.11"), 1500)
OWN = Lease(IPv4Network("10.5.1.0/24"), IPv4Address("10.99.0.11"))
CAPS = {"Capabilities": ["partial-csum"]}


def lease(sn: str, ip: str, backend_data: dict[str, Any] | None = None) -> Lease:
    return Lease(IPv4Network(sn), IPv4Address(ip), backend_data=backend_data)


# --- takes_partial_csum ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend_data", "expected"),
    [
        (None, False),
        ({}, False),
        ({"Capabilities": "partial-csum"}, False),  # a string, not a list
        ({"Capabilities": []}, False),
        ({"Capabilities": ["partial-csum"]}, True),
        ({"Capabilities": ["other", "partial-csum"]}, True),
        ({"Capabilities": ["other"]}, False),
        ({"Capabilities": None}, False),
        ({"Capabilities": {"partial-csum": True}}, False),  # an object, not a list
        ({"capabilities": ["partial-csum"]}, True),  # the key in any case, as Go decodes it
        ({"CAPABILITIES": ["other", "partial-csum"]}, True),
        ({"Capabilities": ["Partial-CSUM"]}, False),  # names are exact
        ({"Capabilities": [], "capabilities": ["partial-csum"]}, False),  # exact spelling wins
    ],
    ids=[
        "none",
        "empty",
        "string",
        "empty-list",
        "listed",
        "listed-among-others",
        "only-others",
        "null",
        "object",
        "key-lower-case",
        "key-upper-case",
        "name-other-case",
        "exact-key-wins",
    ],
)
def test_takes_partial_csum(backend_data: dict[str, Any] | None, expected: bool) -> None:
    assert takes_partial_csum(lease("10.5.2.0/24", "10.99.0.12", backend_data)) is expected


def test_constants_are_the_lease_keys() -> None:
    assert (CAPABILITIES, PARTIAL_CSUM) == ("Capabilities", "partial-csum")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b'{"PublicIP":"10.99.0.12","PublicIPv6":null}', False),  # real flanneld's udp lease
        (b'{"PublicIP":"10.99.0.12","PublicIPv6":null,"BackendData":null}', False),
        (b'{"PublicIP":"10.99.0.12","PublicIPv6":null,"BackendData":{"Capabilities":[]}}', False),
        (
            b'{"PublicIP":"10.99.0.12","PublicIPv6":null,'
            b'"BackendData":{"Capabilities":["partial-csum"]}}',
            True,
        ),
    ],
    ids=["flanneld", "null-data", "no-caps", "partial-csum"],
)
def test_takes_partial_csum_of_a_lease_value_as_stored(value: bytes, expected: bool) -> None:
    """The way the subnet manager turns an etcd value into a Lease (subnets.py ``_parse``)."""
    v = decode_lease(value)
    peer = Lease(
        IPv4Network("10.5.2.0/24"),
        v.public_ip,
        backend_type=v.backend_type,
        backend_data=v.backend_data,
    )
    assert takes_partial_csum(peer) is expected


def test_our_lease_value_with_the_capability_is_byte_exact() -> None:
    assert encode_lease_value(IPv4Address("10.99.0.11"), None, CAPS) == (
        b'{"PublicIP":"10.99.0.11","PublicIPv6":null,'
        b'"BackendData":{"Capabilities":["partial-csum"]}}'
    )


# --- prepare(): what our lease advertises ------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "offload", "vnet_supported", "advertises"),
    [
        ("c", "auto", True, True),
        ("c", "off", True, False),
        ("python", "auto", True, False),
        ("python", "off", True, False),
        ("c", "auto", False, False),  # a kernel without IFF_VNET_HDR: plain TUN
        ("auto", "auto", True, engine_mod.c_engine_available()),
    ],
    ids=["c-auto", "c-off", "python-auto", "python-off", "c-auto-no-vnet", "auto-auto"],
)
def test_prepare_advertises_partial_csum_only_with_a_vnet_tun(
    monkeypatch: pytest.MonkeyPatch,
    engine: str,
    offload: str,
    vnet_supported: bool,
    advertises: bool,
) -> None:
    opened: list[tuple[str, bool]] = []

    def fake_open_tun(
        name: str = "flannel0", *, vnet_hdr: bool = False, **kw: Any
    ) -> tuple[int, str]:
        opened.append((name, vnet_hdr))
        return os.open(os.devnull, os.O_RDWR), name

    monkeypatch.setattr(udp, "open_tun", fake_open_tun)
    monkeypatch.setattr(udp, "vnet_hdr_supported", lambda: vnet_supported)
    b = UdpBackend(BackendConfig(type="udp"), NET, EXT, engine=engine, offload=offload)
    attrs = asyncio.run(b.prepare())
    assert opened == [("flannel0", False)]  # only a check that it may create the TUN
    want = LeaseAttrs(backend_data=CAPS) if advertises else LeaseAttrs()
    assert attrs == want
    assert attrs.backend_type is None  # a udp lease carries no BackendType (as flanneld's)


# --- apply(): partial_csum per route -----------------------------------------------------------


class FakeEngine:
    """Records route commands; ``partial_csum`` is keyword-only, as in the Engine protocol."""

    kind = "c"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._routes: dict[IPv4Network, IPv4Address] = {}

    def start(self) -> None:
        self.calls.append(("start",))

    def set_route(
        self, subnet: IPv4Network, peer: IPv4Address, *, partial_csum: bool = False
    ) -> None:
        self.calls.append(("set", str(subnet), str(peer), partial_csum))
        self._routes[subnet] = peer

    def del_route(self, subnet: IPv4Network) -> None:
        self.calls.append(("del", str(subnet)))
        self._routes.pop(subnet, None)

    def routes(self) -> dict[IPv4Network, IPv4Address]:
        return dict(self._routes)

    def stats(self) -> dict[str, int]:
        return {}

    def peer_stats(self) -> dict[IPv4Network, dict[str, int]]:
        return {}

    def alive(self) -> bool:
        return True

    def error(self) -> str | None:
        return None

    def stop(self) -> None:
        self.calls.append(("stop",))


def backend_with(fake: FakeEngine) -> UdpBackend:
    """A UdpBackend whose data plane is ``fake`` (as ``start()`` leaves it, minus TUN/socket)."""
    b = UdpBackend(BackendConfig(type="udp"), NET, EXT, engine="c")
    b.lease = OWN
    b.engine = fake
    return b


def test_apply_sets_partial_csum_per_peer_lease() -> None:
    fake = FakeEngine()
    b = backend_with(fake)
    events: list[LeaseEvent] = [
        LeaseAdded(lease("10.5.2.0/24", "10.99.0.12", CAPS)),
        LeaseAdded(lease("10.5.3.0/24", "10.99.0.13")),
        LeaseAdded(lease("10.5.4.0/24", "10.99.0.14", {"Capabilities": "partial-csum"})),
        LeaseAdded(lease("10.5.5.0/24", "10.99.0.15", {"Capabilities": ["other", "partial-csum"]})),
        LeaseAdded(lease("10.5.6.0/24", "10.99.0.16", {})),
        LeaseRemoved(IPv4Network("10.5.3.0/24")),
    ]
    asyncio.run(b.apply(events))
    assert fake.calls == [
        ("set", "10.5.2.0/24", "10.99.0.12", True),
        ("set", "10.5.3.0/24", "10.99.0.13", False),
        ("set", "10.5.4.0/24", "10.99.0.14", False),
        ("set", "10.5.5.0/24", "10.99.0.15", True),
        ("set", "10.5.6.0/24", "10.99.0.16", False),
        ("del", "10.5.3.0/24"),
    ]


def test_apply_follows_a_peer_that_gains_or_loses_the_capability() -> None:
    """A peer restarted with another --offload/--engine renews its lease with other BackendData:
    the route is set again with the new flag."""
    fake = FakeEngine()
    b = backend_with(fake)
    sn, ip = "10.5.2.0/24", "10.99.0.12"
    asyncio.run(b.apply([LeaseAdded(lease(sn, ip, CAPS))]))
    asyncio.run(b.apply([LeaseAdded(lease(sn, ip))]))
    asyncio.run(b.apply([LeaseAdded(lease(sn, ip, CAPS))]))
    assert fake.calls == [("set", sn, ip, True), ("set", sn, ip, False), ("set", sn, ip, True)]


def test_apply_before_start_does_nothing() -> None:
    b = UdpBackend(BackendConfig(type="udp"), NET, EXT, engine="c")
    asyncio.run(b.apply([LeaseAdded(lease("10.5.2.0/24", "10.99.0.12", CAPS))]))
    assert b.engine is None


def test_engine_threads_asked_auto_capped_and_python(monkeypatch: pytest.MonkeyPatch) -> None:
    def backend(engine: str, threads: int) -> UdpBackend:
        return UdpBackend(
            BackendConfig(type="udp"), NET, EXT, engine=engine, engine_threads=threads
        )

    monkeypatch.setattr(udp, "resolve_kind", lambda kind: "python" if kind == "python" else "c")
    monkeypatch.setattr(udp.os, "sched_getaffinity", lambda pid: set(range(6)))
    assert backend("c", 3).threads() == 3
    assert backend("c", 0).threads() == 6  # one per CPU this process may use
    monkeypatch.setattr(udp.os, "sched_getaffinity", lambda pid: set(range(200)))
    assert backend("c", 0).threads() == udp.MAX_AUTO_THREADS == 64
    assert backend("python", 4).threads() == 1
