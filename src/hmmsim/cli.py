"""The ``hmmsim`` command.

``hmmsim run [options] FILE...``
    Run scenarios (``docs/scenario.md``), each on a fresh machine, printing their JSON
    lines. With several files (or ``-s``) each file's output is preceded by
    ``{"file":"NAME"}``; ``-t SEC`` (a positive number of seconds) stops a file after SEC
    seconds with ``{"error":"timeout","seconds":SEC}``. ``--ram SIZE``, ``--thp MODE`` and
    ``--hugetlb-pages N`` change the machine; their defaults are the reference machine
    the recorded real-kernel outputs come from (``scenario.run.reference_config``).
``hmmsim selftest``
    Run the --kernel release's ``hmm-tests.c`` (ported tests; the others SKIP with a
    reason) on every fixture variant with kselftest output (``--json`` for a JSON array
    on stdout and nothing else; ``-r NAME`` (``anon_read`` or the full name ``-l``
    prints, ``hmm.hmm_device_private.anon_read``) and ``--variant VARIANT`` select).
``hmmsim compare``, ``hmmsim fuzz``, ``hmmsim minimize``, ``hmmsim oracle run|runner``
    Differential testing against real kernels (:mod:`hmmsim.oracle.cli`).
``hmmsim --version``
    The package version and the kernel releases modelled.

Exit status (:data:`EXIT_STATUS`; with several files, the largest of them):

====  ================================================================================
0     every file ran to its end (a scenario's own errno results, a SIGSEGV or an
      OOM kill of its process are part of its output); every selftest passed or skipped
1     the model hit an internal error, or a selftest failed
2     bad usage: unknown option or value, unreadable file, unknown test or variant
3     a scenario did not parse (``{"error":"parse",...}``)
4     a scenario named an undefined region, file or handle (``{"error":"unknown-name"}``)
5     a scenario needs something the model does not cover (``{"error":"unsupported"}``)
6     a scenario hit the real kernel's crash path (``{"error":"kernel-oops"}``)
7     a scenario was stopped by ``-t`` (``{"error":"timeout",...}``)
8     a scenario would hang the real kernel (``{"error":"kernel-hang"}``: every simulated
      thread waits, e.g. a userfaultfd fault nobody answers)
====  ================================================================================

>>> main(["selftest", "-l", "-r", "open_close"])
hmm.hmm_device_private.open_close
hmm.hmm_device_coherent.open_close
0
>>> main(["selftest", "-r", "no_such_test"])
2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .kernel.profile import DEFAULT_KERNEL, KERNELS

__all__ = ("EXIT_STATUS", "main")

#: exit status per outcome (see the module docstring)
EXIT_STATUS: dict[str, int] = {
    "ok": 0, "internal": 1, "usage": 2, "parse": 3, "unknown-name": 4, "unsupported": 5,
    "kernel-oops": 6, "timeout": 7, "kernel-hang": 8,
}

_SIZE = re.compile(r"^([0-9]+)([KMG]?)(i?B)?$", re.IGNORECASE)


def _size(text: str) -> int:
    """``--ram``: bytes, or a number with K/M/G (binary units: 1536M, 2G, 2GiB)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1536M, 2G)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def _positive(text: str) -> int:
    """``-t``: a whole number of seconds, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the timeout must be at least 1 second, not {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def _cmd_run(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    from .scenario.parse import ScenarioParseError, parse_scenario
    from .scenario.run import dumps, reference_config, run_scenario

    try:
        config = reference_config(args.kernel, ram=args.ram, thp=args.thp, hugetlb_pages=args.hugetlb_pages,
                                  migrate_on_fault=args.migrate_on_fault)
    except ValueError as e:
        ap.error(str(e))
    status = 0
    separators = args.separators or len(args.files) > 1
    for path in args.files:
        outcome = ["ok"]

        def emit(rec: dict[str, Any]) -> None:
            if rec.get("error") in EXIT_STATUS:
                outcome[0] = rec["error"]
            print(dumps(rec), flush=True)

        if separators:
            print(dumps({"file": os.path.basename(path)}), flush=True)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            print(dumps({"error": "exit", "status": 2, "message": str(e)}), flush=True)
            status = max(status, EXIT_STATUS["usage"])
            continue
        try:
            scenario = parse_scenario(data)
        except ScenarioParseError as e:
            emit({"error": "parse", "line": e.line, "message": e.reason})
            status = max(status, EXIT_STATUS["parse"])
            continue
        if args.timeout:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.alarm(args.timeout)
        try:
            machine = run_scenario(scenario, emit, config)
            # what the kernel would have printed to dmesg and survived (lockdep reports):
            # on stderr, so that stdout stays exactly the kernel runner's lines
            for warning in machine.ls.warnings:
                print(f"{os.path.basename(path)}: WARNING: {warning}", file=sys.stderr, flush=True)
        except _Timeout:
            emit({"error": "timeout", "seconds": args.timeout})
        except Exception as e:  # a model bug (an assertion, an unexpected error): say so, go on
            emit({"error": "internal", "message": f"{type(e).__name__}: {e}"})
            if args.verbose:
                traceback.print_exc()
        finally:
            if args.timeout:
                signal.alarm(0)
        status = max(status, EXIT_STATUS[outcome[0]])
        gc.collect()  # the file's System is a reference cycle: free it before the next file
    return status


class _Timeout(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def _cmd_selftest(args: argparse.Namespace) -> int:
    from .selftests.harness import UnknownSelection, run_tests, select_tests

    from .scenario.run import reference_config
    try:
        config = reference_config(args.kernel, migrate_on_fault=args.migrate_on_fault)
    except ValueError as e:
        print(f"hmmsim selftest: {e}", file=sys.stderr)
        return EXIT_STATUS["usage"]
    try:
        selected = select_tests(args.test or (), args.variant or (), args.kernel,
                                migrate_on_fault=args.migrate_on_fault)
    except UnknownSelection as e:
        print(f"hmmsim selftest: {e}", file=sys.stderr)
        return EXIT_STATUS["usage"]
    if args.list:
        for fixture, name, _fn, v in selected:
            print(f"{fixture}.{v.name}.{name}")
        return 0
    if args.json:
        # stdout carries the JSON array and nothing else: diagnostics go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            results = run_tests(selected, None, config)
        print(json.dumps([{"name": r.name, "kernel": config.kernel, "status": r.status,
                           "message": r.message, "seconds": round(r.seconds, 3)}
                          for r in results], indent=1))
    else:
        results = run_tests(selected, sys.stdout, config)
    if args.summary and not args.json:
        from rich.console import Console
        from rich.table import Table
        t = Table(title="hmm-tests on hmmsim")
        for col in ("test", "status", "seconds"):
            t.add_column(col)
        for r in results:
            style = {"pass": "green", "skip": "yellow"}.get(r.status, "red")
            t.add_row(r.name, f"[{style}]{r.status}[/{style}]", f"{r.seconds:.2f}")
        Console().print(t)
    return EXIT_STATUS["internal"] if any(r.status == "fail" for r in results) else 0


def _version() -> str:
    from . import __version__
    return f"hmmsim {__version__} (models Linux {', '.join(KERNELS)}; default {DEFAULT_KERNEL})"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hmmsim", description="An executable model of Linux HMM.",
        epilog="exit status: " + ", ".join(f"{v} {k}" for k, v in EXIT_STATUS.items()))
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="run scenario files and print their JSON lines",
                       description="Run scenario files, each on a fresh machine (by default "
                       "the reference machine of the recorded real-kernel outputs).")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.add_argument("--kernel", choices=tuple(KERNELS), default=DEFAULT_KERNEL,
                   help=f"kernel release to model (default {DEFAULT_KERNEL})")
    r.add_argument("--ram", type=_size, default=1536 << 20, metavar="SIZE",
                   help="system RAM besides the coherent devices' 512 MiB, e.g. 4G "
                   "(default 1536M: the reference 2 GiB VM)")
    r.add_argument("--thp", choices=("always", "madvise", "never"), default="madvise",
                   help="transparent_hugepage mode (default madvise)")
    r.add_argument("--hugetlb-pages", type=_non_negative, default=32, metavar="N",
                   help="2 MiB pages in the hugetlb pool (default 32; at most half of RAM)")
    r.add_argument("--migrate-on-fault", action="store_true",
                   help="switch on the unified fault+migrate walk (the unmerged 'Migrate on fault for "
                   "device pages' series) on top of --kernel 7.3")
    r.add_argument("-s", dest="separators", action="store_true", help='always print {"file":NAME} lines')
    r.add_argument("-t", dest="timeout", type=_positive, default=None, metavar="SEC",
                   help="stop a file after SEC seconds (a whole number >= 1; default: no limit)")
    r.add_argument("-v", "--verbose", dest="verbose", action="store_true",
                   help="print a traceback on stderr for internal errors")
    st = sub.add_parser("selftest", help="run the ported hmm-tests.c (kselftest output)")
    st.add_argument("--kernel", choices=tuple(KERNELS), default=DEFAULT_KERNEL,
                    help=f"kernel release to model (default {DEFAULT_KERNEL})")
    st.add_argument("--migrate-on-fault", action="store_true",
                    help="switch on the unified fault+migrate walk on top of --kernel 7.3 (adds the "
                    "series' migrate_on_fault test)")
    st.add_argument("--json", action="store_true",
                    help="print only a JSON array of results on stdout (diagnostics on stderr)")
    st.add_argument("-r", dest="test", action="append", metavar="NAME",
                    help="run only this test: TEST or FIXTURE.VARIANT.TEST as -l prints it (repeatable)")
    st.add_argument("--variant", dest="variant", action="append", metavar="VARIANT",
                    help="run only this variant (repeatable): " + _variant_help())
    st.add_argument("-l", dest="list", action="store_true", help="list the selected tests and exit")
    st.add_argument("--summary", action="store_true", help="a table of results after the TAP output")
    from .oracle.cli import add_parsers
    add_parsers(sub)
    return ap


def _variant_help() -> str:
    from .selftests.harness import VARIANTS
    return ", ".join(v.name for vs in VARIANTS.values() for v in vs)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hmmsim`` command; returns the exit status (:data:`EXIT_STATUS`)."""
    ap = _parser()
    command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if argv[:1] == ["oracle"] and "--" in argv:  # `oracle run --selftest -- ARGS`: ARGS for hmm-tests
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = ap.parse_args(argv)
    if command_line and hasattr(signal, "SIGPIPE"):
        # the command line: output piped into `head` ends quietly, like a C program's
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.cmd == "run":
        return _cmd_run(args, ap)
    if args.cmd == "selftest":
        return _cmd_selftest(args)
    if args.cmd in ("compare", "fuzz", "minimize", "oracle"):
        from .oracle.cli import run_command
        ret = run_command(args, extra)
        assert ret is not None
        return ret
    ap.print_help()
    return EXIT_STATUS["usage"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
