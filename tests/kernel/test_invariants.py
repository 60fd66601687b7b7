"""The invariant checker finds what it is meant to find (and nothing on a sane machine)."""

from __future__ import annotations

import pytest

from hmmsim import Process
from hmmsim.kernel.invariants import InvariantError
from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.pgtable import pte_pfn


def written(proc: Process) -> tuple[int, int]:
    a = proc.mmap(2 * P)
    proc.write(a, b"i" * 2 * P)
    return a, pte_pfn(proc.mm.lookup_pte(a))


def test_check_invariants_accepts_a_busy_machine(proc: Process) -> None:
    a, _ = written(proc)
    child = proc.fork()
    child.write(a, b"c")
    proc.system.check_invariants(full=True)
    child.exit()


def test_check_invariants_finds_a_wrong_refcount(proc: Process) -> None:
    _, pfn = written(proc)
    proc.system.mem.refcount[pfn] += 1
    with pytest.raises(InvariantError, match=f"pfn {pfn:#x}: refcount"):
        proc.system.check_invariants()
    proc.system.mem.refcount[pfn] -= 1


def test_check_invariants_finds_a_wrong_mapcount(proc: Process) -> None:
    _, pfn = written(proc)
    proc.system.mem.mapcount[pfn] = 2
    with pytest.raises(InvariantError, match=f"pfn {pfn:#x}: mapcount 2"):
        proc.system.check_invariants()
    proc.system.mem.mapcount[pfn] = 1


def test_check_invariants_finds_a_lost_frame(proc: Process) -> None:
    mem = proc.system.mem
    pfn = mem.alloc_page()
    mem.refcount[pfn] = 0
    with pytest.raises(InvariantError, match="lost frame"):
        proc.system.check_invariants()
    mem.free_pages([pfn])


def test_check_invariants_finds_wrong_rss(proc: Process) -> None:
    written(proc)
    proc.mm.rss[1] += 1
    with pytest.raises(InvariantError, match="rss"):
        proc.system.check_invariants()
    proc.mm.rss[1] -= 1


def test_check_invariants_finds_a_mapping_outside_every_vma(proc: Process) -> None:
    a, _ = written(proc)
    vma = proc.mm.vma_lookup(a)
    proc.mm.resize_vma(vma, a + P, vma.vm_end, vma.vm_pgoff + 1)
    with pytest.raises(InvariantError, match="outside every VMA"):
        proc.system.check_invariants()
    proc.mm.resize_vma(vma, a, vma.vm_end, vma.vm_pgoff - 1)


def test_check_invariants_finds_an_unbalanced_notifier(proc: Process) -> None:
    from hmmsim.kernel.mmu_notifier import MmuNotifierEvent, MmuNotifierRange, mmu_notifier_invalidate_range_end, mmu_notifier_invalidate_range_start
    r = MmuNotifierRange(MmuNotifierEvent.MMU_NOTIFY_CLEAR, 0, proc.mm, 0, P)
    mmu_notifier_invalidate_range_start(r)
    with pytest.raises(InvariantError, match="never ended"):
        proc.system.check_invariants(full=False)
    mmu_notifier_invalidate_range_end(r)


# -- the sparse checks see both directions: counts on pfns nothing maps or references too --

def test_check_invariants_finds_a_mapcount_on_a_page_nothing_maps(proc: Process) -> None:
    mem = proc.system.mem
    pfn = mem.alloc_page()  # referenced (refcount 1) but mapped by no entry
    proc.system.extra_refs[pfn] = 1
    proc.system.check_invariants()
    mem.mapcount[pfn] = 1
    with pytest.raises(InvariantError, match=f"pfn {pfn:#x}: mapcount 1 but 0 ptes map it"):
        proc.system.check_invariants()
    mem.mapcount[pfn] = 0
    mem.entire_mapcount[pfn] = 1
    with pytest.raises(InvariantError, match=f"pfn {pfn:#x}: entire_mapcount 1 but 0 huge entries"):
        proc.system.check_invariants()
    mem.entire_mapcount[pfn] = 0
    del proc.system.extra_refs[pfn]
    mem.refcount[pfn] = 0
    mem.free_pages([pfn])


def test_check_invariants_finds_an_unexpected_reference_and_a_missing_one(proc: Process) -> None:
    mem = proc.system.mem
    pfn = mem.alloc_page()
    with pytest.raises(InvariantError, match=f"pfn {pfn:#x}: refcount 1 but 0 references are known"):
        proc.system.check_invariants()
    proc.system.extra_refs[pfn] = 2  # a reference the page does not hold
    with pytest.raises(InvariantError, match=f"pfn {pfn:#x}: refcount 1 but 2 references are known"):
        proc.system.check_invariants()
    del proc.system.extra_refs[pfn]
    mem.refcount[pfn] = 0
    mem.free_pages([pfn])


def test_check_invariants_finds_a_referenced_tail_and_a_dirty_free_page(proc: Process) -> None:
    mem = proc.system.mem
    a = proc.mmap(4 << 20)
    a = (a + (2 << 20) - 1) & ~((2 << 20) - 1)
    proc.madvise(a, 2 << 20, "hugepage")
    proc.write(a, b"t" * P)
    head = pte_pfn(proc.mm.lookup_pte(a))  # the PMD's entry: a THP
    assert mem.order[head] == 9
    tail = head + 1
    assert mem.head_off[tail] == 1
    mem.refcount[tail] = 1
    with pytest.raises(InvariantError, match=f"tail page {tail:#x} has refcount 1"):
        proc.system.check_invariants()
    mem.refcount[tail] = 0
    free = int(mem.alloc_page())
    mem.refcount[free] = 0
    mem.free_pages([free])
    mem.mapping[free] = 1
    with pytest.raises(InvariantError, match=f"free pfn {free:#x} still has refcount/mapcount/mapping"):
        proc.system.check_invariants()
    mem.mapping[free] = 0
    proc.system.check_invariants()
