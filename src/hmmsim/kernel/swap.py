"""Swap: a swap device, page-out of anonymous pages and swap-in on fault.

Models the parts of ``mm/swapfile.c``, ``mm/vmscan.c`` (``reclaim_pages`` as driven by
``MADV_PAGEOUT``) and ``mm/rmap.c:try_to_unmap_one`` that are needed for the "swap
entry" state HMM must handle; swapping back in is ``do_swap_page`` in
:mod:`hmmsim.kernel.fault`. The
reference environment has no swap; a :class:`~hmmsim.kernel.system.System` gets a swap
device only when asked (``swap_pages=N``).

Simplification: there is no swap cache. A page is written to its slot when it is paged
out and read back into a fresh page at swap-in; a slot shared after fork is read by each
process into its own page (both copies are read-only COW data, so no difference can be
observed through memory contents).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .folio import folio_put
from .mm import MM_ANONPAGES, MM_SWAPENTS, set_pte_at
from .mmu_notifier import MmuNotifierEvent, notify_range
from .page_types import PAGE_SIZE, pte_index
from .pgtable import (
    _PAGE_SOFT_DIRTY,
    _PAGE_SWP_EXCLUSIVE,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    _PAGE_UFFD_WP,
    pte_pfn,
    pte_present,
    pte_special,
    swp_entry,
    swp_entry_to_pte,
    swp_offset,
)
from .physmem import PG_anon, PG_anon_exclusive, PG_dirty

if TYPE_CHECKING:
    from .system import System
    from .vma import Vma

__all__ = ("SwapInfo", "free_swap_and_cache", "reclaim_pages", "swap_duplicate")


class SwapInfo:
    """``struct swap_info_struct`` of swap type 0: ``nr`` slots (slot 0 is the header)."""

    def __init__(self, nr: int) -> None:
        self.nr = nr
        self.swap_map = np.zeros(nr, np.int16)
        self.swap_map[0] = -1
        self.data = np.zeros((nr, PAGE_SIZE), np.uint8)
        self.inuse = 0

    def alloc_slot(self) -> int:
        """``folio_alloc_swap()``: the lowest free slot, or -1."""
        free = np.flatnonzero(self.swap_map == 0)
        if len(free) == 0:
            return -1
        slot = int(free[0])
        self.swap_map[slot] = 1
        self.inuse += 1
        return slot


def swap_duplicate(sys: "System", entry: int) -> None:
    """``swap_duplicate()``: another pte refers to the slot (fork)."""
    assert sys.swap is not None
    sys.swap.swap_map[swp_offset(entry)] += 1


def free_swap_and_cache(sys: "System", entry: int) -> None:
    """``free_swap_and_cache()``: a pte referring to the slot went away."""
    si = sys.swap
    assert si is not None
    slot = swp_offset(entry)
    si.swap_map[slot] -= 1
    if si.swap_map[slot] == 0:
        si.inuse -= 1


def reclaim_pages(vma: "Vma", start: int, end: int) -> int:
    """``MADV_PAGEOUT``: page out the small anonymous pages of ``[start, end)`` that only
    this mapping uses, replacing each pte by a swap entry (one ``MMU_NOTIFY_CLEAR`` per
    page, as ``try_to_unmap_one`` does). Returns the number of pages swapped out."""
    mm = vma.vm_mm
    sys = mm.sys
    si = sys.swap
    if si is None:
        return 0
    mem = sys.mem
    done = 0
    for addr in range(start, end, PAGE_SIZE):
        pmd = mm.pmd_ref(addr)
        if pmd is None:
            continue
        tid = mm.pte_table(pmd)
        if tid < 0:
            continue
        tbl = sys.pt.table(tid)
        idx = pte_index(addr)
        pte = int(tbl[idx])
        if not pte_present(pte) or pte_special(pte) or not pte & 1:
            continue
        pfn = pte_pfn(pte)
        head = mem.compound_head(pfn)
        if not mem.flags[head] & PG_anon or mem.order[head] or mem.mapcount[pfn] != 1 or mem.refcount[head] != 1:
            continue
        slot = si.alloc_slot()
        if slot < 0:
            break
        si.data[slot] = mem.data[pfn]
        with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mm, addr, addr + PAGE_SIZE):
            got = mm.pte_offset_map_lock(pmd)
            assert got is not None
            tbl, tid = got
            swp = swp_entry_to_pte(swp_entry(0, slot))
            if mem.flags[pfn] & PG_anon_exclusive:
                swp |= _PAGE_SWP_EXCLUSIVE
            if pte & _PAGE_SOFT_DIRTY:
                swp |= _PAGE_SWP_SOFT_DIRTY
            if pte & _PAGE_UFFD_WP:
                swp |= _PAGE_SWP_UFFD_WP
            set_pte_at(vma.vm_mm, tbl, idx, swp)
            mem.mapcount[pfn] -= 1
            mem.flags[pfn] &= ~np.uint32(PG_dirty)
            mm.pte_unmap_unlock(tid)
        mm.add_mm_counter(MM_ANONPAGES, -1)
        mm.add_mm_counter(MM_SWAPENTS, 1)
        folio_put(sys, head)
        done += 1
    sys.stats.add("swap.pageout", done)
    return done
