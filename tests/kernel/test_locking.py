"""``kernel/locking.py``: O(1) lock bookkeeping, lockdep's rules, the lock identities of
``mm.h``/``hugetlb.h``/``pagemap.h``, each task's own thread, and the page-table
accessors as counted scheduling points."""

from __future__ import annotations

import time

import pytest

from hmmsim import Process, System
from hmmsim.hmm.hmm import HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE
from hmmsim.hmm.mirror import HmmMirror
from hmmsim.kernel.hugetlb import hugetlb_vma_lock_read, hugetlb_vma_lockptr, hugetlb_vma_unlock_read
from hmmsim.kernel.locking import READ, DeadlockError, Lock, LockdepError, Thread, WouldBlock
from hmmsim.kernel.migrate import migrate_folio_move, migrate_folio_unmap
from hmmsim.kernel.mm import (
    huge_pte_lock, huge_pte_lockptr, mmap_read_lock, mmap_read_unlock, pmd_lock, pmd_lockptr,
    pte_lockptr, ptlock_ptr, spin_unlock,
)
from hmmsim.kernel.page_types import PAGE_SIZE, PMD_SIZE
from hmmsim.kernel.pagemap import folio_lock, folio_lockptr, folio_trylock, folio_unlock, folio_wait_locked
from hmmsim.kernel.pgtable import pte_pfn
from hmmsim.kernel.sched import Interleave

P = PAGE_SIZE


# -- O(1) bookkeeping ------------------------------------------------------------------------
def test_folio_lock_65536_held_at_once_is_fast(make_system) -> None:
    """Taking and releasing must not scan the held locks (it took 445 s with a list)."""
    sys = make_system(ram=512 << 20)
    pfns = sys.mem.alloc_pages_bulk(65_536).tolist()
    t0 = time.perf_counter()
    for pfn in pfns:
        folio_lock(sys, pfn)
    assert len(sys.ls.current.held_locks()) == sys.ls.current.nr_class["folio_lock"] == 65_536
    assert sys.stats["lock.folio_lock.write"] == 65_536
    sys.ls.might_sleep("still allowed: no spinlock among 65,536 sleeping locks")
    for pfn in reversed(pfns[::2]):  # out of order, from the middle
        folio_unlock(sys, pfn)
    for pfn in pfns[1::2]:
        folio_unlock(sys, pfn)
    elapsed = time.perf_counter() - t0
    sys.ls.assert_no_locks()
    assert not sys.ls.current.held and not sys.ls.current.nr_class
    assert elapsed < 5, f"65,536 folio locks took {elapsed:.1f} s"
    sys.mem.free_pages(pfns)


def test_might_sleep_counts_spinlocks(system: System) -> None:
    ls = system.ls
    spin = Lock(ls, "test_spin", sleepable=False)
    mutex = Lock(ls, "test_mutex")
    mutex.lock()
    spin.lock()
    assert ls.current.nr_spin == 1
    with pytest.raises(LockdepError, match="sleeping .* while holding spinlock test_spin"):
        mutex_2 = Lock(ls, "other_mutex")
        mutex_2.lock()
    spin.unlock()
    assert ls.current.nr_spin == 0
    ls.might_sleep("after the spinlock")
    mutex.unlock()


def test_lockdep_rules_recursion_release_and_class_checks(system: System) -> None:
    ls = system.ls
    rw = Lock(ls, "test_rwsem")
    rw.down_write()
    with pytest.raises(LockdepError, match="recursive locking of test_rwsem"):
        rw.down_read()
    ls.assert_none_held("ptl")
    with pytest.raises(LockdepError, match="test_rwsem held where it must not be"):
        ls.assert_none_held("test_rwsem")
    rw.up_write()
    with pytest.raises(LockdepError, match="releasing test_rwsem that it does not hold"):
        rw.up_read()
    # a recursive down_read completes, is a lockdep warning, and needs two up_read()s
    rw.down_read()
    rw.down_read()
    assert len(ls.warnings) == 1 and "possible recursive locking" in ls.warnings[0]
    rw.up_read()
    assert rw.is_locked()
    rw.up_read()
    assert not rw.is_locked() and not ls.current.nr_class


def test_lock_held_by_another_thread_would_block(system: System) -> None:
    ls = system.ls
    m = Lock(ls, "test_mutex")
    other = Thread("other/99")
    with ls.as_thread(other):
        m.lock()
    assert not m.trylock()
    with pytest.raises(WouldBlock, match="held by other/99"):
        m.lock()
    assert ls.holders(m) == [other]
    with ls.as_thread(other):
        m.unlock()


def test_assert_no_locks_names_holder_and_class(system: System) -> None:
    folio = system.mem.alloc_page()
    folio_lock(system, folio)
    with pytest.raises(LockdepError, match="swapper/0:folio_lock"):
        system.ls.assert_no_locks()
    with pytest.raises(DeadlockError, match="holding folio_lock"):
        folio_wait_locked(system, folio)
    folio_unlock(system, folio)
    system.mem.free_pages([folio])


# -- lock identities -------------------------------------------------------------------------
def test_lock_identities_are_named_by_lock_class(proc: Process) -> None:
    mm = proc.mm
    a = proc.mmap(PMD_SIZE)
    proc.write(a, b"x")
    pmd = mm.pmd_ref(a)
    tid = mm.pte_table(pmd)
    assert pte_lockptr(mm, pmd) == ptlock_ptr(tid) == ("ptl", tid)
    assert pmd_lockptr(mm, pmd) == huge_pte_lockptr(mm, pmd) == ("pmd_lock", pmd.tid)
    tbl, got = mm.pte_offset_map_lock(pmd)
    assert got == tid and proc.system.ls.is_locked(pte_lockptr(mm, pmd))
    mm.pte_unmap_unlock(tid)
    ptl = pmd_lock(mm, pmd)
    assert ptl == pmd_lockptr(mm, pmd) and proc.system.ls.holders(ptl) == [proc.system.ls.current]
    spin_unlock(mm, ptl)
    ptl = huge_pte_lock(mm, pmd)
    spin_unlock(mm, ptl)
    pfn = pte_pfn(mm.lookup_pte(a))
    assert folio_lockptr(proc.system, pfn) == ("folio_lock", pfn)
    assert folio_trylock(proc.system, pfn) and not folio_trylock(proc.system, pfn)
    folio_unlock(proc.system, pfn)


def test_hugetlb_vma_lock_read_and_unlock(make_system) -> None:
    p = make_system().spawn()
    a = p.mmap(PMD_SIZE, "rw", hugetlb=True)
    vma = p.mm.vma_lookup(a)
    ls = p.system.ls
    hugetlb_vma_lock_read(vma)
    assert ls.current.holds(hugetlb_vma_lockptr(vma), READ)
    assert hugetlb_vma_lockptr(vma)[0] == "hugetlb_vma_lock"
    hugetlb_vma_unlock_read(vma)
    with p.system.stats.measure() as d:
        p.write(a, b"h")  # hugetlb_fault() takes it for read
    assert d["lock.hugetlb_vma_lock.read"] == 1


# -- each task its own thread ----------------------------------------------------------------
class _Who:
    """Records which thread runs at each scheduling point."""

    def __init__(self, sys: System) -> None:
        self.sys = sys
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, ls, where: str, klass: str) -> None:
        self.seen.append((ls.current.name, where, klass))

    def __enter__(self) -> "_Who":
        self.sys.ls.add_hook(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.sys.ls.remove_hook(self)


def test_each_task_runs_its_syscalls_as_its_own_thread(system: System) -> None:
    p = system.spawn("prog")
    q = system.spawn("other")
    assert p.task.thread.name == f"prog/{p.pid}" and p.task.thread.task is p.task
    assert p.task.thread is not q.task.thread
    with _Who(system) as who:
        a = p.mmap(4 * P)
        p.write(a, b"p")
        b = q.mmap(4 * P)
        d = q.open_device(0)
        d.read(b, 1)
    names = {n for n, _w, _k in who.seen}
    assert names == {f"prog/{p.pid}", f"other/{q.pid}"}
    assert system.ls.current is system.ls.main, "back to the idle thread after each call"
    d.close()


def test_forked_child_has_its_own_thread(system: System) -> None:
    p = system.spawn("parent")
    a = p.mmap(P)
    p.write(a, b"a")
    with _Who(system) as who:
        c = p.fork()
        c.write(a, b"b")
        c.exit()
    assert c.task.thread is not p.task.thread and c.task.thread.name.endswith(f"/{c.pid}")
    by = {n for n, _w, _k in who.seen}
    assert by == {p.task.thread.name, c.task.thread.name}
    assert p.read(a, 1) == b"a"


def test_lock_messages_name_the_thread(proc: Process) -> None:
    with proc.task.running():
        mmap_read_lock(proc.mm)
    try:
        with pytest.raises(LockdepError, match=rf"^test/{proc.pid}: recursive locking of mmap_lock"):
            proc.mmap(P)
    finally:
        with proc.task.running():
            mmap_read_unlock(proc.mm)


# -- page-table accessors are scheduling points ----------------------------------------------
def test_pte_offset_map_counts_each_table_and_offers_a_scheduling_point(proc: Process) -> None:
    """hmm_range_fault's lockless walk of 4 pte tables: 4 maps, 4 points named
    ``pte_offset_map``, and a racer can run inside the walk."""
    a = proc.mmap(4 * PMD_SIZE)
    proc.madvise(a, 4 * PMD_SIZE, "nohugepage")
    for k in range(4):
        proc.write(a + k * PMD_SIZE, b"t")
    m = HmmMirror(proc.mm)
    sys = proc.system
    with sys.stats.measure() as d, _Who(sys) as who:
        ret, _ = m.range_fault(a, a + 4 * PMD_SIZE)
    assert ret == 0
    assert d["pgtable.pte_offset_map"] == 4
    assert [w for _n, w, _k in who.seen].count("pte_offset_map") == 4
    # a racer landing at the third table's pte_offset_map (a folio lock and a ptl: no
    # mmap_lock needed) starts a migration under the walk, which the mirror then retries
    victim = pte_pfn(proc.mm.lookup_pte(a + 3 * PMD_SIZE))
    race = Interleave(sys, lambda: migrate_folio_unmap(sys, victim), at=2, name="migrator",
                      where="pte_offset_map")
    with race:
        ret, pfns = m.range_fault(a, a + 4 * PMD_SIZE)
    assert race.done and race.point == ("pte_offset_map", "") and race.result is not None
    assert ret == 0 and int(pfns[3 * 512]) == 0, "the walk saw the migration entry"
    with sys.ls.as_thread(race.thread):
        migrate_folio_move(sys, race.result)
    assert proc.read(a + 3 * PMD_SIZE, 1) == b"t"
    m.remove()


def test_pte_offset_map_lock_and_set_pmd_are_named_points(make_system) -> None:
    p = make_system(thp="always").spawn()
    a = p.mmap(2 * PMD_SIZE)
    with p.system.stats.measure() as d, _Who(p.system) as who:
        p.write(a, b"z")  # a THP: set_pmd
    assert d["pgtable.set_pmd"] >= 1 and ("set_pmd" in {w for _n, w, _k in who.seen})
    p.madvise(a + PMD_SIZE, PMD_SIZE, "nohugepage")
    with p.system.stats.measure() as d, _Who(p.system) as who:
        p.write(a + PMD_SIZE, b"y")
    assert d["pgtable.pte_offset_map_lock"] >= 1
    assert ("pte_offset_map_lock", "ptl") in {(w, k) for _n, w, k in who.seen}
    assert not p.system.ls.has_hooks


def test_batched_fault_maps_each_table_once(proc: Process) -> None:
    """The batched fault of 3 pte tables counts 3 lockless maps (not 1, not 1,536)."""
    a = proc.mmap(3 * PMD_SIZE)
    proc.madvise(a, 3 * PMD_SIZE, "nohugepage")
    for k in range(3):
        proc.write(a + k * PMD_SIZE, b"f")  # create the tables
    # empty the tables half a table at a time: 7.3 frees a table that one MADV_DONTNEED
    # empties over its whole 2 MiB (madv_dontneed_frees_pte_tables)
    for k in range(6):
        proc.madvise(a + k * (PMD_SIZE // 2), PMD_SIZE // 2, "dontneed")
    m = HmmMirror(proc.mm)
    with proc.system.stats.measure() as d, _Who(proc.system) as who:
        ret, pfns = m.range_fault(a, a + 3 * PMD_SIZE, default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert ret == 0 and (pfns != 0).all()
    # the walk maps each table (twice: before and after the fault), the fault too
    assert d["pgtable.pte_offset_map_lock"] == 3
    assert d["pgtable.pte_offset_map"] == 3 * 2 + 3 + 3
    assert d["pgtable.set_pte"] == 3 * 512, "each pte written counts, in 3 batched writes"
    wheres = [w for _n, w, _k in who.seen]
    assert wheres.count("set_ptes") == 3 and wheres.count("pte_offset_map") == 3 * 2 + 3
    m.remove()


def test_interleave_racer_may_use_the_facade_of_the_process_it_interrupts(proc: Process) -> None:
    """The racer keeps its own thread (a second thread of the process) when it calls the
    facade of the process it interrupts, and runs at a scheduling point of the read."""
    a = proc.mmap(8 * P)
    proc.write(a, b"i" * 8 * P)
    d = proc.open_device(0)
    names: list[str] = []

    def unmap() -> None:
        proc.munmap(a + 4 * P, 4 * P)
        names.append(proc.system.ls.current.name)

    race = Interleave(proc.system, unmap, at=0, name="unmapper")
    with race:
        r = d.read(a, 4)
    assert race.done and race.point[0] != "end" and names == ["unmapper"]
    assert r.cpages == 4 and bytes(r.data[:1]) == b"i"
    assert proc.mm.vma_lookup(a + 4 * P) is None
    d.close()


def test_per_page_pte_writes_are_counted_scheduling_points(proc: Process) -> None:
    """The page-by-page paths write ptes through set_pte_at() too: a COW fault
    (wp_page_copy), a fork's copy of the tables and MADV_FREE each count their pte writes
    and offer a scheduling point, so a racer can land between them."""
    a = proc.mmap(4 * P)
    proc.write(a, b"x" * (4 * P))
    child = proc.fork()
    with proc.system.stats.measure() as d, _Who(proc.system) as who:
        proc.write(a, b"y")  # COW: the parent's pte now maps a new page
    assert d["pgtable.set_pte"] >= 1 and d["fault.do_wp_page"] == 1
    assert "set_ptes" in [w for _n, w, _k in who.seen]
    child.exit()  # the other pages are the parent's alone again: MADV_FREE cleans them
    with proc.system.stats.measure() as d, _Who(proc.system) as who:
        proc.madvise(a + P, 3 * P, "free")
    assert d["pgtable.set_pte"] == 3 and "set_ptes" in [w for _n, w, _k in who.seen]
