"""Device memory of the dmirror test device (``lib/test_hmm.c``): chunks and free lists,
MIGRATE_TO_DEV / MIGRATE_TO_SYS, the pagemap's ``migrate_to_ram``, eviction (on close and
HMM_DMIRROR_RELEASE, which also unmaps every chunk: ``dmirror_device_remove_chunks``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..hmm.migrate_device import (
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SHIFT,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_COMPOUND,
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
from ..kernel.bug import KernelOops
from ..kernel.errno import EINVAL, ENOMEM
from ..kernel.folio import folio_put, folios_put
from ..kernel.memremap import (
    DevPagemap,
    DevPagemapOps,
    MemoryType,
    check_coherent_split_hang,
    memremap_pages,
    memunmap_pages,
    zone_device_folio_init,
    zone_device_page_init,
    zone_device_pages_init,
)
from ..kernel.mm import mmap_read_lock, mmap_read_unlock
from ..kernel.mm_types import VM_FAULT_OOM, VM_FAULT_SIGBUS, VmFault
from ..kernel.page_types import (
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from ..kernel.pagemap import folio_lock, folio_unlock, folios_lock
from ..kernel.physmem import PG_head
from ..kernel.system import DEVMEM_CHUNK_PAGES
from ..kernel.task import mmget_not_zero, mmput
from ..kernel.vma import VM_READ, VM_WRITE
from .dmirror_core import (
    DPT_XA_TAG_WRITE,
    Dmirror,
    DmirrorChunk,
    DmirrorDevice,
    _bounce_fini,
    _bounce_init,
)
from .dmirror_batch import dmirror_batch_windows
from .dmirror_mirror import _bounce_to_user, dmirror_do_read
from .test_hmm_uapi import (
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HmmDmirrorCmd,
)

if TYPE_CHECKING:
    from ..kernel.system import System
    from ..kernel.task import Task


# -- device memory ---------------------------------------------------------------------------------
__all__ = (
    "dmirror_allocate_chunk",
    "dmirror_device_evict_chunk",
    "dmirror_device_remove_chunks",
    "dmirror_devmem_alloc_page",
    "dmirror_devmem_fault",
    "dmirror_devmem_fault_alloc_and_copy",
    "dmirror_devmem_folio_split",
    "dmirror_devmem_free",
    "dmirror_migrate_alloc_and_copy",
    "dmirror_migrate_finalize_and_map",
    "dmirror_migrate_to_device",
    "dmirror_migrate_to_system",
)


def dmirror_allocate_chunk(mdevice: DmirrorDevice, want_page: bool = False,
                           is_large: bool = False) -> tuple[int, int]:
    """Models ``lib/test_hmm.c:dmirror_allocate_chunk()``: add a 256 MiB pagemap and put
    its pages on the free lists (7.3 with *is_large*: every aligned 2 MiB block as a free
    device THP), then, if *want_page*, take one page (a THP if *is_large*) off them.
    Private devices get a range from ``request_free_mem_region``; a coherent device
    always asks for its one fixed SPM range, so a second chunk fails in
    ``memremap_pages`` (WARN "Conflicting mapping in same section", ``-ENOMEM``).
    Returns ``(0 or -errno, pfn or -1)``."""
    sys = mdevice.sys
    if mdevice.is_private:
        start = sys.request_free_mem_region(DEVMEM_CHUNK_PAGES)
        if start < 0:
            return -ENOMEM, -1
        mtype = MemoryType.MEMORY_DEVICE_PRIVATE
    else:
        start = sys.spm_range(1 if mdevice.minor == 2 else 0)
        if start < 0:
            return -EINVAL, -1
        mtype = MemoryType.MEMORY_DEVICE_COHERENT
    ops = DevPagemapOps(page_free=lambda pfn: dmirror_devmem_free(mdevice, pfn),
                        migrate_to_ram=dmirror_devmem_fault,
                        folio_split=(lambda head, tail: dmirror_devmem_folio_split(mdevice, head, tail))
                        if sys.profile.device_private_thp else None,
                        pages_free=lambda pfns: dmirror_devmem_free_pages(mdevice, pfns))
    pgmap = DevPagemap(mtype, start, DEVMEM_CHUNK_PAGES, ops, owner=mdevice)
    with mdevice.devmem_lock.held():
        ret = memremap_pages(sys, pgmap)
        if ret:
            return ret, -1
        mdevice.chunks.append(DmirrorChunk(pgmap, mdevice))
    sys.stats.add("dmirror.chunks")
    page = -1
    ret = 0
    with mdevice.lock.held():
        # the free lists are stacks; pages come out lowest pfn first
        if is_large:
            mdevice.free_folios.extend(range(start + DEVMEM_CHUNK_PAGES - HPAGE_PMD_NR, start - 1, -HPAGE_PMD_NR))
        else:
            mdevice.free_pages.extend(range(start + DEVMEM_CHUNK_PAGES - 1, start - 1, -1))
        if want_page:
            if is_large and mdevice.free_folios:
                page = mdevice.free_folios.pop()
                mdevice.calloc += HPAGE_PMD_NR
            elif not is_large and mdevice.free_pages:
                page = mdevice.free_pages.pop()
                mdevice.calloc += 1
            else:
                ret = -ENOMEM
    return ret, page


def dmirror_devmem_free(mdevice: DmirrorDevice, pfn: int) -> None:
    """``dmirror_devmem_free()`` (``page_free``/``folio_free``): free the backing folio of a
    private device folio and put the device folio back on its free list (a THP on
    ``free_folios``), unless its chunk is being removed."""
    sys = mdevice.sys
    mem = sys.mem
    order = int(mem.order[pfn])
    backing = int(mem.zone_device_data[pfn])
    mdevice.backing_owner[backing or pfn] = 0
    if mdevice.is_private and backing:
        mem.zone_device_data[pfn] = 0
        folio_put(sys, backing)
    with mdevice.lock.held():
        chunk = next(c for c in mdevice.chunks if c.pagemap.start_pfn <= pfn < c.pagemap.start_pfn + c.pagemap.nr_pages)
        if not chunk.remove:
            mdevice.cfree += 1 << order
            if order:
                mdevice.free_folios.append(pfn)
            else:
                mdevice.free_pages.append(pfn)


def dmirror_devmem_folio_split(mdevice: DmirrorDevice, head: int, tail: int | None) -> None:
    """``dmirror_devmem_folio_split()`` (7.3's ``folio_split`` op), called while the
    device-private THP at *head* is split, once per new folio *tail* and then with
    ``None``: the backing THP is split the same way (each device page gets its own
    backing page, which keeps the mirror owner, a reference and no mapping); at the end
    the backing head becomes an order-0 folio."""
    sys = mdevice.sys
    mem = sys.mem
    rpage = int(mem.zone_device_data[head])
    if not rpage:
        if tail is not None:
            mem.zone_device_data[tail] = 0
        return
    if tail is None:  # folio_reset_order(), mapping NULL, folio_set_count(1)
        mem.order[rpage] = 0
        mem.flags[rpage] &= ~np.uint32(PG_head)
        mem.mapping[rpage] = 0
        mem.refcount[rpage] = 1
        return
    rtail = rpage + (tail - head)
    mem.zone_device_data[tail] = rtail
    owner = mdevice.backing_owner[rpage]
    if owner:
        mdevice.backing_owner[rtail] = owner
    mem.head_off[rtail] = 0  # clear_compound_head()
    mem.mapping[rtail] = 0
    mem.mapping[tail] = mem.mapping[head]
    mem.refcount[rtail] = 1


def dmirror_devmem_free_pages(mdevice: DmirrorDevice, pfns: npt.NDArray[np.int64]) -> None:
    """:func:`dmirror_devmem_free` of each page of *pfns*, in order, in bulk (the
    pagemap's ``pages_free``): the backing pages freed together, the device pages pushed
    on the free list in that order (the device lock counted once per page, as the loop
    takes it)."""
    sys = mdevice.sys
    mem = sys.mem
    pfns = np.asarray(pfns, np.int64)
    if (mem.order[pfns] != 0).any():  # device THPs (7.3): the per-folio path, in order
        for p in pfns.tolist():
            dmirror_devmem_free(mdevice, p)
        return
    backing = mem.zone_device_data[pfns]
    mdevice.backing_owner[np.where(backing != 0, backing, pfns)] = 0
    if mdevice.is_private:
        has = backing != 0
        if has.any():
            mem.zone_device_data[pfns[has]] = 0
            folios_put(sys, np.sort(backing[has]))
    with mdevice.lock.held():
        kept = pfns
        for c in mdevice.chunks:
            if c.remove:  # a chunk being removed takes its pages off the free list
                kept = kept[(kept < c.pagemap.start_pfn) | (kept >= c.pagemap.start_pfn + c.pagemap.nr_pages)]
        mdevice.cfree += len(kept)
        mdevice.free_pages.extend(kept.tolist())
    sys.ls.count_acquisitions(mdevice.lock.klass, len(pfns) - 1)


def _devmem_alloc_pages(dmirror: "Dmirror", k: int) -> npt.NDArray[np.int64]:
    """:func:`dmirror_devmem_alloc_page` *k* times, in bulk: the device pages (-1 where an
    allocation failed) in the order the loop would hand them out. Runs of allocations
    that cannot fail (pages on the free list and, for a private device, free RAM for the
    backing pages) are done at once; the others (a new chunk, a failure) one by one."""
    mdevice = dmirror.mdevice
    sys = mdevice.sys
    mem = sys.mem
    out = np.full(k, -1, np.int64)
    done = 0
    while done < k:
        m = min(k - done, len(mdevice.free_pages))
        if mdevice.is_private:
            m = min(m, max(mem.nr_free - mem.charged, 0))
        if m <= 0:
            out[done] = dmirror_devmem_alloc_page(dmirror)
            done += 1
            continue
        rpages = mem.alloc_pages_bulk(m, zero=False) if mdevice.is_private else np.zeros(m, np.int64)
        assert len(rpages) == m
        with mdevice.lock.held():
            taken = mdevice.free_pages[-m:]
            del mdevice.free_pages[-m:]
            mdevice.calloc += m
        sys.ls.count_acquisitions(mdevice.lock.klass, m - 1)
        dpages = np.array(taken[::-1], np.int64)
        zone_device_pages_init(sys, dpages)
        mem.zone_device_data[dpages] = rpages
        out[done:done + m] = dpages
        done += m
    return out


def dmirror_devmem_alloc_page(dmirror: "Dmirror", is_large: bool = False) -> int:
    """``dmirror_devmem_alloc_page()``: a private device gets a system folio of the same
    order to hold the data (``zone_device_data``); the device page (7.3 *is_large*: a
    device THP from ``free_folios``) comes off its free list, or from a new chunk, and is
    made a folio (``zone_device_folio_init``; 6.12 ``zone_device_page_init``). Returns
    the device pfn (refcount 1, locked) or -1."""
    mdevice = dmirror.mdevice
    sys = mdevice.sys
    order = HPAGE_PMD_ORDER if is_large else 0
    rpage = 0
    if mdevice.is_private:
        # GFP_HIGHUSER: not zeroed (a THP is overwritten by the copy or cleared for a hole)
        rpage = sys.mem.alloc_folio(order, zero=False) if order else sys.mem.alloc_page()
        if rpage < 0:
            return -1
    with mdevice.lock.held():
        dpage = -1
        if is_large and mdevice.free_folios:
            dpage = mdevice.free_folios.pop()
            mdevice.calloc += 1 << order
        elif not is_large and mdevice.free_pages:
            dpage = mdevice.free_pages.pop()
            mdevice.calloc += 1
    if dpage < 0:
        ret, dpage = dmirror_allocate_chunk(mdevice, True, is_large)
        if ret:
            if rpage:
                folio_put(sys, rpage)
            return -1
    if sys.profile.device_private_thp:
        zone_device_folio_init(sys, dpage, order)
    else:
        zone_device_page_init(sys, dpage)
    sys.mem.zone_device_data[dpage] = rpage
    return dpage


def _owner_id(dmirror: "Dmirror") -> int:
    """The index of *dmirror* in its device's ``owners`` (registered on first use): what
    :attr:`~.dmirror_core.DmirrorDevice.backing_owner` stores for its pages."""
    oid = dmirror.owner_id
    if not oid:
        owners = dmirror.mdevice.owners
        oid = dmirror.owner_id = len(owners)
        owners.append(dmirror)
    return oid


def _backing_page(sys: "System", dpage: int) -> int:
    """``BACKING_PAGE()``: a private page's data page; a coherent page holds its data."""
    rpage = int(sys.mem.zone_device_data[dpage])
    return rpage if rpage else dpage


def _take_fail_alloc(dmirror: "Dmirror") -> bool:
    """7.3's ``HMM_DMIRROR_FLAG_FAIL_ALLOC``: consumed by the next allocation, which fails."""
    if dmirror.flags & HMM_DMIRROR_FLAG_FAIL_ALLOC:
        dmirror.flags &= ~HMM_DMIRROR_FLAG_FAIL_ALLOC
        return True
    return False


def dmirror_migrate_alloc_and_copy(args: MigrateVma, dmirror: "Dmirror") -> None:
    """``dmirror_migrate_alloc_and_copy()``: a device page for every selected entry, the
    data copied (or cleared for holes and the zero page) into its backing page. A
    compound entry (7.3) gets a device THP (``dst`` COMPOUND); if that allocation fails
    (or FAIL_ALLOC fails it) the 512 pages get order-0 device pages instead, which
    makes ``migrate_vma_pages`` split the source. An order-0 entry whose allocation
    fails is left alone."""
    sys = dmirror.sys
    mem = sys.mem
    src, dst = args.src, args.dst
    npages = args.npages
    if not (src[:npages] & np.uint64(MIGRATE_PFN_COMPOUND)).any():
        return _migrate_alloc_and_copy_bulk(args, dmirror)  # order-0 entries only
    # 6.12: a hole or zero page (no source page) of a writable VMA gets a writable page
    hole_write = MIGRATE_PFN_WRITE if (sys.profile.dmirror_hole_migrates_writable
                                       and args.vma.vm_flags & VM_WRITE) else 0
    i = 0
    while i < npages:
        s = int(src[i])
        if not s & MIGRATE_PFN_MIGRATE:
            i += 1
            continue
        is_large = bool(s & MIGRATE_PFN_COMPOUND)
        write = s & MIGRATE_PFN_WRITE
        spage = migrate_pfn_to_page(s)
        if spage >= 0 and mem.pgmap[spage]:
            sys.stats.add("dmirror.warn_already_device")  # WARN: page already in device
            i += 1
            continue
        dpage = -1 if _take_fail_alloc(dmirror) else dmirror_devmem_alloc_page(dmirror, is_large)
        if dpage < 0:
            if not is_large:
                i += 1
                continue
            nr = HPAGE_PMD_NR if spage < 0 else mem.folio_nr_pages(spage)
            for k in range(nr):
                if i >= npages:
                    break
                dpage = dmirror_devmem_alloc_page(dmirror, False)
                if dpage < 0:
                    sys.stats.add("dmirror.warn_thp_fallback_alloc")
                    raise KernelOops("dmirror_migrate_alloc_and_copy: an order-0 device page of the "
                                     "THP fallback could not be allocated (NULL dereference)")
                rpage = _backing_page(sys, dpage)
                dmirror.mdevice.backing_owner[rpage] = _owner_id(dmirror)
                dst[i] = np.uint64(migrate_pfn(dpage) | write)
                if spage >= 0:
                    mem.copy_pages(rpage, spage + k)
                else:
                    mem.clear_pages(rpage)
                i += 1
            continue
        rpage = _backing_page(sys, dpage)
        dmirror.mdevice.backing_owner[rpage] = _owner_id(dmirror)
        dst[i] = np.uint64(migrate_pfn(dpage) | write | (hole_write if spage < 0 else 0))
        if is_large:
            dst[i] = np.uint64(int(dst[i]) | MIGRATE_PFN_COMPOUND)
            if mem.order[dpage]:
                nr = mem.folio_nr_pages(dpage)
                if spage >= 0:
                    mem.copy_folio(rpage, spage, nr)
                else:
                    mem.clear_pages(np.arange(rpage, rpage + nr, dtype=np.int64))
                i += nr
                continue
        if spage >= 0:
            mem.copy_pages(rpage, spage)
        else:
            mem.clear_pages(rpage)
        i += 1


def dmirror_migrate_finalize_and_map(args: MigrateVma, dmirror: "Dmirror") -> int:
    """``dmirror_migrate_finalize_and_map()``: map the migrated pages (their backing pages)
    in the device page table, tagged WRITE where the source was writable; a compound
    destination maps all its pages."""
    sys = dmirror.sys
    mem = sys.mem
    d_ = args.dst[:args.npages]
    dn = d_.nonzero()[0]
    if len(dn) > 1 and not (d_ & np.uint64(MIGRATE_PFN_COMPOUND)).any():
        return _migrate_finalize_and_map_bulk(args, dmirror)  # order-0 destinations only
    with dmirror.mutex.held():
        vpn0 = args.start >> PAGE_SHIFT
        s_ = args.src[:args.npages]
        for i in dn.tolist():  # (few entries here: one per THP)
            d = int(d_[i])
            if not d & MIGRATE_PFN_VALID or not int(s_[i]) & MIGRATE_PFN_MIGRATE:
                continue
            dpage = migrate_pfn_to_page(d)
            nr = mem.folio_nr_pages(mem.compound_head(dpage)) if d & MIGRATE_PFN_COMPOUND else 1
            tag = DPT_XA_TAG_WRITE if d & MIGRATE_PFN_WRITE else 0
            rpage = _backing_page(sys, dpage)
            dmirror.pt.store_range(vpn0 + i, (np.arange(rpage, rpage + nr, dtype=np.int64) << 2) | tag)
    return 0


def _migrate_alloc_and_copy_bulk(args: MigrateVma, dmirror: "Dmirror") -> None:
    """``dmirror_migrate_alloc_and_copy()`` (order 0): a device page for every selected
    entry, the data copied (or cleared for holes and the zero page) into its backing page.
    7.3's ``HMM_DMIRROR_FLAG_FAIL_ALLOC`` fails the first allocation (that entry is left).
    The entries of a window are allocated and copied in bulk."""
    sys = dmirror.sys
    mem = sys.mem
    # 6.12: a hole or zero page (no source page) of a writable VMA gets a writable page
    hole_write = MIGRATE_PFN_WRITE if (sys.profile.dmirror_hole_migrates_writable
                                       and args.vma.vm_flags & VM_WRITE) else 0
    s_ = args.src[:args.npages]
    sel = (s_ & np.uint64(MIGRATE_PFN_MIGRATE)) != 0
    spage = np.where((s_ & np.uint64(MIGRATE_PFN_VALID)) != 0,
                     (s_ >> np.uint64(MIGRATE_PFN_SHIFT)).astype(np.int64), -1)
    already = sel & (spage >= 0) & (mem.pgmap[np.maximum(spage, 0)] != 0)
    if already.any():
        sys.stats.add("dmirror.warn_already_device", int(already.sum()))  # WARN: page already in device
    want = np.flatnonzero(sel & ~already)
    if len(want) and dmirror.flags & HMM_DMIRROR_FLAG_FAIL_ALLOC:
        dmirror.flags &= ~HMM_DMIRROR_FLAG_FAIL_ALLOC
        want = want[1:]
    if len(want) == 0:
        return
    dpages = _devmem_alloc_pages(dmirror, len(want))
    ok = dpages >= 0
    idx, dpages = want[ok], dpages[ok]
    if len(idx) == 0:
        return
    rdata = mem.zone_device_data[dpages]
    rpages = np.where(rdata != 0, rdata, dpages)
    dmirror.mdevice.backing_owner[rpages] = _owner_id(dmirror)
    sp = spage[idx]
    has = sp >= 0
    args.dst[idx] = ((dpages.astype(np.uint64) << np.uint64(MIGRATE_PFN_SHIFT)) | np.uint64(MIGRATE_PFN_VALID)
                     | (s_[idx] & np.uint64(MIGRATE_PFN_WRITE))
                     | np.where(has, np.uint64(0), np.uint64(hole_write)))
    if has.any():
        mem.copy_pages(rpages[has], sp[has])
    if not has.all():
        mem.clear_pages(rpages[~has])


def _migrate_finalize_and_map_bulk(args: MigrateVma, dmirror: "Dmirror") -> int:
    """``dmirror_migrate_finalize_and_map()``: map the migrated pages (their backing pages)
    in the device page table, tagged WRITE where the source was writable."""
    sys = dmirror.sys
    mem = sys.mem
    with dmirror.mutex.held():
        s_ = args.src[:args.npages]
        d_ = args.dst[:args.npages]
        idx = np.flatnonzero(((s_ & np.uint64(MIGRATE_PFN_MIGRATE)) != 0)
                             & ((d_ & np.uint64(MIGRATE_PFN_VALID)) != 0))
        if len(idx):
            d = d_[idx]
            dpages = (d >> np.uint64(MIGRATE_PFN_SHIFT)).astype(np.int64)
            rdata = mem.zone_device_data[dpages]
            rpages = np.where(rdata != 0, rdata, dpages)
            tags = np.where((d & np.uint64(MIGRATE_PFN_WRITE)) != 0, DPT_XA_TAG_WRITE, 0)
            dmirror.pt.store_indices((args.start >> PAGE_SHIFT) + idx, (rpages << 2) | tags)
    return 0


def _select_device(dmirror: "Dmirror") -> int:
    """``dmirror_select_device()``."""
    return (MIGRATE_VMA_SELECT_DEVICE_PRIVATE if dmirror.mdevice.is_private
            else MIGRATE_VMA_SELECT_DEVICE_COHERENT)


def dmirror_devmem_fault_alloc_and_copy(args: MigrateVma, dmirror: "Dmirror") -> int:
    """``dmirror_devmem_fault_alloc_and_copy()``: a system page for every selected device
    page, its device page-table entry erased, the data copied back. A device THP (7.3)
    gets a system THP (``dst`` COMPOUND); when FAIL_ALLOC fails that allocation the 512
    pages get order-0 pages (``migrate_vma_pages`` then splits the device THP). Returns
    0 or ``VM_FAULT_OOM`` (an order-0 allocation failed, or FAIL_ALLOC failed one).
    Like the kernel, the step after an entry is ``1 << order`` of the last folio seen."""
    sys = dmirror.sys
    mem = sys.mem
    src, dst = args.src, args.dst
    npages = args.npages
    s_ = src[:npages]
    vm = MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE
    nz = s_.nonzero()[0]
    if len(nz) == 1:  # one entry (a device THP's, or one page)
        s0 = int(s_[nz[0]])
        has_thp = s0 & vm == vm and bool(mem.order[s0 >> MIGRATE_PFN_SHIFT])
    else:
        sel = (s_ & np.uint64(vm)) == np.uint64(vm)
        sp = np.where(sel, (s_ >> np.uint64(MIGRATE_PFN_SHIFT)).astype(np.int64), 0)
        has_thp = bool((sel & (mem.order[sp] != 0)).any())
    if not has_thp:
        return _fault_alloc_and_copy_bulk(args, dmirror)  # no device THP
    vpn = args.start >> PAGE_SHIFT
    end_vpn = vpn + npages
    i = 0
    order = 0
    while vpn < end_vpn and i < npages:
        s = int(src[i])
        spage = migrate_pfn_to_page(s)
        if spage < 0 or not s & MIGRATE_PFN_MIGRATE:
            vpn += 1
            i += 1 << order
            continue
        if not mem.pgmap[spage]:
            sys.stats.add("dmirror.warn_not_device")  # WARN_ON
            vpn += 1
            i += 1 << order
            continue
        rpage = _backing_page(sys, spage)
        order = int(mem.order[mem.compound_head(rpage)])
        d = MIGRATE_PFN_COMPOUND if order else 0
        d |= s & MIGRATE_PFN_WRITE
        if _take_fail_alloc(dmirror):
            d &= ~MIGRATE_PFN_COMPOUND
            dpage = -1
        elif order:
            dpage = mem.alloc_folio(order, zero=False)  # every byte is copied below
        else:
            dpage = mem.alloc_page()
        if dpage < 0 and not order:
            dst[i] = np.uint64(d)
            return VM_FAULT_OOM
        nr = 1 << order
        if dpage >= 0:
            folio_lock(sys, dpage)
            dst[i] = np.uint64(d | migrate_pfn(dpage))
            dmirror.pt.erase_range(vpn, vpn + nr - 1)
            mem.copy_folio(dpage, rpage, nr)
        else:
            dst[i] = np.uint64(d)
            for k in range(nr):  # try with smaller pages
                p = mem.alloc_page()
                if p < 0:
                    while k > 0:
                        k -= 1
                        f = migrate_pfn_to_page(int(dst[i + k]))
                        folio_unlock(sys, f)
                        folio_put(sys, f)
                    dst[i:i + nr] = 0
                    return VM_FAULT_OOM
                folio_lock(sys, p)
                dst[i + k] = np.uint64(migrate_pfn(p))
                dmirror.pt.erase_range(vpn + k, vpn + k)
                mem.copy_pages(p, rpage + k)
        vpn += nr
        i += nr
    return 0


def _fault_alloc_and_copy_bulk(args: MigrateVma, dmirror: "Dmirror") -> int:
    """``dmirror_devmem_fault_alloc_and_copy()`` (order 0): a system page for every selected
    device page, its device page-table entry erased, the data copied back. Returns 0 or
    ``VM_FAULT_OOM`` (also when 7.3's FAIL_ALLOC fails the allocation): the entries before
    the failing one are done. The entries of a window are done in bulk."""
    sys = dmirror.sys
    mem = sys.mem
    s_ = args.src[:args.npages]
    sel = ((s_ & np.uint64(MIGRATE_PFN_VALID)) != 0) & ((s_ & np.uint64(MIGRATE_PFN_MIGRATE)) != 0)
    spage = np.where(sel, (s_ >> np.uint64(MIGRATE_PFN_SHIFT)).astype(np.int64), 0)
    notdev = sel & (mem.pgmap[spage] == 0)
    if notdev.any():
        sys.stats.add("dmirror.warn_not_device", int(notdev.sum()))  # WARN_ON
    want = np.flatnonzero(sel & ~notdev)
    if len(want) == 0:
        return 0
    if dmirror.flags & HMM_DMIRROR_FLAG_FAIL_ALLOC:
        dmirror.flags &= ~HMM_DMIRROR_FLAG_FAIL_ALLOC
        return VM_FAULT_OOM
    m = min(len(want), max(mem.nr_free - mem.charged, 0))
    if m:
        idx = want[:m]
        sp = spage[idx]
        rdata = mem.zone_device_data[sp]
        rpages = np.where(rdata != 0, rdata, sp)
        dpages = mem.alloc_pages_bulk(m, zero=False)
        assert len(dpages) == m
        folios_lock(sys, dpages)
        args.dst[idx] = ((dpages.astype(np.uint64) << np.uint64(MIGRATE_PFN_SHIFT)) | np.uint64(MIGRATE_PFN_VALID)
                         | (s_[idx] & np.uint64(MIGRATE_PFN_WRITE)))
        dmirror.pt.erase_indices((args.start >> PAGE_SHIFT) + idx)
        mem.copy_pages(dpages, rpages)
    if m < len(want):
        mem.alloc_page()  # fails: the OOM this allocation meets
        return VM_FAULT_OOM
    return 0


def dmirror_devmem_fault(vmf: "VmFault") -> int:
    """``dmirror_devmem_fault()`` (``migrate_to_ram``): migrate the faulting page back to
    system memory through the dmirror that put it on the device; a fault on a
    device-private PMD (7.3, no pte) migrates the whole device THP as one compound
    entry."""
    sys = vmf.vma.vm_mm.sys
    mem = sys.mem
    rpage = _backing_page(sys, mem.compound_head(vmf.page))
    pg = sys.pgmap_of(vmf.page)
    assert pg is not None
    dmirror = pg.owner.owners[int(pg.owner.backing_owner[rpage])]
    assert dmirror is not None
    order = int(mem.order[mem.compound_head(vmf.page)])
    if vmf.orig_pte:  # a pte fault: the folio may be partially mapped
        order = 0
    size = PAGE_SIZE << order
    start = vmf.address & ~(size - 1)
    flags = _select_device(dmirror)
    if order:
        flags |= MIGRATE_VMA_SELECT_COMPOUND
    args = MigrateVma(vmf.vma, start, start + size, dmirror.mdevice, flags, fault_page=vmf.page)
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
    thp = dmirror.sys.profile.device_private_thp
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
            if thp:
                flags |= MIGRATE_VMA_SELECT_COMPOUND
            if addr != start:  # whole windows after the first, at once where they can be
                done, moved = dmirror_batch_windows(dmirror, vma, addr, end, to_dev)
                if done:
                    if not to_dev:
                        cmd.cpages += moved
                    addr += done << (PAGE_SHIFT + HPAGE_PMD_ORDER)
                    continue
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
                # dmirror_successful_migrated_pages(): entries both VALID and MIGRATE
                both = np.uint64(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
                cmd.cpages += int(np.count_nonzero((args.src[:args.npages] & both) == both))
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
    back to system memory: ``migrate_device_range`` over the chunk's pages in use (one
    call, as the kernel does), then a system page for every selected order-0 entry
    (allocated, locked and copied from the backing page in bulk) and, 7.3, a system THP for
    every device THP (a compound entry); ``migrate_device_pages`` and
    ``migrate_device_finalize``. A chunk with no page in use needs nothing. The kernel
    allocates with ``__GFP_NOFAIL``: running out of RAM here is a kernel oops."""
    sys = chunk.mdevice.sys
    mem = sys.mem
    pg = chunk.pagemap
    used = np.flatnonzero(mem.refcount[pg.start_pfn:pg.start_pfn + pg.nr_pages] > 0)
    if not len(used):
        return
    lo = pg.start_pfn + int(used[0])
    hi = pg.start_pfn + int(used[-1]) + 1
    hi += (1 << int(mem.order[hi - 1])) - 1  # the last one may be a device THP's head
    n = hi - lo
    src = np.zeros(n, np.uint64)
    dst = np.zeros(n, np.uint64)
    migrate_device_range(sys, src, lo, n)
    _U = np.uint64
    sel = ((src & _U(MIGRATE_PFN_VALID)) != 0) & ((src & _U(MIGRATE_PFN_MIGRATE)) != 0)
    compound = sel & ((src & _U(MIGRATE_PFN_COMPOUND)) != 0)
    for i in np.flatnonzero(compound).tolist():
        s_ = int(src[i])
        spage = migrate_pfn_to_page(s_)
        order = int(mem.order[spage])
        dpage = mem.alloc_folio(order, zero=False)
        if dpage < 0:
            raise KernelOops("dmirror_device_evict_chunk: folio_alloc() of a THP failed "
                             "(NULL dereference; the kernel has no fallback here)")
        folio_lock(sys, dpage)
        nr = 1 << order
        back = _backing_page(sys, spage)
        mem.copy_folio(dpage, back, nr)
        dst[i] = np.uint64(migrate_pfn(dpage) | (s_ & MIGRATE_PFN_WRITE) | MIGRATE_PFN_COMPOUND)
    sel = np.flatnonzero(sel & ~compound)
    if len(sel):
        spages = (src[sel] >> _U(MIGRATE_PFN_SHIFT)).astype(np.int64)
        dpages = mem.alloc_pages_bulk(len(sel), zero=False)
        if len(dpages) < len(sel):
            if len(dpages):
                folios_put(sys, dpages)
            raise KernelOops("dmirror_device_evict_chunk: alloc_page(__GFP_NOFAIL) cannot get "
                             f"{len(sel)} pages (out of memory)")
        folios_lock(sys, dpages)
        rdata = mem.zone_device_data[spages].astype(np.int64)
        mem.copy_pages(dpages, np.where(rdata != 0, rdata, spages))
        dst[sel] = ((dpages.astype(np.uint64) << _U(MIGRATE_PFN_SHIFT)) | _U(MIGRATE_PFN_VALID)
                    | (src[sel] & _U(MIGRATE_PFN_WRITE)))
    migrate_device_pages(sys, src, dst, n)
    migrate_device_finalize(sys, src, dst, n)


def dmirror_remove_free_pages(chunk: DmirrorChunk) -> None:
    """``dmirror_remove_free_pages()`` (under ``mdevice->lock``): take the chunk's pages
    off the device's free lists (7.3: its free THPs too). (The kernel's loop only moves the list head past the last
    page of the chunk it finds; as every chunk is removed in turn and the list is reset
    afterwards, the result is the same: no page of a removed chunk is handed out again.)"""
    mdevice = chunk.mdevice
    lo, hi = chunk.pagemap.start_pfn, chunk.pagemap.start_pfn + chunk.pagemap.nr_pages
    mdevice.free_pages = [p for p in mdevice.free_pages if not lo <= p < hi]
    mdevice.free_folios = [p for p in mdevice.free_folios if not lo <= p < hi]


def dmirror_device_remove_chunks(mdevice: DmirrorDevice) -> None:
    """``dmirror_device_remove_chunks()`` (HMM_DMIRROR_RELEASE): for every chunk, mark it
    removed and drop its free pages, evict its pages in use to system memory
    (:func:`dmirror_device_evict_chunk`; their ``page_free`` then keeps them off the free
    list), ``memunmap_pages`` and, for private memory, ``release_mem_region``. The device
    is left with no chunk: its next allocation maps a new one (coherent devices map their
    fixed SPM range again)."""
    sys = mdevice.sys
    with mdevice.devmem_lock.held():
        if not mdevice.chunks:
            return
        for chunk in list(mdevice.chunks):
            with mdevice.lock.held():
                chunk.remove = True
                dmirror_remove_free_pages(chunk)
            check_coherent_split_hang(chunk.pagemap, "HMM_DMIRROR_RELEASE")  # item 28 (7.3)
            dmirror_device_evict_chunk(chunk)
            pg = chunk.pagemap
            memunmap_pages(sys, pg)
            if pg.is_private:
                sys.release_mem_region(pg.start_pfn, pg.nr_pages)
            sys.stats.add("dmirror.chunks_removed")
        mdevice.chunks = []
        with mdevice.lock.held():
            mdevice.free_pages = []
            mdevice.free_folios = []
