"""The UI probe's stall tracer: one stack per stall, and on Linux what the Qt thread did
during it (ran, waited for a core, or slept)."""

from __future__ import annotations

import sys
import time

import pytest

from napari_semicl.widgets.ui_probe import StallTracer


def _stall(tracer: StallTracer, seconds: float, busy: bool) -> dict:
    tracer.start()
    for _ in range(5):  # the event loop runs, and the watchdog samples before the stall
        tracer.tick()
        time.sleep(0.01)
    end = time.perf_counter() + seconds
    if busy:
        while time.perf_counter() < end:  # Python work on this (the main) thread
            sum(range(1000))
    else:
        time.sleep(seconds)  # blocked, not running
    for _ in range(15):  # the event loop is back, ticking while the watchdog samples the end
        tracer.tick()
        time.sleep(0.01)
    stacks = tracer.stop()
    assert len(stacks) == 1, stacks
    return stacks[0]


@pytest.mark.parametrize("busy", [True, False], ids=["busy", "sleeping"])
def test_a_stall_gets_its_stack_length_and_counters(busy):
    stall = _stall(StallTracer(threshold_ms=80), 0.4, busy)
    assert stall["blocked_ms"] >= 80
    assert 390 <= stall["stall_ms"] <= 600
    assert any("_stall" in line for line in stall["stack"])
    if not sys.platform.startswith("linux"):
        return
    window = stall["stall_ms"] + 2 * 20 + 20  # the samples around the stall
    total = stall["qt_cpu_ms"] + stall["qt_runqueue_ms"]
    if busy:  # it ran (or waited for a core) nearly all the time
        assert total >= 0.7 * 400 and total <= window
    else:  # it slept
        assert stall["qt_cpu_ms"] < 100
    assert stall["steal_ms"] >= 0


def test_no_stall_no_stack():
    tracer = StallTracer(threshold_ms=80)
    tracer.start()
    for _ in range(20):
        time.sleep(0.01)
        tracer.tick()
    assert tracer.stop() == []
