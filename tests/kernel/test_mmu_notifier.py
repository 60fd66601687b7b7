"""MMU notifiers: the interval-notifier sequence protocol and which operations raise
which events (``mm/mmu_notifier.c``, inventory section 5)."""

from __future__ import annotations

import pytest

from hmmsim import Process
from hmmsim.kernel.errno import EINVAL, EOVERFLOW
from hmmsim.kernel.locking import DeadlockError, LockdepError
from hmmsim.kernel.mmu_notifier import (
    MmuIntervalNotifier, MmuIntervalNotifierOps, MmuNotifier, MmuNotifierEvent, MmuNotifierRange,
    mmu_interval_check_retry, mmu_interval_notifier_insert, mmu_interval_notifier_remove,
    mmu_interval_read_begin, mmu_interval_read_retry, mmu_interval_set_seq,
    mmu_notifier_invalidate_range_end, mmu_notifier_invalidate_range_start, mmu_notifier_register,
)
from hmmsim.kernel.page_types import PAGE_SIZE as P, PMD_SIZE

E = MmuNotifierEvent


class Recorder:
    """An interval notifier that records (event, start, end, owner) and sets the seq."""

    def __init__(self, mm, start: int = 0, length: int = 1 << 47) -> None:  # noqa: ANN001
        self.events: list[tuple[E, int, int, object]] = []
        self.sub = MmuIntervalNotifier(owner=self)
        assert mmu_interval_notifier_insert(self.sub, mm, start, length, MmuIntervalNotifierOps(self.cb)) == 0

    def cb(self, sub: MmuIntervalNotifier, r: MmuNotifierRange, cur_seq: int) -> bool:
        mmu_interval_set_seq(sub, cur_seq)
        self.events.append((r.event, r.start, r.end, r.owner))
        return True

    def kinds(self) -> list[E]:
        return [e[0] for e in self.events]


def test_mmu_interval_seq_protocol_example(proc: Process) -> None:
    """Inventory 5.3: idle seq 2, sub.seq 1 -> read_begin 1; an invalidation makes seq 3,
    set_seq(3); read_retry(1) is true; afterwards read_begin returns 3 and seq is 4."""
    mm = proc.mm
    seen: list[int] = []
    sub = MmuIntervalNotifier()

    def cb(s: MmuIntervalNotifier, r: MmuNotifierRange, cur: int) -> bool:
        seen.append(cur)
        mmu_interval_set_seq(s, cur)
        with pytest.raises(DeadlockError):
            mmu_interval_read_begin(s)  # would wait for the invalidation it is inside
        return True

    assert mmu_interval_notifier_insert(sub, mm, 0x1000, 0x1000, MmuIntervalNotifierOps(cb)) == 0
    subs = mm.notifier_subscriptions
    assert subs.invalidate_seq == 2 and sub.invalidate_seq == 1
    seq = mmu_interval_read_begin(sub)
    assert seq == 1 and not mmu_interval_read_retry(sub, seq)
    r = MmuNotifierRange(E.MMU_NOTIFY_CLEAR, 0, mm, 0x1000, 0x2000)
    mmu_notifier_invalidate_range_start(r)
    assert seen == [3] and subs.invalidate_seq == 3
    assert mmu_interval_read_retry(sub, seq) and mmu_interval_check_retry(sub, seq)
    mmu_notifier_invalidate_range_end(r)
    assert subs.invalidate_seq == 4
    assert mmu_interval_read_begin(sub) == 3
    mmu_interval_notifier_remove(sub)


def test_mmu_interval_notifier_only_overlapping_ranges(proc: Process) -> None:
    a = proc.mmap(8 * P)
    rec = Recorder(proc.mm, a + 4 * P, 4 * P)
    seq = mmu_interval_read_begin(rec.sub)
    proc.write(a, b"x")
    proc.mprotect(a, P, "r")  # [a, a + P): outside the interval
    assert rec.events == [] and not mmu_interval_read_retry(rec.sub, seq)
    assert proc.mm.notifier_subscriptions.invalidate_seq == 2  # no interval hit: stays even
    proc.mprotect(a + 4 * P, P, "r")
    assert rec.kinds() == [E.MMU_NOTIFY_PROTECTION_VMA] and mmu_interval_read_retry(rec.sub, seq)
    mmu_interval_notifier_remove(rec.sub)


def test_mmu_interval_notifier_insert_errors(proc: Process) -> None:
    sub = MmuIntervalNotifier()
    ops = MmuIntervalNotifierOps(lambda s, r, c: True)
    assert mmu_interval_notifier_insert(sub, proc.mm, 0, 0, ops) == -EOVERFLOW
    assert mmu_interval_notifier_insert(sub, proc.mm, 1 << 63, 1 << 63, ops) == 0  # exactly to the top
    mmu_interval_notifier_remove(sub)
    assert mmu_interval_notifier_insert(sub, proc.mm, 1 << 63, (1 << 63) + 1, ops) == -EOVERFLOW
    child = proc.fork()
    mm = child.mm
    child.exit()
    assert mmu_interval_notifier_insert(MmuIntervalNotifier(), mm, 0, P, ops) == -EINVAL


def test_mmu_interval_notifier_insert_during_invalidation_is_deferred(proc: Process) -> None:
    mm = proc.mm
    rec = Recorder(mm)
    late = MmuIntervalNotifier()
    r = MmuNotifierRange(E.MMU_NOTIFY_CLEAR, 0, mm, 0, P)
    mmu_notifier_invalidate_range_start(r)
    ops = MmuIntervalNotifierOps(lambda s, rr, c: True)
    assert mmu_interval_notifier_insert(late, mm, 0, P, ops) == 0
    subs = mm.notifier_subscriptions
    assert late.deferred == "insert" and not late.in_tree
    assert late.invalidate_seq == subs.invalidate_seq  # readers would wait for the end
    mmu_notifier_invalidate_range_end(r)
    assert late.in_tree and late.invalidate_seq != subs.invalidate_seq
    mmu_interval_notifier_remove(late)
    mmu_interval_notifier_remove(rec.sub)


def test_mmu_notifier_end_without_start_is_a_lockdep_error(proc: Process) -> None:
    r = MmuNotifierRange(E.MMU_NOTIFY_CLEAR, 0, proc.mm, 0, P)
    with pytest.raises(LockdepError):
        mmu_notifier_invalidate_range_end(r)


def test_mmu_notifier_start_under_spinlock_is_a_lockdep_error(proc: Process) -> None:
    mm = proc.mm
    r = MmuNotifierRange(E.MMU_NOTIFY_CLEAR, 0, mm, 0, P)
    with mm.page_table_lock.held():
        with pytest.raises(LockdepError):
            mmu_notifier_invalidate_range_start(r)


# -- which operation raises which event ---------------------------------------------------------------
def test_munmap_raises_unmap_over_the_request(proc: Process) -> None:
    a = proc.mmap(8 * P)
    rec = Recorder(proc.mm)
    proc.munmap(a + 2 * P, 2 * P)
    assert rec.events == [(E.MMU_NOTIFY_UNMAP, a + 2 * P, a + 4 * P, None)]


def test_mprotect_raises_protection_vma_only_with_page_tables(proc: Process) -> None:
    a = proc.mmap(8 * P)
    rec = Recorder(proc.mm)
    proc.mprotect(a, 8 * P, "r")
    assert rec.events == [], "nothing populated: no notifier (6.12: starts at the first populated pud)"
    proc.touch(a, P)
    proc.mprotect(a + 2 * P, 2 * P, "rw")
    assert rec.events == [(E.MMU_NOTIFY_PROTECTION_VMA, a + 2 * P, a + 4 * P, None)]
    proc.mprotect(a + 2 * P, 2 * P, "rw")
    assert len(rec.events) == 1, "unchanged flags: mprotect_fixup() returns early"


def test_cow_fault_raises_clear_for_one_page(proc: Process) -> None:
    a = proc.mmap(2 * P)
    proc.touch(a, 2 * P)
    rec = Recorder(proc.mm)
    proc.write(a + P, b"w")
    assert rec.events == [(E.MMU_NOTIFY_CLEAR, a + P, a + 2 * P, None)]


def test_filling_a_hole_raises_nothing(proc: Process) -> None:
    a = proc.mmap(2 * P)
    rec = Recorder(proc.mm)
    proc.write(a, b"n" * 2 * P)
    proc.write(a, b"again")  # already writable: no pte change either
    assert rec.events == []


def test_fork_raises_protection_page_on_the_parent(proc: Process) -> None:
    a = proc.mmap(4 * P)
    proc.write(a, b"f")
    b = proc.mmap(4 * P, shared=True)
    proc.write(b, b"s")
    rec = Recorder(proc.mm)
    child = proc.fork()
    vma = proc.mm.vma_lookup(a)
    assert rec.events == [(E.MMU_NOTIFY_PROTECTION_PAGE, vma.vm_start, vma.vm_end, None)], \
        "only COW mappings with anon pages are copied (and notified)"
    child.exit()


def test_madvise_dontneed_raises_clear(proc: Process) -> None:
    a = proc.mmap(4 * P)
    proc.write(a, b"d" * 4 * P)
    rec = Recorder(proc.mm)
    proc.madvise(a + P, 2 * P, "dontneed")
    assert rec.events == [(E.MMU_NOTIFY_CLEAR, a + P, a + 3 * P, None)]


def test_thp_split_raises_clear_over_2mib(make_system) -> None:
    """6.12: a write to the huge zero page splits the pmd (CLEAR of 2 MiB), then COWs one
    page (CLEAR of 4 KiB); 7.3's ``do_huge_zero_wp_pmd`` raises only the 2 MiB CLEAR."""
    p = make_system(kernel="6.12").spawn()
    base = p.mmap(4 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(a, PMD_SIZE, "hugepage")
    p.touch(a, P)  # huge zero page
    rec = Recorder(p.mm)
    p.write(a + 3 * P, b"x")
    assert rec.kinds() == [E.MMU_NOTIFY_CLEAR, E.MMU_NOTIFY_CLEAR]
    assert rec.events[0][1:3] == (a, a + PMD_SIZE) and rec.events[1][1:3] == (a + 3 * P, a + 4 * P)
    p = make_system(kernel="7.3").spawn()
    base = p.mmap(4 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(a, PMD_SIZE, "hugepage")
    p.touch(a, P)
    rec = Recorder(p.mm)
    p.write(a + 3 * P, b"x")
    assert rec.kinds() == [E.MMU_NOTIFY_CLEAR]
    assert rec.events[0][1:3] == (a, a + PMD_SIZE)


def test_exit_raises_release_then_unmap(proc: Process) -> None:
    child = proc.fork()
    child.mmap(P)
    rec = Recorder(child.mm)
    child.exit()
    assert rec.kinds() == [E.MMU_NOTIFY_RELEASE, E.MMU_NOTIFY_UNMAP]
    assert rec.events[0][1:3] == (0, (1 << 64) - 1)


def test_mremap_raises_unmap_on_the_old_range(proc: Process) -> None:
    a = proc.mmap(4 * P)
    proc.write(a, b"r" * 4 * P)
    rec = Recorder(proc.mm)
    new = proc.mremap(a, 4 * P, 4 * P, new_addr=a + (1 << 30))
    assert [(e[0], e[1], e[2]) for e in rec.events] == [(E.MMU_NOTIFY_UNMAP, a, a + 4 * P)] * 2
    assert proc.read(new, 4) == b"rrrr"


def test_classic_mmu_notifier_sees_start_end_and_release(proc: Process) -> None:
    log: list[str] = []
    mn = MmuNotifier(invalidate_range_start=lambda r: log.append(f"start {r.event.name}") or 0,
                     invalidate_range_end=lambda r: log.append(f"end {r.event.name}"),
                     release=lambda mm: log.append("release"))
    child = proc.fork()
    assert mmu_notifier_register(mn, child.mm) == 0
    a = child.mmap(P)
    child.munmap(a, P)
    child.exit()
    # after ->release the subscription is unhooked: exit's own unmap is not seen
    assert log == ["start MMU_NOTIFY_UNMAP", "end MMU_NOTIFY_UNMAP", "release"]




def test_lockstate_recursive_read_of_rwsem_warns_and_succeeds() -> None:
    """A second down_read() of an rwsem held for read completes (the kernel does) but is
    recorded as lockdep's "possible recursive locking" report; write recursion and
    recursion on a spinlock stay errors."""
    from hmmsim.kernel.locking import READ, Lock, LockState
    from hmmsim.kernel.stats import Stats
    ls = LockState(Stats())
    sem = Lock(ls, "hugetlb_vma_lock")
    sem.down_read()
    sem.down_read()
    assert len(ls.warnings) == 1 and "recursive locking" in ls.warnings[0]
    assert "hugetlb_vma_lock" in ls.warnings[0]
    sem.up_read()
    assert ls.is_locked(sem)
    sem.up_read()
    ls.assert_no_locks()
    with pytest.raises(LockdepError):
        sem.down_write()
        sem.down_write()
    sem.up_write()
    spin = Lock(ls, "ptl", sleepable=False)
    ls.acquire(spin, "ptl", READ, sleepable=False)
    with pytest.raises(LockdepError):
        ls.acquire(spin, "ptl", READ, sleepable=False)
    spin.unlock()
    ls.assert_no_locks()


def test_mn_itree_invalidate_two_pass_finish_after_every_first_pass(make_system) -> None:  # noqa: ANN001
    """7.3 (``mmu_interval_two_pass``): ``invalidate_start`` of every overlapping
    subscription runs first, then the finish passes in the same order; a subscription
    whose ``invalidate_start`` returns no finish object gets no second pass; classic
    ``invalidate`` subscriptions still work next to them."""
    from hmmsim.kernel.mmu_notifier import MmuIntervalNotifierFinish
    p = make_system(kernel="7.3").spawn()
    mm = p.mm
    log: list[str] = []

    def two_pass(name: str, finish: bool) -> MmuIntervalNotifierOps:
        def start(s: MmuIntervalNotifier, r: MmuNotifierRange, cur: int):  # noqa: ANN202
            mmu_interval_set_seq(s, cur)
            log.append(f"start {name}")
            return True, (MmuIntervalNotifierFinish() if finish else None)

        def fin(f: MmuIntervalNotifierFinish) -> None:
            assert f.notifier is subs[name]
            log.append(f"finish {name}")
        return MmuIntervalNotifierOps(invalidate_start=start, invalidate_finish=fin)

    subs = {n: MmuIntervalNotifier() for n in ("a", "b", "c")}
    assert mmu_interval_notifier_insert(subs["a"], mm, 0x1000, 0x1000, two_pass("a", True)) == 0
    assert mmu_interval_notifier_insert(subs["b"], mm, 0x1000, 0x1000, two_pass("b", False)) == 0

    def classic(s: MmuIntervalNotifier, r: MmuNotifierRange, cur: int) -> bool:
        mmu_interval_set_seq(s, cur)
        log.append("invalidate c")
        return True
    assert mmu_interval_notifier_insert(subs["c"], mm, 0x1000, 0x1000, MmuIntervalNotifierOps(classic)) == 0
    r = MmuNotifierRange(E.MMU_NOTIFY_CLEAR, 0, mm, 0x1000, 0x2000)
    mmu_notifier_invalidate_range_start(r)
    assert sorted(log[:3]) == ["invalidate c", "start a", "start b"] and log[3:] == ["finish a"]
    mmu_notifier_invalidate_range_end(r)
    for s in subs.values():
        assert mmu_interval_read_retry(s, 1)
        mmu_interval_notifier_remove(s)


def test_mmu_interval_ops_invalidate_start_does_not_exist_in_6_12(make_system) -> None:  # noqa: ANN001
    p = make_system(kernel="6.12").spawn()
    ops = MmuIntervalNotifierOps(invalidate_start=lambda s, r, c: (True, None),
                                 invalidate_finish=lambda f: None)
    with pytest.raises(TypeError):
        mmu_interval_notifier_insert(MmuIntervalNotifier(), p.mm, 0x1000, 0x1000, ops)
    p7 = make_system(kernel="7.3").spawn()
    with pytest.raises(ValueError):
        mmu_interval_notifier_insert(MmuIntervalNotifier(), p7.mm, 0x1000, 0x1000,
                                     MmuIntervalNotifierOps(invalidate_start=lambda s, r, c: (True, None)))
