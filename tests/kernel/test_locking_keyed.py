"""``kernel/locking.py`` keyed lock classes (``folio_lock``): owners in an array, batches
taken and released with ``acquire_keys``/``release_keys`` (``pagemap.folios_lock`` and
friends) with the same rules and counts as one :meth:`LockState.acquire` per lock."""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim import System
from hmmsim.kernel.locking import DeadlockError, Lock, LockdepError, Thread, WouldBlock
from hmmsim.kernel.pagemap import (
    folio_lock,
    folio_lockptr,
    folio_test_locked,
    folio_trylock,
    folio_unlock,
    folio_wait_locked,
    folios_lock,
    folios_trylock,
    folios_unlock,
)
from hmmsim.kernel.sched import Interleave


def test_folios_lock_counts_one_acquisition_per_folio(system: System) -> None:
    pfns = system.mem.alloc_pages_bulk(1000)
    before = system.stats["lock.folio_lock.write"]
    folios_lock(system, pfns)
    assert system.stats["lock.folio_lock.write"] - before == 1000
    assert system.ls.current.nr_class["folio_lock"] == 1000
    assert all(folio_test_locked(system, int(p)) for p in pfns[::97])
    assert system.ls.holders(folio_lockptr(system, int(pfns[5]))) == [system.ls.current]
    assert system.ls.current.holds(folio_lockptr(system, int(pfns[5])))
    assert len(system.ls.current.held_locks()) == 1000
    # a single unlock of a batch-taken lock, a batch unlock of the rest
    folio_unlock(system, int(pfns[0]))
    folios_unlock(system, pfns[1:])
    system.ls.assert_no_locks()
    assert not system.ls.current.nr_class
    assert not (system.mem.flags[pfns] & 1).any()
    system.mem.free_pages(pfns)


def test_folios_trylock_fails_for_held_and_repeated_keys(system: System) -> None:
    pfns = system.mem.alloc_pages_bulk(4)
    folio_lock(system, int(pfns[1]))
    before = system.stats["lock.folio_lock.write"]
    ok = folios_trylock(system, np.array([pfns[0], pfns[1], pfns[2], pfns[0], pfns[3]]))
    assert ok.tolist() == [True, False, True, False, True]
    assert system.stats["lock.folio_lock.write"] - before == 3
    assert not folio_trylock(system, int(pfns[2]))  # single trylock sees batch-taken locks
    folios_unlock(system, pfns)
    system.ls.assert_no_locks()
    system.mem.free_pages(pfns)


def test_folios_lock_changes_nothing_when_one_lock_is_held(system: System) -> None:
    """A blocking batch is all or nothing: recursive locking is a lockdep error, a lock
    held by another thread makes the batch wait (WouldBlock) before any lock is taken."""
    ls = system.ls
    pfns = system.mem.alloc_pages_bulk(3)
    other = Thread("other/7")
    with ls.as_thread(other):
        folio_lock(system, int(pfns[2]))
    before = system.stats["lock.folio_lock.write"]
    with pytest.raises(WouldBlock, match="held by other/7"):
        folios_lock(system, pfns)
    assert not folio_test_locked(system, int(pfns[0])) and not ls.current.nr_class
    assert system.stats["lock.folio_lock.write"] == before
    with ls.as_thread(other):
        folio_unlock(system, int(pfns[2]))
    folio_lock(system, int(pfns[1]))
    with pytest.raises(LockdepError, match="recursive locking of folio_lock"):
        folios_lock(system, pfns)
    with pytest.raises(LockdepError, match="recursive locking of folio_lock"):
        folios_lock(system, np.array([pfns[0], pfns[0]]))
    with pytest.raises(LockdepError, match="recursive locking of folio_lock"):
        folio_lock(system, int(pfns[1]))
    assert ls.current.nr_class["folio_lock"] == 1
    folio_unlock(system, int(pfns[1]))
    ls.assert_no_locks()
    system.mem.free_pages(pfns)


def test_folios_unlock_of_a_lock_not_held_releases_nothing(system: System) -> None:
    ls = system.ls
    pfns = system.mem.alloc_pages_bulk(3)
    folios_lock(system, pfns[:2])
    with pytest.raises(LockdepError, match="releasing folio_lock that it does not hold"):
        folios_unlock(system, pfns)
    with pytest.raises(LockdepError, match="releasing folio_lock that it does not hold"):
        folios_unlock(system, np.array([pfns[0], pfns[0]]))
    assert ls.current.nr_class["folio_lock"] == 2
    other = Thread("other/8")
    with ls.as_thread(other), pytest.raises(LockdepError, match="other/8: releasing folio_lock"):
        folio_unlock(system, int(pfns[0]))
    folios_unlock(system, pfns[:2])
    ls.assert_no_locks()
    system.mem.free_pages(pfns)


def test_keyed_locks_in_lockdep_reports(system: System) -> None:
    """Held batch locks are named by assert_no_locks, describe_held and might_sleep's
    rules; waiting on one with no other thread to release it is a deadlock."""
    ls = system.ls
    pfns = system.mem.alloc_pages_bulk(20)
    folios_lock(system, pfns)
    with pytest.raises(LockdepError, match=r"swapper/0:folio_lock.* and 4 more"):
        ls.assert_no_locks()
    assert ls.current.describe_held() == "folio_lock and 19 more"
    with pytest.raises(DeadlockError, match="holding folio_lock"):
        folio_wait_locked(system, int(pfns[3]))
    spin = Lock(ls, "test_spin", sleepable=False)
    spin.lock()
    with pytest.raises(LockdepError, match="sleeping .* while holding spinlock test_spin"):
        folios_lock(system, pfns[:1])
    spin.unlock()
    folios_unlock(system, pfns)
    ls.assert_no_locks()
    system.mem.free_pages(pfns)


def test_folios_lock_is_one_scheduling_point(system: System) -> None:
    """A blocking batch offers one scheduling point (a trylock batch none): another
    simulated thread runs there, before the locks are taken."""
    pfns = system.mem.alloc_pages_bulk(64)
    seen: list[bool] = []
    race = Interleave(system, lambda: seen.append(folio_test_locked(system, int(pfns[0]))),
                      at=0, name="peeker")
    with race:
        folios_lock(system, pfns)
    assert race.done and race.point == ("lock", "folio_lock") and seen == [False]
    folios_unlock(system, pfns)
    assert folios_trylock(system, pfns).all()
    folios_unlock(system, pfns)
    system.ls.assert_no_locks()
    system.mem.free_pages(pfns)


def test_a_batch_blocks_under_the_scheduler_until_the_held_folio_is_unlocked() -> None:
    """Under the scheduler a blocking batch whose folio another thread holds sleeps (the
    thread blocks on that folio lock) and takes the whole batch once it is released."""
    from hmmsim.kernel.sched import Scheduler

    sys = System(kernel="7.3")
    pfns = sys.mem.alloc_pages_bulk(8)
    order: list[str] = []

    def holder() -> None:
        folio_lock(sys, int(pfns[3]))
        order.append("holder locked")
        sys.ls.wait_event(lambda: len(order) >= 2, "the other thread to try")
        order.append("holder unlocks")
        folio_unlock(sys, int(pfns[3]))

    def batcher() -> None:
        order.append("batch tries")
        folios_lock(sys, pfns)
        order.append("batch locked")
        folios_unlock(sys, pfns)

    with Scheduler(sys) as s:
        s.spawn(holder, name="holder")
        s.spawn(batcher, name="batcher")
        s.run()
    assert order == ["holder locked", "batch tries", "holder unlocks", "batch locked"]
    assert ("batcher", "block", "folio_lock") in [(n, ev, w) for _s, n, ev, w in s.trace]
    sys.ls.assert_no_locks()
    sys.mem.free_pages(pfns)
