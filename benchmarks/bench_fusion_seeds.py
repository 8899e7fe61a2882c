"""Vielzeuf et al. Table 6, auto-encoder rows against BT over fusion seeds and source weightings.

The protocol of ``bench_fusion.py`` part 1 (same images, pool, targets, source embeddings and
cross-validated linear satellites; see its docstring), with the auto-encoder (AE) and the denoising
one (DAE, ``noise=--dae-noise``) fitted once per seed of ``--seeds`` (``EmbeddingFusion``'s
``random_state``: its held-out split, initialisation and batches) and per source weighting of
``--source-weights`` (``EmbeddingFusion(source_weight=...)``: "none" weighs every standardised column
alike, so that the 256-d O-Net counts twice as much as each 128-d source; "balanced" makes the three
sources count the same). BT (the best single source, chosen on the folds it is scored on, as in the
paper) does not depend on them. Seed 0 with "none" is ``bench_fusion.py``'s AE and DAE.

One fit per seed shows how far a single run's comparison with BT can be trusted: the table gives
every target's score averaged over the seeds, how many seeds put the auto-encoder at or above BT, and
the mean held-out reconstruction NRMSE (Table 5's measure, in standardised units whatever the weights).

--pool-fractions F [F ...] fits every auto-encoder on a seeded share F of the unlabelled pool too
(nested: the smaller pools are the first images of one permutation, kept in the pool's order; default:
the whole pool, as in bench_fusion.py), everything else equal: how the auto-encoders' distance to BT
moves with the size of the pool. The paper fits its fusion on 4.12 million faces; the pool here has
under 10,000. --mirror-pool adds every pool image's mirror image (flipped left to right) to the pool,
before the shares are drawn: twice the images, of the same faces, with nothing downloaded (the
auto-encoder's held-out tenth then holds mirrors of images it trains on, so its NRMSE flatters it).

Full size: every image, 5 folds, auto-encoders of at most 400 epochs (early stopping, patience 10),
seeds 0 1 2: twelve auto-encoder fits of 1 to 4 minutes each on one CPU thread (source embeddings
cached with --cache, shared with bench_fusion.py).
--quick: 100 images per data set, 3 folds, 2 epochs, seeds 0 1.
Run: python benchmarks/bench_fusion_seeds.py [--quick] [--cache DIR] [--seeds 0 1 2] [--source-weights none balanced]
     [--pool-fractions 0.25 0.5 1] [--mirror-pool]
Writes benchmarks/results/fusion_seeds.md and fusion_seeds.csv.
"""

import time

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

import _bench
import bench_fusion
from sklearn_craft.fusion import EmbeddingFusion, best_transfer
from sklearn_craft.relationships import task_relationship_matrix

FULL = dict(n=None, cv=5, ae_epochs=400, seeds=[0, 1, 2])
QUICK = dict(n=100, cv=3, ae_epochs=2, seeds=[0, 1])


def parse(argv):
    p = _bench.parser(__doc__)
    p.add_argument("--cv", type=int, default=None, help="folds of the satellites (default 5, quick 3)")
    p.add_argument("--ae-epochs", type=int, default=None, help="most auto-encoder epochs (default 400, quick 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="fusion seeds (default 0 1 2, quick 0 1)")
    p.add_argument("--source-weights", nargs="+", choices=["none", "balanced"], default=["none", "balanced"],
                   help="EmbeddingFusion source_weight values to compare (default both)")
    p.add_argument("--pool-fractions", type=float, nargs="+", default=[1.0],
                   help="shares of the unlabelled pool each auto-encoder is fitted on, in (0, 1] (default: 1)")
    p.add_argument("--mirror-pool", action="store_true",
                   help="add the mirror image of every pool image to the pool (twice the images, the same faces)")
    p.add_argument("--dae-noise", type=float, default=0.25, help="share of the inputs the DAE drops (default 0.25)")
    p.add_argument("--emotion-target", choices=["test", "train"], default="test",
                   help="FER2013 split that is the emotion target, as in bench_fusion.py (default test)")
    args = p.parse_args(argv)
    if not all(0 < fraction <= 1 for fraction in args.pool_fractions):
        p.error(f"--pool-fractions must be in (0, 1], got {args.pool_fractions}")
    vars(args).update(_bench.settings(args, FULL, QUICK))
    torch.set_num_threads(args.threads)
    return args


def main(argv=None):
    args = parse(argv)
    with threadpool_limits(limits=args.threads):
        return run(args)


def scores(args, embeddings, target_sets, target_h):
    """Long frame (embedding, target, score) of the satellites on each embedding, and BT's rows (the
    best single source of ``target_h``, each data set's source embeddings)."""
    rows, best = [], []
    for dataset, (_, labels) in target_sets.items():
        tasks, task_types, scoring = bench_fusion.task_frame(dataset, labels, args.cv)
        common = dict(task_types=task_types, scoring=scoring, cv=args.cv, random_state=_bench.SEED)
        fused = {name: by_dataset[dataset] for name, by_dataset in embeddings.items()}
        matrix = task_relationship_matrix(fused, None, tasks, **common)
        bt, _ = best_transfer(target_h[dataset], tasks, **common)
        for task in matrix.columns:
            metric = matrix.attrs["metric"][task]
            shown, unit = bench_fusion.shown_score(task, bt.loc[task, "score"], metric)
            best.append({"target": task, "BT": shown, "BT_source": bt.loc[task, "source"], "metric": unit})
            for name in matrix.index:
                rows.append({"embedding": name, "target": task,
                             "score": bench_fusion.shown_score(task, matrix.loc[name, task], metric)[0]})
    return pd.DataFrame(rows), pd.DataFrame(best).set_index("target")


def run(args):
    results = args.results or _bench.RESULTS / "fusion_seeds.md"
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    pool, target_sets = bench_fusion.load_sets(args)
    nets = bench_fusion.networks(args.data_root)
    if args.mirror_pool:
        pool.update({f"{name}-mirrored": np.ascontiguousarray(images[:, :, ::-1]) for name, images in pool.items()})
    pool_h = {name: bench_fusion.embeddings(nets, f"pool-{name}", images, args.cache) for name, images in pool.items()}
    pool_h = {source: np.vstack([h[source] for h in pool_h.values()]) for source in bench_fusion.SOURCES}
    target_h = {name: bench_fusion.embeddings(nets, f"target-{name}", images, args.cache)
                     for name, (images, _) in target_sets.items()}
    H_pool, columns = bench_fusion.side_by_side(pool_h)
    targets = {name: bench_fusion.side_by_side(h)[0] for name, h in target_h.items()}

    # Nested pools: each smaller one is the start of the same permutation of the pool, in the pool's order (the
    # whole pool is then the pool itself, as in bench_fusion.py).
    permutation = np.random.RandomState(_bench.SEED).permutation(len(H_pool))
    fits, embeddings = [], {}
    for fraction in args.pool_fractions:
        pool_images = max(1, round(fraction * len(H_pool)))
        H_fit = H_pool[np.sort(permutation[:pool_images])]
        for weight in args.source_weights:
            for seed in args.seeds:
                for label in bench_fusion.AUTOENCODERS:
                    start = time.perf_counter()
                    fusion = EmbeddingFusion(columns, epochs=args.ae_epochs, random_state=seed,
                                             source_weight=None if weight == "none" else weight,
                                             noise=args.dae_noise if label == "DAE" else 0.0)
                    fusion.fit(H_fit)
                    name = f"{label} {weight} {seed} {pool_images}"
                    embeddings[name] = {dataset: fusion.transform(H) for dataset, H in targets.items()}
                    fits.append({"embedding": name, "method": label, "source_weight": weight, "seed": seed,
                                 "pool_images": pool_images, "epochs": len(fusion.history_) - 1,
                                 "nrmse": fusion.reconstruction_nrmse_.mean(), "fit_s": time.perf_counter() - start})
                    print(f"{name}: {fits[-1]['epochs']} epochs, NRMSE {fits[-1]['nrmse']:.3f}, "
                          f"{fits[-1]['fit_s']:.0f} s", flush=True)
    fits = pd.DataFrame(fits)
    long, bt = scores(args, embeddings, target_sets, target_h)
    long = long.merge(fits, on="embedding").merge(bt, left_on="target", right_index=True)
    # +1 where higher is better (accuracy), -1 for errors: the auto-encoder is at least BT where sign * (score - BT) >= 0.
    sign = np.where(bt["metric"] == "accuracy %", 1.0, -1.0)
    long["at_least_BT"] = long["target"].map(pd.Series(sign, index=bt.index)) * (long["score"] - long["BT"]) >= 0
    results.parent.mkdir(parents=True, exist_ok=True)
    long.drop(columns="embedding").to_csv(results.with_suffix(".csv"), index=False)

    key, order = ["method", "source_weight", "pool_images"], list(bt.index)
    mean = long.pivot_table(index=key, columns="target", values="score", aggfunc="mean", sort=False)[order]
    wins = long.pivot_table(index=key, columns="target", values="at_least_BT", aggfunc="sum", sort=False)[order]
    per_seed = long.groupby([*key, "seed"], sort=False)["at_least_BT"].sum().groupby(level=key, sort=False)
    summary = mean.copy()
    for target in order:
        summary[f"{target} seeds>=BT"] = wins[target].astype(int)
    summary["targets>=BT per seed"] = per_seed.agg(lambda counts: " / ".join(str(int(c)) for c in counts))
    summary["mean over seeds: targets>=BT"] = (sign * (mean - bt["BT"].to_numpy()) >= 0).sum(axis=1)
    summary["NRMSE"] = fits.groupby(key, sort=False)["nrmse"].mean()
    summary["epochs"] = fits.groupby(key, sort=False)["epochs"].mean()
    bt_row = " · ".join(f"{t} {bt.loc[t, 'BT']:.4g} ({bt.loc[t, 'metric']}, {bt.loc[t, 'BT_source']})" for t in order)
    seeds = " ".join(map(str, args.seeds))
    intro = (
        f"Table 6's AE and DAE rows of bench_fusion.py, refitted with fusion seeds {seeds} and source weightings "
        f"{', '.join(args.source_weights)}, on {' / '.join(str(n) for n in fits['pool_images'].unique())} of the "
        f"{len(H_pool)} pool images{' (half of them mirror images)' if args.mirror_pool else ''} (pool_images); "
        f"linear satellites, {args.cv}-fold CV, the same folds for every row. See the script's docstring for the "
        "protocol."
    )
    blocks = [
        f"BT (best single source, chosen on the folds it is scored on): {bt_row}.", "",
        "Scores: the mean over the seeds of each target's cross-validated score. `<target> seeds>=BT`: how many "
        "seeds score at least BT; `targets>=BT per seed`: on how many targets each seed does (in seed order); "
        "NRMSE: held-out reconstruction, mean over sources and seeds; epochs: mean epochs run.", "",
        _bench.table(summary.rename_axis(key), ".4g"), "",
        f"Fit times: {fits['fit_s'].sum():.0f} s for {len(fits)} auto-encoders "
        f"({fits['fit_s'].min():.0f} to {fits['fit_s'].max():.0f} s each).",
    ]
    title = "Fusion: auto-encoders against BT over seeds and source weightings"
    if fits["pool_images"].nunique() > 1:
        title = "Fusion: auto-encoders against BT over seeds, source weightings and pool sizes"
    if args.mirror_pool:
        title += ", on the pool and its mirror images"
    _bench.write_section(results, title, intro, blocks, args.quick)
    return summary


if __name__ == "__main__":
    main()
