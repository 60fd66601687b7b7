"""fork() and exit() (kernel/fork.c dup_mmap, mm/memory.c copy_page_range, kernel/exit.c,
mm/mmap.c exit_mmap).

Expectations follow Linux 6.12; the fixtures run the full invariant check afterwards.
"""

from __future__ import annotations

from .helpers import BASE, Recorder, pte
from hmmsim.kernel.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, MM_SWAPENTS
from hmmsim.kernel.mmu_notifier import MmuNotifierEvent
from hmmsim.kernel.page_types import HPAGE_PMD_NR, HPAGE_PMD_SIZE, PAGE_SIZE
from hmmsim.kernel.pgtable import pmd_leaf, pte_pfn, pte_write
from hmmsim.kernel.physmem import PG_anon_exclusive

P = PAGE_SIZE





def rss(proc) -> list[int]:  # noqa: ANN001
    return [proc.mm.get_mm_counter(k) for k in (MM_FILEPAGES, MM_ANONPAGES, MM_SWAPENTS, MM_SHMEMPAGES)]


def vma_tuples(proc) -> list[tuple[int, int, int, int, object]]:  # noqa: ANN001
    return [(v.vm_start, v.vm_end, v.vm_flags, v.vm_pgoff, v.vm_file) for v in proc.mm.vma_list()]


def test_dup_mmap_copies_vmas(proc) -> None:  # noqa: ANN001
    proc.mmap(8 * P)
    r = proc.mmap(4 * P, "r")
    proc.mmap(4 * P, shared=True)
    fd = proc.open_tmpfile(4 * P)
    proc.mmap(4 * P, fd=fd)
    proc.mmap(4 * P, shared=True, fd=fd)
    proc.mmap(HPAGE_PMD_SIZE, hugetlb=True)
    a = proc.mmap(8 * P)
    proc.mprotect(a + 2 * P, 2 * P, "r")  # a split VMA
    proc.write(a, b"x")
    child = proc.fork()
    assert vma_tuples(child) == vma_tuples(proc)
    assert child.mm.map_count == proc.mm.map_count
    assert all(v.vm_mm is child.mm for v in child.mm.vma_list())
    assert child.mm.vma_lookup(r) is not proc.mm.vma_lookup(r)
    # the file table is copied too: the fd works in the child
    assert child.pread(fd, 4, 0) == bytes(4)
    child.exit()


def test_copy_page_range_shared_anon_writes_visible(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P, shared=True)
    proc.write(a, b"from parent")
    child = proc.fork()
    # no anon_vma: vma_needs_copy() is false, the child faults the shared page in later
    assert pte(child, a) == 0
    assert child.read(a, 11) == b"from parent"
    assert pte_pfn(pte(child, a)) == pte_pfn(pte(proc, a))
    child.write(a, b"FROM CHILD!")
    assert proc.read(a, 11) == b"FROM CHILD!"
    proc.write(a + P, b"p2")
    assert child.read(a + P, 2) == b"p2"
    child.exit()
    assert proc.read(a, 11) == b"FROM CHILD!"


def test_copy_page_range_shared_file_writes_visible(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(P)
    a = proc.mmap(P, shared=True, fd=fd)
    child = proc.fork()
    child.write(a, b"kid")
    assert proc.read(a, 3) == b"kid"
    assert proc.pread(fd, 3, 0) == b"kid"
    child.exit()


def test_copy_page_range_private_writes_not_visible(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P)
    proc.write(a, b"AAAA")
    proc.write(a + P, b"BBBB")
    child = proc.fork()
    child.write(a, b"c")
    proc.write(a + P, b"p")
    assert proc.read(a, 4) == b"AAAA" and proc.read(a + P, 4) == b"pBBB"
    assert child.read(a, 4) == b"cAAA" and child.read(a + P, 4) == b"BBBB"
    # a page the parent had never touched is private to each side too
    b = proc.mmap(P)
    child2 = proc.fork()
    child2.write(b, b"z")
    assert proc.read(b, 1) == b"\x00"
    child.exit()
    child2.exit()


def test_copy_page_range_private_file_cow(proc) -> None:  # noqa: ANN001
    fd = proc.open_tmpfile(2 * P)
    proc.pwrite(fd, b"file", 0)
    a = proc.mmap(2 * P, fd=fd)
    assert proc.read(a, 4) == b"file"
    proc.write(a + P, b"anon")
    child = proc.fork()
    child.write(a, b"C")
    assert proc.read(a, 4) == b"file" and proc.pread(fd, 4, 0) == b"file"
    assert child.read(a, 4) == b"Cile" and child.read(a + P, 4) == b"anon"
    child.exit()


def test_copy_page_range_rss(proc) -> None:  # noqa: ANN001
    a = proc.mmap(8 * P)
    proc.touch(a, 5 * P, write=True)
    proc.touch(a + 5 * P, 3 * P)  # zero page: not in rss
    s = proc.mmap(4 * P, shared=True)
    proc.touch(s, 3 * P, write=True)
    fd = proc.open_tmpfile(2 * P)
    proc.pwrite(fd, b"f", 0)
    f = proc.mmap(2 * P, fd=fd)
    proc.read(f, 1)  # a page-cache page mapped (fault-around: only page 0 is cached)
    proc.write(f + P, b"w")  # a private copy
    t = proc.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    proc.madvise(t, HPAGE_PMD_SIZE, "hugepage")
    proc.write(t, b"t")
    parent_rss = rss(proc)
    assert parent_rss == [0, 5 + 1 + HPAGE_PMD_NR, 0, 3 + 1]
    child = proc.fork()
    assert rss(proc) == parent_rss
    # the shared anonymous VMA has no anon_vma, so its ptes are not copied
    assert rss(child) == [0, 5 + 1 + HPAGE_PMD_NR, 0, 1]
    assert pmd_leaf(pte(child, t))
    child.exit()
    assert rss(proc) == parent_rss


def test_copy_page_range_notifies_parent_protection_page(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    proc.write(a, b"x")
    s = proc.mmap(4 * P, shared=True)
    proc.write(s, b"y")
    rec = Recorder(proc)
    child = proc.fork()
    # copy_page_range() write-protects COW mappings under PROTECTION_PAGE of the whole VMA
    assert rec.ranges == [(MmuNotifierEvent.MMU_NOTIFY_PROTECTION_PAGE, a, a + 4 * P)]
    child.exit()
    # the child's exit does not touch the parent's mm
    assert len(rec.ranges) == 1 and rec.released == 0


def test_do_exit_frees_everything(make_system) -> None:  # noqa: ANN001
    s = make_system()
    mem = s.mem
    pool = s.hugetlb
    free0, hfree0, tables0 = mem.nr_free, pool.free_huge_pages, s.pt.nr_tables
    p = s.spawn()
    a = p.mmap(64 * P)
    p.touch(a, 64 * P, write=True)
    t = p.mmap(HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    p.madvise(t, HPAGE_PMD_SIZE, "hugepage")
    p.write(t, b"thp")
    sh = p.mmap(8 * P, shared=True)
    p.touch(sh, 8 * P, write=True)
    fd = p.open_tmpfile(8 * P)
    f = p.mmap(8 * P, shared=True, fd=fd)
    p.write(f, b"file")
    h = p.mmap(2 * HPAGE_PMD_SIZE, hugetlb=True)
    p.write(h, b"huge")
    child = p.fork()
    child.write(a, b"cow")
    child.write(h, b"cow")
    assert mem.nr_free < free0 and pool.free_huge_pages < hfree0
    child.exit()
    p.exit()
    assert mem.nr_free == free0
    assert pool.free_huge_pages == hfree0 and pool.resv_huge_pages == 0
    assert s.pt.nr_tables == tables0
    assert p.mm.dead and child.mm.dead


def test_do_exit_child_exit_does_not_disturb_parent(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    for i in range(4):
        proc.write(a + i * P, bytes([0x10 + i]) * 8)
    pfns = [pte_pfn(pte(proc, a + i * P)) for i in range(4)]
    before = rss(proc)
    vmas = vma_tuples(proc)
    child = proc.fork()
    child.write(a, b"child")
    child.mmap(16 * P)
    child.munmap(a + 3 * P, P)
    rec = Recorder(proc)
    child.exit()
    assert rec.ranges == []
    assert rss(proc) == before and vma_tuples(proc) == vmas
    mem = proc.system.mem
    for i in range(4):
        assert proc.read(a + i * P, 8) == bytes([0x10 + i]) * 8
        assert pte_pfn(pte(proc, a + i * P)) == pfns[i]
        assert mem.refcount[pfns[i]] == 1 and mem.mapcount[pfns[i]] == 1
    # the pages the child shared are the parent's alone again: a write reuses them
    with proc.system.stats.measure() as d:
        proc.write(a + P, b"P")
    assert d["fault.wp_page_copy"] == 0 and d["fault.wp_page_reuse"] == 1
    assert pte_pfn(pte(proc, a + P)) == pfns[1] and pte_write(pte(proc, a + P))
    assert mem.flags[pfns[1]] & PG_anon_exclusive


def test_do_exit_parent_exit_first_child_keeps_data(proc) -> None:  # noqa: ANN001
    a = proc.mmap(2 * P)
    proc.write(a, b"inherit")
    child = proc.fork()
    proc.exit()
    assert child.read(a, 7) == b"inherit"
    pfn = pte_pfn(pte(child, a))
    child.write(a, b"I")
    assert pte_pfn(pte(child, a)) == pfn
    child.exit()


def test_exit_mmap_releases_notifiers_before_teardown(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    proc.touch(a, 4 * P, write=True)
    rec = Recorder(proc)
    with proc.system.stats.measure() as d:
        proc.exit()
    assert rec.released == 1
    # __mmu_notifier_release() unhooks classic notifiers after ->release: the teardown's
    # MMU_NOTIFY_UNMAP is not delivered to them
    assert rec.ranges == []
    assert d["mmu_notifier.release"] == 1
    assert proc.mm.dead and proc.mm.map_count == 0
