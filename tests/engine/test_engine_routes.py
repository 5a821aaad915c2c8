"""The C route table (``_engine.RouteTable``) against ``routes.py`` and a brute-force scan."""

from __future__ import annotations

import importlib
import random
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from enginebench import require_kind

from flanneld_py.routes import MASKS, RouteOps, RouteTable, diff


@pytest.fixture
def ctable() -> Any:
    require_kind("c")
    return importlib.import_module("flanneld_py._engine").RouteTable()


class Brute:
    """The slowest possible LPM: scan everything, keep the longest match."""

    def __init__(self) -> None:
        self.routes: dict[tuple[int, int], int] = {}

    def set(self, net: int, plen: int, peer: int) -> None:
        self.routes[(net & MASKS[plen], plen)] = peer

    def remove(self, net: int, plen: int) -> bool:
        return self.routes.pop((net & MASKS[plen], plen), None) is not None

    def lookup(self, addr: int) -> tuple[int, int, int] | None:
        best = None
        for (net, plen), peer in self.routes.items():
            if addr & MASKS[plen] == net and (best is None or plen > best[1]):
                best = (net, plen, peer)
        return best


def random_prefix(rng: random.Random) -> tuple[int, int]:
    plen = rng.choice([0, 1, 8, 12, 16, 16, 20, 22, 24, 24, 24, 24, 26, 28, 30, 31, 32, 32])
    if rng.random() < 0.2:
        plen = rng.randint(0, 32)
    # a small universe (10.0.0.0/14 mostly) so prefixes nest and collide
    base = 0x0A000000 | rng.getrandbits(18) if rng.random() < 0.9 else rng.getrandbits(32)
    return base & MASKS[plen], plen


def probe_addrs(rng: random.Random, prefixes: list[tuple[int, int]], n: int) -> list[int]:
    out = []
    for _ in range(n):
        r = rng.random()
        if prefixes and r < 0.6:
            net, plen = rng.choice(prefixes)
            size = 1 << (32 - plen)
            out.append(
                rng.choice([net, net + size - 1, net + rng.randrange(size), net - 1, net + size])
                & 0xFFFFFFFF
            )
        elif r < 0.9:
            out.append(0x0A000000 | rng.getrandbits(18))
        else:
            out.append(rng.getrandbits(32))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_table_matches_reference(ctable: Any, seed: int) -> None:
    rng = random.Random(seed)
    py, brute = RouteTable(), Brute()
    known: list[tuple[int, int]] = []
    for step in range(6000):
        r = rng.random()
        if r < 0.65 or not known:
            net, plen = random_prefix(rng)
            if rng.random() < 0.3:  # host bits set: ignored by all three
                net |= rng.getrandbits(32) & ~MASKS[plen] & 0xFFFFFFFF
            peer = rng.getrandbits(32)
            ctable.insert(net, plen, peer)
            py.set(net, plen, peer)
            brute.set(net, plen, peer)
            known.append((net & MASKS[plen], plen))
        elif r < 0.95:
            net, plen = rng.choice(known)
            assert ctable.remove(net, plen) == py.remove(net, plen) == brute.remove(net, plen)
        else:  # absent prefixes
            net, plen = random_prefix(rng)
            assert ctable.remove(net, plen) == py.remove(net, plen) == brute.remove(net, plen)
        if step % 500 == 0:
            assert len(ctable) == len(py) == len(brute.routes)
            for addr in probe_addrs(rng, known, 300):
                assert ctable.lookup(addr) == py.lookup(addr) == brute.lookup(addr), hex(addr)
    assert len(ctable) == len(py)
    for addr in probe_addrs(rng, known, 20000):
        assert ctable.lookup(addr) == py.lookup(addr), hex(addr)


def test_c_table_many_same_length(ctable: Any) -> None:
    """Thousands of /24 and /32 (the flannel shape): growth, then removal in random order."""
    rng = random.Random(5)
    py = RouteTable()
    nets = rng.sample(range(1 << 20), 5000)
    for k, n in enumerate(nets):
        plen = 24 if k % 2 else 32
        net = (n << 8) & MASKS[plen] if plen == 24 else (0x0A000000 | n)
        ctable.insert(net, plen, k)
        py.set(net, plen, k)
    assert len(ctable) == len(py) == 5000
    entries = list(py.items())
    rng.shuffle(entries)
    for j, (net, plen, _peer) in enumerate(entries):
        assert ctable.remove(net, plen) and py.remove(net, plen)
        if j % 250 == 0:  # every remaining entry still reachable (backward-shift deletion)
            for rnet, rplen, rpeer in py.items():
                assert ctable.lookup(rnet) == (rnet, rplen, rpeer) == py.lookup(rnet)
    assert len(ctable) == 0
    assert ctable.lookup(0x0A000001) is None


def test_c_table_edges(ctable: Any) -> None:
    assert ctable.lookup(0) is None and len(ctable) == 0
    ctable.insert(0, 0, 7)
    assert ctable.lookup(0xFFFFFFFF) == (0, 0, 7)
    ctable.insert(0xFFFFFFFF, 32, 8)
    assert ctable.lookup(0xFFFFFFFF) == (0xFFFFFFFF, 32, 8)
    assert ctable.lookup(0xFFFFFFFE) == (0, 0, 7)
    ctable.insert(0x0A050000, 16, 1)
    ctable.insert(0x0A050000, 16, 2)  # replace
    assert ctable.lookup(0x0A05FFFF) == (0x0A050000, 16, 2) and len(ctable) == 3
    assert not ctable.remove(0x0A050000, 17)
    assert ctable.remove(0x0A05FFFF, 16)  # host bits ignored
    assert ctable.lookup(0x0A05FFFF) == (0, 0, 7)
    with pytest.raises(ValueError):
        ctable.insert(0, 33, 1)
    with pytest.raises(ValueError):
        ctable.insert(1 << 32, 8, 1)
    with pytest.raises(OverflowError):
        ctable.insert(-1, 8, 1)
    with pytest.raises(TypeError):
        ctable.lookup("10.0.0.1")


def test_python_table_api() -> None:
    t = RouteTable()
    t.set_route(IPv4Network("10.5.0.0/16"), IPv4Address("1.1.1.1"))
    t.set_route(IPv4Network("10.5.3.0/24"), IPv4Address("2.2.2.2"))
    assert t.peer(int(IPv4Address("10.5.3.9"))) == int(IPv4Address("2.2.2.2"))
    assert t.peer(int(IPv4Address("10.5.4.9"))) == int(IPv4Address("1.1.1.1"))
    assert t.peer(int(IPv4Address("10.6.0.1"))) is None
    assert t.to_dict() == {
        IPv4Network("10.5.3.0/24"): IPv4Address("2.2.2.2"),
        IPv4Network("10.5.0.0/16"): IPv4Address("1.1.1.1"),
    }
    assert t.del_route(IPv4Network("10.5.3.0/24")) and not t.del_route(IPv4Network("10.5.3.0/24"))
    assert len(t) == 1
    with pytest.raises(ValueError):
        t.set(0, 40, 1)
    assert not t.remove(0, 40)


def test_diff() -> None:
    n = IPv4Network
    a = IPv4Address
    old = {
        n("10.5.1.0/24"): a("1.1.1.1"),
        n("10.5.2.0/24"): a("2.2.2.2"),
        n("10.5.3.0/24"): a("3.3.3.3"),
    }
    new = {
        n("10.5.1.0/24"): a("1.1.1.1"),
        n("10.5.2.0/24"): a("9.9.9.9"),
        n("10.5.4.0/24"): a("4.4.4.4"),
    }
    ops = diff(old, new)
    assert ops == RouteOps(
        set={n("10.5.2.0/24"): a("9.9.9.9"), n("10.5.4.0/24"): a("4.4.4.4")},
        delete=(n("10.5.3.0/24"),),
    )
    assert ops and not diff(new, new)
    t = RouteTable()
    for k, v in old.items():
        t.set_route(k, v)
    for k, v in ops.set.items():
        t.set_route(k, v)
    for k in ops.delete:
        t.del_route(k)
    assert t.to_dict() == new
