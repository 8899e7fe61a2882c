"""Scaling: peak memory and wall time against the number of images, and a dask cluster.

S1 streams a synthetic Dataset of 3x112x96 images, generated on the fly from a seed per index
(nothing is held in memory), through a randomly initialised MobileFaceNet (all 50 convolutions,
9,792 filters) in one child process per (mode, n), and records the child's peak resident memory
(``ru_maxrss``) and wall time:

- ``select``: ``ActivationPooler.iter_transform`` batch by batch into
  ``LassoFilterSelector.partial_fit``, then the selection (the paths of every layer);
- ``pruner``: ``CraftPruner(streaming=True, finetune_params=None).fit`` on the Dataset
  (pooling and selection, satellites, surgery, BatchNorm re-estimation, the head's pooling).

The target is continuous: a random pattern mixed into every image with a weight drawn from the
same seed.

``--grid`` runs S2 instead, written to ``results/scale_grid.md``: a grid search over ``gamma``
(pipeline ActivationPooler -> LassoFilterSelector -> RidgeCV) in one process and on a dask
``LocalCluster`` of two worker processes, one thread each, on 300 and 1,500 images, with the
environment dask's nanny gives its workers and without its glibc trim threshold
(``MALLOC_TRIM_THRESHOLD_=65536``, which made the workers' forward passes twice as slow here).

``--large N`` runs S3 instead, written to ``results/scale_large.md``: one ``pruner`` fit on N
images (200,000 in the issue's case, CelebA's size) through MobileNet V1 (width 1, 27
convolutions, 10,944 filters: its pooled features of 200,000 images are 8.8 GB in float32)
at 32x32, where a forward pass costs 40x less than MobileFaceNet's at 112x96: the fit of 200,000
images took 6 minutes on one thread, where MobileFaceNet would take about 2 hours (37 ms per image
in S1's pruner fit of 10,000).

``--multiclass`` runs the multi-class path before and after instead (P2c, ``bench_multiclass.py``
on its real case, written to ``results/multiclass.md``): the library of e4cb6be (before the
multi-task Newton steps) against this one, and both against references at the tolerances 1e-8 and
1e-10, each fit in its own process.

``--quick`` runs tiny sizes (a smoke test of the script, not the benchmark).
"""

import argparse
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _bench
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

FULL = {"sizes": [1000, 10000, 50000], "pruner_sizes": [1000, 10000], "modes": ["select", "pruner"], "batch_size": 64,
        "grid_n": [300, 1500]}
QUICK = {"sizes": [24, 48], "pruner_sizes": [24, 48], "modes": ["select", "pruner"], "batch_size": 16, "grid_n": [60]}
#: Network and image shape of S1 and of the ``--large`` run (S3).
NETWORKS = {"mobilefacenet": (3, 112, 96), "mobilenet_v1": (3, 32, 32)}
#: The library before the multi-task path's Newton steps: the "before" of P2c.
MULTICLASS_BEFORE = "e4cb6be"


def network(name):
    from sklearn_craft.models import mobilefacenet, mobilenet_v1

    torch.manual_seed(0)
    if name == "mobilefacenet":
        return mobilefacenet().eval()
    return mobilenet_v1(num_classes=1, resolution_mult=NETWORKS[name][1] / 224).eval()


class SyntheticImages(Dataset):
    """``n`` images of ``shape`` generated from a seed per index, and a continuous target of each."""

    def __init__(self, n, shape):
        self.n = n
        self.shape = shape
        self.pattern = torch.rand(shape, generator=torch.Generator().manual_seed(10**9))

    def __len__(self):
        return self.n

    def target(self, index):
        return float(np.random.default_rng(index).normal())

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(int(index))
        return 0.5 * torch.rand(self.shape, generator=generator) + 0.25 * (1 + self.target(index)) * self.pattern


def child(mode, n, batch_size, name):
    """Run one measurement; print peak RSS (bytes), seconds and filters kept."""
    from sklearn_craft import CraftPruner
    from sklearn_craft.pooling import ActivationPooler
    from sklearn_craft.selection import LassoFilterSelector

    model = network(name)
    images = SyntheticImages(n, NETWORKS[name])
    y = np.array([images.target(i) for i in range(n)])
    start = time.perf_counter()
    if mode == "select":
        pooler = ActivationPooler(model, batch_size=batch_size).fit(images)
        groups = np.repeat(pooler.layers_, [pooler.n_channels_[layer] for layer in pooler.layers_])
        selector = LassoFilterSelector(groups=groups, alphas=20, random_state=0)
        done = 0
        for batch in pooler.iter_transform(images):
            selector.partial_fit(batch, y[done : done + len(batch)])
            done += len(batch)
        kept = int(selector.support_.sum())
    else:
        pruner = CraftPruner(
            model, gamma=0.05, finetune_params=None, batch_size=batch_size, random_state=0, streaming=True,
            selector_params={"alphas": 20},
        ).fit(images, y)
        kept = int(sum(len(keep) for keep in pruner.keep_.values()))
    seconds = time.perf_counter() - start
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, seconds, kept)


def measure(mode, n, batch_size, threads, name="mobilefacenet"):
    """One child process's measurement, as a row."""
    command = [sys.executable, __file__, "--child", mode, str(n), name, "--batch-size", str(batch_size),
               "--threads", str(threads)]
    peak, seconds, kept = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-3:]
    row = {"mode": mode, "n": n, "peak_rss_gb": int(peak) / 1e9, "wall_s": float(seconds),
           "ms_per_image": 1000 * float(seconds) / n, "filters_kept": int(kept)}
    print(row, flush=True)
    return row


def s1(sizes, pruner_sizes, modes, batch_size, threads, jobs=1):
    """The rows of S1, their child processes run ``jobs`` at a time (each on ``threads`` threads)."""
    runs = [(mode, n) for mode in modes for n in (pruner_sizes if mode == "pruner" else sizes)]
    # The largest first, so that the others share the machine with it rather than wait for it.
    order = sorted(runs, key=lambda run: -run[1])
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = dict(zip(order, pool.map(lambda run: measure(*run, batch_size, threads), order)))
    return pd.DataFrame([rows[run] for run in runs])


#: What dask's nanny sets in its workers' environment by default, less glibc's trim threshold
#: (``MALLOC_TRIM_THRESHOLD_=65536``), which returns freed memory to the system at once: the
#: activations a forward pass allocates and frees then fault their pages in again, batch after batch.
WORKER_ENVIRON = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}


def s2(n, threads):
    """Seconds of a grid search in one process and on LocalCluster(2), with dask's worker environment
    and with :data:`WORKER_ENVIRON`, and whether the scores are the same everywhere."""
    import dask
    import distributed
    import joblib
    from sklearn.base import clone
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    from sklearn_craft.pooling import ActivationPooler
    from sklearn_craft.selection import LassoFilterSelector
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU())
    images = SyntheticImages(n, NETWORKS["mobilefacenet"])
    X = torch.stack([images[i] for i in range(n)]).numpy()
    y = np.array([images.target(i) for i in range(n)])
    search = GridSearchCV(
        make_pipeline(ActivationPooler(model), LassoFilterSelector(alphas=20, random_state=0), RidgeCV()),
        {"lassofilterselector__gamma": [0.001, 0.01, 0.1, 0.3]},
        cv=3,
        n_jobs=-1,
    )
    start = time.perf_counter()
    scores = [clone(search).set_params(n_jobs=1).fit(X, y).cv_results_["mean_test_score"]]
    row = {"n": n, "one_process_s": time.perf_counter() - start}
    for column, environ in [("cluster_s", None), ("cluster_no_trim_s", WORKER_ENVIRON)]:
        settings = {} if environ is None else {"distributed.nanny.pre-spawn-environ": environ}
        # The nanny writes its workers' variables into this process's environment, where the next
        # cluster's nanny would find them (they take precedence over its configuration).
        saved = dict(os.environ)
        with dask.config.set(settings):
            cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                               dashboard_address=None)
        os.environ.clear()
        os.environ.update(saved)
        with cluster, distributed.Client(cluster) as client:
            # Each worker imports torch and the library when its first task arrives; a deployed cluster
            # has done so long before a search, so the import is left out of the time, as start-up is.
            client.run(__import__, "sklearn_craft.pruner")
            start = time.perf_counter()
            with joblib.parallel_config(backend="dask"):
                scores.append(clone(search).fit(X, y).cv_results_["mean_test_score"])
            row[column] = time.perf_counter() - start
    row["same_scores"] = all(np.array_equal(scores[0], other) for other in scores[1:])
    return row


def grid(args, config):
    """S2, written to ``results/scale_grid.md``."""
    frame = pd.DataFrame([s2(n, args.threads) for n in config["grid_n"]])
    frame["speed_up"] = frame["one_process_s"] / frame["cluster_no_trim_s"]
    lines = [
        "A pipeline ActivationPooler -> LassoFilterSelector -> RidgeCV on a 2-convolution network, 4 gammas x 3 "
        "folds on n images, in one process (n_jobs=1, "
        f"{args.threads} torch thread(s)) and on LocalCluster(n_workers=2, threads_per_worker=1) through joblib's "
        "dask backend: cluster_s with the environment dask's nanny gives its workers, cluster_no_trim_s without its "
        "MALLOC_TRIM_THRESHOLD_=65536 (the other variables kept); cluster start-up and the workers' first import of "
        "torch and sklearn_craft are left out. same_scores: the mean test scores of all three are equal exactly; "
        "speed_up: one process / cluster_no_trim_s.",
        "",
        _bench.table(frame.set_index("n"), floatfmt=".3g"),
    ]
    results = args.results or _bench.RESULTS / "scale_grid.md"
    intro = "A grid search over gamma in one process and on a dask LocalCluster of two workers."
    _bench.write_section(results, "Scaling: a grid search on a dask cluster", intro, lines, args.quick)


def main(argv=None):
    parser = _bench.parser(__doc__, real_data=False)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="numbers of images of S1 (select)")
    parser.add_argument("--pruner-sizes", type=int, nargs="+", default=None, help="numbers of images of S1 (pruner)")
    parser.add_argument("--modes", nargs="+", choices=["select", "pruner"], default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1,
                        help="S1's child processes run at once (peak RSS is each child's own; wall times share the cpus)")
    parser.add_argument("--grid", action="store_true", help="run S2 only: a grid search on a dask cluster")
    parser.add_argument("--grid-n", type=int, nargs="+", default=None, help="images of the S2 grid searches")
    parser.add_argument("--large", type=int, default=None, metavar="N",
                        help="run S3 only: one pruner fit on N images (MobileNet V1 at 32x32)")
    parser.add_argument("--multiclass", action="store_true",
                        help="run P2c only: the multi-class path before (e4cb6be) and after (bench_multiclass.py)")
    parser.add_argument("--data-root", type=Path, default=_bench.REPO.parent / "shared" / "data",
                        help="folder of ../shared/data (the real case of --multiclass)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = _bench.settings(args, FULL, QUICK)
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], int(args.child[1]), config["batch_size"], args.child[2])
        return
    if args.large is not None:
        s3(args, config)
        return
    if args.grid:
        grid(args, config)
        return
    if args.multiclass:
        import bench_multiclass

        bench_multiclass.main(
            ["--before-commit", MULTICLASS_BEFORE, "--reference-tol", "1e-8", "1e-10", "--threads", str(args.threads),
             "--data-root", str(args.data_root)]
            + ["--quick"] * args.quick + ["--results", str(args.results)] * (args.results is not None)
        )
        return
    results = args.results or _bench.RESULTS / "scale.md"
    frame = s1(config["sizes"], config["pruner_sizes"], config["modes"], config["batch_size"], args.threads, args.jobs)
    lines = [
        "### S1: peak memory and wall time against n (streaming)",
        "",
        "MobileFaceNet (random weights, 50 convolutions, 9,792 filters), synthetic 3x112x96 "
        f"images generated per index, batches of {config['batch_size']}, {args.threads} torch thread(s), "
        "LASSO paths of 20 alphas per layer. Peak RSS is the child process's ``ru_maxrss`` (model, "
        "Python, torch and the libraries included)"
        + (f"; {args.jobs} child processes ran at once, the largest first, so wall times include their sharing "
           f"of the {os.cpu_count()} cpus." if args.jobs > 1 else "."),
        "",
        _bench.table(frame.set_index(["mode", "n"]), floatfmt=".3g"),
    ]
    intro = "Peak memory and wall time of streaming selection and pruning against the number of images."
    _bench.write_section(results, "Scaling: streaming memory", intro, lines, args.quick)


def s3(args, config):
    """One ``CraftPruner`` fit on ``args.large`` images of MobileNet V1 at 32x32."""
    name, shape = "mobilenet_v1", NETWORKS["mobilenet_v1"]
    model = network(name)
    n_filters = sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    row = measure("pruner", args.large, config["batch_size"], args.threads, name)
    dense_gb = args.large * n_filters * 4 / 1e9
    lines = [
        f"MobileNet V1 (width 1, random weights, {n_filters:,} filters), synthetic {shape[0]}x{shape[1]}x{shape[2]} "
        f"images generated per index, batches of {config['batch_size']}, {args.threads} torch thread(s), "
        "``CraftPruner(streaming=True, finetune_params=None, selector_params={'alphas': 20})``. Its pooled "
        f"features of {args.large:,} images would take {dense_gb:.1f} GB in float32 ({2 * dense_gb:.1f} GB in "
        "float64); the streaming fit never holds them.",
        "",
        _bench.table(pd.DataFrame([row]).set_index(["mode", "n"]), floatfmt=".3g"),
    ]
    results = args.results or _bench.RESULTS / "scale_large.md"
    intro = "Peak memory of one streaming CraftPruner fit on many images (the budget: 4 GB for CelebA's 200,000)."
    _bench.write_section(results, f"Scaling: one CraftPruner fit on {args.large:,} images", intro, lines, args.quick)


if __name__ == "__main__":
    main()
