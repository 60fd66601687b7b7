"""Transparent huge pages: PMD-mapped anonymous THPs and the huge zero page.

Models the parts of ``mm/huge_memory.c`` HMM meets: ``thp_vma_allowable_order``,
``do_huge_pmd_anonymous_page`` (huge zero page on reads, a THP on writes),
``do_huge_pmd_wp_page`` (reuse or split; a write to the huge zero page splits it in
6.12 and gets a new THP in 7.3, ``do_huge_zero_wp_pmd``), ``__split_huge_pmd`` (under an
``MMU_NOTIFY_CLEAR`` of the 2 MiB range), ``zap_huge_pmd``, ``copy_huge_pmd`` (fork),
``change_huge_pmd`` (mprotect), ``move_huge_pmd`` (mremap), and the PUD-level entry
points used by device-dax style mappings, and the folio split (``split_folio``,
7.3's ``folio_split_unmapped``; device-private folios tell their driver through the
pagemap's ``folio_split``). Each PMD path also takes 7.3's device-private PMDs: their
branches live in :mod:`.huge_memory_device`. Only the PMD order (512 pages) exists;
there are no mTHP sizes and khugepaged never collapses anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errno import EAGAIN, EBUSY, EINVAL
from .folio import folio_put, free_folio
from .huge_memory_device import (
    change_huge_pmd_device_private,
    copy_huge_pmd_device_private,
    split_huge_pmd_device_private,
    zap_huge_pmd_device_private,
)
from .memremap import zone_device_private_split_cb
from .migrate import (
    change_pmd_migration_entry,
    copy_pmd_migration_entry,
    split_huge_pmd_migration_entry,
    zap_pmd_migration_entry,
)
from .mm import MM_ANONPAGES, PtRef, set_ptes
from .mm_types import (
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    VM_FAULT_FALLBACK,
    VM_FAULT_SIGBUS,
    VmFault,
)
from .mmu_notifier import MmuNotifierEvent, notify_range
from .page_types import (
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PMD_MASK,
    PUD_SIZE,
)
from .pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    _PAGE_UFFD_WP,
    _SWP_MIG_DIRTY,
    _SWP_MIG_YOUNG,
    SWP_MIGRATION_READ,
    SWP_MIGRATION_READ_EXCLUSIVE,
    SWP_MIGRATION_WRITE,
    is_pmd_device_private_entry,
    mk_table_entry,
    pfn_pte,
    pmd_leaf,
    pmd_present,
    pte_dirty,
    pte_mkdirty,
    pte_mkold,
    pte_mkspecial,
    pte_mkwrite,
    pte_mkyoung,
    pte_modify,
    pte_pfn,
    pte_present,
    pte_protnone,
    pte_write,
    pte_wrprotect,
)
from .physmem import (
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
    PG_head,
    PG_hugetlb,
    PG_swapbacked,
    PG_uptodate,
)
from .rmap import (
    anon_vma_prepare,
    folio_add_new_anon_rmap_pmd,
    folio_try_dup_anon_rmap_pmd,
    page_vma_mapped_pmd,
    rmap_walk,
)
from .vma import (
    VM_HUGEPAGE,
    VM_NOHUGEPAGE,
    VM_SHARED,
    VM_SPECIAL,
    VM_WRITE,
    Vma,
    pte_needs_soft_dirty_wp,
    vma_is_anonymous,
)

if TYPE_CHECKING:
    from .mm import MM
    from .system import System

__all__ = (
    "change_huge_pmd", "copy_huge_pmd", "create_huge_pmd", "create_huge_pud",
    "do_huge_pmd_anonymous_page", "do_huge_pmd_numa_page", "do_huge_pmd_wp_page",
    "do_huge_zero_wp_pmd", "folio_split_unmapped",
    "huge_pmd_set_accessed", "huge_pmd_set_accessed_batch", "huge_pud_fault",
    "is_huge_zero_pmd", "madvise_free_huge_pmd", "map_anon_folio_pmd_pf", "move_huge_pmd",
    "split_folio",
    "split_huge_pmd", "split_huge_pmd_address",
    "split_huge_pud", "thp_vma_allowable_order", "thp_vma_suitable_order",
    "vma_adjust_trans_huge", "vma_alloc_anon_folio_pmd", "zap_huge_pmd",
)

_U = np.uint64


def is_huge_zero_pmd(mm: "MM", pmd: int) -> bool:
    return pmd_leaf(pmd) and mm.sys.mem.is_huge_zero_pfn(pte_pfn(pmd))


def thp_vma_suitable_order(vma: Vma, addr: int, order: int) -> bool:
    """``thp_vma_suitable_order()``: the aligned 2**order-page block around *addr* lies
    inside the VMA (and, for file mappings, the file offset is aligned too)."""
    size = 1 << (order + PAGE_SHIFT)
    if not vma_is_anonymous(vma):
        if ((vma.vm_start >> PAGE_SHIFT) - vma.vm_pgoff) % (1 << order):
            return False
    haddr = addr & ~(size - 1)
    return haddr >= vma.vm_start and haddr + size <= vma.vm_end


def thp_vma_allowable_order(vma: Vma, order: int, addr: int) -> bool:
    """``thp_vma_allowable_order(..., TVA_IN_PF | TVA_ENFORCE_SYSFS, order)`` plus the
    suitability check of the fault path, for the fault at *addr*.

    PMD order: anonymous VMAs, per the THP mode (``always``; ``madvise`` needs
    VM_HUGEPAGE; ``never``), never with VM_NOHUGEPAGE. PUD order: only mappings whose
    driver has a ``huge_fault`` (device-dax)."""
    ops = vma.vm_ops
    if ops is not None and ops.huge_fault is not None:
        return thp_vma_suitable_order(vma, addr, order)
    if order != HPAGE_PMD_ORDER or not vma_is_anonymous(vma):
        return False
    flags = vma.vm_flags
    if flags & VM_NOHUGEPAGE or flags & VM_SPECIAL:
        return False
    mode = vma.vm_mm.sys.config.thp
    if mode == "never" or (mode == "madvise" and not flags & VM_HUGEPAGE):
        return False
    return thp_vma_suitable_order(vma, addr, order)


# -- faults ------------------------------------------------------------------------------------
def create_huge_pmd(vmf: "VmFault") -> int:
    """``create_huge_pmd()``."""
    vma = vmf.vma
    if vma_is_anonymous(vma):
        return do_huge_pmd_anonymous_page(vmf)
    if vma.vm_ops is not None and vma.vm_ops.huge_fault is not None:
        return int(vma.vm_ops.huge_fault(vmf, HPAGE_PMD_ORDER))
    return VM_FAULT_FALLBACK


def create_huge_pud(vmf: "VmFault", pud: PtRef) -> int:
    """``create_huge_pud()``: only drivers with ``huge_fault`` map PUD leaves."""
    ops = vmf.vma.vm_ops
    if ops is None or ops.huge_fault is None:
        return VM_FAULT_FALLBACK
    return int(ops.huge_fault(vmf, 18))


def huge_pud_fault(vmf: "VmFault", pud: PtRef, e: int) -> int:
    """A fault on a present PUD leaf: ``wp_huge_pud`` or ``huge_pud_set_accessed``."""
    if vmf.flags & FAULT_FLAG_WRITE and not pte_write(e):
        ops = vmf.vma.vm_ops
        if ops is None or ops.huge_fault is None:
            return VM_FAULT_SIGBUS
        return int(ops.huge_fault(vmf, 18))
    pud.set(pte_mkyoung(e) if not vmf.flags & FAULT_FLAG_WRITE else pte_mkdirty(pte_mkyoung(e)))
    return 0


def do_huge_pmd_anonymous_page(vmf: "VmFault") -> int:
    """``do_huge_pmd_anonymous_page()``: the huge zero page for a read (if enabled), else
    a new zeroed THP mapped writable (if VM_WRITE); ``VM_FAULT_FALLBACK`` when no 2 MiB
    block is free."""
    vma = vmf.vma
    mm = vma.vm_mm
    sys = mm.sys
    haddr = vmf.address & PMD_MASK
    if not thp_vma_suitable_order(vma, haddr, HPAGE_PMD_ORDER):
        return VM_FAULT_FALLBACK
    anon_vma_prepare(vma)
    pmd = vmf.pmd
    assert pmd is not None
    if not vmf.flags & FAULT_FLAG_WRITE and sys.config.huge_zero_page:
        zero = sys.mem.get_huge_zero_folio()
        if zero < 0:
            sys.stats.add("thp.fault_fallback")
            return VM_FAULT_FALLBACK
        ptl = mm.pmd_lock(pmd)
        if pmd.get() == 0:
            pmd.set(pfn_pte(zero, vma.vm_page_prot) | _PAGE_PSE)
            sys.stats.add("thp.zero_page_alloc")
        mm.spin_unlock(ptl)
        return 0
    head = vma_alloc_anon_folio_pmd(vma)
    if head < 0:
        return VM_FAULT_FALLBACK
    ptl = mm.pmd_lock(pmd)
    if pmd.get() != 0:
        mm.spin_unlock(ptl)
        sys.mem.free_pages([head])
        return 0
    map_anon_folio_pmd_pf(head, pmd, vma, haddr)
    mm.spin_unlock(ptl)
    return 0


def vma_alloc_anon_folio_pmd(vma: Vma) -> int:
    """``vma_alloc_anon_folio_pmd()``: a zeroed PMD-sized folio for an anonymous fault, or
    -1 after counting ``THP_FAULT_FALLBACK`` when no 2 MiB block is free."""
    sys = vma.vm_mm.sys
    head = sys.mem.alloc_folio(HPAGE_PMD_ORDER)
    if head < 0:
        sys.stats.add("thp.fault_fallback")
    return head


def map_anon_folio_pmd_pf(head: int, pmd: PtRef, vma: Vma, haddr: int) -> None:
    """``map_anon_folio_pmd_pf()`` (7.3's name; the tail of 6.12's
    ``__do_huge_pmd_anonymous_page``): map the new exclusive folio *head* young and dirty,
    writable if the VMA is, with its rmap, rss and ``THP_FAULT_ALLOC``; caller holds the
    pmd lock."""
    mm = vma.vm_mm
    entry = pte_mkyoung(pfn_pte(head, vma.vm_page_prot) | _PAGE_PSE)
    if vma.vm_flags & VM_WRITE:
        entry = pte_mkwrite(pte_mkdirty(entry))
    folio_add_new_anon_rmap_pmd(mm.sys.mem, head, vma, haddr)
    pmd.set(entry)
    mm.add_mm_counter(MM_ANONPAGES, HPAGE_PMD_NR)
    mm.sys.stats.add("thp.fault_alloc")


def do_huge_zero_wp_pmd(vmf: "VmFault") -> int:
    """``do_huge_zero_wp_pmd()`` (7.3): replace a huge zero pmd by a new zeroed THP under
    an ``MMU_NOTIFY_CLEAR`` of the 2 MiB range. ``VM_FAULT_FALLBACK`` (nothing changed,
    no notifier call) when the THP cannot be allocated; 0 also when the pmd changed
    meanwhile (the folio is freed and the fault retried by the caller's caller)."""
    vma = vmf.vma
    mm = vma.vm_mm
    pmd = vmf.pmd
    assert pmd is not None
    haddr = vmf.address & PMD_MASK
    head = vma_alloc_anon_folio_pmd(vma)
    if head < 0:
        return VM_FAULT_FALLBACK
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mm, haddr, haddr + HPAGE_PMD_SIZE):
        ptl = mm.pmd_lock(pmd)
        if pmd.get() != vmf.orig_pmd:
            mm.spin_unlock(ptl)
            mm.sys.mem.free_pages([head])
            return 0
        pmd.set(0)
        map_anon_folio_pmd_pf(head, pmd, vma, haddr)
        mm.spin_unlock(ptl)
    return 0


def do_huge_pmd_wp_page(vmf: "VmFault") -> int:
    """``do_huge_pmd_wp_page()``: reuse an exclusively owned THP, otherwise split the pmd
    (shared THP) and let the pte-level fault do the copy. A huge zero pmd is split too in
    6.12; 7.3 (``huge_zero_wp_allocates_thp``) replaces it by a new THP
    (:func:`do_huge_zero_wp_pmd`) and splits only when that allocation fails."""
    vma = vmf.vma
    mm = vma.vm_mm
    mem = mm.sys.mem
    pmd = vmf.pmd
    assert pmd is not None
    orig = vmf.orig_pmd
    if is_huge_zero_pmd(mm, orig) and mm.sys.profile.huge_zero_wp_allocates_thp:
        # 7.3: a THP replaces the huge zero page; split only if it cannot be allocated
        ret = do_huge_zero_wp_pmd(vmf)
        if not ret & VM_FAULT_FALLBACK:
            return ret
    elif not is_huge_zero_pmd(mm, orig):
        ptl = mm.pmd_lock(pmd)
        if pmd.get() != orig:
            mm.spin_unlock(ptl)
            return 0
        pfn = pte_pfn(orig)
        head = mem.compound_head(pfn)
        reuse = bool(mem.flags[pfn] & PG_anon_exclusive) or int(mem.refcount[head]) == 1
        if reuse:
            mem.flags[pfn] |= PG_anon_exclusive
            if not vmf.flags & FAULT_FLAG_UNSHARE:
                entry = pte_mkdirty(pte_mkyoung(orig))
                if vma.vm_flags & VM_WRITE:
                    entry = pte_mkwrite(entry)
                pmd.set(entry)
            mm.spin_unlock(ptl)
            mm.sys.stats.add("thp.wp_reuse")
            return 0
        mm.spin_unlock(ptl)
    __split_huge_pmd(vma, pmd, vmf.address)
    return VM_FAULT_FALLBACK


def huge_pmd_set_accessed(vmf: "VmFault") -> None:
    """``huge_pmd_set_accessed()``: a spurious fault on a present huge pmd."""
    pmd = vmf.pmd
    assert pmd is not None
    mm = vmf.vma.vm_mm
    ptl = mm.pmd_lock(pmd)
    e = pmd.get()
    if e == vmf.orig_pmd:
        e = pte_mkyoung(e)
        if vmf.flags & FAULT_FLAG_WRITE:
            e = pte_mkdirty(e)
        pmd.set(e)
    mm.spin_unlock(ptl)
    mm.sys.stats.add("fault.spurious")


def huge_pmd_set_accessed_batch(vma: Vma, pmd: PtRef, write: bool, n: int) -> None:
    """*n* more spurious faults on the same huge pmd (see ``handle_mm_fault_range``)."""
    mm = vma.vm_mm
    ptl = mm.pmd_lock(pmd)
    e = pte_mkyoung(pmd.get())
    pmd.set(pte_mkdirty(e) if write else e)
    mm.spin_unlock(ptl)
    st = mm.sys.stats
    st.add("fault.handle_mm_fault", n)
    st.add("fault.spurious", n)
    st.add("lock.pmd_lock.write", n - 1)


def do_huge_pmd_numa_page(vmf: "VmFault") -> int:
    """``do_huge_pmd_numa_page()``: restore the VMA protection on a protnone huge pmd."""
    vma = vmf.vma
    mm = vma.vm_mm
    pmd = vmf.pmd
    assert pmd is not None
    ptl = mm.pmd_lock(pmd)
    if pmd.get() == vmf.orig_pmd:
        e = pte_mkyoung(pte_modify(vmf.orig_pmd, vma.vm_page_prot))
        pfn = pte_pfn(e)
        if vma.vm_flags & VM_WRITE and not vma.vm_flags & VM_SHARED and mm.sys.mem.flags[pfn] & PG_anon_exclusive:
            e = pte_mkwrite(e)
        pmd.set(e)
    mm.spin_unlock(ptl)
    return 0


# -- splitting -----------------------------------------------------------------------------------
def __split_huge_pmd_locked(vma: Vma, haddr: int, pmd: PtRef, freeze: bool = False) -> None:
    """``__split_huge_pmd_locked()``: replace a huge pmd by a pte table mapping the same
    pages with the same permissions (a huge zero pmd becomes 512 zero-page ptes, a PMD
    migration entry 512 migration entries, a device-private PMD 512 device-private
    entries). With *freeze* (splitting for migration, ``split_huge_pmd_address(...,
    true)``) the pages get migration entries and the PMD's folio reference is dropped."""
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    old = pmd.get()
    tid = sys.pt.alloc(1)
    tbl = sys.pt.table(tid)
    pfn = pte_pfn(old)
    sys.stats.add("thp.split_pmd")
    if mem.is_huge_zero_pfn(pfn):
        entry = pte_mkspecial(pfn_pte(mem.zero_pfn, vma.vm_page_prot))
        if old & _PAGE_UFFD_WP:
            entry |= _PAGE_UFFD_WP
        set_ptes(vma.vm_mm, tbl, 0, _U(entry), len(tbl))
        pmd.set(mk_table_entry(tid))
        return
    if is_pmd_device_private_entry(old):
        split_huge_pmd_device_private(vma, haddr, pmd, tbl, tid, freeze)
        return
    if not pte_present(old):
        head = mem.compound_head(pfn)
        split_huge_pmd_migration_entry(vma, haddr, pmd, tbl, tid)
        if freeze:
            folio_put(sys, head)
        return
    head = mem.compound_head(pfn)
    if pte_dirty(old):
        mem.flags[head] |= PG_dirty
    if freeze and mem.flags[head] & PG_anon:
        _split_huge_pmd_freeze(vma, pmd, old, head, tbl, tid)
        return
    bits = old & (_PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_UFFD_WP)
    prot = vma.vm_page_prot & ~(_PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY)
    pfns = np.arange(head, head + HPAGE_PMD_NR, dtype=np.uint64)
    set_ptes(vma.vm_mm, tbl, 0, (pfns << _U(PAGE_SHIFT)) | _U(prot | bits), len(tbl))
    if mem.flags[head] & PG_anon:
        mem.entire_mapcount[head] -= 1
        mem.mapcount[head:head + HPAGE_PMD_NR] += 1
        mem.refcount[head] += HPAGE_PMD_NR - 1
    pmd.set(mk_table_entry(tid))


def _split_huge_pmd_freeze(vma: Vma, pmd: PtRef, old: int, head: int, tbl: "np.ndarray", tid: int) -> None:
    """The *freeze* branch of ``__split_huge_pmd_locked()`` for a present anon THP: the
    folio is shared (``folio_try_share_anon_rmap_pmd``; nothing pins it here) and each
    page gets a migration entry (writable / readable-exclusive / readable, young and
    dirty kept); the entire mapping and the PMD's reference go."""
    mm = vma.vm_mm
    mem = mm.sys.mem
    nr = HPAGE_PMD_NR
    excl = bool(mem.flags[head] & PG_anon_exclusive)
    if excl:
        mem.flags[head:head + nr] &= ~np.uint32(PG_anon_exclusive)
    t = SWP_MIGRATION_WRITE if old & _PAGE_RW else SWP_MIGRATION_READ_EXCLUSIVE if excl else SWP_MIGRATION_READ
    bits = (((_SWP_MIG_YOUNG if old & _PAGE_ACCESSED else 0) | (_SWP_MIG_DIRTY if old & _PAGE_DIRTY else 0)) << 12)
    bits |= (_PAGE_SWP_SOFT_DIRTY if old & _PAGE_SOFT_DIRTY else 0) | (_PAGE_SWP_UFFD_WP if old & _PAGE_UFFD_WP else 0)
    pfns = np.arange(head, head + nr, dtype=np.uint64)
    set_ptes(mm, tbl, 0, (_U(t) << _U(59)) | (pfns << _U(PAGE_SHIFT)) | _U(bits), nr)
    mem.entire_mapcount[head] -= 1
    pmd.set(mk_table_entry(tid))
    folio_put(mm.sys, head)


def __split_huge_pmd(vma: Vma, pmd: PtRef, address: int, freeze: bool = False) -> None:
    """``__split_huge_pmd()``: split under an ``MMU_NOTIFY_CLEAR`` of the 2 MiB range."""
    mm = vma.vm_mm
    haddr = address & PMD_MASK
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mm, haddr, haddr + HPAGE_PMD_SIZE):
        ptl = mm.pmd_lock(pmd)
        e = pmd.get()
        if e and (not pmd_present(e) or pmd_leaf(e)):
            __split_huge_pmd_locked(vma, haddr, pmd, freeze)
        mm.spin_unlock(ptl)


def split_huge_pmd(vma: Vma, pmd: PtRef, address: int) -> None:
    """``split_huge_pmd()``: split if the pmd is a huge mapping or a migration entry."""
    e = pmd.get()
    if e and (not pmd_present(e) or pmd_leaf(e)):
        __split_huge_pmd(vma, pmd, address)


def split_huge_pmd_address(vma: Vma, address: int, freeze: bool = False) -> None:
    """``split_huge_pmd_address()``: split the huge pmd covering *address*, if any
    (*freeze*: into migration entries, see :func:`__split_huge_pmd_locked`)."""
    pmd = vma.vm_mm.pmd_ref(address)
    if pmd is not None:
        e = pmd.get()
        if e and (not pmd_present(e) or pmd_leaf(e)):
            __split_huge_pmd(vma, pmd, address, freeze)


def split_huge_pud(vma: Vma, pud: PtRef, address: int) -> None:
    """``split_huge_pud()``: PUD leaves (device-dax) are not split but zapped; the next
    access faults them in again, at a smaller size if the mapping asks for it."""
    e = pud.get()
    if e and pmd_leaf(e):
        haddr = address & ~(PUD_SIZE - 1)
        with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, vma.vm_mm, haddr, haddr + PUD_SIZE):
            pud.set(0)


def vma_adjust_trans_huge(vma: Vma, start: int, end: int, adjust_next: int) -> None:
    """``vma_adjust_trans_huge()``: split huge pmds that straddle new VMA boundaries."""
    for addr in (start, end):
        if addr & ~PMD_MASK and (addr & PMD_MASK) >= vma.vm_start and (addr & PMD_MASK) + HPAGE_PMD_SIZE <= vma.vm_end:
            split_huge_pmd_address(vma, addr)
    if adjust_next:
        nxt = vma.vm_mm.find_vma(vma.vm_end)
        if nxt is not None:
            addr = nxt.vm_start + adjust_next
            if addr & ~PMD_MASK:
                split_huge_pmd_address(nxt, addr)


# -- zap / copy / protect / move -------------------------------------------------------------
def zap_huge_pmd(vma: Vma, pmd: PtRef, addr: int) -> list[int]:
    """``zap_huge_pmd()``: clear a huge pmd covering a whole unmapped 2 MiB range.
    Returns the folios (head pfns) whose mapping reference the caller must drop."""
    mm = vma.vm_mm
    mem = mm.sys.mem
    ptl = mm.pmd_lock(pmd)
    e = pmd.get()
    pmd.set(0)
    mm.spin_unlock(ptl)
    if is_pmd_device_private_entry(e):
        return zap_huge_pmd_device_private(vma, e)
    if not pte_present(e):
        return zap_pmd_migration_entry(vma, e)
    pfn = pte_pfn(e)
    if mem.is_huge_zero_pfn(pfn):
        return []
    head = mem.compound_head(pfn)
    mem.entire_mapcount[head] -= 1
    if pte_dirty(e):
        mem.flags[head] |= PG_dirty
    if mem.flags[head] & PG_anon:
        mm.add_mm_counter(MM_ANONPAGES, -HPAGE_PMD_NR)
    return [head]


def copy_huge_pmd(dst_vma: Vma, src_vma: Vma, dst_pmd: PtRef, src_pmd: PtRef, addr: int) -> int:
    """``copy_huge_pmd()`` at fork: share the THP (or huge zero page) read-only between
    parent and child. Returns 0."""
    src_mm = src_vma.vm_mm
    dst_mm = dst_vma.vm_mm
    mem = src_mm.sys.mem
    if not vma_is_anonymous(dst_vma):
        return 0
    e = src_pmd.get()
    if is_pmd_device_private_entry(e):
        return copy_huge_pmd_device_private(dst_vma, src_vma, dst_pmd, src_pmd, e)
    if not pte_present(e):
        return copy_pmd_migration_entry(dst_vma, src_vma, dst_pmd, src_pmd, e)
    pfn = pte_pfn(e)
    if not mem.is_huge_zero_pfn(pfn):
        head = mem.compound_head(pfn)
        mem.refcount[head] += 1
        folio_try_dup_anon_rmap_pmd(mem, head)
        dst_mm.add_mm_counter(MM_ANONPAGES, HPAGE_PMD_NR)
    src_pmd.set(pte_wrprotect(e))
    dst_pmd.set(pte_mkold(pte_wrprotect(e)) & ~_PAGE_UFFD_WP)
    return 0


def change_huge_pmd(vma: Vma, pmd: PtRef, addr: int, newprot: int, try_writable: bool,
                    prot_numa: bool = False) -> int:
    """``change_huge_pmd()`` for a pmd fully inside the mprotect range; returns the number
    of pages changed (``HPAGE_PMD_NR`` or 0)."""
    mm = vma.vm_mm
    mem = mm.sys.mem
    ptl = mm.pmd_lock(pmd)
    try:
        e = pmd.get()
        if is_pmd_device_private_entry(e):
            return change_huge_pmd_device_private(vma, pmd, e)
        if not pte_present(e):
            return change_pmd_migration_entry(vma, pmd, e)
        if prot_numa and (is_huge_zero_pmd(mm, e) or pte_protnone(e)):
            return 0
        entry = pte_modify(e, newprot)
        if pte_needs_soft_dirty_wp(vma, entry):  # pmd_needs_soft_dirty_wp()
            try_writable = False
        if try_writable and not pte_write(entry) and not pte_protnone(entry):
            pfn = pte_pfn(entry)
            if vma.vm_flags & VM_SHARED:
                if pte_dirty(entry):
                    entry = pte_mkwrite(entry)
            elif not mem.is_huge_zero_pfn(pfn) and mem.flags[pfn] & PG_anon and mem.flags[pfn] & PG_anon_exclusive:
                entry = pte_mkwrite(entry)
        pmd.set(entry)
        return HPAGE_PMD_NR
    finally:
        mm.spin_unlock(ptl)


def move_huge_pmd(vma: Vma, old_pmd: PtRef, new_pmd: PtRef) -> bool:
    """``move_huge_pmd()``: move a whole huge pmd (mremap with 2 MiB-aligned source and
    destination). Returns True if it moved."""
    e = old_pmd.get()
    if new_pmd.get() != 0:
        return False
    old_pmd.set(0)
    new_pmd.set(e)
    return True


def split_folio(sys: "System", head: int) -> int:
    """``split_huge_page()``/``split_folio()`` of an anonymous THP: every PMD mapping is
    split first (a present THP PMD or, in 7.3, a device-private PMD); then the folio is
    unmapped (one ``MMU_NOTIFY_CLEAR`` per VMA over the folio's extent), split into
    order-0 folios that keep their data, flags and pte mappings, and remapped; new folios
    nothing maps any more are freed. Returns 0, or ``-EBUSY`` for a folio that cannot be
    split (not anonymous, or hugetlb).

    Models ``mm/huge_memory.c:__folio_split()`` to order 0 (the unmap/remap through
    migration entries happens in place here)."""
    mem = sys.mem
    head = mem.compound_head(head)
    order = int(mem.order[head])
    if order == 0:
        return 0
    if not mem.flags[head] & PG_anon or mem.flags[head] & PG_hugetlb:
        return -EBUSY
    nr = 1 << order
    seen: list[tuple[Vma, int]] = []
    for vma, addr in list(rmap_walk(mem, head)):
        pmd = vma.vm_mm.pmd_ref(addr)
        if pmd is not None and page_vma_mapped_pmd(pmd.get(), head, migration=False):
            __split_huge_pmd(vma, pmd, addr)
        if all(v is not vma for v, _ in seen):
            seen.append((vma, addr))
    for vma, addr in seen:
        end = min(addr + (nr << PAGE_SHIFT), vma.vm_end)
        with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, vma.vm_mm, max(addr, vma.vm_start), end):
            pass
    _split_folio_to_order0(sys, head, nr)
    return 0


def folio_split_unmapped(sys: "System", head: int, new_order: int = 0) -> int:
    """``folio_split_unmapped()`` (7.3): split a locked large anon folio that no page
    table maps (its mappings are migration entries, or it is a fresh device folio) into
    order-0 folios; a device-private folio's driver hears of each one through
    ``folio_split``. Returns 0, ``-EINVAL`` for an order other than 0 or a folio that is
    not large, or ``-EAGAIN`` if the folio is mapped or has references beyond the
    caller's."""
    mem = sys.mem
    head = mem.compound_head(head)
    order = int(mem.order[head])
    if new_order != 0 or order == 0:
        return -EINVAL
    nr = 1 << order
    if mem.folio_mapcount(head) or int(mem.refcount[head]) != 1:
        return -EAGAIN
    _split_folio_to_order0(sys, head, nr, unmapped=True)
    return 0


def _split_folio_to_order0(sys: "System", head: int, nr: int, unmapped: bool = False) -> None:
    """``__folio_freeze_and_split_unmapped()`` + the remap and release of
    ``__folio_split()``: the folio at *head* becomes *nr* order-0 folios; each page keeps
    a reference per mapping, the head also the references that were not mappings (the
    caller's); a device-private folio's pagemap is told (``zone_device_private_split_cb``)
    and counts the new folios; new folios with no reference are freed. *unmapped*
    (``folio_split_unmapped``): every new folio keeps the caller's one reference."""
    mem = sys.mem
    pte_maps = mem.mapcount[head:head + nr].copy()
    extra = int(mem.refcount[head]) - int(pte_maps.sum()) - int(mem.entire_mapcount[head])
    keep = mem.flags[head] & np.uint32(PG_anon | PG_dirty | PG_swapbacked | PG_uptodate)
    mem.refcount[head:head + nr] = pte_maps
    if unmapped:
        mem.refcount[head + 1:head + nr] += extra
    mem.refcount[head] += extra
    mem.order[head] = 0
    mem.head_off[head:head + nr] = 0
    mem.flags[head] &= ~np.uint32(PG_head)
    mem.flags[head + 1:head + nr] |= keep
    mem.mapping[head + 1:head + nr] = mem.mapping[head]
    pgmap = sys.pgmap_of(head)
    if pgmap is not None:
        # every new folio is unfrozen with a reference of the split, then released
        pgmap.nr_used += nr - 1
        if pgmap.is_private:
            for p in range(head + 1, head + nr):
                zone_device_private_split_cb(sys, head, p)
            zone_device_private_split_cb(sys, head, None)
        elif pgmap.is_coherent:
            pgmap.coherent_split_heads.append(head)
    sys.stats.add("thp.split_page")
    dead = np.flatnonzero(mem.refcount[head:head + nr] == 0) + head
    if pgmap is not None:
        for p in dead.tolist():
            free_folio(sys, p)
    elif len(dead):
        sys.stats.add("page.free", len(dead))
        mem.free_pages(dead)


def madvise_free_huge_pmd(vma: Vma, pmd: PtRef) -> None:
    """``madvise_free_huge_pmd()`` for a whole exclusively mapped THP: mark it clean and
    old (lazily freeable; without reclaim the data stays)."""
    e = pmd.get()
    if pte_present(e) and not vma.vm_mm.sys.mem.is_huge_zero_pfn(pte_pfn(e)):
        pmd.set(e & ~(_PAGE_DIRTY | _PAGE_ACCESSED))
        head = vma.vm_mm.sys.mem.compound_head(pte_pfn(e))
        vma.vm_mm.sys.mem.flags[head] &= ~np.uint32(PG_dirty)

