"""EtcdV2Store against a real etcd (``--enable-v2``): the LeaseStore contract of
tests/store_contract.py, with v2's capability flags (no etcd leases, text values, no minimum TTL,
a history of 1000 events instead of compaction)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from flanneld_py.store import Compacted
from flanneld_py.store.etcd import EtcdSettings
from flanneld_py.store.etcdv2 import V2_HISTORY, EtcdV2Store
from lab.etcd import EtcdServer
from tests.store_contract import CHECKS, Check, Harness, run_check

FILLER = "/contract-filler/"


async def history_start(store: EtcdV2Store) -> int:
    """The oldest index etcd's v2 event history still holds (0 while it is not full)."""
    it = store.watch(FILLER, 1)
    try:
        await asyncio.wait_for(anext(it), 5)
    except Compacted as e:
        return e.compact_revision
    finally:
        await it.aclose()  # type: ignore[attr-defined]
    return 0


async def push_history_to(store: EtcdV2Store, revision: int) -> None:
    """The v2 stand-in for compaction: write keys outside the checked prefix until the history
    starts exactly at ``revision`` (it holds the last V2_HISTORY events)."""
    _, now = await store.list(FILLER)
    missing = revision + V2_HISTORY - 1 - now
    if missing < 0:
        raise AssertionError(f"history is already past {revision} (index {now})")
    for first in range(0, missing, 50):
        await asyncio.gather(
            *(
                store.create(f"{FILLER}{now}-{i}", b"x", 3600)
                for i in range(first, min(missing, first + 50))
            )
        )
    assert await history_start(store) == revision


@asynccontextmanager
async def etcdv2_harness(server: EtcdServer) -> AsyncIterator[Harness]:
    async with EtcdV2Store(EtcdSettings([server.endpoint], timeout=5.0)) as store:

        async def lease_ids() -> list[int]:
            return []  # v2 has no etcd leases (and the v3 keyspace stays untouched)

        async def compact(revision: int) -> None:
            await push_history_to(store, revision)

        async def advance(seconds: float) -> None:
            pass  # real time: the check waits for the expiry on its watch

        yield Harness(
            store,
            lease_ids,
            compact,
            advance,
            leases=False,
            binary_values=False,
            min_ttl=1,
            compact_writes=True,
        )
    assert server.lease_ids() == []  # nothing leaked into v3


@pytest.fixture
def etcd_v2(etcd_factory: Callable[..., EtcdServer]) -> EtcdServer:
    return etcd_factory(enable_v2=True)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_contract(check: Check, etcd_v2: EtcdServer) -> None:
    run_check(lambda: etcdv2_harness(etcd_v2), check)
