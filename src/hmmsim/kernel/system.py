"""The simulated machine: RAM, page tables, locks, counters, device memory, processes.

A :class:`System` is one booted kernel. Its configuration mirrors the knobs the HMM
selftests care about: RAM size, THP mode (``/sys/kernel/mm/transparent_hugepage/
enabled``), the huge zero page (``use_zero_page``), the hugetlb pool (``nr_hugepages``
of 2 MiB), optional swap, and whether the ``test_hmm`` module is loaded (four dmirror
devices: 0 and 1 device-private, 2 and 3 device-coherent).

>>> from hmmsim.kernel.system import System
>>> sys = System(ram=256 << 20, coherent=False)
>>> task = sys.create_task("a.out")
>>> sys.modules_loaded, len(sys.dmirror_devices)
(['test_hmm'], 2)

:class:`hmmsim.System` is this machine with the friendly process API on top
(``System().spawn()``).
"""

from __future__ import annotations

import itertools

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .fs import AddressSpace
from .hugetlb import HugetlbPool
from .invariants import check_invariants
from .locking import LockState
from .mm import MM
from .module import load_module
from .page_types import PAGE_SHIFT
from .pgtable import PageTableStore
from .physmem import PG_anon, PhysMem
from .profile import DEFAULT_KERNEL, Profile, get_profile, with_migrate_on_fault
from .stats import Stats
from .trace import Trace
from .swap import SwapInfo
from .task import Task

if TYPE_CHECKING:
    from .memremap import DevPagemap

__all__ = ("DEVMEM_CHUNK_PAGES", "System", "SystemConfig")

MiB = 1 << 20
GiB = 1 << 30
#: test_hmm's DEVMEM_CHUNK_SIZE (256 MiB) in pages
DEVMEM_CHUNK_PAGES = (256 * MiB) >> PAGE_SHIFT



@dataclass(frozen=True)
class SystemConfig:
    """Boot parameters of a :class:`System` (all sizes in bytes)."""

    #: system RAM (``mem=``); page contents are allocated lazily
    ram: int = 1 * GiB
    #: THP mode: ``"always"``, ``"madvise"`` or ``"never"``
    thp: str = "madvise"
    #: map the huge zero page on read faults of THP-eligible ranges
    huge_zero_page: bool = True
    #: 2 MiB pages reserved for hugetlb at boot
    hugetlb_pages: int = 32
    #: RAM pages a real kernel keeps for itself beyond the first pageblock (struct pages,
    #: its image): left out of ``totalram_pages()`` (overcommit heuristic, vmalloc size
    #: check) but not taken from the allocator
    reserved_pages: int = 0
    #: swap slots (0: no swap device, like the reference environment)
    swap_pages: int = 0
    #: load test_hmm: dmirror devices 0, 1 (private) and, if *coherent*, 2, 3
    test_hmm: bool = True
    #: create the device-coherent dmirror devices (needs 2 x 256 MiB of SPM)
    coherent: bool = True
    #: pfn space for device-private chunks (``request_free_mem_region``)
    device_private_space: int = 8 * GiB
    #: kernel release whose behaviour is modelled where releases differ ("6.12" or "7.3";
    #: see :mod:`hmmsim.kernel.profile`)
    kernel: str = DEFAULT_KERNEL
    #: switch on the unified fault+migrate walk (the "Migrate on fault for device pages"
    #: series) on top of *kernel* (7.3 only; :func:`~hmmsim.kernel.profile.with_migrate_on_fault`)
    migrate_on_fault: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.thp not in ("always", "madvise", "never"):
            raise ValueError(f"THP mode must be always, madvise or never, not {self.thp!r}")
        if self.ram < 64 * MiB or self.ram % (2 * MiB):
            raise ValueError("RAM must be a multiple of 2 MiB and at least 64 MiB")
        if self.hugetlb_pages < 0 or self.hugetlb_pages * 2 * MiB > self.ram // 2:
            raise ValueError("the hugetlb pool must fit in half of RAM")
        if not 0 <= self.reserved_pages < self.ram // 2 // 4096:
            raise ValueError("reserved_pages must be >= 0 and less than half of RAM")
        if self.swap_pages < 0:
            raise ValueError("swap_pages must be >= 0")
        profile = get_profile(self.kernel)  # ValueError naming the supported releases
        if self.migrate_on_fault:
            with_migrate_on_fault(profile)  # ValueError for a release without it


class System:
    """One simulated machine (see module docstring). Keyword arguments override
    :class:`SystemConfig` fields: ``System(ram=2 << 30, thp="always")``."""

    def __init__(self, config: SystemConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = SystemConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a SystemConfig or keyword overrides")
        self.config = config
        #: the release's named behaviours (:class:`~hmmsim.kernel.profile.Profile`)
        self.profile: Profile = get_profile(config.kernel)
        if config.migrate_on_fault:
            self.profile = with_migrate_on_fault(self.profile)
        self.stats = Stats()
        #: tracepoints: attach probes or ``record()`` events (:mod:`hmmsim.kernel.trace`)
        self.trace = Trace()
        self.ls = LockState(self.stats)
        ram_pages = config.ram >> PAGE_SHIFT
        coherent_pages = 2 * DEVMEM_CHUNK_PAGES if config.test_hmm and config.coherent else 0
        self._coherent_base = ram_pages
        data_pages = ram_pages + coherent_pages
        self._private_base = (data_pages + DEVMEM_CHUNK_PAGES - 1) // DEVMEM_CHUNK_PAGES * DEVMEM_CHUNK_PAGES
        self._private_next = self._private_base
        #: device-private ranges given back by ``release_mem_region`` (start pfn -> pages)
        self._private_released: dict[int, int] = {}
        max_pfn = self._private_base + (config.device_private_space >> PAGE_SHIFT)
        self.mem = PhysMem(ram_pages, data_pages, max_pfn, config.reserved_pages)
        #: every live address space (``exit_mmap`` takes an mm off the list)
        self.mms: list[MM] = []
        #: references held by in-flight kernel operations (pfn -> count), for the checker
        self.extra_refs: dict[int, int] = {}
        #: ``folio->_pincount`` of large folios pinned by FOLL_PIN (head pfn -> pins)
        self.folio_pincount: dict[int, int] = {}
        #: live inodes (tmpfs, hugetlbfs), whose page caches hold page references
        self.inodes: list[Any] = []
        self.pt = PageTableStore()
        self.hugetlb = HugetlbPool(self, config.hugetlb_pages)
        self.swap: SwapInfo | None = SwapInfo(config.swap_pages + 1) if config.swap_pages else None
        self.pgmaps: list[DevPagemap | None] = []
        #: the kind of each pagemap by id (memremap.pgmap_kinds(); None: to be computed)
        self.pgmap_kind_table: Any = None
        self.tasks: list[Task] = []
        #: pid allocator of this boot (``alloc_pid``): pids start at 1 on every machine
        self.pids = itertools.count(1)
        #: the model's clock (``jiffies``): advanced only by code that has timeouts
        self.jiffies = 0
        #: open invalidate_range_start() calls per mm (balance is asserted)
        self.notifier_active: dict[int, int] = {}
        self.dmirror_devices: list[Any] = []
        self.modules_loaded: list[str] = []
        if config.test_hmm:
            load_module(self, "test_hmm")

    # -- processes ------------------------------------------------------------------------
    def create_task(self, name: str = "") -> Task:
        """A new process with an empty address space (what ``exec`` leaves behind)."""
        t = Task(self, MM(self), name=name)
        self.tasks.append(t)
        return t

    # -- device memory ----------------------------------------------------------------------
    def request_free_mem_region(self, nr_pages: int) -> int:
        """``request_free_mem_region()``: a free physical range for device-private memory
        (not CPU addressable); returns its first pfn or -1. A range given back by
        :meth:`release_mem_region` is found again first (the lowest one that fits)."""
        for start in sorted(self._private_released):
            have = self._private_released[start]
            if have >= nr_pages:
                del self._private_released[start]
                if have > nr_pages:
                    self._private_released[start + nr_pages] = have - nr_pages
                return start
        start = self._private_next
        if start + nr_pages > self.mem.max_pfn:
            return -1
        self._private_next += nr_pages
        return start

    def release_mem_region(self, start: int, nr_pages: int) -> None:
        """``release_mem_region()``: give back a range :meth:`request_free_mem_region`
        handed out (the driver unmapped its pages first)."""
        assert self._private_base <= start and start + nr_pages <= self._private_next, "not a requested region"
        assert all(not (s < start + nr_pages and start < s + n) for s, n in self._private_released.items()), \
            "region released twice"
        self._private_released[start] = nr_pages

    def spm_range(self, index: int) -> int:
        """First pfn of special-purpose (device-coherent) memory range *index* (0 or 1),
        like test_hmm's ``spm_addr_dev0/1`` parameters; -1 if not configured."""
        if not (self.config.test_hmm and self.config.coherent) or index not in (0, 1):
            return -1
        return self._coherent_base + index * DEVMEM_CHUNK_PAGES

    def pfn_limit(self) -> int:
        """One past the highest pfn that can be in use (RAM, coherent memory, the device
        chunks handed out so far)."""
        return max(self.mem.data_pages, self._private_next)

    def pgmap_of(self, pfn: int) -> "DevPagemap | None":
        """``page_pgmap()``: the ZONE_DEVICE pagemap of *pfn*, or None."""
        pid = int(self.mem.pgmap[pfn]) if 0 <= pfn < self.mem.max_pfn else 0
        return self.pgmaps[pid - 1] if pid else None

    def iter_address_spaces(self) -> list[AddressSpace]:
        """The page caches of every live inode."""
        return [i.i_mapping for i in self.inodes]

    def mapping_cache_of(self, pfn: int) -> AddressSpace | None:
        """The page cache holding page *pfn*, if it is a file page."""
        mem = self.mem
        head = mem.compound_head(pfn)
        if mem.flags[head] & PG_anon:
            return None
        obj = mem.mapping_obj(int(mem.mapping[head]))
        return obj if isinstance(obj, AddressSpace) else None

    # -- checks -------------------------------------------------------------------------------
    def check_invariants(self, full: bool = True) -> None:
        """Verify frames, refcounts, mapcounts and rss against the page tables; raise
        :class:`~hmmsim.kernel.invariants.InvariantError` naming the first bad pfn."""
        check_invariants(self, full=full)

    def __repr__(self) -> str:
        c = self.config
        return (f"System(kernel={c.kernel}, ram={c.ram >> 20} MiB, thp={c.thp}, hugetlb={c.hugetlb_pages}, "
                f"tasks={len(self.tasks)}, free={self.mem.nr_free} pages)")


