"""HMM_DMIRROR_READ of 1 GiB through the dmirror test device (fault windows of the
release's size, a bounce buffer accounted against RAM, copy to the user buffer). The memory is written by the CPU
first, so the read takes one fault round and copies 1 GiB twice. Target: >= 0.5 GB/s.

Run: ``python benchmarks/bench_dmirror.py [GiB]``
"""

from __future__ import annotations

import sys

import numpy as np

from _common import GiB, best_of, numpy_copy_rate, report
from hmmsim import System


def main(gib: float = 1.0) -> bool:
    size = int(gib * GiB)
    s = System(ram=4 * size + GiB, hugetlb_pages=0)  # region, user buffer, bounce
    p = s.spawn()
    a = p.mmap(size)
    p.write(a, np.arange(size // 8, dtype=np.uint64))
    d = p.open_device(0)
    holder = {}

    def read() -> None:
        holder["r"] = d.read(a, size >> 12)

    def reset() -> None:
        p.mprotect(a, size, "r")  # invalidates the mirror: every READ does its fault round
        p.mprotect(a, size, "rw")

    t = best_of(read, setup=reset)
    r = holder["r"]
    assert r.cpages == size >> 12 and r.faults == 1
    assert r.data[:8].view(np.uint64)[0] == 0 and r.data[-8:].view(np.uint64)[0] == size // 8 - 1
    # the READ copies the region twice (page -> bounce buffer -> user buffer)
    return report(f"dmirror READ of {gib:g} GiB (1 fault round)", size / t / 1e6, "MB/s", 500,
                  numpy_copy_rate(size) / 2e6, "2 numpy copies")


if __name__ == "__main__":
    sys.exit(0 if main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0) else 1)
