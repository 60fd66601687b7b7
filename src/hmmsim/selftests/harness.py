"""A small kselftest harness (``tools/testing/selftests/kselftest_harness.h``).

``FIXTURE``/``FIXTURE_VARIANT`` become :data:`VARIANTS`; ``TEST_F(fixture, name)`` is the
:func:`TEST_F` decorator; ``ASSERT_*`` stop a test, ``EXPECT_*`` record a failure and go
on; ``SKIP`` ends a test as skipped. Each test runs in a fresh simulated machine (the
real harness forks a process per test) with the fixture's devices opened by a fresh
process, and its teardown checks that ``close()`` returns 0, as the C fixtures do.

:func:`run_tests` prints the kselftest TAP output (``# RUN``, ``ok N name``,
``# PASSED: x / y tests passed.``, ``# Totals: ...``) or returns the results for JSON.

>>> selected = select_tests(["open_close"])
>>> [f"{fixture}.{v.name}.{name}" for fixture, name, _fn, v in selected]
['hmm.hmm_device_private.open_close', 'hmm.hmm_device_coherent.open_close']
>>> [r.status for r in run_tests(selected)]
['pass', 'pass']
>>> select_tests(["hmm.hmm_device_private.anon_read"])[0][1]
'anon_read'
>>> select_tests(variants=["hmm_device_bogus"])
Traceback (most recent call last):
hmmsim.selftests.harness.UnknownSelection: unknown variant 'hmm_device_bogus'; valid variants: ...
"""

from __future__ import annotations

import gc
import inspect
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..drivers.dmirror import dmirror_open
from ..kernel.page_types import PAGE_SHIFT, PAGE_SIZE
from ..kernel.system import SystemConfig
from ..process import Process
from ..scenario.run import reference_config
from ..system import System

__all__ = (
    "ASSERT_EQ", "ASSERT_FALSE", "ASSERT_GE", "ASSERT_GT", "ASSERT_LE", "ASSERT_LT", "ASSERT_NE",
    "ASSERT_TRUE", "EXPECT_EQ", "EXPECT_NE", "SKIP", "TESTS", "TEST_F", "TestFailure", "TestResult",
    "TestSkipped", "UnknownSelection", "VARIANTS", "Variant", "ported_variants", "run_test", "run_tests",
    "select_tests",
)


class TestFailure(AssertionError):
    """An ``ASSERT_*`` failed (the message names file:line and the expression)."""


class TestSkipped(Exception):
    """``SKIP()``."""


@dataclass(frozen=True)
class Variant:
    """``FIXTURE_VARIANT_ADD(fixture, name)`` with its fields."""

    fixture: str
    name: str
    params: dict[str, int]


#: ``FIXTURE_VARIANT_ADD`` of hmm-tests.c: device numbers per variant
VARIANTS: dict[str, list[Variant]] = {
    "hmm": [Variant("hmm", "hmm_device_private", {"device_number": 0}),
            Variant("hmm", "hmm_device_coherent", {"device_number": 2})],
    "hmm2": [Variant("hmm2", "hmm2_device_private", {"device_number0": 0, "device_number1": 1}),
             Variant("hmm2", "hmm2_device_coherent", {"device_number0": 2, "device_number1": 3})],
}

TestFn = Callable[[Any, Variant], None]
#: every ``TEST_F``, in definition order: (fixture, name, function)
TESTS: list[tuple[str, str, TestFn]] = []


def TEST_F(fixture: str, name: str) -> Callable[[TestFn], TestFn]:
    """Register ``TEST_F(fixture, name)``; the function takes ``(self, variant)``."""
    def deco(fn: TestFn) -> TestFn:
        TESTS.append((fixture, name, fn))
        return fn
    return deco


def _where() -> str:
    """file:line of the test code that called ASSERT_*/EXPECT_* (the first frame outside
    this module)."""
    for fr in inspect.stack()[1:]:
        if fr.filename != __file__:
            return f"{os.path.basename(fr.filename)}:{fr.lineno}"
    return "?"


def _fail(op: str, a: Any, b: Any) -> None:
    raise TestFailure(f"{_where()}: expected ({a!r}) {op} ({b!r})")


def ASSERT_EQ(a: Any, b: Any) -> None:
    if not a == b:
        _fail("==", a, b)


def ASSERT_NE(a: Any, b: Any) -> None:
    if not a != b:
        _fail("!=", a, b)


def ASSERT_GE(a: Any, b: Any) -> None:
    if not a >= b:
        _fail(">=", a, b)


def ASSERT_GT(a: Any, b: Any) -> None:
    if not a > b:
        _fail(">", a, b)


def ASSERT_LE(a: Any, b: Any) -> None:
    if not a <= b:
        _fail("<=", a, b)


def ASSERT_LT(a: Any, b: Any) -> None:
    if not a < b:
        _fail("<", a, b)


def ASSERT_TRUE(a: Any) -> None:
    if not a:
        _fail("is", a, True)


def ASSERT_FALSE(a: Any) -> None:
    if a:
        _fail("is", a, False)


class _Expect:
    failures: list[str] = []


def EXPECT_EQ(a: Any, b: Any) -> None:
    """Like ASSERT_EQ but the test goes on; the failure is reported at the end."""
    if not a == b:
        _Expect.failures.append(f"{_where()}: expected ({a!r}) == ({b!r})")


def EXPECT_NE(a: Any, b: Any) -> None:
    if not a != b:
        _Expect.failures.append(f"{_where()}: expected ({a!r}) != ({b!r})")


def SKIP(reason: str) -> None:
    raise TestSkipped(reason)


class FixtureState:
    """``FIXTURE(hmm)``/``FIXTURE(hmm2)`` state: the machine, the test process, the
    device fds, ``page_size`` and ``page_shift``."""

    def __init__(self, sys: System, proc: Process) -> None:
        self.sys = sys
        self.proc = proc
        self.page_size = PAGE_SIZE
        self.page_shift = PAGE_SHIFT
        self.fd = -1
        self.fd0 = -1
        self.fd1 = -1


def _setup(variant: Variant, config: SystemConfig | None) -> FixtureState:
    sys = System(config or reference_config())
    proc = sys.spawn("hmm-tests")
    self = FixtureState(sys, proc)
    if variant.fixture == "hmm":
        dev = variant.params["device_number"]
        self.fd = dmirror_open(sys, proc.task, dev)
        if self.fd < 0 and dev >= 2:
            SKIP("DEVICE_COHERENT not available")
        ASSERT_GE(self.fd, 0)
    else:
        d0, d1 = variant.params["device_number0"], variant.params["device_number1"]
        self.fd0 = dmirror_open(sys, proc.task, d0)
        if self.fd0 < 0 and d0 >= 2:
            SKIP("DEVICE_COHERENT not available")
        ASSERT_GE(self.fd0, 0)
        self.fd1 = dmirror_open(sys, proc.task, d1)
        ASSERT_GE(self.fd1, 0)
    return self


def _teardown(self: FixtureState, variant: Variant) -> None:
    for attr in ("fd", "fd0", "fd1"):
        fd = getattr(self, attr)
        if fd >= 0:
            ASSERT_EQ(self.proc.task.close_fd(fd), 0)
            setattr(self, attr, -1)


@dataclass
class TestResult:
    """The outcome of one test run."""

    name: str
    status: str  # "pass", "fail" or "skip"
    message: str = ""
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)


def run_test(fixture: str, name: str, fn: TestFn, variant: Variant, config: SystemConfig | None = None,
             check_invariants: bool = True) -> TestResult:
    """Set up, run and tear down one test on one variant."""
    full = f"{fixture}.{variant.name}.{name}"
    t0 = time.perf_counter()
    _Expect.failures = []
    try:
        self = _setup(variant, config)
        try:
            with self.proc.task.running():  # the test program is the fixture's process
                fn(self, variant)
        finally:
            _teardown(self, variant)
        if check_invariants:
            self.sys.check_invariants(full=True)
            self.sys.ls.assert_no_locks()
        if _Expect.failures:
            return TestResult(full, "fail", _Expect.failures[0], time.perf_counter() - t0, _Expect.failures)
        return TestResult(full, "pass", "", time.perf_counter() - t0)
    except TestSkipped as e:
        return TestResult(full, "skip", str(e), time.perf_counter() - t0)
    except TestFailure as e:
        return TestResult(full, "fail", str(e), time.perf_counter() - t0)
    except Exception as e:  # a model bug or an unmodelled path: report, don't crash the run
        tb = traceback.format_exc().splitlines()
        return TestResult(full, "fail", f"{type(e).__name__}: {e}", time.perf_counter() - t0, tb)


class UnknownSelection(ValueError):
    """``-r``/``--variant`` named no test or variant that exists (the message names it and
    lists the valid ones)."""


def ported_variants() -> list[str]:
    """The variant names that have at least one ported test, in :data:`VARIANTS` order."""
    from . import hmm_tests  # noqa: F401  (registers the TEST_Fs)
    fixtures = {fixture for fixture, _name, _fn in TESTS}
    return [v.name for f, vs in VARIANTS.items() if f in fixtures for v in vs]


def select_tests(names: Iterable[str] = (), variants: Iterable[str] = ()) -> list[tuple[str, str, TestFn, Variant]]:
    """Every (fixture, test, function, variant), filtered by test and variant names. A
    test name is ``TEST`` or the full ``FIXTURE.VARIANT.TEST`` that ``-l`` prints; an
    unknown test or variant, or a selection that matches nothing, raises
    :class:`UnknownSelection`."""
    from . import hmm_tests  # noqa: F401  (registers the TEST_Fs)
    names = list(names)
    variants = list(variants)
    every = [(fixture, name, fn, v) for fixture, name, fn in TESTS for v in VARIANTS[fixture]]
    all_variants = [v.name for vs in VARIANTS.values() for v in vs]
    for want in variants:
        if want not in all_variants:
            raise UnknownSelection(f"unknown variant {want!r}; valid variants: {', '.join(all_variants)}")
        if want not in ported_variants():
            raise UnknownSelection(f"no ported test runs on variant {want!r} yet; variants with tests: "
                                   f"{', '.join(ported_variants())}")
    short = {name for _f, name, _fn, _v in every}
    full = {f"{f}.{v.name}.{name}" for f, name, _fn, v in every}
    for want in names:
        if want not in short and want not in full:
            raise UnknownSelection(f"unknown test {want!r}; valid tests: {', '.join(sorted(short))} "
                                   "(or FIXTURE.VARIANT.TEST as 'hmmsim selftest -l' prints)")
    out = [(f, name, fn, v) for f, name, fn, v in every
           if (not names or name in names or f"{f}.{v.name}.{name}" in names)
           and (not variants or v.name in variants)]
    if not out:
        raise UnknownSelection(f"no test matches tests {', '.join(names)} on variants {', '.join(variants)}")
    return out


def run_tests(selected: list[tuple[str, str, TestFn, Variant]], out: TextIO | None = None,
              config: SystemConfig | None = None) -> list[TestResult]:
    """Run tests, printing kselftest TAP lines to *out* (if given)."""
    def p(s: str) -> None:
        if out is not None:
            print(s, file=out, flush=True)

    p("TAP version 13")
    p(f"1..{len(selected)}")
    p(f"# Starting {len(selected)} tests from {len({(f, v.name) for f, _n, _fn, v in selected})} test cases.")
    results = []
    for k, (fixture, name, fn, v) in enumerate(selected, 1):
        full = f"{fixture}.{v.name}.{name}"
        p(f"#  RUN           {full} ...")
        r = run_test(fixture, name, fn, v, config)
        results.append(r)
        # the test's System is a reference cycle: free its arrays now, not at some later
        # collection (a run of every test peaks at several times the memory otherwise)
        gc.collect()
        if r.status == "pass":
            p(f"#            OK  {full}")
            p(f"ok {k} {full}")
        elif r.status == "skip":
            p(f"#      SKIP      {r.message}")
            p(f"#            OK  {full}")
            p(f"ok {k} {full} # SKIP {r.message}")
        else:
            for line in (r.details or [r.message])[-12:]:
                p(f"# {line}")
            p(f"#          FAIL  {full}")
            p(f"not ok {k} {full}")
    npass = sum(r.status == "pass" for r in results)
    nskip = sum(r.status == "skip" for r in results)
    nfail = sum(r.status == "fail" for r in results)
    p(f"# {'FAILED' if nfail else 'PASSED'}: {npass + nskip} / {len(results)} tests passed.")
    p(f"# Totals: pass:{npass} fail:{nfail} xfail:0 xpass:0 skip:{nskip} error:0")
    return results
