"""The dmirror device (``lib/test_hmm.c``, 6.12): READ, WRITE, SNAPSHOT, CHECK_EXCLUSIVE,
FLAGS, invalidation, open/close/mmap and the exact counters and error rules."""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim import Process
from hmmsim.drivers.dmirror import DmirrorPT, dmirror_open
from hmmsim.drivers.test_hmm_uapi import (
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_READ_UNLOCKED,
    HmmDmirrorCmd,
)
from hmmsim.errors import BadAddress, InvalidArgument, NoDevice, PermissionDenied
from hmmsim.kernel.errno import EBADF, EFAULT, EINVAL, ENODEV, ENOMEM, ENOTTY
from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.mmu_notifier import MmuNotifierEvent, notify_range
from hmmsim.kernel.page_types import PAGE_SIZE as P

R, W, Z = HMM_DMIRROR_PROT_READ, HMM_DMIRROR_PROT_WRITE, HMM_DMIRROR_PROT_ZERO


def pattern(n_pages: int, seed: int = 0) -> bytes:
    return (np.arange(n_pages * P // 4, dtype=np.uint32) + seed).tobytes()


def test_dmirror_read_faults_once_and_counts_pages(proc: Process) -> None:
    a = proc.mmap(8 * P)
    proc.write(a, pattern(8))
    d = proc.open_device(0)
    r = d.read(a, 8)
    assert (r.cpages, r.faults) == (8, 1) and r.data.tobytes() == pattern(8)
    r = d.read(a, 8)
    assert (r.cpages, r.faults) == (8, 0), "the mirror still holds every page"
    d.close()


def test_dmirror_read_of_hole_is_efault_and_counters_untouched(proc: Process) -> None:
    a = proc.mmap(4 * P)
    proc.munmap(a + 2 * P, P)
    d = proc.open_device(0)
    cmd = HmmDmirrorCmd(addr=a, ptr=proc.mmap(4 * P), npages=4, cpages=77, faults=88)
    assert d.ioctl(HMM_DMIRROR_READ, cmd) == -EFAULT
    assert (cmd.cpages, cmd.faults) == (77, 88), "on error the command is not copied back"
    with pytest.raises(BadAddress):
        d.read(a, 4)
    d.close()


def test_dmirror_ioctl_rejects_unaligned_and_empty(proc: Process) -> None:
    a = proc.mmap(P)
    d = proc.open_device(0)
    assert d.ioctl(HMM_DMIRROR_READ, HmmDmirrorCmd(addr=a + 8, npages=1)) == -EINVAL
    assert d.ioctl(HMM_DMIRROR_READ, HmmDmirrorCmd(addr=a, npages=0)) == -EINVAL
    assert d.ioctl(HMM_DMIRROR_READ, HmmDmirrorCmd(addr=(1 << 64) - P, npages=2)) == -EINVAL  # wraps
    assert d.ioctl(0xC0284899, HmmDmirrorCmd(addr=a, npages=1)) == -EINVAL
    with pytest.raises(InvalidArgument):
        d.read(a + 8, 1)
    d.close()


def test_dmirror_read_too_big_for_the_bounce_buffer_is_enomem(proc: Process) -> None:
    d = proc.open_device(0)
    npages = proc.system.mem.totalram_pages + 1
    assert d.ioctl(HMM_DMIRROR_READ, HmmDmirrorCmd(addr=1 << 40, npages=npages)) == -ENOMEM
    d.close()


def test_dmirror_write_to_read_only_mapping_is_eperm(proc: Process) -> None:
    a = proc.mmap(4 * P, "r")
    d = proc.open_device(0)
    with pytest.raises(PermissionDenied):
        d.write(a, pattern(4))
    assert proc.read(a, 4) == bytes(4)
    d.close()


def test_dmirror_failed_write_still_writes_the_mirrored_pages(proc: Process) -> None:
    """Conventions section 8: a WRITE copies into the pages it already mirrors before the
    fault of the first missing page fails."""
    a = proc.mmap(8 * P)
    proc.write(a, pattern(8, 3))
    proc.munmap(a + 3 * P, P)
    d = proc.open_device(0)
    d.read(a, 3)
    with pytest.raises(BadAddress):
        d.write(a, pattern(8, 4))
    assert proc.read(a, 3 * P) == pattern(8, 4)[:3 * P]
    assert proc.read(a + 4 * P, 4 * P) == pattern(8, 3)[4 * P:]
    d.close()


def test_dmirror_invalidation_erases_one_page_past_the_range(proc: Process) -> None:
    a = proc.mmap(8 * P)
    proc.write(a, pattern(8))
    d = proc.open_device(0)
    d.read(a, 8)
    proc.mprotect(a + 2 * P, 4 * P, "r")  # pages 2..5
    dm = proc.task.fget(d.fd).private_data
    present = dm.pt.load_range(a >> 12, 8) >= 0
    assert present.tolist() == [True, True, False, False, False, False, False, True]
    assert d.read(a, 8).faults == 1
    d.close()


def test_dmirror_snapshot_bytes(proc: Process) -> None:
    a = proc.mmap(6 * P)
    proc.write(a, b"w")  # page 0 written
    proc.touch(a + P, P)  # page 1 zero page
    proc.write(a + 2 * P, b"r")
    proc.mprotect(a + 2 * P, P, "r")  # page 2 read-only
    proc.munmap(a + 4 * P, P)  # page 4 hole; page 3 and 5 untouched
    d = proc.open_device(0)
    snap = d.snapshot(a, 6).tolist()
    assert snap == [W, Z | R, R, HMM_DMIRROR_PROT_NONE, HMM_DMIRROR_PROT_ERROR, HMM_DMIRROR_PROT_NONE]
    d.close()


@pytest.mark.parametrize("kernel, window", [("6.12", 64), ("7.3", 32)])
def test_dmirror_snapshot_windows_per_release(make_system, kernel: str, window: int) -> None:
    """dmirror_snapshot() works in windows of its on-stack arrays: 64 pages in 6.12, 32 in
    7.3; one temporary notifier, one hmm_range_fault() and one mmap_lock per window, also
    when the model batches the windows."""
    proc = make_system(kernel=kernel).spawn()
    a = proc.mmap(200 * P)
    proc.write(a + 150 * P, b"x")
    d = proc.open_device(1)
    with proc.system.stats.measure() as st:
        snap = d.snapshot(a, 200)
    assert snap[150] == W and int(np.count_nonzero(snap)) == 1
    nwin = -(-200 // window)
    assert st["mmu_notifier.interval_insert"] == nwin == st["mmu_notifier.interval_remove"]
    assert st["hmm.range_fault"] == nwin and st["lock.mmap_lock.read"] >= nwin
    d.close()


@pytest.mark.parametrize("kernel, window", [("6.12", 64), ("7.3", 32)])
def test_dmirror_fault_windows_per_release(make_system, kernel: str, window: int) -> None:
    """dmirror_fault() calls hmm_range_fault() once per window whether the pages need a
    fault (window by window) or not (batched): `faults` counts rounds, not windows."""
    proc = make_system(kernel=kernel).spawn()
    a = proc.mmap(300 * P)
    d = proc.open_device(0)
    with proc.system.stats.measure() as st:
        r = d.read(a, 300)  # every page needs a (read) fault: window by window
    nwin = -(-300 // window)
    assert (r.cpages, r.faults) == (300, 1)
    assert st["hmm.range_fault"] == nwin
    proc.mprotect(a, 300 * P, "r")  # erases the mirror; the zero pages stay mapped
    with proc.system.stats.measure() as st:
        r = d.read(a, 300)  # nothing to fault: batched
    assert (r.cpages, r.faults) == (300, 1)
    assert st["hmm.range_fault"] == nwin and st["lock.dmirror_mutex.write"] >= nwin
    assert st["fault.handle_mm_fault"] == 0
    d.close()


def test_dmirror_check_exclusive_without_atomic_entries(proc: Process) -> None:
    a = proc.mmap(2 * P)
    d = proc.open_device(0)
    assert d.check_exclusive(a, 2)
    d.close()


def test_dmirror_open_missing_device_is_enodev(make_system) -> None:
    s = make_system(coherent=False)
    p = s.spawn()
    assert dmirror_open(s, p.task, 2) == -ENODEV
    assert dmirror_open(s, p.task, 7) == -ENODEV
    with pytest.raises(NoDevice):
        p.open_device(3)


def test_dmirror_closed_fd_is_ebadf(proc: Process) -> None:
    d = proc.open_device(0)
    d.close()
    assert d.ioctl(HMM_DMIRROR_READ, HmmDmirrorCmd(addr=0, npages=1)) == -EBADF


def test_dmirror_inherited_handle_mirrors_the_opener(proc: Process) -> None:
    """Conventions item 23: a handle inherited by a child works on the parent's mm."""
    a = proc.mmap(2 * P)
    proc.write(a, pattern(2, 1))
    d = proc.open_device(0)
    child = proc.fork()
    child.write(a, pattern(2, 9))  # the child's private copy
    cmd = HmmDmirrorCmd(addr=a, ptr=child.mmap(2 * P), npages=2)
    assert child.task.ioctl(d.fd, HMM_DMIRROR_READ, cmd) == 0
    assert child.read(cmd.ptr, 2 * P) == pattern(2, 1), "the parent's data, copied into the child's buffer"
    child.close(d.fd)  # releases nothing: the parent still holds the file
    child.exit()
    assert d.read(a, 2).data.tobytes() == pattern(2, 1)
    d.close()


def test_dmirror_mmap_of_the_device_file(proc: Process) -> None:
    d = proc.open_device(0)
    a = proc.mmap(2 * P, "rw", fd=d.fd)
    vma = proc.mm.vma_lookup(a)
    from hmmsim.kernel.vma import VM_MIXEDMAP
    assert vma.vm_flags & VM_MIXEDMAP
    assert d.snapshot(a, 2).tolist() == [R, R], "private mapping of inserted pages: read-only ptes"
    proc.write(a, b"cow")  # a COW copy replaces the kernel page
    assert d.snapshot(a, 2).tolist() == [W, R]
    proc.munmap(a, 2 * P)
    d.close()


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_dmirror_flags_and_read_unlocked_per_release(make_system, kernel: str) -> None:
    """HMM_DMIRROR_FLAGS and HMM_DMIRROR_READ_UNLOCKED exist only in 7.3's ioctl switch;
    6.12 answers both with its default -EINVAL. 7.3 stores the flags word, after the
    driver's empty-range check (npages 0 is -EINVAL), and reads through the unlocked
    range fault."""
    proc = make_system(kernel=kernel).spawn()
    a = proc.mmap(P)
    fd = proc.open_device(0).fd
    ioctl = proc.task.ioctl
    dmirror = proc.task.files[fd].private_data
    if kernel == "6.12":
        assert ioctl(fd, HMM_DMIRROR_FLAGS, HmmDmirrorCmd(npages=1)) == -EINVAL
        assert ioctl(fd, HMM_DMIRROR_READ_UNLOCKED, HmmDmirrorCmd(addr=a, npages=1)) == -EINVAL
        assert dmirror.flags == 0
    else:
        assert ioctl(fd, HMM_DMIRROR_FLAGS, HmmDmirrorCmd(npages=0)) == -EINVAL
        assert ioctl(fd, HMM_DMIRROR_FLAGS, HmmDmirrorCmd(npages=HMM_DMIRROR_FLAG_FAIL_ALLOC)) == 0
        assert dmirror.flags == HMM_DMIRROR_FLAG_FAIL_ALLOC
        # READ_UNLOCKED: a READ through hmm_range_fault_unlocked_timeout (one fault round)
        buf = proc.mmap(P)
        proc.write(a, b"\x5a" * 8)
        cmd = HmmDmirrorCmd(addr=a, ptr=buf, npages=1)
        assert ioctl(fd, HMM_DMIRROR_READ_UNLOCKED, cmd) == 0
        assert (cmd.cpages, cmd.faults) == (1, 1)
        assert proc.read(buf, 8) == b"\x5a" * 8
    # counted after the argument checks: 7.3's npages=0 call never reaches the switch
    assert proc.system.stats["dmirror.ioctl.flags"] == 1
    proc.system.ls.assert_no_locks()


def test_dmirror_pt_erase_and_load() -> None:
    pt = DmirrorPT()
    pt.store_range(510, np.arange(4, dtype=np.int64) << 2)
    assert pt.load_range(509, 6).tolist() == [-1, 0, 4, 8, 12, -1]
    pt.erase_range(511, 512)
    assert pt.load_range(510, 4).tolist() == [0, -1, -1, 12] and len(pt) == 2
    pt.erase_range(0, (1 << 52))
    assert len(pt) == 0 and pt.leaves == {}




def test_dmirror_ignores_migrate_invalidations_of_its_own_device(proc: Process) -> None:
    """``dmirror_interval_invalidate()`` skips MMU_NOTIFY_MIGRATE ranges owned by its own
    device (the migration keeps its mirror in step itself) and does not bump the sequence;
    the same event owned by another device, or any other event, erases the mirror."""
    a = proc.mmap(8 * P)
    proc.write(a, pattern(8))
    d0, d1 = proc.open_device(0), proc.open_device(1)
    d0.read(a, 8)
    d1.read(a, 8)
    dm0 = proc.task.fget(d0.fd).private_data
    dm1 = proc.task.fget(d1.fd).private_data
    seq0 = dm0.notifier.invalidate_seq

    def mirrored(dm) -> int:
        return int((dm.pt.load_range(a >> 12, 8) >= 0).sum())

    mmap_read_lock(proc.mm)
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_MIGRATE, proc.mm, a, a + 8 * P, owner=dm0.mdevice):
        pass
    mmap_read_unlock(proc.mm)
    assert (mirrored(dm0), mirrored(dm1)) == (8, 0)
    assert dm0.notifier.invalidate_seq == seq0
    d1.read(a, 8)
    mmap_read_lock(proc.mm)
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_CLEAR, proc.mm, a, a + 4 * P, owner=dm0.mdevice):
        pass
    mmap_read_unlock(proc.mm)
    assert (mirrored(dm0), mirrored(dm1)) == (3, 3)  # [a, a+4P) plus one page past the end
    d0.close()
    d1.close()


def test_device_api_in_a_child_that_inherited_the_scratch_buffer(proc: Process) -> None:
    """The facade's scratch buffer is inherited by fork; the child's Device reuses (and
    grows) it instead of failing to map it again."""
    from hmmsim.device import SCRATCH_BASE

    a = proc.mmap(4 * P)
    proc.write(a, pattern(4, 3))
    assert proc.open_device(0).read(a, 1).cpages == 1  # maps one scratch page
    child = proc.fork()
    dc = child.open_device(0)
    got = dc.read(a, 4)  # needs a bigger buffer than the inherited one
    assert got.cpages == 4 and got.data.tobytes() == pattern(4, 3)
    scratch = child.mm.find_vma(SCRATCH_BASE)
    assert scratch is not None and (scratch.vm_start, scratch.vm_end) == (SCRATCH_BASE, SCRATCH_BASE + 4 * P)
    dc.close()
    child.exit()


def test_ioctl_needs_an_open_file_with_ioctls(proc: Process) -> None:
    """``ioctl()``: ``-EBADF`` for a closed fd, ``-ENOTTY`` for a tmpfs file."""
    fd = proc.open_tmpfile(P)
    assert proc.task.ioctl(fd, HMM_DMIRROR_READ, HmmDmirrorCmd(npages=1)) == -ENOTTY
    assert proc.task.ioctl(fd + 100, HMM_DMIRROR_READ, HmmDmirrorCmd(npages=1)) == -EBADF
    proc.close(fd)


def _mixed_region(proc: Process, n: int) -> int:
    """Pages of every common kind: written, zero page, read-only, THP, holes, untouched."""
    a = proc.mmap(n * P)
    proc.madvise(a, n * P, "hugepage")
    proc.write(a, np.arange(300 * P // 8, dtype=np.uint64))  # a THP or 4 KiB pages
    proc.touch(a + 400 * P, 100 * P)  # zero pages
    proc.mprotect(a + 600 * P, 50 * P, "r")
    proc.munmap(a + 700 * P, 30 * P)
    proc.write(a + 1100 * P, b"y" * (200 * P))
    return a


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_dmirror_batched_windows_match_window_by_window(make_system, kernel: str) -> None:
    """The batched fast path (no simulated thread armed) and the driver's window loop (a
    scheduling hook registered) give the same snapshot bytes, READ/WRITE results and
    counters, the same mirror and the same hmm_range_fault() call count."""
    results = []
    for racing in (False, True):
        s = make_system(kernel=kernel)
        proc = s.spawn()
        n = 1600
        a = _mixed_region(proc, n)
        d = proc.open_device(0)
        hook = lambda *args: None  # noqa: E731 - a thread that never does anything
        if racing:
            s.ls.add_hook(hook)
        with s.stats.measure() as st:
            snap = d.snapshot(a, n).tolist()
            r1 = d.read(a, 600)
            w = d.write(a + 1100 * P, np.full(300 * P, 7, np.uint8))
            r2 = d.read(a + 1100 * P, 300)
            snap2 = d.snapshot(a, n).tolist()
            with pytest.raises(BadAddress):  # faults up to the hole, then -EFAULT
                d.read(a + 600 * P, 200)
        if racing:
            s.ls.remove_hook(hook)
        dm = proc.task.fget(d.fd).private_data
        mirror = (dm.pt.load_range(a >> 12, n) >= 0).tolist()
        results.append((snap, r1.cpages, r1.faults, bytes(r1.data[::4096]), w.cpages, w.faults,
                        r2.cpages, r2.faults, bytes(r2.data[::512]), snap2, mirror,
                        st["hmm.range_fault"], st["mmu_notifier.interval_insert"]))
        d.close()
    assert results[0] == results[1]


def test_migrate_to_dev_into_a_read_only_buffer_is_efault_after_migrating() -> None:
    from hmmsim import System
    from hmmsim.drivers.test_hmm_uapi import HMM_DMIRROR_MIGRATE_TO_DEV
    from hmmsim.kernel.page_types import PAGE_SIZE
    """``dmirror_migrate_to_device()``: the pages move, then ``copy_to_user()`` of the
    read-back into a buffer the process cannot write fails: ``-EFAULT`` (not the number of
    bytes left), and the pages stay on the device."""
    s = System(kernel="7.3", ram=128 << 20, hugetlb_pages=0)
    p = s.spawn()
    a = p.mmap(4 * PAGE_SIZE)
    p.write(a, b"\x5a" * (4 * PAGE_SIZE))
    buf = p.mmap(4 * PAGE_SIZE, "r")
    d = p.open_device(0)
    cmd = HmmDmirrorCmd(addr=a, npages=4, ptr=buf)
    assert d.ioctl(HMM_DMIRROR_MIGRATE_TO_DEV, cmd) == -EFAULT
    assert all(p.pte(a + i * PAGE_SIZE).startswith("device-private") for i in range(4))
    assert p.read(a, 4 * PAGE_SIZE) == b"\x5a" * (4 * PAGE_SIZE)
    s.check_invariants()
