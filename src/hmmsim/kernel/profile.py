"""Kernel release profiles: the named behaviours that differ between the releases hmmsim
models.

Code never compares version strings; it asks the machine's profile for a feature
(``sys.profile.hmm_fault_outside_walk``) at the place where the two releases differ, and
cites the change there. Each field below says what the feature is and which release has
it; every one of them has a test under both profiles.

>>> from hmmsim.kernel.profile import get_profile
>>> p = get_profile("6.12")
>>> p.hmm_pfn_order_shift, p.hmm_pfn_sticky_flags, p.dmirror_window
(56, False, 64)
>>> get_profile("7.3").hmm_pfn_order_shift
53
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

__all__ = ("DEFAULT_KERNEL", "KERNELS", "MIGRATE_ON_FAULT_PFN_ORDER_SHIFT", "Profile", "get_profile",
           "with_migrate_on_fault")


@dataclass(frozen=True, slots=True)
class Profile:
    """The behaviours of one kernel release that the model branches on."""

    #: release name as given to ``System(kernel=...)`` and ``--kernel``
    name: str
    #: ``HMM_PFN_ORDER_SHIFT``: 56 (``BITS_PER_LONG - 8``) in 6.12; 53
    #: (``BITS_PER_LONG - 11``) once the DMA_MAPPED/P2PDMA/P2PDMA_BUS bits took 60..58
    hmm_pfn_order_shift: int
    #: HMM_PFN_DMA_MAPPED / P2PDMA / P2PDMA_BUS exist and are carried from input to output
    #: (``HMM_PFN_INOUT_FLAGS``, 7.3); in 6.12 every output overwrites the whole entry
    hmm_pfn_sticky_flags: bool
    #: walk callbacks only record the fault (``hmm_record_fault`` -> HMM_FAULT_PENDING) and
    #: ``hmm_do_fault`` runs ``handle_mm_fault`` after the walk unwound, holding no
    #: page-table or hugetlb VMA lock (7.3); 6.12 faults inside the callbacks
    #: (``hmm_vma_fault``), re-taking the hugetlb VMA lock inside the walk
    hmm_fault_outside_walk: bool
    #: a failed fault returns ``vm_fault_to_errno()`` (-ENOMEM for OOM, -EHWPOISON, ...)
    #: (7.3); 6.12 returns -EFAULT for every VM_FAULT_ERROR
    hmm_fault_errno: bool
    #: only a uffd-wp pte marker reads as none in ``hmm_vma_handle_pte`` (7.3); 6.12's
    #: ``pte_none_mostly()`` treats every pte marker as none
    hmm_only_uffd_wp_marker_is_none: bool
    #: non-present PMDs go to ``hmm_vma_handle_absent_pmd``: a device-private PMD of the
    #: caller's owner is reported VALID with order 9, others fault (7.3,
    #: CONFIG_ARCH_HAS_PMD_SOFTLEAVES); 6.12 answers every non-present PMD as ERROR/-EFAULT
    hmm_device_private_pmd: bool
    #: ``pte_devmap``/``pmd_devmap``/``pud_devmap`` exist (6.12): HMM reports a devmap pte
    #: although ``vm_normal_page()`` is NULL and only devmap PUD leaves are mirrored;
    #: 7.3 removed devmap (every PUD leaf is mirrored)
    pte_devmap: bool
    #: a write fault on a huge zero PMD allocates a THP (``do_huge_zero_wp_pmd``, 7.3);
    #: 6.12 splits the PMD and the write fault COWs one 4 KiB page
    huge_zero_wp_allocates_thp: bool
    #: a write fault on a read-only pte of a PTE-mapped large anon folio reuses the page
    #: (no copy, no MMU_NOTIFY_CLEAR) when every reference is a mapping of this mm
    #: (7.3, ``mm/memory.c:__wp_can_reuse_large_anon_folio``); 6.12's
    #: ``wp_can_reuse_anon_folio()`` copies every page of a large folio
    wp_reuse_large_anon_folio: bool
    #: ``mremap(MREMAP_FIXED)`` with old_len == new_len moves every VMA of the range,
    #: keeping the gaps (7.3, ``mm/mremap.c:remap_move``); 6.12 returns -EFAULT when the
    #: range is not inside one VMA
    mremap_move_multiple_vmas: bool
    #: ``struct mmu_interval_notifier_ops`` has ``invalidate_start``/``invalidate_finish``:
    #: two-pass interval invalidation, every finish pass after all first passes
    #: (7.3, ``mm/mmu_notifier.c:mn_itree_invalidate``/``mn_itree_finish_pass``)
    mmu_interval_two_pass: bool
    #: MADV_DONTNEED frees a pte table whose whole 2 MiB span it emptied and clears the
    #: pmd (7.3, CONFIG_PT_RECLAIM: ``madvise_dontneed_single_vma`` zaps with
    #: ``reclaim_pt``, ``mm/memory.c:zap_pte_range``), so the next fault there can map a
    #: THP or the huge zero page; 6.12 keeps the empty table (4 KiB faults from then on)
    madv_dontneed_frees_pte_tables: bool
    #: entries of dmirror's on-stack pfn arrays in ``dmirror_fault``/``dmirror_snapshot``
    #: (64 in 6.12, 32 in 7.3)
    dmirror_window: int
    #: test_hmm has ``HMM_DMIRROR_FLAGS`` with ``HMM_DMIRROR_FLAG_FAIL_ALLOC`` (7.3)
    dmirror_flags_cmd: bool
    #: test_hmm has ``HMM_DMIRROR_READ_UNLOCKED`` (7.3)
    dmirror_read_unlocked_cmd: bool
    #: ``hmm_dma_map_alloc/free/map_pfn/unmap_pfn`` exist (6.16+: 7.3, not 6.12)
    hmm_dma_map_helpers: bool
    #: device-private THP: whole PMD-sized folios migrate to device memory (7.3)
    device_private_thp: bool
    #: test_hmm's MIGRATE_TO_DEV gives a hole or zero page of a writable VMA a writable
    #: device page (mirror entry tagged WRITE) although the source has no
    #: MIGRATE_PFN_WRITE (6.12); 7.3 takes the write flag from the source only
    dmirror_hole_migrates_writable: bool
    #: ``make_device_exclusive()`` one page at a time (7.3); 6.12 has
    #: ``make_device_exclusive_range()``, which fails with -EBUSY on a THP tail
    per_page_device_exclusive: bool
    #: a device-exclusive entry still counts as a mapping of its page (rmap and mapcount
    #: kept), has one type (no read/write variants, so mprotect leaves it alone), and the
    #: CPU fault restoring it makes the pte writable where ``can_change_pte_writable()``
    #: allows, under an MMU_NOTIFY_CLEAR invalidation (7.3, the device-exclusive rework of
    #: 6.15); 6.12 removes the page's rmap when it makes the entry, keeps the reference,
    #: and restores under MMU_NOTIFY_EXCLUSIVE, writable only from a writable entry
    device_exclusive_mapped: bool
    #: RAM pages the reference VM's kernel keeps out of ``totalram_pages()`` besides its
    #: struct page array (1/64 of RAM): image, early allocations. Measured with
    #: ``kernel-run`` (the largest private anonymous mmap the overcommit heuristic accepts);
    #: a property of that build (6.12: 3254, 7.3: 2680), used by ``reference_config()``
    boot_reserved_pages: int
    #: the unified fault+migrate walk of the "Migrate on fault for device pages" series
    #: (seed 003, v2; never merged): ``HMM_PFN_REQ_MIGRATE``/``HMM_PFN_MIGRATE``/
    #: ``HMM_PFN_COMPOUND`` (the order field moves down to bit 51), ``hmm_range.migrate``,
    #: ``MIGRATE_VMA_FAULT``, ``migrate_vma_setup()`` rebuilt on ``hmm_range_fault()``
    #: and test_hmm's MIGRATE_ON_FAULT_TO_DEV. In no release: an option on top of 7.3
    #: (``System(kernel="7.3", migrate_on_fault=True)``, :func:`with_migrate_on_fault`)
    hmm_migrate_on_fault: bool = False

    def with_(self, **changes: object) -> "Profile":
        """A copy with some features changed (for tests that isolate one feature)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def features(self) -> dict[str, object]:
        """Every feature by name (for reports and ``hmmsim --version``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


KERNELS: dict[str, Profile] = {
    "6.12": Profile(
        name="6.12",
        hmm_pfn_order_shift=56,
        hmm_pfn_sticky_flags=False,
        hmm_fault_outside_walk=False,
        hmm_fault_errno=False,
        hmm_only_uffd_wp_marker_is_none=False,
        hmm_device_private_pmd=False,
        pte_devmap=True,
        huge_zero_wp_allocates_thp=False,
        wp_reuse_large_anon_folio=False,
        mremap_move_multiple_vmas=False,
        mmu_interval_two_pass=False,
        madv_dontneed_frees_pte_tables=False,
        dmirror_window=64,
        dmirror_flags_cmd=False,
        dmirror_read_unlocked_cmd=False,
        hmm_dma_map_helpers=False,
        device_private_thp=False,
        dmirror_hole_migrates_writable=True,
        per_page_device_exclusive=False,
        device_exclusive_mapped=False,
        boot_reserved_pages=3254,
        hmm_migrate_on_fault=False,
    ),
    "7.3": Profile(
        name="7.3",
        hmm_pfn_order_shift=53,
        hmm_pfn_sticky_flags=True,
        hmm_fault_outside_walk=True,
        hmm_fault_errno=True,
        hmm_only_uffd_wp_marker_is_none=True,
        hmm_device_private_pmd=True,
        pte_devmap=False,
        huge_zero_wp_allocates_thp=True,
        wp_reuse_large_anon_folio=True,
        mremap_move_multiple_vmas=True,
        mmu_interval_two_pass=True,
        madv_dontneed_frees_pte_tables=True,
        dmirror_window=32,
        dmirror_flags_cmd=True,
        dmirror_read_unlocked_cmd=True,
        hmm_dma_map_helpers=True,
        device_private_thp=True,
        dmirror_hole_migrates_writable=False,
        per_page_device_exclusive=True,
        device_exclusive_mapped=True,
        boot_reserved_pages=2680,
        hmm_migrate_on_fault=False,
    ),
}

#: the release a System models unless told otherwise (the newest)
DEFAULT_KERNEL = "7.3"


def get_profile(kernel: str) -> Profile:
    """The profile of release *kernel*; ValueError naming the supported ones otherwise."""
    try:
        return KERNELS[kernel]
    except KeyError:
        raise ValueError(f"kernel {kernel!r} is not modelled; supported: "
                         f"{', '.join(KERNELS)}") from None


#: ``HMM_PFN_ORDER_SHIFT`` of the series' layout (``BITS_PER_LONG - 13``): MIGRATE took bit 57
#: and COMPOUND bit 56, below 7.3's P2PDMA_BUS (58)
MIGRATE_ON_FAULT_PFN_ORDER_SHIFT = 51


def with_migrate_on_fault(profile: Profile) -> Profile:
    """*profile* with the unified fault+migrate walk switched on (``hmm_migrate_on_fault``
    and the series' pfn layout). The series was written against the HMM of 2026 (the
    7.3 code base: sticky inout flags, faults outside the walk, device-private THP); it is
    refused for any release without those (6.12): ValueError."""
    if not (profile.hmm_pfn_sticky_flags and profile.hmm_fault_outside_walk and profile.device_private_thp):
        raise ValueError(f"migrate_on_fault: the unified fault+migrate walk is modelled on top of 7.3 "
                         f"only, not on kernel {profile.name!r}")
    return replace(profile, hmm_migrate_on_fault=True, hmm_pfn_order_shift=MIGRATE_ON_FAULT_PFN_ORDER_SHIFT)
