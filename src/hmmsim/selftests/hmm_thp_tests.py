"""The device-THP migration tests that 7.3's ``tools/testing/selftests/mm/hmm-tests.c``
added: ``migrate_anon_huge_empty``, ``_zero``, ``_free``, ``_fault``,
``migrate_partial_unmap_fault``, ``migrate_remap_fault``, ``migrate_anon_huge_err``,
``migrate_anon_huge_zero_err`` and ``benchmark_thp_migration``, ported from the C in the
same way as :mod:`.hmm_tests`.

On the coherent variant a device THP needs a second 256 MiB chunk at the device's one
fixed SPM range: ``memremap_pages`` WARNs "Conflicting mapping in same section" and
fails with ``-ENOMEM``, so every THP goes to order-0 device pages (the source is split).
``migrate_anon_huge_err`` then fails its MIGRATE_TO_SYS with ``-ENOMEM``, as the real
7.3 kernel does: with FAIL_ALLOC set, the first order-0 page of the split THP cannot be
allocated and ``dmirror_devmem_fault_alloc_and_copy`` returns ``VM_FAULT_OOM``
(:data:`~hmmsim.selftests.harness.REAL_KERNEL_FAILS` has the reason)."""

from __future__ import annotations

import os
import sys as _sys
import time

import numpy as np

from ..drivers.test_hmm_uapi import (
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_SNAPSHOT,
)
from ..kernel.page_types import PAGE_SIZE
from ..kernel.pgtable import is_swap_pte, pmd_present
from ..process import Process
from .harness import ASSERT_EQ, ASSERT_FALSE, ASSERT_NE, TEST_F, FixtureState, Variant
from .hmm_migrate_tests import hmm_is_coherent_type
from .hmm_tests import (
    ALIGN,
    ASSERT_ARRAY_EQ,
    TWOMEG,
    HmmBuffer,
    _new_buffer,
    hmm_buffer_free,
    hmm_dmirror_cmd,
    hmm_migrate_dev_to_sys,
    hmm_migrate_sys_to_dev,
    ints,
    read_pmd_pagesize,
    set_ints,
)

__all__ = ("BENCHMARK_MAX_SIZE", "PM_PRESENT", "PM_SWAP", "hmm_buffer_alloc", "pagemap_get_entry",
           "print_benchmark_results", "run_migration_benchmark")

#: the largest buffer ``benchmark_thp_migration`` runs (the C goes to 256 MiB, 128 THPs;
#: the default keeps the test suite quick: set ``HMMSIM_THP_BENCH_MAX`` in bytes for more)
BENCHMARK_MAX_SIZE = int(os.environ.get("HMMSIM_THP_BENCH_MAX", str(TWOMEG)))

#: ``PM_SWAP`` of /proc/PID/pagemap (bit 62) and ``PM_PRESENT`` (bit 63)
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63


def hmm_buffer_alloc(p: Process, mmap_size: int, mirror_size: int, prot: str) -> HmmBuffer:
    """``hmm_buffer_alloc()`` (7.3): a ``malloc``'d mirror of *mirror_size* and a private
    anonymous mapping of *mmap_size*."""
    buffer = _new_buffer(p, mmap_size, mirror_size)
    buffer.ptr = p.mmap(mmap_size, prot)
    return buffer


def pagemap_get_entry(p: Process, addr: int) -> int:
    """``pagemap_get_entry()``: the /proc/self/pagemap word of *addr*, ``PM_PRESENT`` and
    ``PM_SWAP`` only (``pagemap_pmd_range``: a non-present PMD or pte that is not none is a
    swap entry; device-private entries are)."""
    mm = p.mm
    pmd = mm.pmd_ref(addr)
    e = pmd.get() if pmd is not None else 0
    if e and (not pmd_present(e) or e & (1 << 7)):
        return PM_PRESENT if pmd_present(e) else PM_SWAP
    pte = mm.lookup_pte(addr)
    if pte == 0:
        return 0
    return PM_SWAP if is_swap_pte(pte) else PM_PRESENT


def _mirror_ff(p: Process, buffer: HmmBuffer, size: int) -> None:
    """``memset(buffer->mirror, 0xFF, size)``."""
    p.write(buffer.mirror, b"\xff" * size)


def _huge_buffer(self: FixtureState, prot: str, advice: str | None, mirror: int = 1) -> tuple[HmmBuffer, int, int]:
    """The common start: a 2-PMD mapping, the mirror set to 0xFF, the PMD-aligned half
    madvised; returns (buffer with ptr at the aligned half, old ptr, size)."""
    p = self.proc
    size = read_pmd_pagesize()
    buffer = hmm_buffer_alloc(p, 2 * size, mirror * size, prot)
    _mirror_ff(p, buffer, mirror * size)
    map_ = ALIGN(buffer.ptr, size)
    if advice is not None:
        p.madvise(map_, size, advice)
    old_ptr = buffer.ptr
    buffer.ptr = map_
    return buffer, old_ptr, size


@TEST_F("hmm", "migrate_anon_huge_empty")
def migrate_anon_huge_empty(self: FixtureState, variant: Variant) -> None:
    """Migrate private anonymous huge empty page."""
    p = self.proc
    buffer, old_ptr, size = _huge_buffer(self, "r", "hugepage")
    npages = size >> self.page_shift
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, size // 4), np.zeros(size // 4))
    buffer.ptr = old_ptr
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "migrate_anon_huge_zero")
def migrate_anon_huge_zero(self: FixtureState, variant: Variant) -> None:
    """Migrate private anonymous huge zero page."""
    p = self.proc
    buffer, old_ptr, size = _huge_buffer(self, "r", "hugepage")
    npages = size >> self.page_shift
    # Initialize a read-only zero huge page.
    ASSERT_EQ(int(ints(p, buffer.ptr, 1)[0]), 0)
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, size // 4), np.zeros(size // 4))
    # Fault pages back to system memory and check them.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, size // 4), np.zeros(size // 4))
    buffer.ptr = old_ptr
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "migrate_anon_huge_free")
def migrate_anon_huge_free(self: FixtureState, variant: Variant) -> None:
    """Migrate private anonymous huge page and free."""
    p = self.proc
    buffer, old_ptr, size = _huge_buffer(self, "rw", "hugepage")
    npages = size >> self.page_shift
    n = size // 4
    set_ints(p, buffer.ptr, np.arange(n))
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))
    # Try freeing it.
    p.madvise(buffer.ptr, size, "free")
    buffer.ptr = old_ptr
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "migrate_anon_huge_fault")
def migrate_anon_huge_fault(self: FixtureState, variant: Variant) -> None:
    """Migrate private anonymous huge page and fault back to sysmem. (MADV_COLLAPSE
    makes the 512 written pages one THP.)"""
    p = self.proc
    buffer, old_ptr, size = _huge_buffer(self, "rw", None)
    npages = size >> self.page_shift
    n = size // 4
    set_ints(p, buffer.ptr, np.arange(n))
    p.madvise(buffer.ptr, size, "collapse")
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))
    if not hmm_is_coherent_type(variant.params["device_number"]):
        ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_SNAPSHOT, buffer, npages)
        ASSERT_EQ(ret, 0)
        ASSERT_EQ(buffer.cpages, npages)
        m = np.frombuffer(p.read(buffer.mirror, npages), np.uint8)
        ASSERT_ARRAY_EQ(m, np.full(npages, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE
                                   | HMM_DMIRROR_PROT_PMD))
        for i in range(npages):
            entry = pagemap_get_entry(p, buffer.ptr + i * self.page_size)
            ASSERT_NE(entry & PM_SWAP, 0)
            ASSERT_FALSE(entry & PM_PRESENT)
    # Fault pages back to system memory and check them.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))
    buffer.ptr = old_ptr
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "migrate_partial_unmap_fault")
def migrate_partial_unmap_fault(self: FixtureState, variant: Variant) -> None:
    """Migrate memory and fault back to sysmem after partially unmapping."""
    p = self.proc
    size = read_pmd_pagesize() or TWOMEG
    unmap_size = size // 2
    offsets = (0, size // 4, size // 2)
    n = size // 4
    for use_thp in range(2):
        for off in offsets:
            buffer = hmm_buffer_alloc(p, 2 * size, size, "rw")
            _mirror_ff(p, buffer, size)
            npages = size >> self.page_shift
            map_ = ALIGN(buffer.ptr, size)
            p.madvise(map_, size, "hugepage" if use_thp else "nohugepage")
            old_ptr = buffer.ptr
            buffer.ptr = map_
            set_ints(p, buffer.ptr, np.arange(n))
            ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
            ASSERT_EQ(ret, 0)
            ASSERT_EQ(buffer.cpages, npages)
            ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))
            p.munmap(buffer.ptr + off, unmap_size)
            # Fault pages back to system memory and check them.
            lo, hi = off // 4, (off + unmap_size) // 4
            if lo:
                ASSERT_ARRAY_EQ(ints(p, buffer.ptr, lo), np.arange(lo))
            if hi < n:
                ASSERT_ARRAY_EQ(ints(p, buffer.ptr + hi * 4, n - hi), np.arange(hi, n))
            buffer.ptr = old_ptr
            hmm_buffer_free(p, buffer)


@TEST_F("hmm", "migrate_remap_fault")
def migrate_remap_fault(self: FixtureState, variant: Variant) -> None:
    """Migrate memory, mremap it (before or after the migration, with or without
    MREMAP_DONTUNMAP) to three offsets, and fault it back."""
    p = self.proc
    size = read_pmd_pagesize() or TWOMEG
    offsets = (0, size // 4, size // 2)
    n = size // 4
    for before in range(2):
        for dont_unmap in range(2):
            for use_thp in range(2):
                for off in offsets:
                    buffer = hmm_buffer_alloc(p, 8 * size, size, "rw")
                    _mirror_ff(p, buffer, size)
                    npages = size >> self.page_shift
                    map_ = ALIGN(buffer.ptr, size)
                    p.madvise(map_, size, "hugepage" if use_thp else "nohugepage")
                    old_ptr = buffer.ptr
                    p.munmap(map_ + size, size * 2)
                    buffer.ptr = map_
                    set_ints(p, buffer.ptr, np.arange(n))
                    new_ptr = 0
                    if before:
                        new_ptr = p.mremap(map_, size, size, new_addr=map_ + size + off,
                                           dontunmap=bool(dont_unmap))
                        buffer.ptr = new_ptr
                    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
                    ASSERT_EQ(ret, 0)
                    ASSERT_EQ(buffer.cpages, npages)
                    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))
                    if not before:
                        new_ptr = p.mremap(map_, size, size, new_addr=map_ + size + off,
                                           dontunmap=bool(dont_unmap))
                        buffer.ptr = new_ptr
                    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.arange(n))
                    p.munmap(new_ptr, size)
                    buffer.ptr = old_ptr
                    hmm_buffer_free(p, buffer)


def _remap_huge(p: Process, buffer: HmmBuffer, old_ptr: int, size: int, prot: str) -> int:
    """The "unmap and remap the region to reset things" step: returns the new old_ptr,
    buffer.ptr at its PMD-aligned half (madvised hugepage)."""
    p.munmap(old_ptr, 2 * size)
    old_ptr = p.mmap(2 * size, prot)
    ASSERT_NE(old_ptr, 0)
    map_ = ALIGN(old_ptr, size)
    p.madvise(map_, size, "hugepage")
    buffer.ptr = map_
    return old_ptr


@TEST_F("hmm", "migrate_anon_huge_err")
def migrate_anon_huge_err(self: FixtureState, variant: Variant) -> None:
    """Migrate private anonymous huge page with allocation errors."""
    p = self.proc
    buffer, old_ptr, size = _huge_buffer(self, "rw", "hugepage", mirror=2)
    npages = size >> self.page_shift
    n = size // 4
    set_ints(p, buffer.ptr, np.arange(n))
    # Migrate memory to device but force a THP allocation error.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_FLAGS, buffer, HMM_DMIRROR_FLAG_FAIL_ALLOC)
    ASSERT_EQ(ret, 0)
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.arange(n))
    # Try faulting back a single (PAGE_SIZE) page.
    ASSERT_EQ(int(ints(p, buffer.ptr + 2048 * 4, 1)[0]), 2048)
    # unmap and remap the region to reset things.
    old_ptr = _remap_huge(p, buffer, old_ptr, size, "rw")
    set_ints(p, buffer.ptr, np.arange(n))
    # Migrate THP to device.
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    # Force an allocation error when faulting back a THP resident in the device.
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_FLAGS, buffer, HMM_DMIRROR_FLAG_FAIL_ALLOC)
    ASSERT_EQ(ret, 0)
    ret = hmm_migrate_dev_to_sys(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)  # the coherent variant fails here, as on the real kernel (REAL_KERNEL_FAILS)
    ASSERT_EQ(int(ints(p, buffer.ptr + 2048 * 4, 1)[0]), 2048)
    buffer.ptr = old_ptr
    hmm_buffer_free(p, buffer)


@TEST_F("hmm", "migrate_anon_huge_zero_err")
def migrate_anon_huge_zero_err(self: FixtureState, variant: Variant) -> None:
    """Migrate private anonymous huge zero page with allocation errors."""
    p = self.proc
    buffer, old_ptr, size = _huge_buffer(self, "r", "hugepage", mirror=2)
    npages = size >> self.page_shift
    n = size // 4
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_FLAGS, buffer, HMM_DMIRROR_FLAG_FAIL_ALLOC)
    ASSERT_EQ(ret, 0)
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    ASSERT_ARRAY_EQ(ints(p, buffer.mirror, n), np.zeros(n))
    # Try faulting back a single (PAGE_SIZE) page.
    ASSERT_EQ(int(ints(p, buffer.ptr + 2048 * 4, 1)[0]), 0)
    # unmap and remap the region to reset things.
    ptr = buffer.ptr
    old_ptr = _remap_huge(p, buffer, old_ptr, size, "r")
    # Initialize buffer in system memory (zero THP page): the C reads through ``ptr``,
    # the old aligned address, which the new mapping covers again.
    ASSERT_EQ(int(ints(p, ptr, 1)[0]), 0)
    ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_FLAGS, buffer, HMM_DMIRROR_FLAG_FAIL_ALLOC)
    ASSERT_EQ(ret, 0)
    ret = hmm_migrate_sys_to_dev(p, self.fd, buffer, npages)
    ASSERT_EQ(ret, 0)
    ASSERT_EQ(buffer.cpages, npages)
    # Fault the device memory back and check it.
    ASSERT_ARRAY_EQ(ints(p, buffer.ptr, n), np.zeros(n))
    buffer.ptr = old_ptr
    hmm_buffer_free(p, buffer)


# -- benchmark_thp_migration -------------------------------------------------------------------------
def _get_time_ms() -> float:
    return time.perf_counter() * 1000.0


def run_migration_benchmark(self: FixtureState, use_thp: bool, buffer_size: int,
                            iterations: int) -> dict[str, float] | None:
    """``run_migration_benchmark()``: average sys->dev and dev->sys times over
    *iterations* after one warm-up round, and the throughputs in GB/s."""
    p = self.proc
    npages = buffer_size // PAGE_SIZE
    buffer = hmm_buffer_alloc(p, buffer_size, buffer_size, "rw")
    try:
        _mirror_ff(p, buffer, buffer_size)
        p.madvise(buffer.ptr, buffer_size, "hugepage" if use_thp else "nohugepage")
        set_ints(p, buffer.ptr, np.arange(buffer_size // 4) & 0xFF)
        if hmm_migrate_sys_to_dev(p, self.fd, buffer, npages) or \
                hmm_migrate_dev_to_sys(p, self.fd, buffer, npages):
            return None
        s2d = d2s = 0.0
        for _ in range(iterations):
            t0 = _get_time_ms()
            if hmm_migrate_sys_to_dev(p, self.fd, buffer, npages):
                return None
            t1 = _get_time_ms()
            if hmm_migrate_dev_to_sys(p, self.fd, buffer, npages):
                return None
            t2 = _get_time_ms()
            s2d += t1 - t0
            d2s += t2 - t1
    finally:
        hmm_buffer_free(p, buffer)
    r = {"sys_to_dev_time": s2d / iterations, "dev_to_sys_time": d2s / iterations}
    gib = buffer_size / (1024.0 ** 3)
    r["throughput_s2d"] = gib / (r["sys_to_dev_time"] / 1000.0)
    r["throughput_d2s"] = gib / (r["dev_to_sys_time"] / 1000.0)
    return r


def print_benchmark_results(test_name: str, buffer_size: int, thp: dict[str, float],
                            regular: dict[str, float]) -> None:
    """``print_benchmark_results()``: the kernel's table, line for line."""
    def imp(a: float, b: float) -> float:
        return (a - b) / a * 100.0
    out = _sys.stdout
    print(f"\n=== {test_name} ({buffer_size / (1024.0 * 1024.0):.1f} MB) ===", file=out)
    print("                     | With THP        | Without THP     | Improvement", file=out)
    print("---------------------------------------------------------------------", file=out)
    print(f"Sys->Dev Migration   | {thp['sys_to_dev_time']:.3f} ms        | "
          f"{regular['sys_to_dev_time']:.3f} ms        | "
          f"{imp(regular['sys_to_dev_time'], thp['sys_to_dev_time']):.1f}%", file=out)
    print(f"Dev->Sys Migration   | {thp['dev_to_sys_time']:.3f} ms        | "
          f"{regular['dev_to_sys_time']:.3f} ms        | "
          f"{imp(regular['dev_to_sys_time'], thp['dev_to_sys_time']):.1f}%", file=out)
    print(f"S->D Throughput      | {thp['throughput_s2d']:.2f} GB/s      | "
          f"{regular['throughput_s2d']:.2f} GB/s      | "
          f"{-imp(regular['throughput_s2d'], thp['throughput_s2d']):.1f}%", file=out)
    print(f"D->S Throughput      | {thp['throughput_d2s']:.2f} GB/s      | "
          f"{regular['throughput_d2s']:.2f} GB/s      | "
          f"{-imp(regular['throughput_d2s'], thp['throughput_d2s']):.1f}%", file=out)


@TEST_F("hmm", "benchmark_thp_migration")
def benchmark_thp_migration(self: FixtureState, variant: Variant) -> None:
    """Benchmark THP migration with different buffer sizes (up to
    :data:`BENCHMARK_MAX_SIZE`)."""
    thp_size = read_pmd_pagesize() or TWOMEG
    iterations = 5
    print("\nHMM THP Migration Benchmark")
    print("---------------------------")
    print(f"System page size: {PAGE_SIZE} bytes")
    tests = ((thp_size // 4, "Small Buffer"), (thp_size // 2, "Half THP Size"),
             (thp_size, "Single THP Size"), (thp_size * 2, "Two THP Size"),
             (thp_size * 4, "Four THP Size"), (thp_size * 8, "Eight THP Size"),
             (thp_size * 128, "One twenty eight THP Size"))
    for size, name in tests:
        if size > 0x7FFFFFFF or size > BENCHMARK_MAX_SIZE:
            break
        thp = run_migration_benchmark(self, True, size, iterations)
        ASSERT_NE(thp, None)
        regular = run_migration_benchmark(self, False, size, iterations)
        ASSERT_NE(regular, None)
        assert thp is not None and regular is not None
        print_benchmark_results(name, size, thp, regular)
