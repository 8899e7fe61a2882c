"""Figures of the CRAFT method.

matplotlib is imported lazily so that importing :mod:`sklearn_craft` does not pay for it.
Every function draws one figure on the given (or a new) ``Axes`` and returns it; none calls
``plt.show()``.
"""


def _get_axes(ax):
    """Return ``ax``, or the current Axes of a new figure when ``ax`` is None."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    return ax


def plot_task_matrix(
    matrix,
    ax=None,
    cmap="viridis",
    annotate=True,
    *,
    fmt=".3g",
    normalize="auto",
    vmin=None,
    vmax=None,
    colorbar=True,
):
    """Heatmap of a task-relationship matrix, with the score written in every cell.

    The paper's Figure 5: rows are sources (networks trained for a primary task), columns are
    satellite tasks. Works for the output of
    :func:`~sklearn_craft.relationships.task_relationship_matrix`,
    :func:`~sklearn_craft.relationships.relative_drop` or any numeric DataFrame.

    Parameters
    ----------
    matrix : pandas.DataFrame of shape (n_rows, n_columns)
        Scores; NaN cells are left blank.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; a new figure when None.
    cmap : str or matplotlib.colors.Colormap, default="viridis"
        Colour map.
    annotate : bool, default=True
        Write the value in every (non-NaN) cell.
    fmt : str, default=".3g"
        Format specification of the written values.
    normalize : {"auto", "global", "columns"}, default="auto"
        ``"global"`` colours raw values on one scale. ``"columns"`` rescales every column to
        [0, 1] with 1 the best score of that task (using ``matrix.attrs["greater_is_better"]``,
        so an RMSE column is flipped), which keeps tasks with different metrics comparable.
        ``"auto"`` uses ``"columns"`` when ``matrix.attrs["metric"]`` names more than one metric.
    vmin, vmax : float, default=None
        Limits of the colour scale of ``"global"`` normalisation (the data range when None);
        cells beyond them take the end colours, their written values are unchanged.
    colorbar : bool, default=True
        Add a colour bar.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The Axes with one image cell per matrix entry.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from sklearn_craft.plotting import plot_task_matrix
    >>> scores = pd.DataFrame({"gender": [0.95, 0.76], "age": [0.40, 0.50]}, index=["gender", "age"])
    >>> ax = plot_task_matrix(scores)
    >>> len(ax.texts)
    4
    """
    import numpy as np
    import pandas as pd

    from .relationships import score_direction

    if not isinstance(matrix, pd.DataFrame):
        raise TypeError(f"matrix must be a pandas DataFrame, got {type(matrix).__name__}")
    if matrix.size == 0:
        raise ValueError(f"matrix must have at least one row and one column, got shape {matrix.shape}")
    if normalize not in ("auto", "global", "columns"):
        raise ValueError(f"normalize must be 'auto', 'global' or 'columns', got {normalize!r}")
    values = matrix.to_numpy(dtype=float)
    metrics = set(matrix.attrs.get("metric", {}).values())
    if normalize == "auto":
        normalize = "columns" if len(metrics) > 1 else "global"
    if normalize == "columns" and (vmin is not None or vmax is not None):
        raise ValueError(
            "vmin and vmax set a global colour scale, but the columns are coloured on their own scales "
            "(normalize='columns', or 'auto' with several metrics); pass normalize='global'"
        )

    if normalize == "columns":
        # fmin/fmax skip NaN without warning on all-NaN columns.
        low, high = np.fmin.reduce(values, axis=0), np.fmax.reduce(values, axis=0)
        span = np.where(high > low, high - low, 1.0)
        colours = (values - low) / span
        colours = np.where(score_direction(matrix).to_numpy(), colours, 1.0 - colours)
        colours[:, ~(high > low)] = 1.0
        colours[np.isnan(values)] = np.nan
        vmin, vmax, label = 0.0, 1.0, "score within task (1 = best)"
    else:
        colours = values
        label = metrics.pop() if len(metrics) == 1 else "score"

    ax = _get_axes(ax)
    image = ax.imshow(np.ma.masked_invalid(colours), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), labels=[str(c) for c in matrix.columns], rotation=45, ha="right")
    ax.set_yticks(range(matrix.shape[0]), labels=[str(r) for r in matrix.index])
    ax.set_xlabel(matrix.columns.name or "task")
    ax.set_ylabel(matrix.index.name or "source")
    if annotate:
        for (i, j), value in np.ndenumerate(values):
            if np.isnan(value):
                continue
            red, green, blue, _ = image.cmap(image.norm(colours[i, j]))
            light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
            ax.text(j, i, format(value, fmt), ha="center", va="center", color="black" if light else "white")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=label)
    return ax


def plot_layer_task_matrix(
    matrix,
    best_layer=None,
    ax=None,
    cmap="viridis",
    annotate=True,
    *,
    fmt=".3g",
    normalize="auto",
    vmin=None,
    vmax=None,
    colorbar=True,
):
    """Heatmap of a layer × task matrix with the best layer of every task outlined.

    The paper's Figure 11: in which layer of a network each satellite task is best represented.

    Parameters
    ----------
    matrix : pandas.DataFrame of shape (n_layers, n_tasks)
        Scores, e.g. the first output of :func:`~sklearn_craft.relationships.layer_task_matrix`.
    best_layer : pandas.Series or mapping of task to layer, default=None
        Layer to outline for every task; None takes the best row of every column (highest, or
        lowest for the error metrics marked in ``matrix.attrs["greater_is_better"]``).
    ax, cmap, annotate, fmt, normalize, vmin, vmax, colorbar
        See :func:`plot_task_matrix`.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The Axes: one image cell per matrix entry and one outlined cell per task.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from sklearn_craft.plotting import plot_layer_task_matrix
    >>> scores = pd.DataFrame({"pose": [0.5, 0.7, 0.6], "smile": [0.8, 0.7, 0.9]}, index=["conv1", "conv2", "conv3"])
    >>> ax = plot_layer_task_matrix(scores)
    >>> len(ax.patches)
    2
    """
    from matplotlib.patches import Rectangle

    from .relationships import best_rows

    ax = plot_task_matrix(
        matrix, ax, cmap, annotate, fmt=fmt, normalize=normalize, vmin=vmin, vmax=vmax, colorbar=colorbar
    )
    if best_layer is None:
        best_layer = best_rows(matrix)
    ax.set_ylabel(matrix.index.name or "layer")
    for j, task in enumerate(matrix.columns):
        if task not in best_layer:
            raise ValueError(f"best_layer has no layer for task {task!r}")
        if best_layer[task] not in matrix.index:
            raise ValueError(f"best_layer[{task!r}] = {best_layer[task]!r} is not a row of matrix")
        i = matrix.index.get_loc(best_layer[task])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    return ax


def plot_gamma_tradeoff(table, score="score", cost="flops", ax=None, *, score_label=None, label=None):
    """Score against cost of networks pruned at several ``gamma`` (the ETL paper's Figure 6).

    Parameters
    ----------
    table : pandas.DataFrame
        One row per pruned network, indexed by ``gamma`` (0 for the unpruned baseline), with
        columns ``score`` and ``cost``.
    score : str, default="score"
        Column plotted on the y axis.
    cost : str, default="flops"
        Column plotted on the x axis, as a percentage of the largest value.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; a new figure when None.
    score_label : str, default=None
        Label of the y axis (``score`` when None).
    label : str, default=None
        Legend entry of this table's line (no legend when None): call the function once per
        method on the same ``ax`` to compare methods, each table with its own unpruned row so that
        the costs share their 100 %.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The Axes: one point per row, annotated with its ``gamma``, joined in order of cost.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from sklearn_craft.plotting import plot_gamma_tradeoff
    >>> table = pd.DataFrame({"score": [0.90, 0.88, 0.80], "flops": [100, 40, 10]}, index=[0, 0.01, 0.1])
    >>> ax = plot_gamma_tradeoff(table)
    >>> len(ax.texts)
    3
    """
    for column in (score, cost):
        if column not in table.columns:
            raise ValueError(f"table must have a column {column!r}, got columns {list(table.columns)}")
    ax = _get_axes(ax)
    ordered = table.sort_values(cost)
    relative = 100.0 * ordered[cost] / ordered[cost].max()
    line, = ax.plot(relative, ordered[score], marker="o", label=label)
    for position, (gamma, x, y) in enumerate(zip(ordered.index, relative, ordered[score])):
        # Labels of neighbours in cost alternate above and below their points, so close ones stay legible.
        offset = (4, 4) if position % 2 == 0 else (4, -12)
        ax.annotate("baseline" if gamma == 0 else f"γ={gamma:g}", (x, y), textcoords="offset points", xytext=offset,
                    color=line.get_color())
    if label is not None:
        ax.legend()
    ax.set_xlabel(f"{cost} (% of the largest)")
    ax.set_ylabel(score_label or score)
    ax.grid(True, alpha=0.3)
    return ax


def plot_characteristic_curves(selector, groups=None, ax=None):
    """Characteristic curves of a fitted selector with their knees (the ETL paper's Figure 3).

    One line per group (layer): the held-out RMSE of every LASSO of the path against its number
    of filters, in path order (decreasing α); the knee is marked with a dot of the line's colour.

    Parameters
    ----------
    selector : LassoFilterSelector
        A fitted :class:`~sklearn_craft.selection.LassoFilterSelector` (anything with its
        ``curves_`` and ``knees_``).
    groups : list of group labels, default=None
        Groups to draw, in this order; None draws every group.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; a new figure when None.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The Axes: one line (labelled with the group) and one knee marker per group.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from sklearn_craft.plotting import plot_characteristic_curves
    >>> from sklearn_craft.selection import LassoFilterSelector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 6))
    >>> y = X[:, 0] + X[:, 4] + 0.1 * rng.normal(size=200)
    >>> selector = LassoFilterSelector(groups=["a", "a", "a", "b", "b", "b"], alphas=30).fit(X, y)
    >>> ax = plot_characteristic_curves(selector)
    >>> [line.get_label() for line in ax.lines]
    ['a', 'b']
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(selector, ["curves_", "knees_"])
    curves, knees = selector.curves_, selector.knees_
    available = list(knees["group"])
    if groups is None:
        groups = available
    unknown = [group for group in groups if group not in available]
    if unknown:
        raise ValueError(f"groups must be groups of the selector {available}, got unknown {unknown}")

    ax = _get_axes(ax)
    for group in groups:
        curve = curves[curves["group"] == group]
        (line,) = ax.plot(curve["n_selected"], curve["rmse"], label=str(group))
        knee = knees[knees["group"] == group].iloc[0]
        ax.scatter([knee["n_selected"]], [knee["rmse"]], color=line.get_color(), edgecolors="black", zorder=3)
    ax.set_xlabel("number of filters")
    ax.set_ylabel("held-out RMSE")
    if len(groups) > 1:
        ax.legend(title="layer")
    ax.grid(True, alpha=0.3)
    return ax


def plot_attribute_accuracy(accuracy, ax=None, *, baseline=None):
    """Accuracy of every attribute, one row per attribute and one marker per model (Wang & Wong, Table II).

    Parameters
    ----------
    accuracy : pandas.Series or pandas.DataFrame
        Accuracies indexed by attribute (drawn top to bottom in index order); a DataFrame has
        one column per model, its column names in the legend. For instance the ``accuracy``
        columns of several :func:`~sklearn_craft.attributes.attribute_report` side by side,
        without their ``"mean"`` rows.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; a new figure, sized to the number of attributes, when None.
    baseline : pandas.Series, default=None
        A reference accuracy per attribute, drawn as grey bars, e.g. a report's
        ``majority_accuracy`` (always answering the more frequent value); it must cover every
        attribute of ``accuracy``.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The Axes: one line of markers per model (no connecting line), attributes as y tick
        labels, accuracy on the x axis.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from sklearn_craft.plotting import plot_attribute_accuracy
    >>> accuracy = pd.DataFrame({"scratch": [0.90, 0.80], "distilled": [0.92, 0.85]}, index=["Male", "Smiling"])
    >>> ax = plot_attribute_accuracy(accuracy, baseline=pd.Series({"Male": 0.58, "Smiling": 0.52}))
    >>> [label.get_text() for label in ax.get_yticklabels()], [line.get_label() for line in ax.lines]
    (['Male', 'Smiling'], ['scratch', 'distilled'])
    """
    from itertools import cycle

    import numpy as np
    import pandas as pd

    if isinstance(accuracy, pd.Series):
        accuracy = accuracy.to_frame(accuracy.name if accuracy.name is not None else "accuracy")
    if not isinstance(accuracy, pd.DataFrame) or accuracy.empty:
        raise ValueError(f"accuracy must be a non-empty pandas Series or DataFrame, got {type(accuracy).__name__}")
    if baseline is not None:
        if not isinstance(baseline, pd.Series):
            raise ValueError(f"baseline must be a pandas Series indexed by attribute, got {type(baseline).__name__}")
        missing = [attribute for attribute in accuracy.index if attribute not in baseline.index]
        if missing:
            raise ValueError(f"baseline must have a value for every attribute, missing {missing[:5]}")
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(7, 1.5 + 0.25 * len(accuracy)))
    rows = np.arange(len(accuracy))
    values = accuracy.to_numpy(float)
    if baseline is not None:
        reference = baseline.loc[accuracy.index].to_numpy(float)
        ax.barh(rows, reference, color="0.85", height=0.6, label=baseline.name or "baseline")
        values = np.column_stack([values, reference])
    for column, marker in zip(accuracy.columns, cycle("osD^v<>ph*")):
        ax.plot(accuracy[column].to_numpy(float), rows, linestyle="none", marker=marker, label=str(column), alpha=0.8)
    ax.set_yticks(rows, [str(attribute) for attribute in accuracy.index])
    ax.set_ylim(len(accuracy) - 0.5, -0.5)
    # Bars start at 0 but accuracies crowd near 1: show only the range where the values differ.
    low, high = np.nanmin(values), np.nanmax(values)
    ax.set_xlim(max(0.0, low - 0.05 * (high - low) - 0.01), min(1.0, high) + 0.01)
    ax.set_xlabel("accuracy")
    ax.grid(True, axis="x", alpha=0.3)
    if accuracy.shape[1] > 1 or baseline is not None:
        # Outside the Axes: with 40 rows every corner inside holds data.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return ax
