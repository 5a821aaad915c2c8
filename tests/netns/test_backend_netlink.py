"""The netlink functions the vxlan/host-gw backends use, on a real kernel in a test namespace,
and FakeNetOps held against them: the same sequence of operations must give the same results
and the same error messages in both.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.netns import Lab, Netns

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from fakenet import FakeNetOps  # noqa: E402

PRELUDE = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"

#: run against RealNetOps (in the namespace) and FakeNetOps (here); returns JSON-able results
SCENARIO = """
from ipaddress import IPv4Address as A, IPv4Network as N
from flanneld_py.backend._netops import NetlinkError, VxlanSpec

async def scenario(net, ext):
    out = {}

    async def err(coro):
        try:
            await coro
        except NetlinkError as e:
            return f"{type(e).__name__}: {e}"
        return None

    def link(info):
        vx = info.vxlan
        return [info.name, info.kind, info.mac, info.mtu, info.up, vx.vni, str(vx.local),
                vx.link == ext.index, vx.port, vx.learning, vx.gbp, vx.l2miss, vx.group]

    spec = VxlanSpec("flannel.1", 1, "7a:21:bb:fd:37:49", ext.address, ext.name, 8472)
    await net.create_vxlan(spec)
    out["dup_name"] = await err(net.create_vxlan(spec))
    out["dup_vni"] = await err(net.create_vxlan(VxlanSpec(
        "flannel.9", 1, "7a:21:bb:fd:37:50", ext.address, ext.name, 8472)))
    await net.create_vxlan(VxlanSpec("flannel.2", 2, "7a:21:bb:fd:37:51", ext.address,
                                     ext.name, 4789, learning=True, gbp=True, mtu=1400))
    out["no_lower"] = await err(net.create_vxlan(VxlanSpec(
        "flannel.3", 3, "7a:21:bb:fd:37:52", ext.address, "nope0", 8472)))
    out["link1"] = link(await net.link("flannel.1"))
    out["link2"] = link(await net.link("flannel.2"))
    out["absent"] = await net.link("nope0")
    out["vxlan_links"] = [lk.name for lk in await net.links("vxlan")]

    sn2, gw2 = N("10.5.2.0/24"), A("10.5.2.0")
    mac2 = "62:57:00:00:00:02"
    out["onlink_down"] = await err(net.replace_route(sn2, gateway=gw2, dev="flannel.1",
                                                     onlink=True))
    await net.set_link_up("flannel.1")
    out["up"] = (await net.link("flannel.1")).up
    out["no_dev_up"] = await err(net.set_link_up("nope0"))
    await net.ensure_v4_address("flannel.1", A("10.5.200.0"), N("10.5.0.0/16"))
    removed = await net.ensure_v4_address("flannel.1", A("10.5.1.0"), N("10.5.0.0/16"))
    out["removed"] = [str(a) for a in removed]
    again = await net.ensure_v4_address("flannel.1", A("10.5.1.0"), N("10.5.0.0/16"))
    out["again"] = [str(a) for a in again]
    out["addrs"] = sorted(str(a) for a in await net.addresses("flannel.1"))

    await net.replace_neigh("flannel.1", gw2, mac2)
    await net.replace_neigh("flannel.1", gw2, mac2)
    out["neigh"] = [[str(n.ip), n.mac, n.permanent] for n in await net.neighbours("flannel.1")]
    await net.replace_fdb("flannel.1", mac2, A("10.99.0.12"))
    await net.replace_fdb("flannel.1", mac2, A("10.99.0.13"))  # replace moves the remote
    out["fdb"] = [[f.mac, str(f.dst), f.permanent] for f in await net.fdb("flannel.1")]
    await net.replace_route(sn2, gateway=gw2, dev="flannel.1", onlink=True)
    out["not_onlink"] = await err(net.replace_route(N("10.5.3.0/24"), gateway=A("10.5.3.0"),
                                                    dev="flannel.1"))
    out["far_gw"] = await err(net.replace_route(N("10.5.6.0/24"), gateway=A("10.88.0.5")))
    await net.replace_route(N("10.5.4.0/24"), gateway=A("10.99.0.12"), dev="eth0")
    await net.replace_route(N("10.5.5.0/24"), gateway=A("10.99.0.13"))  # the kernel picks eth0
    await net.replace_route(N("10.5.5.0/24"), gateway=A("10.99.0.14"))  # replaces it
    out["routes"] = sorted(
        [str(r.dst), r.type, r.proto, str(r.gateway), r.dev, r.metric, r.onlink, r.scope]
        for r in await net.routes()
    )
    for name, dst in [("direct", "10.99.0.12"), ("far", "10.88.0.5"), ("overlay", "10.5.2.7"),
                      ("local", "10.5.1.0")]:
        r = await net.route_get(A(dst))
        out["get_" + name] = [r.dev, str(r.gateway)]

    out["deletes"] = [
        await net.delete_route(sn2, gateway=A("10.5.9.9")),
        await net.delete_route(sn2),
        await net.delete_route(sn2),
        await net.delete_route(N("10.5.4.0/24"), dev="nope0"),
        await net.delete_route(N("10.5.4.0/24"), dev="eth0"),
        await net.delete_neigh("flannel.1", gw2),
        await net.delete_neigh("flannel.1", gw2),
        await net.delete_neigh("nope0", gw2),
        await net.delete_fdb("flannel.1", mac2, A("10.99.0.12")),
        await net.delete_fdb("flannel.1", mac2, A("10.99.0.13")),
        await net.delete_fdb("flannel.1", mac2),
        await net.delete_fdb("nope0", mac2),
    ]
    await net.replace_route(sn2, gateway=gw2, dev="flannel.1", onlink=True)
    out["del_link"] = [await net.delete_link("flannel.1"), await net.delete_link("flannel.1")]
    out["routes_after"] = sorted(str(r.dst) for r in await net.routes() if r.proto == 102)
    out["no_dev_neigh"] = await err(net.neighbours("flannel.1"))
    return out
"""

CHILD = """
import asyncio, json
from flanneld_py import netlink
from flanneld_py.backend._netops import RealNetOps
ext = netlink.find_external_interface()
print(json.dumps(asyncio.run(scenario(RealNetOps(), ext))))
"""


@pytest.fixture
def host() -> Iterator[Netns]:
    with Lab() as lab:
        yield lab.flannel_topology(n_hosts=1).hosts[0]


def run_fake() -> Any:
    ns: dict[str, Any] = {}
    exec(textwrap.dedent(SCENARIO), ns)
    net = FakeNetOps.host()
    out = asyncio.run(ns["scenario"](net, net.ext()))
    return json.loads(json.dumps(out))


def test_fakenet_matches_the_kernel(host: Netns) -> None:
    proc = host.run([sys.executable, "-c", PRELUDE + textwrap.dedent(SCENARIO) + CHILD])
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    # the facts themselves, as seen on the kernel
    assert real["dup_name"] == "LinkExistsError: cannot create vxlan device flannel.1: File exists"
    assert real["dup_vni"] == "LinkExistsError: cannot create vxlan device flannel.9: File exists"
    assert real["link1"] == [
        "flannel.1",
        "vxlan",
        "7a:21:bb:fd:37:49",
        1450,
        False,
        1,
        "10.99.0.11",
        True,
        8472,
        False,
        False,
        False,
        None,
    ]
    assert real["link2"][3:] == [1400, False, 2, "10.99.0.11", True, 4789, True, True, False, None]
    assert real["onlink_down"].endswith("onlink: Network is down")
    assert real["not_onlink"] == (
        "NetlinkError: cannot set route 10.5.3.0/24 via 10.5.3.0 dev flannel.1: "
        "Network is unreachable"
    )
    assert real["removed"] == ["10.5.200.0/32"] and real["addrs"] == ["10.5.1.0/32"]
    assert real["fdb"] == [["62:57:00:00:00:02", "10.99.0.13", True]]
    assert real["get_direct"] == ["eth0", "None"] and real["get_far"] == ["eth0", "10.99.0.1"]
    assert real["get_overlay"] == ["flannel.1", "10.5.2.0"]
    assert real["deletes"] == [
        False,
        True,
        False,
        False,
        True,
        True,
        False,
        False,
        False,
        True,
        False,
        False,
    ]
    assert real["routes_after"] == ["10.5.5.0/24"]  # the onlink route went with its device
    # and the model agrees on every line
    fake = run_fake()
    assert {k: fake[k] for k in real} == real
    # the kernel's state as `ip` shows it: nothing of the scenario left but its /24 via eth0
    assert host.ip("route", "show", "proto", "102").stdout.split("\n")[0].strip() == (
        "10.5.5.0/24 via 10.99.0.14 dev eth0"
    )
