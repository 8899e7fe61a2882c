"""The benchmarks run end to end in their --quick mode.

Each script is run as a command (``python benchmarks/bench_x.py --quick`` with smaller overrides),
writing its markdown, CSV and figures into ``tmp_path`` so the committed results stay untouched:
the paper reproductions on a tiny subset of the real data, the performance benchmarks (pooler,
selection, pruner) on small random inputs.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# Each test runs a whole benchmark script in a subprocess (10-70 s): not in the fast subset.
pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _launch(script, tmp_path, *options):
    """The completed quick run of a script, writing its results to ``tmp_path / f"{script}.md"``."""
    command = [
        sys.executable, str(BENCHMARKS / f"bench_{script}.py"), "--quick", "--results", str(tmp_path / f"{script}.md"),
        "--threads", "1", *options,
    ]
    # One BLAS thread too: on a busy machine a second one only adds contention. The scripts import
    # sklearn_craft from this checkout, not from wherever the environment installed it.
    path = os.pathsep.join(filter(None, [str(BENCHMARKS.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)


def _run(script, tmp_path, *options):
    results = tmp_path / f"{script}.md"
    completed = _launch(script, tmp_path, *options)
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = results.read_text()
    assert "--quick" in text and "Machine:" in text and "Command:" in text
    return results, text


def _run_on_real_data(script, shared_data, tmp_path, *options):
    return _run(script, tmp_path, "--data-root", str(shared_data), "--figures", str(tmp_path), *options)


def _finite(frame, columns):
    values = frame[list(columns)].to_numpy(dtype=float)
    return np.isfinite(values).all()


@pytest.mark.realdata
def test_etl_table_has_one_row_per_method_and_changes_against_the_baseline(shared_data, tmp_path):
    # One-shot rows only: the sequential mode and the L1-norm rows at its FLOPs are half of the run, and
    # test_gamma_tradeoff_gives_a_row_per_gamma_and_a_figure runs them through the same pruner options.
    results, text = _run_on_real_data("etl_table", shared_data, tmp_path, "--tasks", "gender", "--n", "48",
                                      "--gammas", "0.1", "--alphas", "5", "--epochs", "1", "--selections", "one-shot")
    frame = pd.read_csv(results.with_suffix(".csv"))
    numeric = ["score", "parameters", "flops", "latency_ms", "time_s"]
    rules = ["craft", "l1", "random", "l1@flops", "random@flops"]
    assert list(frame["method"]) == ["baseline", *(f"{rule} g=0.1" for rule in rules)]
    assert _finite(frame, numeric + [f"{c}_chg_pct" for c in numeric])
    assert (frame.loc[0, [f"{c}_chg_pct" for c in numeric]] == 0).all()
    # Every rule prunes.
    assert (frame.loc[1:, "flops"] < frame.loc[0, "flops"]).all()
    # The matched rows match their CRAFT row's FLOPs (within the tolerance, a share of the original network's).
    flops = frame.set_index("method")["flops"]
    gap = abs(flops[["l1@flops g=0.1", "random@flops g=0.1"]] - flops["craft g=0.1"])
    assert (gap <= 0.01 * flops["baseline"]).all()
    assert frame["score"].between(0, 1).all() and frame["score_before_ft"].between(0, 1).all()
    assert "| gender | craft g=0.1 |" in text


@pytest.mark.realdata
def test_gamma_tradeoff_gives_a_row_per_gamma_and_a_figure(shared_data, tmp_path):
    results, text = _run_on_real_data("gamma_tradeoff", shared_data, tmp_path, "--tasks", "yaw", "--n", "48",
                                      "--gammas", "0", "0.1", "--alphas", "5", "--compensate")
    frame = pd.read_csv(results.with_suffix(".csv"))
    assert frame["method"].tolist() == ["unpruned", "one-shot", "sequential", "l1_norm"]
    assert frame["gamma"].tolist() == [0.0, 0.1, 0.1, 0.1] and set(frame["task"]) == {"yaw"}
    assert _finite(frame, ["score_before_ft", "score", "flops", "size_bytes", "flops_pct", "size_pct", "fit_s"])
    assert frame.loc[0, "flops_pct"] == 100 and (frame.loc[1:, "flops"] < frame.loc[0, "flops"]).all()
    # L1-norm filters at the sequential network's FLOPs (the tolerance is a share of the unpruned FLOPs).
    assert abs(frame.loc[3, "flops_pct"] - frame.loc[2, "flops_pct"]) <= 1.0
    assert "Every method with compensate=True" in text and "## Gamma trade-off (ETL Figure 6), readers compensated" in text
    assert (tmp_path / "gamma_tradeoff_yaw.png").stat().st_size > 0


@pytest.mark.realdata
def test_etl_full_records_each_fit_once_and_matches_its_reference(shared_data, tmp_path):
    options = ("--tasks", "yaw", "--n", "48", "--alphas", "5")
    results, _ = _run_on_real_data("etl_full", shared_data, tmp_path, *options, "--rows", "unpruned", "one-shot", "l1@one-shot")
    first = pd.read_csv(results.with_suffix(".csv"))
    assert first["row"].tolist() == ["unpruned", "one-shot", "l1@one-shot"]
    assert first["gamma"].tolist() == [0.0, 0.01, 0.01] and (first["n_train"] == 36).all() and (first["n_test"] == 12).all()
    assert _finite(first, ["flops_share", "score_before_ft", "score", "fit_s"])
    # L1-norm at one-shot's FLOPs (within flops_target's tolerance, a share of the full network) and head layer.
    one_shot, l1 = first.iloc[1], first.iloc[2]
    assert abs(l1["flops_share"] - one_shot["flops_share"]) <= 0.01 and l1["head_layer"] == one_shot["head_layer"]
    assert (first.loc[1:, "flops_share"] < first.loc[0, "flops_share"]).all()
    # Every record names the library commit that fitted it (-dirty with uncommitted package changes).
    # Read as text: a short commit such as 4e19422 parses as a number.
    (commit,) = pd.read_csv(results.with_suffix(".csv"), dtype={"commit": str})["commit"].unique()
    head = subprocess.run(["git", "-C", str(BENCHMARKS.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode:  # not a git checkout
        assert commit == "unknown"
    else:
        assert len(commit.removesuffix("-dirty")) >= 7 and head.stdout.startswith(commit.removesuffix("-dirty"))
    # A second invocation fits only what is not recorded, and a matched row reads its reference from the records.
    _, text = _run_on_real_data("etl_full", shared_data, tmp_path, *options, "--rows", "one-shot", "random@one-shot",
                                "one-shot-l1", "sequential-l1", "l1@sequential-l1")
    second = pd.read_csv(results.with_suffix(".csv"))
    pd.testing.assert_frame_equal(second.iloc[:3], first)
    assert second["row"].tolist()[3:] == ["one-shot-l1", "sequential-l1", "random@one-shot", "l1@sequential-l1"]
    assert abs(second.loc[5, "flops_share"] - one_shot["flops_share"]) <= 0.01
    # L1-norm filters in LASSO's per-layer counts: pruned networks, scored before and after fine-tuning.
    assert _finite(second.iloc[[3, 4]], ["flops_share", "score_before_ft", "score"])
    assert (second.loc[3:4, "flops_share"] < first.loc[0, "flops_share"]).all()
    sequential_l1, matched = second.iloc[4], second.iloc[6]
    assert abs(matched["flops_share"] - sequential_l1["flops_share"]) <= 0.01
    assert matched["head_layer"] == sequential_l1["head_layer"]
    assert "| yaw | random@one-shot | 0.01 |" in text and "| yaw | unpruned | 0 |" in text
    # The matched comparisons: each baseline beside its CRAFT row, the lead positive where CRAFT is better
    # (for an MAE the baseline's minus CRAFT's), before and after fine-tuning, and their summary.
    for rule, row in (("l1_norm", "l1@one-shot"), ("random", "random@one-shot")):
        craft, baseline = (second[second["row"] == name].iloc[0] for name in ("one-shot", row))
        lead = [baseline[score] - craft[score] for score in ("score_before_ft", "score")]
        (line,) = [line for line in text.splitlines() if line.startswith(f"| yaw | one-shot | {rule} | 0.01 | 0 |")]
        assert line.endswith(" | " + " | ".join(format(value, ".4g") for value in lead) + " |")
        assert f"| yaw | one-shot | {rule} | 1 | {int(lead[1] > 0)} | {int(lead[1] < 0)} | " in text
    # Random filters against L1-norm at the same row's FLOPs: one pair, random's lead (an MAE: L1's minus random's).
    l1, random = (second[second["row"] == name].iloc[0] for name in ("l1@one-shot", "random@one-shot"))
    gap = [l1[score] - random[score] for score in ("score_before_ft", "score")]
    assert (f"| yaw | 1 | {int(gap[1] > 0)} | {int(gap[1] < 0)} | {gap[0]:.4g} | nan | {gap[1]:.4g} | nan |"
            in text.splitlines())
    # No row: the table is written from the records alone; records from before --seed have the default seed.
    assert (second["random_state"] == 0).all()
    (tmp_path / "etl_full.md").unlink()
    old = second.drop(columns=["random_state", "commit"])
    old.to_csv(results.with_suffix(".csv"), index=False)
    _, text = _run_on_real_data("etl_full", shared_data, tmp_path, *options, "--rows")
    pd.testing.assert_frame_equal(pd.read_csv(results.with_suffix(".csv")), old)
    assert "| yaw | random@one-shot | 0.01 | 0 |" in text and "| yaw | one-shot-l1 | 0.01 | 0 |" in text
    assert text.count(" UTC |  |\n") == len(old)  # no commit recorded
    assert "## ETL Table 1 on all images (MobileFaceNet)\n" in text
    # Another seed is a repeated fit beside the recorded ones; its matched row follows the row of its seed,
    # also when the fits run in processes of their own (--jobs), where it waits for that row to end.
    _, text = _run_on_real_data("etl_full", shared_data, tmp_path, *options, "--rows", "one-shot", "l1@one-shot",
                                "--seed", "1", "--jobs", "2")
    third = pd.read_csv(results.with_suffix(".csv"))
    pd.testing.assert_frame_equal(third.iloc[: len(second)].drop(columns="commit"), second.drop(columns="commit"))
    assert third["commit"].iloc[: len(second)].isna().all() and third["commit"].iloc[len(second):].notna().all()
    repeat = third.iloc[len(second):]
    assert repeat["row"].tolist() == ["one-shot", "l1@one-shot"] and (repeat["random_state"] == 1).all()
    assert abs(repeat.iloc[1]["flops_share"] - repeat.iloc[0]["flops_share"]) <= 0.01
    assert "| yaw | one-shot | 0.01 | 1 | 0.001 | loss |" in text and "| yaw | one-shot | 0.01 | 0 | 0.001 | loss |" in text
    assert (third["monitor"] == "loss").all() and third["val_accuracy"].isna().all() and (third["lr"] == 1e-3).all()
    assert not third["calibrate_head"].any() and (third["head_temperature"] == 1.0).all()
    # Yaw watches its loss and keeps its regression head whatever --monitor and --calibrate-head say: those
    # rows are recorded, so nothing is refitted.
    _run_on_real_data("etl_full", shared_data, tmp_path, *options, "--rows", "one-shot", "--seed", "1", "--monitor",
                      "accuracy", "--calibrate-head")
    pd.testing.assert_frame_equal(pd.read_csv(results.with_suffix(".csv")), third)
    # Another learning rate is another fit, recorded beside the others; a matched row takes its FLOPs and head
    # layer from the recorded row of the same selection, fine-tuned at another learning rate.
    _, text = _run_on_real_data("etl_full", shared_data, tmp_path, *options, "--rows", "l1@one-shot", "--seed", "1",
                                "--lr", "1e-4")
    fourth = pd.read_csv(results.with_suffix(".csv"))
    pd.testing.assert_frame_equal(fourth.iloc[: len(third)], third)
    new = fourth.iloc[len(third):]
    assert new["row"].tolist() == ["l1@one-shot"] and new["lr"].tolist() == [1e-4]
    assert abs(new.iloc[0]["flops_share"] - repeat.iloc[0]["flops_share"]) <= 0.01
    assert new.iloc[0]["head_layer"] == repeat.iloc[0]["head_layer"]
    assert "| yaw | l1@one-shot | 0.01 | 1 | 0.0001 | loss |" in text
    # Past the deadline nothing starts: the command fails, naming the fits, and the records stay as they were.
    completed = _launch("etl_full", tmp_path, "--data-root", str(shared_data), *options, "--rows", "one-shot",
                        "--seed", "2", "--jobs", "2", "--deadline", "0")
    assert completed.returncode != 0 and "1 fit(s) failed, stopped or not started: [('yaw', 'one-shot'" in completed.stderr
    pd.testing.assert_frame_equal(pd.read_csv(results.with_suffix(".csv")), fourth)
    # A matched row without its reference is refused before any fit.
    completed = _launch("etl_full", tmp_path, "--data-root", str(shared_data), *options, "--rows", "l1@sequential")
    assert completed.returncode != 0 and "needs a recorded sequential row" in completed.stderr
    # --epochs 0 fits without fine-tuning, recorded beside the others: the selection of the fine-tuned row of the
    # same seed, scored once (the untrained network is what it keeps).
    _run_on_real_data("etl_full", shared_data, tmp_path, *options, "--rows", "one-shot", "--epochs", "0")
    fifth = pd.read_csv(results.with_suffix(".csv"))
    pd.testing.assert_frame_equal(fifth.iloc[: len(fourth)], fourth)
    untrained, trained = fifth.iloc[len(fourth):], fourth.iloc[1]
    assert untrained["row"].tolist() == ["one-shot"] and untrained["epochs"].tolist() == [0]
    selection = ["filters", "flops_share", "head_layer", "random_state"]
    assert untrained.iloc[0][selection].tolist() == trained[selection].tolist() and trained["epochs"] == 1
    assert untrained.iloc[0]["score"] == untrained.iloc[0]["score_before_ft"]
    assert untrained.iloc[0][["best_epoch", "epochs_run"]].tolist() == [0, 0]
    # --merge adds the records of other files that the records lack (a fit recorded in both keeps its
    # record); with no row it only merges and writes the table. A missing file is refused.
    other = tmp_path / "other.csv"
    elsewhere = fifth.iloc[[0, len(fifth) - 1]].assign(random_state=[5, 0], score=[1.0, 2.0])
    elsewhere.to_csv(other, index=False)
    _, text = _run_on_real_data("etl_full", shared_data, tmp_path, *options, "--rows", "--merge", str(other))
    merged = pd.read_csv(results.with_suffix(".csv"))
    pd.testing.assert_frame_equal(merged, pd.concat([fifth, elsewhere.iloc[:1]], ignore_index=True))
    assert "| yaw | unpruned | 0 | 5 |" in text
    completed = _launch("etl_full", tmp_path, "--data-root", str(shared_data), *options, "--rows", "--merge",
                        str(tmp_path / "absent.csv"))
    assert completed.returncode != 0 and "--merge: no record file at" in completed.stderr
    pd.testing.assert_frame_equal(pd.read_csv(results.with_suffix(".csv")), merged)


@pytest.mark.realdata
def test_yaw_filters_ranks_filters_by_their_correlation_with_pan(shared_data, tmp_path):
    results, _ = _run_on_real_data("yaw_filters", shared_data, tmp_path, "--n", "120", "--top", "3")
    frame = pd.read_csv(results.with_suffix(".csv"))
    assert len(frame) == 3 and frame["filter"].str.startswith("linear1.conv:").all()
    assert frame["ranked_by"].tolist() == ["yaw", "yaw", "abs_yaw"]
    r_yaw, r_abs = frame["r_yaw"].abs().to_numpy(), frame["r_abs_yaw"].abs().to_numpy()
    assert np.isfinite(r_yaw).all() and np.isfinite(r_abs).all() and (r_yaw <= 1).all() and (r_abs <= 1).all()
    assert r_yaw[0] >= r_yaw[1] >= r_yaw[2]
    assert (tmp_path / "yaw_filters.png").stat().st_size > 0


@pytest.mark.realdata
def test_task_relationships_has_every_source_and_task(shared_data, tmp_path):
    results, text = _run_on_real_data("task_relationships", shared_data, tmp_path, "--n", "40", "--cv", "2",
                                      "--epochs", "1", "--etl-results", str(tmp_path / "absent.csv"))
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


def _table(text, header):
    """The data rows of the markdown table whose header row starts with ``header``, as lists of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _committed(name):
    path = BENCHMARKS / "results" / f"{name}.md"
    return path.read_bytes() if path.exists() else None


def test_pooler_quick_run_measures_both_models_and_every_p5_run(tmp_path):
    committed = _committed("pooler")
    _, text = _run("pooler", tmp_path)
    p1 = _table(text, "| model | pooled layers |")
    assert [row[0] for row in p1] == ["VGG16 with classifier", "VGG16 conv trunk only"]
    assert all(row[1] == "13" and float(row[2]) > 0 and float(row[3]) > 0 and float(row[4]) > 0 for row in p1)
    runs = _table(text, "| batch | run | images |")
    assert [row[:3] for row in runs] == [["8", "bare", "16"], ["8", "pool", "16"], ["8", "pool", "32"]]
    assert all(float(row[3]) > 0 and float(row[4]) >= float(row[3]) for row in runs)
    assert len(_table(text, "| batch | pooler's own memory")) == 1
    assert _committed("pooler") == committed


def test_selection_quick_run_times_every_target_and_both_searches(tmp_path):
    committed = _committed("selection")
    _, text = _run("selection", tmp_path)
    p2 = _table(text, "| target | n_jobs |")
    assert [row[:2] for row in p2] == [[target, n_jobs] for target in ("1 output", "10 outputs", "10 classes")
                                       for n_jobs in ("1", "2")]
    assert all(float(row[2]) > 0 and int(row[4]) > 0 for row in p2)
    p3 = _table(text, "| pooled layers | 1 gamma s |")
    assert [row[0] for row in p3] == ["features.28 (the issue's composition)", "all 13 convs, grouped by layer"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in p3)
    assert _committed("selection") == committed


def test_pruner_quick_run_prunes_every_configuration_and_times_both_fits(tmp_path):
    committed = _committed("pruner")
    _, text = _run("pruner", tmp_path)
    p4 = _table(text, "| model | head | target share |")
    assert [row[:3] for row in p4] == [[model, head, share] for model in ("vgg16", "mobilenet_v1")
                                       for head in ("satellite", "original") for share in ("30%", "10%", "3%")]
    assert all(float(row[4]) > 1 for row in p4)  # every pruned network needs fewer FLOPs
    fits = _table(text, "| model | total s |")
    assert [row[0] for row in fits] == ["vgg16", "mobilenet_v1"]
    assert all(float(row[1]) > 0 for row in fits)
    assert _committed("pruner") == committed


def test_pruner_runtimes_report_a_ratio_per_runtime(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    committed = _committed("pruner_runtimes")
    results, text = _run("runtimes", tmp_path)
    assert _committed("pruner_runtimes") == committed
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


def test_multiclass_quick_run_reports_a_run_and_compares_it_with_a_saved_one(tmp_path):
    record = tmp_path / "run.npz"
    _, text = _run("multiclass", tmp_path, "--save", str(record))
    assert "| after: " in text and "Speed-up" not in text
    # A saved run compared with itself: the same knees, support and curves, a speed-up of 1.
    _, text = _run("multiclass", tmp_path, "--after", str(record), "--before", str(record))
    assert "**1.00x** in wall time" in text and "n_selected equal in 6 of 6 layers;" in text
    assert "support_ (the filters kept at every knee) identical" in text and "largest |RMSE difference| 0.00e+00" in text
    # A run at another tolerance, saved as the reference both are compared with.
    exact = tmp_path / "exact.npz"
    _run("multiclass", tmp_path, "--multitask-tol", "1e-9", "--save", str(exact))
    _, text = _run("multiclass", tmp_path, "--after", str(record), "--before", str(record), "--reference", str(exact))
    assert "| reference: " in text and " | 1e-09 | " in text and " | 1e-06 | " in text
    assert "- Knees of before against the reference (tol 1e-09): n_selected equal in " in text
    assert "- Knees of after against the reference (tol 1e-09): n_selected equal in " in text
    # Two references that disagree on a layer's knee: that layer is set aside as not determined.
    with np.load(exact) as stored:
        shifted = {name: stored[name] for name in stored.files}
    first_layer = str(shifted["knee_group"][0])
    shifted["knee_n_selected"] = shifted["knee_n_selected"] + np.eye(len(shifted["knee_group"]), dtype=int)[0]
    other = tmp_path / "other.npz"
    np.savez(other, **shifted)
    _, text = _run("multiclass", tmp_path, "--after", str(exact), "--reference", str(exact), str(other))
    assert "| reference 1: " in text and "| reference 2: " in text
    assert f"- Knees that differ between the references: {first_layer}: not determined" in text
    assert "- Knees of after against reference 1 (tol 1e-09): n_selected equal in 5 of 5 layers." in text
    assert "- Knees of after against reference 2 (tol 1e-09): n_selected equal in 5 of 5 layers." in text
    # One command fits the before (the library of a git revision, here this one, in a worktree) and
    # a reference in child processes: the same library gives the same knees, support and curves.
    _, text = _run("multiclass", tmp_path, "--before-commit", "HEAD", "--reference-tol", "1e-9")
    assert "| reference: " in text and " | 1e-09 | " in text and "| before: git " in text
    assert "(its --before-commit HEAD fit, in a child process)" in text and "Speed-up" in text
    assert "n_selected equal in 6 of 6 layers; support_ (the filters kept at every knee) identical" in text
    refused = _launch("multiclass", tmp_path, "--before", str(record), "--before-commit", "HEAD")
    assert refused.returncode == 2 and "--before and --before-commit name the same run" in refused.stderr


@pytest.mark.realdata
def test_fusion_seeds_compare_each_autoencoder_seed_and_weighting_with_bt(shared_data, tmp_path):
    results, text = _run_on_real_data("fusion_seeds", shared_data, tmp_path)
    frame = pd.read_csv(results.with_suffix(".csv"))
    targets = ["age", "gender", "race", "attributes", "emotion"]
    # One row per auto-encoder, weighting, seed (0 1 in --quick) and target, on the whole pool.
    assert len(frame) == 2 * 2 * 2 * len(targets) and set(frame["target"]) == set(targets)
    assert set(frame["source_weight"]) == {"none", "balanced"} and set(frame["seed"]) == {0, 1}
    assert frame["pool_images"].nunique() == 1
    assert _finite(frame, ["score", "BT", "nrmse"])
    # BT is one number per target, whatever the auto-encoder; at_least_BT follows the metric's direction.
    assert (frame.groupby("target")["BT"].nunique() == 1).all()
    higher = frame["metric"] == "accuracy %"
    expected = np.where(higher, frame["score"] >= frame["BT"], frame["score"] <= frame["BT"])
    assert (frame["at_least_BT"] == expected).all()
    # Different seeds give different auto-encoders.
    ae = frame[(frame["method"] == "AE") & (frame["source_weight"] == "none")]
    ae = ae.pivot(index="target", columns="seed", values="score")
    assert (ae[0] != ae[1]).any()
    assert "| AE | balanced |" in text and "targets>=BT per seed" in text

    # Half of the pool as well: another auto-encoder; the whole pool gives the same ones as above.
    options = ("--pool-fractions", "0.5", "1", "--source-weights", "none", "--seeds", "0")
    results, text = _run_on_real_data("fusion_seeds", shared_data, tmp_path, *options)
    pools = pd.read_csv(results.with_suffix(".csv"))
    assert len(pools) == 2 * 2 * len(targets)
    small, whole = sorted(pools["pool_images"].unique())
    assert whole == frame["pool_images"].iloc[0] and small == round(whole / 2)
    by_pool = pools[pools["method"] == "AE"].pivot(index="target", columns="pool_images", values="score")
    assert (by_pool[small] != by_pool[whole]).any()
    key = ["method", "source_weight", "seed", "pool_images", "target"]
    again = frame.merge(pools[pools["pool_images"] == whole], on=key, suffixes=("", "_again"))
    assert len(again) == 2 * len(targets)
    np.testing.assert_array_equal(again["score_again"], again["score"])
    assert f"| AE | none | {small} |" in text and f"| AE | none | {whole} |" in text
    assert "## Fusion: auto-encoders against BT over seeds, source weightings and pool sizes" in text
    # Mirror images double the pool: half of it is as many images as the pool without them.
    options = ("--mirror-pool", "--pool-fractions", "0.5", "--source-weights", "none", "--seeds", "0")
    results, text = _run_on_real_data("fusion_seeds", shared_data, tmp_path, *options)
    mirrored = pd.read_csv(results.with_suffix(".csv"))
    assert (mirrored["pool_images"] == whole).all() and len(mirrored) == 2 * len(targets)
    assert f"on {whole} of the {2 * whole} pool images (half of them mirror images)" in text
    assert "## Fusion: auto-encoders against BT over seeds and source weightings, on the pool and its mirror images" in text
    # A share of the pool outside (0, 1] is refused before anything is loaded.
    completed = _launch("fusion_seeds", tmp_path, "--pool-fractions", "0", "1")
    assert completed.returncode == 2 and "--pool-fractions must be in (0, 1], got [0.0, 1.0]" in completed.stderr


@pytest.mark.realdata
def test_fusion_has_every_method_on_every_target_and_a_lighter_student(shared_data, tmp_path):
    saved = tmp_path / "student.pt"
    results, text = _run_on_real_data("fusion", shared_data, tmp_path, "--ae-epochs", "2", "--save-student", str(saved))
    stem = str(results.with_suffix(""))
    table6 = pd.read_csv(f"{stem}_table6.csv", index_col="target")
    assert list(table6.index) == ["age", "gender", "race", "attributes", "emotion"]
    assert "(FER2013's test split; --emotion-target)" in text  # the default emotion target
    assert _finite(table6, ["Concat", "PCA", "AE", "DAE", "BT", "BCT"])
    sources = {"mobilefacenet", "mini_xception", "mtcnn_onet"}
    assert set(table6["BT_source"]) <= sources
    assert all(set(combination.split("+")) <= sources for combination in table6["BCT_sources"])
    # BCT's candidates include every single source, scored on the same folds: never worse than BT.
    error = table6["metric"] != "accuracy %"
    assert (table6.loc[error, "BCT"] <= table6.loc[error, "BT"]).all()
    assert (table6.loc[~error, "BCT"] >= table6.loc[~error, "BT"]).all()
    # The paired difference is over the folds BT is scored on: its mean is the difference of the means.
    for label in ("AE", "DAE"):
        np.testing.assert_allclose(table6[f"{label}-BT"], table6[label] - table6["BT"], atol=1e-9)
        assert (table6[f"{label}_SE"] >= 0).all() and _finite(table6, [f"{label}_SE"])
    nrmse = pd.read_csv(f"{stem}_nrmse.csv", index_col=0)
    assert list(nrmse.index) == ["mobilefacenet", "mini_xception", "mtcnn_onet", "average"]
    assert _finite(nrmse, ["PCA", "AE", "DAE"]) and (nrmse > 0).all().all()
    costs = pd.read_csv(f"{stem}_costs.csv", index_col=0)
    teacher, student = costs.iloc[0], costs.iloc[1]
    assert student["parameters"] < 2.5e6 and student["parameters"] < teacher["parameters"]
    assert student["flops"] < teacher["flops"]
    targets = pd.read_csv(f"{stem}_targets.csv", index_col="target")
    assert list(targets.index) == list(table6.index)
    assert _finite(targets, ["teacher h_G + satellite", "student h^_G + satellite", "student fine-tuned",
                             "same network from scratch"])
    pruned = pd.read_csv(f"{stem}_pruned.csv", index_col=0)
    assert pruned["parameters"].iloc[1] < pruned["parameters"].iloc[0]
    assert pruned["filters"].iloc[1] < pruned["filters"].iloc[0]
    assert "Table 6" in text and "CRAFT-pruned" in text
    # The saved student is what bench_attributes.py --init-from reads: a MobileNet v1 alpha=0.5 state dict.
    from sklearn_craft.models import mobilenet_v1

    state = torch.load(saved, weights_only=True)
    mobilenet_v1(num_classes=state["classifier.weight"].shape[0], width_mult=0.5).load_state_dict(state)


@pytest.mark.realdata
def test_attributes_trains_scratch_and_distilled_rows_and_writes_the_cost_table(shared_data, tmp_path):
    from sklearn_craft.models import mobilenet_v1

    student = tmp_path / "student.pt"
    torch.save(mobilenet_v1(num_classes=16, width_mult=0.25).state_dict(), student)
    results, text = _run_on_real_data("attributes", shared_data, tmp_path, "--n", "64", "--alphas", "0.25", "--epochs", "1",
                         "--init-from", str(student))
    frame = pd.read_csv(results.with_suffix(".csv"))
    assert frame["model"].tolist() == ["majority (train)", "a=0.25 scratch", "a=0.25 distilled"]
    assert frame["init"].tolist() == ["-", "random", "student.pt"]
    assert frame["mean_accuracy"].between(0, 1).all()
    # The distilled student's 16-d embedding layer was replaced: both trained networks have 40 outputs.
    assert frame.loc[1, "parameters"] == frame.loc[2, "parameters"] and frame.loc[1, "mult_adds"] > 0
    per_attribute = pd.read_csv(results.with_name("attributes_per_attribute.csv"), index_col="attribute")
    assert len(per_attribute) == 41 and per_attribute.index[-1] == "mean"
    np.testing.assert_allclose(per_attribute.loc["mean", frame["model"]], frame["mean_accuracy"])
    costs = pd.read_csv(tmp_path / "mobilenet_costs.csv")
    assert len(costs) == 16 and costs.loc[0, "mult_adds_M"] == pytest.approx(568.74)
    assert (tmp_path / "attributes_accuracy.png").stat().st_size > 0
    assert "| a=0.25 distilled | student.pt |" in text

    # --merge: another alpha trained in a second run, the rows of the first kept as they were.
    results, text = _run_on_real_data("attributes", shared_data, tmp_path, "--n", "64", "--alphas", "0.5", "--epochs", "1",
                                      "--merge")
    merged = pd.read_csv(results.with_suffix(".csv"))
    assert merged["model"].tolist() == ["majority (train)", "a=0.25 scratch", "a=0.25 distilled", "a=0.5 scratch"]
    pd.testing.assert_frame_equal(merged.iloc[:3], frame)
    merged_per_attribute = pd.read_csv(results.with_name("attributes_per_attribute.csv"), index_col="attribute")
    pd.testing.assert_frame_equal(merged_per_attribute[per_attribute.columns], per_attribute)
    assert merged["run"].iloc[1].endswith("--init-from " + str(student)) and "--merge" in merged["run"].iloc[3]
    assert "- a=0.25 scratch: `" in text and "- a=0.5 scratch: `" in text
    # Rows trained with another budget are not mixed in: refused before any training.
    refused = _launch("attributes", tmp_path, "--data-root", str(shared_data), "--figures", str(tmp_path), "--n", "64",
                      "--alphas", "0.5", "--epochs", "2", "--merge")
    assert refused.returncode != 0 and "a=0.25 scratch" in refused.stderr and "'max_epochs': 1" in refused.stderr
    assert pd.read_csv(results.with_suffix(".csv"))["model"].tolist() == merged["model"].tolist()


def test_scale_quick_run_measures_every_mode_and_size(tmp_path):
    committed = _committed("scale")
    # Two children at once, the largest first: the rows keep the order of the runs.
    _, text = _run("scale", tmp_path, "--sizes", "16", "32", "--pruner-sizes", "16", "--jobs", "2")
    rows = _table(text, "| mode | n |")
    assert [(row[0], int(row[1])) for row in rows] == [("select", 16), ("select", 32), ("pruner", 16)]
    assert "2 child processes ran at once" in text
    assert all(0 < float(row[2]) < 4 for row in rows)  # peak RSS in GB, the 4 GB budget
    assert _committed("scale") == committed


def test_scale_grid_runs_the_search_in_one_process_and_on_two_clusters(tmp_path):
    committed = _committed("scale_grid")
    _, text = _run("scale", tmp_path, "--grid", "--grid-n", "45")
    [row] = _table(text, "| n | one_process_s |")
    assert row[0] == "45" and row[4] == "True" and all(float(cell) > 0 for cell in row[1:4])
    assert "## Scaling: a grid search on a dask cluster" in text and _committed("scale_grid") == committed


def test_scale_multiclass_runs_the_multiclass_path_before_and_after(tmp_path):
    # On the synthetic case: e4cb6be's library in a worktree, references at 1e-8 and 1e-10, this one.
    _, text = _run("scale", tmp_path, "--multiclass")
    assert "## LassoFilterSelector, multi-class path (P2c)" in text and "| before: git e4cb6be" in text
    assert " | 1e-08 | " in text and " | 1e-10 | " in text and "Speed-up" in text


def test_scale_large_run_fits_one_streaming_pruner_on_mobilenet(tmp_path):
    committed = _committed("scale_large")
    _, text = _run("scale", tmp_path, "--large", "40")
    [row] = _table(text, "| mode | n |")
    assert row[:2] == ["pruner", "40"] and 0 < float(row[2]) < 4 and int(row[5]) > 0
    assert "10,944 filters" in text and "3x32x32" in text
    assert _committed("scale_large") == committed
