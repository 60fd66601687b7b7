"""Device-exclusive access per release: HMM_DMIRROR_EXCLUSIVE (``dmirror_exclusive``),
6.12's ``make_device_exclusive_range`` and 7.3's ``make_device_exclusive``, the CPU fault
that restores the entry (``remove_device_exclusive_entry``), fork
(``copy_nonpresent_pte``), mprotect (``change_pte_range``) and munmap (``zap_pte_range``)
of exclusive entries, and ``hmm_range_fault`` on them. Invariants are checked after each
test (6.12's entries hold a reference but no mapping; 7.3's stay mapped)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from hmmsim import System
from hmmsim.errors import HmmError
from hmmsim.kernel.errno import EBUSY, EOPNOTSUPP, EPERM
from hmmsim.kernel.mmu_notifier import MmuNotifierEvent
from hmmsim.kernel.page_types import PAGE_SIZE
from hmmsim.kernel.pgtable import (
    SWP_DEVICE_EXCLUSIVE_READ,
    SWP_DEVICE_EXCLUSIVE_WRITE,
    is_device_exclusive_entry,
    pte_present,
    pte_to_swp_entry,
    pte_write,
    swp_offset_pfn,
    swp_type,
)

from ..kernel.helpers import Recorder

P = PAGE_SIZE
KERNELS = ["6.12", "7.3"]


def _exclusive_entry(proc, addr: int) -> int:  # noqa: ANN001
    """The device-exclusive swap entry mapping *addr* (asserts there is one)."""
    e = proc.mm.lookup_pte(addr)
    assert e and not pte_present(e) and is_device_exclusive_entry(pte_to_swp_entry(e)), proc.pte(addr)
    return pte_to_swp_entry(e)


@pytest.mark.parametrize("kernel", KERNELS)
def test_dmirror_exclusive(make_system: Callable[..., System], kernel: str) -> None:
    """EXCLUSIVE replaces each pte by a device-exclusive entry, tags the mirror ATOMIC and
    reads the data back; 6.12 drops the page's mapping (keeping the reference), 7.3
    keeps both."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(4 * P)
    data = np.arange(P, dtype=np.int32)
    proc.write_array(a, data)
    d = proc.open_device(0)
    d.snapshot(a, 1)  # the facade's scratch buffer exists before rss is looked at
    anon = proc.mm.rss[1]
    got = d.exclusive(a, 4)
    assert got.cpages == 4 and np.array_equal(got.data.view(np.int32), data)
    assert not d.check_exclusive(a, 4)
    for i in range(4):
        ent = _exclusive_entry(proc, a + i * P)
        pfn = swp_offset_pfn(ent)
        assert swp_type(ent) == SWP_DEVICE_EXCLUSIVE_WRITE
        assert int(sys.mem.refcount[pfn]) == 1
        assert int(sys.mem.mapcount[pfn]) == (1 if kernel == "7.3" else 0)
    assert proc.mm.rss[1] == anon + 4 - 1  # the snapshot buffer's page was already there
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_remove_device_exclusive_entry(make_system: Callable[..., System], kernel: str) -> None:
    """A CPU access restores the pte (writable: the entry was writable / the page is
    exclusive) under an invalidation of that page only (6.12: MMU_NOTIFY_EXCLUSIVE, 7.3:
    MMU_NOTIFY_CLEAR) that revokes the device's atomic access."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(4 * P)
    proc.write(a, b"q" * (4 * P))
    d = proc.open_device(0)
    d.exclusive(a, 4)
    rec = Recorder(proc)
    assert proc.read(a + P, 1) == b"q"
    event = MmuNotifierEvent.MMU_NOTIFY_CLEAR if kernel == "7.3" else MmuNotifierEvent.MMU_NOTIFY_EXCLUSIVE
    assert rec.ranges == [(event, a + P, a + 2 * P)]
    e = proc.mm.lookup_pte(a + P)
    assert pte_present(e) and pte_write(e)
    assert int(sys.mem.mapcount[(e >> 12) & ((1 << 40) - 1)]) == 1
    assert d.check_exclusive(a + P, 2)  # the inclusive end of the invalidation: page 2 too
    assert not d.check_exclusive(a, 1) and not d.check_exclusive(a + 3 * P, 1)
    proc.write(a + 3 * P, b"w")
    assert proc.read(a + 3 * P, 2) == b"wq"
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_make_device_exclusive_thp(make_system: Callable[..., System], kernel: str) -> None:
    """On a PMD-mapped THP, 6.12 makes the whole folio exclusive through its head page and
    fails with -EBUSY on the tail pages (the head stays ATOMIC in the mirror); 7.3 splits the
    PMD and makes just the pages asked for exclusive."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    t = proc.mmap(4 << 20)
    t = (t + (2 << 20) - 1) & ~((2 << 20) - 1)
    proc.madvise(t, 2 << 20, "hugepage")
    proc.write(t, b"h" * (2 << 20))
    d = proc.open_device(0)
    if kernel == "6.12":
        with pytest.raises(HmmError) as ei:
            d.exclusive(t, 4)
        assert ei.value.errno == EBUSY
        for i in (0, 1, 100, 511):
            _exclusive_entry(proc, t + i * P)
        assert not d.check_exclusive(t, 1) and d.check_exclusive(t + P, 3)
    else:
        assert d.exclusive(t, 4).cpages == 4
        for i in range(4):
            _exclusive_entry(proc, t + i * P)
        assert pte_present(proc.mm.lookup_pte(t + 4 * P))
        assert not d.check_exclusive(t, 4)
    assert proc.read(t + 200 * P, 2) == b"hh"
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_make_device_exclusive_refuses(make_system: Callable[..., System], kernel: str) -> None:
    """Shared anon memory is refused: 6.12's range API turns every failure into -EBUSY,
    7.3 returns make_device_exclusive()'s -EOPNOTSUPP. Nothing is left exclusive."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    s = proc.mmap(2 * P, shared=True)
    proc.write(s, b"s")
    d = proc.open_device(0)
    with pytest.raises(HmmError) as ei:
        d.exclusive(s, 2)
    assert ei.value.errno == (EOPNOTSUPP if kernel == "7.3" else EBUSY)
    assert pte_present(proc.mm.lookup_pte(s))
    assert d.check_exclusive(s, 2)
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_copy_nonpresent_pte_device_exclusive(make_system: Callable[..., System], kernel: str) -> None:
    """fork restores the parent's exclusive entries (the device loses atomic access) and
    copies them as present ptes; both processes then COW their own copies."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(2 * P)
    proc.write(a, b"parent" + bytes(2 * P - 6))
    d = proc.open_device(0)
    d.exclusive(a, 2)
    child = proc.fork()
    assert pte_present(proc.mm.lookup_pte(a)) and pte_present(child.mm.lookup_pte(a))
    assert sys.stats["fork.restore_exclusive_pte"] == 2
    assert child.read(a, 6) == b"parent"
    child.write(a, b"child!")
    assert proc.read(a, 6) == b"parent"
    child.exit()
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_change_pte_range_device_exclusive(make_system: Callable[..., System], kernel: str) -> None:
    """mprotect(PROT_READ) makes 6.12's writable exclusive entries readable ones; 7.3 has a
    single entry type and leaves it. A device write then fails with -EPERM either way."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(2 * P)
    proc.write(a, b"m" * (2 * P))
    d = proc.open_device(0)
    d.exclusive(a, 2)
    proc.mprotect(a, 2 * P, "r")
    want = SWP_DEVICE_EXCLUSIVE_WRITE if kernel == "7.3" else SWP_DEVICE_EXCLUSIVE_READ
    assert swp_type(_exclusive_entry(proc, a)) == want
    with pytest.raises(HmmError) as ei:
        d.write(a, b"x" * P)
    assert ei.value.errno == EPERM
    assert proc.read(a, 1) == b"m"
    assert not pte_write(proc.mm.lookup_pte(a))
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_zap_pte_range_device_exclusive(make_system: Callable[..., System], kernel: str) -> None:
    """munmap of exclusive entries frees the pages (the invariants check rss, mapcounts and
    that no frame is lost) and the mirror lets go."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(4 * P)
    proc.write(a, b"z" * (4 * P))
    d = proc.open_device(0)
    d.exclusive(a, 4)
    pfn = swp_offset_pfn(_exclusive_entry(proc, a))
    free = sys.mem.nr_free
    anon = proc.mm.rss[1]
    proc.munmap(a, 4 * P)
    assert sys.mem.nr_free == free + 4 and int(sys.mem.refcount[pfn]) == 0
    assert proc.mm.rss[1] == anon - 4
    assert d.check_exclusive(a, 4)
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_hmm_range_fault_device_exclusive(make_system: Callable[..., System], kernel: str) -> None:
    """A snapshot (no fault) reports exclusive entries as not present; a device READ faults
    them back (the CPU page table gets the pte again) and reads the data."""
    sys = make_system(kernel=kernel)
    proc = sys.spawn("t")
    a = proc.mmap(2 * P)
    proc.write(a, b"r" * (2 * P))
    d = proc.open_device(0)
    d.exclusive(a, 2)
    e = proc.open_device(1)
    assert e.snapshot(a, 2).tolist() == [0, 0]
    got = e.read(a, 2)
    assert got.data[:2].tobytes() == b"rr" and got.faults == 1
    assert pte_present(proc.mm.lookup_pte(a))
    assert d.check_exclusive(a, 2)
    e.close()
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_migrate_device_range_device_exclusive(make_system: Callable[..., System], kernel: str) -> None:
    """Closing a coherent device whose page another device made exclusive: 7.3 evicts the
    page through try_to_migrate (it comes back read-only, data intact); 6.12, which would
    restore the entry read-only and leak a reference, is reported as not modelled."""
    from hmmsim.kernel.bug import NotSupportedError
    sys = make_system(kernel=kernel, ram=1 << 30)
    proc = sys.spawn("t")
    a = proc.mmap(2 * P)
    proc.write(a, b"c" * (2 * P))
    c = proc.open_device(2)
    c.migrate(a, 2)
    d = proc.open_device(0)
    d.exclusive(a, 1)
    if kernel == "6.12":
        with pytest.raises(NotSupportedError):
            c.close()  # stopped before the eviction changed anything
        _exclusive_entry(proc, a)
    else:
        c.close()
        e = proc.mm.lookup_pte(a)
        assert pte_present(e) and not pte_write(e) and sys.mem.pgmap[(e >> 12) & ((1 << 40) - 1)] == 0
    assert proc.read(a, 2) == b"cc"
    d.close()
