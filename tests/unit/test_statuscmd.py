"""``flanneld-py status`` (flanneld_py.statuscmd) against a unit-level daemon's control socket in
tmp_path, against none, and its text for a udp daemon's ``/status``."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flanneld_py import statuscmd
from flanneld_py.daemon import Daemon
from flanneld_py.store.memory import MemoryStore
from tests.unit.test_daemon_fakes import PREFIX, FakeBackend, peer_value, until
from tests.unit.test_metrics import FakeUdpBackend, drive, sock_path

ROOT = Path(__file__).resolve().parents[2]


def run_status(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = statuscmd.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


async def run_status_async(*argv: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(run_status, *argv)


def test_status_of_a_running_daemon(tmp_path: Path) -> None:
    path = sock_path(tmp_path)

    async def body(d: Daemon, backend: FakeBackend, store: MemoryStore) -> None:
        store.put(f"{PREFIX}/subnets/10.5.7.0-24", peer_value("10.99.0.12"))
        store.put(f"{PREFIX}/subnets/10.5.8.0-24", peer_value("10.99.0.13", btype="host-gw"))
        await until(lambda: d.accepted and d.ignored_peers)
        assert d.mgr is not None and d.mgr.lease is not None
        subnet = d.mgr.lease.subnet
        code, out, err = await run_status_async("--control-socket", path)
        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].startswith("flanneld-py 0.1.0, up ")
        assert lines[0].endswith(", network 10.5.0.0/16")
        lease = next(line for line in lines if line.startswith("lease "))
        assert f"{subnet} (PublicIP 10.99.0.11), expires in 23h 59m (" in lease
        assert "backend    vxlan" in out
        assert "etcd       endpoint not known yet, watch live" in out
        assert "alive      ok" in lines and "ready      ok" in lines
        assert "peers      1" in lines
        assert "  10.5.7.0/24        via 10.99.0.12" in lines
        assert "  10.5.8.0/24        host-gw" in lines
        assert not any(
            line.startswith(("sent", "received", "drops")) for line in lines
        )  # no engine

        code, out, err = await run_status_async("--control-socket", path, "--json")
        assert (code, err) == (0, "")
        doc = json.loads(out)
        assert doc["lease"]["subnet"] == str(subnet)
        assert doc["peers"] == {"10.5.7.0/24": "10.99.0.12"}

    drive(tmp_path, body, control_socket=path)


def test_status_shows_udp_traffic_and_nonzero_drops(tmp_path: Path) -> None:
    path = sock_path(tmp_path)

    async def body(d: Daemon, backend: FakeUdpBackend, store: MemoryStore) -> None:
        backend.counters.update(
            udp_tx_packets=10,
            udp_tx_bytes=3 * 1024,
            tun_rx_packets=10,
            tun_rx_bytes=3 * 1024,
            drop_udp_wrong_peer=3,
            icmp_ratelimited=1,
        )
        code, out, _ = await run_status_async("--control-socket", path)
        assert code == 0
        assert "backend    udp on flannel0 port 8285, engine c (offloads: tun_tso4, udp_gso)" in out
        assert "sent       10 pkts / 3.0 KiB to peers (TUN rx 10 pkts / 3.0 KiB)\n" in out
        assert "received   0 pkts / 0 B from peers (TUN tx 0 pkts / 0 B)\n" in out
        assert "drops      udp_wrong_peer 3, icmp_ratelimited 1\n" in out
        backend.counters.update(drop_udp_wrong_peer=0, icmp_ratelimited=0)
        code, out, _ = await run_status_async("--control-socket", path)
        assert "drops      none\n" in out

    drive(tmp_path, body, udp=True, control_socket=path)


NOT_RUNNING = (
    "flanneld-py is not running (no control socket at {}); start it: systemctl start flanneld-py\n"
)


def test_no_daemon_no_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    assert run_status("--control-socket", path) == (1, "", NOT_RUNNING.format(path))
    assert run_status("--control-socket", path, "--json") == (1, "", NOT_RUNNING.format(path))


def test_stale_socket_of_a_dead_daemon(tmp_path: Path) -> None:
    path = sock_path(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)  # nobody listens: connection refused
    assert run_status("--control-socket", path) == (1, "", NOT_RUNNING.format(path))


def test_stopped_daemon_leaves_no_socket(tmp_path: Path) -> None:
    path = sock_path(tmp_path)

    async def body(d: Daemon, backend: FakeBackend, store: MemoryStore) -> None:
        assert (await run_status_async("--control-socket", path))[0] == 0

    drive(tmp_path, body, control_socket=path)
    assert run_status("--control-socket", path) == (1, "", NOT_RUNNING.format(path))


def test_permission_denied_needs_root(tmp_path: Path) -> None:
    """As an unprivileged user (a forked child as nobody), against a root-owned socket of mode
    0600 (as the daemon makes it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a root-owned socket and to become nobody")
    path = sock_path(tmp_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, ask, report through the pipe
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, json.dumps(run_status("--control-socket", path)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()
    os.waitpid(pid, 0)
    listener.close()
    assert json.loads(got) == [
        1,
        "",
        f"flanneld-py status needs root to read {path}: run it as root (sudo flanneld-py status)\n",
    ]


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert statuscmd.main(["--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert statuscmd.main(["--help"]) == 0
    assert "--control-socket PATH" in capsys.readouterr().out


def test_something_else_on_the_socket_is_a_clear_error(tmp_path: Path) -> None:
    path = sock_path(tmp_path)

    async def main() -> None:
        async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readline()
            w.write(b"SSH-2.0-nope\r\n")
            await w.drain()
            w.close()

        server = await asyncio.start_unix_server(answer, path)
        async with server:
            code, out, err = await run_status_async("--control-socket", path)
        assert (code, out) == (1, "")
        assert err == f"unexpected answer on {path} (is it flanneld-py's control socket?)\n"

    asyncio.run(main())


def test_format_status_of_a_starting_daemon() -> None:
    doc = {
        "version": "0.1.0",
        "uptime_s": 5.0,
        "network": None,
        "lease": None,
        "watch_live": False,
        "etcd": {"endpoint": "http://10.0.0.1:2379", "api": "v3", "errors": 4},
        "alive": "starting: no subnet lease held yet",
        "ready": "starting: no subnet lease held yet",
        "peers": {},
        "ignored_peers": {},
        "backend": None,
    }
    text = statuscmd.format_status(doc)
    assert text.splitlines() == [
        "flanneld-py 0.1.0, up 5s",
        "lease      none yet",
        "backend    not set up yet",
        "etcd       http://10.0.0.1:2379 (v3), WATCH NOT LIVE (4 errors)",
        "alive      starting: no subnet lease held yet",
        "ready      starting: no subnet lease held yet",
        "peers      none",
    ]


def test_format_status_gives_each_udp_peer_its_traffic() -> None:
    doc = {
        "version": "0.1.0",
        "lease": None,
        "peers": {"10.5.7.0/24": "10.99.0.12", "10.5.8.0/24": "10.99.0.13"},
        "backend": {
            "type": "udp",
            "device": "flannel0",
            "peers": {
                "10.5.7.0/24": {"public_ip": "10.99.0.12", "tx_packets": 5, "tx_bytes": 3072,
                                "rx_packets": 2, "rx_bytes": 100},
                "10.5.8.0/24": {"public_ip": "10.99.0.13"},  # not counted
            },
        },
    }  # fmt: skip
    lines = statuscmd.format_status(doc).splitlines()
    assert (
        "  10.5.7.0/24        via 10.99.0.12 (sent 5 pkts / 3.0 KiB, received 2 pkts / 100 B)"
        in lines
    )
    assert "  10.5.8.0/24        via 10.99.0.13" in lines


def test_durations() -> None:
    d = statuscmd.duration
    assert [d(0), d(59.6), d(61), d(3600), d(86399), d(90000)] == [
        "0s",
        "59s",
        "1m",
        "1h 00m",
        "23h 59m",
        "1d 01h",
    ]
    assert d(90000, days=False) == "25h 00m"
    assert statuscmd.size(5) == "5 B" and statuscmd.size(1536) == "1.5 KiB"


def test_module_is_runnable() -> None:
    if shutil.which(sys.executable) is None:
        pytest.skip("no interpreter path")
    proc = subprocess.run(
        [sys.executable, "-m", "flanneld_py.statuscmd", "--control-socket", "/nonexistent/x.sock"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stderr == NOT_RUNNING.format("/nonexistent/x.sock")


def test_backend_line_names_engine_threads() -> None:
    engine = {"kind": "c", "udp_rx_packets": 5}
    backend = {"type": "udp", "device": "flannel0", "port": 8285, "engine": engine,
               "offloads": {"active": ["udp_gso"]}}  # fmt: skip
    assert statuscmd._backend_line(backend) == (
        "udp on flannel0 port 8285, engine c (offloads: udp_gso)"
    )
    engine["threads"] = [{"udp_rx_packets": 2}, {"udp_rx_packets": 3}]
    assert statuscmd._backend_line(backend) == (
        "udp on flannel0 port 8285, engine c x 2 threads (offloads: udp_gso)"
    )
