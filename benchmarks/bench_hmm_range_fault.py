"""hmm_range_fault() over 1 GiB of anonymous memory.

* snapshot: every page present (4 KiB pages, written by the CPU first), no fault
  requested: the pure table-walk rate. Target: >= 10 million pages/s.
* fault-in: untouched memory, ``HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE``: walk, fault
  every page (allocate, zero, map), re-walk. Target: >= 1 million pages/s.

Run: ``python benchmarks/bench_hmm_range_fault.py [GiB]``
"""

from __future__ import annotations

import sys

import numpy as np

from _common import GiB, best_of, numpy_copy_rate, numpy_entry_rate, report
from hmmsim import System
from hmmsim.hmm.hmm import HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_VALID
from hmmsim.hmm.mirror import HmmMirror


def main(gib: float = 1.0) -> bool:
    size = int(gib * GiB)
    npages = size >> 12
    ok = True

    # snapshot of present pages
    s = System(ram=size + GiB, hugetlb_pages=0)
    p = s.spawn()
    a = p.mmap(size)
    m = HmmMirror(p.mm)
    ret, _ = m.range_fault(a, a + size, default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert ret == 0
    pfns = np.zeros(npages, np.uint64)
    t = best_of(lambda: m.range_fault(a, a + size, hmm_pfns=pfns))
    assert (pfns & np.uint64(HMM_PFN_VALID)).all()
    ok &= report(f"snapshot of {gib:g} GiB present pages", npages / t, "pages/s", 10e6,
                 numpy_entry_rate(npages), "numpy table decode")

    # write fault-in of untouched memory
    holder: dict[str, object] = {}

    def setup() -> None:
        sys_ = System(ram=size + GiB, hugetlb_pages=0)
        proc = sys_.spawn()
        holder["a"] = proc.mmap(size)
        holder["m"] = HmmMirror(proc.mm)

    def fault_in() -> None:
        mir = holder["m"]
        base = holder["a"]
        ret, _ = mir.range_fault(base, base + size, default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
        assert ret == 0

    t = best_of(fault_in, setup=setup)
    # the data movement every fault-in must do at least: zero each new page
    zero_rate = numpy_copy_rate(size) / 4096
    ok &= report(f"write fault-in of {gib:g} GiB untouched memory", npages / t, "pages/s", 1e6,
                 zero_rate, "numpy page copy")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0) else 1)
