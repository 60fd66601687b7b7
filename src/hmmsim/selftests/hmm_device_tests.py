"""The device-memory tests of ``tools/testing/selftests/mm/hmm-tests.c`` about releasing
device memory, COW of device pages across fork and two devices mirroring one range:
``migrate_release``, ``hmm_cow_in_device`` and ``double_map``. Their bodies are the same in
6.12 and 7.3 apart from how the buffer is allocated (``malloc`` + ``mmap`` against 7.3's
``hmm_buffer_alloc()``, the same mapping) and the signal that ends
``hmm_cow_in_device``'s child (SIGTERM in 6.12, SIGKILL in 7.3: either way the child is
torn down without running any more code). Ported from the C like :mod:`.hmm_tests`.

The kernel paths they go through:

* ``migrate_release``: ``HMM_DMIRROR_RELEASE`` -> ``dmirror_device_remove_chunks()``
  evicts every page of the device (``migrate_device_range`` / ``_pages`` / ``_finalize``,
  a present system page replacing each device-private entry or coherent page), then
  ``memunmap_pages``; the CPU then reads plain system pages.
* ``hmm_cow_in_device``: ``fork`` -> ``copy_nonpresent_pte()`` makes writable
  device-private entries read-only in both parent and child (coherent pages are normal
  present pages: ``copy_present_pte()`` write-protects them and shares the anon folio).
  The parent's CPU write then faults: ``do_swap_page()`` -> the pagemap's
  ``migrate_to_ram`` brings the page back as an exclusive writable system page (private),
  or ``do_wp_page()`` copies the shared coherent page to a new system page. The snapshot
  then shows every page ``HMM_DMIRROR_PROT_WRITE`` (a system page, writable).
* ``double_map``: device 1 migrates pages that device 0 also mirrors; device 0's READ
  faults (``hmm_range_fault`` -> ``handle_mm_fault`` on a device-private entry of another
  owner -> ``migrate_to_ram``), for a coherent device the present pages are read in place.
"""

from __future__ import annotations

import numpy as np

from ..drivers.test_hmm_uapi import (
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_RELEASE,
    HMM_DMIRROR_SNAPSHOT,
)
from .harness import ASSERT_EQ, ASSERT_NE, EXPECT_EQ, EXPECT_NE, TEST_F, FixtureState, Variant
from .hmm_tests import (
    ALIGN,
    ASSERT_ARRAY_EQ,
    HMM_BUFFER_SIZE,
    _new_buffer,
    hmm_buffer_free,
    hmm_dmirror_cmd,
    hmm_migrate_sys_to_dev,
    ints,
    set_ints,
)

__all__ = ("double_map", "hmm_cow_in_device", "migrate_release")


@TEST_F("hmm", "migrate_release")
def migrate_release(self: FixtureState, variant: Variant) -> None:
    """Migrate anonymous memory to device memory, release the device's memory
    (HMM_DMIRROR_RELEASE) and fault the pages back: the data survives."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")

    # Initialize buffer in system memory.
    set_ints(p, buffer.ptr, np.arange(n))

    # Migrate memory to device.
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)

    # Check what the device read.
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))

    # Release device memory.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_RELEASE, buffer, npages)
    ASSERT_EQ(ret, 0)

    # Fault pages back to system memory and check them.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n // 2), np.arange(n // 2))

    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "hmm_cow_in_device")
def hmm_cow_in_device(self: FixtureState, variant: Variant) -> None:
    """Migrate 4 pages to the device, fork a child that spins, write every page in the
    parent (COW: a device-private page migrates back to system memory first), kill the
    child, and check that the parent's pages are writable system pages."""
    p = self.proc
    npages = 4
    size = npages << self.page_shift
    n = size // 4
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")

    # Initialize buffer in system memory.
    set_ints(p, buffer.ptr, np.arange(n))

    # Migrate memory to device.
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)

    child = p.fork()
    # Child process waits for SIGKILL (6.12: SIGTERM) from the parent; it runs no code.
    try:
        # Parent process writes to COW pages(s) and gets a new copy in system. In case of
        # device private pages, this write causes a migration to system mem first.
        set_ints(p, buffer.ptr, np.arange(n))
    finally:
        # Terminate child and wait: kill() + waitpid() reap a child killed by the signal.
        EXPECT_NE(child.pid, 0)
        child.exit()
        EXPECT_EQ(child.exited, True)

    # Take snapshot to CPU pagetables
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_SNAPSHOT, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    m = p.read(buffer.mirror, npages)
    for i in range(npages):
        ASSERT_EQ(HMM_DMIRROR_PROT_WRITE, m[i])

    hmm_buffer_free(p, buffer)


@TEST_F("hmm2", "double_map")
def double_map(self: FixtureState, variant: Variant) -> None:
    """Two devices mirror the same read-only range; after device 1 migrates it, device 0
    still reads it (faulting it back from device 1 if it is device-private)."""
    p = self.proc
    npages = 6
    size = npages << self.page_shift
    n = size // 4
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")

    # Initialize buffer in system memory.
    set_ints(p, buffer.ptr, np.arange(n))

    # Make region read-only.
    p.mprotect(buffer.ptr, size, "r")

    # Simulate device 0 reading system memory.
    ret = hmm_dmirror_cmd(p, self.fd0, HMM_DMIRROR_READ, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_EQ(buffer.faults, 1)

    # Check what the device read.
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))

    # Simulate device 1 reading system memory.
    ret = hmm_dmirror_cmd(p, self.fd1, HMM_DMIRROR_READ, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_EQ(buffer.faults, 1)

    # Check what the device read.
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))

    # Migrate pages to device 1 and try to read from device 0.
    ret = hmm_migrate_sys_to_dev(p, self.fd1, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)

    ret = hmm_dmirror_cmd(p, self.fd0, HMM_DMIRROR_READ, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_EQ(buffer.faults, 1)

    # Check what device 0 read.
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))

    hmm_buffer_free(p, buffer)
