"""Core mm on order-0 device pages (the paths hmm_cow_in_device, migrate_release and the
recorded ``devmem_*`` scenarios go through), on both kernels:

* fork: ``copy_nonpresent_pte()`` turns a writable device-private entry read-only in
  parent and child (one more map and reference); a coherent page is a normal present page
  (``copy_present_pte()``: write-protected and shared).
* a CPU write then faults: ``do_swap_page()`` -> ``migrate_to_ram`` moves the shared
  device-private page back for both processes (rmap unmaps every mapping), and
  ``do_wp_page()`` copies for the writer; a coherent page is copied by ``do_wp_page()``.
* munmap / MADV_DONTNEED of device pages frees them to the driver (``page_free``);
  mprotect makes writable device-private entries read-only and never writable again."""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.pgtable import pte_pfn, pte_present, pte_to_swp_entry, swp_offset_pfn

KERNELS = ("6.12", "7.3")


def pattern(n: int, seed: int) -> bytes:
    return (np.arange(n * P // 4, dtype=np.uint32) + seed).tobytes()


def pfn_of(proc, addr: int) -> int:
    pte = int(proc.mm.lookup_pte(addr))
    return pte_pfn(pte) if pte_present(pte) else swp_offset_pfn(pte_to_swp_entry(pte))


@pytest.mark.parametrize("kernel", KERNELS)
def test_fork_makes_device_private_entries_readable_and_a_write_migrates_back(make_system, kernel: str) -> None:
    sys = make_system(kernel=kernel)
    parent = sys.spawn()
    a = parent.mmap(2 * P)
    parent.write(a, pattern(2, 1))
    d = parent.open_device(0)
    d.migrate(a, 2)
    assert parent.pte(a).startswith("device-private-write")
    dpfn = pfn_of(parent, a)
    refs = int(sys.mem.refcount[dpfn])
    child = parent.fork()
    for p in (parent, child):
        assert p.pte(a).startswith("device-private-read"), p.pte(a)
    assert sys.mem.folio_mapcount(dpfn) == 2
    assert int(sys.mem.refcount[dpfn]) == refs + 1
    sys.check_invariants()
    swaps = sys.stats["fault.do_swap_page"]
    parent.write(a, pattern(1, 9))
    assert sys.stats["fault.do_swap_page"] == swaps + 1
    # the page came back for both; the parent wrote its own copy
    assert parent.pte(a).startswith("pfn") and child.pte(a).startswith("pfn")
    assert pfn_of(parent, a) != pfn_of(child, a)
    assert child.read(a, P) == pattern(2, 1)[:P]
    assert parent.read(a, P) == pattern(1, 9)
    assert int(sys.mem.refcount[dpfn]) == 0, "the device page went back to the driver"
    # page 1 is untouched: still a shared read-only device-private entry
    assert parent.pte(a + P).startswith("device-private-read")
    child.exit()
    assert parent.pte(a + P).startswith("device-private-read"), "exit does not change the parent's entry"
    parent.write(a + P, pattern(1, 3))
    assert parent.read(a, 2 * P) == pattern(1, 9) + pattern(1, 3)
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_fork_shares_coherent_pages_and_a_write_copies_to_system_memory(make_system, kernel: str) -> None:
    sys = make_system(kernel=kernel)
    parent = sys.spawn()
    a = parent.mmap(P)
    parent.write(a, pattern(1, 2))
    d = parent.open_device(2)
    d.migrate(a, 1)
    cpfn = pfn_of(parent, a)
    assert sys.pgmap_of(cpfn) is not None and sys.pgmap_of(cpfn).is_coherent
    child = parent.fork()
    assert pfn_of(child, a) == cpfn
    for p in (parent, child):
        assert "RW" not in p.pte(a).split()[2].split("|"), p.pte(a)
    wp = sys.stats["fault.do_wp_page"]
    child.write(a, pattern(1, 7))
    assert sys.stats["fault.do_wp_page"] == wp + 1
    new = pfn_of(child, a)
    assert new != cpfn and sys.pgmap_of(new) is None, "the copy is a system page"
    assert parent.read(a, P) == pattern(1, 2) and pfn_of(parent, a) == cpfn
    child.exit()
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("minor", [0, 2])
@pytest.mark.parametrize("how", ["munmap", "dontneed"])
def test_zap_frees_device_pages_to_the_driver(make_system, kernel: str, minor: int, how: str) -> None:
    sys = make_system(kernel=kernel)
    p = sys.spawn()
    a = p.mmap(4 * P)
    p.write(a, pattern(4, 5))
    d = p.open_device(minor)
    d.migrate(a, 4)
    mdev = sys.dmirror_devices[minor]
    free = len(mdev.free_pages)
    freed = sys.stats["memremap.page_free"]
    if how == "munmap":
        p.munmap(a + P, 2 * P)
    else:
        p.madvise(a + P, 2 * P, "dontneed")
        assert p.read(a + P, 2 * P) == bytes(2 * P), "zero-fill on the next touch"
    assert sys.stats["memremap.page_free"] == freed + 2
    assert len(mdev.free_pages) == free + 2
    assert p.read(a, P) == pattern(4, 5)[:P]
    d.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_mprotect_makes_device_private_entries_read_only_for_good(make_system, kernel: str) -> None:
    sys = make_system(kernel=kernel)
    p = sys.spawn()
    a = p.mmap(2 * P)
    p.write(a, pattern(2, 6))
    d = p.open_device(0)
    d.migrate(a, 2)
    p.mprotect(a, 2 * P, "r")
    assert p.pte(a).startswith("device-private-read")
    p.mprotect(a, 2 * P, "none")
    assert p.pte(a).startswith("device-private-read")
    p.mprotect(a, 2 * P, "rw")
    assert p.pte(a).startswith("device-private-read"), "rw again does not make it writable"
    p.write(a, pattern(1, 8))  # migrate_to_ram, then a write fault on the system page
    assert p.read(a, 2 * P) == pattern(1, 8) + pattern(2, 6)[P:]
    d.close()
