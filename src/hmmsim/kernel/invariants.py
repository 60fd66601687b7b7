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
    """What the page tables say: the pfns each entry maps (collected as index arrays, one
    per table, and counted once at the end), rss per mm, tables reached."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._pte: list[npt.NDArray[np.int64]] = []
        self._entire: list[int] = []
        #: references held by entries that are not mappings (6.12's device-exclusive)
        self._ref_only: list[npt.NDArray[np.int64]] = []
        self.tables: set[int] = set()

    def add_pte_maps(self, pfns: npt.NDArray[np.int64]) -> None:
        self._pte.append(pfns)

    def add_entire_map(self, pfn: int) -> None:
        self._entire.append(int(pfn))

    def add_ref_only(self, heads: npt.NDArray[np.int64]) -> None:
        self._ref_only.append(heads)

    @staticmethod
    def _counts(parts: list[npt.NDArray[np.int64]]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.unique(np.concatenate(parts), return_counts=True)

    def pte_counts(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(pfns, how many pte-level entries map each), pfns ascending."""
        return self._counts(self._pte)

    def entire_counts(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(heads, how many huge entries map each)."""
        return self._counts([np.asarray(self._entire, np.int64)])

    def ref_only_counts(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        return self._counts(self._ref_only)

    def dense(self, pairs: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
        """A sparse count as a per-pfn array (for reports only: O(n))."""
        out = np.zeros(self.n, np.int64)
        out[pairs[0]] = pairs[1]
        return out


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
        tally.add_pte_maps(pf)
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
                tally.add_ref_only(mem.heads(spf[excl]))
                dev &= ~excl
            tally.add_pte_maps(spf[dev])
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
                            tally.add_entire_map(pfn)
                        continue
                    if is_pmd_device_private_entry(me):
                        # 7.3 device-private THP: one entire mapping and reference, like a
                        # present THP PMD, of an order-9 device-private folio
                        _check_device_private_pfns(mm, mbase, np.zeros(1, np.int64), np.asarray([pfn], np.int64))
                        if mem.head_off[pfn] or int(mem.order[pfn]) != HPAGE_PMD_ORDER:
                            raise InvariantError(f"{mm.name}: device-private PMD at {mbase:#x} maps pfn {pfn:#x}, "
                                                 f"not the head of an order-{HPAGE_PMD_ORDER} folio")
                        tally.add_entire_map(pfn)
                        rss[1 if mem.flags[pfn] & PG_anon else (3 if mem.flags[pfn] & PG_swapbacked else 0)] += HPAGE_PMD_NR
                        _huge_anon_rmap(mm, v, mbase, pfn)
                        continue
                    if not pmd_present(me):  # PMD migration entry
                        if mem.flags[pfn] & PG_anon:
                            rss[1] += HPAGE_PMD_NR
                        continue
                    if mem.is_huge_zero_pfn(pfn):
                        continue
                    tally.add_entire_map(pfn)
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
    """Raise :class:`InvariantError` if the machine's state is inconsistent.

    Work is proportional to what is mapped plus a few passes over the pfns in use
    (``pfn_limit``), never over the whole (mostly untouched) pfn space."""
    mem = sys.mem
    for k, v in sys.notifier_active.items():
        if v:
            raise InvariantError(f"an mmu notifier invalidation of mm {k:#x} never ended")
    nfree = int(np.count_nonzero(mem._free))
    if nfree != mem.nr_free:
        raise InvariantError(f"allocator: nr_free {mem.nr_free} but {nfree} pages are free")
    n = sys.pfn_limit()  # no pfn at or above it was ever handed out
    rc = mem.refcount[:n]
    if len(rc) and rc.min() < 0:
        p = int(np.flatnonzero(rc < 0)[0])
        raise InvariantError(f"pfn {p:#x}: negative refcount {int(mem.refcount[p])}")
    if len(rc) and min(mem.mapcount[:n].min(), mem.entire_mapcount[:n].min()) < 0:
        p = int(np.flatnonzero((mem.mapcount[:n] < 0) | (mem.entire_mapcount[:n] < 0))[0])
        raise InvariantError(f"pfn {p:#x}: negative mapcount")
    if not full:
        return
    tally = _Tally(n)
    for mm in sys.mms:
        rss = _walk_mm(tally, mm)
        if rss != mm.rss:
            raise InvariantError(f"{mm.name}: rss {mm.rss} but page tables say {rss} "
                                 "(file, anon, swap, shmem)")
    # mapcounts: the pfns with a nonzero count are exactly those the tables map, and
    # the counts agree
    for what, counts, arr, unit in (("mapcount", tally.pte_counts(), mem.mapcount, "ptes"),
                                    ("entire_mapcount", tally.entire_counts(), mem.entire_mapcount,
                                     "huge entries")):
        u, c = counts
        nz = np.flatnonzero(arr[:n])
        if not (np.array_equal(nz, u) and np.array_equal(arr[u], c)):
            want = tally.dense(counts)
            p = int(np.flatnonzero(want != arr[:n])[0])
            raise InvariantError(f"pfn {p:#x}: {what} {int(arr[p])} but {int(want[p])} {unit} map it")
    _check_refcounts(sys, tally)
    _check_pins(sys)
    _check_frames(sys)
    _check_device_pages(sys)
    leaked = set(sys.pt.allocated_ids().tolist()) - tally.tables
    if leaked:
        raise InvariantError(f"page tables {sorted(leaked)[:5]} are allocated but unreachable")


def _private_pgmap_ids(sys: "System") -> npt.NDArray[np.bool_]:
    """Indexed by ``mem.pgmap`` value: is that pagemap device-private?"""
    private = np.zeros(len(sys.pgmaps) + 1, np.bool_)
    for i, pg in enumerate(sys.pgmaps, 1):
        private[i] = pg is not None and pg.is_private
    return private


def _expected_refs(sys: "System", tally: _Tally) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The references each folio head must have: its mappings, its page-cache slot,
    the device page that a backing page belongs to, and in-flight operations; as
    (pfns ascending, references), every other pfn expecting none."""
    mem = sys.mem
    n = tally.n
    idx: list[npt.NDArray[np.int64]] = []
    cnt: list[npt.NDArray[np.int64]] = []
    u, c = tally.pte_counts()
    if len(u):
        idx.append(mem.heads(u).astype(np.int64))
        cnt.append(c)
    for u, c in (tally.entire_counts(), tally.ref_only_counts()):
        idx.append(u)
        cnt.append(c)
    cache = [np.fromiter(m.pages.values(), np.int64, len(m.pages)) for m in sys.iter_address_spaces()]
    if cache:
        cp = np.concatenate(cache)
        idx.append(cp)
        cnt.append(np.ones(len(cp), np.int64))
    # a device-private page holding a backing page (zone_device_data) references it
    zdd = np.flatnonzero(mem.zone_device_data[:n])
    if len(zdd):
        zdd = zdd[_private_pgmap_ids(sys)[mem.pgmap[zdd].astype(np.int64)]]
        idx.append(mem.zone_device_data[zdd].astype(np.int64))
        cnt.append(np.ones(len(zdd), np.int64))
    if sys.extra_refs:
        ps = np.fromiter(sys.extra_refs.keys(), np.int64, len(sys.extra_refs))
        idx.append(mem.heads(ps).astype(np.int64))
        cnt.append(np.fromiter(sys.extra_refs.values(), np.int64, len(sys.extra_refs)))
    allidx = np.concatenate(idx)
    keys, inv = np.unique(allidx, return_inverse=True)
    sums = np.bincount(inv, weights=np.concatenate(cnt), minlength=len(keys)).astype(np.int64)
    keep = sums != 0
    return keys[keep], sums[keep]


def _check_refcounts(sys: "System", tally: _Tally) -> None:
    """Tail pages hold no references; every other page (the reserved ones aside) has
    exactly the references :func:`_expected_refs` finds."""
    mem = sys.mem
    n = tally.n
    keys, refs = _expected_refs(sys, tally)
    rc = mem.refcount[:n]
    held = np.flatnonzero(rc)
    tails = held[mem.head_off[held] != 0]
    if len(tails):
        p = int(tails[0])
        raise InvariantError(f"tail page {p:#x} has refcount {int(rc[p])}")
    cand = np.union1d(held, keys)
    cand = cand[(mem.head_off[cand] == 0) & ((mem.flags[cand] & PG_reserved) == 0)]
    pos = np.searchsorted(keys, cand)
    pos_ok = pos < len(keys)
    exp = np.zeros(len(cand), np.int64)
    hit = pos_ok.copy()
    hit[pos_ok] = keys[pos[pos_ok]] == cand[pos_ok]
    exp[hit] = refs[pos[hit]]
    bad = np.flatnonzero(rc[cand] != exp)
    if len(bad):
        p = int(cand[bad[0]])
        raise InvariantError(f"pfn {p:#x}: refcount {int(rc[p])} but {int(exp[bad[0]])} references are known "
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
    in_use: dict[tuple[int, int], npt.NDArray[np.bool_]] = {}

    def used(lo: int, hi: int) -> npt.NDArray[np.bool_]:
        if (lo, hi) not in in_use:
            in_use[lo, hi] = _device_pages_in_use(sys, lo, hi)
        return in_use[lo, hi]

    for pg in sys.pgmaps:
        if pg is None:
            continue
        lo, hi = pg.start_pfn, pg.start_pfn + pg.nr_pages
        nref = int(np.count_nonzero(mem.refcount[lo:hi]))  # none is negative (checked above)
        if nref != pg.nr_used:
            raise InvariantError(f"{pg}: {nref} folios referenced but nr_used {pg.nr_used}")
        # pages with a mapcount, a mapping or a backing page must be in use
        busy = np.union1d(np.union1d(np.flatnonzero(mem.mapcount[lo:hi]), np.flatnonzero(mem.mapping[lo:hi])),
                          np.flatnonzero(mem.zone_device_data[lo:hi]))
        dirty = busy[~used(lo, hi)[busy]]
        if len(dirty):
            raise InvariantError(f"idle device page {lo + int(dirty[0]):#x} is still mapped, owned or backed")
    for dev in getattr(sys, "dmirror_devices", []):
        if dev is None or not dev.calloc:
            continue  # no page ever left the free list built with the chunks: skip the O(N) part
        folios = np.asarray(getattr(dev, "free_folios", []), np.int64)
        free = np.concatenate([np.asarray(dev.free_pages, np.int64),
                               (folios[:, None] + np.arange(HPAGE_PMD_NR)).ravel()])
        if len(free) > 1 and (np.bincount(free - free.min()) > 1).any():
            raise InvariantError(f"{dev}: a page is on the free list twice")
        if len(free) and (mem.refcount[free] != 0).any():
            raise InvariantError(f"{dev}: a page on the free list is in use")
        idle = sum(int((~used(c.pagemap.start_pfn, c.pagemap.start_pfn + c.pagemap.nr_pages)).sum())
                   for c in dev.chunks if not c.remove)
        if idle != len(free):
            raise InvariantError(f"{dev}: {idle} idle device pages but {len(free)} on the free list")


def _device_pages_in_use(sys: "System", lo: int, hi: int) -> npt.NDArray[np.bool_]:
    """Which device pages of ``[lo, hi)`` belong to a live folio: a referenced head, or a
    tail of a referenced large folio (7.3 device THPs; a tail keeps its ``head_off`` after
    the folio is freed, so the head must still be large enough to cover it)."""
    mem = sys.mem
    out = mem.refcount[lo:hi] > 0  # a head (head_off 0) is covered by its own folio
    tails = np.flatnonzero(mem.head_off[lo:hi])
    if len(tails):
        ho = mem.head_off[lo + tails].astype(np.int64)
        heads = lo + tails - ho
        covers = ho < (np.int64(1) << mem.order[heads].astype(np.int64))
        out[tails] = (mem.refcount[heads] > 0) & covers
    return out


def _check_frames(sys: "System") -> None:
    """Every RAM page is free, reserved, hugetlb or referenced; free pages are clean."""
    mem = sys.mem
    ram = mem.ram_pages
    fl = mem.flags[:ram]
    free = mem._free[:ram]
    if not np.array_equal((fl & PG_buddy).astype(np.bool_), free):
        p = int(np.flatnonzero(((fl & PG_buddy) != 0) != free)[0])
        raise InvariantError(f"pfn {p:#x}: buddy flag and free bitmap disagree")
    taken = np.flatnonzero(~free)
    used = taken[(mem.head_off[taken] == 0) & ((fl[taken] & (PG_reserved | PG_hugetlb)) == 0)]
    lost = used[mem.refcount[used] == 0]
    if len(lost):
        raise InvariantError(f"pfn {int(lost[0]):#x} is neither free nor referenced: a lost frame")
    dirty = [nz[free[nz]] for nz in (np.flatnonzero(mem.refcount[:ram]), np.flatnonzero(mem.mapcount[:ram]),
                                     np.flatnonzero(mem.mapping[:ram]))]
    if any(len(d) for d in dirty):
        p = min(int(d[0]) for d in dirty if len(d))
        raise InvariantError(f"free pfn {p:#x} still has refcount/mapcount/mapping")
    pool = sys.hugetlb
    for h in pool.free:
        if mem.refcount[h] != 0 or mem.entire_mapcount[h] != 0:
            raise InvariantError(f"free hugetlb page {h:#x} is referenced")
    hugetlb_heads = np.flatnonzero(fl & PG_hugetlb)
    hugetlb_heads = hugetlb_heads[mem.head_off[hugetlb_heads] == 0]
    if len(hugetlb_heads) != pool.nr_huge_pages:
        raise InvariantError(f"{len(hugetlb_heads)} hugetlb folios but the pool has {pool.nr_huge_pages}")
    idle = [int(h) for h in hugetlb_heads if mem.refcount[h] == 0]
    if sorted(idle) != sorted(pool.free):
        raise InvariantError("hugetlb pages with no reference are not on the pool's free list")
