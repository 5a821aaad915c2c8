"""MemoryStore: the LeaseStore contract (tests/store_contract.py) and its test controls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from flanneld_py.store import StoreError, StoreUnavailable
from flanneld_py.store.memory import MemoryStore
from tests.store_contract import (
    CHECKS,
    A,
    B,
    C,
    Check,
    FakeClock,
    Harness,
    P,
    collect,
    delete,
    next_batch,
    open_watch,
    put,
    run_check,
)


@asynccontextmanager
async def memory_harness() -> AsyncIterator[Harness]:
    clock = FakeClock()
    store = MemoryStore(clock)

    async def lease_ids() -> list[int]:
        return store.lease_ids()

    async def compact(revision: int) -> None:
        store.compact(revision)

    async def advance(seconds: float) -> None:
        clock.advance(seconds)
        store.expire()

    async with store:
        yield Harness(store, lease_ids, compact, advance)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_contract(check: Check) -> None:
    run_check(memory_harness, check)


def run(fn: Callable[[MemoryStore, FakeClock], Coroutine[Any, Any, None]]) -> None:
    """Run ``fn(store, clock)`` on a fresh store with a fake clock."""

    async def main(h: Harness) -> None:
        store = h.store
        assert isinstance(store, MemoryStore) and isinstance(store.clock, FakeClock)
        await fn(store, store.clock)

    run_check(memory_harness, main, timeout=10)


# ------------------------------------------------------------------------------------------
# down, close


def test_down_fails_every_call_and_ends_watches() -> None:
    async def main(store: MemoryStore, clock: FakeClock) -> None:
        a = await store.create(A, b"a", 10)
        assert a is not None
        it = await open_watch(store, P, a.revision + 1)
        waiting = asyncio.ensure_future(next_batch(it))
        await asyncio.sleep(0.01)
        store.set_down(True)
        with pytest.raises(StoreUnavailable) as err:
            await waiting
        msg = str(err.value)
        assert "down" in msg and "\n" not in msg
        calls = [
            store.get(A),
            store.list(P),
            store.create(B, b"b", 10),
            store.replace(A, b"x", 10, a.revision),
            store.revoke(a.lease_id),
            store.delete(A),
            anext(store.watch(P, 1)),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable, match="down"):
                await call
        # the server lives on: another client writes, our lease expires
        store.put(C, b"c")
        clock.advance(11)
        assert store.expire() == [a.lease_id]
        store.set_down(False)
        # re-watch from the last revision seen + 1: nothing was lost
        it = await open_watch(store, P, a.revision + 1)
        assert await collect(it, 2) == [put(C, b"c", a.revision + 1), delete(A, a.revision + 2)]
        assert await store.get(A) is None
        await it.aclose()

    run(main)


def test_close_ends_watches_and_calls_with_store_error() -> None:
    async def main(store: MemoryStore, clock: FakeClock) -> None:
        it = await open_watch(store, P, 1)
        waiting = asyncio.ensure_future(next_batch(it))
        await asyncio.sleep(0.01)
        await store.close()
        for call in (waiting, store.get(A), anext(store.watch(P, 1))):
            with pytest.raises(StoreError, match="closed") as err:
                await call
            assert not isinstance(err.value, StoreUnavailable)
        await store.close()  # idempotent

    run(main)


def test_watch_released_on_aclose_and_cancel() -> None:
    async def main(store: MemoryStore, clock: FakeClock) -> None:
        it = await open_watch(store, P, 1)
        assert len(store._watchers) == 1
        await it.aclose()

        async def consume() -> None:
            async for _ in store.watch(P, 1):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.01)
        assert len(store._watchers) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store._watchers == set()

    run(main)


# ------------------------------------------------------------------------------------------
# TTL expiry


def test_expiry_without_calls_reaches_an_open_watch() -> None:
    """The clock moves and nobody calls the store: the watch's own check expires the lease."""

    async def main(store: MemoryStore, clock: FakeClock) -> None:
        a = await store.create(A, b"a", 5)
        assert a is not None
        it = await open_watch(store, P, a.revision + 1)
        clock.advance(4.9)
        await asyncio.sleep(0.15)  # a few of the watch's expiry checks
        assert await store.get(A) is not None
        clock.advance(0.1)  # exactly at the TTL: expired
        assert await next_batch(it, within=1) == [delete(A, a.revision + 1)]
        assert store.lease_ids() == []
        await it.aclose()

    run(main)


def test_expiry_is_applied_before_every_call_and_revokes_all_keys_of_a_lease() -> None:
    async def main(store: MemoryStore, clock: FakeClock) -> None:
        a = await store.create(A, b"a", 10)
        assert a is not None
        store.put(B, b"b", lease_id=a.lease_id)  # a second key on the same lease
        rev = store.revision
        it = await open_watch(store, P, rev + 1)
        clock.advance(10)
        assert await store.get(A) is None  # no expire() needed
        # one revision for both deletes, delivered together
        assert await next_batch(it) == [delete(A, rev + 1), delete(B, rev + 1)]
        assert store.revision == rev + 1
        await it.aclose()

    run(main)


def test_renewal_by_replace_moves_the_key_to_the_new_lease() -> None:
    async def main(store: MemoryStore, clock: FakeClock) -> None:
        a = await store.create(A, b"a", 10)
        assert a is not None
        clock.advance(8)
        r = await store.replace(A, b"a", 10, a.revision)
        assert r is not None
        clock.advance(8)  # the first lease expired, the key is on the second one
        assert store.expire() == [a.lease_id]
        assert (await store.get(A)) is not None
        clock.advance(2)
        assert store.expire() == [r.lease_id]
        assert await store.get(A) is None

    run(main)


# ------------------------------------------------------------------------------------------
# controls


def test_controls() -> None:
    async def main(store: MemoryStore, clock: FakeClock) -> None:
        assert store.revision == 1
        assert store.put(A, b"plain") == 2
        kv = await store.get(A)
        assert kv is not None and (kv.mod_revision, kv.lease_id) == (2, 0)
        with pytest.raises(ValueError, match="lease 1 not found"):
            store.put(B, b"x", lease_id=1)
        with pytest.raises(ValueError, match="future revision"):
            store.compact(3)
        assert store.compact() == 2
        assert store.compact(1) == 2  # never goes back
        # a key without a lease never expires
        clock.advance(10**9)
        assert store.expire() == []
        assert await store.get(A) == kv

    run(main)
