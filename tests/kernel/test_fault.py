"""Page faults (mm/memory.c, mm/huge_memory.c, mm/hugetlb.c, mm/shmem.c, swap-in).

Every expectation below is derived from what Linux 6.12 does, not from running the
model: the function named in each test is the kernel function whose behaviour is
asserted. The fixtures check the full set of invariants (refcounts, mapcounts, rss, no
lost frames, no leaked page tables, no lock held) after every test.
"""

from __future__ import annotations

import numpy as np
import pytest

from .helpers import BASE, Recorder, pte
from hmmsim.errors import BusError, OutOfMemory, SegmentationFault
from hmmsim.kernel.mm import MM_ANONPAGES, MM_SHMEMPAGES, MM_SWAPENTS
from hmmsim.kernel.mmu_notifier import MmuNotifierEvent
from hmmsim.kernel.page_types import HPAGE_PMD_NR, HPAGE_PMD_SIZE, PAGE_SIZE
from hmmsim.kernel.pgtable import (
    _PAGE_PSE, decode_pte, is_swap_pte, non_swap_entry, pmd_leaf, pte_dirty, pte_pfn,
    pte_present, pte_protnone, pte_special, pte_to_swp_entry, pte_write, swp_offset, swp_type,
)
from hmmsim.kernel.physmem import PG_anon, PG_anon_exclusive
from hmmsim.kernel.vma import VM_HUGEPAGE






def rss(proc, member: int) -> int:  # noqa: ANN001
    return proc.mm.get_mm_counter(member)


def anon_thp_area(proc, npmds: int = 1, prot: str = "rw") -> int:  # noqa: ANN001
    """A MAP_FIXED anonymous mapping of *npmds* 2 MiB blocks at a 2 MiB-aligned address
    with MADV_HUGEPAGE."""
    a = proc.mmap(npmds * HPAGE_PMD_SIZE, prot, addr=BASE, fixed=True)
    assert a == BASE
    proc.madvise(a, npmds * HPAGE_PMD_SIZE, "hugepage")
    return a


# -- do_anonymous_page -------------------------------------------------------------------------
def test_do_anonymous_page_read_maps_zero_page(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * PAGE_SIZE)
    assert proc.read(a + 100, 8) == bytes(8)
    e = pte(proc, a)
    mem = proc.system.mem
    # my_zero_pfn(), pte_mkspecial(), vm_page_prot of a private mapping: read-only
    assert pte_present(e)
    assert pte_pfn(e) == mem.zero_pfn
    assert pte_special(e)
    assert not pte_write(e)
    # the zero page is not an anon page and is not counted in rss
    assert rss(proc, MM_ANONPAGES) == 0
    # only the touched page was faulted
    assert pte(proc, a + PAGE_SIZE) == 0


def test_do_anonymous_page_read_fault_counted(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE)
    with proc.system.stats.measure() as d:
        proc.read(a, 1)
    assert d["fault.do_anonymous_page"] == 1


def test_do_anonymous_page_write_maps_new_zeroed_exclusive_page(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * PAGE_SIZE)
    mem = proc.system.mem
    free_before = mem.nr_free
    proc.write(a + 8, b"abc")
    e = pte(proc, a)
    pfn = pte_pfn(e)
    assert pte_present(e) and pte_write(e) and pte_dirty(e)
    assert not pte_special(e)
    assert pfn != mem.zero_pfn
    # folio_add_new_anon_rmap(..., RMAP_EXCLUSIVE)
    assert mem.flags[pfn] & PG_anon
    assert mem.flags[pfn] & PG_anon_exclusive
    assert mem.refcount[pfn] == 1 and mem.mapcount[pfn] == 1
    assert rss(proc, MM_ANONPAGES) == 1
    # one data page (page-table pages are not RAM frames in the model)
    assert mem.nr_free == free_before - 1
    # the rest of the page was zeroed
    assert proc.read(a, 16) == bytes(8) + b"abc" + bytes(5)
    assert bytes(mem.data[pfn, 11:]) == bytes(PAGE_SIZE - 11)


def test_do_anonymous_page_pages_are_independent(proc) -> None:  # noqa: ANN001
    a = proc.mmap(3 * PAGE_SIZE)
    proc.write(a, b"\x11" * PAGE_SIZE)
    proc.write(a + 2 * PAGE_SIZE, b"\x22" * PAGE_SIZE)
    assert proc.read(a, PAGE_SIZE) == b"\x11" * PAGE_SIZE
    assert proc.read(a + PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert proc.read(a + 2 * PAGE_SIZE, PAGE_SIZE) == b"\x22" * PAGE_SIZE
    assert pte_pfn(pte(proc, a)) != pte_pfn(pte(proc, a + 2 * PAGE_SIZE))
    assert rss(proc, MM_ANONPAGES) == 2


def test_do_anonymous_page_readonly_mapping_write_segfaults(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE, "r")
    assert proc.read(a, 4) == bytes(4)
    with pytest.raises(SegmentationFault) as ei:
        proc.write(a, b"x")
    assert ei.value.signal == 11 and ei.value.write
    assert pte_pfn(pte(proc, a)) == proc.system.mem.zero_pfn


# -- do_wp_page / wp_page_copy -------------------------------------------------------------------
def test_wp_page_copy_replaces_zero_page_on_write_after_read(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * PAGE_SIZE)
    rec = Recorder(proc)
    proc.read(a, 1)
    assert pte_pfn(pte(proc, a)) == proc.system.mem.zero_pfn
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR) == []
    with proc.system.stats.measure() as d:
        proc.write(a, b"z")
    e = pte(proc, a)
    assert pte_pfn(e) != proc.system.mem.zero_pfn
    assert pte_write(e) and pte_dirty(e) and not pte_special(e)
    # wp_page_copy() invalidates exactly the faulting page with MMU_NOTIFY_CLEAR
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR) == [(a, a + PAGE_SIZE)]
    assert d["mmu_notifier.event.CLEAR"] == 1
    assert d["fault.wp_page_copy"] == 1
    assert rss(proc, MM_ANONPAGES) == 1
    assert proc.read(a, 2) == b"z\x00"


def test_do_wp_page_cow_after_fork_both_read_only(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * PAGE_SIZE)
    proc.write(a, b"parent")
    pfn = pte_pfn(pte(proc, a))
    child = proc.fork()
    pe, ce = pte(proc, a), pte(child, a)
    mem = proc.system.mem
    # copy_present_pte(): COW mapping -> write-protected in parent and child, same page
    assert pte_pfn(pe) == pte_pfn(ce) == pfn
    assert not pte_write(pe) and not pte_write(ce)
    assert mem.refcount[pfn] == 2 and mem.mapcount[pfn] == 2
    assert not mem.flags[pfn] & PG_anon_exclusive
    assert rss(child, MM_ANONPAGES) == 1
    assert child.read(a, 6) == b"parent"
    child.exit()


def test_do_wp_page_child_write_copies(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE)
    proc.write(a, b"orig")
    pfn = pte_pfn(pte(proc, a))
    child = proc.fork()
    rec = Recorder(child)
    with proc.system.stats.measure() as d:
        child.write(a, b"kid")
    mem = proc.system.mem
    ce = pte(child, a)
    assert pte_pfn(ce) != pfn and pte_write(ce) and pte_dirty(ce)
    assert d["fault.wp_page_copy"] == 1
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR) == [(a, a + PAGE_SIZE)]
    # the parent still maps the original page, read-only, now its only user
    pe = pte(proc, a)
    assert pte_pfn(pe) == pfn and not pte_write(pe)
    assert mem.refcount[pfn] == 1 and mem.mapcount[pfn] == 1
    assert proc.read(a, 4) == b"orig"
    assert child.read(a, 4) == b"kidg"
    child.exit()


def test_do_wp_page_parent_reuses_page_after_child_exit(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE)
    proc.write(a, b"orig")
    pfn = pte_pfn(pte(proc, a))
    child = proc.fork()
    child.exit()
    assert not pte_write(pte(proc, a))
    rec = Recorder(proc)
    with proc.system.stats.measure() as d:
        proc.write(a, b"new!")
    # wp_can_reuse_anon_folio(): refcount 1 -> wp_page_reuse(), same page, no notifier
    e = pte(proc, a)
    assert pte_pfn(e) == pfn and pte_write(e) and pte_dirty(e)
    assert d["fault.wp_page_reuse"] == 1
    assert d["fault.wp_page_copy"] == 0
    assert rec.ranges == []
    assert proc.system.mem.flags[pfn] & PG_anon_exclusive
    assert proc.read(a, 4) == b"new!"


def test_do_wp_page_parent_write_copies_while_child_alive(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE)
    proc.write(a, b"orig")
    pfn = pte_pfn(pte(proc, a))
    child = proc.fork()
    proc.write(a, b"PAR")
    assert pte_pfn(pte(proc, a)) != pfn
    # the child is now the only user of the old page: its write reuses it
    with proc.system.stats.measure() as d:
        child.write(a, b"KID")
    assert pte_pfn(pte(child, a)) == pfn
    assert d["fault.wp_page_reuse"] == 1 and d["fault.wp_page_copy"] == 0
    assert proc.read(a, 4) == b"PARg"
    assert child.read(a, 4) == b"KIDg"
    child.exit()


def test_do_wp_page_child_write_to_shared_zero_page(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE)
    proc.read(a, 1)
    child = proc.fork()
    zero = proc.system.mem.zero_pfn
    assert pte_pfn(pte(proc, a)) == zero
    # a read fault installs the zero page without anon_vma_prepare(), so the VMA has no
    # anon_vma and vma_needs_copy() is false: fork copies no page table for it
    assert proc.mm.vma_lookup(a).anon_vma is None
    assert pte(child, a) == 0
    assert child.read(a, 1) == b"\x00"
    child.write(a, b"c")
    assert pte_pfn(pte(child, a)) != zero
    assert pte_pfn(pte(proc, a)) == zero
    assert proc.read(a, 1) == b"\x00"
    child.exit()


# -- THP: do_huge_pmd_anonymous_page ---------------------------------------------------------------
def test_do_huge_pmd_anonymous_page_write_maps_pmd_thp(proc) -> None:  # noqa: ANN001
    a = anon_thp_area(proc)
    assert proc.mm.vma_lookup(a).vm_flags & VM_HUGEPAGE
    proc.write(a + 5 * PAGE_SIZE, b"thp")
    e = pte(proc, a)
    mem = proc.system.mem
    head = pte_pfn(e)
    assert pmd_leaf(e) and e & _PAGE_PSE
    assert pte_write(e) and pte_dirty(e)
    assert head % HPAGE_PMD_NR == 0
    assert mem.order[head] == 9 and mem.entire_mapcount[head] == 1
    # the same pmd maps the whole 2 MiB
    assert pte(proc, a + HPAGE_PMD_SIZE - PAGE_SIZE) == e
    assert rss(proc, MM_ANONPAGES) == HPAGE_PMD_NR
    assert proc.read(a + 5 * PAGE_SIZE, 3) == b"thp"
    assert proc.read(a + 6 * PAGE_SIZE, 3) == bytes(3)


def test_do_huge_pmd_anonymous_page_read_maps_huge_zero_page(proc) -> None:  # noqa: ANN001
    a = anon_thp_area(proc)
    assert proc.read(a + 7 * PAGE_SIZE, 4) == bytes(4)
    e = pte(proc, a)
    mem = proc.system.mem
    assert pmd_leaf(e) and not pte_write(e)
    assert mem.is_huge_zero_pfn(pte_pfn(e))
    assert rss(proc, MM_ANONPAGES) == 0


def test_do_huge_pmd_wp_page_huge_zero_splits_and_copies_one_page(make_system) -> None:  # noqa: ANN001
    """6.12 (no ``huge_zero_wp_allocates_thp``): split the huge zero pmd, COW one page."""
    proc = make_system(kernel="6.12").spawn("test")
    a = anon_thp_area(proc)
    proc.read(a, 1)
    assert pmd_leaf(pte(proc, a))
    rec = Recorder(proc)
    target = a + 10 * PAGE_SIZE
    proc.write(target, b"w")
    mem = proc.system.mem
    # __split_huge_pmd() of the huge zero pmd: 512 small zero-page ptes, then wp_page_copy
    assert not pmd_leaf(pte(proc, a))
    for off in (0, 9, 11, 511):
        e = pte(proc, a + off * PAGE_SIZE)
        assert pte_pfn(e) == mem.zero_pfn and pte_special(e) and not pte_write(e) and not e & _PAGE_PSE
    e = pte(proc, target)
    assert pte_pfn(e) != mem.zero_pfn and pte_write(e) and not e & _PAGE_PSE
    assert mem.order[pte_pfn(e)] == 0
    assert rss(proc, MM_ANONPAGES) == 1
    clears = rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR)
    assert clears == [(a, a + HPAGE_PMD_SIZE), (target, target + PAGE_SIZE)]
    assert proc.system.stats["thp.fault_alloc"] == 0
    assert proc.read(target, 2) == b"w\x00"


def test_do_huge_zero_wp_pmd_write_replaces_huge_zero_by_thp(make_system) -> None:  # noqa: ANN001
    """7.3 (``huge_zero_wp_allocates_thp``): one MMU_NOTIFY_CLEAR of the 2 MiB range, a
    new zeroed writable THP, THP_FAULT_ALLOC counted, 512 pages of rss."""
    proc = make_system(kernel="7.3").spawn("test")
    a = anon_thp_area(proc)
    proc.read(a, 1)
    mem = proc.system.mem
    assert mem.is_huge_zero_pfn(pte_pfn(pte(proc, a)))
    rec = Recorder(proc)
    target = a + 10 * PAGE_SIZE
    proc.write(target, b"w")
    e = pte(proc, a)
    assert pmd_leaf(e) and pte_write(e) and pte_dirty(e)
    head = pte_pfn(e)
    assert not mem.is_huge_zero_pfn(head) and mem.order[head] == 9
    assert mem.flags[head] & PG_anon and mem.flags[head] & PG_anon_exclusive
    assert rss(proc, MM_ANONPAGES) == HPAGE_PMD_NR
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR) == [(a, a + HPAGE_PMD_SIZE)]
    assert proc.system.stats["thp.fault_alloc"] == 1
    assert proc.read(target, 2) == b"w\x00"
    assert proc.read(a, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert proc.read(a + 511 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_do_huge_zero_wp_pmd_without_a_free_thp_falls_back_to_split(make_system) -> None:  # noqa: ANN001
    """7.3: when ``vma_alloc_anon_folio_pmd()`` fails (THP_FAULT_FALLBACK counted), the
    huge zero pmd is split and the pte fault copies one page, as in 6.12."""
    sys = make_system(kernel="7.3")
    proc = sys.spawn("test")
    a = anon_thp_area(proc)
    proc.read(a, 1)
    held = []
    while (h := sys.mem.alloc_folio(9)) >= 0:
        held.append(h)
    # give one block back and break it up: order-0 pages remain, no whole 2 MiB block
    sys.mem.free_pages([held.pop()])
    held.append(sys.mem.alloc_page())
    rec = Recorder(proc)
    target = a + 5 * PAGE_SIZE
    proc.write(target, b"f")
    sys.mem.free_pages(held)
    assert not pmd_leaf(pte(proc, a))
    assert pte_pfn(pte(proc, a)) == sys.mem.zero_pfn
    e = pte(proc, target)
    assert pte_write(e) and sys.mem.order[pte_pfn(e)] == 0
    assert rss(proc, MM_ANONPAGES) == 1
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR) == [
        (a, a + HPAGE_PMD_SIZE), (target, target + PAGE_SIZE)]
    assert sys.stats["thp.fault_fallback"] == 1 and sys.stats["thp.fault_alloc"] == 0
    assert proc.read(target, 2) == b"f\x00"


def test_do_huge_pmd_wp_page_after_fork_splits_parent(proc) -> None:  # noqa: ANN001
    a = anon_thp_area(proc)
    proc.write(a, b"x" * 16)
    head = pte_pfn(pte(proc, a))
    child = proc.fork()
    assert pmd_leaf(pte(child, a)) and not pte_write(pte(child, a))
    assert not pte_write(pte(proc, a))
    proc.write(a + 3 * PAGE_SIZE, b"P")
    # the shared THP cannot be reused: the parent's pmd is split, one page copied
    pe = pte(proc, a + 3 * PAGE_SIZE)
    assert not pe & _PAGE_PSE and pte_pfn(pe) != head + 3 and pte_write(pe)
    other = pte(proc, a + 4 * PAGE_SIZE)
    assert pte_pfn(other) == head + 4 and not pte_write(other)
    # the child still maps the THP with its pmd
    ce = pte(child, a)
    assert pmd_leaf(ce) and pte_pfn(ce) == head
    assert child.read(a + 3 * PAGE_SIZE, 1) == b"\x00"
    assert proc.read(a + 3 * PAGE_SIZE, 1) == b"P"
    assert proc.read(a, 2) == b"xx" and child.read(a, 2) == b"xx"
    child.exit()


def test_change_huge_pmd_makes_exclusive_thp_writable(proc) -> None:  # noqa: ANN001
    a = anon_thp_area(proc)
    proc.write(a, b"a")
    head = pte_pfn(pte(proc, a))
    proc.mprotect(a, HPAGE_PMD_SIZE, "r")
    assert not pte_write(pte(proc, a))
    proc.mprotect(a, HPAGE_PMD_SIZE, "rw")
    # change_huge_pmd(MM_CP_TRY_CHANGE_WRITABLE): exclusive anon THP is writable at once
    e = pte(proc, a)
    assert pmd_leaf(e) and pte_write(e) and pte_pfn(e) == head


def test_thp_vma_allowable_order_madvise_mode_needs_madv_hugepage(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    proc.write(a, b"x")
    e = pte(proc, a)
    assert not e & _PAGE_PSE
    assert rss(proc, MM_ANONPAGES) == 1


def test_thp_vma_allowable_order_never_mode(make_system) -> None:  # noqa: ANN001
    p = make_system(thp="never").spawn()
    a = anon_thp_area(p)
    p.write(a, b"x")
    assert not pte(p, a) & _PAGE_PSE
    p.read(a + PAGE_SIZE, 1)
    # no huge zero page either: the small zero page
    e = pte(p, a + PAGE_SIZE)
    assert not e & _PAGE_PSE and pte_pfn(e) == p.system.mem.zero_pfn
    assert rss(p, MM_ANONPAGES) == 1


def test_thp_vma_allowable_order_always_mode(make_system) -> None:  # noqa: ANN001
    p = make_system(thp="always").spawn()
    a = p.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    p.write(a, b"x")
    e = pte(p, a)
    assert pmd_leaf(e) and pte_write(e)
    assert rss(p, MM_ANONPAGES) == HPAGE_PMD_NR


def test_thp_vma_allowable_order_always_mode_respects_nohugepage(make_system) -> None:  # noqa: ANN001
    p = make_system(thp="always").spawn()
    a = p.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    p.madvise(a, HPAGE_PMD_SIZE, "nohugepage")
    p.write(a, b"x")
    assert not pte(p, a) & _PAGE_PSE
    assert rss(p, MM_ANONPAGES) == 1


def test_thp_vma_suitable_order_block_must_fit_in_vma(make_system) -> None:  # noqa: ANN001
    p = make_system(thp="always").spawn()
    # one page short of a full aligned 2 MiB block: no THP can be mapped
    a = p.mmap(HPAGE_PMD_SIZE - PAGE_SIZE, addr=BASE, fixed=True)
    p.write(a, b"x")
    assert not pte(p, a) & _PAGE_PSE
    assert rss(p, MM_ANONPAGES) == 1


def test_do_huge_pmd_wp_page_reuses_thp_after_child_exit(proc) -> None:  # noqa: ANN001
    a = anon_thp_area(proc)
    proc.write(a, b"x")
    head = pte_pfn(pte(proc, a))
    child = proc.fork()
    child.exit()
    assert not pte_write(pte(proc, a))
    proc.write(a + PAGE_SIZE, b"y")
    # refcount 1 again: the whole THP is reused, still PMD-mapped
    e = pte(proc, a)
    assert pmd_leaf(e) and pte_write(e) and pte_pfn(e) == head
    assert proc.system.mem.flags[head] & PG_anon_exclusive


@pytest.mark.parametrize("kernel, child_rss", [("6.12", 1), ("7.3", HPAGE_PMD_NR)])
def test_copy_huge_pmd_shares_huge_zero_page(make_system, kernel: str, child_rss: int) -> None:  # noqa: ANN001
    """The child's write COWs one page (6.12) or gets its own THP (7.3); the parent keeps
    the huge zero pmd."""
    proc = make_system(kernel=kernel).spawn("test")
    a = anon_thp_area(proc)
    proc.read(a, 1)
    child = proc.fork()
    ce = pte(child, a)
    assert pmd_leaf(ce) and proc.system.mem.is_huge_zero_pfn(pte_pfn(ce)) and not pte_write(ce)
    assert rss(child, MM_ANONPAGES) == 0
    child.write(a + 2 * PAGE_SIZE, b"c")
    assert pmd_leaf(pte(proc, a)) and proc.system.mem.is_huge_zero_pfn(pte_pfn(pte(proc, a)))
    assert rss(child, MM_ANONPAGES) == child_rss
    assert pmd_leaf(pte(child, a)) == (kernel == "7.3")
    assert proc.read(a + 2 * PAGE_SIZE, 1) == b"\x00"
    assert child.read(a + 2 * PAGE_SIZE, 1) == b"c"
    child.exit()


def test_do_huge_pmd_anonymous_page_unaligned_vma_start(make_system) -> None:  # noqa: ANN001
    p = make_system(thp="always").spawn()
    # [BASE + 4K, BASE + 4M): only the block [BASE + 2M, BASE + 4M) fits
    a = p.mmap(2 * HPAGE_PMD_SIZE - PAGE_SIZE, addr=BASE + PAGE_SIZE, fixed=True)
    p.write(a, b"s")
    p.write(BASE + HPAGE_PMD_SIZE, b"h")
    assert not pte(p, a) & _PAGE_PSE
    assert pmd_leaf(pte(p, BASE + HPAGE_PMD_SIZE))
    assert rss(p, MM_ANONPAGES) == 1 + HPAGE_PMD_NR


# -- hugetlb ---------------------------------------------------------------------------------------
def test_hugetlb_fault_maps_2mib_page(proc) -> None:  # noqa: ANN001
    pool = proc.system.hugetlb
    free0 = pool.free_huge_pages
    a = proc.mmap(HPAGE_PMD_SIZE, hugetlb=True)
    assert a % HPAGE_PMD_SIZE == 0
    # the private mapping reserved its page at mmap time
    assert pool.resv_huge_pages == 1
    assert pool.free_huge_pages == free0
    proc.write(a + 3 * PAGE_SIZE, b"huge")
    e = pte(proc, a)
    assert pmd_leaf(e) and pte_write(e) and pte_dirty(e)
    assert pte(proc, a + HPAGE_PMD_SIZE - 1) == e
    assert pool.free_huge_pages == free0 - 1
    assert pool.resv_huge_pages == 0
    # hugetlb pages are accounted in hugetlb_usage, not in rss
    assert rss(proc, MM_ANONPAGES) == 0
    assert proc.mm.hugetlb_usage == HPAGE_PMD_NR
    assert proc.read(a + 3 * PAGE_SIZE, 4) == b"huge"
    assert proc.read(a, 4) == bytes(4)


def test_hugetlb_reserve_pages_pool_exhausted_mmap_enomem(proc) -> None:  # noqa: ANN001
    n = proc.system.hugetlb.free_huge_pages
    with pytest.raises(OutOfMemory):
        proc.mmap((n + 1) * HPAGE_PMD_SIZE, hugetlb=True)
    # a rejected call changes nothing
    assert proc.mm.map_count == 0
    assert proc.system.hugetlb.resv_huge_pages == 0
    a = proc.mmap(n * HPAGE_PMD_SIZE, hugetlb=True)
    assert proc.system.hugetlb.resv_huge_pages == n
    with pytest.raises(OutOfMemory):
        proc.mmap(HPAGE_PMD_SIZE, hugetlb=True)
    proc.munmap(a, n * HPAGE_PMD_SIZE)
    assert proc.system.hugetlb.resv_huge_pages == 0


def test_hugetlb_no_page_noreserve_pool_empty_sigbus(proc) -> None:  # noqa: ANN001
    n = proc.system.hugetlb.free_huge_pages
    a = proc.mmap((n + 1) * HPAGE_PMD_SIZE, hugetlb=True, noreserve=True)
    assert proc.system.hugetlb.resv_huge_pages == 0
    proc.touch(a, n * HPAGE_PMD_SIZE, write=True)
    assert proc.system.hugetlb.free_huge_pages == 0
    # alloc_hugetlb_folio() fails -> VM_FAULT_SIGBUS
    with pytest.raises(BusError):
        proc.read(a + n * HPAGE_PMD_SIZE, 1)
    assert pte(proc, a + n * HPAGE_PMD_SIZE) == 0


def test_hugetlb_wp_cow_after_fork(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, hugetlb=True)
    proc.write(a, b"hp")
    head = pte_pfn(pte(proc, a))
    child = proc.fork()
    assert not pte_write(pte(proc, a)) and not pte_write(pte(child, a))
    assert pte_pfn(pte(child, a)) == head
    child.write(a, b"C")
    assert pte_pfn(pte(child, a)) != head
    assert proc.read(a, 2) == b"hp" and child.read(a, 2) == b"Cp"
    child.exit()


def test_hugetlb_shared_mapping_visible_across_fork(proc) -> None:  # noqa: ANN001
    pool = proc.system.hugetlb
    a = proc.mmap(HPAGE_PMD_SIZE, shared=True, hugetlb=True)
    # a shared mapping reserves for the file at mmap time
    assert pool.resv_huge_pages == 1
    proc.write(a, b"parent")
    assert pool.resv_huge_pages == 0
    e = pte(proc, a)
    # shared: writable at once, no COW
    assert pmd_leaf(e) and pte_write(e)
    child = proc.fork()
    assert child.read(a, 6) == b"parent"
    assert pte_pfn(pte(child, a)) == pte_pfn(e)
    child.write(a, b"CHILD")
    assert proc.read(a, 6) == b"CHILDt"
    child.exit()


def test_hugetlb_mmap_length_rounded_to_huge_page(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE, hugetlb=True)
    v = proc.mm.vma_lookup(a)
    assert (v.vm_start, v.vm_end) == (a, a + HPAGE_PMD_SIZE)
    proc.write(a + HPAGE_PMD_SIZE - 1, b"e")
    assert proc.read(a + HPAGE_PMD_SIZE - 1, 1) == b"e"


def test_hugetlb_mprotect_readonly_then_back(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, hugetlb=True)
    proc.write(a, b"h")
    proc.mprotect(a, HPAGE_PMD_SIZE, "r")
    assert not pte_write(pte(proc, a))
    with pytest.raises(SegmentationFault):
        proc.write(a, b"x")
    proc.mprotect(a, HPAGE_PMD_SIZE, "rw")
    head = pte_pfn(pte(proc, a))
    proc.write(a, b"H")
    # an exclusive private huge page is reused by hugetlb_wp()
    assert pte_pfn(pte(proc, a)) == head and pte_write(pte(proc, a))
    assert proc.read(a, 1) == b"H"


# -- file mappings (tmpfs): do_read_fault, do_cow_fault, do_shared_fault -----------------------------
def test_do_shared_fault_write_changes_file(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(4 * PAGE_SIZE)
    a = proc.mmap(4 * PAGE_SIZE, shared=True, fd=fd)
    proc.write(a + PAGE_SIZE + 3, b"shared")
    e = pte(proc, a + PAGE_SIZE)
    assert pte_write(e) and pte_dirty(e)
    mem = proc.system.mem
    assert not mem.flags[pte_pfn(e)] & PG_anon
    # do_shared_fault() (no fault-around on write faults): one shmem page mapped
    assert rss(proc, MM_SHMEMPAGES) == 1 and rss(proc, MM_ANONPAGES) == 0
    assert proc.pread(fd, 6, PAGE_SIZE + 3) == b"shared"
    # and the other way round: pwrite is seen through the mapping
    proc.pwrite(fd, b"file", 2 * PAGE_SIZE)
    assert proc.read(a + 2 * PAGE_SIZE, 4) == b"file"


def test_do_cow_fault_private_write_leaves_file_unchanged(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(2 * PAGE_SIZE)
    proc.pwrite(fd, b"original", 0)
    a = proc.mmap(2 * PAGE_SIZE, fd=fd)
    with proc.system.stats.measure() as d:
        proc.write(a, b"PRIV")
    assert d["fault.do_cow_fault"] == 1
    e = pte(proc, a)
    mem = proc.system.mem
    pfn = pte_pfn(e)
    assert pte_write(e) and pte_dirty(e)
    # an anonymous copy of the file page
    assert mem.flags[pfn] & PG_anon and mem.flags[pfn] & PG_anon_exclusive
    assert rss(proc, MM_ANONPAGES) == 1 and rss(proc, MM_SHMEMPAGES) == 0
    assert proc.read(a, 8) == b"PRIVinal"
    assert proc.pread(fd, 8, 0) == b"original"


def test_do_read_fault_private_then_write_copies(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(PAGE_SIZE)
    proc.pwrite(fd, b"filedata", 0)
    a = proc.mmap(PAGE_SIZE, fd=fd)
    assert proc.read(a, 8) == b"filedata"
    e = pte(proc, a)
    mem = proc.system.mem
    cache_pfn = pte_pfn(e)
    # the page-cache page itself, read-only in a private mapping
    assert not pte_write(e) and not mem.flags[cache_pfn] & PG_anon
    assert rss(proc, MM_SHMEMPAGES) == 1
    rec = Recorder(proc)
    proc.write(a, b"X")
    e = pte(proc, a)
    assert pte_pfn(e) != cache_pfn and pte_write(e)
    assert mem.flags[pte_pfn(e)] & PG_anon
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR) == [(a, a + PAGE_SIZE)]
    assert rss(proc, MM_SHMEMPAGES) == 0 and rss(proc, MM_ANONPAGES) == 1
    assert proc.read(a, 8) == b"Xiledata"
    assert proc.pread(fd, 8, 0) == b"filedata"


def test_do_shared_fault_read_maps_writable_tmpfs_page(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(PAGE_SIZE)
    proc.pwrite(fd, b"abc", 0)
    a = proc.mmap(PAGE_SIZE, shared=True, fd=fd)
    assert proc.read(a, 3) == b"abc"
    # tmpfs needs no write notification: vm_page_prot of a shared writable mapping is
    # writable, so even a read fault installs a writable pte
    e = pte(proc, a)
    assert pte_write(e)
    with proc.system.stats.measure() as d:
        proc.write(a, b"Z")
    assert d["fault.handle_mm_fault"] == 0
    assert proc.pread(fd, 3, 0) == b"Zbc"


def test_do_fault_around_maps_cached_neighbours(proc) -> None:  # noqa: ANN001
    npages = 64
    fd = proc.open_tmpfile(npages * PAGE_SIZE)
    proc.pwrite(fd, bytes(range(1, 65)) * (npages * PAGE_SIZE // 64), 0)  # every page cached
    a = proc.mmap(npages * PAGE_SIZE, "r", fd=fd, addr=BASE, fixed=True)
    with proc.system.stats.measure() as d:
        proc.read(a + 20 * PAGE_SIZE, 1)
    assert d["fault.handle_mm_fault"] == 1
    # fault_around_bytes = 64 KiB: the 16-page aligned window [16, 32) is mapped
    mapped = [i for i in range(npages) if pte(proc, a + i * PAGE_SIZE) != 0]
    assert mapped == list(range(16, 32))
    assert rss(proc, MM_SHMEMPAGES) == 16
    # the neighbours map the right page-cache pages
    for i in (16, 31):
        assert proc.read(a + i * PAGE_SIZE, 4) == bytes(range(1, 65))[:4]


def test_do_fault_around_skips_uncached_pages(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(16 * PAGE_SIZE)
    for i in (0, 2, 9):
        proc.pwrite(fd, b"c", i * PAGE_SIZE)
    a = proc.mmap(16 * PAGE_SIZE, "r", fd=fd, addr=BASE, fixed=True)
    proc.read(a + 5 * PAGE_SIZE, 1)  # a hole: shmem_fault() allocates it
    mapped = [i for i in range(16) if pte(proc, a + i * PAGE_SIZE) != 0]
    assert mapped == [0, 2, 5, 9]


def test_do_fault_around_clamped_to_vma(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(32 * PAGE_SIZE)
    proc.pwrite(fd, b"\x01" * (32 * PAGE_SIZE), 0)
    # the VMA starts at file page 4, at pte index 4 of its table
    a = proc.mmap(8 * PAGE_SIZE, "r", fd=fd, offset=4 * PAGE_SIZE, addr=BASE + 4 * PAGE_SIZE, fixed=True)
    proc.read(a + 2 * PAGE_SIZE, 1)
    mapped = [i for i in range(8) if pte(proc, a + i * PAGE_SIZE) != 0]
    assert mapped == list(range(8))
    assert rss(proc, MM_SHMEMPAGES) == 8


def test_shmem_fault_past_eof_sigbus(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(2 * PAGE_SIZE + 100)
    a = proc.mmap(8 * PAGE_SIZE, shared=True, fd=fd)
    # the partial last page is inside i_size
    assert proc.read(a + 2 * PAGE_SIZE, 4) == bytes(4)
    with pytest.raises(BusError) as ei:
        proc.read(a + 3 * PAGE_SIZE, 4)
    assert ei.value.signal == 7 and ei.value.addr == a + 3 * PAGE_SIZE
    with pytest.raises(BusError):
        proc.write(a + 5 * PAGE_SIZE, b"x")
    assert pte(proc, a + 3 * PAGE_SIZE) == 0


def test_shmem_fault_past_eof_sigbus_private(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(PAGE_SIZE)
    a = proc.mmap(2 * PAGE_SIZE, fd=fd)
    with pytest.raises(BusError):
        proc.write(a + PAGE_SIZE, b"x")
    assert rss(proc, MM_ANONPAGES) == 0


def test_do_user_addr_fault_prot_none_segfaults(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * PAGE_SIZE, "none")
    with pytest.raises(SegmentationFault) as ei:
        proc.read(a, 1)
    assert ei.value.signal == 11 and not isinstance(ei.value, BusError)
    with pytest.raises(SegmentationFault):
        proc.write(a + PAGE_SIZE, b"x")
    assert pte(proc, a) == 0 and pte(proc, a + PAGE_SIZE) == 0


def test_do_user_addr_fault_no_vma_segfaults(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE)
    proc.munmap(a, PAGE_SIZE)
    with pytest.raises(SegmentationFault):
        proc.read(a, 1)


def test_do_user_addr_fault_prot_none_after_data(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE)
    proc.write(a, b"keep")
    proc.mprotect(a, PAGE_SIZE, "none")
    e = pte(proc, a)
    assert pte_protnone(e) and pte_present(e)
    with pytest.raises(SegmentationFault):
        proc.read(a, 1)
    proc.mprotect(a, PAGE_SIZE, "r")
    assert proc.read(a, 4) == b"keep"


def test_shmem_fault_shared_anon_read_allocates_page(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * PAGE_SIZE, shared=True)
    assert proc.read(a, 4) == bytes(4)
    e = pte(proc, a)
    mem = proc.system.mem
    # MAP_SHARED|MAP_ANONYMOUS is tmpfs: a read fault allocates a real (shmem) page,
    # never the zero page
    assert pte_pfn(e) != mem.zero_pfn and not pte_special(e)
    assert not mem.flags[pte_pfn(e)] & PG_anon
    assert rss(proc, MM_SHMEMPAGES) == 1 and rss(proc, MM_ANONPAGES) == 0


def test_do_read_fault_private_sees_file_changes_until_cow(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(PAGE_SIZE)
    proc.pwrite(fd, b"v1", 0)
    a = proc.mmap(PAGE_SIZE, fd=fd)
    assert proc.read(a, 2) == b"v1"
    # not yet copied: the private mapping maps the page-cache page itself
    proc.pwrite(fd, b"v2", 0)
    assert proc.read(a, 2) == b"v2"
    proc.write(a + 100, b"!")
    proc.pwrite(fd, b"v3", 0)
    assert proc.read(a, 2) == b"v2"


def test_shmem_setattr_truncate_unmaps_and_sigbus(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(4 * PAGE_SIZE)
    proc.pwrite(fd, b"\x07" * (4 * PAGE_SIZE), 0)
    sh = proc.mmap(4 * PAGE_SIZE, shared=True, fd=fd)
    pr = proc.mmap(4 * PAGE_SIZE, fd=fd)
    proc.touch(sh, 4 * PAGE_SIZE)
    proc.write(pr + 3 * PAGE_SIZE, b"cow")  # a private COW copy beyond the new size
    proc.ftruncate(fd, PAGE_SIZE + 10)
    # unmap_mapping_range(..., even_cows=1): shared and private COW pages past EOF go
    assert pte(proc, sh + 2 * PAGE_SIZE) == 0 and pte(proc, sh + 3 * PAGE_SIZE) == 0
    assert pte(proc, pr + 3 * PAGE_SIZE) == 0
    with pytest.raises(BusError):
        proc.read(sh + 2 * PAGE_SIZE, 1)
    with pytest.raises(BusError):
        proc.read(pr + 3 * PAGE_SIZE, 1)
    # the partial last page survives, zeroed past the new size
    assert proc.read(sh + PAGE_SIZE, 12) == b"\x07" * 10 + bytes(2)
    assert proc.read(sh, 1) == b"\x07"


def test_do_user_addr_fault_write_to_readonly_shared_mapping(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(PAGE_SIZE)
    a = proc.mmap(PAGE_SIZE, "r", shared=True, fd=fd)
    assert proc.read(a, 1) == b"\x00"
    with pytest.raises(SegmentationFault):
        proc.write(a, b"x")
    assert proc.pread(fd, 1, 0) == b"\x00"


# -- do_numa_page ----------------------------------------------------------------------------------
def test_do_numa_page_restores_writable_exclusive_anon(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * PAGE_SIZE)
    proc.write(a, b"numa")
    pfn = pte_pfn(pte(proc, a))
    proc.numa_hint(a, 2 * PAGE_SIZE)
    e = pte(proc, a)
    assert pte_protnone(e) and pte_present(e) and not pte_write(e)
    assert pte_pfn(e) == pfn
    with proc.system.stats.measure() as d:
        assert proc.read(a, 4) == b"numa"
    assert d["fault.do_numa_page"] == 1
    e = pte(proc, a)
    # do_numa_page(): vm_page_prot again, and writable since the page is AnonExclusive
    assert not pte_protnone(e) and pte_write(e) and pte_pfn(e) == pfn
    with proc.system.stats.measure() as d:
        proc.write(a, b"N")
    assert d["fault.handle_mm_fault"] == 0


def test_change_prot_numa_skips_zero_page(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE)
    proc.read(a, 1)
    before = pte(proc, a)
    proc.numa_hint(a, PAGE_SIZE)
    # vm_normal_folio() is NULL for the zero page: not made protnone
    assert pte(proc, a) == before


def test_do_numa_page_readonly_vma_stays_readonly(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE)
    proc.write(a, b"r")
    proc.mprotect(a, PAGE_SIZE, "r")
    proc.numa_hint(a, PAGE_SIZE)
    assert pte_protnone(pte(proc, a))
    assert proc.read(a, 1) == b"r"
    e = pte(proc, a)
    assert not pte_protnone(e) and not pte_write(e)


def test_change_prot_numa_skips_shared_cow_pages(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE)
    proc.write(a, b"s")
    child = proc.fork()
    before = pte(proc, a)
    proc.numa_hint(a, PAGE_SIZE)
    # change_pte_range(MM_CP_PROT_NUMA): "Also skip shared copy-on-write pages"
    # (is_cow_mapping && folio_likely_mapped_shared)
    assert pte(proc, a) == before
    child.exit()


def test_do_huge_pmd_numa_page_restores_thp(proc) -> None:  # noqa: ANN001
    a = anon_thp_area(proc)
    proc.write(a, b"T")
    head = pte_pfn(pte(proc, a))
    proc.numa_hint(a, HPAGE_PMD_SIZE)
    e = pte(proc, a)
    assert pte_protnone(e) and e & _PAGE_PSE
    assert proc.read(a, 1) == b"T"
    e = pte(proc, a)
    assert pmd_leaf(e) and not pte_protnone(e) and pte_write(e) and pte_pfn(e) == head


# -- swap: MADV_PAGEOUT, do_swap_page ---------------------------------------------------------------
def test_do_swap_page_reads_back_paged_out_data(make_system) -> None:  # noqa: ANN001
    p = make_system(swap_pages=64).spawn()
    a = p.mmap(4 * PAGE_SIZE)
    data = bytes(np.arange(4 * PAGE_SIZE, dtype=np.uint8) ^ 0x5A)
    p.write(a, data)
    pfns = [pte_pfn(pte(p, a + i * PAGE_SIZE)) for i in range(4)]
    p.madvise(a, 4 * PAGE_SIZE, "pageout")
    for i in range(4):
        e = pte(p, a + i * PAGE_SIZE)
        assert is_swap_pte(e) and not pte_present(e)
        ent = pte_to_swp_entry(e)
        assert not non_swap_entry(ent) and swp_type(ent) == 0 and swp_offset(ent) > 0
        assert decode_pte(e).startswith("swap-type-0 ")
    assert len({swp_offset(pte_to_swp_entry(pte(p, a + i * PAGE_SIZE))) for i in range(4)}) == 4
    assert rss(p, MM_ANONPAGES) == 0 and rss(p, MM_SWAPENTS) == 4
    assert p.system.mem.mapcount[pfns].sum() == 0
    assert p.read(a, 4 * PAGE_SIZE) == data
    for i in range(4):
        e = pte(p, a + i * PAGE_SIZE)
        assert pte_present(e)
        # do_swap_page(): an exclusive page in a writable VMA is mapped writable at once
        assert pte_write(e)
    assert rss(p, MM_ANONPAGES) == 4 and rss(p, MM_SWAPENTS) == 0
    assert p.system.swap.inuse == 0


def test_do_swap_page_write_fault(make_system) -> None:  # noqa: ANN001
    p = make_system(swap_pages=8).spawn()
    a = p.mmap(PAGE_SIZE)
    p.write(a, b"before")
    p.madvise(a, PAGE_SIZE, "pageout")
    assert is_swap_pte(pte(p, a))
    p.write(a, b"AFT")
    e = pte(p, a)
    assert pte_write(e) and pte_dirty(e)
    assert p.read(a, 6) == b"AFTore"


def test_madvise_pageout_without_swap_keeps_pages(proc) -> None:  # noqa: ANN001
    a = proc.mmap(PAGE_SIZE)
    proc.write(a, b"stay")
    before = pte(proc, a)
    proc.madvise(a, PAGE_SIZE, "pageout")
    assert pte(proc, a) == before
    assert proc.read(a, 4) == b"stay"


def test_madvise_pageout_skips_shared_pages(make_system) -> None:  # noqa: ANN001
    p = make_system(swap_pages=8).spawn()
    a = p.mmap(PAGE_SIZE)
    p.write(a, b"both")
    child = p.fork()
    p.madvise(a, PAGE_SIZE, "pageout")
    # madvise_cold_or_pageout_pte_range() leaves folios mapped by other processes alone
    assert pte_present(pte(p, a))
    assert p.read(a, 4) == b"both" and child.read(a, 4) == b"both"
    child.exit()


def test_do_swap_page_after_fork_shares_swap_entry(make_system) -> None:  # noqa: ANN001
    p = make_system(swap_pages=8).spawn()
    a = p.mmap(PAGE_SIZE)
    p.write(a, b"swp")
    p.madvise(a, PAGE_SIZE, "pageout")
    child = p.fork()
    # copy_nonpresent_pte(): the child gets the same swap entry (swap_duplicate)
    assert is_swap_pte(pte(child, a))
    assert pte_to_swp_entry(pte(child, a)) == pte_to_swp_entry(pte(p, a))
    assert rss(child, MM_SWAPENTS) == 1
    assert child.read(a, 3) == b"swp"
    # the slot is shared: the swapped-in page may not be mapped writable
    assert not pte_write(pte(child, a))
    child.write(a, b"C")
    assert p.read(a, 3) == b"swp" and child.read(a, 3) == b"Cwp"
    child.exit()


def test_zap_nonpresent_ptes_dontneed_frees_swap_slot(make_system) -> None:  # noqa: ANN001
    p = make_system(swap_pages=8).spawn()
    a = p.mmap(2 * PAGE_SIZE)
    p.write(a, b"gone")
    p.write(a + PAGE_SIZE, b"kept")
    p.madvise(a, 2 * PAGE_SIZE, "pageout")
    assert p.system.swap.inuse == 2 and rss(p, MM_SWAPENTS) == 2
    p.madvise(a, PAGE_SIZE, "dontneed")
    assert pte(p, a) == 0
    assert p.system.swap.inuse == 1 and rss(p, MM_SWAPENTS) == 1
    assert p.read(a, 4) == bytes(4)
    assert p.read(a + PAGE_SIZE, 4) == b"kept"


def test_madvise_free_pte_range_drops_swapped_out_data(make_system) -> None:  # noqa: ANN001
    p = make_system(swap_pages=8).spawn()
    a = p.mmap(PAGE_SIZE)
    p.write(a, b"lazy")
    p.madvise(a, PAGE_SIZE, "pageout")
    p.madvise(a, PAGE_SIZE, "free")
    # madvise_free_pte_range(): swap entries are freed and cleared
    assert pte(p, a) == 0
    assert p.system.swap.inuse == 0 and rss(p, MM_SWAPENTS) == 0
    assert p.read(a, 4) == bytes(4)


def test_do_swap_page_readonly_vma_maps_readonly(make_system) -> None:  # noqa: ANN001
    p = make_system(swap_pages=8).spawn()
    a = p.mmap(PAGE_SIZE)
    p.write(a, b"ro")
    p.madvise(a, PAGE_SIZE, "pageout")
    p.mprotect(a, PAGE_SIZE, "r")
    # change_pte_range() leaves a real swap entry alone
    assert is_swap_pte(pte(p, a))
    assert p.read(a, 2) == b"ro"
    assert not pte_write(pte(p, a))
    p.mprotect(a, PAGE_SIZE, "rw")
    # exclusive anon page: MM_CP_TRY_CHANGE_WRITABLE
    assert pte_write(pte(p, a))


def test_zap_nonpresent_ptes_exit_frees_swap_slots(make_system) -> None:  # noqa: ANN001
    s = make_system(swap_pages=8)
    p = s.spawn()
    a = p.mmap(3 * PAGE_SIZE)
    p.touch(a, 3 * PAGE_SIZE, write=True)
    p.write(a, b"data")
    p.madvise(a, 3 * PAGE_SIZE, "pageout")
    child = p.fork()
    assert s.swap.inuse == 3
    child.exit()
    # the parent's entries still hold the slots
    assert s.swap.inuse == 3
    assert p.read(a, 4) == b"data"
    p.exit()
    assert s.swap.inuse == 0


@pytest.mark.parametrize("kernel, reused", [("6.12", False), ("7.3", True)])
def test_wp_can_reuse_anon_folio_pte_mapped_thp_after_child_exit(make_system, kernel: str,
                                                                  reused: bool) -> None:  # noqa: ANN001
    """A PTE-mapped THP shared with a child that exited: the parent's write reuses the
    page in place with no notifier call (7.3's ``__wp_can_reuse_large_anon_folio``) or
    copies it under an MMU_NOTIFY_CLEAR (6.12)."""
    proc = make_system(kernel=kernel).spawn("test")
    a = anon_thp_area(proc)
    proc.write(a, b"x" * (HPAGE_PMD_SIZE))
    proc.mprotect(a, PAGE_SIZE, "r")          # split the pmd: a PTE-mapped THP
    proc.mprotect(a, PAGE_SIZE, "rw")
    head = pte_pfn(pte(proc, a))
    child = proc.fork()
    child.exit()
    mem = proc.system.mem
    assert not mem.flags[head + 5] & PG_anon_exclusive and not pte_write(pte(proc, a + 5 * PAGE_SIZE))
    rec = Recorder(proc)
    proc.write(a + 5 * PAGE_SIZE, b"y")
    e = pte(proc, a + 5 * PAGE_SIZE)
    assert pte_write(e)
    assert (pte_pfn(e) == head + 5) == reused
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR) == (
        [] if reused else [(a + 5 * PAGE_SIZE, a + 6 * PAGE_SIZE)])
    assert proc.read(a + 5 * PAGE_SIZE, 2) == b"yx"


def test_wp_can_reuse_anon_folio_large_folio_mapped_by_another_mm_copies(make_system) -> None:  # noqa: ANN001
    """7.3: while the child still maps the PTE-mapped THP, the parent's write copies."""
    proc = make_system(kernel="7.3").spawn("test")
    a = anon_thp_area(proc)
    proc.write(a, b"x" * (HPAGE_PMD_SIZE))
    proc.mprotect(a, PAGE_SIZE, "r")
    proc.mprotect(a, PAGE_SIZE, "rw")
    head = pte_pfn(pte(proc, a))
    child = proc.fork()
    proc.write(a + 5 * PAGE_SIZE, b"y")
    assert pte_pfn(pte(proc, a + 5 * PAGE_SIZE)) != head + 5
    assert child.read(a + 5 * PAGE_SIZE, 1) == b"x"
    child.exit()


@pytest.mark.parametrize("kernel, freed", [("6.12", False), ("7.3", True)])
def test_madvise_dontneed_reclaim_pt_frees_empty_pte_table(make_system, kernel: str, freed: bool) -> None:  # noqa: ANN001
    """MADV_DONTNEED of a whole 2 MiB block of 4 KiB pages: 7.3 frees the emptied pte
    table (``zap_pte_range`` with ``reclaim_pt``), so a read after MADV_HUGEPAGE maps the
    huge zero page; 6.12 keeps it and maps the 4 KiB zero page. Half a block keeps its
    table in both."""
    proc = make_system(kernel=kernel).spawn("test")
    a = proc.mmap(2 * HPAGE_PMD_SIZE, "rw", addr=BASE, fixed=True)
    proc.write(a, b"z" * (2 * HPAGE_PMD_SIZE))
    proc.madvise(a, HPAGE_PMD_SIZE, "dontneed")
    proc.madvise(a + HPAGE_PMD_SIZE, HPAGE_PMD_SIZE - PAGE_SIZE, "dontneed")
    assert proc.mm.pmd_ref(a).get() == 0 if freed else proc.mm.pmd_ref(a).get() != 0
    assert proc.mm.pmd_ref(a + HPAGE_PMD_SIZE).get() != 0
    proc.madvise(a, 2 * HPAGE_PMD_SIZE, "hugepage")
    assert proc.read(a, 1) == b"\x00"
    e = pte(proc, a)
    assert pmd_leaf(e) == freed
    assert proc.system.stats["zap.pte_table_reclaimed"] == (1 if freed else 0)


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_madvise_free_pte_range_splits_partly_covered_pte_mapped_thp(make_system, kernel: str) -> None:  # noqa: ANN001
    """MADV_FREE over 4 pages of a PTE-mapped THP splits the folio (both releases); over
    a whole PTE-mapped THP it marks it clean and old without splitting; while a child maps
    it too, it is left alone."""
    proc = make_system(kernel=kernel).spawn("test")
    mem = proc.system.mem
    a = anon_thp_area(proc, 2)
    proc.write(a, b"f" * (2 * HPAGE_PMD_SIZE))
    for base in (a, a + HPAGE_PMD_SIZE):
        proc.mprotect(base, PAGE_SIZE, "r")
        proc.mprotect(base, PAGE_SIZE, "rw")
    h0, h1 = pte_pfn(pte(proc, a)), pte_pfn(pte(proc, a + HPAGE_PMD_SIZE))
    child = proc.fork()
    proc.madvise(a, 4 * PAGE_SIZE, "free")
    assert mem.order[h0] == 9, "mapped by the child too: not split"
    child.exit()
    proc.madvise(a, 4 * PAGE_SIZE, "free")
    assert mem.order[h0] == 0 and mem.order[h0 + 7] == 0
    assert proc.read(a + 4 * PAGE_SIZE, 1) == b"f"
    proc.madvise(a + HPAGE_PMD_SIZE, HPAGE_PMD_SIZE, "free")
    assert mem.order[h1] == 9
    e = pte(proc, a + HPAGE_PMD_SIZE + 3 * PAGE_SIZE)
    from hmmsim.kernel.physmem import PG_dirty
    assert not pte_dirty(e) and not mem.flags[h1] & PG_dirty  # clean: lazily freeable
