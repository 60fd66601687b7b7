"""Exceptions of the friendly API.

Kernel-level functions return ``0``/``-errno`` like the kernel; the facade
(:class:`~hmmsim.process.Process`, :class:`~hmmsim.device.Device`) turns a negative
return into an :class:`HmmError` subclass chosen by meaning, carrying the errno. A
rejected call changes nothing. CPU accesses that the kernel would answer with a signal
raise :class:`SegmentationFault` or :class:`BusError` naming the address; one the OOM
killer answers (SIGKILL) raises :class:`Killed`, and the process is then gone. Any call
on a process that has exited raises :class:`NoSuchProcess` (ESRCH). A bad Python
argument (a negative size, an unknown advice name, ``start > end``) raises
:class:`InvalidArgument` naming it.

Two more kinds are not errors of the caller but findings about the modelled kernel:
:class:`KernelOops` (the real kernel would crash here) and :class:`NotSupportedError`
(the model does not cover this path yet). They belong to the kernel layer
(:mod:`hmmsim.kernel.bug`, where kernel code raises them) and are re-exported here; they
are not :class:`HmmsimError` subclasses.

>>> e = error_from_errno(-12, "mmap")
>>> type(e).__name__, e.errno, str(e)
('OutOfMemory', 12, '-ENOMEM: mmap')
>>> from hmmsim import System
>>> p = System(ram=256 << 20, hugetlb_pages=0).spawn()
>>> try:
...     p.read(0x1000, 8)
... except SegmentationFault as sig:
...     print(sig, sig.signal)
SIGSEGV: read of 0x1000 11
>>> isinstance(InvalidArgument(22), ValueError)
True
"""

from __future__ import annotations

from .kernel.bug import KernelOops, NotSupportedError
from .kernel.errno import (
    EACCES,
    EBADF,
    EBUSY,
    EEXIST,
    EFAULT,
    EINVAL,
    ENODEV,
    ENOENT,
    ENOMEM,
    EPERM,
    ESRCH,
    errno_name,
)

__all__ = (
    "BadAddress", "BadFileDescriptor", "BusError", "Busy", "Exists", "HmmError",
    "HmmsimError", "InvalidArgument", "KernelOops", "Killed", "NoDevice", "NoEntry",
    "NoSuchProcess", "NotSupportedError", "OutOfMemory", "PermissionDenied",
    "SegmentationFault", "error_from_errno",
)


class HmmsimError(Exception):
    """Base of every exception raised by hmmsim."""


class HmmError(HmmsimError):
    """A call failed with a kernel errno (``.errno`` is positive, e.g. 14 for EFAULT)."""

    def __init__(self, errno: int, msg: str = "") -> None:
        self.errno = abs(errno)
        super().__init__(f"{errno_name(-self.errno)}: {msg}" if msg else errno_name(-self.errno))


class InvalidArgument(HmmError, ValueError):
    """EINVAL (also a :class:`ValueError`: a bad Python argument raises it too)."""


class BadAddress(HmmError):
    """EFAULT: an address is not mapped or cannot be made valid."""


class PermissionDenied(HmmError):
    """EPERM or EACCES."""


class OutOfMemory(HmmError):
    """ENOMEM."""


class Busy(HmmError):
    """EBUSY: retry (e.g. the mirror's notifier sequence changed too often)."""


class NoEntry(HmmError):
    """ENOENT."""


class BadFileDescriptor(HmmError):
    """EBADF."""


class NoSuchProcess(HmmError):
    """ESRCH: the process has exited (or was killed); nothing can be done with it."""


class NoDevice(HmmError):
    """ENODEV."""


class Exists(HmmError):
    """EEXIST."""


_BY_ERRNO: dict[int, type[HmmError]] = {
    EINVAL: InvalidArgument, EFAULT: BadAddress, EPERM: PermissionDenied,
    EACCES: PermissionDenied, ENOMEM: OutOfMemory, EBUSY: Busy, ENOENT: NoEntry,
    EBADF: BadFileDescriptor, ENODEV: NoDevice, EEXIST: Exists, ESRCH: NoSuchProcess,
}


def error_from_errno(err: int, msg: str = "") -> HmmError:
    """The :class:`HmmError` subclass for a (negative or positive) errno."""
    return _BY_ERRNO.get(abs(err), HmmError)(err, msg)


class SegmentationFault(HmmsimError):
    """The CPU access raised SIGSEGV (no VMA, or the VMA forbids the access)."""

    def __init__(self, addr: int, write: bool, signal: int = 11) -> None:
        self.addr = addr
        self.write = write
        self.signal = signal
        kind = "write" if write else "read"
        super().__init__(f"SIGSEGV: {kind} of {addr:#x}")


class BusError(SegmentationFault):
    """The CPU access raised SIGBUS (past the end of a file, no hugetlb page, poison)."""

    def __init__(self, addr: int, write: bool, signal: int = 7) -> None:
        super().__init__(addr, write, signal)
        self.args = (f"SIGBUS: {'write' if write else 'read'} of {addr:#x}",)


class Killed(HmmsimError):
    """The process was killed by a signal it cannot catch: SIGKILL from the OOM killer
    when a CPU access needed memory there was none of. The process has exited."""

    def __init__(self, addr: int, write: bool, signal: int = 9) -> None:
        self.addr = addr
        self.write = write
        self.signal = signal
        kind = "write" if write else "read"
        super().__init__(f"SIGKILL (out of memory): {kind} of {addr:#x}; the process was killed")
