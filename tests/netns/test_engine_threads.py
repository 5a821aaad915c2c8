"""``--engine-threads``: several C engine threads per daemon, end to end (root, real etcd).

Two hosts, both ``--engine c --engine-threads 2``, one container each. With two threads the
daemon opens flannel0 with two queues (``IFF_MULTI_QUEUE``) and two UDP sockets in one
``SO_REUSEPORT`` group whose steering program (``flanneld_py/reuseport.py``) picks the socket by
the inner flow; ``/status`` then lists each thread's counters under ``engine.threads``.

The TCP flows that must spread get their client ports from the unit test's model of the program
(``iperf3 --cport``: consecutive ports, one per stream) so that two of them belong on each
receiving thread: with ephemeral ports, four flows all land on one of two threads one time in
eight. A Python engine daemon ignores ``--engine-threads`` (it always has one thread).

The engine's counters in ``/status`` must be the sums of the threads' ones in the same document.
That holds while no traffic flows and while it flows (the sums come from the same snapshot).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flanneld_py import engine as engine_mod
from lab.flanneld import FlannelCluster, Flanneld
from lab.netns import Container, Lab, Netns, wait_for
from tests.conftest import require
from tests.netns.test_partial_csum import tcp_transfer
from tests.unit.test_reuseport import index_for, inner

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
IPERF_PORT = 5201
THREADS = 2
#: keys whose per-thread values must add up to the top-level one in the same /status document
SUMMED = ("udp_rx_packets", "udp_rx_bytes", "tun_tx_packets", "udp_tx_packets", "tun_rx_packets")

Cluster = tuple[FlannelCluster, list[Container]]


def have_c_engine() -> None:
    require("netns", "etcd")
    if not engine_mod.c_engine_available():
        pytest.skip("C engine not built: pip install -e . --no-build-isolation --no-deps")


@pytest.fixture(scope="module")
def pair() -> Iterator[Cluster]:
    have_c_engine()
    with Lab() as lab:  # etcd, the daemons, the containers: all gone at close
        cl = FlannelCluster(
            lab, n_hosts=2, engines=["c", "c"], extra_args=["--engine-threads", str(THREADS)]
        )
        cl.start(timeout=60)
        containers = [lab.add_container_bridge(h.ns, h.subnet, mtu=h.mtu) for h in cl.hosts]
        cl.wait_peers(1)
        yield cl, containers


def engine_of(h: Flanneld) -> dict[str, Any]:
    """``backend.engine`` of one ``/status`` document (one snapshot)."""
    st = h.status()
    engine: dict[str, Any] = st["backend"]["engine"]
    assert st["engine"] == engine  # the top-level copy is the same object
    return engine


def data_plane_line(h: Flanneld) -> str:
    lines = [ln for ln in h.log_text().splitlines() if "data plane up:" in ln]
    assert len(lines) == 1, h.log_tail()
    return lines[0]


def tun_queues(ns: Netns) -> list[str]:
    """What sysfs lists for flannel0's queues inside the host namespace."""
    return ns.run(["ls", "/sys/class/net/flannel0/queues/"]).stdout.split()


def tun_info(ns: Netns) -> dict[str, Any]:
    (link,) = ns.ip_json("-d", "link", "show", "flannel0")
    info: dict[str, Any] = link["linkinfo"]["info_data"]
    return info


def status_cmd(h: Flanneld, *args: str) -> subprocess.CompletedProcess[str]:
    """``flanneld-py status`` for ``h`` (through its control socket)."""
    argv = [
        sys.executable,
        "-m",
        "flanneld_py",
        "status",
        "--control-socket",
        str(h.control_socket),
    ]
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, cwd=ROOT, timeout=30, check=False
    )


def check_sums(engine: dict[str, Any], where: str) -> None:
    threads = engine["threads"]
    for key in SUMMED:
        each = [t[key] for t in threads]
        assert engine[key] == sum(each), f"{where}: {key} {engine[key]} != sum of {each}"


def cport_for_spread(src: Container, dst: Container, streams: int) -> int:
    """A first client port P such that, by the steering model, the data of streams P..P+k-1
    (src -> dst:5201) spreads evenly over the receiving host's threads, and their ACKs over the
    sending host's."""
    for base in range(41000, 60000, streams):
        ports = range(base, base + streams)
        data = [index_for(THREADS, inner(str(src.address), str(dst.address), p, IPERF_PORT))
                for p in ports]  # fmt: skip
        acks = [index_for(THREADS, inner(str(dst.address), str(src.address), IPERF_PORT, p))
                for p in ports]  # fmt: skip
        even = [streams // THREADS] * THREADS
        if (
            [data.count(i) for i in range(THREADS)]
            == even
            == [acks.count(i) for i in range(THREADS)]
        ):
            return base
    raise AssertionError("no client port spreads the streams")


# ---------------------------------------------------------------------------------------------


def test_two_threads_two_tun_queues_and_per_thread_status(pair: Cluster) -> None:
    cl, _ = pair
    for h in cl.hosts:
        line = data_plane_line(h)
        assert re.search(r", c engine x 2 threads, offloads: ", line), line
        # two queues of one device: sysfs lists them, ip -d link says multi_queue with 2
        assert tun_queues(h.ns) == ["rx-0", "rx-1", "tx-0", "tx-1"]
        info = tun_info(h.ns)
        assert info.get("multi_queue") is True and info.get("numqueues") == 2, info
        assert info.get("numdisabled") == 0, info

        engine = engine_of(h)
        assert engine["kind"] == "c"
        threads = engine["threads"]
        assert isinstance(threads, list) and len(threads) == THREADS
        counters = {k for k, v in engine.items() if k not in ("kind", "threads")}
        for t in threads:  # each thread: the same counters as the engine
            assert set(t) == counters, set(t) ^ counters
            assert all(isinstance(v, int) for v in t.values())
        assert h.status()["offloads"]["vnet_hdr"] is True

        out = status_cmd(h)
        assert out.returncode == 0, out.stderr
        assert re.search(r"engine c\b", out.stdout), out.stdout
        doc = json.loads(status_cmd(h, "--json").stdout)
        assert doc["backend"]["engine"]["kind"] == "c"
        assert len(doc["backend"]["engine"]["threads"]) == THREADS


def test_four_tcp_flows_land_on_both_receiving_threads(pair: Cluster, tmp_path: Path) -> None:
    cl, cs = pair
    tx, rx = cl.hosts
    streams = 4
    cport = cport_for_spread(cs[0], cs[1], streams)
    before_rx = [t["udp_rx_packets"] for t in engine_of(rx)["threads"]]
    before_tx = [t["tun_rx_packets"] for t in engine_of(tx)["threads"]]

    server = cs[1].popen(["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], tmp_path / "iperf3-s.log")
    wait_for(
        lambda: f":{IPERF_PORT}" in cs[1].run(["ss", "-ltn"]).stdout or server.poll() is not None,
        10,
        0.05,
        "the iperf3 server",
    )
    argv = ["iperf3", "-c", str(cs[1].address), "-p", str(IPERF_PORT), "-P", str(streams)]
    argv += ["-t", "3", "--cport", str(cport), "-J"]
    out = cs[0].run(argv, check=False, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    result = json.loads(out.stdout)
    ports = sorted(c["local_port"] for c in result["start"]["connected"])
    assert ports == list(range(cport, cport + streams)), ports
    gbps = result["end"]["sum_received"]["bits_per_second"] / 1e9

    after_rx = [t["udp_rx_packets"] for t in engine_of(rx)["threads"]]
    after_tx = [t["tun_rx_packets"] for t in engine_of(tx)["threads"]]
    got = [a - b for a, b in zip(after_rx, before_rx, strict=True)]
    sent = [a - b for a, b in zip(after_tx, before_tx, strict=True)]
    print(f"iperf3 -P {streams} --cport {cport}: {gbps:.2f} Gbit/s; receiver threads' "
          f"udp_rx_packets {got}, sender threads' tun_rx_packets {sent}")  # fmt: skip
    assert sum(1 for n in got if n > 1000) >= 2, got
    assert server.wait(15) == 0


def test_thread_counters_add_up_to_the_engine_counters(pair: Cluster, tmp_path: Path) -> None:
    """In one /status document (traffic stopped), the engine's counters are the sums of the
    threads' ones, on both hosts, before and after some traffic."""
    cl, cs = pair
    for h in cl.hosts:
        check_sums(engine_of(h), f"{h.ns.name} before")
    tcp_transfer(cs[0], cs[1], tmp_path, 4 * MiB, "sums")
    for h in cl.hosts:
        engine = engine_of(h)
        check_sums(engine, f"{h.ns.name} after")
        assert engine["udp_rx_packets"] > 0 and engine["tun_tx_packets"] > 0


def test_thread_counters_add_up_while_traffic_flows(pair: Cluster, tmp_path: Path) -> None:
    """The same rule for documents read while iperf3 runs: 40 of them per host (read over the
    control socket, which is quick), every one must add up."""
    cl, cs = pair
    server = cs[1].popen(["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], tmp_path / "iperf3-s.log")
    wait_for(lambda: f":{IPERF_PORT}" in cs[1].run(["ss", "-ltn"]).stdout, 10, 0.05, "iperf3 -s")
    argv = ["iperf3", "-c", str(cs[1].address), "-p", str(IPERF_PORT), "-P", "4", "-t", "4"]
    client = cs[0].popen(argv, tmp_path / "iperf3-c.log")
    docs: list[tuple[str, dict[str, Any]]] = []
    try:
        time.sleep(1.0)  # past the start
        for _ in range(40):
            for h in cl.hosts:
                code, _, body = h.control_get("/status")
                assert code == 200, body
                docs.append((h.ns.name, json.loads(body)["backend"]["engine"]))
    finally:
        assert client.wait(30) == 0, (tmp_path / "iperf3-c.log").read_text()
        server.wait(15)
    bad = []
    for name, engine in docs:
        try:
            check_sums(engine, f"{name} during iperf3")
        except AssertionError as e:
            bad.append(str(e))
    assert not bad, f"{len(bad)}/{len(docs)} documents do not add up, e.g. {bad[0]}"


def test_per_peer_traffic_in_status(pair: Cluster, tmp_path: Path) -> None:
    """Traffic stopped, each host's one peer carries all of its engine's traffic: the peer's
    counters (summed over the threads) equal the engine's udp counters, in /status and in
    ``flanneld-py status``. 20 pings then move each host's counters by exactly what the other
    host's moved (a bulk transfer may lose datagrams in a full socket buffer: not that)."""
    cl, cs = pair
    tcp_transfer(cs[0], cs[1], tmp_path, 4 * MiB, "peers")
    docs = [h.status() for h in cl.hosts]
    for k, (h, doc) in enumerate(zip(cl.hosts, docs, strict=True)):
        other = cl.hosts[1 - k]
        peers = doc["backend"]["peers"]
        assert list(peers) == [str(other.subnet)], peers
        mine = peers[str(other.subnet)]
        engine = doc["backend"]["engine"]
        drops = sum(v for key, v in engine.items() if key.startswith("drop_udp"))
        assert mine["public_ip"] == docs[1 - k]["lease"]["public_ip"]
        assert mine["tx_packets"] == engine["udp_tx_packets"] > 0
        assert mine["tx_bytes"] == engine["udp_tx_bytes"]
        assert mine["rx_packets"] == engine["udp_rx_packets"] - drops > 0
        out = status_cmd(h)
        assert out.returncode == 0, out.stderr
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith(f"  {other.subnet}"))
        assert f"(sent {mine['tx_packets']} pkts" in line, line

    def counts() -> list[dict[str, int]]:
        return [h.status()["backend"]["peers"][str(cl.hosts[1 - k].subnet)]
                for k, h in enumerate(cl.hosts)]  # fmt: skip

    before = counts()
    out = cs[0].run(["ping", "-q", "-c", "20", "-i", "0.01", "-W", "2", str(cs[1].address)])
    assert " 0% packet loss" in out.stdout, out.stdout
    after = counts()
    moved = [{key: a[key] - b[key] for key in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")}
             for a, b in zip(after, before, strict=True)]  # fmt: skip
    for k in (0, 1):  # host k's sends are the other host's receipts
        assert moved[k]["tx_packets"] == moved[1 - k]["rx_packets"] == 20, moved
        assert moved[k]["tx_bytes"] == moved[1 - k]["rx_bytes"] == 20 * 84, moved


def test_tcp_20mib_through_two_threads_arrives_exact(pair: Cluster, tmp_path: Path) -> None:
    cl, cs = pair
    for src, dst in ((0, 1), (1, 0)):
        before = engine_of(cl.hosts[dst])["udp_rx_bytes"]
        seconds = tcp_transfer(cs[src], cs[dst], tmp_path, 20 * MiB, f"mq-{src}-{dst}")
        assert engine_of(cl.hosts[dst])["udp_rx_bytes"] - before >= 20 * MiB
        print(f"TCP 20 MiB h{src} -> h{dst}: {seconds:.1f}s")
    for h in cl.hosts:
        assert engine_of(h)["kind"] == "c"
        assert h.running, h.log_tail()


# ---------------------------------------------------------------------------------------------


def test_python_engine_runs_one_thread_whatever_engine_threads_says() -> None:
    require("netns", "etcd")
    with Lab() as lab:
        cl = FlannelCluster(
            lab, n_hosts=1, engines=["python"], extra_args=["--engine-threads", "4"]
        )
        cl.start(timeout=60)
        (h,) = cl.hosts
        line = data_plane_line(h)
        assert ", python engine, offloads: none" in line, line
        assert "threads" not in line, line
        engine = engine_of(h)
        assert engine["kind"] == "python"
        assert "threads" not in engine, engine
        assert tun_queues(h.ns) == ["rx-0", "tx-0"]
        assert tun_info(h.ns).get("multi_queue") is not True
        out = status_cmd(h)
        assert out.returncode == 0 and "engine python" in out.stdout, out.stdout + out.stderr
        assert "threads" not in out.stdout
