"""The end-to-end demo behind ``python -m sklearn_craft demo``.

By default everything is built here, with no download: synthetic labelled faces
(:func:`~sklearn_craft.datasets.make_faces`), a small VGG-16 trained on them for face recognition
(the primary task), then the CRAFT method on satellite tasks of the same faces. With ``data`` and
``model`` the same runs on a real face set and a real pretrained network.
"""

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import datasets, models
from .finetune import finetune
from .pruner import CraftPruner
from .relationships import layer_task_matrix
from .targets import encode_target

#: Satellite task of each real data set (a column of its loader's labels) when ``task`` is not given.
DEFAULT_TASKS = {
    "celeba": "Male",
    "utkface": "age",
    "aflw2000": "yaw",
    "pointing04": "pan",
    "fer2013": "emotion",
}
#: Satellite tasks scored layer by layer on the synthetic faces.
SYNTHETIC_TASKS = ["age", "male", "yaw", "smile", "glasses"]


def _settings(quick):
    """Sizes of the run: the full demo (32 s on 2 idle cores) or the quick one used in tests."""
    if quick:
        return dict(n_primary=600, n_task=400, primary_epochs=2, finetune_epochs=1, gammas=[0.0, 0.05], cv=2)
    return dict(n_primary=1500, n_task=1000, primary_epochs=6, finetune_epochs=4, gammas=[0.0, 0.1, 0.01, 0.001], cv=3)


def _log(message, verbose):
    if verbose:
        print(message, flush=True)


def _synthetic_setup(settings, random_state, progress, verbose):
    """Faces, a VGG-16 (width 1/4, BN) trained for identity on some of them, and the rest for the tasks."""
    n_primary, n_task = settings["n_primary"], settings["n_task"]
    images, labels = datasets.make_faces(n_primary + n_task, image_size=32, n_identities=20, random_state=random_state)
    torch.manual_seed(random_state)
    net = models.vgg16(num_classes=20, batch_norm=True, input_size=32, width_mult=0.25, dropout=0.0)
    _log(f"training the primary network (VGG-16 BN, width 1/4) for identity on {n_primary} faces", verbose)
    finetune(
        net,
        images[:n_primary],
        labels["identity"].to_numpy()[:n_primary],
        loss="cross_entropy",
        epochs=settings["primary_epochs"],
        lr=3e-3,
        random_state=random_state,
        progress=progress,
    )
    task_labels = labels.iloc[n_primary:].reset_index(drop=True)
    return net, images[n_primary:], task_labels, "age", None, (3, 32, 32)


def _real_setup(data, model, task, settings, random_state, verbose):
    """A real data set (name, root) and a real pretrained network (name, weights path)."""
    data_name, root = data
    model_name, weights = model
    if data_name not in DEFAULT_TASKS:
        raise ValueError(f"data must name one of {sorted(DEFAULT_TASKS)}, got {data_name!r}")
    net = getattr(models, model_name)(weights=weights)
    preset = models.preset(model_name)
    loader = getattr(datasets, f"load_{data_name}")
    _log(f"loading {settings['n_task']} images of {data_name} from {root}", verbose)
    images, labels = loader(root, n=settings["n_task"], preset=preset, random_state=random_state)
    task = task or DEFAULT_TASKS[data_name]
    if task not in labels.columns:
        raise ValueError(f"task must be a column of the {data_name} labels {list(labels.columns)}, got {task!r}")
    labels = labels.reset_index(drop=True)
    return net, images, labels, task, preset.preprocess, preset.input_shape


def _split(n_samples, random_state):
    """Seeded 75/25 split of sample indices (the papers' protocol)."""
    order = np.random.RandomState(random_state).permutation(n_samples)
    cut = int(0.75 * n_samples)
    return order[:cut], order[cut:]


def _prune_at_gammas(net, images, y, train, test, settings, preprocess, random_state, progress, verbose):
    """CraftPruner at every gamma with the same fine-tuning budget; gamma 0 is the unpruned baseline."""
    rows, pruners = [], {}
    for gamma in settings["gammas"]:
        label = "baseline (gamma=0)" if gamma == 0 else f"CRAFT gamma={gamma:g}"
        _log(f"{label}: pooling, selecting, pruning, fine-tuning", verbose)
        start = time.perf_counter()
        pruner = CraftPruner(
            net,
            gamma=gamma,
            # Cut after the layer whose satellite scores best (Low-cost TL paper, pruning step 1):
            # the last layers of a recognition network are the least useful for other tasks.
            head_layer="best",
            # A gentle fine-tuning that keeps the best epoch on held-out images: a few hundred
            # images are too few to retrain a whole network at a large learning rate.
            finetune_params={
                "epochs": settings["finetune_epochs"],
                "lr": 1e-4,
                "validation_fraction": 0.2,
                "early_stopping": 2,
            },
            random_state=random_state,
            progress=progress,
            **({} if preprocess is None else {"preprocess": preprocess}),
        ).fit(images[train], y[train])
        seconds = time.perf_counter() - start
        report = pruner.report_["pruned"]
        rows.append(
            {
                "model": label,
                "gamma": gamma,
                "score": pruner.score(images[test], y[test]),
                "filters": sum(len(k) for k in pruner.keep_.values()),
                "parameters": int(report["parameters"]),
                "flops": int(report["flops"]),
                "latency_ms": 1e3 * report["latency_s"],
                "transfer_s": seconds,
            }
        )
        pruners[gamma] = pruner
    table = pd.DataFrame(rows).set_index("model")
    baseline = table.iloc[0]
    for column in ["parameters", "flops", "latency_ms"]:
        table[f"{column}_change_pct"] = 100.0 * (table[column] - baseline[column]) / baseline[column]
    return table, pruners


def run_demo(
    out_dir="craft_demo_output",
    *,
    quick=False,
    data=None,
    model=None,
    task=None,
    random_state=0,
    progress=True,
    verbose=True,
):
    """Run the CRAFT method end to end and write its figures and report.

    Steps: a primary network (trained here on synthetic faces for identity, or a real pretrained
    one), satellite scores of every layer for several tasks (synthetic faces only), the
    characteristic curves of every layer for the chosen task, :class:`~sklearn_craft.CraftPruner`
    at several values of ``gamma`` (0 is the unpruned baseline) with the same fine-tuning, and a
    report of score, parameters, FLOPs and CPU latency against the baseline.

    Parameters
    ----------
    out_dir : str or Path, default="craft_demo_output"
        Folder for the figures and ``report.csv`` (created if needed).
    quick : bool, default=False
        A reduced run (fewer images, epochs and gammas) of well under a minute, used in tests.
    data : tuple (name, root) or None, default=None
        A real face set: a name of :data:`DEFAULT_TASKS` and its folder. Needs ``model``.
    model : tuple (name, weights path) or None, default=None
        A real pretrained network: ``"mobilefacenet"``, ``"mtcnn_onet"`` or ``"mini_xception"``
        and its weights file. Needs ``data``.
    task : str or None, default=None
        Column of the data set's labels to transfer to (default: :data:`DEFAULT_TASKS`).
    random_state : int, default=0
        Seed of the data, the primary training, the splits and fine-tuning.
    progress : bool, default=True
        Show tqdm progress bars.
    verbose : bool, default=True
        Print what is done and the final table.

    Returns
    -------
    table : pandas.DataFrame
        One row per pruned model: held-out score, filters, parameters, FLOPs, latency, transfer
        time, and the % change of parameters, FLOPs and latency against the baseline.

    Examples
    --------
    >>> from sklearn_craft.demo import run_demo
    >>> table = run_demo("demo_out", quick=True, verbose=False, progress=False)  # doctest: +SKIP
    """
    if (data is None) != (model is None):
        raise ValueError("data and model must be given together (a real data set and a real network), or neither")
    settings = _settings(quick)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        net, images, labels, task, preprocess, _ = _synthetic_setup(settings, random_state, progress, verbose)
    else:
        net, images, labels, task, preprocess, _ = _real_setup(data, model, task, settings, random_state, verbose)
    labelled = labels[task].notna().to_numpy()
    images, labels = images[labelled], labels[labelled].reset_index(drop=True)
    y = labels[task].to_numpy()
    # Integer labels with many values (ages, angles) are regressed, as in the papers.
    if y.dtype.kind in "iu" and len(np.unique(y)) > 10:
        y = y.astype(np.float64)
    train, test = _split(len(y), random_state)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import plot_characteristic_curves, plot_gamma_tradeoff, plot_layer_task_matrix

    written = []
    if data is None:
        _log("satellite scores of every layer for " + ", ".join(SYNTHETIC_TASKS), verbose)
        matrix, best_layer = layer_task_matrix(
            net, images[train], labels.iloc[train][SYNTHETIC_TASKS], cv=settings["cv"], random_state=random_state
        )
        _log(matrix.round(3).to_string(), verbose)
        ax = plot_layer_task_matrix(matrix, best_layer=best_layer)
        written.append(_save(ax, out / "layer_task_matrix.png"))

    table, pruners = _prune_at_gammas(
        net, images, y, train, test, settings, preprocess, random_state, progress, verbose
    )
    pruned_at = [g for g in settings["gammas"] if g > 0]
    ax = plot_characteristic_curves(pruners[pruned_at[-1]].selector_)
    ax.set_title(f"Characteristic curves for {task} (knees at gamma={pruned_at[-1]:g})")
    written.append(_save(ax, out / "characteristic_curves.png"))
    ax = plot_gamma_tradeoff(table.set_index("gamma"), score_label=_score_label(encode_target(y[train])[1]))
    ax.set_title(f"CRAFT trade-off for {task}")
    written.append(_save(ax, out / "gamma_tradeoff.png"))
    table.to_csv(out / "report.csv")
    written.append(out / "report.csv")
    plt.close("all")

    if verbose:
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(f"\nTransfer to {task!r} ({_score_label(encode_target(y[train])[1])} on the held-out 25%):")
            print(table.round(3).to_string())
        print("\nwrote:\n" + "\n".join(f"  {p}" for p in written))
    return table


def _score_label(target_type):
    return "accuracy" if target_type in ("binary", "multiclass", "multilabel-indicator") else "R²"


def _save(ax, path):
    ax.figure.savefig(path, dpi=110, bbox_inches="tight")
    return path
