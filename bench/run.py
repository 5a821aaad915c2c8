"""``python -m bench.run``: iperf3 container A -> container B over every path, in one run.

Builds one lab (two host namespaces on an underlay, a docker0-like bridge and a container on each
host) per path, then interleaves the tests: for each repeat, for each test, every path in turn
(path order rotated per repeat), so noise from other work on the machine hits all paths alike.
Writes ``results.json`` (every figure), ``results.md`` (tables with ratios to kernel VXLAN) and
``results.png`` into ``--out`` (default ``bench/results/<timestamp>/``) and prints the tables.

See bench/README.md. Needs root, iperf3, iproute2, ethtool (for ``--underlay-offloads off``) and,
for the flanneld paths, etcd.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.measure import TESTS, iperf3_version, ping_series, run_iperf3
from bench.paths import PATHS, REFERENCE, BenchPath, build
from bench.wakeup import wakeup_round_trips
from lab.netns import lab_namespaces

__all__ = ["main", "parse_args"]

REPO = Path(__file__).resolve().parent.parent


def _csv(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if "all" in items:
            return list(choices)
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad) or '(empty)'}; choose from {','.join(choices)} or all"
            )
        return [c for c in choices if c in items]  # canonical order, no duplicates

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="iperf3 between two containers on two namespace hosts: flanneld-py vs kernel "
        "VXLAN, plain routes and the bare underlay. Needs root.",
    )
    p.add_argument(
        "--paths",
        type=_csv(PATHS),
        default=list(PATHS),
        help=f"comma list of {','.join(PATHS)} (default: all)",
    )
    p.add_argument(
        "--tests",
        type=_csv(TESTS),
        default=list(TESTS),
        help=f"comma list of {','.join(TESTS)} (default: all)",
    )
    p.add_argument("--repeats", type=int, default=3, help="repeats per test and path (default 3)")
    p.add_argument("--time", type=float, default=10.0, help="seconds per iperf3 run (default 10)")
    p.add_argument("--mtu", type=int, default=1500, help="underlay MTU (default 1500)")
    p.add_argument(
        "--underlay-offloads",
        choices=("on", "off"),
        default="on",
        help="on = veth defaults; off = ethtool -K off for TSO/GSO/GRO/UDP (tunnel) "
        "segmentation on the underlay veths (default on)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default bench/results/<timestamp>/)",
    )
    p.add_argument("--udp-rate", default="1G", help="offered rate of the udp test (default 1G)")
    p.add_argument(
        "--udp-len", type=int, default=1380, help="datagram size of the udp test (default 1380)"
    )
    p.add_argument(
        "--udp-window",
        default=None,
        help="socket buffer for the udp test (iperf3 -w, e.g. 4M; default: iperf3's)",
    )
    p.add_argument("--pings", type=int, default=20, help="pings per path and repeat (default 20)")
    p.add_argument(
        "--ping-interval", type=float, default=0.2, help="seconds between pings (default 0.2)"
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=30.0,
        help="seconds flanneld-py has to write its subnet file (default 30)",
    )
    p.add_argument(
        "--pause",
        type=float,
        default=0.5,
        help="seconds of quiet between two measurements (default 0.5)",
    )
    p.add_argument("--no-chart", action="store_true", help="do not write results.png")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    if not 0.5 <= a.time <= 3600:
        p.error("--time must be between 0.5 and 3600 seconds")
    if not 1280 <= a.mtu <= 65535:
        p.error("--mtu must be between 1280 and 65535")
    if not 64 <= a.udp_len <= 65000:
        p.error("--udp-len must be between 64 and 65000")
    if a.pings < 1 or a.ping_interval < 0.01:
        p.error("--pings must be >= 1 and --ping-interval >= 0.01")
    return a


def _preflight(args: argparse.Namespace) -> str | None:
    if os.geteuid() != 0:
        return "the bench needs root (network namespaces): run as root, e.g. `sudo make bench`"
    needs = ["ip", "bridge", "ss"]
    if any(t != "ping" for t in args.tests):
        needs.append("iperf3")
    if args.underlay_offloads == "off":
        needs.append("ethtool")
    for tool in needs:
        if shutil.which(tool) is None:
            pkg = {"iperf3": "iperf3", "ethtool": "ethtool"}.get(tool, "iproute2")
            return f"`{tool}` not found: apt-get install {pkg} (or `make setup`)"
    if "ping" in args.tests and not (shutil.which("ping") or shutil.which("busybox")):
        return "no ping: apt-get install iputils-ping or busybox-static"
    return None


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _machine() -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD") or "(no commit)"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    if dirty:
        commit += " (+ uncommitted changes)"
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "hostname": platform.node(),
        "iperf3": iperf3_version(),
        "python": sys.version.split()[0],
        "git_commit": commit,
        "loadavg_start": _loadavg(),
        "wakeup_start": wakeup_round_trips(),
    }


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _default_out() -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = REPO / "bench" / "results" / stamp
    n = 1
    while out.exists():
        n += 1
        out = REPO / "bench" / "results" / f"{stamp}-{n}"
    return out


class _Terminated(KeyboardInterrupt):
    """SIGTERM: unwind like Ctrl-C so every lab is torn down."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def _log(msg: str) -> None:
    print(msg, flush=True)


def _measure(
    args: argparse.Namespace, paths: list[BenchPath], results: dict[str, Any], raw: Path
) -> None:
    iperf_tests = [t for t in args.tests if t != "ping"]
    live = [bp for bp in paths if bp.ok]
    total = args.repeats * len(live) * len(args.tests)
    eta = (
        args.repeats
        * len(live)
        * (
            len(iperf_tests) * (args.time + 1.5 + args.pause)
            + ("ping" in args.tests) * (args.pings * args.ping_interval + 1)
        )
    )
    _log(f"bench: {total} measurements, about {eta / 60:.1f} min")
    n = 0
    for rep in range(args.repeats):
        order = live[rep % len(live) :] + live[: rep % len(live)] if live else []
        for test in (["ping"] if "ping" in args.tests else []) + iperf_tests:
            for bp in order:
                n += 1
                _measure_one(args, bp, test, rep, f"[{n}/{total}]", results, raw)
                time.sleep(args.pause)


def _measure_one(
    args: argparse.Namespace,
    bp: BenchPath,
    test: str,
    rep: int,
    label: str,
    results: dict[str, Any],
    raw: Path,
) -> None:
    """One measurement of ``test`` on ``bp``; appends its record to ``results["runs"]``."""
    rec: dict[str, Any] = {"path": bp.name, "test": test, "repeat": rep}
    results["runs"].append(rec)
    if bp.ok and (dead := bp.dead_daemon()):
        bp.error = dead
        results["paths"][bp.name]["error"] = dead
        _log(f"bench: {bp.name}: {dead}")
    if not bp.ok:
        rec.update(ok=False, error="path broken earlier (see Failures)")
        return
    assert bp.client is not None and bp.server is not None
    rec["started"] = dt.datetime.now().isoformat(timespec="seconds")
    try:
        if test == "ping":
            rec.update(ping_series(bp.client, bp.target, args.pings, args.ping_interval))
        else:
            rec.update(
                run_iperf3(
                    bp.client,
                    bp.server,
                    bp.target,
                    test,
                    seconds=args.time,
                    udp_rate=args.udp_rate,
                    udp_len=args.udp_len,
                    udp_window=args.udp_window,
                    cpu_pids=bp.daemon_pids(),
                    raw_path=raw / f"{bp.name}-{test}-r{rep + 1}.json",
                )
            )
    except Exception as exc:  # one failed measurement must not end the run
        rec.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    if not rec.get("ok"):
        shown = f"FAILED: {rec.get('error')}"
    elif test == "ping":
        shown = f"{rec['median_ms']:.3f} ms"
    else:
        shown = f"{rec['gbps']:.3f} Gbit/s"
        if test == "udp":
            shown += f" (sent {rec['sender_gbps']:.3f}), loss {rec.get('lost_percent') or 0:.2f} %"
        elif rec.get("retransmits") is not None:
            shown += f", {rec['retransmits']} retr"
        cpu = {k: v for k, v in (rec.get("proc_cpu_pct") or {}).items() if v is not None}
        if cpu:
            shown += ", flanneld CPU " + " / ".join(f"{k} {v:.0f}%" for k, v in cpu.items())
    _log(f"{label} repeat {rep + 1} {test:<5} {bp.name:<16} {shown}")


def _log_line(log: Path, marker: str) -> Any:
    """From the last line of a flanneld-py log containing ``marker``: the ``k=v`` integer pairs
    after it if there are any (engine counters), else the text after it; None if no such line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        _, sep, rest = line.partition(marker)
        if sep:
            pairs = [kv.split("=", 1) for kv in rest.split() if "=" in kv]
            ints = {k: int(v) for k, v in pairs if v.lstrip("-").isdigit()}
            return ints or rest.strip(" :")
    return None


def _teardown(paths: list[BenchPath], results: dict[str, Any]) -> None:
    leftovers: list[str] = []
    for bp in paths:
        if bp.lab is None:
            continue
        bp.lab.close()
        leftovers += [f"namespace {n}" for n in lab_namespaces(bp.lab.prefix + "-")]
        leftovers += [
            f"process {p.pid} ({' '.join(map(str, p.args[4:6]))})"  # type: ignore[index]
            for p in bp.lab.processes
            if p.poll() is None
        ]
        leftovers += bp.lab.cleanup_errors
        if bp.daemons and bp.name in results["paths"]:
            entry = results["paths"][bp.name]
            entry["daemon_exit_codes"] = {k: p.returncode for k, p in bp.daemons.items()}
            entry["engine_counters"] = {
                k: _log_line(Path(f), "engine counters at exit:") for k, f in bp.log_files.items()
            }
            entry["data_plane_line"] = {
                k: _log_line(Path(f), "data plane up") for k, f in bp.log_files.items()
            }
    results["teardown"] = {"clean": not leftovers, "leftovers": leftovers}
    if leftovers:
        _log("bench: WARNING: teardown left " + "; ".join(leftovers))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = _preflight(args)
    if why:
        print(f"bench: {why}", file=sys.stderr)
        return 2
    out: Path = args.out or _default_out()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)
        (out / "raw").mkdir(exist_ok=True)
    except OSError as exc:
        print(f"bench: cannot create output directory {out}: {exc}", file=sys.stderr)
        return 2
    if REFERENCE not in args.paths:
        _log(f"bench: note: {REFERENCE} is not among --paths, so no ratios can be given")
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    results: dict[str, Any] = {
        "bench": "flanneld-py",
        "format": 1,
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "args": {
            "paths": args.paths,
            "tests": args.tests,
            "repeats": args.repeats,
            "time": args.time,
            "mtu": args.mtu,
            "underlay_offloads": args.underlay_offloads,
            "udp_rate": args.udp_rate,
            "udp_len": args.udp_len,
            "udp_window": args.udp_window,
            "pings": args.pings,
            "ping_interval": args.ping_interval,
            "argv": sys.argv[1:] if argv is None else argv,
        },
        "machine": _machine(),
        "reference": REFERENCE,
        "paths": {},
        "runs": [],
        "interrupted": False,
    }
    paths: list[BenchPath] = []
    try:
        for name in args.paths:
            _log(f"bench: setting up {name} ...")
            bp = build(
                name,
                mtu=args.mtu,
                offloads=args.underlay_offloads,
                logs=out / "logs",
                start_timeout=args.start_timeout,
            )
            paths.append(bp)
            results["paths"][name] = {"ok": bp.ok, "error": bp.error, "info": bp.info}
            if bp.error:
                _log(f"bench: {name}: {bp.error}")
        _measure(args, paths, results, out / "raw")
    except KeyboardInterrupt:
        results["interrupted"] = True
        _log("bench: interrupted; tearing down and writing partial results")
    except Exception as exc:  # a bug here: still tear down and keep what was measured
        results["interrupted"] = True
        results["error"] = "".join(traceback.format_exception(exc))
        _log(f"bench: internal error, writing partial results:\n{results['error']}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # don't die half way through teardown
        try:
            _teardown(paths, results)
        finally:
            signal.signal(signal.SIGTERM, old_term)
    for entry in results["paths"].values():
        entry["ok"] = entry.get("error") is None
    results["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    results["machine"]["loadavg_end"] = _loadavg()
    results["machine"]["wakeup_end"] = wakeup_round_trips()
    results["summary"] = report.summarize(results)
    if not args.no_chart:
        err = report.write_chart(results, out / "results.png")
        if err is None:
            results["chart"] = "results.png"
        else:
            results["chart_error"] = err
            _log(f"bench: no chart: {err}")
    md = report.markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(md)
    _log("")
    print(md, end="")
    files = "results.json, results.md" + (", results.png" if results.get("chart") else "")
    _log(f"\nbench: wrote {files} to {out}")
    return 130 if results["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
