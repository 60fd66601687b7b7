"""HMM's DMA-mapping helpers (``mm/hmm.c``, 6.16+, so 7.3 and not 6.12):
``hmm_dma_map_alloc``, ``hmm_dma_map_free``, ``hmm_dma_map_pfn``, ``hmm_dma_unmap_pfn``.

A driver keeps one :class:`HmmDmaMap` per mirrored range: ``pfn_list`` is the
``hmm_pfns`` array it hands to :func:`~hmmsim.hmm.hmm.hmm_range_fault` (the sticky
HMM_PFN_DMA_MAPPED / P2PDMA / P2PDMA_BUS bits survive the walk, so the array also says
what is mapped), ``dma_list`` the addresses when the platform needs them for unmapping.
The usual loop, ported from a driver::

    ret = hmm_range_fault(range)                 # range.hmm_pfns is map.pfn_list
    for i in pages:  dma[i] = hmm_dma_map_pfn(dev, map, i, p2p)   # DMA_MAPPING_ERROR: fail
    ... on invalidation:  for i in pages: hmm_dma_unmap_pfn(dev, map, i)

The DMA side is :mod:`hmmsim.kernel.dma` (IOVA or direct mapping, P2PDMA outcomes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..kernel.bug import NotSupportedError
from ..kernel.dma import (
    DMA_ATTR_MMIO,
    DMA_ATTR_REQUIRE_COHERENT,
    DMA_BIDIRECTIONAL,
    DMA_MAPPING_ERROR,
    DmaDevice,
    DmaIovaState,
    PciP2pdmaMapState,
    PciP2pdmaMapType,
    dma_addressing_limited,
    dma_iova_free,
    dma_iova_link,
    dma_iova_sync,
    dma_iova_try_alloc,
    dma_iova_unlink,
    dma_map_phys,
    dma_mapping_error,
    dma_need_unmap,
    dma_unmap_phys,
    dma_use_iova,
    pci_p2pdma_bus_addr_map,
    pci_p2pdma_state,
    pfn_to_phys,
)
from ..kernel.errno import ENOMEM, EOPNOTSUPP
from ..kernel.page_types import PAGE_SIZE
from .pfn import (
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_P2PDMA,
    HMM_PFN_P2PDMA_BUS,
    HMM_PFN_VALID,
    hmm_pfn_layout,
)

if TYPE_CHECKING:
    from ..kernel.system import System

__all__ = ("HmmDmaMap", "hmm_dma_map_alloc", "hmm_dma_map_free", "hmm_dma_map_pfn", "hmm_dma_unmap_pfn")


class HmmDmaMap:
    """``struct hmm_dma_map``."""

    def __init__(self) -> None:
        self.state = DmaIovaState()
        self.pfn_list: npt.NDArray[np.uint64] = np.zeros(0, np.uint64)
        self.dma_list: npt.NDArray[np.uint64] | None = None
        self.dma_entry_size = PAGE_SIZE


def _layout(sys: "System"):  # noqa: ANN202 - HmmPfnLayout
    if not sys.profile.hmm_dma_map_helpers:
        raise NotSupportedError("hmm_dma_map_* exist from Linux 6.16 on (not in this kernel)")
    return hmm_pfn_layout(sys.profile)


def hmm_dma_map_alloc(sys: "System", dev: DmaDevice, map_: HmmDmaMap, nr_entries: int,
                      dma_entry_size: int = PAGE_SIZE) -> int:
    """``hmm_dma_map_alloc()``: -EOPNOTSUPP for a device that would need DMA syncs or
    bounce buffering; a zeroed pfn list; an IOVA range when the device sits behind an
    IOMMU, else an address list when the platform needs unmapping; -ENOMEM when the lists
    cannot be allocated (more entries than the machine has pages)."""
    _layout(sys)
    if dev.need_sync or dma_addressing_limited(dev, pfn_to_phys(sys.mem.max_pfn)):
        return -EOPNOTSUPP
    if nr_entries <= 0 or nr_entries > sys.mem.max_pfn:
        return -ENOMEM
    map_.dma_entry_size = dma_entry_size
    map_.pfn_list = np.zeros(nr_entries, np.uint64)
    use_iova = dma_iova_try_alloc(dev, map_.state, 0, nr_entries * PAGE_SIZE)
    map_.dma_list = np.zeros(nr_entries, np.uint64) if not use_iova and dma_need_unmap(dev) else None
    return 0


def hmm_dma_map_free(sys: "System", dev: DmaDevice, map_: HmmDmaMap) -> None:
    """``hmm_dma_map_free()``."""
    if dma_use_iova(map_.state):
        dma_iova_free(dev, map_.state)
    map_.pfn_list = np.zeros(0, np.uint64)
    map_.dma_list = None


def hmm_dma_map_pfn(sys: "System", dev: DmaDevice, map_: HmmDmaMap, idx: int,
                    p2pdma_state: PciP2pdmaMapState | None = None) -> int:
    """``hmm_dma_map_pfn()``: map page *idx* of the list for *dev*; its DMA address or
    ``DMA_MAPPING_ERROR``. A page already DMA_MAPPED (not by bus address) is not mapped
    again: its IOVA slot or recorded address is returned. Peer memory: through the host
    bridge it is mapped like RAM and marked P2PDMA; by bus address it is marked
    P2PDMA_BUS | DMA_MAPPED and needs no mapping; unreachable: error."""
    lay = _layout(sys)
    pfns = map_.pfn_list
    v = int(pfns[idx])
    pfn = v & ~lay.flags & ((1 << 64) - 1)
    paddr = pfn_to_phys(pfn)
    offset = idx * map_.dma_entry_size
    attrs = DMA_ATTR_REQUIRE_COHERENT
    if v & HMM_PFN_DMA_MAPPED and not v & HMM_PFN_P2PDMA_BUS:
        if dma_use_iova(map_.state):
            return map_.state.addr + offset
        if dma_need_unmap(dev):
            assert map_.dma_list is not None
            return int(map_.dma_list[idx])
    pgmap = sys.pgmap_of(pfn) if sys.mem.pgmap[pfn] else None
    kind = pci_p2pdma_state(p2pdma_state or PciP2pdmaMapState(), dev, pgmap)
    if kind == PciP2pdmaMapType.PCI_P2PDMA_MAP_THRU_HOST_BRIDGE:
        attrs |= DMA_ATTR_MMIO
        v |= HMM_PFN_P2PDMA
    elif kind == PciP2pdmaMapType.PCI_P2PDMA_MAP_BUS_ADDR:
        pfns[idx] = np.uint64(v | HMM_PFN_P2PDMA_BUS | HMM_PFN_DMA_MAPPED)
        return pci_p2pdma_bus_addr_map(dev, pgmap, paddr)
    elif kind != PciP2pdmaMapType.PCI_P2PDMA_MAP_NONE:
        return DMA_MAPPING_ERROR
    if dma_use_iova(map_.state):
        ret = dma_iova_link(dev, map_.state, paddr, offset, map_.dma_entry_size, DMA_BIDIRECTIONAL, attrs)
        if not ret:
            ret = dma_iova_sync(dev, map_.state, offset, map_.dma_entry_size)
            if ret:
                dma_iova_unlink(dev, map_.state, offset, map_.dma_entry_size, DMA_BIDIRECTIONAL, attrs)
        if ret:
            pfns[idx] = np.uint64(v & ~HMM_PFN_P2PDMA)
            return DMA_MAPPING_ERROR
        dma_addr = map_.state.addr + offset
    else:
        dma_addr = dma_map_phys(dev, paddr, map_.dma_entry_size, DMA_BIDIRECTIONAL, attrs)
        if dma_mapping_error(dev, dma_addr):
            pfns[idx] = np.uint64(v & ~HMM_PFN_P2PDMA)
            return DMA_MAPPING_ERROR
        if dma_need_unmap(dev):
            assert map_.dma_list is not None
            map_.dma_list[idx] = np.uint64(dma_addr)
    pfns[idx] = np.uint64(v | HMM_PFN_DMA_MAPPED)
    sys.stats.add("hmm.dma_map")
    return dma_addr


def hmm_dma_unmap_pfn(sys: "System", dev: DmaDevice, map_: HmmDmaMap, idx: int) -> bool:
    """``hmm_dma_unmap_pfn()``: unmap page *idx* if it is VALID and DMA_MAPPED (bus-address
    peer pages need no unmapping) and clear the three sticky bits; whether it was mapped."""
    _layout(sys)
    pfns = map_.pfn_list
    v = int(pfns[idx])
    valid_dma = HMM_PFN_VALID | HMM_PFN_DMA_MAPPED
    if v & valid_dma != valid_dma:
        return False
    attrs = DMA_ATTR_REQUIRE_COHERENT | (DMA_ATTR_MMIO if v & HMM_PFN_P2PDMA else 0)
    if v & HMM_PFN_P2PDMA_BUS:
        pass  # no need to unmap bus-address P2P mappings
    elif dma_use_iova(map_.state):
        dma_iova_unlink(dev, map_.state, idx * map_.dma_entry_size, map_.dma_entry_size, DMA_BIDIRECTIONAL, attrs)
    elif dma_need_unmap(dev):
        assert map_.dma_list is not None
        dma_unmap_phys(dev, int(map_.dma_list[idx]), map_.dma_entry_size, DMA_BIDIRECTIONAL, attrs)
    pfns[idx] = np.uint64(v & ~(HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS))
    sys.stats.add("hmm.dma_unmap")
    return True
