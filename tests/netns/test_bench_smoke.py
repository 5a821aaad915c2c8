"""Smoke test of the bench (`python -m bench.run`): a tiny run over the two kernel paths produces
results.json and results.md with ratios to kernel VXLAN, and leaves nothing behind.

No timing is asserted: the machine is shared, only the shape of the output is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.netns import lab_namespaces

ROOT = Path(__file__).resolve().parents[2]


def test_bench_underlay_and_vxlan_smoke(tmp_path: Path) -> None:
    if shutil.which("iperf3") is None:
        why = "needs iperf3 (apt-get install iperf3, or `make setup`)"
        if os.environ.get("FLANNELD_TEST_REQUIRE_ALL") == "1":
            pytest.fail(f"FLANNELD_TEST_REQUIRE_ALL=1 but {why}", pytrace=False)
        pytest.skip(why)
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "bench.run",
        "--paths", "underlay,vxlan", "--tests", "tcp1",
        "--time", "1", "--repeats", "1", "--pause", "0",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["args"]["paths"] == ["underlay", "vxlan"]
    assert results["machine"]["kernel"] and results["machine"]["iperf3"]
    for when in ("start", "end"):  # the wake-up probe ran, and its figures are in the header
        w = results["machine"][f"wakeup_{when}"]
        assert w["same_cpu_us"] > 0 and w["rounds"] == 300, w
        assert (w["cross_cpu_us"] is None) == (len(os.sched_getaffinity(0)) == 1), w
    runs = results["runs"]
    assert {(r["path"], r["test"]) for r in runs} == {("underlay", "tcp1"), ("vxlan", "tcp1")}
    assert all(r["ok"] and r["gbps"] > 0 for r in runs), runs
    assert all(isinstance(r.get("retransmits"), int) for r in runs)
    assert (out / "raw" / "vxlan-tcp1-r1.json").exists()
    summary = results["summary"]["tcp1"]
    assert summary["vxlan"]["ratio"] == pytest.approx(1.0)
    assert summary["underlay"]["ratio"] > 0
    # nothing left behind
    assert results["teardown"] == {"clean": True, "leftovers": []}
    for name in ("underlay", "vxlan"):
        prefix = results["paths"][name]["info"]["lab_prefix"]
        assert lab_namespaces(prefix + "-") == []

    md = (out / "results.md").read_text()
    w = results["machine"]["wakeup_start"]
    assert f"at start {w['same_cpu_us']:g} µs on one CPU" in md
    assert md.strip() in proc.stdout  # the tables are printed at the end
    header = next(line for line in md.splitlines() if line.startswith("| path |"))
    assert "\u00d7 VXLAN" in header
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 1.00 |" in rows["vxlan"]
    # the chart is optional (matplotlib may be missing) but then the reason is recorded
    assert (out / "results.png").exists() or results.get("chart_error")
