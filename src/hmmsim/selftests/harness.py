"""A small kselftest harness (``tools/testing/selftests/kselftest_harness.h``).

``FIXTURE``/``FIXTURE_VARIANT`` become :data:`VARIANTS`; ``TEST_F(fixture, name)`` is the
:func:`TEST_F` decorator; ``ASSERT_*`` stop a test, ``EXPECT_*`` record a failure and go
on; ``SKIP`` ends a test as skipped. Each test runs in a fresh simulated machine (the
real harness forks a process per test) with the fixture's devices opened by a fresh
process, and its teardown checks that ``close()`` returns 0, as the C fixtures do.

:func:`run_tests` prints the kselftest TAP output (``# RUN``, ``ok N name``,
``# PASSED: x / y tests passed.``, ``# Totals: ...``) or returns the results for JSON.

The port is per release: :data:`HMM_TESTS_C` lists every ``TEST_F`` of each release's
hmm-tests.c in file order, and :func:`select_tests` picks the function ported for that
release (a ``TEST_F`` whose body changed between releases is registered once per release).
A test of the release that the model cannot run yet is still listed and run as a SKIP
whose reason is in :data:`NOT_MODELLED`. An unknown test or variant name raises
:class:`UnknownSelection`, which names it and lists the valid ones.

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
from ..kernel.profile import DEFAULT_KERNEL
from ..kernel.system import SystemConfig
from ..process import Process
from ..scenario.run import reference_config
from ..system import System

__all__ = (
    "ASSERT_EQ", "ASSERT_FALSE", "ASSERT_GE", "ASSERT_GT", "ASSERT_LE", "ASSERT_LT", "ASSERT_NE",
    "ASSERT_TRUE", "EXPECT_EQ", "EXPECT_NE", "HMM_TESTS_C", "HUGETLB_SETUP_DEFAULT_PAGES", "MIGRATE_ON_FAULT",
    "MIGRATE_ON_FAULT_TESTS", "NEEDS_MIGRATION", "NOT_MODELLED", "hmm_tests_c",
    "REAL_KERNEL_FAILS", "SKIP",
    "TESTS", "TEST_F", "TestFailure", "TestResult", "TestSkipped", "UnknownSelection", "VARIANTS",
    "Variant", "run_test",
    "run_tests", "select_tests",
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
#: every ported ``TEST_F``, in definition order: (fixture, name, function, releases whose
#: hmm-tests.c has this body)
TESTS: list[tuple[str, str, TestFn, tuple[str, ...]]] = []

_MIRROR_612 = (
    ("hmm", "open_close"), ("hmm", "anon_read"), ("hmm", "anon_read_prot"), ("hmm", "anon_write"),
    ("hmm", "anon_write_prot"), ("hmm", "anon_write_child"), ("hmm", "anon_write_child_shared"),
    ("hmm", "anon_write_huge"), ("hmm", "anon_write_hugetlbfs"), ("hmm", "file_read"),
    ("hmm", "file_write"), ("hmm", "migrate"), ("hmm", "migrate_file_private"),
    ("hmm", "migrate_fault"), ("hmm", "migrate_release"), ("hmm", "migrate_shared"),
    ("hmm2", "migrate_mixed"), ("hmm", "migrate_multiple"), ("hmm", "anon_read_multiple"),
    ("hmm", "anon_teardown"), ("hmm", "mixedmap"), ("hmm2", "snapshot"), ("hmm", "compound"),
    ("hmm2", "double_map"), ("hmm", "exclusive"), ("hmm", "exclusive_mprotect"),
    ("hmm", "exclusive_cow"), ("hmm", "hmm_gup_test"), ("hmm", "hmm_cow_in_device"),
)

#: every ``TEST_F`` of each release's tools/testing/selftests/mm/hmm-tests.c, in file order
#: (6.12: 29; 7.3: 39, the device-THP migration tests, a THP migration benchmark and
#: ``userfaultfd_read`` added at the end)
HMM_TESTS_C: dict[str, tuple[tuple[str, str], ...]] = {
    "6.12": _MIRROR_612,
    "7.3": _MIRROR_612 + (
        ("hmm", "migrate_anon_huge_empty"), ("hmm", "migrate_anon_huge_zero"),
        ("hmm", "migrate_anon_huge_free"), ("hmm", "migrate_anon_huge_fault"),
        ("hmm", "migrate_partial_unmap_fault"), ("hmm", "migrate_remap_fault"),
        ("hmm", "migrate_anon_huge_err"), ("hmm", "migrate_anon_huge_zero_err"),
        ("hmm", "benchmark_thp_migration"), ("hmm", "userfaultfd_read"),
    ),
}

#: the release tag of tests that exist only with the unified fault+migrate walk (the
#: "Migrate on fault for device pages" series' hmm-tests.c, on top of 7.3)
MIGRATE_ON_FAULT = "7.3+migrate_on_fault"

#: the series' additions to hmm-tests.c, placed after ``migrate`` as its test patch does
MIGRATE_ON_FAULT_TESTS: tuple[tuple[str, str], ...] = (("hmm", "migrate_on_fault"),)


def hmm_tests_c(kernel: str, migrate_on_fault: bool = False) -> tuple[tuple[str, str], ...]:
    """:data:`HMM_TESTS_C` of *kernel*, with the series' tests when *migrate_on_fault*."""
    tests = HMM_TESTS_C[kernel]
    if not migrate_on_fault:
        return tests
    k = tests.index(("hmm", "migrate")) + 1
    return tests[:k] + MIGRATE_ON_FAULT_TESTS + tests[k:]


#: ``HUGETLB_SETUP_DEFAULT_PAGES(n)`` of each release's hmm-tests.c (7.3: 1): before the
#: tests the harness makes sure the default hstate has at least *n* free huge pages,
#: growing ``nr_hugepages`` if needed (modelled from the macro's name and use:
#: selftests/mm/hugepage_settings.h is not in the source tree at hand)
HUGETLB_SETUP_DEFAULT_PAGES: dict[str, int] = {"6.12": 0, "7.3": 1}

#: the SKIP reason of a test that needs device memory migration
NEEDS_MIGRATION = "needs device memory migration: not modelled yet"

#: why a listed test is not run: everything in :data:`HMM_TESTS_C` without a ported body
NOT_MODELLED: dict[str, str] = {}


#: tests that the real kernel of a release fails in the reference environment
#: (``/work/briefs``-style kernel-run of its own hmm-tests), with the reason: hmmsim runs
#: them, fails them the same way, and adds the reason to the failure report
REAL_KERNEL_FAILS: dict[str, dict[str, str]] = {
    "6.12": {},
    "7.3": {
        "hmm.hmm_device_coherent.migrate_anon_huge_err": (
            "the real 7.3 kernel fails this test too (hmm-tests.c:2394, ret -12): a coherent "
            "device has one fixed memory range, so its THP allocations ask for a second chunk "
            "there, memremap_pages() WARNs 'Conflicting mapping in same section' and fails "
            "with -ENOMEM; the THP migrated to order-0 device pages, and with FAIL_ALLOC the "
            "first order-0 page of MIGRATE_TO_SYS cannot be allocated (VM_FAULT_OOM)"),
    },
}


def TEST_F(fixture: str, name: str, releases: tuple[str, ...] | None = None) -> Callable[[TestFn], TestFn]:
    """Register ``TEST_F(fixture, name)``; the function takes ``(self, variant)``.
    *releases*: the releases whose hmm-tests.c has this body (default: every release
    listing the test in :data:`HMM_TESTS_C`)."""
    rel = releases if releases is not None else tuple(
        k for k, tests in HMM_TESTS_C.items() if (fixture, name) in tests)

    def deco(fn: TestFn) -> TestFn:
        TESTS.append((fixture, name, fn, rel))
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
    want = HUGETLB_SETUP_DEFAULT_PAGES[sys.profile.name]
    pool = sys.hugetlb
    if pool.free_huge_pages < want:
        pool.set_max_huge_pages(pool.nr_huge_pages + want - pool.free_huge_pages)
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
        why = REAL_KERNEL_FAILS.get((config or reference_config()).kernel, {}).get(full)
        return TestResult(full, "fail", str(e), time.perf_counter() - t0, [str(e)] + ([why] if why else []))
    except Exception as e:  # a model bug or an unmodelled path: report, don't crash the run
        tb = traceback.format_exc().splitlines()
        return TestResult(full, "fail", f"{type(e).__name__}: {e}", time.perf_counter() - t0, tb)


class UnknownSelection(ValueError):
    """``-r``/``--variant`` named no test or variant that exists (the message names it and
    lists the valid ones)."""


def select_tests(names: Iterable[str] = (), variants: Iterable[str] = (),
                 kernel: str = DEFAULT_KERNEL, migrate_on_fault: bool = False) -> list[tuple[str, str, TestFn, Variant]]:
    """Every (fixture, test, function, variant) of release *kernel*'s hmm-tests.c in the
    order its harness runs them (fixture by fixture, variant by variant, tests in file
    order), filtered by test names (``anon_read`` or ``hmm.hmm_device_private.anon_read``)
    and variant names. A test without a ported body gets a
    function that SKIPs with its :data:`NOT_MODELLED` reason. *migrate_on_fault* adds the
    unified walk series' tests (:func:`hmm_tests_c`)."""
    from . import (  # noqa: F401
        hmm_device_tests,
        hmm_exclusive_tests,
        hmm_migrate_on_fault_tests,
        hmm_migrate_tests,
        hmm_tests,
        hmm_thp_tests,
        hmm_uffd_tests,
    )
    names = set(names)
    variants = set(variants)
    ported = {(f, n): fn for f, n, fn, rel in TESTS
              if kernel in rel or (migrate_on_fault and MIGRATE_ON_FAULT in rel)}
    tests = hmm_tests_c(kernel, migrate_on_fault)
    all_variants = [v.name for f in dict.fromkeys(f for f, _n in tests) for v in VARIANTS[f]]
    for want in sorted(variants):
        if want not in all_variants:
            raise UnknownSelection(f"unknown variant {want!r}; valid variants: {', '.join(all_variants)}")
    short = dict.fromkeys(n for _f, n in tests)
    full = {f"{f}.{v.name}.{n}" for f, n in tests for v in VARIANTS[f]}
    for want in sorted(names):
        if want not in short and want not in full:
            raise UnknownSelection(f"unknown test {want!r} in {kernel}'s hmm-tests.c; valid tests: "
                                   f"{', '.join(short)} (or FIXTURE.VARIANT.TEST as "
                                   "'hmmsim selftest -l' prints)")
    out = []
    for fixture in dict.fromkeys(f for f, _n in tests):
        for v in VARIANTS[fixture]:
            if variants and v.name not in variants:
                continue
            for f, name in tests:
                if f != fixture or (names and not names & {name, f"{f}.{v.name}.{name}"}):
                    continue
                fn = ported.get((f, name)) or _not_modelled(name)
                out.append((fixture, name, fn, v))
    if not out:
        raise UnknownSelection(f"no test matches tests {', '.join(sorted(names))} on variants "
                               f"{', '.join(sorted(variants))}")
    return out


def _not_modelled(name: str) -> TestFn:
    reason = NOT_MODELLED[name]

    def skip(self: Any, variant: Variant) -> None:
        SKIP(reason)
    skip.__name__ = name
    return skip


def run_tests(selected: list[tuple[str, str, TestFn, Variant]], out: TextIO | None = None,
              config: SystemConfig | None = None) -> list[TestResult]:
    """Run tests, printing kselftest TAP lines to *out* (if given)."""
    def p(s: str) -> None:
        if out is not None:
            print(s, file=out, flush=True)

    p("TAP version 13")
    p(f"# hmmsim modelling Linux {(config or reference_config()).kernel}")
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
