import random
from ipaddress import IPv4Network

from flanneld_py.allocator import MAX_CANDIDATES, candidates, choose_subnet
from flanneld_py.config import parse_config

CFG = parse_config('{"Network": "10.5.0.0/16"}')


def test_candidates_walk_min_to_max() -> None:
    cands = list(candidates(CFG))
    assert cands[0] == IPv4Network("10.5.1.0/24")
    assert cands[-1] == IPv4Network("10.5.255.0/24")
    assert len(cands) == 255


def test_choice_is_among_first_100_free_and_skips_taken() -> None:
    taken = [IPv4Network(f"10.5.{i}.0/24") for i in range(1, 50)]
    rng = random.Random(1)
    seen = {choose_subnet(CFG, taken, rng) for _ in range(2000)}
    expected = {IPv4Network(f"10.5.{i}.0/24") for i in range(50, 50 + MAX_CANDIDATES)}
    assert seen == expected  # random over exactly the first 100 free ones


def test_overlap_with_leases_of_another_length() -> None:
    cfg = parse_config('{"Network": "10.5.0.0/22", "SubnetLen": 24}')  # 10.5.1-3.0/24
    taken = [IPv4Network("10.5.2.0/23"), IPv4Network("10.5.1.128/25")]
    assert choose_subnet(cfg, taken) is None
    taken = [IPv4Network("10.5.2.0/23")]
    assert choose_subnet(cfg, taken) == IPv4Network("10.5.1.0/24")


def test_exhausted_pool() -> None:
    cfg = parse_config('{"Network": "10.5.0.0/28"}')  # /30 subnets, 3 usable
    taken = list(candidates(cfg))
    assert len(taken) == 3
    assert choose_subnet(cfg, taken) is None
    assert choose_subnet(cfg, taken[:2]) == taken[2]
