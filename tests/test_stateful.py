"""A Hypothesis state machine over processes, mappings and a mirroring device.

The oracle is deliberately simple: the bytes every page should hold (private anonymous
and shared anonymous regions), which pages are mapped and with which protection. Every
step must keep the data, the return codes and the machine's invariants (frames,
refcounts, mapcounts, rss, page tables, locks) right.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from hmmsim import BadAddress, PermissionDenied, SegmentationFault, System
from hmmsim.drivers.test_hmm_uapi import HMM_DMIRROR_PROT_ERROR
from hmmsim.kernel.page_types import PAGE_SIZE as P

PMD = 512
SLOTS = 0x2000_0000_0000


class Region:
    """What a region should hold: per page, its content (an int tag; 0 = zeros), whether
    it is mapped, and its protection."""

    def __init__(self, addr: int, npages: int, shared: bool) -> None:
        self.addr = addr
        self.npages = npages
        self.shared = shared
        self.tag = [0] * npages
        self.mapped = [True] * npages
        self.prot = ["rw"] * npages

    def page_bytes(self, i: int) -> bytes:
        t = self.tag[i]
        return bytes(P) if t == 0 else np.full(P // 4, t, np.uint32).tobytes()


class HmmMachine(RuleBasedStateMachine):
    regions = Bundle("regions")

    @initialize()
    def boot(self) -> None:
        self.sys = System(ram=256 << 20, hugetlb_pages=4)
        self.p = self.sys.spawn()
        self.dev = self.p.open_device(0)
        self.next_tag = 1
        self.all: list[Region] = []

    def teardown(self) -> None:
        if hasattr(self, "sys"):
            self.dev.close()
            self.p.exit()
            self.sys.ls.assert_no_locks()
            self.sys.check_invariants(full=True)

    @rule(target=regions, npages=st.integers(1, 40), shared=st.booleans(), thp=st.booleans())
    def mmap(self, npages: int, shared: bool, thp: bool) -> Region:
        # every region in its own 1 GiB slot (2 MiB aligned), so that no later mapping
        # reuses a hole of an earlier one
        slot = SLOTS + len(self.all) * (1 << 30)
        if thp and not shared:
            npages += PMD  # at least one whole 2 MiB block: THP-eligible
        a = self.p.mmap(npages * P, shared=shared, addr=slot, noreplace=True)
        if thp and not shared:
            self.p.madvise(a, npages * P, "hugepage")
        r = Region(a, npages, shared)
        self.all.append(r)
        return r

    @rule(r=regions, data=st.data())
    def cpu_write(self, r: Region, data: st.DataObject) -> None:
        off = data.draw(st.integers(0, r.npages - 1))
        n = data.draw(st.integers(1, r.npages - off))
        tag = self.next_tag
        self.next_tag += 1
        good = [r.mapped[off + i] and r.prot[off + i] == "rw" for i in range(n)]
        done = good.index(False) if False in good else n  # like memcpy: up to the first bad page
        buf = np.full(n * P // 4, tag, np.uint32)
        try:
            self.p.write(r.addr + off * P, buf)
            assert done == n, "a write to an unmapped or read-only page must fault"
        except SegmentationFault as e:
            assert done < n and e.addr == r.addr + (off + done) * P
        for i in range(done):
            r.tag[off + i] = tag

    @rule(r=regions, data=st.data())
    def munmap(self, r: Region, data: st.DataObject) -> None:
        off = data.draw(st.integers(0, r.npages - 1))
        n = data.draw(st.integers(1, r.npages - off))
        self.p.munmap(r.addr + off * P, n * P)
        for i in range(off, off + n):
            r.mapped[i] = False
            r.tag[i] = 0

    @rule(r=regions, data=st.data(), prot=st.sampled_from(["none", "r", "rw"]))
    def mprotect(self, r: Region, data: st.DataObject, prot: str) -> None:
        off = data.draw(st.integers(0, r.npages - 1))
        n = data.draw(st.integers(1, r.npages - off))
        span = range(off, off + n)
        try:
            self.p.mprotect(r.addr + off * P, n * P, prot)
            assert all(r.mapped[i] for i in span)
        except Exception:  # -ENOMEM over a hole: pages up to the hole were changed
            assert not all(r.mapped[i] for i in span)
            for i in span:
                if not r.mapped[i]:
                    break
                r.prot[i] = prot
            return
        for i in span:
            r.prot[i] = prot

    @rule(r=regions, data=st.data())
    def dontneed(self, r: Region, data: st.DataObject) -> None:
        off = data.draw(st.integers(0, r.npages - 1))
        n = data.draw(st.integers(1, r.npages - off))
        try:
            self.p.madvise(r.addr + off * P, n * P, "dontneed")
        except Exception:
            assert not all(r.mapped[i] for i in range(off, off + n))
        if not r.shared:  # private anon: zero-fill on next touch; shared: shmem keeps data
            for i in range(off, off + n):
                if r.mapped[i]:
                    r.tag[i] = 0

    @rule(r=regions)
    def device_read(self, r: Region) -> None:
        readable = all(m and p != "none" for m, p in zip(r.mapped, r.prot))
        try:
            res = self.dev.read(r.addr, r.npages)
        except BadAddress:
            assert not readable
            return
        assert readable and res.cpages == r.npages
        assert res.data.tobytes() == b"".join(r.page_bytes(i) for i in range(r.npages))

    @rule(r=regions)
    def device_write(self, r: Region) -> None:
        tag = self.next_tag
        self.next_tag += 1
        # hmm_range_fault() walks in address order and fails at the first page that
        # needs a write fault it cannot take: -EPERM in a VMA without VM_WRITE
        # (hmm_vma_fault), -EFAULT in a hole or a VMA without VM_READ (the "none" pages)
        first_bad = next((i for i in range(r.npages) if not (r.mapped[i] and r.prot[i] == "rw")), None)
        try:
            res = self.dev.write(r.addr, np.full(r.npages * P // 4, tag, np.uint32))
        except PermissionDenied:
            assert first_bad is not None and r.mapped[first_bad] and r.prot[first_bad] == "r"
            self._after_failed_write(r, tag)
            return
        except BadAddress:
            assert first_bad is not None and (not r.mapped[first_bad] or r.prot[first_bad] == "none")
            self._after_failed_write(r, tag)
            return
        assert first_bad is None and res.cpages == r.npages
        r.tag = [tag] * r.npages

    def _after_failed_write(self, r: Region, tag: int) -> None:
        """A failed device WRITE has still written the pages it already mirrored writable
        before the first page that needed a fault (conventions section 8): every page
        holds its old content or the new data, and written pages form a prefix."""
        written_prefix = True
        for i in range(r.npages):
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

    @rule(r=regions)
    def snapshot(self, r: Region) -> None:
        snap = self.dev.snapshot(r.addr, r.npages).tolist()
        for i in range(r.npages):
            if not r.mapped[i] or r.prot[i] == "none":
                assert snap[i] == HMM_DMIRROR_PROT_ERROR
            else:
                assert snap[i] != HMM_DMIRROR_PROT_ERROR
                if r.prot[i] == "r":
                    assert snap[i] & 0x02 == 0, "no WRITE in a read-only VMA"

    @precondition(lambda self: len(self.all) > 0)
    @rule(data=st.data())
    def fork_child_writes(self, data: st.DataObject) -> None:
        r = data.draw(st.sampled_from(self.all))
        child = self.p.fork()
        tag = self.next_tag
        self.next_tag += 1
        writable = [i for i in range(r.npages) if r.mapped[i] and r.prot[i] == "rw"]
        for i in writable:
            child.write(r.addr + i * P, np.full(P // 4, tag, np.uint32))
        child.exit()
        if r.shared:
            for i in writable:
                r.tag[i] = tag

    @invariant()
    def memory_matches(self) -> None:
        if not hasattr(self, "sys"):
            return
        for r in self.all:
            i = 0
            while i < r.npages:  # runs of readable pages, read at once
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


#: ``pytest --hypothesis-long`` (or HMMSIM_HYPOTHESIS_LONG=1): a budget for finding bugs
#: (minutes, random); the default is a small fixed one that keeps the suite fast
LONG = os.environ.get("HMMSIM_HYPOTHESIS_LONG", "") not in ("", "0")

TestHmmMachine = HmmMachine.TestCase
TestHmmMachine.settings = (
    settings(max_examples=400, stateful_step_count=50, deadline=None, derandomize=False) if LONG
    else settings(max_examples=20, stateful_step_count=20, deadline=None, derandomize=True))


class _Draws:
    """Stands in for hypothesis' ``data`` to replay a fixed sequence of draws."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)

    def draw(self, _strategy: object) -> int:
        return self.values.pop(0)


def test_device_write_over_read_only_then_prot_none_is_eperm() -> None:
    """The case the machine once failed on: a device WRITE over pages [r, none] fails with
    -EPERM at the read-only page (hmm_vma_fault), before the walk reaches the "none" page."""
    m = HmmMachine()
    m.boot()
    try:
        r = HmmMachine.mmap(m, npages=2, shared=False, thp=False)
        HmmMachine.mprotect(m, r, _Draws(0, 1), "r")
        HmmMachine.mprotect(m, r, _Draws(1, 1), "none")
        HmmMachine.device_write(m, r)
        m.memory_matches()
    finally:
        m.teardown()
