"""SubnetManager on MemoryStore: acquisition, reuse, renewal, re-acquisition, the peer watch.

The same scenarios as tests/etcd/test_subnets.py where no etcd-specific failure is needed; every
manager shares one MemoryStore, as hosts share one etcd.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from flanneld_py.config import NetworkConfig
from flanneld_py.lease import (
    Lease,
    LeaseAdded,
    LeaseEvent,
    encode_lease_value,
    lease_key,
    subnets_prefix,
)
from flanneld_py.store import StoreUnavailable, WatchEvent
from flanneld_py.store.memory import MemoryStore
from flanneld_py.subnets import SubnetManager
from tests.store_contract import FakeClock

PREFIX = "/coreos.com/network"
SUBNETS = subnets_prefix(PREFIX)
CONFIG = b'{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}'


def ip(i: int) -> IPv4Address:
    return IPv4Address(f"10.99.0.{i}")


def run(coro: Coroutine[Any, Any, None], timeout: float = 20.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


async def until(
    cond: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 5.0
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        ok = cond()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def agent(store: MemoryStore, i: int, **kw: Any) -> SubnetManager:
    return SubnetManager(store, PREFIX, ip(i), rng=random.Random(i), **kw)


async def configured(store: MemoryStore) -> NetworkConfig:
    store.put(f"{PREFIX}/config", CONFIG)
    return await agent(store, 0).wait_config(0.01)


class Peers:
    """The peer events a manager publishes, applied to a route table."""

    def __init__(self) -> None:
        self.routes: dict[IPv4Network, IPv4Address] = {}

    def __call__(self, events: list[LeaseEvent]) -> None:
        for ev in events:
            if isinstance(ev, LeaseAdded):
                self.routes[ev.lease.subnet] = ev.lease.public_ip
            else:
                self.routes.pop(ev.subnet, None)


async def replay(store: MemoryStore, key: str) -> list[WatchEvent]:
    """The events of ``key`` so far: a watch from revision 1 replays them in one batch."""
    it = store.watch(key, 1)
    assert await anext(it) == []
    events = await asyncio.wait_for(anext(it), 1)
    await it.aclose()  # type: ignore[attr-defined]
    return [e for e in events if e.key == key]


async def background(*coros: Awaitable[None]) -> list[asyncio.Future[None]]:
    return [asyncio.ensure_future(c) for c in coros]


async def stop(tasks: list[asyncio.Future[None]]) -> None:
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if not isinstance(r, asyncio.CancelledError):
            raise AssertionError(f"background task ended early: {r!r}")


async def never_change(old: Lease, new: Lease) -> None:
    raise AssertionError(f"the subnet must stay the same ({old.subnet} -> {new.subnet})")


# ------------------------------------------------------------------------------------------
# acquisition


def test_acquire_writes_a_flannel_lease() -> None:
    async def main() -> None:
        store = MemoryStore()
        cfg = await configured(store)
        lease = await agent(store, 1, ttl=600).acquire(cfg)
        assert lease.subnet.subnet_of(cfg.network) and lease.subnet.prefixlen == 24
        kv = await store.get(lease_key(PREFIX, lease.subnet))
        assert kv is not None
        assert kv.value == encode_lease_value(ip(1))
        assert kv.value == b'{"PublicIP":"10.99.0.1","PublicIPv6":null}'
        assert store.lease_ids() == [kv.lease_id]

    run(main())


def test_restart_reuses_by_public_ip_then_by_previous_subnet() -> None:
    async def main() -> None:
        store = MemoryStore()
        cfg = await configured(store)
        lease = await agent(store, 1).acquire(cfg)
        first = await store.get(lease_key(PREFIX, lease.subnet))
        assert first is not None
        # restart with the same PublicIP: the same subnet, refreshed with a new etcd lease
        again = await agent(store, 1).acquire(cfg)
        assert again.subnet == lease.subnet
        kvs, _ = await store.list(SUBNETS)
        assert len(kvs) == 1 and kvs[0].lease_id != first.lease_id
        assert store.lease_ids() == [kvs[0].lease_id]  # the superseded lease was revoked
        # the lease is gone and our address changed: the subnet file brings the subnet back
        await store.delete(kvs[0].key)
        back = await agent(store, 2).acquire(cfg, previous=lease.subnet)
        assert back.subnet == lease.subnet
        # the previous subnet now belongs to someone else: another one
        other = await agent(store, 3).acquire(cfg, previous=lease.subnet)
        assert other.subnet != lease.subnet

    run(main())


def test_lost_race_is_retried_with_another_subnet(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        store = MemoryStore()
        cfg = await configured(store)
        mgrs = [agent(store, i) for i in range(1, 6)]
        for m in mgrs:
            m.rng = random.Random(7)  # all pick the same subnet first
        leases = await asyncio.gather(*(m.acquire(cfg) for m in mgrs))
        assert len({lease.subnet for lease in leases}) == 5
        kvs, _ = await store.list(SUBNETS)
        assert len(kvs) == 5 and len(store.lease_ids()) == 5

    with caplog.at_level(logging.INFO):
        run(main())
    assert any("was taken by another host meanwhile" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------
# keeping the lease


def test_renewal_with_a_short_ttl_keeps_the_lease() -> None:
    """Real time: TTL 1 s, renewed every 0.5 s; the key must never expire."""

    async def main() -> None:
        store = MemoryStore(min_ttl=1)
        cfg = await configured(store)
        mgr = agent(store, 1, ttl=1, renew_margin=60.0, retry_interval=0.1)
        lease = await mgr.acquire(cfg)
        key = lease_key(PREFIX, lease.subnet)
        rev = store.revision
        tasks = await background(mgr.maintain(never_change))
        try:  # each renewal is one write (a replace with a new lease)
            await until(lambda: store.revision >= rev + 3, "three renewals")
        finally:
            await stop(tasks)
        events = await replay(store, key)
        assert [e.kind for e in events] == ["put"] * len(events) and len(events) >= 4
        assert len(store.lease_ids()) == 1  # every superseded lease was revoked
        assert mgr.lease is not None and mgr.lease.subnet == lease.subnet

    run(main())


def test_outage_longer_than_the_ttl_takes_the_same_subnet_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        clock = FakeClock()
        store = MemoryStore(clock)
        cfg = await configured(store)
        mgr = agent(store, 1, ttl=60)
        lease = await mgr.acquire(cfg)
        store.set_down(True)
        with pytest.raises(StoreUnavailable) as err:
            await mgr.renew()
        assert "\n" not in str(err.value)
        clock.advance(61)  # the lease expires while we cannot reach the store
        store.expire()
        store.set_down(False)
        again = await mgr.renew()
        assert again.subnet == lease.subnet
        kv = await store.get(lease_key(PREFIX, lease.subnet))
        assert kv is not None and kv.value == encode_lease_value(ip(1))

    with caplog.at_level(logging.INFO):
        run(main())
    assert any("is gone from etcd" in r.message for r in caplog.records)


def test_own_lease_deleted_is_reacquired(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        store = MemoryStore()
        cfg = await configured(store)
        mgr = agent(store, 1)
        lease = await mgr.acquire(cfg)
        key = lease_key(PREFIX, lease.subnet)
        tasks = await background(mgr.watch_peers(Peers()), mgr.maintain(never_change))
        try:
            await asyncio.wait_for(mgr.synced.wait(), 5)
            first = await store.get(key)
            assert first is not None
            await store.delete(key)  # an operator's etcdctl del

            async def back() -> bool:
                return await store.get(key) is not None

            await until(back, "the lease to be taken back")
            kv = await store.get(key)
            assert kv is not None and kv.value == first.value and kv.lease_id != first.lease_id
        finally:
            await stop(tasks)

    with caplog.at_level(logging.INFO):
        run(main())
    assert any("LEASE REVOKED" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------
# peers


def test_peer_watch_adds_and_removes_peers() -> None:
    async def main() -> None:
        clock = FakeClock()
        store = MemoryStore(clock)
        cfg = await configured(store)
        me = agent(store, 1)
        await me.acquire(cfg)
        a = await agent(store, 2).acquire(cfg)
        peers = Peers()
        tasks = await background(me.watch_peers(peers))
        try:
            await asyncio.wait_for(me.synced.wait(), 5)
            assert peers.routes == {a.subnet: ip(2)}  # not our own lease
            b = await agent(store, 3, ttl=30).acquire(cfg)
            await until(lambda: b.subnet in peers.routes, "the new peer")
            await store.delete(lease_key(PREFIX, a.subnet))
            await until(lambda: a.subnet not in peers.routes, "the deleted peer to go")
            assert peers.routes == {b.subnet: ip(3)}
            clock.advance(31)  # b stops renewing: its lease expires (no store call needed)
            await until(lambda: peers.routes == {}, "the expired peer to go")
            assert me.watch_live
        finally:
            await stop(tasks)

    run(main())


class GatedStore(MemoryStore):
    """A MemoryStore whose watch() waits for a gate: lets a test act while the watch is down."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.watch_calls = 0

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        self.watch_calls += 1
        await self.gate.wait()
        async for batch in super().watch(prefix, start_revision):
            yield batch


def test_compaction_past_the_watch_revision_relists(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        store = GatedStore()
        cfg = await configured(store)
        me = agent(store, 1)
        await me.acquire(cfg)
        a = await agent(store, 2).acquire(cfg)
        peers = Peers()
        tasks = await background(me.watch_peers(peers, max_backoff=0.1))
        try:
            await asyncio.wait_for(me.synced.wait(), 5)
            assert set(peers.routes) == {a.subnet}
            store.gate.clear()
            calls = store.watch_calls
            store.set_down(True)  # breaks the live watch
            await until(lambda: store.watch_calls > calls, "a re-watch attempt")
            store.set_down(False)
            # while the watch is down: one lease goes, one comes, history is compacted
            await store.delete(lease_key(PREFIX, a.subnet))
            b = await agent(store, 3).acquire(cfg)
            store.compact()
            store.gate.set()
            await until(lambda: set(peers.routes) == {b.subnet}, "the resync after compaction")
            assert me.watch_live
        finally:
            await stop(tasks)

    with caplog.at_level(logging.INFO):
        run(main())
    assert any("re-listing leases" in r.message for r in caplog.records)
