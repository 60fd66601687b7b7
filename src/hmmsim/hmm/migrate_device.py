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
pages whose pagemap owner is ``pgmap_owner``). THP: a PMD-mapped THP is split when collected,
as 6.12 does (7.3's whole-THP migration to device-private PMDs is not modelled yet).
The range is at most one page table (drivers step 512 pages at a time); the per-page work
is done entry by entry within that table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..kernel.errno import EINVAL
from ..kernel.folio import folio_put
from ..kernel.huge_memory import split_folio, split_huge_pmd
from ..kernel.migrate import (
    folio_migrate_mapping,
    make_migration_pte,
    remove_migration_ptes,
)
from ..kernel.mm import MM_ANONPAGES, PtRef
from ..kernel.mmu_notifier import MmuNotifierEvent, notify_range
from ..kernel.page_types import PAGE_SHIFT, PAGE_SIZE, pte_index
from ..kernel.pagemap import folio_trylock, folio_unlock
from ..kernel.pagewalk import MmWalk, MmWalkOps, walk_page_range
from ..kernel.pgtable import (
    _PAGE_DIRTY,
    _PAGE_RW,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
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
from ..kernel.physmem import PG_anon, PG_anon_exclusive, PG_dirty
from ..kernel.rmap import anon_vma_prepare, folio_add_new_anon_rmap
from ..kernel.userfaultfd_k import userfaultfd_missing
from ..kernel.vma import VM_WRITE, vma_is_anonymous

if TYPE_CHECKING:
    from ..kernel.system import System
    from ..kernel.vma import Vma

__all__ = (
    "MIGRATE_PFN_MIGRATE", "MIGRATE_PFN_SHIFT", "MIGRATE_PFN_VALID", "MIGRATE_PFN_WRITE",
    "MIGRATE_VMA_SELECT_DEVICE_COHERENT", "MIGRATE_VMA_SELECT_DEVICE_PRIVATE",
    "MIGRATE_VMA_SELECT_SYSTEM", "MigrateVma", "migrate_device_finalize", "migrate_device_pages",
    "migrate_device_range", "migrate_pfn", "migrate_pfn_to_page",
    "migrate_vma_collect_hole", "migrate_vma_collect_pmd", "migrate_vma_finalize",
    "migrate_vma_insert_page", "migrate_vma_pages", "migrate_vma_setup",
)

#: ``include/linux/migrate.h`` encodings of ``src[]``/``dst[]``
MIGRATE_PFN_VALID = 1 << 0
MIGRATE_PFN_MIGRATE = 1 << 1
MIGRATE_PFN_WRITE = 1 << 3
MIGRATE_PFN_SHIFT = 6
#: ``enum migrate_vma_direction``
MIGRATE_VMA_SELECT_SYSTEM = 1 << 0
MIGRATE_VMA_SELECT_DEVICE_PRIVATE = 1 << 1
MIGRATE_VMA_SELECT_DEVICE_COHERENT = 1 << 2


def migrate_pfn(pfn: int) -> int:
    """``migrate_pfn()``."""
    return (pfn << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID


def migrate_pfn_to_page(mpfn: int) -> int:
    """``migrate_pfn_to_page()``: the pfn, or -1 when not VALID."""
    return int(mpfn) >> MIGRATE_PFN_SHIFT if int(mpfn) & MIGRATE_PFN_VALID else -1


class MigrateVma:
    """``struct migrate_vma``."""

    __slots__ = ("vma", "src", "dst", "start", "end", "npages", "cpages", "pgmap_owner",
                 "flags", "fault_page")

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
    if pmd_present(e) and pmd_leaf(e):
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
    try:
        for addr in range(start, end, PAGE_SIZE):
            i = pte_index(addr)
            pte = int(tbl[i])
            mpfn, page = 0, -1
            if pte == 0:
                if vma_is_anonymous(vma):
                    mpfn = MIGRATE_PFN_MIGRATE
                    m.cpages += 1
            elif not pte_present(pte):
                ent = pte_to_swp_entry(pte)
                if is_device_private_entry(ent):
                    page = swp_offset_pfn(ent)
                    pg = sys.pgmap_of(page)
                    if m.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE and pg is not None and pg.owner is m.pgmap_owner:
                        mpfn = migrate_pfn(page) | MIGRATE_PFN_MIGRATE
                        if is_writable_device_private_entry(ent):
                            mpfn |= MIGRATE_PFN_WRITE
            else:
                mpfn, page = _select_present(m, vma, addr, pte)
            if mpfn & MIGRATE_PFN_VALID:
                head = mem.compound_head(page)
                if not mem.mapping[head] or mem.order[head]:
                    mpfn = 0
                else:
                    mpfn = _collect_one(m, vma, tbl, i, pte, page, mpfn)
            m.dst[m.npages] = 0
            m.src[m.npages] = mpfn
            m.npages += 1
    finally:
        mm.pte_unmap_unlock(tid)
    return 0


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
    if mem.order[mem.compound_head(page)]:
        return False
    if mem.pgmap[page]:
        extra += 1
    cache = sys.mapping_cache_of(page)
    if cache is not None:
        extra += 1
    return int(mem.refcount[page]) - extra <= int(mem.mapcount[page])


def migrate_device_unmap(sys: "System", src: npt.NDArray[np.uint64], npages: int, fault_page: int) -> int:
    """Models ``mm/migrate_device.c:migrate_device_unmap()``: pages still mapped elsewhere
    are unmapped (``try_to_migrate``); those still mapped or with extra references are
    restored and deselected. Returns the number of entries still to migrate."""
    from ..kernel.migrate import try_to_migrate
    mem = sys.mem
    unmapped = restore = 0
    for i in range(npages):
        s = int(src[i])
        page = migrate_pfn_to_page(s)
        if page < 0:
            if s & MIGRATE_PFN_MIGRATE:
                unmapped += 1
            continue
        if mem.folio_mapcount(page) > 0:
            try_to_migrate(sys, page)
        if mem.folio_mapcount(page) > 0 or not migrate_vma_check_page(sys, page, fault_page):
            src[i] = np.uint64(s & ~MIGRATE_PFN_MIGRATE)
            restore += 1
            continue
        unmapped += 1
    for i in range(npages):
        if not restore:
            break
        s = int(src[i])
        page = migrate_pfn_to_page(s)
        if page < 0 or s & MIGRATE_PFN_MIGRATE:
            continue
        remove_migration_ptes(sys, page, page)
        src[i] = 0
        folio_unlock(sys, page)
        folio_put(sys, page)
        restore -= 1
    return unmapped


def migrate_vma_setup(m: MigrateVma) -> int:
    """Models ``mm/migrate_device.c:migrate_vma_setup()``: validate the range (within one
    VMA, not hugetlb/special/DAX, a device-private fault page), collect and unmap.
    Returns 0 or ``-EINVAL``."""
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
    state to the destination (a file page cannot go to device memory)."""
    mem = sys.mem
    holes: list[int] = []
    for i in range(npages):
        s_ = int(src[i])
        new = migrate_pfn_to_page(int(dst[i]))
        page = migrate_pfn_to_page(s_)
        if new < 0:
            src[i] = np.uint64(s_ & ~MIGRATE_PFN_MIGRATE)
            continue
        if page < 0:
            if s_ & MIGRATE_PFN_MIGRATE:
                assert m is not None, "a hole outside migrate_vma"
                holes.append(i)
            continue
        if not s_ & MIGRATE_PFN_MIGRATE:
            continue
        newpg = sys.pgmap_of(new) if mem.pgmap[new] else None
        if newpg is not None:
            if not (newpg.is_private or newpg.is_coherent) or sys.mapping_cache_of(page) is not None:
                src[i] = np.uint64(s_ & ~MIGRATE_PFN_MIGRATE)
                continue
        folio_migrate_mapping(sys, new, page)
    if holes:
        assert m is not None
        first = m.start + (holes[0] << PAGE_SHIFT)
        with notify_range(MmuNotifierEvent.MMU_NOTIFY_MIGRATE, m.vma.vm_mm, first, m.end, owner=m.pgmap_owner):
            for i in holes:
                migrate_vma_insert_page(m, m.start + (i << PAGE_SHIFT), migrate_pfn_to_page(int(dst[i])), i)


def migrate_vma_pages(m: MigrateVma) -> None:
    """Models ``mm/migrate_device.c:migrate_vma_pages()``."""
    _migrate_device_pages(m.vma.vm_mm.sys, m.src, m.dst, m.npages, m)


def migrate_device_pages(sys: "System", src: npt.NDArray[np.uint64], dst: npt.NDArray[np.uint64],
                         npages: int) -> None:
    """Models ``mm/migrate_device.c:migrate_device_pages()`` (no VMA: no holes)."""
    _migrate_device_pages(sys, src, dst, npages, None)


def migrate_device_finalize(sys: "System", src: npt.NDArray[np.uint64], dst: npt.NDArray[np.uint64],
                            npages: int) -> None:
    """Models ``mm/migrate_device.c:migrate_device_finalize()``: migration entries become
    mappings of the destination, or of the source where the entry was not migrated; every
    page is unlocked and the collection and allocation references are dropped (a source
    page freed this way goes back to its allocator or driver)."""
    mem = sys.mem
    for i in range(npages):
        new = migrate_pfn_to_page(int(dst[i]))
        page = migrate_pfn_to_page(int(src[i]))
        if page < 0:
            if new >= 0:
                folio_unlock(sys, new)
                folio_put(sys, new)
            continue
        target = new
        if not int(src[i]) & MIGRATE_PFN_MIGRATE or new < 0:
            if new >= 0:
                folio_unlock(sys, new)
                folio_put(sys, new)
            target = page
        remove_migration_ptes(sys, page, target)
        folio_unlock(sys, page)
        if target != page:
            mem.flags[page] &= ~np.uint32(PG_anon | PG_anon_exclusive)
            mem.mapping[page] = 0
        folio_put(sys, page)
        if target != page:
            folio_unlock(sys, target)
            folio_put(sys, target)
    sys.stats.add("migrate_vma.finalize")


def migrate_vma_finalize(m: MigrateVma) -> None:
    """Models ``mm/migrate_device.c:migrate_vma_finalize()``."""
    migrate_device_finalize(m.vma.vm_mm.sys, m.src, m.dst, m.npages)


def migrate_device_range(sys: "System", src: npt.NDArray[np.uint64], start: int, npages: int) -> int:
    """Models ``mm/migrate_device.c:migrate_device_range()``: select every page of the pfn
    range that is in use and can be locked (a collection reference taken), then unmap
    them to migration entries (``migrate_device_unmap``). Used to evict device memory
    without a VMA. Returns 0."""
    mem = sys.mem
    for i in range(npages):
        pfn = start + i
        src[i] = 0
        if mem.refcount[pfn] <= 0:
            continue
        mem.refcount[pfn] += 1
        if not folio_trylock(sys, pfn):
            folio_put(sys, pfn)
            continue
        src[i] = np.uint64(migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE)
    migrate_device_unmap(sys, src, npages, -1)
    return 0
