"""The examples in the package's docstrings run and print what they show (against the
installed package, whichever way it was installed)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hmmsim

MODULES = sorted(m.name for m in pkgutil.walk_packages(hmmsim.__path__, "hmmsim."))


def test_modules_found() -> None:
    assert "hmmsim.kernel.system" in MODULES and "hmmsim.process" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
