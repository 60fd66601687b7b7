"""Helpers shared by the kernel-core tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hmmsim import Process
from hmmsim.kernel.mmu_notifier import MmuNotifier, MmuNotifierEvent, MmuNotifierRange, mmu_notifier_register

MiB = 1 << 20
#: 2 MiB-aligned addresses for MAP_FIXED mappings (well inside TASK_SIZE)
BASE = 0x7E00_0000_0000
OTHER = 0x7D00_0000_0000


class Recorder:
    """A classic MMU notifier recording (event, start, end) of every invalidation and
    counting ``release`` calls."""

    def __init__(self, proc: Process) -> None:
        self.ranges: list[tuple[MmuNotifierEvent, int, int]] = []
        self.released = 0
        self.mn = MmuNotifier(invalidate_range_start=self._start, release=self._release)
        assert mmu_notifier_register(self.mn, proc.mm) == 0

    def _start(self, r: MmuNotifierRange) -> int:
        self.ranges.append((r.event, r.start, r.end))
        return 0

    def _release(self, mm: object) -> None:
        self.released += 1

    def events(self, event: MmuNotifierEvent) -> list[tuple[int, int]]:
        return [(s, e) for ev, s, e in self.ranges if ev == event]


def pte(proc: Process, addr: int) -> int:
    """The entry mapping *addr* (pte, or huge pmd/pud), 0 if none."""
    return proc.mm.lookup_pte(addr)


class DevicePrivateThp:
    """A process with a device-private THP at *addr* (7.3, ``device_private_thp``): a
    PMD-sized folio of a test device-private pagemap made with ``zone_device_folio_init``
    and mapped the way migration leaves it (``folio_add_new_anon_rmap_pmd`` + a
    device-private PMD entry, one folio reference, rss +512). The pagemap's ops record
    what core mm asks of the driver: ``page_free`` (freed pfns), ``folio_split`` (the
    (head, tail) calls) and ``migrate_to_ram`` (the faults, each with the PMD value, the
    page and whether the folio was locked; the answer is ``self.fault_ret`` or what
    ``self.on_fault(vmf)`` returns). *nr_pmds* THPs are mapped one after the other.

    *addr* must be 2 MiB aligned inside an anonymous VMA whose PMD there is empty
    (``map_region`` makes one)."""

    def __init__(self, proc: Process, addr: int, writable: bool = True, *, folio_split: bool = True,
                 nr_pmds: int = 1) -> None:
        from hmmsim.kernel.memremap import (DevPagemap, DevPagemapOps, MemoryType, memremap_pages,
                                            zone_device_folio_init)
        from hmmsim.kernel.mm import MM_ANONPAGES
        from hmmsim.kernel.page_types import HPAGE_PMD_NR, HPAGE_PMD_ORDER
        from hmmsim.kernel.pagemap import folio_unlock
        from hmmsim.kernel.pgtable import (make_readable_device_private_entry,
                                           make_writable_device_private_entry, swp_entry_to_pmd)
        from hmmsim.kernel.rmap import anon_vma_prepare, folio_add_new_anon_rmap_pmd

        self.proc = proc
        self.sys = sys = proc.mm.sys
        assert sys.profile.device_private_thp, "only 7.3 has device-private THPs"
        assert addr % (HPAGE_PMD_NR << 12) == 0
        self.addr = addr
        self.freed: list[int] = []
        self.splits: list[tuple[int, int | None]] = []
        self.faults: list[tuple[int, int, int, bool]] = []
        self.fault_ret = 0
        self.on_fault: Callable[[Any], int] | None = None
        self.owner = object()
        start = sys.request_free_mem_region(HPAGE_PMD_NR * (nr_pmds + 1))
        start = (start + HPAGE_PMD_NR - 1) & ~(HPAGE_PMD_NR - 1)
        ops = DevPagemapOps(page_free=self.freed.append, migrate_to_ram=self._migrate_to_ram,
                            folio_split=self._folio_split if folio_split else None)
        self.pgmap = DevPagemap(MemoryType.MEMORY_DEVICE_PRIVATE, start, HPAGE_PMD_NR * nr_pmds, ops, self.owner)
        assert memremap_pages(sys, self.pgmap) == 0
        self.heads = heads = [start + i * HPAGE_PMD_NR for i in range(nr_pmds)]
        self.head = heads[0]
        vma = proc.mm.vma_lookup(addr)
        assert vma is not None and vma.vm_end >= addr + nr_pmds * (HPAGE_PMD_NR << 12)
        anon_vma_prepare(vma)
        make = make_writable_device_private_entry if writable else make_readable_device_private_entry
        for i, head in enumerate(heads):
            haddr = addr + i * (HPAGE_PMD_NR << 12)
            zone_device_folio_init(sys, head, HPAGE_PMD_ORDER)
            folio_add_new_anon_rmap_pmd(sys.mem, head, vma, haddr)
            pmd = proc.mm.pmd_ref(haddr, alloc=True)
            assert pmd is not None and pmd.get() == 0
            pmd.set(swp_entry_to_pmd(make(head)))
            proc.mm.add_mm_counter(MM_ANONPAGES, HPAGE_PMD_NR)
            folio_unlock(sys, head)

    def _migrate_to_ram(self, vmf: Any) -> int:
        from hmmsim.kernel.pagemap import folio_test_locked
        assert vmf.pmd is not None
        self.faults.append((vmf.address, vmf.page, vmf.pmd.get(), folio_test_locked(self.sys, vmf.page)))
        if self.on_fault is not None:
            return self.on_fault(vmf)
        return self.fault_ret

    def _folio_split(self, head: int, tail: int | None) -> None:
        self.splits.append((head, tail))

    def pmd(self, proc: Process | None = None, i: int = 0) -> int:
        """The PMD value covering the i-th THP in *proc* (default: the owner process)."""
        p = proc or self.proc
        ref = p.mm.pmd_ref(self.addr + i * (512 << 12))
        return ref.get() if ref is not None else 0


def map_region(proc: Process, nr_pmds: int = 2, addr: int = BASE) -> int:
    """An anonymous read-write mapping of *nr_pmds* 2 MiB blocks at the 2 MiB-aligned
    *addr* (MAP_FIXED); returns *addr*."""
    return proc.mmap(nr_pmds << 21, "rw", addr=addr, fixed=True)
