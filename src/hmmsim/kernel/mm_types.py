"""Fault types shared by every fault handler (``include/linux/mm_types.h``,
``include/linux/mm.h``): the ``vm_fault_t`` bits, ``enum fault_flag``, ``struct vm_fault``
and ``mm_counter_file()``. Kept apart from :mod:`.fault` so that the handlers it
dispatches to (THP, hugetlb, tmpfs, drivers) need not import it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errno import EFAULT, EHWPOISON, ENOMEM
from .mm import MM_FILEPAGES, MM_SHMEMPAGES, PtRef
from .page_types import PAGE_MASK, pte_index
from .physmem import PG_swapbacked
from .vma import Vma

if TYPE_CHECKING:
    from .system import System

__all__ = (
    "FAULT_FLAG_ALLOW_RETRY", "FAULT_FLAG_DEFAULT", "FAULT_FLAG_INSTRUCTION", "FAULT_FLAG_INTERRUPTIBLE",
    "FAULT_FLAG_KILLABLE", "FAULT_FLAG_MKWRITE", "FAULT_FLAG_REMOTE", "FAULT_FLAG_RETRY_NOWAIT",
    "FAULT_FLAG_TRIED", "FAULT_FLAG_UNSHARE", "FAULT_FLAG_USER", "FAULT_FLAG_WRITE",
    "VM_FAULT_COMPLETED", "VM_FAULT_DONE_COW", "VM_FAULT_ERROR", "VM_FAULT_FALLBACK",
    "VM_FAULT_HWPOISON", "VM_FAULT_HWPOISON_LARGE", "VM_FAULT_LOCKED", "VM_FAULT_MAJOR",
    "VM_FAULT_NOPAGE", "VM_FAULT_OOM", "VM_FAULT_RETRY", "VM_FAULT_SIGBUS", "VM_FAULT_SIGSEGV",
    "VmFault", "mm_counter_file", "vm_fault_to_errno",
)

# vm_fault_t bits (include/linux/mm_types.h)
VM_FAULT_OOM = 0x000001
VM_FAULT_SIGBUS = 0x000002
VM_FAULT_MAJOR = 0x000004
VM_FAULT_HWPOISON = 0x000010
VM_FAULT_HWPOISON_LARGE = 0x000020
VM_FAULT_SIGSEGV = 0x000040
VM_FAULT_NOPAGE = 0x000100
VM_FAULT_LOCKED = 0x000200
VM_FAULT_RETRY = 0x000400
VM_FAULT_FALLBACK = 0x000800
VM_FAULT_DONE_COW = 0x001000
VM_FAULT_COMPLETED = 0x004000
VM_FAULT_ERROR = (VM_FAULT_OOM | VM_FAULT_SIGBUS | VM_FAULT_SIGSEGV | VM_FAULT_HWPOISON
                  | VM_FAULT_HWPOISON_LARGE | VM_FAULT_FALLBACK)

#: ``FOLL_HWPOISON`` (include/linux/mm_types.h): report hwpoison as -EHWPOISON
FOLL_HWPOISON = 1 << 6


def vm_fault_to_errno(vm_fault: int, foll_flags: int) -> int:
    """``vm_fault_to_errno()`` (include/linux/mm.h): -ENOMEM for OOM; -EHWPOISON for a
    poisoned page only with ``FOLL_HWPOISON`` (else -EFAULT); -EFAULT for SIGBUS/SIGSEGV;
    0 for anything else."""
    if vm_fault & VM_FAULT_OOM:
        return -ENOMEM
    if vm_fault & (VM_FAULT_HWPOISON | VM_FAULT_HWPOISON_LARGE):
        return -EHWPOISON if foll_flags & FOLL_HWPOISON else -EFAULT
    if vm_fault & (VM_FAULT_SIGBUS | VM_FAULT_SIGSEGV):
        return -EFAULT
    return 0


# enum fault_flag
FAULT_FLAG_WRITE = 1 << 0
FAULT_FLAG_MKWRITE = 1 << 1
FAULT_FLAG_ALLOW_RETRY = 1 << 2
FAULT_FLAG_RETRY_NOWAIT = 1 << 3
FAULT_FLAG_KILLABLE = 1 << 4
FAULT_FLAG_TRIED = 1 << 5
FAULT_FLAG_USER = 1 << 6
FAULT_FLAG_REMOTE = 1 << 7
FAULT_FLAG_INSTRUCTION = 1 << 8
FAULT_FLAG_INTERRUPTIBLE = 1 << 9
FAULT_FLAG_UNSHARE = 1 << 10
#: what a CPU fault starts with (``FAULT_FLAG_DEFAULT``): it may drop mmap_lock and retry
FAULT_FLAG_DEFAULT = FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE | FAULT_FLAG_INTERRUPTIBLE


class VmFault:
    """``struct vm_fault``: the state of one fault as it goes through the handlers."""

    __slots__ = ("vma", "address", "real_address", "flags", "pgoff", "pmd", "orig_pmd",
                 "orig_pte", "page", "cow_page")

    def __init__(self, vma: Vma, address: int, flags: int) -> None:
        self.vma = vma
        self.real_address = address
        self.address = address & PAGE_MASK
        self.flags = flags
        self.pgoff = vma.linear_page_index(self.address)
        self.pmd: PtRef | None = None
        self.orig_pmd = 0
        self.orig_pte = 0
        #: pfn of the page the fault resolved to (``vmf->page``), -1 if none
        self.page = -1
        self.cow_page = -1

    @property
    def pte_idx(self) -> int:
        return pte_index(self.address)


def mm_counter_file(sys: "System", pfn: int) -> int:
    """``mm_counter_file()``: shmem pages count as MM_SHMEMPAGES, others MM_FILEPAGES."""
    return MM_SHMEMPAGES if sys.mem.flags[sys.mem.compound_head(pfn)] & PG_swapbacked else MM_FILEPAGES
