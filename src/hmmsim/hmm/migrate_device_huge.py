"""7.3's whole-THP device migration (``mm/migrate_device.c`` with
``CONFIG_ARCH_HAS_PMD_SOFTLEAVES``): the compound-entry paths of ``migrate_vma_*`` and
``migrate_device_*``, kept apart from the order-0 code of :mod:`.migrate_device`, which
calls in here at a few branch points when the profile has ``device_private_thp``.

With ``MIGRATE_VMA_SELECT_COMPOUND`` a PMD-aligned 2 MiB window is collected as *one*
entry carrying ``MIGRATE_PFN_COMPOUND`` (the 511 entries after it stay 0):

* a PMD-mapped THP or a device-private PMD of the caller's owner: the PMD becomes a PMD
  migration entry at once (``set_pmd_migration_entry``);
* an empty PMD range or a huge zero PMD (anonymous VMAs): a compound hole.

The driver then gives a compound destination (a device or system THP) or 512 order-0
destinations. ``__migrate_device_pages`` moves the folio whole, inserts a THP for a
compound hole (:func:`migrate_vma_insert_huge_pmd_page`), or splits: an unmapped source
folio with order-0 destinations is split (:func:`migrate_vma_split_unmapped_folio`, the
PMD migration entry becoming 512 pte migration entries), a compound hole with order-0
destinations gets 512 pages inserted one by one, and an order-0 source with a compound
destination is not migrated. ``migrate_device_finalize`` remaps a compound entry through
:func:`remove_migration_pmd` (to a device-private PMD or a normal PMD).

Without SELECT_COMPOUND, or for an unaligned window, a THP (or device THP) met during the
collection is split first (:func:`migrate_vma_split_folio`) and migrated page by page.

Page states of one 2 MiB window, sys -> device-private THP::

    PMD -> THP (present)    --collect-->   PMD migration entry (folio locked, 1 ref)
                            --pages-->     device THP takes over mapping/index/flags
                            --finalize-->  PMD -> device-private entry of the device THP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..kernel.errno import EINVAL, ENOENT, ENOMEM
from ..kernel.folio import folio_put
from ..kernel.huge_memory import folio_split_unmapped, split_folio, split_huge_pmd_address, thp_vma_suitable_order
from ..kernel.migrate import remove_migration_pmd, set_pmd_migration_entry
from ..kernel.mm import MM_ANONPAGES, PtRef
from ..kernel.page_types import HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PAGE_SHIFT, PAGE_SIZE, PMD_MASK
from ..kernel.pagemap import folio_lock, folio_trylock, folio_unlock
from ..kernel.pgtable import (
    _PAGE_DIRTY,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    is_device_private_entry,
    is_migration_entry,
    is_writable_device_private_entry,
    make_readable_device_private_entry,
    make_writable_device_private_entry,
    pfn_pte,
    pmd_leaf,
    pmd_present,
    pmd_to_swp_entry,
    pmd_trans_huge,
    pte_pfn,
    swp_entry_to_pmd,
    swp_offset_pfn,
)
from ..kernel.physmem import PG_anon, PG_anon_exclusive, PG_uptodate
from ..kernel.rmap import anon_vma_prepare, folio_add_new_anon_rmap_pmd, rmap_walk
from ..kernel.userfaultfd_k import userfaultfd_missing
from ..kernel.vma import VM_WRITE
from .migrate_device import (
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SHIFT,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_pfn,
    migrate_pfn_to_page,
    migrate_vma_collect_hole,
    migrate_vma_collect_skip,
    migrate_vma_insert_page,
)

if TYPE_CHECKING:
    from ..kernel.pagewalk import MmWalk
    from ..kernel.system import System

__all__ = (
    "migrate_device_finalize_compound",
    "migrate_device_pages_compound",
    "migrate_vma_collect_hole_compound",
    "migrate_vma_collect_huge_pmd",
    "migrate_vma_insert_compound_hole",
    "migrate_vma_insert_huge_pmd_page",
    "migrate_vma_split_folio",
    "migrate_vma_split_unmapped_folio",
)

_U = np.uint64
_SWP_BITS = _PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP


def _pmd_aligned(start: int, end: int) -> bool:
    return not (start | end) & (HPAGE_PMD_SIZE - 1)


# -- collection ------------------------------------------------------------------------------------
def migrate_vma_collect_hole_compound(m: MigrateVma, start: int, end: int, walk: "MmWalk") -> bool:
    """The compound branch of ``migrate_vma_collect_hole()`` (7.3): with
    ``MIGRATE_VMA_SELECT_COMPOUND`` and a PMD-aligned ``[start, end)`` one compound hole
    entry is collected and the rest of the range as skipped entries (a later split fills
    them). Returns False when the branch does not apply (the caller collects per page)."""
    if not m.flags & MIGRATE_VMA_SELECT_COMPOUND or not _pmd_aligned(start, end):
        return False
    m.src[m.npages] = _U(MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND)
    m.dst[m.npages] = 0
    m.npages += 1
    m.cpages += 1
    migrate_vma_collect_skip(start + PAGE_SIZE, end, walk)
    return True


def migrate_vma_collect_huge_pmd(pmd: PtRef, start: int, end: int, walk: "MmWalk") -> int:
    """Models ``mm/migrate_device.c:migrate_vma_collect_huge_pmd()``: a PMD-mapped THP
    (SELECT_SYSTEM; the huge zero page counts as a hole) or a device-private PMD of the
    caller's owner (SELECT_DEVICE_PRIVATE) is locked and, with SELECT_COMPOUND and an
    aligned window, collected as one compound entry with its PMD turned into a migration
    entry. Otherwise the folio is split (``split_folio``) and the caller walks the ptes.

    Returns 0 when the range is collected, ``-ENOENT`` when the caller must go on with
    the pte table."""
    m: MigrateVma = walk.private
    vma = walk.vma
    assert vma is not None
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    ptl = mm.pmd_lock(pmd)
    e = pmd.get()
    if e == 0:
        mm.spin_unlock(ptl)
        return migrate_vma_collect_hole(start, end, -1, walk)
    write = 0
    if pmd_trans_huge(e):
        if not m.flags & MIGRATE_VMA_SELECT_SYSTEM:
            mm.spin_unlock(ptl)
            return migrate_vma_collect_skip(start, end, walk)
        if mem.is_huge_zero_pfn(pte_pfn(e)):
            mm.spin_unlock(ptl)
            return migrate_vma_collect_hole(start, end, -1, walk)
        head = mem.compound_head(pte_pfn(e))
        if e & _PAGE_RW:
            write = MIGRATE_PFN_WRITE
    elif not pmd_present(e):
        ent = pmd_to_swp_entry(e)
        if not is_device_private_entry(ent) or not m.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE:
            mm.spin_unlock(ptl)
            return migrate_vma_collect_skip(start, end, walk)
        head = mem.compound_head(swp_offset_pfn(ent))
        pg = sys.pgmap_of(head)
        if pg is None or pg.owner is not m.pgmap_owner:
            mm.spin_unlock(ptl)
            return migrate_vma_collect_skip(start, end, walk)
        if is_writable_device_private_entry(ent):
            write = MIGRATE_PFN_WRITE
    else:
        mm.spin_unlock(ptl)
        return -ENOENT
    mem.refcount[head] += 1  # folio_get
    if head != m.fault_folio and not folio_trylock(sys, head):
        mm.spin_unlock(ptl)
        folio_put(sys, head)
        return migrate_vma_collect_skip(start, end, walk)
    if m.flags & MIGRATE_VMA_SELECT_COMPOUND and _pmd_aligned(start, end):
        m.src[m.npages] = _U(migrate_pfn(head) | write | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND)
        m.dst[m.npages] = 0
        m.npages += 1
        m.cpages += 1
        set_pmd_migration_entry(vma, pmd, start & PMD_MASK, head)
        migrate_vma_collect_skip(start + PAGE_SIZE, end, walk)
        mm.spin_unlock(ptl)
        sys.stats.add("migrate_vma.collect_huge_pmd")
        return 0
    mm.spin_unlock(ptl)
    if not mem.order[head]:
        return -ENOENT
    ret = split_folio(sys, head)
    if head != m.fault_folio:
        folio_unlock(sys, head)
    folio_put(sys, head)
    if ret:
        return migrate_vma_collect_skip(start, end, walk)
    if pmd.get() == 0:
        return migrate_vma_collect_hole(start, end, -1, walk)
    return -ENOENT


def migrate_vma_split_folio(sys: "System", head: int) -> int:
    """Models ``mm/migrate_device.c:migrate_vma_split_folio()``: a large folio met at
    the pte level (a PTE-mapped THP, or a device THP whose PMD was split) is locked and
    split; the reference the caller took is consumed. Returns 0 or the split's error.
    (The model's CPU fault does not lock the fault page, so the fault folio needs no
    special case here.)"""
    folio_lock(sys, head)
    ret = split_folio(sys, head)
    folio_unlock(sys, head)
    folio_put(sys, head)
    return ret


def migrate_vma_split_unmapped_folio(m: MigrateVma, idx: int, addr: int, head: int) -> int:
    """Models ``mm/migrate_device.c:migrate_vma_split_unmapped_folio()``: the PMD
    migration entry at *addr* becomes 512 pte migration entries (``split_huge_pmd_address``
    with freeze), the unmapped folio is split (``folio_split_unmapped``; a device-private
    folio's driver hears of it through ``folio_split``), and ``src[idx..idx+511]`` become
    order-0 entries with the compound entry's flags. Returns 0 or the split's error."""
    sys = m.vma.vm_mm.sys
    sys.mem.refcount[head] += 1  # folio_get: the freezing split drops the PMD's reference
    split_huge_pmd_address(m.vma, addr, True)
    nr = 1 << int(sys.mem.order[head])
    ret = folio_split_unmapped(sys, head, 0)
    if ret:
        return ret
    for p in range(head + 1, head + nr):  # the new folios stay locked (unmapped split)
        folio_lock(sys, p)
    s = int(m.src[idx]) & ~MIGRATE_PFN_COMPOUND
    flags = s & ((1 << MIGRATE_PFN_SHIFT) - 1)
    pfn = s >> MIGRATE_PFN_SHIFT
    n = min(HPAGE_PMD_NR, len(m.src) - idx)
    m.src[idx:idx + n] = ((np.arange(pfn, pfn + n, dtype=np.uint64) << _U(MIGRATE_PFN_SHIFT)) | _U(flags))
    return 0


# -- migrate_vma_pages ------------------------------------------------------------------------------
def migrate_device_pages_compound(sys: "System", src: npt.NDArray[np.uint64], dst: npt.NDArray[np.uint64],
                                  i: int, m: MigrateVma | None) -> bool:
    """The THP checks of ``__migrate_device_pages()`` for entry *i* of a mapped source
    (7.3): a compound source with an order-0 destination is split (VMA migrations) or
    left (``migrate_device_pages``); an order-0 source with a compound destination is
    not migrated. Returns True when the entry is done, False when the caller goes on
    with it as an order-0 entry (possibly after the split) or a whole folio."""
    s = int(src[i])
    d = int(dst[i])
    if not s & MIGRATE_PFN_MIGRATE:
        return False
    if s & MIGRATE_PFN_COMPOUND and not d & MIGRATE_PFN_COMPOUND:
        if m is None:
            src[i] = _U(s & ~(MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND))
            return True
        head = migrate_pfn_to_page(s)
        if migrate_vma_split_unmapped_folio(m, i, m.start + (i << PAGE_SHIFT), head):
            src[i] = _U(s & ~(MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND))
            return True
        sys.stats.add("migrate_vma.split_unmapped_folio")
        return False
    if d & MIGRATE_PFN_COMPOUND and not s & MIGRATE_PFN_COMPOUND:
        src[i] = _U(s & ~MIGRATE_PFN_MIGRATE)
    return False


def migrate_vma_insert_compound_hole(m: MigrateVma, i: int) -> None:
    """The hole branch of ``__migrate_device_pages()`` for a compound hole entry (7.3):
    with a compound destination one THP is inserted
    (:func:`migrate_vma_insert_huge_pmd_page`); with order-0 destinations the entry
    loses COMPOUND and each of the 512 pages is inserted like an ordinary hole."""
    src, dst = m.src, m.dst
    addr = m.start + (i << PAGE_SHIFT)
    if int(dst[i]) & MIGRATE_PFN_COMPOUND:
        migrate_vma_insert_huge_pmd_page(m, addr, migrate_pfn_to_page(int(dst[i])), i)
        return
    src[i] = _U(int(src[i]) & ~MIGRATE_PFN_COMPOUND)
    for j in range(min(HPAGE_PMD_NR, m.npages - i)):
        src[i + j] = _U(int(src[i + j]) | MIGRATE_PFN_MIGRATE)
        new = migrate_pfn_to_page(int(dst[i + j]))
        if new < 0:
            src[i + j] = _U(int(src[i + j]) & ~MIGRATE_PFN_MIGRATE)
            continue
        migrate_vma_insert_page(m, addr + (j << PAGE_SHIFT), new, i + j)


def migrate_vma_insert_huge_pmd_page(m: MigrateVma, addr: int, head: int, i: int) -> int:
    """Models ``mm/migrate_device.c:migrate_vma_insert_huge_pmd_page()``: map the new
    THP *head* (device-private: a device-private PMD; coherent or system: a normal PMD,
    writable and dirty if the VMA is) where a compound hole (empty PMD or huge zero PMD)
    was collected, like ``__do_huge_pmd_anonymous_page``. On an obstacle (the PMD is no
    longer empty, userfaultfd missing mode) the 512 entries are deselected and 0 is
    returned; ``-EINVAL`` when the 2 MiB block does not fit the VMA (the caller's abort
    deselects only entry *i*)."""
    vma = m.vma
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    if not thp_vma_suitable_order(vma, addr, HPAGE_PMD_ORDER):
        m.src[i] = _U(int(m.src[i]) & ~MIGRATE_PFN_MIGRATE)
        return -EINVAL
    if anon_vma_prepare(vma):
        m.src[i] = _U(int(m.src[i]) & ~MIGRATE_PFN_MIGRATE)
        return -ENOMEM
    if mem.order[head] != HPAGE_PMD_ORDER:  # folio_set_order()
        mem.prep_compound(head, HPAGE_PMD_ORDER)
    mem.flags[head] |= PG_uptodate
    pg = sys.pgmap_of(head) if mem.pgmap[head] else None
    write = bool(vma.vm_flags & VM_WRITE)
    n = min(HPAGE_PMD_NR, len(m.src) - i)
    if pg is not None and pg.is_private:
        entry = swp_entry_to_pmd(make_writable_device_private_entry(head) if write
                                 else make_readable_device_private_entry(head))
    elif pg is not None and not pg.is_coherent:
        m.src[i:i + n] &= _U(~MIGRATE_PFN_MIGRATE & 0xFFFF_FFFF_FFFF_FFFF)
        return 0
    else:
        entry = pfn_pte(head, vma.vm_page_prot) | _PAGE_PSE
        if write:
            entry |= _PAGE_RW | _PAGE_DIRTY
    pmd = mm.pmd_ref(addr, alloc=True)
    assert pmd is not None
    ptl = mm.pmd_lock(pmd)
    try:
        e = pmd.get()
        ok = not userfaultfd_missing(vma)  # back off, do not deliver the fault
        if ok and e and not (pmd_leaf(e) and pmd_present(e) and mem.is_huge_zero_pfn(pte_pfn(e))):
            ok = False
        if not ok:
            m.src[i:i + n] &= _U(~MIGRATE_PFN_MIGRATE & 0xFFFF_FFFF_FFFF_FFFF)
            return 0
        mm.add_mm_counter(MM_ANONPAGES, HPAGE_PMD_NR)
        folio_add_new_anon_rmap_pmd(mem, head, vma, addr & PMD_MASK)
        mem.refcount[head] += 1
        pmd.set(entry)
    finally:
        mm.spin_unlock(ptl)
    sys.stats.add("thp.fault_alloc")
    return 0


# -- finalize ---------------------------------------------------------------------------------------
def _remove_migration_pmds(sys: "System", src: int, dst: int) -> bool:
    """``remove_migration_ptes()`` of a THP that only PMD migration entries point at:
    one rmap walk of the head. Returns False if some mapping of the folio is at the pte
    level (the caller then runs the generic per-page walk)."""
    mem = sys.mem
    all_pmd = True
    for vma, addr in list(rmap_walk(mem, src)):
        pmd = vma.vm_mm.pmd_ref(addr)
        e = pmd.get() if pmd is not None else 0
        if e and e & _PAGE_PSE and not pmd_present(e):
            ent = pmd_to_swp_entry(e)
            if is_migration_entry(ent) and swp_offset_pfn(ent) == src:
                remove_migration_pmd(vma, pmd, addr & PMD_MASK, dst)  # type: ignore[arg-type]
                continue
        if e and not (e & _PAGE_PSE):
            all_pmd = False
    sys.stats.add("migrate.remove_migration_ptes")
    return all_pmd


def migrate_device_finalize_compound(sys: "System", src: int, dst: int, migrated: bool,
                                     fault_folio: int = -1) -> None:
    """``__migrate_device_finalize()`` for an entry whose source is a large folio *src*
    (*dst* -1: none): the migration entries become mappings of the destination if the
    entry migrated, else of the source again; locks and collection/allocation
    references are dropped."""
    from ..kernel.migrate import remove_migration_ptes
    mem = sys.mem
    if dst >= 0 and not migrated:
        folio_unlock(sys, dst)
        folio_put(sys, dst)
        dst = -1
    target = src if dst < 0 else dst
    if mem.order[target] == 0 or not _remove_migration_pmds(sys, src, target):
        remove_migration_ptes(sys, src, target)
    nr = 1 << int(mem.order[src])
    if src != fault_folio:
        folio_unlock(sys, src)
    if target != src:
        mem.flags[src:src + nr] &= ~np.uint32(PG_anon | PG_anon_exclusive)
        mem.mapping[src:src + nr] = 0
    folio_put(sys, src)
    if target != src:
        folio_unlock(sys, target)
        folio_put(sys, target)
