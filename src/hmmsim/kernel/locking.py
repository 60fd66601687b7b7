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

The model runs one simulated thread at a time. A lock that is held by another (suspended)
simulated thread cannot be taken: :class:`WouldBlock` is raised, which the interleaving
machinery turns into "try again at the next scheduling point", and which is a
:class:`DeadlockError` when no other thread could ever release the lock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from .stats import Stats, declare_lock_class

__all__ = (
    "DeadlockError", "Lock", "LockState", "LockdepError", "READ", "Thread", "WRITE",
    "WouldBlock",
)

READ = 1
WRITE = 2
_MODE_NAME = {READ: "read", WRITE: "write"}


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

    __slots__ = ("name", "held", "nr_spin", "nr_class", "task")

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

    def holds(self, ident: Hashable, mode: int | None = None) -> bool:
        h = self.held.get(ident)
        return h is not None and (mode is None or h[1] == mode)

    def held_locks(self) -> list[tuple[Hashable, str, int]]:
        """``lockdep_print_held_locks()``: (ident, class, mode) in acquisition order."""
        return [(i, h[0], h[1]) for i, h in self.held.items()]

    def describe_held(self, limit: int = 8) -> str:
        """The held locks for a message: ``mmap_lock(read), ptl`` (the first *limit*)."""
        items = [f"{h[0]}({_MODE_NAME[h[1]]})" if h[2] else h[0]
                 for _i, h in zip(range(limit), self.held.values())]
        more = len(self.held) - len(items)
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

    def _count(self, klass: str, mode: int) -> None:
        key = self._stat_keys.get((klass, mode))
        if key is None:
            key = self._stat_keys[(klass, mode)] = f"lock.{klass}.{_MODE_NAME[mode]}"
        self.stats.add(key)

    def release(self, ident: Hashable, klass: str) -> None:
        """Release lock *ident* held by the current thread."""
        t = self.current
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

    def is_locked(self, ident: Hashable) -> bool:
        return ident in self._owners

    def holders(self, ident: Hashable) -> list[Thread]:
        st = self._owners.get(ident)
        return list(st[2]) if st else []

    # -- assertions ---------------------------------------------------------------------
    def lockdep_warn(self, message: str) -> None:
        """Record a lockdep report that the kernel prints and survives (once per message,
        like lockdep, which reports a dependency chain only the first time)."""
        if message not in self.warnings:
            self.warnings.append(message)
            self.stats.add("lockdep.warning")

    def assert_held(self, ident: Hashable, klass: str, mode: int | None = None) -> None:
        """``lockdep_assert_held``: the current thread holds *ident* (in *mode*)."""
        if not self.current.holds(ident, mode):
            want = "" if mode is None else f" for {_MODE_NAME[mode]}"
            raise LockdepError(f"{self.current.name}: {klass} not held{want}")

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
        if self._owners:
            desc = ", ".join(f"{next(iter(st[2])).name}:{st[0]}"
                             for _i, st in zip(range(16), self._owners.values()))
            more = len(self._owners) - 16
            raise LockdepError(f"locks still held: {desc}" + (f" and {more} more" if more > 0 else ""))


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
