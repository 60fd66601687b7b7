"""Tracepoints: named events with typed fields, and the per-machine registry of probes.

Models the kernel's static tracepoints (``include/linux/tracepoint.h``, the event classes
of ``include/trace/events/*.h``): a fixed set of events, each a frozen dataclass whose
fields are what the event records, grouped by subsystem (``mm``, ``hmm``,
``mmu_notifier``, ``migrate_device``, ``test_hmm``). :class:`Trace` (``sys.trace``) holds,
for each event, the probes attached to it; an event site costs one attribute test when
nothing is attached and builds no event object::

    tp = sys.trace
    if tp.mmu_notifier_invalidate_range_start:
        tp.emit(MmuNotifierInvalidateRangeStart(...))

Spans (a function with several exits: ``handle_mm_fault``, ``handle_mm_fault_range``,
``hmm_range_fault``, ``hmm_vma_fault``, the dmirror ioctl) are traced by a decorator on the
modelled function (``@tracepoint_hmm_range_fault``), which calls straight through when the
events are off.

Events are never per page unless asked for: ``mm_fault`` (one event per page faulted) makes
:func:`~hmmsim.kernel.fault_range.handle_mm_fault_range` take its page-by-page path while a
probe is attached, which is slower; ``mm_fault_range`` is the span event for a batch.

>>> from hmmsim import System
>>> sys = System()
>>> p = sys.spawn(); a = p.mmap(16 * 4096); dev = p.open_device(0)
>>> with sys.trace.record("hmm_range_fault_*", "mm_fault_range") as events:
...     _ = dev.read(a, 16)
>>> [e.name for e in events]  # the last fault: copy_to_user() into the caller's buffer
['hmm_range_fault_start', 'mm_fault_range', 'hmm_range_fault_end', 'mm_fault_range']
>>> f = events[1]; f.start == a, f.end - f.start, f.handlers
(True, 65536, {'do_anonymous_page': 16})
>>> e = events[2]; e.ret, e.walks, e.faults
(0, 2, 1)
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .stats import COUNTERS, Stats

if TYPE_CHECKING:
    from .mm import MM

__all__ = (
    "EVENTS", "DmirrorDevmemEvict", "DmirrorIoctl", "HmmDoFault", "HmmRangeFaultEnd",
    "HmmRangeFaultStart", "HmmVmaFault", "MigrateDeviceRange", "MigrateToRam",
    "MigrateVmaFinalize", "MigrateVmaPages", "MigrateVmaSetup", "MmFault", "MmFaultRange",
    "MmuNotifierInvalidateRangeEnd", "MmuNotifierInvalidateRangeStart", "MmuNotifierRelease",
    "Probe", "Trace", "TraceEvent", "fault_handlers", "owner_pid", "tracepoint_dmirror_ioctl",
    "tracepoint_hmm_do_fault", "tracepoint_hmm_range_fault", "tracepoint_hmm_vma_fault", "tracepoint_mm_fault",
    "tracepoint_mm_fault_range",
)

#: every event: name -> class (the kernel's ``/sys/kernel/tracing/events``)
EVENTS: dict[str, type[TraceEvent]] = {}

_HEX_FIELDS = frozenset({"address", "start", "end", "fail", "addr", "flags", "default_flags",
                         "pfn_flags_mask", "required_fault", "pfn", "start_pfn"})

_E = TypeVar("_E", bound="type[TraceEvent]")


def _event(subsystem: str, name: str) -> Callable[[_E], _E]:
    """Register an event class under *subsystem*/*name* (``TRACE_EVENT()``)."""
    def reg(cls: _E) -> _E:
        cls.name = name
        cls.subsystem = subsystem
        EVENTS[name] = cls
        return cls
    return reg


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """Base of every event: :attr:`name`, :attr:`subsystem`, and an ftrace-like ``str``."""

    name: ClassVar[str] = ""
    subsystem: ClassVar[str] = ""

    def __str__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _HEX_FIELDS and isinstance(v, int) and v >= 0:
                parts.append(f"{f.name}={v:#x}")
            else:
                parts.append(f"{f.name}={v}")
        return f"{self.name}: {' '.join(parts)}"


# -- mm ------------------------------------------------------------------------------------------
@_event("mm", "mm_fault")
@dataclass(frozen=True, slots=True)
class MmFault(TraceEvent):
    """One ``handle_mm_fault()`` call (one page). Per page: attaching a probe makes batched
    faults go page by page."""

    #: pid of the mm's owner task (0 if none)
    pid: int
    address: int
    #: ``FAULT_FLAG_*``
    flags: int
    #: the handlers that served it, named after their kernel functions (:func:`fault_handlers`)
    handlers: tuple[str, ...]
    #: ``vm_fault_t``
    ret: int


@_event("mm", "mm_fault_range")
@dataclass(frozen=True, slots=True)
class MmFaultRange(TraceEvent):
    """One ``handle_mm_fault_range()`` span: every page of ``[start, end)`` faulted in order,
    stopping at the first error."""

    pid: int
    start: int
    end: int
    flags: int
    #: ``vm_fault_t`` of the failing page, or 0
    ret: int
    #: address of the failing page, or *end*
    fail: int
    #: handler name -> pages it served
    handlers: dict[str, int] = field(default_factory=dict)


# -- hmm -----------------------------------------------------------------------------------------
@_event("hmm", "hmm_range_fault_start")
@dataclass(frozen=True, slots=True)
class HmmRangeFaultStart(TraceEvent):
    """``hmm_range_fault()`` entered."""

    pid: int
    start: int
    end: int
    #: ``HMM_PFN_REQ_*`` of the range
    default_flags: int
    pfn_flags_mask: int
    notifier_seq: int


@_event("hmm", "hmm_range_fault_end")
@dataclass(frozen=True, slots=True)
class HmmRangeFaultEnd(TraceEvent):
    """``hmm_range_fault()`` returned."""

    pid: int
    start: int
    end: int
    default_flags: int
    pfn_flags_mask: int
    #: 0 or ``-errno``
    ret: int
    #: ``walk_page_range()`` passes (1 + restarts after faults)
    walks: int
    #: fault spans run on the way (``hmm_vma_fault``/``hmm_do_fault``)
    faults: int


@dataclass(frozen=True, slots=True)
class _HmmFaultSpan(TraceEvent):
    pid: int
    start: int
    end: int
    #: ``HMM_NEED_*``
    required_fault: int
    #: ``-EBUSY`` (pages faulted, restart the walk) or ``-errno``
    ret: int


@_event("hmm", "hmm_vma_fault")
@dataclass(frozen=True, slots=True)
class HmmVmaFault(_HmmFaultSpan):
    """One ``hmm_vma_fault()`` span (6.12: the fault runs inside the walk)."""


@_event("hmm", "hmm_do_fault")
@dataclass(frozen=True, slots=True)
class HmmDoFault(_HmmFaultSpan):
    """One ``hmm_do_fault()`` span (7.3: the fault runs after the walk unwound), traced by
    :func:`tracepoint_hmm_do_fault` on the function that models it."""


# -- mmu_notifier --------------------------------------------------------------------------------
@_event("mmu_notifier", "mmu_notifier_invalidate_range_start")
@dataclass(frozen=True, slots=True)
class MmuNotifierInvalidateRangeStart(TraceEvent):
    """``mmu_notifier_invalidate_range_start()`` (or its ``_nonblock`` variant), before the
    subscribers are called."""

    pid: int
    #: ``enum mmu_notifier_event`` name (``MMU_NOTIFY_UNMAP``...)
    event: str
    start: int
    end: int
    #: ``range->owner`` (a pgmap owner, for MMU_NOTIFY_MIGRATE/EXCLUSIVE), or None
    owner: Any
    blockable: bool


@_event("mmu_notifier", "mmu_notifier_invalidate_range_end")
@dataclass(frozen=True, slots=True)
class MmuNotifierInvalidateRangeEnd(TraceEvent):
    """``mmu_notifier_invalidate_range_end()``."""

    pid: int
    event: str
    start: int
    end: int


@_event("mmu_notifier", "mmu_notifier_release")
@dataclass(frozen=True, slots=True)
class MmuNotifierRelease(TraceEvent):
    """``__mmu_notifier_release()``: the mm is exiting."""

    pid: int


# -- migrate_device (emitted once device memory migration is modelled) ---------------------------
@_event("migrate_device", "migrate_vma_setup")
@dataclass(frozen=True, slots=True)
class MigrateVmaSetup(TraceEvent):
    """``migrate_vma_setup()`` returned: pages collected and unmapped."""

    pid: int
    start: int
    end: int
    #: ``MIGRATE_VMA_SELECT_*``
    flags: int
    pgmap_owner: Any
    npages: int
    #: pages collected (``migrate->cpages``)
    cpages: int
    ret: int


@_event("migrate_device", "migrate_vma_pages")
@dataclass(frozen=True, slots=True)
class MigrateVmaPages(TraceEvent):
    """``migrate_vma_pages()``: struct page metadata moved to the destination pages."""

    start: int
    npages: int
    #: entries still ``MIGRATE_PFN_MIGRATE`` afterwards
    migrated: int


@_event("migrate_device", "migrate_vma_finalize")
@dataclass(frozen=True, slots=True)
class MigrateVmaFinalize(TraceEvent):
    """``migrate_vma_finalize()``: migration entries replaced by new (or restored) ptes."""

    start: int
    npages: int
    migrated: int
    #: entries restored to their source page
    restored: int


@_event("migrate_device", "migrate_device_range")
@dataclass(frozen=True, slots=True)
class MigrateDeviceRange(TraceEvent):
    """``migrate_device_range()``/``migrate_device_pfns()``: device pages collected for
    eviction by pfn."""

    start_pfn: int
    npages: int
    cpages: int


@_event("migrate_device", "migrate_to_ram")
@dataclass(frozen=True, slots=True)
class MigrateToRam(TraceEvent):
    """A CPU fault on a device-private entry called ``pgmap->ops->migrate_to_ram()``."""

    pid: int
    address: int
    #: the device-private pfn
    pfn: int
    #: ``vm_fault_t``
    ret: int


# -- test_hmm ------------------------------------------------------------------------------------
@_event("test_hmm", "dmirror_ioctl")
@dataclass(frozen=True, slots=True)
class DmirrorIoctl(TraceEvent):
    """``dmirror_fops_unlocked_ioctl()`` returned (any command, any result)."""

    #: the device minor (``/dev/hmm_dmirrorN``)
    device: int
    #: ``HMM_DMIRROR_*`` name, or the number in hex if unknown
    cmd: str
    addr: int
    npages: int
    #: 0 or ``-errno``
    ret: int
    #: ``cmd.cpages`` / ``cmd.faults`` as copied back to the user (0 on failure)
    cpages: int
    faults: int


@_event("test_hmm", "dmirror_devmem_evict")
@dataclass(frozen=True, slots=True)
class DmirrorDevmemEvict(TraceEvent):
    """``dmirror_device_evict_chunk()`` migrated a chunk's pages back to system memory."""

    device: int
    start_pfn: int
    npages: int
    #: pages that were in use and migrated
    evicted: int


# -- the registry --------------------------------------------------------------------------------
Callback = Callable[[TraceEvent], None]


@dataclass(frozen=True, eq=False)
class Probe:
    """An attached callback (what :meth:`Trace.attach` returns, for :meth:`Trace.detach`)."""

    names: tuple[str, ...]
    callback: Callback


def _resolve(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Event names matched by *patterns*: an event name, a subsystem, or a glob."""
    out: list[str] = []
    for pat in patterns:
        if pat in EVENTS:
            hits = [pat]
        else:
            hits = [n for n, c in EVENTS.items() if c.subsystem == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            names = list(EVENTS) + sorted({c.subsystem for c in EVENTS.values()})
            close = difflib.get_close_matches(pat, names, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise KeyError(f"no trace event matches {pat!r}{hint}")
        out.extend(h for h in hits if h not in out)
    return tuple(out)


class Trace:
    """The probes of one machine (``sys.trace``): one attribute per event in :data:`EVENTS`,
    an empty tuple (false) while nothing is attached.

    >>> t = Trace()
    >>> got = []
    >>> probe = t.attach("mmu_notifier", got.append)
    >>> bool(t.mmu_notifier_release), bool(t.hmm_range_fault_end)
    (True, False)
    >>> t.emit(MmuNotifierRelease(pid=1)); str(got[0])
    'mmu_notifier_release: pid=1'
    >>> t.detach(probe); bool(t.mmu_notifier_release)
    False
    """

    __slots__ = (*EVENTS, "_probes")

    def __init__(self) -> None:
        for n in EVENTS:
            setattr(self, n, ())
        self._probes: list[Probe] = []

    def attach(self, pattern: str | tuple[str, ...], callback: Callback) -> Probe:
        """Call *callback(event)* for every event matching *pattern* (or any of a tuple of
        them): an event name, a subsystem name, or a glob (``"hmm_*"``). ``KeyError`` naming
        close matches if a pattern matches nothing."""
        p = Probe(_resolve((pattern,) if isinstance(pattern, str) else tuple(pattern)), callback)
        self._probes.append(p)
        self._rebuild(p.names)
        return p

    def detach(self, probe: Probe) -> None:
        """Remove *probe*."""
        self._probes.remove(probe)
        self._rebuild(probe.names)

    def _rebuild(self, names: tuple[str, ...]) -> None:
        for n in names:
            setattr(self, n, tuple(p.callback for p in self._probes if n in p.names))

    def emit(self, ev: TraceEvent) -> None:
        """Deliver *ev* to the probes of its event (``trace_<event>()``)."""
        for cb in getattr(self, ev.name):
            cb(ev)

    def active(self) -> bool:
        """Whether any probe is attached (batched paths that emit nothing of their own
        step aside then)."""
        return bool(self._probes)

    def enabled(self, pattern: str) -> bool:
        """Whether an event matching *pattern* (name, subsystem, glob) has a probe."""
        return any(getattr(self, n) for n in _resolve((pattern,)))

    @contextmanager
    def record(self, *patterns: str, maxlen: int | None = None) -> Iterator[list[TraceEvent]]:
        """Collect the events matching *patterns* (all events if none) while the block runs.

        Yields a list (or, with *maxlen*, a ring buffer keeping the last *maxlen* events).
        """
        buf: Any = deque(maxlen=maxlen) if maxlen is not None else []
        probe = self.attach(patterns or ("*",), buf.append)
        try:
            yield buf
        finally:
            self.detach(probe)


# -- span decorators -----------------------------------------------------------------------------
#: counter -> the kernel function it names, for the "handlers" of fault events
_HANDLER_KEYS: dict[str, str] = {
    **{k: k[6:] for k in COUNTERS if k.startswith("fault.")
       and k not in ("fault.handle_mm_fault", "fault.user_error", "fault.map_pages")},
    "thp.fault_alloc": "do_huge_pmd_anonymous_page",
    "thp.zero_page_alloc": "do_huge_pmd_anonymous_page",
    "thp.wp_reuse": "do_huge_pmd_wp_page",
    "hugetlb.cow": "hugetlb_wp",
}
_HKEYS = tuple(_HANDLER_KEYS)


def fault_handlers(stats: Stats, before: list[int]) -> dict[str, int]:
    """Fault handlers run since *before* (``stats.counts(_HKEYS)``): name -> count.

    The handler of a fault is read from the counters it moved: ``fault.do_anonymous_page``
    is ``do_anonymous_page``, ``thp.fault_alloc`` is ``do_huge_pmd_anonymous_page``...
    """
    out: dict[str, int] = {}
    for k, b in zip(_HKEYS, before):
        d = stats[k] - b
        if d:
            name = _HANDLER_KEYS[k]
            out[name] = out.get(name, 0) + d
    return out


def owner_pid(mm: MM | None) -> int:
    """The pid of *mm*'s owner task (``mm->owner``), 0 if it has none."""
    owner = getattr(mm, "owner", None)
    return int(getattr(owner, "pid", 0) or 0)


_F = TypeVar("_F", bound=Callable[..., Any])


def tracepoint_mm_fault(fn: _F) -> _F:
    """Trace ``handle_mm_fault(vma, address, flags)`` as ``mm_fault``."""
    @functools.wraps(fn)
    def handle_mm_fault(vma: Any, address: int, flags: int) -> int:
        sys = vma.vm_mm.sys
        tp = sys.trace
        if not tp.mm_fault:
            return fn(vma, address, flags)
        before = sys.stats.counts(_HKEYS)
        ret = fn(vma, address, flags)
        tp.emit(MmFault(owner_pid(vma.vm_mm), address, flags,
                        tuple(fault_handlers(sys.stats, before)), ret))
        return ret
    return handle_mm_fault  # type: ignore[return-value]


def tracepoint_mm_fault_range(fn: _F) -> _F:
    """Trace ``handle_mm_fault_range(vma, start, end, flags)`` as ``mm_fault_range``; with
    an ``mm_fault`` probe attached, fault page by page so every page has its event."""
    @functools.wraps(fn)
    def handle_mm_fault_range(vma: Any, start: int, end: int, flags: int) -> tuple[int, int]:
        sys = vma.vm_mm.sys
        tp = sys.trace
        if not (tp.mm_fault_range or tp.mm_fault):
            return fn(vma, start, end, flags)
        before = sys.stats.counts(_HKEYS)
        if tp.mm_fault:
            ret, fail = _fault_range_per_page(vma, start, end, flags)
        else:
            ret, fail = fn(vma, start, end, flags)
        if tp.mm_fault_range:
            tp.emit(MmFaultRange(owner_pid(vma.vm_mm), start, end, flags, ret, fail,
                                 fault_handlers(sys.stats, before)))
        return ret, fail
    return handle_mm_fault_range  # type: ignore[return-value]


def _fault_range_per_page(vma: Any, start: int, end: int, flags: int) -> tuple[int, int]:
    """The page-by-page loop ``handle_mm_fault_range`` is documented to equal."""
    from .fault import VM_FAULT_ERROR, handle_mm_fault
    from .page_types import PAGE_SIZE
    for addr in range(start, end, PAGE_SIZE):
        ret = handle_mm_fault(vma, addr, flags)
        if ret & VM_FAULT_ERROR:
            return ret, addr
    return 0, end


def tracepoint_hmm_range_fault(fn: _F) -> _F:
    """Trace ``hmm_range_fault(range)`` as ``hmm_range_fault_start``/``_end``."""
    @functools.wraps(fn)
    def hmm_range_fault(r: Any, *args: Any, **kw: Any) -> int:
        # (no notifier: the unified walk's migrate path, whose mm is migrate.vma's)
        mm = r.notifier.mm if r.notifier is not None else r.migrate.vma.vm_mm
        tp = mm.sys.trace if mm is not None else None
        if not (tp and (tp.hmm_range_fault_start or tp.hmm_range_fault_end)):
            return fn(r, *args, **kw)
        pid = owner_pid(mm)
        if tp.hmm_range_fault_start:
            tp.emit(HmmRangeFaultStart(pid, r.start, r.end, r.default_flags, r.pfn_flags_mask,
                                       r.notifier_seq))
        st = mm.sys.stats
        w0, f0 = st["hmm.walk"], st["hmm.vma_fault"] + st["hmm.do_fault"]
        ret = fn(r, *args, **kw)
        if tp.hmm_range_fault_end:
            tp.emit(HmmRangeFaultEnd(pid, r.start, r.end, r.default_flags, r.pfn_flags_mask, ret,
                                     st["hmm.walk"] - w0,
                                     st["hmm.vma_fault"] + st["hmm.do_fault"] - f0))
        return ret
    return hmm_range_fault  # type: ignore[return-value]


def tracepoint_hmm_vma_fault(fn: _F) -> _F:
    """Trace ``hmm_vma_fault(addr, end, required_fault, walk)`` as ``hmm_vma_fault``."""
    @functools.wraps(fn)
    def hmm_vma_fault(addr: int, end: int, required_fault: int, walk: Any) -> int:
        tp = walk.mm.sys.trace
        if not tp.hmm_vma_fault:
            return fn(addr, end, required_fault, walk)
        ret = fn(addr, end, required_fault, walk)
        tp.emit(HmmVmaFault(owner_pid(walk.mm), addr, end, required_fault, ret))
        return ret
    return hmm_vma_fault  # type: ignore[return-value]


def tracepoint_hmm_do_fault(fn: _F) -> _F:
    """Trace ``hmm_do_fault(mm, hmm_vma_walk)`` (7.3: the span a walk callback recorded,
    faulted after the walk unwound) as ``hmm_do_fault``."""
    @functools.wraps(fn)
    def hmm_do_fault(mm: Any, hvw: Any) -> int:
        tp = mm.sys.trace
        if not tp.hmm_do_fault:
            return fn(mm, hvw)
        start, end, required = hvw.last, hvw.end, hvw.required_fault
        ret = fn(mm, hvw)
        tp.emit(HmmDoFault(owner_pid(mm), start, end, required, ret))
        return ret
    return hmm_do_fault  # type: ignore[return-value]


def tracepoint_dmirror_ioctl(fn: _F) -> _F:
    """Trace ``dmirror_fops_unlocked_ioctl(file, command, cmd, caller)`` as ``dmirror_ioctl``."""
    @functools.wraps(fn)
    def dmirror_fops_unlocked_ioctl(file: Any, command: int, cmd: Any, caller: Any) -> int:
        dmirror = file.private_data
        tp = dmirror.sys.trace if dmirror is not None else None
        if not (tp and tp.dmirror_ioctl):
            return fn(file, command, cmd, caller)
        addr, npages = cmd.addr, cmd.npages
        ret = fn(file, command, cmd, caller)
        from ..drivers.test_hmm_uapi import IOCTL_NAMES
        tp.emit(DmirrorIoctl(dmirror.mdevice.minor, IOCTL_NAMES.get(command, hex(command)), addr,
                             npages, ret, cmd.cpages if ret == 0 else 0,
                             cmd.faults if ret == 0 else 0))
        return ret
    return dmirror_fops_unlocked_ioctl  # type: ignore[return-value]
