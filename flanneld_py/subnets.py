"""Subnet lease policy over a LeaseStore: acquire, reuse, renew, watch peers.

Acquisition order (as flannel): a lease already held by our PublicIP; else the subnet named in the
previous subnet file if nobody holds it; else a random free subnet (``allocator``). Creation is an
etcd transaction, so two hosts can never hold the same subnet; a lost race is retried with another
subnet (flannel exits instead).

Renewal happens at expiry minus the margin; a failed renewal is retried every ``retry_interval``.
If etcd was unreachable so long that our lease expired, we take the same subnet back as soon as etcd
answers and the subnet is still free (flannel gives a new one and breaks docker0). If someone else
deletes our lease, we re-acquire (same subnet if free) and say so loudly.

Peers: list ``<prefix>/subnets/`` once, then watch from the next revision. A lost connection
resumes the watch from the last revision seen + 1; a compacted revision re-lists and diffs. The
peer view handed to the data plane is always derived from the full lease map, minus our own subnet
and PublicIP, so own-lease changes and resyncs come out as a plain diff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flanneld_py.config import ConfigError, NetworkConfig, parse_config
from flanneld_py.lease import (
    Lease,
    LeaseAdded,
    LeaseEvent,
    LeaseFormatError,
    decode_lease,
    decode_lease_value,
    diff_leases,
    encode_lease_value,
    lease_key,
    normalize_prefix,
    parse_lease_key,
    subnets_prefix,
)
from flanneld_py.policy import Exhausted, Held, Reacquire, Reuse, plan_acquire, plan_renew
from flanneld_py.store import KV, Compacted, LeaseStore, StoreError, StoreUnavailable

__all__ = [
    "DEFAULT_TTL",
    "PoolExhausted",
    "SubnetManager",
    "effective_margin",
    "renew_delay",
]

log = logging.getLogger("flanneld_py.subnets")

DEFAULT_TTL = 86400
#: attempts to win a creation race before giving up
MAX_ACQUIRE_ATTEMPTS = 50
EXAMPLE_CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}'


class PoolExhausted(StoreError):
    """No free subnet is left in the configured range."""


def effective_margin(ttl: float, margin: float) -> float:
    """The renew margin, capped at half the TTL so a short (test) TTL cannot make renewal spin."""
    return min(margin, ttl / 2)


def renew_delay(expiration: float, now: float, ttl: float, margin: float) -> float:
    """Seconds from ``now`` until the lease expiring at ``expiration`` should be renewed."""
    return max(0.0, expiration - effective_margin(ttl, margin) - now)


class SubnetManager:
    def __init__(
        self,
        store: LeaseStore,
        prefix: str,
        public_ip: IPv4Address,
        *,
        ttl: int = DEFAULT_TTL,
        renew_margin: float = 3600.0,
        retry_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.prefix = normalize_prefix(prefix)
        self.public_ip = public_ip
        self.ttl = ttl
        self.renew_margin = renew_margin
        self.retry_interval = retry_interval
        self.clock = clock
        self.rng = rng or random.Random()
        self.config: NetworkConfig | None = None
        self.lease: Lease | None = None
        #: True while the peer watch is established (for healthz)
        self.watch_live = False
        #: time.monotonic() since when the peer watch is down (lost, or not yet established
        #: since this manager was made); None while it is live (for healthz: outage duration)
        self.watch_down_since: float | None = time.monotonic()
        #: renewals that succeeded (re-acquisitions of a lost lease included) and renewal
        #: attempts that failed (for /metrics)
        self.renewals = 0
        self.renewal_failures = 0
        #: the peer watch recovered after it broke: "reconnect" (re-established, from the last
        #: revision seen + 1, after a lost connection) and "compaction" (that revision was
        #: compacted: the leases were re-listed and diffed)
        self.watch_resyncs: dict[str, int] = {"compaction": 0, "reconnect": 0}
        self._value = encode_lease_value(public_ip)
        self._all: dict[IPv4Network, Lease] = {}
        self._published: dict[IPv4Network, Lease] = {}
        self._warned: dict[str, bytes] = {}
        self._wakeup = asyncio.Event()
        #: set once the first peer snapshot has been applied
        self.synced = asyncio.Event()
        self._on_peers: Callable[[list[LeaseEvent]], None] = lambda events: None

    def set_lease_attrs(
        self, backend_type: str | None, backend_data: dict[str, Any] | None
    ) -> None:
        """What our lease publishes besides PublicIP (the backend's BackendType/BackendData);
        set before :meth:`acquire`."""
        self._value = encode_lease_value(self.public_ip, backend_type, backend_data)

    # ------------------------------------------------------------------ config

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config"

    async def wait_config(
        self, poll_interval: float = 1.0, log_every: float = 10.0
    ) -> NetworkConfig:
        """Read and validate ``<prefix>/config``, waiting (and saying why) until it is usable."""
        last_problem: str | None = None
        last_log = -float("inf")
        while True:
            try:
                kv = await self.store.get(self.config_key)
            except StoreUnavailable as e:
                problem, level = f"waiting for etcd: {e}", logging.WARNING
            else:
                if kv is None:
                    problem = (
                        f"network config {self.config_key} not found; waiting. Write it with: "
                        f"ETCDCTL_API=3 etcdctl put {self.config_key} '{EXAMPLE_CONFIG}'"
                        + (
                            ""
                            if getattr(self.store, "api", "v3") == "v3"
                            else " (for a flanneld <= v0.17 cluster, on etcd's v2 API: "
                            f"ETCDCTL_API=2 etcdctl set {self.config_key} '{EXAMPLE_CONFIG}')"
                        )
                    )
                    level = logging.WARNING
                else:
                    try:
                        self.config = parse_config(kv.value)
                    except ConfigError as e:
                        problem = (
                            f"invalid network config at {self.config_key}: {e}; waiting for a "
                            f"corrected value (etcdctl put {self.config_key} '...')"
                        )
                        level = logging.ERROR
                    else:
                        if last_problem is not None:
                            log.info("network config is now usable")
                        return self.config
            now = time.monotonic()
            if problem != last_problem or now - last_log >= log_every:
                log.log(level, "%s", problem)
                last_problem, last_log = problem, now
            await asyncio.sleep(poll_interval)

    # ------------------------------------------------------------------ own lease

    def _key(self, subnet: IPv4Network) -> str:
        return lease_key(self.prefix, subnet)

    def _parse(self, kv: KV) -> Lease | None:
        """A lease from an etcd key-value, or None (with one warning per bad value) if malformed."""
        try:
            subnet = parse_lease_key(kv.key)
            value = decode_lease(kv.value)
        except LeaseFormatError as e:
            if self._warned.get(kv.key) != kv.value:
                self._warned[kv.key] = kv.value
                log.warning("ignoring malformed lease %s: %s", kv.key, e)
            return None
        self._warned.pop(kv.key, None)
        return Lease(
            subnet,
            value.public_ip,
            backend_type=value.backend_type,
            backend_data=value.backend_data,
        )

    def _held(self, subnet: IPv4Network, how: str) -> Lease:
        self.lease = Lease(subnet, self.public_ip, self.clock() + self.ttl)
        log.info("%s %s (PublicIP %s, TTL %ds)", how, subnet, self.public_ip, self.ttl)
        return self.lease

    def _listed(self, kvs: list[KV]) -> list[Held]:
        out = []
        for kv in kvs:
            lease = self._parse(kv)
            if lease is not None:
                out.append(
                    Held(lease.subnet, lease.public_ip, kv.key, kv.mod_revision, kv.lease_id)
                )
        return out

    async def acquire(self, cfg: NetworkConfig, previous: IPv4Network | None = None) -> Lease:
        """Hold a lease: our existing one, else ``previous`` if free, else a random free subnet
        (decided by :func:`flanneld_py.policy.plan_acquire`, carried out here)."""
        self.config = cfg
        for _ in range(MAX_ACQUIRE_ATTEMPTS):
            kvs, _rev = await self.store.list(subnets_prefix(self.prefix))
            plan = plan_acquire(self._listed(kvs), self.public_ip, previous, cfg, self.rng)
            if isinstance(plan, Reuse):
                held = plan.held
                res = await self.store.replace(held.key, self._value, self.ttl, held.mod_revision)
                if res is not None:
                    await self._revoke_old(held.lease_id, res.lease_id)
                    return self._held(held.subnet, "reusing existing lease for")
                continue  # it changed under us: look again
            if isinstance(plan, Exhausted):
                raise PoolExhausted(
                    f"no free subnet left in {cfg.network} between {cfg.subnet_min} and "
                    f"{cfg.subnet_max} ({plan.taken} leases held); remove stale leases under "
                    f"{subnets_prefix(self.prefix)} or widen Network/SubnetMin/SubnetMax"
                )
            if await self.store.create(self._key(plan.subnet), self._value, self.ttl):
                how = (
                    "took back previous subnet" if plan.why == "previous" else "acquired new lease"
                )
                return self._held(plan.subnet, how)
            if plan.why == "new":
                log.info(
                    "subnet %s was taken by another host meanwhile; trying another", plan.subnet
                )
        raise StoreError(
            f"could not acquire a subnet lease after {MAX_ACQUIRE_ATTEMPTS} attempts "
            "(heavy contention on etcd)"
        )

    async def _revoke_old(self, old_id: int, new_id: int) -> None:
        if old_id and old_id != new_id:
            try:
                await self.store.revoke(old_id)
            except StoreError as e:  # it expires by itself; nothing depends on it
                log.debug("could not revoke superseded etcd lease %x: %s", old_id, e)

    async def renew(self) -> Lease:
        """Extend our lease; if it was lost (expired, deleted, taken), acquire one again."""
        assert self.lease is not None and self.config is not None
        subnet = self.lease.subnet
        key = self._key(subnet)
        kv = await self.store.get(key)
        owner: IPv4Address | None = None
        current: Held | None = None
        if kv is not None:
            try:
                owner = decode_lease_value(kv.value)
            except LeaseFormatError:
                owner = None
            current = Held(subnet, owner or IPv4Address(0), key, kv.mod_revision, kv.lease_id)
        plan = plan_renew(current, self.public_ip, unreadable=kv is not None and owner is None)
        if isinstance(plan, Reacquire):
            if plan.same:
                log.warning(
                    "our lease for %s is gone from etcd (expired or deleted); taking it back",
                    subnet,
                )
                return await self.acquire(self.config, previous=subnet)
            log.error(
                "LEASE LOST: subnet %s now belongs to %s, not us (%s); acquiring another subnet",
                subnet,
                owner or "an unreadable value",
                self.public_ip,
            )
            return await self.acquire(self.config, previous=None)
        assert kv is not None
        res = await self.store.replace(key, self._value, self.ttl, plan.mod_revision)
        if res is None:  # changed between get and replace: decide again from scratch
            return await self.renew()
        await self._revoke_old(kv.lease_id, res.lease_id)
        self.lease = Lease(subnet, self.public_ip, self.clock() + self.ttl)
        log.info("renewed lease for %s (expires in %ds)", subnet, self.ttl)
        return self.lease

    async def maintain(self, on_change: Callable[[Lease, Lease], Awaitable[None]]) -> None:
        """Run forever: renew on time, retry failures, re-acquire a lost lease.

        ``on_change(old, new)`` is awaited when the subnet itself changes.
        """
        assert self.lease is not None
        failing = False
        while True:
            lease = self.lease
            assert lease is not None and lease.expiration is not None
            delay = (
                self.retry_interval
                if failing
                else renew_delay(lease.expiration, self.clock(), self.ttl, self.renew_margin)
            )
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                new = await self.renew()
            except PoolExhausted:
                self.renewal_failures += 1
                raise
            except StoreError as e:
                self.renewal_failures += 1
                log.warning(
                    "lease renewal for %s failed: %s; retrying in %ds",
                    lease.subnet,
                    e,
                    self.retry_interval,
                )
                failing = True
                continue
            self.renewals += 1
            if failing:
                log.info("lease renewal succeeded again")
            failing = False
            if new.subnet != lease.subnet:
                self._publish()
                await on_change(lease, new)

    # ------------------------------------------------------------------ peers

    def peers(self) -> dict[IPv4Network, Lease]:
        """The current peer view (what the data plane routes to)."""
        return dict(self._published)

    def _view(self) -> dict[IPv4Network, Lease]:
        own = self.lease.subnet if self.lease else None
        cfg = self.config
        return {
            s: lease
            for s, lease in self._all.items()
            if s != own
            and lease.public_ip != self.public_ip
            and (cfg is None or s.subnet_of(cfg.network))
        }

    def _publish(self) -> None:
        view = self._view()
        events = diff_leases(self._published, view)
        self._published = view
        if events:
            for ev in events:
                if isinstance(ev, LeaseAdded):
                    log.info("peer added: %s via %s", ev.lease.subnet, ev.lease.public_ip)
                else:
                    log.info("peer removed: %s", ev.subnet)
            self._on_peers(events)

    def _note_own(self, key: str, lease: Lease | None) -> None:
        if self.lease is None or key != self._key(self.lease.subnet):
            return
        if lease is None:
            log.error("LEASE REVOKED: our lease %s was deleted from etcd; re-acquiring", key)
            self._wakeup.set()
        elif lease.public_ip != self.public_ip:
            log.error("LEASE CONFLICT: %s was overwritten with PublicIP %s", key, lease.public_ip)
            self._wakeup.set()

    async def watch_peers(
        self,
        on_peers: Callable[[list[LeaseEvent]], None],
        max_backoff: float = 10.0,
    ) -> None:
        """Run forever: keep the peer view in sync with etcd, calling ``on_peers`` with changes."""
        self._on_peers = on_peers
        prefix = subnets_prefix(self.prefix)
        rev: int | None = None
        backoff = 0.5
        #: a warning was logged for the current outage (then only debug until the watch is back)
        warned = False
        #: the watch had been established once and was lost since (the next one is a reconnect)
        was_live = False
        lost = False

        def down() -> None:
            if self.watch_live:
                self.watch_live = False
                self.watch_down_since = time.monotonic()

        while True:
            try:
                if rev is None:
                    kvs, rev = await self.store.list(prefix)
                    self._all = {
                        lease.subnet: lease for kv in kvs if (lease := self._parse(kv)) is not None
                    }
                    self._publish()
                    self.synced.set()
                    if self.lease is not None:
                        own_key = self._key(self.lease.subnet)
                        if own_key not in {kv.key for kv in kvs}:
                            self._note_own(own_key, None)
                start = rev + 1
                async for batch in self.store.watch(prefix, start):
                    if not self.watch_live:  # the first batch ([]): etcd confirmed the watch
                        log.info("watching %s from revision %d", prefix, start)
                        self.watch_live = True
                        self.watch_down_since = None
                        warned = False
                        if lost:
                            self.watch_resyncs["reconnect"] += 1
                        was_live, lost = True, False
                    for ev in batch:
                        rev = max(rev, ev.revision)
                        if ev.kind == "delete":
                            try:
                                subnet = parse_lease_key(ev.key)
                            except LeaseFormatError:
                                continue
                            self._all.pop(subnet, None)
                            self._warned.pop(ev.key, None)
                            self._note_own(ev.key, None)
                        else:
                            lease = self._parse(KV(ev.key, ev.value, ev.revision))
                            if lease is None:
                                continue
                            self._all[lease.subnet] = lease
                            self._note_own(ev.key, lease)
                    self._publish()
                    backoff = 0.5
                raise StoreUnavailable("etcd closed the watch")
            except Compacted as e:
                log.warning("%s; re-listing leases", e)
                self.watch_resyncs["compaction"] += 1
                lost = False  # the re-list is this outage's resync
                rev = None
                down()
            except StoreUnavailable as e:
                lost = lost or was_live
                resume = "start" if rev is None else rev + 1
                if self.watch_live:
                    log.warning("lost the lease watch: %s; resuming from revision %s", e, resume)
                elif not warned:
                    log.warning(
                        "cannot watch the leases yet: %s; retrying from revision %s", e, resume
                    )
                else:
                    log.debug("lease watch still down: %s", e)
                warned = True
                down()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
