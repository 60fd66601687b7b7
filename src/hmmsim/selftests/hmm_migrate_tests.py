"""The device-memory migration tests of ``tools/testing/selftests/mm/hmm-tests.c`` that
need only order-0 migration (MIGRATE_TO_DEV / MIGRATE_TO_SYS and CPU faults through
``migrate_to_ram``): ``migrate``, ``migrate_file_private``, ``migrate_fault``,
``migrate_shared``, ``migrate_mixed``, ``migrate_multiple`` and ``snapshot``, the same in
6.12 and 7.3 (7.3 only allocates its buffers through ``hmm_buffer_alloc()``).
Ported from the C in the same way as :mod:`.hmm_tests`."""

from __future__ import annotations

import numpy as np

from ..drivers.test_hmm_uapi import (
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
    HMM_DMIRROR_SNAPSHOT,
)
from ..kernel.errno import EINVAL, ENOENT
from .harness import ASSERT_EQ, ASSERT_GE, ASSERT_NE, TEST_F, FixtureState, Variant
from .hmm_tests import (
    ALIGN,
    ASSERT_ARRAY_EQ,
    HMM_BUFFER_SIZE,
    NTIMES,
    _new_buffer,
    hmm_buffer_free,
    hmm_create_file,
    hmm_dmirror_cmd,
    hmm_migrate_dev_to_sys,
    hmm_migrate_sys_to_dev,
    ints,
    set_ints,
)

__all__ = ("hmm_is_coherent_type",)


def hmm_is_coherent_type(dev_num: int) -> bool:
    """``hmm_is_coherent_type()``: devices 2 and 3 have coherent memory."""
    return dev_num >= 2


def _migrate_and_check(self: FixtureState, shared: bool = False, file: bool = False) -> None:
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4
    buffer = _new_buffer(p, size)
    if file:
        fd = hmm_create_file(p, size)
        ASSERT_GE(fd, 0)
        buffer.fd = fd
        buffer.ptr = p.mmap(size, "rw", fd=fd)
    else:
        buffer.ptr = p.mmap(size, "rw", shared=shared)
    if shared:
        # Migrate memory to device: a shared mapping is not migrated, so the device
        # finds nothing to read back.
        ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
        ASSERT_EQ(ret, -ENOENT)
        hmm_buffer_free(p, buffer)
        return
    # Initialize buffer in system memory.
    set_ints(p, buffer.ptr, np.arange(n))
    # Migrate memory to device.
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    # Check what the device read.
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "migrate")
def migrate(self: FixtureState, variant: Variant) -> None:
    """Migrate anonymous memory to device memory."""
    _migrate_and_check(self)


@TEST_F("hmm", "migrate_file_private")
def migrate_file_private(self: FixtureState, variant: Variant) -> None:
    """Migrate private file memory (COW copies after the CPU writes) to device memory."""
    _migrate_and_check(self, file=True)


@TEST_F("hmm", "migrate_fault")
def migrate_fault(self: FixtureState, variant: Variant) -> None:
    """Migrate anonymous memory to the device, fault half of it back, migrate the mix."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")
    set_ints(p, buffer.ptr, np.arange(n))
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))
    # Fault half the pages back to system memory and check them.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n // 2), np.arange(n // 2))
    # Migrate memory to the device again.
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "migrate_shared")
def migrate_shared(self: FixtureState, variant: Variant) -> None:
    """Migrate anonymous shared memory to device private memory: -ENOENT."""
    _migrate_and_check(self, shared=True)


@TEST_F("hmm2", "migrate_mixed")
def migrate_mixed(self: FixtureState, variant: Variant) -> None:
    """Try to migrate various memory types to device private memory."""
    p = self.proc
    ps = self.page_size
    npages = 6
    size = npages << self.page_shift
    buffer = _new_buffer(p, size)
    buffer.ptr = base = p.mmap(size, "none")
    # Migrating a protected area should be an error.
    ASSERT_EQ(hmm_migrate_sys_to_dev(p, self.fd1, buffer, npages), -EINVAL)
    # Punch a hole after the first page address.
    p.munmap(base + ps, ps)
    # We expect an error if the vma doesn't cover the range.
    ASSERT_EQ(hmm_migrate_sys_to_dev(p, self.fd1, buffer, 3), -EINVAL)
    # Page 2 will be a read-only zero page.
    p.mprotect(base + 2 * ps, ps, "r")
    val = int(ints(p, base + 2 * ps, 1)[0]) + 3
    ASSERT_EQ(val, 3)
    # Page 3 will be read-only.
    p.mprotect(base + 3 * ps, ps, "rw")
    set_ints(p, base + 3 * ps, [val])
    p.mprotect(base + 3 * ps, ps, "r")
    # Page 4-5 will be read-write.
    p.mprotect(base + 4 * ps, 2 * ps, "rw")
    set_ints(p, base + 4 * ps, [val])
    set_ints(p, base + 5 * ps, [val])
    # Now try to migrate pages 2-5 to device 1.
    buffer.ptr = base + 2 * ps
    ret = hmm_migrate_sys_to_dev(p, self.fd1, buffer, 4)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, 4)
    # Page 5 won't be migrated to device 0 because it's on device 1.
    buffer.ptr = base + 5 * ps
    ASSERT_EQ(hmm_migrate_sys_to_dev(p, self.fd0, buffer, 1), -ENOENT)
    buffer.ptr = base
    p.munmap(base, ps)
    p.munmap(base + 2 * ps, 4 * ps)
    buffer.ptr = 0
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "migrate_multiple")
def migrate_multiple(self: FixtureState, variant: Variant) -> None:
    """Migrate anonymous memory to device memory and back, NTIMES: through CPU faults
    for private memory, explicitly (MIGRATE_TO_SYS) for coherent memory."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4
    for _c in range(NTIMES):
        buffer = _new_buffer(p, size)
        buffer.ptr = p.mmap(size, "rw")
        set_ints(p, buffer.ptr, np.arange(n))
        ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
        ASSERT_EQ(ret, 0)
        ASSERT_EQ(buffer.cpages, npages)
        ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))
        if hmm_is_coherent_type(variant.params["device_number"]):
            ret = hmm_migrate_dev_to_sys(p, self.fd, buffer, npages)
            ASSERT_EQ(ret, 0)
            ASSERT_EQ(buffer.cpages, npages)
        ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))
        hmm_buffer_free(p, buffer)


@TEST_F("hmm2", "snapshot")
def snapshot(self: FixtureState, variant: Variant) -> None:
    """Snapshot without faulting: a hole, the zero page, read-only and writable pages, a
    page on device 0 and one on device 1."""
    p = self.proc
    ps = self.page_size
    npages = 7
    size = npages << self.page_shift
    buffer = _new_buffer(p, size, npages)
    buffer.ptr = base = p.mmap(size, "none")
    # Punch a hole after the first page address.
    p.munmap(base + ps, ps)
    # Page 2 will be read-only zero page.
    p.mprotect(base + 2 * ps, ps, "r")
    val = int(ints(p, base + 2 * ps, 1)[0]) + 3
    ASSERT_EQ(val, 3)
    # Page 3 will be read-only.
    p.mprotect(base + 3 * ps, ps, "rw")
    set_ints(p, base + 3 * ps, [val])
    p.mprotect(base + 3 * ps, ps, "r")
    # Page 4-6 will be read-write.
    p.mprotect(base + 4 * ps, 3 * ps, "rw")
    set_ints(p, base + 4 * ps, [val])
    # Page 5 will be migrated to device 0.
    buffer.ptr = base + 5 * ps
    ASSERT_EQ(hmm_migrate_sys_to_dev(p, self.fd0, buffer, 1), 0)
    ASSERT_EQ(buffer.cpages, 1)
    # Page 6 will be migrated to device 1.
    buffer.ptr = base + 6 * ps
    ASSERT_EQ(hmm_migrate_sys_to_dev(p, self.fd1, buffer, 1), 0)
    ASSERT_EQ(buffer.cpages, 1)
    # Simulate a device snapshotting CPU pagetables.
    buffer.ptr = base
    ASSERT_EQ(hmm_dmirror_cmd(p, self.fd0, HMM_DMIRROR_SNAPSHOT, buffer, npages), 0)
    ASSERT_EQ(buffer.cpages, npages)
    m = p.read(buffer.mirror, npages)
    ASSERT_EQ(m[0], HMM_DMIRROR_PROT_ERROR)
    ASSERT_EQ(m[1], HMM_DMIRROR_PROT_ERROR)
    ASSERT_EQ(m[2], HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ)
    ASSERT_EQ(m[3], HMM_DMIRROR_PROT_READ)
    ASSERT_EQ(m[4], HMM_DMIRROR_PROT_WRITE)
    if not hmm_is_coherent_type(variant.params["device_number0"]):
        ASSERT_EQ(m[5], HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE)
        ASSERT_EQ(m[6], HMM_DMIRROR_PROT_NONE)
    else:
        ASSERT_EQ(m[5], HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE)
        ASSERT_EQ(m[6], HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | HMM_DMIRROR_PROT_WRITE)
    p.munmap(base, ps)
    p.munmap(base + 2 * ps, 5 * ps)
    buffer.ptr = 0
    hmm_buffer_free(p, buffer)
