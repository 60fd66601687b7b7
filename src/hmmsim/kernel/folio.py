"""Dropping folio references: ``folio_put()``, ``folios_put()`` and the destructor
dispatch of ``__folio_put()`` (``include/linux/mm.h``, ``mm/swap.c``).

The last reference frees a folio by its kind: ZONE_DEVICE pages go back to their
driver through the pagemap (``free_zone_device_folio``), hugetlb folios to the pool
(``free_huge_folio``), everything else to the page allocator. The pool and the pagemaps
are reached through the :class:`~hmmsim.kernel.system.System`, so this module depends on
nothing above the page allocator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .physmem import PG_hugetlb, PG_reserved

if TYPE_CHECKING:
    from .system import System

__all__ = ("folio_put", "folios_put", "folios_put_in_order", "free_folio")


def free_folio(sys: "System", head: int) -> None:
    """``__folio_put()``: the last reference to the folio at *head* is gone."""
    mem = sys.mem
    head = mem.compound_head(head)
    pgmap = sys.pgmap_of(head)
    if pgmap is not None:
        pgmap.free_zone_device_folio(sys, head)
        return
    if mem.flags[head] & PG_hugetlb:
        sys.hugetlb.free_huge_folio(head)
        return
    if mem.flags[head] & PG_reserved:  # the zero pages are never freed
        raise AssertionError(f"freeing reserved page {head:#x}")
    sys.stats.add("page.free")
    mem.free_pages([head])


def folio_put(sys: "System", pfn: int) -> None:
    """``folio_put(page_folio(page))``: drop a reference (held by the folio's head); the
    last one frees the folio."""
    mem = sys.mem
    head = mem.compound_head(pfn)
    mem.refcount[head] -= 1
    if mem.refcount[head] == 0:
        free_folio(sys, head)
    elif mem.refcount[head] < 0:
        raise AssertionError(f"refcount underflow on pfn {head:#x}")


def folios_put(sys: "System", heads: npt.NDArray[np.int64]) -> None:
    """``folios_put()``: drop one reference on each (possibly repeated) folio head."""
    if len(heads) == 0:
        return
    mem = sys.mem
    if len(heads) == 1 or bool((heads[1:] > heads[:-1]).all()):  # no repeats (a zapped range)
        mem.refcount[heads] -= 1
        uniq = heads
    else:
        np.subtract.at(mem.refcount, heads, 1)
        uniq = np.unique(heads)
    rc = mem.refcount[uniq]
    if (rc < 0).any():
        raise AssertionError(f"refcount underflow on pfn {int(uniq[rc < 0][0]):#x}")
    dead = uniq[rc == 0]
    if len(dead) == 0:
        return
    plain = (mem.pgmap[dead] == 0) & ((mem.flags[dead] & (PG_hugetlb | PG_reserved)) == 0)
    if plain.all():
        sys.stats.add("page.free", len(dead))
        mem.free_pages(dead)
    else:
        for h in dead.tolist():
            free_folio(sys, h)


def _sorted_distinct(a: npt.NDArray[np.int64]) -> bool:
    return bool((a[1:] != a[:-1]).all())


def folios_put_in_order(sys: "System", pfns: npt.NDArray[np.int64]) -> None:
    """:func:`folio_put` of each page of *pfns*, in that order, in bulk: the folios whose
    last reference goes are freed in the order a loop of :func:`folio_put` frees them
    (ZONE_DEVICE pages go back to their driver in that order, a run of one pagemap at a
    time through :meth:`~hmmsim.kernel.memremap.DevPagemap.free_zone_device_folios`);
    plain RAM pages go back to the allocator in one batch (their order does not matter
    there). A page given twice is put twice, one call at a time."""
    mem = sys.mem
    heads = mem.heads(np.asarray(pfns, np.int64))
    n = len(heads)
    if n == 0:
        return
    if n > 1 and not bool((heads[1:] > heads[:-1]).all()) and not _sorted_distinct(np.sort(heads)):
        for h in heads.tolist():
            folio_put(sys, h)
        return
    mem.refcount[heads] -= 1
    rc = mem.refcount[heads]
    if (rc < 0).any():
        bad = int(heads[rc < 0][0])
        mem.refcount[heads] += 1
        raise AssertionError(f"refcount underflow on pfn {bad:#x}")
    dead = heads[rc == 0]
    if len(dead) == 0:
        return
    pids = mem.pgmap[dead]
    plain = (pids == 0) & ((mem.flags[dead] & (PG_hugetlb | PG_reserved)) == 0)
    if plain.any():
        sys.stats.add("page.free", int(plain.sum()))
        mem.free_pages(dead[plain])
        if plain.all():
            return
        dead, pids = dead[~plain], pids[~plain]
    # runs of one kind: the pages of one pagemap, or one other page (hugetlb, reserved)
    cuts = np.flatnonzero((np.diff(pids) != 0) | (pids[1:] == 0)) + 1
    for run in np.split(np.arange(len(dead)), cuts):
        pid = int(pids[run[0]])
        part = dead[run]
        pgmap = sys.pgmaps[pid - 1] if pid else None
        if pgmap is not None and not mem.order[part].any():
            pgmap.free_zone_device_folios(sys, part)
        else:
            for h in part.tolist():
                free_folio(sys, h)
