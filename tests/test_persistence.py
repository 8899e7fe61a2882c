"""A fitted pruner and the networks it produces pickle, travel to worker processes and come back."""

import pickle

import joblib
import numpy as np
import pytest
import torch
from torch import nn

from sklearn_craft.models import lightcnn9, mobilenet_v2, resnet18
from sklearn_craft.pruner import CraftPruner
from sklearn_craft.surgery import prune_channels, truncate


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
    ).eval()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.random((48, 1, 12, 12), dtype=np.float32)
    y = X[:, 0, :6].mean(axis=(1, 2)) - X[:, 0, 6:].mean(axis=(1, 2)) + 0.01 * rng.normal(size=len(X))
    return X, y


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize(
    "build, layer, shape",
    [
        (lambda: resnet18(num_classes=3, width_mult=0.125), "layer2.0.conv1", (3, 32, 32)),
        (lambda: mobilenet_v2(num_classes=3, width_mult=0.25), "features.3.conv.0.0", (3, 32, 32)),
        (lambda: lightcnn9(num_classes=3, input_size=32, width_mult=0.25), "features.2.conv.filter", (1, 32, 32)),
    ],
    ids=["resnet18", "mobilenet_v2", "lightcnn9"],
)
def test_truncated_and_pruned_networks_pickle(build, layer, shape):
    torch.manual_seed(0)
    x = torch.rand(2, *shape)
    truncated = truncate(build().eval(), layer, x)
    pruned = prune_channels(truncated, {layer: [0, 2]}, x)
    for network in (truncated, pruned):
        copy = pickle.loads(pickle.dumps(network))
        assert [name for name, _ in copy.named_modules()] == [name for name, _ in network.named_modules()]
        assert torch.equal(_outputs(copy, x), _outputs(network, x))


def test_fitted_pruner_round_trips_through_joblib(data, tmp_path):
    X, y = data
    pruner = CraftPruner(_net(), gamma=0.1, random_state=0).fit(X, y)
    joblib.dump(pruner, tmp_path / "pruner.joblib")
    loaded = joblib.load(tmp_path / "pruner.joblib")
    np.testing.assert_array_equal(loaded.predict(X), pruner.predict(X))
    np.testing.assert_array_equal(loaded.transform(X), pruner.transform(X))
    assert loaded.keep_ == pruner.keep_


def test_pruned_model_pickles_and_torch_saves(data, tmp_path):
    X, y = data
    pruned = CraftPruner(_net(), gamma=0.1, random_state=0).fit(X, y).pruned_model_
    x = torch.as_tensor(X[:5])
    assert torch.equal(_outputs(pickle.loads(pickle.dumps(pruned)), x), _outputs(pruned, x))
    torch.save(pruned, tmp_path / "pruned.pt")
    # Loading a whole module unpickles code: the user's choice for a file they wrote themselves.
    loaded = torch.load(tmp_path / "pruned.pt", weights_only=False)
    assert torch.equal(_outputs(loaded, x), _outputs(pruned, x))


@pytest.mark.slow
def test_cross_validate_returns_estimators_from_worker_processes(data):
    from sklearn.model_selection import cross_validate

    from sklearn_craft.pruner import CraftRegressor

    X, y = data
    results = cross_validate(
        CraftRegressor(_net(), gamma=0.1, random_state=0, selector_params={"alphas": 10}),
        X,
        y,
        cv=2,
        n_jobs=2,
        return_estimator=True,
        return_indices=True,
    )
    for estimator, test, score in zip(results["estimator"], results["indices"]["test"], results["test_score"]):
        assert estimator.score(X[test], y[test]) == pytest.approx(score)
