"""Helpers shared by the benchmarks: timing, the numpy yardsticks and the report line.

Every figure is printed beside a numpy baseline measured in the same run, so a result
taken on a busy machine can still be compared (``ratio`` = model rate / baseline rate).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

GiB = 1 << 30


#: the clock the benchmarks time with: wall time, or (``use_cpu_clock()``, for a machine
#: shared with other busy processes) this process's CPU time
clock: Callable[[], float] = time.perf_counter


def use_cpu_clock() -> None:
    """Time with :func:`time.process_time` (CPU time of this process, kernel time
    included) instead of wall time, model and baselines alike."""
    global clock
    clock = time.process_time


def best_of(fn: Callable[[], Any], repeat: int = 3, setup: Callable[[], Any] | None = None) -> float:
    """The fastest of *repeat* runs of *fn* (after *setup*, untimed), in seconds."""
    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def numpy_copy_rate(size: int) -> float:
    """Bytes/s of a numpy copy of *size* bytes: the yardstick for data-moving commands."""
    a = np.ones(size, np.uint8)
    b = np.empty_like(a)
    return size / best_of(lambda: np.copyto(b, a))


def numpy_entry_rate(n: int) -> float:
    """Entries/s of one vectorised pass over *n* uint64 page-table entries that decodes
    each (pfn and two flag bits) into an output array: the yardstick for table walks."""
    tbl = np.arange(n, dtype=np.uint64) << np.uint64(12) | np.uint64(0x67)
    out = np.empty_like(tbl)

    def run() -> None:
        np.right_shift(tbl & np.uint64(0x000F_FFFF_FFFF_F000), np.uint64(12), out=out)
        np.bitwise_or(out, (tbl & np.uint64(1)) << np.uint64(63), out=out)
        np.bitwise_or(out, ((tbl >> np.uint64(1)) & np.uint64(1)) << np.uint64(62), out=out)

    return n / best_of(run)


def report(name: str, value: float, unit: str, target: float | None, baseline: float | None = None,
           baseline_name: str = "numpy", lower_is_better: bool = False) -> bool:
    """Print one result line with its target (None: a figure for information, which
    always passes) and, if given, the baseline measured in the same run and the ratio to
    it; returns whether the target is met."""
    extra = ""
    if baseline:
        extra = f"   {baseline_name} {baseline:,.2f} {unit}, ratio {value / baseline:.3f}"
    if target is None:
        print(f"{name:<52} {value:>14,.2f} {unit:<8} (no target of its own){extra}", flush=True)
        return True
    ok = value <= target if lower_is_better else value >= target
    cmp = "<=" if lower_is_better else ">="
    print(f"{name:<52} {value:>14,.2f} {unit:<8} target {cmp} {target:,g} "
          f"{'OK' if ok else 'BELOW TARGET'}{extra}", flush=True)
    return ok
