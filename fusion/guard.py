"""A memory and time guard for graph traversals that can blow up.

torch-pruning's index mappings through reshapes expand every channel into lists of positions;
on some architectures (MaxViT's window partitions) chained expansions grow without bound and take
all memory, and on others (ReXNet, grouped-query attention) its graph fix-up runs for minutes.
:func:`memory_guard` checks the process's resident memory and the elapsed time a few times a
second and raises :class:`~fusion.errors.TraceError` inside the guarded block when memory grows
by more than the budget or the deadline passes, so the caller gets an error instead of an
out-of-memory kill or a hang.

The check runs from a timer signal, so it guards the main thread on POSIX systems; elsewhere
the block runs unguarded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

from .errors import TraceError

__all__ = ["memory_guard", "resident_bytes", "available_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """Resident memory of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def available_bytes() -> int:
    """Memory the system can still give (MemAvailable), or 0 if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


@contextlib.contextmanager
def memory_guard(what: str, budget: int | None = None, interval: float = 0.25,
                 deadline: float | None = None) -> Iterator[None]:
    """Raise :class:`TraceError` in the block if resident memory grows by more than ``budget`` bytes
    or the clock passes ``deadline``.

    Args:
        what: names the work in the error message.
        budget: allowed growth (default: half of the memory available when the block starts).
        interval: seconds between checks.
        deadline: a :func:`time.monotonic` time after which the block is stopped (None: no limit).
            Already passed on entry: raises at once.
    """
    if deadline is not None and time.monotonic() >= deadline:
        raise TraceError(f"{what} was not started: the time budget (timeout=) was already spent")
    measurable = resident_bytes() > 0
    usable = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
              and (measurable or deadline is not None))
    if not usable:
        yield
        return
    start = resident_bytes()
    limit = budget if budget is not None else max(available_bytes() // 2, 1 << 30)

    def check(signum: int, frame: object) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise TraceError(
                f"{what} ran past its time budget and was stopped: torch-pruning's graph traversal does not "
                "finish on this architecture; raise timeout=, pass ignored_layers for the offending blocks or "
                "build the spec on a smaller sub-module"
            )
        grown = resident_bytes() - start if measurable else 0
        if grown > limit:
            raise TraceError(
                f"{what} used {grown / 2**30:.1f} GiB and was stopped (budget {limit / 2**30:.1f} GiB): "
                "torch-pruning's index mapping explodes on this architecture; pass ignored_layers for "
                "the offending blocks or build the spec on a smaller sub-module"
            )

    previous = signal.signal(signal.SIGALRM, check)
    outer_timer = signal.setitimer(signal.ITIMER_REAL, interval, interval)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_timer[0] > 0:  # an enclosing guard's timer keeps running
            signal.setitimer(signal.ITIMER_REAL, *outer_timer)
