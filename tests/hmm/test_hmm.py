"""``hmm_range_fault()``: every page-table state, every request form, every return code.

States (P = present, Z = zero page, . = none, S = swap, M = migration entry):
the output of a pure snapshot (no REQ_FAULT) and of a faulting call are checked for each,
with the kernel's return codes. Uses :class:`hmmsim.hmm.mirror.HmmMirror` (the driver
protocol) or calls ``hmm_range_fault`` directly with a notifier.
"""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim import Process, System
from hmmsim.drivers.dax import devdax_create
from hmmsim.hmm.hmm import (
    HMM_PFN_DMA_MAPPED, HMM_PFN_ERROR, HMM_PFN_FLAGS, HMM_PFN_P2PDMA, HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE, HMM_PFN_VALID, HMM_PFN_WRITE, HmmRange, decode_hmm_pfn,
    hmm_pfn_to_map_order, hmm_pfn_to_pfn, hmm_range_fault,
)
from hmmsim.hmm.mirror import HmmMirror
from hmmsim.kernel.errno import EBUSY, EFAULT, EINVAL, EPERM
from hmmsim.kernel.folio import folio_put
from hmmsim.kernel.fs import FMODE_READ, FMODE_WRITE, File, FileOperations
from hmmsim.kernel.locking import DeadlockError
from hmmsim.kernel.memory import remap_pfn_range, vmf_insert_pfn
from hmmsim.kernel.memremap import (
    DevPagemap, DevPagemapOps, MemoryType, memremap_pages, zone_device_page_init,
)
from hmmsim.kernel.migrate import migrate_folio_move, migrate_folio_unmap
from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.mmu_notifier import mmu_interval_read_begin
from hmmsim.kernel.page_types import PAGE_SIZE, PMD_SIZE
from hmmsim.kernel.pagemap import folio_unlock
from hmmsim.kernel.pgtable import (
    is_migration_entry, make_readable_device_private_entry, make_writable_device_private_entry,
    pte_pfn, pte_present, pte_to_swp_entry, swp_entry_to_pte,
)
from hmmsim.kernel.sched import Interleave
from hmmsim.kernel.task import vm_munmap
from hmmsim.kernel.vma import VM_MIXEDMAP

P = PAGE_SIZE
MASK_PFN = ~HMM_PFN_FLAGS & 0xFFFF_FFFF_FFFF_FFFF


def out(pfns: np.ndarray) -> list[int]:
    return [int(x) for x in pfns]


def flags(v: int) -> int:
    return v & HMM_PFN_FLAGS


def fault(m: HmmMirror, a: int, n: int, write: bool = False, **kw) -> tuple[int, list[int]]:
    df = HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0)
    ret, pfns = m.range_fault(a, a + n * P, default_flags=df, **kw)
    return ret, out(pfns)


def snap(m: HmmMirror, a: int, n: int) -> tuple[int, list[int]]:
    ret, pfns = m.range_fault(a, a + n * P)
    return ret, out(pfns)


@pytest.fixture
def mirror(proc: Process):
    m = HmmMirror(proc.mm)
    yield m
    m.remove()


# -- states ------------------------------------------------------------------------------------
def test_hmm_range_fault_pte_none(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(4 * P)
    assert snap(mirror, a, 4) == (0, [0, 0, 0, 0])
    ret, r = fault(mirror, a, 4)
    zero = proc.system.mem.zero_pfn
    assert ret == 0 and r == [zero | HMM_PFN_VALID] * 4  # read faults map the zero page
    ret, w = fault(mirror, a, 4, write=True)
    assert ret == 0
    assert all(flags(v) == HMM_PFN_VALID | HMM_PFN_WRITE and hmm_pfn_to_pfn(v) != zero for v in w)
    assert len({hmm_pfn_to_pfn(v) for v in w}) == 4


def test_hmm_range_fault_zero_page(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(2 * P)
    proc.touch(a, 2 * P)
    zero = proc.system.mem.zero_pfn
    assert snap(mirror, a, 2) == (0, [zero | HMM_PFN_VALID] * 2)


def test_hmm_range_fault_present_read_only_and_writable(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(2 * P)
    proc.write(a, b"x" * 2 * P)
    ret, r = snap(mirror, a, 2)
    assert ret == 0 and [flags(v) for v in r] == [HMM_PFN_VALID | HMM_PFN_WRITE] * 2
    assert hmm_pfn_to_pfn(r[0]) == pte_pfn(proc.mm.lookup_pte(a))
    proc.mprotect(a, P, "r")
    ret, r2 = snap(mirror, a, 2)
    assert [flags(v) for v in r2] == [HMM_PFN_VALID, HMM_PFN_VALID | HMM_PFN_WRITE]
    assert [hmm_pfn_to_pfn(v) for v in r2] == [hmm_pfn_to_pfn(v) for v in r]


def test_hmm_range_fault_no_vma(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(4 * P)
    proc.munmap(a + P, P)
    proc.write(a, b"y" * P)
    ret, r = snap(mirror, a, 3)
    assert ret == 0 and r[1] == HMM_PFN_ERROR and flags(r[0]) == HMM_PFN_VALID | HMM_PFN_WRITE
    ret, _ = fault(mirror, a, 3)
    assert ret == -EFAULT


def test_hmm_range_fault_prot_none_vma(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(2 * P)
    proc.write(a, b"z" * 2 * P)
    proc.mprotect(a, 2 * P, "none")
    assert snap(mirror, a, 2) == (0, [HMM_PFN_ERROR] * 2)
    assert fault(mirror, a, 2)[0] == -EFAULT


def test_hmm_range_fault_write_to_read_only_vma_is_eperm(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(2 * P, "r")
    ret, r = fault(mirror, a, 2, write=True)
    assert ret == -EPERM
    assert proc.mm.lookup_pte(a) == 0, "-EPERM comes before anything is faulted"


def test_hmm_range_fault_empty_range_is_einval(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(P)
    r = HmmRange(notifier=mirror.notifier, start=a, end=a, hmm_pfns=np.zeros(1, np.uint64))
    r.notifier_seq = mmu_interval_read_begin(mirror.notifier)
    mmap_read_lock(proc.mm)
    try:
        assert hmm_range_fault(r) == -EINVAL
    finally:
        mmap_read_unlock(proc.mm)


def _special_file(system: System, kind: str) -> File:
    """A driver whose mmap maps raw pfns: VM_PFNMAP|VM_IO (remap_pfn_range) or special
    ptes in a VM_MIXEDMAP VMA (vmf_insert_pfn of a pfn without struct page)."""
    raw = system.mem.max_pfn + 100  # no struct page: I/O memory

    def mmap(f: File, vma) -> int:  # noqa: ANN001
        if kind == "pfnmap":
            return remap_pfn_range(vma, vma.vm_start, raw, vma.vm_end - vma.vm_start)
        vma.vm_flags |= VM_MIXEDMAP
        return vmf_insert_pfn(vma, vma.vm_start, raw)

    return File(None, FileOperations(kind, mmap=mmap), FMODE_READ | FMODE_WRITE, name=kind)


def test_hmm_range_fault_vm_pfnmap_is_error(proc: Process, mirror: HmmMirror) -> None:
    fd = proc.task.fd_install(_special_file(proc.system, "pfnmap"))
    a = proc.mmap(2 * P, "rw", shared=True, fd=fd)
    assert snap(mirror, a, 2) == (0, [HMM_PFN_ERROR] * 2)
    assert fault(mirror, a, 2)[0] == -EFAULT
    proc.munmap(a, 2 * P)


def test_hmm_range_fault_special_pte_in_mixedmap(proc: Process, mirror: HmmMirror) -> None:
    fd = proc.task.fd_install(_special_file(proc.system, "mixed"))
    a = proc.mmap(2 * P, "rw", shared=True, fd=fd)
    ret, r = snap(mirror, a, 2)
    assert ret == 0 and r[0] == HMM_PFN_ERROR and r[1] == 0  # page 1 is pte_none
    assert fault(mirror, a, 1)[0] == -EFAULT
    proc.munmap(a, 2 * P)


def test_hmm_range_fault_mixedmap_normal_page(proc: Process, mirror: HmmMirror) -> None:
    dev = proc.open_device(0)
    a = proc.mmap(P, "rw", fd=dev.fd)  # test_hmm's mmap: vm_insert_page of a kernel page
    ret, r = snap(mirror, a, 1)
    assert ret == 0 and flags(r[0]) == HMM_PFN_VALID  # private mapping: read-only pte
    proc.munmap(a, P)
    dev.close()


def test_hmm_range_fault_numa_protnone_outputs_raw_pfn(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(2 * P)
    proc.write(a, b"n" * 2 * P)
    pfn = pte_pfn(proc.mm.lookup_pte(a))
    proc.numa_hint(a, 2 * P)
    ret, r = snap(mirror, a, 2)
    assert ret == 0 and r[0] == pfn, "protnone without a fault request: the bare pfn, no flags"
    ret, r = fault(mirror, a, 2)
    assert ret == 0 and r[0] == pfn | HMM_PFN_VALID | HMM_PFN_WRITE  # NUMA fault restored it


def test_hmm_range_fault_swap_entry(make_system) -> None:
    system = make_system(swap_pages=16)
    p = system.spawn()
    m = HmmMirror(p.mm)
    a = p.mmap(2 * P)
    p.write(a, b"s" * 2 * P)
    p.madvise(a, 2 * P, "pageout")
    assert not pte_present(p.mm.lookup_pte(a))
    assert snap(m, a, 2) == (0, [0, 0])
    ret, r = fault(m, a, 2)
    assert ret == 0 and all(flags(v) & HMM_PFN_VALID for v in r)
    assert p.read(a, 4) == b"ssss"
    m.remove()


def test_hmm_range_fault_migration_entry_waits(proc: Process, mirror: HmmMirror) -> None:
    """A fault request on a migration entry waits for the migration, then re-walks."""
    system = proc.system
    a = proc.mmap(2 * P)
    proc.write(a, b"m" * 2 * P)
    old = pte_pfn(proc.mm.lookup_pte(a))
    migrator = Interleave(system, lambda: None, name="migrator")
    with system.ls.as_thread(migrator.thread):
        ticket = migrate_folio_unmap(system, old)
    assert ticket is not None
    assert is_migration_entry(pte_to_swp_entry(proc.mm.lookup_pte(a)))
    assert snap(mirror, a, 2)[1][0] == 0  # no fault requested: just 0
    with pytest.raises(DeadlockError):
        fault(mirror, a, 1)  # nobody could finish the migration
    finish = Interleave(system, lambda: migrate_folio_move(system, ticket), name="migrator", where="wait")
    finish.thread = migrator.thread
    with system.stats.measure() as d, finish:
        ret, r = fault(mirror, a, 1)
    assert ret == 0 and finish.done
    assert d["migrate.entry_wait"] == 1
    new = hmm_pfn_to_pfn(r[0])
    assert new != old and new == pte_pfn(proc.mm.lookup_pte(a))
    assert proc.read(a, 2) == b"mm"


def test_hmm_range_fault_thp_pmd(make_system) -> None:
    p = make_system().spawn()
    m = HmmMirror(p.mm)
    base = p.mmap(4 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(a, PMD_SIZE, "hugepage")
    p.write(a, b"t" * P)
    ret, r = snap(m, a, 512)
    assert ret == 0
    assert all(hmm_pfn_to_map_order(v) == 9 and flags(v) & HMM_PFN_WRITE for v in r)
    pfns = [hmm_pfn_to_pfn(v) for v in r]
    assert pfns == list(range(pfns[0], pfns[0] + 512))
    m.remove()


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_hmm_range_fault_huge_zero_pmd(make_system, kernel: str) -> None:
    p = make_system(kernel=kernel).spawn()
    m = HmmMirror(p.mm)
    base = p.mmap(4 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(a, PMD_SIZE, "hugepage")
    ret, r = fault(m, a, 4)  # a read fault maps the huge zero page
    hz = p.system.mem.huge_zero_pfn
    assert ret == 0 and hmm_pfn_to_pfn(r[0]) == hz and hmm_pfn_to_pfn(r[3]) == hz + 3
    assert flags(r[0]) & HMM_PFN_VALID and hmm_pfn_to_map_order(r[0]) == 9
    ret, w = fault(m, a + P, 1, write=True)
    if kernel == "6.12":  # the write splits it; only that page is real
        assert ret == 0 and hmm_pfn_to_map_order(w[0]) == 0
        ret, after = snap(m, a, 3)
        zero = p.system.mem.zero_pfn
        assert after[0] == zero | HMM_PFN_VALID and after[2] == zero | HMM_PFN_VALID
    else:  # do_huge_zero_wp_pmd: a writable THP replaces it
        assert ret == 0 and hmm_pfn_to_map_order(w[0]) == 9 and flags(w[0]) & HMM_PFN_WRITE
        ret, after = snap(m, a, 3)
        assert not p.system.mem.is_huge_zero_pfn(hmm_pfn_to_pfn(after[0]))
        assert all(hmm_pfn_to_map_order(v) == 9 and flags(v) & HMM_PFN_WRITE for v in after)
    m.remove()


def test_hmm_range_fault_hugetlb_order_and_first_page_decides(make_system) -> None:
    p = make_system().spawn()
    m = HmmMirror(p.mm)
    a = p.mmap(2 * PMD_SIZE, "rw", hugetlb=True)
    assert snap(m, a, 2) == (0, [0, 0]), "no page table yet: a hole"
    p.write(a + PMD_SIZE, b"h")  # the pmd table now exists; the first huge page is still none
    ret, r = snap(m, a, 2)
    assert ret == 0 and r == [9 << 53, (9 << 53) | 1], "order bits even when not valid"
    # a fault requested for page 1 only is ignored: hugetlb looks at the first page's request
    pfns = np.zeros(512, np.uint64)
    pfns[1] = HMM_PFN_REQ_FAULT
    ret, _ = m.range_fault(a, a + PMD_SIZE, pfn_flags_mask=HMM_PFN_REQ_FAULT, hmm_pfns=pfns)
    assert ret == 0 and p.mm.lookup_pte(a) == 0
    pfns[:] = 0
    pfns[0] = HMM_PFN_REQ_FAULT
    ret, _ = m.range_fault(a, a + PMD_SIZE, pfn_flags_mask=HMM_PFN_REQ_FAULT, hmm_pfns=pfns)
    assert ret == 0 and int(pfns[5]) & HMM_PFN_VALID and hmm_pfn_to_map_order(int(pfns[5])) == 9
    assert not int(pfns[5]) & HMM_PFN_WRITE, "a read fault maps a private hugetlb page read-only"
    m.remove()


def test_hmm_range_fault_pud_leaf(make_system) -> None:
    system = make_system(ram=3 << 30)
    dax = devdax_create(system)
    p = system.spawn()
    m = HmmMirror(p.mm)
    fd = p.task.fd_install(dax.open())
    a = p.mmap(1 << 30, "rw", shared=True, fd=fd, addr=1 << 40, fixed=True)
    assert snap(m, a, 2) == (0, [0, 0])
    ret, r = fault(m, a + 5 * P, 2)
    assert ret == 0 and hmm_pfn_to_map_order(r[0]) == 18 and hmm_pfn_to_pfn(r[0]) == dax.start_pfn + 5
    # a shared writable mapping needs no write notification: vm_page_prot is writable
    assert flags(r[0]) & HMM_PFN_WRITE
    m.remove()
    p.munmap(a, 1 << 30)


# -- requests -------------------------------------------------------------------------------------
def test_hmm_range_fault_req_write_alone_faults_nothing(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(2 * P)
    ret, r = mirror.range_fault(a, a + 2 * P, default_flags=HMM_PFN_REQ_WRITE)
    assert ret == 0 and out(r) == [0, 0] and proc.mm.lookup_pte(a) == 0


def test_hmm_range_fault_per_page_requests_with_mask(proc: Process, mirror: HmmMirror) -> None:
    """The documented idiom: all readable, page k writable."""
    a = proc.mmap(4 * P)
    proc.touch(a, 4 * P)  # zero pages
    pfns = np.zeros(4, np.uint64)
    pfns[2] = HMM_PFN_REQ_WRITE
    ret, r = mirror.range_fault(a, a + 4 * P, default_flags=HMM_PFN_REQ_FAULT,
                                pfn_flags_mask=HMM_PFN_REQ_WRITE, hmm_pfns=pfns)
    assert ret == 0
    # the write fault for page 2 covers the rest of the span: page 3 is made writable too
    v, vw = HMM_PFN_VALID, HMM_PFN_VALID | HMM_PFN_WRITE
    assert [flags(int(x)) for x in r] == [v, v, vw, vw]


def test_hmm_range_fault_faults_to_the_end_of_the_span(proc: Process, mirror: HmmMirror) -> None:
    """A fault covers every page from the first needy one to the end of the walk span,
    requested or not."""
    a = proc.mmap(8 * P)
    pfns = np.zeros(8, np.uint64)
    pfns[2] = HMM_PFN_REQ_FAULT
    with proc.system.stats.measure() as d:
        ret, _ = mirror.range_fault(a, a + 8 * P, pfn_flags_mask=HMM_PFN_REQ_FAULT, hmm_pfns=pfns)
    assert ret == 0
    # there was no page table: the hole is the whole range, so pages 0..7 were all faulted
    assert all(proc.mm.lookup_pte(a + i * P) for i in range(8))
    assert d["fault.handle_mm_fault"] == 8 and d["hmm.vma_fault"] == 1


def test_hmm_range_fault_fault_span_starts_at_first_needy_pte(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(8 * P)
    proc.touch(a, 2 * P)  # pages 0, 1 mapped; the table exists now
    pfns = np.zeros(8, np.uint64)
    pfns[4] = HMM_PFN_REQ_FAULT
    ret, _ = mirror.range_fault(a, a + 8 * P, pfn_flags_mask=HMM_PFN_REQ_FAULT, hmm_pfns=pfns)
    assert ret == 0
    assert [bool(proc.mm.lookup_pte(a + i * P)) for i in range(8)] == [True, True, False, False] + [True] * 4


def test_hmm_range_fault_keeps_sticky_flags(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(2 * P)
    proc.write(a, b"d" * 2 * P)
    pfns = np.array([HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA, 0], np.uint64)
    ret, r = mirror.range_fault(a, a + 2 * P, hmm_pfns=pfns)
    assert ret == 0
    assert int(r[0]) & (HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA) == HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA
    assert int(r[1]) & HMM_PFN_DMA_MAPPED == 0
    assert "VALID|WRITE|DMA_MAPPED|P2PDMA" in decode_hmm_pfn(int(r[0]))


def test_hmm_range_fault_outputs_below_last_inputs_above(proc: Process, mirror: HmmMirror) -> None:
    """On an error, entries before the failing page hold outputs, the rest inputs."""
    a = proc.mmap(4 * P)
    proc.write(a, b"o" * 2 * P)
    proc.munmap(a + 2 * P, P)
    pfns = np.full(4, HMM_PFN_REQ_FAULT, np.uint64)
    ret, r = mirror.range_fault(a, a + 4 * P, pfn_flags_mask=HMM_PFN_REQ_FAULT, hmm_pfns=pfns)
    assert ret == -EFAULT
    assert flags(int(r[0])) == HMM_PFN_VALID | HMM_PFN_WRITE and flags(int(r[1])) == HMM_PFN_VALID | HMM_PFN_WRITE
    assert int(r[2]) == HMM_PFN_REQ_FAULT and int(r[3]) == HMM_PFN_REQ_FAULT


# -- the notifier sequence ---------------------------------------------------------------------------
def test_hmm_range_fault_ebusy_after_invalidation(proc: Process, mirror: HmmMirror) -> None:
    """An invalidation between read_begin and hmm_range_fault forces -EBUSY."""
    a = proc.mmap(4 * P)
    proc.write(a, b"e" * 4 * P)
    r = HmmRange(notifier=mirror.notifier, start=a, end=a + 4 * P, hmm_pfns=np.zeros(4, np.uint64))
    r.notifier_seq = mmu_interval_read_begin(mirror.notifier)
    proc.mprotect(a, P, "r")  # MMU_NOTIFY_PROTECTION_VMA
    mmap_read_lock(proc.mm)
    try:
        assert hmm_range_fault(r) == -EBUSY
        r.notifier_seq = mmu_interval_read_begin(mirror.notifier)
        assert hmm_range_fault(r) == 0
    finally:
        mmap_read_unlock(proc.mm)


def test_hmm_range_fault_cow_break_invalidates_and_driver_retries(proc: Process, mirror: HmmMirror) -> None:
    """Write-faulting zero pages replaces them (MMU_NOTIFY_CLEAR): hmm_range_fault
    returns -EBUSY from its sequence check and the driver loop retries."""
    a = proc.mmap(2 * P)
    proc.touch(a, 2 * P)
    ret, r = fault(mirror, a, 2, write=True)
    assert ret == 0 and mirror.retries == 1
    assert [e[0] for e in mirror.invalidations] == ["MMU_NOTIFY_CLEAR", "MMU_NOTIFY_CLEAR"]


def test_hmm_range_fault_filling_holes_needs_no_retry(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(8 * P)
    ret, _ = fault(mirror, a, 8, write=True)
    assert ret == 0 and mirror.retries == 0 and mirror.invalidations == []


def test_hmm_range_fault_racing_munmap(proc: Process, mirror: HmmMirror) -> None:
    """A munmap racing with the driver loop: whenever it lands, the loop either retries
    and fails with -EFAULT or completes before it."""
    system = proc.system
    results = set()
    for at in range(0, 40, 3):
        a = proc.mmap(16 * P)
        proc.write(a, b"r" * 16 * P)
        race = Interleave(system, lambda a=a: vm_munmap(proc.mm, a + 8 * P, 8 * P), at=at)
        with race:
            ret, r = fault(mirror, a, 16)
        assert race.done
        results.add(ret)
        if ret == 0:
            assert all(flags(v) & HMM_PFN_VALID for v in r)
        else:
            assert ret == -EFAULT
        proc.munmap(a, 16 * P)
    assert results == {0, -EFAULT}


def test_hmm_range_fault_counts_one_walk_per_pass(proc: Process, mirror: HmmMirror) -> None:
    a = proc.mmap(1024 * P)
    with proc.system.stats.measure() as d:
        fault(mirror, a, 1024, write=True)
    assert d["hmm.range_fault"] == 1
    assert d["walk_page_range"] == 2, "one walk that faults, one re-walk that reads"
    assert d["fault.handle_mm_fault"] == 1024


def test_hmm_range_fault_needs_mmap_lock(proc: Process, mirror: HmmMirror) -> None:
    from hmmsim.kernel.locking import LockdepError
    a = proc.mmap(P)
    r = HmmRange(notifier=mirror.notifier, start=a, end=a + P, hmm_pfns=np.zeros(1, np.uint64))
    with pytest.raises(LockdepError):
        hmm_range_fault(r)




class _HandMigrated:
    """One anonymous page moved by hand to a device-private page of a test pagemap,
    as ``migrate_vma_*`` would leave it (the source page is kept aside, not freed, so
    that ``migrate_to_ram`` can put it back). Migration itself is the next layer; this
    exercises only hmm_range_fault's and do_swap_page's handling of the entry."""

    def __init__(self, proc: Process, addr: int, writable: bool = True) -> None:
        self.sys = sys = proc.mm.sys
        self.mm, self.addr = proc.mm, addr
        self.owner = object()
        self.freed: list[int] = []
        start = sys.request_free_mem_region(512)
        self.pgmap = DevPagemap(MemoryType.MEMORY_DEVICE_PRIVATE, start, 512,
                                DevPagemapOps(page_free=self.freed.append,
                                              migrate_to_ram=self._migrate_to_ram), self.owner)
        assert memremap_pages(sys, self.pgmap) == 0
        self.dpfn = start
        zone_device_page_init(sys, self.dpfn)
        folio_unlock(sys, self.dpfn)
        pmd = proc.mm.pmd_ref(addr)
        tbl, tid = proc.mm.pte_offset_map_lock(pmd)
        self.orig = int(tbl[(addr >> 12) & 511])
        make = make_writable_device_private_entry if writable else make_readable_device_private_entry
        tbl[(addr >> 12) & 511] = swp_entry_to_pte(make(self.dpfn))
        proc.mm.pte_unmap_unlock(tid)
        self.calls = 0

    def _migrate_to_ram(self, vmf) -> int:
        """The driver's ``migrate_to_ram``: put the original page back, drop the device
        page (its last reference: ``page_free`` runs)."""
        self.calls += 1
        assert vmf.address == self.addr
        tbl, tid = self.mm.pte_offset_map_lock(self.mm.pmd_ref(self.addr))
        tbl[(self.addr >> 12) & 511] = self.orig
        self.mm.pte_unmap_unlock(tid)
        folio_put(self.sys, self.dpfn)  # the reference the mapping held
        return 0


@pytest.mark.parametrize("writable", [True, False])
def test_hmm_range_fault_device_private_entry_of_the_owner(proc: Process, mirror: HmmMirror,
                                                           writable: bool) -> None:
    a = proc.mmap(3 * P)
    proc.write(a, b"x" * (3 * P))
    dev = _HandMigrated(proc, a + P, writable)
    want = HMM_PFN_VALID | (HMM_PFN_WRITE if writable else 0)
    # the owner sees the device pfn, even when a write fault was requested
    for req in (0, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE):
        ret, r = mirror.range_fault(a, a + 3 * P, default_flags=req, dev_private_owner=dev.owner)
        assert ret == 0 and int(r[1]) == dev.dpfn | want
    # anyone else: 0 without a fault request
    ret, r = snap(mirror, a, 3)
    assert ret == 0 and int(r[1]) == 0 and flags(int(r[0])) == flags(int(r[2])) == HMM_PFN_VALID | HMM_PFN_WRITE
    assert dev.calls == 0 and dev.freed == []
    dev._migrate_to_ram(type("V", (), {"address": a + P})())  # restore for the next case
    assert dev.freed == [dev.dpfn]


def test_hmm_range_fault_device_private_entry_faults_through_migrate_to_ram(
        proc: Process, mirror: HmmMirror) -> None:
    """Another owner asking for the page faults it: do_swap_page calls the pagemap's
    migrate_to_ram, the walk restarts and reports the system page."""
    a = proc.mmap(2 * P)
    proc.write(a, b"y" * (2 * P))
    dev = _HandMigrated(proc, a)
    sys_page = pte_pfn(dev.orig)
    with proc.mm.sys.stats.measure() as d:
        ret, r = fault(mirror, a, 2)
    assert ret == 0 and dev.calls == 1 and d["fault.migrate_to_ram"] == 1
    assert hmm_pfn_to_pfn(r[0]) == sys_page and flags(r[0]) == HMM_PFN_VALID | HMM_PFN_WRITE
    assert dev.freed == [dev.dpfn] and dev.pgmap.nr_used == 0
    assert proc.read(a, 2) == b"yy"
