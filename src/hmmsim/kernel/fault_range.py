"""The model's batched page fault: ``handle_mm_fault()`` for every page of a range.

This has no kernel counterpart. The kernel's callers (``hmm_range_fault``'s fault step,
``get_user_pages``, a CPU copy) call :func:`~hmmsim.kernel.fault.handle_mm_fault` page by
page; :func:`handle_mm_fault_range` produces exactly what that loop would (the same page
tables, allocation order, rmap/rss counts, counters and notifier calls) while handling the
common states a run of ptes at a time: empty anonymous ptes (``do_anonymous_page``), a
private anonymous pmd with no pte table yet where no THP is made (its first fault makes
the table, the others fill it), and ptes that already allow the access (spurious
faults). Everything else (THP, hugetlb, swap-format entries, file pages, COW) goes
through ``handle_mm_fault`` per page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import huge_memory as hm
from .fault import handle_mm_fault
from .mm import MM_ANONPAGES, PtRef, mmap_assert_locked, ptlock_ptr, set_ptes
from .mm_types import (
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    VM_FAULT_COMPLETED,
    VM_FAULT_ERROR,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
)
from .page_types import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, pte_index
from .pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    pfn_pte,
    pmd_leaf,
    pmd_present,
    pte_mkspecial,
    pte_write,
)
from .rmap import anon_vma_prepare, folio_add_new_anon_rmap_ptes
from .trace import tracepoint_mm_fault_range
from .vma import VM_HUGETLB, VM_SHARED, VM_UFFD_MISSING, VM_WRITE, Vma, vma_is_anonymous

if TYPE_CHECKING:
    from .system import System

__all__ = ("handle_mm_fault_range",)

_U = np.uint64

# entry classes for the vectorised paths
_C_OTHER, _C_NONE, _C_OK = 0, 1, 2
#: results that end the range: an error, or a fault that dropped mmap_lock
_STOP = VM_FAULT_ERROR | VM_FAULT_RETRY | VM_FAULT_COMPLETED


def _account(sys: "System", n: int, handler: str | None) -> None:
    """Count *n* page faults resolved without calling :func:`handle_mm_fault` per page,
    the way the page-by-page loop would have counted them."""
    st = sys.stats
    st.add("fault.handle_mm_fault", n)
    if handler:
        st.add(handler, n)
    st.add("lock.ptl.write", n)


@tracepoint_mm_fault_range
def handle_mm_fault_range(vma: Vma, start: int, end: int, flags: int) -> tuple[int, int]:
    """Fault every page of ``[start, end)`` (inside *vma*) in address order.

    Equivalent to ``for addr in range(start, end, PAGE_SIZE): ret = handle_mm_fault(vma,
    addr, flags)``, stopping at the first ``VM_FAULT_ERROR`` result or at a fault that
    dropped mmap_lock (``VM_FAULT_RETRY``/``VM_FAULT_COMPLETED``, e.g. a userfaultfd): the same page-table
    updates, allocation order, rmap/rss/stat counts and notifier calls. Runs of empty
    anonymous ptes and of ptes that already allow the access are handled a whole
    run at a time, consecutive empty pmds of a private anonymous VMA (writes, no THP)
    together; everything else goes through :func:`handle_mm_fault`.

    :return: ``(vm_fault_t of the failing page or 0, address of the failing page or end)``
    """
    mm = vma.vm_mm
    mmap_assert_locked(mm)
    mm.sys.ls.assert_no_pt_locks("handle_mm_fault_range")
    write = bool(flags & FAULT_FLAG_WRITE)
    # write faults on a private writable anonymous VMA, nothing watching the scheduling
    # points: a pmd with no pte table yet is filled a whole span at a time
    fresh_ok = (write and not flags & FAULT_FLAG_UNSHARE and vma_is_anonymous(vma)
                and vma.vm_flags & VM_WRITE and not vma.vm_flags & (VM_SHARED | VM_HUGETLB | VM_UFFD_MISSING)
                and not mm.sys.ls.has_hooks)
    # empty pmds given a pte table whose pages are still to be allocated, in address
    # order: filled together (one allocation) before any other fault of the range runs
    fresh: list[tuple[PtRef, int, int, int]] = []
    fresh_pages = 0
    addr = start
    while addr < end:
        nxt = min((addr + PMD_SIZE) & ~(PMD_SIZE - 1), end)
        if fresh_ok:
            pmd = mm.pmd_ref(addr)
            e = pmd.get() if pmd is not None else 0
            n = (nxt - addr) >> PAGE_SHIFT
            if e == 0 and n > 1 and _fresh_pte_table_ok(vma, addr, fresh_pages + n):
                # an empty pmd that gets a pte table: its first fault makes the table,
                # the others fill it; pages for the whole span, with the next pmds'
                pmd = mm.pmd_ref(addr, alloc=True)
                if pmd is not None and mm.pte_table(pmd, alloc=True) >= 0:
                    # what the first page's own fault and _fault_pte_run over the others
                    # would count besides the run's map_lock: handle_pte_fault's lockless
                    # look, do_anonymous_page's map_lock, _fault_pte_run's look (and, for
                    # a second page alone, its own fault's look)
                    mm.sys.stats.add("pgtable.pte_offset_map", 3 if n > 2 else 4)
                    mm.sys.stats.add("pgtable.pte_offset_map_lock")
                    fresh.append((pmd, pte_index(addr), pte_index(addr) + n, addr))
                    fresh_pages += n
                    addr = nxt
                    continue
            if fresh:
                _anon_none_pmds(vma, fresh, fresh_pages)
                fresh.clear()
                fresh_pages = 0
        if vma.vm_flags & VM_HUGETLB or flags & FAULT_FLAG_UNSHARE:
            ret = handle_mm_fault(vma, addr, flags)
            if ret & _STOP:
                return ret, addr
            addr += PAGE_SIZE
            continue
        pmd = mm.pmd_ref(addr)
        e = pmd.get() if pmd is not None else 0
        if pmd is None or e == 0 or not pmd_present(e) or pmd_leaf(e):
            # no pte table yet, or a huge/non-present pmd: let the first page decide
            # (it may create a THP, split a huge pmd, wait for migration...)
            ret = handle_mm_fault(vma, addr, flags)
            if ret & _STOP:
                return ret, addr
            pmd = mm.pmd_ref(addr)
            e = pmd.get() if pmd is not None else 0
            addr += PAGE_SIZE
            if pmd is not None and pmd_leaf(e) and (not write or pte_write(e)):
                # the rest of this huge mapping is already accessible: spurious faults
                n = (nxt - addr) >> PAGE_SHIFT
                if n > 0:
                    hm.huge_pmd_set_accessed_batch(vma, pmd, write, n)
                addr = nxt
            continue
        ret, addr = _fault_pte_run(vma, pmd, addr, nxt, flags)
        if ret & _STOP:
            return ret, addr
    if fresh:
        _anon_none_pmds(vma, fresh, fresh_pages)
    return 0, end


def _fresh_pte_table_ok(vma: Vma, addr: int, npages: int) -> bool:
    """Would the faults under the empty pmd at *addr* be what :func:`_anon_none_run`
    does once the first one has made the pte table? Yes when no THP is made there
    (``thp_vma_allowable_order()``) and the allocator has *npages* pages (those of the
    empty pmds taken so far and this one's), so that no fault fails: the page-by-page
    loop makes a pte table only once a page is allocated."""
    mem = vma.vm_mm.sys.mem
    if mem.nr_free - mem.charged < npages:
        return False
    return not hm.thp_vma_allowable_order(vma, hm.HPAGE_PMD_ORDER, addr)


def _anon_none_pmds(vma: Vma, fresh: list[tuple[PtRef, int, int, int]], npages: int) -> None:
    """``do_anonymous_page()`` (write) for every pte of the fresh pte tables *fresh*
    (``(pmd, first index, end index, first address)`` in address order; the allocator
    has the *npages* pages): what :func:`_anon_none_run` does table after table, with
    one allocation of all the pages (the allocator hands them out in the same order)."""
    mm = vma.vm_mm
    sys = mm.sys
    anon_vma_prepare(vma)
    pfns = sys.mem.alloc_pages_bulk(npages)
    assert len(pfns) == npages
    prot = vma.vm_page_prot | _PAGE_ACCESSED
    if vma.vm_flags & VM_WRITE:
        prot |= _PAGE_RW | _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    ptes = (pfns.astype(np.uint64) << _U(PAGE_SHIFT)) | _U(prot)
    addrs = np.empty(npages, np.int64)
    k = 0
    for pmd, i0, i1, addr in fresh:
        n = i1 - i0
        addrs[k:k + n] = addr + (np.arange(n, dtype=np.int64) << PAGE_SHIFT)
        got = mm.pte_offset_map_lock(pmd)
        assert got is not None
        tbl, tid = got
        try:
            set_ptes(mm, tbl, i0, ptes[k:k + n], n)
        finally:
            mm.pte_unmap_unlock(tid)
        _account(sys, n - 1, "fault.do_anonymous_page")
        sys.stats.add("fault.do_anonymous_page")
        sys.stats.add("fault.handle_mm_fault")
        k += n
    folio_add_new_anon_rmap_ptes(sys.mem, pfns, vma, addrs)
    mm.add_mm_counter(MM_ANONPAGES, npages)


def _fault_pte_run(vma: Vma, pmd: PtRef, addr: int, nxt: int, flags: int) -> tuple[int, int]:
    """Fault ``[addr, nxt)`` (inside one present pte table) in address order."""
    mm = vma.vm_mm
    write = bool(flags & FAULT_FLAG_WRITE)
    anon = vma_is_anonymous(vma)
    mapped = mm.pte_offset_map(pmd)  # the lockless look of each fault, once per table
    assert mapped is not None
    tbl, tid = mapped
    i0 = pte_index(addr)
    i1 = i0 + ((nxt - addr) >> PAGE_SHIFT)
    seg = tbl[i0:i1]
    present = (seg & _U(_PAGE_PRESENT)) != 0
    cls = np.zeros(i1 - i0, np.int8)
    if write:
        cls[present & ((seg & _U(_PAGE_RW)) != 0)] = _C_OK
    else:
        cls[present] = _C_OK
    if anon and not vma.vm_flags & (VM_SHARED | VM_UFFD_MISSING):
        cls[seg == 0] = _C_NONE
    # run boundaries
    cuts = np.flatnonzero(np.diff(cls)) + 1
    bounds = [0, *cuts.tolist(), i1 - i0]
    for a, b in zip(bounds[:-1], bounds[1:]):
        c = int(cls[a])
        ra = addr + (a << PAGE_SHIFT)
        if c == _C_OK:
            _spurious_run(vma, tid, i0 + a, i0 + b, write)
        elif c == _C_NONE and b - a > 1:
            ret, fail = _anon_none_run(vma, pmd, i0 + a, i0 + b, ra, write)
            if ret:
                return ret, fail
        else:
            for k in range(a, b):
                ret = handle_mm_fault(vma, addr + (k << PAGE_SHIFT), flags)
                if ret & _STOP:
                    return ret, addr + (k << PAGE_SHIFT)
    return 0, nxt


def _spurious_run(vma: Vma, tid: int, i0: int, i1: int, write: bool) -> None:
    """Faults on ptes that already allow the access: mark them young (and dirty)."""
    mm = vma.vm_mm
    sys = mm.sys
    mm.spin_lock(ptlock_ptr(tid))
    try:
        tbl = sys.pt.table(tid)
        bits = _PAGE_ACCESSED | ((_PAGE_DIRTY | _PAGE_SOFT_DIRTY) if write else 0)
        set_ptes(mm, tbl, i0, tbl[i0:i1] | _U(bits), i1 - i0)
    finally:
        mm.pte_unmap_unlock(tid)
    _account(sys, i1 - i0 - 1, "fault.spurious")
    sys.stats.add("fault.spurious")
    sys.stats.add("fault.handle_mm_fault")


def _anon_none_run(vma: Vma, pmd: PtRef, i0: int, i1: int, addr: int, write: bool) -> tuple[int, int]:
    """``do_anonymous_page()`` for a run of empty ptes: the zero page on reads, new
    zeroed exclusive pages on writes."""
    mm = vma.vm_mm
    sys = mm.sys
    n = i1 - i0
    got = mm.pte_offset_map_lock(pmd)
    assert got is not None
    tbl, tid = got
    try:
        if not write:
            set_ptes(mm, tbl, i0, _U(pte_mkspecial(pfn_pte(sys.mem.zero_pfn, vma.vm_page_prot))), n)
            _account(sys, n - 1, "fault.do_anonymous_page")
            sys.stats.add("fault.do_anonymous_page")
            sys.stats.add("fault.handle_mm_fault")
            return 0, 0
        anon_vma_prepare(vma)
        pfns = sys.mem.alloc_pages_bulk(n)
        k = len(pfns)
        addrs = addr + (np.arange(k, dtype=np.int64) << PAGE_SHIFT)
        if k:
            prot = vma.vm_page_prot | _PAGE_ACCESSED
            if vma.vm_flags & VM_WRITE:
                prot |= _PAGE_RW | _PAGE_DIRTY | _PAGE_SOFT_DIRTY
            folio_add_new_anon_rmap_ptes(sys.mem, pfns, vma, addrs)
            set_ptes(mm, tbl, i0, (pfns.astype(np.uint64) << _U(PAGE_SHIFT)) | _U(prot), k)
            mm.add_mm_counter(MM_ANONPAGES, k)
            _account(sys, k - 1, "fault.do_anonymous_page")
            sys.stats.add("fault.do_anonymous_page")
            sys.stats.add("fault.handle_mm_fault")
        if k < n:
            sys.stats.add("fault.handle_mm_fault")
            sys.stats.add("fault.do_anonymous_page")
            return VM_FAULT_OOM, addr + (k << PAGE_SHIFT)
        return 0, 0
    finally:
        mm.pte_unmap_unlock(tid)


