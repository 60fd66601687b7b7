"""dmirror's migration loop over many whole-THP windows at once (7.3).

``dmirror_migrate_to_device()`` and ``dmirror_migrate_to_system()`` run one
``migrate_vma_setup`` / ``alloc_and_copy`` / ``migrate_vma_pages`` / ``finalize_and_map`` /
``migrate_vma_finalize`` round per 2 MiB window (:func:`.dmirror_devmem._migrate_windows`).
When a window is one PMD-mapped THP (to the device) or one device-private PMD (back), the
round always does the same thing: the PMD becomes a migration entry, a new THP is
allocated and filled, the PMD maps it, the old folio is freed. This module does that for
a run of such windows with whole-array operations, with exactly the effects the
per-window rounds have, in their order where it matters:

* the state of every ``struct page`` of the folios involved, the PMDs, dmirror's page
  table and free lists, the allocator (each window allocates before it frees, so a later
  window may get the block an earlier one freed: :func:`_alloc_blocks_in_turn` replays
  that), the data;
* every counter a round counts (walks, locks, PMD writes, migration steps, frees), the
  ``MMU_NOTIFY_MIGRATE`` invalidation of each window (made for real, in window order);
* the return values (``cpages``).

It applies only where nothing else could observe a window half done or tell the order of
the steps apart: no simulated thread or scheduling hook, no trace probe, no FAIL_ALLOC
pending, every notifier of the range dmirror's own (which ignores its MIGRATE events),
folios mapped by this one PMD only, no pins, no waiters, the device's free THP list and
free memory enough for the run. Anything else, or the first window of a command, goes
through the per-window rounds. ``tests/drivers/test_dmirror_batch.py`` runs random
machines both ways and compares every array, table, list and counter.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..kernel.memremap import PGMAP_KIND_PRIVATE, pgmap_kinds
from ..kernel.mmu_notifier import MmuNotifierEvent, notify_range
from ..kernel.page_types import HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PAGE_SHIFT
from ..kernel.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    _PAGE_UFFD_WP,
    _SWP_TYPE_SHIFT,
    PTE_PFN_MASK,
    SWP_DEVICE_READ,
    SWP_DEVICE_WRITE,
)
from ..kernel.physmem import (
    PG_anon,
    PG_anon_exclusive,
    PG_data,
    PG_dirty,
    PG_head,
    PG_hugetlb,
    PG_locked,
    PG_reserved,
    PG_swapbacked,
    PG_swapcache,
    PG_uptodate,
)
from ..kernel.rmap import AnonVma
from ..kernel.vma import VM_READ, vma_is_anonymous
from .dmirror_core import DPT_XA_TAG_WRITE
from .dmirror_mirror import dmirror_interval_invalidate

if TYPE_CHECKING:
    from ..kernel.mm import MM
    from ..kernel.physmem import PhysMem
    from ..kernel.system import System
    from ..kernel.vma import Vma
    from .dmirror_core import Dmirror

__all__ = ("BATCH_MIN_WINDOWS", "dmirror_batch_to_device", "dmirror_batch_to_system", "dmirror_batch_windows",
           "dmirror_thp_batch_to_device", "dmirror_thp_batch_to_system")

_U = np.uint64
#: ``folio_migrate_flags()``: the flags a migration carries to the new folio
_KEEP = np.uint32(PG_anon | PG_anon_exclusive | PG_dirty | PG_swapbacked | PG_uptodate)
_AE = np.uint32(PG_anon | PG_anon_exclusive)
_SWP_BITS = _U(_PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP)
_OFFS = np.arange(HPAGE_PMD_NR, dtype=np.int64)
#: shorter runs are left to the per-window rounds (the batch's fixed cost)
BATCH_MIN_WINDOWS = 2
#: switch for the differential tests (False: every window goes through the rounds)
ENABLED = True

# the counters one round counts, per window (the notifier's own come from the real calls)
_ROUND_STATS_TO_DEVICE = (
    ("walk_page_range", 1), ("walk.pgd_table", 1), ("walk.pud_table", 1), ("walk.pmd_table", 1),
    ("walk.pmd_entry", 1), ("migrate.set_pmd_migration_entry", 1), ("migrate_vma.collect_huge_pmd", 1),
    ("migrate_vma.setup", 1), ("migrate.remove_migration_pmd", 1), ("migrate.remove_migration_ptes", 1),
    ("migrate_vma.finalize", 1), ("pgtable.set_pmd", 3), ("page.free", 1),
)
_ROUND_LOCKS_TO_DEVICE = (("pmd_lock", 1), ("folio_lock", 2), ("dmirror_device_lock", 1), ("dmirror_mutex", 1))
_ROUND_STATS_TO_SYSTEM = (*_ROUND_STATS_TO_DEVICE, ("memremap.page_free", 1))
_ROUND_LOCKS_TO_SYSTEM = (("pmd_lock", 1), ("folio_lock", 2), ("dmirror_device_lock", 1))


def _quiet(dmirror: "Dmirror", mm: "MM", start: int, end: int) -> bool:
    """Nothing could tell a batch from the rounds: no hooks, no probes, no FAIL_ALLOC, and
    every notifier of ``[start, end)`` is one of this device's dmirrors (its invalidate
    returns at once for the device's own MIGRATE events)."""
    sys = dmirror.sys
    if not ENABLED or sys.ls.has_hooks or sys.trace.active() or dmirror.flags:
        return False
    if sys.profile.hmm_migrate_on_fault or not dmirror.mdevice.is_private:
        return False
    subs = mm.notifier_subscriptions
    if subs is not None:
        if subs.list or subs.deferred_list:
            return False
        for sub in subs.overlapping(start, end - 1):
            if (sub.ops is None or sub.ops.invalidate is not dmirror_interval_invalidate
                    or sub.owner.mdevice is not dmirror.mdevice):
                return False
    return not any(c.remove for c in dmirror.mdevice.chunks)


def _pmd_run(mm: "MM", addr: int, k: int) -> list[tuple[npt.NDArray[np.uint64], int, int]]:
    """The PMD entries of the *k* 2 MiB windows from *addr*: ``(table view, first index,
    count)`` per PMD table, stopping at a missing table."""
    out = []
    while k > 0:
        ref = mm.pmd_ref(addr)
        if ref is None:
            break
        n = min(k, 512 - ref.idx)
        out.append((ref.tbl, ref.idx, n))
        addr += n * HPAGE_PMD_SIZE
        k -= n
    return out


def _trim(run: list[tuple[npt.NDArray[np.uint64], int, int]], n: int) -> list[tuple[npt.NDArray[np.uint64], int, int]]:
    """The first *n* entries of *run* (a :func:`_pmd_run` or :func:`_pte_run`)."""
    out = []
    for t, i, m in run:
        if n <= 0:
            break
        out.append((t, i, min(m, n)))
        n -= m
    return out


def _pmds(run: list[tuple[npt.NDArray[np.uint64], int, int]]) -> npt.NDArray[np.uint64]:
    return np.concatenate([t[i:i + n] for t, i, n in run]) if run else np.zeros(0, np.uint64)


def _set_pmds(run: list[tuple[npt.NDArray[np.uint64], int, int]], vals: npt.NDArray[np.uint64]) -> None:
    at = 0
    for t, i, n in run:
        t[i:i + n] = vals[at:at + n]
        at += n


def _prefix(ok: npt.NDArray[np.bool_]) -> int:
    """The number of leading True entries."""
    bad = (~ok).nonzero()[0]
    return int(bad[0]) if len(bad) else len(ok)


def _only_this_vma(mem: "PhysMem", heads: npt.NDArray[np.int64], vma: "Vma", addrs: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Per folio: its anon_vma links *vma* only and its index puts it at *addrs* (the rmap
    walk of the finalize step then finds exactly this PMD)."""
    mids = mem.mapping[heads]
    ok = (vma.vm_start + ((mem.index[heads] - vma.vm_pgoff) << PAGE_SHIFT)) == addrs
    for mid in np.unique(mids).tolist():
        obj = mem.mapping_obj(mid) if mid else None
        if not (isinstance(obj, AnonVma) and len(obj.vmas) == 1 and vma in obj.vmas):
            ok &= mids != mid
    return ok


def _alloc_blocks_in_turn(mem: "PhysMem", freed: npt.NDArray[np.int64]) -> npt.NDArray[np.int64] | None:
    """The heads ``folio_alloc(order 9)`` hands out to windows 1..k when window i allocates
    one THP and then frees the folio at ``freed[i]`` (the lowest free pageblock each
    time, a freed one included); None if some allocation would fail."""
    k = len(freed)
    if mem.nr_free - mem.charged < HPAGE_PMD_NR:
        return None
    heap = np.flatnonzero(mem._block_free == HPAGE_PMD_NR).tolist()  # already sorted
    if len(heap) == 0:
        return None
    heapq.heapify(heap)
    out = np.empty(k, np.int64)
    for i, f in enumerate((freed // HPAGE_PMD_NR).tolist()):
        if not heap:
            return None
        out[i] = heapq.heappop(heap)
        heapq.heappush(heap, f)
    return out * HPAGE_PMD_NR


def _pages(heads: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Every pfn of the 2 MiB folios at *heads*, folio by folio (k x 512)."""
    return heads[:, None] + _OFFS


def _take_thps(mem: "PhysMem", heads: npt.NDArray[np.int64]) -> None:
    """``folio_alloc(order 9)`` without zeroing of each of *heads* (chosen by
    :func:`_alloc_blocks_in_turn`): what :meth:`~hmmsim.kernel.physmem.PhysMem.alloc_folio`
    does to each."""
    pfns = _pages(heads).reshape(-1)
    mem._take(pfns, False, pfns)
    p2 = _pages(heads)
    mem.head_off[p2] = _OFFS.astype(np.int32)
    mem.order[heads] = HPAGE_PMD_ORDER
    mem.flags[heads] |= np.uint32(PG_head)
    mem.refcount[p2[:, 1:]] = 0


def _free_thps(sys: "System", heads: npt.NDArray[np.int64]) -> None:
    """The last ``folio_put()`` of each system THP of *heads*: back to the allocator."""
    pfns = _pages(heads).reshape(-1)
    sys.mem._free_run(pfns, pfns)


def _copy_thps(mem: "PhysMem", dst: npt.NDArray[np.int64], src: npt.NDArray[np.int64]) -> None:
    """``folio_copy()`` of each pair of THPs, window by window (:meth:`PhysMem.copy_pages`
    of their pages, in order: runs of windows whose folios follow each other on both sides
    are one ``memmove``). A destination may be the source of an earlier window (freed,
    then allocated again), never of a later one, so copying in window order reads every
    source before it is overwritten, as the rounds do."""
    mem.copy_pages(_pages(dst).reshape(-1), _pages(src).reshape(-1))


def _count_rounds(sys: "System", k: int, stats: tuple[tuple[str, int], ...],
                  locks: tuple[tuple[str, int], ...]) -> None:
    for key, n in stats:
        sys.stats.add(key, n * k)
    for klass, n in locks:
        sys.ls.count_acquisitions(klass, n * k)


def _pgmap_use(sys: "System", pfns: npt.NDArray[np.int64], sign: int) -> None:
    """Each pagemap's count of folios in use, up (1) or down (-1) by its folios in *pfns*."""
    for pid, cnt in zip(*np.unique(sys.mem.pgmap[pfns], return_counts=True)):
        sys.pgmaps[int(pid) - 1].nr_used += sign * int(cnt)


def _device_freed(sys: "System", pages: npt.NDArray[np.int64], heads: npt.NDArray[np.int64],
                  fl: npt.NDArray[np.uint32], back: npt.NDArray[np.int64]) -> None:
    """The last reference of each device folio at *heads* (*pages*: all their pages,
    whose flags were *fl*) is gone: ``free_zone_device_folio()`` clears the anon state,
    then the driver's ``page_free`` lets the backing folio *back* go (the caller frees
    it) and counts the pages free (the caller puts the folios on its free list)."""
    mem = sys.mem
    mem.flags[pages] = fl & ~np.uint32(PG_anon | PG_anon_exclusive | PG_dirty | PG_locked)
    mem.mapping[pages] = 0
    mem.index[pages] = 0
    mem.refcount[heads] = 0
    _pgmap_use(sys, heads, -1)
    mem.zone_device_data[heads] = 0


def _owned_private(sys: "System", mdevice: object, pids: npt.NDArray[np.int16]) -> npt.NDArray[np.bool_]:
    """Per pgmap id: a device-private pagemap of *mdevice* (what SELECT_DEVICE_PRIVATE
    with this owner collects)."""
    ok = np.zeros(len(sys.pgmaps) + 1, np.bool_)
    for i, pg in enumerate(sys.pgmaps, 1):
        ok[i] = pg is not None and pg.owner is mdevice
    return ok[pids] & (pgmap_kinds(sys)[pids] == PGMAP_KIND_PRIVATE)


def _alloc_small_in_turn(mem: "PhysMem", freed: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The pages ``alloc_pages_bulk()`` hands out to windows 1..k when window i takes 512
    pages and then frees ``freed[i*512:(i+1)*512]``: the allocator itself, window after
    window (its choice depends on what is free then)."""
    out = np.empty(len(freed), np.int64)
    for i in range(0, len(freed), HPAGE_PMD_NR):
        got = mem.alloc_pages_bulk(HPAGE_PMD_NR, zero=False)
        assert len(got) == HPAGE_PMD_NR
        out[i:i + HPAGE_PMD_NR] = got
        mem.free_pages(np.sort(freed[i:i + HPAGE_PMD_NR]))
    return out


def _notify_each(mm: "MM", addr: int, k: int, owner: object) -> None:
    """Each window's ``MMU_NOTIFY_MIGRATE`` invalidation around its collection."""
    for i in range(k):
        a = addr + i * HPAGE_PMD_SIZE
        with notify_range(MmuNotifierEvent.MMU_NOTIFY_MIGRATE, mm, a, a + HPAGE_PMD_SIZE, owner=owner):
            pass


def _window_count(dmirror: "Dmirror", vma: "Vma", addr: int, end: int, aligned: bool = True) -> int:
    """How many whole 2 MiB windows from *addr* the batch may look at (0: none)."""
    if (aligned and addr & (HPAGE_PMD_SIZE - 1)) or not vma.vm_flags & VM_READ or not vma_is_anonymous(vma):
        return 0
    k = (min(end, vma.vm_end) - addr) // HPAGE_PMD_SIZE
    if k < BATCH_MIN_WINDOWS or not _quiet(dmirror, vma.vm_mm, addr, addr + k * HPAGE_PMD_SIZE):
        return 0
    return k


# -- to the device --------------------------------------------------------------------------------------
def dmirror_thp_batch_to_device(dmirror: "Dmirror", vma: "Vma", addr: int, end: int) -> int:
    """The rounds of ``dmirror_migrate_to_device()`` for the whole-THP windows from
    *addr* (2 MiB aligned, in *vma*): each PMD-mapped THP moves to a device THP
    (``free_folios``) backed by a new system THP, mapped by a device-private PMD.
    Returns the number of windows done (0: none, the caller goes on with a round)."""
    k = _window_count(dmirror, vma, addr, end) if dmirror.sys.profile.device_private_thp else 0
    if k == 0:
        return 0
    mm = vma.vm_mm
    sys = dmirror.sys
    mem = sys.mem
    mdevice = dmirror.mdevice
    k = min(k, len(mdevice.free_folios))
    run = _pmd_run(mm, addr, k)
    e = _pmds(run)
    k = len(e)
    if k < BATCH_MIN_WINDOWS:
        return 0
    addrs = addr + np.arange(k, dtype=np.int64) * HPAGE_PMD_SIZE
    # windows that are one exclusive, unpinned, unlocked anon THP mapped by this PMD
    ok = ((e & _U(_PAGE_PRESENT)) != 0) & ((e & _U(_PAGE_PSE)) != 0)  # (not a NUMA-hint protnone PMD)
    h = np.where(ok, ((e & _U(PTE_PFN_MASK)) >> _U(12)).astype(np.int64), 0)
    ok &= (h < mem.ram_pages) & (h != mem.huge_zero_pfn)
    hh = np.where(ok, h, 0)
    fl = mem.flags[hh]
    ok &= ((mem.head_off[hh] == 0) & (mem.order[hh] == HPAGE_PMD_ORDER) & (mem.pgmap[hh] == 0)
           & ((fl & np.uint32(PG_anon)) != 0) & ((fl & np.uint32(PG_locked | PG_swapcache | PG_hugetlb)) == 0)
           & (mem.refcount[hh] == 1) & (mem.entire_mapcount[hh] == 1))
    k = _prefix(ok)
    if k >= BATCH_MIN_WINDOWS:
        h, e, addrs = h[:k], e[:k], addrs[:k]
        k = _prefix((mem.mapcount[_pages(h)] == 0).all(axis=1) & _only_this_vma(mem, h, vma, addrs))
    if k < BATCH_MIN_WINDOWS:
        return 0
    h, e, addrs = h[:k], e[:k], addrs[:k]
    r = _alloc_blocks_in_turn(mem, h)
    if r is None:
        return 0
    run = _trim(run, k)
    _notify_each(mm, addr, k, mdevice)

    # collection: set_pmd_migration_entry() of each source (what reaches the new folio)
    write = (e & _U(_PAGE_RW)) != 0
    ph = _pages(h)
    fl_h = mem.flags[ph]
    ae = (fl_h[:, 0] & _AE) == _AE
    fl_h[ae] &= ~np.uint32(PG_anon_exclusive)
    fl_h[:, 0] |= np.where((e & _U(_PAGE_DIRTY)) != 0, np.uint32(PG_dirty), np.uint32(0))
    # the device folios (dmirror_devmem_alloc_page: off free_folios, zone_device_folio_init)
    taken = mdevice.free_folios[-k:]
    del mdevice.free_folios[-k:]
    d = np.array(taken[::-1], np.int64)
    mdevice.calloc += k * HPAGE_PMD_NR
    pd = _pages(d)
    _pgmap_use(sys, d, 1)
    mem.order[pd] = 0
    mem.mapping[pd] = 0
    mem.head_off[pd] = _OFFS.astype(np.int32)
    mem.order[d] = HPAGE_PMD_ORDER
    fd = (mem.flags[pd] & ~np.uint32(PG_head)) | (fl_h & _KEEP)  # + folio_migrate_mapping()
    fd[:, 0] = (fd[:, 0] | np.uint32(PG_head)) & ~np.uint32(PG_locked)  # locked, then unlocked
    # remove_migration_pmd(): AnonExclusive unless the entry was plainly readable
    fd = np.where((write | ae)[:, None], fd | np.uint32(PG_anon_exclusive), fd & ~np.uint32(PG_anon_exclusive))
    mem.flags[pd] = fd
    mem.refcount[pd] = 0
    mem.refcount[d] = 1  # the mapping's (the allocation's went at finalize)
    mem.entire_mapcount[d] += 1
    mem.mapping[d] = mem.mapping[h]
    mem.index[pd] = mem.index[ph]
    mem.zone_device_data[d] = r
    # the sources go back to the allocator, then the backing THPs come off it (a window
    # may take the block an earlier one freed); the data moves
    _copy_thps(mem, r, h)
    _free_thps(sys, h)
    _take_thps(mem, r)
    mem.flags[_pages(r)] |= np.uint32(PG_data)
    mdevice.backing_owner[r] = _owner_id(dmirror)
    # the device-private PMDs and dmirror's page table
    typ = np.where(write, _U(SWP_DEVICE_WRITE), _U(SWP_DEVICE_READ))
    soft = np.where((e & _U(_PAGE_SOFT_DIRTY)) != 0, _U(_PAGE_SWP_SOFT_DIRTY), _U(0))
    uffd = np.where((e & _U(_PAGE_UFFD_WP)) != 0, _U(_PAGE_SWP_UFFD_WP), _U(0))
    _set_pmds(run, (typ << _U(_SWP_TYPE_SHIFT)) | (d.astype(np.uint64) << _U(12)) | _U(_PAGE_PSE) | soft | uffd)
    tags = np.where(write, DPT_XA_TAG_WRITE, 0)
    vals = ((_pages(r) << 2) | tags[:, None]).reshape(-1)
    dmirror.pt.store_range(addr >> PAGE_SHIFT, vals)
    _count_rounds(sys, k, _ROUND_STATS_TO_DEVICE, _ROUND_LOCKS_TO_DEVICE)
    return k


# -- back to system memory ---------------------------------------------------------------------------
def dmirror_thp_batch_to_system(dmirror: "Dmirror", vma: "Vma", addr: int, end: int) -> int:
    """The rounds of ``dmirror_migrate_to_system()`` for the windows from *addr* that are
    one device-private PMD of this device each: every device THP moves to a new system
    THP mapped by a present PMD, and the device THP and its backing THP are freed.
    Returns the number of windows done (each counts one migrated entry in ``cpages``)."""
    k = _window_count(dmirror, vma, addr, end) if dmirror.sys.profile.device_private_thp else 0
    if k == 0:
        return 0
    mm = vma.vm_mm
    sys = dmirror.sys
    mem = sys.mem
    mdevice = dmirror.mdevice
    run = _pmd_run(mm, addr, k)
    e = _pmds(run)
    k = len(e)
    if k < BATCH_MIN_WINDOWS:
        return 0
    addrs = addr + np.arange(k, dtype=np.int64) * HPAGE_PMD_SIZE
    typ = e >> _U(_SWP_TYPE_SHIFT)
    ok = (((e & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) == 0) & ((e & _U(_PAGE_PSE)) != 0)
          & ((typ == _U(SWP_DEVICE_READ)) | (typ == _U(SWP_DEVICE_WRITE))))
    d = np.where(ok, ((e >> _U(12)) & _U((1 << 40) - 1)).astype(np.int64), 0)
    ok &= (d >= mem.ram_pages) & (d < mem.max_pfn)
    dd = np.where(ok, d, 0)
    fl = mem.flags[dd]
    rr = mem.zone_device_data[dd].astype(np.int64)
    ok &= (_owned_private(sys, mdevice, mem.pgmap[dd]) & (mem.head_off[dd] == 0) & (mem.order[dd] == HPAGE_PMD_ORDER)
           & ((fl & np.uint32(PG_anon)) != 0) & ((fl & np.uint32(PG_locked)) == 0)
           & (mem.refcount[dd] == 1) & (mem.entire_mapcount[dd] == 1)
           & (rr > 0) & (rr < mem.ram_pages))
    rr = np.where(ok, rr, 0)
    ok &= ((mem.order[rr] == HPAGE_PMD_ORDER) & (mem.head_off[rr] == 0) & (mem.refcount[rr] == 1)
           & (mem.pgmap[rr] == 0))
    k = _prefix(ok)
    if k >= BATCH_MIN_WINDOWS:
        d, e, addrs, rr = d[:k], e[:k], addrs[:k], rr[:k]
        k = _prefix((mem.mapcount[_pages(d)] == 0).all(axis=1) & _only_this_vma(mem, d, vma, addrs))
    if k < BATCH_MIN_WINDOWS:
        return 0
    d, e, addrs, r = d[:k], e[:k], addrs[:k], rr[:k]
    s = _alloc_blocks_in_turn(mem, r)
    if s is None:
        return 0
    run = _trim(run, k)
    _notify_each(mm, addr, k, mdevice)

    write = (e >> _U(_SWP_TYPE_SHIFT)) == _U(SWP_DEVICE_WRITE)
    pd = _pages(d)
    fl_d = mem.flags[pd]
    ae = (fl_d[:, 0] & _AE) == _AE
    fl_d[ae] &= ~np.uint32(PG_anon_exclusive)  # set_pmd_migration_entry()
    # the device folios: free_zone_device_folio(), then dmirror_devmem_free()
    mapping_d = mem.mapping[d].copy()
    index_d = mem.index[pd]
    mem.entire_mapcount[d] -= 1
    _device_freed(sys, pd, d, fl_d, r)
    mdevice.backing_owner[r] = 0
    mdevice.cfree += k * HPAGE_PMD_NR
    mdevice.free_folios.extend(d.tolist())
    # the backing THPs go back to the allocator, the new THPs come off it, the data moves
    _copy_thps(mem, s, r)
    _free_thps(sys, r)
    _take_thps(mem, s)
    ps = _pages(s)
    fs = mem.flags[ps] | np.uint32(PG_data) | (fl_d & _KEEP)  # + folio_migrate_mapping()
    fs = np.where((write | ae)[:, None], fs | np.uint32(PG_anon_exclusive), fs & ~np.uint32(PG_anon_exclusive))
    mem.flags[ps] = fs
    mem.mapping[s] = mapping_d
    mem.index[ps] = index_d
    mem.refcount[s] = 1
    mem.entire_mapcount[s] += 1
    # remove_migration_pmd(): present, old, clean PMDs with the VMA's protection
    prot = _U(vma.vm_page_prot & ~(_PAGE_RW | _PAGE_ACCESSED))
    pmde = (((s.astype(np.uint64) << _U(12)) & _U(PTE_PFN_MASK)) | prot | _U(_PAGE_PSE)
            | np.where(write, _U(_PAGE_RW), _U(0))
            | np.where((e & _U(_PAGE_SWP_SOFT_DIRTY)) != 0, _U(_PAGE_SOFT_DIRTY), _U(0))
            | np.where((e & _U(_PAGE_SWP_UFFD_WP)) != 0, _U(_PAGE_UFFD_WP), _U(0)))
    _set_pmds(run, pmde)
    dmirror.pt.erase_range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + k * HPAGE_PMD_NR - 1)
    _count_rounds(sys, k, _ROUND_STATS_TO_SYSTEM, _ROUND_LOCKS_TO_SYSTEM)
    return k


# -- 4 KiB pages ---------------------------------------------------------------------------------------
def _pte_run(mm: "MM", addr: int, n: int) -> list[tuple[npt.NDArray[np.uint64], int, int]]:
    """The pte entries of the *n* pages from *addr*: ``(table view, first index, count)``
    per pte table, stopping at a PMD without a pte table."""
    out = []
    while n > 0:
        ref = mm.pmd_ref(addr)
        e = ref.get() if ref is not None else 0
        if not e or not e & _PAGE_PRESENT or e & _PAGE_PSE:
            break
        i0 = (addr >> PAGE_SHIFT) & 511
        m = min(n, 512 - i0)
        out.append((mm.sys.pt.table(mm.pte_table(ref)), i0, m))
        addr += m << PAGE_SHIFT
        n -= m
    return out


def _walk_counts(addr: int, k: int) -> dict[str, int]:
    """What the walks of *k* 2 MiB windows from *addr* count (tables and PMD entries
    visited, pte tables locked)."""
    a = addr + np.arange(k, dtype=np.int64) * HPAGE_PMD_SIZE
    last = a + HPAGE_PMD_SIZE - 1
    pmds = int(((last >> 21) - (a >> 21) + 1).sum())
    return {"walk_page_range": k, "walk.pgd_table": k, "walk.pud_table": int(((last >> 39) != (a >> 39)).sum()) + k,
            "walk.pmd_table": int(((last >> 30) != (a >> 30)).sum()) + k, "walk.pmd_entry": pmds,
            "pgtable.pte_offset_map": pmds, "pgtable.pte_offset_map_lock": pmds,
            "walk.pte_entries": k * HPAGE_PMD_NR}


def _small_anon_ok(mem: "PhysMem", pfn: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Small anonymous folios mapped once, with no other reference, unlocked."""
    fl = mem.flags[pfn]
    return ((mem.head_off[pfn] == 0) & (mem.order[pfn] == 0) & ((fl & np.uint32(PG_anon)) != 0)
            & ((fl & np.uint32(PG_locked | PG_swapcache | PG_hugetlb | PG_reserved)) == 0)
            & (mem.refcount[pfn] == 1) & (mem.mapcount[pfn] == 1))


def _window_prefix(ok: npt.NDArray[np.bool_], k: int) -> int:
    """The number of leading windows whose 512 pages all pass."""
    return _prefix(ok[:k * HPAGE_PMD_NR].reshape(k, HPAGE_PMD_NR).all(axis=1))


def _count_dict(sys: "System", k: int, counts: dict[str, int], stats: tuple[tuple[str, int], ...],
                locks: tuple[tuple[str, int], ...]) -> None:
    for key, n in counts.items():
        sys.stats.add(key, n)
    _count_rounds(sys, k, stats, locks)


_ROUND4K_STATS_TO_DEVICE = (("migrate_vma.setup", 1), ("migrate_vma.finalize", 1),
                            ("migrate.remove_migration_ptes", HPAGE_PMD_NR), ("pgtable.set_pte", HPAGE_PMD_NR),
                            ("page.free", HPAGE_PMD_NR))
_ROUND4K_LOCKS_TO_DEVICE = (("folio_lock", 2 * HPAGE_PMD_NR), ("dmirror_device_lock", HPAGE_PMD_NR),
                            ("dmirror_mutex", 1))
_ROUND4K_STATS_TO_SYSTEM = (*_ROUND4K_STATS_TO_DEVICE, ("memremap.page_free", HPAGE_PMD_NR))
_ROUND4K_LOCKS_TO_SYSTEM = (("folio_lock", 2 * HPAGE_PMD_NR), ("dmirror_device_lock", HPAGE_PMD_NR))


def dmirror_batch_to_device(dmirror: "Dmirror", vma: "Vma", addr: int, end: int) -> int:
    """The rounds of ``dmirror_migrate_to_device()`` for the 2 MiB windows from *addr*
    that are 512 small anonymous pages each, each mapped once by a present pte of this
    VMA: every page moves to a device page (``free_pages``) backed by a new system page,
    mapped by a device-private pte; the sources are freed. Returns the number of windows
    done (0: none)."""
    k = _window_count(dmirror, vma, addr, end, aligned=False)
    if k == 0:
        return 0
    mm = vma.vm_mm
    sys = dmirror.sys
    mem = sys.mem
    mdevice = dmirror.mdevice
    k = min(k, len(mdevice.free_pages) // HPAGE_PMD_NR)
    if k < BATCH_MIN_WINDOWS or mem.nr_free - mem.charged < HPAGE_PMD_NR:
        return 0
    run = _pte_run(mm, addr, k * HPAGE_PMD_NR)
    pte = _pmds(run)
    k = len(pte) // HPAGE_PMD_NR
    if k < BATCH_MIN_WINDOWS:
        return 0
    n = k * HPAGE_PMD_NR
    pte = pte[:n]
    src = ((pte & _U(PTE_PFN_MASK)) >> _U(12)).astype(np.int64)
    ok = (((pte & _U(_PAGE_PRESENT)) != 0) & ((pte & _U(_PAGE_SPECIAL)) == 0)
          & (src < mem.ram_pages) & (src != mem.zero_pfn))
    src = np.where(ok, src, 0)
    addrs = addr + (np.arange(n, dtype=np.int64) << PAGE_SHIFT)
    ok &= _small_anon_ok(mem, src) & (mem.pgmap[src] == 0) & _only_this_vma(mem, src, vma, addrs)
    k = _window_prefix(ok, k)
    if k < BATCH_MIN_WINDOWS:
        return 0
    n = k * HPAGE_PMD_NR
    pte, src = pte[:n], src[:n]
    run = _trim(run, n)
    _notify_each(mm, addr, k, mdevice)

    # collection (the migration entries) and what the sources carry to the device pages
    fl_s = mem.flags[src]
    ae = (fl_s & _AE) == _AE
    fl_s[ae] &= ~np.uint32(PG_anon_exclusive)
    fl_s |= np.where((pte & _U(_PAGE_DIRTY)) != 0, np.uint32(PG_dirty), np.uint32(0))
    mapping_s, index_s = mem.mapping[src], mem.index[src]
    write = (pte & _U(_PAGE_RW)) != 0
    # the allocator as the rounds use it: window i takes its backing pages, then frees its sources
    back = _alloc_small_in_turn(mem, src)
    # the device pages (off free_pages, window after window), mapped and carrying the state
    taken = mdevice.free_pages[-n:]
    del mdevice.free_pages[-n:]
    dev = np.array(taken[::-1], np.int64)
    mdevice.calloc += n
    _pgmap_use(sys, dev, 1)
    mem.order[dev] = 0
    mem.head_off[dev] = 0
    fd = (mem.flags[dev] & ~np.uint32(PG_head | PG_locked)) | (fl_s & _KEEP)
    mem.flags[dev] = np.where(write | ae, fd | np.uint32(PG_anon_exclusive), fd & ~np.uint32(PG_anon_exclusive))
    mem.mapping[dev] = mapping_s
    mem.index[dev] = index_s
    mem.refcount[dev] = 1
    mem.mapcount[dev] += 1
    mem.zone_device_data[dev] = back
    mdevice.backing_owner[back] = _owner_id(dmirror)
    mem.copy_pages(back, src)  # in window order (a destination may be an earlier source)
    typ = np.where(write, _U(SWP_DEVICE_WRITE), _U(SWP_DEVICE_READ))
    _set_pmds(run, (typ << _U(_SWP_TYPE_SHIFT)) | (dev.astype(np.uint64) << _U(12))
              | np.where((pte & _U(_PAGE_SOFT_DIRTY)) != 0, _U(_PAGE_SWP_SOFT_DIRTY), _U(0))
              | np.where((pte & _U(_PAGE_UFFD_WP)) != 0, _U(_PAGE_SWP_UFFD_WP), _U(0)))
    dmirror.pt.store_range(addr >> PAGE_SHIFT, (back << 2) | np.where(write, DPT_XA_TAG_WRITE, 0))
    counts = _walk_counts(addr, k)
    _count_dict(sys, k, counts, _ROUND4K_STATS_TO_DEVICE, _ROUND4K_LOCKS_TO_DEVICE)
    sys.ls.count_acquisitions("ptl", counts["pgtable.pte_offset_map_lock"])
    return k


def dmirror_batch_to_system(dmirror: "Dmirror", vma: "Vma", addr: int, end: int) -> int:
    """The rounds of ``dmirror_migrate_to_system()`` for the 2 MiB windows from *addr*
    that are 512 device-private ptes of this device each, every device page mapped once:
    each moves to a new system page mapped by a present pte; the device pages and their
    backing pages are freed. Returns the number of windows done (each counts 512
    migrated entries in ``cpages``)."""
    k = _window_count(dmirror, vma, addr, end, aligned=False)
    if k == 0 or dmirror.sys.mem.nr_free - dmirror.sys.mem.charged < HPAGE_PMD_NR:
        return 0
    mm = vma.vm_mm
    sys = dmirror.sys
    mem = sys.mem
    mdevice = dmirror.mdevice
    run = _pte_run(mm, addr, k * HPAGE_PMD_NR)
    pte = _pmds(run)
    k = len(pte) // HPAGE_PMD_NR
    if k < BATCH_MIN_WINDOWS:
        return 0
    n = k * HPAGE_PMD_NR
    pte = pte[:n]
    typ = pte >> _U(_SWP_TYPE_SHIFT)
    ok = (((pte & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) == 0) & (pte != 0)
          & ((typ == _U(SWP_DEVICE_READ)) | (typ == _U(SWP_DEVICE_WRITE))))
    dev = np.where(ok, ((pte >> _U(12)) & _U((1 << 40) - 1)).astype(np.int64), 0)
    ok &= (dev >= mem.ram_pages) & (dev < mem.max_pfn)
    dev = np.where(ok, dev, 0)
    back = mem.zone_device_data[dev].astype(np.int64)
    addrs = addr + (np.arange(n, dtype=np.int64) << PAGE_SHIFT)
    ok &= (_owned_private(sys, mdevice, mem.pgmap[dev]) & _small_anon_ok(mem, dev)
           & (back > 0) & (back < mem.ram_pages) & _only_this_vma(mem, dev, vma, addrs))
    back = np.where(ok, back, 0)
    ok &= (mem.order[back] == 0) & (mem.head_off[back] == 0) & (mem.refcount[back] == 1) & (mem.pgmap[back] == 0)
    k = _window_prefix(ok, k)
    if k < BATCH_MIN_WINDOWS:
        return 0
    n = k * HPAGE_PMD_NR
    pte, dev, back = pte[:n], dev[:n], back[:n]
    run = _trim(run, n)
    _notify_each(mm, addr, k, mdevice)

    write = (pte >> _U(_SWP_TYPE_SHIFT)) == _U(SWP_DEVICE_WRITE)
    fl_d = mem.flags[dev]
    ae = (fl_d & _AE) == _AE
    fl_d[ae] &= ~np.uint32(PG_anon_exclusive)
    mapping_d, index_d = mem.mapping[dev], mem.index[dev]
    # the allocator as the rounds use it: window i takes its new pages, then its device
    # pages' backing pages go back (sorted, as folios_put() gets them)
    new = _alloc_small_in_turn(mem, back)
    mem.copy_pages(new, back)  # in window order (a destination may be an earlier source)
    # the device pages: free_zone_device_folios(), then dmirror_devmem_free_pages()
    mem.mapcount[dev] -= 1
    _device_freed(sys, dev, dev, fl_d, back)
    mdevice.backing_owner[back] = 0
    mdevice.cfree += n
    mdevice.free_pages.extend(dev.tolist())
    # the new pages, mapped and carrying the state
    fs = mem.flags[new] | (fl_d & _KEEP)
    mem.flags[new] = np.where(write | ae, fs | np.uint32(PG_anon_exclusive), fs & ~np.uint32(PG_anon_exclusive))
    mem.mapping[new] = mapping_d
    mem.index[new] = index_d
    mem.mapcount[new] += 1
    prot = _U(vma.vm_page_prot & ~_PAGE_RW)
    _set_pmds(run, (((new.astype(np.uint64) << _U(12)) & _U(PTE_PFN_MASK)) | prot
                    | np.where(write, _U(_PAGE_RW), _U(0))
                    | np.where((pte & _U(_PAGE_SWP_SOFT_DIRTY)) != 0, _U(_PAGE_SOFT_DIRTY), _U(0))
                    | np.where((pte & _U(_PAGE_SWP_UFFD_WP)) != 0, _U(_PAGE_UFFD_WP), _U(0))))
    vpn = addr >> PAGE_SHIFT
    dmirror.pt.erase_range(vpn, vpn + n - 1)
    counts = _walk_counts(addr, k)
    _count_dict(sys, k, counts, _ROUND4K_STATS_TO_SYSTEM, _ROUND4K_LOCKS_TO_SYSTEM)
    sys.ls.count_acquisitions("ptl", counts["pgtable.pte_offset_map_lock"])
    return k


def _owner_id(dmirror: "Dmirror") -> int:
    from .dmirror_devmem import _owner_id as owner_id
    return owner_id(dmirror)


def dmirror_batch_windows(dmirror: "Dmirror", vma: "Vma", addr: int, end: int, to_dev: bool) -> tuple[int, int]:
    """The windows from *addr* done at once (whole THPs, else 4 KiB pages), if any:
    ``(windows, entries migrated)`` (``(0, 0)``: none; the caller's loop goes on after
    them; a device THP counts one entry, as ``dmirror_successful_migrated_pages()``
    counts its compound entry)."""
    if to_dev:
        k = dmirror_thp_batch_to_device(dmirror, vma, addr, end)
        if k:
            return k, k * HPAGE_PMD_NR
        k = dmirror_batch_to_device(dmirror, vma, addr, end)
        return k, k * HPAGE_PMD_NR
    k = dmirror_thp_batch_to_system(dmirror, vma, addr, end)
    if k:
        return k, k
    k = dmirror_batch_to_system(dmirror, vma, addr, end)
    return k, k * HPAGE_PMD_NR
