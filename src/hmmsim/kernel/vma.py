"""Virtual memory areas: ``struct vm_area_struct``, ``vm_flags`` and page protections.

Models ``include/linux/mm.h`` (VM_* flags, ``vma_is_anonymous``, ``vma_pages``),
``include/linux/mm_types.h`` and ``mm/mmap.c:vm_get_page_prot()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..flags import decode_flags
from .page_types import PAGE_SHIFT
from .pgtable import _PAGE_SOFT_DIRTY, PAGE_COPY, PAGE_NONE, PAGE_READONLY, PAGE_SHARED

if TYPE_CHECKING:
    from .mm import MM
    from .rmap import AnonVma
    from .shmem import File

__all__ = (
    "PROT_EXEC", "PROT_NONE", "PROT_READ", "PROT_WRITE", "VM_ACCOUNT", "VM_DONTCOPY",
    "VM_DONTEXPAND", "VM_EXEC", "VM_FLAG_NAMES", "VM_GROWSDOWN", "VM_HUGEPAGE", "VM_HUGETLB",
    "VM_IO", "VM_LOCKED", "VM_MAYEXEC", "VM_MAYREAD", "VM_MAYSHARE", "VM_MAYWRITE",
    "VM_MIXEDMAP", "VM_NOHUGEPAGE", "VM_NORESERVE", "VM_PFNMAP", "VM_READ", "VM_SHARED",
    "VM_SOFTDIRTY", "VM_SPECIAL", "VM_UFFD_MISSING", "VM_UFFD_WP", "VM_WIPEONFORK",
    "VM_WRITE", "VmOps", "Vma", "calc_vm_prot_bits", "decode_vm_flags", "is_cow_mapping",
    "vm_get_page_prot", "vma_is_accessible", "pte_needs_soft_dirty_wp", "vma_is_anonymous",
    "vma_soft_dirty_enabled",
)

PROT_NONE = 0
PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4

VM_READ = 0x00000001
VM_WRITE = 0x00000002
VM_EXEC = 0x00000004
VM_SHARED = 0x00000008
VM_MAYREAD = 0x00000010
VM_MAYWRITE = 0x00000020
VM_MAYEXEC = 0x00000040
VM_MAYSHARE = 0x00000080
VM_GROWSDOWN = 0x00000100
VM_UFFD_MISSING = 0x00000200
VM_PFNMAP = 0x00000400
VM_UFFD_WP = 0x00001000
VM_LOCKED = 0x00002000
VM_IO = 0x00004000
VM_DONTCOPY = 0x00020000
VM_DONTEXPAND = 0x00040000
VM_ACCOUNT = 0x00100000
VM_NORESERVE = 0x00200000
VM_HUGETLB = 0x00400000
VM_WIPEONFORK = 0x02000000
VM_SOFTDIRTY = 0x08000000
VM_MIXEDMAP = 0x10000000
VM_HUGEPAGE = 0x20000000
VM_NOHUGEPAGE = 0x40000000
VM_SPECIAL = VM_IO | VM_DONTEXPAND | VM_PFNMAP | VM_MIXEDMAP

VM_FLAG_NAMES: tuple[tuple[str, int], ...] = tuple(
    (n[3:], v) for n, v in sorted(globals().items(), key=lambda kv: kv[1] if isinstance(kv[1], int) else 0)
    if n.startswith("VM_") and n != "VM_SPECIAL" and isinstance(v, int)
)


def decode_vm_flags(flags: int) -> str:
    """``"READ|WRITE|MAYREAD|..."`` for a ``vm_flags`` value."""
    return decode_flags(flags, VM_FLAG_NAMES, bit_numbers=False)


def calc_vm_prot_bits(prot: int) -> int:
    """``calc_vm_prot_bits()``: PROT_* to VM_READ/VM_WRITE/VM_EXEC."""
    return ((VM_READ if prot & PROT_READ else 0) | (VM_WRITE if prot & PROT_WRITE else 0)
            | (VM_EXEC if prot & PROT_EXEC else 0))


def vm_get_page_prot(vm_flags: int) -> int:
    """``vm_get_page_prot()``: the pte protection for a VMA (x86 ``protection_map``).

    Private writable mappings get read-only ptes (copy-on-write); shared writable ones are
    writable (tmpfs needs no write notification)."""
    acc = vm_flags & (VM_READ | VM_WRITE | VM_EXEC)
    if not acc:
        return PAGE_NONE
    if vm_flags & VM_SHARED:
        return PAGE_SHARED if vm_flags & VM_WRITE else PAGE_READONLY
    return PAGE_COPY if vm_flags & VM_WRITE else PAGE_READONLY


class VmOps:
    """``struct vm_operations_struct``: the callbacks of a non-anonymous mapping.

    ``name`` says which kind of mapping this is (``"shmem"``, ``"shmem-anon"``,
    ``"hugetlb"``, ``"dmirror"``); ``fault(vmf)`` returns a ``vm_fault_t``;
    ``map_pages(vmf, start_pgoff, end_pgoff)`` maps what is already cached (fault-around);
    ``may_split(vma, addr)`` returns 0 or -errno; ``huge_fault(vmf, order)`` maps a PMD
    or PUD leaf (device-dax).
    """

    __slots__ = ("name", "fault", "map_pages", "may_split", "huge_fault")

    def __init__(self, name: str, fault: Any = None, map_pages: Any = None,
                 may_split: Any = None, huge_fault: Any = None) -> None:
        self.name = name
        self.fault = fault
        self.map_pages = map_pages
        self.may_split = may_split
        self.huge_fault = huge_fault

    def __repr__(self) -> str:
        return f"VmOps({self.name})"


class Vma:
    """``struct vm_area_struct``: ``[vm_start, vm_end)`` of one mm with one set of flags."""

    __slots__ = ("vm_mm", "vm_start", "vm_end", "vm_flags", "vm_page_prot", "vm_pgoff",
                 "vm_file", "vm_ops", "anon_vma", "anon_vma_chain", "vm_private_data",
                 "vm_userfaultfd_ctx", "__weakref__")

    def __init__(self, mm: "MM", start: int, end: int, flags: int, pgoff: int = 0,
                 file: "File | None" = None, ops: VmOps | None = None) -> None:
        self.vm_mm = mm
        self.vm_start = start
        self.vm_end = end
        self.vm_flags = flags
        self.vm_page_prot = vm_get_page_prot(flags)
        self.vm_pgoff = pgoff
        self.vm_file = file
        self.vm_ops = ops
        self.anon_vma: AnonVma | None = None
        #: every anon_vma whose pages this VMA may map (``anon_vma_chain``)
        self.anon_vma_chain: list[AnonVma] = []
        self.vm_private_data: Any = None
        #: the userfaultfd this VMA is registered with (``vm_userfaultfd_ctx.ctx``)
        self.vm_userfaultfd_ctx: Any = None

    def clone(self) -> "Vma":
        """``vm_area_dup()`` + ``anon_vma_clone()``: a copy with the same fields, linked to the
        same anon_vmas."""
        v = Vma(self.vm_mm, self.vm_start, self.vm_end, self.vm_flags, self.vm_pgoff,
                self.vm_file, self.vm_ops)
        v.vm_page_prot = self.vm_page_prot
        v.anon_vma = self.anon_vma
        v.vm_private_data = self.vm_private_data
        v.vm_userfaultfd_ctx = self.vm_userfaultfd_ctx
        for av in self.anon_vma_chain:
            av.vmas[v] = None
            v.anon_vma_chain.append(av)
        return v

    def pages(self) -> int:
        """``vma_pages()``."""
        return (self.vm_end - self.vm_start) >> PAGE_SHIFT

    def linear_page_index(self, addr: int) -> int:
        """``linear_page_index()``: the file/anon offset (in pages) mapped at *addr*."""
        return ((addr - self.vm_start) >> PAGE_SHIFT) + self.vm_pgoff

    def address_of_index(self, index: int) -> int:
        """``vma_address()`` for one page index (may lie outside the VMA)."""
        return self.vm_start + ((index - self.vm_pgoff) << PAGE_SHIFT)

    def __repr__(self) -> str:
        kind = "anon" if self.vm_ops is None else self.vm_ops.name
        return (f"Vma({self.vm_start:#x}-{self.vm_end:#x} {decode_vm_flags(self.vm_flags)} "
                f"{kind} pgoff={self.vm_pgoff:#x})")


def vma_is_anonymous(vma: Vma) -> bool:
    """``vma_is_anonymous()``: a private anonymous mapping (no vm_ops)."""
    return vma.vm_ops is None


def vma_is_accessible(vma: Vma) -> bool:
    """``vma_is_accessible()``: any of read, write or exec."""
    return bool(vma.vm_flags & (VM_READ | VM_WRITE | VM_EXEC))


def vma_soft_dirty_enabled(vma: Vma) -> bool:
    """``vma_soft_dirty_enabled()``: soft-dirty tracking is active once ``clear_refs``
    cleared VM_SOFTDIRTY; then ptes without their soft-dirty bit must stay
    write-protected (``pte_needs_soft_dirty_wp``)."""
    return not vma.vm_flags & VM_SOFTDIRTY


def pte_needs_soft_dirty_wp(vma: Vma, pte: int) -> bool:
    """``pte_needs_soft_dirty_wp()`` (and ``pmd_needs_soft_dirty_wp()``, the same bit on
    x86): the entry must stay write-protected so that the next write marks it soft-dirty."""
    return vma_soft_dirty_enabled(vma) and not pte & _PAGE_SOFT_DIRTY


def is_cow_mapping(flags: int) -> bool:
    """``is_cow_mapping()``: private and possibly writable."""
    return (flags & (VM_SHARED | VM_MAYWRITE)) == VM_MAYWRITE
