import doctest
import itertools
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import MultiTaskLasso, RidgeCV, lasso_path
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

import sklearn_craft._lasso_path
import sklearn_craft.selection
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.selection import LassoFilterSelector, characteristic_curve, find_knee
from sklearn_craft.targets import encode_target

DOCS = Path(__file__).resolve().parents[1] / "docs" / "selection.rst"


def _regression(n=300, p=10, informative=(1, 6), noise=0.1, mixing=0.3, seed=0):
    """Features (correlated by ``mixing``) and a target that depends on ``informative`` columns only."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) @ (np.eye(p) + mixing * rng.normal(size=(p, p))) + 5.0
    y = X[:, list(informative)] @ rng.uniform(1, 2, size=len(informative)) + noise * rng.normal(size=n)
    return X, y


def _group_sizes(selector):
    return pd.Series(selector.support_).groupby(selector.groups_, sort=False).sum()


@parametrize_with_checks([LassoFilterSelector()])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_docstring_examples_run():
    assert doctest.testmod(sklearn_craft.selection).failed == 0


def test_docs_page_example_runs():
    result = doctest.testfile(str(DOCS), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- encode_target


def test_encode_continuous_targets():
    y = np.array([0.5, 1.5, -2.0, 3.25])
    Y, target_type, classes = encode_target(y)
    np.testing.assert_array_equal(Y, y[:, None])
    assert (target_type, classes) == ("continuous", None)
    # A float column vector and integral floats are continuous too.
    assert encode_target(y[:, None])[1] == "continuous"
    assert encode_target(np.array([20.0, 30.0, 20.0, 40.0]))[1] == "continuous"

    Y2 = np.random.default_rng(0).normal(size=(5, 3))
    encoded, target_type, classes = encode_target(Y2)
    np.testing.assert_array_equal(encoded, Y2)
    assert (target_type, classes) == ("continuous-multioutput", None)


@pytest.mark.parametrize(
    "labels, classes",
    [
        (["cat", "dog", "bird", "dog"], ["bird", "cat", "dog"]),
        ([2, 0, 1, 1], [0, 1, 2]),
        (pd.Series(["x", "y", "z", "x"], dtype=object), ["x", "y", "z"]),
    ],
)
def test_encode_multiclass_labels_one_hot(labels, classes):
    Y, target_type, found = encode_target(labels)
    assert target_type == "multiclass"
    assert list(found) == classes
    np.testing.assert_array_equal(Y.sum(axis=1), 1.0)
    np.testing.assert_array_equal(np.asarray(found)[Y.argmax(axis=1)], np.asarray(labels))


@pytest.mark.parametrize("labels", [[True, False, True, True], ["no", "yes", "yes", "no"], [3, 7, 7, 3]])
def test_encode_binary_labels_single_column(labels):
    Y, target_type, classes = encode_target(labels)
    assert target_type == "binary"
    assert Y.shape == (4, 1)
    np.testing.assert_array_equal(Y[:, 0], np.asarray(labels) == classes[1])


def test_encode_multilabel_indicator_as_is():
    indicator = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]])
    Y, target_type, classes = encode_target(indicator)
    np.testing.assert_array_equal(Y, indicator)
    assert Y.dtype == np.float64
    assert (target_type, classes) == ("multilabel-indicator", None)


@pytest.mark.parametrize(
    "y, match",
    [
        (np.array([1.0, np.nan, 2.0]), "finite"),
        (np.array([1.0, np.inf, 2.0]), "finite"),
        (np.array(["a", None, "b"], dtype=object), "NaN or None"),
        (np.array([2.0, 2.0, 2.0]), "constant"),
        (np.array(["a", "a", "a"]), "constant"),
        (np.zeros((3, 2)), "constant"),
        (np.array([]), "empty"),
        (np.zeros((2, 2, 2)), "1-D or 2-D"),
        (np.array([["a", "b"], ["c", "d"]]), "numeric"),
        (np.array([1, "a", 2.5], dtype=object), "Unknown label type"),
    ],
)
def test_encode_target_rejects(y, match):
    with pytest.raises(ValueError, match=match):
        encode_target(y)


# --------------------------------------------------------------------------- knee rule


def test_knee_fewest_filters_within_tolerance():
    curve = pd.DataFrame({"n_selected": [0, 1, 3, 8], "rmse": [10.0, 4.0, 2.05, 2.0]})
    # range 8: gamma=0.01 allows rmse <= 2.08, gamma=0.5 allows rmse <= 6.
    assert find_knee(curve, 0.01) == 2
    assert find_knee(curve, 0.5) == 1
    assert find_knee(curve, 1.0) == 1
    # gamma=0: the minimum.
    assert find_knee(curve, 0.0) == 3


def test_knee_bound_is_inclusive():
    curve = {"n_selected": [0, 1, 2], "rmse": [3.0, 2.0, 1.0]}
    assert find_knee(curve, 0.5) == 1  # 2.0 - 1.0 == 0.5 * (3.0 - 1.0)
    assert find_knee(curve, 0.4999) == 2


def test_knee_ties_go_to_lower_rmse_then_earlier_point():
    curve = pd.DataFrame({"n_selected": [0, 2, 2, 5, 2], "rmse": [5.0, 3.0, 2.5, 2.4, 2.5]})
    assert find_knee(curve, 0.5) == 2
    # gamma=0 with two points at the minimum: the one with fewer filters.
    assert find_knee({"n_selected": [0, 4, 3], "rmse": [2.0, 1.0, 1.0]}, 0.0) == 2


def test_knee_is_never_empty_when_a_filter_exists():
    # At gamma=1 the empty model is the fewest: the sparsest non-empty point instead.
    curve = pd.DataFrame({"n_selected": [0, 1, 2, 2], "rmse": [3.0, 2.0, 1.0, 1.5]})
    assert find_knee(curve, 1.0) == 1
    # The empty model has the lowest held-out error: the best non-empty point.
    curve = pd.DataFrame({"n_selected": [0, 0, 1, 2, 3], "rmse": [1.0, 1.0, 1.8, 1.5, 2.0]})
    assert find_knee(curve, 0.1) == 3
    assert find_knee(curve, 0.9) == 2
    # No point has a filter: the (empty) knee of the rule.
    assert find_knee({"n_selected": [0, 0], "rmse": [1.0, 1.0]}, 0.01) == 0


def test_knee_is_monotone_in_gamma():
    rng = np.random.default_rng(0)
    for _ in range(20):
        curve = pd.DataFrame({"n_selected": rng.integers(0, 30, 50), "rmse": rng.uniform(1, 2, 50)})
        sizes = [curve["n_selected"].iloc[find_knee(curve, gamma)] for gamma in np.linspace(0, 1, 11)]
        assert all(a >= b for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize(
    "curve, gamma, error, match",
    [
        ({"n_selected": [0, 1], "rmse": [1.0, 0.5]}, -0.1, ValueError, r"gamma must be in \[0, 1\], got -0.1"),
        ({"n_selected": [0, 1], "rmse": [1.0, 0.5]}, 1.5, ValueError, r"gamma must be in \[0, 1\]"),
        ({"n_selected": [0, 1], "rmse": [1.0, 0.5]}, "0.1", TypeError, "gamma must be a real number"),
        ({"n_selected": [0, 1]}, 0.1, ValueError, "columns 'n_selected' and 'rmse'"),
        ({"n_selected": [], "rmse": []}, 0.1, ValueError, "one or more points"),
        ({"n_selected": [0, 1], "rmse": [1.0, np.nan]}, 0.1, ValueError, "finite"),
    ],
)
def test_knee_rejects(curve, gamma, error, match):
    with pytest.raises(error, match=match):
        find_knee(curve, gamma)


def test_priced_knee_minimises_normalised_rmse_plus_price_of_filters():
    curve = pd.DataFrame({"n_selected": [0, 1, 3, 8], "rmse": [10.0, 4.0, 2.05, 2.0]})
    normalised = (curve["rmse"] - 2.0) / 8.0
    for gamma, cost in [(0.1, 1.0), (0.2, 1.0), (0.01, 0.5), (0.5, 0.001), (1.0, 3.0)]:
        objective = normalised + gamma * cost * curve["n_selected"]
        # The empty point is never the knee.
        assert find_knee(curve, gamma, cost=cost) == 1 + int(np.argmin(objective.to_numpy()[1:]))
    # A free filter, or gamma=0: the lowest RMSE, as the tolerance rule at gamma=0.
    assert find_knee(curve, 0.3, cost=0.0) == find_knee(curve, 0.0, cost=2.0) == find_knee(curve, 0.0) == 3
    # Equal objectives (0.5 + 0.25 x 1 = 0 + 0.25 x 3): the fewer filters.
    assert find_knee({"n_selected": [0, 1, 3], "rmse": [5.0, 3.0, 1.0]}, 0.25, cost=1.0) == 1
    assert find_knee({"n_selected": [0, 1, 3], "rmse": [5.0, 3.0, 1.0]}, 0.24, cost=1.0) == 2
    # A flat curve keeps its sparsest non-empty point at any price.
    assert find_knee({"n_selected": [0, 2, 5], "rmse": [1.0, 1.0, 1.0]}, 0.01, cost=0.0) == 1


def test_priced_knee_is_monotone_in_gamma_and_in_cost():
    rng = np.random.default_rng(1)
    for _ in range(20):
        curve = pd.DataFrame({"n_selected": rng.integers(0, 30, 50), "rmse": rng.uniform(1, 2, 50)})
        sizes = [curve["n_selected"].iloc[find_knee(curve, gamma, cost=0.05)] for gamma in np.linspace(0, 1, 11)]
        assert all(a >= b for a, b in zip(sizes, sizes[1:]))
        sizes = [curve["n_selected"].iloc[find_knee(curve, 0.1, cost=cost)] for cost in np.linspace(0, 1, 11)]
        assert all(a >= b for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize(
    "cost, error, match",
    [(-0.1, ValueError, "cost must be finite and >= 0, got -0.1"), (np.inf, ValueError, "cost must be finite"),
     ("1", TypeError, "cost must be a real number or None"), (True, TypeError, "cost must be a real number")],
)
def test_priced_knee_rejects(cost, error, match):
    with pytest.raises(error, match=match):
        find_knee({"n_selected": [0, 1], "rmse": [1.0, 0.5]}, 0.1, cost=cost)


def _two_copies(seed=0):
    """The same eight features twice (groups 0 and 1), the target weighing them 1, 1/2, 1/4, ..."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(400, 8))
    y = Z @ (2.0 ** -np.arange(8)) + 0.05 * rng.normal(size=400)
    return np.hstack([Z, Z]), y, [0] * 8 + [1] * 8


def test_priced_selector_knees_are_find_knee_with_each_group_cost():
    X, y, groups = _two_copies()
    costs = {0: 0.01, 1: 0.2, "unused": 5.0}
    selector = LassoFilterSelector(groups=groups, gamma=0.2, knee="cost", group_costs=costs, random_state=0).fit(X, y)
    for group, knee in selector.knees_.set_index("group").iterrows():
        curve = selector.curves_[selector.curves_["group"] == group].reset_index(drop=True)
        assert knee["alpha"] == curve["alpha"].iloc[find_knee(curve, 0.2, cost=costs[group])]
    # Identical curves: the dear copy keeps fewer features than the cheap one.
    cheap, dear = selector.knees_["n_selected"]
    assert dear < cheap
    assert selector.support_[:8].sum() == cheap and selector.support_[8:].sum() == dear


def test_priced_selector_prices_features_at_one_over_the_mean_width_by_default():
    X, y, groups = _two_copies()
    X = X[:, :12]  # groups of 8 and 4 features: the mean width is 6
    groups = groups[:12]
    default = LassoFilterSelector(groups=groups, gamma=0.1, knee="cost", random_state=0).fit(X, y)
    explicit = LassoFilterSelector(groups=groups, gamma=0.1, knee="cost", group_costs={0: 1 / 6, 1: 1 / 6},
                                   random_state=0).fit(X, y)
    np.testing.assert_array_equal(default.support_, explicit.support_)
    pd.testing.assert_frame_equal(default.knees_, explicit.knees_)
    # gamma=0 keeps every feature, priced or not.
    assert LassoFilterSelector(groups=groups, gamma=0, knee="cost", random_state=0).fit(X, y).support_.all()


def test_priced_selector_streams_as_it_fits():
    X, y, groups = _two_copies()
    params = dict(groups=groups, gamma=0.2, knee="cost", group_costs={0: 0.01, 1: 0.2}, random_state=0)
    streamed = LassoFilterSelector(**params)
    for start in range(0, len(X), 100):
        streamed.partial_fit(X[start : start + 100], y[start : start + 100])
    # The split is drawn per sample when streaming: compare the knees with a fit on that split.
    assert streamed.knees_["n_selected"].iloc[1] < streamed.knees_["n_selected"].iloc[0]
    for group, knee in streamed.knees_.set_index("group").iterrows():
        curve = streamed.curves_[streamed.curves_["group"] == group].reset_index(drop=True)
        assert knee["alpha"] == curve["alpha"].iloc[find_knee(curve, 0.2, cost=params["group_costs"][group])]


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(group_costs={0: 1.0, 1: 1.0}), "group_costs needs knee='cost', got knee='tolerance'"),
        (dict(knee="cost", group_costs={0: 1.0}), r"group_costs must hold the cost of every group, missing 1: \[1\]"),
        (dict(knee="cost", group_costs={0: 1.0, 1: -2.0}), "finite numbers >= 0, got -2.0 for group 1"),
        (dict(knee="cost", group_costs={0: 1.0, 1: "a"}), "finite numbers >= 0, got 'a' for group 1"),
    ],
)
def test_priced_selector_rejects_bad_costs_before_fitting(params, match):
    X, y, groups = _two_copies()
    selector = LassoFilterSelector(groups=groups, random_state=0, **params)
    with pytest.raises(ValueError, match=match):
        selector.fit(X, y)
    assert not hasattr(selector, "support_") and not hasattr(selector, "n_features_in_")


# --------------------------------------------------------------------------- characteristic curve


def test_path_equals_sklearn_lasso_path():
    X, y = _regression()
    curve, coefs = characteristic_curve(X, y, standardize=False, random_state=0)
    Xc, yc = X - X.mean(axis=0), y - y.mean()
    alpha_max = np.max(np.abs(Xc.T @ yc)) / len(y)
    np.testing.assert_allclose(curve["alpha"], np.geomspace(alpha_max, alpha_max * 1e-4, 100), rtol=1e-12)

    _, expected, _ = lasso_path(Xc, yc, alphas=curve["alpha"].to_numpy(), tol=1e-12, max_iter=100_000)
    np.testing.assert_allclose(coefs, expected, rtol=0, atol=1e-9 * np.abs(expected).max())
    np.testing.assert_array_equal(curve["n_selected"], np.count_nonzero(expected, axis=0))


def test_standardized_path_is_lasso_path_on_scaled_features_in_original_scale():
    X, y = _regression()
    X[:, 3] *= 1000.0
    curve, coefs = characteristic_curve(X, y, alphas=30, random_state=0)
    scaler = StandardScaler().fit(X)
    _, expected, _ = lasso_path(
        scaler.transform(X), y - y.mean(), alphas=curve["alpha"].to_numpy(), tol=1e-12, max_iter=100_000
    )
    np.testing.assert_allclose(coefs, expected / scaler.scale_[:, None], rtol=0, atol=1e-9 * np.abs(expected).max())


def test_held_out_rmse_of_the_training_part_path():
    X, y = _regression()
    curve, _ = characteristic_curve(X, y, alphas=20, validation_fraction=0.3, random_state=3)
    train, test = train_test_split(np.arange(len(y)), test_size=0.3, random_state=3)
    scaler = StandardScaler().fit(X[train])
    _, coefs, _ = lasso_path(
        scaler.transform(X[train]), y[train] - y[train].mean(), alphas=curve["alpha"].to_numpy(), tol=1e-12, max_iter=100_000
    )
    predictions = scaler.transform(X[test]) @ coefs + y[train].mean()
    expected = np.sqrt(np.mean((predictions - y[test][:, None]) ** 2, axis=0))
    np.testing.assert_allclose(curve["rmse"], expected, rtol=1e-7)


def test_cv_rmse_is_the_mean_over_folds():
    X, y = _regression(n=120, mixing=0.1)
    folds = KFold(4, shuffle=True, random_state=0)
    curve, _ = characteristic_curve(X, y, alphas=15, cv=folds, standardize=False)
    expected = []
    for train, test in folds.split(X):
        x_mean, y_mean = X[train].mean(axis=0), y[train].mean()
        _, coefs, _ = lasso_path(
            X[train] - x_mean, y[train] - y_mean, alphas=curve["alpha"].to_numpy(), tol=1e-12, max_iter=100_000
        )
        predictions = (X[test] - x_mean) @ coefs + y_mean
        expected.append(np.sqrt(np.mean((predictions - y[test][:, None]) ** 2, axis=0)))
    np.testing.assert_allclose(curve["rmse"], np.mean(expected, axis=0), rtol=1e-7)
    # An int gives the same numbers as the unshuffled KFold it stands for.
    by_int, _ = characteristic_curve(X, y, alphas=15, cv=4, standardize=False)
    by_splitter, _ = characteristic_curve(X, y, alphas=15, cv=KFold(4), standardize=False)
    pd.testing.assert_frame_equal(by_int, by_splitter)


def test_explicit_alphas_are_used_in_decreasing_order():
    X, y = _regression()
    curve, coefs = characteristic_curve(X, y, alphas=[0.01, 1.0, 0.1], random_state=0)
    np.testing.assert_array_equal(curve["alpha"], [1.0, 0.1, 0.01])
    assert coefs.shape == (X.shape[1], 3)


def _multitask_gap(X, Y, W, alpha):
    """scikit-learn's duality gap of the multi-task LASSO (times n), from the data."""
    Xc, Yc = X - X.mean(axis=0), Y - Y.mean(axis=0)
    R = Yc - Xc @ W.T
    penalty = alpha * len(X)
    dual_norm = np.max(np.linalg.norm(Xc.T @ R, axis=1))
    scale = min(1.0, penalty / dual_norm)
    primal = 0.5 * np.sum(R**2) + penalty * np.sum(np.linalg.norm(W, axis=0))
    dual = -0.5 * scale**2 * np.sum(R**2) + scale * np.sum(R * Yc)
    return primal - dual


def test_single_target_path_meets_the_tolerance_where_filters_outnumber_samples():
    # Nearly collinear filters, more of them than samples: LARS drops and re-adds filters along
    # the path; every alpha's solution still meets the duality-gap tolerance.
    X, Y, stats, grid = _dense_collinear_problem(n_targets=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        coefs = sklearn_craft._lasso_path._solve_path(stats, grid, tol=1e-8)
    total = np.sum((Y - Y.mean(axis=0)) ** 2)
    for i, alpha in enumerate(grid):
        assert _multitask_gap(X, Y, coefs[:, :, i], alpha) <= 1e-8 * total
    assert np.count_nonzero(coefs[0, :, -1]) > len(X) // 3


def test_single_target_path_closes_the_gaps_lars_leaves_with_newton_steps(monkeypatch):
    # LARS's points moved off the path (every coefficient 2 % too large): Newton steps on their
    # supports bring each alpha back within the tolerance.
    X, y = _regression()
    lars_path_gram = sklearn_craft._lasso_path.lars_path_gram

    def inexact_lars_path_gram(*args, **kwargs):
        alphas, active, coefs = lars_path_gram(*args, **kwargs)
        return alphas, active, 1.02 * coefs

    monkeypatch.setattr(sklearn_craft._lasso_path, "lars_path_gram", inexact_lars_path_gram)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        curve, coefs = characteristic_curve(X, y, standardize=False, random_state=0)
    Xc, yc = X - X.mean(axis=0), y - y.mean()
    _, expected, _ = lasso_path(Xc, yc, alphas=curve["alpha"].to_numpy(), tol=1e-12, max_iter=100_000)
    np.testing.assert_array_equal(coefs != 0, expected != 0)
    for i, alpha in enumerate(curve["alpha"]):
        assert _multitask_gap(X, y[:, None], coefs[:, i][None], alpha) <= 1e-4 * np.sum(yc**2)
    # Without the Newton steps those gaps stay open, and say so.
    monkeypatch.setattr(sklearn_craft._lasso_path, "_newton_step", lambda *args: None)
    with pytest.warns(ConvergenceWarning, match="did not reach its duality-gap tolerance"):
        characteristic_curve(X, y, standardize=False, random_state=0)


def test_multitask_path_meets_sklearn_stopping_rule():
    X, _ = _regression(n=200, p=15)
    rng = np.random.default_rng(1)
    Y = X[:, [0, 4]] @ rng.normal(size=(2, 3)) + 0.5 * rng.normal(size=(200, 3))
    curve, coefs = characteristic_curve(X, Y, alphas=30, standardize=False, random_state=0)
    assert coefs.shape == (3, 15, 30)
    tolerance = 1e-4 * np.sum((Y - Y.mean(axis=0)) ** 2)
    for i, alpha in enumerate(curve["alpha"]):
        assert _multitask_gap(X, Y, coefs[:, :, i], alpha) <= tolerance
    np.testing.assert_array_equal(curve["n_selected"], np.count_nonzero(np.any(coefs != 0, axis=0), axis=0))


def test_multitask_path_equals_sklearn_multitask_lasso():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20)) * 0.3 + rng.normal(size=(300, 20))
    Y = X[:, :5] @ rng.normal(size=(5, 4)) + rng.normal(size=(300, 4))
    x_mean, y_mean = X.mean(axis=0), Y.mean(axis=0)
    Z = np.hstack([X - x_mean, Y - y_mean])
    stats = sklearn_craft._lasso_path._moments(Z.T @ Z, 300, x_mean, 20, False)
    grid = sklearn_craft._lasso_path._alpha_grid(stats, 40, 1e-3)
    coefs = sklearn_craft._lasso_path._solve_path(stats, grid, tol=1e-12)
    for i in (5, 20, 39):
        expected = MultiTaskLasso(alpha=grid[i], tol=1e-12, max_iter=100_000).fit(X, Y).coef_
        np.testing.assert_allclose(coefs[:, :, i], expected, rtol=0, atol=1e-6)
    _, path, _ = lasso_path(X - x_mean, Y - y_mean, alphas=grid, tol=1e-12, max_iter=100_000)
    np.testing.assert_allclose(coefs, path, rtol=0, atol=1e-6)


def test_multitask_path_of_one_hot_classes_equals_sklearn_multitask_lasso():
    # Centred one-hot classes span one dimension fewer than classes: a singular target block.
    rng = np.random.default_rng(2)
    X = rng.normal(size=(240, 12)) @ rng.normal(size=(12, 12)) * 0.3 + rng.normal(size=(240, 12))
    Y = np.eye(4)[np.argmax(X[:, :4] + rng.normal(size=(240, 4)), axis=1)]
    x_mean, y_mean = X.mean(axis=0), Y.mean(axis=0)
    Z = np.hstack([X - x_mean, Y - y_mean])
    stats = sklearn_craft._lasso_path._moments(Z.T @ Z, 240, x_mean, 12, False)
    grid = sklearn_craft._lasso_path._alpha_grid(stats, 30, 1e-3)
    coefs = sklearn_craft._lasso_path._solve_path(stats, grid, tol=1e-12)
    _, path, _ = lasso_path(X - x_mean, Y - y_mean, alphas=grid, tol=1e-12, max_iter=100_000)
    np.testing.assert_allclose(coefs, path, rtol=0, atol=1e-6)
    assert np.count_nonzero(np.any(coefs[:, :, -1] != 0, axis=0)) > 6


def _dense_collinear_problem(seed=3, n=60, p=90, n_targets=5):
    """More filters than samples, nearly collinear (rank ~8 plus noise): a dense, ill-conditioned path."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8)) @ rng.normal(size=(8, p)) + 0.2 * rng.normal(size=(n, p))
    Y = X[:, :6] @ rng.normal(size=(6, n_targets)) + rng.normal(size=(n, n_targets))
    x_mean = X.mean(axis=0)
    Z = np.hstack([X - x_mean, Y - Y.mean(axis=0)])
    stats = sklearn_craft._lasso_path._moments(Z.T @ Z, n, x_mean, p, False)
    return X, Y, stats, sklearn_craft._lasso_path._alpha_grid(stats, 30, 1e-4)


def test_multitask_path_closes_a_tight_gap_on_a_dense_collinear_problem(monkeypatch):
    X, Y, stats, grid = _dense_collinear_problem()
    tolerance = 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        coefs = sklearn_craft._lasso_path._solve_path(stats, grid, tol=tolerance)
    total = np.sum((Y - Y.mean(axis=0)) ** 2)
    for i, alpha in enumerate(grid):
        assert _multitask_gap(X, Y, coefs[:, :, i], alpha) <= tolerance * total
    assert np.count_nonzero(np.any(coefs[:, :, -1] != 0, axis=0)) > len(X) // 2  # the dense end
    # The proximal gradient alone does not get there in scikit-learn's 1 000 iterations.
    monkeypatch.setattr(sklearn_craft._lasso_path, "_newton_step", lambda *args: None)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        sklearn_craft._lasso_path._solve_path(stats, grid, tol=tolerance)


def test_newton_direction_solves_the_newton_system_in_either_precision():
    # The Woodbury solution against the Hessian written out (rows of W raveled):
    # G_AA ⊗ I + ⊕_j d_j (I − u_j u_jᵀ), d_j = penalty / ‖W_j‖.
    rng = np.random.default_rng(0)
    n_support, n_targets, penalty = 6, 3, 2.0
    X = rng.normal(size=(20, n_support))
    gram, W, gradient = X.T @ X, rng.normal(size=(n_support, n_targets)), rng.normal(size=(n_support, n_targets))
    norms = np.linalg.norm(W, axis=1)
    U, curvature = W / norms[:, None], penalty / norms
    hessian = np.kron(gram, np.eye(n_targets)) + scipy.linalg.block_diag(
        *(d * (np.eye(n_targets) - np.outer(u, u)) for d, u in zip(curvature, U))
    )
    expected = -np.linalg.solve(hessian, gradient.ravel()).reshape(W.shape)
    for dtype, rtol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        direction = sklearn_craft._lasso_path._newton_direction(gram, U, curvature, gradient, dtype)
        assert direction.dtype == np.float64
        np.testing.assert_allclose(direction, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_newton_steps_solve_in_float32_from_the_support_size_and_fall_back_to_float64(monkeypatch):
    # Supports of FLOAT32_SUPPORT filters or more try float32 first; where its factorisation fails
    # the step is solved in float64, and the path still closes a tight gap.
    X, Y, stats, grid = _dense_collinear_problem()
    newton_direction, calls = sklearn_craft._lasso_path._newton_direction, []

    def float32_failing(gram_a, U, curvature, gradient, dtype):
        calls.append((len(U), dtype))
        if dtype == np.float32:
            raise np.linalg.LinAlgError("not positive definite")
        return newton_direction(gram_a, U, curvature, gradient, dtype)

    monkeypatch.setattr(sklearn_craft._lasso_path, "_newton_direction", float32_failing)
    monkeypatch.setattr(sklearn_craft._lasso_path, "FLOAT32_SUPPORT", 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        coefs = sklearn_craft._lasso_path._solve_path(stats, grid, tol=1e-10)
    sizes = {size for size, _ in calls}
    assert min(sizes) < 20 <= max(sizes)
    for (size, dtype), (next_size, next_dtype) in itertools.pairwise(calls):
        if dtype == np.float32:
            assert (next_size, next_dtype) == (size, np.float64)
    first_tries = [
        call for call, previous in zip(calls, [None, *calls]) if previous is None or previous[1] != np.float32
    ]
    assert all((dtype == np.float32) == (size >= 20) for size, dtype in first_tries)
    total = np.sum((Y - Y.mean(axis=0)) ** 2)
    for i, alpha in enumerate(grid):
        assert _multitask_gap(X, Y, coefs[:, :, i], alpha) <= 1e-10 * total


def test_newton_steps_converge_quadratically_from_a_point_with_the_right_support(monkeypatch):
    X, Y, stats, grid = _dense_collinear_problem(seed=4)
    i, p = 20, X.shape[1]
    gram, xy = stats["C"][:p, :p], stats["C"][:p, p:]
    penalty = grid[i] * len(X)
    newton_step = sklearn_craft._lasso_path._newton_step
    # A proximal-gradient point that has found the support but not closed the gap.
    monkeypatch.setattr(sklearn_craft._lasso_path, "_newton_step", lambda *args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        rough = sklearn_craft._lasso_path._solve_path(stats, grid, tol=1e-6)[:, :, i].T

    def objective(W):
        return 0.5 * np.vdot(W, gram @ W) - np.vdot(W, xy) + penalty * np.sum(np.linalg.norm(W, axis=1))

    points = [rough]
    for _ in range(3):
        points.append(newton_step(gram, xy, points[-1], penalty))
    gaps = [_multitask_gap(X, Y, W.T, grid[i]) for W in points]
    # Each step descends (to the objective's rounding once at the solution).
    assert all(objective(b) <= objective(a) + 1e-12 * abs(objective(a)) for a, b in itertools.pairwise(points))
    assert objective(points[1]) < objective(rough)
    assert all(np.array_equal(W != 0, rough != 0) for W in points)  # on the support
    assert gaps[1] < 1e-2 * gaps[0] and gaps[2] < 1e-2 * gaps[1]  # faster than linear
    assert gaps[3] <= 1e-10 * np.sum((Y - Y.mean(axis=0)) ** 2)


def test_newton_step_drops_a_group_that_its_full_step_carries_through_zero():
    # Orthonormal features: the solution is a group soft-threshold of X^T Y, so feature 1
    # (||X_1^T Y|| = 0.5 < penalty) is zero. From a point with a small feature 1 along X_1^T Y,
    # the full Newton step on the support {0, 1} carries feature 1 through zero, to -(0.3, 0.4);
    # that step with feature 1 at zero lowers the objective more, and is exact (feature 0 starts
    # on the ray of its solution, where the problem is quadratic).
    gram, xy, penalty = np.eye(2), np.array([[3.0, 4.0], [0.3, 0.4]]), 1.0
    solution = np.array([[3.0, 4.0], [0.0, 0.0]]) * (1 - penalty / 5.0)
    start = np.array([[1.5, 2.0], [0.03, 0.04]])
    polished = sklearn_craft._lasso_path._newton_step(gram, xy, start, penalty)
    np.testing.assert_allclose(polished, solution, atol=1e-12)
    assert np.all(polished[1] == 0)


def test_newton_step_retries_without_the_groups_its_full_step_carries_through_zero():
    # Two correlated features (rho = 0.9). Feature 1 is zero at the solution (||X_1^T R|| = 0.14
    # < penalty there), so feature 0 is the group soft-threshold of X_0^T Y. From half the
    # solution's feature 0 and a small feature 1, the full Newton step carries feature 1 through zero while
    # feature 0 compensates for it: zeroing feature 1 in that step does not descend, and
    # backtracking alone ends with feature 1 flipped. The step on the support without feature 1
    # is exact (feature 0 starts on the ray of its solution, where the problem is quadratic).
    gram, penalty = np.array([[1.0, 0.9], [0.9, 1.0]]), 1.0
    xy = np.array([[3.0, 4.0], [0.9 * 2.4 + 0.1, 0.9 * 3.2 - 0.1]])
    solution = np.array([[2.4, 3.2], [0.0, 0.0]])
    start = np.array([[1.2, 1.6], [0.2, 0.2]])
    without_retry = sklearn_craft._lasso_path._newton_step(gram, xy, start, penalty, retries=0)
    assert np.all(np.sign(without_retry[1]) == -np.sign(start[1]))
    polished = sklearn_craft._lasso_path._newton_step(gram, xy, start, penalty)
    np.testing.assert_allclose(polished, solution, atol=1e-12)
    assert np.all(polished[1] == 0)
    objective = sklearn_craft._lasso_path._objective
    assert objective(gram, xy, polished, penalty) < objective(gram, xy, without_retry, penalty)


def test_path_start_is_the_polynomial_in_log_alpha_through_the_last_solutions():
    # Each alpha starts from the line (two solutions) or parabola (three, sharing a support) in
    # log alpha through the last solutions: exact on a path that is such a polynomial.
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(3, 4, 2))
    log_alphas = np.log([1.0, 0.8, 0.5, 0.45])
    exact = [a + b * t + c * t**2 for t in log_alphas]
    extrapolate = sklearn_craft._lasso_path._extrapolate
    np.testing.assert_allclose(extrapolate(log_alphas, exact[:3]), exact[3], rtol=1e-12)
    line = [a + b * t for t in log_alphas]
    np.testing.assert_allclose(extrapolate(log_alphas[1:], line[1:3]), line[3], rtol=1e-12)
    # Two knots cannot follow the parabola's curvature.
    assert not np.allclose(extrapolate(log_alphas[1:], exact[1:3]), exact[3])


def test_newton_steps_follow_each_other_while_they_halve_the_gap(monkeypatch):
    # Where one Newton step leaves the gap above the tolerance but has at least halved it, the
    # next starts from the proximal-gradient point of its result (step NEWTON_PROX_STEP / L),
    # without proximal-gradient iterations in between.
    X, Y, stats, grid = _dense_collinear_problem()
    lasso_path = sklearn_craft._lasso_path
    calls, newton_step = [], lasso_path._newton_step

    def recording_newton_step(gram, xy, W, penalty, retries=1):
        polished = newton_step(gram, xy, W, penalty, retries)
        calls.append((gram, xy, penalty, W, polished))
        return polished

    monkeypatch.setattr(lasso_path, "_newton_step", recording_newton_step)
    coefs = lasso_path._solve_path(stats, grid, tol=1e-10)
    chained = 0
    for (*_, previous_out), (gram, xy, penalty, W, _) in itertools.pairwise(calls):
        if previous_out is None:
            continue
        step = lasso_path.NEWTON_PROX_STEP / np.linalg.eigvalsh(gram)[-1]
        prox = lasso_path._group_soft_threshold(previous_out - step * (gram @ previous_out - xy), step * penalty)
        chained += np.array_equal(W != 0, prox != 0) and np.allclose(W, prox, rtol=1e-9, atol=0)
    assert chained >= 5
    total = np.sum((Y - Y.mean(axis=0)) ** 2)
    for i, alpha in enumerate(grid):
        assert _multitask_gap(X, Y, coefs[:, :, i], alpha) <= 1e-10 * total


def test_newton_steps_from_the_prox_point_bring_a_missing_filter_in():
    # Orthonormal features: the solution is the group soft-threshold of X^T Y, both features
    # non-zero. From the solution without feature 1, Newton steps on that support cannot bring
    # it in; from the proximal-gradient point (of any step) feature 1 enters on the ray of its
    # solution, where the problem is quadratic, so one Newton step is exact.
    gram, xy, yy, penalty = np.eye(2), np.array([[3.0, 4.0], [1.2, 1.6]]), 30.0, 1.0
    solution = np.array([[2.4, 3.2], [0.6, 0.8]])
    start = np.array([[2.4, 3.2], [0.0, 0.0]])
    lasso_path = sklearn_craft._lasso_path
    gap = lasso_path._multitask_gaps(start[None], (gram @ start)[None], xy[None], np.array([yy]), np.array([penalty]))[0]
    assert gap > 1e-6 * yy
    on_support, support_gap = lasso_path._newton_steps(gram, xy, yy, start, penalty, gap, 1e-10)
    assert support_gap > 1e-6 * yy and (on_support is None or np.all(on_support[1] == 0))
    polished, polished_gap = lasso_path._newton_steps(gram, xy, yy, start, penalty, gap, 1e-10, lipschitz=1.0)
    np.testing.assert_allclose(polished, solution, atol=1e-12)
    assert polished_gap <= 1e-10 * yy


def test_multitask_path_solves_each_alpha_by_newton_steps_from_its_start(monkeypatch):
    # Orthonormal features: every solution is the group soft-threshold of X^T Y, on the rays of
    # X^T Y, where the problem is quadratic and the Newton steps from each alpha's start are exact.
    # After the first alphas (from zero, where the Newton steps have no support to start from), no
    # alpha takes a proximal-gradient iteration.
    rng = np.random.default_rng(0)
    n, p = 40, 6
    Z = rng.normal(size=(n, p))
    X = np.linalg.qr(Z - Z.mean(axis=0))[0]
    Y = X @ (rng.normal(size=(p, 3)) * np.linspace(3, 0.2, p)[:, None]) + 0.3 * rng.normal(size=(n, 3))
    Yc = Y - Y.mean(axis=0)
    lasso_path = sklearn_craft._lasso_path
    stats = lasso_path._moments(np.hstack([X, Yc]).T @ np.hstack([X, Yc]), n, X.mean(axis=0), p, False)
    grid = lasso_path._alpha_grid(stats, 20, 1e-2)
    thresholds, soft_threshold = [], lasso_path._group_soft_threshold

    def recording_soft_threshold(W, threshold):
        if W.ndim == 3:  # a proximal-gradient iteration (Newton's prox points are 2-D)
            thresholds.append(float(np.ravel(threshold)[0]))
        return soft_threshold(W, threshold)

    monkeypatch.setattr(lasso_path, "_group_soft_threshold", recording_soft_threshold)
    coefs = lasso_path._solve_path(stats, grid, tol=1e-12)
    xy = X.T @ Yc
    for i, alpha in enumerate(grid):
        exact = xy * np.maximum(1 - n * alpha / np.linalg.norm(xy, axis=1), 0)[:, None]
        np.testing.assert_allclose(coefs[:, :, i].T, exact, atol=1e-9)
    # The penalty n*alpha over L = 1 is each iteration's threshold: which alpha it belongs to.
    iterated = {int(np.argmin(np.abs(n * grid - t))) for t in thresholds}
    assert iterated and max(iterated) <= 2


# --------------------------------------------------------------------------- the selector


def test_selects_informative_features_per_group_and_reports_consistently():
    X, y = _regression(p=12, informative=(1, 2, 9), mixing=0.0)
    groups = np.repeat(["a", "b", "c"], 4)
    selector = LassoFilterSelector(groups=groups, random_state=0).fit(X, y)
    assert selector.knees_["group"].tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(selector.groups_, groups)
    assert np.flatnonzero(selector.support_[:4]).tolist() == [1, 2]
    assert np.flatnonzero(selector.support_[8:]).tolist() == [1]
    np.testing.assert_array_equal(_group_sizes(selector), selector.knees_["n_selected"])
    # coef_ is the knee's coefficients: non-zero exactly on the support (gamma > 0)...
    np.testing.assert_array_equal(selector.coef_ != 0, selector.support_ & (selector.coef_ != 0))
    np.testing.assert_array_equal(selector.coef_[[1, 2, 9]] != 0, True)
    # ... and the curves are those of characteristic_curve on each group.
    for group, cols in (("a", slice(0, 4)), ("c", slice(8, 12))):
        curve, coefs = characteristic_curve(X[:, cols], y, random_state=0)
        own = selector.curves_[selector.curves_["group"] == group].drop(columns="group").reset_index(drop=True)
        pd.testing.assert_frame_equal(own, curve, check_exact=False, rtol=1e-9)
        knee = np.argmin(np.abs(curve["alpha"] - selector.knees_.set_index("group").loc[group, "alpha"]))
        np.testing.assert_allclose(selector.coef_[cols], coefs[:, knee], rtol=1e-9)
    np.testing.assert_array_equal(selector.transform(X), X[:, selector.support_])


def test_gamma_trades_filters_for_error():
    X, y = _regression(p=16, informative=(0, 3, 5, 8, 11), noise=1.0)
    groups = np.repeat([0, 1], 8)
    sizes = [
        LassoFilterSelector(gamma=gamma, groups=groups, random_state=0).fit(X, y).knees_["n_selected"]
        for gamma in (0.0, 0.001, 0.01, 0.1, 0.5, 1.0)
    ]
    for larger, smaller in zip(sizes, sizes[1:]):
        assert (larger >= smaller).all()
    assert sizes[0].tolist() == [8, 8]  # gamma=0 keeps every filter
    # gamma=1: the sparsest point of the path with a filter.
    curves = LassoFilterSelector(groups=groups, random_state=0).fit(X, y).curves_
    sparsest = curves[curves["n_selected"] > 0].groupby("group")["n_selected"].min()
    np.testing.assert_array_equal(sizes[-1], sparsest)


def test_gamma_zero_keeps_everything_with_the_least_regularised_coefficients():
    X, y = _regression()
    selector = LassoFilterSelector(gamma=0, alphas=20, random_state=0).fit(X, y)
    assert selector.support_.all()
    assert selector.knees_["alpha"].iloc[0] == selector.curves_["alpha"].iloc[-1]
    _, coefs = characteristic_curve(X, y, alphas=20, random_state=0)
    np.testing.assert_allclose(selector.coef_, coefs[:, -1], rtol=1e-9, atol=1e-12)


def test_constant_group_keeps_one_filter_and_explicit_alphas_above_alpha_max():
    X, y = _regression(p=6, informative=(0, 4))
    X[:, 3:] = 2.0
    selector = LassoFilterSelector(groups=[0, 0, 0, 1, 1, 1], alphas=10, random_state=0).fit(X, y)
    assert selector.support_[3:].sum() == 1
    assert (selector.coef_[3:] == 0).all()
    # Every alpha zeroes every coefficient: the first feature to enter the path is kept.
    big = LassoFilterSelector(alphas=[1e6, 1e7], random_state=0).fit(X[:, :3], y)
    correlations = np.abs(StandardScaler().fit_transform(X[:, :3]).T @ (y - y.mean()))
    assert np.flatnonzero(big.support_).tolist() == [int(np.argmax(correlations))]


def test_standardize_makes_selection_scale_free_and_coef_original_scale():
    X, y = _regression(p=8, informative=(2, 5))
    scaled = X.copy()
    scaled[:, 2] *= 1000.0
    a = LassoFilterSelector(random_state=0).fit(X, y)
    b = LassoFilterSelector(random_state=0).fit(scaled, y)
    np.testing.assert_array_equal(a.support_, b.support_)
    np.testing.assert_allclose(b.coef_[2] * 1000.0, a.coef_[2], rtol=1e-6)
    np.testing.assert_allclose(b.curves_["rmse"], a.curves_["rmse"], rtol=1e-6)


def test_auto_groups_from_feature_names():
    X, y = _regression(p=6, informative=(1, 4))
    names = ["conv1:0", "conv1:1", "conv1:2", "block.conv2:0", "block.conv2:1", "block.conv2:2"]
    selector = LassoFilterSelector(random_state=0).fit(pd.DataFrame(X, columns=names), y)
    assert selector.knees_["group"].tolist() == ["conv1", "block.conv2"]
    assert set(selector.get_feature_names_out()) <= set(names)
    # Without names (or with names that are not layer:channel), one group.
    assert LassoFilterSelector(random_state=0).fit(X, y).knees_["group"].tolist() == ["all"]
    plain = pd.DataFrame(X, columns=[f"f{i}" for i in range(6)])
    assert LassoFilterSelector(random_state=0).fit(plain, y).knees_["group"].tolist() == ["all"]


@pytest.mark.parametrize(
    "labels",
    [
        lambda signal: np.where(signal > 0, "yes", "no"),
        lambda signal: signal > 0,
    ],
)
def test_binary_labels(labels):
    X, signal = _regression(n=400, p=8, informative=(1, 6), noise=0.0, mixing=0.0)
    y = labels(signal - np.median(signal))
    # A 0/1 target leaves a large residual, which more filters fit a little: a looser gamma.
    selector = LassoFilterSelector(gamma=0.05, random_state=0).fit(X, y)
    assert selector.coef_.shape == (8,)
    assert np.flatnonzero(selector.support_).tolist() == [1, 6]


def test_multiclass_labels_select_jointly():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 8))
    scores = np.column_stack([X[:, 0], X[:, 3], -X[:, 0] - X[:, 3]])
    y = np.array(["cat", "dog", "fox"])[scores.argmax(axis=1)]
    selector = LassoFilterSelector(random_state=0).fit(X, y)
    assert selector.coef_.shape == (3, 8)
    assert np.flatnonzero(selector.support_).tolist() == [0, 3]
    np.testing.assert_array_equal(np.any(selector.coef_ != 0, axis=0), selector.support_)


def test_multi_output_selects_the_union():
    X, _ = _regression(n=400, p=10)
    rng = np.random.default_rng(0)
    Y = np.column_stack([X[:, 2], X[:, 7] - X[:, 2]]) + 0.05 * rng.normal(size=(400, 2))
    selector = LassoFilterSelector(random_state=0).fit(X, Y)
    assert selector.coef_.shape == (2, 10)
    assert np.flatnonzero(selector.support_).tolist() == [2, 7]


def test_stratified_validation_split_for_labels():
    labels = np.array(["a"] * 80 + ["b"] * 20)
    [(train, test)] = sklearn_craft.selection._held_out_splits(100, labels, 0.25, None, 0)
    assert (labels[test] == "b").sum() == 5
    assert sorted(np.r_[train, test].tolist()) == list(range(100))


def test_int_cv_is_stratified_for_labels():
    X, signal = _regression(n=150, p=6, informative=(0, 3), mixing=0.0)
    y = np.where(signal > np.quantile(signal, 0.8), "rare", "common")
    by_int, _ = characteristic_curve(X, y, alphas=10, cv=3)
    stratified, _ = characteristic_curve(X, y, alphas=10, cv=StratifiedKFold(3))
    unstratified, _ = characteristic_curve(X, y, alphas=10, cv=KFold(3))
    pd.testing.assert_frame_equal(by_int, stratified)
    assert not np.allclose(by_int["rmse"], unstratified["rmse"])


def test_n_jobs_gives_identical_results():
    X, y = _regression(p=12)
    groups = np.repeat([0, 1, 2], 4)
    serial = LassoFilterSelector(groups=groups, random_state=0).fit(X, y)
    parallel = LassoFilterSelector(groups=groups, random_state=0, n_jobs=2).fit(X, y)
    pd.testing.assert_frame_equal(serial.curves_, parallel.curves_)
    np.testing.assert_array_equal(serial.coef_, parallel.coef_)


def test_memory_recomputes_only_the_knee(tmp_path, monkeypatch):
    calls = []

    lars_path_gram = sklearn_craft._lasso_path.lars_path_gram

    def counting_lars_path_gram(*args, **kwargs):
        calls.append(1)
        return lars_path_gram(*args, **kwargs)

    monkeypatch.setattr(sklearn_craft._lasso_path, "lars_path_gram", counting_lars_path_gram)
    X, y = _regression(p=9)
    groups = np.repeat([0, 1, 2], 3)
    memory = joblib.Memory(str(tmp_path), verbose=0)
    first = LassoFilterSelector(gamma=0.5, groups=groups, random_state=0, memory=memory).fit(X, y)
    assert len(calls) == 3 * 2  # per group: all samples, and the training part
    second = LassoFilterSelector(gamma=0.01, groups=groups, random_state=0, memory=str(tmp_path)).fit(X, y)
    assert len(calls) == 6
    fresh = LassoFilterSelector(gamma=0.01, groups=groups, random_state=0).fit(X, y)
    assert len(calls) == 12
    pd.testing.assert_frame_equal(second.knees_, fresh.knees_)
    np.testing.assert_array_equal(second.coef_, fresh.coef_)
    pd.testing.assert_frame_equal(first.curves_, second.curves_)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": -0.01}, "gamma"),
        ({"alphas": 0}, "alphas"),
        ({"alphas": [0.1, -1.0]}, "alphas must be an int or a non-empty 1-D array of positive"),
        ({"alphas": [[0.1, 0.2]]}, "alphas must be an int or a non-empty 1-D array"),
        ({"alphas": []}, "alphas must be an int or a non-empty 1-D array"),
        ({"alphas": [0.1, np.nan]}, "alphas must be an int or a non-empty 1-D array"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 1.0}, "eps"),
        ({"validation_fraction": 0.0}, "validation_fraction"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"cv": 1}, "cv"),
        ({"groups": "layer"}, "groups"),
        ({"groups": [0, 1]}, r"groups must hold one label per feature \(10,\), got shape \(2,\)"),
        ({"groups": np.zeros((10, 1))}, "groups must hold one label per feature"),
        ({"memory": 3}, "memory"),
    ],
)
def test_bad_parameters(params, match):
    X, y = _regression()
    with pytest.raises(ValueError, match=match):
        LassoFilterSelector(**params).fit(X, y)


def test_bad_data():
    X, y = _regression()
    selector = LassoFilterSelector()
    with pytest.raises(ValueError, match="NaN"):
        selector.fit(np.where(np.eye(300, 10, dtype=bool), np.nan, X), y)
    with pytest.raises(ValueError, match="infinity|NaN"):
        selector.fit(X, np.where(np.arange(300) == 5, np.inf, y))
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        selector.fit(X, y[:-1])
    with pytest.raises(ValueError, match="constant target"):
        selector.fit(X, np.ones(300))
    with pytest.raises(ValueError, match="constant target"):
        selector.fit(X, np.array(["same"] * 300))
    with pytest.raises(ValueError, match="requires y"):
        selector.fit(X, None)
    with pytest.raises(NotFittedError):
        LassoFilterSelector().transform(X)
    with pytest.raises(ValueError, match="10 features"):
        LassoFilterSelector(alphas=5).fit(X, y).transform(X[:, :4])


# --------------------------------------------------------------------------- with a network


def _planted_net(seed=0):
    torch.manual_seed(seed)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU()
    )
    # Unit-variance weights: pooled responses large enough for RidgeCV's default penalties.
    for module in features:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight)
    return nn.Sequential(OrderedDict(features=features))


@pytest.fixture(scope="module")
def planted():
    """Images, a small conv net, and a target made of three filters of its first layer."""
    rng = np.random.default_rng(0)
    # Noise images: their pooled responses are far from collinear, so the planted filters are
    # identifiable (per-image colour would put all of a layer's responses near a 3-D subspace).
    images = rng.integers(0, 256, size=(240, 12, 12, 3), dtype=np.uint8)
    model = _planted_net()
    pooled = ActivationPooler(model, layers=["features.0"]).set_output(transform="pandas").fit_transform(images)
    channels = ["features.0:1", "features.0:4", "features.0:6"]
    y = pooled[channels].to_numpy() @ np.array([1.0, -2.0, 1.5])
    y = y + 0.01 * y.std() * rng.normal(size=len(y))
    return images, model, y, channels


def test_planted_filters_are_recovered(planted):
    images, model, y, channels = planted
    features = ActivationPooler(model).set_output(transform="pandas").fit_transform(images)
    selector = LassoFilterSelector(random_state=0).fit(features, y)
    assert selector.knees_["group"].tolist() == ["features.0", "features.2", "features.4"]
    selected = selector.get_feature_names_out()
    assert [name for name in selected if name.startswith("features.0:")] == channels


def test_pipeline_grid_search_over_gamma(planted):
    images, model, y, channels = planted
    pipe = make_pipeline(ActivationPooler(model, layers=["features.0"]), LassoFilterSelector(random_state=0), RidgeCV())
    search = GridSearchCV(pipe, {"lassofilterselector__gamma": [0.001, 0.01, 0.1]}, cv=3).fit(images, y)
    assert len(search.cv_results_["params"]) == 3
    assert np.min(search.cv_results_["mean_test_score"]) > 0.99
    selector = search.best_estimator_.named_steps["lassofilterselector"]
    np.testing.assert_array_equal(np.flatnonzero(selector.support_), [1, 4, 6])


def test_pandas_pipeline_groups_by_layer(planted):
    images, model, y, channels = planted
    layers = ["features.0", "features.2", "features.4"]
    pipe = make_pipeline(ActivationPooler(model, layers=layers), LassoFilterSelector(random_state=0), RidgeCV())
    pipe.set_output(transform="pandas")
    search = GridSearchCV(pipe, {"lassofilterselector__gamma": [0.001, 0.01, 0.1]}, cv=3).fit(images, y)
    pooler, selector, _ = search.best_estimator_.named_steps.values()
    assert selector.knees_["group"].tolist() == pooler.layers_ == layers
    np.testing.assert_array_equal(selector.groups_, [name.split(":")[0] for name in pooler.get_feature_names_out()])
    np.testing.assert_array_equal(_group_sizes(selector), selector.knees_["n_selected"])
    selected = search.best_estimator_[:-1].transform(images)
    assert isinstance(selected, pd.DataFrame)
    assert [c for c in selected.columns if c.startswith("features.0:")] == channels


def test_solver_convergence_warnings_are_folded_into_one_per_fit(monkeypatch):
    # Nearly collinear responses (ReLU of 3 factors), two targets: without its Newton steps the
    # proximal gradient stops at its iteration limit at small alphas.
    monkeypatch.setattr(sklearn_craft._lasso_path, "_newton_step", lambda *args: None)
    rng = np.random.default_rng(0)
    factors = rng.normal(size=(200, 3))
    X = np.maximum(factors @ rng.normal(size=(3, 150)), 0) + 1e-3 * rng.normal(size=(200, 150))
    Y = factors[:, :2] + 0.5 * rng.normal(size=(200, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LassoFilterSelector(gamma=0.01, groups=np.repeat(["a", "b"], 75), random_state=0).fit(X, Y)
    assert len(caught) == 1 and issubclass(caught[0].category, ConvergenceWarning)
    assert re.search(r"at \d+ of 400 \(path, alpha\) fits", str(caught[0].message))


def _fitted_state(estimator):
    return {name: value for name, value in vars(estimator).items() if name.endswith("_") and not name.startswith("_")}


@pytest.mark.parametrize(
    "params, y_of, error, match",
    [
        ({}, lambda y: np.where(np.arange(len(y)) == 3, np.nan, y), ValueError, "y contains NaN"),
        ({}, lambda y: np.zeros_like(y), ValueError, "constant"),
        ({"alphas": [0.1, -1.0]}, lambda y: y, ValueError, "alphas must be"),
        ({"groups": [0, 1]}, lambda y: y, ValueError, "groups must hold one label per feature"),
        ({"cv": 1000}, lambda y: y, ValueError, "n_splits=1000"),
    ],
    ids=["nan_y", "constant_y", "alphas", "groups", "cv"],
)
def test_failed_fit_leaves_nothing_fitted_and_a_failed_refit_keeps_the_previous_fit(params, y_of, error, match):
    X, y = _regression(n=60, p=8)
    X = pd.DataFrame(X, columns=[f"conv:{i}" for i in range(8)])
    fresh = LassoFilterSelector(**{"alphas": 10, "random_state": 0, **params})
    with pytest.raises(error, match=match):
        fresh.fit(X, y_of(y))
    assert not _fitted_state(fresh)
    with pytest.raises(NotFittedError):
        fresh.get_support()

    fitted = LassoFilterSelector(alphas=10, random_state=0).fit(X, y)
    before = _fitted_state(fitted)
    with pytest.raises(error, match=match):
        fitted.set_params(**params).fit(X.to_numpy(), y_of(y))
    after = _fitted_state(fitted)
    assert after.keys() == before.keys() and all(after[name] is value for name, value in before.items())
    assert fitted.transform(X).shape == (60, fitted.support_.sum())


def _repeated(X, y, weights, splits):
    """Every sample repeated ``weights[i]`` times, and the splits mapped onto the repeated rows."""
    rows = np.repeat(np.arange(len(X)), weights)
    where = {i: np.flatnonzero(rows == i) for i in range(len(X))}
    mapped = [tuple(np.concatenate([where[i] for i in part]) for part in split) for split in splits]
    return X[rows], y[rows], mapped


@pytest.mark.parametrize("kind", ["continuous", "multiclass"])
def test_sample_weight_is_repeating_samples(kind):
    X, y = _regression(n=90, p=8)
    if kind == "multiclass":
        y = np.digitize(y, np.quantile(y, [1 / 3, 2 / 3]))
    weights = np.random.default_rng(1).integers(0, 3, size=len(X))
    splits = list(KFold(3, shuffle=True, random_state=0).split(X))
    weighted = LassoFilterSelector(alphas=15, groups=[0] * 4 + [1] * 4, cv=splits).fit(X, y, sample_weight=weights)
    X_rep, y_rep, rep_splits = _repeated(X, y, weights, splits)
    repeated = LassoFilterSelector(alphas=15, groups=[0] * 4 + [1] * 4, cv=rep_splits).fit(X_rep, y_rep)
    np.testing.assert_array_equal(weighted.support_, repeated.support_)
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, rtol=1e-6, atol=1e-9)
    pd.testing.assert_frame_equal(weighted.curves_, repeated.curves_, check_exact=False, rtol=1e-6)
    # Weights of one change nothing.
    ones = LassoFilterSelector(alphas=15, groups=[0] * 4 + [1] * 4, cv=splits).fit(X, y, sample_weight=np.ones(len(X)))
    plain = LassoFilterSelector(alphas=15, groups=[0] * 4 + [1] * 4, cv=splits).fit(X, y)
    pd.testing.assert_frame_equal(ones.curves_, plain.curves_)


def test_bad_sample_weight_is_rejected_before_anything_is_fitted():
    X, y = _regression(n=40, p=8)
    splits = [(np.arange(20), np.arange(20, 40))]
    for weights, error, match in [
        (np.ones(39), ValueError, "sample_weight.shape"),
        (-np.ones(40), ValueError, "Negative values in data passed to `sample_weight`"),
        (np.r_[np.ones(20), np.zeros(20)], ValueError, "positive total weight to both parts"),
    ]:
        selector = LassoFilterSelector(alphas=5, cv=splits)
        with pytest.raises(error, match=match):
            selector.fit(X, y, sample_weight=weights)
        assert not _fitted_state(selector)


# --------------------------------------------------------------------------- groups solved together


def _correlated_classes(n=240, widths=(12, 12, 12, 6), n_classes=4, seed=0):
    """Responses of a few layers sharing latent factors (ReLU, strongly correlated) and class
    labels driven by two factors: multi-task paths whose support grows over many alphas."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 4))
    X = np.hstack([np.maximum(factors @ rng.normal(size=(4, w)) + 0.5 * rng.normal(size=(n, w)), 0) for w in widths])
    y = np.argmax(factors[:, :2] @ rng.normal(size=(2, n_classes)) + 0.7 * rng.normal(size=(n, n_classes)), axis=1)
    return X, y, np.repeat(np.arange(len(widths)), widths)


def test_groups_solved_together_give_each_group_its_own_path():
    # The selector solves the paths of groups of one width side by side; every group's curve
    # and path must be exactly what it gets alone, and its all-sample path exactly the path of
    # that one problem solved alone (one alpha after the other).
    X, y, groups = _correlated_classes()
    Y = encode_target(y)[0]
    splits = sklearn_craft.selection._held_out_splits(len(X), y, 0.25, None, 0)
    blocks = [np.ascontiguousarray(X[:, groups == g]) for g in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        together = sklearn_craft._lasso_path._group_paths(blocks, Y, splits, 30, 1e-4, True)
        for block, (curve, coefs) in zip(blocks, together):
            ((alone_curve, alone_coefs),) = sklearn_craft._lasso_path._group_paths([block], Y, splits, 30, 1e-4, True)
            pd.testing.assert_frame_equal(curve, alone_curve, check_exact=True)
            np.testing.assert_array_equal(coefs, alone_coefs)
            assert curve["n_selected"].nunique() >= 4  # a nontrivial path
        grid, parts, _ = sklearn_craft._lasso_path._group_problems(blocks[0], Y, splits, 30, 1e-4, True)
        np.testing.assert_array_equal(sklearn_craft._lasso_path._solve_path(parts[0], grid), together[0][1])


def test_batches_of_groups_cover_every_group_once_by_width():
    widths = [64, 64, 128, 64, 128] + [32] * 10
    batches = sklearn_craft.selection._batches(widths, size=4)
    assert sorted(g for batch in batches for g in batch) == list(range(len(widths)))
    assert all(len(batch) <= 4 and len({widths[g] for g in batch}) == 1 for batch in batches)
    X, y, groups = _correlated_classes(widths=(6, 6, 4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        serial = LassoFilterSelector(groups=groups, alphas=20, random_state=0).fit(X, y)
        parallel = LassoFilterSelector(groups=groups, alphas=20, random_state=0, n_jobs=2).fit(X, y)
    pd.testing.assert_frame_equal(serial.curves_, parallel.curves_, check_exact=True)
    np.testing.assert_array_equal(serial.coef_, parallel.coef_)


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_counts_groups_on_stderr(progress, capsys):
    X, y, groups = _correlated_classes(n=80, widths=(4, 4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        LassoFilterSelector(groups=groups, alphas=5, random_state=0, progress=progress).fit(X, y)
    captured = capsys.readouterr()
    assert captured.out == ""
    if progress:
        assert "LASSO paths" in captured.err and "3/3" in captured.err
    else:
        assert captured.err == ""


def _streamed(selector, X, y, sizes, sample_weight=None, classes=None):
    """``selector`` after partial_fit on consecutive chunks of ``sizes`` rows (cycled)."""
    start, k = 0, 0
    while start < len(X):
        stop = start + sizes[k % len(sizes)]
        weights = None if sample_weight is None else sample_weight[start:stop]
        selector.partial_fit(X[start:stop], y[start:stop], sample_weight=weights, classes=classes)
        start, k = stop, k + 1
    return selector


def _streamed_splits(selector, n_samples):
    """The (train, test) pairs partial_fit held out, as explicit splits for fit."""
    stream = selector._stream_
    masks = sklearn_craft.selection._streamed_held_out(
        np.arange(n_samples), stream["seed"], stream["validation_fraction"], stream["cv"]
    )
    return [(np.flatnonzero(~mask), np.flatnonzero(mask)) for mask in masks.T]


def _assert_same_selection(streamed, fitted, rtol=1e-7):
    np.testing.assert_array_equal(streamed.support_, fitted.support_)
    np.testing.assert_array_equal(streamed.knees_["n_selected"], fitted.knees_["n_selected"])
    # At α_max itself the first filter sits exactly on the threshold of entering: rounding decides.
    inside = streamed.curves_["alpha"] < streamed.curves_.groupby("group")["alpha"].transform("max")
    np.testing.assert_array_equal(streamed.curves_["n_selected"][inside], fitted.curves_["n_selected"][inside])
    for column in ("alpha", "rmse"):
        np.testing.assert_allclose(streamed.curves_[column], fitted.curves_[column], rtol=rtol)
        np.testing.assert_allclose(streamed.knees_[column], fitted.knees_[column], rtol=rtol)
    np.testing.assert_allclose(streamed.coef_, fitted.coef_, rtol=rtol, atol=1e-10)


@pytest.mark.parametrize("target", ["continuous", "multiclass", "multioutput"])
@pytest.mark.parametrize("weighted", [False, True])
def test_partial_fit_selects_as_fit_on_the_concatenated_chunks(target, weighted):
    # The cross-products accumulated chunk by chunk (float32 responses, a shift taken from the
    # first chunk) give the curves, knees and coefficients fit computes on all the data at once,
    # with the validation split partial_fit drew sample by sample.
    X, y, groups = _correlated_classes(n=400, widths=(6, 6, 4))
    X = (X + 50.0).astype(np.float32)  # far from zero: naive uncentred sums would lose digits
    if target == "continuous":
        y = X[:, 1] - 0.5 * X[:, 8] + np.random.default_rng(1).normal(size=len(X))
    elif target == "multioutput":
        y = np.column_stack([X[:, 1] - X[:, 13], X[:, 7]]).astype(np.float64)
    weights = np.random.default_rng(2).uniform(0.2, 3.0, size=len(X)) if weighted else None
    classes = np.unique(y) if target == "multiclass" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        streamed = _streamed(
            LassoFilterSelector(groups=groups, alphas=20, random_state=0), X, y, [97, 3, 150], weights, classes
        )
        fitted = LassoFilterSelector(groups=groups, alphas=20, cv=_streamed_splits(streamed, len(X))).fit(
            X, y, sample_weight=weights
        )
        _assert_same_selection(streamed, fitted)
    assert streamed.n_samples_seen_ == len(X) and streamed.n_features_in_ == X.shape[1]
    assert fitted.curves_["n_selected"].nunique() >= 3  # nontrivial paths


def test_partial_fit_does_not_depend_on_the_chunk_sizes_and_folds_per_sample():
    X, y = _regression(n=300)
    groups = [0] * 5 + [1] * 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        one = LassoFilterSelector(groups=groups, alphas=15, cv=3, random_state=4).partial_fit(X, y)
        many = _streamed(LassoFilterSelector(groups=groups, alphas=15, cv=3, random_state=4), X, y, [1, 64, 17])
        splits = _streamed_splits(many, len(X))
        assert len(splits) == 3 and sorted(np.concatenate([test for _, test in splits]).tolist()) == list(range(300))
        _assert_same_selection(many, one, rtol=1e-9)
        _assert_same_selection(many, LassoFilterSelector(groups=groups, alphas=15, cv=splits).fit(X, y))
    # The held-out share is validation_fraction in expectation, and the seed comes from random_state.
    masks = [_streamed_splits(LassoFilterSelector(random_state=seed).partial_fit(X, y), 20_000) for seed in (0, 1)]
    assert abs(len(masks[0][0][1]) / 20_000 - 0.25) < 0.01
    assert not np.array_equal(masks[0][0][1], masks[1][0][1])


def test_partial_fit_keeps_float32_chunks_and_computes_the_selection_when_read():
    X, y = _regression(n=200)
    X32 = X.astype(np.float32)
    selector = LassoFilterSelector(alphas=10, random_state=0).partial_fit(X32[:100], y[:100])
    assert "support_" not in vars(selector) and "knees_" not in vars(selector)
    first = selector.get_support().copy()
    assert "support_" in vars(selector) and "curves_" in vars(selector)
    selector.partial_fit(X32[100:], y[100:])
    assert "support_" not in vars(selector)  # new data: the selection is recomputed when read
    as64 = _streamed(LassoFilterSelector(alphas=10, random_state=0), X32.astype(np.float64), y, [100])
    pd.testing.assert_frame_equal(selector.curves_, as64.curves_, check_exact=True)
    assert selector.transform(X32).dtype == np.float32 and first.shape == (10,)
    # fit forgets what was streamed; partial_fit then starts a new stream.
    selector.fit(X, y)
    assert "_stream_" not in vars(selector) and not hasattr(selector, "n_samples_seen_")
    assert selector.partial_fit(X[:50], y[:50]).n_samples_seen_ == 50


def test_partial_fit_paths_are_cached_by_memory(tmp_path):
    X, y = _regression(n=200)
    kwargs = dict(alphas=10, random_state=0, memory=str(tmp_path))
    first = _streamed(LassoFilterSelector(**kwargs), X, y, [80])
    first.support_
    entries = sorted(tmp_path.rglob("*.npz"))
    assert len(entries) == 1
    again = _streamed(LassoFilterSelector(**kwargs), X, y, [80])
    pd.testing.assert_frame_equal(again.curves_, first.curves_, check_exact=True)
    assert sorted(tmp_path.rglob("*.npz")) == entries


def test_partial_fit_refuses_what_cannot_stream():
    X, y = _regression(n=60)
    labels = np.where(y > np.median(y), "high", "low")
    with pytest.raises(ValueError, match="partial_fit needs cv=None .* got cv=KFold"):
        LassoFilterSelector(cv=KFold(3)).partial_fit(X, y)
    selector = LassoFilterSelector().partial_fit(X[:30], labels[:30], classes=["high", "low"])
    with pytest.raises(ValueError, match=r"labels \['mid'\] that are not in classes \['high', 'low'\]"):
        selector.partial_fit(X[30:31], np.array(["mid"]))
    with pytest.raises(ValueError, match="classes must be those of the first partial_fit call"):
        selector.partial_fit(X[30:], labels[30:], classes=["a", "b"])
    with pytest.raises(ValueError, match="X has 3 features, but LassoFilterSelector is expecting 10"):
        selector.partial_fit(X[30:, :3], labels[30:])
    assert selector.n_samples_seen_ == 30  # refused chunks leave the stream as it was
    with pytest.raises(ValueError, match="classes is for class labels"):
        LassoFilterSelector().partial_fit(X, y, classes=[0, 1])
    with pytest.raises(ValueError, match="classes must hold at least 2 labels"):
        LassoFilterSelector().partial_fit(X[:5], np.array(["low"] * 5))
    with pytest.raises(ValueError, match="y must vary across samples"):
        LassoFilterSelector().partial_fit(X, np.ones(len(X))).get_support()
    with pytest.raises(AttributeError, match="has no attribute 'support_'"):
        LassoFilterSelector().support_
