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
