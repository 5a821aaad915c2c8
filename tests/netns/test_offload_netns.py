"""Segmentation offloads end to end, as root: real TUNs (IFF_VNET_HDR + TSO), UDP GSO/GRO on veths.

Four hosts share one etcd: h1 and h2 run the C engine with offloads (the default, ``--offload
auto``), h3 the C engine with ``--offload off``, h4 the Python engine. Each host has a docker0-like
bridge (MTU = FLANNEL_MTU, as docker gets it) with one container. The wire format is the same for
all of them (one inner packet per datagram), so every container reaches every other; between h1
and h2 the traffic goes through the whole offload path (TSO super-packets read from flannel0, GSO
sends, GRO receives, coalesced GSO writes into flannel0) and must arrive byte-exact.
"""

from __future__ import annotations

import errno
import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flanneld_py import engine as engine_mod
from lab.flanneld import FlannelCluster, Flanneld
from lab.netns import Container, Lab, wait_for
from lab.transfer import tcp_receiver
from tests.conftest import require

MiB = 1 << 20
PORT = 5301

# deterministic data: block i = SHAKE-256(seed || i), 1 MiB each
GEN = r"""
import hashlib
def blocks(seed, n):
    for i in range(n // (1 << 20)):
        yield hashlib.shake_256(seed + i.to_bytes(8, "big")).digest(1 << 20)
"""

RECEIVER = tcp_receiver(PORT)

SENDER = (
    GEN
    + r"""
import socket, sys
c = socket.create_connection((sys.argv[1], @PORT@), timeout=60)
for b in blocks(sys.argv[2].encode(), int(sys.argv[3])):
    c.sendall(b)
c.close()
""".replace("@PORT@", str(PORT))
)


def expected_digest(seed: str, size: int) -> str:
    h = hashlib.sha256()
    for i in range(size // MiB):
        h.update(hashlib.shake_256(seed.encode() + i.to_bytes(8, "big")).digest(MiB))
    return h.hexdigest()


def transfer(src: Container, dst: Container, tmp: Path, size: int, seed: str) -> None:
    """size bytes over TCP from src to dst; asserts they arrived exactly (count and SHA-256) and
    from src's own address."""
    log = tmp / f"rx-{seed}.log"
    rx = dst.popen([sys.executable, "-c", RECEIVER], log_path=log)
    wait_for(lambda: "listening" in log.read_text(), 15, 0.05, "receiver")
    src.run([sys.executable, "-c", SENDER, str(dst.address), seed, str(size)], timeout=120)
    wait_for(lambda: rx.poll() is not None, 60, 0.05, "receiver to finish")
    peer, n, digest = log.read_text().split()[1:4]
    assert (peer, int(n)) == (str(src.address), size)
    assert digest == expected_digest(seed, size), f"{src.name} -> {dst.name}: data corrupted"


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[FlannelCluster, list[Container]]]:
    require("netns", "etcd")
    if not engine_mod.c_engine_available():
        pytest.skip("C engine not built: pip install -e . --no-build-isolation --no-deps")
    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=4, engines=["c", "c", "c", "python"])
        cl.hosts[2].extra_args = ["--offload", "off"]
        cl.start(timeout=60)
        containers = [lab.add_container_bridge(h.ns, h.subnet, mtu=h.mtu) for h in cl.hosts]
        cl.wait_peers(3)
        yield cl, containers


def offloads(h: Flanneld) -> dict[str, Any]:
    st: dict[str, Any] = h.status()["offloads"]
    return st


def test_offloads_on_where_asked_and_reported(
    cluster: tuple[FlannelCluster, list[Container]],
) -> None:
    cl, _ = cluster
    h1, h2, h3, h4 = cl.hosts
    for h in (h1, h2):
        st = offloads(h)
        assert st["vnet_hdr"] is True
        assert {"tun_csum", "tun_tso4", "udp_gso", "udp_gro", "tun_gso"} <= set(st["active"]), st
        assert "offloads: tun_csum, tun_tso4" in h.log_text()
        feats = h.ns.run(["ethtool", "-k", "flannel0"]).stdout
        assert "tcp-segmentation-offload: on" in feats
    for h in (h3, h4):
        st = offloads(h)
        assert st["active"] == [] and st["vnet_hdr"] is False
        assert "offloads: none" in h.log_text()
        feats = h.ns.run(["ethtool", "-k", "flannel0"]).stdout
        assert "tcp-segmentation-offload: off" in feats
    assert h4.status()["engine"]["kind"] == "python"


def test_mixed_hosts_all_reach_each_other(
    cluster: tuple[FlannelCluster, list[Container]], tmp_path: Path
) -> None:
    _, cs = cluster
    for a in cs:
        for b in cs:
            if a is not b:
                assert a.ping(b.address, count=1, timeout=2), f"ping {a.address} -> {b.address}"
    for i, a in enumerate(cs):
        for j, b in enumerate(cs):
            if a is not b:
                transfer(a, b, tmp_path, 2 * MiB, f"pair-{i}-{j}")


@pytest.mark.parametrize(
    ("src", "dst", "mib"),
    [(0, 1, 100), (1, 0, 20), (0, 2, 20), (2, 1, 20), (1, 3, 5), (3, 0, 5)],
    ids=["offload-offload-100M", "back", "offload-off", "off-offload", "to-python", "from-python"],
)
def test_tcp_transfer_byte_exact(
    cluster: tuple[FlannelCluster, list[Container]], tmp_path: Path, src: int, dst: int, mib: int
) -> None:
    cl, cs = cluster
    before = [offloads(h)["counters"] for h in cl.hosts]
    t0 = time.monotonic()
    transfer(cs[src], cs[dst], tmp_path, mib * MiB, f"t-{src}-{dst}-{mib}")
    elapsed = time.monotonic() - t0
    after = [offloads(h)["counters"] for h in cl.hosts]

    def grew(i: int, key: str) -> int:
        return int(after[i].get(key, 0)) - int(before[i].get(key, 0))

    print(f"{mib} MiB {src}->{dst} in {elapsed:.2f}s")
    # the offload path really carried it: super-packets read and sent with GSO on the way out,
    # GRO reads and coalesced writes on the way in (host index < 2 = offloads on)
    if src < 2:
        assert grew(src, "tso_segments") > 0 and grew(src, "gso_sends") > 0
    if dst < 2 and src < 2:
        assert grew(dst, "gro_reads") > 0 and grew(dst, "tun_gso_writes") > 0
    if dst < 2:
        assert grew(dst, "tun_gso_writes") > 0  # coalesced even from a peer without GSO
    for h in cl.hosts:
        assert not int(offloads(h)["counters"].get("vnet_errors", 0))


def test_gso_refused_at_runtime_falls_back(
    cluster: tuple[FlannelCluster, list[Container]], tmp_path: Path
) -> None:
    """The path to h2 has a smaller MTU than h1 was configured for (a /32 route with MTU 1400):
    the kernel refuses GSO sends whose segments do not fit (EMSGSIZE; on kernels without a
    software checksum fallback, a device without checksum offload gives EIO the same way). The
    engine turns GSO off, the daemon logs it once, plain sends (fragmented by the kernel) carry
    on, and the transfer is byte-exact. Runs last: h1 keeps GSO off afterwards."""
    cl, cs = cluster
    h1, h2 = cl.hosts[0], cl.hosts[1]
    route = [f"{h2.ns.address}/32", "dev", "eth0", "mtu", "1400"]
    h1.ns.ip("route", "add", *route)
    try:
        transfer(cs[0], cs[1], tmp_path, 20 * MiB, "gso-off")
        st = offloads(h1)
        assert "udp_gso" not in st["active"] and "udp_gro" in st["active"]
        c = st["counters"]
        # each engine thread finds out on its own (summed counter: 1 per thread that sent)
        nthreads = len(h1.status()["engine"].get("threads") or [1])
        errors = c["gso_errors"]
        assert 1 <= errors <= nthreads and c["gso_errno"] in (
            errno.EMSGSIZE,
            errno.EINVAL,
            errno.EIO,
        )
        wait_for(lambda: "turned off UDP GSO" in h1.log_text(), 10, 0.1, "the log line")
        transfer(cs[1], cs[0], tmp_path, 5 * MiB, "gso-off-back")
        transfer(cs[0], cs[1], tmp_path, 5 * MiB, "gso-off-again")
        assert errors <= offloads(h1)["counters"]["gso_errors"] <= nthreads
        assert h1.log_text().count("turned off UDP GSO") == 1
        assert "udp_gso" in offloads(h2)["active"]  # the peer is not affected
    finally:
        h1.ns.ip("route", "del", *route, check=False)
