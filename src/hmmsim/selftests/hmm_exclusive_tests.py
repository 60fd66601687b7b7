"""The device-exclusive and GUP tests of ``tools/testing/selftests/mm/hmm-tests.c``:
``exclusive``, ``exclusive_mprotect``, ``exclusive_cow`` and ``hmm_gup_test``, the same in
6.12 and 7.3 (7.3 only allocates its buffers through ``hmm_buffer_alloc()``). Ported from
the C in the same way as :mod:`.hmm_tests`: ``ptr[i]++`` over the buffer is a read of the
whole array checked against the expected values, then a write of the incremented ones."""

from __future__ import annotations

import numpy as np

from ..drivers.gup_test import (
    GUP_BASIC_TEST,
    GUP_FAST_BENCHMARK,
    PIN_FAST_BENCHMARK,
    PIN_LONGTERM_BENCHMARK,
    GupTest,
    gup_test_open,
)
from ..drivers.test_hmm_uapi import (
    HMM_DMIRROR_CHECK_EXCLUSIVE,
    HMM_DMIRROR_EXCLUSIVE,
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE,
)
from ..kernel.errno import EPERM
from ..kernel.gup import FOLL_LONGTERM, FOLL_WRITE
from ..process import Process
from .harness import ASSERT_EQ, ASSERT_NE, SKIP, TEST_F, FixtureState, Variant
from .hmm_migrate_tests import hmm_is_coherent_type
from .hmm_tests import (
    ALIGN,
    ASSERT_ARRAY_EQ,
    HMM_BUFFER_SIZE,
    HmmBuffer,
    _new_buffer,
    hmm_buffer_free,
    hmm_dmirror_cmd,
    hmm_migrate_sys_to_dev,
    ints,
    set_ints,
)

__all__ = ("gup_test_exec",)


def _exclusive_buffer(self: FixtureState) -> tuple[HmmBuffer, int, int]:
    """The common start: a private anonymous buffer of ``HMM_BUFFER_SIZE`` filled with
    ``ptr[i] = i`` and made device-exclusive; checks what the device read."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")
    ASSERT_NE(buffer.ptr, 0)
    # Initialize buffer in system memory.
    set_ints(p, buffer.ptr, np.arange(n))
    # Map memory exclusively for device access.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_EXCLUSIVE, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    # Check what the device read.
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))
    return buffer, npages, n


def _increment_and_check(proc: Process, ptr: int, n: int) -> None:
    """``for (...) ASSERT_EQ(ptr[i]++, i);`` then ``for (...) ASSERT_EQ(ptr[i], i + 1);``"""
    ASSERT_ARRAY_EQ(ints(proc, ptr, n), np.arange(n))
    set_ints(proc, ptr, np.arange(n) + 1)
    ASSERT_ARRAY_EQ(ints(proc, ptr, n), np.arange(n) + 1)


@TEST_F("hmm", "exclusive")
def exclusive(self: FixtureState, variant: Variant) -> None:
    """Basic check of exclusive faulting."""
    p = self.proc
    buffer, npages, n = _exclusive_buffer(self)
    # Fault pages back to system memory and check them.
    _increment_and_check(p, buffer.ptr, n)
    # Check atomic access revoked
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_CHECK_EXCLUSIVE, buffer, npages)
    ASSERT_EQ(ret, 0)
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "exclusive_mprotect")
def exclusive_mprotect(self: FixtureState, variant: Variant) -> None:
    """A device write to exclusive pages made read-only fails with -EPERM."""
    p = self.proc
    buffer, npages, n = _exclusive_buffer(self)
    p.mprotect(buffer.ptr, buffer.size, "r")  # raises (failing the test) if mprotect fails
    # Simulate a device writing system memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_WRITE, buffer, npages)
    ASSERT_EQ(ret, -EPERM)
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "exclusive_cow")
def exclusive_cow(self: FixtureState, variant: Variant) -> None:
    """Check copy-on-write works."""
    p = self.proc
    buffer, npages, n = _exclusive_buffer(self)
    child = p.fork()
    try:
        # The child increments and checks its copy, then _exit(0)s.
        _increment_and_check(child, buffer.ptr, n)
    finally:
        child.exit()
    # Parent: also increment to verify COW works for both processes.
    _increment_and_check(p, buffer.ptr, n)
    hmm_buffer_free(p, buffer)


def gup_test_exec(proc: Process, gup_fd: int, addr: int, cmd: int, npages: int, size: int, flags: int) -> int:
    """``gup_test_exec()``: one gup_test ioctl with ``gup_flags = FOLL_WRITE | flags``;
    0 or the errno."""
    gup = GupTest(nr_pages_per_call=npages, addr=addr, gup_flags=FOLL_WRITE | flags, size=size)
    ret = proc.task.ioctl(gup_fd, cmd, gup)
    return -ret if ret else 0


@TEST_F("hmm", "hmm_gup_test")
def hmm_gup_test(self: FixtureState, variant: Variant) -> None:
    """Test get user device pages through gup_test. Setting PIN_LONGTERM flag.
    This should trigger a migration back to system memory for both, private
    and coherent type pages."""
    p = self.proc
    gup_fd = gup_test_open(self.sys, p.task)
    if gup_fd < 0:
        SKIP("Skipping test, could not find gup_test driver")
    npages = 4
    size = npages << self.page_shift
    n = size // 4
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")
    ASSERT_NE(buffer.ptr, 0)
    # Initialize buffer in system memory.
    set_ints(p, buffer.ptr, np.arange(n))
    # Migrate memory to device.
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    # Check what the device read.
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))

    ASSERT_EQ(gup_test_exec(p, gup_fd, buffer.ptr, GUP_BASIC_TEST, 1, self.page_size, 0), 0)
    ASSERT_EQ(gup_test_exec(p, gup_fd, buffer.ptr + 1 * self.page_size, GUP_FAST_BENCHMARK, 1,
                            self.page_size, 0), 0)
    ASSERT_EQ(gup_test_exec(p, gup_fd, buffer.ptr + 2 * self.page_size, PIN_FAST_BENCHMARK, 1,
                            self.page_size, FOLL_LONGTERM), 0)
    ASSERT_EQ(gup_test_exec(p, gup_fd, buffer.ptr + 3 * self.page_size, PIN_LONGTERM_BENCHMARK, 1,
                            self.page_size, 0), 0)

    # Take snapshot to CPU pagetables
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_SNAPSHOT, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    m = p.read_array(buffer.mirror, npages, np.uint8).tolist()
    if hmm_is_coherent_type(variant.params["device_number"]):
        ASSERT_EQ(HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE, m[0])
        ASSERT_EQ(HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE, m[1])
    else:
        ASSERT_EQ(HMM_DMIRROR_PROT_WRITE, m[0])
        ASSERT_EQ(HMM_DMIRROR_PROT_WRITE, m[1])
    ASSERT_EQ(HMM_DMIRROR_PROT_WRITE, m[2])
    ASSERT_EQ(HMM_DMIRROR_PROT_WRITE, m[3])
    # Check again the content on the pages. Make sure there's no corrupted data.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))

    p.close(gup_fd)
    hmm_buffer_free(p, buffer)
