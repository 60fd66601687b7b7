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
7.3), ``HMM_DMIRROR_CHECK_EXCLUSIVE``, ``HMM_DMIRROR_FLAGS`` (absent in 6.12: ``-EINVAL``),
``HMM_DMIRROR_MIGRATE_TO_DEV`` / ``HMM_DMIRROR_MIGRATE_TO_SYS`` (order-0 device pages from
free lists, a private page's data in a backing system page, 7.3's FAIL_ALLOC), the
pagemap's ``migrate_to_ram`` and eviction on close. Exclusive access, ``RELEASE`` and
device THP folios raise :class:`NotSupportedError`.

Semantics worth knowing (all from the driver's code): ``cpages``/``faults`` are copied
back only on success; READ/WRITE fault in rounds (``faults`` counts rounds, not pages);
a WRITE copies into the pages before the first page needing a fault even if that fault
then fails; a write fault that returns a read-only page fails with ``-EFAULT`` after
storing the entries before it; reading through an entry that points at a device-private
page would oops the real kernel (:class:`KernelOops`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..hmm.hmm import (
    HMM_PFN_ERROR,
    HMM_PFN_ORDER_MASK,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    hmm_pfn_layout,
    hmm_range_fault,
)
from ..kernel.bug import KernelOops, NotSupportedError
from ..kernel.cpu import copy_from_user, copy_pages_to_user, copy_to_user, translate_range
from ..kernel.errno import EBUSY, EFAULT, EINVAL, ENODEV, ENOENT, ENOMEM, EPERM
from ..kernel.folio import folio_put
from ..kernel.fs import FMODE_READ, FMODE_WRITE, File, FileOperations
from ..kernel.locking import Lock
from ..kernel.memory import vm_insert_page
from ..kernel.memremap import DevPagemap, DevPagemapOps, MemoryType, memremap_pages, zone_device_page_init
from ..kernel.mm import mmap_read_lock, mmap_read_unlock
from ..kernel.mm_types import VM_FAULT_OOM, VM_FAULT_SIGBUS, VmFault
from ..kernel.mmu_notifier import (
    MmuIntervalNotifier,
    MmuIntervalNotifierOps,
    MmuNotifierEvent,
    MmuNotifierRange,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
    mmu_notifier_range_blockable,
)
from ..kernel.module import module_init
from ..kernel.pagemap import folio_lock
from ..hmm.migrate_device import (
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_device_finalize,
    migrate_device_pages,
    migrate_device_range,
    migrate_pfn,
    migrate_pfn_to_page,
    migrate_vma_finalize,
    migrate_vma_pages,
    migrate_vma_setup,
)
from ..kernel.trace import tracepoint_dmirror_ioctl
from ..kernel.page_types import (
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SHIFT,
    PUD_SHIFT,
    ULONG_MAX,
)
from ..kernel.system import DEVMEM_CHUNK_PAGES
from ..kernel.task import mmget_not_zero, mmput
from ..kernel.vma import VM_HUGETLB, VM_READ
from .test_hmm_uapi import (
    HMM_DMIRROR_CHECK_EXCLUSIVE,
    HMM_DMIRROR_EXCLUSIVE,
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MEMORY_DEVICE_COHERENT,
    HMM_DMIRROR_MEMORY_DEVICE_PRIVATE,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_PUD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
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

DMIRROR_NDEVICES = 4
#: the model's stand-in for the 1 s jiffies timeout of dmirror_range_fault(): retries
DMIRROR_RANGE_FAULT_RETRIES = 1000
DPT_XA_TAG_ATOMIC = 1
DPT_XA_TAG_WRITE = 3
_LEAF = 512  # entries per DmirrorPT leaf


class DmirrorPT:
    """The device page table: an xarray keyed by virtual page number whose values are
    tagged page pointers, stored as ``pfn << 2 | tag`` (-1 = empty) in 512-entry leaves."""

    __slots__ = ("leaves",)

    def __init__(self) -> None:
        self.leaves: dict[int, npt.NDArray[np.int64]] = {}

    def load_range(self, vpn: int, n: int) -> npt.NDArray[np.int64]:
        """``xa_load()`` of ``n`` consecutive indices (-1 where empty)."""
        out = np.full(n, -1, np.int64)
        i = 0
        while i < n:
            k, off = divmod(vpn + i, _LEAF)
            m = min(n - i, _LEAF - off)
            leaf = self.leaves.get(k)
            if leaf is not None:
                out[i:i + m] = leaf[off:off + m]
            i += m
        return out

    def store_range(self, vpn: int, vals: npt.NDArray[np.int64]) -> None:
        """``xa_store()`` of consecutive indices."""
        i = 0
        n = len(vals)
        while i < n:
            k, off = divmod(vpn + i, _LEAF)
            m = min(n - i, _LEAF - off)
            leaf = self.leaves.get(k)
            if leaf is None:
                leaf = self.leaves[k] = np.full(_LEAF, -1, np.int64)
            leaf[off:off + m] = vals[i:i + m]
            i += m

    def erase_range(self, first: int, last: int) -> None:
        """``xa_erase()`` of every index in ``[first, last]`` (inclusive)."""
        for k in [k for k in self.leaves if first // _LEAF <= k <= last // _LEAF]:
            leaf = self.leaves[k]
            lo = max(first - k * _LEAF, 0)
            hi = min(last - k * _LEAF, _LEAF - 1)
            leaf[lo:hi + 1] = -1
            if (leaf < 0).all():
                del self.leaves[k]

    def __len__(self) -> int:
        return int(sum(int((v >= 0).sum()) for v in self.leaves.values()))


class DmirrorChunk:
    """``struct dmirror_chunk``: one 256 MiB pagemap of a device."""

    __slots__ = ("pagemap", "mdevice", "remove")

    def __init__(self, pagemap: DevPagemap, mdevice: "DmirrorDevice") -> None:
        self.pagemap = pagemap
        self.mdevice = mdevice
        self.remove = False


class DmirrorDevice:
    """``struct dmirror_device``: one of the four ``/dev/hmm_dmirrorN``."""

    def __init__(self, sys: "System", minor: int, zone_device_type: int) -> None:
        self.sys = sys
        self.minor = minor
        self.zone_device_type = zone_device_type
        self.chunks: list[DmirrorChunk] = []
        self.calloc = 0
        self.cfree = 0
        self.free_pages: list[int] = []
        #: backing page (private) or device page (coherent) -> the dmirror that migrated
        #: it there (test_hmm keeps this in the backing page's ``zone_device_data``)
        self.backing_owner: dict[int, "Dmirror"] = {}
        self.devmem_lock = Lock(sys.ls, "dmirror_devmem_lock")
        self.lock = Lock(sys.ls, "dmirror_device_lock", sleepable=False)

    @property
    def is_private(self) -> bool:
        return self.zone_device_type == HMM_DMIRROR_MEMORY_DEVICE_PRIVATE

    def __repr__(self) -> str:
        kind = "private" if self.is_private else "coherent"
        return f"DmirrorDevice({self.minor}, {kind})"


class Dmirror:
    """``struct dmirror``: the state of one open file of a device."""

    def __init__(self, mdevice: DmirrorDevice) -> None:
        self.mdevice = mdevice
        self.pt = DmirrorPT()
        self.notifier = MmuIntervalNotifier(owner=self)
        self.mutex = Lock(mdevice.sys.ls, "dmirror_mutex")
        #: ``dmirror->flags`` (HMM_DMIRROR_FLAGS, 7.3): HMM_DMIRROR_FLAG_* bits
        self.flags = 0

    @property
    def sys(self) -> "System":
        return self.mdevice.sys


class DmirrorBounce:
    """``struct dmirror_bounce``: a vmalloc'd kernel buffer for the data of one command.

    Its pages are accounted against RAM (``PhysMem.charge``) rather than given frames. Its
    bytes live in ``data``, allocated when first needed; pages that a READ copies are
    first only noted by their source frame (``src``), and copied for real only if
    something could change those frames before the copy to user memory
    (:func:`_bounce_settle`)."""

    __slots__ = ("addr", "size", "cpages", "data", "src", "npages")

    def __init__(self, addr: int, size: int) -> None:
        self.addr = addr
        self.size = size
        self.npages = size >> PAGE_SHIFT
        self.cpages = 0
        self.data: npt.NDArray[np.uint8] | None = None
        self.src: npt.NDArray[np.int64] | None = None

    def buffer(self) -> npt.NDArray[np.uint8]:
        """The bytes (allocated, zero-filled, on first use)."""
        if self.data is None:
            self.data = np.zeros(self.size, np.uint8)
        return self.data


def _bounce_init(sys: "System", addr: int, size: int) -> DmirrorBounce | int:
    """``dmirror_bounce_init()``: ``vmalloc(size)``. vmalloc refuses outright more pages
    than the machine has RAM; otherwise its pages come out of free memory, and when
    there is not enough the OOM killer runs (an OOM event) and vmalloc fails."""
    npages = size >> PAGE_SHIFT
    if npages > sys.mem.totalram_pages:
        return -ENOMEM
    if not sys.mem.charge(npages):
        return -ENOMEM
    return DmirrorBounce(addr, size)


def _bounce_fini(sys: "System", bounce: DmirrorBounce) -> None:
    """``dmirror_bounce_fini()``: vfree."""
    sys.mem.uncharge(bounce.npages)
    bounce.data = None
    bounce.src = None


def _bounce_settle(sys: "System", bounce: DmirrorBounce) -> None:
    """Copy the bytes of every page only noted by its source frame into ``data``."""
    if bounce.src is None:
        return
    idx = np.flatnonzero(bounce.src >= 0)
    if len(idx):
        view = bounce.buffer().reshape(bounce.npages, PAGE_SIZE)
        for a in range(0, len(idx), 4096):
            part = idx[a:a + 4096]
            got = np.empty((len(part), PAGE_SIZE), np.uint8)
            sys.mem.read_pages(bounce.src[part], got)
            view[part] = got
    bounce.src = None


# -- device memory ---------------------------------------------------------------------------------
def dmirror_allocate_chunk(mdevice: DmirrorDevice) -> int:
    """``dmirror_allocate_chunk()`` (without taking a page): add a 256 MiB pagemap and put
    its pages on the free list. Coherent devices use their fixed SPM range."""
    sys = mdevice.sys
    if mdevice.is_private:
        start = sys.request_free_mem_region(DEVMEM_CHUNK_PAGES)
        if start < 0:
            return -ENOMEM
        mtype = MemoryType.MEMORY_DEVICE_PRIVATE
    else:
        start = sys.spm_range(1 if mdevice.minor == 2 else 0)
        if start < 0 or mdevice.chunks:
            return -EINVAL
        mtype = MemoryType.MEMORY_DEVICE_COHERENT
    ops = DevPagemapOps(page_free=lambda pfn: dmirror_devmem_free(mdevice, pfn),
                        migrate_to_ram=dmirror_devmem_fault)
    pgmap = DevPagemap(mtype, start, DEVMEM_CHUNK_PAGES, ops, owner=mdevice)
    with mdevice.devmem_lock.held():
        ret = memremap_pages(sys, pgmap)
        if ret:
            return ret
        mdevice.chunks.append(DmirrorChunk(pgmap, mdevice))
    with mdevice.lock.held():
        # the free list is a stack; pages come out lowest pfn first
        mdevice.free_pages.extend(range(start + DEVMEM_CHUNK_PAGES - 1, start - 1, -1))
    sys.stats.add("dmirror.chunks")
    return 0


def dmirror_devmem_free(mdevice: DmirrorDevice, pfn: int) -> None:
    """``dmirror_devmem_free()`` (``page_free``): free the backing page of a private page
    and put the device page back on the free list (unless its chunk is being removed)."""
    sys = mdevice.sys
    backing = int(sys.mem.zone_device_data[pfn])
    mdevice.backing_owner.pop(backing or pfn, None)
    if mdevice.is_private and backing:
        sys.mem.zone_device_data[pfn] = 0
        folio_put(sys, backing)
    with mdevice.lock.held():
        chunk = next(c for c in mdevice.chunks if c.pagemap.start_pfn <= pfn < c.pagemap.start_pfn + c.pagemap.nr_pages)
        if not chunk.remove:
            mdevice.cfree += 1
            mdevice.free_pages.append(pfn)


def dmirror_devmem_alloc_page(dmirror: "Dmirror") -> int:
    """``dmirror_devmem_alloc_page()`` (order 0): a private device gets a system page to
    hold the data (``zone_device_data``); the device page comes off the free list, or from
    a new chunk. Returns the device pfn (refcount 1, locked) or -1."""
    mdevice = dmirror.mdevice
    sys = mdevice.sys
    rpage = 0
    if mdevice.is_private:
        rpage = sys.mem.alloc_page()
        if rpage < 0:
            return -1
    with mdevice.lock.held():
        dpage = mdevice.free_pages.pop() if mdevice.free_pages else -1
        if dpage >= 0:
            mdevice.calloc += 1
    if dpage < 0:
        if dmirror_allocate_chunk(mdevice) or not mdevice.free_pages:
            if rpage:
                folio_put(sys, rpage)
            return -1
        with mdevice.lock.held():
            dpage = mdevice.free_pages.pop()
            mdevice.calloc += 1
    zone_device_page_init(sys, dpage)
    sys.mem.zone_device_data[dpage] = rpage
    return dpage


def _backing_page(sys: "System", dpage: int) -> int:
    """``BACKING_PAGE()``: a private page's data page; a coherent page holds its data."""
    rpage = int(sys.mem.zone_device_data[dpage])
    return rpage if rpage else dpage


def dmirror_migrate_alloc_and_copy(args: MigrateVma, dmirror: "Dmirror") -> None:
    """``dmirror_migrate_alloc_and_copy()`` (order 0): a device page for every selected
    entry, the data copied (or cleared for holes and the zero page) into its backing page.
    7.3's ``HMM_DMIRROR_FLAG_FAIL_ALLOC`` fails the first allocation (that entry is left)."""
    sys = dmirror.sys
    mem = sys.mem
    for i in range(args.npages):
        s = int(args.src[i])
        if not s & MIGRATE_PFN_MIGRATE:
            continue
        spage = migrate_pfn_to_page(s)
        if spage >= 0 and mem.pgmap[spage]:
            sys.stats.add("dmirror.warn_already_device")  # WARN: page already in device
            continue
        if dmirror.flags & HMM_DMIRROR_FLAG_FAIL_ALLOC:
            dmirror.flags &= ~HMM_DMIRROR_FLAG_FAIL_ALLOC
            dpage = -1
        else:
            dpage = dmirror_devmem_alloc_page(dmirror)
        if dpage < 0:
            continue
        rpage = _backing_page(sys, dpage)
        dmirror.mdevice.backing_owner[rpage] = dmirror
        args.dst[i] = np.uint64(migrate_pfn(dpage) | (s & MIGRATE_PFN_WRITE))
        if spage >= 0:
            mem.copy_pages(rpage, spage)
        else:
            mem.clear_pages(rpage)


def dmirror_migrate_finalize_and_map(args: MigrateVma, dmirror: "Dmirror") -> int:
    """``dmirror_migrate_finalize_and_map()``: map the migrated pages (their backing pages)
    in the device page table, tagged WRITE where the source was writable."""
    sys = dmirror.sys
    with dmirror.mutex.held():
        vpn0 = args.start >> PAGE_SHIFT
        for i in range(args.npages):
            if not int(args.src[i]) & MIGRATE_PFN_MIGRATE:
                continue
            d = int(args.dst[i])
            dpage = migrate_pfn_to_page(d)
            if dpage < 0:
                continue
            tag = DPT_XA_TAG_WRITE if d & MIGRATE_PFN_WRITE else 0
            dmirror.pt.store_range(vpn0 + i, np.array([(_backing_page(sys, dpage) << 2) | tag], np.int64))
    return 0


def _select_device(dmirror: "Dmirror") -> int:
    """``dmirror_select_device()``."""
    return (MIGRATE_VMA_SELECT_DEVICE_PRIVATE if dmirror.mdevice.is_private
            else MIGRATE_VMA_SELECT_DEVICE_COHERENT)


def dmirror_devmem_fault_alloc_and_copy(args: MigrateVma, dmirror: "Dmirror") -> int:
    """``dmirror_devmem_fault_alloc_and_copy()`` (order 0): a system page for every selected
    device page, its device page-table entry erased, the data copied back. Returns 0 or
    ``VM_FAULT_OOM`` (also when 7.3's FAIL_ALLOC fails the allocation)."""
    sys = dmirror.sys
    mem = sys.mem
    for i in range(args.npages):
        s = int(args.src[i])
        spage = migrate_pfn_to_page(s)
        if spage < 0 or not s & MIGRATE_PFN_MIGRATE:
            continue
        if not mem.pgmap[spage]:
            sys.stats.add("dmirror.warn_not_device")  # WARN_ON
            continue
        rpage = _backing_page(sys, spage)
        if dmirror.flags & HMM_DMIRROR_FLAG_FAIL_ALLOC:
            dmirror.flags &= ~HMM_DMIRROR_FLAG_FAIL_ALLOC
            dpage = -1
        else:
            dpage = mem.alloc_page()
        if dpage < 0:
            return VM_FAULT_OOM
        folio_lock(sys, dpage)
        args.dst[i] = np.uint64(migrate_pfn(dpage) | (s & MIGRATE_PFN_WRITE))
        vpn = (args.start >> PAGE_SHIFT) + i
        dmirror.pt.erase_range(vpn, vpn)
        mem.copy_pages(dpage, rpage)
    return 0


def dmirror_devmem_fault(vmf: "VmFault") -> int:
    """``dmirror_devmem_fault()`` (``migrate_to_ram``): migrate the faulting page back to a
    system page, through the dmirror that put it on the device."""
    sys = vmf.vma.vm_mm.sys
    rpage = _backing_page(sys, vmf.page)
    pg = sys.pgmap_of(vmf.page)
    assert pg is not None
    dmirror = pg.owner.backing_owner[rpage]
    start = vmf.address & PAGE_MASK
    args = MigrateVma(vmf.vma, start, start + PAGE_SIZE, dmirror.mdevice, _select_device(dmirror),
                      fault_page=vmf.page)
    if migrate_vma_setup(args):
        return VM_FAULT_SIGBUS
    ret = dmirror_devmem_fault_alloc_and_copy(args, dmirror)
    if ret:
        migrate_vma_finalize(args)
        return ret
    migrate_vma_pages(args)
    migrate_vma_finalize(args)
    return 0


def _migrate_windows(dmirror: "Dmirror", cmd: HmmDmirrorCmd, to_dev: bool) -> int:
    """The loop of ``dmirror_migrate_to_device()`` / ``dmirror_migrate_to_system()``: one
    ``migrate_vma_*`` round per page table (or VMA end) of the range."""
    mm = dmirror.notifier.mm
    start = cmd.addr
    end = start + (cmd.npages << PAGE_SHIFT)
    if end < start:
        return -EINVAL
    if not mmget_not_zero(mm):
        return -EINVAL
    ret = 0
    if not to_dev:
        cmd.cpages = 0
    mmap_read_lock(mm)
    try:
        addr = start
        while addr < end:
            vma = mm.vma_lookup(addr)
            if vma is None or not vma.vm_flags & VM_READ:
                return -EINVAL
            nxt = min(end, addr + (512 << PAGE_SHIFT), vma.vm_end)
            flags = MIGRATE_VMA_SELECT_SYSTEM if to_dev else _select_device(dmirror)
            args = MigrateVma(vma, addr, nxt, dmirror.mdevice, flags)
            ret = migrate_vma_setup(args)
            if ret:
                return ret
            if to_dev:
                dmirror_migrate_alloc_and_copy(args, dmirror)
                migrate_vma_pages(args)
                dmirror_migrate_finalize_and_map(args, dmirror)
                migrate_vma_finalize(args)
            else:
                if dmirror_devmem_fault_alloc_and_copy(args, dmirror):
                    migrate_vma_finalize(args)
                    return -ENOMEM
                migrate_vma_pages(args)
                cmd.cpages += sum(1 for v in args.src[:args.npages].tolist()
                                  if v & MIGRATE_PFN_VALID and v & MIGRATE_PFN_MIGRATE)
                migrate_vma_finalize(args)
            addr = nxt
    finally:
        mmap_read_unlock(mm)
        mmput(mm)
    return ret


def dmirror_migrate_to_system(dmirror: "Dmirror", cmd: HmmDmirrorCmd) -> int:
    """``dmirror_migrate_to_system()``: ``cpages`` counts the device pages moved back."""
    return _migrate_windows(dmirror, cmd, to_dev=False)


def dmirror_migrate_to_device(dmirror: "Dmirror", cmd: HmmDmirrorCmd, caller: "Task") -> int:
    """``dmirror_migrate_to_device()``: migrate, then read the device's copy back into the
    user's buffer (``-ENOENT`` if a page of the range is not on the device)."""
    ret = _migrate_windows(dmirror, cmd, to_dev=True)
    if ret:
        return ret
    start = cmd.addr
    size = cmd.npages << PAGE_SHIFT
    bounce = _bounce_init(dmirror.sys, start, size)
    if isinstance(bounce, int):
        return bounce
    try:
        with dmirror.mutex.held():
            ret = dmirror_do_read(dmirror, start, start + size, bounce)
        if ret == 0:
            ret = _bounce_to_user(dmirror, bounce, caller, cmd.ptr)
        cmd.cpages = bounce.cpages
    finally:
        _bounce_fini(dmirror.sys, bounce)
    return ret


def _device_pages_in_use(mdevice: DmirrorDevice) -> bool:
    mem = mdevice.sys.mem
    return any(bool(mem.refcount[c.pagemap.start_pfn:c.pagemap.start_pfn + c.pagemap.nr_pages].any())
               for c in mdevice.chunks)


def dmirror_device_evict_chunk(chunk: DmirrorChunk) -> None:
    """``dmirror_device_evict_chunk()``: migrate every page of the chunk that is in use
    back to system memory (``migrate_device_range`` / ``_pages`` / ``_finalize``), a window
    of pages at a time. A chunk with no page in use needs nothing."""
    sys = chunk.mdevice.sys
    mem = sys.mem
    pg = chunk.pagemap
    used = np.flatnonzero(mem.refcount[pg.start_pfn:pg.start_pfn + pg.nr_pages] > 0)
    if not len(used):
        return
    lo, hi = pg.start_pfn + int(used[0]), pg.start_pfn + int(used[-1]) + 1
    for start in range(lo, hi, 512):
        n = min(512, hi - start)
        src = np.zeros(n, np.uint64)
        dst = np.zeros(n, np.uint64)
        migrate_device_range(sys, src, start, n)
        for i in range(n):
            spage = migrate_pfn_to_page(int(src[i]))
            if spage < 0 or not int(src[i]) & MIGRATE_PFN_MIGRATE:
                continue
            dpage = mem.alloc_page()
            if dpage < 0:
                raise KernelOops("dmirror_device_evict_chunk: __GFP_NOFAIL allocation failed")
            folio_lock(sys, dpage)
            mem.copy_pages(dpage, _backing_page(sys, spage))
            dst[i] = np.uint64(migrate_pfn(dpage) | (int(src[i]) & MIGRATE_PFN_WRITE))
        migrate_device_pages(sys, src, dst, n)
        migrate_device_finalize(sys, src, dst, n)


# -- the mirror: notifier, fault, read/write ---------------------------------------------------------
def dmirror_interval_invalidate(mni: MmuIntervalNotifier, r: MmuNotifierRange, cur_seq: int) -> bool:
    """``dmirror_interval_invalidate()``."""
    dmirror: Dmirror = mni.owner
    if r.event == MmuNotifierEvent.MMU_NOTIFY_MIGRATE and r.owner is dmirror.mdevice:
        return True
    if mmu_notifier_range_blockable(r):
        dmirror.mutex.lock()
    elif not dmirror.mutex.trylock():
        return False
    try:
        mmu_interval_set_seq(mni, cur_seq)
        dmirror.pt.erase_range(r.start >> PAGE_SHIFT, r.end >> PAGE_SHIFT)
        dmirror.sys.stats.add("dmirror.invalidate")
    finally:
        dmirror.mutex.unlock()
    return True


dmirror_min_ops = MmuIntervalNotifierOps(dmirror_interval_invalidate)


def dmirror_do_fault(dmirror: Dmirror, r: HmmRange) -> int:
    """``dmirror_do_fault()``: store the faulted pages in the device page table (mutex
    held). A read-only result for a write request is a WARN and ``-EFAULT``, after the
    entries before it were stored."""
    n = (r.end - r.start) >> PAGE_SHIFT
    pfns = r.hmm_pfns[:n]
    bad = (pfns & np.uint64(HMM_PFN_ERROR)) != 0
    bad |= (pfns & np.uint64(HMM_PFN_VALID)) == 0
    if bad.any():
        raise AssertionError("dmirror_do_fault: hmm_range_fault returned an invalid entry")
    writable = (pfns & np.uint64(HMM_PFN_WRITE)) != 0
    stop = n
    if r.default_flags & HMM_PFN_REQ_WRITE and not writable.all():
        stop = int(np.argmin(writable))
        dmirror.sys.stats.add("dmirror.warn_readonly_write")
    layout = hmm_pfn_layout(dmirror.sys.profile)
    page = (pfns[:stop] & np.uint64(~layout.flags & ULONG_MAX)).astype(np.int64)
    vals = (page << 2) | np.where(writable[:stop], DPT_XA_TAG_WRITE, 0)
    dmirror.pt.store_range(r.start >> PAGE_SHIFT, vals)
    return -EFAULT if stop < n else 0


def dmirror_range_fault(dmirror: Dmirror, r: HmmRange) -> int:
    """``dmirror_range_fault()``: the retry loop every HMM driver has."""
    return _range_fault(dmirror, r)[0]


def _range_fault(dmirror: Dmirror, r: HmmRange) -> tuple[int, bool]:
    """:func:`dmirror_range_fault`, also saying whether the result comes from
    ``dmirror_do_fault()`` (True) or from ``hmm_range_fault()``/the retry budget (False)."""
    mm = dmirror.notifier.mm
    assert mm is not None
    for _ in range(DMIRROR_RANGE_FAULT_RETRIES):
        r.notifier_seq = mmu_interval_read_begin(r.notifier)
        mmap_read_lock(mm)
        try:
            ret = hmm_range_fault(r)
        finally:
            mmap_read_unlock(mm)
        if ret:
            if ret == -EBUSY:
                continue
            return ret, False
        dmirror.mutex.lock()
        if mmu_interval_read_retry(r.notifier, r.notifier_seq):
            dmirror.mutex.unlock()
            continue
        try:
            return dmirror_do_fault(dmirror, r), True
        finally:
            dmirror.mutex.unlock()
    return -EBUSY, False


def dmirror_fault(dmirror: Dmirror, start: int, end: int, write: bool) -> int:
    """``dmirror_fault()``: fault ``[start, end)`` into the mirror one window
    (``dmirror_window`` pages: 64 in 6.12, 32 in 7.3) at a time.

    Fast path: runs of windows are faulted and mirrored as one batch
    (:func:`_fault_batch`) when no simulated thread can run in between; a batch that
    fails goes again window by window, which reproduces the driver's partial result."""
    mm = dmirror.notifier.mm
    assert mm is not None
    win = dmirror.sys.profile.dmirror_window
    flags = HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0)
    r = HmmRange(notifier=dmirror.notifier, start=start, end=start,
                 hmm_pfns=np.zeros(win, np.uint64), pfn_flags_mask=0,
                 default_flags=flags, dev_private_owner=dmirror.mdevice)
    if not mmget_not_zero(mm):
        return -EFAULT
    ret = 0
    slow_until = start
    try:
        addr = start
        while addr < end:
            if addr >= slow_until and addr + (win << PAGE_SHIFT) < end and not _threads_may_race(dmirror.sys):
                done, ret = _fault_batch(dmirror, addr, end, flags, win)
                if ret:
                    break
                if done > addr:
                    addr = done
                    continue
                slow_until = min(addr + (_BATCH_PAGES << PAGE_SHIFT), end)
            r.start = addr
            r.end = min(addr + (win << PAGE_SHIFT), end)
            ret = dmirror_range_fault(dmirror, r)
            if ret:
                break
            addr = r.end
    finally:
        mmput(mm)
    return ret


def _fault_batch(dmirror: Dmirror, addr: int, end: int, flags: int, win: int) -> tuple[int, int]:
    """The windows of ``dmirror_fault()`` in ``[addr, addr + _BATCH_PAGES)`` as one
    ``dmirror_range_fault()``, counting each window's protocol.

    Equivalent to the window loop: faults happen in the same address order, and an
    invalidation during them erases only entries from its own range on, which in either
    form are stored after it (the whole batch retries, as a window would). Returns
    ``(where the batch ends, 0)``, or ``(addr, 0)`` when it must go window by window: a
    hugetlb VMA in the range (6.12 reports a lockdep warning per walk), or a failed
    fault (the windows before it are then mirrored by the window loop, as the driver
    leaves them); ``(addr, ret)`` if storing the entries failed (after storing those
    before the read-only page, as ``dmirror_do_fault()`` does)."""
    mm = dmirror.notifier.mm
    assert mm is not None
    bend = min(addr + (_BATCH_PAGES << PAGE_SHIFT), end)
    if any(v.vm_flags & VM_HUGETLB for v in mm.vmas(addr, bend)):
        return addr, 0
    stats = dmirror.sys.stats
    protocol = {key: stats[key] for key in _PROTOCOL_KEYS}
    n = (bend - addr) >> PAGE_SHIFT
    r = HmmRange(notifier=dmirror.notifier, start=addr, end=bend, hmm_pfns=np.zeros(n, np.uint64),
                 pfn_flags_mask=0, default_flags=flags, dev_private_owner=dmirror.mdevice)
    ret, stored = _range_fault(dmirror, r)
    if not stored:
        # hmm_range_fault failed (or kept saying -EBUSY): the faults made so far stay made
        # (and counted), the calls do not; the window loop redoes this part
        for key in _PROTOCOL_KEYS:
            stats._c[key] = protocol[key]  # noqa: SLF001
        return addr, 0
    _count_windows(dmirror, -(-n // win) - 1, snapshot=False)
    return (addr, ret) if ret else (bend, 0)


def _kernel_pages(dmirror: Dmirror, entries: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The pfns a kernel copy would go through (``memcpy_from/to_page``); a device-private
    page has no kernel mapping: the real kernel oopses (conventions, item 25)."""
    sys = dmirror.sys
    pfns = entries >> 2
    if len(pfns) and (pfns >= sys.mem.data_pages).any():
        pfn = int(pfns[pfns >= sys.mem.data_pages][0])
        raise KernelOops(f"dmirror{dmirror.mdevice.minor}: copy through device-private page "
                         f"{pfn:#x} (no kernel mapping): BUG in dmirror_do_read/write")
    return pfns


def dmirror_do_read(dmirror: Dmirror, start: int, end: int, bounce: DmirrorBounce) -> int:
    """``dmirror_do_read()``: copy mirrored pages to the bounce buffer until the first
    missing entry (``-ENOENT``). The copy is noted by source frame; it is made for real
    by :func:`_bounce_settle` when needed, at once if a simulated thread could run."""
    n = (end - start) >> PAGE_SHIFT
    entries = dmirror.pt.load_range(start >> PAGE_SHIFT, n)
    missing = np.flatnonzero(entries < 0)
    k = int(missing[0]) if len(missing) else n
    pfns = _kernel_pages(dmirror, entries[:k])
    off = (start - bounce.addr) >> PAGE_SHIFT
    if k:
        if bounce.src is None:
            bounce.src = np.full(bounce.npages, -1, np.int64)
        bounce.src[off:off + k] = pfns
        if _threads_may_race(dmirror.sys):  # another thread may change the frames
            _bounce_settle(dmirror.sys, bounce)
    bounce.cpages += k
    return -ENOENT if k < n else 0


def dmirror_do_write(dmirror: Dmirror, start: int, end: int, bounce: DmirrorBounce) -> int:
    """``dmirror_do_write()``: copy the bounce buffer into mirrored pages until the first
    entry that is missing or not tagged WRITE (``-ENOENT``)."""
    n = (end - start) >> PAGE_SHIFT
    entries = dmirror.pt.load_range(start >> PAGE_SHIFT, n)
    bad = np.flatnonzero((entries < 0) | ((entries & 3) != DPT_XA_TAG_WRITE))
    k = int(bad[0]) if len(bad) else n
    pfns = _kernel_pages(dmirror, entries[:k])
    off = (start - bounce.addr) & PAGE_MASK
    if k and bounce.src is not None:  # frame to frame from the user's buffer
        dmirror.sys.mem.copy_pages(pfns, bounce.src[off >> PAGE_SHIFT:(off >> PAGE_SHIFT) + k])
    elif k:
        dmirror.sys.mem.write_pages(pfns, bounce.buffer()[off:off + (k << PAGE_SHIFT)])
    bounce.cpages += k
    return -ENOENT if k < n else 0


def _dmirror_copy_rounds(dmirror: Dmirror, cmd: HmmDmirrorCmd, end: int, bounce: DmirrorBounce,
                         write: bool) -> int:
    """The loop READ and WRITE share: copy through the mirror under the mutex until a
    page is missing (``-ENOENT``), then fault from that page to the end (``cmd.faults``
    counts the rounds) and try again."""
    do_copy = dmirror_do_write if write else dmirror_do_read
    start = cmd.addr
    while True:
        with dmirror.mutex.held():
            ret = do_copy(dmirror, start, end, bounce)
        if ret != -ENOENT:
            return ret
        if not write:  # faults may free, COW or zero the frames read so far
            _bounce_settle(dmirror.sys, bounce)
        start = cmd.addr + (bounce.cpages << PAGE_SHIFT)
        ret = dmirror_fault(dmirror, start, end, write)
        if ret:
            return ret
        cmd.faults += 1


def _dmirror_bounce_for(dmirror: Dmirror, cmd: HmmDmirrorCmd) -> tuple[int, DmirrorBounce | int]:
    """The range check and bounce allocation both commands start with."""
    size = (cmd.npages << PAGE_SHIFT) & ULONG_MAX
    end = (cmd.addr + size) & ULONG_MAX
    if end < cmd.addr:
        return end, -EINVAL
    return end, _bounce_init(dmirror.sys, cmd.addr, size)


def _bounce_to_user(dmirror: Dmirror, bounce: DmirrorBounce, caller: "Task", uptr: int) -> int:
    """``copy_to_user(cmd->ptr, bounce.ptr, bounce.size)``: bytes not copied. Pages only
    noted by source frame go frame to frame when nothing else is in the buffer and the
    user address is page aligned (else the bounce bytes are made first)."""
    sys = dmirror.sys
    src = bounce.src
    if (src is not None and bounce.data is None and not uptr & ~PAGE_MASK
            and bool((src >= 0).all())):
        return copy_pages_to_user(caller.mm, uptr, src)
    _bounce_settle(sys, bounce)
    return copy_to_user(caller.mm, uptr, bounce.buffer())


def dmirror_read(dmirror: Dmirror, cmd: HmmDmirrorCmd, caller: "Task") -> int:
    """``dmirror_read()``: HMM_DMIRROR_READ."""
    end, bounce = _dmirror_bounce_for(dmirror, cmd)
    if isinstance(bounce, int):
        return bounce
    try:
        ret = _dmirror_copy_rounds(dmirror, cmd, end, bounce, write=False)
        if ret == 0 and _bounce_to_user(dmirror, bounce, caller, cmd.ptr):
            ret = -EFAULT
        cmd.cpages = bounce.cpages
    finally:
        _bounce_fini(dmirror.sys, bounce)
    return ret


def dmirror_write(dmirror: Dmirror, cmd: HmmDmirrorCmd, caller: "Task") -> int:
    """``dmirror_write()``: HMM_DMIRROR_WRITE."""
    end, bounce = _dmirror_bounce_for(dmirror, cmd)
    if isinstance(bounce, int):
        return bounce
    try:
        if _batch_allowed(dmirror, caller, cmd.ptr, cmd.npages, cmd.addr, end) and not cmd.ptr & ~PAGE_MASK:
            # copy_from_user() noted by source frame: the faults of the rounds below
            # touch neither the buffer's pages nor its mapping
            pfns, sigs = translate_range(caller.mm, cmd.ptr, bounce.npages, write=False, stop_at_signal=True)
            if sigs:
                return -EFAULT
            bounce.src = pfns
        else:
            data, left = copy_from_user(caller.mm, cmd.ptr, bounce.size)
            if left:
                return -EFAULT
            bounce.data = data
        ret = _dmirror_copy_rounds(dmirror, cmd, end, bounce, write=True)
        cmd.cpages = bounce.cpages
    finally:
        _bounce_fini(dmirror.sys, bounce)
    return ret


def dmirror_check_atomic(dmirror: Dmirror, start: int, end: int) -> int:
    """``dmirror_check_atomic()``: ``-EPERM`` if a page of the range is mapped ATOMIC
    (only the device page table's existing leaves are looked at)."""
    first, last = start >> PAGE_SHIFT, (end >> PAGE_SHIFT) - 1
    for k, leaf in dmirror.pt.leaves.items():
        if not first // _LEAF <= k <= last // _LEAF:
            continue
        lo = max(first - k * _LEAF, 0)
        seg = leaf[lo:min(last - k * _LEAF, _LEAF - 1) + 1]
        if ((seg >= 0) & ((seg & 3) == DPT_XA_TAG_ATOMIC)).any():
            return -EPERM
    return 0


# -- snapshot ------------------------------------------------------------------------------------
def _mkentry_table(shift: int) -> npt.NDArray[np.uint8]:
    """The ``HMM_DMIRROR_PROT_*`` byte of every combination of the VALID/WRITE/ERROR bits
    and the map order (the entry bits from *shift* up), before the per-page checks."""
    table = _MKENTRY_TABLES.get(shift)
    if table is None:
        hi = np.arange(1 << (64 - shift), dtype=np.uint64) << _U(shift)
        error = (hi & _U(HMM_PFN_ERROR)) != 0
        valid = (hi & _U(HMM_PFN_VALID)) != 0
        order = ((hi >> _U(shift)) & _U(HMM_PFN_ORDER_MASK)).astype(np.int64)
        perm = np.where((hi & _U(HMM_PFN_WRITE)) != 0, HMM_DMIRROR_PROT_WRITE, HMM_DMIRROR_PROT_READ)
        perm |= np.where(order + PAGE_SHIFT == PMD_SHIFT, HMM_DMIRROR_PROT_PMD,
                         np.where(order + PAGE_SHIFT == PUD_SHIFT, HMM_DMIRROR_PROT_PUD, 0))
        perm = np.where(valid, perm, HMM_DMIRROR_PROT_NONE)
        table = _MKENTRY_TABLES[shift] = np.where(error, HMM_DMIRROR_PROT_ERROR, perm).astype(np.uint8)
    return table


_MKENTRY_TABLES: dict[int, npt.NDArray[np.uint8]] = {}


def dmirror_mkentry(dmirror: Dmirror, entries: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """``dmirror_mkentry()`` for many hmm_range_fault() outputs at once (the driver calls
    it per entry): one ``HMM_DMIRROR_PROT_*`` byte each, the flags and the order (read
    with the release's pfn layout, as ``hmm_pfn_to_map_order()`` does) through a table; the zero page and device pages
    (rare) are then looked at one by one."""
    sys = dmirror.sys
    shift = hmm_pfn_layout(sys.profile).order_shift
    e = np.asarray(entries, np.uint64)
    out = _mkentry_table(shift)[e >> _U(shift)]
    pfn = e & _U((1 << shift) - 1)
    usable = (e & _U(HMM_PFN_VALID | HMM_PFN_ERROR)) == _U(HMM_PFN_VALID)
    out[usable & (pfn == _U(sys.mem.zero_pfn))] |= np.uint8(HMM_DMIRROR_PROT_ZERO)
    for i in np.flatnonzero(usable & (pfn >= _U(sys.mem.ram_pages))).tolist():  # device pages
        pg = sys.pgmap_of(int(pfn[i]))
        if pg is None:
            continue
        local = pg.owner is dmirror.mdevice
        if pg.is_private:
            out[i] |= np.uint8(HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL if local else HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE)
        elif pg.is_coherent:
            out[i] |= np.uint8(HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL if local else HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE)
    return out


def dmirror_snapshot_invalidate(mni: MmuIntervalNotifier, r: MmuNotifierRange, cur_seq: int) -> bool:
    """``dmirror_snapshot_invalidate()``: any invalidation spoils the whole snapshot."""
    dmirror: Dmirror = mni.owner
    if mmu_notifier_range_blockable(r):
        dmirror.mutex.lock()
    elif not dmirror.mutex.trylock():
        return False
    mmu_interval_set_seq(mni, cur_seq)
    dmirror.mutex.unlock()
    return True


dmirror_mrn_ops = MmuIntervalNotifierOps(dmirror_snapshot_invalidate)


def dmirror_range_snapshot(dmirror: Dmirror, r: HmmRange) -> tuple[int, npt.NDArray[np.uint8] | None]:
    """``dmirror_range_snapshot()``: one window under a temporary interval notifier."""
    mm = dmirror.notifier.mm
    assert mm is not None
    notifier = MmuIntervalNotifier(owner=dmirror)
    r.notifier = notifier
    ret = mmu_interval_notifier_insert(notifier, mm, r.start, r.end - r.start, dmirror_mrn_ops)
    if ret:
        return ret, None
    try:
        for _ in range(DMIRROR_RANGE_FAULT_RETRIES):
            r.notifier_seq = mmu_interval_read_begin(notifier)
            mmap_read_lock(mm)
            try:
                ret = hmm_range_fault(r)
            finally:
                mmap_read_unlock(mm)
            if ret:
                if ret == -EBUSY:
                    continue
                return ret, None
            dmirror.mutex.lock()
            if mmu_interval_read_retry(notifier, r.notifier_seq):
                dmirror.mutex.unlock()
                continue
            try:
                n = (r.end - r.start) >> PAGE_SHIFT
                return 0, dmirror_mkentry(dmirror, r.hmm_pfns[:n])
            finally:
                dmirror.mutex.unlock()
        return -EBUSY, None
    finally:
        mmu_interval_notifier_remove(notifier)


def _snapshot_batch(dmirror: Dmirror, start: int, end: int, nwin: int) -> npt.NDArray[np.uint8] | None:
    """*nwin* windows of ``dmirror_snapshot()`` done as one: one temporary notifier, one
    walk, one mkentry over ``[start, end)``, counting the per-window protocol (notifier
    insert/remove, mmap_lock, mutex, range_fault calls) as the loop would. None (and no
    trace in the counters) if the batch must go window by window: the walk failed or was
    invalidated (a snapshot requests no fault, so otherwise every window's walk sees the
    same page tables and returns what the batched walk returns)."""
    mm = dmirror.notifier.mm
    assert mm is not None
    stats = dmirror.sys.stats
    saved = _stats_save(stats)
    n = (end - start) >> PAGE_SHIFT
    r = HmmRange(notifier=dmirror.notifier, start=start, end=end, hmm_pfns=np.zeros(n, np.uint64),
                 dev_private_owner=dmirror.mdevice)
    ret, perm = dmirror_range_snapshot(dmirror, r)
    if ret or perm is None:
        _stats_restore(stats, saved)
        return None
    _count_windows(dmirror, nwin - 1, snapshot=True)
    return perm


def dmirror_snapshot(dmirror: Dmirror, cmd: HmmDmirrorCmd, caller: "Task") -> int:
    """``dmirror_snapshot()``: HMM_DMIRROR_SNAPSHOT, one protection byte per page, one
    window (``dmirror_window`` pages) per temporary notifier.

    Fast path: runs of windows are done as one batch (:func:`_snapshot_batch`) when
    nothing can make a window's outcome differ (no simulated thread can run in between,
    and the user buffer lies outside the snapshotted range)."""
    mm = dmirror.notifier.mm
    assert mm is not None
    size = (cmd.npages << PAGE_SHIFT) & ULONG_MAX
    start = cmd.addr
    end = (start + size) & ULONG_MAX
    if end < start:
        return -EINVAL
    if not mmget_not_zero(mm):
        return -EINVAL
    win = dmirror.sys.profile.dmirror_window
    r = HmmRange(notifier=dmirror.notifier, start=start, end=start,
                 hmm_pfns=np.zeros(win, np.uint64), dev_private_owner=dmirror.mdevice)
    uptr = cmd.ptr
    batch_ok = _batch_allowed(dmirror, caller, uptr, cmd.npages, start, end)
    ret = 0
    try:
        addr = start
        while addr < end:
            nxt = min(addr + (win << PAGE_SHIFT), end)
            perm = None
            if batch_ok and nxt < end:
                bend = min(addr + (_BATCH_PAGES << PAGE_SHIFT), end)
                nwin = -(-((bend - addr) >> PAGE_SHIFT) // win)
                perm = _snapshot_batch(dmirror, addr, bend, nwin)
                if perm is not None:
                    nxt = bend
            if perm is None:
                r.start, r.end = addr, nxt
                ret, perm = dmirror_range_snapshot(dmirror, r)
                if ret:
                    break
                assert perm is not None
            if copy_to_user(caller.mm, uptr, perm):
                ret = -EFAULT
                break
            cmd.cpages += len(perm)
            uptr += len(perm)
            addr = nxt
    finally:
        mmput(mm)
    return ret


# -- batching windows ------------------------------------------------------------------------------
#: pages handled by one batched walk (bounds the temporary arrays: 8 bytes a page)
_BATCH_PAGES = 1 << 16
_U = np.uint64


def _batch_allowed(dmirror: Dmirror, caller: "Task", uptr: int, ulen_pages: int, start: int, end: int) -> bool:
    """Windows may be batched: no interleaving hook is registered (no other simulated
    thread can run between two windows) and the user buffer does not overlap the range
    (writing it cannot change what the next window sees)."""
    if _threads_may_race(dmirror.sys):
        return False
    if caller.mm is not dmirror.notifier.mm:
        return True
    ulen = max(ulen_pages, 1) << PAGE_SHIFT
    return uptr + ulen <= start or uptr >= end


#: counters of one window's protocol (the walk's own counters are not among them)
_PROTOCOL_KEYS = ("hmm.range_fault", "hmm.walk", "walk_page_range", "lock.mmap_lock.read",
                  "lock.dmirror_mutex.write", "hmm.range_fault.ebusy")


def _threads_may_race(sys: "System") -> bool:
    """Another simulated thread could run at a scheduling point (an interleaving hook is
    registered with the lock state)."""
    return sys.ls.has_hooks


def _stats_save(stats: Any) -> Any:
    return stats._c.copy()  # noqa: SLF001


def _stats_restore(stats: Any, saved: Any) -> None:
    stats._c.clear()  # noqa: SLF001
    stats._c.update(saved)  # noqa: SLF001


def _count_windows(dmirror: Dmirror, extra: int, snapshot: bool) -> None:
    """Count the per-window protocol of *extra* windows that a batch did in one go: each
    window of the driver's loop takes mmap_lock (read) around one ``hmm_range_fault()``
    (one walk) and the mutex around ``mmu_interval_read_retry()``; a snapshot window also
    inserts and removes its temporary notifier."""
    if extra <= 0:
        return
    st = dmirror.sys.stats
    for key in _PROTOCOL_KEYS[:5]:
        st.add(key, extra)
    if snapshot:
        st.add("mmu_notifier.interval_insert", extra)
        st.add("mmu_notifier.interval_remove", extra)


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
    elif command in (HMM_DMIRROR_EXCLUSIVE, HMM_DMIRROR_RELEASE):
        raise NotSupportedError(f"{IOCTL_NAMES[command]} (device memory migration) is not modelled yet")
    elif command == HMM_DMIRROR_FLAGS and dmirror.sys.profile.dmirror_flags_cmd:
        # the whole word is stored; HMM_DMIRROR_FLAG_FAIL_ALLOC is consumed by the next
        # device page allocation (dmirror_devmem_alloc_page / the THP allocator)
        dmirror.flags = k.npages
        ret = 0
    elif command == HMM_DMIRROR_READ_UNLOCKED and dmirror.sys.profile.dmirror_read_unlocked_cmd:
        raise NotSupportedError("HMM_DMIRROR_READ_UNLOCKED (hmm_range_fault_unlocked_timeout) "
                                "is not modelled yet")
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
        ret = dmirror_allocate_chunk(dev)
        if ret:
            raise RuntimeError(f"hmm_dmirror_init: device {minor}: {ret}")
        sys.dmirror_devices.append(dev)
