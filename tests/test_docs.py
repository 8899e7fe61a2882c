"""The documentation builds, and the examples in docstrings and pages run."""

import doctest
import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sklearn_craft

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.slow
def test_sphinx_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    generated = DOCS / "generated"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q", str(DOCS), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        shutil.rmtree(generated, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "api.html").is_file() and (tmp_path / "generated" / "sklearn_craft.CraftPruner.html").is_file()


def _modules():
    yield sklearn_craft.__name__
    for info in pkgutil.walk_packages(sklearn_craft.__path__, prefix="sklearn_craft."):
        if not info.name.endswith("__main__"):
            yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, module=module):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {name} failed (see output above)"
