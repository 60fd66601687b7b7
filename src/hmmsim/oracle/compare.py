"""Compare two runs of the same scenarios (model against kernel, or two kernels): the first
difference per scenario, grouped by the command where the runs part.

A scenario *agrees* when both printed the same records. Otherwise its :class:`Difference`
names the first differing line: the command (``op``) and line number, what each side
printed there (None when one side stopped early), and the outcome of each side (a kernel
crash or hang ends the kernel's output; hmmsim then prints ``kernel-oops``/``kernel-hang``
where it knows the kernel's bug: that is a *known kernel bug*, not a model error)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from .results import RunResult

__all__ = ("Difference", "compare_results", "first_difference", "format_report", "group_by_command")


@dataclass
class Difference:
    """Where scenario *name* first differs between side A and side B."""

    name: str
    index: int
    a: dict[str, Any] | None
    b: dict[str, Any] | None
    outcome_a: str = "ok"
    outcome_b: str = "ok"

    @property
    def op(self) -> str:
        """The command the runs part at (``end`` when one side only printed more lines
        and the other ended normally)."""
        for rec in (self.a, self.b):
            if rec is not None and "op" in rec:
                return str(rec["op"])
        return "end"

    @property
    def line(self) -> int | None:
        for rec in (self.a, self.b):
            if rec is not None and "line" in rec:
                return int(rec["line"])
        return None

    @property
    def known_kernel_bug(self) -> bool:
        """A prints ``kernel-oops``/``kernel-hang`` where B (the kernel) crashed or hung."""
        return (self.a is not None and self.a.get("error") in ("kernel-oops", "kernel-hang")
                and self.b is None and self.outcome_b in ("crash", "hang"))

    @property
    def kind(self) -> str:
        """``known-kernel-bug``, ``kernel-crash``/``kernel-hang`` (B stopped, A did not
        say why) or ``differs``."""
        if self.known_kernel_bug:
            return "known-kernel-bug"
        if self.b is None and self.outcome_b in ("crash", "hang"):
            return f"kernel-{self.outcome_b}"
        return "differs"


def first_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> int | None:
    """Index of the first record that differs (or where one list ends), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    if len(a) != len(b):
        return min(len(a), len(b))
    return None


def compare_results(a: dict[str, RunResult], b: dict[str, RunResult]) -> tuple[list[str], list[Difference]]:
    """Compare every scenario both sides ran: (names that agree, differences)."""
    same, diffs = [], []
    for name in a:
        if name not in b or b[name].outcome == "skipped":
            continue
        ra, rb = a[name].records, b[name].records
        i = first_difference(ra, rb)
        if i is None:
            same.append(name)
            continue
        diffs.append(Difference(name, i, ra[i] if i < len(ra) else None, rb[i] if i < len(rb) else None,
                                a[name].outcome, b[name].outcome))
    return same, diffs


def group_by_command(diffs: list[Difference]) -> dict[tuple[str, str], list[Difference]]:
    """Differences grouped by (kind, command)."""
    groups: dict[tuple[str, str], list[Difference]] = defaultdict(list)
    for d in diffs:
        groups[(d.kind, d.op)].append(d)
    return dict(sorted(groups.items()))


def format_report(same: list[str], diffs: list[Difference], label_a: str = "A", label_b: str = "B") -> str:
    """A readable report: counts, then each group with its scenarios' first differences."""
    out = [f"{len(same)} scenario(s) agree, {len(diffs)} differ"]
    for (kind, op), ds in group_by_command(diffs).items():
        out.append(f"\n{kind} at {op}: {len(ds)}")
        for d in ds:
            out.append(f"  {d.name} line {d.line}:")
            out.append(f"    {label_a}: {_fmt(d.a, d.outcome_a)}")
            out.append(f"    {label_b}: {_fmt(d.b, d.outcome_b)}")
    return "\n".join(out)


def _fmt(rec: dict[str, Any] | None, outcome: str) -> str:
    if rec is None:
        return f"(no more lines; {outcome})"
    import json
    return json.dumps(rec, sort_keys=True, separators=(",", ":"))
