"""Run every ported ``hmm-tests.c`` TEST_F on every fixture variant."""

import pytest

from hmmsim.selftests.harness import run_test, select_tests

SELECTED = select_tests()


@pytest.mark.parametrize(("fixture", "name", "fn", "variant"), SELECTED,
                         ids=[f"{f}.{v.name}.{n}" for f, n, _fn, v in SELECTED])
def test_hmm_selftest(fixture, name, fn, variant):
    r = run_test(fixture, name, fn, variant)
    assert r.status == "pass", "\n".join([r.message, *r.details])
