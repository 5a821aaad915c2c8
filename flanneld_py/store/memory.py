"""``LeaseStore`` in memory, with etcd's semantics, for tests of the daemon without etcd.

Like one etcd member: a revision counter (every write +1; a delete of a missing key or the revoke
of a lease without keys writes nothing), keys with their mod revision and lease, leases with a TTL
(at least ``min_ttl``, as etcd raises short TTLs to its minimum of 2 s), and a history of events
that ``watch`` replays from ``start_revision`` until ``compact()`` drops it. A key put with a new
lease leaves its old lease, so revoking the old one no longer deletes it (as in etcd). A watch
yields ``[]`` once established; from a compacted revision it then raises ``Compacted`` (as etcd
3.4 confirms such a watch, then cancels it).

TTLs run on ``clock`` (default ``time.monotonic``). Expired leases are revoked, with delete
events, by ``expire()``: run at the start of every call and every ``expire_interval`` seconds by
each open watch, so a test with a fake clock advances it and calls ``expire()`` (or any method).

Test controls act on the "server" and work while it is down: ``put`` (as ``etcdctl put``),
``compact``, ``expire``, ``set_down``, ``lease_ids``, ``revision``. While down, every call
raises ``StoreUnavailable`` and open watches end with it; after ``close()``, ``StoreError``.
Every call yields to the event loop once (a round trip), so concurrent callers interleave.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from flanneld_py.store._base import (
    KV,
    Compacted,
    StoredLease,
    StoreError,
    StoreUnavailable,
    WatchEvent,
)

__all__ = ["MemoryStore"]


@dataclass
class _Lease:
    ttl: int
    expires: float
    keys: set[str] = field(default_factory=set)


@dataclass(eq=False)  # hashed by identity (kept in a set)
class _Watcher:
    prefix: str
    start: int
    pending: builtins.list[WatchEvent]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    error: StoreError | None = None


class MemoryStore:
    """An in-memory ``LeaseStore``; see the module docstring."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        min_ttl: int = 2,
        expire_interval: float = 0.05,
    ) -> None:
        self.clock = clock
        self.min_ttl = min_ttl
        self.expire_interval = expire_interval
        self._revision = 1  # a fresh etcd is at revision 1
        self._compacted = 0
        self._kvs: dict[str, KV] = {}
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x1000)
        self._history: builtins.list[WatchEvent] = []
        self._watchers: set[_Watcher] = set()
        self._down = False
        self._closed = False

    # -- test controls ----------------------------------------------------------------------
    @property
    def revision(self) -> int:
        return self._revision

    def lease_ids(self) -> builtins.list[int]:
        """The leases granted and not yet revoked or expired."""
        return sorted(self._leases)

    def put(self, key: str, value: bytes, lease_id: int = 0) -> int:
        """Write ``key`` unconditionally (``etcdctl put``); returns the revision."""
        if lease_id and lease_id not in self._leases:
            raise ValueError(f"lease {lease_id:x} not found")
        self._put(key, value, lease_id)
        return self._revision

    def compact(self, revision: int | None = None) -> int:
        """Drop the history before ``revision`` (default: the current one), as etcd compaction:
        a watch from below it raises ``Compacted``. Returns the compact revision."""
        rev = self._revision if revision is None else revision
        if rev > self._revision:
            raise ValueError(f"cannot compact to future revision {rev} (now {self._revision})")
        self._compacted = max(self._compacted, rev)
        self._history = [e for e in self._history if e.revision >= self._compacted]
        return self._compacted

    def expire(self) -> builtins.list[int]:
        """Revoke every lease whose TTL ran out by ``clock()``; returns their ids."""
        now = self.clock()
        expired = sorted(
            (lease.expires, lease_id)
            for lease_id, lease in self._leases.items()
            if lease.expires <= now
        )
        for _, lease_id in expired:
            self._revoke(lease_id)
        return [lease_id for _, lease_id in expired]

    def set_down(self, down: bool) -> None:
        """While down, every call raises StoreUnavailable; open watches end with it now."""
        self._down = down
        if down:
            self._end_watches(StoreUnavailable(_DOWN))

    # -- LeaseStore -------------------------------------------------------------------------
    async def get(self, key: str) -> KV | None:
        await self._enter()
        return self._kvs.get(key)

    async def list(self, prefix: str) -> tuple[builtins.list[KV], int]:
        await self._enter()
        keys = sorted(k for k in self._kvs if k.startswith(prefix))
        return [self._kvs[k] for k in keys], self._revision

    async def create(self, key: str, value: bytes, ttl: int) -> StoredLease | None:
        await self._enter()
        return None if key in self._kvs else self._put_with_new_lease(key, value, ttl)

    async def replace(
        self, key: str, value: bytes, ttl: int, mod_revision: int
    ) -> StoredLease | None:
        await self._enter()
        kv = self._kvs.get(key)
        if kv is None or kv.mod_revision != mod_revision:
            return None
        return self._put_with_new_lease(key, value, ttl)

    async def revoke(self, lease_id: int) -> None:
        await self._enter()
        self._revoke(lease_id)

    async def delete(self, key: str) -> None:
        await self._enter()
        if key in self._kvs:
            self._revision += 1
            self._remove([key])

    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[builtins.list[WatchEvent]]:
        await self._enter()
        compacted = 0 < start_revision < self._compacted
        start = start_revision if start_revision > 0 else self._revision + 1
        replay = [e for e in self._history if e.revision >= start and e.key.startswith(prefix)]
        w = _Watcher(prefix, start, replay)
        self._watchers.add(w)
        try:
            yield []  # the watch is established (as EtcdStore after etcd confirmed it)
            if compacted:  # etcd, too, confirms the watch, then cancels it as compacted
                raise Compacted(self._compacted)
            while True:
                if w.error is not None:
                    raise w.error
                if w.pending:
                    batch, w.pending = w.pending, []
                    yield batch
                    continue
                w.wake.clear()
                try:
                    await asyncio.wait_for(w.wake.wait(), self.expire_interval)
                except TimeoutError:
                    self.expire()
        finally:
            self._watchers.discard(w)

    async def close(self) -> None:
        """End open watches with StoreError; later calls raise StoreError (idempotent)."""
        self._closed = True
        self._end_watches(StoreError("memory store is closed"))

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ------------------------------------------------------------------------
    async def _enter(self) -> None:
        await asyncio.sleep(0)
        if self._closed:
            raise StoreError("memory store is closed")
        if self._down:
            raise StoreUnavailable(_DOWN)
        self.expire()

    def _put_with_new_lease(self, key: str, value: bytes, ttl: int) -> StoredLease:
        lease_id = next(self._lease_ids)
        ttl = max(ttl, self.min_ttl)
        self._leases[lease_id] = _Lease(ttl, self.clock() + ttl)
        self._put(key, value, lease_id)
        return StoredLease(lease_id, ttl, self._revision)

    def _put(self, key: str, value: bytes, lease_id: int) -> None:
        self._detach(key)
        self._revision += 1
        self._kvs[key] = KV(key, bytes(value), self._revision, lease_id)
        if lease_id:
            self._leases[lease_id].keys.add(key)
        self._emit([WatchEvent("put", key, bytes(value), self._revision)])

    def _revoke(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is not None and lease.keys:
            self._revision += 1  # one transaction deletes all its keys
            self._remove(sorted(lease.keys))

    def _remove(self, keys: builtins.list[str]) -> None:
        for key in keys:
            self._detach(key)
            del self._kvs[key]
        self._emit([WatchEvent("delete", key, b"", self._revision) for key in keys])

    def _detach(self, key: str) -> None:
        old = self._kvs.get(key)
        if old is not None and old.lease_id in self._leases:
            self._leases[old.lease_id].keys.discard(key)

    def _emit(self, events: builtins.list[WatchEvent]) -> None:
        self._history += events
        for w in self._watchers:
            mine = [e for e in events if e.key.startswith(w.prefix) and e.revision >= w.start]
            if mine:
                w.pending += mine
                w.wake.set()

    def _end_watches(self, error: StoreError) -> None:
        for w in self._watchers:
            w.error = error
            w.wake.set()


_DOWN = "memory store is down (set_down(True)); retry later"
