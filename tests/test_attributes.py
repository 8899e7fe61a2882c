import pickle
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from sklearn_craft.attributes import MultiAttributeClassifier, attribute_report
from sklearn_craft.datasets import load_celeba
from sklearn_craft.models import mobilenet_v1

from conftest import (
    SAMPLE_WEIGHT_CHECKS,
    SUPERVISED_CHECKS,
    TABULAR_CHECKS,
    assert_expected_failures_are_current,
    image_estimator_expected_failures,
    run_image_estimator_check,
)


def _embedder(n_outputs=16, seed=0):
    """A tiny "student": conv trunk, pooled, then a Linear layer producing an embedding."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, n_outputs)
    )


def _planted(n=240, seed=0):
    """Images whose attribute k (k < 3) is a brighter channel k, and attribute 3 a checkerboard texture."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=(n, 4))
    X = 0.5 * rng.random((n, 3, 8, 8), dtype=np.float32)
    X += 0.4 * y[:, :3, None, None].astype(np.float32)
    checkerboard = np.indices((8, 8)).sum(axis=0) % 2
    X += 0.5 * (y[:, 3, None, None, None] * checkerboard).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def planted():
    return _planted()


def _fit(model=None, X=None, y=None, sample_weight=None, **params):
    settings = dict(head="replace", epochs=15, lr=1e-2, batch_size=32, random_state=0)
    if X is None:
        X, y = _planted()
    model = _embedder() if model is None else model
    return MultiAttributeClassifier(model, **{**settings, **params}).fit(X, y, sample_weight=sample_weight)


# attribute_report -------------------------------------------------------------------------------


def test_report_counts_right_predictions_per_attribute():
    y_true = pd.DataFrame({"Male": [1, 1, 0, 0, 0], "Smiling": [0, 1, 1, 1, 0], "Bald": [0, 0, 0, 0, 0]})
    y_pred = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0]])
    report = attribute_report(y_true, y_pred)
    assert report.index.name == "attribute" and report.index.tolist() == ["Male", "Smiling", "Bald", "mean"]
    assert report.columns.tolist() == ["accuracy", "majority_accuracy", "positive_rate"]
    np.testing.assert_allclose(report["accuracy"], [3 / 5, 4 / 5, 4 / 5, 11 / 15])
    np.testing.assert_allclose(report["majority_accuracy"], [3 / 5, 3 / 5, 1.0, 11 / 15])
    np.testing.assert_allclose(report["positive_rate"], [2 / 5, 3 / 5, 0.0, 1 / 3])
    # The mean row is the hamming accuracy: the share of right (image, attribute) pairs.
    assert report.loc["mean", "accuracy"] == pytest.approx((y_true.to_numpy() == y_pred).mean())


def test_report_takes_names_from_either_frame_or_the_argument():
    y = np.array([[True, False], [False, False]])
    assert attribute_report(y, y).index.tolist() == [0, 1, "mean"]
    frame = pd.DataFrame(y, columns=["a", "b"])
    assert attribute_report(y, frame).index.tolist() == ["a", "b", "mean"]
    assert attribute_report(frame, y, attributes=["x", "y"]).index.tolist() == ["x", "y", "mean"]
    assert attribute_report(y, y)["accuracy"].eq(1).all()


@pytest.mark.parametrize(
    "y_true, y_pred, kwargs, match",
    [
        ([1, 0, 1], [1, 0, 1], {}, "y_true must be a 2-D 0/1 matrix"),
        ([[1, -1]], [[1, 0]], {}, r"y_true must hold 0/1 \(or bool\) values, got \[-1\].*y > 0"),
        ([[1, 0]], [[0.5, 0]], {}, r"y_pred must hold 0/1 \(or bool\) values, got \[0.5\]"),
        ([["a", "b"]], [[1, 0]], {}, "y_true must hold 0/1 .* dtype"),
        ([[1, 0]], [[1, 0, 1]], {}, r"same shape, got \(1, 2\) and \(1, 3\)"),
        ([[1, 0]], [[1, 0]], {"attributes": ["a"]}, "attributes must be a sequence of 2 names"),
        ([[1, 0]], [[1, 0]], {"attributes": ["a", "mean"]}, "must not contain 'mean'"),
        (np.zeros((0, 2)), np.zeros((0, 2)), {}, "y_true is empty"),
    ],
)
def test_report_rejects_bad_input(y_true, y_pred, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attribute_report(y_true, y_pred, **kwargs)


def test_report_rejects_frames_with_different_columns():
    y = np.zeros((2, 2), dtype=int)
    with pytest.raises(ValueError, match="same columns in the same order"):
        attribute_report(pd.DataFrame(y, columns=["a", "b"]), pd.DataFrame(y, columns=["b", "a"]))


# MultiAttributeClassifier -----------------------------------------------------------------------


def test_learns_a_planted_multi_label_task(planted):
    X, y = planted
    clf = _fit(X=X[:160], y=y[:160], epochs=40)
    report = attribute_report(y[160:], clf.predict(X[160:]))
    # Every attribute is about balanced (chance 0.5): each one must be learnt, not just the mean.
    assert (report["majority_accuracy"] < 0.65).all()
    assert (report["accuracy"] > 0.8).all() and report.loc["mean", "accuracy"] > 0.9
    assert clf.score(X[160:], y[160:]) == pytest.approx(report.loc["mean", "accuracy"])


def test_outputs_are_consistent(planted):
    X, y = planted
    clf = _fit(X=X, y=y, epochs=2)
    logits, proba, labels = clf.decision_function(X), clf.predict_proba(X), clf.predict(X)
    assert logits.shape == proba.shape == labels.shape == (len(X), 4)
    assert labels.dtype == np.int64 and set(np.unique(labels)) <= {0, 1}
    np.testing.assert_allclose(proba, 1 / (1 + np.exp(-logits)), rtol=1e-5)
    np.testing.assert_array_equal(labels, (proba > 0.5).astype(int))
    weights = np.r_[np.ones(120), np.zeros(120)]
    assert clf.score(X, y, sample_weight=weights) == pytest.approx((labels[:120] == y[:120]).mean())
    assert clf.model_.training is False
    np.testing.assert_array_equal(clf.classes_, np.arange(4))


def test_attribute_names_come_from_a_label_frame(planted):
    X, y = planted
    frame = pd.DataFrame(y.astype(bool), columns=["red", "green", "blue", "left"])
    clf = _fit(X=X[:64], y=frame.iloc[:64], epochs=1)
    assert clf.attributes_.tolist() == ["red", "green", "blue", "left"]
    assert _fit(X=X[:64], y=y[:64], epochs=1).attributes_.tolist() == [0, 1, 2, 3]


def test_head_replace_keeps_the_trunk_and_swaps_the_last_linear(planted):
    X, y = planted
    student = _embedder(n_outputs=16).train()
    before = {name: value.clone() for name, value in student.state_dict().items()}
    # Adam moves every weight by about lr per step: at 1e-9 the trained trunk is the student's.
    clf = _fit(student, X[:32], y[:32], epochs=1, lr=1e-9)
    head = clf.model_[-1]
    assert (head.in_features, head.out_features) == (8, 4)
    torch.testing.assert_close(clf.model_[0].weight, before["0.weight"], rtol=0, atol=1e-7)
    # The model passed in is untouched: same weights, same training flag.
    assert student.training and all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_frozen_layers_stay_frozen_and_the_new_head_trains(planted):
    X, y = planted
    student = _embedder()
    student[0].requires_grad_(False)
    clf = _fit(student, X[:64], y[:64], epochs=2)
    assert torch.equal(clf.model_[0].weight, student[0].weight) and not clf.model_[0].weight.requires_grad
    untrained = _fit(student, X[:64], y[:64], epochs=1, lr=1e-12).model_[-1].weight
    assert not torch.allclose(clf.model_[-1].weight, untrained)


def test_head_keep_trains_a_model_with_one_output_per_attribute(planted):
    X, y = planted
    model = mobilenet_v1(num_classes=4, width_mult=0.125, resolution_mult=8 / 224).eval()
    clf = _fit(model, X[:32], y[:32], head="keep", epochs=1)
    assert clf.model_.classifier.out_features == 4 and clf.model_ is not model
    assert not model.training


@pytest.mark.parametrize(
    "model, head, match",
    [
        (_embedder(n_outputs=16), "keep", r"head='keep' needs a model with one output per attribute \(4\), got 16"),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            "replace",
            "needs a model with an nn.Linear layer",
        ),
        (
            nn.Sequential(_embedder(n_outputs=16), nn.BatchNorm1d(16)),
            "replace",
            r"replaced the last nn.Linear layer '0.4' .* failed on an image",
        ),
        (
            nn.Sequential(_embedder(n_outputs=16), nn.Flatten(0)),
            "replace",
            r"replaced the last nn.Linear layer '0.4' by one with 4 outputs, but the model then has",
        ),
    ],
)
def test_heads_that_do_not_fit_the_attributes_are_refused(planted, model, head, match):
    X, y = planted
    with pytest.raises(ValueError, match=match):
        MultiAttributeClassifier(model, head=head, epochs=1).fit(X[:8], y[:8])


def test_same_seed_gives_the_same_network_and_another_seed_another_one(planted):
    X, y = planted
    first, second = (_fit(X=X[:64], y=y[:64], epochs=2, random_state=3) for _ in range(2))
    other = _fit(X=X[:64], y=y[:64], epochs=2, random_state=4)
    np.testing.assert_array_equal(first.decision_function(X), second.decision_function(X))
    assert not np.array_equal(first.decision_function(X), other.decision_function(X))


def test_validation_and_early_stopping_reach_finetune(planted):
    X, y = planted
    clf = _fit(X=X[:80], y=y[:80], epochs=30, validation_fraction=0.25, early_stopping=1, lr=0.5)
    history = clf.history_
    assert history["epoch"].iloc[0] == 0 and np.isnan(history["train_loss"].iloc[0])
    assert len(history) < 31  # an lr of 0.5 diverges: early stopping ends the run


def test_preprocess_is_applied_in_fit_and_predict(planted):
    X, y = planted
    shifted = _fit(X=X[:64], y=y[:64], epochs=2, preprocess=lambda batch: 2 * batch - 1)
    plain = _fit(X=2 * X[:64] - 1, y=y[:64], epochs=2)
    np.testing.assert_allclose(shifted.decision_function(X), plain.decision_function(2 * X - 1), rtol=1e-4, atol=1e-5)


def test_worker_processes_read_a_dataset_with_the_same_result(planted):
    X, y = planted
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(X[:64]))
    in_process = _fit(X=dataset, y=y[:64], epochs=2)
    workers = _fit(X=dataset, y=y[:64], epochs=2, num_workers=2)
    np.testing.assert_array_equal(workers.decision_function(dataset), in_process.decision_function(dataset))
    np.testing.assert_array_equal(workers.decision_function(dataset), workers.decision_function(X[:64]))


def test_pickle_round_trip_predicts_the_same(planted):
    X, y = planted
    clf = _fit(X=X[:64], y=y[:64], epochs=1)
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict_proba(X), clf.predict_proba(X))


def test_clone_is_independent_and_works_in_pipeline_and_grid_search(planted):
    X, y = planted
    clf = _fit(X=X[:64], y=y[:64], epochs=1)
    state = {k: v.clone() for k, v in clf.model_.state_dict().items()}
    copy = clone(clf)
    assert copy.model is not clf.model and not hasattr(copy, "model_")
    copy.set_params(lr=0.1).fit(X[:64], y[:64])
    assert all(torch.equal(state[k], v) for k, v in clf.model_.state_dict().items())

    pipe = make_pipeline(MultiAttributeClassifier(_embedder(), head="replace", epochs=1, random_state=0))
    assert pipe.fit(X[:64], y[:64]).predict(X[:5]).shape == (5, 4)
    search = GridSearchCV(MultiAttributeClassifier(_embedder(), head="replace", epochs=2, random_state=0),
                          {"lr": [1e-4, 1e-2]}, cv=2).fit(X[:64], y[:64])
    assert search.best_params_ == {"lr": 1e-2}  # a hundredth of the steps does not move the random head


@pytest.mark.parametrize(
    "params, y, error, match",
    [
        ({}, "1d", ValueError, "y must be a 2-D 0/1 matrix"),
        ({}, "pm1", ValueError, r"y must hold 0/1 \(or bool\) values, got \[-1\]"),
        ({}, "short", ValueError, r"y must have one row per image \(16\), got 15"),
        ({"early_stopping": 2}, "ok", ValueError, "early_stopping.*validation_fraction"),
        ({"head": "adapt"}, "ok", ValueError, "'head' parameter"),
        ({"epochs": 0}, "ok", ValueError, "'epochs' parameter"),
        ({"num_workers": -1}, "ok", ValueError, "'num_workers' parameter"),
    ],
)
def test_bad_parameters_and_labels_are_refused(planted, params, y, error, match):
    X, labels = planted
    X, labels = X[:16], labels[:16]
    y = {"1d": labels[:, 0], "pm1": 2 * labels - 1, "short": labels[:15], "ok": labels}[y]
    with pytest.raises(error, match=match):
        MultiAttributeClassifier(_embedder(), **{"head": "replace", **params}).fit(X, y)


def test_images_are_checked_and_predict_needs_a_fit(planted):
    X, y = planted
    clf = MultiAttributeClassifier(_embedder(), head="replace", epochs=1)
    with pytest.raises(ValueError, match="4-D array of images"):
        clf.fit(X[:16, 0, 0], y[:16])
    with pytest.raises(ValueError, match="1 channels, the model expects n_channels=3"):
        clf.fit(X[:16, :1], y[:16])
    with pytest.raises(NotFittedError):
        clf.predict(X)
    with pytest.raises(ValueError, match="NaN|finite"):
        clf.fit(np.where(np.arange(16)[:, None, None, None] == 3, np.nan, X[:16]).astype(np.float32), y[:16])
    with pytest.raises(ValueError):
        clf.fit(X[:0], y[:0])


def test_read_only_fortran_or_float64_images_and_predictions_in_any_order(planted):
    X, y = planted
    X, y = X[:48], y[:48]
    clf = _fit(X=X, y=y, epochs=1)
    read_only = X.copy()
    read_only.flags.writeable = False
    np.testing.assert_array_equal(_fit(X=read_only, y=y, epochs=1).decision_function(X), clf.decision_function(X))
    state = dict(vars(clf))
    logits = clf.decision_function(X)
    assert vars(clf).keys() == state.keys() and all(vars(clf)[key] is value for key, value in state.items())
    np.testing.assert_allclose(clf.decision_function(np.asfortranarray(X)), logits, rtol=1e-6)
    np.testing.assert_allclose(clf.decision_function(X.astype(np.float64)), logits, rtol=1e-6)
    order = np.random.default_rng(0).permutation(len(X))
    np.testing.assert_allclose(clf.decision_function(X[order]), logits[order], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(clf.decision_function(X[5:9]), logits[5:9], rtol=1e-5, atol=1e-6)


def test_sample_weight_weights_the_loss(planted):
    X, y = planted
    X, y = X[:64], y[:64]
    plain = _fit(X=X, y=y, epochs=2)
    # Weights are divided by their mean: equal weights train exactly as none.
    same = _fit(X=X, y=y, epochs=2, sample_weight=pd.Series(np.full(64, 2.5)))
    np.testing.assert_allclose(same.decision_function(X), plain.decision_function(X), rtol=1e-5, atol=1e-6)
    weights = np.r_[np.ones(32), np.zeros(32)]
    first_half = _fit(X=X, y=y, epochs=2, sample_weight=list(weights))
    assert not np.allclose(first_half.decision_function(X), plain.decision_function(X))
    with pytest.raises(ValueError, match="(?i)sample.weight"):
        _fit(X=X, y=y, epochs=1, sample_weight=np.zeros(64))
    with pytest.raises(ValueError):
        _fit(X=X, y=y, epochs=1, sample_weight=np.ones(63))


#: Where this file tests, with images and a 0/1 label matrix, what scikit-learn's checks test with
#: 2-D tabular X (or a 1-D y).
_COVERED_WITH_IMAGES = {
    "check_fit_score_takes_y": "test_outputs_are_consistent",
    "check_estimators_fit_returns_self": "test_learns_a_planted_multi_label_task",
    "check_positive_only_tag_during_fit": "test_preprocess_is_applied_in_fit_and_predict",
    "check_estimators_pickle": "test_pickle_round_trip_predicts_the_same",
    "check_fit_idempotent": "test_same_seed_gives_the_same_network_and_another_seed_another_one",
    **dict.fromkeys(
        [
            "check_estimators_overwrite_params",
            "check_dont_overwrite_parameters",
            "check_pipeline_consistency",
        ],
        "test_clone_is_independent_and_works_in_pipeline_and_grid_search",
    ),
    **dict.fromkeys(
        [
            "check_readonly_memmap_input",
            "check_estimators_dtypes",
            "check_f_contiguous_array_estimator",
            "check_methods_sample_order_invariance",
            "check_methods_subset_invariance",
            "check_dict_unchanged",
        ],
        "test_read_only_fortran_or_float64_images_and_predictions_in_any_order",
    ),
    **dict.fromkeys(
        [
            "check_estimators_empty_data_messages",
            "check_estimators_nan_inf",
            "check_fit2d_1sample",
            "check_fit2d_1feature",
            "check_fit2d_predict1d",
            "check_fit_check_is_fitted",
        ],
        "test_images_are_checked_and_predict_needs_a_fit",
    ),
    **dict.fromkeys(SAMPLE_WEIGHT_CHECKS, "test_sample_weight_weights_the_loss"),
    # The classifier checks: regressors' and check_supervised_y_2d are not run on a multi-label classifier.
    **dict.fromkeys(
        [check for check in SUPERVISED_CHECKS if check.startswith("check_classifier")], "test_outputs_are_consistent"
    ),
}
_CHECKED = MultiAttributeClassifier(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
EXPECTED_FAILED_CHECKS = {
    **image_estimator_expected_failures(
        {check: test for check, test in _COVERED_WITH_IMAGES.items() if check in TABULAR_CHECKS}
    ),
    # Checks of a classifier's outputs that scikit-learn runs on 2-D tabular X or a 1-D y.
    "check_decision_proba_consistency": (
        "feeds 2-D tabular X, which an image estimator rejects; tested with images in test_outputs_are_consistent"
    ),
    "check_classifier_not_supporting_multiclass": (
        "expects 'Only binary classification is supported.' for a 1-D multi-class y, refused here as 'y must be a "
        "2-D 0/1 matrix'; tested with images in test_bad_parameters_and_labels_are_refused"
    ),
}


@parametrize_with_checks([_CHECKED])
def test_sklearn_contract(estimator, check):
    run_image_estimator_check(estimator, check, EXPECTED_FAILED_CHECKS)


def test_every_expected_failure_names_a_check_that_runs():
    assert_expected_failures_are_current(_CHECKED, EXPECTED_FAILED_CHECKS, sys.modules[__name__])


# Real data --------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_celeba_gives_the_40_attributes_as_booleans(shared_data):
    root = shared_data / "celeba"
    _, labels = load_celeba(root, n=6, size=(16, 16), random_state=0)
    raw = pd.read_csv(root / "list_attr_celeba.txt", sep=r"\s+", skiprows=1)
    attributes = labels.drop(columns="identity")
    assert attributes.columns.tolist() == raw.columns.tolist() and len(raw.columns) == 40
    assert (attributes.dtypes == bool).all()
    # +1 in the file is True, -1 False: a 0/1 matrix for binary cross-entropy.
    np.testing.assert_array_equal(attributes.to_numpy(), raw.loc[attributes.index].to_numpy() == 1)
    assert attribute_report(attributes, attributes).index[:-1].tolist() == raw.columns.tolist()
