"""Low-cost TL Figures 5 and 6 with real primary networks, and the satellite speed claim.

Sources (each with its own weights, input size, colour and normalisation, ``models.preset``):
MobileFaceNet (recognition, pooled at ``linear1.conv``, 128 filters), mini-Xception (emotion,
``blocks.3.pointwise2``, 128 filters, the last layer before its 7-class convolution) and the
MTCNN O-Net (detection / landmarks, ``conv4``, 128 filters). Every data set is loaded once per
source with that source's preset and pooled with ``ActivationPooler(net, layers=[layer],
preprocess=preset.preprocess)``; the arrays go to ``task_relationship_matrix`` (cross-validated
linear satellites), one matrix per data set, whose columns are concatenated:
CelebA Male, Smiling, Eyeglasses, Young (accuracy); UTKFace age (MAE, years) and gender
(accuracy); AFLW2000 yaw (MAE, degrees, |angle| <= 99); FER2013 emotion (accuracy, 7 classes).

``relative_drop`` (Figure 5, right) is taken against the fine-tuned MobileFaceNet baselines of
bench_etl_table.py (benchmarks/results/etl_table.csv: gender -> Male, emotion, yaw, age) where they
exist, else against the best source of the task. The baselines are test-split scores of another
run, the matrix is cross-validated: the comparison is indicative.

Speed claim (the paper: satellites 78x faster than transfer learning at similar accuracy): on the
75/25 split of gender (CelebA Male) and emotion (FER2013), MobileFaceNet as source, (a) pool the
layer once and fit a ridge classifier (standardised, alpha by leave-one-out), vs (b) transfer
learning with every convolution frozen and a Linear head trained by ``finetune`` for
``--epochs`` epochs (each epoch runs the frozen network forward again). Score and wall time.

Full size (no --quick): every image (CelebA 4,559, UTKFace 5,000, AFLW2000 1,969, FER2013 train
3,000), 5-fold CV, 10 head epochs. --quick: 200 images per data set, 3 folds, 2 epochs.
Run: python benchmarks/bench_task_relationships.py [--quick] [--n N] [--etl-results CSV]
Writes benchmarks/results/task_relationships.md / .csv and docs/_static/task_relationships_*.png.
"""

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import RidgeClassifierCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

import _bench
from sklearn_craft.images import as_image_dataset, iter_batches
from sklearn_craft.finetune import finetune
from sklearn_craft.models import mini_xception, mobilefacenet, mtcnn_onet, preset
from sklearn_craft.plotting import plot_task_matrix
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.relationships import relative_drop, task_relationship_matrix
from sklearn_craft.surgery import truncate

SOURCES = {
    "mobilefacenet": (mobilefacenet, "linear1.conv"),
    "mini_xception": (mini_xception, "blocks.3.pointwise2"),
    "mtcnn_onet": (mtcnn_onet, "conv4"),
}
#: Data set -> (label column -> task name).
DATASETS = {
    "celeba": {"Male": "Male", "Smiling": "Smiling", "Eyeglasses": "Eyeglasses", "Young": "Young"},
    "utkface": {"age": "age", "gender": "utk_gender"},
    "aflw2000": {"yaw": "yaw"},
    "fer2013": {"emotion": "emotion"},
}
SCORING = {"age": "mae", "yaw": "mae"}
#: ETL table task -> column of the matrix it is the fine-tuned baseline of.
ETL_COLUMNS = {"gender": "Male", "emotion": "emotion", "yaw": "yaw", "age": "age"}
SPEED_TASKS = {"gender": ("celeba", "Male"), "emotion": ("fer2013", "emotion")}
RIDGE_ALPHAS = np.logspace(-3, 3, 13)


def pooled(net, layer, input_preset, images):
    return ActivationPooler(net, layers=[layer], preprocess=input_preset.preprocess).fit_transform(images)


class _Frozen(nn.Module):
    """A network whose parameters are frozen and which stays in eval mode (BatchNorm statistics too)."""

    def __init__(self, body):
        super().__init__()
        self.body = body.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)

    def forward(self, x):
        return self.body(x)


def speed_claim(task, images, labels, net, layer, input_preset, epochs):
    """Satellite ridge vs frozen-convolution transfer learning with a trained Linear head."""
    y = labels.astype(str)
    classes, y_index = np.unique(y, return_inverse=True)
    train, test = _bench.split(np.arange(len(y)), y, _bench.TASKS[task][2])[:2]

    start = time.perf_counter()
    features = pooled(net, layer, input_preset, images[train])
    satellite = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=RIDGE_ALPHAS)).fit(features, y[train])
    satellite_time = time.perf_counter() - start
    satellite_score = satellite.score(pooled(net, layer, input_preset, images[test]), y[test])

    start = time.perf_counter()
    body = _Frozen(truncate(net, layer, torch.zeros(1, 3, *input_preset.size)))
    model = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features.shape[1], len(classes)))
    finetune(model, images[train], y_index[train], loss="cross_entropy", epochs=epochs, lr=1e-3, batch_size=32,
             preprocess=input_preset.preprocess, random_state=_bench.SEED)
    transfer_time = time.perf_counter() - start
    with torch.inference_mode():
        batches = iter_batches(as_image_dataset(images[test]), 64, preprocess=input_preset.preprocess)
        predicted = torch.cat([model(batch).argmax(dim=1) for batch in batches]).numpy()
    transfer_score = float((predicted == y_index[test]).mean())
    return [
        dict(task=task, method="satellite (pool + ridge)", accuracy=satellite_score, time_s=satellite_time),
        dict(task=task, method=f"frozen convs + Linear head, {epochs} epochs", accuracy=transfer_score, time_s=transfer_time),
    ]


def main(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--epochs", type=int, default=None, help="epochs of the frozen-convolution head")
    p.add_argument("--cv", type=int, default=None, help="cross-validation folds of the matrix")
    p.add_argument("--etl-results", type=Path, default=_bench.RESULTS / "etl_table.csv",
                   help="baselines of bench_etl_table.py (csv)")
    args = p.parse_args(argv)
    n = args.n if args.n is not None else (200 if args.quick else None)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 10)
    cv = args.cv if args.cv is not None else (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    results = args.results or _bench.RESULTS / "task_relationships.md"
    args.figures.mkdir(parents=True, exist_ok=True)
    nets = {
        name: (build(weights=args.data_root / _bench.WEIGHTS[name]), layer, preset(name))
        for name, (build, layer) in SOURCES.items()
    }

    matrices, metrics, directions, sizes, speed = [], {}, {}, {}, []
    for dataset, columns in DATASETS.items():
        features, tasks = {}, None
        for name, (net, layer, input_preset) in nets.items():
            start = time.perf_counter()
            images, labels = _bench.load(dataset, args.data_root, n, input_preset, args.cache)
            features[name] = pooled(net, layer, input_preset, images)
            print(f"{dataset} / {name}: {len(images)} images pooled in {time.perf_counter() - start:.0f} s", flush=True)
            if tasks is None:
                tasks = labels[list(columns)].rename(columns=columns)
            if name == "mobilefacenet":
                for task, (speed_set, column) in SPEED_TASKS.items():
                    if speed_set == dataset:
                        speed += speed_claim(task, images, labels[column].to_numpy(), net, layer, input_preset, epochs)
        continuous = {task: metric for task, metric in SCORING.items() if task in tasks}
        # Integer ages would be read as classes: the kind is set, not inferred.
        matrix = task_relationship_matrix(
            features, None, tasks.astype({task: float for task in continuous}), cv=cv, scoring=continuous,
            task_types={task: "continuous" for task in continuous}, random_state=_bench.SEED,
        )
        matrices.append(matrix)
        metrics.update(matrix.attrs["metric"])
        directions.update(matrix.attrs["greater_is_better"])
        sizes[dataset] = len(tasks)
    matrix = pd.concat(matrices, axis=1)
    matrix.attrs.update(metric=metrics, greater_is_better=directions)

    best = pd.Series({task: (matrix[task].max() if directions[task] else matrix[task].min()) for task in matrix.columns})
    reference, reference_kind = best.copy(), pd.Series("best source", index=matrix.columns)
    if args.etl_results.is_file():
        etl = pd.read_csv(args.etl_results)
        for _, row in etl[etl["method"] == "baseline"].iterrows():
            column = ETL_COLUMNS.get(row["task"])
            if column in reference.index:
                reference[column] = row["score"]
                reference_kind[column] = f"fine-tuned MobileFaceNet ({int(row['n_train'])} train images)"
    drop = relative_drop(matrix, reference)

    speed = pd.DataFrame(speed)
    for task, rows in speed.groupby("task"):
        ratio = rows["time_s"].iloc[1] / rows["time_s"].iloc[0]
        print(f"speed-up of the satellite over frozen-conv transfer on {task}: {ratio:.1f}x "
              f"(accuracy {rows['accuracy'].iloc[0]:.3f} vs {rows['accuracy'].iloc[1]:.3f})")
    speed["speedup_vs_transfer"] = speed.groupby("task")["time_s"].transform(lambda t: t.iloc[1] / t)

    long = pd.concat({"score": matrix, "relative_drop_pct": drop}, names=["kind", "source"]).reset_index()
    long.to_csv(results.with_suffix(".csv"), index=False)
    speed.to_csv(results.with_name(results.stem + "_speed.csv"), index=False)

    figures = []
    for name, frame, label in (("scores", matrix, "satellite score"), ("relative_drop", drop, "relative drop (%)")):
        ax = plot_task_matrix(frame)
        ax.set_title(f"{label}, rows: sources" + (" (--quick)" if args.quick else ""))
        path = args.figures / f"task_relationships_{name}.png"
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        figures.append(path.name)

    header = pd.DataFrame({"metric": pd.Series(metrics), "reference": reference, "reference_is": reference_kind}).T
    intro = (
        "Low-cost TL Figures 5 and 6: cross-validated linear satellites of three real source networks "
        f"({cv}-fold, {'all' if n is None else n} images per data set: "
        + ", ".join(f"{d} {k}" for d, k in sizes.items())
        + "). Rows: sources; columns: tasks. Relative drop = % worse than the reference "
        "(fine-tuned baseline of the ETL table where available, else the best source)."
    )
    blocks = [
        "### Satellite scores", "", _bench.table(matrix.rename_axis("source")), "",
        "### Relative drop (%)", "", _bench.table(drop.rename_axis("source"), ".3g"), "",
        "### Metrics and references", "", _bench.table(header.rename_axis("row")), "",
        f"### Satellites vs frozen-convolution transfer learning (MobileFaceNet `{SOURCES['mobilefacenet'][1]}`)", "",
        _bench.table(speed.set_index(["task", "method"])), "",
        "Figures: " + ", ".join(f"`{f}`" for f in figures),
    ]
    _bench.write_section(results, "Task relationships (Low-cost TL Figures 5, 6)", intro, blocks, args.quick)
    return matrix, drop, speed


if __name__ == "__main__":
    main()
