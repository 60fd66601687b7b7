"""mremap: moving and resizing mappings.

Models ``mm/mremap.c``: the syscall's argument checks, ``mremap_to`` (MREMAP_FIXED:
unmap the destination first, then move), ``vma_to_resize`` (a range spanning VMAs is
``-EFAULT``; DONTUNMAP refuses VM_DONTEXPAND/VM_PFNMAP), ``move_vma`` (copy the VMA,
move the page tables, then unmap the old range unless MREMAP_DONTUNMAP) and
``move_page_tables`` under one ``MMU_NOTIFY_UNMAP`` of the old range (7.3's
``remap_move`` does this for every VMA of a fixed same-size move's range): whole pmds move
when source and destination are 2 MiB aligned (a PMD-mapped THP stays PMD-mapped),
other huge pmds are split, ptes move one by one with their state (device-private and
migration entries included); the pages keep their anon index, so rmap still finds them.
"""

from __future__ import annotations

from .errno import EFAULT, EINVAL, ENOMEM
from .fs import get_file
from .huge_memory import __split_huge_pmd, move_huge_pmd
from .hugetlb import ResvMap
from .mm import MM, set_ptes
from .mmap import do_munmap, get_unmapped_area, vm_enough_memory, vma_try_merge
from .mmu_notifier import MmuNotifierEvent, notify_range
from .page_types import (
    HPAGE_PMD_SIZE,
    PAGE_ALIGN,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_MASK,
    PMD_SIZE,
    TASK_SIZE,
    ULONG_MAX,
    pte_index,
)
from .pgtable import pmd_leaf, pmd_present
from .rmap import unlink_anon_vmas
from .vma import (
    VM_ACCOUNT,
    VM_DONTEXPAND,
    VM_HUGETLB,
    VM_LOCKED,
    VM_MAYSHARE,
    VM_PFNMAP,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    Vma,
)

__all__ = ("MREMAP_DONTUNMAP", "MREMAP_FIXED", "MREMAP_MAYMOVE", "do_mremap", "move_page_tables")

MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4


def move_page_tables(vma: Vma, old_addr: int, new_vma: Vma, new_addr: int, length: int) -> int:
    """``move_page_tables()``: move the entries of ``[old_addr, old_addr + length)`` to
    *new_addr*. Returns the length moved."""
    mm = vma.vm_mm
    if not length:
        return 0
    old_end = old_addr + length
    with notify_range(MmuNotifierEvent.MMU_NOTIFY_UNMAP, mm, old_addr, old_end):
        if vma.vm_flags & VM_HUGETLB:
            for off in range(0, length, HPAGE_PMD_SIZE):
                src = mm.pmd_ref(old_addr + off)
                if src is None or src.get() == 0:
                    continue
                dst = mm.pmd_ref(new_addr + off, alloc=True)
                assert dst is not None
                dst.set(src.get())
                src.set(0)
            return length
        while old_addr < old_end:
            nxt_old = min((old_addr + PMD_SIZE) & PMD_MASK, old_end)
            extent = min(nxt_old - old_addr, ((new_addr + PMD_SIZE) & PMD_MASK) - new_addr)
            src = mm.pmd_ref(old_addr)
            if src is None or src.get() == 0:
                old_addr += extent
                new_addr += extent
                continue
            dst = mm.pmd_ref(new_addr, alloc=True)
            assert dst is not None
            e = src.get()
            if not pmd_present(e) or pmd_leaf(e):
                if extent == HPAGE_PMD_SIZE and dst.get() == 0:
                    if move_huge_pmd(vma, src, dst):
                        old_addr += extent
                        new_addr += extent
                        continue
                __split_huge_pmd(vma, src, old_addr)
            elif extent == PMD_SIZE and dst.get() == 0:
                # move_normal_pmd(): hand the whole pte table over
                dst.set(src.get())
                src.set(0)
                old_addr += extent
                new_addr += extent
                continue
            if src.get() == 0:
                old_addr += extent
                new_addr += extent
                continue
            # move_ptes()
            gs = mm.pte_offset_map_lock(src)
            assert gs is not None
            stbl, stid = gs
            gd = mm.pte_offset_map_lock(dst, alloc=True)
            assert gd is not None
            dtbl, dtid = gd
            try:
                n = extent >> PAGE_SHIFT
                si = pte_index(old_addr)
                di = pte_index(new_addr)
                seg = stbl[si:si + n].copy()
                set_ptes(vma.vm_mm, stbl, si, 0, n)
                nz = seg != 0
                dtbl[di:di + n][nz] = seg[nz]
            finally:
                mm.pte_unmap_unlock(dtid)
                mm.pte_unmap_unlock(stid)
            old_addr += extent
            new_addr += extent
    mm.sys.stats.add("mremap.move_page_tables")
    return length


def _copy_vma(mm: MM, vma: Vma, new_addr: int, length: int, pgoff: int) -> Vma:
    """``copy_vma()``: a new VMA at *new_addr* like *vma*, sharing its file and anon_vmas."""
    new = vma.clone()
    new.vm_start = new_addr
    new.vm_end = new_addr + length
    new.vm_pgoff = pgoff
    if new.vm_file is not None:
        get_file(new.vm_file)
        if new.vm_file.f_inode is not None:
            new.vm_file.f_inode.i_mapping.i_mmap.append(new)
    mm.insert_vma(new)
    return new


def _move_vma(mm: MM, vma: Vma, old_addr: int, old_len: int, new_len: int, new_addr: int, flags: int) -> int:
    """``move_vma()``."""
    to_account = new_len - old_len
    if flags & MREMAP_DONTUNMAP:
        to_account = new_len
    if vma.vm_ops is not None and vma.vm_ops.may_split is not None:
        err = 0
        if vma.vm_start != old_addr:
            err = vma.vm_ops.may_split(vma, old_addr)
        if not err and vma.vm_end != old_addr + old_len:
            err = vma.vm_ops.may_split(vma, old_addr + old_len)
        if err:
            return int(err)
    if vma.vm_flags & VM_ACCOUNT and to_account > 0 and vm_enough_memory(mm, to_account >> PAGE_SHIFT):
        return -ENOMEM
    new_pgoff = vma.vm_pgoff + ((old_addr - vma.vm_start) >> PAGE_SHIFT)
    new_vma = _copy_vma(mm, vma, new_addr, new_len, new_pgoff)
    move_page_tables(vma, old_addr, new_vma, new_addr, old_len)
    if vma.vm_flags & VM_HUGETLB:
        if isinstance(vma.vm_private_data, ResvMap):
            new_vma.vm_private_data = vma.vm_private_data
            vma.vm_private_data = None
    if flags & MREMAP_DONTUNMAP:
        vma.vm_flags &= ~VM_LOCKED
        if vma.vm_start == old_addr and vma.vm_end == old_addr + old_len:
            unlink_anon_vmas(vma)
            vma.anon_vma = None
        vma_try_merge(mm, new_vma)
        return new_addr
    if vma.vm_flags & VM_ACCOUNT:
        vma.vm_flags &= ~VM_ACCOUNT
    do_munmap(mm, old_addr, old_len)
    vma_try_merge(mm, new_vma)
    return new_addr


def do_mremap(mm: MM, addr: int, old_len: int, new_len: int, flags: int, new_addr: int = 0) -> int:
    """The ``mremap()`` syscall: returns the new address or a negative errno. Every
    argument is an unsigned long (``check_mremap_params()``): a negative length is huge
    (``-EINVAL``)."""
    addr &= ULONG_MAX
    old_len &= ULONG_MAX
    new_len &= ULONG_MAX
    new_addr &= ULONG_MAX
    if flags & ~(MREMAP_FIXED | MREMAP_MAYMOVE | MREMAP_DONTUNMAP):
        return -EINVAL
    if flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE:
        return -EINVAL
    if flags & MREMAP_DONTUNMAP and (not flags & MREMAP_MAYMOVE or old_len != new_len):
        return -EINVAL
    if addr & (PAGE_SIZE - 1):
        return -EINVAL
    old_len = PAGE_ALIGN(old_len)
    new_len = PAGE_ALIGN(new_len)
    if not new_len or new_len > TASK_SIZE:
        return -EINVAL
    if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP) and new_addr > TASK_SIZE - new_len:
        return -EINVAL
    mm.mmap_lock.down_write()
    try:
        mm.sys.stats.add("mm.mremap")
        vma = mm.vma_lookup(addr)
        if vma is None:
            return -EFAULT
        if vma.vm_flags & VM_HUGETLB:
            old_len = (old_len + HPAGE_PMD_SIZE - 1) & PMD_MASK
            new_len = (new_len + HPAGE_PMD_SIZE - 1) & PMD_MASK
            if addr & ~PMD_MASK or new_addr & ~PMD_MASK or new_len > old_len:
                return -EINVAL
        if flags & MREMAP_FIXED and old_len == new_len and mm.sys.profile.mremap_move_multiple_vmas:
            return _remap_move(mm, addr, old_len, new_addr, flags)
        if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
            return _mremap_to(mm, addr, old_len, new_addr, new_len, flags)
        # in-place shrink / same size / (no expansion support beyond moving)
        if old_len >= new_len:
            if old_len > new_len:
                ret = do_munmap(mm, addr + new_len, old_len - new_len)
                if ret:
                    return ret
            return addr
        vma = _vma_to_resize(mm, addr, old_len, new_len, flags)
        if isinstance(vma, int):
            return vma
        # old_len reaches the end of the VMA: expand in place if the space after it is
        # free (vma_expandable() + vma_merge_extend())
        if old_len == vma.vm_end - addr:
            delta = new_len - old_len
            end = vma.vm_end + delta
            if end <= TASK_SIZE and mm.find_vma_intersection(vma.vm_end, end) is None:
                if vma.vm_flags & VM_ACCOUNT and vm_enough_memory(mm, delta >> PAGE_SHIFT):
                    return -ENOMEM
                mm.resize_vma(vma, vma.vm_start, end)
                vma_try_merge(mm, vma)
                return addr
        if not flags & MREMAP_MAYMOVE:
            return -ENOMEM
        dst = get_unmapped_area(mm, 0, new_len, 0)
        if dst < 0:
            return dst
        return _move_vma(mm, vma, addr, old_len, new_len, dst, flags)
    finally:
        mm.mmap_lock.up_write()


def _remap_move(mm: MM, addr: int, length: int, new_addr: int, flags: int) -> int:
    """``remap_move()`` (7.3, ``mremap_move_multiple_vmas``): a fixed move without resize
    moves every VMA of ``[addr, addr + length)``, split at the range's edges, one
    ``mremap_to()`` each, keeping the gaps between them; a gap at the start (or no VMA) is
    ``-EFAULT``. A failure after the first VMA moved returns its errno and leaves the
    moved VMAs moved, as the kernel does. Returns the first VMA's new address."""
    if new_addr & (PAGE_SIZE - 1):
        return -EINVAL
    if length > TASK_SIZE or new_addr > TASK_SIZE - length:
        return -EINVAL
    if addr + length > new_addr and new_addr + length > addr:
        return -EINVAL
    end = addr + length
    pieces: list[tuple[int, int, bool, int]] = []
    cur = addr
    while cur < end:
        vma = mm.find_vma(cur)
        if vma is None or vma.vm_start >= end:
            break
        if not pieces and vma.vm_start > addr:
            return -EFAULT
        lo = max(vma.vm_start, addr)
        pieces.append((lo, min(end, vma.vm_end) - lo, _vma_multi_allowed(vma), vma.vm_end))
        cur = vma.vm_end
    if not pieces:
        return -EFAULT
    res = -EFAULT
    target = new_addr
    last_end = pieces[0][0]
    for k, (lo, n, allowed, vm_end) in enumerate(pieces):
        # a VMA that cannot be part of a multi-VMA move: after others moved, or first of
        # several, the call fails
        if not allowed and (k > 0 or vm_end < end):
            return -EFAULT
        target += lo - last_end
        last_end = lo + n
        got = _mremap_to(mm, lo, n, target, n, flags)
        if got < 0:
            return got
        if k == 0:
            res = got
        target = got + n
    return res


def _vma_multi_allowed(vma: Vma) -> bool:
    """``vma_multi_allowed()`` (7.3): not userfaultfd-armed (its notification needs
    mmap_lock dropped) and no file ``get_unmapped_area`` that could ignore MREMAP_FIXED
    (the model's files, tmpfs and device files, have none)."""
    return not vma.vm_flags & (VM_UFFD_MISSING | VM_UFFD_WP)


def _vma_to_resize(mm: MM, addr: int, old_len: int, new_len: int, flags: int) -> Vma | int:
    """``vma_to_resize()``."""
    vma = mm.vma_lookup(addr)
    if vma is None:
        return -EFAULT
    if not old_len and not vma.vm_flags & VM_MAYSHARE:
        return -EINVAL
    if flags & MREMAP_DONTUNMAP and vma.vm_flags & (VM_DONTEXPAND | VM_PFNMAP):
        return -EINVAL
    if old_len > vma.vm_end - addr:
        return -EFAULT
    if new_len == old_len:
        return vma
    if vma.vm_flags & (VM_DONTEXPAND | VM_PFNMAP):
        return -EFAULT
    return vma


def _mremap_to(mm: MM, addr: int, old_len: int, new_addr: int, new_len: int, flags: int) -> int:
    """``mremap_to()``."""
    if new_addr & (PAGE_SIZE - 1):
        return -EINVAL
    if new_len > TASK_SIZE or new_addr > TASK_SIZE - new_len:
        return -EINVAL
    if addr + old_len > new_addr and new_addr + new_len > addr:
        return -EINVAL
    if flags & MREMAP_FIXED:
        ret = do_munmap(mm, new_addr, new_len)
        if ret:
            return ret
    if old_len > new_len:
        ret = do_munmap(mm, addr + new_len, old_len - new_len)
        if ret:
            return ret
        old_len = new_len
    vma = _vma_to_resize(mm, addr, old_len, new_len, flags)
    if isinstance(vma, int):
        return vma
    if not flags & MREMAP_FIXED:
        new_addr = get_unmapped_area(mm, new_addr, new_len, 0)
        if new_addr < 0:
            return new_addr
    # the moved part becomes its own VMA first (split at the range's edges)
    if vma.vm_start < addr or vma.vm_end > addr + old_len:
        if vma.vm_ops is not None and vma.vm_ops.may_split is not None:
            for cut in (addr, addr + old_len):
                if vma.vm_start < cut < vma.vm_end and vma.vm_ops.may_split(vma, cut):
                    return -EINVAL
    return _move_vma(mm, vma, addr, old_len, new_len, new_addr, flags)
