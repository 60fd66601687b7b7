"""``kernel/sched.py``: simulated threads run one at a time, switching at scheduling points."""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim import System
from hmmsim.kernel.locking import DeadlockError, Lock
from hmmsim.kernel.sched import Scheduler

PAGE = 4096


def _writers(seed: int | None) -> tuple[list[tuple[int, str, str, str]], bytes, int]:
    """Two threads of one process write disjoint halves of a region page by page, a third
    mprotects a neighbour region: the trace and the final data."""
    sys = System(kernel="7.3")
    p = sys.spawn("app")
    a = p.mmap(16 * PAGE)
    b = p.mmap(4 * PAGE)

    def writer(base: int, val: int) -> None:
        for i in range(8):
            p.write(a + (base + i) * PAGE, bytes([val + i]) * 16)

    with Scheduler(sys, seed=seed) as s:
        s.spawn(lambda: writer(0, 1), name="w0", task=p.task)
        s.spawn(lambda: writer(8, 101), name="w1", task=p.task)
        s.spawn(lambda: p.mprotect(b, 4 * PAGE, "r"), name="mp", task=p.task)
        s.run()
    sys.check_invariants()
    sys.ls.assert_no_locks()
    return s.trace, p.read(a, 16 * PAGE), 0


def test_default_schedule_is_reproducible_and_runs_threads_to_completion_in_order() -> None:
    t1, d1, _ = _writers(None)
    t2, d2, _ = _writers(None)
    assert t1 == t2
    runs = [name.split("/")[0] for _s, name, ev, _w in t1 if ev == "run"]
    assert runs == ["w0", "w1", "mp"]          # no preemption without a seed
    assert d1 == d2


def test_seeds_give_other_interleavings_with_the_same_final_data() -> None:
    base_trace, base_data, _ = _writers(None)
    traces = {}
    for seed in (1, 2, 3):
        tr, data, _ = _writers(seed)
        assert data == base_data
        traces[seed] = tr
        assert _writers(seed)[0] == tr        # the same seed, the same schedule
    assert any(tr != base_trace for tr in traces.values())
    assert len({tuple(tr) for tr in traces.values()}) > 1
    pages = np.frombuffer(base_data, np.uint8).reshape(16, PAGE)[:, 0]
    assert list(pages) == [1 + i for i in range(8)] + [101 + i for i in range(8)]


def test_a_thread_blocks_on_a_held_lock_and_runs_when_it_is_released() -> None:
    sys = System(kernel="7.3")
    m = Lock(sys.ls, "test_mutex")
    order: list[str] = []

    def holder() -> None:
        m.lock()
        order.append("holder locked")
        sys.ls.wait_event(lambda: len(order) >= 2, "the other thread to try")
        order.append("holder unlocks")
        m.unlock()

    def waiter() -> None:
        order.append("waiter tries")
        m.lock()
        order.append("waiter locked")
        m.unlock()

    with Scheduler(sys) as s:
        s.spawn(holder, name="holder")
        s.spawn(waiter, name="waiter")
        s.run()
    assert order == ["holder locked", "waiter tries", "holder unlocks", "waiter locked"]
    events = [(n, ev, w) for _s, n, ev, w in s.trace]
    assert ("waiter", "block", "test_mutex") in events
    sys.ls.assert_no_locks()


def test_abba_deadlock_is_reported_with_who_waits_for_what_and_locks_are_unwound() -> None:
    sys = System(kernel="7.3")
    la, lb = Lock(sys.ls, "lock_a"), Lock(sys.ls, "lock_b")

    def ab() -> None:
        with la.held():
            sys.ls.schedule_point("test")
            with lb.held():
                pass

    def ba() -> None:
        with lb.held():
            with la.held():
                pass

    with Scheduler(sys) as s:
        s.spawn(ab, name="t1")
        s.spawn(ba, name="t2")
        # t1 lets t2 run once it holds lock_a: the ABBA schedule
        def switch_once(ls, where, klass, fired=[]):  # noqa: ANN001, B006
            if where == "test" and not fired:
                fired.append(1)
                s.schedule()
        sys.ls.add_hook(switch_once)
        with pytest.raises(DeadlockError) as e:
            s.run()
        sys.ls.remove_hook(switch_once)
    msg = str(e.value)
    assert "t1 waits for lock_b (held by t2)" in msg
    assert "t2 waits for lock_a (held by t1)" in msg
    sys.ls.assert_no_locks()                 # both threads were unwound


def test_join_exceptions_and_results() -> None:
    sys = System(kernel="7.3")
    with Scheduler(sys) as s:
        child = s.spawn(lambda: 42, name="child")
        parent = s.spawn(lambda: child.join() + 1, name="parent")
        s.run()
    assert (child.result, parent.result) == (42, 43)

    with Scheduler(sys) as s:
        s.spawn(lambda: 1 // 0, name="bad")
        with pytest.raises(ZeroDivisionError):
            s.run()
    text = s.format_trace()
    assert "bad" in text and "run" in text


def test_waiting_forever_is_a_deadlock_naming_the_wait() -> None:
    sys = System(kernel="7.3")
    with Scheduler(sys) as s:
        s.spawn(lambda: sys.ls.wait_event(lambda: False, "a userfaultfd reply"), name="faulter")
        with pytest.raises(DeadlockError, match="faulter waits for a userfaultfd reply"):
            s.run()


def test_two_threads_faulting_one_new_pte_table_keep_both_pages() -> None:
    """``pmd_install()`` re-checks the pmd under the lock: when two threads fault in the
    same empty 2 MiB range at once, the second one's new table is freed, not installed over
    the first one's (which would lose a page). Found by this scheduler, seed 1."""
    sys = System(kernel="7.3")
    p = sys.spawn("app")
    a = p.mmap(16 * PAGE)
    with Scheduler(sys, seed=1) as s:
        s.spawn(lambda: p.write(a, b"\x01"), name="w0", task=p.task)
        s.spawn(lambda: p.write(a + 8 * PAGE, b"\x02"), name="w1", task=p.task)
        s.run()
    assert p.read(a, 1) == b"\x01" and p.read(a + 8 * PAGE, 1) == b"\x02"
    sys.check_invariants()
