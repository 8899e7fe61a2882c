"""Every figure of sklearn_craft.plotting on small inputs: what it shows, not only that it draws.

Drawn with the Agg backend (tests/conftest.py). The docstring examples run in tests/test_docs.py.
"""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle
from sklearn.exceptions import NotFittedError

from sklearn_craft.plotting import (
    plot_attribute_accuracy,
    plot_characteristic_curves,
    plot_gamma_tradeoff,
    plot_layer_task_matrix,
    plot_task_matrix,
)
from sklearn_craft.selection import LassoFilterSelector


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _outlined(ax):
    """(x, y) of the lower-left corner of every outlined cell, sorted."""
    return sorted((p.get_x(), p.get_y()) for p in ax.patches if isinstance(p, Rectangle))


# ------------------------------------------------------------------------------- task matrix


def _task_matrix():
    matrix = pd.DataFrame(
        {"gender": [0.9, 0.7, np.nan], "yaw": [12.0, 9.5, 20.0]}, index=["identity", "yaw_net", "smile"]
    )
    matrix.attrs = {
        "metric": {"gender": "accuracy", "yaw": "rmse"},
        "greater_is_better": {"gender": True, "yaw": False},
    }
    return matrix


def test_plot_task_matrix_draws_one_annotated_cell_per_entry():
    matrix = _task_matrix()
    ax = plot_task_matrix(matrix)
    assert isinstance(ax, matplotlib.axes.Axes)
    colours = ax.images[0].get_array()
    assert colours.shape == matrix.shape
    assert [t.get_text() for t in ax.texts] == ["0.9", "12", "0.7", "9.5", "20"]
    # Per-task colours: the best cell of every column is 1, lowest RMSE included.
    assert colours[0, 0] == 1.0 and colours[1, 1] == 1.0 and colours[2, 1] == 0.0 and colours.mask[2, 0]
    # Each value is written at the centre of its cell, legible on its colour: black on the bright end
    # of viridis, white on the dark end.
    assert [t.get_position() for t in ax.texts] == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]
    assert to_rgba(ax.texts[0].get_color()) == to_rgba("black") and to_rgba(ax.texts[4].get_color()) == to_rgba("white")


def test_plot_task_matrix_labels_rows_columns_and_colour_scale():
    matrix = _task_matrix()
    ax = plot_task_matrix(matrix)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["gender", "yaw"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["identity", "yaw_net", "smile"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("task", "source")
    (colorbar,) = [other for other in ax.figure.axes if other is not ax]
    assert colorbar.get_ylabel() == "score within task (1 = best)"

    named = matrix.rename_axis(index="network", columns="satellite")
    named.attrs = {**matrix.attrs, "metric": {"gender": "rmse", "yaw": "rmse"}}
    ax = plot_task_matrix(named, colorbar=False)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("satellite", "network")
    assert ax.figure.axes == [ax]
    # One metric: raw values on one scale ("auto" -> "global").
    assert np.ma.allequal(ax.images[0].get_array(), named.to_numpy())


def test_plot_task_matrix_reuses_ax_and_normalizes_globally():
    matrix = _task_matrix()
    _, axes = plt.subplots()
    assert plot_task_matrix(matrix, ax=axes, annotate=False, normalize="global") is axes
    assert not axes.texts and np.ma.allequal(axes.images[0].get_array(), matrix.to_numpy())
    clipped = plot_task_matrix(matrix, normalize="global", vmax=10.0)
    assert clipped.images[0].get_clim() == (0.7, 10.0) and clipped.texts[1].get_text() == "12"
    assert [t.get_text() for t in plot_task_matrix(matrix, fmt=".2f").texts][:2] == ["0.90", "12.00"]


def test_plot_task_matrix_bad_input():
    matrix = _task_matrix()
    with pytest.raises(ValueError, match="normalize"):
        plot_task_matrix(matrix, normalize="rows")
    with pytest.raises(ValueError, match="vmin and vmax"):
        plot_task_matrix(matrix, vmax=10.0)
    with pytest.raises(TypeError, match="DataFrame"):
        plot_task_matrix(matrix.to_numpy())
    with pytest.raises(ValueError, match=r"at least one row and one column, got shape \(0, 2\)"):
        plot_task_matrix(matrix.iloc[:0])


# ------------------------------------------------------------------------ layer x task matrix


def _layer_matrix():
    return pd.DataFrame({"pose": [0.5, 0.7, 0.6], "smile": [0.8, 0.7, 0.9]}, index=["c1", "c2", "c3"])


def test_plot_layer_task_matrix_outlines_the_best_layer_of_each_task():
    matrix = _layer_matrix()
    ax = plot_layer_task_matrix(matrix)
    assert ax.images[0].get_array().shape == (3, 2) and len(ax.texts) == 6
    assert _outlined(ax) == [(-0.5, 0.5), (0.5, 1.5)]
    assert ax.get_ylabel() == "layer"

    ax = plot_layer_task_matrix(matrix, best_layer={"pose": "c1", "smile": "c1"})
    assert _outlined(ax) == [(-0.5, -0.5), (0.5, -0.5)]
    with pytest.raises(ValueError, match="not a row"):
        plot_layer_task_matrix(matrix, best_layer={"pose": "c9", "smile": "c1"})


def test_plot_layer_task_matrix_outlines_the_lowest_error_and_reuses_ax():
    matrix = _layer_matrix()
    matrix.attrs = {"greater_is_better": {"pose": False, "smile": True}}
    _, axes = plt.subplots()
    assert plot_layer_task_matrix(matrix.rename_axis(index="depth"), ax=axes, colorbar=False) is axes
    assert _outlined(axes) == [(-0.5, -0.5), (0.5, 1.5)]  # pose: lowest (c1); smile: highest (c3)
    assert axes.get_ylabel() == "depth"
    with pytest.raises(ValueError, match="best_layer has no layer for task 'smile'"):
        plot_layer_task_matrix(matrix, best_layer={"pose": "c1"})


# ---------------------------------------------------------------------------- gamma trade-off


def test_plot_gamma_tradeoff_draws_one_labelled_point_per_gamma_in_order_of_cost():
    table = pd.DataFrame(
        {"score": [0.80, 0.90, 0.88, 0.85], "flops": [10.0, 100.0, 40.0, 20.0]}, index=[0.1, 0.0, 0.01, 0.05]
    )
    ax = plot_gamma_tradeoff(table)
    assert isinstance(ax, matplotlib.axes.Axes)
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_xdata(), [10.0, 20.0, 40.0, 100.0])  # % of the largest cost
    np.testing.assert_allclose(line.get_ydata(), [0.80, 0.85, 0.88, 0.90])
    assert line.get_marker() == "o"
    labels = {text.get_text(): text.xy for text in ax.texts}
    assert labels == {
        "γ=0.1": (10.0, 0.80),
        "γ=0.05": (20.0, 0.85),
        "γ=0.01": (40.0, 0.88),
        "baseline": (100.0, 0.90),
    }
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("flops (% of the largest)", "score")


def test_plot_gamma_tradeoff_other_columns_label_and_ax():
    table = pd.DataFrame({"mae": [6.0, 7.5], "size_bytes": [400.0, 100.0]}, index=[0.0, 0.1])
    _, axes = plt.subplots()
    ax = plot_gamma_tradeoff(table, score="mae", cost="size_bytes", ax=axes, score_label="yaw MAE (degrees)")
    assert ax is axes
    np.testing.assert_allclose(ax.lines[0].get_xydata(), [[25.0, 7.5], [100.0, 6.0]])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("size_bytes (% of the largest)", "yaw MAE (degrees)")
    with pytest.raises(ValueError, match=r"table must have a column 'flops', got columns \['mae', 'size_bytes'\]"):
        plot_gamma_tradeoff(table, score="mae")


def test_plot_gamma_tradeoff_methods_on_one_axes_have_a_legend_and_their_colours():
    one_shot = pd.DataFrame({"score": [0.9, 0.7], "flops": [100.0, 40.0]}, index=[0.0, 0.01])
    sequential = pd.DataFrame({"score": [0.9, 0.8], "flops": [100.0, 50.0]}, index=[0.0, 0.01])
    ax = plot_gamma_tradeoff(one_shot, label="one-shot")
    plot_gamma_tradeoff(sequential, ax=ax, label="sequential")
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["one-shot", "sequential"]
    first, second = ax.lines
    np.testing.assert_allclose(second.get_xydata(), [[50.0, 0.8], [100.0, 0.9]])
    # Each method's gamma labels take the colour of its line.
    assert [text.get_color() for text in ax.texts] == [first.get_color()] * 2 + [second.get_color()] * 2
    assert first.get_color() != second.get_color()
    assert plot_gamma_tradeoff(one_shot).get_legend() is None


# ---------------------------------------------------------------------- characteristic curves


@pytest.fixture(scope="module")
def selector():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 12)) + 5.0
    y = X[:, [1, 2, 9]] @ np.array([1.0, 1.5, 2.0]) + 0.1 * rng.normal(size=300)
    return LassoFilterSelector(groups=np.repeat(["a", "b", "c"], 4), alphas=30, random_state=0).fit(X, y)


def test_plot_one_curve_and_one_knee_per_group(selector):
    ax = plot_characteristic_curves(selector)
    assert [line.get_label() for line in ax.lines] == ["a", "b", "c"]
    assert len(ax.collections) == 3
    for line, marker, (_, knee) in zip(ax.lines, ax.collections, selector.knees_.iterrows()):
        curve = selector.curves_.query("group == @knee.group")
        np.testing.assert_array_equal(line.get_xdata(), curve["n_selected"])
        np.testing.assert_array_equal(line.get_ydata(), curve["rmse"])
        # The knee is a point of its curve, drawn in the curve's colour.
        np.testing.assert_array_equal(marker.get_offsets(), [[knee["n_selected"], knee["rmse"]]])
        assert ((curve["n_selected"] == knee["n_selected"]) & (curve["rmse"] == knee["rmse"])).any()
        np.testing.assert_allclose(marker.get_facecolor()[0], to_rgba(line.get_color()))
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["a", "b", "c"]
    assert ax.get_legend().get_title().get_text() == "layer"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("number of filters", "held-out RMSE")


def test_plot_characteristic_curves_of_chosen_groups_on_ax(selector):
    _, ax = plt.subplots()
    assert plot_characteristic_curves(selector, groups=["c"], ax=ax) is ax
    assert [line.get_label() for line in ax.lines] == ["c"]
    assert len(ax.collections) == 1 and ax.get_legend() is None
    with pytest.raises(ValueError, match=r"unknown \['z'\]"):
        plot_characteristic_curves(selector, groups=["z"], ax=ax)
    with pytest.raises(NotFittedError):
        plot_characteristic_curves(LassoFilterSelector(), ax=ax)


def test_plot_attribute_accuracy_draws_one_marker_per_attribute_and_model():
    accuracy = pd.DataFrame({"scratch": [0.9, 0.7, 0.8], "distilled": [0.95, 0.75, 0.6]}, index=["a", "b", "c"])
    baseline = pd.Series({"c": 0.5, "b": 0.6, "a": 0.55}, name="majority")
    ax = plot_attribute_accuracy(accuracy, baseline=baseline)
    assert [label.get_text() for label in ax.get_yticklabels()] == ["a", "b", "c"]
    for line, column in zip(ax.lines, accuracy.columns):
        assert line.get_label() == column
        np.testing.assert_allclose(line.get_xdata(), accuracy[column])
        np.testing.assert_allclose(line.get_ydata(), [0, 1, 2])
    # Bars follow the attributes' order, not the baseline's.
    np.testing.assert_allclose([bar.get_width() for bar in ax.patches], [0.55, 0.6, 0.5])
    assert ax.get_xlim()[0] < 0.5 and ax.get_xlim()[1] >= 0.95
    _, axes = plt.subplots()
    assert plot_attribute_accuracy(accuracy["scratch"], ax=axes) is axes and len(axes.lines) == 1


@pytest.mark.parametrize(
    "accuracy, baseline, match",
    [
        (np.array([0.9, 0.8]), None, "accuracy must be a non-empty pandas Series or DataFrame, got ndarray"),
        (pd.DataFrame(), None, "non-empty"),
        (pd.Series({"a": 0.9, "b": 0.8}), pd.Series({"a": 0.5}), r"missing \['b'\]"),
        (pd.Series({"a": 0.9}), [0.5], "baseline must be a pandas Series"),
    ],
)
def test_plot_attribute_accuracy_rejects_bad_input(accuracy, baseline, match):
    with pytest.raises(ValueError, match=match):
        plot_attribute_accuracy(accuracy, baseline=baseline)
