"""Accounting: what the model did, counted the way the kernel would count it.

One :class:`Stats` object per :class:`~hmmsim.kernel.system.System` collects every
``walk_page_range`` call, page-table levels and entries visited, callbacks invoked, faults
taken (by handler), notifier invalidations and lock acquisitions (by class and mode).
Keys are plain strings named after the kernel function or object they count, e.g.
``"walk_page_range"``, ``"walk.pmd_entry"``, ``"walk.pte_entries"``, ``"fault.do_anonymous_page"``,
``"mmu_notifier.invalidate_range_start"``, ``"lock.mmap_lock.read"``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ("Stats",)


class Stats:
    """Counters of a simulated machine, readable through :meth:`snapshot` and :meth:`measure`.

    >>> s = Stats(); s.add("walk_page_range"); s["walk_page_range"]
    1
    """

    __slots__ = ("_c",)

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()

    def add(self, key: str, n: int = 1) -> None:
        """Count *n* events of kind *key*."""
        self._c[key] += n

    def __getitem__(self, key: str) -> int:
        return self._c.get(key, 0)

    def snapshot(self, prefix: str = "") -> dict[str, int]:
        """Return a copy of all counters (those starting with *prefix*), sorted by name."""
        return {k: v for k, v in sorted(self._c.items()) if k.startswith(prefix)}

    def reset(self) -> None:
        """Zero every counter."""
        self._c.clear()

    @contextmanager
    def measure(self) -> Iterator[Counter[str]]:
        """Yield a Counter that holds, once the block ends, what happened inside it.

        >>> s = Stats()
        >>> with s.measure() as d:
        ...     s.add("fault.do_anonymous_page", 3)
        >>> d["fault.do_anonymous_page"]
        3
        """
        before = Counter(self._c)
        delta: Counter[str] = Counter()
        try:
            yield delta
        finally:
            after = self._c
            for k, v in after.items():
                dv = v - before.get(k, 0)
                if dv:
                    delta[k] = dv
