"""``/proc/<pid>/clear_refs``: soft-dirty tracking (``fs/proc/task_mmu.c``).

Writing ``4`` (``CLEAR_REFS_SOFT_DIRTY``) clears the soft-dirty bits of every pte of the
process and write-protects present ptes, so that the next write faults and sets the bit
again; the VMAs lose ``VM_SOFTDIRTY`` (which is what makes the write faults necessary).
The whole address space is invalidated under ``MMU_NOTIFY_SOFT_DIRTY`` first.
"""

from __future__ import annotations

import numpy as np

from .errno import EINVAL
from .mm import MM, PtRef
from .mmu_notifier import MmuNotifierEvent, notify_range
from .page_types import PAGE_SHIFT, ULONG_MAX, pte_index
from .pagewalk import PGWALK_WRLOCK, MmWalk, MmWalkOps, walk_page_range
from .pgtable import (
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SWP_SOFT_DIRTY,
    pmd_leaf,
    pte_present,
)
from .vma import VM_SOFTDIRTY

__all__ = ("CLEAR_REFS_ALL", "CLEAR_REFS_SOFT_DIRTY", "clear_refs")

CLEAR_REFS_ALL = 1
CLEAR_REFS_SOFT_DIRTY = 4
_U = np.uint64


def clear_refs_pte_range(pmd: PtRef, addr: int, end: int, walk: MmWalk) -> int:
    """``clear_refs_pte_range()`` for soft-dirty: clear the soft-dirty bit and
    write-protect every present entry (and clear it on swap-format entries)."""
    e = pmd.get()
    if pmd_leaf(e):
        pmd.set(e & ~(_PAGE_SOFT_DIRTY | _PAGE_RW))
        return 0
    if not pte_present(e):
        pmd.set(e & ~_PAGE_SWP_SOFT_DIRTY)
        return 0
    mm = walk.mm
    got = mm.pte_offset_map_lock(pmd)
    assert got is not None
    tbl, tid = got
    i0 = pte_index(addr)
    seg = tbl[i0:i0 + ((end - addr) >> PAGE_SHIFT)]
    present = (seg & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0
    seg[present] &= ~_U(_PAGE_SOFT_DIRTY | _PAGE_RW)
    swp = (seg != 0) & ~present
    seg[swp] &= ~_U(_PAGE_SWP_SOFT_DIRTY)
    mm.pte_unmap_unlock(tid)
    return 0


def clear_refs_test_walk(start: int, end: int, walk: MmWalk) -> int:
    """``clear_refs_test_walk()``: soft-dirty tracking restarts in every VMA."""
    assert walk.vma is not None
    walk.vma.vm_flags &= ~VM_SOFTDIRTY
    return 0


clear_refs_walk_ops = MmWalkOps(pmd_entry=clear_refs_pte_range, test_walk=clear_refs_test_walk,
                                walk_lock=PGWALK_WRLOCK)


def clear_refs(mm: MM, what: int) -> int:
    """``clear_refs_write()``: only ``CLEAR_REFS_SOFT_DIRTY`` is modelled (the referenced
    bits of the other modes have no effect HMM can see). Returns 0 or ``-EINVAL``."""
    if what != CLEAR_REFS_SOFT_DIRTY:
        return -EINVAL
    mm.mmap_lock.down_write()
    try:
        with notify_range(MmuNotifierEvent.MMU_NOTIFY_SOFT_DIRTY, mm, 0, ULONG_MAX):
            walk_page_range(mm, 0, ULONG_MAX, clear_refs_walk_ops, None)
    finally:
        mm.mmap_lock.up_write()
    mm.sys.stats.add("proc.clear_refs")
    return 0
