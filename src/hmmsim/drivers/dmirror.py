"""The dmirror test device: ``lib/test_hmm.c`` (Linux 6.12).

Four devices, as the module creates them with ``spm_addr_dev0/1`` set: minors 0 and 1
have device-private memory, 2 and 3 device-coherent memory (one 256 MiB chunk each at
init). Every ``open()`` gets a ``struct dmirror``: a device page table (an xarray keyed by
virtual page number, entries tagged WRITE or ATOMIC, holding no page references), a
mutex, and an interval notifier covering the opener's whole address space, whose
callback erases ``[start >> 12, end >> 12]`` *inclusive* (one page past the range) and
ignores ``MMU_NOTIFY_MIGRATE`` events of its own device without ``set_seq``.

Commands implemented here: ``HMM_DMIRROR_READ``, ``HMM_DMIRROR_WRITE``,
``HMM_DMIRROR_SNAPSHOT`` (windows of ``profile.dmirror_window`` pages: 64 in 6.12, 32 in
7.3), ``HMM_DMIRROR_EXCLUSIVE`` (``dmirror_exclusive``), ``HMM_DMIRROR_CHECK_EXCLUSIVE``, ``HMM_DMIRROR_FLAGS`` (absent in 6.12: ``-EINVAL``),
``HMM_DMIRROR_MIGRATE_TO_DEV`` / ``HMM_DMIRROR_MIGRATE_TO_SYS`` (order-0 device pages from
free lists, a private page's data in a backing system page, 7.3's FAIL_ALLOC), the
pagemap's ``migrate_to_ram``, eviction on close and ``HMM_DMIRROR_RELEASE`` (every chunk
evicted and unmapped; the next allocation maps a new one), device THP folios (7.3),
exclusive access and, with the unified fault+migrate walk (``hmm_migrate_on_fault``),
``HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV`` (``dmirror_migrate_on_fault``).

The driver is split like this: ``dmirror_core`` (the structures and the bounce buffer),
``dmirror_mirror`` (notifier, range fault, READ/WRITE/SNAPSHOT/CHECK_EXCLUSIVE),
``dmirror_exclusive`` (EXCLUSIVE),
``dmirror_devmem`` (device memory and migration) and this module (file operations, the
ioctl switch, module init).

Semantics worth knowing (all from the driver's code): ``cpages``/``faults`` are copied
back only on success; READ/WRITE fault in rounds (``faults`` counts rounds, not pages);
a WRITE copies into the pages before the first page needing a fault even if that fault
then fails; a write fault that returns a read-only page fails with ``-EFAULT`` after
storing the entries before it; reading through an entry that points at a device-private
page would oops the real kernel (:class:`KernelOops`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..kernel.errno import EINVAL, ENODEV, ENOMEM
from ..kernel.folio import folio_put
from ..kernel.fs import FMODE_READ, FMODE_WRITE, File, FileOperations
from ..kernel.memory import vm_insert_page
from ..kernel.mmu_notifier import (
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
)
from ..kernel.module import module_init
from ..kernel.page_types import (
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    ULONG_MAX,
)
from ..kernel.trace import tracepoint_dmirror_ioctl
from .dmirror_core import (
    DMIRROR_NDEVICES,
    DMIRROR_RANGE_FAULT_RETRIES,
    DPT_XA_TAG_ATOMIC,
    DPT_XA_TAG_WRITE,
    Dmirror,
    DmirrorDevice,
    DmirrorPT,
)
from .dmirror_devmem import (
    dmirror_allocate_chunk,
    dmirror_device_evict_chunk,
    dmirror_device_remove_chunks,
    dmirror_migrate_to_device,
    dmirror_migrate_to_system,
)
from .dmirror_exclusive import dmirror_exclusive
from .dmirror_mirror import (
    dmirror_check_atomic,
    dmirror_min_ops,
    dmirror_read,
    dmirror_read_unlocked,
    dmirror_snapshot,
    dmirror_write,
)
from .test_hmm_uapi import (
    HMM_DMIRROR_CHECK_EXCLUSIVE,
    HMM_DMIRROR_EXCLUSIVE,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MEMORY_DEVICE_COHERENT,
    HMM_DMIRROR_MEMORY_DEVICE_PRIVATE,
    HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_READ_UNLOCKED,
    HMM_DMIRROR_RELEASE,
    HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE,
    IOCTL_NAMES,
    HmmDmirrorCmd,
)

if TYPE_CHECKING:
    from ..kernel.system import System
    from ..kernel.task import Task
    from ..kernel.vma import Vma


__all__ = (
    "DMIRROR_NDEVICES", "DMIRROR_RANGE_FAULT_RETRIES", "DPT_XA_TAG_ATOMIC", "DPT_XA_TAG_WRITE",
    "Dmirror", "DmirrorDevice", "DmirrorPT", "dmirror_fops", "dmirror_open", "hmm_dmirror_init",
)


# -- file operations -------------------------------------------------------------------------------
@tracepoint_dmirror_ioctl
def dmirror_fops_unlocked_ioctl(file: File, command: int, cmd: HmmDmirrorCmd, caller: "Task") -> int:
    """``dmirror_fops_unlocked_ioctl()``: validate, dispatch, copy the counters back on
    success. *cmd* is the user's ``struct hmm_dmirror_cmd``; its ``ptr`` is an address in
    *caller*'s address space."""
    dmirror: Dmirror | None = file.private_data
    if dmirror is None:
        return -EINVAL
    addr = cmd.addr & ULONG_MAX
    if addr & ~PAGE_MASK:
        return -EINVAL
    if addr >= (addr + (cmd.npages << PAGE_SHIFT)) & ULONG_MAX:
        return -EINVAL
    k = HmmDmirrorCmd(addr=addr, ptr=cmd.ptr, npages=cmd.npages)
    dmirror.sys.stats.add(f"dmirror.ioctl.{IOCTL_NAMES.get(command, 'HMM_DMIRROR_UNKNOWN').removeprefix('HMM_DMIRROR_').lower()}")
    if command == HMM_DMIRROR_READ:
        ret = dmirror_read(dmirror, k, caller)
    elif command == HMM_DMIRROR_WRITE:
        ret = dmirror_write(dmirror, k, caller)
    elif command == HMM_DMIRROR_SNAPSHOT:
        ret = dmirror_snapshot(dmirror, k, caller)
    elif command == HMM_DMIRROR_CHECK_EXCLUSIVE:
        ret = dmirror_check_atomic(dmirror, k.addr, k.addr + (k.npages << PAGE_SHIFT))
    elif command == HMM_DMIRROR_MIGRATE_TO_DEV:
        ret = dmirror_migrate_to_device(dmirror, k, caller)
    elif command == HMM_DMIRROR_MIGRATE_TO_SYS:
        ret = dmirror_migrate_to_system(dmirror, k)
    elif command == HMM_DMIRROR_RELEASE:
        dmirror_device_remove_chunks(dmirror.mdevice)
        ret = 0
    elif command == HMM_DMIRROR_EXCLUSIVE:
        ret = dmirror_exclusive(dmirror, k, caller)
    elif command == HMM_DMIRROR_FLAGS and dmirror.sys.profile.dmirror_flags_cmd:
        # the whole word is stored; HMM_DMIRROR_FLAG_FAIL_ALLOC is consumed by the next
        # device page allocation (dmirror_devmem_alloc_page / the THP allocator)
        dmirror.flags = k.npages
        ret = 0
    elif command == HMM_DMIRROR_READ_UNLOCKED and dmirror.sys.profile.dmirror_read_unlocked_cmd:
        ret = dmirror_read_unlocked(dmirror, k, caller, 0)
    elif command == HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV and dmirror.sys.profile.hmm_migrate_on_fault:
        from .dmirror_migrate_on_fault import dmirror_migrate_on_fault_to_device
        ret = dmirror_migrate_on_fault_to_device(dmirror, k, caller)
    else:
        # the ioctl switch's default: an unknown command, or one this release lacks
        return -EINVAL
    if ret:
        return ret
    cmd.cpages = k.cpages
    cmd.faults = k.faults
    return 0


def dmirror_fops_release(inode: Any, file: File) -> int:
    """``dmirror_fops_release()``: drop the notifier, evict the device's memory, free."""
    dmirror: Dmirror = file.private_data
    mmu_interval_notifier_remove(dmirror.notifier)
    mdevice = dmirror.mdevice
    for chunk in list(mdevice.chunks):
        dmirror_device_evict_chunk(chunk)
    dmirror.pt = DmirrorPT()
    file.private_data = None
    dmirror.sys.stats.add("dmirror.release")
    return 0


def dmirror_fops_mmap(file: File, vma: "Vma") -> int:
    """``dmirror_fops_mmap()``: back every page of the VMA with a zeroed kernel page
    (``vm_insert_page``, so the VMA becomes VM_MIXEDMAP)."""
    sys = vma.vm_mm.sys
    for addr in range(vma.vm_start, vma.vm_end, PAGE_SIZE):
        pfn = sys.mem.alloc_page()
        if pfn < 0:
            return -ENOMEM
        ret = vm_insert_page(vma, addr, pfn)
        if ret:
            folio_put(sys, pfn)
            return ret
        folio_put(sys, pfn)
    return 0


dmirror_fops = FileOperations("dmirror", mmap=dmirror_fops_mmap, release=dmirror_fops_release,
                              unlocked_ioctl=dmirror_fops_unlocked_ioctl)


def dmirror_fops_open(mdevice: DmirrorDevice, task: "Task") -> File | int:
    """``dmirror_fops_open()``: a new mirror of the opener's address space."""
    dmirror = Dmirror(mdevice)
    ret = mmu_interval_notifier_insert(dmirror.notifier, task.mm, 0, ULONG_MAX & PAGE_MASK, dmirror_min_ops)
    if ret:
        return ret
    return File(None, dmirror_fops, FMODE_READ | FMODE_WRITE, private_data=dmirror,
                name=f"hmm_dmirror{mdevice.minor}")


def dmirror_open(sys: "System", task: "Task", minor: int) -> int:
    """``open("/dev/hmm_dmirrorN", O_RDWR)`` in *task*: an fd, or ``-ENODEV`` if no such
    device exists."""
    if not 0 <= minor < len(sys.dmirror_devices) or sys.dmirror_devices[minor] is None:
        return -ENODEV
    with task.running():
        f = dmirror_fops_open(sys.dmirror_devices[minor], task)
    if isinstance(f, int):
        return f
    return task.fd_install(f)


@module_init("test_hmm")
def hmm_dmirror_init(sys: "System") -> None:
    """``hmm_dmirror_init()``: create the devices, each with its first chunk."""
    types = [HMM_DMIRROR_MEMORY_DEVICE_PRIVATE, HMM_DMIRROR_MEMORY_DEVICE_PRIVATE]
    if sys.spm_range(0) >= 0 and sys.spm_range(1) >= 0:
        types += [HMM_DMIRROR_MEMORY_DEVICE_COHERENT, HMM_DMIRROR_MEMORY_DEVICE_COHERENT]
    for minor, t in enumerate(types):
        dev = DmirrorDevice(sys, minor, t)
        ret, _page = dmirror_allocate_chunk(dev)
        if ret:
            raise RuntimeError(f"hmm_dmirror_init: device {minor}: {ret}")
        sys.dmirror_devices.append(dev)
