"""dmirror's ioctls when something under them raises: the caller sees the original
exception, and no lock (``mmap_lock``, the mirror mutex) or mm reference is left behind
(``lib/test_hmm.c`` paths: ``dmirror_fault`` -> ``dmirror_range_fault`` ->
``hmm_range_fault`` -> ``handle_mm_fault``; ``dmirror_snapshot`` ->
``dmirror_range_snapshot``)."""

from __future__ import annotations

import pytest

from hmmsim import Process
from hmmsim.kernel.page_types import PAGE_SIZE as P


class Injected(RuntimeError):
    """The fault a test injects."""


def _raise(*_a: object, **_k: object) -> None:
    raise Injected("injected fault")


def _clean(proc: Process, users: int) -> None:
    sys = proc.system
    sys.ls.assert_no_locks()
    assert proc.mm.mm_users == users, "dmirror_fault's mmget_not_zero() reference leaked"
    assert sum(sys.notifier_active.values()) == 0
    sys.check_invariants()


def test_dmirror_read_over_a_raising_fault_unwinds(proc: Process, monkeypatch) -> None:
    a = proc.mmap(8 * P)
    proc.write(a, b"r" * 4 * P)  # pages 4..7 are untouched: the READ must fault them
    d = proc.open_device(0)
    users = proc.mm.mm_users
    monkeypatch.setattr("hmmsim.hmm.hmm.handle_mm_fault_range", _raise)
    with pytest.raises(Injected, match="injected fault"):
        d.read(a, 8)
    _clean(proc, users)
    monkeypatch.undo()
    r = d.read(a, 8)
    assert r.cpages == 8 and bytes(r.data[:2]) == b"rr" and not r.data[4 * P:].any()
    d.close()


def test_dmirror_write_over_a_raising_fault_unwinds(proc: Process, monkeypatch) -> None:
    a = proc.mmap(4 * P)
    d = proc.open_device(0)
    users = proc.mm.mm_users
    monkeypatch.setattr("hmmsim.hmm.hmm.handle_mm_fault_range", _raise)
    with pytest.raises(Injected):
        d.write(a, b"w" * 4 * P)
    _clean(proc, users)
    monkeypatch.undo()
    assert d.write(a, b"w" * 4 * P).cpages == 4 and proc.read(a, 2) == b"ww"
    d.close()


def test_dmirror_snapshot_over_a_raising_walk_unwinds(proc: Process, monkeypatch) -> None:
    """The snapshot's temporary interval notifier is removed too."""
    a = proc.mmap(4 * P)
    proc.write(a, b"s" * 4 * P)
    d = proc.open_device(0)
    users = proc.mm.mm_users
    nsubs = len(proc.mm.notifier_subscriptions.itree)
    monkeypatch.setattr("hmmsim.drivers.dmirror_mirror.hmm_range_fault", _raise)
    with pytest.raises(Injected):
        d.snapshot(a, 4)
    _clean(proc, users)
    assert len(proc.mm.notifier_subscriptions.itree) == nsubs
    monkeypatch.undo()
    assert len(d.snapshot(a, 4)) == 4
    d.close()
