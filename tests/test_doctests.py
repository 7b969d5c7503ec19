"""The docstring examples of ``fedcoe_bench.baselines``, run under the names the package installs them
as (pytest's ``--doctest-modules`` would import ``baselines/`` as a top-level package of its own)."""

import doctest
import importlib
import pkgutil

import pytest

import fedcoe_bench.baselines

MODULES = [m.name for m in pkgutil.iter_modules(fedcoe_bench.baselines.__path__, "fedcoe_bench.baselines.")]


def test_every_baseline_module_is_found():
    assert "fedcoe_bench.baselines.fedavg" in MODULES and len(MODULES) >= 7


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
