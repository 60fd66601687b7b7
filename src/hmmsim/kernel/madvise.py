"""madvise: MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTNEED, MADV_FREE, MADV_PAGEOUT, MADV_COLLAPSE
(anonymous VMAs, :mod:`.khugepaged`).

Models ``mm/madvise.c``: ``do_madvise`` and ``madvise_walk_vmas`` (advice is applied to
every mapped part of the range and ``-ENOMEM`` reported for holes; a range with no VMA
at all fails at once), flag advice through ``madvise_update_vma`` (split / merge),
``MADV_DONTNEED`` as a ``zap_page_range_single`` under ``MMU_NOTIFY_CLEAR`` (hugetlb:
huge-page aligned start, end rounded down; 7.3 also frees pte tables it emptied over a
whole 2 MiB block, ``madv_dontneed_frees_pte_tables``), ``MADV_FREE`` (anonymous VMAs only; clean
and old, data kept since nothing is reclaimed; a partly covered THP is split first) and
``MADV_PAGEOUT`` (swap-out when the machine has swap).

>>> from hmmsim import System
>>> from hmmsim.kernel.mm import MM_ANONPAGES
>>> p = System(ram=256 << 20, hugetlb_pages=0).spawn()
>>> a = p.mmap(4 * 4096)
>>> p.write(a, b"data" * 4096)
>>> p.mm.get_mm_counter(MM_ANONPAGES)
4
>>> do_madvise(p.mm, a, 2 * 4096, MADV_DONTNEED)   # private anon: zero-filled on next touch
0
>>> p.mm.get_mm_counter(MM_ANONPAGES), p.read(a, 4), p.read(a + 2 * 4096, 4)
(2, b'\\x00\\x00\\x00\\x00', b'data')
>>> do_madvise(p.mm, a, 4096, 12345)               # unknown advice
-22
>>> do_madvise(p.mm, a + 4 * 4096, 4096, MADV_DONTNEED)   # nothing mapped there
-12
"""

from __future__ import annotations

import numpy as np

from .errno import EAGAIN, EINVAL, ENOMEM
from .khugepaged import MADV_COLLAPSE, madvise_collapse
from .huge_memory import madvise_free_huge_pmd, split_folio
from .memory import zap_page_range_single
from .mm import MM, MM_SWAPENTS, PtRef, set_pte_at, set_ptes
from .mmap import vma_modify, vma_try_merge
from .mmu_notifier import MmuNotifierEvent, notify_range
from .page_types import HPAGE_PMD_SIZE, PAGE_ALIGN, PAGE_SHIFT, PAGE_SIZE, PMD_MASK, ULONG_MAX, pte_index
from .pagewalk import MmWalk, MmWalkOps, walk_page_range
from .pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_SPECIAL,
    PTE_PFN_MASK,
    is_hwpoison_entry,
    non_swap_entry,
    pmd_leaf,
    pmd_present,
    pte_present,
    pte_to_swp_entry,
)
from .physmem import PG_anon, PG_dirty
from .rmap import folio_maybe_mapped_shared
from .swap import free_swap_and_cache, reclaim_pages
from .vma import (
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_LOCKED,
    VM_NOHUGEPAGE,
    VM_PFNMAP,
    Vma,
    vma_is_anonymous,
)

__all__ = ("MADV_COLLAPSE", "MADV_DONTNEED", "MADV_FREE", "MADV_HUGEPAGE", "MADV_NOHUGEPAGE", "MADV_PAGEOUT",
           "do_madvise")

MADV_DONTNEED = 4
MADV_FREE = 8
MADV_PAGEOUT = 21
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
_VALID = {MADV_DONTNEED, MADV_FREE, MADV_PAGEOUT, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_COLLAPSE}
_U = np.uint64


def _madvise_update_vma(mm: MM, vma: Vma, start: int, end: int, new_flags: int) -> int:
    """``madvise_update_vma()``: isolate the range and set its flags (no-op if equal)."""
    if new_flags == vma.vm_flags:
        return 0
    r = vma_modify(mm, vma, start, end)
    if isinstance(r, int):
        return r
    r.vm_flags = new_flags
    vma_try_merge(mm, r)
    return 0


def _madvise_dontneed(vma: Vma, start: int, end: int) -> int:
    if vma.vm_flags & VM_HUGETLB:
        if start & ~PMD_MASK:
            return -EINVAL
        end = end & PMD_MASK
    elif vma.vm_flags & (VM_PFNMAP | VM_LOCKED):
        return -EINVAL
    if start == end:
        return 0
    # 7.3's madvise_dontneed_single_vma() zaps with reclaim_pt (CONFIG_PT_RECLAIM): empty
    # pte tables of fully covered 2 MiB blocks are freed, so a later fault there may map
    # a THP again
    zap_page_range_single(vma, start, end - start, vma.vm_mm.sys.profile.madv_dontneed_frees_pte_tables)
    return 0


def madvise_free_pte_range(pmd: PtRef, addr: int, end: int, walk: MmWalk) -> int:
    """``madvise_free_pte_range()``: mark the small anonymous pages only this process maps
    clean and old (lazily freeable); a THP wholly inside the range is marked as one, a
    partly covered one is split first (a PMD-mapped one here, a PTE-mapped one in the pte
    loop unless it may be mapped by another mm); swap entries are freed."""
    vma = walk.vma
    assert vma is not None
    mm = walk.mm
    sys = mm.sys
    mem = sys.mem
    e = pmd.get()
    if pmd_leaf(e):
        pfn = (e & PTE_PFN_MASK) >> PAGE_SHIFT
        head = mem.compound_head(pfn)
        if mem.is_huge_zero_pfn(pfn) or mem.folio_mapcount(head) != 1:
            return 0
        if end - addr == HPAGE_PMD_SIZE:
            madvise_free_huge_pmd(vma, pmd)
            return 0
        split_folio(sys, head)
    if not pmd_present(pmd.get()) or pmd_leaf(pmd.get()):
        return 0
    got = mm.pte_offset_map_lock(pmd)
    if got is None:
        return 0
    tbl, tid = got
    locked = True
    try:
        i0 = pte_index(addr)
        i1 = i0 + ((end - addr) >> PAGE_SHIFT)
        i = i0
        while i < i1:
            pte = int(tbl[i])
            i += 1
            if pte == 0:
                continue
            if not pte_present(pte):
                ent = pte_to_swp_entry(pte)
                if not non_swap_entry(ent):
                    free_swap_and_cache(sys, ent)
                    mm.add_mm_counter(MM_SWAPENTS, -1)
                    set_pte_at(walk.mm, tbl, i - 1, 0)
                elif is_hwpoison_entry(ent):
                    set_pte_at(walk.mm, tbl, i - 1, 0)
                continue
            if pte & _PAGE_SPECIAL or not pte & _PAGE_PRESENT:
                continue
            pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
            if pfn >= mem.max_pfn or mem.pgmap[pfn] != 0:
                continue
            head = mem.compound_head(pfn)
            if not mem.flags[head] & PG_anon:
                continue
            if mem.order[head]:
                # a PTE-mapped large folio: the ptes of the range mapping it in a row
                nr_folio = mem.folio_nr_pages(head)
                run = tbl[i - 1:i1]
                want = (np.arange(pfn, pfn + len(run), dtype=np.uint64) << _U(PAGE_SHIFT))
                same = ((run & _U(PTE_PFN_MASK)) == want) & ((run & _U(_PAGE_PRESENT)) != 0)
                nr = int(np.argmin(same)) if not same.all() else len(run)
                nr = min(nr, head + nr_folio - pfn)
                if nr < nr_folio:
                    # only partly in the range: split it (unless another mm may map it)
                    # and look at this pte again
                    if folio_maybe_mapped_shared(mm, head):
                        i += nr - 1
                        continue
                    mm.pte_unmap_unlock(tid)
                    locked = False
                    err = split_folio(sys, head)
                    got = mm.pte_offset_map_lock(pmd)
                    if got is None:
                        break
                    tbl, tid = got
                    locked = True
                    if not err:
                        i -= 1
                    else:
                        i += nr - 1
                    continue
                # the whole folio is in the range: lazyfree it if this mm maps all of it
                if mem.folio_mapcount(head) != nr_folio:
                    i += nr - 1
                    continue
                mem.flags[head] &= ~np.uint32(PG_dirty)
                clean = _U(~(_PAGE_DIRTY | _PAGE_ACCESSED) & ((1 << 64) - 1))
                set_ptes(walk.mm, tbl, i - 1, tbl[i - 1:i - 1 + nr] & clean, nr)
                i += nr - 1
                continue
            if mem.folio_mapcount(head) != 1:
                continue
            mem.flags[head] &= ~np.uint32(PG_dirty)
            set_pte_at(walk.mm, tbl, i - 1, pte & ~(_PAGE_DIRTY | _PAGE_ACCESSED))
    finally:
        if locked:
            mm.pte_unmap_unlock(tid)
    return 0


madvise_free_walk_ops = MmWalkOps(pmd_entry=madvise_free_pte_range)


def _madvise_free(vma: Vma, start: int, end: int) -> int:
    """``madvise_free_single_vma()``: anonymous VMAs only, under ``MMU_NOTIFY_CLEAR``."""
    if vma.vm_flags & VM_HUGETLB or not vma_is_anonymous(vma):
        return -EINVAL
    mm = vma.vm_mm
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mm, start, end):
        walk_page_range(mm, start, end, madvise_free_walk_ops, None)
    mm.sys.stats.add("madvise.free")
    return 0


def _madvise_vma(mm: MM, vma: Vma, start: int, end: int, behavior: int) -> int:
    """``madvise_vma_behavior()``."""
    if behavior == MADV_DONTNEED:
        return _madvise_dontneed(vma, start, end)
    if behavior == MADV_FREE:
        return _madvise_free(vma, start, end)
    if behavior == MADV_COLLAPSE:
        return madvise_collapse(vma, start, end)
    if behavior == MADV_PAGEOUT:
        if vma_is_anonymous(vma):
            reclaim_pages(vma, start, end)
        return 0
    flags = vma.vm_flags
    if behavior == MADV_HUGEPAGE:
        flags = (flags & ~VM_NOHUGEPAGE) | VM_HUGEPAGE
    else:
        flags = (flags & ~VM_HUGEPAGE) | VM_NOHUGEPAGE
    err = _madvise_update_vma(mm, vma, start, end, flags)
    return -EAGAIN if err == -ENOMEM else err


def do_madvise(mm: MM, start: int, len_in: int, behavior: int) -> int:
    """``do_madvise()``: give *behavior* advice for ``[start, start + len_in)``.

    Returns 0, ``-EINVAL`` (bad advice, misaligned start, or advice invalid for a VMA),
    ``-ENOMEM`` (part of the range is unmapped; mapped parts were advised) or
    ``-EAGAIN``. *start* and *len_in* are unsigned (``check_input_range()``): a
    negative length is huge, so the range wraps (``-EINVAL``)."""
    start &= ULONG_MAX
    len_in &= ULONG_MAX
    if behavior not in _VALID:
        return -EINVAL
    if start & (PAGE_SIZE - 1):
        return -EINVAL
    length = PAGE_ALIGN(len_in)
    if len_in and not length:
        return -EINVAL
    end = start + length
    if end > ULONG_MAX:
        return -EINVAL
    if end == start:
        return 0
    write = behavior in (MADV_HUGEPAGE, MADV_NOHUGEPAGE)
    if write:
        mm.mmap_lock.down_write()
    else:
        mm.mmap_lock.down_read()
    try:
        unmapped_error = 0
        vma = mm.find_vma(start)
        while True:
            if vma is None:
                return -ENOMEM
            if start < vma.vm_start:
                unmapped_error = -ENOMEM
                start = vma.vm_start
                if start >= end:
                    break
            tmp = min(vma.vm_end, end)
            err = _madvise_vma(mm, vma, start, tmp, behavior)
            if err:
                return err
            start = tmp
            if start >= end:
                break
            vma = mm.find_vma(start)
        mm.sys.stats.add("mm.madvise")
        return unmapped_error
    finally:
        if write:
            mm.mmap_lock.up_write()
        else:
            mm.mmap_lock.up_read()


