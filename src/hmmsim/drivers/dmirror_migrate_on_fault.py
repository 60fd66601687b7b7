"""test_hmm's ``HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV`` (the unified fault+migrate walk
series' test patch; profile ``hmm_migrate_on_fault``): fault a range in and migrate it to
device memory with one page-table walk per chunk, then read it back through the device.

Per chunk of ``PFNS_ARRAY_SIZE`` (64) pages, under ``mmap_read_lock``: an ``hmm_range``
with ``HMM_PFN_REQ_FAULT | HMM_PFN_REQ_MIGRATE``, the dmirror interval notifier and
``dev_private_owner = mdevice``, plus a ``migrate_vma`` (``pgmap_owner = mdevice``); the
dmirror retry loop (``mmu_interval_read_begin``, ``hmm_range_fault``, -EBUSY again,
then under the mutex the sequence check and the mirror update), then
``migrate_hmm_range_setup``, the usual allocate-and-copy, ``migrate_vma_pages``,
finalize-and-map and ``migrate_vma_finalize``. ``cpages`` is the sum of the chunks'
``migrate.cpages``.

Where the model differs from the posted driver (on purpose, said in
``docs/unified-walk.md``): an error of the fault step ends the command (the RFC went on
to migrate after a failed fault); when the sequence check under the mutex fails, what
the walk prepared is undone (:func:`~hmmsim.hmm.hmm_migrate.hmm_migrate_abort`) before
the retry; the mirror update skips "empty" entries (MIGRATE without VALID: the device
page the migration inserts is mapped by finalize-and-map).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..hmm.hmm import hmm_range_fault
from ..hmm.hmm_migrate import hmm_migrate_abort, migrate_hmm_range_setup
from ..hmm.migrate_device import MigrateVma, migrate_vma_finalize, migrate_vma_pages
from ..hmm.pfn import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_MIGRATE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    hmm_pfn_layout,
)
from ..kernel.errno import EBUSY, EFAULT, EINVAL
from ..kernel.mm import mmap_read_lock, mmap_read_unlock
from ..kernel.mmu_notifier import mmu_interval_read_begin, mmu_interval_read_retry
from ..kernel.page_types import PAGE_SHIFT
from ..kernel.task import mmget_not_zero, mmput
from .dmirror_core import (
    DMIRROR_RANGE_FAULT_RETRIES,
    DPT_XA_TAG_WRITE,
    Dmirror,
    _bounce_fini,
    _bounce_init,
)
from .dmirror_devmem import (
    dmirror_migrate_alloc_and_copy,
    dmirror_migrate_finalize_and_map,
)
from .dmirror_mirror import _bounce_to_user, dmirror_do_read
from .test_hmm_uapi import HmmDmirrorCmd

if TYPE_CHECKING:
    from ..kernel.task import Task

__all__ = ("PFNS_ARRAY_SIZE", "dmirror_migrate_on_fault_to_device", "dmirror_range_fault_migrate")

#: pages per ``hmm_range_fault`` call of the command (the series' ``PFNS_ARRAY_SIZE``)
PFNS_ARRAY_SIZE = 64

_ULONG = 0xFFFF_FFFF_FFFF_FFFF


def _dmirror_do_fault_migrate(dmirror: Dmirror, r: HmmRange) -> None:
    """``dmirror_do_fault()`` of a migrating range (mutex held): every VALID output is
    mirrored (a page about to migrate too: finalize-and-map replaces it, a page that does
    not move keeps it); the empty entries have no page yet."""
    n = (r.end - r.start) >> PAGE_SHIFT
    pfns = r.hmm_pfns[:n]
    idx = np.flatnonzero((pfns & np.uint64(HMM_PFN_VALID)) != 0)
    if len(idx) == 0:
        return
    layout = hmm_pfn_layout(dmirror.sys.profile)
    v = pfns[idx]
    page = (v & np.uint64(~layout.flags & _ULONG)).astype(np.int64)
    vals = (page << 2) | np.where((v & np.uint64(HMM_PFN_WRITE)) != 0, DPT_XA_TAG_WRITE, 0)
    dmirror.pt.store_indices((r.start >> PAGE_SHIFT) + idx, vals)


def dmirror_range_fault_migrate(dmirror: Dmirror, r: HmmRange) -> int:
    """``dmirror_range_fault()`` for a migrating range (mmap_lock held by the caller): the
    retry loop, the mirror updated under the mutex once the sequence still holds. A
    stale result is undone before the next try (the walk's migration entries removed)."""
    sys = dmirror.sys
    for _ in range(DMIRROR_RANGE_FAULT_RETRIES):
        r.notifier_seq = mmu_interval_read_begin(r.notifier)
        ret = hmm_range_fault(r)
        if ret == -EBUSY:
            continue
        if ret:
            return ret
        dmirror.mutex.lock()
        try:
            if mmu_interval_read_retry(r.notifier, r.notifier_seq):
                hmm_migrate_abort(sys, r, fault_folio=r.migrate.fault_folio)
                sys.stats.add("dmirror.migrate_on_fault.stale")
                continue
            _dmirror_do_fault_migrate(dmirror, r)
            return 0
        finally:
            dmirror.mutex.unlock()
    return -EBUSY


def dmirror_migrate_on_fault_to_device(dmirror: Dmirror, cmd: HmmDmirrorCmd, caller: Task) -> int:
    """``dmirror_migrate_on_fault_to_device()``: 64 pages at a time, fault and migrate in
    one walk, then read the range back through the device into the user's buffer
    (``-ENOENT`` if a page of it is not mirrored). ``cmd.cpages``: pages migrated."""
    mm = dmirror.notifier.mm
    start = cmd.addr
    end = start + (cmd.npages << PAGE_SHIFT)
    if end < start:
        return -EINVAL
    if mm is None or not mmget_not_zero(mm):
        return -EINVAL
    sys = dmirror.sys
    cpages = 0
    ret = 0
    pfns = np.zeros(PFNS_ARRAY_SIZE, np.uint64)
    mmap_read_lock(mm)
    try:
        addr = start
        while addr < end:
            nxt = min(end, addr + (PFNS_ARRAY_SIZE << PAGE_SHIFT))
            m = MigrateVma(None, addr, nxt, dmirror.mdevice, 0)  # type: ignore[arg-type]
            pfns[:] = 0
            r = HmmRange(notifier=dmirror.notifier, start=addr, end=nxt, hmm_pfns=pfns,
                         default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_MIGRATE, pfn_flags_mask=0,
                         dev_private_owner=dmirror.mdevice, migrate=m)
            ret = dmirror_range_fault_migrate(dmirror, r)
            if ret:
                break
            migrate_hmm_range_setup(r)
            dmirror_migrate_alloc_and_copy(m, dmirror)
            migrate_vma_pages(m)
            dmirror_migrate_finalize_and_map(m, dmirror)
            migrate_vma_finalize(m)
            cpages += m.cpages
            sys.stats.add("dmirror.migrate_on_fault.chunk")
            addr = nxt
    finally:
        mmap_read_unlock(mm)
        mmput(mm)
    if ret:
        return ret
    bounce = _bounce_init(sys, start, cmd.npages << PAGE_SHIFT)
    if isinstance(bounce, int):
        return bounce
    try:
        with dmirror.mutex.held():
            ret = dmirror_do_read(dmirror, start, end, bounce)
        if ret == 0 and _bounce_to_user(dmirror, bounce, caller, cmd.ptr):
            ret = -EFAULT  # copy_to_user() left bytes uncopied
    finally:
        _bounce_fini(sys, bounce)
    cmd.cpages = cpages
    return ret
