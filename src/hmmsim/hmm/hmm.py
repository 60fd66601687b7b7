"""``hmm_range_fault()``: snapshot (and optionally fault in) a range of a process's page
tables for a device.

Models ``mm/hmm.c`` of every release in :mod:`hmmsim.kernel.profile` (``include/linux/
hmm.h``, the pfn bits and ``struct hmm_range``, is :mod:`hmmsim.hmm.pfn`, re-exported
here); where the releases differ the code asks the machine's profile (cached in
:class:`HmmVmaWalk`):

* the pfn flag layout (:class:`HmmPfnLayout`): ``HMM_PFN_VALID`` bit 63, ``HMM_PFN_WRITE``
  62, ``HMM_PFN_ERROR`` 61 everywhere; 6.12 has the map order at bit 56 and writes whole
  entries; 7.3 has the sticky ``HMM_PFN_DMA_MAPPED``/``P2PDMA``/``P2PDMA_BUS`` bits 60..58
  (``HMM_PFN_INOUT_FLAGS``, carried from input to output on every output path) and the
  order at bit 53. The module constants name the 7.3 values;
* where faults run: 6.12 faults inside the walk callbacks (:func:`hmm_vma_fault`, -EFAULT
  for any ``VM_FAULT_ERROR``); 7.3 callbacks only record the fault
  (:func:`hmm_record_fault`, the internal ``HMM_FAULT_PENDING``) and :func:`hmm_do_fault`
  runs it once ``walk_page_range`` unwound, returning ``vm_fault_to_errno()``;
* non-present PMDs (7.3 :func:`hmm_vma_handle_absent_pmd`: device-private THP entries),
  devmap (6.12 only), pte markers (6.12: all read as none; 7.3: only uffd-wp).

The request of a page is ``(hmm_pfns[i] & pfn_flags_mask) | default_flags``; a fault
spans "from the first page that needs one to the end of the callback's range".

HMM is an ops table over the generic walker (:mod:`hmmsim.kernel.pagewalk`): it has no
``pte_entry``; :func:`hmm_vma_walk_pmd` takes a whole leaf table at once. The pte path
is split like the kernel's ``hmm_vma_handle_pte()``: *decide* (:func:`hmm_pte_need_fault`,
one :class:`HmmPteAction` per entry), *encode* (:func:`pte_to_hmm_pfn_flags`, the output
value) and *act* (store the outputs before the first entry whose action is not OUTPUT,
then fault, wait or fail there). :func:`hmm_vma_handle_pte` is the one-entry decision
(the rules as the kernel states them); :func:`hmm_vma_handle_pte_table` applies them to
a whole table with numpy masks and stops where the kernel's per-pte loop would. The
unified fault+migrate walk (``range.migrate``, profile ``hmm_migrate_on_fault``) is
:mod:`.hmm_migrate`: its own ops table around these callbacks (:func:`hmm_range_fault`
dispatches there; it adds ``-ERANGE`` for a range over two VMAs).

Return codes of :func:`hmm_range_fault`:

* ``0``: every entry holds its output;
* ``-EBUSY``: the interval notifier's sequence changed (checked before each walk,
  including the re-walk after a fault); the caller must ``mmu_interval_read_begin`` again;
* ``-EFAULT``: a fault was requested for a page that cannot be made valid (no VMA,
  PROT_NONE or VM_IO/VM_PFNMAP VMA, special pte, hwpoison, or ``handle_mm_fault`` failed);
* ``-ENOMEM`` (7.3 only): ``handle_mm_fault`` ran out of memory (6.12: -EFAULT);
* ``-EPERM``: a write fault was needed in a VMA without VM_WRITE;
* ``-EINVAL``: an empty range.

On any return, entries below ``last`` hold outputs and the others still hold inputs.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..kernel.errno import EAGAIN, EBUSY, EFAULT, EINTR, EINVAL, ENOLCK, EPERM
from ..kernel.fault_range import handle_mm_fault_range
from ..kernel.hugetlb import hugetlb_vma_lock_read, hugetlb_vma_unlock_read
from ..kernel.locking import KEYED_LOCK_CLASSES
from ..kernel.migrate import (
    is_pmd_migration_entry,
    migration_entry_wait,
    pmd_migration_entry_wait,
)
from ..kernel.mm import (
    PtRef,
    huge_pte_lock,
    mmap_assert_locked,
    mmap_read_lock,
    mmap_read_unlock,
    spin_unlock,
)
from ..kernel.mm_types import (
    FAULT_FLAG_ALLOW_RETRY,
    FAULT_FLAG_KILLABLE,
    FAULT_FLAG_REMOTE,
    FAULT_FLAG_WRITE,
    VM_FAULT_COMPLETED,
    VM_FAULT_ERROR,
    VM_FAULT_RETRY,
    vm_fault_to_errno,
)
from ..kernel.mmu_notifier import mmu_interval_check_retry, mmu_interval_read_begin
from ..kernel.page_types import (
    HPAGE_PMD_ORDER,
    HPAGE_PUD_ORDER,
    PAGE_SHIFT,
    PMD_MASK,
    PUD_MASK,
    pte_index,
)
from ..kernel.pagewalk import (
    ACTION_AGAIN,
    ACTION_CONTINUE,
    MmWalk,
    MmWalkOps,
    walk_page_range,
)
from ..kernel.pgtable import (
    _PAGE_DEVMAP,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_SPECIAL,
    PTE_PFN_MASK,
    decode_pte_table,
    is_device_exclusive_entry,
    is_device_private_entry,
    is_migration_entry,
    is_pte_marker_entry,
    is_writable_device_private_entry,
    non_swap_entry,
    pmd_devmap,
    pmd_leaf,
    pmd_none,
    pmd_present,
    pmd_to_swp_entry,
    pmd_trans_huge,
    pte_is_uffd_wp_marker,
    pte_pfn,
    pte_present,
    pte_protnone,
    pte_special,
    pte_to_swp_entry,
    pte_write,
    swp_offset_pfn,
)
from ..kernel.task import fatal_signal_pending
from ..kernel.trace import (
    tracepoint_hmm_do_fault,
    tracepoint_hmm_range_fault,
    tracepoint_hmm_vma_fault,
)
from ..kernel.vma import VM_IO, VM_PFNMAP, VM_READ, VM_WRITE
from .pfn import (
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_ERROR,
    HMM_PFN_FLAG_NAMES,
    HMM_PFN_FLAGS,
    HMM_PFN_INOUT_FLAGS,
    HMM_PFN_LAYOUT,
    HMM_PFN_ORDER_MASK,
    HMM_PFN_ORDER_SHIFT,
    HMM_PFN_P2PDMA,
    HMM_PFN_P2PDMA_BUS,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HMM_RANGE_DEFAULT_TIMEOUT,
    HmmPfnLayout,
    HmmRange,
    decode_hmm_pfn,
    hmm_pfn_layout,
    hmm_pfn_to_map_order,
    hmm_pfn_to_pfn,
)

if TYPE_CHECKING:
    from ..kernel.mm import MM
    from ..kernel.profile import Profile

__all__ = (
    "HMM_PFN_DMA_MAPPED", "HMM_PFN_ERROR", "HMM_PFN_FLAGS", "HMM_PFN_FLAG_NAMES",
    "HMM_PFN_INOUT_FLAGS", "HMM_PFN_LAYOUT", "HMM_PFN_ORDER_MASK", "HMM_PFN_ORDER_SHIFT",
    "HMM_PFN_P2PDMA", "HMM_PFN_P2PDMA_BUS", "HMM_PFN_REQ_FAULT", "HMM_PFN_REQ_WRITE",
    "HMM_PFN_VALID", "HMM_PFN_WRITE", "HMM_RANGE_DEFAULT_TIMEOUT", "HmmPfnLayout",
    "HmmPteAction", "HmmRange", "HmmVmaWalk", "decode_hmm_pfn", "hmm_do_fault",
    "hmm_pfn_layout", "hmm_pfn_to_map_order", "hmm_pfn_to_pfn", "hmm_pte_need_fault",
    "hmm_range_fault", "hmm_range_fault_unlocked_timeout", "hmm_record_fault", "hmm_vma_handle_absent_pmd", "hmm_vma_handle_pte",
    "hmm_vma_handle_pte_table", "hmm_walk_ops", "pte_to_hmm_pfn_flags",
)

_ULONG = 0xFFFF_FFFF_FFFF_FFFF

HMM_NEED_FAULT = 1 << 0
HMM_NEED_WRITE_FAULT = 1 << 1
HMM_NEED_ALL_BITS = HMM_NEED_FAULT | HMM_NEED_WRITE_FAULT

#: internal sentinel of a callback that recorded a fault (7.3; never returned to callers)
HMM_FAULT_PENDING = -EAGAIN
#: internal sentinel of a fault that dropped mmap_lock (7.3 unlocked variant)
HMM_FAULT_UNLOCKED = -ENOLCK

_U = np.uint64
_PFN_MASK = _U(PTE_PFN_MASK)


class HmmVmaWalk:
    """``struct hmm_vma_walk``: the range, where the walk resumes after a fault and (7.3)
    the fault a callback recorded; plus the release's features, looked up once."""

    __slots__ = ("range", "locked", "last", "end", "required_fault", "can_fault", "default",
                 "mask", "layout", "inout", "pmd_order_flags", "pud_order_flags",
                 "fault_outside_walk", "fault_errno", "only_uffd_wp_marker_is_none",
                 "device_private_pmd", "devmap")

    def __init__(self, r: HmmRange, profile: "Profile", locked: list[bool] | None = None) -> None:
        self.range = r
        #: ``bool *locked``: None for hmm_range_fault() (the unlocked variant passes a cell)
        self.locked = locked
        self.last = r.start
        self.end = 0
        self.required_fault = 0
        self.default = r.default_flags & _ULONG
        self.mask = r.pfn_flags_mask & _ULONG
        #: ``(default_flags | pfn_flags_mask) & HMM_PFN_REQ_FAULT``: can anything fault?
        self.can_fault = bool((self.default | self.mask) & HMM_PFN_REQ_FAULT)
        self.layout = hmm_pfn_layout(profile)
        self.inout = _U(self.layout.inout_flags)
        self.pmd_order_flags = self.layout.order_flags(HPAGE_PMD_ORDER)
        self.pud_order_flags = self.layout.order_flags(HPAGE_PUD_ORDER)
        self.fault_outside_walk = profile.hmm_fault_outside_walk
        self.fault_errno = profile.hmm_fault_errno
        self.only_uffd_wp_marker_is_none = profile.hmm_only_uffd_wp_marker_is_none
        self.device_private_pmd = profile.hmm_device_private_pmd
        self.devmap = profile.pte_devmap


class HmmPteAction(enum.IntEnum):
    """What ``hmm_vma_handle_pte()`` does with one entry (the per-entry decision)."""

    #: store the output value (``goto out``)
    OUTPUT = 0
    #: fault from this page to the end of the span (``goto fault``)
    FAULT = 1
    #: ``migration_entry_wait()``, then -EBUSY so the walk restarts here
    MIGRATION_WAIT = 2
    #: the page cannot be made valid: -EFAULT
    EFAULT = 3


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


# -- encode ---------------------------------------------------------------------------------------
def pte_to_hmm_pfn_flags(pte: int) -> int:
    """``pte_to_hmm_pfn_flags()``: VALID (+WRITE) for a present, accessible pte, else 0."""
    if pte == 0 or not pte_present(pte) or pte_protnone(pte):
        return 0
    return HMM_PFN_VALID | HMM_PFN_WRITE if pte_write(pte) else HMM_PFN_VALID


def _store(hvw: HmmVmaWalk, pfns: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64] | np.uint64) -> None:
    """``hmm_pfns[i] = (hmm_pfns[i] & HMM_PFN_INOUT_FLAGS) | new`` for a span (6.12's
    layout has no inout flags: the whole entry is overwritten)."""
    pfns &= hvw.inout
    pfns |= values


def _store_pfn_run(hvw: HmmVmaWalk, pfns: npt.NDArray[np.uint64], pfn: int, cpu_flags: int) -> None:
    """Outputs ``pfn + i | cpu_flags`` (the huge-mapping loops)."""
    _store(hvw, pfns, np.arange(pfn, pfn + len(pfns), dtype=np.uint64) | _U(cpu_flags))


# -- act ------------------------------------------------------------------------------------------
def hmm_pfns_fill(addr: int, end: int, hvw: HmmVmaWalk, cpu_flags: int) -> int:
    """``hmm_pfns_fill()``: one output value for every page of ``[addr, end)``."""
    r = hvw.range
    i = (addr - r.start) >> PAGE_SHIFT
    j = (end - r.start) >> PAGE_SHIFT
    _store(hvw, r.hmm_pfns[i:j], _U(cpu_flags))
    return 0


def _hmm_fault_error(mm: "MM", hvw: HmmVmaWalk, ret: int) -> int:
    """The errno of a failed fault: ``vm_fault_to_errno(ret, 0)`` (7.3, -EINVAL with a
    WARN if it has none); 6.12 returns -EFAULT for every ``VM_FAULT_ERROR``."""
    if not hvw.fault_errno:
        return -EFAULT
    err = vm_fault_to_errno(ret, 0)
    if not err:
        mm.sys.stats.add("hmm.warn_fault_errno")  # WARN_ON
        err = -EINVAL
    return err


@tracepoint_hmm_vma_fault
def hmm_vma_fault(addr: int, end: int, required_fault: int, walk: MmWalk) -> int:
    """``hmm_vma_fault()`` (6.12): fault every page of ``[addr, end)`` from inside the
    walk callback (write faults if required) and return ``-EBUSY`` so the walk restarts
    from *addr*; ``-EPERM`` for a write into a VMA without VM_WRITE; ``-EFAULT`` if a
    fault fails."""
    hvw: HmmVmaWalk = walk.private
    vma = walk.vma
    assert vma is not None and required_fault
    mm = walk.mm
    mm.sys.ls.assert_no_pt_locks("hmm_vma_fault")
    hvw.last = addr
    flags = FAULT_FLAG_REMOTE
    if required_fault & HMM_NEED_WRITE_FAULT:
        if not vma.vm_flags & VM_WRITE:
            return -EPERM
        flags |= FAULT_FLAG_WRITE
    mm.sys.stats.add("hmm.vma_fault")
    ret, _fail = handle_mm_fault_range(vma, addr, end, flags)
    if ret & VM_FAULT_ERROR:
        return _hmm_fault_error(mm, hvw, ret)
    return -EBUSY


def hmm_record_fault(addr: int, end: int, required_fault: int, walk: MmWalk) -> int:
    """``hmm_record_fault()`` (7.3): remember ``[addr, end)`` and the required bits and
    return the internal ``HMM_FAULT_PENDING``; :func:`hmm_do_fault` runs the fault after
    ``walk_page_range()`` unwound (no page-table or hugetlb VMA lock held)."""
    hvw: HmmVmaWalk = walk.private
    assert required_fault
    hvw.last = addr
    hvw.end = end
    hvw.required_fault = required_fault
    return HMM_FAULT_PENDING


def _hmm_fault(addr: int, end: int, required_fault: int, walk: MmWalk) -> int:
    """Fault where the release faults: in the callback (6.12) or after the walk (7.3)."""
    if walk.private.fault_outside_walk:
        return hmm_record_fault(addr, end, required_fault, walk)
    return hmm_vma_fault(addr, end, required_fault, walk)


@tracepoint_hmm_do_fault
def hmm_do_fault(mm: "MM", hvw: HmmVmaWalk) -> int:
    """``hmm_do_fault()`` (7.3): fault the span a callback recorded, holding only
    mmap_lock: ``-EFAULT`` if no VMA covers it any more, ``-EPERM`` for a write into a VMA
    without VM_WRITE, ``vm_fault_to_errno()`` of a failed fault (-ENOMEM for OOM,
    -EFAULT for SIGBUS/SIGSEGV/hwpoison), else ``-EBUSY`` so the caller re-walks.

    A fault that dropped mmap_lock (VM_FAULT_RETRY/COMPLETED) is only possible with
    ``locked`` (the unlocked variant); for hmm_range_fault() it is a WARN."""
    addr, end, required_fault = hvw.last, hvw.end, hvw.required_fault
    ls = mm.sys.ls
    ls.assert_no_pt_locks("hmm_do_fault")
    ls.assert_none_held("hugetlb_vma_lock")
    flags = FAULT_FLAG_REMOTE
    if hvw.locked is not None:
        flags |= FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE
    vma = mm.vma_lookup(addr)
    if vma is None:
        return -EFAULT
    if required_fault & HMM_NEED_WRITE_FAULT:
        if not vma.vm_flags & VM_WRITE:
            return -EPERM
        flags |= FAULT_FLAG_WRITE
    mm.sys.stats.add("hmm.do_fault")
    ret, _fail = handle_mm_fault_range(vma, addr, end, flags)
    if ret & (VM_FAULT_COMPLETED | VM_FAULT_RETRY):
        if hvw.locked is not None:
            hvw.locked[0] = False
        else:
            mm.sys.stats.add("hmm.warn_broken_fault_handler")  # WARN_ON_ONCE
        return HMM_FAULT_UNLOCKED
    if ret & VM_FAULT_ERROR:
        return _hmm_fault_error(mm, hvw, ret)
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
        return hmm_pfns_fill(addr, end, hvw, HMM_PFN_ERROR)
    if required:
        return _hmm_fault(addr, end, required, walk)
    return hmm_pfns_fill(addr, end, hvw, 0)


def hmm_vma_handle_pmd(walk: MmWalk, addr: int, end: int, pfns: npt.NDArray[np.uint64], pmd: int) -> int:
    """``hmm_vma_handle_pmd()``: a THP or huge zero page mapped by one pmd."""
    hvw: HmmVmaWalk = walk.private
    # pmd_to_hmm_pfn_flags(): 0 for a protnone pmd (no order either)
    if pte_protnone(pmd):
        cpu_flags = 0
    else:
        cpu_flags = (HMM_PFN_VALID | HMM_PFN_WRITE if pte_write(pmd) else HMM_PFN_VALID) | hvw.pmd_order_flags
    required = hmm_range_need_fault(hvw, pfns, cpu_flags)
    if required:
        return _hmm_fault(addr, end, required, walk)
    _store_pfn_run(hvw, pfns, pte_pfn(pmd) + ((addr & ~PMD_MASK) >> PAGE_SHIFT), cpu_flags)
    return 0


def hmm_vma_handle_absent_pmd(walk: MmWalk, start: int, end: int, pfns: npt.NDArray[np.uint64],
                              pmd: int) -> int:
    """``hmm_vma_handle_absent_pmd()``: a non-present, non-migration PMD.

    7.3 (``CONFIG_ARCH_HAS_PMD_SOFTLEAVES``): a device-private THP entry of the range's
    ``dev_private_owner`` is VALID (+WRITE) with order 9 for every page, numbered from the
    entry's pfn whatever the offset of *start* in the PMD (the kernel's loop starts at
    ``softleaf_to_pfn(entry)``); otherwise a needed fault is recorded for a
    device-private entry and anything else is -EFAULT; no fault needed: ERROR.
    6.12: every such PMD is ERROR, or -EFAULT if a fault is needed."""
    hvw: HmmVmaWalk = walk.private
    r = hvw.range
    device_private = False
    if hvw.device_private_pmd:
        entry = pmd_to_swp_entry(pmd)
        device_private = is_device_private_entry(entry)
        if device_private:
            pfn = swp_offset_pfn(entry)
            pg = walk.mm.sys.pgmap_of(pfn)
            if pg is not None and pg.owner is r.dev_private_owner:
                cpu_flags = HMM_PFN_VALID | hvw.pmd_order_flags
                if is_writable_device_private_entry(entry):
                    cpu_flags |= HMM_PFN_WRITE
                _store_pfn_run(hvw, pfns, pfn, cpu_flags)
                return 0
    required = hmm_range_need_fault(hvw, pfns, 0)
    if required:
        if device_private:
            return hmm_record_fault(start, end, required, walk)
        return -EFAULT
    return hmm_pfns_fill(start, end, hvw, HMM_PFN_ERROR)


def hmm_vma_handle_pte(walk: MmWalk, addr: int, pte: int, pfn_req_flags: int) -> tuple[HmmPteAction, int]:
    """``hmm_vma_handle_pte()`` for one entry: decide and encode, the caller acts. The
    kernel-shaped statement of the per-entry rules; :func:`hmm_vma_handle_pte_table`
    applies the same rules to a whole table with masks (and is tested against this).

    :return: ``(OUTPUT, new_pfn_flags)`` (the value to store below the inout flags),
        ``(FAULT, required_fault)``, ``(MIGRATION_WAIT, 0)`` or ``(EFAULT, 0)``
    """
    hvw: HmmVmaWalk = walk.private
    r = hvw.range
    # 6.12 pte_none_mostly(): every marker reads as none; 7.3: only a uffd-wp marker
    if pte == 0 or (pte_is_uffd_wp_marker(pte) if hvw.only_uffd_wp_marker_is_none
                    else (not pte_present(pte) and is_pte_marker_entry(pte_to_swp_entry(pte)))):
        required = hmm_pte_need_fault(hvw, pfn_req_flags, 0)
        return (HmmPteAction.FAULT, required) if required else (HmmPteAction.OUTPUT, 0)
    if not pte_present(pte):
        entry = pte_to_swp_entry(pte)
        if is_device_private_entry(entry):
            pfn = swp_offset_pfn(entry)
            pg = walk.mm.sys.pgmap_of(pfn)
            if pg is not None and pg.owner is r.dev_private_owner:
                cpu = HMM_PFN_VALID | (HMM_PFN_WRITE if is_writable_device_private_entry(entry) else 0)
                return HmmPteAction.OUTPUT, pfn | cpu
        required = hmm_pte_need_fault(hvw, pfn_req_flags, 0)
        if not required:
            return HmmPteAction.OUTPUT, 0
        if not non_swap_entry(entry) or is_device_private_entry(entry) or is_device_exclusive_entry(entry):
            return HmmPteAction.FAULT, required
        if is_migration_entry(entry):
            return HmmPteAction.MIGRATION_WAIT, 0
        return HmmPteAction.EFAULT, 0  # everything else (hwpoison, 7.3's other markers)
    cpu_flags = pte_to_hmm_pfn_flags(pte)
    required = hmm_pte_need_fault(hvw, pfn_req_flags, cpu_flags)
    if required:
        return HmmPteAction.FAULT, required
    pfn = pte_pfn(pte)
    mem = walk.mm.sys.mem
    normal = not pte_special(pte) and pfn < mem.max_pfn  # vm_normal_page() != NULL
    if not normal and not (hvw.devmap and pte & _PAGE_DEVMAP) and pfn != mem.zero_pfn:
        if hmm_pte_need_fault(hvw, pfn_req_flags, 0):
            return HmmPteAction.EFAULT, 0
        return HmmPteAction.OUTPUT, HMM_PFN_ERROR
    return HmmPteAction.OUTPUT, pfn | cpu_flags


def hmm_vma_handle_pte_table(walk: MmWalk, pmd: PtRef, tbl: npt.NDArray[np.uint64], addr: int,
                             end: int, pfns: npt.NDArray[np.uint64]) -> int:
    """The per-pte loop of ``hmm_vma_walk_pmd()`` over :func:`hmm_vma_handle_pte`, a
    table at a time: decide an :class:`HmmPteAction` per entry, store the outputs of
    the entries before the first one that is not OUTPUT, then act on that one.

    Fast path: the encoding ``pfn | PRESENT << 63 | (PRESENT & RW) << 62`` is already
    right for none entries (0), normal and zero-page ptes and protnone ptes (a bare
    pfn), so a table holding only those (no swap-format, special or invalid-pfn entry),
    where every page has the same request, is done in a few array operations; other
    tables take :func:`_hmm_pte_table_general`."""
    hvw: HmmVmaWalk = walk.private
    n = len(pfns)
    i0 = pte_index(addr)
    seg = tbl[i0:i0 + n]
    sys_ = walk.mm.sys
    sys_.stats.add("walk.pte_entries", n)
    one = _U(1)
    valid = seg & one
    pfn = (seg & _PFN_MASK) >> _U(PAGE_SHIFT)
    out = pfn | (valid << _U(63)) | (((seg >> one) & valid) << _U(62))
    # (count_nonzero is several times cheaper than any()/max() on a 512-entry table)
    odd = (np.count_nonzero(seg & _U(_PAGE_SPECIAL)) != 0
           or np.count_nonzero(seg) != np.count_nonzero(seg & _U(_PAGE_PRESENT | _PAGE_PROTNONE))
           or np.count_nonzero(pfn >= _U(sys_.mem.max_pfn)) != 0)
    if not odd and hvw.mask == 0:
        stop = n
        if hvw.default & HMM_PFN_REQ_FAULT:
            # one request for every page: the first entry that does not satisfy it
            bit = HMM_PFN_WRITE if hvw.default & HMM_PFN_REQ_WRITE else HMM_PFN_VALID
            miss = np.flatnonzero((out & _U(bit)) == 0)
            if len(miss):
                stop = int(miss[0])
        if stop:
            head = pfns[:stop]
            head &= hvw.inout
            head |= out[:stop]
        if stop == n:
            return 0
        required = HMM_NEED_FAULT
        if hvw.default & HMM_PFN_REQ_WRITE and not int(out[stop]) & HMM_PFN_WRITE:
            required = HMM_NEED_ALL_BITS
        return _hmm_fault(addr + (stop << PAGE_SHIFT), end, required, walk)
    return _hmm_pte_table_general(walk, pmd, seg, addr, end, pfns, out)


def _hmm_pte_table_general(walk: MmWalk, pmd: PtRef, seg: npt.NDArray[np.uint64], addr: int, end: int,
                           pfns: npt.NDArray[np.uint64], out: npt.NDArray[np.uint64]) -> int:
    """:func:`hmm_vma_handle_pte_table` with every entry class and per-page requests,
    decided with masks over :func:`decode_pte_table` exactly as :func:`hmm_vma_handle_pte`
    decides one entry (a test holds the two together)."""
    hvw: HmmVmaWalk = walk.private
    sys_ = walk.mm.sys
    mem = sys_.mem
    n = len(pfns)
    d = decode_pte_table(seg)
    # entries that read as none: 6.12 every marker (pte_none_mostly), 7.3 uffd-wp only
    none = d.none
    swp = None
    if d.has_swap:
        none = none | (d.uffd_wp_marker if hvw.only_uffd_wp_marker_is_none else d.marker)
        swp = d.swap & ~none
    present = d.present
    valid = present & ~d.protnone  # pte_to_hmm_pfn_flags(): protnone is not valid
    writable = valid & d.write
    # vm_normal_page() == NULL (special, or not a valid frame) and not the zero pfn
    raw = (d.special | (present & (d.pfn >= _U(mem.max_pfn)))) & (d.pfn != _U(mem.zero_pfn))
    if hvw.devmap:
        raw &= ~d.devmap  # 6.12: a devmap pte is mirrored all the same
    # device-private entries whose pgmap belongs to the range's owner: reported, not faulted
    owned = None
    if swp is not None and (swp & d.device_private).any():
        idx = np.flatnonzero(swp & d.device_private)
        dpfn = d.pfn[idx]
        pid = np.where(dpfn < _U(mem.max_pfn), mem.pgmap[np.minimum(dpfn, _U(mem.max_pfn - 1)).astype(np.int64)], 0)
        mine = np.zeros(len(idx), np.bool_)
        for p in np.unique(pid).tolist():
            pg = sys_.pgmaps[p - 1] if p else None
            if pg is not None and pg.owner is hvw.range.dev_private_owner:
                mine |= pid == p
        owned = np.zeros(n, np.bool_)
        owned[idx[mine]] = True
    # decide the action of every entry
    action = np.zeros(n, np.uint8)
    req = None
    if hvw.can_fault:
        req = (pfns & _U(hvw.mask)) | _U(hvw.default)
        want = (req & _U(HMM_PFN_REQ_FAULT)) != 0
        want_w = want & ((req & _U(HMM_PFN_REQ_WRITE)) != 0)
        need = (none | present) & ((want & ~valid) | (want_w & ~writable))
        action[need] = HmmPteAction.FAULT
        action[present & ~need & raw & want] = HmmPteAction.EFAULT
        if swp is not None:
            asked = swp & want if owned is None else swp & want & ~owned
            faultable = d.real_swap | d.device_private | d.device_exclusive
            action[asked & faultable] = HmmPteAction.FAULT
            action[asked & d.migration] = HmmPteAction.MIGRATION_WAIT
            # everything else (hwpoison, 7.3's other markers): -EFAULT
            action[asked & ~faultable & ~d.migration] = HmmPteAction.EFAULT
    stop = int(np.argmax(action != 0)) if action.any() else n
    # encode and store the outputs of the entries before the stop
    if stop:
        o = out[:stop].copy()
        o[none[:stop]] = 0
        e = raw[:stop]
        if e.any():
            o[e] = _U(HMM_PFN_ERROR)
        if swp is not None:
            o[swp[:stop]] = 0
            if owned is not None:
                own = owned[:stop]
                w = np.where(d.device_private_write[:stop], _U(HMM_PFN_VALID | HMM_PFN_WRITE), _U(HMM_PFN_VALID))
                o[own] = d.pfn[:stop][own] | w[own]
        _store(hvw, pfns[:stop], o)
    if stop == n:
        return 0
    # act on the stopping entry
    a = addr + (stop << PAGE_SHIFT)
    act = action[stop]
    if act == HmmPteAction.FAULT:
        # hmm_pte_need_fault() of that entry, for the rest of the span
        assert req is not None
        required = (HMM_NEED_ALL_BITS if int(req[stop]) & HMM_PFN_REQ_WRITE and not writable[stop]
                    else HMM_NEED_FAULT)
        return _hmm_fault(a, end, required, walk)
    if act == HmmPteAction.MIGRATION_WAIT:
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
    if e & (_PAGE_PRESENT | _PAGE_PSE) == _PAGE_PRESENT:
        # a pte table: the kernel's last case, tested first as the common one (none of
        # the checks below matches it). pte_offset_map(): no lock, HMM relies on the
        # notifier sequence
        got = mm.pte_offset_map(pmd)
        if got is None:  # the table went away under us: walk this pmd again
            walk.action = ACTION_AGAIN
            return 0
        return hmm_vma_handle_pte_table(walk, pmd, got[0], start, end, pfns)
    if pmd_none(e):
        return hmm_vma_walk_hole(start, end, -1, walk)
    if is_pmd_migration_entry(e):
        if hmm_range_need_fault(hvw, pfns, 0):
            hvw.last = start
            pmd_migration_entry_wait(mm, pmd)
            return -EBUSY
        return hmm_pfns_fill(start, end, hvw, 0)
    if not pmd_present(e):
        return hmm_vma_handle_absent_pmd(walk, start, end, pfns, e)
    # 6.12: pmd_devmap(pmd) || pmd_trans_huge(pmd); 7.3 has no devmap
    if pmd_trans_huge(e) or (hvw.devmap and pmd_leaf(e) and pmd_devmap(e)):
        return hmm_vma_handle_pmd(walk, start, end, pfns, e)
    # pmd_bad(): a leaf the release cannot handle (a devmap pmd under 7.3)
    if hmm_range_need_fault(hvw, pfns, 0):
        return -EFAULT
    return hmm_pfns_fill(start, end, hvw, HMM_PFN_ERROR)


def hmm_vma_walk_pud(pud: PtRef, start: int, end: int, walk: MmWalk) -> int:
    """``hmm_vma_walk_pud()``: a PUD leaf is mirrored whole (6.12: only a devmap one;
    any other is left to the walker, which splits it); other puds are descended."""
    e = pud.get()
    hvw: HmmVmaWalk = walk.private
    if not pmd_leaf(e) or (hvw.devmap and not pmd_devmap(e)):
        return 0
    r = hvw.range
    walk.action = ACTION_CONTINUE
    i = (start - r.start) >> PAGE_SHIFT
    pfns = r.hmm_pfns[i:i + ((end - start) >> PAGE_SHIFT)]
    cpu_flags = (HMM_PFN_VALID | HMM_PFN_WRITE if pte_write(e) else HMM_PFN_VALID) | hvw.pud_order_flags
    required = hmm_range_need_fault(hvw, pfns, cpu_flags)
    if required:
        return _hmm_fault(start, end, required, walk)
    _store_pfn_run(hvw, pfns, pte_pfn(e) + ((start & ~PUD_MASK) >> PAGE_SHIFT), cpu_flags)
    return 0


def hmm_vma_walk_hugetlb_entry(pte: PtRef, hmask: int, start: int, end: int, walk: MmWalk) -> int:
    """``hmm_vma_walk_hugetlb_entry()``: one huge page. The fault decision uses only the
    request of the first page of the span; the order bits are set even when the entry
    is not valid. 6.12 drops the hugetlb VMA lock around its in-walk fault; 7.3 records
    the fault and the walker's unwind drops the lock."""
    hvw: HmmVmaWalk = walk.private
    r = hvw.range
    mm = walk.mm
    ptl = huge_pte_lock(mm, pte)
    entry = pte.get()
    i = (start - r.start) >> PAGE_SHIFT
    cpu_flags = pte_to_hmm_pfn_flags(entry) | hvw.pmd_order_flags
    required = hmm_pte_need_fault(hvw, int(r.hmm_pfns[i]), cpu_flags)
    if required:
        spin_unlock(mm, ptl)
        if hvw.fault_outside_walk:
            return hmm_record_fault(start, end, required, walk)
        vma = walk.vma
        assert vma is not None
        hugetlb_vma_unlock_read(vma)
        try:
            return hmm_vma_fault(start, end, required, walk)
        finally:
            hugetlb_vma_lock_read(vma)
    pfn = pte_pfn(entry) + ((start & ~hmask & _ULONG) >> PAGE_SHIFT)
    _store_pfn_run(hvw, r.hmm_pfns[i:i + ((end - start) >> PAGE_SHIFT)], pfn, cpu_flags)
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
    hmm_pfns_fill(start, end, hvw, HMM_PFN_ERROR)
    return 1


hmm_walk_ops = MmWalkOps(
    pud_entry=hmm_vma_walk_pud,
    pmd_entry=hmm_vma_walk_pmd,
    pte_hole=hmm_vma_walk_hole,
    hugetlb_entry=hmm_vma_walk_hugetlb_entry,
    test_walk=hmm_vma_walk_test,
)


def hmm_range_fault_locked(r: HmmRange, locked: list[bool] | None) -> int:
    """``hmm_range_fault_locked()``: the walk/fault loop. *locked* is None for
    :func:`hmm_range_fault`; :func:`hmm_range_fault_unlocked_timeout` passes a cell that
    :func:`hmm_do_fault` clears when a fault dropped mmap_lock (then -EBUSY, or -EINTR with
    a fatal signal pending, and mmap_lock is no longer held)."""
    mm: MM | None = r.notifier.mm
    assert mm is not None, "hmm_range_fault: the notifier is not inserted"
    mmap_assert_locked(mm)
    if len(r.hmm_pfns) < (r.end - r.start) >> PAGE_SHIFT:
        raise ValueError("hmm_pfns is shorter than the range")
    hvw = HmmVmaWalk(r, mm.sys.profile, locked)
    stats = mm.sys.stats
    stats.add("hmm.range_fault")
    while True:
        if mmu_interval_check_retry(r.notifier, r.notifier_seq):
            stats.add("hmm.range_fault.ebusy")
            return -EBUSY
        stats.add("hmm.walk")
        ret = walk_page_range(mm, hvw.last, r.end, hmm_walk_ops, hvw)
        if ret == HMM_FAULT_PENDING:
            ret = hmm_do_fault(mm, hvw)
            if ret == HMM_FAULT_UNLOCKED:
                if fatal_signal_pending(mm.sys):
                    return -EINTR
                return -EBUSY
        if ret != -EBUSY:
            return ret


@tracepoint_hmm_range_fault
def hmm_range_fault(r: HmmRange) -> int:
    """Fill ``r.hmm_pfns`` for ``[r.start, r.end)`` of ``r.notifier.mm``, faulting pages in
    where the request asks for it.

    Models ``mm/hmm.c:hmm_range_fault()``; the caller holds mmap_lock (read) and, after a
    0 return, checks ``mmu_interval_read_retry()`` under its own lock before using the
    result (see :mod:`hmmsim.hmm` docs for the full protocol).

    :param r: ``struct hmm_range *``
    :return: 0, ``-EBUSY``, ``-EFAULT``, ``-ENOMEM``, ``-EPERM`` or ``-EINVAL`` (module
        docstring)

    Returns with the locks and notifier brackets it found (``walk_scope``).
    """
    if r.migrate is not None:  # the unified fault+migrate walk (profile hmm_migrate_on_fault)
        from .hmm_migrate import hmm_range_fault_migrate
        m = r.migrate
        mm = r.notifier.mm if r.notifier is not None else (m.vma.vm_mm if m.vma is not None else None)
        if mm is None:
            return hmm_range_fault_migrate(r)
        # the folios it prepared stay locked for migrate_hmm_range_setup()'s caller
        with mm.sys.ls.walk_scope("hmm_range_fault", KEYED_LOCK_CLASSES, (mm.sys.notifier_active, id(mm))):
            return hmm_range_fault_migrate(r)
    mm = r.notifier.mm
    if mm is None:
        return hmm_range_fault_locked(r, None)
    with mm.sys.ls.walk_scope("hmm_range_fault", (), (mm.sys.notifier_active, id(mm))):
        return hmm_range_fault_locked(r, None)


def hmm_range_fault_unlocked_timeout(r: HmmRange, timeout: int) -> int:
    """``hmm_range_fault_unlocked_timeout()`` (7.3): :func:`hmm_range_fault` for a caller
    that does not hold mmap_lock. Takes the read lock itself (killable: -EINTR with a fatal
    signal pending), fails with -EFAULT on an unstable address space (an OOM-reaped mm),
    lets faults drop the lock (a userfaultfd handler answers them) and restarts, with a
    fresh ``notifier_seq``, after every -EBUSY. *timeout* (jiffies, 0 = for ever) bounds
    the retries without progress: the deadline restarts whenever a fault dropped the lock;
    when it passes, -EBUSY. The model's clock moves one jiffy per attempt."""
    if r.migrate is not None:  # the unified walk series predates the unlocked variant
        raise TypeError("hmm_range_fault_unlocked_timeout: range.migrate (the unified walk) is not modelled here")
    mm = r.notifier.mm
    assert mm is not None, "hmm_range_fault: the notifier is not inserted"
    with mm.sys.ls.walk_scope("hmm_range_fault_unlocked_timeout", (), (mm.sys.notifier_active, id(mm))):
        return _hmm_range_fault_unlocked_timeout(mm, r, timeout)


def _hmm_range_fault_unlocked_timeout(mm: "MM", r: HmmRange, timeout: int) -> int:
    sys = mm.sys
    locked = [False]
    deadline = 0
    while True:
        if timeout and not locked[0]:
            deadline = sys.jiffies + timeout
        r.notifier_seq = mmu_interval_read_begin(r.notifier)
        if fatal_signal_pending(sys):  # mmap_read_lock_killable()
            return -EINTR
        mmap_read_lock(mm)
        if mm.mmf_unstable:  # check_stable_address_space()
            mmap_read_unlock(mm)
            return -EFAULT
        if timeout and sys.jiffies > deadline:
            mmap_read_unlock(mm)
            sys.stats.add("hmm.range_fault.timeout")
            return -EBUSY
        sys.jiffies += 1
        locked[0] = True
        ret = hmm_range_fault_locked(r, locked)
        if locked[0]:
            mmap_read_unlock(mm)
        if ret != -EBUSY:
            return ret
