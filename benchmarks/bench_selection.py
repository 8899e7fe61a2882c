"""Benchmarks of LassoFilterSelector: P2 (curves for VGG16 widths), P2b (10 outputs), P3 (grid over gamma).

P2   LassoFilterSelector.fit on 13 groups with VGG16's conv widths (64,64,128,128,256x3,512x6,
     4224 features), n = 20 000 samples, 100 alphas: wall time (goal <= 10 s on 2 cores), and
     the speed-up over fitting sklearn.linear_model.Lasso separately at each alpha (goal >= 5x).
     Features are "random but structured" like pooled activations: ReLU of 16 shared latent
     factors plus independent noise (non-negative, correlated within and across layers); the
     target is a sum of three factors plus noise. The baseline standardizes each group on the
     training part, fits Lasso (defaults, no warm start) at each alpha of the same grid and
     scores the held-out part (one BLAS thread, like the selector); it is timed on one group of
     each width at every k-th alpha and extrapolated to 100 alphas and 13 groups.
P2b  The same fit with a 10-column target: 10 continuous outputs (10 factors plus noise) and 10
     classes (argmax of 10 factors); goal <= 3x the single-output time.
P2c  The multi-class path on real data: LassoFilterSelector(random_state=0).fit on the pooled
     responses of MobileFaceNet's 50 convolutions (its trained weights) over the 450 training
     images of the ETL table's FER2013 emotion split (600 images, 75/25, 7 classes). The case is
     pooled once into an .npz (--multiclass-case PATH; built from ../shared/data when absent),
     then only selection is timed. --multiclass-save writes the run's timings, curves and knees,
     --multiclass-before compares this run with such a file from an earlier version (speed-up,
     knees and support at every layer's knee, curve RMSE), and --multiclass-after takes a saved
     run instead of fitting; with --multiclass-case only P2c runs and its section replaces the
     P2c section of the results file.
P3   GridSearchCV (3 folds) over 8 gamma values of ActivationPooler + LassoFilterSelector +
     RidgeCV on images through a narrow VGG16, divided by the same search over 1 gamma value;
     both with a fresh joblib.Memory shared by pooler and selector (goal <= 1.5). Two poolers:
     features.28 alone (the issue's composition) and all 13 convs (grouped by layer); the
     cost of each step of one warm fit shows where an extra gamma goes.

Run: python benchmarks/bench_selection.py [--n-samples 20000] [--baseline-every 10]
     python benchmarks/bench_selection.py --multiclass-case /tmp/mc_case.npz [--multiclass-before before.npz]
Writes benchmarks/results/selection.md (--results: elsewhere).
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso, RidgeCV
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import _bench
import sklearn_craft
from sklearn_craft.models import mobilefacenet, preset, vgg16
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.selection import LassoFilterSelector

RESULTS = Path(__file__).resolve().parent / "results" / "selection.md"
P2C_TITLE = "### P2c: multi-class path on MobileFaceNet / FER2013"
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
GAMMAS = (0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.2, 0.5)


def structured_features(n_samples, seed=0, n_factors=16):
    """Features of VGG16's widths, ReLU of shared latent factors plus noise; and the factors."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n_samples, n_factors))
    blocks = [
        np.maximum(factors @ rng.normal(size=(n_factors, width)) + rng.normal(size=(n_samples, width)), 0)
        for width in VGG16_WIDTHS
    ]
    groups = np.repeat(np.arange(len(VGG16_WIDTHS)), VGG16_WIDTHS)
    return np.hstack(blocks), groups, factors


def timed(function):
    """(wall seconds, CPU seconds of this process, result) of ``function()``."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - start, time.process_time() - start_cpu, result


def p2_fits(X, groups, targets, n_jobs_values, repeats):
    """Median selector fit times (wall, CPU) for every target and n_jobs over ``repeats`` rounds."""
    configs = [(name, n_jobs) for name in targets for n_jobs in n_jobs_values]
    wall, cpu, kept = {config: [] for config in configs}, {config: [] for config in configs}, {}
    for repeat in range(repeats):
        # Rotating the order spreads drifts in machine load over every configuration.
        for name, n_jobs in configs[repeat % len(configs) :] + configs[: repeat % len(configs)]:
            selector = LassoFilterSelector(groups=groups, random_state=0, n_jobs=n_jobs)
            seconds, cpu_seconds, _ = timed(lambda: selector.fit(X, targets[name]))
            wall[name, n_jobs].append(seconds)
            cpu[name, n_jobs].append(cpu_seconds)
            kept[name, n_jobs] = int(selector.support_.sum())
            print(f"P2 {name}, n_jobs={n_jobs}: {seconds:.2f} s wall, {cpu_seconds:.2f} s CPU", flush=True)
    return [(*config, np.median(wall[config]), np.median(cpu[config]), kept[config]) for config in configs]


def lasso_baseline(X, groups, y, every):
    """Seconds of separate Lasso fits at each alpha, one group per width, extrapolated."""
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0)
    per_width, unconverged, n_fits = {}, 0, 0
    for width in sorted(set(VGG16_WIDTHS)):
        group = VGG16_WIDTHS.index(width)
        columns = groups == group
        scaler = StandardScaler().fit(X[train][:, columns])
        X_train, X_test = scaler.transform(X[train][:, columns]), scaler.transform(X[test][:, columns])
        alphas = LassoFilterSelector(random_state=0).fit(X[:, columns], y).curves_["alpha"].to_numpy()
        sampled = alphas[::every]

        def fit_all():
            for alpha in sampled:
                model = Lasso(alpha=alpha).fit(X_train, y[train])
                np.sqrt(np.mean((model.predict(X_test) - y[test]) ** 2))

        # One BLAS thread, as in the selector's fit: OpenBLAS threads make Lasso's level-1 calls
        # erratic (up to 50x slower) on a busy machine.
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"):
            warnings.simplefilter("always", ConvergenceWarning)
            wall, _, _ = timed(fit_all)
        unconverged += sum(issubclass(warning.category, ConvergenceWarning) for warning in caught)
        n_fits += len(sampled)
        per_width[width] = wall * len(alphas) / len(sampled)
        print(f"baseline width {width}: {wall:.2f} s for {len(sampled)} alphas -> {per_width[width]:.1f} s", flush=True)
    total = sum(per_width[width] for width in VGG16_WIDTHS)
    return per_width, total, (unconverged, n_fits)


P3_PIPELINES = {
    "features.28 (the issue's composition)": ["features.28"],
    "all 13 convs, grouped by layer": "conv",
}


def p3(n_images, size, width_mult, repeats):
    """Median wall seconds of the grid searches over 1 and 8 gammas, and the cost of one more gamma.

    Every search starts from a fresh cache. Returns, per pipeline, ``{1: s, 8: s, "steps": {...}}``
    where the steps time one warm pipeline fit at a new gamma after a search (what each extra
    gamma costs per fold).
    """
    torch.manual_seed(0)
    model = vgg16(num_classes=2, input_size=size, width_mult=width_mult).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_images, size, size, 3), dtype=np.uint8)
    pooled = ActivationPooler(model, layers=["features.28"]).fit_transform(images)
    y = pooled[:, :3] @ np.array([1.0, -1.0, 2.0]) + 0.1 * pooled[:, :3].std() * rng.normal(size=n_images)

    def pipeline(layers, memory, gamma=0.01):
        return make_pipeline(
            ActivationPooler(model, layers=layers, memory=memory),
            LassoFilterSelector(gamma=gamma, random_state=0, memory=memory),
            RidgeCV(),
        ).set_output(transform="pandas")

    def search(layers, gammas, location):
        memory = joblib.Memory(location, verbose=0)
        grid = GridSearchCV(pipeline(layers, memory), {"lassofilterselector__gamma": gammas}, cv=3)
        return timed(lambda: grid.fit(images, y))[0]

    def warm_steps(layers, location):
        pooler, selector, ridge = pipeline(layers, joblib.Memory(location, verbose=0), gamma=0.3).named_steps.values()
        steps = {"pooler fit": timed(lambda: pooler.fit(images))[0]}
        steps["pooler transform (cached)"], _, features = timed(lambda: pooler.transform(images))
        steps["selector fit (cached paths)"], _, _ = timed(lambda: selector.fit(features, y))
        steps["RidgeCV fit"], _, _ = timed(lambda: ridge.fit(selector.transform(features), y))
        return steps

    results = {}
    for name, layers in P3_PIPELINES.items():
        times = {1: [], 8: []}
        for repeat in range(repeats):
            # Alternating the order spreads drifts in machine load over both.
            for count in (1, 8) if repeat % 2 == 0 else (8, 1):
                with tempfile.TemporaryDirectory() as location:
                    times[count].append(search(layers, list(GAMMAS[:count]), location))
                    if count == 8 and repeat == 0:
                        steps = warm_steps(layers, location)
                print(f"P3 {name}, {count} gamma(s): {times[count][-1]:.2f} s", flush=True)
        results[name] = {count: float(np.median(values)) for count, values in times.items()} | {"steps": steps}
    return results


def multiclass_case(path, data_root):
    """Pooled responses (DataFrame, one column per filter) and emotion labels of the P2c case.

    Built once and saved to ``path``: MobileFaceNet with its trained weights, every convolution
    pooled over the 450 training images of the ETL table's emotion split.
    """
    if not path.exists():
        input_preset = preset("mobilefacenet")
        net = mobilefacenet(weights=data_root / _bench.WEIGHTS["mobilefacenet"])
        X_train, _, y_train, _ = _bench.task_data("emotion", data_root, 600, input_preset)
        pooler = ActivationPooler(net, layers="conv", preprocess=input_preset.preprocess).set_output(transform="pandas")
        features = pooler.fit(X_train).transform(X_train)
        np.savez(path, X=features.to_numpy(), names=np.asarray(features.columns, dtype=str), y=y_train.astype(str))
    case = np.load(path)
    return pd.DataFrame(case["X"], columns=case["names"]), case["y"]


def p2c(X, y, repeats):
    """Median wall and CPU seconds of ``LassoFilterSelector(random_state=0).fit`` and the last fit."""
    wall, cpu = [], []
    for repeat in range(repeats):
        selector = LassoFilterSelector(random_state=0)
        seconds, cpu_seconds, _ = timed(lambda: selector.fit(X, y))
        wall.append(seconds)
        cpu.append(cpu_seconds)
        print(f"P2c fit {repeat + 1}/{repeats}: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU", flush=True)
    run = {"wall": float(np.median(wall)), "cpu": float(np.median(cpu)), "load": os.getloadavg()[0], "repeats": repeats}
    return run, selector


def run_record(run, selector, command):
    """The timings, curves, knees and support of a P2c run (what --multiclass-save writes)."""
    curves, knees = selector.curves_, selector.knees_
    return dict(
        wall=run["wall"], cpu=run["cpu"], load=run["load"], repeats=run["repeats"], command=command,
        version=sklearn_craft_version(),
        curve_group=np.asarray(curves["group"], dtype=str), curve_alpha=curves["alpha"].to_numpy(),
        curve_n_selected=curves["n_selected"].to_numpy(), curve_rmse=curves["rmse"].to_numpy(),
        knee_group=np.asarray(knees["group"], dtype=str), knee_n_selected=knees["n_selected"].to_numpy(),
        knee_rmse=knees["rmse"].to_numpy(), support=selector.support_,
    )


def sklearn_craft_version():
    """Where the library came from, and its git commit when it is a checkout."""
    root = Path(sklearn_craft.__file__).resolve().parents[1]
    completed = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = completed.stdout.strip() if completed.returncode == 0 else "unknown commit"
    return f"{root} ({commit})"


def p2c_section(X, y, after, before, command):
    """Markdown of P2c: the run ``after`` and, when given, ``before`` (run records) against it."""
    groups = after["knee_group"]
    lines = [
        P2C_TITLE,
        "",
        f"- Machine: `{platform.platform()}`, cpu count {os.cpu_count()}; torch {torch.__version__}, "
        f"scikit-learn {sklearn.__version__}, numpy {np.__version__}",
        f"- Command: `{command}`" + ("" if str(after["command"]) == command else f"; the run: `{after['command']}`"),
        f"- Date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        "",
        f"`LassoFilterSelector(random_state=0).fit` (gamma 0.01, 100 alphas, one validation split, n_jobs=None) on "
        f"the pooled responses of MobileFaceNet's {len(groups)} convolutions ({X.shape[1]} filters, trained "
        f"weights) over {X.shape[0]} FER2013 training images, {len(np.unique(y))} emotion classes: the "
        "multi-task path. Median fit times; load average when the run ended, on "
        f"{os.cpu_count()} cpus (a shared machine: CPU seconds of the process are steadier than wall seconds).",
        "",
        "| library | fits | wall s | CPU s | load average |",
        "|---|---|---|---|---|",
    ]
    for name, record in (("before", before), ("after", after)):
        if record is not None:
            lines.append(
                f"| {name}: {record['version']} | {int(record.get('repeats', 1))} | {float(record['wall']):.1f} | "
                f"{float(record['cpu']):.1f} | {float(record['load']):.1f} |"
            )
    lines.append("")
    if before is not None:
        differing = [str(g) for g, a, b in zip(groups, before["knee_n_selected"], after["knee_n_selected"]) if a != b]
        same_support = np.array_equal(before["knee_group"], groups)
        same_support &= np.array_equal(before["support"], after["support"])
        same_curves = np.array_equal(before["curve_n_selected"], after["curve_n_selected"])
        rmse_diff = float(np.max(np.abs(before["curve_rmse"] - after["curve_rmse"])))
        lines += [
            f"- Before: `{before['command']}`.",
            f"- Speed-up: **{float(before['wall']) / float(after['wall']):.2f}x** in wall time, "
            f"**{float(before['cpu']) / float(after['cpu']):.2f}x** in CPU time.",
            f"- Knees: n_selected equal in {len(groups) - len(differing)} of {len(groups)} layers"
            + (f" (differ: {', '.join(differing)})" if differing else "")
            + f"; support_ (the filters kept at every knee) {'identical' if same_support else 'DIFFERENT'}; "
            f"curves: n_selected at every alpha {'identical' if same_curves else 'DIFFERENT'}, "
            f"largest |RMSE difference| {rmse_diff:.2e}.",
            "",
        ]
    return lines


def splice(text, section):
    """``text`` with its P2c section (up to the next ``##`` heading) replaced by ``section``, or appended."""
    start = text.find(P2C_TITLE)
    if start < 0:
        return (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    end = min((i for i in (text.find("\n## ", start + 1), text.find("\n### ", start + 1)) if i >= 0), default=len(text))
    return text[:start] + section.rstrip("\n") + "\n" + text[end:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of P2 fits (medians are reported)")
    parser.add_argument("--baseline-every", type=int, default=10, help="time the Lasso baseline at every k-th alpha")
    parser.add_argument("--p3-images", type=int, default=600)
    parser.add_argument("--p3-size", type=int, default=64)
    parser.add_argument("--p3-width-mult", type=float, default=0.25)
    parser.add_argument("--p3-repeats", type=int, default=3)
    parser.add_argument("--multiclass-case", type=Path, default=None, help="P2c only: .npz of the pooled case")
    parser.add_argument("--multiclass-repeats", type=int, default=3)
    parser.add_argument("--multiclass-save", type=Path, default=None, help="write this P2c run's results (.npz)")
    parser.add_argument("--multiclass-before", type=Path, default=None, help="a --multiclass-save file to compare with")
    parser.add_argument("--multiclass-after", type=Path, default=None, help="a saved run instead of fitting")
    parser.add_argument("--data-root", type=Path, default=_bench.REPO.parent / "shared" / "data")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args()
    command = "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]])
    warnings.simplefilter("ignore", ConvergenceWarning)
    previous = args.results.read_text() if args.results.exists() else ""

    if args.multiclass_case is not None:
        torch.set_num_threads(1)
        X, y = multiclass_case(args.multiclass_case, args.data_root)
        if args.multiclass_after is not None:
            after = dict(np.load(args.multiclass_after))
        else:
            after = run_record(*p2c(X, y, args.multiclass_repeats), command)
        if args.multiclass_save is not None:
            np.savez(args.multiclass_save, **after)
        before = None if args.multiclass_before is None else dict(np.load(args.multiclass_before))
        section = "\n".join(p2c_section(X, y, after, before, command))
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(splice(previous, section))
        print(section)
        print(f"wrote {args.results}")
        return

    X, groups, factors = structured_features(args.n_samples)
    rng = np.random.default_rng(1)
    targets = {
        "1 output": factors[:, :3].sum(axis=1) + 0.5 * rng.normal(size=args.n_samples),
        "10 outputs": factors[:, :10] + 0.5 * rng.normal(size=(args.n_samples, 10)),
        "10 classes": np.argmax(factors[:, :10] + 0.5 * rng.normal(size=(args.n_samples, 10)), axis=1),
    }
    fits = p2_fits(X, groups, targets, (1, 2), args.repeats)
    load_p2 = os.getloadavg()[0]
    per_width, baseline, (unconverged, n_fits) = lasso_baseline(X, groups, targets["1 output"], args.baseline_every)
    with threadpool_limits(limits=1, user_api="blas"):
        p3_results = p3(args.p3_images, args.p3_size, args.p3_width_mult, args.p3_repeats)
    load_p3 = os.getloadavg()[0]

    wall = {(name, n_jobs): seconds for name, n_jobs, seconds, _, _ in fits}
    cpu = {(name, n_jobs): seconds for name, n_jobs, _, seconds, _ in fits}
    single = wall[("1 output", 2)]
    speedup = baseline / wall[("1 output", 1)]
    print(f"P2 {single:.2f} s (n_jobs=2), speed-up over Lasso at each alpha {speedup:.1f}x")
    for name, result in p3_results.items():
        print(f"P3 {name}: ratio {result[8] / result[1]:.2f}")

    def verdict(ok):
        return "pass" if ok else "FAIL"

    lines = [
        "## LassoFilterSelector (P2, P2b, P3)",
        "",
        f"- Machine: `{platform.platform()}`, cpu count {os.cpu_count()}",
        f"- torch {torch.__version__}, scikit-learn {sklearn.__version__}, numpy {np.__version__}",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- Load average after P2: {load_p2:.1f}, after P3: {load_p3:.1f} on {os.cpu_count()} cpus (other "
        "jobs were running, so wall times are noisy; CPU times of the process are given too).",
        "",
        f"### P2: 13 groups of VGG16 widths, n = {args.n_samples}, 100 alphas (goal <= 10 s on 2 cores, >= 5x)",
        "",
        "Features: ReLU of 16 shared latent factors plus noise; one group per conv width; "
        f"validation split 0.25; `standardize=True`. Median of {args.repeats} rounds in rotating order.",
        "",
        "| target | n_jobs | wall s | CPU s | filters kept | wall / 1-output wall (same n_jobs) |",
        "|---|---|---|---|---|---|",
    ]
    for name, n_jobs, seconds, cpu_seconds, kept in fits:
        ratio = seconds / wall[("1 output", n_jobs)]
        lines.append(f"| {name} | {n_jobs} | {seconds:.2f} | {cpu_seconds:.2f} | {kept} | {ratio:.2f} |")
    lines += [
        "",
        f"- Wall time, 1 output, n_jobs=2: **{single:.2f} s** ({verdict(single <= 10)}).",
        f"- Lasso baseline: separate `Lasso(alpha)` fits on the standardized training part at every "
        f"{args.baseline_every}th alpha of each group's grid, one group per width, extrapolated to 100 "
        f"alphas and 13 groups: "
        + ", ".join(f"width {width}: {seconds:.1f} s" for width, seconds in per_width.items())
        + f"; total **{baseline:.0f} s**. It only computes the held-out curve; the selector also refits "
        f"the path on all samples. {unconverged} of the {n_fits} timed Lasso fits stopped at max_iter "
        "(1000) without converging, so converged fits would cost more.",
        f"- Speed-up over the baseline (selector with n_jobs=1): **{speedup:.1f}x** ({verdict(speedup >= 5)}).",
        "",
        "### P2b: 10-column target (goal <= 3x the single-output time)",
        "",
    ]
    for name in ("10 outputs", "10 classes"):
        for n_jobs in (1, 2):
            ratio = wall[(name, n_jobs)] / wall[("1 output", n_jobs)]
            cpu_ratio = cpu[(name, n_jobs)] / cpu[("1 output", n_jobs)]
            lines.append(
                f"- {name}, n_jobs={n_jobs}: {ratio:.2f}x the single-output wall time "
                f"({cpu_ratio:.2f}x CPU time) ({verdict(ratio <= 3)})"
            )
    lines += [
        "",
        "### P3: GridSearchCV over 8 gammas / over 1 gamma, with memory (goal <= 1.5)",
        "",
        f"`make_pipeline(ActivationPooler, LassoFilterSelector, RidgeCV()).set_output(transform='pandas')` "
        f"on a VGG16 layout at width x{args.p3_width_mult} ({args.p3_size}x{args.p3_size} input), "
        f"{args.p3_images} random images, 3 folds (GridSearchCV refits on all images at the end); a fresh "
        "`joblib.Memory` for each search, shared by pooler and selector; BLAS on one thread (RidgeCV's "
        "eigendecompositions are erratic with OpenBLAS threads on a busy machine); median of "
        f"{args.p3_repeats} alternating runs. Gammas: {', '.join(map(str, GAMMAS))} (the first alone for 1 gamma).",
        "",
        "| pooled layers | 1 gamma s | 8 gammas s | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    for name, result in p3_results.items():
        ratio = result[8] / result[1]
        lines.append(f"| {name} | {result[1]:.2f} | {result[8]:.2f} | **{ratio:.2f}** | {verdict(ratio <= 1.5)} |")
    lines += [
        "",
        "What one more gamma costs per fit once the cache is warm (one pipeline fit on all images at a new "
        "gamma after the 8-gamma search, seconds):",
        "",
        "| pooled layers | " + " | ".join(next(iter(p3_results.values()))["steps"]) + " |",
        "|---|" + "---|" * len(next(iter(p3_results.values()))["steps"]),
    ]
    for name, result in p3_results.items():
        lines.append(f"| {name} | " + " | ".join(f"{seconds:.2f}" for seconds in result["steps"].values()) + " |")
    lines.append("")
    text = "\n".join(lines)
    if P2C_TITLE in previous:
        # P2c is measured by its own run (--multiclass-case); keep its last section.
        text = splice(text, previous[previous.find(P2C_TITLE) :])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
