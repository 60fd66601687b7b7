"""Device commands of the dmirror test device and the runner's CPU commands over 1 GiB,
through the ``Device`` API and through ``hmmsim run`` (a generated scenario file run by the
real CLI entry point), each next to a numpy pass over the same data measured in the same
run (``ratio`` = model rate / numpy rate).

* API: SNAPSHOT of present pages; READ and WRITE with one fault round each (the mirror is
  invalidated first); peak Python-heap memory of a READ and a WRITE (tracemalloc) over
  the region size. Targets: snapshot >= 10 M pages/s, read/write >= 1.5 GB/s, peak <= 1.5x.
* ``hmmsim run``: fill, check, read, dread, dwrite, dsnapshot of 1 GiB; each command's
  time is taken between its output line and the previous one. The reference machine of
  ``hmmsim run`` OOM-kills 1 GiB device commands (as the real one does), so the benchmark
  runs the CLI with a larger machine. Targets: dsnapshot >= 10 M pages/s, dread/dwrite
  >= 1 GB/s, fill/check/read >= 1.5 GB/s.
* 16 GiB read-only address spaces (THP huge zero PMDs, and 4 KiB zero-page PTEs)
  snapshotted through the device: target < 10 s.

Run: ``python benchmarks/bench_device.py [GiB] [--no-16g]``
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from _common import GiB, best_of, numpy_copy_rate, numpy_entry_rate, report
from hmmsim import System


def bench_api(size: int, yard: float) -> bool:
    npages = size >> 12
    s = System(ram=3 * size + GiB, hugetlb_pages=0)
    p = s.spawn()
    a = p.mmap(size)
    src = np.arange(size // 8, dtype=np.uint64)
    p.write(a, src)
    d = p.open_device(0)
    ok = True
    holder: dict = {}
    t = best_of(lambda: holder.__setitem__("s", d.snapshot(a, npages)), repeat=5)
    assert (holder["s"] == 2).all()
    ok &= report("API snapshot of present pages (M pages/s)", npages / t / 1e6, "Mpages/s", 10,
                 numpy_entry_rate(npages) / 1e6, "numpy table decode")

    def reset() -> None:
        p.mprotect(a, size, "r")  # invalidates the mirror: every command does its fault round
        p.mprotect(a, size, "rw")

    t = best_of(lambda: holder.__setitem__("r", d.read(a, npages)), setup=reset)
    r = holder["r"]
    assert r.cpages == npages and r.faults == 1 and r.data[-8:].view(np.uint64)[0] == size // 8 - 1
    ok &= report("API READ, one fault round (GB/s)", size / t / 1e9, "GB/s", 1.5, yard / 1e9)
    data = (src + 1).view(np.uint8)
    t = best_of(lambda: holder.__setitem__("w", d.write(a, data)), setup=reset)
    assert holder["w"].cpages == npages and holder["w"].faults == 1
    ok &= report("API WRITE, one fault round (GB/s)", size / t / 1e9, "GB/s", 1.5, yard / 1e9)
    for name, fn in (("READ", lambda: d.read(a, npages)), ("WRITE", lambda: d.write(a, data))):
        reset()
        holder.clear()
        tracemalloc.start()
        holder["x"] = fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        ok &= report(f"API {name} peak heap / region size", peak / size, "x", 1.5, lower_is_better=True)
    holder.clear()
    return ok


class _Clock(io.TextIOBase):
    """stdout that notes when each line arrives."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self.t0 = time.perf_counter()
        self._buf = ""

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self.lines.append((time.perf_counter(), line))
        return len(s)


def bench_cli(size: int, yard: float) -> bool:
    from hmmsim.cli import main

    npages = size >> 12
    # the reference machine (correctly) OOM-kills 1 GiB device commands: give it RAM
    ram = f"{(4 * size + 2 * GiB) >> 20}M"
    text = "\n".join(["hmmsim-scenario 1", "open d 0", f"mmap a {npages} rw private,anon",
                      f"fill a 0 {npages} 7", *[f"check a 0 {npages} 7"] * 3, *[f"read a 0 {npages}"] * 3,
                      f"dread d a 0 {npages}", f"dwrite d a 0 {npages} 8", *[f"dsnapshot d a 0 {npages}"] * 3,
                      f"fill a 0 {npages} 8", ""])
    with tempfile.NamedTemporaryFile("w", suffix=".hmm", delete=False) as f:
        f.write(text)
    clock = _Clock()
    try:
        with contextlib.redirect_stdout(clock):
            main(["run", "--ram", ram, f.name])
    finally:
        os.unlink(f.name)
    recs = [(t, json.loads(line)) for t, line in clock.lines]
    for _, rec in recs:
        assert rec.get("ret") == 0 and rec.get("mismatch", 0) == 0, rec
    best: dict[str, float] = {}  # op -> fastest time (commands that repeat: their best)
    for (t_prev, _), (t, rec) in zip(recs, recs[1:]):
        if rec["op"] in ("fill", "check", "read", "dread", "dwrite", "dsnapshot"):
            key = "fill (over written pages)" if rec["op"] == "fill" and "fill" in best else rec["op"]
            best[key] = min(best.get(key, float("inf")), t - t_prev)
    ok = True
    targets = {"fill": 1.5, "fill (over written pages)": 1.5, "check": 1.5, "read": 1.5, "dread": 1.0,
               "dwrite": 1.0}
    for op, t in best.items():
        if op == "dsnapshot":
            ok &= report("hmmsim run dsnapshot (M pages/s)", npages / t / 1e6, "Mpages/s", 10,
                            numpy_entry_rate(npages) / 1e6, "numpy table decode")
        else:
            ok &= report(f"hmmsim run {op} (GB/s)", size / t / 1e9, "GB/s", targets[op], yard / 1e9)
    return ok


def bench_16g() -> bool:
    size = 16 * GiB
    npages = size >> 12
    ok = True
    for kind in ("thp", "4k"):
        s = System(ram=GiB, hugetlb_pages=0)
        p = s.spawn()
        a = p.mmap(size, "r")
        if kind == "thp":
            p.madvise(a, size, "hugepage")
            step = 512
        else:
            step = 1
        if step > 1:
            for off in range(0, size, step << 12):
                p.touch(a + off, 4096)
        else:
            p.touch(a, size)
        d = p.open_device(0)
        t0 = time.perf_counter()
        snap = d.snapshot(a, npages)
        t = time.perf_counter() - t0
        assert len(snap) == npages and (snap != 0).all()
        ok &= report(f"16 GiB read-only ({kind}) snapshot through the device (s)", t, "s", 10,
                     npages / numpy_entry_rate(npages), "numpy table decode", lower_is_better=True)
    return ok


def main(gib: float = 1.0, big: bool = True) -> bool:
    size = int(gib * GiB)
    yard = numpy_copy_rate(size)
    ok = bench_api(size, yard)
    ok &= bench_cli(size, yard)
    if big:
        ok &= bench_16g()
    return ok


if __name__ == "__main__":
    args = [x for x in sys.argv[1:] if not x.startswith("--")]
    sys.exit(0 if main(float(args[0]) if args else 1.0, "--no-16g" not in sys.argv) else 1)
