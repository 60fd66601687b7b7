"""THP migration to device-private memory and back (7.3: whole THPs, device-private PMDs)
over 1 GiB, through the ``Device`` API and through ``hmmsim run``, each next to a numpy
copy of the same bytes measured in the same run (``ratio`` = model rate / numpy rate).

* API: the MIGRATE_TO_DEV ioctl over 512 PMD-mapped THPs (each one compound entry, a
  device THP), MIGRATE_TO_SYS back (a system THP each). The read-back MIGRATE_TO_DEV
  does into the user's buffer is part of the command, as in test_hmm. Target: the round
  trip (twice the bytes over both times) >= 25% of the numpy copy; each direction is
  shown for information.
* ``hmmsim run``: ``dmigrate`` and ``dmigrate_sys`` of the same 1 GiB in a generated
  scenario run by the real CLI entry point (time between output lines; ``dmigrate``
  includes the runner's fresh buffer: populated, read back, crc'd, unmapped). Same
  target, on the round trip.

Run: ``python benchmarks/bench_migrate_thp.py [GiB]``
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

from _common import GiB, numpy_copy_rate, report
from hmmsim import System
from hmmsim.kernel.page_types import PMD_SIZE
from hmmsim.kernel.pgtable import is_pmd_device_private_entry, pmd_leaf, pmd_present

TARGET_RATIO = 0.25


def bench_api(size: int, yard: float) -> bool:
    """The ioctls through the process's file (``task.ioctl``; the facade's
    ``Device.migrate`` would add a copy of the read-back buffer out of the model)."""
    from hmmsim.drivers.test_hmm_uapi import HMM_DMIRROR_MIGRATE_TO_DEV, HMM_DMIRROR_MIGRATE_TO_SYS, HmmDmirrorCmd
    npages = size >> 12
    s = System(ram=4 * size + GiB, hugetlb_pages=0, thp="always", kernel="7.3")
    p = s.spawn()
    base = p.mmap(size + PMD_SIZE)
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    buf = p.mmap(size)
    src = np.arange(size // 8, dtype=np.uint64)
    p.write(a, src)
    p.write(buf, bytes(size))  # the read-back buffer is populated, as a malloc'd one in use
    d = p.open_device(0)
    t_dev = t_sys = float("inf")
    with p.task.running():
        for _ in range(3):
            cmd = HmmDmirrorCmd(addr=a, ptr=buf, npages=npages)
            t0 = time.perf_counter()
            assert p.task.ioctl(d.fd, HMM_DMIRROR_MIGRATE_TO_DEV, cmd) == 0
            t1 = time.perf_counter()
            assert cmd.cpages == npages and is_pmd_device_private_entry(p.mm.pmd_ref(a + size - PMD_SIZE).get())
            cmd = HmmDmirrorCmd(addr=a, ptr=buf, npages=npages)
            assert p.task.ioctl(d.fd, HMM_DMIRROR_MIGRATE_TO_SYS, cmd) == 0
            t2 = time.perf_counter()
            e = p.mm.pmd_ref(a).get()
            assert cmd.cpages == npages // 512 and pmd_present(e) and pmd_leaf(e)
            t_dev, t_sys = min(t_dev, t1 - t0), min(t_sys, t2 - t1)
    assert np.array_equal(p.read_array(a + size - 4096, 512, np.uint64), src[-512:])
    # the target is the round trip's (every byte moves twice); each direction is shown too
    ok = report("API THP MIGRATE_TO_DEV + read-back (GB/s)", size / t_dev / 1e9, "GB/s", None, yard / 1e9)
    ok &= report("API THP MIGRATE_TO_SYS (GB/s)", size / t_sys / 1e9, "GB/s", None, yard / 1e9)
    ok &= report("API THP round trip (GB/s)", 2 * size / (t_dev + t_sys) / 1e9, "GB/s", TARGET_RATIO * yard / 1e9,
                 yard / 1e9)
    d.close()
    return ok


class _Clock(io.TextIOBase):
    """stdout that stamps every line the CLI prints."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
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
    ram = f"{(4 * size + 2 * GiB) >> 20}M"
    text = "\n".join(["hmmsim-scenario 1", "open d 0", f"mmap a {npages} rw private,anon align=512",
                      f"madvise a 0 {npages} hugepage", f"fill a 0 {npages} 7",
                      *[f"dmigrate d a 0 {npages}\ndmigrate_sys d a 0 {npages}"] * 3,
                      f"check a 0 {npages} 7", ""])
    with tempfile.NamedTemporaryFile("w", suffix=".hmm", delete=False) as f:
        f.write(text)
    clock = _Clock()
    try:
        with contextlib.redirect_stdout(clock):
            main(["run", "--kernel", "7.3", "--ram", ram, f.name])
    finally:
        os.unlink(f.name)
    recs = [(t, json.loads(line)) for t, line in clock.lines]
    for _, rec in recs:
        assert rec.get("ret") == 0 and rec.get("mismatch", 0) == 0, rec
    best: dict[str, float] = {}
    for (t_prev, _), (t, rec) in zip(recs, recs[1:]):
        if rec["op"] in ("dmigrate", "dmigrate_sys"):
            best[rec["op"]] = min(best.get(rec["op"], float("inf")), t - t_prev)
    ok = True
    for op, t in best.items():
        ok &= report(f"hmmsim run {op} of THPs (GB/s)", size / t / 1e9, "GB/s", None, yard / 1e9)
    ok &= report("hmmsim run THP round trip (GB/s)", 2 * size / (best["dmigrate"] + best["dmigrate_sys"]) / 1e9,
                 "GB/s", TARGET_RATIO * yard / 1e9, yard / 1e9)
    return ok


def main(gib: float = 1.0) -> bool:
    size = int(gib * GiB) & ~(PMD_SIZE - 1)
    yard = numpy_copy_rate(size)
    print(f"THP migration of {size >> 20} MiB; numpy copy {yard / 1e9:.2f} GB/s "
          f"(target: {TARGET_RATIO:.0%} of it)", flush=True)
    ok = bench_api(size, yard)
    ok &= bench_cli(size, yard)
    print(f"numpy copy measured again after the runs: {numpy_copy_rate(size) / 1e9:.2f} GB/s "
          "(a busy machine moves the yardstick)", flush=True)
    return ok


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.exit(0 if main(float(args[0]) if args else 1.0) else 1)
