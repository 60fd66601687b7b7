"""The unified fault+migrate walk (``hmm/hmm_migrate.py``, profile ``hmm_migrate_on_fault``,
the "Migrate on fault for device pages" series on top of 7.3): flags and layout, the
fault path and the migrate path of ``hmm_range_fault()``, ``migrate_hmm_range_setup()``,
``migrate_vma_setup()`` rebuilt on the walk, test_hmm's MIGRATE_ON_FAULT_TO_DEV and the
series' selftest. Every System is checked for its invariants (and no lock held) after
each test (``make_system``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from hmmsim import Process, System
from hmmsim.drivers.test_hmm_uapi import (
    HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_SNAPSHOT,
    HmmDmirrorCmd,
)
from hmmsim.hmm.hmm import HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, hmm_range_fault
from hmmsim.hmm.hmm_migrate import (
    hmm_migrate_abort,
    hmm_select_migrate,
    migrate_hmm_range_setup,
)
from hmmsim.hmm.migrate_device import (
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_FAULT,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_pfn,
    migrate_vma_finalize,
    migrate_vma_pages,
    migrate_vma_setup,
)
from hmmsim.hmm.mirror import HmmMirror
from hmmsim.hmm.pfn import (
    HMM_PFN_COMPOUND,
    HMM_PFN_MIGRATE,
    HMM_PFN_REQ_MIGRATE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    decode_hmm_pfn,
    hmm_pfn_layout,
    hmm_pfn_to_map_order,
    hmm_pfn_to_pfn,
)
from hmmsim.kernel.errno import EBUSY, EFAULT, EINVAL, ERANGE
from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.mmu_notifier import (
    MmuNotifierEvent,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    notify_range,
)
from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.page_types import PMD_SIZE
from hmmsim.kernel.pagemap import folio_test_locked
from hmmsim.kernel.pgtable import (
    is_migration_entry,
    pmd_trans_huge,
    pte_present,
    pte_to_swp_entry,
)
from hmmsim.kernel.profile import KERNELS, get_profile, with_migrate_on_fault
from hmmsim.scenario.run import reference_config, run_scenario_text
from hmmsim.selftests.harness import run_test, select_tests

OWNER = object()
_BOTH = HMM_PFN_VALID | HMM_PFN_MIGRATE


@pytest.fixture
def msys(make_system) -> System:
    return make_system(kernel="7.3", migrate_on_fault=True)


@pytest.fixture
def mproc(msys: System) -> Process:
    return msys.spawn("test")


def OwnerMirror(mm: Any, owner: Any = OWNER, filtering: bool = True) -> HmmMirror:  # noqa: N802 - reads as a class
    """An interval-notifier mirror of device *owner*: :class:`HmmMirror` ignores
    ``MMU_NOTIFY_MIGRATE`` events of its own owner without ``mmu_interval_set_seq`` (as
    test_hmm does); with ``filtering=False`` (a mirror with no owner) they are
    invalidations like any other."""
    return HmmMirror(mm, owner=owner if filtering else None)


def fault_migrate(mirror: HmmMirror, start: int, npages: int, default_flags: int = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_MIGRATE,
                  mflags: int = 0, retries: int = 20) -> tuple[int, HmmRange]:
    """A driver's fault path: :meth:`HmmMirror.fault` (the retry loop) around the unified
    walk; a result whose sequence moved is undone before the next try."""
    m = MigrateVma(None, start, start + npages * P, OWNER, mflags)  # type: ignore[arg-type]
    r = HmmRange(notifier=mirror.notifier, start=start, end=start + npages * P,
                 hmm_pfns=np.zeros(npages, np.uint64), default_flags=default_flags,
                 dev_private_owner=OWNER, migrate=m)
    return mirror.fault(r, max_retries=retries), r


def finish_to_system(sys: System, r: HmmRange) -> MigrateVma:
    """Complete a prepared migration to fresh system pages (copying the data)."""
    m = r.migrate
    migrate_hmm_range_setup(r)
    for i in range(m.npages):
        s = int(m.src[i])
        if not s & MIGRATE_PFN_MIGRATE:
            continue
        new = sys.mem.alloc_page()
        assert new >= 0
        from hmmsim.kernel.pagemap import folio_lock
        folio_lock(sys, new)
        if s & MIGRATE_PFN_VALID:
            sys.mem.copy_pages(new, s >> 6)
        else:
            sys.mem.clear_pages(new)
        m.dst[i] = migrate_pfn(new)
    mmap_read_lock(m.vma.vm_mm)
    try:
        migrate_vma_pages(m)
        migrate_vma_finalize(m)
    finally:
        mmap_read_unlock(m.vma.vm_mm)
    return m


def ptes(proc: Process, a: int, n: int) -> list[int]:
    mm = proc.mm
    out = []
    for k in range(n):
        pmd = mm.pmd_ref(a + k * P)
        got = mm.pte_offset_map_lock(pmd) if pmd is not None else None
        if got is None:
            out.append(0)
            continue
        tbl, tid = got
        out.append(int(tbl[((a + k * P) >> 12) & 511]))
        mm.pte_unmap_unlock(tid)
    return out


def no_notifier_open(sys: System) -> bool:
    return all(v == 0 for v in sys.notifier_active.values())


# -- the option ------------------------------------------------------------------------------------
def test_profile_migrate_on_fault_is_an_option_on_7_3_only(make_system) -> None:
    for k in KERNELS:
        assert get_profile(k).hmm_migrate_on_fault is False
    s = make_system(kernel="7.3", migrate_on_fault=True)
    assert s.profile.hmm_migrate_on_fault and s.profile.hmm_pfn_order_shift == 51
    assert s.profile.name == "7.3" and s.profile.hmm_fault_outside_walk
    with pytest.raises(ValueError, match="7.3 only"):
        System(kernel="6.12", migrate_on_fault=True)
    with pytest.raises(ValueError, match="7.3 only"):
        with_migrate_on_fault(get_profile("6.12"))


def test_hmm_pfn_layout_of_the_series() -> None:
    """MIGRATE 57 and COMPOUND 56 push the order down to bit 51; 7.3 keeps bit 53."""
    on = hmm_pfn_layout(with_migrate_on_fault(get_profile("7.3")))
    off = hmm_pfn_layout(get_profile("7.3"))
    assert (on.order_shift, off.order_shift) == (51, 53)
    assert HMM_PFN_REQ_MIGRATE == HMM_PFN_MIGRATE == 1 << 57 and HMM_PFN_COMPOUND == 1 << 56
    v = HMM_PFN_VALID | HMM_PFN_MIGRATE | HMM_PFN_COMPOUND | on.order_flags(9) | 0x1234
    assert decode_hmm_pfn(v, on) == "VALID|MIGRATE|COMPOUND order=9 pfn=0x1234"
    assert hmm_pfn_to_map_order(v, on) == 9 and hmm_pfn_to_pfn(v, on) == 0x1234
    assert decode_hmm_pfn(HMM_PFN_MIGRATE, on) == "MIGRATE pfn=0x0"


def test_hmm_select_migrate() -> None:
    r = HmmRange(notifier=None, start=0, end=P, hmm_pfns=np.zeros(1, np.uint64))
    assert hmm_select_migrate(r) == 0
    r.default_flags = HMM_PFN_REQ_MIGRATE
    assert hmm_select_migrate(r) == MIGRATE_VMA_SELECT_SYSTEM
    r.migrate = MigrateVma(None, 0, P, OWNER, MIGRATE_VMA_SELECT_COMPOUND)  # type: ignore[arg-type]
    assert hmm_select_migrate(r) == MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND


def test_hmm_range_migrate_without_the_option_is_refused(proc: Process) -> None:
    mirror = HmmMirror(proc.mm)
    a = proc.mmap(2 * P)
    with pytest.raises(TypeError, match="migrate_on_fault"):
        fault_migrate(mirror, a, 2)
    mirror.remove()


# -- the fault path --------------------------------------------------------------------------------
def test_hmm_range_fault_migrate_faults_and_captures_in_one_walk(msys: System, mproc: Process) -> None:
    """Present pages, holes (faulted: read faults map the zero page, which becomes an
    empty entry) in one walk per fault; the captured pages hold migration entries, are
    locked, and the data moves with the migration."""
    mirror = OwnerMirror(mproc.mm)
    a = mproc.mmap(8 * P)
    data = bytes(range(256)) * (2 * P // 256)
    mproc.write(a, data)  # pages 0 and 1 written
    before = msys.stats["hmm.walk"]
    ret, r = fault_migrate(mirror, a, 8)
    assert ret == 0 and mirror.retries == 0
    assert msys.stats["hmm.walk"] - before == 2  # one walk, one re-walk after the fault of pages 2-7
    out = r.hmm_pfns
    assert [(int(v) & _BOTH) == _BOTH for v in out] == [True, True] + [False] * 6
    assert all(int(v) & (HMM_PFN_VALID | HMM_PFN_MIGRATE) == HMM_PFN_MIGRATE for v in out[2:])
    e = ptes(mproc, a, 8)
    assert all(not pte_present(x) and is_migration_entry(pte_to_swp_entry(x)) for x in e[:2])
    assert all(folio_test_locked(msys, hmm_pfn_to_pfn(int(v), r.layout)) for v in out[:2])
    assert r.migrate.vma is mproc.mm.vma_lookup(a) and (r.migrate.start, r.migrate.end) == (a, a + 8 * P)
    assert no_notifier_open(msys)
    m = finish_to_system(msys, r)
    assert m.cpages == 8
    assert mproc.read(a, 2 * P) == data
    assert mproc.read(a + 2 * P, 6 * P) == bytes(6 * P)
    mirror.remove()


def test_hmm_range_fault_migrate_empty_page_encoding(msys: System, mproc: Process) -> None:
    """Without REQ_FAULT: holes and the zero page of an anonymous VMA are "empty" entries
    (MIGRATE without VALID); a shared mapping's holes are left alone."""
    mirror = OwnerMirror(mproc.mm)
    a = mproc.mmap(4 * P)
    mproc.read(a + P, 1)  # page 1: the zero page
    mproc.write(a + 3 * P, b"z")
    ret, r = fault_migrate(mirror, a, 4, default_flags=HMM_PFN_REQ_MIGRATE)
    assert ret == 0
    out = [int(v) for v in r.hmm_pfns]
    assert out[:3] == [HMM_PFN_MIGRATE] * 3
    assert out[3] & _BOTH == _BOTH and out[3] & HMM_PFN_WRITE
    migrate_hmm_range_setup(r)
    m = r.migrate
    assert [int(x) for x in m.src[:3]] == [MIGRATE_PFN_MIGRATE] * 3
    assert int(m.src[3]) == migrate_pfn(hmm_pfn_to_pfn(out[3], r.layout)) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE
    assert m.cpages == 4 and m.npages == 4
    mmap_read_lock(mproc.mm)
    try:  # no destination: everything back
        migrate_vma_pages(m)
        migrate_vma_finalize(m)
    finally:
        mmap_read_unlock(mproc.mm)
    assert mproc.read(a + 3 * P, 1) == b"z"
    s = mproc.mmap(2 * P, shared=True)
    ret, r = fault_migrate(mirror, s, 2, default_flags=HMM_PFN_REQ_MIGRATE)
    assert ret == 0 and [int(v) for v in r.hmm_pfns] == [0, 0]
    mirror.remove()


def test_hmm_range_fault_migrate_second_vma_is_erange(msys: System, mproc: Process) -> None:
    """A range over two VMAs: -ERANGE when the walk reaches the second; the first VMA's
    captures are undone and the one MMU_NOTIFY_MIGRATE bracket is closed."""
    mirror = OwnerMirror(mproc.mm)
    a = mproc.mmap(4 * P)
    mproc.mprotect(a + 2 * P, 2 * P, "r")  # two VMAs
    mproc.write(a, b"ab" * P)
    mproc.touch(a + 2 * P, 2 * P)
    before = ptes(mproc, a, 4)
    ret, r = fault_migrate(mirror, a, 4)
    assert ret == -ERANGE
    assert ptes(mproc, a, 4) == before and not folio_test_locked(msys, before[0] >> 12 & ((1 << 40) - 1))
    assert msys.stats["hmm.migrate.erange"] == 1 and msys.stats["hmm.migrate.abort"] == 1
    assert msys.stats["hmm.migrate.notifier_bracket"] == 1 and no_notifier_open(msys)
    assert not (r.hmm_pfns & np.uint64(HMM_PFN_MIGRATE)).any()
    assert mproc.read(a, 2 * P) == b"ab" * P
    mirror.remove()


def test_own_migrate_events_are_filtered_others_bump_the_sequence(msys: System, mproc: Process) -> None:
    """The walk's own MMU_NOTIFY_MIGRATE (owner = dev_private_owner) must not force a
    re-walk; a notifier that does not filter it sees its sequence move on every try and
    the driver never gets a stable result; another owner's MIGRATE still sets the
    sequence of the filtering mirror."""
    a = mproc.mmap(4 * P)
    mproc.write(a, b"x" * (4 * P))
    good = OwnerMirror(mproc.mm)
    ret, r = fault_migrate(good, a, 4)
    assert ret == 0 and good.retries == 0
    assert [x[0] for x in good.invalidations] == ["MMU_NOTIFY_MIGRATE"]
    assert good.invalidations[0][3] is OWNER
    hmm_migrate_abort(msys, r)
    bad = OwnerMirror(mproc.mm, filtering=False)
    ret, r2 = fault_migrate(bad, a, 4, retries=5)
    assert ret == -EBUSY and bad.retries == 5 and msys.stats["hmm.migrate.abort"] >= 6
    assert all(not folio_test_locked(msys, p) for p in (hmm_pfn_to_pfn(int(v), r2.layout) for v in r2.hmm_pfns))
    seq = mmu_interval_read_begin(good.notifier)
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_MIGRATE, mproc.mm, a, a + P, owner=object()):
        pass
    assert mmu_interval_read_retry(good.notifier, seq)
    good.remove()
    bad.remove()
    assert no_notifier_open(msys)


def test_fault_path_ebusy_before_the_walk(msys: System, mproc: Process) -> None:
    """A sequence that moved before the call: -EBUSY before any capture, no bracket."""
    mirror = OwnerMirror(mproc.mm)
    a = mproc.mmap(2 * P)
    mproc.write(a, b"q")
    m = MigrateVma(None, a, a + 2 * P, OWNER, 0)  # type: ignore[arg-type]
    r = HmmRange(notifier=mirror.notifier, start=a, end=a + 2 * P, hmm_pfns=np.zeros(2, np.uint64),
                 default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_MIGRATE, dev_private_owner=OWNER, migrate=m)
    r.notifier_seq = mmu_interval_read_begin(mirror.notifier)
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mproc.mm, a + P, a + 2 * P):
        pass
    mmap_read_lock(mproc.mm)
    try:
        assert hmm_range_fault(r) == -EBUSY
    finally:
        mmap_read_unlock(mproc.mm)
    assert msys.stats["hmm.migrate.notifier_bracket"] == 0 and m.vma is None
    assert pte_present(ptes(mproc, a, 1)[0])
    mirror.remove()


def test_bracket_balanced_when_an_invalidation_mid_walk_forces_ebusy(msys: System, mproc: Process) -> None:
    """Pages 0-1 are captured, then page 2 (the zero page) needs a write fault: its COW
    is an MMU_NOTIFY_CLEAR that moves the sequence, so the call returns -EBUSY in the
    middle of the walk. The bracket is closed, pages 0-1 are mapped again and unlocked;
    the driver's retry then captures all four in one walk."""
    mirror = OwnerMirror(mproc.mm)
    a = mproc.mmap(4 * P)
    mproc.write(a, b"u" * (2 * P))
    mproc.touch(a + 2 * P, 2 * P)  # zero pages
    before = ptes(mproc, a, 2)
    m = MigrateVma(None, a, a + 4 * P, OWNER, 0)  # type: ignore[arg-type]
    r = HmmRange(notifier=mirror.notifier, start=a, end=a + 4 * P, hmm_pfns=np.zeros(4, np.uint64),
                 default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE | HMM_PFN_REQ_MIGRATE,
                 dev_private_owner=OWNER, migrate=m)
    r.notifier_seq = mmu_interval_read_begin(mirror.notifier)
    mmap_read_lock(mproc.mm)
    try:
        ret = hmm_range_fault(r)
    finally:
        mmap_read_unlock(mproc.mm)
    assert ret == -EBUSY
    ev = [(x[0], x[3] is OWNER) for x in mirror.invalidations]
    assert ev[0] == ("MMU_NOTIFY_MIGRATE", True) and set(ev[1:]) == {("MMU_NOTIFY_CLEAR", False)}  # COWs of pages 2-3
    assert msys.stats["hmm.migrate.notifier_bracket"] == 1 and no_notifier_open(msys)
    assert ptes(mproc, a, 2) == before and msys.stats["hmm.migrate.abort"] == 1
    assert not any(folio_test_locked(msys, p >> 12 & ((1 << 40) - 1)) for p in before)
    ret, r = fault_migrate(mirror, a, 4, default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE | HMM_PFN_REQ_MIGRATE)
    assert ret == 0 and all(int(v) & _BOTH == _BOTH for v in r.hmm_pfns)
    finish_to_system(msys, r)
    assert mproc.read(a, 2 * P) == b"u" * (2 * P) and mproc.read(a + 2 * P, 2 * P) == bytes(2 * P)
    mirror.remove()


def test_thp_is_split_and_the_walk_retried(make_system) -> None:
    """A PMD-mapped THP met without SELECT_COMPOUND (a 64-page range) is split, the walk
    restarts at the PMD and captures order-0 pages."""
    sys = make_system(kernel="7.3", migrate_on_fault=True, thp="always")
    proc = sys.spawn("t")
    a = proc.mmap(2 * PMD_SIZE)
    a = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    proc.write(a, b"t" * (64 * P))
    assert pmd_trans_huge(proc.mm.pmd_ref(a).get())
    mirror = OwnerMirror(proc.mm)
    ret, r = fault_migrate(mirror, a, 64)
    assert ret == 0, ret
    assert sys.stats["hmm.migrate.split_retry"] == 1
    lay = r.layout
    assert all(int(v) & _BOTH == _BOTH and hmm_pfn_to_map_order(int(v), lay) == 0 for v in r.hmm_pfns)
    finish_to_system(sys, r)
    assert proc.read(a, 64 * P) == b"t" * (64 * P)
    mirror.remove()


def test_thp_passes_whole_with_compound(make_system) -> None:
    """With SELECT_COMPOUND and a PMD-aligned range the THP is one COMPOUND entry (a PMD
    migration entry; the other 511 entries 0), converted to one compound src entry."""
    sys = make_system(kernel="7.3", migrate_on_fault=True, thp="always")
    proc = sys.spawn("t")
    a = proc.mmap(2 * PMD_SIZE)
    a = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    proc.write(a, b"c" * P)
    mirror = OwnerMirror(proc.mm)
    ret, r = fault_migrate(mirror, a, 512, mflags=MIGRATE_VMA_SELECT_COMPOUND)
    assert ret == 0 and sys.stats["hmm.migrate.split_retry"] == 0
    v0 = int(r.hmm_pfns[0])
    assert v0 & (_BOTH | HMM_PFN_COMPOUND) == _BOTH | HMM_PFN_COMPOUND
    assert not r.hmm_pfns[1:].any()
    migrate_hmm_range_setup(r)
    m = r.migrate
    assert int(m.src[0]) & (MIGRATE_PFN_COMPOUND | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_VALID) == \
        MIGRATE_PFN_COMPOUND | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_VALID
    assert m.cpages == 1 and not m.src[1:].any()
    mmap_read_lock(proc.mm)
    try:  # no destination: the THP is mapped again
        migrate_vma_pages(m)
        migrate_vma_finalize(m)
    finally:
        mmap_read_unlock(proc.mm)
    assert proc.read(a, P) == b"c" * P
    mirror.remove()


# -- the migrate path -------------------------------------------------------------------------------
def _setup(proc: Process, a: int, n: int, flags: int) -> tuple[int, MigrateVma]:
    m = MigrateVma(proc.mm.vma_lookup(a), a, a + n * P, OWNER, flags)
    mmap_read_lock(proc.mm)
    try:
        return migrate_vma_setup(m), m
    finally:
        mmap_read_unlock(proc.mm)


def test_migrate_vma_setup_on_the_walk_matches_the_collection(make_system) -> None:
    """migrate_vma_setup() rebuilt on hmm_range_fault() selects what the 7.3 collection
    selects (holes, the zero page, written pages, read-only pages), entry for entry."""
    res = []
    for on in (False, True):
        sys = make_system(kernel="7.3", migrate_on_fault=on)
        proc = sys.spawn("t")
        a = proc.mmap(8 * P)
        proc.write(a, b"w" * P)
        proc.read(a + P, 1)
        proc.write(a + 4 * P, b"v")
        proc.mprotect(a + 4 * P, P, "r")
        proc.mprotect(a + 4 * P, P, "rw")
        ret, m = _setup(proc, a, 8, MIGRATE_VMA_SELECT_SYSTEM)
        src = [int(x) & 0x3F for x in m.src]  # flags only: the pfns differ between machines
        res.append((ret, m.cpages, m.npages, src))
        mmap_read_lock(proc.mm)
        try:
            migrate_vma_pages(m)
            migrate_vma_finalize(m)
        finally:
            mmap_read_unlock(proc.mm)
        assert proc.read(a, P) == b"w" * P and proc.read(a + 4 * P, 1) == b"v"
    assert res[0] == res[1]


def test_migrate_vma_fault_faults_in_and_errors_tear_down(make_system) -> None:
    """MIGRATE_VMA_FAULT: migrate_vma_setup() faults holes in (the zero page: empty
    entries) in the same walk. When a fault fails (a page beyond the end of a file:
    SIGBUS), setup returns the walk's -EFAULT and nothing stays prepared."""
    sys = make_system(kernel="7.3", migrate_on_fault=True)
    proc = sys.spawn("t")
    a = proc.mmap(4 * P)
    proc.write(a, b"f")
    ret, m = _setup(proc, a, 4, MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_FAULT)
    assert ret == 0 and m.cpages == 4
    assert [int(x) for x in m.src[1:]] == [MIGRATE_PFN_MIGRATE] * 3
    assert all(pte_present(e) for e in ptes(proc, a + P, 3))  # faulted in: the zero page
    mmap_read_lock(proc.mm)
    try:
        migrate_vma_pages(m)
        migrate_vma_finalize(m)
    finally:
        mmap_read_unlock(proc.mm)
    fd = proc.open_tmpfile(2 * P)
    proc.pwrite(fd, b"F" * (2 * P), 0)
    f = proc.mmap(4 * P, "rw", fd=fd)  # pages 2-3 beyond EOF
    proc.touch(f, 2 * P)
    before = ptes(proc, f, 4)
    ret, m = _setup(proc, f, 4, MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_FAULT)
    assert ret == -EFAULT and m.cpages == 0 and not m.src.any()
    assert ptes(proc, f, 4) == before and sys.stats["hmm.migrate.abort"] == 1
    assert proc.read(f, 2) == b"FF"
    assert no_notifier_open(sys)


def test_req_migrate_without_migrate_struct_is_einval(msys: System, mproc: Process) -> None:
    """The migrate path needs ``range.migrate`` (the series dereferences it)."""
    from hmmsim.hmm.hmm_migrate import hmm_range_fault_migrate
    mirror = OwnerMirror(mproc.mm)
    a = mproc.mmap(P)
    r = HmmRange(notifier=mirror.notifier, start=a, end=a + P, hmm_pfns=np.zeros(1, np.uint64),
                 default_flags=HMM_PFN_REQ_MIGRATE)
    mmap_read_lock(mproc.mm)
    try:
        assert hmm_range_fault_migrate(r) == -EINVAL
    finally:
        mmap_read_unlock(mproc.mm)
    mirror.remove()


# -- dmirror, scenarios, the selftest ----------------------------------------------------------------
def test_dmirror_migrate_on_fault_to_dev_preserves_data(msys: System, mproc: Process) -> None:
    """Written, zero-page, read-only and never-touched pages over 100 pages (two chunks
    of 64 and 36): every page migrated, read back through the device as the CPU sees it,
    one walk per chunk plus one per fault; another device's mirror of the range is
    invalidated by the migration (not filtered: another owner)."""
    a = mproc.mmap(100 * P)
    data = np.arange(40 * P // 4, dtype=np.int32)
    mproc.write_array(a, data)
    mproc.touch(a + 40 * P, 20 * P)
    d0 = mproc.open_device(0)
    d1 = mproc.open_device(1)
    buf = mproc.mmap(100 * P)
    assert mproc.task.ioctl(d1.fd, HMM_DMIRROR_READ, HmmDmirrorCmd(addr=a, ptr=buf, npages=10)) == 0
    inv = msys.stats["dmirror.invalidate"]
    cmd = HmmDmirrorCmd(addr=a, ptr=buf, npages=100)
    assert mproc.task.ioctl(d0.fd, HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV, cmd) == 0
    assert cmd.cpages == 100
    assert msys.stats["dmirror.migrate_on_fault.chunk"] == 2
    assert msys.stats["dmirror.invalidate"] > inv  # device 1's mirror was invalidated
    got = mproc.read(buf, 100 * P)
    assert got[:40 * P] == data.tobytes() and got[40 * P:] == bytes(60 * P)
    snap = mproc.mmap(P)
    c = HmmDmirrorCmd(addr=a, ptr=snap, npages=100)
    assert mproc.task.ioctl(d0.fd, HMM_DMIRROR_SNAPSHOT, c) == 0
    assert set(mproc.read(snap, 100)) == {0x20 | 0x2}  # device-private local, writable
    assert mproc.read(a, 40 * P) == data.tobytes()  # the CPU faults them back


def _check(sys: System, cmd: Any) -> None:
    sys.check_invariants(full=True)
    sys.ls.assert_no_locks()


def test_dmigrate_on_fault_scenario_and_unknown_command_without_the_option() -> None:
    text = (b"hmmsim-scenario 1\nopen d 0\nmmap a 8 rw private,anon\nfill a 0 4 9\n"
            b"dmigrate_on_fault d a 0 8\ncheck a 0 4 9\n")
    off = run_scenario_text(text, reference_config("7.3"))
    assert off[3] == '{"line":5,"op":"dmigrate_on_fault","ret":-22}'
    on = run_scenario_text(text, reference_config("7.3", migrate_on_fault=True), after=_check)
    ref = run_scenario_text(text.replace(b"dmigrate_on_fault", b"dmigrate"), reference_config("7.3"))
    assert on[3] == ref[3].replace('"dmigrate"', '"dmigrate_on_fault"').replace('"cpages":4', '"cpages":8')
    assert '"cpages":8' in on[3] and on[4] == '{"line":6,"mismatch":0,"op":"check","ret":0}'


@pytest.mark.parametrize("name", ["device_migrate_private_basic", "device_migrate_sys_private",
                                  "device_double_map_two_devices"])
def test_golden_scenarios_print_the_same_with_the_option(name: str) -> None:
    """A quick subset of the comparison the docs describe (all 139 golden and recorded
    7.3 scenarios): the real 7.3 kernel's lines, with migrate_vma_setup() on the walk."""
    from pathlib import Path
    g = Path(__file__).parents[1] / "scenario" / "golden"
    got = run_scenario_text((g / f"{name}.hmm").read_bytes(), reference_config("7.3", migrate_on_fault=True),
                            after=_check)
    assert got == (g / "7.3" / f"{name}.jsonl").read_text().splitlines()


def test_selftest_migrate_on_fault_registered_only_with_the_option() -> None:
    assert not [t for t in select_tests(kernel="7.3") if t[1] == "migrate_on_fault"]
    sel = select_tests(["migrate_on_fault"], kernel="7.3", migrate_on_fault=True)
    assert len(sel) == 2  # device_private and device_coherent variants
    names = [t[1] for t in select_tests(kernel="7.3", migrate_on_fault=True)]
    assert names[names.index("migrate") + 1] == "migrate_on_fault"
    for fixture, name, fn, v in sel:
        r = run_test(fixture, name, fn, v, reference_config("7.3", migrate_on_fault=True))
        assert r.status == "pass", r.message


def test_protnone_pte_is_not_migrated_by_the_walk(make_system) -> None:
    """A known difference of the series: a NUMA-hinting protnone pte is not VALID in hmm's
    output, so the walk leaves it where 7.3's collection migrates it."""
    got = []
    for on in (False, True):
        sys = make_system(kernel="7.3", migrate_on_fault=on)
        proc = sys.spawn("t")
        a = proc.mmap(2 * P)
        proc.write(a, b"n" * (2 * P))
        proc.numa_hint(a, P)
        ret, m = _setup(proc, a, 2, MIGRATE_VMA_SELECT_SYSTEM)
        got.append((ret, m.cpages, [bool(int(x) & MIGRATE_PFN_MIGRATE) for x in m.src]))
        mmap_read_lock(proc.mm)
        try:
            migrate_vma_pages(m)
            migrate_vma_finalize(m)
        finally:
            mmap_read_unlock(proc.mm)
        assert proc.read(a, 2 * P) == b"n" * (2 * P)
    assert got == [(0, 2, [True, True]), (0, 1, [False, True])]


@pytest.mark.parametrize("at, aborts, ebusy", [
    (0, 0, 1),  # before the first walk: -EBUSY, nothing captured, no bracket
    (1, 1, 1),  # mid-walk (the re-read of the pte table): -EBUSY, captures undone
    (2, 1, 0),  # after the walk: the driver's sequence check drops the result
    (3, 1, 0),
])
def test_concurrent_zap_during_the_walk_keeps_the_bracket_balanced(msys: System, mproc: Process, at: int,
                                                                   aborts: int, ebusy: int) -> None:
    """A second thread zaps the last page of the range (MADV_DONTNEED: MMU_NOTIFY_CLEAR)
    at a scheduling point of the walk. Whether it lands before the walk, in the middle or
    before the driver's sequence check, the result is retried or correct: every call ends
    its MIGRATE bracket, a stale result's captures are undone, and the pages end up
    migrated with their data (the zapped page reads as zeroes)."""
    from hmmsim.kernel.sched import Interleave
    mirror = OwnerMirror(mproc.mm)
    a = mproc.mmap(8 * P)
    mproc.write(a, b"r" * (8 * P))
    race = Interleave(msys, lambda: mproc.madvise(a + 7 * P, P, "dontneed"), at=at, name="zapper")
    with race:
        ret, r = fault_migrate(mirror, a, 8)
    assert race.done and ret == 0
    assert no_notifier_open(msys)
    own = [x for x in mirror.invalidations if x[0] == "MMU_NOTIFY_MIGRATE" and x[3] is OWNER]
    assert len(own) == msys.stats["hmm.migrate.notifier_bracket"] >= 1
    # every try but the last was dropped (-EBUSY or stale) and undone
    assert msys.stats["hmm.migrate.range_fault"] - 1 == mirror.retries
    assert (msys.stats["hmm.migrate.abort"], msys.stats["hmm.range_fault.ebusy"]) == (aborts, ebusy)
    assert all(int(v) & _BOTH == _BOTH or int(v) & (HMM_PFN_VALID | HMM_PFN_MIGRATE) == HMM_PFN_MIGRATE
               for v in r.hmm_pfns)
    finish_to_system(msys, r)
    assert mproc.read(a, 7 * P) == b"r" * (7 * P) and mproc.read(a + 7 * P, P) == bytes(P)
    mirror.remove()


@pytest.mark.parametrize("name", ["migrate_fault", "migrate_anon_huge_fault", "migrate_anon_huge_zero"])
def test_selftests_give_the_same_results_with_and_without_the_option(name: str) -> None:
    """A quick subset of ``hmmsim selftest --kernel 7.3`` with and without the option (the
    full run: 77/78 and 79/80, the same real-kernel failure): the same status, variant by
    variant (each test asserts the data it migrated and faulted back)."""
    res = []
    for on in (False, True):
        sel = select_tests([name], kernel="7.3", migrate_on_fault=on)
        res.append([(f"{f}.{v.name}.{n}", run_test(f, n, fn, v, reference_config("7.3", migrate_on_fault=on)).status)
                    for f, n, fn, v in sel])
    assert res[0] == res[1] and {s for _n, s in res[0]} == {"pass"}


def test_cli_migrate_on_fault(tmp_path, capsys) -> None:
    """``--migrate-on-fault`` for ``run`` and ``selftest``; refused (usage) for 6.12."""
    from hmmsim.cli import main
    f = tmp_path / "m.hmm"
    f.write_text("hmmsim-scenario 1\nopen d 0\nmmap a 2 rw private,anon\nfill a 0 2 5\n"
                 "dmigrate_on_fault d a 0 2\n")
    assert main(["run", "--kernel", "7.3", "--migrate-on-fault", str(f)]) == 0
    assert '"op":"dmigrate_on_fault","ret":0' in capsys.readouterr().out
    assert main(["selftest", "--kernel", "6.12", "--migrate-on-fault", "-l"]) == 2
    assert main(["selftest", "--kernel", "7.3", "--migrate-on-fault", "-l"]) == 0
    assert "hmm.hmm_device_private.migrate_on_fault" in capsys.readouterr().out.split()
    with pytest.raises(SystemExit) as e:
        main(["run", "--kernel", "6.12", "--migrate-on-fault", str(f)])
    assert e.value.code == 2


def test_nothing_selected_is_a_plain_walk(msys: System, mproc: Process) -> None:
    """``hmm_select_migrate() == 0`` (migrate set, no SELECT_*, no REQ_MIGRATE): no
    capture, no bracket, no -ERANGE; the outputs are 7.3's."""
    mirror = OwnerMirror(mproc.mm)
    a = mproc.mmap(4 * P)
    mproc.mprotect(a + 2 * P, 2 * P, "r")
    mproc.write(a, b"p")
    ret, r = fault_migrate(mirror, a, 4, default_flags=0)
    assert ret == 0 and msys.stats["hmm.migrate.notifier_bracket"] == 0
    out = [int(v) for v in r.hmm_pfns]
    assert out[0] & (HMM_PFN_VALID | HMM_PFN_WRITE | HMM_PFN_MIGRATE) == HMM_PFN_VALID | HMM_PFN_WRITE
    assert out[1:] == [0, 0, 0]
    migrate_hmm_range_setup(r)
    assert r.migrate.cpages == 0 and pte_present(ptes(mproc, a, 1)[0])
    mirror.remove()


def _random_machine(make_system, on: bool, seed: int) -> tuple[System, Process, int, tuple[Any, Any]]:
    """A machine in a random but seed-determined state: 24 pages of written, zero-page,
    untouched, read-only, device-private (device 0) and forked-shared pages."""
    rng = np.random.default_rng(seed)
    sys = make_system(kernel="7.3", migrate_on_fault=on)
    proc = sys.spawn("t")
    a = proc.mmap(24 * P)
    dev = proc.open_device(0)
    for k in range(24):
        kind = int(rng.integers(0, 5))
        if kind == 1:
            proc.write(a + k * P, bytes([k + 1]) * 8)
        elif kind == 2:
            proc.read(a + k * P, 1)
        elif kind == 3:
            proc.write(a + k * P, bytes([k + 1]))
            proc.mprotect(a + k * P, P, "r")
    first = int(rng.integers(0, 20))
    proc.mprotect(a, 24 * P, "rw")
    dev.migrate(a + first * P, 4)
    child = proc.fork() if rng.integers(0, 2) else None
    owner = proc.task.fget(dev.fd).private_data.mdevice
    return sys, proc, a, (child, owner)


@pytest.mark.parametrize("seed", range(6))
def test_migrate_vma_setup_same_result_on_random_states(make_system, seed: int) -> None:
    """migrate_vma_setup() through the unified walk and through 7.3's collection, on two
    machines driven identically: the same return, cpages, src entries (pfns included),
    page tables after setup, and the same data after the migration back."""
    flags = [MIGRATE_VMA_SELECT_SYSTEM, MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND,
             MIGRATE_VMA_SELECT_DEVICE_PRIVATE][seed % 3]
    seen = []
    for on in (False, True):
        _sys, proc, a, (child, owner) = _random_machine(make_system, on, seed)
        m = MigrateVma(proc.mm.vma_lookup(a), a, a + 24 * P, owner, flags)
        mmap_read_lock(proc.mm)
        try:
            ret = migrate_vma_setup(m)
            after = ptes(proc, a, 24)
            migrate_vma_pages(m)
            migrate_vma_finalize(m)
        finally:
            mmap_read_unlock(proc.mm)
        seen.append((ret, m.cpages, [int(x) for x in m.src], after, proc.read(a, 24 * P)))
        if child is not None:
            child.exit()
    assert seen[0] == seen[1]


def test_abort_restores_a_compound_capture(make_system) -> None:
    """A THP captured whole (PMD migration entry) and then dropped by the driver
    (``hmm_migrate_abort``): the PMD maps the THP again, unlocked, data intact."""
    sys = make_system(kernel="7.3", migrate_on_fault=True, thp="always")
    proc = sys.spawn("t")
    a = proc.mmap(2 * PMD_SIZE)
    a = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    proc.write(a, b"k" * (2 * P))
    before = proc.mm.pmd_ref(a).get()
    assert pmd_trans_huge(before)
    mirror = OwnerMirror(proc.mm)
    ret, r = fault_migrate(mirror, a, 512, mflags=MIGRATE_VMA_SELECT_COMPOUND)
    assert ret == 0 and int(r.hmm_pfns[0]) & HMM_PFN_COMPOUND
    assert not pmd_trans_huge(proc.mm.pmd_ref(a).get())  # a PMD migration entry now
    hmm_migrate_abort(sys, r)
    assert proc.mm.pmd_ref(a).get() == before
    assert not folio_test_locked(sys, hmm_pfn_to_pfn(int(r.hmm_pfns[0]), r.layout))
    assert not (r.hmm_pfns & np.uint64(HMM_PFN_MIGRATE | HMM_PFN_COMPOUND)).any()
    assert proc.read(a, 2 * P) == b"k" * (2 * P)
    mirror.remove()


def test_unlocked_range_fault_refuses_range_migrate(msys: System, mproc: Process) -> None:
    """7.3's ``hmm_range_fault_unlocked_timeout()`` came after the series: combining it
    with ``range.migrate`` is refused, not guessed."""
    from hmmsim.hmm.hmm import hmm_range_fault_unlocked_timeout
    mirror = OwnerMirror(mproc.mm)
    a = mproc.mmap(P)
    r = HmmRange(notifier=mirror.notifier, start=a, end=a + P, hmm_pfns=np.zeros(1, np.uint64),
                 default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_MIGRATE,
                 migrate=MigrateVma(None, a, a + P, OWNER, 0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not modelled"):
        hmm_range_fault_unlocked_timeout(r, 0)
    mirror.remove()
