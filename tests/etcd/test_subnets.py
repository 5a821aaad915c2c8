"""SubnetManager against a real etcd: acquisition races, reuse, renewal, watch resilience."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from flanneld_py.lease import Lease, LeaseEvent, lease_key
from flanneld_py.store import LeaseStore, WatchEvent
from flanneld_py.store.etcd import EtcdSettings, EtcdStore
from flanneld_py.subnets import PoolExhausted, SubnetManager
from lab.etcd import free_port

PREFIX = "/coreos.com/network"
CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}'


def ip(i: int) -> IPv4Address:
    return IPv4Address(f"10.99.0.{i}")


async def until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.05)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def store_for(endpoints: list[str]) -> EtcdStore:
    return EtcdStore(EtcdSettings(endpoints=endpoints, timeout=10.0))


async def agent(store: LeaseStore, i: int, **kw: Any) -> SubnetManager:
    return SubnetManager(store, PREFIX, ip(i), rng=random.Random(i), **kw)


class Peers:
    """Collects the peer events a manager publishes into a dict, like the engine's route table."""

    def __init__(self) -> None:
        self.routes: dict[IPv4Network, IPv4Address] = {}

    def __call__(self, events: list[LeaseEvent]) -> None:
        for ev in events:
            if hasattr(ev, "lease"):
                self.routes[ev.lease.subnet] = ev.lease.public_ip
            else:
                self.routes.pop(ev.subnet, None)


def test_twenty_agents_race_for_a_small_network(etcd_server: Any) -> None:
    async def main() -> None:
        store = store_for([etcd_server.endpoint])
        try:
            await store_put(
                etcd_server, f"{PREFIX}/config", '{"Network": "10.5.0.0/19", "SubnetLen": 24}'
            )  # 31 subnets
            cfg = await (await agent(store, 0)).wait_config(0.1)
            # each agent its own client, as on separate hosts
            stores = [store_for([etcd_server.endpoint]) for _ in range(20)]
            mgrs = [await agent(s, i + 1) for i, s in enumerate(stores)]
            # all start from the same small random window: force collisions
            for m in mgrs:
                m.rng = random.Random(7)
            leases = await asyncio.gather(*(m.acquire(cfg) for m in mgrs))
            subnets = [lease.subnet for lease in leases]
            assert len(set(subnets)) == 20, subnets
            kvs, _ = await store.list(f"{PREFIX}/subnets/")
            assert len(kvs) == 20
            # pool exhausted: 11 free subnets left, 14 more agents -> 3 get a clear error
            more = [await agent(s, 100 + i) for i, s in enumerate(stores[:14])]
            res = await asyncio.gather(*(m.acquire(cfg) for m in more), return_exceptions=True)
            errors = [r for r in res if isinstance(r, Exception)]
            assert len(errors) == 3 and all(isinstance(e, PoolExhausted) for e in errors)
            assert "no free subnet left in 10.5.0.0/19" in str(errors[0])
            got = {r.subnet for r in res if isinstance(r, Lease)} | set(subnets)
            assert len(got) == 31
            for s in stores:
                await s.close()
        finally:
            await store.close()

    run(main())


async def store_put(server: Any, key: str, value: str) -> None:
    await asyncio.to_thread(server.etcdctl, "put", key, value)


def test_restart_reuses_subnet_by_public_ip_and_by_subnet_file(etcd_server: Any) -> None:
    async def main() -> None:
        await store_put(etcd_server, f"{PREFIX}/config", CONFIG)
        store = store_for([etcd_server.endpoint])
        try:
            first = await agent(store, 1)
            cfg = await first.wait_config(0.1)
            lease = await first.acquire(cfg)
            # restart with the same PublicIP: the same subnet, the lease refreshed
            again = await (await agent(store, 1)).acquire(cfg)
            assert again.subnet == lease.subnet
            kvs, _ = await store.list(f"{PREFIX}/subnets/")
            assert len(kvs) == 1
            assert kvs[0].value == b'{"PublicIP":"10.99.0.1","PublicIPv6":null}'
            # the lease expired meanwhile and our address changed: the subnet file brings it back
            await store.delete(lease_key(PREFIX, lease.subnet))
            back = await (await agent(store, 2)).acquire(cfg, previous=lease.subnet)
            assert back.subnet == lease.subnet
            # the previous subnet is now someone else's: a different one
            other = await (await agent(store, 3)).acquire(cfg, previous=lease.subnet)
            assert other.subnet != lease.subnet
        finally:
            await store.close()

    run(main())


def test_renewal_with_a_short_ttl_keeps_the_lease(etcd_server: Any) -> None:
    async def main() -> None:
        await store_put(etcd_server, f"{PREFIX}/config", CONFIG)
        store = store_for([etcd_server.endpoint])
        try:
            mgr = await agent(store, 1, ttl=3, renew_margin=60.0, retry_interval=0.5)
            lease = await mgr.acquire(await mgr.wait_config(0.1))
            key = lease_key(PREFIX, lease.subnet)
            first = await store.get(key)
            assert first is not None
            changes: list[tuple[Lease, Lease]] = []

            async def on_change(old: Lease, new: Lease) -> None:
                changes.append((old, new))

            task = asyncio.ensure_future(mgr.maintain(on_change))
            try:
                await asyncio.sleep(7)  # more than two TTLs: without renewal the key is gone
                kv = await store.get(key)
                assert kv is not None
                assert kv.lease_id != first.lease_id  # renewed with a fresh etcd lease
                assert mgr.lease is not None and mgr.lease.subnet == lease.subnet
                assert changes == []
            finally:
                task.cancel()
            # superseded etcd leases were revoked, not leaked
            ids = await asyncio.to_thread(etcd_server.lease_ids)
            assert len(ids) <= 2
        finally:
            await store.close()

    run(main())


def test_own_lease_deleted_is_reacquired(
    etcd_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        await store_put(etcd_server, f"{PREFIX}/config", CONFIG)
        store = store_for([etcd_server.endpoint])
        try:
            mgr = await agent(store, 1)
            lease = await mgr.acquire(await mgr.wait_config(0.1))
            key = lease_key(PREFIX, lease.subnet)

            async def on_change(old: Lease, new: Lease) -> None:
                raise AssertionError("the subnet must stay the same")

            tasks = [
                asyncio.ensure_future(mgr.watch_peers(Peers())),
                asyncio.ensure_future(mgr.maintain(on_change)),
            ]
            try:
                await asyncio.wait_for(mgr.synced.wait(), 10)
                first = await store.get(key)
                assert first is not None
                await asyncio.to_thread(etcd_server.etcdctl, "del", key)
                await until(lambda: any("LEASE REVOKED" in r.message for r in caplog.records))

                async def back() -> bool:
                    kv = await store.get(key)
                    return kv is not None

                for _ in range(100):
                    if await back():
                        break
                    await asyncio.sleep(0.1)
                kv = await store.get(key)
                assert kv is not None and kv.value == first.value
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await store.close()

    with caplog.at_level(logging.INFO):
        run(main())


def test_watch_survives_etcd_restart(etcd_server: Any) -> None:
    async def main() -> None:
        await store_put(etcd_server, f"{PREFIX}/config", CONFIG)
        store = store_for([etcd_server.endpoint])
        other = store_for([etcd_server.endpoint])
        try:
            me = await agent(store, 1)
            cfg = await me.wait_config(0.1)
            await me.acquire(cfg)
            a = await (await agent(other, 2)).acquire(cfg)
            peers = Peers()
            task = asyncio.ensure_future(me.watch_peers(peers, max_backoff=1.0))
            try:
                await asyncio.wait_for(me.synced.wait(), 10)
                assert peers.routes == {a.subnet: ip(2)}
                await asyncio.to_thread(etcd_server.kill)
                await until(lambda: not me.watch_live, what="the watch to notice etcd is gone")
                await asyncio.to_thread(etcd_server.restart)
                b = await (await agent(other, 3)).acquire(cfg)
                await until(lambda: b.subnet in peers.routes, what="the lease added meanwhile")
                assert me.watch_live
                await other.delete(lease_key(PREFIX, a.subnet))
                await until(lambda: a.subnet not in peers.routes, what="the deleted lease to go")
                assert peers.routes == {b.subnet: ip(3)}
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            await store.close()
            await other.close()

    run(main())


class GatedStore:
    """The real store, whose watch() waits for a gate: lets a test act while the watch is down."""

    def __init__(self, inner: EtcdStore) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.gate.set()
        self.watch_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        self.watch_calls += 1
        await self.gate.wait()
        async for batch in self.inner.watch(prefix, start_revision):
            yield batch


def test_compaction_past_the_watch_revision_resyncs(
    etcd_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        await store_put(etcd_server, f"{PREFIX}/config", CONFIG)
        inner = store_for([etcd_server.endpoint])
        other = store_for([etcd_server.endpoint])
        store = GatedStore(inner)
        try:
            me = SubnetManager(store, PREFIX, ip(1))  # type: ignore[arg-type]
            cfg = await me.wait_config(0.1)
            await me.acquire(cfg)
            a = await (await agent(other, 2)).acquire(cfg)
            peers = Peers()
            task = asyncio.ensure_future(me.watch_peers(peers, max_backoff=0.5))
            try:
                await asyncio.wait_for(me.synced.wait(), 10)
                assert set(peers.routes) == {a.subnet}
                store.gate.clear()
                calls = store.watch_calls
                await asyncio.to_thread(etcd_server.restart)  # breaks the live watch
                await until(lambda: store.watch_calls > calls, what="a re-watch attempt")
                # while the watch is down: one lease goes, one comes, history is compacted
                await other.delete(lease_key(PREFIX, a.subnet))
                b = await (await agent(other, 3)).acquire(cfg)
                await asyncio.to_thread(etcd_server.compact)
                store.gate.set()
                await until(lambda: set(peers.routes) == {b.subnet}, what="resync after compaction")
                # the re-list publishes before the new watch is confirmed: wait for that too
                await until(lambda: me.watch_live, what="the watch live again")
                assert any("re-listing leases" in r.message for r in caplog.records)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            await inner.close()
            await other.close()

    with caplog.at_level(logging.INFO):
        run(main())


def test_garbage_config_and_garbage_leases(
    etcd_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        store = store_for([etcd_server.endpoint])
        try:
            await store_put(etcd_server, f"{PREFIX}/config", '{"Network": "10.5.0.0/33"')
            me = await agent(store, 1)
            waiting = asyncio.ensure_future(me.wait_config(0.1))
            await until(lambda: any("invalid network config" in r.message for r in caplog.records))
            assert not waiting.done()
            await store_put(etcd_server, f"{PREFIX}/config", CONFIG)
            cfg = await asyncio.wait_for(waiting, 10)
            assert str(cfg.network) == "10.5.0.0/16"
            # another host's garbage: skipped with one warning each, never fatal
            await store_put(etcd_server, f"{PREFIX}/subnets/10.5.9.0-24", "{not json")
            await store_put(etcd_server, f"{PREFIX}/subnets/bogus-key", '{"PublicIP":"10.99.0.9"}')
            await store_put(
                etcd_server, f"{PREFIX}/subnets/10.5.8.0-24", '{"PublicIP":"10.99.0.8"}'
            )
            lease = await me.acquire(cfg)
            assert lease.subnet not in (IPv4Network("10.5.9.0/24"), IPv4Network("10.5.8.0/24"))
            peers = Peers()
            task = asyncio.ensure_future(me.watch_peers(peers))
            try:
                await asyncio.wait_for(me.synced.wait(), 10)
                assert peers.routes == {IPv4Network("10.5.8.0/24"): ip(8)}
                await store_put(etcd_server, f"{PREFIX}/subnets/10.5.8.0-24", '{"PublicIP":1}')
                await store_put(
                    etcd_server, f"{PREFIX}/subnets/10.5.7.0-24", '{"PublicIP":"10.99.0.7"}'
                )
                await until(lambda: IPv4Network("10.5.7.0/24") in peers.routes)
                # a garbled update of a known lease keeps the last good route
                assert IPv4Network("10.5.8.0/24") in peers.routes
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            warnings = [r.message for r in caplog.records if "malformed lease" in r.message]
            assert len([w for w in warnings if "10.5.9.0-24" in w]) == 1
            assert len([w for w in warnings if "bogus-key" in w]) == 1
            assert all("\n" not in r.message for r in caplog.records)
        finally:
            await store.close()

    with caplog.at_level(logging.INFO):
        run(main())


def test_three_member_cluster_member_in_use_killed(etcd_cluster3: Any) -> None:
    async def main() -> None:
        cluster = etcd_cluster3
        await asyncio.to_thread(cluster.etcdctl, "put", f"{PREFIX}/config", CONFIG)
        store = store_for(cluster.endpoints)
        other = store_for(list(reversed(cluster.endpoints)))
        try:
            me = await agent(store, 1, ttl=4, retry_interval=0.5)
            lease = await me.acquire(await me.wait_config(0.1))
            peers = Peers()

            async def on_change(old: Lease, new: Lease) -> None:
                raise AssertionError("the subnet must stay the same")

            tasks = [
                asyncio.ensure_future(me.watch_peers(peers, max_backoff=1.0)),
                asyncio.ensure_future(me.maintain(on_change)),
            ]
            try:
                await asyncio.wait_for(me.synced.wait(), 10)
                # kill every member in turn but one at a time... here: the first (in use)
                await asyncio.to_thread(cluster.kill, 0)
                b = await (await agent(other, 2)).acquire(await me.wait_config(0.1))
                await until(lambda: b.subnet in peers.routes, timeout=30, what="peer via survivors")
                await asyncio.sleep(5)  # > TTL: renewal must have gone through the survivors
                kv = await other.get(lease_key(PREFIX, lease.subnet))
                assert kv is not None
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await store.close()
            await other.close()

    run(main())


def _subnet_lines(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "flanneld_py.subnets" and r.getMessage().startswith(start)
    ]


def test_watch_logged_only_when_established_and_outage_warned_once(
    etcd_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The "watching ... from revision N" line means etcd confirmed the watch: while etcd is
    dead it is not repeated per retry, and "lost the lease watch" is one warning per outage."""
    caplog.set_level(logging.DEBUG, logger="flanneld_py.subnets")
    watching = f"watching {PREFIX}/subnets/ from revision "

    async def main() -> None:
        await store_put(etcd_server, f"{PREFIX}/config", CONFIG)
        store = store_for([etcd_server.endpoint])
        other = store_for([etcd_server.endpoint])
        try:
            t_made = time.monotonic()
            me = await agent(store, 1)
            cfg = await me.wait_config(0.1)
            await me.acquire(cfg)
            # not established yet: down since the manager was made
            assert not me.watch_live
            assert me.watch_down_since is not None and me.watch_down_since >= t_made
            peers = Peers()
            task = asyncio.ensure_future(me.watch_peers(peers, max_backoff=0.2))
            try:
                await until(lambda: me.watch_live, what="the watch to be established")
                assert me.watch_down_since is None
                assert len(_subnet_lines(caplog, watching)) == 1

                t_kill = time.monotonic()
                await asyncio.to_thread(etcd_server.kill)
                await until(lambda: not me.watch_live, what="the watch to notice etcd is gone")
                since = me.watch_down_since
                assert since is not None and t_kill <= since <= time.monotonic()
                await until(
                    lambda: len(_subnet_lines(caplog, "lease watch still down: ")) >= 4,
                    what="a few failed re-watch attempts",
                )
                assert len(_subnet_lines(caplog, watching)) == 1  # no "watching" per retry
                (lost,) = _subnet_lines(caplog, "lost the lease watch: ")
                assert lost.startswith(
                    f"lost the lease watch: lost the watch on etcd at {etcd_server.endpoint}: "
                )
                assert "; resuming from revision " in lost
                assert me.watch_down_since == since  # the outage began once, at the loss

                await asyncio.to_thread(etcd_server.restart)
                await until(lambda: me.watch_live, what="the watch to come back")
                assert me.watch_down_since is None
                lines = _subnet_lines(caplog, watching)
                assert len(lines) == 2  # exactly one new line, once etcd confirmed the watch
                assert len(_subnet_lines(caplog, "lost the lease watch: ")) == 1
                # and the watch works: a lease added now shows up
                b = await (await agent(other, 3)).acquire(cfg)
                await until(lambda: b.subnet in peers.routes, what="the lease added after")
                assert len(_subnet_lines(caplog, watching)) == 2
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            await store.close()
            await other.close()

    run(main())


def test_watch_never_established_warns_once_then_logs_watching_once(
    etcd_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """etcd not running when the watch starts: one warning, debug for the retries, no
    "watching" line until etcd (started later on that port) confirms the watch."""
    caplog.set_level(logging.DEBUG, logger="flanneld_py.subnets")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    watching = f"watching {PREFIX}/subnets/ from revision "

    async def main() -> None:
        store = store_for([url])
        try:
            me = await agent(store, 1)
            made = me.watch_down_since
            assert made is not None
            task = asyncio.ensure_future(me.watch_peers(Peers(), max_backoff=0.2))
            try:
                await until(
                    lambda: len(_subnet_lines(caplog, "lease watch still down: ")) >= 3,
                    what="a few failed attempts",
                )
                (first,) = _subnet_lines(caplog, "cannot watch the leases yet: ")
                assert first == (
                    f"cannot watch the leases yet: etcd unreachable at {url}: connection "
                    "refused; check --etcd-endpoints and that etcd is running; retrying from "
                    "revision start"
                )
                assert _subnet_lines(caplog, watching) == []
                assert _subnet_lines(caplog, "lost the lease watch") == []
                assert not me.watch_live and me.watch_down_since == made
                await asyncio.to_thread(etcd_factory, client_port=port)
                await until(lambda: me.watch_live, what="the watch once etcd is up")
                assert len(_subnet_lines(caplog, watching)) == 1
                assert me.watch_down_since is None
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            await store.close()

    run(main())
