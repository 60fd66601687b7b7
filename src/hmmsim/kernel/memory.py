"""Unmapping, copying and inserting ptes: the non-fault half of ``mm/memory.c``.

* ``unmap_vmas`` / ``zap_page_range_single`` / ``unmap_single_vma``: clear ptes under one
  ``MMU_NOTIFY_UNMAP`` (munmap, exit) or ``MMU_NOTIFY_CLEAR`` (MADV_DONTNEED) invalidation
  of the range, dropping rmap, rss and page references; leaf tables are zapped a whole
  span at a time, swap-format entries one by one;
* ``free_pgtables``: free page tables no VMA needs any more;
* ``copy_page_range``: fork's copy of a VMA's page tables, write-protecting both sides of
  copy-on-write mappings under ``MMU_NOTIFY_PROTECTION_PAGE``;
* ``vm_insert_page``, ``vmf_insert_pfn``, ``vmf_insert_mixed``, ``remap_pfn_range``:
  what drivers use to populate special mappings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .bug import NotSupportedError
from .errno import EBUSY, EFAULT, EINVAL
from .folio import folios_put
from .huge_memory import __split_huge_pmd, copy_huge_pmd, split_huge_pud, zap_huge_pmd
from .hugetlb import copy_hugetlb_page_range, unmap_hugepage_range
from .mm import (
    MM,
    MM_ANONPAGES,
    MM_FILEPAGES,
    MM_SHMEMPAGES,
    MM_SWAPENTS,
    PtRef,
    set_pte_at,
    set_ptes,
)
from .mm_types import mm_counter_file
from .mmu_notifier import MmuNotifierEvent, notify_range
from .page_types import (
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_MASK,
    PMD_SIZE,
    PUD_SIZE,
    pte_index,
)
from .pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_RW,
    _PAGE_SPECIAL,
    _PAGE_SWP_EXCLUSIVE,
    _PAGE_UFFD_WP,
    PTE_MARKER_UFFD_WP,
    PTE_PFN_MASK,
    is_device_exclusive_entry,
    is_device_private_entry,
    is_migration_entry,
    is_pte_marker_entry,
    is_readable_exclusive_migration_entry,
    is_writable_device_private_entry,
    is_writable_migration_entry,
    make_readable_device_private_entry,
    make_readable_migration_entry,
    non_swap_entry,
    pfn_pte,
    pmd_leaf,
    pmd_present,
    pte_marker_get,
    pte_mkspecial,
    pte_to_swp_entry,
    swp_entry_to_pte,
    swp_offset_pfn,
    table_id,
)
from .physmem import (
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
    PG_swapbacked,
)
from .swap import free_swap_and_cache, swap_duplicate
from .vma import (
    VM_DONTEXPAND,
    VM_HUGETLB,
    VM_IO,
    VM_MIXEDMAP,
    VM_PFNMAP,
    VM_SHARED,
    VM_UFFD_WP,
    VM_WRITE,
    Vma,
    is_cow_mapping,
)

if TYPE_CHECKING:
    from .fs import AddressSpace
    from .system import System

__all__ = (
    "copy_page_range", "free_pgtables",
    "remap_pfn_range", "unmap_mapping_pages", "unmap_single_vma", "unmap_vmas",
    "vm_insert_page", "vma_needs_copy", "vmf_insert_mixed", "vmf_insert_pfn",
    "zap_page_range_single",
)

_U = np.uint64
_PRESENT_ANY = _U(_PAGE_PRESENT | _PAGE_PROTNONE)


# -- zapping --------------------------------------------------------------------------------------
def _zap_nonpresent(vma: Vma, pte: int, rss: list[int], puts: list[int]) -> None:
    """``zap_nonpresent_ptes()`` for one swap-format entry."""
    sys = vma.vm_mm.sys
    mem = sys.mem
    entry = pte_to_swp_entry(pte)
    if is_device_private_entry(entry) or is_device_exclusive_entry(entry):
        pfn = swp_offset_pfn(entry)
        head = mem.compound_head(pfn)
        rss[MM_ANONPAGES if mem.flags[head] & PG_anon else MM_FILEPAGES] -= 1
        # 6.12's device-exclusive entry holds a reference but no mapping
        if is_device_private_entry(entry) or sys.profile.device_exclusive_mapped:
            mem.mapcount[pfn] -= 1
        puts.append(head)
    elif not non_swap_entry(entry):
        rss[MM_SWAPENTS] -= 1
        free_swap_and_cache(sys, entry)
    elif is_migration_entry(entry):
        pfn = swp_offset_pfn(entry)
        head = mem.compound_head(pfn)
        rss[MM_ANONPAGES if mem.flags[head] & PG_anon else
            (MM_SHMEMPAGES if mem.flags[head] & PG_swapbacked else MM_FILEPAGES)] -= 1
    # hwpoison entries and pte markers are just cleared


def zap_pte_span(vma: Vma, tbl: npt.NDArray[np.uint64], i0: int, i1: int, rss: list[int], puts: list[np.ndarray]) -> None:
    """``zap_pte_range()`` over entries ``[i0, i1)`` of one pte table (lock held)."""
    sys = vma.vm_mm.sys
    mem = sys.mem
    seg = tbl[i0:i1]
    nz = seg != 0
    if not nz.any():
        return
    present = (seg & _PRESENT_ANY) != 0
    normal = present & ((seg & _U(_PAGE_SPECIAL)) == 0)
    all_normal = bool(normal.all())  # the usual span: no masked copies
    if all_normal or normal.any():
        e = seg if all_normal else seg[normal]
        pfns = ((e & _U(PTE_PFN_MASK)) >> _U(PAGE_SHIFT)).astype(np.int64)
        if int(pfns.max()) >= mem.max_pfn:
            ok = pfns < mem.max_pfn
            pfns = pfns[ok]
            e = e[ok]
        heads = mem.heads(pfns)
        hflags = mem.flags[heads]
        anon = (hflags & PG_anon) != 0
        n_anon = int(anon.sum())
        rss[MM_ANONPAGES] -= n_anon
        if n_anon < len(pfns):
            shm = ((hflags & PG_swapbacked) != 0) & ~anon
            rss[MM_SHMEMPAGES] -= int(shm.sum())
            rss[MM_FILEPAGES] -= int((~anon & ~shm).sum())
        dirty = (e & _U(_PAGE_DIRTY)) != 0
        if dirty.any():
            mem.flags[heads[dirty]] |= PG_dirty
        if len(pfns) < 2 or bool((pfns[1:] > pfns[:-1]).all()):
            mem.mapcount[pfns] -= 1  # distinct pages (the usual case): one fancy update
        else:
            np.subtract.at(mem.mapcount, pfns, 1)  # a page mapped twice in this table
        puts.append(heads)
    odd = nz & ~present
    if not all_normal and odd.any():
        extra: list[int] = []
        for i in np.flatnonzero(odd).tolist():
            _zap_nonpresent(vma, int(seg[i]), rss, extra)
        if extra:
            puts.append(np.asarray(extra, np.int64))
    seg[:] = 0


def unmap_single_vma(vma: Vma, start: int, end: int, reclaim_pt: bool = False) -> None:
    """``unmap_single_vma()``/``unmap_page_range()``: zap ``[start, end)`` (clamped to
    *vma*) without notifying (the caller has). *reclaim_pt* (``zap_details.reclaim_pt``,
    MADV_DONTNEED on kernels with ``madv_dontneed_frees_pte_tables``): a pte table whose
    whole 2 MiB span was zapped and is now empty is freed and its pmd cleared
    (``zap_pte_range()`` -> ``zap_empty_pte_table()``)."""
    start = max(start, vma.vm_start)
    end = min(end, vma.vm_end)
    if start >= end:
        return
    if vma.vm_flags & VM_HUGETLB:
        unmap_hugepage_range(vma, start, end)
        return
    mm = vma.vm_mm
    sys = mm.sys
    rss = [0, 0, 0, 0]
    puts: list[np.ndarray] = []
    addr = start
    while addr < end:
        pud = mm.pud_entry(addr)
        if pud is None:
            addr = _next_pud_hole(addr, end)
            continue
        ptbl, pidx = pud
        pe = int(ptbl[pidx])
        pud_next = min((addr + PUD_SIZE) & ~(PUD_SIZE - 1), end)
        if pe == 0:
            addr = pud_next
            continue
        if pmd_leaf(pe):
            split_huge_pud(vma, PtRef(ptbl, pidx, -1, mm), addr)
            addr = pud_next
            continue
        while addr < pud_next:
            nxt = min((addr + PMD_SIZE) & PMD_MASK, end)
            pmd = mm.pmd_ref(addr)
            assert pmd is not None
            e = pmd.get()
            if e == 0:
                addr = nxt
                continue
            if not pmd_present(e) or pmd_leaf(e):
                if nxt - addr != HPAGE_PMD_SIZE:
                    __split_huge_pmd(vma, pmd, addr)
                else:
                    for h in zap_huge_pmd(vma, pmd, addr):
                        puts.append(np.asarray([h], np.int64))
                    addr = nxt
                    continue
            got = mm.pte_offset_map_lock(pmd)
            if got is not None:
                tbl, tid = got
                freed = False
                try:
                    zap_pte_span(vma, tbl, pte_index(addr),
                                 pte_index(addr) + ((nxt - addr) >> PAGE_SHIFT), rss, puts)
                    if reclaim_pt and nxt - addr == PMD_SIZE and not tbl.any():
                        pml = mm.pmd_lock(pmd)  # zap_empty_pte_table()
                        pmd.set(0)
                        mm.spin_unlock(pml)
                        freed = True
                finally:
                    mm.pte_unmap_unlock(tid)
                if freed:  # pte_free_tlb()
                    sys.pt.free(tid)
                    sys.stats.add("zap.pte_table_reclaimed")
            addr = nxt
    for k in range(4):
        if rss[k]:
            mm.add_mm_counter(k, rss[k])
    if puts:
        folios_put(sys, np.concatenate(puts))
    sys.stats.add("zap.unmap_single_vma")


def _next_pud_hole(addr: int, end: int) -> int:
    """Skip a range with no pud table (a missing top-level entry covers 512 GiB)."""
    step = PUD_SIZE * 512
    return min((addr + step) & ~(step - 1), end)


def unmap_vmas(mm: MM, vmas: list[Vma], start: int, end: int) -> None:
    """``unmap_vmas()``: zap ``[start, end)`` of every VMA in *vmas* under one
    ``MMU_NOTIFY_UNMAP`` invalidation (munmap, exit)."""
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_UNMAP, mm, start, end):
        for vma in vmas:
            unmap_single_vma(vma, start, end)


def zap_page_range_single(vma: Vma, address: int, size: int, reclaim_pt: bool = False) -> None:
    """``zap_page_range_single()``: zap part of one VMA under ``MMU_NOTIFY_CLEAR``
    (MADV_DONTNEED, truncation); *reclaim_pt* as for :func:`unmap_single_vma`."""
    end = address + size
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, vma.vm_mm, address, end):
        unmap_single_vma(vma, address, end, reclaim_pt)


def unmap_mapping_pages(mapping: "AddressSpace", start: int, nr: int | None, even_cows: bool = True) -> None:
    """``unmap_mapping_pages()``: zap the file pages ``[start, start + nr)`` from every
    VMA mapping them (private COW copies too when *even_cows*)."""
    for vma in list(mapping.i_mmap):
        first = max(start, vma.vm_pgoff)
        last = vma.vm_pgoff + vma.pages() if nr is None else min(start + nr, vma.vm_pgoff + vma.pages())
        if first >= last:
            continue
        if not even_cows and not vma.vm_flags & VM_SHARED:
            continue
        a = vma.address_of_index(first)
        zap_page_range_single(vma, a, (last - first) << PAGE_SHIFT)


# -- page-table freeing -------------------------------------------------------------------------
def free_pgtables(mm: MM, start: int, end: int, floor: int, ceiling: int) -> None:
    """``free_pgtables()``/``free_pgd_range()``: free the (now empty) pte, pmd and pud
    tables under ``[start, end)`` whose whole span lies within ``[floor, ceiling)`` (the
    gap between the neighbouring VMAs; ceiling 0 = the top of the address space).
    Only tables that exist are visited."""
    pt = mm.sys.pt
    top = ceiling if ceiling else 1 << 64
    pgd = pt.table(mm.pgd)

    def inside(base: int, size: int) -> bool:
        return base >= floor and base + size <= top and base < end and base + size > start

    for gi in np.flatnonzero(pgd).tolist():
        gbase = gi << 39
        if gbase >= end or gbase + (1 << 39) <= start:
            continue
        pud_tid = table_id(int(pgd[gi]))
        pud = pt.table(pud_tid)
        for ui in np.flatnonzero(pud).tolist():
            ubase = gbase + (ui << 30)
            e = int(pud[ui])
            if ubase >= end or ubase + PUD_SIZE <= start or not pmd_present(e) or pmd_leaf(e):
                continue
            pmd_tid = table_id(e)
            pmd = pt.table(pmd_tid)
            for mi in np.flatnonzero(pmd).tolist():
                mbase = ubase + (mi << 21)
                me = int(pmd[mi])
                if not pmd_present(me) or pmd_leaf(me) or not inside(mbase, PMD_SIZE):
                    continue
                tid = table_id(me)
                if not pt.table(tid).any():
                    pmd[mi] = 0
                    pt.free(tid)
            if inside(ubase, PUD_SIZE) and not pmd.any():
                pud[ui] = 0
                pt.free(pmd_tid)
        if inside(gbase, 1 << 39) and not pud.any():
            pgd[gi] = 0
            pt.free(pud_tid)


# -- fork -----------------------------------------------------------------------------------------
def vma_needs_copy(dst_vma: Vma, src_vma: Vma) -> bool:
    """``vma_needs_copy()``: page tables are copied at fork only where a later fault could
    not rebuild them (anon pages, raw pfn mappings, uffd-wp)."""
    if dst_vma.vm_flags & (VM_PFNMAP | VM_MIXEDMAP | VM_UFFD_WP):
        return True
    return src_vma.anon_vma is not None


def _copy_nonpresent(dst_vma: Vma, src_vma: Vma, stbl: npt.NDArray[np.uint64], i: int, pte: int, rss: list[int]) -> int:
    """``copy_nonpresent_pte()``: the child's entry for one swap-format parent entry."""
    sys = src_vma.vm_mm.sys
    mem = sys.mem
    entry = pte_to_swp_entry(pte)
    cow = is_cow_mapping(src_vma.vm_flags)
    soft = pte & ~(PTE_PFN_MASK | (0x1F << 59) | (3 << 52))
    if not non_swap_entry(entry):
        swap_duplicate(sys, entry)
        rss[MM_SWAPENTS] += 1
        if pte & _PAGE_SWP_EXCLUSIVE:
            pte &= ~_PAGE_SWP_EXCLUSIVE
            set_pte_at(src_vma.vm_mm, stbl, i, pte)
        return pte
    if is_migration_entry(entry):
        pfn = swp_offset_pfn(entry)
        head = mem.compound_head(pfn)
        rss[MM_ANONPAGES if mem.flags[head] & PG_anon else MM_FILEPAGES] += 1
        if (is_writable_migration_entry(entry) or is_readable_exclusive_migration_entry(entry)) and cow:
            pte = swp_entry_to_pte(make_readable_migration_entry(pfn)) | (soft & ~_PAGE_SWP_EXCLUSIVE)
            set_pte_at(src_vma.vm_mm, stbl, i, pte)
        return pte
    if is_device_private_entry(entry):
        pfn = swp_offset_pfn(entry)
        head = mem.compound_head(pfn)
        mem.refcount[head] += 1
        rss[MM_ANONPAGES] += 1
        mem.flags[pfn] &= ~np.uint32(PG_anon_exclusive)
        mem.mapcount[pfn] += 1
        if is_writable_device_private_entry(entry) and cow:
            pte = swp_entry_to_pte(make_readable_device_private_entry(pfn)) | (soft & _PAGE_UFFD_WP)
            set_pte_at(src_vma.vm_mm, stbl, i, pte)
        return pte
    if is_device_exclusive_entry(entry):
        raise AssertionError("device-exclusive entries are restored before the copy")
    if is_pte_marker_entry(entry):
        if pte_marker_get(entry) & PTE_MARKER_UFFD_WP and dst_vma.vm_flags & VM_UFFD_WP:
            return pte
        return 0
    return pte



def _restore_exclusive_ptes(src_vma: Vma, stbl: npt.NDArray[np.uint64], i0: int, seg: npt.NDArray[np.uint64],
                            addr0: int) -> None:
    """``copy_nonpresent_pte()`` of a device-exclusive entry (``try_restore_exclusive_pte``):
    the parent's entry becomes a present pte again (folio lock taken without sleeping),
    then it is copied like any present pte. The device loses its exclusive access."""
    from .fault import restore_exclusive_pte
    from .pagemap import folio_trylock, folio_unlock
    odd = (seg != 0) & ((seg & _PRESENT_ANY) == 0)
    if not odd.any():
        return
    sys = src_vma.vm_mm.sys
    for k in np.flatnonzero(odd).tolist():
        pte = int(seg[k])
        entry = pte_to_swp_entry(pte)
        if not is_device_exclusive_entry(entry):
            continue
        page = swp_offset_pfn(entry)
        if not folio_trylock(sys, page):
            # the kernel drops the locks, waits for the folio and copies the range again
            raise NotSupportedError("fork of a device-exclusive entry whose folio is locked")
        restore_exclusive_pte(src_vma, page, addr0 + (k << PAGE_SHIFT), stbl, i0 + k, pte)
        folio_unlock(sys, page)
        sys.stats.add("fork.restore_exclusive_pte")


def _copy_pte_table(dst_vma: Vma, src_vma: Vma, dtbl: npt.NDArray[np.uint64], stbl: npt.NDArray[np.uint64],
                    i0: int, i1: int, addr0: int, rss: list[int]) -> None:
    """``copy_pte_range()`` for entries ``[i0, i1)`` (both tables locked)."""
    mem = src_vma.vm_mm.sys.mem
    seg = stbl[i0:i1]
    _restore_exclusive_ptes(src_vma, stbl, i0, seg, addr0)
    out = seg.copy()
    present = (seg & _PRESENT_ANY) != 0
    normal = present & ((seg & _U(_PAGE_SPECIAL)) == 0)
    cow = is_cow_mapping(src_vma.vm_flags)
    sys = src_vma.vm_mm.sys
    pinned = _pinned_anon_exclusive(sys, seg, normal) if sys.extra_refs and normal.any() else None
    if pinned is not None:
        normal &= ~pinned
    if normal.any():
        e = seg[normal]
        pfns = ((e & _U(PTE_PFN_MASK)) >> _U(PAGE_SHIFT)).astype(np.int64)
        heads = mem.heads(pfns)
        np.add.at(mem.refcount, heads, 1)
        anon = (mem.flags[heads] & PG_anon) != 0
        if anon.any():
            ap = pfns[anon]
            mem.flags[ap] &= ~np.uint32(PG_anon_exclusive)
            rss[MM_ANONPAGES] += int(anon.sum())
        np.add.at(mem.mapcount, pfns, 1)
        if (~anon).any():
            fl = mem.flags[heads[~anon]]
            shm = (fl & PG_swapbacked) != 0
            rss[MM_SHMEMPAGES] += int(shm.sum())
            rss[MM_FILEPAGES] += int((~shm).sum())
    if cow:
        wr = present & ((seg & _U(_PAGE_RW)) != 0)
        if pinned is not None:
            wr &= ~pinned
        seg[wr] &= ~_U(_PAGE_RW)
        out[wr] &= ~_U(_PAGE_RW)
    if src_vma.vm_flags & VM_SHARED:
        out[present] &= ~_U(_PAGE_DIRTY)
    out[present] &= ~_U(_PAGE_ACCESSED)
    if not dst_vma.vm_flags & VM_UFFD_WP:
        out[present] &= ~_U(_PAGE_UFFD_WP)
    odd = (seg != 0) & ~present
    for k in np.flatnonzero(odd).tolist():
        out[k] = _copy_nonpresent(dst_vma, src_vma, stbl, i0 + k, int(seg[k]), rss)
    if pinned is not None:
        for k in np.flatnonzero(pinned).tolist():
            out[k] = _copy_present_page(dst_vma, addr0 + (k << PAGE_SHIFT), int(seg[k]), rss)
    set_ptes(dst_vma.vm_mm, dtbl, i0, out, i1 - i0)


def _pinned_anon_exclusive(sys: "System", seg: npt.NDArray[np.uint64], normal: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The entries of *seg* whose page is an exclusive anon page that may be DMA-pinned:
    ``folio_try_dup_anon_rmap_ptes()`` refuses to share those at fork."""
    from .gup import folio_maybe_dma_pinned
    mem = sys.mem
    out = np.zeros(len(seg), bool)
    idx = np.flatnonzero(normal)
    pfns = ((seg[idx] & _U(PTE_PFN_MASK)) >> _U(PAGE_SHIFT)).astype(np.int64)
    heads = mem.heads(pfns)
    cand = ((mem.flags[heads] & PG_anon) != 0) & ((mem.flags[pfns] & PG_anon_exclusive) != 0)
    cand &= (mem.refcount[heads] > 1) | (mem.order[heads] > 0)
    for j in np.flatnonzero(cand).tolist():
        if folio_maybe_dma_pinned(sys, int(pfns[j])):
            out[idx[j]] = True
    return out


def _copy_present_page(dst_vma: Vma, addr: int, pte: int, rss: list[int]) -> int:
    """``copy_present_page()``: the child gets its own copy of a pinned exclusive anon
    page (writable, dirty, exclusive); the parent's pte stays as it was."""
    from .rmap import folio_add_new_anon_rmap
    sys = dst_vma.vm_mm.sys
    mem = sys.mem
    new = mem.alloc_page()
    if new < 0:
        raise NotSupportedError("fork: no memory for the copy of a pinned page (-ENOMEM)")
    mem.copy_pages(new, (pte & PTE_PFN_MASK) >> PAGE_SHIFT)
    folio_add_new_anon_rmap(mem, new, dst_vma, addr)
    rss[MM_ANONPAGES] += 1
    out = pfn_pte(new, dst_vma.vm_page_prot) | _PAGE_DIRTY
    if dst_vma.vm_flags & VM_WRITE:
        out |= _PAGE_RW
    sys.stats.add("fork.copy_present_page")
    return out


def copy_page_range(dst_vma: Vma, src_vma: Vma) -> int:
    """``copy_page_range()``: copy the page tables of *src_vma* into *dst_vma* at fork.

    Copy-on-write mappings are write-protected in both processes, under an
    ``MMU_NOTIFY_PROTECTION_PAGE`` invalidation of the whole VMA. Returns 0."""
    if not vma_needs_copy(dst_vma, src_vma):
        return 0
    if src_vma.vm_flags & VM_HUGETLB:
        return copy_hugetlb_page_range(dst_vma, src_vma)
    src_mm = src_vma.vm_mm
    dst_mm = dst_vma.vm_mm
    sys = src_mm.sys
    start, end = src_vma.vm_start, src_vma.vm_end
    cow = is_cow_mapping(src_vma.vm_flags)
    rng = notify_range(MmuNotifierEvent.MMU_NOTIFY_PROTECTION_PAGE, src_mm, start, end) if cow else None
    if rng is not None:
        rng.__enter__()
    try:
        rss = [0, 0, 0, 0]
        addr = start
        while addr < end:
            nxt = min((addr + PMD_SIZE) & PMD_MASK, end)
            spmd = src_mm.pmd_ref(addr)
            if spmd is None or spmd.get() == 0:
                addr = nxt
                continue
            e = spmd.get()
            dpmd = dst_mm.pmd_ref(addr, alloc=True)
            assert dpmd is not None
            if not pmd_present(e) or pmd_leaf(e):
                if nxt - addr == HPAGE_PMD_SIZE:
                    copy_huge_pmd(dst_vma, src_vma, dpmd, spmd, addr)
                    addr = nxt
                    continue
                __split_huge_pmd(src_vma, spmd, addr)
            got_s = src_mm.pte_offset_map_lock(spmd)
            assert got_s is not None
            stbl, stid = got_s
            got_d = dst_mm.pte_offset_map_lock(dpmd, alloc=True)
            assert got_d is not None
            dtbl, dtid = got_d
            i0 = pte_index(addr)
            i1 = i0 + ((nxt - addr) >> PAGE_SHIFT)
            try:
                _copy_pte_table(dst_vma, src_vma, dtbl, stbl, i0, i1, addr, rss)
            finally:
                dst_mm.pte_unmap_unlock(dtid)
                src_mm.pte_unmap_unlock(stid)
            addr = nxt
        for k in range(4):
            if rss[k]:
                dst_mm.add_mm_counter(k, rss[k])
    finally:
        if rng is not None:
            rng.__exit__(None, None, None)
    sys.stats.add("fork.copy_page_range")
    return 0


# -- driver helpers ------------------------------------------------------------------------------
def _locked_pte(vma: Vma, addr: int) -> tuple[npt.NDArray[np.uint64], int, int]:
    """``get_locked_pte()``: allocate down to the pte and lock its table."""
    mm = vma.vm_mm
    pmd = mm.pmd_ref(addr, alloc=True)
    assert pmd is not None
    got = mm.pte_offset_map_lock(pmd, alloc=True)
    assert got is not None
    tbl, tid = got
    return tbl, tid, pte_index(addr)


def vm_insert_page(vma: Vma, addr: int, pfn: int) -> int:
    """``vm_insert_page()``: map a driver-allocated (non-anonymous) page at *addr*; the
    VMA becomes VM_MIXEDMAP. Takes a page reference. Returns 0, -EFAULT, -EINVAL, -EBUSY."""
    mm = vma.vm_mm
    mem = mm.sys.mem
    if addr < vma.vm_start or addr >= vma.vm_end:
        return -EFAULT
    if mem.refcount[pfn] <= 0 or mem.flags[pfn] & PG_anon:
        return -EINVAL
    if not vma.vm_flags & VM_MIXEDMAP:
        if vma.vm_flags & VM_PFNMAP:
            raise AssertionError("vm_insert_page on a VM_PFNMAP vma")
        vma.vm_flags |= VM_MIXEDMAP
    tbl, tid, idx = _locked_pte(vma, addr)
    try:
        if tbl[idx] != 0:
            return -EBUSY
        mem.refcount[pfn] += 1
        mm.add_mm_counter(mm_counter_file(mm.sys, pfn), 1)
        mem.mapcount[pfn] += 1
        set_pte_at(vma.vm_mm, tbl, idx, pfn_pte(pfn, vma.vm_page_prot))
        return 0
    finally:
        mm.pte_unmap_unlock(tid)


def vmf_insert_pfn(vma: Vma, addr: int, pfn: int, write: bool = False) -> int:
    """``vmf_insert_pfn_prot()``: map a raw pfn (no struct page use) as a special pte."""
    mm = vma.vm_mm
    if addr < vma.vm_start or addr >= vma.vm_end:
        return -EFAULT
    tbl, tid, idx = _locked_pte(vma, addr)
    try:
        if tbl[idx] != 0:
            return -EBUSY
        e = pte_mkspecial(pfn_pte(pfn, vma.vm_page_prot))
        if write:
            e |= _PAGE_RW | _PAGE_DIRTY
        set_pte_at(vma.vm_mm, tbl, idx, e)
        return 0
    finally:
        mm.pte_unmap_unlock(tid)


def vmf_insert_mixed(vma: Vma, addr: int, pfn: int) -> int:
    """``vmf_insert_mixed()``: a refcounted page if *pfn* has a struct page, else a
    special pte (VM_MIXEDMAP)."""
    if pfn < vma.vm_mm.sys.mem.max_pfn and vma.vm_mm.sys.mem.refcount[pfn] > 0:
        return vm_insert_page(vma, addr, pfn)
    return vmf_insert_pfn(vma, addr, pfn)


def remap_pfn_range(vma: Vma, addr: int, pfn: int, size: int) -> int:
    """``remap_pfn_range()``: map ``size`` bytes of raw pfns (I/O memory); the VMA
    becomes VM_IO | VM_PFNMAP | VM_DONTEXPAND."""
    if addr & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1) or addr < vma.vm_start or addr + size > vma.vm_end:
        return -EINVAL
    vma.vm_flags |= VM_IO | VM_PFNMAP | VM_DONTEXPAND
    for k in range(size >> PAGE_SHIFT):
        ret = vmf_insert_pfn(vma, addr + (k << PAGE_SHIFT), pfn + k)
        if ret:
            return ret
    return 0


