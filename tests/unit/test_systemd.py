"""sd_notify against a real AF_UNIX datagram socket, and the shipped unit files."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flanneld_py import systemd

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "flanneld-py.service"
DROPIN = ROOT / "systemd" / "docker.service.d" / "10-flanneld-py.conf"


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd; NOTIFY_SOCKET points at it."""
    path = tmp_path / "notify"
    short_dir = None
    if len(str(path)) > 100:  # sun_path is 108 bytes
        short_dir = tempfile.mkdtemp(prefix="sdn")
        path = Path(short_dir) / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)


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
    assert "docker.service" in " ".join(values(unit, "Install", "RequiredBy")).split()


def test_docker_dropin_has_the_required_settings() -> None:
    unit = parse_unit(DROPIN)
    assert values(unit, "Unit", "After") == ["flanneld-py.service"]
    assert values(unit, "Unit", "Requires") == ["flanneld-py.service"]
    assert values(unit, "Service", "EnvironmentFile") == ["-/run/flannel/docker"]
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
