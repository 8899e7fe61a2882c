"""Filter selection with per-layer LASSO characteristic curves (ETL sections 3.2-3.3).

For every group of features (the pooled responses of one conv layer) a LASSO path is fitted over
a geometric grid of α, from α_max (the smallest α that zeroes every coefficient) down to
α_max·eps. Along the path, the number of filters with a non-zero coefficient and the RMSE on
held-out samples form the layer's *characteristic curve*; its *knee* is the point with the fewest
filters whose RMSE lies within γ of the curve's range above its minimum. The filters with a
non-zero coefficient at the knee are the ones the pruned network keeps. The paths themselves are
solved from each group's cross-products in :mod:`sklearn_craft._lasso_path`.
"""

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
from sklearn.preprocessing import label_binarize
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
from ._lasso_path import _add_sums, _centred_sums, _cross_sums, _first_to_enter, _group_paths, _sum_paths
from .targets import encode_target

_PATH_CONSTRAINTS = {
    "alphas": [Interval(Integral, 1, None, closed="left"), "array-like"],
    "eps": [Interval(Real, 0, 1, closed="neither")],
    "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
    "cv": ["cv_object"],
    "standardize": ["boolean"],
    "random_state": ["random_state"],
}


def find_knee(curve, gamma, cost=None):
    """Position of the knee of a characteristic curve (ETL equation 4, or its price on filters).

    Among the points whose RMSE − min(RMSE) ≤ γ·(max(RMSE) − min(RMSE)), the knee is the one
    with the fewest non-zero coefficients; ties go to the lower RMSE, then to the earlier point.
    Points with no coefficient are never the knee (at γ = 1 the empty model at α_max would be):
    the rule is applied to the points with at least one. When none of those is within the
    tolerance (an unpredictable target, where the empty model has the lowest held-out error),
    the knee is the one with the lowest RMSE, so the number of filters still never grows with γ.
    Only a curve without any non-empty point returns an empty point.

    With a ``cost``, the knee is instead the non-empty point that minimises the normalised RMSE
    (0 at the curve's minimum, 1 at its maximum) plus ``γ·cost·n_selected`` (same ties): every
    filter must lower the normalised RMSE by at least ``γ·cost`` to be kept, so a layer whose filters
    are dear keeps fewer than a cheap one with the same curve (the allocation that minimises the sum
    of the layers' normalised RMSE under a budget on their total cost, in Lagrangian form). The
    number of filters never grows with γ either.

    ``gamma=0`` gives the point with the lowest RMSE. :class:`LassoFilterSelector` treats
    ``gamma=0`` as the papers' "unpruned" setting instead and keeps every filter.

    Parameters
    ----------
    curve : pandas.DataFrame or dict of array-like
        The characteristic curve in path order (decreasing α), with columns ``n_selected`` and
        ``rmse``, as returned by :func:`characteristic_curve`.
    gamma : float in [0, 1]
        Largest allowed increase in RMSE, as a fraction of the curve's RMSE range; with ``cost``,
        the price of one unit of cost in normalised RMSE.
    cost : float >= 0 or None, default=None
        None for the tolerance rule, or the cost of one filter of this curve's layer.

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

    At a price of 0.1 a filter, the two filters from 1 to 3 (each worth 0.12 of the range) are
    kept, the five from 3 to 8 (together 0.006) are not; at twice the price neither are:

    >>> find_knee(curve, 0.1, cost=1.0), find_knee(curve, 0.2, cost=1.0)
    (2, 1)
    """
    if isinstance(gamma, bool) or not isinstance(gamma, Real):
        raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if cost is not None:
        if isinstance(cost, bool) or not isinstance(cost, Real):
            raise TypeError(f"cost must be a real number or None, got {type(cost).__name__}")
        if not (math.isfinite(cost) and cost >= 0):
            raise ValueError(f"cost must be finite and >= 0, got {cost!r}")
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

    non_empty = n_selected >= 1
    if cost is not None:
        spread = rmse.max() - rmse.min()
        objective = (rmse - rmse.min()) / spread if spread > 0 else np.zeros_like(rmse)
        objective += gamma * cost * n_selected
        points = np.flatnonzero(non_empty) if non_empty.any() else np.arange(len(rmse))
        candidates = points[objective[points] == objective[points].min()]
    else:
        within = rmse - rmse.min() <= gamma * (rmse.max() - rmse.min())
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
    :func:`find_knee`, by its tolerance or with a price on every group's features) picks the α,
    and the features with a non-zero coefficient in the LASSO fitted on all samples at that α are
    selected. At least one feature per group is kept: when
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
    knee : {"tolerance", "cost"}, default="tolerance"
        How a knee is found (:func:`find_knee`): the fewest features within ``gamma`` of the
        curve's lowest RMSE (the papers' rule), or the point that minimises the normalised RMSE
        plus ``gamma`` times the cost of the features kept (``group_costs``), so that dear groups
        give up more features than cheap ones.
    group_costs : dict or None, default=None
        With ``knee="cost"``: group label -> the cost of one of its features (a finite number
        >= 0; labels of other groups are ignored). None prices every feature at one over the mean
        number of features of a group, so that keeping a whole group of average width costs
        ``gamma``. :class:`~sklearn_craft.pruner.CraftPruner` with ``knee="flops"`` passes every
        layer's FLOPs per filter (:func:`~sklearn_craft.profiling.filter_flops`) over the mean
        FLOPs of a whole layer's filters.

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
        "knee": [StrOptions({"tolerance", "cost"})],
        "group_costs": [dict, None],
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
        knee="tolerance",
        group_costs=None,
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
        self.knee = knee
        self.group_costs = group_costs

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
        # float32 responses stay float32: each group becomes float64 only while its cross-products are formed.
        X, y = check_X_y(X, y, dtype=(np.float64, np.float32), multi_output=True, ensure_min_samples=2, estimator=self)
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

        labels_in_order, columns, batches = _group_layout(groups)
        self._knee_costs(labels_in_order, columns, X.shape[1])

        def solve(batch):
            blocks = [X[:, columns[g]] for g in batch]
            args = (blocks, Y, splits, alphas, self.eps, self.standardize, sample_weight)
            return _cached_paths(self.memory, _group_paths, args, [block.shape[1] for block in blocks], Y.shape[1])

        def first_to_enter(g):
            sums = _cross_sums(X[:, columns[g]], Y, np.zeros((len(X), 0), dtype=bool), sample_weight)
            return _first_to_enter(sums, self.standardize)

        paths = self._solve_groups(solve, batches, n_parts=len(splits) + 1)
        selection = self._knee_selection(labels_in_order, columns, paths, first_to_enter, X.shape[1])

        for name, value in selection.items():
            setattr(self, name, value)
        self.groups_ = groups
        self.n_features_in_ = X.shape[1]
        if feature_names is not None:
            self.feature_names_in_ = feature_names
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        # A fit starts afresh: what earlier partial_fit calls streamed in is forgotten.
        for name in ("_stream_", "n_samples_seen_"):
            vars(self).pop(name, None)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """Add a chunk of samples to the cross-products the paths are solved from.

        Selection out of core: every group's cross-products ``[X Y]ᵀ[X Y]`` (about a shift taken
        from the first chunk, in float64), column sums and total weight are accumulated over the
        chunks, for all samples and for the held-out samples of the validation split, so the
        samples themselves are never kept (float32 chunks stay float32 until their group is
        folded in). Memory is that of one chunk plus ``(n_splits + 1)·(p + t)²`` numbers per
        group of ``p`` features (``t`` encoded targets), whatever the number of samples.

        The selection (``support_``, ``coef_``, ``curves_``, ``knees_``) is computed from the
        cross-products when one of them is first read after new data (``transform`` and
        ``get_support`` read ``support_``), with the parameters of that moment (``gamma``,
        ``knee``, ``group_costs``, ``alphas``, ``eps``, ``standardize``, ``n_jobs``, ``memory``);
        it equals the selection :meth:`fit` makes on the concatenated chunks with the same
        validation split, up to rounding. ``memory`` caches the paths under a digest of the cross-products.

        The validation split is drawn per sample, so that chunks can be of any size: the
        ``i``-th sample streamed in (counting from 0 over all calls) is held out when a hash of
        ``(i, seed)`` falls below ``validation_fraction`` (the held-out share is
        ``validation_fraction`` in expectation, not exactly, and not stratified), the seed drawn
        from ``random_state`` on the first call. An int ``cv`` assigns every sample to one of
        ``cv`` folds by the same hash. Other ``cv`` (splitters, lists of splits) cannot be
        decided chunk by chunk and are refused. ``groups``, ``validation_fraction``, ``cv``,
        ``random_state`` and the classes are fixed by the first call; :meth:`fit` forgets
        everything streamed in, and the next ``partial_fit`` starts again.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            A chunk of pooled filter responses (float32 or float64).
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Its targets: floats to regress (one or several outputs, or a 0/1 label matrix) or
            class labels (see ``classes``).
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the chunk's samples, as in :meth:`fit`.
        classes : array-like of shape (n_classes,), default=None
            Every class label of the whole stream, when ``y`` holds class labels (integers,
            strings or booleans); read on the first call only, so that later chunks need not
            hold every class. None takes the labels of the first chunk, and a later chunk with
            another label is an error. Encoded as :func:`encode_target` encodes labels.

        Returns
        -------
        self : LassoFilterSelector
            The selector, whose selection covers every chunk seen so far.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn_craft.selection import LassoFilterSelector
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(3000, 8)).astype(np.float32)
        >>> y = np.where(X[:, 2] - X[:, 5] > 0, "yes", "no")
        >>> selector = LassoFilterSelector(groups=[0, 0, 0, 0, 1, 1, 1, 1], random_state=0)
        >>> for start in range(0, 3000, 500):
        ...     selector = selector.partial_fit(X[start : start + 500], y[start : start + 500], classes=["no", "yes"])
        >>> selector.n_samples_seen_, np.flatnonzero(selector.get_support()).tolist()
        (3000, [2, 5])
        """
        first = "_stream_" not in vars(self)
        feature_names = _get_feature_names(X)
        X = check_array(X, dtype=(np.float64, np.float32), estimator=self)
        if first:
            if self.cv is not None and (isinstance(self.cv, bool) or not isinstance(self.cv, Integral) or self.cv < 2):
                raise ValueError(
                    "partial_fit needs cv=None (one validation_fraction split) or an int >= 2 (folds drawn per "
                    f"sample), got cv={self.cv!r}: explicit splits cannot be decided chunk by chunk"
                )
            _check_alphas(self.alphas)
            groups = self._feature_groups(X.shape[1], feature_names)
            stream = {
                "target": _stream_target(y, classes),
                "seed": int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max)),
                "validation_fraction": self.validation_fraction,
                "cv": self.cv,
                "sums": None,
            }
            seen = 0
        else:
            stream, groups, seen = self._stream_, self.groups_, self.n_samples_seen_
            if X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting {self.n_features_in_} "
                    "features as input (those of the first partial_fit chunk)"
                )
            known = getattr(self, "feature_names_in_", None)
            if (known is None) != (feature_names is None) or (known is not None and list(known) != list(feature_names)):
                raise ValueError("X must have the feature names of the first partial_fit chunk")
            if classes is not None and not np.array_equal(np.unique(classes), stream["target"]["classes"]):
                raise ValueError(
                    f"classes must be those of the first partial_fit call {stream['target']['classes'].tolist()}, "
                    f"got {np.unique(classes).tolist()}"
                )
        Y = _encode_chunk(y, stream["target"])
        check_consistent_length(X, Y)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        held_out = _streamed_held_out(
            np.arange(seen, seen + len(X)), stream["seed"], stream["validation_fraction"], stream["cv"]
        )
        labels, columns, _ = _group_layout(groups)
        if stream["sums"] is None:
            sums = [_cross_sums(X[:, cols], Y, held_out, sample_weight) for cols in columns]
        else:
            sums = [
                _add_sums(old, _cross_sums(X[:, cols], Y, held_out, sample_weight, shift=old["shift"]))
                for old, cols in zip(stream["sums"], columns)
            ]

        self._stream_ = {**stream, "sums": sums}
        self.n_samples_seen_ = seen + len(X)
        if first:
            self.groups_ = groups
            self.n_features_in_ = X.shape[1]
            if feature_names is not None:
                self.feature_names_in_ = feature_names
            elif "feature_names_in_" in vars(self):
                del self.feature_names_in_
        for name in _SELECTION_ATTRIBUTES:
            vars(self).pop(name, None)
        return self

    def __getattr__(self, name):
        # After partial_fit the selection is computed when it is first read (see partial_fit).
        if name in _SELECTION_ATTRIBUTES and "_stream_" in vars(self):
            vars(self).update(self._select_from_stream())
            return vars(self)[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _select_from_stream(self):
        """``support_``, ``coef_``, ``curves_`` and ``knees_`` from the streamed cross-products."""
        stream = self._stream_
        sums, n_targets = stream["sums"], stream["target"]["n_targets"]
        totals = sums[0]["total"]
        if self.n_samples_seen_ < 2:
            raise ValueError(f"partial_fit needs at least 2 samples before selecting, got {self.n_samples_seen_}")
        for held_out_total in totals[1:]:
            if held_out_total <= 0 or totals[0] - held_out_total <= 0:
                raise ValueError(
                    "every part of the validation split must have a positive total weight, got "
                    f"{totals[0] - held_out_total!r} (fit) and {held_out_total!r} (held out) after "
                    f"{self.n_samples_seen_} samples; stream in more samples"
                )
        products, _, _, _ = _centred_sums(sums[0])
        if not np.any(np.diag(products)[sums[0]["n_features"] :] > 0):
            raise ValueError("y must vary across samples, got a constant target (a single value or class)")
        alphas = _check_alphas(self.alphas)
        labels, columns, batches = _group_layout(self.groups_)

        def solve(batch):
            args = ([sums[g] for g in batch], alphas, self.eps, self.standardize)
            return _cached_paths(self.memory, _sum_paths, args, [sums[g]["n_features"] for g in batch], n_targets)

        paths = self._solve_groups(solve, batches, n_parts=len(totals))
        return self._knee_selection(
            labels, columns, paths, lambda g: _first_to_enter(sums[g], self.standardize), self.n_features_in_
        )

    def _solve_groups(self, solve, batches, n_parts):
        """The paths of every group, ``solve(batch)`` giving those of a batch of groups, in threads."""
        paths = [None] * sum(map(len, batches))
        with (
            threadpool_limits(limits=1, user_api="blas"),
            warnings.catch_warnings(record=True) as caught,
            tqdm(total=len(paths), desc="LASSO paths", unit="group", disable=not self.progress) as bar,
        ):
            warnings.simplefilter("always", ConvergenceWarning)
            solved = Parallel(n_jobs=self.n_jobs, prefer="threads", return_as="generator")(
                delayed(solve)(batch) for batch in batches
            )
            for batch, batch_paths in zip(batches, solved):
                for g, path in zip(batch, batch_paths):
                    paths[g] = path
                bar.update(len(batch))
        _summarise_warnings(caught, n_fits=len(paths) * n_parts * len(paths[0][0]))
        return paths

    def _knee_selection(self, labels, columns, paths, first_to_enter, n_features):
        """The fitted selection from every group's path: the knee at ``gamma`` of each curve.

        ``first_to_enter(g)`` is the feature group ``g`` keeps when its path is empty.
        """
        costs = self._knee_costs(labels, columns, n_features)
        support = np.zeros(n_features, dtype=bool)
        coef = np.zeros((paths[0][1].shape[0], n_features))
        curves, knees = [], []
        for g, (label, cols, (curve, coefs)) in enumerate(zip(labels, columns, paths)):
            if self.gamma == 0:
                knee = len(curve) - 1
                keep = np.ones(coefs.shape[1], dtype=bool)
            else:
                knee = find_knee(curve, self.gamma, costs[g])
                keep = np.any(coefs[:, :, knee] != 0, axis=0)
                if not keep.any():
                    keep[first_to_enter(g)] = True
            support[cols] = keep
            coef[:, cols] = coefs[:, :, knee]
            curves.append(curve.assign(group=label))
            alpha, rmse = curve["alpha"].iloc[knee], curve["rmse"].iloc[knee]
            knees.append({"group": label, "alpha": alpha, "n_selected": int(keep.sum()), "rmse": rmse})
        return {
            "support_": support,
            "coef_": coef[0] if len(coef) == 1 else coef,
            "curves_": pd.concat(curves, ignore_index=True)[["group", "alpha", "n_selected", "rmse"]],
            "knees_": pd.DataFrame(knees, columns=["group", "alpha", "n_selected", "rmse"]),
        }

    def _knee_costs(self, labels, columns, n_features):
        """The ``cost`` of :func:`find_knee` for every group: None for the tolerance rule."""
        if self.knee == "tolerance":
            if self.group_costs is not None:
                raise ValueError("group_costs needs knee='cost', got knee='tolerance'")
            return [None] * len(labels)
        if self.group_costs is None:
            widths = [np.arange(n_features)[cols].size for cols in columns]
            return [1 / np.mean(widths)] * len(labels)
        missing = [label for label in labels if label not in self.group_costs]
        if missing:
            raise ValueError(f"group_costs must hold the cost of every group, missing {len(missing)}: {missing[:5]}")
        costs = [self.group_costs[label] for label in labels]
        for label, cost in zip(labels, costs):
            if isinstance(cost, bool) or not isinstance(cost, Real) or not (math.isfinite(cost) and cost >= 0):
                raise ValueError(f"group_costs must hold finite numbers >= 0, got {cost!r} for group {label!r}")
        return [float(cost) for cost in costs]

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


#: Fitted attributes of the selection, computed lazily after partial_fit.
_SELECTION_ATTRIBUTES = ("support_", "coef_", "curves_", "knees_")


def _cached_paths(memory, function, args, widths, n_targets):
    """``function(*args)`` (:func:`_group_paths` of data, :func:`_sum_paths` of cross-products)
    through the array cache of ``memory``: one entry per batch of groups of ``widths`` features."""

    def compute():
        results = function(*args)
        return {
            f"{index}:{name}": values
            for index, (curve, coefs) in enumerate(results)
            for name, values in [*((column, curve[column].to_numpy()) for column in _CURVE_COLUMNS), ("coefs", coefs)]
        }

    def valid(stored):
        names = {f"{index}:{name}" for index in range(len(widths)) for name in (*_CURVE_COLUMNS, "coefs")}
        return stored.keys() == names and all(
            stored[f"{index}:coefs"].ndim == 3
            and stored[f"{index}:coefs"].shape[:2] == (n_targets, width)
            and all(stored[f"{index}:{column}"].shape == stored[f"{index}:coefs"].shape[2:] for column in _CURVE_COLUMNS)
            for index, width in enumerate(widths)
        )

    stored = cached_arrays(memory, function, args, compute, valid)
    return [
        (
            pd.DataFrame({column: stored[f"{index}:{column}"] for column in _CURVE_COLUMNS}),
            stored[f"{index}:coefs"],
        )
        for index in range(len(widths))
    ]


def _group_layout(groups):
    """The group labels in order of first appearance, the columns of each (a slice when
    contiguous) and the batches of groups whose paths are solved together."""
    labels = pd.unique(pd.Series(groups, dtype=object))
    columns = [_as_slice(np.flatnonzero(groups == label)) for label in labels]
    return labels, columns, _batches([np.count_nonzero(groups == label) for label in labels])


def _stream_target(y, classes):
    """How ``partial_fit`` encodes every chunk's target, fixed by the first one: the sorted
    classes (None for values to regress) and the number of encoded columns."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2 or y.dtype.kind == "f":
        if classes is not None:
            raise ValueError(
                f"classes is for class labels, got a float target of shape {y.shape}: floats are values to regress"
            )
        return {"classes": None, "n_targets": 1 if y.ndim == 1 else y.shape[1]}
    classes = np.unique(y if classes is None else np.asarray(classes))
    if len(classes) < 2:
        raise ValueError(
            f"classes must hold at least 2 labels, got {classes.tolist()}: pass every class of the stream "
            "as classes= on the first partial_fit call"
        )
    return {"classes": classes, "n_targets": 1 if len(classes) == 2 else len(classes)}


def _encode_chunk(y, target):
    """A chunk's target encoded as :func:`encode_target` encodes the whole target."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if target["classes"] is None:
        if y.ndim not in (1, 2) or y.dtype.kind not in "biuf":
            raise ValueError(f"y must be numeric, of 1 or 2 dimensions, got dtype {y.dtype} and shape {y.shape}")
        Y = y.astype(np.float64).reshape(len(y), -1)
        if Y.shape[1] != target["n_targets"]:
            raise ValueError(f"y must have {target['n_targets']} column(s) as in the first chunk, got {Y.shape[1]}")
        if not np.isfinite(Y).all():
            raise ValueError(f"y must be finite, got {np.count_nonzero(~np.isfinite(Y))} NaN or infinite values")
        return Y
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D class labels, got shape {y.shape}")
    unknown = ~np.isin(y, target["classes"])
    if unknown.any():
        raise ValueError(
            f"y holds labels {np.unique(y[unknown]).tolist()} that are not in classes {target['classes'].tolist()}"
        )
    return label_binarize(y, classes=target["classes"]).astype(np.float64)


def _streamed_held_out(indices, seed, validation_fraction, cv):
    """Held-out membership of the samples streamed in at ``indices``, as :func:`_held_out_masks`.

    A sample's membership depends only on its index and ``seed`` (splitmix64 of both, as a
    uniform number in [0, 1)), never on how the stream is cut into chunks.
    """
    with np.errstate(over="ignore"):
        z = np.asarray(indices, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    uniform = (z >> np.uint64(11)).astype(np.float64) / 2.0**53
    if cv is None:
        return (uniform < validation_fraction)[:, None]
    return np.floor(uniform * cv).astype(int)[:, None] == np.arange(cv)


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
