"""The friendly API over a simulated process: mappings, CPU accesses, files, fork.

Every method calls the kernel-level function that implements it (``do_mmap``,
``do_mprotect``, ``translate_range`` ...) and turns a negative errno into an
:class:`~hmmsim.errors.HmmError` subclass, or a signal into
:class:`~hmmsim.errors.SegmentationFault`/:class:`~hmmsim.errors.BusError`. Sizes are in
bytes and addresses are plain ints, as in C.

CPU accesses behave like ``memcpy`` on a real CPU: pages are accessed in order and the
first page that raises a signal ends the access; the pages before it were read or
written (and faulted in), the pages after it are not touched. An access that finds no
memory left is answered by the OOM killer: :class:`~hmmsim.errors.Killed` (SIGKILL) and
the process has exited. Every method of an exited process raises
:class:`~hmmsim.errors.NoSuchProcess` (ESRCH) and changes nothing; a malformed argument
(negative byte count, unknown advice or protection) raises
:class:`~hmmsim.errors.InvalidArgument` naming it. Lengths handed to the mm system calls
are unsigned as in C: ``munmap(a, -4096)`` is ``-EINVAL``, not "to the end".

>>> from hmmsim import System
>>> p = System().spawn()
>>> a = p.mmap(4 * 4096)
>>> p.write(a + 10, b"xyz"); p.read(a + 9, 5)
b'\\x00xyz\\x00'
>>> p.mprotect(a, 4096, "r")
>>> p.write(a, b"!")
Traceback (most recent call last):
hmmsim.errors.SegmentationFault: SIGSEGV: write of 0x7effffffc000
>>> p.munmap(a, -4096)
Traceback (most recent call last):
hmmsim.errors.InvalidArgument: -EINVAL: munmap
>>> p.madvise(a, 4096, "willneed")
Traceback (most recent call last):
hmmsim.errors.InvalidArgument: -EINVAL: madvise: unknown advice 'willneed' (use collapse, dontneed, free, hugepage, nohugepage, pageout or a MADV_* number)
>>> p.exit(); p.mmap(4096)
Traceback (most recent call last):
hmmsim.errors.NoSuchProcess: -ESRCH: mmap: process ... has exited
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt

from .device import Device
from .drivers.dmirror import dmirror_open
from .errors import BusError, InvalidArgument, Killed, SegmentationFault, error_from_errno
from .kernel.cpu import SIGBUS, SIGKILL, translate_range, user_copy
from .kernel.errno import EBADF, EINVAL, ESRCH
from .kernel.madvise import (
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MADV_PAGEOUT,
    do_madvise,
)
from .kernel.mmap import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_HUGETLB,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
)
from .kernel.mprotect import change_prot_numa, do_mprotect
from .kernel.mremap import MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE, do_mremap
from .kernel.page_types import PAGE_SHIFT, PAGE_SIZE, ULONG_MAX
from .kernel.pgtable import decode_pte
from .kernel.shmem import shmem_file_setup, shmem_pread, shmem_pwrite, shmem_truncate
from .kernel.task import Task, vm_mmap, vm_munmap
from .kernel.vma import PROT_EXEC, PROT_READ, PROT_WRITE

if TYPE_CHECKING:
    from .device import Device
    from .kernel.system import System

__all__ = ("Process", "parse_prot", "syscall")

_ADVICE = {"collapse": MADV_COLLAPSE, "dontneed": MADV_DONTNEED, "free": MADV_FREE, "hugepage": MADV_HUGEPAGE,
           "nohugepage": MADV_NOHUGEPAGE, "pageout": MADV_PAGEOUT}


def parse_prot(prot: str | int) -> int:
    """``"rw"`` -> ``PROT_READ | PROT_WRITE``; ``"none"`` -> 0; ints pass through.
    Anything else raises :class:`~hmmsim.errors.InvalidArgument`."""
    if isinstance(prot, int):
        return prot
    if prot == "none":
        return 0
    out = 0
    for ch in prot if isinstance(prot, str) else "?":
        bit = {"r": PROT_READ, "w": PROT_WRITE, "x": PROT_EXEC}.get(ch)
        if bit is None:
            raise InvalidArgument(-EINVAL, f"bad protection {prot!r}: use letters r, w, x or 'none'")
        out |= bit
    return out


_P = ParamSpec("_P")
_R = TypeVar("_R")


def syscall(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a facade method as a system call of its process: inside
    :meth:`Task.running() <hmmsim.kernel.task.Task.running>`, so the locks taken are the
    task's thread's and lock messages name it."""
    @functools.wraps(fn)
    def entry(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with args[0].task.running():  # type: ignore[attr-defined]
            return fn(*args, **kwargs)
    return entry


def _live(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Refuse (ESRCH, nothing changed) every call on a process that has exited."""
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        self = args[0]
        if self.task.exited:  # type: ignore[attr-defined]
            raise error_from_errno(-ESRCH, f"{fn.__name__}: process {self.pid} has exited")  # type: ignore[attr-defined]
        return fn(*args, **kwargs)
    return wrapper


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise error_from_errno(ret, what)
    return ret


def _count(what: str, name: str, value: int) -> int:
    """A byte or page count of a Python-side buffer: a non-negative int, else EINVAL."""
    if not isinstance(value, int) or value < 0:
        raise InvalidArgument(-EINVAL, f"{what}: {name} must be a non-negative int, not {value!r}")
    return value


class Process:
    """A simulated process (``task_struct`` + ``mm_struct``) with a Pythonic API."""

    def __init__(self, system: "System", task: Task) -> None:
        self.system = system
        self.task = task

    @property
    def mm(self):  # noqa: ANN201 - kernel struct
        return self.task.mm

    @property
    def pid(self) -> int:
        return self.task.pid

    # -- mappings ----------------------------------------------------------------------------
    @_live
    @syscall
    def mmap(self, length: int, prot: str | int = "rw", *, shared: bool = False, fd: int | None = None,
             offset: int = 0, hugetlb: bool = False, addr: int = 0, fixed: bool = False,
             noreplace: bool = False, noreserve: bool = False) -> int:
        """Map *length* bytes (anonymous unless *fd* is given); returns the address."""
        flags = MAP_SHARED if shared else MAP_PRIVATE
        file = None
        if fd is None:
            flags |= MAP_ANONYMOUS
        else:
            file = self.task.fget(fd)
            if file is None:
                raise error_from_errno(-EBADF, f"mmap: fd {fd}")
        if hugetlb:
            flags |= MAP_HUGETLB
        if fixed:
            flags |= MAP_FIXED
        if noreplace:
            flags |= MAP_FIXED_NOREPLACE
        if noreserve:
            flags |= MAP_NORESERVE
        if offset % PAGE_SIZE:
            raise error_from_errno(-EINVAL, "mmap: offset not page aligned")
        # the syscall's offset is an unsigned long: a negative one is huge (-EOVERFLOW)
        return _check(vm_mmap(self.mm, file, addr, length, parse_prot(prot), flags,
                              (offset & ULONG_MAX) >> PAGE_SHIFT), "mmap")

    @_live
    @syscall
    def munmap(self, addr: int, length: int) -> None:
        _check(vm_munmap(self.mm, addr, length), "munmap")

    @_live
    @syscall
    def mprotect(self, addr: int, length: int, prot: str | int) -> None:
        _check(do_mprotect(self.mm, addr, length, parse_prot(prot)), "mprotect")

    @_live
    @syscall
    def madvise(self, addr: int, length: int, advice: str | int) -> None:
        """*advice*: ``"hugepage"``, ``"nohugepage"``, ``"dontneed"``, ``"free"``,
        ``"pageout"`` or a ``MADV_*`` number."""
        if isinstance(advice, str):
            if advice not in _ADVICE:
                raise InvalidArgument(-EINVAL, f"madvise: unknown advice {advice!r} (use "
                                      f"{', '.join(sorted(_ADVICE))} or a MADV_* number)")
            adv = _ADVICE[advice]
        else:
            adv = advice
        _check(do_madvise(self.mm, addr, length, adv), "madvise")

    @_live
    @syscall
    def mremap(self, addr: int, old_length: int, new_length: int, *, new_addr: int | None = None,
               dontunmap: bool = False, maymove: bool = True) -> int:
        """Move/resize a mapping (MREMAP_MAYMOVE, plus MREMAP_FIXED if *new_addr*)."""
        flags = MREMAP_MAYMOVE if maymove else 0
        if new_addr is not None:
            flags |= MREMAP_FIXED
        if dontunmap:
            flags |= MREMAP_DONTUNMAP
        return _check(do_mremap(self.mm, addr, old_length, new_length, flags, new_addr or 0), "mremap")

    @_live
    @syscall
    def numa_hint(self, addr: int, length: int) -> None:
        """Make the present ptes of the range NUMA-hinting (protnone) entries, as
        automatic NUMA balancing would (``change_prot_numa``)."""
        _count("numa_hint", "length", length)
        mm = self.mm
        mm.mmap_lock.down_write()
        try:
            for vma in list(mm.vmas(addr, addr + length)):
                change_prot_numa(vma, max(addr, vma.vm_start), min(addr + length, vma.vm_end))
        finally:
            mm.mmap_lock.up_write()

    # -- CPU accesses ---------------------------------------------------------------------------
    def _raise_sig(self, addr: int, sigs: list[tuple[int, int, int]], write: bool) -> None:
        """Raise what the first signal of *sigs* means for the process; SIGKILL (the OOM
        killer) also ends the process, as ``do_exit()`` would."""
        if sigs:
            page, _n, sig = sigs[0]
            a = max((addr & ~(PAGE_SIZE - 1)) + (page << PAGE_SHIFT), addr)
            if sig == SIGKILL:
                self.task.exit()
                raise Killed(a, write)
            raise (BusError if sig == SIGBUS else SegmentationFault)(a, write)

    @_live
    @syscall
    def read(self, addr: int, n: int) -> bytes:
        """The CPU reads *n* bytes at *addr* (faulting pages in as needed)."""
        buf = np.empty(_count("read", "n", n), np.uint8)
        _left, sigs = user_copy(self.mm, addr, buf, to_user=False)
        self._raise_sig(addr, sigs, False)
        return buf.tobytes()

    @_live
    @syscall
    def write(self, addr: int, data: bytes | bytearray | npt.NDArray) -> None:
        """The CPU writes *data* at *addr*, page by page, stopping at the first page that
        raises a signal (the pages before it are written)."""
        buf = np.frombuffer(bytes(data), np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        _left, sigs = user_copy(self.mm, addr, buf, to_user=True)
        self._raise_sig(addr, sigs, True)

    @_live
    def read_array(self, addr: int, count: int, dtype: npt.DTypeLike = np.int32) -> npt.NDArray:
        """Read *count* elements of *dtype* at *addr*."""
        dt = np.dtype(dtype)
        _count("read_array", "count", count)
        return np.frombuffer(self.read(addr, count * dt.itemsize), dt).copy()

    @_live
    def write_array(self, addr: int, arr: npt.ArrayLike) -> None:
        self.write(addr, np.ascontiguousarray(arr))

    @_live
    @syscall
    def touch(self, addr: int, length: int, write: bool = False) -> None:
        """Access every page of the range once (read, or write without changing data)."""
        _count("touch", "length", length)
        if not length:
            return
        first = addr & ~(PAGE_SIZE - 1)
        npages = (addr + length - first + PAGE_SIZE - 1) >> PAGE_SHIFT
        _pfns, sigs = translate_range(self.mm, first, npages, write, stop_at_signal=True)
        self._raise_sig(addr, sigs, write)

    @_live
    def pte(self, addr: int) -> str:
        """What maps *addr* in the CPU page table, for humans (``decode_pte``)."""
        return decode_pte(self.mm.lookup_pte(addr))

    # -- files -------------------------------------------------------------------------------
    @_live
    @syscall
    def open_tmpfile(self, size: int = 0) -> int:
        """``open(O_TMPFILE | O_RDWR)`` on tmpfs + ``ftruncate(size)``; returns the fd."""
        _count("open_tmpfile", "size", size)
        f = shmem_file_setup(self.system, "tmpfile", 0)
        _check(shmem_truncate(f.f_inode, size), "ftruncate")  # type: ignore[arg-type]
        return self.task.fd_install(f)

    def _inode(self, fd: int):  # noqa: ANN202
        f = self.task.fget(fd)
        if f is None or f.f_inode is None:
            raise error_from_errno(-EBADF, f"fd {fd}")
        return f.f_inode

    @_live
    @syscall
    def pwrite(self, fd: int, data: bytes | npt.NDArray, offset: int) -> int:
        _count("pwrite", "offset", offset)
        return _check(shmem_pwrite(self._inode(fd), data, offset), "pwrite")

    @_live
    @syscall
    def pread(self, fd: int, n: int, offset: int) -> bytes:
        _count("pread", "n", n)
        _count("pread", "offset", offset)
        return shmem_pread(self._inode(fd), offset, n)

    @_live
    @syscall
    def ftruncate(self, fd: int, size: int) -> None:
        _check(shmem_truncate(self._inode(fd), size), "ftruncate")

    @_live
    def close(self, fd: int) -> None:
        _check(self.task.close_fd(fd), "close")

    @_live
    @syscall
    def open_device(self, minor: int) -> "Device":
        """Open ``/dev/hmm_dmirror<minor>``; raises NoDevice if it does not exist."""
        fd = _check(dmirror_open(self.system, self.task, minor), f"open /dev/hmm_dmirror{minor}")
        return Device(self, fd, minor)

    # -- lifetime -----------------------------------------------------------------------------
    @_live
    def fork(self) -> "Process":
        """``fork()``: the child shares every private page copy-on-write."""
        child = self.task.fork()
        if isinstance(child, int):
            raise error_from_errno(child, "fork")
        return Process(self.system, child)

    @_live
    def exit(self) -> None:
        """``exit()``: unmap everything (notifiers see ``MMU_NOTIFY_RELEASE``), close files."""
        self.task.exit()

    @property
    def exited(self) -> bool:
        """True once the process has exited (or been killed)."""
        return self.task.exited

    def __repr__(self) -> str:
        if self.task.exited:
            return f"Process(pid={self.pid}, exited)"
        return f"Process(pid={self.pid}, {self.mm.map_count} vmas)"
