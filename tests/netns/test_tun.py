"""TUN device and netlink helpers, exercised inside a test namespace.

The TUN is never created in the root namespace: every test runs a small Python child under
``ip netns exec`` that imports flanneld_py.tun / flanneld_py.netlink and reports JSON lines.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.netns import Lab, Netns, wait_for

ROOT = Path(__file__).resolve().parents[2]
PRELUDE = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@pytest.fixture
def host(lab: Lab) -> Netns:
    return lab.flannel_topology(n_hosts=1).hosts[0]


def child(ns: Netns, code: str, timeout: float = 60) -> dict[str, Any]:
    """Run Python ``code`` in ``ns``; it prints one JSON object as its last line."""
    proc = ns.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], timeout=timeout)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def log_json(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_tun_configured_and_kernel_routes_packets_into_it(lab: Lab, host: Netns) -> None:
    # a stale route for the network (e.g. left by something else) must be replaced
    host.add_route("10.5.0.0/16", via="10.99.0.1")
    code = """
    import json, os, select, time
    from ipaddress import IPv4Address, IPv4Network
    from flanneld_py import netlink
    from flanneld_py.tun import open_tun

    ext = netlink.find_external_interface()
    fd, name = open_tun("flannel0")
    mtu = ext.mtu - 28
    for _ in range(2):  # a restart re-applies the same configuration
        netlink.configure_tun(name, IPv4Address("10.5.18.0"), IPv4Network("10.5.0.0/16"), mtu)
    r = netlink.route_get("10.5.7.9")
    print(json.dumps({
        "name": name, "ext": ext.name, "ext_mtu": ext.mtu, "mtu": netlink.link_info(name).mtu,
        "route_dev": r.dev, "route_src": str(r.src),
        "addrs": [str(a) for a in netlink.addresses(name)],
        "routes": [
            str(r.dst) for r in netlink.route_entries()
            if r.dev == name and r.type == netlink.RTN_UNICAST
        ],
    }), flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        pkt = os.read(fd, 65535)
        if pkt[0] >> 4 == 4:  # skip IPv6 the kernel may send on its own
            print(json.dumps({"packet": pkt.hex()}), flush=True)
            break
    """
    log = lab.tmpdir / "tun-child.log"
    proc = host.popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], log)
    info = wait_for(lambda: log_json(log), timeout=30, what=f"child output in {log}")[0]
    assert info["name"] == "flannel0" and info["ext"] == "eth0"
    assert info["ext_mtu"] == 1500 and info["mtu"] == 1472
    assert info["route_dev"] == "flannel0" and info["route_src"] == "10.5.18.0"
    assert info["addrs"] == ["10.5.18.0/32"] and info["routes"] == ["10.5.0.0/16"]

    # seen from the outside
    (link,) = host.ip_json("link", "show", "flannel0")
    assert link["mtu"] == 1472 and "UP" in link["flags"]
    assert link["link_type"] == "none"  # IFF_TUN: no L2 header
    (addr,) = host.ip_json("-4", "addr", "show", "dev", "flannel0")
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("10.5.18.0", 32)]
    routes = host.ip_json("-4", "route", "show", "10.5.0.0/16")
    assert [(r["dst"], r["dev"]) for r in routes] == [("10.5.0.0/16", "flannel0")]

    # the kernel routes a ping into the TUN, with the flannel0 address as source
    def got_packet() -> str | None:
        host.ping("10.5.7.9", timeout=0.5)
        return next((d["packet"] for d in log_json(log) if "packet" in d), None)

    pkt = bytes.fromhex(wait_for(got_packet, timeout=20, what="a packet read from the TUN"))
    assert pkt[9] == 1  # ICMP
    assert pkt[12:16] == bytes([10, 5, 18, 0]) and pkt[16:20] == bytes([10, 5, 7, 9])
    assert pkt[20] == 8  # echo request
    assert proc.wait(20) == 0
    # the device lives as long as its fd: gone with the process, as with real flanneld
    assert host.ip("link", "show", "flannel0", check=False).returncode != 0


def test_open_errors_offloads_and_queues(host: Netns) -> None:
    host.ip("link", "add", "zz0", "type", "bridge")
    res = child(
        host,
        """
        import json, os
        from flanneld_py import netlink, tun
        from flanneld_py.tun import TunError, open_tun, probe_offloads, tun_flags

        out = {}
        def err(fn, *a, **kw):
            try:
                fn(*a, **kw)
            except (TunError, netlink.NetlinkError) as e:
                return str(e)
            return None

        fd, name = open_tun("flannel%d")
        out["template"] = name
        out["busy"] = err(open_tun, name)
        out["toolong"] = err(open_tun, "x" * 16)
        out["not_tun"] = err(open_tun, "eth0")
        out["plain_offloads"] = sorted(probe_offloads(fd))
        vfd, vname = open_tun("fvnet0", vnet_hdr=True)
        out["vnet_flags"] = bool(tun_flags(vfd) & tun.IFF_VNET_HDR)
        out["vnet_offloads"] = sorted(probe_offloads(vfd))
        out["tso_only"] = sorted(probe_offloads(vfd, {"csum", "tso4"}))
        out["uso_alone"] = sorted(probe_offloads(vfd, {"csum", "uso4"}))
        q1, _ = open_tun("fmq0", multi_queue=True)
        q2, _ = open_tun("fmq0", multi_queue=True)
        out["mq_mismatch"] = err(open_tun, "fmq0")
        out["nonblock_cloexec"] = [os.get_blocking(fd), os.get_inheritable(fd)]
        out["deleted"] = [netlink.delete_link("zz0"), netlink.delete_link("zz0")]
        out["no_dev"] = err(netlink.set_link_up, "nope0")
        tun.TUN_PATH = "/nonexistent/net/tun"
        out["missing"] = err(open_tun, "flannel9")
        tun.TUN_PATH = "/dev/net/tun"
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        out["unpriv_open"] = err(open_tun, "flannel9")
        out["unpriv_netlink"] = err(netlink.configure_tun, name, "10.5.1.0", "10.5.0.0/16", 1472)
        print(json.dumps(out))
        """,
    )
    assert res["template"] == "flannel0"
    assert "already in use" in res["busy"]
    assert "1-15 characters" in res["toolong"]
    assert "not a TUN device" in res["not_tun"] and "eth0" in res["not_tun"]
    assert res["plain_offloads"] == []  # no vnet header: nothing enabled
    assert res["vnet_flags"] is True
    assert res["vnet_offloads"] == ["csum", "tso4", "tso6", "uso4", "uso6"]
    assert res["tso_only"] == ["csum", "tso4"]
    assert res["uso_alone"] == ["csum"]  # USO4 without USO6 is refused: fell back
    assert "other flags" in res["mq_mismatch"] and "fmq0" in res["mq_mismatch"]
    assert res["nonblock_cloexec"] == [False, False]
    assert res["deleted"] == [True, False]
    assert res["no_dev"] == "no network interface named nope0"
    assert "/nonexistent/net/tun is missing" in res["missing"] and "\n" not in res["missing"]
    assert res["unpriv_open"].endswith("needs CAP_NET_ADMIN (run as root)")
    assert res["unpriv_netlink"].endswith("needs CAP_NET_ADMIN (run as root)")
    assert res["unpriv_netlink"].startswith("cannot set the MTU of flannel0")


def test_external_interface_detection(lab: Lab, host: Netns) -> None:
    lab.add_container_bridge(host, "10.5.1.0/24")  # a second interface: cbr0 10.5.1.1
    host.add_addr("eth0", "10.99.0.111/24")  # a secondary address
    code = """
    import json
    from flanneld_py.netlink import NetlinkError, find_external_interface

    def find(*a, **kw):
        try:
            e = find_external_interface(*a, **kw)
        except NetlinkError as exc:
            return str(exc)
        return [e.name, str(e.address), e.mtu, str(e.public_ip), e.index > 0]

    print(json.dumps({
        "default": find(),
        "by_name": find(["cbr0"]),
        "by_ip": find(["10.5.1.1"]),
        "by_secondary_ip": find(["10.99.0.111"]),
        "in_order": find(["eth9", "10.1.2.3", "eth0", "cbr0"]),
        "regex_name": find(iface_regex=["^cbr"]),
        "regex_ip": find(iface_regex=[r"^10\\.99\\."]),
        "regex_order": find(iface_regex=["^nomatch", "br0"]),
        "public_ip": find(public_ip="192.0.2.7"),
        "bad_public_ip": find(public_ip="not-an-ip"),
        "no_match": find(["eth9"]),
        "no_regex_match": find(iface_regex=["^wl"]),
        "bad_regex": find(iface_regex=["("]),
        "lo": find(["lo"]),
        "iface_beats_regex": find(["cbr0"], iface_regex=["^eth"]),
    }))
    """
    res = child(host, code)
    assert res["default"] == ["eth0", "10.99.0.11", 1500, "10.99.0.11", True]
    assert res["by_name"] == ["cbr0", "10.5.1.1", 1500, "10.5.1.1", True]
    assert res["by_ip"] == ["cbr0", "10.5.1.1", 1500, "10.5.1.1", True]
    assert res["by_secondary_ip"][:2] == ["eth0", "10.99.0.111"]
    assert res["in_order"][:2] == ["eth0", "10.99.0.11"]
    assert res["regex_name"][:2] == ["cbr0", "10.5.1.1"]
    assert res["regex_ip"][:2] == ["eth0", "10.99.0.11"]
    assert res["regex_order"][:2] == ["cbr0", "10.5.1.1"]
    assert res["public_ip"] == ["eth0", "10.99.0.11", 1500, "192.0.2.7", True]
    assert res["bad_public_ip"] == "invalid --public-ip 'not-an-ip': not an IP address"
    assert res["no_match"].startswith(
        "no interface matches --iface eth9; available: lo (127.0.0.1)"
    )
    assert "eth0 (10.99.0.11, 10.99.0.111)" in res["no_match"]
    assert "cbr0 (10.5.1.1)" in res["no_match"]
    assert res["no_regex_match"].startswith("no interface matches --iface-regex ^wl; available:")
    assert res["bad_regex"].startswith("invalid --iface-regex '('")
    assert res["lo"].startswith("no interface matches --iface lo (lo has no global IPv4 address)")
    assert res["iface_beats_regex"][0] == "cbr0"

    # no default route: a clear message; a lower-metric default route wins
    host.ip("route", "del", "default")
    assert child(host, code)["default"] == (
        "no IPv4 default route to choose the external interface from; "
        "add one or pass --iface/--iface-regex"
    )
    host.add_route("default", "10.5.1.2", "cbr0", "metric", "50")
    host.add_route("default", "10.99.0.1", "eth0", "metric", "100")
    assert child(host, code)["default"][:2] == ["cbr0", "10.5.1.1"]


def test_route_helpers(host: Netns) -> None:
    res = child(
        host,
        """
        import json
        from ipaddress import IPv4Address, IPv4Network
        from flanneld_py import netlink

        out = {}
        netlink.replace_proto_route(IPv4Network("10.6.0.0/16"), gateway=IPv4Address("10.99.0.12"))
        netlink.replace_proto_route(IPv4Network("10.6.0.0/16"), gateway=IPv4Address("10.99.0.13"))
        netlink.replace_proto_route(IPv4Network("10.7.1.0/24"), dev="eth0")
        r = netlink.route_get("10.6.3.4")
        out["get"] = [r.dev, str(r.gateway), str(r.src)]
        out["list"] = sorted(
            [str(x.dst), x.dev, str(x.gateway)]
            for x in netlink.route_entries()
            if x.dev == "eth0" and x.type == netlink.RTN_UNICAST
        )
        out["del"] = [
            netlink.delete_proto_route(IPv4Network("10.6.0.0/16")),
            netlink.delete_proto_route(IPv4Network("10.6.0.0/16")),
            netlink.delete_proto_route(IPv4Network("10.7.1.0/24"), dev="nope0"),
        ]
        try:
            netlink.replace_proto_route(
                IPv4Network("10.8.0.0/16"), gateway=IPv4Address("192.0.2.1")
            )
        except netlink.NetlinkError as e:
            out["unreachable_gw"] = str(e)
        print(json.dumps(out))
        """,
    )
    assert res["get"] == ["eth0", "10.99.0.13", "10.99.0.11"]
    assert res["list"] == [
        ["0.0.0.0/0", "eth0", "10.99.0.1"],
        ["10.6.0.0/16", "eth0", "10.99.0.13"],
        ["10.7.1.0/24", "eth0", "None"],
        ["10.99.0.0/24", "eth0", "None"],
    ]
    assert res["del"] == [True, False, False]
    assert res["unreachable_gw"].startswith("cannot set route 10.8.0.0/16 via 192.0.2.1: ")
    assert [r["dst"] for r in host.ip_json("-4", "route")] == [
        "default",
        "10.7.1.0/24",
        "10.99.0.0/24",
    ]


def test_netlink_from_worker_threads_under_uvloop(host: Netns) -> None:
    """The daemon runs on uvloop and calls netlink via asyncio.to_thread; even with uvloop's
    policy installed globally, pyroute2 must not end up on a uvloop loop (it fails there)."""
    code = """
    import asyncio, gc, json, os, warnings
    import uvloop
    from flanneld_py import netlink

    warnings.simplefilter("error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        uvloop.install()
    out = {}

    async def main():
        ext = await asyncio.to_thread(netlink.find_external_interface)
        fds = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            ext = await asyncio.to_thread(netlink.find_external_interface)
        gc.collect()
        out["leaked_fds"] = len(os.listdir("/proc/self/fd")) - fds
        out["ext"] = ext.name
        try:
            netlink.link_info("eth0")
        except RuntimeError as e:
            out["in_loop"] = str(e)

    asyncio.run(main())
    print(json.dumps(out))
    """
    proc = host.run([sys.executable, "-X", "dev", "-c", PRELUDE + textwrap.dedent(code)])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["ext"] == "eth0"
    assert "worker thread" in res["in_loop"]
    assert res["leaked_fds"] == 0
    assert "Warning" not in proc.stderr, proc.stderr
