"""``Firewall.setup()`` keeps the rules when exactly ours are in place (``Firewall._in_place``),
and rebuilds them otherwise: inside a fresh test namespace only.

A restart that finds its own rules must leave them untouched (no moment without masquerade or
forward rules): the rules are marked with packet/byte counters (``iptables -R ... -c``) before
the second ``setup()``; a setup that kept them leaves the counters, one that re-created them
resets them to 0. Any difference from exactly our rules (one rule missing or altered, an extra
rule, a second jump, a legacy flanneld rule, a chain we no longer want) makes ``setup()`` return
False and leave the tables exactly as a clean setup does.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from flanneld_py.firewall import (
    COMMENT_FORWARD,
    COMMENT_MASQ,
    FORWARD_CHAIN,
    LEGACY_COMMENTS,
    MASQ_CHAIN,
    Firewall,
)
from lab.netns import Lab, Netns
from tests.netns.test_firewall import FWD, MASQ

NETWORK = IPv4Network("10.5.0.0/16")
SUBNET = "10.5.1.0/24"
TABLES = ("nat", "filter")


@pytest.fixture
def ns() -> Iterator[Netns]:
    with Lab() as lab:  # the namespace (and its whole firewall) goes at close
        yield lab.netns("fw")


def fw_for(
    ns: Netns, subnet: str = SUBNET, *, ip_masq: bool = True, forward_rules: bool = True
) -> Firewall:
    return Firewall(
        NETWORK,
        IPv4Network(subnet),
        ip_masq,
        forward_rules,
        iptables=["ip", "netns", "exec", ns.name, "iptables"],
    )


def setup(fw: Firewall) -> bool:
    return asyncio.run(fw.setup())


def ipt(ns: Netns, line: str) -> None:
    ns.run(["iptables", "-w", *shlex.split(line)])


def listing(ns: Netns) -> dict[str, list[str]]:
    """``iptables -S`` of both tables inside ``ns``."""
    return {t: ns.run(["iptables", "-w", "-t", t, "-S"]).stdout.splitlines() for t in TABLES}


def save(ns: Netns) -> list[str]:
    """``iptables-save -c`` inside ``ns`` (rule counters included), without the comment lines
    (they carry the time)."""
    out = ns.run(["iptables-save", "-c"]).stdout
    return [ln for ln in out.splitlines() if not ln.startswith("#")]


def rules(ns: Netns, table: str) -> list[str]:
    return [ln for ln in listing(ns)[table] if ln.startswith("-A ")]


def chains(ns: Netns, table: str) -> list[str]:
    return [ln.split()[1] for ln in listing(ns)[table] if ln.startswith("-N ")]


def mark(ns: Netns) -> None:
    """Give every one of our rules and jumps its own packet/byte counters (``-R ... -c``)."""
    n = 0
    for table in TABLES:
        per_chain: dict[str, int] = {}
        for line in listing(ns)[table]:
            tokens = shlex.split(line)
            if tokens[:1] != ["-A"]:
                continue
            chain = tokens[1]
            per_chain[chain] = per_chain.get(chain, 0) + 1
            if chain in (MASQ_CHAIN, FORWARD_CHAIN) or tokens[-1] in (MASQ_CHAIN, FORWARD_CHAIN):
                n += 1
                argv = ["-t", table, "-R", chain, str(per_chain[chain]), "-c", str(n), str(n * 100)]
                ns.run(["iptables", "-w", *argv, *tokens[2:]])


def counters(lines: list[str]) -> list[str]:
    return [m.group(1) for ln in lines if (m := re.match(r"^\[(\d+:\d+)\] -A ", ln))]


# ---------------------------------------------------------------------------------------------


def test_first_setup_creates_second_keeps_exactly(ns: Netns) -> None:
    assert listing(ns) == {
        "nat": ["-P PREROUTING ACCEPT", "-P INPUT ACCEPT", "-P OUTPUT ACCEPT",
                "-P POSTROUTING ACCEPT"],
        "filter": ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT"],
    }  # fmt: skip
    fw = fw_for(ns)
    assert setup(fw) is False  # nothing there: created
    assert rules(ns, "nat") == MASQ
    assert rules(ns, "filter") == FWD
    assert fw.random_fully is True
    clean = listing(ns)

    mark(ns)
    before = save(ns)
    assert sorted(counters(before), key=lambda c: int(c.split(":")[0])) == [
        f"{i}:{i * 100}" for i in range(1, 9)
    ]  # 5 nat + 3 filter, each its own

    # the same object again, and a new one as after a restart: kept, untouched
    assert setup(fw) is True
    assert save(ns) == before
    assert setup(fw_for(ns)) is True
    assert save(ns) == before
    assert listing(ns) == clean


def test_foreign_rules_around_ours_do_not_matter(ns: Netns) -> None:
    setup(fw_for(ns))
    # docker's rule before our jump, someone's ACCEPT before our FORWARD jump, a chain of theirs
    ipt(ns, "-t nat -I POSTROUTING 1 -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE")
    ipt(ns, "-I FORWARD 1 -i lo -j ACCEPT")
    ipt(ns, "-N DOCKER-USER")
    ipt(ns, "-A DOCKER-USER -j RETURN")
    ipt(ns, "-A FORWARD -j DOCKER-USER")
    mark(ns)
    before = save(ns)
    assert setup(fw_for(ns)) is True
    assert save(ns) == before
    # our jumps stay where they were (position 2), which shows nothing was re-inserted
    assert rules(ns, "nat")[:2] == [
        "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
        MASQ[0],
    ]
    assert rules(ns, "filter")[:3] == ["-A FORWARD -i lo -j ACCEPT", FWD[0],
                                       "-A FORWARD -j DOCKER-USER"]  # fmt: skip


MASQ_TAG = f"-m comment --comment {shlex.quote(COMMENT_MASQ)}"
FWD_TAG = f"-m comment --comment {shlex.quote(COMMENT_FORWARD)}"

#: ways the tables differ from exactly our rules (iptables argument lines, run in order)
DISTURBANCES: dict[str, list[str]] = {
    "masq rule deleted": [f"-t nat -D {MASQ_CHAIN} 2"],
    "forward rule deleted": [f"-D {FORWARD_CHAIN} 2"],
    "masq rule altered": [
        f"-t nat -R {MASQ_CHAIN} 3 ! -s 10.5.0.0/16 -d 10.5.9.0/24 {MASQ_TAG} -j RETURN"
    ],
    "masq rules reordered": [
        f"-t nat -D {MASQ_CHAIN} 1",
        f"-t nat -A {MASQ_CHAIN} -s 10.5.0.0/16 -d 10.5.0.0/16 {MASQ_TAG} -j RETURN",
    ],
    "second identical masq jump": [f"-t nat -A POSTROUTING {MASQ_TAG} -j {MASQ_CHAIN}"],
    "second forward jump from INPUT": [f"-A INPUT -j {FORWARD_CHAIN}"],
    "second forward jump, goto": [f"-A FORWARD -s 10.1.0.0/16 -g {FORWARD_CHAIN}"],
    "jump without our comment": ["-D FORWARD 1", f"-I FORWARD 1 -j {FORWARD_CHAIN}"],
    "forward jump missing": ["-D FORWARD 1"],
    "masq chain missing": [
        "-t nat -D POSTROUTING 1",
        f"-t nat -F {MASQ_CHAIN}",
        f"-t nat -X {MASQ_CHAIN}",
    ],
    "extra rule in masq chain": [f"-t nat -A {MASQ_CHAIN} -s 192.0.2.0/24 -j RETURN"],
    "extra rule in forward chain": [f"-I {FORWARD_CHAIN} 1 -s 192.0.2.0/24 -j ACCEPT"],
    "extra rule of ours in forward chain": [
        f"-A {FORWARD_CHAIN} -s 10.5.0.0/16 {FWD_TAG} -j ACCEPT"
    ],
    "legacy masq rule": [
        "-t nat -A POSTROUTING -s 10.5.0.0/16 ! -d 10.5.0.0/16 "
        "-m comment --comment 'flanneld masq' -j MASQUERADE"
    ],
    "legacy forward rule": [
        "-A FORWARD -s 10.5.0.0/16 -m comment --comment 'flanneld forward' -j ACCEPT"
    ],
    "legacy rule in another chain": [
        "-A OUTPUT -d 10.5.0.0/16 -m comment --comment 'flanneld forward' -j ACCEPT"
    ],
}


def test_legacy_comments_are_the_ones_tested() -> None:
    assert {"flanneld masq", "flanneld forward"} == LEGACY_COMMENTS


@pytest.mark.parametrize("what", list(DISTURBANCES))
def test_anything_but_exactly_ours_is_rebuilt(ns: Netns, what: str) -> None:
    assert setup(fw_for(ns)) is False
    clean = listing(ns)
    for line in DISTURBANCES[what]:
        ipt(ns, line)
    assert listing(ns) != clean, "the disturbance changed nothing"
    mark(ns)

    fw = fw_for(ns)
    assert setup(fw) is False, what
    assert listing(ns) == clean, what
    # rebuilt: every rule and jump of ours is new (counters back to 0)
    assert set(counters(save(ns))) == {"0:0"}
    # and now it is exactly ours again
    mark(ns)
    before = save(ns)
    assert setup(fw_for(ns)) is True
    assert save(ns) == before


def test_legacy_rules_alone_are_removed_too(ns: Netns) -> None:
    """No chain of ours at all, only real flanneld's old rules: not in place; they go."""
    ipt(ns, "-t nat -A POSTROUTING -s 10.5.0.0/16 ! -d 10.5.0.0/16 "
            "-m comment --comment 'flanneld masq' -j MASQUERADE")  # fmt: skip
    ipt(ns, "-A FORWARD -d 10.5.0.0/16 -m comment --comment 'flanneld forward' -j ACCEPT")
    assert setup(fw_for(ns)) is False
    assert rules(ns, "nat") == MASQ and rules(ns, "filter") == FWD
    assert setup(fw_for(ns)) is True


@pytest.mark.parametrize(
    ("ip_masq", "forward_rules", "gone_table", "gone_chain"),
    [
        (False, True, "nat", MASQ_CHAIN),  # masquerade off
        (True, False, "filter", FORWARD_CHAIN),  # forward rules off
    ],
)
def test_other_configuration_removes_the_chain_no_longer_wanted(
    ns: Netns, ip_masq: bool, forward_rules: bool, gone_table: str, gone_chain: str
) -> None:
    assert setup(fw_for(ns)) is False
    fw = fw_for(ns, ip_masq=ip_masq, forward_rules=forward_rules)
    assert setup(fw) is False
    assert gone_chain not in chains(ns, gone_table)
    assert not [r for r in rules(ns, gone_table) if gone_chain in r]
    assert rules(ns, "nat") == (MASQ if ip_masq else [])
    assert rules(ns, "filter") == (FWD if forward_rules else [])
    # that configuration is in place now
    mark(ns)
    before = save(ns)
    assert setup(fw_for(ns, ip_masq=ip_masq, forward_rules=forward_rules)) is True
    assert save(ns) == before
    # and the chain coming back (as before the change) is not "in place" either
    assert setup(fw_for(ns)) is False
    assert rules(ns, "nat") == MASQ and rules(ns, "filter") == FWD


def test_other_subnet_rewrites_the_masq_chain(ns: Netns) -> None:
    assert setup(fw_for(ns)) is False
    assert setup(fw_for(ns, "10.5.2.0/24")) is False
    assert rules(ns, "nat") == [r.replace("10.5.1.0/24", "10.5.2.0/24") for r in MASQ]
    assert rules(ns, "filter") == FWD
    assert setup(fw_for(ns, "10.5.2.0/24")) is True


def test_nothing_wanted(ns: Netns) -> None:
    assert (
        setup(fw_for(ns, ip_masq=False, forward_rules=False)) is True
    )  # nothing wanted, nothing there: in place
    assert rules(ns, "nat") == [] and rules(ns, "filter") == []
    assert setup(fw_for(ns)) is False
    assert (
        setup(fw_for(ns, ip_masq=False, forward_rules=False)) is False
    )  # both chains no longer wanted: removed
    assert rules(ns, "nat") == [] and rules(ns, "filter") == []
    assert chains(ns, "nat") == [] and chains(ns, "filter") == []
    # a stray jump-less chain of ours is not "nothing" either
    ipt(ns, f"-N {FORWARD_CHAIN}")
    assert setup(fw_for(ns, ip_masq=False, forward_rules=False)) is False
    assert chains(ns, "filter") == []
