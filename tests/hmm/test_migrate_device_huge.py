"""7.3's whole-THP device migration (:mod:`hmmsim.hmm.migrate_device_huge`) and dmirror's
THP folios, against 6.12, which splits THPs when collecting them. Tests are named after
the kernel functions they exercise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hmmsim.hmm.migrate_device import (
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_vma_finalize,
    migrate_vma_setup,
)
from hmmsim.kernel.migrate import is_pmd_migration_entry
from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.page_types import HPAGE_PMD_NR, PAGE_SIZE, PMD_SIZE
from hmmsim.kernel.pgtable import (
    is_device_private_entry,
    is_pmd_device_private_entry,
    pmd_leaf,
    pmd_present,
    pte_pfn,
    pte_to_swp_entry,
    swp_offset_pfn,
)
from hmmsim.scenario.run import reference_config, run_scenario_text

P = PAGE_SIZE
DATA = np.arange(PMD_SIZE // 4, dtype=np.uint32).tobytes()


def _thp(make_system, kernel: str = "7.3", **kw):
    """A system, a process with one PMD-mapped THP filled with DATA at ``a``."""
    system = make_system(thp="always", kernel=kernel, **kw)
    proc = system.spawn()
    base = proc.mmap(2 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    proc.write(a, DATA)
    e = proc.mm.pmd_ref(a).get()
    assert pmd_present(e) and pmd_leaf(e)
    return system, proc, a


def test_migrate_vma_collect_huge_pmd_collects_a_thp_as_one_compound_entry(make_system) -> None:
    """SELECT_COMPOUND over an aligned 2 MiB window: one entry (VALID|MIGRATE|WRITE|
    COMPOUND, the head pfn), 511 zero entries, the PMD a migration entry; abandoning the
    migration (no destination) restores the PMD and the data."""
    system, proc, a = _thp(make_system)
    head = pte_pfn(proc.mm.pmd_ref(a).get())
    vma = proc.mm.find_vma(a)
    m = MigrateVma(vma, a, a + PMD_SIZE, object(), MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND)
    mmap_read_lock(proc.mm)
    assert migrate_vma_setup(m) == 0
    assert (m.npages, m.cpages) == (HPAGE_PMD_NR, 1)
    assert int(m.src[0]) == (head << 6) | MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE | MIGRATE_PFN_COMPOUND
    assert not m.src[1:].any()
    assert is_pmd_migration_entry(proc.mm.pmd_ref(a).get())
    assert system.stats["migrate_vma.collect_huge_pmd"] == 1
    migrate_vma_finalize(m)
    mmap_read_unlock(proc.mm)
    e = proc.mm.pmd_ref(a).get()
    assert pmd_present(e) and pte_pfn(e) == head
    assert proc.read(a, PMD_SIZE) == DATA


def test_migrate_vma_collect_huge_pmd_splits_for_an_unaligned_window(make_system) -> None:
    """A window that is not PMD-aligned splits the THP (``split_folio``) and collects
    order-0 entries."""
    system, proc, a = _thp(make_system)
    vma = proc.mm.find_vma(a)
    m = MigrateVma(vma, a, a + 16 * P, object(), MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND)
    mmap_read_lock(proc.mm)
    assert migrate_vma_setup(m) == 0
    assert m.cpages == 16 and not any(int(s) & MIGRATE_PFN_COMPOUND for s in m.src)
    assert not pmd_leaf(proc.mm.pmd_ref(a).get())
    migrate_vma_finalize(m)
    mmap_read_unlock(proc.mm)
    assert proc.read(a, PMD_SIZE) == DATA


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_migrate_vma_collect_hole_compound(make_system, kernel: str) -> None:
    """An empty aligned window is one compound hole in 7.3 (MIGRATE|COMPOUND, no pfn);
    6.12 has no SELECT_COMPOUND: 512 holes."""
    system = make_system(kernel=kernel)
    proc = system.spawn()
    base = proc.mmap(2 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    m = MigrateVma(proc.mm.find_vma(a), a, a + PMD_SIZE, object(),
                   MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND)
    mmap_read_lock(proc.mm)
    assert migrate_vma_setup(m) == 0
    if kernel == "7.3":
        assert (m.cpages, int(m.src[0])) == (1, MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND)
        assert not m.src[1:].any()
    else:
        assert m.cpages == HPAGE_PMD_NR and (m.src == MIGRATE_PFN_MIGRATE).all()
    migrate_vma_finalize(m)
    mmap_read_unlock(proc.mm)


def test_migrate_vma_insert_huge_pmd_page_maps_a_device_thp_for_a_compound_hole(make_system) -> None:
    """MIGRATE_TO_DEV of an empty aligned range: one device THP (order 9) behind a
    writable device-private PMD; MIGRATE_TO_SYS brings back a system THP (cpages 1)."""
    system = make_system(kernel="7.3", thp="always")
    proc = system.spawn()
    base = proc.mmap(2 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    d = proc.open_device(0)
    assert d.migrate(a, HPAGE_PMD_NR).cpages == HPAGE_PMD_NR
    e = proc.mm.pmd_ref(a).get()
    assert is_pmd_device_private_entry(e)
    dpage = swp_offset_pfn(pte_to_swp_entry(e))
    assert system.mem.order[dpage] == 9 and system.mem.entire_mapcount[dpage] == 1
    assert system.stats["thp.fault_alloc"] >= 1
    assert d.migrate_to_sys(a, HPAGE_PMD_NR) == 1
    e = proc.mm.pmd_ref(a).get()
    assert pmd_present(e) and pmd_leaf(e) and system.mem.order[pte_pfn(e)] == 9
    assert proc.read(a, PMD_SIZE) == bytes(PMD_SIZE)
    d.close()


def test_migrate_vma_split_unmapped_folio_when_the_device_thp_allocation_fails(make_system) -> None:
    """FAIL_ALLOC: dmirror falls back to 512 order-0 device pages, so migrate_vma_pages
    splits the unmapped source THP; each page ends behind its own device-private pte.
    Back with FAIL_ALLOC again: the pages come back one by one."""
    from hmmsim.drivers.test_hmm_uapi import HMM_DMIRROR_FLAG_FAIL_ALLOC, HMM_DMIRROR_FLAGS, HmmDmirrorCmd
    system, proc, a = _thp(make_system)
    d = proc.open_device(0)
    assert d.ioctl(HMM_DMIRROR_FLAGS, HmmDmirrorCmd(addr=a, npages=HMM_DMIRROR_FLAG_FAIL_ALLOC)) == 0
    assert d.migrate(a, HPAGE_PMD_NR).cpages == HPAGE_PMD_NR
    assert system.stats["migrate_vma.split_unmapped_folio"] == 1
    for off in (0, 100, 511):
        pte = proc.mm.lookup_pte(a + off * P)
        assert is_device_private_entry(pte_to_swp_entry(pte))
        assert system.mem.order[swp_offset_pfn(pte_to_swp_entry(pte))] == 0
    system.check_invariants(full=True)
    assert d.migrate_to_sys(a, HPAGE_PMD_NR) == HPAGE_PMD_NR
    assert proc.read(a, PMD_SIZE) == DATA
    d.close()


def test_dmirror_devmem_fault_alloc_and_copy_splits_the_device_thp_on_fail_alloc(make_system) -> None:
    """A device THP migrated back with FAIL_ALLOC: the system THP allocation fails, 512
    order-0 pages take the data, the device THP is split (the folio_split op splits its
    backing THP too) and freed page by page."""
    from hmmsim.drivers.test_hmm_uapi import HMM_DMIRROR_FLAG_FAIL_ALLOC, HMM_DMIRROR_FLAGS, HmmDmirrorCmd
    system, proc, a = _thp(make_system)
    d = proc.open_device(0)
    d.migrate(a, HPAGE_PMD_NR)
    assert is_pmd_device_private_entry(proc.mm.pmd_ref(a).get())
    mdev = system.dmirror_devices[0]
    free_before = len(mdev.free_pages)
    assert d.ioctl(HMM_DMIRROR_FLAGS, HmmDmirrorCmd(addr=a, npages=HMM_DMIRROR_FLAG_FAIL_ALLOC)) == 0
    assert d.migrate_to_sys(a, HPAGE_PMD_NR) == HPAGE_PMD_NR
    assert len(mdev.free_pages) == free_before + HPAGE_PMD_NR  # freed as 512 order-0 pages
    assert system.mem.order[pte_pfn(proc.mm.lookup_pte(a))] == 0
    system.check_invariants(full=True)
    assert proc.read(a, PMD_SIZE) == DATA
    d.close()


def test_migrate_vma_split_folio_for_part_of_a_device_thp(make_system) -> None:
    """MIGRATE_TO_SYS of 10 pages inside a device THP: the device-private PMD and the
    device folio are split, those 10 pages come back, the rest stay on the device."""
    system, proc, a = _thp(make_system)
    d = proc.open_device(0)
    d.migrate(a, HPAGE_PMD_NR)
    assert d.migrate_to_sys(a + 100 * P, 10) == 10
    assert pte_pfn(proc.mm.lookup_pte(a + 105 * P)) < system.mem.ram_pages
    assert is_device_private_entry(pte_to_swp_entry(proc.mm.lookup_pte(a + 99 * P)))
    system.check_invariants(full=True)
    assert proc.read(a, PMD_SIZE) == DATA
    d.close()


def test_migrate_device_range_evicts_a_device_thp_whole(make_system) -> None:
    """Closing the file evicts the device memory: the device THP is one compound entry
    of migrate_device_range and comes back as a system THP behind a PMD."""
    system, proc, a = _thp(make_system)
    d = proc.open_device(0)
    d.migrate(a, HPAGE_PMD_NR)
    d.close()
    e = proc.mm.pmd_ref(a).get()
    assert pmd_present(e) and pmd_leaf(e)
    assert proc.read(a, PMD_SIZE) == DATA


def test_dmirror_allocate_chunk_coherent_second_chunk_warns_and_fails(make_system) -> None:
    """A coherent device's THP allocation asks for a second chunk at its one fixed
    range: memremap_pages WARNs "Conflicting mapping in same section" and fails with
    -ENOMEM; the THP goes to 512 order-0 coherent pages instead."""
    from hmmsim.drivers.dmirror_devmem import dmirror_allocate_chunk
    system = make_system(**{**_coherent_config(), "thp": "always"})
    proc = system.spawn()
    mdev = system.dmirror_devices[2]
    assert dmirror_allocate_chunk(mdev, True, True) == (-12, -1)
    assert system.stats["memremap.warn_conflicting_mapping"] == 1
    assert "Conflicting mapping in same section" in system.ls.warnings
    base = proc.mmap(2 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    proc.write(a, DATA)
    d = proc.open_device(2)
    assert d.migrate(a, HPAGE_PMD_NR).cpages == HPAGE_PMD_NR
    assert system.stats["memremap.warn_conflicting_mapping"] == 2
    assert len(mdev.chunks) == 1 and not mdev.free_folios
    pfn = pte_pfn(proc.mm.lookup_pte(a + 7 * P))
    assert system.mem.pgmap[pfn] and system.mem.order[pfn] == 0
    assert proc.read(a, PMD_SIZE) == DATA
    d.close()


def _coherent_config() -> dict:
    cfg = reference_config("7.3")
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}  # type: ignore[attr-defined]


def _scenario(text: str, kernel: str) -> list[dict]:
    return [json.loads(x) for x in run_scenario_text("hmmsim-scenario 1\n" + text, reference_config(kernel))]


#: conventions item 27: a THP shared with a fork child, migrated with order-0 destinations
ITEM_27 = """open h 0
mmap a 1024 rw private,anon align=512
madvise a 0 1024 hugepage
fill a 0 512 7
dflags h 1
fork
dmigrate h a 0 512
endfork
"""


def test_remove_migration_pmd_of_an_order0_folio_is_item_27() -> None:
    # (recorded/thp_fork_order0_dst.hmm is the same sequence with snapshots, as 6.12 ran it)
    """7.3 unmaps the child's PMD too, splits only the parent's and later maps 2 MiB of
    a 4 KiB page in the child: hmmsim reports the oops naming remove_migration_pmd.
    6.12 (no dflags; the THP is split when collected) runs the same without FAIL_ALLOC."""
    out = _scenario(ITEM_27, "7.3")
    assert out[-1]["error"] == "kernel-oops" and "remove_migration_pmd" in out[-1]["message"]
    assert "item 27" in out[-1]["message"]
    out = _scenario(ITEM_27.replace("dflags h 1\n", ""), "6.12")
    assert all("error" not in r for r in out)


def test_madvise_collapse_makes_one_thp(make_system) -> None:
    """MADV_COLLAPSE of 512 written small pages (THP off for faults): one PMD-mapped THP
    with the same data; the old pages are freed; an empty block fails with -EINVAL."""
    from hmmsim.kernel.khugepaged import MADV_COLLAPSE
    from hmmsim.kernel.madvise import do_madvise
    system = make_system(kernel="7.3", thp="madvise")
    proc = system.spawn()
    base = proc.mmap(3 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    proc.write(a, DATA)
    free = system.mem.nr_free
    assert not pmd_leaf(proc.mm.pmd_ref(a).get())
    assert do_madvise(proc.mm, a, PMD_SIZE, MADV_COLLAPSE) == 0
    e = proc.mm.pmd_ref(a).get()
    assert pmd_present(e) and pmd_leaf(e) and system.mem.order[pte_pfn(e)] == 9
    assert system.mem.nr_free == free  # 512 pages out, one 512-page THP in
    assert proc.read(a, PMD_SIZE) == DATA
    assert do_madvise(proc.mm, a + PMD_SIZE, PMD_SIZE, MADV_COLLAPSE) == -22


def test_migrate_device_pfns_selects_a_device_thp_as_one_compound_entry(make_system) -> None:
    """migrate_device_pfns() over the pfns of a device THP and a free device page: the
    head is one COMPOUND entry (the tails' entries 0), the free page is not selected;
    the caller's system THP then takes the data and the PMD maps it."""
    from hmmsim.hmm.migrate_device import (
        migrate_device_finalize,
        migrate_device_pages,
        migrate_device_pfns,
        migrate_pfn,
    )
    from hmmsim.kernel.pagemap import folio_lock
    system, proc, a = _thp(make_system)
    d = proc.open_device(0)
    d.migrate(a, HPAGE_PMD_NR)
    head = swp_offset_pfn(pte_to_swp_entry(proc.mm.pmd_ref(a).get()))
    free = system.dmirror_devices[0].free_pages[-1]
    n = HPAGE_PMD_NR + 1
    src = np.array(list(range(head, head + HPAGE_PMD_NR)) + [free], np.uint64)
    dst = np.zeros(n, np.uint64)
    assert migrate_device_pfns(system, src, n) == 0
    assert int(src[0]) == migrate_pfn(head) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND
    assert not src[1:].any()
    assert is_pmd_migration_entry(proc.mm.pmd_ref(a).get())
    new = system.mem.alloc_folio(9)
    folio_lock(system, new)
    system.mem.copy_pages(np.arange(new, new + HPAGE_PMD_NR), np.arange(int(system.mem.zone_device_data[head]),
                                                                         int(system.mem.zone_device_data[head]) + HPAGE_PMD_NR))
    dst[0] = migrate_pfn(new) | MIGRATE_PFN_COMPOUND
    migrate_device_pages(system, src, dst, n)
    migrate_device_finalize(system, src, dst, n)
    e = proc.mm.pmd_ref(a).get()
    assert pmd_present(e) and pte_pfn(e) == new
    assert proc.read(a, PMD_SIZE) == DATA
    d.close()


def test_migrate_vma_pages_does_not_move_an_order0_source_to_a_compound_destination(make_system) -> None:
    """__migrate_device_pages: an order-0 source entry given a compound destination is
    deselected (MIGRATE cleared); finalize keeps the source mapped and frees the THP."""
    from hmmsim.hmm.migrate_device import migrate_pfn, migrate_vma_pages
    from hmmsim.kernel.pagemap import folio_lock
    system = make_system(kernel="7.3")
    proc = system.spawn()
    a = proc.mmap(4 * P)
    proc.write(a, b"s" * (4 * P))
    old = pte_pfn(proc.mm.lookup_pte(a))
    mmap_read_lock(proc.mm)
    m = MigrateVma(proc.mm.find_vma(a), a, a + 4 * P, object(), MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND)
    assert migrate_vma_setup(m) == 0 and m.cpages == 4
    new = system.mem.alloc_folio(9)
    folio_lock(system, new)
    m.dst[0] = migrate_pfn(new) | MIGRATE_PFN_COMPOUND
    migrate_vma_pages(m)
    assert not int(m.src[0]) & MIGRATE_PFN_MIGRATE
    migrate_vma_finalize(m)
    mmap_read_unlock(proc.mm)
    assert pte_pfn(proc.mm.lookup_pte(a)) == old and system.mem.is_free(new)
    assert proc.read(a, 4 * P) == b"s" * (4 * P)


#: conventions item 28: a coherent THP (after a RELEASE) split by a one-page migration
ITEM_28 = """open h 2
mmap a 1024 rw private,anon align=512
madvise a 0 1024 hugepage
fill a 0 512 9
drelease h
dmigrate h a 0 512
dsnapshot h a 0 2
dmigrate h a 0 1
drelease h
"""


def test_memunmap_pages_after_a_coherent_thp_split_is_item_28() -> None:
    """7.3 (real kernel: the same -ENOENT for the one-page migration, then RELEASE never
    returns): the device THP is PMD-mapped (snapshot 0x46), the split leaves 511 folios
    without word to the driver, and RELEASE is reported as a hang. 6.12 has no
    device THPs and runs it (recorded/thp_coherent_release_split)."""
    out = _scenario(ITEM_28, "7.3")
    assert out[6]["prot"] == "4646" and out[7]["ret"] == -2
    assert out[-1]["error"] == "kernel-hang" and out[-1]["op"] == "drelease"
    assert "HMM_DMIRROR_RELEASE" in out[-1]["message"] and "item 28" in out[-1]["message"]
    assert all("error" not in r for r in _scenario(ITEM_28, "6.12"))
