"""Migration entries: unmapping a folio for migration, waiting on it, and remapping it.

Models the generic pieces of ``mm/migrate.c`` and ``mm/rmap.c`` that both ordinary page
migration and device migration (``migrate_vma_*``, :mod:`hmmsim.hmm.migrate_device`)
build on:

* ``try_to_migrate()``: replace every mapping of a locked folio by a migration entry
  (writable / readable-exclusive / readable, keeping young, dirty, soft-dirty and uffd-wp),
  one ``MMU_NOTIFY_CLEAR`` per mapping; a PMD-mapped THP gets a PMD migration entry;
* ``migration_entry_wait()``: a fault on a migration entry sleeps until the folio is
  unlocked (in the model: other simulated threads run until it is, else deadlock);
* ``remove_migration_ptes(src, dst)``: turn the migration entries back into mappings of
  *dst* (which is *src* when the migration is abandoned);
* :func:`migrate_folio_unmap` / :func:`migrate_folio_move`: ``migrate_pages()`` for one
  folio, split in two so that the state in between can be observed and raced against.

Batches (device migration of a page table or a GiB at a time): :func:`make_migration_ptes`
and :func:`restore_migration_ptes` are the array twins of :func:`make_migration_pte` and
the entry rebuilt by ``remove_migration_pte``; :func:`remove_migration_ptes_folios` is
:func:`remove_migration_ptes` of many small anonymous folios at once (the same rmap walk,
a VMA and a page table at a time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .bug import KernelOops
from .folio import folio_put
from .mm import (
    MM,
    MM_ANONPAGES,
    PtRef,
    pmd_assert_locked,
    ptlock_ptr,
    set_ptes,
    spin_lock,
    spin_unlock,
)
from .memremap import PGMAP_KIND_PRIVATE, pgmap_kinds
from .mmu_notifier import MmuNotifierEvent, notify_range
from .page_types import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_MASK,
    pte_index,
)
from .pagemap import folio_test_locked, folio_trylock, folio_unlock, folio_wait_locked
from .pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    _PAGE_UFFD_WP,
    _SWP_MIG_DIRTY,
    _SWP_MIG_YOUNG,
    _SWP_TYPE_SHIFT,
    PTE_PFN_MASK,
    SWP_DEVICE_READ,
    SWP_DEVICE_WRITE,
    SWP_MIGRATION_READ,
    SWP_MIGRATION_READ_EXCLUSIVE,
    SWP_MIGRATION_WRITE,
    is_device_exclusive_entry,
    is_device_private_entry,
    is_migration_entry,
    is_readable_exclusive_migration_entry,
    is_swap_pmd,
    is_writable_device_private_entry,
    is_writable_migration_entry,
    make_readable_device_private_entry,
    make_readable_exclusive_migration_entry,
    make_readable_migration_entry,
    make_writable_device_private_entry,
    make_writable_migration_entry,
    mk_table_entry,
    pfn_pte,
    pmd_leaf,
    pmd_present,
    pmd_to_swp_entry,
    pte_pfn,
    pte_present,
    pte_to_swp_entry,
    swp_entry_to_pmd,
    swp_entry_to_pte,
    swp_offset,
    swp_offset_pfn,
)
from .physmem import PG_anon, PG_anon_exclusive, PG_dirty, PG_swapbacked, PG_uptodate
from .rmap import AnonVma, page_vma_mapped_pmd, rmap_walk
from .vma import is_cow_mapping

if TYPE_CHECKING:
    from .physmem import PhysMem
    from .system import System
    from .vma import Vma

__all__ = (
    "change_pmd_migration_entry", "copy_pmd_migration_entry", "is_pmd_migration_entry",
    "make_migration_pte", "make_migration_ptes", "migrate_folio_move", "migrate_folio_unmap",
    "migration_entry_wait", "pmd_migration_entry_wait", "remove_migration_pmd", "remove_migration_ptes",
    "remove_migration_ptes_folios", "restore_migration_ptes", "set_pmd_migration_entry",
    "split_huge_pmd_migration_entry", "try_to_migrate", "zap_pmd_migration_entry",
)

_U = np.uint64


def is_pmd_migration_entry(pmd: int) -> bool:
    return is_swap_pmd(pmd) and is_migration_entry(pmd_to_swp_entry(pmd))


def make_migration_pte(pte: int, pfn: int, anon_exclusive: bool) -> int:
    """The migration entry that replaces present *pte* of page *pfn*
    (``try_to_migrate_one``)."""
    if pte & _PAGE_RW:
        ent = make_writable_migration_entry(pfn)
    elif anon_exclusive:
        ent = make_readable_exclusive_migration_entry(pfn)
    else:
        ent = make_readable_migration_entry(pfn)
    if pte & _PAGE_ACCESSED:
        ent |= _SWP_MIG_YOUNG
    if pte & _PAGE_DIRTY:
        ent |= _SWP_MIG_DIRTY
    out = swp_entry_to_pte(ent)
    if pte & _PAGE_SOFT_DIRTY:
        out |= _PAGE_SWP_SOFT_DIRTY
    if pte & _PAGE_UFFD_WP:
        out |= _PAGE_SWP_UFFD_WP
    return out


def make_migration_ptes(ptes: npt.NDArray[np.uint64], pfns: npt.NDArray[np.int64],
                        anon_exclusive: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint64]:
    """:func:`make_migration_pte` of every (pte, pfn, anon_exclusive) triple of the arrays."""
    ptes = np.asarray(ptes, np.uint64)
    typ = np.where((ptes & _U(_PAGE_RW)) != 0, _U(SWP_MIGRATION_WRITE),
                   np.where(anon_exclusive, _U(SWP_MIGRATION_READ_EXCLUSIVE), _U(SWP_MIGRATION_READ)))
    off = np.asarray(pfns, np.int64).astype(np.uint64)
    off |= np.where((ptes & _U(_PAGE_ACCESSED)) != 0, _U(_SWP_MIG_YOUNG), _U(0))
    off |= np.where((ptes & _U(_PAGE_DIRTY)) != 0, _U(_SWP_MIG_DIRTY), _U(0))
    out = (typ << _U(_SWP_TYPE_SHIFT)) | (off << _U(12))
    out |= np.where((ptes & _U(_PAGE_SOFT_DIRTY)) != 0, _U(_PAGE_SWP_SOFT_DIRTY), _U(0))
    out |= np.where((ptes & _U(_PAGE_UFFD_WP)) != 0, _U(_PAGE_SWP_UFFD_WP), _U(0))
    return out


def restore_migration_ptes(vma: "Vma", migs: npt.NDArray[np.uint64], dsts: npt.NDArray[np.int64],
                           device_private: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint64]:
    """The entries that replace migration entries *migs* with mappings of pages *dsts* in
    *vma* (``remove_migration_pte``; :func:`_restored_pte` of each): a device-private entry
    where *device_private*, else a present pte with the VMA's protection, young, dirty and
    writable as the migration entry recorded, soft-dirty and uffd-wp kept."""
    migs = np.asarray(migs, np.uint64)
    d = np.asarray(dsts, np.int64).astype(np.uint64)
    writable = (migs >> _U(_SWP_TYPE_SHIFT)) == _U(SWP_MIGRATION_WRITE)
    any_dev = bool(device_private.any())
    all_dev = any_dev and bool(device_private.all())
    # the soft-dirty and uffd-wp bits of the entry, as both forms carry them
    swp_bits = migs & _U(_PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP)
    dev = pte = None
    if any_dev:
        dev = (np.where(writable, _U(SWP_DEVICE_WRITE), _U(SWP_DEVICE_READ)) << _U(_SWP_TYPE_SHIFT)) | (d << _U(12))
        dev |= swp_bits
        if all_dev:
            return dev
    off = migs >> _U(12)
    pte = ((d << _U(12)) & _U(PTE_PFN_MASK)) | _U(vma.vm_page_prot & ~_PAGE_RW)
    pte |= np.where((off & _U(_SWP_MIG_YOUNG)) != 0, _U(_PAGE_ACCESSED), _U(0))
    pte |= np.where((off & _U(_SWP_MIG_DIRTY)) != 0, _U(_PAGE_DIRTY), _U(0))
    pte |= np.where(writable, _U(_PAGE_RW), _U(0))
    if swp_bits.any():
        pte |= np.where((migs & _U(_PAGE_SWP_SOFT_DIRTY)) != 0, _U(_PAGE_SOFT_DIRTY), _U(0))
        pte |= np.where((migs & _U(_PAGE_SWP_UFFD_WP)) != 0, _U(_PAGE_UFFD_WP), _U(0))
    return pte if dev is None else np.where(device_private, dev, pte)


def migration_entry_wait(mm: MM, pmd: PtRef, addr: int) -> None:
    """``migration_entry_wait()``: if *addr* still holds a migration entry, sleep until
    its folio is unlocked (the migration finished or was abandoned)."""
    got = mm.pte_offset_map_lock(pmd)
    if got is None:
        return
    tbl, tid = got
    pte = int(tbl[pte_index(addr)])
    mm.pte_unmap_unlock(tid)
    if pte == 0 or pte_present(pte):
        return
    ent = pte_to_swp_entry(pte)
    if not is_migration_entry(ent):
        return
    mm.sys.stats.add("migrate.entry_wait")
    folio_wait_locked(mm.sys, swp_offset_pfn(ent))


def pmd_migration_entry_wait(mm: MM, pmd: PtRef) -> None:
    """``pmd_migration_entry_wait()``."""
    e = pmd.get()
    if not is_pmd_migration_entry(e):
        return
    mm.sys.stats.add("migrate.entry_wait")
    folio_wait_locked(mm.sys, swp_offset_pfn(pte_to_swp_entry(e)))


def _mapped_pte(vma: "Vma", addr: int) -> tuple[PtRef, int] | None:
    """The pte (or huge pmd) slot mapping *addr*: (ref, level) with level 1 or 2."""
    mm = vma.vm_mm
    pmd = mm.pmd_ref(addr)
    if pmd is None:
        return None
    e = pmd.get()
    if e == 0:
        return None
    if not pmd_present(e) or pmd_leaf(e):
        return pmd, 2
    tid = mm.pte_table(pmd)
    return PtRef(mm.sys.pt.table(tid), pte_index(addr), tid, mm), 1


def _migrate_device_private_pte(vma: "Vma", ref: PtRef, addr: int, e: int, p: int) -> None:
    """The non-present branch of ``try_to_migrate_one()``: a device-private entry (or, in
    7.3, a device-exclusive one) of page *p* becomes a migration entry (writable if the entry was; else readable-exclusive
    for an exclusive anon page), keeping soft-dirty and uffd-wp."""
    ent = pte_to_swp_entry(e)
    mm = vma.vm_mm
    # 7.3's device-exclusive entries map their page too (never writable here: the
    # write bit is read as a device-private one); 6.12's are not mappings
    if not (is_device_private_entry(ent) or (is_device_exclusive_entry(ent)
                                             and mm.sys.profile.device_exclusive_mapped)) \
            or swp_offset_pfn(ent) != p:
        return
    mem = mm.sys.mem
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mm, addr, addr + PAGE_SIZE):
        excl = bool(mem.flags[p] & PG_anon_exclusive)
        if is_device_private_entry(ent) and is_writable_device_private_entry(ent):
            mig = make_writable_migration_entry(p)
        elif excl:
            mig = make_readable_exclusive_migration_entry(p)
        else:
            mig = make_readable_migration_entry(p)
        ref.set(swp_entry_to_pte(mig) | (e & (_PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP)))
        mem.mapcount[p] -= 1
        mem.refcount[mem.compound_head(p)] -= 1


def try_to_migrate(sys: "System", pfn: int) -> bool:
    """``try_to_migrate()``: replace every mapping of the (locked) folio of *pfn* by a
    migration entry. Returns True if the folio is no longer mapped."""
    mem = sys.mem
    head = mem.compound_head(pfn)
    assert folio_test_locked(sys, head), "try_to_migrate() needs the folio locked"
    nr = 1 << int(mem.order[head])
    # pte mappings (present, device-private) count in mapcount: a large folio with none
    # is mapped by PMDs only, which the head's rmap walk finds
    pages = range(head, head + nr) if nr == 1 or mem.mapcount[head:head + nr].any() else range(head, head + 1)
    for p in pages:
        for vma, addr in list(rmap_walk(mem, p)):
            found = _mapped_pte(vma, addr)
            if found is None:
                continue
            ref, level = found
            e = ref.get()
            if level == 2:
                if page_vma_mapped_pmd(e, head):
                    mm = vma.vm_mm
                    haddr = addr & PMD_MASK
                    with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mm, haddr, haddr + HPAGE_PMD_SIZE):
                        ptl = mm.pmd_lock(ref)
                        try:
                            set_pmd_migration_entry(vma, ref, haddr, head)
                        finally:
                            mm.spin_unlock(ptl)
                continue
            if level == 1 and e and not pte_present(e):
                _migrate_device_private_pte(vma, ref, addr, e, p)
                continue
            if not pte_present(e) or pte_pfn(e) != p:
                continue
            mm = vma.vm_mm
            with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mm, addr, addr + PAGE_SIZE):
                ptl = ptlock_ptr(ref.tid)
                spin_lock(mm, ptl)
                try:
                    excl = bool(mem.flags[p] & PG_anon_exclusive)
                    if e & _PAGE_DIRTY:
                        mem.flags[head] |= PG_dirty
                    ref.set(make_migration_pte(e, p, excl))
                    mem.mapcount[p] -= 1
                    mem.refcount[head] -= 1
                finally:
                    spin_unlock(mm, ptl)
    sys.stats.add("migrate.try_to_migrate")
    return mem.folio_mapcount(head) == 0


def _restored_pte(vma: "Vma", mig: int, dst: int) -> int:
    """The mapping of *dst* that replaces migration entry *mig* (``remove_migration_pte``)."""
    mem = vma.vm_mm.sys.mem
    ent = pte_to_swp_entry(mig)
    writable = is_writable_migration_entry(ent)
    if mem.pgmap[dst] != 0 and vma.vm_mm.sys.pgmap_of(dst).is_private:  # type: ignore[union-attr]
        e = make_writable_device_private_entry(dst) if writable else make_readable_device_private_entry(dst)
        out = swp_entry_to_pte(e)
        if mig & _PAGE_SWP_SOFT_DIRTY:
            out |= _PAGE_SWP_SOFT_DIRTY
        if mig & _PAGE_SWP_UFFD_WP:
            out |= _PAGE_SWP_UFFD_WP
        return out
    pte = pfn_pte(dst, vma.vm_page_prot)
    off = swp_offset(ent)
    if off & _SWP_MIG_YOUNG:
        pte |= _PAGE_ACCESSED
    if off & _SWP_MIG_DIRTY:
        pte |= _PAGE_DIRTY
    if writable:
        pte |= _PAGE_RW
    else:
        pte &= ~_PAGE_RW
    if mig & _PAGE_SWP_SOFT_DIRTY:
        pte |= _PAGE_SOFT_DIRTY
    if mig & _PAGE_SWP_UFFD_WP:
        pte |= _PAGE_UFFD_WP
    return pte


def _only_pmd_vmas(mem: "PhysMem", head: int, nr: int, pmd_vmas: set["Vma"]) -> bool:
    """Whether every VMA that may map a page of the anonymous folio *head* maps it with
    the PMD at the head's address (*pmd_vmas*): then no page needs its own rmap walk."""
    obj = mem.mapping_obj(int(mem.mapping[head]))
    if not isinstance(obj, AnonVma):
        return False
    first = int(mem.index[head])
    for vma in obj.vmas:
        if vma in pmd_vmas:
            continue
        lo = vma.address_of_index(first)
        if lo + (nr << 12) > vma.vm_start and lo < vma.vm_end:
            return False
    return True


def remove_migration_ptes(sys: "System", src: int, dst: int) -> int:
    """``remove_migration_ptes()``: every migration entry of folio *src* becomes a mapping
    of folio *dst* (the same folio when a migration is abandoned). Returns the number of
    entries restored. No notifier fires (non-present to present)."""
    mem = sys.mem
    src = mem.compound_head(src)
    dst = mem.compound_head(dst)
    nr = 1 << int(mem.order[src])
    done = 0
    pmd_vmas: set["Vma"] = set()  # VMAs where a PMD covers the whole (large) folio
    for i in range(nr):
        if i == 1 and _only_pmd_vmas(mem, src, nr, pmd_vmas):
            break
        for vma, addr in list(rmap_walk(mem, src + i)):
            if vma in pmd_vmas:
                continue
            found = _mapped_pte(vma, addr)
            if found is None:
                continue
            ref, level = found
            e = ref.get()
            if level == 2:
                if i == 0:
                    pmd_vmas.add(vma)
                if page_vma_mapped_pmd(e, src, migration=True):
                    remove_migration_pmd(vma, ref, addr & PMD_MASK, dst)
                    done += 1
                continue
            if pte_present(e) or e == 0:
                continue
            ent = pte_to_swp_entry(e)
            if not is_migration_entry(ent) or swp_offset_pfn(ent) != src + i:
                continue
            new = dst + i
            excl = is_writable_migration_entry(ent) or is_readable_exclusive_migration_entry(ent)
            ref.set(_restored_pte(vma, e, new))
            mem.mapcount[new] += 1
            mem.refcount[dst] += 1
            if mem.flags[dst] & PG_anon:
                if excl:
                    mem.flags[new] |= PG_anon_exclusive
                else:
                    mem.flags[new] &= ~np.uint32(PG_anon_exclusive)
            done += 1
    sys.stats.add("migrate.remove_migration_ptes")
    return done


def remove_migration_ptes_folios(sys: "System", srcs: npt.NDArray[np.int64],
                                 dsts: npt.NDArray[np.int64]) -> None:
    """:func:`remove_migration_ptes` ``(srcs[i], dsts[i])`` for every i, in bulk: small
    anonymous folios are found through their anon_vma's VMAs (the rmap walk of
    :func:`rmap_walk`) a VMA and a page table at a time; other folios (file pages, large
    folios) one by one. Counted as one ``migrate.remove_migration_ptes`` per folio and one
    ``pgtable.set_pte`` per entry restored; one ``set_ptes`` scheduling point per table."""
    mem = sys.mem
    srcs = np.asarray(srcs, np.int64)
    dsts = np.asarray(dsts, np.int64)
    if len(srcs) == 0:
        return
    if len(srcs) == 1 and not sys.ls.has_hooks:  # one folio (a CPU fault's migration): its rmap walk
        remove_migration_ptes(sys, int(srcs[0]), int(dsts[0]))
        return
    simple = (((mem.head_off[srcs] | mem.head_off[dsts]) == 0) & ((mem.order[srcs] | mem.order[dsts]) == 0)
              & ((mem.flags[srcs] & PG_anon) != 0))
    mids = mem.mapping[srcs]
    for i in np.flatnonzero(~simple).tolist():
        remove_migration_ptes(sys, int(srcs[i]), int(dsts[i]))
    if not simple.all():
        srcs, dsts, mids = srcs[simple], dsts[simple], mids[simple]
    if len(srcs) == 0:
        return
    sys.stats.add("migrate.remove_migration_ptes", len(srcs))
    index = mem.index[srcs]
    dst_anon = (mem.flags[dsts] & PG_anon) != 0
    pids = mem.pgmap[dsts]
    if pids.any():
        dev_private = pgmap_kinds(sys)[pids] == PGMAP_KIND_PRIVATE
    else:
        dev_private = np.zeros(len(dsts), np.bool_)
    umids = mids[:1] if bool((mids == mids[0]).all()) else np.unique(mids)
    for mid in umids.tolist():
        obj = mem.mapping_obj(mid)
        if not isinstance(obj, AnonVma):
            continue
        sel = np.flatnonzero(mids == mid) if len(umids) > 1 else np.arange(len(srcs))
        for vma in list(obj.vmas):
            addrs = vma.vm_start + ((index[sel] - vma.vm_pgoff) << PAGE_SHIFT)
            inside = (addrs >= vma.vm_start) & (addrs < vma.vm_end)
            if not inside.any():
                continue
            _remove_migration_ptes_vma(sys, vma, sel[inside], addrs[inside], srcs, dsts, dst_anon, dev_private)


def _remove_migration_ptes_vma(sys: "System", vma: "Vma", sel: npt.NDArray[np.int64],
                               addrs: npt.NDArray[np.int64], srcs: npt.NDArray[np.int64],
                               dsts: npt.NDArray[np.int64], dst_anon: npt.NDArray[np.bool_],
                               dev_private: npt.NDArray[np.bool_]) -> None:
    """The part of :func:`remove_migration_ptes_folios` in one VMA: the folios *sel* that
    *vma* may map at *addrs*, grouped by page table."""
    mm = vma.vm_mm
    mem = sys.mem
    keys = addrs >> 21
    if keys[0] == keys[-1] and bool((keys == keys[0]).all()):
        groups = [np.arange(len(keys))]  # one page table (a migration window)
    else:
        order = np.argsort(keys, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(keys[order])) + 1)
    for grp in groups:
        a0 = int(addrs[grp[0]])
        pmd = mm.pmd_ref(a0)
        if pmd is None:
            continue
        e = pmd.get()
        if e and not pmd_present(e) and is_pmd_migration_entry(e):
            # only after a THP was split under another process's PMD migration entry
            # (7.3, conventions item 27): remove_migration_pmd meets an order-0 folio
            head = swp_offset_pfn(pte_to_swp_entry(e))
            hitp = np.flatnonzero(srcs[sel[grp]] == head)
            if len(hitp):
                remove_migration_pmd(vma, pmd, a0 & PMD_MASK, int(dsts[sel[grp][hitp[0]]]))
            continue
        if e == 0 or not pmd_present(e) or pmd_leaf(e):
            continue  # no pte table: a PMD entry never holds a small folio's migration entry
        tid = mm.pte_table(pmd)
        tbl = sys.pt.table(tid)
        idx = (addrs[grp] >> PAGE_SHIFT) & 511
        ptes = tbl[idx]
        s_ = srcs[sel[grp]]
        typ = ptes >> _U(_SWP_TYPE_SHIFT)
        hit = (((ptes & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) == 0)  # (a migration type is never 0)
               & (typ >= _U(SWP_MIGRATION_READ)) & (typ <= _U(SWP_MIGRATION_WRITE))
               & (((ptes >> _U(12)) & _U((1 << 40) - 1)) == s_.astype(np.uint64)))
        if bool(hit.all()):  # every folio mapped here (a migration window)
            j, migs, at = sel[grp], ptes, idx
        elif not hit.any():
            continue
        else:
            j, migs, at = sel[grp][hit], ptes[hit], idx[hit]
        new = dsts[j]
        vals = restore_migration_ptes(vma, migs, new, dev_private[j])
        sys.stats.add("pgtable.set_pte", len(j))
        if sys.ls.has_hooks:
            sys.ls.schedule_point("set_ptes")
        tbl[at] = vals
        mem.mapcount[new] += 1
        mem.refcount[new] += 1
        t = migs >> _U(_SWP_TYPE_SHIFT)
        excl = (t == _U(SWP_MIGRATION_WRITE)) | (t == _U(SWP_MIGRATION_READ_EXCLUSIVE))
        an = dst_anon[j]
        mem.flags[new[an & excl]] |= np.uint32(PG_anon_exclusive)
        mem.flags[new[an & ~excl]] &= ~np.uint32(PG_anon_exclusive)


def folio_migrate_mapping(sys: "System", dst: int, src: int) -> None:
    """``folio_migrate_mapping()`` + ``folio_migrate_flags()``: *dst* takes *src*'s
    place (mapping, index, anon/dirty/exclusive state)."""
    mem = sys.mem
    nr = 1 << int(mem.order[src])
    mem.mapping[dst] = mem.mapping[src]
    mem.index[dst:dst + nr] = mem.index[src:src + nr]
    keep = np.uint32(PG_anon | PG_anon_exclusive | PG_dirty | PG_swapbacked | PG_uptodate)
    mem.flags[dst:dst + nr] |= mem.flags[src:src + nr] & keep
    cache = sys.mapping_cache_of(src)
    if cache is not None:
        idx = int(mem.index[src])
        cache.pages[idx] = dst
        mem.refcount[src] -= 1
        mem.refcount[dst] += 1


class MigrationTicket:
    """One folio between :func:`migrate_folio_unmap` and :func:`migrate_folio_move`."""

    __slots__ = ("src",)

    def __init__(self, src: int) -> None:
        self.src = src


def migrate_folio_unmap(sys: "System", pfn: int) -> MigrationTicket | None:
    """First half of ``migrate_pages()`` for one small folio: lock it, take the
    isolation reference, and replace its mappings by migration entries. Returns None
    (nothing changed) if the folio is locked by someone else or is not a small mapped
    anon/file page."""
    mem = sys.mem
    head = mem.compound_head(pfn)
    if mem.order[head] or mem.refcount[head] <= 0 or not folio_trylock(sys, head):
        return None
    mem.refcount[head] += 1
    try:
        try_to_migrate(sys, head)
    except BaseException:
        # a notifier raised part way: put back the mappings already replaced, unlock,
        # drop the isolation reference (what migrate_folio_move(abandon=True) does)
        remove_migration_ptes(sys, head, head)
        folio_unlock(sys, head)
        folio_put(sys, head)
        raise
    return MigrationTicket(head)


def migrate_folio_move(sys: "System", t: MigrationTicket, abandon: bool = False) -> int:
    """Second half: copy to a new page and remap there (or, if *abandon*, remap the old
    page), unlock, drop the isolation reference. Returns the pfn now mapped."""
    mem = sys.mem
    src = t.src
    dst = src if abandon else mem.alloc_page()
    if dst < 0:
        dst = src
    if dst != src:
        mem.copy_pages(dst, src)
        folio_migrate_mapping(sys, dst, src)
        mem.refcount[dst] -= 1  # the allocation reference; mappings add their own below
    remove_migration_ptes(sys, src, dst)
    folio_unlock(sys, src)
    if dst != src:
        mem.flags[src] &= ~np.uint32(PG_anon | PG_anon_exclusive)
        mem.mapping[src] = 0
    folio_put(sys, src)
    sys.stats.add("migrate.pages")
    return dst


# -- PMD migration entries: installing and removing them ------------------------------------
def set_pmd_migration_entry(vma: "Vma", pmd: PtRef, haddr: int, head: int) -> int:
    """Replace the PMD mapping folio *head* (a present THP PMD, or in 7.3 a
    device-private PMD) by a PMD migration entry: writable if the mapping was, else
    readable-exclusive for an AnonExclusive page, else readable; young/dirty from a
    present PMD (a dirty one dirties the folio); soft-dirty and uffd-wp kept. The entire
    mapping and the mapping's folio reference go; the folio is shared first
    (``folio_try_share_anon_rmap_pmd``: it cannot fail here, nothing pins). Returns 0.
    The caller holds the folio lock and the PMD lock (asserted) and has started an
    ``MMU_NOTIFY_CLEAR`` of the PMD.

    Models ``mm/huge_memory.c:set_pmd_migration_entry()``."""
    mm = vma.vm_mm
    pmd_assert_locked(mm, pmd, "set_pmd_migration_entry")
    mem = mm.sys.mem
    old = pmd.get()
    pmd.set(0)  # pmdp_invalidate() / pmdp_huge_get_and_clear()
    present = pte_present(old)
    if present:
        writable = bool(old & _PAGE_RW)
        soft = _PAGE_SWP_SOFT_DIRTY if old & _PAGE_SOFT_DIRTY else 0
        uffd = _PAGE_SWP_UFFD_WP if old & _PAGE_UFFD_WP else 0
    else:
        writable = is_writable_device_private_entry(pmd_to_swp_entry(old))
        soft = old & _PAGE_SWP_SOFT_DIRTY
        uffd = old & _PAGE_SWP_UFFD_WP
    nr = 1 << int(mem.order[head])
    anon_exclusive = bool(mem.flags[head] & PG_anon) and bool(mem.flags[head] & PG_anon_exclusive)
    if anon_exclusive:
        mem.flags[head:head + nr] &= ~np.uint32(PG_anon_exclusive)
    if writable:
        ent = make_writable_migration_entry(head)
    elif anon_exclusive:
        ent = make_readable_exclusive_migration_entry(head)
    else:
        ent = make_readable_migration_entry(head)
    if present and old & _PAGE_ACCESSED:
        ent |= _SWP_MIG_YOUNG
    if present and old & _PAGE_DIRTY:
        mem.flags[head] |= PG_dirty
        ent |= _SWP_MIG_DIRTY
    pmd.set(swp_entry_to_pmd(ent) | soft | uffd)
    mem.entire_mapcount[head] -= 1  # folio_remove_rmap_pmd
    mem.refcount[head] -= 1  # folio_put (the caller's references keep it)
    mm.sys.stats.add("migrate.set_pmd_migration_entry")
    return 0


def remove_migration_pmd(vma: "Vma", pmd: PtRef, haddr: int, folio: int) -> None:
    """Turn the PMD migration entry at *pmd* into a mapping of *folio* (the destination,
    or the source when the migration is abandoned): a present huge PMD with the VMA's
    protection, writable if the entry was, old unless the entry was young, dirty if the
    entry and the folio are; for a device-private *folio* (7.3) a device-private PMD
    (writable if the entry was; soft-dirty and uffd-wp kept). The folio gains a reference
    and an entire mapping (every page AnonExclusive unless the entry was plain readable).
    No notifier fires (non-present to present).

    Models ``mm/huge_memory.c:remove_migration_pmd()``."""
    sys = vma.vm_mm.sys
    mem = sys.mem
    if not mem.order[folio]:
        # 7.3: a fork child's PMD was unmapped with the whole THP, the migrating process
        # split only its own PMD (order-0 destination): the child gets 2 MiB of a 4 KiB page
        raise KernelOops("remove_migration_pmd: a PMD migration entry is remapped to an order-0 "
                         "folio (the THP was split for an order-0 destination while another "
                         "process's PMD still pointed at it; bad mapcount/rss, conventions item 27)")
    e = pmd.get()
    ent = pte_to_swp_entry(e)
    off = swp_offset(ent)
    write = is_writable_migration_entry(ent)
    mem.refcount[folio] += 1  # folio_get
    pgmap = sys.pgmap_of(folio)
    if pgmap is not None and pgmap.is_private:
        dev = make_writable_device_private_entry(folio) if write else make_readable_device_private_entry(folio)
        pmde = swp_entry_to_pmd(dev) | (e & (_PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP))
    else:
        pmde = pfn_pte(folio, vma.vm_page_prot) | _PAGE_PSE
        if e & _PAGE_SWP_SOFT_DIRTY:
            pmde |= _PAGE_SOFT_DIRTY
        pmde = pmde | _PAGE_RW if write else pmde & ~_PAGE_RW
        if e & _PAGE_SWP_UFFD_WP:
            pmde |= _PAGE_UFFD_WP
        pmde = pmde | _PAGE_ACCESSED if off & _SWP_MIG_YOUNG else pmde & ~_PAGE_ACCESSED
        if mem.flags[folio] & PG_dirty and off & _SWP_MIG_DIRTY:
            pmde |= _PAGE_DIRTY
    nr = 1 << int(mem.order[folio])
    if mem.flags[folio] & PG_anon:
        if write or is_readable_exclusive_migration_entry(ent):
            mem.flags[folio:folio + nr] |= PG_anon_exclusive
        else:
            mem.flags[folio:folio + nr] &= ~np.uint32(PG_anon_exclusive)
    mem.entire_mapcount[folio] += 1  # folio_add_anon_rmap_pmd / folio_add_file_rmap_pmd
    pmd.set(pmde)
    sys.stats.add("migrate.remove_migration_pmd")


# -- PMD migration entries in the generic paths --------------------------------------------------
def split_huge_pmd_migration_entry(vma: "Vma", haddr: int, pmd: PtRef, tbl: npt.NDArray[np.uint64], tid: int) -> None:
    """``__split_huge_pmd_locked()`` for a PMD migration entry: 512 pte migration entries."""
    e = pmd.get()
    ent = pte_to_swp_entry(e)
    head = swp_offset_pfn(ent)
    t = (e >> 59) & 0x1F
    bits = e & (_PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP | (3 << 52))
    pfns = np.arange(head, head + HPAGE_PMD_NR, dtype=np.uint64)
    set_ptes(vma.vm_mm, tbl, 0, (_U(t) << _U(59)) | (pfns << _U(12)) | _U(bits), len(tbl))
    pmd.set(mk_table_entry(tid))


def zap_pmd_migration_entry(vma: "Vma", e: int) -> list[int]:
    """``zap_huge_pmd()`` of a PMD migration entry: rss only (migration holds the refs)."""
    head = swp_offset_pfn(pte_to_swp_entry(e))
    if vma.vm_mm.sys.mem.flags[head] & PG_anon:
        vma.vm_mm.add_mm_counter(MM_ANONPAGES, -HPAGE_PMD_NR)
    return []


def copy_pmd_migration_entry(dst_vma: "Vma", src_vma: "Vma", dst_pmd: PtRef, src_pmd: PtRef, e: int) -> int:
    """``copy_huge_pmd()`` of a PMD migration entry: writable becomes readable in both."""
    ent = pte_to_swp_entry(e)
    if is_writable_migration_entry(ent) and is_cow_mapping(src_vma.vm_flags):
        e = swp_entry_to_pte(make_readable_migration_entry(swp_offset(ent))) | _PAGE_PSE
        src_pmd.set(e)
    dst_pmd.set(e)
    dst_vma.vm_mm.add_mm_counter(MM_ANONPAGES, HPAGE_PMD_NR)
    return 0


def change_pmd_migration_entry(vma: "Vma", pmd: PtRef, e: int) -> int:
    """``change_huge_pmd()`` of a PMD migration entry: writable becomes readable."""
    ent = pte_to_swp_entry(e)
    if is_writable_migration_entry(ent):
        pmd.set(swp_entry_to_pte(make_readable_migration_entry(swp_offset(ent))) | (e & _PAGE_PSE))
        return HPAGE_PMD_NR
    return 0

