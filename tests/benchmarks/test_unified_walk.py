"""Smoke test of ``benchmarks/unified_walk.py`` (issue 8's measurement): on tiny ranges
its measurement function shows the claim the benchmark reports, walks per window
A = 2, B = 1 (everything collectable) or 3 (some pages swapped out), C = 1 (the unified
walk's fault path and its migrate path, once the walk exists), with the data on the device afterwards (``Setup.check``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def uw():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("unified_walk")
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize(("present", "b_walks"), [(0.0, 3), (0.5, 3), (1.0, 1)])
def test_walks_per_window_are_2_1or3_1(uw, present: float, b_walks: int) -> None:
    case = uw.Case(f"16p {present:.0%}", 16, present)
    a = uw.measure(case, "A", repeat=1)
    b = uw.measure(case, "B", repeat=1)
    assert (a.windows, a.walks, a.migrated) == (1, 2, 16)
    assert (b.windows, b.walks, b.migrated) == (1, b_walks, 16)
    absent = 16 - int(16 * present)
    # the swapped-out pages are faulted once each (A: by hmm_range_fault; B: by the
    # second pass's hmm_range_fault, which asks for them only)
    assert a.faults == b.faults == absent
    # one MMU_NOTIFY_MIGRATE bracket per migrate_vma pass
    assert b.inval - a.inval == (1 if absent else 0)
    for name in ("C", "Cm"):
        c = uw.measure(case, name, repeat=1)
        if not c.available:
            assert "unified walk" in c.why or "migrate_on_fault" in c.why
            continue
        assert (c.windows, c.walks, c.migrated) == (1, 1, 16), name
        assert c.faults == absent, name


def test_thp_case_and_window_count(uw) -> None:
    """Two 2 MiB windows of THPs: one entry per THP under 7.3 (SELECT_COMPOUND), two
    walks per window for A and one for B."""
    case = uw.Case("4M THP", 1024, 1.0, thp=True)
    a = uw.measure(case, "A", repeat=1)
    b = uw.measure(case, "B", repeat=1)
    assert (a.windows, a.walks, a.migrated) == (2, 4, 2)
    assert (b.windows, b.walks, b.migrated) == (2, 2, 2)
    assert a.faults == b.faults == 0
