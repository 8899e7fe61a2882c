import pickle
import sys

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone, is_classifier, is_regressor
from sklearn.exceptions import NotFittedError
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, check_cv, cross_validate
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

import sklearn_craft.finetune
import sklearn_craft.pooling
import sklearn_craft.pruner
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.profiling import count_flops, count_parameters
from sklearn_craft.pruner import CraftClassifier, CraftPruner, CraftRegressor
from sklearn_craft.finetune import _validation_split, fit_temperature
from sklearn_craft.rules import FilterRule
from sklearn_craft.satellites import fit_satellite, make_satellite, satellite_head
from sklearn_craft.surgery import coupled_groups, truncate

from conftest import (
    ARCHITECTURES,
    SAMPLE_WEIGHT_CHECKS,
    SUPERVISED_CHECKS,
    assert_expected_failures_are_current,
    conv_chain,
    image_estimator_expected_failures,
    run_image_estimator_check,
)


def _scores(model, X, layer, columns, seed=0):
    """Standardized linear combinations of a few pooled responses: targets the network can predict."""
    features = ActivationPooler(model, layers=[layer]).fit(X).transform(X).astype(np.float64)
    features = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-12)
    rng = np.random.default_rng(seed)
    scores = features[:, columns] @ rng.normal(size=(len(columns), 2))
    return scores + 0.1 * rng.normal(size=scores.shape)


def _targets(kind, scores):
    first = scores[:, 0]
    if kind == "continuous":
        return first
    if kind == "continuous-multioutput":
        return scores
    if kind == "binary":
        return np.where(first > np.median(first), "yes", "no")
    if kind == "multiclass":
        return np.digitize(first, np.quantile(first, [1 / 3, 2 / 3]))
    return (scores > np.median(scores, axis=0)).astype(int)


TARGET_KINDS = ["continuous", "continuous-multioutput", "binary", "multiclass", "multilabel-indicator"]


@pytest.fixture(scope="module")
def data():
    X = np.random.default_rng(0).random((160, 1, 16, 16), dtype=np.float32)
    return X, _scores(conv_chain(), X, "6", [1, 5, 9])


def _satellite_output(satellite, features):
    if hasattr(satellite, "decision_function"):
        return satellite.decision_function(features)
    return satellite.predict(features)


def _fitted_attributes(estimator):
    return [name for name in vars(estimator) if name.endswith("_") and not name.startswith("_")]


def _state(model):
    return (
        {name: value.clone() for name, value in model.state_dict().items()},
        [module.training for module in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def _same_state(a, b):
    return (
        a[0].keys() == b[0].keys()
        and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
        and a[1] == b[1]
        and a[2] == b[2]
    )


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_satellite_head_is_the_refitted_satellite(data, kind):
    X, scores = data
    y = _targets(kind, scores)
    pruner = CraftPruner(conv_chain(), gamma=0.05, random_state=0).fit(X, y)
    head = pruner.head_layer_
    features = pruner.transform(X)
    satellite = pruner.satellites_[head]

    assert head == "6" and pruner.target_type_ == kind
    assert features.shape == (len(X), len(pruner.keep_[head]))
    expected = _satellite_output(satellite, features)
    np.testing.assert_allclose(pruner.decision_function(X), expected, rtol=1e-4, atol=1e-4)
    if kind.startswith("continuous"):
        np.testing.assert_allclose(pruner.predict(X), satellite.predict(features), rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_array_equal(pruner.predict(X), satellite.predict(features))
    assert pruner.n_outputs_ == (1 if y.ndim == 1 and kind != "multiclass" else 3 if kind == "multiclass" else 2)
    assert not any(module.training for module in pruner.pruned_model_.modules())
    if kind in ("binary", "multiclass"):
        np.testing.assert_array_equal(pruner.classes_, np.unique(y))
    elif kind == "multilabel-indicator":
        np.testing.assert_array_equal(pruner.classes_, [0, 1])
    else:
        assert not hasattr(pruner, "classes_")
    assert pruner.score(X, y) == pytest.approx(satellite.score(features, y), abs=1e-6)


def test_keep_matches_the_network_selection_and_report(data):
    X, scores = data
    y = scores[:, 0]
    pruner = CraftPruner(conv_chain(), gamma=0.05, random_state=0).fit(X, y)
    body = pruner.pruned_model_
    assert pruner.layers_ == ["0", "4", "6"]
    for layer in pruner.layers_:
        # No coupling in a plain chain: kept = selected, and the network has exactly those filters.
        assert pruner.keep_[layer] == pruner.selected_[layer].tolist()
        assert body.get_submodule(layer).out_channels == len(pruner.keep_[layer])
        knee = pruner.knees_.set_index("group").loc[layer]
        assert knee["n_selected"] == len(pruner.selected_[layer])
        columns = pruner.satellites_[layer][0].n_features_in_
        assert columns == (len(pruner.keep_[layer]) if layer == "6" else len(pruner.selected_[layer]))
    assert set(pruner.curves_["group"]) == set(pruner.layers_)
    report = pruner.report_
    assert report.loc["parameters", "original"] == count_parameters(pruner.model)
    assert report.loc["parameters", "pruned"] == count_parameters(pruner.pruned_model_)
    assert report.loc["flops", "pruned"] == count_flops(pruner.pruned_model_, X.shape[1:])
    assert (report["reduction_pct"].loc[["parameters", "flops"]] > 0).all()
    assert set(pruner.timings_.index) == {"pooling", "selection", "satellites", "surgery", "report"}


class _FirstFilters(FilterRule):
    """Ranks the filters of every layer by their index: keeps the first ones."""

    def score_filters(self, conv, responses, Y, *, sample_weight=None, random_state=None):
        assert responses.shape == (len(Y), conv.out_channels)
        return -np.arange(conv.out_channels)


def test_a_custom_filter_rule_replaces_the_lasso_choice_everywhere(data):
    X, scores = data
    y = scores[:, 0]
    lasso = CraftPruner(conv_chain(), gamma=0.05, random_state=0).fit(X, y)
    first = CraftPruner(conv_chain(), gamma=0.05, random_state=0, filter_rule=_FirstFilters()).fit(X, y)
    body = first.pruned_model_
    assert any(not np.array_equal(lasso.selected_[layer], np.arange(len(lasso.selected_[layer]))) for layer in lasso.layers_)
    for layer in first.layers_:
        count = len(lasso.selected_[layer])
        np.testing.assert_array_equal(first.selected_[layer], np.arange(count))
        assert first.keep_[layer] == list(range(count))
        assert body.get_submodule(layer).out_channels == count
        if layer != first.head_layer_:
            assert first.satellites_[layer][0].n_features_in_ == count
    first_conv = conv_chain().get_submodule("0").weight[np.arange(len(first.keep_["0"]))]
    torch.testing.assert_close(body.get_submodule("0").weight, first_conv)
    # The counts are LASSO's at gamma: its curves are those of the default rule.
    pd.testing.assert_frame_equal(first.knees_, lasso.knees_)


def test_gamma_zero_keeps_every_filter_and_larger_gamma_keeps_fewer(data):
    X, scores = data
    y = scores[:, 0]
    kept = []
    for gamma in (0.0, 0.01, 0.1, 0.5):
        pruner = CraftPruner(conv_chain(), gamma=gamma, random_state=0).fit(X, y)
        kept.append([len(pruner.keep_[layer]) for layer in pruner.layers_])
    assert kept[0] == [8, 16, 12]
    totals = [sum(k) for k in kept]
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0]


def test_truncate_best_cuts_after_the_best_scoring_layer():
    X = np.random.default_rng(1).random((160, 1, 16, 16), dtype=np.float32)
    y = _scores(conv_chain(), X, "0", [2, 6])[:, 0]
    pruner = CraftPruner(conv_chain(), gamma=0.05, head_layer="best", random_state=0).fit(X, y)
    scores = pruner.satellite_scores_
    assert list(scores.index) == pruner.layers_
    assert pruner.head_layer_ == scores.idxmax()
    position = pruner.layers_.index(pruner.head_layer_)
    convs = [name for name, m in pruner.pruned_model_.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs == pruner.layers_[: position + 1]
    assert list(pruner.keep_) == convs
    features = pruner.transform(X)
    expected = pruner.satellites_[pruner.head_layer_].predict(features)
    np.testing.assert_allclose(pruner.decision_function(X), expected, rtol=1e-4, atol=1e-4)


def test_head_original_without_pruning_reproduces_the_model(data):
    X, scores = data
    model = conv_chain(n_outputs=2)
    pruner = CraftPruner(model, gamma=0.0, head="original", random_state=0).fit(X, scores)
    with torch.no_grad():
        expected = model(torch.as_tensor(X)).numpy()
    np.testing.assert_allclose(pruner.predict(X), expected, rtol=1e-5, atol=1e-6)
    assert pruner.head_layer_ == "6"
    np.testing.assert_allclose(
        pruner.transform(X), ActivationPooler(model, layers=["6"]).fit(X).transform(X), rtol=1e-5, atol=1e-6
    )


def test_head_original_keeps_the_classifier_with_pruned_inputs(data):
    X, scores = data
    y = _targets("multiclass", scores)
    pruner = CraftPruner(conv_chain(n_outputs=3), gamma=0.1, head="original", random_state=0).fit(X, y)
    linear = pruner.pruned_model_[-1]
    assert isinstance(linear, nn.Linear)
    assert (linear.in_features, linear.out_features) == (len(pruner.keep_["6"]), 3)
    with torch.no_grad():
        logits = pruner.pruned_model_(torch.as_tensor(X)).numpy()
    np.testing.assert_array_equal(pruner.predict(X), pruner.classes_[logits.argmax(axis=1)])
    with pytest.raises(ValueError, match="head='original' needs a model with 3 outputs .* got 2"):
        CraftPruner(conv_chain(n_outputs=2), head="original").fit(X, y)


@pytest.mark.parametrize(
    "kind, n_outputs, loss",
    [
        ("continuous", None, "mse"),
        ("continuous-multioutput", None, "mse"),
        ("binary", None, "bce"),
        ("binary", 2, "cross_entropy"),
        ("multiclass", None, "cross_entropy"),
        ("multilabel-indicator", None, "bce"),
    ],
)
def test_finetune_loss_follows_the_target(data, monkeypatch, kind, n_outputs, loss):
    X, scores = data
    y = _targets(kind, scores)
    calls = []

    def recording(model, X, target, **kwargs):
        calls.append((kwargs["loss"], np.asarray(target)))
        return sklearn_craft.finetune.finetune(model, X, target, **kwargs)

    monkeypatch.setattr(sklearn_craft.pruner, "finetune", recording)
    head = "satellite" if n_outputs is None else "original"
    model = conv_chain(n_outputs=n_outputs)
    pruner = CraftPruner(model, gamma=0.1, head=head, finetune_params={"epochs": 1}, random_state=0)
    pruner.fit(X[:64], y[:64])
    ((used, target),) = calls
    assert used == loss
    if loss == "cross_entropy":
        np.testing.assert_array_equal(pruner.classes_[target], y[:64])
    assert len(pruner.history_) == 1


def test_finetune_is_deterministic_and_changes_the_weights(data):
    X, scores = data
    y = _targets("binary", scores)
    params = {"epochs": 2, "lr": 1e-2, "batch_size": 32, "validation_fraction": 0.2}
    runs = [CraftPruner(conv_chain(), gamma=0.1, finetune_params=params, random_state=3).fit(X, y) for _ in range(2)]
    plain = CraftPruner(conv_chain(), gamma=0.1, random_state=3).fit(X, y)
    first, second = (dict(run.pruned_model_.state_dict()) for run in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert runs[0].keep_ == plain.keep_
    assert not torch.equal(first["head.weight"], plain.pruned_model_.state_dict()["head.weight"])
    assert list(runs[0].history_["epoch"]) == [0, 1, 2]  # 0: validation loss before training
    assert "finetune" in runs[0].timings_
    assert not any(module.training for module in runs[0].pruned_model_.modules())


def test_satellite_head_leaves_out_the_images_finetuning_validates_on(data):
    X, scores = data
    y = _targets("continuous", scores)
    finetune_params = {"epochs": 1, "lr": 1e-3, "batch_size": 32, "validation_fraction": 0.25}
    pruner = CraftPruner(conv_chain(), gamma=0.1, finetune_params=finetune_params, random_state=3).fit(X, y)
    plain = CraftPruner(conv_chain(), gamma=0.1, random_state=3).fit(X, y)
    head, features = pruner.head_layer_, plain.transform(X)  # the pruned network before fine-tuning
    seed = np.random.RandomState(3).randint(np.iinfo(np.int32).max, size=4)[2]  # the pruner's fine-tuning seed
    _, _, val_idx, train_idx = _validation_split(len(X), 0.25, seed)
    val, train = np.sort(val_idx.numpy()), np.sort(train_idx.numpy())
    assert len(val) == 40 and pruner.keep_ == plain.keep_

    expected = fit_satellite(make_satellite("continuous"), features[train], y[train])
    np.testing.assert_allclose(pruner.satellites_[head].predict(features), expected.predict(features), atol=1e-10)
    assert not np.allclose(plain.satellites_[head].predict(features), expected.predict(features))
    # So the untrained network's validation loss is the head's error on images it was not fitted on.
    held_out = np.mean((pruner.predict_before_finetune(X[val]) - y[val]) ** 2)
    assert pruner.history_.loc[0, "val_loss"] == pytest.approx(held_out, rel=1e-4)


def test_monitor_accuracy_keeps_the_most_accurate_network_on_the_validation_images(data):
    X, scores = data
    y = _targets("binary", scores)
    finetune_params = {
        "epochs": 4, "lr": 1e-3, "batch_size": 32, "validation_fraction": 0.25, "early_stopping": 4, "monitor": "accuracy"
    }
    pruner = CraftPruner(conv_chain(), gamma=0.1, finetune_params=finetune_params, random_state=0).fit(X, y)
    seed = np.random.RandomState(0).randint(np.iinfo(np.int32).max, size=4)[2]  # the pruner's fine-tuning seed
    val = _validation_split(len(X), 0.25, seed)[2].numpy()
    history = pruner.history_
    assert history["val_loss"].idxmin() != history["val_accuracy"].idxmax()  # the monitors disagree here
    assert history.loc[0, "val_accuracy"] == pytest.approx(np.mean(pruner.predict_before_finetune(X[val]) == y[val]))
    assert np.mean(pruner.predict(X[val]) == y[val]) == pytest.approx(history["val_accuracy"].max())
    assert history.index[history["kept"]].tolist() == [history["val_accuracy"].idxmax()]


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel-indicator"])
@pytest.mark.parametrize("streaming", [False, True])
def test_calibrated_head_is_the_satellite_at_its_fitted_temperature(data, kind, streaming):
    X, scores = data
    y = _targets(kind, scores)
    weights = np.random.default_rng(2).uniform(0.5, 2.0, size=len(X))
    params = dict(gamma=0.05, random_state=0, streaming=streaming, batch_size=48)
    plain = CraftPruner(conv_chain(), **params).fit(X, y, sample_weight=weights)
    calibrated = CraftPruner(conv_chain(), calibrate_head=True, **params).fit(X, y, sample_weight=weights)
    temperature = calibrated.head_temperature_
    assert plain.head_temperature_ == 1.0 and temperature != pytest.approx(1.0, abs=0.05)

    # The same network and satellite, every output divided by the temperature: no prediction changes.
    assert calibrated.keep_ == plain.keep_
    np.testing.assert_allclose(calibrated.decision_function(X) * temperature, plain.decision_function(X), atol=1e-4)
    np.testing.assert_array_equal(calibrated.predict(X), plain.predict(X))
    # The temperature is the one that fits the satellite's scores on its images (all of them here).
    logits = _satellite_output(calibrated.satellites_[calibrated.head_layer_], calibrated.transform(X))
    Y = {"binary": (y == "yes").astype(float), "multiclass": y, "multilabel-indicator": y}[kind]
    loss = "cross_entropy" if kind == "multiclass" else "bce"
    assert temperature == pytest.approx(fit_temperature(logits, Y, loss=loss, sample_weight=weights), rel=1e-4)


def test_calibrated_head_fits_its_temperature_on_the_images_the_head_was_fitted_on(data):
    X, scores = data
    y = _targets("multiclass", scores)
    finetune_params = {"epochs": 1, "batch_size": 32, "validation_fraction": 0.25, "early_stopping": 1}
    pruner = CraftPruner(conv_chain(), gamma=0.1, calibrate_head=True, finetune_params=finetune_params, random_state=3)
    pruner.fit(X, y)
    seed = np.random.RandomState(3).randint(np.iinfo(np.int32).max, size=4)[2]  # the pruner's fine-tuning seed
    val, train = (np.sort(part.numpy()) for part in _validation_split(len(X), 0.25, seed)[2:])
    features = ActivationPooler(pruner.pruned_model_before_finetune_, layers=[pruner.head_layer_]).fit(X).transform(X)
    logits = _satellite_output(pruner.satellites_[pruner.head_layer_], features)
    assert pruner.head_temperature_ == pytest.approx(fit_temperature(logits[train], y[train], loss="cross_entropy"), rel=1e-4)
    # Fine-tuning's untrained validation loss is that of the calibrated head on the held-out images.
    held_out = nn.functional.cross_entropy(torch.as_tensor(logits[val]) / pruner.head_temperature_, torch.as_tensor(y[val]))
    assert pruner.history_.loc[0, "val_loss"] == pytest.approx(held_out.item(), rel=1e-4)


def test_satellite_head_temperature_must_be_positive(data):
    X, scores = data
    satellite = make_satellite("continuous").fit(scores, scores[:, 0])
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        satellite_head(satellite, 0)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_dataloader_or_dataset_workers_give_the_fit_of_an_array(data, streaming):
    X, scores = data
    y = _targets("binary", scores)
    model = conv_chain()
    model[5] = nn.BatchNorm2d(16).eval()  # re-estimated after the cut: a pass over a DataLoader too
    params = dict(
        gamma=0.1, random_state=0, finetune_params={"epochs": 1, "validation_fraction": 0.2}, streaming=streaming
    )
    expected = CraftPruner(model, **params).fit(X, y)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.arange(len(X)))
    inputs = {
        "DataLoader": (torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=1), 0),
        "Dataset with workers": (dataset, 1),
    }
    for name, (X_in, num_workers) in inputs.items():
        pruner = CraftPruner(model, num_workers=num_workers, **params).fit(X_in, y)
        assert pruner.keep_ == expected.keep_, name
        assert _same_state(_state(pruner.pruned_model_), _state(expected.pruned_model_)), name
        np.testing.assert_array_equal(pruner.decision_function(X_in), expected.decision_function(X), err_msg=name)


@pytest.mark.parametrize("head", ["satellite", "original"])
def test_user_model_is_unchanged(data, head):
    X, scores = data
    model = conv_chain(n_outputs=1).train()
    model[0].requires_grad_(False)
    before = _state(model)
    pruner = CraftPruner(model, gamma=0.1, head=head, finetune_params={"epochs": 1}, random_state=0).fit(X, scores[:, 0])
    assert _same_state(before, _state(model))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert pruner.model is model
    assert pruner.pruned_model_ is not model


def _batchnorm_inputs(model, X):
    """Per channel mean over ``X`` of what every BatchNorm layer of ``model`` receives."""
    seen = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0].mean((0, 2, 3))))
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(torch.as_tensor(X))
    for hook in hooks:
        hook.remove()
    return {name: values[0] for name, values in seen.items()}


def test_batchnorm_statistics_are_re_estimated_after_pruning(data):
    X, scores = data
    model = conv_chain()
    # A BatchNorm after the second convolution sees different inputs once the first is pruned.
    model[5] = nn.BatchNorm2d(16).eval()
    model[5].running_mean.fill_(7.0)
    y = scores[:, 0]
    pruned = CraftPruner(model, gamma=0.1, random_state=0, batch_size=len(X)).fit(X, y)
    stale = CraftPruner(model, gamma=0.1, random_state=0, recalibrate_bn=False).fit(X, y)
    assert len(pruned.keep_["0"]) < 8 and pruned.keep_ == stale.keep_
    body = pruned.pruned_model_
    for name, mean in _batchnorm_inputs(body, X).items():
        torch.testing.assert_close(body.get_submodule(name).running_mean, mean, rtol=1e-4, atol=1e-5)
    kept = stale.keep_["4"]
    torch.testing.assert_close(stale.pruned_model_.get_submodule("5").running_mean, model[5].running_mean[kept])
    # The head is fitted after the re-estimation: it still equals the refitted satellite.
    np.testing.assert_allclose(
        pruned.decision_function(X),
        pruned.satellites_[pruned.head_layer_].predict(pruned.transform(X)),
        rtol=1e-4,
        atol=1e-4,
    )
    # Nothing cut, nothing re-estimated: the statistics stay the original ones.
    full = CraftPruner(model, gamma=0.0, random_state=0).fit(X, y)
    torch.testing.assert_close(full.pruned_model_.get_submodule("5").running_mean, model[5].running_mean)
    assert model[5].running_mean.eq(7.0).all()


def test_scale_filters_multiplies_the_kept_filters_by_their_lasso_coefficient(data):
    X, scores = data
    model = conv_chain()
    model[1] = nn.Identity()  # no BatchNorm: the scale lands on the convolution itself
    y = scores[:, 0]
    plain = CraftPruner(model, gamma=0.1, random_state=0).fit(X, y)
    scaled = CraftPruner(model, gamma=0.1, scale_filters=True, random_state=0).fit(X, y)
    kept = scaled.keep_["0"]
    assert kept == plain.keep_["0"]
    coef = scaled.selector_.coef_[kept]
    assert np.all(coef != 0)
    conv = scaled.pruned_model_.get_submodule("0")
    factors = torch.as_tensor(coef, dtype=torch.float32)
    torch.testing.assert_close(conv.weight, model[0].weight[kept] * factors[:, None, None, None])
    torch.testing.assert_close(conv.bias, model[0].bias[kept] * factors)
    torch.testing.assert_close(plain.pruned_model_.get_submodule("0").weight, model[0].weight[kept])


def _count_full_poolings(monkeypatch, model):
    """Record every forward pass over a data set of the full-size ``model`` (not its pruned copies)."""
    calls = []
    original = sklearn_craft.pooling._pool_features
    n_parameters = count_parameters(model)

    def counting(model, responses, dataset, **options):
        if count_parameters(model) == n_parameters:
            calls.append(len(dataset))
        return original(model, responses, dataset, **options)

    monkeypatch.setattr(sklearn_craft.pooling, "_pool_features", counting)
    return calls


@pytest.mark.parametrize("use_memory", [False, True])
def test_grid_search_over_gamma_pools_each_training_set_once_with_memory(data, monkeypatch, tmp_path, use_memory):
    X, scores = data
    X, y = X[:120], scores[:120, 0]
    model = conv_chain()
    calls = _count_full_poolings(monkeypatch, model)
    memory = str(tmp_path) if use_memory else None
    search = GridSearchCV(
        CraftPruner(model, finetune_params=None, random_state=0, memory=memory), {"gamma": [0.001, 0.01, 0.1]}, cv=2
    ).fit(X, y)
    # Two folds of 60 training images and the refit on all 120; without memory, once per candidate.
    assert sorted(calls) == ([60, 60, 120] if use_memory else [60] * 6 + [120])
    assert search.best_params_["gamma"] in (0.001, 0.01, 0.1)
    assert search.best_estimator_.model is not model
    assert _same_state(_state(model), _state(search.best_estimator_.model))
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()


def test_clone_gives_an_independent_estimator(data):
    X, scores = data
    pruner = CraftPruner(conv_chain(), gamma=0.1, random_state=0)
    twin = clone(pruner)
    assert twin.model is not pruner.model and twin.get_params()["gamma"] == 0.1
    twin.fit(X, scores[:, 0])
    assert not _fitted_attributes(pruner)


class _Branchy(nn.Module):
    """Data-dependent control flow: runs, but torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        if x.mean() > 10:
            x = x * 2
        return torch.relu(self.conv2(x))


@pytest.mark.parametrize(
    "params, error, match",
    [
        ({"gamma": 1.5}, ValueError, "gamma"),
        ({"gamma": -0.1}, ValueError, "gamma"),
        ({"head": "linear"}, ValueError, "head"),
        ({"head_layer": "features.99"}, ValueError, "head_layer must be"),
        ({"head_layer": "best", "head": "original"}, ValueError, "head_layer='best' needs head='satellite'"),
        ({"finetune_params": {"epoch": 2}}, ValueError, "unknown keys \\['epoch'\\]"),
        ({"finetune_params": {"epochs": 0}}, ValueError, "epochs"),
        ({"finetune_params": [("epochs", 2)]}, TypeError, "finetune_params"),
        (
            {"finetune_params": {"validation_fraction": 0.2, "early_stopping": 2, "monitor": "accuracy"}},
            ValueError,
            "monitor'\\]='accuracy' needs a classification target, got a continuous y",
        ),
        ({"selector_params": {"gamma": 0.1}}, ValueError, "selector_params must not set \\['gamma'\\]"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"gamma": 0.0, "scale_filters": True}, ValueError, "scale_filters=True needs gamma > 0"),
        ({"calibrate_head": True}, ValueError, "calibrate_head=True needs a classification target, got a continuous y"),
        ({"calibrate_head": True, "head": "original"}, ValueError, "calibrate_head=True needs head='satellite'"),
        ({"calibrate_head": 1}, ValueError, "calibrate_head"),
    ],
)
def test_bad_parameters_leave_nothing_fitted(data, params, error, match):
    X, scores = data
    pruner = CraftPruner(conv_chain(), **params)
    with pytest.raises(error, match=match):
        pruner.fit(X, scores[:, 0])
    assert not _fitted_attributes(pruner)


def test_bad_input_leaves_nothing_fitted(data):
    X, scores = data
    y = scores[:, 0].copy()
    y[3] = np.nan
    cases = [
        ((X, y), "y must be finite"),
        ((X, None), "requires y to be passed"),
        ((X, scores[:10, 0]), "one row per image \\(160\\), got 10"),
        ((np.repeat(X, 3, axis=1), scores[:, 0]), "3 channels, the model expects n_channels=1"),
        ((X[:, 0], scores[:, 0]), "4-D array"),
        ((X, np.zeros(len(X))), "constant target"),
        ((X[:0], scores[:0, 0]), "empty"),
        ((np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), scores[:, 0]), "NaN or infinity"),
    ]
    for (images, target), match in cases:
        pruner = CraftPruner(conv_chain())
        with pytest.raises(ValueError, match=match):
            pruner.fit(images, target)
        assert not _fitted_attributes(pruner)
    untraceable = CraftPruner(_Branchy())
    with pytest.raises(ValueError, match="torch.fx"):
        untraceable.fit(X, scores[:, 0])
    assert not _fitted_attributes(untraceable)


def test_failed_refit_keeps_the_previous_fit(data):
    X, scores = data
    pruner = CraftPruner(conv_chain(), gamma=0.1, random_state=0).fit(X, scores[:, 0])
    fitted = {name: getattr(pruner, name) for name in _fitted_attributes(pruner)}
    with pytest.raises(ValueError, match="one row per image"):
        pruner.fit(X, scores[:5, 0])
    assert {name: getattr(pruner, name) for name in _fitted_attributes(pruner)}.keys() == fitted.keys()
    assert all(getattr(pruner, name) is value for name, value in fitted.items())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architectures(name):
    architecture = ARCHITECTURES[name]
    model = architecture.build()
    X = np.random.default_rng(0).random((96, *architecture.input_shape), dtype=np.float32)
    example = torch.zeros(1, *architecture.input_shape)
    layers = ActivationPooler(model).fit(X[:1]).layers_
    y = _scores(model, X, layers[len(layers) // 2], [0, 1, 2])[:, 0]
    before = _state(model)
    pruner = CraftPruner(model, gamma=0.1, random_state=0, selector_params={"alphas": 30}).fit(X, y)

    assert _same_state(before, _state(model))
    head = pruner.head_layer_
    features = pruner.transform(X)
    np.testing.assert_allclose(
        pruner.decision_function(X), pruner.satellites_[head].predict(features), rtol=1e-3, atol=1e-4
    )
    assert pruner.report_.loc["flops", "reduction_pct"] > 0
    modules = dict(model.named_modules())
    body = pruner.pruned_model_
    for layer, kept in pruner.keep_.items():
        width = body.get_submodule(layer).out_channels
        # A Max-Feature-Map keeps both halves of each kept pair (LightCNN).
        assert len(kept) <= width <= min(2 * len(kept), modules[layer].out_channels)
    # Coupled layers (residual streams, depthwise convolutions) keep the same filters.
    for group in coupled_groups(truncate(model, head, example), example):
        assert len({tuple(pruner.keep_[layer]) for layer in group}) == 1


def test_head_original_on_resnet18_keeps_fc_with_pruned_inputs():
    architecture = ARCHITECTURES["resnet18"]
    model = architecture.build(num_classes=1)
    X = np.random.default_rng(0).random((96, *architecture.input_shape), dtype=np.float32)
    y = _scores(model, X, "layer3.0.conv1", [0, 1, 2])[:, 0]
    pruner = CraftPruner(model, gamma=0.1, head="original", random_state=0, selector_params={"alphas": 30})
    pruner.fit(X, y)
    fc = pruner.pruned_model_.fc
    assert (fc.in_features, fc.out_features) == (len(pruner.keep_["layer4.1.conv2"]), 1)
    assert fc.in_features < model.fc.in_features
    with torch.no_grad():
        outputs = pruner.pruned_model_(torch.as_tensor(X))[:, 0].numpy()
    np.testing.assert_array_equal(pruner.predict(X), outputs)


def test_estimator_contract_with_images(data, tmp_path):
    X, scores = data
    y = scores[:, 0]
    pruner = CraftPruner(conv_chain(), gamma=0.1, finetune_params={"epochs": 1}, random_state=0)
    params = {name: value for name, value in pruner.get_params().items() if name != "model"}
    model_state = _state(pruner.model)
    with pytest.raises(NotFittedError):
        pruner.predict(X)
    assert pruner.fit(X, y) is pruner
    assert {name: value for name, value in pruner.get_params().items() if name != "model"} == params
    assert _same_state(model_state, _state(pruner.model))
    public = [name for name in vars(pruner) if not name.startswith("_")]
    assert all(name.endswith("_") or name in params or name == "model" for name in public)
    predictions, features = pruner.predict(X), pruner.transform(X)
    assert features.dtype == np.float32

    attributes = dict(vars(pruner))
    pruner.score(X, y)
    assert vars(pruner).keys() == attributes.keys() and all(vars(pruner)[k] is v for k, v in attributes.items())
    np.testing.assert_array_equal(pruner.fit(X, y).predict(X), predictions)
    np.testing.assert_array_equal(clone(pruner).fit_transform(X, y), features)
    order = np.random.default_rng(0).permutation(len(X))
    np.testing.assert_allclose(pruner.predict(X[order]), predictions[order], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pruner.predict(X[10:20]), predictions[10:20], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pruner.predict(X.astype(np.float64)), predictions, rtol=1e-5, atol=1e-6)

    joblib.dump(X, tmp_path / "images.joblib")
    readonly = joblib.load(tmp_path / "images.joblib", mmap_mode="r")
    for images in (readonly, np.asfortranarray(X)):
        np.testing.assert_array_equal(clone(pruner).fit(images, y).predict(images), predictions)


def test_fitted_pruner_pickles(data):
    X, scores = data
    pruner = CraftPruner(conv_chain(), gamma=0.1, random_state=0).fit(X, scores[:, 0])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(pruner)).predict(X), pruner.predict(X))


_CONTRACT = "test_estimator_contract_with_images"
#: Where this module tests, with images, what scikit-learn's checks test with 2-D tabular X.
_COVERED_WITH_IMAGES = {
    "check_fit_score_takes_y": "test_satellite_head_is_the_refitted_satellite",
    "check_positive_only_tag_during_fit": "test_preprocess_is_applied_before_every_forward_pass",
    "check_estimators_pickle": "test_fitted_pruner_pickles",
    **dict.fromkeys(
        [
            "check_estimators_empty_data_messages",
            "check_estimators_nan_inf",
            "check_fit2d_1sample",
            "check_fit2d_1feature",
            "check_fit2d_predict1d",
        ],
        "test_bad_input_leaves_nothing_fitted",
    ),
    **dict.fromkeys(
        [
            "check_estimators_overwrite_params",
            "check_dont_overwrite_parameters",
            "check_estimators_fit_returns_self",
            "check_readonly_memmap_input",
            "check_estimators_dtypes",
            "check_pipeline_consistency",
            "check_f_contiguous_array_estimator",
            "check_transformer_general",
            "check_transformer_preserve_dtypes",
            "check_methods_sample_order_invariance",
            "check_methods_subset_invariance",
            "check_dict_unchanged",
            "check_fit_idempotent",
            "check_fit_check_is_fitted",
        ],
        _CONTRACT,
    ),
    **dict.fromkeys(
        SAMPLE_WEIGHT_CHECKS,
        "test_sample_weight.py::test_pruner_weights_the_selection_the_satellites_and_fine_tuning",
    ),
}
#: CraftClassifier's and CraftRegressor's own checks, also fed 2-D tabular X.
_COVERED_AS_CLASSIFIER_OR_REGRESSOR = {
    **_COVERED_WITH_IMAGES,
    **dict.fromkeys(
        SUPERVISED_CHECKS,
        "test_classifier_and_regressor_refuse_the_other_kind_of_target",
    ),
}
EXPECTED_FAILED_CHECKS = image_estimator_expected_failures(_COVERED_WITH_IMAGES)
_CHECKED = CraftPruner(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
#: Each supervised form with the expected failures of the checks scikit-learn runs on it.
_CHECKED_SUPERVISED = {
    estimator: image_estimator_expected_failures(
        {check: test for check, test in _COVERED_AS_CLASSIFIER_OR_REGRESSOR.items() if not check.startswith(other)}
    )
    for estimator, other in [
        (CraftClassifier(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), "check_regressor"),
        (CraftRegressor(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), "check_classifier"),
    ]
}


@parametrize_with_checks([_CHECKED])
def test_sklearn_contract(estimator, check):
    run_image_estimator_check(estimator, check, EXPECTED_FAILED_CHECKS)


@parametrize_with_checks(list(_CHECKED_SUPERVISED))
def test_classifier_and_regressor_sklearn_contract(estimator, check):
    run_image_estimator_check(estimator, check, _CHECKED_SUPERVISED[estimator])


def test_every_expected_failure_names_a_check_that_runs():
    assert_expected_failures_are_current(_CHECKED, EXPECTED_FAILED_CHECKS, sys.modules[__name__])
    for estimator, expected in _CHECKED_SUPERVISED.items():
        assert_expected_failures_are_current(estimator, expected, sys.modules[__name__])


def test_preprocess_is_applied_before_every_forward_pass(data):
    X, scores = data
    y = scores[:, 0]
    shift = lambda batch: 2.0 * batch - 0.5  # noqa: E731
    finetune = {"epochs": 1, "lr": 1e-3}
    with_preprocess = CraftPruner(conv_chain(), gamma=0.05, finetune_params=finetune, preprocess=shift, random_state=0)
    with_preprocess.fit(X, y)
    on_shifted = CraftPruner(conv_chain(), gamma=0.05, finetune_params=finetune, random_state=0).fit(2.0 * X - 0.5, y)

    assert with_preprocess.keep_.keys() == on_shifted.keep_.keys()
    assert all(np.array_equal(with_preprocess.keep_[k], on_shifted.keep_[k]) for k in on_shifted.keep_)
    np.testing.assert_allclose(with_preprocess.predict(X), on_shifted.predict(2.0 * X - 0.5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(with_preprocess.transform(X), on_shifted.transform(2.0 * X - 0.5), rtol=1e-4, atol=1e-5)


def test_head_weights_stay_small_for_nearly_constant_filters(data):
    # A filter whose response barely varies must not take a huge head weight: folded into the
    # head, it would turn the smallest change of that filter during fine-tuning into a huge output.
    X, scores = data
    pruner = CraftPruner(conv_chain(), gamma=0.0, random_state=0).fit(X, scores[:, 0])
    stds = pruner.transform(X).std(axis=0)
    assert stds[stds > 0].min() < 1e-5
    assert pruner.pruned_model_.head.weight.abs().max().item() < 100.0


@pytest.mark.parametrize("name", ["mobilenet_v1", "resnet18"])
def test_pruned_model_keeps_the_original_layer_names(name):
    torch.manual_seed(0)
    architecture = ARCHITECTURES[name]
    model, channels = architecture.build(), architecture.input_shape[0]
    X = np.random.default_rng(0).random((64, channels, 32, 32), dtype=np.float32)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][:6]
    y = _scores(model, X, layers[-1], [0, 1, 2])[:, 0]
    pruner = CraftPruner(model, gamma=0.1, layers=layers, random_state=0, selector_params={"alphas": 20}).fit(X, y)
    modules = dict(pruner.pruned_model_.named_modules())
    assert {"pool", "flatten", "head"} <= set(modules)
    for layer, kept in pruner.keep_.items():
        assert modules[layer].out_channels == len(kept)
        features = ActivationPooler(pruner.pruned_model_, layers=[layer]).fit(X).transform(X)
        assert features.shape == (len(X), len(kept))
    head = pruner.head_layer_
    np.testing.assert_array_equal(
        ActivationPooler(pruner.pruned_model_, layers=[head]).fit(X).transform(X), pruner.transform(X)
    )


def test_classifier_and_regressor_identities_and_stratified_splits(data):
    X, scores = data
    X, labels = X[:60], _targets("multiclass", scores)[:60]
    classifier = CraftClassifier(conv_chain(), gamma=0.1, random_state=0, selector_params={"alphas": 10})
    regressor = CraftRegressor(conv_chain())
    assert is_classifier(classifier) and not is_regressor(classifier)
    assert is_regressor(regressor) and not is_classifier(regressor)
    assert not is_classifier(CraftPruner(conv_chain())) and not is_regressor(CraftPruner(conv_chain()))
    assert isinstance(check_cv(3, labels, classifier=is_classifier(classifier)), StratifiedKFold)
    results = cross_validate(classifier, X, labels, cv=3, return_indices=True, return_estimator=True)
    stratified = [test for _, test in StratifiedKFold(3).split(X, labels)]
    for test, expected in zip(results["indices"]["test"], stratified):
        np.testing.assert_array_equal(test, expected)
    for estimator, test, score in zip(results["estimator"], stratified, results["test_score"]):
        assert score == accuracy_score(labels[test], estimator.predict(X[test]))


def test_classifier_and_regressor_refuse_the_other_kind_of_target(data):
    X, scores = data
    cases = [
        (CraftClassifier(conv_chain()), scores[:, 0], "CraftClassifier needs class labels .* got a continuous target"),
        (CraftClassifier(conv_chain()), scores, "got a continuous-multioutput target"),
        (CraftRegressor(conv_chain()), _targets("binary", scores), "CraftRegressor needs numeric targets"),
    ]
    for estimator, y, match in cases:
        with pytest.raises(ValueError, match=match):
            estimator.fit(X, y)
        assert not _fitted_attributes(estimator)
    # Integer targets are values for a regressor, classes for a classifier and for CraftPruner.
    ages = np.rint(10 * scores[:, 0]).astype(int)
    regressor = CraftRegressor(conv_chain(), gamma=0.1, random_state=0).fit(X, ages)
    assert regressor.target_type_ == "continuous" and not hasattr(regressor, "classes_")
    assert regressor.score(X, ages) == pytest.approx(r2_score(ages, regressor.predict(X)))
    classes = _targets("multiclass", scores)
    classifier = CraftClassifier(conv_chain(), gamma=0.1, random_state=0).fit(X, classes)
    pruner = CraftPruner(conv_chain(), gamma=0.1, random_state=0).fit(X, classes)
    assert classifier.target_type_ == pruner.target_type_ == "multiclass"
    np.testing.assert_array_equal(classifier.predict(X), pruner.predict(X))


def test_transform_feature_names_and_pandas_output(data):
    X, scores = data
    y = scores[:, 0]
    pruner = CraftPruner(conv_chain(), gamma=0.1, random_state=0).fit(X, y)
    names = pruner.get_feature_names_out()
    assert names.tolist() == [f"6:{channel}" for channel in pruner.keep_["6"]]
    assert len(names) < 12
    frame = clone(pruner).set_output(transform="pandas").fit(X, y).transform(X)
    assert isinstance(frame, pd.DataFrame) and frame.columns.tolist() == names.tolist()
    np.testing.assert_array_equal(frame.to_numpy(), pruner.transform(X))
    # Nothing pruned: the same columns, names and values as ActivationPooler's on the original network.
    full = CraftPruner(conv_chain(), gamma=0.0, random_state=0).set_output(transform="pandas")
    pooler = ActivationPooler(conv_chain(), layers=["6"]).set_output(transform="pandas")
    pd.testing.assert_frame_equal(full.fit_transform(X, y), pooler.fit_transform(X), rtol=1e-5)


@pytest.mark.parametrize("progress", [True, False])
def test_progress_reaches_the_selection(data, capsys, progress):
    X, scores = data
    CraftPruner(conv_chain(), gamma=0.05, random_state=0, progress=progress).fit(X, scores[:, 0])
    err = capsys.readouterr().err
    assert ("LASSO paths" in err and "3/3" in err) if progress else "LASSO paths" not in err


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_streaming_fit_selects_on_the_streamed_split_and_heads_with_its_satellite(data, kind):
    # streaming=True never holds the pooled responses of all images: its selection is the one
    # fit makes on them with the split partial_fit drew, and its head is still the satellite
    # (fitted from the pruned network's cross-products) of what transform returns.
    X, scores = data
    y = _targets(kind, scores)
    weights = np.random.default_rng(3).uniform(0.5, 2.0, size=len(X))
    pruner = CraftPruner(conv_chain(), gamma=0.05, random_state=0, batch_size=48, streaming=True)
    pruner.fit(X, y, sample_weight=weights)
    stream = pruner.selector_._stream_
    held_out = sklearn_craft.selection._streamed_held_out(np.arange(len(X)), stream["seed"], 0.25, None)[:, 0]
    features = ActivationPooler(conv_chain()).fit(X).transform(X)
    in_memory = sklearn_craft.selection.LassoFilterSelector(
        gamma=0.05, groups=pruner.selector_.groups_, cv=[(np.flatnonzero(~held_out), np.flatnonzero(held_out))]
    ).fit(features, y, sample_weight=weights)
    np.testing.assert_array_equal(pruner.selector_.support_, in_memory.support_)
    assert pruner.selector_.n_samples_seen_ == len(X)

    head = pruner.head_layer_
    satellite = pruner.satellites_[head]
    expected = _satellite_output(satellite, pruner.transform(X))
    np.testing.assert_allclose(pruner.decision_function(X), expected, rtol=1e-4, atol=1e-4)
    assert set(pruner.satellite_scores_.index) == set(pruner.layers_)
    assert np.isfinite(pruner.satellite_scores_).all() and (pruner.satellite_scores_ <= 1).all()


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_satellites_from_cross_products_are_the_in_memory_ridge_at_their_penalty(kind):
    from sklearn_craft._lasso_path import _cross_sums
    from sklearn_craft.satellites import _satellite_from_sums, fit_satellite, make_satellite
    from sklearn_craft.targets import encode_target

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 6)) + 3.0
    y = _targets(kind, X[:, [0, 2]] - 3.0 + 0.5 * rng.normal(size=(400, 2)))
    Y, _, classes = encode_target(y)
    weights = rng.uniform(0.5, 2.0, size=len(X))
    sums = _cross_sums(X, Y, (rng.random(len(X)) < 0.25)[:, None], weights)
    columns = [0, 2, 3]
    satellite, score = _satellite_from_sums(kind, sums, columns, classes)
    reference = make_satellite(kind)
    reference[-1].set_params(alphas=[satellite[-1].alpha_])
    fit_satellite(reference, X[:, columns], y, weights)
    decision, expected = _satellite_output(satellite, X[:, columns]), _satellite_output(reference, X[:, columns])
    if kind in ("binary", "multilabel-indicator"):
        # The in-memory threshold is chosen on the training scores; the streamed one is 0.5.
        decision, expected = decision - satellite[-1].intercept_, expected - reference[-1].intercept_
    np.testing.assert_allclose(decision, expected, rtol=1e-9, atol=1e-9)
    assert 0 < score <= 1
