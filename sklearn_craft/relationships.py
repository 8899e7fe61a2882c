"""Task relationships: how much of each face task a network's features already carry.

The analysis half of the Low-cost transfer learning paper (section 3, Figures 5, 6 and 11). A
network trained for a *primary* task is probed with a linear *satellite* model: the responses of
one convolutional layer are average-pooled over height and width, and a cross-validated linear
model predicts another (*satellite*) task from them. The score of that probe, for every pair of
network and task, is the task-relationship matrix; the same probe on every layer of one network
is the layer × task matrix, which tells in which layer a task is best represented.

Each task is encoded by :func:`sklearn_craft.targets.encode_tasks` (its kind inferred from the
column or given) and probed by the satellite of its kind (:func:`sklearn_craft.satellites.make_satellite`),
fitted on every training fold and scored on the held-out one:

======================== ===============
kind                     default metric
======================== ===============
binary                   accuracy
multiclass               accuracy
ordinal                  accuracy
multilabel-indicator     mean accuracy over the labels of the group
continuous               RMSE (and R²)
======================== ===============
"""

import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    mean_absolute_error,
    r2_score,
    root_mean_squared_error,
)
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.utils import check_array, check_random_state
from torch import nn
from tqdm.auto import tqdm

from .pooling import ActivationPooler
from .satellites import make_satellite
from .targets import Task, encode_tasks

__all__ = ["best_rows", "layer_task_matrix", "relative_drop", "score_direction", "task_relationship_matrix"]

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
    "multiclass": _CLASSIFICATION_METRICS,
    "multilabel-indicator": _CLASSIFICATION_METRICS,
    # Ordinal predictions are class codes, so distances between them (in bins) are meaningful too.
    "ordinal": _CLASSIFICATION_METRICS + _REGRESSION_METRICS,
    "continuous": _REGRESSION_METRICS,
}
_DEFAULT_METRICS = {
    "binary": ("accuracy",),
    "multiclass": ("accuracy",),
    "multilabel-indicator": ("accuracy",),
    "ordinal": ("accuracy",),
    "continuous": ("rmse", "r2"),
}


@dataclass
class _Protocol:
    """How one encoded task is scored: its metrics (main first) and cross-validation folds."""

    task: Task
    metrics: tuple
    folds: list

    def score(self, metric, y_true, y_pred):
        function = METRICS[metric][0]
        if self.task.kind == "multilabel-indicator":
            return float(np.mean([function(y_true[:, j], y_pred[:, j]) for j in range(y_true.shape[1])]))
        return float(function(y_true, y_pred))


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
        splitter_class = StratifiedKFold if kind in ("binary", "multiclass", "ordinal") else KFold
        cv = splitter_class(n_splits=cv, shuffle=True, random_state=seed)
    # Multi-label rows are split on their label combination: a stratifying splitter sees one class
    # per combination.
    target = np.unique(y, axis=0, return_inverse=True)[1].ravel() if y.ndim == 2 else y
    return list(cv.split(np.zeros((len(y), 1)), target))


def _prepare_tasks(tasks, task_types, scoring, cv, random_state):
    """Encode the tasks and give each its scoring protocol."""
    if isinstance(cv, numbers.Integral):
        if isinstance(cv, bool) or cv < 2:
            raise ValueError(f"cv must be an integer >= 2 or a cross-validation splitter, got {cv!r}")
    elif not hasattr(cv, "split"):
        raise TypeError(f"cv must be an integer >= 2 or a cross-validation splitter, got {type(cv).__name__}")
    if scoring is not None and not isinstance(scoring, (str, Mapping)):
        raise TypeError(
            f"scoring must be None, a metric name or a mapping task -> metric name, got {scoring!r}"
        )
    encoded = encode_tasks(tasks, task_types)
    if isinstance(scoring, Mapping):
        unknown = sorted(set(scoring) - {task.name for task in encoded}, key=str)
        if unknown:
            raise ValueError(f"scoring names unknown tasks {unknown}")
    # One seed for every task, so each task is split identically for every source and every call.
    seed = check_random_state(random_state).randint(np.iinfo(np.int32).max)
    prepared = []
    for task in encoded:
        if isinstance(cv, numbers.Integral) and len(task.rows) < cv:
            raise ValueError(f"task {task.name!r} has {len(task.rows)} labelled rows, fewer than cv={cv} folds")
        metrics = _resolve_metrics(task.name, task.kind, scoring)
        prepared.append(_Protocol(task, metrics, _folds(task.kind, task.y, cv, seed)))
    return prepared


def _fit_satellite(source, features, protocol):
    """Cross-validated scores of one source's features on one task: list of detail rows."""
    task = protocol.task
    X = features[task.rows]
    records = []
    for fold, (train, test) in enumerate(protocol.folds):
        satellite = make_satellite(task.kind, n_classes=task.n_classes)
        predicted = satellite.fit(X[train], task.y[train]).predict(X[test])
        for metric in protocol.metrics:
            records.append((source, task.name, fold, metric, protocol.score(metric, task.y[test], predicted)))
    return records


def _score_sources(features, prepared, n_jobs, progress, index_name):
    """Relationship matrix and details of precomputed ``features`` (name -> array) on ``prepared`` tasks."""
    jobs = [
        delayed(_fit_satellite)(source, array, protocol)
        for source, array in features.items()
        for protocol in prepared
    ]
    results = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)
    records = [
        r
        for result in tqdm(results, total=len(jobs), desc="satellite fits", disable=not progress)
        for r in result
    ]
    details = pd.DataFrame.from_records(records, columns=[index_name, "task", "fold", "metric", "value"])

    main = {protocol.task.name: protocol.metrics[0] for protocol in prepared}
    is_main = details["metric"].to_numpy() == details["task"].map(main).to_numpy()
    matrix = (
        details[is_main]
        .groupby([index_name, "task"], sort=False)["value"]
        .mean()
        .unstack("task")
        .reindex(index=list(features), columns=[protocol.task.name for protocol in prepared])
    )
    matrix.index.name, matrix.columns.name = index_name, "task"
    matrix.attrs = {
        "metric": main,
        "greater_is_better": {name: METRICS[metric][1] for name, metric in main.items()},
        "task_type": {protocol.task.name: protocol.task.kind for protocol in prepared},
    }
    return matrix, details


def _check_alignment(name, value, tasks):
    if len(value) != len(tasks):
        raise ValueError(f"{name} has {len(value)} samples but tasks has {len(tasks)} rows")
    index = getattr(value, "index", None)
    if isinstance(index, pd.Index) and not index.equals(tasks.index):
        raise ValueError(f"the index of {name} is not aligned with the index of tasks")


def _pooler(model, layers, memory, batch_size, device, preprocess, progress, num_workers):
    return ActivationPooler(
        model,
        layers=layers,
        batch_size=batch_size,
        device=device,
        preprocess=preprocess,
        progress=progress,
        memory=memory,
        num_workers=num_workers,
    )


def _last_conv(model, X, **pooler_params):
    """Name of the last convolution of ``model`` in forward order."""
    return _pooler(model, "conv", **pooler_params).fit(X).layers_[-1]


def _source_pooler(model, X, layer, pooler_params):
    """The fitted pooler of one network source at ``layer`` (its last convolution when None)."""
    if layer is None:
        layer = _last_conv(model, X, **pooler_params)
    return _pooler(model, [layer], **pooler_params).fit(X)


def _pool_source(pooler, X):
    """Pooled responses (float64) of one fitted source pooler."""
    return pooler.transform(X).astype(np.float64)


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
    num_workers=0,
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
        Categorical or integer-valued numbers → ``"multiclass"``; other numbers →
        ``"continuous"`` (see :func:`sklearn_craft.targets.encode_tasks`).
    layer : str or mapping of str to str, default=None
        Layer pooled from every network source, or a mapping source name → layer. None (or a
        network absent from the mapping) uses the last convolution of the network.
    task_types : mapping, default=None
        Overrides of the inferred kinds. A value ``"binary"``, ``"multiclass"``, ``"ordinal"``
        or ``"continuous"`` sets the kind of the column named by the key. A list of binary
        columns makes a multi-label group, a new task named by the key, e.g.
        ``{"accessories": ["eyeglasses", "hat"]}``: the listed columns are scored together (mean
        accuracy over labels, rows with any label missing are dropped) and no longer appear on
        their own. The group takes the place of its first column.
    cv : int or cross-validation splitter, default=5
        Number of folds (stratified and shuffled for binary, multiclass and ordinal tasks,
        shuffled K-fold otherwise) or a splitter whose ``split(X, y)`` is given the task's labels
        (the label combination for a multi-label group). Every source sees the same folds.
    scoring : str or mapping of str to str, default=None
        Main metric of every task, or a mapping task → metric for some tasks. One of
        ``"accuracy"``, ``"balanced_accuracy"`` (binary, multiclass, ordinal, multi-label),
        ``"rmse"``, ``"mae"``, ``"r2"`` (continuous; ordinal, computed on the class codes).
        None uses accuracy for class tasks and RMSE for continuous ones.
    return_details : bool, default=False
        Also return the per-fold scores.
    n_jobs : int, default=None
        Number of joblib workers that pool the network sources (one network per worker, in
        processes by default) and then fit the (source, task) satellites. The results do not
        depend on it; the joblib backend (``joblib.parallel_config``, e.g. ``"dask"`` for a
        cluster) decides where the workers run.
    memory : str or joblib.Memory, default=None
        Passed to the pooler to cache pooled activations (a folder every worker can reach).
    random_state : int, RandomState instance or None, default=None
        Seed of the fold shuffling; an int makes the result reproducible.
    batch_size, device, preprocess, num_workers : see :class:`~sklearn_craft.pooling.ActivationPooler`
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

    features = {}
    for name, value in sources.items():
        if isinstance(value, nn.Module):
            continue
        if not hasattr(value, "shape") and not isinstance(value, (list, tuple)):
            raise TypeError(
                f"sources[{name!r}] must be an nn.Module or a 2-D feature array, got {type(value).__name__}"
            )
        _check_alignment(f"sources[{name!r}]", value, tasks)
        features[name] = check_array(value, dtype=np.float64, input_name=f"sources[{name!r}]")
    pooler_params = dict(
        memory=memory,
        batch_size=batch_size,
        device=device,
        preprocess=preprocess,
        progress=progress,
        num_workers=num_workers,
    )
    # Fitting traces the networks with torch.fx, which patches torch functions for the whole
    # process: done here, one after the other, so that no thread traces while another runs a network.
    poolers = [
        _source_pooler(sources[name], X, layer.get(name) if isinstance(layer, Mapping) else layer, pooler_params)
        for name in networks
    ]
    pooled = Parallel(n_jobs=n_jobs)(delayed(_pool_source)(pooler, X) for pooler in poolers)
    features.update(zip(networks, pooled))
    features = {name: features[name] for name in sources}

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
    num_workers=0,
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
    batch_size, device, preprocess, progress, num_workers : see :class:`~sklearn_craft.pooling.ActivationPooler`

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
    pooler = _pooler(model, layers, memory, batch_size, device, preprocess, progress, num_workers)
    pooled = pooler.fit_transform(X).astype(np.float64)
    layer_of_column = np.array([name.rsplit(":", 1)[0] for name in pooler.get_feature_names_out()])
    features = {layer: pooled[:, layer_of_column == layer] for layer in pooler.layers_}

    matrix, details = _score_sources(features, prepared, n_jobs, progress, "layer")
    best_layer = best_rows(matrix)
    best_layer.name = "best_layer"
    return (matrix, best_layer, details) if return_details else (matrix, best_layer)


def score_direction(matrix, greater_is_better=None):
    """Whether a higher score is better, for every column (task) of a score matrix.

    Parameters
    ----------
    matrix : pandas.DataFrame
        Scores with one column per task, e.g. from :func:`task_relationship_matrix`, whose
        ``attrs["greater_is_better"]`` records each task's direction.
    greater_is_better : bool or mapping of task to bool, default=None
        Overrides: one direction for every task, or per task. Tasks not given take the direction
        stored in ``matrix.attrs``, and True (accuracy-like) when the matrix has none.

    Returns
    -------
    direction : pandas.Series of bool
        Task -> True when a higher score is better.

    Examples
    --------
    >>> import pandas as pd
    >>> from sklearn_craft.relationships import score_direction
    >>> scores = pd.DataFrame({"gender": [0.9], "age": [7.5]})
    >>> score_direction(scores, {"age": False}).tolist()
    [True, False]
    """
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


def best_rows(matrix, greater_is_better=None):
    """Row label (source or layer) of the best score of every column (task).

    Parameters
    ----------
    matrix : pandas.DataFrame
        Scores with one column per task, e.g. from :func:`task_relationship_matrix` or
        :func:`layer_task_matrix`.
    greater_is_better : bool or mapping of task to bool, default=None
        Direction of the scores, as in :func:`score_direction` (by default read from
        ``matrix.attrs``).

    Returns
    -------
    best : pandas.Series
        Task -> the row with the highest score (lowest for error metrics); ties go to the first.

    Examples
    --------
    >>> import pandas as pd
    >>> from sklearn_craft.relationships import best_rows
    >>> scores = pd.DataFrame({"gender": [0.9, 0.95], "age": [7.5, 9.1]}, index=["conv1", "conv2"])
    >>> best_rows(scores, {"age": False}).to_dict()
    {'gender': 'conv2', 'age': 'conv1'}
    """
    direction = score_direction(matrix, greater_is_better)
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

    sign = score_direction(matrix, greater_is_better).map({True: 1.0, False: -1.0})
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
