"""Benchmarks of ActivationPooler: P1 (throughput against a bare forward pass) and P5 (peak memory).

P1  pooler throughput / bare forward throughput, same model, images and batch size; goal >= 0.90,
    measured as the median ratio over back-to-back pairs of runs (robust to a shared machine).
    Two models: VGG16 with its classifier (the pooler stops after the last pooled conv, as in
    real use) and its convolutional trunk alone (nothing to skip: the cost of hooks, input
    conversion and the output matrix). The bare forward pass gets ready float32 tensors.
P5  peak resident memory (VmHWM) while pooling 112x112 images through VGG16 (13 convs, widths
    64,64,128,128,256x3,512x6, all pooled); goal <= 1.5 GB for 20 000 images. Images come from
    a Dataset that draws each one on demand, so the input does not occupy memory. Each run is a
    fresh process: the same images through the bare network and through the pooler (their
    difference is the pooler's own memory), then a pooled run on 20 000 images.

--quick: VGG16 at width x0.0625 for both, 2 pairs of one batch of 8 for P1, batch 8 and 16 / 32
images for P5: a smoke run of the whole script, not a measurement.
Run: python benchmarks/bench_pooler.py [--quick] [--p1-width-mult 0.25] [--p5-batch-sizes 64 32] [--p5-images 20000]
Writes benchmarks/results/pooler.md (or --results PATH).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import _bench
from sklearn_craft.images import iter_batches
from sklearn_craft.models import vgg16
from sklearn_craft.pooling import ActivationPooler

SIZE = 112
GB = 1024**3  # GiB: the goal's 1.5 GB is read as 1.5 * 2**30 bytes
FULL = dict(p1_width_mult=0.25, p1_pairs=30, p5_width_mult=1.0, p5_batch_sizes=(64, 32), p5_control=2000,
            p5_images=20_000, batch_size=64)
QUICK = dict(p1_width_mult=0.0625, p1_pairs=2, p5_width_mult=0.0625, p5_batch_sizes=(8,), p5_control=16,
             p5_images=32, batch_size=8)


class DrawnImages(Dataset):
    """uint8 H×W×C images drawn on demand from a per-index seed (nothing held in memory)."""

    def __init__(self, n_images):
        self.n_images = n_images

    def __len__(self):
        return self.n_images

    def __getitem__(self, index):
        rng = np.random.default_rng(index)
        return rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


def bare_forward(model, batches):
    with torch.inference_mode():
        for batch in batches:
            model(batch)


def p1(width_mult, batch_size, pairs):
    """Paired timings of one batch: the pooler and the bare forward pass run back to back.

    Each pair gives a ratio bare / pooler measured under the same machine load, which cancels
    the drift of load from other jobs; the median over pairs is the result.
    """
    torch.manual_seed(0)
    full = vgg16(input_size=SIZE, width_mult=width_mult).eval()
    images = torch.rand(batch_size, 3, SIZE, SIZE)
    array = images.numpy()
    rows = []
    for label, model in (("VGG16 with classifier", full), ("VGG16 conv trunk only", full.features)):
        pooler = ActivationPooler(model, batch_size=batch_size).fit(images[:1])
        pooler.transform(array)  # warm-up of both paths
        bare_forward(model, [images])
        seconds = {"pooler": [], "bare": []}
        for pair in range(pairs):
            # Alternating the order within pairs spreads any first/second bias over both.
            for name in ("pooler", "bare") if pair % 2 == 0 else ("bare", "pooler"):
                start = time.perf_counter()
                if name == "pooler":
                    pooler.transform(array)
                else:
                    bare_forward(model, [images])
                seconds[name].append(time.perf_counter() - start)
        ratios = np.array(seconds["bare"]) / np.array(seconds["pooler"])
        quartiles = np.percentile(ratios, [25, 50, 75])
        throughput = {name: batch_size / statistics.median(times) for name, times in seconds.items()}
        rows.append((label, len(pooler.layers_), throughput, quartiles))
    return rows


def vm_hwm_bytes():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def vgg16_size(width_mult):
    """Parameters, filters of the first convolution and filters of all 13 of VGG16 at 112x112."""
    model = vgg16(input_size=SIZE, width_mult=width_mult)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return sum(p.numel() for p in model.parameters()), convs[0].out_channels, sum(c.out_channels for c in convs)


def p5_child(mode, n_images, batch_size, width_mult):
    """Run ``n_images`` drawn images through VGG16, pooled ("pool") or not ("bare").

    The bare run feeds the same batches (same conversion, same Dataset) to the network without
    hooks: the difference of the peaks is the pooler's own memory. Prints the peak memory before
    and after, and the seconds.
    """
    torch.manual_seed(0)
    model = vgg16(input_size=SIZE, width_mult=width_mult).eval()
    dataset = DrawnImages(n_images)
    pooler = ActivationPooler(model, batch_size=batch_size).fit(dataset)
    before = vm_hwm_bytes()
    start = time.perf_counter()
    if mode == "pool":
        assert pooler.transform(dataset).shape == (n_images, pooler.n_features_out_)
    else:
        bare_forward(model, iter_batches(dataset, batch_size))
    print(before, vm_hwm_bytes(), time.perf_counter() - start)


def p5(batch_size, n_control, n_long, width_mult, threads, row_bytes):
    """Bare and pooled runs on ``n_control`` images, and a pooled run on ``n_long`` images.

    Returns the runs and the peak for 20 000 images: measured when ``n_long`` is 20 000, else
    the long run's peak plus the output rows (``row_bytes`` each) of the remaining images.
    """
    runs = []
    for mode, n_images in (("bare", n_control), ("pool", n_control), ("pool", n_long)):
        command = [sys.executable, __file__, "--p5-child", mode, str(n_images), "--batch-size", str(batch_size),
                   "--p5-width-mult", str(width_mult), "--threads", str(threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
        before, peak, seconds = int(output[0]), int(output[1]), float(output[2])
        runs.append((batch_size, mode, n_images, before, peak, seconds))
        print(
            f"P5 batch {batch_size}, {mode} {n_images} images: peak {peak / GB:.3f} GB "
            f"(before {before / GB:.3f} GB), {seconds:.0f} s"
        )
    peak_long = runs[-1][4]
    return runs, peak_long + row_bytes * max(20_000 - n_long, 0)


def main(argv=None):
    parser = _bench.parser(__doc__, real_data=False)
    parser.add_argument("--p1-width-mult", type=float, default=None)
    parser.add_argument("--p1-pairs", type=int, default=None)
    parser.add_argument("--p5-width-mult", type=float, default=None, help="VGG16 width of P5 (full size: 1)")
    parser.add_argument("--p5-batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--p5-control", type=int, default=None, help="images of the bare / pooled pair")
    parser.add_argument("--p5-images", type=int, default=None, help="images of the long pooled run")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--p5-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = _bench.settings(args, FULL, QUICK)
    torch.set_num_threads(args.threads)
    if args.p5_child:
        p5_child(args.p5_child[0], int(args.p5_child[1]), config["batch_size"], config["p5_width_mult"])
        return
    results = args.results or _bench.RESULTS / "pooler.md"

    rows = p1(config["p1_width_mult"], config["batch_size"], config["p1_pairs"])
    load = os.getloadavg()[0]
    for label, _, throughput, (low, ratio, high) in rows:
        print(
            f"P1 {label}: pooler {throughput['pooler']:.1f} img/s, bare {throughput['bare']:.1f} img/s; "
            f"paired ratio median {ratio:.3f} (quartiles {low:.3f}-{high:.3f})"
        )
    p5_parameters, first_maps, n_features = vgg16_size(config["p5_width_mult"])
    row_bytes = 4 * n_features  # one image's pooled features, float32
    p5_results = [
        p5(batch_size, config["p5_control"], config["p5_images"], config["p5_width_mult"], args.threads, row_bytes)
        for batch_size in config["p5_batch_sizes"]
    ]
    first_maps_mb = first_maps * SIZE * SIZE * 4 * max(config["p5_batch_sizes"]) / 1e6
    lines = [
        "### P1: pooler throughput / bare forward throughput (goal >= 0.90)",
        "",
        f"VGG16 layout at width x{config['p1_width_mult']}, one batch of {config['batch_size']} random "
        "112x112 float32 images, all 13 convs pooled. The bare pass gets a ready tensor; the "
        "pooler converts a numpy array (its whole transform call is timed). The two run back to "
        f"back {config['p1_pairs']} times (order alternating); each pair gives a ratio bare / pooler "
        "under the same machine load.",
        "",
        f"Load average when P1 ended: {load:.1f} on {os.cpu_count()} cpus (other jobs shared the "
        "machine, hence paired measurements).",
        "",
        "| model | pooled layers | pooler img/s | bare img/s | paired ratio, median | quartiles | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, n_layers, throughput, (low, ratio, high) in rows:
        verdict = "pass" if ratio >= 0.90 else "FAIL"
        lines.append(
            f"| {label} | {n_layers} | {throughput['pooler']:.1f} | {throughput['bare']:.1f} "
            f"| {ratio:.3f} | {low:.3f}-{high:.3f} | {verdict} |"
        )
    lines += [
        "",
        "### P5: peak RSS pooling 112x112 images through VGG16 (goal <= 1.5 GB for 20 000 images)",
        "",
        f"VGG16 at width x{config['p5_width_mult']:g} (13 convs, {n_features} features, "
        f"{p5_parameters / 1e6:.0f} M parameters at 112x112), images drawn on "
        "demand by a Dataset; each run in a fresh process, VmHWM from /proc/self/status, GB = 2^30 "
        "bytes. 'Before' is after imports, model construction and fit. A 'bare' run feeds the same "
        "batches to the network without the pooler; pooled minus bare is the pooler's own memory, "
        f"to compare with its output ({row_bytes / 1024:.1f} KiB per image).",
        "",
        "| batch | run | images | peak before GB | peak after GB | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for runs, _ in p5_results:
        for batch_size, mode, n_images, before, peak, seconds in runs:
            lines.append(
                f"| {batch_size} | {mode} | {n_images} | {before / GB:.3f} | {peak / GB:.3f} | {seconds:.0f} |"
            )
    lines += [
        "",
        "| batch | pooler's own memory on the pair (pooled - bare) | its output | peak for 20 000 images "
        + ("(measured)" if config["p5_images"] >= 20_000
           else f"(projected: {config['p5_images']} images + output rows)")
        + " | goal |",
        "|---|---|---|---|---|",
    ]
    for runs, peak_20k in p5_results:
        (batch_size, _, n_control, _, bare, _), (_, _, _, _, pooled, _) = runs[:2]
        output_mib = n_control * row_bytes / 2**20
        verdict = "pass" if peak_20k <= 1.5 * GB else "FAIL"
        lines.append(
            f"| {batch_size} | {(pooled - bare) / 2**20:.0f} MiB | {output_mib:.0f} MiB "
            f"| {peak_20k / GB:.2f} GB | {verdict} |"
        )
    lines += [
        "",
        "The peak is made of the baseline (torch and the weights, the 'before' column), the "
        f"forward pass of one batch ({first_maps}-channel 112x112 maps are {first_maps_mb:.0f} MB per batch of "
        f"{max(config['p5_batch_sizes'])}; compare the bare runs) and the pooler's N×{n_features} float32 "
        f"output ({20_000 * row_bytes / GB:.2f} GB for 20 000 images).",
    ]
    intro = "Throughput (P1) and peak memory (P5) of `ActivationPooler` on VGG16."
    _bench.write_section(results, "ActivationPooler (P1, P5)", intro, lines, args.quick)


if __name__ == "__main__":
    main()
