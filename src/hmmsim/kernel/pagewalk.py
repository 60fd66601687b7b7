"""The generic page-table walker: ``walk_page_range(mm, start, end, ops, private)``.

Models ``include/linux/pagewalk.h`` and ``mm/pagewalk.c``. One function per level, all
with the same loop shape; a none entry goes to ``pte_hole``; otherwise the level's entry
callback runs, ``walk.action`` is honoured and the walk descends only if a lower-level
callback exists. A non-zero return stops the walk. VMA gaps are reported as
``pte_hole(start, end, -1, walk)`` with ``walk.vma`` None; ``test_walk`` returns 0 (walk
the VMA), 1 (skip it) or a negative errno (abort). Positive values only steer the walk and
never reach the caller.

The p4d level is folded (4-level paging), so a missing top-level entry is reported with
depth 0, a missing pud entry with depth 2 and a missing pmd entry with depth 3.

Every call, level visit and callback is counted in the machine's
:class:`~hmmsim.kernel.stats.Stats` (``walk_page_range``, ``walk.<level>_entry``,
``walk.pte_hole``, ...), so "walks per operation" means what it means in the kernel.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errno import EINVAL
from .huge_memory import split_huge_pmd, split_huge_pud
from .hugetlb import hugetlb_vma_lock_read, hugetlb_vma_unlock_read
from .locking import KEYED_LOCK_CLASSES
from .mm import MM, PtRef, mmap_assert_locked, mmap_assert_write_locked
from .page_types import (
    HPAGE_PMD_SIZE,
    PAGE_SIZE,
    PGDIR_SIZE,
    PMD_SIZE,
    PUD_SIZE,
    pgd_index,
    pmd_index,
    pte_index,
    pud_index,
)
from .pgtable import pmd_leaf, pmd_none, pmd_present, table_id
from .vma import VM_HUGETLB, VM_PFNMAP, Vma

__all__ = (
    "ACTION_AGAIN", "ACTION_CONTINUE", "ACTION_SUBTREE", "MmWalk", "MmWalkOps",
    "PGWALK_RDLOCK", "PGWALK_WRLOCK", "PGWALK_WRLOCK_VERIFY", "PageWalkAction",
    "walk_page_range", "walk_page_vma",
)


class PageWalkAction(enum.IntEnum):
    """``enum page_walk_action``: how a pud/pmd callback steers the descent."""

    ACTION_SUBTREE = 0
    ACTION_CONTINUE = 1
    ACTION_AGAIN = 2


ACTION_SUBTREE = PageWalkAction.ACTION_SUBTREE
ACTION_CONTINUE = PageWalkAction.ACTION_CONTINUE
ACTION_AGAIN = PageWalkAction.ACTION_AGAIN

PGWALK_RDLOCK = 0
PGWALK_WRLOCK = 1
PGWALK_WRLOCK_VERIFY = 2

EntryCb = Callable[[PtRef, int, int, "MmWalk"], int]


@dataclass(frozen=True, slots=True)
class MmWalkOps:
    """``struct mm_walk_ops``: optional callbacks (None = absent)."""

    pgd_entry: EntryCb | None = None
    p4d_entry: EntryCb | None = None
    pud_entry: EntryCb | None = None
    pmd_entry: EntryCb | None = None
    pte_entry: EntryCb | None = None
    pte_hole: Callable[[int, int, int, "MmWalk"], int] | None = None
    hugetlb_entry: Callable[[PtRef, int, int, int, "MmWalk"], int] | None = None
    test_walk: Callable[[int, int, "MmWalk"], int] | None = None
    pre_vma: Callable[[int, int, "MmWalk"], int] | None = None
    post_vma: Callable[["MmWalk"], None] | None = None
    walk_lock: int = PGWALK_RDLOCK


class MmWalk:
    """``struct mm_walk``: the walk's state, handed to every callback."""

    __slots__ = ("ops", "mm", "vma", "action", "private")

    def __init__(self, ops: MmWalkOps, mm: MM, private: Any) -> None:
        self.ops = ops
        self.mm = mm
        self.vma: Vma | None = None
        self.action = ACTION_SUBTREE
        self.private = private


def _addr_end(addr: int, end: int, size: int) -> int:
    """``pXd_addr_end()``: the next boundary of *size* after *addr*, capped at *end*."""
    boundary = (addr + size) & ~(size - 1)
    return boundary if boundary - 1 < end - 1 else end


def walk_pmd_range(pmd_tid: int, addr: int, end: int, walk: MmWalk) -> int:
    """``walk_pmd_range()``: the pmd entries of one pmd table under ``[addr, end)``."""
    mm = walk.mm
    ops = walk.ops
    stats = mm.sys.stats
    pt = mm.sys.pt
    tbl = pt.table(pmd_tid)
    stats.add("walk.pmd_table")
    err = 0
    while True:
        idx = pmd_index(addr)
        nxt = _addr_end(addr, end, PMD_SIZE)
        ref = PtRef(tbl, idx, pmd_tid, mm)
        while True:  # "again:"
            e = int(tbl[idx])
            if e == 0:
                if ops.pte_hole is not None:
                    stats.add("walk.pte_hole")
                    err = ops.pte_hole(addr, nxt, 3, walk)
                break
            walk.action = ACTION_SUBTREE
            if ops.pmd_entry is not None:
                stats.add("walk.pmd_entry")
                err = ops.pmd_entry(ref, addr, nxt, walk)
                if err:
                    break
            if walk.action == ACTION_AGAIN:
                continue
            e = int(tbl[idx])
            if ((walk.vma is None and (not pmd_present(e) or pmd_leaf(e)))
                    or walk.action == ACTION_CONTINUE or ops.pte_entry is None):
                break
            if walk.vma is not None:
                split_huge_pmd(walk.vma, ref, addr)
                e = int(tbl[idx])
                if pmd_none(e) or not pmd_present(e) or pmd_leaf(e):
                    continue
            err = walk_pte_range(ref, addr, nxt, walk)
            break
        if err:
            return err
        addr = nxt
        if addr == end:
            return 0


def walk_pte_range(pmd: PtRef, addr: int, end: int, walk: MmWalk) -> int:
    """``walk_pte_range()``: call ``pte_entry`` for each pte, under the pte lock."""
    mm = walk.mm
    got = mm.pte_offset_map_lock(pmd)
    if got is None:
        return 0
    tbl, tid = got
    err = 0
    try:
        mm.sys.stats.add("walk.pte_table")
        while True:
            idx = pte_index(addr)
            mm.sys.stats.add("walk.pte_entry")
            assert walk.ops.pte_entry is not None
            err = walk.ops.pte_entry(PtRef(tbl, idx, tid, mm), addr, addr + PAGE_SIZE, walk)
            if err or addr >= end - PAGE_SIZE:
                break
            addr += PAGE_SIZE
    finally:
        mm.pte_unmap_unlock(tid)
    return err


def walk_pud_range(pud_tid: int, addr: int, end: int, walk: MmWalk) -> int:
    """``walk_pud_range()``: the pud entries of one pud table under ``[addr, end)``."""
    mm = walk.mm
    ops = walk.ops
    stats = mm.sys.stats
    tbl = mm.sys.pt.table(pud_tid)
    stats.add("walk.pud_table")
    err = 0
    while True:
        idx = pud_index(addr)
        nxt = _addr_end(addr, end, PUD_SIZE)
        ref = PtRef(tbl, idx, pud_tid, mm)
        while True:  # "again:"
            e = int(tbl[idx])
            if e == 0:
                if ops.pte_hole is not None:
                    stats.add("walk.pte_hole")
                    err = ops.pte_hole(addr, nxt, 2, walk)
                break
            walk.action = ACTION_SUBTREE
            if ops.pud_entry is not None:
                stats.add("walk.pud_entry")
                err = ops.pud_entry(ref, addr, nxt, walk)
                if err:
                    break
            if walk.action == ACTION_AGAIN:
                continue
            e = int(tbl[idx])
            if ((walk.vma is None and (not pmd_present(e) or pmd_leaf(e)))
                    or walk.action == ACTION_CONTINUE
                    or (ops.pmd_entry is None and ops.pte_entry is None)):
                break
            if walk.vma is not None and pmd_leaf(e):
                split_huge_pud(walk.vma, ref, addr)
            if int(tbl[idx]) == 0:
                continue
            err = walk_pmd_range(table_id(int(tbl[idx])), addr, nxt, walk)
            break
        if err:
            return err
        addr = nxt
        if addr == end:
            return 0


def walk_pgd_range(addr: int, end: int, walk: MmWalk) -> int:
    """``walk_pgd_range()`` + ``walk_p4d_range()`` (the p4d level is folded)."""
    mm = walk.mm
    ops = walk.ops
    stats = mm.sys.stats
    tbl = mm.sys.pt.table(mm.pgd)
    stats.add("walk.pgd_table")
    err = 0
    while True:
        idx = pgd_index(addr)
        nxt = _addr_end(addr, end, PGDIR_SIZE)
        e = int(tbl[idx])
        if e == 0:
            if ops.pte_hole is not None:
                stats.add("walk.pte_hole")
                err = ops.pte_hole(addr, nxt, 0, walk)
        else:
            ref = PtRef(tbl, idx, mm.pgd, mm)
            if ops.pgd_entry is not None:
                err = ops.pgd_entry(ref, addr, nxt, walk)
            if not err and ops.p4d_entry is not None:
                err = ops.p4d_entry(ref, addr, nxt, walk)
            if not err and (ops.pud_entry or ops.pmd_entry or ops.pte_entry):
                err = walk_pud_range(table_id(e), addr, nxt, walk)
        if err:
            return err
        addr = nxt
        if addr == end:
            return 0


def walk_hugetlb_range(addr: int, end: int, walk: MmWalk) -> int:
    """``walk_hugetlb_range()``: one ``hugetlb_entry`` per huge page (2 MiB pages at the
    pmd level); ``pte_hole`` (depth -1) where no page table covers the huge page."""
    mm = walk.mm
    ops = walk.ops
    assert ops.hugetlb_entry is not None
    hmask = ~(HPAGE_PMD_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
    err = 0
    # hugetlb_vma_lock_read(): keeps shared pmds from going away during the walk
    vma = walk.vma
    assert vma is not None
    hugetlb_vma_lock_read(vma)
    try:
        while True:
            nxt = min((addr & hmask) + HPAGE_PMD_SIZE, end)
            ref = mm.pmd_ref(addr & hmask)
            if ref is not None:
                mm.sys.stats.add("walk.hugetlb_entry")
                err = ops.hugetlb_entry(ref, hmask, addr, nxt, walk)
            elif ops.pte_hole is not None:
                mm.sys.stats.add("walk.pte_hole")
                err = ops.pte_hole(addr, nxt, -1, walk)
            if err:
                return err
            addr = nxt
            if addr == end:
                return 0
    finally:
        hugetlb_vma_unlock_read(vma)


def walk_page_test(start: int, end: int, walk: MmWalk) -> int:
    """``walk_page_test()``: ``test_walk``, or skip VM_PFNMAP VMAs (reporting a hole)."""
    ops = walk.ops
    assert walk.vma is not None
    if ops.test_walk is not None:
        walk.mm.sys.stats.add("walk.test_walk")
        return ops.test_walk(start, end, walk)
    if walk.vma.vm_flags & VM_PFNMAP:
        err = 1
        if ops.pte_hole is not None:
            err = ops.pte_hole(start, end, -1, walk)
        return err if err else 1
    return 0


def __walk_page_range(start: int, end: int, walk: MmWalk) -> int:
    ops = walk.ops
    vma = walk.vma
    assert vma is not None
    err = 0
    if ops.pre_vma is not None:
        err = ops.pre_vma(start, end, walk)
        if err:
            return err
    if vma.vm_flags & VM_HUGETLB:
        if ops.hugetlb_entry is not None:
            err = walk_hugetlb_range(start, end, walk)
    else:
        err = walk_pgd_range(start, end, walk)
    if ops.post_vma is not None:
        ops.post_vma(walk)
    return err


def _assert_walk_lock(mm: MM, walk_lock: int) -> None:
    if walk_lock == PGWALK_RDLOCK:
        mmap_assert_locked(mm)
    else:
        mmap_assert_write_locked(mm)


def walk_page_range(mm: MM, start: int, end: int, ops: MmWalkOps, private: Any) -> int:
    """Walk the page tables of *mm* over ``[start, end)`` calling *ops*.

    Models ``mm/pagewalk.c:walk_page_range()``. The caller holds mmap_lock (read for
    ``PGWALK_RDLOCK``, write otherwise).

    :param mm: ``struct mm_struct *``
    :param start: ``unsigned long``, page aligned
    :param end: ``unsigned long``, exclusive
    :param ops: ``const struct mm_walk_ops *``
    :param private: ``void *``, handed to callbacks as ``walk.private``
    :return: 0, ``-EINVAL`` if ``start >= end``, or the first non-zero (negative, or a
        callback's positive) return of a callback.

    The walk leaves the locks as it found them (rule ``walk-leaked-lock`` of
    :mod:`hmmsim.kernel.locking`), except folio locks, which a callback may hand to the
    caller (``migrate_vma_collect_pmd``). Notifier brackets may span walks (the unified
    walk opens one at its first capture and closes it after its retry loop): their
    balance is checked by the callers' scopes (``hmm_range_fault``, ``migrate_vma_setup``).
    """
    if start >= end:
        return -EINVAL
    _assert_walk_lock(mm, ops.walk_lock)
    with mm.sys.ls.walk_scope("walk_page_range", KEYED_LOCK_CLASSES):
        return _walk_page_range(mm, start, end, ops, private)


def _walk_page_range(mm: MM, start: int, end: int, ops: MmWalkOps, private: Any) -> int:
    stats = mm.sys.stats
    stats.add("walk_page_range")
    walk = MmWalk(ops, mm, private)
    vma = mm.find_vma(start)
    err = 0
    while True:
        if vma is None:
            walk.vma = None
            nxt = end
            if ops.pte_hole is not None:
                stats.add("walk.pte_hole")
                err = ops.pte_hole(start, nxt, -1, walk)
        elif start < vma.vm_start:
            walk.vma = None
            nxt = min(end, vma.vm_start)
            if ops.pte_hole is not None:
                stats.add("walk.pte_hole")
                err = ops.pte_hole(start, nxt, -1, walk)
        else:
            walk.vma = vma
            nxt = min(end, vma.vm_end)
            vma = mm.find_vma(vma.vm_end)
            err = walk_page_test(start, nxt, walk)
            if err > 0:
                err = 0
                start = nxt
                if start < end:
                    continue
                break
            if err < 0:
                break
            err = __walk_page_range(start, nxt, walk)
        if err:
            break
        start = nxt
        if start >= end:
            break
    return err


def walk_page_vma(vma: Vma, ops: MmWalkOps, private: Any) -> int:
    """``walk_page_vma()``: walk all of one VMA."""
    mm = vma.vm_mm
    _assert_walk_lock(mm, ops.walk_lock)
    with mm.sys.ls.walk_scope("walk_page_vma", KEYED_LOCK_CLASSES):
        return _walk_page_vma(vma, ops, private)


def _walk_page_vma(vma: Vma, ops: MmWalkOps, private: Any) -> int:
    mm = vma.vm_mm
    mm.sys.stats.add("walk_page_range")
    walk = MmWalk(ops, mm, private)
    walk.vma = vma
    err = walk_page_test(vma.vm_start, vma.vm_end, walk)
    if err > 0:
        return 0
    if err < 0:
        return err
    return __walk_page_range(vma.vm_start, vma.vm_end, walk)

