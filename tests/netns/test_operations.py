"""Operations in namespaces: ``/metrics`` over the control socket and the TCP health port, the
packet counters following real pings, and ``flanneld-py status`` against a running, a stopped and
a killed daemon.

Two udp hosts from :class:`lab.flanneld.FlannelCluster`; each daemon has its own control socket
in its lab workdir (``Flanneld.control_socket``): unix sockets live in the filesystem, which the
lab's namespaces share, so the test reaches them from the root namespace.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.flanneld import HEALTHZ_PORT, FlannelCluster, Flanneld, http_get_in
from lab.netns import Container, Lab, wait_for
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Cluster = tuple[FlannelCluster, list[Container]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require("netns", "etcd")
    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=2).start()
        containers = [cl.add_container(i) for i in range(2)]
        cl.wait_peers(1)
        yield cl, containers


def ensure_running(cl: FlannelCluster) -> None:
    for h in cl.hosts:
        if not h.running:
            h.start()
    cl.wait_peers(1)


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def status_cmd(h: Flanneld, *args: str) -> subprocess.CompletedProcess[str]:
    """``flanneld-py status`` (as ``python -m flanneld_py status``) for host ``h``."""
    argv = ["status", "--control-socket", str(h.control_socket), *args]
    return subprocess.run(
        [sys.executable, "-m", "flanneld_py", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )


def not_running(h: Flanneld) -> str:
    return (
        f"flanneld-py is not running (no control socket at {h.control_socket}); "
        "start it: systemctl start flanneld-py\n"
    )


def test_metrics_over_the_control_socket_and_the_tcp_port(cluster: Cluster) -> None:
    cl, _ = cluster
    ensure_running(cl)
    h, peer = cl.hosts
    st = os.stat(h.control_socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0

    code, headers, body = h.control_get("/metrics")
    assert code == 200
    assert headers["content-type"] == CONTENT_TYPE
    s = parse(body)
    tcp_code, tcp_body = http_get_in(h.ns, f"http://127.0.0.1:{HEALTHZ_PORT}/metrics")
    assert tcp_code == 200
    assert {k[0] for k in parse(tcp_body)} == {k[0] for k in s}  # the same families

    doc = h.status()
    peer_ip = peer.status()["lease"]["public_ip"]
    assert value(s, "flanneld_build_info", version=doc["version"]) == 1
    for gauge in ("flanneld_up", "flanneld_alive", "flanneld_ready", "flanneld_watch_live"):
        assert value(s, gauge) == 1, gauge
    assert value(s, "flanneld_peers") == 1
    labels = {"subnet": str(peer.subnet), "public_ip": peer_ip, "backend": "udp"}
    assert value(s, "flanneld_peer_info", **labels) == 1
    lease_labels = {
        "subnet": str(h.subnet),
        "public_ip": doc["lease"]["public_ip"],
        "network": "10.5.0.0/16",
    }
    assert value(s, "flanneld_lease_info", **lease_labels) == 1
    expiry = value(s, "flanneld_lease_expiry_timestamp_seconds")
    assert time.time() + 86400 - 600 < expiry <= time.time() + 86400
    assert value(s, "flanneld_backend_info", type="udp") == 1
    kind = doc["engine"]["kind"]
    assert value(s, "flanneld_engine_info", kind=kind) == 1
    for name in doc["offloads"]["active"]:
        assert value(s, "flanneld_offload_active", offload=name) == 1
    assert value(s, "flanneld_etcd_endpoint_info", endpoint=cl.etcd.endpoint, api="v3") == 1
    assert ("flanneld_etcd_errors_total", ()) in s
    assert ("flanneld_etcd_endpoint_switches_total", ()) in s
    assert value(s, "flanneld_lease_renewal_failures_total") == 0
    assert value(s, "flanneld_drops_total", reason="udp_wrong_peer") >= 0
    assert value(s, "flanneld_drops_total", reason="icmp_ratelimited") >= 0


def test_packet_counters_increase_after_pings(cluster: Cluster) -> None:
    cl, (c1, c2) = cluster
    ensure_running(cl)
    h1, h2 = cl.hosts
    before1, before2 = parse(h1.metrics()), parse(h2.metrics())
    assert c1.ping(c2.address, count=5, timeout=2)
    after1, after2 = parse(h1.metrics()), parse(h2.metrics())

    def grew(before: Samples, after: Samples, name: str) -> float:
        return value(after, name) - value(before, name)

    # requests: c1 -> h1's TUN -> UDP -> h2 -> h2's TUN; the replies the other way
    for host_before, host_after in ((before1, after1), (before2, after2)):
        for name in ("tun_rx", "udp_tx", "udp_rx", "tun_tx"):
            assert grew(host_before, host_after, f"flanneld_{name}_packets_total") >= 5, name
            assert grew(host_before, host_after, f"flanneld_{name}_bytes_total") >= 5 * 84, name


def test_status_command_shows_the_lease_and_the_peer(cluster: Cluster) -> None:
    cl, (c1, c2) = cluster
    ensure_running(cl)
    assert c1.ping(c2.address, count=1, timeout=2)
    h, peer = cl.hosts
    doc = h.status()
    peer_ip = peer.status()["lease"]["public_ip"]
    proc = status_cmd(h)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    lines = proc.stdout.splitlines()
    lease = next(line for line in lines if line.startswith("lease "))
    assert f"{h.subnet} (PublicIP {doc['lease']['public_ip']}), expires in 23h 5" in lease
    threads = doc["engine"].get("threads")
    nthreads = f" x {len(threads)} threads" if threads else ""  # --engine-threads 0: one per CPU
    kind = doc["engine"]["kind"]
    assert f"backend    udp on flannel0 port 8285, engine {kind}{nthreads} (offloads: " in (
        proc.stdout
    )
    assert f"etcd       {cl.etcd.endpoint} (v3), watch live" in lines
    assert "alive      ok" in lines and "ready      ok" in lines
    assert "peers      1" in lines
    # the peer's line, with what went to it and came from it (the ping: at least one each way)
    (mine,) = [ln for ln in lines if ln.startswith(f"  {peer.subnet!s:<18} via {peer_ip} (sent ")]
    m = re.fullmatch(r".* \(sent (\d+) pkts / .*, received (\d+) pkts / .*\)", mine)
    assert m and int(m[1]) >= 1 and int(m[2]) >= 1, mine
    assert any(line.startswith("sent       ") for line in lines)
    assert any(line.startswith("drops      ") for line in lines)

    proc = status_cmd(h, "--json")
    assert proc.returncode == 0
    raw = json.loads(proc.stdout)
    assert raw["lease"]["subnet"] == str(h.subnet)
    assert raw["peers"] == {str(peer.subnet): peer_ip}


def test_status_command_when_the_daemon_is_stopped_or_killed(cluster: Cluster) -> None:
    cl, (c1, c2) = cluster
    ensure_running(cl)
    h = cl.hosts[1]
    try:
        assert h.stop() == 0
        assert not h.control_socket.exists()  # removed at clean shutdown
        proc = status_cmd(h)
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", not_running(h))

        h.start()
        assert status_cmd(h).returncode == 0
        assert h.pid is not None
        os.kill(h.pid, signal.SIGKILL)  # the socket file stays behind, nobody listens
        wait_for(lambda: not h.running, 10, 0.05, "flanneld-py to die")
        assert h.control_socket.exists()
        proc = status_cmd(h)
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", not_running(h))

        h.start()  # the stale socket is replaced
        proc = status_cmd(h)
        assert proc.returncode == 0, proc.stderr
        assert "removed the stale control socket" in h.log_text()
    finally:
        ensure_running(cl)
    assert c1.ping(c2.address, count=1, timeout=2)
