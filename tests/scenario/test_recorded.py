"""Scenarios recorded on the real 6.12 and 7.3 kernels (``kernel-run``) for the device
commands' windows and counters, the memory their buffers take (conventions item 19: the
OOM killer ends a command whose buffers do not fit) and commands that reach far past a
region. ``tests/scenario/recorded/NAME.hmm`` with ``{6.12,7.3}/NAME.jsonl``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hmmsim.kernel.profile import KERNELS
from hmmsim.kernel.system import System
from hmmsim.scenario.parse import Command
from hmmsim.scenario.run import reference_config, run_scenario_text

RECORDED = Path(__file__).parent / "recorded"
#: scenarios small enough to check the invariants after every command
_SMALL = ("dmirror_window_", "past_end_")


def _cases(*prefixes: str) -> list:
    return [pytest.param(p, k, id=f"{p.stem}-{k}") for p in sorted(RECORDED.glob("*.hmm"))
            if p.stem.startswith(prefixes) for k in KERNELS]


def _want(path: Path, kernel: str) -> list[str]:
    return (RECORDED / kernel / f"{path.stem}.jsonl").read_text().splitlines()


def _check(sys: System, cmd: Command) -> None:
    sys.check_invariants(full=True)
    sys.ls.assert_no_locks()


@pytest.mark.parametrize("path, kernel", _cases(*_SMALL))
def test_recorded_windows_and_past_end_match_the_real_kernel(path: Path, kernel: str) -> None:
    assert run_scenario_text(path.read_bytes(), reference_config(kernel), after=_check) == _want(path, kernel)


def _oom_cases() -> list:
    """Every OOM scenario printed the same on both kernels: 7.3 runs all, 6.12 the
    boundary pair of untouched READs (a full run takes half a minute)."""
    return [c for c in _cases("oom_") if c.values[1] == "7.3" or c.values[0].stem.startswith("oom_dread_")]


@pytest.mark.parametrize("path, kernel", _oom_cases())
def test_recorded_buffer_memory_matches_the_real_kernel(path: Path, kernel: str) -> None:
    """dmirror_bounce_init()'s vmalloc and the runner's populated buffer take RAM: the
    same commands pass or are OOM-killed as on the reference machine."""
    assert run_scenario_text(path.read_bytes(), reference_config(kernel)) == _want(path, kernel)


def test_commands_far_past_a_region_return_quickly() -> None:
    """Work is bounded by what is mapped: 2^22-page commands on a one-page region neither
    allocate memory for 16 GiB nor visit every page."""
    text = "\n".join(["hmmsim-scenario 1", "open d 0", "mmap a 1 rw private,anon", "fill a 0 1 3",
                      "dwrite d a 0 4194304 1", "dread d a 0 4194304", "dsnapshot d a 0 4194304",
                      "dcheck_exclusive d a 0 4194304", "check a 0 4194304 3", "fill a 0 4194304 3",
                      "read a 0 4194304", "touch a 0 4194304", ""])
    t0 = time.perf_counter()
    got = run_scenario_text(text)
    assert time.perf_counter() - t0 < 2.0
    assert got[3:] == [
        '{"line":5,"op":"dwrite","ret":-12}', '{"line":6,"op":"dread","ret":-12}',
        '{"line":7,"op":"dsnapshot","ret":-12}', '{"line":8,"op":"dcheck_exclusive","ret":0}',
        '{"line":9,"op":"check","page":1,"ret":"segv"}', '{"line":10,"op":"fill","page":1,"ret":"segv"}',
        '{"line":11,"op":"read","page":1,"ret":"segv"}', '{"line":12,"op":"touch","page":1,"ret":"segv"}']
