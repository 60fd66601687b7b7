"""Device memory migration: ``migrate_vma_setup()`` / ``migrate_vma_pages()`` /
``migrate_vma_finalize()`` (``mm/migrate_device.c``) for order-0 pages.

A driver fills a :class:`MigrateVma` (``struct migrate_vma``) for a range of one VMA;
``migrate_vma_setup`` collects the range under one ``MMU_NOTIFY_MIGRATE`` invalidation
(a page walk with its own ops: :func:`migrate_vma_collect_pmd`,
:func:`migrate_vma_collect_hole`), replacing every selected mapped page by a migration
entry, then checks references (``migrate_device_unmap``) and restores the pages it may not
move. The driver allocates destination pages and copies; ``migrate_vma_pages`` moves the
struct-page state (and inserts pages for holes, :func:`migrate_vma_insert_page`);
``migrate_vma_finalize`` turns the migration entries into mappings of the destination (or
of the source where the migration did not happen) and drops the references.

Selected: ``MIGRATE_VMA_SELECT_SYSTEM`` (system pages, holes and the zero page, holes and
zero pages in anonymous VMAs only), ``..._DEVICE_PRIVATE`` and ``..._DEVICE_COHERENT`` (device
pages whose pagemap owner is ``pgmap_owner``). THP: 6.12 splits a PMD-mapped THP when it
collects it; 7.3 (``device_private_thp``, ``MIGRATE_VMA_SELECT_COMPOUND``) collects it whole as
one compound entry, see :mod:`.migrate_device_huge`, which the functions here call at a few
branch points.
The range is at most one page table (drivers step 512 pages at a time); the per-page work
is done entry by entry within that table.
Performance: every step works on arrays. The collection classifies a whole pte table at
once (``decode_pte_table``: holes, the zero page, system pages, device-private entries,
coherent pages) and trylocks and unmaps the selected pages of the table together
(:func:`~hmmsim.kernel.pagemap.folios_trylock`, :func:`~hmmsim.kernel.migrate.make_migration_ptes`);
``migrate_device_unmap`` only checks references of pages the collection unmapped; the
struct-page moves, ``remove_migration_ptes`` (:func:`~hmmsim.kernel.migrate.remove_migration_ptes_folios`),
the unlocks and the reference drops (:func:`~hmmsim.kernel.folio.folios_put_in_order`) of
``migrate_vma_pages``/``migrate_vma_finalize`` are done for all entries at once. Rare
entries (special mappings, pages still mapped elsewhere such as a fork's, large folios,
file pages) take the per-entry paths, and so does a range with a single entry (a THP
window's compound entry, a one-page fault): there the kernel's loop body costs less than
the array passes. The counters, the locks (one acquisition per
folio), the notifier events and the order in which freed pages go back to their
allocator or driver are those of the kernel's per-entry loops; a blocking batch is one
scheduling point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..kernel.errno import EBUSY, EINVAL
from ..kernel.folio import folio_put, folios_put_in_order
from ..kernel.huge_memory import split_folio, split_huge_pmd
from ..kernel.migrate import (
    folio_migrate_mapping,
    make_migration_pte,
    make_migration_ptes,
    remove_migration_ptes_folios,
    try_to_migrate,
)
from ..kernel.locking import KEYED_LOCK_CLASSES
from ..kernel.mm import MM_ANONPAGES, PtRef
from ..kernel.mmu_notifier import MmuNotifierEvent, notify_range
from ..kernel.memremap import pgmap_kinds
from ..kernel.page_types import PAGE_SHIFT, PAGE_SIZE, pte_index
from ..kernel.pagemap import folio_test_locked, folio_trylock, folio_unlock, folios_trylock, folios_unlock
from ..kernel.pagewalk import MmWalk, MmWalkOps, walk_page_range
from ..kernel.pgtable import (
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_RW,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    decode_pte_table,
    is_device_private_entry,
    is_writable_device_private_entry,
    make_readable_device_private_entry,
    make_writable_device_private_entry,
    pfn_pte,
    pmd_leaf,
    pmd_present,
    pte_pfn,
    pte_present,
    pte_to_swp_entry,
    swp_entry_to_pte,
    swp_offset_pfn,
)
from ..kernel.physmem import (
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
    PG_swapbacked,
    PG_uptodate,
)
from ..kernel.rmap import anon_vma_prepare, folio_add_new_anon_rmap
from ..kernel.userfaultfd_k import userfaultfd_missing
from ..kernel.vma import VM_WRITE, vma_is_anonymous

if TYPE_CHECKING:
    from ..kernel.system import System
    from ..kernel.vma import Vma

__all__ = (
    "MIGRATE_PFN_COMPOUND",
    "MIGRATE_PFN_MIGRATE",
    "MIGRATE_PFN_SHIFT",
    "MIGRATE_PFN_VALID",
    "MIGRATE_PFN_WRITE",
    "MIGRATE_VMA_FAULT",
    "MIGRATE_VMA_SELECT_COMPOUND",
    "MIGRATE_VMA_SELECT_DEVICE_COHERENT",
    "MIGRATE_VMA_SELECT_DEVICE_PRIVATE",
    "MIGRATE_VMA_SELECT_SYSTEM",
    "MigrateVma",
    "migrate_device_coherent_folio",
    "migrate_device_finalize",
    "migrate_device_pages",
    "migrate_device_pfns",
    "migrate_device_range",
    "migrate_pfn",
    "migrate_pfn_to_page",
    "migrate_vma_collect_hole",
    "migrate_vma_collect_pmd",
    "migrate_vma_finalize",
    "migrate_vma_insert_page",
    "migrate_vma_pages",
    "migrate_vma_setup",
)

#: ``include/linux/migrate.h`` encodings of ``src[]``/``dst[]``
MIGRATE_PFN_VALID = 1 << 0
MIGRATE_PFN_MIGRATE = 1 << 1
MIGRATE_PFN_WRITE = 1 << 3
#: a compound (PMD-sized) entry (7.3): one src/dst entry stands for 512 pages
MIGRATE_PFN_COMPOUND = 1 << 4
MIGRATE_PFN_SHIFT = 6
#: ``enum migrate_vma_direction``
MIGRATE_VMA_SELECT_SYSTEM = 1 << 0
MIGRATE_VMA_SELECT_DEVICE_PRIVATE = 1 << 1
MIGRATE_VMA_SELECT_DEVICE_COHERENT = 1 << 2
#: collect PMD-sized folios and holes as one compound entry (7.3)
MIGRATE_VMA_SELECT_COMPOUND = 1 << 3
#: ``enum migrate_vma_info`` of the unified fault+migrate walk (profile
#: ``hmm_migrate_on_fault``): ``migrate_vma_setup()`` faults the range in as it collects
MIGRATE_VMA_FAULT = 1 << 4

_U = np.uint64
#: the page flags ``folio_migrate_flags()`` carries over (as :func:`folio_migrate_mapping`)
_MIGRATE_KEEP_FLAGS = PG_anon | PG_anon_exclusive | PG_dirty | PG_swapbacked | PG_uptodate
#: an entry selected and collected: VALID | MIGRATE
_VM = _U(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)


def migrate_pfn(pfn: int) -> int:
    """``migrate_pfn()``."""
    return (pfn << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID


def migrate_pfn_to_page(mpfn: int) -> int:
    """``migrate_pfn_to_page()``: the pfn, or -1 when not VALID."""
    return int(mpfn) >> MIGRATE_PFN_SHIFT if int(mpfn) & MIGRATE_PFN_VALID else -1


class MigrateVma:
    """``struct migrate_vma``."""

    __slots__ = ("vma", "src", "dst", "start", "end", "npages", "cpages", "pgmap_owner",
                 "flags", "fault_page", "fault_folio")

    def __init__(self, vma: "Vma", start: int, end: int, pgmap_owner: Any, flags: int,
                 fault_page: int = -1) -> None:
        n = max((end - start) >> PAGE_SHIFT, 0)
        self.vma = vma
        self.start = start
        self.end = end
        self.src: npt.NDArray[np.uint64] = np.zeros(n, np.uint64)
        self.dst: npt.NDArray[np.uint64] = np.zeros(n, np.uint64)
        self.npages = 0
        self.cpages = 0
        self.pgmap_owner = pgmap_owner
        self.flags = flags
        self.fault_page = fault_page
        #: head of the fault page's folio when the caller holds its lock (7.3's PMD fault
        #: does; the model's pte fault path does not lock), else -1: collection does not
        #: trylock it and finalize leaves it locked, as for the kernel's ``fault_folio``
        self.fault_folio = -1


def migrate_vma_collect_skip(start: int, end: int, walk: MmWalk) -> int:
    """``migrate_vma_collect_skip()``: nothing to migrate in ``[start, end)``."""
    m: MigrateVma = walk.private
    n = (end - start) >> PAGE_SHIFT
    m.src[m.npages:m.npages + n] = 0
    m.dst[m.npages:m.npages + n] = 0
    m.npages += n
    return 0


def migrate_vma_collect_hole(start: int, end: int, depth: int, walk: MmWalk) -> int:
    """Models ``mm/migrate_device.c:migrate_vma_collect_hole()``: holes of anonymous VMAs
    are selected (a page will be inserted), others skipped."""
    m: MigrateVma = walk.private
    assert walk.vma is not None
    if not vma_is_anonymous(walk.vma):
        return migrate_vma_collect_skip(start, end, walk)
    if m.flags & MIGRATE_VMA_SELECT_COMPOUND and walk.vma.vm_mm.sys.profile.device_private_thp \
            and _huge.migrate_vma_collect_hole_compound(m, start, end, walk):
        return 0
    n = (end - start) >> PAGE_SHIFT
    m.src[m.npages:m.npages + n] = MIGRATE_PFN_MIGRATE
    m.dst[m.npages:m.npages + n] = 0
    m.npages += n
    m.cpages += n
    return 0


def _select_present(m: MigrateVma, vma: "Vma", addr: int, pte: int) -> tuple[int, int]:
    """The ``mpfn`` and page of a present pte (page -1: none, mpfn 0: not selected)."""
    sys = vma.vm_mm.sys
    pfn = pte_pfn(pte)
    if sys.mem.is_zero_pfn(pfn):
        if m.flags & MIGRATE_VMA_SELECT_SYSTEM and vma_is_anonymous(vma):
            m.cpages += 1
            return MIGRATE_PFN_MIGRATE, -1
        return 0, -1
    from ..kernel.fault import vm_normal_page
    page = vm_normal_page(vma, addr, pte)
    pg = sys.pgmap_of(page) if page >= 0 and sys.mem.pgmap[page] else None
    if page >= 0 and pg is None and not m.flags & MIGRATE_VMA_SELECT_SYSTEM:
        return 0, -1
    if pg is not None and pg.is_coherent and (not m.flags & MIGRATE_VMA_SELECT_DEVICE_COHERENT
                                             or pg.owner is not m.pgmap_owner):
        return 0, -1
    mpfn = migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE | (MIGRATE_PFN_WRITE if pte & _PAGE_RW else 0)
    return mpfn, page


def migrate_vma_collect_pmd(pmd: PtRef, start: int, end: int, walk: MmWalk) -> int:
    """Models ``mm/migrate_device.c:migrate_vma_collect_pmd()``: a THP is split (the huge
    zero page's PMD only), then each pte of ``[start, end)`` is looked at: holes and the
    zero page (anonymous VMAs, SELECT_SYSTEM), system pages, device-private entries and
    coherent pages of the owner are selected; a selected page that can be locked is
    replaced by a migration entry (its mapping reference dropped, a collection reference
    kept)."""
    m: MigrateVma = walk.private
    vma = walk.vma
    assert vma is not None
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    e = pmd.get()
    if e == 0:
        return migrate_vma_collect_hole(start, end, -1, walk)
    thp = sys.profile.device_private_thp
    if thp and (not pmd_present(e) or pmd_leaf(e)):
        # 7.3: THPs and device-private PMDs are collected whole or split there
        if _huge.migrate_vma_collect_huge_pmd(pmd, start, end, walk) == 0:
            return 0
        e = pmd.get()
    elif pmd_present(e) and pmd_leaf(e):
        head = pte_pfn(e)
        if mem.is_huge_zero_pfn(head):
            split_huge_pmd(vma, pmd, start)
        else:
            mem.refcount[head] += 1
            if not folio_trylock(sys, head):
                folio_put(sys, head)
                return migrate_vma_collect_skip(start, end, walk)
            ret = split_folio(sys, head)
            folio_unlock(sys, head)
            folio_put(sys, head)
            if ret:
                return migrate_vma_collect_skip(start, end, walk)
        e = pmd.get()
        if e == 0:
            return migrate_vma_collect_hole(start, end, -1, walk)
    elif not pmd_present(e):
        return migrate_vma_collect_skip(start, end, walk)
    got = mm.pte_offset_map_lock(pmd)
    if got is None:
        return migrate_vma_collect_skip(start, end, walk)
    tbl, tid = got
    locked = True
    try:
        i0 = pte_index(start)
        n = (end - start) >> PAGE_SHIFT
        sys.stats.add("walk.pte_entries", n)
        if n == 1 and not sys.ls.has_hooks and _collect_device_private_one(m, vma, tbl, i0):
            return 0  # (a CPU fault's migrate_to_ram: one device-private entry)
        mpfn, pages, rare = _migrate_vma_classify_ptes(m, vma, tbl[i0:i0 + n], keep_large=thp)
        large = -1
        sel = np.flatnonzero(((mpfn & _U(MIGRATE_PFN_VALID)) != 0) & ~rare)
        if thp and len(sel):  # 7.3: the first selected page of a large folio is split, then looked at again
            big = sel[mem.order[mem.heads(pages[sel])] != 0]
            if len(big):
                large = int(big[0])
                later = mpfn[large:]  # holes/zero pages after it are counted again then
                m.cpages -= int(((later != 0) & ((later & _U(MIGRATE_PFN_VALID)) == 0)).sum())
                mpfn[large:] = 0
                rare[large:] = False
                n = large
                sel = sel[sel < large]
        if rare.any():
            for j in np.flatnonzero(rare).tolist():
                mpfn[j], pages[j] = _collect_pte_one(m, vma, tbl, i0 + j, start + (j << PAGE_SHIFT))
        if len(sel):
            _collect_ptes(m, vma, tbl, i0, sel, pages[sel], mpfn)
        m.dst[m.npages:m.npages + n] = 0
        m.src[m.npages:m.npages + n] = mpfn[:n]
        m.npages += n
        if large >= 0:
            head = mem.compound_head(int(pages[large]))
            mem.refcount[head] += 1  # migrate_vma_split_folio() consumes it
            mm.pte_unmap_unlock(tid)
            locked = False
            addr = start + (large << PAGE_SHIFT)
            if _huge.migrate_vma_split_folio(sys, head):
                return migrate_vma_collect_skip(addr, end, walk)
            return migrate_vma_collect_pmd(pmd, addr, end, walk)
    finally:
        if locked:
            mm.pte_unmap_unlock(tid)
    return 0


def _selectable_pgmaps(m: MigrateVma, sys: "System") -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int8]]:
    """Per pgmap id (0: none): whether its pages are selected (device-private pages of
    the owner with SELECT_DEVICE_PRIVATE, coherent pages of the owner with
    SELECT_DEVICE_COHERENT), and its kind (1 private, 2 coherent, 3 other)."""
    kind = pgmap_kinds(sys)
    want = {1: MIGRATE_VMA_SELECT_DEVICE_PRIVATE, 2: MIGRATE_VMA_SELECT_DEVICE_COHERENT}
    ok = np.zeros(len(kind), np.bool_)
    for k, pg in enumerate(sys.pgmaps):
        if pg is not None and pg.owner is m.pgmap_owner:
            ok[k + 1] = bool(m.flags & want.get(int(kind[k + 1]), 0))
    return ok, kind


def _migrate_vma_classify_ptes(m: MigrateVma, vma: "Vma", ptes: npt.NDArray[np.uint64], keep_large: bool = False
                               ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """The selection of :func:`migrate_vma_collect_pmd` for a run of ptes at once:
    ``(mpfn, page, rare)``. Holes and the zero page (counted in ``cpages`` here), system
    pages, device-private entries and coherent pages get their mpfn (VALID ones still to
    be locked and unmapped); entries of other kinds are marked *rare* for the per-entry
    path (:func:`_collect_pte_one`)."""
    sys = vma.vm_mm.sys
    mem = sys.mem
    n = len(ptes)
    d = decode_pte_table(ptes)
    anon = vma_is_anonymous(vma)
    mpfn = np.zeros(n, np.uint64)
    pages = np.full(n, -1, np.int64)
    system = bool(m.flags & MIGRATE_VMA_SELECT_SYSTEM)
    if anon:
        mpfn[d.none] = MIGRATE_PFN_MIGRATE
        m.cpages += int(d.none.sum())
    pfn = d.pfn.astype(np.int64)
    present = d.present
    zero = present & (pfn == mem.zero_pfn)
    if zero.any():
        if system and anon:
            mpfn[zero] = MIGRATE_PFN_MIGRATE
            m.cpages += int(zero.sum())
        present = present & ~zero
    normal = present & ~d.special & (pfn < mem.max_pfn)
    rare = present & ~normal
    sel_tab = kind_tab = None
    if normal.any():
        p = np.where(normal, pfn, 0)
        pid = np.where(normal, mem.pgmap[p], 0)
        if pid.any():
            sel_tab, kind_tab = _selectable_pgmaps(m, sys)
            kind = kind_tab[pid]
            rare |= normal & (kind != 0) & (kind != 2)  # a present pte of a non-coherent device page
            take = normal & (((kind == 0) & system) | ((kind == 2) & sel_tab[pid]))
            take &= ~rare
        else:  # system pages only
            take = normal if system else np.zeros(n, np.bool_)
        pages[take] = pfn[take]
        mpfn[take] = ((pfn[take].astype(np.uint64) << _U(MIGRATE_PFN_SHIFT))
                      | _U(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
                      | np.where(d.write[take], _U(MIGRATE_PFN_WRITE), _U(0)))
    if d.has_swap and d.device_private.any():
        if sel_tab is None:
            sel_tab, kind_tab = _selectable_pgmaps(m, sys)
        dp = d.device_private
        p = np.where(dp, pfn, 0)
        pid = np.where(dp, mem.pgmap[p], 0)
        take = dp & sel_tab[pid] & (kind_tab[pid] == 1)
        pages[dp] = pfn[dp]
        mpfn[take] = ((pfn[take].astype(np.uint64) << _U(MIGRATE_PFN_SHIFT))
                      | _U(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
                      | np.where(d.device_private_write[take], _U(MIGRATE_PFN_WRITE), _U(0)))
    # a selected page is collected only if it is a small folio with a mapping
    v = np.flatnonzero(mpfn & _U(MIGRATE_PFN_VALID))
    if len(v):
        heads = mem.heads(pages[v])
        large = mem.order[heads] != 0
        if keep_large:  # 7.3 splits a large folio before it looks at its mapping
            bad = (mem.mapping[heads] == 0) & ~large
        else:
            bad = (mem.mapping[heads] == 0) | large
        if bad.any():
            mpfn[v[bad]] = 0
    return mpfn, pages, rare


def _collect_pte_one(m: MigrateVma, vma: "Vma", tbl: npt.NDArray[np.uint64], i: int, addr: int) -> tuple[int, int]:
    """One present pte of a rare kind (a special mapping, a non-coherent device page):
    the per-entry selection and collection."""
    pte = int(tbl[i])
    mem = vma.vm_mm.sys.mem
    mpfn, page = _select_present(m, vma, addr, pte)
    if mpfn & MIGRATE_PFN_VALID:
        head = mem.compound_head(page)
        if page < 0 or not mem.mapping[head] or mem.order[head]:
            mpfn = 0
        else:
            mpfn = _collect_one(m, vma, tbl, i, pte, page, mpfn)
    return mpfn, page


def _collect_ptes(m: MigrateVma, vma: "Vma", tbl: npt.NDArray[np.uint64], i0: int,
                  sel: npt.NDArray[np.int64], pages: npt.NDArray[np.int64], mpfn: npt.NDArray[np.uint64]) -> None:
    """:func:`_collect_one` of the selected entries *sel* (indices from *i0*) of one pte
    table at once: a reference taken and the folio trylocked (entries whose folio is
    locked are deselected); a locked page's pte becomes a migration entry (dirty moved
    to the folio, AnonExclusive carried by the entry), its mapping dropped."""
    sys = vma.vm_mm.sys
    mem = sys.mem
    # folio_get() of each, then (locked ones) the mapping's reference dropped: the
    # collection's reference takes the mapping's place, so refcounts do not change (a
    # page that cannot be locked gets its reference back at once: folio_put(), which
    # cannot free a page still mapped)
    ok = folios_trylock(sys, pages)
    if not ok.all():
        mpfn[sel[~ok]] = 0
        sel, pages = sel[ok], pages[ok]
        if len(sel) == 0:
            return
    m.cpages += len(sel)
    idx = i0 + sel
    ptes = tbl[idx]
    _AE = np.uint32(PG_anon | PG_anon_exclusive)
    anon_excl = (mem.flags[pages] & _AE) == _AE
    writable = (mpfn[sel] & _U(MIGRATE_PFN_WRITE)) != 0
    present = (ptes & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0
    all_present = bool(present.all())
    dirty = (ptes & _U(_PAGE_DIRTY)) != 0
    if not all_present:
        dirty &= present
    mem.flags[pages[dirty]] |= np.uint32(PG_dirty)
    src_pte = np.where(writable, ptes, ptes & ~_U(_PAGE_RW))
    if not all_present:
        src_pte = np.where(present, src_pte, np.where(writable, _U(_PAGE_RW), _U(0)))
    mig = make_migration_ptes(src_pte, pages, anon_excl)
    if not all_present:
        mig |= np.where(present, _U(0), ptes & _U(_PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP))
    mem.flags[pages[anon_excl]] &= ~np.uint32(PG_anon_exclusive)
    tbl[idx] = mig
    mem.mapcount[pages] -= 1  # folio_remove_rmap_pte


def _collect_device_private_one(m: MigrateVma, vma: "Vma", tbl: npt.NDArray[np.uint64], i: int) -> bool:
    """The selection and collection of :func:`migrate_vma_collect_pmd` for a range of one
    pte that is a device-private entry of a small folio, entry by entry as the kernel
    goes (what the vectorised path does for one entry, without its array set-up).
    Returns False, having done nothing, for any other entry."""
    pte = int(tbl[i])
    ent = pte_to_swp_entry(pte)
    if pte & (_PAGE_PRESENT | _PAGE_PROTNONE) or not is_device_private_entry(ent):
        return False
    sys = vma.vm_mm.sys
    mem = sys.mem
    page = swp_offset_pfn(ent)
    head = mem.compound_head(page)
    if mem.order[head]:
        return False  # a large folio: the vectorised path splits it (7.3) or skips it
    mpfn = 0
    pid = int(mem.pgmap[page])
    pg = sys.pgmaps[pid - 1] if pid else None
    if (pg is not None and pg.is_private and pg.owner is m.pgmap_owner
            and m.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE and mem.mapping[head]):
        write = MIGRATE_PFN_WRITE if is_writable_device_private_entry(ent) else 0
        mpfn = _collect_one(m, vma, tbl, i, pte, page, migrate_pfn(page) | MIGRATE_PFN_MIGRATE | write)
    m.dst[m.npages] = 0
    m.src[m.npages] = np.uint64(mpfn)
    m.npages += 1
    return True


def _collect_one(m: MigrateVma, vma: "Vma", tbl: npt.NDArray[np.uint64], i: int, pte: int,
                 page: int, mpfn: int) -> int:
    """Lock *page* and replace its pte by a migration entry; returns the mpfn (0 if the
    page is left alone)."""
    sys = vma.vm_mm.sys
    mem = sys.mem
    mem.refcount[page] += 1  # folio_get
    if not folio_trylock(sys, page):
        folio_put(sys, page)
        return 0
    anon_excl = bool(mem.flags[page] & PG_anon) and bool(mem.flags[page] & PG_anon_exclusive)
    m.cpages += 1
    if pte_present(pte):
        if pte & _PAGE_DIRTY:
            mem.flags[page] |= PG_dirty
        mig = make_migration_pte(pte if mpfn & MIGRATE_PFN_WRITE else pte & ~_PAGE_RW, page, anon_excl)
    else:
        mig = make_migration_pte(_PAGE_RW if mpfn & MIGRATE_PFN_WRITE else 0, page, anon_excl)
        mig |= pte & (_PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP)
    if anon_excl:
        mem.flags[page] &= ~np.uint32(PG_anon_exclusive)
    tbl[i] = np.uint64(mig)
    mem.mapcount[page] -= 1  # folio_remove_rmap_pte
    folio_put(sys, page)  # the mapping's reference
    return mpfn


_MIGRATE_VMA_WALK_OPS = MmWalkOps(pmd_entry=migrate_vma_collect_pmd, pte_hole=migrate_vma_collect_hole)


def migrate_vma_collect(m: MigrateVma) -> None:
    """``migrate_vma_collect()``: the walk under one MMU_NOTIFY_MIGRATE invalidation
    carrying the pgmap owner."""
    mm = m.vma.vm_mm
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_MIGRATE, mm, m.start, m.end, owner=m.pgmap_owner):
        walk_page_range(mm, m.start, m.end, _MIGRATE_VMA_WALK_OPS, m)
    m.end = m.start + (m.npages << PAGE_SHIFT)


def migrate_vma_check_page(sys: "System", page: int, fault_page: int) -> bool:
    """``migrate_vma_check_page()``: no reference beyond the mappings, the collection's
    and (for the fault page) the fault's."""
    mem = sys.mem
    extra = 1 + (page == fault_page)
    head = mem.compound_head(page)
    if mem.order[head]:
        if not sys.profile.device_private_thp:
            return False  # 6.12: "FIXME support THP"
        extra += bool(mem.pgmap[head]) + (sys.mapping_cache_of(head) is not None)
        return int(mem.refcount[head]) - extra <= mem.folio_mapcount(head)
    if mem.pgmap[page]:
        extra += 1
    cache = sys.mapping_cache_of(page)
    if cache is not None:
        extra += 1
    return int(mem.refcount[page]) - extra <= int(mem.mapcount[page])


def migrate_device_unmap(sys: "System", src: npt.NDArray[np.uint64], npages: int, fault_page: int) -> int:
    """Models ``mm/migrate_device.c:migrate_device_unmap()``: pages still mapped elsewhere
    are unmapped (``try_to_migrate``); those still mapped or with extra references are
    restored and deselected. Returns the number of entries still to migrate.

    Done for all entries at once: a small folio no longer mapped (the common case: the
    collection just unmapped it) is only checked; folios still mapped (shared with a
    fork, mapped twice) and large folios go through ``try_to_migrate`` one by one."""
    mem = sys.mem
    s_ = src[:npages]
    nz = s_.nonzero()[0]
    if len(nz) == 1:  # one entry (a THP window, a single page's fault): the kernel's loop
        return _migrate_device_unmap_one(sys, s_, int(nz[0]), fault_page)
    valid = (s_ & _U(MIGRATE_PFN_VALID)) != 0
    unmapped = int((~valid & ((s_ & _U(MIGRATE_PFN_MIGRATE)) != 0)).sum())
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        return unmapped
    pages = (s_[idx] >> _U(MIGRATE_PFN_SHIFT)).astype(np.int64)
    heads = mem.heads(pages)
    small = (heads == pages) & (mem.order[pages] == 0)
    large = (heads == pages) & (mem.order[pages] != 0)
    if large.any():  # 7.3: a whole large folio is one compound entry
        s_[idx[large]] |= _U(MIGRATE_PFN_COMPOUND)
    simple = small & (mem.mapcount[pages] + mem.entire_mapcount[pages] == 0)
    keep = np.zeros(len(idx), np.bool_)
    for j in np.flatnonzero(~simple).tolist():
        page = int(pages[j])
        if mem.folio_mapcount(page) > 0:
            try_to_migrate(sys, page)
        keep[j] = mem.folio_mapcount(page) == 0 and migrate_vma_check_page(sys, page, fault_page)
    if simple.any():
        sp = pages[simple]
        extra = 1 + (sp == fault_page) + (mem.pgmap[sp] != 0)
        file_ = np.flatnonzero((mem.flags[sp] & np.uint32(PG_anon)) == 0)
        for j in file_.tolist():
            extra[j] += sys.mapping_cache_of(int(sp[j])) is not None
        keep[simple] = mem.refcount[sp].astype(np.int64) - extra <= mem.mapcount[sp]
    unmapped += int(keep.sum())
    restore = len(idx) - int(keep.sum())
    if not restore:
        return unmapped
    s_[idx[~keep]] &= ~_U(MIGRATE_PFN_MIGRATE)
    back = np.flatnonzero(((s_ & _U(MIGRATE_PFN_VALID)) != 0) & ((s_ & _U(MIGRATE_PFN_MIGRATE)) == 0))[:restore]
    bp = (s_[back] >> _U(MIGRATE_PFN_SHIFT)).astype(np.int64)
    remove_migration_ptes_folios(sys, bp, bp)
    s_[back] = 0
    for page in bp.tolist():
        folio_unlock(sys, page)
        folio_put(sys, page)
    return unmapped


def _migrate_device_unmap_one(sys: "System", s_: npt.NDArray[np.uint64], i: int, fault_page: int) -> int:
    """:func:`migrate_device_unmap` of a range whose only non-zero entry is *i*, as the
    kernel's loop does it (the same checks and counts as the bulk path)."""
    mem = sys.mem
    s = int(s_[i])
    if not s & MIGRATE_PFN_VALID:
        return 1 if s & MIGRATE_PFN_MIGRATE else 0
    page = s >> MIGRATE_PFN_SHIFT
    if int(mem.head_off[page]) == 0 and mem.order[page]:  # 7.3: a whole large folio
        s_[i] = _U(s | MIGRATE_PFN_COMPOUND)
    if mem.folio_mapcount(page) > 0:
        try_to_migrate(sys, page)
    if mem.folio_mapcount(page) == 0 and migrate_vma_check_page(sys, page, fault_page):
        return 1
    s_[i] = _U(0)
    one = np.array([page], np.int64)
    remove_migration_ptes_folios(sys, one, one)
    folio_unlock(sys, page)
    folio_put(sys, page)
    return 0


def migrate_vma_setup(m: MigrateVma) -> int:
    """Models ``mm/migrate_device.c:migrate_vma_setup()``: validate the range (within one
    VMA, not hugetlb/special/DAX, a device-private fault page), collect and unmap.
    Returns 0 or ``-EINVAL``; with the unified walk (``hmm_migrate_on_fault``) also the
    walk's error (:func:`~hmmsim.hmm.hmm_migrate.migrate_vma_setup_hmm`)."""
    from ..kernel.vma import VM_HUGETLB, VM_SPECIAL
    nr = (m.end - m.start) >> PAGE_SHIFT
    m.start &= ~(PAGE_SIZE - 1)
    m.end &= ~(PAGE_SIZE - 1)
    vma = m.vma
    if vma is None or vma.vm_flags & (VM_HUGETLB | VM_SPECIAL) or getattr(vma, "is_dax", False):
        return -EINVAL
    if nr <= 0:
        return -EINVAL
    if not (vma.vm_start <= m.start < vma.vm_end) or not (vma.vm_start < m.end <= vma.vm_end):
        return -EINVAL
    if len(m.src) < nr or len(m.dst) < nr:
        return -EINVAL
    sys = vma.vm_mm.sys
    if m.fault_page >= 0:
        pg = sys.pgmap_of(m.fault_page)
        if pg is None or not pg.is_private:
            return -EINVAL
    m.src[:nr] = 0
    m.cpages = 0
    m.npages = 0
    if m.fault_page >= 0 and folio_test_locked(sys, m.fault_page):
        m.fault_folio = sys.mem.compound_head(m.fault_page)
    # the collected folios stay locked for the caller; nothing else may stay held
    with sys.ls.walk_scope("migrate_vma_setup", KEYED_LOCK_CLASSES, (sys.notifier_active, id(vma.vm_mm))):
        if sys.profile.hmm_migrate_on_fault:  # the unified walk: collection through hmm_range_fault()
            from .hmm_migrate import migrate_vma_setup_hmm
            return migrate_vma_setup_hmm(m, nr)
        migrate_vma_collect(m)
        if m.cpages:
            m.cpages = migrate_device_unmap(sys, m.src, m.npages, m.fault_page)
    sys.stats.add("migrate_vma.setup")
    return 0


def migrate_vma_insert_page(m: MigrateVma, addr: int, page: int, i: int) -> None:
    """Models ``mm/migrate_device.c:migrate_vma_insert_page()``: map a new page where a
    hole (or the zero page) was collected, in anonymous VMAs only; on any obstacle the
    entry is deselected (``MIGRATE_PFN_MIGRATE`` cleared)."""
    vma = m.vma
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    ok = False
    if vma_is_anonymous(vma) and anon_vma_prepare(vma) == 0:
        pmd = mm.pmd_ref(addr, alloc=True)
        if pmd is not None and pmd_present(pmd.get()) and pmd_leaf(pmd.get()) \
                and mem.is_huge_zero_pfn(pte_pfn(pmd.get())):
            split_huge_pmd(vma, pmd, addr)
        if pmd is not None and not (pmd_present(pmd.get()) and pmd_leaf(pmd.get())):
            got = mm.pte_offset_map_lock(pmd, alloc=True)
            if got is not None:
                tbl, tid = got
                try:
                    orig = int(tbl[pte_index(addr)])
                    # a userfaultfd-MISSING VMA backs off without delivering the fault
                    if (orig == 0 or (pte_present(orig) and mem.is_zero_pfn(pte_pfn(orig)))) \
                            and not userfaultfd_missing(vma):
                        pg = sys.pgmap_of(page) if mem.pgmap[page] else None
                        write = bool(vma.vm_flags & VM_WRITE)
                        if pg is not None and pg.is_private:
                            ent = (make_writable_device_private_entry(page) if write
                                   else make_readable_device_private_entry(page))
                            entry = swp_entry_to_pte(ent)
                        else:
                            entry = pfn_pte(page, vma.vm_page_prot)
                            if write:
                                entry |= _PAGE_RW | _PAGE_DIRTY
                        mm.add_mm_counter(MM_ANONPAGES, 1)
                        folio_add_new_anon_rmap(mem, page, vma, addr)
                        mem.refcount[page] += 1
                        tbl[pte_index(addr)] = np.uint64(entry)
                        ok = True
                finally:
                    mm.pte_unmap_unlock(tid)
    if not ok:
        m.src[i] = np.uint64(int(m.src[i]) & ~MIGRATE_PFN_MIGRATE)


def _migrate_device_pages(sys: "System", src: npt.NDArray[np.uint64], dst: npt.NDArray[np.uint64],
                          npages: int, m: MigrateVma | None) -> None:
    """Models ``mm/migrate_device.c:__migrate_device_pages()``: entries without a
    destination are deselected; holes (VMA migrations only) get their page inserted under
    one MMU_NOTIFY_MIGRATE from the first hole to the end; the others move their struct-page
    state to the destination (a file page cannot go to device memory). Small anonymous
    folios move in bulk, others one by one."""
    mem = sys.mem
    s_ = src[:npages]
    d_ = dst[:npages]
    nz = s_.nonzero()[0]
    if len(nz) == 1:
        i = int(nz[0])
        dn = d_.nonzero()[0]
        if len(dn) == 0 or (len(dn) == 1 and int(dn[0]) == i):
            # one entry (a THP window, a single page's fault): the kernel's loop body
            _migrate_device_pages_one(sys, src, dst, i, m)
            return
    has_new = (d_ & _U(MIGRATE_PFN_VALID)) != 0
    all_new = bool(has_new.all())
    if not all_new:
        s_[~has_new] &= ~_U(MIGRATE_PFN_MIGRATE)
    if bool(((s_ | d_) & _U(MIGRATE_PFN_COMPOUND)).any()):
        # 7.3 THP checks of mapped compound entries (split, or deselect), entry by entry
        comp = np.flatnonzero(has_new & ((s_ & _VM) == _VM) & (((s_ | d_) & _U(MIGRATE_PFN_COMPOUND)) != 0))
        for i in comp.tolist():
            _huge.migrate_device_pages_compound(sys, src, dst, i, m)
    svalid = (s_ & _U(MIGRATE_PFN_VALID)) != 0
    hm = (s_ & _U(MIGRATE_PFN_MIGRATE)) != 0
    if not all_new:
        hm &= has_new
    holes = np.flatnonzero(hm & ~svalid)
    move = np.flatnonzero(hm & svalid)
    if len(move):
        pages = (s_[move] >> _U(MIGRATE_PFN_SHIFT)).astype(np.int64)
        new = (d_[move] >> _U(MIGRATE_PFN_SHIFT)).astype(np.int64)
        heads = mem.heads(pages)
        anon = (mem.flags[heads] & np.uint32(PG_anon)) != 0
        pid = mem.pgmap[new]
        ok = None  # None: every entry may move
        if pid.any():  # to device memory: not to a pagemap of another kind, nor a file page
            nkind = pgmap_kinds(sys)[pid]
            todev = nkind != 0
            bad = todev & (nkind == 3)
            for j in np.flatnonzero(todev & ~anon & ~bad).tolist():
                bad[j] = sys.mapping_cache_of(int(pages[j])) is not None
            if bad.any():
                s_[move[bad]] &= ~_U(MIGRATE_PFN_MIGRATE)
                ok = ~bad
        fast = anon & (heads == pages) & (mem.order[pages] == 0)
        slow = ~fast if ok is None else ok & ~fast
        for j in np.flatnonzero(slow).tolist():
            folio_migrate_mapping(sys, int(new[j]), int(pages[j]))
        if ok is not None:
            fast &= ok
        if bool(fast.all()):
            fp, fn = pages, new
        else:
            fp, fn = pages[fast], new[fast]
        if len(fp):
            mem.mapping[fn] = mem.mapping[fp]
            mem.index[fn] = mem.index[fp]
            mem.flags[fn] |= mem.flags[fp] & np.uint32(_MIGRATE_KEEP_FLAGS)
    if len(holes):
        assert m is not None, "a hole outside migrate_vma"
        first = m.start + (int(holes[0]) << PAGE_SHIFT)
        with notify_range(MmuNotifierEvent.MMU_NOTIFY_MIGRATE, m.vma.vm_mm, first, m.end, owner=m.pgmap_owner):
            for i in holes.tolist():
                if int(src[i]) & MIGRATE_PFN_COMPOUND:  # 7.3: a compound hole
                    _huge.migrate_vma_insert_compound_hole(m, i)
                    continue
                migrate_vma_insert_page(m, m.start + (i << PAGE_SHIFT), migrate_pfn_to_page(int(dst[i])), i)


def _migrate_device_pages_one(sys: "System", src: npt.NDArray[np.uint64], dst: npt.NDArray[np.uint64],
                              i: int, m: MigrateVma | None) -> None:
    """:func:`_migrate_device_pages` of the one entry *i* of a range with no other entry
    (no destination elsewhere either), entry by entry as the kernel's loop goes: the same
    checks and state moves as the bulk path."""
    mem = sys.mem
    s = int(src[i])
    d = int(dst[i])
    if not d & MIGRATE_PFN_VALID:
        src[i] = _U(s & ~MIGRATE_PFN_MIGRATE)
        return
    if s & MIGRATE_PFN_VALID and s & MIGRATE_PFN_MIGRATE and (s | d) & MIGRATE_PFN_COMPOUND:
        _huge.migrate_device_pages_compound(sys, src, dst, i, m)
        s = int(src[i])
    if not s & MIGRATE_PFN_MIGRATE:
        return
    if not s & MIGRATE_PFN_VALID:  # a hole: insert the new page
        assert m is not None, "a hole outside migrate_vma"
        first = m.start + (i << PAGE_SHIFT)
        with notify_range(MmuNotifierEvent.MMU_NOTIFY_MIGRATE, m.vma.vm_mm, first, m.end, owner=m.pgmap_owner):
            if s & MIGRATE_PFN_COMPOUND:  # 7.3: a compound hole
                _huge.migrate_vma_insert_compound_hole(m, i)
            else:
                migrate_vma_insert_page(m, first, d >> MIGRATE_PFN_SHIFT, i)
        return
    page = s >> MIGRATE_PFN_SHIFT
    new = d >> MIGRATE_PFN_SHIFT
    pid = int(mem.pgmap[new])
    pg = sys.pgmaps[pid - 1] if pid else None
    if pg is not None:  # to device memory: a device page of another kind, or a file page, cannot go
        bad = not (pg.is_private or pg.is_coherent)
        if not bad and not mem.flags[mem.compound_head(page)] & PG_anon:
            bad = sys.mapping_cache_of(page) is not None
        if bad:
            src[i] = _U(s & ~MIGRATE_PFN_MIGRATE)
            return
    folio_migrate_mapping(sys, new, page)


def migrate_vma_pages(m: MigrateVma) -> None:
    """Models ``mm/migrate_device.c:migrate_vma_pages()``."""
    _migrate_device_pages(m.vma.vm_mm.sys, m.src, m.dst, m.npages, m)


def migrate_device_pages(sys: "System", src: npt.NDArray[np.uint64], dst: npt.NDArray[np.uint64],
                         npages: int) -> None:
    """Models ``mm/migrate_device.c:migrate_device_pages()`` (no VMA: no holes)."""
    _migrate_device_pages(sys, src, dst, npages, None)


def migrate_device_finalize(sys: "System", src: npt.NDArray[np.uint64], dst: npt.NDArray[np.uint64],
                            npages: int, fault_folio: int = -1) -> None:
    """Models ``mm/migrate_device.c:migrate_device_finalize()``: migration entries become
    mappings of the destination, or of the source where the entry was not migrated; every
    page is unlocked and the collection and allocation references are dropped (a source
    page freed this way goes back to its allocator or driver).

    In bulk: the entries are remapped by :func:`remove_migration_ptes_folios`, the locks
    released together, and the references dropped in the order the kernel's loop drops
    them (per entry: an unused destination, the source, the destination), so pages freed
    go back to their allocator or driver in that order."""
    mem = sys.mem
    s_ = src[:npages]
    d_ = dst[:npages]
    nz = s_.nonzero()[0]
    if len(nz) == 1:  # one entry: a THP window's compound entry goes the per-folio way
        i = int(nz[0])
        s, d = int(s_[i]), int(d_[i])
        dn = d_.nonzero()[0]
        if s & MIGRATE_PFN_VALID and (len(dn) == 0 or (len(dn) == 1 and int(dn[0]) == i)):
            p, n = s >> MIGRATE_PFN_SHIFT, (d >> MIGRATE_PFN_SHIFT if d & MIGRATE_PFN_VALID else -1)
            if mem.order[p] or (n >= 0 and mem.order[n]):
                _huge.migrate_device_finalize_compound(sys, p, n, bool(s & MIGRATE_PFN_MIGRATE), fault_folio)
                sys.stats.add("migrate_vma.finalize")
                return
    if npages and _finalize_all_migrated(sys, s_, d_, fault_folio):
        sys.stats.add("migrate_vma.finalize")
        return
    sv = (s_ & _U(MIGRATE_PFN_VALID)) != 0
    dv = (d_ & _U(MIGRATE_PFN_VALID)) != 0
    page = np.where(sv, (s_ >> _U(MIGRATE_PFN_SHIFT)).astype(np.int64), -1)
    new = np.where(dv, (d_ >> _U(MIGRATE_PFN_SHIFT)).astype(np.int64), -1)
    big = (sv & (mem.order[np.maximum(page, 0)] != 0)) | (sv & dv & (mem.order[np.maximum(new, 0)] != 0))
    for i in np.flatnonzero(big).tolist():  # 7.3: THP entries, one by one
        _huge.migrate_device_finalize_compound(sys, int(page[i]), int(new[i]),
                                               bool(int(s_[i]) & MIGRATE_PFN_MIGRATE), fault_folio)
    if big.any():
        sv &= ~big
        dv &= ~big
        if not (sv | dv).any():  # only compound entries (a THP window)
            sys.stats.add("migrate_vma.finalize")
            return
        page[big] = -1
        new[big] = -1
    migrated = sv & dv & ((s_ & _U(MIGRATE_PFN_MIGRATE)) != 0)
    unused = dv & ~migrated  # a hole's page (inserted or not) or a destination not used
    sidx = np.flatnonzero(sv)
    pages = page[sidx]
    targets = np.where(migrated[sidx], new[sidx], pages)
    if len(sidx):
        remove_migration_ptes_folios(sys, pages, targets)
    if unused.any():
        folios_unlock(sys, new[unused])
    if len(sidx):
        folios_unlock(sys, pages[pages != fault_folio] if fault_folio >= 0 else pages)
        mp = page[migrated]
        mem.flags[mp] &= ~np.uint32(PG_anon | PG_anon_exclusive)
        mem.mapping[mp] = 0
    if migrated.any():
        folios_unlock(sys, new[migrated])
    # the references, in the kernel's order: per entry the unused destination, the
    # source, the migrated destination
    seq = np.stack([np.where(unused, new, -1), page, np.where(migrated, new, -1)], axis=1).reshape(-1)
    folios_put_in_order(sys, seq[seq >= 0])
    sys.stats.add("migrate_vma.finalize")


def _finalize_all_migrated(sys: "System", s_: npt.NDArray[np.uint64], d_: npt.NDArray[np.uint64],
                           fault_folio: int) -> bool:
    """:func:`migrate_device_finalize` when every entry migrated to a destination and
    all are small folios (a whole window moved): the same steps as the general path
    with fewer array passes. The destinations keep a reference (their mapping), so the
    only pages freed are sources, in entry order; returns False (nothing done) for any
    other range."""
    mem = sys.mem
    if not bool(((s_ & _VM) == _VM).all()) or not bool((d_ & _U(MIGRATE_PFN_VALID)).all()):
        return False
    page = (s_ >> _U(MIGRATE_PFN_SHIFT)).astype(np.int64)
    new = (d_ >> _U(MIGRATE_PFN_SHIFT)).astype(np.int64)
    if mem.order[page].any() or mem.order[new].any():
        return False
    remove_migration_ptes_folios(sys, page, new)
    folios_unlock(sys, page[page != fault_folio] if fault_folio >= 0 else page)
    mem.flags[page] &= ~np.uint32(PG_anon | PG_anon_exclusive)
    mem.mapping[page] = 0
    folios_unlock(sys, new)
    if bool((mem.refcount[new] > 1).all()):  # no destination is freed: sources in order
        folios_put_in_order(sys, page)
        mem.refcount[new] -= 1
    else:  # per entry the source, then the destination
        folios_put_in_order(sys, np.stack([page, new], axis=1).reshape(-1))
    return True


def migrate_vma_finalize(m: MigrateVma) -> None:
    """Models ``mm/migrate_device.c:migrate_vma_finalize()``."""
    migrate_device_finalize(m.vma.vm_mm.sys, m.src, m.dst, m.npages, m.fault_folio)


def _refuse_612_exclusive_eviction(sys: "System", pfn: int) -> None:
    """6.12 evicting a device page that only a device-exclusive entry references: the real
    kernel migrates nothing (the entry's reference fails ``folio_migrate_mapping``), then
    ``remove_migration_ptes`` turns the entry into a read-only pte and takes a reference
    it never drops (its PVMW_MIGRATION walk still matches device-exclusive entries).
    Not modelled: stop and say so rather than diverge."""
    from ..kernel.bug import NotSupportedError
    from ..kernel.rmap import page_has_device_exclusive_entry
    if page_has_device_exclusive_entry(sys, pfn):
        raise NotSupportedError(f"6.12: evicting device page {pfn:#x} that a device-exclusive entry "
                                "references (the kernel restores the entry read-only and leaks a "
                                "reference): not modelled")


def migrate_device_range(sys: "System", src: npt.NDArray[np.uint64], start: int, npages: int) -> int:
    """Models ``mm/migrate_device.c:migrate_device_range()``: select every page of the pfn
    range that is in use and can be locked (a collection reference taken), then unmap
    them to migration entries (``migrate_device_unmap``). Used to evict device memory
    without a VMA. Returns 0."""
    mem = sys.mem
    if not sys.profile.device_exclusive_mapped:
        used = (mem.refcount[start:start + npages] > 0) & (mem.mapcount[start:start + npages] == 0)
        for i in np.flatnonzero(used).tolist():
            _refuse_612_exclusive_eviction(sys, start + i)
    src[:npages] = 0
    pfns = start + np.flatnonzero(mem.refcount[start:start + npages] > 0)
    if len(pfns):
        mem.refcount[pfns] += 1
        ok = folios_trylock(sys, pfns)
        for pfn in pfns[~ok].tolist():
            folio_put(sys, pfn)
        got = pfns[ok]
        src[got - start] = (got.astype(np.uint64) << _U(MIGRATE_PFN_SHIFT)) | _U(MIGRATE_PFN_MIGRATE | MIGRATE_PFN_VALID)
        big = got[mem.order[got] != 0]
        if len(big):  # 7.3: a device THP is one compound entry; one that does not fit ends it
            nr = np.int64(1) << mem.order[big].astype(np.int64)
            over = big[big + nr > start + npages]
            if len(over):
                cut = int(over[0])
                for p in got[got >= cut].tolist():
                    folio_unlock(sys, p)
                    folio_put(sys, p)
                src[cut - start:npages] = 0
                big = big[big < cut]
            src[big - start] |= _U(MIGRATE_PFN_COMPOUND)
    migrate_device_unmap(sys, src, npages, -1)
    return 0


def migrate_device_pfns(sys: "System", src: npt.NDArray[np.uint64], npages: int) -> int:
    """Models ``mm/migrate_device.c:migrate_device_pfns()`` (7.3; 6.12 has only
    :func:`migrate_device_range`): like ``migrate_device_range`` for an array of device
    pfns that need not be contiguous (``src[i]`` holds a pfn on entry). A page in use is
    referenced and locked (``migrate_device_pfn_lock``; a tail page is not); a large
    folio makes its entry COMPOUND and the entries after it 0, and one that does not fit
    in the array ends the selection. Then the pages are unmapped. Returns 0."""
    mem = sys.mem
    i = 0
    while i < npages:
        pfn = int(src[i])
        head = mem.compound_head(pfn)
        mpfn = 0
        if head == pfn and mem.refcount[pfn] > 0:  # folio_get_nontail_page()
            mem.refcount[pfn] += 1
            if folio_trylock(sys, pfn):
                mpfn = migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE
            else:
                folio_put(sys, pfn)
        src[i] = np.uint64(mpfn)
        nr = 1 << int(mem.order[head])
        if nr > npages - i:
            if mpfn:
                folio_unlock(sys, pfn)
                folio_put(sys, pfn)
            src[i:npages] = 0
            break
        if nr > 1:
            src[i] = np.uint64(mpfn | MIGRATE_PFN_COMPOUND)
            src[i + 1:i + nr] = 0
        i += nr
    migrate_device_unmap(sys, src, npages, -1)
    return 0


def migrate_device_coherent_folio(sys: "System", pfn: int) -> int:
    """Models ``mm/migrate_device.c:migrate_device_coherent_folio()``: move one order-0
    page out of device-coherent memory into a new system page, without a VMA (what a
    FOLL_LONGTERM pin asks for). The caller holds a reference on the page, which this
    consumes. Returns 0, or -EBUSY if the page could not be unmapped or no system page
    was available (the page stays where it was)."""
    from ..kernel.pagemap import folio_lock
    mem = sys.mem
    folio_lock(sys, pfn)
    src = np.array([migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE], np.uint64)
    dst = np.zeros(1, np.uint64)
    migrate_device_unmap(sys, src, 1, -1)
    if not int(src[0]) & MIGRATE_PFN_MIGRATE:
        return -EBUSY
    new = mem.alloc_page()
    if new >= 0:
        folio_lock(sys, new)
        dst[0] = np.uint64(migrate_pfn(new))
    migrate_device_pages(sys, src, dst, 1)
    if int(src[0]) & MIGRATE_PFN_MIGRATE:
        mem.copy_pages(new, pfn)
    migrated = bool(int(src[0]) & MIGRATE_PFN_MIGRATE)
    migrate_device_finalize(sys, src, dst, 1)
    sys.stats.add("migrate_device.coherent_folio")
    return 0 if migrated else -EBUSY


from . import migrate_device_huge as _huge  # noqa: E402  (the 7.3 THP paths; imports this module)
