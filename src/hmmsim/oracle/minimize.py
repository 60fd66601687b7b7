"""Delta debugging of scenarios: the smallest scenario (by lines) that still shows a failure.

:func:`ddmin` is Zeller's algorithm over the body lines, with two structural passes that
keep scenarios valid: whole ``fork`` ... ``endfork`` blocks are removed as one unit, and a
block can be *flattened* (its ``fork``/``endfork`` lines removed, the body kept). A
candidate that does not parse, or that uses a name before defining it, counts as not
failing. The result is 1-minimal: removing any single line (or block) loses the failure."""

from __future__ import annotations

from collections.abc import Callable

from ..scenario.parse import Command, Fork, ScenarioParseError, parse_scenario
from .compare import compare_results
from .results import RunResult

__all__ = ("HEADER", "ddmin", "failure_signature", "is_valid", "minimize_lines", "model_claim", "scenario_text")

_KERNEL_ERRORS = ("kernel-oops", "kernel-hang")

HEADER = "hmmsim-scenario 1"


def scenario_text(lines: list[str]) -> str:
    """A scenario file from its body lines."""
    return "\n".join([HEADER, *lines]) + "\n"


def model_claim(model: RunResult) -> tuple[str, str] | None:
    """The model's own report of a kernel failure: ``(error, op)`` of its first
    ``kernel-oops``/``kernel-hang``/``internal`` record, or None."""
    for rec in model.records:
        if rec.get("error") in (*_KERNEL_ERRORS, "internal"):
            return str(rec["error"]), str(rec.get("op", ""))
    return None


def failure_signature(model: RunResult, kern: RunResult | None) -> tuple[str, ...] | None:
    """What failure a scenario shows (None if nothing); minimisation keeps it equal.

    Without a kernel run: the model's own claim, ``("model", error, op)``. With one: a
    *known kernel bug* ``("known-kernel-bug", crash|hang, op)`` when the model reports
    ``kernel-oops``/``kernel-hang`` at *op* and the kernel crashed or hung in that scenario,
    at that command or later (a corruption such as conventions item 27 oopses a few
    commands after the one that caused it); else the first difference ``(kind, op)``; else
    ``("kernel-warns", first WARN)`` when the outputs agree but the kernel WARNed.
    """
    claim = model_claim(model)
    if kern is None:
        return ("model", *claim) if claim else None
    _same, diffs = compare_results({"x": model}, {"x": kern})
    if (diffs and kern.outcome in ("crash", "hang") and diffs[0].a is not None
            and diffs[0].a.get("error") in _KERNEL_ERRORS):
        return ("known-kernel-bug", kern.outcome, str(diffs[0].a.get("op", "")))
    if diffs:
        return (diffs[0].kind, diffs[0].op)
    if kern.outcome == "warn":
        return ("kernel-warns", kern.events[0].message.split(" at ")[0] if kern.events else "")
    return None


def _names_ok(body: tuple) -> bool:
    for node in body:
        if isinstance(node, Command) and node.unknown_name:
            return False
        if isinstance(node, Fork) and not _names_ok(node.body):
            return False
    return True


def is_valid(lines: list[str]) -> bool:
    """The lines parse (forks balanced) and define every name before using it."""
    try:
        sc = parse_scenario(scenario_text(lines))
    except ScenarioParseError:
        return False
    return _names_ok(sc.body)


def _blocks(lines: list[str]) -> list[tuple[int, int]]:
    """``(fork index, endfork index)`` of every fork block, innermost first."""
    stack, out = [], []
    for i, raw in enumerate(lines):
        word = raw.split("#", 1)[0].split()
        if word[:1] == ["fork"]:
            stack.append(i)
        elif word[:1] == ["endfork"] and stack:
            out.append((stack.pop(), i))
    return sorted(out, key=lambda b: b[1] - b[0])


def ddmin(lines: list[str], fails: Callable[[list[str]], bool]) -> list[str]:
    """Zeller's ddmin over *lines* (each a unit), calling *fails* only on valid candidates."""
    def test(c: list[str]) -> bool:
        return is_valid(c) and fails(c)

    n = 2
    cur = list(lines)
    while len(cur) >= 2:
        size = max(1, len(cur) // n)
        chunks = [cur[i:i + size] for i in range(0, len(cur), size)]
        reduced = False
        for i in range(len(chunks)):
            complement = [x for j, ch in enumerate(chunks) if j != i for x in ch]
            if test(chunks[i]):
                cur, n, reduced = chunks[i], 2, True
                break
            if test(complement):
                cur, n, reduced = complement, max(n - 1, 2), True
                break
        if not reduced:
            if n >= len(cur):
                break
            n = min(len(cur), 2 * n)
    return cur


def minimize_lines(lines: list[str], fails: Callable[[list[str]], bool]) -> list[str]:
    """The full reduction: fork blocks removed or flattened where the failure stays, then
    ddmin, then single-line removals until nothing more can go (1-minimal)."""
    cache: dict[tuple[str, ...], bool] = {}

    def check(c: list[str]) -> bool:
        key = tuple(c)
        if key not in cache:
            cache[key] = is_valid(c) and fails(c)
        return cache[key]

    cur = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    changed = True
    while changed:
        changed = False
        for a, b in _blocks(cur):
            for cand in (cur[:a] + cur[b + 1:], cur[:a] + cur[a + 1:b] + cur[b + 1:]):
                if check(cand):
                    cur, changed = cand, True
                    break
            if changed:
                break
    cur = ddmin(cur, check)
    changed = True
    while changed:
        changed = False
        for i in range(len(cur)):
            cand = cur[:i] + cur[i + 1:]
            if check(cand):
                cur, changed = cand, True
                break
        if not changed:
            for a, b in _blocks(cur):
                cand = cur[:a] + cur[b + 1:]
                if check(cand):
                    cur, changed = cand, True
                    break
    return cur
