"""The examples in the package's docstrings run and print what they show (against the
installed package, whichever way it was installed). A module without examples is
reported as skipped, not passed; the facade and the key kernel modules must have some."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hmmsim

MODULES = sorted(m.name for m in pkgutil.walk_packages(hmmsim.__path__, "hmmsim."))

#: modules whose docstrings must show (and so test) how they are used
REQUIRED = (
    "hmmsim", "hmmsim.cli", "hmmsim.device", "hmmsim.errors", "hmmsim.process", "hmmsim.system",
    "hmmsim.hmm.mirror", "hmmsim.kernel.madvise", "hmmsim.kernel.mmap", "hmmsim.kernel.profile",
    "hmmsim.kernel.system", "hmmsim.kernel.task", "hmmsim.scenario.parse", "hmmsim.scenario.run",
    "hmmsim.selftests.harness",
)


def test_modules_found() -> None:
    assert "hmmsim.kernel.system" in MODULES and "hmmsim.process" in MODULES
    assert set(REQUIRED) - {"hmmsim"} <= set(MODULES)


@pytest.mark.parametrize("name", ["hmmsim", *MODULES])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    if name in REQUIRED:
        assert result.attempted > 0, f"{name} must have docstring examples"
    elif result.attempted == 0:
        pytest.skip(f"{name} has no docstring examples")
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
