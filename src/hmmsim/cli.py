"""The ``hmmsim`` command.

``hmmsim run FILE...``
    Run scenarios (``spec/scenario.md``), each on a fresh machine, printing their JSON
    lines. With several files (or ``-s``) each file's output is preceded by
    ``{"file":"NAME"}``; ``-t SEC`` stops a file after SEC seconds with
    ``{"error":"timeout","seconds":SEC}``.
``hmmsim selftest``
    Run the --kernel release's ``hmm-tests.c`` (ported tests; the others SKIP with a
    reason) on every fixture variant with kselftest output
    (``--json`` for machine-readable results, ``-r NAME`` / ``-v VARIANT`` to select).

Exit status: 0 if everything ran (a scenario's own errors are part of its output), 1 if
a selftest failed or the model hit an internal error, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .kernel.profile import DEFAULT_KERNEL, KERNELS

__all__ = ("main",)


def _cmd_run(args: argparse.Namespace) -> int:
    from .scenario.parse import ScenarioParseError, parse_scenario
    from .scenario.run import dumps, reference_config, run_scenario

    status = 0
    separators = args.separators or len(args.files) > 1
    for path in args.files:
        def emit(rec: dict[str, Any]) -> None:
            print(dumps(rec), flush=True)

        if separators:
            print(dumps({"file": os.path.basename(path)}), flush=True)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            print(dumps({"error": "exit", "status": 2, "message": str(e)}), flush=True)
            status = max(status, 2)
            continue
        try:
            scenario = parse_scenario(data)
        except ScenarioParseError as e:
            print(dumps({"error": "parse", "line": e.line}), flush=True)
            continue
        if args.timeout:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.alarm(args.timeout)
        try:
            run_scenario(scenario, emit, reference_config(args.kernel))
        except _Timeout:
            print(dumps({"error": "timeout", "seconds": args.timeout}), flush=True)
        except Exception as e:  # a model bug (an assertion, an unexpected error): say so, go on
            print(dumps({"error": "internal", "message": f"{type(e).__name__}: {e}"}), flush=True)
            if args.verbose:
                traceback.print_exc()
            status = 1
        finally:
            if args.timeout:
                signal.alarm(0)
    return status


class _Timeout(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def _cmd_selftest(args: argparse.Namespace) -> int:
    from .selftests.harness import run_tests, select_tests

    selected = select_tests(args.test or (), args.variant or (), args.kernel)
    if args.list:
        for fixture, name, _fn, v in selected:
            print(f"{fixture}.{v.name}.{name}")
        return 0
    if not selected:
        print("no test matches", file=sys.stderr)
        return 2
    from .scenario.run import reference_config
    results = run_tests(selected, None if args.json else sys.stdout, reference_config(args.kernel))
    if args.json:
        print(json.dumps([{"name": r.name, "status": r.status, "message": r.message,
                           "seconds": round(r.seconds, 3)} for r in results], indent=1))
    elif args.summary:
        from rich.console import Console
        from rich.table import Table
        t = Table(title="hmm-tests on hmmsim")
        for col in ("test", "status", "seconds"):
            t.add_column(col)
        for r in results:
            style = {"pass": "green", "skip": "yellow"}.get(r.status, "red")
            t.add_row(r.name, f"[{style}]{r.status}[/{style}]", f"{r.seconds:.2f}")
        Console().print(t)
    return 1 if any(r.status == "fail" for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hmmsim`` command."""
    ap = argparse.ArgumentParser(prog="hmmsim", description="An executable model of Linux HMM.")
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="run scenario files and print their JSON lines")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.add_argument("--kernel", choices=tuple(KERNELS), default=DEFAULT_KERNEL,
                   help=f"kernel release to model (default {DEFAULT_KERNEL})")
    r.add_argument("-s", dest="separators", action="store_true", help='always print {"file":NAME} lines')
    r.add_argument("-t", dest="timeout", type=int, default=0, metavar="SEC", help="per-file timeout")
    r.add_argument("-v", dest="verbose", action="store_true", help="tracebacks on internal errors")
    st = sub.add_parser("selftest", help="run the ported hmm-tests.c on both device variants")
    st.add_argument("--kernel", choices=tuple(KERNELS), default=DEFAULT_KERNEL,
                    help=f"kernel release to model (default {DEFAULT_KERNEL})")
    st.add_argument("--json", action="store_true", help="machine-readable results")
    st.add_argument("-r", dest="test", action="append", metavar="NAME", help="run only this test (repeatable)")
    st.add_argument("-v", dest="variant", action="append", metavar="VARIANT",
                    help="hmm_device_private, hmm_device_coherent, hmm2_device_private, hmm2_device_coherent")
    st.add_argument("-l", dest="list", action="store_true", help="list the tests")
    st.add_argument("--summary", action="store_true", help="a table of results after the TAP output")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return _cmd_run(args)
    if args.cmd == "selftest":
        return _cmd_selftest(args)
    ap.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
