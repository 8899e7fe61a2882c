"""Grid searches, task relationships and per-layer LASSO paths on a dask.distributed cluster.

joblib's dask backend sends the work of every joblib ``Parallel`` call (scikit-learn's grid
search, the pooling and satellite fits of ``task_relationship_matrix``, the per-layer paths of
``LassoFilterSelector``) to the workers of a cluster. These tests start a ``LocalCluster`` of two
worker processes on the loopback interface, check that the tasks ran there, that the pooling
cache on the shared folder holds what one process caches, and that every result equals the
one-process result exactly.
"""

from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from torch import nn

from sklearn_craft import ActivationPooler, CraftPruner, LassoFilterSelector
from sklearn_craft.relationships import task_relationship_matrix

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    with cluster, distributed.Client(cluster) as client:
        yield client


def _on_cluster(client, fit):
    """``fit()`` under joblib's dask backend; its result and the keys of the tasks the workers ran."""
    with distributed.get_task_stream(client) as stream, joblib.parallel_config(backend="dask"):
        result = fit()
    return result, [task["key"] for task in stream.data]


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
    ).eval()


@pytest.fixture(scope="module")
def faces():
    X = np.random.default_rng(0).random((48, 1, 12, 12), dtype=np.float32)
    return X, X[:, 0, :6].mean(axis=(1, 2)) - X[:, 0, 6:].mean(axis=(1, 2))


def _pooled_results(folder):
    """Names of the pooled responses a ``memory`` folder holds (keyed by a digest of model and images)."""
    return sorted(path.name for path in Path(folder).rglob("sklearn_craft/*._pool_features/*.npz"))


def _assert_same_search(local, remote):
    assert remote.best_params_ == local.best_params_
    for key in ("mean_test_score", "split0_test_score", "split1_test_score", "rank_test_score"):
        np.testing.assert_array_equal(remote.cv_results_[key], local.cv_results_[key])


def test_grid_search_of_a_pipeline_over_gamma(client, faces, tmp_path):
    X, y = faces

    def search(cache, n_jobs):
        pipeline = make_pipeline(
            ActivationPooler(_net(), memory=str(cache)),
            LassoFilterSelector(memory=str(cache), random_state=0),
            RidgeCV(),
        )
        return GridSearchCV(pipeline, {"lassofilterselector__gamma": [0.01, 0.1, 0.3]}, cv=2, n_jobs=n_jobs)

    local = search(tmp_path / "local", None).fit(X, y)
    remote, keys = _on_cluster(client, lambda: search(tmp_path / "shared", -1).fit(X, y))
    _assert_same_search(local, remote)
    assert sum("_fit_and_score" in key for key in keys) >= 3
    # The workers pooled into the shared folder what one process caches: each training fold once, then all X.
    assert len(_pooled_results(tmp_path / "shared")) == 3
    assert _pooled_results(tmp_path / "shared") == _pooled_results(tmp_path / "local")


def test_grid_search_of_craft_pruner_over_gamma(client, faces, tmp_path):
    X, y = faces

    def search(cache, n_jobs):
        pruner = CraftPruner(_net(), finetune_params=None, memory=str(cache), random_state=0)
        # Workers send back scores only; the best pruner is refitted here.
        return GridSearchCV(pruner, {"gamma": [0.01, 0.3]}, cv=2, n_jobs=n_jobs)

    local = search(tmp_path / "local", None).fit(X, y)
    remote, keys = _on_cluster(client, lambda: search(tmp_path / "shared", -1).fit(X, y))
    _assert_same_search(local, remote)
    assert sum("_fit_and_score" in key for key in keys) == 4
    assert remote.best_estimator_.keep_ == local.best_estimator_.keep_
    np.testing.assert_array_equal(remote.predict(X), local.predict(X))


def test_task_relationship_matrix(client, faces, tmp_path):
    X, y = faces
    tasks = pd.DataFrame({"contrast": y, "bright": X.mean(axis=(1, 2, 3)) > np.median(X.mean(axis=(1, 2, 3)))})
    sources = {"net": _net(0), "other": _net(1), "pixels": X.reshape(len(X), -1)[:, ::8]}
    kwargs = dict(cv=3, random_state=0, return_details=True)
    local = task_relationship_matrix(sources, X, tasks, memory=str(tmp_path / "local"), **kwargs)
    remote, keys = _on_cluster(
        client, lambda: task_relationship_matrix(sources, X, tasks, n_jobs=-1, memory=str(tmp_path / "shared"), **kwargs)
    )
    for expected, got in zip(local, remote):
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
    assert sum("_pool_source" in key for key in keys) >= 1 and sum("_fit_satellite" in key for key in keys) >= 1
    assert len(_pooled_results(tmp_path / "shared")) == 2
    assert _pooled_results(tmp_path / "shared") == _pooled_results(tmp_path / "local")


def test_per_layer_lasso_paths(client):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 24))
    y = X[:, 2] - 0.5 * X[:, 13] + 0.1 * rng.normal(size=90)
    # Layers of three widths: their paths are solved in three tasks (one per width).
    groups = np.repeat(["conv1", "conv2", "conv3", "conv4"], [4, 6, 6, 8])
    local = LassoFilterSelector(groups=groups, gamma=0.1, random_state=0).fit(X, y)
    remote, keys = _on_cluster(
        client, lambda: LassoFilterSelector(groups=groups, gamma=0.1, n_jobs=-1, random_state=0).fit(X, y)
    )
    assert sum("solve" in key for key in keys) >= 2
    np.testing.assert_array_equal(remote.support_, local.support_)
    np.testing.assert_array_equal(remote.coef_, local.coef_)
    pd.testing.assert_frame_equal(remote.curves_, local.curves_, check_exact=True)
