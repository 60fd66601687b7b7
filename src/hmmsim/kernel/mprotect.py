"""mprotect: changing a range's protection and rewriting its ptes.

Models ``mm/mprotect.c``: ``do_mprotect_pkey`` (with the kernel's partial-success
behaviour: VMAs before a hole are changed, then ``-ENOMEM``), ``mprotect_fixup``
(overcommit accounting when a private mapping becomes writable; nothing at all when the
flags do not change), ``change_protection`` with the ``MMU_NOTIFY_PROTECTION_VMA``
notifier started at the first populated pud (6.12), whole-table pte rewriting, the
``MM_CP_TRY_CHANGE_WRITABLE`` upgrade of exclusive anonymous pages, the unconditional
downgrade of writable migration / device-private / device-exclusive entries, and
``change_prot_numa`` (NUMA-hinting protnone entries).
"""

from __future__ import annotations

import numpy as np

from .errno import EACCES, EINVAL, ENOMEM
from .huge_memory import __split_huge_pmd, change_huge_pmd
from .hugetlb import hugetlb_change_protection
from .mm import MM
from .mmap import vm_enough_memory, vma_modify, vma_try_merge
from .mmu_notifier import (
    MmuNotifierEvent,
    MmuNotifierRange,
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
)
from .page_types import (
    HPAGE_PMD_SIZE,
    PAGE_ALIGN,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_MASK,
    PMD_SIZE,
    PUD_SIZE,
    ULONG_MAX,
    pte_index,
)
from .pgtable import (
    _PAGE_CHG_MASK,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    PAGE_NONE,
    PTE_PFN_MASK,
    is_device_exclusive_entry,
    is_writable_device_exclusive_entry,
    is_writable_device_private_entry,
    is_writable_migration_entry,
    make_readable_device_exclusive_entry,
    make_readable_device_private_entry,
    make_readable_exclusive_migration_entry,
    make_readable_migration_entry,
    pmd_leaf,
    pmd_present,
    pte_to_swp_entry,
    swp_entry_to_pte,
    swp_offset,
)
from .physmem import PG_anon, PG_anon_exclusive
from .vma import (
    VM_ACCOUNT,
    VM_EXEC,
    VM_HUGETLB,
    VM_NORESERVE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    Vma,
    calc_vm_prot_bits,
    is_cow_mapping,
    vm_get_page_prot,
    vma_is_anonymous,
    vma_soft_dirty_enabled,
)

__all__ = ("change_prot_numa", "change_protection", "do_mprotect", "mprotect_fixup")

_U = np.uint64
_VM_ACCESS_FLAGS = VM_READ | VM_WRITE | VM_EXEC


def _try_writable_mask(vma: Vma, seg: np.ndarray, new: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``can_change_pte_writable()`` over a table span."""
    cand = present & ((new & _U(_PAGE_RW)) == 0) & ((new & _U(_PAGE_PRESENT)) != 0)
    if vma_soft_dirty_enabled(vma):
        cand &= (new & _U(_PAGE_SOFT_DIRTY)) != 0  # pte_needs_soft_dirty_wp()
    if not cand.any():
        return cand
    if vma.vm_flags & VM_SHARED:
        return cand & ((new & _U(_PAGE_DIRTY)) != 0)
    cand &= (new & _U(_PAGE_SPECIAL)) == 0
    mem = vma.vm_mm.sys.mem
    idx = np.flatnonzero(cand)
    pfns = ((new[idx] & _U(PTE_PFN_MASK)) >> _U(PAGE_SHIFT)).astype(np.int64)
    okp = pfns < mem.max_pfn
    fl = np.zeros(len(idx), np.uint32)
    fl[okp] = mem.flags[pfns[okp]]
    heads_anon = np.zeros(len(idx), bool)
    heads_anon[okp] = (mem.flags[mem.heads(pfns[okp])] & PG_anon) != 0
    good = heads_anon & ((fl & PG_anon_exclusive) != 0)
    out = np.zeros_like(cand)
    out[idx[good]] = True
    return out


def _change_nonpresent(vma: Vma, pte: int) -> int:
    """``change_pte_range()`` for one swap-format entry: writable entries lose write."""
    entry = pte_to_swp_entry(pte)
    mem = vma.vm_mm.sys.mem
    if is_writable_migration_entry(entry):
        pfn = swp_offset(entry) & ((1 << 40) - 1)
        if mem.flags[mem.compound_head(pfn)] & PG_anon:
            e = make_readable_exclusive_migration_entry(swp_offset(entry))
        else:
            e = make_readable_migration_entry(swp_offset(entry))
        return swp_entry_to_pte(e) | (pte & _PAGE_SWP_SOFT_DIRTY)
    if is_writable_device_private_entry(entry):
        return swp_entry_to_pte(make_readable_device_private_entry(swp_offset(entry))) | (pte & _PAGE_SWP_UFFD_WP)
    if (is_device_exclusive_entry(entry) and is_writable_device_exclusive_entry(entry)
            and not vma.vm_mm.sys.profile.device_exclusive_mapped):  # 7.3: one entry type
        return swp_entry_to_pte(make_readable_device_exclusive_entry(swp_offset(entry))) | (pte & (_PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP))
    return pte


def _change_pte_span(vma: Vma, tbl: np.ndarray, i0: int, i1: int, newprot: int, try_writable: bool,
                     prot_numa: bool) -> int:
    """``change_pte_range()`` over entries ``[i0, i1)`` of one table (lock held)."""
    seg = tbl[i0:i1]
    present = (seg & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0
    pages = 0
    if present.any():
        if prot_numa:
            mem = vma.vm_mm.sys.mem
            pf = ((seg & _U(PTE_PFN_MASK)) >> _U(PAGE_SHIFT)).astype(np.int64)
            skip = ((seg & _U(_PAGE_PRESENT)) == 0) | ((seg & _U(_PAGE_SPECIAL)) != 0) | (pf >= mem.max_pfn)
            if is_cow_mapping(vma.vm_flags):
                # "Also skip shared copy-on-write pages" (folio_likely_mapped_shared)
                cand = np.flatnonzero(present & ~skip)
                if len(cand):
                    heads = mem.heads(pf[cand])
                    skip[cand[(mem.mapcount[heads] > 1) | (mem.entire_mapcount[heads] > 0)]] = True
            present = present & ~skip
        new = (seg & _U(_PAGE_CHG_MASK)) | _U(newprot & ~_PAGE_CHG_MASK)
        if try_writable:
            up = _try_writable_mask(vma, seg, new, present)
            new[up] |= _U(_PAGE_RW)
        seg[present] = new[present]
        pages += int(present.sum())
    odd = (seg != 0) & ~((seg & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0)
    for i in np.flatnonzero(odd).tolist():
        old = int(seg[i])
        nw = _change_nonpresent(vma, old)
        if nw != old:
            seg[i] = nw
            pages += 1
    return pages


def change_protection(vma: Vma, start: int, end: int, try_writable: bool = False, prot_numa: bool = False) -> int:
    """``change_protection()``: apply the VMA's (new) ``vm_page_prot`` to ``[start, end)``.

    The ``MMU_NOTIFY_PROTECTION_VMA`` invalidation starts at the first populated pud entry
    (nothing is notified for a range without page tables). Returns pages changed."""
    mm = vma.vm_mm
    newprot = PAGE_NONE if prot_numa else vma.vm_page_prot
    if vma.vm_flags & VM_HUGETLB:
        return hugetlb_change_protection(vma, start, end, newprot)
    rng: MmuNotifierRange | None = None
    pages = 0
    addr = start
    try:
        while addr < end:
            pud_next = min((addr + PUD_SIZE) & ~(PUD_SIZE - 1), end)
            pud = mm.pud_entry(addr)
            if pud is None or int(pud[0][pud[1]]) == 0:
                addr = pud_next
                continue
            if rng is None:
                r = MmuNotifierRange(MmuNotifierEvent.MMU_NOTIFY_PROTECTION_VMA, 0, mm, addr, end)
                mmu_notifier_invalidate_range_start(r)
                rng = r  # only a started range is ended (a raising start unwinds itself)
            while addr < pud_next:
                nxt = min((addr + PMD_SIZE) & PMD_MASK, pud_next)
                pmd = mm.pmd_ref(addr)
                if pmd is None:
                    addr = nxt
                    continue
                e = pmd.get()
                if e == 0:
                    addr = nxt
                    continue
                if not pmd_present(e) or pmd_leaf(e):
                    if nxt - addr != HPAGE_PMD_SIZE:
                        __split_huge_pmd(vma, pmd, addr)
                    else:
                        pages += change_huge_pmd(vma, pmd, addr, newprot, try_writable, prot_numa)
                        addr = nxt
                        continue
                got = mm.pte_offset_map_lock(pmd)
                if got is not None:
                    tbl, tid = got
                    i0 = pte_index(addr)
                    try:
                        pages += _change_pte_span(vma, tbl, i0, i0 + ((nxt - addr) >> PAGE_SHIFT), newprot,
                                                  try_writable, prot_numa)
                    finally:
                        mm.pte_unmap_unlock(tid)
                addr = nxt
    finally:
        if rng is not None:
            mmu_notifier_invalidate_range_end(rng)
    mm.sys.stats.add("mprotect.change_protection")
    return pages


def change_prot_numa(vma: Vma, start: int, end: int) -> int:
    """``change_prot_numa()``: turn present ptes into NUMA-hinting protnone entries (what
    automatic NUMA balancing does); the next access takes a NUMA fault."""
    return change_protection(vma, start, end, prot_numa=True)


def _wants_manual_write_upgrade(vma: Vma) -> bool:
    """``vma_wants_manual_pte_write_upgrade()``: private writable mappings (shared ones get
    writable ptes from vm_page_prot directly, tmpfs needing no write notification)."""
    if vma.vm_flags & VM_SHARED:
        return False
    return bool(vma.vm_flags & VM_WRITE)


def mprotect_fixup(mm: MM, vma: Vma, start: int, end: int, newflags: int) -> int:
    """``mprotect_fixup()``: give ``[start, end)`` of *vma* the flags *newflags*."""
    oldflags = vma.vm_flags
    if newflags == oldflags:
        return 0
    nrpages = (end - start) >> PAGE_SHIFT
    if newflags & VM_WRITE:
        if not oldflags & (VM_ACCOUNT | VM_WRITE | VM_HUGETLB | VM_SHARED | VM_NORESERVE):
            if vm_enough_memory(mm, nrpages):
                return -ENOMEM
            newflags |= VM_ACCOUNT
    elif oldflags & VM_ACCOUNT and vma_is_anonymous(vma) and vma.anon_vma is None:
        newflags &= ~VM_ACCOUNT
    r = vma_modify(mm, vma, start, end)
    if isinstance(r, int):
        return r
    vma = r
    old_prot = vma.vm_page_prot
    vma.vm_flags = newflags
    vma.vm_page_prot = vm_get_page_prot(newflags)
    try:
        change_protection(vma, start, end, try_writable=_wants_manual_write_upgrade(vma))
    except BaseException:
        # a callback raised inside (a notifier): the ptes are untouched (the range was
        # never started), so give the VMA its old flags back and merge it with the pieces
        # it was split from: the call changes nothing
        vma.vm_flags = oldflags
        vma.vm_page_prot = old_prot
        vma_try_merge(mm, vma)
        raise
    vma_try_merge(mm, vma)
    return 0


def do_mprotect(mm: MM, start: int, length: int, prot: int) -> int:
    """``do_mprotect_pkey()``: change the protection of ``[start, start + length)``.

    Returns 0, ``-EINVAL`` (misaligned, bad prot), ``-ENOMEM`` (a hole: VMAs before the
    hole have already been changed, as in the kernel) or ``-EACCES``. *start* and
    *length* are unsigned longs: a negative length wraps the end (``-ENOMEM``)."""
    start &= ULONG_MAX
    length &= ULONG_MAX
    if start & (PAGE_SIZE - 1):
        return -EINVAL
    if not length:
        return 0
    length = PAGE_ALIGN(length)
    end = (start + length) & ULONG_MAX
    if end <= start:
        return -ENOMEM
    # arch_validate_prot(): PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM (0x8, a no-op)
    if prot & ~0xF:
        return -EINVAL
    prot &= 0x7
    mm.mmap_lock.down_write()
    try:
        vma = mm.find_vma(start)
        if vma is None or vma.vm_start >= end or vma.vm_start > start:
            return -ENOMEM
        nstart = start
        error = 0
        while True:
            newflags = calc_vm_prot_bits(prot) | (vma.vm_flags & ~_VM_ACCESS_FLAGS)
            if (newflags & ~(newflags >> 4)) & _VM_ACCESS_FLAGS:
                error = -EACCES
                break
            tmp = min(vma.vm_end, end)
            error = mprotect_fixup(mm, vma, nstart, tmp, newflags)
            if error:
                break
            nstart = tmp
            if nstart >= end:
                break
            nxt = mm.find_vma(nstart)
            if nxt is None or nxt.vm_start >= end:
                error = -ENOMEM  # the range runs past the last VMA
                break
            if nxt.vm_start > nstart:
                error = -ENOMEM  # a hole inside the range
                break
            vma = nxt
        mm.sys.stats.add("mm.mprotect")
        return error
    finally:
        mm.mmap_lock.up_write()
