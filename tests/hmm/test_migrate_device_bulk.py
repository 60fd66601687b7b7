"""``mm/migrate_device.c`` a page table at a time: the array twins of the per-entry
helpers give the same entries, a bulk migration keeps the loop's counters and the order
in which device pages go back to their driver, and the rare entries (pages shared with a
fork, pages of another device) still take their per-entry paths."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hmmsim import Process
from hmmsim.kernel.migrate import (
    _restored_pte,
    make_migration_pte,
    make_migration_ptes,
    remove_migration_ptes,
    remove_migration_ptes_folios,
    restore_migration_ptes,
)
from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP,
    _PAGE_UFFD_WP,
    _PAGE_USER,
    _SWP_MIG_DIRTY,
    _SWP_MIG_YOUNG,
    is_device_private_entry,
    is_migration_entry,
    make_readable_exclusive_migration_entry,
    make_readable_migration_entry,
    make_writable_migration_entry,
    pte_pfn,
    pte_present,
    pte_to_swp_entry,
    swp_entry_to_pte,
    swp_offset_pfn,
)
from hmmsim.kernel.sched import Interleave


def _pte(proc: Process, addr: int) -> int:
    mm = proc.mm
    tbl, tid = mm.pte_offset_map_lock(mm.pmd_ref(addr))
    e = int(tbl[(addr >> 12) & 511])
    mm.pte_unmap_unlock(tid)
    return e


def test_make_migration_ptes_is_make_migration_pte_of_each() -> None:
    bits = (_PAGE_RW, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_SOFT_DIRTY, _PAGE_UFFD_WP)
    ptes, pfns, excl, want = [], [], [], []
    for k, combo in enumerate(itertools.product((0, 1), repeat=len(bits) + 1)):
        pte = _PAGE_PRESENT | _PAGE_USER | sum(b for b, on in zip(bits, combo) if on)
        pfn = 0x12345 + 7 * k
        ptes.append((pfn << 12) | pte)
        pfns.append(pfn)
        excl.append(bool(combo[-1]))
        want.append(make_migration_pte((pfn << 12) | pte, pfn, bool(combo[-1])))
    got = make_migration_ptes(np.array(ptes, np.uint64), np.array(pfns), np.array(excl))
    assert got.tolist() == want


def test_restore_migration_ptes_is_the_restored_pte_of_each(proc: Process) -> None:
    """Migration entries of every kind and bit, restored to a system page and to a
    device-private page (the entries remove_migration_ptes() writes)."""
    system = proc.mm.sys
    a = proc.mmap(P)
    vma = proc.mm.vma_lookup(a)
    sysp = system.mem.alloc_page()
    devp = system.dmirror_devices[0].chunks[0].pagemap.start_pfn
    makers = (make_readable_migration_entry, make_readable_exclusive_migration_entry,
              make_writable_migration_entry)
    extra = (_SWP_MIG_YOUNG, _SWP_MIG_DIRTY)
    migs, dsts, priv, want = [], [], [], []
    for mk, young, dirty, sd, wp, dev in itertools.product(makers, (0, 1), (0, 1), (0, 1), (0, 1), (0, 1)):
        ent = mk(0x4321) | (extra[0] if young else 0) | (extra[1] if dirty else 0)
        mig = swp_entry_to_pte(ent) | (_PAGE_SWP_SOFT_DIRTY if sd else 0) | (_PAGE_SWP_UFFD_WP if wp else 0)
        dst = devp if dev else sysp
        migs.append(mig)
        dsts.append(dst)
        priv.append(bool(dev))
        want.append(_restored_pte(vma, mig, dst))
    got = restore_migration_ptes(vma, np.array(migs, np.uint64), np.array(dsts), np.array(priv))
    assert got.tolist() == want
    system.mem.free_pages([sysp])


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_migrate_to_device_and_back_keeps_the_loop_counters(make_system, kernel: str) -> None:
    """Four windows to a private device and back: one folio-lock acquisition per source
    and per destination page, one restored pte and one remove_migration_ptes per page,
    the device lock once per page allocated and per page freed, every source freed."""
    system = make_system(kernel=kernel, ram=512 << 20)
    proc = system.spawn()
    n = 2048
    a = proc.mmap(n * P)
    proc.write(a, np.arange(n * P // 8, dtype=np.uint64))
    d = proc.open_device(0)
    with system.stats.measure() as st:
        r = d.migrate(a, n)
    assert r.cpages == n and r.data[-8:].view(np.uint64)[0] == n * P // 8 - 1
    assert st["lock.folio_lock.write"] == 2 * n
    assert st["migrate.remove_migration_ptes"] == n and st["pgtable.set_pte"] >= n
    assert st["lock.dmirror_device_lock.write"] == n
    assert st["page.free"] >= n and st["memremap.page_free"] == 0
    assert st["migrate_vma.setup"] == st["migrate_vma.finalize"] == n // 512
    with system.stats.measure() as st:
        assert d.migrate_to_sys(a, n) == n
    assert st["lock.folio_lock.write"] == 2 * n
    assert st["migrate.remove_migration_ptes"] == n and st["pgtable.set_pte"] == n
    assert st["memremap.page_free"] == n and st["lock.dmirror_device_lock.write"] == n
    assert st["page.free"] == n  # the backing pages
    assert (proc.read_array(a, n * P // 8, np.uint64) == np.arange(n * P // 8, dtype=np.uint64)).all()
    d.close()


def test_device_pages_go_back_to_the_free_list_in_entry_order(proc: Process) -> None:
    """MIGRATE_TO_SYS frees the device pages entry by entry: they are pushed on the free
    list in address order, so the last page of the range is handed out first next."""
    system = proc.mm.sys
    n = 700  # two windows, the second one partial
    a = proc.mmap(n * P)
    proc.write(a, b"z" * (n * P))
    d = proc.open_device(0)
    d.migrate(a, n)
    dpfns = []
    for i in range(n):
        ent = pte_to_swp_entry(_pte(proc, a + i * P))
        assert is_device_private_entry(ent)
        dpfns.append(swp_offset_pfn(ent))
    assert d.migrate_to_sys(a, n) == n
    mdev = system.dmirror_devices[0]
    assert mdev.free_pages[-n:] == dpfns
    assert proc.read(a, n * P) == b"z" * (n * P)
    d.close()


def test_pages_shared_with_a_fork_are_unmapped_everywhere(proc: Process) -> None:
    """A page the child still maps is unmapped through the rmap walk (try_to_migrate),
    and both processes end up mapping the device page."""
    a = proc.mmap(1024 * P)
    proc.write(a, b"p" * (1024 * P))
    child = proc.fork()
    proc.write(a + 1000 * P, b"q")  # one page is the parent's own again (COW)
    d = proc.open_device(0)
    assert d.migrate(a, 1024).cpages == 1024
    for i in (0, 511, 512, 1000, 1023):
        for who in (proc, child):
            e = _pte(who, a + i * P)
            if who is child and i == 1000:
                assert pte_present(e)  # the child's own copy stays in system memory
            else:
                assert is_device_private_entry(pte_to_swp_entry(e)), (who, i)
    assert child.read(a + 1000 * P, 1) == b"p" and proc.read(a + 1000 * P, 2) == b"qp"
    assert child.read(a, 4) == b"pppp"
    child.exit()
    d.close()


def test_remove_migration_ptes_folios_is_remove_migration_ptes_of_each(proc: Process) -> None:
    """Pages mapped in a parent and a child, unmapped to migration entries, put back by
    the batch and by the per-folio function: the same page tables and counts."""
    system = proc.mm.sys
    mem = system.mem
    from hmmsim.kernel.migrate import try_to_migrate
    from hmmsim.kernel.pagemap import folio_lock, folio_unlock

    results = []
    for batch in (False, True):
        a = proc.mmap(600 * P)
        proc.write(a, b"r" * (600 * P))
        child = proc.fork()
        pfns = np.array([pte_pfn(_pte(proc, a + i * P)) for i in range(600)])
        for p in pfns.tolist():
            folio_lock(system, p)
            try_to_migrate(system, p)
        assert is_migration_entry(pte_to_swp_entry(_pte(child, a + 599 * P)))
        before = (mem.refcount[pfns].copy(), mem.mapcount[pfns].copy())
        with system.stats.measure() as st:
            if batch:
                remove_migration_ptes_folios(system, pfns, pfns)
            else:
                for p in pfns.tolist():
                    remove_migration_ptes(system, p, p)
        for p in pfns.tolist():
            folio_unlock(system, p)
        tables = [[_pte(w, a + i * P) for i in range(600)] for w in (proc, child)]
        results.append((tables, (mem.refcount[pfns] - before[0]).tolist(),
                        (mem.mapcount[pfns] - before[1]).tolist(), mem.flags[pfns].tolist(),
                        st["pgtable.set_pte"], st["migrate.remove_migration_ptes"]))
        assert child.read(a, 600 * P) == b"r" * (600 * P)
        child.exit()
        proc.munmap(a, 600 * P)
    assert results[0] == results[1]


def test_migration_with_an_armed_thread_does_the_same(make_system) -> None:
    """With a scheduling hook registered (a simulated thread that could run), the batched
    steps offer their scheduling points and end in the same state and counters."""
    outs = []
    for armed in (False, True):
        system = make_system()
        proc = system.spawn()
        n = 600
        a = proc.mmap(n * P)
        proc.write(a, np.arange(n * P // 8, dtype=np.uint64))
        d = proc.open_device(0)
        race = Interleave(system, lambda: None, at=10**9, name="idle")
        with system.stats.measure() as st:
            if armed:
                with race:
                    cp = d.migrate(a, n).cpages
                    back = d.migrate_to_sys(a, n)
            else:
                cp = d.migrate(a, n).cpages
                back = d.migrate_to_sys(a, n)
        counts = {k: v for k, v in st.items() if v and not k.startswith("sched")}
        outs.append((cp, back, counts, system.dmirror_devices[0].free_pages[-n:],
                     proc.read(a, n * P) == np.arange(n * P // 8, dtype=np.uint64).tobytes()))
        d.close()
    assert outs[0] == outs[1] and outs[0][0] == outs[0][1] == 600 and outs[0][4]


@pytest.mark.parametrize("seed", [None, 1, 2, 3, 4])
def test_migration_races_cpu_access_under_the_scheduler(seed: int | None) -> None:
    """A thread migrates a region to the device and back while another reads and writes
    it (faults wait on migration entries, device pages fault back): whatever the
    interleaving, the data is what the writer left and the machine is consistent."""
    from hmmsim import System
    from hmmsim.kernel.sched import Scheduler

    system = System(kernel="7.3", ram=256 << 20, hugetlb_pages=0)
    p = system.spawn("app")
    n = 1100
    a = p.mmap(n * P)
    p.write(a, b"m" * (n * P))
    d = p.open_device(0)
    buf = p.mmap(n * P)
    rets: list[int] = []

    def migrator() -> None:
        from hmmsim.drivers.test_hmm_uapi import (
            HMM_DMIRROR_MIGRATE_TO_DEV,
            HMM_DMIRROR_MIGRATE_TO_SYS,
            HmmDmirrorCmd,
        )
        # the read-back after the migration finds -ENOENT if the CPU faulted a page back
        rets.append(p.task.ioctl(d.fd, HMM_DMIRROR_MIGRATE_TO_DEV, HmmDmirrorCmd(addr=a, npages=n, ptr=buf)))
        rets.append(p.task.ioctl(d.fd, HMM_DMIRROR_MIGRATE_TO_SYS, HmmDmirrorCmd(addr=a, npages=n)))

    def cpu() -> None:
        for i in (0, 600, 1099):
            assert p.read(a + i * P, 2) == b"mm"
            p.write(a + i * P, b"W")

    with Scheduler(system, seed=seed) as s:
        s.spawn(migrator, name="migrator", task=p.task)
        s.spawn(cpu, name="cpu", task=p.task)
        s.run()
    assert rets[0] in (0, -2) and rets[1] == 0
    for i in range(n):
        want = b"Wm" if i in (0, 600, 1099) else b"mm"
        assert p.read(a + i * P, 2) == want, i
    d.close()
    system.ls.assert_no_locks()
    system.check_invariants()
