"""ETL Figure 6: score, FLOPs and size of MobileFaceNet pruned by CRAFT at several gamma.

For gender (CelebA ``Male``, accuracy) and head-pose yaw (AFLW2000, MAE in degrees), on the same
fixed seeded 75/25 split as bench_etl_table.py: ``CraftPruner(mobilefacenet, gamma=g,
finetune_params=...)`` for every g in ``--gammas`` (gamma 0 = every filter kept, the unpruned reference),
score on the test quarter, FLOPs (``profiling.count_flops``) and size in bytes
(``profiling.model_size_bytes``). Pooled activations and LASSO paths are computed once per task
(``memory``) and shared by all gammas.

``--methods`` (default all three): ``one-shot`` is the paper's rule (``selection="one-shot"``),
``sequential`` the cascade-aware mode (``selection="sequential"``, one coupled group at a time on
the network already cut), ``l1_norm`` the baseline ``filter_rule="l1_norm"`` with one keep ratio
over all layers at the FLOPs of the sequential network of each gamma (of the one-shot one without
sequential; ``flops_target``). ``--compensate`` gives every method the least-squares compensation
of the readers of removed channels (``compensate=True``). One figure per task, a line per method, with
``sklearn_craft.plotting.plot_gamma_tradeoff``: docs/_static/gamma_tradeoff_<task>.png.

Full size (no --quick): 600 images per task, 8 gammas from 0.001 to 0.1 plus 0, at most 4
fine-tuning epochs (early stopping, as in bench_etl_table.py). --quick: 120 images, gammas 0, 0.001, 0.01, 0.1, no fine-tuning.
Run: python benchmarks/bench_gamma_tradeoff.py [--quick] [--n N] [--epochs E] [--methods one-shot sequential l1_norm]
Writes benchmarks/results/gamma_tradeoff.md and gamma_tradeoff.csv.
"""

import tempfile
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd

import _bench
from sklearn_craft.models import mobilefacenet, preset
from sklearn_craft.plotting import plot_gamma_tradeoff
from sklearn_craft.profiling import count_flops, model_size_bytes
from sklearn_craft.pruner import CraftPruner

FULL = dict(n=600, epochs=4, gammas=(0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1), alphas=100)
QUICK = dict(n=120, epochs=0, gammas=(0.0, 0.001, 0.01, 0.1), alphas=20)
TASKS = ("gender", "yaw")
#: Method -> CraftPruner parameters (the l1_norm rows add their flops_target).
METHODS = {"one-shot": {}, "sequential": {"selection": "sequential"}, "l1_norm": {"filter_rule": "l1_norm"}}


def main(argv=None):
    args, config = _bench.pruning_run(__doc__, TASKS, FULL, QUICK, argv, extra=_methods_option)
    results = args.results or _bench.RESULTS / "gamma_tradeoff.md"
    args.figures.mkdir(parents=True, exist_ok=True)
    input_preset = preset("mobilefacenet")
    net = mobilefacenet(weights=args.data_root / _bench.WEIGHTS["mobilefacenet"])
    shape = (3, *input_preset.size)
    finetune = _bench.finetune_settings(config["epochs"])
    craft_methods = [method for method in ("one-shot", "sequential") if method in args.methods]
    if "l1_norm" in args.methods and not craft_methods:
        raise SystemExit("--methods: l1_norm is matched to a CRAFT method's FLOPs; add one-shot or sequential")

    frames, blocks = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks:
            X_train, X_test, y_train, y_test = _bench.task_data(task, args.data_root, config["n"], input_preset, args.cache)
            kind = _bench.TASKS[task][2]
            rows = []

            def fit(method, gamma, name=None, **params):
                pruner = CraftPruner(
                    net,
                    gamma=gamma,
                    finetune_params=finetune,
                    selector_params=dict(alphas=config["alphas"]),
                    preprocess=input_preset.preprocess,
                    random_state=_bench.SEED,
                    memory=f"{scratch}/{task}",
                    progress=False,
                    compensate=args.compensate,
                    **METHODS[method],
                    **params,
                )
                start = time.perf_counter()
                pruner = _bench.fit_before_and_after_finetuning(pruner, finetune, X_train, y_train)
                rows.append(
                    dict(
                        task=task,
                        method=name or method,
                        gamma=gamma,
                        metric=_bench.metric_name(kind),
                        score_before_ft=_bench.task_score(kind, y_test, pruner.predict_before_finetune(X_test)),
                        score=_bench.task_score(kind, y_test, pruner.predict(X_test)),
                        flops=count_flops(pruner.pruned_model_, shape),
                        size_bytes=model_size_bytes(pruner.pruned_model_),
                        filters=sum(len(k) for k in pruner.keep_.values()),
                        fit_s=time.perf_counter() - start,
                    )
                )
                print(f"{task} {name or method} gamma={gamma:g}: {rows[-1]['metric']} {rows[-1]['score']:.3f}, "
                      f"FLOPs {rows[-1]['flops'] / rows[0]['flops']:.3f} of the unpruned network, "
                      f"{rows[-1]['fit_s']:.0f} s", flush=True)
                return rows[-1]

            gammas = sorted(config["gammas"])
            # gamma 0 keeps every filter whatever the method: one unpruned row, the start of every line.
            unpruned = fit(craft_methods[0], 0.0, name="unpruned") if 0.0 in gammas else None
            for gamma in (g for g in gammas if g > 0):
                matched = None
                for method in craft_methods:
                    matched = fit(method, gamma)
                if "l1_norm" in args.methods:
                    fit("l1_norm", gamma, flops_target=matched["flops"] / unpruned["flops"] if unpruned else None)
            frame = pd.DataFrame(rows)
            frame["flops_pct"] = 100.0 * frame["flops"] / frame["flops"].max()
            frame["size_pct"] = 100.0 * frame["size_bytes"] / frame["size_bytes"].max()
            frames.append(frame)

            ax = None
            for method in args.methods:
                line = frame[frame["method"].isin([method, "unpruned"])].set_index("gamma")
                ax = plot_gamma_tradeoff(line, ax=ax, label=method,
                                         score_label=f"{task} {_bench.metric_name(kind)} (test)")
            ax.set_title(f"MobileFaceNet, {task}: CRAFT gamma trade-off" + (" (--quick)" if args.quick else ""))
            figure = args.figures / f"gamma_tradeoff_{task}.png"
            ax.figure.savefig(figure, dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
            blocks += [f"### {task} ({_bench.metric_name(kind)}, {len(y_train)} train / {len(y_test)} test images)", "",
                       _bench.table(frame.drop(columns="task").set_index(["method", "gamma"])), "",
                       f"Figure: `{figure.name}`", ""]
    result = pd.concat(frames, ignore_index=True)
    result.to_csv(results.with_suffix(".csv"), index=False)
    intro = (
        "ETL paper Figure 6: CRAFT on MobileFaceNet at several gamma (gamma 0 keeps every filter), one-shot and "
        "sequential selection, and L1-norm filters at the FLOPs of the sequential (else one-shot) network of each "
        f"gamma. {config['n']} images per task, 75/25 split, {_bench.FINETUNE_TEXT.format(epochs=config['epochs'])} "
        f"after pruning, LASSO paths of {config['alphas']} alphas. score_before_ft: the pruned network with its "
        "satellite head, before fine-tuning. flops_pct / size_pct: % of the gamma-0 network; fit_s: wall seconds "
        "of the fit (pooling and LASSO paths cached by the task's first fit)."
        + (" Every method with compensate=True (least-squares refit of the readers)." if args.compensate else "")
    )
    title = "Gamma trade-off (ETL Figure 6)" + (", readers compensated" if args.compensate else "")
    _bench.write_section(results, title, intro, blocks, args.quick)
    return result


def _methods_option(parser):
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--compensate", action="store_true",
                        help="least-squares compensation of the readers for every method (CraftPruner(compensate=True))")


if __name__ == "__main__":
    main()
