"""The ``LeaseStore`` contract, written once and run on every store.

Each check is an async function taking a ``Harness`` (a fresh, empty store plus the few controls
a test needs from the server side). ``CHECKS`` lists them; a test module runs them with
``run_check(make_harness, check)``: tests/unit/test_store_memory.py on ``MemoryStore``,
tests/etcd/test_store_contract_etcd.py on ``EtcdStore`` against a real etcd.

Watches yield one empty batch once the store confirmed the watch; ``open_watch`` expects it. A
watch from a compacted revision then raises ``Compacted`` (etcd 3.4 confirms it, then cancels it).

tests/etcd/test_store_contract_etcdv2.py runs it on ``EtcdV2Store`` (etcd's v2 API). Where v2
necessarily differs, the ``Harness`` says so with a capability flag (the defaults are etcd v3's
and MemoryStore's): ``leases`` (v2 has no etcd leases: every lease id is 0, ``revoke`` does
nothing), ``binary_values`` (v2 stores text: only UTF-8 values), ``min_ttl`` (v3 raises TTLs below
2 s; v2 does not) and ``compact_writes`` (v2 cannot compact: its history is its last 1000
events, so ``compact`` writes keys outside the checked prefix to push older events out).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, cast

import pytest

from flanneld_py.store import Compacted, LeaseStore, StoreError, WatchEvent

P = "/coreos.com/network/subnets/"
A, B, C, D = (P + f"10.5.{i}.0-24" for i in range(1, 5))
OUTSIDE = "/coreos.com/network/subnets2/x"

Watch = AsyncGenerator[list[WatchEvent], None]


@dataclass
class Harness:
    store: LeaseStore
    #: ids of the leases the server holds (granted, not revoked or expired)
    lease_ids: Callable[[], Awaitable[list[int]]]
    #: compact the server's history up to a revision
    compact: Callable[[int], Awaitable[None]]
    #: let this many seconds pass for TTLs: MemoryStore advances its clock; on etcd nothing
    #: happens (real time passes while the check waits on the watch)
    advance: Callable[[float], Awaitable[None]]
    #: the store grants etcd leases (False: lease ids are 0 and revoke does nothing)
    leases: bool = True
    #: values may be any bytes (False: UTF-8 text only)
    binary_values: bool = True
    #: TTLs below this are raised to it
    min_ttl: int = 2
    #: ``compact`` writes to the store (outside the checked prefix), moving its revision
    compact_writes: bool = False


HarnessFactory = Callable[[], AbstractAsyncContextManager[Harness]]
Check = Callable[[Harness], Awaitable[None]]
CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


def run_check(make: HarnessFactory, fn: Check, timeout: float = 30.0) -> None:
    """Run one check in a fresh event loop; fail if the loop reported an error."""
    loop_errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: loop_errors.append(ctx))
        async with make() as harness:
            await asyncio.wait_for(fn(harness), timeout)

    asyncio.run(main())
    gc.collect()
    assert not loop_errors, f"event loop reported errors: {loop_errors}"


class FakeClock:
    """A clock for MemoryStore TTLs that only moves when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ------------------------------------------------------------------------------------------
# helpers


async def open_watch(store: LeaseStore, prefix: str, start_revision: int) -> Watch:
    """A watch whose first (empty) batch, the confirmation, has been received."""
    it = cast(Watch, store.watch(prefix, start_revision))
    assert await next_batch(it) == []
    return it


async def next_batch(it: Watch, within: float = 5.0) -> list[WatchEvent]:
    return await asyncio.wait_for(anext(it), within)


async def collect(it: Watch, n: int, within: float = 5.0) -> list[WatchEvent]:
    """The next ``n`` events (failing if a batch brings more)."""
    events: list[WatchEvent] = []
    while len(events) < n:
        events += await next_batch(it, within)
    assert len(events) == n, events
    return events


async def watch_compacted(store: LeaseStore, prefix: str, start_revision: int) -> Compacted:
    """The Compacted a watch from ``start_revision`` ends with. etcd confirms the watch, then
    cancels it: after the empty first batch (a store may also raise at once)."""
    it = cast(Watch, store.watch(prefix, start_revision))
    with pytest.raises(Compacted) as err:
        assert await next_batch(it) == []
        await next_batch(it)
    await it.aclose()
    return err.value


def put(key: str, value: bytes, revision: int) -> WatchEvent:
    return WatchEvent("put", key, value, revision)


def delete(key: str, revision: int) -> WatchEvent:
    return WatchEvent("delete", key, b"", revision)


async def revision(store: LeaseStore) -> int:
    return (await store.list(P))[1]


# ------------------------------------------------------------------------------------------
# the contract


@check
async def get_missing_and_list_by_prefix(h: Harness) -> None:
    store = h.store
    assert await store.get(A) is None
    kvs, rev = await store.list(P)
    assert kvs == [] and rev >= 1
    b = await store.create(B, b"b", 60)
    a = await store.create(A, b"a", 60)
    await store.create(OUTSIDE, b"outside", 60)
    last = await store.create("/coreos.com/network/config", b"{}", 60)
    assert a is not None and b is not None and last is not None
    assert a.ttl == 60
    if h.leases:
        assert a.lease_id != b.lease_id
    else:
        assert a.lease_id == b.lease_id == 0
    assert rev < b.revision < a.revision < last.revision
    kvs, rev = await store.list(P)
    assert [(kv.key, kv.value, kv.mod_revision, kv.lease_id) for kv in kvs] == [
        (A, b"a", a.revision, a.lease_id),
        (B, b"b", b.revision, b.lease_id),
    ]
    assert rev == last.revision  # the store revision, not the newest key under the prefix
    assert await store.get(A) == kvs[0]
    everything, _ = await store.list("")
    assert len(everything) == 4
    assert await store.get(P) is None  # get is exact, not a prefix


@check
async def values_are_bytes_round_tripped_exactly(h: Harness) -> None:
    store = h.store
    values = [
        b"",
        b'{"PublicIP":"10.99.0.1","PublicIPv6":null}',
        "10.5.1.0 ünïcode ✓".encode(),
        b"\x00\xff\xfe\n\r\t \x80",
        bytes(range(256)),
    ]
    flipped = bytes(range(255, -1, -1))
    if not h.binary_values:  # text only: the same kinds of values, as UTF-8
        values[3] = "\x00\xff\xfe\n\r\t \x80".encode()
        values[4] = "".join(map(chr, range(256))).encode() + "\U0001f600 \u2028".encode()
        flipped = values[4].decode()[::-1].encode()
        with pytest.raises(StoreError, match="UTF-8"):
            await store.create(f"{P}binary", b"\xff", 60)
    it = await open_watch(store, P, await revision(store) + 1)
    for i, value in enumerate(values):
        assert await store.create(f"{P}k{i}", value, 60) is not None
    for i, value in enumerate(values):
        kv = await store.get(f"{P}k{i}")
        assert kv is not None and type(kv.value) is bytes and kv.value == value
    kvs, _ = await store.list(P)
    assert [kv.value for kv in kvs] == values
    assert [e.value for e in await collect(it, len(values))] == values
    kv = await store.get(f"{P}k0")
    assert kv is not None
    assert await store.replace(kv.key, flipped, 60, kv.mod_revision)
    assert (await next_batch(it))[0].value == flipped
    await it.aclose()


@check
async def create_only_if_absent_and_leaks_no_lease(h: Harness) -> None:
    store = h.store
    first = await store.create(A, b"first", 60)
    assert first is not None
    assert await h.lease_ids() == ([first.lease_id] if h.leases else [])
    assert await store.create(A, b"second", 60) is None
    kv = await store.get(A)
    assert kv is not None
    assert (kv.value, kv.mod_revision, kv.lease_id) == (b"first", first.revision, first.lease_id)
    assert await revision(store) == first.revision  # a failed create writes nothing
    # a crowd racing for one key: one winner, and the losers' leases are gone
    results = await asyncio.gather(*(store.create(B, f"c{i}".encode(), 60) for i in range(10)))
    winners = [(i, r) for i, r in enumerate(results) if r is not None]
    assert len(winners) == 1
    (i, won), *_ = winners
    assert sorted(await h.lease_ids()) == (
        sorted([first.lease_id, won.lease_id]) if h.leases else []
    )
    assert (await store.get(B)).value == f"c{i}".encode()  # type: ignore[union-attr]


@check
async def replace_compares_the_mod_revision(h: Harness) -> None:
    store = h.store
    first = await store.create(A, b"v1", 60)
    assert first is not None
    old = await store.get(A)
    assert old is not None
    renewed = await store.replace(A, b"v2", 120, old.mod_revision)
    assert renewed is not None
    assert renewed.ttl == 120
    assert renewed.lease_id != first.lease_id if h.leases else renewed.lease_id == 0
    assert renewed.revision == old.mod_revision + 1
    now = await store.get(A)
    assert now is not None
    assert (now.value, now.mod_revision, now.lease_id) == (
        b"v2",
        renewed.revision,
        renewed.lease_id,
    )
    leases = sorted(await h.lease_ids())
    # stale mod_revision: refused, nothing written, no lease left behind
    assert await store.replace(A, b"v3", 60, old.mod_revision) is None
    assert await store.get(A) == now
    assert sorted(await h.lease_ids()) == leases
    assert await store.replace(B, b"v3", 60, old.mod_revision) is None  # missing key
    assert sorted(await h.lease_ids()) == leases
    # the key left its old lease: revoking that one deletes nothing (and writes nothing)
    await store.revoke(first.lease_id)
    assert await store.get(A) == now
    assert await revision(store) == renewed.revision
    assert await h.lease_ids() == ([renewed.lease_id] if h.leases else [])


@check
async def revoke_deletes_the_keys_and_the_watch_sees_it(h: Harness) -> None:
    store = h.store
    a = await store.create(A, b"a", 60)
    b = await store.create(B, b"b", 60)
    assert a is not None and b is not None
    if not h.leases:  # no etcd leases: revoking (lease 0, or any id) writes nothing
        assert a.lease_id == b.lease_id == 0
        for lease_id in (a.lease_id, 0x7777_0000_1234):
            await store.revoke(lease_id)
        assert await revision(store) == b.revision
        assert await store.get(A) is not None and await store.get(B) is not None
        return
    it = await open_watch(store, P, b.revision + 1)
    await store.revoke(a.lease_id)
    assert await store.get(A) is None
    assert await collect(it, 1) == [delete(A, b.revision + 1)]
    assert await revision(store) == b.revision + 1
    assert await h.lease_ids() == [b.lease_id]
    await store.revoke(a.lease_id)  # gone already: not an error
    await store.revoke(0x7777_0000_1234)  # never existed: not an error
    assert await revision(store) == b.revision + 1
    assert await store.get(B) is not None
    await it.aclose()


@check
async def delete_removes_the_key(h: Harness) -> None:
    store = h.store
    a = await store.create(A, b"a", 60)
    assert a is not None
    it = await open_watch(store, P, a.revision + 1)
    await store.delete(A)
    assert await store.get(A) is None
    assert await collect(it, 1) == [delete(A, a.revision + 1)]
    await store.delete(A)  # missing: not an error, and no write
    assert await revision(store) == a.revision + 1
    # the lease lives on until revoked or expired
    assert await h.lease_ids() == ([a.lease_id] if h.leases else [])
    b = await store.create(A, b"again", 60)  # the key can be created again
    assert b is not None and b.revision == a.revision + 2
    await it.aclose()


@check
async def list_revision_then_watch_sees_exactly_the_later_writes(h: Harness) -> None:
    store = h.store
    await store.create(A, b"a", 60)
    b = await store.create(B, b"b", 60)
    assert b is not None
    kvs, rev = await store.list(P)
    assert len(kvs) == 2 and rev == b.revision
    # written after the list, before the watch is opened: still seen (start_revision)
    outside = await store.create(OUTSIDE, b"x", 60)  # not under the prefix: not seen
    c = await store.create(C, b"c", 60)
    await store.delete(A)
    assert outside is not None and c is not None
    assert outside.revision == rev + 1 and c.revision == rev + 2
    it = await open_watch(store, P, rev + 1)
    assert await collect(it, 2) == [put(C, b"c", rev + 2), delete(A, rev + 3)]
    d = await store.create(D, b"d", 60)
    assert d is not None
    assert await next_batch(it) == [put(D, b"d", rev + 4)]
    await it.aclose()


@check
async def watch_from_an_old_revision_replays_history(h: Harness) -> None:
    store = h.store
    a = await store.create(A, b"v1", 60)
    assert a is not None
    r = await store.replace(A, b"v2", 60, a.revision)
    b = await store.create(B, b"b", 60)
    assert r is not None and b is not None
    if h.leases:
        await store.revoke(b.lease_id)
    else:
        await store.delete(B)
    history = [
        put(A, b"v1", a.revision),
        put(A, b"v2", r.revision),
        put(B, b"b", b.revision),
        delete(B, b.revision + 1),
    ]
    it = await open_watch(store, P, a.revision)
    assert await collect(it, 4) == history
    await it.aclose()
    it = await open_watch(store, P, b.revision)
    assert await collect(it, 2) == history[2:]
    await it.aclose()
    # a watch from a future revision waits for it
    rev = b.revision + 1  # the revoke (or delete)
    it = await open_watch(store, P, rev + 3)
    await store.create(C, b"c", 60)
    await store.delete(C)
    await store.create(D, b"d", 60)
    assert await collect(it, 1) == [put(D, b"d", rev + 3)]
    await it.aclose()


@check
async def watch_below_the_compact_revision_raises_compacted(h: Harness) -> None:
    store = h.store
    for key in (A, B, C, D):
        await store.create(key, key.encode(), 60)
    rev = await revision(store)
    await h.compact(rev - 1)
    err = await watch_compacted(store, P, 2)
    assert err.compact_revision == rev - 1
    assert isinstance(err, StoreError) and "\n" not in str(err)
    # the compact revision itself and later are still there
    it = await open_watch(store, P, rev - 1)
    assert await collect(it, 2) == [put(C, C.encode(), rev - 1), put(D, D.encode(), rev)]
    now = await revision(store)
    assert now > rev if h.compact_writes else now == rev
    await store.delete(A)
    assert await next_batch(it) == [delete(A, now + 1)]
    await it.aclose()


@check
async def ttl_expiry_deletes_the_key_and_the_watch_sees_it(h: Harness) -> None:
    store = h.store
    it = await open_watch(store, P, await revision(store) + 1)
    short = await store.create(A, b"short", 2)
    long = await store.create(B, b"long", 60)
    assert short is not None and long is not None and short.ttl == 2
    assert [e.kind for e in await collect(it, 2)] == ["put", "put"]
    await h.advance(1.0)
    assert await store.get(A) is not None
    await h.advance(1.5)
    (expired,) = await next_batch(it, within=6.0)  # on etcd: really ~2 s
    assert expired == delete(A, long.revision + 1)
    assert expired.revision == await revision(store)
    assert await store.get(A) is None
    assert await store.get(B) is not None
    assert await h.lease_ids() == ([long.lease_id] if h.leases else [])
    # a TTL below etcd's minimum (v3: 2 s) is raised to it
    tiny = await store.create(OUTSIDE, b"x", 1)
    assert tiny is not None and tiny.ttl == max(1, h.min_ttl)
    await it.aclose()


@check
async def watch_confirms_with_an_empty_batch_first(h: Harness) -> None:
    store = h.store
    a = await store.create(A, b"a", 60)
    assert a is not None
    it = cast(Watch, store.watch(P, a.revision))
    assert await next_batch(it) == []  # even with history to replay
    assert await next_batch(it) == [put(A, b"a", a.revision)]
    await it.aclose()
    # a consumer that waits on an idle watch can be cancelled
    it = await open_watch(store, P, a.revision + 1)
    waiting = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await it.aclose()
