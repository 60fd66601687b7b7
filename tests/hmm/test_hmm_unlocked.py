"""7.3's ``hmm_range_fault_unlocked_timeout()`` and ``handle_userfault()``: a range fault that
may drop mmap_lock, answered by a userfaultfd handler thread, beside the locked variant."""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim import System
from hmmsim.hmm.hmm import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_VALID,
    HmmRange,
    hmm_range_fault,
    hmm_range_fault_unlocked_timeout,
)
from hmmsim.hmm.mirror import HmmMirror
from hmmsim.kernel.errno import EBUSY, EFAULT, EINTR
from hmmsim.kernel.locking import DeadlockError
from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.mmu_notifier import mmu_interval_read_begin
from hmmsim.kernel.sched import Scheduler
from hmmsim.kernel.task import vm_munmap
from hmmsim.kernel.userfaultfd import (
    O_NONBLOCK,
    UFFDIO_API,
    UFFDIO_COPY,
    UFFDIO_REGISTER,
    UFFDIO_ZEROPAGE,
    UffdioApi,
    UffdioCopy,
    UffdioRange,
    UffdioRegister,
    UffdioZeropage,
    new_userfaultfd,
    userfaultfd_poll,
    userfaultfd_read,
)

P = 4096


def _setup(npages: int = 4):
    sys = System(kernel="7.3")
    p = sys.spawn("app")
    a = p.mmap(npages * P)
    t = p.task
    with t.running():
        fd = new_userfaultfd(t, O_NONBLOCK)
        assert t.ioctl(fd, UFFDIO_API, UffdioApi()) == 0
        assert t.ioctl(fd, UFFDIO_REGISTER, UffdioRegister(UffdioRange(a, npages * P))) == 0
    return sys, p, a, fd


def _handler(sys, p, fd, answered: list[int], zero: bool = False):
    t = p.task
    f = t.fget(fd)
    page = p.mmap(P)

    def body() -> None:
        while True:
            sys.ls.wait_event(lambda: userfaultfd_poll(f), "poll(userfaultfd)")
            msg = userfaultfd_read(f)
            answered.append(msg.address)
            if zero:
                assert t.ioctl(fd, UFFDIO_ZEROPAGE, UffdioZeropage(UffdioRange(msg.address, P))) == 0
            else:
                p.write(page, bytes([len(answered)]) * P)
                cp = UffdioCopy(dst=msg.address, src=page, len=P)
                assert t.ioctl(fd, UFFDIO_COPY, cp) == 0 and cp.copy == P
    return body


def test_unlocked_range_fault_is_answered_by_a_userfaultfd_handler_and_the_locked_one_fails() -> None:
    sys, p, a, fd = _setup()
    m = HmmMirror(p.mm)
    # the locked hmm_range_fault cannot drop mmap_lock: handle_userfault gives SIGBUS -> -EFAULT
    r = HmmRange(notifier=m.notifier, start=a, end=a + 4 * P, hmm_pfns=np.zeros(4, np.uint64),
                 default_flags=HMM_PFN_REQ_FAULT)
    with p.task.running():
        r.notifier_seq = mmu_interval_read_begin(r.notifier)
        mmap_read_lock(p.mm)
        try:
            assert hmm_range_fault(r) == -EFAULT
        finally:
            mmap_read_unlock(p.mm)
    assert sys.stats["uffd.sigbus_no_retry"] == 1
    # the unlocked one sleeps in handle_userfault until the handler's UFFDIO_COPY
    answered: list[int] = []
    with Scheduler(sys) as s:
        s.spawn(_handler(sys, p, fd, answered), name="handler", task=p.task, daemon=True)
        main = s.spawn(lambda: hmm_range_fault_unlocked_timeout(r, 0), thread=p.task.thread)
        s.run()
    assert main.result == 0
    assert answered == [a + i * P for i in range(4)]
    assert all(int(v) & HMM_PFN_VALID for v in r.hmm_pfns)
    assert [p.read(a + i * P, 1)[0] for i in range(4)] == [1, 2, 3, 4]
    blocks = [ev for _s, n, ev, w in s.trace if ev == "block" and "handle_userfault" in w]
    assert len(blocks) == 4           # one sleep per page: the fault retries after each answer
    sys.ls.assert_no_locks()
    m.remove()


def test_zeropage_answers_with_the_zero_page() -> None:
    sys, p, a, fd = _setup(2)
    answered: list[int] = []
    with Scheduler(sys) as s:
        s.spawn(_handler(sys, p, fd, answered, zero=True), name="handler", task=p.task, daemon=True)
        main = s.spawn(lambda: p.read(a, 2 * P), thread=p.task.thread)
        s.run()
    assert main.result == bytes(2 * P) and len(answered) == 2
    pfn = p.mm.sys.mem.zero_pfn
    from hmmsim.kernel.cpu import translate
    with p.task.running():
        assert translate(p.mm, a, False) == pfn          # the zero page is mapped    sys.check_invariants()


def test_a_fault_with_nobody_to_answer_is_a_deadlock() -> None:
    sys, p, a, fd = _setup(1)
    with Scheduler(sys) as s:
        s.spawn(lambda: p.read(a, 1), thread=p.task.thread)
        with pytest.raises(DeadlockError, match="waits for a userfaultfd reply"):
            s.run()
    sys.ls.assert_no_locks()


def _always_invalidated(sys, p, a, budget: list[int]):
    """A scheduling-point hook that invalidates the range while the caller takes mmap_lock
    (after ``mmu_interval_read_begin()``, before the walk's sequence check), *budget* times:
    every such attempt is -EBUSY inside and retried."""
    from hmmsim.kernel.mmu_notifier import MmuNotifierEvent, notify_range

    def hook(ls, where, klass) -> None:
        if klass == "mmap_lock" and budget[0] > 0 and not getattr(hook, "busy", False):
            budget[0] -= 1
            hook.busy = True
            try:
                with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, p.mm, a, a + P):
                    pass
            finally:
                hook.busy = False
    return hook


@pytest.mark.parametrize("timeout, expect", [(3, -EBUSY), (0, 0)])
def test_timeout_is_a_retry_budget(timeout: int, expect: int) -> None:
    sys = System(kernel="7.3")
    p = sys.spawn("app")
    a = p.mmap(2 * P)
    p.write(a, b"x")
    m = HmmMirror(p.mm)
    r = HmmRange(notifier=m.notifier, start=a, end=a + P, hmm_pfns=np.zeros(1, np.uint64),
                 default_flags=HMM_PFN_REQ_FAULT)
    budget = [10]
    hook = _always_invalidated(sys, p, a, budget)
    sys.ls.add_hook(hook)
    try:
        with p.task.running():
            ret = hmm_range_fault_unlocked_timeout(r, timeout)
    finally:
        sys.ls.remove_hook(hook)
    assert ret == expect
    if timeout:
        # one jiffy per attempt: timeout + 1 attempts, each invalidated, then the deadline
        assert sys.stats["hmm.range_fault.timeout"] == 1
        assert sys.stats["hmm.range_fault"] == timeout + 1
        assert sys.stats["hmm.range_fault.ebusy"] == timeout + 1
    else:
        assert budget[0] == 0 and int(r.hmm_pfns[0]) & HMM_PFN_VALID
    sys.ls.assert_no_locks()
    m.remove()


def test_fatal_signal_and_unstable_mm() -> None:
    sys = System(kernel="7.3")
    p = sys.spawn("app")
    a = p.mmap(P)
    m = HmmMirror(p.mm)
    r = HmmRange(notifier=m.notifier, start=a, end=a + P, hmm_pfns=np.zeros(1, np.uint64),
                 default_flags=HMM_PFN_REQ_FAULT)
    with p.task.running():
        p.task.sigkill_pending = True
        assert hmm_range_fault_unlocked_timeout(r, 0) == -EINTR
        p.task.sigkill_pending = False
        p.mm.mmf_unstable = True
        assert hmm_range_fault_unlocked_timeout(r, 0) == -EFAULT
    sys.ls.assert_no_locks()
    m.remove()


def test_fork_child_is_not_registered_and_munmap_keeps_state_sane() -> None:
    sys, p, a, fd = _setup(4)
    child = p.fork()
    assert child.read(a, 4 * P) == bytes(4 * P)       # plain zero-fill faults in the child
    child.exit()
    with p.task.running():
        assert vm_munmap(p.mm, a, 4 * P) == 0
    sys.check_invariants()
