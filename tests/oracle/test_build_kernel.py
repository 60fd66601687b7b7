"""End to end, on this machine only (``pytest -m kernel``; deselected by default): build (or
find in the cache) the 7.3 image with ``hmmsim oracle build`` and run one public golden on it
with ``hmmsim oracle run``; the output must be the real kernel's."""

from __future__ import annotations

from pathlib import Path

import pytest

from hmmsim.cli import main

GOLDEN = Path(__file__).parents[1] / "scenario" / "golden"


@pytest.mark.kernel
def test_oracle_build_and_run_reproduce_a_golden(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("hmmsim.oracle.run", reason="hmmsim oracle run is not in this tree")
    assert main(["oracle", "build", "--kernel", "7.3"]) == 0
    capsys.readouterr()
    name = "device_migrate_private_basic"
    assert main(["oracle", "run", "--kernel", "7.3", str(GOLDEN / f"{name}.hmm")]) == 0
    got = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    want = (GOLDEN / "7.3" / f"{name}.jsonl").read_text().splitlines()
    assert got == want
