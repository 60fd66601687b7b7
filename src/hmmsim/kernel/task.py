"""Processes: ``task_struct``, the file table, fork and exit.

Models ``kernel/fork.c`` (``copy_process`` / ``dup_mm`` / ``dup_mmap``: VMAs copied, page
tables copied where ``vma_needs_copy``, VM_DONTCOPY skipped, VM_WIPEONFORK emptied,
overcommit charged again), ``kernel/exit.c`` (``do_exit``: the mm goes first through
``mmput``/``exit_mmap`` — ``MMU_NOTIFY_RELEASE`` to every notifier, then everything
unmapped — and the files after), ``fs/file.c`` (the fd table) and ``mm/util.c``
(``vm_mmap_pgoff``, ``vm_munmap``: the syscall entry points that take mmap_lock).

>>> from hmmsim.kernel.system import System
>>> from hmmsim.kernel.cpu import user_read_pages, user_write_pages
>>> import numpy as np
>>> sys = System(ram=256 << 20, hugetlb_pages=0)
>>> parent = sys.create_task("parent")
>>> a = vm_mmap(parent.mm, None, 0, 4096, 3, 0x22)      # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
>>> user_write_pages(parent.mm, a, np.full(4096, 1, np.uint8))
[]
>>> child = parent.fork()                               # copy-on-write
>>> user_write_pages(child.mm, a, np.full(4096, 2, np.uint8))   # the child's own copy
[]
>>> int(user_read_pages(parent.mm, a, 1)[0][0]), int(user_read_pages(child.mm, a, 1)[0][0])
(1, 2)
>>> child.exit(); child.exited, len(sys.tasks), len(sys.mms)
(True, 1, 1)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .errno import EBADF, ENOMEM, ENOTTY
from .fs import File, fput, get_file
from .locking import Thread
from .memory import copy_page_range, free_pgtables, unmap_vmas
from .mm import MM, mmap_read_lock, mmap_read_unlock, mmap_write_lock, mmap_write_unlock
from .mmap import do_mmap, do_munmap, remove_vma, vm_enough_memory
from .mmu_notifier import mmu_notifier_release
from .page_types import ULONG_MAX
from .rmap import anon_vma_fork
from .userfaultfd_k import dup_userfaultfd
from .vma import (
    VM_ACCOUNT,
    VM_DONTCOPY,
    VM_HUGETLB,
    VM_LOCKED,
    VM_MAYSHARE,
    VM_WIPEONFORK,
)

if TYPE_CHECKING:
    from .system import System

__all__ = ("Task", "exit_mmap", "fatal_signal_pending", "mmget_not_zero", "mmput", "vm_mmap", "vm_munmap")


def mmget_not_zero(mm: MM) -> bool:
    """``mmget_not_zero()``: take a user reference unless the mm is already exiting."""
    if mm.mm_users <= 0:
        return False
    mm.mm_users += 1
    return True


def mmput(mm: MM) -> None:
    """``mmput()``: drop a user reference; the last one tears the address space down."""
    mm.mm_users -= 1
    if mm.mm_users == 0:
        exit_mmap(mm)


def exit_mmap(mm: MM) -> None:
    """``exit_mmap()``: release notifiers, unmap everything, free all page tables."""
    mmu_notifier_release(mm)
    mmap_read_lock(mm)
    try:
        vmas = mm.vma_list()
        if vmas:
            unmap_vmas(mm, vmas, 0, ULONG_MAX)
    finally:
        mmap_read_unlock(mm)
    mmap_write_lock(mm)
    try:
        if vmas:
            free_pgtables(mm, 0, ULONG_MAX, 0, 0)
        for v in vmas:
            mm.remove_vma(v)
            remove_vma(v)
        mm.sys.pt.free(mm.pgd)  # pgd_free(), done at the final mmdrop() in the kernel
        mm.dead = True
    finally:
        mmap_write_unlock(mm)
    if mm in mm.sys.mms:
        mm.sys.mms.remove(mm)
    mm.sys.stats.add("mm.exit_mmap")


def vm_mmap(mm: MM, file: File | None, addr: int, length: int, prot: int, flags: int, pgoff: int = 0) -> int:
    """``vm_mmap_pgoff()``: ``do_mmap`` under mmap_lock (write)."""
    mmap_write_lock(mm)
    try:
        return do_mmap(mm, file, addr, length, prot, flags, pgoff)
    finally:
        mmap_write_unlock(mm)


def vm_munmap(mm: MM, start: int, length: int) -> int:
    """``vm_munmap()``: ``do_munmap`` under mmap_lock (write)."""
    mmap_write_lock(mm)
    try:
        return do_munmap(mm, start, length)
    finally:
        mmap_write_unlock(mm)


def fatal_signal_pending(sys: "System") -> bool:
    """``fatal_signal_pending(current)``: the running task has a SIGKILL pending."""
    t = sys.ls.current.task
    return t is not None and t.sigkill_pending


class Task:
    """``struct task_struct`` (one thread per process): an mm, a file table, a parent,
    and the simulated :class:`~hmmsim.kernel.locking.Thread` its system calls, faults and
    ioctls run as (named ``comm/pid`` like the kernel's lockdep reports).

    Code entering the kernel on behalf of the task (the facade, the scenario runner, the
    selftest port) does so inside :meth:`running`; :meth:`ioctl`, :meth:`close_fd`,
    :meth:`fork` and :meth:`exit` enter by themselves. A forked child gets its own thread.
    (One thread per task today; a multi-threaded process would give each of its threads a
    ``Thread`` sharing the mm.)"""

    def __init__(self, system: "System", mm: MM, parent: "Task | None" = None, name: str = "") -> None:
        self.sys = system
        self.pid = next(system.pids)
        self.name = name or f"task{self.pid}"
        self.mm = mm
        mm.owner = self
        self.files: dict[int, File] = {}
        self.parent = parent
        self.children: list[Task] = []
        self.exited = False
        #: the simulated thread this task runs as (``comm/pid``)
        self.thread = Thread(f"{self.name}/{self.pid}", task=self)
        #: SIGKILL was sent and not yet acted on (``fatal_signal_pending()``)
        self.sigkill_pending = False

    @contextmanager
    def running(self) -> Iterator["Task"]:
        """Run the block as this task (``current`` is this task's thread): the locks it
        takes are this task's, lock messages name it.

        A helper thread that belongs to no task (an :class:`~hmmsim.kernel.sched.Interleave`
        racer) keeps its own identity: it acts as another thread of the process, so a
        racer may call the facade of the very process it interrupts. A simulated thread of
        this process (:meth:`Scheduler.spawn <hmmsim.kernel.sched.Scheduler.spawn>` with
        ``task=``) keeps its own identity too."""
        ls = self.sys.ls
        cur = ls.current
        if cur is not ls.main and (cur.task is None or (cur.task is self and cur is not self.thread)):
            yield self
            return
        with ls.as_thread(self.thread):
            yield self

    # -- files ----------------------------------------------------------------------------
    def fd_install(self, f: File) -> int:
        """``fd_install()`` at the lowest free fd (fds 0-2 are taken by stdio)."""
        fd = 3
        while fd in self.files:
            fd += 1
        self.files[fd] = f
        return fd

    def fget(self, fd: int) -> File | None:
        return self.files.get(fd)

    def ioctl(self, fd: int, command: int, arg: Any) -> int:
        """``ioctl()`` (``ksys_ioctl`` + ``vfs_ioctl``): the file's ``unlocked_ioctl``;
        ``-EBADF`` without a file, ``-ENOTTY`` if the file has no ioctls."""
        f = self.files.get(fd)
        if f is None:
            return -EBADF
        if f.f_op.unlocked_ioctl is None:
            return -ENOTTY
        with self.running():
            return int(f.f_op.unlocked_ioctl(f, command, arg, self))

    def close_fd(self, fd: int) -> int:
        """``close()``: 0 or ``-EBADF``."""
        f = self.files.pop(fd, None)
        if f is None:
            return -EBADF
        with self.running():
            fput(f)
        return 0

    # -- fork / exit ------------------------------------------------------------------------
    def fork(self) -> "Task | int":
        """``fork()``: a child with a copy of this address space (copy-on-write) and of the
        file table. Returns the child or a negative errno. The child runs as its own
        thread."""
        with self.running():
            return self._fork()

    def _fork(self) -> "Task | int":
        sys = self.sys
        old = self.mm
        new = MM(sys, name=f"{old.name}'")
        mmap_write_lock(old)
        try:
            for v in old.vma_list():
                if v.vm_flags & VM_DONTCOPY:
                    continue
                if v.vm_flags & VM_ACCOUNT and vm_enough_memory(old, v.pages()):
                    self._undo_fork(new)
                    return -ENOMEM
                t = v.clone()
                t.vm_mm = new
                for av in list(t.anon_vma_chain):
                    del av.vmas[t]
                t.anon_vma_chain = []
                t.anon_vma = None
                if not t.vm_flags & VM_WIPEONFORK:
                    anon_vma_fork(t, v)
                t.vm_flags &= ~VM_LOCKED
                dup_userfaultfd(t)
                if t.vm_flags & VM_HUGETLB and not t.vm_flags & VM_MAYSHARE:
                    t.vm_private_data = None  # hugetlb_dup_vma_private(): no reservation
                if t.vm_file is not None:
                    get_file(t.vm_file)
                    if t.vm_file.f_inode is not None:
                        t.vm_file.f_inode.i_mapping.i_mmap.append(t)
                new.insert_vma(t)
                if not t.vm_flags & VM_WIPEONFORK:
                    ret = copy_page_range(t, v)
                    if ret:
                        self._undo_fork(new)
                        return ret
        finally:
            mmap_write_unlock(old)
        child = Task(sys, new, parent=self, name=f"{self.name}.child{len(self.children) + 1}")
        for fd, f in self.files.items():
            child.files[fd] = get_file(f)
        self.children.append(child)
        sys.tasks.append(child)
        sys.stats.add("task.fork")
        return child

    def _undo_fork(self, new: MM) -> None:
        exit_mmap(new)

    def exit(self) -> None:
        """``do_exit()``: tear down the mm (``exit_mm``), then close every file."""
        if self.exited:
            return
        self.exited = True
        with self.running():
            mmput(self.mm)
            for fd in sorted(self.files):
                fput(self.files.pop(fd))
        if self in self.sys.tasks:
            self.sys.tasks.remove(self)
        self.sys.stats.add("task.exit")

    def __repr__(self) -> str:
        return f"Task({self.pid}, {self.name})"


