"""Satellites: the linear models that read a task from one layer's pooled filter responses.

The Low-cost transfer learning paper probes a network with a *satellite* per layer: a linear
model on the layer's global-average-pooled responses. The same model is the head of a network
pruned by :class:`~sklearn_craft.pruner.CraftPruner` (folded into an ``nn.Linear`` by
:func:`satellite_head`) and the probe behind every cell of the task-relationship matrices of
:mod:`sklearn_craft.relationships`. It is defined once, here, for every kind of target of
:mod:`sklearn_craft.targets`:

========================== ==================================================================
kind                       linear model, after centring the responses
========================== ==================================================================
continuous(-multioutput)   ridge regression
binary, multilabel         ridge regression to 0/1, threshold chosen on the training samples
multiclass                 one-vs-rest ridge classification (``RidgeClassifierCV``)
ordinal                    ridge regression of the class codes, rounded to the nearest code
========================== ==================================================================

The ridge penalty is chosen among :data:`ALPHAS` by efficient leave-one-out on the training
samples, because a pooled layer often has as many filters as the task has images, where
unpenalised least squares interpolates. Responses are centred but not scaled: with per-feature
standardisation a filter whose response barely varies on the training images (a standard
deviation of 1e-7, common in a layer whose inputs were pruned away) can take a weight of 1e7,
and the smallest change of that filter during fine-tuning then swamps the head's output; on raw
responses the ridge penalty keeps such a filter's weight small. Every satellite's decision is
linear in the responses (:func:`satellite_decision`), so it can become a network's last layer.
"""

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import RidgeClassifierCV, RidgeCV
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import LabelBinarizer, StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._lasso_path import _centred_sums, _held_out_rmse, _split_parts
from .targets import TARGET_KINDS

__all__ = [
    "ALPHAS",
    "fit_layer_satellites",
    "fit_satellite",
    "make_satellite",
    "satellite_decision",
    "satellite_head",
]

#: Ridge penalties tried, by efficient leave-one-out, for every satellite.
ALPHAS = np.logspace(-3, 5, 17)


def _best_threshold(scores, y, sample_weight=None):
    """Threshold on ``scores`` maximising the (weighted) accuracy of ``scores > threshold`` against 0/1 ``y``.

    Ties are broken towards 0.5, the natural threshold of a 0/1 regression.
    """
    order = np.argsort(scores, kind="stable")
    s, t = scores[order], y[order]
    w = np.ones(len(s)) if sample_weight is None else sample_weight[order]
    n = len(s)
    # A cut at position i predicts 0 for s[:i] and 1 for s[i:].
    zeros_below = np.concatenate([[0], np.cumsum(w * (t == 0))])
    ones_above = np.sum(w * t) - np.concatenate([[0], np.cumsum(w * t)])
    correct = zeros_below + ones_above
    cuts = np.arange(n + 1)
    valid = (cuts == 0) | (cuts == n)
    valid[1:n] = s[1:] > s[:-1]
    thresholds = np.full(n + 1, np.nan)
    thresholds[0], thresholds[n] = -np.inf, np.inf
    thresholds[1:n] = (s[:-1] + s[1:]) / 2
    best = valid & (correct == correct[valid].max())
    candidates = thresholds[best]
    return candidates[np.argmin(np.abs(candidates - 0.5))]


class _ThresholdedRidge(ClassifierMixin, BaseEstimator):
    """Ridge regression to 0/1 indicators, turned into labels by a threshold fitted per label.

    ``y`` is a 1-D array of two classes (``classes_[1]`` is the positive one) or a 0/1 matrix of
    labels (``classes_`` then numbers the labels and ``predict`` returns a 0/1 matrix). The
    decision is ``X @ coef_.T + intercept_``, positive for the positive class: the threshold is
    folded into the intercept. A threshold beyond every training score (one class always wins)
    is clipped to the scores' range so that the decision stays finite.
    """

    def __init__(self, alphas=ALPHAS):
        self.alphas = alphas

    def fit(self, X, y, sample_weight=None):
        y = np.asarray(y)
        if y.ndim == 2:
            self.classes_ = np.arange(y.shape[1])
            target = y.astype(float)
        else:
            self.classes_ = np.unique(y)
            if len(self.classes_) != 2:
                raise ValueError(f"a binary satellite needs two classes, got {len(self.classes_)}")
            target = (y == self.classes_[1]).astype(float)
        ridge = RidgeCV(alphas=self.alphas, alpha_per_target=target.ndim == 2).fit(X, target, sample_weight)
        fitted = ridge.predict(X).reshape(len(X), -1)
        columns = target.reshape(len(X), -1)
        weights = None if sample_weight is None else np.asarray(sample_weight, dtype=float)
        thresholds = np.array(
            [_best_threshold(fitted[:, j], columns[:, j], weights) for j in range(columns.shape[1])]
        )
        thresholds = np.clip(thresholds, fitted.min(axis=0) - 1, fitted.max(axis=0) + 1)
        self.coef_ = ridge.coef_
        self.intercept_ = ridge.intercept_ - (thresholds if target.ndim == 2 else thresholds[0])
        self.alpha_ = ridge.alpha_
        return self

    def decision_function(self, X):
        check_is_fitted(self)
        return np.asarray(X) @ np.asarray(self.coef_).T + self.intercept_

    def predict(self, X):
        positive = self.decision_function(X) > 0
        if positive.ndim == 2:
            return positive.astype(int)
        return self.classes_[positive.astype(int)]


class _RoundedRidge(ClassifierMixin, BaseEstimator):
    """Ridge regression of ordinal class codes, rounded to the nearest code in ``[0, n_classes)``."""

    def __init__(self, n_classes, alphas=ALPHAS):
        self.n_classes = n_classes
        self.alphas = alphas

    def fit(self, X, y, sample_weight=None):
        ridge = RidgeCV(alphas=self.alphas).fit(X, np.asarray(y, dtype=float), sample_weight)
        self.classes_ = np.arange(self.n_classes)
        self.coef_, self.intercept_, self.alpha_ = ridge.coef_, ridge.intercept_, ridge.alpha_
        return self

    def decision_function(self, X):
        check_is_fitted(self)
        return np.asarray(X) @ self.coef_ + self.intercept_

    def predict(self, X):
        return np.clip(np.rint(self.decision_function(X)), 0, self.n_classes - 1).astype(int)


def make_satellite(kind, *, n_classes=None):
    """Unfitted satellite for a target kind: centring, then the linear model of that kind.

    Parameters
    ----------
    kind : str
        One of :data:`sklearn_craft.targets.TARGET_KINDS`.
    n_classes : int, default=None
        Number of classes; needed (and only used) for ``"ordinal"``, whose predictions are
        rounded into ``[0, n_classes)``.

    Returns
    -------
    satellite : sklearn.pipeline.Pipeline
        ``StandardScaler(with_std=False)`` then the linear model of the table above. Classifiers
        take class labels (or a 0/1 matrix for ``"multilabel-indicator"``); the ordinal one takes
        class codes 0..n_classes-1.

    Raises
    ------
    ValueError
        If ``kind`` is unknown, or ``n_classes`` is missing for ``"ordinal"``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_craft.satellites import make_satellite
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(100, 5))
    >>> y = np.where(X[:, 0] > 0, "smile", "neutral")
    >>> make_satellite("binary").fit(X, y).score(X, y) > 0.9
    True
    """
    if kind not in TARGET_KINDS:
        raise ValueError(f"kind must be one of {TARGET_KINDS}, got {kind!r}")
    if kind in ("continuous", "continuous-multioutput"):
        linear = RidgeCV(alphas=ALPHAS)
    elif kind in ("binary", "multilabel-indicator"):
        linear = _ThresholdedRidge()
    elif kind == "multiclass":
        linear = RidgeClassifierCV(alphas=ALPHAS)
    else:
        if n_classes is None:
            raise ValueError("an ordinal satellite needs n_classes, the number of class codes")
        linear = _RoundedRidge(n_classes)
    return make_pipeline(StandardScaler(with_std=False), linear)


def satellite_decision(satellite, features):
    """The satellite's linear output: its classifier's ``decision_function``, a regressor's prediction.

    Parameters
    ----------
    satellite : sklearn.pipeline.Pipeline
        A fitted satellite from :func:`make_satellite`.
    features : array-like of shape (n_samples, n_features)
        Pooled responses.

    Returns
    -------
    decision : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        Positive for ``classes_[1]`` (binary), one score per class (multiclass) or label
        (multilabel), the prediction of a regressor, the unrounded code of an ordinal task.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_craft.satellites import make_satellite, satellite_decision
    >>> X = np.arange(20.0).reshape(10, 2)
    >>> satellite = make_satellite("continuous").fit(X, X[:, 0])
    >>> np.allclose(satellite_decision(satellite, X), satellite.predict(X))
    True
    """
    if hasattr(satellite, "decision_function"):
        return satellite.decision_function(features)
    return satellite.predict(features)


def satellite_head(satellite, temperature=1.0):
    """An ``nn.Linear`` computing :func:`satellite_decision` (the centring folded into its bias).

    Parameters
    ----------
    satellite : sklearn.pipeline.Pipeline
        A fitted satellite from :func:`make_satellite`.
    temperature : float, default=1.0
        The head's outputs are the satellite's divided by it (see
        :func:`sklearn_craft.finetune.fit_temperature`): the same predictions, on another scale.

    Returns
    -------
    head : torch.nn.Linear
        ``head(torch.as_tensor(features))`` equals ``satellite_decision(satellite, features) /
        temperature`` (as an (n_samples, n_outputs) float32 tensor).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn_craft.satellites import make_satellite, satellite_decision, satellite_head
    >>> X = np.random.default_rng(0).normal(size=(50, 4))
    >>> satellite = make_satellite("multiclass").fit(X, np.arange(50) % 3)
    >>> head = satellite_head(satellite)
    >>> np.allclose(head(torch.as_tensor(X, dtype=torch.float32)).detach(), satellite_decision(satellite, X), atol=1e-5)
    True
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    scaler, linear = satellite[0], satellite[-1]
    coef = np.atleast_2d(linear.coef_)
    weight = coef / temperature
    bias = (np.atleast_1d(linear.intercept_) - coef @ scaler.mean_) / temperature
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight))
        layer.bias.copy_(torch.as_tensor(bias))
    return layer


def fit_satellite(satellite, X, y, sample_weight=None):
    """Fit a satellite of :func:`make_satellite`, every step of it on the weighted samples.

    Parameters
    ----------
    satellite : sklearn.pipeline.Pipeline
        An unfitted satellite from :func:`make_satellite`.
    X : array-like of shape (n_samples, n_features)
        Pooled responses.
    y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        The target.
    sample_weight : array-like of shape (n_samples,), default=None
        Weights of the samples in the centring (a weighted mean) and in the ridge fit (and the
        threshold of a binary or multi-label satellite). The leave-one-out choice of the ridge
        penalty leaves out one weighted sample at a time (scikit-learn's ``RidgeCV``), so it may
        differ from the choice on repeated samples; at a given penalty, a weight of 2 is the
        sample counted twice.

    Returns
    -------
    satellite : sklearn.pipeline.Pipeline
        The fitted satellite.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_craft.satellites import fit_satellite, make_satellite
    >>> X = np.arange(20.0).reshape(10, 2)
    >>> satellite = fit_satellite(make_satellite("continuous"), X, X[:, 0], sample_weight=np.arange(1.0, 11.0))
    >>> satellite[0].mean_.round(2).tolist()
    [12.0, 13.0]
    """
    if sample_weight is None:
        return satellite.fit(X, y)
    return satellite.fit(X, y, **{f"{name}__sample_weight": sample_weight for name, _ in satellite.steps})


def fit_layer_satellites(features, y, kind, columns, *, test_size=0.25, random_state=None, sample_weight=None):
    """Fit a satellite per layer on its columns of ``features``, and score each on held-out samples.

    Parameters
    ----------
    features : ndarray of shape (n_samples, n_features)
        Pooled responses of every layer.
    y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        The target.
    kind : str
        The target's kind (:data:`sklearn_craft.targets.TARGET_KINDS`, not ``"ordinal"``).
    columns : dict of str to array-like of int
        Layer -> the columns of ``features`` its satellite reads.
    test_size : float, default=0.25
        Share of the samples held out to score the satellites (one split, stratified for class
        labels when every class has two samples).
    random_state : int, RandomState instance or None, default=None
        Seed of the split.
    sample_weight : array-like of shape (n_samples,), default=None
        Weights of the samples in every fit (:func:`fit_satellite`) and score; the split is
        drawn over samples.

    Returns
    -------
    satellites : dict of str to sklearn.pipeline.Pipeline
        Layer -> satellite fitted on all samples.
    scores : pandas.Series
        Layer -> score (accuracy, or R² for regression; weighted by ``sample_weight``) on the
        held-out samples of a satellite fitted on the others.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_craft.satellites import fit_layer_satellites
    >>> rng = np.random.default_rng(0)
    >>> features = rng.normal(size=(80, 4))
    >>> y = features[:, 0] + 0.1 * rng.normal(size=80)
    >>> satellites, scores = fit_layer_satellites(features, y, "continuous", {"a": [0, 1], "b": [2, 3]}, random_state=0)
    >>> scores.idxmax()
    'a'
    """
    y = np.asarray(y)
    stratify = None
    if kind in ("binary", "multiclass") and np.unique(y, return_counts=True)[1].min() >= 2:
        stratify = y
    try:
        train, test = train_test_split(np.arange(len(y)), test_size=test_size, random_state=random_state, stratify=stratify)
    except ValueError:
        # A test part smaller than the number of classes cannot be stratified.
        train, test = train_test_split(np.arange(len(y)), test_size=test_size, random_state=random_state)
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=float)
    train_weights, test_weights = (None, None) if weights is None else (weights[train], weights[test])
    satellites, scores = {}, {}
    for layer, cols in columns.items():
        X = features[:, np.asarray(cols, dtype=np.intp)]
        held_out = fit_satellite(make_satellite(kind), X[train], y[train], train_weights)
        scores[layer] = held_out.score(X[test], y[test], sample_weight=test_weights)
        satellites[layer] = fit_satellite(make_satellite(kind), X, y, weights)
    return satellites, pd.Series(scores, name="score", dtype=float)


def _ridge_from_moments(products, n_features, alphas):
    """Ridge coefficients (n_targets, n_features, n_alphas) of centred cross-products ``[X Y]ᵀ[X Y]``.

    One eigendecomposition of the Gram matrix serves every penalty: ``(XᵀX + αI)⁻¹XᵀY``.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(products[:n_features, :n_features])
    projected = eigenvectors.T @ products[:n_features, n_features:]
    scaled = projected[:, :, None] / (np.clip(eigenvalues, 0, None)[:, None, None] + np.asarray(alphas)[None, None, :])
    return np.einsum("ij,jta->tia", eigenvectors, scaled)


def _satellite_from_sums(kind, sums, columns, classes=None):
    """A satellite of :func:`make_satellite` fitted from cross-products alone, and its held-out score.

    The streaming form of :func:`fit_layer_satellites` for one layer: ``sums`` are the
    :func:`~sklearn_craft._lasso_path._cross_sums` of a group of pooled responses and the
    encoded target (:func:`~sklearn_craft.targets.encode_target`: the values, 0/1 indicators),
    with held-out parts; ``columns`` are the responses the satellite reads. The ridge penalty is
    the one of :data:`ALPHAS` with the lowest held-out error of the parts (mean over them)
    instead of leave-one-out, which needs every sample; at that penalty the coefficients are
    those the in-memory satellite gets on the same samples. A binary or multi-label satellite
    thresholds its 0/1 regression at 0.5 (choosing the threshold needs every training score); a
    multi-class one is RidgeClassifierCV's ridge to ±1 indicators. The score is the held-out R²
    (mean over outputs and parts) of the decision against the encoded target.
    """
    n_features = sums["n_features"]
    index = np.concatenate([np.asarray(columns, dtype=np.intp), np.arange(n_features, len(sums["shift"]))])
    products, total, mean, splits = _centred_sums(sums)
    products, mean = products[np.ix_(index, index)], mean[index]
    splits = [(p[np.ix_(index, index)], t, m[index]) for p, t, m in splits]
    width = len(columns)
    parts = [_split_parts(products, total, *split) for split in splits]
    errors = [_held_out_rmse(test, 1.0, _ridge_from_moments(train, width, ALPHAS)) for train, _, _, test in parts]
    best = int(np.argmin(np.mean(errors, axis=0)))
    scores = []
    for (train, _, shift, test), (_, test_total, test_sum) in zip(parts, splits):
        coef = _ridge_from_moments(train, width, ALPHAS[best : best + 1])[:, :, 0]
        cross = coef @ test[:width, width:]
        residual = test[width:, width:] - cross - cross.T + coef @ test[:width, :width] @ coef.T
        # The held-out mean lies test_sum / test_total from the all-sample mean, shift from the training one.
        offset = (test_sum / test_total - shift)[width:]
        total_squares = np.diag(test[width:, width:]) - test_total * offset**2
        explained = 1 - np.diag(residual) / np.where(total_squares > 0, total_squares, np.inf)
        scores.append(np.mean(np.where(total_squares > 0, explained, 0.0)))
    coef = _ridge_from_moments(products, width, ALPHAS[best : best + 1])[:, :, 0]
    return _satellite(kind, mean[:width], coef, mean[width:], ALPHAS[best], classes), float(np.mean(scores))


def _satellite(kind, x_mean, coef, y_mean, alpha, classes):
    """The fitted satellite of :func:`make_satellite` whose 0/1 (or value) regression is
    ``(x − x_mean)·coefᵀ + y_mean``: the fitted state of scikit-learn's models set from it."""
    satellite = make_satellite(kind)
    scaler, linear = satellite[0], satellite[-1]
    scaler.mean_, scaler.var_, scaler.scale_ = x_mean, None, None
    scaler.n_samples_seen_, scaler.n_features_in_ = 0, len(x_mean)
    linear.n_features_in_, linear.alpha_ = len(x_mean), alpha
    if kind in ("continuous", "continuous-multioutput"):
        linear.coef_, linear.intercept_ = (coef[0], y_mean[0]) if kind == "continuous" else (coef, y_mean)
    elif kind == "multiclass":
        # RidgeClassifierCV regresses ±1 indicators: twice the 0/1 regression, minus 1.
        linear._label_binarizer = LabelBinarizer(pos_label=1, neg_label=-1).fit(classes)
        linear.classes_ = linear._label_binarizer.classes_
        linear.coef_, linear.intercept_ = 2 * coef, 2 * y_mean - 1
    else:
        linear.classes_ = np.arange(coef.shape[0]) if kind == "multilabel-indicator" else np.asarray(classes)
        linear.coef_ = coef if kind == "multilabel-indicator" else coef[0]
        linear.intercept_ = y_mean - 0.5 if kind == "multilabel-indicator" else y_mean[0] - 0.5
    return satellite
