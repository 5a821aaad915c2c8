"""``AutoStore``: use etcd's v3 or v2 API, whichever keyspace holds the network config.

etcd keeps its v2 and v3 keyspaces apart: flanneld ≤ v0.17 (v2) and ≥ v0.18 (v3) never see each
other's config or leases (flannel-compat §11). With ``--etcd-api=auto`` the daemon does not need
to be told which one a cluster uses: the first thing it reads is ``<prefix>/config``, and
``AutoStore.get(config_key)`` asks both keyspaces for it:

- found in exactly one: that API is used from then on (one info line says which); the other
  store is closed.
- found in both: v3 wins, with one warning (the v2 keyspace's leases are then ignored).
- found in neither: ``get`` returns None (the subnet manager keeps waiting and re-reads it), and
  the config is looked for in both again next time.
- a v2 server that does not serve v2 at all (etcd 3.4 without ``--enable-v2``, 3.6:
  ``ApiNotServed``) leaves only v3: chosen at once, with one info line.
- a keyspace that cannot be read: ``StoreUnavailable`` of the side that could still win is
  raised (the manager retries); a definitive error of one side (e.g. v2 credentials refused)
  makes that side lose, with one warning, while the other has the config or is empty; if v3
  fails definitively and v2 has no config, v3's error is raised (a v3 deployment with, say, a
  wrong password must see that error).

Every other method goes to the chosen store; before a choice they raise StoreError (the daemon
reads the config before anything else, so this cannot happen there). ``api`` is "v3", "v2" or
None (not chosen yet).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import AsyncIterator
from typing import Literal

from flanneld_py.store._base import (
    KV,
    LeaseStore,
    StoredLease,
    StoreError,
    StoreUnavailable,
    WatchEvent,
)
from flanneld_py.store.etcdv2 import ApiNotServed

__all__ = ["AutoStore"]

log = logging.getLogger("flanneld_py.store.select")

Api = Literal["v3", "v2"]

#: what one keyspace said about the config: its KV, None (absent), or the error
_Answer = KV | None | Exception


class AutoStore:
    """A ``LeaseStore`` that picks ``v3`` or ``v2`` by where ``config_key`` is; see the module
    docstring. Owns both stores (``close`` closes them)."""

    def __init__(self, v3: LeaseStore, v2: LeaseStore, config_key: str) -> None:
        self.v3 = v3
        self.v2 = v2
        self.config_key = config_key
        self._chosen: LeaseStore | None = None
        self._api: Api | None = None
        self._searching_logged = False
        self._warned: dict[str, str] = {}

    @property
    def api(self) -> Api | None:
        """The API in use: "v3", "v2", or None while no keyspace holds the config."""
        return self._api

    # -- the choice -----------------------------------------------------------------------
    async def _choose(self, api: Api, why: str, level: int = logging.INFO) -> None:
        store, other = (self.v3, self.v2) if api == "v3" else (self.v2, self.v3)
        self._chosen, self._api = store, api
        log.log(level, "%s", why)
        try:
            await other.close()  # its connections are of no use now (closing is idempotent)
        except StoreError as e:
            log.debug("closing the unused etcd store: %s", e)

    def _warn_once(self, side: str, text: str) -> None:
        if self._warned.get(side) != text:
            self._warned[side] = text
            log.warning("%s", text)

    async def _ask(self, store: LeaseStore, key: str) -> _Answer:
        try:
            return await store.get(key)
        except StoreError as e:
            return e

    async def _find_config(self, key: str) -> KV | None:
        if not self._searching_logged:
            self._searching_logged = True
            log.info(
                "--etcd-api=auto: looking for %s in etcd's v3 and v2 keyspaces; the one that "
                "holds it decides the API",
                key,
            )
        v3, v2 = await asyncio.gather(self._ask(self.v3, key), self._ask(self.v2, key))
        if isinstance(v2, ApiNotServed):
            self._warned.pop("v2", None)
            await self._choose("v3", f"{v2}; using etcd's v3 API only")
            if isinstance(v3, Exception):
                raise v3
            return v3
        if isinstance(v3, KV):
            if isinstance(v2, KV):
                same = "the same value" if v2.value == v3.value else "different values"
                await self._choose(
                    "v3",
                    f"network config {key} found in both etcd keyspaces ({same}): using etcd's "
                    "v3 API; the leases in the v2 keyspace (flanneld <= v0.17 hosts) are "
                    "ignored (see flanneld-py migrate-etcd --help)",
                    logging.WARNING,
                )
            else:
                if isinstance(v2, Exception):
                    log.info("(etcd's v2 keyspace could not be read: %s)", v2)
                await self._choose(
                    "v3", "network config found in the etcd v3 keyspace: using etcd's v3 API"
                )
            return v3
        # v3 has no config, or failed
        if isinstance(v3, StoreUnavailable):
            raise v3  # v3 would win if it has the config: ask again later
        if isinstance(v2, KV):
            if isinstance(v3, Exception):
                self._warn_once("v3", f"etcd's v3 keyspace cannot be read: {v3}")
            await self._choose(
                "v2", "network config found in the etcd v2 keyspace: using etcd's v2 API"
            )
            return v2
        if isinstance(v3, Exception):
            raise v3
        if isinstance(v2, StoreUnavailable):
            raise v2
        if isinstance(v2, Exception):
            self._warn_once("v2", f"etcd's v2 keyspace cannot be read ({v2}); looking in v3 only")
        return None

    def _store(self) -> LeaseStore:
        if self._chosen is None:
            raise StoreError(
                "no etcd keyspace chosen yet (--etcd-api=auto decides by where the network "
                f"config {self.config_key} is; read it first)"
            )
        return self._chosen

    # -- LeaseStore -------------------------------------------------------------------------
    async def get(self, key: str) -> KV | None:
        if self._chosen is not None:
            return await self._chosen.get(key)
        if key == self.config_key:
            return await self._find_config(key)
        return await self._store().get(key)

    async def list(self, prefix: str) -> tuple[builtins.list[KV], int]:
        return await self._store().list(prefix)

    async def create(self, key: str, value: bytes, ttl: int) -> StoredLease | None:
        return await self._store().create(key, value, ttl)

    async def replace(
        self, key: str, value: bytes, ttl: int, mod_revision: int
    ) -> StoredLease | None:
        return await self._store().replace(key, value, ttl, mod_revision)

    async def revoke(self, lease_id: int) -> None:
        await self._store().revoke(lease_id)

    async def delete(self, key: str) -> None:
        await self._store().delete(key)

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[builtins.list[WatchEvent]]:
        return self._store().watch(prefix, start_revision)

    async def close(self) -> None:
        """Close both stores (the unused one was already closed when the choice was made)."""
        await self.v3.close()
        await self.v2.close()

    async def __aenter__(self) -> AutoStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
