"""The lease decisions without any store (flanneld_py.policy)."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

from flanneld_py.config import parse_config
from flanneld_py.policy import (
    Claim,
    Exhausted,
    Held,
    Reacquire,
    Renew,
    Reuse,
    plan_acquire,
    plan_renew,
)

CFG = parse_config('{"Network": "10.5.0.0/16"}')
ME = IPv4Address("10.99.0.11")
OTHER = IPv4Address("10.99.0.12")


def held(net: str, ip: IPv4Address, rev: int = 5, lease_id: int = 0) -> Held:
    n = IPv4Network(net)
    return Held(n, ip, f"/p/subnets/{n.network_address}-{n.prefixlen}", rev, lease_id)


def test_own_lease_is_reused_previous_first() -> None:
    rng = random.Random(1)
    leases = [held("10.5.3.0/24", ME, 7), held("10.5.9.0/24", ME, 8), held("10.5.4.0/24", OTHER)]
    assert plan_acquire(leases, ME, None, CFG, rng) == Reuse(leases[0])
    assert plan_acquire(leases, ME, IPv4Network("10.5.9.0/24"), CFG, rng) == Reuse(leases[1])


def test_own_lease_outside_the_config_is_not_reused() -> None:
    leases = [held("10.6.3.0/24", ME), held("10.5.0.0/24", ME)]  # other network; below SubnetMin
    plan = plan_acquire(leases, ME, None, CFG, random.Random(2))
    assert isinstance(plan, Claim) and plan.why == "new"
    assert plan.subnet not in (IPv4Network("10.5.0.0/24"),)


def test_previous_subnet_taken_back_only_when_free() -> None:
    prev = IPv4Network("10.5.20.0/24")
    assert plan_acquire([], ME, prev, CFG, random.Random(3)) == Claim(prev, "previous")
    plan = plan_acquire([held("10.5.20.0/24", OTHER)], ME, prev, CFG, random.Random(3))
    assert isinstance(plan, Claim) and plan.why == "new" and plan.subnet != prev
    # a previous subnet of another length or outside the range is not claimed
    plan = plan_acquire([], ME, IPv4Network("10.5.20.0/25"), CFG, random.Random(3))
    assert isinstance(plan, Claim) and plan.why == "new"


def test_new_subnet_is_free_and_random_among_the_first_100() -> None:
    taken = [held(f"10.5.{i}.0/24", OTHER) for i in range(1, 50)]
    seen = set()
    for seed in range(200):
        plan = plan_acquire(taken, ME, None, CFG, random.Random(seed))
        assert isinstance(plan, Claim) and plan.why == "new"
        assert all(not plan.subnet.overlaps(t.subnet) for t in taken)
        seen.add(plan.subnet)
    assert len(seen) > 50
    assert max(int(s.network_address) for s in seen) <= int(IPv4Address("10.5.149.0"))


def test_exhausted_pool() -> None:
    small = parse_config('{"Network": "10.5.0.0/22", "SubnetLen": 24}')
    taken = [held(f"10.5.{i}.0/24", OTHER) for i in range(1, 4)]
    assert plan_acquire(taken, ME, None, small, random.Random(0)) == Exhausted(3)


def test_renew_decisions() -> None:
    assert plan_renew(None, ME) == Reacquire(same=True)
    assert plan_renew(held("10.5.3.0/24", OTHER), ME) == Reacquire(same=False)
    assert plan_renew(held("10.5.3.0/24", ME), ME, unreadable=True) == Reacquire(same=False)
    assert plan_renew(held("10.5.3.0/24", ME, 9, 77), ME) == Renew(9, 77)
