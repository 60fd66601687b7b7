"""The CPU side of memory access: translation by the MMU and the user page-fault handler.

Models what the hardware page walker does (present and writable checks, setting the
accessed/dirty bits on the entry it used) and ``arch/x86/mm/fault.c``'s
``do_user_addr_fault()`` (VMA lookup under mmap_lock, ``access_error()``, then
``handle_mm_fault(..., FAULT_FLAG_USER)``, retried until the access succeeds).
An access the kernel answers with a signal returns that signal: ``SIGSEGV`` (no VMA, or
the VMA forbids the access), ``SIGBUS`` (past end of file, no hugetlb page, hwpoison),
``SIGKILL`` (out of memory).

:func:`translate_range` is the vectorised fast path: it resolves a run of pages that
already allow the access a whole page table at a time, and faults the others one by one
in address order, so a CPU loop over many pages behaves exactly like the page-by-page
loop of a real CPU.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .fault import (
    FAULT_FLAG_USER,
    FAULT_FLAG_WRITE,
    VM_FAULT_COMPLETED,
    VM_FAULT_ERROR,
    VM_FAULT_HWPOISON,
    VM_FAULT_HWPOISON_LARGE,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
)
from .fault_range import handle_mm_fault_range
from .mm import MM, mmap_read_lock, mmap_read_unlock
from .mm_types import FAULT_FLAG_DEFAULT
from .page_types import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PUD_SIZE, pte_index
from .pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_RW,
    PTE_PFN_MASK,
    pmd_leaf,
    table_id,
)
from .vma import VM_WRITE, vma_is_accessible

__all__ = ("SIGBUS", "SIGKILL", "SIGSEGV", "SigRun", "copy_from_user", "copy_pages_to_user", "copy_to_user",
           "do_user_addr_fault", "translate", "translate_range", "user_copy", "user_read_pages",
           "user_write_pages")

SIGKILL = 9
SIGBUS = 7
SIGSEGV = 11
_U = np.uint64
_MAX_RETRIES = 16


def _walk(mm: MM, addr: int, n: int, write: bool) -> npt.NDArray[np.int64]:
    """The MMU: pfns of the pages ``[addr, addr + n pages)`` that allow the access now
    (-1 where it would fault), setting accessed (and dirty) bits on the entries used.
    *n* pages must lie within one pmd."""
    need = _PAGE_PRESENT | (_PAGE_RW if write else 0)
    bits = _PAGE_ACCESSED | (_PAGE_DIRTY if write else 0)
    pmd = mm.pmd_ref(addr)
    if pmd is None:  # no pmd table: nothing mapped, or a huge pud maps addr
        out = np.full(n, -1, np.int64)
        pud = mm.pud_entry(addr)
        if pud is None:
            return out
        pe = int(pud[0][pud[1]])
        if pe & _PAGE_PRESENT and pmd_leaf(pe) and pe & need == need:
            pud[0][pud[1]] = pe | bits
            base = ((pe & PTE_PFN_MASK) >> PAGE_SHIFT) + ((addr >> PAGE_SHIFT) & ((1 << 18) - 1))
            out[:] = base + np.arange(n)
        return out
    e = pmd.get()
    if e == 0 or not e & _PAGE_PRESENT:
        return np.full(n, -1, np.int64)
    if pmd_leaf(e):
        if e & need != need:
            return np.full(n, -1, np.int64)
        pmd.set(e | bits)
        base = ((e & PTE_PFN_MASK) >> PAGE_SHIFT) + pte_index(addr)
        return np.arange(base, base + n, dtype=np.int64)
    tbl = mm.sys.pt.table(table_id(e))  # the pte table the present pmd points to
    i0 = pte_index(addr)
    seg = tbl[i0:i0 + n]
    ok = (seg & _U(need)) == _U(need)
    if ok.all():  # the common case: every page accessible, no masked copies
        seg |= _U(bits)
        return ((seg & _U(PTE_PFN_MASK)) >> _U(PAGE_SHIFT)).astype(np.int64)
    out = np.full(n, -1, np.int64)
    if ok.any():
        seg[ok] |= _U(bits)
        out[ok] = ((seg[ok] & _U(PTE_PFN_MASK)) >> _U(PAGE_SHIFT)).astype(np.int64)
    return out


def _walk_span(mm: MM, addr: int, n: int, write: bool) -> npt.NDArray[np.int64]:
    """:func:`_walk` of the pmds covering ``[addr, addr + n pages)`` (within one pud) in
    order, stopping after the first one with a page that would fault: returns the pfns of
    the pages of the pmds walked (-1 where a page would fault), as many pages as the
    one-pmd-at-a-time loop would look at before its first fault. Pte tables whose pages
    all allow the access are read straight from the pmd table."""
    end_pmd = min(n, (((addr + PMD_SIZE) & ~(PMD_SIZE - 1)) - addr) >> PAGE_SHIFT)
    pmd = mm.pmd_ref(addr)
    if pmd is None or end_pmd == n:
        return _walk(mm, addr, end_pmd, write)
    need = _U(_PAGE_PRESENT | (_PAGE_RW if write else 0))
    bits = _U(_PAGE_ACCESSED | (_PAGE_DIRTY if write else 0))
    pmd_tbl, idx = pmd.tbl, pmd.idx
    pt = mm.sys.pt
    out = np.empty(n, np.int64)
    done = 0
    while done < n:
        a = addr + (done << PAGE_SHIFT)
        m = min(n - done, (((a + PMD_SIZE) & ~(PMD_SIZE - 1)) - a) >> PAGE_SHIFT)
        e = int(pmd_tbl[idx])
        if e & _PAGE_PRESENT and not pmd_leaf(e):
            i0 = pte_index(a)
            seg = pt.table(table_id(e))[i0:i0 + m]
            if bool(((seg & need) == need).all()):
                seg |= bits
                np.right_shift(seg & _U(PTE_PFN_MASK), _U(PAGE_SHIFT), out=out[done:done + m], casting="unsafe")
                done += m
                idx += 1
                continue
        got = _walk(mm, a, m, write)
        out[done:done + m] = got
        done += m
        if bool((got < 0).any()):
            break
        idx += 1
    return out[:done]


def do_user_addr_fault(mm: MM, addr: int, write: bool, npages: int = 1) -> tuple[int, int, int]:
    """``do_user_addr_fault()`` for the pages ``[addr, addr + npages)`` (one VMA is found
    for *addr*; the run is cut at its end).

    Returns ``(signal or 0, pages faulted in before the failing one, pages that fail
    alike)``: without a VMA, or in a VMA that forbids the access, every page up to the
    next VMA (or the end of this one) raises the same SIGSEGV and changes nothing.

    A fault that dropped mmap_lock (``VM_FAULT_RETRY``: a userfaultfd answered it) returns
    with the pages before it done; the caller's access loop retries the page (with
    FAULT_FLAG_TRIED in the kernel), taking the lock again."""
    mmap_read_lock(mm)
    locked = True
    try:
        vma = mm.find_vma(addr)
        end = addr + (npages << PAGE_SHIFT)
        if vma is None or vma.vm_start > addr:
            stop = min(end, vma.vm_start) if vma is not None else end
            return SIGSEGV, 0, (stop - addr) >> PAGE_SHIFT
        if (write and not vma.vm_flags & VM_WRITE) or (not write and not vma_is_accessible(vma)):
            return SIGSEGV, 0, (min(end, vma.vm_end) - addr) >> PAGE_SHIFT
        end = min(end, vma.vm_end)
        flags = FAULT_FLAG_DEFAULT | FAULT_FLAG_USER | (FAULT_FLAG_WRITE if write else 0)
        ret, fail = handle_mm_fault_range(vma, addr, end, flags)
        done = (fail - addr) >> PAGE_SHIFT
        if ret & (VM_FAULT_RETRY | VM_FAULT_COMPLETED):
            locked = False
            return 0, done, 0
        if not ret & VM_FAULT_ERROR:
            return 0, done, 0
        mm.sys.stats.add("fault.user_error")
        if ret & VM_FAULT_OOM:
            return SIGKILL, done, 1
        if ret & (VM_FAULT_SIGBUS | VM_FAULT_HWPOISON | VM_FAULT_HWPOISON_LARGE):
            return SIGBUS, done, 1
        if ret & VM_FAULT_SIGSEGV:
            return SIGSEGV, done, 1
        raise AssertionError(f"unexpected fault result {ret:#x}")
    finally:
        if locked:
            mmap_read_unlock(mm)


#: a run of pages whose access raised a signal: (first page index, number of pages, signal)
SigRun = tuple[int, int, int]


def translate_range(mm: MM, addr: int, npages: int, write: bool,
                    stop_at_signal: bool = False) -> tuple[npt.NDArray[np.int64], list[SigRun]]:
    """Access every page of ``[addr, addr + npages)`` in order, as a CPU loop would.

    Returns ``(pfns, signals)``: the pfn each page was accessed through (-1 for pages
    whose access raised a signal) and the runs of such pages as ``(first page, count,
    signal)``. A page's access is retried after each successful fault until the MMU
    accepts it; a ``SIGKILL`` (out of memory) ends the loop, and so does any signal with
    *stop_at_signal* (a ``memcpy`` that dies at the first bad page: later pages are not
    touched)."""
    pfns = np.full(npages, -1, np.int64)
    sigs: list[SigRun] = []
    i = 0
    retries = 0
    pending, pending_n, pending_sig = -1, 0, 0  # pages known to raise a signal
    while i < npages:
        if i == pending:
            n_fail = min(pending_n, npages - i)
            if sigs and sigs[-1][0] + sigs[-1][1] == i and sigs[-1][2] == pending_sig:
                sigs[-1] = (sigs[-1][0], sigs[-1][1] + n_fail, pending_sig)
            else:
                sigs.append((i, n_fail, pending_sig))
            if pending_sig == SIGKILL or stop_at_signal:
                break
            pending = -1
            i += n_fail
            retries = 0
            continue
        a = addr + (i << PAGE_SHIFT)
        n = min(npages - i, (((a + PUD_SIZE) & ~(PUD_SIZE - 1)) - a) >> PAGE_SHIFT)
        if pending > i:
            n = min(n, pending - i)
        got = _walk_span(mm, a, n, write)
        n = len(got)
        bad = np.flatnonzero(got < 0)
        k = int(bad[0]) if len(bad) else n
        pfns[i:i + k] = got[:k]
        i += k
        if k:
            retries = 0
        if k == n:
            continue
        ok_after = np.flatnonzero(got[k:] >= 0)  # the bad pages from k on: [k, contig)
        contig = k + int(ok_after[0]) if len(ok_after) else n
        # fault the run of pages known to fault (those after it were not looked at yet:
        # an accessible one must not be faulted, as the CPU would not fault it)
        sig, done, nfail = do_user_addr_fault(mm, a + (k << PAGE_SHIFT), write, contig - k)
        if sig:
            pending, pending_n, pending_sig = i + done, nfail, sig
            continue
        retries += 1
        if retries > _MAX_RETRIES:
            raise AssertionError(f"fault at {a + (k << PAGE_SHIFT):#x} does not resolve")
    return pfns, sigs


def translate(mm: MM, addr: int, write: bool) -> int:
    """One page: its pfn, or ``-signal`` if the access raises a signal."""
    pfns, sigs = translate_range(mm, addr & ~(PAGE_SIZE - 1), 1, write)
    return -sigs[0][2] if sigs else int(pfns[0])



# -- data ---------------------------------------------------------------------------------------
def user_read_pages(mm: MM, addr: int, npages: int) -> tuple[npt.NDArray[np.uint8], list[SigRun]]:
    """The CPU reads whole pages ``[addr, addr + npages)``: returns their bytes (zeros for
    pages that raised a signal) and the signal runs."""
    pfns, sigs = translate_range(mm, addr, npages, write=False)
    out = np.zeros((npages, PAGE_SIZE), np.uint8)
    ok = pfns >= 0
    if ok.all():
        mm.sys.mem.read_pages(pfns, out)
    elif ok.any():
        out[ok] = mm.sys.mem.data[pfns[ok]]
    return out.reshape(-1), sigs


def user_write_pages(mm: MM, addr: int, data: npt.NDArray[np.uint8]) -> list[SigRun]:
    """The CPU writes whole pages (``len(data)`` a multiple of PAGE_SIZE) at *addr*; pages
    that raise a signal are skipped. Returns the signal runs."""
    npages = len(data) // PAGE_SIZE
    pfns, sigs = translate_range(mm, addr, npages, write=True)
    ok = pfns >= 0
    if ok.all():
        mm.sys.mem.write_pages(pfns, data)
    elif ok.any():
        mem = mm.sys.mem
        mem.data[pfns[ok]] = data.reshape(npages, PAGE_SIZE)[ok]
        mem.mark_written(pfns[ok])
    return sigs


def _span(addr: int, n: int) -> tuple[int, int]:
    first = addr & ~(PAGE_SIZE - 1)
    last = (addr + n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    return first, (last - first) >> PAGE_SHIFT


def _page_slices(addr: int, n: int, npages: int) -> tuple[int, int, int]:
    """For a copy of *n* bytes at *addr* over *npages* pages: (bytes in the first page,
    index of the first whole page, number of whole pages in the middle)."""
    off = addr & (PAGE_SIZE - 1)
    head = min(n, PAGE_SIZE - off) if off else 0
    first_whole = 1 if off else 0
    whole = (n - head) >> PAGE_SHIFT
    return head, first_whole, whole


def user_copy(mm: MM, addr: int, buf: npt.NDArray[np.uint8], to_user: bool) -> tuple[int, list[SigRun]]:
    """Copy *buf* to (or fill it from) user memory at *addr*, page by page in order,
    faulting pages in, like ``memcpy`` on the CPU; stops at the first page that cannot be
    accessed. Returns the number of bytes not copied and the signal that stopped it (as
    a one-run list, pages counted from ``addr``'s page; empty if all was copied)."""
    n = len(buf)
    if n == 0:
        return 0, []
    first, npages = _span(addr, n)
    pfns, sigs = translate_range(mm, first, npages, write=to_user, stop_at_signal=True)
    stop = sigs[0][0] if sigs else npages
    mem = mm.sys.mem
    data = mem.data
    off = addr - first
    head, fw, whole = _page_slices(addr, n, npages)
    done = 0
    if head and stop > 0:  # a partial first page
        if to_user:
            data[pfns[0], off:off + head] = buf[:head]
        else:
            buf[:head] = data[pfns[0], off:off + head]
        done = head
    w = max(0, min(whole, stop - fw))
    if w:  # whole pages, a run at a time
        seg = buf[done:done + (w << PAGE_SHIFT)]
        if to_user:
            mem.write_pages(pfns[fw:fw + w], seg)
        else:
            mem.read_pages(pfns[fw:fw + w], seg)
        done += w << PAGE_SHIFT
    tail = fw + whole
    if done < n and tail < stop and w == whole:  # a partial last page
        if to_user:
            data[pfns[tail], :n - done] = buf[done:]
        else:
            buf[done:] = data[pfns[tail], :n - done]
        done = n
    if to_user and stop:
        mem.mark_written(pfns[:stop])
    return n - done, sigs


def copy_to_user(mm: MM, addr: int, data: npt.NDArray[np.uint8] | bytes) -> int:
    """``copy_to_user()``: kernel writes *data* to user address *addr*, faulting pages in.
    Returns the number of bytes not copied (0 on success)."""
    buf = np.frombuffer(bytes(data), np.uint8) if isinstance(data, (bytes, bytearray)) else data.reshape(-1).view(np.uint8)
    return user_copy(mm, addr, buf, to_user=True)[0]


def copy_pages_to_user(mm: MM, addr: int, src_pfns: npt.NDArray[np.int64]) -> int:
    """``copy_to_user()`` of whole pages whose contents are the frames *src_pfns*, to the
    page-aligned user address *addr*: frame to frame, with no kernel-side copy of the
    bytes. Stops at the first page that cannot be written, like :func:`user_copy`.
    Returns the number of bytes not copied."""
    n = len(src_pfns)
    if n == 0:
        return 0
    assert not addr & (PAGE_SIZE - 1)
    pfns, sigs = translate_range(mm, addr, n, write=True, stop_at_signal=True)
    stop = sigs[0][0] if sigs else n
    if stop:
        mm.sys.mem.copy_pages(pfns[:stop], src_pfns[:stop])
    return (n - stop) << PAGE_SHIFT


def copy_from_user(mm: MM, addr: int, n: int) -> tuple[npt.NDArray[np.uint8], int]:
    """``copy_from_user()``: read *n* bytes at user address *addr*. Returns the bytes
    (zero-filled past a fault) and the number of bytes not copied."""
    out = np.zeros(n, np.uint8)
    return out, user_copy(mm, addr, out, to_user=False)[0]
