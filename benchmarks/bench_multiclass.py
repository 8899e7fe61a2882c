"""Benchmark P2c of LassoFilterSelector: the multi-class (multi-task) path on real data.

P2c  LassoFilterSelector(random_state=0).fit on the pooled responses of MobileFaceNet's 50
     convolutions (its trained weights) over the 450 training images of the ETL table's FER2013
     emotion split (600 images, 75/25, 7 classes). The case is pooled once into an .npz (--case
     PATH; built from ../shared/data when absent), then only selection is timed (wall and CPU
     seconds, median of --repeats fits). --save writes the run's timings, curves and knees;
     --before compares this run with such a file from another version of the library
     (speed-up, n_selected at every knee, the support, the curves); --after takes a saved run
     instead of fitting.

--multitask-tol sets the multi-task duality-gap tolerance of this run (the library's
``_lasso_path.MULTITASK_TOL``, 1e-6) and --reference compares the knees of this run and of --before
with saved runs, typically at --multitask-tol 1e-8 or tighter (the exact knees): the knee is the
fewest filters within gamma of the curve's range, so it moves with the solver's accuracy. With
several references, a layer whose knee differs between them is reported as not determined at
those tolerances (a knee that close to its threshold moves with any solver's rounding), and the
runs are compared with the references on the other layers.

--before-commit REV fits the "before" with the library of git revision REV (checked out in a temporary
worktree, fitted in a child process of this script, just before this run's fit), and --reference-tol
T [T ...] fits references at those tolerances the same way, so that one command reproduces the whole
comparison: ``--before-commit e4cb6be --reference-tol 1e-8 1e-10`` (e4cb6be: the last version
before the multi-task Newton steps, the "before" of the issue's 5x).

--quick: a synthetic case (120 samples, 6 groups of 16 features, 7 classes), one fit: a smoke run
of the whole script, not a measurement.
Run: python benchmarks/bench_multiclass.py --case /tmp/mc_case.npz [--save after.npz] [--before before.npz]
     [--reference exact.npz [exact2.npz ...]] [--multitask-tol 1e-8]
     [--before-commit REV] [--reference-tol 1e-8 [1e-10 ...]]
Writes benchmarks/results/multiclass.md (or --results PATH).
"""

import itertools
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning

import _bench
import sklearn_craft
import sklearn_craft._lasso_path
from sklearn_craft.models import mobilefacenet, preset
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.selection import LassoFilterSelector

FULL = dict(repeats=3)
QUICK = dict(repeats=1)


def real_case(path, data_root):
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
    with np.load(path, allow_pickle=False) as case:
        return pd.DataFrame(case["X"], columns=case["names"]), case["y"]


def synthetic_case(seed=0):
    """A small stand-in for the real case: 6 layers of 16 correlated responses, 7 classes."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(120, 4))
    X = np.maximum(factors @ rng.normal(size=(4, 96)) + 0.5 * rng.normal(size=(120, 96)), 0)
    y = np.argmax(factors @ rng.normal(size=(4, 7)) + rng.normal(size=(120, 7)), axis=1).astype(str)
    return pd.DataFrame(X, columns=[f"layer{i // 16}:{i % 16}" for i in range(96)]), y


def timed_fits(X, y, repeats):
    """Median wall and CPU seconds of ``LassoFilterSelector(random_state=0).fit``, and the last fit."""
    wall, cpu = [], []
    for repeat in range(repeats):
        selector = LassoFilterSelector(random_state=0)
        start, start_cpu = time.perf_counter(), time.process_time()
        selector.fit(X, y)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        print(f"P2c fit {repeat + 1}/{repeats}: {wall[-1]:.1f} s wall, {cpu[-1]:.1f} s CPU", flush=True)
    return {"wall": np.median(wall), "cpu": np.median(cpu), "load": os.getloadavg()[0], "repeats": repeats}, selector


def run_record(run, selector, command):
    """The timings, curves, knees and support of a run (what --save writes): numeric and str arrays only."""
    curves, knees = selector.curves_, selector.knees_
    record = dict(
        wall=run["wall"], cpu=run["cpu"], load=run["load"], repeats=run["repeats"], command=command,
        version=library_version(),
        curve_group=np.asarray(curves["group"], dtype=str), curve_alpha=curves["alpha"].to_numpy(),
        curve_n_selected=curves["n_selected"].to_numpy(), curve_rmse=curves["rmse"].to_numpy(),
        knee_group=np.asarray(knees["group"], dtype=str), knee_n_selected=knees["n_selected"].to_numpy(),
        knee_rmse=knees["rmse"].to_numpy(), support=selector.support_,
    )
    # Versions before MULTITASK_TOL (the "before" of the speed-up) have none to record.
    if hasattr(sklearn_craft._lasso_path, "MULTITASK_TOL"):
        record["multitask_tol"] = sklearn_craft._lasso_path.MULTITASK_TOL
    return record


def library_version():
    """Where the library came from, and its git commit when it is a checkout."""
    root = Path(sklearn_craft.__file__).resolve().parents[1]
    completed = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = completed.stdout.strip() if completed.returncode == 0 else "unknown commit"
    changed = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "sklearn_craft"]).returncode == 1
    return f"{root} ({commit}{' + uncommitted changes' if changed else ''})"


def load_record(path):
    with np.load(path, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


def tolerance(record):
    """The multi-task duality-gap tolerance of a run (records of older versions do not say)."""
    return f"{float(record['multitask_tol']):g}" if "multitask_tol" in record else "1e-4 (versions before MULTITASK_TOL)"


def child_record(args, repeats, case_path, *, commit=None, multitask_tol=None):
    """The record of a fit of the case in a child process of this script: with the library of git
    revision ``commit`` (checked out in a temporary worktree) or at ``multitask_tol``."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        command = [sys.executable, __file__, "--repeats", str(repeats), "--threads", str(args.threads),
                   "--save", str(folder / "run.npz"), "--results", str(folder / "run.md")]
        command += ["--quick"] if args.quick else ["--case", str(case_path)]
        if multitask_tol is not None:
            command += ["--multitask-tol", repr(multitask_tol)]
        env = dict(os.environ)
        if commit is not None:
            tree = folder / "tree"
            subprocess.run(["git", "-C", str(_bench.REPO), "worktree", "add", "--quiet", "--detach", str(tree), commit],
                           check=True)
            # The child imports this script's _bench and the library of the worktree.
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
        try:
            subprocess.run(command, check=True, env=env)
        finally:
            if commit is not None:
                subprocess.run(["git", "-C", str(_bench.REPO), "worktree", "remove", "--force", str(tree)], check=True)
        record = load_record(folder / "run.npz")
    part = f"--before-commit {commit}" if commit is not None else f"--reference-tol {multitask_tol:g}"
    record["command"] = f"{_bench.command()} (its {part} fit, in a child process)"
    if commit is not None:
        record["version"] = f"git {str(record['version']).split('(')[-1].rstrip(')')}"
    return record


def differing_knees(groups, first, second, among=None):
    """The layers (of ``among``, default all) where two run records' knees select different numbers of filters."""
    return [
        str(g) for g, a, b in zip(groups, first["knee_n_selected"], second["knee_n_selected"])
        if a != b and (among is None or g in among)
    ]


def knee_agreement(groups, first, second, among=None):
    """'n_selected equal in K of N layers (differ: ...)' for the knees of two run records, on the
    layers ``among`` (default all)."""
    differing = differing_knees(groups, first, second, among)
    n_layers = len(groups) if among is None else len(among)
    return f"n_selected equal in {n_layers - len(differing)} of {n_layers} layers" + (
        f" (differ: {', '.join(differing)})" if differing else ""
    )


def section_blocks(X, y, after, before, case, references=()):
    """Markdown of P2c: the run ``after`` and, when given, ``before`` (run records) against it, and
    the knees of both against the ``references`` (runs at tight tolerances)."""
    groups = after["knee_group"]
    blocks = [
        f"`LassoFilterSelector(random_state=0).fit` (gamma 0.01, 100 alphas, one validation split, n_jobs=None) on "
        f"{case}: {len(groups)} groups, {X.shape[1]} features, {X.shape[0]} samples, {len(np.unique(y))} classes "
        "(the multi-task path). Median fit times; load average when the run ended, on "
        f"{os.cpu_count()} cpus (CPU seconds of the process are steadier than wall seconds on a shared machine).",
        "",
        "| library | multi-task tol | fits | wall s | CPU s | load average |",
        "|---|---|---|---|---|---|",
    ]
    named_references = [(f"reference {i + 1}" if len(references) > 1 else "reference", r) for i, r in enumerate(references)]
    runs = named_references + [(name, record) for name, record in (("before", before), ("after", after)) if record is not None]
    for name, record in runs:
        blocks.append(
            f"| {name}: {record['version']} | {tolerance(record)} | {int(record['repeats'])} | "
            f"{float(record['wall']):.1f} | {float(record['cpu']):.1f} | {float(record['load']):.1f} |"
        )
    blocks.append("")
    blocks += [f"- {name.capitalize()}: `{record['command']}`." for name, record in runs]
    blocks.append("")
    disagreeing = {g for (_, first), (_, second) in itertools.combinations(named_references, 2)
                   for g in differing_knees(groups, first, second)}
    determined = [g for g in groups if g not in disagreeing]
    if disagreeing:
        blocks.append(
            f"- Knees that differ between the references: {', '.join(str(g) for g in groups if g in disagreeing)}: "
            "not determined at these tolerances; the runs are compared with the references on the other layers."
        )
    for name, record in runs[len(named_references):]:
        for reference_name, reference in named_references:
            label = "the reference" if len(references) == 1 else reference_name
            blocks.append(
                f"- Knees of {name} against {label} (tol {tolerance(reference)}): "
                f"{knee_agreement(groups, reference, record, determined)}."
            )
    if named_references:
        blocks.append("")
    if before is not None:
        same_support = np.array_equal(before["knee_group"], groups) and np.array_equal(before["support"], after["support"])
        same_curves = np.array_equal(before["curve_n_selected"], after["curve_n_selected"])
        rmse_diff = float(np.max(np.abs(before["curve_rmse"] - after["curve_rmse"])))
        blocks += [
            f"- Speed-up: **{float(before['wall']) / float(after['wall']):.2f}x** in wall time, "
            f"**{float(before['cpu']) / float(after['cpu']):.2f}x** in CPU time.",
            f"- Knees: {knee_agreement(groups, before, after)}"
            + f"; support_ (the filters kept at every knee) {'identical' if same_support else 'DIFFERENT'}; "
            f"curves: n_selected at every alpha {'identical' if same_curves else 'DIFFERENT'}, "
            f"largest |RMSE difference| {rmse_diff:.2e}.",
            "",
        ]
    return blocks


def main(argv=None):
    parser = _bench.parser(__doc__)
    parser.set_defaults(threads=1)
    parser.add_argument("--case", type=Path, default=None, help=".npz of the pooled real case (built when absent)")
    parser.add_argument("--repeats", type=int, default=None, help="fits timed (the median is reported)")
    parser.add_argument("--save", type=Path, default=None, help="write this run's record (.npz)")
    parser.add_argument("--before", type=Path, default=None, help="a --save file of another version to compare with")
    parser.add_argument("--after", type=Path, default=None, help="a --save file to report instead of fitting")
    parser.add_argument("--reference", type=Path, nargs="+", default=[],
                        help="--save files (runs at tight tolerances) whose knees both runs are compared with")
    parser.add_argument("--before-commit", default=None, metavar="REV",
                        help="fit the before with the library of git revision REV (instead of --before)")
    parser.add_argument("--reference-tol", type=float, nargs="+", default=[], metavar="TOL",
                        help="fit references at these multi-task tolerances (besides any --reference)")
    parser.add_argument("--multitask-tol", type=float, default=None,
                        help="multi-task duality-gap tolerance of this run (default: the library's, 1e-6)")
    args = parser.parse_args(argv)
    if args.before is not None and args.before_commit is not None:
        parser.error("--before and --before-commit name the same run: give one")
    config = _bench.settings(args, FULL, QUICK)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", ConvergenceWarning)
    if args.multitask_tol is not None:
        sklearn_craft._lasso_path.MULTITASK_TOL = args.multitask_tol
    case_path = None
    if args.quick:
        (X, y), case = synthetic_case(), "a synthetic case"
    else:
        case_path = args.case or Path("/tmp/sklearn_craft_p2c_case.npz")
        (X, y), case = real_case(case_path, args.data_root), "MobileFaceNet's pooled responses over 450 FER2013 images"
    references = [load_record(path) for path in args.reference]
    references += [child_record(args, config["repeats"], case_path, multitask_tol=tol) for tol in args.reference_tol]
    before = load_record(args.before) if args.before is not None else None
    if args.before_commit is not None:
        before = child_record(args, config["repeats"], case_path, commit=args.before_commit)
    command = _bench.command()
    after = load_record(args.after) if args.after else run_record(*timed_fits(X, y, config["repeats"]), command)
    if args.save is not None:
        np.savez(args.save, **after)
    results = args.results or _bench.RESULTS / "multiclass.md"
    intro = "P2c: the multi-class path of LassoFilterSelector on real data, before and after a change."
    _bench.write_section(results, "LassoFilterSelector, multi-class path (P2c)", intro,
                         section_blocks(X, y, after, before, case, references), args.quick)


if __name__ == "__main__":
    main()
