"""Contract of the key-value store under the subnet manager."""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol


class StoreError(Exception):
    """Any store failure. ``str(e)`` is one line that says what failed and how to fix it."""


class StoreUnavailable(StoreError):
    """No endpoint answered (connection refused, timeout, all members down). Retry later."""


class Compacted(StoreError):
    """A watch asked for history that etcd has compacted away: re-list and diff."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted (etcd compact revision {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    #: etcd lease id the key is attached to (0 = none)
    lease_id: int = 0


@dataclass(frozen=True)
class StoredLease:
    """A key written with a fresh etcd lease of ``ttl`` seconds."""

    lease_id: int
    ttl: int
    #: revision of the write
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    #: b"" for deletes
    value: bytes
    #: mod revision of this event
    revision: int


class LeaseStore(Protocol):
    """What the subnet manager needs from etcd. Every method may raise StoreUnavailable."""

    async def get(self, key: str) -> KV | None:
        """The key's current value, or None."""
        ...

    async def list(self, prefix: str) -> tuple[builtins.list[KV], int]:
        """All keys under ``prefix`` and the store revision of that snapshot."""
        ...

    async def create(self, key: str, value: bytes, ttl: int) -> StoredLease | None:
        """Atomically: if the key does not exist, grant a ttl lease and put the key with it.
        Returns None (and leaks no etcd lease) if the key exists."""
        ...

    async def replace(
        self, key: str, value: bytes, ttl: int, mod_revision: int
    ) -> StoredLease | None:
        """Atomically: if the key's mod_revision is still ``mod_revision``, put it with a newly
        granted ttl lease. None if the key changed or vanished meanwhile."""
        ...

    async def revoke(self, lease_id: int) -> None:
        """Revoke an etcd lease (and delete its keys); a lease that is gone is not an error."""
        ...

    async def delete(self, key: str) -> None: ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[builtins.list[WatchEvent]]:
        """Events under ``prefix`` from ``start_revision`` on, in batches as etcd delivers them.

        The first batch is always empty (``[]``): it comes as soon as etcd has confirmed the
        watch, before any event, so the caller knows the watch is established (and a watch that
        fails to open raises before yielding anything). Raises Compacted if ``start_revision``
        is compacted (etcd may say so only after confirming the watch), StoreUnavailable when
        the connection is lost (the caller re-watches from the last seen revision + 1)."""
        ...

    async def close(self) -> None: ...
