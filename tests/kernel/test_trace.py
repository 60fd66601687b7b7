"""Tracepoints (``kernel/trace.py``): the event data of real operations, the registry
(attach/detach/record, names, subsystems, globs), and no event object built while an event
has no probe."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hmmsim import Process, System
from hmmsim.errors import BadAddress
from hmmsim.hmm.hmm import HMM_NEED_FAULT, HMM_PFN_REQ_FAULT
from hmmsim.kernel import trace as trace_mod
from hmmsim.kernel.errno import EBUSY, EFAULT
from hmmsim.kernel.fault import (
    FAULT_FLAG_REMOTE, FAULT_FLAG_UNSHARE, FAULT_FLAG_WRITE, VM_FAULT_SIGSEGV,
)
from hmmsim.kernel.fault_range import handle_mm_fault_range
from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.trace import (
    EVENTS, HmmRangeFaultEnd, MmFault, MmFaultRange, MmuNotifierInvalidateRangeStart, Trace,
)


def by_name(events: list, name: str) -> list:
    return [e for e in events if e.name == name]


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_hmm_range_fault_dread_of_untouched_memory(make_system: Callable[..., System], kernel: str) -> None:
    """A device read of 16 untouched pages: one hmm_range_fault start/end pair (2 walks,
    1 fault span, ret 0), one fault span (hmm_vma_fault inside the walk, or hmm_do_fault
    after it where the release faults outside the walk) and one mm_fault_range over exactly
    the 16 pages, served by do_anonymous_page; a second read is served by the mirror."""
    proc = make_system(kernel=kernel).spawn("t")
    a = proc.mmap(16 * P)
    d = proc.open_device(0)
    with proc.system.trace.record("hmm", "mm_fault_range") as ev:
        r = d.read(a, 16)
    assert (r.cpages, r.faults) == (16, 1)
    (s,) = by_name(ev, "hmm_range_fault_start")
    (e,) = by_name(ev, "hmm_range_fault_end")
    assert (s.start, s.end, s.default_flags) == (a, a + 16 * P, HMM_PFN_REQ_FAULT)
    assert (e.start, e.end, e.ret, e.walks, e.faults) == (a, a + 16 * P, 0, 2, 1)
    assert e.pid == s.pid == proc.task.pid
    span = "hmm_do_fault" if proc.system.profile.hmm_fault_outside_walk else "hmm_vma_fault"
    (f,) = [x for x in ev if x.name in ("hmm_vma_fault", "hmm_do_fault")]
    assert f.name == span
    assert (f.start, f.end, f.required_fault, f.ret) == (a, a + 16 * P, HMM_NEED_FAULT, -EBUSY)
    spans = by_name(ev, "mm_fault_range")
    hmm_span = [x for x in spans if x.start == a]
    assert len(hmm_span) == 1
    x = hmm_span[0]
    assert (x.end, x.ret, x.fail, x.flags) == (a + 16 * P, 0, a + 16 * P, FAULT_FLAG_REMOTE)
    assert x.handlers == {"do_anonymous_page": 16}
    assert ev.index(s) < ev.index(x) < ev.index(f) < ev.index(e), "span order: start, faults, end"
    with proc.system.trace.record("hmm", "mm_fault_range") as ev:
        d.read(a, 16)
    assert ev == [], "the driver serves the second read from its mirror: no hmm_range_fault"


def test_hmm_range_fault_error_is_traced(proc: Process) -> None:
    """A device read of unmapped memory: hmm_range_fault_end carries -EFAULT, and the
    dmirror_ioctl event the command's -EFAULT with no pages."""
    a = proc.mmap(4 * P)
    proc.munmap(a, 4 * P)
    d = proc.open_device(0)
    with proc.system.trace.record("hmm_range_fault_end", "dmirror_ioctl") as ev:
        with pytest.raises(BadAddress):
            d.read(a, 4)
    (e,) = by_name(ev, "hmm_range_fault_end")
    assert (e.start, e.ret, e.faults) == (a, -EFAULT, 0)
    (i,) = by_name(ev, "dmirror_ioctl")
    assert (i.cmd, i.addr, i.npages, i.ret, i.cpages, i.faults) == ("HMM_DMIRROR_READ", a, 4, -EFAULT, 0, 0)


def test_dmirror_ioctl_commands(proc: Process) -> None:
    """Each command is one dmirror_ioctl event with its name, range, result and counters."""
    a = proc.mmap(4 * P)
    proc.write(a, b"x" * 4 * P)
    d = proc.open_device(1)
    with proc.system.trace.record("test_hmm") as ev:
        d.read(a, 4)
        d.write(a, b"y" * 4 * P)
        d.snapshot(a, 4)
    assert [(e.device, e.cmd, e.addr, e.npages, e.ret, e.cpages) for e in ev] == [
        (1, "HMM_DMIRROR_READ", a, 4, 0, 4),
        (1, "HMM_DMIRROR_WRITE", a, 4, 0, 4),
        (1, "HMM_DMIRROR_SNAPSHOT", a, 4, 0, 4),
    ]
    assert ev[0].faults == 1 and ev[1].faults == 0


def test_munmap_is_one_unmap_notifier_event(proc: Process) -> None:
    """munmap of 2 of 8 pages: one MMU_NOTIFY_UNMAP invalidation of exactly those pages,
    start then end."""
    a = proc.mmap(8 * P)
    proc.write(a, b"z" * 8 * P)
    with proc.system.trace.record("mmu_notifier") as ev:
        proc.munmap(a + 2 * P, 2 * P)
    assert [e.name for e in ev] == ["mmu_notifier_invalidate_range_start",
                                    "mmu_notifier_invalidate_range_end"]
    s, e = ev
    assert (s.event, s.start, s.end, s.owner, s.blockable) == ("MMU_NOTIFY_UNMAP", a + 2 * P, a + 4 * P,
                                                              None, True)
    assert (e.event, e.start, e.end) == ("MMU_NOTIFY_UNMAP", a + 2 * P, a + 4 * P)
    assert s.pid == proc.task.pid


def test_exit_is_notifier_release(proc: Process) -> None:
    with proc.system.trace.record("mmu_notifier_release") as ev:
        proc.exit()
    assert len(ev) == 1 and ev[0].pid > 0


def test_mm_fault_is_per_page_and_changes_nothing(make_system: Callable[..., System]) -> None:
    """With an mm_fault probe, handle_mm_fault_range goes page by page: one event per page
    with its address, flags and handler; the machine ends in the same state with the same
    counters as without the probe (but the pte table map/write counts, which the batched
    runs make once per run)."""
    results = []
    for traced in (False, True):
        system = make_system()
        p = system.spawn("t")
        a = p.mmap(8 * P)
        p.write(a, b"a" * P)                       # page 0 present and writable
        child = p.fork()                           # page 0 now shared copy-on-write
        d = p.open_device(0)
        with system.trace.record("mm_fault" if traced else "mmu_notifier_release") as ev:
            with system.stats.measure() as delta:
                d.write(a, b"b" * 4 * P)           # page 0: COW; pages 1-3: new pages
        # the batched runs map (and write) a pte table once per run, the page-by-page loop
        # once per page: the pte_offset_map*/set_* counts differ, everything else is equal
        counts = {k: v for k, v in delta.items()
                  if not k.startswith(("pgtable.pte_offset_map", "pgtable.set_"))}
        results.append((counts, p.read(a, 5 * P), child.read(a, P)))
        if traced:
            ev = [e for e in ev if a <= e.address < a + 8 * P]   # not the driver's scratch buffer
            assert [e.address for e in ev] == [a + i * P for i in range(4)]
            e0 = ev[0]
            assert e0.flags == FAULT_FLAG_REMOTE | FAULT_FLAG_WRITE and e0.ret == 0
            assert e0.handlers == ("do_wp_page", "wp_page_copy")
            assert all(e.handlers == ("do_anonymous_page",) for e in ev[1:4])
            assert all(isinstance(e, MmFault) for e in ev)
    assert results[0] == results[1]


def test_mm_fault_range_error(proc: Process) -> None:
    """A span that fails on its first page reports that page and the vm_fault_t (a write
    with FAULT_FLAG_UNSHARE is refused by handle_mm_fault)."""
    a = proc.mmap(2 * P)
    mm = proc.mm
    vma = mm.vma_lookup(a)
    with proc.system.trace.record("mm_fault_range") as ev:
        mmap_read_lock(mm)
        try:
            ret = handle_mm_fault_range(vma, a, a + 2 * P, FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE)
        finally:
            mmap_read_unlock(mm)
    assert ret == (VM_FAULT_SIGSEGV, a)
    (x,) = ev
    assert isinstance(x, MmFaultRange)
    assert (x.start, x.end, x.fail, x.ret, x.handlers) == (a, a + 2 * P, a, VM_FAULT_SIGSEGV, {})


def test_no_event_object_is_built_without_a_probe(proc: Process, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no probe (or a probe on another event) the sites build no event object."""
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("event built while disabled")
    for mod in ("hmmsim.kernel.trace", "hmmsim.kernel.mmu_notifier"):
        for cls in ("MmFault", "MmFaultRange", "HmmRangeFaultStart", "HmmRangeFaultEnd", "HmmVmaFault",
                    "DmirrorIoctl", "MmuNotifierInvalidateRangeStart", "MmuNotifierInvalidateRangeEnd"):
            monkeypatch.setattr(f"{mod}.{cls}", boom, raising=False)
    a = proc.mmap(8 * P)
    d = proc.open_device(0)
    with proc.system.trace.record("mmu_notifier_release") as ev:
        d.read(a, 8)
        proc.write(a, b"w")
        proc.munmap(a, 8 * P)
    assert ev == []


def test_trace_registry_names_subsystems_globs() -> None:
    t = Trace()
    got: list = []
    p = t.attach(("hmm_range_fault_*", "mmu_notifier"), got.append)
    assert p.names == ("hmm_range_fault_start", "hmm_range_fault_end", "mmu_notifier_invalidate_range_start",
                       "mmu_notifier_invalidate_range_end", "mmu_notifier_release")
    assert t.enabled("hmm_range_fault_end") and not t.enabled("hmm_vma_fault")
    ev = HmmRangeFaultEnd(1, 0x1000, 0x3000, 0, 0, 0, 1, 0)
    t.emit(ev)
    assert got == [ev] and str(ev).startswith("hmm_range_fault_end: pid=1 start=0x1000 end=0x3000")
    t.detach(p)
    t.emit(ev)
    assert got == [ev] and not t.hmm_range_fault_end
    with pytest.raises(KeyError, match="hmm_range_fault_end"):
        t.attach("hmm_range_fault_ed", got.append)
    with pytest.raises(KeyError, match="no trace event"):
        t.enabled("nonsense")


def test_trace_record_ring_buffer() -> None:
    t = Trace()
    with t.record("mmu_notifier_invalidate_range_start", maxlen=2) as ev:
        for i in range(5):
            t.emit(MmuNotifierInvalidateRangeStart(1, "MMU_NOTIFY_CLEAR", i, i + 1, None, True))
    assert [e.start for e in ev] == [3, 4]
    assert not t.mmu_notifier_invalidate_range_start, "record() detaches at the end"


def test_trace_events_are_declared_with_typed_fields() -> None:
    """Every event names a subsystem; the device-migration events of the next issue are
    declared (fields fixed now) though nothing emits them yet."""
    import dataclasses
    subsystems = {c.subsystem for c in EVENTS.values()}
    assert subsystems == {"mm", "hmm", "mmu_notifier", "migrate_device", "test_hmm"}
    for name, cls in EVENTS.items():
        assert cls.name == name and dataclasses.is_dataclass(cls)
        assert all(f.type for f in dataclasses.fields(cls))
    for name in ("migrate_vma_setup", "migrate_vma_pages", "migrate_vma_finalize", "migrate_device_range",
                 "migrate_to_ram", "dmirror_devmem_evict", "hmm_do_fault"):
        assert name in EVENTS
    assert {f.name for f in dataclasses.fields(EVENTS["migrate_vma_setup"])} >= {
        "start", "end", "flags", "pgmap_owner", "npages", "cpages", "ret"}
    assert set(trace_mod.__all__) >= {c.__name__ for c in EVENTS.values()}


def test_tracepoint_hmm_do_fault_records_the_recorded_span(proc: Process) -> None:
    """The 7.3 outside-the-walk fault is traced with the span recorded before the call
    (``last``, ``end``, ``required_fault``) and its result."""
    from types import SimpleNamespace

    from hmmsim.kernel.trace import tracepoint_hmm_do_fault

    calls = []

    @tracepoint_hmm_do_fault
    def hmm_do_fault(mm: object, hvw: SimpleNamespace) -> int:
        calls.append(hvw.last)
        hvw.last = hvw.end       # the function may move the walk on
        return -EBUSY

    hvw = SimpleNamespace(last=0x1000, end=0x5000, required_fault=HMM_NEED_FAULT)
    assert hmm_do_fault(proc.mm, hvw) == -EBUSY and not proc.system.trace.hmm_do_fault
    hvw.last = 0x1000
    with proc.system.trace.record("hmm_do_fault") as ev:
        assert hmm_do_fault(proc.mm, hvw) == -EBUSY
    assert calls == [0x1000, 0x1000]
    (e,) = ev
    assert (e.pid, e.start, e.end, e.required_fault, e.ret) == (proc.task.pid, 0x1000, 0x5000, HMM_NEED_FAULT, -EBUSY)
