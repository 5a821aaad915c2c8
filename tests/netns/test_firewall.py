"""flanneld's iptables rules, applied inside test namespaces only.

Every Firewall here runs ``ip netns exec <ns> iptables``: the root namespace's firewall is never
read or written.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from flanneld_py.firewall import Firewall, FirewallError
from lab.netns import Lab, Netns, Topology

NETWORK = IPv4Network("10.5.0.0/16")
PORT = 5555

MASQ = [
    '-A POSTROUTING -m comment --comment "flanneld-py masq" -j FLANNEL-POSTRTG',
    '-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld-py masq" '
    "-j RETURN",
    '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld-py masq" '
    "-j MASQUERADE --random-fully",
    '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.1.0/24 -m comment --comment "flanneld-py masq" '
    "-j RETURN",
    '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld-py masq" '
    "-j MASQUERADE --random-fully",
]
FWD = [
    '-A FORWARD -m comment --comment "flanneld-py forward" -j FLANNEL-FWD',
    '-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld-py forward" -j ACCEPT',
    '-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld-py forward" -j ACCEPT',
]


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Lab() as lab:
        yield lab.flannel_topology(n_hosts=2)


def fw_for(ns: Netns, subnet: str = "10.5.1.0/24", **kw: bool) -> Firewall:
    return Firewall(
        NETWORK,
        IPv4Network(subnet),
        kw.get("ip_masq", True),
        kw.get("forward_rules", True),
        iptables=["ip", "netns", "exec", ns.name, "iptables"],
    )


def rules(ns: Netns, table: str) -> list[str]:
    """``-A`` lines of ``iptables-save`` for ``table`` inside ``ns``."""
    out = ns.run(["iptables-save", "-t", table]).stdout
    return [ln for ln in out.splitlines() if ln.startswith("-A ")]


def chains(ns: Netns, table: str) -> list[str]:
    out = ns.run(["iptables-save", "-t", table]).stdout
    return [ln.split()[0][1:] for ln in out.splitlines() if ln.startswith(":")]


def ipt(ns: Netns, *args: str) -> None:
    ns.run(["iptables", "-w", *args])


def test_setup_repair_teardown(topo: Topology) -> None:
    h1 = topo.hosts[0]
    fw = fw_for(h1)

    async def scenario() -> None:
        await fw.setup()
        assert fw.random_fully is True  # this kernel and iptables support it
        assert rules(h1, "nat") == MASQ
        assert rules(h1, "filter") == FWD
        assert await fw.check_and_repair() == []

        ipt(h1, "-t", "nat", "-D", "FLANNEL-POSTRTG", "3")  # someone deletes one rule
        assert await fw.check_and_repair() == [
            "nat chain FLANNEL-POSTRTG had missing/altered rules: rewritten"
        ]
        assert rules(h1, "nat") == MASQ

        ipt(h1, "-t", "nat", "-I", "FLANNEL-POSTRTG", "1", "-j", "RETURN")  # order broken
        ipt(h1, "-D", "FORWARD", "1")  # jump gone
        fixed = await fw.check_and_repair()
        assert fixed == [
            "nat chain FLANNEL-POSTRTG had missing/altered rules: rewritten",
            "filter jump FORWARD -> FLANNEL-FWD was missing: restored",
        ]
        assert rules(h1, "nat") == MASQ and rules(h1, "filter") == FWD

        ipt(h1, "-F")  # iptables -F; iptables -X: everything in filter gone
        ipt(h1, "-X")
        assert (await fw.check_and_repair())[0] == "filter chain FLANNEL-FWD was missing: recreated"
        assert rules(h1, "filter") == FWD
        assert await fw.check_and_repair() == []

        # jumps stay at position 1 when others insert rules later, and that is fine
        ipt(h1, "-I", "FORWARD", "1", "-i", "lo", "-j", "ACCEPT")
        assert await fw.check_and_repair() == []

        await fw.teardown()
        assert not [r for r in rules(h1, "nat") + rules(h1, "filter") if "FLANNEL" in r]
        assert "FLANNEL-POSTRTG" not in chains(h1, "nat")
        assert "FLANNEL-FWD" not in chains(h1, "filter")
        assert rules(h1, "filter") == ["-A FORWARD -i lo -j ACCEPT"]  # not ours: kept
        await fw.teardown()  # nothing left: still fine

    asyncio.run(scenario())
    # the other host was never touched
    assert rules(topo.hosts[1], "nat") == [] and rules(topo.hosts[1], "filter") == []


def test_setup_cleans_stale_chains_of_an_earlier_run(topo: Topology) -> None:
    h1 = topo.hosts[0]
    # an earlier run (another Network) and real flanneld's older rules straight in POSTROUTING
    for line in (
        "-t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
        "-t nat -N FLANNEL-POSTRTG",
        "-t nat -A POSTROUTING -m comment --comment 'flanneld masq' -j FLANNEL-POSTRTG",
        "-t nat -A POSTROUTING -m comment --comment 'flanneld masq' -j FLANNEL-POSTRTG",
        "-t nat -A FLANNEL-POSTRTG -s 10.9.0.0/16 -j MASQUERADE",
        "-t nat -A POSTROUTING -s 10.9.0.0/16 ! -d 10.9.0.0/16 -m comment "
        "--comment 'flanneld masq' -j MASQUERADE",
        "-N FLANNEL-FWD",
        "-A FORWARD -j FLANNEL-FWD",
        "-A FLANNEL-FWD -s 10.9.0.0/16 -j ACCEPT",
        "-A FORWARD -s 10.9.0.0/16 -m comment --comment 'flanneld forward' -j ACCEPT",
    ):
        ipt(h1, *shlex.split(line))

    asyncio.run(fw_for(h1).setup())
    docker_rule = "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE"
    assert rules(h1, "nat") == [MASQ[0], docker_rule, *MASQ[1:]]
    assert rules(h1, "filter") == FWD

    # forward rules only: the masquerade chain of the earlier run goes away too
    asyncio.run(fw_for(h1, ip_masq=False).setup())
    assert rules(h1, "nat") == [docker_rule]
    assert "FLANNEL-POSTRTG" not in chains(h1, "nat")
    assert rules(h1, "filter") == FWD
    # and masquerade only
    fw = fw_for(h1, forward_rules=False)
    asyncio.run(fw.setup())
    assert rules(h1, "nat") == [MASQ[0], docker_rule, *MASQ[1:]]
    assert rules(h1, "filter") == []
    assert asyncio.run(fw.check_and_repair()) == []
    assert fw.expected_rules() == [f"-t nat {r}" for r in MASQ]


def test_errors_are_one_line(topo: Topology) -> None:
    h1 = topo.hosts[0]
    missing = Firewall(NETWORK, IPv4Network("10.5.1.0/24"), True, True, ["/nonexistent/iptables"])
    with pytest.raises(FirewallError, match=r"^`/nonexistent/iptables` not found: install"):
        asyncio.run(missing.setup())
    argv = ["ip", "netns", "exec", h1.name, "/nonexistent/iptables"]
    in_ns = Firewall(NETWORK, IPv4Network("10.5.1.0/24"), True, True, argv)
    with pytest.raises(FirewallError) as info:
        asyncio.run(in_ns.setup())
    msg = str(info.value)
    assert "\n" not in msg and "/nonexistent/iptables" in msg and "No such file" in msg


WRAPPER = r"""#!/bin/sh
# iptables in namespace $1 that lacks --random-fully: mode $2 = "binary" (an old iptables that
# does not know the option) or "kernel" (iptables knows it, the kernel refuses the rule)
ns=$1 mode=$2
shift 2
case " $* " in
  *" --help "*)
    if [ "$mode" = binary ]; then
      ip netns exec "$ns" iptables "$@" | grep -v random-fully; exit 0
    fi ;;
  *" -A "*"--random-fully"*)
    echo "iptables: No chain/target/match by that name." >&2; exit 1 ;;
esac
exec ip netns exec "$ns" iptables "$@"
"""


@pytest.mark.parametrize("mode", ["binary", "kernel"])
def test_without_random_fully(topo: Topology, mode: str) -> None:
    h1 = topo.hosts[0]
    script = topo.underlay.lab.tmpdir / "iptables-wrapper"
    script.write_text(WRAPPER)
    fw = Firewall(
        NETWORK, IPv4Network("10.5.1.0/24"), True, False, ["sh", str(script), h1.name, mode]
    )
    asyncio.run(fw.setup())
    assert fw.random_fully is False
    assert rules(h1, "nat") == [r.replace(" --random-fully", "") for r in MASQ]
    assert asyncio.run(fw.check_and_repair()) == []


SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
while True:
    c, peer = s.accept()
    c.sendall(peer[0].encode())
    c.close()
"""

CLIENT = """
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
print(s.recv(100).decode())
"""


def seen_as(client: Netns, server: Netns) -> str:
    """The source address ``server`` sees for a TCP connection from ``client``."""
    assert server.address is not None
    out = client.run([sys.executable, "-c", CLIENT, str(server.address), str(PORT)], timeout=30)
    return out.stdout.strip()


def test_masquerade_really_works(topo: Topology) -> None:
    lab = topo.underlay.lab
    h1, h2 = topo.hosts
    ul = topo.underlay
    c1 = lab.add_container_bridge(h1, "10.5.1.0/24")
    c2 = lab.add_container_bridge(h2, "10.5.2.0/24")
    # host-gw style routes stand in for the overlay
    h1.add_route("10.5.2.0/24", via=h2.address)
    h2.add_route("10.5.1.0/24", via=h1.address)
    # as docker leaves it: FORWARD policy DROP, so only the forward rules let traffic through
    for h in (h1, h2):
        ipt(h, "-P", "FORWARD", "DROP")
    for srv in (ul, c1, c2):
        srv.popen([sys.executable, "-c", SERVER, str(srv.address), str(PORT)])
    fw1, fw2 = fw_for(h1, "10.5.1.0/24"), fw_for(h2, "10.5.2.0/24")

    async def up() -> None:
        await fw1.setup()
        await fw2.setup()

    asyncio.run(up())
    # leaving the overlay: masqueraded to the host's underlay address
    assert seen_as(c1, ul) == str(h1.address)
    # inside the overlay: the container's own address is kept
    assert seen_as(c1, c2) == str(c1.address)
    assert seen_as(c2, c1) == str(c2.address)

    # without the forward rules the DROP policy wins
    asyncio.run(fw1.teardown())
    assert not c1.ping(c2.address, timeout=1)


def test_runs_under_uvloop(topo: Topology) -> None:
    import uvloop

    h1 = topo.hosts[0]
    fw = fw_for(h1)

    async def cycle() -> list[str]:
        await fw.setup()
        fixed = await fw.check_and_repair()
        await fw.teardown()
        return fixed

    assert uvloop.run(cycle()) == []
    assert rules(h1, "nat") == [] and rules(h1, "filter") == []
