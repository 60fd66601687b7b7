"""HMM_DMIRROR_RELEASE (``dmirror_device_remove_chunks()``) and ``memunmap_pages()``:
every chunk of the device is evicted and unmapped, whoever holds its pages, and the next
device allocation maps a new chunk (a private device gets its released pfn range back, a
coherent device its fixed SPM range)."""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim.drivers.test_hmm_uapi import (
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_RELEASE,
    HmmDmirrorCmd,
)
from hmmsim.kernel.locking import DeadlockError
from hmmsim.kernel.errno import EINVAL
from hmmsim.kernel.memremap import memunmap_pages
from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.pgtable import pte_pfn, pte_present, pte_to_swp_entry, swp_offset_pfn
from hmmsim.kernel.system import DEVMEM_CHUNK_PAGES

KERNELS = ("6.12", "7.3")
W = HMM_DMIRROR_PROT_WRITE


def pattern(n_pages: int, seed: int = 0) -> bytes:
    return (np.arange(n_pages * P // 4, dtype=np.uint32) + seed).tobytes()


def _device_pfn(proc, addr: int) -> int:
    """The device pfn behind *addr* (a device-private entry or a coherent page)."""
    pte = int(proc.mm.lookup_pte(addr))
    return pte_pfn(pte) if pte_present(pte) else swp_offset_pfn(pte_to_swp_entry(pte))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("minor", [0, 2])
def test_release_evicts_unmaps_and_next_migration_maps_a_new_chunk(make_system, kernel: str, minor: int) -> None:
    sys = make_system(kernel=kernel)
    proc = sys.spawn()
    a = proc.mmap(8 * P)
    proc.write(a, pattern(8, 1))
    d = proc.open_device(minor)
    mdev = sys.dmirror_devices[minor]
    assert d.migrate(a, 8).cpages == 8
    local = HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL if minor < 2 else HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL
    assert set(d.snapshot(a, 8).tolist()) == {local | W}
    (chunk,) = mdev.chunks
    lo, n = chunk.pagemap.start_pfn, chunk.pagemap.nr_pages
    freed = sys.stats["memremap.page_free"]
    d.release()
    # every device page came back as a system page, freed to the driver (not its free list)
    assert sys.stats["memremap.page_free"] - freed == 8
    assert mdev.chunks == [] and mdev.free_pages == []
    assert sys.stats["dmirror.chunks_removed"] == 1
    # memunmap_pages took the range out of the pfn space
    assert not sys.mem.pgmap[lo:lo + n].any() and sys.pgmap_of(lo) is None
    assert chunk.pagemap not in sys.pgmaps
    assert d.snapshot(a, 8).tolist() == [W] * 8
    assert proc.read(a, 8 * P) == pattern(8, 1)
    sys.check_invariants()
    # the next allocation maps a chunk again: the same pfns (released region / SPM range)
    assert d.migrate(a, 8).data.tobytes() == pattern(8, 1)
    (chunk2,) = mdev.chunks
    assert chunk2 is not chunk and chunk2.pagemap.start_pfn == lo
    assert sys.pgmap_of(_device_pfn(proc, a)) is chunk2.pagemap
    assert set(d.snapshot(a, 8).tolist()) == {local | W}
    d.release()
    d.release()  # nothing left: a no-op
    assert proc.read(a, 8 * P) == pattern(8, 1)
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_release_with_no_chunk_and_empty_range(make_system, kernel: str) -> None:
    """RELEASE ignores the range but the ioctl checks it first: npages 0 is -EINVAL, an
    unaligned addr too; with no chunk mapped RELEASE is a no-op that returns 0."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn()
    d = proc.open_device(1)
    assert d.ioctl(HMM_DMIRROR_RELEASE, HmmDmirrorCmd(addr=0, npages=0)) == -EINVAL
    assert d.ioctl(HMM_DMIRROR_RELEASE, HmmDmirrorCmd(addr=8, npages=1)) == -EINVAL
    assert sys.dmirror_devices[1].chunks, "the failed calls removed nothing"
    d.release()
    assert d.ioctl(HMM_DMIRROR_RELEASE, HmmDmirrorCmd(addr=0, npages=1)) == 0
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_release_evicts_every_handle_and_process(make_system, kernel: str) -> None:
    """The pages of every process on the device go back, a forked child's shared
    device-private entries included (both see a system page with the data)."""
    sys = make_system(kernel=kernel)
    parent = sys.spawn()
    a = parent.mmap(4 * P)
    parent.write(a, pattern(4, 3))
    d = parent.open_device(0)
    d.migrate(a, 4)
    child = parent.fork()
    other = sys.spawn()
    b = other.mmap(2 * P)
    other.write(b, pattern(2, 9))
    e = other.open_device(0)
    e.migrate(b, 2)
    d.release()
    for p, addr, n, seed in ((parent, a, 4, 3), (child, a, 4, 3), (other, b, 2, 9)):
        assert p.pte(addr).startswith("pfn"), p.pte(addr)
        assert p.read(addr, n * P) == pattern(n, seed)
    sys.check_invariants()
    child.exit()
    e.close()
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_release_of_a_page_that_cannot_be_evicted_is_the_kernels_hang(make_system, kernel: str) -> None:
    """A device page with a reference nobody drops (here: a kernel reference taken by
    hand) is not migrated by ``migrate_device_range``; ``memunmap_pages`` then waits for
    it forever. hmmsim reports that hang (DeadlockError: ``kernel-hang`` in a scenario)."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn()
    a = proc.mmap(2 * P)
    proc.write(a, pattern(2))
    d = proc.open_device(0)
    d.migrate(a, 2)
    dpfn = _device_pfn(proc, a)
    sys.mem.refcount[dpfn] += 1  # a get_page() whose put never comes
    sys.extra_refs[dpfn] = 1
    with pytest.raises(DeadlockError, match="memunmap_pages.*hang"):
        d.release()
    # the page that could be evicted was
    assert proc.pte(a + P).startswith("pfn")
    assert proc.read(a + P, P) == pattern(2)[P:]


def test_memunmap_pages_refuses_a_pagemap_in_use(make_system) -> None:
    sys = make_system()
    proc = sys.spawn()
    a = proc.mmap(P)
    proc.write(a, b"x")
    d = proc.open_device(0)
    d.migrate(a, 1)
    pg = sys.dmirror_devices[0].chunks[0].pagemap
    with pytest.raises(DeadlockError, match="still has 1 reference"):
        memunmap_pages(sys, pg)
    assert sys.pgmap_of(pg.start_pfn) is pg, "nothing changed"
    d.close()


def test_release_mem_region_is_reused_and_checked(make_system) -> None:
    sys = make_system()
    s1 = sys.request_free_mem_region(DEVMEM_CHUNK_PAGES)
    s2 = sys.request_free_mem_region(DEVMEM_CHUNK_PAGES)
    assert s2 == s1 + DEVMEM_CHUNK_PAGES
    sys.release_mem_region(s1, DEVMEM_CHUNK_PAGES)
    with pytest.raises(AssertionError):
        sys.release_mem_region(s1, DEVMEM_CHUNK_PAGES)
    assert sys.request_free_mem_region(512) == s1
    assert sys.request_free_mem_region(DEVMEM_CHUNK_PAGES - 512) == s1 + 512
    assert sys.request_free_mem_region(512) == s2 + DEVMEM_CHUNK_PAGES


@pytest.mark.parametrize("kernel", KERNELS)
def test_coherent_pages_reused_after_release_are_cleared_for_holes(make_system, kernel: str) -> None:
    """The coherent range keeps its bytes across RELEASE and the next memremap_pages; a
    hole migrated to one of its pages must still read as zeros (clear_highpage). Found by
    the property test: memunmap_pages once dropped the "page may hold data" flag."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn()
    a = proc.mmap(4 * P)
    proc.write(a, pattern(4, 4))
    d = proc.open_device(2)
    d.migrate(a, 4)
    d.release()
    b = proc.mmap(4 * P)
    r = d.migrate(b, 4)  # holes: new coherent pages, cleared
    assert r.cpages == 4 and not r.data.any()
    assert proc.read(b, 4 * P) == bytes(4 * P)
    assert proc.read(a, 4 * P) == pattern(4, 4)
    d.close()
