"""hugetlb: a boot-time pool of 2 MiB pages, ``MAP_HUGETLB`` mappings and their faults.

Models the parts of ``mm/hugetlb.c`` and ``fs/hugetlbfs`` HMM meets: the pool
(``nr_hugepages``/``free_hugepages``/``resv_hugepages``), reservations taken at mmap time
(a private mapping reserves one page per huge page it spans; mmap fails with ``-ENOMEM``
if the pool cannot cover it), ``hugetlb_fault`` / ``hugetlb_no_page`` / ``hugetlb_wp``,
unmapping, fork (``copy_hugetlb_page_range``), mprotect
(``hugetlb_change_protection``) and the 2 MiB split rule for VMAs.

Huge ptes live at the pmd level with ``_PAGE_PSE``, like x86. hugetlb pages are not
counted in rss but in ``mm.hugetlb_usage``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errno import EINVAL, ENOMEM
from .folio import folio_put
from .fs import FMODE_READ, FMODE_WRITE, File, FileOperations, Inode, SuperOperations
from .locking import READ
from .migrate import pmd_migration_entry_wait
from .mm_types import (
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    VM_FAULT_HWPOISON_LARGE,
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
)
from .pgtable import (
    _PAGE_DIRTY,
    _PAGE_PSE,
    _PAGE_UFFD_WP,
    is_hwpoison_entry,
    is_migration_entry,
    is_writable_migration_entry,
    make_readable_migration_entry,
    pfn_pte,
    pte_mkdirty,
    pte_mkold,
    pte_mkwrite,
    pte_mkyoung,
    pte_modify,
    pte_pfn,
    pte_present,
    pte_to_swp_entry,
    pte_write,
    pte_wrprotect,
    swp_entry_to_pte,
    swp_offset_pfn,
)
from .physmem import (
    PG_anon,
    PG_anon_exclusive,
    PG_data,
    PG_dirty,
    PG_head,
    PG_hugetlb,
    PG_swapbacked,
)
from .rmap import anon_vma_prepare
from .userfaultfd_k import handle_userfault, userfaultfd_missing
from .vma import (
    VM_DONTEXPAND,
    VM_HUGETLB,
    VM_MAYSHARE,
    VM_NORESERVE,
    VM_SHARED,
    VM_UFFD_MISSING,
    VM_WRITE,
    Vma,
    VmOps,
    is_cow_mapping,
)

if TYPE_CHECKING:
    from .mm import MM
    from .system import System

__all__ = (
    "HugetlbPool", "ResvMap", "copy_hugetlb_page_range", "hugetlb_change_protection",
    "hugetlb_fault", "hugetlb_file_setup", "hugetlb_reserve_pages", "hugetlb_vm_ops",
    "hugetlb_vma_lock_read", "hugetlb_vma_lockptr", "hugetlb_vma_unlock_read", "hugetlbfs_evict_inode", "hugetlbfs_ops", "is_file_hugepages", "unmap_hugepage_range",
)

_U = np.uint64


class HugetlbPool:
    """The default hstate (2 MiB): pages taken from RAM at boot."""

    def __init__(self, sys: "System", nr: int) -> None:
        self.sys = sys
        self.free: list[int] = []
        self.nr_huge_pages = 0
        self.resv_huge_pages = 0
        self.set_max_huge_pages(nr)

    def set_max_huge_pages(self, count: int) -> int:
        """``set_max_huge_pages()`` growing the pool (a write of ``nr_hugepages``): take
        2 MiB blocks from RAM until the pool holds *count* pages or RAM has no free block.
        Shrinking is not modelled. Returns the new ``nr_hugepages``."""
        sys = self.sys
        while self.nr_huge_pages < count:
            head = sys.mem.alloc_folio(HPAGE_PMD_ORDER)
            if head < 0:
                break
            sys.mem.flags[head:head + HPAGE_PMD_NR] |= PG_hugetlb
            sys.mem.refcount[head] = 0
            self.free.append(head)
            self.nr_huge_pages += 1
        self.free.sort(reverse=True)  # pop() hands out the lowest pfn first
        return self.nr_huge_pages

    @property
    def free_huge_pages(self) -> int:
        return len(self.free)

    def available(self) -> int:
        """Free pages not promised to a reservation."""
        return len(self.free) - self.resv_huge_pages

    def free_huge_folio(self, head: int) -> None:
        """``free_huge_folio()``: a hugetlb page with no reference goes back to the pool."""
        sys = self.sys
        mem = sys.mem
        nr = HPAGE_PMD_NR
        mem.flags[head:head + nr] &= np.uint32(PG_hugetlb | PG_data)
        mem.flags[head] |= PG_head
        mem.mapping[head] = 0
        mem.index[head:head + nr] = 0
        mem.mapcount[head:head + nr] = 0
        mem.entire_mapcount[head] = 0
        self.free.append(head)
        self.free.sort(reverse=True)
        sys.stats.add("hugetlb.free")


class ResvMap:
    """``struct resv_map`` of a private mapping: the huge-page indices still reserved."""

    __slots__ = ("indices",)

    def __init__(self, indices: set[int]) -> None:
        self.indices = indices


def hugetlb_reserve_pages(pool: HugetlbPool, first: int, last: int) -> ResvMap | None:
    """``hugetlb_reserve_pages()`` for a private mapping of huge indices
    ``[first, last)``: None if the pool cannot cover it (mmap fails with ``-ENOMEM``)."""
    need = last - first
    if need > pool.available():
        return None
    pool.resv_huge_pages += need
    return ResvMap(set(range(first, last)))


def _unreserve(pool: HugetlbPool, resv: ResvMap, indices: set[int]) -> None:
    gone = resv.indices & indices
    resv.indices -= gone
    pool.resv_huge_pages -= len(gone)


def _alloc_hugetlb_folio(vma: Vma, idx: int) -> int:
    """``alloc_hugetlb_folio()``: consume the VMA's reservation for huge index *idx* if it
    has one, else take an unreserved free page. Returns the head pfn or -1."""
    sys = vma.vm_mm.sys
    pool = sys.hugetlb
    resv = vma.vm_private_data if isinstance(vma.vm_private_data, ResvMap) else None
    if resv is not None and idx in resv.indices:
        resv.indices.discard(idx)
        pool.resv_huge_pages -= 1
    elif pool.available() <= 0:
        return -1
    head = pool.free.pop()
    mem = sys.mem
    mem.refcount[head] = 1
    _clear_huge_page(sys, head)
    sys.stats.add("hugetlb.alloc")
    return head


def _clear_huge_page(sys: "System", head: int) -> None:
    """``folio_zero_user()``: zero the subpages that may hold data."""
    mem = sys.mem
    dirty = np.flatnonzero(mem.flags[head:head + HPAGE_PMD_NR] & PG_data)
    if len(dirty):
        mem.clear_pages(dirty + head)


def _huge_idx(vma: Vma, addr: int) -> int:
    return vma.linear_page_index(addr & PMD_MASK) >> HPAGE_PMD_ORDER


def _make_huge_pte(vma: Vma, head: int, writable: bool) -> int:
    """``make_huge_pte()``."""
    e = pfn_pte(head, vma.vm_page_prot) | _PAGE_PSE
    if writable:
        e = pte_mkwrite(pte_mkdirty(e))
    else:
        e = pte_wrprotect(e)
    return pte_mkyoung(e)


def hugetlb_vma_lockptr(vma: Vma) -> tuple[str, int]:
    """The identity of a hugetlb VMA's lock (``vma_lock->rw_sema``, lock class
    ``hugetlb_vma_lock``)."""
    return ("hugetlb_vma_lock", id(vma))


def hugetlb_vma_lock_read(vma: Vma) -> None:
    """``hugetlb_vma_lock_read()``: keeps shared pmds of *vma* from being unshared."""
    vma.vm_mm.sys.ls.acquire(hugetlb_vma_lockptr(vma), "hugetlb_vma_lock", READ)


def hugetlb_vma_unlock_read(vma: Vma) -> None:
    """``hugetlb_vma_unlock_read()``."""
    vma.vm_mm.sys.ls.release(hugetlb_vma_lockptr(vma), "hugetlb_vma_lock")


def hugetlb_fault(mm: "MM", vma: Vma, address: int, flags: int) -> int:
    """``hugetlb_fault()``: allocate (``hugetlb_no_page``), share-break (``hugetlb_wp``)
    or just mark accessed. No free huge page gives ``VM_FAULT_SIGBUS``."""
    sys = mm.sys
    sys.stats.add("fault.hugetlb_fault")
    hugetlb_vma_lock_read(vma)
    try:
        return _hugetlb_fault(mm, vma, address, flags)
    finally:
        hugetlb_vma_unlock_read(vma)


def _hugetlb_fault(mm: "MM", vma: Vma, address: int, flags: int) -> int:
    haddr = address & PMD_MASK
    pmd = mm.pmd_ref(haddr, alloc=True)
    assert pmd is not None
    e = pmd.get()
    if e == 0:
        return _hugetlb_no_page(vma, haddr, pmd, flags)
    if not pte_present(e):
        ent = pte_to_swp_entry(e)
        if is_migration_entry(ent):
            pmd_migration_entry_wait(mm, pmd)
            return 0
        if is_hwpoison_entry(ent):
            return VM_FAULT_HWPOISON_LARGE
        return 0
    if flags & (FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE) and not pte_write(e):
        return _hugetlb_wp(vma, haddr, pmd, flags)
    if flags & FAULT_FLAG_WRITE:
        e = pte_mkdirty(e)
    pmd.set(pte_mkyoung(e))
    return 0


def _hugetlb_no_page(vma: Vma, haddr: int, pmd: "object", flags: int) -> int:
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    assert vma.vm_file is not None and vma.vm_file.f_inode is not None
    inode = vma.vm_file.f_inode
    idx = _huge_idx(vma, haddr)
    if idx >= (inode.i_size >> (PAGE_SHIFT + HPAGE_PMD_ORDER)):
        return VM_FAULT_SIGBUS
    shared = bool(vma.vm_flags & VM_MAYSHARE)
    cache = inode.i_mapping.pages
    if idx not in cache and userfaultfd_missing(vma):
        # hugetlb_handle_userfault(): drop the vma lock, hand the fault to the userfaultfd
        # (the lock is taken again for hugetlb_fault()'s unlock)
        hugetlb_vma_unlock_read(vma)
        try:
            return handle_userfault(VmFault(vma, haddr, flags), VM_UFFD_MISSING)
        finally:
            hugetlb_vma_lock_read(vma)
    head = cache.get(idx, -1) if shared else -1
    if head < 0:
        if shared and inode.resv > 0:
            inode.resv -= 1
            sys.hugetlb.resv_huge_pages -= 1
            pool = sys.hugetlb
            if not pool.free:
                return VM_FAULT_SIGBUS
            head = pool.free.pop()
            mem.refcount[head] = 1
            _clear_huge_page(sys, head)
        else:
            head = _alloc_hugetlb_folio(vma, idx)
        if head < 0:
            return VM_FAULT_SIGBUS
        if shared:
            cache[idx] = head
            mem.mapping[head] = inode.i_mapping.mapping_id
            mem.index[head] = idx << HPAGE_PMD_ORDER
            mem.refcount[head] += 1  # the mapping's reference; the cache keeps the first
    else:
        mem.refcount[head] += 1
    if shared:
        mem.entire_mapcount[head] += 1
    else:
        anon_vma_prepare(vma)
        av = vma.anon_vma
        assert av is not None
        mem.mapping[head] = av.mapping_id
        mem.index[head:head + HPAGE_PMD_NR] = vma.linear_page_index(haddr) + np.arange(HPAGE_PMD_NR)
        mem.flags[head:head + HPAGE_PMD_NR] |= PG_anon | PG_anon_exclusive | PG_swapbacked
        mem.entire_mapcount[head] = 1
    writable = bool(vma.vm_flags & VM_WRITE and vma.vm_flags & VM_SHARED)
    pmd.set(_make_huge_pte(vma, head, writable))  # type: ignore[attr-defined]
    mm.hugetlb_usage += HPAGE_PMD_NR
    if flags & FAULT_FLAG_WRITE and not vma.vm_flags & VM_SHARED:
        return _hugetlb_wp(vma, haddr, pmd, flags)
    return 0


def _hugetlb_wp(vma: Vma, haddr: int, pmd: "object", flags: int) -> int:
    """``hugetlb_wp()``: reuse an exclusively mapped anon page, else copy it."""
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    e = pmd.get()  # type: ignore[attr-defined]
    head = pte_pfn(e)
    if vma.vm_flags & VM_MAYSHARE:
        pmd.set(pte_mkyoung(pte_mkdirty(pte_mkwrite(e))))  # type: ignore[attr-defined]
        return 0
    if mem.flags[head] & PG_anon and int(mem.entire_mapcount[head]) == 1:
        mem.flags[head] |= PG_anon_exclusive
        if not flags & FAULT_FLAG_UNSHARE:
            pmd.set(pte_mkyoung(pte_mkdirty(pte_mkwrite(e))))  # type: ignore[attr-defined]
        return 0
    new = _alloc_hugetlb_folio(vma, _huge_idx(vma, haddr))
    if new < 0:
        return VM_FAULT_SIGBUS
    mem.copy_pages(np.arange(new, new + HPAGE_PMD_NR), np.arange(head, head + HPAGE_PMD_NR))
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mm, haddr, haddr + HPAGE_PMD_SIZE):
        anon_vma_prepare(vma)
        av = vma.anon_vma
        assert av is not None
        mem.mapping[new] = av.mapping_id
        mem.index[new:new + HPAGE_PMD_NR] = vma.linear_page_index(haddr) + np.arange(HPAGE_PMD_NR)
        mem.flags[new:new + HPAGE_PMD_NR] |= PG_anon | PG_anon_exclusive | PG_swapbacked
        mem.entire_mapcount[new] = 1
        ne = pfn_pte(new, vma.vm_page_prot) | _PAGE_PSE
        pmd.set(pte_mkyoung(pte_mkdirty(pte_mkwrite(ne))))  # type: ignore[attr-defined]
        mem.entire_mapcount[head] -= 1
    folio_put(sys, head)
    sys.stats.add("hugetlb.cow")
    return 0


def unmap_hugepage_range(vma: Vma, start: int, end: int) -> None:
    """``__unmap_hugepage_range()``: clear the huge ptes of ``[start, end)``."""
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    addr = start & PMD_MASK
    puts = []
    while addr < end:
        pmd = mm.pmd_ref(addr)
        if pmd is not None:
            e = pmd.get()
            if e:
                pmd.set(0)
                if pte_present(e):
                    head = pte_pfn(e)
                    mem.entire_mapcount[head] -= 1
                    if e & _PAGE_DIRTY:
                        mem.flags[head] |= PG_dirty
                    mm.hugetlb_usage -= HPAGE_PMD_NR
                    puts.append(head)
                elif is_migration_entry(pte_to_swp_entry(e)):
                    mm.hugetlb_usage -= HPAGE_PMD_NR
        addr += HPAGE_PMD_SIZE
    for h in puts:
        folio_put(sys, h)


def hugetlb_vm_op_split(vma: Vma, addr: int) -> int:
    """``hugetlb_vm_op_split()``: hugetlb VMAs split only at huge page boundaries."""
    return -EINVAL if addr & ~PMD_MASK else 0


def hugetlb_vm_op_close(vma: Vma) -> None:
    """``hugetlb_vm_op_close()``: give back the unused reservations of a private VMA."""
    resv = vma.vm_private_data
    if isinstance(resv, ResvMap):
        first = vma.vm_pgoff >> HPAGE_PMD_ORDER
        last = first + (vma.pages() >> HPAGE_PMD_ORDER)
        _unreserve(vma.vm_mm.sys.hugetlb, resv, set(range(first, last)))


hugetlb_vm_ops = VmOps("hugetlb", may_split=hugetlb_vm_op_split)


def copy_hugetlb_page_range(dst_vma: Vma, src_vma: Vma) -> int:
    """``copy_hugetlb_page_range()``: share private hugetlb pages read-only with the
    child (under ``MMU_NOTIFY_PROTECTION_PAGE``)."""
    src_mm = src_vma.vm_mm
    dst_mm = dst_vma.vm_mm
    mem = src_mm.sys.mem
    cow = is_cow_mapping(src_vma.vm_flags)
    rng = notify_range(MmuNotifierEvent.MMU_NOTIFY_PROTECTION_PAGE, src_mm, src_vma.vm_start, src_vma.vm_end) if cow else None
    if rng is not None:
        rng.__enter__()
    try:
        for addr in range(src_vma.vm_start, src_vma.vm_end, HPAGE_PMD_SIZE):
            spmd = src_mm.pmd_ref(addr)
            if spmd is None or spmd.get() == 0:
                continue
            e = spmd.get()
            dpmd = dst_mm.pmd_ref(addr, alloc=True)
            assert dpmd is not None
            if not pte_present(e):
                ent = pte_to_swp_entry(e)
                if is_writable_migration_entry(ent) and cow:
                    e = swp_entry_to_pte(make_readable_migration_entry(swp_offset_pfn(ent)))
                    spmd.set(e)
                dpmd.set(e)
                dst_mm.hugetlb_usage += HPAGE_PMD_NR
                continue
            head = pte_pfn(e)
            mem.refcount[head] += 1
            mem.entire_mapcount[head] += 1
            if mem.flags[head] & PG_anon:
                mem.flags[head:head + HPAGE_PMD_NR] &= ~np.uint32(PG_anon_exclusive)
            if cow:
                e = pte_wrprotect(e)
                spmd.set(e)
            dpmd.set(pte_mkold(e) & ~_PAGE_UFFD_WP)
            dst_mm.hugetlb_usage += HPAGE_PMD_NR
    finally:
        if rng is not None:
            rng.__exit__(None, None, None)
    return 0


def hugetlb_change_protection(vma: Vma, start: int, end: int, newprot: int) -> int:
    """``hugetlb_change_protection()``: new protection for every huge pte of the range,
    under ``MMU_NOTIFY_PROTECTION_VMA``; writable migration entries become readable.
    Returns the number of base pages changed."""
    mm = vma.vm_mm
    pages = 0
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_PROTECTION_VMA, mm, start, end):
        for addr in range(start & PMD_MASK, end, HPAGE_PMD_SIZE):
            pmd = mm.pmd_ref(addr)
            if pmd is None:
                continue
            e = pmd.get()
            if e == 0:
                continue
            if not pte_present(e):
                ent = pte_to_swp_entry(e)
                if is_writable_migration_entry(ent):
                    pmd.set(swp_entry_to_pte(make_readable_migration_entry(swp_offset_pfn(ent))))
                    pages += HPAGE_PMD_NR
                continue
            pmd.set(pte_modify(e, newprot) | _PAGE_PSE)
            pages += HPAGE_PMD_NR
    return pages


def hugetlb_file_setup(sys: "System", size: int, shared: bool) -> File:
    """``hugetlb_file_setup()``: the internal hugetlbfs file behind ``MAP_HUGETLB``."""
    inode = Inode(sys, hugetlbfs_ops, size, "anon_hugepage")
    inode.huge = HPAGE_PMD_ORDER
    return File(inode, hugetlbfs_file_operations, FMODE_READ | FMODE_WRITE, name="anon_hugepage")


def hugetlbfs_file_mmap(file: File, vma: Vma) -> int:
    """``hugetlbfs_file_mmap()``: reserve the huge pages the mapping may need."""
    sys = vma.vm_mm.sys
    inode = file.f_inode
    assert inode is not None
    vma.vm_flags |= VM_HUGETLB | VM_DONTEXPAND
    vma.vm_ops = hugetlb_vm_ops
    if vma.vm_flags & VM_NORESERVE:
        # hugetlb_reserve_pages(): "Only apply hugepage reservation if asked"; faults
        # then allocate without reserves (and SIGBUS if the pool is empty)
        return 0
    first = vma.vm_pgoff >> HPAGE_PMD_ORDER
    last = first + (vma.pages() >> HPAGE_PMD_ORDER)
    if vma.vm_flags & VM_MAYSHARE:
        need = max(0, last - max(first, 0)) - len([i for i in inode.i_mapping.pages if first <= i < last]) - inode.resv
        if need > sys.hugetlb.available():
            return -ENOMEM
        if need > 0:
            inode.resv += need
            sys.hugetlb.resv_huge_pages += need
        return 0
    resv = hugetlb_reserve_pages(sys.hugetlb, first, last)
    if resv is None:
        return -ENOMEM
    vma.vm_private_data = resv
    return 0


def hugetlbfs_evict_inode(inode: Inode) -> None:
    """Free the hugetlbfs page cache and unused reservations of an evicted inode."""
    sys = inode.sys
    pool = sys.hugetlb
    pool.resv_huge_pages -= inode.resv
    inode.resv = 0
    for idx in list(inode.i_mapping.pages):
        head = inode.i_mapping.pages.pop(idx)
        sys.mem.mapping[head] = 0
        folio_put(sys, head)


hugetlbfs_file_operations = FileOperations("hugetlbfs", mmap=hugetlbfs_file_mmap)


def is_file_hugepages(file: File | None) -> bool:
    """``is_file_hugepages()``: is *file* a hugetlbfs file (``MAP_HUGETLB``'s included)?"""
    return file is not None and file.f_op is hugetlbfs_file_operations


hugetlbfs_ops = SuperOperations("hugetlbfs", evict_inode=hugetlbfs_evict_inode)

