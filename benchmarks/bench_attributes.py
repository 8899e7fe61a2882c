"""Wang & Wong Table II on the CelebA subset: MobileNet V1 on all 40 attributes, from scratch or a distilled student.

For every alpha in ``--alphas`` (default 1, 0.5, 0.25), ``mobilenet_v1(num_classes=40, width_mult=alpha,
resolution_mult=size/224)`` is trained with ``MultiAttributeClassifier`` (binary cross-entropy on the 40 logits,
Adam) on a fixed seeded 75/25 split of ``--n`` CelebA images: the face crop, RGB, ``--size`` x ``--size``
pixels (64 by default), scaled to [-1, 1].

scratch    random initial weights (``head="keep"``).
distilled  the trunk of a student network saved by ``benchmarks/bench_fusion.py`` (the ``student_`` of
           ``sklearn_craft.fusion.FusionDistiller``, a MobileNet V1 whose ``classifier`` outputs the fused
           embedding), given with ``--init-from PATH [PATH ...]``: files written with
           ``torch.save(student.state_dict(), path)``, keys of ``mobilenet_v1(num_classes=D, width_mult=alpha)``.
           Each file is read with ``torch.load(weights_only=True)``; its alpha is read from its first convolution
           (``int(32 * alpha)`` filters) and must be one of ``--alphas``, its embedding size D from
           ``classifier.weight``. ``head="replace"`` swaps the embedding layer for a 40-output one, and the whole
           network is trained with the same budget as the scratch rows. The student is expected to have been
           distilled on images scaled to [-1, 1] (``(x - 0.5) / 0.5``, which is also MobileFaceNet's
           ``(pixel - 127.5) / 128`` to within 0.4 %).

Reported per network, on the test quarter: mean accuracy over the 40 attributes (``attribute_report``), the
accuracy of each attribute (CSV, table and figure), multiply-adds (``profiling.count_flops`` at the input size)
and parameters of the 40-output network, epochs run and training seconds. The row ``majority (train)`` answers
every attribute's more frequent value in the training labels. The MobileNet vs standard convolutions cost table
(``models.mobilenet_v1_costs``, 1000 classes, alpha 1 / 0.75 / 0.5 / 0.25 x rho 224 / 192 / 160 / 128) is
written next to the results (``mobilenet_costs.csv``, counts in millions) and shown in docs/attributes.rst.

Full size (no --quick): all 4,559 CelebA images (3,419 to train, of which 10 % are held out for early stopping
with patience 3, 1,140 to test), at most 10 epochs of Adam at lr 1e-3 in batches of 64, 64x64 input. Sized so
that each training finishes in at most 60 minutes on 2 shared CPU cores: an epoch of alpha = 1, the slowest,
took 165 s on a lightly loaded machine and 305 s with 3 other jobs running; the times of the full run are in the
results. --quick: 160 images, alpha 0.25, 1 epoch.
--merge keeps the rows of the results already written (attributes.csv, attributes_per_attribute.csv) for the
networks this run does not train, so that the alphas can be trained in separate runs; the kept rows must have
been trained on the same split with the same image size and epoch budget (checked: an error otherwise), and
each row's ``run`` column (CSV) and the list under the table say when and by which command it was trained.
Run: python benchmarks/bench_attributes.py [--quick] [--n N] [--epochs E] [--alphas 1 0.5 0.25]
     [--init-from students/student_a1.pt students/student_a0.5.pt] [--cache DIR] [--merge]
Writes benchmarks/results/attributes.md, attributes.csv, attributes_per_attribute.csv, mobilenet_costs.csv and
docs/_static/attributes_accuracy.png.
"""

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import _bench
from sklearn_craft.attributes import MultiAttributeClassifier, attribute_report
from sklearn_craft.models import load_weights, mobilenet_v1, mobilenet_v1_costs
from sklearn_craft.models.mobilenet import BASE_RESOLUTION
from sklearn_craft.models.presets import InputPreset
from sklearn_craft.plotting import plot_attribute_accuracy
from sklearn_craft.profiling import count_flops, count_parameters

FULL = dict(n=None, epochs=10, alphas=(1.0, 0.5, 0.25))
QUICK = dict(n=160, epochs=1, alphas=(0.25,))
TRAINING = dict(lr=1e-3, batch_size=64, validation_fraction=0.1, early_stopping=3)
#: Weight of the first convolution in a mobilenet_v1 state dict: its filter count gives alpha.
FIRST_CONV = "features.0.0.weight"
MAJORITY = "majority (train)"
MILLIONS = ["mult_adds", "parameters", "standard_mult_adds", "standard_parameters"]


def arguments(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--alphas", type=float, nargs="+", default=None, help="width multipliers (default 1 0.5 0.25)")
    p.add_argument("--epochs", type=int, default=None, help="most training epochs (early stopping may end sooner)")
    p.add_argument("--size", type=int, default=64, help="input side in pixels; resolution_mult = size / 224")
    p.add_argument("--init-from", type=Path, nargs="+", default=[], metavar="PATH",
                   help="student state dicts (torch.save(student.state_dict())) for the distilled rows")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the existing results for the networks this run does not train")
    args = p.parse_args(argv)
    if not 1 <= args.size <= BASE_RESOLUTION:
        p.error(f"--size must be between 1 and {BASE_RESOLUTION} (resolution_mult = size / {BASE_RESOLUTION}), got {args.size}")
    config = _bench.settings(args, FULL, QUICK)
    torch.set_num_threads(args.threads)
    return args, config


def students(paths, alphas, resolution_mult):
    """alpha -> (path, student network) for every ``--init-from`` file, alpha read from its first convolution."""
    found = {}
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if FIRST_CONV not in state or "classifier.weight" not in state:
            raise ValueError(f"{path} must hold a mobilenet_v1 state dict (keys {FIRST_CONV!r}, 'classifier.weight')")
        filters = state[FIRST_CONV].shape[0]
        widths = {alpha: mobilenet_v1(num_classes=1, width_mult=alpha).state_dict()[FIRST_CONV].shape[0] for alpha in alphas}
        matching = [alpha for alpha, width in widths.items() if width == filters]
        if not matching:
            raise ValueError(
                f"{path} is a MobileNet with {filters} first-layer filters, none of --alphas {list(alphas)} "
                f"(their first layers have {list(widths.values())})"
            )
        alpha = matching[0]
        if alpha in found:
            raise ValueError(f"{path} and {found[alpha][0]} are both students of alpha={alpha:g}; give one per alpha")
        network = mobilenet_v1(
            num_classes=state["classifier.weight"].shape[0], width_mult=alpha, resolution_mult=resolution_mult
        )
        found[alpha] = (path, load_weights(network, path))
    return found


def train(name, init, model, head, data, input_preset, config, setting):
    """Fit one MultiAttributeClassifier; return its result row (with ``setting`` and the run) and its test report."""
    X_train, X_test, y_train, y_test = data
    clf = MultiAttributeClassifier(
        model,
        head=head,
        epochs=config["epochs"],
        preprocess=input_preset.preprocess,
        random_state=_bench.SEED,
        progress=True,  # one tqdm line per epoch on stderr: how long the epochs take
        **TRAINING,
    )
    start = time.perf_counter()
    clf.fit(X_train, y_train)
    seconds = time.perf_counter() - start
    report = attribute_report(y_test, clf.predict(X_test))
    row = dict(
        model=name,
        init=init,
        mean_accuracy=report.loc["mean", "accuracy"],
        mult_adds=count_flops(clf.model_, input_preset.input_shape),
        parameters=count_parameters(clf.model_),
        epochs_run=int(clf.history_["epoch"].max()),
        best_epoch=int(clf.history_.loc[clf.history_["kept"], "epoch"].iloc[0]),
        train_s=seconds,
        **setting,
        run=f"{_bench.now()}: {_bench.command()}",
    )
    print(f"{name}: mean accuracy {row['mean_accuracy']:.4f}, {row['epochs_run']} epochs in {seconds:.0f} s", flush=True)
    return row, report


def majority(data):
    """Row and report of answering each attribute's more frequent training value."""
    _, X_test, y_train, y_test = data
    prediction = np.tile(y_train.mean(axis=0).to_numpy() >= 0.5, (len(y_test), 1))
    report = attribute_report(y_test, prediction)
    return dict(model=MAJORITY, init="-", mean_accuracy=report.loc["mean", "accuracy"]), report


def earlier_rows(results, trained, setting):
    """Rows and per-attribute accuracies of ``results`` (the CSVs) for the networks not in ``trained``.

    Raises ValueError when a kept row was trained with another ``setting`` (split sizes, image size,
    epoch budget) than this run's.
    """
    summary_path = results.with_suffix(".csv")
    per_attribute_path = results.with_name(results.stem + "_per_attribute.csv")
    if not summary_path.exists():
        return [], {}
    summary = pd.read_csv(summary_path)
    accuracy = pd.read_csv(per_attribute_path, index_col="attribute")
    kept = summary[(summary["model"] != MAJORITY) & ~summary["model"].isin(trained)]
    if kept.empty:
        return [], {}
    missing = [column for column in [*setting, "run"] if column not in kept.columns]
    if missing:
        raise ValueError(f"--merge: {summary_path} has no column {missing}; it was written before --merge existed")
    for _, row in kept.iterrows():
        theirs = {column: int(row[column]) for column in setting}
        if theirs != setting:
            raise ValueError(f"--merge: {row['model']} in {summary_path} was trained with {theirs}, this run with {setting}")
    reports = {name: accuracy[[name]].rename(columns={name: "accuracy"}) for name in kept["model"]}
    return kept.to_dict("records"), reports


def cost_table():
    """mobilenet_v1_costs() with counts in millions, rounded for the docs."""
    costs = mobilenet_v1_costs()
    costs[MILLIONS] = costs[MILLIONS] / 1e6
    costs = costs.round({"resolution_mult": 3}).rename(columns={column: f"{column}_M" for column in MILLIONS})
    return costs.round({column: 2 for column in costs.columns if column != "resolution_mult"})


def write_results(rows, reports, costs, data, config, args, results):
    summary = pd.DataFrame(rows).set_index("model")
    summary.to_csv(results.with_suffix(".csv"))
    accuracy = pd.DataFrame({name: report["accuracy"] for name, report in reports.items()})
    accuracy["positive_rate"] = reports[MAJORITY]["positive_rate"]
    accuracy.to_csv(results.with_name(results.stem + "_per_attribute.csv"))
    costs.to_csv(results.with_name("mobilenet_costs.csv"), index=False)

    trained = [name for name in reports if name != MAJORITY]
    labels = {name: f"{name} ({summary.loc[name, 'mean_accuracy']:.3f})" for name in trained}
    per_attribute = accuracy.drop(index="mean")
    ax = plot_attribute_accuracy(
        per_attribute[trained].rename(columns=labels),
        baseline=per_attribute[MAJORITY].rename(f"{MAJORITY} ({summary.loc[MAJORITY, 'mean_accuracy']:.3f})"),
    )
    ax.set_title(f"CelebA attributes, test quarter ({len(data[3])} images, {args.size}x{args.size})")
    figure = args.figures / "attributes_accuracy.png"
    ax.figure.savefig(figure, dpi=110, bbox_inches="tight")
    plt.close(ax.figure)

    X_train, X_test = data[0], data[1]
    intro = (
        "Wang & Wong Table II on the CelebA subset: MobileNet V1 trained on all 40 attributes with binary "
        f"cross-entropy (MultiAttributeClassifier). {len(X_train)} training / {len(X_test)} test images (fixed seeded "
        f"75/25 split), face crop at {args.size}x{args.size} RGB scaled to [-1, 1]; at most {config['epochs']} epochs "
        f"of Adam at lr {TRAINING['lr']:g}, batch {TRAINING['batch_size']}, "
        f"{TRAINING['validation_fraction']:.0%} of the training images held out for early stopping (patience "
        f"{TRAINING['early_stopping']}, the weights with the lowest validation loss kept). scratch: random weights; "
        "distilled: the trunk of a distilled student (--init-from), its embedding layer replaced by a 40-output one. "
        f"{MAJORITY}: every attribute's more frequent training value. mean_accuracy: over the 40 attributes on the "
        f"test images; mult_adds (profiling.count_flops) and parameters of the 40-output network at {args.size}x"
        f"{args.size}; train_s: wall seconds of fit on the shared machine. Figure: {figure.name}."
    )
    costs_shown = costs.set_index(["width_mult", "resolution_mult"])
    runs = summary["run"].dropna()
    blocks = [
        _bench.table(summary.drop(columns="run"), floatfmt=".4g"),
        "",
        "Trained by (date: command):",
        "",
        *(f"- {name}: `{run}`" for name, run in runs.items()),
        "",
        "### Accuracy per attribute (test images)",
        "",
        _bench.table(accuracy, floatfmt=".3f"),
        "",
        "### MobileNet V1 vs the same network with standard convolutions (1000 classes, millions)",
        "",
        _bench.table(costs_shown, floatfmt=".4g"),
    ]
    _bench.write_section(results, "Facial attributes with MobileNet V1 (Wang & Wong)", intro, blocks, args.quick)


def main(argv=None):
    args, config = arguments(argv)
    results = args.results or _bench.RESULTS / "attributes.md"
    args.figures.mkdir(parents=True, exist_ok=True)
    input_preset = InputPreset(
        name="mobilenet_v1", size=(args.size, args.size), color="rgb", mean=(0.5,) * 3, std=(0.5,) * 3
    )
    resolution_mult = args.size / BASE_RESOLUTION
    initial = students(args.init_from, config["alphas"], resolution_mult)
    costs = cost_table()
    images, labels = _bench.load("celeba", args.data_root, config["n"], input_preset, args.cache)
    data = _bench.split(images, labels.drop(columns="identity"), "multilabel-indicator")
    n_attributes = data[2].shape[1]

    setting = dict(n_train=len(data[0]), n_test=len(data[1]), size=args.size, max_epochs=config["epochs"])
    trained = [f"a={alpha:g} {init}" for alpha in config["alphas"] for init in ("scratch", "distilled")]
    kept_rows, kept_reports = earlier_rows(results, trained, setting) if args.merge else ([], {})

    row, report = majority(data)
    rows, reports = [row, *kept_rows], {MAJORITY: report, **kept_reports}
    for alpha in config["alphas"]:
        torch.manual_seed(_bench.SEED)
        scratch = mobilenet_v1(num_classes=n_attributes, width_mult=alpha, resolution_mult=resolution_mult)
        runs = [(f"a={alpha:g} scratch", "random", scratch, "keep")]
        if alpha in initial:
            path, student = initial[alpha]
            runs.append((f"a={alpha:g} distilled", path.name, student, "replace"))
        for name, init, model, head in runs:
            row, reports[name] = train(name, init, model, head, data, input_preset, config, setting)
            rows.append(row)
            # Written after every network, so that a long run that stops keeps the finished ones.
            write_results(rows, reports, costs, data, config, args, results)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
