"""Page faults: ``handle_mm_fault()`` and the handlers it dispatches to.

Models the fault half of ``mm/memory.c``: ``__handle_mm_fault``, ``handle_pte_fault``,
``do_anonymous_page`` (zero page on read), ``do_fault`` with fault-around,
``do_read_fault``/``do_cow_fault``/``do_shared_fault``, ``finish_fault``,
``do_wp_page`` (reuse or ``wp_page_copy``), ``do_swap_page`` (swap-in, migration-entry
wait, device-private ``migrate_to_ram``, device-exclusive restore, hwpoison, pte
markers) and ``do_numa_page``. THP and hugetlb faults are in :mod:`.huge_memory` and
:mod:`.hugetlb`.

This one ``handle_mm_fault`` serves CPU accesses (:mod:`.cpu`) and ``hmm_range_fault``.
Its batched equivalent over a range, which has no kernel counterpart, is
:func:`hmmsim.kernel.fault_range.handle_mm_fault_range`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from . import huge_memory as hm
from .folio import folio_put
from .huge_memory_device import do_huge_pmd_device_private
from .hugetlb import hugetlb_fault
from .migrate import (
    is_pmd_migration_entry,
    migration_entry_wait,
    pmd_migration_entry_wait,
)
from .mm import MM_ANONPAGES, MM_SWAPENTS, PtRef, mmap_assert_locked, set_pte_at
from .mm_types import (  # noqa: F401  (re-exported: fault.py is where drivers look)
    FAULT_FLAG_INSTRUCTION,
    FAULT_FLAG_REMOTE,
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_USER,
    FAULT_FLAG_WRITE,
    VM_FAULT_COMPLETED,
    VM_FAULT_ERROR,
    VM_FAULT_FALLBACK,
    VM_FAULT_HWPOISON,
    VM_FAULT_HWPOISON_LARGE,
    VM_FAULT_LOCKED,
    VM_FAULT_NOPAGE,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
    VmFault,
    mm_counter_file,
)
from .mmu_notifier import MmuNotifierEvent, notify_range
from .page_types import PAGE_SIZE, pud_index
from .pgtable import (
    _PAGE_SOFT_DIRTY,
    _PAGE_SWP_EXCLUSIVE,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    _PAGE_UFFD_WP,
    PTE_MARKER_GUARD,
    PTE_MARKER_POISONED,
    PTE_MARKER_UFFD_WP,
    is_device_exclusive_entry,
    is_device_private_entry,
    is_writable_device_exclusive_entry,
    is_hwpoison_entry,
    is_migration_entry,
    is_pmd_device_private_entry,
    is_pte_marker_entry,
    non_swap_entry,
    pfn_pte,
    pmd_leaf,
    pte_dirty,
    pte_marker_get,
    pte_mkdirty,
    pte_mkold,
    pte_mkspecial,
    pte_mkwrite,
    pte_mkyoung,
    pte_modify,
    pte_pfn,
    pte_present,
    pte_protnone,
    pte_special,
    pte_to_swp_entry,
    pte_write,
    swp_offset,
    swp_offset_pfn,
)
from .physmem import PG_anon, PG_anon_exclusive, PG_dirty, PG_swapcache
from .rmap import (
    anon_vma_prepare,
    folio_add_file_rmap_ptes,
    folio_add_new_anon_rmap,
    folio_maybe_mapped_shared,
    folio_remove_rmap_ptes,
)
from .swap import free_swap_and_cache
from .trace import tracepoint_mm_fault
from .userfaultfd_k import handle_userfault, userfaultfd_missing
from .vma import (
    VM_HUGETLB,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_MIXEDMAP,
    VM_PFNMAP,
    VM_SHARED,
    VM_UFFD_MISSING,
    VM_WRITE,
    Vma,
    is_cow_mapping,
    pte_needs_soft_dirty_wp,
    vma_is_accessible,
    vma_is_anonymous,
)

if TYPE_CHECKING:
    pass

__all__ = (
    "FAULT_FLAG_INSTRUCTION", "FAULT_FLAG_REMOTE", "FAULT_FLAG_UNSHARE", "FAULT_FLAG_USER",
    "FAULT_FLAG_WRITE", "VM_FAULT_COMPLETED", "VM_FAULT_ERROR", "VM_FAULT_FALLBACK",
    "VM_FAULT_HWPOISON", "VM_FAULT_LOCKED", "VM_FAULT_NOPAGE", "VM_FAULT_OOM",
    "VM_FAULT_RETRY", "VM_FAULT_SIGBUS", "VM_FAULT_SIGSEGV", "VmFault", "do_wp_page",
    "finish_fault", "handle_mm_fault", "mm_counter_file",
    "set_pte_range", "vm_normal_page",
)

#: fault_around_bytes / PAGE_SIZE (the default 64 KiB)
FAULT_AROUND_PAGES = 16
_U = np.uint64


def vm_normal_page(vma: Vma, addr: int, pte: int) -> int:
    """``vm_normal_page()``: the page behind a present pte, or -1 for special mappings
    (the zero page, raw pfns of VM_PFNMAP/VM_MIXEDMAP, devmap)."""
    if pte_special(pte):
        return -1
    pfn = pte_pfn(pte)
    if pfn >= vma.vm_mm.sys.mem.max_pfn:
        return -1
    return pfn


# -- entry point --------------------------------------------------------------------------
@tracepoint_mm_fault
def handle_mm_fault(vma: Vma, address: int, flags: int) -> int:
    """Resolve a fault at *address* in *vma*.

    Models ``mm/memory.c:handle_mm_fault()``; the caller holds mmap_lock (read).

    :param vma: ``struct vm_area_struct *``
    :param address: ``unsigned long``
    :param flags: ``unsigned int``, ``FAULT_FLAG_*``
    :return: ``vm_fault_t``: 0, or ``VM_FAULT_*`` bits (``VM_FAULT_ERROR`` bits on failure)
    """
    mm = vma.vm_mm
    sys = mm.sys
    mmap_assert_locked(mm)
    sys.ls.assert_no_pt_locks("handle_mm_fault")
    sys.ls.might_sleep("handle_mm_fault")
    sys.stats.add("fault.handle_mm_fault")
    if flags & FAULT_FLAG_UNSHARE:
        if flags & FAULT_FLAG_WRITE:
            return VM_FAULT_SIGSEGV
        if not is_cow_mapping(vma.vm_flags):
            flags &= ~FAULT_FLAG_UNSHARE
    elif flags & FAULT_FLAG_WRITE:
        if not vma.vm_flags & VM_MAYWRITE:
            return VM_FAULT_SIGSEGV
        if not vma.vm_flags & VM_WRITE and not is_cow_mapping(vma.vm_flags):
            return VM_FAULT_SIGSEGV
    if vma.vm_flags & VM_HUGETLB:
        return hugetlb_fault(mm, vma, address, flags)
    return __handle_mm_fault(vma, address, flags)


def __handle_mm_fault(vma: Vma, address: int, flags: int) -> int:
    mm = vma.vm_mm
    vmf = VmFault(vma, address, flags)
    pud = mm.pud_table(address, alloc=True)
    pud_tbl = mm.sys.pt.table(pud)
    pud_idx = pud_index(address)
    e = int(pud_tbl[pud_idx])
    if e == 0 and hm.thp_vma_allowable_order(vma, 18, address):
        ret = hm.create_huge_pud(vmf, PtRef(pud_tbl, pud_idx, pud, mm))
        if not ret & VM_FAULT_FALLBACK:
            return ret
    elif e and pmd_leaf(e):
        return hm.huge_pud_fault(vmf, PtRef(pud_tbl, pud_idx, pud, mm), e)
    pmd = mm.pmd_ref(address, alloc=True)
    assert pmd is not None
    vmf.pmd = pmd
    e = pmd.get()
    if e == 0 and hm.thp_vma_allowable_order(vma, 9, address):
        if vma_is_anonymous(vma) and userfaultfd_missing(vma):
            # do_huge_pmd_anonymous_page(): a missing huge page goes to the userfaultfd
            return handle_userfault(vmf, VM_UFFD_MISSING)
        ret = hm.create_huge_pmd(vmf)
        if not ret & VM_FAULT_FALLBACK:
            return ret
    elif e:
        vmf.orig_pmd = e
        if not pte_present(e):
            if is_pmd_device_private_entry(e):  # only 7.3 (device_private_thp) makes them
                return do_huge_pmd_device_private(vmf)
            if is_pmd_migration_entry(e):
                pmd_migration_entry_wait(mm, pmd)
            return 0
        if pmd_leaf(e):
            if pte_protnone(e) and vma_is_accessible(vma):
                return hm.do_huge_pmd_numa_page(vmf)
            if flags & (FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE) and not pte_write(e):
                ret = hm.do_huge_pmd_wp_page(vmf)
                if not ret & VM_FAULT_FALLBACK:
                    return ret
            else:
                hm.huge_pmd_set_accessed(vmf)
                return 0
    return handle_pte_fault(vmf)


def handle_pte_fault(vmf: VmFault) -> int:
    """``handle_pte_fault()``."""
    vma = vmf.vma
    mm = vma.vm_mm
    assert vmf.pmd is not None
    # pte_offset_map_nolock(): a lockless look at the entry, re-checked under the PTL
    mapped = mm.pte_offset_map(vmf.pmd)
    pte = int(mapped[0][vmf.pte_idx]) if mapped is not None else 0
    if pte == 0:
        if vma_is_anonymous(vma):
            return do_anonymous_page(vmf)
        return do_fault(vmf)
    vmf.orig_pte = pte
    if not pte_present(pte):
        return do_swap_page(vmf)
    if pte_protnone(pte) and vma_is_accessible(vma):
        return do_numa_page(vmf)
    got = mm.pte_offset_map_lock(vmf.pmd)
    assert got is not None
    tbl, tid = got
    idx = vmf.pte_idx
    if int(tbl[idx]) != pte:
        mm.pte_unmap_unlock(tid)
        return 0
    if vmf.flags & (FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE):
        if not pte_write(pte):
            return do_wp_page(vmf, tbl, tid)
        if vmf.flags & FAULT_FLAG_WRITE:
            pte = pte_mkdirty(pte)
    set_pte_at(vmf.vma.vm_mm, tbl, idx, pte_mkyoung(pte))
    mm.pte_unmap_unlock(tid)
    mm.sys.stats.add("fault.spurious")
    return 0


# -- anonymous memory ------------------------------------------------------------------------
def do_anonymous_page(vmf: VmFault) -> int:
    """``do_anonymous_page()``: map the zero page on a read, a new zeroed page on a write."""
    vma = vmf.vma
    mm = vma.vm_mm
    sys = mm.sys
    sys.stats.add("fault.do_anonymous_page")
    if vma.vm_flags & VM_SHARED:
        return VM_FAULT_SIGBUS
    assert vmf.pmd is not None
    if not vmf.flags & FAULT_FLAG_WRITE:
        entry = pte_mkspecial(pfn_pte(sys.mem.zero_pfn, vma.vm_page_prot))
        got = mm.pte_offset_map_lock(vmf.pmd, alloc=True)
        if got is None:
            return VM_FAULT_OOM
        tbl, tid = got
        if tbl[vmf.pte_idx] == 0:
            if userfaultfd_missing(vma):
                mm.pte_unmap_unlock(tid)
                return handle_userfault(vmf, VM_UFFD_MISSING)
            set_pte_at(vmf.vma.vm_mm, tbl, vmf.pte_idx, entry)
        mm.pte_unmap_unlock(tid)
        return 0
    anon_vma_prepare(vma)
    pfn = sys.mem.alloc_page()
    if pfn < 0:
        return VM_FAULT_OOM
    entry = pte_mkyoung(pfn_pte(pfn, vma.vm_page_prot))
    if vma.vm_flags & VM_WRITE:
        entry = pte_mkwrite(pte_mkdirty(entry))
    got = mm.pte_offset_map_lock(vmf.pmd, alloc=True)
    if got is None:
        sys.mem.free_pages([pfn])
        return VM_FAULT_OOM
    tbl, tid = got
    if tbl[vmf.pte_idx] != 0:
        mm.pte_unmap_unlock(tid)
        sys.mem.free_pages([pfn])
        return 0
    if userfaultfd_missing(vma):
        # deliver the fault to user space, checked under the pte lock
        mm.pte_unmap_unlock(tid)
        sys.mem.free_pages([pfn])
        return handle_userfault(vmf, VM_UFFD_MISSING)
    mm.add_mm_counter(MM_ANONPAGES, 1)
    folio_add_new_anon_rmap(sys.mem, pfn, vma, vmf.address)
    set_pte_at(vmf.vma.vm_mm, tbl, vmf.pte_idx, entry)
    mm.pte_unmap_unlock(tid)
    return 0


# -- file-backed memory ----------------------------------------------------------------------
def set_pte_range(vmf: VmFault, pfn: int, tbl: npt.NDArray[np.uint64], idx: int, addr: int,
                  write: bool, prefault: bool = False) -> None:
    """``set_pte_range()`` for one page (pte lock held): map *pfn* at *addr*, as a new
    exclusive anon page for a private write fault, else as a file page. The caller has
    taken the mapping's page reference."""
    vma = vmf.vma
    mm = vma.vm_mm
    sys = mm.sys
    entry = pfn_pte(pfn, vma.vm_page_prot)
    entry = pte_mkyoung(entry)
    if write:
        entry = pte_mkdirty(entry)
        if vma.vm_flags & VM_WRITE:
            entry = pte_mkwrite(entry)
    elif pte_write(entry) and sys.mem.flags[sys.mem.compound_head(pfn)] & PG_dirty:
        entry = pte_mkdirty(entry)
    if write and not vma.vm_flags & VM_SHARED:
        mm.add_mm_counter(MM_ANONPAGES, 1)
        folio_add_new_anon_rmap(sys.mem, pfn, vma, addr)
    else:
        mm.add_mm_counter(mm_counter_file(sys, pfn), 1)
        folio_add_file_rmap_ptes(sys.mem, pfn)
    set_pte_at(vmf.vma.vm_mm, tbl, idx, entry)


def finish_fault(vmf: VmFault) -> int:
    """``finish_fault()``: map ``vmf.cow_page`` (private write) or ``vmf.page``."""
    vma = vmf.vma
    mm = vma.vm_mm
    write = bool(vmf.flags & FAULT_FLAG_WRITE)
    pfn = vmf.cow_page if write and not vma.vm_flags & VM_SHARED else vmf.page
    assert vmf.pmd is not None
    got = mm.pte_offset_map_lock(vmf.pmd, alloc=True)
    if got is None:
        return VM_FAULT_OOM
    tbl, tid = got
    try:
        if tbl[vmf.pte_idx] != 0:
            return VM_FAULT_NOPAGE
        set_pte_range(vmf, pfn, tbl, vmf.pte_idx, vmf.address, write)
        return 0
    finally:
        mm.pte_unmap_unlock(tid)


def _do_fault_around(vmf: VmFault) -> int:
    """``do_fault_around()``: map cached pages of the 16-page window around the fault."""
    vma = vmf.vma
    nr = FAULT_AROUND_PAGES
    pte_off = vmf.pte_idx
    vma_off = vmf.pgoff - vma.vm_pgoff
    from_pte = max(pte_off - pte_off % nr, pte_off - min(pte_off, vma_off))
    to_pte = min(from_pte + nr, 512, pte_off + vma.pages() - vma_off) - 1
    assert vma.vm_ops is not None and vma.vm_ops.map_pages is not None
    return int(vma.vm_ops.map_pages(vmf, vmf.pgoff + from_pte - pte_off, vmf.pgoff + to_pte - pte_off))


def _do_fault_page(vmf: VmFault) -> int:
    """``__do_fault()``: ask the mapping for the page (``vm_ops->fault``)."""
    vma = vmf.vma
    assert vma.vm_ops is not None and vma.vm_ops.fault is not None
    return int(vma.vm_ops.fault(vmf))


def do_read_fault(vmf: VmFault) -> int:
    vma = vmf.vma
    sys = vma.vm_mm.sys
    sys.stats.add("fault.do_read_fault")
    if vma.vm_ops is not None and vma.vm_ops.map_pages is not None and FAULT_AROUND_PAGES > 1:
        ret = _do_fault_around(vmf)
        if ret:
            return ret
    ret = _do_fault_page(vmf)
    if ret & (VM_FAULT_ERROR | VM_FAULT_NOPAGE | VM_FAULT_RETRY):
        return ret
    ret2 = finish_fault(vmf)
    if ret2:
        folio_put(sys, vmf.page)
    return ret2


def do_cow_fault(vmf: VmFault) -> int:
    vma = vmf.vma
    sys = vma.vm_mm.sys
    sys.stats.add("fault.do_cow_fault")
    anon_vma_prepare(vma)
    cow = sys.mem.alloc_page()
    if cow < 0:
        return VM_FAULT_OOM
    vmf.cow_page = cow
    ret = _do_fault_page(vmf)
    if ret & (VM_FAULT_ERROR | VM_FAULT_NOPAGE | VM_FAULT_RETRY):
        sys.mem.free_pages([cow])
        return ret
    sys.mem.copy_pages(cow, vmf.page)
    ret = finish_fault(vmf)
    folio_put(sys, vmf.page)
    if ret:
        sys.mem.free_pages([cow])
    return ret


def do_shared_fault(vmf: VmFault) -> int:
    vma = vmf.vma
    sys = vma.vm_mm.sys
    sys.stats.add("fault.do_shared_fault")
    ret = _do_fault_page(vmf)
    if ret & (VM_FAULT_ERROR | VM_FAULT_NOPAGE | VM_FAULT_RETRY):
        return ret
    ret = finish_fault(vmf)
    if ret:
        folio_put(sys, vmf.page)
    else:
        sys.mem.flags[sys.mem.compound_head(vmf.page)] |= PG_dirty
    return ret


def do_fault(vmf: VmFault) -> int:
    """``do_fault()``: a pte_none fault in a non-anonymous VMA."""
    vma = vmf.vma
    mm = vma.vm_mm
    if vma.vm_ops is None or vma.vm_ops.fault is None:
        # the VMA was fully populated at mmap time (e.g. vm_insert_page) and lost a pte
        mm.sys.stats.add("fault.do_fault_nofault")
        return VM_FAULT_SIGBUS
    if not vmf.flags & FAULT_FLAG_WRITE:
        return do_read_fault(vmf)
    if not vma.vm_flags & VM_SHARED:
        return do_cow_fault(vmf)
    return do_shared_fault(vmf)


# -- write protection ------------------------------------------------------------------------
def _wp_page_reuse(vmf: VmFault, tbl: npt.NDArray[np.uint64], tid: int) -> int:
    """``wp_page_reuse()``: make the pte writable in place (no notifier)."""
    vma = vmf.vma
    entry = pte_mkyoung(vmf.orig_pte)
    entry = pte_mkdirty(entry)
    if vma.vm_flags & VM_WRITE:
        entry = pte_mkwrite(entry)
    set_pte_at(vmf.vma.vm_mm, tbl, vmf.pte_idx, entry)
    vma.vm_mm.pte_unmap_unlock(tid)
    vma.vm_mm.sys.stats.add("fault.wp_page_reuse")
    return 0


def _wp_can_reuse_anon_folio(vma: Vma, pfn: int) -> bool:
    """``wp_can_reuse_anon_folio()``: a small folio with no other reference; a large
    (PTE-mapped) folio only on kernels with ``wp_reuse_large_anon_folio`` (7.3's
    ``__wp_can_reuse_large_anon_folio``): more than one mapping, every reference a mapping
    (``folio_large_mapcount() == folio_ref_count()``) and every mapping in this mm."""
    sys = vma.vm_mm.sys
    mem = sys.mem
    head = mem.compound_head(pfn)
    if mem.order[head]:
        if not sys.profile.wp_reuse_large_anon_folio:
            return False
        mapcount = mem.folio_mapcount(head)
        if mapcount <= 1 or mapcount != int(mem.refcount[head]):
            return False
        return not folio_maybe_mapped_shared(vma.vm_mm, head)
    swapcache = 1 if mem.flags[head] & PG_swapcache else 0
    if int(mem.refcount[head]) > 1 + swapcache:
        return False
    return True


def do_wp_page(vmf: VmFault, tbl: npt.NDArray[np.uint64], tid: int) -> int:
    """``do_wp_page()``: a write to a present read-only pte (pte lock held on entry).

    Shared mappings are made writable; an anonymous page this process owns exclusively
    is reused; anything else (zero page, file page of a private mapping, shared anon
    page) is copied by :func:`wp_page_copy`."""
    vma = vmf.vma
    mm = vma.vm_mm
    sys = mm.sys
    sys.stats.add("fault.do_wp_page")
    pfn = vm_normal_page(vma, vmf.address, vmf.orig_pte)
    if vma.vm_flags & (VM_SHARED | VM_MAYSHARE):
        if pfn < 0 and not vma.vm_flags & (VM_PFNMAP | VM_MIXEDMAP):
            mm.pte_unmap_unlock(tid)
            return VM_FAULT_SIGBUS
        if pfn >= 0:
            sys.mem.flags[sys.mem.compound_head(pfn)] |= PG_dirty
        return _wp_page_reuse(vmf, tbl, tid)
    mem = sys.mem
    if pfn >= 0 and mem.flags[mem.compound_head(pfn)] & PG_anon and (
            mem.flags[pfn] & PG_anon_exclusive or _wp_can_reuse_anon_folio(vma, pfn)):
        mem.flags[pfn] |= PG_anon_exclusive
        if vmf.flags & FAULT_FLAG_UNSHARE:
            mm.pte_unmap_unlock(tid)
            return 0
        return _wp_page_reuse(vmf, tbl, tid)
    if pfn >= 0:
        mem.refcount[mem.compound_head(pfn)] += 1
    mm.pte_unmap_unlock(tid)
    return wp_page_copy(vmf, pfn)


def wp_page_copy(vmf: VmFault, old: int) -> int:
    """``wp_page_copy()``: replace the pte's page (or the zero page, *old* = -1) by a
    private copy, under an ``MMU_NOTIFY_CLEAR`` invalidation of that page."""
    vma = vmf.vma
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    sys.stats.add("fault.wp_page_copy")
    anon_vma_prepare(vma)
    new = mem.alloc_page()
    if new < 0:
        if old >= 0:
            folio_put(sys, old)
        return VM_FAULT_OOM
    if old >= 0:
        mem.copy_pages(new, old)
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mm, vmf.address, vmf.address + PAGE_SIZE):
        assert vmf.pmd is not None
        got = mm.pte_offset_map_lock(vmf.pmd)
        copied = False
        if got is not None:
            tbl, tid = got
            if int(tbl[vmf.pte_idx]) == vmf.orig_pte:
                if old >= 0:
                    if not mem.flags[mem.compound_head(old)] & PG_anon:
                        mm.add_mm_counter(mm_counter_file(sys, old), -1)
                        mm.add_mm_counter(MM_ANONPAGES, 1)
                else:
                    mm.add_mm_counter(MM_ANONPAGES, 1)
                entry = pte_mkyoung(pfn_pte(new, vma.vm_page_prot))
                if vmf.flags & FAULT_FLAG_UNSHARE:
                    pass
                else:
                    entry = pte_mkdirty(entry)
                    if vma.vm_flags & VM_WRITE:
                        entry = pte_mkwrite(entry)
                folio_add_new_anon_rmap(mem, new, vma, vmf.address)
                set_pte_at(vmf.vma.vm_mm, tbl, vmf.pte_idx, entry)
                if old >= 0:
                    folio_remove_rmap_ptes(mem, old)
                copied = True
            mm.pte_unmap_unlock(tid)
    if copied:
        if old >= 0:
            folio_put(sys, old)  # the mapping's reference
    else:
        mem.free_pages([new])
    if old >= 0:
        folio_put(sys, old)  # do_wp_page's reference
    return 0


# -- non-present entries ---------------------------------------------------------------------
def do_swap_page(vmf: VmFault) -> int:
    """``do_swap_page()``: a fault on a swap-format pte."""
    vma = vmf.vma
    mm = vma.vm_mm
    sys = mm.sys
    entry = pte_to_swp_entry(vmf.orig_pte)
    sys.stats.add("fault.do_swap_page")
    assert vmf.pmd is not None
    if non_swap_entry(entry):
        if is_migration_entry(entry):
            migration_entry_wait(mm, vmf.pmd, vmf.address)
            return 0
        if is_device_exclusive_entry(entry):
            vmf.page = swp_offset_pfn(entry)
            return remove_device_exclusive_entry(vmf)
        if is_device_private_entry(entry):
            pfn = swp_offset_pfn(entry)
            got = mm.pte_offset_map_lock(vmf.pmd)
            if got is None:
                return 0
            tbl, tid = got
            if int(tbl[vmf.pte_idx]) != vmf.orig_pte:
                mm.pte_unmap_unlock(tid)
                return 0
            vmf.page = pfn
            head = sys.mem.compound_head(pfn)
            sys.mem.refcount[head] += 1
            mm.pte_unmap_unlock(tid)
            pgmap = sys.pgmap_of(pfn)
            assert pgmap is not None and pgmap.ops.migrate_to_ram is not None
            sys.stats.add("fault.migrate_to_ram")
            try:
                return int(pgmap.ops.migrate_to_ram(vmf))
            finally:
                folio_put(sys, head)
        if is_hwpoison_entry(entry):
            return VM_FAULT_HWPOISON
        if is_pte_marker_entry(entry):
            return _handle_pte_marker(vmf, entry)
        return VM_FAULT_SIGBUS
    return do_swap_in(vmf, entry)


def restore_exclusive_pte(vma: Vma, page: int, address: int, tbl: npt.NDArray[np.uint64], idx: int,
                          orig_pte: int) -> None:
    """``restore_exclusive_pte()``: turn the device-exclusive entry *orig_pte* at *address*
    (pte table *tbl*, locked, the folio locked too) back into a present pte of *page*,
    old, with its soft-dirty and uffd-wp bits.

    6.12: the page gets its rmap back (the entry had dropped it, keeping the reference);
    the pte is writable and dirty if the entry was writable (and the VMA allows writes).
    7.3 (``device_exclusive_mapped``): the page never left rmap; the pte is writable
    where ``can_change_pte_writable()`` allows it, dirty if the folio is."""
    from .mprotect import _try_writable_mask
    from .rmap import folio_add_file_rmap_ptes
    mm = vma.vm_mm
    mem = mm.sys.mem
    head = mem.compound_head(page)
    pte = pte_mkold(pfn_pte(page, vma.vm_page_prot))
    if orig_pte & _PAGE_SWP_SOFT_DIRTY:
        pte |= _PAGE_SOFT_DIRTY
    if orig_pte & _PAGE_SWP_UFFD_WP:
        pte |= _PAGE_UFFD_WP
    if mm.sys.profile.device_exclusive_mapped:
        if vma.vm_flags & VM_WRITE:
            one = np.array([pte], np.uint64)
            if _try_writable_mask(vma, one, one, np.array([True]))[0]:
                if mem.flags[head] & PG_dirty:
                    pte = pte_mkdirty(pte)
                pte = pte_mkwrite(pte)
    else:
        if not orig_pte & _PAGE_SWP_UFFD_WP and is_writable_device_exclusive_entry(pte_to_swp_entry(orig_pte)):
            pte = pte_mkdirty(pte)
            if vma.vm_flags & VM_WRITE:  # maybe_mkwrite()
                pte = pte_mkwrite(pte)
        # folio_add_anon_rmap_pte(RMAP_NONE): the mapping comes back; the reference stayed
        folio_add_file_rmap_ptes(mem, page)
    set_pte_at(mm, tbl, idx, pte)


def remove_device_exclusive_entry(vmf: VmFault) -> int:
    """``remove_device_exclusive_entry()``: a CPU fault on a device-exclusive entry takes a
    reference and the folio lock, invalidates secondary MMUs over the page
    (MMU_NOTIFY_EXCLUSIVE in 6.12, MMU_NOTIFY_CLEAR in 7.3, owner NULL: every device's
    mirror lets go) and restores the pte if it has not changed. Returns 0 (the access is
    retried)."""
    from .pagemap import folio_lock, folio_unlock
    vma = vmf.vma
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    page = vmf.page
    head = mem.compound_head(page)
    if mem.refcount[head] <= 0:  # folio_try_get(): the entry is already gone
        return 0
    mem.refcount[head] += 1
    sys.extra_refs[head] = sys.extra_refs.get(head, 0) + 1
    folio_lock(sys, head)
    event = (MmuNotifierEvent.MMU_NOTIFY_CLEAR if sys.profile.device_exclusive_mapped
             else MmuNotifierEvent.MMU_NOTIFY_EXCLUSIVE)
    start = vmf.address & ~(PAGE_SIZE - 1)
    with notify_range(event, mm, start, start + PAGE_SIZE):
        assert vmf.pmd is not None
        got = mm.pte_offset_map_lock(vmf.pmd)
        if got is not None:
            tbl, tid = got
            if int(tbl[vmf.pte_idx]) == vmf.orig_pte:
                restore_exclusive_pte(vma, page, vmf.address, tbl, vmf.pte_idx, vmf.orig_pte)
                sys.stats.add("fault.remove_device_exclusive_entry")
            mm.pte_unmap_unlock(tid)
        folio_unlock(sys, head)
        k = sys.extra_refs[head] - 1
        if k:
            sys.extra_refs[head] = k
        else:
            del sys.extra_refs[head]
        folio_put(sys, head)
    return 0


def do_swap_in(vmf: VmFault, entry: int) -> int:
    """The swap-in half of ``do_swap_page()``: read the slot into a new page and map it;
    writable at once if the entry was exclusive (or the slot is not shared) and the VMA
    allows writes."""
    vma = vmf.vma
    mm = vma.vm_mm
    sys = mm.sys
    si = sys.swap
    if si is None:
        return VM_FAULT_SIGBUS
    slot = swp_offset(entry)
    pfn = sys.mem.alloc_page()
    if pfn < 0:
        return VM_FAULT_OOM
    sys.mem.data[pfn] = si.data[slot]
    sys.mem.mark_written(pfn)
    assert vmf.pmd is not None
    got = mm.pte_offset_map_lock(vmf.pmd)
    assert got is not None
    tbl, tid = got
    idx = vmf.pte_idx
    if int(tbl[idx]) != vmf.orig_pte:
        mm.pte_unmap_unlock(tid)
        sys.mem.free_pages([pfn])
        return 0
    exclusive = bool(vmf.orig_pte & _PAGE_SWP_EXCLUSIVE) or int(si.swap_map[slot]) == 1
    pte = pte_mkyoung(pfn_pte(pfn, vma.vm_page_prot))
    if vmf.orig_pte & _PAGE_SWP_SOFT_DIRTY:
        pte |= _PAGE_SOFT_DIRTY
    if vmf.orig_pte & _PAGE_SWP_UFFD_WP:
        pte |= _PAGE_UFFD_WP
    anon_vma_prepare(vma)
    folio_add_new_anon_rmap(sys.mem, pfn, vma, vmf.address)
    if not exclusive:
        sys.mem.flags[pfn] &= ~np.uint32(PG_anon_exclusive)
    write_done = False
    if exclusive and vma.vm_flags & VM_WRITE and not pte_needs_soft_dirty_wp(vma, pte):
        pte = pte_mkwrite(pte)
        if vmf.flags & FAULT_FLAG_WRITE:
            pte = pte_mkdirty(pte)
            write_done = True
    set_pte_at(vmf.vma.vm_mm, tbl, idx, pte)
    mm.add_mm_counter(MM_ANONPAGES, 1)
    mm.add_mm_counter(MM_SWAPENTS, -1)
    free_swap_and_cache(sys, entry)
    sys.stats.add("swap.swapin")
    if vmf.flags & FAULT_FLAG_WRITE and not write_done:
        vmf.orig_pte = pte
        return do_wp_page(vmf, tbl, tid)
    mm.pte_unmap_unlock(tid)
    return 0


def _handle_pte_marker(vmf: VmFault, entry: int) -> int:
    """``handle_pte_marker()``."""
    marker = pte_marker_get(entry)
    if not marker:
        return VM_FAULT_SIGBUS
    if marker & PTE_MARKER_POISONED:
        return VM_FAULT_HWPOISON
    if marker & PTE_MARKER_GUARD:
        return VM_FAULT_SIGSEGV
    if marker & PTE_MARKER_UFFD_WP:
        # without userfaultfd the marker is just dropped and the fault handled as none
        mm = vmf.vma.vm_mm
        assert vmf.pmd is not None
        got = mm.pte_offset_map_lock(vmf.pmd)
        if got is not None:
            tbl, tid = got
            if int(tbl[vmf.pte_idx]) == vmf.orig_pte:
                set_pte_at(vmf.vma.vm_mm, tbl, vmf.pte_idx, 0)
            mm.pte_unmap_unlock(tid)
        if vma_is_anonymous(vmf.vma):
            return do_anonymous_page(vmf)
        return do_fault(vmf)
    return VM_FAULT_SIGBUS


def do_numa_page(vmf: VmFault) -> int:
    """``do_numa_page()``: a NUMA-hinting (protnone) fault; the page stays where it is and
    the pte gets the VMA's protection back (writable again if it may be)."""
    vma = vmf.vma
    mm = vma.vm_mm
    sys = mm.sys
    sys.stats.add("fault.do_numa_page")
    assert vmf.pmd is not None
    got = mm.pte_offset_map_lock(vmf.pmd)
    assert got is not None
    tbl, tid = got
    if int(tbl[vmf.pte_idx]) != vmf.orig_pte:
        mm.pte_unmap_unlock(tid)
        return 0
    pte = pte_mkyoung(pte_modify(vmf.orig_pte, vma.vm_page_prot))
    if vma.vm_flags & VM_WRITE and not pte_write(pte) and not pte_needs_soft_dirty_wp(vma, pte):
        pfn = vm_normal_page(vma, vmf.address, pte)
        if vma.vm_flags & VM_SHARED:
            pte = pte_mkwrite(pte) if pte_dirty(pte) else pte
        elif pfn >= 0 and sys.mem.flags[pfn] & PG_anon_exclusive:
            pte = pte_mkwrite(pte)
    set_pte_at(vmf.vma.vm_mm, tbl, vmf.pte_idx, pte)
    mm.pte_unmap_unlock(tid)
    return 0


# -- batched faulting ---------------------------------------------------------------------------
