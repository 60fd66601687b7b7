"""ZONE_DEVICE memory: ``struct dev_pagemap`` and its page lifecycle.

Models ``include/linux/memremap.h`` and ``mm/memremap.c``: the memory types, the pagemap
ops (``page_free``, ``migrate_to_ram``), ``memremap_pages()`` (validation: a private
pagemap needs ``migrate_to_ram``, ``page_free`` and an owner; a coherent one ``page_free``
and an owner), ``zone_device_page_init()`` (refcount 1, locked) and the free path taken
when a device page's last reference goes away (``page_free`` is called, the page stays
with the driver at refcount 0).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .bug import WARN
from .errno import EINVAL, ENOMEM
from .locking import DeadlockError
from .mm_types import VmFault
from .page_types import PAGE_SHIFT
from .pagemap import folio_lock, folios_lock
from .physmem import PG_anon, PG_anon_exclusive, PG_data, PG_dirty, PG_head, PG_locked

if TYPE_CHECKING:
    from .system import System

__all__ = (
    "DevPagemap", "DevPagemapOps", "MemoryType", "check_coherent_split_hang",
    "is_device_coherent_page", "is_device_private_page", "is_zone_device_page",
    "memremap_pages", "memunmap_pages", "page_pgmap", "pagemap_range", "zone_device_folio_init",
    "zone_device_page_init", "zone_device_pages_init", "zone_device_private_split_cb",
)


class MemoryType(enum.IntEnum):
    """``enum memory_type``."""

    MEMORY_DEVICE_PRIVATE = 1
    MEMORY_DEVICE_COHERENT = 2
    MEMORY_DEVICE_FS_DAX = 3
    MEMORY_DEVICE_GENERIC = 4
    MEMORY_DEVICE_PCI_P2PDMA = 5


class DevPagemapOps:
    """``struct dev_pagemap_ops``: ``page_free(pfn)``, ``migrate_to_ram(vmf) -> vm_fault_t``
    and (7.3, device-private only) ``folio_split(head, tail)``, called for each new folio
    when a large device-private folio is split and once more with ``tail=None`` at the end
    (see :func:`zone_device_private_split_cb`).

    ``pages_free(pfns)`` is the model's batch of ``page_free`` calls (a driver may give
    one to have the pages of a bulk free handed back in one call, in order); without it
    ``page_free`` is called for each page."""

    __slots__ = ("page_free", "migrate_to_ram", "folio_split", "pages_free")

    def __init__(self, page_free: Callable[[int], None] | None = None,
                 migrate_to_ram: Callable[["VmFault"], int] | None = None,
                 folio_split: Callable[[int, int | None], None] | None = None,
                 pages_free: Callable[[npt.NDArray[np.int64]], None] | None = None) -> None:
        self.page_free = page_free
        self.migrate_to_ram = migrate_to_ram
        self.folio_split = folio_split
        self.pages_free = pages_free


class DevPagemap:
    """``struct dev_pagemap``: one range of device pfns with a type, ops and an owner."""

    __slots__ = ("type", "start_pfn", "nr_pages", "ops", "owner", "id", "nr_used", "coherent_split_heads")

    def __init__(self, type_: MemoryType, start_pfn: int, nr_pages: int, ops: DevPagemapOps, owner: Any) -> None:
        self.type = type_
        self.start_pfn = start_pfn
        self.nr_pages = nr_pages
        self.ops = ops
        self.owner = owner
        self.id = 0
        #: folios with a reference (the pgmap's percpu ref count, by folio here)
        self.nr_used = 0
        #: heads of large device-coherent folios split so far (7.3): nothing tells the
        #: driver (``zone_device_private_split_cb`` is for device-private folios only), so
        #: test_hmm's per-page data of the new folios is stale and its next RELEASE hangs
        #: (conventions item 28); see :func:`check_coherent_split_hang`
        self.coherent_split_heads: list[int] = []

    @property
    def is_private(self) -> bool:
        return self.type == MemoryType.MEMORY_DEVICE_PRIVATE

    @property
    def is_coherent(self) -> bool:
        return self.type == MemoryType.MEMORY_DEVICE_COHERENT

    @property
    def range(self) -> tuple[int, int]:
        """Physical address range ``[start, end]`` (inclusive, like ``struct range``)."""
        return self.start_pfn << PAGE_SHIFT, ((self.start_pfn + self.nr_pages) << PAGE_SHIFT) - 1

    def free_zone_device_folio(self, sys: "System", pfn: int) -> None:
        """``free_zone_device_folio()``: the last reference is gone; clear the anon state
        and hand the page back to its driver through ``page_free``."""
        mem = sys.mem
        nr = 1 << int(mem.order[pfn]) if mem.flags[pfn] & PG_head else 1
        mem.mapping[pfn] = 0
        mem.index[pfn:pfn + nr] = 0
        # every page of a large folio loses AnonExclusive (7.3 frees device THPs whole)
        mem.flags[pfn:pfn + nr] &= ~np.uint32(PG_anon | PG_anon_exclusive | PG_dirty | PG_locked)
        mem.refcount[pfn] = 0
        self.nr_used -= 1
        sys.stats.add("memremap.page_free")
        assert self.ops.page_free is not None
        self.ops.page_free(pfn)

    def free_zone_device_folios(self, sys: "System", pfns: npt.NDArray[np.int64]) -> None:
        """:meth:`free_zone_device_folio` of each small page of *pfns* (all of this
        pagemap, each at its last reference), in order: ``page_free`` of each, or one
        ``pages_free`` call."""
        mem = sys.mem
        pfns = np.asarray(pfns, np.int64)
        mem.mapping[pfns] = 0
        mem.index[pfns] = 0
        mem.flags[pfns] &= ~np.uint32(PG_anon | PG_anon_exclusive | PG_dirty | PG_locked)
        mem.refcount[pfns] = 0
        self.nr_used -= len(pfns)
        sys.stats.add("memremap.page_free", len(pfns))
        if self.ops.pages_free is not None:
            self.ops.pages_free(pfns)
            return
        assert self.ops.page_free is not None
        for pfn in pfns.tolist():
            self.ops.page_free(pfn)

    def __repr__(self) -> str:
        return (f"DevPagemap({self.type.name}, pfn {self.start_pfn:#x}+{self.nr_pages:#x}, "
                f"owner={self.owner!r})")


PGMAP_KIND_NONE, PGMAP_KIND_PRIVATE, PGMAP_KIND_COHERENT, PGMAP_KIND_OTHER = 0, 1, 2, 3


def pgmap_kinds(sys: "System") -> npt.NDArray[np.int8]:
    """Per pgmap id (``mem.pgmap`` values; 0: not ZONE_DEVICE) the pagemap's kind:
    1 device-private, 2 device-coherent, 3 another type. Cached until a pagemap is
    added or removed; callers must not write to it."""
    got = sys.pgmap_kind_table
    if got is not None:
        return got
    kind = np.zeros(len(sys.pgmaps) + 1, np.int8)
    for k, pg in enumerate(sys.pgmaps):
        if pg is not None:
            kind[k + 1] = (PGMAP_KIND_PRIVATE if pg.is_private else PGMAP_KIND_COHERENT if pg.is_coherent
                           else PGMAP_KIND_OTHER)
    kind.flags.writeable = False
    sys.pgmap_kind_table = kind
    return kind


def memremap_pages(sys: "System", pgmap: DevPagemap) -> int:
    """``memremap_pages()``: make the pgmap's pfns ZONE_DEVICE pages (all free, refcount 0).

    Returns 0, ``-ENOMEM`` after the WARN "Conflicting mapping in same section" when a
    pagemap already covers the range's first or last pfn (``pagemap_range()``; a
    coherent dmirror asking for a second chunk at its fixed range), or ``-EINVAL``
    (missing ops/owner for the type, range outside the machine's device pfn space or
    overlapping another pagemap inside)."""
    if pgmap.type == MemoryType.MEMORY_DEVICE_PRIVATE:
        if pgmap.ops.migrate_to_ram is None or pgmap.ops.page_free is None or pgmap.owner is None:
            return -EINVAL
    elif pgmap.type == MemoryType.MEMORY_DEVICE_COHERENT:
        if pgmap.ops.page_free is None or pgmap.owner is None:
            return -EINVAL
    mem = sys.mem
    a, b = pgmap.start_pfn, pgmap.start_pfn + pgmap.nr_pages
    if a < mem.ram_pages or b > mem.max_pfn:
        return -EINVAL
    # pagemap_range(): a pagemap already at the first or last pfn of the range
    if b > a and (mem.pgmap[a] or mem.pgmap[b - 1]):
        WARN(sys, "Conflicting mapping in same section", "memremap.warn_conflicting_mapping")
        return -ENOMEM
    if mem.pgmap[a:b].any():
        return -EINVAL
    if pgmap.type == MemoryType.MEMORY_DEVICE_COHERENT and b > mem.data_pages:
        return -EINVAL
    pagemap_range(sys, pgmap)
    return 0


def pagemap_range(sys: "System", pgmap: DevPagemap) -> None:
    """``pagemap_range()``: register a validated pagemap and make its pfns its free
    ZONE_DEVICE pages (pgmap id stored per pfn, refcount 0)."""
    mem = sys.mem
    a, b = pgmap.start_pfn, pgmap.start_pfn + pgmap.nr_pages
    sys.pgmaps.append(pgmap)
    pgmap.id = len(sys.pgmaps)
    sys.pgmap_kind_table = None
    mem.pgmap[a:b] = pgmap.id
    mem.refcount[a:b] = 0
    sys.stats.add("memremap.pages", pgmap.nr_pages)


def memunmap_pages(sys: "System", pgmap: DevPagemap) -> None:
    """``memunmap_pages()``: kill the pagemap's reference, wait until every page of it is
    free (``wait_for_completion(&pgmap->done)``), then take the pfn range out of the pfn
    space (``pageunmap_range``: the struct pages go away with it).

    The kernel waits forever if a page still has a reference (the driver failed to evict
    it): that is :class:`~hmmsim.kernel.locking.DeadlockError` naming the wait (the
    scenario runner reports it as ``kernel-hang``); nothing is changed."""
    mem = sys.mem
    a, b = pgmap.start_pfn, pgmap.start_pfn + pgmap.nr_pages
    assert pgmap.id and sys.pgmaps[pgmap.id - 1] is pgmap, "memunmap_pages of a pagemap not mapped"
    busy = np.flatnonzero(mem.refcount[a:b])
    if len(busy):
        raise DeadlockError(f"memunmap_pages: device pfn {a + int(busy[0]):#x} still has "
                            f"{int(mem.refcount[a + int(busy[0])])} reference(s); "
                            "wait_for_completion(&pgmap->done) waits forever (hang)")
    assert pgmap.nr_used == 0
    mem.pgmap[a:b] = 0
    # the struct pages go away; the memory's bytes stay (PG_data: "may hold non-zero
    # bytes", which clear_pages() relies on, so it is kept)
    mem.flags[a:b] &= np.uint32(PG_data)
    mem.mapping[a:b] = 0
    mem.index[a:b] = 0
    mem.order[a:b] = 0
    mem.head_off[a:b] = 0
    mem.zone_device_data[a:b] = 0
    sys.pgmaps[pgmap.id - 1] = None  # type: ignore[call-overload]
    sys.pgmap_kind_table = None
    pgmap.id = 0
    sys.stats.add("memremap.unmap_pages", pgmap.nr_pages)


def page_pgmap(sys: "System", pfn: int) -> DevPagemap | None:
    """``page_pgmap()``: the pagemap of a ZONE_DEVICE page, else None."""
    return sys.pgmap_of(pfn)


def is_zone_device_page(sys: "System", pfn: int) -> bool:
    return page_pgmap(sys, pfn) is not None


def is_device_private_page(sys: "System", pfn: int) -> bool:
    pg = page_pgmap(sys, pfn)
    return pg is not None and pg.is_private


def is_device_coherent_page(sys: "System", pfn: int) -> bool:
    pg = page_pgmap(sys, pfn)
    return pg is not None and pg.is_coherent


def zone_device_page_init(sys: "System", pfn: int, order: int = 0) -> None:
    """``zone_device_page_init()``: a driver hands out a free device page (7.3: a free
    range of ``2**order`` device pages, made one folio by :func:`zone_device_folio_init`):
    refcount 1 on the head, locked (the caller unlocks it), pgmap reference taken. 6.12's
    version has no order (the caller passes 0)."""
    mem = sys.mem
    pg = page_pgmap(sys, pfn)
    nr = 1 << order
    assert pg is not None and not mem.refcount[pfn:pfn + nr].any(), f"pfn {pfn:#x} is not a free device page"
    assert pg.start_pfn <= pfn and pfn + nr <= pg.start_pfn + pg.nr_pages, "folio crosses its pagemap"
    # a page may have been part of an earlier larger folio: clear order, head and mapping
    mem.order[pfn:pfn + nr] = 0
    mem.head_off[pfn:pfn + nr] = 0
    mem.flags[pfn:pfn + nr] &= ~np.uint32(PG_head)
    mem.mapping[pfn:pfn + nr] = 0
    mem.refcount[pfn] = 1
    pg.nr_used += 1
    folio_lock(sys, pfn)


def zone_device_pages_init(sys: "System", pfns: npt.NDArray[np.int64]) -> None:
    """:func:`zone_device_page_init` (order 0) of every free device page of *pfns*, in
    bulk: each gets refcount 1 and is locked (one acquisition each), its pagemap a
    reference."""
    mem = sys.mem
    pfns = np.asarray(pfns, np.int64)
    if len(pfns) == 0:
        return
    pids = mem.pgmap[pfns]
    assert pids.all() and not mem.refcount[pfns].any(), "not all free device pages"
    mem.order[pfns] = 0
    mem.head_off[pfns] = 0
    mem.flags[pfns] &= ~np.uint32(PG_head)
    mem.mapping[pfns] = 0
    mem.refcount[pfns] = 1
    if pids[0] == pids[-1] and bool((pids == pids[0]).all()):
        sys.pgmaps[int(pids[0]) - 1].nr_used += len(pfns)
    else:
        ids, counts = np.unique(pids, return_counts=True)
        for pid, cnt in zip(ids.tolist(), counts.tolist()):
            sys.pgmaps[pid - 1].nr_used += cnt
    folios_lock(sys, pfns)


def zone_device_folio_init(sys: "System", head: int, order: int) -> None:
    """``zone_device_folio_init()`` (7.3): :func:`zone_device_page_init` of ``2**order``
    pages, then a large rmappable folio when *order* is not 0."""
    zone_device_page_init(sys, head, order)
    if order:
        sys.mem.prep_compound(head, order)


def zone_device_private_split_cb(sys: "System", head: int, new: int | None) -> None:
    """``zone_device_private_split_cb()`` (7.3): while a device-private folio at *head*
    is split, tell the driver about each new folio *new* (then once with ``None``). With
    no ``folio_split`` op the new folio just takes the original's pgmap and mapping (the
    pgmap is per pfn here, so only the mapping is copied)."""
    pg = page_pgmap(sys, head)
    if pg is None or not pg.is_private:
        return
    if pg.ops.folio_split is None:
        if new is not None:
            sys.mem.mapping[new] = sys.mem.mapping[head]
        return
    pg.ops.folio_split(head, new)


def check_coherent_split_hang(pgmap: DevPagemap, path: str) -> None:
    """Raise :class:`~hmmsim.kernel.locking.DeadlockError` (a ``kernel-hang`` record in a
    scenario) naming *path* (the driver path that walks the device's pages, e.g.
    ``"HMM_DMIRROR_RELEASE"``) if a large device-coherent folio of *pgmap* was split: the
    real 7.3 kernel never returns there (conventions item 28)."""
    if pgmap.coherent_split_heads:
        raise DeadlockError(f"{path} after __folio_split() of the device-coherent THP at pfn "
                            f"{pgmap.coherent_split_heads[0]:#x}: the split does not tell the driver "
                            "(zone_device_private_split_cb only handles device-private folios), so "
                            "test_hmm's per-page data of the new folios is stale and the real 7.3 "
                            "kernel never returns (conventions item 28)")
