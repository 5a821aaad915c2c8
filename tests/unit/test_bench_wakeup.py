"""bench/wakeup.py's probe: it measures something, and says so when it cannot."""

from __future__ import annotations

import os

import pytest

from bench import report
from bench.wakeup import wakeup_round_trips


def test_the_probe_measures_both_placements() -> None:
    w = wakeup_round_trips(rounds=30, gap=0)
    assert w["rounds"] == 30
    assert 0 < w["same_cpu_us"] < 1_000_000
    if len(os.sched_getaffinity(0)) > 1:
        assert 0 < w["cross_cpu_us"] < 1_000_000
    else:
        assert w["cross_cpu_us"] is None


def test_the_probe_restores_this_process_affinity() -> None:
    before = os.sched_getaffinity(0)
    wakeup_round_trips(rounds=5, gap=0)
    assert os.sched_getaffinity(0) == before


def test_a_probe_that_cannot_pin_reports_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int, cpus: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    w = wakeup_round_trips(rounds=5, gap=0)
    assert w == {"error": "wake-up probe failed: [Errno 1] Operation not permitted"}


def test_the_report_sentence() -> None:
    m = {
        "wakeup_start": {"same_cpu_us": 34.5, "cross_cpu_us": 112.1, "rounds": 300},
        "wakeup_end": {"same_cpu_us": 30.0, "cross_cpu_us": None, "rounds": 300},
    }
    (line,) = report._wakeup_lines(m)
    assert "at start 34.5 µs on one CPU, 112.1 µs across CPUs" in line
    assert "at end 30 µs on one CPU, — across CPUs" in line
    assert report._wakeup_lines({}) == []
    (err,) = report._wakeup_lines({"wakeup_start": {"error": "wake-up probe failed: x"}})
    assert "at start: wake-up probe failed: x" in err
