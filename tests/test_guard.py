"""The memory guard turns a runaway traversal into a TraceError instead of an out-of-memory kill."""

from __future__ import annotations

import time

import pytest

from fusion.errors import TraceError
from fusion.guard import memory_guard, resident_bytes


@pytest.mark.skipif(resident_bytes() == 0, reason="needs /proc/self/statm")
def test_growth_beyond_the_budget_raises_trace_error():
    hoard = []
    with pytest.raises(TraceError, match="runaway loop used"):
        with memory_guard("runaway loop", budget=64 << 20, interval=0.01):
            deadline = time.time() + 30
            while time.time() < deadline:
                hoard.append(bytearray(8 << 20))
                hoard[-1][::4096] = b"x" * len(hoard[-1][::4096])  # touch the pages
    assert len(hoard) * (8 << 20) < 2 << 30


def test_work_within_the_budget_is_untouched():
    with memory_guard("small work", budget=1 << 30, interval=0.01):
        total = sum(range(100_000))
    assert total == 4999950000


def test_work_past_the_deadline_raises_trace_error_naming_it():
    with pytest.raises(TraceError, match="endless loop ran past its time budget"):
        with memory_guard("endless loop", interval=0.01, deadline=time.monotonic() + 0.05):
            while True:
                time.sleep(0.001)


def test_deadline_already_passed_raises_before_the_work():
    ran = []
    with pytest.raises(TraceError, match="not started"):
        with memory_guard("late work", deadline=time.monotonic() - 1):
            ran.append(True)
    assert not ran
