"""The paper-reproduction benchmarks run end to end on a tiny subset of the real data.

Each script is run as a command (``python benchmarks/bench_x.py --quick`` with smaller overrides),
writing its markdown, CSV and figures into ``tmp_path`` so the committed results stay untouched.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, shared_data, tmp_path, *options):
    results = tmp_path / f"{script}.md"
    command = [
        sys.executable, str(BENCHMARKS / f"bench_{script}.py"), "--quick", "--data-root", str(shared_data),
        "--results", str(results), "--figures", str(tmp_path), "--threads", "1", *options,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = results.read_text()
    assert "--quick" in text and "Machine:" in text and "Command:" in text
    return results, text


def _finite(frame, columns):
    values = frame[list(columns)].to_numpy(dtype=float)
    return np.isfinite(values).all()


@pytest.mark.realdata
def test_etl_table_has_one_row_per_method_and_changes_against_the_baseline(shared_data, tmp_path):
    results, text = _run("etl_table", shared_data, tmp_path, "--tasks", "gender", "--n", "48", "--gammas", "0.1",
                         "--alphas", "5", "--epochs", "1")
    frame = pd.read_csv(results.with_suffix(".csv"))
    numeric = ["score", "parameters", "flops", "latency_ms", "time_s"]
    assert list(frame["method"]) == ["baseline", "craft g=0.1", "l1 g=0.1", "random g=0.1"]
    assert _finite(frame, numeric + [f"{c}_chg_pct" for c in numeric])
    assert (frame.loc[0, [f"{c}_chg_pct" for c in numeric]] == 0).all()
    # The three rules keep the same per-layer counts before the coupled merge, and all prune.
    assert (frame.loc[1:, "flops"] < frame.loc[0, "flops"]).all()
    assert frame["score"].between(0, 1).all() and frame["score_before_ft"].between(0, 1).all()
    assert "| gender | craft g=0.1 |" in text


@pytest.mark.realdata
def test_gamma_tradeoff_gives_a_row_per_gamma_and_a_figure(shared_data, tmp_path):
    results, _ = _run("gamma_tradeoff", shared_data, tmp_path, "--tasks", "yaw", "--n", "48", "--gammas", "0", "0.1",
                      "--alphas", "5")
    frame = pd.read_csv(results.with_suffix(".csv"))
    assert frame["gamma"].tolist() == [0.0, 0.1] and set(frame["task"]) == {"yaw"}
    assert _finite(frame, ["score_before_ft", "score", "flops", "size_bytes", "flops_pct", "size_pct"])
    assert frame.loc[0, "flops_pct"] == 100 and frame.loc[1, "flops"] < frame.loc[0, "flops"]
    assert (tmp_path / "gamma_tradeoff_yaw.png").stat().st_size > 0


@pytest.mark.realdata
def test_yaw_filters_ranks_filters_by_their_correlation_with_pan(shared_data, tmp_path):
    results, _ = _run("yaw_filters", shared_data, tmp_path, "--n", "120", "--top", "3")
    frame = pd.read_csv(results.with_suffix(".csv"))
    assert len(frame) == 3 and frame["filter"].str.startswith("linear1.conv:").all()
    assert frame["ranked_by"].tolist() == ["yaw", "yaw", "abs_yaw"]
    r_yaw, r_abs = frame["r_yaw"].abs().to_numpy(), frame["r_abs_yaw"].abs().to_numpy()
    assert np.isfinite(r_yaw).all() and np.isfinite(r_abs).all() and (r_yaw <= 1).all() and (r_abs <= 1).all()
    assert r_yaw[0] >= r_yaw[1] >= r_yaw[2]
    assert (tmp_path / "yaw_filters.png").stat().st_size > 0


@pytest.mark.realdata
def test_task_relationships_has_every_source_and_task(shared_data, tmp_path):
    results, text = _run("task_relationships", shared_data, tmp_path, "--n", "40", "--cv", "2", "--epochs", "1",
                         "--etl-results", str(tmp_path / "absent.csv"))
    frame = pd.read_csv(results.with_suffix(".csv"))
    tasks = ["Male", "Smiling", "Eyeglasses", "Young", "age", "utk_gender", "yaw", "emotion"]
    for kind in ("score", "relative_drop_pct"):
        part = frame[frame["kind"] == kind].set_index("source")
        assert sorted(part.index) == ["mini_xception", "mobilefacenet", "mtcnn_onet"]
        assert _finite(part, tasks)
    # Without ETL baselines the reference is the best source: no drop below 0, one 0 per task.
    drop = frame[frame["kind"] == "relative_drop_pct"][tasks]
    assert (drop >= -1e-9).all().all() and (drop.abs().min() < 1e-9).all()
    speed = pd.read_csv(results.with_name(results.stem + "_speed.csv"))
    assert speed.groupby("task").size().to_dict() == {"emotion": 2, "gender": 2}
    assert _finite(speed, ["accuracy", "time_s", "speedup_vs_transfer"])
    assert "best source" in text


@pytest.mark.slow
def test_pruner_runtimes_report_a_ratio_per_runtime(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    results = tmp_path / "pruner_runtimes.md"
    command = [sys.executable, str(BENCHMARKS / "bench_pruner.py"), "--runtimes", "--quick", "--threads", "1",
               "--results", str(results)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = results.read_text()
    assert "--quick" in text and "Machine:" in text and "Command:" in text
    frame = pd.read_csv(results.with_suffix(".csv"))
    # torch.compile may fail on a machine without a C++ compiler; the section then says why.
    measured = set(frame["runtime"])
    assert {"eager", "channels_last", "onnxruntime 1 thread", "onnxruntime 2 threads"} <= measured
    assert "compile" in measured or "compile, build" in text or "compile, batch 1" in text
    assert len(frame) == 4 * len(measured) and (frame["latency_ms"] > 0).all()
    originals = frame[frame["target"] == 1]
    assert (originals["speed_up"] == 1).all() and (originals["flops_ratio"] == 1).all()
    pruned = frame[frame["target"] < 1]
    assert (pruned["flops_ratio"] > 1).all()
    assert np.allclose(pruned["ratio"], pruned["speed_up"] / pruned["flops_ratio"])
