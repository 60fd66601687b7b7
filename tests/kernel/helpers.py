"""Helpers shared by the kernel-core tests."""

from __future__ import annotations

from hmmsim import Process
from hmmsim.kernel.mmu_notifier import MmuNotifier, MmuNotifierEvent, MmuNotifierRange, mmu_notifier_register

MiB = 1 << 20
#: 2 MiB-aligned addresses for MAP_FIXED mappings (well inside TASK_SIZE)
BASE = 0x7E00_0000_0000
OTHER = 0x7D00_0000_0000


class Recorder:
    """A classic MMU notifier recording (event, start, end) of every invalidation and
    counting ``release`` calls."""

    def __init__(self, proc: Process) -> None:
        self.ranges: list[tuple[MmuNotifierEvent, int, int]] = []
        self.released = 0
        self.mn = MmuNotifier(invalidate_range_start=self._start, release=self._release)
        assert mmu_notifier_register(self.mn, proc.mm) == 0

    def _start(self, r: MmuNotifierRange) -> int:
        self.ranges.append((r.event, r.start, r.end))
        return 0

    def _release(self, mm: object) -> None:
        self.released += 1

    def events(self, event: MmuNotifierEvent) -> list[tuple[int, int]]:
        return [(s, e) for ev, s, e in self.ranges if ev == event]


def pte(proc: Process, addr: int) -> int:
    """The entry mapping *addr* (pte, or huge pmd/pud), 0 if none."""
    return proc.mm.lookup_pte(addr)
