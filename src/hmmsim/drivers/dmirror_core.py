"""The state of the dmirror test device (``lib/test_hmm.c``): ``struct dmirror_device``,
``struct dmirror``, its device page table and the bounce buffer of a command."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..kernel.errno import ENOMEM
from ..kernel.locking import Lock
from ..kernel.memremap import (
    DevPagemap,
)
from ..kernel.mmu_notifier import (
    MmuIntervalNotifier,
)
from ..kernel.page_types import (
    PAGE_SHIFT,
    PAGE_SIZE,
)
from .test_hmm_uapi import (
    HMM_DMIRROR_MEMORY_DEVICE_PRIVATE,
)

if TYPE_CHECKING:
    from ..kernel.system import System



__all__ = (
    "DMIRROR_NDEVICES",
    "DMIRROR_RANGE_FAULT_RETRIES",
    "DPT_XA_TAG_ATOMIC",
    "DPT_XA_TAG_WRITE",
    "Dmirror",
    "DmirrorBounce",
    "DmirrorChunk",
    "DmirrorDevice",
    "DmirrorPT",
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

    def _leaf_groups(self, vpns: npt.NDArray[np.int64]) -> Iterator[tuple[int, Any]]:
        """``(leaf key, positions in vpns)`` per leaf the increasing indices *vpns* touch
        (one leaf, the usual case for a window or a page, without splitting)."""
        if len(vpns) == 0:
            return
        if int(vpns[0]) // _LEAF == int(vpns[-1]) // _LEAF:
            yield int(vpns[0]) // _LEAF, slice(None)
            return
        keys = vpns // _LEAF
        cuts = np.flatnonzero(np.diff(keys)) + 1
        for grp in np.split(np.arange(len(vpns)), cuts):
            yield int(keys[grp[0]]), grp

    def store_indices(self, vpns: npt.NDArray[np.int64], vals: npt.NDArray[np.int64]) -> None:
        """``xa_store()`` of each ``vals[i]`` at index ``vpns[i]`` (increasing indices)."""
        for k, grp in self._leaf_groups(vpns):
            leaf = self.leaves.get(k)
            if leaf is None:
                leaf = self.leaves[k] = np.full(_LEAF, -1, np.int64)
            leaf[vpns[grp] - k * _LEAF] = vals[grp]

    def erase_indices(self, vpns: npt.NDArray[np.int64]) -> None:
        """``xa_erase()`` of each index of *vpns* (increasing indices)."""
        for k, grp in self._leaf_groups(vpns):
            leaf = self.leaves.get(k)
            if leaf is None:
                continue
            leaf[vpns[grp] - k * _LEAF] = -1
            if (leaf < 0).all():
                del self.leaves[k]

    def erase_range(self, first: int, last: int) -> None:
        """``xa_erase()`` of every index in ``[first, last]`` (inclusive)."""
        leaves = self.leaves
        k0, k1 = first // _LEAF, last // _LEAF
        keys = range(k0, k1 + 1) if k1 - k0 < len(leaves) else [k for k in leaves if k0 <= k <= k1]
        for k in keys:
            leaf = leaves.get(k)
            if leaf is None:
                continue
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
        #: free device THPs (head pfns, 7.3), a stack like :attr:`free_pages`
        self.free_folios: list[int] = []
        #: backing page (private) or device page (coherent) -> the dmirror that migrated
        #: it there (test_hmm keeps this in the backing page's ``zone_device_data``), as
        #: an index into :attr:`owners` (0: none), one entry per pfn
        self.backing_owner = np.zeros(sys.mem.max_pfn, np.int32)
        #: the dmirrors :attr:`backing_owner` refers to (index 0: none)
        self.owners: list["Dmirror | None"] = [None]
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
        #: this dmirror's index in ``mdevice.owners`` once it owns device pages (0: not yet)
        self.owner_id = 0

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
