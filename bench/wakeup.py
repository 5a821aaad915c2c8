"""What waking another process costs on this machine: a pipe ping-pong between two processes.

A userspace forwarder wakes a process at every hop (the forwarding thread on each host, then the
receiving application), where the kernel's own paths run in the sender's context. How much a
wake-up costs therefore decides most of the overlay's ping ratio, and it depends on the machine
far more than on our code: on a VM whose idle vCPUs halt, waking a process on the *other* CPU
takes an inter-processor interrupt and the host's scheduler to run that vCPU again, ten times
what a wake-up on the same CPU takes. The bench records both, at start and at end, so that a
run's ping figures can be read against the machine they were taken on.

Each figure is the median over ``rounds`` of one round trip: process A writes a byte into a pipe,
B (blocked in poll) wakes, reads it and writes one back, A (blocked in poll) wakes and reads it,
so two wake-ups. A waits ``gap`` seconds between rounds so that both CPUs go idle as they do
between pings. Python's own time per round (a few µs) is included.
"""

from __future__ import annotations

import contextlib
import os
import select
import statistics
import time
from typing import Any

__all__ = ["wakeup_round_trips"]


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def _round_trips(cpu_a: int, cpu_b: int, rounds: int, gap: float) -> float:
    """Median round trip in µs between a process on ``cpu_a`` and a child on ``cpu_b``."""
    a_r, b_w = os.pipe()  # child -> parent
    b_r, a_w = os.pipe()  # parent -> child
    pid = os.fork()
    if pid == 0:  # the child: echo every byte back until the parent closes its end
        status = 0
        try:
            os.close(a_r)
            os.close(a_w)
            _pin(cpu_b)
            poller = select.poll()
            poller.register(b_r, select.POLLIN)
            while True:
                poller.poll()
                byte = os.read(b_r, 1)
                if not byte:
                    break
                os.write(b_w, byte)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(b_r)
    os.close(b_w)
    before = os.sched_getaffinity(0)
    samples: list[float] = []
    try:
        _pin(cpu_a)
        poller = select.poll()
        poller.register(a_r, select.POLLIN)
        for i in range(rounds + 10):  # the first 10 warm up
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter_ns()
            os.write(a_w, b"x")
            poller.poll()
            os.read(a_r, 1)
            if i >= 10:
                samples.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        os.close(a_w)
        os.waitpid(pid, 0)
        os.close(a_r)
        with contextlib.suppress(OSError):  # an error before this one is the one to report
            os.sched_setaffinity(0, before)
    return statistics.median(samples)


def wakeup_round_trips(rounds: int = 300, gap: float = 0.002) -> dict[str, Any]:
    """{"same_cpu_us", "cross_cpu_us" (None on one CPU), "rounds"}; {"error": ...} if the
    probe could not run (no affinity control, say)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        same = _round_trips(cpus[0], cpus[0], rounds, gap)
        cross = _round_trips(cpus[0], cpus[1], rounds, gap) if len(cpus) > 1 else None
    except OSError as exc:
        return {"error": f"wake-up probe failed: {exc}"}
    return {
        "same_cpu_us": round(same, 1),
        "cross_cpu_us": None if cross is None else round(cross, 1),
        "rounds": rounds,
    }
