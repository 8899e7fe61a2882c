import copy
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from joblib import parallel_config
from sklearn.model_selection import KFold

import sklearn_craft.relationships
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.relationships import layer_task_matrix, relative_drop, task_relationship_matrix
from sklearn_craft.satellites import _best_threshold

from conftest import conv_chain


def _sources_and_tasks(n=240, d=8, seed=0):
    """Source "s1" carries every task linearly; "s2" is independent noise."""
    rng = np.random.RandomState(seed)
    s1, s2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    latent = s1 @ rng.normal(size=d)
    tasks = pd.DataFrame(
        {
            "B": latent + 0.1 * rng.normal(size=n),
            "flag": s1[:, 0] > 0,
            "colour": np.array(["red", "green", "blue"])[np.digitize(s1[:, 1], [-0.5, 0.5])],
            "grade": pd.Categorical(np.digitize(s1[:, 2], [-1, 0, 1]), categories=[0, 1, 2, 3], ordered=True),
            "hat": (s1[:, 3] > 0).astype(float),
            "tie": s1[:, 4] > 0.3,
        },
        index=pd.RangeIndex(1000, 1000 + n),
    )
    return {"s1": s1, "s2": s2}, tasks


class _RecordingKFold(KFold):
    """KFold that remembers how many samples each split call saw."""

    def __init__(self, n_splits=3):
        super().__init__(n_splits=n_splits, shuffle=True, random_state=0)
        self.seen = []

    def split(self, X, y=None, groups=None):
        self.seen.append(len(X))
        return super().split(X, y, groups)


def test_informative_source_ranks_above_noise_for_every_kind():
    sources, tasks = _sources_and_tasks()
    matrix, details = task_relationship_matrix(
        sources, None, tasks, task_types={"accessories": ["hat", "tie"]}, return_details=True, random_state=0
    )
    assert list(matrix.index) == ["s1", "s2"]
    assert list(matrix.columns) == ["B", "flag", "colour", "grade", "accessories"]
    better = matrix.attrs["greater_is_better"]
    for task in matrix.columns:
        s1, s2 = matrix.loc["s1", task], matrix.loc["s2", task]
        assert (s1 > s2) if better[task] else (s1 < s2), task
    r2 = details.query("task == 'B' and metric == 'r2'").groupby("source")["value"].mean()
    assert r2["s1"] > 0.95 and r2["s2"] < 0.1


def test_each_kind_reports_its_documented_metric():
    sources, tasks = _sources_and_tasks()
    matrix, details = task_relationship_matrix(
        sources,
        None,
        tasks,
        task_types={"accessories": ["hat", "tie"]},
        cv=4,
        return_details=True,
        random_state=0,
    )
    assert matrix.attrs["task_type"] == {
        "B": "continuous",
        "flag": "binary",
        "colour": "multiclass",
        "grade": "ordinal",
        "accessories": "multilabel-indicator",
    }
    assert matrix.attrs["metric"] == {
        "B": "rmse",
        "flag": "accuracy",
        "colour": "accuracy",
        "grade": "accuracy",
        "accessories": "accuracy",
    }
    assert matrix.attrs["greater_is_better"]["B"] is False
    metrics = details.groupby("task")["metric"].agg(lambda m: sorted(set(m)))
    assert metrics["B"] == ["r2", "rmse"]
    assert all(metrics[t] == ["accuracy"] for t in ["flag", "colour", "grade", "accessories"])
    assert set(details.columns) == {"source", "task", "fold", "metric", "value"}
    assert len(details) == 2 * (4 * 4 + 4 * 2)

    # A single-label accuracy on a fold of m test rows is a multiple of 1/m.
    fold_size = {len(tasks) // 4, len(tasks) // 4 + 1}
    single = details[details["task"].isin(["flag", "colour", "grade"])]["value"].to_numpy()
    assert all(min(abs(v * m - round(v * m)) for m in fold_size) < 1e-9 for v in single)
    # The matrix is the fold mean of the main metric.
    expected = details.query("metric == 'rmse'").groupby("source")["value"].mean()
    np.testing.assert_allclose(matrix["B"].to_numpy(), expected[["s1", "s2"]].to_numpy())


def test_inferred_task_kinds():
    n = 40
    tasks = pd.DataFrame(
        {
            "bool": np.arange(n) % 2 == 0,
            "zero_one": (np.arange(n) % 2).astype(float),
            "two_strings": np.where(np.arange(n) % 2, "m", "f"),
            "ints": np.arange(n) % 4,
            "strings": np.array(list("abcd"))[np.arange(n) % 4],
            "ordered": pd.Categorical(np.arange(n) % 3, ordered=True),
            "floats": np.linspace(0, 1, n),
        }
    )
    features = np.random.RandomState(0).normal(size=(n, 3))
    matrix = task_relationship_matrix({"f": features}, None, tasks, cv=2, random_state=0)
    assert matrix.attrs["task_type"] == {
        "bool": "binary",
        "zero_one": "binary",
        "two_strings": "binary",
        "ints": "multiclass",
        "strings": "multiclass",
        "ordered": "ordinal",
        "floats": "continuous",
    }
    overridden = task_relationship_matrix(
        {"f": features}, None, tasks[["ints"]], task_types={"ints": "ordinal"}, cv=2, random_state=0
    )
    assert overridden.attrs["task_type"] == {"ints": "ordinal"}


def test_missing_labels_exclude_rows_of_that_task_only():
    sources, tasks = _sources_and_tasks()
    tasks = tasks[["B", "flag"]].copy()
    tasks["B"] = tasks["B"].where(np.arange(len(tasks)) % 3 != 0)
    cv = _RecordingKFold()
    matrix = task_relationship_matrix(sources, None, tasks, cv=cv)
    assert cv.seen == [len(tasks) - tasks["B"].isna().sum(), len(tasks)]

    labelled = tasks["B"].notna().to_numpy()
    subset = task_relationship_matrix(
        {name: value[labelled] for name, value in sources.items()},
        None,
        tasks.loc[labelled, ["B"]],
        cv=_RecordingKFold(),
    )
    np.testing.assert_allclose(matrix["B"].to_numpy(), subset["B"].to_numpy())


def test_multilabel_group_is_the_mean_of_its_labels():
    sources, tasks = _sources_and_tasks()
    cv = KFold(3, shuffle=True, random_state=0)
    group = task_relationship_matrix(sources, None, tasks, cv=cv, task_types={"accessories": ["hat", "tie"]})
    alone = task_relationship_matrix(sources, None, tasks[["hat", "tie"]], cv=cv)
    assert "hat" not in group.columns and "tie" not in group.columns
    assert list(group.columns).index("accessories") == list(tasks.columns).index("hat")
    np.testing.assert_allclose(group["accessories"].to_numpy(), alone.mean(axis=1).to_numpy())


def test_scoring_override_and_determinism():
    sources, tasks = _sources_and_tasks()
    kwargs = dict(cv=3, scoring={"grade": "mae", "flag": "balanced_accuracy"}, random_state=3)
    first = task_relationship_matrix(sources, None, tasks, **kwargs)
    # Threads keep the test fast; process workers run the same code on pickled copies.
    with parallel_config(backend="threading"):
        again = task_relationship_matrix(sources, None, tasks, n_jobs=2, **kwargs)
    pd.testing.assert_frame_equal(first, again)
    assert first.attrs["metric"]["grade"] == "mae" and first.attrs["greater_is_better"]["grade"] is False
    assert first.attrs["metric"]["flag"] == "balanced_accuracy"
    uniform = task_relationship_matrix(sources, None, tasks[["B"]], cv=3, scoring="r2", random_state=3)
    assert uniform.attrs["metric"] == {"B": "r2"} and uniform.loc["s1", "B"] > 0.95


def test_threshold_maximises_training_accuracy():
    rng = np.random.RandomState(0)
    for _ in range(20):
        scores = np.round(rng.normal(size=30), 1)
        y = (rng.rand(30) < 0.5).astype(float)
        threshold = _best_threshold(scores, y)
        candidates = np.concatenate([[-np.inf], np.unique(scores)])
        best = max(np.mean((scores > c) == y) for c in candidates)
        assert np.mean((scores > threshold) == y) == best


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(tasks=np.zeros((10, 2))), TypeError, "tasks must be a pandas DataFrame"),
        (dict(shift_index=True), ValueError, "index of sources"),
        (dict(drop_rows=True), ValueError, "samples but tasks has"),
        (dict(task_types={"flag": "nominal"}), ValueError, "task_types"),
        (dict(task_types={"missing": "binary"}), ValueError, "not a column"),
        (dict(task_types={"group": ["hat", "nope"]}), ValueError, "not columns"),
        (dict(task_types={"group": ["hat", "colour"]}), ValueError, "must be binary"),
        (dict(constant=True), ValueError, "single value"),
        (dict(scoring={"flag": "rmse"}), ValueError, "scoring for task 'flag'"),
        (dict(scoring={"nope": "rmse"}), ValueError, "unknown tasks"),
        (dict(cv=1), ValueError, "cv must be"),
        (dict(sources={}), TypeError, "sources must be"),
        (dict(sources={"a": "features"}), TypeError, "sources\\['a'\\] must be"),
        (dict(layer={"s1": "conv"}), ValueError, "not network sources"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    sources, tasks = _sources_and_tasks(n=60)
    if kwargs.pop("shift_index", False):
        sources["s1"] = pd.DataFrame(sources["s1"], index=tasks.index + 1)
    if kwargs.pop("drop_rows", False):
        sources["s1"] = sources["s1"][:-1]
    if kwargs.pop("constant", False):
        tasks["flag"] = np.where(tasks["flag"], True, np.nan)
    kwargs = {"sources": sources, "tasks": tasks, "cv": 3, **kwargs}
    with pytest.raises(error, match=match):
        task_relationship_matrix(kwargs.pop("sources"), None, kwargs.pop("tasks"), **kwargs)


def test_relative_drop_against_diagonal_series_and_error_metrics():
    scores = pd.DataFrame({"gender": [0.9, 0.72], "age": [0.5, 0.6]}, index=["gender", "age"])
    drop = relative_drop(scores)
    np.testing.assert_allclose(drop.to_numpy(), [[0.0, 100 * 0.1 / 0.6], [20.0, 0.0]])
    assert drop.attrs["greater_is_better"] == {"gender": False, "age": False}

    reference = pd.Series({"gender": 1.0, "age": 0.5, "unused": 3.0})
    np.testing.assert_allclose(relative_drop(scores, reference).to_numpy(), [[10.0, 0.0], [28.0, -20.0]])

    rmse = pd.DataFrame({"yaw": [10.0, 15.0]}, index=["yaw", "identity"])
    rmse.attrs["greater_is_better"] = {"yaw": False}
    np.testing.assert_allclose(relative_drop(rmse)["yaw"].to_numpy(), [0.0, 50.0])
    np.testing.assert_allclose(relative_drop(rmse, greater_is_better=True)["yaw"].to_numpy(), [0.0, -50.0])

    with pytest.raises(ValueError, match="no score for tasks \\['age'\\]"):
        relative_drop(scores, pd.Series({"gender": 1.0}))
    with pytest.raises(ValueError, match="diagonal"):
        relative_drop(scores.set_axis(["a", "b"]))
    with pytest.raises(TypeError, match="reference must be"):
        relative_drop(scores, [1.0, 2.0])


def test_relative_drop_of_a_computed_matrix_uses_its_metric_direction():
    sources, tasks = _sources_and_tasks()
    tasks = tasks.rename(columns={"B": "s1", "flag": "s2"})[["s1", "s2"]]
    matrix = task_relationship_matrix(sources, None, tasks, cv=3, random_state=0)
    drop = relative_drop(matrix)
    assert drop.loc["s1", "s1"] == 0.0 and drop.loc["s2", "s2"] == 0.0
    # s2 is noise: worse RMSE on s1's task is a positive drop, better accuracy on its own task is negative.
    assert drop.loc["s2", "s1"] > 0 and drop.loc["s1", "s2"] < 0


def _images_and_tasks(n=60):
    rng = np.random.RandomState(0)
    images = rng.rand(n, 3, 8, 8).astype(np.float32)
    red = images[:, 0].mean(axis=(1, 2))
    tasks = pd.DataFrame(
        {"redness": red, "bright": images.mean(axis=(1, 2, 3)) > np.median(images.mean(axis=(1, 2, 3)))}
    )
    return images, tasks


def test_network_source_is_pooled_at_its_last_conv():
    images, tasks = _images_and_tasks()
    net = conv_chain(in_channels=3, n_outputs=2).train()
    before = copy.deepcopy(net.state_dict())
    pooled = ActivationPooler(copy.deepcopy(net), layers=["6"]).fit_transform(images)
    matrix = task_relationship_matrix({"net": net, "pooled": pooled}, images, tasks, cv=3, random_state=0)
    pd.testing.assert_series_equal(matrix.loc["net"], matrix.loc["pooled"], check_names=False)
    explicit = task_relationship_matrix({"net": net}, images, tasks, layer="0", cv=3, random_state=0)
    assert not np.allclose(explicit.loc["net"], matrix.loc["net"])
    assert net.training and not net[0]._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_layer_task_matrix_scores_every_conv_layer():
    images, tasks = _images_and_tasks()
    net = conv_chain(in_channels=3, n_outputs=2)
    matrix, best_layer, details = layer_task_matrix(
        net, images, tasks, cv=3, random_state=0, return_details=True
    )
    assert list(matrix.index) == ["0", "4", "6"] and matrix.index.name == "layer"
    assert list(matrix.columns) == ["redness", "bright"]
    assert best_layer["redness"] == matrix["redness"].idxmin()
    assert best_layer["bright"] == matrix["bright"].idxmax()
    assert set(details["layer"]) == {"0", "4", "6"}
    with pytest.raises(TypeError, match="model must be"):
        layer_task_matrix(images, images, tasks)
    with pytest.raises(ValueError, match="samples but tasks has"):
        layer_task_matrix(net, images[:-1], tasks)


@pytest.mark.slow
def test_network_sources_are_pooled_in_parallel_with_the_sequential_results(monkeypatch):
    images, tasks = _images_and_tasks()
    mirrored = conv_chain(in_channels=3, n_outputs=2)
    with torch.no_grad():
        mirrored[0].weight.neg_()
    sources = {"net": conv_chain(in_channels=3, n_outputs=2), "features": images.mean(axis=(2, 3)), "mirrored": mirrored}
    kwargs = dict(cv=3, random_state=0, return_details=True)
    sequential = task_relationship_matrix(sources, images, tasks, **kwargs)
    in_processes = task_relationship_matrix(sources, images, tasks, n_jobs=2, **kwargs)
    for expected, got in zip(sequential, in_processes):
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
    assert list(sequential[0].index) == ["net", "features", "mirrored"]
    assert not sequential[0].loc["net"].equals(sequential[0].loc["mirrored"])

    threads = []
    pool_source = sklearn_craft.relationships._pool_source
    monkeypatch.setattr(
        sklearn_craft.relationships,
        "_pool_source",
        lambda *args: threads.append(threading.get_ident()) or pool_source(*args),
    )
    with parallel_config(backend="threading"):
        in_threads = task_relationship_matrix(sources, images, tasks, n_jobs=2, **kwargs)
    assert len(threads) == 2 and threading.get_ident() not in threads
    pd.testing.assert_frame_equal(in_threads[0], sequential[0], check_exact=True)
