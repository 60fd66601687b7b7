"""get_user_pages: take references on (or pin) the pages behind user addresses.

Models ``mm/gup.c`` of both releases: ``get_user_pages`` / ``get_user_pages_remote`` /
``pin_user_pages`` / ``pin_user_pages_remote`` and their ``*_fast`` forms,
``__get_user_pages`` with ``follow_page_mask`` (the page-table lookup) and
``faultin_page`` (``handle_mm_fault``, which for a device-private entry migrates the page
back through its pgmap's ``migrate_to_ram``), FOLL_LONGTERM's
``check_and_migrate_movable_pages`` (pages in device-coherent memory are moved to system
memory by ``migrate_device_coherent_folio``), the reference accounting of
``try_grab_folio`` (FOLL_GET: one reference; FOLL_PIN: ``GUP_PIN_COUNTING_BIAS`` references
on a small folio, one reference plus ``_pincount`` on a large one) and its undo,
``put_page`` / ``unpin_user_pages``.

A page list is a Python list of pfns. The references GUP hands out are held by its caller:
the invariant checker learns about them through ``System.extra_refs`` (head pfn ->
references), which :func:`try_grab_folio` and :func:`gup_put_folio` keep up to date.

>>> from hmmsim import System
>>> from hmmsim.kernel.gup import FOLL_WRITE, pin_user_pages, unpin_user_pages, folio_maybe_dma_pinned
>>> from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
>>> sys = System(ram=256 << 20, hugetlb_pages=8, test_hmm=False)
>>> proc = sys.spawn("a.out")
>>> addr = proc.mmap(2 << 12)
>>> pages = []
>>> with proc.task.running():
...     mmap_read_lock(proc.mm)
...     n = pin_user_pages(proc.task, addr, 2, FOLL_WRITE, pages)
...     mmap_read_unlock(proc.mm)
>>> n, folio_maybe_dma_pinned(sys, pages[0])
(2, True)
>>> unpin_user_pages(sys, pages)
>>> folio_maybe_dma_pinned(sys, pages[0])
False
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errno import EAGAIN, EBUSY, EEXIST, EFAULT, EINVAL, EIO, ENOMEM, EOPNOTSUPP
from .folio import folio_put
from .mm import mmap_assert_locked, mmap_read_lock, mmap_read_unlock
from .mm_types import (
    FAULT_FLAG_REMOTE,
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    FOLL_HWPOISON,  # noqa: F401  (FOLL_HWPOISON lives in mm_types, re-exported here)
    VM_FAULT_COMPLETED,
    VM_FAULT_ERROR,
    VM_FAULT_RETRY,
    vm_fault_to_errno,
)
from .page_types import HPAGE_PMD_NR, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, pte_index
from .pgtable import (
    _PAGE_DEVMAP,
    pmd_leaf,
    pmd_present,
    pte_pfn,
    pte_present,
    pte_protnone,
    pte_write,
)
from .physmem import PG_anon, PG_anon_exclusive, PG_dirty

#: ``-EMLINK`` (include/uapi/asm-generic/errno-base.h): what ``follow_page_mask`` returns
#: when a read-only pin must unshare the page first
EMLINK = 31
from .vma import (
    VM_HUGETLB,
    VM_IO,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_PFNMAP,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    Vma,
    is_cow_mapping,
    vma_is_anonymous,
)

if TYPE_CHECKING:
    from .mm import MM, PtRef
    from .system import System
    from .task import Task

__all__ = (
    "FOLL_ANON", "FOLL_DUMP", "FOLL_FAST_ONLY", "FOLL_FORCE", "FOLL_GET", "FOLL_HONOR_NUMA_FAULT",
    "FOLL_HWPOISON", "FOLL_INTERRUPTIBLE", "FOLL_LONGTERM", "FOLL_MADV_POPULATE", "FOLL_NOFAULT",
    "FOLL_NOWAIT", "FOLL_PCI_P2PDMA", "FOLL_PIN", "FOLL_REMOTE", "FOLL_SPLIT_PMD", "FOLL_TOUCH",
    "FOLL_TRIED", "FOLL_UNLOCKABLE", "FOLL_WRITE", "GUP_PIN_COUNTING_BIAS",
    "check_and_migrate_movable_pages", "faultin_page", "folio_is_longterm_pinnable",
    "folio_maybe_dma_pinned", "follow_page_mask", "get_user_page_vma_remote", "get_user_pages",
    "get_user_pages_fast", "get_user_pages_remote", "gup_put_folio", "pin_user_pages",
    "pin_user_pages_fast", "pin_user_pages_remote", "put_page", "try_grab_folio",
    "unpin_user_page", "unpin_user_pages",
)

# enum gup_flags (include/linux/mm_types.h)
FOLL_WRITE = 1 << 0
FOLL_GET = 1 << 1
FOLL_DUMP = 1 << 2
FOLL_FORCE = 1 << 3
FOLL_NOWAIT = 1 << 4
FOLL_NOFAULT = 1 << 5
# FOLL_HWPOISON = 1 << 6 lives in mm_types (vm_fault_to_errno needs it)
FOLL_ANON = 1 << 7
FOLL_LONGTERM = 1 << 8
FOLL_SPLIT_PMD = 1 << 9
FOLL_PCI_P2PDMA = 1 << 10
FOLL_INTERRUPTIBLE = 1 << 11
FOLL_HONOR_NUMA_FAULT = 1 << 12
# the internal ones (mm/internal.h)
FOLL_TOUCH = 1 << 16
FOLL_TRIED = 1 << 17
FOLL_REMOTE = 1 << 18
FOLL_PIN = 1 << 19
FOLL_FAST_ONLY = 1 << 20
FOLL_UNLOCKABLE = 1 << 21
FOLL_MADV_POPULATE = 1 << 22

#: ``GUP_PIN_COUNTING_BIAS`` (include/linux/mm.h): what one FOLL_PIN adds to the refcount
#: of a small folio
GUP_PIN_COUNTING_BIAS = 1 << 10


# -- reference accounting -------------------------------------------------------------------------
def _hold(sys: "System", head: int, refs: int) -> None:
    """Note *refs* references on *head* as held by a GUP caller (for the checker)."""
    k = sys.extra_refs.get(head, 0) + refs
    if k:
        sys.extra_refs[head] = k
    else:
        sys.extra_refs.pop(head, None)


def try_grab_folio(sys: "System", pfn: int, refs: int, flags: int) -> int:
    """``try_grab_folio()``: FOLL_GET takes *refs* references; FOLL_PIN takes *refs*
    ``GUP_PIN_COUNTING_BIAS`` references of a small folio, or *refs* references and
    *refs* ``_pincount`` of a large one. Returns 0 (or -ENOMEM on a dead folio)."""
    mem = sys.mem
    if mem.is_zero_pfn(pfn) or mem.is_huge_zero_pfn(pfn):
        # the zero folios are never pinned (is_zero_folio); their references are not
        # counted here (the model keeps no refcount on them)
        return 0
    head = mem.compound_head(pfn)
    if mem.refcount[head] <= 0:
        return -ENOMEM
    if flags & FOLL_GET:
        mem.refcount[head] += refs
        _hold(sys, head, refs)
    elif flags & FOLL_PIN:
        if mem.order[head]:
            mem.refcount[head] += refs
            _hold(sys, head, refs)
            sys.folio_pincount[head] = sys.folio_pincount.get(head, 0) + refs
        else:
            mem.refcount[head] += refs * GUP_PIN_COUNTING_BIAS
            _hold(sys, head, refs * GUP_PIN_COUNTING_BIAS)
    return 0


def gup_put_folio(sys: "System", pfn: int, refs: int, flags: int) -> None:
    """``gup_put_folio()``: undo :func:`try_grab_folio` (the last reference frees)."""
    mem = sys.mem
    if mem.is_zero_pfn(pfn) or mem.is_huge_zero_pfn(pfn):
        return
    head = mem.compound_head(pfn)
    if flags & FOLL_PIN:
        if mem.order[head]:
            left = sys.folio_pincount.get(head, 0) - refs
            if left < 0:
                raise AssertionError(f"pincount underflow on pfn {head:#x}")
            if left:
                sys.folio_pincount[head] = left
            else:
                sys.folio_pincount.pop(head, None)
        else:
            refs *= GUP_PIN_COUNTING_BIAS
    _hold(sys, head, -refs)
    if refs > 1:
        mem.refcount[head] -= refs - 1
    folio_put(sys, head)


def put_page(sys: "System", pfn: int) -> None:
    """``put_page()`` of a page GUP returned with FOLL_GET."""
    gup_put_folio(sys, pfn, 1, FOLL_GET)


def unpin_user_page(sys: "System", pfn: int) -> None:
    """``unpin_user_page()``."""
    gup_put_folio(sys, pfn, 1, FOLL_PIN)


def unpin_user_pages(sys: "System", pages: list[int]) -> None:
    """``unpin_user_pages()``: unpin every page of the list."""
    for p in pages:
        if p >= 0:
            unpin_user_page(sys, p)


def folio_maybe_dma_pinned(sys: "System", pfn: int) -> bool:
    """``folio_maybe_dma_pinned()``: a large folio with ``_pincount``; a small one with at
    least ``GUP_PIN_COUNTING_BIAS`` references."""
    mem = sys.mem
    head = mem.compound_head(pfn)
    if mem.order[head]:
        return sys.folio_pincount.get(head, 0) > 0
    return int(mem.refcount[head]) >= GUP_PIN_COUNTING_BIAS


def folio_is_longterm_pinnable(sys: "System", pfn: int) -> bool:
    """``folio_is_longterm_pinnable()``: not in device-coherent memory (nor a
    device-private page, which GUP never returns), else movable system memory is."""
    pg = sys.pgmap_of(pfn) if sys.mem.pgmap[pfn] else None
    return pg is None


# -- the slow path ---------------------------------------------------------------------------
def _can_follow_write_pte(vma: Vma, pte: int, page: int, flags: int) -> bool:
    """``can_follow_write_pte()``: a writable pte; FOLL_FORCE on a private read-only
    mapping only for an exclusive anon page."""
    if pte_write(pte):
        return True
    if not flags & FOLL_FORCE:
        return False
    if vma.vm_flags & (VM_MAYSHARE | VM_SHARED) or not vma.vm_flags & VM_MAYWRITE:
        return False
    if vma.vm_flags & VM_WRITE:
        return False
    mem = vma.vm_mm.sys.mem
    return page >= 0 and bool(mem.flags[mem.compound_head(page)] & PG_anon) and bool(mem.flags[page] & PG_anon_exclusive)


def _gup_must_unshare(vma: Vma, flags: int, page: int) -> bool:
    """``gup_must_unshare()``: a read-only FOLL_PIN of an anon page that is not
    exclusive must first unshare it (a fault with FAULT_FLAG_UNSHARE)."""
    if (flags & (FOLL_WRITE | FOLL_PIN)) != FOLL_PIN or not is_cow_mapping(vma.vm_flags):
        return False
    mem = vma.vm_mm.sys.mem
    if not mem.flags[mem.compound_head(page)] & PG_anon:
        return False
    return not mem.flags[page] & PG_anon_exclusive


def follow_page_mask(vma: Vma, address: int, flags: int) -> tuple[int, int, int]:
    """``follow_page_mask()`` (``follow_pmd_mask`` / ``follow_page_pte`` /
    ``follow_huge_pmd``): the page mapped at *address*, referenced as *flags* ask.

    Returns ``(page, page_mask, err)``: a page >= 0 with its reference taken
    (``page_mask`` 511 for a PMD-mapped THP, else 0); page -1 with err 0 when nothing
    usable is mapped (the caller faults); or err = ``-errno`` (``-EMLINK``: a read-only
    pin must unshare first; ``-EEXIST``: a pfn mapping without struct page).

    :param vma: ``struct vm_area_struct *``
    :param address: ``unsigned long``
    :param flags: ``unsigned int``, FOLL_*
    """
    mm = vma.vm_mm
    if (flags & (FOLL_PIN | FOLL_GET)) == (FOLL_PIN | FOLL_GET):
        return -1, 0, -EINVAL
    pmd = mm.pmd_ref(address)
    if pmd is None:
        return -1, 0, 0
    e = pmd.get()
    if e == 0 or not pmd_present(e):
        return -1, 0, 0
    if pmd_leaf(e):
        if pte_protnone(e):
            return -1, 0, 0
        if not vma.vm_flags & VM_HUGETLB and flags & FOLL_SPLIT_PMD:
            from .huge_memory import split_huge_pmd
            split_huge_pmd(vma, pmd, address)
            if pmd.get() == 0 and mm.pte_table(pmd, alloc=True) < 0:
                return -1, 0, -ENOMEM
            return _follow_page_pte(vma, address, pmd, flags)
        ptl = mm.pmd_lock(pmd)
        try:
            e = pmd.get()
            if pmd_present(e) and pmd_leaf(e):
                return _follow_huge_pmd(vma, address, e, flags)
        finally:
            mm.spin_unlock(ptl)
    return _follow_page_pte(vma, address, pmd, flags)


def _follow_huge_pmd(vma: Vma, address: int, e: int, flags: int) -> tuple[int, int, int]:
    """``follow_huge_pmd()`` (pmd lock held)."""
    sys = vma.vm_mm.sys
    mem = sys.mem
    head = pte_pfn(e)
    page = head + ((address >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1))
    if flags & FOLL_WRITE and not pte_write(e):
        return -1, 0, 0
    if not pte_write(e) and _gup_must_unshare(vma, flags, page):
        return -1, 0, -EMLINK
    ret = try_grab_folio(sys, page, 1, flags)
    if ret:
        return -1, 0, ret
    if flags & FOLL_TOUCH and flags & FOLL_WRITE:
        mem.flags[head] |= PG_dirty
    return page, HPAGE_PMD_NR - 1, 0


def _follow_page_pte(vma: Vma, address: int, pmd: PtRef, flags: int) -> tuple[int, int, int]:
    """``follow_page_pte()`` (see :func:`follow_page_mask` for the result)."""
    from .fault import vm_normal_page
    mm = vma.vm_mm
    sys = mm.sys
    mem = sys.mem
    got = mm.pte_offset_map_lock(pmd)
    if got is None:
        return -1, 0, 0
    tbl, tid = got
    try:
        pte = int(tbl[pte_index(address)])
        if not pte_present(pte) or pte_protnone(pte):
            return -1, 0, 0
        page = vm_normal_page(vma, address, pte)
        if flags & FOLL_WRITE and not _can_follow_write_pte(vma, pte, page, flags):
            return -1, 0, 0
        if page < 0:
            pfn = pte_pfn(pte)
            if sys.profile.pte_devmap and pte & _PAGE_DEVMAP and flags & (FOLL_GET | FOLL_PIN):
                page = pfn  # a devmap pte: the page is valid while its pgmap is
            elif flags & FOLL_DUMP:
                return -1, 0, -EFAULT
            elif mem.is_zero_pfn(pfn):
                page = pfn
            else:
                # follow_pfn_pte(): no struct page to hand out
                return -1, 0, -EFAULT if flags & (FOLL_GET | FOLL_PIN) else -EEXIST
        if not pte_write(pte) and _gup_must_unshare(vma, flags, page):
            return -1, 0, -EMLINK
        ret = try_grab_folio(sys, page, 1, flags)
        if ret:
            return -1, 0, ret
        if flags & FOLL_TOUCH and flags & FOLL_WRITE and not mem.is_zero_pfn(page):
            mem.flags[mem.compound_head(page)] |= PG_dirty
        return page, 0, 0
    finally:
        mm.pte_unmap_unlock(tid)


def faultin_page(vma: Vma, address: int, flags: int, unshare: bool) -> int:
    """``faultin_page()``: ``handle_mm_fault`` with FAULT_FLAG_WRITE / REMOTE / UNSHARE as
    *flags* ask; 0, or ``-EFAULT``/``-ENOMEM``/``-EHWPOISON`` (``vm_fault_to_errno``),
    ``-EBUSY`` for VM_FAULT_RETRY, ``-EAGAIN`` for VM_FAULT_COMPLETED."""
    from .fault import handle_mm_fault
    if flags & FOLL_NOFAULT:
        return -EFAULT
    fault_flags = 0
    if flags & FOLL_WRITE:
        fault_flags |= FAULT_FLAG_WRITE
    if flags & FOLL_REMOTE:
        fault_flags |= FAULT_FLAG_REMOTE
    if unshare:
        fault_flags |= FAULT_FLAG_UNSHARE
    ret = handle_mm_fault(vma, address, fault_flags)
    if ret & VM_FAULT_COMPLETED:
        return -EAGAIN
    if ret & VM_FAULT_ERROR:
        return vm_fault_to_errno(ret, flags) or -EFAULT
    if ret & VM_FAULT_RETRY:
        return -EBUSY
    return 0


def check_vma_flags(vma: Vma, gup_flags: int) -> int:
    """``check_vma_flags()``: 0, ``-EFAULT`` (VM_IO/VM_PFNMAP, a write without VM_WRITE
    and no FOLL_FORCE, a read without VM_READ) or ``-EOPNOTSUPP`` (FOLL_SPLIT_PMD on
    hugetlb)."""
    vm_flags = vma.vm_flags
    if vm_flags & (VM_IO | VM_PFNMAP):
        return -EFAULT
    if gup_flags & FOLL_ANON and not vma_is_anonymous(vma):
        return -EFAULT
    if gup_flags & FOLL_SPLIT_PMD and vm_flags & VM_HUGETLB:
        return -EOPNOTSUPP
    if gup_flags & FOLL_WRITE:
        if not vm_flags & VM_WRITE:
            if not gup_flags & FOLL_FORCE or vm_flags & VM_HUGETLB or not is_cow_mapping(vm_flags):
                return -EFAULT
    elif not vm_flags & VM_READ:
        if not gup_flags & FOLL_FORCE or not vm_flags & VM_MAYREAD:
            return -EFAULT
    return 0


def __get_user_pages(mm: "MM", start: int, nr_pages: int, gup_flags: int, pages: list[int] | None) -> int:
    """``__get_user_pages()``: page by page, ``follow_page_mask`` and, where nothing
    usable is mapped, ``faultin_page`` and again. Returns the number of pages done, or
    an error if none was."""
    if not nr_pages:
        return 0
    sys = mm.sys
    i = 0
    ret = 0
    vma: Vma | None = None
    start &= PAGE_MASK
    while nr_pages:
        if vma is None or start >= vma.vm_end:
            vma = mm.vma_lookup(start)
            if vma is None:
                ret = -EFAULT
                break
            ret = check_vma_flags(vma, gup_flags)
            if ret:
                break
        sys.stats.add("gup.follow_page_mask")
        page, mask, err = follow_page_mask(vma, start, gup_flags)
        if (page == -1 and not err) or err == -EMLINK:
            sys.stats.add("gup.faultin_page")
            ret = faultin_page(vma, start, gup_flags, err == -EMLINK)
            if ret == 0:
                continue
            if ret in (-EBUSY, -EAGAIN):
                ret = 0
            break
        if err == -EEXIST and pages is None:
            mask = 0
        elif err:
            ret = err
            break
        increm = min(1 + (~(start >> PAGE_SHIFT) & mask), nr_pages)
        if pages is not None:
            if increm > 1:
                try_grab_folio(sys, page, increm - 1, gup_flags)
            pages.extend(page + j for j in range(increm))
        i += increm
        start += increm * PAGE_SIZE
        nr_pages -= increm
    return i if i else ret


def __get_user_pages_locked(mm: "MM", start: int, nr_pages: int, pages: list[int] | None,
                            flags: int) -> int:
    """``__get_user_pages_locked()``: :func:`__get_user_pages` again from where a fault
    retried (no fault here drops mmap_lock, so a retry just goes on)."""
    done = 0
    while nr_pages:
        ret = __get_user_pages(mm, start, nr_pages, flags, pages)
        if ret < 0:
            return done if done else ret
        if ret == 0:
            # a fault asked for a retry: try the page once more with FOLL_TRIED
            ret = __get_user_pages(mm, start, 1, flags | FOLL_TRIED, pages)
            if ret <= 0:
                return done if done else ret
        done += ret
        nr_pages -= ret
        start += ret << PAGE_SHIFT
    return done


def check_and_migrate_movable_pages(sys: "System", pages: list[int]) -> int:
    """``check_and_migrate_movable_pages()`` (``collect_longterm_unpinnable_folios`` +
    ``migrate_longterm_unpinnable_folios``): 0 if every pinned page may stay pinned;
    otherwise pages in device-coherent memory are moved to system memory
    (``migrate_device_coherent_folio``, after turning the pin into a plain reference),
    every other pin is dropped and -EAGAIN asks the caller to pin again; -EBUSY (pins
    dropped) when a coherent page cannot be moved."""
    from ..hmm.migrate_device import migrate_device_coherent_folio
    seen: set[int] = set()
    collected = 0
    for p in pages:
        head = sys.mem.compound_head(p)
        if head in seen:
            continue
        seen.add(head)
        if not folio_is_longterm_pinnable(sys, p):
            collected += 1
    if not collected:
        return 0
    for k, p in enumerate(pages):
        if p < 0:
            continue
        if not folio_is_longterm_pinnable(sys, p):
            pages[k] = -1
            sys.mem.refcount[sys.mem.compound_head(p)] += 1  # folio_get
            gup_put_folio(sys, p, 1, FOLL_PIN)
            ret = migrate_device_coherent_folio(sys, p)
            if ret:
                unpin_user_pages(sys, pages)
                pages.clear()
                return -EBUSY
            continue
        unpin_user_page(sys, p)
        pages[k] = -1
    pages.clear()
    return -EAGAIN


def __gup_longterm_locked(mm: "MM", start: int, nr_pages: int, pages: list[int] | None,
                          gup_flags: int) -> int:
    """``__gup_longterm_locked()``: with FOLL_LONGTERM, pin, check and migrate until every
    page may stay pinned."""
    if not gup_flags & FOLL_LONGTERM:
        return __get_user_pages_locked(mm, start, nr_pages, pages, gup_flags)
    assert pages is not None
    first = len(pages)
    while True:
        n = __get_user_pages_locked(mm, start, nr_pages, pages, gup_flags)
        if n <= 0:
            return n
        got = pages[first:]
        rc = check_and_migrate_movable_pages(mm.sys, got)
        if rc != -EAGAIN:
            if rc:
                del pages[first:]
                return rc
            return n
        del pages[first:]
        mm.sys.stats.add("gup.longterm_migrated")


def _locked_call(mm: "MM", start: int, nr_pages: int, pages: list[int] | None, gup_flags: int,
                 take_lock: bool) -> int:
    if take_lock:
        mmap_read_lock(mm)
    try:
        mmap_assert_locked(mm)
        return __gup_longterm_locked(mm, start, nr_pages, pages, gup_flags)
    finally:
        if take_lock:
            mmap_read_unlock(mm)


def get_user_pages_remote(mm: "MM", start: int, nr_pages: int, gup_flags: int,
                          pages: list[int] | None) -> int:
    """``get_user_pages_remote()`` (mmap_lock held by the caller): FOLL_GET references
    on the pages of ``[start, start + nr_pages * PAGE_SIZE)`` of *mm*, appended to
    *pages*. Returns the number of pages, or ``-errno`` if none."""
    flags = gup_flags | FOLL_TOUCH | FOLL_REMOTE | (FOLL_GET if pages is not None else 0)
    if gup_flags & FOLL_PIN:
        return -EINVAL
    return _locked_call(mm, start, nr_pages, pages, flags, take_lock=False)


def get_user_pages(current: "Task", start: int, nr_pages: int, gup_flags: int, pages: list[int] | None) -> int:
    """``get_user_pages()`` in ``current->mm`` (*current* is the calling task; mmap_lock
    held by the caller)."""
    if gup_flags & FOLL_PIN:
        return -EINVAL
    flags = gup_flags | FOLL_TOUCH | (FOLL_GET if pages is not None else 0)
    return _locked_call(current.mm, start, nr_pages, pages, flags, take_lock=False)


def pin_user_pages(current: "Task", start: int, nr_pages: int, gup_flags: int, pages: list[int]) -> int:
    """``pin_user_pages()`` in ``current->mm``: FOLL_PIN (mmap_lock held by the caller)."""
    if gup_flags & FOLL_GET:
        return -EINVAL
    return _locked_call(current.mm, start, nr_pages, pages, gup_flags | FOLL_TOUCH | FOLL_PIN, take_lock=False)


def pin_user_pages_remote(mm: "MM", start: int, nr_pages: int, gup_flags: int, pages: list[int]) -> int:
    """``pin_user_pages_remote()`` (mmap_lock held by the caller)."""
    if gup_flags & FOLL_GET:
        return -EINVAL
    return _locked_call(mm, start, nr_pages, pages, gup_flags | FOLL_TOUCH | FOLL_REMOTE | FOLL_PIN,
                        take_lock=False)


def get_user_page_vma_remote(mm: "MM", addr: int, gup_flags: int) -> tuple[int, Vma | None]:
    """``get_user_page_vma_remote()``: one page and its VMA; ``(-errno, None)`` on
    failure (-EIO if GUP found nothing, -EFAULT without a VMA)."""
    pages: list[int] = []
    got = get_user_pages_remote(mm, addr, 1, gup_flags, pages)
    if got < 0:
        return got, None
    if got == 0:
        return -EIO, None
    vma = mm.vma_lookup(addr)
    if vma is None:
        put_page(mm.sys, pages[0])
        return -EFAULT, None
    return pages[0], vma


# -- the fast path --------------------------------------------------------------------------
def _gup_fast(mm: "MM", start: int, nr_pages: int, gup_flags: int, pages: list[int]) -> int:
    """``gup_fast()``: without mmap_lock, take the pages that are mapped as asked
    (present, writable for FOLL_WRITE, normal pages, long-term pinnable for
    FOLL_LONGTERM, exclusive for a read-only pin); stop at the first other one."""
    from .fault import vm_normal_page
    sys = mm.sys
    done = 0
    addr = start
    while done < nr_pages:
        vma = mm.vma_lookup(addr)
        if vma is None:
            break
        pmd = mm.pmd_ref(addr)
        if pmd is None:
            break
        e = pmd.get()
        if e == 0 or not pmd_present(e) or pmd_leaf(e):
            # PMD leaves: the slow path handles them here (it maps the same pages)
            break
        tid = mm.pte_table(pmd)
        if tid < 0:
            break
        pte = int(sys.pt.table(tid)[pte_index(addr)])
        if not pte_present(pte) or pte_protnone(pte):
            break
        if gup_flags & FOLL_WRITE and not pte_write(pte):
            break
        page = vm_normal_page(vma, addr, pte)
        if page < 0:
            break
        if gup_flags & FOLL_LONGTERM and not folio_is_longterm_pinnable(sys, page):
            break
        if not pte_write(pte) and _gup_must_unshare(vma, gup_flags, page):
            break
        if try_grab_folio(sys, page, 1, gup_flags):
            break
        pages.append(page)
        done += 1
        addr += PAGE_SIZE
    sys.stats.add("gup.fast", done)
    return done


def _gup_fast_fallback(current: "Task", start: int, nr_pages: int, gup_flags: int, pages: list[int]) -> int:
    """``gup_fast_fallback()``: the fast walk, then the slow path (taking mmap_lock) for
    the rest."""
    mm = current.mm
    start &= PAGE_MASK
    nr = _gup_fast(mm, start, nr_pages, gup_flags, pages)
    if nr == nr_pages or gup_flags & FOLL_FAST_ONLY:
        return nr
    ret = _locked_call(mm, start + (nr << PAGE_SHIFT), nr_pages - nr, pages, gup_flags, take_lock=True)
    if ret < 0:
        return nr if nr else ret
    return nr + ret


def get_user_pages_fast(current: "Task", start: int, nr_pages: int, gup_flags: int, pages: list[int]) -> int:
    """``get_user_pages_fast()`` in ``current->mm``: FOLL_GET, lockless where it can
    (mmap_lock not held by the caller)."""
    if gup_flags & FOLL_PIN:
        return -EINVAL
    return _gup_fast_fallback(current, start, nr_pages, gup_flags | FOLL_GET, pages)


def pin_user_pages_fast(current: "Task", start: int, nr_pages: int, gup_flags: int, pages: list[int]) -> int:
    """``pin_user_pages_fast()`` in ``current->mm``: FOLL_PIN, lockless where it can
    (mmap_lock not held by the caller)."""
    if gup_flags & FOLL_GET:
        return -EINVAL
    return _gup_fast_fallback(current, start, nr_pages, gup_flags | FOLL_PIN, pages)
