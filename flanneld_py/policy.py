"""The lease decisions, as pure functions: what to do with the leases etcd holds (pure).

Both etcd stores (v3 and v2) and the in-memory one share these: the subnet manager lists the
leases, asks :func:`plan_acquire` or :func:`plan_renew` what to do, and carries the plan out
(a conditional write that may lose a race, after which it asks again with a fresh listing).

Acquisition order, as flannel: (1) a lease already held by our PublicIP that fits the config
(the previous subnet first when we hold several); (2) the subnet of the previous subnet file if
nobody holds it; (3) a random free subnet (:mod:`allocator`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from flanneld_py.allocator import choose_subnet
from flanneld_py.config import NetworkConfig

__all__ = [
    "Claim",
    "Exhausted",
    "Held",
    "Reacquire",
    "Renew",
    "Reuse",
    "plan_acquire",
    "plan_renew",
]


@dataclass(frozen=True)
class Held:
    """A lease as listed: its subnet and owner, and the version to write against."""

    subnet: IPv4Network
    public_ip: IPv4Address
    key: str
    mod_revision: int
    lease_id: int = 0


@dataclass(frozen=True)
class Reuse:
    """Re-put our existing lease (conditional on ``held.mod_revision``)."""

    held: Held


@dataclass(frozen=True)
class Claim:
    """Create a lease for ``subnet`` (only if nobody holds it); ``why``: "previous" or "new"."""

    subnet: IPv4Network
    why: str


@dataclass(frozen=True)
class Exhausted:
    """No free subnet is left; ``taken`` leases are held."""

    taken: int


AcquirePlan = Reuse | Claim | Exhausted


def plan_acquire(
    leases: Sequence[Held],
    public_ip: IPv4Address,
    previous: IPv4Network | None,
    cfg: NetworkConfig,
    rng: random.Random,
) -> AcquirePlan:
    """What to do to hold a lease, given every lease listed under ``<prefix>/subnets/``."""
    mine = [h for h in leases if h.public_ip == public_ip and cfg.contains_subnet(h.subnet)]
    if mine:
        mine.sort(key=lambda h: h.subnet != previous)  # the previous subnet first
        return Reuse(mine[0])
    taken = [h.subnet for h in leases]
    if (
        previous is not None
        and cfg.contains_subnet(previous)
        and not any(previous.overlaps(t) for t in taken)
    ):
        return Claim(previous, "previous")
    choice = choose_subnet(cfg, taken, rng)
    if choice is None:
        return Exhausted(len(taken))
    return Claim(choice, "new")


@dataclass(frozen=True)
class Renew:
    """Re-put our lease (conditional on ``mod_revision``)."""

    mod_revision: int
    lease_id: int


@dataclass(frozen=True)
class Reacquire:
    """Our lease is gone (``same`` = take the same subnet back) or someone else's now."""

    same: bool


RenewPlan = Renew | Reacquire


def plan_renew(current: Held | None, public_ip: IPv4Address, unreadable: bool = False) -> RenewPlan:
    """What renewing our lease means, given what its key holds now (None = no key)."""
    if current is None:
        return Reacquire(same=True)
    if unreadable or current.public_ip != public_ip:
        return Reacquire(same=False)
    return Renew(current.mod_revision, current.lease_id)
