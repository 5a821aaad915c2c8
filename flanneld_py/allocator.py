"""Choose a free subnet for a new lease, the way flannel does (pure).

Walk the candidates from SubnetMin to SubnetMax in subnet-size steps, skip any that overlaps an
existing lease, stop after 100 free ones, pick one of those at random.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Network

from flanneld_py.config import NetworkConfig

__all__ = ["MAX_CANDIDATES", "candidates", "choose_subnet"]

MAX_CANDIDATES = 100


def candidates(cfg: NetworkConfig) -> Iterator[IPv4Network]:
    start = int(cfg.subnet_min.network_address)
    stop = int(cfg.subnet_max.network_address)
    for addr in range(start, stop + 1, cfg.subnet_size):
        yield IPv4Network((addr, cfg.subnet_len))


def choose_subnet(
    cfg: NetworkConfig,
    taken: Iterable[IPv4Network],
    rng: random.Random | None = None,
) -> IPv4Network | None:
    """A random free subnet among the first 100 free ones, or None if the pool is exhausted."""
    same_len: set[IPv4Network] = set()
    other: list[IPv4Network] = []
    for t in taken:
        (same_len.add(t) if t.prefixlen == cfg.subnet_len else other.append(t))
    free: list[IPv4Network] = []
    for c in candidates(cfg):
        if c in same_len or any(c.overlaps(t) for t in other):
            continue
        free.append(c)
        if len(free) >= MAX_CANDIDATES:
            break
    if not free:
        return None
    return (rng or random).choice(free)
