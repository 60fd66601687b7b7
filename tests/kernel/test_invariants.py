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
