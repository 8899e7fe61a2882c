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
P3   GridSearchCV (3 folds) over 8 gamma values of ActivationPooler + LassoFilterSelector +
     RidgeCV on images through a narrow VGG16, divided by the same search over 1 gamma value;
     both with a fresh joblib.Memory shared by pooler and selector (goal <= 1.5). Two poolers:
     features.28 alone (the issue's composition) and all 13 convs (grouped by layer); the
     cost of each step of one warm fit shows where an extra gamma goes.

--quick: 300 samples of VGG16's widths x0.125, one round of P2, the baseline at every 50th alpha, P3 on
60 images of 32x32 through VGG16 at width x0.0625, once: a smoke run of the whole script, not a
measurement.
Run: python benchmarks/bench_selection.py [--quick] [--n-samples 20000] [--baseline-every 10]
Writes benchmarks/results/selection.md (or --results PATH).
"""

import os
import tempfile
import time
import warnings

import joblib
import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso, RidgeCV
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import _bench
from sklearn_craft.models import vgg16
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.selection import LassoFilterSelector

FULL = dict(
    n_samples=20_000, p2_width_mult=1.0, repeats=3, baseline_every=10, p3_images=600, p3_size=64, p3_width_mult=0.25,
    p3_repeats=3,
)
QUICK = dict(
    n_samples=300, p2_width_mult=0.125, repeats=1, baseline_every=50, p3_images=60, p3_size=32, p3_width_mult=0.0625,
    p3_repeats=1,
)
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
GAMMAS = (0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.2, 0.5)


def group_widths(width_mult):
    """VGG16's conv widths scaled by ``width_mult`` (at least one feature per group)."""
    return tuple(max(1, round(width * width_mult)) for width in VGG16_WIDTHS)


def structured_features(n_samples, widths, seed=0, n_factors=16):
    """Features of ``widths``, ReLU of shared latent factors plus noise; and the factors."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n_samples, n_factors))
    blocks = [
        np.maximum(factors @ rng.normal(size=(n_factors, width)) + rng.normal(size=(n_samples, width)), 0)
        for width in widths
    ]
    groups = np.repeat(np.arange(len(widths)), widths)
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


def lasso_baseline(X, groups, widths, y, every):
    """Seconds of separate Lasso fits at each alpha, one group per width, extrapolated."""
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0)
    per_width, unconverged, n_fits = {}, 0, 0
    for width in sorted(set(widths)):
        group = widths.index(width)
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
    total = sum(per_width[width] for width in widths)
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


def main(argv=None):
    parser = _bench.parser(__doc__, real_data=False)
    parser.add_argument("--n-samples", type=int, default=None)
    parser.add_argument("--p2-width-mult", type=float, default=None, help="scale of VGG16's widths (full size: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of P2 fits (medians are reported)")
    parser.add_argument("--baseline-every", type=int, default=None, help="time the Lasso baseline at every k-th alpha")
    parser.add_argument("--p3-images", type=int, default=None)
    parser.add_argument("--p3-size", type=int, default=None)
    parser.add_argument("--p3-width-mult", type=float, default=None)
    parser.add_argument("--p3-repeats", type=int, default=None)
    args = parser.parse_args(argv)
    config = _bench.settings(args, FULL, QUICK)
    torch.set_num_threads(args.threads)
    results = args.results or _bench.RESULTS / "selection.md"
    warnings.simplefilter("ignore", ConvergenceWarning)

    widths = group_widths(config["p2_width_mult"])
    X, groups, factors = structured_features(config["n_samples"], widths)
    rng = np.random.default_rng(1)
    targets = {
        "1 output": factors[:, :3].sum(axis=1) + 0.5 * rng.normal(size=config["n_samples"]),
        "10 outputs": factors[:, :10] + 0.5 * rng.normal(size=(config["n_samples"], 10)),
        "10 classes": np.argmax(factors[:, :10] + 0.5 * rng.normal(size=(config["n_samples"], 10)), axis=1),
    }
    fits = p2_fits(X, groups, targets, (1, 2), config["repeats"])
    load_p2 = os.getloadavg()[0]
    per_width, baseline, (unconverged, n_fits) = lasso_baseline(
        X, groups, widths, targets["1 output"], config["baseline_every"]
    )
    with threadpool_limits(limits=1, user_api="blas"):
        p3_results = p3(config["p3_images"], config["p3_size"], config["p3_width_mult"], config["p3_repeats"])
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
        f"Load average after P2: {load_p2:.1f}, after P3: {load_p3:.1f} on {os.cpu_count()} cpus (other "
        "jobs were running, so wall times are noisy; CPU times of the process are given too).",
        "",
        f"### P2: 13 groups of VGG16 widths ({', '.join(map(str, widths))}), n = {config['n_samples']}, "
        "100 alphas (goal <= 10 s on 2 cores, >= 5x)",
        "",
        "Features: ReLU of 16 shared latent factors plus noise; one group per conv width; "
        f"validation split 0.25; `standardize=True`. Median of {config['repeats']} rounds in rotating order.",
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
        f"{config['baseline_every']}th alpha of each group's grid, one group per width, extrapolated to 100 "
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
        f"on a VGG16 layout at width x{config['p3_width_mult']} ({config['p3_size']}x{config['p3_size']} input), "
        f"{config['p3_images']} random images, 3 folds (GridSearchCV refits on all images at the end); a fresh "
        "`joblib.Memory` for each search, shared by pooler and selector; BLAS on one thread (RidgeCV's "
        "eigendecompositions are erratic with OpenBLAS threads on a busy machine); median of "
        f"{config['p3_repeats']} alternating runs. Gammas: {', '.join(map(str, GAMMAS))} (the first alone for 1 gamma).",
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
    intro = "Fit time of `LassoFilterSelector` (P2, P2b) and the cost of a grid over gamma (P3)."
    _bench.write_section(results, "LassoFilterSelector (P2, P2b, P3)", intro, lines, args.quick)


if __name__ == "__main__":
    main()
