"""EtcdStore against real etcd: the LeaseStore contract, failover, TLS and authentication."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped,unused-ignore]
import pytest

import flanneld_py.store.etcd as etcd_mod
from flanneld_py.store import Compacted, StoreError, StoreUnavailable, WatchEvent
from flanneld_py.store.etcd import EtcdSettings, EtcdStore
from lab.etcd import EtcdCluster, EtcdServer, free_port, make_tls

T = TypeVar("T")
P = "/coreos.com/network/subnets/"


def store_for(*endpoints: str, **kwargs: Any) -> EtcdStore:
    kwargs.setdefault("timeout", 3.0)
    return EtcdStore(EtcdSettings(list(endpoints), **kwargs))


async def eventually(fn: Callable[[], Awaitable[T]], within: float = 5.0) -> T:
    """Retry ``fn`` while it raises StoreUnavailable (what a caller does after an outage)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await fn()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def next_batch(it: AsyncIterator[list[WatchEvent]], within: float = 5.0) -> list[WatchEvent]:
    return await asyncio.wait_for(anext(it), within)


async def collect(it: AsyncIterator[list[WatchEvent]], n: int, within: float = 5.0) -> list[Any]:
    """The next ``n`` events as (kind, key, value) tuples."""
    events: list[WatchEvent] = []
    while len(events) < n:
        events += await next_batch(it, within)
    return [(e.kind, e.key, e.value) for e in events]


# ------------------------------------------------------------------------------------------
# settings


def test_settings_validation(tmp_path: Any) -> None:
    for bad in ([], ["ftp://x:1"], ["http://"], ["http://h:notaport"], ["http://h:1/path"]):
        with pytest.raises(ValueError, match="etcd"):
            EtcdSettings(bad)
    with pytest.raises(ValueError, match="keyfile and --etcd-certfile"):
        EtcdSettings(["https://h:1"], keyfile="k")
    with pytest.raises(ValueError, match="without --etcd-username"):
        EtcdSettings(["http://h:1"], password="p")
    EtcdSettings(["10.0.0.1:2379", "http://[::1]:2379", "https://etcd.example"])
    with pytest.raises(StoreError, match="cannot read --etcd-cafile"):
        EtcdStore(EtcdSettings(["https://h:1"], cafile=str(tmp_path / "missing.pem")))


def test_error_classification() -> None:
    """grpc statuses seen against etcd 3.4 / grpcio 1.85, and what the store makes of them:
    retry on another member (connect), retry shortly (transient), re-authenticate (token), or
    stop (fatal; config = TLS, fatal once no member is left)."""
    code = grpc.StatusCode
    ep = etcd_mod._parse_endpoint("https://10.0.0.1:2379", tls=False)
    cases = [
        (code.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: "
         "ipv4:10.0.0.1:2379: Failed to connect to remote host: Connection refused",
         "connect", "connection refused"),
        (code.UNAVAILABLE, "Stream removed (Socket closed)", "connect", "connection lost"),
        (code.UNAVAILABLE, "Socket closed (GOAWAY received; Error code: 0; Debug Text: )",
         "connect", "connection lost"),
        (code.INTERNAL, "Internal error from Core", "connect", "connection failed"),
        (code.UNKNOWN, "", "connect", "connection failed"),
        (code.DEADLINE_EXCEEDED, "Deadline Exceeded", "connect", "no answer within 3s"),
        (code.UNAVAILABLE, "errors resolving etcd.example:2379: [field:hostname lookup error:"
         "Domain name not found]", "connect", "cannot resolve host '10.0.0.1'"),
        (code.UNAVAILABLE, "failed to connect to all addresses; last error: UNAVAILABLE: "
         "ipv4:10.0.0.1:2379: Unwrap failed (TSI_DATA_CORRUPTED)",
         "config", "rejected our client certificate"),
        (code.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: "
         "ipv4:10.0.0.1:2379: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
         "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get "
         "local issuer certificate: OK", "config", "(unable to get local issuer certificate)"),
        (code.UNAVAILABLE, "etcdserver: no leader", "transient", "no leader"),
        (code.UNAVAILABLE, "etcdserver: leader changed", "transient", "leader changed"),
        (code.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded", "transient",
         "NOSPACE"),
        (code.UNAUTHENTICATED, "etcdserver: invalid auth token", "token", "invalid auth token"),
        (code.INVALID_ARGUMENT, "etcdserver: user name is empty", "token",
         "set --etcd-username and --etcd-password"),
        (code.INVALID_ARGUMENT, "etcdserver: authentication failed, invalid user ID or password",
         "fatal", "etcd rejected username/password: authentication failed"),
        (code.PERMISSION_DENIED, "etcdserver: permission denied", "fatal", "etcd denied access"),
        (code.NOT_FOUND, "etcdserver: requested lease not found", "fatal", "lease not found"),
        (code.UNIMPLEMENTED, "", "fatal", "does not speak etcd's v3 API"),
    ]  # fmt: skip
    for status, details, kind, text in cases:
        f = etcd_mod._classify(status, details, ep, 3.0)
        assert (f.kind, text in f.text) == (kind, True), (status, details, f.kind, f.text)
        assert "\n" not in f.text


# ------------------------------------------------------------------------------------------
# the contract on one member


def test_get_list_create(etcd_server: EtcdServer, run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with store_for(etcd_server.endpoint) as store:
            await store.connect()
            assert await store.get(P + "10.5.1.0-24") is None
            assert await store.list(P) == ([], 1)
            a = await store.create(P + "10.5.1.0-24", b'{"PublicIP":"10.99.0.1"}', 60)
            b = await store.create(P + "10.5.2.0-24", b'{"PublicIP":"10.99.0.2"}', 60)
            await store.create("/coreos.com/network/subnets2/x", b"outside", 60)
            await store.create("/coreos.com/network/config", b"{}", 60)
            assert a is not None and b is not None
            assert a.ttl == 60 and a.lease_id != b.lease_id and b.revision > a.revision
            kv = await store.get(P + "10.5.1.0-24")
            assert kv is not None
            assert (kv.value, kv.mod_revision, kv.lease_id) == (
                b'{"PublicIP":"10.99.0.1"}',
                a.revision,
                a.lease_id,
            )
            kvs, rev = await store.list(P)
            assert [k.key for k in kvs] == [P + "10.5.1.0-24", P + "10.5.2.0-24"]
            assert rev == etcd_server.revision() == b.revision + 2
            assert await store.create(P + "10.5.1.0-24", b"other", 60) is None
            everything, _ = await store.list("")
            assert len(everything) == 4

    run(main())


def test_concurrent_create_one_winner_no_leaked_lease(
    etcd_server: EtcdServer, run: Callable[..., Any]
) -> None:
    key = P + "10.5.7.0-24"

    async def main() -> list[Any]:
        stores = [store_for(etcd_server.endpoint) for _ in range(4)]
        try:
            return await asyncio.gather(
                *(stores[i % 4].create(key, f"creator {i}".encode(), 60) for i in range(20))
            )
        finally:
            for s in stores:
                await s.close()

    results = run(main())
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert etcd_server.lease_ids() == [winners[0].lease_id]  # the 19 losers revoked theirs
    i = results.index(winners[0])
    assert etcd_server.etcdctl("get", key, "--print-value-only").strip() == f"creator {i}"


def test_create_replace_retried_after_a_lost_reply(
    etcd_server: EtcdServer, run: Callable[..., Any]
) -> None:
    """etcd applied the grant/txn but the reply was lost: the retry (on the next endpoint) must
    recognise its own write instead of reporting "key exists" and revoking its lease."""
    key = P + "10.5.4.0-24"

    class LoseFirstReply:
        def __init__(self, real: Any, method: str) -> None:
            self.real, self.method, self.lost = real, method, False

        def __getattr__(self, name: str) -> Any:
            fn = getattr(self.real, name)
            if name != self.method:
                return fn

            async def call(*args: Any, **kwargs: Any) -> Any:
                resp = await fn(*args, **kwargs)
                if not self.lost:
                    self.lost = True
                    raise etcd_mod._Failure(etcd_mod._CONNECT, "connection lost")
                return resp

            return call

    async def main() -> None:
        url = etcd_server.endpoint
        async with store_for(url, url) as store:  # two channels to the same member
            conns = [store._conn(0), store._conn(1)]
            real = [(c.lease, c.kv) for c in conns]

            def lose_next_reply(i: int, method: str) -> None:
                for c, (lease, kv) in zip(conns, real, strict=True):
                    c.lease, c.kv = lease, kv
                stub = "lease" if method == "LeaseGrant" else "kv"
                setattr(conns[i], stub, LoseFirstReply(getattr(conns[i], stub), method))

            lose_next_reply(0, "LeaseGrant")  # the grant is retried on conn 1
            created = await store.create(key, b"a", 60)
            assert created is not None
            assert store._current == 1
            lose_next_reply(1, "Txn")  # the txn is retried on conn 0
            other = await store.create(key + "x", b"a", 60)
            assert other is not None
            assert store._current == 0
            lose_next_reply(0, "Txn")
            kv = await store.get(key)
            assert kv is not None and kv.lease_id == created.lease_id
            assert kv.mod_revision == created.revision

            replaced = await store.replace(key, b"b", 60, kv.mod_revision)
            assert replaced is not None
            kv = await store.get(key)
            assert kv is not None and (kv.value, kv.lease_id) == (b"b", replaced.lease_id)
            leases = [created.lease_id, other.lease_id, replaced.lease_id]
            assert sorted(etcd_server.lease_ids()) == sorted(leases)

    run(main())


def test_replace_revoke_delete(etcd_server: EtcdServer, run: Callable[..., Any]) -> None:
    key = P + "10.5.3.0-24"

    async def main() -> None:
        async with store_for(etcd_server.endpoint) as store:
            first = await store.create(key, b"v1", 60)
            assert first is not None
            old = await store.get(key)
            assert old is not None
            renewed = await store.replace(key, b"v2", 120, old.mod_revision)
            assert renewed is not None and renewed.lease_id != first.lease_id
            now = await store.get(key)
            assert now is not None
            assert (now.value, now.lease_id, now.mod_revision) == (
                b"v2",
                renewed.lease_id,
                renewed.revision,
            )
            # stale mod_revision: refused, and the lease granted for it is revoked again
            assert await store.replace(key, b"v3", 60, old.mod_revision) is None
            assert sorted(etcd_server.lease_ids()) == sorted([first.lease_id, renewed.lease_id])
            assert (await store.get(key)).value == b"v2"  # type: ignore[union-attr]
            # revoking the lease deletes its key; revoking it again is not an error
            await store.revoke(renewed.lease_id)
            assert await store.get(key) is None
            await store.revoke(renewed.lease_id)
            assert await store.replace(key, b"v4", 60, now.mod_revision) is None
            await store.revoke(first.lease_id)
            assert etcd_server.lease_ids() == []
            # delete
            await store.create(key, b"v5", 60)
            await store.delete(key)
            await store.delete(key)
            assert await store.get(key) is None

    run(main())


def test_watch_put_delete_and_ttl_expiry(etcd_server: EtcdServer, run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with store_for(etcd_server.endpoint) as store:
            _, rev = await store.list(P)
            it = store.watch(P, rev + 1)
            # events written before the iterator starts are not lost (start_revision)
            short = await store.create(P + "10.5.1.0-24", b"short", 2)
            assert short is not None and short.ttl == 2
            await store.create("/elsewhere", b"x", 60)
            await store.create(P + "10.5.2.0-24", b"long", 60)
            await store.delete(P + "10.5.2.0-24")
            assert await next_batch(it) == []  # etcd confirmed the watch: first, always
            got = await collect(it, 3)
            assert got == [
                ("put", P + "10.5.1.0-24", b"short"),
                ("put", P + "10.5.2.0-24", b"long"),
                ("delete", P + "10.5.2.0-24", b""),
            ]
            t0 = time.monotonic()
            (expired,) = await next_batch(it, within=6)
            assert (expired.kind, expired.key) == ("delete", P + "10.5.1.0-24")
            assert time.monotonic() - t0 < 4
            assert expired.revision == (await store.list(P))[1]
            await it.aclose()  # type: ignore[attr-defined]

    run(main())


def test_watch_etcd_killed_then_rewatch_loses_nothing(
    etcd_server: EtcdServer, run: Callable[..., Any]
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with store_for(etcd_server.endpoint) as store:
            _, rev = await store.list(P)
            it = store.watch(P, rev + 1)
            await store.create(P + "10.5.1.0-24", b"a", 60)
            assert await next_batch(it) == []
            (ev,) = await next_batch(it)
            last = ev.revision

            t0 = time.monotonic()
            await loop.run_in_executor(None, etcd_server.kill)
            with pytest.raises(StoreUnavailable, match="lost the watch on etcd at") as err:
                await next_batch(it, within=10)
            assert time.monotonic() - t0 < 3
            assert "\n" not in str(err.value)
            with pytest.raises(StoreUnavailable, match="connection refused"):
                await store.get(P + "10.5.1.0-24")
            with pytest.raises(StoreUnavailable):
                await anext(store.watch(P, last + 1))

            await loop.run_in_executor(None, etcd_server.start)
            # written after the restart but before the re-watch
            await eventually(lambda: store.create(P + "10.5.2.0-24", b"b", 60))
            await store.delete(P + "10.5.1.0-24")
            it = store.watch(P, last + 1)
            await store.create(P + "10.5.3.0-24", b"c", 60)
            got = await collect(it, 3)
            assert got == [
                ("put", P + "10.5.2.0-24", b"b"),
                ("delete", P + "10.5.1.0-24", b""),
                ("put", P + "10.5.3.0-24", b"c"),
            ]
            kvs, _ = await store.list(P)
            assert [k.key for k in kvs] == [P + "10.5.2.0-24", P + "10.5.3.0-24"]
            await it.aclose()  # type: ignore[attr-defined]

    run(main())


def test_frozen_member_watch_and_calls_fail_in_time(
    etcd_server: EtcdServer, run: Callable[..., Any]
) -> None:
    """A member that stops answering without closing its connections (SIGSTOP here; a silent
    network loss alike): HTTP/2 keepalive ends the watch within ~10 s, calls hit their deadline."""

    async def main() -> None:
        async with store_for(etcd_server.endpoint, timeout=2.0) as store:
            it = store.watch(P, 1)
            await store.create(P + "10.5.1.0-24", b"a", 60)
            await collect(it, 1)
            await asyncio.sleep(1)  # let grpc's own pings settle: the keepalive must do the job
            etcd_server.pause()
            try:
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable, match="no answer within 2s"):
                    await store.get(P)
                assert time.monotonic() - t0 < 3
                with pytest.raises(StoreUnavailable, match="lost the watch"):
                    await next_batch(it, within=15)
                assert time.monotonic() - t0 < 12
            finally:
                etcd_server.resume()
            assert await eventually(lambda: store.get(P + "10.5.1.0-24")) is not None

    run(main())


def test_watch_compacted(etcd_server: EtcdServer, run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with store_for(etcd_server.endpoint) as store:
            for i in range(1, 5):
                await store.create(P + f"10.5.{i}.0-24", b"x", 60)
            rev = etcd_server.compact()
            # etcd confirms the watch, then cancels it for compaction (its first sync, <= 100 ms)
            it = store.watch(P, 2)
            assert await next_batch(it) == []
            with pytest.raises(Compacted) as err:
                await next_batch(it)
            assert err.value.compact_revision == rev
            assert isinstance(err.value, StoreError)
            # from the compact revision + 1 on, watching works
            it = store.watch(P, rev + 1)
            await store.delete(P + "10.5.1.0-24")
            assert await collect(it, 1) == [("delete", P + "10.5.1.0-24", b"")]
            await it.aclose()  # type: ignore[attr-defined]

    run(main())


def test_watch_confirmation_is_one_empty_batch_before_any_event(
    etcd_server: EtcdServer, run: Callable[..., Any]
) -> None:
    """``[]`` once etcd confirmed the watch (even with nothing to report), then only events; a
    watch that cannot be opened raises before yielding anything."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with store_for(etcd_server.endpoint) as store:
            _, rev = await store.list(P)
            it = store.watch(P, rev + 1)
            assert await next_batch(it) == []
            assert await open_watches(etcd_server, 1) == (1, 1)  # etcd holds the watcher now
            await store.create(P + "10.5.1.0-24", b"a", 60)
            assert [(e.kind, e.key) for e in await next_batch(it)] == [("put", P + "10.5.1.0-24")]
            await store.delete(P + "10.5.1.0-24")
            assert [(e.kind, e.key) for e in await next_batch(it)] == [
                ("delete", P + "10.5.1.0-24")
            ]
            await it.aclose()  # type: ignore[attr-defined]
            await loop.run_in_executor(None, etcd_server.kill)
            with pytest.raises(StoreUnavailable, match="connection refused"):
                await next_batch(store.watch(P, rev + 1))

    run(main())


async def open_watches(server: EtcdServer, expected: int) -> tuple[float, float]:
    """(watch streams, watchers) open on the member, polled until both equal ``expected``."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + 5
    while True:
        metrics = await loop.run_in_executor(
            None,
            lambda: (
                server.metric("etcd_debugging_mvcc_watch_stream_total"),
                server.metric("etcd_debugging_mvcc_watcher_total"),
            ),
        )
        if metrics == (expected, expected) or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.1)


def test_watch_release_on_close_cancel_and_store_close(
    etcd_server: EtcdServer, run: Callable[..., Any]
) -> None:
    threads_before: list[threading.Thread] = []

    async def main() -> None:
        async with store_for(etcd_server.endpoint) as store:
            await store.connect()
            threads_before.extend(threading.enumerate())
            # aclose() of a running iterator
            it = store.watch(P, 1)
            await store.create(P + "10.5.1.0-24", b"a", 60)
            await next_batch(it)
            await it.aclose()  # type: ignore[attr-defined]
            # cancelling the task that waits on the watch
            got: list[list[WatchEvent]] = []

            async def consume() -> None:
                async for batch in store.watch(P, 100):
                    got.append(batch)

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.3)
            assert await open_watches(etcd_server, 1) == (1, 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # an iterator never started, dropped
            store.watch(P, 1)
            # closing the store under a waiting consumer ends it with StoreError
            consumer = asyncio.create_task(consume())
            await asyncio.sleep(0.3)
        with pytest.raises(StoreError, match="closed"):
            await asyncio.wait_for(consumer, 3)
        assert got == [[], []]  # each consumer got the confirmation of its watch, no event
        with pytest.raises(StoreError, match="closed"):
            await store.get(P)
        assert await open_watches(etcd_server, 0) == (0, 0)  # etcd saw every stream go

    run(main())
    # grpc keeps one process-wide poller thread; nothing is added per store or per watch
    assert len(threading.enumerate()) <= len(threads_before)


# ------------------------------------------------------------------------------------------
# unreachable etcd and failover


def test_unreachable_endpoint_fails_fast_with_one_line(run: Callable[..., Any]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    async def main() -> None:
        async with store_for(url, timeout=2.0) as store:
            for op in (
                store.connect,
                lambda: store.get("/k"),
                lambda: store.create("/k", b"v", 60),
                lambda: anext(store.watch(P, 1)),
            ):
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable) as err:
                    await op()
                assert time.monotonic() - t0 < 3.0
                msg = str(err.value)
                assert msg == (
                    f"etcd unreachable at {url}: connection refused; "
                    "check --etcd-endpoints and that etcd is running"
                )
        async with store_for(url, "http://nosuchhost.invalid:2379", timeout=2.0) as store:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as err:
                await store.get("/k")
            assert time.monotonic() - t0 < 3.0
            assert "connection refused" in str(err.value)
            assert "http://nosuchhost.invalid:2379 (cannot resolve host" in str(err.value)

    run(main())


def test_dead_first_endpoint_and_localhost(
    etcd_server: EtcdServer, run: Callable[..., Any]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    by_name = f"http://localhost:{etcd_server.client_port}"

    async def main() -> None:
        async with store_for(dead, by_name) as store:
            t0 = time.monotonic()
            lease = await store.create(P + "10.5.1.0-24", b"a", 60)
            assert lease is not None
            assert time.monotonic() - t0 < 1.0
            assert store.current_endpoint == by_name
            it = store.watch(P, lease.revision)
            assert await collect(it, 1) == [("put", P + "10.5.1.0-24", b"a")]
            await it.aclose()  # type: ignore[attr-defined]

    run(main())


def test_cluster_member_in_use_killed(etcd_cluster3: EtcdCluster, run: Callable[..., Any]) -> None:
    cluster = etcd_cluster3
    leader = cluster.leader()
    # the client starts on the leader: killing it also forces an election
    order = [leader] + [i for i in range(3) if i != leader]
    timings: dict[str, float] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with store_for(*(cluster[i].endpoint for i in order), timeout=5.0) as store:
            first = await store.create(P + "10.5.1.0-24", b"a", 60)
            assert first is not None
            assert store.current_endpoint == cluster[leader].endpoint
            it = store.watch(P, first.revision + 1)
            await store.create(P + "10.5.2.0-24", b"b", 60)
            assert await next_batch(it) == []
            (ev,) = await next_batch(it)

            await loop.run_in_executor(None, cluster.kill, leader)
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await next_batch(it, within=10)
            timings["watch error"] = time.monotonic() - t0

            t0 = time.monotonic()
            kv = await store.get(P + "10.5.1.0-24")
            timings["get"] = time.monotonic() - t0
            assert kv is not None and kv.value == b"a"
            assert store.current_endpoint != cluster[leader].endpoint

            t0 = time.monotonic()
            created = await store.create(P + "10.5.3.0-24", b"c", 60)
            timings["create"] = time.monotonic() - t0
            assert created is not None
            replaced = await store.replace(P + "10.5.1.0-24", b"a2", 60, kv.mod_revision)
            assert replaced is not None
            it = store.watch(P, ev.revision + 1)
            assert await collect(it, 2) == [
                ("put", P + "10.5.3.0-24", b"c"),
                ("put", P + "10.5.1.0-24", b"a2"),
            ]
            await it.aclose()  # type: ignore[attr-defined]

    run(main())
    print("failover timings (s):", {k: round(v, 2) for k, v in timings.items()})
    assert timings["watch error"] < 2
    assert timings["get"] + timings["create"] < 6


# ------------------------------------------------------------------------------------------
# TLS and authentication


def test_tls_client_certificates(
    etcd_factory: Callable[..., EtcdServer], tmp_path: Path, run: Callable[..., Any]
) -> None:
    # the server certificate names 127.0.0.1 and etcd.test, not localhost
    tls = make_tls(tmp_path / "tls", ips=["127.0.0.1"], dns_names=["etcd.test"])
    other = make_tls(tmp_path / "other-ca")
    server = etcd_factory(tls=tls)
    ca, cert, key = str(tls.ca), str(tls.client_cert), str(tls.client_key)
    port = server.client_port

    async def main() -> None:
        for url in (server.endpoint, f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"):
            # key + cert given: TLS even for an http:// URL (as flannel)
            async with store_for(url, cafile=ca, certfile=cert, keyfile=key) as store:
                lease = await store.create(P + "10.5.1.0-24", b"a", 60)
                assert lease is not None
                kv = await store.get(P + "10.5.1.0-24")
                assert kv is not None and kv.value == b"a"
                it = store.watch(P, lease.revision)
                assert (await collect(it, 1))[0][0] == "put"
                await it.aclose()  # type: ignore[attr-defined]
                await store.revoke(lease.lease_id)

        failures = {
            "no client cert": store_for(server.endpoint, cafile=ca),
            "wrong CA": store_for(
                server.endpoint, cafile=str(other.ca), certfile=cert, keyfile=key
            ),
            "unknown client cert": store_for(
                server.endpoint,
                cafile=ca,
                certfile=str(other.client_cert),
                keyfile=str(other.client_key),
            ),
            "plain http": store_for(f"http://127.0.0.1:{port}"),
            "wrong host name": store_for(
                f"https://localhost:{port}", cafile=ca, certfile=cert, keyfile=key
            ),
        }
        errors: dict[str, StoreError] = {}
        for name, store in failures.items():
            async with store:
                t0 = time.monotonic()
                with pytest.raises(StoreError) as err:
                    await store.get("/k")
                assert time.monotonic() - t0 < 2
                errors[name] = err.value
        messages = {name: str(e) for name, e in errors.items()}
        print(messages)
        for name in ("no client cert", "unknown client cert", "wrong CA", "wrong host name"):
            assert not isinstance(errors[name], StoreUnavailable), name
            assert messages[name].startswith("TLS: "), name
        for name in ("no client cert", "unknown client cert"):
            assert "rejected our client certificate" in messages[name]
            assert "--etcd-certfile" in messages[name]
        assert "cannot verify the certificate" in messages["wrong CA"]
        assert "--etcd-cafile" in messages["wrong CA"]
        assert "not valid for host 'localhost'" in messages["wrong host name"]
        assert "https://" in messages["plain http"]
        assert all("\n" not in m for m in messages.values())

    run(main())


def test_https_to_a_plain_http_etcd_says_so(
    etcd_server: EtcdServer, run: Callable[..., Any]
) -> None:
    """etcd closes the connection on a ClientHello. grpc mostly reports "Handshake read failed
    (Socket closed)": the plain-http hint is plausible, and the only hint, and the error is the
    configuration's. When the close comes with the ClientHello unread, the kernel resets the
    connection instead ("Connection reset by peer"): then the error stays retryable (a reset can
    be the network's) but gives the same hint."""
    url = f"https://127.0.0.1:{etcd_server.client_port}"

    async def main() -> None:
        async with store_for(url) as store:
            with pytest.raises(StoreError) as err:
                await store.get("/k")
        if isinstance(err.value, StoreUnavailable):
            assert str(err.value) == (
                f"etcd unreachable at {url}: connection reset during the TLS handshake (is it a "
                "plain http endpoint? use http://); check --etcd-endpoints and that etcd is running"
            )
        else:
            assert str(err.value) == (
                f"TLS handshake with etcd at {url} failed: the server closed the connection; "
                "is it a plain http endpoint? use http://"
            )

    run(main())


def test_unusable_tls_files_are_refused_at_construction(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    key, cert = str(tls.client_key), str(tls.client_cert)
    with pytest.raises(StoreError) as err:
        store_for("https://127.0.0.1:2379", certfile=key, keyfile=cert)
    assert str(err.value) == (
        f"--etcd-certfile/--etcd-keyfile are swapped: --etcd-certfile {key} holds a private key "
        f"and --etcd-keyfile {cert} a certificate (--etcd-certfile takes the certificate, "
        "--etcd-keyfile the key)"
    )
    with pytest.raises(StoreError) as err:
        store_for("https://127.0.0.1:2379", cafile=key)
    assert (
        str(err.value)
        == f"--etcd-cafile {key}: not a PEM certificate bundle (it holds a private key)"
    )


def test_username_password(
    etcd_factory: Callable[..., EtcdServer], run: Callable[..., Any]
) -> None:
    # tokens live 2 s here: the store must fetch a new one when etcd says the old one is invalid
    server = etcd_factory(extra_args=["--auth-token-ttl=2"])
    server.enable_auth("rootpw")
    server.add_user("flannel", "s3cret", "/coreos.com/network/")
    url = server.endpoint

    async def main() -> None:
        async with store_for(url, username="flannel", password="s3cret") as store:
            await store.connect()
            lease = await store.create(P + "10.5.1.0-24", b"a", 60)
            assert lease is not None
            it = store.watch(P, lease.revision)
            assert await collect(it, 1) == [("put", P + "10.5.1.0-24", b"a")]
            await it.aclose()  # type: ignore[attr-defined]
            gen = store._token_gen
            await asyncio.sleep(3)  # the token expires
            kvs, _ = await store.list(P)
            assert len(kvs) == 1
            assert store._token_gen > gen  # a new token was fetched
            gen = store._token_gen
            await asyncio.sleep(3)
            it = store.watch(P, lease.revision)
            assert await collect(it, 1) == [("put", P + "10.5.1.0-24", b"a")]
            assert store._token_gen > gen
            await it.aclose()  # type: ignore[attr-defined]
            await store.revoke(lease.lease_id)
            with pytest.raises(StoreError, match=r"^etcd denied access: permission denied"):
                await store.get("/other/key")

        async with store_for(url, username="flannel", password="wrong") as store:
            with pytest.raises(StoreError) as err:
                await store.connect()
            assert not isinstance(err.value, StoreUnavailable)
            assert str(err.value).startswith("etcd rejected username/password: ")
            assert "--etcd-password" in str(err.value)
            with pytest.raises(StoreError, match="rejected username/password"):
                await anext(store.watch(P, 1))

        async with store_for(url) as store:
            with pytest.raises(StoreError, match="requires authentication") as err:
                await store.get(P)
            assert not isinstance(err.value, StoreUnavailable)

    run(main())


def test_under_uvloop(etcd_server: EtcdServer) -> None:
    """The daemon runs on uvloop: grpc.aio must work there too."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with store_for(etcd_server.endpoint) as store:
            lease = await store.create(P + "10.5.1.0-24", b"a", 60)
            assert lease is not None
            it = store.watch(P, lease.revision)
            assert await collect(it, 1) == [("put", P + "10.5.1.0-24", b"a")]
            await it.aclose()  # type: ignore[attr-defined]

    uvloop.run(main())
