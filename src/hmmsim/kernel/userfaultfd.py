"""userfaultfd: user-space handling of page faults (``mm/userfaultfd.c``, which holds
``fs/userfaultfd.c`` too since 7.3; ``include/uapi/linux/userfaultfd.h``).

Modelled: ``userfaultfd()``, ``UFFDIO_API``, ``UFFDIO_REGISTER`` / ``UFFDIO_UNREGISTER`` in
MISSING mode on anonymous, shmem and hugetlb VMAs, reading ``UFFD_EVENT_PAGEFAULT``
messages (``read()``/``poll()``), ``UFFDIO_COPY``, ``UFFDIO_ZEROPAGE`` and ``UFFDIO_WAKE``,
the release of the file, and fork without UFFD_FEATURE_EVENT_FORK (the child's VMAs lose
the registration). 6.12 and 7.3 agree on all of this (checked on both kernels with the
scenarios in ``tests/scenario/recorded/uffd_*``).

A fault in a MISSING-registered range with no page calls :func:`handle_userfault`: when
the fault may drop ``mmap_lock`` (``FAULT_FLAG_ALLOW_RETRY``) the faulting thread queues a
message, drops the lock, sleeps until a ``UFFDIO_COPY``/``ZEROPAGE``/``WAKE`` covering its
address wakes it and returns ``VM_FAULT_RETRY``; otherwise the fault fails with
``VM_FAULT_SIGBUS`` (which is what the locked ``hmm_range_fault()`` and GUP without
FOLL_UNLOCKABLE get). Sleeping needs another simulated thread to answer: run the faulting
code and the handler under a :class:`~hmmsim.kernel.sched.Scheduler`; with nobody to
answer the sleep is reported as a deadlock.

::

    fault in a MISSING range       handler thread
    ------------------------       --------------
    msg -> fault_pending_wqh
    mmap_read_unlock()
    sleep .................... poll() -> read(msg)  (msg moves to fault_wqh)
                                UFFDIO_COPY: page installed, wake_userfault()
    <- woken: VM_FAULT_RETRY
    retake mmap_lock, fault again: the pte is there
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .cpu import copy_from_user
from .errno import EAGAIN, EBUSY, EEXIST, EFAULT, EINVAL, ENOENT, ENOMEM, EPERM, ESRCH
from .fs import FMODE_READ, File, FileOperations
from .ioctl import _IOR, _IOWR
from .mm import (
    MM_ANONPAGES,
    MM_SHMEMPAGES,
    mmap_read_lock,
    mmap_read_unlock,
    mmap_write_lock,
    mmap_write_unlock,
    set_pte_at,
)
from .mmap import vma_modify, vma_try_merge
from .page_types import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from .pgtable import (
    pfn_pte,
    pmd_leaf,
    pmd_present,
    pte_mkdirty,
    pte_mkspecial,
    pte_mkwrite,
)
from .rmap import anon_vma_prepare, folio_add_file_rmap_ptes, folio_add_new_anon_rmap
from .shmem import shmem_get_folio
from .userfaultfd_k import (
    UFFD_EVENT_PAGEFAULT,
    UFFD_PAGEFAULT_FLAG_WRITE,
    UFFD_USER_MODE_ONLY,
    UffdMsg,
    UserfaultfdCtx,
    dup_userfaultfd,
    handle_userfault,
    userfaultfd_missing,
    wake_userfault,
)
from .vma import (
    VM_HUGETLB,
    VM_MAYWRITE,
    VM_SHARED,
    VM_SPECIAL,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
    Vma,
)

if TYPE_CHECKING:
    from .mm import MM
    from .task import Task

__all__ = (
    "O_CLOEXEC", "O_NONBLOCK", "UFFDIO_API", "UFFDIO_COPY", "UFFDIO_COPY_MODE_DONTWAKE",
    "UFFDIO_REGISTER", "UFFDIO_REGISTER_MODE_MISSING", "UFFDIO_REGISTER_MODE_WP", "UFFDIO_UNREGISTER",
    "UFFDIO_WAKE", "UFFDIO_ZEROPAGE", "UFFDIO_ZEROPAGE_MODE_DONTWAKE", "UFFD_API",
    "UFFD_EVENT_PAGEFAULT", "UFFD_PAGEFAULT_FLAG_WRITE", "UFFD_USER_MODE_ONLY", "UffdMsg",
    "UffdioApi", "UffdioCopy", "UffdioRange", "UffdioRegister", "UffdioZeropage", "UserfaultfdCtx",
    "dup_userfaultfd", "handle_userfault", "new_userfaultfd", "userfaultfd_fops", "userfaultfd_missing",
    "userfaultfd_poll", "userfaultfd_read",
)

# -- the ABI (include/uapi/linux/userfaultfd.h) ----------------------------------------------------
UFFD_API = 0xAA
UFFDIO = 0xAA
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000
#: ``userfaultfd(UFFD_USER_MODE_ONLY)``: only faults from user mode are handled
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
_UFFDIO_REGISTER, _UFFDIO_UNREGISTER, _UFFDIO_WAKE, _UFFDIO_COPY, _UFFDIO_ZEROPAGE = 0, 1, 2, 3, 4
_UFFDIO_API = 0x3F


UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, 24)
UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, 32)
UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, 16)
UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, 16)
UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, 40)
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, 32)
#: the ioctls a registered range supports (``UFFD_API_RANGE_IOCTLS`` without WP/CONTINUE/POISON/MOVE)
UFFD_API_RANGE_IOCTLS = (1 << _UFFDIO_WAKE) | (1 << _UFFDIO_COPY) | (1 << _UFFDIO_ZEROPAGE)
UFFD_API_IOCTLS = (1 << _UFFDIO_REGISTER) | (1 << _UFFDIO_UNREGISTER) | (1 << _UFFDIO_API)
#: ``UFFD_API_REGISTER_MODES`` the model accepts; WP and MINOR are -EINVAL here
_REGISTER_MODES = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MINOR
#: the address space a task can use (x86-64 ``TASK_SIZE``) and ``mmap_min_addr``
_TASK_SIZE = (1 << 47) - PAGE_SIZE
_MMAP_MIN_ADDR = 0x10000
#: the default hstate's page size (hugetlb ranges register in whole huge pages)
_HPAGE_SIZE = 1 << 21


@dataclass
class UffdioApi:
    """``struct uffdio_api``."""
    api: int = UFFD_API
    features: int = 0
    ioctls: int = 0


@dataclass
class UffdioRange:
    """``struct uffdio_range``."""
    start: int = 0
    len: int = 0


@dataclass
class UffdioRegister:
    """``struct uffdio_register``: ``ioctls`` is written back on success."""
    range: UffdioRange = field(default_factory=UffdioRange)
    mode: int = UFFDIO_REGISTER_MODE_MISSING
    ioctls: int = 0


@dataclass
class UffdioCopy:
    """``struct uffdio_copy``: ``copy`` is written back (bytes copied, or -errno)."""
    dst: int = 0
    src: int = 0
    len: int = 0
    mode: int = 0
    copy: int = 0


@dataclass
class UffdioZeropage:
    """``struct uffdio_zeropage``: ``zeropage`` is written back like ``copy``."""
    range: UffdioRange = field(default_factory=UffdioRange)
    mode: int = 0
    zeropage: int = 0


# -- the file ------------------------------------------------------------------------------------
def new_userfaultfd(task: "Task", flags: int) -> int:
    """``userfaultfd(flags)`` (``new_userfaultfd()``): an fd, or -EINVAL for unknown flags."""
    if flags & ~(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY):
        return -EINVAL
    ctx = UserfaultfdCtx(task.mm, flags)
    f = File(None, userfaultfd_fops, FMODE_READ, private_data=ctx, name="[userfaultfd]")
    task.sys.stats.add("uffd.new")
    return task.fd_install(f)


def userfaultfd_poll(file: File) -> bool:
    """``userfaultfd_poll()``: EPOLLIN when a message is pending (once API is done)."""
    ctx: UserfaultfdCtx = file.private_data
    return ctx.initialized and bool(ctx.fault_pending)


def userfaultfd_read(file: File) -> UffdMsg | int:
    """``read()`` of one ``struct uffd_msg`` (``userfaultfd_ctx_read()``): the oldest pending
    message, which moves to ``fault_wqh``; -EAGAIN if none (the model's files are
    non-blocking: a reader waits with ``poll`` first), -EINVAL before UFFDIO_API."""
    ctx: UserfaultfdCtx = file.private_data
    if not ctx.initialized:
        return -EINVAL
    if not ctx.fault_pending:
        return -EAGAIN
    w = ctx.fault_pending.pop(0)
    w.read = True
    ctx.fault_wqh.append(w)
    return w.msg


def userfaultfd_release(inode: Any, file: File) -> int:
    """``userfaultfd_release()``: unregister every VMA of the context and wake every
    waiter (their faults retry and then fault normally)."""
    ctx: UserfaultfdCtx = file.private_data
    ctx.released = True
    mm = ctx.mm
    mmap_write_lock(mm)
    try:
        for vma in list(mm.vmas(0, 1 << 64)):
            if vma.vm_userfaultfd_ctx is ctx:
                vma.vm_userfaultfd_ctx = None
                vma.vm_flags &= ~(VM_UFFD_MISSING | VM_UFFD_WP)
                vma_try_merge(mm, vma)
    finally:
        mmap_write_unlock(mm)
    wake_userfault(ctx, 0, 1 << 64)
    return 0


def _validate_range(start: int, length: int, aligned: bool = True) -> int:
    """``validate_range()`` / ``validate_unaligned_range()``."""
    if aligned and start & ~PAGE_MASK:
        return -EINVAL
    if length & ~PAGE_MASK or not length:
        return -EINVAL
    if start < _MMAP_MIN_ADDR or start >= _TASK_SIZE or length > _TASK_SIZE - start:
        return -EINVAL
    return 0


def userfaultfd_api(ctx: UserfaultfdCtx, api: UffdioApi) -> int:
    """``UFFDIO_API``: only ``UFFD_API`` with no features is modelled (features: -EINVAL)."""
    if api.api != UFFD_API or api.features:
        api.api = 0
        api.features = 0
        return -EINVAL
    if ctx.initialized:
        return -EINVAL
    ctx.initialized = True
    api.ioctls = UFFD_API_IOCTLS
    return 0


def _can_userfault(vma: Vma) -> bool:
    """``vma_can_userfault()`` for MISSING: anonymous, shmem or hugetlb memory."""
    if not vma.vm_flags & VM_HUGETLB and vma.vm_flags & VM_SPECIAL:
        return False
    if vma.vm_flags & VM_HUGETLB or vma.vm_ops is None:
        return True
    return vma.vm_ops.name in ("shmem", "shmem-anon")  # vma_is_shmem()


def userfaultfd_register(ctx: UserfaultfdCtx, reg: UffdioRegister) -> int:
    """``UFFDIO_REGISTER`` in MISSING mode: check every VMA of the range (holes are
    allowed), split at the range's ends and mark them ``VM_UFFD_MISSING``."""
    mode = reg.mode
    if not mode or mode & ~_REGISTER_MODES:
        return -EINVAL
    if mode != UFFDIO_REGISTER_MODE_MISSING:
        return -EINVAL  # WP and MINOR modes are not modelled
    start, length = reg.range.start, reg.range.len
    ret = _validate_range(start, length)
    if ret:
        return ret
    end = start + length
    mm = ctx.mm
    if mm.mm_users <= 0:
        return -ENOMEM
    mmap_write_lock(mm)
    try:
        vmas = list(mm.vmas(start, end))
        if not vmas:
            return -EINVAL
        first = vmas[0]
        if first.vm_flags & VM_HUGETLB and start & (_HPAGE_SIZE - 1):
            return -EINVAL
        for cur in vmas:
            if not _can_userfault(cur):
                return -EINVAL
            if not cur.vm_flags & VM_MAYWRITE:
                return -EPERM
            if cur.vm_flags & VM_HUGETLB and cur.vm_start < end <= cur.vm_end and end & (_HPAGE_SIZE - 1):
                return -EINVAL
            other = cur.vm_userfaultfd_ctx
            if other is not None and other is not ctx:
                return -EBUSY
        for cur in vmas:
            if cur.vm_userfaultfd_ctx is ctx:
                continue
            v = vma_modify(mm, cur, max(start, cur.vm_start), min(end, cur.vm_end))
            if isinstance(v, int):
                return v
            v.vm_flags |= VM_UFFD_MISSING
            v.vm_userfaultfd_ctx = ctx
            vma_try_merge(mm, v)
    finally:
        mmap_write_unlock(mm)
    reg.ioctls = UFFD_API_RANGE_IOCTLS
    mm.sys.stats.add("uffd.register")
    return 0


def userfaultfd_unregister(ctx: UserfaultfdCtx, rng: UffdioRange) -> int:
    """``UFFDIO_UNREGISTER``: clear the registration of the range (waking its waiters)."""
    ret = _validate_range(rng.start, rng.len)
    if ret:
        return ret
    mm = ctx.mm
    end = rng.start + rng.len
    mmap_write_lock(mm)
    try:
        for cur in list(mm.vmas(rng.start, end)):
            if not _can_userfault(cur):
                return -EINVAL
            if cur.vm_userfaultfd_ctx is None:
                continue
            v = vma_modify(mm, cur, max(rng.start, cur.vm_start), min(end, cur.vm_end))
            if isinstance(v, int):
                return v
            v.vm_flags &= ~(VM_UFFD_MISSING | VM_UFFD_WP)
            v.vm_userfaultfd_ctx = None
            vma_try_merge(mm, v)
    finally:
        mmap_write_unlock(mm)
    wake_userfault(ctx, rng.start, rng.len)
    return 0


# -- filling missing pages (mfill_atomic) ---------------------------------------------------------------
def _mfill_install(vma: Vma, addr: int, pfn: int, in_cache: bool, zero: bool) -> int:
    """``mfill_atomic_install_pte()`` (and the zeropage variant): map *pfn* at *addr* if
    the pte is still empty; -EEXIST otherwise."""
    mm = vma.vm_mm
    sys = mm.sys
    pmd = mm.pmd_ref(addr, alloc=True)
    if pmd is None:
        return -ENOMEM
    e = pmd.get()
    if e and (not pmd_present(e) or pmd_leaf(e)):
        return -EEXIST
    got = mm.pte_offset_map_lock(pmd, alloc=True)
    if got is None:
        return -EAGAIN
    tbl, tid = got
    try:
        idx = (addr >> PAGE_SHIFT) & 511
        if int(tbl[idx]) != 0:
            return -EEXIST
        if zero:
            entry = pte_mkspecial(pfn_pte(pfn, vma.vm_page_prot))
        else:
            entry = pte_mkdirty(pfn_pte(pfn, vma.vm_page_prot))
            writable = bool(vma.vm_flags & VM_WRITE)
            if in_cache and not vma.vm_flags & VM_SHARED:
                writable = False
            if writable:
                entry = pte_mkwrite(entry)
            if in_cache:
                folio_add_file_rmap_ptes(sys.mem, pfn)
                mm.add_mm_counter(MM_SHMEMPAGES, 1)
            else:
                folio_add_new_anon_rmap(sys.mem, pfn, vma, addr)
                mm.add_mm_counter(MM_ANONPAGES, 1)
        set_pte_at(mm, tbl, idx, entry)
    finally:
        mm.pte_unmap_unlock(tid)
    return 0


def _mfill_page(ctx: UserfaultfdCtx, vma: Vma, addr: int, data: np.ndarray | None) -> int:
    """One page of ``mfill_atomic()``: a new anon page (or shmem page cache page) holding
    *data* (zeroes / the zero page when None)."""
    sys = ctx.mm.sys
    mem = sys.mem
    if vma.vm_ops is None and not vma.vm_flags & VM_SHARED:
        if data is None:
            return _mfill_install(vma, addr, mem.zero_pfn, False, True)
        anon_vma_prepare(vma)
        pfn = mem.alloc_page()
        if pfn < 0:
            return -ENOMEM
        mem.write_pages(np.array([pfn], np.int64), data.reshape(1, PAGE_SIZE))
        ret = _mfill_install(vma, addr, pfn, False, False)
        if ret:
            mem.free_pages([pfn])
        return ret
    # shmem: add the page to the page cache first (-EEXIST if it is there already)
    inode = vma.vm_file.f_inode if vma.vm_file is not None else None
    if inode is None:
        return -EINVAL
    index = vma.linear_page_index(addr)
    if index >= (inode.i_size + PAGE_SIZE - 1) >> PAGE_SHIFT:
        return -EFAULT
    mapping = inode.i_mapping
    if index in mapping.pages:
        return -EEXIST
    pfn = shmem_get_folio(inode, index)  # a zeroed page, added to the page cache
    if pfn < 0:
        return pfn
    if data is not None:
        mem.write_pages(np.array([pfn], np.int64), data.reshape(1, PAGE_SIZE))
    mem.refcount[pfn] += 1  # the mapping's reference
    ret = _mfill_install(vma, addr, pfn, True, False)
    if ret:
        mem.refcount[pfn] -= 1
    return ret


def mfill_atomic(ctx: UserfaultfdCtx, dst: int, src: int | None, length: int, caller_mm: "MM") -> int:
    """``mfill_atomic()`` (copy when *src* is a user address, zeropage when None): bytes
    filled, or -errno if the first page failed. The destination must lie in one VMA
    registered with *ctx* (-ENOENT otherwise)."""
    mm = ctx.mm
    mmap_read_lock(mm)
    try:
        vma = mm.find_vma(dst)
        if (vma is None or vma.vm_start > dst or dst + length > vma.vm_end
                or vma.vm_userfaultfd_ctx is not ctx):
            return -ENOENT
        if vma.vm_flags & VM_HUGETLB:
            return -EINVAL  # hugetlb pages are filled a huge page at a time (not modelled)
        done = 0
        while done < length:
            data = None
            if src is not None:
                data, left = copy_from_user(caller_mm, src + done, PAGE_SIZE)
                if left:
                    return done or -EFAULT
            ret = _mfill_page(ctx, vma, dst + done, data)
            if ret:
                return done or ret
            done += PAGE_SIZE
        return done
    finally:
        mmap_read_unlock(mm)


def userfaultfd_copy(ctx: UserfaultfdCtx, cp: UffdioCopy, caller_mm: "MM") -> int:
    """``UFFDIO_COPY``: fill the missing pages of ``[dst, dst + len)`` from user memory at
    ``src``, then wake the faults in the range (unless DONTWAKE)."""
    ret = _validate_range(cp.src, cp.len, aligned=False) or _validate_range(cp.dst, cp.len)
    if ret:
        return ret
    if cp.mode & ~(UFFDIO_COPY_MODE_DONTWAKE | UFFDIO_COPY_MODE_WP):
        return -EINVAL
    if ctx.mm.mm_users <= 0:
        return -ESRCH
    n = mfill_atomic(ctx, cp.dst, cp.src, cp.len, caller_mm)
    cp.copy = n
    if n < 0:
        return n
    ctx.mm.sys.stats.add("uffd.copy")
    if not cp.mode & UFFDIO_COPY_MODE_DONTWAKE:
        wake_userfault(ctx, cp.dst, n)
    return 0 if n == cp.len else -EAGAIN


def userfaultfd_zeropage(ctx: UserfaultfdCtx, zp: UffdioZeropage) -> int:
    """``UFFDIO_ZEROPAGE``: map the zero page (anon) or zeroed pages (shmem)."""
    ret = _validate_range(zp.range.start, zp.range.len)
    if ret:
        return ret
    if zp.mode & ~UFFDIO_ZEROPAGE_MODE_DONTWAKE:
        return -EINVAL
    n = mfill_atomic(ctx, zp.range.start, None, zp.range.len, ctx.mm)
    zp.zeropage = n
    if n < 0:
        return n
    if not zp.mode & UFFDIO_ZEROPAGE_MODE_DONTWAKE:
        wake_userfault(ctx, zp.range.start, n)
    return 0 if n == zp.range.len else -EAGAIN


def userfaultfd_wake(ctx: UserfaultfdCtx, rng: UffdioRange) -> int:
    """``UFFDIO_WAKE``."""
    ret = _validate_range(rng.start, rng.len)
    if ret:
        return ret
    wake_userfault(ctx, rng.start, rng.len)
    return 0


def userfaultfd_ioctl(file: File, command: int, arg: Any, caller: "Task") -> int:
    """``userfaultfd_ioctl()``: every command but UFFDIO_API needs the API handshake."""
    ctx: UserfaultfdCtx = file.private_data
    if command != UFFDIO_API and not ctx.initialized:
        return -EINVAL
    if command == UFFDIO_API:
        return userfaultfd_api(ctx, arg)
    if command == UFFDIO_REGISTER:
        return userfaultfd_register(ctx, arg)
    if command == UFFDIO_UNREGISTER:
        return userfaultfd_unregister(ctx, arg)
    if command == UFFDIO_WAKE:
        return userfaultfd_wake(ctx, arg)
    if command == UFFDIO_COPY:
        return userfaultfd_copy(ctx, arg, caller.mm)
    if command == UFFDIO_ZEROPAGE:
        return userfaultfd_zeropage(ctx, arg)
    return -EINVAL


userfaultfd_fops = FileOperations("userfaultfd", release=userfaultfd_release, unlocked_ioctl=userfaultfd_ioctl)
