"""``fill``, ``check``, ``read`` and ``dwrite`` write and compare the pattern straight into
(or against) runs of consecutive frames, a cache-sized step at a time, and through a
chunk buffer when the frames are scattered: both give the pattern's bytes, in pages
that fault or not (conventions: pattern SEED, word k holds SEED + k)."""

from __future__ import annotations

import json
from zlib import crc32

import numpy as np

from hmmsim.kernel.system import System
from hmmsim.scenario.parse import Command
from hmmsim.scenario.run import _PATTERN_STEP, _pattern, _Patterns, reference_config, run_scenario_text


def run(lines: list[str]) -> list[dict]:
    """Run the lines; the counters' invariants after every command, the full check at
    the end."""
    machine: list[System] = []

    def after(sys: System, cmd: Command) -> None:
        machine[:] = [sys]
        sys.check_invariants(full=False)
        sys.ls.assert_no_locks()

    text = "\n".join(["hmmsim-scenario 1", *lines, ""])
    out = [json.loads(x) for x in run_scenario_text(text, reference_config(), after=after)]
    machine[0].check_invariants(full=True)
    return out


def interleaved(n: int) -> list[str]:
    """Regions a and b whose pages were first written alternately: a's frames are every
    other frame (scattered), c is written in one go (one run of frames)."""
    lines = [f"mmap a {n} rw private,anon", f"mmap b {n} rw private,anon", f"mmap c {n} rw private,anon"]
    for i in range(n):
        lines += [f"fill a {i} 1 3", f"fill b {i} 1 3"]
    return lines


def test_fill_scattered_and_consecutive_frames_hold_the_pattern() -> None:
    """Refilling a's scattered frames and filling c's run with pattern 7 give the same
    bytes: ``read`` crc = crc of the pattern, ``check`` no mismatch, one wrong seed is
    every word wrong."""
    n = 48
    want = crc32(_pattern(7, 0, n << 10).tobytes())
    out = run([*interleaved(n), f"fill a 0 {n} 7", f"fill c 0 {n} 7",
               f"read a 0 {n}", f"read c 0 {n}", f"check a 0 {n} 7", f"check c 0 {n} 7",
               f"check a 0 {n} 8", f"read b 0 {n}"])
    tail = out[-8:]
    assert [r["ret"] for r in tail] == [0] * 8
    assert tail[2]["crc"] == tail[3]["crc"] == want
    assert tail[4]["mismatch"] == tail[5]["mismatch"] == 0
    assert tail[6]["mismatch"] == n << 10
    assert tail[7]["crc"] == crc32(_pattern(3, 0, n << 10).tobytes())


def test_fill_goes_on_after_a_hole_in_scattered_frames() -> None:
    """A hole in the region: ``fill`` reports its first page and writes the pages after
    it; the pages around it hold the pattern at their own offsets."""
    n = 40
    out = run([*interleaved(n), "munmap a 10 2", f"fill a 0 {n} 9",
               "check a 0 10 9", f"check a 12 {n - 12} 9", f"read a 12 {n - 12}"])
    assert out[-4] == {"line": 6 + 2 * n, "op": "fill", "ret": "segv", "page": 10}
    assert out[-3]["mismatch"] == out[-2]["mismatch"] == 0
    assert out[-1]["crc"] == crc32(_pattern(9, 12 << 10, (n - 12) << 10).tobytes())


def test_dwrite_buffer_holds_the_pattern() -> None:
    """``dwrite`` fills its fresh buffer with the pattern at the region offset; the device
    writes it into the region, which then checks clean."""
    out = run(["open d 0", "mmap a 700 rw private,anon", "dwrite d a 5 600 11", "check a 5 600 11",
               "read a 5 600"])
    assert out[2]["ret"] == 0 and out[2]["cpages"] == 600
    assert out[3]["mismatch"] == 0
    assert out[4]["crc"] == crc32(_pattern(11, 5 << 10, 600 << 10).tobytes())


def test_patterns_write_and_mismatches_any_length() -> None:
    """``_Patterns.write``/``mismatches`` over lengths around the step size and offsets
    that wrap the 32-bit words."""
    p = _Patterns()
    for nwords, seed, first in [(0, 1, 0), (5, 1, 3), (_PATTERN_STEP, 0xFFFF_FFF0, 0),
                                (_PATTERN_STEP + 7, 2, 0xFFFF_FF00), (3 * _PATTERN_STEP - 1, 9, 1 << 20)]:
        dst = np.full(nwords, 0xDEAD, "<u4")
        p.write(dst, seed, first)
        assert np.array_equal(dst.view(np.uint8), _pattern(seed, first, nwords))
        assert p.mismatches(dst, seed, first) == 0
        if nwords:
            dst[nwords // 2] += 1
            assert p.mismatches(dst, seed, first) == 1
