"""The kernel runs ``flanneld_py.reuseport``'s steering program as the unit test's model says.

Two namespaces joined by a veth. In ``rx``, three UDP sockets in one ``SO_REUSEPORT`` group bound
to ``<veth address>:8285`` (the udp backend's), the program attached with n=3 to the first, and a
fourth socket that joins the group afterwards (the program's ``% 3`` never picks it). From ``tx``,
one socket (so every datagram has the same outer 4-tuple, as between two flannel hosts) sends
datagrams whose payloads are inner IPv4 packets of many flows, and some 10-byte ones. Every
datagram must arrive once, on the socket index that tests/unit/test_reuseport.py's interpreter
predicts.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import Lab, Netns, wait_for
from tests.conftest import require
from tests.unit.test_reuseport import index_for, inner, random_flow

ROOT = Path(__file__).resolve().parents[2]
PRELUDE = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
PORT = 8285
RX_ADDR, TX_ADDR = "10.97.0.2", "10.97.0.1"
N = 3

# argv: address port n count; prints "ready", then one JSON line: [[socket index, hex], ...]
RECEIVER = """
import json, select, socket, sys
from flanneld_py.reuseport import attach_inner_flow_steering
addr, port, n, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def member():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((addr, port))
    s.setblocking(False)
    return s
socks = [member() for _ in range(n)]
attach_inner_flow_steering(socks[0], n)
socks.append(member())  # joins the group after the program: never chosen
print("ready", flush=True)
got = []
while len(got) < count:
    ready = select.select(socks, [], [], 10)[0]
    if not ready:
        break  # nothing for 10 s: the sender is done
    for s in ready:
        while True:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                break
            got.append([socks.index(s), data.hex()])
print(json.dumps(got), flush=True)
"""

# argv: source address, destination address, port, file of hex payloads (one per line)
SENDER = """
import socket, sys, time
src, dst, port, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, port))
for i, line in enumerate(open(path).read().split()):
    s.sendto(bytes.fromhex(line), (dst, port))
    if i % 20 == 19:
        time.sleep(0.002)
print("sent", i + 1, flush=True)
"""


@pytest.fixture
def pair() -> Iterator[tuple[Lab, Netns, Netns]]:
    require("netns")
    with Lab() as lab:  # the namespaces and every process started in them go at close
        rx, tx = lab.netns("rx"), lab.netns("tx")
        lab.veth(tx, "eth0", rx, "eth0")
        rx.add_addr("eth0", f"{RX_ADDR}/24")
        tx.add_addr("eth0", f"{TX_ADDR}/24")
        yield lab, rx, tx


def datagrams(
    rng: random.Random, flows: int, per_flow: int, short: int, extra: int = 0
) -> list[bytes]:
    """``per_flow`` packets of each of ``flows`` random flows (each packet unique: its payload
    carries a sequence number), ``extra`` triples of an ICMP echo request, a fragment and a
    packet with IP options, and ``short`` 10-byte datagrams, shuffled."""
    out: list[bytes] = []
    seq = 0
    for _ in range(flows):
        src, dst, sport, dport, proto = random_flow(rng)
        for _ in range(per_flow):
            payload = seq.to_bytes(4, "big") + rng.randbytes(rng.randrange(0, 200))
            out.append(inner(src, dst, sport, dport, proto=proto, payload=payload, ident=seq))
            seq += 1
    for _ in range(extra):  # an echo request, a fragment, a packet with IP options
        src, dst, sport, dport, proto = random_flow(rng)
        payload = seq.to_bytes(4, "big") + rng.randbytes(rng.randrange(0, 200))
        out.append(inner(src, dst, sport, seq, proto=socket.IPPROTO_ICMP, payload=payload))
        frag = rng.choice((0x2000, rng.randrange(1, 0x2000)))
        out.append(inner(src, dst, sport, dport, proto=proto, payload=payload, frag=frag))
        opts = bytes([1]) * (4 * rng.randrange(1, 11))
        out.append(inner(src, dst, sport, dport, proto=proto, payload=payload, options=opts))
        seq += 1
    for _ in range(short):
        out.append(b"short" + seq.to_bytes(5, "big"))
        seq += 1
    rng.shuffle(out)
    return out


def test_the_kernel_steers_every_datagram_where_the_model_says(
    pair: tuple[Lab, Netns, Netns],
) -> None:
    lab, rx, tx = pair
    rng = random.Random(8285)
    sent = datagrams(rng, flows=140, per_flow=2, short=20, extra=30)
    assert len(sent) == 390 and len(set(sent)) == 390
    expect = {d: index_for(N, d) for d in sent}
    assert set(expect.values()) == set(range(N))  # the model spreads them (else: weak test)

    path = lab.tmpdir / "datagrams.hex"
    path.write_text("\n".join(d.hex() for d in sent) + "\n")
    log = lab.tmpdir / "receiver.log"
    proc = rx.popen(
        [sys.executable, "-c", PRELUDE + RECEIVER, RX_ADDR, str(PORT), str(N), str(len(sent))],
        log,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"receiver exited {proc.returncode}: {log.read_text()}")
        return "ready" in log.read_text()

    wait_for(ready, 15, 0.05, "the receiver's sockets")
    out = tx.run(
        [sys.executable, "-c", textwrap.dedent(SENDER), TX_ADDR, RX_ADDR, str(PORT), str(path)]
    )
    assert out.stdout.split() == ["sent", str(len(sent))]
    assert proc.wait(30) == 0, log.read_text()
    got: list[list[object]] = json.loads(log.read_text().splitlines()[-1])

    arrived = Counter(bytes.fromhex(str(h)) for _, h in got)
    assert arrived == Counter(sent), "every datagram arrives exactly once"
    wrong = [
        (idx, expect[bytes.fromhex(str(h))], h)
        for idx, h in got
        if idx != expect[bytes.fromhex(str(h))]
    ]
    assert not wrong, f"{len(wrong)} datagrams on another socket than predicted: {wrong[:5]}"
    per_socket = Counter(idx for idx, _ in got)
    assert set(per_socket) == set(range(N)), per_socket  # the late fourth socket got nothing
    assert all(per_socket[i] > 0 for i in range(N)), per_socket
    shorts = [idx for idx, h in got if len(bytes.fromhex(str(h))) == 10]
    assert shorts == [0] * 20
    print(f"per socket: {dict(sorted(per_socket.items()))}")


def test_without_the_program_the_group_hashes_the_outer_tuple_to_one_socket(
    pair: tuple[Lab, Netns, Netns],
) -> None:
    """Why the program exists: between two hosts every datagram has the same outer 4-tuple, and
    the kernel's own reuseport hash then hands them all to a single socket of the group."""
    lab, rx, tx = pair
    sent = datagrams(random.Random(1), flows=40, per_flow=1, short=0)
    path = lab.tmpdir / "datagrams.hex"
    path.write_text("\n".join(d.hex() for d in sent) + "\n")
    code = PRELUDE + RECEIVER.replace("attach_inner_flow_steering(socks[0], n)", "")
    log = lab.tmpdir / "receiver-hash.log"
    proc = rx.popen([sys.executable, "-c", code, RX_ADDR, str(PORT), str(N), str(len(sent))], log)
    wait_for(lambda: "ready" in log.read_text() or proc.poll() is not None, 15, 0.05, "ready")
    tx.run([sys.executable, "-c", SENDER, TX_ADDR, RX_ADDR, str(PORT), str(path)])
    assert proc.wait(30) == 0, log.read_text()
    got = json.loads(log.read_text().splitlines()[-1])
    assert len(got) == len(sent)
    assert len({idx for idx, _ in got}) == 1, Counter(idx for idx, _ in got)
