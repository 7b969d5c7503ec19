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


def test_the_methods_are_installed_inside_the_package_and_no_top_level_baselines_exists(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what is installed
    run = lambda code: subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True)  # noqa: E731
    assert run("import fedcoe_bench.baselines.scaffold").returncode == 0
    assert b"No module named 'baselines'" in run("import baselines").stderr
