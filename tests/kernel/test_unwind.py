"""A failed kernel call changes nothing: when a callback raises (a notifier's
``invalidate``, a pagemap's ``migrate_to_ram``, a fault handler), the exception the
caller sees is the original one, no lock stays held, no reference stays taken and no
notifier invalidation stays open (the fixtures check ``assert_no_locks()`` and
``check_invariants()`` after every test; the tests check them at the failure too).

Faults are injected by monkeypatching the function a path reaches, or by a callback
that raises :class:`Injected` while ``armed``."""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim import Process
from hmmsim.hmm.hmm import HMM_PFN_REQ_FAULT
from hmmsim.hmm.mirror import HmmMirror
from hmmsim.kernel.folio import folio_put
from hmmsim.kernel.migrate import migrate_folio_move, migrate_folio_unmap
from hmmsim.kernel.mmu_notifier import MmuIntervalNotifier, MmuNotifierRange, mmu_interval_set_seq
from hmmsim.kernel.page_types import PAGE_SIZE, PMD_SIZE
from hmmsim.kernel.pagemap import folio_test_locked
from hmmsim.kernel.pgtable import pte_pfn, pte_present

from ..hmm.test_hmm import _HandMigrated

P = PAGE_SIZE


class Injected(RuntimeError):
    """The fault a test injects."""


def _raise(*_a: object, **_k: object) -> None:
    raise Injected("injected")


class RaisingMirror(HmmMirror):
    """An HMM mirror whose ``invalidate`` raises while :attr:`armed`."""

    armed = False

    def _invalidate(self, sub: MmuIntervalNotifier, r: MmuNotifierRange, cur_seq: int) -> bool:
        if self.armed:
            with self.lock.held():  # raise with the driver's lock held: it must unwind too
                raise Injected(f"invalidate of {r.start:#x}")
        return super()._invalidate(sub, r, cur_seq)


def _clean(proc: Process) -> None:
    sys = proc.system
    sys.ls.assert_no_locks()
    assert sum(sys.notifier_active.values()) == 0, "an invalidate_range_start was left open"
    subs = proc.mm.notifier_subscriptions
    if subs is not None:
        assert subs.active_invalidate_ranges == 0 and not subs.is_invalidating()
    sys.check_invariants()


def test_mmu_notifier_invalidate_range_start_unwinds_a_raising_invalidate(proc: Process) -> None:
    a = proc.mmap(4 * P)
    proc.write(a, b"n" * 4 * P)
    m = RaisingMirror(proc.mm)
    m.armed = True
    vmas_before = [(v.vm_start, v.vm_end, v.vm_flags) for v in proc.mm.vmas()]
    with pytest.raises(Injected, match="invalidate"):
        proc.mprotect(a + P, 2 * P, "r")
    _clean(proc)
    # the call changed nothing: the VMA has its flags back and is one VMA again
    assert [(v.vm_start, v.vm_end, v.vm_flags) for v in proc.mm.vmas()] == vmas_before
    m.armed = False
    proc.write(a + P, b"w")  # still writable
    # the notifier machinery is usable again
    proc.mprotect(a, 4 * P, "r")
    assert m.invalidations and proc.read(a, 2) == b"nn" and proc.read(a + P, 2) == b"wn"
    m.remove()
    _clean(proc)


def test_try_to_migrate_raising_notifier_unlocks_and_restores_the_folio(proc: Process) -> None:
    """``migrate_folio_unmap()``: the folio lock and the isolation reference are dropped
    and the mapping is left as it was."""
    a = proc.mmap(P)
    proc.write(a, b"q")
    pte = proc.mm.lookup_pte(a)
    pfn = pte_pfn(pte)
    refs = int(proc.system.mem.refcount[pfn])
    m = RaisingMirror(proc.mm)
    m.armed = True
    with pytest.raises(Injected):
        migrate_folio_unmap(proc.system, pfn)
    assert not folio_test_locked(proc.system, pfn)
    assert int(proc.system.mem.refcount[pfn]) == refs
    assert proc.mm.lookup_pte(a) == pte
    _clean(proc)
    m.armed = False
    ticket = migrate_folio_unmap(proc.system, pfn)
    assert ticket is not None
    assert migrate_folio_move(proc.system, ticket) != pfn and proc.read(a, 1) == b"q"
    m.remove()


def test_do_swap_page_raising_migrate_to_ram_drops_its_reference(proc: Process) -> None:
    a = proc.mmap(2 * P)
    proc.write(a, b"d" * 2 * P)
    dev = _HandMigrated(proc, a)
    refs = int(proc.system.mem.refcount[dev.dpfn])
    real = dev._migrate_to_ram
    dev.pgmap.ops.migrate_to_ram = _raise
    with pytest.raises(Injected):
        proc.read(a, 1)
    assert int(proc.system.mem.refcount[dev.dpfn]) == refs, "the fault's page reference leaked"
    proc.system.ls.assert_no_locks()
    dev.pgmap.ops.migrate_to_ram = real
    assert proc.read(a, 2) == b"dd" and dev.calls == 1


def test_hmm_range_fault_raising_fault_releases_mmap_lock(proc: Process, monkeypatch) -> None:
    a = proc.mmap(8 * P)
    m = HmmMirror(proc.mm)
    monkeypatch.setattr("hmmsim.hmm.hmm.handle_mm_fault_range", _raise)
    with pytest.raises(Injected):
        m.range_fault(a, a + 8 * P, default_flags=HMM_PFN_REQ_FAULT)
    _clean(proc)
    monkeypatch.undo()
    ret, pfns = m.range_fault(a, a + 8 * P, default_flags=HMM_PFN_REQ_FAULT)
    assert ret == 0 and (pfns != 0).all()
    m.remove()


def test_hmm_vma_walk_hugetlb_entry_raising_fault_releases_hugetlb_locks(make_system, monkeypatch) -> None:
    p = make_system().spawn()
    a = p.mmap(PMD_SIZE, "rw", hugetlb=True)
    p.write(a + PMD_SIZE - 1, b"")  # nothing: the pmd table appears on the first fault
    m = HmmMirror(p.mm)
    monkeypatch.setattr("hmmsim.hmm.hmm.handle_mm_fault_range", _raise)
    with pytest.raises(Injected):
        m.range_fault(a, a + PMD_SIZE, default_flags=HMM_PFN_REQ_FAULT)
    _clean(p)
    monkeypatch.undo()
    ret, pfns = m.range_fault(a, a + PMD_SIZE, default_flags=HMM_PFN_REQ_FAULT)
    assert ret == 0 and (pfns != 0).all()
    m.remove()


def test_exit_mmap_raising_notifier_releases_mmap_lock(make_system) -> None:
    sys = make_system()
    p = sys.spawn()
    a = p.mmap(4 * P)
    p.write(a, b"e" * 4 * P)
    m = RaisingMirror(p.mm)
    m.armed = True
    with pytest.raises(Injected):
        p.exit()
    sys.ls.assert_no_locks()
    m.armed = False
