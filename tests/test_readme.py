"""The README's example runs and its commands are the ones CI runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_example_runs():
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    pruner = namespace["pruner"]
    assert namespace["search"].best_params_["lassofilterselector__gamma"] in (0.001, 0.01, 0.1)
    assert pruner.report_.loc["flops", "pruned"] < pruner.report_.loc["flops", "original"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install torch==2\.13\.0 .*?)\n```", readme)
    assert 'pip install torch==2.13.0 && pip install -e . && python -m sklearn_craft demo' in commands
    test_command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -n auto'
    assert test_command in commands
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
