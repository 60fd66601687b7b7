"""A Hypothesis state machine over device memory, on both kernels.

A few private anonymous regions of one process, and handles on a private device (two
handles), a second private device and a coherent device. Random steps: mmap, munmap,
mprotect, MADV_DONTNEED / MADV_FREE, mremap (move, grow, MREMAP_DONTUNMAP), CPU writes and
reads, fork (the child writes its copy, reads, migrates through the inherited handle,
opens a handle of its own and exits, which evicts that device), and every dmirror
command: READ, WRITE, SNAPSHOT, MIGRATE_TO_DEV, MIGRATE_TO_SYS, RELEASE, FLAGS
(FAIL_ALLOC under 7.3), close/reopen.

The oracle is a plain model of what the CPU must see: per page, a tag (the word every
int32 of the page holds; 0 = zeros), whether it is mapped and its protection. Wherever
pages live (system memory, a private device behind a device-private entry, a coherent
device), after every step the CPU reads exactly what the oracle says, and
``System.check_invariants()`` holds (no frame lost or double-owned, refcounts and
mapcounts match, device free lists right) with no lock held.

Device READ/WRITE through a private device of a range holding that device's own
device-private pages is not drawn: the real kernels oops there (conventions items 25/26,
tested in ``tests/scenario/test_device_oops.py``).

Budget: a small fixed one in the suite; ``pytest --hypothesis-long`` (or
``HMMSIM_HYPOTHESIS_LONG=1``) runs a large random one.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hmmsim import SegmentationFault, System
from hmmsim.drivers.test_hmm_uapi import (
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_RELEASE,
    HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE,
    HmmDmirrorCmd,
)
from hmmsim.kernel.errno import EFAULT, EINVAL, ENOENT, EPERM
from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.pgtable import is_swap_pte, pte_pfn, pte_present, pte_to_swp_entry, swp_offset_pfn
from hmmsim.process import Process

SLOTS = 0x2000_0000_0000
SLOT = 1 << 30
#: the device commands' buffer: one fixed mapping far from the regions (its own munmap
#: would invalidate mirror entries one page past it)
BUF = 0x3000_0000_0000
BUF_PAGES = 64
MAX_PAGES = 24
#: the handles: name -> device minor (two handles on private device 0)
HANDLES = {"p0": 0, "p0b": 0, "p1": 1, "c2": 2}


class Region:
    """What a region must hold, per page: tag (0 = zeros), mapped, protection."""

    def __init__(self, addr: int, npages: int) -> None:
        self.addr = addr
        self.npages = npages
        self.tag = [0] * npages
        self.mapped = [True] * npages
        self.prot = ["rw"] * npages

    def page_bytes(self, i: int) -> bytes:
        return np.full(P // 4, self.tag[i], np.uint32).tobytes()

    def readable(self, off: int, n: int) -> bool:
        return all(self.mapped[i] and self.prot[i] != "none" for i in range(off, off + n))


def device_minor_of(proc: Process, addr: int) -> int | None:
    """The dmirror device whose memory backs *addr* (a device-private entry or a present
    coherent page), else None."""
    sys = proc.system
    pte = int(proc.mm.lookup_pte(addr) or 0)
    if pte_present(pte):
        pfn = pte_pfn(pte)
    elif pte and is_swap_pte(pte):
        pfn = swp_offset_pfn(pte_to_swp_entry(pte))
    else:
        return None
    pg = sys.pgmap_of(pfn)
    return pg.owner.minor if pg is not None else None


class DeviceMachine(RuleBasedStateMachine):
    kernel = "7.3"

    @initialize()
    def boot(self) -> None:
        self.sys = System(kernel=self.kernel, ram=256 << 20, hugetlb_pages=0)
        self.p = self.sys.spawn("prop")
        assert self.p.mmap(BUF_PAGES * P, addr=BUF, noreplace=True) == BUF
        self.fds = {h: self.p.open_device(m).fd for h, m in HANDLES.items()}
        self.fail_alloc = dict.fromkeys(HANDLES, False)
        self.regions: list[Region] = []
        self.nslots = 0
        self.next_tag = 1

    def teardown(self) -> None:
        if hasattr(self, "sys"):
            self.p.exit()
            self.sys.ls.assert_no_locks()
            self.sys.check_invariants(full=True)

    # -- helpers ---------------------------------------------------------------------------
    def _slot(self) -> int:
        self.nslots += 1
        return SLOTS + self.nslots * SLOT + P  # one page past 2 MiB: never PMD-aligned

    def _range(self, data: st.DataObject, r: Region) -> tuple[int, int]:
        off = data.draw(st.integers(0, r.npages - 1), label="off")
        n = data.draw(st.integers(1, r.npages - off), label="n")
        return off, n

    def _tag(self) -> int:
        self.next_tag += 1
        return self.next_tag

    def _ioctl(self, proc: Process, fd: int, command: int, addr: int, npages: int) -> HmmDmirrorCmd | int:
        cmd = HmmDmirrorCmd(addr=addr, ptr=BUF, npages=npages)
        ret = proc.task.ioctl(fd, command, cmd)
        return ret if ret else cmd

    def _own_private_pages(self, h: str, r: Region, off: int, n: int) -> bool:
        """True if a page of the range is a device-private page of *h*'s device (a device
        READ/WRITE through it would oops the real kernels: not drawn)."""
        minor = HANDLES[h]
        return minor < 2 and any(r.mapped[i] and device_minor_of(self.p, r.addr + i * P) == minor
                                 for i in range(off, off + n))

    def _any_device_page(self, r: Region, off: int, n: int) -> bool:
        return any(r.mapped[i] and device_minor_of(self.p, r.addr + i * P) is not None for i in range(off, off + n))

    # -- address space ---------------------------------------------------------------------
    @precondition(lambda self: len(self.regions) < 4)
    @rule(npages=st.integers(1, MAX_PAGES))
    def mmap(self, npages: int) -> None:
        a = self.p.mmap(npages * P, addr=self._slot(), noreplace=True)
        self.regions.append(Region(a, npages))

    @precondition(lambda self: self.regions)
    @rule(data=st.data())
    def munmap(self, data: st.DataObject) -> None:
        r = data.draw(st.sampled_from(self.regions))
        off, n = self._range(data, r)
        self.p.munmap(r.addr + off * P, n * P)
        for i in range(off, off + n):
            r.mapped[i], r.tag[i] = False, 0

    @precondition(lambda self: self.regions)
    @rule(data=st.data(), prot=st.sampled_from(["none", "r", "rw"]))
    def mprotect(self, data: st.DataObject, prot: str) -> None:
        r = data.draw(st.sampled_from(self.regions))
        off, n = self._range(data, r)
        try:
            self.p.mprotect(r.addr + off * P, n * P, prot)
            assert all(r.mapped[i] for i in range(off, off + n))
            done = n
        except Exception:  # -ENOMEM at a hole: the pages before it were changed
            assert not all(r.mapped[i] for i in range(off, off + n))
            done = r.mapped[off:off + n].index(False)
        for i in range(off, off + done):
            r.prot[i] = prot

    @precondition(lambda self: self.regions)
    @rule(data=st.data(), advice=st.sampled_from(["dontneed", "free"]))
    def madvise(self, data: st.DataObject, advice: str) -> None:
        r = data.draw(st.sampled_from(self.regions))
        off, n = self._range(data, r)
        try:
            self.p.madvise(r.addr + off * P, n * P, advice)
            ok = True
        except Exception:  # -ENOMEM over a hole (the mapped pages are still advised)
            ok = False
        assert ok == all(r.mapped[i] for i in range(off, off + n))
        if advice == "dontneed":
            # private anonymous: zero-fill on next touch, device pages included. (FREE
            # keeps the data until reclaim, which never runs here; device pages skip it.)
            for i in range(off, off + n):
                if r.mapped[i]:
                    r.tag[i] = 0

    @precondition(lambda self: self.regions and len(self.regions) < 6)
    @rule(data=st.data(), grow=st.integers(0, 3), dontunmap=st.booleans())
    def mremap(self, data: st.DataObject, grow: int, dontunmap: bool) -> None:
        """Move the first pages of a region (all mapped, one protection: one VMA) to a new
        slot, growing it (not with DONTUNMAP, which needs equal sizes)."""
        r = data.draw(st.sampled_from(self.regions))
        n = data.draw(st.integers(1, r.npages), label="n")
        if not all(r.mapped[:n]) or len(set(r.prot[:n])) != 1:
            return
        if dontunmap:
            grow = 0
        new = self._slot()
        before = [(x.addr, list(x.tag)) for x in self.regions]
        try:
            got = self.p.mremap(r.addr, n * P, (n + grow) * P, new_addr=new, dontunmap=dontunmap)
        except Exception:
            # a private anon VMA split by earlier mprotects can still be one VMA here; a
            # failure must change nothing (the invariant reads everything back)
            assert [(x.addr, list(x.tag)) for x in self.regions] == before
            return
        assert got == new
        nr = Region(new, n + grow)
        nr.tag[:n] = r.tag[:n]
        nr.prot = [r.prot[0]] * (n + grow)
        self.regions.append(nr)
        for i in range(n):
            if dontunmap:
                r.tag[i] = 0  # the old range stays mapped, empty
            else:
                r.mapped[i], r.tag[i] = False, 0

    # -- CPU ----------------------------------------------------------------------------------
    @precondition(lambda self: self.regions)
    @rule(data=st.data())
    def cpu_write(self, data: st.DataObject) -> None:
        r = data.draw(st.sampled_from(self.regions))
        off, n = self._range(data, r)
        tag = self._tag()
        good = [r.mapped[off + i] and r.prot[off + i] == "rw" for i in range(n)]
        done = good.index(False) if False in good else n
        try:
            self.p.write(r.addr + off * P, np.full(n * P // 4, tag, np.uint32))
            assert done == n
        except SegmentationFault as e:
            assert done < n and e.addr == r.addr + (off + done) * P
        for i in range(off, off + done):
            r.tag[i] = tag

    @precondition(lambda self: self.regions)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        """A child: reads what the parent has, writes its own copy, migrates through an
        inherited handle (the parent's pages), maybe opens a handle of its own and
        migrates its copy there; then exits (its handle's release evicts that device)."""
        r = data.draw(st.sampled_from(self.regions))
        child = self.p.fork()
        try:
            off, n = self._range(data, r)
            if r.readable(off, n):
                got = child.read(r.addr + off * P, n * P)
                assert got == b"".join(r.page_bytes(i) for i in range(off, off + n))
            for _ in range(data.draw(st.integers(0, 3), label="steps")):
                what = data.draw(st.sampled_from(["write", "migrate_inherited", "own_handle"]), label="what")
                off, n = self._range(data, r)
                if what == "write" and all(r.mapped[i] and r.prot[i] == "rw" for i in range(off, off + n)):
                    child.write(r.addr + off * P, np.full(n * P // 4, self._tag(), np.uint32))
                elif what == "migrate_inherited":
                    h = data.draw(st.sampled_from(sorted(HANDLES)), label="h")
                    # the handle mirrors the parent's mm: the parent's pages move
                    self._ioctl(child, self.fds[h], HMM_DMIRROR_MIGRATE_TO_DEV, r.addr + off * P, n)
                elif what == "own_handle":
                    minor = data.draw(st.sampled_from([0, 1, 2]), label="minor")
                    fd = child.open_device(minor).fd
                    self._ioctl(child, fd, HMM_DMIRROR_MIGRATE_TO_DEV, r.addr + off * P, n)
        finally:
            child.exit()

    # -- device -------------------------------------------------------------------------------
    @precondition(lambda self: self.regions)
    @rule(data=st.data(), h=st.sampled_from(sorted(HANDLES)))
    def device_read(self, data: st.DataObject, h: str) -> None:
        r = data.draw(st.sampled_from(self.regions))
        off, n = self._range(data, r)
        if self._own_private_pages(h, r, off, n):
            return
        res = self._ioctl(self.p, self.fds[h], HMM_DMIRROR_READ, r.addr + off * P, n)
        if not r.readable(off, n):
            assert res == -EFAULT
            return
        assert isinstance(res, HmmDmirrorCmd) and res.cpages == n
        assert self.p.read(BUF, n * P) == b"".join(r.page_bytes(i) for i in range(off, off + n))

    @precondition(lambda self: self.regions)
    @rule(data=st.data(), h=st.sampled_from(sorted(HANDLES)))
    def device_write(self, data: st.DataObject, h: str) -> None:
        r = data.draw(st.sampled_from(self.regions))
        off, n = self._range(data, r)
        if self._own_private_pages(h, r, off, n):
            return
        tag = self._tag()
        self.p.write(BUF, np.full(n * P // 4, tag, np.uint32))
        first_bad = next((i for i in range(off, off + n) if not (r.mapped[i] and r.prot[i] == "rw")), None)
        res = self._ioctl(self.p, self.fds[h], HMM_DMIRROR_WRITE, r.addr + off * P, n)
        if first_bad is None:
            assert isinstance(res, HmmDmirrorCmd) and res.cpages == n, res
            for i in range(off, off + n):
                r.tag[i] = tag
            return
        # -EPERM at a read-only page (hmm_vma_fault), -EFAULT at a hole or PROT_NONE page;
        # pages already mirrored writable before the first fault are written anyway
        assert res == (-EPERM if r.mapped[first_bad] and r.prot[first_bad] == "r" else -EFAULT), res
        written_prefix = True
        for i in range(off, off + n):
            if not (r.mapped[i] and r.prot[i] != "none"):
                written_prefix = False
                continue
            got = self.p.read(r.addr + i * P, P)
            if got == np.full(P // 4, tag, np.uint32).tobytes():
                assert written_prefix, f"page {i} written after a page that was not"
                r.tag[i] = tag
            else:
                assert got == r.page_bytes(i), f"page {i} holds neither old nor new data"
                written_prefix = False

    @precondition(lambda self: self.regions)
    @rule(data=st.data(), h=st.sampled_from(sorted(HANDLES)))
    def snapshot(self, data: st.DataObject, h: str) -> None:
        r = data.draw(st.sampled_from(self.regions))
        off, n = self._range(data, r)
        res = self._ioctl(self.p, self.fds[h], HMM_DMIRROR_SNAPSHOT, r.addr + off * P, n)
        assert isinstance(res, HmmDmirrorCmd) and res.cpages == n
        snap = self.p.read(BUF, n)
        for k, i in enumerate(range(off, off + n)):
            if not r.mapped[i] or r.prot[i] == "none":
                assert snap[k] == HMM_DMIRROR_PROT_ERROR
            else:
                assert snap[k] != HMM_DMIRROR_PROT_ERROR
                if r.prot[i] == "r":
                    assert snap[k] & 0x02 == 0, "no WRITE in a read-only VMA"

    @precondition(lambda self: self.regions)
    @rule(data=st.data(), h=st.sampled_from(sorted(HANDLES)))
    def migrate_to_dev(self, data: st.DataObject, h: str) -> None:
        r = data.draw(st.sampled_from(self.regions))
        off, n = self._range(data, r)
        had_device_pages = self._any_device_page(r, off, n)
        fail_alloc = self.fail_alloc[h]
        res = self._ioctl(self.p, self.fds[h], HMM_DMIRROR_MIGRATE_TO_DEV, r.addr + off * P, n)
        self.fail_alloc[h] = bool(self.sys_dmirror(h).flags & HMM_DMIRROR_FLAG_FAIL_ALLOC)
        if not r.readable(off, n):
            assert res == -EINVAL, res  # the window loop stops at a hole or PROT_NONE page
            return
        if res == -ENOENT:
            # the read-back found a page not on this device: it was on a device already
            # (another device's, or this device's through another handle), or FAIL_ALLOC
            # refused an allocation
            assert had_device_pages or fail_alloc, "MIGRATE_TO_DEV left system pages behind"
            return
        assert isinstance(res, HmmDmirrorCmd) and res.cpages == n, res
        assert self.p.read(BUF, n * P) == b"".join(r.page_bytes(i) for i in range(off, off + n))
        minor = HANDLES[h]
        assert all(device_minor_of(self.p, r.addr + i * P) == minor for i in range(off, off + n))

    def sys_dmirror(self, h: str):  # noqa: ANN201
        return self.p.task.fget(self.fds[h]).private_data

    @precondition(lambda self: self.regions)
    @rule(data=st.data(), h=st.sampled_from(sorted(HANDLES)))
    def migrate_to_sys(self, data: st.DataObject, h: str) -> None:
        r = data.draw(st.sampled_from(self.regions))
        off, n = self._range(data, r)
        minor = HANDLES[h]
        mine = sum(1 for i in range(off, off + n) if r.mapped[i] and device_minor_of(self.p, r.addr + i * P) == minor)
        res = self._ioctl(self.p, self.fds[h], HMM_DMIRROR_MIGRATE_TO_SYS, r.addr + off * P, n)
        if not r.readable(off, n):
            assert res == -EINVAL, res
            return
        assert isinstance(res, HmmDmirrorCmd) and res.cpages == mine, (res, mine)
        assert not any(device_minor_of(self.p, r.addr + i * P) == minor for i in range(off, off + n))

    @rule(h=st.sampled_from(sorted(HANDLES)))
    def release(self, h: str) -> None:
        minor = HANDLES[h]
        assert self._ioctl(self.p, self.fds[h], HMM_DMIRROR_RELEASE, 0, 1) != -EINVAL
        assert not self.sys.dmirror_devices[minor].chunks
        for r in self.regions:
            assert not any(r.mapped[i] and device_minor_of(self.p, r.addr + i * P) == minor
                           for i in range(r.npages))

    @rule(h=st.sampled_from(sorted(HANDLES)))
    def fail_alloc_flag(self, h: str) -> None:
        ret = self._ioctl(self.p, self.fds[h], HMM_DMIRROR_FLAGS, 0, HMM_DMIRROR_FLAG_FAIL_ALLOC)
        if self.sys.profile.dmirror_flags_cmd:
            assert isinstance(ret, HmmDmirrorCmd)
            self.fail_alloc[h] = True
        else:
            assert ret == -EINVAL

    @rule(h=st.sampled_from(sorted(HANDLES)))
    def reopen(self, h: str) -> None:
        """close() (evicts the whole device) and open again."""
        self.p.close(self.fds[h])
        self.fds[h] = self.p.open_device(HANDLES[h]).fd
        self.fail_alloc[h] = False
        minor = HANDLES[h]
        for r in self.regions:
            assert not any(r.mapped[i] and device_minor_of(self.p, r.addr + i * P) == minor
                           for i in range(r.npages))

    # -- the oracle ----------------------------------------------------------------------------
    @invariant()
    def memory_matches(self) -> None:
        if not hasattr(self, "sys"):
            return
        for r in self.regions:
            i = 0
            while i < r.npages:
                if not (r.mapped[i] and r.prot[i] != "none"):
                    i += 1
                    continue
                j = i
                while j < r.npages and r.mapped[j] and r.prot[j] != "none":
                    j += 1
                got = self.p.read(r.addr + i * P, (j - i) * P)
                for k in range(i, j):
                    assert got[(k - i) * P:(k - i + 1) * P] == r.page_bytes(k), f"page {k} of region {r.addr:#x}"
                i = j
        self.sys.check_invariants(full=True)
        self.sys.ls.assert_no_locks()


#: ``pytest --hypothesis-long`` (or HMMSIM_HYPOTHESIS_LONG=1): a large random budget
LONG = os.environ.get("HMMSIM_HYPOTHESIS_LONG", "") not in ("", "0")
SETTINGS = (settings(max_examples=300, stateful_step_count=60, deadline=None, derandomize=False) if LONG
            else settings(max_examples=3, stateful_step_count=20, deadline=None, derandomize=True))


class DeviceMachine612(DeviceMachine):
    kernel = "6.12"


class DeviceMachine73(DeviceMachine):
    kernel = "7.3"


TestDeviceMachine612 = DeviceMachine612.TestCase
TestDeviceMachine612.settings = SETTINGS
TestDeviceMachine73 = DeviceMachine73.TestCase
TestDeviceMachine73.settings = SETTINGS


def test_the_oracle_sees_device_pages() -> None:
    """The helper the machine relies on tells device-private and coherent pages apart."""
    m = DeviceMachine73()
    m.boot()
    try:
        m.mmap(4)
        r = m.regions[0]
        m.p.write(r.addr, np.full(4 * P // 4, 7, np.uint32))
        r.tag = [7] * 4
        assert m._ioctl(m.p, m.fds["p1"], HMM_DMIRROR_MIGRATE_TO_DEV, r.addr, 2).cpages == 2
        assert m._ioctl(m.p, m.fds["c2"], HMM_DMIRROR_MIGRATE_TO_DEV, r.addr + 2 * P, 2).cpages == 2
        assert [device_minor_of(m.p, r.addr + i * P) for i in range(4)] == [1, 1, 2, 2]
        m.memory_matches()
    finally:
        m.teardown()


pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
