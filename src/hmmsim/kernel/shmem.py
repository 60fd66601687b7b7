"""tmpfs: unlinked temporary files, shared anonymous memory and their page cache.

Models the parts of ``mm/shmem.c`` and ``mm/filemap.c`` that mappings use:
``shmem_file_setup`` (``O_TMPFILE`` files, ``MAP_SHARED|MAP_ANONYMOUS``),
``shmem_zero_setup``, ``shmem_mmap``, ``shmem_fault``, ``filemap_map_pages``
(fault-around), ``pread``/``pwrite`` and truncation. ``shmem_enabled=never``: no huge
pages in the page cache.

A cached page holds one reference for the page cache and one per pte mapping it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errno import EINVAL, ENOMEM
from .fault import set_pte_range
from .fs import FMODE_READ, FMODE_WRITE, File, FileOperations, Inode, SuperOperations
from .memory import unmap_mapping_pages
from .mm_types import (
    VM_FAULT_LOCKED,
    VM_FAULT_NOPAGE,
    VM_FAULT_OOM,
    VM_FAULT_SIGBUS,
    VmFault,
)
from .page_types import PAGE_SHIFT, PAGE_SIZE, pte_index
from .physmem import PG_swapbacked, PG_uptodate
from .userfaultfd_k import handle_userfault, userfaultfd_missing
from .vma import VM_UFFD_MISSING, VmOps

if TYPE_CHECKING:
    from .system import System
    from .vma import Vma

__all__ = (
    "filemap_map_pages", "shmem_evict_inode", "shmem_fault", "shmem_file_setup",
    "shmem_get_folio", "shmem_mmap", "shmem_ops", "shmem_pread", "shmem_pwrite",
    "shmem_truncate", "shmem_zero_setup",
)


def _i_pages(inode: Inode) -> int:
    """Pages covered by i_size (``DIV_ROUND_UP(i_size, PAGE_SIZE)``)."""
    return (inode.i_size + PAGE_SIZE - 1) >> PAGE_SHIFT


def shmem_get_folio(inode: Inode, index: int) -> int:
    """``shmem_get_folio(..., SGP_CACHE)``: the cached page at *index*, allocating a
    zeroed one if the file has a hole there. Returns the pfn or ``-ENOMEM``."""
    mapping = inode.i_mapping
    pfn = mapping.pages.get(index)
    if pfn is not None:
        return pfn
    mem = inode.sys.mem
    pfn = mem.alloc_page()
    if pfn < 0:
        return -ENOMEM
    mem.mapping[pfn] = mapping.mapping_id
    mem.index[pfn] = index
    mem.flags[pfn] |= PG_swapbacked | PG_uptodate
    mapping.pages[index] = pfn
    inode.sys.stats.add("shmem.alloc")
    return pfn


def shmem_fault(vmf: "VmFault") -> int:
    """``shmem_fault()``: find or allocate the page at ``vmf.pgoff``; returns
    ``VM_FAULT_SIGBUS`` past end of file, else ``VM_FAULT_LOCKED`` with ``vmf.page`` set
    and a reference taken for the mapping about to be made."""
    vma = vmf.vma
    assert vma.vm_file is not None and vma.vm_file.f_inode is not None
    inode = vma.vm_file.f_inode
    if vmf.pgoff >= _i_pages(inode):
        return VM_FAULT_SIGBUS
    if vmf.pgoff not in inode.i_mapping.pages and userfaultfd_missing(vma):
        # shmem_get_folio_gfp(): a hole of a MISSING-registered VMA goes to the userfaultfd
        return handle_userfault(vmf, VM_UFFD_MISSING)
    pfn = shmem_get_folio(inode, vmf.pgoff)
    if pfn < 0:
        return VM_FAULT_OOM
    inode.sys.mem.refcount[pfn] += 1
    vmf.page = pfn
    return VM_FAULT_LOCKED


def filemap_map_pages(vmf: "VmFault", start_pgoff: int, end_pgoff: int) -> int:
    """``filemap_map_pages()``: map the pages of ``[start_pgoff, end_pgoff]`` that are
    already cached (and within i_size) into empty ptes of the faulting table.

    Returns ``VM_FAULT_NOPAGE`` if the faulting address itself got mapped."""
    vma = vmf.vma
    assert vma.vm_file is not None and vma.vm_file.f_inode is not None
    inode = vma.vm_file.f_inode
    last = _i_pages(inode) - 1
    end_pgoff = min(end_pgoff, last)
    cache = inode.i_mapping.pages
    mm = vma.vm_mm
    pmd = vmf.pmd
    assert pmd is not None
    got = mm.pte_offset_map_lock(pmd, alloc=True)
    if got is None:
        return 0
    tbl, tid = got
    ret = 0
    try:
        base = vmf.address - ((vmf.pgoff - start_pgoff) << PAGE_SHIFT)
        for pgoff in range(start_pgoff, end_pgoff + 1):
            pfn = cache.get(pgoff)
            if pfn is None:
                continue
            addr = base + ((pgoff - start_pgoff) << PAGE_SHIFT)
            idx = pte_index(addr)
            if tbl[idx] != 0:
                continue
            inode.sys.mem.refcount[pfn] += 1
            set_pte_range(vmf, pfn, tbl, idx, addr, write=False, prefault=addr != vmf.address)
            if addr == vmf.address:
                ret = VM_FAULT_NOPAGE
            mm.sys.stats.add("fault.map_pages")
    finally:
        mm.pte_unmap_unlock(tid)
    return ret


shmem_vm_ops = VmOps("shmem", fault=shmem_fault, map_pages=filemap_map_pages)
shmem_anon_vm_ops = VmOps("shmem-anon", fault=shmem_fault, map_pages=filemap_map_pages)


def shmem_mmap(file: File, vma: "Vma") -> int:
    """``shmem_mmap()``."""
    vma.vm_ops = shmem_vm_ops
    return 0


shmem_file_operations = FileOperations("shmem", mmap=shmem_mmap)


def shmem_file_setup(system: "System", name: str, size: int, mode: int = FMODE_READ | FMODE_WRITE) -> File:
    """``shmem_file_setup()`` / ``open(O_TMPFILE)``: a new unlinked tmpfs file of *size*
    bytes (sparse: no page is allocated until touched)."""
    inode = Inode(system, shmem_ops, size, name)
    return File(inode, shmem_file_operations, mode, name=name)


def shmem_zero_setup(vma: "Vma") -> int:
    """``shmem_zero_setup()``: back a ``MAP_SHARED|MAP_ANONYMOUS`` VMA by a tmpfs object."""
    size = vma.vm_end - vma.vm_start
    f = shmem_file_setup(vma.vm_mm.sys, "dev/zero", size)
    vma.vm_file = f
    vma.vm_ops = shmem_anon_vm_ops
    return 0


def shmem_pwrite(inode: Inode, data: bytes | np.ndarray, offset: int) -> int:
    """``pwrite()`` on a tmpfs file: copy *data* into the page cache at *offset*,
    allocating pages and extending i_size. Returns bytes written or ``-ENOMEM``."""
    buf = np.frombuffer(bytes(data), np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()
    if offset < 0:
        return -EINVAL
    mem = inode.sys.mem
    pos = 0
    n = len(buf)
    while pos < n:
        index = (offset + pos) >> PAGE_SHIFT
        off = (offset + pos) & (PAGE_SIZE - 1)
        chunk = min(PAGE_SIZE - off, n - pos)
        pfn = shmem_get_folio(inode, index)
        if pfn < 0:
            break
        mem.data[pfn, off:off + chunk] = buf[pos:pos + chunk]
        mem.mark_written(pfn)
        pos += chunk
        inode.i_size = max(inode.i_size, offset + pos)
    if pos == 0 and n:
        return -ENOMEM
    return pos


def shmem_pread(inode: Inode, offset: int, count: int) -> bytes:
    """``pread()`` on a tmpfs file: up to *count* bytes from *offset*, stopping at i_size;
    holes read as zeros."""
    mem = inode.sys.mem
    end = min(offset + count, inode.i_size)
    out = bytearray()
    pos = offset
    while pos < end:
        index = pos >> PAGE_SHIFT
        off = pos & (PAGE_SIZE - 1)
        chunk = min(PAGE_SIZE - off, end - pos)
        pfn = inode.i_mapping.pages.get(index)
        if pfn is None:
            out += bytes(chunk)
        else:
            out += mem.data[pfn, off:off + chunk].tobytes()
        pos += chunk
    return bytes(out)


def _drop_cache_page(inode: Inode, index: int) -> None:
    pfn = inode.i_mapping.pages.pop(index)
    mem = inode.sys.mem
    mem.mapping[pfn] = 0
    mem.refcount[pfn] -= 1
    if mem.refcount[pfn] == 0:
        mem.free_pages([pfn])


def shmem_truncate(inode: Inode, size: int) -> int:
    """``ftruncate()``: set i_size; shrinking unmaps and frees the pages past the end."""
    if size < 0:
        return -EINVAL
    if size < inode.i_size:
        first = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
        unmap_mapping_pages(inode.i_mapping, first, None)
        for index in [i for i in inode.i_mapping.pages if i >= first]:
            _drop_cache_page(inode, index)
        if size & (PAGE_SIZE - 1):
            pfn = inode.i_mapping.pages.get(size >> PAGE_SHIFT)
            if pfn is not None:
                inode.sys.mem.data[pfn, size & (PAGE_SIZE - 1):] = 0
    inode.i_size = size
    return 0


def shmem_evict_inode(inode: Inode) -> None:
    """``shmem_evict_inode()``: free the page cache of an inode nobody refers to."""
    for index in list(inode.i_mapping.pages):
        _drop_cache_page(inode, index)


shmem_ops = SuperOperations("tmpfs", evict_inode=shmem_evict_inode)
