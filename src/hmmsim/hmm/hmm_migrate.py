"""The unified fault+migrate walk: ``hmm_range_fault()`` with ``HMM_PFN_REQ_MIGRATE`` /
``hmm_range.migrate``, ``migrate_hmm_range_setup()`` and ``migrate_vma_setup()`` rebuilt on
them (the "Migrate on fault for device pages" series, seed 003: "mm: unified hmm fault
and migrate device pagewalk paths", v2). Not in any release: an option on top of 7.3
(profile ``hmm_migrate_on_fault``, ``System(kernel="7.3", migrate_on_fault=True)``); see
``docs/unified-walk.md``.

One walk does both jobs. Per pmd span, first the usual hmm handling
(:func:`~hmmsim.hmm.hmm.hmm_vma_walk_pmd`: outputs, or a recorded fault), then the
migrate-prepare step for the entries the hmm step output: selection (``SELECT_*`` from
``hmm_select_migrate()``, the pgmap owner), folio reference + trylock (or the locked
``fault_page``), anon-exclusive handling, a migration entry carrying soft-dirty/uffd-wp,
``HMM_PFN_MIGRATE`` in the output. That step is :mod:`.migrate_device`'s own collection
(``migrate_vma_collect_pmd`` / ``_hole`` / the 7.3 huge-PMD paths), run on a scratch
``struct migrate_vma`` positioned at the span and translated to hmm bits, so the two
entry points cannot drift apart. Only entries the hmm step reported VALID, and holes,
are looked at (the series' ``if (!(*hmm_pfn & HMM_PFN_VALID)) goto out``).

Output encoding (``include/linux/hmm.h`` of the series, layout from the profile:
MIGRATE bit 57, COMPOUND bit 56, order from bit 51)::

    VALID|MIGRATE [|WRITE] pfn     a migration entry was installed for page pfn
    MIGRATE (no VALID)             an empty page: a hole or the zero page of an
                                   anonymous VMA, to be filled (v7's encoding; v2 wrote
                                   VALID|MIGRATE with pfn 0)
    ... |COMPOUND                  the entry stands for the whole PMD (a THP or a 2 MiB
                                   hole), the next 511 entries are 0

How 7.3 is fitted (the series was written against the in-walk faults of 2025): a fault
is only recorded in the walk (``hmm_fault_outside_walk``); the walk unwinds,
``hmm_do_fault`` runs with no page-table lock, and the walk restarts at ``last``, whose
entries below it already hold their migration entries. A PMD-mapped THP (or a
device-private THP) is taken whole with ``MIGRATE_VMA_SELECT_COMPOUND`` and a full,
aligned span; otherwise it is split and the walk restarts from ``last`` (-EBUSY).

Rules of a call (:func:`hmm_range_fault_migrate`):

* one VMA: the first VMA the walk tests is recorded; another one fails with ``-ERANGE``;
* one ``MMU_NOTIFY_MIGRATE`` invalidation (owner ``dev_private_owner``), started when
  the first VMA is captured and ended after the retry loop on every exit, -EBUSY included;
* "fault path" (a notifier): the sequence is checked before every walk (-EBUSY) and
  ``migrate.vma/start/end`` are filled in; "migrate path" (no notifier: the call from
  ``migrate_vma_setup``): the mm is ``migrate.vma``'s, no sequence check;
* a failed call leaves nothing prepared: the migration entries it installed are removed
  again (v2 left them to the caller; see the docs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..kernel.errno import EBUSY, EINVAL, ENOENT, ERANGE
from ..kernel.migrate import is_pmd_migration_entry
from ..kernel.mm import PtRef, mmap_assert_locked
from ..kernel.mmu_notifier import (
    MmuNotifierEvent,
    MmuNotifierRange,
    mmu_interval_check_retry,
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
)
from ..kernel.page_types import PAGE_SHIFT, PMD_SIZE
from ..kernel.pagewalk import ACTION_AGAIN, MmWalk, MmWalkOps, walk_page_range
from ..kernel.pgtable import _PAGE_PRESENT, _PAGE_PSE, pmd_none, pmd_present
from .hmm import (
    HMM_FAULT_PENDING,
    HmmVmaWalk,
    hmm_do_fault,
    hmm_vma_walk_hole,
    hmm_vma_walk_hugetlb_entry,
    hmm_vma_walk_pmd,
    hmm_vma_walk_pud,
    hmm_vma_walk_test,
    hmm_walk_ops,
)
from .migrate_device import (
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SHIFT,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_device_finalize,
    migrate_device_unmap,
    migrate_vma_collect_hole,
    migrate_vma_collect_pmd,
)
from .pfn import (
    HMM_PFN_COMPOUND,
    HMM_PFN_INOUT_FLAGS,
    HMM_PFN_MIGRATE,
    HMM_PFN_REQ_MIGRATE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
)

if TYPE_CHECKING:
    from ..kernel.profile import Profile
    from ..kernel.system import System

__all__ = (
    "HmmMigrateWalk",
    "hmm_migrate_abort",
    "hmm_migrate_walk_ops",
    "hmm_range_fault_migrate",
    "hmm_select_migrate",
    "migrate_hmm_range_setup",
    "migrate_vma_setup_hmm",
)


_U = np.uint64
_MIG_BITS = _U(HMM_PFN_MIGRATE | HMM_PFN_COMPOUND)
_VALID = _U(HMM_PFN_VALID)


def hmm_select_migrate(r: HmmRange) -> int:
    """``hmm_select_migrate()``: the ``MIGRATE_VMA_SELECT_*`` bits the walk migrates by:
    ``migrate.flags``, plus SELECT_SYSTEM when ``default_flags`` asks HMM_PFN_REQ_MIGRATE
    (the fault path migrates system pages). 0: nothing is migrated."""
    minfo = r.migrate.flags if r.migrate is not None else 0
    if r.default_flags & HMM_PFN_REQ_MIGRATE:
        minfo |= MIGRATE_VMA_SELECT_SYSTEM
    return minfo


class HmmMigrateWalk(HmmVmaWalk):
    """``struct hmm_vma_walk`` of the series: the hmm walk state plus the captured VMA,
    its span, the ``MMU_NOTIFY_MIGRATE`` range once started, and the collector (a scratch
    ``struct migrate_vma`` the prepare step fills, one entry per page of the range)."""

    __slots__ = ("captured", "collector", "mig_end", "mig_start", "minfo", "mmu_range", "vma")

    def __init__(self, r: HmmRange, profile: Profile, minfo: int) -> None:
        super().__init__(r, profile)
        m = r.migrate
        self.minfo = minfo
        self.vma = None
        self.mig_start = r.start
        self.mig_end = r.start
        self.mmu_range: MmuNotifierRange | None = None
        n = (r.end - r.start) >> PAGE_SHIFT
        #: where the migrate collection writes (``src[npages]``): positioned per span
        c = MigrateVma(m.vma, r.start, r.end, m.pgmap_owner, minfo, m.fault_page)
        c.fault_folio = m.fault_folio
        self.collector = c
        #: entries holding a migration entry this call installed (for the teardown)
        self.captured = np.zeros(n, np.bool_)


# -- the migrate-prepare step ---------------------------------------------------------------------
def _translate(hvw: HmmMigrateWalk, i: int, j: int) -> None:
    """The collector's ``src[i:j]`` as hmm output bits: a collected page gets MIGRATE
    (+COMPOUND) on top of its output, a hole/zero page becomes the empty encoding
    (MIGRATE without VALID); the entries after a compound one keep only the inout flags."""
    src = hvw.collector.src[i:j]
    if not src.any():
        return
    pfns = hvw.range.hmm_pfns[i:j]
    sel = (src & _U(MIGRATE_PFN_MIGRATE)) != 0
    comp = np.where((src & _U(MIGRATE_PFN_COMPOUND)) != 0, _U(HMM_PFN_COMPOUND), _U(0))
    page = sel & ((src & _U(MIGRATE_PFN_VALID)) != 0)
    empty = sel & ~page
    if page.any():
        pfns[page] |= _U(HMM_PFN_MIGRATE) | comp[page]
        hvw.captured[i:j] |= page
    if empty.any():
        pfns[empty] = (pfns[empty] & hvw.inout) | _U(HMM_PFN_MIGRATE) | comp[empty]
    for k in np.flatnonzero(comp != 0).tolist():  # the rest of a compound entry's PMD
        pfns[k + 1:k + (PMD_SIZE >> PAGE_SHIFT)] &= hvw.inout
    src[:] = 0


def _collector_walk(walk: MmWalk, hvw: HmmMigrateWalk, addr: int) -> MmWalk:
    """A walk handle for the collection callbacks, positioned at *addr*."""
    c = hvw.collector
    c.npages = (addr - hvw.range.start) >> PAGE_SHIFT
    sub = MmWalk(walk.ops, walk.mm, c)
    sub.vma = walk.vma
    return sub


def hmm_vma_handle_migrate_prepare(walk: MmWalk, pmd: PtRef, start: int, end: int) -> None:
    """``hmm_vma_handle_migrate_prepare()`` for the pte entries of ``[start, end)`` whose
    hmm output is stored: entries reported VALID and holes (the series looks at no
    other) are collected in runs, a pte table at a time (``migrate_vma_collect_pmd``:
    classification, trylock, migration entries; a large folio is split first)."""
    hvw: HmmMigrateWalk = walk.private
    r = hvw.range
    i = (start - r.start) >> PAGE_SHIFT
    n = (end - start) >> PAGE_SHIFT
    got = walk.mm.pte_offset_map(pmd)
    if got is None:
        return
    i0 = (start >> PAGE_SHIFT) & 511
    seg = got[0][i0:i0 + n]
    ok = ((r.hmm_pfns[i:i + n] & _VALID) != 0) | (seg == 0)
    if ok.all():
        runs = [(0, n)]
    else:
        edges = np.flatnonzero(np.diff(np.concatenate(([False], ok, [False])).astype(np.int8)))
        runs = list(zip(edges[0::2].tolist(), edges[1::2].tolist()))
    for a, b in runs:
        sub = _collector_walk(walk, hvw, start + (a << PAGE_SHIFT))
        migrate_vma_collect_pmd(pmd, start + (a << PAGE_SHIFT), start + (b << PAGE_SHIFT), sub)
    _translate(hvw, i, i + n)


def hmm_vma_handle_migrate_prepare_pmd(walk: MmWalk, pmd: PtRef, start: int, end: int) -> int:
    """``hmm_vma_handle_migrate_prepare_pmd()`` + ``hmm_vma_walk_split()``: a THP or a
    device-private THP the hmm step reported. Taken whole (a PMD migration entry,
    COMPOUND) with SELECT_COMPOUND and an aligned full span; otherwise the folio is split
    and -EBUSY restarts the walk at *start* (``last``). 0 when the span is done."""
    from .migrate_device_huge import migrate_vma_collect_huge_pmd
    hvw: HmmMigrateWalk = walk.private
    sub = _collector_walk(walk, hvw, start)
    ret = migrate_vma_collect_huge_pmd(pmd, start, end, sub)
    i = (start - hvw.range.start) >> PAGE_SHIFT
    if ret == -ENOENT:  # split: walk the span again as ptes
        hvw.collector.src[i:i + ((end - start) >> PAGE_SHIFT)] = 0
        hvw.last = start
        walk.mm.sys.stats.add("hmm.migrate.split_retry")
        return -EBUSY
    _translate(hvw, i, i + ((end - start) >> PAGE_SHIFT))
    return 0


# -- walk callbacks -------------------------------------------------------------------------------
def hmm_migrate_walk_pmd(pmd: PtRef, start: int, end: int, walk: MmWalk) -> int:
    """``hmm_vma_walk_pmd()`` of the series: the hmm step for the span, then the
    migrate-prepare step for the entries it output (those below ``last`` when it stopped
    at a fault or a migration wait)."""
    hvw: HmmMigrateWalk = walk.private
    e = pmd.get()
    if is_pmd_migration_entry(e):
        # a PMD under migration is not waited for when migrating: reported empty-handed
        r = hvw.range
        i = (start - r.start) >> PAGE_SHIFT
        r.hmm_pfns[i:i + ((end - start) >> PAGE_SHIFT)] &= hvw.inout
        return 0
    huge = pmd_present(e) and e & _PAGE_PSE or (e and not pmd_present(e))
    ret = hmm_vma_walk_pmd(pmd, start, end, walk)
    if walk.action == ACTION_AGAIN:
        return ret
    if ret == 0:
        stop = end
    elif ret in (HMM_FAULT_PENDING, -EBUSY):
        stop = hvw.last
    else:
        return ret
    if stop > start:
        if pmd_none(e):
            hmm_migrate_collect_hole(start, stop, walk)
        elif huge:
            r = hvw.range
            i = (start - r.start) >> PAGE_SHIFT
            if hvw.range.hmm_pfns[i] & _VALID:
                err = hmm_vma_handle_migrate_prepare_pmd(walk, pmd, start, stop)
                if err:
                    return err
        elif pmd.get() & (_PAGE_PRESENT | _PAGE_PSE) == _PAGE_PRESENT:
            hmm_vma_handle_migrate_prepare(walk, pmd, start, stop)
    return ret


def hmm_migrate_collect_hole(start: int, end: int, walk: MmWalk) -> None:
    """The migrating half of ``hmm_pfns_fill()``: a hole of an anonymous VMA is an empty
    entry (COMPOUND for an aligned 2 MiB one with SELECT_COMPOUND)."""
    hvw: HmmMigrateWalk = walk.private
    sub = _collector_walk(walk, hvw, start)
    migrate_vma_collect_hole(start, end, -1, sub)
    i = (start - hvw.range.start) >> PAGE_SHIFT
    _translate(hvw, i, i + ((end - start) >> PAGE_SHIFT))


def hmm_migrate_walk_hole(addr: int, end: int, depth: int, walk: MmWalk) -> int:
    """``hmm_vma_walk_hole()``: the hmm step, then (in a VMA) the empty-entry encoding."""
    ret = hmm_vma_walk_hole(addr, end, depth, walk)
    if ret == 0 and walk.vma is not None:
        hmm_migrate_collect_hole(addr, end, walk)
    return ret


def hmm_vma_capture_migrate_range(start: int, end: int, walk: MmWalk) -> int:
    """``hmm_vma_capture_migrate_range()``: record the first VMA (-ERANGE for another
    one) and start the call's one ``MMU_NOTIFY_MIGRATE`` invalidation at the first
    capture."""
    hvw: HmmMigrateWalk = walk.private
    vma = walk.vma
    if hvw.vma is not None and hvw.vma is not vma:
        walk.mm.sys.stats.add("hmm.migrate.erange")
        return -ERANGE
    if hvw.vma is None:
        hvw.vma = vma
        hvw.mig_start = start
    hvw.mig_end = end
    if hvw.mmu_range is None:
        assert vma is not None
        hvw.mmu_range = MmuNotifierRange(MmuNotifierEvent.MMU_NOTIFY_MIGRATE, 0, vma.vm_mm, start, end,
                                         hvw.range.dev_private_owner)
        mmu_notifier_invalidate_range_start(hvw.mmu_range)
    return 0


def hmm_migrate_walk_test(start: int, end: int, walk: MmWalk) -> int:
    """``hmm_vma_walk_test()`` of the series: the capture, then the usual test."""
    r = hmm_vma_capture_migrate_range(start, end, walk)
    if r:
        return r
    return hmm_vma_walk_test(start, end, walk)


hmm_migrate_walk_ops = MmWalkOps(
    pud_entry=hmm_vma_walk_pud,
    pmd_entry=hmm_migrate_walk_pmd,
    pte_hole=hmm_migrate_walk_hole,
    hugetlb_entry=hmm_vma_walk_hugetlb_entry,
    test_walk=hmm_migrate_walk_test,
)


# -- the call -------------------------------------------------------------------------------------
def hmm_migrate_abort(sys: System, r: HmmRange, captured: npt.NDArray[np.bool_] | None = None,
                      fault_folio: int = -1) -> None:
    """Undo what a walk prepared: the migration entries of the *captured* entries (by
    default every output with VALID and MIGRATE: after a successful call, for a driver
    that drops the result) become the pages' mappings again (``migrate_device_finalize``
    with no destination: unlock, drop the collection references) and MIGRATE/COMPOUND
    leave the outputs."""
    pfns = r.hmm_pfns
    n = (r.end - r.start) >> PAGE_SHIFT
    if captured is None:
        both = _U(HMM_PFN_VALID | HMM_PFN_MIGRATE)
        captured = (pfns[:n] & both) == both
    idx = np.flatnonzero(captured)
    if len(idx):
        layout = r.layout
        v = pfns[idx]
        page = v & _U(~layout.flags & 0xFFFF_FFFF_FFFF_FFFF)
        src = (page << _U(MIGRATE_PFN_SHIFT)) | _U(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
        src |= np.where((v & _U(HMM_PFN_COMPOUND)) != 0, _U(MIGRATE_PFN_COMPOUND), _U(0))
        migrate_device_finalize(sys, src, np.zeros(len(src), np.uint64), len(src), fault_folio)
        captured[idx] = False
        sys.stats.add("hmm.migrate.abort")
    pfns[:n] &= ~_MIG_BITS


def hmm_range_fault_migrate(r: HmmRange) -> int:
    """``hmm_range_fault()`` with ``hmm_range.migrate`` (profile ``hmm_migrate_on_fault``):
    one walk that faults as requested and prepares the migration of what it finds.

    Fault path (``r.notifier`` set): the interval sequence is checked before each walk;
    on success ``migrate.vma/start/end`` are filled in. Migrate path (no notifier): the
    mm is ``migrate.vma``'s. Either way the ``MMU_NOTIFY_MIGRATE`` invalidation started
    at the first capture is ended before returning, and a failed call (-EBUSY, -EFAULT,
    -ERANGE, ...) removes the migration entries it installed.

    :return: 0 or the errors of :func:`~hmmsim.hmm.hmm.hmm_range_fault`, plus ``-ERANGE``
        (the range crosses a second VMA) and ``-EINVAL`` (REQ_MIGRATE without
        ``migrate``)
    """
    m: MigrateVma | None = r.migrate
    fault_path = r.notifier is not None
    mm = r.notifier.mm if fault_path else (m.vma.vm_mm if m is not None else None)
    assert mm is not None, "hmm_range_fault: no notifier mm and no migrate VMA"
    sys = mm.sys
    if not sys.profile.hmm_migrate_on_fault:
        raise TypeError("hmm_range.migrate exists only with the unified walk (migrate_on_fault)")
    if m is None:
        return -EINVAL
    mmap_assert_locked(mm)
    n = (r.end - r.start) >> PAGE_SHIFT
    if len(r.hmm_pfns) < n:
        raise ValueError("hmm_pfns is shorter than the range")
    hvw = HmmMigrateWalk(r, sys.profile, hmm_select_migrate(r))
    # nothing selected (no SELECT_* and no REQ_MIGRATE): the plain walk, no capture
    ops = hmm_migrate_walk_ops if hvw.minfo else hmm_walk_ops
    stats = sys.stats
    stats.add("hmm.range_fault")
    stats.add("hmm.migrate.range_fault")
    ret = 0
    try:
        while True:
            if fault_path and mmu_interval_check_retry(r.notifier, r.notifier_seq):
                stats.add("hmm.range_fault.ebusy")
                ret = -EBUSY
                break
            stats.add("hmm.walk")
            ret = walk_page_range(mm, hvw.last, r.end, ops, hvw)
            if ret == HMM_FAULT_PENDING:
                ret = hmm_do_fault(mm, hvw)
            if ret != -EBUSY:
                break
    finally:
        if hvw.mmu_range is not None:
            if fault_path and ret == 0:
                m.vma = hvw.vma
                m.start = r.start
                m.end = hvw.mig_end
            mmu_notifier_invalidate_range_end(hvw.mmu_range)
            stats.add("hmm.migrate.notifier_bracket")
    if ret and hvw.captured.any():
        hmm_migrate_abort(sys, r, hvw.captured, m.fault_folio)
    return ret


def migrate_hmm_range_setup(r: HmmRange) -> None:
    """``migrate_hmm_range_setup()``: turn the walk's outputs into ``migrate.src``
    (VALID+MIGRATE: ``migrate_pfn(pfn) | MIGRATE`` (+WRITE, +COMPOUND); the empty
    encoding: ``MIGRATE`` (+COMPOUND); anything else 0), count ``cpages``, then unmap
    (``migrate_vma_unmap``: references checked, pages that cannot move restored)."""
    m: MigrateVma | None = r.migrate
    if m is None:
        return
    npages = (m.end - m.start) >> PAGE_SHIFT
    m.npages = npages
    m.cpages = 0
    off = (m.start - r.start) >> PAGE_SHIFT
    h = r.hmm_pfns[off:off + npages] & ~_U(HMM_PFN_INOUT_FLAGS)
    layout = r.layout
    mig = (h & _U(HMM_PFN_MIGRATE)) != 0
    valid = (h & _VALID) != 0
    page = mig & valid
    comp = np.where((h & _U(HMM_PFN_COMPOUND)) != 0, _U(MIGRATE_PFN_COMPOUND), _U(0))
    src = np.zeros(npages, np.uint64)
    pfn = h & _U(~layout.flags & 0xFFFF_FFFF_FFFF_FFFF)
    src[page] = ((pfn[page] << _U(MIGRATE_PFN_SHIFT)) | _U(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
                 | np.where((h[page] & _U(HMM_PFN_WRITE)) != 0, _U(MIGRATE_PFN_WRITE), _U(0)) | comp[page])
    empty = mig & ~valid
    src[empty] = _U(MIGRATE_PFN_MIGRATE) | comp[empty]
    m.src[:npages] = src
    m.dst[:npages] = 0
    m.cpages = int(np.count_nonzero(mig))
    if m.vma is None:  # the walk captured nothing (nothing selected): nothing to unmap
        return
    if m.cpages:
        m.cpages = migrate_device_unmap(m.vma.vm_mm.sys, m.src, npages, m.fault_page)
    m.vma.vm_mm.sys.stats.add("migrate_vma.setup")


def migrate_vma_setup_hmm(m: MigrateVma, nr: int) -> int:
    """The collection half of ``migrate_vma_setup()`` rebuilt on ``hmm_range_fault()``
    (the series' migrate path; the caller validated the arguments): an
    ``hmm_range`` over ``src`` without a notifier (REQ_FAULT too with
    ``MIGRATE_VMA_FAULT``), the walk, then :func:`migrate_hmm_range_setup`. Returns the
    walk's error (nothing left prepared then, ``cpages`` 0) or 0."""
    from .migrate_device import MIGRATE_VMA_FAULT
    from .pfn import HMM_PFN_REQ_FAULT
    r = HmmRange(notifier=None, start=m.start, end=m.end, hmm_pfns=m.src,
                 dev_private_owner=m.pgmap_owner, migrate=m)
    if m.flags & MIGRATE_VMA_FAULT:
        r.default_flags |= HMM_PFN_REQ_FAULT
    m.src[:nr] = 0
    ret = hmm_range_fault_migrate(r)
    if ret:
        m.src[:nr] = 0
        m.npages = nr
        m.cpages = 0
        return ret
    migrate_hmm_range_setup(r)
    return 0
