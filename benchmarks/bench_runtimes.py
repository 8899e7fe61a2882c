"""P4 on several runtimes: the latency speed-up of pruned networks against their FLOPs cut, side by side.

The networks of ``bench_pruner.py``'s P4 (random-weight VGG16 and MobileNet V1, a random ~30 %,
~10 % and ~3 % of the filters of every coupled group kept, either head of CraftPruner) timed in
one run on each runtime: eager torch, torch with channels_last, ``torch.compile`` (inductor,
freezing; failures are reported), and onnxruntime (a file of ``export.save_onnx``, all graph
optimisations, 1 and 2 intra-op threads), at batch 1 and 8. Each round times every network of a
(model, head) group on every runtime in turn, so a change of the machine's load falls on all alike.

--quick: MobileNet V1 x0.125 at 64x64 with the satellite head, batch 1, one round: a smoke run of
minutes (compilation), not a measurement.
Run: python benchmarks/bench_runtimes.py [--quick] [--threads 1] [--results PATH]
Writes benchmarks/results/pruner_runtimes.md (and .csv beside it), or --results PATH.
"""

import copy
import os
import statistics
import tempfile
import time

import pandas as pd
import torch

import _bench
from bench_pruner import FRACTIONS, GOAL, variants
from sklearn_craft.export import save_onnx
from sklearn_craft.profiling import count_flops


RUNTIMES_FULL = dict(
    models=("vgg16", "mobilenet_v1"), heads=("satellite", "original"), size=112, width_mult=1.0, rounds=5,
    repeats=3, batches=(1, 8)
)
RUNTIMES_QUICK = dict(
    models=("mobilenet_v1",), heads=("satellite",), size=64, width_mult=0.125, rounds=1, repeats=1, batches=(1,)
)
RUNTIMES = ("eager", "channels_last", "compile", "onnxruntime 1 thread", "onnxruntime 2 threads")


def _torch_runner(model, runtime):
    """``(run, prepare)``: a function of the prepared input, and how to prepare a batch for it."""
    if runtime == "eager":
        return model, lambda x: x
    if runtime == "channels_last":
        return copy.deepcopy(model).to(memory_format=torch.channels_last), lambda x: x.contiguous(
            memory_format=torch.channels_last
        )
    # Freezing (weights as constants: BatchNorm folded, weights pre-packed) is inductor's setting for
    # CPU inference; dynamic=False compiles kernels for each batch size, as a deployed model would.
    return torch.compile(model, dynamic=False, options={"freezing": True}), lambda x: x


def _onnx_runner(path, threads):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return (lambda x: session.run(["output"], {"input": x})), (lambda x: x.numpy())


def _runners(networks, runtime, shape, folder):
    """One runner per network for ``runtime``, or the reason it could not be built."""
    runners = []
    for index, network in enumerate(networks):
        try:
            if runtime.startswith("onnxruntime"):
                path = os.path.join(folder, f"network{index}.onnx")
                if not os.path.exists(path):
                    save_onnx(network, path, input_shape=shape)
                runners.append(_onnx_runner(path, int(runtime.split()[1])))
            else:
                runners.append(_torch_runner(network, runtime))
        except Exception as exc:  # any failure of an exporter or compiler is a result to report
            return _failure(exc)
    return runners


def _failure(exc):
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _time_runtimes(built, shape, batch, rounds, repeats):
    """Median seconds per example of every network on every runtime, and the first-call seconds.

    Each round times every network on every runtime in turn (the median of ``repeats`` passes),
    so a change of the machine's load falls on all of them alike; the result is the median over
    rounds. A runtime whose first call fails (``torch.compile`` compiles then) is left out.
    """
    x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(0))
    inputs, first_call, failures = {}, {}, {}
    for runtime, runners in built.items():
        try:
            inputs[runtime] = [prepare(x) for _, prepare in runners]
            first_call[runtime] = []
            for (run, _), x_prepared in zip(runners, inputs[runtime]):
                start = time.perf_counter()
                run(x_prepared)
                first_call[runtime].append(time.perf_counter() - start)
        except Exception as exc:  # a compiler failing on its first call is a result to report
            failures[runtime] = _failure(exc)
            inputs.pop(runtime)
    per_round = {runtime: [[] for _ in built[runtime]] for runtime in inputs}
    for _ in range(rounds):
        for runtime, prepared in inputs.items():
            for index, ((run, _), x_prepared) in enumerate(zip(built[runtime], prepared)):
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    run(x_prepared)
                    times.append(time.perf_counter() - start)
                per_round[runtime][index].append(statistics.median(times))
    seconds = {runtime: [statistics.median(t) / batch for t in rounds_] for runtime, rounds_ in per_round.items()}
    return seconds, first_call, failures


def runtime_rows(config):
    """Latency per example of every P4 network on every runtime, and the failures."""
    shape = (3, config["size"], config["size"])
    example = torch.zeros(1, *shape)
    rows, failures = [], []
    for name in config["models"]:
        for head, model, pruned_models in variants(name, example, config["width_mult"]):
            if head not in config["heads"]:
                continue
            networks = [model, *pruned_models]
            flops = [count_flops(network, shape) for network in networks]
            with tempfile.TemporaryDirectory() as folder:
                built = {}
                for runtime in RUNTIMES:
                    runners = _runners(networks, runtime, shape, folder)
                    if isinstance(runners, str):
                        failures.append((name, head, runtime, "build", runners))
                        print(f"{name} {head} {runtime}: {runners}", flush=True)
                    else:
                        built[runtime] = runners
                for batch in config["batches"]:
                    # Compiled code of other networks and batch sizes would count against dynamo's recompile limit.
                    torch.compiler.reset()
                    with torch.inference_mode():
                        seconds, first_call, failed = _time_runtimes(
                            built, shape, batch, config["rounds"], config["repeats"]
                        )
                    for runtime, reason in failed.items():
                        failures.append((name, head, runtime, f"batch {batch}", reason))
                        print(f"{name} {head} {runtime} batch {batch}: {reason}", flush=True)
                    for runtime, latencies in seconds.items():
                        for index, (fraction, latency) in enumerate(zip((1.0, *FRACTIONS), latencies)):
                            rows.append(
                                {
                                    "model": name,
                                    "head": head,
                                    "target": fraction,
                                    "runtime": runtime,
                                    "batch": batch,
                                    "flops_ratio": flops[0] / flops[index],
                                    "latency_ms": latency * 1e3,
                                    "speed_up": latencies[0] / latency,
                                    "first_call_s": first_call[runtime][index],
                                }
                            )
                        print(
                            f"{name} {head} {runtime} batch {batch}: "
                            + ", ".join(f"{s * 1e3:.3g}" for s in latencies)
                            + " ms/image",
                            flush=True,
                        )
                del built
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["ratio"] = frame["speed_up"] / frame["flops_ratio"]
    return frame, failures


def runtimes_section(config, threads, quick, results):
    """Run the side-by-side runtime comparison of P4 and write its section."""
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    frame, failures = runtime_rows(config)
    load_after = os.getloadavg()
    pruned = frame[frame["target"] < 1].copy()
    pruned["target"] = pruned["target"].map("{:.0%}".format)
    configuration = ["model", "head", "target", "batch"]
    measured = [runtime for runtime in RUNTIMES if runtime in set(pruned["runtime"])]
    ratios = pruned.pivot_table(index=configuration, columns="runtime", values="ratio", sort=False)[measured]
    ratios.insert(0, "FLOPs ratio", pruned.groupby(configuration, sort=False)["flops_ratio"].first())
    latency = frame.assign(network=frame["target"].map(lambda t: "original" if t == 1 else f"pruned {t:.0%}"))
    latency = latency.pivot_table(
        index=["model", "head", "network", "batch"], columns="runtime", values="latency_ms", sort=False
    )[measured]
    best = pruned.loc[pruned.groupby("runtime")["ratio"].idxmax()].set_index("runtime").loc[measured]
    first_call = frame.groupby("runtime")["first_call_s"].agg(["median", "max"]).loc[measured]
    reached = pruned[pruned["ratio"] >= GOAL]
    blocks = [
        f"### P4 by runtime: speed-up / FLOPs ratio (goal >= {GOAL})",
        "",
        f"The networks of P4 (random-weight {' and '.join(config['models'])} x{config['width_mult']:g} at "
        f"{config['size']}x{config['size']}, {' and '.join(config['heads'])} head, "
        f"{', '.join(f'{f:.0%}' for f in FRACTIONS)} of the filters of every coupled group kept) on each "
        "runtime: `eager` (torch, NCHW), `channels_last` (model and input in torch.channels_last), "
        "`compile` (`torch.compile(dynamic=False, options={'freezing': True})`, inductor, one compilation "
        "per batch size), `onnxruntime k thread(s)` (the file written by `sklearn_craft.export.save_onnx`, "
        "`ORT_ENABLE_ALL` graph optimisations, k intra-op threads, sequential execution). torch runs on "
        f"{threads} thread(s). Latency per image: median over {config['rounds']} rounds, each timing every "
        "network of a (model, head) group on every runtime in turn (the median of "
        f"{config['repeats']} passes), after one untimed pass. Load average (1, 5, 15 min) before: "
        f"{', '.join(f'{v:.1f}' for v in load_before)}; after: {', '.join(f'{v:.1f}' for v in load_after)}, "
        f"on {os.cpu_count()} cpus shared with other jobs.",
        "",
        "Speed-up of the pruned network over the original on the same runtime, divided by the FLOPs ratio:",
        "",
        _bench.table(ratios, floatfmt=".2f"),
        "",
        "Latency, ms per image:",
        "",
        _bench.table(latency, floatfmt=".3g"),
        "",
        "First (untimed) call per network and batch size, which compiles (`compile`) or plans the graph: "
        + "; ".join(
            f"{runtime} median {median:.2f} s, max {most:.2f} s" for runtime, (median, most) in first_call.iterrows()
        )
        + ".",
        "",
        "Best ratio per runtime: "
        + "; ".join(
            f"{runtime} {row.ratio:.2f} ({row.model}, {row.head} head, {row.target}, batch {row.batch})"
            for runtime, row in zip(best.index, best.itertuples())
        )
        + ".",
        "",
    ]
    if failures:
        blocks += ["Failures:", ""]
        blocks += [f"- {model} ({head} head), {runtime}, {stage}: `{reason}`" 
                   for model, head, runtime, stage, reason in failures]
        blocks.append("")
    if len(reached):
        where = "; ".join(
            f"{row.runtime} ({row.model}, {row.head} head, {row.target}, batch {row.batch}: {row.ratio:.2f})"
            for row in reached.itertuples()
        )
        blocks.append(f"**{len(reached)} of {len(pruned)} configurations reach {GOAL}:** {where}.")
    else:
        blocks.append(f"**None of the {len(pruned)} configurations reaches {GOAL} on any runtime.**")
    frame.to_csv(results.with_suffix(".csv"), index=False)
    intro = "P4 (latency speed-up against FLOPs cut of pruned networks) remeasured on several runtimes in one run."
    _bench.write_section(results, "CraftPruner on other runtimes (P4)", intro, blocks, quick)


def main(argv=None):
    parser = _bench.parser(__doc__, real_data=False)
    parser.set_defaults(threads=1)
    args = parser.parse_args(argv)
    config = RUNTIMES_QUICK if args.quick else RUNTIMES_FULL
    results = args.results or _bench.RESULTS / "pruner_runtimes.md"
    runtimes_section(config, args.threads, args.quick, results)


if __name__ == "__main__":
    main()
