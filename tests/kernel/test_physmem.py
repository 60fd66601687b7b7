"""Page contents in ``PhysMem``: zeroing on allocation (``__GFP_ZERO``), ``copy_highpage``
for batches, ``clear_highpage``, and the gather/scatter helpers the CPU side uses.

Every helper must give the same bytes whatever the shape of its pfn list: one run of
consecutive frames, a few runs (copied as slices), many short runs or a scattered list
(chunked fancy indexing), an empty list; and frames that were written since they were
last zeroed (``PG_data``) or not.
"""

from __future__ import annotations

import numpy as np
import pytest

from hmmsim.kernel import physmem
from hmmsim.kernel.page_types import HPAGE_PMD_NR, PAGE_SIZE
from hmmsim.kernel.physmem import PG_data, PhysMem, _runs

RAM = 24 * HPAGE_PMD_NR  # 48 MiB: 23 allocatable pageblocks

rng = np.random.default_rng(6)


def mem() -> PhysMem:
    return PhysMem(RAM, RAM, RAM + 1024)


def contents(m: PhysMem, pfns: np.ndarray) -> np.ndarray:
    """What the frames hold, read one frame at a time (the reference)."""
    return np.stack([m.data[int(p)].copy() for p in pfns]) if len(pfns) else np.zeros((0, PAGE_SIZE), np.uint8)


def scribble(m: PhysMem, pfns: np.ndarray) -> np.ndarray:
    """Fill *pfns* with random bytes (written: PG_data); returns what each holds."""
    want = rng.integers(0, 256, (len(pfns), PAGE_SIZE), dtype=np.uint8)
    for p, row in zip(pfns.tolist(), want):
        m.data[p] = row
    m.mark_written(pfns)
    return want


#: pfn lists of every shape the helpers tell apart (all inside free RAM, above block 0)
SHAPES = {
    "empty": np.zeros(0, np.int64),
    "one": np.array([HPAGE_PMD_NR + 5], np.int64),
    "run": np.arange(2 * HPAGE_PMD_NR, 3 * HPAGE_PMD_NR, dtype=np.int64),
    # a few long runs, out of order: slices
    "few_runs": np.concatenate([np.arange(4 * HPAGE_PMD_NR + 300, 4 * HPAGE_PMD_NR + 400),
                                np.arange(3 * HPAGE_PMD_NR, 3 * HPAGE_PMD_NR + 200),
                                np.arange(5 * HPAGE_PMD_NR + 7, 5 * HPAGE_PMD_NR + 9)]).astype(np.int64),
    # many runs of 3 consecutive frames (partially consecutive): chunked fancy indexing
    "short_runs": (np.arange(6 * HPAGE_PMD_NR, 9 * HPAGE_PMD_NR, 4)[:, None] + np.arange(3)).reshape(-1).astype(np.int64),
    # every other frame, then shuffled: scattered
    "scattered": rng.permutation(np.arange(9 * HPAGE_PMD_NR, 12 * HPAGE_PMD_NR, 2)).astype(np.int64),
}


def test_runs_shapes() -> None:
    """``_runs``: consecutive runs as (start, end, first pfn) when they are long enough on
    average; otherwise chunks of at most ``_COPY_CHUNK`` asking for fancy indexing; the
    pieces cover the list in order exactly once."""
    assert _runs(SHAPES["empty"]) == []
    assert _runs(SHAPES["run"]) == [(0, HPAGE_PMD_NR, 2 * HPAGE_PMD_NR)]
    assert _runs(SHAPES["few_runs"]) == [(0, 100, 4 * HPAGE_PMD_NR + 300), (100, 300, 3 * HPAGE_PMD_NR),
                                         (300, 302, 5 * HPAGE_PMD_NR + 7)]
    for name in ("short_runs", "scattered"):
        pieces = _runs(SHAPES[name])
        assert all(p == -1 and 0 < b - a <= physmem._COPY_CHUNK for a, b, p in pieces)
        assert [a for a, _b, _p in pieces] == list(range(0, len(SHAPES[name]), physmem._COPY_CHUNK))
        assert pieces[-1][1] == len(SHAPES[name])


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_read_pages_write_pages(shape: str) -> None:
    """``write_pages`` scatters the bytes page by page and marks the frames written;
    ``read_pages`` gathers them back; frames outside the list are untouched."""
    m = mem()
    pfns = SHAPES[shape]
    other = np.arange(13 * HPAGE_PMD_NR, 13 * HPAGE_PMD_NR + 64, dtype=np.int64)
    before = scribble(m, other)
    src = rng.integers(0, 256, len(pfns) * PAGE_SIZE, dtype=np.uint8)
    m.write_pages(pfns, src)
    assert np.array_equal(contents(m, pfns).reshape(-1), src)
    assert ((m.flags[pfns] & PG_data) != 0).all()
    out = np.full(len(pfns) * PAGE_SIZE, 0xAA, np.uint8)
    m.read_pages(pfns, out)
    assert np.array_equal(out, src)
    assert np.array_equal(contents(m, other), before)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("src_shape", ["run", "scattered"])
def test_copy_pages(shape: str, src_shape: str) -> None:
    """``copy_highpage()`` of a batch, pairwise: every destination frame gets its source
    frame's bytes and is marked written; the sources and other frames are unchanged."""
    m = mem()
    dst = SHAPES[shape]
    src = np.arange(16 * HPAGE_PMD_NR, 16 * HPAGE_PMD_NR + len(dst), dtype=np.int64)
    if src_shape == "scattered":
        src = rng.permutation(np.arange(16 * HPAGE_PMD_NR, 20 * HPAGE_PMD_NR))[:len(dst)].astype(np.int64)
    want = scribble(m, src)
    other = np.arange(13 * HPAGE_PMD_NR, 13 * HPAGE_PMD_NR + 16, dtype=np.int64)
    keep = scribble(m, other)
    m.copy_pages(dst, src)
    assert np.array_equal(contents(m, dst), want)
    assert np.array_equal(contents(m, src), want)
    assert np.array_equal(contents(m, other), keep)
    assert ((m.flags[dst] & PG_data) != 0).all()


def test_copy_pages_one_page() -> None:
    m = mem()
    (want,) = scribble(m, np.array([HPAGE_PMD_NR + 1]))
    m.copy_pages(HPAGE_PMD_NR + 9, HPAGE_PMD_NR + 1)
    assert np.array_equal(m.data[HPAGE_PMD_NR + 9], want) and m.flags[HPAGE_PMD_NR + 9] & PG_data


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_clear_pages(shape: str) -> None:
    """``clear_highpage()``: the frames read as zeros and are no longer marked written;
    half of them were never written (nothing to clear)."""
    m = mem()
    pfns = SHAPES[shape]
    scribble(m, pfns[::2])
    other = np.arange(13 * HPAGE_PMD_NR, 13 * HPAGE_PMD_NR + 16, dtype=np.int64)
    keep = scribble(m, other)
    m.clear_pages(pfns)
    assert not contents(m, pfns).any()
    assert not (m.flags[pfns] & PG_data).any()
    assert np.array_equal(contents(m, other), keep)


def free_all_but(m: PhysMem, keep: np.ndarray) -> None:
    """Allocate every free page, write them all, then free all but *keep*: the free frames
    are exactly RAM minus *keep* and every one is dirty."""
    got = m.alloc_pages_bulk(m.nr_free)
    scribble(m, got)
    m.free_pages(np.setdiff1d(got, keep))


@pytest.mark.parametrize("layout", ["all_dirty", "all_clean", "mixed", "fragmented_dirty"])
def test_alloc_pages_bulk_zeroes_dirty_frames(layout: str) -> None:
    """``alloc_pages_bulk(__GFP_ZERO)``: every page handed out reads as zeros, whether its
    frame was written before (zeroed now) or never (nothing to do), and whether the
    free frames form runs or are scattered between pages in use; the order is lowest
    pfns first, from pageblocks already in use; pages still in use keep their bytes."""
    m = mem()
    keep = np.zeros(0, np.int64)
    if layout == "all_dirty":
        free_all_but(m, keep)
    elif layout == "mixed":
        got = m.alloc_pages_bulk(m.nr_free)
        scribble(m, got[::3])
        m.free_pages(got)
    elif layout == "fragmented_dirty":  # every third page stays in use
        keep = np.arange(HPAGE_PMD_NR, RAM, 3, dtype=np.int64)
        free_all_but(m, keep)
    kept = contents(m, keep)
    expect = np.setdiff1d(np.arange(HPAGE_PMD_NR, RAM), keep)[:3000]
    got = m.alloc_pages_bulk(3000)
    assert np.array_equal(got, expect)
    assert not contents(m, got).any()
    assert not (m.flags[got] & PG_data).any()
    assert (m.refcount[got] == 1).all()
    assert np.array_equal(contents(m, keep), kept)


def test_alloc_folio_zeroes_and_keeps() -> None:
    """A THP allocation zeroes its dirty frames with ``__GFP_ZERO``; without it (the
    caller overwrites every byte) the bytes stay and the frames stay marked written."""
    m = mem()
    free_all_but(m, np.zeros(0, np.int64))
    second = m.data[2 * HPAGE_PMD_NR:3 * HPAGE_PMD_NR].copy()
    head = m.alloc_folio(9)
    assert head == HPAGE_PMD_NR and not m.data[head:head + HPAGE_PMD_NR].any()
    assert not (m.flags[head:head + HPAGE_PMD_NR] & PG_data).any()
    head2 = m.alloc_folio(9, zero=False)
    assert head2 == 2 * HPAGE_PMD_NR
    assert np.array_equal(m.data[head2:head2 + HPAGE_PMD_NR], second) and second.any()
    assert (m.flags[head2:head2 + HPAGE_PMD_NR] & PG_data).all()


def test_overwritten_allocations_keep_frames_marked() -> None:
    """Inside ``overwritten()`` allocations leave the frames' bytes alone and keep them
    marked written (so ``clear_pages`` or a later allocation still zeroes them); outside
    it they are zeroed again."""
    m = mem()
    free_all_but(m, np.zeros(0, np.int64))
    old = m.data[HPAGE_PMD_NR:HPAGE_PMD_NR + 8].copy()
    with m.overwritten():
        got = m.alloc_pages_bulk(8)
        head = m.alloc_folio(9)
    assert not m.skip_clear
    assert np.array_equal(got, np.arange(HPAGE_PMD_NR, HPAGE_PMD_NR + 8))
    assert np.array_equal(contents(m, got), old) and (m.flags[got] & PG_data).all()
    assert (m.flags[head:head + HPAGE_PMD_NR] & PG_data).all()
    m.clear_pages(got[:4])
    assert not contents(m, got[:4]).any() and not (m.flags[got[:4]] & PG_data).any()
    m.free_pages(got[4:])
    again = m.alloc_pages_bulk(4)
    assert np.array_equal(again, got[4:]) and not contents(m, again).any()
