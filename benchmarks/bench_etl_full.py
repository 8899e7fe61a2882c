"""ETL Table 1 on all images: every rule with compensation, its head layer chosen, at matched FLOPs.

The protocol of the Reproducing page's all-images tables (issue 13), for MobileFaceNet (CASIA-WebFace
weights) on every image of a task:

gender   CelebA ``Male``, all 4,559 images, seeded stratified 75/25 split.
yaw      AFLW2000, the 1,969 images with every angle within 99 degrees, seeded 75/25 split.
age      UTKFace, all 4,998 images, seeded 75/25 split.
emotion  the 3,000 FER2013 training images for training, the 3,589 test (PrivateTest) images as the
         test set.

Rows (``--rows``), every one ``head="satellite"`` and fine-tuned with the task's budget:

unpruned           ``gamma=0, head_layer="best"``: nothing is cut after the best layer.
one-shot           ``gamma=g, head_layer="best", compensate=True``: the paper's rule.
sequential         the same with ``selection="sequential"`` (the cascade-aware mode).
one-shot-l1        one-shot's per-layer counts (LASSO's knees), the filters of each layer ranked by
                   the L1 norm of their weights (``filter_rule="l1_norm"``): CRAFT's allocation of
                   the cut over the layers with magnitude's choice within each.
sequential-l1      the same with ``selection="sequential"``: every layer's count is LASSO's knee on
                   the network already cut (by L1 norm) at the layers before it.
sequential-flops   sequential with its knees priced by FLOPs (``knee="flops"``): a layer keeps a
                   filter when it lowers the normalised curve by gamma times the filter's FLOPs over the
                   mean FLOPs of a whole layer.
sequential-flops-l1
                   the priced knee's counts with L1-norm's filters (``knee="flops"``,
                   ``filter_rule="l1_norm"``): the FLOPs-priced allocation, magnitude's choice.
l1@one-shot, random@one-shot, l1@sequential, random@sequential, l1@sequential-l1, l1@sequential-flops,
random@sequential-flops, l1@sequential-flops-l1
                   ``filter_rule="l1_norm"`` or ``"random"`` with ``compensate=True``, at the FLOPs and
                   the head layer of the row they name (``flops_target`` needs a fixed head layer).
lasso_rank@sequential, lasso_rank@sequential-flops
                   ``filter_rule="lasso_rank"`` the same way: L1-norm's allocation (one keep ratio for
                   every layer) with CRAFT's choice within each layer (entry in its LASSO path).

Every fit appends its row to the records (``--records``, a CSV, default
benchmarks/results/etl_full.csv; column commit: the library's git commit that fitted it) as soon as it
ends, and a row already there (same task, row, gamma, seed, training images and budget) is not fitted
again: a run of many hours can be split over several
invocations, and the matched rows read their reference's FLOPs and head layer from the records: from a
recorded row of the reference with the same task, gamma, seed, training images and device, whatever its
fine-tuning (budget, --lr, --monitor, --calibrate-head), since both come from the selection alone (rows
that would serve must agree, else the script stops). Invocations that ran at the same time, each on its
own records file, are gathered with ``--merge FILE [FILE ...]``: the records of those files that the
records lack are added to them (before any fit), so ``--merge`` with ``--rows`` and no row only merges
and writes the table.
The table (benchmarks/results/etl_full.md, or --results) is written from all the records of the
run's settings, followed by the matched comparisons: every L1-norm or random row beside the CRAFT row whose
FLOPs it took (same seed and fine-tuning), the CRAFT row's lead before and after fine-tuning, and per task,
CRAFT row and rule a summary of the fine-tuned ones (how many ahead and behind, the mean lead and its
standard error), then per task random filters against L1-norm at the FLOPs of the same row (random's lead
before and after fine-tuning): how much of a difference of filters fine-tuning leaves.

Fine-tuning budgets (Adam, lr 1e-3, batch 32, 20 % of the training images for early stopping with the
given patience, the best weights kept): gender at most 6 epochs, patience 2; yaw 20 and 6; age and
emotion 8 and 3 (``--epochs`` / ``--patience`` set one budget for every task). Full size: gamma 0.001,
100 alphas. A fit takes 15 min to 2 h on 2 CPU cores (sequential fits the longest: passes over the
training images per stage, from the values kept before the previous stage since 2026-12-03).
--quick: 48 images per task (emotion: 48 training and 48 test images), 5 alphas, 1 epoch.
--seed S [S ...] refits rows with the pruner's ``random_state=S`` (default 0) on the same train/test
split: a repeated fit, recorded beside the others.
--monitor accuracy fine-tunes the classification tasks (gender, emotion) with early stopping on the
validation accuracy instead of the loss (``finetune_params["monitor"]``), recorded as other rows; yaw and
age always watch the loss.
--calibrate-head divides the satellite head of gender and emotion by the temperature fitted on its
images before fine-tuning (``CraftPruner(calibrate_head=True)``; no prediction changes, the loss and its
gradients do), recorded as other rows (column calibrate_head, head_temperature).
--lr sets Adam's learning rate of every fine-tuning (default 1e-3), recorded as other rows.
--device runs every forward pass and fine-tuning there (``CraftPruner(device=...)``, e.g. ``cuda``; the
selection itself runs on the CPU), recorded as other rows.
On a GPU the script turns TF32 off, so that float32 sums differ from the CPU's by their order only.
--epochs 0 fits without fine-tuning: a row's selection, FLOPs and head layer, and the score of the
network before any training (its satellite head fitted on every training image, not only on those that
fine-tuning would leave it), recorded as other rows (epochs 0): a cheap check of what a library version
selects against the recorded rows.
--jobs N runs N fits at a time, each in its own process of this script with --threads threads (for a
machine with many cores, or a GPU that one fit leaves idle): a matched row starts once the row it
follows has ended, and each fit's record is merged into the records when it ends. --deadline S (with
--jobs) starts no fit after S seconds and stops the running ones, for a lease of fixed length; the
command then fails, naming the fits left out, after writing the table of what was recorded.
Run: python benchmarks/bench_etl_full.py --tasks yaw --rows sequential l1@sequential [--records PATH] [--seed S]
     On a lent 16-core GPU machine: ... --device cuda --jobs 6 --threads 2 --deadline 480
     ``--rows`` with no row fits nothing and writes the table of the tasks' records.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import _bench
from sklearn_craft.datasets import load_fer2013
from sklearn_craft.models import mobilefacenet, preset
from sklearn_craft.profiling import count_parameters
from sklearn_craft.pruner import CraftPruner
from sklearn_craft.targets import CLASSIFICATION_KINDS

FULL = dict(n=None, epochs=None, gammas=(0.001,), alphas=100)
QUICK = dict(n=48, epochs=1, gammas=(0.01,), alphas=5)
#: Task -> (at most this many epochs, early-stopping patience).
BUDGETS = {"gender": (6, 2), "yaw": (20, 6), "age": (8, 3), "emotion": (8, 3)}
#: Matched row -> (filter_rule, the row whose FLOPs and head layer it takes).
MATCHED = {
    "l1@one-shot": ("l1_norm", "one-shot"),
    "random@one-shot": ("random", "one-shot"),
    "l1@sequential": ("l1_norm", "sequential"),
    "random@sequential": ("random", "sequential"),
    "l1@sequential-l1": ("l1_norm", "sequential-l1"),
    "lasso_rank@sequential": ("lasso_rank", "sequential"),
    "lasso_rank@sequential-flops": ("lasso_rank", "sequential-flops"),
    "l1@sequential-flops": ("l1_norm", "sequential-flops"),
    "random@sequential-flops": ("random", "sequential-flops"),
    "l1@sequential-flops-l1": ("l1_norm", "sequential-flops-l1"),
}
ROWS = ["unpruned", "one-shot", "sequential", "one-shot-l1", "sequential-l1", "sequential-flops", "sequential-flops-l1",
        *MATCHED]
KEY = ["task", "row", "gamma", "random_state", "n_train", "epochs", "patience", "lr", "monitor", "calibrate_head",
       "device"]
#: The columns of KEY that determine a fit's selection (its FLOPs and head layer): the rest is fine-tuning.
SELECTION = ["task", "row", "gamma", "random_state", "n_train", "device"]


def task_data(task, root, n, input_preset):
    """X_train, X_test, y_train, y_test of one task: the seeded split of ``_bench``, except emotion,
    whose test set is FER2013's own test split."""
    if task != "emotion":
        return _bench.task_data(task, root, n, input_preset)
    X_train, train = _bench.load("fer2013", root, n, input_preset)
    X_test, test = load_fer2013(root / "fer2013", split="test", n=n, preset=input_preset, random_state=_bench.SEED)
    return X_train, X_test, train["emotion"].to_numpy().astype(str), test["emotion"].to_numpy().astype(str)


def row_params(row, reference):
    """CraftPruner parameters of a row; ``reference`` is the recorded row a matched one follows."""
    if row == "unpruned":
        return dict(gamma=0.0, head_layer="best")
    if row in ("one-shot", "sequential"):
        return dict(selection=row, head_layer="best", compensate=True)
    if row in ("one-shot-l1", "sequential-l1"):
        return dict(selection=row.removesuffix("-l1"), filter_rule="l1_norm", head_layer="best", compensate=True)
    if row in ("sequential-flops", "sequential-flops-l1"):
        rule = "l1_norm" if row.endswith("-l1") else "lasso"
        return dict(selection="sequential", knee="flops", filter_rule=rule, head_layer="best", compensate=True)
    rule, _ = MATCHED[row]
    return dict(filter_rule=rule, flops_target=float(reference["flops_share"]), head_layer=reference["head_layer"],
                compensate=True)


def read_records(path):
    """The records at ``path``; those written before ``--seed`` (``--lr``, ``--monitor``, ``--calibrate-head``,
    ``--device``) existed were fitted with the default seed (lr 1e-3, early stopping on the validation loss, an
    uncalibrated head, on the CPU); those written before the commit column (2026-12-06) name no commit."""
    if not path.exists():
        return pd.DataFrame(columns=KEY)
    # A short commit such as 4e19422 would be read as a number.
    records = pd.read_csv(path, dtype={"commit": str})
    for column, default in (("random_state", _bench.SEED), ("lr", 1e-3), ("monitor", "loss"), ("calibrate_head", False),
                            ("device", "cpu")):
        if column not in records:
            records.insert(KEY.index(column), column, default)
    if "commit" not in records:
        records["commit"] = None
    return records


def merge_records(records_path, sources):
    """Add to the records at ``records_path`` the records of the files ``sources`` that it lacks: of the
    records with one KEY, the first read (``records_path``'s, then in the order of ``sources``) is kept."""
    frames = [frame for frame in map(read_records, [records_path, *sources]) if not frame.empty]
    if frames:
        merged = pd.concat(frames, ignore_index=True)
        merged.drop_duplicates(subset=KEY, keep="first").to_csv(records_path, index=False)


def recorded(records, key, columns=KEY):
    """The records whose ``columns`` equal those of ``key``."""
    return records[(records[columns] == pd.Series(key)[columns]).all(axis=1)]


def matched_reference(records, key, reference_row):
    """The recorded ``reference_row`` whose FLOPs and head layer the matched fit ``key`` takes: any with
    the same selection (``SELECTION``), whatever its fine-tuning; several must agree."""
    followed = recorded(records, {**key, "row": reference_row}, SELECTION)
    if not len(followed):
        raise SystemExit(f"{key['row']} needs a recorded {reference_row} row of {key['task']} at gamma "
                         f"{key['gamma']:g} (seed {key['random_state']}, device {key['device']})")
    if followed[["flops_share", "head_layer"]].drop_duplicates().shape[0] > 1:
        raise SystemExit(f"the recorded {reference_row} rows of {key['task']} at gamma {key['gamma']:g} (seed "
                         f"{key['random_state']}) disagree on FLOPs or head layer: {followed[['flops_share', 'head_layer']]}")
    return followed.iloc[-1]


def task_monitor(task, monitor):
    """What the task's early stopping watches: ``monitor`` for a classification task, else the loss."""
    return monitor if _bench.TASKS[task][2] in CLASSIFICATION_KINDS else "loss"


def task_calibrates(task, calibrate):
    """Whether the task's head is calibrated: ``calibrate`` for a classification task, else False."""
    return calibrate and _bench.TASKS[task][2] in CLASSIFICATION_KINDS


def fit_row(task, row, gamma, seed, lr, monitor, calibrate, device, data, budget, config, net, input_preset,
            reference):
    """Fit one row with ``random_state=seed`` (``calibrate_head=calibrate``, fine-tuned at ``lr`` on ``device``)
    and return its record."""
    X_train, X_test, y_train, y_test = data
    kind = _bench.TASKS[task][2]
    settings = _bench.finetune_settings(*budget)
    finetune = None if settings is None else {**settings, "lr": lr, "monitor": monitor}
    params = {"gamma": gamma, **row_params(row, reference)}
    pruner = CraftPruner(
        net, head="satellite", preprocess=input_preset.preprocess, random_state=seed, progress=False,
        calibrate_head=calibrate, device=device,
        selector_params=dict(alphas=config["alphas"]), finetune_params=finetune, **params,
    )
    start = time.perf_counter()
    pruner.fit(X_train, y_train)
    seconds = time.perf_counter() - start
    flops = pruner.report_.loc["flops"]
    # --epochs 0: no fine-tuning, the untrained network is epoch 0 of 0 (its head fitted on every training image).
    history = pruner.history_ if pruner.history_ is not None else pd.DataFrame({"epoch": [0], "kept": [True]})
    return dict(
        task=task, row=row, gamma=gamma, random_state=seed, n_train=len(y_train), epochs=budget[0],
        patience=budget[1], lr=lr, monitor=monitor, calibrate_head=calibrate, device=device,
        head_temperature=pruner.head_temperature_,
        n_test=len(y_test), metric=_bench.metric_name(kind), head_layer=pruner.head_layer_,
        flops_share=float(flops["pruned"] / flops["original"]),
        parameters=count_parameters(pruner.pruned_model_), filters=sum(len(k) for k in pruner.keep_.values()),
        score_before_ft=_bench.task_score(kind, y_test, pruner.predict_before_finetune(X_test)),
        score=_bench.task_score(kind, y_test, pruner.predict(X_test)),
        best_epoch=int(history.loc[history["kept"], "epoch"].iloc[0]), epochs_run=int(history["epoch"].max()),
        val_loss=" ".join(f"{v:.4g}" for v in history.get("val_loss", [])),
        val_accuracy=" ".join(f"{v:.4g}" for v in history.get("val_accuracy", [])),
        fit_s=round(seconds, 1), date=_bench.now(),
        commit=_bench.library_commit(),
    )


def fits(rows, gammas, seeds):
    """(row, gamma, seed) of every fit of a task, matched rows after the rows they follow (``ROWS``'s
    order, whatever the order asked for); the unpruned row cuts nothing at any gamma: it is fitted once
    per seed, recorded at gamma 0."""
    return [
        (row, gamma, seed)
        for row in ROWS if row in rows
        for gamma in ([0.0] if row == "unpruned" else gammas)
        for seed in seeds
    ]


def run(args, config, records_path):
    if not args.rows:
        return  # only the table (and --merge): no network or data to load
    input_preset = preset("mobilefacenet")
    net = mobilefacenet(weights=args.data_root / _bench.WEIGHTS["mobilefacenet"])
    for task in args.tasks:
        data = task_data(task, args.data_root, config["n"], input_preset)
        budget = (config["epochs"], args.patience) if config["epochs"] is not None else BUDGETS[task]
        if args.quick:
            budget = (config["epochs"], 1)
        for row, gamma, seed in fits(args.rows, config["gammas"], args.seed):
            records = read_records(records_path)
            monitor = task_monitor(task, args.monitor)
            calibrate = task_calibrates(task, args.calibrate_head)
            key = dict(task=task, row=row, gamma=gamma, random_state=seed, n_train=len(data[2]),
                       epochs=budget[0], patience=budget[1], lr=args.lr, monitor=monitor, calibrate_head=calibrate,
                       device=args.device)
            if len(recorded(records, key)):
                print(f"  {task} {row} gamma={gamma:g} seed={seed}: recorded, skipped", flush=True)
                continue
            reference = None
            if row in MATCHED:
                reference = matched_reference(records, key, MATCHED[row][1])
            record = fit_row(task, row, gamma, seed, args.lr, monitor, calibrate, args.device, data, budget,
                             config, net, input_preset, reference)
            print(f"  {task} {row} gamma={gamma:g} seed={seed}: {record['score_before_ft']:.4g} -> "
                  f"{record['score']:.4g} at {100 * record['flops_share']:.1f} % FLOPs, {record['fit_s']:.0f} s",
                  flush=True)
            new = pd.DataFrame([record])
            (new if records.empty else pd.concat([records, new], ignore_index=True)).to_csv(records_path, index=False)


def _fit_argv(args, task, row, gamma, seed, records):
    """This script's arguments that fit one (task, row, gamma, seed) into ``records``, with ``args``'s settings."""
    argv = ["--data-root", str(args.data_root), "--threads", str(args.threads), "--tasks", task, "--rows", row,
            "--gammas", repr(gamma), "--seed", str(seed), "--patience", str(args.patience), "--lr", repr(args.lr),
            "--monitor", args.monitor, "--device", args.device, "--records", str(records),
            "--results", str(records.with_suffix(".md"))]
    for option, value in (("--n", args.n), ("--epochs", args.epochs), ("--alphas", args.alphas)):
        if value is not None:
            argv += [option, str(value)]
    return argv + ["--quick"] * args.quick + ["--calibrate-head"] * args.calibrate_head


def run_parallel(args, config, records_path):
    """:func:`run` with each fit in its own process of this script, at most ``args.jobs`` at a time.

    A matched row starts once the fit of the row it follows has ended. Each process starts from a copy
    of the records (so recorded fits are skipped and matched rows find their reference) and its new
    record is merged into ``records_path`` when it ends; its output is printed then. After
    ``args.deadline`` seconds no fit starts and the running ones are stopped. Returns the fits that
    failed, were stopped or did not start.
    """
    pending = [(task, *fit) for task in args.tasks for fit in fits(args.rows, config["gammas"], args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    start, running, ended, failed = time.monotonic(), {}, set(), set()
    with tempfile.TemporaryDirectory() as work:
        while pending or running:
            for fit, (process, log) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[fit]
                (ended if process.returncode == 0 else failed).add(fit)
                log.seek(0)
                print(f"[{time.monotonic() - start:.0f} s] {' '.join(map(str, fit))}: exit {process.returncode}\n"
                      f"{log.read()}", end="", flush=True)
                log.close()
                merge_records(records_path, [_fit_records(work, fit)])
            if args.deadline is not None and time.monotonic() - start > args.deadline:
                for fit, (process, _) in running.items():
                    process.kill()
                    process.wait()
                    failed.add(fit)
                    print(f"{' '.join(map(str, fit))}: stopped at the deadline", flush=True)
                failed.update(pending)
                break
            for fit in list(pending):
                task, row, gamma, seed = fit
                followed = (task, MATCHED[row][1], gamma, seed) if row in MATCHED else None
                if followed in failed:
                    pending.remove(fit)
                    failed.add(fit)
                    print(f"{' '.join(map(str, fit))}: not started, {' '.join(map(str, followed))} failed", flush=True)
                elif len(running) < args.jobs and (followed in ended or followed not in [*running, *pending]):
                    pending.remove(fit)
                    records = _fit_records(work, fit)
                    if records_path.exists():
                        shutil.copy(records_path, records)
                    log = tempfile.TemporaryFile("w+", dir=work)
                    command = [sys.executable, __file__, *_fit_argv(args, task, row, gamma, seed, records)]
                    running[fit] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
            time.sleep(1)
    return sorted(failed)


def _fit_records(work, fit):
    """The records file of one fit's process in the folder ``work``."""
    return Path(work) / ("_".join(map(str, fit)).replace("@", "-") + ".csv")


#: The columns of KEY that a matched row shares with the row whose FLOPs it took.
FINE_TUNING = [column for column in KEY if column != "row"]


def _lead_sign(metric):
    """Per record, the factor that turns a score difference into a lead: accuracy in points, MAE reversed."""
    return metric.map({"accuracy": 100.0, "MAE": -1.0})


def _baseline_records(records):
    """The recorded L1-norm and random rows, with the row whose FLOPs they took (reference) and their rule."""
    rules = {row: rule for row, (rule, _) in MATCHED.items() if rule in ("l1_norm", "random")}
    baselines = records[records["row"].isin(list(rules))]
    return baselines.assign(reference=baselines["row"].map(lambda row: MATCHED[row][1]),
                            baseline=baselines["row"].map(rules))


def matched_comparisons(records):
    """Every recorded L1-norm or random row beside the row whose FLOPs and head layer it took, fitted with the
    same budget and seed: the CRAFT row's lead over it before and after fine-tuning, positive where the CRAFT
    row is better (accuracy in points, MAE in the task's unit)."""
    pairs = _baseline_records(records).merge(records, left_on=[*FINE_TUNING, "reference"],
                                             right_on=[*FINE_TUNING, "row"], suffixes=("_baseline", ""))
    pairs = pairs.sort_values(["task", "reference", "baseline", "gamma", "random_state", "epochs", "lr", "monitor"],
                              kind="stable", ignore_index=True)
    sign = _lead_sign(pairs["metric"])
    return pd.DataFrame({
        **{column: pairs[column] for column in ["task", "reference", "baseline", "gamma", "random_state", "epochs",
                                                "lr", "monitor"]},
        "flops_pct": 100 * pairs["flops_share"],
        "baseline_flops_pct": 100 * pairs["flops_share_baseline"],
        "lead_before_ft": sign * (pairs["score_before_ft"] - pairs["score_before_ft_baseline"]),
        "lead_after_ft": sign * (pairs["score"] - pairs["score_baseline"]),
    })


def _lead_summary(leads, by, count, ahead, behind):
    """Per group of ``leads`` (columns lead_before_ft and lead_after_ft): how many (column ``count``), how
    many end ahead and behind after fine-tuning, and the mean lead before and after it with the standard error
    of each mean (nan for a single one)."""
    grouped = leads.groupby(by)
    return pd.DataFrame({
        count: grouped.size(),
        ahead: grouped["lead_after_ft"].apply(lambda lead: int((lead > 0).sum())),
        behind: grouped["lead_after_ft"].apply(lambda lead: int((lead < 0).sum())),
        "mean_lead_before_ft": grouped["lead_before_ft"].mean(),
        "se_before_ft": grouped["lead_before_ft"].sem(),
        "mean_lead_after_ft": grouped["lead_after_ft"].mean(),
        "se_after_ft": grouped["lead_after_ft"].sem(),
    })


def comparison_summary(pairs):
    """Per task, CRAFT row and baseline rule, over the fine-tuned comparisons of :func:`matched_comparisons`:
    how many, on how many the CRAFT row ends ahead and behind, and its mean lead before and after fine-tuning
    with their standard errors."""
    return _lead_summary(pairs[pairs["epochs"] > 0], ["task", "reference", "baseline"], "comparisons",
                         "ahead_after_ft", "behind_after_ft")


def baseline_gap(records):
    """Per task, random filters against L1-norm at the FLOPs and head layer of the same row, with the same seed
    and fine-tuning: over the fine-tuned pairs, how many each rule ends ahead in, and random filters' mean lead
    over L1-norm before and after fine-tuning with their standard errors (positive where random filters are
    better). How much of a difference of filters fine-tuning leaves, with no CRAFT row involved."""
    baselines = _baseline_records(records)
    tuned = baselines[baselines["epochs"] > 0]
    both = tuned[tuned["baseline"] == "l1_norm"].merge(
        tuned[tuned["baseline"] == "random"], on=[*FINE_TUNING, "reference"], suffixes=("_l1", "_random"))
    sign = _lead_sign(both["metric_l1"])
    leads = pd.DataFrame({
        "task": both["task"],
        "lead_before_ft": sign * (both["score_before_ft_random"] - both["score_before_ft_l1"]),
        "lead_after_ft": sign * (both["score_random"] - both["score_l1"]),
    })
    return _lead_summary(leads, "task", "pairs", "random_ahead_after_ft", "l1_ahead_after_ft")


def write_table(args, config, records_path, results):
    records = read_records(records_path)
    shown = records[records["task"].isin(args.tasks) & records["gamma"].isin([*config["gammas"], 0.0])]
    pairs, gap = matched_comparisons(shown), baseline_gap(shown)
    shown = shown.assign(flops_pct=100 * shown["flops_share"], commit=shown["commit"].fillna(""))
    shown = shown.set_index(["task", "row", "gamma", "random_state", "lr", "monitor", "calibrate_head", "device"])[
        ["metric", "n_train", "n_test", "head_layer", "flops_pct", "score_before_ft", "score", "best_epoch",
         "epochs_run", "epochs", "patience", "parameters", "filters", "fit_s", "date", "commit"]
    ]
    intro = (
        "ETL Table 1 on all images (MobileFaceNet, CASIA-WebFace weights): every row has the satellite head at its "
        "head layer and the task's fine-tuning budget; the pruned rows have least-squares compensation; "
        "l1@X / random@X keep one ratio of every layer's filters, found so that the FLOPs match row X's, at X's "
        "head layer. flops_pct: % of the full network's FLOPs. score: accuracy (gender, emotion) or MAE (yaw in "
        "degrees, age in years) on the test set, before (satellite head, no training) and after fine-tuning; "
        "best_epoch: the epoch kept (lowest validation loss, or highest validation accuracy where monitor is "
        "accuracy; 0 = untrained) of epochs_run. random_state: the "
        "pruner's seed (the LASSO validation split, the satellites' held-out split, the random rule's draw and "
        "fine-tuning; the train/test split is the same for every seed), one fit per row and seed; each row's "
        "date is when its fit ended (rows may come from several invocations, all with the command below but for "
        "--tasks / --rows / --seed / --lr / --monitor / --calibrate-head / --device). calibrate_head: the "
        "satellite head divided by the temperature fitted on its images before fine-tuning. lr: Adam's learning "
        "rate. device: where the forward passes and fine-tuning ran (the machine below is the one that wrote "
        "the table; the rows on a GPU name theirs on the Reproducing page). commit: the library's git commit "
        "that fitted the row (-dirty: with uncommitted changes; blank: recorded before 2026-12-06), since rows "
        "fitted by different versions can disagree (a solver change moves knees)."
    )
    title = "ETL Table 1 on all images (MobileFaceNet)"
    if records_path.name != "etl_full.csv":
        # Several record files end up in RESULTS.md: each section names its own.
        title += f", records {records_path.name}"
    blocks = [_bench.table(shown)]
    if len(pairs):
        summary = comparison_summary(pairs)
        blocks += [
            "", "### Matched comparisons", "",
            "Every L1-norm (l1_norm) or random row beside the CRAFT row (reference) whose FLOPs and head layer it "
            "took, with the same seed and fine-tuning: lead = the CRAFT row's score minus the baseline's, "
            "positive where CRAFT is better (accuracy in points; MAE in degrees for yaw, years for age, sign "
            "reversed). The summary pools the fine-tuned comparisons of every gamma, seed and budget: ahead / "
            "behind count them by the sign of the lead after fine-tuning, se the standard error of the mean "
            "lead before or after it.", "",
            *([_bench.table(summary), ""] if len(summary) else []),
            _bench.table(pairs.set_index(["task", "reference", "baseline"])),
        ]
        if len(gap):
            blocks += [
                "", "Random filters against L1-norm at the FLOPs of the same row (same seed and fine-tuning): "
                "random filters' lead over L1-norm, positive where random filters are better, over the "
                "fine-tuned pairs. How much of a difference of filters within one keep ratio fine-tuning leaves, "
                "with no CRAFT row involved.", "",
                _bench.table(gap),
            ]
    _bench.write_section(results, title, intro, blocks, args.quick)


def _options(parser):
    parser.add_argument("--rows", nargs="*", choices=ROWS, default=ROWS,
                        help="rows to fit (recorded ones are skipped); none: only write the table of the records")
    parser.add_argument("--patience", type=int, default=3, help="early-stopping patience with --epochs")
    parser.add_argument("--records", default=None, help="CSV of the fitted rows (default: beside --results)")
    parser.add_argument("--seed", type=int, nargs="+", default=[_bench.SEED],
                        help="the pruner's random_state, one fit per seed (repeated fits); the train/test split "
                             "does not change")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate of every fine-tuning")
    parser.add_argument("--monitor", choices=["loss", "accuracy"], default="loss",
                        help="what early stopping watches on gender and emotion (yaw and age: the loss)")
    parser.add_argument("--calibrate-head", action="store_true",
                        help="calibrate the satellite head of gender and emotion (CraftPruner(calibrate_head=True))")
    parser.add_argument("--device", default="cpu", help="where forward passes and fine-tuning run (e.g. cuda)")
    parser.add_argument("--merge", nargs="+", type=Path, default=[], metavar="RECORDS",
                        help="record files whose records the records lack are added to them before any fit")
    parser.add_argument("--jobs", type=int, default=1,
                        help="fits run at the same time, each in its own process of this script (see above)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="with --jobs: after this many seconds no fit starts and running fits are stopped")


def main(argv=None):
    args, config = _bench.pruning_run(__doc__, _bench.TASKS, FULL, QUICK, argv, extra=_options)
    if torch.device(args.device).type == "cuda":
        # float32 convolutions and products, as on the CPU (torch lets cuDNN use TF32 by default).
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    results = args.results or _bench.RESULTS / "etl_full.md"
    records_path = results.with_suffix(".csv") if args.records is None else Path(args.records)
    missing = [str(path) for path in args.merge if not path.is_file()]
    if missing:
        raise SystemExit(f"--merge: no record file at {', '.join(missing)}")
    if args.merge:
        merge_records(records_path, args.merge)
    failed = []
    if args.jobs > 1:
        failed = run_parallel(args, config, records_path)
    else:
        run(args, config, records_path)
    write_table(args, config, records_path, results)
    if failed:
        raise SystemExit(f"{len(failed)} fit(s) failed, stopped or not started: {failed}")
    return read_records(records_path)


if __name__ == "__main__":
    main()
