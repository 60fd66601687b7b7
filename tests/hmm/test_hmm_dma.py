"""``hmm_dma_map_*`` (7.3): a driver's map/unmap loop over the pfns hmm_range_fault returns,
on IOVA, direct and peer-to-peer platforms, and unmapping on invalidation."""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim import System
from hmmsim.hmm.dma import (
    HmmDmaMap,
    hmm_dma_map_alloc,
    hmm_dma_map_free,
    hmm_dma_map_pfn,
    hmm_dma_unmap_pfn,
)
from hmmsim.hmm.hmm import HMM_PFN_REQ_FAULT, HmmRange, hmm_range_fault
from hmmsim.hmm.pfn import (
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_P2PDMA,
    HMM_PFN_P2PDMA_BUS,
    HMM_PFN_VALID,
)
from hmmsim.kernel.bug import NotSupportedError
from hmmsim.kernel.dma import (
    DMA_MAPPING_ERROR,
    DmaDevice,
    PciP2pdmaMapState,
    PciP2pdmaMapType,
)
from hmmsim.kernel.errno import EOPNOTSUPP
from hmmsim.kernel.memremap import DevPagemap, DevPagemapOps, MemoryType, memremap_pages
from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.mmu_notifier import (
    MmuIntervalNotifier,
    MmuIntervalNotifierOps,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_set_seq,
)

P = 4096
N = 8


class _Driver:
    """A driver mirroring ``[a, a + N pages)`` for DMA: fault, map every page, and unmap
    the invalidated pages from its notifier callback."""

    def __init__(self, sys: System, proc, a: int, dev: DmaDevice) -> None:
        self.sys, self.proc, self.a, self.dev = sys, proc, a, dev
        self.map = HmmDmaMap()
        assert hmm_dma_map_alloc(sys, dev, self.map, N) == 0
        self.notifier = MmuIntervalNotifier(owner=self)
        ops = MmuIntervalNotifierOps(self.invalidate)
        assert mmu_interval_notifier_insert(self.notifier, proc.mm, a, N * P, ops) == 0
        self.unmapped: list[int] = []

    def invalidate(self, sub, r, cur_seq) -> bool:
        mmu_interval_set_seq(sub, cur_seq)
        for i in range(max(0, (r.start - self.a) // P), min(N, (r.end - self.a + P - 1) // P)):
            if hmm_dma_unmap_pfn(self.sys, self.dev, self.map, i):
                self.unmapped.append(i)
        return True

    def fault_and_map(self) -> list[int]:
        r = HmmRange(notifier=self.notifier, start=self.a, end=self.a + N * P, hmm_pfns=self.map.pfn_list,
                     default_flags=HMM_PFN_REQ_FAULT)
        with self.proc.task.running():
            r.notifier_seq = mmu_interval_read_begin(self.notifier)
            mmap_read_lock(self.proc.mm)
            try:
                assert hmm_range_fault(r) == 0
            finally:
                mmap_read_unlock(self.proc.mm)
        return [hmm_dma_map_pfn(self.sys, self.dev, self.map, i) for i in range(N)]

    def close(self) -> None:
        for i in range(N):
            hmm_dma_unmap_pfn(self.sys, self.dev, self.map, i)
        hmm_dma_map_free(self.sys, self.dev, self.map)
        mmu_interval_notifier_remove(self.notifier)


def _proc(sys: System):
    p = sys.spawn("app")
    a = p.mmap(N * P)
    p.write(a, b"\x01" * (N * P))
    return p, a


def _pfns(m: HmmDmaMap) -> list[int]:
    return [int(v) & ((1 << 53) - 1) for v in m.pfn_list]


def test_not_in_6_12() -> None:
    sys = System(kernel="6.12")
    with pytest.raises(NotSupportedError, match="6.16"):
        hmm_dma_map_alloc(sys, DmaDevice(), HmmDmaMap(), N)


@pytest.mark.parametrize("dev", [DmaDevice(need_sync=True), DmaDevice(dma_mask=(1 << 20) - 1)])
def test_devices_that_would_need_bouncing_are_refused(dev: DmaDevice) -> None:
    assert hmm_dma_map_alloc(System(kernel="7.3"), dev, HmmDmaMap(), N) == -EOPNOTSUPP


def test_iova_mapping_is_kept_across_faults_and_undone_on_invalidation() -> None:
    sys = System(kernel="7.3")
    p, a = _proc(sys)
    dev = DmaDevice(iommu=True)
    d = _Driver(sys, p, a, dev)
    addrs = d.fault_and_map()
    base = d.map.state.addr
    assert base and addrs == [base + i * P for i in range(N)]
    assert all(int(v) & (HMM_PFN_VALID | HMM_PFN_DMA_MAPPED) == HMM_PFN_VALID | HMM_PFN_DMA_MAPPED
               for v in d.map.pfn_list)
    assert dev.mappings == {base + i * P: pfn * P for i, pfn in enumerate(_pfns(d.map))}
    # a second fault keeps the sticky bit: mapping again links nothing new
    assert d.fault_and_map() == addrs and sys.stats["hmm.dma_map"] == N
    # the CPU unmaps two pages: the notifier unmaps their DMA
    p.munmap(a + 2 * P, 2 * P)
    assert sorted(set(d.unmapped)) == [2, 3]
    assert set(dev.mappings) == {base + i * P for i in range(N) if i not in (2, 3)}
    assert not int(d.map.pfn_list[2]) & HMM_PFN_DMA_MAPPED
    d.close()
    assert dev.mappings == {} and d.map.state.size == 0


def test_direct_mapping_with_and_without_an_address_list() -> None:
    sys = System(kernel="7.3")
    p, a = _proc(sys)
    dev = DmaDevice(iommu=False, need_unmap=True, dma_offset=1 << 40)
    d = _Driver(sys, p, a, dev)
    assert d.map.dma_list is not None
    addrs = d.fault_and_map()
    assert addrs == [(pfn * P) + (1 << 40) for pfn in _pfns(d.map)]
    assert list(d.map.dma_list) == addrs
    d.close()
    assert dev.mappings == {}
    # a platform that needs no unmapping keeps no list and recomputes the address
    dev2 = DmaDevice(iommu=False, need_unmap=False)
    d2 = _Driver(sys, p, a, dev2)
    assert d2.map.dma_list is None
    first = d2.fault_and_map()
    assert d2.fault_and_map() == first == [pfn * P for pfn in _pfns(d2.map)]
    assert dev2.mappings == {}
    d2.close()


def test_peer_to_peer_outcomes_and_injected_failure() -> None:
    sys = System(kernel="7.3")
    start = sys.request_free_mem_region(16)
    pg = DevPagemap(MemoryType.MEMORY_DEVICE_PCI_P2PDMA, start, 16, DevPagemapOps(), owner="nvme")
    assert memremap_pages(sys, pg) == 0
    host = DmaDevice(iommu=True, p2p={pg.id: PciP2pdmaMapType.PCI_P2PDMA_MAP_THRU_HOST_BRIDGE})
    bus = DmaDevice(iommu=True, p2p={pg.id: PciP2pdmaMapType.PCI_P2PDMA_MAP_BUS_ADDR},
                    bus_offset={pg.id: 1 << 44})
    far = DmaDevice(iommu=True)
    for dev in (host, bus, far):
        m = HmmDmaMap()
        assert hmm_dma_map_alloc(sys, dev, m, 2) == 0
        m.pfn_list[:] = [HMM_PFN_VALID | start, HMM_PFN_VALID | (start + 1)]
        st = PciP2pdmaMapState()
        addr = hmm_dma_map_pfn(sys, dev, m, 1, st)
        v = int(m.pfn_list[1])
        if dev is host:
            assert addr == m.state.addr + P and v & HMM_PFN_P2PDMA and v & HMM_PFN_DMA_MAPPED
            assert dev.mappings == {addr: (start + 1) * P}
        elif dev is bus:
            assert addr == ((start + 1) * P) + (1 << 44)
            assert v & HMM_PFN_P2PDMA_BUS and v & HMM_PFN_DMA_MAPPED and dev.mappings == {}
        else:
            assert addr == DMA_MAPPING_ERROR and not v & (HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA)
        was = dev is not far
        assert hmm_dma_unmap_pfn(sys, dev, m, 1) is was
        assert not int(m.pfn_list[1]) & (HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS)
        assert dev.mappings == {}
        hmm_dma_map_free(sys, dev, m)
    # an IOMMU link that fails leaves the entry unmapped
    p, a = _proc(sys)
    dev = DmaDevice(iommu=True, fail_after=3)
    d = _Driver(sys, p, a, dev)
    addrs = d.fault_and_map()
    assert addrs[3] == DMA_MAPPING_ERROR and DMA_MAPPING_ERROR not in addrs[:3] + addrs[4:]
    assert not int(d.map.pfn_list[3]) & HMM_PFN_DMA_MAPPED and hmm_dma_unmap_pfn(sys, dev, d.map, 3) is False
    d.close()
    assert dev.mappings == {}
    np.testing.assert_array_equal(d.map.pfn_list, np.zeros(0, np.uint64))
