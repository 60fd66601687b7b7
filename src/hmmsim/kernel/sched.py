"""Deterministic interleaving of simulated threads at scheduling points.

Every lock acquisition and every wait in :mod:`hmmsim.kernel.locking` is a scheduling
point, and so are the page-table accessors of :mod:`hmmsim.kernel.mm`. Each point has a
kind (``where``): ``"lock"`` (a lock taken by name: mmap_lock, folio locks, driver
mutexes), ``"wait"``, ``"pte_offset_map"`` (a lockless map of a leaf table, as in
hmm's walk), ``"pte_offset_map_lock"``, ``"pmd_lock"``, ``"huge_pte_lock"`` (page-table
locks, taken by the accessor of that name) and ``"set_pte"``/``"set_pmd"``/``"set_pud"``
(an entry written through :meth:`PtRef.set <hmmsim.kernel.mm.PtRef.set>`). An :class:`Interleave` runs a whole operation of another simulated thread (for
example a ``munmap`` racing with a device read) at the *n*-th scheduling point after it
is armed. If that operation's first lock is held by the interrupted thread it raises
:class:`~hmmsim.kernel.locking.WouldBlock` before changing anything, and is tried again at
the next scheduling point, which is how a blocked thread behaves. Choosing *n* from a
seeded random generator explores races reproducibly.

>>> # race = Interleave(sys, lambda: vm_munmap(mm, a, n), at=17, name="munmapper")
>>> # with race: dmirror READ ...   (the munmap runs at the 17th scheduling point)
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .locking import DeadlockError, LockState, Thread, WouldBlock

if TYPE_CHECKING:
    from .system import System

__all__ = ("Interleave", "Scheduler", "SimThread", "ThreadKilled")


class Interleave:
    """Run *action* as thread *name* at scheduling point number *at* (0 = the first one
    after arming; only points of kind *where* count if given, see the module docstring),
    retrying while it would block. Use as a context manager; afterwards ``done`` says
    whether it ran, ``result`` holds its return value and ``point`` the scheduling point
    where it ran (kind and lock class)."""

    def __init__(self, sys: "System", action: Callable[[], Any], at: int = 0, name: str = "racer",
                 where: str | None = None) -> None:
        self.sys = sys
        self.action = action
        self.at = at
        self.where = where
        self.thread = Thread(name)
        self.count = 0
        self.done = False
        self.running = False
        self.result: Any = None
        self.point: tuple[str, str] | None = None
        self.blocked = 0

    def _hook(self, ls: LockState, where: str, klass: str) -> None:
        if self.done or self.running or (self.where is not None and where != self.where):
            return
        self.count += 1
        if self.count <= self.at:
            return
        self.running = True
        try:
            with ls.as_thread(self.thread):
                self.result = self.action()
            self.done = True
            self.point = (where, klass)
        except WouldBlock:
            self.blocked += 1
        finally:
            self.running = False

    def __enter__(self) -> "Interleave":
        self.sys.ls.add_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.sys.ls.remove_hook(self._hook)
        if not self.done and exc[0] is None:
            # the racing thread still runs to completion once everyone else is done
            with self.sys.ls.as_thread(self.thread):
                self.result = self.action()
            self.done = True
            self.point = ("end", "")


# -- simulated threads run one at a time ------------------------------------------------------
class ThreadKilled(BaseException):
    """Raised inside a simulated thread that the scheduler tears down (another thread
    failed, or a deadlock was found): its ``finally`` blocks run and release its locks."""


_NEW, _RUNNABLE, _BLOCKED, _DONE = "new", "runnable", "blocked", "done"


class SimThread:
    """A simulated kernel thread (``kthread_run()``) or a thread of a process: any Python
    callable run on its own stack, one simulated thread at a time.

    ``lthread`` is its lock identity (``comm/tid``); ``state`` is ``new``, ``runnable``,
    ``blocked`` (``waits_for`` says for what) or ``done``; ``result`` / ``exception`` hold
    the outcome of the body."""

    def __init__(self, sched: "Scheduler", body: Callable[[], Any], name: str, task: Any,
                 thread: Thread | None = None, daemon: bool = False) -> None:
        self.sched = sched
        self.body = body
        self.name = name
        self.task = task
        self.daemon = daemon
        self.lthread = thread if thread is not None else Thread(name, task=task)
        self.state = _NEW
        self.waits_for = ""
        self.wait_lock: Any = None
        self._cond: Callable[[], bool] | None = None
        self.result: Any = None
        self.exception: BaseException | None = None
        self._go = threading.Semaphore(0)
        self._killed = False
        #: asked to let others run (:meth:`Scheduler.schedule`)
        self.yielded = False
        self._os = threading.Thread(target=self._main, name=f"hmmsim:{name}", daemon=True)

    def _main(self) -> None:
        self._go.acquire()
        try:
            if self._killed:
                raise ThreadKilled
            self.result = self.body()
        except ThreadKilled:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to Scheduler.run()
            self.exception = e
        finally:
            self.state = _DONE
            self.sched._back.release()  # noqa: SLF001

    def join(self) -> Any:
        """``kthread_stop()``/``pthread_join()`` from another simulated thread: block
        until this thread finished; its result."""
        self.sched.block_until(lambda: self.state == _DONE, f"join {self.name}")
        return self.result

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def __repr__(self) -> str:
        return f"SimThread({self.name!r}, {self.state})"


class Scheduler:
    """Run simulated threads one at a time, switching only at scheduling points (lock
    acquisitions, page-table accessors, blocking waits), deterministically.

    * Default schedule (``seed=None``): a thread runs until it blocks or ends, then the
      next runnable thread in spawn order after it runs (round robin). Reproducible.
    * ``seed=S``: at every scheduling point the thread to run next is drawn among the
      runnable ones by ``random.Random(S)``: another interleaving, the same one for the same
      seed.
    * A thread blocks on a lock held by another thread, in :meth:`block_until` (which
      ``LockState.wait_event`` uses: folio locks, migration entries, userfaultfd replies)
      or in :meth:`SimThread.join`. When no thread can run and some have not ended, the
      state is a deadlock: :class:`~hmmsim.kernel.locking.DeadlockError` names who waits for
      what (and who holds the lock waited for); every thread is then unwound.
    * ``trace`` records who ran when: ``(step, thread, event, where)`` tuples;
      :meth:`format_trace` prints them.

    Use as a context manager (it attaches to the machine's lock state) and call :meth:`run`::

        with Scheduler(sys, seed=3) as s:
            a = s.spawn(lambda: p.read(buf), name="reader")
            b = s.spawn(lambda: p.munmap(buf), name="unmapper")
            s.run()
    """

    def __init__(self, sys: "System", seed: int | None = None, max_steps: int = 1_000_000) -> None:
        self.sys = sys
        self.ls = sys.ls
        self.seed = seed
        self.rng = random.Random(seed) if seed is not None else None
        self.max_steps = max_steps
        self.threads: list[SimThread] = []
        self.trace: list[tuple[int, str, str, str]] = []
        self.steps = 0
        self.running: SimThread | None = None
        self._back = threading.Semaphore(0)
        self._killing = False
        self._attached = False

    # -- setup ---------------------------------------------------------------------------------
    def spawn(self, body: Callable[[], Any], name: str | None = None, task: Any = None,
              thread: Thread | None = None, daemon: bool = False) -> SimThread:
        """``kthread_run()`` / ``clone(CLONE_VM | CLONE_THREAD)``: a new simulated thread
        running *body*; with *task*, a thread of that process (its own tid, the process's
        mm and files). *thread*: run *body* as that existing lock identity instead (e.g. a
        task's own thread). A *daemon* thread does not keep :meth:`run` going: run returns
        once every other thread ended, leaving daemons blocked where they wait (a handler
        thread serving faults across many calls); :meth:`__exit__` unwinds them."""
        if thread is not None:
            name, task = thread.name, thread.task
        elif task is not None:
            tid = next(self.sys.pids)
            name = name or task.name
            name = f"{name}/{tid}"
        t = SimThread(self, body, name or f"kthread{len(self.threads)}", task, thread, daemon)
        self.threads.append(t)
        return t

    def __enter__(self) -> "Scheduler":
        if self.ls.scheduler is not None:
            raise RuntimeError("a scheduler is already attached to this machine")
        self.ls.scheduler = self
        self.ls.add_hook(self._point)
        self._attached = True
        return self

    def __exit__(self, *exc: object) -> None:
        if any(t.state != _DONE and t._os.is_alive() for t in self.threads):  # noqa: SLF001
            self._kill_all()
        self.ls.remove_hook(self._point)
        self.ls.scheduler = None
        self._attached = False

    # -- the running thread's side ---------------------------------------------------------------
    def current(self) -> SimThread | None:
        """The simulated thread running now (None outside :meth:`run`'s threads)."""
        t = self.running
        return t if t is not None and self.ls.current is t.lthread else None

    def _yield(self, t: SimThread) -> None:
        """Hand control back to :meth:`run` and sleep until resumed."""
        self._back.release()
        t._go.acquire()  # noqa: SLF001
        if t._killed:  # noqa: SLF001
            raise ThreadKilled

    def _point(self, ls: LockState, where: str, klass: str) -> None:
        """The lock state's hook: a scheduling point of the running thread."""
        t = self.current()
        if t is None or self._killing:
            return
        self.steps += 1
        if self.rng is not None and self.rng.random() < 0.5:
            self.trace.append((self.steps, t.name, "preempt", f"{where} {klass}".strip()))
            self._yield(t)

    def schedule(self) -> None:
        """``schedule()`` of a runnable thread (``cond_resched()``, ``yield()``): let the
        next runnable thread run first (in the default schedule: the next in spawn order)."""
        t = self.current()
        if t is None:
            return
        t.yielded = True
        self.trace.append((self.steps, t.name, "yield", ""))
        self._yield(t)

    def block_until(self, cond: Callable[[], bool], what: str, lock: Any = None) -> None:
        """Sleep until *cond()* holds (``wait_event()``), letting other threads run."""
        t = self.current()
        if t is None:
            raise RuntimeError("block_until() outside a simulated thread")
        while not cond():
            if self._killing:
                raise ThreadKilled
            t.state, t.waits_for, t.wait_lock, t._cond = _BLOCKED, what, lock, cond  # noqa: SLF001
            self.trace.append((self.steps, t.name, "block", what))
            self._yield(t)

    # -- the driver ----------------------------------------------------------------------------
    def _runnable(self) -> list[SimThread]:
        out = []
        for t in self.threads:
            if t.state == _BLOCKED and t._cond is not None and t._cond():  # noqa: SLF001
                t.state, t.waits_for, t.wait_lock, t._cond = _RUNNABLE, "", None, None  # noqa: SLF001
                self.trace.append((self.steps, t.name, "wake", ""))
            if t.state in (_NEW, _RUNNABLE):
                out.append(t)
        return out

    def _pick(self, last: SimThread | None) -> SimThread | None:
        ready = self._runnable()
        if not ready:
            return None
        if self.rng is not None:
            return ready[self.rng.randrange(len(ready))]
        if last is not None and last in ready and not (last.yielded and len(ready) > 1):
            last.yielded = False
            return last
        if last is not None:
            last.yielded = False
        if last is None:
            return ready[0]
        after = self.threads.index(last)
        return min(ready, key=lambda t: (self.threads.index(t) - after - 1) % len(self.threads))

    def _resume(self, t: SimThread) -> None:
        prev = self.ls.current
        self.running = t
        self.ls.current = t.lthread
        if t.state == _NEW:
            t.state = _RUNNABLE
            t._os.start()  # noqa: SLF001
        t._go.release()  # noqa: SLF001
        self._back.acquire()
        self.ls.current = prev
        self.running = None

    def run(self) -> None:
        """Run every spawned thread to its end (threads may spawn more). Raises the first
        exception a thread raised (the others are unwound), or
        :class:`~hmmsim.kernel.locking.DeadlockError`."""
        if not self._attached:
            with self:
                self.run()
            return
        last: SimThread | None = None
        for _ in range(self.max_steps):
            t = self._pick(last)
            if t is None or (t.daemon and not self._pending()):
                if not self._pending():
                    return
                msg = self.describe_deadlock()
                self._kill_all()
                raise DeadlockError(msg)
            if t is not last:
                self.trace.append((self.steps, t.name, "run", ""))
            last = t
            self._resume(t)
            if t.exception is not None:
                exc = t.exception
                self._kill_all()
                raise exc
        msg = f"scheduler: no end after {self.max_steps} switches"
        self._kill_all()
        raise DeadlockError(msg)

    def _pending(self) -> list[SimThread]:
        """Threads that keep :meth:`run` going: not ended, not daemons."""
        return [x for x in self.threads if x.state != _DONE and not x.daemon]

    def describe_deadlock(self) -> str:
        """Who waits for what, and who holds the locks waited for."""
        parts = []
        for t in self.threads:
            if t.state == _DONE:
                continue
            s = f"{t.name} waits for {t.waits_for or '?'}"
            if t.wait_lock is not None:
                holders = self.ls.holders(t.wait_lock)
                if holders:
                    s += f" (held by {', '.join(h.name for h in holders)})"
            parts.append(s)
        return "deadlock: " + "; ".join(parts)

    def _kill_all(self) -> None:
        """Unwind every thread that has not ended (its finally blocks run as itself)."""
        self._killing = True
        try:
            for t in self.threads:
                if t.state == _DONE:
                    continue
                t._killed = True  # noqa: SLF001
                if t.state == _NEW:
                    t.state = _DONE
                    continue
                self._resume(t)
        finally:
            self._killing = False

    def format_trace(self) -> str:
        """The trace, one line per event: ``step thread event [where]``."""
        return "\n".join(f"{s:6d} {name:<20} {ev:<8} {w}".rstrip() for s, name, ev, w in self.trace)
