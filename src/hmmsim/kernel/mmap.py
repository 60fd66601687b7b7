"""mmap, munmap and VMA surgery.

Models ``mm/mmap.c`` (``ksys_mmap_pgoff``, ``do_mmap``, ``mmap_region``,
``get_unmapped_area``, ``__vm_enough_memory`` with the default heuristic overcommit) and
``mm/vma.c`` (``__split_vma``, merging of compatible neighbours, ``vma_modify``,
``do_vmi_munmap``). The caller holds mmap_lock for write (the syscall wrappers in
:mod:`hmmsim.kernel.task` take it).

Error returns follow the kernel: ``-EINVAL`` for a zero length or a misaligned address,
``-ENOMEM`` when accounting or address-space limits refuse, ``-EBADF``/``-EACCES``/
``-ENODEV`` for unusable files, ``-EEXIST`` for ``MAP_FIXED_NOREPLACE`` over a mapping.
Lengths and addresses are unsigned longs as in C: a negative Python int is huge.

>>> from hmmsim.kernel.system import System
>>> from hmmsim.kernel.task import vm_mmap, vm_munmap
>>> from hmmsim.kernel.vma import PROT_READ, PROT_WRITE
>>> mm = System(ram=256 << 20, hugetlb_pages=0).create_task("doc").mm
>>> a = vm_mmap(mm, None, 0, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
>>> [(v.vm_start - a, v.vm_end - a) for v in mm.vma_list()]
[(0, 32768)]
>>> vm_munmap(mm, a + 4096, 4096)            # a hole in the middle splits the VMA
0
>>> [(v.vm_start - a, v.vm_end - a) for v in mm.vma_list()]
[(0, 4096), (8192, 32768)]
>>> vm_munmap(mm, a, -4096)                  # size_t: huge, not "to the end" (-EINVAL)
-22
>>> vm_mmap(mm, None, 0, 0, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS)  # zero length: -EINVAL
-22
>>> vm_mmap(mm, None, 0, 1 << 30, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)  # > RAM: -ENOMEM
-12
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errno import EACCES, EEXIST, EINVAL, ENODEV, ENOMEM, EOVERFLOW
from .fs import FMODE_READ, FMODE_WRITE, File, fput, get_file
from .huge_memory import vma_adjust_trans_huge
from .hugetlb import hugetlb_file_setup, hugetlb_vm_op_close, is_file_hugepages
from .memory import free_pgtables, unmap_vmas
from .mm import MM, mmap_assert_write_locked
from .page_types import (
    HPAGE_PMD_SIZE,
    PAGE_ALIGN,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_MASK,
    TASK_SIZE,
    ULONG_MAX,
)
from .rmap import anon_vma_clone, unlink_anon_vmas
from .shmem import shmem_zero_setup
from .vma import (
    VM_ACCOUNT,
    VM_HUGETLB,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NORESERVE,
    VM_SHARED,
    VM_SOFTDIRTY,
    VM_SPECIAL,
    VM_WRITE,
    Vma,
    VmOps,
    calc_vm_prot_bits,
    vm_get_page_prot,
)

if TYPE_CHECKING:
    pass

__all__ = (
    "MAP_ANONYMOUS", "MAP_FIXED", "MAP_FIXED_NOREPLACE", "MAP_HUGETLB", "MAP_NORESERVE",
    "MAP_POPULATE", "MAP_PRIVATE", "MAP_SHARED", "do_mmap", "do_munmap", "get_unmapped_area",
    "remove_vma", "split_vma", "vm_enough_memory", "vma_dummy_vm_ops", "vma_modify",
    "vma_try_merge",
)

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_TYPE = 0x0F
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_HUGETLB = 0x40000
MAP_FIXED_NOREPLACE = 0x100000

#: ``sysctl_max_map_count``
MAX_MAP_COUNT = 65530
#: the top of the mmap area (``mm->mmap_base``) for top-down allocation
MMAP_BASE = 0x7F00_0000_0000
#: ``MAX_LFS_FILESIZE`` on 64-bit: the largest file offset (``file_mmap_size_max()``)
MAX_LFS_FILESIZE = (1 << 63) - 1
#: ``vma_init()`` gives file mappings these ops until the driver installs its own
vma_dummy_vm_ops = VmOps("dummy")


def vm_enough_memory(mm: MM, pages: int) -> int:
    """``__vm_enough_memory()`` with ``OVERCOMMIT_GUESS``: refuse only a request larger
    than all of RAM plus swap. Returns 0 or ``-ENOMEM``."""
    sys = mm.sys
    swap = sys.swap.nr - 1 if sys.swap is not None else 0
    if pages > sys.mem.totalram_pages + swap:
        sys.stats.add("mm.overcommit_refused")
        return -ENOMEM
    return 0


def get_unmapped_area(mm: MM, addr: int, length: int, flags: int, anon_thp: bool = False) -> int:
    """``get_unmapped_area()``: *addr* for MAP_FIXED, the hint if free, else the highest
    free gap below the mmap base (2 MiB aligned for anonymous mappings whose length is a
    multiple of 2 MiB, as 6.12 does). Returns the address or ``-ENOMEM``."""
    if length > TASK_SIZE:
        return -ENOMEM
    if flags & MAP_FIXED:
        if addr > TASK_SIZE - length:
            return -ENOMEM
        return addr
    if addr:
        addr = PAGE_ALIGN(addr)
        if addr <= TASK_SIZE - length and mm.find_vma_intersection(addr, addr + length) is None:
            return addr
    align = HPAGE_PMD_SIZE if anon_thp else PAGE_SIZE
    top = MMAP_BASE
    for vma in reversed(mm.vma_list()):
        if vma.vm_start >= top:
            top = min(top, vma.vm_start) if vma.vm_end > top else top
            continue
        cand = (top - length) & ~(align - 1)
        if cand >= vma.vm_end:
            return cand
        top = vma.vm_start
    cand = (top - length) & ~(align - 1)
    return cand if cand >= 0x10000 else -ENOMEM


# -- VMA surgery -------------------------------------------------------------------------------
def split_vma(mm: MM, vma: Vma, addr: int, new_below: bool) -> Vma | int:
    """``__split_vma()``: cut *vma* at *addr*. Returns the new VMA (the part below *addr*
    if *new_below*, else above), or a negative errno (``may_split`` refused, too many
    mappings)."""
    if vma.vm_ops is not None and vma.vm_ops.may_split is not None:
        err = vma.vm_ops.may_split(vma, addr)
        if err:
            return int(err)
    if mm.map_count >= MAX_MAP_COUNT:
        return -ENOMEM
    vma_adjust_trans_huge(vma, vma.vm_start, addr, 0) if new_below else vma_adjust_trans_huge(vma, addr, vma.vm_end, 0)
    new = vma.clone()
    mm.remove_vma(vma)
    if new_below:
        new.vm_end = addr
        vma.vm_pgoff += (addr - vma.vm_start) >> PAGE_SHIFT
        vma.vm_start = addr
    else:
        new.vm_start = addr
        new.vm_pgoff += (addr - vma.vm_start) >> PAGE_SHIFT
        vma.vm_end = addr
    mm.insert_vma(vma)
    mm.insert_vma(new)
    if new.vm_file is not None:
        get_file(new.vm_file)
        new.vm_file.f_inode.i_mapping.i_mmap.append(new) if new.vm_file.f_inode is not None else None
    mm.sys.stats.add("vma.split")
    return new


def _mergeable(a: Vma, b: Vma) -> bool:
    """Can *a* and *b* (adjacent, a below b) be one VMA (``is_mergeable_vma`` and
    ``is_mergeable_anon_vma`` and pgoff contiguity)."""
    if a.vm_end != b.vm_start:
        return False
    if (a.vm_flags ^ b.vm_flags) & ~VM_SOFTDIRTY:
        return False
    if a.vm_flags & VM_SPECIAL or a.vm_flags & VM_HUGETLB:
        return False
    if a.vm_file is not b.vm_file or a.vm_ops is not b.vm_ops:
        return False
    if a.vm_userfaultfd_ctx is not b.vm_userfaultfd_ctx:
        return False
    if a.vm_pgoff + a.pages() != b.vm_pgoff:
        return False
    if a.anon_vma is not None and b.anon_vma is not None:
        return a.anon_vma is b.anon_vma
    return True


def _merge(mm: MM, a: Vma, b: Vma) -> Vma:
    """Absorb *b* into *a* (``vma_expand`` + removal of *b*)."""
    mm.remove_vma(b)
    if a.anon_vma is None and b.anon_vma is not None:
        a.anon_vma = b.anon_vma
        anon_vma_clone(a, b)
    mm.resize_vma(a, a.vm_start, b.vm_end)
    a.vm_flags |= b.vm_flags & VM_SOFTDIRTY
    _unlink_vma(b)
    mm.sys.stats.add("vma.merge")
    return a


def vma_try_merge(mm: MM, vma: Vma) -> Vma:
    """Merge *vma* with its neighbours where the kernel would (``vma_merge``)."""
    prev = mm.find_vma(vma.vm_start - 1) if vma.vm_start else None
    if prev is not None and prev is not vma and prev.vm_end == vma.vm_start and _mergeable(prev, vma):
        vma = _merge(mm, prev, vma)
    nxt = mm.find_vma(vma.vm_end)
    if nxt is not None and nxt.vm_start == vma.vm_end and _mergeable(vma, nxt):
        vma = _merge(mm, vma, nxt)
    return vma


def vma_modify(mm: MM, vma: Vma, start: int, end: int) -> Vma | int:
    """``vma_modify()``: isolate ``[start, end)`` of *vma* as its own VMA (splitting as
    needed) so that the caller can change its flags. Returns the VMA or -errno."""
    if start > vma.vm_start:
        r = split_vma(mm, vma, start, new_below=True)
        if isinstance(r, int):
            return r
    if end < vma.vm_end:
        r = split_vma(mm, vma, end, new_below=False)
        if isinstance(r, int):
            return r
    return vma


def _unlink_vma(vma: Vma) -> None:
    """Detach a VMA that is going away: file and anon_vma references."""
    if vma.vm_file is not None:
        inode = vma.vm_file.f_inode
        if inode is not None and vma in inode.i_mapping.i_mmap:
            inode.i_mapping.i_mmap.remove(vma)
        fput(vma.vm_file)
    unlink_anon_vmas(vma)


def remove_vma(vma: Vma) -> None:
    """``remove_vma()``: ``vm_ops->close``, drop the file and anon_vma links."""
    if vma.vm_flags & VM_HUGETLB:
        hugetlb_vm_op_close(vma)
    _unlink_vma(vma)


# -- mmap ---------------------------------------------------------------------------------------
def do_mmap(mm: MM, file: File | None, addr: int, length: int, prot: int, flags: int, pgoff: int = 0) -> int:
    """``ksys_mmap_pgoff()`` + ``do_mmap()`` + ``mmap_region()``: map *length* bytes.

    :param file: ``struct file *`` or None for ``MAP_ANONYMOUS``
    :return: the address, or a negative errno (``-EINVAL``, ``-ENOMEM``, ``-EACCES``,
        ``-ENODEV``, ``-EEXIST``, ``-EOVERFLOW``, or what the driver's mmap returned)
    """
    mmap_assert_write_locked(mm)
    # the syscall's arguments are unsigned longs: a negative Python int is a huge value
    addr &= ULONG_MAX
    length &= ULONG_MAX
    pgoff &= ULONG_MAX
    own_file = False
    if file is None and flags & MAP_HUGETLB:
        if length == 0:
            return -EINVAL
        length = (length + HPAGE_PMD_SIZE - 1) & PMD_MASK & ULONG_MAX
        if length == 0 or length > TASK_SIZE:  # hugetlb_file_setup() cannot reserve it
            return -ENOMEM
        file = hugetlb_file_setup(mm.sys, length, bool(flags & MAP_SHARED))
        own_file = True
    elif file is not None:
        if is_file_hugepages(file):
            length = (length + HPAGE_PMD_SIZE - 1) & PMD_MASK & ULONG_MAX
        elif flags & MAP_HUGETLB:
            return -EINVAL
    try:
        return _do_mmap(mm, file, addr, length, prot, flags, pgoff)
    finally:
        if own_file and file is not None:
            fput(file)


def _do_mmap(mm: MM, file: File | None, addr: int, length: int, prot: int, flags: int, pgoff: int) -> int:
    if not length:
        return -EINVAL
    length = PAGE_ALIGN(length)
    if not length:
        return -ENOMEM
    if mm.map_count > MAX_MAP_COUNT:
        return -ENOMEM
    is_huge = is_file_hugepages(file)
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        if addr & (PAGE_SIZE - 1) or (is_huge and addr & (HPAGE_PMD_SIZE - 1)):
            return -EINVAL
    anon_thp = (file is None and not flags & MAP_SHARED and length >= HPAGE_PMD_SIZE
                and length % HPAGE_PMD_SIZE == 0 and not addr)
    fixed = bool(flags & (MAP_FIXED | MAP_FIXED_NOREPLACE))
    if is_huge and addr and not fixed:
        # hugetlb_get_unmapped_area(): the hint is rounded up to the huge page size
        addr = (addr + HPAGE_PMD_SIZE - 1) & PMD_MASK
    # hugetlbfs files get huge-page aligned addresses (info.align_mask), like big anon ones
    addr = get_unmapped_area(mm, addr, length, MAP_FIXED if fixed else 0, anon_thp or is_huge)
    if addr < 0:
        return addr
    if is_huge and addr & (HPAGE_PMD_SIZE - 1):
        return -EINVAL
    if flags & MAP_FIXED_NOREPLACE and mm.find_vma_intersection(addr, addr + length) is not None:
        return -EEXIST
    vm_flags = calc_vm_prot_bits(prot) | mm.def_flags | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
    mtype = flags & MAP_TYPE
    if file is not None:
        if mtype in (MAP_SHARED, 0x03):
            if prot & 2 and not file.f_mode & FMODE_WRITE:
                return -EACCES
            vm_flags |= VM_SHARED | VM_MAYSHARE
            if not file.f_mode & FMODE_WRITE:
                vm_flags &= ~(VM_MAYWRITE | VM_SHARED)
        elif mtype != MAP_PRIVATE:
            return -EINVAL
        if not file.f_mode & FMODE_READ:
            return -EACCES
        if file.f_op.mmap is None:
            return -ENODEV
        if (pgoff + (length >> PAGE_SHIFT)) & ULONG_MAX < pgoff:
            return -EOVERFLOW
        # file_mmap_ok(): the mapping must end within the largest file size
        if length > MAX_LFS_FILESIZE or pgoff > (MAX_LFS_FILESIZE - length) >> PAGE_SHIFT:
            return -EOVERFLOW
    else:
        if mtype == MAP_SHARED:
            pgoff = 0
            vm_flags |= VM_SHARED | VM_MAYSHARE
        elif mtype == MAP_PRIVATE:
            pgoff = addr >> PAGE_SHIFT
        else:
            return -EINVAL
    if flags & MAP_NORESERVE:
        vm_flags |= VM_NORESERVE
    return mmap_region(mm, file, addr, length, vm_flags, pgoff)


def mmap_region(mm: MM, file: File | None, addr: int, length: int, vm_flags: int, pgoff: int) -> int:
    """``mmap_region()``: unmap what is in the way, account, create and link the VMA, and
    let the file's ``mmap`` (tmpfs, hugetlbfs, a driver) set it up."""
    end = addr + length
    sys = mm.sys
    if mm.find_vma_intersection(addr, end) is not None:
        ret = do_munmap(mm, addr, length)
        if ret:
            return ret
    is_huge = is_file_hugepages(file)
    accountable = not is_huge and (vm_flags & (VM_NORESERVE | VM_SHARED | VM_WRITE)) == VM_WRITE
    if accountable:
        if vm_enough_memory(mm, length >> PAGE_SHIFT):
            return -ENOMEM
        vm_flags |= VM_ACCOUNT
    elif file is None and vm_flags & VM_SHARED and not vm_flags & VM_NORESERVE:
        if vm_enough_memory(mm, length >> PAGE_SHIFT):  # shmem_acct_size()
            return -ENOMEM
    vma = Vma(mm, addr, end, vm_flags, pgoff)
    if file is not None:
        vma.vm_ops = vma_dummy_vm_ops
        vma.vm_file = get_file(file)
        mm.insert_vma(vma)
        assert file.f_op.mmap is not None
        err = file.f_op.mmap(file, vma)
        if err:
            unmap_vmas(mm, [vma], vma.vm_start, vma.vm_end)
            mm.remove_vma(vma)
            free_pgtables(mm, vma.vm_start, vma.vm_end, 0, 0)
            fput(file)
            vma.vm_file = None
            return int(err)
        if file.f_inode is not None:
            file.f_inode.i_mapping.i_mmap.append(vma)
    elif vm_flags & VM_SHARED:
        shmem_zero_setup(vma)
        assert vma.vm_file is not None and vma.vm_file.f_inode is not None
        vma.vm_file.f_inode.i_mapping.i_mmap.append(vma)
        mm.insert_vma(vma)
    else:
        vma.vm_ops = None
        mm.insert_vma(vma)
    vma.vm_flags |= VM_SOFTDIRTY
    vma.vm_page_prot = vm_get_page_prot(vma.vm_flags)
    vma_try_merge(mm, vma)
    sys.stats.add("mm.mmap")
    return addr


# -- munmap -------------------------------------------------------------------------------------
def do_munmap(mm: MM, start: int, length: int) -> int:
    """``do_vmi_munmap()``: unmap ``[start, start + length)``.

    Splits the VMAs at the edges (which may fail, e.g. inside a hugetlb page), zaps the
    range under one ``MMU_NOTIFY_UNMAP`` invalidation of the whole request, frees page
    tables no VMA needs, and removes the VMAs. Returns 0 or ``-EINVAL``/``-ENOMEM``
    (*start* and *length* are unsigned: a negative length is huge, hence ``-EINVAL``)."""
    start &= ULONG_MAX
    length &= ULONG_MAX
    if start & (PAGE_SIZE - 1) or start > TASK_SIZE or length > TASK_SIZE - start:
        return -EINVAL
    end = start + PAGE_ALIGN(length)
    if end == start:
        return -EINVAL
    first = mm.find_vma(start)
    if first is None or first.vm_start >= end:
        return 0
    if start > first.vm_start:
        r = split_vma(mm, first, start, new_below=True)
        if isinstance(r, int):
            return r
    last = None
    for v in mm.vmas(start, end):
        last = v
    if last is not None and last.vm_end > end:
        r = split_vma(mm, last, end, new_below=False)
        if isinstance(r, int):
            return r
    doomed = list(mm.vmas(start, end))
    prev = mm.find_vma(start - 1) if start else None
    floor = prev.vm_end if prev is not None and prev.vm_end <= start else 0
    nxt = mm.find_vma(end)
    ceiling = nxt.vm_start if nxt is not None else 0
    for v in doomed:
        mm.remove_vma(v)
    unmap_vmas(mm, doomed, start, end)
    free_pgtables(mm, start, end, floor, ceiling)
    for v in doomed:
        remove_vma(v)
    mm.sys.stats.add("mm.munmap")
    return 0
