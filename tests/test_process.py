"""The friendly Process/Device API: argument checks, exited processes, OOM."""

from __future__ import annotations

import pytest

from hmmsim import InvalidArgument, Killed, NoSuchProcess, SegmentationFault
from hmmsim.kernel.errno import EINVAL, ESRCH
from hmmsim.kernel.page_types import PAGE_SIZE as P


def _state(system) -> tuple:  # noqa: ANN001
    """What a refused call must not change: frames in use, address spaces, VMAs."""
    mem = system.mem
    return (mem.nr_free, len(system.mms), len(system.tasks),
            [[(v.vm_start, v.vm_end) for v in mm.vma_list()] for mm in system.mms])


def test_munmap_negative_length_is_einval_and_unmaps_nothing(proc) -> None:  # noqa: ANN001
    a = proc.mmap(8 * P)
    proc.write(a, b"z" * (8 * P))
    with pytest.raises(InvalidArgument) as ei:
        proc.munmap(a + 2 * P, -P)
    assert ei.value.errno == EINVAL
    assert proc.read(a + 7 * P, 1) == b"z"


def test_every_call_on_an_exited_process_is_esrch(system) -> None:  # noqa: ANN001
    p = system.spawn()
    a = p.mmap(4 * P)
    p.write(a, b"data")
    fd = p.open_tmpfile(P)
    dev = p.open_device(0)
    p.exit()
    before = _state(system)
    calls = {
        "mmap": lambda: p.mmap(P), "munmap": lambda: p.munmap(a, P),
        "mprotect": lambda: p.mprotect(a, P, "r"), "madvise": lambda: p.madvise(a, P, "dontneed"),
        "mremap": lambda: p.mremap(a, P, 2 * P), "numa_hint": lambda: p.numa_hint(a, P),
        "read": lambda: p.read(a, 4), "write": lambda: p.write(a, b"x"),
        "read_array": lambda: p.read_array(a, 1), "write_array": lambda: p.write_array(a, [1]),
        "touch": lambda: p.touch(a, P), "pte": lambda: p.pte(a),
        "open_tmpfile": lambda: p.open_tmpfile(P), "pwrite": lambda: p.pwrite(fd, b"x", 0),
        "pread": lambda: p.pread(fd, 1, 0), "ftruncate": lambda: p.ftruncate(fd, 0),
        "close": lambda: p.close(fd), "open_device": lambda: p.open_device(0),
        "fork": lambda: p.fork(), "exit": lambda: p.exit(),
        "dev.read": lambda: dev.read(a, 1), "dev.write": lambda: dev.write(a, bytes(P)),
        "dev.snapshot": lambda: dev.snapshot(a, 1), "dev.check_exclusive": lambda: dev.check_exclusive(a, 1),
        "dev.close": lambda: dev.close(),
    }
    for name, call in calls.items():
        with pytest.raises(NoSuchProcess) as ei:
            call()
        assert ei.value.errno == ESRCH, name
        assert _state(system) == before, name
    assert p.exited and "exited" in repr(p)


def test_write_out_of_memory_is_sigkill_and_the_process_is_gone(make_system) -> None:  # noqa: ANN001
    system = make_system(ram=64 << 20, hugetlb_pages=0)
    hog, victim = system.spawn(), system.spawn()
    a = hog.mmap(60 << 20)
    hog.write(a, bytes(60 << 20))
    b = victim.mmap(60 << 20)
    with pytest.raises(Killed) as ei:
        victim.write(b, bytes(60 << 20))
    assert ei.value.signal == 9 and not isinstance(ei.value, SegmentationFault)
    assert victim.exited and not hog.exited
    with pytest.raises(NoSuchProcess):
        victim.read(b, 1)
    assert hog.read(a + (60 << 20) - 1, 1) == b"\0"
    assert system.mem.nr_free > 0  # the victim's frames went back


@pytest.mark.parametrize("call, argname", [
    (lambda p, a: p.read(a, -1), "n"),
    (lambda p, a: p.read_array(a, -2), "count"),
    (lambda p, a: p.touch(a, -P), "length"),
    (lambda p, a: p.numa_hint(a, -P), "length"),
    (lambda p, a: p.madvise(a, P, "willneed"), "willneed"),
    (lambda p, a: p.mprotect(a, P, "rq"), "protection"),
    (lambda p, a: p.mmap(P, prot=["r"]), "protection"),
    (lambda p, a: p.pread(p.open_tmpfile(P), -1, 0), "n"),
    (lambda p, a: p.pwrite(p.open_tmpfile(P), b"x", -5), "offset"),
    (lambda p, a: p.open_device(0).read(a, -1), "npages"),
    (lambda p, a: p.open_device(0).snapshot(a, -3), "npages"),
    (lambda p, a: p.open_device(0).write(a, b"abc"), "whole pages"),
])
def test_bad_arguments_are_einval_naming_the_argument(proc, call, argname: str) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    proc.write(a, b"keep")
    with pytest.raises(InvalidArgument) as ei:
        call(proc, a)
    assert ei.value.errno == EINVAL and argname in str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert proc.read(a, 4) == b"keep"


def test_hmm_mirror_range_fault_start_after_end_einval(proc) -> None:  # noqa: ANN001
    from hmmsim.hmm.mirror import HmmMirror
    a = proc.mmap(4 * P)
    m = HmmMirror(proc.mm)
    ret, pfns = m.range_fault(a + 2 * P, a)
    assert ret == -EINVAL and len(pfns) == 0
    m.remove()


def test_mmu_interval_notifier_insert_negative_length_eoverflow(proc) -> None:  # noqa: ANN001
    from hmmsim.kernel.errno import EOVERFLOW
    from hmmsim.kernel.mmu_notifier import MmuIntervalNotifier, MmuIntervalNotifierOps, mmu_interval_notifier_insert
    a = proc.mmap(4 * P)
    sub = MmuIntervalNotifier()
    assert mmu_interval_notifier_insert(sub, proc.mm, a, -P, MmuIntervalNotifierOps(lambda *x: True)) == -EOVERFLOW


def test_device_buffer_out_of_memory_is_sigkill(make_system) -> None:  # noqa: ANN001
    """Filling the device command's buffer is a CPU write in the process: out of memory,
    the OOM killer ends the process (it used to trip an assertion)."""
    system = make_system(ram=64 << 20, hugetlb_pages=0)
    hog, victim = system.spawn(), system.spawn()
    a = hog.mmap(60 << 20)
    b = victim.mmap(8 << 20)
    dev = victim.open_device(0)
    hog.write(a, bytes(58 << 20))
    with pytest.raises(Killed):
        dev.write(b, bytes(8 << 20))
    assert victim.exited and not hog.exited
    with pytest.raises(NoSuchProcess):
        dev.read(b, 1)
