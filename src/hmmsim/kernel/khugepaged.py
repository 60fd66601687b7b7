"""``MADV_COLLAPSE`` for anonymous memory (``mm/khugepaged.c:madvise_collapse()``): make
every PMD-aligned 2 MiB block of a range one THP now, synchronously (khugepaged's own
background scanning is not modelled: the reference machines keep it from collapsing).

Per block (``hpage_collapse_scan_pmd`` + ``collapse_huge_page``): a block already mapped
by a huge PMD counts as collapsed; an empty PMD (``SCAN_PMD_NULL``), a swap, migration or
device entry (``SCAN_PTE_NON_PRESENT``), a page that is not anonymous (``SCAN_PAGE_ANON``)
or the zero page fails the block; otherwise a new THP gets the data of the present pages
(none ptes read as zero; MADV_COLLAPSE ignores ``max_ptes_none``/``max_ptes_shared``)
under an ``MMU_NOTIFY_CLEAR`` of the block, the pte table is freed and the PMD maps the
THP (writable and dirty if the VMA is writable). The old pages lose their mappings.

Returns 0 when every block is a THP afterwards, else ``-EINVAL`` for a block that cannot
be collapsed or ``-ENOMEM`` when no THP could be allocated (the other blocks are still
collapsed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errno import EINVAL, ENOMEM
from .folio import folios_put
from .huge_memory import map_anon_folio_pmd_pf
from .mm import MM_ANONPAGES
from .mmu_notifier import MmuNotifierEvent, notify_range
from .page_types import HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PAGE_SHIFT, PMD_MASK
from .pgtable import _PAGE_PRESENT, _PAGE_PROTNONE, PTE_PFN_MASK, pmd_leaf, pmd_present
from .physmem import PG_anon
from .rmap import anon_vma_prepare, folio_remove_rmap_ptes
from .vma import VM_NOHUGEPAGE, vma_is_anonymous

if TYPE_CHECKING:
    from .vma import Vma

__all__ = ("MADV_COLLAPSE", "madvise_collapse")

#: ``MADV_COLLAPSE``
MADV_COLLAPSE = 25

_U = np.uint64


def _collapse_block(vma: "Vma", haddr: int) -> int:
    """``hpage_collapse_scan_pmd()`` + ``collapse_huge_page()`` of one 2 MiB block:
    0 (a THP maps it now), ``-EINVAL`` or ``-ENOMEM``."""
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    pmd = mm.pmd_ref(haddr)
    e = pmd.get() if pmd is not None else 0
    if e == 0:
        return -EINVAL  # SCAN_PMD_NULL
    if pmd_leaf(e) and pmd_present(e):
        return 0 if not mem.is_huge_zero_pfn((e & PTE_PFN_MASK) >> PAGE_SHIFT) else -EINVAL
    tid = mm.pte_table(pmd)
    if tid < 0:
        return -EINVAL
    tbl = sys.pt.table(tid)
    nz = np.flatnonzero(tbl)
    ents = tbl[nz]
    if ((ents & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) == 0).any():
        return -EINVAL  # SCAN_PTE_NON_PRESENT
    pfns = ((ents & _U(PTE_PFN_MASK)) >> _U(PAGE_SHIFT)).astype(np.int64)
    if len(pfns) and (((mem.flags[mem.heads(pfns)] & PG_anon) == 0).any() or (mem.pgmap[pfns] != 0).any()):
        return -EINVAL  # SCAN_PAGE_ANON (the zero page is not anonymous either)
    if anon_vma_prepare(vma):
        return -ENOMEM
    head = mem.alloc_folio(HPAGE_PMD_ORDER)
    if head < 0:
        return -ENOMEM  # SCAN_ALLOC_HUGE_PAGE_FAIL
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mm, haddr, haddr + HPAGE_PMD_SIZE):
        ptl = mm.pmd_lock(pmd)
        try:
            if len(nz):
                mem.copy_pages(head + nz, pfns)
            pmd.set(0)
            map_anon_folio_pmd_pf(head, pmd, vma, haddr)
            mm.add_mm_counter(MM_ANONPAGES, -len(nz))  # the rss of the old ptes
        finally:
            mm.spin_unlock(ptl)
    tbl[:] = 0
    sys.pt.free(tid)
    if len(pfns):
        folio_remove_rmap_ptes(mem, pfns)
        folios_put(sys, np.sort(mem.heads(pfns)))
    sys.stats.add("thp.collapse_alloc")
    return 0


def madvise_collapse(vma: "Vma", start: int, end: int) -> int:
    """Models ``mm/khugepaged.c:madvise_collapse()`` for an anonymous VMA: collapse every
    PMD-aligned block of ``[start, end)`` that the VMA covers whole. Returns 0,
    ``-EINVAL`` (a VMA THPs may not back, or a block that cannot be collapsed) or
    ``-ENOMEM``."""
    sys = vma.vm_mm.sys
    if not vma_is_anonymous(vma) or vma.vm_flags & VM_NOHUGEPAGE or sys.config.thp == "never":
        return -EINVAL
    hstart = (start + HPAGE_PMD_SIZE - 1) & PMD_MASK
    hend = end & PMD_MASK
    ret = 0
    for haddr in range(max(hstart, (vma.vm_start + HPAGE_PMD_SIZE - 1) & PMD_MASK),
                       min(hend, vma.vm_end & PMD_MASK), HPAGE_PMD_SIZE):
        r = _collapse_block(vma, haddr)
        if r and not ret:
            ret = r
    return ret
