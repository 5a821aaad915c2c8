"""The daemon's wiring without root: an in-memory store, a fake backend and a fake platform.

What is checked here is the order of startup, READY, the peer events handed to the backend
(with leases of other backend types filtered out), re-acquisition, a subnet change, liveness
versus readiness during an etcd outage, and shutdown. The real kernel paths are in tests/netns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from flanneld_py import hostlock
from flanneld_py.backend import LeaseAttrs
from flanneld_py.config import NetworkConfig
from flanneld_py.daemon import Daemon, Platform, run
from flanneld_py.handover import Handover
from flanneld_py.lease import Lease, LeaseAdded, LeaseEvent, LeaseRemoved, encode_lease_value
from flanneld_py.netlink import ExternalInterface
from flanneld_py.options import Options
from flanneld_py.store.memory import MemoryStore

PREFIX = "/coreos.com/network"
#: our own lease comes from 10.5.100.0 up; the peers the tests write lie below
CONFIG = b'{"Network":"10.5.0.0/16","SubnetMin":"10.5.100.0","Backend":{"Type":"vxlan"}}'
EXT = ExternalInterface("eth0", 2, IPv4Address("10.99.0.11"), 1500)
MAC = "7a:21:bb:fd:37:49"


@dataclass
class Recorder:
    calls: list[str] = field(default_factory=list)

    def __call__(self, what: str) -> None:
        self.calls.append(what)


class FakeBackend:
    name = "vxlan"
    reconcile_interval = 0.05

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.programmed: dict[IPv4Network, Lease] = {}
        self.events: list[LeaseEvent] = []
        self.down: str | None = None
        self.leases: list[Lease] = []

    @property
    def mtu(self) -> int:
        return 1450

    async def prepare(self) -> LeaseAttrs:
        self.rec("backend.prepare")
        return LeaseAttrs("vxlan", {"VNI": 1, "VtepMAC": MAC})

    async def start(self, lease: Lease) -> None:
        self.rec(f"backend.start {lease.subnet}")
        self.leases.append(lease)

    def accepts(self, lease: Lease) -> bool:
        return lease.backend_type == "vxlan"

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        for ev in events:
            self.events.append(ev)
            if isinstance(ev, LeaseAdded):
                self.rec(f"backend.add {ev.lease.subnet}")
                self.programmed[ev.lease.subnet] = ev.lease
            else:
                self.rec(f"backend.remove {ev.subnet}")
                self.programmed.pop(ev.subnet, None)

    async def activate(self) -> None:
        self.rec("backend.activate")

    async def reconcile(self, peers: Mapping[IPv4Network, Lease]) -> list[str]:
        if "backend.reconcile" not in self.rec.calls:
            self.rec("backend.reconcile")
        assert set(peers) == set(self.programmed)
        return []

    def alive(self) -> str | None:
        return self.down

    def status(self) -> dict[str, Any]:
        return {"type": self.name, "programmed": sorted(map(str, self.programmed))}

    async def close(self, *, restarting: bool = False) -> None:
        self.rec("backend.close" + (" restarting" if restarting else ""))


class FakeFirewall:
    def __init__(self, rec: Recorder, subnet: IPv4Network) -> None:
        self.rec = rec
        self.subnet = subnet

    async def setup(self) -> None:
        self.rec(f"firewall.setup {self.subnet}")

    async def check_and_repair(self) -> list[str]:
        return []

    async def teardown(self) -> None:
        self.rec(f"firewall.teardown {self.subnet}")


class FakeLock:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        rec("lock")

    def close(self) -> None:
        self.rec("unlock")


def platform(rec: Recorder, backend: FakeBackend) -> Platform:
    async def find_interface(opts: Options) -> ExternalInterface:
        rec("find_interface")
        return EXT

    async def ensure_guard(network: IPv4Network) -> list[IPv4Network]:
        rec(f"guard {network}")
        return []

    def make_backend(
        cfg: NetworkConfig, ext: ExternalInterface, opts: Options, handover: Handover
    ) -> FakeBackend:
        rec(f"make_backend {cfg.backend.type}")
        return backend

    async def cleanup(cfg: NetworkConfig, ext: ExternalInterface) -> list[str]:
        rec("cleanup")
        return []

    return Platform(
        lock=lambda: FakeLock(rec),
        find_interface=find_interface,
        ensure_guard=ensure_guard,
        make_backend=make_backend,  # type: ignore[arg-type]
        cleanup=cleanup,
        make_firewall=lambda net, subnet, opts: FakeFirewall(rec, subnet),
    )


def options(tmp_path: Path, **kw: Any) -> Options:
    kw.setdefault("control_socket", "")  # not /run/flannel (tests/unit/test_metrics.py has one)
    return Options(
        subnet_file=str(tmp_path / "subnet.env"),
        docker_opts_file=str(tmp_path / "docker"),
        config_poll_interval=0.01,
        **kw,
    )


def peer_value(ip: str, btype: str | None = "vxlan", mac: str = "62:57:00:00:00:02") -> bytes:
    data = {"VNI": 1, "VtepMAC": mac} if btype == "vxlan" else None
    return encode_lease_value(IPv4Address(ip), btype, data)


async def until(cond: Callable[[], Any], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


class Harness:
    def __init__(self, tmp_path: Path, **opts: Any) -> None:
        self.rec = Recorder()
        self.store = MemoryStore()
        self.store.put(f"{PREFIX}/config", CONFIG)
        self.backend = FakeBackend(self.rec)
        plat = platform(self.rec, self.backend)
        self.daemon = Daemon(options(tmp_path, **opts), self.store, plat)
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        coros = await self.daemon.start()
        self.tasks = [asyncio.ensure_future(c) for c in coros]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.daemon.close()

    @property
    def lease(self) -> Lease:
        assert self.daemon.mgr is not None and self.daemon.mgr.lease is not None
        return self.daemon.mgr.lease


def drive(tmp_path: Path, body: Callable[[Harness], Awaitable[None]], **opts: Any) -> Harness:
    async def main() -> Harness:
        h = Harness(tmp_path, **opts)
        try:
            await h.start()
            await body(h)
        finally:
            await h.stop()
        return h

    return asyncio.run(main())


def test_startup_order_and_ready_after_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    seen_at_ready: list[list[str]] = []
    h = Harness(tmp_path)
    h.store.put(f"{PREFIX}/subnets/10.5.7.0-24", peer_value("10.99.0.12"))

    async def main() -> None:
        try:
            await h.start()
            seen_at_ready.append(list(h.rec.calls))
        finally:
            await h.stop()

    asyncio.run(main())
    sn = h.lease.subnet
    assert seen_at_ready[0] == [
        "lock",
        "find_interface",
        "guard 10.5.0.0/16",
        "make_backend vxlan",
        "cleanup",
        "backend.prepare",
        f"backend.start {sn}",
        "backend.add 10.5.7.0/24",
        "backend.activate",
        "backend.reconcile",
        f"firewall.setup {sn}",
    ]
    # READY=1 after the files, which carry the backend's MTU
    sent = []
    while True:
        try:
            sent.append(notify.recv(4096).decode())
        except BlockingIOError:
            break
    assert [m.split("\n")[0] for m in sent] == [
        "STATUS=waiting for the network config in etcd",
        "READY=1",
        "STOPPING=1",
    ]
    env = (tmp_path / "subnet.env").read_text()
    assert f"FLANNEL_SUBNET={sn.network_address + 1}/24\nFLANNEL_MTU=1450\n" in env
    # shutdown: rules removed, backend closed, lock released last; the lease stays in etcd
    assert h.rec.calls[-3:] == [f"firewall.teardown {sn}", "backend.close", "unlock"]
    notify.close()


def test_our_lease_publishes_the_backend_data(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        kv = await h.store.get(f"{PREFIX}/subnets/{h.lease.subnet.network_address}-24")
        assert kv is not None
        assert kv.value == (
            b'{"PublicIP":"10.99.0.11","PublicIPv6":null,"BackendType":"vxlan",'
            b'"BackendData":{"VNI":1,"VtepMAC":"7a:21:bb:fd:37:49"}}'
        )

    drive(tmp_path, body)


def test_peer_events_reach_the_backend_and_other_types_are_ignored_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "flanneld_py")

    async def body(h: Harness) -> None:
        b = h.backend
        key = f"{PREFIX}/subnets/10.5.9.0-24"
        h.store.put(key, peer_value("10.99.0.12"))
        await until(lambda: IPv4Network("10.5.9.0/24") in b.programmed)
        # the peer's MAC changes: the backend hears of it
        h.store.put(key, peer_value("10.99.0.12", mac="62:57:00:00:00:99"))
        await until(
            lambda: (
                b.programmed[IPv4Network("10.5.9.0/24")].backend_data
                == {"VNI": 1, "VtepMAC": "62:57:00:00:00:99"}
            )
        )
        # a host-gw and a udp lease in a vxlan network: not programmed, warned once each
        for _ in range(2):
            h.store.put(f"{PREFIX}/subnets/10.5.10.0-24", peer_value("10.99.0.13", "host-gw"))
            h.store.put(f"{PREFIX}/subnets/10.5.11.0-24", peer_value("10.99.0.14", None))
        await until(lambda: len(h.daemon.status()["ignored_peers"]) == 2)
        assert set(b.programmed) == {IPv4Network("10.5.9.0/24")}
        st = h.daemon.status()
        assert st["peers"] == {"10.5.9.0/24": "10.99.0.12"}
        assert st["ignored_peers"] == {"10.5.10.0/24": "host-gw", "10.5.11.0/24": "udp"}
        # a programmed peer that turns into another type is removed from the backend
        h.store.put(key, peer_value("10.99.0.12", "host-gw"))
        await until(lambda: IPv4Network("10.5.9.0/24") not in b.programmed)
        h.store.put(key, peer_value("10.99.0.12"))
        await until(lambda: IPv4Network("10.5.9.0/24") in b.programmed)
        await h.store.delete(key)
        await until(lambda: IPv4Network("10.5.9.0/24") not in b.programmed)
        assert b.events[-1] == LeaseRemoved(IPv4Network("10.5.9.0/24"))

    drive(tmp_path, body)
    ignored = [r.getMessage() for r in caplog.records if "ignoring peer" in r.getMessage()]
    assert ignored == [
        "ignoring peer 10.5.10.0/24 via 10.99.0.13: its backend is host-gw, this network runs "
        "vxlan",
        "ignoring peer 10.5.11.0/24 via 10.99.0.14: its backend is udp (no BackendType), this "
        "network runs vxlan",
        "ignoring peer 10.5.9.0/24 via 10.99.0.12: its backend is host-gw, this network runs vxlan",
    ]


def test_deleted_own_lease_is_taken_back(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        subnet = h.lease.subnet
        key = f"{PREFIX}/subnets/{subnet.network_address}-24"
        await h.store.delete(key)
        async with asyncio.timeout(5):
            while (kv := await h.store.get(key)) is None:
                await asyncio.sleep(0.01)
        assert json.loads(kv.value)["PublicIP"] == "10.99.0.11"
        assert h.lease.subnet == subnet

    drive(tmp_path, body)


def test_subnet_change_restarts_the_backend_and_rewrites_the_files(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        old = h.lease.subnet
        key = f"{PREFIX}/subnets/{old.network_address}-24"
        h.store.put(key, peer_value("10.99.0.50"))  # someone else took our subnet
        await until(lambda: len(h.backend.leases) == 2, timeout=10)
        new = h.backend.leases[-1].subnet
        assert new != old
        await until(lambda: f"firewall.setup {new}" in h.rec.calls)
        assert f"firewall.teardown {old}" in h.rec.calls
        assert (
            f"FLANNEL_SUBNET={new.network_address + 1}/24" in (tmp_path / "subnet.env").read_text()
        )
        # the host that took our old subnet is now a peer
        await until(lambda: old in h.backend.programmed)

    drive(tmp_path, body)


def test_liveness_holds_and_readiness_drops_while_etcd_is_down(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        d = h.daemon
        assert d.check() == (True, "ok") and d.readiness() == (True, "ok")
        h.store.set_down(True)
        await until(lambda: not d.readiness()[0])
        alive, text = d.check()
        assert alive and text.startswith("ok; degraded: lease watch on etcd"), text
        h.store.set_down(False)
        await until(lambda: d.readiness() == (True, "ok"))
        # a dead data path is not alive, whatever etcd does
        h.backend.down = "VXLAN device flannel.1 is gone"
        assert d.check() == (False, "VXLAN device flannel.1 is gone")
        assert d.readiness() == (False, "VXLAN device flannel.1 is gone")

    drive(tmp_path, body)


def test_second_daemon_exits_1_before_touching_anything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    backend = FakeBackend(rec)
    plat = platform(rec, backend)

    def held() -> FakeLock:
        raise hostlock.LockHeld("another flanneld-py (pid 1) already runs here")

    plat.lock = held
    store = MemoryStore()

    code = asyncio.run(run(options(tmp_path), store, plat))
    assert code == 1
    assert rec.calls == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "another flanneld-py (pid 1) already runs here"
    ]
    assert not (tmp_path / "subnet.env").exists()
