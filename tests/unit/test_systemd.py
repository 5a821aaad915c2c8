"""sd_notify against a real AF_UNIX datagram socket, and the shipped unit files."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flanneld_py import systemd
from tests.unit.conftest import nothing_more, python_under_sh

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "flanneld-py.service"
DROPIN = ROOT / "systemd" / "docker.service.d" / "10-flanneld-py.conf"


def test_outside_systemd_everything_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready("x") is False
    assert systemd.status("x") is False
    assert systemd.stopping() is False
    assert systemd.watchdog() is False
    assert systemd.extend_timeout(10) is False


def test_ready_with_status(notify_socket: socket.socket) -> None:
    assert systemd.ready("lease 10.5.18.0/24, 2 peers") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=lease 10.5.18.0/24, 2 peers"


def test_each_helper_sends_its_state(notify_socket: socket.socket) -> None:
    assert systemd.ready()
    assert systemd.status("waiting for\nthe network config")
    assert systemd.watchdog()
    assert systemd.extend_timeout(1.5)
    assert systemd.stopping()
    got = [notify_socket.recv(4096) for _ in range(5)]
    assert got == [
        b"READY=1",
        b"STATUS=waiting for the network config",  # one line, whatever the caller passed
        b"WATCHDOG=1",
        b"EXTEND_TIMEOUT_USEC=1500000",
        b"STOPPING=1",
    ]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"flanneld-py-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.watchdog() is True
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_unreachable_socket_returns_false_without_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # a kind we do not speak
    assert systemd.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert systemd.ready("x") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("30000000", "not-a-pid", None),
        ("1000", None, 0.0005),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert systemd.watchdog_interval() == expected


# -- unit files ----------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """section -> [(key, value)] in order (systemd allows repeated keys; no line continuations)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), [])
            continue
        assert current is not None, f"{path}: key outside a section: {line}"
        assert not line.endswith("\\"), f"{path}: keep lines unbroken: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def test_service_unit_has_the_required_settings() -> None:
    unit = parse_unit(UNIT)
    assert set(unit) == {"Unit", "Service", "Install"}
    after = " ".join(values(unit, "Unit", "After")).split()
    assert {"network-online.target", "etcd.service"} <= set(after)
    assert "network-online.target" in " ".join(values(unit, "Unit", "Wants")).split()
    assert "docker.service" in " ".join(values(unit, "Unit", "Before")).split()
    one = {k: v for k, v in unit["Service"]}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["Restart"] == "on-failure"
    assert int(one["RestartSec"]) > 0
    assert one["WatchdogSec"] == "30"
    assert values(unit, "Service", "EnvironmentFile") == [
        "-/etc/default/flanneld-py",
        "-/etc/sysconfig/flanneld",  # CentOS flannel's settings, unchanged
    ]
    assert values(unit, "Service", "ExecStart") == ["/usr/local/bin/flanneld-py $FLANNEL_OPTIONS"]
    caps = one["CapabilityBoundingSet"].split()
    assert {"CAP_NET_ADMIN", "CAP_NET_RAW"} <= set(caps)
    assert "/dev/net/tun rw" in values(unit, "Service", "DeviceAllow")
    assert "AF_NETLINK" in one["RestrictAddressFamilies"].split()
    assert one.get("PrivateDevices", "no") == "no"  # would hide /dev/net/tun
    assert one.get("ProtectSystem") in ("full", "yes")  # "strict" would make /run read-only
    assert "RuntimeDirectory" not in one  # systemd would delete /run/flannel on every stop
    # docker wants us, it does not require us: restarting or stopping us leaves docker alone
    assert "docker.service" in " ".join(values(unit, "Install", "WantedBy")).split()
    assert not values(unit, "Install", "RequiredBy")
    # the TUN and the sockets survive a restart in systemd's fd store
    assert int(one["FileDescriptorStoreMax"]) >= 2 * 64


def test_docker_dropin_has_the_required_settings() -> None:
    unit = parse_unit(DROPIN)
    assert values(unit, "Unit", "After") == ["flanneld-py.service"]
    assert values(unit, "Unit", "Wants") == ["flanneld-py.service"]
    assert not values(unit, "Unit", "Requires") and not values(unit, "Unit", "BindsTo")
    # required: without our lease since boot, docker must not start outside it
    assert values(unit, "Service", "EnvironmentFile") == ["/run/flannel/docker"]
    starts = values(unit, "Service", "ExecStart")
    assert len(starts) == 2 and starts[0] == ""  # reset, then replace
    cmd = starts[1].split()
    assert os.path.basename(cmd[0]) == "dockerd"
    assert "-H" in cmd and "fd://" in cmd
    assert "--containerd=/run/containerd/containerd.sock" in cmd
    assert cmd[-1] == "$DOCKER_NETWORK_OPTIONS"  # unquoted: split into separate arguments


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Both files load without a single warning (ExecStart paths made to exist for the check)."""
    exe = sys.executable
    (tmp_path / "docker.service.d").mkdir()
    service = UNIT.read_text().replace("ExecStart=/usr/local/bin/flanneld-py", f"ExecStart={exe}")
    (tmp_path / "flanneld-py.service").write_text(service)
    dropin = DROPIN.read_text()
    if shutil.which("dockerd", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin") is None:
        dropin = dropin.replace("ExecStart=dockerd ", f"ExecStart={exe} ")
    (tmp_path / "docker.service.d" / DROPIN.name).write_text(dropin)
    (tmp_path / "docker.service").write_text(
        "[Unit]\nDescription=stand-in for docker\n\n[Service]\nType=notify\n"
        f"ExecStart={exe} -c pass\n"
    )
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:", "SYSTEMD_LOG_COLOR": "0"}
    for name in ("flanneld-py.service", "docker.service"):
        res = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        ours = [
            line
            for line in (res.stdout + res.stderr).splitlines()
            if "flanneld-py" in line or "docker.service" in line or str(tmp_path) in line
        ]
        assert res.returncode == 0 and not ours, f"{name}: {res.stdout}{res.stderr}"


# --- the file-descriptor store ---------------------------------------------------------------


def test_fdstore_passes_the_descriptors(notify_socket: socket.socket, tmp_path: Path) -> None:
    files = [tmp_path / "a", tmp_path / "b"]
    fds = []
    for f in files:
        f.write_text(f.name)
        fds.append(os.open(f, os.O_RDONLY))
    try:
        assert systemd.fdstore(fds, "udp-tun") is True
        msg, fdlist, _, _ = socket.recv_fds(notify_socket, 4096, 8)
        try:
            assert msg == b"FDSTORE=1\nFDNAME=udp-tun"
            assert len(fdlist) == 2
            for got, sent in zip(fdlist, fds, strict=True):
                assert got != sent and os.path.samestat(os.fstat(got), os.fstat(sent))
        finally:
            for fd in fdlist:
                os.close(fd)
        assert systemd.fdstore_remove("udp-tun") is True
        assert notify_socket.recv(4096) == b"FDSTOREREMOVE=1\nFDNAME=udp-tun"
        # nothing to store, or a name systemd would refuse: nothing is sent
        assert systemd.fdstore([], "udp-tun") is False
        assert systemd.fdstore(fds, "bad:name") is False
        assert systemd.fdstore_remove("") is False
        nothing_more(notify_socket)
    finally:
        for fd in fds:
            os.close(fd)


def test_listen_fds_in_a_child_that_systemd_would_start(tmp_path: Path) -> None:
    """fds 3 and 4 named a and b, LISTEN_PID = the child's own PID (sh execs python)."""
    (tmp_path / "one").write_text("1")
    (tmp_path / "two").write_text("2")
    code = (
        "import fcntl, json, os; from flanneld_py import systemd; "
        "got = systemd.listen_fds(); "
        "print(json.dumps({'fds': got, "
        "'cloexec': [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) "
        "for v in got.values() for fd in v], "
        "'content': [os.pread(fd, 1, 0).decode() for v in got.values() for fd in v], "
        "'env': [k for k in os.environ if k.startswith('LISTEN_')]}))"
    )
    script = (
        f'LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=a:b exec "$0" -c "$1" '
        f'3<"{tmp_path}/one" 4<"{tmp_path}/two"'
    )
    out = python_under_sh(script, code)
    assert out == {"fds": {"a": [3], "b": [4]}, "cloexec": [True, True],
                   "content": ["1", "2"], "env": []}  # fmt: skip
    # the variables were meant for another process: nothing, but they are removed
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert systemd.listen_fds(env) == {} and env == {}
    assert systemd.listen_fds({"LISTEN_PID": "x", "LISTEN_FDS": "1"}) == {}


def test_own_unit_from_proc_self_cgroup() -> None:
    v1 = (
        "12:devices:/system.slice/flanneld-py.service\n"
        "1:name=systemd:/system.slice/flanneld-py.service\n"
        "0::/system.slice/flanneld-py.service\n"
    )
    assert systemd.own_unit(v1) == "flanneld-py.service"
    assert systemd.own_unit("0::/system.slice/other.service\n") == "other.service"
    assert systemd.own_unit("0::/user.slice/user-0.slice/session-3.scope\n") is None
    assert systemd.own_unit("") is None


@pytest.mark.parametrize(
    ("output", "rc", "expected"),
    [
        ("123 flanneld-py.service restart running\n", 0, True),
        ("124 flanneld-py.service stop running\n", 0, False),
        ("125 docker.service restart waiting\n", 0, False),
        ("", 0, False),
        ("123 flanneld-py.service restart running\n", 1, True),
        ("garbage", 1, False),
    ],
)
def test_restart_pending_reads_the_job_of_our_unit(
    notify_socket: socket.socket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    output: str,
    rc: int,
    expected: bool,
) -> None:
    """A stand-in `systemctl` first on PATH (the real one is exercised in tests/systemd)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "out").write_text(output)
    stub = bindir / "systemctl"
    stub.write_text(f'#!/bin/sh\necho "$@" > {bindir}/args\ncat {bindir}/out\nexit {rc}\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert systemd.restart_pending("flanneld-py.service") is expected
    args = (bindir / "args").read_text().split()
    assert args[:2] == ["list-jobs", "--no-legend"] and args[-1] == "flanneld-py.service"


def test_restart_pending_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.restart_pending("flanneld-py.service") is False
