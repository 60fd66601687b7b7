"""The fuzzer's findings on the real 7.3 kernel, recorded (``../shared/oracle/kernel-run``
transcripts in ``data/``): ``hmmsim fuzz --seed 2 --count 12 --theme thp-device --kernel
7.3`` re-found conventions item 27 (fuzz-2-10: a THP shared with a fork child migrating to an
order-0 destination) and item 28 (fuzz-2-9: RELEASE after splitting a device-coherent THP
hangs); ``hmmsim minimize`` cut them to 7 and 8 lines. No kernel is booted here."""

from __future__ import annotations

from pathlib import Path

import pytest

from hmmsim.cli import main
from hmmsim.oracle.backend import run_model
from hmmsim.oracle.fuzz import THEMES, generate, group_results, uses_device_memory
from hmmsim.oracle.minimize import (
    failure_signature,
    is_valid,
    model_claim,
    scenario_text,
)
from hmmsim.oracle.results import RunResult, parse_kernel_run

DATA = Path(__file__).parent / "data"


def _kernel(name: str) -> RunResult:
    return parse_kernel_run((DATA / f"{name}.stdout").read_text(), (DATA / f"{name}.stderr").read_text(),
                            int((DATA / f"{name}.status").read_text()), [f"{name}.hmm"])[f"{name}.hmm"]


def test_the_fuzz_finding_is_reproducible_from_its_seed() -> None:
    """``fuzz --seed 2 --theme thp-device`` names scenario i ``fuzz-2-i`` and draws it from
    seed 2 * 100003 + i."""
    assert scenario_text(generate(2 * 100_003 + 10, None, "thp-device")) == (DATA / "thp_fork_order0.hmm").read_text()


def test_item_27_is_a_known_kernel_crash_though_the_kernel_oopses_later() -> None:
    """The model reports kernel-oops at the child's dmigrate (line 7); the real 7.3 kernel
    printed that dmigrate's line and more, then reported bad rss counters and oopsed."""
    name = "thp_fork_order0.hmm"
    model = run_model({name: (DATA / name).read_text()}, "7.3")
    kern = {name: _kernel("thp_fork_order0")}
    assert kern[name].outcome == "crash"
    assert any("Bad rss-counter" in e.message for e in kern[name].events)
    rep = group_results([name], model, kern)
    assert set(rep.groups) == {"kernel-crashes"} and rep.unexplained == 0
    f = rep.groups["kernel-crashes"][0]
    assert f.known and f.where == "dmigrate line 7" and "remove_migration_pmd" in f.detail
    text = rep.format()
    assert "kernel-crashes: 1 (1 known kernel bug" in text and "known kernel bug: remove_migration_pmd" in text
    assert failure_signature(model[name], kern[name]) == ("known-kernel-bug", "crash", "dmigrate")


def test_item_27_minimized() -> None:
    body = (DATA / "thp_fork_order0_min.hmm").read_text().splitlines()[1:]
    assert len(body) <= 8 and is_valid(body)
    name = "thp_fork_order0_min.hmm"
    model = run_model({name: (DATA / name).read_text()}, "7.3")[name]
    assert model_claim(model) == ("kernel-oops", "dmigrate")
    assert failure_signature(model, _kernel("thp_fork_order0_min")) == ("known-kernel-bug", "crash", "dmigrate")
    # the same lines without the fork run on 7.3 without a claim (the THP is not shared)
    flat = [ln for ln in body if ln not in ("fork", "endfork")]
    assert model_claim(run_model({"f": scenario_text(flat)}, "7.3")["f"]) is None


def test_a_crash_the_model_does_not_claim_is_not_known() -> None:
    name = "thp_fork_order0_min.hmm"
    body = (DATA / name).read_text().splitlines()[1:6]  # stop before the fork
    model = run_model({name: scenario_text(body)}, "7.3")
    kern = {name: _kernel("thp_fork_order0_min")}
    rep = group_results([name], model, kern)
    assert [f.known for f in rep.groups["model-differs"]] == [False] and rep.unexplained == 1


def test_uses_device_memory_and_themes() -> None:
    assert uses_device_memory(["open h 2", "mmap a 1 rw private,anon"])
    assert not uses_device_memory(["open h 0"]) and uses_device_memory(["open h 0"], coherent_only=False)
    assert not uses_device_memory(["mmap a 1 rw private,anon  # open h 3"])
    for theme in THEMES:
        for s in range(8):
            lines = generate(s, None, theme)
            assert is_valid(lines)
            if theme == "thp-device":
                assert lines[0].startswith("open ") and "align=512" in lines[1] and lines[2].endswith("hugepage")


@pytest.mark.parametrize("theme", ["thp-device"])
def test_thp_device_theme_draws_the_item_27_and_28_ingredients(theme: str) -> None:
    seen = set()
    for s in range(40):
        lines = generate(s, None, theme)
        seen |= {ln.split()[0] for ln in lines}
        seen |= {"whole-thp" for ln in lines if ln.startswith("dmigrate ") and ln.endswith(" 0 512")}
    assert {"fork", "endfork", "drelease", "dflags", "dmigrate", "dmigrate_sys", "whole-thp"} <= seen


def test_minimize_the_item_27_finding_model_only(capsys: pytest.CaptureFixture[str]) -> None:
    """Minimising what the model claims alone gives the file the real kernel run gave."""
    assert main(["minimize", str(DATA / "thp_fork_order0.hmm"), "--kernel", "7.3", "--model-only"]) == 0
    out = capsys.readouterr()
    assert out.out == (DATA / "thp_fork_order0_min.hmm").read_text()
    assert "31 -> 7 lines" in out.err


@pytest.mark.parametrize("name", ["coherent_thp_split_release", "coherent_thp_split_release_min"])
def test_item_28_is_a_known_kernel_hang(name: str) -> None:
    """fuzz-2-9: a coherent device takes the whole THP after a RELEASE, a partial
    MIGRATE_TO_DEV splits it, and the next RELEASE never returns on 7.3 (the runner's
    timeout, status 124); the model reports kernel-hang at that drelease."""
    if name.endswith("_min"):
        body = (DATA / f"{name}.hmm").read_text().splitlines()[1:]
        assert len(body) <= 8 and is_valid(body)
    else:
        assert scenario_text(generate(2 * 100_003 + 9, None, "thp-device")) == (DATA / f"{name}.hmm").read_text()
    f = f"{name}.hmm"
    model = run_model({f: (DATA / f).read_text()}, "7.3")
    kern = {f: _kernel(name)}
    assert kern[f].outcome == "hang"
    rep = group_results([f], model, kern)
    assert set(rep.groups) == {"kernel-hangs"} and rep.unexplained == 0
    finding = rep.groups["kernel-hangs"][0]
    assert finding.known and finding.where.startswith("drelease line") and "conventions item 28" in finding.detail
    assert failure_signature(model[f], kern[f]) == ("known-kernel-bug", "hang", "drelease")
