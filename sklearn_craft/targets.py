"""Targets: the one vocabulary of task kinds, and the encoding of labels for every stage.

Every stage that learns from labels (LASSO selection, satellites, the pruner's head and loss, task
relationships, the benchmarks) names the kind of a target with the words of
:func:`sklearn.utils.multiclass.type_of_target`, plus ``"ordinal"`` for ordered classes:

========================== ====================================================================
kind                       labels
========================== ====================================================================
``"binary"``               two classes
``"multiclass"``           more than two unordered classes
``"ordinal"``              ordered classes (an ordered pandas Categorical)
``"multilabel-indicator"`` a 0/1 matrix, one column per label (attributes)
``"continuous"``           real values
``"continuous-multioutput"`` a matrix of real values
========================== ====================================================================

:func:`encode_target` reads an array target (what an estimator's ``fit`` receives);
:func:`encode_tasks` reads a DataFrame with one column per task (what the task-relationship
functions receive), where a column's kind is inferred from its dtype or given.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils.multiclass import type_of_target

__all__ = ["CLASSIFICATION_KINDS", "TARGET_KINDS", "Task", "encode_target", "encode_tasks"]

#: Every kind of target, in the words of ``type_of_target`` plus ``"ordinal"``.
TARGET_KINDS = (
    "binary",
    "multiclass",
    "ordinal",
    "multilabel-indicator",
    "continuous",
    "continuous-multioutput",
)
#: Kinds whose labels are classes (scored by accuracy); the others are regressed.
CLASSIFICATION_KINDS = ("binary", "multiclass", "ordinal", "multilabel-indicator")
#: Kinds a column of a task DataFrame may be given in ``task_types`` (multi-label groups are lists).
COLUMN_KINDS = ("binary", "multiclass", "ordinal", "continuous")


def encode_target(y):
    """Encode a target as the float matrix the LASSO paths regress on.

    Floating-point values are continuous targets; integers, booleans and strings are class
    labels (as long as :func:`sklearn.utils.multiclass.type_of_target` calls them binary or
    multiclass) and are one-hot encoded, with a single 0/1 column for two classes. A 2-D numeric
    array is a multi-output target taken as is (a 0/1 multilabel indicator included). Cast integer
    targets to float to regress on them (ages in years, angles in degrees).

    Parameters
    ----------
    y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Target values or class labels. A single column is treated as a 1-D target.

    Returns
    -------
    Y : ndarray of shape (n_samples, n_targets), dtype float64
        The encoded target: ``y[:, None]`` for a continuous target, the one-hot class indicators
        for labels (one column for binary labels: 1 for ``classes[1]``), ``y`` itself for a 2-D
        target.
    target_type : str
        ``"continuous"``, ``"continuous-multioutput"``, ``"binary"``, ``"multiclass"`` or
        ``"multilabel-indicator"``, named as :func:`~sklearn.utils.multiclass.type_of_target`
        names them.
    classes : ndarray or None
        The sorted class labels, matching the columns of ``Y`` (for binary labels, ``Y`` is the
        indicator of ``classes[1]``); None for continuous and 2-D targets.

    Raises
    ------
    ValueError
        If ``y`` is empty, has NaN, None or infinite values, is not 1-D or 2-D, holds 2-D
        non-numeric values, or is constant (a single value or class).

    Examples
    --------
    >>> from sklearn_craft.targets import encode_target
    >>> Y, target_type, classes = encode_target(["cat", "dog", "cat", "bird"])
    >>> target_type, classes.tolist()
    ('multiclass', ['bird', 'cat', 'dog'])
    >>> Y[1].tolist()
    [0.0, 0.0, 1.0]
    >>> encode_target([0.5, 1.5, 2.0])[1]
    'continuous'
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim not in (1, 2):
        raise ValueError(f"y must be 1-D or 2-D, got an array of shape {y.shape}")
    if y.shape[0] == 0:
        raise ValueError("y must not be empty, got 0 samples")
    if y.dtype.kind == "O" and pd.isna(y).any():
        raise ValueError("y must not contain NaN or None, got missing labels")
    if y.dtype.kind in "fc" and not np.isfinite(y).all():
        raise ValueError(f"y must be finite, got {np.count_nonzero(~np.isfinite(y))} NaN or infinite values")

    classes = None
    if y.ndim == 2:
        if y.dtype.kind not in "biuf":
            raise ValueError(f"a 2-D y must be numeric (several outputs or a 0/1 label indicator), got dtype {y.dtype}")
        Y = y.astype(np.float64)
        multilabel = type_of_target(y) == "multilabel-indicator"
        target_type = "multilabel-indicator" if multilabel else "continuous-multioutput"
    elif y.dtype.kind == "f":
        Y = y.astype(np.float64)[:, None]
        target_type = "continuous"
    else:
        target_type = type_of_target(y, input_name="y", raise_unknown=True)
        if target_type not in ("binary", "multiclass"):
            raise ValueError(f"y must hold numbers or class labels, got a target of type {target_type!r}")
        binarizer = LabelBinarizer().fit(y)
        Y = binarizer.transform(y).astype(np.float64)
        classes = binarizer.classes_
    if np.all(np.ptp(Y, axis=0) == 0):
        raise ValueError("y must vary across samples, got a constant target (a single value or class)")
    return Y, target_type, classes


@dataclass(frozen=True)
class Task:
    """One task of a label DataFrame, encoded: what a satellite is fitted and scored on.

    Attributes
    ----------
    name : str
        The column name, or the name of a multi-label group.
    kind : str
        One of :data:`TARGET_KINDS` (columns are never ``"continuous-multioutput"``).
    columns : tuple
        The DataFrame columns the task reads (several for a multi-label group).
    rows : ndarray of int
        Positions of the rows where every column of the task is labelled.
    y : ndarray
        The encoded labels of those rows: 0/1 floats (binary; a matrix for multi-label), class
        codes 0..n_classes-1 (multiclass, ordinal) or floats (continuous).
    n_classes : int
        Number of classes (2 for binary and multi-label), 0 for continuous tasks.
    """

    name: object
    kind: str
    columns: tuple
    rows: np.ndarray
    y: np.ndarray
    n_classes: int


def _sorted_labels(values):
    labels = list(pd.unique(values))
    try:
        return sorted(labels)
    except TypeError:
        return labels


def _infer_kind(column):
    """Kind of one labelled (NaN-free) column."""
    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype) and dtype.ordered:
        return "ordinal"
    if column.nunique() == 2:
        return "binary"
    # Categorical dtypes are not numeric, so unordered categories land here too.
    if pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
        return "multiclass"
    values = column.to_numpy(dtype=float)
    return "multiclass" if np.all(values == np.round(values)) else "continuous"


def _check_varies(name, column):
    if column.nunique() < 2:
        raise ValueError(
            f"task {name!r} has a single value ({column.iloc[0]!r}) among its labelled rows; "
            "a satellite task needs at least two classes or distinct values"
        )


def _encode_column(name, column, kind):
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
            if value not in COLUMN_KINDS:
                raise ValueError(
                    f"task_types[{name!r}] must be one of {COLUMN_KINDS} or a list of columns, got {value!r}"
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
                resolved.append((name, "multilabel-indicator", members))
    return resolved


def encode_tasks(tasks, task_types=None):
    """Encode every task of a label DataFrame (one column per task, NaN for a missing label).

    The kind of each column is inferred: bool or two distinct labels → ``"binary"``; an ordered
    pandas Categorical → ``"ordinal"``; strings, an unordered Categorical or integer-valued
    numbers → ``"multiclass"``; other numbers → ``"continuous"``.

    Parameters
    ----------
    tasks : pandas.DataFrame of shape (n_samples, n_columns)
        One column per task; NaN marks a missing label, which removes that row from that task only.
    task_types : mapping, default=None
        Overrides of the inferred kinds. A value ``"binary"``, ``"multiclass"``, ``"ordinal"`` or
        ``"continuous"`` sets the kind of the column named by the key. A list of binary columns
        makes a multi-label group (kind ``"multilabel-indicator"``), a new task named by the key,
        e.g. ``{"accessories": ["eyeglasses", "hat"]}``: its rows are those where every listed
        column is labelled, the columns no longer appear on their own, and the group takes the
        place of its first column.

    Returns
    -------
    encoded : list of Task
        One per task, in the order of the columns.

    Raises
    ------
    TypeError
        If ``tasks`` is not a DataFrame or ``task_types`` is malformed.
    ValueError
        If ``tasks`` is empty or has repeated column names, a task has no labelled row or a single
        value, or a declared kind does not fit its column.

    Examples
    --------
    >>> import pandas as pd
    >>> from sklearn_craft.targets import encode_tasks
    >>> labels = pd.DataFrame({"smile": [True, False, True, True], "age": [21.5, None, 40.0, 33.2]})
    >>> [(task.name, task.kind, task.rows.tolist()) for task in encode_tasks(labels)]
    [('smile', 'binary', [0, 1, 2, 3]), ('age', 'continuous', [0, 2, 3])]
    """
    if not isinstance(tasks, pd.DataFrame):
        raise TypeError(f"tasks must be a pandas DataFrame with one column per task, got {type(tasks).__name__}")
    if tasks.shape[1] == 0 or tasks.shape[0] == 0:
        raise ValueError(f"tasks must have at least one row and one column, got shape {tasks.shape}")
    if not tasks.columns.is_unique:
        raise ValueError(f"tasks must have unique column names, got {list(tasks.columns)}")
    encoded = []
    for name, kind, columns in _resolve_task_types(tasks, task_types):
        frame = tasks[list(columns)]
        labelled = frame.notna().all(axis=1).to_numpy()
        if not labelled.any():
            raise ValueError(f"task {name!r} has no labelled rows")
        if kind == "multilabel-indicator":
            targets = []
            for column in columns:
                values = frame[column][labelled]
                if values.nunique() != 2:
                    raise ValueError(
                        f"column {column!r} of multi-label group {name!r} must be binary, "
                        f"got {values.nunique()} distinct labels"
                    )
                targets.append(_encode_column(column, values, "binary")[0])
            y, n_classes = np.column_stack(targets), 2
        else:
            values = frame[columns[0]][labelled]
            _check_varies(name, values)
            kind = kind or _infer_kind(values)
            y, n_classes = _encode_column(name, values, kind)
        encoded.append(Task(name, kind, columns, np.flatnonzero(labelled), y, n_classes))
    return encoded
