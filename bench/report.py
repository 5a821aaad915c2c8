"""Turn the raw runs into a summary, ``results.md`` and ``results.png``.

Every throughput cell is min / median / max over the repeats of one run, and every ratio is a
median divided by the kernel VXLAN median *of the same run and the same test*: on a shared 2-core
machine absolute figures move with whatever else runs, ratios much less.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.measure import TEST_TITLES
from bench.paths import PATH_TITLES, REFERENCE

__all__ = ["markdown", "summarize", "write_chart"]

TIMES = "\u00d7"  # the multiplication sign, as in perf-notes ("0.65 \u00d7 VXLAN")


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{test: {path: {"min", "median", "max", "n", "ratio", ...}}}`` from ``results["runs"]``."""
    args = results["args"]
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for test in args["tests"]:
        per_path: dict[str, dict[str, Any]] = {}
        for path in args["paths"]:
            runs = [r for r in results["runs"] if r["test"] == test and r["path"] == path]
            ok = [r for r in runs if r.get("ok")]
            if test == "ping":
                vals = [x for r in ok for x in r.get("rtts_ms", [])]
            else:
                vals = [r["gbps"] for r in ok]
            s: dict[str, Any] = {
                "n": len(ok),
                "attempted": len(runs),
                "min": min(vals) if vals else None,
                "median": _median(vals),
                "max": max(vals) if vals else None,
                "unit": "ms" if test == "ping" else "Gbit/s",
            }
            if test == "ping":
                sent = sum(r.get("sent", 0) for r in runs)
                s["sent"] = sent
                s["replies"] = len(vals)
                s["loss_pct"] = 100.0 * (1 - len(vals) / sent) if sent else None
                if len(vals) >= 2:
                    deciles = statistics.quantiles(vals, n=10)
                    s["p10"], s["p90"] = deciles[0], deciles[-1]
                else:
                    s["p10"] = s["p90"] = s["median"]
            elif test.startswith("tcp"):
                s["retransmits_median"] = _median(
                    [r["retransmits"] for r in ok if r.get("retransmits") is not None]
                )
            else:
                s["loss_pct_median"] = _median(
                    [r["lost_percent"] for r in ok if r.get("lost_percent") is not None]
                )
                s["sender_gbps_median"] = _median([r["sender_gbps"] for r in ok])
            if test != "ping":
                for host in ("A", "B"):
                    cpu = [
                        r["proc_cpu_pct"][host]
                        for r in ok
                        if r.get("proc_cpu_pct", {}).get(host) is not None
                    ]
                    s[f"cpu_{host}_median"] = _median(cpu)
                s["machine_busy_median"] = _median(
                    [r["machine_busy_pct"] for r in ok if r.get("machine_busy_pct") is not None]
                )
            per_path[path] = s
        ref = per_path.get(REFERENCE, {}).get("median")
        for s in per_path.values():
            s["ratio"] = s["median"] / ref if ref and s["median"] is not None else None
        summary[test] = per_path
    return summary


# ---------------------------------------------------------------------------------------------
# markdown


def _g(v: float | None) -> str:
    """A throughput or RTT figure with ~3 significant digits."""
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _ratio(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def _pct(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _cpu(s: dict[str, Any]) -> str:
    a, b = s.get("cpu_A_median"), s.get("cpu_B_median")
    if a is None and b is None:
        return "—"
    return f"{_pct(a)} / {_pct(b)}"


def _mmm(s: dict[str, Any]) -> list[str]:
    """min, **median**, max and the ratio cells."""
    if s["median"] is None:
        return ["—", "failed" if s["attempted"] else "not run", "—", "—"]
    return [_g(s["min"]), f"**{_g(s['median'])}**", _g(s["max"]), _ratio(s["ratio"])]


def _cpu_cells(s: dict[str, Any]) -> list[str]:
    return [_cpu(s), _pct(s.get("machine_busy_median")), f"{s['n']}/{s['attempted']}"]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _wakeup_lines(m: dict[str, Any]) -> list[str]:
    """The machine's wake-up costs (bench/wakeup.py), at start and end, as one sentence."""
    parts = []
    for when in ("start", "end"):
        w = m.get(f"wakeup_{when}")
        if not w:
            continue
        if "error" in w:
            parts.append(f"at {when}: {w['error']}")
            continue
        cross = w.get("cross_cpu_us")
        cross_text = "—" if cross is None else f"{cross:g} µs"
        parts.append(f"at {when} {w['same_cpu_us']:g} µs on one CPU, {cross_text} across CPUs")
    if not parts:
        return []
    return [
        "Waking a process (bench/wakeup.py: pipe ping-pong after 2 ms idle, two wake-ups per "
        "round trip, median): " + "; ".join(parts) + ". Each hop through a userspace "
        "forwarder adds a wake-up that the kernel's own paths do not have."
    ]


def markdown(results: dict[str, Any]) -> str:
    args = results["args"]
    m = results["machine"]
    summary = results["summary"]
    ref_title = f"{TIMES} {REFERENCE.upper() if REFERENCE == 'vxlan' else REFERENCE}"
    lines = [
        f"# flanneld-py bench — {results['started']}",
        "",
        f"Underlay MTU {args['mtu']}, underlay offloads **{args['underlay_offloads']}**"
        + (" (veth defaults)" if args["underlay_offloads"] == "on" else " (ethtool -K ... off)")
        + f"; iperf3 {args['time']:g} s {TIMES} {args['repeats']} repeat(s), "
        + "container A → container B (underlay path: host A → host B), paths interleaved.",
        f"Kernel {m['kernel']}, {m['cpus']} CPUs ({m['cpu_model']}), {m['iperf3']}, "
        f"git {m['git_commit']}. Load average at start {m['loadavg_start']}, "
        f"at end {m.get('loadavg_end', '?')}.",
        *_wakeup_lines(m),
        "",
        f"Figures are min / median / max over the repeats. **{ref_title}** = this path's median "
        f"÷ the kernel VXLAN median of the same test in this run (for ping: RTT ratio, lower is "
        f"better). Compare ratios, not absolute figures: the machine is shared and small.",
    ]
    if results.get("interrupted"):
        lines += ["", "**Interrupted: partial results.**"]
    ref_ok = (
        any(summary[t].get(REFERENCE, {}).get("median") is not None for t in summary if t != "ping")
        or summary.get("ping", {}).get(REFERENCE, {}).get("median") is not None
    )
    if not ref_ok:
        lines += ["", f"No {REFERENCE} figures in this run: ratios cannot be given."]
    cpu_cols = ["flanneld CPU % A / B", "machine busy %", "n"]
    for test, per_path in summary.items():
        title = TEST_TITLES.get(test, test)
        lines += [""]
        if test == "ping":
            lines += [
                f"## {title} (ms, {args['pings']} pings per repeat)",
                "",
                _row(["path", "min", "median", "max", ref_title, "loss %", "replies/sent"]),
                _row(["---"] + ["---:"] * 6),
            ]
            for path, s in per_path.items():
                extra = [_pct(s.get("loss_pct"), 1), f"{s['replies']}/{s['sent']}"]
                lines.append(_row([path, *_mmm(s), *extra]))
            continue
        if test == "udp":
            lines += [
                f"## {title}: -u -b {args['udp_rate']} -l {args['udp_len']}"
                + (f" -w {args['udp_window']}" if args.get("udp_window") else "")
                + " (received Gbit/s)",
                "",
                _row(
                    [
                        "path",
                        "min",
                        "median",
                        "max",
                        ref_title,
                        "sent (median)",
                        "loss % (median)",
                        *cpu_cols,
                    ]
                ),
                _row(["---"] + ["---:"] * 9),
            ]
            for path, s in per_path.items():
                sent = _g(s.get("sender_gbps_median"))
                extra = [sent, _pct(s.get("loss_pct_median"), 2), *_cpu_cells(s)]
                lines.append(_row([path, *_mmm(s), *extra]))
            continue
        lines += [
            f"## {title} (Gbit/s, receiver)",
            "",
            _row(["path", "min", "median", "max", ref_title, "retransmits (median)", *cpu_cols]),
            _row(["---"] + ["---:"] * 8),
        ]
        for path, s in per_path.items():
            extra = [_pct(s.get("retransmits_median")), *_cpu_cells(s)]
            lines.append(_row([path, *_mmm(s), *extra]))
    if any(t != "ping" for t in summary):
        lines += [
            "",
            "flanneld CPU % A / B: utime+stime of the flanneld-py process (all threads, plus "
            "reaped children) on the sending / receiving host during the iperf3 run, in % of one "
            "core. Machine busy %: all cores together (100 = both cores busy), a noise indicator.",
        ]
    lines += [
        "",
        "Paths: " + "; ".join(f"`{p}` = {PATH_TITLES.get(p, p)}" for p in args["paths"]) + ".",
    ]
    failures = [(p, info["error"]) for p, info in results["paths"].items() if info.get("error")]
    run_errors = [r for r in results["runs"] if not r.get("ok")]
    if failures or run_errors:
        lines += ["", "## Failures", ""]
        for p, err in failures:
            first, _, rest = err.partition("\n")
            lines.append(f"- **{p}**: {first}")
            if rest:
                lines += ["", "  ```", *("  " + x for x in rest.splitlines()), "  ```"]
        for r in run_errors:
            lines.append(f"- {r['path']} {r['test']} repeat {r['repeat'] + 1}: {r.get('error')}")
    if results.get("chart"):
        lines += ["", f"![chart]({results['chart']})"]
    elif results.get("chart_error"):
        lines += ["", f"(no chart: {results['chart_error']})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# chart


def write_chart(results: dict[str, Any], path: Path) -> str | None:
    """Write a PNG bar chart; return None on success or a one-line reason it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError as exc:
        return f"matplotlib cannot be imported ({exc}); pip install matplotlib or `make setup`"
    summary = results["summary"]
    paths = results["args"]["paths"]
    tp_tests = [t for t in summary if t != "ping"]
    panels = (["tp", "ratio"] if tp_tests else []) + (["ping"] if "ping" in summary else [])
    if not panels:
        return "nothing to plot"
    widths = [max(1, len(tp_tests)) if p != "ping" else 1 for p in panels]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(1.0 + sum(2.0 + 1.4 * w for w in widths), 4.6),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    cmap = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(paths))
    for ax, panel in zip(axes[0], panels, strict=True):
        tests = ["ping"] if panel == "ping" else tp_tests
        for i, p in enumerate(paths):
            xs, ys, lo, hi, labels = [], [], [], [], []
            for j, t in enumerate(tests):
                s = summary[t].get(p, {})
                val = s.get("ratio") if panel == "ratio" else s.get("median")
                if val is None:
                    continue
                xs.append(j + (i - (len(paths) - 1) / 2) * width)
                ys.append(val)
                if panel == "ratio":
                    lo.append(0.0)
                    hi.append(0.0)
                    labels.append(_ratio(val))
                else:
                    # ping: 10th-90th percentile (single slow replies would flatten the panel)
                    low, high = (s["p10"], s["p90"]) if panel == "ping" else (s["min"], s["max"])
                    lo.append(max(0.0, val - low))
                    hi.append(max(0.0, high - val))
                    labels.append(_g(val))
            if not xs:
                continue
            bars = ax.bar(
                xs, ys, width, label=p, color=cmap(i % 10),
                yerr=None if panel == "ratio" else [lo, hi], capsize=2,
            )  # fmt: skip
            ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(tests)))
        ax.set_xticklabels(tests)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        if panel == "tp":
            ax.set_ylabel("Gbit/s (median; whiskers min-max)")
            ax.set_title("throughput")
        elif panel == "ratio":
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_ylabel(f"median ÷ {REFERENCE} median")
            ax.set_title(f"ratio to kernel {REFERENCE} (same run)")
        else:
            ax.set_ylabel("RTT ms (median; whiskers 10th-90th percentile)")
            ax.set_title("ping RTT, container A → B")
        ax.margins(y=0.25)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels) or 1, fontsize=8)
    args = results["args"]
    fig.suptitle(
        f"flanneld-py bench {results['started']} — MTU {args['mtu']}, underlay offloads "
        f"{args['underlay_offloads']}, {args['time']:g} s {TIMES} {args['repeats']}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
