"""Consistency checks of the whole machine (what ``CONFIG_DEBUG_VM`` would catch).

:func:`check_invariants` recomputes, from every live page table, how often each page is
mapped, how many references each folio must have and each mm's rss, and compares them
with ``struct page`` arrays and mm counters. It also checks that no frame is lost (every
RAM page is free, reserved, in the hugetlb pool or referenced), that nothing is mapped
outside a VMA, that anonymous pages can be found by rmap, that no page-table page leaked
and that every notifier invalidation ended.

``full=False`` does only the O(1)-ish checks (allocator totals, notifier balance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .page_types import HPAGE_PMD_NR, HPAGE_PMD_ORDER, PAGE_SHIFT
from .pgtable import (
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_SPECIAL,
    MAX_SWAPFILES,
    PTE_PFN_MASK,
    SWP_DEVICE_EXCLUSIVE_READ,
    SWP_DEVICE_EXCLUSIVE_WRITE,
    SWP_DEVICE_READ,
    SWP_DEVICE_WRITE,
    SWP_MIGRATION_READ,
    SWP_MIGRATION_WRITE,
    is_pmd_device_private_entry,
    pmd_leaf,
    pmd_present,
    table_id,
)
from .physmem import PG_anon, PG_buddy, PG_hugetlb, PG_reserved, PG_swapbacked
from .vma import VM_HUGETLB

if TYPE_CHECKING:
    from .mm import MM
    from .system import System
    from .vma import Vma

__all__ = ("InvariantError", "check_invariants")

_U = np.uint64


class InvariantError(AssertionError):
    """The model's state is inconsistent; the message names the first bad pfn or address."""


class _Tally:
    """What the page tables say: mappings per pfn, rss per mm, tables reached."""

    def __init__(self, n: int) -> None:
        self.pte_maps = np.zeros(n, np.int64)
        self.entire_maps = np.zeros(n, np.int64)
        #: references held by entries that are not mappings (6.12's device-exclusive)
        self.ref_only = np.zeros(n, np.int64)
        self.tables: set[int] = set()


def _leaf_entries(tally: _Tally, mm: "MM", base: int, entries: npt.NDArray[np.uint64], rss: list[int]) -> None:
    """Account one pte table's entries (*base* is the VA of entry 0)."""
    sys = mm.sys
    mem = sys.mem
    nz = np.flatnonzero(entries)
    if not len(nz):
        return
    _check_in_vma(mm, base, nz)
    e = entries[nz]
    present = (e & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0
    normal = present & ((e & _U(_PAGE_SPECIAL)) == 0)
    pfn = ((e & _U(PTE_PFN_MASK)) >> _U(PAGE_SHIFT)).astype(np.int64)
    normal &= pfn < mem.max_pfn
    if normal.any():
        pf = pfn[normal]
        np.add.at(tally.pte_maps, pf, 1)
        heads = mem.heads(pf)
        fl = mem.flags[heads]
        anon = (fl & PG_anon) != 0
        rss[1] += int(anon.sum())
        shm = ~anon & ((fl & PG_swapbacked) != 0)
        rss[3] += int(shm.sum())
        rss[0] += int((~anon & ~shm).sum())
        _check_anon_index(mm, base, nz[normal], pf, anon)
    sw = ~present
    if sw.any():
        t = (e[sw] >> _U(59)).astype(np.int64)
        spf = pfn[sw]
        excl = (t == SWP_DEVICE_EXCLUSIVE_WRITE) | (t == SWP_DEVICE_EXCLUSIVE_READ)
        priv = (t == SWP_DEVICE_WRITE) | (t == SWP_DEVICE_READ)
        if priv.any():
            _check_device_private_pfns(mm, base, nz[sw][priv], spf[priv])
        dev = priv | excl
        if dev.any():
            rss[1] += int(dev.sum())
            if not mm.sys.profile.device_exclusive_mapped and excl.any():
                # 6.12: a device-exclusive entry holds its page's reference, not a mapping
                np.add.at(tally.ref_only, mem.heads(spf[excl]), 1)
                dev &= ~excl
            np.add.at(tally.pte_maps, spf[dev], 1)
        mig = (t >= SWP_MIGRATION_READ) & (t <= SWP_MIGRATION_WRITE)
        if mig.any():
            for p in spf[mig].tolist():
                h = mem.compound_head(p)
                fl = int(mem.flags[h])
                rss[1 if fl & PG_anon else (3 if fl & PG_swapbacked else 0)] += 1
        rss[2] += int((t < MAX_SWAPFILES).sum())


def _check_in_vma(mm: "MM", base: int, idx: npt.NDArray[np.int64]) -> None:
    """Every used entry (indices *idx*, ascending) lies inside a VMA; one lookup per
    VMA crossed."""
    v = None
    for i in idx.tolist():
        a = base + (i << PAGE_SHIFT)
        if v is None or a >= v.vm_end:
            v = mm.vma_lookup(a)
            if v is None:
                raise InvariantError(f"{mm.name}: entry mapped at {a:#x} outside every VMA")


def _check_anon_index(mm: "MM", base: int, idx: npt.NDArray[np.int64], pfns: npt.NDArray[np.int64],
                      anon: npt.NDArray[np.bool_]) -> None:
    """An anonymous page mapped at address A of VMA V must have ``index ==
    linear_page_index(V, A)`` and V must be on its anon_vma: rmap can find it."""
    if not anon.any():
        return
    mem = mm.sys.mem
    for i, p in zip(idx[anon].tolist(), pfns[anon].tolist()):
        a = base + (i << PAGE_SHIFT)
        v = mm.vma_lookup(a)
        assert v is not None
        if int(mem.index[p]) != v.linear_page_index(a):
            raise InvariantError(f"pfn {p:#x} mapped at {a:#x}: index {int(mem.index[p]):#x} but the VMA "
                                 f"says {v.linear_page_index(a):#x}")
        av = mem.folio_mapping(p)
        if av is None or v not in av.vmas:
            raise InvariantError(f"pfn {p:#x} mapped at {a:#x} is not reachable by rmap from {v}")


def _check_device_private_pfns(mm: "MM", base: int, idx: npt.NDArray[np.int64], pfns: npt.NDArray[np.int64]) -> None:
    """Device-private entries (ptes at indices *idx* of the table at *base*, or one PMD)
    point at pages of a live device-private pagemap."""
    sys = mm.sys
    private = np.zeros(len(sys.pgmaps) + 1, np.bool_)
    for i, pg in enumerate(sys.pgmaps, 1):
        private[i] = pg is not None and pg.is_private
    bad = np.flatnonzero(~private[sys.mem.pgmap[pfns].astype(np.int64)])
    if len(bad):
        k = int(bad[0])
        raise InvariantError(f"{mm.name}: device-private entry at {base + (int(idx[k]) << PAGE_SHIFT):#x} "
                             f"points at pfn {int(pfns[k]):#x}, not a device-private page")


def _huge_anon_rmap(mm: "MM", v: "Vma", addr: int, head: int) -> None:
    """An anonymous folio mapped by a PMD at *addr* of *v* has ``index ==
    linear_page_index(v, addr)`` and *v* is on its anon_vma (rmap can find the PMD)."""
    mem = mm.sys.mem
    if not mem.flags[head] & PG_anon:
        return
    if int(mem.index[head]) != v.linear_page_index(addr):
        raise InvariantError(f"folio {head:#x} mapped by the PMD at {addr:#x}: index {int(mem.index[head]):#x} "
                             f"but the VMA says {v.linear_page_index(addr):#x}")
    av = mem.folio_mapping(head)
    if av is None or v not in av.vmas:
        raise InvariantError(f"folio {head:#x} mapped by the PMD at {addr:#x} is not reachable by rmap from {v}")


def _walk_mm(tally: _Tally, mm: "MM") -> list[int]:
    """Tally every entry of *mm*; returns the recomputed rss."""
    sys = mm.sys
    mem = sys.mem
    pt = sys.pt
    rss = [0, 0, 0, 0]
    hugetlb = 0
    tally.tables.add(mm.pgd)
    pgd = pt.table(mm.pgd)
    for gi in np.flatnonzero(pgd).tolist():
        pud_tid = table_id(int(pgd[gi]))
        tally.tables.add(pud_tid)
        pud = pt.table(pud_tid)
        for ui in np.flatnonzero(pud).tolist():
            ue = int(pud[ui])
            ubase = (gi << 39) | (ui << 30)
            if pmd_leaf(ue):
                continue  # device-dax PUD leaves hold no struct-page counts here
            pmd_tid = table_id(ue)
            tally.tables.add(pmd_tid)
            pmd = pt.table(pmd_tid)
            for mi in np.flatnonzero(pmd).tolist():
                me = int(pmd[mi])
                mbase = ubase | (mi << 21)
                if not pmd_present(me) or pmd_leaf(me):
                    v = mm.vma_lookup(mbase)
                    if v is None:
                        raise InvariantError(f"{mm.name}: huge entry at {mbase:#x} outside every VMA")
                    pfn = (me & PTE_PFN_MASK) >> PAGE_SHIFT
                    if v.vm_flags & VM_HUGETLB:
                        hugetlb += HPAGE_PMD_NR
                        if pmd_present(me):
                            tally.entire_maps[pfn] += 1
                        continue
                    if is_pmd_device_private_entry(me):
                        # 7.3 device-private THP: one entire mapping and reference, like a
                        # present THP PMD, of an order-9 device-private folio
                        _check_device_private_pfns(mm, mbase, np.zeros(1, np.int64), np.asarray([pfn], np.int64))
                        if mem.head_off[pfn] or int(mem.order[pfn]) != HPAGE_PMD_ORDER:
                            raise InvariantError(f"{mm.name}: device-private PMD at {mbase:#x} maps pfn {pfn:#x}, "
                                                 f"not the head of an order-{HPAGE_PMD_ORDER} folio")
                        tally.entire_maps[pfn] += 1
                        rss[1 if mem.flags[pfn] & PG_anon else (3 if mem.flags[pfn] & PG_swapbacked else 0)] += HPAGE_PMD_NR
                        _huge_anon_rmap(mm, v, mbase, pfn)
                        continue
                    if not pmd_present(me):  # PMD migration entry
                        if mem.flags[pfn] & PG_anon:
                            rss[1] += HPAGE_PMD_NR
                        continue
                    if mem.is_huge_zero_pfn(pfn):
                        continue
                    tally.entire_maps[pfn] += 1
                    if mem.flags[pfn] & PG_anon:
                        rss[1] += HPAGE_PMD_NR
                    continue
                tid = table_id(me)
                tally.tables.add(tid)
                _leaf_entries(tally, mm, mbase, pt.table(tid), rss)
    if hugetlb != mm.hugetlb_usage:
        raise InvariantError(f"{mm.name}: hugetlb_usage {mm.hugetlb_usage} but page tables map {hugetlb}")
    return rss


def check_invariants(sys: "System", full: bool = True) -> None:
    """Raise :class:`InvariantError` if the machine's state is inconsistent."""
    mem = sys.mem
    for k, v in sys.notifier_active.items():
        if v:
            raise InvariantError(f"an mmu notifier invalidation of mm {k:#x} never ended")
    nfree = int(mem._free.sum())
    if nfree != mem.nr_free:
        raise InvariantError(f"allocator: nr_free {mem.nr_free} but {nfree} pages are free")
    if (mem.refcount < 0).any():
        p = int(np.flatnonzero(mem.refcount < 0)[0])
        raise InvariantError(f"pfn {p:#x}: negative refcount {int(mem.refcount[p])}")
    if (mem.mapcount < 0).any() or (mem.entire_mapcount < 0).any():
        p = int(np.flatnonzero((mem.mapcount < 0) | (mem.entire_mapcount < 0))[0])
        raise InvariantError(f"pfn {p:#x}: negative mapcount")
    if not full:
        return
    n = sys.pfn_limit()
    tally = _Tally(n)
    for mm in sys.mms:
        rss = _walk_mm(tally, mm)
        if rss != mm.rss:
            raise InvariantError(f"{mm.name}: rss {mm.rss} but page tables say {rss} "
                                 "(file, anon, swap, shmem)")
    # mapcounts
    bad = np.flatnonzero(tally.pte_maps != mem.mapcount[:n])
    if len(bad):
        p = int(bad[0])
        raise InvariantError(f"pfn {p:#x}: mapcount {int(mem.mapcount[p])} but {int(tally.pte_maps[p])} ptes map it")
    bad = np.flatnonzero(tally.entire_maps != mem.entire_mapcount[:n])
    if len(bad):
        p = int(bad[0])
        raise InvariantError(f"pfn {p:#x}: entire_mapcount {int(mem.entire_mapcount[p])} but "
                             f"{int(tally.entire_maps[p])} huge entries map it")
    _check_refcounts(sys, tally)
    _check_pins(sys)
    _check_frames(sys)
    _check_device_pages(sys)
    leaked = set(sys.pt.allocated_ids().tolist()) - tally.tables
    if leaked:
        raise InvariantError(f"page tables {sorted(leaked)[:5]} are allocated but unreachable")


def _expected_refs(sys: "System", tally: _Tally) -> npt.NDArray[np.int64]:
    """The references each folio head must have: its mappings, its page-cache slot,
    the device page that a backing page belongs to, and in-flight operations."""
    mem = sys.mem
    n = len(tally.pte_maps)
    exp = np.zeros(n, np.int64)
    maps = tally.pte_maps
    used = np.flatnonzero(maps)
    if len(used):
        np.add.at(exp, mem.heads(used), maps[used])
    exp += tally.entire_maps
    exp += tally.ref_only
    for mm_obj in sys.iter_address_spaces():
        for pfn in mm_obj.pages.values():
            exp[pfn] += 1
    zdd = np.flatnonzero(mem.zone_device_data[:n])
    for p in zdd.tolist():
        pg = sys.pgmap_of(p)
        if pg is not None and pg.is_private:
            exp[int(mem.zone_device_data[p])] += 1
    for p, k in sys.extra_refs.items():
        exp[mem.compound_head(p)] += k
    return exp


def _check_refcounts(sys: "System", tally: _Tally) -> None:
    mem = sys.mem
    exp = _expected_refs(sys, tally)
    n = len(exp)
    rc = mem.refcount[:n].astype(np.int64)
    head_off = mem.head_off[:n]
    # tail pages carry no references of their own
    tails = np.flatnonzero(head_off)
    if len(tails) and rc[tails].any():
        p = int(tails[np.flatnonzero(rc[tails])[0]])
        raise InvariantError(f"tail page {p:#x} has refcount {int(rc[p])}")
    zero_pages = mem.flags[:n] & PG_reserved
    bad = np.flatnonzero((rc != exp) & (zero_pages == 0) & (head_off == 0))
    if len(bad):
        p = int(bad[0])
        raise InvariantError(f"pfn {p:#x}: refcount {int(rc[p])} but {int(exp[p])} references are known "
                             f"(flags {int(mem.flags[p]):#x})")


def _check_pins(sys: "System") -> None:
    """GUP pins: ``_pincount`` only on large folios, each pin also a reference held by a
    GUP caller (``extra_refs``)."""
    mem = sys.mem
    for h, k in sys.folio_pincount.items():
        if not mem.order[h] or mem.head_off[h]:
            raise InvariantError(f"pfn {h:#x}: pincount {k} on a page that is not a large folio's head")
        if not 0 < k <= sys.extra_refs.get(h, 0):
            raise InvariantError(f"pfn {h:#x}: pincount {k} but {sys.extra_refs.get(h, 0)} GUP references")


def _check_device_pages(sys: "System") -> None:
    """ZONE_DEVICE pages: each pagemap's count of pages in use matches the refcounts; an
    idle device page (refcount 0, with its driver) is unmapped, has no mapping and holds
    no backing page; a dmirror device's free list holds each idle page of its chunks
    exactly once and nothing in use (no device frame lost or double-owned)."""
    mem = sys.mem
    for pg in sys.pgmaps:
        if pg is None:
            continue
        lo, hi = pg.start_pfn, pg.start_pfn + pg.nr_pages
        rc = mem.refcount[lo:hi]
        if int((rc > 0).sum()) != pg.nr_used:
            raise InvariantError(f"{pg}: {int((rc > 0).sum())} folios referenced but nr_used {pg.nr_used}")
        idle = ~_device_pages_in_use(sys, lo, hi)
        dirty = idle & ((mem.mapcount[lo:hi] != 0) | (mem.mapping[lo:hi] != 0) | (mem.zone_device_data[lo:hi] != 0))
        if dirty.any():
            raise InvariantError(f"idle device page {lo + int(np.flatnonzero(dirty)[0]):#x} is still "
                                 "mapped, owned or backed")
    for dev in getattr(sys, "dmirror_devices", []):
        if dev is None or not dev.calloc:
            continue  # no page ever left the free list built with the chunks: skip the O(N) part
        free = np.asarray(dev.free_pages, np.int64)
        if len(free) > 1 and not np.diff(np.sort(free)).all():
            raise InvariantError(f"{dev}: a page is on the free list twice")
        if len(free) and (mem.refcount[free] != 0).any():
            raise InvariantError(f"{dev}: a page on the free list is in use")
        idle = sum(int((~_device_pages_in_use(sys, c.pagemap.start_pfn,
                                              c.pagemap.start_pfn + c.pagemap.nr_pages)).sum())
                   for c in dev.chunks if not c.remove)
        if idle != len(free):
            raise InvariantError(f"{dev}: {idle} idle device pages but {len(free)} on the free list")


def _device_pages_in_use(sys: "System", lo: int, hi: int) -> npt.NDArray[np.bool_]:
    """Which device pages of ``[lo, hi)`` belong to a live folio: a referenced head, or a
    tail of a referenced large folio (7.3 device THPs; a tail keeps its ``head_off`` after
    the folio is freed, so the head must still be large enough to cover it)."""
    mem = sys.mem
    ho = mem.head_off[lo:hi].astype(np.int64)
    heads = np.arange(lo, hi, dtype=np.int64) - ho
    covers = ho < (np.int64(1) << mem.order[heads].astype(np.int64))
    return (mem.refcount[heads] > 0) & covers


def _check_frames(sys: "System") -> None:
    """Every RAM page is free, reserved, hugetlb or referenced; free pages are clean."""
    mem = sys.mem
    ram = mem.ram_pages
    fl = mem.flags[:ram]
    free = mem._free[:ram]
    if not np.array_equal((fl & PG_buddy) != 0, free):
        p = int(np.flatnonzero(((fl & PG_buddy) != 0) != free)[0])
        raise InvariantError(f"pfn {p:#x}: buddy flag and free bitmap disagree")
    heads = mem.head_off[:ram] == 0
    used = ~free & heads & ((fl & (PG_reserved | PG_hugetlb)) == 0)
    lost = used & (mem.refcount[:ram] == 0)
    if lost.any():
        p = int(np.flatnonzero(lost)[0])
        raise InvariantError(f"pfn {p:#x} is neither free nor referenced: a lost frame")
    dirty_free = free & ((mem.refcount[:ram] != 0) | (mem.mapcount[:ram] != 0) | (mem.mapping[:ram] != 0))
    if dirty_free.any():
        p = int(np.flatnonzero(dirty_free)[0])
        raise InvariantError(f"free pfn {p:#x} still has refcount/mapcount/mapping")
    pool = sys.hugetlb
    for h in pool.free:
        if mem.refcount[h] != 0 or mem.entire_mapcount[h] != 0:
            raise InvariantError(f"free hugetlb page {h:#x} is referenced")
    hugetlb_heads = np.flatnonzero(((fl & PG_hugetlb) != 0) & (mem.head_off[:ram] == 0))
    if len(hugetlb_heads) != pool.nr_huge_pages:
        raise InvariantError(f"{len(hugetlb_heads)} hugetlb folios but the pool has {pool.nr_huge_pages}")
    idle = [int(h) for h in hugetlb_heads if mem.refcount[h] == 0]
    if sorted(idle) != sorted(pool.free):
        raise InvariantError("hugetlb pages with no reference are not on the pool's free list")
