"""mm/gup.c: references and pins, faulting in, FOLL_SPLIT_PMD, FOLL_LONGTERM migration out
of device-coherent memory, GUP-fast, the pinned-page reference check of migration, and the
gup_test debugfs file. Invariants (with the pins GUP hands out) are checked after every
test, and also while pages are held."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from hmmsim import System
from hmmsim.drivers.gup_test import (
    GUP_BASIC_TEST,
    PIN_BASIC_TEST,
    PIN_LONGTERM_TEST_READ,
    PIN_LONGTERM_TEST_START,
    PIN_LONGTERM_TEST_STOP,
    GupTest,
    PinLongtermTest,
    gup_test_open,
)
from hmmsim.errors import HmmError
from hmmsim.kernel.errno import EFAULT, EINVAL, ENOENT, EOPNOTSUPP
from hmmsim.kernel.gup import (
    FOLL_LONGTERM,
    FOLL_SPLIT_PMD,
    FOLL_WRITE,
    GUP_PIN_COUNTING_BIAS,
    folio_maybe_dma_pinned,
    get_user_pages_remote,
    pin_user_pages,
    pin_user_pages_fast,
    put_page,
    unpin_user_pages,
)
from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.page_types import PAGE_SIZE
from hmmsim.kernel.pgtable import pmd_leaf, pte_pfn, pte_present

P = PAGE_SIZE
KERNELS = ["6.12", "7.3"]


def _gup(proc, addr: int, n: int, flags: int) -> tuple[int, list[int]]:  # noqa: ANN001
    pages: list[int] = []
    with proc.task.running():
        mmap_read_lock(proc.mm)
        try:
            got = get_user_pages_remote(proc.mm, addr, n, flags, pages)
        finally:
            mmap_read_unlock(proc.mm)
    return got, pages


def _pin(proc, addr: int, n: int, flags: int) -> tuple[int, list[int]]:  # noqa: ANN001
    pages: list[int] = []
    with proc.task.running():
        mmap_read_lock(proc.mm)
        try:
            got = pin_user_pages(proc.task, addr, n, flags, pages)
        finally:
            mmap_read_unlock(proc.mm)
    return got, pages


@pytest.mark.parametrize("kernel", KERNELS)
def test_get_user_pages_remote(make_system: Callable[..., System], kernel: str) -> None:
    """FOLL_GET faults the pages in (writable for FOLL_WRITE) and takes one reference each;
    put_page gives it back."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(4 * P)
    got, pages = _gup(proc, a, 4, FOLL_WRITE)
    assert got == 4 and len(set(pages)) == 4
    assert [int(sys.mem.refcount[p]) for p in pages] == [2, 2, 2, 2]
    assert all(pte_present(proc.mm.lookup_pte(a + i * P)) and proc.mm.lookup_pte(a + i * P) & 2 for i in range(4))
    sys.check_invariants(full=True)  # the references held by the caller are accounted
    for p in pages:
        put_page(sys, p)
    assert [int(sys.mem.refcount[p]) for p in pages] == [1, 1, 1, 1]
    assert not sys.extra_refs


@pytest.mark.parametrize("kernel", KERNELS)
def test_get_user_pages_remote_errors(make_system: Callable[..., System], kernel: str) -> None:
    """No VMA: -EFAULT; a write to a read-only mapping: -EFAULT; FOLL_SPLIT_PMD on hugetlb:
    -EOPNOTSUPP; a range running into a hole returns the pages before it."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(4 * P)
    proc.munmap(a + 2 * P, 2 * P)
    assert _gup(proc, a + 2 * P, 1, 0)[0] == -EFAULT
    got, pages = _gup(proc, a, 4, 0)
    assert got == 2
    for p in pages:
        put_page(sys, p)
    r = proc.mmap(P, "r")
    assert _gup(proc, r, 1, FOLL_WRITE)[0] == -EFAULT
    h = proc.mmap(2 << 20, hugetlb=True)
    assert _gup(proc, h, 1, FOLL_SPLIT_PMD)[0] == -EOPNOTSUPP


@pytest.mark.parametrize("kernel", KERNELS)
def test_try_grab_folio_pin_accounting(make_system: Callable[..., System], kernel: str) -> None:
    """FOLL_PIN adds GUP_PIN_COUNTING_BIAS to a small folio's refcount; a PMD-mapped THP gets
    one reference per page and its pincount; unpin_user_pages undoes both."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(P)
    proc.write(a, b"x")
    got, pages = _pin(proc, a, 1, FOLL_WRITE)
    assert got == 1
    assert int(sys.mem.refcount[pages[0]]) == 1 + GUP_PIN_COUNTING_BIAS
    assert folio_maybe_dma_pinned(sys, pages[0])
    unpin_user_pages(sys, pages)
    assert not folio_maybe_dma_pinned(sys, pages[0])
    t = proc.mmap(4 << 20)
    t = (t + (2 << 20) - 1) & ~((2 << 20) - 1)
    proc.madvise(t, 2 << 20, "hugepage")
    proc.write(t, b"y")
    assert pmd_leaf(proc.mm.lookup_pte(t))
    got, pages = _pin(proc, t, 512, FOLL_WRITE)
    head = pages[0]
    assert got == 512 and pages == list(range(head, head + 512))
    assert int(sys.mem.refcount[head]) == 1 + 512 and sys.folio_pincount[head] == 512
    assert folio_maybe_dma_pinned(sys, head + 7)
    sys.check_invariants(full=True)
    unpin_user_pages(sys, pages)
    assert int(sys.mem.refcount[head]) == 1 and head not in sys.folio_pincount


@pytest.mark.parametrize("kernel", KERNELS)
def test_follow_page_mask_split_pmd(make_system: Callable[..., System], kernel: str) -> None:
    """FOLL_SPLIT_PMD maps a THP by ptes before taking the page (the folio stays whole)."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    t = proc.mmap(4 << 20)
    t = (t + (2 << 20) - 1) & ~((2 << 20) - 1)
    proc.madvise(t, 2 << 20, "hugepage")
    proc.write(t, b"y")
    got, pages = _gup(proc, t + 3 * P, 1, FOLL_WRITE | FOLL_SPLIT_PMD)
    assert got == 1
    e = proc.mm.lookup_pte(t + 3 * P)
    assert not pmd_leaf(e) and pte_pfn(e) == pages[0]
    assert sys.mem.order[sys.mem.compound_head(pages[0])] == 9
    put_page(sys, pages[0])


@pytest.mark.parametrize("kernel", KERNELS)
def test_faultin_page_device_private_migrates_to_ram(make_system: Callable[..., System], kernel: str) -> None:
    """GUP of a page in device-private memory faults it back through migrate_to_ram."""
    sys = make_system(kernel=kernel, ram=512 << 20)
    proc = sys.spawn("t")
    a = proc.mmap(2 * P)
    proc.write(a, b"data" * 2048)
    d = proc.open_device(0)
    d.migrate(a, 2)
    before = sys.stats["fault.migrate_to_ram"]
    got, pages = _gup(proc, a, 2, FOLL_WRITE)
    assert got == 2 and sys.stats["fault.migrate_to_ram"] == before + 2
    assert all(p < sys.mem.ram_pages for p in pages)
    assert proc.read(a, 8) == b"datadata"
    for p in pages:
        put_page(sys, p)
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_check_and_migrate_movable_pages_coherent(make_system: Callable[..., System], kernel: str) -> None:
    """A FOLL_LONGTERM pin moves a page out of device-coherent memory first
    (migrate_device_coherent_folio); a short-term pin leaves it there."""
    sys = make_system(kernel=kernel, ram=1 << 30)
    proc = sys.spawn("t")
    a = proc.mmap(2 * P)
    data = np.arange(2 * P // 4, dtype=np.int32)
    proc.write_array(a, data)
    d = proc.open_device(2)
    d.migrate(a, 2)
    pg = sys.pgmap_of(pte_pfn(proc.mm.lookup_pte(a)))
    assert pg is not None and pg.is_coherent
    got, short = _pin(proc, a, 1, FOLL_WRITE)
    assert got == 1 and sys.pgmap_of(short[0]) is pg
    unpin_user_pages(sys, short)
    got, pages = _pin(proc, a + P, 1, FOLL_WRITE | FOLL_LONGTERM)
    assert got == 1 and sys.mem.pgmap[pages[0]] == 0
    assert sys.stats["migrate_device.coherent_folio"] == 1
    assert pte_pfn(proc.mm.lookup_pte(a + P)) == pages[0]
    assert folio_maybe_dma_pinned(sys, pages[0])
    unpin_user_pages(sys, pages)
    assert np.array_equal(proc.read_array(a, len(data)), data)
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_migrate_vma_check_page_refuses_pinned_pages(make_system: Callable[..., System], kernel: str) -> None:
    """A pinned page is not migrated to the device (the reference check fails); once
    unpinned it is."""
    sys = make_system(kernel=kernel, ram=512 << 20)
    proc = sys.spawn("t")
    a = proc.mmap(P)
    proc.write(a, b"pinned")
    got, pages = _pin(proc, a, 1, FOLL_WRITE)
    assert got == 1
    d = proc.open_device(0)
    with pytest.raises(HmmError) as ei:
        d.migrate(a, 1)  # the read-back finds nothing on the device
    assert ei.value.errno == ENOENT
    assert pte_pfn(proc.mm.lookup_pte(a)) == pages[0]
    unpin_user_pages(sys, pages)
    assert d.migrate(a, 1).cpages == 1
    assert not pte_present(proc.mm.lookup_pte(a))
    assert proc.read(a, 6) == b"pinned"
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_pin_user_pages_fast(make_system: Callable[..., System], kernel: str) -> None:
    """The fast path takes mapped writable pages without faulting; the rest goes through
    the slow path (which faults)."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(4 * P)
    proc.write(a, b"z" * (2 * P))
    pages: list[int] = []
    with proc.task.running():
        got = pin_user_pages_fast(proc.task, a, 4, FOLL_WRITE, pages)
    assert got == 4 and sys.stats["gup.fast"] == 2
    assert sys.stats["gup.faultin_page"] == 2
    unpin_user_pages(sys, pages)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gup_test_ioctl(make_system: Callable[..., System], kernel: str) -> None:
    """The gup_test file: GUP_BASIC_TEST / PIN_BASIC_TEST report the bytes covered and put
    everything back; PIN_LONGTERM_TEST_START keeps pins until STOP (or close); READ copies
    the pinned pages out; an unknown command is -EINVAL."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(8 * P)
    proc.write(a, b"gup!" * 1024)
    fd = gup_test_open(sys, proc.task)
    for cmd in (GUP_BASIC_TEST, PIN_BASIC_TEST):
        g = GupTest(addr=a, size=8 * P, nr_pages_per_call=3, gup_flags=FOLL_WRITE)
        assert proc.task.ioctl(fd, cmd, g) == 0
        assert g.size == 8 * P
    assert not sys.extra_refs
    assert proc.task.ioctl(fd, 12345, GupTest()) == -EINVAL
    assert proc.task.ioctl(fd, PIN_LONGTERM_TEST_START, PinLongtermTest(addr=a, size=2 * P, flags=1)) == 0
    assert folio_maybe_dma_pinned(sys, pte_pfn(proc.mm.lookup_pte(a)))
    assert proc.task.ioctl(fd, PIN_LONGTERM_TEST_START, PinLongtermTest(addr=a, size=P)) == -EINVAL
    out = proc.mmap(2 * P)
    assert proc.task.ioctl(fd, PIN_LONGTERM_TEST_READ, out) == 0
    assert proc.read(out, 4) == b"gup!"
    assert proc.task.ioctl(fd, PIN_LONGTERM_TEST_STOP, None) == 0
    assert not sys.extra_refs
    assert proc.task.ioctl(fd, PIN_LONGTERM_TEST_START, PinLongtermTest(addr=a, size=P)) == 0
    proc.close(fd)  # release drops the pins
    assert not sys.extra_refs


@pytest.mark.parametrize("kernel", KERNELS)
def test_copy_present_page_pinned_at_fork(make_system: Callable[..., System], kernel: str) -> None:
    """fork gives the child its own copy of a pinned exclusive anon page (the parent's pte
    stays writable: the pinned page keeps being the parent's); unpinned pages are shared
    read-only as usual."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(2 * P)
    proc.write(a, b"p" * (2 * P))
    got, pages = _pin(proc, a, 1, FOLL_WRITE)
    assert got == 1
    child = proc.fork()
    assert sys.stats["fork.copy_present_page"] == 1
    pe, ce = proc.mm.lookup_pte(a), child.mm.lookup_pte(a)
    assert pte_pfn(pe) == pages[0] and pe & 2 and pte_pfn(ce) != pages[0] and ce & 2
    assert pte_pfn(proc.mm.lookup_pte(a + P)) == pte_pfn(child.mm.lookup_pte(a + P))
    assert child.read(a, 2) == b"pp"
    proc.write(a, b"q")
    assert child.read(a, 1) == b"p"
    child.exit()
    unpin_user_pages(sys, pages)
