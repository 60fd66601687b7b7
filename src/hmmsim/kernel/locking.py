"""Locks of the simulated kernel and the rules lockdep would check.

Every lock in the model (``mmap_lock``, page-table locks, folio locks, ``i_mmap_rwsem``,
driver mutexes) is taken and released through this module, so that

* the locking rules can be asserted (``mmap_assert_locked``, ``lockdep_assert_held``,
  ``might_sleep`` under a spinlock, recursive locking, unlocking what is not held);
* every acquisition is counted in :class:`~hmmsim.kernel.stats.Stats` as
  ``lock.<class>.<mode>``;
* every acquisition is a *scheduling point*: hooks registered with
  :meth:`LockState.add_hook` run there, which is how another simulated thread's operation
  is interleaved deterministically (see :mod:`hmmsim.kernel.sched`).

Each task runs as its own :class:`Thread` (named ``comm/pid``, see
:meth:`hmmsim.kernel.task.Task.running`); code not entered through a task runs as
``LockState.main`` (``swapper/0``). The bookkeeping is O(1) per acquisition and release
however many locks a thread holds (a 1 GiB migration holds 262,144 folio locks).
Keyed locks are named once, by the kernel's accessor names: ``ptlock_ptr``/``pte_lockptr``,
``pmd_lockptr``/``pmd_lock``, ``huge_pte_lockptr`` (:mod:`hmmsim.kernel.mm`),
``hugetlb_vma_lockptr`` (:mod:`hmmsim.kernel.hugetlb`), ``folio_lockptr``
(:mod:`hmmsim.kernel.pagemap`); the first element of each identity is its lock class.

Lock classes keyed by a number (``folio_lock``, keyed by the head pfn: see
:data:`KEYED_LOCK_CLASSES`) keep their owners in a numpy array instead of the dict, so that
a migration can take or release the folio locks of a whole page table (or of a 1 GiB range)
in one call (:meth:`LockState.acquire_keys`, :meth:`LockState.release_keys`): each lock is
still one acquisition in the counters and in the holder's per-class count, and every
conflict (recursive locking, held by another thread) is found as for a single lock.

The model runs one simulated thread at a time. A lock that is held by another (suspended)
simulated thread cannot be taken: :class:`WouldBlock` is raised, which the interleaving
machinery turns into "try again at the next scheduling point", and which is a
:class:`DeadlockError` when no other thread could ever release the lock.

The walk rules (what reviewers of the unified fault+migrate walk asked to see asserted;
each a :class:`LockdepError` naming the rule and the place, each O(1) per call):

* ``fault-under-pt-lock``: no page-table lock (:data:`PT_LOCK_CLASSES`) is held when a
  fault is taken (:meth:`LockState.assert_no_pt_locks`, at ``handle_mm_fault()`` and the
  fault helpers hmm uses);
* ``pmd-lock-not-held``: the PMD lock is held where a walk step relies on it
  (:meth:`LockState.assert_held` with *where*; ``mm.pmd_assert_locked()``);
* ``walk-leaked-lock``: a walk (``walk_page_range()``, ``hmm_range_fault()``,
  ``migrate_vma_setup()``) leaves the held locks as it found them, on every return and
  every exception (:meth:`LockState.walk_scope`);
* ``notifier-unbalanced``: the scope of an hmm/migrate call (``hmm_range_fault()``,
  ``migrate_vma_setup()``; not of a single ``walk_page_range()``, since the unified walk's
  bracket spans its retries) finds as many open
  ``mmu_notifier_invalidate_range_start()`` brackets of the mm on exit as on entry (an
  ``end`` without a ``start`` fails at once in :mod:`hmmsim.kernel.mmu_notifier`, and
  ``check_invariants`` finds a bracket never closed).

They are always on: :attr:`LockState.walk_checks` = False turns the scope off (the
benchmarks measure its cost that way).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from .stats import Stats, declare_lock_class

__all__ = (
    "DeadlockError", "KEYED_LOCK_CLASSES", "Lock", "LockState", "LockdepError", "PT_LOCK_CLASSES",
    "READ", "Thread", "WRITE", "WalkScope", "WouldBlock",
)

READ = 1
WRITE = 2
_MODE_NAME = {READ: "read", WRITE: "write"}
#: lock classes whose identities are ``(klass, key)`` with an integer key (a pfn) and
#: whose owners are kept in an array indexed by key: exclusive (WRITE), sleeping locks
#: that bulk paths take by the thousand (``folio_lock``: ``PG_locked``, keyed by head pfn)
KEYED_LOCK_CLASSES = frozenset({"folio_lock"})
#: the page-table lock classes: split pte-table locks (``ptl``: ``pte_lockptr``), split
#: PMD locks (``pmd_lock``: ``pmd_lockptr``, also ``huge_pte_lockptr`` of 2 MiB hugetlb
#: pages) and ``mm->page_table_lock`` (the PUD lock); none may be held across a fault
PT_LOCK_CLASSES = ("ptl", "pmd_lock", "page_table_lock")


def _distinct(keys: npt.NDArray[np.int64]) -> bool:
    """No key repeats (cheap when the keys are increasing, as batches mostly are)."""
    if len(keys) < 2 or bool((keys[1:] > keys[:-1]).all()):
        return True
    s = np.sort(keys)
    return bool((s[1:] != s[:-1]).all())


class LockdepError(AssertionError):
    """A locking rule was broken (what lockdep would report as a splat)."""


class WouldBlock(Exception):
    """The lock is held by another simulated thread; the caller would sleep or spin."""

    def __init__(self, ident: Hashable, klass: str, holders: list["Thread"]) -> None:
        super().__init__(f"{klass} is held by {', '.join(t.name for t in holders)}")
        self.ident = ident
        self.klass = klass
        self.holders = holders


class DeadlockError(LockdepError):
    """Waiting for something no simulated thread can ever release."""


class Thread:
    """A simulated thread of execution (``struct task_struct`` as lockdep sees it): its
    name (``comm/pid``) and the locks it holds.

    The bookkeeping is O(1) per acquisition and release however many locks are held (a
    migration holds one folio lock per page): ``held`` maps each lock to its record in
    acquisition order (dicts keep insertion order), ``nr_spin`` counts the held locks
    that forbid sleeping and ``nr_class`` the held locks per lock class."""

    __slots__ = ("name", "held", "nr_spin", "nr_class", "task", "slot", "keyed")

    def __init__(self, name: str, task: Any = None) -> None:
        self.name = name
        #: ident -> [klass, mode, sleepable, depth] in acquisition order (depth > 1 only
        #: for a recursive down_read())
        self.held: dict[Hashable, list[Any]] = {}
        #: held locks that are spinlocks (``might_sleep`` must not be called)
        self.nr_spin = 0
        #: lock class -> how many locks of that class are held
        self.nr_class: dict[str, int] = {}
        #: the simulated task this thread runs (None for helper threads)
        self.task = task
        #: this thread's number in the owner arrays of keyed lock classes (0: none yet)
        self.slot = 0
        #: keyed lock class -> its owner array (shared with the LockState), for the
        #: classes of which this thread ever held a lock
        self.keyed: dict[str, npt.NDArray[np.int32]] = {}

    def holds(self, ident: Hashable, mode: int | None = None) -> bool:
        h = self.held.get(ident)
        if h is None:
            arr = self.keyed.get(ident[0]) if type(ident) is tuple else None  # noqa: E721
            return (arr is not None and 0 <= ident[1] < len(arr) and int(arr[ident[1]]) == self.slot
                    and mode in (None, WRITE))
        return mode is None or h[1] == mode

    def _keyed_held(self) -> list[tuple[Hashable, str, int]]:
        return [((k, int(key)), k, WRITE) for k, arr in self.keyed.items()
                if self.nr_class.get(k) for key in np.flatnonzero(arr == self.slot)]

    def held_locks(self) -> list[tuple[Hashable, str, int]]:
        """``lockdep_print_held_locks()``: (ident, class, mode) in acquisition order (the
        locks of keyed classes after the others, by key)."""
        return [(i, h[0], h[1]) for i, h in self.held.items()] + self._keyed_held()

    def describe_held(self, limit: int = 8) -> str:
        """The held locks for a message: ``mmap_lock(read), ptl`` (the first *limit*)."""
        items = [f"{h[0]}({_MODE_NAME[h[1]]})" if h[2] else h[0]
                 for _i, h in zip(range(limit), self.held.values())]
        total = len(self.held)
        for k in self.keyed:
            n = self.nr_class.get(k, 0)
            if n:
                total += n
                if len(items) < limit:
                    items.append(k)
        more = total - len(items)
        return ", ".join(items) + (f" and {more} more" if more > 0 else "") if items else "no locks"

    def __repr__(self) -> str:
        return f"Thread({self.name!r})"


Hook = Callable[["LockState", str, str], None]


class LockState:
    """All lock state of one simulated machine and the currently running thread."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        #: the thread of kernel code not entered through a task (tests, boot, helpers)
        self.main = Thread("swapper/0")
        self.current = self.main
        # ident -> [klass, mode, {thread: depth}]
        self._owners: dict[Hashable, list[Any]] = {}
        self._hooks: list[Hook] = []
        self._stat_keys: dict[tuple[str, int], str] = {}
        #: lockdep reports that did not stop the kernel (``WARNING: ...`` in dmesg), in order
        self.warnings: list[str] = []
        #: the :class:`~hmmsim.kernel.sched.Scheduler` running simulated threads, if any:
        #: a contended lock or a wait then blocks the current thread instead of failing
        self.scheduler: Any = None
        # keyed lock classes: klass -> owner slot per key (0: free); slot -> thread
        self._keyed: dict[str, npt.NDArray[np.int32]] = {}
        self._slots: list[Thread | None] = [None]
        #: whether :meth:`walk_scope` checks anything (the other walk rules always run)
        self.walk_checks = True

    # -- scheduling points -------------------------------------------------------------
    def add_hook(self, hook: Hook) -> None:
        """Run *hook(state, where, klass)* at every scheduling point from now on."""
        self._hooks.append(hook)

    def remove_hook(self, hook: Hook) -> None:
        self._hooks.remove(hook)

    @property
    def has_hooks(self) -> bool:
        """Whether anything runs at scheduling points (batched paths may skip offering
        them one by one when nothing listens)."""
        return bool(self._hooks)

    def schedule_point(self, where: str, klass: str = "") -> None:
        """A point where another simulated thread could run: every lock acquisition
        (*where* ``"lock"``), every wait round (``"wait"``), and the page-table accessors
        (*where* names the accessor: ``"pte_offset_map"``, ``"set_pte"``, ...)."""
        if self._hooks:
            for hook in list(self._hooks):
                hook(self, where, klass)

    @contextmanager
    def as_thread(self, thread: Thread) -> Iterator[Thread]:
        """Run the block as *thread*; the locks it takes are that thread's."""
        prev = self.current
        self.current = thread
        try:
            yield thread
        finally:
            self.current = prev

    def wait_event(self, cond: Callable[[], bool], what: str) -> None:
        """``wait_event()``: sleep until *cond* holds, letting other simulated threads run.

        Each round is a scheduling point; if no hook is registered (so no other thread
        could ever make *cond* true) this is a :class:`DeadlockError`."""
        self.might_sleep(what)
        sch = self.scheduler
        if sch is not None and sch.current() is not None:
            sch.block_until(cond, what)
            return
        for _ in range(100_000):
            if cond():
                return
            if not self._hooks:
                raise DeadlockError(f"{self.current.name} would wait forever for {what} "
                                    f"(holding {self.current.describe_held()})")
            self.schedule_point("wait", what)
        raise DeadlockError(f"{self.current.name} waited too long for {what}")

    # -- acquire / release -------------------------------------------------------------
    def acquire(self, ident: Hashable, klass: str, mode: int = WRITE, sleepable: bool = True,
                trylock: bool = False, where: str = "lock") -> bool:
        """Take lock *ident* (of lock class *klass*) in *mode*; False if a trylock fails.

        A blocking acquisition is a scheduling point named *where* (``"lock"``, or the
        accessor that takes the lock, e.g. ``"pte_offset_map_lock"``)."""
        if not trylock:
            if self._hooks:
                self.schedule_point(where, klass)
            if sleepable and self.current.nr_spin:
                self.might_sleep(klass)
        t = self.current
        if type(ident) is tuple and ident[0] in KEYED_LOCK_CLASSES:  # noqa: E721
            return self._acquire_keyed(t, ident, klass, mode, sleepable, trylock)
        st = self._owners.get(ident)
        if st is not None:
            holders = st[2]
            if t in holders:
                if trylock:
                    return False
                if not (mode == READ and st[1] == READ and sleepable):
                    raise LockdepError(f"{t.name}: recursive locking of {klass} ({_MODE_NAME[mode]}), "
                                       f"already held {_MODE_NAME[st[1]]}")
                # A second down_read() of an rwsem this thread already holds for read
                # succeeds in the kernel (no writer is queued in a one-at-a-time model),
                # but lockdep reports it: it deadlocks once a writer queues in between.
                self.lockdep_warn(f"possible recursive locking detected: {t.name} is trying "
                                  f"to acquire {klass} (read) but already holds it (read)")
                holders[t] += 1
                t.held[ident][3] += 1
                self._count(klass, mode)
                return True
            if mode == WRITE or st[1] == WRITE:
                if trylock:
                    return False
                sch = self.scheduler
                if sch is not None and sch.current() is not None:
                    # sleep until the lock is free (or only read-held, for a reader)
                    owners = self._owners
                    sch.block_until(lambda: ident not in owners or (mode == READ and owners[ident][1] == READ),
                                    klass, lock=ident)
                    return self.acquire(ident, klass, mode, sleepable, trylock, where)
                raise WouldBlock(ident, klass, list(holders))
            holders[t] = 1
        else:
            self._owners[ident] = [klass, mode, {t: 1}]
        t.held[ident] = [klass, mode, sleepable, 1]
        if not sleepable:
            t.nr_spin += 1
        nc = t.nr_class
        nc[klass] = nc.get(klass, 0) + 1
        self._count(klass, mode)
        return True

    def _count(self, klass: str, mode: int, n: int = 1) -> None:
        key = self._stat_keys.get((klass, mode))
        if key is None:
            key = self._stat_keys[(klass, mode)] = f"lock.{klass}.{_MODE_NAME[mode]}"
        self.stats.add(key, n)

    # -- keyed lock classes -------------------------------------------------------------
    def _slot_of(self, t: Thread) -> int:
        if not t.slot:
            t.slot = len(self._slots)
            self._slots.append(t)
        return t.slot

    def _keyed_array(self, klass: str, size: int) -> npt.NDArray[np.int32]:
        """The owner array of *klass*, grown to at least *size* keys."""
        arr = self._keyed.get(klass)
        if arr is None or len(arr) < size:
            new = np.zeros(max(size, 2 * len(arr) if arr is not None else 1 << 16), np.int32)
            if arr is not None:
                new[:len(arr)] = arr
            arr = self._keyed[klass] = new
            for th in self._slots:
                if th is not None and klass in th.keyed:
                    th.keyed[klass] = arr
        return arr

    def _keyed_take(self, t: Thread, klass: str, arr: npt.NDArray[np.int32], keys: Any, n: int,
                    mode: int) -> None:
        arr[keys] = t.slot
        t.keyed[klass] = arr
        nc = t.nr_class
        nc[klass] = nc.get(klass, 0) + n
        self._count(klass, mode, n)

    def _acquire_keyed(self, t: Thread, ident: tuple[str, int], klass: str, mode: int,
                       sleepable: bool, trylock: bool) -> bool:
        if mode != WRITE or not sleepable:
            raise LockdepError(f"{klass}: keyed lock classes are sleeping exclusive locks")
        key = int(ident[1])
        arr = self._keyed_array(klass, key + 1)
        owner = int(arr[key])
        if owner:
            if trylock:
                return False
            if owner == t.slot:
                raise LockdepError(f"{t.name}: recursive locking of {klass} (write), already held write")
            sch = self.scheduler
            if sch is not None and sch.current() is not None:
                # sleep until the holder unlocks it (folio_lock() of a locked folio)
                sch.block_until(lambda: not self.is_locked(ident), klass, lock=ident)
                return self._acquire_keyed(t, ident, klass, mode, sleepable, trylock)
            th = self._slots[owner]
            raise WouldBlock(ident, klass, [th] if th is not None else [])
        self._slot_of(t)
        self._keyed_take(t, klass, arr, key, 1, mode)
        return True

    def acquire_keys(self, klass: str, keys: npt.NDArray[np.int64], trylock: bool = False,
                     where: str = "lock") -> npt.NDArray[np.bool_]:
        """Take the locks ``(klass, key)`` of every key of *keys* (a keyed class,
        :data:`KEYED_LOCK_CLASSES`) for write, as the same number of :meth:`acquire`
        calls in that order would: counted one acquisition each, a trylock fails for a
        key locked by anyone (also by an earlier occurrence in *keys*). A blocking
        acquisition is one scheduling point for the batch and changes nothing if one of
        the locks is held: recursive locking is a :class:`LockdepError`, a lock held by
        another thread raises :class:`WouldBlock`. Returns which keys were locked."""
        keys = np.asarray(keys, np.int64)
        n = len(keys)
        if n == 0:
            return np.zeros(0, np.bool_)
        if klass not in KEYED_LOCK_CLASSES:
            raise LockdepError(f"{klass} is not a keyed lock class")
        t = self.current
        if not trylock:
            if self._hooks:
                self.schedule_point(where, klass)
            if t.nr_spin:
                self.might_sleep(klass)
        arr = self._keyed_array(klass, int(keys.max()) + 1)
        owners = arr[keys]
        ok = owners == 0
        if n > 1 and ok.any() and not _distinct(keys):
            # a key given twice: only its first occurrence can succeed
            first = np.zeros(n, np.bool_)
            first[np.unique(keys, return_index=True)[1]] = True
            dup = ok & ~first
            if dup.any():
                if not trylock:
                    raise LockdepError(f"{t.name}: recursive locking of {klass} (write), already held write")
                ok &= first
        if not trylock and not ok.all():
            bad = int(owners[~ok][0]) if (owners != 0).any() else t.slot
            if bad == t.slot:
                raise LockdepError(f"{t.name}: recursive locking of {klass} (write), already held write")
            ident = (klass, int(keys[~ok][0]))
            sch = self.scheduler
            if sch is not None and sch.current() is not None:
                # sleep until that lock is free, then try the whole batch again
                sch.block_until(lambda: not self.is_locked(ident), klass, lock=ident)
                return self.acquire_keys(klass, keys, trylock, where)
            th = self._slots[bad]
            raise WouldBlock(ident, klass, [th] if th is not None else [])
        got = int(ok.sum())
        if got:
            self._slot_of(t)
            self._keyed_take(t, klass, arr, keys[ok] if got < n else keys, got, WRITE)
        return ok

    def release_keys(self, klass: str, keys: npt.NDArray[np.int64]) -> None:
        """Release the locks ``(klass, key)`` of every key of *keys*, all held by the
        current thread (else a :class:`LockdepError` before anything is released)."""
        keys = np.asarray(keys, np.int64)
        if len(keys) == 0:
            return
        t = self.current
        arr = self._keyed.get(klass)
        if arr is None or int(keys.max()) >= len(arr) or not t.slot or not (arr[keys] == t.slot).all() \
                or not _distinct(keys):
            raise LockdepError(f"{t.name}: releasing {klass} that it does not hold")
        arr[keys] = 0
        self._keyed_put(t, klass, len(keys))

    def _keyed_put(self, t: Thread, klass: str, n: int) -> None:
        nc = t.nr_class
        c = nc[klass] - n
        if c:
            nc[klass] = c
        else:
            del nc[klass]

    def count_acquisitions(self, klass: str, n: int, mode: int = WRITE) -> None:
        """Count *n* more acquisitions of a lock of *klass* that a batch took once for
        what a loop takes *n* more times (the counters keep the loop's totals)."""
        if n > 0:
            self._count(klass, mode, n)

    def release(self, ident: Hashable, klass: str) -> None:
        """Release lock *ident* held by the current thread."""
        t = self.current
        if type(ident) is tuple and ident[0] in KEYED_LOCK_CLASSES:  # noqa: E721
            arr = self._keyed.get(ident[0])
            key = int(ident[1])
            if arr is None or key >= len(arr) or not t.slot or int(arr[key]) != t.slot:
                raise LockdepError(f"{t.name}: releasing {klass} that it does not hold")
            arr[key] = 0
            self._keyed_put(t, klass, 1)
            return
        st = self._owners.get(ident)
        holders = st[2] if st is not None else None
        if holders is None or t not in holders:
            raise LockdepError(f"{t.name}: releasing {klass} that it does not hold")
        n = holders[t] - 1
        h = t.held[ident]
        if n:
            holders[t] = n
            h[3] -= 1
            return
        del holders[t]
        if not holders:
            del self._owners[ident]
        del t.held[ident]
        if not h[2]:
            t.nr_spin -= 1
        nc = t.nr_class
        c = nc[h[0]] - 1
        if c:
            nc[h[0]] = c
        else:
            del nc[h[0]]

    def _keyed_owner(self, ident: Hashable) -> int:
        if type(ident) is not tuple or ident[0] not in self._keyed:  # noqa: E721
            return 0
        arr = self._keyed[ident[0]]
        return int(arr[ident[1]]) if 0 <= ident[1] < len(arr) else 0

    def is_locked(self, ident: Hashable) -> bool:
        return ident in self._owners or self._keyed_owner(ident) != 0

    def holders(self, ident: Hashable) -> list[Thread]:
        st = self._owners.get(ident)
        if st:
            return list(st[2])
        owner = self._keyed_owner(ident)
        th = self._slots[owner] if owner else None
        return [th] if th is not None else []

    # -- assertions ---------------------------------------------------------------------
    def lockdep_warn(self, message: str) -> None:
        """Record a lockdep report that the kernel prints and survives (once per message,
        like lockdep, which reports a dependency chain only the first time)."""
        if message not in self.warnings:
            self.warnings.append(message)
            self.stats.add("lockdep.warning")

    def assert_held(self, ident: Hashable, klass: str, mode: int | None = None, where: str = "",
                    rule: str = "") -> None:
        """``lockdep_assert_held``: the current thread holds *ident* (in *mode*). *where*
        (the function relying on the lock) and *rule* (e.g. ``pmd-lock-not-held``) name
        the place and the rule in the message."""
        if not self.current.holds(ident, mode):
            want = "" if mode is None else f" for {_MODE_NAME[mode]}"
            at = f" in {where}" if where else ""
            head = f"{rule}: " if rule else ""
            raise LockdepError(f"{head}{self.current.name}: {klass} not held{want}{at}")

    def assert_no_pt_locks(self, where: str) -> None:
        """Rule ``fault-under-pt-lock``: the current thread holds no page-table lock
        (:data:`PT_LOCK_CLASSES`) at *where*, a fault entry (a fault sleeps, allocates
        and takes those very locks). O(1): the per-class counts of the thread."""
        nc = self.current.nr_class
        if nc:
            for klass in PT_LOCK_CLASSES:
                if klass in nc:
                    t = self.current
                    raise LockdepError(f"fault-under-pt-lock: {t.name} takes a fault in {where} holding "
                                       f"{klass} ({t.describe_held()})")

    def walk_scope(self, where: str, keep: frozenset[str] | tuple[str, ...] = (),
                   brackets: tuple[dict[Any, int], Any] | None = None) -> "WalkScope":
        """Context manager around a page-table walk or a call made of walks: rules
        ``walk-leaked-lock`` (the current thread holds, on exit, the locks it held on
        entry: the same count per lock class and the same most recent lock; classes in
        *keep* may grow, as the folio locks ``migrate_vma_setup()`` hands to its caller)
        and, with *brackets* = ``(counts, key)``, ``notifier-unbalanced``
        (``counts[key]``, the open ``invalidate_range_start()`` brackets of an mm, is
        the same on exit). Checked on a normal exit and on an exception (not on a
        :class:`LockdepError` already raised, nor on a thread being torn down). O(number
        of lock classes held), no per-page work."""
        return WalkScope(self, where, keep, brackets)

    def might_sleep(self, what: str = "") -> None:
        """``might_sleep``: no spinlock may be held here (O(1): a count per thread)."""
        t = self.current
        if t.nr_spin:
            spin = next(h[0] for h in reversed(t.held.values()) if not h[2])
            raise LockdepError(f"{t.name}: sleeping ({what}) while holding spinlock {spin}")

    def assert_none_held(self, klass: str) -> None:
        """No lock of class *klass* is held by the current thread."""
        if klass in self.current.nr_class:
            raise LockdepError(f"{self.current.name}: {klass} held where it must not be")

    def assert_no_locks(self) -> None:
        """Every thread has released every lock (checked after each test)."""
        held = [f"{next(iter(st[2])).name}:{st[0]}" for _i, st in zip(range(16), self._owners.values())]
        total = len(self._owners)
        for klass, arr in self._keyed.items():
            busy = np.flatnonzero(arr)
            total += len(busy)
            for key in busy[:max(16 - len(held), 0)].tolist():
                th = self._slots[int(arr[key])]
                held.append(f"{th.name if th is not None else '?'}:{klass}")
        if total:
            more = total - len(held)
            raise LockdepError(f"locks still held: {', '.join(held)}" + (f" and {more} more" if more > 0 else ""))


class WalkScope:
    """What :meth:`LockState.walk_scope` returns (a class, not a generator: it wraps
    every walk)."""

    __slots__ = ("brackets", "classes", "keep", "last", "ls", "open", "thread", "where")

    def __init__(self, ls: LockState, where: str, keep: frozenset[str] | tuple[str, ...],
                 brackets: tuple[dict[Any, int], Any] | None) -> None:
        self.ls = ls
        self.where = where
        self.keep = keep
        self.brackets = brackets
        self.thread: Thread | None = None

    def __enter__(self) -> Self:
        ls = self.ls
        if not ls.walk_checks:
            return self
        t = self.thread = ls.current
        self.classes = t.nr_class.copy()
        held = t.held
        self.last = next(reversed(held)) if held else None
        b = self.brackets
        self.open = b[0].get(b[1], 0) if b is not None else 0
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        t = self.thread
        if t is None:
            return
        if typ is None:
            # the common case, in a few comparisons
            held = t.held
            b = self.brackets
            if (t.nr_class == self.classes and (next(reversed(held)) if held else None) is self.last
                    and (b is None or b[0].get(b[1], 0) == self.open)):
                return
        elif issubclass(typ, LockdepError) or not issubclass(typ, Exception):
            return  # report the first broken rule; a killed thread unwinds as it can
        problem = self.check(t)
        if problem:
            how = f" (leaving by {typ.__name__}: {exc})" if typ is not None else ""
            raise LockdepError(f"{problem} in {self.where}{how}") from exc

    def check(self, t: Thread) -> str:
        """The broken rule's message ("" if none)."""
        now = t.nr_class
        before = self.classes
        if now != before:
            keep = self.keep
            for klass in set(now) | set(before):
                a, b = before.get(klass, 0), now.get(klass, 0)
                if a == b or (klass in keep and b > a):
                    continue
                n = abs(b - a)
                locks = f"{n} {klass} lock{'s' if n > 1 else ''}"
                if b > a:
                    return f"walk-leaked-lock: {t.name} still holds {locks} it did not hold on entry"
                return f"walk-leaked-lock: {t.name} released {locks} it held on entry"
        held = t.held
        last = next(reversed(held)) if held else None
        if last is not self.last and last != self.last:
            return (f"walk-leaked-lock: {t.name} holds {held[last][0] if last is not None else 'nothing'} "
                    f"where it held {'another lock' if self.last is not None else 'nothing'} on entry")
        b = self.brackets
        if b is not None:
            n = b[0].get(b[1], 0)
            if n != self.open:
                return (f"notifier-unbalanced: {n - self.open:+d} open mmu_notifier_invalidate_range_start() "
                        f"brackets of the mm on exit")
        return ""


class Lock:
    """A named sleeping or spinning lock (``struct rw_semaphore``, ``struct mutex``,
    ``spinlock_t``). Keyed locks (page-table locks, folio locks) use
    :meth:`LockState.acquire` directly with a tuple key instead."""

    __slots__ = ("ls", "klass", "sleepable", "__weakref__")

    def __init__(self, ls: LockState, klass: str, sleepable: bool = True) -> None:
        self.ls = ls
        self.klass = klass
        self.sleepable = sleepable
        declare_lock_class(klass)

    # rwsem
    def down_read(self) -> None:
        self.ls.acquire(self, self.klass, READ, self.sleepable)

    def down_write(self) -> None:
        self.ls.acquire(self, self.klass, WRITE, self.sleepable)

    def down_read_trylock(self) -> bool:
        return self.ls.acquire(self, self.klass, READ, self.sleepable, trylock=True)

    def down_write_trylock(self) -> bool:
        return self.ls.acquire(self, self.klass, WRITE, self.sleepable, trylock=True)

    def up_read(self) -> None:
        self.ls.release(self, self.klass)

    up_write = up_read

    # mutex / spinlock
    def lock(self) -> None:
        self.ls.acquire(self, self.klass, WRITE, self.sleepable)

    def trylock(self) -> bool:
        return self.ls.acquire(self, self.klass, WRITE, self.sleepable, trylock=True)

    def unlock(self) -> None:
        self.ls.release(self, self.klass)

    def assert_held(self, mode: int | None = None) -> None:
        self.ls.assert_held(self, self.klass, mode)

    def is_locked(self) -> bool:
        return self.ls.is_locked(self)

    @contextmanager
    def held(self, mode: int = WRITE) -> Iterator[None]:
        """Hold the lock for the duration of a ``with`` block."""
        self.ls.acquire(self, self.klass, mode, self.sleepable)
        try:
            yield
        finally:
            self.ls.release(self, self.klass)

    def __repr__(self) -> str:
        return f"Lock({self.klass})"
