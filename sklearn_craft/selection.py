"""Filter selection with per-layer LASSO characteristic curves (ETL sections 3.2-3.3).

For every group of features (the pooled responses of one conv layer) a LASSO path is fitted over
a geometric grid of α, from α_max (the smallest α that zeroes every coefficient) down to
α_max·eps. Along the path, the number of filters with a non-zero coefficient and the RMSE on
held-out samples form the layer's *characteristic curve*; its *knee* is the point with the fewest
filters whose RMSE lies within γ of the curve's range above its minimum. The filters with a
non-zero coefficient at the knee are the ones the pruned network keeps. The paths themselves are
solved from each group's cross-products in :mod:`sklearn_craft._lasso_path`.
"""

import functools
import math
import warnings
from numbers import Integral, Real

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectorMixin
from sklearn.model_selection import check_cv, train_test_split
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions, validate_params
from sklearn.utils.validation import (
    _check_sample_weight,
    _get_feature_names,
    check_array,
    check_consistent_length,
    check_is_fitted,
    check_X_y,
)
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ._cache import cached_arrays
from ._lasso_path import _first_to_enter, _group_paths
from .targets import encode_target

_PATH_CONSTRAINTS = {
    "alphas": [Interval(Integral, 1, None, closed="left"), "array-like"],
    "eps": [Interval(Real, 0, 1, closed="neither")],
    "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
    "cv": ["cv_object"],
    "standardize": ["boolean"],
    "random_state": ["random_state"],
}


def find_knee(curve, gamma):
    """Position of the knee of a characteristic curve (ETL equation 4).

    Among the points whose RMSE − min(RMSE) ≤ γ·(max(RMSE) − min(RMSE)), the knee is the one
    with the fewest non-zero coefficients; ties go to the lower RMSE, then to the earlier point.
    Points with no coefficient are never the knee (at γ = 1 the empty model at α_max would be):
    the rule is applied to the points with at least one. When none of those is within the
    tolerance (an unpredictable target, where the empty model has the lowest held-out error),
    the knee is the one with the lowest RMSE, so the number of filters still never grows with γ.
    Only a curve without any non-empty point returns an empty point.

    ``gamma=0`` gives the point with the lowest RMSE. :class:`LassoFilterSelector` treats
    ``gamma=0`` as the papers' "unpruned" setting instead and keeps every filter.

    Parameters
    ----------
    curve : pandas.DataFrame or dict of array-like
        The characteristic curve in path order (decreasing α), with columns ``n_selected`` and
        ``rmse``, as returned by :func:`characteristic_curve`.
    gamma : float in [0, 1]
        Largest allowed increase in RMSE, as a fraction of the curve's RMSE range.

    Returns
    -------
    position : int
        Row position of the knee: ``curve.iloc[position]``.

    Examples
    --------
    >>> import pandas as pd
    >>> from sklearn_craft.selection import find_knee
    >>> curve = pd.DataFrame({"n_selected": [0, 1, 3, 8], "rmse": [10.0, 4.0, 2.05, 2.0]})
    >>> find_knee(curve, 0.01), find_knee(curve, 0.5)
    (2, 1)
    """
    if isinstance(gamma, bool) or not isinstance(gamma, Real):
        raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if not all(column in curve for column in ("n_selected", "rmse")):
        raise ValueError(f"curve must have columns 'n_selected' and 'rmse', got {list(curve)}")
    n_selected = np.asarray(curve["n_selected"], dtype=np.int64)
    rmse = np.asarray(curve["rmse"], dtype=np.float64)
    if n_selected.shape != rmse.shape or n_selected.ndim != 1 or n_selected.size == 0:
        raise ValueError(
            f"curve must hold one or more points, got n_selected of shape {n_selected.shape} "
            f"and rmse of shape {rmse.shape}"
        )
    if not np.isfinite(rmse).all():
        raise ValueError("curve rmse must be finite, got NaN or infinite values")

    within = rmse - rmse.min() <= gamma * (rmse.max() - rmse.min())
    non_empty = n_selected >= 1
    candidates = np.flatnonzero(within & non_empty)
    if candidates.size == 0:
        best = rmse[non_empty].min() if non_empty.any() else rmse.min()
        candidates = np.flatnonzero((non_empty | ~non_empty.any()) & (rmse == best))
    # lexsort sorts by its last key first: fewest filters, then lowest RMSE, then path order.
    order = np.lexsort((candidates, rmse[candidates], n_selected[candidates]))
    return int(candidates[order[0]])


@validate_params({"X": ["array-like"], "y": ["array-like"], **_PATH_CONSTRAINTS}, prefer_skip_nested_validation=True)
def characteristic_curve(
    X,
    y,
    *,
    alphas=100,
    eps=1e-4,
    validation_fraction=0.25,
    cv=None,
    standardize=True,
    random_state=None,
):
    """Characteristic curve of one group of features: held-out RMSE against filters kept.

    The α grid is computed on all of ``X`` (α_max is the smallest α that zeroes every
    coefficient, ``max_j ‖X_jᵀY‖₂ / n`` for centred — and, with ``standardize``, scaled —
    data; the grid is geometric down to α_max·eps, as in scikit-learn). For each α:

    - ``rmse`` is the RMSE on held-out samples of the LASSO fitted on the rest: one split holding
      out ``validation_fraction`` of the samples (stratified for class labels) or, when ``cv`` is
      given, the mean over its folds. For several targets it is the RMSE over all outputs.
    - ``n_selected`` is the number of features with a non-zero coefficient (for any target) in
      the LASSO fitted on all samples, whose coefficients are returned: the model that would be
      kept at that α, as :class:`~sklearn.linear_model.LassoCV` refits on all data.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Features of one group (one layer's pooled filter responses).
    y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Target, encoded by :func:`encode_target`; several outputs or classes give the
        multi-task (L2,1) path, which selects features jointly for all of them.
    alphas : int or array-like of shape (n_alphas,), default=100
        Number of α values on the grid, or the α values themselves (positive; used in
        decreasing order, in the scale of the standardized features when ``standardize``).
    eps : float in (0, 1), default=1e-4
        α_min / α_max of the grid.
    validation_fraction : float in (0, 1), default=0.25
        Fraction of samples held out for the RMSE when ``cv`` is None.
    cv : int, cross-validation generator or iterable, default=None
        Folds for the RMSE (stratified folds for class labels when an int); None uses one split.
    standardize : bool, default=True
        Scale every feature to unit variance (on the samples each LASSO is fitted on) before the
        path, so that α means the same in every layer. Coefficients are returned in the original
        feature scale either way.
    random_state : int, RandomState instance or None, default=None
        Seed of the validation split.

    Returns
    -------
    curve : pandas.DataFrame
        One row per α in decreasing order, with columns ``alpha``, ``n_selected``, ``rmse``.
    coefs : ndarray of shape (n_features, n_alphas) or (n_targets, n_features, n_alphas)
        Coefficient path fitted on all samples, in the original feature scale (the shape of
        :func:`sklearn.linear_model.lasso_path`'s, without the intercept).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_craft.selection import characteristic_curve, find_knee
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 10))
    >>> y = X[:, 0] - 2 * X[:, 3] + 0.1 * rng.normal(size=200)
    >>> curve, coefs = characteristic_curve(X, y, alphas=20, random_state=0)
    >>> curve.columns.tolist(), coefs.shape
    (['alpha', 'n_selected', 'rmse'], (10, 20))
    >>> knee = find_knee(curve, 0.01)
    >>> np.flatnonzero(coefs[:, knee]).tolist()
    [0, 3]
    """
    X = check_array(X, dtype=np.float64, ensure_min_samples=2)
    Y, target_type, _ = encode_target(y)
    check_consistent_length(X, Y)
    labels = np.asarray(y) if target_type in ("binary", "multiclass") else None
    splits = _held_out_splits(len(X), labels, validation_fraction, cv, random_state)
    with threadpool_limits(limits=1, user_api="blas"):
        ((curve, coefs),) = _group_paths([X], Y, splits, _check_alphas(alphas), eps, standardize)
    return curve, coefs[0] if len(coefs) == 1 else coefs


class LassoFilterSelector(SelectorMixin, BaseEstimator):
    """Select the filters of every layer at the knee of its LASSO characteristic curve.

    For each group of features (one conv layer's pooled filter responses) the LASSO path and its
    characteristic curve are computed by :func:`characteristic_curve`; the knee (see
    :func:`find_knee`) picks the α, and the features with a non-zero coefficient in the LASSO
    fitted on all samples at that α are selected. At least one feature per group is kept: when
    no α of the path gives a non-zero coefficient (a group of constant features, or explicit
    ``alphas`` above α_max), the feature that would enter the path first (largest
    ``‖X_jᵀY‖₂``) is kept.

    Parameters
    ----------
    gamma : float in [0, 1], default=0.01
        Largest allowed increase in held-out RMSE at the knee, as a fraction of the curve's RMSE
        range. Larger values keep fewer filters. ``gamma=0`` is the papers' unpruned setting: every
        filter of every group is kept, and the knee is reported at the last (smallest) α.
    alphas : int or array-like of shape (n_alphas,), default=100
        Number of α values of every path, or the α values themselves (positive, shared by all
        groups, in the scale of the standardized features when ``standardize``).
    eps : float in (0, 1), default=1e-4
        α_min / α_max of every path.
    groups : "auto" or array-like of shape (n_features,), default="auto"
        Group of each feature. ``"auto"`` reads the layer from feature names
        ``"<layer>:<channel>"`` (a DataFrame from :class:`~sklearn_craft.pooling.ActivationPooler`
        with ``set_output(transform="pandas")``), and puts every feature in one group ``"all"``
        otherwise. An array gives one label per column.
    validation_fraction : float in (0, 1), default=0.25
        Fraction of samples held out for the curves' RMSE when ``cv`` is None.
    cv : int, cross-validation generator or iterable, default=None
        Folds whose mean held-out RMSE makes the curves (stratified folds for class labels when an
        int). None uses one ``validation_fraction`` split.
    standardize : bool, default=True
        Scale features to unit variance before the paths so α means the same in every layer.
        ``coef_`` is reported in the original feature scale.
    n_jobs : int or None, default=None
        Number of parallel threads (``-1``: one per core), each solving a batch of up to 8
        groups of the same width at a time. BLAS runs on one thread during ``fit`` (its threads
        slow the many small products down, and would oversubscribe the cores), so ``n_jobs`` is
        what uses several cores.
    random_state : int, RandomState instance or None, default=None
        Seed of the validation split. Fix it for ``memory`` to be reused across fits.
    memory : str, joblib.Memory or None, default=None
        Cache of every group's path and curve, which do not depend on ``gamma``: a grid search
        over ``gamma`` then recomputes only the knees. They are stored as ``.npy`` arrays in a
        ``sklearn_craft`` folder under the path (or the joblib.Memory's location), never as
        pickles: a corrupt or tampered entry is recomputed, never executed.
    progress : bool, default=False
        Show a tqdm progress bar (on stderr) counting the groups whose paths are solved.

    Attributes
    ----------
    support_ : ndarray of shape (n_features,), dtype bool
        Selected features.
    coef_ : ndarray of shape (n_features,) or (n_targets, n_features)
        Coefficients of every group's LASSO (fitted on all samples) at its knee, in the original
        feature scale; zeros for unselected features. One row per encoded target column.
    curves_ : pandas.DataFrame
        Characteristic curves: columns ``group``, ``alpha``, ``n_selected``, ``rmse``, the rows of
        each group in decreasing α.
    knees_ : pandas.DataFrame
        One row per group: ``group``, ``alpha``, ``n_selected`` (features kept, equal to the
        group's ``support_.sum()``), ``rmse`` (the curve's held-out RMSE at the knee).
    groups_ : ndarray of shape (n_features,)
        Group label of every feature.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features,)
        Names of the features seen during fit, when X has string column names.

    See Also
    --------
    characteristic_curve : The curve of one group.
    find_knee : The knee rule.
    sklearn_craft.plotting.plot_characteristic_curves : Draw ``curves_`` and ``knees_``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_craft.selection import LassoFilterSelector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(300, 8))
    >>> y = X[:, 1] + X[:, 6] + 0.1 * rng.normal(size=300)
    >>> selector = LassoFilterSelector(groups=[0, 0, 0, 0, 1, 1, 1, 1], random_state=0).fit(X, y)
    >>> np.flatnonzero(selector.get_support()).tolist()
    [1, 6]
    >>> selector.knees_["n_selected"].tolist()
    [1, 1]
    """

    _parameter_constraints = {
        "gamma": [Interval(Real, 0, 1, closed="both")],
        **{name: constraint for name, constraint in _PATH_CONSTRAINTS.items() if name != "random_state"},
        "groups": [StrOptions({"auto"}), "array-like"],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
        "memory": [None, str, HasMethods(["cache"])],
        "progress": ["boolean"],
    }

    def __init__(
        self,
        gamma=0.01,
        alphas=100,
        eps=1e-4,
        groups="auto",
        validation_fraction=0.25,
        cv=None,
        standardize=True,
        n_jobs=None,
        random_state=None,
        memory=None,
        progress=False,
    ):
        self.gamma = gamma
        self.alphas = alphas
        self.eps = eps
        self.groups = groups
        self.validation_fraction = validation_fraction
        self.cv = cv
        self.standardize = standardize
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.memory = memory
        self.progress = progress

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Compute every group's characteristic curve and select the filters at its knee.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Pooled filter responses (columns grouped by layer).
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Continuous target(s) or class labels (see :func:`encode_target`).
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples in every LASSO fit (weighted means, variances and
            cross-products) and in the held-out RMSE of the curves: a sample of weight 2 counts
            as that sample twice. The validation split (or ``cv``) is drawn over samples, not
            weights, and every part of it must have a positive total weight.

        Returns
        -------
        self : LassoFilterSelector
            The fitted selector.
        """
        # validate_data would set n_features_in_ and feature_names_in_ before y, alphas, groups
        # and cv are checked: everything is validated into locals, and attributes set at the end.
        feature_names = _get_feature_names(X)
        X, y = check_X_y(X, y, dtype=np.float64, multi_output=True, ensure_min_samples=2, estimator=self)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        alphas = _check_alphas(self.alphas)
        groups = self._feature_groups(X.shape[1], feature_names)
        Y, target_type, _ = encode_target(y)
        labels = y if target_type in ("binary", "multiclass") else None
        splits = _held_out_splits(len(X), labels, self.validation_fraction, self.cv, self.random_state)
        if sample_weight is not None:
            for train, test in splits:
                if sample_weight[train].sum() <= 0 or sample_weight[test].sum() <= 0:
                    raise ValueError(
                        "sample_weight must give a positive total weight to both parts of every validation "
                        f"split, got {sample_weight[train].sum()!r} (fit) and {sample_weight[test].sum()!r} (held out)"
                    )

        group_paths = functools.partial(_cached_group_paths, self.memory)
        labels_in_order = pd.unique(pd.Series(groups, dtype=object))
        columns = [_as_slice(np.flatnonzero(groups == label)) for label in labels_in_order]
        batches = _batches([np.count_nonzero(groups == label) for label in labels_in_order])
        paths = [None] * len(columns)
        with (
            threadpool_limits(limits=1, user_api="blas"),
            warnings.catch_warnings(record=True) as caught,
            tqdm(total=len(columns), desc="LASSO paths", unit="group", disable=not self.progress) as bar,
        ):
            warnings.simplefilter("always", ConvergenceWarning)
            solved = Parallel(n_jobs=self.n_jobs, prefer="threads", return_as="generator")(
                delayed(group_paths)(
                    [X[:, columns[g]] for g in batch], Y, splits, alphas, self.eps, self.standardize, sample_weight
                )
                for batch in batches
            )
            for batch, batch_paths in zip(batches, solved):
                for g, path in zip(batch, batch_paths):
                    paths[g] = path
                bar.update(len(batch))
        _summarise_warnings(caught, n_fits=len(columns) * (len(splits) + 1) * len(paths[0][0]))

        support = np.zeros(X.shape[1], dtype=bool)
        coef = np.zeros((Y.shape[1], X.shape[1]))
        curves, knees = [], []
        for label, cols, (curve, coefs) in zip(labels_in_order, columns, paths):
            if self.gamma == 0:
                knee = len(curve) - 1
                keep = np.ones(coefs.shape[1], dtype=bool)
            else:
                knee = find_knee(curve, self.gamma)
                keep = np.any(coefs[:, :, knee] != 0, axis=0)
                if not keep.any():
                    keep[_first_to_enter(X[:, cols], Y, self.standardize, sample_weight)] = True
            support[cols] = keep
            coef[:, cols] = coefs[:, :, knee]
            curves.append(curve.assign(group=label))
            alpha, rmse = curve["alpha"].iloc[knee], curve["rmse"].iloc[knee]
            knees.append({"group": label, "alpha": alpha, "n_selected": int(keep.sum()), "rmse": rmse})

        self.support_ = support
        self.coef_ = coef[0] if len(coef) == 1 else coef
        self.curves_ = pd.concat(curves, ignore_index=True)[["group", "alpha", "n_selected", "rmse"]]
        self.knees_ = pd.DataFrame(knees, columns=["group", "alpha", "n_selected", "rmse"])
        self.groups_ = groups
        self.n_features_in_ = X.shape[1]
        if feature_names is not None:
            self.feature_names_in_ = feature_names
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        return self

    def _feature_groups(self, n_features, names):
        """Group label of every column, from ``groups`` or the ``"<layer>:<channel>"`` names."""
        if isinstance(self.groups, str):
            if names is not None and all(":" in name for name in names):
                return np.array([name.rsplit(":", 1)[0] for name in names], dtype=object)
            return np.full(n_features, "all", dtype=object)
        groups = np.asarray(self.groups)
        if groups.shape != (n_features,):
            raise ValueError(f"groups must hold one label per feature ({n_features},), got shape {groups.shape}")
        return groups

    def _get_support_mask(self):
        check_is_fitted(self)
        return self.support_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.target_tags.multi_output = True
        return tags


_CURVE_COLUMNS = ("alpha", "n_selected", "rmse")


def _cached_group_paths(memory, blocks, Y, splits, alphas, eps, standardize, sample_weight=None):
    """``_group_paths`` through the array cache of ``memory``: one entry per batch of groups."""

    def compute():
        results = _group_paths(blocks, Y, splits, alphas, eps, standardize, sample_weight)
        return {
            f"{index}:{name}": values
            for index, (curve, coefs) in enumerate(results)
            for name, values in [*((column, curve[column].to_numpy()) for column in _CURVE_COLUMNS), ("coefs", coefs)]
        }

    def valid(stored):
        names = {f"{index}:{name}" for index in range(len(blocks)) for name in (*_CURVE_COLUMNS, "coefs")}
        return stored.keys() == names and all(
            stored[f"{index}:coefs"].ndim == 3
            and stored[f"{index}:coefs"].shape[:2] == (Y.shape[1], X.shape[1])
            and all(stored[f"{index}:{column}"].shape == stored[f"{index}:coefs"].shape[2:] for column in _CURVE_COLUMNS)
            for index, X in enumerate(blocks)
        )

    key = (blocks, Y, splits, alphas, eps, standardize, sample_weight)
    stored = cached_arrays(memory, _group_paths, key, compute, valid)
    return [
        (
            pd.DataFrame({column: stored[f"{index}:{column}"] for column in _CURVE_COLUMNS}),
            stored[f"{index}:coefs"],
        )
        for index in range(len(blocks))
    ]


def _summarise_warnings(caught, n_fits):
    """Re-emit ``caught`` warnings, the solvers' per-alpha ConvergenceWarnings folded into one."""
    unconverged = 0
    for caught_warning in caught:
        if issubclass(caught_warning.category, ConvergenceWarning):
            unconverged += 1
        else:
            warnings.warn(caught_warning.message, caught_warning.category, stacklevel=3)
    if unconverged:
        warnings.warn(
            f"LASSO stopped before its duality-gap tolerance at {unconverged} of {n_fits} (path, alpha) fits, "
            "mostly the smallest alphas of strongly correlated responses: the many-filter end of the "
            "characteristic curves is approximate",
            ConvergenceWarning,
            stacklevel=3,
        )


def _batches(widths, size=8):
    """Groups solved together: up to ``size`` of the same width, in order of first appearance.

    Their multi-task paths then share every iteration's NumPy calls (see
    :func:`~sklearn_craft._lasso_path._multitask_paths`); ``size`` bounds the memory of the
    Gram matrices held at once and keeps the progress bar moving.
    """
    batches = []
    for width in pd.unique(pd.Series(widths)):
        same = np.flatnonzero(np.asarray(widths) == width)
        batches += [same[start : start + size].tolist() for start in range(0, len(same), size)]
    return batches


def _as_slice(indices):
    """``indices`` as a slice when they are a contiguous range: X[:, slice] is a view, not a copy."""
    if indices[-1] - indices[0] + 1 == len(indices):
        return slice(indices[0], indices[-1] + 1)
    return indices


def _check_alphas(alphas):
    """Return ``alphas`` as an int count or a validated 1-D float array."""
    if isinstance(alphas, Integral):
        return int(alphas)
    values = np.asarray(alphas, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"alphas must be an int or a non-empty 1-D array of positive finite values, got {alphas!r}")
    return values


def _held_out_splits(n_samples, labels, validation_fraction, cv, random_state):
    """(train, test) index pairs of the held-out RMSE; stratified when ``labels`` are classes."""
    is_classification = labels is not None
    if cv is not None:
        splitter = check_cv(cv, labels, classifier=is_classification)
        return list(splitter.split(np.zeros((n_samples, 1)), labels))
    stratify = None
    if is_classification:
        n_test = math.ceil(validation_fraction * n_samples)
        _, counts = np.unique(labels, return_counts=True)
        # train_test_split cannot stratify when a class has one sample or a part is smaller than
        # the number of classes; an unstratified split is the best that is left.
        if counts.min() >= 2 and min(n_test, n_samples - n_test) >= len(counts):
            stratify = labels
    train, test = train_test_split(
        np.arange(n_samples),
        test_size=validation_fraction,
        random_state=check_random_state(random_state),
        stratify=stratify,
    )
    return [(train, test)]
