"""Page-table entries and page-table storage.

Models ``arch/x86/include/asm/pgtable*.h``, ``include/linux/swapops.h``,
``include/linux/swap.h`` (swap types) and ``include/linux/pgtable.h``.

Entry encoding (x86-64, 64-bit entries; one encoding serves pte, pmd and pud):

* present entries: ``_PAGE_PRESENT`` (bit 0), ``_PAGE_RW`` (1), ``_PAGE_USER`` (2),
  ``_PAGE_ACCESSED`` (5), ``_PAGE_DIRTY`` (6), ``_PAGE_PSE`` (7, leaf at pmd/pud level),
  ``_PAGE_SPECIAL`` (9), ``_PAGE_UFFD_WP`` (10), ``_PAGE_SOFT_DIRTY`` (11),
  ``_PAGE_DEVMAP`` (58), ``_PAGE_NX`` (63); the pfn in bits 12..51.
* PROT_NONE / NUMA-hinting entries: ``_PAGE_PROTNONE`` (bit 8) without ``_PAGE_PRESENT``;
  ``pte_present()`` is true for them, ``pte_protnone()`` tells them apart.
* a pointer to a lower-level table is a present non-leaf entry whose pfn field holds the
  table's id in :class:`PageTableStore` (page-table pages are not RAM frames here).
* swap-format (non-present, non-none) entries: swap type in bits 59..63, swap offset in
  bits 12..53 (so a migration/device entry keeps its pfn where a present entry has it),
  ``_PAGE_SWP_SOFT_DIRTY`` (1), ``_PAGE_SWP_UFFD_WP`` (2), ``_PAGE_SWP_EXCLUSIVE`` (7).
  Unlike x86 the offset is not stored inverted; nothing in HMM depends on that detail.

Swap types are those of a 6.12 kernel with CONFIG_DEVICE_PRIVATE, CONFIG_MIGRATION,
CONFIG_MEMORY_FAILURE and PTE markers: ``MAX_SWAPFILES`` = 23, then hwpoison, three
migration types, four device types (the two device-exclusive types were merged into one
in 6.15) and the pte marker type.

Tables are numpy ``uint64`` arrays of 512 entries kept in fixed blocks, so a view of a
table stays valid while other tables are allocated. Masks over a whole table
(:func:`pte_present_mask` and friends) let callers process a leaf table at once.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..flags import decode_flags
from .page_types import PTRS_PER_PTE

__all__ = (
    "MAX_SWAPFILES", "PAGE_COPY", "PAGE_NONE", "PAGE_READONLY", "PAGE_SHARED",
    "PTE_FLAG_NAMES", "PTE_MARKER_GUARD", "PTE_MARKER_POISONED", "PTE_MARKER_UFFD_WP",
    "PTE_PFN_MASK", "PageTableStore", "PteTableDecode", "SWP_DEVICE_EXCLUSIVE_READ",
    "SWP_DEVICE_EXCLUSIVE_WRITE", "SWP_DEVICE_READ", "SWP_DEVICE_WRITE", "SWP_HWPOISON",
    "SWP_MIGRATION_READ", "SWP_MIGRATION_READ_EXCLUSIVE", "SWP_MIGRATION_WRITE",
    "SWP_PTE_MARKER", "_PAGE_ACCESSED", "_PAGE_DEVMAP", "_PAGE_DIRTY", "_PAGE_NX",
    "_PAGE_PRESENT", "_PAGE_PROTNONE", "_PAGE_PSE", "_PAGE_RW", "_PAGE_SOFT_DIRTY",
    "_PAGE_SPECIAL", "_PAGE_SWP_EXCLUSIVE", "_PAGE_SWP_SOFT_DIRTY", "_PAGE_SWP_UFFD_WP",
    "_PAGE_TABLE", "_PAGE_UFFD_WP", "_PAGE_USER", "decode_pte", "decode_pte_table",
    "is_device_exclusive_entry", "is_device_private_entry", "is_hwpoison_entry",
    "is_migration_entry", "is_pmd_device_private_entry", "is_pte_marker_entry",
    "is_readable_exclusive_migration_entry", "is_swap_pmd", "is_swap_pte",
    "is_writable_device_exclusive_entry", "is_writable_device_private_entry",
    "is_writable_migration_entry", "make_hwpoison_entry", "make_pte_marker_entry",
    "make_readable_device_exclusive_entry", "make_readable_device_private_entry",
    "make_readable_exclusive_migration_entry", "make_readable_migration_entry",
    "make_writable_device_exclusive_entry", "make_writable_device_private_entry",
    "make_writable_migration_entry", "mk_table_entry", "non_swap_entry", "pfn_pte",
    "pfn_swap_entry_to_pfn", "pmd_devmap", "pmd_leaf", "pmd_none", "pmd_present",
    "pmd_to_swp_entry", "pmd_trans_huge", "pte_dirty", "pte_is_uffd_wp_marker", "pte_marker_get", "pte_mkclean",
    "pte_mkdirty", "pte_mkold", "pte_mkspecial", "pte_mkwrite", "pte_mkyoung", "pte_modify",
    "pte_none", "pte_pfn", "pte_present", "pte_present_mask", "pte_protnone", "pte_special",
    "pte_swp_exclusive", "pte_swp_soft_dirty", "pte_swp_uffd_wp", "pte_to_swp_entry",
    "pte_uffd_wp", "pte_write", "pte_wrprotect", "pte_young", "swp_entry",
    "swp_entry_to_pmd", "swp_entry_to_pte", "swp_offset", "swp_offset_pfn", "swp_type", "table_id",
)

# -- bits ---------------------------------------------------------------------------------
_PAGE_PRESENT = 1 << 0
_PAGE_RW = 1 << 1
_PAGE_USER = 1 << 2
_PAGE_ACCESSED = 1 << 5
_PAGE_DIRTY = 1 << 6
_PAGE_PSE = 1 << 7
_PAGE_PROTNONE = 1 << 8
_PAGE_SPECIAL = 1 << 9
_PAGE_UFFD_WP = 1 << 10
_PAGE_SOFT_DIRTY = 1 << 11
_PAGE_DEVMAP = 1 << 58
_PAGE_NX = 1 << 63
_PAGE_SWP_SOFT_DIRTY = 1 << 1
_PAGE_SWP_UFFD_WP = 1 << 2
_PAGE_SWP_EXCLUSIVE = 1 << 7

PTE_PFN_MASK = ((1 << 52) - 1) & ~((1 << 12) - 1)
_SWP_OFFSET_BITS = 42
_SWP_OFFSET_MASK = (1 << _SWP_OFFSET_BITS) - 1
_SWP_TYPE_SHIFT = 59
_SWP_PFN_BITS = 40
_SWP_MIG_YOUNG = 1 << _SWP_PFN_BITS
_SWP_MIG_DIRTY = 1 << (_SWP_PFN_BITS + 1)

#: protections (``protection_map`` of x86); the pfn is OR-ed in by :func:`pfn_pte`
PAGE_NONE = _PAGE_PROTNONE | _PAGE_ACCESSED
PAGE_READONLY = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED | _PAGE_NX
PAGE_COPY = PAGE_READONLY
PAGE_SHARED = PAGE_READONLY | _PAGE_RW
#: a pointer to a lower-level table (``_PAGE_TABLE``)
_PAGE_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
# bits pte_modify() keeps (``_PAGE_CHG_MASK``)
_PAGE_CHG_MASK = (PTE_PFN_MASK | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SPECIAL | _PAGE_SOFT_DIRTY
                  | _PAGE_UFFD_WP | _PAGE_DEVMAP | _PAGE_PSE)

PTE_FLAG_NAMES: tuple[tuple[str, int], ...] = (
    ("PRESENT", 0), ("RW", 1), ("USER", 2), ("ACCESSED", 5), ("DIRTY", 6), ("PSE", 7),
    ("PROTNONE", 8), ("SPECIAL", 9), ("UFFD_WP", 10), ("SOFT_DIRTY", 11), ("DEVMAP", 58),
    ("NX", 63),
)

# -- swap types (include/linux/swap.h, 6.12) ----------------------------------------------
MAX_SWAPFILES = 23
SWP_HWPOISON = 23
SWP_MIGRATION_READ = 24
SWP_MIGRATION_READ_EXCLUSIVE = 25
SWP_MIGRATION_WRITE = 26
SWP_DEVICE_WRITE = 27
SWP_DEVICE_READ = 28
SWP_DEVICE_EXCLUSIVE_WRITE = 29
SWP_DEVICE_EXCLUSIVE_READ = 30
SWP_PTE_MARKER = 31

PTE_MARKER_UFFD_WP = 1 << 0
PTE_MARKER_POISONED = 1 << 1
PTE_MARKER_GUARD = 1 << 2

_SWP_TYPE_NAMES = {
    SWP_HWPOISON: "hwpoison", SWP_MIGRATION_READ: "migration-read",
    SWP_MIGRATION_READ_EXCLUSIVE: "migration-read-exclusive",
    SWP_MIGRATION_WRITE: "migration-write", SWP_DEVICE_WRITE: "device-private-write",
    SWP_DEVICE_READ: "device-private-read", SWP_DEVICE_EXCLUSIVE_WRITE: "device-exclusive-write",
    SWP_DEVICE_EXCLUSIVE_READ: "device-exclusive-read", SWP_PTE_MARKER: "pte-marker",
}


# -- present entries ----------------------------------------------------------------------
def pfn_pte(pfn: int, prot: int) -> int:
    """``pfn_pte()``/``mk_pte()``: an entry mapping *pfn* with protection *prot*."""
    return ((pfn << 12) & PTE_PFN_MASK) | prot


def pte_pfn(pte: int) -> int:
    return (pte & PTE_PFN_MASK) >> 12


def pte_none(pte: int) -> bool:
    return pte == 0


def pte_present(pte: int) -> bool:
    """``pte_present()``: present or PROT_NONE (protnone entries count as present)."""
    return bool(pte & (_PAGE_PRESENT | _PAGE_PROTNONE))


def pte_protnone(pte: int) -> bool:
    return (pte & (_PAGE_PROTNONE | _PAGE_PRESENT)) == _PAGE_PROTNONE


def pte_write(pte: int) -> bool:
    return bool(pte & _PAGE_RW)


def pte_dirty(pte: int) -> bool:
    return bool(pte & _PAGE_DIRTY)


def pte_young(pte: int) -> bool:
    return bool(pte & _PAGE_ACCESSED)


def pte_special(pte: int) -> bool:
    return bool(pte & _PAGE_SPECIAL)


def pte_uffd_wp(pte: int) -> bool:
    return bool(pte & _PAGE_UFFD_WP)


def pte_mkwrite(pte: int) -> int:
    return pte | _PAGE_RW


def pte_wrprotect(pte: int) -> int:
    return pte & ~_PAGE_RW


def pte_mkdirty(pte: int) -> int:
    return pte | _PAGE_DIRTY | _PAGE_SOFT_DIRTY


def pte_mkclean(pte: int) -> int:
    return pte & ~_PAGE_DIRTY


def pte_mkyoung(pte: int) -> int:
    return pte | _PAGE_ACCESSED


def pte_mkold(pte: int) -> int:
    return pte & ~_PAGE_ACCESSED


def pte_mkspecial(pte: int) -> int:
    return pte | _PAGE_SPECIAL


def pte_modify(pte: int, newprot: int) -> int:
    """``pte_modify()``: keep pfn and software state, take the protection bits of *newprot*."""
    return (pte & _PAGE_CHG_MASK) | (newprot & ~_PAGE_CHG_MASK)


def pmd_leaf(pmd: int) -> bool:
    """``pmd_leaf()``/``pud_leaf()``: a present huge mapping (not a table pointer)."""
    return bool(pmd & _PAGE_PSE) and pte_present(pmd)


def pmd_none(pmd: int) -> bool:
    """``pmd_none()``/``pud_none()``: an empty upper-level entry."""
    return pmd == 0


def pmd_present(pmd: int) -> bool:
    """``pmd_present()``/``pud_present()``: a table pointer, a huge mapping or a PROT_NONE
    huge mapping. (Unlike x86 the model's PMD migration entries keep ``_PAGE_PSE``, so
    ``_PAGE_PSE`` alone does not make an entry present here.)"""
    return bool(pmd & (_PAGE_PRESENT | _PAGE_PROTNONE))


def is_swap_pmd(pmd: int) -> bool:
    """``is_swap_pmd()``: a swap-format PMD (migration or device-private entry)."""
    return pmd != 0 and not pmd & (_PAGE_PRESENT | _PAGE_PROTNONE)


def pmd_devmap(pmd: int) -> bool:
    """``pmd_devmap()``/``pud_devmap()`` (kernels with ``pte_devmap``, 6.12)."""
    return bool(pmd & _PAGE_DEVMAP)


def pmd_trans_huge(pmd: int) -> bool:
    """``pmd_trans_huge()`` (x86): a present huge mapping that is not devmap."""
    return (pmd & (_PAGE_PSE | _PAGE_DEVMAP)) == _PAGE_PSE and bool(pmd & (_PAGE_PRESENT | _PAGE_PROTNONE))


def mk_table_entry(tid: int) -> int:
    """An upper-level entry pointing at table *tid* (``pmd_populate`` and friends)."""
    return ((tid << 12) & PTE_PFN_MASK) | _PAGE_TABLE


def table_id(entry: int) -> int:
    """The table id an upper-level table-pointer entry points at."""
    return (entry & PTE_PFN_MASK) >> 12


# -- swap-format entries (swp_entry_t is an int: type << 42 | offset) --------------------
def is_swap_pte(pte: int) -> bool:
    return pte != 0 and not pte_present(pte)


def swp_entry(type_: int, offset: int) -> int:
    return (type_ << _SWP_OFFSET_BITS) | (offset & _SWP_OFFSET_MASK)


def swp_type(entry: int) -> int:
    return entry >> _SWP_OFFSET_BITS


def swp_offset(entry: int) -> int:
    return entry & _SWP_OFFSET_MASK


def swp_offset_pfn(entry: int) -> int:
    """``swp_offset_pfn()``: the pfn stored in a migration/device/hwpoison entry."""
    return entry & ((1 << _SWP_PFN_BITS) - 1)


pfn_swap_entry_to_pfn = swp_offset_pfn


def pte_to_swp_entry(pte: int) -> int:
    return swp_entry(pte >> _SWP_TYPE_SHIFT, (pte >> 12) & _SWP_OFFSET_MASK)


def swp_entry_to_pte(entry: int) -> int:
    return (swp_type(entry) << _SWP_TYPE_SHIFT) | (swp_offset(entry) << 12)


def pte_swp_soft_dirty(pte: int) -> bool:
    return bool(pte & _PAGE_SWP_SOFT_DIRTY)


def pte_swp_uffd_wp(pte: int) -> bool:
    return bool(pte & _PAGE_SWP_UFFD_WP)


def pte_swp_exclusive(pte: int) -> bool:
    return bool(pte & _PAGE_SWP_EXCLUSIVE)


def non_swap_entry(entry: int) -> bool:
    return swp_type(entry) >= MAX_SWAPFILES


def is_migration_entry(entry: int) -> bool:
    return SWP_MIGRATION_READ <= swp_type(entry) <= SWP_MIGRATION_WRITE


def is_writable_migration_entry(entry: int) -> bool:
    return swp_type(entry) == SWP_MIGRATION_WRITE


def is_readable_exclusive_migration_entry(entry: int) -> bool:
    return swp_type(entry) == SWP_MIGRATION_READ_EXCLUSIVE


def make_readable_migration_entry(pfn: int) -> int:
    return swp_entry(SWP_MIGRATION_READ, pfn)


def make_readable_exclusive_migration_entry(pfn: int) -> int:
    return swp_entry(SWP_MIGRATION_READ_EXCLUSIVE, pfn)


def make_writable_migration_entry(pfn: int) -> int:
    return swp_entry(SWP_MIGRATION_WRITE, pfn)


def is_device_private_entry(entry: int) -> bool:
    t = swp_type(entry)
    return t == SWP_DEVICE_WRITE or t == SWP_DEVICE_READ


def is_writable_device_private_entry(entry: int) -> bool:
    return swp_type(entry) == SWP_DEVICE_WRITE


def make_readable_device_private_entry(pfn: int) -> int:
    return swp_entry(SWP_DEVICE_READ, pfn)


def make_writable_device_private_entry(pfn: int) -> int:
    return swp_entry(SWP_DEVICE_WRITE, pfn)


def is_device_exclusive_entry(entry: int) -> bool:
    t = swp_type(entry)
    return t == SWP_DEVICE_EXCLUSIVE_WRITE or t == SWP_DEVICE_EXCLUSIVE_READ


def is_writable_device_exclusive_entry(entry: int) -> bool:
    return swp_type(entry) == SWP_DEVICE_EXCLUSIVE_WRITE


def make_readable_device_exclusive_entry(pfn: int) -> int:
    return swp_entry(SWP_DEVICE_EXCLUSIVE_READ, pfn)


def make_writable_device_exclusive_entry(pfn: int) -> int:
    return swp_entry(SWP_DEVICE_EXCLUSIVE_WRITE, pfn)


def is_hwpoison_entry(entry: int) -> bool:
    return swp_type(entry) == SWP_HWPOISON


def make_hwpoison_entry(pfn: int) -> int:
    return swp_entry(SWP_HWPOISON, pfn)


def is_pte_marker_entry(entry: int) -> bool:
    return swp_type(entry) == SWP_PTE_MARKER


def make_pte_marker_entry(marker: int) -> int:
    return swp_entry(SWP_PTE_MARKER, marker)


def pte_marker_get(entry: int) -> int:
    return swp_offset(entry)


def pmd_to_swp_entry(pmd: int) -> int:
    """``pmd_to_swp_entry()``: swap-format PMDs use the pte encoding (the model keeps
    ``_PAGE_PSE`` on them, see :func:`pmd_present`)."""
    return pte_to_swp_entry(pmd)


def swp_entry_to_pmd(entry: int) -> int:
    """``swp_entry_to_pmd()``: a swap-format PMD holding *entry* (with ``_PAGE_PSE``, like
    the model's PMD migration entries)."""
    return swp_entry_to_pte(entry) | _PAGE_PSE


def is_pmd_device_private_entry(pmd: int) -> bool:
    """``pmd_is_device_private_entry()``: a device-private THP entry (7.3,
    ``CONFIG_ARCH_HAS_PMD_SOFTLEAVES``)."""
    return is_swap_pmd(pmd) and is_device_private_entry(pmd_to_swp_entry(pmd))


def pte_is_uffd_wp_marker(pte: int) -> bool:
    """``pte_is_uffd_wp_marker()``: a pte marker carrying ``PTE_MARKER_UFFD_WP``."""
    if not is_swap_pte(pte):
        return False
    e = pte_to_swp_entry(pte)
    return is_pte_marker_entry(e) and bool(pte_marker_get(e) & PTE_MARKER_UFFD_WP)


def decode_pte(pte: int) -> str:
    """Describe an entry for humans: ``"none"``, ``"pfn 0x1234 PRESENT|RW|..."`` or the
    swap-format kind with its offset."""
    if pte == 0:
        return "none"
    if pte_present(pte):
        return f"pfn {pte_pfn(pte):#x} {decode_flags(pte & ~PTE_PFN_MASK, PTE_FLAG_NAMES)}"
    e = pte_to_swp_entry(pte)
    kind = _SWP_TYPE_NAMES.get(swp_type(e), f"swap-type-{swp_type(e)}")
    return f"{kind} offset {swp_offset(e):#x}"


# -- whole-table masks (named after the predicates above) ---------------------------------
_U = np.uint64


def pte_present_mask(tbl: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    """``pte_present()`` of every entry of a table (protnone counts as present)."""
    return (tbl & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0


class PteTableDecode:
    """Every entry class of a uint64 table slice as boolean masks (``decode_pte_table``).

    The masks are exclusive where the kernel's predicates are: an entry is exactly one of
    ``none``, ``present`` (protnone included, like ``pte_present()``) or ``swap``
    (every non-none, non-present entry); the swap kinds (``marker``, ``device_private``,
    ``device_exclusive``, ``migration``, ``hwpoison``, ``real_swap``) split ``swap``.
    ``pfn`` is the pfn field of present entries and the swap offset's pfn of swap
    entries. The swap-kind masks are only computed when the slice has swap entries
    (``has_swap``); otherwise they all are one shared all-False array."""

    __slots__ = ("none", "present", "protnone", "write", "special", "devmap", "swap",
                 "marker", "uffd_wp_marker", "device_private", "device_private_write",
                 "device_exclusive", "migration", "hwpoison", "real_swap", "pfn", "has_swap")

    def __init__(self, tbl: npt.NDArray[np.uint64]) -> None:
        self.none = tbl == 0
        self.present = (tbl & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0
        self.protnone = (tbl & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) == _U(_PAGE_PROTNONE)
        self.write = self.present & ((tbl & _U(_PAGE_RW)) != 0)
        self.special = self.present & ((tbl & _U(_PAGE_SPECIAL)) != 0)
        self.devmap = self.present & ((tbl & _U(_PAGE_DEVMAP)) != 0)
        self.swap = ~(self.present | self.none)
        self.pfn = (tbl & _U(PTE_PFN_MASK)) >> _U(12)
        self.has_swap = bool(self.swap.any())
        if self.has_swap:
            t = np.where(self.swap, tbl >> _U(_SWP_TYPE_SHIFT), _U(0))
            self.marker = self.swap & (t == _U(SWP_PTE_MARKER))
            self.uffd_wp_marker = self.marker & ((self.pfn & _U(PTE_MARKER_UFFD_WP)) != 0)
            self.device_private_write = self.swap & (t == _U(SWP_DEVICE_WRITE))
            self.device_private = self.device_private_write | (self.swap & (t == _U(SWP_DEVICE_READ)))
            self.device_exclusive = self.swap & ((t == _U(SWP_DEVICE_EXCLUSIVE_WRITE))
                                                 | (t == _U(SWP_DEVICE_EXCLUSIVE_READ)))
            self.migration = self.swap & (t >= _U(SWP_MIGRATION_READ)) & (t <= _U(SWP_MIGRATION_WRITE))
            self.hwpoison = self.swap & (t == _U(SWP_HWPOISON))
            self.real_swap = self.swap & (t < _U(MAX_SWAPFILES))
            self.pfn = np.where(self.swap, self.pfn & _U((1 << _SWP_PFN_BITS) - 1), self.pfn)
        else:
            f = np.zeros(len(tbl), np.bool_)
            self.marker = self.uffd_wp_marker = self.device_private = f
            self.device_private_write = self.device_exclusive = self.migration = f
            self.hwpoison = self.real_swap = f


def decode_pte_table(tbl: npt.NDArray[np.uint64]) -> PteTableDecode:
    """Decode a whole table (or a slice of one) at once: the vectorised twin of
    :func:`pte_none`, :func:`pte_present`, :func:`pte_write`, :func:`pte_special`,
    :func:`is_swap_pte` and the ``is_*_entry`` predicates."""
    return PteTableDecode(tbl)


# -- storage --------------------------------------------------------------------------------
_TABLES_PER_BLOCK = 1024


class PageTableStore:
    """All page-table pages of a machine: ``uint64[512]`` tables in fixed blocks.

    A table id is stable for the table's lifetime and a view returned by :meth:`table`
    stays valid while other tables come and go. ``level[tid]`` is 4 (pgd), 3 (pud),
    2 (pmd) or 1 (pte) for allocated tables and 0 for free ones.
    """

    def __init__(self) -> None:
        self._blocks: list[npt.NDArray[np.uint64]] = []
        self.level = np.zeros(0, np.int8)
        self._free_ids: list[int] = []
        self.nr_tables = 0

    def alloc(self, level: int) -> int:
        """Allocate a zeroed table of *level*; returns its id (``pte_alloc_one`` & co.)."""
        if not self._free_ids:
            base = len(self._blocks) * _TABLES_PER_BLOCK
            self._blocks.append(np.zeros((_TABLES_PER_BLOCK, PTRS_PER_PTE), np.uint64))
            self.level = np.concatenate([self.level, np.zeros(_TABLES_PER_BLOCK, np.int8)])
            # hand out low ids first; id 0 is never used so that a table pointer is never 0
            self._free_ids = list(range(base + _TABLES_PER_BLOCK - 1, base - 1, -1))
            if base == 0:
                self._free_ids.pop()
        tid = self._free_ids.pop()
        self.level[tid] = level
        self.nr_tables += 1
        return tid

    def free(self, tid: int) -> None:
        """Free table *tid*; it must be empty (``pte_free`` & co.)."""
        t = self.table(tid)
        if t.any():
            raise AssertionError(f"freeing non-empty page table {tid}")
        self.level[tid] = 0
        self._free_ids.append(tid)
        self.nr_tables -= 1

    def table(self, tid: int) -> npt.NDArray[np.uint64]:
        """A writable view of table *tid*'s 512 entries."""
        return self._blocks[tid >> 10][tid & 1023]

    def allocated_ids(self, level: int | None = None) -> npt.NDArray[np.int64]:
        if level is None:
            return np.flatnonzero(self.level != 0)
        return np.flatnonzero(self.level == level)
