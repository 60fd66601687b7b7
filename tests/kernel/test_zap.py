"""``zap_pte_range()`` (``kernel/memory.py`` ``zap_pte_span``): munmap of spans whose
entries are all normal pages (the batched path) and of mixed spans (zero page, holes,
pages shared with a forked child)."""

from __future__ import annotations

import numpy as np

from .helpers import BASE
from hmmsim import System
from hmmsim.kernel.mm import MM_ANONPAGES
from hmmsim.kernel.page_types import HPAGE_PMD_SIZE, PAGE_SHIFT, PAGE_SIZE as P
from hmmsim.kernel.pgtable import PTE_PFN_MASK
from hmmsim.kernel.physmem import PG_dirty


def pfns_of(proc, a: int, n: int) -> np.ndarray:  # noqa: ANN001
    return np.array([(proc.mm.lookup_pte(a + i * P) & PTE_PFN_MASK) >> PAGE_SHIFT for i in range(n)], np.int64)


def test_zap_pte_range_all_normal_and_mixed(system: System) -> None:
    """Pmd 0 all written (every entry a normal page), pmd 1 mixed (written pages, zero-page
    reads, holes); a forked child shares them all. The parent's munmap drops one mapping
    of each page (mapcount 2 -> 1), its rss to 0, marks the written folios dirty and
    frees nothing; the child still reads the data. The child's exit frees every page."""
    free0 = system.mem.nr_free
    p = system.spawn("t")
    a = p.mmap(2 * HPAGE_PMD_SIZE, addr=BASE, fixed=True)
    p.write(a, b"\x01" * HPAGE_PMD_SIZE)
    p.write(a + HPAGE_PMD_SIZE + 10 * P, b"\x02" * (40 * P))
    p.touch(a + HPAGE_PMD_SIZE + 100 * P, 20 * P)           # the zero page
    child = p.fork()
    written = np.concatenate([pfns_of(p, a, 512), pfns_of(p, a + HPAGE_PMD_SIZE + 10 * P, 40)])
    assert (system.mem.mapcount[written] == 2).all()
    system.mem.flags[written] &= ~np.uint32(PG_dirty)
    p.munmap(a, 2 * HPAGE_PMD_SIZE)
    assert p.mm.rss[MM_ANONPAGES] == 0
    assert (system.mem.mapcount[written] == 1).all()
    assert (system.mem.flags[written] & PG_dirty).all()
    assert not system.mem._free[written].any()
    assert child.read(a + 5 * P, 4) == b"\x01" * 4
    assert child.read(a + HPAGE_PMD_SIZE + 49 * P, 4) == b"\x02" * 4
    assert child.read(a + HPAGE_PMD_SIZE + 100 * P, 4) == bytes(4)
    child.exit()
    assert system.mem._free[written].all()
    p.exit()
    assert system.mem.nr_free == free0
