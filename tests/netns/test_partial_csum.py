"""The udp backend's ``partial-csum`` capability end to end, as root: real etcd, real TUNs.

A mixed cluster of three hosts: h0 runs the C engine with offloads (``--offload auto``, the
default: its TUN carries a virtio header, so it completes partial checksums and advertises
``{"Capabilities":["partial-csum"]}`` in its lease), h1 the C engine with ``--offload off`` and h2
the Python engine (neither advertises it). Each host has a docker0-like bridge (MTU = FLANNEL_MTU)
with one container. Whatever the pairing, the packets must arrive with complete, correct inner
checksums: h0 may leave a checksum partial only towards a host that advertises the capability,
and none of its peers does, so h0 sends nothing partial. A second cluster of two offload hosts
shows that the partial path is really taken when both ends advertise it.

What "arrives exact" means here:

* TCP: 100 MiB from container i to container j; the SHA-256 the sender computed over what it
  sent equals the one the receiver computed over what it read, the byte count too, and the
  receiving container's kernel counted no TCP checksum error (a segment sent with a partial
  checksum to a host that does not complete it would be dropped there as a bad checksum).
* UDP: numbered datagrams (1200 bytes: an 8-byte sequence number, the rest determined by it), paced
  by the sender, into a receiver socket with an 8 MiB buffer. UDP may lose datagrams on a busy
  machine, so the rule is: every datagram that arrives is intact (its payload is exactly what its
  sequence number determines, its number is one that was sent, it comes from the sending
  container), no datagram arrives twice, at least 95 % of those sent arrive, and the receiving
  container's kernel counted no UDP checksum error (a datagram with a bad checksum is dropped by
  the kernel before the socket sees it, so it would show up there, not as a corrupted payload).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess, Popen
from typing import Any

import pytest

from flanneld_py import engine as engine_mod
from lab.flanneld import FlannelCluster, Flanneld
from lab.netns import Container, Lab, LabError, Netns, wait_for
from lab.transfer import tcp_receiver
from tests.conftest import require

MiB = 1 << 20
TCP_SIZE = 100 * MiB
#: UDP: datagram size and how many (100 MiB of payload per pairing)
DGRAM = 1200
UDP_COUNT = -(-100 * MiB // DGRAM)
#: datagrams per second the sender keeps to (about 30 MB/s of payload)
UDP_RATE = 25_000
#: share of the datagrams sent that must arrive
UDP_MIN_SHARE = 0.95
TCP_PORT = 5311
UDP_PORT = 5312
CAPS = {"Capabilities": ["partial-csum"]}
PAIRS = [(i, j) for i in range(3) for j in range(3) if i != j]
PAIR_IDS = [f"h{i}-h{j}" for i, j in PAIRS]

# --- TCP: deterministic blocks, SHA-256 on both ends -------------------------------------------

TCP_RECEIVER = tcp_receiver(TCP_PORT)

# block i = SHAKE-256(seed || i), 1 MiB each; prints the SHA-256 of everything it sent
TCP_SENDER = r"""
import hashlib, socket, sys
seed, size = sys.argv[2].encode(), int(sys.argv[3])
c = socket.create_connection((sys.argv[1], @PORT@), timeout=60)
h = hashlib.sha256(); n = 0
for i in range(size // (1 << 20)):
    b = hashlib.shake_256(seed + i.to_bytes(8, "big")).digest(1 << 20)
    c.sendall(b); h.update(b); n += len(b)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print(n, h.hexdigest(), flush=True)
""".replace("@PORT@", str(TCP_PORT))

# --- UDP: numbered datagrams whose payload their number determines ------------------------------

UDP_COMMON = r"""
import hashlib, json, socket, sys, time
SIZE = @SIZE@
PAT = hashlib.shake_256(sys.argv[1].encode()).digest(65536 + SIZE)
END = b"\xff" * 8
def payload(seq):
    off = (seq * 7919) % 65536
    return seq.to_bytes(8, "big") + PAT[off:off + SIZE - 8]
""".replace("@SIZE@", str(DGRAM))

# argv: seed count expected-source
UDP_RECEIVER = (
    UDP_COMMON
    + r"""
count, src = int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:  # SO_RCVBUFFORCE (33; not in the socket module): past net.core.rmem_max, as root
    s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", @PORT@))
print("listening", flush=True)
seen = bytearray(count)
r = {"rcvbuf": s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), "received": 0, "corrupt": 0,
     "unknown_seq": 0, "duplicate": 0, "wrong_src": 0, "end": False, "examples": []}
s.settimeout(30)  # until the first datagram
while True:
    try:
        data, peer = s.recvfrom(65536)
    except socket.timeout:
        break
    s.settimeout(5)  # then: the sender has stopped when nothing came for this long
    if data == END:
        r["end"] = True
        break
    seq = int.from_bytes(data[:8], "big")
    if peer[0] != src:
        r["wrong_src"] += 1
    elif seq >= count:
        r["unknown_seq"] += 1
    elif data != payload(seq):
        r["corrupt"] += 1
        if len(r["examples"]) < 5:
            r["examples"].append([seq, len(data)])
    elif seen[seq]:
        r["duplicate"] += 1
    else:
        seen[seq] = 1
        r["received"] += 1
print(json.dumps(r), flush=True)
""".replace("@PORT@", str(UDP_PORT))
)

# argv: seed count destination rate
UDP_SENDER = (
    UDP_COMMON
    + r"""
import errno
count, dst, rate = int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, @PORT@))
retries = 0
t0 = time.monotonic()
for seq in range(count):
    p = payload(seq)
    while True:
        try:
            s.send(p)
            break
        except OSError as e:  # a full queue on the way out: wait a little, send it again
            if e.errno not in (errno.ENOBUFS, errno.EAGAIN):
                raise
            retries += 1
            time.sleep(0.001)
    if seq % 64 == 63:
        ahead = t0 + (seq + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
elapsed = time.monotonic() - t0
time.sleep(0.3)
for _ in range(5):  # the receiver stops at the first: ICMP port unreachable then refuses the rest
    try:
        s.send(END)
    except ConnectionRefusedError:
        break
    time.sleep(0.05)
print(json.dumps({"sent": count, "retries": retries, "seconds": elapsed}), flush=True)
""".replace("@PORT@", str(UDP_PORT))
)


def snmp(ns: Netns) -> dict[str, int]:
    """``/proc/net/snmp`` of ``ns`` as ``{"Udp.InCsumErrors": n, "Tcp.InCsumErrors": n, ...}``."""
    lines = ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
    out: dict[str, int] = {}
    for names, values in zip(lines[0::2], lines[1::2], strict=True):
        proto, _, keys = names.partition(":")
        for k, v in zip(keys.split(), values.partition(":")[2].split(), strict=True):
            out[f"{proto}.{k}"] = int(v)
    return out


def wait_listening(proc: Popen[bytes], log: Path) -> None:
    """Until the receiver ``proc`` says it listens; fails with its output if it exits first."""

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"receiver exited {proc.returncode}: {log.read_text()}")
        return "listening" in log.read_text()

    wait_for(up, 15, 0.05, "the receiver to listen")


def run_sender(
    src: Container, script: list[str], rx: Popen[bytes], log: Path, timeout: float
) -> CompletedProcess[str]:
    """Run the sender ``python -c *script`` in ``src``, then wait for the receiver ``rx`` to
    finish; fails with both outputs if either goes wrong."""
    sent = src.run([sys.executable, "-c", *script], check=False, timeout=timeout)
    try:
        wait_for(lambda: rx.poll() is not None, 60, 0.05, "the receiver to finish")
    except LabError:
        pass
    if sent.returncode != 0 or rx.returncode != 0:
        pytest.fail(
            f"sender in {src.name} exited {sent.returncode}: {sent.stderr.strip()}\n"
            f"receiver exited {rx.returncode}: {log.read_text().strip()}"
        )
    return sent


def tcp_transfer(src: Container, dst: Container, tmp: Path, size: int, seed: str) -> float:
    """``size`` bytes over TCP from ``src`` to ``dst``; asserts they arrived exactly (count and
    SHA-256 of what was sent = of what was received), from ``src``'s own address, and that
    ``dst``'s kernel saw no TCP checksum error. Returns the seconds it took."""
    before = snmp(dst)
    log = tmp / f"tcp-rx-{seed}.log"
    rx = dst.popen([sys.executable, "-c", TCP_RECEIVER], log_path=log)
    wait_listening(rx, log)
    t0 = time.monotonic()
    sent = run_sender(src, [TCP_SENDER, str(dst.address), seed, str(size)], rx, log, timeout=150)
    elapsed = time.monotonic() - t0
    n_sent, digest_sent = sent.stdout.split()
    peer, n_got, digest_got = log.read_text().split()[1:4]
    where = f"TCP {src.address} -> {dst.address}"
    assert (int(n_sent), int(n_got), peer) == (size, size, str(src.address)), where
    assert digest_got == digest_sent, f"{where}: data corrupted"
    after = snmp(dst)
    assert after["Tcp.InCsumErrors"] == before["Tcp.InCsumErrors"], f"{where}: bad checksums"
    return elapsed


def udp_transfer(src: Container, dst: Container, tmp: Path, seed: str) -> dict[str, Any]:
    """``UDP_COUNT`` numbered datagrams from ``src`` to ``dst`` at ``UDP_RATE``; asserts the rule
    of the module docstring and returns the receiver's findings (plus the sender's)."""
    before = snmp(dst)
    log = tmp / f"udp-rx-{seed}.log"
    args = [seed, str(UDP_COUNT)]
    rx = dst.popen([sys.executable, "-c", UDP_RECEIVER, *args, str(src.address)], log_path=log)
    wait_listening(rx, log)
    sent = run_sender(
        src, [UDP_SENDER, *args, str(dst.address), str(UDP_RATE)], rx, log, timeout=120
    )
    after = snmp(dst)
    res: dict[str, Any] = json.loads(log.read_text().splitlines()[-1])
    res["sender"] = json.loads(sent.stdout.splitlines()[-1])
    res["Udp.InCsumErrors"] = after["Udp.InCsumErrors"] - before["Udp.InCsumErrors"]
    res["Udp.RcvbufErrors"] = after["Udp.RcvbufErrors"] - before["Udp.RcvbufErrors"]
    where = f"UDP {src.address} -> {dst.address}: {res}"
    assert res["rcvbuf"] >= 8 << 20, where
    bad = {k: res[k] for k in ("corrupt", "unknown_seq", "duplicate", "wrong_src")}
    assert bad == dict.fromkeys(bad, 0), where
    assert res["Udp.InCsumErrors"] == 0, where
    assert res["received"] >= UDP_MIN_SHARE * UDP_COUNT, where
    return res


def counters(h: Flanneld) -> dict[str, int]:
    """The C engine's offload counters from ``/status`` (empty for the Python engine)."""
    c: dict[str, int] = h.status()["offloads"]["counters"]
    return c


def engine_bytes(h: Flanneld) -> tuple[int, int]:
    """(udp_tx_bytes, udp_rx_bytes) of ``h``'s engine: what went out to / came in from peers."""
    st = h.status()["engine"]
    return int(st["udp_tx_bytes"]), int(st["udp_rx_bytes"])


def check_carried(
    cl: FlannelCluster, src: int, dst: int, before: list[tuple[int, int]], least: int
) -> None:
    """The hosts' engines carried the transfer: host ``src`` sent, host ``dst`` received at
    least ``least`` bytes (the payload; inner headers come on top)."""
    (tx0, _), (_, rx0) = before
    tx1, rx1 = engine_bytes(cl.hosts[src])[0], engine_bytes(cl.hosts[dst])[1]
    assert tx1 - tx0 >= least and rx1 - rx0 >= least, (tx1 - tx0, rx1 - rx0, least)


def lease_of(cl: FlannelCluster, h: Flanneld) -> dict[str, Any]:
    return cl.leases_by_subnet()[str(h.subnet)]


Cluster = tuple[FlannelCluster, list[Container]]


def c_engine_cluster(engines: list[str], extra: dict[int, list[str]]) -> Iterator[Cluster]:
    require("netns", "etcd")
    if not engine_mod.c_engine_available():
        pytest.skip("C engine not built: pip install -e . --no-build-isolation --no-deps")
    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=len(engines), engines=engines)
        for i, args in extra.items():  # per-host arguments: Flanneld.extra_args, set before start
            cl.hosts[i].extra_args = args
        cl.start(timeout=60)
        containers = [lab.add_container_bridge(h.ns, h.subnet, mtu=h.mtu) for h in cl.hosts]
        cl.wait_peers(len(engines) - 1)
        yield cl, containers


@pytest.fixture(scope="module")
def mixed() -> Iterator[Cluster]:
    """h0: C engine, offloads on; h1: C engine, --offload off; h2: Python engine."""
    yield from c_engine_cluster(["c", "c", "python"], {1: ["--offload", "off"]})


@pytest.fixture(scope="module")
def offload_pair() -> Iterator[Cluster]:
    """Two hosts, both C engine with offloads on: each advertises partial-csum to the other."""
    yield from c_engine_cluster(["c", "c"], {})


# ---------------------------------------------------------------------------------------------
# the mixed cluster


def test_only_the_offload_host_advertises_partial_csum(mixed: Cluster) -> None:
    cl, _ = mixed
    h0, h1, h2 = cl.hosts
    assert len(cl.leases()) == 3
    assert lease_of(cl, h0) == {
        "PublicIP": str(h0.ns.address),
        "PublicIPv6": None,
        "BackendData": CAPS,
    }
    for h in (h1, h2):
        assert lease_of(cl, h) == {"PublicIP": str(h.ns.address), "PublicIPv6": None}
    assert h0.status()["offloads"]["vnet_hdr"] is True
    assert h1.status()["offloads"]["vnet_hdr"] is False
    assert h2.status()["engine"]["kind"] == "python"


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=PAIR_IDS)
def test_tcp_100mib_arrives_exact(mixed: Cluster, tmp_path: Path, src: int, dst: int) -> None:
    cl, cs = mixed
    before = [engine_bytes(cl.hosts[src]), engine_bytes(cl.hosts[dst])]
    elapsed = tcp_transfer(cs[src], cs[dst], tmp_path, TCP_SIZE, f"tcp-{src}-{dst}")
    check_carried(cl, src, dst, before, TCP_SIZE)
    print(f"TCP 100 MiB h{src} -> h{dst}: {elapsed:.1f}s")


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=PAIR_IDS)
def test_udp_100mib_every_datagram_that_arrives_is_intact(
    mixed: Cluster, tmp_path: Path, src: int, dst: int
) -> None:
    cl, cs = mixed
    before = [engine_bytes(cl.hosts[src]), engine_bytes(cl.hosts[dst])]
    res = udp_transfer(cs[src], cs[dst], tmp_path, f"udp-{src}-{dst}")
    check_carried(cl, src, dst, before, res["received"] * DGRAM)
    s = res["sender"]
    print(
        f"UDP h{src} -> h{dst}: {res['received']}/{s['sent']} in {s['seconds']:.1f}s "
        f"(send retries {s['retries']}, rcvbuf drops {res['Udp.RcvbufErrors']})"
    )


def test_the_offload_host_sent_nothing_partial(mixed: Cluster, tmp_path: Path) -> None:
    """After the transfers above (and two of its own, so that it does not depend on them): no
    peer of h0 advertises partial-csum, so h0 left no checksum partial, though it did read
    offloaded (partial-checksum) packets from its TUN and completed their checksums itself."""
    cl, cs = mixed
    h0 = cl.hosts[0]
    for j in (1, 2):
        tcp_transfer(cs[0], cs[j], tmp_path, 10 * MiB, f"check-{j}")
    c = counters(h0)
    print(f"h0 offload counters: {c}")
    assert c["csum_partial_sent"] == 0, c
    assert c["csum_completed"] > 0 or c["tso_segments"] > 0, c
    assert c["vnet_errors"] == 0, c
    assert int(h0.status()["engine"]["udp_tx_packets"]) > 0
    for h in cl.hosts:  # the outer datagrams were intact too
        assert snmp(h.ns)["Udp.InCsumErrors"] == 0, h.ns.name


# ---------------------------------------------------------------------------------------------
# two offload hosts: the partial path


def test_between_two_offload_hosts_checksums_go_partial_and_tcp_is_exact(
    offload_pair: Cluster, tmp_path: Path
) -> None:
    cl, cs = offload_pair
    tx, rx = cl.hosts
    for h in cl.hosts:
        assert lease_of(cl, h) == {
            "PublicIP": str(h.ns.address),
            "PublicIPv6": None,
            "BackendData": CAPS,
        }
    before_tx, before_rx = counters(tx), counters(rx)
    elapsed = tcp_transfer(cs[0], cs[1], tmp_path, TCP_SIZE, "pair-tcp")
    after_tx, after_rx = counters(tx), counters(rx)
    print(f"TCP 100 MiB between offload hosts: {elapsed:.1f}s; tx {after_tx}; rx {after_rx}")

    def grew(before: dict[str, int], after: dict[str, int], key: str) -> int:
        return int(after.get(key, 0)) - int(before.get(key, 0))

    assert grew(before_tx, after_tx, "csum_partial_sent") > 0, after_tx
    assert (
        grew(before_rx, after_rx, "tun_csum_writes") > 0
        or grew(before_rx, after_rx, "tun_gso_writes") > 0
    ), after_rx
    for h in cl.hosts:
        assert counters(h)["vnet_errors"] == 0


def test_between_two_offload_hosts_udp_goes_partial_and_arrives_intact(
    offload_pair: Cluster, tmp_path: Path
) -> None:
    """Inner UDP, too, goes out with its checksum partial to a host that advertises it, and
    every datagram that arrives is intact (the rule of the module docstring)."""
    cl, cs = offload_pair
    tx, rx = cl.hosts
    before_tx, before_rx = counters(tx), counters(rx)
    res = udp_transfer(cs[0], cs[1], tmp_path, "pair-udp")
    after_tx, after_rx = counters(tx), counters(rx)
    print(f"UDP between offload hosts: {res['received']}/{res['sender']['sent']}")
    assert after_tx["csum_partial_sent"] > before_tx["csum_partial_sent"], after_tx
    assert sum(after_rx.values()) > sum(before_rx.values()), after_rx
    assert after_rx["vnet_errors"] == 0 and after_tx["vnet_errors"] == 0
