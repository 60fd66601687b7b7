"""The walk rules of :mod:`hmmsim.kernel.locking` (issue 8, "Locking rules as
assertions"): each fires on a deliberately broken variant of a walk step and names the
rule and the place; on the real code they stay quiet (the whole suite runs with them on).

* ``fault-under-pt-lock``: ``handle_mm_fault()``, ``handle_mm_fault_range()``,
  ``hmm_vma_fault()`` (6.12), ``hmm_do_fault()`` (7.3);
* ``pmd-lock-not-held``: ``set_pmd_migration_entry()`` (``migrate_vma_collect_huge_pmd``
  and ``try_to_migrate`` of a PMD-mapped THP rely on the PMD lock);
* ``walk-leaked-lock``: ``walk_page_range()``, ``hmm_range_fault()``,
  ``migrate_vma_setup()``, on an error return and on an exception;
* ``notifier-unbalanced``: a bracket left open by ``hmm_range_fault()`` (the RFC's -EBUSY
  hang) or ``migrate_vma_setup()``; an end without a start; ``check_invariants``.

Broken variants leave the machine inconsistent on purpose, so they run on a bare
``System`` (not the ``make_system`` fixture, which checks the machine after the test).
"""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim import System
from hmmsim.hmm import hmm as hmm_mod
from hmmsim.hmm import migrate_device as md
from hmmsim.hmm import migrate_device_huge as mdh
from hmmsim.hmm.hmm import HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_VALID
from hmmsim.hmm.migrate_device import (
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_vma_finalize,
    migrate_vma_setup,
)
from hmmsim.hmm.mirror import HmmMirror
from hmmsim.kernel import migrate as migrate_mod
from hmmsim.kernel.errno import EBUSY, EFAULT
from hmmsim.kernel.fault import handle_mm_fault
from hmmsim.kernel.fault_range import handle_mm_fault_range
from hmmsim.kernel.invariants import InvariantError, check_invariants
from hmmsim.kernel.locking import PT_LOCK_CLASSES, LockdepError
from hmmsim.kernel.mm import (
    mmap_read_lock,
    mmap_read_unlock,
    pmd_assert_locked,
    pmd_lock,
    pmd_lockptr,
    spin_unlock,
)
from hmmsim.kernel.mm_types import FAULT_FLAG_WRITE
from hmmsim.kernel.mmu_notifier import (
    MmuNotifierEvent,
    MmuNotifierRange,
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
)
from hmmsim.kernel.page_types import PAGE_SIZE, PMD_SIZE
from hmmsim.kernel.pagewalk import MmWalkOps, walk_page_range
from hmmsim.kernel.pgtable import pmd_leaf, pmd_present

P = PAGE_SIZE
SMALL = {"ram": 256 << 20, "hugetlb_pages": 0}


def _bare(kernel: str = "7.3", **kw) -> System:
    cfg = dict(SMALL)
    cfg.update(kw)
    return System(kernel=kernel, **cfg)


def _region(sys: System, npages: int = 64, touch: int = 0):
    """A process with an anonymous 4 KiB-page region of *npages*, its first *touch*
    pages written."""
    p = sys.spawn()
    a = p.mmap(npages * P)
    p.madvise(a, npages * P, "nohugepage")
    if touch:
        p.write(a, b"x" * (touch * P))
    return p, a


# -- fault-under-pt-lock -----------------------------------------------------------------------
@pytest.mark.parametrize("klass", PT_LOCK_CLASSES)
def test_handle_mm_fault_under_a_page_table_lock_fires(klass: str) -> None:
    """A fault taken with a pte-table lock, a PMD lock or mm->page_table_lock held."""
    sys = _bare()
    p, a = _region(sys, 8, touch=1)
    mm = p.mm
    pmd = mm.pmd_ref(a)
    vma = mm.find_vma(a)
    mmap_read_lock(mm)
    if klass == "ptl":
        got = mm.pte_offset_map_lock(pmd)
        assert got is not None
        release = lambda: mm.pte_unmap_unlock(got[1])
    elif klass == "pmd_lock":
        ptl = pmd_lock(mm, pmd)
        release = lambda: spin_unlock(mm, ptl)
    else:
        mm.page_table_lock.lock()
        release = mm.page_table_lock.unlock
    with pytest.raises(LockdepError, match=rf"fault-under-pt-lock: .* handle_mm_fault holding {klass}"):
        handle_mm_fault(vma, a + P, FAULT_FLAG_WRITE)
    with pytest.raises(LockdepError, match=r"fault-under-pt-lock: .* handle_mm_fault_range"):
        handle_mm_fault_range(vma, a + P, a + 4 * P, FAULT_FLAG_WRITE)
    release()
    # the same faults without the lock: resolved, and the rule is quiet
    assert handle_mm_fault(vma, a + P, FAULT_FLAG_WRITE) == 0
    assert handle_mm_fault_range(vma, a + 2 * P, a + 4 * P, FAULT_FLAG_WRITE) == (0, a + 4 * P)
    mmap_read_unlock(mm)
    assert p.read(a + 3 * P, 1) == b"\0"
    sys.ls.assert_no_locks()


def _walk_pmd_under_the_pte_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break hmm's pte step the way the unified walk's reviews feared: map the pte table
    *with* its lock (as the migrate-prepare step needs it) and go on to the fault path
    without dropping it."""
    real = hmm_mod.hmm_vma_handle_pte_table

    def locked_pte_table(walk, pmd, tbl, addr, end, pfns):
        got = walk.mm.pte_offset_map_lock(pmd)
        assert got is not None
        return real(walk, pmd, got[0], addr, end, pfns)  # the lock is never released

    monkeypatch.setattr(hmm_mod, "hmm_vma_handle_pte_table", locked_pte_table)


def test_hmm_vma_fault_inside_the_walk_under_the_pte_lock_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    """6.12 faults from inside the walk callback (``hmm_vma_fault``): under the pte lock
    that is a fault-under-pt-lock, named at ``hmm_vma_fault``."""
    sys = _bare("6.12")
    p, a = _region(sys, 16, touch=8)
    m = HmmMirror(p.mm)
    _walk_pmd_under_the_pte_lock(monkeypatch)
    with pytest.raises(LockdepError, match=r"fault-under-pt-lock: .* hmm_vma_fault holding ptl"):
        m.range_fault(a, a + 16 * P, default_flags=HMM_PFN_REQ_FAULT)


def test_hmm_walk_returning_with_the_pte_lock_fires_before_hmm_do_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    """7.3 records the fault and runs it after the walk: the same broken step now leaves
    the walk holding the lock, which the walk scope reports (before the fault runs)."""
    sys = _bare("7.3")
    p, a = _region(sys, 16, touch=8)
    m = HmmMirror(p.mm)
    _walk_pmd_under_the_pte_lock(monkeypatch)
    with pytest.raises(LockdepError, match=r"walk-leaked-lock: .* still holds 1 ptl lock .* in walk_page_range"):
        m.range_fault(a, a + 16 * P, default_flags=HMM_PFN_REQ_FAULT)


def test_hmm_do_fault_under_a_pmd_lock_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    """7.3's ``hmm_do_fault`` (after the walk) with a PMD lock taken between the walk and
    the fault."""
    sys = _bare("7.3")
    p, a = _region(sys, 16, touch=8)
    m = HmmMirror(p.mm)
    real = hmm_mod.hmm_do_fault

    def do_fault_locked(mm, hvw):
        pmd_lock(mm, mm.pmd_ref(a))
        return real(mm, hvw)

    monkeypatch.setattr(hmm_mod, "hmm_do_fault", do_fault_locked)
    with pytest.raises(LockdepError, match=r"fault-under-pt-lock: .* hmm_do_fault holding pmd_lock"):
        m.range_fault(a, a + 16 * P, default_flags=HMM_PFN_REQ_FAULT)


# -- pmd-lock-not-held -------------------------------------------------------------------------
def _thp(sys: System):
    p = sys.spawn()
    base = p.mmap(2 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.write(a, b"t" * PMD_SIZE)
    e = p.mm.pmd_ref(a).get()
    assert pmd_present(e) and pmd_leaf(e)
    return p, a


def test_migrate_vma_collect_huge_pmd_without_the_pmd_lock_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    """7.3 collects a whole THP by turning its PMD into a migration entry under the PMD
    lock; a variant that drops the lock before that step is caught there."""
    sys = _bare("7.3", thp="always")
    p, a = _thp(sys)
    real = mdh.set_pmd_migration_entry

    def unlocked_step(vma, pmd, haddr, head):
        spin_unlock(vma.vm_mm, pmd_lockptr(vma.vm_mm, pmd))
        return real(vma, pmd, haddr, head)

    monkeypatch.setattr(mdh, "set_pmd_migration_entry", unlocked_step)
    m = MigrateVma(p.mm.find_vma(a), a, a + PMD_SIZE, object(), MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND)
    mmap_read_lock(p.mm)
    with pytest.raises(LockdepError, match=r"pmd-lock-not-held: .* pmd_lock not held in set_pmd_migration_entry"):
        migrate_vma_setup(m)
    assert pmd_leaf(p.mm.pmd_ref(a).get()), "the assertion fired before the PMD changed"


def test_migrate_vma_collect_huge_pmd_with_the_pmd_lock_is_quiet(make_system) -> None:
    """The real step: one compound entry, the PMD a migration entry, restored by
    finalize; ``pmd_assert_locked`` holds inside and fails outside the lock."""
    sys = make_system(kernel="7.3", thp="always")
    p, a = _thp(sys)
    pmd = p.mm.pmd_ref(a)
    with pytest.raises(LockdepError, match="pmd-lock-not-held: .* in a test"):
        pmd_assert_locked(p.mm, pmd, "a test")
    ptl = pmd_lock(p.mm, pmd)
    pmd_assert_locked(p.mm, pmd, "a test")
    spin_unlock(p.mm, ptl)
    m = MigrateVma(p.mm.find_vma(a), a, a + PMD_SIZE, object(), MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND)
    mmap_read_lock(p.mm)
    assert migrate_vma_setup(m) == 0 and (m.npages, m.cpages) == (512, 1)
    assert sys.stats["migrate.set_pmd_migration_entry"] == 1
    migrate_vma_finalize(m)
    mmap_read_unlock(p.mm)
    assert p.read(a + PMD_SIZE - 1, 1) == b"t"


def test_try_to_migrate_of_a_pmd_mapped_thp_without_the_pmd_lock_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other caller of ``set_pmd_migration_entry`` (rmap's ``try_to_migrate``): a
    variant whose ``pmd_lock`` (and the matching unlock) does nothing."""
    sys = _bare("7.3", thp="always")
    p, a = _thp(sys)
    from hmmsim.kernel.mm import MM
    from hmmsim.kernel.pagemap import folio_lock
    from hmmsim.kernel.pgtable import pte_pfn
    head = pte_pfn(p.mm.pmd_ref(a).get())
    monkeypatch.setattr(MM, "pmd_lock", lambda self, pmd: pmd_lockptr(self, pmd))
    monkeypatch.setattr(MM, "spin_unlock", lambda self, ptl: None)
    folio_lock(sys, head)
    with pytest.raises(LockdepError, match=r"pmd-lock-not-held: .* in set_pmd_migration_entry"):
        migrate_mod.try_to_migrate(sys, head)


# -- walk-leaked-lock --------------------------------------------------------------------------
def test_walk_page_range_error_path_leaking_a_pmd_lock_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    """hmm's PMD step takes the PMD lock and returns -EFAULT without dropping it."""
    sys = _bare("7.3")
    p, a = _region(sys, 16, touch=16)
    m = HmmMirror(p.mm)

    def leaky_pmd(pmd, start, end, walk):
        pmd_lock(walk.mm, pmd)
        return -EFAULT

    monkeypatch.setattr(hmm_mod, "hmm_walk_ops", MmWalkOps(pmd_entry=leaky_pmd, pte_hole=hmm_mod.hmm_vma_walk_hole,
                                                            test_walk=hmm_mod.hmm_vma_walk_test))
    with pytest.raises(LockdepError, match=r"walk-leaked-lock: .* still holds 1 pmd_lock lock it did not hold "
                                           r"on entry in walk_page_range"):
        m.range_fault(a, a + 16 * P, default_flags=HMM_PFN_REQ_FAULT)


def test_walk_page_range_exception_leaking_a_lock_fires() -> None:
    """A callback that raises with the pte lock held: the scope reports the leak and
    chains the original exception."""
    sys = _bare("7.3")
    p, a = _region(sys, 16, touch=16)

    def raising_pmd(pmd, start, end, walk):
        walk.mm.pte_offset_map_lock(pmd)
        raise ValueError("a bug in the callback")

    mmap_read_lock(p.mm)
    with pytest.raises(LockdepError, match=r"walk-leaked-lock: .* ptl .* in walk_page_range \(leaving by "
                                           r"ValueError: a bug in the callback\)") as ei:
        walk_page_range(p.mm, a, a + 16 * P, MmWalkOps(pmd_entry=raising_pmd), None)
    assert isinstance(ei.value.__cause__, ValueError)


def test_walk_page_range_releasing_a_lock_of_its_caller_fires() -> None:
    """A callback that drops a lock its caller holds is reported; so is one that drops
    mmap_lock and takes it again (the counts are right, the order of the held locks is
    not: the walk ran without the lock it asserted)."""
    sys = _bare("7.3")
    p, a = _region(sys, 16, touch=16)
    extra = sys.spawn().mm.mmap_lock

    def drops_callers_lock(pmd, start, end, walk):
        extra.up_read()
        return 0

    def drops_and_retakes_mmap_lock(pmd, start, end, walk):
        mmap_read_unlock(walk.mm)
        mmap_read_lock(walk.mm)
        return 0

    mmap_read_lock(p.mm)
    extra.down_read()
    with pytest.raises(LockdepError, match=r"walk-leaked-lock: .* released 1 mmap_lock lock it held on entry "
                                           r"in walk_page_range"):
        walk_page_range(p.mm, a, a + 16 * P, MmWalkOps(pmd_entry=drops_callers_lock), None)
    extra.down_read()
    with pytest.raises(LockdepError, match=r"walk-leaked-lock: .* holds mmap_lock where it held another lock "
                                           r"on entry in walk_page_range"):
        walk_page_range(p.mm, a, a + 16 * P, MmWalkOps(pmd_entry=drops_and_retakes_mmap_lock), None)


def test_migrate_vma_setup_leaking_a_pte_lock_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    """``migrate_device_unmap`` (after the walk, inside ``migrate_vma_setup``) taking a
    pte lock it never drops; the folio locks it hands to the caller are allowed."""
    sys = _bare("7.3")
    p, a = _region(sys, 16, touch=16)
    real = md.migrate_device_unmap

    def leaky_unmap(sys_, src, npages, fault_page):
        p.mm.pte_offset_map_lock(p.mm.pmd_ref(a))
        return real(sys_, src, npages, fault_page)

    monkeypatch.setattr(md, "migrate_device_unmap", leaky_unmap)
    m = MigrateVma(p.mm.find_vma(a), a, a + 16 * P, object(), MIGRATE_VMA_SELECT_SYSTEM)
    mmap_read_lock(p.mm)
    with pytest.raises(LockdepError, match=r"walk-leaked-lock: .* still holds 1 ptl lock .* in migrate_vma_setup"):
        migrate_vma_setup(m)


def test_migrate_vma_setup_keeps_folio_locks_for_the_caller(make_system) -> None:
    """The real ``migrate_vma_setup``: 16 folio locks held on return (allowed), released
    by ``migrate_vma_finalize``; nothing else."""
    sys = make_system(kernel="7.3")
    p, a = _region(sys, 16, touch=16)
    m = MigrateVma(p.mm.find_vma(a), a, a + 16 * P, object(), MIGRATE_VMA_SELECT_SYSTEM)
    mmap_read_lock(p.mm)
    assert migrate_vma_setup(m) == 0 and m.cpages == 16
    assert sys.ls.current.nr_class == {"mmap_lock": 1, "folio_lock": 16}
    migrate_vma_finalize(m)
    mmap_read_unlock(p.mm)
    assert p.read(a, 1) == b"x"


# -- notifier-unbalanced -----------------------------------------------------------------------
def test_hmm_range_fault_leaving_a_bracket_open_on_ebusy_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RFC's hang: a walk that opened its MMU_NOTIFY_MIGRATE bracket and returned
    -EBUSY without closing it."""
    sys = _bare("7.3")
    p, a = _region(sys, 16, touch=16)
    m = HmmMirror(p.mm)

    def opens_and_busy(r, locked):
        mmu_notifier_invalidate_range_start(MmuNotifierRange(MmuNotifierEvent.MMU_NOTIFY_MIGRATE, 0, p.mm,
                                                             r.start, r.end, owner=None))
        return -EBUSY

    monkeypatch.setattr(hmm_mod, "hmm_range_fault_locked", opens_and_busy)
    with pytest.raises(LockdepError, match=r"notifier-unbalanced: \+1 open .* in hmm_range_fault"):
        m.range_fault(a, a + 16 * P, default_flags=HMM_PFN_REQ_FAULT)
    with pytest.raises(InvariantError, match="never ended"):
        check_invariants(sys)


def test_migrate_vma_setup_leaving_a_bracket_open_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    sys = _bare("7.3")
    p, a = _region(sys, 16, touch=16)
    real = md.migrate_vma_collect

    def collect_unbalanced(m):
        mmu_notifier_invalidate_range_start(MmuNotifierRange(MmuNotifierEvent.MMU_NOTIFY_MIGRATE, 0, p.mm,
                                                             m.start, m.end, owner=m.pgmap_owner))
        real(m)

    monkeypatch.setattr(md, "migrate_vma_collect", collect_unbalanced)
    m = MigrateVma(p.mm.find_vma(a), a, a + 16 * P, object(), MIGRATE_VMA_SELECT_SYSTEM)
    mmap_read_lock(p.mm)
    with pytest.raises(LockdepError, match=r"notifier-unbalanced: \+1 .* in migrate_vma_setup"):
        migrate_vma_setup(m)


def test_invalidate_range_end_without_a_start_fires_at_once(make_system) -> None:
    sys = make_system()
    p = sys.spawn()
    r = MmuNotifierRange(MmuNotifierEvent.MMU_NOTIFY_CLEAR, 0, p.mm, 0, P)
    with pytest.raises(LockdepError, match="without a matching start"):
        mmu_notifier_invalidate_range_end(r)
    mmu_notifier_invalidate_range_start(r)
    mmu_notifier_invalidate_range_end(r)
    assert sys.notifier_active[id(p.mm)] == 0


# -- quiet on the real code, and cheap ---------------------------------------------------------
@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_rules_are_quiet_on_fault_then_migrate(make_system, kernel: str) -> None:
    """hmm_range_fault faulting half a range in, then migrate_vma over all of it: every
    rule runs (4 walk scopes, 64 fault-entry checks through the batched path), none fires,
    and turning the scopes off changes no result."""
    results = []
    for checks in (True, False):
        sys = make_system(kernel=kernel)
        sys.ls.walk_checks = checks
        p, a = _region(sys, 64, touch=32)
        m = HmmMirror(p.mm)
        with sys.stats.measure() as d:
            ret, pfns = m.range_fault(a, a + 64 * P, default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
            mv = MigrateVma(p.mm.find_vma(a), a, a + 64 * P, object(), MIGRATE_VMA_SELECT_SYSTEM)
            mmap_read_lock(p.mm)
            assert migrate_vma_setup(mv) == 0
            migrate_vma_finalize(mv)
            mmap_read_unlock(p.mm)
        assert ret == 0 and bool(((pfns & np.uint64(HMM_PFN_VALID)) != 0).all())
        results.append((mv.cpages, d["walk_page_range"], d["fault.handle_mm_fault"]))
        m.remove()
        assert p.read(a, 1) == b"x" and p.read(a + 63 * P, 1) == b"\0"
    assert results[0] == results[1] and results[0][0] == 64


# -- the unified walk (--migrate-on-fault) -------------------------------------------------------
def _unified_range(sys: System, p, a: int, n: int):
    """An hmm_range for the unified walk's fault path over dmirror's notifier (which
    ignores the device's own MMU_NOTIFY_MIGRATE events, as the series requires)."""
    from hmmsim.hmm.hmm import HmmRange
    from hmmsim.hmm.pfn import HMM_PFN_REQ_MIGRATE
    dev = p.open_device(0)
    dm = p.task.fget(dev.fd).private_data
    m = MigrateVma(None, a, a + n * P, dm.mdevice, MIGRATE_VMA_SELECT_SYSTEM)
    r = HmmRange(notifier=dm.notifier, start=a, end=a + n * P, hmm_pfns=np.zeros(n, np.uint64),
                 default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE | HMM_PFN_REQ_MIGRATE,
                 dev_private_owner=dm.mdevice, migrate=m)
    return dev, r


def test_unified_walk_bracket_left_open_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RFC's hang in the unified walk itself: its MMU_NOTIFY_MIGRATE bracket, opened
    at the first capture, never ended (``mmu_notifier_invalidate_range_end`` skipped)."""
    from hmmsim.hmm import hmm_migrate
    from hmmsim.kernel.mmu_notifier import mmu_interval_read_begin
    sys = _bare("7.3", migrate_on_fault=True)
    p, a = _region(sys, 16, touch=8)
    _dev, r = _unified_range(sys, p, a, 16)
    monkeypatch.setattr(hmm_migrate, "mmu_notifier_invalidate_range_end", lambda rng: None)
    r.notifier_seq = mmu_interval_read_begin(r.notifier)
    mmap_read_lock(p.mm)
    with pytest.raises(LockdepError, match=r"notifier-unbalanced: \+1 .* in hmm_range_fault"):
        hmm_mod.hmm_range_fault(r)


def test_unified_walk_is_quiet_and_keeps_its_folio_locks(make_system) -> None:
    """The real unified walk: faults the 8 missing pages and prepares all 16 in one
    ``hmm_range_fault`` (its bracket closed, 16 folio locks handed over), then
    ``migrate_hmm_range_setup`` and ``migrate_vma_finalize`` with no destination put
    everything back."""
    from hmmsim.hmm.hmm_migrate import migrate_hmm_range_setup
    from hmmsim.kernel.mmu_notifier import mmu_interval_read_begin
    sys = make_system(kernel="7.3", migrate_on_fault=True)
    p, a = _region(sys, 16, touch=8)
    dev, r = _unified_range(sys, p, a, 16)
    r.notifier_seq = mmu_interval_read_begin(r.notifier)
    mmap_read_lock(p.mm)
    with sys.stats.measure() as d:
        assert hmm_mod.hmm_range_fault(r) == 0
    assert d["hmm.range_fault"] == 1 and d["walk_page_range"] - (d["hmm.walk"] - d["hmm.range_fault"]) == 1
    assert sys.ls.current.nr_class == {"mmap_lock": 1, "folio_lock": 16}
    assert sys.notifier_active[id(p.mm)] == 0
    migrate_hmm_range_setup(r)
    assert r.migrate.cpages == 16
    migrate_vma_finalize(r.migrate)
    mmap_read_unlock(p.mm)
    dev.close()
    assert p.read(a, 1) == b"x" and p.read(a + 15 * P, 1) == b"\0"
