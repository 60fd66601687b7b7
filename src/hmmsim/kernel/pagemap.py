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

__all__ = ("folio_lock", "folio_test_locked", "folio_trylock", "folio_unlock",
           "folio_wait_locked")


def _ident(sys: "System", pfn: int) -> tuple[str, int]:
    return ("folio", sys.mem.compound_head(pfn))


def folio_lock(sys: "System", pfn: int) -> None:
    """``folio_lock()``: sleep until the folio of *pfn* can be locked."""
    ident = _ident(sys, pfn)
    sys.ls.acquire(ident, "folio_lock", WRITE, sleepable=True)
    sys.mem.flags[ident[1]] |= PG_locked


def folio_trylock(sys: "System", pfn: int) -> bool:
    """``folio_trylock()``: lock the folio of *pfn* if nobody holds it."""
    ident = _ident(sys, pfn)
    if not sys.ls.acquire(ident, "folio_lock", WRITE, sleepable=True, trylock=True):
        return False
    sys.mem.flags[ident[1]] |= PG_locked
    return True


def folio_unlock(sys: "System", pfn: int) -> None:
    ident = _ident(sys, pfn)
    sys.ls.release(ident, "folio_lock")
    sys.mem.flags[ident[1]] &= ~np.uint32(PG_locked)


def folio_test_locked(sys: "System", pfn: int) -> bool:
    return bool(sys.mem.flags[sys.mem.compound_head(pfn)] & PG_locked)


def folio_wait_locked(sys: "System", pfn: int) -> None:
    """``folio_wait_locked()``: wait (let other simulated threads run) until unlocked."""
    sys.ls.wait_event(lambda: not folio_test_locked(sys, pfn), f"folio lock of pfn {pfn:#x}")
