"""Physical memory: frames, their contents, and ``struct page`` as arrays indexed by pfn.

Models the parts of ``include/linux/mm_types.h`` (``struct page``/``struct folio``),
``include/linux/page-flags.h``, ``mm/page_alloc.c`` and the zero pages of ``mm/memory.c``
/ ``mm/huge_memory.c`` that HMM depends on.

Layout of the pfn space: system RAM is ``[0, ram_pages)``; the first pageblock is
reserved for "the kernel" and holds the shared zero page; CPU-addressable device memory
(device-coherent ZONE_DEVICE ranges) follows up to ``data_pages``, and device-private
ranges, which have no CPU-visible contents, lie above (:mod:`hmmsim.kernel.memremap`).
Every pfn has one entry in each metadata array (a struct-of-arrays, like
``scipy.sparse`` keeps its coordinates). All metadata arrays default to zero, so they are
calloc-backed and only the pfns actually used cost memory; page contents live in one
lazily committed ``uint8`` array of ``PAGE_SIZE`` rows covering ``[0, data_pages)``: memory
that is never written costs nothing, and a page is only zeroed on allocation if it was
written since it was last zeroed (``PG_data`` below).

Zero means "none" in every array: ``head_off`` is the distance to the compound head
(``compound_head(pfn) = pfn - head_off[pfn]``), ``pgmap`` holds a pgmap id counted from 1,
``zone_device_data`` holds a pfn (pfn 0 is reserved, so 0 is NULL) and ``mapping`` an
object id counted from 1.

Counting conventions (logical counts, not the kernel's biased ``_mapcount``):

* ``refcount[pfn]`` is the folio reference count, kept on the head page;
* ``mapcount[pfn]`` counts PTE mappings of that page;
* ``entire_mapcount[head]`` counts PMD (or hugetlb) mappings of a whole folio;
* the shared zero page and the huge zero folio are never refcounted per mapping.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from ..flags import decode_flags
from .page_types import HPAGE_PMD_NR, HPAGE_PMD_ORDER, PAGE_SIZE

__all__ = (
    "Folio", "PG_anon", "PG_anon_exclusive", "PG_buddy", "PG_data", "PG_dirty", "PG_head",
    "PG_hugetlb", "PG_locked", "PG_lru", "PG_reserved", "PG_swapbacked", "PG_swapcache",
    "PG_uptodate", "PAGEFLAG_NAMES", "PhysMem",
)

# Page flag bits (``enum pageflags`` where the kernel has a flag; the last five are
# properties the kernel stores elsewhere: the PAGE_MAPPING_ANON bit of page->mapping,
# the buddy / hugetlb page types, and whether the frame may hold non-zero data).
PG_locked = 1 << 0
PG_referenced = 1 << 2
PG_uptodate = 1 << 3
PG_dirty = 1 << 4
PG_lru = 1 << 5
PG_head = 1 << 6
PG_swapcache = 1 << 10
PG_anon_exclusive = 1 << 11
PG_reserved = 1 << 13
PG_swapbacked = 1 << 17
PG_anon = 1 << 24
PG_buddy = 1 << 25
PG_hugetlb = 1 << 26
PG_data = 1 << 27

PAGEFLAG_NAMES: tuple[tuple[str, int], ...] = (
    ("locked", PG_locked), ("referenced", PG_referenced), ("uptodate", PG_uptodate),
    ("dirty", PG_dirty), ("lru", PG_lru), ("head", PG_head), ("swapcache", PG_swapcache),
    ("anon_exclusive", PG_anon_exclusive), ("reserved", PG_reserved),
    ("swapbacked", PG_swapbacked), ("anon", PG_anon), ("buddy", PG_buddy),
    ("hugetlb", PG_hugetlb), ("data", PG_data),
)

_BLOCK = HPAGE_PMD_NR  # pageblock size used by the allocator (2 MiB)
#: pages per gather/scatter step of a fragmented copy (512 KiB): measured on the 2-core
#: machine, 64-256 rows per fancy-indexing step copy a scattered GiB in 0.14-0.24 s,
#: 4096 rows in 0.25-0.33 s and one whole-batch step in 1.4 s
_COPY_CHUNK = 128
#: a pfn list with runs of consecutive pfns this long on average (or longer) is copied a
#: run at a time, as slices; shorter runs go through chunked fancy indexing (runs of 8:
#: slices 0.16 s/GiB, chunks 0.15; runs of 64: slices 0.11, chunks 0.135)
_MIN_AVG_RUN = 16


class PhysMem:
    """The machine's page frames and their ``struct page`` metadata.

    :param ram_pages: number of pages of system RAM.
    :param data_pages: pfns ``[0, data_pages)`` have CPU-visible contents (RAM and
        device-coherent memory).
    :param max_pfn: size of the whole pfn space.
    """

    def __init__(self, ram_pages: int, data_pages: int, max_pfn: int, reserved_pages: int = 0) -> None:
        if ram_pages % _BLOCK:
            raise ValueError("RAM size must be a multiple of 2 MiB")
        self.ram_pages = ram_pages
        #: pages a real kernel would keep for itself (not in ``totalram_pages()``)
        self.reserved_pages = reserved_pages
        self.data_pages = data_pages
        self.max_pfn = max_pfn
        n = max_pfn
        self.flags = np.zeros(n, np.uint32)
        self.refcount = np.zeros(n, np.int32)
        self.mapcount = np.zeros(n, np.int32)
        self.entire_mapcount = np.zeros(n, np.int32)
        self.order = np.zeros(n, np.uint8)
        self.head_off = np.zeros(n, np.int32)
        self.mapping = np.zeros(n, np.int32)
        self.index = np.zeros(n, np.int64)
        self.pgmap = np.zeros(n, np.int16)
        self.zone_device_data = np.zeros(n, np.int64)
        self.private = np.zeros(n, np.int64)
        #: page contents; np.zeros is calloc-backed, so untouched frames take no memory
        self.data = np.zeros((data_pages, PAGE_SIZE), np.uint8)
        # mapping ids -> objects (anon_vma, address_space); id 0 is "no mapping"
        self._objs: list[Any] = [None]
        # allocator state: free bitmap and free count per 2 MiB block
        self._free = np.zeros(n, bool)
        self._block_free = np.zeros(ram_pages // _BLOCK, np.int32)
        self.nr_free = 0
        # the first pageblock is reserved (kernel image); it holds the shared zero page
        self.flags[:_BLOCK] = PG_reserved
        self._free[_BLOCK:ram_pages] = True
        self.flags[_BLOCK:ram_pages] = PG_buddy
        self._block_free[1:] = _BLOCK
        self.nr_free = ram_pages - _BLOCK
        #: pages in use without frames of their own in the model: vmalloc'd bounce buffers,
        #: populated pages nothing ever touches, the rest of a reference machine. The
        #: allocator never hands out the last ``charged`` free pages.
        self.charged = 0
        #: order-0 allocations that failed for lack of memory: each time the kernel's OOM
        #: killer would run (``out_of_memory()``)
        self.oom_events = 0
        #: set inside :meth:`overwritten`: allocations leave their frames' bytes as they are
        self.skip_clear = False
        #: ``my_zero_pfn()``: the shared zero page
        self.zero_pfn = 1
        self.huge_zero_pfn = -1

    # -- mapping registry -------------------------------------------------------------
    def register_mapping(self, obj: Any) -> int:
        """Give *obj* (an anon_vma or address_space) an id storable in ``mapping[]``."""
        mid = getattr(obj, "mapping_id", 0)
        if mid:
            return int(mid)
        self._objs.append(obj)
        mid = len(self._objs) - 1
        obj.mapping_id = mid
        return mid

    def mapping_obj(self, mid: int) -> Any:
        return self._objs[mid]

    def folio_mapping(self, pfn: int) -> Any:
        """``folio_mapping()``/``folio_anon_vma()``: the object page *pfn* belongs to."""
        return self._objs[int(self.mapping[self.compound_head(pfn)])]

    # -- compound pages -----------------------------------------------------------------
    def compound_head(self, pfn: int) -> int:
        """``compound_head()``: the head pfn of the folio containing *pfn*."""
        return int(pfn) - int(self.head_off[pfn])

    def heads(self, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """``compound_head()`` of every pfn of an array."""
        return pfns - self.head_off[pfns]

    # -- allocator (mm/page_alloc.c) --------------------------------------------------
    @property
    def totalram_pages(self) -> int:
        """``totalram_pages()``: RAM managed by the allocator (reserved pages excluded:
        the first pageblock and ``SystemConfig.reserved_pages``, which the model does not
        take from the allocator but the overcommit heuristic and vmalloc's size check
        do not count)."""
        return self.ram_pages - _BLOCK - self.reserved_pages

    def charge(self, n: int) -> bool:
        """Account *n* pages taken from RAM without frames (see :attr:`charged`); False
        (and an OOM event) if fewer than *n* pages are free."""
        if self.nr_free - self.charged < n:
            self.oom_events += 1
            return False
        self.charged += n
        return True

    def uncharge(self, n: int) -> None:
        """Give back pages accounted by :meth:`charge`."""
        assert 0 <= n <= self.charged
        self.charged -= n

    def _count_blocks(self, pfns: npt.NDArray[np.int64] | slice, n: int, sign: int) -> None:
        """Add ``sign`` per page of *pfns* to the free count of its pageblock."""
        if isinstance(pfns, slice):
            b0, b1 = pfns.start // _BLOCK, (pfns.stop - 1) // _BLOCK
            if b0 != b1:
                pfns = np.arange(pfns.start, pfns.stop, dtype=np.int64)
        else:
            b0, b1 = int(pfns.min()) // _BLOCK, int(pfns.max()) // _BLOCK
        if b0 == b1:
            self._block_free[b0] += sign * n  # one pageblock (a window, a THP)
        else:
            assert not isinstance(pfns, slice)
            self._block_free += sign * np.bincount(pfns // _BLOCK, minlength=len(self._block_free)).astype(np.int32)

    def _take(self, pfns: npt.NDArray[np.int64], zero: bool = True,
              at: npt.NDArray[np.int64] | slice | None = None) -> None:
        n = len(pfns)
        if at is None:
            at = _as_slice(pfns)
        self._free[at] = False
        self._count_blocks(at, n, -1)
        self.nr_free -= n
        if zero and not self.skip_clear:
            dirty = (self.flags[at] & PG_data) != 0
            if isinstance(at, slice) and dirty.all():  # a run of used frames: one memset
                self.data[at] = 0
            elif dirty.any():
                self._zero(pfns[dirty])
            self._reset(at, flags=0, refcount=1)
        else:
            self._reset(at, flags=self.flags[at] & np.uint32(PG_data), refcount=1)

    @contextmanager
    def overwritten(self) -> Iterator[None]:
        """Inside the block, pages and folios are allocated without clearing their frames
        (as with *zero* False). The caller promises that nothing reads a page it gets
        there before the page is overwritten in full, or cleared with
        :meth:`clear_pages` if it ends up not being written; so the bytes the allocation
        would have cleared are never seen. A frame that may still hold old bytes stays
        marked ``PG_data``, so clearing it later, or allocating it again, zeroes it.

        The scenario runner uses it for the buffer a device command copies its result
        into (conventions item 19): populated, overwritten by the ioctl, read back."""
        prev = self.skip_clear
        self.skip_clear = True
        try:
            yield
        finally:
            self.skip_clear = prev

    def _zero(self, pfns: npt.NDArray[np.int64]) -> None:
        """Zero the contents of *pfns*: runs of consecutive frames as slices, scattered
        frames in chunks of fancy indexing."""
        d64 = self.data.view(np.uint64)
        for a, b, p in _runs(pfns):
            if p < 0:
                d64[pfns[a:b]] = 0
            else:
                self.data[p:p + (b - a)] = 0  # bytes: numpy's memset (8-byte words are slower)

    def _reset(self, pfns: npt.NDArray[np.int64] | slice, flags: Any, refcount: int) -> None:
        """A fresh ``struct page`` for every pfn (allocation and freeing)."""
        self.flags[pfns] = flags
        self.refcount[pfns] = refcount
        for arr in (self.mapcount, self.entire_mapcount, self.order, self.head_off, self.mapping,
                    self.index, self.private, self.zone_device_data):
            arr[pfns] = 0

    def alloc_pages_bulk(self, n: int, zero: bool = True) -> npt.NDArray[np.int64]:
        """Allocate *n* zeroed order-0 pages, lowest pfns first, preferring pageblocks
        already in use (so 2 MiB blocks stay free for THP). Returns fewer on OOM.

        Models ``alloc_pages_bulk()``; each page comes back with refcount 1. With
        *zero* False (no ``__GFP_ZERO``: the caller overwrites every byte, as a
        migration's copy does) the pages keep whatever they held."""
        out: list[npt.NDArray[np.int64]] = []
        need = min(n, max(self.nr_free - self.charged, 0))
        if need < n:
            self.oom_events += 1
        while need > 0:
            bf = self._block_free
            cand = np.flatnonzero((bf > 0) & (bf < _BLOCK))
            if len(cand) == 0:
                cand = np.flatnonzero(bf == _BLOCK)
                if len(cand) == 0:
                    break
            b = int(cand[0])
            got = np.flatnonzero(self._free[b * _BLOCK:(b + 1) * _BLOCK])[:need] + b * _BLOCK
            self._take(got, zero)
            out.append(got)
            need -= len(got)
        if not out:
            return np.zeros(0, np.int64)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def alloc_page(self) -> int:
        """``alloc_page(GFP_HIGHUSER_MOVABLE | __GFP_ZERO)``: one zeroed page, -1 on OOM."""
        got = self.alloc_pages_bulk(1)
        return int(got[0]) if len(got) else -1

    def alloc_folio(self, order: int, zero: bool = True) -> int:
        """``folio_alloc()``: a zeroed folio of 2**order pages; returns the head pfn or -1.
        With *zero* False (no ``__GFP_ZERO``: the caller overwrites every byte, as a
        migration's copy does) a large folio keeps whatever its pages held."""
        if order == 0:
            return self.alloc_page()
        if order != HPAGE_PMD_ORDER:
            raise ValueError(f"order {order} folios are not modelled")
        cand = np.flatnonzero(self._block_free == _BLOCK)
        if len(cand) == 0 or self.nr_free - self.charged < _BLOCK:
            return -1
        head = int(cand[0]) * _BLOCK
        pfns = np.arange(head, head + _BLOCK, dtype=np.int64)
        self._take(pfns, zero, slice(head, head + _BLOCK))
        self.prep_compound(head, order)
        return head

    def prep_compound(self, head: int, order: int) -> None:
        """``prep_compound_page()``: make [head, head + 2**order) one folio."""
        nr = 1 << order
        self.head_off[head:head + nr] = np.arange(nr, dtype=np.int32)
        self.order[head] = order
        self.flags[head] |= PG_head
        self.refcount[head + 1:head + nr] = 0

    def free_pages(self, pfns: npt.NDArray[np.int64] | list[int]) -> None:
        """Return order-0 pages or whole folios (given by head pfn) to the allocator."""
        pfns = np.asarray(pfns, dtype=np.int64)
        if len(pfns) == 0:
            return
        if len(pfns) == 1 and self.order[pfns[0]]:  # one large folio: its pages as a slice
            head = int(pfns[0])
            pfns = np.arange(head, head + (1 << int(self.order[head])), dtype=np.int64)
            self._free_run(pfns, slice(head, head + len(pfns)))
            return
        orders = self.order[pfns]
        if orders.any():
            parts = [pfns[orders == 0]]
            for h in pfns[orders != 0]:
                parts.append(np.arange(h, h + (1 << int(self.order[h])), dtype=np.int64))
            pfns = np.concatenate(parts)
        self._free_run(pfns, _as_slice(pfns))

    def _free_run(self, pfns: npt.NDArray[np.int64], at: npt.NDArray[np.int64] | slice) -> None:
        """Free *pfns* (indexed by *at*: the same pages, as a slice where they are one run)."""
        if (self._free[at]).any() or int(pfns.max()) >= self.ram_pages:
            bad = pfns[self._free[pfns] | (pfns >= self.ram_pages)][0]
            raise AssertionError(f"freeing pfn {bad:#x} that is free or not RAM")
        self._reset(at, flags=PG_buddy | (self.flags[at] & PG_data), refcount=0)
        self._free[at] = True
        self._count_blocks(at, len(pfns), 1)
        self.nr_free += len(pfns)

    def is_free(self, pfn: int) -> bool:
        return bool(self._free[pfn])

    # -- zero pages ----------------------------------------------------------------------
    def is_zero_pfn(self, pfn: int) -> bool:
        """``is_zero_pfn()``: the shared (small) zero page."""
        return pfn == self.zero_pfn

    def is_huge_zero_pfn(self, pfn: int) -> bool:
        return self.huge_zero_pfn >= 0 and self.huge_zero_pfn <= pfn < self.huge_zero_pfn + HPAGE_PMD_NR

    def get_huge_zero_folio(self) -> int:
        """``mm_get_huge_zero_folio()``: allocate the huge zero folio on first use; -1 if
        no 2 MiB block is free."""
        if self.huge_zero_pfn < 0:
            head = self.alloc_folio(HPAGE_PMD_ORDER)
            if head < 0:
                return -1
            self.flags[head:head + HPAGE_PMD_NR] |= PG_reserved
            self.huge_zero_pfn = head
        return self.huge_zero_pfn

    # -- page contents -------------------------------------------------------------------
    def mark_written(self, pfns: npt.NDArray[np.int64] | int) -> None:
        """Note that frames may now hold non-zero bytes (so the allocator must clear them)."""
        self.flags[pfns] |= PG_data

    def read_pages(self, pfns: npt.NDArray[np.int64], out: npt.NDArray[np.uint8]) -> None:
        """Gather the contents of *pfns* into *out* (``len(pfns) * PAGE_SIZE`` bytes).

        Runs of consecutive pfns are copied as slices (memcpy speed); a fragmented list
        is gathered in chunks of 8-byte fancy indexing."""
        dst = out.reshape(-1).view(np.uint64).reshape(len(pfns), PAGE_SIZE // 8)
        d64 = self.data.view(np.uint64)
        for a, b, p in _runs(pfns):
            if p < 0:
                np.take(d64, pfns[a:b], axis=0, out=dst[a:b])
            else:
                dst[a:b] = d64[p:p + (b - a)]

    def write_pages(self, pfns: npt.NDArray[np.int64], src: npt.NDArray[np.uint8]) -> None:
        """Scatter *src* (``len(pfns) * PAGE_SIZE`` bytes) into the pages *pfns*."""
        s64 = np.ascontiguousarray(src).reshape(-1).view(np.uint64).reshape(len(pfns), PAGE_SIZE // 8)
        d64 = self.data.view(np.uint64)
        for a, b, p in _runs(pfns):
            if p < 0:
                d64[pfns[a:b]] = s64[a:b]
            else:
                d64[p:p + (b - a)] = s64[a:b]
        self.flags[_as_slice(pfns)] |= np.uint32(PG_data)

    def copy_pages(self, dst: npt.NDArray[np.int64] | int, src: npt.NDArray[np.int64] | int) -> None:
        """``copy_highpage()`` for one page or a batch (pairwise, in order, as a loop
        would: a destination may be an earlier pair's source). Runs that are consecutive
        on both sides are copied a run at a time (``memmove``: a run may overlap
        itself); the rest in chunks of fancy indexing, so no temporary as large as the
        batch is made."""
        if np.ndim(dst) == 0:
            self.data[dst] = self.data[src]
            self.flags[dst] |= PG_data
            return
        dst = np.asarray(dst, np.int64)
        src = np.asarray(src, np.int64)
        n = len(dst)
        if n == 0:
            return
        cuts = np.flatnonzero((np.diff(dst) != 1) | (np.diff(src) != 1)) + 1
        if len(cuts) <= max(8, n // _MIN_AVG_RUN):
            bounds = [0, *cuts.tolist(), n]
            for a, b in zip(bounds[:-1], bounds[1:]):
                self._move(int(dst[a]), int(src[a]), b - a)
            self.flags[_as_slice(dst) if not len(cuts) else dst] |= np.uint32(PG_data)
        else:
            d64 = self.data.view(np.uint64)
            for a in range(0, n, _COPY_CHUNK):
                d64[dst[a:a + _COPY_CHUNK]] = d64[src[a:a + _COPY_CHUNK]]
            self.flags[dst] |= PG_data

    def _move(self, dst: int, src: int, nr: int) -> None:
        """The bytes of the *nr* frames from *src* into those from *dst*, as if through a
        buffer (``memmove``: the ranges may overlap; numpy would make a temporary copy as
        large as the run). Large runs go at the C library's streaming speed."""
        data = self.data
        assert 0 <= min(dst, src) and max(dst, src) + nr <= len(data), "frames outside the data"
        base = data.ctypes.data
        ctypes.memmove(base + dst * PAGE_SIZE, base + src * PAGE_SIZE, nr * PAGE_SIZE)

    def copy_folio(self, dst: int, src: int, nr: int) -> None:
        """``folio_copy()``: :meth:`copy_pages` of the *nr* consecutive pages from *src*
        to those from *dst* (a large folio's), as one slice."""
        d64 = self.data.view(np.uint64)
        d64[dst:dst + nr] = d64[src:src + nr]
        self.flags[dst:dst + nr] |= np.uint32(PG_data)

    def clear_pages(self, pfns: npt.NDArray[np.int64] | int) -> None:
        """``clear_highpage()`` for one page or a batch."""
        pfns = np.atleast_1d(np.asarray(pfns, np.int64))
        dirty = pfns[(self.flags[pfns] & PG_data) != 0]
        if len(dirty):
            self._zero(dirty)
            self.flags[dirty] &= ~np.uint32(PG_data)

    # -- folio helpers --------------------------------------------------------------------
    def folio_nr_pages(self, head: int) -> int:
        return 1 << int(self.order[head])

    def folio_mapcount(self, head: int) -> int:
        """``folio_mapcount()``: PTE mappings of all pages plus PMD mappings of the folio."""
        nr = 1 << int(self.order[head])
        return int(self.entire_mapcount[head]) + int(self.mapcount[head:head + nr].sum())

    def folio(self, pfn: int) -> "Folio":
        return Folio(self, self.compound_head(pfn))


def _as_slice(pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.int64] | slice:
    """*pfns* as a slice if it is one run of consecutive pfns (cheaper to index with),
    else *pfns* itself."""
    n = len(pfns)
    if n > 1:
        a = int(pfns[0])
        if int(pfns[-1]) - a == n - 1 and bool((pfns[1:] - pfns[:-1] == 1).all()):
            return slice(a, a + n)
    return pfns


def _runs(pfns: npt.NDArray[np.int64]) -> list[tuple[int, int, int]]:
    """Split *pfns* into ``(start, end, first pfn)`` runs of consecutive pfns; when the
    runs are too short to be worth a slice each (shorter than ``_MIN_AVG_RUN`` on
    average), ``(start, end, -1)`` chunks of at most ``_COPY_CHUNK`` pfns ask for fancy
    indexing instead."""
    n = len(pfns)
    if n == 0:
        return []
    cuts = np.flatnonzero(np.diff(pfns) != 1) + 1
    if len(cuts) > max(8, n // _MIN_AVG_RUN):
        return [(a, min(a + _COPY_CHUNK, n), -1) for a in range(0, n, _COPY_CHUNK)]
    bounds = [0, *cuts.tolist(), n]
    return [(a, b, int(pfns[a])) for a, b in zip(bounds[:-1], bounds[1:])]


class Folio:
    """A thin, readable view of one folio; the data stays in :class:`PhysMem` arrays."""

    __slots__ = ("mem", "pfn")

    def __init__(self, mem: PhysMem, pfn: int) -> None:
        self.mem = mem
        self.pfn = pfn

    @property
    def order(self) -> int:
        return int(self.mem.order[self.pfn])

    @property
    def nr_pages(self) -> int:
        return 1 << self.order

    @property
    def refcount(self) -> int:
        return int(self.mem.refcount[self.pfn])

    @property
    def mapcount(self) -> int:
        return self.mem.folio_mapcount(self.pfn)

    @property
    def flags(self) -> int:
        return int(self.mem.flags[self.pfn])

    def test(self, flag: int) -> bool:
        return bool(self.mem.flags[self.pfn] & flag)

    @property
    def mapping(self) -> Any:
        return self.mem.folio_mapping(self.pfn)

    def __repr__(self) -> str:
        return (f"Folio(pfn={self.pfn:#x}, order={self.order}, ref={self.refcount}, "
                f"map={self.mapcount}, flags={decode_flags(self.flags, PAGEFLAG_NAMES, False)})")
