"""Differential testing: parsing real kernel runs (recorded transcripts of
``../shared/oracle/kernel-run``), comparing, fuzzing and minimising. No kernel is booted."""

from __future__ import annotations

from pathlib import Path

import pytest

from hmmsim.cli import main
from hmmsim.oracle.backend import run_model
from hmmsim.oracle.cli import _signature
from hmmsim.oracle.compare import (
    compare_results,
    first_difference,
    format_report,
    group_by_command,
)
from hmmsim.oracle.fuzz import fuzz, generate
from hmmsim.oracle.minimize import is_valid, minimize_lines, scenario_text
from hmmsim.oracle.results import parse_kernel_run, parse_outputs, split_outputs

DATA = Path(__file__).parent / "data"


def _kernel(name: str) -> dict:
    return parse_kernel_run((DATA / f"{name}.stdout").read_text(), (DATA / f"{name}.stderr").read_text(),
                            int((DATA / f"{name}.status").read_text()), [f"{name}.hmm"])


@pytest.mark.parametrize("name, outcome, nrec", [("crash", "crash", 5), ("warn", "warn", 5), ("hang", "hang", 2)])
def test_kernel_transcripts_are_classified(name: str, outcome: str, nrec: int) -> None:
    r = _kernel(name)[f"{name}.hmm"]
    assert r.outcome == outcome and len(r.records) == nrec
    if name == "crash":
        assert [e.kind for e in r.events][:2] == ["crash", "crash"]
        assert "unable to handle page fault" in r.events[0].message
    if name == "warn":
        assert r.events[0].kind == "warn" and "memremap_pages" in r.events[0].message


def test_split_outputs_and_later_files_of_a_crashed_boot_are_skipped() -> None:
    text = '{"file":"a.hmm"}\n{"line":2,"op":"mmap","ret":0}\n{"file":"b.hmm"}\n{"line":2,"op":"open","ret":0}\n'
    assert [len(v) for v in split_outputs(text).values()] == [1, 1]
    res = parse_kernel_run(text, "kernel-run: kernel: [ 1.0] Oops: 0000 [#1] SMP\n", 125, ["a.hmm", "b.hmm", "c.hmm"])
    assert (res["a.hmm"].outcome, res["b.hmm"].outcome, res["c.hmm"].outcome) == ("ok", "crash", "skipped")


def test_model_against_the_crash_transcript_is_a_known_kernel_bug() -> None:
    text = (DATA / "crash.hmm").read_text()
    model = run_model({"crash.hmm": text}, "6.12")
    same, diffs = compare_results(model, _kernel("crash"))
    assert same == [] and len(diffs) == 1
    d = diffs[0]
    assert (d.index, d.op, d.line, d.kind) == (5, "dread", 7, "known-kernel-bug")
    assert "known-kernel-bug at dread: 1" in format_report(same, diffs)
    # the hang: the model says kernel-hang where the kernel timed out
    model = run_model({"hang.hmm": (DATA / "hang.hmm").read_text()}, "7.3")
    _s, diffs = compare_results(model, _kernel("hang"))
    assert [d.kind for d in diffs] == ["known-kernel-bug"] and diffs[0].a["error"] == "kernel-hang"


def test_first_difference_and_grouping() -> None:
    a = [{"line": 2, "op": "mmap", "ret": 0}, {"line": 3, "op": "dread", "ret": 0}]
    b = [{"line": 2, "op": "mmap", "ret": 0}, {"line": 3, "op": "dread", "ret": -14}]
    assert first_difference(a, a) is None and first_difference(a, b) == 1 and first_difference(a, a[:1]) == 1
    ra, rb = parse_outputs("\n".join(map(str, []))), parse_outputs("")
    assert compare_results(ra, rb) == ([], [])
    from hmmsim.oracle.results import RunResult
    same, diffs = compare_results({"x": RunResult("x", a), "y": RunResult("y", a)},
                                  {"x": RunResult("x", b), "y": RunResult("y", a)})
    assert same == ["y"] and list(group_by_command(diffs)) == [("differs", "dread")]


def test_generated_scenarios_are_valid_reproducible_and_cover_the_language() -> None:
    seen = set()
    for s in range(60):
        lines = generate(s)
        assert is_valid(lines) and generate(s) == lines
        seen |= {ln.split()[0] for ln in lines}
    assert {"mmap", "fill", "fork", "endfork", "open", "dmigrate", "dread", "dsnapshot", "uffd",
            "madvise", "mremap", "dflags"} <= seen


def test_fuzz_groups_findings() -> None:
    """A fake kernel side: agrees with the model, except that it crashes on scenario 1 and
    prints something else on scenario 2."""
    def kernel(texts: dict) -> dict:
        res = run_model(texts, "7.3")
        names = list(res)
        res[names[1]].records = res[names[1]].records[:1]
        res[names[1]].outcome = "crash"
        res[names[2]].records = [dict(r, ret=-99) if i == 1 else r for i, r in enumerate(res[names[2]].records)]
        return res
    rep, texts = fuzz(7, 4, lambda t: run_model(t, "7.3"), kernel, length=6, fresh_boot=None)
    assert len(texts) == 4 and rep.agree == 2
    assert {g: len(v) for g, v in rep.groups.items()} == {"kernel-crashes": 1, "model-differs": 1}


def test_minimize_keeps_the_failure_and_balances_forks() -> None:
    lines = ["mmap a 4 rw private,anon", "fill a 0 4 1", "open d 0", "fork", "check a 0 4 1",
             "open e 1", "endfork", "mmap b 8 rw private,anon", "fill b 0 8 2", "dread d a 0 4", "touch b 0 8"]
    fails = lambda body: any(ln.startswith("dread") for ln in body)  # noqa: E731
    small = minimize_lines(lines, fails)
    assert small == ["mmap a 4 rw private,anon", "open d 0", "dread d a 0 4"]
    assert is_valid(small)


def test_minimize_a_model_reported_kernel_oops(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    body = ["open d 0", "open e 0", "mmap x 2 rw private,anon", "fill x 0 2 9", "mmap a 4 rw private,anon",
            "fill a 0 4 1", "fork", "touch a 0 1", "endfork", "dmigrate d a 0 4", "check x 0 2 9", "dread e a 0 4"]
    f = tmp_path / "oops.hmm"
    f.write_text(scenario_text(body))
    assert main(["minimize", str(f), "--kernel", "6.12", "--model-only"]) == 0
    out = capsys.readouterr()
    small = out.out.splitlines()[1:]
    assert len(small) <= 5 and small[-1] == "dread e a 0 4" and "12 -> " in out.err
    m = run_model({"s": scenario_text(small)}, "6.12")["s"]
    assert _signature(m, None) == ("model", "kernel-oops", "dread")


def test_compare_two_saved_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text('{"file":"s.hmm"}\n{"line":2,"op":"mmap","ret":0}\n{"line":3,"op":"dread","ret":0}\n')
    b.write_text('{"file":"s.hmm"}\n{"line":2,"op":"mmap","ret":0}\n{"line":3,"op":"dread","ret":-14}\n')
    assert main(["compare", str(a), str(a)]) == 0
    assert main(["compare", str(a), str(b)]) == 1
    assert "differs at dread: 1" in capsys.readouterr().out
