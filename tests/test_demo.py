"""``python -m sklearn_craft demo`` in its reduced mode, and its command line."""

import numpy as np
import pytest

from sklearn_craft.__main__ import build_parser, main
from sklearn_craft.demo import run_demo


@pytest.mark.slow
def test_quick_demo_writes_report_and_figures(tmp_path):
    table = run_demo(tmp_path, quick=True, progress=False, verbose=False)
    assert list(table["gamma"]) == [0.0, 0.05]
    baseline, pruned = table.iloc[0], table.iloc[1]
    assert pruned["flops"] < baseline["flops"] and pruned["parameters"] < baseline["parameters"]
    assert np.isclose(pruned["flops_change_pct"], 100 * (pruned["flops"] / baseline["flops"] - 1))
    for name in ["layer_task_matrix.png", "characteristic_curves.png", "gamma_tradeoff.png", "report.csv"]:
        assert (tmp_path / name).stat().st_size > 0


def test_cli_help_documents_the_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ["--data NAME=PATH", "--model NAME=PATH", "--quick", "--out", "--task"]:
        assert option in out


def test_cli_rejects_data_without_model(capsys, tmp_path):
    assert main(["demo", "--data", f"celeba={tmp_path}", "--out", str(tmp_path)]) == 2
    assert "data and model must be given together" in capsys.readouterr().err


def test_cli_rejects_malformed_name_path():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--data", "celeba"])
