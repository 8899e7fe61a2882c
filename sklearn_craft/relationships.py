"""Task relationships: how much of each face task a network's features already carry.

The analysis half of the Low-cost transfer learning paper (section 3, Figures 5, 6 and 11). A
network trained for a *primary* task is probed with a linear *satellite* model: the responses of
one convolutional layer are average-pooled over height and width, and a cross-validated linear
model predicts another (*satellite*) task from them. The score of that probe, for every pair of
network and task, is the task-relationship matrix; the same probe on every layer of one network
is the layer × task matrix, which tells in which layer a task is best represented.

Protocol per task kind (features are standardised inside every fold):

========== ================================================================ ===============
kind       satellite model                                                  default metric
========== ================================================================ ===============
binary     ridge regression to 0/1, threshold chosen on the training fold   accuracy
categorical multinomial logistic regression                                 accuracy
ordinal    ridge regression of the class codes, rounded to the nearest code accuracy
continuous ridge regression                                                 RMSE (and R²)
multilabel binary protocol on each label of a group of columns              mean accuracy
========== ================================================================ ===============

The ridge penalty is chosen by efficient leave-one-out on the training fold (``RidgeCV``) rather
than plain least squares, because pooled layers often have as many channels as the satellite data
set has images, where unpenalised least squares interpolates the training fold.
"""

import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    mean_absolute_error,
    r2_score,
    root_mean_squared_error,
)
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_array, check_random_state
from torch import nn
from tqdm.auto import tqdm

from sklearn_craft.pooling import ActivationPooler

__all__ = ["layer_task_matrix", "relative_drop", "task_relationship_matrix"]

TASK_KINDS = ("binary", "categorical", "ordinal", "continuous")

#: metric name -> (function(y_true, y_pred), greater_is_better)
METRICS = {
    "accuracy": (accuracy_score, True),
    "balanced_accuracy": (balanced_accuracy_score, True),
    "rmse": (root_mean_squared_error, False),
    "mae": (mean_absolute_error, False),
    "r2": (r2_score, True),
}

_CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy")
_REGRESSION_METRICS = ("rmse", "mae", "r2")
_ALLOWED_METRICS = {
    "binary": _CLASSIFICATION_METRICS,
    "categorical": _CLASSIFICATION_METRICS,
    "multilabel": _CLASSIFICATION_METRICS,
    # Ordinal predictions are class codes, so distances between them (in bins) are meaningful too.
    "ordinal": _CLASSIFICATION_METRICS + _REGRESSION_METRICS,
    "continuous": _REGRESSION_METRICS,
}
_DEFAULT_METRICS = {
    "binary": ("accuracy",),
    "categorical": ("accuracy",),
    "multilabel": ("accuracy",),
    "ordinal": ("accuracy",),
    "continuous": ("rmse", "r2"),
}

_RIDGE_ALPHAS = np.logspace(-3, 5, 17)


def _best_threshold(scores, y):
    """Threshold on ``scores`` maximising the accuracy of ``scores > threshold`` against 0/1 ``y``.

    Ties are broken towards 0.5, the natural threshold of a 0/1 regression.
    """
    order = np.argsort(scores, kind="stable")
    s, t = scores[order], y[order]
    n = len(s)
    # A cut at position i predicts 0 for s[:i] and 1 for s[i:].
    zeros_below = np.concatenate([[0], np.cumsum(t == 0)])
    ones_above = t.sum() - np.concatenate([[0], np.cumsum(t)])
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
    """Ridge regression to 0/1 targets turned into labels by a threshold fitted per target."""

    def __init__(self, alphas=_RIDGE_ALPHAS):
        self.alphas = alphas

    def fit(self, X, y):
        y = np.asarray(y, dtype=float)
        self.ridge_ = RidgeCV(alphas=self.alphas, alpha_per_target=y.ndim == 2).fit(X, y)
        fitted = self.ridge_.predict(X)
        if y.ndim == 1:
            self.threshold_ = _best_threshold(fitted, y)
        else:
            self.threshold_ = np.array([_best_threshold(fitted[:, j], y[:, j]) for j in range(y.shape[1])])
        return self

    def predict(self, X):
        return (self.ridge_.predict(X) > self.threshold_).astype(int)


class _RoundedRidge(ClassifierMixin, BaseEstimator):
    """Ridge regression of ordinal class codes, rounded to the nearest code in ``[0, n_classes)``."""

    def __init__(self, n_classes, alphas=_RIDGE_ALPHAS):
        self.n_classes = n_classes
        self.alphas = alphas

    def fit(self, X, y):
        self.ridge_ = RidgeCV(alphas=self.alphas).fit(X, np.asarray(y, dtype=float))
        return self

    def predict(self, X):
        return np.clip(np.rint(self.ridge_.predict(X)), 0, self.n_classes - 1).astype(int)


@dataclass
class _Task:
    """One satellite task, encoded: labelled row positions, targets, metrics and CV folds."""

    name: str
    kind: str
    columns: tuple
    rows: np.ndarray
    y: np.ndarray
    n_classes: int
    metrics: tuple
    folds: list

    def satellite(self):
        if self.kind in ("binary", "multilabel"):
            model = _ThresholdedRidge()
        elif self.kind == "categorical":
            model = LogisticRegression(max_iter=1000)
        elif self.kind == "ordinal":
            model = _RoundedRidge(self.n_classes)
        else:
            model = RidgeCV(alphas=_RIDGE_ALPHAS)
        return make_pipeline(StandardScaler(), model)

    def score(self, metric, y_true, y_pred):
        function = METRICS[metric][0]
        if self.kind == "multilabel":
            return float(np.mean([function(y_true[:, j], y_pred[:, j]) for j in range(y_true.shape[1])]))
        return float(function(y_true, y_pred))


def _sorted_labels(values):
    labels = list(pd.unique(values))
    try:
        return sorted(labels)
    except TypeError:
        return labels


def _infer_kind(column):
    """Task kind of one labelled (NaN-free) column."""
    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype) and dtype.ordered:
        return "ordinal"
    if column.nunique() == 2:
        return "binary"
    # Categorical dtypes are not numeric, so unordered categories land here too.
    if pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
        return "categorical"
    values = column.to_numpy(dtype=float)
    return "categorical" if np.all(values == np.round(values)) else "continuous"


def _check_varies(name, column):
    if column.nunique() < 2:
        raise ValueError(
            f"task {name!r} has a single value ({column.iloc[0]!r}) among its labelled rows; "
            "a satellite task needs at least two classes or distinct values"
        )


def _encode(name, column, kind):
    """Encode the labelled values of ``column`` for ``kind``; returns (y, n_classes)."""
    n_unique = column.nunique()
    if kind == "binary":
        if n_unique != 2:
            raise ValueError(f"task {name!r} is declared binary but has {n_unique} distinct labels")
        positive = _sorted_labels(column)[1]
        return (column == positive).to_numpy(dtype=float), 2
    if kind == "continuous":
        if not pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype):
            raise ValueError(f"task {name!r} is declared continuous but has non-numeric dtype {column.dtype}")
        return column.to_numpy(dtype=float), 0
    if kind == "ordinal" and isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.codes.to_numpy(), len(column.dtype.categories)
    labels = _sorted_labels(column)
    codes = pd.Categorical(column, categories=labels).codes
    return np.asarray(codes), len(labels)


def _resolve_task_types(tasks, task_types):
    """List of (name, kind or None for inferred, columns) in the order of ``tasks.columns``."""
    if task_types is None:
        task_types = {}
    if not isinstance(task_types, Mapping):
        raise TypeError(
            f"task_types must be a mapping task -> kind or list of columns, got {type(task_types).__name__}"
        )
    columns = list(tasks.columns)
    kinds, groups = {}, {}
    for name, value in task_types.items():
        if isinstance(value, str):
            if value not in TASK_KINDS:
                raise ValueError(
                    f"task_types[{name!r}] must be one of {TASK_KINDS} or a list of columns, got {value!r}"
                )
            if name not in columns:
                raise ValueError(f"task_types names {name!r}, which is not a column of tasks {columns}")
            kinds[name] = value
        elif isinstance(value, (list, tuple)):
            missing = [c for c in value if c not in columns]
            if missing or len(value) < 2:
                raise ValueError(
                    f"task_types[{name!r}] must list at least two columns of tasks, got {list(value)!r}"
                    + (f" (not columns: {missing})" if missing else "")
                )
            if name in columns and name not in value:
                raise ValueError(f"multi-label group {name!r} has the name of another column of tasks")
            groups[name] = tuple(value)
        else:
            raise TypeError(
                f"task_types[{name!r}] must be a task kind string or a list of columns, "
                f"got {type(value).__name__}"
            )
    grouped = {c for members in groups.values() for c in members}
    conflict = sorted(grouped & set(kinds), key=str)
    if conflict:
        raise ValueError(
            f"columns {conflict} are in a multi-label group and cannot also have a kind of their own"
        )

    resolved, emitted = [], set()
    for column in columns:
        if column not in grouped:
            resolved.append((column, kinds.get(column), (column,)))
            continue
        for name, members in groups.items():
            if column in members and name not in emitted:
                emitted.add(name)
                resolved.append((name, "multilabel", members))
    return resolved


def _resolve_metrics(name, kind, scoring):
    if scoring is None or (isinstance(scoring, Mapping) and name not in scoring):
        return _DEFAULT_METRICS[kind]
    main = scoring[name] if isinstance(scoring, Mapping) else scoring
    if main not in _ALLOWED_METRICS[kind]:
        raise ValueError(
            f"scoring for task {name!r} ({kind}) must be one of {_ALLOWED_METRICS[kind]}, got {main!r}"
        )
    return (main,) + tuple(m for m in _DEFAULT_METRICS[kind] if m != main)


def _folds(kind, y, cv, seed):
    if isinstance(cv, numbers.Integral):
        splitter_class = StratifiedKFold if kind in ("binary", "categorical", "ordinal") else KFold
        cv = splitter_class(n_splits=cv, shuffle=True, random_state=seed)
    # Multi-label rows are split on their label combination: a stratifying splitter sees one class
    # per combination.
    target = np.unique(y, axis=0, return_inverse=True)[1].ravel() if y.ndim == 2 else y
    return list(cv.split(np.zeros((len(y), 1)), target))


def _prepare_tasks(tasks, task_types, scoring, cv, random_state):
    if not isinstance(tasks, pd.DataFrame):
        raise TypeError(
            f"tasks must be a pandas DataFrame with one column per task, got {type(tasks).__name__}"
        )
    if tasks.shape[1] == 0 or tasks.shape[0] == 0:
        raise ValueError(f"tasks must have at least one row and one column, got shape {tasks.shape}")
    if not tasks.columns.is_unique:
        raise ValueError(f"tasks must have unique column names, got {list(tasks.columns)}")
    if isinstance(cv, numbers.Integral):
        if isinstance(cv, bool) or cv < 2:
            raise ValueError(f"cv must be an integer >= 2 or a cross-validation splitter, got {cv!r}")
    elif not hasattr(cv, "split"):
        raise TypeError(f"cv must be an integer >= 2 or a cross-validation splitter, got {type(cv).__name__}")
    if scoring is not None and not isinstance(scoring, (str, Mapping)):
        raise TypeError(
            f"scoring must be None, a metric name or a mapping task -> metric name, got {scoring!r}"
        )

    resolved = _resolve_task_types(tasks, task_types)
    if isinstance(scoring, Mapping):
        unknown = sorted(set(scoring) - {name for name, _, _ in resolved}, key=str)
        if unknown:
            raise ValueError(f"scoring names unknown tasks {unknown}")
    # One seed for every task, so each task is split identically for every source and every call.
    seed = check_random_state(random_state).randint(np.iinfo(np.int32).max)

    prepared = []
    for name, kind, columns in resolved:
        frame = tasks[list(columns)]
        labelled = frame.notna().all(axis=1).to_numpy()
        if not labelled.any():
            raise ValueError(f"task {name!r} has no labelled rows")
        rows = np.flatnonzero(labelled)
        if kind == "multilabel":
            targets = []
            for column in columns:
                values = frame[column][labelled]
                if values.nunique() != 2:
                    raise ValueError(
                        f"column {column!r} of multi-label group {name!r} must be binary, "
                        f"got {values.nunique()} distinct labels"
                    )
                targets.append(_encode(column, values, "binary")[0])
            y, n_classes = np.column_stack(targets), 2
        else:
            values = frame[columns[0]][labelled]
            _check_varies(name, values)
            kind = kind or _infer_kind(values)
            y, n_classes = _encode(name, values, kind)
        if isinstance(cv, numbers.Integral) and len(rows) < cv:
            raise ValueError(f"task {name!r} has {len(rows)} labelled rows, fewer than cv={cv} folds")
        metrics = _resolve_metrics(name, kind, scoring)
        prepared.append(_Task(name, kind, columns, rows, y, n_classes, metrics, _folds(kind, y, cv, seed)))
    return prepared


def _fit_satellite(source, features, task):
    """Cross-validated scores of one source's features on one task: list of detail rows."""
    X = features[task.rows]
    records = []
    for fold, (train, test) in enumerate(task.folds):
        predicted = task.satellite().fit(X[train], task.y[train]).predict(X[test])
        for metric in task.metrics:
            records.append((source, task.name, fold, metric, task.score(metric, task.y[test], predicted)))
    return records


def _score_sources(features, prepared, n_jobs, progress, index_name):
    """Relationship matrix and details of precomputed ``features`` (name -> array) on ``prepared`` tasks."""
    jobs = [
        delayed(_fit_satellite)(source, array, task)
        for source, array in features.items()
        for task in prepared
    ]
    results = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)
    records = [
        r
        for result in tqdm(results, total=len(jobs), desc="satellite fits", disable=not progress)
        for r in result
    ]
    details = pd.DataFrame.from_records(records, columns=[index_name, "task", "fold", "metric", "value"])

    main = {task.name: task.metrics[0] for task in prepared}
    is_main = details["metric"].to_numpy() == details["task"].map(main).to_numpy()
    matrix = (
        details[is_main]
        .groupby([index_name, "task"], sort=False)["value"]
        .mean()
        .unstack("task")
        .reindex(index=list(features), columns=[task.name for task in prepared])
    )
    matrix.index.name, matrix.columns.name = index_name, "task"
    matrix.attrs = {
        "metric": main,
        "greater_is_better": {name: METRICS[metric][1] for name, metric in main.items()},
        "task_type": {task.name: task.kind for task in prepared},
    }
    return matrix, details


def _check_alignment(name, value, tasks):
    if len(value) != len(tasks):
        raise ValueError(f"{name} has {len(value)} samples but tasks has {len(tasks)} rows")
    index = getattr(value, "index", None)
    if isinstance(index, pd.Index) and not index.equals(tasks.index):
        raise ValueError(f"the index of {name} is not aligned with the index of tasks")


def _pooler(model, layers, memory, batch_size, device, preprocess, progress):
    return ActivationPooler(
        model,
        layers=layers,
        batch_size=batch_size,
        device=device,
        preprocess=preprocess,
        progress=progress,
        memory=memory,
    )


def _last_conv(model, X, **pooler_params):
    """Name of the last convolution of ``model`` in forward order."""
    return _pooler(model, "conv", **pooler_params).fit(X).layers_[-1]


def task_relationship_matrix(
    sources,
    X,
    tasks,
    *,
    layer=None,
    task_types=None,
    cv=5,
    scoring=None,
    return_details=False,
    n_jobs=None,
    memory=None,
    random_state=None,
    batch_size=64,
    device="cpu",
    preprocess=None,
    progress=False,
):
    """Cross-validated score of a linear satellite of every source on every task.

    Each cell is how well a linear model on the (pooled) features of one source, e.g. a network
    trained for a primary task, predicts one satellite task (the paper's Figure 5, left). Rows
    are sources, columns are tasks.

    Parameters
    ----------
    sources : mapping of str to nn.Module or array-like of shape (n_samples, n_features)
        A network is pooled with :class:`~sklearn_craft.pooling.ActivationPooler` at ``layer``
        (one forward pass over ``X`` per network); an array (or DataFrame, whose index must
        match ``tasks.index``) is used as features directly.
    X : image input accepted by :class:`~sklearn_craft.pooling.ActivationPooler`, or None
        The images, in the row order of ``tasks``. Only needed when a source is a network.
    tasks : pandas.DataFrame of shape (n_samples, n_columns)
        One column per satellite task; NaN marks a missing label, which removes that row from
        that task only. The kind of each column is inferred: bool or two distinct labels →
        ``"binary"``; an ordered pandas Categorical → ``"ordinal"``; strings, an unordered
        Categorical or integer-valued numbers → ``"categorical"``; other numbers →
        ``"continuous"``.
    layer : str or mapping of str to str, default=None
        Layer pooled from every network source, or a mapping source name → layer. None (or a
        network absent from the mapping) uses the last convolution of the network.
    task_types : mapping, default=None
        Overrides of the inferred kinds. A value ``"binary"``, ``"categorical"``, ``"ordinal"``
        or ``"continuous"`` sets the kind of the column named by the key. A list of binary
        columns makes a multi-label group, a new task named by the key, e.g.
        ``{"accessories": ["eyeglasses", "hat"]}``: the listed columns are scored together (mean
        accuracy over labels, rows with any label missing are dropped) and no longer appear on
        their own. The group takes the place of its first column.
    cv : int or cross-validation splitter, default=5
        Number of folds (stratified and shuffled for binary, categorical and ordinal tasks,
        shuffled K-fold otherwise) or a splitter whose ``split(X, y)`` is given the task's labels
        (the label combination for a multi-label group). Every source sees the same folds.
    scoring : str or mapping of str to str, default=None
        Main metric of every task, or a mapping task → metric for some tasks. One of
        ``"accuracy"``, ``"balanced_accuracy"`` (binary, categorical, ordinal, multi-label),
        ``"rmse"``, ``"mae"``, ``"r2"`` (continuous; ordinal, computed on the class codes).
        None uses accuracy for class tasks and RMSE for continuous ones.
    return_details : bool, default=False
        Also return the per-fold scores.
    n_jobs : int, default=None
        Number of (source, task) satellites fitted in parallel with joblib.
    memory : str or joblib.Memory, default=None
        Passed to the pooler to cache pooled activations.
    random_state : int, RandomState instance or None, default=None
        Seed of the fold shuffling; an int makes the result reproducible.
    batch_size, device, preprocess : see :class:`~sklearn_craft.pooling.ActivationPooler`
    progress : bool, default=False
        Show progress bars for pooling and fitting.

    Returns
    -------
    matrix : pandas.DataFrame of shape (n_sources, n_tasks)
        Mean over folds of the main metric. ``matrix.attrs`` holds the mappings task → metric
        (``"metric"``), task → bool (``"greater_is_better"``) and task → kind (``"task_type"``);
        :func:`relative_drop` reads the direction from there.
    details : pandas.DataFrame
        Only when ``return_details=True``: long table with columns source, task, fold, metric,
        value. Continuous tasks report both RMSE and R²; every task reports its main metric.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from sklearn_craft.relationships import task_relationship_matrix
    >>> rng = np.random.RandomState(0)
    >>> informative, noise = rng.normal(size=(200, 5)), rng.normal(size=(200, 5))
    >>> tasks = pd.DataFrame({"score": informative @ rng.normal(size=5), "flag": informative[:, 0] > 0})
    >>> matrix = task_relationship_matrix({"net_a": informative, "net_b": noise}, None, tasks, random_state=0)
    >>> bool(matrix.loc["net_a", "flag"] > matrix.loc["net_b", "flag"])
    True
    >>> matrix.attrs["metric"]
    {'score': 'rmse', 'flag': 'accuracy'}
    """
    prepared = _prepare_tasks(tasks, task_types, scoring, cv, random_state)
    if not isinstance(sources, Mapping) or len(sources) == 0:
        raise TypeError(
            f"sources must be a non-empty mapping name -> nn.Module or feature array, got {sources!r:.80}"
        )
    networks = [name for name, value in sources.items() if isinstance(value, nn.Module)]
    if layer is not None and not isinstance(layer, (str, Mapping)):
        raise TypeError(
            f"layer must be None, a layer name or a mapping source -> layer name, got {type(layer).__name__}"
        )
    if isinstance(layer, Mapping):
        unknown = [name for name in layer if name not in networks]
        if unknown:
            raise ValueError(
                f"layer names {unknown}, which are not network sources (network sources: {networks})"
            )
    if networks and X is None:
        raise ValueError(f"X is required to pool the network sources {networks}")
    if X is not None:
        _check_alignment("X", X, tasks)

    pooler_params = dict(
        memory=memory, batch_size=batch_size, device=device, preprocess=preprocess, progress=progress
    )
    features = {}
    for name, value in sources.items():
        if isinstance(value, nn.Module):
            source_layer = layer.get(name) if isinstance(layer, Mapping) else layer
            if source_layer is None:
                source_layer = _last_conv(value, X, **pooler_params)
            features[name] = (
                _pooler(value, [source_layer], **pooler_params).fit_transform(X).astype(np.float64)
            )
        else:
            if not hasattr(value, "shape") and not isinstance(value, (list, tuple)):
                raise TypeError(
                    f"sources[{name!r}] must be an nn.Module or a 2-D feature array, "
                    f"got {type(value).__name__}"
                )
            _check_alignment(f"sources[{name!r}]", value, tasks)
            features[name] = check_array(value, dtype=np.float64, input_name=f"sources[{name!r}]")

    matrix, details = _score_sources(features, prepared, n_jobs, progress, "source")
    return (matrix, details) if return_details else matrix


def layer_task_matrix(
    model,
    X,
    tasks,
    layers="conv",
    cv=5,
    *,
    task_types=None,
    scoring=None,
    return_details=False,
    n_jobs=None,
    memory=None,
    random_state=None,
    batch_size=64,
    device="cpu",
    preprocess=None,
    progress=False,
):
    """Satellite score of every task on the pooled responses of every layer of one network.

    The paper's Figure 11: in which layer of a network trained for a primary task each satellite
    task is best represented. All layers are pooled in a single pass over ``X``; the protocol of
    each task is that of :func:`task_relationship_matrix`.

    Parameters
    ----------
    model : torch.nn.Module
        The network; it is not modified.
    X : image input accepted by :class:`~sklearn_craft.pooling.ActivationPooler`
        The images, in the row order of ``tasks``.
    tasks : pandas.DataFrame of shape (n_samples, n_columns)
        One column per satellite task (see :func:`task_relationship_matrix`).
    layers : "conv" or list of str, default="conv"
        Layers to probe, as accepted by :class:`~sklearn_craft.pooling.ActivationPooler`.
    cv : int or cross-validation splitter, default=5
        See :func:`task_relationship_matrix`.
    task_types, scoring, return_details, n_jobs, memory, random_state : \
            see :func:`task_relationship_matrix`
    batch_size, device, preprocess, progress : see :class:`~sklearn_craft.pooling.ActivationPooler`

    Returns
    -------
    matrix : pandas.DataFrame of shape (n_layers, n_tasks)
        Mean over folds of each task's main metric, layers in forward order; ``attrs`` as in
        :func:`task_relationship_matrix`.
    best_layer : pandas.Series
        Task → the layer with the best score (highest, or lowest for error metrics).
    details : pandas.DataFrame
        Only when ``return_details=True``: columns layer, task, fold, metric, value.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from torch import nn
    >>> from sklearn_craft.relationships import layer_task_matrix
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    >>> images = np.random.RandomState(0).rand(40, 3, 8, 8).astype(np.float32)
    >>> tasks = pd.DataFrame({"brightness": images.mean(axis=(1, 2, 3))})
    >>> matrix, best_layer = layer_task_matrix(net, images, tasks, cv=3, random_state=0)
    >>> matrix.shape
    (2, 1)
    >>> best_layer["brightness"] in matrix.index
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    prepared = _prepare_tasks(tasks, task_types, scoring, cv, random_state)
    _check_alignment("X", X, tasks)
    pooler = _pooler(model, layers, memory, batch_size, device, preprocess, progress)
    pooled = pooler.fit_transform(X).astype(np.float64)
    layer_of_column = np.array([name.rsplit(":", 1)[0] for name in pooler.get_feature_names_out()])
    features = {layer: pooled[:, layer_of_column == layer] for layer in pooler.layers_}

    matrix, details = _score_sources(features, prepared, n_jobs, progress, "layer")
    best_layer = _best_rows(matrix)
    best_layer.name = "best_layer"
    return (matrix, best_layer, details) if return_details else (matrix, best_layer)


def _greater_is_better(matrix, greater_is_better=None):
    """Per-column direction of ``matrix``: the argument, else ``matrix.attrs``, else True."""
    from_attrs = matrix.attrs.get("greater_is_better", {})
    if isinstance(greater_is_better, (bool, np.bool_)):
        return pd.Series(bool(greater_is_better), index=matrix.columns)
    if greater_is_better is None:
        greater_is_better = {}
    elif not isinstance(greater_is_better, Mapping):
        raise TypeError(
            f"greater_is_better must be None, a bool or a mapping task -> bool, got {greater_is_better!r}"
        )
    return pd.Series(
        [bool(greater_is_better.get(c, from_attrs.get(c, True))) for c in matrix.columns],
        index=matrix.columns,
    )


def _best_rows(matrix, greater_is_better=None):
    """Row label of the best score of every column."""
    direction = _greater_is_better(matrix, greater_is_better)
    return pd.Series(
        {c: matrix[c].idxmax() if direction[c] else matrix[c].idxmin() for c in matrix.columns}, dtype=object
    )


def relative_drop(matrix, reference=None, *, greater_is_better=None):
    """Percentage loss of every cell against a reference score of its task (lower is better).

    The paper's Figure 5, right: how much is lost by using a network trained for another task
    instead of one trained for this task. For a metric where greater is better (accuracy, R²)
    the drop is ``100 * (reference - score) / |reference|``; for an error metric (RMSE, MAE) an
    increase is a loss: ``100 * (score - reference) / |reference|``. Negative values mean the
    cell beats the reference.

    Parameters
    ----------
    matrix : pandas.DataFrame of shape (n_sources, n_tasks)
        Scores, e.g. from :func:`task_relationship_matrix`.
    reference : pandas.Series or mapping of task to float, default=None
        Reference score of every task (e.g. a network trained for that task); it must cover all
        columns. None uses the matrix diagonal: the cell of the source named like the task.
        Tasks without such a source get NaN.
    greater_is_better : bool or mapping of task to bool, default=None
        Direction of the metric of all tasks or per task. Tasks not given take the direction
        stored by :func:`task_relationship_matrix` in ``matrix.attrs["greater_is_better"]``,
        and default to True (accuracy-like) when the matrix has none.

    Returns
    -------
    drop : pandas.DataFrame of shape (n_sources, n_tasks)
        Percentage drop; ``attrs`` records the metric ``"relative_drop_pct"``, lower is better.

    Examples
    --------
    >>> import pandas as pd
    >>> from sklearn_craft.relationships import relative_drop
    >>> scores = pd.DataFrame({"gender": [0.95, 0.76], "age": [0.40, 0.50]}, index=["gender", "age"])
    >>> relative_drop(scores).round(1)
            gender   age
    gender     0.0  20.0
    age       20.0   0.0
    """
    if not isinstance(matrix, pd.DataFrame):
        raise TypeError(f"matrix must be a pandas DataFrame, got {type(matrix).__name__}")
    if reference is None:
        shared = [task for task in matrix.columns if task in matrix.index]
        if not shared:
            raise ValueError(
                "reference=None uses the matrix diagonal, but no task shares its name with a source "
                f"(sources {list(matrix.index)}, tasks {list(matrix.columns)}); pass reference scores"
            )
        reference = pd.Series({task: matrix.at[task, task] for task in shared}, dtype=float)
    else:
        if isinstance(reference, Mapping):
            reference = pd.Series(reference, dtype=float)
        elif not isinstance(reference, pd.Series):
            raise TypeError(
                "reference must be None, a pandas Series or a mapping task -> score, "
                f"got {type(reference).__name__}"
            )
        missing = [task for task in matrix.columns if task not in reference.index]
        if missing:
            raise ValueError(f"reference has no score for tasks {missing}")
    reference = reference.reindex(matrix.columns).astype(float)
    if (reference == 0).any():
        raise ValueError(
            f"reference scores must be non-zero, got 0 for {list(reference.index[reference == 0])}"
        )

    sign = _greater_is_better(matrix, greater_is_better).map({True: 1.0, False: -1.0})
    # "+ 0.0" turns the -0.0 of error metrics at the reference into 0.0.
    drop = (
        matrix.astype(float).rsub(reference, axis=1).mul(sign, axis=1).div(reference.abs(), axis=1) * 100
        + 0.0
    )
    drop.attrs = {
        "metric": {task: "relative_drop_pct" for task in matrix.columns},
        "greater_is_better": {task: False for task in matrix.columns},
    }
    return drop
