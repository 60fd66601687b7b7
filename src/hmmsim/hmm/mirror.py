"""A minimal driver-side mirror: the protocol of ``Documentation/mm/hmm.rst`` as a class.

Every HMM driver (test_hmm's ``dmirror_range_fault``, ``drm_gpusvm_get_pages``, nouveau,
amdgpu) repeats the same loop: ``mmu_interval_read_begin``, ``hmm_range_fault`` under the
mmap read lock, restart on ``-EBUSY``, then take the driver lock and restart if
``mmu_interval_read_retry`` says an invalidation ran, else use the result. This class is
that loop around one interval notifier, for prototyping driver logic and for tests; it
records every invalidation it receives and counts retries.

>>> from hmmsim import System
>>> from hmmsim.hmm.hmm import HMM_PFN_REQ_FAULT, HMM_PFN_VALID
>>> p = System().spawn(); a = p.mmap(8192)
>>> m = HmmMirror(p.mm)
>>> ret, pfns = m.range_fault(a, a + 8192, default_flags=HMM_PFN_REQ_FAULT)
>>> ret, all(int(x) & HMM_PFN_VALID for x in pfns)
(0, True)
>>> m.remove()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..kernel.errno import EBUSY
from ..kernel.locking import Lock
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
)
from ..kernel.page_types import PAGE_MASK, PAGE_SHIFT, ULONG_MAX
from .hmm import HmmRange, hmm_range_fault
from .hmm_migrate import hmm_migrate_abort

if TYPE_CHECKING:
    from ..kernel.mm import MM

__all__ = ("HmmMirror",)


class HmmMirror:
    """An interval notifier over ``[start, start + length)`` of *mm* (default: all of it)
    with a driver lock and the fault/retry loop."""

    def __init__(self, mm: "MM", start: int = 0, length: int = ULONG_MAX & PAGE_MASK, owner: Any = None) -> None:
        self.mm = mm
        self.owner = owner
        self.lock = Lock(mm.sys.ls, "mirror_lock")
        self.notifier = MmuIntervalNotifier(owner=self)
        #: every invalidation received: (event name, start, end, owner)
        self.invalidations: list[tuple[str, int, int, Any]] = []
        self.retries = 0
        ret = mmu_interval_notifier_insert(self.notifier, mm, start, length, MmuIntervalNotifierOps(self._invalidate))
        if ret:
            raise ValueError(f"mmu_interval_notifier_insert: {ret}")

    def _invalidate(self, sub: MmuIntervalNotifier, r: MmuNotifierRange, cur_seq: int) -> bool:
        """The notifier callback. Like ``dmirror_interval_invalidate()``, the mirror's own
        MMU_NOTIFY_MIGRATE invalidations (``r.owner`` is this mirror's *owner*) leave the
        sequence alone: its pages move at its own request, and counting that would make
        its fault loop retry (with the unified fault+migrate walk, for ever). Every other
        event advances the sequence."""
        if self.owner is not None and r.event == MmuNotifierEvent.MMU_NOTIFY_MIGRATE and r.owner is self.owner:
            self.invalidations.append((r.event.name, r.start, r.end, r.owner))
            return True
        with self.lock.held():
            mmu_interval_set_seq(sub, cur_seq)
            self.invalidations.append((r.event.name, r.start, r.end, r.owner))
        return True

    def range_fault(self, start: int, end: int, default_flags: int = 0, pfn_flags_mask: int = 0,
                    hmm_pfns: npt.NDArray[np.uint64] | None = None, dev_private_owner: Any = None,
                    max_retries: int = 1000) -> tuple[int, npt.NDArray[np.uint64]]:
        """The driver loop over a new range; returns ``(ret, hmm_pfns)`` (``-EBUSY`` after
        *max_retries*)."""
        n = max(end - start, 0) >> PAGE_SHIFT  # start >= end: hmm_range_fault() says -EINVAL
        pfns = hmm_pfns if hmm_pfns is not None else np.zeros(n, np.uint64)
        r = HmmRange(notifier=self.notifier, start=start, end=end, hmm_pfns=pfns,
                     default_flags=default_flags, pfn_flags_mask=pfn_flags_mask,
                     dev_private_owner=dev_private_owner if dev_private_owner is not None else self.owner)
        return self.fault(r, max_retries), pfns

    def fault(self, r: HmmRange, max_retries: int = 1000) -> int:
        """The driver loop over a prepared range *r* (its notifier this mirror's): 0, the
        walk's error, or ``-EBUSY`` after *max_retries*. With ``r.migrate`` (the unified
        fault+migrate walk), a result whose sequence moved is undone
        (``hmm_migrate_abort()``) before the next try."""
        for _ in range(max_retries):
            r.notifier_seq = mmu_interval_read_begin(self.notifier)
            mmap_read_lock(self.mm)
            try:
                ret = hmm_range_fault(r)
            finally:
                mmap_read_unlock(self.mm)
            if ret == -EBUSY:
                self.retries += 1
                continue
            if ret:
                return ret
            with self.lock.held():
                if mmu_interval_read_retry(self.notifier, r.notifier_seq):
                    if r.migrate is not None:
                        hmm_migrate_abort(self.mm.sys, r)
                    self.retries += 1
                    continue
                return 0
        return -EBUSY

    def remove(self) -> None:
        """``mmu_interval_notifier_remove()``."""
        mmu_interval_notifier_remove(self.notifier)
