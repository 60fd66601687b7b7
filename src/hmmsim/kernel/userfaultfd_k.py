"""The fault side of userfaultfd (``include/linux/userfaultfd_k.h`` and ``handle_userfault()``
of ``mm/userfaultfd.c``): what the page-fault handlers call. The file, its ioctls and
the page filling are in :mod:`hmmsim.kernel.userfaultfd`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .mm import mmap_read_unlock
from .mm_types import (
    FAULT_FLAG_ALLOW_RETRY,
    FAULT_FLAG_RETRY_NOWAIT,
    FAULT_FLAG_USER,
    FAULT_FLAG_WRITE,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
)
from .page_types import PAGE_MASK, PAGE_SHIFT
from .pgtable import pmd_leaf, pmd_present
from .vma import VM_UFFD_MISSING, VM_UFFD_WP, Vma

if TYPE_CHECKING:
    from .mm import MM
    from .mm_types import VmFault

__all__ = (
    "UFFD_EVENT_PAGEFAULT", "UFFD_PAGEFAULT_FLAG_WP", "UFFD_PAGEFAULT_FLAG_WRITE", "UFFD_USER_MODE_ONLY",
    "UffdMsg", "UserfaultfdCtx", "dup_userfaultfd", "handle_userfault", "userfaultfd_missing",
    "wake_userfault",
)

#: ``userfaultfd(UFFD_USER_MODE_ONLY)``: only faults from user mode are handled
UFFD_USER_MODE_ONLY = 1
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1


@dataclass
class UffdMsg:
    """``struct uffd_msg`` of a ``UFFD_EVENT_PAGEFAULT``."""
    event: int
    address: int
    flags: int


@dataclass
class _Waiter:
    """``struct userfaultfd_wait_queue``: a thread sleeping in :func:`handle_userfault`."""
    msg: UffdMsg
    read: bool = False
    waken: bool = False


class UserfaultfdCtx:
    """``struct userfaultfd_ctx``: one userfaultfd, bound to the mm that created it."""

    def __init__(self, mm: "MM", flags: int) -> None:
        self.mm = mm
        self.flags = flags
        self.features = 0
        self.initialized = False
        self.released = False
        #: ``fault_pending_wqh`` (messages not read yet) and ``fault_wqh`` (read, not woken)
        self.fault_pending: list[_Waiter] = []
        self.fault_wqh: list[_Waiter] = []

    def __repr__(self) -> str:
        return f"UserfaultfdCtx({self.mm.name}, pending={len(self.fault_pending)})"


# -- the fault side ---------------------------------------------------------------------------------
def userfaultfd_missing(vma: Vma) -> bool:
    """``userfaultfd_missing()``: faults on missing pages of *vma* go to a userfaultfd."""
    return bool(vma.vm_flags & VM_UFFD_MISSING)


def _must_wait(ctx: UserfaultfdCtx, vmf: "VmFault") -> bool:
    """``userfaultfd_must_wait()``: the page is still missing (no pte or an empty one)."""
    mm = ctx.mm
    pmd = mm.pmd_ref(vmf.address)
    if pmd is None:
        return True
    e = pmd.get()
    if e == 0:
        return True
    if not pmd_present(e) or pmd_leaf(e):
        return False
    tid = mm.pte_table(pmd)
    if tid < 0:
        return True
    return int(mm.sys.pt.table(tid)[(vmf.address >> PAGE_SHIFT) & 511]) == 0


def handle_userfault(vmf: "VmFault", reason: int) -> int:
    """``handle_userfault()``: hand a missing-page fault to the registered userfaultfd.

    ``VM_FAULT_SIGBUS`` if the fault cannot drop mmap_lock (no FAULT_FLAG_ALLOW_RETRY) or
    the context refuses it; otherwise the message is queued, mmap_lock dropped, the thread
    sleeps until woken and ``VM_FAULT_RETRY`` is returned (mmap_lock no longer held)."""
    vma = vmf.vma
    mm = vma.vm_mm
    sys = mm.sys
    ctx: UserfaultfdCtx | None = vma.vm_userfaultfd_ctx
    if ctx is None:
        return VM_FAULT_SIGBUS
    sys.stats.add("uffd.handle_userfault")
    if ctx.flags & UFFD_USER_MODE_ONLY and not vmf.flags & FAULT_FLAG_USER:
        return VM_FAULT_SIGBUS
    if not vmf.flags & FAULT_FLAG_ALLOW_RETRY:
        # pr_warn("FAULT_FLAG_ALLOW_RETRY missing") under CONFIG_DEBUG_VM
        sys.stats.add("uffd.sigbus_no_retry")
        return VM_FAULT_SIGBUS
    if vmf.flags & FAULT_FLAG_RETRY_NOWAIT:
        return VM_FAULT_RETRY
    if ctx.released:
        mmap_read_unlock(mm)
        return VM_FAULT_RETRY
    flags = UFFD_PAGEFAULT_FLAG_WRITE if vmf.flags & FAULT_FLAG_WRITE else 0
    w = _Waiter(UffdMsg(UFFD_EVENT_PAGEFAULT, vmf.address & PAGE_MASK, flags))
    ctx.fault_pending.append(w)
    must_wait = _must_wait(ctx, vmf)
    mmap_read_unlock(mm)  # release_fault_lock()
    if must_wait and not ctx.released:
        sys.ls.wait_event(lambda: w.waken or ctx.released, "a userfaultfd reply (handle_userfault)")
    for q in (ctx.fault_pending, ctx.fault_wqh):
        if w in q:
            q.remove(w)
    return VM_FAULT_RETRY


def wake_userfault(ctx: UserfaultfdCtx, start: int, length: int) -> int:
    """``wake_userfault()``: wake every waiter whose address lies in the range (read or
    not). Returns how many were woken."""
    end = start + length
    n = 0
    for q in (ctx.fault_pending, ctx.fault_wqh):
        keep = []
        for w in q:
            if start <= w.msg.address < end:
                w.waken = True
                n += 1
            else:
                keep.append(w)
        q[:] = keep
    return n


def dup_userfaultfd(vma: Vma) -> None:
    """``dup_userfaultfd()`` of a VMA copied by fork, for a context without
    UFFD_FEATURE_EVENT_FORK: the child's VMA is not registered."""
    if vma.vm_userfaultfd_ctx is not None:
        vma.vm_userfaultfd_ctx = None
        vma.vm_flags &= ~(VM_UFFD_MISSING | VM_UFFD_WP)
