"""The scenario runner when the kernel raises under a command: the caller sees the
original exception (not a lock error from the runner's clean-up, which unmaps the
ioctl's data buffer while the failed ``dread`` used to leave ``mmap_lock`` held)."""

from __future__ import annotations

import pytest

from hmmsim.scenario.parse import parse_scenario
from hmmsim.scenario.run import reference_config, run_scenario


class Injected(RuntimeError):
    """The fault a test injects."""


def _raise(*_a: object, **_k: object) -> None:
    raise Injected("injected fault")


def test_dread_over_a_raising_fault_shows_the_original_error(monkeypatch) -> None:
    sc = parse_scenario("hmmsim-scenario 1\nopen d 0\nmmap a 8 rw private,anon\ndread d a 0 8\n")
    monkeypatch.setattr("hmmsim.hmm.hmm.handle_mm_fault_range", _raise)
    seen: list[object] = []
    with pytest.raises(Injected, match="injected fault"):
        run_scenario(sc, seen.append, reference_config())
