"""Folio locks held at once: take N folio locks through ``folio_lock()``, then release
them with ``folio_unlock()``, for N = 16,384 / 65,536 / 262,144 (a 1 GiB migration holds
262,144). The lock bookkeeping must be O(1) per acquisition, so the rate must not fall as N
grows. Each figure is printed beside a baseline measured in the same run: the same N
keys put into and taken out of a plain dict plus the ``PG_locked`` bit set and cleared
one pfn at a time in the numpy flags array (the least any per-folio lock can cost).
Target: >= 30,000 lock+unlock pairs/s at every N (262,144 folios locked and
unlocked in under 10 s; it was 445 pairs/s at N = 16,384 with list scans).

Run: ``python benchmarks/bench_locking.py [N ...]``
"""

from __future__ import annotations

import sys

import numpy as np

from _common import GiB, best_of, report
from hmmsim import System
from hmmsim.kernel.pagemap import folio_lock, folio_unlock
from hmmsim.kernel.physmem import PG_locked


def _baseline(n: int) -> float:
    flags = np.zeros(n, np.uint32)
    clear = ~np.uint32(PG_locked)

    def run() -> None:
        d: dict[tuple[str, int], int] = {}
        for pfn in range(n):
            d[("folio", pfn)] = 1
            flags[pfn] |= PG_locked
        for pfn in range(n):
            del d[("folio", pfn)]
            flags[pfn] &= clear

    return best_of(run, repeat=1)


def main(sizes: list[int]) -> bool:
    ok = True
    s = System(ram=2 * GiB, hugetlb_pages=0, coherent=False)
    for n in sizes:
        pfns = s.mem.alloc_pages_bulk(n).tolist()
        assert len(pfns) == n

        def run() -> None:
            for pfn in pfns:
                folio_lock(s, pfn)
            for pfn in pfns:
                folio_unlock(s, pfn)

        t = best_of(run, repeat=1)
        s.ls.assert_no_locks()
        base = _baseline(n)
        ok &= report(f"folio_lock+unlock, {n:,} held", n / t, "pairs/s", 30_000, n / base,
                     "dict + numpy flag bit")
        s.mem.free_pages(pfns)
    return ok


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]] or [16_384, 65_536, 262_144]
    sys.exit(0 if main(args) else 1)
