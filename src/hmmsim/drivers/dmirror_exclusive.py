"""HMM_DMIRROR_EXCLUSIVE: device-exclusive (atomic) access of ``lib/test_hmm.c``.

``dmirror_exclusive()`` makes every page of the range device-exclusive in the CPU page
table and maps it in the mirror tagged ATOMIC (``dmirror_atomic_map``), then reads the
range back through the mirror into the user's buffer like a READ that never faults
(``cpages`` = pages read). The two releases differ:

* 6.12 works in windows of 64 pages with ``make_device_exclusive_range()``; a window
  where a page could not be made exclusive (a THP tail page, a folio still mapped
  elsewhere) maps in the mirror only the pages that were, and the command fails with
  ``-EBUSY`` (also when GUP itself fails). So EXCLUSIVE on a PMD-mapped THP makes the
  whole THP exclusive through its head page and returns -EBUSY for its tail pages.
* 7.3 calls ``make_device_exclusive()`` page by page and returns its error as is.

Both pass a NULL owner, so the driver's own interval notifier sees the
MMU_NOTIFY_EXCLUSIVE invalidations and erases the mirror over them (one page past each,
as ``dmirror_interval_invalidate`` does) before the ATOMIC entries are stored. A CPU
fault restoring an entry invalidates the mirror too: CHECK_EXCLUSIVE
(:func:`~hmmsim.drivers.dmirror_mirror.dmirror_check_atomic`) then finds no ATOMIC entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..kernel.errno import EBUSY, EFAULT, EINVAL
from ..kernel.gup import put_page
from ..kernel.mm import mmap_read_lock, mmap_read_unlock
from ..kernel.page_types import PAGE_SHIFT, PAGE_SIZE
from ..kernel.pagemap import folio_unlock
from ..kernel.rmap import make_device_exclusive, make_device_exclusive_range
from ..kernel.task import mmget_not_zero, mmput
from .dmirror_core import DPT_XA_TAG_ATOMIC, Dmirror, _bounce_fini, _bounce_init
from .dmirror_mirror import _bounce_to_user, dmirror_do_read
from .test_hmm_uapi import HmmDmirrorCmd

if TYPE_CHECKING:
    from ..kernel.task import Task

__all__ = ("dmirror_atomic_map", "dmirror_exclusive")

#: entries of 6.12's on-stack ``struct page *pages[64]``
_EXCLUSIVE_WINDOW = 64


def dmirror_atomic_map(dmirror: Dmirror, addr: int, pages: list[int]) -> int:
    """``dmirror_atomic_map()``: store the pages made exclusive in the mirror, tagged
    ATOMIC, starting at *addr* (``-1`` entries are skipped: 6.12 passes a window with
    holes, 7.3 one page). Returns the number stored."""
    vals = np.asarray(pages, np.int64)
    ok = vals >= 0
    with dmirror.mutex.held():
        if ok.all():
            dmirror.pt.store_range(addr >> PAGE_SHIFT, (vals << 2) | DPT_XA_TAG_ATOMIC)
        else:
            for i in np.flatnonzero(ok).tolist():
                dmirror.pt.store_range((addr >> PAGE_SHIFT) + i, np.array([(int(vals[i]) << 2) | DPT_XA_TAG_ATOMIC]))
    return int(ok.sum())


def _exclusive_612(dmirror: Dmirror, start: int, end: int) -> int:
    """6.12's loop: windows of 64 pages through ``make_device_exclusive_range()``."""
    mm = dmirror.notifier.mm
    sys = dmirror.sys
    addr = start
    while addr < end:
        nxt = min(end, addr + (_EXCLUSIVE_WINDOW << PAGE_SHIFT))
        pages: list[int] = []
        ret = make_device_exclusive_range(mm, addr, nxt, pages, None)
        mapped = 0
        if ret == (nxt - addr) >> PAGE_SHIFT:
            mapped = dmirror_atomic_map(dmirror, addr, pages)
        for i in range(max(ret, 0)):
            if pages[i] >= 0:
                folio_unlock(sys, pages[i])
                put_page(sys, pages[i])
        if addr + (mapped << PAGE_SHIFT) < nxt:
            return -EBUSY
        addr = nxt
    return 0


def _exclusive_73(dmirror: Dmirror, start: int, end: int) -> int:
    """7.3's loop: ``make_device_exclusive()`` page by page."""
    mm = dmirror.notifier.mm
    sys = dmirror.sys
    for addr in range(start, end, PAGE_SIZE):
        page, head = make_device_exclusive(mm, addr, None)
        if page < 0:
            return page
        dmirror_atomic_map(dmirror, addr, [page])
        folio_unlock(sys, head)
        put_page(sys, page)
    return 0


def dmirror_exclusive(dmirror: Dmirror, cmd: HmmDmirrorCmd, caller: "Task") -> int:
    """``dmirror_exclusive()``: HMM_DMIRROR_EXCLUSIVE (see the module docstring)."""
    sys = dmirror.sys
    start = cmd.addr
    size = cmd.npages << PAGE_SHIFT
    end = start + size
    if end < start:
        return -EINVAL
    mm = dmirror.notifier.mm
    if not mmget_not_zero(mm):
        return -EINVAL
    mmap_read_lock(mm)
    try:
        if sys.profile.per_page_device_exclusive:
            ret = _exclusive_73(dmirror, start, end)
        else:
            ret = _exclusive_612(dmirror, start, end)
    finally:
        mmap_read_unlock(mm)
        mmput(mm)
    if ret:
        return ret
    # Return the data the device can now access, for verification.
    bounce = _bounce_init(sys, start, size)
    if isinstance(bounce, int):
        return bounce
    try:
        with dmirror.mutex.held():
            ret = dmirror_do_read(dmirror, start, end, bounce)
        if ret == 0 and _bounce_to_user(dmirror, bounce, caller, cmd.ptr):
            ret = -EFAULT
        cmd.cpages = bounce.cpages
    finally:
        _bounce_fini(sys, bounce)
    return ret
