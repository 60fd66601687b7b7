"""Helpers shared by the benchmarks: timing and the report line format."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

GiB = 1 << 30


def best_of(fn: Callable[[], Any], repeat: int = 3, setup: Callable[[], Any] | None = None) -> float:
    """The fastest of *repeat* runs of *fn* (after *setup*, untimed), in seconds."""
    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def report(name: str, value: float, unit: str, target: float) -> bool:
    """Print one result line with its target; returns whether the target is met."""
    ok = value >= target
    print(f"{name:<44} {value:>14,.0f} {unit:<9} target >= {target:,.0f} {unit:<9} "
          f"{'OK' if ok else 'BELOW TARGET'}")
    return ok
