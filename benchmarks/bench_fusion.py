"""Vielzeuf et al. Tables 5 and 6 and section 3.3 with three real source networks.

Sources (``sklearn_craft.fusion.EmbeddingSource``, each fed by ``preset(name).adapt``, which crops
the common image set to the network's aspect ratio, resizes it, converts its colour and normalises):
MobileFaceNet (face recognition, its 128-d output embedding), mini-Xception (FER2013 emotion, the
pooled output of its last block ``blocks.3``, 128-d) and the MTCNN O-Net (face detection and
landmarks, its 256-d ``prelu5`` layer). h_G has the mean dimension, 171.

Images: every face image of ../shared/data, decoded once as RGB 112x96 (MobileFaceNet's crop).
Unlabelled pool (fits the fusions and the student; no label is read): AFLW2000 (|angles| <= 99
degrees), one FER2013 split and a seeded half of CelebA and of UTKFace. Targets (never used to fit
a fusion or the student): the other halves and the other FER2013 split: UTKFace age (MAE, years), gender
and race (accuracy), the CelebA attributes (mean error rate over the attributes that have both values
among the target images: all 40 at full size) and FER2013 emotion (accuracy, 7 classes).
--emotion-target test (the default) makes FER2013's 3,589 PrivateTest images the emotion target and
its 3,000 train images part of the pool; train swaps them (the runs up to 2026-12-04 14:11 UTC). The source
mini-Xception classifies the train images with 75.0 % accuracy and the PrivateTest ones with 65.7 %,
as expected if the former were among its own training images: as a target they favour that source.

Part 1, fusion (Tables 5 and 6). ``EmbeddingFusion`` concat / PCA / auto-encoder / denoising auto-encoder
(DAE: ``noise=--dae-noise``, the paper's DAE of Table 5, compared with BT as AE is) fitted on the pool's
precomputed embeddings (90 %; the other 10 % measure the reconstruction NRMSE of Table 5). Table 6:
a cross-validated linear satellite (``task_relationship_matrix``, ``--cv`` folds, the same for every
row) on each fused embedding of the target images; BT = ``best_transfer`` (best single source), BCT =
``best_concatenation`` (best of the 7 concatenations), both chosen on the folds they are scored on,
as in the paper (optimistic for BT / BCT).

Part 2, distillation (section 3.3). ``FusionDistiller`` trains MobileNet v1 alpha=0.5 (about 0.9 M
parameters, output 171) on the pool at 64x64 RGB to reproduce the auto-encoder's h_G (cosine loss).
Teacher stack vs student: parameters, FLOPs and CPU latency (batch 1, 1 thread, whole source
networks at their own input sizes plus the encoder; input adaptation not counted). Target scores on
a seeded 75/25 split of each target set: a linear satellite on the teacher's h_G and on the
student's h^_G (trained on the 75 %, scored on the 25 %), the student fine-tuned (``CraftPruner``
with gamma=0 on its last convolution: every filter kept, a ridge-initialised head, then all layers
trained, ``_bench.FINETUNE_TEXT``), and the same network trained from scratch with that budget.
Then the student CRAFT-pruned for UTKFace gender (``CraftPruner(gamma=--gamma)``, same budget).

Full size (no --quick): about 10,300 pool and 7,800 target images; auto-encoder at most 400 epochs
(early stopping, patience 10); distillation at most --distill-epochs=12 epochs (patience 2);
fine-tuning at most --epochs=4 epochs; LASSO paths of --alphas=50 for the pruned student. Sized so that each training (fusion, distillation, the
fine-tunings together) finishes within 60 minutes on 2 shared CPU cores at 64x64 (the source
embeddings, computed once, are cached with --cache); the results page gives the measured times.
--quick: 100 images per data set (a pool of 300 images: PCA needs more than 171), 3 folds, 1 epoch
everywhere.
--save-student PATH keeps the distilled student (``torch.save(student_.state_dict(), PATH)``) for
``bench_attributes.py --init-from PATH``.
Run: python benchmarks/bench_fusion.py [--quick] [--n N] [--cache DIR] [--save-student PATH]
Writes benchmarks/results/fusion.md and fusion_*.csv.
"""

import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.metrics import accuracy_score, mean_absolute_error
from sklearn.model_selection import PredefinedSplit, train_test_split
from threadpoolctl import threadpool_limits

import _bench
from sklearn_craft.datasets import load_fer2013
from sklearn_craft.fusion import (
    EmbeddingFusion,
    EmbeddingSource,
    FusionDistiller,
    best_concatenation,
    best_transfer,
    extract_embeddings,
)
from sklearn_craft.models import mini_xception, mobilefacenet, mobilenet_v1, mtcnn_onet, preset
from sklearn_craft.models.presets import InputPreset
from sklearn_craft.profiling import count_flops, count_parameters, measure_latency
from sklearn_craft.pruner import CraftPruner
from sklearn_craft.relationships import task_relationship_matrix

#: Source name -> (builder, module read, or None for the network's output).
SOURCES = {
    "mobilefacenet": (mobilefacenet, None),
    "mini_xception": (mini_xception, "blocks.3"),
    "mtcnn_onet": (mtcnn_onet, "prelu5"),
}
#: The common image format: MobileFaceNet's RGB 112x96 crop, the largest source input.
COMMON = preset("mobilefacenet")
#: The student's input: RGB 64x64 in [-1, 1].
STUDENT = InputPreset(name="student", size=(64, 64), color="rgb", mean=(0.5,) * 3, std=(0.5,) * 3)
STUDENT_WIDTH = 0.5
#: Target name -> (data set, label column or "attributes", satellite scoring).
TARGETS = {
    "age": ("utkface", "age", "mae"),
    "gender": ("utkface", "gender", "accuracy"),
    "race": ("utkface", "race", "accuracy"),
    "attributes": ("celeba", "attributes", "accuracy"),
    "emotion": ("fer2013", "emotion", "accuracy"),
}
METHODS = ["Concat", "PCA", "AE", "DAE"]
#: The auto-encoders compared with BT: plain and denoising (``EmbeddingFusion(noise=--dae-noise)``).
AUTOENCODERS = ["AE", "DAE"]
#: Bumped when embeddings are computed differently, so that stale cache files are not reused.
EMBEDDING_VERSION = 1


#: Settings of a full-size run and of --quick (each overridden by its command-line option).
FULL = dict(n=None, cv=5, ae_epochs=400, distill_epochs=12, epochs=4, alphas=50)
QUICK = dict(n=100, cv=3, ae_epochs=5, distill_epochs=1, epochs=1, alphas=10)


def parse(argv):
    p = _bench.parser(__doc__)
    p.add_argument("--cv", type=int, default=None, help="folds of the Table 6 satellites (default 5, quick 3)")
    p.add_argument("--ae-epochs", type=int, default=None, help="most auto-encoder epochs (default 400, quick 5)")
    p.add_argument("--dae-noise", type=float, default=0.25,
                   help="share of the inputs the denoising auto-encoder (row DAE) drops in training (default 0.25)")
    p.add_argument("--emotion-target", choices=["test", "train"], default="test",
                   help="FER2013 split that is the emotion target (the other joins the pool; default test)")
    p.add_argument("--distill-epochs", type=int, default=None, help="most distillation epochs (default 12, quick 1)")
    p.add_argument("--epochs", type=int, default=None, help="most fine-tuning epochs (default 4, quick 1)")
    p.add_argument("--gamma", type=float, default=0.01, help="CRAFT gamma of the pruned student")
    p.add_argument("--alphas", type=int, default=None, help="LASSO path length of the pruned student (default 50, quick 10)")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch baselines")
    p.add_argument("--save-student", type=Path, default=None, metavar="PATH",
                   help="write the distilled student's state dict there (bench_attributes.py --init-from reads it)")
    args = p.parse_args(argv)
    vars(args).update(_bench.settings(args, FULL, QUICK))
    torch.set_num_threads(args.threads)
    return args


def load_sets(args):
    """Pool images (no labels) and target images with their label frames, all RGB 112x96 uint8."""
    root, cache = args.data_root, args.cache
    celeba, celeba_labels = _bench.load("celeba", root, args.n, COMMON, cache)
    utk, utk_labels = _bench.load("utkface", root, args.n, COMMON, cache)
    aflw, _ = _bench.load("aflw2000", root, args.n, COMMON, cache)
    fer_splits = {
        "train": _bench.load("fer2013", root, args.n, COMMON, cache),
        "test": load_fer2013(root / "fer2013", split="test", n=args.n, preset=COMMON, random_state=_bench.SEED,
                             cache=None if cache is None else str(cache)),
    }
    pool_split = "train" if args.emotion_target == "test" else "test"
    fer, fer_labels = fer_splits[args.emotion_target]
    celeba_pool, celeba_target = train_test_split(np.arange(len(celeba)), test_size=0.5, random_state=_bench.SEED)
    utk_pool, utk_target = train_test_split(np.arange(len(utk)), test_size=0.5, random_state=_bench.SEED)
    pool = {"celeba": celeba[celeba_pool], "utkface": utk[utk_pool], "aflw2000": aflw,
            f"fer2013_{pool_split}": fer_splits[pool_split][0]}
    attributes = celeba_labels.drop(columns="identity").iloc[celeba_target].astype(int)
    targets = {
        "utkface": (utk[utk_target], utk_labels.iloc[utk_target][["age", "gender", "race"]]),
        "celeba": (celeba[celeba_target], attributes),
        "fer2013": (fer, fer_labels[["emotion"]]),
    }
    return pool, targets


def networks(root):
    return {
        name: EmbeddingSource(build(weights=root / _bench.WEIGHTS[name]), layer, preset(name).adapt)
        for name, (build, layer) in SOURCES.items()
    }


def embeddings(sources, name, images, cache):
    """Every source's embedding of one image set (name -> float32 array), cached as .npz in ``cache``."""
    path = None
    if cache is not None:
        digest = hashlib.sha1(images.tobytes()).hexdigest()[:16]
        path = cache / f"fusion-embeddings-v{EMBEDDING_VERSION}-{name}-{digest}.npz"
        if path.is_file():
            with np.load(path) as stored:
                return {source: stored[source] for source in sources}
    start = time.perf_counter()
    result = extract_embeddings(sources, images, batch_size=64, progress=True)
    print(f"{name}: {len(images)} images embedded by {len(sources)} sources in {time.perf_counter() - start:.0f} s",
          flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **result)
    return result


def side_by_side(h):
    """The embeddings as one array and each source's columns (slices), in the order of SOURCES."""
    bounds = np.cumsum([0, *(h[name].shape[1] for name in SOURCES)])
    columns = {name: slice(int(lo), int(hi)) for name, lo, hi in zip(SOURCES, bounds[:-1], bounds[1:])}
    return np.hstack([h[name] for name in SOURCES]), columns


def task_frame(dataset, labels, min_count):
    """Targets of one data set as the ``tasks`` of task_relationship_matrix, and their task types / scoring."""
    names = [name for name, (data, _, _) in TARGETS.items() if data == dataset]
    if dataset == "celeba":
        counts = labels.sum()
        usable = [c for c in labels.columns if min_count <= counts[c] <= len(labels) - min_count]
        return labels[usable], {"attributes": usable}, {}
    frame = labels.rename(columns={TARGETS[name][1]: name for name in names})[names]
    task_types = {"age": "continuous"} if "age" in names else {}
    scoring = {"age": "mae"} if "age" in names else {}
    return frame.astype({"age": float}) if "age" in names else frame, task_types, scoring


def shown_score(task, value, metric):
    """Satellite score as reported: error rate (%) for the attributes, accuracy (%) or MAE (years)."""
    if task == "attributes":
        return 100 * (1 - value), "mean error rate %"
    if metric == "mae":
        return value, "MAE (years)"
    return 100 * value, "accuracy %"


def part_fusion(args, pool_h, target_h, target_sets):
    """Tables 5 and 6; returns the fitted fusions and the tables."""
    H_pool, columns = side_by_side(pool_h)
    fusions, times = {}, {}
    for label, method in zip(METHODS, ("concat", "pca", "autoencoder", "autoencoder")):
        start = time.perf_counter()
        fusions[label] = EmbeddingFusion(columns, method=method, epochs=args.ae_epochs, random_state=_bench.SEED,
                                         noise=args.dae_noise if label == "DAE" else 0.0,
                                         progress=method == "autoencoder").fit(H_pool)
        times[label] = time.perf_counter() - start
        print(f"{label}: fitted in {times[label]:.1f} s", flush=True)
    nrmse = pd.DataFrame({label: fusions[label].reconstruction_nrmse_ for label in ("PCA", *AUTOENCODERS)})
    nrmse.loc["average"] = nrmse.mean()

    rows = []
    for dataset, (images, labels) in target_sets.items():
        tasks, task_types, scoring = task_frame(dataset, labels, args.cv)
        h = target_h[dataset]
        H, _ = side_by_side(h)
        common = dict(task_types=task_types, scoring=scoring, cv=args.cv, random_state=_bench.SEED)
        fused = {label: fusion.transform(H) for label, fusion in fusions.items()}
        matrix, details = task_relationship_matrix(fused, None, tasks, return_details=True, **common)
        # The same folds for every row (they depend on the tasks, cv and seed only): AE and BT pair fold by fold.
        bt, _, bt_details = best_transfer(h, tasks, return_details=True, **common)
        bct, _ = best_concatenation(h, tasks, **common)
        details = pd.concat([details, bt_details], ignore_index=True)
        for task in matrix.columns:
            metric = matrix.attrs["metric"][task]
            folds = details[(details["task"] == task) & (details["metric"] == metric)]
            folds = folds.pivot(index="fold", columns="source", values="value")
            best = [shown_score(task, v, metric)[0] for v in folds[bt.loc[task, "source"]]]
            row = {"target": task, "dataset": dataset, "n_images": len(tasks)}
            for label in METHODS:
                row[label], row["metric"] = shown_score(task, matrix.loc[label, task], metric)
            row["BT"], _ = shown_score(task, bt.loc[task, "score"], metric)
            row["BCT"], _ = shown_score(task, bct.loc[task, "score"], metric)
            row["BT_source"], row["BCT_sources"] = bt.loc[task, "source"], bct.loc[task, "source"]
            lower_is_better = row["metric"] != "accuracy %"
            for label in AUTOENCODERS:
                gain = np.subtract([shown_score(task, v, metric)[0] for v in folds[label]], best)
                row[f"{label}>=BT"] = row[label] <= row["BT"] if lower_is_better else row[label] >= row["BT"]
                row[f"{label}-BT"], row[f"{label}_SE"] = gain.mean(), gain.std(ddof=1) / np.sqrt(len(gain))
            if task == "attributes":
                row["n_attributes"] = len(task_types["attributes"])
            rows.append(row)
    table6 = pd.DataFrame(rows).set_index("target")
    return fusions, nrmse, table6, times


def teacher_cost(nets, encoder, n_features):
    """Parameters, FLOPs and latency of the teacher stack: every source network plus the encoder."""
    parts = [(source.model, preset(name).input_shape) for name, source in nets.items()]
    parts.append((encoder, (n_features,)))
    return dict(
        parameters=sum(count_parameters(model) for model, _ in parts),
        flops=sum(count_flops(model, shape) for model, shape in parts),
        latency_ms=1e3 * sum(measure_latency(model, shape, threads=1) for model, shape in parts),
    )


def student_cost(model):
    shape = STUDENT.input_shape
    return dict(
        parameters=count_parameters(model),
        flops=count_flops(model, shape),
        latency_ms=1e3 * measure_latency(model, shape, threads=1),
    )


def filters(model):
    """Number of convolution filters of a network."""
    return sum(module.out_channels for module in model.modules() if isinstance(module, torch.nn.Conv2d))


def target_score(task, y_true, y_pred):
    """The reported score of fine-tuned predictions, in the units of ``shown_score``."""
    if task == "age":
        return float(mean_absolute_error(y_true, y_pred))
    if task == "attributes":
        return 100 * float(np.mean(np.asarray(y_true) != np.asarray(y_pred)))
    return 100 * float(accuracy_score(y_true, y_pred))


def part_distillation(args, pool_images, H_pool, ae, nets, target_sets, target_h):
    """Section 3.3: distil, compare costs, transfer to the targets, CRAFT-prune for gender."""
    n_components = ae.n_components_
    student = mobilenet_v1(num_classes=n_components, width_mult=STUDENT_WIDTH)
    start = time.perf_counter()
    distiller = FusionDistiller(FrozenEstimator(ae), student, preprocess=STUDENT.adapt, epochs=args.distill_epochs,
                                batch_size=64, validation_fraction=0.1, early_stopping=2, random_state=_bench.SEED,
                                progress=True)
    distiller.fit(pool_images, teacher_input=H_pool)
    distill_time = time.perf_counter() - start
    print(f"distillation: {distill_time:.0f} s, history:\n{distiller.history_}", flush=True)
    if args.save_student is not None:
        torch.save(distiller.student_.state_dict(), args.save_student)

    costs = pd.DataFrame(
        {"teacher stack (3 sources + encoder)": teacher_cost(nets, ae.encoder_, H_pool.shape[1]),
         f"student (MobileNet v1 alpha={STUDENT_WIDTH}, 64x64)": student_cost(distiller.student_)}
    ).T

    finetune = _bench.finetune_settings(args.epochs)
    common = dict(gamma=0.0, finetune_params=finetune, preprocess=STUDENT.adapt, selector_params=dict(alphas=5),
                  random_state=_bench.SEED)
    last_conv = [name for name, module in distiller.student_.named_modules() if isinstance(module, torch.nn.Conv2d)][-1]
    rows, times, pruned_row = [], {"distillation": distill_time}, None
    for dataset, (images, labels) in target_sets.items():
        tasks, task_types, scoring = task_frame(dataset, labels, args.cv)
        is_fer = dataset == "fer2013"
        strata = labels["emotion"].to_numpy() if is_fer else np.zeros(len(images))
        train, test = _bench.split(np.arange(len(images)), strata, "multiclass" if is_fer else "continuous")[:2]
        fold = np.zeros(len(images), dtype=int) - 1
        fold[test] = 0
        H, _ = side_by_side(target_h[dataset])
        features = {"teacher h_G + satellite": ae.transform(H), "student h^_G + satellite": distiller.transform(images)}
        matrix = task_relationship_matrix(features, None, tasks, task_types=task_types, scoring=scoring,
                                          cv=PredefinedSplit(fold), random_state=_bench.SEED)
        for task in matrix.columns:
            y = tasks[task_types["attributes"]].to_numpy() if task == "attributes" else tasks[task].to_numpy()
            row = {"target": task, "n_train": len(train), "n_test": len(test)}
            for label in features:
                row[label], row["metric"] = shown_score(task, matrix.loc[label, task], matrix.attrs["metric"][task])
            candidates = {"student fine-tuned": distiller.student_}
            if not args.no_scratch:
                candidates["same network from scratch"] = mobilenet_v1(num_classes=n_components, width_mult=STUDENT_WIDTH)
            for label, network in candidates.items():
                start = time.perf_counter()
                pruner = CraftPruner(network, layers=[last_conv], **common).fit(images[train], y[train])
                row[label] = target_score(task, y[test], pruner.predict(images[test]))
                times[f"{task}: {label}"] = time.perf_counter() - start
                print(f"{task}: {label} {row[label]:.3f} in {times[f'{task}: {label}']:.0f} s", flush=True)
            rows.append(row)
            if task == "gender":
                start = time.perf_counter()
                settings = {**common, "gamma": args.gamma, "selector_params": dict(alphas=args.alphas)}
                pruner = CraftPruner(distiller.student_, **settings).fit(images[train], y[train])
                times["gender: CRAFT-pruned student"] = time.perf_counter() - start
                pruned_row = pd.DataFrame({
                    "student fine-tuned (all filters)": dict(
                        student_cost(distiller.student_), score=row["student fine-tuned"], filters=filters(distiller.student_)
                    ),
                    f"student CRAFT-pruned, gamma={args.gamma:g}": dict(
                        student_cost(pruner.pruned_model_), score=target_score(task, y[test], pruner.predict(images[test])),
                        filters=filters(pruner.pruned_model_),
                    ),
                }).T
    targets = pd.DataFrame(rows).set_index("target")
    return distiller, costs, targets, pruned_row, pd.Series(times, name="seconds")


def main(argv=None):
    args = parse(argv)
    # On a shared machine a BLAS thread per core turns a 0.05 s PCA into 9 s: as many as torch's.
    with threadpool_limits(limits=args.threads):
        return run(args)


def run(args):
    results = args.results or _bench.RESULTS / "fusion.md"
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    pool, target_sets = load_sets(args)
    nets = networks(args.data_root)
    pool_h = {name: embeddings(nets, f"pool-{name}", images, args.cache) for name, images in pool.items()}
    pool_h = {source: np.vstack([h[source] for h in pool_h.values()]) for source in SOURCES}
    target_h = {name: embeddings(nets, f"target-{name}", images, args.cache) for name, (images, _) in target_sets.items()}
    pool_images = np.concatenate(list(pool.values()))
    setup_time = time.perf_counter() - clock
    print(f"{len(pool_images)} pool images, targets {({k: len(v[0]) for k, v in target_sets.items()})}; "
          f"loaded and embedded in {setup_time:.0f} s", flush=True)

    clock = time.perf_counter()
    fusions, nrmse, table6, fit_times = part_fusion(args, pool_h, target_h, target_sets)
    fusion_time = time.perf_counter() - clock
    print(table6.to_string(), flush=True)

    clock = time.perf_counter()
    H_pool, _ = side_by_side(pool_h)
    distiller, costs, targets, pruned, times = part_distillation(
        args, pool_images, H_pool, fusions["AE"], nets, target_sets, target_h
    )
    distill_part_time = time.perf_counter() - clock
    print(targets.to_string(), flush=True)

    stem = results.with_suffix("")
    table6.to_csv(f"{stem}_table6.csv")
    nrmse.to_csv(f"{stem}_nrmse.csv")
    costs.to_csv(f"{stem}_costs.csv")
    targets.to_csv(f"{stem}_targets.csv")
    if pruned is not None:
        pruned.to_csv(f"{stem}_pruned.csv")
    ae = fusions["AE"]
    wins = {label: int(table6[f"{label}>=BT"].sum()) for label in AUTOENCODERS}
    close = {label: int(((table6[f"{label}-BT"].abs() <= 2 * table6[f"{label}_SE"]) & ~table6[f"{label}>=BT"]).sum())
             for label in AUTOENCODERS}
    timing = pd.Series({
        "loading + source embeddings (cached with --cache)": setup_time,
        "part 1: fusions fitted (concat, PCA, AE, DAE)": sum(fit_times.values()),
        "part 1: of which the auto-encoders": fit_times["AE"] + fit_times["DAE"],
        "part 1 in all (with the satellites)": fusion_time,
        "part 2: distillation": times["distillation"],
        "part 2: fine-tunings and pruning together": times.drop("distillation").sum(),
        "part 2 in all": distill_part_time,
    }, name="seconds").to_frame()
    sizes = (f"{len(H_pool)} pool images, targets: " + ", ".join(f"{k} {len(v[0])}" for k, v in target_sets.items())
             + f" (FER2013's {args.emotion_target} split; --emotion-target)")
    intro = (
        "Vielzeuf et al. (multi-source transfer learning) with MobileFaceNet (128-d), mini-Xception (128-d) and "
        f"O-Net (256-d) as sources, h_G of dimension {ae.n_components_} (the mean rule). {sizes}. No target image "
        "and no label is used to fit a fusion or the student. See the script's docstring for the protocol."
    )
    blocks = [
        "### Table 5: reconstruction NRMSE on the held-out 10 % of the pool", "",
        "sqrt(mean over columns of MSE / variance): 0 is perfect, 1 is predicting the mean. "
        f"Auto-encoder: {len(ae.history_) - 1} epochs run (early stopping, patience 10), encoder widths "
        f"{[m.out_features for m in ae.encoder_ if isinstance(m, torch.nn.Linear)]}; the denoising one (DAE, the "
        f"same with {args.dae_noise:g} of its inputs dropped at every training step): "
        f"{len(fusions['DAE'].history_) - 1} epochs.", "",
        _bench.table(nrmse.rename_axis("source"), ".3f"), "",
        f"### Table 6: linear satellites ({args.cv}-fold CV) on each embedding of the target images", "",
        f"AE at least as good as BT on {wins['AE']} of {len(table6)} targets, DAE on {wins['DAE']} (BT and BCT "
        "are chosen on the folds they are scored on, as in the paper). AE-BT: the mean over folds of AE's score "
        "minus BT's on the same fold, in the metric's unit, with its standard error AE_SE (DAE-BT, DAE_SE: the "
        f"same for DAE); {close['AE']} of the {len(table6) - wins['AE']} other targets are within 2 SE of BT for "
        f"AE, {close['DAE']} of {len(table6) - wins['DAE']} for DAE.", "",
        _bench.table(table6.drop(columns=["dataset"]), ".4g"), "",
        "### Section 3.3: distilled student vs teacher stack", "",
        f"Distillation: {len(distiller.history_) - 1} epochs run (at most {args.distill_epochs}, patience 2), "
        f"cosine distance on held-out pool images {distiller.history_['val_loss'].iloc[0]:.3f} before, "
        f"{distiller.history_['val_loss'].min():.3f} at best. Latency: ms per image, batch 1, 1 thread "
        "(median of 20 runs; the teacher's is the sum over its networks).", "",
        _bench.table(costs.rename_axis("model"), ".4g"), "",
        "### Target scores (seeded 75/25 split of each target set)", "",
        "Satellites are fitted on the 75 % (library protocol, one fold); fine-tuning: "
        + _bench.FINETUNE_TEXT.format(epochs=args.epochs) + ".", "",
        _bench.table(targets, ".4g"), "",
    ]
    if pruned is not None:
        blocks += ["### The student CRAFT-pruned for UTKFace gender (accuracy %, same fine-tuning budget)", "",
                   _bench.table(pruned.rename_axis("model"), ".4g"), ""]
    blocks += ["### Wall time (s)", "", _bench.table(timing.rename_axis("stage"), ".0f"), "",
               _bench.table(times.to_frame().rename_axis("fit"), ".0f")]
    _bench.write_section(results, "Multi-source fusion and distillation (Vielzeuf et al. Tables 5, 6, section 3.3)",
                         intro, blocks, args.quick)
    return table6, targets


if __name__ == "__main__":
    main()
