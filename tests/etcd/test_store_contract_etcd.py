"""EtcdStore against a real etcd: the LeaseStore contract of tests/store_contract.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from flanneld_py.store.etcd import EtcdSettings, EtcdStore
from lab.etcd import EtcdServer
from tests.store_contract import CHECKS, Check, Harness, run_check


@asynccontextmanager
async def etcd_harness(server: EtcdServer) -> AsyncIterator[Harness]:
    async def lease_ids() -> list[int]:
        return await asyncio.to_thread(server.lease_ids)

    async def compact(revision: int) -> None:
        await asyncio.to_thread(server.compact, revision)

    async def advance(seconds: float) -> None:
        pass  # etcd's TTLs run on real time: the check waits for the expiry on its watch

    async with EtcdStore(EtcdSettings([server.endpoint], timeout=5.0)) as store:
        yield Harness(store, lease_ids, compact, advance)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_contract(check: Check, etcd_server: EtcdServer) -> None:
    run_check(lambda: etcd_harness(etcd_server), check)
