"""The generic walker ``walk_page_range()`` (``mm/pagewalk.c``).

Layout used (P = present pte, . = none): one VMA of 8 pages, pages 0..1 written,
a hole between VMAs, hugetlb and THP VMAs for the huge callbacks."""

from __future__ import annotations

import pytest

from hmmsim import Process
from hmmsim.kernel.errno import EINVAL
from hmmsim.kernel.locking import LockdepError
from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.page_types import PAGE_SIZE as P, PMD_SIZE
from hmmsim.kernel.pagewalk import (
    ACTION_AGAIN, ACTION_CONTINUE, MmWalkOps, walk_page_range, walk_page_vma,
)
from hmmsim.kernel.pgtable import pte_present


def walk(mm, start: int, end: int, ops: MmWalkOps) -> int:  # noqa: ANN001
    mmap_read_lock(mm)
    try:
        return walk_page_range(mm, start, end, ops, None)
    finally:
        mmap_read_unlock(mm)


def test_walk_page_range_empty_range_is_einval(proc: Process) -> None:
    assert walk(proc.mm, 0x1000, 0x1000, MmWalkOps()) == -EINVAL


def test_walk_page_range_needs_mmap_lock(proc: Process) -> None:
    with pytest.raises(LockdepError):
        walk_page_range(proc.mm, 0x1000, 0x2000, MmWalkOps(), None)


def test_walk_page_range_holes_and_depths(proc: Process) -> None:
    a = proc.mmap(8 * P)
    holes: list[tuple[int, int, int, bool]] = []

    def hole(s: int, e: int, depth: int, w) -> int:  # noqa: ANN001
        holes.append((s, e, depth, w.vma is not None))
        return 0

    walk(proc.mm, a - 2 * P, a + 8 * P, MmWalkOps(pte_hole=hole))
    # the gap before the VMA (depth -1, no vma), then the VMA without any page table:
    # the missing top-level entry covers the whole VMA part (depth 0 with p4d folded)
    assert holes == [(a - 2 * P, a, -1, False), (a, a + 8 * P, 0, True)]
    proc.write(a, b"x")
    holes.clear()
    seen: list[tuple[int, int]] = []
    walk(proc.mm, a, a + 8 * P, MmWalkOps(pte_hole=hole, pmd_entry=lambda pmd, s, e, w: seen.append((s, e)) or 0))
    assert holes == [] and seen == [(a, a + 8 * P)]


def test_walk_page_range_pte_entry_per_page_under_lock(proc: Process) -> None:
    a = proc.mmap(4 * P)
    proc.write(a, b"y" * 2 * P)
    got: list[tuple[int, bool]] = []

    def pte(ref, s: int, e: int, w) -> int:  # noqa: ANN001
        w.mm.sys.ls.assert_held(("ptl", ref.tid), "ptl")
        got.append((s, pte_present(ref.get())))
        return 0

    walk(proc.mm, a, a + 4 * P, MmWalkOps(pte_entry=pte))
    assert got == [(a, True), (a + P, True), (a + 2 * P, False), (a + 3 * P, False)]


def test_walk_page_range_nonzero_return_stops(proc: Process) -> None:
    a = proc.mmap(4 * P)
    proc.write(a, b"z" * 4 * P)
    calls = []

    def pte(ref, s: int, e: int, w) -> int:  # noqa: ANN001
        calls.append(s)
        return 7 if s == a + P else 0

    assert walk(proc.mm, a, a + 4 * P, MmWalkOps(pte_entry=pte)) == 7
    assert calls == [a, a + P]


def test_walk_page_range_test_walk_skips_and_aborts(proc: Process) -> None:
    a = proc.mmap(2 * P)
    b = proc.mmap(2 * P, addr=a + 4 * P, fixed=True)
    proc.write(a, b"1")
    proc.write(b, b"2")
    visited = []
    ops = MmWalkOps(test_walk=lambda s, e, w: 1 if s == a else 0,
                    pte_entry=lambda r, s, e, w: visited.append(s) or 0)
    assert walk(proc.mm, a, b + 2 * P, ops) == 0, "positive values never reach the caller"
    assert visited == [b, b + P]
    ops = MmWalkOps(test_walk=lambda s, e, w: -5, pte_entry=lambda r, s, e, w: visited.append(s) or 0)
    assert walk(proc.mm, a, b + 2 * P, ops) == -5


def test_walk_page_range_action_continue_and_again(make_system) -> None:
    p = make_system().spawn()
    base = p.mmap(4 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.write(a, b"t" * 2 * P)
    ptes = []
    tries = []

    def pmd(ref, s: int, e: int, w) -> int:  # noqa: ANN001
        tries.append(s)
        if len(tries) == 1:
            w.action = ACTION_AGAIN  # re-read the same entry once
        elif len(tries) == 2:
            w.action = ACTION_CONTINUE  # and skip its subtree
        return 0

    walk(p.mm, a, a + PMD_SIZE, MmWalkOps(pmd_entry=pmd, pte_entry=lambda r, s, e, w: ptes.append(s) or 0))
    assert tries == [a, a] and ptes == []


def test_walk_page_range_splits_thp_for_pte_entry(make_system) -> None:
    p = make_system().spawn()
    base = p.mmap(4 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(a, PMD_SIZE, "hugepage")
    p.write(a, b"h")
    assert "PSE" in p.pte(a)
    n = []
    walk(p.mm, a, a + 4 * P, MmWalkOps(pte_entry=lambda r, s, e, w: n.append(s) or 0))
    assert len(n) == 4 and "PSE" not in p.pte(a), "a pte_entry walker splits huge pmds"
    assert p.read(a, 1) == b"h"


def test_walk_page_range_hugetlb_entry_per_huge_page(make_system) -> None:
    p = make_system().spawn()
    a = p.mmap(2 * PMD_SIZE, hugetlb=True)
    p.write(a, b"g")
    spans = []
    holes = []
    ops = MmWalkOps(hugetlb_entry=lambda r, hm, s, e, w: spans.append((s, e)) or 0,
                    pte_hole=lambda s, e, d, w: holes.append((s, e, d)) or 0)
    walk(p.mm, a + P, a + 2 * PMD_SIZE - P, ops)
    assert spans == [(a + P, a + PMD_SIZE), (a + PMD_SIZE, a + 2 * PMD_SIZE - P)] and holes == []


def test_walk_page_vma_and_counters(proc: Process) -> None:
    a = proc.mmap(3 * P)
    proc.write(a, b"c" * 3 * P)
    vma = proc.mm.vma_lookup(a)
    n = []
    mmap_read_lock(proc.mm)
    try:
        with proc.system.stats.measure() as d:
            walk_page_vma(vma, MmWalkOps(pte_entry=lambda r, s, e, w: n.append(s) or 0), None)
    finally:
        mmap_read_unlock(proc.mm)
    assert len(n) == 3 and d["walk_page_range"] == 1 and d["walk.pte_entry"] == 3
    assert d["lock.ptl.write"] == 1, "one pte lock for the whole leaf table"
