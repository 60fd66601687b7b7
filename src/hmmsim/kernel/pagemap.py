"""Folio locks (``include/linux/pagemap.h``, ``mm/filemap.c``): ``PG_locked`` taken and
released through :mod:`hmmsim.kernel.locking`, so lock order and "would sleep" checks
apply to them like to any other lock."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .locking import WRITE
from .physmem import PG_locked

if TYPE_CHECKING:
    from .system import System

__all__ = ("folio_lock", "folio_lockptr", "folio_test_locked", "folio_trylock", "folio_unlock",
           "folio_wait_locked", "folios_lock", "folios_trylock", "folios_unlock")


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


# -- batches (what a loop of the calls above does, for a page table or a migration's worth)
def folios_lock(sys: "System", heads: npt.NDArray[np.int64]) -> None:
    """:func:`folio_lock` of every folio head of *heads*, in order (one scheduling point
    for the batch; counted one acquisition each)."""
    heads = np.asarray(heads, np.int64)
    sys.ls.acquire_keys("folio_lock", heads)
    sys.mem.flags[heads] |= np.uint32(PG_locked)


def folios_trylock(sys: "System", heads: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """:func:`folio_trylock` of every folio head of *heads*, in order: which were locked."""
    heads = np.asarray(heads, np.int64)
    ok = sys.ls.acquire_keys("folio_lock", heads, trylock=True)
    sys.mem.flags[heads[ok]] |= np.uint32(PG_locked)
    return ok


def folios_unlock(sys: "System", heads: npt.NDArray[np.int64]) -> None:
    """:func:`folio_unlock` of every folio head of *heads* (all held by the current thread)."""
    heads = np.asarray(heads, np.int64)
    sys.ls.release_keys("folio_lock", heads)
    sys.mem.flags[heads] &= _NOT_LOCKED
