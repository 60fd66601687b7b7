"""Accounting: what the model did, counted the way the kernel would count it.

One :class:`Stats` object per :class:`~hmmsim.kernel.system.System` collects every
``walk_page_range`` call, page-table levels and entries visited, callbacks invoked, faults
taken (by handler), notifier invalidations and lock acquisitions (by class and mode).
Keys are strings named after the kernel function or object they count, e.g.
``"walk_page_range"``, ``"walk.pmd_entry"``, ``"walk.pte_entries"``, ``"fault.do_anonymous_page"``,
``"mmu_notifier.invalidate_range_start"``, ``"lock.mmap_lock.read"``.

Every key is declared once, in :data:`COUNTERS` below (the way ``/proc/vmstat`` items are a
fixed enum in the kernel): counting or reading a key that is not declared raises
:class:`UnknownCounterError` (a ``KeyError``) naming the closest declared keys, so a
misspelled key cannot silently read 0. A declared key never counted reads 0. Lock classes
are declared when a :class:`~hmmsim.kernel.locking.Lock` of that class is created (like
lockdep registering a lock class), or ahead of time in :data:`LOCK_CLASSES`; code that
adds a new counter declares it here (or calls :func:`declare`).
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

__all__ = (
    "COUNTERS", "DMIRROR_IOCTLS", "LOCK_CLASSES", "MMU_NOTIFY_EVENTS", "Stats", "StatsDelta",
    "UnknownCounterError", "declare", "declare_lock_class",
)

#: every declared counter: key -> what it counts
COUNTERS: dict[str, str] = {}


def declare(key: str, doc: str) -> str:
    """Declare counter *key* (idempotent) and return it.

    >>> declare("fault.do_anonymous_page", "do_anonymous_page() calls")
    'fault.do_anonymous_page'
    """
    COUNTERS.setdefault(key, doc)
    return key


def _declare_all(doc: str, *keys: str) -> None:
    for k in keys:
        declare(k, doc)


# -- mm core --------------------------------------------------------------------------------------
_declare_all("calls of the mm/memory.c fault handler of that name (one per page faulted)",
             "fault.handle_mm_fault", "fault.do_anonymous_page", "fault.do_read_fault",
             "fault.do_cow_fault", "fault.do_shared_fault", "fault.do_fault_nofault",
             "fault.do_wp_page", "fault.wp_page_copy", "fault.wp_page_reuse", "fault.do_swap_page",
             "fault.do_numa_page", "fault.map_pages", "fault.migrate_to_ram", "fault.hugetlb_fault")
declare("fault.spurious", "faults on entries that already allowed the access (only young/dirty set)")
declare("fault.user_error", "user accesses that ended in SIGSEGV/SIGBUS (the CPU's fault loop gave up)")
_declare_all("THP events named like their /proc/vmstat items (thp_fault_alloc, thp_split_pmd, ...)",
             "thp.fault_alloc", "thp.fault_fallback", "thp.zero_page_alloc", "thp.wp_reuse", "thp.collapse_alloc",
             "thp.split_zero_page",
             "thp.split_pmd", "thp.split_page")
declare("thp.fault_device_private_pmd", "CPU faults on 7.3 device-private PMDs that reached the "
        "pagemap's migrate_to_ram (do_huge_pmd_device_private)")
_declare_all("hugetlb folio events (alloc_hugetlb_folio, free_huge_folio, hugetlb_wp copies)",
             "hugetlb.alloc", "hugetlb.free", "hugetlb.cow")
_declare_all("mm syscalls and teardown (do_mmap, do_munmap, mprotect, mremap, madvise, exit_mmap)",
             "mm.mmap", "mm.munmap", "mm.mprotect", "mm.mremap", "mm.madvise", "mm.exit_mmap",
             "mm.overcommit_refused")
_declare_all("VMA tree changes (__split_vma, vma_merge)", "vma.split", "vma.merge")
declare("mprotect.change_protection", "change_protection() calls")
declare("mremap.move_page_tables", "move_page_tables() calls")
declare("madvise.free", "madvise_free_single_vma() calls")
declare("proc.clear_refs", "writes to /proc/PID/clear_refs")
declare("zap.unmap_single_vma", "unmap_single_vma() calls")
declare("zap.pte_table_reclaimed", "empty pte tables freed while zapping (reclaim_pt_is_enabled)")
declare("fork.copy_page_range", "copy_page_range() calls")
declare("fork.copy_present_page", "pinned exclusive anon pages copied for the child at fork (copy_present_page)")
_declare_all("task lifetime (fork, exit)", "task.fork", "task.exit")
declare("page.free", "pages returned to the allocator")
declare("shmem.alloc", "shmem folios allocated")
declare("uffd.new", "userfaultfd() files created")
declare("uffd.register", "UFFDIO_REGISTER calls that registered a range")
declare("uffd.copy", "UFFDIO_COPY calls that filled pages")
declare("uffd.handle_userfault", "faults handed to handle_userfault()")
declare("uffd.sigbus_no_retry", "userfaultfd faults failed with SIGBUS: the fault could not drop mmap_lock")
_declare_all("swap (pages written out by reclaim, pages read back in by do_swap_page)",
             "swap.pageout", "swap.swapin")
_declare_all("migration (migration entry waits, try_to_migrate, remove_migration_ptes, "
             "migrate_pages)", "migrate.entry_wait", "migrate.try_to_migrate",
             "migrate.remove_migration_ptes", "migrate.pages")
_declare_all("PMD migration entries installed (set_pmd_migration_entry) and removed "
             "(remove_migration_pmd)", "migrate.set_pmd_migration_entry", "migrate.remove_migration_pmd")
_declare_all("mm/gup.c (follow_page_mask and faultin_page calls, pages taken by gup_fast, "
             "FOLL_LONGTERM rounds that migrated pages first)",
             "gup.follow_page_mask", "gup.faultin_page", "gup.fast", "gup.longterm_migrated")
_declare_all("device-exclusive access (make_device_exclusive_range / make_device_exclusive "
             "calls, entries restored by a CPU fault and by fork)",
             "rmap.make_device_exclusive_range", "rmap.make_device_exclusive",
             "fault.remove_device_exclusive_entry", "fork.restore_exclusive_pte")
declare("migrate_device.coherent_folio", "migrate_device_coherent_folio() calls")
declare("gup_test.warn", "gup_test WARNs: a pinned page that is not dma-pinned or not long-term pinnable")
_declare_all("ZONE_DEVICE (pages of memremap_pages() ranges, free_zone_device_folio() calls, "
             "pages of memunmap_pages() ranges)", "memremap.pages", "memremap.page_free",
             "memremap.unmap_pages")
# -- page tables and the walker -------------------------------------------------------------------
_declare_all("page-table pages allocated at that level (l1 = pte table ... l4 = pgd)",
             "pgtable.alloc.l1", "pgtable.alloc.l2", "pgtable.alloc.l3", "pgtable.alloc.l4")
declare("pgtable.pte_offset_map", "pte_offset_map()/pte_offset_map_lock() calls")
declare("pgtable.pte_offset_map_lock", "pte_offset_map_lock() calls")
_declare_all("page-table entries written (set_pte_at, set_pmd_at, set_pud_at, set_pgd)",
             "pgtable.set_pte", "pgtable.set_pmd", "pgtable.set_pud", "pgtable.set_pgd")
declare("walk_page_range", "walk_page_range() calls")
_declare_all("mm/pagewalk.c: tables visited and callbacks invoked, by level",
             "walk.pgd_table", "walk.pud_table", "walk.pmd_table", "walk.pte_table",
             "walk.pud_entry", "walk.pmd_entry", "walk.pte_entry", "walk.pte_hole",
             "walk.hugetlb_entry", "walk.test_walk")
declare("walk.pte_entries", "pte entries examined by a pmd_entry callback that handles the leaf table "
        "(hmm_vma_walk_pmd, migrate_vma_collect_pmd)")
# -- mmu notifiers --------------------------------------------------------------------------------
_declare_all("mm/mmu_notifier.c calls", "mmu_notifier.invalidate_range_start",
             "mmu_notifier.invalidate_range_end", "mmu_notifier.interval_invalidate",
             "mmu_notifier.interval_insert", "mmu_notifier.interval_remove",
             "mmu_notifier.release")
#: ``enum mmu_notifier_event`` without its ``MMU_NOTIFY_`` prefix
MMU_NOTIFY_EVENTS = ("UNMAP", "CLEAR", "PROTECTION_VMA", "PROTECTION_PAGE", "SOFT_DIRTY",
                     "RELEASE", "MIGRATE", "EXCLUSIVE")
_declare_all("invalidate_range_start() calls by enum mmu_notifier_event",
             *(f"mmu_notifier.event.{e}" for e in MMU_NOTIFY_EVENTS))
# -- hmm ------------------------------------------------------------------------------------------
declare("hmm.range_fault", "hmm_range_fault() calls")
declare("hmm.range_fault.ebusy", "hmm_range_fault() calls that returned -EBUSY (range invalidated)")
declare("hmm.dma_map", "pages mapped by hmm_dma_map_pfn()")
declare("hmm.dma_unmap", "pages unmapped by hmm_dma_unmap_pfn()")
declare("hmm.range_fault.timeout", "hmm_range_fault_unlocked_timeout() calls that ran out of their retry budget (-EBUSY)")
declare("hmm.walk", "walk_page_range() passes of hmm_range_fault() (1 + restarts after a fault)")
declare("hmm.vma_fault", "hmm_vma_fault() spans (faults of a range on behalf of hmm_range_fault)")
declare("hmm.do_fault", "hmm_do_fault() spans (7.3: the recorded range faulted after the walk)")
declare("hmm.warn_broken_fault_handler", "hmm_do_fault(): WARN_ON_ONCE, a fault dropped "
        "mmap_lock though the caller cannot take that")
declare("hmm.warn_fault_errno", "hmm_do_fault(): WARN_ON, a failed fault with no errno")
# -- lib/test_hmm.c -------------------------------------------------------------------------------
#: the HMM_DMIRROR_* ioctls without their prefix, lower case (``unknown``: any other number)
DMIRROR_IOCTLS = ("read", "write", "migrate_to_dev", "migrate_to_sys", "snapshot", "exclusive",
                  "check_exclusive", "release", "flags", "read_unlocked", "migrate_on_fault_to_dev",
                  "unknown")
_declare_all("dmirror_fops_unlocked_ioctl() calls by command (after argument checks)",
             *(f"dmirror.ioctl.{c}" for c in DMIRROR_IOCTLS))
declare("dmirror.chunks", "device memory chunks allocated (dmirror_allocate_chunk)")
declare("dmirror.chunks_removed", "device memory chunks removed (dmirror_device_remove_chunks)")
declare("dmirror.warn_already_device", "WARNs: a page selected for MIGRATE_TO_DEV is already a device page")
declare("dmirror.warn_not_device", "WARN_ONs: a page selected for migration to RAM is not a device page")
declare("migrate_vma.setup", "migrate_vma_setup() calls that collected a range")
declare("migrate_vma.finalize", "migrate_vma_finalize() calls")
declare("dmirror.invalidate", "dmirror_interval_invalidate() calls that cleared mirror entries")
declare("dmirror.warn_readonly_write", "writes refused on a read-only mirror entry")
declare("dmirror.release", "dmirror_fops_release() calls")
declare("dmirror.warn_thp_fallback_alloc", "order-0 device pages that failed in 7.3's THP "
        "fallback of dmirror_migrate_alloc_and_copy (the kernel dereferences NULL there)")
declare("memremap.warn_conflicting_mapping", "WARNs \"Conflicting mapping in same section\" "
        "(memremap_pages() of a range whose first or last pfn has a pagemap: -ENOMEM)")
declare("hmm.migrate.range_fault", "hmm_range_fault() calls of the unified fault+migrate walk")
declare("hmm.migrate.notifier_bracket", "MMU_NOTIFY_MIGRATE invalidations of the unified walk (one per "
        "call that captured a VMA, ended on every exit)")
declare("hmm.migrate.erange", "unified walks that met a second VMA (-ERANGE)")
declare("hmm.migrate.split_retry", "THPs the unified walk split, restarting the walk at the PMD")
declare("hmm.migrate.abort", "unified walks whose prepared migration entries were removed again "
        "(a failed call, or a result the driver dropped)")
declare("dmirror.migrate_on_fault.chunk", "64-page chunks MIGRATE_ON_FAULT_TO_DEV faulted and migrated")
declare("dmirror.migrate_on_fault.stale", "MIGRATE_ON_FAULT_TO_DEV results dropped (and their migration "
        "undone) because the interval sequence moved before the mirror update")
declare("migrate_vma.collect_huge_pmd", "THPs / device-private PMDs collected whole as one "
        "compound entry (7.3, migrate_vma_collect_huge_pmd)")
declare("migrate_vma.split_unmapped_folio", "compound entries split after unmapping because "
        "the destination is order 0 (7.3, migrate_vma_split_unmapped_folio)")
# -- locking --------------------------------------------------------------------------------------
declare("lockdep.warning", "lockdep reports the kernel survives (LockState.warnings)")


def declare_lock_class(klass: str) -> None:
    """Declare ``lock.<klass>.read`` and ``lock.<klass>.write`` (lockdep's lock class
    registration: :class:`~hmmsim.kernel.locking.Lock` calls it for its class)."""
    declare(f"lock.{klass}.read", f"{klass} taken for read (down_read, read_lock)")
    declare(f"lock.{klass}.write", f"{klass} taken for write (down_write, spin_lock, mutex_lock)")


#: lock classes known ahead of any Lock object (those taken by identity, not through a Lock)
LOCK_CLASSES = ("mmap_lock", "page_table_lock", "ptl", "pmd_lock", "hugetlb_vma_lock",
                "folio_lock", "dmirror_devmem_lock", "dmirror_device_lock", "dmirror_mutex",
                "mirror_lock")
for _k in LOCK_CLASSES:
    declare_lock_class(_k)


class UnknownCounterError(KeyError):
    """A counter key that is not declared in :data:`COUNTERS` (likely a misspelling)."""

    def __init__(self, key: str) -> None:
        close = difflib.get_close_matches(key, COUNTERS, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"undeclared stats key {key!r}{hint} (declare counters in "
                         f"hmmsim/kernel/stats.py)")
        self.key = key
        self.close_matches = close

    def __str__(self) -> str:
        return str(self.args[0])


def _declared_zero(key: str) -> int:
    """0 for a declared key (declared after the Stats object was built); raise otherwise."""
    if key in COUNTERS:
        return 0
    raise UnknownCounterError(key)


class StatsDelta(Counter[str]):
    """What :meth:`Stats.measure` yields: a ``Counter`` whose missing keys read 0 only if
    they are declared counters.

    >>> d = StatsDelta(); d["walk_page_range"]
    0
    >>> d["walk_page_rang"]  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hmmsim.kernel.stats.UnknownCounterError: undeclared stats key 'walk_page_rang'; did you mean 'walk_page_range' or ...
    """

    def __missing__(self, key: str) -> int:
        return _declared_zero(key)


class Stats:
    """Counters of a simulated machine, readable through :meth:`snapshot` and :meth:`measure`.

    >>> s = Stats(); s.add("walk_page_range"); s["walk_page_range"]
    1
    >>> s["fault.do_cow_fault"]
    0
    >>> s.add("fault.do_anon_page")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hmmsim.kernel.stats.UnknownCounterError: undeclared stats key 'fault.do_anon_page'; did you mean 'fault.do_anonymous_page' or ...
    """

    __slots__ = ("_c",)

    def __init__(self) -> None:
        # every declared key is present, so add() of a declared key is one dict update
        # and an undeclared one falls into the KeyError path
        self._c: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def add(self, key: str, n: int = 1) -> None:
        """Count *n* events of kind *key* (a declared counter)."""
        try:
            self._c[key] += n
            return
        except KeyError:
            pass
        self._c[key] = _declared_zero(key) + n

    def __getitem__(self, key: str) -> int:
        try:
            return self._c[key]
        except KeyError:
            pass
        return _declared_zero(key)

    def counts(self, keys: Iterable[str]) -> list[int]:
        """The values of *keys*, in order (declared keys only)."""
        return [self[k] for k in keys]

    def snapshot(self, prefix: str = "") -> dict[str, int]:
        """Return the non-zero counters (those starting with *prefix*), sorted by name."""
        return {k: v for k, v in sorted(self._c.items()) if v and k.startswith(prefix)}

    def save(self, keys: Iterable[str] | None = None) -> dict[str, int]:
        """The current values of *keys* (every counter when None), for :meth:`restore`."""
        if keys is None:
            return dict(self._c)
        return {k: self[k] for k in keys}

    def restore(self, saved: dict[str, int]) -> None:
        """Put back counters from :meth:`save`: undo what a model-internal attempt counted
        (e.g. a batched walk that must be redone window by window). With a full save, counters
        first touched after it go back to zero."""
        if len(saved) >= len(self._c):
            for k in self._c:
                self._c[k] = saved.get(k, 0)
        else:
            self._c.update(saved)

    def reset(self) -> None:
        """Zero every counter."""
        for k in self._c:
            self._c[k] = 0

    @contextmanager
    def measure(self) -> Iterator[StatsDelta]:
        """Yield a :class:`StatsDelta` that holds, once the block ends, what happened inside it.

        >>> s = Stats()
        >>> with s.measure() as d:
        ...     s.add("fault.do_anonymous_page", 3)
        >>> d["fault.do_anonymous_page"], d["fault.do_wp_page"]
        (3, 0)
        """
        before = dict(self._c)
        delta = StatsDelta()
        try:
            yield delta
        finally:
            for k, v in self._c.items():
                dv = v - before.get(k, 0)
                if dv:
                    delta[k] = dv
