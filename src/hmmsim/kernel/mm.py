"""The address space: ``struct mm_struct``, its VMA tree and page-table access.

Models ``include/linux/mm_types.h`` (``struct mm_struct``), the VMA lookups of
``mm/mmap.c`` (``find_vma``, ``vma_lookup``, ``find_vma_intersection``), the mmap_lock
API of ``include/linux/mmap_lock.h``, and the page-table accessors of
``include/linux/pgtable.h`` / ``mm/memory.c`` (``pgd_offset`` ... ``pte_offset_map_lock``,
``__pte_alloc``). All page-table reads and writes go through these accessors so they can
be counted and checked against the locking rules.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .locking import WRITE, Lock
from .page_types import pgd_index, pmd_index, pte_index, pud_index
from .pgtable import mk_table_entry, pmd_leaf, pmd_none, pmd_present, table_id
from .vma import Vma

if TYPE_CHECKING:
    from .mmu_notifier import MmuNotifierSubscriptions
    from .system import System

__all__ = (
    "LockId", "MM", "MM_ANONPAGES", "MM_FILEPAGES", "MM_SHMEMPAGES", "MM_SWAPENTS", "PtRef",
    "huge_pte_lock", "huge_pte_lockptr", "mmap_assert_locked", "mmap_assert_write_locked",
    "mmap_read_lock", "mmap_read_unlock", "mmap_write_lock", "mmap_write_unlock", "pmd_assert_locked",
    "pmd_lock", "pmd_lockptr", "pte_lockptr", "ptlock_ptr", "set_ptes", "spin_lock", "spin_unlock",
)

MM_FILEPAGES = 0
MM_ANONPAGES = 1
MM_SWAPENTS = 2
MM_SHMEMPAGES = 3


class PtRef:
    """A pointer to one page-table entry (``pte_t *``, ``pmd_t *``, ``pud_t *``): the
    table (a view), the index in it, the table id and the mm it belongs to (None for a
    bare pointer: then writes are not scheduling points)."""

    __slots__ = ("tbl", "idx", "tid", "mm")

    def __init__(self, tbl: npt.NDArray[np.uint64], idx: int, tid: int, mm: "MM | None" = None) -> None:
        self.tbl = tbl
        self.idx = idx
        self.tid = tid
        self.mm = mm

    def get(self) -> int:
        """``ptep_get()``/``pmdp_get()``."""
        return int(self.tbl[self.idx])

    def set(self, val: int) -> None:
        """``set_pte_at()``/``set_pmd_at()``/``set_pud_at()``: a page-table write, counted
        as ``pgtable.set_pte`` (``set_pmd``, ``set_pud``) and a scheduling point of that
        name (another simulated thread may run just before the entry changes)."""
        mm = self.mm
        if mm is not None:
            sys = mm.sys
            what = _SET_NAME[int(sys.pt.level[self.tid])] if self.tid >= 0 else "set_pud"
            sys.stats.add(_SET_STAT[what])
            if sys.ls.has_hooks:
                sys.ls.schedule_point(what)
        self.tbl[self.idx] = val


#: page-table level -> the accessor that writes an entry of it
_SET_NAME = {1: "set_pte", 2: "set_pmd", 3: "set_pud", 4: "set_pgd"}
_SET_STAT = {v: f"pgtable.{v}" for v in _SET_NAME.values()}


# -- lock identities (include/linux/mm.h, include/linux/hugetlb.h) --------------------------
#: a keyed lock: (lock class, key); the class is what lockdep names it by
LockId = tuple[str, int]


def ptlock_ptr(tid: int) -> LockId:
    """``ptlock_ptr()``: the split page-table lock of page-table page *tid* (class
    ``ptl``)."""
    return ("ptl", tid)


def pte_lockptr(mm: "MM", pmd: PtRef) -> LockId:
    """``pte_lockptr()``: the lock of the pte table *pmd* points to."""
    return ptlock_ptr(mm.pte_table(pmd))


def pmd_lockptr(mm: "MM", pmd: PtRef) -> LockId:
    """``pmd_lockptr()``: the split PMD lock of the pmd table holding *pmd* (class
    ``pmd_lock``)."""
    return ("pmd_lock", pmd.tid)


def huge_pte_lockptr(mm: "MM", pte: PtRef) -> LockId:
    """``huge_pte_lockptr()``: the lock of a hugetlb entry; 2 MiB pages live at the pmd
    level, so it is the PMD lock."""
    return pmd_lockptr(mm, pte)


def set_ptes(mm: "MM", tbl: npt.NDArray[np.uint64], i0: int, vals: Any, nr: int) -> None:
    """``set_ptes()``: write *nr* consecutive entries of one pte table from index *i0*
    (*vals*: one value for all, or *nr* values), the PTL held. Counted as *nr*
    ``pgtable.set_pte``; one scheduling point ``set_ptes`` per call (per table), like the
    batched paths it serves, so the cost stays O(1) per table."""
    sys = mm.sys
    sys.stats.add("pgtable.set_pte", nr)
    if sys.ls.has_hooks:
        sys.ls.schedule_point("set_ptes")
    tbl[i0:i0 + nr] = vals


def set_pte_at(mm: "MM", tbl: npt.NDArray[np.uint64], idx: int, pte: Any) -> None:
    """``set_pte_at()``: write one pte (the PTL held); :func:`set_ptes` of one entry."""
    set_ptes(mm, tbl, idx, pte, 1)


def spin_lock(mm: "MM", ptl: LockId, where: str = "lock") -> None:
    """``spin_lock()`` of a keyed page-table lock (a scheduling point named *where*)."""
    mm.sys.ls.acquire(ptl, ptl[0], WRITE, sleepable=False, where=where)


def spin_unlock(mm: "MM", ptl: LockId) -> None:
    """``spin_unlock()`` of a keyed page-table lock."""
    mm.sys.ls.release(ptl, ptl[0])


def pmd_lock(mm: "MM", pmd: PtRef) -> LockId:
    """``pmd_lock()``: take the PMD lock of *pmd*; returns it for :func:`spin_unlock`."""
    ptl = pmd_lockptr(mm, pmd)
    mm.sys.ls.acquire(ptl, "pmd_lock", WRITE, sleepable=False, where="pmd_lock")
    return ptl


def pmd_assert_locked(mm: "MM", pmd: PtRef, where: str) -> None:
    """``lockdep_assert_held(pmd_lockptr(mm, pmd))``: rule ``pmd-lock-not-held`` of
    :mod:`hmmsim.kernel.locking`, for a PMD-level step (*where*) that relies on the lock."""
    mm.sys.ls.assert_held(pmd_lockptr(mm, pmd), "pmd_lock", where=where, rule="pmd-lock-not-held")


def huge_pte_lock(mm: "MM", pte: PtRef) -> LockId:
    """``huge_pte_lock()``: take the lock of a hugetlb entry; returns it."""
    ptl = huge_pte_lockptr(mm, pte)
    mm.sys.ls.acquire(ptl, ptl[0], WRITE, sleepable=False, where="huge_pte_lock")
    return ptl


class MM:
    """``struct mm_struct``: VMAs, page tables, locks, counters and notifiers of a process."""

    def __init__(self, system: "System", name: str = "mm") -> None:
        self.sys = system
        self.name = name
        ls = system.ls
        self.mmap_lock = Lock(ls, "mmap_lock")
        self.page_table_lock = Lock(ls, "page_table_lock", sleepable=False)
        #: ``MMF_UNSTABLE``: the OOM reaper tore the address space down under its users
        self.mmf_unstable = False
        self.pgd = system.pt.alloc(4)
        self._starts: list[int] = []
        self._vmas: list[Vma] = []
        self.rss = [0, 0, 0, 0]
        #: base pages of hugetlb folios mapped (``mm->hugetlb_usage``), not part of rss
        self.hugetlb_usage = 0
        self.mm_users = 1
        self.notifier_subscriptions: MmuNotifierSubscriptions | None = None
        self.def_flags = 0
        #: mm has been torn down (exit_mmap done)
        self.dead = False
        self.owner: Any = None
        system.mms.append(self)

    # -- VMA tree ------------------------------------------------------------------------
    def find_vma(self, addr: int) -> Vma | None:
        """``find_vma()``: the first VMA with ``vm_end > addr``."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self._vmas[i].vm_end > addr:
            return self._vmas[i]
        i += 1
        return self._vmas[i] if i < len(self._vmas) else None

    def vma_lookup(self, addr: int) -> Vma | None:
        """``vma_lookup()``: the VMA containing *addr*, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self._vmas[i].vm_end > addr:
            return self._vmas[i]
        return None

    def find_vma_intersection(self, start: int, end: int) -> Vma | None:
        v = self.find_vma(start)
        return v if v is not None and v.vm_start < end else None

    def vmas(self, start: int = 0, end: int = 1 << 64) -> Iterator[Vma]:
        """``for_each_vma_range()``: VMAs intersecting ``[start, end)``, in address order."""
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while i < len(self._vmas):
            v = self._vmas[i]
            if v.vm_start >= end:
                break
            if v.vm_end > start:
                yield v
            i += 1

    def vma_list(self) -> list[Vma]:
        return list(self._vmas)

    def insert_vma(self, vma: Vma) -> None:
        """``vma_link()``: add a VMA; it must not overlap another one."""
        i = bisect.bisect_left(self._starts, vma.vm_start)
        if (i > 0 and self._vmas[i - 1].vm_end > vma.vm_start) or (
                i < len(self._vmas) and self._vmas[i].vm_start < vma.vm_end):
            raise AssertionError(f"overlapping VMA {vma}")
        self._starts.insert(i, vma.vm_start)
        self._vmas.insert(i, vma)

    def remove_vma(self, vma: Vma) -> None:
        i = bisect.bisect_left(self._starts, vma.vm_start)
        if i >= len(self._vmas) or self._vmas[i] is not vma:
            raise AssertionError(f"VMA not in tree: {vma}")
        del self._starts[i]
        del self._vmas[i]

    def resize_vma(self, vma: Vma, start: int, end: int, pgoff: int | None = None) -> None:
        """Change a VMA's bounds in place (``vma_shrink``/``vma_expand``)."""
        self.remove_vma(vma)
        vma.vm_start, vma.vm_end = start, end
        if pgoff is not None:
            vma.vm_pgoff = pgoff
        self.insert_vma(vma)

    @property
    def map_count(self) -> int:
        return len(self._vmas)

    # -- counters ------------------------------------------------------------------------
    def add_mm_counter(self, member: int, value: int) -> None:
        self.rss[member] += value

    def get_mm_counter(self, member: int) -> int:
        return self.rss[member]

    # -- page tables ---------------------------------------------------------------------
    def _lower(self, tid: int, idx: int, level: int, alloc: bool) -> int:
        """Table id below entry *idx* of table *tid*, allocating it if asked; -1 if none
        (or if the entry is a leaf)."""
        tbl = self.sys.pt.table(tid)
        e = int(tbl[idx])
        if e == 0:
            if not alloc:
                return -1
            new = self.sys.pt.alloc(level)
            # ``pmd_install()`` & co.: the upper level is populated under
            # mm->page_table_lock, if it is still empty: another thread may have installed
            # a table (or a huge entry) while this one allocated; then the new one is freed
            with self.page_table_lock.held():
                e = int(tbl[idx])
                if e == 0:
                    tbl[idx] = mk_table_entry(new)
            if e == 0:
                self.sys.stats.add(f"pgtable.alloc.l{level}")
                return new
            self.sys.pt.free(new)
        if not pmd_present(e) or pmd_leaf(e):
            return -1
        return table_id(e)

    def pud_table(self, addr: int, alloc: bool = False) -> int:
        """The pud table covering *addr* (``pud_offset(p4d_offset(pgd_offset()))``)."""
        return self._lower(self.pgd, pgd_index(addr), 3, alloc)

    def pmd_ref(self, addr: int, alloc: bool = False) -> PtRef | None:
        """``pmd_off()``/``__pmd_alloc``: a pointer to the pmd entry covering *addr*, or
        None if the upper levels are missing (or a PUD leaf maps *addr*)."""
        pud_tid = self.pud_table(addr, alloc)
        if pud_tid < 0:
            return None
        pmd_tid = self._lower(pud_tid, pud_index(addr), 2, alloc)
        if pmd_tid < 0:
            return None
        return PtRef(self.sys.pt.table(pmd_tid), pmd_index(addr), pmd_tid, self)

    def pud_entry(self, addr: int) -> tuple[npt.NDArray[np.uint64], int] | None:
        """The pud table view and index covering *addr*, or None."""
        pud_tid = self.pud_table(addr)
        if pud_tid < 0:
            return None
        return self.sys.pt.table(pud_tid), pud_index(addr)

    def pte_table(self, pmd: PtRef, alloc: bool = False) -> int:
        """The pte table a pmd entry points at (``pte_offset_map``); allocates it if the
        pmd is none and *alloc* (``pte_alloc``). -1 if none or a huge pmd."""
        return self._lower(pmd.tid, pmd.idx, 1, alloc)

    def pte_offset_map(self, pmd: PtRef) -> tuple[npt.NDArray[np.uint64], int] | None:
        """``pte_offset_map()``: map the pte table under *pmd* without its lock (the
        caller relies on something else: HMM on the notifier sequence, a fault on
        re-checking the entry under the lock later).

        Counted as ``pgtable.pte_offset_map`` and a scheduling point of that name, once
        per table. Returns ``(table view, table id)`` or None if *pmd* does not point to a
        pte table."""
        tid = self._lower(pmd.tid, pmd.idx, 1, False)
        sys = self.sys
        sys.stats.add("pgtable.pte_offset_map")
        if sys.ls.has_hooks:
            sys.ls.schedule_point("pte_offset_map")
        if tid < 0:
            return None
        return sys.pt.table(tid), tid

    def pte_offset_map_lock(self, pmd: PtRef, alloc: bool = False) -> tuple[npt.NDArray[np.uint64], int] | None:
        """``pte_offset_map_lock()``: map and lock the pte table under *pmd*.

        Returns ``(table view, table id)`` with the table's split PTL held, or None if the
        pmd does not point to a pte table. Release with :meth:`pte_unmap_unlock`. Counted
        as ``pgtable.pte_offset_map`` and ``pgtable.pte_offset_map_lock``; taking the lock
        is a scheduling point named ``pte_offset_map_lock``."""
        tid = self.pte_table(pmd, alloc)
        if tid < 0:
            return None
        self.sys.ls.acquire(ptlock_ptr(tid), "ptl", WRITE, sleepable=False, where="pte_offset_map_lock")
        self.sys.stats.add("pgtable.pte_offset_map")
        self.sys.stats.add("pgtable.pte_offset_map_lock")
        return self.sys.pt.table(tid), tid

    def pte_unmap_unlock(self, tid: int) -> None:
        """``pte_unmap_unlock()``: release the PTL of pte table *tid*."""
        self.sys.ls.release(ptlock_ptr(tid), "ptl")

    def pmd_lock(self, pmd: PtRef) -> LockId:
        """``pmd_lock()`` (see :func:`pmd_lock`)."""
        return pmd_lock(self, pmd)

    def spin_lock(self, ptl: LockId) -> None:
        """``spin_lock()`` of a keyed page-table lock (see :func:`spin_lock`)."""
        spin_lock(self, ptl)

    def spin_unlock(self, ptl: LockId) -> None:
        """``spin_unlock()`` of a keyed page-table lock (see :func:`spin_unlock`)."""
        spin_unlock(self, ptl)

    def lookup_pte(self, addr: int) -> int:
        """The pte (or pmd/pud leaf) value mapping *addr*, 0 if none; no locking, for
        tests and debugging (``follow_pte`` without the lock)."""
        pud = self.pud_entry(addr)
        if pud is None:
            return 0
        e = int(pud[0][pud[1]])
        if pmd_none(e) or not pmd_present(e) or pmd_leaf(e):
            return e
        pmd = self.pmd_ref(addr)
        assert pmd is not None
        e = pmd.get()
        if pmd_none(e) or not pmd_present(e) or pmd_leaf(e):
            return e
        tid = self.pte_table(pmd)
        return int(self.sys.pt.table(tid)[pte_index(addr)])

    def __repr__(self) -> str:
        return f"MM({self.name}, {len(self._vmas)} vmas)"


# -- mmap_lock (include/linux/mmap_lock.h) ---------------------------------------------------
def mmap_read_lock(mm: MM) -> None:
    mm.mmap_lock.down_read()


def mmap_read_unlock(mm: MM) -> None:
    mm.mmap_lock.up_read()


def mmap_write_lock(mm: MM) -> None:
    mm.mmap_lock.down_write()


def mmap_write_unlock(mm: MM) -> None:
    mm.mmap_lock.up_write()


def mmap_assert_locked(mm: MM) -> None:
    """``mmap_assert_locked()``: the current thread holds mmap_lock (read or write)."""
    mm.mmap_lock.assert_held()


def mmap_assert_write_locked(mm: MM) -> None:
    mm.mmap_lock.assert_held(WRITE)

