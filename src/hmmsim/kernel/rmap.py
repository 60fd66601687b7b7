"""Reverse mapping: which VMAs map a folio, and the map/ref counting that goes with it.

Models ``mm/rmap.c`` and ``include/linux/rmap.h``: ``anon_vma`` chains, the
``folio_add_*_rmap_*`` / ``folio_remove_rmap_*`` family (batched over numpy arrays of
pfns where the kernel batches over ptes), ``folio_try_dup_anon_rmap_*`` for fork, and
``rmap_walk``, and device-exclusive access: 6.12's ``make_device_exclusive_range`` (GUP,
then ``folio_make_device_exclusive`` over the folio's mappings, which leave rmap) and 7.3's
``make_device_exclusive`` (one pte at a time; the page stays mapped). Anonymous folios point at their ``anon_vma`` through ``page->mapping``
(with ``PG_anon``) and carry their linear page index in ``page->index``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .page_types import HPAGE_PMD_NR, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, pte_index
from .pgtable import (
    _PAGE_PRESENT,
    PTE_PFN_MASK,
    is_device_private_entry,
    is_migration_entry,
    is_swap_pmd,
    pmd_leaf,
    pmd_to_swp_entry,
    pte_pfn,
    pte_present,
    swp_offset_pfn,
)
from .physmem import PG_anon, PG_anon_exclusive, PG_swapbacked, PhysMem

if TYPE_CHECKING:
    from .mm import MM
    from .system import System
    from .vma import Vma

_U = np.uint64

__all__ = (
    "AnonVma", "anon_vma_fork", "anon_vma_prepare", "folio_add_file_rmap_ptes",
    "folio_add_new_anon_rmap", "folio_add_new_anon_rmap_pmd", "folio_add_new_anon_rmap_ptes",
    "folio_dup_file_rmap_ptes", "folio_make_device_exclusive", "folio_maybe_mapped_shared",
    "folio_remove_rmap_pmd", "folio_remove_rmap_ptes",
    "folio_try_dup_anon_rmap_pmd", "folio_try_dup_anon_rmap_ptes", "make_device_exclusive",
    "make_device_exclusive_range", "page_has_device_exclusive_entry", "page_make_device_exclusive_one",
    "page_vma_mapped_pmd", "rmap_walk",
    "unlink_anon_vmas",
)


class AnonVma:
    """``struct anon_vma``: the VMAs (of any process) that may map its pages."""

    __slots__ = ("vmas", "root", "mapping_id", "__weakref__")

    def __init__(self, root: "AnonVma | None" = None) -> None:
        #: the VMAs, in link order (a dict: O(1) unlink; deep fork chains link many)
        self.vmas: dict[Vma, None] = {}
        self.root = root if root is not None else self
        self.mapping_id = 0

    def __repr__(self) -> str:
        return f"AnonVma({len(self.vmas)} vmas)"


def _link(vma: "Vma", av: AnonVma) -> None:
    if vma not in av.vmas:  # the link is symmetric: an O(1) test on the anon_vma side
        vma.anon_vma_chain.append(av)
        av.vmas[vma] = None


def anon_vma_prepare(vma: "Vma") -> int:
    """``anon_vma_prepare()``: make sure *vma* has an anon_vma; returns 0."""
    if vma.anon_vma is None:
        av = AnonVma()
        vma.vm_mm.sys.mem.register_mapping(av)
        vma.anon_vma = av
        _link(vma, av)
    return 0


def anon_vma_clone(dst: "Vma", src: "Vma") -> None:
    """``anon_vma_clone()``: *dst* (a split-off or moved piece of *src*) shares all of
    *src*'s anon_vmas."""
    for av in src.anon_vma_chain:
        _link(dst, av)


def anon_vma_fork(child: "Vma", parent: "Vma") -> None:
    """``anon_vma_fork()``: the child VMA sees the parent's anon pages and gets its own
    anon_vma for pages it allocates later."""
    for av in child.anon_vma_chain:
        del av.vmas[child]
    child.anon_vma_chain = []
    child.anon_vma = None
    if parent.anon_vma is None:
        return
    anon_vma_clone(child, parent)
    av = AnonVma(root=parent.anon_vma.root)
    child.vm_mm.sys.mem.register_mapping(av)
    child.anon_vma = av
    _link(child, av)


def unlink_anon_vmas(vma: "Vma") -> None:
    """``unlink_anon_vmas()``: drop *vma* from every anon_vma it is on."""
    for av in vma.anon_vma_chain:
        del av.vmas[vma]
    vma.anon_vma_chain = []


# -- anon rmap --------------------------------------------------------------------------
def folio_add_new_anon_rmap(mem: PhysMem, pfn: int, vma: "Vma", addr: int) -> None:
    """``folio_add_new_anon_rmap(folio, vma, addr, RMAP_EXCLUSIVE)`` for an order-0 folio
    mapped by one pte."""
    av = vma.anon_vma
    assert av is not None, "anon rmap without anon_vma"
    mem.mapping[pfn] = av.mapping_id
    mem.index[pfn] = vma.linear_page_index(addr)
    mem.flags[pfn] |= PG_anon | PG_anon_exclusive | PG_swapbacked
    mem.mapcount[pfn] = 1


def folio_add_new_anon_rmap_ptes(mem: PhysMem, pfns: npt.NDArray[np.int64], vma: "Vma",
                                 addrs: npt.NDArray[np.int64]) -> None:
    """Batched :func:`folio_add_new_anon_rmap` for many order-0 folios."""
    av = vma.anon_vma
    assert av is not None, "anon rmap without anon_vma"
    mem.mapping[pfns] = av.mapping_id
    mem.index[pfns] = ((addrs - vma.vm_start) >> PAGE_SHIFT) + vma.vm_pgoff
    mem.flags[pfns] |= PG_anon | PG_anon_exclusive | PG_swapbacked
    mem.mapcount[pfns] = 1


def folio_add_new_anon_rmap_pmd(mem: PhysMem, head: int, vma: "Vma", haddr: int) -> None:
    """``folio_add_new_anon_rmap()`` of a PMD-mapped THP: one entire mapping, every
    subpage exclusive."""
    av = vma.anon_vma
    assert av is not None
    nr = HPAGE_PMD_NR
    mem.mapping[head] = av.mapping_id
    mem.index[head:head + nr] = vma.linear_page_index(haddr) + np.arange(nr)
    mem.flags[head:head + nr] |= PG_anon | PG_anon_exclusive | PG_swapbacked
    mem.entire_mapcount[head] = 1


def folio_try_dup_anon_rmap_ptes(mem: PhysMem, pfns: npt.NDArray[np.int64]) -> None:
    """``folio_try_dup_anon_rmap_ptes()`` at fork: the pages become shared (no longer
    AnonExclusive) and gain a mapping. (Pinned pages, which the kernel copies instead,
    are not modelled.)"""
    mem.flags[pfns] &= ~np.uint32(PG_anon_exclusive)
    np.add.at(mem.mapcount, pfns, 1)


def folio_try_dup_anon_rmap_pmd(mem: PhysMem, head: int) -> None:
    nr = 1 << int(mem.order[head])
    mem.flags[head:head + nr] &= ~np.uint32(PG_anon_exclusive)
    mem.entire_mapcount[head] += 1


# -- file rmap -----------------------------------------------------------------------------
def folio_add_file_rmap_ptes(mem: PhysMem, pfns: npt.NDArray[np.int64] | int) -> None:
    """``folio_add_file_rmap_ptes()``: file (or kernel) pages gain a pte mapping each."""
    np.add.at(mem.mapcount, np.atleast_1d(np.asarray(pfns, np.int64)), 1)


folio_dup_file_rmap_ptes = folio_add_file_rmap_ptes


def folio_remove_rmap_ptes(mem: PhysMem, pfns: npt.NDArray[np.int64] | int) -> None:
    """``folio_remove_rmap_ptes()``: pages lose one pte mapping each."""
    np.subtract.at(mem.mapcount, np.atleast_1d(np.asarray(pfns, np.int64)), 1)


def folio_remove_rmap_pmd(mem: PhysMem, head: int) -> None:
    mem.entire_mapcount[head] -= 1


# -- rmap walk -------------------------------------------------------------------------------
def folio_maybe_mapped_shared(mm: "MM", head: int) -> bool:
    """Whether a VMA of another mm than *mm* maps a page of the large anon folio *head*
    (PMD- or PTE-mapped): what ``folio_maybe_mapped_shared()`` reads from 7.3's
    ``FOLIO_MM_IDS_SHARED_BIT`` (6.12's ``folio_likely_mapped_shared()`` guesses it from
    the first page's mapcount). Looks at the page tables of the folio's anon_vma VMAs."""
    sys = mm.sys
    mem = sys.mem
    av = mem.mapping_obj(int(mem.mapping[head]))
    if not isinstance(av, AnonVma):
        return False
    nr = mem.folio_nr_pages(head)
    first = int(mem.index[head])
    for other in list(av.vmas):
        if other.vm_mm is mm:
            continue
        lo = max(other.address_of_index(first), other.vm_start)
        hi = min(other.address_of_index(first + nr), other.vm_end)
        addr = lo
        while addr < hi:
            nxt = min((addr + PMD_SIZE) & ~(PMD_SIZE - 1), hi)
            pmd = other.vm_mm.pmd_ref(addr)
            e = pmd.get() if pmd is not None else 0
            if e and pmd_leaf(e):
                if pte_present(e) and mem.compound_head(pte_pfn(e)) == head:
                    return True
            elif e:
                tid = other.vm_mm.pte_table(pmd)
                if tid >= 0:
                    i0 = pte_index(addr)
                    seg = sys.pt.table(tid)[i0:i0 + ((nxt - addr) >> PAGE_SHIFT)]
                    pfns = (seg & _U(PTE_PFN_MASK)) >> _U(PAGE_SHIFT)
                    hit = ((seg & _U(_PAGE_PRESENT)) != 0) & (pfns >= _U(head)) & (pfns < _U(head + nr))
                    if hit.any():
                        return True
            addr = nxt
    return False


def page_vma_mapped_pmd(pmd: int, head: int, migration: bool = False) -> bool:
    """The PMD step of ``page_vma_mapped_walk()``: whether the PMD value *pmd* maps the
    folio at *head* as a whole. Without ``PVMW_MIGRATION`` (*migration* False): a present
    huge PMD or (7.3) a device-private PMD of the folio; with it: a PMD migration entry
    of the folio. A table pointer, a none entry or another folio's entry do not match
    (the walk then goes on at pte level or to the next PMD).

    Models the huge-PMD branch of ``mm/page_vma_mapped.c:page_vma_mapped_walk()``."""
    if is_swap_pmd(pmd):
        ent = pmd_to_swp_entry(pmd)
        if is_migration_entry(ent):
            return migration and swp_offset_pfn(ent) == head
        if is_device_private_entry(ent):
            return not migration and swp_offset_pfn(ent) == head
        return False
    return not migration and pmd_leaf(pmd) and pte_pfn(pmd) == head


def rmap_walk(mem: PhysMem, pfn: int) -> Iterator[tuple["Vma", int]]:
    """``rmap_walk()``: every (vma, address) that may map page *pfn* (the caller checks the
    page table). Anonymous pages: the VMAs on the folio's anon_vma; file pages: the
    VMAs of the address_space's ``i_mmap`` covering the page's index."""
    head = mem.compound_head(pfn)
    obj = mem.mapping_obj(int(mem.mapping[head]))
    if obj is None:
        return
    index = int(mem.index[pfn]) if mem.flags[head] & PG_anon else int(mem.index[head]) + (pfn - head)
    vmas = obj.vmas if isinstance(obj, AnonVma) else obj.i_mmap
    for vma in list(vmas):
        addr = vma.address_of_index(index)
        if vma.vm_start <= addr < vma.vm_end:
            yield vma, addr


# -- device-exclusive access ---------------------------------------------------------------------
def _folio_ptes_in_vma(vma: "Vma", head: int, nr: int) -> tuple[int, int]:
    """The address range of *vma* where the anon folio *head* (``nr`` pages) would be
    mapped (``vma_address`` clamped to the VMA), empty if none."""
    mem = vma.vm_mm.sys.mem
    first = int(mem.index[head])
    lo = max(vma.address_of_index(first), vma.vm_start)
    hi = min(vma.address_of_index(first + nr), vma.vm_end)
    return lo, hi


def page_make_device_exclusive_one(vma: "Vma", head: int, address: int, args: dict) -> bool:
    """Models 6.12's ``mm/rmap.c:page_make_device_exclusive_one()``: under one
    MMU_NOTIFY_EXCLUSIVE invalidation (owner ``args["owner"]``) of the folio's span in
    *vma*, replace every pte of *vma* mapping a page of the folio by a device-exclusive
    entry (writable if the pte was), dropping the page's rmap but keeping its reference.
    A non-present entry of the folio stops the walk (returns False). ``args["valid"]``
    is set when the target address of the target mm was mapped writable."""
    from .mm import set_pte_at
    from .mmu_notifier import MmuNotifierEvent, notify_range
    from .pgtable import (
        _PAGE_SOFT_DIRTY,
        _PAGE_SWP_SOFT_DIRTY,
        _PAGE_SWP_UFFD_WP,
        _PAGE_UFFD_WP,
        make_readable_device_exclusive_entry,
        make_writable_device_exclusive_entry,
        pte_dirty,
        pte_present,
        pte_write,
        swp_entry_to_pte,
    )
    from .physmem import PG_dirty
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    nr = mem.folio_nr_pages(head)
    ret = True
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_EXCLUSIVE, mm, address,
                      min(vma.vm_end, address + (nr << PAGE_SHIFT)), owner=args["owner"]):
        lo, hi = _folio_ptes_in_vma(vma, head, nr)
        addr = lo
        while addr < hi and ret:
            nxt = min((addr + PMD_SIZE) & ~(PMD_SIZE - 1), hi)
            pmd = mm.pmd_ref(addr)
            if pmd is None or mm.pte_table(pmd) < 0:
                addr = nxt
                continue
            got = mm.pte_offset_map_lock(pmd)
            assert got is not None
            tbl, tid = got
            try:
                for a in range(addr, nxt, PAGE_SIZE):
                    i = pte_index(a)
                    pte = int(tbl[i])
                    if not pte:
                        continue
                    pfn = pte_pfn(pte) if pte_present(pte) else (pte & PTE_PFN_MASK) >> PAGE_SHIFT
                    if not head <= pfn < head + nr:
                        continue
                    if not pte_present(pte):  # check_pte() also finds device entries
                        ret = False
                        break
                    set_pte_at(mm, tbl, i, 0)  # ptep_clear_flush
                    if pte_dirty(pte):
                        mem.flags[head] |= PG_dirty
                    if args["mm"] is mm and args["address"] == a and pte_write(pte):
                        args["valid"] = True
                    if pte_write(pte):
                        swp = swp_entry_to_pte(make_writable_device_exclusive_entry(pfn))
                    else:
                        swp = swp_entry_to_pte(make_readable_device_exclusive_entry(pfn))
                    if pte & _PAGE_SOFT_DIRTY:
                        swp |= _PAGE_SWP_SOFT_DIRTY
                    if pte & _PAGE_UFFD_WP:
                        swp |= _PAGE_SWP_UFFD_WP
                    set_pte_at(mm, tbl, i, swp)
                    # the entry keeps the mapping's reference: no folio_put
                    folio_remove_rmap_ptes(mem, pfn)
            finally:
                mm.pte_unmap_unlock(tid)
            addr = nxt
    return ret


def folio_make_device_exclusive(sys: "System", head: int, mm: "MM", address: int, owner: object) -> bool:
    """Models 6.12's ``mm/rmap.c:folio_make_device_exclusive()`` (folio locked): anon,
    non-hugetlb folios only; an rmap walk over every VMA that may map the folio, stopped
    when the folio is no longer mapped. True if the target address was mapped writable
    and no mapping of the folio is left."""
    from .physmem import PG_hugetlb
    mem = sys.mem
    if not mem.flags[head] & PG_anon or mem.flags[head] & PG_hugetlb:
        return False
    args = {"mm": mm, "address": address, "owner": owner, "valid": False}
    av = mem.mapping_obj(int(mem.mapping[head]))
    if isinstance(av, AnonVma):
        nr = mem.folio_nr_pages(head)
        for vma in list(av.vmas):
            if not mem.folio_mapcount(head):  # rwc->done = folio_not_mapped
                break
            lo, hi = _folio_ptes_in_vma(vma, head, nr)
            if lo >= hi:
                continue
            if not page_make_device_exclusive_one(vma, head, lo, args):
                break
    return bool(args["valid"]) and not mem.folio_mapcount(head)


def make_device_exclusive_range(mm: "MM", start: int, end: int, pages: list[int], owner: object) -> int:
    """Models 6.12's ``mm/rmap.c:make_device_exclusive_range()`` (mmap_lock held).

    GUP the range (FOLL_GET | FOLL_WRITE | FOLL_SPLIT_PMD, which faults it in writable
    and maps a THP by ptes), then make each folio device-exclusive through its page at
    the address GUP returned. *pages* receives one entry per page GUP found: the page,
    locked and referenced, where it was made exclusive; -1 where not (a THP tail page,
    a folio that could not be locked, a folio still mapped elsewhere).

    :return: the number of pages GUP found, or ``-errno``
    """
    from .gup import FOLL_GET, FOLL_SPLIT_PMD, FOLL_WRITE, get_user_pages_remote, put_page
    from .pagemap import folio_trylock, folio_unlock
    sys = mm.sys
    mem = sys.mem
    got: list[int] = []
    npages = get_user_pages_remote(mm, start, (end - start) >> PAGE_SHIFT,
                                   FOLL_GET | FOLL_WRITE | FOLL_SPLIT_PMD, got)
    if npages < 0:
        return npages
    for i in range(npages):
        page = got[i]
        head = mem.compound_head(page)
        if page != head or not folio_trylock(sys, head):  # PageTail(pages[i])
            put_page(sys, page)
            got[i] = -1
            continue
        if not folio_make_device_exclusive(sys, head, mm, start + (i << PAGE_SHIFT), owner):
            folio_unlock(sys, head)
            put_page(sys, page)
            got[i] = -1
    pages.extend(got)
    sys.stats.add("rmap.make_device_exclusive_range")
    return npages


def make_device_exclusive(mm: "MM", addr: int, owner: object) -> tuple[int, int]:
    """Models 7.3's ``mm/rmap.c:make_device_exclusive()`` (mmap_lock held): fault the page
    at *addr* in writable (GUP with FOLL_GET | FOLL_WRITE | FOLL_SPLIT_PMD, so a THP is
    mapped by ptes first), lock its folio and, under an MMU_NOTIFY_EXCLUSIVE invalidation
    of that page (owner *owner*), replace its pte by a device-exclusive entry; the page
    stays mapped for rmap. Retries if the pte changed meanwhile.

    :return: ``(page, folio head)`` with the folio locked and referenced, or
        ``(-errno, -1)`` (``-EOPNOTSUPP`` for a non-anon or hugetlb folio)
    """
    from .errno import EOPNOTSUPP
    from .gup import FOLL_GET, FOLL_SPLIT_PMD, FOLL_WRITE, get_user_page_vma_remote, put_page
    from .mm import mmap_assert_locked, set_pte_at
    from .mmu_notifier import MmuNotifierEvent, notify_range
    from .pagemap import folio_lock, folio_unlock
    from .pgtable import (
        _PAGE_SOFT_DIRTY,
        _PAGE_SWP_SOFT_DIRTY,
        make_writable_device_exclusive_entry,
        pmd_leaf,
        pmd_present,
        pte_dirty,
        pte_present,
        pte_write,
        swp_entry_to_pte,
    )
    from .physmem import PG_dirty, PG_hugetlb
    sys = mm.sys
    mem = sys.mem
    mmap_assert_locked(mm)
    addr &= ~(PAGE_SIZE - 1)
    while True:
        page, vma = get_user_page_vma_remote(mm, addr, FOLL_GET | FOLL_WRITE | FOLL_SPLIT_PMD)
        if page < 0:
            return page, -1
        assert vma is not None
        head = mem.compound_head(page)
        if not mem.flags[head] & PG_anon or mem.flags[head] & PG_hugetlb:
            put_page(sys, page)
            return -EOPNOTSUPP, -1
        folio_lock(sys, head)
        with notify_range(MmuNotifierEvent.MMU_NOTIFY_EXCLUSIVE, mm, addr, addr + PAGE_SIZE, owner=owner):
            # folio_walk_start(): the same page, mapped writable by a pte?
            pmd = mm.pmd_ref(addr)
            e = pmd.get() if pmd is not None else 0
            ok = False
            if pmd is not None and e and pmd_present(e) and not pmd_leaf(e):
                got = mm.pte_offset_map_lock(pmd)
                assert got is not None
                tbl, tid = got
                i = pte_index(addr)
                pte = int(tbl[i])
                if pte_present(pte) and pte_pfn(pte) == page and pte_write(pte):
                    ok = True
                    set_pte_at(mm, tbl, i, 0)  # ptep_clear_flush
                    if pte_dirty(pte):
                        mem.flags[head] |= PG_dirty
                    swp = swp_entry_to_pte(make_writable_device_exclusive_entry(page))
                    if pte & _PAGE_SOFT_DIRTY:
                        swp |= _PAGE_SWP_SOFT_DIRTY
                    set_pte_at(mm, tbl, i, swp)
                mm.pte_unmap_unlock(tid)
        if ok:
            sys.stats.add("rmap.make_device_exclusive")
            return page, head
        folio_unlock(sys, head)
        put_page(sys, page)


def page_has_device_exclusive_entry(sys: "System", pfn: int) -> bool:
    """Whether a device-exclusive entry of some VMA on the page's anon_vma points at page
    *pfn* (for 6.12, whose entries hold a reference but are no mapping: nothing else
    finds them)."""
    from .pgtable import is_device_exclusive_entry, pte_present, pte_to_swp_entry, swp_offset_pfn
    mem = sys.mem
    head = mem.compound_head(pfn)
    av = mem.mapping_obj(int(mem.mapping[head]))
    if not isinstance(av, AnonVma):
        return False
    index = int(mem.index[pfn])
    for vma in list(av.vmas):
        addr = vma.address_of_index(index)
        if not vma.vm_start <= addr < vma.vm_end:
            continue
        e = vma.vm_mm.lookup_pte(addr)
        if e and not pte_present(e):
            ent = pte_to_swp_entry(e)
            if is_device_exclusive_entry(ent) and swp_offset_pfn(ent) == pfn:
                return True
    return False
