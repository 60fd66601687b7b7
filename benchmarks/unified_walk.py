"""The unified fault+migrate walk's claim, measured (issue 8, seed 003): the three ways a
driver can fault a range in and migrate it to device memory, on the same ranges.

* **A** ``hmm_range_fault()`` (fault what is missing) then ``migrate_vma_setup/pages/
  finalize``: always two walks of the range.
* **B** ``migrate_vma_*`` first; if it could not collect every page, ``hmm_range_fault()``
  for the pages it left (per-page requests through ``pfn_flags_mask``, the device's own
  pages reported, not faulted), then ``migrate_vma_*`` again: one walk when everything
  was collectable, three otherwise.
* **C** the unified walk on a ``System(kernel="7.3", migrate_on_fault=True)``, fault
  path: ``hmm_range_fault()`` with ``HMM_PFN_REQ_MIGRATE`` and ``range.migrate`` (one
  walk that faults and installs migration entries), ``migrate_hmm_range_setup()``, then
  the same allocate/copy/pages/finalize as A and B (``docs/unified-walk.md``);
* **Cm** the same walk through its migrate path: ``migrate_vma_setup()`` with
  ``MIGRATE_VMA_FAULT`` (read faults only: the walk asks ``HMM_PFN_REQ_FAULT``).

  Until that option exists in :mod:`hmmsim` the table says C is unavailable.

Each runs through the dmirror driver's own helpers (the device's page allocation and
copy, ``dmirror_migrate_alloc_and_copy``/``dmirror_migrate_finalize_and_map``), one
``migrate_vma`` window per page table (512 pages) as ``dmirror_migrate_to_device`` does,
holding mmap_lock (read) over each window, with an interval notifier for
``hmm_range_fault`` and its -EBUSY retry loop.

"Present" means resident: an absent page is swapped out (``MADV_PAGEOUT``), the case
``migrate_vma`` cannot collect without a fault (an untouched anonymous page is collected
as an empty entry and needs no fault). 50% present is the first half of every window
resident and the second half swapped out. The THP case is a PMD-mapped THP per window
(``MIGRATE_VMA_SELECT_COMPOUND`` under 7.3).

Reported per method, from :class:`~hmmsim.kernel.stats.StatsDelta`:

* ``walks``: passes over the range that start at its beginning, i.e. ``walk_page_range``
  calls less ``hmm_range_fault``'s resumptions after a fault (7.3 faults after the walk
  and resumes from the faulting address: ``hmm.walk - hmm.range_fault``); per window;
* ``wpr``: raw ``walk_page_range`` calls, resumptions included;
* ``entries``: pte entries examined (``walk.pte_entries``);
* ``faults``: ``handle_mm_fault`` calls (batched ones counted per page);
* ``locks``: lock acquisitions of every class (``lock.*``);
* ``inval``: ``mmu_notifier_invalidate_range_start`` calls;
* ``ms``: wall time (the benchmarks' clock) of the method alone, set-up excluded, and
  beside it the time of one numpy pass over as many entries (``numpy_entry_rate``,
  measured in the same run): ``xnp`` = method time / numpy pass.

Then the time ratios C/A, C/B (and Cm/A, Cm/B) per case, and a PNG (``--png PATH``, default
``unified_walk.png`` here) of time and walks per case. The plot needs matplotlib, an
optional extra: ``pip install -e '.[bench]'`` (or ``pip install matplotlib``); without it
only the table is printed.

Run: ``python benchmarks/unified_walk.py [--quick] [--kernel 7.3|6.12] [--png PATH]
[--no-png] [--cpu] [--cases "2M 0%,1G THP"] [--methods A,B,C] [--json FILE]``
(``--quick``: 64 pages and 2 MiB only, no 1 GiB; ``--json``: append each result to FILE);
``python benchmarks/unified_walk.py --merge FILE... [--png PATH]`` reports the results of
several runs (e.g. run in parallel) as one table and plot. The whole set takes long on a
busy 2-core machine (the 1 GiB swapped-out cases page out and fault back 262,144 pages
one by one).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import _common
import numpy as np
from _common import GiB, numpy_entry_rate

from hmmsim import System
from hmmsim.drivers.dmirror_devmem import (
    dmirror_allocate_chunk,
    dmirror_migrate_alloc_and_copy,
    dmirror_migrate_finalize_and_map,
)
from hmmsim.hmm import migrate_device as md
from hmmsim.hmm.hmm import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HmmRange,
    hmm_range_fault,
)
from hmmsim.hmm.migrate_device import (
    MIGRATE_PFN_MIGRATE,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_vma_finalize,
    migrate_vma_pages,
    migrate_vma_setup,
)
from hmmsim.kernel.errno import EBUSY
from hmmsim.kernel.mm import mmap_read_lock, mmap_read_unlock
from hmmsim.kernel.mmu_notifier import mmu_interval_read_begin
from hmmsim.kernel.page_types import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE
from hmmsim.kernel.system import DEVMEM_CHUNK_PAGES

__all__ = ("CASES", "METHODS", "Case", "Result", "main", "measure", "unified_available")

WINDOW = 512
METHODS = ("A", "B", "C", "Cm")
METHOD_NAMES = {"A": "hmm_range_fault + migrate_vma", "B": "migrate_vma, fault the rest, migrate_vma",
                "C": "unified walk, fault path (HMM_PFN_REQ_MIGRATE)",
                "Cm": "unified walk, migrate path (MIGRATE_VMA_FAULT)"}


@dataclass(frozen=True)
class Case:
    """A range: *npages*, the share of resident pages, and whether it is THP-backed."""

    name: str
    npages: int
    present: float
    thp: bool = False


CASES = [Case(f"{label} {int(p * 100)}%", n, p) for label, n in (("64p", 64), ("2M", 512), ("1G", GiB >> PAGE_SHIFT))
         for p in (0.0, 0.5, 1.0)] + [Case("2M THP", 512, 1.0, thp=True), Case("1G THP", GiB >> PAGE_SHIFT, 1.0, thp=True)]


@dataclass
class Result:
    """One method on one case."""

    case: Case
    method: str
    available: bool = True
    why: str = ""
    windows: int = 0
    walks: int = 0
    wpr: int = 0
    entries: int = 0
    faults: int = 0
    locks: int = 0
    inval: int = 0
    seconds: float = 0.0
    migrated: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def walks_per_window(self) -> float:
        return self.walks / self.windows if self.windows else 0.0


def unified_available() -> str:
    """"" if the unified walk can be measured, else why not."""
    if not hasattr(md, "MIGRATE_VMA_FAULT"):
        return "the unified walk is not in hmmsim yet (no MIGRATE_VMA_FAULT)"
    from dataclasses import fields

    from hmmsim.kernel.system import SystemConfig
    if "migrate_on_fault" not in {f.name for f in fields(SystemConfig)}:
        return "System(migrate_on_fault=True) is not supported"
    return ""


# -- the machine and the range -----------------------------------------------------------------
class Setup:
    """A process with the case's range, its dmirror device and an interval notifier."""

    def __init__(self, case: Case, kernel: str, unified: bool) -> None:
        n = case.npages
        size = n << PAGE_SHIFT
        kw: dict[str, Any] = {"migrate_on_fault": True} if unified else {}
        absent = n - int(n * case.present) if not case.thp else 0
        ram = (3 * size + (96 << 20) + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
        self.sys = System(kernel=kernel, ram=ram, hugetlb_pages=0, coherent=False,
                          swap_pages=2 * absent + 16 if absent else 0, **kw)
        self.case = case
        p = self.proc = self.sys.spawn("bench")
        #: a first range of up to one window with the same pattern, migrated untimed
        #: before the measured one (first use of the machine's arrays, code paths)
        self.warm = min(n, WINDOW)
        self.addr = self._range(n, case, absent)
        self.warm_addr = self._range(self.warm, case, absent)
        self.dev = p.open_device(0)
        self.dmirror = p.task.fget(self.dev.fd).private_data
        # the device memory the migration will take, added up front (a 256 MiB chunk is
        # a one-time cost of the driver, not of a walk)
        large = case.thp and self.sys.profile.device_private_thp
        for _ in range(-(-(n + self.warm) // DEVMEM_CHUNK_PAGES)):
            assert dmirror_allocate_chunk(self.dmirror.mdevice, is_large=large)[0] == 0
        self.mm = p.mm
        self.vma = self.mm.find_vma(self.addr)
        self.flags = MIGRATE_VMA_SELECT_SYSTEM | (MIGRATE_VMA_SELECT_COMPOUND if self.sys.profile.device_private_thp else 0)

    def _range(self, n: int, case: Case, absent: int) -> int:
        """Map *n* pages (2 MiB aligned), fill them, page out the absent part of each
        window; returns the address."""
        p = self.proc
        size = n << PAGE_SHIFT
        base = p.mmap(size + PMD_SIZE)
        a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
        p.madvise(a, size, "hugepage" if case.thp else "nohugepage")
        # every page holds its own number, so a migration's copy can be checked
        p.write(a, np.arange(size // 8, dtype=np.uint64))
        if absent:
            w = min(WINDOW, n)
            keep = int(w * case.present)
            for s in range(a, a + size, w << PAGE_SHIFT):
                p.madvise(s + (keep << PAGE_SHIFT), (w - keep) << PAGE_SHIFT, "pageout")
        return a

    def windows(self, warm: bool = False) -> list[tuple[int, int]]:
        a, n = (self.warm_addr, self.warm) if warm else (self.addr, self.case.npages)
        step = min(WINDOW, n) << PAGE_SHIFT
        return [(s, min(s + step, a + (n << PAGE_SHIFT))) for s in range(a, a + (n << PAGE_SHIFT), step)]

    def check(self) -> None:
        """The data moved: every page is now a device page holding its own numbers (read
        back through the CPU, which migrates it home: done after the measurement)."""
        p, a, n = self.proc, self.addr, self.case.npages
        for off in {0, n // 2, n - 1}:
            got = np.frombuffer(p.read(a + (off << PAGE_SHIFT), 8), np.uint64)[0]
            assert int(got) == off * (PAGE_SIZE // 8), (self.case, off, int(got))
        self.dev.close()
        self.sys.check_invariants(full=False)


# -- the three methods, one window each ----------------------------------------------------------
def _migrate(s: Setup, start: int, end: int, flags: int) -> int:
    """One ``migrate_vma_*`` round of ``[start, end)`` to the device (mmap_lock held):
    the entries that moved."""
    m = MigrateVma(s.mm.find_vma(start), start, end, s.dmirror.mdevice, flags)
    ret = migrate_vma_setup(m)
    assert ret == 0, ret
    dmirror_migrate_alloc_and_copy(m, s.dmirror)
    migrate_vma_pages(m)
    dmirror_migrate_finalize_and_map(m, s.dmirror)
    moved = int(np.count_nonzero(m.src[:m.npages] & np.uint64(MIGRATE_PFN_MIGRATE)))
    migrate_vma_finalize(m)
    return moved


def _fault(s: Setup, start: int, end: int, pfns: np.ndarray, default: int, mask: int) -> None:
    """The driver's ``hmm_range_fault`` loop (``mmu_interval_read_begin``, retry on
    -EBUSY); mmap_lock held."""
    notifier = s.dmirror.notifier
    for _ in range(100):
        r = HmmRange(notifier=notifier, start=start, end=end, hmm_pfns=pfns, default_flags=default,
                     pfn_flags_mask=mask, dev_private_owner=s.dmirror.mdevice)
        r.notifier_seq = mmu_interval_read_begin(notifier)
        ret = hmm_range_fault(r)
        if ret != -EBUSY:
            assert ret == 0, ret
            return
    raise AssertionError("hmm_range_fault kept returning -EBUSY")


def method_a(s: Setup, start: int, end: int) -> int:
    n = (end - start) >> PAGE_SHIFT
    pfns = np.zeros(n, np.uint64)
    _fault(s, start, end, pfns, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, 0)
    assert bool((pfns & np.uint64(HMM_PFN_VALID)).all())
    return _migrate(s, start, end, s.flags)


def method_b(s: Setup, start: int, end: int) -> int:
    n = (end - start) >> PAGE_SHIFT
    m = MigrateVma(s.mm.find_vma(start), start, end, s.dmirror.mdevice, s.flags)
    assert migrate_vma_setup(m) == 0
    src = m.src[:m.npages].copy()
    dmirror_migrate_alloc_and_copy(m, s.dmirror)
    migrate_vma_pages(m)
    dmirror_migrate_finalize_and_map(m, s.dmirror)
    moved = int(np.count_nonzero(src & np.uint64(MIGRATE_PFN_MIGRATE)))
    migrate_vma_finalize(m)
    if m.cpages == m.npages or (s.case.thp and moved * WINDOW >= n):
        return moved
    # fault only what the first pass could not collect (its src entry has no MIGRATE)
    left = (src & np.uint64(MIGRATE_PFN_MIGRATE)) == 0
    pfns = np.where(left, np.uint64(HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE), np.uint64(0))
    _fault(s, start, end, pfns, 0, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    return moved + _migrate(s, start, end, s.flags)


def method_c(s: Setup, start: int, end: int) -> int:
    """The series' fault path (``docs/unified-walk.md``): ``hmm_range_fault()`` with
    ``HMM_PFN_REQ_MIGRATE`` and ``range.migrate``, the driver's -EBUSY loop and
    ``mmu_interval_read_retry`` check (a stale result is undone with
    ``hmm_migrate_abort``), then ``migrate_hmm_range_setup`` and the usual
    allocate/copy, ``migrate_vma_pages``, map, ``migrate_vma_finalize``."""
    from hmmsim.hmm.hmm_migrate import hmm_migrate_abort, migrate_hmm_range_setup
    from hmmsim.hmm.pfn import HMM_PFN_REQ_MIGRATE
    from hmmsim.kernel.mmu_notifier import mmu_interval_read_retry
    n = (end - start) >> PAGE_SHIFT
    dm = s.dmirror
    notifier = dm.notifier
    for _ in range(100):
        m = MigrateVma(None, start, end, dm.mdevice, s.flags)
        r = HmmRange(notifier=notifier, start=start, end=end, hmm_pfns=np.zeros(n, np.uint64),
                     default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE | HMM_PFN_REQ_MIGRATE,
                     dev_private_owner=dm.mdevice, migrate=m)
        r.notifier_seq = mmu_interval_read_begin(notifier)
        ret = hmm_range_fault(r)
        if ret == -EBUSY:
            continue
        assert ret == 0, ret
        with dm.mutex.held():
            stale = mmu_interval_read_retry(notifier, r.notifier_seq)
        if stale:
            hmm_migrate_abort(s.sys, r)
            continue
        migrate_hmm_range_setup(r)
        dmirror_migrate_alloc_and_copy(m, dm)
        migrate_vma_pages(m)
        dmirror_migrate_finalize_and_map(m, dm)
        moved = int(np.count_nonzero(m.src[:m.npages] & np.uint64(MIGRATE_PFN_MIGRATE)))
        migrate_vma_finalize(m)
        return moved
    raise AssertionError("the unified walk kept returning -EBUSY")


def method_cm(s: Setup, start: int, end: int) -> int:
    """The series' migrate path: ``migrate_vma_setup()`` with ``MIGRATE_VMA_FAULT`` (read
    faults: the walk asks ``HMM_PFN_REQ_FAULT`` only)."""
    return _migrate(s, start, end, s.flags | md.MIGRATE_VMA_FAULT)


_RUN: dict[str, Callable[[Setup, int, int], int]] = {"A": method_a, "B": method_b, "C": method_c,
                                                     "Cm": method_cm}
_LOCK_PREFIX = "lock."


def measure(case: Case, method: str, kernel: str = "7.3", check: bool = True, repeat: int | None = None) -> Result:
    """Run *method* on a fresh machine holding *case* (*repeat* times, each on its own
    machine: the best time counts; by default 5 up to 512 pages, else 1); the counts,
    the time and the pages moved."""
    res = Result(case, method)
    if method.startswith("C"):
        why = unified_available()
        if why:
            res.available, res.why = False, why
            return res
    best = float("inf")
    for _ in range(repeat or (5 if case.npages <= WINDOW else 1)):
        one = _measure_once(case, method, kernel, check)
        if one.seconds < best:
            best, res = one.seconds, one
    return res


def _measure_once(case: Case, method: str, kernel: str, check: bool) -> Result:
    res = Result(case, method)
    s = Setup(case, kernel, unified=method.startswith("C"))
    wins = s.windows()
    res.windows = len(wins)
    st = s.sys.stats
    run = _RUN[method]
    mm = s.mm
    for start, end in s.windows(warm=True):
        mmap_read_lock(mm)
        try:
            run(s, start, end)
        finally:
            mmap_read_unlock(mm)
    gc.collect()  # earlier machines are cycles: not freed inside the timed part
    gc.disable()
    try:
        with st.measure() as d:
            t0 = _common.clock()
            moved = 0
            for start, end in wins:
                mmap_read_lock(mm)
                try:
                    moved += run(s, start, end)
                finally:
                    mmap_read_unlock(mm)
            res.seconds = _common.clock() - t0
    finally:
        gc.enable()
    res.migrated = moved
    res.wpr = d["walk_page_range"]
    res.walks = res.wpr - (d["hmm.walk"] - d["hmm.range_fault"])
    res.entries = d["walk.pte_entries"]
    res.faults = d["fault.handle_mm_fault"]
    res.locks = sum(v for k, v in d.items() if k.startswith(_LOCK_PREFIX))
    res.inval = d["mmu_notifier.invalidate_range_start"]
    want = case.npages // WINDOW if case.thp and s.sys.profile.device_private_thp else case.npages
    assert moved == want, (case, method, moved, want)
    if check:
        s.check()
    return res


# -- report --------------------------------------------------------------------------------------
def _row(r: Result, np_pass: float) -> str:
    if not r.available:
        return f"  {r.method}  unavailable: {r.why}"
    return (f"  {r.method}  walks {r.walks_per_window:4.2f}/window ({r.walks:>4}) wpr {r.wpr:>5} "
            f"entries {r.entries:>8,} faults {r.faults:>7,} locks {r.locks:>8,} inval {r.inval:>5,} "
            f"{r.seconds * 1e3:>10.2f} ms  xnp {r.seconds / np_pass:>9,.0f}")


def report(results: list[Result], np_rate: float) -> list[str]:
    """The table, then the ratios C/A and C/B per case."""
    out = [(f"numpy pass: {np_rate / 1e6:,.1f} M entries/s (one vectorised decode of a table; xnp = "
            f"method time / one such pass over the case's entries)")]
    by_case: dict[str, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case.name, {})[r.method] = r
    for name, rs in by_case.items():
        case = next(iter(rs.values())).case
        np_pass = case.npages / np_rate
        wins = max(r.windows for r in rs.values())
        out.append(f"{name} ({case.npages:,} pages, {wins} window{'s' if wins > 1 else ''}), "
                   f"numpy pass {np_pass * 1e6:,.1f} us")
        out.extend(_row(r, np_pass) for r in rs.values())
        for name_c in ("C", "Cm"):
            c = rs.get(name_c)
            if c is not None and c.available:
                out.append(f"  {name_c}/A {c.seconds / rs['A'].seconds:.2f}  {name_c}/B {c.seconds / rs['B'].seconds:.2f}")
    return out


def plot(results: list[Result], path: str) -> str:
    """Time (log scale) and walks per window of each method per case, as a PNG; returns
    "" or why no plot was made."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is missing (pip install -e '.[bench]' or pip install matplotlib)"
    cases = list(dict.fromkeys(r.case.name for r in results))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True)
    x = np.arange(len(cases))
    width = 0.2
    colors = {"A": "#c0504d", "B": "#4f81bd", "C": "#9bbb59", "Cm": "#8064a2"}
    for k, meth in enumerate(METHODS):
        rs = {r.case.name: r for r in results if r.method == meth and r.available}
        if not rs:
            continue
        t = [rs[c].seconds * 1e3 if c in rs else np.nan for c in cases]
        w = [rs[c].walks_per_window if c in rs else np.nan for c in cases]
        label = f"{meth}: {METHOD_NAMES[meth]}"
        ax1.bar(x + (k - 1.5) * width, t, width, label=label, color=colors[meth])
        ax2.bar(x + (k - 1.5) * width, w, width, label=label, color=colors[meth])
    ax1.set_yscale("log")
    clock = "CPU time" if _common.clock is not _common.time.perf_counter else "wall time"
    ax1.set_ylabel(f"{clock} (ms, log scale)")
    ax1.set_title("Fault + migrate to device memory: three driver sequences (hmmsim model)")
    ax1.legend(fontsize=8)
    ax2.set_ylabel("walks per 512-page window")
    ax2.set_yticks([0, 1, 2, 3, 4])
    ax2.set_xticks(x, cases, rotation=30, ha="right")
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


def main(quick: bool = False, kernel: str = "7.3", png: str | None = "unified_walk.png",
         only: list[str] | None = None, methods: tuple[str, ...] = METHODS,
         json_out: str | None = None) -> list[Result]:
    """Measure every case (*quick*: up to 512 pages; *only*: the cases of those names)
    with *methods*; print the table, the ratios and (with *png*) the plot; with
    *json_out* also write the results as JSON lines (``--merge`` reports several such
    files as one table)."""
    cases = [c for c in CASES if not (quick and c.npages > WINDOW) and (not only or c.name in only)]
    np_rate = numpy_entry_rate(GiB >> PAGE_SHIFT)
    results = []
    for case in cases:
        for meth in methods:
            results.append(measure(case, meth, kernel))
            print(_row(results[-1], case.npages / np_rate).replace("  ", f"{case.name:>8} ", 1), flush=True)
            if json_out:
                with open(json_out, "a") as f:
                    f.write(json.dumps(_to_json(results[-1], np_rate)) + "\n")
    _finish(results, np_rate, png)
    return results


def _finish(results: list[Result], np_rate: float, png: str | None) -> None:
    print()
    for line in report(results, np_rate):
        print(line)
    if png:
        why = plot(results, png)
        print(why or f"plot: {os.path.abspath(png)}")


def _to_json(r: Result, np_rate: float) -> dict[str, Any]:
    d = {k: getattr(r, k) for k in ("method", "available", "why", "windows", "walks", "wpr", "entries", "faults",
                                     "locks", "inval", "seconds", "migrated")}
    d["case"] = [r.case.name, r.case.npages, r.case.present, r.case.thp]
    d["np_rate"] = np_rate
    return d


def merge(paths: list[str], png: str | None) -> list[Result]:
    """Report the JSON lines of several runs (``--json``) as one table and plot, cases
    in the order of :data:`CASES`."""
    results: list[Result] = []
    rate = 0.0
    for path in paths:
        with open(path) as f:
            for line in f:
                d = json.loads(line)
                name, n, present, thp = d.pop("case")
                rate = d.pop("np_rate")
                results.append(Result(Case(name, n, present, thp), **d))
    order = {c.name: i for i, c in enumerate(CASES)}
    results.sort(key=lambda r: (order.get(r.case.name, 99), METHODS.index(r.method)))
    _finish(results, rate, png)
    return results


def _arg(name: str, default: str | None = None) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


if __name__ == "__main__":
    if "--cpu" in sys.argv:
        _common.use_cpu_clock()
    out = None if "--no-png" in sys.argv else _arg("--png", "unified_walk.png")
    if "--merge" in sys.argv:
        files = []
        for a in sys.argv[sys.argv.index("--merge") + 1:]:
            if a.startswith("--"):
                break
            files.append(a)
        merge(files, out)
        sys.exit(0)
    only = _arg("--cases")
    meths = _arg("--methods")
    main("--quick" in sys.argv, _arg("--kernel", "7.3") or "7.3", out, only.split(",") if only else None,
         tuple(meths.split(",")) if meths else METHODS, _arg("--json"))
