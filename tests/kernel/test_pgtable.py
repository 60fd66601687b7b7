"""Page-table entry encoding (arch/x86/include/asm/pgtable*.h, include/linux/swapops.h,
include/linux/swap.h of 6.12) and the page-table store."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hmmsim.kernel.pgtable import (
    _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_NX, _PAGE_PRESENT, _PAGE_PROTNONE, _PAGE_PSE, _PAGE_RW,
    _PAGE_SOFT_DIRTY, _PAGE_SPECIAL, _PAGE_SWP_EXCLUSIVE, _PAGE_SWP_SOFT_DIRTY,
    _PAGE_SWP_UFFD_WP, _PAGE_USER, MAX_SWAPFILES, PAGE_COPY, PAGE_NONE, PAGE_READONLY,
    PAGE_SHARED, PTE_MARKER_GUARD, PTE_MARKER_POISONED, PTE_MARKER_UFFD_WP, PageTableStore,
    SWP_DEVICE_EXCLUSIVE_READ, SWP_DEVICE_EXCLUSIVE_WRITE, SWP_DEVICE_READ, SWP_DEVICE_WRITE,
    SWP_HWPOISON, SWP_MIGRATION_READ, SWP_MIGRATION_READ_EXCLUSIVE, SWP_MIGRATION_WRITE,
    SWP_PTE_MARKER, decode_pte, is_device_exclusive_entry, is_device_private_entry,
    is_hwpoison_entry, is_migration_entry, is_pte_marker_entry,
    is_readable_exclusive_migration_entry, is_swap_pte, is_writable_device_exclusive_entry,
    is_writable_device_private_entry, is_writable_migration_entry, make_hwpoison_entry,
    make_pte_marker_entry, make_readable_device_exclusive_entry,
    make_readable_device_private_entry, make_readable_exclusive_migration_entry,
    make_readable_migration_entry, make_writable_device_exclusive_entry,
    make_writable_device_private_entry, make_writable_migration_entry, mk_table_entry,
    non_swap_entry, pfn_pte, pfn_swap_entry_to_pfn, pmd_leaf, pte_dirty, pte_marker_get,
    pte_mkclean, pte_mkdirty, pte_mkold, pte_mkspecial, pte_mkwrite, pte_mkyoung, pte_modify,
    pte_none, pte_pfn, pte_present, pte_present_mask, pte_protnone, pte_special,
    pte_swp_exclusive, pte_swp_soft_dirty, pte_swp_uffd_wp, pte_to_swp_entry, pte_write,
    pte_wrprotect, pte_young, swp_entry, swp_entry_to_pte, swp_offset, swp_offset_pfn, swp_type,
    table_id,
)

#: (constructor, swap type, decode_pte name) of every pfn-carrying swap-format entry
PFN_ENTRIES = [
    (make_readable_migration_entry, SWP_MIGRATION_READ, "migration-read"),
    (make_readable_exclusive_migration_entry, SWP_MIGRATION_READ_EXCLUSIVE, "migration-read-exclusive"),
    (make_writable_migration_entry, SWP_MIGRATION_WRITE, "migration-write"),
    (make_readable_device_private_entry, SWP_DEVICE_READ, "device-private-read"),
    (make_writable_device_private_entry, SWP_DEVICE_WRITE, "device-private-write"),
    (make_readable_device_exclusive_entry, SWP_DEVICE_EXCLUSIVE_READ, "device-exclusive-read"),
    (make_writable_device_exclusive_entry, SWP_DEVICE_EXCLUSIVE_WRITE, "device-exclusive-write"),
    (make_hwpoison_entry, SWP_HWPOISON, "hwpoison"),
]

PREDICATES = {
    "migration": is_migration_entry,
    "migration_write": is_writable_migration_entry,
    "migration_read_excl": is_readable_exclusive_migration_entry,
    "device_private": is_device_private_entry,
    "device_private_write": is_writable_device_private_entry,
    "device_exclusive": is_device_exclusive_entry,
    "device_exclusive_write": is_writable_device_exclusive_entry,
    "hwpoison": is_hwpoison_entry,
    "marker": is_pte_marker_entry,
}

#: which predicates hold for each swap type (include/linux/swapops.h)
EXPECTED = {
    SWP_MIGRATION_READ: {"migration"},
    SWP_MIGRATION_READ_EXCLUSIVE: {"migration", "migration_read_excl"},
    SWP_MIGRATION_WRITE: {"migration", "migration_write"},
    SWP_DEVICE_READ: {"device_private"},
    SWP_DEVICE_WRITE: {"device_private", "device_private_write"},
    SWP_DEVICE_EXCLUSIVE_READ: {"device_exclusive"},
    SWP_DEVICE_EXCLUSIVE_WRITE: {"device_exclusive", "device_exclusive_write"},
    SWP_HWPOISON: {"hwpoison"},
    SWP_PTE_MARKER: {"marker"},
}

pfns = st.integers(min_value=0, max_value=(1 << 40) - 1)


# -- swap types --------------------------------------------------------------------------------------
def test_swap_type_numbering_6_12() -> None:
    # MAX_SWAPFILES = (1 << 5) - SWP_DEVICE_NUM(4) - SWP_MIGRATION_NUM(3) - SWP_HWPOISON_NUM(1)
    #                 - SWP_PTE_MARKER_NUM(1)
    assert MAX_SWAPFILES == 32 - 4 - 3 - 1 - 1 == 23
    assert SWP_HWPOISON == MAX_SWAPFILES
    assert (SWP_MIGRATION_READ, SWP_MIGRATION_READ_EXCLUSIVE, SWP_MIGRATION_WRITE) == (24, 25, 26)
    assert (SWP_DEVICE_WRITE, SWP_DEVICE_READ, SWP_DEVICE_EXCLUSIVE_WRITE, SWP_DEVICE_EXCLUSIVE_READ) == (27, 28, 29, 30)
    assert SWP_PTE_MARKER == 31


@pytest.mark.parametrize(("make", "type_", "name"), PFN_ENTRIES, ids=[n for _, _, n in PFN_ENTRIES])
@given(pfn=pfns)
def test_swp_entry_roundtrip_pfn_entries(make, type_: int, name: str, pfn: int) -> None:  # noqa: ANN001
    ent = make(pfn)
    assert swp_type(ent) == type_ and non_swap_entry(ent)
    assert swp_offset_pfn(ent) == pfn == pfn_swap_entry_to_pfn(ent)
    pte = swp_entry_to_pte(ent)
    # a swap-format pte is never present nor protnone, and never none
    assert not pte_present(pte) and not pte_protnone(pte) and not pte_none(pte)
    assert is_swap_pte(pte) and not pmd_leaf(pte)
    assert pte_to_swp_entry(pte) == ent
    assert {k for k, f in PREDICATES.items() if f(ent)} == EXPECTED[type_]
    assert decode_pte(pte) == f"{name} offset {pfn:#x}"


@given(pfn=pfns, sd=st.booleans(), wp=st.booleans(), excl=st.booleans())
def test_swp_pte_software_bits_do_not_change_entry(pfn: int, sd: bool, wp: bool, excl: bool) -> None:
    for make, type_, _ in PFN_ENTRIES:
        pte = swp_entry_to_pte(make(pfn))
        pte |= (_PAGE_SWP_SOFT_DIRTY if sd else 0) | (_PAGE_SWP_UFFD_WP if wp else 0) | (
            _PAGE_SWP_EXCLUSIVE if excl else 0)
        assert pte_to_swp_entry(pte) == make(pfn)
        assert pte_swp_soft_dirty(pte) == sd and pte_swp_uffd_wp(pte) == wp and pte_swp_exclusive(pte) == excl
        assert not pte_present(pte) and is_swap_pte(pte)


@given(type_=st.integers(0, MAX_SWAPFILES - 1), offset=st.integers(1, (1 << 42) - 1))
def test_swp_entry_roundtrip_real_swap(type_: int, offset: int) -> None:
    ent = swp_entry(type_, offset)
    assert swp_type(ent) == type_ and swp_offset(ent) == offset
    assert not non_swap_entry(ent)
    assert not any(f(ent) for f in PREDICATES.values())
    pte = swp_entry_to_pte(ent)
    assert pte_to_swp_entry(pte) == ent and is_swap_pte(pte) and not pte_present(pte)
    assert decode_pte(pte) == f"swap-type-{type_} offset {offset:#x}"


@pytest.mark.parametrize("marker", [PTE_MARKER_UFFD_WP, PTE_MARKER_POISONED, PTE_MARKER_GUARD,
                                    PTE_MARKER_UFFD_WP | PTE_MARKER_GUARD])
def test_pte_marker_roundtrip(marker: int) -> None:
    ent = make_pte_marker_entry(marker)
    assert is_pte_marker_entry(ent) and non_swap_entry(ent) and swp_type(ent) == SWP_PTE_MARKER
    assert pte_marker_get(ent) == marker
    pte = swp_entry_to_pte(ent)
    assert pte_marker_get(pte_to_swp_entry(pte)) == marker
    assert not pte_present(pte) and is_swap_pte(pte)
    assert {k for k, f in PREDICATES.items() if f(ent)} == {"marker"}
    assert decode_pte(pte) == f"pte-marker offset {marker:#x}"


def test_pte_marker_values() -> None:
    # include/linux/swapops.h: PTE_MARKER_UFFD_WP BIT(0), PTE_MARKER_POISONED BIT(1),
    # PTE_MARKER_GUARD BIT(2)
    assert (PTE_MARKER_UFFD_WP, PTE_MARKER_POISONED, PTE_MARKER_GUARD) == (1, 2, 4)


def test_swp_entry_pfn_in_pte_pfn_field() -> None:
    # the offset sits where a present entry keeps its pfn: pte_pfn() of a migration pte
    # reads the same pfn (the model does not invert the offset, unlike x86)
    pte = swp_entry_to_pte(make_writable_migration_entry(0x12345))
    assert pte_pfn(pte) == 0x12345


# -- present entries ---------------------------------------------------------------------------------
def test_x86_bit_positions() -> None:
    assert _PAGE_PRESENT == 1 << 0 and _PAGE_RW == 1 << 1 and _PAGE_USER == 1 << 2
    assert _PAGE_ACCESSED == 1 << 5 and _PAGE_DIRTY == 1 << 6 and _PAGE_PSE == 1 << 7
    assert _PAGE_PROTNONE == 1 << 8 and _PAGE_SPECIAL == 1 << 9 and _PAGE_SOFT_DIRTY == 1 << 11
    assert _PAGE_NX == 1 << 63
    # swap-format software bits reuse RW, USER and PSE
    assert (_PAGE_SWP_SOFT_DIRTY, _PAGE_SWP_UFFD_WP, _PAGE_SWP_EXCLUSIVE) == (_PAGE_RW, _PAGE_USER, _PAGE_PSE)


def test_protection_map_x86() -> None:
    assert PAGE_NONE & _PAGE_PROTNONE and not PAGE_NONE & _PAGE_PRESENT
    assert PAGE_READONLY & _PAGE_PRESENT and not PAGE_READONLY & _PAGE_RW
    # private writable mappings start read-only (copy-on-write)
    assert PAGE_COPY == PAGE_READONLY
    assert PAGE_SHARED == PAGE_READONLY | _PAGE_RW


@given(pfn=st.integers(0, (1 << 40) - 1))
def test_pfn_pte_roundtrip(pfn: int) -> None:
    e = pfn_pte(pfn, PAGE_SHARED)
    assert pte_pfn(e) == pfn and pte_present(e) and pte_write(e) and not pte_protnone(e)
    assert not is_swap_pte(e) and not pte_none(e)


def test_pte_present_and_protnone_semantics() -> None:
    pfn = 0x4321
    ro = pfn_pte(pfn, PAGE_READONLY)
    none_prot = pfn_pte(pfn, PAGE_NONE)
    assert pte_present(ro) and not pte_protnone(ro)
    # PROT_NONE / NUMA-hinting: not hardware-present, yet pte_present() is true
    assert pte_present(none_prot) and pte_protnone(none_prot)
    assert not none_prot & _PAGE_PRESENT and pte_pfn(none_prot) == pfn
    assert not is_swap_pte(none_prot)
    # an entry with both bits set is present and not protnone (x86 _PAGE_GLOBAL reuse)
    assert pte_present(ro | _PAGE_PROTNONE) and not pte_protnone(ro | _PAGE_PROTNONE)
    assert pte_none(0) and not pte_present(0) and not is_swap_pte(0)


def test_pte_modify_keeps_pfn_and_software_bits() -> None:
    e = pte_mkspecial(pte_mkdirty(pte_mkyoung(pfn_pte(0x777, PAGE_SHARED))))
    assert pte_dirty(e) and pte_young(e) and pte_special(e) and e & _PAGE_SOFT_DIRTY
    n = pte_modify(e, PAGE_NONE)
    assert pte_protnone(n) and pte_pfn(n) == 0x777
    assert pte_dirty(n) and pte_young(n) and pte_special(n) and not pte_write(n)
    back = pte_modify(n, PAGE_SHARED)
    assert back == e
    huge = pfn_pte(0x200, PAGE_READONLY) | _PAGE_PSE
    assert pte_modify(huge, PAGE_NONE) & _PAGE_PSE


def test_pte_bit_helpers() -> None:
    e = pfn_pte(0x99, PAGE_READONLY)
    assert not pte_write(e) and pte_write(pte_mkwrite(e)) and not pte_write(pte_wrprotect(pte_mkwrite(e)))
    assert pte_dirty(pte_mkdirty(e)) and not pte_dirty(pte_mkclean(pte_mkdirty(e)))
    assert pte_young(e) and not pte_young(pte_mkold(e))
    assert pte_pfn(pte_mkwrite(pte_mkdirty(e))) == 0x99


def test_pmd_leaf_and_table_entries() -> None:
    huge = pfn_pte(0x400, PAGE_SHARED) | _PAGE_PSE
    assert pmd_leaf(huge)
    assert pmd_leaf(pte_modify(huge, PAGE_NONE))  # a protnone huge pmd is still a leaf
    tbl = mk_table_entry(77)
    assert not pmd_leaf(tbl) and pte_present(tbl) and table_id(tbl) == 77
    assert not pmd_leaf(swp_entry_to_pte(make_writable_migration_entry(0x400)))


def test_decode_pte_output() -> None:
    assert decode_pte(0) == "none"
    e = pte_mkdirty(pte_mkyoung(pfn_pte(0x1234, PAGE_SHARED)))
    s = decode_pte(e)
    assert s.startswith("pfn 0x1234 ")
    flags = set(s.split(" ", 2)[2].split("|"))
    assert flags == {"PRESENT", "RW", "USER", "ACCESSED", "DIRTY", "SOFT_DIRTY", "NX"}
    z = decode_pte(pte_mkspecial(pfn_pte(1, PAGE_READONLY)))
    assert set(z.split(" ", 2)[2].split("|")) == {"PRESENT", "USER", "ACCESSED", "SPECIAL", "NX"}
    n = decode_pte(pfn_pte(5, PAGE_NONE))
    assert n == "pfn 0x5 ACCESSED|PROTNONE"


def test_pte_present_mask_matches_scalar() -> None:
    vals = [0, pfn_pte(3, PAGE_READONLY), pfn_pte(4, PAGE_NONE),
            swp_entry_to_pte(make_writable_device_private_entry(9)), mk_table_entry(5),
            swp_entry_to_pte(swp_entry(0, 7)) | _PAGE_SWP_EXCLUSIVE]
    arr = np.array(vals, dtype=np.uint64)
    assert pte_present_mask(arr).tolist() == [pte_present(v) for v in vals]
    assert pte_present_mask(arr).tolist() == [False, True, True, False, True, False]


# -- PageTableStore ----------------------------------------------------------------------------------
def test_page_table_store_alloc_free() -> None:
    pt = PageTableStore()
    a = pt.alloc(1)
    b = pt.alloc(2)
    assert a != b and a != 0 and b != 0  # id 0 is never used: a table pointer is never 0
    assert pt.nr_tables == 2
    assert pt.level[a] == 1 and pt.level[b] == 2
    assert not pt.table(a).any() and pt.table(a).shape == (512,) and pt.table(a).dtype == np.uint64
    pt.table(a)[7] = 123
    assert pt.table(a)[7] == 123 and not pt.table(b).any()
    assert pt.allocated_ids(1).tolist() == [a] and sorted(pt.allocated_ids().tolist()) == sorted([a, b])
    pt.free(b)
    assert pt.nr_tables == 1 and pt.level[b] == 0
    c = pt.alloc(3)
    assert c == b and not pt.table(c).any()  # the freed id is reused, zeroed


def test_page_table_store_free_non_empty_raises() -> None:
    pt = PageTableStore()
    t = pt.alloc(1)
    pt.table(t)[511] = pfn_pte(1, PAGE_READONLY)
    with pytest.raises(AssertionError):
        pt.free(t)
    assert pt.nr_tables == 1 and pt.level[t] == 1
    pt.table(t)[511] = 0
    pt.free(t)
    assert pt.nr_tables == 0


def test_page_table_store_views_stay_valid_while_growing() -> None:
    pt = PageTableStore()
    first = pt.alloc(1)
    view = pt.table(first)
    view[0] = 42
    ids = [pt.alloc(1) for _ in range(2100)]  # spans several storage blocks
    assert len(set(ids)) == 2100 and first not in ids
    view[1] = 43
    assert pt.table(first)[0] == 42 and pt.table(first)[1] == 43
    for i in ids:
        pt.free(i)
    assert pt.nr_tables == 1




# -- PMD predicates and device-private PMD entries ---------------------------------------------
from hmmsim.kernel.migrate import is_pmd_migration_entry  # noqa: E402
from hmmsim.kernel.pgtable import (  # noqa: E402
    _PAGE_DEVMAP, decode_pte_table, is_pmd_device_private_entry, is_swap_pmd, pmd_devmap,
    pmd_none, pmd_present, pmd_to_swp_entry, pmd_trans_huge, pte_is_uffd_wp_marker,
    swp_entry_to_pmd,
)


def test_pmd_none_present_swap_trans_huge() -> None:
    thp = pfn_pte(0x200, PAGE_SHARED) | _PAGE_PSE
    table = mk_table_entry(7)
    mig = swp_entry_to_pmd(make_writable_migration_entry(0x400))
    dpriv = swp_entry_to_pmd(make_writable_device_private_entry(0x800))
    numa = pfn_pte(0x200, PAGE_NONE) | _PAGE_PSE
    dax = thp | _PAGE_DEVMAP
    assert pmd_none(0) and not any(pmd_none(e) for e in (thp, table, mig, dpriv))
    assert [pmd_present(e) for e in (0, thp, table, mig, dpriv, numa)] == [False, True, True, False, False, True]
    assert [is_swap_pmd(e) for e in (0, thp, table, mig, dpriv, numa)] == [False, False, False, True, True, False]
    assert [pmd_trans_huge(e) for e in (thp, table, mig, dpriv, numa, dax)] == [True, False, False, False, True, False]
    assert pmd_devmap(dax) and not pmd_devmap(thp) and pmd_leaf(dax)
    # swap-format PMDs keep _PAGE_PSE like the model's migration entries, and decode like ptes
    assert is_pmd_migration_entry(mig) and not is_pmd_migration_entry(dpriv)
    assert is_pmd_device_private_entry(dpriv) and not is_pmd_device_private_entry(mig)
    e = pmd_to_swp_entry(dpriv)
    assert is_writable_device_private_entry(e) and swp_offset_pfn(e) == 0x800
    assert not is_pmd_device_private_entry(thp) and not is_pmd_device_private_entry(0)


def test_pte_is_uffd_wp_marker() -> None:
    assert pte_is_uffd_wp_marker(swp_entry_to_pte(make_pte_marker_entry(PTE_MARKER_UFFD_WP)))
    assert not pte_is_uffd_wp_marker(swp_entry_to_pte(make_pte_marker_entry(PTE_MARKER_GUARD)))
    assert not pte_is_uffd_wp_marker(0) and not pte_is_uffd_wp_marker(pfn_pte(1, PAGE_SHARED))


_KINDS = [
    0, pfn_pte(5, PAGE_SHARED), pfn_pte(6, PAGE_READONLY), pfn_pte(7, PAGE_NONE),
    pte_mkspecial(pfn_pte(8, PAGE_READONLY)), pfn_pte(9, PAGE_SHARED) | _PAGE_DEVMAP | _PAGE_SPECIAL,
    swp_entry_to_pte(swp_entry(3, 0x77)), swp_entry_to_pte(make_hwpoison_entry(10)),
    swp_entry_to_pte(make_readable_migration_entry(11)), swp_entry_to_pte(make_writable_migration_entry(12)),
    swp_entry_to_pte(make_readable_device_private_entry(13)),
    swp_entry_to_pte(make_writable_device_private_entry(14)),
    swp_entry_to_pte(make_writable_device_exclusive_entry(15)),
    swp_entry_to_pte(make_pte_marker_entry(PTE_MARKER_UFFD_WP)),
    swp_entry_to_pte(make_pte_marker_entry(PTE_MARKER_GUARD)),
    swp_entry_to_pte(make_pte_marker_entry(PTE_MARKER_POISONED)) | _PAGE_SWP_UFFD_WP,
]


@given(st.lists(st.sampled_from(range(len(_KINDS))), min_size=1, max_size=512))
def test_decode_pte_table_matches_the_scalar_predicates(idx: list[int]) -> None:
    tbl = np.array([_KINDS[i] for i in idx], np.uint64)
    d = decode_pte_table(tbl)
    for k, pte in enumerate(_KINDS[i] for i in idx):
        swp = is_swap_pte(pte)
        e = pte_to_swp_entry(pte)
        assert d.none[k] == pte_none(pte) and d.present[k] == pte_present(pte) and d.swap[k] == swp
        assert d.protnone[k] == pte_protnone(pte)
        assert d.write[k] == (pte_present(pte) and pte_write(pte))
        assert d.special[k] == (pte_present(pte) and pte_special(pte))
        assert d.devmap[k] == (pte_present(pte) and bool(pte & _PAGE_DEVMAP))
        assert d.marker[k] == (swp and is_pte_marker_entry(e))
        assert d.uffd_wp_marker[k] == pte_is_uffd_wp_marker(pte)
        assert d.device_private[k] == (swp and is_device_private_entry(e))
        assert d.device_private_write[k] == (swp and is_writable_device_private_entry(e))
        assert d.device_exclusive[k] == (swp and is_device_exclusive_entry(e))
        assert d.migration[k] == (swp and is_migration_entry(e))
        assert d.hwpoison[k] == (swp and is_hwpoison_entry(e))
        assert d.real_swap[k] == (swp and not non_swap_entry(e))
        if pte_present(pte):
            assert d.pfn[k] == pte_pfn(pte)
        elif swp and non_swap_entry(e) and not is_pte_marker_entry(e):
            assert d.pfn[k] == swp_offset_pfn(e)
