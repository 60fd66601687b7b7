"""mmap, munmap, mprotect, madvise and mremap (mm/mmap.c, mm/vma.c, mm/mprotect.c,
mm/madvise.c, mm/mremap.c).

Expectations follow Linux 6.12; each test is named after the kernel function whose
behaviour it asserts. The fixtures run the full invariant check after every test.
"""

from __future__ import annotations

import pytest

from .helpers import BASE, MiB, OTHER, Recorder, pte
from hmmsim.errors import BadAddress, Exists, InvalidArgument, OutOfMemory, SegmentationFault
from hmmsim.kernel.madvise import do_madvise
from hmmsim.kernel.mm import MM_ANONPAGES, MM_SHMEMPAGES
from hmmsim.kernel.mmu_notifier import MmuNotifierEvent
from hmmsim.kernel.page_types import HPAGE_PMD_NR, HPAGE_PMD_SIZE, PAGE_SIZE
from hmmsim.kernel.pgtable import _PAGE_PSE, pmd_leaf, pte_dirty, pte_pfn, pte_present, pte_write
from hmmsim.kernel.vma import VM_ACCOUNT, VM_HUGEPAGE, VM_NOHUGEPAGE, VM_READ, VM_WRITE

P = PAGE_SIZE





def spans(proc) -> list[tuple[int, int]]:  # noqa: ANN001
    return [(v.vm_start, v.vm_end) for v in proc.mm.vma_list()]


def fill(proc, a: int, npages: int) -> None:  # noqa: ANN001
    """Write page i of the range full of byte i+1."""
    for i in range(npages):
        proc.write(a + i * P, bytes([i + 1]) * P)


def page_byte(proc, a: int, i: int) -> int:  # noqa: ANN001
    return proc.read(a + i * P, 1)[0]


# -- do_mmap ---------------------------------------------------------------------------------------
def test_do_mmap_zero_length_einval(proc) -> None:  # noqa: ANN001
    with pytest.raises(InvalidArgument) as ei:
        proc.mmap(0)
    assert ei.value.errno == 22
    assert proc.mm.map_count == 0


def test_do_mmap_fixed_misaligned_einval(proc) -> None:  # noqa: ANN001
    with pytest.raises(InvalidArgument):
        proc.mmap(P, addr=BASE + 100, fixed=True)


def test_do_mmap_length_rounded_up_to_pages(proc) -> None:  # noqa: ANN001
    a = proc.mmap(P + 1)
    v = proc.mm.vma_lookup(a)
    assert (v.vm_start, v.vm_end) == (a, a + 2 * P)


def test_do_mmap_fixed_noreplace_over_mapping_eexist(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    proc.write(a, b"keep")
    with pytest.raises(Exists) as ei:
        proc.mmap(P, addr=a + 2 * P, noreplace=True)
    assert ei.value.errno == 17
    assert spans(proc) == [(a, a + 4 * P)]
    assert proc.read(a, 4) == b"keep"
    # on a free range it maps exactly there
    assert proc.mmap(P, addr=a + 4 * P, noreplace=True, prot="r") == a + 4 * P


def test_do_mmap_fixed_replaces_mapping(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    fill(proc, a, 4)
    rec = Recorder(proc)
    assert proc.mmap(2 * P, "r", addr=a + P, fixed=True) == a + P
    # the old pages were unmapped (MMU_NOTIFY_UNMAP) and the new mapping is empty
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_UNMAP) == [(a + P, a + 3 * P)]
    assert spans(proc) == [(a, a + P), (a + P, a + 3 * P), (a + 3 * P, a + 4 * P)]
    assert proc.read(a + P, 2) == bytes(2)
    assert page_byte(proc, a, 0) == 1 and page_byte(proc, a, 3) == 4
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == 2


def test_do_mmap_hint_is_used_when_free(proc) -> None:  # noqa: ANN001
    assert proc.mmap(P, addr=OTHER) == OTHER


def test_do_mmap_hugetlb_address_is_huge_page_aligned(proc) -> None:  # noqa: ANN001
    proc.mmap(P)  # leaves the top of the mmap area not 2 MiB aligned
    a = proc.mmap(HPAGE_PMD_SIZE, hugetlb=True)
    assert a % HPAGE_PMD_SIZE == 0
    b = proc.mmap(HPAGE_PMD_SIZE, hugetlb=True, addr=OTHER + P)
    assert b % HPAGE_PMD_SIZE == 0


def test_vm_enough_memory_private_writable_larger_than_ram_enomem(make_system) -> None:  # noqa: ANN001
    s = make_system()
    p = s.spawn()
    ram = s.config.ram
    # OVERCOMMIT_GUESS: refuse a single request larger than totalram + swap (<= RAM)
    for size in (ram + 2 * MiB, 2 * ram):
        with pytest.raises(OutOfMemory) as ei:
            p.mmap(size)
        assert ei.value.errno == 12
    assert p.mm.map_count == 0
    # not accounted: read-only private, MAP_NORESERVE
    a = p.mmap(2 * ram, "r")
    b = p.mmap(2 * ram, noreserve=True)
    assert not p.mm.vma_lookup(a).vm_flags & VM_ACCOUNT
    assert not p.mm.vma_lookup(b).vm_flags & VM_ACCOUNT


def test_vm_enough_memory_is_per_request(make_system) -> None:  # noqa: ANN001
    s = make_system()
    p = s.spawn()
    part = (s.config.ram * 3 // 4) & ~(HPAGE_PMD_SIZE - 1)
    a = p.mmap(part)
    b = p.mmap(part)
    assert p.mm.vma_lookup(a).vm_flags & VM_ACCOUNT and p.mm.vma_lookup(b).vm_flags & VM_ACCOUNT


def test_shmem_zero_setup_accounts_shared_anon_even_read_only(make_system) -> None:  # noqa: ANN001
    s = make_system()
    p = s.spawn()
    with pytest.raises(OutOfMemory):
        p.mmap(2 * s.config.ram, "r", shared=True)
    assert p.mmap(2 * s.config.ram, "r", shared=True, noreserve=True) > 0


def test_mprotect_fixup_charges_when_private_becomes_writable(make_system) -> None:  # noqa: ANN001
    s = make_system()
    p = s.spawn()
    a = p.mmap(2 * s.config.ram, "r")
    with pytest.raises(OutOfMemory):
        p.mprotect(a, 2 * s.config.ram, "rw")
    assert not p.mm.vma_lookup(a).vm_flags & VM_WRITE
    p.mprotect(a, 4 * P, "rw")
    v = p.mm.vma_lookup(a)
    assert v.vm_flags & VM_WRITE and v.vm_flags & VM_ACCOUNT


# -- do_vmi_munmap ---------------------------------------------------------------------------------
def test_do_vmi_munmap_middle_splits_vma(proc) -> None:  # noqa: ANN001
    a = proc.mmap(8 * P, addr=BASE, fixed=True)
    fill(proc, a, 8)
    pgoff = proc.mm.vma_lookup(a).vm_pgoff
    rec = Recorder(proc)
    proc.munmap(a + 2 * P, 3 * P)
    assert spans(proc) == [(a, a + 2 * P), (a + 5 * P, a + 8 * P)]
    lo, hi = proc.mm.vma_list()
    assert lo.vm_pgoff == pgoff and hi.vm_pgoff == pgoff + 5
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_UNMAP) == [(a + 2 * P, a + 5 * P)]
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == 5
    assert [page_byte(proc, a, i) for i in (0, 1, 5, 6, 7)] == [1, 2, 6, 7, 8]
    for i in (2, 3, 4):
        assert pte(proc, a + i * P) == 0
        with pytest.raises(SegmentationFault):
            proc.read(a + i * P, 1)


def test_do_vmi_munmap_zero_length_einval(proc) -> None:  # noqa: ANN001
    a = proc.mmap(P)
    with pytest.raises(InvalidArgument):
        proc.munmap(a, 0)
    with pytest.raises(InvalidArgument):
        proc.munmap(a + 1, P)
    assert proc.mm.map_count == 1


def test_do_vmi_munmap_unmapped_range_succeeds(proc) -> None:  # noqa: ANN001
    a = proc.mmap(P, addr=BASE, fixed=True)
    proc.munmap(OTHER, 16 * P)  # nothing there: returns 0
    assert spans(proc) == [(a, a + P)]


def test_do_vmi_munmap_across_vmas_and_holes(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P, addr=BASE, fixed=True)
    b = proc.mmap(2 * P, "r", addr=BASE + 4 * P, fixed=True)
    c = proc.mmap(2 * P, addr=BASE + 8 * P, fixed=True)
    proc.write(a, b"a")
    proc.write(c + P, b"c")
    proc.munmap(a + P, 8 * P)
    assert spans(proc) == [(a, a + P), (c + P, c + 2 * P)]
    assert proc.read(c + P, 1) == b"c" and proc.read(a, 1) == b"a"
    _ = b


def test_do_vmi_munmap_frees_pages(proc) -> None:  # noqa: ANN001
    mem = proc.system.mem
    free0 = mem.nr_free
    a = proc.mmap(16 * P)
    proc.touch(a, 16 * P, write=True)
    assert mem.nr_free == free0 - 16
    proc.munmap(a, 16 * P)
    assert mem.nr_free == free0
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == 0


def test_do_vmi_munmap_partial_thp_splits_pmd(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    proc.madvise(a, HPAGE_PMD_SIZE, "hugepage")
    proc.write(a, b"T")
    proc.write(a + 100 * P, b"U")
    assert pmd_leaf(pte(proc, a))
    proc.munmap(a + 200 * P, 10 * P)
    assert not pte(proc, a) & _PAGE_PSE
    assert proc.read(a, 1) == b"T" and proc.read(a + 100 * P, 1) == b"U"
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == HPAGE_PMD_NR - 10


# -- mprotect ----------------------------------------------------------------------------------------
def test_mprotect_fixup_splits_and_remerges(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    fill(proc, a, 4)
    proc.mprotect(a + P, P, "r")
    assert spans(proc) == [(a, a + P), (a + P, a + 2 * P), (a + 2 * P, a + 4 * P)]
    assert not proc.mm.vma_lookup(a + P).vm_flags & VM_WRITE
    with pytest.raises(SegmentationFault):
        proc.write(a + P, b"x")
    proc.write(a + 2 * P, b"y")
    proc.mprotect(a + P, P, "rw")
    assert spans(proc) == [(a, a + 4 * P)]
    proc.write(a + P, b"z")
    assert [page_byte(proc, a, i) for i in range(4)] == [1, ord("z"), ord("y"), 4]


def test_mprotect_fixup_remerges_without_anon_vma(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    proc.mprotect(a + P, 2 * P, "r")
    # no anon_vma yet: the read-only part gives back VM_ACCOUNT
    assert not proc.mm.vma_lookup(a + P).vm_flags & VM_ACCOUNT
    proc.mprotect(a + P, 2 * P, "rw")
    assert spans(proc) == [(a, a + 4 * P)]
    assert proc.mm.vma_lookup(a).vm_flags & VM_ACCOUNT


def test_mprotect_fixup_merges_with_next_vma(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    proc.mmap(4 * P, "r", addr=BASE + 4 * P, fixed=True)
    assert len(spans(proc)) == 2
    # no anon_vma: the read-only part drops VM_ACCOUNT and matches the next VMA exactly
    proc.mprotect(a + 2 * P, 2 * P, "r")
    assert spans(proc) == [(a, a + 2 * P), (a + 2 * P, a + 8 * P)]


def test_mprotect_fixup_accounted_part_does_not_merge(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    proc.mmap(4 * P, "r", addr=BASE + 4 * P, fixed=True)
    proc.write(a + 3 * P, b"x")  # gives the VMA an anon_vma: VM_ACCOUNT is kept
    proc.mprotect(a + 2 * P, 2 * P, "r")
    assert proc.mm.vma_lookup(a + 2 * P).vm_flags & VM_ACCOUNT
    assert spans(proc) == [(a, a + 2 * P), (a + 2 * P, a + 4 * P), (a + 4 * P, a + 8 * P)]
    assert proc.read(a + 3 * P, 1) == b"x"


def test_mmap_region_merges_adjacent_anon(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P, addr=BASE, fixed=True)
    proc.write(a, b"a")
    proc.mmap(2 * P, addr=BASE + 2 * P, fixed=True)
    assert spans(proc) == [(a, a + 4 * P)]
    proc.mmap(2 * P, "r", addr=BASE + 4 * P, fixed=True)
    assert spans(proc) == [(a, a + 4 * P), (a + 4 * P, a + 6 * P)]
    proc.write(a + 3 * P, b"b")
    assert proc.read(a, 1) == b"a" and proc.read(a + 3 * P, 1) == b"b"


def test_free_pgtables_after_munmap(proc) -> None:  # noqa: ANN001
    pt = proc.system.pt
    base_tables = pt.nr_tables
    a = proc.mmap(HPAGE_PMD_SIZE + 4 * P, addr=BASE, fixed=True)
    proc.touch(a, HPAGE_PMD_SIZE + 4 * P, write=True)
    assert pt.nr_tables > base_tables
    proc.munmap(a, HPAGE_PMD_SIZE + 4 * P)
    # nothing else is mapped: every pte, pmd and pud table below the pgd is freed
    assert pt.nr_tables == base_tables


def test_do_mprotect_pkey_hole_partial_success_enomem(proc) -> None:  # noqa: ANN001
    a = proc.mmap(3 * P, addr=BASE, fixed=True)
    fill(proc, a, 3)
    proc.munmap(a + P, P)
    with pytest.raises(OutOfMemory):
        proc.mprotect(a, 3 * P, "r")
    # the VMA before the hole was changed, the one after it was not
    assert not proc.mm.vma_lookup(a).vm_flags & VM_WRITE
    assert proc.mm.vma_lookup(a + 2 * P).vm_flags & VM_WRITE
    with pytest.raises(SegmentationFault):
        proc.write(a, b"x")
    proc.write(a + 2 * P, b"w")
    assert page_byte(proc, a, 0) == 1


def test_do_mprotect_pkey_start_in_hole_enomem(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P, addr=BASE + P, fixed=True)
    with pytest.raises(OutOfMemory):
        proc.mprotect(BASE, 3 * P, "r")
    assert proc.mm.vma_lookup(a).vm_flags & VM_WRITE


def test_do_mprotect_pkey_past_last_vma_enomem(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P, addr=BASE, fixed=True)
    with pytest.raises(OutOfMemory):
        proc.mprotect(a, 4 * P, "r")
    assert not proc.mm.vma_lookup(a).vm_flags & VM_WRITE


def test_do_mprotect_pkey_argument_checks(proc) -> None:  # noqa: ANN001
    a = proc.mmap(P)
    with pytest.raises(InvalidArgument):
        proc.mprotect(a + 1, P, "r")
    with pytest.raises(InvalidArgument):
        proc.mprotect(a, P, 0x100)
    proc.mprotect(a, 0, "r")  # zero length: success, nothing changes
    assert proc.mm.vma_lookup(a).vm_flags & VM_WRITE
    # the length is checked before the protection bits
    proc.mprotect(a, 0, 0x100)
    # arch_validate_prot() accepts PROT_SEM (0x8), which changes nothing on x86
    proc.mprotect(a, P, 0x8 | 0x1)
    assert proc.mm.vma_lookup(a).vm_flags & (VM_READ | VM_WRITE) == VM_READ


def test_change_pte_range_try_change_writable_exclusive_anon(proc) -> None:  # noqa: ANN001
    a = proc.mmap(3 * P)
    proc.write(a, b"0")
    proc.write(a + P, b"1")
    proc.read(a + 2 * P, 1)  # zero page
    proc.mprotect(a, 3 * P, "r")
    assert not any(pte_write(pte(proc, a + i * P)) for i in range(3))
    proc.mprotect(a, 3 * P, "rw")
    # MM_CP_TRY_CHANGE_WRITABLE: AnonExclusive pages are writable at once ...
    assert pte_write(pte(proc, a)) and pte_write(pte(proc, a + P))
    # ... the zero page is not (vm_normal_page() is NULL)
    z = pte(proc, a + 2 * P)
    assert pte_pfn(z) == proc.system.mem.zero_pfn and not pte_write(z)
    with proc.system.stats.measure() as d:
        proc.write(a, b"A")
        proc.write(a + P, b"B")
    assert d["fault.handle_mm_fault"] == 0


def test_change_pte_range_shared_cow_pages_stay_read_only(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P)
    proc.write(a, b"s")
    child = proc.fork()
    proc.mprotect(a, 2 * P, "r")
    proc.mprotect(a, 2 * P, "rw")
    # not AnonExclusive (shared with the child): a write must still go through COW
    assert not pte_write(pte(proc, a))
    pfn = pte_pfn(pte(proc, a))
    proc.write(a, b"p")
    assert pte_pfn(pte(proc, a)) != pfn
    assert child.read(a, 1) == b"s"
    child.exit()


def test_mprotect_fixup_unchanged_flags_no_notifier(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    proc.touch(a, 4 * P, write=True)
    rec = Recorder(proc)
    with proc.system.stats.measure() as d:
        proc.mprotect(a, 4 * P, "rw")
    assert rec.ranges == []
    assert d["mmu_notifier.invalidate_range_start"] == 0
    assert all(pte_write(pte(proc, a + i * P)) for i in range(4))


def test_change_protection_fires_protection_vma(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    proc.touch(a, 4 * P, write=True)
    rec = Recorder(proc)
    proc.mprotect(a + P, 2 * P, "r")
    assert rec.ranges == [(MmuNotifierEvent.MMU_NOTIFY_PROTECTION_VMA, a + P, a + 3 * P)]


def test_change_protection_no_page_tables_no_notifier(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    rec = Recorder(proc)
    proc.mprotect(a, 4 * P, "r")
    # change_pud_range() starts the invalidation at the first populated pud only
    assert rec.ranges == []
    assert not proc.mm.vma_lookup(a).vm_flags & VM_WRITE


def test_change_protection_prot_none_and_back(proc) -> None:  # noqa: ANN001
    a = proc.mmap(P)
    proc.write(a, b"data")
    proc.mprotect(a, P, "none")
    e = pte(proc, a)
    assert pte_present(e) and not pte_write(e)
    with pytest.raises(SegmentationFault):
        proc.read(a, 1)
    proc.mprotect(a, P, "rw")
    assert pte_write(pte(proc, a))
    assert proc.read(a, 4) == b"data"


def test_change_pmd_range_partial_thp_splits(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    proc.madvise(a, HPAGE_PMD_SIZE, "hugepage")
    proc.write(a, b"T")
    head = pte_pfn(pte(proc, a))
    rec = Recorder(proc)
    proc.mprotect(a + 4 * P, P, "r")
    # next - addr != HPAGE_PMD_SIZE: __split_huge_pmd() under MMU_NOTIFY_CLEAR, then ptes
    assert (a, a + HPAGE_PMD_SIZE) in rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR)
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_PROTECTION_VMA) == [(a + 4 * P, a + 5 * P)]
    assert not pte(proc, a) & _PAGE_PSE
    assert pte_pfn(pte(proc, a + 4 * P)) == head + 4 and not pte_write(pte(proc, a + 4 * P))
    assert pte_write(pte(proc, a + 3 * P)) and pte_write(pte(proc, a + 5 * P))
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == HPAGE_PMD_NR
    with pytest.raises(SegmentationFault):
        proc.write(a + 4 * P, b"x")


def test_change_pte_range_shared_mapping_writable_from_vm_page_prot(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P, shared=True)
    proc.write(a, b"s")
    proc.mprotect(a, 2 * P, "r")
    assert not pte_write(pte(proc, a))
    proc.mprotect(a, 2 * P, "rw")
    # tmpfs needs no write notification: vm_page_prot itself is writable
    assert pte_write(pte(proc, a))


# -- madvise -------------------------------------------------------------------------------------------
def test_madvise_update_vma_hugepage_splits_and_sets_flag(proc) -> None:  # noqa: ANN001
    a = proc.mmap(8 * P, addr=BASE, fixed=True)
    proc.madvise(a + 2 * P, 3 * P, "hugepage")
    assert spans(proc) == [(a, a + 2 * P), (a + 2 * P, a + 5 * P), (a + 5 * P, a + 8 * P)]
    mid = proc.mm.vma_lookup(a + 2 * P)
    assert mid.vm_flags & VM_HUGEPAGE and not mid.vm_flags & VM_NOHUGEPAGE
    assert not proc.mm.vma_lookup(a).vm_flags & VM_HUGEPAGE
    proc.madvise(a + 2 * P, 3 * P, "nohugepage")
    mid = proc.mm.vma_lookup(a + 2 * P)
    assert mid.vm_flags & VM_NOHUGEPAGE and not mid.vm_flags & VM_HUGEPAGE
    assert len(spans(proc)) == 3
    proc.madvise(a, 8 * P, "hugepage")
    # all three get the same flags and merge back into one VMA
    assert spans(proc) == [(a, a + 8 * P)]
    v = proc.mm.vma_lookup(a)
    assert v.vm_flags & VM_HUGEPAGE and not v.vm_flags & VM_NOHUGEPAGE


def test_madvise_dontneed_anon_reads_zero(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    fill(proc, a, 4)
    rec = Recorder(proc)
    proc.madvise(a + P, 2 * P, "dontneed")
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR) == [(a + P, a + 3 * P)]
    assert pte(proc, a + P) == 0 and pte(proc, a + 2 * P) == 0
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == 2
    assert [page_byte(proc, a, i) for i in range(4)] == [1, 0, 0, 4]
    assert spans(proc) == [(a, a + 4 * P)]


def test_madvise_dontneed_file_private_reads_file_content(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(2 * P)
    proc.pwrite(fd, b"file", 0)
    a = proc.mmap(2 * P, fd=fd)
    proc.write(a, b"PRIV")
    assert proc.read(a, 4) == b"PRIV"
    proc.madvise(a, 2 * P, "dontneed")
    # the private COW copy is gone; the next fault maps the page cache again
    assert pte(proc, a) == 0
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == 0
    assert proc.read(a, 4) == b"file"


def test_madvise_dontneed_file_shared_keeps_data(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(P)
    a = proc.mmap(P, shared=True, fd=fd)
    proc.write(a, b"shm!")
    proc.madvise(a, P, "dontneed")
    assert pte(proc, a) == 0 and proc.mm.get_mm_counter(MM_SHMEMPAGES) == 0
    assert proc.read(a, 4) == b"shm!"


def test_madvise_dontneed_whole_thp(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    proc.madvise(a, HPAGE_PMD_SIZE, "hugepage")
    proc.write(a, b"T")
    mem = proc.system.mem
    free0 = mem.nr_free
    proc.madvise(a, HPAGE_PMD_SIZE, "dontneed")
    assert pte(proc, a) == 0
    assert mem.nr_free == free0 + HPAGE_PMD_NR
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == 0
    assert proc.read(a, 1) == b"\x00"


def test_madvise_dontneed_part_of_thp_splits(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    proc.madvise(a, HPAGE_PMD_SIZE, "hugepage")
    proc.write(a, b"T" * (4 * P))
    proc.madvise(a + P, 2 * P, "dontneed")
    assert not pte(proc, a) & _PAGE_PSE
    assert pte(proc, a + P) == 0 and pte(proc, a + 2 * P) == 0
    assert proc.read(a, 1) == b"T" and proc.read(a + 3 * P, 1) == b"T"
    assert proc.read(a + P, 1) == b"\x00"


def test_madvise_free_keeps_data_without_reclaim(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    fill(proc, a, 4)
    pfns = [pte_pfn(pte(proc, a + i * P)) for i in range(4)]
    rec = Recorder(proc)
    proc.madvise(a, 4 * P, "free")
    # madvise_free_pte_range(): exclusive pages are marked clean and old, nothing freed
    assert rec.events(MmuNotifierEvent.MMU_NOTIFY_CLEAR) == [(a, a + 4 * P)]
    for i in range(4):
        e = pte(proc, a + i * P)
        assert pte_present(e) and pte_pfn(e) == pfns[i] and not pte_dirty(e)
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == 4
    assert [page_byte(proc, a, i) for i in range(4)] == [1, 2, 3, 4]


def test_madvise_free_non_anonymous_einval(proc) -> None:  # noqa: ANN001
    a = proc.mmap(P, shared=True)
    with pytest.raises(InvalidArgument):
        proc.madvise(a, P, "free")


def test_madvise_walk_vmas_hole_enomem_mapped_part_advised(proc) -> None:  # noqa: ANN001
    a = proc.mmap(3 * P, addr=BASE, fixed=True)
    fill(proc, a, 3)
    proc.munmap(a + P, P)
    with pytest.raises(OutOfMemory):
        proc.madvise(a, 3 * P, "dontneed")
    # both VMAs around the hole were advised
    assert page_byte(proc, a, 0) == 0 and page_byte(proc, a, 2) == 0
    with pytest.raises(OutOfMemory):
        proc.madvise(a, 3 * P, "hugepage")
    assert proc.mm.vma_lookup(a).vm_flags & VM_HUGEPAGE
    assert proc.mm.vma_lookup(a + 2 * P).vm_flags & VM_HUGEPAGE


def test_madvise_walk_vmas_no_vma_enomem(proc) -> None:  # noqa: ANN001
    proc.mmap(P, addr=BASE, fixed=True)
    with pytest.raises(OutOfMemory):
        proc.madvise(BASE + 4 * P, P, "dontneed")


def test_do_madvise_argument_checks(proc) -> None:  # noqa: ANN001
    a = proc.mmap(P)
    with pytest.raises(InvalidArgument):
        proc.madvise(a + 1, P, "dontneed")
    assert do_madvise(proc.mm, a, P, 12345) == -22
    assert do_madvise(proc.mm, a, 0, 4) == 0


# -- hugetlb VMAs ------------------------------------------------------------------------------------
def test_hugetlb_vm_op_split_munmap_unaligned_einval(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * HPAGE_PMD_SIZE, hugetlb=True)
    proc.write(a, b"h")
    with pytest.raises(InvalidArgument):
        proc.munmap(a, P)
    with pytest.raises(InvalidArgument):
        proc.munmap(a + P, HPAGE_PMD_SIZE)
    assert spans(proc) == [(a, a + 2 * HPAGE_PMD_SIZE)]
    # at a huge page boundary it splits
    proc.munmap(a + HPAGE_PMD_SIZE, HPAGE_PMD_SIZE)
    assert spans(proc) == [(a, a + HPAGE_PMD_SIZE)]
    assert proc.read(a, 1) == b"h"


def test_hugetlb_vm_op_split_mprotect_unaligned_einval(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * HPAGE_PMD_SIZE, hugetlb=True)
    with pytest.raises(InvalidArgument):
        proc.mprotect(a, P, "r")
    assert proc.mm.vma_lookup(a).vm_flags & VM_WRITE
    proc.mprotect(a, HPAGE_PMD_SIZE, "r")
    assert spans(proc) == [(a, a + HPAGE_PMD_SIZE), (a + HPAGE_PMD_SIZE, a + 2 * HPAGE_PMD_SIZE)]
    assert proc.mm.vma_lookup(a).vm_flags & (VM_READ | VM_WRITE) == VM_READ


def test_madvise_dontneed_hugetlb_alignment(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * HPAGE_PMD_SIZE, hugetlb=True)
    proc.write(a, b"1")
    proc.write(a + HPAGE_PMD_SIZE, b"2")
    with pytest.raises(InvalidArgument):
        proc.madvise(a + P, P, "dontneed")
    # the end is rounded down to a huge page: only the first huge page is zapped
    proc.madvise(a, HPAGE_PMD_SIZE + P, "dontneed")
    assert pte(proc, a) == 0
    assert proc.read(a + HPAGE_PMD_SIZE, 1) == b"2"
    assert proc.read(a, 1) == b"\x00"


def test_mmap_region_fixed_inside_hugetlb_unaligned_einval(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, hugetlb=True)
    proc.write(a, b"h")
    # MAP_FIXED must unmap [a + 4K, a + 8K) first: the hugetlb VMA refuses the split
    with pytest.raises(InvalidArgument):
        proc.mmap(P, addr=a + P, fixed=True)
    assert spans(proc) == [(a, a + HPAGE_PMD_SIZE)]
    assert proc.read(a, 1) == b"h"


def test_change_huge_pmd_prot_none_and_back(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    proc.madvise(a, HPAGE_PMD_SIZE, "hugepage")
    proc.write(a, b"thp")
    head = pte_pfn(pte(proc, a))
    proc.mprotect(a, HPAGE_PMD_SIZE, "none")
    e = pte(proc, a)
    assert e & _PAGE_PSE and pte_present(e) and not pte_write(e) and pte_pfn(e) == head
    with pytest.raises(SegmentationFault):
        proc.read(a, 1)
    proc.mprotect(a, HPAGE_PMD_SIZE, "rw")
    e = pte(proc, a)
    assert pmd_leaf(e) and pte_write(e) and pte_pfn(e) == head
    assert proc.read(a, 3) == b"thp"


# -- mremap --------------------------------------------------------------------------------------------
def test_mremap_to_moves_data(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    fill(proc, a, 4)
    pfns = [pte_pfn(pte(proc, a + i * P)) for i in range(4)]
    dst = proc.mmap(4 * P, "r", addr=OTHER, fixed=True)  # replaced by MREMAP_FIXED
    rec = Recorder(proc)
    assert proc.mremap(a, 4 * P, 4 * P, new_addr=dst) == dst
    assert spans(proc) == [(dst, dst + 4 * P)]
    # the pages moved with their page-table entries (no copy)
    assert [pte_pfn(pte(proc, dst + i * P)) for i in range(4)] == pfns
    assert [page_byte(proc, dst, i) for i in range(4)] == [1, 2, 3, 4]
    assert proc.mm.vma_lookup(dst).vm_flags & VM_WRITE
    assert (a, a + 4 * P) in rec.events(MmuNotifierEvent.MMU_NOTIFY_UNMAP)
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == 4
    with pytest.raises(SegmentationFault):
        proc.read(a, 1)


def test_move_huge_pmd_keeps_thp_pmd_mapped(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    proc.madvise(a, HPAGE_PMD_SIZE, "hugepage")
    proc.write(a + 9 * P, b"huge")
    head = pte_pfn(pte(proc, a))
    assert pmd_leaf(pte(proc, a))
    assert proc.mremap(a, HPAGE_PMD_SIZE, HPAGE_PMD_SIZE, new_addr=OTHER) == OTHER
    e = pte(proc, OTHER)
    assert pmd_leaf(e) and pte_pfn(e) == head and pte_write(e)
    assert proc.read(OTHER + 9 * P, 4) == b"huge"
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == HPAGE_PMD_NR
    assert proc.mm.vma_lookup(OTHER).vm_flags & VM_HUGEPAGE


def test_move_page_tables_unaligned_thp_split(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    proc.madvise(a, HPAGE_PMD_SIZE, "hugepage")
    proc.write(a + 9 * P, b"huge")
    dst = OTHER + P
    assert proc.mremap(a, HPAGE_PMD_SIZE, HPAGE_PMD_SIZE, new_addr=dst) == dst
    assert not pte(proc, dst) & _PAGE_PSE
    assert proc.read(dst + 9 * P, 4) == b"huge"
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == HPAGE_PMD_NR


def test_mremap_dontunmap_leaves_old_range_empty(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    fill(proc, a, 4)
    new = proc.mremap(a, 4 * P, 4 * P, new_addr=OTHER, dontunmap=True)
    assert new == OTHER
    # the old VMA stays, without pages; private anon reads back zeros
    assert spans(proc) == [(OTHER, OTHER + 4 * P), (a, a + 4 * P)]
    assert all(pte(proc, a + i * P) == 0 for i in range(4))
    assert [page_byte(proc, a, i) for i in range(4)] == [0, 0, 0, 0]
    assert [page_byte(proc, OTHER, i) for i in range(4)] == [1, 2, 3, 4]
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == 4


def test_mremap_dontunmap_shared_old_range_refaults_same_pages(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P, shared=True, addr=BASE, fixed=True)
    proc.write(a, b"shared")
    new = proc.mremap(a, 2 * P, 2 * P, new_addr=OTHER, dontunmap=True)
    assert pte(proc, a) == 0
    # the old VMA still maps the same tmpfs object: a fault finds the page again
    assert proc.read(a, 6) == b"shared" and proc.read(new, 6) == b"shared"
    proc.write(new, b"S")
    assert proc.read(a, 6) == b"Shared"


def test_mremap_dontunmap_requires_same_size(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    with pytest.raises(InvalidArgument):
        proc.mremap(a, 4 * P, 8 * P, new_addr=OTHER, dontunmap=True)


def test_vma_to_resize_range_spanning_two_vmas_efault(make_system) -> None:  # noqa: ANN001
    """6.12: a fixed move of a range spanning two VMAs fails in ``vma_to_resize()``."""
    proc = make_system(kernel="6.12").spawn("test")
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    fill(proc, a, 4)
    proc.mprotect(a + 2 * P, 2 * P, "r")
    assert len(spans(proc)) == 2
    with pytest.raises(BadAddress) as ei:
        proc.mremap(a + P, 2 * P, 2 * P, new_addr=OTHER)
    assert ei.value.errno == 14
    assert spans(proc) == [(a, a + 2 * P), (a + 2 * P, a + 4 * P)]
    assert [page_byte(proc, a, i) for i in range(4)] == [1, 2, 3, 4]


def test_remap_move_moves_every_vma_of_the_range(make_system) -> None:  # noqa: ANN001
    """7.3 (``mremap_move_multiple_vmas``): both VMAs move (split at the range's edges),
    each keeps its protection, the data follows, the old range is unmapped."""
    proc = make_system(kernel="7.3").spawn("test")
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    fill(proc, a, 4)
    proc.mprotect(a + 2 * P, 2 * P, "r")
    assert proc.mremap(a + P, 2 * P, 2 * P, new_addr=OTHER) == OTHER
    assert spans(proc) == [(OTHER, OTHER + P), (OTHER + P, OTHER + 2 * P),
                           (a, a + P), (a + 3 * P, a + 4 * P)]
    assert [page_byte(proc, OTHER, i) for i in range(2)] == [2, 3]
    assert [page_byte(proc, a, i) for i in (0, 3)] == [1, 4]
    assert proc.mm.find_vma(OTHER + P).vm_flags & 0x2 == 0  # VM_WRITE dropped, as before
    with pytest.raises(SegmentationFault):
        proc.read(a + P, 1)


def test_remap_move_gap_at_the_start_efault(make_system) -> None:  # noqa: ANN001
    """7.3: the range must start inside a VMA; gaps after the first VMA are kept."""
    proc = make_system(kernel="7.3").spawn("test")
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    fill(proc, a, 4)
    proc.munmap(a + P, P)
    with pytest.raises(BadAddress):
        proc.mremap(a + P, 2 * P, 2 * P, new_addr=OTHER)
    assert proc.mremap(a, 3 * P, 3 * P, new_addr=OTHER) == OTHER
    assert spans(proc)[:2] == [(OTHER, OTHER + P), (OTHER + 2 * P, OTHER + 3 * P)]
    assert [page_byte(proc, OTHER, i) for i in (0, 2)] == [1, 3]


def test_do_mremap_unmapped_old_address_efault(proc) -> None:  # noqa: ANN001
    with pytest.raises(BadAddress):
        proc.mremap(BASE, P, P, new_addr=OTHER)


def test_mremap_to_overlapping_ranges_einval(proc) -> None:  # noqa: ANN001
    a = proc.mmap(8 * P, addr=BASE, fixed=True)
    proc.write(a, b"x")
    with pytest.raises(InvalidArgument):
        proc.mremap(a, 4 * P, 4 * P, new_addr=a + 2 * P)
    with pytest.raises(InvalidArgument):
        proc.mremap(a + 2 * P, 4 * P, 4 * P, new_addr=a)
    assert spans(proc) == [(a, a + 8 * P)]
    assert proc.read(a, 1) == b"x"


def test_do_mremap_argument_checks(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    with pytest.raises(InvalidArgument):
        proc.mremap(a + 1, P, P)
    with pytest.raises(InvalidArgument):
        proc.mremap(a, P, 0)
    with pytest.raises(InvalidArgument):
        proc.mremap(a, P, P, new_addr=OTHER + 1)
    with pytest.raises(InvalidArgument):  # MREMAP_FIXED without MREMAP_MAYMOVE
        proc.mremap(a, P, P, new_addr=OTHER, maymove=False)


def test_do_mremap_shrink_in_place(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P, addr=BASE, fixed=True)
    fill(proc, a, 4)
    assert proc.mremap(a, 4 * P, 2 * P, maymove=False) == a
    assert spans(proc) == [(a, a + 2 * P)]
    assert proc.mm.get_mm_counter(MM_ANONPAGES) == 2
    assert [page_byte(proc, a, i) for i in range(2)] == [1, 2]


def test_do_mremap_grow_without_maymove_blocked_enomem(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P, addr=BASE, fixed=True)
    proc.mmap(P, "r", addr=BASE + 2 * P, fixed=True)
    with pytest.raises(OutOfMemory):
        proc.mremap(a, 2 * P, 4 * P, maymove=False)


def test_do_mremap_grow_moves_when_blocked(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P, addr=BASE, fixed=True)
    fill(proc, a, 2)
    proc.mmap(P, "r", addr=BASE + 2 * P, fixed=True)
    new = proc.mremap(a, 2 * P, 4 * P)
    assert new != a
    v = proc.mm.vma_lookup(new)
    assert (v.vm_start, v.vm_end) == (new, new + 4 * P)
    assert [page_byte(proc, new, i) for i in range(4)] == [1, 2, 0, 0]
    assert proc.mm.vma_lookup(a) is None


def test_do_mremap_grow_in_place_when_space_follows(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P, addr=BASE, fixed=True)
    fill(proc, a, 2)
    pfns = [pte_pfn(pte(proc, a + i * P)) for i in range(2)]
    rec = Recorder(proc)
    # vma_expandable(): nothing after the VMA, so it grows at the same address
    assert proc.mremap(a, 2 * P, 4 * P, maymove=False) == a
    assert spans(proc) == [(a, a + 4 * P)]
    assert rec.ranges == []
    assert [pte_pfn(pte(proc, a + i * P)) for i in range(2)] == pfns
    assert [page_byte(proc, a, i) for i in range(4)] == [1, 2, 0, 0]
    # with MREMAP_MAYMOVE too: expanding in place is tried first
    assert proc.mremap(a, 4 * P, 6 * P) == a
    assert spans(proc) == [(a, a + 6 * P)]


def test_do_mremap_grow_in_place_merges_with_next(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P, addr=BASE, fixed=True)
    proc.mmap(2 * P, addr=BASE + 4 * P, fixed=True)
    assert proc.mremap(a, 2 * P, 4 * P, maymove=False) == a
    # vma_merge_extend(): the grown VMA now touches a compatible neighbour and merges
    assert spans(proc) == [(a, a + 6 * P)]


def test_do_mremap_grow_in_place_overcommit(make_system) -> None:  # noqa: ANN001
    s = make_system()
    p = s.spawn()
    a = p.mmap(2 * P, addr=BASE, fixed=True)
    with pytest.raises(OutOfMemory):
        p.mremap(a, 2 * P, 2 * s.config.ram, maymove=False)
    assert spans(p) == [(a, a + 2 * P)]


def test_mremap_hugetlb_unaligned_einval(proc) -> None:  # noqa: ANN001
    a = proc.mmap(HPAGE_PMD_SIZE, hugetlb=True)
    with pytest.raises(InvalidArgument):
        proc.mremap(a, HPAGE_PMD_SIZE, HPAGE_PMD_SIZE, new_addr=OTHER + P)
    with pytest.raises(InvalidArgument):  # hugetlb mappings cannot grow
        proc.mremap(a, HPAGE_PMD_SIZE, 2 * HPAGE_PMD_SIZE)


