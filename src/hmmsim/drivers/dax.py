"""A device-dax character device (``drivers/dax/device.c``): memory that is mapped with
PUD (1 GiB) or PMD (2 MiB) leaves, the one way a PUD leaf appears in a process's page
tables and therefore the way to exercise ``hmm_vma_walk_pud``.

The memory is taken from RAM at creation (as ``memmap=`` does for emulated pmem) so that
the CPU can read and write it, and registered as a ``MEMORY_DEVICE_GENERIC`` pagemap.
Mappings must be ``MAP_SHARED`` and aligned to the device's alignment; faults insert
devmap leaves of that size (``dev_dax_huge_fault``), smaller faults get ``SIGBUS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..kernel.errno import EINVAL, ENOMEM
from ..kernel.fs import FMODE_READ, FMODE_WRITE, File, FileOperations
from ..kernel.memremap import DevPagemap, DevPagemapOps, MemoryType, pagemap_range
from ..kernel.mm_types import (
    FAULT_FLAG_WRITE,
    VM_FAULT_FALLBACK,
    VM_FAULT_NOPAGE,
    VM_FAULT_SIGBUS,
    VmFault,
)
from ..kernel.page_types import (
    HPAGE_PMD_ORDER,
    HPAGE_PUD_ORDER,
    PAGE_SHIFT,
    PMD_SIZE,
    PUD_SIZE,
)
from ..kernel.pgtable import (
    _PAGE_DEVMAP,
    _PAGE_DIRTY,
    _PAGE_PSE,
    _PAGE_RW,
    pfn_pte,
    pte_mkyoung,
)
from ..kernel.physmem import PG_reserved
from ..kernel.vma import VM_HUGEPAGE, VM_MIXEDMAP, VM_SHARED, VM_WRITE, VmOps

if TYPE_CHECKING:
    from ..kernel.system import System
    from ..kernel.vma import Vma

__all__ = ("DevDax", "devdax_create")


class DevDax:
    """``struct dev_dax``: *nr_pages* of memory at *start_pfn*, mapped in *align* units."""

    def __init__(self, sys: "System", start_pfn: int, nr_pages: int, align: int) -> None:
        self.sys = sys
        self.start_pfn = start_pfn
        self.nr_pages = nr_pages
        self.align = align
        self.pgmap = DevPagemap(MemoryType.MEMORY_DEVICE_GENERIC, start_pfn, nr_pages,
                                DevPagemapOps(page_free=lambda pfn: None), owner=self)

    def open(self) -> File:
        """``open("/dev/daxX.Y")``."""
        return File(None, dax_fops, FMODE_READ | FMODE_WRITE, private_data=self, name="dax")


def devdax_create(sys: "System", size: int = PUD_SIZE, align: int = PUD_SIZE) -> DevDax | int:
    """Carve *size* bytes of 1 GiB-aligned free RAM into a device-dax instance."""
    mem = sys.mem
    nr = size >> PAGE_SHIFT
    step = PUD_SIZE >> PAGE_SHIFT
    if align not in (PMD_SIZE, PUD_SIZE) or size % align:
        return -EINVAL
    for start in range(step, mem.ram_pages - nr + 1, step):
        if mem._free[start:start + nr].all():
            pfns = np.arange(start, start + nr, dtype=np.int64)
            mem._take(pfns)
            mem.flags[start:start + nr] |= PG_reserved
            dax = DevDax(sys, start, nr, align)
            # RAM taken out of the allocator (as memmap= does), so memremap_pages()'s
            # "not System RAM" check does not apply: register the GENERIC pgmap directly
            pagemap_range(sys, dax.pgmap)
            return dax
    return -ENOMEM


def dev_dax_mmap(file: File, vma: "Vma") -> int:
    """``dax_mmap()``: shared, aligned mappings only."""
    dax: DevDax = file.private_data
    if not vma.vm_flags & VM_SHARED:
        return -EINVAL
    if vma.vm_start % dax.align or vma.vm_end % dax.align:
        return -EINVAL
    vma.vm_ops = dax_vm_ops
    vma.vm_flags |= VM_HUGEPAGE | VM_MIXEDMAP
    return 0


def dev_dax_huge_fault(vmf: "VmFault", order: int) -> int:
    """``dev_dax_huge_fault()``: insert a leaf of the device's alignment (a devmap leaf on
    kernels that have devmap, ``profile.pte_devmap``)."""
    vma = vmf.vma
    assert vma.vm_file is not None
    dax: DevDax = vma.vm_file.private_data
    size = 1 << (order + PAGE_SHIFT)
    if size != dax.align:
        return VM_FAULT_FALLBACK
    base = vmf.address & ~(size - 1)
    pgoff = vma.linear_page_index(base)
    if pgoff + (size >> PAGE_SHIFT) > dax.nr_pages:
        return VM_FAULT_SIGBUS
    devmap = _PAGE_DEVMAP if vma.vm_mm.sys.profile.pte_devmap else 0
    e = pte_mkyoung(pfn_pte(dax.start_pfn + pgoff, vma.vm_page_prot) | _PAGE_PSE | devmap)
    if vmf.flags & FAULT_FLAG_WRITE and vma.vm_flags & VM_WRITE:
        e |= _PAGE_RW | _PAGE_DIRTY
    mm = vma.vm_mm
    if order == HPAGE_PUD_ORDER:
        pud = mm.pud_entry(base)
        assert pud is not None
        pud[0][pud[1]] = e
    elif order == HPAGE_PMD_ORDER:
        pmd = mm.pmd_ref(base, alloc=True)
        assert pmd is not None
        pmd.set(e)
    else:
        return VM_FAULT_SIGBUS
    return VM_FAULT_NOPAGE


def dev_dax_fault(vmf: "VmFault") -> int:
    """``dev_dax_fault()``: a page-size fault on a device with larger alignment."""
    return VM_FAULT_SIGBUS


dax_vm_ops = VmOps("device-dax", fault=dev_dax_fault, huge_fault=dev_dax_huge_fault)
dax_fops = FileOperations("dax", mmap=dev_dax_mmap)

