"""Device-private THPs in core mm: what ``mm/huge_memory.c`` does with a device-private PMD.

Linux 7.3 (profile feature ``device_private_thp``, ``CONFIG_ARCH_HAS_PMD_SOFTLEAVES``) maps
a PMD-sized device-private folio with one swap-format PMD holding a device-private entry
(``pmd_is_device_private_entry()``): ``pmd_present()`` is false, the entry's offset is the
folio's head pfn, and like a present THP PMD it holds one folio reference and one entire
mapping (``folio_add_anon_rmap_pmd``). 6.12 never creates such entries.

This module holds the device-private branches of the PMD paths of :mod:`.huge_memory`:

* ``do_huge_pmd_device_private()``: a CPU fault on the entry locks the folio and calls the
  pagemap's ``migrate_to_ram`` with the PMD's ``vm_fault``;
* ``zap_huge_pmd()`` (``zap_huge_pmd_folio``): drop the entire mapping, rss and the folio
  reference;
* ``copy_huge_pmd()`` (``copy_huge_non_present_pmd``) at fork: a writable entry becomes
  readable in the parent and the child, the folio is shared (AnonExclusive cleared);
* ``change_huge_pmd()`` (``change_non_present_huge_pmd``): a writable entry becomes
  readable (mprotect);
* ``__split_huge_pmd_locked()``: 512 device-private ptes with the same write permission,
  each holding a reference and a mapping (or, with *freeze*, 512 migration entries).

Page-state picture of a split (``D``/``d`` writable/readable device-private, ``M``
migration)::

    PMD  [ D (head pfn h, entire_mapcount 1, refcount 1) ]
    ->   [ D h | D h+1 | ... | D h+511 ]   mapcount 1 each, refcount 512 on h
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .folio import folio_put
from .mm import MM_ANONPAGES, PtRef, set_ptes
from .mm_types import VmFault, mm_counter_file
from .page_types import HPAGE_PMD_NR, PAGE_SHIFT
from .pagemap import folio_trylock, folio_unlock
from .pgtable import (
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    SWP_DEVICE_READ,
    SWP_DEVICE_WRITE,
    SWP_MIGRATION_READ,
    SWP_MIGRATION_READ_EXCLUSIVE,
    SWP_MIGRATION_WRITE,
    is_writable_device_private_entry,
    make_readable_device_private_entry,
    mk_table_entry,
    pmd_to_swp_entry,
    swp_entry_to_pmd,
    swp_offset,
    swp_offset_pfn,
)
from .physmem import PG_anon, PG_anon_exclusive
from .rmap import folio_remove_rmap_pmd, folio_try_dup_anon_rmap_pmd
from .vma import VM_UFFD_WP

if TYPE_CHECKING:
    from .vma import Vma

__all__ = (
    "change_huge_pmd_device_private", "copy_huge_pmd_device_private", "do_huge_pmd_device_private",
    "pmd_device_private_folio", "split_huge_pmd_device_private", "zap_huge_pmd_device_private",
)

_U = np.uint64
_SWP_BITS = _PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP


def pmd_device_private_folio(pmd: int) -> int:
    """``softleaf_to_folio(softleaf_from_pmd(pmd))``: the head pfn a device-private PMD
    maps."""
    return swp_offset_pfn(pmd_to_swp_entry(pmd))


def do_huge_pmd_device_private(vmf: VmFault) -> int:
    """A CPU fault on a device-private PMD: lock the folio, take a reference and call the
    pagemap's ``migrate_to_ram`` with *vmf* (``vmf.page`` the head page, ``vmf.pmd`` the
    PMD); the driver migrates the folio back (or splits it). Returns what
    ``migrate_to_ram`` returns, or 0 without calling it when the PMD changed meanwhile or
    the folio is locked by someone else (the fault is retried).

    Models ``mm/huge_memory.c:do_huge_pmd_device_private()`` (7.3)."""
    vma = vmf.vma
    mm = vma.vm_mm
    sys = mm.sys
    pmd = vmf.pmd
    assert pmd is not None
    ptl = mm.pmd_lock(pmd)
    if pmd.get() != vmf.orig_pmd:
        mm.spin_unlock(ptl)
        return 0
    head = pmd_device_private_folio(vmf.orig_pmd)
    vmf.page = head
    if not folio_trylock(sys, head):
        mm.spin_unlock(ptl)
        return 0
    sys.mem.refcount[head] += 1  # folio_get
    mm.spin_unlock(ptl)
    pgmap = sys.pgmap_of(head)
    assert pgmap is not None and pgmap.ops.migrate_to_ram is not None
    sys.stats.add("fault.migrate_to_ram")
    sys.stats.add("thp.fault_device_private_pmd")
    try:
        return int(pgmap.ops.migrate_to_ram(vmf))
    finally:
        folio_unlock(sys, head)
        folio_put(sys, head)


def zap_huge_pmd_device_private(vma: "Vma", e: int) -> list[int]:
    """``zap_huge_pmd()`` of a device-private PMD (already cleared by the caller): the
    entire mapping and the rss go; returns the folio whose reference the caller drops
    (device-private folios are pinned by their mappings).

    Models the device-private part of ``mm/huge_memory.c:zap_huge_pmd_folio()``."""
    mm = vma.vm_mm
    mem = mm.sys.mem
    head = pmd_device_private_folio(e)
    folio_remove_rmap_pmd(mem, head)
    if mem.flags[head] & PG_anon:
        mm.add_mm_counter(MM_ANONPAGES, -HPAGE_PMD_NR)
    else:
        mm.add_mm_counter(mm_counter_file(mm.sys, head), -HPAGE_PMD_NR)
    return [head]


def copy_huge_pmd_device_private(dst_vma: "Vma", src_vma: "Vma", dst_pmd: PtRef, src_pmd: PtRef, e: int) -> int:
    """``copy_huge_pmd()`` of a device-private PMD at fork: a writable entry becomes
    readable in the parent too (soft-dirty and uffd-wp kept), the folio gains a reference
    and an entire mapping and stops being AnonExclusive, the child's rss grows by a PMD
    and its entry loses uffd-wp unless the child's VMA is uffd-wp protected. Returns 0.

    Models the device-private part of ``mm/huge_memory.c:copy_huge_non_present_pmd()``."""
    mem = src_vma.vm_mm.sys.mem
    ent = pmd_to_swp_entry(e)
    if is_writable_device_private_entry(ent):
        e = swp_entry_to_pmd(make_readable_device_private_entry(swp_offset(ent))) | (e & _SWP_BITS)
        src_pmd.set(e)
    head = pmd_device_private_folio(e)
    mem.refcount[head] += 1  # folio_get
    folio_try_dup_anon_rmap_pmd(mem, head)
    dst_vma.vm_mm.add_mm_counter(MM_ANONPAGES, HPAGE_PMD_NR)
    if not dst_vma.vm_flags & VM_UFFD_WP:
        e &= ~_PAGE_SWP_UFFD_WP
    dst_pmd.set(e)
    return 0


def change_huge_pmd_device_private(vma: "Vma", pmd: PtRef, e: int) -> int:
    """``change_huge_pmd()`` of a device-private PMD: a writable entry becomes readable
    (keeping uffd-wp; 7.3 drops soft-dirty here), a readable one is left alone. Returns 0:
    the kernel reports a non-present PMD as "locked, nothing to flush" (1), which adds no
    pages to mprotect's count.

    Models the device-private part of ``mm/huge_memory.c:change_non_present_huge_pmd()``."""
    ent = pmd_to_swp_entry(e)
    if is_writable_device_private_entry(ent):
        pmd.set(swp_entry_to_pmd(make_readable_device_private_entry(swp_offset(ent))) | (e & _PAGE_SWP_UFFD_WP))
    return 0


def _swp_ptes(type_: npt.NDArray[np.uint64] | int, head: int, bits: int) -> npt.NDArray[np.uint64]:
    """512 swap-format ptes of *type_* for the pages of the folio at *head*."""
    pfns = np.arange(head, head + HPAGE_PMD_NR, dtype=np.uint64)
    return (_U(type_) << _U(59)) | (pfns << _U(PAGE_SHIFT)) | _U(bits)


def split_huge_pmd_device_private(vma: "Vma", haddr: int, pmd: PtRef, tbl: npt.NDArray[np.uint64], tid: int,
                                  freeze: bool = False) -> None:
    """``__split_huge_pmd_locked()`` of a device-private PMD: the new pte table *tbl*
    gets 512 device-private entries (writable if the PMD was; soft-dirty and uffd-wp
    copied; young/dirty do not exist in swap entries), the folio gains 511 references and
    one mapping per page (AnonExclusive pages stay exclusive) and loses its entire
    mapping. With *freeze* (splitting for migration) the ptes are migration entries
    instead (writable / readable-exclusive for an exclusive page / readable), the folio
    is shared first and the PMD's reference is dropped.

    Models the device-private branches of ``mm/huge_memory.c:__split_huge_pmd_locked()``."""
    sys = vma.vm_mm.sys
    mem = sys.mem
    old = pmd.get()
    ent = pmd_to_swp_entry(old)
    head = swp_offset_pfn(ent)
    write = is_writable_device_private_entry(ent)
    bits = old & _SWP_BITS
    anon_exclusive = bool(mem.flags[head] & PG_anon_exclusive)
    nr = HPAGE_PMD_NR
    if freeze:
        if anon_exclusive:  # folio_try_share_anon_rmap_pmd(): nothing pins device pages
            mem.flags[head:head + nr] &= ~np.uint32(PG_anon_exclusive)
        t = (SWP_MIGRATION_WRITE if write else
             SWP_MIGRATION_READ_EXCLUSIVE if anon_exclusive else SWP_MIGRATION_READ)
        set_ptes(vma.vm_mm, tbl, 0, _swp_ptes(t, head, bits), nr)
    else:
        mem.refcount[head] += nr - 1  # folio_ref_add
        mem.mapcount[head:head + nr] += 1  # folio_add_anon_rmap_ptes
        if anon_exclusive:
            mem.flags[head:head + nr] |= PG_anon_exclusive
        set_ptes(vma.vm_mm, tbl, 0, _swp_ptes(SWP_DEVICE_WRITE if write else SWP_DEVICE_READ, head, bits), nr)
    folio_remove_rmap_pmd(mem, head)
    pmd.set(mk_table_entry(tid))
    if freeze:
        folio_put(sys, head)
