"""Folio locks (``include/linux/pagemap.h``, ``mm/filemap.c``): ``PG_locked`` taken and
released through :mod:`hmmsim.kernel.locking`, so lock order and "would sleep" checks
apply to them like to any other lock."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .locking import WRITE
from .physmem import PG_locked

if TYPE_CHECKING:
    from .system import System

__all__ = ("folio_lock", "folio_lockptr", "folio_test_locked", "folio_trylock", "folio_unlock",
           "folio_wait_locked")


_NOT_LOCKED = ~np.uint32(PG_locked)


def folio_lockptr(sys: "System", pfn: int) -> tuple[str, int]:
    """The identity of the ``PG_locked`` bit lock of the folio of *pfn* (lock class
    ``folio_lock``): keyed by the head pfn."""
    return ("folio_lock", sys.mem.compound_head(pfn))


def folio_lock(sys: "System", pfn: int) -> None:
    """``folio_lock()``: sleep until the folio of *pfn* can be locked."""
    ident = folio_lockptr(sys, pfn)
    sys.ls.acquire(ident, "folio_lock", WRITE, sleepable=True)
    sys.mem.flags[ident[1]] |= PG_locked


def folio_trylock(sys: "System", pfn: int) -> bool:
    """``folio_trylock()``: lock the folio of *pfn* if nobody holds it."""
    ident = folio_lockptr(sys, pfn)
    if not sys.ls.acquire(ident, "folio_lock", WRITE, sleepable=True, trylock=True):
        return False
    sys.mem.flags[ident[1]] |= PG_locked
    return True


def folio_unlock(sys: "System", pfn: int) -> None:
    """``folio_unlock()``: clear ``PG_locked`` of the folio of *pfn* (held by the current
    thread)."""
    ident = folio_lockptr(sys, pfn)
    sys.ls.release(ident, "folio_lock")
    sys.mem.flags[ident[1]] &= _NOT_LOCKED


def folio_test_locked(sys: "System", pfn: int) -> bool:
    return bool(sys.mem.flags[sys.mem.compound_head(pfn)] & PG_locked)


def folio_wait_locked(sys: "System", pfn: int) -> None:
    """``folio_wait_locked()``: wait (let other simulated threads run) until unlocked."""
    sys.ls.wait_event(lambda: not folio_test_locked(sys, pfn), f"folio lock of pfn {pfn:#x}")
