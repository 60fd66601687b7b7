"""``/proc/<pid>/clear_refs``: soft-dirty tracking (``fs/proc/task_mmu.c``).

Writing ``4`` (``CLEAR_REFS_SOFT_DIRTY``) clears the soft-dirty bits of every pte of the
process and write-protects present ptes, so that the next write faults and sets the bit
again; the VMAs lose ``VM_SOFTDIRTY`` (which is what makes the write faults necessary).
The whole address space is invalidated under ``MMU_NOTIFY_SOFT_DIRTY`` first.
"""

from __future__ import annotations

import numpy as np

from .errno import EINVAL
from .mm import MM
from .mmu_notifier import MmuNotifierEvent, notify_range
from .page_types import PAGE_SHIFT, PMD_MASK, PMD_SIZE, TASK_SIZE
from .pgtable import _PAGE_PRESENT, _PAGE_PROTNONE, _PAGE_RW, _PAGE_SOFT_DIRTY, _PAGE_SWP_SOFT_DIRTY, pmd_leaf, pte_present
from .vma import VM_SOFTDIRTY

__all__ = ("CLEAR_REFS_ALL", "CLEAR_REFS_SOFT_DIRTY", "clear_refs")

CLEAR_REFS_ALL = 1
CLEAR_REFS_SOFT_DIRTY = 4
_U = np.uint64


def clear_refs(mm: MM, what: int) -> int:
    """``clear_refs_write()``: only ``CLEAR_REFS_SOFT_DIRTY`` is modelled (the referenced
    bits of the other modes have no effect HMM can see). Returns 0 or ``-EINVAL``."""
    if what != CLEAR_REFS_SOFT_DIRTY:
        return -EINVAL
    mm.mmap_lock.down_write()
    try:
        for vma in mm.vmas():
            vma.vm_flags &= ~VM_SOFTDIRTY
        with notify_range(MmuNotifierEvent.MMU_NOTIFY_SOFT_DIRTY, mm, 0, TASK_SIZE):
            for vma in mm.vmas():
                _clear_soft_dirty(vma.vm_mm, vma.vm_start, vma.vm_end)
    finally:
        mm.mmap_lock.up_write()
    mm.sys.stats.add("proc.clear_refs")
    return 0


def _clear_soft_dirty(mm: MM, start: int, end: int) -> None:
    addr = start
    while addr < end:
        nxt = min((addr + PMD_SIZE) & PMD_MASK, end)
        pmd = mm.pmd_ref(addr)
        if pmd is None or pmd.get() == 0:
            addr = nxt
            continue
        e = pmd.get()
        if pmd_leaf(e):
            pmd.set(e & ~(_PAGE_SOFT_DIRTY | _PAGE_RW))
            addr = nxt
            continue
        if not pte_present(e):
            pmd.set(e & ~_PAGE_SWP_SOFT_DIRTY)
            addr = nxt
            continue
        got = mm.pte_offset_map_lock(pmd)
        assert got is not None
        tbl, tid = got
        i0 = (addr >> PAGE_SHIFT) & 511
        seg = tbl[i0:i0 + ((nxt - addr) >> PAGE_SHIFT)]
        present = (seg & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0
        seg[present] &= ~_U(_PAGE_SOFT_DIRTY | _PAGE_RW)
        swp = (seg != 0) & ~present
        seg[swp] &= ~_U(_PAGE_SWP_SOFT_DIRTY)
        mm.pte_unmap_unlock(tid)
        addr = nxt
