"""The differential-testing commands of ``hmmsim``: ``compare``, ``fuzz`` and ``minimize``.

``hmmsim compare A.jsonl B.jsonl``
    Compare two saved outputs (``hmmsim run -s`` or a kernel runner's stdout): the first
    difference per scenario, grouped by command. Exit 0 if all agree, 1 otherwise.
``hmmsim compare --kernel K FILE...``
    Run the files on the model and on the real kernel *K* (the runner command: see
    :mod:`hmmsim.oracle.backend`) and compare.
``hmmsim fuzz --seed S --count N [--kernel K]``
    Random scenarios over the whole language on both sides; the findings grouped into
    model-differs, kernel-warns, kernel-crashes, kernel-hangs and known-kernel-bug (the model
    reports the kernel's crash/hang where the kernel has it). ``--out DIR`` keeps the
    scenarios of every finding.
``hmmsim oracle run --kernel K FILE...``, ``hmmsim oracle runner --build``
    Boot a kernel image and run scenarios or hmm-tests on it; build the C scenario runner
    (:mod:`hmmsim.oracle.run`).
``hmmsim minimize FILE --kernel K``
    Delta debugging over the file's lines down to a minimal scenario that still shows the
    same failure (same kind at the same command: a model/kernel difference, a kernel crash
    or hang, or a kernel WARN). ``--model-only`` minimises what the model alone reports
    (``kernel-oops``/``kernel-hang``/``internal``) without a kernel.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..kernel.profile import DEFAULT_KERNEL, KERNELS
from .backend import KernelRunner, find_runner, run_model
from .compare import compare_results, format_report
from .fuzz import fuzz
from .minimize import minimize_lines, scenario_text
from .results import RunResult, parse_outputs
from .run import add_oracle_parsers, oracle_command

__all__ = ("add_parsers", "run_command")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's type
    """Add the subcommands to ``hmmsim``'s parser."""
    c = sub.add_parser("compare", help="compare model and kernel outputs, first difference per scenario")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--kernel", choices=tuple(KERNELS), default=None,
                   help="run FILEs (scenarios) on the model and this real kernel; without it FILEs are two outputs")
    c.add_argument("--runner", default=None, help="the kernel runner command (default $HMMSIM_KERNEL_RUNNER, else `hmmsim oracle run` "
                   "with the cached image of --kernel, else kernel-run)")
    f = sub.add_parser("fuzz", help="random scenarios on model and kernel, findings grouped")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--count", type=int, default=20)
    f.add_argument("--length", type=int, default=None, help="commands per scenario (default 6-20)")
    f.add_argument("--kernel", choices=tuple(KERNELS), default=DEFAULT_KERNEL)
    f.add_argument("--runner", default=None)
    f.add_argument("--out", default=None, metavar="DIR", help="write the scenarios of findings here")
    m = sub.add_parser("minimize", help="delta-debug a scenario down to a minimal one with the same failure")
    m.add_argument("file", metavar="FILE")
    m.add_argument("--kernel", choices=tuple(KERNELS), default=DEFAULT_KERNEL)
    m.add_argument("--runner", default=None)
    m.add_argument("--model-only", action="store_true", help="minimise what the model alone reports")
    o = sub.add_parser("oracle", help="real kernels: boot an image and run scenarios on it, build the C runner")
    osub = o.add_subparsers(dest="oracle_cmd", required=True, metavar="{run,runner}")
    add_oracle_parsers(osub)


def _kernel_side(args: argparse.Namespace) -> Callable[[dict[str, str]], dict[str, RunResult]] | None:
    cmd = find_runner(args.runner, args.kernel)
    if cmd is None:
        print(f"hmmsim: no kernel runner: build an image (hmmsim oracle build --kernel {args.kernel}), "
              "give --runner CMD or set HMMSIM_KERNEL_RUNNER (a command with kernel-run's interface)",
              file=sys.stderr)
        return None
    runner = KernelRunner(cmd)
    return lambda texts: runner.run(texts, args.kernel)


def _signature(model: RunResult, kern: RunResult | None) -> tuple[str, ...] | None:
    """What failure a scenario shows: None if nothing."""
    if kern is None:
        for rec in model.records:
            if rec.get("error") in ("kernel-oops", "kernel-hang", "internal"):
                return ("model", str(rec["error"]), str(rec.get("op", "")))
        return None
    _same, diffs = compare_results({"x": model}, {"x": kern})
    if diffs:
        return (diffs[0].kind, diffs[0].op)
    if kern.outcome == "warn":
        return ("kernel-warns", kern.events[0].message.split(" at ")[0] if kern.events else "")
    return None


def _cmd_compare(args: argparse.Namespace) -> int:
    if args.kernel is None:
        if len(args.files) != 2:
            print("hmmsim compare: give two output files, or --kernel K and scenario files", file=sys.stderr)
            return 2
        a, b = (parse_outputs(Path(p).read_text()) for p in args.files)
        same, diffs = compare_results(a, b)
        print(format_report(same, diffs, args.files[0], args.files[1]))
        return 1 if diffs else 0
    kernel_side = _kernel_side(args)
    if kernel_side is None:
        return 2
    texts = {Path(p).name: Path(p).read_text() for p in args.files}
    model = run_model(texts, args.kernel)
    kern = kernel_side(texts)
    same, diffs = compare_results(model, kern)
    print(format_report(same, diffs, "hmmsim", f"linux-{args.kernel}"))
    return 1 if diffs else 0


def _cmd_fuzz(args: argparse.Namespace) -> int:
    kernel_side = _kernel_side(args)
    if kernel_side is None:
        return 2
    rep, texts = fuzz(args.seed, args.count, lambda t: run_model(t, args.kernel), kernel_side, args.length)
    print(f"{args.count} scenarios (seed {args.seed}, linux {args.kernel}): {rep.agree} agree")
    for group, items in sorted(rep.groups.items()):
        print(f"{group}: {len(items)}")
        for name, what in items:
            where = getattr(what, "op", None) or getattr(what, "outcome", "")
            print(f"  {name}: {where}")
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / name).write_text(texts[name])
    return 1 if any(g != "known-kernel-bug" for g in rep.groups) else 0


def _cmd_minimize(args: argparse.Namespace) -> int:
    lines = Path(args.file).read_text().splitlines()[1:]
    kernel_side = None if args.model_only else _kernel_side(args)
    if kernel_side is None and not args.model_only:
        return 2

    def sig_of(body: list[str]) -> tuple[str, ...] | None:
        t = {"min.hmm": scenario_text(body)}
        m = run_model(t, args.kernel)["min.hmm"]
        k = kernel_side(t)["min.hmm"] if kernel_side is not None else None
        return _signature(m, k)

    want = sig_of(lines)
    if want is None:
        print("hmmsim minimize: the scenario shows no failure", file=sys.stderr)
        return 1
    print(f"failure: {' '.join(want)}", file=sys.stderr)
    small = minimize_lines(lines, lambda body: sig_of(body) == want)
    sys.stdout.write(scenario_text(small))
    print(f"{len(lines)} -> {len(small)} lines", file=sys.stderr)
    return 0


def run_command(args: argparse.Namespace, extra: list[str] | None = None) -> int | None:
    """Run an oracle subcommand (None if *args* is not one); *extra* are the arguments
    after ``--`` (``hmmsim oracle run --selftest -- ARGS``)."""
    if args.cmd == "oracle":
        return oracle_command(args, extra or [])
    return {"compare": _cmd_compare, "fuzz": _cmd_fuzz, "minimize": _cmd_minimize}.get(args.cmd, lambda a: None)(args)
