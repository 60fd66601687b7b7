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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .locking import LockState, Thread, WouldBlock

if TYPE_CHECKING:
    from .system import System

__all__ = ("Interleave",)


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
