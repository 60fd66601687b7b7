"""Run every ``hmm-tests.c`` TEST_F of each release on every fixture variant, under that
release's profile. Ported tests pass; the others SKIP with their not-modelled reason."""

import pytest

from hmmsim.kernel.profile import KERNELS
from hmmsim.scenario.run import reference_config
from hmmsim.selftests.harness import HMM_TESTS_C, NOT_MODELLED, REAL_KERNEL_FAILS, run_test, select_tests

SELECTED = [(k, *t) for k in KERNELS for t in select_tests(kernel=k)]


@pytest.mark.parametrize(("kernel", "fixture", "name", "fn", "variant"), SELECTED,
                         ids=[f"{k}-{f}.{v.name}.{n}" for k, f, n, _fn, v in SELECTED])
def test_hmm_selftest(kernel, fixture, name, fn, variant):
    r = run_test(fixture, name, fn, variant, reference_config(kernel))
    full = f"{fixture}.{variant.name}.{name}"
    if name in NOT_MODELLED:
        assert (r.status, r.message) == ("skip", NOT_MODELLED[name])
    elif full in REAL_KERNEL_FAILS[kernel]:
        # the real kernel fails it (see the reason): hmmsim fails it the same way
        assert r.status == "fail" and r.details[-1] == REAL_KERNEL_FAILS[kernel][full], r.details
        assert "expected (-12) == (0)" in r.message  # MIGRATE_TO_SYS: -ENOMEM, as the kernel
    else:
        assert r.status == "pass", "\n".join([r.message, *r.details])


def test_select_tests_lists_every_test_of_the_release_in_harness_order():
    """kselftest runs fixture by fixture, variant by variant, tests in file order:
    6.12 has 29 TEST_Fs (58 runs), 7.3 39 (78 runs), as the real harnesses' -l show."""
    for kernel, runs in (("6.12", 58), ("7.3", 78)):
        sel = select_tests(kernel=kernel)
        assert len(sel) == runs
        assert len(HMM_TESTS_C[kernel]) == {"6.12": 29, "7.3": 39}[kernel]
        names = [f"{f}.{v.name}.{n}" for f, n, _fn, v in sel]
        assert names[0] == "hmm.hmm_device_private.open_close"
        assert names[-1] == "hmm2.hmm2_device_coherent.double_map"
    sel73 = [f"{f}.{v.name}.{n}" for f, n, _fn, v in select_tests(kernel="7.3")]
    assert sel73[35] == "hmm.hmm_device_private.userfaultfd_read"
    assert "userfaultfd_read" not in {n for _f, n, _fn, _v in select_tests(kernel="6.12")}
    assert [n for _f, n, _fn, _v in select_tests(["hmm.hmm_device_coherent.compound"], kernel="6.12")] == ["compound"]


def test_release_bodies_differ_where_hmm_tests_c_differs():
    """anon_write_child, anon_write_hugetlbfs and compound have one body per release."""
    for name in ("anon_write_child", "anon_write_hugetlbfs", "compound"):
        fns = {k: next(fn for _f, n, fn, _v in select_tests([name], kernel=k)) for k in KERNELS}
        assert fns["6.12"] is not fns["7.3"]


@pytest.mark.parametrize(("kernel", "status", "message"), [
    ("6.12", "pass", ""),   # mmap(MAP_HUGETLB) fails: the 6.12 body returns
    ("7.3", "pass", ""),    # HUGETLB_SETUP_DEFAULT_PAGES(1) gave the pool a page first
])
def test_compound_without_huge_pages(kernel, status, message):
    from dataclasses import replace
    cfg = replace(reference_config(kernel), hugetlb_pages=0)
    (f, n, fn, v), *_ = select_tests(["compound"], kernel=kernel)
    r = run_test(f, n, fn, v, cfg)
    assert (r.status, r.message) == (status, message)


@pytest.mark.parametrize(("kernel", "status", "message"), [
    ("6.12", "skip", "Huge page could not be allocated"),
    ("7.3", "pass", ""),
])
def test_anon_write_hugetlbfs_without_huge_pages(kernel, status, message):
    from dataclasses import replace
    cfg = replace(reference_config(kernel), hugetlb_pages=0)
    (f, n, fn, v), *_ = select_tests(["anon_write_hugetlbfs"], kernel=kernel)
    r = run_test(f, n, fn, v, cfg)
    assert (r.status, r.message) == (status, message)


def test_7_3_skips_not_enough_huge_pages_when_the_pool_cannot_grow():
    """With every 2 MiB block of RAM in use, HUGETLB_SETUP_DEFAULT_PAGES cannot add a page:
    7.3's bodies SKIP "Not enough huge pages"; 6.12's compound returns (passes)."""
    from hmmsim.kernel.physmem import PhysMem
    from hmmsim.selftests import harness

    orig = PhysMem.alloc_folio

    def no_block(self, order):  # the pool cannot grow (RAM fragmented)
        return -1 if order else orig(self, order)
    from dataclasses import replace
    PhysMem.alloc_folio = no_block
    try:
        for kernel, name, want in (("7.3", "compound", ("skip", "Not enough huge pages")),
                                   ("7.3", "anon_write_hugetlbfs", ("skip", "Not enough huge pages")),
                                   ("6.12", "compound", ("pass", ""))):
            cfg = replace(reference_config(kernel), hugetlb_pages=0)
            (f, n, fn, v), *_ = harness.select_tests([name], kernel=kernel)
            r = run_test(f, n, fn, v, cfg)
            assert (r.status, r.message) == want, (kernel, name, r.message)
    finally:
        PhysMem.alloc_folio = orig
