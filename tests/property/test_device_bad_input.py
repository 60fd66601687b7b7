"""Bad input to the dmirror device commands, on both kernels: unaligned and empty ranges,
ranges crossing holes and VMAs, wrong handles and fds, migration when device memory is
exhausted (7.3's FAIL_ALLOC; a device whose memory is all in use and whose machine has no
pfn space left for another chunk). Each returns the kernel's error and loses nothing:
the CPU still sees its data, no frame or device page leaks, no lock is held."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from hmmsim import Process, System
from hmmsim.drivers.test_hmm_uapi import (
    HMM_DMIRROR_CHECK_EXCLUSIVE,
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_RELEASE,
    HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE,
    HmmDmirrorCmd,
)
from hmmsim.kernel.errno import EBADF, EFAULT, EINVAL, ENOENT, ENOTTY
from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.system import DEVMEM_CHUNK_PAGES

from .test_device_stateful import device_minor_of

KERNELS = ("6.12", "7.3")
COMMANDS = (HMM_DMIRROR_READ, HMM_DMIRROR_WRITE, HMM_DMIRROR_SNAPSHOT, HMM_DMIRROR_MIGRATE_TO_DEV,
            HMM_DMIRROR_MIGRATE_TO_SYS, HMM_DMIRROR_CHECK_EXCLUSIVE, HMM_DMIRROR_RELEASE)


def words(n: int, seed: int) -> np.ndarray:
    return np.arange(n * P // 4, dtype=np.uint32) + np.uint32(seed)


class Setup:
    """A process with a filled region, a buffer and handles on devices 0 and 2."""

    def __init__(self, kernel: str, **cfg: object) -> None:
        self.sys = System(kernel=kernel, ram=256 << 20, hugetlb_pages=0, **cfg)  # type: ignore[arg-type]
        self.p: Process = self.sys.spawn()
        self.a = self.p.mmap(16 * P)
        self.p.write(self.a, words(16, 5))
        self.buf = self.p.mmap(64 * P)
        self.d0 = self.p.open_device(0).fd
        self.d2 = self.p.open_device(2).fd

    def ioctl(self, fd: int, command: int, addr: int, npages: int, ptr: int | None = None) -> tuple[int, HmmDmirrorCmd]:
        cmd = HmmDmirrorCmd(addr=addr, ptr=self.buf if ptr is None else ptr, npages=npages, cpages=77, faults=88)
        return self.p.task.ioctl(fd, command, cmd), cmd

    def intact(self) -> None:
        assert (self.p.read_array(self.a, 16 * P // 4, np.uint32) == words(16, 5)).all()
        self.sys.check_invariants(full=True)
        self.sys.ls.assert_no_locks()


@pytest.fixture(params=KERNELS)
def s(request: pytest.FixtureRequest) -> Iterator[Setup]:
    st = Setup(request.param)
    yield st
    st.p.exit()
    st.sys.check_invariants(full=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_unaligned_empty_and_wrapping_ranges_are_einval_and_change_nothing(s: Setup, command: int) -> None:
    s.ioctl(s.d0, HMM_DMIRROR_MIGRATE_TO_DEV, s.a, 4)  # some pages on the device
    free = s.sys.mem.nr_free
    snap = s.p.read(s.buf, 64 * P)
    for addr, npages in ((s.a + 8, 1), (s.a + P - 1, 2), (s.a, 0), ((1 << 64) - P, 2)):
        ret, cmd = s.ioctl(s.d0, command, addr, npages)
        assert ret == -EINVAL
        assert (cmd.cpages, cmd.faults) == (77, 88), "nothing copied back on error"
    assert s.sys.mem.nr_free == free
    assert s.p.read(s.buf, 64 * P) == snap
    s.intact()


def test_ranges_crossing_a_hole(s: Setup) -> None:
    """A hole at pages 6..7: READ/WRITE -EFAULT, SNAPSHOT marks it ERROR, MIGRATE_TO_DEV
    and MIGRATE_TO_SYS stop there with -EINVAL after handling the pages before it."""
    s.p.munmap(s.a + 6 * P, 2 * P)
    expect = words(16, 5).reshape(16, -1)
    ret, _ = s.ioctl(s.d0, HMM_DMIRROR_READ, s.a + 4 * P, 6)
    assert ret == -EFAULT
    s.p.write(s.buf, np.zeros(6 * P // 4, np.uint32))
    ret, _ = s.ioctl(s.d0, HMM_DMIRROR_WRITE, s.a + 8 * P, 8)
    assert ret == 0  # after the hole: fine
    s.p.write(s.a + 8 * P, expect[8:].reshape(-1))
    ret, _ = s.ioctl(s.d2, HMM_DMIRROR_WRITE, s.a + 5 * P, 2)
    assert ret == -EFAULT
    ret, cmd = s.ioctl(s.d0, HMM_DMIRROR_SNAPSHOT, s.a, 10)
    assert ret == 0 and cmd.cpages == 10
    snap = s.p.read(s.buf, 10)
    assert [snap[i] == HMM_DMIRROR_PROT_ERROR for i in range(10)] == [False] * 6 + [True] * 2 + [False] * 2
    for fd in (s.d0, s.d2):
        ret, _ = s.ioctl(fd, HMM_DMIRROR_MIGRATE_TO_DEV, s.a + 2 * P, 8)
        assert ret == -EINVAL
    # the pages before the hole went to device 0 (device 2 selects system pages only)
    assert [device_minor_of(s.p, s.a + i * P) for i in range(2, 6)] == [0] * 4
    ret, _ = s.ioctl(s.d0, HMM_DMIRROR_MIGRATE_TO_SYS, s.a + 4 * P, 4)
    assert ret == -EINVAL
    assert [device_minor_of(s.p, s.a + i * P) for i in range(2, 6)] == [0, 0, None, None]
    got = s.p.read_array(s.a, 6 * P // 4, np.uint32).reshape(6, -1)
    assert (got == expect[:6]).all()
    got = s.p.read_array(s.a + 8 * P, 8 * P // 4, np.uint32).reshape(8, -1)
    assert (got == expect[8:]).all()
    s.sys.check_invariants(full=True)


def test_ranges_crossing_vmas(s: Setup) -> None:
    """Two VMAs (rw | r) in one range: READ and MIGRATE_TO_DEV go through both; WRITE
    stops at the read-only VMA with -EPERM."""
    s.p.mprotect(s.a + 8 * P, 8 * P, "r")
    ret, cmd = s.ioctl(s.d0, HMM_DMIRROR_MIGRATE_TO_DEV, s.a + 4 * P, 8)
    assert ret == 0 and cmd.cpages == 8
    assert all(device_minor_of(s.p, s.a + i * P) == 0 for i in range(4, 12))
    ret, cmd = s.ioctl(s.d2, HMM_DMIRROR_READ, s.a + 4 * P, 8)
    assert ret == 0 and cmd.cpages == 8
    assert (s.p.read_array(s.buf, 8 * P // 4, np.uint32) == words(16, 5)[4 * P // 4:12 * P // 4]).all()
    s.intact()


def test_wrong_handles_and_fds(s: Setup) -> None:
    """A closed fd is -EBADF; a file that is not a dmirror has no such ioctl (-ENOTTY);
    closing one handle leaves the other working."""
    d1 = s.p.open_device(1).fd
    s.p.close(d1)
    for command in COMMANDS:
        ret, _ = s.ioctl(d1, command, s.a, 1)
        assert ret == -EBADF
        ret, _ = s.ioctl(12345, command, s.a, 1)
        assert ret == -EBADF
    f = s.p.open_tmpfile(P)
    ret, _ = s.ioctl(f, HMM_DMIRROR_READ, s.a, 1)
    assert ret == -ENOTTY
    ret, cmd = s.ioctl(s.d0, HMM_DMIRROR_READ, s.a, 16)
    assert ret == 0 and cmd.cpages == 16
    s.intact()


@pytest.mark.parametrize("kernel", KERNELS)
def test_fail_alloc_only_in_7_3(kernel: str) -> None:
    """7.3's FAIL_ALLOC fails the next device allocation: that page stays in system memory
    and the read-back says -ENOENT; the flag is consumed. 6.12 has no FLAGS (-EINVAL)."""
    st = Setup(kernel)
    ret, _ = st.ioctl(st.d0, HMM_DMIRROR_FLAGS, 0, HMM_DMIRROR_FLAG_FAIL_ALLOC)
    if kernel == "6.12":
        assert ret == -EINVAL
        return
    assert ret == 0
    ret, _ = st.ioctl(st.d0, HMM_DMIRROR_MIGRATE_TO_DEV, st.a, 4)
    assert ret == -ENOENT
    assert [device_minor_of(st.p, st.a + i * P) for i in range(4)] == [None, 0, 0, 0]
    st.intact()
    ret, cmd = st.ioctl(st.d0, HMM_DMIRROR_MIGRATE_TO_DEV, st.a, 4)
    assert ret == 0 and cmd.cpages == 4, "the flag was consumed"
    # the same when migrating back: migrate_to_ram fails with VM_FAULT_OOM -> -ENOMEM
    st.intact()
    st.p.exit()


def _use_up(sys: System, minor: int, keep: int) -> list[int]:
    """Take all but *keep* pages of the device's free list, as if other users held them
    (a reference each, known to the checker as a kernel reference)."""
    mdev = sys.dmirror_devices[minor]
    taken = mdev.free_pages[:-keep] if keep else list(mdev.free_pages)
    mdev.free_pages = mdev.free_pages[len(taken):]
    arr = np.asarray(taken, np.int64)
    sys.mem.refcount[arr] = 1
    mdev.chunks[0].pagemap.nr_used += len(taken)
    mdev.calloc += len(taken)
    sys.extra_refs.update(dict.fromkeys(taken, 1))
    return taken


def _give_back(sys: System, minor: int, taken: list[int]) -> None:
    mdev = sys.dmirror_devices[minor]
    arr = np.asarray(taken, np.int64)
    sys.mem.refcount[arr] = 0
    mdev.chunks[0].pagemap.nr_used -= len(taken)
    for pfn in taken:
        del sys.extra_refs[pfn]
    mdev.free_pages.extend(taken)
    mdev.cfree += len(taken)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("minor", [0, 2])
def test_migration_with_exhausted_device_memory(kernel: str, minor: int) -> None:
    """The device's chunk has 3 free pages and the machine has no pfn space for another
    private chunk (a coherent device has only its fixed range): MIGRATE_TO_DEV of 8 pages
    moves 3, leaves 5 in system memory and answers -ENOENT; nothing is lost."""
    st = Setup(kernel, device_private_space=2 * DEVMEM_CHUNK_PAGES * P)
    fd = st.d0 if minor == 0 else st.d2
    taken = _use_up(st.sys, minor, keep=3)
    free = st.sys.mem.nr_free
    ret, _ = st.ioctl(fd, HMM_DMIRROR_MIGRATE_TO_DEV, st.a, 8)
    assert ret == -ENOENT
    on = [device_minor_of(st.p, st.a + i * P) for i in range(8)]
    assert on == [minor] * 3 + [None] * 5
    assert len(st.sys.dmirror_devices[minor].chunks) == 1
    # the 3 source pages were freed; a private page's data lives in a backing system page
    assert st.sys.mem.nr_free == free + (0 if minor == 0 else 3)
    st.sys.check_invariants(full=True)
    ret, cmd = st.ioctl(fd, HMM_DMIRROR_MIGRATE_TO_SYS, st.a, 8)
    assert ret == 0 and cmd.cpages == 3
    st.intact()
    _give_back(st.sys, minor, taken)
    ret, cmd = st.ioctl(fd, HMM_DMIRROR_MIGRATE_TO_DEV, st.a, 8)
    assert ret == 0 and cmd.cpages == 8
    st.intact()
    st.p.exit()
    st.sys.check_invariants(full=True)
