"""``tools/testing/selftests/mm/hmm-tests.c`` ported to the model.

Each ``TEST_F`` keeps its kernel name, its comment and its exact expectations (return
codes, ``cpages``, ``faults``, data). ``self`` is the fixture (``self.proc`` is the test
process, ``self.fd``/``self.fd0``/``self.fd1`` its open devices); memory the C code
gets from ``malloc``/``mmap`` is mapped in ``self.proc``, and ``int *ptr`` loops become
numpy arrays of int32 written and read through the simulated CPU.

The port is per release (``harness.HMM_TESTS_C``): a ``TEST_F`` whose body differs
between 6.12's and 7.3's hmm-tests.c (``anon_write_child``, ``anon_write_hugetlbfs``,
``compound``) is registered once per release. Tests that need device memory migration
(migrate*, hmm_gup_test, hmm_cow_in_device, snapshot, double_map, 7.3's device-THP
tests), device-exclusive access (exclusive*) or userfaultfd (7.3's userfaultfd_read) are
listed and SKIP with the reason in ``harness.NOT_MODELLED``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..drivers.dmirror import dmirror_open
from ..drivers.test_hmm_uapi import (
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_PUD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE,
    HmmDmirrorCmd,
)
from ..errors import HmmError
from ..kernel.errno import EFAULT, EPERM
from ..kernel.page_types import HPAGE_PMD_SIZE
from ..kernel.sched import Interleave
from ..kernel.task import vm_munmap
from ..process import Process
from .harness import (
    ASSERT_EQ,
    ASSERT_GE,
    ASSERT_NE,
    SKIP,
    TEST_F,
    FixtureState,
    Variant,
)

__all__ = ("HMM_BUFFER_SIZE", "HmmBuffer", "hmm_buffer_free", "hmm_create_file", "hmm_dmirror_cmd",
           "hmm_open")

ONEKB = 1 << 10
ONEMEG = 1 << 20
TWOMEG = 1 << 21
HMM_BUFFER_SIZE = 1024 << 12
NTIMES = 10


def ALIGN(x: int, a: int) -> int:
    return (x + (a - 1)) & ~(a - 1)


@dataclass
class HmmBuffer:
    """``struct hmm_buffer``: ``ptr`` the memory under test, ``mirror`` the device's copy
    (both addresses in the test process), ``cpages``/``faults`` from the last command."""

    ptr: int = 0
    mirror: int = 0
    size: int = 0
    fd: int = -1
    cpages: int = 0
    faults: int = 0
    #: what ``malloc()`` gave ``mirror`` (free() knows it; the C struct does not need it)
    mirror_size: int = 0


def hmm_open(proc: Process, unit: int) -> int:
    """``hmm_open()``: ``open("/dev/hmm_dmirror<unit>", O_RDWR)``."""
    return dmirror_open(proc.system, proc.task, unit)


def malloc(proc: Process, size: int) -> int:
    """``malloc()`` of a large buffer: glibc serves it with an anonymous mmap."""
    return proc.mmap(size)


def hmm_dmirror_cmd(proc: Process, fd: int, request: int, buffer: HmmBuffer, npages: int) -> int:
    """``hmm_dmirror_cmd()``: the ioctl with ``addr = buffer->ptr``, ``ptr =
    buffer->mirror``; on success ``cpages``/``faults`` are stored in *buffer*."""
    cmd = HmmDmirrorCmd(addr=buffer.ptr, ptr=buffer.mirror, npages=npages)
    ret = proc.task.ioctl(fd, request, cmd)
    if ret:
        return ret
    buffer.cpages = cmd.cpages
    buffer.faults = cmd.faults
    return 0


def hmm_buffer_free(proc: Process, buffer: HmmBuffer) -> None:
    """``hmm_buffer_free()``: munmap ``ptr``, free ``mirror``."""
    if buffer.ptr:
        proc.munmap(buffer.ptr, buffer.size)
        buffer.ptr = 0
    if buffer.mirror:
        proc.munmap(buffer.mirror, buffer.mirror_size or buffer.size)
        buffer.mirror = 0


def hmm_create_file(proc: Process, size: int) -> int:
    """``hmm_create_file()``: ``O_TMPFILE`` in /tmp (tmpfs) + ``ftruncate``."""
    return proc.open_tmpfile(size)


def hmm_migrate_sys_to_dev(proc: Process, fd: int, buffer: HmmBuffer, npages: int) -> int:
    return hmm_dmirror_cmd(proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer, npages)


def hmm_migrate_dev_to_sys(proc: Process, fd: int, buffer: HmmBuffer, npages: int) -> int:
    return hmm_dmirror_cmd(proc, fd, HMM_DMIRROR_MIGRATE_TO_SYS, buffer, npages)


def ints(proc: Process, addr: int, count: int) -> npt.NDArray[np.int32]:
    """The ``int`` array at *addr* as the CPU reads it."""
    return proc.read_array(addr, count, np.int32)


def set_ints(proc: Process, addr: int, values: npt.ArrayLike) -> None:
    """``for (i ...) ptr[i] = values[i]`` through the CPU."""
    proc.write_array(addr, np.asarray(values, dtype=np.int32))


def _new_buffer(proc: Process, size: int, mirror_size: int | None = None) -> HmmBuffer:
    b = HmmBuffer(fd=-1, size=size)
    b.mirror_size = mirror_size if mirror_size is not None else size
    b.mirror = malloc(proc, b.mirror_size)
    ASSERT_NE(b.mirror, 0)
    return b


def read_pmd_pagesize() -> int:
    """``read_pmd_pagesize()``: /sys/kernel/mm/transparent_hugepage/hpage_pmd_size."""
    return HPAGE_PMD_SIZE


def default_huge_page_size() -> int:
    """``default_huge_page_size()``: Hugepagesize of /proc/meminfo."""
    return HPAGE_PMD_SIZE


def hugetlb_free_default_pages(self: FixtureState) -> int:
    """``hugetlb_free_default_pages()``: HugePages_Free of /proc/meminfo."""
    return self.sys.hugetlb.free_huge_pages


# -- tests -----------------------------------------------------------------------------------------
@TEST_F("hmm", "open_close")
def open_close(self: FixtureState, variant: Variant) -> None:
    """Simple NULL test of device open/close."""


@TEST_F("hmm", "anon_read")
def anon_read(self: FixtureState, variant: Variant) -> None:
    """Read private anonymous memory."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")
    # Initialize buffer in system memory but leave the first two pages zero
    # (pte_none and pfn_zero).
    n = size // 4
    first = 2 * self.page_size // 4
    set_ints(p, buffer.ptr + first * 4, np.arange(first, n))
    # Set buffer permission to read-only.
    p.mprotect(buffer.ptr, size, "r")
    # Populate the CPU page table with a special zero page.
    val = int(ints(p, buffer.ptr + self.page_size, 1)[0])
    ASSERT_EQ(val, 0)
    # Simulate a device reading system memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_READ, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_EQ(buffer.faults, 1)
    # Check what the device read.
    got = ints(p, buffer.mirror, n)
    ASSERT_EQ(int(np.count_nonzero(got[:first])), 0)
    ASSERT_EQ(bool((got[first:] == np.arange(first, n)).all()), True)
    hmm_buffer_free(p, buffer)


def ASSERT_ARRAY_EQ(got: npt.NDArray, expected: npt.ArrayLike) -> None:
    """``for (i ...) ASSERT_EQ(ptr[i], expected[i])``: fails at the first differing
    element, naming ``(i, value)`` as the C loop's ASSERT_EQ would."""
    exp = np.broadcast_to(np.asarray(expected, dtype=got.dtype), got.shape)
    bad = np.flatnonzero(got != exp)
    if bad.size:
        i = int(bad[0])
        ASSERT_EQ((i, int(got[i])), (i, int(exp[i])))


@TEST_F("hmm", "anon_read_prot")
def anon_read_prot(self: FixtureState, variant: Variant) -> None:
    """Read private anonymous memory which has been protected with
    mprotect() PROT_NONE."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")
    n = size // 4
    # Initialize buffer in system memory.
    set_ints(p, buffer.ptr, np.arange(n))
    # Initialize mirror buffer so we can verify it isn't written.
    set_ints(p, buffer.mirror, -np.arange(n))
    # Protect buffer from reading.
    p.mprotect(buffer.ptr, size, "none")
    # Simulate a device reading system memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_READ, buffer, npages)
    ASSERT_EQ(ret, -EFAULT)
    # Allow CPU to read the buffer so we can check it.
    p.mprotect(buffer.ptr, size, "r")
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))
    # Check what the device read.
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), -np.arange(n))
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "anon_write")
def anon_write(self: FixtureState, variant: Variant) -> None:
    """Write private anonymous memory."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")
    n = size // 4
    # Initialize data that the device will write to buffer->ptr.
    set_ints(p, buffer.mirror, np.arange(n))
    # Simulate a device writing system memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_WRITE, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_EQ(buffer.faults, 1)
    # Check what the device wrote.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "anon_write_prot")
def anon_write_prot(self: FixtureState, variant: Variant) -> None:
    """Write private anonymous memory which has been protected with
    mprotect() PROT_READ."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "r")
    n = size // 4
    # Simulate a device reading a zero page of memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_READ, buffer, 1)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, 1)
    ASSERT_EQ(buffer.faults, 1)
    # Initialize data that the device will write to buffer->ptr.
    set_ints(p, buffer.mirror, np.arange(n))
    # Simulate a device writing system memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_WRITE, buffer, npages)
    ASSERT_EQ(ret, -EPERM)
    # Check what the device wrote.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), 0)
    # Now allow writing and see that the zero page is replaced.
    p.mprotect(buffer.ptr, size, "rw")
    # Simulate a device writing system memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_WRITE, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_EQ(buffer.faults, 1)
    # Check what the device wrote.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "anon_write_child", releases=("6.12",))
def anon_write_child(self: FixtureState, variant: Variant) -> None:
    """Check that a device writing an anonymous private mapping
    will copy-on-write if a child process inherits the mapping.

    6.12's body: one buffer of ``HMM_BUFFER_SIZE``, no THP, no migration."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4

    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")

    # Initialize buffer->ptr so we can tell if it is written.
    set_ints(p, buffer.ptr, np.arange(n))
    # Initialize data that the device will write to buffer->ptr.
    set_ints(p, buffer.mirror, -np.arange(n))

    child = p.fork()
    try:
        _anon_write_child_in_child(self, child, buffer, npages, migrate=0)
    finally:
        # exit(0), or the abort() of a failed child ASSERT: either way the parent's
        # waitpid() reaps a dead child, and a failure fails the test.
        child.exit()

    # Check that the parent's buffer did not change.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))
    # (the C parent returns here without hmm_buffer_free())


def _anon_write_child_in_child(self: FixtureState, child: Process, buffer: HmmBuffer,
                               npages: int, migrate: int) -> None:
    """The child's side of ``anon_write_child`` (both releases)."""
    n = (npages << self.page_shift) // 4
    # Check that we see the parent's values.
    ASSERT_ARRAY_EQ(ints(child, buffer.ptr, n), np.arange(n))
    if not migrate:
        ASSERT_ARRAY_EQ(ints(child, buffer.mirror, n), -np.arange(n))

    # The child process needs its own mirror to its own mm.
    child_fd = hmm_open(child, 0)
    ASSERT_GE(child_fd, 0)

    # Simulate a device writing system memory.
    ret = hmm_dmirror_cmd(child, child_fd, HMM_DMIRROR_WRITE, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_EQ(buffer.faults, 1)

    # Check what the device wrote.
    if not migrate:
        ASSERT_ARRAY_EQ(ints(child, buffer.ptr, n), -np.arange(n))

    child.close(child_fd)


@TEST_F("hmm", "anon_write_child", releases=("7.3",))
def anon_write_child_7_3(self: FixtureState, variant: Variant) -> None:
    """Check that a device writing an anonymous private mapping
    will copy-on-write if a child process inherits the mapping.

    Also verifies after fork() memory the device can be read by child.

    7.3's body loops over ``migrate`` and ``use_thp``; with ``migrate`` the buffer is
    first moved to the device (hmmsim splits the THP when collecting it, where 7.3 moves
    it whole: the data the test checks is the same).
    """
    p = self.proc
    for migrate in range(2):
        for use_thp in range(2):
            npages = ALIGN(read_pmd_pagesize() if use_thp else HMM_BUFFER_SIZE,
                           self.page_size) >> self.page_shift
            ASSERT_NE(npages, 0)
            size = npages << self.page_shift
            n = size // 4

            buffer = _new_buffer(p, size * 2, mirror_size=size)
            buffer.ptr = p.mmap(size * 2, "rw")

            old_ptr = buffer.ptr
            if use_thp:
                map_ = ALIGN(buffer.ptr, size)
                p.madvise(map_, size, "hugepage")
                buffer.ptr = map_

            # Initialize buffer->ptr so we can tell if it is written.
            set_ints(p, buffer.ptr, np.arange(n))
            # Initialize data that the device will write to buffer->ptr.
            set_ints(p, buffer.mirror, -np.arange(n))

            if migrate:
                ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
                ASSERT_EQ(ret, 0)
                ASSERT_EQ(buffer.cpages, npages)

            child = p.fork()
            try:
                _anon_write_child_in_child(self, child, buffer, npages, migrate)
            finally:
                # _exit(0), or the abort() of a failed child ASSERT (see above)
                child.exit()

            # Check that the parent's buffer did not change.
            ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))

            buffer.ptr = old_ptr
            hmm_buffer_free(p, buffer)


@TEST_F("hmm", "anon_write_child_shared")
def anon_write_child_shared(self: FixtureState, variant: Variant) -> None:
    """Check that a device writing an anonymous shared mapping
    will not copy-on-write if a child process inherits the mapping."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw", shared=True)

    # Initialize buffer->ptr so we can tell if it is written.
    set_ints(p, buffer.ptr, np.arange(n))
    # Initialize data that the device will write to buffer->ptr.
    set_ints(p, buffer.mirror, -np.arange(n))

    child = p.fork()
    try:
        # Check that we see the parent's values.
        ASSERT_ARRAY_EQ(ints(child, buffer.ptr, n), np.arange(n))
        ASSERT_ARRAY_EQ(ints(child, buffer.mirror, n), -np.arange(n))

        # The child process needs its own mirror to its own mm.
        child_fd = hmm_open(child, 0)
        ASSERT_GE(child_fd, 0)

        # Simulate a device writing system memory.
        ret = hmm_dmirror_cmd(child, child_fd, HMM_DMIRROR_WRITE, buffer, npages)
        ASSERT_EQ(ret, 0)
        ASSERT_EQ(buffer.cpages, npages)
        ASSERT_EQ(buffer.faults, 1)

        # Check what the device wrote.
        ASSERT_ARRAY_EQ(ints(child, buffer.ptr, n), -np.arange(n))

        child.close(child_fd)
    finally:
        child.exit()

    # Check that the parent's buffer did change.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), -np.arange(n))
    # (the C parent returns here without hmm_buffer_free())


@TEST_F("hmm", "anon_write_huge")
def anon_write_huge(self: FixtureState, variant: Variant) -> None:
    """Write private anonymous huge page."""
    p = self.proc
    size = 2 * read_pmd_pagesize()
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")

    size //= 2
    npages = size >> self.page_shift
    map_ = ALIGN(buffer.ptr, size)
    p.madvise(map_, size, "hugepage")
    old_ptr = buffer.ptr
    buffer.ptr = map_
    n = size // 4

    # Initialize data that the device will write to buffer->ptr.
    set_ints(p, buffer.mirror, np.arange(n))

    # Simulate a device writing system memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_WRITE, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_EQ(buffer.faults, 1)

    # Check what the device wrote.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))

    buffer.ptr = old_ptr
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "anon_write_hugetlbfs", releases=("6.12",))
def anon_write_hugetlbfs(self: FixtureState, variant: Variant) -> None:
    """Write huge TLBFS page.

    6.12's body: no free-huge-page check (a failed mmap is the SKIP)."""
    _anon_write_hugetlbfs(self, check_free=False)


@TEST_F("hmm", "anon_write_hugetlbfs", releases=("7.3",))
def anon_write_hugetlbfs_7_3(self: FixtureState, variant: Variant) -> None:
    """Write huge TLBFS page.

    7.3's body SKIPs "Not enough huge pages" first when HugePages_Free is 0."""
    _anon_write_hugetlbfs(self, check_free=True)


def _anon_write_hugetlbfs(self: FixtureState, check_free: bool) -> None:
    p = self.proc
    default_hsize = default_huge_page_size()
    if check_free and not hugetlb_free_default_pages(self):
        SKIP("Not enough huge pages")

    size = ALIGN(TWOMEG, default_hsize)
    npages = size >> self.page_shift
    n = size // 4

    buffer = HmmBuffer()
    try:
        buffer.ptr = p.mmap(size, "rw", hugetlb=True)
    except HmmError:
        SKIP("Huge page could not be allocated")

    buffer.fd = -1
    buffer.size = size
    buffer.mirror_size = size
    buffer.mirror = malloc(p, size)
    ASSERT_NE(buffer.mirror, 0)

    # Initialize data that the device will write to buffer->ptr.
    set_ints(p, buffer.mirror, np.arange(n))

    # Simulate a device writing system memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_WRITE, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_EQ(buffer.faults, 1)

    # Check what the device wrote.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))

    p.munmap(buffer.ptr, buffer.size)
    buffer.ptr = 0
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "file_read")
def file_read(self: FixtureState, variant: Variant) -> None:
    """Read mmap'ed file memory."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4

    fd = hmm_create_file(p, size)
    ASSERT_GE(fd, 0)

    buffer = _new_buffer(p, size)
    buffer.fd = fd

    # Write initial contents of the file.
    set_ints(p, buffer.mirror, np.arange(n))
    length = p.pwrite(fd, p.read(buffer.mirror, size), 0)
    ASSERT_EQ(length, size)
    p.write(buffer.mirror, bytes(size))

    buffer.ptr = p.mmap(size, "r", shared=True, fd=buffer.fd)

    # Simulate a device reading system memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_READ, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_EQ(buffer.faults, 1)

    # Check what the device read.
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))

    hmm_buffer_free(p, buffer)
    # (hmm_buffer_free() does not close buffer->fd: the C test leaves the file open)


@TEST_F("hmm", "file_write")
def file_write(self: FixtureState, variant: Variant) -> None:
    """Write mmap'ed file memory."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4

    fd = hmm_create_file(p, size)
    ASSERT_GE(fd, 0)

    buffer = _new_buffer(p, size)
    buffer.fd = fd
    buffer.ptr = p.mmap(size, "rw", shared=True, fd=buffer.fd)

    # Initialize data that the device will write to buffer->ptr.
    set_ints(p, buffer.mirror, np.arange(n))

    # Simulate a device writing system memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_WRITE, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_EQ(buffer.faults, 1)

    # Check what the device wrote.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))

    # Check that the device also wrote the file.
    data = p.pread(fd, size, 0)
    ASSERT_EQ(len(data), size)
    p.write(buffer.mirror, data)
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))

    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "anon_read_multiple")
def anon_read_multiple(self: FixtureState, variant: Variant) -> None:
    """Read anonymous memory multiple times."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4

    for c in range(NTIMES):
        buffer = _new_buffer(p, size)
        buffer.ptr = p.mmap(size, "rw")

        # Initialize buffer in system memory.
        set_ints(p, buffer.ptr, np.arange(n) + c)

        # Simulate a device reading system memory.
        ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_READ, buffer, npages)
        ASSERT_EQ(ret, 0)
        ASSERT_EQ(buffer.cpages, npages)
        ASSERT_EQ(buffer.faults, 1)

        # Check what the device read.
        ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n) + c)

        hmm_buffer_free(p, buffer)


#: ``anon_teardown``: the racing munmap runs at a scheduling point drawn uniformly from
#: ``[0, TEARDOWN_POINTS)`` (the kernel test sleeps a random 0..32 us instead); an
#: unraced 1024-page HMM_DMIRROR_READ passes about 41 scheduling points
TEARDOWN_POINTS = 48
#: seed of iteration ``c`` of ``anon_teardown`` is ``TEARDOWN_SEED + c``
TEARDOWN_SEED = 0x484D4D


@TEST_F("hmm", "anon_teardown")
def anon_teardown(self: FixtureState, variant: Variant) -> None:
    """Try reading anonymous memory while it is being unmapped.

    The thread ``unmap_buffer()`` is an :class:`Interleave` running ``munmap()`` of the
    second half at a scheduling point chosen by ``random.Random(TEARDOWN_SEED + c)``."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4

    for c in range(NTIMES):
        buffer = _new_buffer(p, size)
        buffer.ptr = p.mmap(size, "rw")

        # Initialize buffer in system memory.
        set_ints(p, buffer.ptr, np.arange(n) + c)

        def unmap_buffer(buffer: HmmBuffer = buffer) -> int:
            # Delay for a bit and then unmap buffer while it is being read.
            ret = vm_munmap(p.mm, buffer.ptr + buffer.size // 2, buffer.size // 2)
            buffer.ptr = 0
            return ret

        seed = TEARDOWN_SEED + c
        at = random.Random(seed).randrange(TEARDOWN_POINTS)
        thread = Interleave(self.sys, unmap_buffer, at=at, name="unmap_buffer")
        with thread:
            # Simulate a device reading system memory.
            rc = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_READ, buffer, npages)
            if rc == 0:
                ASSERT_EQ(buffer.cpages, npages)
                ASSERT_EQ(buffer.faults, 1)

                # Check what the device read.
                ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n) + c)
        # pthread_join()
        ASSERT_EQ(thread.done, True)
        print(f"# anon_teardown c={c} seed={seed} at={at} rc={rc} munmap at {thread.point}")

        # As in C, unmap_buffer() cleared buffer->ptr: the first half stays mapped.
        hmm_buffer_free(p, buffer)


@TEST_F("hmm", "mixedmap")
def mixedmap(self: FixtureState, variant: Variant) -> None:
    """Test memory snapshot without faulting in pages accessed by the device."""
    p = self.proc
    npages = 1
    size = npages << self.page_shift

    buffer = _new_buffer(p, size, mirror_size=npages)

    # Reserve a range of addresses.
    buffer.ptr = p.mmap(size, "rw", fd=self.fd)

    # Simulate a device snapshotting CPU pagetables.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_SNAPSHOT, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)

    # Check what the device saw.
    m = p.read(buffer.mirror, npages)
    ASSERT_EQ(m[0], HMM_DMIRROR_PROT_READ)

    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "compound", releases=("6.12",))
def compound(self: FixtureState, variant: Variant) -> None:
    """Test the hmm_range_fault() handling of large pages (PMD or PUD)
    that should be mapped by a large page table entry.

    6.12's body: when the hugetlb mmap fails the test returns (and so passes)."""
    _compound(self, check_free=False)


@TEST_F("hmm", "compound", releases=("7.3",))
def compound_7_3(self: FixtureState, variant: Variant) -> None:
    """Test the hmm_range_fault() handling of large pages (PMD or PUD)
    that should be mapped by a large page table entry.

    7.3's body SKIPs "Not enough huge pages" when HugePages_Free is 0 and "Huge page
    could not be allocated" when the mmap fails."""
    _compound(self, check_free=True)


def _compound(self: FixtureState, check_free: bool) -> None:
    p = self.proc
    default_hsize = default_huge_page_size()

    # Skip test if we can't allocate a hugetlbfs page.
    if check_free and not hugetlb_free_default_pages(self):
        SKIP("Not enough huge pages")

    size = ALIGN(TWOMEG, default_hsize)
    npages = size >> self.page_shift
    n = size // 4

    buffer = HmmBuffer()
    try:
        buffer.ptr = p.mmap(size, "rw", hugetlb=True)
    except HmmError:
        if check_free:
            SKIP("Huge page could not be allocated")
        return

    buffer.size = size
    buffer.mirror_size = npages
    buffer.mirror = malloc(p, npages)
    ASSERT_NE(buffer.mirror, 0)

    # Initialize the pages the device will snapshot in buffer->ptr.
    set_ints(p, buffer.ptr, np.arange(n))

    # Simulate a device snapshotting CPU pagetables.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_SNAPSHOT, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)

    # Check what the device saw: every page at the level (PMD or PUD) of the first one.
    m = p.read_array(buffer.mirror, npages, np.uint8)
    prot = HMM_DMIRROR_PROT_WRITE | (HMM_DMIRROR_PROT_PUD if m[0] & HMM_DMIRROR_PROT_PUD
                                     else HMM_DMIRROR_PROT_PMD)
    ASSERT_ARRAY_EQ(m, prot)

    # Make the region read-only.
    p.mprotect(buffer.ptr, size, "r")

    # Simulate a device snapshotting CPU pagetables.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_SNAPSHOT, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)

    # Check what the device saw after mprotect(PROT_READ).
    m = p.read_array(buffer.mirror, npages, np.uint8)
    prot = HMM_DMIRROR_PROT_READ | (HMM_DMIRROR_PROT_PUD if m[0] & HMM_DMIRROR_PROT_PUD
                                    else HMM_DMIRROR_PROT_PMD)
    ASSERT_ARRAY_EQ(m, prot)

    p.munmap(buffer.ptr, buffer.size)
    buffer.ptr = 0
    hmm_buffer_free(p, buffer)
