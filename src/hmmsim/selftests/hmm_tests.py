"""``tools/testing/selftests/mm/hmm-tests.c`` ported to the model.

Each ``TEST_F`` keeps its kernel name, its comment and its exact expectations (return
codes, ``cpages``, ``faults``, data). ``self`` is the fixture (``self.proc`` is the test
process, ``self.fd``/``self.fd0``/``self.fd1`` its open devices); memory the C code
gets from ``malloc``/``mmap`` is mapped in ``self.proc``, and ``int *ptr`` loops become
numpy arrays of int32 written and read through the simulated CPU.

Tests that need device memory migration (migrate*, exclusive*, hmm_gup_test,
hmm_cow_in_device, snapshot, double_map) arrive with migration support.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..drivers.dmirror import dmirror_open
from ..drivers.test_hmm_uapi import (
    HMM_DMIRROR_MIGRATE_TO_DEV, HMM_DMIRROR_MIGRATE_TO_SYS, HMM_DMIRROR_PROT_PMD, HMM_DMIRROR_PROT_PUD,
    HMM_DMIRROR_PROT_READ, HMM_DMIRROR_PROT_WRITE, HMM_DMIRROR_READ, HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE, HmmDmirrorCmd,
)
from ..errors import HmmError
from ..kernel.errno import EBADF, EFAULT, EPERM
from ..kernel.page_types import HPAGE_PMD_SIZE
from ..kernel.sched import Interleave
from ..kernel.task import vm_munmap
from ..process import Process
from .harness import ASSERT_EQ, ASSERT_GE, ASSERT_NE, SKIP, TEST_F, FixtureState, Variant

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
    f = proc.task.fget(fd)
    if f is None:
        return -EBADF
    cmd = HmmDmirrorCmd(addr=buffer.ptr, ptr=buffer.mirror, npages=npages)
    assert f.f_op.unlocked_ioctl is not None
    ret = f.f_op.unlocked_ioctl(f, request, cmd, proc.task)
    if ret:
        return int(ret)
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
