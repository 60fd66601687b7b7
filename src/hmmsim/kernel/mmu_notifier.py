"""MMU notifiers and interval notifiers.

Models ``include/linux/mmu_notifier.h`` and ``mm/mmu_notifier.c``: the invalidation
events, ``struct mmu_notifier_range``, classic (hlist) notifiers, and the
``mmu_interval_notifier`` sequence protocol exactly as the kernel implements it:

* each mm has an ``invalidate_seq`` that starts at 2 and is odd while an invalidation
  that hit some interval is running;
* an interval's own ``invalidate_seq`` is set by the driver (``mmu_interval_set_seq``)
  from its ``invalidate`` callback; a reader's ``read_begin`` returns it and
  ``read_retry`` reports whether it changed;
* inserting or removing an interval while invalidations run is deferred until the last
  one ends.

Every ``invalidate_range_start``/``end`` pair must balance; the model asserts it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errno import EAGAIN, EINVAL, EOVERFLOW
from .locking import DeadlockError, LockdepError, WouldBlock
from .page_types import ULONG_MAX
from .trace import (
    MmuNotifierInvalidateRangeEnd, MmuNotifierInvalidateRangeStart, MmuNotifierRelease, owner_pid,
)

if TYPE_CHECKING:
    from .mm import MM

__all__ = (
    "MMU_NOTIFIER_RANGE_BLOCKABLE", "MmuIntervalNotifier", "MmuIntervalNotifierFinish",
    "MmuIntervalNotifierOps",
    "MmuNotifier", "MmuNotifierEvent", "MmuNotifierRange", "MmuNotifierSubscriptions",
    "mmu_interval_check_retry", "mmu_interval_notifier_insert",
    "mmu_interval_notifier_remove", "mmu_interval_read_begin", "mmu_interval_read_retry",
    "mmu_interval_set_seq", "mmu_notifier_invalidate_range_end",
    "mmu_notifier_invalidate_range_start", "mmu_notifier_invalidate_range_start_nonblock",
    "mmu_notifier_range_blockable", "mmu_notifier_register", "mmu_notifier_release",
    "mmu_notifier_unregister", "notify_range",
)


class MmuNotifierEvent(enum.IntEnum):
    """``enum mmu_notifier_event``."""

    MMU_NOTIFY_UNMAP = 0
    MMU_NOTIFY_CLEAR = 1
    MMU_NOTIFY_PROTECTION_VMA = 2
    MMU_NOTIFY_PROTECTION_PAGE = 3
    MMU_NOTIFY_SOFT_DIRTY = 4
    MMU_NOTIFY_RELEASE = 5
    MMU_NOTIFY_MIGRATE = 6
    MMU_NOTIFY_EXCLUSIVE = 7


MMU_NOTIFIER_RANGE_BLOCKABLE = 1 << 0


class MmuNotifierRange:
    """``struct mmu_notifier_range``: ``[start, end)`` of *mm* being invalidated."""

    __slots__ = ("mm", "start", "end", "flags", "event", "owner")

    def __init__(self, event: MmuNotifierEvent, flags: int, mm: "MM", start: int, end: int,
                 owner: Any = None) -> None:
        """``mmu_notifier_range_init()`` / ``mmu_notifier_range_init_owner()``."""
        self.mm = mm
        self.start = start
        self.end = end
        self.flags = flags
        self.event = event
        self.owner = owner

    def __repr__(self) -> str:
        return (f"MmuNotifierRange({self.event.name}, {self.start:#x}-{self.end:#x}, "
                f"owner={self.owner!r})")


def mmu_notifier_range_blockable(r: MmuNotifierRange) -> bool:
    return bool(r.flags & MMU_NOTIFIER_RANGE_BLOCKABLE)


class MmuIntervalNotifierFinish:
    """``struct mmu_interval_notifier_finish`` (7.3): what ``invalidate_start`` hands back
    for the second pass; the core sets ``notifier`` before calling ``invalidate_finish``.
    Drivers subclass it (the C struct is embedded in the driver's own)."""

    __slots__ = ("notifier", "__dict__")

    def __init__(self) -> None:
        self.notifier: MmuIntervalNotifier | None = None


#: ``invalidate_start(sub, range, cur_seq) -> (ok, finish or None)``
InvalidateStart = Callable[["MmuIntervalNotifier", MmuNotifierRange, int],
                           "tuple[bool, MmuIntervalNotifierFinish | None]"]


class MmuIntervalNotifierOps:
    """``struct mmu_interval_notifier_ops``: ``invalidate(sub, range, cur_seq) -> bool``;
    on kernels with ``mmu_interval_two_pass`` (7.3) a driver may instead give
    ``invalidate_start`` (first pass, may return a finish object) and
    ``invalidate_finish(finish)`` (second pass, after every first pass of the
    invalidation)."""

    __slots__ = ("invalidate", "invalidate_start", "invalidate_finish")

    def __init__(self, invalidate: Callable[["MmuIntervalNotifier", MmuNotifierRange, int], bool] | None = None,
                 invalidate_start: InvalidateStart | None = None,
                 invalidate_finish: Callable[[MmuIntervalNotifierFinish], None] | None = None) -> None:
        self.invalidate = invalidate
        self.invalidate_start = invalidate_start
        self.invalidate_finish = invalidate_finish


def _itree_invalidate_one(sub: "MmuIntervalNotifier", r: MmuNotifierRange, cur_seq: int,
                          finishes: list[MmuIntervalNotifierFinish]) -> bool:
    """One subscription's first pass in ``mn_itree_invalidate()``/``mn_itree_release()``:
    ``invalidate_start`` (queueing its finish object) if it has one, else ``invalidate``."""
    ops = sub.ops
    assert ops is not None
    if ops.invalidate_start is not None:
        ok, finish = ops.invalidate_start(sub, r, cur_seq)
        if ok and finish is not None:
            finish.notifier = sub
            finishes.append(finish)
        return ok
    assert ops.invalidate is not None
    return ops.invalidate(sub, r, cur_seq)


def _itree_finish_pass(finishes: list[MmuIntervalNotifierFinish]) -> None:
    """``mn_itree_finish_pass()``: second passes, in the order of the first ones."""
    for f in finishes:
        assert f.notifier is not None and f.notifier.ops is not None
        ops = f.notifier.ops
        assert ops.invalidate_finish is not None
        ops.invalidate_finish(f)


class MmuIntervalNotifier:
    """``struct mmu_interval_notifier``: ``[start, last]`` (inclusive) of one mm."""

    __slots__ = ("mm", "ops", "start", "last", "invalidate_seq", "in_tree", "deferred",
                 "owner")

    def __init__(self, owner: Any = None) -> None:
        self.mm: MM | None = None
        self.ops: MmuIntervalNotifierOps | None = None
        self.start = 0
        self.last = 0
        self.invalidate_seq = 0
        self.in_tree = False
        #: None, "insert" or "remove" while on the deferred list
        self.deferred: str | None = None
        #: whatever the user attached (``container_of`` target)
        self.owner = owner

    def __repr__(self) -> str:
        return f"MmuIntervalNotifier({self.start:#x}-{self.last:#x}, seq={self.invalidate_seq})"


class MmuNotifier:
    """``struct mmu_notifier`` with ``struct mmu_notifier_ops`` as optional callables."""

    def __init__(self, invalidate_range_start: Callable[[MmuNotifierRange], int] | None = None,
                 invalidate_range_end: Callable[[MmuNotifierRange], None] | None = None,
                 release: Callable[["MM"], None] | None = None) -> None:
        self.invalidate_range_start = invalidate_range_start
        self.invalidate_range_end = invalidate_range_end
        self.release = release
        self.mm: MM | None = None


class MmuNotifierSubscriptions:
    """``struct mmu_notifier_subscriptions``: all notifiers of one mm."""

    def __init__(self) -> None:
        self.list: list[MmuNotifier] = []
        self.has_itree = False
        self.invalidate_seq = 2
        self.active_invalidate_ranges = 0
        self.itree: list[MmuIntervalNotifier] = []
        self.deferred_list: list[MmuIntervalNotifier] = []

    def is_invalidating(self) -> bool:
        """``mn_itree_is_invalidating()``: odd sequence = a writer is active."""
        return bool(self.invalidate_seq & 1)

    def overlapping(self, start: int, last: int) -> list[MmuIntervalNotifier]:
        return [s for s in self.itree if s.start <= last and s.last >= start]


def _subs(mm: "MM") -> MmuNotifierSubscriptions:
    if mm.notifier_subscriptions is None:
        mm.notifier_subscriptions = MmuNotifierSubscriptions()
    return mm.notifier_subscriptions


# -- registration --------------------------------------------------------------------------
def mmu_notifier_register(subscription: MmuNotifier | None, mm: "MM") -> int:
    """``mmu_notifier_register()``: takes mmap_lock for write; *subscription* None just
    sets up the mm for interval notifiers."""
    mm.mmap_lock.down_write()
    try:
        subs = _subs(mm)
        if subscription is None:
            subs.has_itree = True
        else:
            subscription.mm = mm
            subs.list.append(subscription)
    finally:
        mm.mmap_lock.up_write()
    return 0


def mmu_notifier_unregister(subscription: MmuNotifier, mm: "MM") -> None:
    subs = _subs(mm)
    if subscription in subs.list:
        if subscription.release is not None and not mm.dead:
            subscription.release(mm)
        subs.list.remove(subscription)


def mmu_interval_notifier_insert(sub: MmuIntervalNotifier, mm: "MM", start: int, length: int,
                                 ops: MmuIntervalNotifierOps) -> int:
    """``mmu_interval_notifier_insert()``: watch ``[start, start + length - 1]`` of *mm*.

    :return: 0, ``-EOVERFLOW`` for an empty or wrapping interval, ``-EINVAL`` if the mm has
        no users (*start* and *length* are unsigned longs: a negative length wraps)."""
    mm.sys.ls.might_sleep("mmu_interval_notifier_insert")
    start &= ULONG_MAX
    length &= ULONG_MAX
    if ops.invalidate_start is not None:
        if not mm.sys.profile.mmu_interval_two_pass:
            raise TypeError("struct mmu_interval_notifier_ops has no invalidate_start before "
                            "7.3 (mmu_interval_two_pass)")
        if ops.invalidate_finish is None:
            # the kernel WARNs, then calls a NULL invalidate_finish at the first finish pass
            raise ValueError("invalidate_start without invalidate_finish")
    if length == 0 or start + length - 1 > ULONG_MAX:
        return -EOVERFLOW
    if mm.mm_users <= 0:
        return -EINVAL
    subs = mm.notifier_subscriptions
    if subs is None or not subs.has_itree:
        ret = mmu_notifier_register(None, mm)
        if ret:
            return ret
        subs = _subs(mm)
    sub.mm = mm
    sub.ops = ops
    sub.start = start
    sub.last = start + length - 1
    if subs.active_invalidate_ranges:
        if subs.is_invalidating():
            sub.deferred = "insert"
            subs.deferred_list.append(sub)
        else:
            subs.invalidate_seq |= 1
            subs.itree.append(sub)
            sub.in_tree = True
        sub.invalidate_seq = subs.invalidate_seq
    else:
        sub.invalidate_seq = subs.invalidate_seq - 1
        subs.itree.append(sub)
        sub.in_tree = True
    mm.sys.stats.add("mmu_notifier.interval_insert")
    return 0


def mmu_interval_notifier_remove(sub: MmuIntervalNotifier) -> None:
    """``mmu_interval_notifier_remove()``: after it returns no callback runs for *sub*.

    It waits for a running invalidation that covers *sub* to finish; in the model that is
    only possible if another simulated thread runs it (else :class:`DeadlockError`)."""
    mm = sub.mm
    assert mm is not None, "removing an interval notifier that was never inserted"
    subs = _subs(mm)
    mm.sys.ls.might_sleep("mmu_interval_notifier_remove")
    seq = 0
    if subs.is_invalidating():
        if not sub.in_tree:
            subs.deferred_list.remove(sub)
            sub.deferred = None
        else:
            sub.deferred = "remove"
            subs.deferred_list.append(sub)
            seq = subs.invalidate_seq
    else:
        subs.itree.remove(sub)
        sub.in_tree = False
    if seq and subs.invalidate_seq == seq:
        raise WouldBlock(("mmu_notifier_wq", id(subs)), "mmu_notifier_wq", [])
    mm.sys.stats.add("mmu_notifier.interval_remove")


# -- reader side ---------------------------------------------------------------------------
def mmu_interval_read_begin(sub: MmuIntervalNotifier) -> int:
    """``mmu_interval_read_begin()``: start a read-side critical section; returns the seq.

    If an invalidation that hit *sub* is still running, the kernel sleeps until it ends;
    in the model that raises :class:`DeadlockError` when called from inside that very
    invalidation (no simulated thread could finish it)."""
    mm = sub.mm
    assert mm is not None
    subs = _subs(mm)
    mm.sys.ls.might_sleep("mmu_interval_read_begin")
    seq = sub.invalidate_seq
    if seq == subs.invalidate_seq:
        raise DeadlockError("mmu_interval_read_begin() would wait for an invalidation that "
                            "the current thread itself is running")
    return seq


def mmu_interval_read_retry(sub: MmuIntervalNotifier, seq: int) -> bool:
    """``mmu_interval_read_retry()``: True if an invalidation hit *sub* since *seq*."""
    return sub.invalidate_seq != seq


mmu_interval_check_retry = mmu_interval_read_retry


def mmu_interval_set_seq(sub: MmuIntervalNotifier, cur_seq: int) -> None:
    """``mmu_interval_set_seq()``: called by ``invalidate`` under the driver lock."""
    sub.invalidate_seq = cur_seq


# -- invalidation --------------------------------------------------------------------------
def _itree_inv_end(subs: MmuNotifierSubscriptions) -> None:
    """``mn_itree_inv_end()``."""
    subs.active_invalidate_ranges -= 1
    if subs.active_invalidate_ranges or not subs.is_invalidating():
        return
    subs.invalidate_seq += 1
    for sub in subs.deferred_list:
        if sub.deferred == "insert":
            subs.itree.append(sub)
            sub.in_tree = True
        elif sub.deferred == "remove" and sub.in_tree:
            subs.itree.remove(sub)
            sub.in_tree = False
        sub.deferred = None
    subs.deferred_list.clear()


def _invalidate_start(r: MmuNotifierRange) -> int:
    mm = r.mm
    stats = mm.sys.stats
    stats.add("mmu_notifier.invalidate_range_start")
    stats.add(f"mmu_notifier.event.{r.event.name[11:]}")
    if mm.sys.trace.mmu_notifier_invalidate_range_start:
        mm.sys.trace.emit(MmuNotifierInvalidateRangeStart(
            owner_pid(mm), r.event.name, r.start, r.end, r.owner, mmu_notifier_range_blockable(r)))
    subs = mm.notifier_subscriptions
    if subs is None:
        return 0
    itree = subs.has_itree
    if itree:
        subs.active_invalidate_ranges += 1
    try:
        if itree:
            hits = subs.overlapping(r.start, r.end - 1)
            if hits:
                subs.invalidate_seq |= 1
            cur_seq = subs.invalidate_seq
            finishes: list[MmuIntervalNotifierFinish] = []
            err = 0
            for sub in hits:
                stats.add("mmu_notifier.interval_invalidate")
                ok = _itree_invalidate_one(sub, r, cur_seq, finishes)
                if not ok and not mmu_notifier_range_blockable(r):
                    err = -EAGAIN
                    break
            _itree_finish_pass(finishes)
            if err:
                _itree_inv_end(subs)
                return err
        for mn in list(subs.list):
            if mn.invalidate_range_start is not None:
                ret = mn.invalidate_range_start(r)
                if ret and not mmu_notifier_range_blockable(r):
                    return ret
    except BaseException:
        # a subscriber's callback raised: the invalidation never started (the model's
        # unwinding; a C callback cannot throw), so no range stays open
        if itree:
            _itree_inv_end(subs)
        raise
    return 0


def mmu_notifier_invalidate_range_start(r: MmuNotifierRange) -> None:
    """``mmu_notifier_invalidate_range_start()``: tell every subscriber that
    ``[r.start, r.end)`` is about to change. Always blockable; may sleep."""
    mm = r.mm
    mm.sys.ls.might_sleep("mmu_notifier_invalidate_range_start")
    r.flags |= MMU_NOTIFIER_RANGE_BLOCKABLE
    _open = mm.sys.notifier_active
    _open[id(mm)] = _open.get(id(mm), 0) + 1
    try:
        _invalidate_start(r)
    except BaseException:
        _open[id(mm)] -= 1
        raise


def mmu_notifier_invalidate_range_start_nonblock(r: MmuNotifierRange) -> int:
    """The OOM reaper's variant: not blockable; may fail with ``-EAGAIN``."""
    r.flags &= ~MMU_NOTIFIER_RANGE_BLOCKABLE
    ret = _invalidate_start(r)
    if ret == 0:
        _open = r.mm.sys.notifier_active
        _open[id(r.mm)] = _open.get(id(r.mm), 0) + 1
    return ret


def mmu_notifier_invalidate_range_end(r: MmuNotifierRange) -> None:
    """``mmu_notifier_invalidate_range_end()``: the change of ``[r.start, r.end)`` is done."""
    mm = r.mm
    _open = mm.sys.notifier_active
    if _open.get(id(mm), 0) <= 0:
        raise LockdepError("mmu_notifier_invalidate_range_end() without a matching start")
    _open[id(mm)] -= 1
    mm.sys.stats.add("mmu_notifier.invalidate_range_end")
    if mm.sys.trace.mmu_notifier_invalidate_range_end:
        mm.sys.trace.emit(MmuNotifierInvalidateRangeEnd(owner_pid(mm), r.event.name, r.start, r.end))
    subs = mm.notifier_subscriptions
    if subs is None:
        return
    if subs.has_itree:
        _itree_inv_end(subs)
    for mn in list(subs.list):
        if mn.invalidate_range_end is not None:
            mn.invalidate_range_end(r)


class notify_range:
    """Context manager for one ``invalidate_range_start``/``end`` pair.

    >>> # with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, mm, start, end): change ptes
    """

    __slots__ = ("r",)

    def __init__(self, event: MmuNotifierEvent, mm: "MM", start: int, end: int,
                 owner: Any = None) -> None:
        self.r = MmuNotifierRange(event, 0, mm, start, end, owner)

    def __enter__(self) -> MmuNotifierRange:
        mmu_notifier_invalidate_range_start(self.r)
        return self.r

    def __exit__(self, *exc: object) -> None:
        mmu_notifier_invalidate_range_end(self.r)


def mmu_notifier_release(mm: "MM") -> None:
    """``__mmu_notifier_release()``: the mm is exiting. Every interval notifier gets one
    ``MMU_NOTIFY_RELEASE`` invalidation of the whole address space, then classic
    notifiers' ``release`` runs."""
    subs = mm.notifier_subscriptions
    mm.sys.stats.add("mmu_notifier.release")
    if mm.sys.trace.mmu_notifier_release:
        mm.sys.trace.emit(MmuNotifierRelease(owner_pid(mm)))
    if subs is None:
        return
    if subs.has_itree:
        r = MmuNotifierRange(MmuNotifierEvent.MMU_NOTIFY_RELEASE, MMU_NOTIFIER_RANGE_BLOCKABLE,
                             mm, 0, ULONG_MAX)
        subs.active_invalidate_ranges += 1
        hits = subs.overlapping(0, ULONG_MAX - 1)
        if hits:
            subs.invalidate_seq |= 1
        cur_seq = subs.invalidate_seq
        try:
            finishes: list[MmuIntervalNotifierFinish] = []
            for sub in hits:
                mm.sys.stats.add("mmu_notifier.interval_invalidate")
                _itree_invalidate_one(sub, r, cur_seq, finishes)
            _itree_finish_pass(finishes)
        finally:
            _itree_inv_end(subs)
    for mn in list(subs.list):
        if mn.release is not None:
            mn.release(mm)
    # every classic subscription is unhooked: no callback after ->release
    subs.list.clear()
