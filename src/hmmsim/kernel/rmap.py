"""Reverse mapping: which VMAs map a folio, and the map/ref counting that goes with it.

Models ``mm/rmap.c`` and ``include/linux/rmap.h``: ``anon_vma`` chains, the
``folio_add_*_rmap_*`` / ``folio_remove_rmap_*`` family (batched over numpy arrays of
pfns where the kernel batches over ptes), ``folio_try_dup_anon_rmap_*`` for fork, and
``rmap_walk``. Anonymous folios point at their ``anon_vma`` through ``page->mapping``
(with ``PG_anon``) and carry their linear page index in ``page->index``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .page_types import HPAGE_PMD_NR, PAGE_SHIFT, PMD_SIZE, pte_index
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
    from .vma import Vma

_U = np.uint64

__all__ = (
    "AnonVma", "anon_vma_fork", "anon_vma_prepare", "folio_add_file_rmap_ptes",
    "folio_add_new_anon_rmap", "folio_add_new_anon_rmap_pmd", "folio_add_new_anon_rmap_ptes",
    "folio_dup_file_rmap_ptes", "folio_maybe_mapped_shared", "folio_remove_rmap_pmd",
    "folio_remove_rmap_ptes",
    "folio_try_dup_anon_rmap_pmd", "folio_try_dup_anon_rmap_ptes", "page_vma_mapped_pmd", "rmap_walk",
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
