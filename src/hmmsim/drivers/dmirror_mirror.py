"""The mirror of the dmirror test device (``lib/test_hmm.c``): the interval notifier,
``dmirror_range_fault``, READ / WRITE, CHECK_EXCLUSIVE and SNAPSHOT."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..hmm.hmm import (
    HMM_PFN_ERROR,
    HMM_PFN_ORDER_MASK,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    hmm_pfn_layout,
    hmm_range_fault,
    hmm_range_fault_unlocked_timeout,
)
from ..kernel.bug import KernelOops
from ..kernel.cpu import (
    copy_from_user,
    copy_pages_to_user,
    copy_to_user,
    translate_range,
)
from ..kernel.errno import EBUSY, EFAULT, EINVAL, ENOENT, EPERM
from ..kernel.mm import mmap_read_lock, mmap_read_unlock
from ..kernel.mmu_notifier import (
    MmuIntervalNotifier,
    MmuIntervalNotifierOps,
    MmuNotifierEvent,
    MmuNotifierRange,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
    mmu_notifier_range_blockable,
)
from ..kernel.page_types import (
    PAGE_MASK,
    PAGE_SHIFT,
    PMD_SHIFT,
    PUD_SHIFT,
    ULONG_MAX,
)
from ..kernel.task import mmget_not_zero, mmput
from ..kernel.vma import VM_HUGETLB
from .dmirror_core import (
    _LEAF,
    DMIRROR_RANGE_FAULT_RETRIES,
    DPT_XA_TAG_ATOMIC,
    DPT_XA_TAG_WRITE,
    Dmirror,
    DmirrorBounce,
    _bounce_fini,
    _bounce_init,
    _bounce_settle,
)
from .test_hmm_uapi import (
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_PUD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
    HmmDmirrorCmd,
)

if TYPE_CHECKING:
    from ..kernel.system import System
    from ..kernel.task import Task


# -- the mirror: notifier, fault, read/write ---------------------------------------------------------
__all__ = (
    "dmirror_check_atomic",
    "dmirror_do_fault",
    "dmirror_do_read",
    "dmirror_do_write",
    "dmirror_fault",
    "dmirror_interval_invalidate",
    "dmirror_min_ops",
    "dmirror_mkentry",
    "dmirror_mrn_ops",
    "dmirror_range_fault",
    "dmirror_range_snapshot",
    "dmirror_read",
    "dmirror_snapshot",
    "dmirror_snapshot_invalidate",
    "dmirror_write",
)


def dmirror_interval_invalidate(mni: MmuIntervalNotifier, r: MmuNotifierRange, cur_seq: int) -> bool:
    """``dmirror_interval_invalidate()``."""
    dmirror: Dmirror = mni.owner
    if r.event == MmuNotifierEvent.MMU_NOTIFY_MIGRATE and r.owner is dmirror.mdevice:
        return True
    if mmu_notifier_range_blockable(r):
        dmirror.mutex.lock()
    elif not dmirror.mutex.trylock():
        return False
    try:
        mmu_interval_set_seq(mni, cur_seq)
        dmirror.pt.erase_range(r.start >> PAGE_SHIFT, r.end >> PAGE_SHIFT)
        dmirror.sys.stats.add("dmirror.invalidate")
    finally:
        dmirror.mutex.unlock()
    return True


dmirror_min_ops = MmuIntervalNotifierOps(dmirror_interval_invalidate)


def dmirror_do_fault(dmirror: Dmirror, r: HmmRange) -> int:
    """``dmirror_do_fault()``: store the faulted pages in the device page table (mutex
    held). A read-only result for a write request is a WARN and ``-EFAULT``, after the
    entries before it were stored."""
    n = (r.end - r.start) >> PAGE_SHIFT
    pfns = r.hmm_pfns[:n]
    bad = (pfns & np.uint64(HMM_PFN_ERROR)) != 0
    bad |= (pfns & np.uint64(HMM_PFN_VALID)) == 0
    if bad.any():
        raise AssertionError("dmirror_do_fault: hmm_range_fault returned an invalid entry")
    writable = (pfns & np.uint64(HMM_PFN_WRITE)) != 0
    stop = n
    if r.default_flags & HMM_PFN_REQ_WRITE and not writable.all():
        stop = int(np.argmin(writable))
        dmirror.sys.stats.add("dmirror.warn_readonly_write")
    layout = hmm_pfn_layout(dmirror.sys.profile)
    page = (pfns[:stop] & np.uint64(~layout.flags & ULONG_MAX)).astype(np.int64)
    vals = (page << 2) | np.where(writable[:stop], DPT_XA_TAG_WRITE, 0)
    dmirror.pt.store_range(r.start >> PAGE_SHIFT, vals)
    return -EFAULT if stop < n else 0


def dmirror_range_fault(dmirror: Dmirror, r: HmmRange) -> int:
    """``dmirror_range_fault()``: the retry loop every HMM driver has."""
    return _range_fault(dmirror, r)[0]


def _range_fault(dmirror: Dmirror, r: HmmRange) -> tuple[int, bool]:
    """:func:`dmirror_range_fault`, also saying whether the result comes from
    ``dmirror_do_fault()`` (True) or from ``hmm_range_fault()``/the retry budget (False)."""
    mm = dmirror.notifier.mm
    assert mm is not None
    for _ in range(DMIRROR_RANGE_FAULT_RETRIES):
        r.notifier_seq = mmu_interval_read_begin(r.notifier)
        mmap_read_lock(mm)
        try:
            ret = hmm_range_fault(r)
        finally:
            mmap_read_unlock(mm)
        if ret:
            if ret == -EBUSY:
                continue
            return ret, False
        dmirror.mutex.lock()
        if mmu_interval_read_retry(r.notifier, r.notifier_seq):
            dmirror.mutex.unlock()
            continue
        try:
            return dmirror_do_fault(dmirror, r), True
        finally:
            dmirror.mutex.unlock()
    return -EBUSY, False


def dmirror_fault(dmirror: Dmirror, start: int, end: int, write: bool) -> int:
    """``dmirror_fault()``: fault ``[start, end)`` into the mirror one window
    (``dmirror_window`` pages: 64 in 6.12, 32 in 7.3) at a time.

    Fast path: runs of windows are faulted and mirrored as one batch
    (:func:`_fault_batch`) when no simulated thread can run in between; a batch that
    fails goes again window by window, which reproduces the driver's partial result."""
    mm = dmirror.notifier.mm
    assert mm is not None
    win = dmirror.sys.profile.dmirror_window
    flags = HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0)
    r = HmmRange(notifier=dmirror.notifier, start=start, end=start,
                 hmm_pfns=np.zeros(win, np.uint64), pfn_flags_mask=0,
                 default_flags=flags, dev_private_owner=dmirror.mdevice)
    if not mmget_not_zero(mm):
        return -EFAULT
    ret = 0
    slow_until = start
    try:
        addr = start
        while addr < end:
            if addr >= slow_until and addr + (win << PAGE_SHIFT) < end and not _threads_may_race(dmirror.sys):
                done, ret = _fault_batch(dmirror, addr, end, flags, win)
                if ret:
                    break
                if done > addr:
                    addr = done
                    continue
                slow_until = min(addr + (_BATCH_PAGES << PAGE_SHIFT), end)
            r.start = addr
            r.end = min(addr + (win << PAGE_SHIFT), end)
            ret = dmirror_range_fault(dmirror, r)
            if ret:
                break
            addr = r.end
    finally:
        mmput(mm)
    return ret


def _fault_batch(dmirror: Dmirror, addr: int, end: int, flags: int, win: int) -> tuple[int, int]:
    """The windows of ``dmirror_fault()`` in ``[addr, addr + _BATCH_PAGES)`` as one
    ``dmirror_range_fault()``, counting each window's protocol.

    Equivalent to the window loop: faults happen in the same address order, and an
    invalidation during them erases only entries from its own range on, which in either
    form are stored after it (the whole batch retries, as a window would). Returns
    ``(where the batch ends, 0)``, or ``(addr, 0)`` when it must go window by window: a
    hugetlb VMA in the range (6.12 reports a lockdep warning per walk), or a failed
    fault (the windows before it are then mirrored by the window loop, as the driver
    leaves them); ``(addr, ret)`` if storing the entries failed (after storing those
    before the read-only page, as ``dmirror_do_fault()`` does)."""
    mm = dmirror.notifier.mm
    assert mm is not None
    bend = min(addr + (_BATCH_PAGES << PAGE_SHIFT), end)
    if any(v.vm_flags & VM_HUGETLB for v in mm.vmas(addr, bend)):
        return addr, 0
    stats = dmirror.sys.stats
    protocol = stats.save(_PROTOCOL_KEYS)
    n = (bend - addr) >> PAGE_SHIFT
    r = HmmRange(notifier=dmirror.notifier, start=addr, end=bend, hmm_pfns=np.zeros(n, np.uint64),
                 pfn_flags_mask=0, default_flags=flags, dev_private_owner=dmirror.mdevice)
    ret, stored = _range_fault(dmirror, r)
    if not stored:
        # hmm_range_fault failed (or kept saying -EBUSY): the faults made so far stay made
        # (and counted), the calls do not; the window loop redoes this part
        stats.restore(protocol)
        return addr, 0
    _count_windows(dmirror, -(-n // win) - 1, snapshot=False)
    return (addr, ret) if ret else (bend, 0)


def _kernel_pages(dmirror: Dmirror, entries: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The pfns a kernel copy would go through (``memcpy_from/to_page``); a device-private
    page has no kernel mapping: the real kernel oopses (conventions, item 25)."""
    sys = dmirror.sys
    pfns = entries >> 2
    if len(pfns) and (pfns >= sys.mem.data_pages).any():
        pfn = int(pfns[pfns >= sys.mem.data_pages][0])
        raise KernelOops(f"dmirror{dmirror.mdevice.minor}: copy through device-private page "
                         f"{pfn:#x} (no kernel mapping): BUG in dmirror_do_read/write")
    return pfns


def dmirror_do_read(dmirror: Dmirror, start: int, end: int, bounce: DmirrorBounce) -> int:
    """``dmirror_do_read()``: copy mirrored pages to the bounce buffer until the first
    missing entry (``-ENOENT``). The copy is noted by source frame; it is made for real
    by :func:`_bounce_settle` when needed, at once if a simulated thread could run."""
    n = (end - start) >> PAGE_SHIFT
    entries = dmirror.pt.load_range(start >> PAGE_SHIFT, n)
    missing = np.flatnonzero(entries < 0)
    k = int(missing[0]) if len(missing) else n
    pfns = _kernel_pages(dmirror, entries[:k])
    off = (start - bounce.addr) >> PAGE_SHIFT
    if k:
        if bounce.src is None:
            bounce.src = np.full(bounce.npages, -1, np.int64)
        bounce.src[off:off + k] = pfns
        if _threads_may_race(dmirror.sys):  # another thread may change the frames
            _bounce_settle(dmirror.sys, bounce)
    bounce.cpages += k
    return -ENOENT if k < n else 0


def dmirror_do_write(dmirror: Dmirror, start: int, end: int, bounce: DmirrorBounce) -> int:
    """``dmirror_do_write()``: copy the bounce buffer into mirrored pages until the first
    entry that is missing or not tagged WRITE (``-ENOENT``)."""
    n = (end - start) >> PAGE_SHIFT
    entries = dmirror.pt.load_range(start >> PAGE_SHIFT, n)
    bad = np.flatnonzero((entries < 0) | ((entries & 3) != DPT_XA_TAG_WRITE))
    k = int(bad[0]) if len(bad) else n
    pfns = _kernel_pages(dmirror, entries[:k])
    off = (start - bounce.addr) & PAGE_MASK
    if k and bounce.src is not None:  # frame to frame from the user's buffer
        dmirror.sys.mem.copy_pages(pfns, bounce.src[off >> PAGE_SHIFT:(off >> PAGE_SHIFT) + k])
    elif k:
        dmirror.sys.mem.write_pages(pfns, bounce.buffer()[off:off + (k << PAGE_SHIFT)])
    bounce.cpages += k
    return -ENOENT if k < n else 0


def _dmirror_copy_rounds(dmirror: Dmirror, cmd: HmmDmirrorCmd, end: int, bounce: DmirrorBounce,
                         write: bool, fault: Callable[[Dmirror, int, int, bool], int] | None = None) -> int:
    """The loop READ, WRITE and READ_UNLOCKED share: copy through the mirror under the
    mutex until a page is missing (``-ENOENT``), then fault from that page to the end
    (``cmd.faults`` counts the rounds) and try again. *fault* defaults to
    :func:`dmirror_fault`."""
    do_copy = dmirror_do_write if write else dmirror_do_read
    do_fault = fault if fault is not None else dmirror_fault
    start = cmd.addr
    while True:
        with dmirror.mutex.held():
            ret = do_copy(dmirror, start, end, bounce)
        if ret != -ENOENT:
            return ret
        if not write:  # faults may free, COW or zero the frames read so far
            _bounce_settle(dmirror.sys, bounce)
        start = cmd.addr + (bounce.cpages << PAGE_SHIFT)
        ret = do_fault(dmirror, start, end, write)
        if ret:
            return ret
        cmd.faults += 1


def _dmirror_bounce_for(dmirror: Dmirror, cmd: HmmDmirrorCmd) -> tuple[int, DmirrorBounce | int]:
    """The range check and bounce allocation both commands start with."""
    size = (cmd.npages << PAGE_SHIFT) & ULONG_MAX
    end = (cmd.addr + size) & ULONG_MAX
    if end < cmd.addr:
        return end, -EINVAL
    return end, _bounce_init(dmirror.sys, cmd.addr, size)


def _bounce_to_user(dmirror: Dmirror, bounce: DmirrorBounce, caller: "Task", uptr: int) -> int:
    """``copy_to_user(cmd->ptr, bounce.ptr, bounce.size)``: bytes not copied. Pages only
    noted by source frame go frame to frame when nothing else is in the buffer and the
    user address is page aligned (else the bounce bytes are made first)."""
    sys = dmirror.sys
    src = bounce.src
    if (src is not None and bounce.data is None and not uptr & ~PAGE_MASK
            and bool((src >= 0).all())):
        return copy_pages_to_user(caller.mm, uptr, src)
    _bounce_settle(sys, bounce)
    return copy_to_user(caller.mm, uptr, bounce.buffer())


def dmirror_read(dmirror: Dmirror, cmd: HmmDmirrorCmd, caller: "Task") -> int:
    """``dmirror_read()``: HMM_DMIRROR_READ."""
    end, bounce = _dmirror_bounce_for(dmirror, cmd)
    if isinstance(bounce, int):
        return bounce
    try:
        ret = _dmirror_copy_rounds(dmirror, cmd, end, bounce, write=False)
        if ret == 0 and _bounce_to_user(dmirror, bounce, caller, cmd.ptr):
            ret = -EFAULT
        cmd.cpages = bounce.cpages
    finally:
        _bounce_fini(dmirror.sys, bounce)
    return ret


def dmirror_range_fault_unlocked(dmirror: Dmirror, r: HmmRange, timeout: int) -> int:
    """``dmirror_range_fault_unlocked()`` (7.3): ``hmm_range_fault_unlocked_timeout()``
    takes mmap_lock itself (and may drop it in a fault); then the usual sequence check
    under the mutex."""
    while True:
        ret = hmm_range_fault_unlocked_timeout(r, timeout)
        if ret:
            return ret
        dmirror.mutex.lock()
        if mmu_interval_read_retry(r.notifier, r.notifier_seq):
            dmirror.mutex.unlock()
            continue
        try:
            return dmirror_do_fault(dmirror, r)
        finally:
            dmirror.mutex.unlock()


def dmirror_fault_unlocked(dmirror: Dmirror, start: int, end: int, write: bool, timeout: int = 0) -> int:
    """``dmirror_fault_unlocked()`` (7.3): :func:`dmirror_fault` through the unlocked
    range fault, 32 pages (its ``pfns[32]``) at a time, window by window."""
    mm = dmirror.notifier.mm
    assert mm is not None
    flags = HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0)
    r = HmmRange(notifier=dmirror.notifier, start=start, end=start,
                 hmm_pfns=np.zeros(_UNLOCKED_WINDOW, np.uint64), pfn_flags_mask=0,
                 default_flags=flags, dev_private_owner=dmirror.mdevice)
    if not mmget_not_zero(mm):
        return -EFAULT
    ret = 0
    try:
        addr = start
        while addr < end:
            r.start = addr
            r.end = min(addr + (_UNLOCKED_WINDOW << PAGE_SHIFT), end)
            ret = dmirror_range_fault_unlocked(dmirror, r, timeout)
            if ret:
                break
            addr = r.end
    finally:
        mmput(mm)
    return ret


def dmirror_read_unlocked(dmirror: Dmirror, cmd: HmmDmirrorCmd, caller: "Task", timeout: int = 0) -> int:
    """``dmirror_read_unlocked()`` (7.3): HMM_DMIRROR_READ_UNLOCKED, a READ whose faults
    may drop mmap_lock (a userfaultfd handler can answer them); the ioctl passes timeout 0
    (retry for ever)."""
    end, bounce = _dmirror_bounce_for(dmirror, cmd)
    if isinstance(bounce, int):
        return bounce
    try:
        ret = _dmirror_copy_rounds(dmirror, cmd, end, bounce, write=False,
                                   fault=lambda d, s, e, w: dmirror_fault_unlocked(d, s, e, w, timeout))
        if ret == 0 and _bounce_to_user(dmirror, bounce, caller, cmd.ptr):
            ret = -EFAULT
        cmd.cpages = bounce.cpages
    finally:
        _bounce_fini(dmirror.sys, bounce)
    return ret


def dmirror_write(dmirror: Dmirror, cmd: HmmDmirrorCmd, caller: "Task") -> int:
    """``dmirror_write()``: HMM_DMIRROR_WRITE."""
    end, bounce = _dmirror_bounce_for(dmirror, cmd)
    if isinstance(bounce, int):
        return bounce
    try:
        if _batch_allowed(dmirror, caller, cmd.ptr, cmd.npages, cmd.addr, end) and not cmd.ptr & ~PAGE_MASK:
            # copy_from_user() noted by source frame: the faults of the rounds below
            # touch neither the buffer's pages nor its mapping
            pfns, sigs = translate_range(caller.mm, cmd.ptr, bounce.npages, write=False, stop_at_signal=True)
            if sigs:
                return -EFAULT
            bounce.src = pfns
        else:
            data, left = copy_from_user(caller.mm, cmd.ptr, bounce.size)
            if left:
                return -EFAULT
            bounce.data = data
        ret = _dmirror_copy_rounds(dmirror, cmd, end, bounce, write=True)
        cmd.cpages = bounce.cpages
    finally:
        _bounce_fini(dmirror.sys, bounce)
    return ret


def dmirror_check_atomic(dmirror: Dmirror, start: int, end: int) -> int:
    """``dmirror_check_atomic()``: ``-EPERM`` if a page of the range is mapped ATOMIC
    (only the device page table's existing leaves are looked at)."""
    first, last = start >> PAGE_SHIFT, (end >> PAGE_SHIFT) - 1
    for k, leaf in dmirror.pt.leaves.items():
        if not first // _LEAF <= k <= last // _LEAF:
            continue
        lo = max(first - k * _LEAF, 0)
        seg = leaf[lo:min(last - k * _LEAF, _LEAF - 1) + 1]
        if ((seg >= 0) & ((seg & 3) == DPT_XA_TAG_ATOMIC)).any():
            return -EPERM
    return 0


# -- snapshot ------------------------------------------------------------------------------------
def _mkentry_table(shift: int) -> npt.NDArray[np.uint8]:
    """The ``HMM_DMIRROR_PROT_*`` byte of every combination of the VALID/WRITE/ERROR bits
    and the map order (the entry bits from *shift* up), before the per-page checks."""
    table = _MKENTRY_TABLES.get(shift)
    if table is None:
        hi = np.arange(1 << (64 - shift), dtype=np.uint64) << _U(shift)
        error = (hi & _U(HMM_PFN_ERROR)) != 0
        valid = (hi & _U(HMM_PFN_VALID)) != 0
        order = ((hi >> _U(shift)) & _U(HMM_PFN_ORDER_MASK)).astype(np.int64)
        perm = np.where((hi & _U(HMM_PFN_WRITE)) != 0, HMM_DMIRROR_PROT_WRITE, HMM_DMIRROR_PROT_READ)
        perm |= np.where(order + PAGE_SHIFT == PMD_SHIFT, HMM_DMIRROR_PROT_PMD,
                         np.where(order + PAGE_SHIFT == PUD_SHIFT, HMM_DMIRROR_PROT_PUD, 0))
        perm = np.where(valid, perm, HMM_DMIRROR_PROT_NONE)
        table = _MKENTRY_TABLES[shift] = np.where(error, HMM_DMIRROR_PROT_ERROR, perm).astype(np.uint8)
    return table


_MKENTRY_TABLES: dict[int, npt.NDArray[np.uint8]] = {}


def dmirror_mkentry(dmirror: Dmirror, entries: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """``dmirror_mkentry()`` for many hmm_range_fault() outputs at once (the driver calls
    it per entry): one ``HMM_DMIRROR_PROT_*`` byte each, the flags and the order (read
    with the release's pfn layout, as ``hmm_pfn_to_map_order()`` does) through a table; the zero page and device pages
    (rare) are then looked at one by one."""
    sys = dmirror.sys
    shift = hmm_pfn_layout(sys.profile).order_shift
    e = np.asarray(entries, np.uint64)
    out = _mkentry_table(shift)[e >> _U(shift)]
    pfn = e & _U((1 << shift) - 1)
    usable = (e & _U(HMM_PFN_VALID | HMM_PFN_ERROR)) == _U(HMM_PFN_VALID)
    out[usable & (pfn == _U(sys.mem.zero_pfn))] |= np.uint8(HMM_DMIRROR_PROT_ZERO)
    for i in np.flatnonzero(usable & (pfn >= _U(sys.mem.ram_pages))).tolist():  # device pages
        pg = sys.pgmap_of(int(pfn[i]))
        if pg is None:
            continue
        local = pg.owner is dmirror.mdevice
        if pg.is_private:
            out[i] |= np.uint8(HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL if local else HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE)
        elif pg.is_coherent:
            out[i] |= np.uint8(HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL if local else HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE)
    return out


def dmirror_snapshot_invalidate(mni: MmuIntervalNotifier, r: MmuNotifierRange, cur_seq: int) -> bool:
    """``dmirror_snapshot_invalidate()``: any invalidation spoils the whole snapshot."""
    dmirror: Dmirror = mni.owner
    if mmu_notifier_range_blockable(r):
        dmirror.mutex.lock()
    elif not dmirror.mutex.trylock():
        return False
    mmu_interval_set_seq(mni, cur_seq)
    dmirror.mutex.unlock()
    return True


dmirror_mrn_ops = MmuIntervalNotifierOps(dmirror_snapshot_invalidate)


def dmirror_range_snapshot(dmirror: Dmirror, r: HmmRange) -> tuple[int, npt.NDArray[np.uint8] | None]:
    """``dmirror_range_snapshot()``: one window under a temporary interval notifier."""
    mm = dmirror.notifier.mm
    assert mm is not None
    notifier = MmuIntervalNotifier(owner=dmirror)
    r.notifier = notifier
    ret = mmu_interval_notifier_insert(notifier, mm, r.start, r.end - r.start, dmirror_mrn_ops)
    if ret:
        return ret, None
    try:
        for _ in range(DMIRROR_RANGE_FAULT_RETRIES):
            r.notifier_seq = mmu_interval_read_begin(notifier)
            mmap_read_lock(mm)
            try:
                ret = hmm_range_fault(r)
            finally:
                mmap_read_unlock(mm)
            if ret:
                if ret == -EBUSY:
                    continue
                return ret, None
            dmirror.mutex.lock()
            if mmu_interval_read_retry(notifier, r.notifier_seq):
                dmirror.mutex.unlock()
                continue
            try:
                n = (r.end - r.start) >> PAGE_SHIFT
                return 0, dmirror_mkentry(dmirror, r.hmm_pfns[:n])
            finally:
                dmirror.mutex.unlock()
        return -EBUSY, None
    finally:
        mmu_interval_notifier_remove(notifier)


def _snapshot_batch(dmirror: Dmirror, start: int, end: int, nwin: int) -> npt.NDArray[np.uint8] | None:
    """*nwin* windows of ``dmirror_snapshot()`` done as one: one temporary notifier, one
    walk, one mkentry over ``[start, end)``, counting the per-window protocol (notifier
    insert/remove, mmap_lock, mutex, range_fault calls) as the loop would. None (and no
    trace in the counters) if the batch must go window by window: the walk failed or was
    invalidated (a snapshot requests no fault, so otherwise every window's walk sees the
    same page tables and returns what the batched walk returns)."""
    mm = dmirror.notifier.mm
    assert mm is not None
    stats = dmirror.sys.stats
    saved = stats.save()
    n = (end - start) >> PAGE_SHIFT
    r = HmmRange(notifier=dmirror.notifier, start=start, end=end, hmm_pfns=np.zeros(n, np.uint64),
                 dev_private_owner=dmirror.mdevice)
    ret, perm = dmirror_range_snapshot(dmirror, r)
    if ret or perm is None:
        stats.restore(saved)
        return None
    _count_windows(dmirror, nwin - 1, snapshot=True)
    return perm


def dmirror_snapshot(dmirror: Dmirror, cmd: HmmDmirrorCmd, caller: "Task") -> int:
    """``dmirror_snapshot()``: HMM_DMIRROR_SNAPSHOT, one protection byte per page, one
    window (``dmirror_window`` pages) per temporary notifier.

    Fast path: runs of windows are done as one batch (:func:`_snapshot_batch`) when
    nothing can make a window's outcome differ (no simulated thread can run in between,
    and the user buffer lies outside the snapshotted range)."""
    mm = dmirror.notifier.mm
    assert mm is not None
    size = (cmd.npages << PAGE_SHIFT) & ULONG_MAX
    start = cmd.addr
    end = (start + size) & ULONG_MAX
    if end < start:
        return -EINVAL
    if not mmget_not_zero(mm):
        return -EINVAL
    win = dmirror.sys.profile.dmirror_window
    r = HmmRange(notifier=dmirror.notifier, start=start, end=start,
                 hmm_pfns=np.zeros(win, np.uint64), dev_private_owner=dmirror.mdevice)
    uptr = cmd.ptr
    batch_ok = _batch_allowed(dmirror, caller, uptr, cmd.npages, start, end)
    ret = 0
    try:
        addr = start
        while addr < end:
            nxt = min(addr + (win << PAGE_SHIFT), end)
            perm = None
            if batch_ok and nxt < end:
                bend = min(addr + (_BATCH_PAGES << PAGE_SHIFT), end)
                nwin = -(-((bend - addr) >> PAGE_SHIFT) // win)
                perm = _snapshot_batch(dmirror, addr, bend, nwin)
                if perm is not None:
                    nxt = bend
            if perm is None:
                r.start, r.end = addr, nxt
                ret, perm = dmirror_range_snapshot(dmirror, r)
                if ret:
                    break
                assert perm is not None
            if copy_to_user(caller.mm, uptr, perm):
                ret = -EFAULT
                break
            cmd.cpages += len(perm)
            uptr += len(perm)
            addr = nxt
    finally:
        mmput(mm)
    return ret


# -- batching windows ------------------------------------------------------------------------------
#: pages handled by one batched walk (bounds the temporary arrays: 8 bytes a page)
_BATCH_PAGES = 1 << 16
#: pages of one hmm_range of dmirror_fault_unlocked() (7.3's ``unsigned long pfns[32]``)
_UNLOCKED_WINDOW = 32
_U = np.uint64


def _batch_allowed(dmirror: Dmirror, caller: "Task", uptr: int, ulen_pages: int, start: int, end: int) -> bool:
    """Windows may be batched: no interleaving hook is registered (no other simulated
    thread can run between two windows) and the user buffer does not overlap the range
    (writing it cannot change what the next window sees)."""
    if _threads_may_race(dmirror.sys):
        return False
    if caller.mm is not dmirror.notifier.mm:
        return True
    ulen = max(ulen_pages, 1) << PAGE_SHIFT
    return uptr + ulen <= start or uptr >= end


#: counters of one window's protocol (the walk's own counters are not among them)
_PROTOCOL_KEYS = ("hmm.range_fault", "hmm.walk", "walk_page_range", "lock.mmap_lock.read",
                  "lock.dmirror_mutex.write", "hmm.range_fault.ebusy")


def _threads_may_race(sys: "System") -> bool:
    """Another simulated thread could run at a scheduling point (an interleaving hook is
    registered with the lock state)."""
    return sys.ls.has_hooks


def _count_windows(dmirror: Dmirror, extra: int, snapshot: bool) -> None:
    """Count the per-window protocol of *extra* windows that a batch did in one go: each
    window of the driver's loop takes mmap_lock (read) around one ``hmm_range_fault()``
    (one walk) and the mutex around ``mmu_interval_read_retry()``; a snapshot window also
    inserts and removes its temporary notifier."""
    if extra <= 0:
        return
    st = dmirror.sys.stats
    for key in _PROTOCOL_KEYS[:5]:
        st.add(key, extra)
    if snapshot:
        st.add("mmu_notifier.interval_insert", extra)
        st.add("mmu_notifier.interval_remove", extra)
