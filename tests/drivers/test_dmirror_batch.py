"""``drivers/dmirror_batch.py``: dmirror's whole-THP windows moved at once must leave
exactly what the per-window ``migrate_vma_*`` rounds leave.

Each machine runs the same random program twice, with the batch and without it
(``dmirror_batch.ENABLED``), and every observable is compared: the ioctls' return values
and ``cpages``, every ``struct page`` array and the page contents, every page table, the
allocator, each device's free lists, counters and backing owners, each dmirror's page
table, the pagemaps' use counts, the notifiers' sequence numbers, rss and every Stats
counter. The programs mix windows the batch takes (exclusive PMD-mapped THPs, device
PMDs) with every kind it must leave to the rounds (fork-shared THPs, split PMDs, 4 KiB
pages, holes, read-only and write-protected mappings, another device's notifier,
FAIL_ALLOC, a device or RAM running out, unaligned commands).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from hmmsim import System
from hmmsim.drivers import dmirror_batch
from hmmsim.drivers.test_hmm_uapi import (
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_READ,
    HmmDmirrorCmd,
)
from hmmsim.errors import BusError, Killed, SegmentationFault
from hmmsim.kernel.bug import KernelOops
from hmmsim.kernel.page_types import PAGE_SIZE

W = 2 << 20  # one window: a PMD
NWIN = 8


def _state(s: System, log: list[Any]) -> dict[str, Any]:
    """Everything a user or a later command could see (the arrays themselves: each run
    has its own System)."""
    mem = s.mem
    st: dict[str, Any] = {"log": log, "stats": s.stats.snapshot()}
    for name, v in vars(mem).items():
        if isinstance(v, np.ndarray):
            st[f"mem.{name}"] = v
        elif isinstance(v, (int, float)):
            st[f"mem.{name}"] = v
    st["pt"] = list(s.pt._blocks)
    st["pt_levels"] = s.pt.level
    st["pgmaps"] = [(pg.start_pfn, pg.nr_used) if pg is not None else None for pg in s.pgmaps]
    for i, dev in enumerate(s.dmirror_devices):
        st[f"dev{i}"] = (list(dev.free_pages), list(dev.free_folios), dev.calloc, dev.cfree, len(dev.chunks),
                         dev.backing_owner)
        for j, dm in enumerate(o for o in dev.owners if o is not None):
            st[f"dev{i}.dmirror{j}"] = dict(dm.pt.leaves)
    for t in s.tasks if hasattr(s, "tasks") else []:
        mm = getattr(t, "mm", None)
        if mm is not None:
            st[f"rss{t.pid}"] = list(mm.rss)
            subs = mm.notifier_subscriptions
            if subs is not None:
                st[f"seq{t.pid}"] = (subs.invalidate_seq, [n.invalidate_seq for n in subs.itree])
    return st


def _run(seed: int, batch: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(dmirror_batch, "ENABLED", batch)
    rng = random.Random(seed)
    busy = seed % 2 == 1
    kernel = "6.12" if seed % 4 == 3 else "7.3"
    s = System(kernel=kernel, ram=rng.choice([64, 80, 128]) << 20, hugetlb_pages=0)
    p = s.spawn()
    size = NWIN * W
    a = p.mmap(size)
    assert a % W == 0
    if seed % 3 != 2:  # else 4 KiB pages only (until a fault of a THP-eligible range)
        p.madvise(a, size, "hugepage")
    p.write(a, np.arange(size // 8, dtype=np.uint64) * np.uint64(seed + 3))
    devs = [p.open_device(0)]
    child = None
    log: list[Any] = []

    def rng_range() -> tuple[int, int]:
        if rng.random() < 0.4:
            return a, size // PAGE_SIZE
        w0 = rng.randrange(NWIN)
        w1 = rng.randrange(w0 + 1, NWIN + 1)
        lo, hi = a + w0 * W, a + w1 * W
        if rng.random() < 0.15:
            lo += PAGE_SIZE * rng.randrange(1, 512)
        return lo, (hi - lo) // PAGE_SIZE

    for _ in range(rng.randrange(10, 22)):
        try:
            child = _step(rng, p, a, size, devs, child, log, rng_range, busy)
        except (KernelOops, Killed) as e:  # a 7.3 crash (conventions item 27), the OOM killer
            log.append(("end", type(e).__name__, str(e)))
            return _state(s, log)
    p.mprotect(a, size, "rw")
    try:
        for d in devs:  # everything back (a page-by-page CPU fault would do the same, slowly)
            cmd = HmmDmirrorCmd(addr=a, npages=size // PAGE_SIZE)
            log.append(("to_sys", 0, size // PAGE_SIZE, d.ioctl(HMM_DMIRROR_MIGRATE_TO_SYS, cmd), cmd.cpages))
        log.append(("data", p.read(a, size)))
    except (KernelOops, Killed) as e:  # no room for the device's pages back in RAM
        log.append(("end", type(e).__name__, str(e)))
    s.check_invariants()
    return _state(s, log)


def _step(rng: random.Random, p: Any, a: int, size: int, devs: list[Any], child: Any, log: list[Any],
          rng_range: Any, busy: bool) -> Any:
    """One random operation of the program (a quiet program mostly migrates); returns the
    forked child (or None)."""
    op = rng.random()
    if not busy and rng.random() < 0.85:
        op *= 0.72  # migrations, CPU writes and reads only
    d = rng.choice(devs)
    if op < 0.35:
        lo, n = rng_range()
        buf = p.mmap(n * PAGE_SIZE)
        cmd = HmmDmirrorCmd(addr=lo, npages=n, ptr=buf)
        log.append(("to_dev", lo - a, n, d.ioctl(HMM_DMIRROR_MIGRATE_TO_DEV, cmd), cmd.cpages,
                    p.read(buf, 64), p.read(buf + n * PAGE_SIZE - 64, 64)))
        p.munmap(buf, n * PAGE_SIZE)
    elif op < 0.6:
        lo, n = rng_range()
        cmd = HmmDmirrorCmd(addr=lo, npages=n)
        log.append(("to_sys", lo - a, n, d.ioctl(HMM_DMIRROR_MIGRATE_TO_SYS, cmd), cmd.cpages))
    elif op < 0.67:
        off = rng.randrange(size // 8) * 8
        try:
            p.write(a + off, np.uint64(rng.randrange(1 << 40)).tobytes())
            log.append(("write", off))
        except (SegmentationFault, BusError) as e:  # a read-only window
            log.append(("write", off, type(e).__name__))
    elif op < 0.72:
        off = rng.randrange(size // 8) * 8
        log.append(("read", off, p.read(a + off, 8)))
    elif op < 0.77 and child is None:
        child = p.fork()
        log.append(("fork",))
    elif op < 0.8 and child is not None:
        child.exit()
        child = None
        log.append(("exit",))
    elif op < 0.85:
        w = rng.randrange(NWIN)
        prot = rng.choice(["r", "rw"])
        p.mprotect(a + w * W, W, prot)
        log.append(("mprotect", w, prot))
    elif op < 0.865:
        w = rng.randrange(NWIN)
        p.madvise(a + w * W + rng.randrange(512) * PAGE_SIZE, PAGE_SIZE, "dontneed")
        log.append(("dontneed", w))
    elif op < 0.88:  # NUMA-hint protnone entries (the rounds' business)
        w = rng.randrange(NWIN)
        p.numa_hint(a + w * W, W * rng.randrange(1, 3) if w < NWIN - 1 else W)
        log.append(("numa_hint", w))
    elif op < 0.92 and len(devs) < 3:
        devs.append(p.open_device(rng.choice([0, 1])))
        log.append(("open", len(devs)))
    elif op < 0.96:  # a device read (its notifier joins; device pages come back one by one)
        lo, n = a + rng.randrange(size // PAGE_SIZE - 64) * PAGE_SIZE, rng.randrange(1, 65)
        buf = p.mmap(n * PAGE_SIZE)
        cmd = HmmDmirrorCmd(addr=lo, npages=n, ptr=buf)
        log.append(("read_dev", d.ioctl(HMM_DMIRROR_READ, cmd), cmd.cpages))
        p.munmap(buf, n * PAGE_SIZE)
    else:
        log.append(("fail_alloc", d.ioctl(HMM_DMIRROR_FLAGS, HmmDmirrorCmd(npages=HMM_DMIRROR_FLAG_FAIL_ALLOC))))
    return child


def _same(x: Any, y: Any, where: str) -> None:
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            _same(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list) and all(type(u) is int for u in x):
        assert x == y, where
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _same(u, v, f"{where}[{i}]")
    elif isinstance(x, np.ndarray):
        bad = np.flatnonzero(x.reshape(-1) != y.reshape(-1)) if x.shape == y.shape else None
        assert bad is not None and len(bad) == 0, f"{where}: first difference at {None if bad is None else bad[:5]}"
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


@pytest.mark.parametrize("seed", range(20))
def test_dmirror_thp_batch_matches_the_rounds(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = dmirror_batch._count_rounds

    def counting(sys: Any, k: int, stats: Any, locks: Any) -> None:
        calls["n"] += k
        real(sys, k, stats, locks)

    monkeypatch.setattr(dmirror_batch, "_count_rounds", counting)
    with_batch = _run(seed, True, monkeypatch)
    batched = calls["n"]
    without = _run(seed, False, monkeypatch)
    assert calls["n"] == batched, "the rounds never batch"
    _same(with_batch, without, "state")


def _spy(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[int]:
    """Record how many windows each call of the batch functions *names* took."""
    done: list[int] = []
    for name in names:
        real = getattr(dmirror_batch, name)

        def spy(*args: Any, real: Any = real) -> int:
            k = real(*args)
            done.append(k)
            return k

        monkeypatch.setattr(dmirror_batch, name, spy)
    return done


def test_dmirror_thp_batch_takes_whole_thp_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain 1 GiB-aligned THP region goes through the batch after its first window,
    both ways, and the data comes back."""
    s = System(kernel="7.3", ram=256 << 20, hugetlb_pages=0)
    p = s.spawn()
    size = 16 * W
    a = p.mmap(size)
    p.madvise(a, size, "hugepage")
    p.write(a, np.arange(size // 8, dtype=np.uint64))
    d = p.open_device(0)
    done = _spy(monkeypatch, "dmirror_thp_batch_to_device", "dmirror_thp_batch_to_system")
    buf = p.mmap(size)
    cmd = HmmDmirrorCmd(addr=a, npages=size // PAGE_SIZE, ptr=buf)
    assert d.ioctl(HMM_DMIRROR_MIGRATE_TO_DEV, cmd) == 0 and cmd.cpages == size // PAGE_SIZE
    assert p.read(buf, size) == np.arange(size // 8, dtype=np.uint64).tobytes()
    back = HmmDmirrorCmd(addr=a, npages=size // PAGE_SIZE)
    assert d.ioctl(HMM_DMIRROR_MIGRATE_TO_SYS, back) == 0 and back.cpages == 16
    assert done == [15, 15]
    assert p.read(a, size) == np.arange(size // 8, dtype=np.uint64).tobytes()
    assert "pfn" in p.pte(a + 5 * W) and s.mem.order[s.mem.compound_head(int(p.pte(a + 5 * W).split()[1], 16))] == 9
    s.check_invariants()


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_dmirror_batch_takes_small_page_windows(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 KiB pages, the range one page past a PMD boundary (as scenario regions are): after
    the first window, every whole window goes at once both ways; the tail window and the
    read-back are the rounds'."""
    s = System(kernel=kernel, ram=128 << 20, hugetlb_pages=0)
    p = s.spawn()
    npages = 8 * 512 + 100
    a = p.mmap((npages + 1) * PAGE_SIZE) + PAGE_SIZE
    pattern = np.arange(npages * PAGE_SIZE // 8, dtype=np.uint64) * np.uint64(7)
    p.write(a, pattern)
    d = p.open_device(0)
    done = _spy(monkeypatch, "dmirror_batch_to_device", "dmirror_batch_to_system")
    buf = p.mmap(npages * PAGE_SIZE)
    cmd = HmmDmirrorCmd(addr=a, npages=npages, ptr=buf)
    assert d.ioctl(HMM_DMIRROR_MIGRATE_TO_DEV, cmd) == 0 and cmd.cpages == npages
    assert p.read(buf, npages * PAGE_SIZE) == pattern.tobytes()
    assert p.pte(a + 3 * W).startswith("device-private")
    back = HmmDmirrorCmd(addr=a, npages=npages)
    assert d.ioctl(HMM_DMIRROR_MIGRATE_TO_SYS, back) == 0 and back.cpages == npages
    assert done == [7, 0, 7, 0], done  # 7 windows at once, then the 100-page tail is a round
    assert p.read(a, npages * PAGE_SIZE) == pattern.tobytes()
    s.check_invariants()
