"""A simulated DMA layer: what ``hmm_dma_map_*`` (``mm/hmm.c``, 6.16+) calls in
``include/linux/dma-mapping.h``, the IOVA API of ``drivers/iommu/dma-iommu.c`` and
``include/linux/pci-p2pdma.h``.

A :class:`DmaDevice` (the DMA side of ``struct device``) says how the platform maps for it:

* ``iommu=True``: an IOMMU in DMA mode; ``dma_iova_try_alloc()`` reserves a contiguous IOVA
  range and pages are linked into it at fixed offsets (``dma_iova_link``); without it the
  device uses direct mapping (``dma_map_phys`` gives the physical address plus
  ``dma_offset``), with ``need_unmap`` telling whether unmapping must be done (swiotlb or
  debugging: the driver then keeps the addresses in a list).
* ``need_sync`` (a non-coherent device) and ``dma_mask`` narrower than the machine's
  physical addresses (``dma_addressing_limited``) make ``hmm_dma_map_alloc`` refuse
  (-EOPNOTSUPP): HMM cannot bounce-buffer.
* ``p2p``: how peer (``MEMORY_DEVICE_PCI_P2PDMA``) pages of a given pagemap reach this
  device (``pci_p2pdma_state``): through the host bridge (mapped like RAM, with
  DMA_ATTR_MMIO) or by PCI bus address (no mapping at all); a pagemap missing from it is
  not reachable (-EREMOTEIO in the kernel: ``DMA_MAPPING_ERROR`` here).
* ``fail_after``: *n*: the mapping after the next *n* fails, once (error injection).

Every live mapping is recorded in ``mappings`` (address -> physical address), so tests can
check that a driver unmaps what it mapped."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .page_types import PAGE_SHIFT

__all__ = (
    "DMA_ATTR_MMIO", "DMA_ATTR_REQUIRE_COHERENT", "DMA_BIDIRECTIONAL", "DMA_MAPPING_ERROR",
    "DmaDevice", "DmaIovaState", "PciP2pdmaMapState", "PciP2pdmaMapType", "dma_addressing_limited",
    "dma_iova_free", "dma_iova_link", "dma_iova_sync", "dma_iova_try_alloc", "dma_iova_unlink",
    "dma_map_phys", "dma_mapping_error", "dma_need_unmap", "dma_unmap_phys", "dma_use_iova",
    "pci_p2pdma_bus_addr_map", "pci_p2pdma_state",
)

DMA_MAPPING_ERROR = (1 << 64) - 1
DMA_BIDIRECTIONAL = 0
DMA_ATTR_MMIO = 1 << 10
DMA_ATTR_REQUIRE_COHERENT = 1 << 12
#: where IOVA ranges start (any non-zero, page-aligned base)
_IOVA_BASE = 1 << 32


class PciP2pdmaMapType(enum.IntEnum):
    """``enum pci_p2pdma_map_type``."""

    PCI_P2PDMA_MAP_UNKNOWN = 0
    PCI_P2PDMA_MAP_NOT_SUPPORTED = 1
    PCI_P2PDMA_MAP_BUS_ADDR = 2
    PCI_P2PDMA_MAP_THRU_HOST_BRIDGE = 3
    #: not a P2PDMA page: map like RAM
    PCI_P2PDMA_MAP_NONE = 4


@dataclass
class DmaDevice:
    """The DMA properties of a ``struct device`` (see the module docstring)."""

    name: str = "dev"
    iommu: bool = False
    need_unmap: bool = True
    need_sync: bool = False
    dma_mask: int = (1 << 64) - 1
    dma_offset: int = 0
    #: P2PDMA pagemap id -> how its pages reach this device
    p2p: dict[int, PciP2pdmaMapType] = field(default_factory=dict)
    #: bus address offset of a P2PDMA pagemap id (``p2pdma_provider.bus_offset``)
    bus_offset: dict[int, int] = field(default_factory=dict)
    fail_after: int | None = None
    #: live mappings: dma address -> physical address
    mappings: dict[int, int] = field(default_factory=dict)
    _iova_next: int = _IOVA_BASE

    def _inject(self) -> bool:
        """Count a mapping attempt; True if it must fail."""
        if self.fail_after is None:
            return False
        if self.fail_after == 0:
            self.fail_after = None
            return True
        self.fail_after -= 1
        return False


@dataclass
class DmaIovaState:
    """``struct dma_iova_state``: an IOVA range (``addr`` 0 when none was allocated)."""

    addr: int = 0
    size: int = 0


@dataclass
class PciP2pdmaMapState:
    """``struct pci_p2pdma_map_state``: the last P2PDMA pagemap looked up and its type."""

    mem: Any = None
    map: PciP2pdmaMapType = PciP2pdmaMapType.PCI_P2PDMA_MAP_UNKNOWN


def dma_addressing_limited(dev: DmaDevice, max_phys: int) -> bool:
    """``dma_addressing_limited()``: the mask cannot reach every physical address."""
    return dev.dma_mask < max_phys - 1


def dma_need_unmap(dev: DmaDevice) -> bool:
    """``dma_need_unmap()``."""
    return dev.iommu or dev.need_unmap


def dma_iova_try_alloc(dev: DmaDevice, state: DmaIovaState, phys: int, size: int) -> bool:
    """``dma_iova_try_alloc()``: reserve *size* bytes of IOVA (only behind an IOMMU)."""
    if not dev.iommu:
        state.addr, state.size = 0, 0
        return False
    state.addr, state.size = dev._iova_next, size  # noqa: SLF001
    dev._iova_next += (size + (1 << 21) - 1) & ~((1 << 21) - 1)  # noqa: SLF001
    return True


def dma_use_iova(state: DmaIovaState) -> bool:
    """``dma_use_iova()``."""
    return state.size != 0


def dma_iova_free(dev: DmaDevice, state: DmaIovaState) -> None:
    """``dma_iova_free()``: give the range back (links inside it must be gone)."""
    end = state.addr + state.size
    assert not any(state.addr <= a < end for a in dev.mappings), "dma_iova_free with live links"
    state.addr, state.size = 0, 0


def dma_iova_link(dev: DmaDevice, state: DmaIovaState, phys: int, offset: int, size: int,
                  direction: int, attrs: int) -> int:
    """``dma_iova_link()``: map *phys* at ``state.addr + offset``; 0 or -errno."""
    if dev._inject():  # noqa: SLF001
        return -5  # -EIO
    addr = state.addr + offset
    assert addr not in dev.mappings, f"IOVA {addr:#x} linked twice"
    dev.mappings[addr] = phys
    return 0


def dma_iova_sync(dev: DmaDevice, state: DmaIovaState, offset: int, size: int) -> int:
    """``dma_iova_sync()``: flush the IOTLB for the range (always succeeds here)."""
    return 0


def dma_iova_unlink(dev: DmaDevice, state: DmaIovaState, offset: int, size: int,
                    direction: int, attrs: int) -> None:
    """``dma_iova_unlink()``."""
    dev.mappings.pop(state.addr + offset, None)


def dma_map_phys(dev: DmaDevice, phys: int, size: int, direction: int, attrs: int) -> int:
    """``dma_map_phys()`` without an IOVA range: the bus address, or DMA_MAPPING_ERROR if
    the device cannot reach it (or an injected failure)."""
    if dev._inject():  # noqa: SLF001
        return DMA_MAPPING_ERROR
    addr = phys + dev.dma_offset
    if addr + size - 1 > dev.dma_mask:
        return DMA_MAPPING_ERROR
    if dma_need_unmap(dev):
        dev.mappings[addr] = phys
    return addr


def dma_unmap_phys(dev: DmaDevice, addr: int, size: int, direction: int, attrs: int) -> None:
    """``dma_unmap_phys()``."""
    assert addr in dev.mappings, f"dma_unmap_phys of {addr:#x}, which is not mapped"
    del dev.mappings[addr]


def dma_mapping_error(dev: DmaDevice, addr: int) -> bool:
    """``dma_mapping_error()``."""
    return addr == DMA_MAPPING_ERROR


def pci_p2pdma_state(state: PciP2pdmaMapState, dev: DmaDevice, pgmap: Any) -> PciP2pdmaMapType:
    """``pci_p2pdma_state()``: NONE for a page that is not P2PDMA memory, else how its
    provider reaches *dev* (NOT_SUPPORTED if it does not)."""
    if pgmap is None or getattr(pgmap.type, "name", "") != "MEMORY_DEVICE_PCI_P2PDMA":
        return PciP2pdmaMapType.PCI_P2PDMA_MAP_NONE
    if state.mem is not pgmap:
        state.mem = pgmap
        state.map = dev.p2p.get(pgmap.id, PciP2pdmaMapType.PCI_P2PDMA_MAP_NOT_SUPPORTED)
    return state.map


def pci_p2pdma_bus_addr_map(dev: DmaDevice, pgmap: Any, phys: int) -> int:
    """``pci_p2pdma_bus_addr_map()``: the PCI bus address of a peer page."""
    return phys + dev.bus_offset.get(pgmap.id, 0)


def pfn_to_phys(pfn: int) -> int:
    """``PFN_PHYS()``."""
    return pfn << PAGE_SHIFT
