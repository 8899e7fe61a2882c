"""ETL Table 1 with MobileFaceNet: fine-tuned baseline vs CRAFT vs L1-norm and random filters.

For each task (gender: CelebA ``Male``; emotion: FER2013, 7 classes; yaw: AFLW2000 in degrees,
|angle| <= 99; age: UTKFace) on a fixed seeded 75/25 split of ``--n`` images:

baseline  full fine-tuning of MobileFaceNet (CASIA-WebFace weights) with a new head:
          ``CraftPruner(gamma=0, head="satellite", finetune_params=...)``. gamma=0 keeps every filter, so the
          network is the original one cut after its last convolution's response, then global average
          pooling and a Linear head (initialised as the ridge satellite), and all of it is trained.
craft     ``CraftPruner(gamma=g)`` with the same fine-tuning budget, g in ``--gammas``.
sequential
          ``CraftPruner(gamma=g, selection="sequential")``: the cascade-aware mode, coupled groups
          selected one after the other on the network already cut (skipped with
          ``--selections one-shot``).
l1        ``filter_rule="l1_norm"``: the same per-layer filter counts as craft at that gamma (LASSO's),
          chosen by the L1 norm of each filter's weights (Li et al. 2017), same fine-tuning.
random    ``filter_rule="random"``: the same counts chosen at random (seeded), same fine-tuning.
l1@flops, random@flops
          the same rules with one keep ratio over all layers, found so that the network's FLOPs
          match craft's at that gamma (``flops_target`` = craft's FLOPs share in ``report_``).
l1@seq, random@seq
          the same, at the FLOPs of the sequential row of that gamma.

``--compensate`` gives every pruned row the least-squares compensation of the readers of removed
channels (``compensate=True``, He et al. 2017), so that rules stay compared with all else equal.

The rules are CraftPruner parameters, so satellites, surgery, head, fine-tuning and profiling are
the library's, identical for all rules. Residual additions couple channels (``surgery.merge_keep``
keeps a channel when any convolution of the stream keeps it) and depthwise convolutions keep the
channels of their input, so the final sizes of l1, random and craft may differ; the @flops rows
match the total FLOPs by construction.

Columns: score (accuracy, or MAE in the label's unit) on the test quarter, parameters, FLOPs and
CPU latency per image (``profiling.measure_latency``, batch 1, 1 thread, median over alternating
rounds of all networks of the task), each with its % change vs the baseline, and wall time.
``time_s`` of the baseline = its head fit + fine-tuning (``timings_`` surgery + finetune); of the
pruned rules = pooling + LASSO selection (measured once, uncached, in the first fit of the task:
they do not depend on gamma or on the rule) + satellites + surgery + fine-tuning.

Full size (no --quick): 600 images per task, at most 4 epochs (early stopping), gammas 0.1, 0.01, 0.001 -- sized for
about an hour on 2 idle cores (the estimate comes from quick runs, see the results page).
Run: python benchmarks/bench_etl_table.py [--quick] [--n N] [--epochs E] [--tasks gender yaw] [--selections one-shot]
Writes benchmarks/results/etl_table.md and etl_table.csv (read by bench_task_relationships.py).
"""

import statistics
import tempfile
import time

import pandas as pd

import _bench
from sklearn_craft.models import mobilefacenet, preset
from sklearn_craft.profiling import count_flops, count_parameters, measure_latency
from sklearn_craft.pruner import CraftPruner

FULL = dict(n=600, epochs=4, gammas=(0.1, 0.01, 0.001), alphas=100)
QUICK = dict(n=120, epochs=1, gammas=(0.01,), alphas=20)


#: Row name -> filter_rule, with the per-layer counts of LASSO at the row's gamma.
RULES = {"craft": "lasso", "l1": "l1_norm", "random": "random"}
#: Row name -> filter_rule, at the FLOPs of the craft row of the same gamma.
MATCHED = {"l1@flops": "l1_norm", "random@flops": "random"}
#: Row name -> filter_rule, at the FLOPs of the sequential row of the same gamma.
MATCHED_SEQUENTIAL = {"l1@seq": "l1_norm", "random@seq": "random"}


def latencies(models, shape, rounds=5):
    """Median CPU seconds per image of every model, measured in alternating rounds (1 thread)."""
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(measure_latency(model, shape, repeats=5, warmup=1, threads=1))
    return {name: statistics.median(values) for name, values in times.items()}


def run_task(task, args, config, net, input_preset, memory):
    X_train, X_test, y_train, y_test = _bench.task_data(task, args.data_root, config["n"], input_preset, args.cache)
    kind = _bench.TASKS[task][2]
    finetune = _bench.finetune_settings(config["epochs"])
    common = dict(
        head="satellite",
        selector_params=dict(alphas=config["alphas"]),
        preprocess=input_preset.preprocess,
        random_state=_bench.SEED,
        memory=memory,
        progress=False,
    )
    runs = {}
    start = time.perf_counter()

    def fit(name, **params):
        # gamma 0 (the baseline) removes nothing: there is nothing to compensate.
        compensate = args.compensate and params.get("gamma", 1) > 0
        pruner = CraftPruner(net, finetune_params=finetune, compensate=compensate, **common, **params)
        runs[name] = _bench.fit_before_and_after_finetuning(pruner, finetune, X_train, y_train)
        print(f"  {task} {name}: {time.perf_counter() - start:.0f} s elapsed", flush=True)
        return runs[name]

    fit("baseline", gamma=0.0)
    for gamma in config["gammas"]:
        for rule, filter_rule in RULES.items():
            fit(f"{rule} g={gamma:g}", gamma=gamma, filter_rule=filter_rule)
        matched = {"craft": MATCHED}
        if "sequential" in args.selections:
            fit(f"sequential g={gamma:g}", gamma=gamma, selection="sequential")
            matched["sequential"] = MATCHED_SEQUENTIAL
        for reference, rules in matched.items():
            report = runs[f"{reference} g={gamma:g}"].report_
            share = float(report.loc["flops", "pruned"] / report.loc["flops", "original"])
            for rule, filter_rule in rules.items():
                fit(f"{rule} g={gamma:g}", gamma=gamma, filter_rule=filter_rule, flops_target=share)
    # The task's first fit, the baseline, paid the (then cached) pooling and LASSO paths.
    first = runs["baseline"].timings_
    times = {"baseline": float(first["surgery"] + first.get("finetune", 0.0))}
    for name, pruner in list(runs.items())[1:]:
        t = pruner.timings_
        if name.startswith("sequential"):
            # Its own pooling (one pass per stage, on the network cut so far) and LASSO paths.
            times[name] = float(t.sum())
            continue
        # The matched-FLOPs rows fit no LASSO: their selection time is the FLOPs bisection.
        select = float(t["selection"]) if "@" in name else float(first["selection"])
        times[name] = float(first["pooling"]) + select + float(t["satellites"] + t["surgery"] + t.get("finetune", 0.0))
    shape = (3, *input_preset.size)
    latency = latencies({name: p.pruned_model_ for name, p in runs.items()}, shape)
    rows = []
    for name, pruner in runs.items():
        rows.append(
            dict(
                task=task,
                method=name,
                metric=_bench.metric_name(kind),
                score=_bench.task_score(kind, y_test, pruner.predict(X_test)),
                score_before_ft=_bench.task_score(kind, y_test, pruner.predict_before_finetune(X_test)),
                parameters=count_parameters(pruner.pruned_model_),
                flops=count_flops(pruner.pruned_model_, shape),
                latency_ms=1e3 * latency[name],
                time_s=times[name],
                filters=sum(len(k) for k in pruner.keep_.values()),
            )
        )
    frame = pd.DataFrame(rows)
    base = frame.iloc[0]
    for column in ("score", "parameters", "flops", "latency_ms", "time_s"):
        frame[f"{column}_chg_pct"] = 100.0 * (frame[column] / base[column] - 1.0)
    frame.insert(2, "n_train", len(y_train))
    return frame


def write_results(result, config, results, quick, compensate=False):
    """Print the ratios against each baseline and write the markdown section and the CSV."""
    result.to_csv(results.with_suffix(".csv"), index=False)
    for _, row in result[result["method"] != "baseline"].iterrows():
        base = result[(result["task"] == row["task"]) & (result["method"] == "baseline")].iloc[0]
        print(
            f"{row['task']:8s} {row['method']:14s} FLOPs ratio {base['flops'] / row['flops']:.2f}x, "
            f"params ratio {base['parameters'] / row['parameters']:.2f}x, "
            f"latency ratio {base['latency_ms'] / row['latency_ms']:.2f}x, "
            f"{row['metric']} {row['score']:.3f} vs {base['score']:.3f}"
        )
    shown = result.set_index(["task", "method"])[
        ["metric", "n_train", "score_before_ft", "score", "score_chg_pct", "parameters", "parameters_chg_pct", "flops", "flops_chg_pct",
         "latency_ms", "latency_ms_chg_pct", "time_s", "time_s_chg_pct", "filters"]
    ]
    intro = (
        "ETL paper Table 1 with MobileFaceNet (CASIA-WebFace weights, RGB 112x96) as primary network. "
        f"{config['n']} images per task (fixed seeded 75/25 split), "
        f"{_bench.FINETUNE_TEXT.format(epochs=config['epochs'])} for every method, LASSO paths of "
        f"{config['alphas']} alphas. score_before_ft: the pruned network with its "
        "satellite head (ridge on the kept filters' pooled responses, BatchNorm statistics re-estimated), before "
        "fine-tuning. "
        "Score: accuracy for gender/emotion, MAE (degrees / years) for yaw/age, on the test quarter. "
        "`*_chg_pct` = % change vs the task's baseline; latency: batch 1, 1 thread, median of alternating "
        "rounds. time_s: baseline = head fit + fine-tuning; pruned = pooling + selection + satellites + "
        "surgery + fine-tuning (the @flops rows: their FLOPs bisection instead of the selection). l1/random keep "
        "the same per-layer counts as craft at that gamma (before the coupled-channel merge); l1@flops/random@flops "
        "keep one ratio of every layer's filters, found by bisection so that the FLOPs match craft's at that gamma; "
        "sequential: selection=\"sequential\" (time_s: all of its fit); l1@seq/random@seq: the same at the "
        "sequential row's FLOPs."
        + (" Every pruned row with compensate=True (least-squares refit of the readers)." if compensate else "")
    )
    _bench.write_section(results, "ETL Table 1 (MobileFaceNet)", intro, [_bench.table(shown)], quick)


def main(argv=None):
    args, config = _bench.pruning_run(__doc__, _bench.TASKS, FULL, QUICK, argv, extra=_selections_option)
    results = args.results or _bench.RESULTS / "etl_table.md"
    input_preset = preset("mobilefacenet")
    net = mobilefacenet(weights=args.data_root / _bench.WEIGHTS["mobilefacenet"])

    frames = []
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks:
            # A fresh cache per task: pooling and LASSO paths are paid once (by the baseline) and reused.
            frames.append(run_task(task, args, config, net, input_preset, f"{scratch}/{task}"))
            # Written after every task, so that a long run that stops keeps the finished tasks.
            write_results(pd.concat(frames, ignore_index=True), config, results, args.quick, args.compensate)
    return pd.concat(frames, ignore_index=True)


def _selections_option(parser):
    parser.add_argument("--selections", nargs="+", choices=["one-shot", "sequential"], default=["one-shot", "sequential"],
                        help="CRAFT selection modes (one-shot always runs: the l1/random rows take its counts)")
    parser.add_argument("--compensate", action="store_true",
                        help="least-squares compensation of the readers in every pruned row (CraftPruner(compensate=True))")


if __name__ == "__main__":
    main()
