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
    """A simulated thread of execution: which locks it holds, in order."""

    __slots__ = ("name", "held")

    def __init__(self, name: str) -> None:
        self.name = name
        #: (ident, klass, mode, sleepable) in acquisition order
        self.held: list[tuple[Hashable, str, int, bool]] = []

    def holds(self, ident: Hashable, mode: int | None = None) -> bool:
        for h in self.held:
            if h[0] == ident and (mode is None or h[2] == mode):
                return True
        return False

    def __repr__(self) -> str:
        return f"Thread({self.name!r})"


Hook = Callable[["LockState", str, str], None]


class LockState:
    """All lock state of one simulated machine and the currently running thread."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.main = Thread("main")
        self.current = self.main
        # ident -> [mode, holders]
        self._owners: dict[Hashable, list[Any]] = {}
        self._hooks: list[Hook] = []
        #: lockdep reports that did not stop the kernel (``WARNING: ...`` in dmesg), in order
        self.warnings: list[str] = []

    # -- scheduling points -------------------------------------------------------------
    def add_hook(self, hook: Hook) -> None:
        """Run *hook(state, where, klass)* at every scheduling point from now on."""
        self._hooks.append(hook)

    def remove_hook(self, hook: Hook) -> None:
        self._hooks.remove(hook)

    def schedule_point(self, where: str, klass: str = "") -> None:
        """A point where another simulated thread could run (every lock acquisition)."""
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
        for _ in range(100_000):
            if cond():
                return
            if not self._hooks:
                raise DeadlockError(f"{self.current.name} would wait forever for {what}")
            self.schedule_point("wait", what)
        raise DeadlockError(f"{self.current.name} waited too long for {what}")

    # -- acquire / release -------------------------------------------------------------
    def acquire(self, ident: Hashable, klass: str, mode: int = WRITE, sleepable: bool = True,
                trylock: bool = False) -> bool:
        """Take lock *ident* (of lock class *klass*) in *mode*; False if a trylock fails."""
        if not trylock:
            self.schedule_point("lock", klass)
            if sleepable:
                self.might_sleep(klass)
        t = self.current
        st = self._owners.get(ident)
        if st is not None:
            if t in st[1]:
                if trylock:
                    return False
                if not (mode == READ and st[0] == READ and sleepable):
                    raise LockdepError(f"{t.name}: recursive locking of {klass} ({_MODE_NAME[mode]}), "
                                       f"already held {_MODE_NAME[st[0]]}")
                # A second down_read() of an rwsem this thread already holds for read
                # succeeds in the kernel (no writer is queued in a one-at-a-time model),
                # but lockdep reports it: it deadlocks once a writer queues in between.
                self.lockdep_warn(f"possible recursive locking detected: {t.name} is trying "
                                  f"to acquire {klass} (read) but already holds it (read)")
            if mode == WRITE or st[0] == WRITE:
                if trylock:
                    return False
                raise WouldBlock(ident, klass, list(st[1]))
            st[1].append(t)
        else:
            self._owners[ident] = [mode, [t]]
        t.held.append((ident, klass, mode, sleepable))
        self.stats.add(f"lock.{klass}.{_MODE_NAME[mode]}")
        return True

    def release(self, ident: Hashable, klass: str) -> None:
        """Release lock *ident* held by the current thread."""
        t = self.current
        st = self._owners.get(ident)
        if st is None or t not in st[1]:
            raise LockdepError(f"{t.name}: releasing {klass} that it does not hold")
        st[1].remove(t)
        if not st[1]:
            del self._owners[ident]
        for i in range(len(t.held) - 1, -1, -1):
            if t.held[i][0] == ident:
                del t.held[i]
                break

    def is_locked(self, ident: Hashable) -> bool:
        return ident in self._owners

    def holders(self, ident: Hashable) -> list[Thread]:
        st = self._owners.get(ident)
        return list(st[1]) if st else []

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
        """``might_sleep``: no spinlock may be held here."""
        for _ident, klass, _mode, sleepable in self.current.held:
            if not sleepable:
                raise LockdepError(f"{self.current.name}: sleeping ({what}) while holding "
                                   f"spinlock {klass}")

    def assert_none_held(self, klass: str) -> None:
        """No lock of class *klass* is held by the current thread."""
        for _ident, k, _mode, _s in self.current.held:
            if k == klass:
                raise LockdepError(f"{self.current.name}: {klass} held where it must not be")

    def assert_no_locks(self) -> None:
        """Every thread has released every lock (checked after each test)."""
        if self._owners:
            desc = ", ".join(f"{st[1][0].name}:{self._klass_of(i)}" for i, st in self._owners.items())
            raise LockdepError(f"locks still held: {desc}")

    def _klass_of(self, ident: Hashable) -> str:
        for st in self._owners.get(ident, [None, []])[1]:
            for h in st.held:
                if h[0] == ident:
                    return h[1]
        return repr(ident)


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
