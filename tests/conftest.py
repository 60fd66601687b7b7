"""Shared fixtures: every System a test creates is checked after the test
(``check_invariants(full=True)``: frames, refcounts, mapcounts, rss, page tables; and
no lock still held)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hmmsim import Process, System

#: small machines keep the tests fast; the hugetlb pool must fit in half of RAM
SMALL = {"ram": 256 << 20, "hugetlb_pages": 8}


@pytest.fixture
def make_system() -> Iterator[Callable[..., System]]:
    """``make_system(**config)``: a System whose invariants are checked after the test."""
    made: list[System] = []

    def make(**kw: Any) -> System:
        cfg = dict(SMALL)
        cfg.update(kw)
        s = System(**cfg)
        made.append(s)
        return s

    yield make
    for s in made:
        s.ls.assert_no_locks()
        s.check_invariants(full=True)


@pytest.fixture
def system(make_system: Callable[..., System]) -> System:
    return make_system()


@pytest.fixture
def proc(system: System) -> Process:
    return system.spawn("test")
