"""One measurement each: an iperf3 run between two namespaces, a ping series, CPU time of a process.

Everything here returns plain dicts (JSON-ready) and never raises for a failed measurement: the
failure is recorded as ``{"ok": False, "error": "..."}`` so the run carries on with the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from lab.netns import LabError, Netns, ping_argv, wait_for

__all__ = [
    "IPERF_PORT",
    "TESTS",
    "TEST_TITLES",
    "CpuClock",
    "iperf3_version",
    "machine_cpu_ticks",
    "ping_series",
    "proc_cpu_seconds",
    "run_iperf3",
]

IPERF_PORT = 5201  # every server runs in a namespace of its own: the port is never contended

#: the tests, in the order they run within a repeat (ping first, while the paths are idle)
TESTS = ("tcp1", "tcp4", "udp", "ping")
TEST_TITLES = {
    "tcp1": "TCP, 1 stream",
    "tcp4": "TCP, 4 streams (-P 4)",
    "udp": "UDP at a fixed offered rate",
    "ping": "Ping RTT",
}

CLK_TCK = os.sysconf("SC_CLK_TCK")


def iperf3_version() -> str:
    exe = shutil.which("iperf3")
    if exe is None:
        return "(not installed)"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].strip() if out else "(unknown)"


# ---------------------------------------------------------------------------------------------
# CPU accounting


def proc_cpu_seconds(pid: int) -> float | None:
    """utime+stime (all threads) plus cutime+cstime (reaped children, e.g. iptables calls) of
    ``pid``, in seconds; None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # after the command name: fields[0] is state (field 3); utime is field 14 -> index 11
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already part of user
    return total - idle, total


class CpuClock:
    """Snapshot CPU time of some processes and of the machine; ``share()`` gives percentages over
    the wall time between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = 0.0
        self._wall = 0.0
        self._cpu0: dict[str, float | None] = {}
        self._cpu1: dict[str, float | None] = {}
        self._m0 = (0, 0)
        self._m1 = (0, 0)

    def start(self) -> None:
        self._cpu0 = {k: proc_cpu_seconds(p) for k, p in self.pids.items()}
        self._m0 = machine_cpu_ticks()
        self._t0 = time.monotonic()

    def stop(self) -> None:
        self._wall = time.monotonic() - self._t0
        self._cpu1 = {k: proc_cpu_seconds(p) for k, p in self.pids.items()}
        self._m1 = machine_cpu_ticks()

    def result(self) -> dict[str, Any]:
        """``{"wall_s", "machine_busy_pct", "proc_cpu_pct": {name: % of one core}}``."""
        procs: dict[str, float | None] = {}
        for k in self.pids:
            a, b = self._cpu0.get(k), self._cpu1.get(k)
            procs[k] = (
                None if a is None or b is None or self._wall <= 0 else 100.0 * (b - a) / self._wall
            )
        busy = self._m1[0] - self._m0[0]
        total = self._m1[1] - self._m0[1]
        return {
            "wall_s": round(self._wall, 3),
            # of all cores together: 100 = the whole machine busy
            "machine_busy_pct": round(100.0 * busy / total, 1) if total > 0 else None,
            "proc_cpu_pct": {k: None if v is None else round(v, 1) for k, v in procs.items()},
        }


# ---------------------------------------------------------------------------------------------
# iperf3


def _wait_listening(ns: Netns, port: int, server: subprocess.Popen[bytes]) -> None:
    def listening() -> bool:
        if server.poll() is not None:
            raise LabError(f"iperf3 server exited early (rc={server.returncode})")
        out = ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        return bool(out.strip())

    wait_for(listening, timeout=10.0, interval=0.05, what=f"iperf3 server on port {port}")


def _iperf_flags(test: str, udp_rate: str, udp_len: int, udp_window: str | None) -> list[str]:
    if test == "tcp1":
        return []
    if test == "tcp4":
        return ["-P", "4"]
    if test == "udp":
        return ["-u", "-b", udp_rate, "-l", str(udp_len)] + (
            ["-w", udp_window] if udp_window else []
        )
    raise ValueError(test)


def run_iperf3(
    client: Netns,
    server: Netns,
    target: str,
    test: str,
    *,
    seconds: float,
    udp_rate: str,
    udp_len: int,
    udp_window: str | None = None,
    cpu_pids: dict[str, int],
    raw_path: Path | None,
) -> dict[str, Any]:
    """One iperf3 test ``client`` -> ``target`` (an address of ``server``).

    The server is started for this one test (``-1``) and stopped by PID afterwards. Returns the
    figures (Gbit/s at the receiver, sender rate, retransmits or UDP loss, CPU shares); the full
    iperf3 JSON is written to ``raw_path``.
    """
    rec: dict[str, Any] = {"ok": False, "error": None}
    lab = server.lab
    srv = server.popen(["iperf3", "-s", "-1", "-J", "-p", str(IPERF_PORT)], stop_timeout=2.0)
    clock = CpuClock(cpu_pids)
    try:
        _wait_listening(server, IPERF_PORT, srv)
        argv = [
            "iperf3", "-c", target, "-p", str(IPERF_PORT), "-J",
            "-t", f"{seconds:g}", "--connect-timeout", "5000",
            *_iperf_flags(test, udp_rate, udp_len, udp_window),
        ]  # fmt: skip
        clock.start()
        try:
            proc = client.run(argv, check=False, timeout=seconds + 40)
        finally:
            clock.stop()
        rec.update(clock.result())
        if raw_path is not None:
            raw_path.write_text(proc.stdout or proc.stderr or "")
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            err = (proc.stderr or proc.stdout or "").strip().splitlines()
            rec["error"] = f"iperf3 rc={proc.returncode}: " + (err[-1] if err else "no output")
            return rec
        if data.get("error"):
            rec["error"] = f"iperf3: {data['error']}"
            return rec
        rec.update(_iperf_figures(data, test))
        rec["ok"] = True
    except subprocess.TimeoutExpired:
        rec["error"] = f"iperf3 did not finish within {seconds + 40:.0f}s (killed)"
    except LabError as exc:
        rec["error"] = str(exc)
    finally:
        lab.stop(srv, timeout=2.0)
    return rec


def _iperf_figures(data: dict[str, Any], test: str) -> dict[str, Any]:
    end = data.get("end", {})
    sent = end.get("sum_sent") or end.get("sum") or {}
    recv = end.get("sum_received") or end.get("sum") or {}
    out: dict[str, Any] = {
        "gbps": recv.get("bits_per_second", 0.0) / 1e9,
        "sender_gbps": sent.get("bits_per_second", 0.0) / 1e9,
        "bytes_received": recv.get("bytes"),
        "seconds": recv.get("seconds"),
        "iperf_cpu_pct": end.get("cpu_utilization_percent"),
        # per-second samples as the client reports them (its own, i.e. sender-side, rates)
        "intervals_gbps": [
            round(iv.get("sum", {}).get("bits_per_second", 0.0) / 1e9, 4)
            for iv in data.get("intervals", [])
        ],
    }
    if test.startswith("tcp"):
        out["retransmits"] = sent.get("retransmits")
        streams = end.get("streams") or []
        rtts = [s["sender"].get("mean_rtt") for s in streams if s.get("sender", {}).get("mean_rtt")]
        if rtts:
            out["tcp_mean_rtt_us"] = statistics.median(rtts)
    else:
        out["lost_packets"] = recv.get("lost_packets")
        out["packets"] = recv.get("packets")
        out["lost_percent"] = recv.get("lost_percent")
        out["jitter_ms"] = recv.get("jitter_ms")
    return out


# ---------------------------------------------------------------------------------------------
# ping

_TIME_RE = re.compile(r"time[=<]([0-9.]+) ?ms")


def ping_series(client: Netns, target: str, count: int, interval: float) -> dict[str, Any]:
    """``count`` pings ``client`` -> ``target``; returns every RTT (ms) and the loss."""
    rec: dict[str, Any] = {"ok": False, "error": None}
    try:
        argv = ping_argv("-c", count, "-i", f"{interval:g}", "-W", 2, target)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc = client.run(argv, check=False, timeout=count * interval + 15)
            rtts = [float(m.group(1)) for m in _TIME_RE.finditer(proc.stdout)]
            rec.update(rtts_ms=rtts, sent=count, received=len(rtts))
            if rtts:
                rec.update(ok=True, median_ms=statistics.median(rtts))
            else:
                rec["error"] = "no ping reply: " + (proc.stdout + proc.stderr).strip()[-200:]
            return rec
        rec["error"] = "ping did not finish in time"
    except LabError as exc:
        rec["error"] = str(exc)
    return rec
