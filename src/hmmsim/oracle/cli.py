"""The differential-testing commands of ``hmmsim``: ``compare``, ``fuzz`` and ``minimize``.

``hmmsim compare A.jsonl B.jsonl``
    Compare two saved outputs (``hmmsim run -s`` or a kernel runner's stdout): the first
    difference per scenario, grouped by command. Exit 0 if all agree, 1 otherwise.
``hmmsim compare --kernel K FILE...``
    Run the files on the model and on the real kernel *K* (the runner command: see
    :mod:`hmmsim.oracle.backend`) and compare.
``hmmsim fuzz --seed S --count N [--kernel K]``
    Random scenarios over the whole language on both sides; the findings grouped into
    model-differs, kernel-crashes, kernel-hangs (each crash/hang marked a known kernel bug
    when the model reports it where the kernel has it) and kernel-warns. ``--theme`` draws
    only one kind of scenario (``thp-device``: device-THP sequences); ``--out DIR`` keeps the
    scenarios of every finding. Exit 1 when anything is not explained by the model.
``hmmsim oracle build --kernel 6.12|7.3|PATH``
    Build a small bootable kernel with test_hmm and its hmm-tests into the image cache
    (:mod:`hmmsim.oracle.build`).
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
from .build import add_build_parser, cmd_build
from .compare import compare_results, format_report
from .fuzz import THEMES, fuzz, uses_device_memory
from .minimize import failure_signature, minimize_lines, model_claim, scenario_text
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
    f.add_argument("--timeout", type=int, default=120, help="seconds before a kernel run counts as a hang")
    f.add_argument("--theme", choices=tuple(THEMES), default=None,
                   help="generate only scenarios of this theme (default: drawn per scenario)")
    f.add_argument("--fresh-boot", choices=("auto", "always", "never"), default="auto",
                   help="a boot per scenario: auto = for those using a coherent device (its memory outlives them)")
    m = sub.add_parser("minimize", help="delta-debug a scenario down to a minimal one with the same failure")
    m.add_argument("file", metavar="FILE")
    m.add_argument("--kernel", choices=tuple(KERNELS), default=DEFAULT_KERNEL)
    m.add_argument("--runner", default=None)
    m.add_argument("--model-only", action="store_true", help="minimise what the model alone reports")
    m.add_argument("--timeout", type=int, default=60, help="seconds before a kernel run counts as a hang")
    o = sub.add_parser("oracle", help="real kernels: build an image, boot it and run scenarios on it, build the C runner")
    osub = o.add_subparsers(dest="oracle_cmd", required=True, metavar="{build,run,runner}")
    add_build_parser(osub)
    add_oracle_parsers(osub)


def _kernel_side(args: argparse.Namespace) -> Callable[[dict[str, str]], dict[str, RunResult]] | None:
    cmd = find_runner(args.runner, args.kernel)
    if cmd is None:
        print(f"hmmsim: no kernel runner: build an image (hmmsim oracle build --kernel {args.kernel}), "
              "give --runner CMD or set HMMSIM_KERNEL_RUNNER (a command with kernel-run's interface)",
              file=sys.stderr)
        return None
    runner = KernelRunner(cmd, timeout=getattr(args, "timeout", 120))
    return lambda texts: runner.run(texts, args.kernel)


_signature = failure_signature


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
    rep, texts = fuzz(args.seed, args.count, lambda t: run_model(t, args.kernel), kernel_side, args.length,
                      args.theme, None if args.fresh_boot == "never" else
                      (lambda b: True) if args.fresh_boot == "always" else uses_device_memory)
    theme = f", theme {args.theme}" if args.theme else ""
    print(f"{args.count} scenarios (seed {args.seed}{theme}, linux {args.kernel}): {rep.agree} agree")
    report = rep.format()
    if report:
        print(report)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for items in rep.groups.values():
            for f in items:
                (Path(args.out) / f.name).write_text(texts[f.name])
    return 1 if rep.unexplained else 0


def _cmd_minimize(args: argparse.Namespace) -> int:
    lines = Path(args.file).read_text().splitlines()[1:]
    kernel_side = None if args.model_only else _kernel_side(args)
    if kernel_side is None and not args.model_only:
        return 2

    known: list[tuple[str, str] | None] = [None]

    def sig_of(body: list[str]) -> tuple[str, ...] | None:
        t = {"min.hmm": scenario_text(body)}
        m = run_model(t, args.kernel)["min.hmm"]
        if known[0] is not None and model_claim(m) != known[0]:
            return None  # a known kernel bug the model no longer reports: no boot needed
        k = kernel_side(t)["min.hmm"] if kernel_side is not None else None
        return _signature(m, k)

    want = sig_of(lines)
    if want is None:
        print("hmmsim minimize: the scenario shows no failure", file=sys.stderr)
        return 1
    print(f"failure: {' '.join(want)}", file=sys.stderr)
    if want[0] == "known-kernel-bug":
        known[0] = model_claim(run_model({"min.hmm": scenario_text(lines)}, args.kernel)["min.hmm"])
    small = minimize_lines(lines, lambda body: sig_of(body) == want)
    sys.stdout.write(scenario_text(small))
    print(f"{len(lines)} -> {len(small)} lines", file=sys.stderr)
    return 0


def run_command(args: argparse.Namespace, extra: list[str] | None = None) -> int | None:
    """Run an oracle subcommand (None if *args* is not one); *extra* are the arguments
    after ``--`` (``hmmsim oracle run --selftest -- ARGS``)."""
    if args.cmd == "oracle" and args.oracle_cmd == "build":
        return cmd_build(args)
    if args.cmd == "oracle":
        return oracle_command(args, extra or [])
    return {"compare": _cmd_compare, "fuzz": _cmd_fuzz, "minimize": _cmd_minimize}.get(args.cmd, lambda a: None)(args)
