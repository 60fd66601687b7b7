"""``hmm_range_fault()``: snapshot (and optionally fault in) a range of a process's page
tables for a device.

Models ``include/linux/hmm.h`` and ``mm/hmm.c``. The pfn flag layout is the current
one (6.16+): ``HMM_PFN_VALID`` bit 63, ``HMM_PFN_WRITE`` 62, ``HMM_PFN_ERROR`` 61, the
sticky ``HMM_PFN_DMA_MAPPED``/``P2PDMA``/``P2PDMA_BUS`` bits 60..58 (preserved across
calls), the map order in bits 53..57 and the pfn below. The behaviour per page-table
state, the request computation (``(hmm_pfns[i] & pfn_flags_mask) | default_flags``), the
fault span ("from the first page that needs a fault to the end of the callback's
range"), and the return codes are those of 6.12.

HMM is an ops table over the generic walker (:mod:`hmmsim.kernel.pagewalk`): it has no
``pte_entry``; :func:`hmm_vma_walk_pmd` takes a whole leaf table at once, decides every
entry with numpy masks in the order the kernel's per-pte loop would, and only swap-format
entries are looked at one by one.

Return codes of :func:`hmm_range_fault`:

* ``0``: every entry holds its output;
* ``-EBUSY``: the interval notifier's sequence changed (checked before each walk,
  including the re-walk after a fault); the caller must ``mmu_interval_read_begin`` again;
* ``-EFAULT``: a fault was requested for a page that cannot be made valid (no VMA,
  PROT_NONE or VM_IO/VM_PFNMAP VMA, special pte, hwpoison, or ``handle_mm_fault`` failed);
* ``-EPERM``: a write fault was needed in a VMA without VM_WRITE;
* ``-EINVAL``: an empty range.

On any return, entries below ``last`` hold outputs and the others still hold inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..flags import decode_flags
from ..kernel.errno import EBUSY, EFAULT, EPERM
from ..kernel.fault import (
    FAULT_FLAG_REMOTE,
    FAULT_FLAG_WRITE,
    VM_FAULT_ERROR,
    handle_mm_fault_range,
)
from ..kernel.migrate import (
    is_pmd_migration_entry,
    migration_entry_wait,
    pmd_migration_entry_wait,
)
from ..kernel.hugetlb import hugetlb_vma_lock_read, hugetlb_vma_unlock_read
from ..kernel.mm import PtRef, huge_pte_lock, mmap_assert_locked, spin_unlock
from ..kernel.mmu_notifier import MmuIntervalNotifier, mmu_interval_check_retry
from ..kernel.page_types import (
    HPAGE_PMD_ORDER,
    HPAGE_PUD_ORDER,
    PAGE_SHIFT,
    PMD_MASK,
    PUD_MASK,
)
from ..kernel.pagewalk import ACTION_AGAIN, ACTION_CONTINUE, MmWalk, MmWalkOps, walk_page_range
from ..kernel.pgtable import (
    _PAGE_DEVMAP,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_RW,
    _PAGE_SPECIAL,
    PTE_PFN_MASK,
    SWP_PTE_MARKER,
    is_device_exclusive_entry,
    is_device_private_entry,
    is_migration_entry,
    is_writable_device_private_entry,
    non_swap_entry,
    pmd_leaf,
    pte_present,
    pte_protnone,
    pte_to_swp_entry,
    pte_write,
    swp_offset_pfn,
)
from ..kernel.vma import VM_IO, VM_PFNMAP, VM_READ, VM_WRITE

if TYPE_CHECKING:
    from ..kernel.mm import MM

__all__ = (
    "HMM_PFN_DMA_MAPPED", "HMM_PFN_ERROR", "HMM_PFN_FLAGS", "HMM_PFN_FLAG_NAMES",
    "HMM_PFN_INOUT_FLAGS", "HMM_PFN_ORDER_MASK", "HMM_PFN_ORDER_SHIFT", "HMM_PFN_P2PDMA",
    "HMM_PFN_P2PDMA_BUS", "HMM_PFN_REQ_FAULT", "HMM_PFN_REQ_WRITE", "HMM_PFN_VALID",
    "HMM_PFN_WRITE", "HMM_RANGE_DEFAULT_TIMEOUT", "HmmRange", "decode_hmm_pfn",
    "hmm_pfn_to_map_order", "hmm_pfn_to_pfn", "hmm_range_fault", "hmm_walk_ops",
)

HMM_PFN_VALID = 1 << 63
HMM_PFN_WRITE = 1 << 62
HMM_PFN_ERROR = 1 << 61
HMM_PFN_DMA_MAPPED = 1 << 60
HMM_PFN_P2PDMA = 1 << 59
HMM_PFN_P2PDMA_BUS = 1 << 58
HMM_PFN_ORDER_SHIFT = 53
HMM_PFN_ORDER_MASK = 0x1F
HMM_PFN_FLAGS = ~((1 << HMM_PFN_ORDER_SHIFT) - 1) & 0xFFFF_FFFF_FFFF_FFFF
HMM_PFN_INOUT_FLAGS = HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS
HMM_PFN_REQ_FAULT = HMM_PFN_VALID
HMM_PFN_REQ_WRITE = HMM_PFN_WRITE
#: milliseconds a driver should keep retrying (``HMM_RANGE_DEFAULT_TIMEOUT``)
HMM_RANGE_DEFAULT_TIMEOUT = 1000

HMM_PFN_FLAG_NAMES: tuple[tuple[str, int], ...] = (
    ("VALID", 63), ("WRITE", 62), ("ERROR", 61), ("DMA_MAPPED", 60), ("P2PDMA", 59),
    ("P2PDMA_BUS", 58),
)

HMM_NEED_FAULT = 1 << 0
HMM_NEED_WRITE_FAULT = 1 << 1
HMM_NEED_ALL_BITS = HMM_NEED_FAULT | HMM_NEED_WRITE_FAULT

_U = np.uint64
_INOUT = _U(HMM_PFN_INOUT_FLAGS)
_PFN_MASK = _U(PTE_PFN_MASK)


def hmm_pfn_to_pfn(hmm_pfn: int) -> int:
    """The pfn of an output entry (``page_to_pfn(hmm_pfn_to_page())``)."""
    return hmm_pfn & ~HMM_PFN_FLAGS


def hmm_pfn_to_map_order(hmm_pfn: int) -> int:
    """``hmm_pfn_to_map_order()``: log2 of the CPU mapping size in pages."""
    return (hmm_pfn >> HMM_PFN_ORDER_SHIFT) & HMM_PFN_ORDER_MASK


def decode_hmm_pfn(hmm_pfn: int) -> str:
    """``"VALID|WRITE order=9 pfn=0x1234"`` for an output entry."""
    flags = hmm_pfn & (HMM_PFN_FLAGS & ~(HMM_PFN_ORDER_MASK << HMM_PFN_ORDER_SHIFT))
    s = decode_flags(flags, HMM_PFN_FLAG_NAMES)
    order = hmm_pfn_to_map_order(hmm_pfn)
    if order:
        s += f" order={order}"
    return f"{s} pfn={hmm_pfn_to_pfn(hmm_pfn):#x}"


@dataclass
class HmmRange:
    """``struct hmm_range``: the request and the output array of one call.

    :ivar notifier: ``struct mmu_interval_notifier *``; ``notifier.mm`` is walked
    :ivar notifier_seq: from ``mmu_interval_read_begin()``
    :ivar start: page-aligned start address
    :ivar end: exclusive end address
    :ivar hmm_pfns: ``unsigned long[(end - start) >> PAGE_SHIFT]``: requests in, results out
    :ivar default_flags: request bits applied to every page
    :ivar pfn_flags_mask: which bits of each ``hmm_pfns[i]`` are honoured as requests
    :ivar dev_private_owner: compared with ``page_pgmap(page)->owner``
    """

    notifier: MmuIntervalNotifier
    start: int
    end: int
    hmm_pfns: npt.NDArray[np.uint64]
    notifier_seq: int = 0
    default_flags: int = 0
    pfn_flags_mask: int = 0
    dev_private_owner: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class HmmVmaWalk:
    """``struct hmm_vma_walk``: the range and where the walk resumes after a fault."""

    __slots__ = ("range", "last", "can_fault", "default", "mask")

    def __init__(self, r: HmmRange) -> None:
        self.range = r
        self.last = r.start
        self.default = r.default_flags & 0xFFFF_FFFF_FFFF_FFFF
        self.mask = r.pfn_flags_mask & 0xFFFF_FFFF_FFFF_FFFF
        #: ``(default_flags | pfn_flags_mask) & HMM_PFN_REQ_FAULT``: can anything fault?
        self.can_fault = bool((self.default | self.mask) & HMM_PFN_REQ_FAULT)


# -- decide ---------------------------------------------------------------------------------------
def hmm_pte_need_fault(hvw: HmmVmaWalk, pfn_req_flags: int, cpu_flags: int) -> int:
    """``hmm_pte_need_fault()``: ``HMM_NEED_*`` bits for one page."""
    req = (pfn_req_flags & hvw.mask) | hvw.default
    if not req & HMM_PFN_REQ_FAULT:
        return 0
    if req & HMM_PFN_REQ_WRITE and not cpu_flags & HMM_PFN_WRITE:
        return HMM_NEED_FAULT | HMM_NEED_WRITE_FAULT
    if not cpu_flags & HMM_PFN_VALID:
        return HMM_NEED_FAULT
    return 0


def hmm_range_need_fault(hvw: HmmVmaWalk, pfns: npt.NDArray[np.uint64], cpu_flags: int) -> int:
    """``hmm_range_need_fault()``: the OR of :func:`hmm_pte_need_fault` over a span."""
    if not hvw.can_fault:
        return 0
    req = (pfns & _U(hvw.mask)) | _U(hvw.default) if hvw.mask else None
    if req is None:
        want_fault = bool(hvw.default & HMM_PFN_REQ_FAULT) and len(pfns) > 0
        want_write = want_fault and bool(hvw.default & HMM_PFN_REQ_WRITE)
    else:
        f = (req & _U(HMM_PFN_REQ_FAULT)) != 0
        want_fault = bool(f.any())
        want_write = bool((f & ((req & _U(HMM_PFN_REQ_WRITE)) != 0)).any())
    if not want_fault:
        return 0
    if want_write and not cpu_flags & HMM_PFN_WRITE:
        return HMM_NEED_ALL_BITS
    if not cpu_flags & HMM_PFN_VALID:
        return HMM_NEED_FAULT
    return 0


# -- act ------------------------------------------------------------------------------------------
def hmm_pfns_fill(addr: int, end: int, r: HmmRange, cpu_flags: int) -> int:
    """``hmm_pfns_fill()``: one output value for every page of ``[addr, end)``."""
    i = (addr - r.start) >> PAGE_SHIFT
    j = (end - r.start) >> PAGE_SHIFT
    seg = r.hmm_pfns[i:j]
    seg &= _INOUT
    seg |= _U(cpu_flags)
    return 0


def hmm_vma_fault(addr: int, end: int, required_fault: int, walk: MmWalk) -> int:
    """``hmm_vma_fault()``: fault every page of ``[addr, end)`` (write faults if
    required) and return ``-EBUSY`` so the walk restarts from *addr*; ``-EPERM`` for a
    write into a VMA without VM_WRITE; ``-EFAULT`` if a fault fails."""
    hvw: HmmVmaWalk = walk.private
    vma = walk.vma
    assert vma is not None and required_fault
    mm = walk.mm
    mm.sys.ls.assert_none_held("ptl")
    hvw.last = addr
    flags = FAULT_FLAG_REMOTE
    if required_fault & HMM_NEED_WRITE_FAULT:
        if not vma.vm_flags & VM_WRITE:
            return -EPERM
        flags |= FAULT_FLAG_WRITE
    mm.sys.stats.add("hmm.vma_fault")
    ret, _fail = handle_mm_fault_range(vma, addr, end, flags)
    if ret & VM_FAULT_ERROR:
        return -EFAULT
    return -EBUSY


# -- walk callbacks -------------------------------------------------------------------------------
def hmm_vma_walk_hole(addr: int, end: int, depth: int, walk: MmWalk) -> int:
    """``hmm_vma_walk_hole()``: no page table (or no VMA) under ``[addr, end)``."""
    hvw: HmmVmaWalk = walk.private
    r = hvw.range
    i = (addr - r.start) >> PAGE_SHIFT
    j = (end - r.start) >> PAGE_SHIFT
    required = hmm_range_need_fault(hvw, r.hmm_pfns[i:j], 0)
    if walk.vma is None:
        if required:
            return -EFAULT
        return hmm_pfns_fill(addr, end, r, HMM_PFN_ERROR)
    if required:
        return hmm_vma_fault(addr, end, required, walk)
    return hmm_pfns_fill(addr, end, r, 0)


def _order_flags(order: int) -> int:
    """``hmm_pfn_flags_order()``."""
    return order << HMM_PFN_ORDER_SHIFT


def hmm_vma_handle_pmd(walk: MmWalk, addr: int, end: int, pfns: npt.NDArray[np.uint64], pmd: int) -> int:
    """``hmm_vma_handle_pmd()``: a THP or huge zero page mapped by one pmd."""
    hvw: HmmVmaWalk = walk.private
    if pte_protnone(pmd):
        cpu_flags = 0
    else:
        cpu_flags = (HMM_PFN_VALID | HMM_PFN_WRITE if pte_write(pmd) else HMM_PFN_VALID) | _order_flags(HPAGE_PMD_ORDER)
    required = hmm_range_need_fault(hvw, pfns, cpu_flags)
    if required:
        return hmm_vma_fault(addr, end, required, walk)
    pfn = ((pmd & PTE_PFN_MASK) >> PAGE_SHIFT) + ((addr & ~PMD_MASK) >> PAGE_SHIFT)
    pfns &= _INOUT
    pfns |= np.arange(pfn, pfn + len(pfns), dtype=np.uint64) | _U(cpu_flags)
    return 0


def _handle_swap_pte(hvw: HmmVmaWalk, pte: int, req_in: int) -> tuple[int, int]:
    """``hmm_vma_handle_pte()`` for a swap-format entry: ``(kind, value)`` where kind is
    0 (output *value*), 1 (fault, *value* = required bits), 2 (wait for migration) or
    3 (-EFAULT)."""
    entry = pte_to_swp_entry(pte)
    r = hvw.range
    sys_ = r.notifier.mm.sys  # type: ignore[union-attr]
    if is_device_private_entry(entry):
        pfn = swp_offset_pfn(entry)
        pg = sys_.pgmap_of(pfn)
        if pg is not None and pg.owner is r.dev_private_owner:
            cpu = HMM_PFN_VALID | (HMM_PFN_WRITE if is_writable_device_private_entry(entry) else 0)
            return 0, pfn | cpu
    required = hmm_pte_need_fault(hvw, req_in, 0)
    if not required:
        return 0, 0
    if not non_swap_entry(entry):
        return 1, required
    if is_device_private_entry(entry) or is_device_exclusive_entry(entry):
        return 1, required
    if is_migration_entry(entry):
        return 2, 0
    return 3, 0


# _handle_swap_pte() kinds -> stop kinds of _hmm_pte_table()
_SWP_KIND = {1: 4, 2: 2, 3: 3}


def _hmm_pte_table(walk: MmWalk, pmd: PtRef, tbl: npt.NDArray[np.uint64], addr: int, end: int,
                   pfns: npt.NDArray[np.uint64]) -> int:
    """The per-pte loop of ``hmm_vma_walk_pmd()``/``hmm_vma_handle_pte()``, a table at a
    time: find the first entry that needs a fault, an error or a migration wait; write
    the outputs of the entries before it; then act on it.

    The output ``pfn | PRESENT << 63 | (PRESENT & RW) << 62`` is already right for none
    entries (0), normal and zero-page ptes and protnone ptes (a bare pfn), so a table
    holding only those, where no fault is needed, is done in a few array operations;
    swap-format and raw special entries take the general path."""
    hvw: HmmVmaWalk = walk.private
    n = len(pfns)
    i0 = (addr >> PAGE_SHIFT) & 511
    seg = tbl[i0:i0 + n]
    walk.mm.sys.stats.add("walk.pte_entries", n)
    one = _U(1)
    valid = seg & one
    out = ((seg & _PFN_MASK) >> _U(PAGE_SHIFT)) | (valid << _U(63)) | (((seg >> one) & valid) << _U(62))
    odd = bool((seg & _U(_PAGE_SPECIAL)).any()) or np.count_nonzero(seg) != np.count_nonzero(seg & _U(_PAGE_PRESENT | _PAGE_PROTNONE))
    if not odd:
        if not hvw.can_fault:
            stop = n
        elif hvw.mask == 0:
            # one request for every page: the first entry that does not satisfy it
            need_valid = bool(hvw.default & HMM_PFN_REQ_FAULT)
            bit = HMM_PFN_WRITE if hvw.default & HMM_PFN_REQ_WRITE else HMM_PFN_VALID
            miss = np.flatnonzero((out & _U(bit)) == 0) if need_valid else ()
            stop = int(miss[0]) if len(miss) else n
        else:
            stop = -1
        if stop >= 0:
            if stop:
                head = pfns[:stop]
                head &= _INOUT
                head |= out[:stop]
            if stop == n:
                return 0
            a = addr + (stop << PAGE_SHIFT)
            required = HMM_NEED_FAULT
            if hvw.default & HMM_PFN_REQ_WRITE and not int(out[stop]) & HMM_PFN_WRITE:
                required = HMM_NEED_ALL_BITS
            return hmm_vma_fault(a, end, required, walk)
    return _hmm_pte_table_slow(walk, pmd, seg, addr, end, pfns, out)


def _hmm_pte_table_slow(walk: MmWalk, pmd: PtRef, seg: npt.NDArray[np.uint64], addr: int, end: int,
                        pfns: npt.NDArray[np.uint64], out: npt.NDArray[np.uint64]) -> int:
    """:func:`_hmm_pte_table` with every entry class and per-page requests."""
    hvw: HmmVmaWalk = walk.private
    mem = walk.mm.sys.mem
    n = len(pfns)
    present = (seg & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0
    none = seg == 0
    swp = ~(present | none)
    swp_idx = np.flatnonzero(swp) if swp.any() else None
    if swp_idx is not None:
        # 6.12: every pte marker counts as none (pte_none_mostly)
        marker = (seg[swp_idx] >> _U(59)) == _U(SWP_PTE_MARKER)
        if marker.any():
            none = none.copy()
            none[swp_idx[marker]] = True
            swp_idx = swp_idx[~marker]
            if not len(swp_idx):
                swp_idx = None
    valid = present & ((seg & _U(_PAGE_PRESENT)) != 0)  # protnone entries are not valid
    writable = valid & ((seg & _U(_PAGE_RW)) != 0)
    pfn = (seg & _PFN_MASK) >> _U(PAGE_SHIFT)
    special = present & ((seg & _U(_PAGE_SPECIAL)) != 0) & ((seg & _U(_PAGE_DEVMAP)) == 0)
    # vm_normal_page() == NULL and not the zero pfn: raw pfn mappings
    raw = special & (pfn != _U(mem.zero_pfn))
    raw |= present & ~special & (pfn >= _U(mem.max_pfn))
    # what each entry asks for
    if hvw.can_fault:
        req = (pfns & _U(hvw.mask)) | _U(hvw.default)
        want = (req & _U(HMM_PFN_REQ_FAULT)) != 0
        want_w = want & ((req & _U(HMM_PFN_REQ_WRITE)) != 0)
        need = (none | present) & ((want & ~valid) | (want_w & ~writable))
        err = present & ~need & raw & want
    else:
        req = None
        need = err = None
    # the first entry that stops the loop
    stop = n
    kind = 0
    if need is not None:
        hits = need | err  # type: ignore[operator]
        if hits.any():
            stop = int(np.argmax(hits))
            kind = 1 if need[stop] else 3
    swp_out: dict[int, int] = {}
    swp_req = 0
    if swp_idx is not None:
        for k in swp_idx.tolist():
            if k >= stop:
                break
            kd, val = _handle_swap_pte(hvw, int(seg[k]), int(pfns[k]))
            if kd:
                stop, kind, swp_req = k, _SWP_KIND[kd], val
                break
            swp_out[k] = val
    # outputs of the entries before the stop
    if stop:
        o = out[:stop].copy()
        o[none[:stop]] = 0
        e = raw[:stop] & present[:stop]
        if e.any():
            o[e] = _U(HMM_PFN_ERROR)
        for k, v in swp_out.items():
            o[k] = _U(v)
        head = pfns[:stop]
        head &= _INOUT
        head |= o
    if stop == n:
        return 0
    a = addr + (stop << PAGE_SHIFT)
    if kind == 1:
        # a none or present entry needs a fault: its own required bits, for the rest of the span
        assert req is not None
        rq = int(req[stop])
        required = HMM_NEED_ALL_BITS if (rq & HMM_PFN_REQ_WRITE and not writable[stop]) else HMM_NEED_FAULT
        return hmm_vma_fault(a, end, required, walk)
    if kind == 4:
        return hmm_vma_fault(a, end, swp_req, walk)
    if kind == 2:
        hvw.last = a
        migration_entry_wait(walk.mm, pmd, a)
        return -EBUSY
    return -EFAULT


def hmm_vma_walk_pmd(pmd: PtRef, start: int, end: int, walk: MmWalk) -> int:
    """``hmm_vma_walk_pmd()``: one pmd entry's span ``[start, end)``."""
    hvw: HmmVmaWalk = walk.private
    r = hvw.range
    i = (start - r.start) >> PAGE_SHIFT
    pfns = r.hmm_pfns[i:i + ((end - start) >> PAGE_SHIFT)]
    mm = walk.mm
    e = pmd.get()
    if e == 0:
        return hmm_vma_walk_hole(start, end, -1, walk)
    if is_pmd_migration_entry(e):
        if hmm_range_need_fault(hvw, pfns, 0):
            hvw.last = start
            pmd_migration_entry_wait(mm, pmd)
            return -EBUSY
        return hmm_pfns_fill(start, end, r, 0)
    if not pte_present(e):
        if hmm_range_need_fault(hvw, pfns, 0):
            return -EFAULT
        return hmm_pfns_fill(start, end, r, HMM_PFN_ERROR)
    if pmd_leaf(e):
        return hmm_vma_handle_pmd(walk, start, end, pfns, e)
    # pte_offset_map(): no lock, HMM relies on the notifier sequence
    got = mm.pte_offset_map(pmd)
    if got is None:  # the table went away under us: walk this pmd again
        walk.action = ACTION_AGAIN
        return 0
    return _hmm_pte_table(walk, pmd, got[0], start, end, pfns)


def hmm_vma_walk_pud(pud: PtRef, start: int, end: int, walk: MmWalk) -> int:
    """``hmm_vma_walk_pud()``: a device-dax (devmap) PUD leaf; other puds are descended."""
    e = pud.get()
    if not (pmd_leaf(e) and e & _PAGE_DEVMAP):
        return 0
    hvw: HmmVmaWalk = walk.private
    r = hvw.range
    walk.action = ACTION_CONTINUE
    i = (start - r.start) >> PAGE_SHIFT
    pfns = r.hmm_pfns[i:i + ((end - start) >> PAGE_SHIFT)]
    cpu_flags = (HMM_PFN_VALID | HMM_PFN_WRITE if pte_write(e) else HMM_PFN_VALID) | _order_flags(HPAGE_PUD_ORDER)
    required = hmm_range_need_fault(hvw, pfns, cpu_flags)
    if required:
        return hmm_vma_fault(start, end, required, walk)
    pfn = ((e & PTE_PFN_MASK) >> PAGE_SHIFT) + ((start & ~PUD_MASK) >> PAGE_SHIFT)
    pfns &= _INOUT
    pfns |= np.arange(pfn, pfn + len(pfns), dtype=np.uint64) | _U(cpu_flags)
    return 0


def hmm_vma_walk_hugetlb_entry(pte: PtRef, hmask: int, start: int, end: int, walk: MmWalk) -> int:
    """``hmm_vma_walk_hugetlb_entry()``: one huge page. The fault decision uses only the
    request of the first page of the span; the order bits are set even when the entry
    is not valid."""
    hvw: HmmVmaWalk = walk.private
    r = hvw.range
    mm = walk.mm
    ptl = huge_pte_lock(mm, pte)
    entry = pte.get()
    i = (start - r.start) >> PAGE_SHIFT
    cpu_flags = 0
    if entry and pte_present(entry) and not pte_protnone(entry):
        cpu_flags = HMM_PFN_VALID | HMM_PFN_WRITE if pte_write(entry) else HMM_PFN_VALID
    cpu_flags |= _order_flags(HPAGE_PMD_ORDER)
    required = hmm_pte_need_fault(hvw, int(r.hmm_pfns[i]), cpu_flags)
    if required:
        spin_unlock(mm, ptl)
        vma = walk.vma
        assert vma is not None
        hugetlb_vma_unlock_read(vma)
        try:
            return hmm_vma_fault(start, end, required, walk)
        finally:
            hugetlb_vma_lock_read(vma)
    pfn = ((entry & PTE_PFN_MASK) >> PAGE_SHIFT) + ((start & ~hmask & 0xFFFF_FFFF_FFFF_FFFF) >> PAGE_SHIFT)
    pfns = r.hmm_pfns[i:i + ((end - start) >> PAGE_SHIFT)]
    pfns &= _INOUT
    pfns |= np.arange(pfn, pfn + len(pfns), dtype=np.uint64) | _U(cpu_flags)
    spin_unlock(mm, ptl)
    return 0


def hmm_vma_walk_test(start: int, end: int, walk: MmWalk) -> int:
    """``hmm_vma_walk_test()``: VMAs HMM cannot mirror (VM_IO, VM_PFNMAP, no VM_READ) are
    ERROR, or ``-EFAULT`` if any page of them is to be faulted; 1 skips the VMA."""
    vma = walk.vma
    assert vma is not None
    if not vma.vm_flags & (VM_IO | VM_PFNMAP) and vma.vm_flags & VM_READ:
        return 0
    hvw: HmmVmaWalk = walk.private
    r = hvw.range
    i = (start - r.start) >> PAGE_SHIFT
    j = (end - r.start) >> PAGE_SHIFT
    if hmm_range_need_fault(hvw, r.hmm_pfns[i:j], 0):
        return -EFAULT
    hmm_pfns_fill(start, end, r, HMM_PFN_ERROR)
    return 1


hmm_walk_ops = MmWalkOps(
    pud_entry=hmm_vma_walk_pud,
    pmd_entry=hmm_vma_walk_pmd,
    pte_hole=hmm_vma_walk_hole,
    hugetlb_entry=hmm_vma_walk_hugetlb_entry,
    test_walk=hmm_vma_walk_test,
)


def hmm_range_fault(r: HmmRange) -> int:
    """Fill ``r.hmm_pfns`` for ``[r.start, r.end)`` of ``r.notifier.mm``, faulting pages in
    where the request asks for it.

    Models ``mm/hmm.c:hmm_range_fault()``; the caller holds mmap_lock (read) and, after a
    0 return, checks ``mmu_interval_read_retry()`` under its own lock before using the
    result (see :mod:`hmmsim.hmm` docs for the full protocol).

    :param r: ``struct hmm_range *``
    :return: 0, ``-EBUSY``, ``-EFAULT``, ``-EPERM`` or ``-EINVAL`` (module docstring)
    """
    mm: MM | None = r.notifier.mm
    assert mm is not None, "hmm_range_fault: the notifier is not inserted"
    mmap_assert_locked(mm)
    if len(r.hmm_pfns) < (r.end - r.start) >> PAGE_SHIFT:
        raise ValueError("hmm_pfns is shorter than the range")
    hvw = HmmVmaWalk(r)
    stats = mm.sys.stats
    stats.add("hmm.range_fault")
    while True:
        if mmu_interval_check_retry(r.notifier, r.notifier_seq):
            stats.add("hmm.range_fault.ebusy")
            return -EBUSY
        stats.add("hmm.walk")
        ret = walk_page_range(mm, hvw.last, r.end, hmm_walk_ops, hvw)
        if ret != -EBUSY:
            return ret
