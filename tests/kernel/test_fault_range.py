"""The batched fault and the CPU's batched translation against the page-by-page loops
they stand for.

``handle_mm_fault_range`` (the model's batch of ``handle_mm_fault()`` calls) fills a
pmd with no pte table a whole span at a time when the first fault would make a pte
table (no THP there) and every fault gets a page; ``translate_range`` walks a pud span
of pmds at a time. Each must leave exactly what the loop of single faults / single
accesses leaves: page tables, frames and their order, struct pages, rss, the OOM point
and the counters (but the pte_offset_map*/set_* counts, which batches make per run).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from .helpers import BASE
from hmmsim import Process, System
from hmmsim.kernel.cpu import SIGKILL, SIGSEGV, translate, translate_range
from hmmsim.kernel.fault import FAULT_FLAG_WRITE
from hmmsim.kernel.fault_range import handle_mm_fault_range
from hmmsim.kernel.mm import MM_ANONPAGES, mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.mm_types import FAULT_FLAG_DEFAULT, VM_FAULT_OOM
from hmmsim.kernel.page_types import HPAGE_PMD_SIZE, PAGE_SHIFT, PAGE_SIZE as P, PUD_SIZE
from hmmsim.kernel.trace import _fault_range_per_page

_BATCH_ONLY = ("pgtable.pte_offset_map", "pgtable.set_")


#: what the CPU's batched loop counts differently from ``translate`` page by page: it
#: takes mmap_lock once per batch of faults (and faults only pages it found faulting, so
#: every fault counter agrees)
_CPU_BATCH = ("lock.mmap_lock.",)


def state(s: System, proc: Process, start: int, end: int, skip: tuple[str, ...] = ()) -> tuple:
    """Everything a fault changes: the entries mapping the range, rss, struct pages, free
    frames, OOM events, page-table count and counters (but the batch-only ones and
    *skip*)."""
    m = s.mem
    ptes = [proc.mm.lookup_pte(a) for a in range(start, end, P)]
    arrays = tuple(a.tobytes() for a in (m.flags, m.refcount, m.mapcount, m.entire_mapcount, m.order,
                                         m.head_off, m.mapping, m.index, m._free))
    counts = {k: v for k, v in s.stats.snapshot().items() if not k.startswith(_BATCH_ONLY + skip)}
    return ptes, list(proc.mm.rss), arrays, m.nr_free, m.oom_events, s.pt.nr_tables, counts


def fault(proc: Process, start: int, end: int, flags: int, per_page: bool) -> tuple[int, int]:
    mm = proc.mm
    with proc.task.running():
        mmap_read_lock(mm)
        try:
            vma = mm.find_vma(start)
            run = _fault_range_per_page if per_page else handle_mm_fault_range
            return run(vma, start, end, flags)
        finally:
            mmap_read_unlock(mm)


Setup = Callable[[System, Process], tuple[int, int]]


def twice(make_system: Callable[..., System], setup: Setup, flags: int, **cfg: object) -> list[tuple]:
    """Build the same machine twice; fault the range batched on one and page by page on
    the other; return (ret, state) of both."""
    out = []
    for per_page in (False, True):
        s = make_system(**cfg)
        proc = s.spawn("t")
        start, end = setup(s, proc)
        ret = fault(proc, start, end, flags, per_page)
        out.append((ret, state(s, proc, start, end)))
    return out


def anon(length: int, *, at: int = BASE, offset: int = 0, populate: tuple[int, ...] = (),
         hugepage: bool = False, reserve: int | None = None) -> Setup:
    """A private anonymous mapping at *at*; the range ``[at + offset, at + length)``;
    pages *populate* written first; with *reserve*, all but that many free pages
    charged away (memory pressure)."""
    def setup(s: System, proc: Process) -> tuple[int, int]:
        a = proc.mmap(length, addr=at, fixed=True)
        if hugepage:
            proc.madvise(a, length, "hugepage")
        for i in populate:
            proc.write(a + i * P, b"x")
        if reserve is not None:
            assert s.mem.charge(s.mem.nr_free - s.mem.charged - reserve)
        return a + offset, a + length
    return setup


W = FAULT_FLAG_DEFAULT | FAULT_FLAG_WRITE

CASES = {
    # three whole pmds with no page tables at all
    "empty_pmds": anon(3 * HPAGE_PMD_SIZE),
    # spans that start and end inside pmds, across a pud boundary (new pmd table)
    "unaligned_across_pud": anon(4 * HPAGE_PMD_SIZE, at=BASE + PUD_SIZE - 2 * HPAGE_PMD_SIZE, offset=5 * P),
    # a last span of two pages, and one of a single page
    "two_page_span": anon(HPAGE_PMD_SIZE + 2 * P),
    "one_page_span": anon(HPAGE_PMD_SIZE + P),
    # pte tables already there (some pages present): the run path, not the empty-pmd one
    "partly_populated": anon(2 * HPAGE_PMD_SIZE, populate=(3, 700)),
    # THP allowed: the first fault makes a THP, not a pte table
    "thp": anon(2 * HPAGE_PMD_SIZE, hugepage=True),
    # empty pmds around one with a pte table: filled in address order
    "empty_around_table": anon(5 * HPAGE_PMD_SIZE, offset=7 * P, populate=(600,)),
    # not enough free pages for the span: page by page, OOM at the same page
    "oom_in_span": anon(2 * HPAGE_PMD_SIZE, reserve=700),
    # enough for two empty pmds together, not for the third
    "oom_third_pmd": anon(3 * HPAGE_PMD_SIZE, reserve=1100),
    "oom_first_page": anon(HPAGE_PMD_SIZE, reserve=0),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_handle_mm_fault_range_equals_page_by_page(make_system: Callable[..., System], case: str,
                                                   kernel: str) -> None:
    (ret_b, st_b), (ret_p, st_p) = twice(make_system, CASES[case], W, kernel=kernel)
    assert ret_b == ret_p
    assert st_b == st_p
    if case.startswith("oom"):
        assert ret_b[0] & VM_FAULT_OOM


def test_handle_mm_fault_range_empty_pmd_fills_whole_span(make_system: Callable[..., System]) -> None:
    """An empty pmd: one pte table, 512 new zeroed exclusive pages in pfn order, rss
    +512, 512 faults counted as do_anonymous_page (the frames were dirty before)."""
    s = make_system()
    proc = s.spawn("t")
    dirty = proc.mmap(HPAGE_PMD_SIZE)
    proc.write(dirty, b"\xff" * HPAGE_PMD_SIZE)
    proc.munmap(dirty, HPAGE_PMD_SIZE)   # its frames go back dirty
    a = proc.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    with s.stats.measure() as delta:
        assert fault(proc, a, a + HPAGE_PMD_SIZE, W, per_page=False) == (0, a + HPAGE_PMD_SIZE)
    assert delta["fault.handle_mm_fault"] == delta["fault.do_anonymous_page"] == 512
    assert delta["pgtable.alloc.l1"] == 1
    # counted as the first page's own fault and a run over the others would count them
    assert (delta["pgtable.pte_offset_map"], delta["pgtable.pte_offset_map_lock"]) == (4, 2)
    assert proc.mm.rss[MM_ANONPAGES] == 512
    assert proc.read(a, HPAGE_PMD_SIZE) == bytes(HPAGE_PMD_SIZE)
    pfns = [proc.mm.lookup_pte(a + i * P) >> PAGE_SHIFT & ((1 << 40) - 1) for i in range(512)]
    assert pfns == sorted(pfns) and len(set(pfns)) == 512


def layout(s: System, proc: Process) -> tuple[int, int]:
    """Mixed state over 6 pmds across a pud boundary: written pages, zero-page reads,
    a THP, a read-only VMA, holes, untouched pmds. Returns the range."""
    start = BASE + PUD_SIZE - 3 * HPAGE_PMD_SIZE
    a = proc.mmap(2 * HPAGE_PMD_SIZE, addr=start, fixed=True)
    proc.write(a + 5 * P, b"a" * (20 * P))
    proc.touch(a + 600 * P, 30 * P)                  # zero page
    b = proc.mmap(HPAGE_PMD_SIZE, addr=start + 2 * HPAGE_PMD_SIZE, fixed=True)
    proc.madvise(b, HPAGE_PMD_SIZE, "hugepage")
    proc.write(b, b"t")                              # a THP
    c = proc.mmap(HPAGE_PMD_SIZE, "r", addr=start + 3 * HPAGE_PMD_SIZE, fixed=True)
    proc.touch(c, 8 * P)
    d = proc.mmap(HPAGE_PMD_SIZE - 64 * P, addr=start + 4 * HPAGE_PMD_SIZE + 64 * P, fixed=True)
    proc.write(d + 100 * P, b"d" * (300 * P))        # a hole of 64 pages before d
    return start + 3 * P, start + 5 * HPAGE_PMD_SIZE + 8 * P   # ends in an unmapped pmd


@pytest.mark.parametrize("write", [False, True])
def test_translate_range_equals_page_by_page(make_system: Callable[..., System], write: bool) -> None:
    """``translate_range`` over the mixed layout = ``translate`` page by page: the same
    pfns and signals (SIGSEGV for the holes, the read-only VMA on writes), and the same
    page tables, frames and counters afterwards (accessed/dirty bits and fault counts
    included; but the mmap_lock counts of ``_CPU_BATCH``)."""
    results = []
    for batched in (True, False):
        s = make_system()
        proc = s.spawn("t")
        start, end = layout(s, proc)
        n = (end - start) >> PAGE_SHIFT
        with proc.task.running():
            if batched:
                pfns, sigs = translate_range(proc.mm, start, n, write)
                got = [int(p) if p >= 0 else -sig_at(sigs, i) for i, p in enumerate(pfns)]
            else:
                got = [translate(proc.mm, start + i * P, write) for i in range(n)]
        results.append((got, state(s, proc, start, end, _CPU_BATCH)))
    assert results[0] == results[1]
    got = results[0][0]
    assert -SIGSEGV in got and sum(1 for x in got if x >= 0) > 1000


def sig_at(sigs: list[tuple[int, int, int]], i: int) -> int:
    for first, count, sig in sigs:
        if first <= i < first + count:
            return sig
    raise AssertionError(f"page {i} has neither a pfn nor a signal")


def test_translate_range_oom_stops(make_system: Callable[..., System]) -> None:
    """A write over more pages than are free: the pages up to the OOM point get frames,
    the failing page raises SIGKILL, which ends the loop: nothing past it is touched."""
    s = make_system()
    proc = s.spawn("t")
    a = proc.mmap(2 * HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    assert s.mem.charge(s.mem.nr_free - s.mem.charged - 600)
    with proc.task.running():
        pfns, sigs = translate_range(proc.mm, a, 1024, True)
    assert sigs == [(600, 1, SIGKILL)]
    assert (pfns[:600] >= 0).all() and (pfns[600:] == -1).all()
    assert proc.mm.rss[MM_ANONPAGES] == 600
    s.mem.uncharge(s.mem.charged)


def test_translate_range_reads_runs_in_order(make_system: Callable[..., System]) -> None:
    """A read of 3 populated pmds and a pud boundary: the frames the writes got, in order."""
    s = make_system()
    proc = s.spawn("t")
    start = BASE + PUD_SIZE - HPAGE_PMD_SIZE
    a = proc.mmap(3 * HPAGE_PMD_SIZE, addr=start, fixed=True)
    with proc.task.running():
        want, sigs = translate_range(proc.mm, a, 1536, True)
        assert sigs == []
        got, sigs = translate_range(proc.mm, a + 7 * P, 1500, False)
    assert sigs == [] and np.array_equal(got, want[7:1507])
