"""The unified fault+migrate walk series' addition to ``hmm-tests.c``:
``TEST_F(hmm, migrate_on_fault)`` (its test patch, co-written by Marco Pagani), run only
with the option (``hmmsim selftest --kernel 7.3 --migrate-on-fault``; the harness places
it after ``migrate``, :data:`~hmmsim.selftests.harness.MIGRATE_ON_FAULT_TESTS`).
Ported from the C in the same way as :mod:`.hmm_tests`."""

from __future__ import annotations

import numpy as np

from ..drivers.test_hmm_uapi import HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV
from ..process import Process
from .harness import (
    ASSERT_EQ,
    ASSERT_NE,
    MIGRATE_ON_FAULT,
    TEST_F,
    FixtureState,
    Variant,
)
from .hmm_tests import (
    ALIGN,
    ASSERT_ARRAY_EQ,
    HMM_BUFFER_SIZE,
    HmmBuffer,
    _new_buffer,
    hmm_buffer_free,
    hmm_dmirror_cmd,
    ints,
    set_ints,
)

__all__ = ("hmm_migrate_on_fault_to_dev",)


def hmm_migrate_on_fault_to_dev(proc: Process, fd: int, buffer: HmmBuffer, npages: int) -> int:
    """The series' helper: HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV over *buffer*."""
    return hmm_dmirror_cmd(proc, fd, HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV, buffer, npages)


@TEST_F("hmm", "migrate_on_fault", releases=(MIGRATE_ON_FAULT,))
def migrate_on_fault(self: FixtureState, variant: Variant) -> None:
    """Fault in and migrate anonymous memory to device memory in one walk: every page
    migrated (``cpages == npages``) and the device reads back what the CPU wrote."""
    p = self.proc
    npages = ALIGN(HMM_BUFFER_SIZE, self.page_size) >> self.page_shift
    ASSERT_NE(npages, 0)
    size = npages << self.page_shift
    n = size // 4
    buffer = _new_buffer(p, size)
    buffer.ptr = p.mmap(size, "rw")
    # Initialize buffer in system memory.
    set_ints(p, buffer.ptr, np.arange(n))
    # Fault and migrate memory to device.
    ret = hmm_migrate_on_fault_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    # Check what the device read.
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))
    hmm_buffer_free(p, buffer)
