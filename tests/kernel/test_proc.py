"""``/proc/pid/clear_refs`` soft-dirty tracking (``fs/proc/task_mmu.c``)."""

from __future__ import annotations

from hmmsim import Process
from hmmsim.hmm.hmm import HMM_PFN_WRITE
from hmmsim.hmm.mirror import HmmMirror
from hmmsim.kernel.errno import EINVAL
from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.pgtable import _PAGE_SOFT_DIRTY, pte_write
from hmmsim.kernel.proc import CLEAR_REFS_ALL, CLEAR_REFS_SOFT_DIRTY, clear_refs


def test_clear_refs_soft_dirty_write_protects_and_notifies(proc: Process) -> None:
    a = proc.mmap(2 * P)
    proc.write(a, b"s" * 2 * P)
    m = HmmMirror(proc.mm)
    assert clear_refs(proc.mm, CLEAR_REFS_SOFT_DIRTY) == 0
    assert [e[0] for e in m.invalidations] == ["MMU_NOTIFY_SOFT_DIRTY"]
    e = proc.mm.lookup_pte(a)
    assert not pte_write(e) and not e & _PAGE_SOFT_DIRTY
    ret, pfns = m.range_fault(a, a + 2 * P)
    assert ret == 0 and not int(pfns[0]) & HMM_PFN_WRITE
    proc.write(a, b"t")  # the write fault reuses the page and marks it soft-dirty again
    assert proc.mm.lookup_pte(a) & _PAGE_SOFT_DIRTY and pte_write(proc.mm.lookup_pte(a))
    assert not proc.mm.lookup_pte(a + P) & _PAGE_SOFT_DIRTY
    m.remove()


def test_clear_refs_tracking_blocks_mprotect_write_upgrade(proc: Process) -> None:
    a = proc.mmap(2 * P)
    proc.write(a, b"u" * 2 * P)
    clear_refs(proc.mm, CLEAR_REFS_SOFT_DIRTY)
    proc.write(a, b"v")  # page 0 soft-dirty again, page 1 not
    proc.mprotect(a, 2 * P, "r")
    proc.mprotect(a, 2 * P, "rw")
    assert pte_write(proc.mm.lookup_pte(a)), "soft-dirty exclusive page: made writable at once"
    assert not pte_write(proc.mm.lookup_pte(a + P)), "needs a write fault to record soft-dirty"
    assert proc.read(a + P, 1) == b"u"


def test_clear_refs_other_modes_are_einval(proc: Process) -> None:
    assert clear_refs(proc.mm, CLEAR_REFS_ALL) == -EINVAL
