"""``mm/migrate_device.c``: migrate_vma_setup / migrate_vma_pages / migrate_vma_finalize
(order 0, THPs split when collected), driven directly with a test pagemap and through
dmirror's MIGRATE_TO_DEV / MIGRATE_TO_SYS, migrate_to_ram and eviction on close."""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim import Process, System
from hmmsim.drivers.test_hmm_uapi import (
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_WRITE,
    HmmDmirrorCmd,
)
from hmmsim.hmm.migrate_device import (
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_pfn,
    migrate_pfn_to_page,
    migrate_vma_finalize,
    migrate_vma_pages,
    migrate_vma_setup,
)
from hmmsim.kernel.errno import EINVAL, ENOENT
from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.pgtable import (
    is_device_private_entry,
    is_writable_device_private_entry,
    pte_present,
    pte_pfn,
    pte_to_swp_entry,
    swp_offset_pfn,
)

OWNER = object()


def _pte(proc: Process, addr: int) -> int:
    mm = proc.mm
    tbl, tid = mm.pte_offset_map_lock(mm.pmd_ref(addr))
    e = int(tbl[(addr >> 12) & 511])
    mm.pte_unmap_unlock(tid)
    return e


def _setup(proc: Process, addr: int, n: int, flags: int = MIGRATE_VMA_SELECT_SYSTEM,
           owner: object = OWNER) -> tuple[int, MigrateVma]:
    vma = proc.mm.vma_lookup(addr)
    m = MigrateVma(vma, addr, addr + n * P, owner, flags)
    mmap_read_lock(proc.mm)
    try:
        return migrate_vma_setup(m), m
    finally:
        mmap_read_unlock(proc.mm)


def test_migrate_vma_setup_rejects_ranges_outside_the_vma(proc: Process) -> None:
    a = proc.mmap(4 * P)
    vma = proc.mm.vma_lookup(a)
    for start, end in ((a, a), (a - P, a + P), (a, a + 5 * P), (a + 4 * P, a + 5 * P)):
        assert migrate_vma_setup(MigrateVma(vma, start, end, OWNER, MIGRATE_VMA_SELECT_SYSTEM)) == -EINVAL


def test_migrate_vma_collect_hole_selects_anonymous_holes_and_the_zero_page(proc: Process) -> None:
    """Holes and the zero page of an anonymous VMA are selected (no page: MIGRATE only);
    written pages are unmapped to migration entries."""
    a = proc.mmap(4 * P)
    proc.write(a, b"x")  # page 0 written, page 1 the zero page, pages 2-3 holes
    proc.read(a + P, 1)
    page0 = pte_pfn(_pte(proc, a))
    ret, m = _setup(proc, a, 4)
    assert ret == 0 and m.npages == 4 and m.cpages == 4
    assert int(m.src[0]) == migrate_pfn(page0) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE
    assert [int(x) for x in m.src[1:]] == [MIGRATE_PFN_MIGRATE] * 3
    assert not pte_present(_pte(proc, a)), "a migration entry while collected"
    migrate_vma_finalize(m)  # no destinations: everything restored
    assert pte_pfn(_pte(proc, a)) == page0 and proc.read(a, 1) == b"x"


def test_migrate_vma_collect_skips_holes_of_shared_mappings(proc: Process) -> None:
    a = proc.mmap(2 * P, shared=True)
    ret, m = _setup(proc, a, 2)
    assert ret == 0 and m.cpages == 0 and [int(x) for x in m.src] == [0, 0]


def test_migrate_vma_pinned_page_is_restored_and_deselected(proc: Process) -> None:
    """The reference check: a page with an extra reference (a pin) is put back mapped and
    its entry cleared; the others stay selected."""
    system = proc.mm.sys
    a = proc.mmap(2 * P)
    proc.write(a, b"ab" * P)
    pinned = pte_pfn(_pte(proc, a))
    system.mem.refcount[pinned] += 1
    ret, m = _setup(proc, a, 2)
    assert ret == 0 and m.cpages == 1
    assert int(m.src[0]) == 0 and int(m.src[1]) & MIGRATE_PFN_MIGRATE
    assert pte_pfn(_pte(proc, a)) == pinned and pte_present(_pte(proc, a))
    migrate_vma_finalize(m)
    system.mem.refcount[pinned] -= 1
    assert proc.read(a, 2 * P) == b"ab" * P


def test_migrate_vma_to_system_page_moves_data_and_frees_the_source(proc: Process) -> None:
    """A driver giving a new system page for every entry: the data moves, the old frame is
    freed, the new one mapped with the old permissions; holes get a page inserted."""
    system = proc.mm.sys
    a = proc.mmap(3 * P)
    proc.write(a, b"q" * (2 * P))  # page 2 stays a hole
    old = [pte_pfn(_pte(proc, a + i * P)) for i in range(2)]
    ret, m = _setup(proc, a, 3)
    assert ret == 0 and m.cpages == 3
    new = []
    for i in range(3):
        pfn = system.mem.alloc_page()
        from hmmsim.kernel.pagemap import folio_lock
        folio_lock(system, pfn)
        src = migrate_pfn_to_page(int(m.src[i]))
        if src >= 0:
            system.mem.copy_pages(pfn, src)
        else:
            system.mem.clear_pages(pfn)
        m.dst[i] = migrate_pfn(pfn) | (int(m.src[i]) & MIGRATE_PFN_WRITE)
        new.append(pfn)
    migrate_vma_pages(m)
    migrate_vma_finalize(m)
    assert [pte_pfn(_pte(proc, a + i * P)) for i in range(3)] == new
    assert all(system.mem.refcount[p] == 0 for p in old)
    assert proc.read(a, 3 * P) == b"q" * (2 * P) + bytes(P)


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_dmirror_migrate_to_device_private_and_back(make_system, kernel: str) -> None:
    """MIGRATE_TO_DEV: device-private entries (writable), snapshot DEV_PRIVATE_LOCAL|WRITE,
    the source frames freed; MIGRATE_TO_SYS counts the pages moved back; data preserved."""
    system: System = make_system(kernel=kernel)
    proc = system.spawn()
    a = proc.mmap(8 * P)
    data = bytes(range(256)) * 16 * 8
    proc.write(a, data)
    old = pte_pfn(_pte(proc, a))
    d = proc.open_device(0)
    got = d.migrate(a, 8)
    assert got.cpages == 8 and got.data.tobytes() == data
    ent = pte_to_swp_entry(_pte(proc, a))
    assert is_device_private_entry(ent) and is_writable_device_private_entry(ent)
    dpage = swp_offset_pfn(ent)
    assert system.mem.refcount[dpage] == 1 and system.mem.mapcount[dpage] == 1
    rpage = int(system.mem.zone_device_data[dpage])
    assert rpage and rpage != old and system.mem.refcount[rpage] == 1, "the backing page"
    assert d.snapshot(a, 8).tolist() == [HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE] * 8
    system.check_invariants(full=True)
    assert d.migrate_to_sys(a, 8) == 8
    assert pte_present(_pte(proc, a)) and system.mem.refcount[dpage] == 0
    assert system.mem.zone_device_data[dpage] == 0, "page_free dropped the backing page"
    assert d.migrate_to_sys(a, 8) == 0
    assert proc.read(a, 8 * P) == data
    d.close()


def test_dmirror_cpu_fault_calls_migrate_to_ram(proc: Process) -> None:
    system = proc.mm.sys
    a = proc.mmap(2 * P)
    proc.write(a, b"m" * (2 * P))
    d = proc.open_device(1)
    d.migrate(a, 2)
    with system.stats.measure() as delta:
        assert proc.read(a + P, 3) == b"mmm"
    assert delta["fault.migrate_to_ram"] == 1
    assert pte_present(_pte(proc, a + P)) and not pte_present(_pte(proc, a))
    d.close()
    assert pte_present(_pte(proc, a)) and proc.read(a, 2 * P) == b"m" * (2 * P)


def test_dmirror_close_evicts_device_pages(proc: Process) -> None:
    """Closing the file evicts the device's memory (migrate_device_range/pages/finalize):
    the pages are back in system memory and every device page is free."""
    system = proc.mm.sys
    a = proc.mmap(4 * P)
    proc.write(a, b"e" * (4 * P))
    d = proc.open_device(0)
    d.migrate(a, 4)
    dpage = swp_offset_pfn(pte_to_swp_entry(_pte(proc, a)))
    d.close()
    assert all(pte_present(_pte(proc, a + i * P)) for i in range(4))
    assert system.mem.refcount[dpage] == 0
    assert proc.read(a, 4 * P) == b"e" * (4 * P)


def test_dmirror_migrate_to_coherent_device_keeps_cpu_access_in_place(proc: Process) -> None:
    a = proc.mmap(2 * P)
    proc.write(a, b"c" * (2 * P))
    d = proc.open_device(2)
    d.migrate(a, 2)
    pfn = pte_pfn(_pte(proc, a))
    assert proc.mm.sys.pgmap_of(pfn) is not None and proc.mm.sys.pgmap_of(pfn).is_coherent
    assert d.snapshot(a, 2).tolist() == [HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE] * 2
    proc.write(a, b"C")
    assert pte_pfn(_pte(proc, a)) == pfn and proc.read(a, 2) == b"Cc"
    assert d.migrate_to_sys(a, 2) == 2
    assert proc.mm.sys.pgmap_of(pte_pfn(_pte(proc, a))) is None and proc.read(a, 2) == b"Cc"
    d.close()


def test_dmirror_fail_alloc_leaves_the_first_page_and_read_back_is_enoent(make_system) -> None:
    """7.3: FAIL_ALLOC fails the next device allocation once: that page stays in system
    memory, so the read-back finds it missing (-ENOENT); the flag is consumed."""
    proc = make_system(kernel="7.3").spawn()
    a = proc.mmap(4 * P)
    proc.write(a, b"f" * (4 * P))
    d = proc.open_device(0)
    assert d.ioctl(HMM_DMIRROR_FLAGS, HmmDmirrorCmd(npages=HMM_DMIRROR_FLAG_FAIL_ALLOC)) == 0
    assert d.ioctl(HMM_DMIRROR_MIGRATE_TO_DEV, HmmDmirrorCmd(addr=a, npages=4)) == -ENOENT
    assert pte_present(_pte(proc, a)) and not pte_present(_pte(proc, a + P))
    assert proc.task.files[d.fd].private_data.flags == 0
    assert d.migrate(a, 4).cpages == 4
    d.close()
    assert proc.read(a, 4 * P) == b"f" * (4 * P)


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_dmirror_migrate_splits_a_thp(make_system, kernel: str) -> None:
    """A PMD-mapped THP is split when collected in 6.12: its 512 pages migrate as order-0
    pages. 7.3 moves it whole to a device-private PMD (see test_migrate_device_huge.py).
    Data preserved either way (7.3 brings it back with MIGRATE_TO_SYS)."""
    from hmmsim.kernel.page_types import PMD_SIZE
    from hmmsim.kernel.pgtable import is_pmd_device_private_entry
    system = make_system(thp="always", kernel=kernel)
    proc = system.spawn()
    base = proc.mmap(2 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    data = (np.arange(PMD_SIZE // 4, dtype=np.uint32)).tobytes()
    proc.write(a, data)
    d = proc.open_device(0)
    assert d.migrate(a, 512).cpages == 512
    if kernel == "6.12":
        assert is_device_private_entry(pte_to_swp_entry(_pte(proc, a + 100 * P)))
    else:
        assert is_pmd_device_private_entry(proc.mm.pmd_ref(a).get())
        system.check_invariants(full=True)
        assert d.migrate_to_sys(a, 512) == 1  # one compound entry
    system.check_invariants(full=True)
    assert proc.read(a, PMD_SIZE) == data
    d.close()


def test_check_invariants_catches_device_free_list_damage(proc: Process) -> None:
    """The checker's device-page rules: a page in use on the free list, or an idle page
    missing from it, is reported."""
    from hmmsim.kernel.invariants import InvariantError
    system = proc.mm.sys
    a = proc.mmap(2 * P)
    proc.write(a, b"i" * (2 * P))
    d = proc.open_device(0)
    d.migrate(a, 2)
    system.check_invariants(full=True)
    mdev = system.dmirror_devices[0]
    dpage = swp_offset_pfn(pte_to_swp_entry(_pte(proc, a)))
    mdev.free_pages.append(dpage)
    with pytest.raises(InvariantError, match="in use"):
        system.check_invariants(full=True)
    mdev.free_pages.pop()
    lost = mdev.free_pages.pop()
    with pytest.raises(InvariantError, match="idle device pages"):
        system.check_invariants(full=True)
    mdev.free_pages.append(lost)
    system.check_invariants(full=True)
    d.close()
