"""``hmm_range_fault()``: every page-table state, every request form, every return code.

States (P = present, Z = zero page, . = none, S = swap, M = migration entry):
the output of a pure snapshot (no REQ_FAULT) and of a faulting call are checked for each,
with the kernel's return codes. Uses :class:`hmmsim.hmm.mirror.HmmMirror` (the driver
protocol) or calls ``hmm_range_fault`` directly with a notifier.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmmsim import Process, System
from hmmsim.drivers.dax import devdax_create
from hmmsim.hmm import hmm as hmm_mod
from hmmsim.hmm.hmm import (
    HMM_PFN_DMA_MAPPED, HMM_PFN_ERROR, HMM_PFN_FLAGS, HMM_PFN_LAYOUT, HMM_PFN_P2PDMA,
    HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_VALID, HMM_PFN_WRITE, HmmPteAction, HmmRange,
    HmmVmaWalk, decode_hmm_pfn, hmm_do_fault, hmm_pfn_layout, hmm_pfn_to_map_order, hmm_pfn_to_pfn,
    hmm_range_fault, hmm_vma_handle_pte,
)
from hmmsim.hmm.mirror import HmmMirror
from hmmsim.kernel.errno import EBUSY, EFAULT, EINVAL, ENOMEM, EPERM
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
from hmmsim.kernel.pagewalk import MmWalk
from hmmsim.kernel.pgtable import (
    _PAGE_DEVMAP, _PAGE_SPECIAL, PAGE_NONE, PAGE_READONLY, PAGE_SHARED, PTE_MARKER_GUARD,
    PTE_MARKER_POISONED, PTE_MARKER_UFFD_WP, is_migration_entry, make_hwpoison_entry,
    make_pte_marker_entry, make_readable_device_private_entry, make_readable_migration_entry,
    make_writable_device_exclusive_entry, make_writable_device_private_entry, pfn_pte,
    pte_mkspecial, pte_pfn, pte_present, pte_to_swp_entry, swp_entry, swp_entry_to_pmd,
    swp_entry_to_pte,
)
from hmmsim.kernel.profile import KERNELS, get_profile
from hmmsim.kernel.sched import Interleave
from hmmsim.kernel.task import vm_munmap
from hmmsim.kernel.vma import VM_MIXEDMAP

P = PAGE_SIZE
MASK_PFN = ~HMM_PFN_FLAGS & 0xFFFF_FFFF_FFFF_FFFF
KERNEL_NAMES = list(KERNELS)


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
    lay = hmm_pfn_layout(p.system.profile)  # the release's order field
    base = p.mmap(4 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(a, PMD_SIZE, "hugepage")
    ret, r = fault(m, a, 4)  # a read fault maps the huge zero page
    hz = p.system.mem.huge_zero_pfn
    assert ret == 0 and hmm_pfn_to_pfn(r[0], lay) == hz and hmm_pfn_to_pfn(r[3], lay) == hz + 3
    assert flags(r[0]) & HMM_PFN_VALID and hmm_pfn_to_map_order(r[0], lay) == 9
    ret, w = fault(m, a + P, 1, write=True)
    if kernel == "6.12":  # the write splits it; only that page is real
        assert ret == 0 and hmm_pfn_to_map_order(w[0], lay) == 0
        ret, after = snap(m, a, 3)
        zero = p.system.mem.zero_pfn
        assert after[0] == zero | HMM_PFN_VALID and after[2] == zero | HMM_PFN_VALID
    else:  # do_huge_zero_wp_pmd: a writable THP replaces it
        assert ret == 0 and hmm_pfn_to_map_order(w[0], lay) == 9 and flags(w[0]) & HMM_PFN_WRITE
        ret, after = snap(m, a, 3)
        assert not p.system.mem.is_huge_zero_pfn(hmm_pfn_to_pfn(after[0], lay))
        assert all(hmm_pfn_to_map_order(v, lay) == 9 and flags(v) & HMM_PFN_WRITE for v in after)
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
    # one fault run: inside the walk (6.12 hmm_vma_fault) or after it (7.3 hmm_do_fault)
    assert d["fault.handle_mm_fault"] == 8 and d["hmm.vma_fault"] + d["hmm.do_fault"] == 1


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


# -- release differences (every test runs under every modelled kernel) ------------------------------
DMA = HMM_PFN_DMA_MAPPED


def _kmirror(make_system, kernel: str, **kw):
    system = make_system(kernel=kernel, **kw)
    p = system.spawn()
    return system, p, HmmMirror(p.mm)


def _set_pte(mm, addr: int, pte: int) -> int:
    """Store a hand-made entry (returns the old one)."""
    tbl, tid = mm.pte_offset_map_lock(mm.pmd_ref(addr))
    old = int(tbl[(addr >> 12) & 511])
    tbl[(addr >> 12) & 511] = pte
    mm.pte_unmap_unlock(tid)
    return old


def test_hmm_pfn_layout_per_release() -> None:
    """6.12: order at 56, HMM_PFN_FLAGS = 0xFF << 56, no inout flags; 7.3: order at 53,
    every bit from 53 up, DMA_MAPPED/P2PDMA/P2PDMA_BUS carried."""
    old, new = hmm_pfn_layout(get_profile("6.12")), hmm_pfn_layout(get_profile("7.3"))
    assert (old.order_shift, old.flags, old.inout_flags) == (56, 0xFF << 56, 0)
    assert new is HMM_PFN_LAYOUT and (new.order_shift, new.flags) == (53, HMM_PFN_FLAGS)
    assert new.inout_flags == HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | (1 << 58)
    v = (1 << 63) | (9 << 56) | 0x1234
    assert hmm_pfn_to_map_order(v, old) == 9 and hmm_pfn_to_pfn(v, old) == 0x1234
    assert decode_hmm_pfn(v, old) == "VALID order=9 pfn=0x1234"
    assert hmm_pfn_to_map_order(v) == (9 << 3) & 0x1F, "the 7.3 reading of a 6.12 value differs"


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_hmm_range_fault_thp_order_bits_per_release(make_system, kernel: str) -> None:
    system, p, m = _kmirror(make_system, kernel)
    base = p.mmap(4 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(a, PMD_SIZE, "hugepage")
    p.write(a, b"t" * P)
    ret, r = snap(m, a, 2)
    shift = get_profile(kernel).hmm_pfn_order_shift
    assert ret == 0 and flags(r[0]) == HMM_PFN_VALID | HMM_PFN_WRITE | (9 << shift) & HMM_PFN_FLAGS
    assert (r[0] >> shift) & 0x1F == 9 and r[0] & ((1 << shift) - 1) == pte_pfn(p.mm.pmd_ref(a).get())
    assert hmm_pfn_to_map_order(r[0], hmm_pfn_layout(system.profile)) == 9
    m.remove()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_hmm_pfns_fill_and_every_output_path_carry_inout_flags(make_system, kernel: str) -> None:
    """7.3 carries DMA_MAPPED from input to output on the fill, pte, pmd, hugetlb and
    device-private paths; 6.12 overwrites the whole entry."""
    system, p, m = _kmirror(make_system, kernel)
    carry = DMA if get_profile(kernel).hmm_pfn_sticky_flags else 0

    def run(a: int, n: int, **kw) -> list[int]:
        pfns = np.full(n, DMA, np.uint64)
        ret, r = m.range_fault(a, a + n * P, hmm_pfns=pfns, **kw)
        assert ret == 0
        return out(r)

    a = p.mmap(4 * P)
    assert run(a, 2) == [carry, carry]  # hole: hmm_pfns_fill(0)
    p.write(a, b"x" * 4 * P)
    dev = _HandMigrated(p, a + P)
    r = run(a, 2, dev_private_owner=dev.owner)
    assert [v & DMA for v in r] == [carry, carry] and r[1] & ~DMA == dev.dpfn | HMM_PFN_VALID | HMM_PFN_WRITE
    dev._migrate_to_ram(type("V", (), {"address": a + P})())
    base = p.mmap(4 * PMD_SIZE)
    t = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(t, PMD_SIZE, "hugepage")
    p.write(t, b"t")
    assert all(v & DMA == carry and v & HMM_PFN_VALID for v in run(t, 3))  # pmd
    h = p.mmap(PMD_SIZE, "rw", hugetlb=True)
    p.write(h, b"h")
    assert all(v & DMA == carry and v & HMM_PFN_VALID for v in run(h, 3))  # hugetlb
    p.munmap(a + 3 * P, P)
    assert run(a + 3 * P, 1) == [carry | HMM_PFN_ERROR]  # no VMA: fill(ERROR)
    m.remove()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_hmm_range_fault_faults_inside_or_after_the_walk(make_system, kernel: str) -> None:
    """6.12 runs handle_mm_fault from the walk callback (hmm_vma_fault); 7.3 records the
    fault and hmm_do_fault runs it after walk_page_range returned."""
    system, p, m = _kmirror(make_system, kernel)
    a = p.mmap(8 * P)
    seen: list[tuple[str, ...]] = []
    real = hmm_mod.handle_mm_fault_range

    def spy(vma, start, end, fl):  # noqa: ANN001, ANN202
        seen.append(tuple(k for _i, k, _m in system.ls.current.held_locks()))
        return real(vma, start, end, fl)

    hmm_mod.handle_mm_fault_range = spy
    try:
        with system.stats.measure() as d:
            ret, r = fault(m, a, 8, write=True)
    finally:
        hmm_mod.handle_mm_fault_range = real
    assert ret == 0 and all(flags(v) == HMM_PFN_VALID | HMM_PFN_WRITE for v in r)
    outside = get_profile(kernel).hmm_fault_outside_walk
    assert (d["hmm.do_fault"], d["hmm.vma_fault"]) == ((1, 0) if outside else (0, 1))
    assert len(seen) == 1 and not any(k in ("ptl", "pmd_lock", "hugetlb_vma_lock") for k in seen[0])
    m.remove()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_hmm_range_fault_hugetlb_hole_relocks_the_hugetlb_vma_lock_in_6_12(make_system, kernel: str) -> None:
    """A device read of an untouched shared hugetlb mapping: the walker calls pte_hole
    holding the hugetlb VMA lock; 6.12 faults there and hugetlb_fault takes the lock
    again (a recursive down_read lockdep reports and survives); 7.3 faults after the walk."""
    system, p, m = _kmirror(make_system, kernel)
    a = p.mmap(PMD_SIZE, "rw", shared=True, hugetlb=True)
    ret, r = fault(m, a, 4)
    assert ret == 0 and all(v & HMM_PFN_VALID and hmm_pfn_to_map_order(v, hmm_pfn_layout(system.profile)) == 9
                            for v in r)
    if get_profile(kernel).hmm_fault_outside_walk:
        assert system.ls.warnings == []
    else:
        assert system.ls.warnings == [f"possible recursive locking detected: {system.ls.current.name} is "
                                      "trying to acquire hugetlb_vma_lock (read) but already holds it (read)"]
    m.remove()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_hmm_range_fault_oom_errno(make_system, kernel: str) -> None:
    """vm_fault_to_errno(): VM_FAULT_OOM is -ENOMEM in 7.3; 6.12 says -EFAULT."""
    system, p, m = _kmirror(make_system, kernel, ram=64 << 20, hugetlb_pages=0)
    a = p.mmap(96 << 20, noreserve=True)
    ret, _ = fault(m, a, (96 << 20) // P, write=True)
    assert ret == (-ENOMEM if get_profile(kernel).hmm_fault_errno else -EFAULT)
    m.remove()
    p.munmap(a, 96 << 20)


def test_hmm_range_fault_errno_feature_alone(make_system) -> None:
    """hmm_fault_errno is its own feature: 7.3's after-walk fault with 6.12's errors."""
    system, p, m = _kmirror(make_system, "7.3", ram=64 << 20, hugetlb_pages=0)
    system.profile = system.profile.with_(hmm_fault_errno=False)
    a = p.mmap(96 << 20, noreserve=True)
    with system.stats.measure() as d:
        ret, _ = fault(m, a, (96 << 20) // P, write=True)
    assert ret == -EFAULT and d["hmm.do_fault"] == 1
    m.remove()
    p.munmap(a, 96 << 20)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_hmm_range_fault_write_to_read_only_vma_is_eperm_per_release(make_system, kernel: str) -> None:
    system, p, m = _kmirror(make_system, kernel)
    a = p.mmap(2 * P, "r")
    assert fault(m, a, 2, write=True)[0] == -EPERM and p.mm.lookup_pte(a) == 0
    m.remove()


def test_hmm_do_fault_without_a_vma_is_efault(proc: Process, mirror: HmmMirror) -> None:
    """The VMA a callback recorded a fault in can be gone by the time hmm_do_fault runs."""
    a = proc.mmap(2 * P)
    proc.munmap(a, 2 * P)
    r = HmmRange(notifier=mirror.notifier, start=a, end=a + 2 * P, hmm_pfns=np.zeros(2, np.uint64),
                 default_flags=HMM_PFN_REQ_FAULT)
    hvw = HmmVmaWalk(r, proc.system.profile)
    hvw.last, hvw.end, hvw.required_fault = a, a + 2 * P, 1
    mmap_read_lock(proc.mm)
    try:
        assert hmm_do_fault(proc.mm, hvw) == -EFAULT
    finally:
        mmap_read_unlock(proc.mm)


class _DevicePrivatePmd:
    """A PMD-sized device-private folio's PMD entry, hand-made (device-private THP
    migration is the next layer): the PMD of ``addr`` (no pte table yet) is set to a
    swap-format PMD holding a device-private entry of a 512-page test pagemap."""

    def __init__(self, p: Process, addr: int, writable: bool) -> None:
        self.sys = sys = p.mm.sys
        self.owner = object()
        start = sys.request_free_mem_region(512)
        self.pgmap = DevPagemap(MemoryType.MEMORY_DEVICE_PRIVATE, start, 512,
                                DevPagemapOps(page_free=lambda pfn: None, migrate_to_ram=lambda v: 0),
                                self.owner)
        assert memremap_pages(sys, self.pgmap) == 0
        self.dpfn = start
        self.pmd = p.mm.pmd_ref(addr, alloc=True)
        assert self.pmd.get() == 0
        make = make_writable_device_private_entry if writable else make_readable_device_private_entry
        self.pmd.set(swp_entry_to_pmd(make(start)))

    def remove(self) -> None:
        self.pmd.set(0)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("writable", [True, False])
def test_hmm_vma_handle_absent_pmd_device_private(make_system, kernel: str, writable: bool) -> None:
    system, p, m = _kmirror(make_system, kernel)
    base = p.mmap(4 * PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    dev = _DevicePrivatePmd(p, a, writable)
    layout = hmm_pfn_layout(system.profile)
    try:
        ret, r = m.range_fault(a + 2 * P, a + 5 * P, dev_private_owner=dev.owner)
        snap_other = snap(m, a, 2)
        # faulting a device-private THP in (do_huge_pmd_device_private) is the next layer:
        # only check that hmm_range_fault records the fault
        recorded: list[tuple[int, int, int]] = []
        real = hmm_mod.hmm_do_fault
        hmm_mod.hmm_do_fault = lambda mm, hvw: recorded.append((hvw.last, hvw.end, hvw.required_fault)) or -EFAULT
        try:
            ret_rec, _ = m.range_fault(a + P, a + 2 * P, default_flags=HMM_PFN_REQ_FAULT)
        finally:
            hmm_mod.hmm_do_fault = real
    finally:
        dev.remove()
    if get_profile(kernel).hmm_device_private_pmd:
        want = HMM_PFN_VALID | (HMM_PFN_WRITE if writable else 0)
        assert ret == 0
        # every page gets order 9; the pfns count from the entry's pfn, not the offset
        assert [int(v) & ~layout.flags for v in r] == [dev.dpfn, dev.dpfn + 1, dev.dpfn + 2]
        assert all(int(v) & layout.flags == want | layout.order_flags(9) for v in r)
        assert snap_other == (0, [HMM_PFN_ERROR] * 2), "not the owner, no fault: ERROR"
        assert recorded == [(a + P, a + 2 * P, 1)] and ret_rec == -EFAULT, "a fault is recorded"
    else:
        assert ret == 0 and out(r) == [HMM_PFN_ERROR] * 3
        assert snap_other == (0, [HMM_PFN_ERROR] * 2)
        assert recorded == [] and ret_rec == -EFAULT, "6.12: -EFAULT, no fault"
    m.remove()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_hmm_vma_walk_pud_devmap_per_release(make_system, kernel: str) -> None:
    """6.12 mirrors only devmap PUD leaves (others are split by the walker); 7.3 has no
    devmap and mirrors any PUD leaf. device-dax maps devmap leaves only where devmap exists."""
    system = make_system(ram=3 << 30, kernel=kernel)
    dax = devdax_create(system)
    p = system.spawn()
    m = HmmMirror(p.mm)
    fd = p.task.fd_install(dax.open())
    a = p.mmap(1 << 30, "rw", shared=True, fd=fd, addr=1 << 40, fixed=True)
    ret, r = fault(m, a, 1)
    layout = hmm_pfn_layout(system.profile)
    assert ret == 0 and hmm_pfn_to_map_order(r[0], layout) == 18
    # the PUD output path carries the inout flags too (7.3)
    ret, r2 = m.range_fault(a, a + 2 * P, hmm_pfns=np.full(2, DMA, np.uint64))
    if get_profile(kernel).hmm_pfn_sticky_flags:
        assert ret == 0 and out(r2) == [r[0] | DMA, (r[0] + 1) | DMA]
    else:  # 6.12: overwritten (bit 60 is the top bit of 6.12's order field: order 18 sets it)
        assert ret == 0 and out(r2) == [r[0], r[0] + 1] and (r[0] >> 56) & 0x1F == 18
    tbl, idx = p.mm.pud_entry(a)
    devmap = get_profile(kernel).pte_devmap
    assert bool(int(tbl[idx]) & _PAGE_DEVMAP) == devmap
    tbl[idx] = np.uint64(int(tbl[idx]) & ~_PAGE_DEVMAP)  # a PUD leaf without devmap
    ret, r = snap(m, a, 1)
    if devmap:
        assert ret == 0 and r == [0] and int(tbl[idx]) == 0, "split by the walker, then a hole"
    else:
        assert ret == 0 and hmm_pfn_to_map_order(r[0], layout) == 18 and hmm_pfn_to_pfn(r[0], layout) == dax.start_pfn
    m.remove()
    p.munmap(a, 1 << 30)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_hmm_vma_handle_pte_devmap_per_release(make_system, kernel: str) -> None:
    """A special devmap pte (vm_normal_page() is NULL): 6.12 mirrors it (pte_devmap), 7.3
    reports ERROR (-EFAULT if a fault is asked for)."""
    system, p, m = _kmirror(make_system, kernel)
    fd = p.task.fd_install(_special_file(system, "mixed"))
    a = p.mmap(2 * P, "rw", shared=True, fd=fd)
    e = p.mm.lookup_pte(a)
    _set_pte(p.mm, a, e | _PAGE_DEVMAP)
    ret, r = snap(m, a, 1)
    ret_f, _ = fault(m, a, 1)
    _set_pte(p.mm, a, e)
    if get_profile(kernel).pte_devmap:
        assert ret == 0 and r == [pte_pfn(e) | HMM_PFN_VALID | HMM_PFN_WRITE] and ret_f == 0
    else:
        assert (ret, r, ret_f) == (0, [HMM_PFN_ERROR], -EFAULT)
    p.munmap(a, 2 * P)
    m.remove()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("marker", [PTE_MARKER_GUARD, PTE_MARKER_POISONED, PTE_MARKER_UFFD_WP])
def test_hmm_vma_handle_pte_markers_per_release(make_system, kernel: str, marker: int) -> None:
    """6.12 pte_none_mostly(): every marker reads as none and a fault request faults it
    (handle_pte_marker: SIGSEGV/HWPOISON -> -EFAULT; uffd-wp dropped and faulted in).
    7.3: a uffd-wp marker reads as none; any other marker is 0, or -EFAULT without a
    fault if one is requested."""
    system, p, m = _kmirror(make_system, kernel)
    a = p.mmap(2 * P)
    p.write(a + P, b"m")  # the pte table exists; page 0 is none
    _set_pte(p.mm, a, swp_entry_to_pte(make_pte_marker_entry(marker)))
    assert snap(m, a, 2)[1][0] == 0
    with system.stats.measure() as d:
        ret, r = fault(m, a, 1)
    as_none = marker == PTE_MARKER_UFFD_WP or not get_profile(kernel).hmm_only_uffd_wp_marker_is_none
    if marker == PTE_MARKER_UFFD_WP:
        assert ret == 0 and r[0] & HMM_PFN_VALID
    else:
        assert ret == -EFAULT
        _set_pte(p.mm, a, 0)
    assert (d["fault.handle_mm_fault"] > 0) == as_none
    m.remove()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_hmm_vma_handle_pte_invalid_pfn_is_error(make_system, kernel: str) -> None:
    """A present, non-special pte whose pfn is not a valid frame (vm_normal_page() is
    NULL) is ERROR, or -EFAULT when a fault is requested, on the table fast path too."""
    system, p, m = _kmirror(make_system, kernel)
    a = p.mmap(4 * P)
    p.mm.pmd_ref(a, alloc=True)
    p.mm.pte_offset_map_lock(p.mm.pmd_ref(a), alloc=True)
    p.mm.pte_unmap_unlock(p.mm.pte_table(p.mm.pmd_ref(a)))
    _set_pte(p.mm, a + P, pfn_pte(system.mem.max_pfn + 7, PAGE_SHARED))
    ret, r = snap(m, a, 3)
    ret_f, _ = fault(m, a + P, 2)
    _set_pte(p.mm, a + P, 0)
    assert (ret, r, ret_f) == (0, [0, HMM_PFN_ERROR, 0], -EFAULT)
    m.remove()


# -- the table-at-a-time pte path against the one-entry decision ---------------------------------


def _pte_kinds(system: System, owned_dpfn: int) -> list[int]:
    """One entry of every class hmm_vma_handle_pte() tells apart."""
    mem = system.mem
    return [
        0, pfn_pte(100, PAGE_SHARED), pfn_pte(101, PAGE_READONLY), pfn_pte(102, PAGE_NONE),
        pfn_pte(mem.zero_pfn, PAGE_READONLY) | _PAGE_SPECIAL,
        pte_mkspecial(pfn_pte(mem.max_pfn + 3, PAGE_SHARED)),
        pte_mkspecial(pfn_pte(mem.max_pfn + 4, PAGE_SHARED)) | _PAGE_DEVMAP,
        pfn_pte(mem.max_pfn + 5, PAGE_READONLY),
        swp_entry_to_pte(swp_entry(0, 9)), swp_entry_to_pte(make_hwpoison_entry(103)),
        swp_entry_to_pte(make_readable_migration_entry(104)),
        swp_entry_to_pte(make_writable_device_private_entry(owned_dpfn)),
        swp_entry_to_pte(make_readable_device_private_entry(owned_dpfn + 1)),
        swp_entry_to_pte(make_writable_device_private_entry(mem.max_pfn - 1)),
        swp_entry_to_pte(make_writable_device_exclusive_entry(105)),
        swp_entry_to_pte(make_pte_marker_entry(PTE_MARKER_UFFD_WP)),
        swp_entry_to_pte(make_pte_marker_entry(PTE_MARKER_GUARD)),
    ]


@pytest.fixture(scope="module")
def table_cases():  # noqa: ANN201
    """Per kernel: a System with a mirror, a VMA and a device-private pagemap (built once
    per module: hypothesis runs many examples)."""
    cases: dict[str, tuple] = {}

    def get(kernel: str) -> tuple:
        if kernel not in cases:
            system = System(ram=256 << 20, hugetlb_pages=0, kernel=kernel)
            p = system.spawn()
            m = HmmMirror(p.mm)
            a = p.mmap(PMD_SIZE * 2)
            a = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
            owner = object()
            start = system.request_free_mem_region(512)
            pgmap = DevPagemap(MemoryType.MEMORY_DEVICE_PRIVATE, start, 512,
                               DevPagemapOps(page_free=lambda pfn: None, migrate_to_ram=lambda v: 0), owner)
            assert memremap_pages(system, pgmap) == 0
            cases[kernel] = (system, p, m, a, owner, _pte_kinds(system, start))
        return cases[kernel]

    yield get
    cases.clear()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@settings(max_examples=150, deadline=None)
@given(kinds=st.lists(st.integers(0, 16), min_size=1, max_size=40),
       reqs=st.lists(st.sampled_from([0, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE]),
                     min_size=40, max_size=40),
       default=st.sampled_from([0, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE]),
       use_mask=st.booleans(), first=st.integers(0, 471))
def test_hmm_vma_handle_pte_table_matches_hmm_vma_handle_pte(table_cases, kernel: str, kinds: list[int],
                                                             reqs: list[int], default: int, use_mask: bool,
                                                             first: int) -> None:
    """Whatever the entries and requests, the table-at-a-time path stores the outputs
    and stops exactly where the kernel's per-pte loop over hmm_vma_handle_pte() would."""
    system, p, m, a, owner, table_kinds = table_cases(kernel)
    n = len(kinds)
    tbl = np.zeros(512, np.uint64)
    tbl[first:first + n] = [table_kinds[k] for k in kinds]
    addr = a + first * P
    end = addr + n * P
    inputs = np.array(reqs[:n], np.uint64) | np.uint64(DMA)
    r = HmmRange(notifier=m.notifier, start=addr, end=end, hmm_pfns=inputs.copy(),
                 default_flags=default, pfn_flags_mask=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE if use_mask else 0,
                 dev_private_owner=owner)
    hvw = HmmVmaWalk(r, system.profile)
    walk = MmWalk(hmm_mod.hmm_walk_ops, p.mm, hvw)
    walk.vma = p.mm.vma_lookup(addr)
    inout = hvw.layout.inout_flags
    # the per-pte loop
    want = [int(x) for x in inputs]
    want_stop: tuple = (n, None, 0)
    for k in range(n):
        act, val = hmm_vma_handle_pte(walk, addr + k * P, int(tbl[first + k]), int(inputs[k]))
        if act != HmmPteAction.OUTPUT:
            want_stop = (k, act, val)
            break
        want[k] = (want[k] & inout) | val
    # the table path, with the actions recorded instead of performed
    acted: list[tuple] = []
    real_fault, real_wait = hmm_mod._hmm_fault, hmm_mod.migration_entry_wait
    hmm_mod._hmm_fault = lambda a_, e_, req, w: acted.append((a_, e_, req)) or -EBUSY
    hmm_mod.migration_entry_wait = lambda mm, pmd, a_: acted.append((a_,))
    try:
        ret = hmm_mod.hmm_vma_handle_pte_table(walk, None, tbl, addr, end, r.hmm_pfns)
    finally:
        hmm_mod._hmm_fault, hmm_mod.migration_entry_wait = real_fault, real_wait
    stop, act, val = want_stop
    assert out(r.hmm_pfns[:stop]) == want[:stop]
    assert out(r.hmm_pfns[stop:]) == [int(x) for x in inputs[stop:]], "entries from the stop keep their input"
    if act is None:
        assert ret == 0 and acted == []
    elif act == HmmPteAction.FAULT:
        assert ret == -EBUSY and acted == [(addr + stop * P, end, val)]
    elif act == HmmPteAction.MIGRATION_WAIT:
        assert ret == -EBUSY and acted == [(addr + stop * P,)] and hvw.last == addr + stop * P
    else:
        assert ret == -EFAULT and acted == []


def test_vm_fault_to_errno() -> None:
    from hmmsim.kernel.errno import EHWPOISON
    from hmmsim.kernel.mm_types import (
        FOLL_HWPOISON, VM_FAULT_HWPOISON, VM_FAULT_OOM, VM_FAULT_SIGBUS, VM_FAULT_SIGSEGV,
        vm_fault_to_errno,
    )
    assert vm_fault_to_errno(VM_FAULT_OOM | VM_FAULT_SIGBUS, 0) == -ENOMEM
    assert vm_fault_to_errno(VM_FAULT_HWPOISON, 0) == -EFAULT, "hmm_do_fault passes no FOLL_HWPOISON"
    assert vm_fault_to_errno(VM_FAULT_HWPOISON, FOLL_HWPOISON) == -EHWPOISON
    assert vm_fault_to_errno(VM_FAULT_SIGBUS, 0) == vm_fault_to_errno(VM_FAULT_SIGSEGV, 0) == -EFAULT
    assert vm_fault_to_errno(0, 0) == 0


def test_hmm_do_fault_retry_without_locked_is_a_warn(proc: Process, mirror: HmmMirror) -> None:
    """hmm_range_fault() has no ``locked``: a fault handler that dropped mmap_lock
    (VM_FAULT_RETRY/COMPLETED) is a WARN and the call returns -EBUSY."""
    from hmmsim.kernel.mm_types import VM_FAULT_RETRY
    a = proc.mmap(2 * P)
    real = hmm_mod.handle_mm_fault_range
    hmm_mod.handle_mm_fault_range = lambda vma, s, e, fl: (VM_FAULT_RETRY, s)
    try:
        with proc.system.stats.measure() as d:
            ret, r = fault(mirror, a, 2, max_retries=3)  # the driver retries -EBUSY
    finally:
        hmm_mod.handle_mm_fault_range = real
    assert ret == -EBUSY and d["hmm.warn_broken_fault_handler"] == 3 and d["hmm.walk"] == 3
