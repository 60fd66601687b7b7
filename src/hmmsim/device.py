"""The friendly API over an open dmirror device (``/dev/hmm_dmirrorN``).

Each method issues the driver's ioctl the way ``hmm-tests.c`` does: the data buffer is
an anonymous mapping in the calling process (``ptr``), the counters come back in the
command struct, and a failure raises an :class:`~hmmsim.errors.HmmError` subclass with the
errno (the counters are then not updated, as in the driver).

The buffer lives in a scratch zone above the mmap area (:data:`SCRATCH_BASE`), reused and
only ever grown, so that the facade never lands in a hole of the user's mappings and its
own munmap never invalidates a mirrored page (dmirror erases one page past every
invalidated range).

>>> from hmmsim import System
>>> p = System().spawn()
>>> a = p.mmap(2 * 4096)
>>> p.write(a, b"\\x07" * 8192)
>>> d = p.open_device(0)
>>> r = d.read(a, 2)
>>> r.cpages, r.faults, bytes(r.data[:2])
(2, 1, b'\\x07\\x07')
>>> d.snapshot(a, 2).tolist()
[2, 2]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from .drivers.test_hmm_uapi import (
    HMM_DMIRROR_CHECK_EXCLUSIVE,
    HMM_DMIRROR_EXCLUSIVE,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_RELEASE,
    HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE,
    HmmDmirrorCmd,
)
from .errors import InvalidArgument, error_from_errno
from .kernel.cpu import user_copy
from .kernel.errno import EINVAL, EPERM, ESRCH
from .kernel.mmap import MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE
from .kernel.page_types import PAGE_SHIFT, PAGE_SIZE
from .kernel.task import vm_mmap, vm_munmap
from .kernel.vma import PROT_READ, PROT_WRITE

if TYPE_CHECKING:
    from .process import Process

__all__ = ("Device", "DeviceAccess", "SCRATCH_BASE")

#: where the facade keeps its data buffers (between the mmap base and TASK_SIZE)
SCRATCH_BASE = 0x7F80_0000_0000


class DeviceAccess(NamedTuple):
    """What a device READ/WRITE returns."""

    #: the bytes read (READ) or written (WRITE), as uint8
    data: npt.NDArray[np.uint8]
    #: pages copied (``cmd.cpages``)
    cpages: int
    #: fault rounds the driver needed (``cmd.faults``)
    faults: int


class Device:
    """An open dmirror file of a process."""

    def __init__(self, process: "Process", fd: int, minor: int) -> None:
        self.process = process
        self.fd = fd
        self.minor = minor

    def _alive(self, what: str) -> None:
        """ESRCH if the owning process has exited (its files are closed): nothing runs."""
        if self.process.task.exited:
            raise error_from_errno(-ESRCH, f"{what}: process {self.process.pid} has exited")

    @staticmethod
    def _npages(what: str, npages: int) -> int:
        if not isinstance(npages, int) or npages < 0:
            raise InvalidArgument(-EINVAL, f"{what}: npages must be a non-negative int, not {npages!r}")
        return npages

    def ioctl(self, command: int, cmd: HmmDmirrorCmd) -> int:
        """The raw ``ioctl(fd, command, &cmd)``: 0 or a negative errno."""
        self._alive("ioctl")
        return self.process.task.ioctl(self.fd, command, cmd)

    def _scratch(self, size: int) -> int:
        """The process's scratch buffer, at least *size* bytes (grown by remapping). Its
        current size is read from the VMA tree, so a forked child, which inherits the
        mapping, reuses it."""
        mm = self.process.mm
        vma = mm.find_vma(SCRATCH_BASE)
        have = vma.vm_end - SCRATCH_BASE if vma is not None and vma.vm_start <= SCRATCH_BASE else 0
        length = max((size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1), PAGE_SIZE)
        if have < length:
            if have:
                vm_munmap(mm, SCRATCH_BASE, have)
            buf = vm_mmap(mm, None, SCRATCH_BASE, length, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)
            if buf < 0:
                raise error_from_errno(buf, "device buffer")
        return SCRATCH_BASE

    def _with_buffer(self, size: int, command: int, addr: int, npages: int,
                     data: npt.NDArray[np.uint8] | None = None) -> tuple[HmmDmirrorCmd, npt.NDArray[np.uint8] | None]:
        """Run *command* with the scratch buffer as ``ptr`` (holding *data* first, if
        given); returns the command and the buffer's bytes afterwards (None when *data*
        was given: a WRITE has nothing to read back)."""
        self._alive("device command")
        with self.process.task.running():  # the buffer set-up and copies are the process's
            return self._with_buffer_locked(size, command, addr, npages, data)

    def _with_buffer_locked(self, size: int, command: int, addr: int, npages: int,
                            data: npt.NDArray[np.uint8] | None) -> tuple[HmmDmirrorCmd, npt.NDArray[np.uint8] | None]:
        mm = self.process.mm
        buf = self._scratch(size)
        if data is not None and len(data):  # the CPU fills the buffer (may be OOM-killed)
            _left, sigs = user_copy(mm, buf, data, to_user=True)
            self.process._raise_sig(buf, sigs, True)
        cmd = HmmDmirrorCmd(addr=addr, ptr=buf, npages=npages)
        ret = self.ioctl(command, cmd)
        if ret:
            raise error_from_errno(ret, f"dmirror{self.minor} ioctl")
        if data is not None:
            return cmd, None
        out = np.empty(size, np.uint8)
        _left, sigs = user_copy(mm, buf, out, to_user=False)
        self.process._raise_sig(buf, sigs, False)
        return cmd, out

    def read(self, addr: int, npages: int) -> DeviceAccess:
        """HMM_DMIRROR_READ: the device reads *npages* at *addr* through its mirror."""
        self._npages("read", npages)
        cmd, out = self._with_buffer(npages << PAGE_SHIFT, HMM_DMIRROR_READ, addr, npages)
        assert out is not None
        return DeviceAccess(out, cmd.cpages, cmd.faults)

    def write(self, addr: int, data: bytes | npt.NDArray) -> DeviceAccess:
        """HMM_DMIRROR_WRITE of whole pages of *data* at *addr*."""
        buf = np.frombuffer(bytes(data), np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        if len(buf) % PAGE_SIZE:
            raise InvalidArgument(-EINVAL, f"write: data must be whole pages, not {len(buf)} bytes")
        npages = len(buf) >> PAGE_SHIFT
        cmd, _ = self._with_buffer(len(buf), HMM_DMIRROR_WRITE, addr, npages, buf)
        return DeviceAccess(buf, cmd.cpages, cmd.faults)

    def snapshot(self, addr: int, npages: int) -> npt.NDArray[np.uint8]:
        """HMM_DMIRROR_SNAPSHOT: one ``HMM_DMIRROR_PROT_*`` byte per page."""
        self._npages("snapshot", npages)
        _cmd, out = self._with_buffer(npages, HMM_DMIRROR_SNAPSHOT, addr, npages)
        assert out is not None
        return out

    def migrate(self, addr: int, npages: int) -> DeviceAccess:
        """HMM_DMIRROR_MIGRATE_TO_DEV: move *npages* at *addr* into device memory; the data
        the device then holds is read back (``cpages``: pages found on the device)."""
        self._npages("migrate", npages)
        cmd, out = self._with_buffer(npages << PAGE_SHIFT, HMM_DMIRROR_MIGRATE_TO_DEV, addr, npages)
        assert out is not None
        return DeviceAccess(out, cmd.cpages, cmd.faults)

    def migrate_to_sys(self, addr: int, npages: int) -> int:
        """HMM_DMIRROR_MIGRATE_TO_SYS: move this device's pages of the range back to system
        memory; returns the number moved."""
        self._npages("migrate_to_sys", npages)
        cmd = HmmDmirrorCmd(addr=addr, npages=npages)
        ret = self.ioctl(HMM_DMIRROR_MIGRATE_TO_SYS, cmd)
        if ret:
            raise error_from_errno(ret, "migrate_to_sys")
        return cmd.cpages

    def exclusive(self, addr: int, npages: int) -> DeviceAccess:
        """HMM_DMIRROR_EXCLUSIVE: make *npages* at *addr* device-exclusive (atomic) and
        read them back through the mirror (``cpages``: pages read)."""
        self._npages("exclusive", npages)
        cmd, out = self._with_buffer(npages << PAGE_SHIFT, HMM_DMIRROR_EXCLUSIVE, addr, npages)
        assert out is not None
        return DeviceAccess(out, cmd.cpages, cmd.faults)

    def check_exclusive(self, addr: int, npages: int) -> bool:
        """HMM_DMIRROR_CHECK_EXCLUSIVE: True if no page of the range is mapped ATOMIC."""
        self._npages("check_exclusive", npages)
        ret = self.ioctl(HMM_DMIRROR_CHECK_EXCLUSIVE, HmmDmirrorCmd(addr=addr, npages=npages))
        if ret == -EPERM:
            return False
        if ret:
            raise error_from_errno(ret, "check_exclusive")
        return True

    def release(self) -> None:
        """HMM_DMIRROR_RELEASE: evict every page of the device (every handle's, every
        process's) to system memory and unmap its memory; the next migration maps a new
        chunk. (The driver ignores the range; the facade passes one page at 0.)"""
        ret = self.ioctl(HMM_DMIRROR_RELEASE, HmmDmirrorCmd(addr=0, npages=1))
        if ret:
            raise error_from_errno(ret, "release")

    def close(self) -> None:
        """``close(fd)``: the mirror goes away and the device's memory is evicted."""
        self.process.close(self.fd)

    def __repr__(self) -> str:
        return f"Device(hmm_dmirror{self.minor}, fd={self.fd})"
