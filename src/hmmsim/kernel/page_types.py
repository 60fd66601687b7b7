"""Page and page-table geometry of x86-64 with 4-level paging (``asm/page_types.h``,
``asm/pgtable_64_types.h``) and the THP order constants of ``linux/huge_mm.h``."""

__all__ = (
    "HPAGE_PMD_NR", "HPAGE_PMD_ORDER", "HPAGE_PMD_SIZE", "HPAGE_PUD_ORDER", "PAGE_MASK",
    "PAGE_SHIFT", "PAGE_SIZE", "PGDIR_SHIFT", "PGDIR_SIZE", "PMD_MASK", "PMD_SHIFT",
    "PMD_SIZE", "PTRS_PER_PGD", "PTRS_PER_PMD", "PTRS_PER_PTE", "PTRS_PER_PUD", "PUD_MASK",
    "PUD_SHIFT", "PUD_SIZE", "TASK_SIZE", "ULONG_MAX", "PAGE_ALIGN", "pgd_index",
    "pmd_index", "pte_index", "pud_index",
)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PMD_MASK = ~(PMD_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
PUD_SHIFT = 30
PUD_SIZE = 1 << PUD_SHIFT
PUD_MASK = ~(PUD_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
PGDIR_SHIFT = 39
PGDIR_SIZE = 1 << PGDIR_SHIFT
PTRS_PER_PTE = PTRS_PER_PMD = PTRS_PER_PUD = PTRS_PER_PGD = 512
HPAGE_PMD_ORDER = PMD_SHIFT - PAGE_SHIFT
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER
HPAGE_PMD_SIZE = PMD_SIZE
HPAGE_PUD_ORDER = PUD_SHIFT - PAGE_SHIFT
#: user address space limit with 4-level paging (47 bits, minus the guard page)
TASK_SIZE = (1 << 47) - PAGE_SIZE
ULONG_MAX = 0xFFFF_FFFF_FFFF_FFFF


def PAGE_ALIGN(addr: int) -> int:
    """Round *addr* up to a page boundary (``PAGE_ALIGN``), wrapping like an unsigned long."""
    return (addr + PAGE_SIZE - 1) & PAGE_MASK


def pgd_index(addr: int) -> int:
    return (addr >> PGDIR_SHIFT) & 511


def pud_index(addr: int) -> int:
    return (addr >> PUD_SHIFT) & 511


def pmd_index(addr: int) -> int:
    return (addr >> PMD_SHIFT) & 511


def pte_index(addr: int) -> int:
    return (addr >> PAGE_SHIFT) & 511
