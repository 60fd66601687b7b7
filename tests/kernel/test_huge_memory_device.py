"""Core mm on 7.3 device-private PMD entries (``mm/huge_memory.c`` device-private branches).

Every test starts from :class:`~tests.kernel.helpers.DevicePrivateThp`: a device-private
THP mapped by one device-private PMD (``D``), in a 2-PMD anonymous region::

    BASE            BASE+2M           BASE+4M
    [ D (512 pages) | . (empty)       ]

The pagemap's ops record ``page_free``/``folio_split``/``migrate_to_ram``, so each test
asserts what core mm asked of the driver, besides refcounts, mapcounts, rss and entries.
The invariant checker runs after every test (``make_system``).
"""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim.kernel.errno import EAGAIN
from hmmsim.kernel.fault import handle_mm_fault
from hmmsim.kernel.folio import folio_put
from hmmsim.kernel.huge_memory import (
    folio_split_unmapped,
    split_folio,
    split_huge_pmd_address,
)
from hmmsim.kernel.invariants import InvariantError, check_invariants
from hmmsim.kernel.migrate import (
    folio_migrate_mapping,
    is_pmd_migration_entry,
    remove_migration_ptes,
    try_to_migrate,
)
from hmmsim.kernel.mm import MM_ANONPAGES, mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.mm_types import FAULT_FLAG_WRITE
from hmmsim.kernel.mmu_notifier import MmuNotifierEvent
from hmmsim.kernel.page_types import HPAGE_PMD_NR, HPAGE_PMD_SIZE, PAGE_SIZE, pte_index
from hmmsim.kernel.pagemap import folio_lock, folio_test_locked, folio_unlock
from hmmsim.kernel.pgtable import (
    _PAGE_PSE,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    SWP_DEVICE_READ,
    SWP_DEVICE_WRITE,
    SWP_MIGRATION_READ,
    SWP_MIGRATION_READ_EXCLUSIVE,
    SWP_MIGRATION_WRITE,
    is_pmd_device_private_entry,
    is_writable_device_private_entry,
    make_readable_device_private_entry,
    make_writable_migration_entry,
    pmd_leaf,
    pmd_present,
    pmd_to_swp_entry,
    pte_pfn,
    pte_to_swp_entry,
    pte_write,
    swp_entry_to_pmd,
    swp_offset_pfn,
    swp_type,
)
from hmmsim.kernel.physmem import PG_anon, PG_anon_exclusive
from hmmsim.kernel.rmap import page_vma_mapped_pmd

from .helpers import BASE, DevicePrivateThp, Recorder, map_region

NR = HPAGE_PMD_NR


@pytest.fixture
def thp(make_system):
    """A 7.3 process with a writable device-private THP at BASE."""
    system = make_system(kernel="7.3")
    p = system.spawn("devthp")
    map_region(p)
    return DevicePrivateThp(p, BASE)


def ptes(proc, addr: int = BASE):
    """The 512 ptes of the table under the PMD of *addr*."""
    mm = proc.mm
    pmd = mm.pmd_ref(addr)
    return mm.sys.pt.table(mm.pte_table(pmd)).copy()


def swp_types(tbl) -> np.ndarray:
    return (tbl >> np.uint64(59)).astype(np.int64)


def fault(proc, addr: int, write: bool = False) -> int:
    """One ``handle_mm_fault`` at *addr* (mmap lock held), as a CPU access would."""
    mm = proc.mm
    mmap_read_lock(mm)
    try:
        return handle_mm_fault(mm.vma_lookup(addr), addr, FAULT_FLAG_WRITE if write else 0)
    finally:
        mmap_read_unlock(mm)


def migrate_back(thp: DevicePrivateThp, vmf) -> int:
    """A minimal driver ``migrate_to_ram`` for a whole device THP: unmap it to a PMD
    migration entry, move it to a new RAM THP, remap (what migrate_vma does, without the
    copy: device pages hold no data here)."""
    sys = thp.sys
    mem = sys.mem
    head = vmf.page
    mem.refcount[head] += 1  # the collection's reference
    assert try_to_migrate(sys, head)
    dst = mem.alloc_folio(9)
    assert dst >= 0
    folio_migrate_mapping(sys, dst, head)
    mem.refcount[dst] -= 1  # the allocation reference; the mapping takes its own
    assert remove_migration_ptes(sys, head, dst) >= 1
    mem.flags[head:head + NR] &= ~np.uint32(PG_anon | PG_anon_exclusive)
    mem.mapping[head] = 0
    folio_put(sys, head)
    return 0


# -- the fault --------------------------------------------------------------------------------
def test_do_huge_pmd_device_private_calls_migrate_to_ram_with_the_pmd(thp: DevicePrivateThp) -> None:
    e = thp.pmd()
    rc = int(thp.sys.mem.refcount[thp.head])
    assert fault(thp.proc, BASE + 5 * PAGE_SIZE + 12) == 0
    # one call: the fault address (page aligned), the head page, the PMD, the folio locked
    assert thp.faults == [(BASE + 5 * PAGE_SIZE, thp.head, e, True)]
    # the reference and the lock are gone again; nothing changed (the stub did nothing)
    assert int(thp.sys.mem.refcount[thp.head]) == rc and not folio_test_locked(thp.sys, thp.head)
    assert thp.pmd() == e
    assert thp.sys.stats["thp.fault_device_private_pmd"] == 1


def test_do_huge_pmd_device_private_returns_what_migrate_to_ram_returns(thp: DevicePrivateThp) -> None:
    thp.fault_ret = 0x0002  # VM_FAULT_SIGBUS
    assert fault(thp.proc, BASE, write=True) == 0x0002


def test_do_huge_pmd_device_private_locked_folio_retries_without_calling(thp: DevicePrivateThp) -> None:
    folio_lock(thp.sys, thp.head)
    try:
        assert fault(thp.proc, BASE) == 0
    finally:
        folio_unlock(thp.sys, thp.head)
    assert thp.faults == []


def test_do_huge_pmd_device_private_cpu_access_migrates_whole_thp(thp: DevicePrivateThp) -> None:
    """A CPU write through the facade: migrate_to_ram moves the THP back; the access is
    retried on the new present PMD; the device folio is freed to its driver."""
    thp.on_fault = lambda vmf: migrate_back(thp, vmf)
    thp.proc.touch(BASE + 7 * PAGE_SIZE, 1, write=True)
    e = thp.pmd()
    assert pmd_leaf(e) and pte_write(e) and thp.sys.pgmap_of(pte_pfn(e)) is None
    assert len(thp.faults) == 1 and thp.freed == [thp.head] and thp.pgmap.nr_used == 0
    assert thp.proc.mm.rss[MM_ANONPAGES] == NR


def test_hmm_range_fault_on_foreign_device_private_pmd_faults_it_back(thp: DevicePrivateThp) -> None:
    """hmm_range_fault (not the owner, REQ_FAULT) records the fault; hmm_do_fault's
    handle_mm_fault reaches do_huge_pmd_device_private."""
    from hmmsim.hmm.hmm import HMM_PFN_REQ_FAULT, HMM_PFN_VALID
    from hmmsim.hmm.mirror import HmmMirror
    m = HmmMirror(thp.proc.mm)
    thp.on_fault = lambda vmf: migrate_back(thp, vmf)
    ret, r = m.range_fault(BASE, BASE + 2 * PAGE_SIZE, default_flags=HMM_PFN_REQ_FAULT)
    m.remove()
    assert ret == 0 and all(int(v) & HMM_PFN_VALID for v in r) and len(thp.faults) == 1


# -- zap ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["munmap", "dontneed", "exit"])
def test_zap_huge_pmd_device_private(thp: DevicePrivateThp, how: str) -> None:
    p = thp.proc
    rec = Recorder(p)
    if how == "munmap":
        p.munmap(BASE, HPAGE_PMD_SIZE)
    elif how == "dontneed":
        p.madvise(BASE, HPAGE_PMD_SIZE, "dontneed")
        assert thp.pmd() == 0
    else:
        p.exit()
    mem = thp.sys.mem
    assert thp.freed == [thp.head], "the folio's last reference went: page_free once, for the head"
    assert int(mem.refcount[thp.head]) == 0 and int(mem.entire_mapcount[thp.head]) == 0
    assert thp.pgmap.nr_used == 0
    if how != "exit":
        assert p.mm.rss[MM_ANONPAGES] == 0
        ev = MmuNotifierEvent.MMU_NOTIFY_UNMAP if how == "munmap" else MmuNotifierEvent.MMU_NOTIFY_CLEAR
        assert (BASE, BASE + HPAGE_PMD_SIZE) in rec.events(ev)


# -- fork ----------------------------------------------------------------------------------------
def test_copy_huge_pmd_device_private_makes_both_readable(thp: DevicePrivateThp) -> None:
    mem = thp.sys.mem
    src = thp.pmd() | _PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP
    thp.proc.mm.pmd_ref(BASE).set(src)
    child = thp.proc.fork()
    want = swp_entry_to_pmd(make_readable_device_private_entry(thp.head))
    assert thp.pmd() == want | _PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP, "parent: readable, bits kept"
    assert thp.pmd(child) == want | _PAGE_SWP_SOFT_DIRTY, "child: uffd-wp dropped (no VM_UFFD_WP)"
    assert int(mem.refcount[thp.head]) == 2 and int(mem.entire_mapcount[thp.head]) == 2
    assert not (mem.flags[thp.head:thp.head + NR] & PG_anon_exclusive).any()
    assert child.mm.rss[MM_ANONPAGES] == NR
    child.exit()
    assert int(mem.refcount[thp.head]) == 1 and thp.freed == []
    assert is_pmd_device_private_entry(thp.pmd()) and not is_writable_device_private_entry(pmd_to_swp_entry(thp.pmd()))


def test_copy_huge_pmd_device_private_child_fault_reaches_the_driver(thp: DevicePrivateThp) -> None:
    child = thp.proc.fork()
    assert fault(child, BASE + PAGE_SIZE) == 0
    assert [(a, pg) for a, pg, _, _ in thp.faults] == [(BASE + PAGE_SIZE, thp.head)]
    child.exit()


# -- mprotect ------------------------------------------------------------------------------------
def test_change_huge_pmd_device_private_write_protects(thp: DevicePrivateThp) -> None:
    p = thp.proc
    rec = Recorder(p)
    p.mm.pmd_ref(BASE).set(thp.pmd() | _PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP)
    p.mprotect(BASE, HPAGE_PMD_SIZE, "r")
    # readable; uffd-wp kept, soft-dirty dropped (what 7.3's change_non_present_huge_pmd does)
    assert thp.pmd() == swp_entry_to_pmd(make_readable_device_private_entry(thp.head)) | _PAGE_SWP_UFFD_WP
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_PROTECTION_VMA) == [(BASE, BASE + HPAGE_PMD_SIZE)]
    p.mprotect(BASE, HPAGE_PMD_SIZE, "rw")
    assert not is_writable_device_private_entry(pmd_to_swp_entry(thp.pmd())), "mprotect never upgrades it"
    assert int(thp.sys.mem.entire_mapcount[thp.head]) == 1 and int(thp.sys.mem.refcount[thp.head]) == 1


def test_change_huge_pmd_device_private_partial_splits(thp: DevicePrivateThp) -> None:
    """mprotect of one page: the PMD is split into 512 device-private ptes, only the
    first becomes readable (the real 7.3 kernel: devthp_mprotect in recorded/todo)."""
    thp.proc.mprotect(BASE, PAGE_SIZE, "r")
    t = swp_types(ptes(thp.proc))
    assert t[0] == SWP_DEVICE_READ and (t[1:] == SWP_DEVICE_WRITE).all()


# -- mremap --------------------------------------------------------------------------------------
def test_move_huge_pmd_device_private(thp: DevicePrivateThp) -> None:
    p = thp.proc
    e = thp.pmd()
    new = p.mremap(BASE, HPAGE_PMD_SIZE, HPAGE_PMD_SIZE, new_addr=BASE + 8 * HPAGE_PMD_SIZE)
    assert new == BASE + 8 * HPAGE_PMD_SIZE
    assert p.mm.pmd_ref(new).get() == e and thp.pmd() == 0, "moved whole, not split"
    # rmap still finds it: the invariant checker verifies index and anon_vma of the PMD
    check_invariants(thp.sys)
    assert fault(p, new + 3 * PAGE_SIZE) == 0 and thp.faults[0][:2] == (new + 3 * PAGE_SIZE, thp.head)


def test_move_huge_pmd_device_private_unaligned_destination_splits(thp: DevicePrivateThp) -> None:
    p = thp.proc
    new = p.mremap(BASE, HPAGE_PMD_SIZE, HPAGE_PMD_SIZE, new_addr=BASE + 8 * HPAGE_PMD_SIZE + 16 * PAGE_SIZE)
    assert thp.pmd() == 0
    e = pte_to_swp_entry(p.mm.lookup_pte(new))
    assert swp_type(e) == SWP_DEVICE_WRITE and swp_offset_pfn(e) == thp.head


# -- split ---------------------------------------------------------------------------------------
def test___split_huge_pmd_locked_device_private_partial_munmap(thp: DevicePrivateThp) -> None:
    p = thp.proc
    mem = thp.sys.mem
    rec = Recorder(p)
    p.munmap(BASE, PAGE_SIZE)
    assert (BASE, BASE + HPAGE_PMD_SIZE) in rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR), "split notifies"
    tbl = ptes(p)
    assert tbl[0] == 0 and (swp_types(tbl[1:]) == SWP_DEVICE_WRITE).all()
    assert ((tbl[1:] >> np.uint64(12)) & np.uint64((1 << 40) - 1)).tolist() == list(range(thp.head + 1, thp.head + NR))
    h = thp.head
    assert int(mem.order[h]) == 9, "the folio stays large (PTE-mapped)"
    assert int(mem.entire_mapcount[h]) == 0 and int(mem.mapcount[h]) == 0 and (mem.mapcount[h + 1:h + NR] == 1).all()
    assert int(mem.refcount[h]) == NR - 1 and thp.freed == []
    assert (mem.flags[h + 1:h + NR] & PG_anon_exclusive).all()
    assert p.mm.rss[MM_ANONPAGES] == NR - 1
    p.munmap(BASE + PAGE_SIZE, HPAGE_PMD_SIZE - PAGE_SIZE)
    assert thp.freed == [h] and thp.pgmap.nr_used == 0


def test___split_huge_pmd_locked_device_private_readable_keeps_bits(make_system) -> None:
    system = make_system(kernel="7.3")
    p = system.spawn()
    map_region(p)
    thp = DevicePrivateThp(p, BASE, writable=False)
    p.mm.pmd_ref(BASE).set(thp.pmd() | _PAGE_SWP_SOFT_DIRTY)
    p.madvise(BASE + 10 * PAGE_SIZE, 2 * PAGE_SIZE, "dontneed")
    tbl = ptes(p)
    kept = np.r_[tbl[:10], tbl[12:]]
    assert (swp_types(kept) == SWP_DEVICE_READ).all() and (kept & np.uint64(_PAGE_SWP_SOFT_DIRTY)).all()
    assert tbl[10] == 0 and tbl[11] == 0 and not (kept & np.uint64(_PAGE_PSE)).any()


def test_split_huge_pmd_address_freeze_device_private(thp: DevicePrivateThp) -> None:
    """Splitting for migration (freeze): 512 migration entries, the PMD's reference goes
    (the migration holds its own)."""
    sys = thp.sys
    mem = sys.mem
    h = thp.head
    folio_lock(sys, h)
    mem.refcount[h] += 1  # the migration's reference
    vma = thp.proc.mm.vma_lookup(BASE)
    split_huge_pmd_address(vma, BASE, freeze=True)
    tbl = ptes(thp.proc)
    assert (swp_types(tbl) == SWP_MIGRATION_WRITE).all()
    assert int(mem.refcount[h]) == 1 and int(mem.entire_mapcount[h]) == 0 and not mem.mapcount[h:h + NR].any()
    assert not (mem.flags[h:h + NR] & PG_anon_exclusive).any()
    assert remove_migration_ptes(sys, h, h) == NR
    tbl = ptes(thp.proc)
    assert (swp_types(tbl) == SWP_DEVICE_WRITE).all() and int(mem.refcount[h]) == NR + 1
    folio_unlock(sys, h)
    folio_put(sys, h)


@pytest.mark.parametrize("with_op", [True, False])
def test_split_folio_device_private(make_system, with_op: bool) -> None:
    """split_folio of a PMD-mapped device THP: the PMD is split, then the folio; the
    driver's folio_split hears of every new folio, then (head, None); a new folio nothing
    maps any more (the last page, unmapped before) goes back to the driver at once."""
    system = make_system(kernel="7.3")
    p = system.spawn()
    map_region(p)
    thp = DevicePrivateThp(p, BASE, folio_split=with_op)
    mem = system.mem
    h = thp.head
    p.munmap(BASE + (NR - 1) * PAGE_SIZE, PAGE_SIZE)
    folio_lock(system, h)
    mem.refcount[h] += 1
    assert split_folio(system, h) == 0
    assert not mem.order[h:h + NR].any() and not mem.head_off[h:h + NR].any()
    assert (mem.refcount[h + 1:h + NR - 1] == 1).all() and int(mem.refcount[h]) == 2
    assert thp.freed == [h + NR - 1], "the unmapped last page is freed"
    assert thp.pgmap.nr_used == NR - 1
    if with_op:
        assert thp.splits == [(h, t) for t in range(h + 1, h + NR)] + [(h, None)]
    else:
        assert thp.splits == [] and (mem.mapping[h + 1:h + NR - 1] == mem.mapping[h]).all()
    folio_unlock(system, h)
    folio_put(system, h)
    p.munmap(BASE, HPAGE_PMD_SIZE)
    assert sorted(thp.freed) == list(range(h, h + NR)) and thp.pgmap.nr_used == 0


def test_folio_split_unmapped_device_private(thp: DevicePrivateThp) -> None:
    """What 7.3's migrate_vma_split_unmapped_folio does with a collected device THP:
    the PMD migration entry is split (freeze: the extra reference taken for it goes),
    then the unmapped folio; every new folio keeps one reference (the collection's)."""
    sys = thp.sys
    mem = sys.mem
    h = thp.head
    folio_lock(sys, h)
    assert folio_split_unmapped(sys, h) == -EAGAIN, "still mapped"
    mem.refcount[h] += 1  # the collection's reference
    assert try_to_migrate(sys, h)
    mem.refcount[h] += 1  # folio_get() before split_huge_pmd_address(freeze)
    split_huge_pmd_address(thp.proc.mm.vma_lookup(BASE), BASE, freeze=True)
    assert (swp_types(ptes(thp.proc)) == SWP_MIGRATION_WRITE).all() and int(mem.refcount[h]) == 1
    assert folio_split_unmapped(sys, h) == 0
    assert thp.splits == [(h, t) for t in range(h + 1, h + NR)] + [(h, None)]
    assert (mem.refcount[h:h + NR] == 1).all() and not mem.order[h:h + NR].any() and thp.freed == []
    assert thp.pgmap.nr_used == NR
    for i in range(NR):
        assert remove_migration_ptes(sys, h + i, h + i) == 1
    assert (swp_types(ptes(thp.proc)) == SWP_DEVICE_WRITE).all() and (mem.refcount[h:h + NR] == 2).all()
    folio_unlock(sys, h)
    for i in range(NR):
        folio_put(sys, h + i)
    thp.proc.munmap(BASE, HPAGE_PMD_SIZE)
    assert sorted(thp.freed) == list(range(h, h + NR)) and thp.pgmap.nr_used == 0


# -- migration entries ------------------------------------------------------------------------------
@pytest.mark.parametrize("writable", [True, False])
def test_set_pmd_migration_entry_device_private(make_system, writable: bool) -> None:
    system = make_system(kernel="7.3")
    p = system.spawn()
    map_region(p)
    thp = DevicePrivateThp(p, BASE, writable=writable)
    mem = system.mem
    h = thp.head
    rec = Recorder(p)
    folio_lock(system, h)
    mem.refcount[h] += 1
    assert try_to_migrate(system, h)
    e = thp.pmd()
    assert is_pmd_migration_entry(e) and swp_offset_pfn(pmd_to_swp_entry(e)) == h
    assert swp_type(pmd_to_swp_entry(e)) == (SWP_MIGRATION_WRITE if writable else SWP_MIGRATION_READ_EXCLUSIVE)
    assert int(mem.entire_mapcount[h]) == 0 and int(mem.refcount[h]) == 1
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR) == [(BASE, BASE + HPAGE_PMD_SIZE)]
    assert p.mm.rss[MM_ANONPAGES] == NR
    system.extra_refs[h] = 1  # the migration's reference, for the checker
    check_invariants(system)
    del system.extra_refs[h]
    # abandoned: back to the same device folio, same permission, exclusive again
    assert remove_migration_ptes(system, h, h) == 1
    e = thp.pmd()
    assert is_pmd_device_private_entry(e) and is_writable_device_private_entry(pmd_to_swp_entry(e)) == writable
    assert (mem.flags[h:h + NR] & PG_anon_exclusive).all()
    assert int(mem.entire_mapcount[h]) == 1 and int(mem.refcount[h]) == 2
    folio_unlock(system, h)
    folio_put(system, h)


def test_remove_migration_pmd_to_ram_thp(thp: DevicePrivateThp) -> None:
    """The destination is a RAM THP: a present huge PMD, writable, exclusive."""
    thp.on_fault = lambda vmf: migrate_back(thp, vmf)
    assert fault(thp.proc, BASE) == 0
    e = thp.pmd()
    mem = thp.sys.mem
    assert pmd_present(e) and pmd_leaf(e) and pte_write(e)
    dst = pte_pfn(e)
    assert int(mem.entire_mapcount[dst]) == 1 and int(mem.refcount[dst]) == 1
    assert (mem.flags[dst:dst + NR] & PG_anon_exclusive).all()


def test_pmd_migration_entry_wait_device_folio(thp: DevicePrivateThp) -> None:
    """A CPU fault on the PMD migration entry of a device folio waits on the folio's
    lock (``pmd_migration_entry_wait``) and does not call the driver."""
    sys = thp.sys
    h = thp.head
    folio_lock(sys, h)
    sys.mem.refcount[h] += 1
    assert try_to_migrate(sys, h)
    folio_unlock(sys, h)  # the migration is "done": a waiter returns at once
    before = sys.stats["migrate.entry_wait"]
    assert fault(thp.proc, BASE + PAGE_SIZE) == 0
    assert sys.stats["migrate.entry_wait"] == before + 1 and thp.faults == []
    folio_lock(sys, h)
    assert remove_migration_ptes(sys, h, h) == 1
    folio_unlock(sys, h)
    folio_put(sys, h)


# -- rmap / invariants ------------------------------------------------------------------------------
def test_page_vma_mapped_pmd(thp: DevicePrivateThp) -> None:
    e = thp.pmd()
    assert page_vma_mapped_pmd(e, thp.head) and not page_vma_mapped_pmd(e, thp.head, migration=True)
    assert not page_vma_mapped_pmd(e, thp.head + NR)
    mig = swp_entry_to_pmd(make_writable_migration_entry(thp.head))
    assert page_vma_mapped_pmd(mig, thp.head, migration=True) and not page_vma_mapped_pmd(mig, thp.head)
    assert not page_vma_mapped_pmd(0, thp.head)


def test_check_invariants_device_private_pmd(thp: DevicePrivateThp) -> None:
    sys = thp.sys
    mem = sys.mem
    h = thp.head
    check_invariants(sys)
    mem.entire_mapcount[h] += 1
    with pytest.raises(InvariantError, match="entire_mapcount"):
        check_invariants(sys)
    mem.entire_mapcount[h] -= 1
    ref = thp.proc.mm.pmd_ref(BASE)
    e = ref.get()
    ref.set(swp_entry_to_pmd(make_readable_device_private_entry(h + 1)))
    with pytest.raises(InvariantError, match="not the head"):
        check_invariants(sys)
    ref.set(swp_entry_to_pmd(make_readable_device_private_entry(1)))
    with pytest.raises(InvariantError, match="not a device-private page"):
        check_invariants(sys)
    ref.set(e)
    thp.proc.mm.add_mm_counter(MM_ANONPAGES, -1)
    with pytest.raises(InvariantError, match="rss"):
        check_invariants(sys)
    thp.proc.mm.add_mm_counter(MM_ANONPAGES, 1)
    check_invariants(sys)


def test_check_invariants_pte_mapped_device_thp_tails_are_in_use(thp: DevicePrivateThp) -> None:
    """After a PMD split the tails (refcount 0, mapcount 1) are pages of a live folio,
    not idle device pages."""
    thp.proc.munmap(BASE, PAGE_SIZE)
    check_invariants(thp.sys)
    assert pte_index(BASE) == 0


def test_check_coherent_split_hang() -> None:
    """Conventions item 28: once a large device-coherent folio was split, the driver path
    that walks the device's pages is reported as the real 7.3 kernel's hang."""
    from hmmsim.kernel.locking import DeadlockError
    from hmmsim.kernel.memremap import (
        DevPagemap,
        DevPagemapOps,
        MemoryType,
        check_coherent_split_hang,
    )
    pg = DevPagemap(MemoryType.MEMORY_DEVICE_COHERENT, 0x1000, 512, DevPagemapOps(page_free=lambda p: None), object())
    check_coherent_split_hang(pg, "HMM_DMIRROR_RELEASE")
    pg.coherent_split_heads.append(0x1000)
    with pytest.raises(DeadlockError, match=r"HMM_DMIRROR_RELEASE .* 0x1000.*never returns.*item 28"):
        check_coherent_split_hang(pg, "HMM_DMIRROR_RELEASE")


def test___split_huge_pmd_locked_device_private_in_fork_child(thp: DevicePrivateThp) -> None:
    """After fork both map the folio by a read-only PMD; a partial munmap in the child
    splits only the child's PMD (511 readable ptes), the parent's PMD stays."""
    mem = thp.sys.mem
    h = thp.head
    child = thp.proc.fork()
    child.munmap(BASE + 3 * PAGE_SIZE, PAGE_SIZE)
    t = swp_types(ptes(child))
    assert t[3] == 0 and (np.delete(t, 3) == SWP_DEVICE_READ).all()
    assert is_pmd_device_private_entry(thp.pmd()), "the parent keeps its PMD"
    assert int(mem.refcount[h]) == 1 + NR - 1 and int(mem.entire_mapcount[h]) == 1
    assert int(mem.mapcount[h + 3]) == 0 and int(mem.mapcount[h + 4]) == 1
    assert child.mm.rss[MM_ANONPAGES] == NR - 1
    child.exit()
    assert int(mem.refcount[h]) == 1 and not mem.mapcount[h:h + NR].any() and thp.freed == []


def test_zap_pmd_migration_entry_of_device_folio(thp: DevicePrivateThp) -> None:
    """munmap while the device THP is unmapped for migration: the PMD migration entry is
    zapped (rss only); the abandoned migration restores nothing and the last reference
    frees the folio to its driver."""
    sys = thp.sys
    h = thp.head
    folio_lock(sys, h)
    sys.mem.refcount[h] += 1
    assert try_to_migrate(sys, h)
    thp.proc.munmap(BASE, HPAGE_PMD_SIZE)
    assert thp.proc.mm.rss[MM_ANONPAGES] == 0 and thp.freed == []
    assert remove_migration_ptes(sys, h, h) == 0
    folio_unlock(sys, h)
    folio_put(sys, h)
    assert thp.freed == [h] and thp.pgmap.nr_used == 0


def test_copy_pmd_migration_entry_of_device_folio(thp: DevicePrivateThp) -> None:
    """fork while the device THP is unmapped for migration: both get a readable PMD
    migration entry; abandoning the migration gives both a readable device-private PMD
    of the shared (not exclusive) folio."""
    sys = thp.sys
    mem = sys.mem
    h = thp.head
    folio_lock(sys, h)
    mem.refcount[h] += 1
    assert try_to_migrate(sys, h)
    child = thp.proc.fork()
    assert swp_type(pmd_to_swp_entry(thp.pmd())) == swp_type(pmd_to_swp_entry(thp.pmd(child))) == SWP_MIGRATION_READ
    assert remove_migration_ptes(sys, h, h) == 2
    folio_unlock(sys, h)
    folio_put(sys, h)
    want = swp_entry_to_pmd(make_readable_device_private_entry(h))
    assert thp.pmd() == want and thp.pmd(child) == want
    assert int(mem.refcount[h]) == 2 and int(mem.entire_mapcount[h]) == 2
    assert not (mem.flags[h:h + NR] & PG_anon_exclusive).any()
    child.exit()
    thp.proc.munmap(BASE, HPAGE_PMD_SIZE)
    assert thp.freed == [h]


def test_split_folio_frees_unmapped_pages_of_a_ram_thp(make_system) -> None:
    """The same release step for a RAM THP: after a partial munmap the folio is
    PTE-mapped but for its last page; split_folio frees that page at once (a new folio
    with no reference), the others keep one reference per mapping."""
    system = make_system(kernel="7.3")
    p = system.spawn()
    map_region(p, 1)
    p.madvise(BASE, HPAGE_PMD_SIZE, "hugepage")
    p.write(BASE, b"\x01" * (HPAGE_PMD_SIZE))
    e = p.mm.pmd_ref(BASE).get()
    assert pmd_leaf(e)
    mem = system.mem
    h = pte_pfn(e)
    p.munmap(BASE + (NR - 1) * PAGE_SIZE, PAGE_SIZE)
    free = mem.nr_free
    folio_lock(system, h)
    mem.refcount[h] += 1
    assert split_folio(system, h) == 0
    assert mem.nr_free == free + 1 and mem.is_free(h + NR - 1)
    assert (mem.refcount[h + 1:h + NR - 1] == 1).all() and int(mem.refcount[h]) == 2
    folio_unlock(system, h)
    folio_put(system, h)
    assert p.read(BASE, 16) == b"\x01" * 16
