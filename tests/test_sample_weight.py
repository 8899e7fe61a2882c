"""sample_weight: a sample of weight 2 counts as that sample twice in the satellites, fine-tuning and the pruner."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from torch import nn

from sklearn_craft.finetune import finetune
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.pruner import CraftPruner
from sklearn_craft.satellites import fit_satellite, make_satellite, satellite_decision

KINDS = ["continuous", "continuous-multioutput", "binary", "multiclass", "multilabel-indicator"]


def _targets(kind, scores):
    if kind == "continuous":
        return scores[:, 0]
    if kind == "continuous-multioutput":
        return scores
    if kind == "binary":
        return np.where(scores[:, 0] > 0, "yes", "no")
    if kind == "multiclass":
        return np.digitize(scores[:, 0], [-1.0, 1.0])
    return (scores > 0).astype(int)


def _satellite(kind, alpha):
    """A satellite whose ridge penalty is fixed, so that only the fit itself is compared."""
    satellite = make_satellite(kind)
    satellite.steps[-1][1].set_params(alphas=[alpha])
    return satellite


@pytest.mark.parametrize("kind", KINDS)
def test_satellite_weights_are_repeated_samples(kind):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(70, 5)) + 3.0
    y = _targets(kind, X[:, :2] - 3.0 + 0.5 * rng.normal(size=(70, 2)))
    weights = rng.integers(1, 4, size=len(X))
    rows = np.repeat(np.arange(len(X)), weights)
    weighted = fit_satellite(_satellite(kind, 3.0), X, y, sample_weight=weights)
    repeated = _satellite(kind, 3.0).fit(X[rows], y[rows])
    np.testing.assert_allclose(weighted[0].mean_, repeated[0].mean_, rtol=1e-12)
    np.testing.assert_allclose(satellite_decision(weighted, X), satellite_decision(repeated, X), rtol=1e-8, atol=1e-10)
    if not kind.startswith("continuous"):
        np.testing.assert_array_equal(weighted.predict(X), repeated.predict(X))
    plain = _satellite(kind, 3.0).fit(X, y)
    assert not np.allclose(satellite_decision(weighted, X), satellite_decision(plain, X))


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_finetune_weights_are_repeated_samples(loss):
    rng = np.random.default_rng(0)
    X = rng.random((30, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 3, size=30) if loss == "cross_entropy" else rng.normal(size=(30, 3))
    weights = rng.integers(0, 4, size=30)
    rows = np.repeat(np.arange(30), weights)
    # One full batch: one step on the weighted mean loss, whatever the order of the samples.
    options = dict(loss=loss, epochs=1, lr=0.5, batch_size=200, optimizer="sgd", random_state=0)
    weighted, repeated = _net(), _net()
    history = finetune(weighted, X, y, sample_weight=weights, **options)
    expected = finetune(repeated, X[rows], y[rows], **options)
    assert history["train_loss"].iloc[0] == pytest.approx(expected["train_loss"].iloc[0], rel=1e-5)
    for a, b in zip(weighted.parameters(), repeated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Weights are relative: scaling them changes nothing.
    scaled = _net()
    finetune(scaled, X, y, sample_weight=10 * weights, **options)
    for a, b in zip(scaled.parameters(), weighted.parameters()):
        torch.testing.assert_close(a, b)
    # One weighted sample cannot weigh both the training and the validation part.
    with pytest.raises(ValueError, match="positive weight"):
        finetune(_net(), X, y, sample_weight=np.eye(1, 30)[0], **{**options, "validation_fraction": 0.5})


def test_pruner_weights_the_selection_the_satellites_and_fine_tuning(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()).eval()
    rng = np.random.default_rng(0)
    X = rng.random((60, 1, 10, 10), dtype=np.float32)
    y = X[:, 0, :5].mean(axis=(1, 2)) - X[:, 0, 5:].mean(axis=(1, 2)) + 0.02 * rng.normal(size=60)
    weights = rng.integers(1, 4, size=60).astype(float)
    seen = []
    original = finetune

    def recording(model, X, y, **kwargs):
        seen.append(kwargs["sample_weight"])
        return original(model, X, y, **kwargs)

    monkeypatch.setattr("sklearn_craft.pruner.finetune", recording)
    pruner = CraftPruner(model, gamma=0.1, finetune_params={"epochs": 1}, random_state=0)
    pruner.fit(X, y, sample_weight=weights)
    np.testing.assert_array_equal(seen[0], weights)

    features = ActivationPooler(model).fit(X).transform(X)
    refit = clone(pruner.selector_).fit(features, y, sample_weight=weights)
    # Equal up to the summation order of the cross-products (the pruner passes a copy of the columns).
    pd.testing.assert_frame_equal(refit.curves_, pruner.selector_.curves_, check_exact=False, rtol=1e-12)
    unweighted = clone(pruner.selector_).fit(features, y)
    assert not np.allclose(unweighted.curves_["rmse"], pruner.selector_.curves_["rmse"])

    # The head's satellite is the weighted one on the pruned network's responses (before fine-tuning).
    plain = CraftPruner(model, gamma=0.1, random_state=0).fit(X, y, sample_weight=weights)
    head = plain.satellites_[plain.head_layer_]
    expected = fit_satellite(make_satellite("continuous"), plain.transform(X), y, weights)
    np.testing.assert_allclose(head[-1].coef_, expected[-1].coef_, rtol=1e-6)
    assert head[-1].alpha_ == expected[-1].alpha_


def test_pruner_rejects_bad_sample_weight_before_fitting():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    X = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    for weights, match in [(np.ones(19), "sample_weight.shape"), (-np.ones(20), "Negative values")]:
        pruner = CraftPruner(copy.deepcopy(model))
        with pytest.raises(ValueError, match=match):
            pruner.fit(X, X[:, 0, 0, 0].astype(float), sample_weight=weights)
        assert not [name for name in vars(pruner) if name.endswith("_")]
