"""README.md stays true: its Python examples run and print what their comments say, and
its scenario example prints the records its comments show."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

from hmmsim.scenario.run import reference_config, run_scenario_text

README = (Path(__file__).parents[1] / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    """The fenced blocks of README.md whose info string is *lang* ("" for plain ones)."""
    blocks: list[str] = []
    current: list[str] | None = None
    info = ""
    for line in README.splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_readme_python_examples_print_what_they_say() -> None:
    blocks = _blocks("python")
    assert len(blocks) == 2
    ns: dict = {"__name__": "readme"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in blocks:
            exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's own code
    printed = out.getvalue().splitlines()
    comments = [line.split("#", 1)[1].strip() for code in blocks for line in code.splitlines()
                if line.startswith("print(")]
    assert len(printed) == len(comments) == 4
    assert printed[0] == comments[0] == "16 1 b'hello'"
    counts = [int(x) for x in printed[1].split()]
    assert len(counts) == 3 and all(c > 0 for c in counts), "walks, faults and lock takes of a first read"
    assert printed[2] == comments[2].split(":")[0] == "[2, 17, 17]"
    assert printed[3] == comments[3] == "0 16"
    ns["sys"].check_invariants(full=True)


def test_readme_scenario_example_prints_its_comments() -> None:
    block = next(b for b in _blocks("") if b.startswith("hmmsim-scenario 1"))
    got = {r["line"]: r for r in map(json.loads, run_scenario_text(block, reference_config()))}
    for n, line in enumerate(block.splitlines(), 1):
        if "# {" not in line:
            continue
        shown = line.split("# ", 1)[1].split("}", 1)[0] + "}"
        for key, value in re.findall(r'"(\w+)":("[^"]*"|-?\d+)', shown):
            value = json.loads(value)
            if isinstance(value, str) and value.endswith("..."):
                assert str(got[n][key]).startswith(value[:-3]), (n, key)
            else:
                assert got[n][key] == value, (n, key)
