"""Cost of a network: parameters, size in bytes, FLOPs and CPU latency, and an original-vs-pruned report.

FLOPs are counted as the ETL paper counts them (section 4.1): the number of multiplications of
one forward pass of one example, ``o x i x k x k x w x h`` for a convolution with ``o`` output
and ``i`` input channels, a ``k x k`` kernel and a ``w x h`` output map (``i`` is divided by the
number of groups, so a depthwise convolution costs ``o x k x k x w x h``), and
``n_input x n_output`` for a Linear layer. Additions, biases, normalisation, activations and
pooling are not counted. ``torch.utils.flop_counter.FlopCounterMode`` counts the operations
(twice these numbers: one multiply-add is two FLOPs there), so a convolution or matrix product
is counted whether a layer module, a function called in ``forward`` or a node of an exported
graph computes it.

Every function takes ``input_shape``, the shape of one example without the batch dimension,
e.g. ``(3, 224, 224)`` for an RGB image; one the model cannot run on (given with its batch
dimension, say) is a ``ValueError`` naming it. Models are never modified: each submodule's training
flag is restored and no hook is left behind.
"""

import statistics
import time
from contextlib import contextmanager
from itertools import chain
from numbers import Integral

import pandas as pd
import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .inspection import _check_model, _evaluating, _input_dtype, _leaves, _runs_on
from .surgery import channel_readers, coupled_groups

__all__ = ["compare_models", "count_flops", "count_parameters", "filter_flops", "measure_latency", "model_size_bytes"]


def _check_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_input_shape(input_shape):
    """``input_shape`` as a tuple of ints >= 1 (the shape of one example, no batch dimension)."""
    if not isinstance(input_shape, (tuple, list, torch.Size)) or not input_shape:
        raise TypeError(f"input_shape must be a non-empty tuple of ints such as (3, 224, 224), got {input_shape!r}")
    if any(isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in input_shape):
        raise ValueError(f"input_shape must hold positive ints (no batch dimension), got {input_shape!r}")
    return tuple(int(s) for s in input_shape)


def _check_on_cpu(model):
    devices = {t.device.type for t in chain(model.parameters(), model.buffers())}
    if devices - {"cpu"}:
        raise ValueError(f"model must be on the CPU for latency measurement, got tensors on {sorted(devices)}")


def count_parameters(model):
    """Number of parameters of ``model`` (shared parameters counted once).

    Parameters
    ----------
    model : torch.nn.Module
        The network.

    Returns
    -------
    n_parameters : int
        Total number of elements of its parameters, trainable or not.

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_craft.profiling import count_parameters
    >>> count_parameters(nn.Linear(10, 3))  # 10 x 3 weights + 3 biases
    33
    """
    _check_model(model)
    return sum(p.numel() for p in model.parameters())


def model_size_bytes(model):
    """Bytes taken by the parameters and buffers of ``model`` (its state dict without metadata).

    The ETL paper's *size* counts parameters only; buffers (batch-norm running statistics) are
    included here because they are stored and loaded with the model too.

    Parameters
    ----------
    model : torch.nn.Module
        The network.

    Returns
    -------
    size : int
        Sum over parameters and buffers of ``numel * element_size`` (shared tensors counted once).

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_craft.profiling import model_size_bytes
    >>> model_size_bytes(nn.BatchNorm2d(4))  # 4 weights, 4 biases, 2 x 4 statistics (float32), 1 int64 counter
    72
    """
    _check_model(model)
    return sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers()))


def _output_shape(output):
    return tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None


@contextmanager
def _counting_module_calls(model, counter, rows):
    """Append a row per leaf-module call, and per other call that computes FLOPs outside its children.

    Each call is charged the FLOPs ``counter`` saw between its forward pre-hook and its forward
    hook, less those of the module calls nested in it; a container therefore gets a row only
    when its own ``forward`` computes something (a function called on a parameter, say).
    """
    leaves = {id(module) for _, module in _leaves(model)}
    open_calls = []

    def enter(module, args):
        open_calls.append([counter.get_total_flops(), 0])

    def leave(name, module, output):
        start, nested = open_calls.pop()
        spent = counter.get_total_flops() - start
        if open_calls:
            open_calls[-1][1] += spent
        if id(module) in leaves or spent > nested:
            rows.append((name, type(module).__name__, _output_shape(output), (spent - nested) // 2))

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(lambda m, args, output, name=name: leave(name, m, output)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _NodeCounter(torch.fx.Interpreter):
    """Runs a graph node by node, appending a row per function or method node with its FLOPs.

    A node traced by ``torch.export`` records the module it came from (``nn_module_stack``): its
    row is named after that layer of the original network; other nodes by their own name.
    """

    def __init__(self, module, counter, rows):
        super().__init__(module)
        self.counter, self.rows = counter, rows

    def run_node(self, node):
        if node.op not in ("call_function", "call_method"):
            return super().run_node(node)
        start = self.counter.get_total_flops()
        output = super().run_node(node)
        stack = node.meta.get("nn_module_stack")
        layer = next(reversed(stack.values()))[0] if stack else node.name
        operator = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        self.rows.append((layer, operator, _output_shape(output), (self.counter.get_total_flops() - start) // 2))
        return output


class _Forward(nn.Module):
    """The forward pass of ``model``, node by node when it is a graph, for ``torch.func.functional_call``."""

    def __init__(self, model, counter, rows):
        super().__init__()
        self.model = model
        self.counter, self.rows = counter, rows

    def forward(self, x):
        if isinstance(self.model, torch.fx.GraphModule):
            return _NodeCounter(self.model, self.counter, self.rows).run(x)
        return self.model(x)


def _flop_rows(model, input_shape):
    """``(layer, type, output_shape, flops)`` of one forward pass of one example, computing nothing when possible.

    The pass runs under ``FlopCounterMode`` on the meta device (shapes only), parameters and
    buffers being swapped for meta tensors with ``torch.func.functional_call``. Models that cannot
    run that way (``forward`` reads a tensor value, or uses a tensor that is neither a parameter
    nor a buffer) run once on a real zero input instead.
    """
    dtype = _input_dtype(model)
    meta_state = {
        f"model.{name}": torch.empty_like(t, device="meta")
        for name, t in chain(model.named_parameters(), model.named_buffers())
    }
    device = next((t.device for t in chain(model.parameters(), model.buffers())), torch.device("cpu"))
    for where, state in (("meta", meta_state), (device, {})):
        rows = []
        with FlopCounterMode(display=False) as counter, _counting_module_calls(model, counter, rows):
            x = torch.zeros((1, *input_shape), dtype=dtype, device=where)
            try:
                torch.func.functional_call(_Forward(model, counter, rows), state, (x,))
                return rows
            except (RuntimeError, NotImplementedError):
                if where != "meta":
                    _runs_on(model, x, "input_shape")  # a ValueError naming input_shape when that is the cause
                    raise


def count_flops(model, input_shape, by_layer=False):
    """Multiplications of one forward pass of one example, as counted in the ETL paper.

    Convolutions cost ``out_channels x in_channels / groups x prod(kernel_size) x prod(output
    map)`` (transposed ones ``in_channels x out_channels / groups x prod(kernel_size) x
    prod(input map)``), Linear layers and other matrix products ``in_features x out_features``
    per output row; every other operation costs 0. The operations are counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (its FLOPs divided by 2), wherever they run: in
    layer modules, in functions called inside ``forward``, or in the graph of a model loaded with
    :func:`~sklearn_craft.export.load_model`.

    Parameters
    ----------
    model : torch.nn.Module
        The network (its training flags are restored afterwards).
    input_shape : tuple of int
        Shape of one example without the batch dimension, e.g. ``(3, 224, 224)``.
    by_layer : bool, default=False
        Return the per-layer table instead of the total.

    Returns
    -------
    flops : int or pandas.DataFrame
        The total; or, when ``by_layer=True``, a table in forward order with columns ``layer``,
        ``type``, ``output_shape`` (without the batch dimension; None when the output is not a
        tensor) and ``flops``, whose ``flops`` column sums to the total. It has one row per call
        of a leaf module (``layer`` is its name, ``type`` its class name), one per other module
        call whose own ``forward`` computes FLOPs outside its submodules, and, when ``model`` is
        a ``torch.fx.GraphModule``, one per function or method node of its graph (``type`` is
        the operator; ``layer`` is the layer of the original network it was exported from, as
        in a model from :func:`~sklearn_craft.export.load_model`, or else the node's name).

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_craft.profiling import count_flops
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    >>> count_flops(model, (3, 4, 4))  # 8 x 3 x 3 x 3 x 4 x 4 + 128 x 2
    3712
    >>> count_flops(model, (3, 4, 4), by_layer=True)["flops"].tolist()
    [3456, 0, 0, 256]
    """
    _check_model(model)
    input_shape = _check_input_shape(input_shape)
    with _evaluating(model), torch.inference_mode():
        rows = _flop_rows(model, input_shape)
    if by_layer:
        return pd.DataFrame(rows, columns=["layer", "type", "output_shape", "flops"]).astype({"flops": "int64"})
    return sum(row[3] for row in rows)


def filter_flops(model, input_shape):
    """FLOPs one filter (output channel) of every convolution costs: what removing it saves.

    A filter of a convolution costs its own multiplications (its share of :func:`count_flops`'s
    for the layer), those of the depthwise convolutions that follow it (coupled to it, they lose
    the channel too, see :func:`~sklearn_craft.surgery.coupled_groups`) and, per input channel, those
    of the convolutions that read it (:func:`~sklearn_craft.surgery.channel_readers`), all at the
    network's present widths. A Linear layer reading a channel is not counted. A filter of a
    residual stream is only removed when every convolution of the stream drops it; each is priced
    as if alone. ``CraftPruner(knee="flops")`` prices the filters of its layers with it.

    Parameters
    ----------
    model : torch.nn.Module
        The network (not modified).
    input_shape : tuple of int
        Shape of one example without the batch dimension, e.g. ``(3, 112, 112)``.

    Returns
    -------
    flops : pandas.Series
        Convolution name -> FLOPs of one of its filters (float), every ``nn.Conv2d`` that runs
        on the input, in forward order.

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_craft.profiling import filter_flops
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> filter_flops(net, (3, 4, 4)).tolist()  # 3 x 3 x 3 x 16 + 4 x 16, then 8 x 16
    [496.0, 128.0]
    """
    _check_model(model)
    input_shape = _check_input_shape(input_shape)
    flops = count_flops(model, input_shape, by_layer=True).groupby("layer", sort=False)["flops"].sum()
    device = next((t.device for t in chain(model.parameters(), model.buffers())), torch.device("cpu"))
    example = torch.zeros((1, *input_shape), dtype=_input_dtype(model), device=device)
    groups, followers = coupled_groups(model, example, return_followers=True)
    readers = channel_readers(model, example)
    convs = {name: model.get_submodule(name) for name in readers}
    per_filter = {name: flops.get(name, 0) / conv.out_channels for name, conv in convs.items()}
    per_input = {name: flops.get(name, 0) / conv.in_channels for name, conv in convs.items()}
    cost = {}
    for group in groups:
        following = [name for name in group if name in followers]
        for name in group:
            cost[name] = (
                per_filter[name]
                + sum(per_filter[other] for other in following if other != name)
                + sum(per_input[reader] for reader in readers[name])
            )
    return pd.Series({name: float(cost[name]) for name in readers}, name="flops")


@contextmanager
def _num_threads(threads):
    """Temporarily set ``torch.set_num_threads(threads)`` (no change when None)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latency(model, input_shape, *, repeats=20, warmup=3, threads=None, batch_size=1):
    """Median CPU inference time per example, in seconds.

    The model runs in eval mode under ``torch.inference_mode()`` on a fixed random batch:
    ``warmup`` untimed calls, then ``repeats`` timed ones (``time.perf_counter``). The median is
    robust to the occasional slow call caused by other processes.

    Parameters
    ----------
    model : torch.nn.Module
        The network, on the CPU (its training flags are restored afterwards).
    input_shape : tuple of int
        Shape of one example without the batch dimension, e.g. ``(3, 224, 224)``.
    repeats : int, default=20
        Number of timed forward passes.
    warmup : int, default=3
        Number of untimed forward passes before them (allocations, caches).
    threads : int or None, default=None
        Number of intra-op threads during the measurement (``torch.set_num_threads``, restored
        afterwards); None keeps the current setting. ``threads=1`` gives the most reproducible
        numbers.
    batch_size : int, default=1
        Examples per forward pass; the time of a pass is divided by it. The ETL paper reports
        batch size 1.

    Returns
    -------
    seconds : float
        Median time of a forward pass divided by ``batch_size``.

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_craft.profiling import measure_latency
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    >>> measure_latency(model, (3, 32, 32), repeats=5, threads=1) > 0
    True
    """
    _check_model(model)
    input_shape = _check_input_shape(input_shape)
    repeats = _check_int(repeats, "repeats")
    warmup = _check_int(warmup, "warmup", minimum=0)
    batch_size = _check_int(batch_size, "batch_size")
    if threads is not None:
        threads = _check_int(threads, "threads")
    _check_on_cpu(model)
    x = torch.rand((batch_size, *input_shape), generator=torch.Generator().manual_seed(0), dtype=_input_dtype(model))
    times = []
    try:
        with _evaluating(model), torch.inference_mode(), _num_threads(threads):
            for _ in range(warmup):
                model(x)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    except Exception:
        _runs_on(model, x, "input_shape")  # a ValueError naming input_shape when that is the cause
        raise
    return statistics.median(times) / batch_size


def compare_models(original, pruned, input_shape, *, latency=True, repeats=20, warmup=3, threads=None, batch_size=1):
    """Compare the cost of a network and of its pruned version.

    Parameters
    ----------
    original, pruned : torch.nn.Module
        The two networks, taking inputs of the same shape.
    input_shape : tuple of int
        Shape of one example without the batch dimension, e.g. ``(3, 224, 224)``.
    latency : bool, default=True
        Also measure the CPU latency (:func:`measure_latency`); the slowest part of the report.
    repeats, warmup, threads, batch_size
        Passed to :func:`measure_latency`.

    Returns
    -------
    report : pandas.DataFrame
        Rows ``parameters`` (:func:`count_parameters`), ``size_bytes``
        (:func:`model_size_bytes`), ``flops`` (:func:`count_flops`) and, when ``latency``,
        ``latency_s`` (median seconds per example); columns ``original``, ``pruned`` and
        ``reduction_pct`` = ``100 * (1 - pruned / original)``.

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_craft.profiling import compare_models
    >>> original = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU())
    >>> pruned = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> compare_models(original, pruned, (3, 32, 32), latency=False)["reduction_pct"].tolist()
    [75.0, 75.0, 75.0]
    """
    for name, model in (("original", original), ("pruned", pruned)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    input_shape = _check_input_shape(input_shape)
    metrics = {"parameters": count_parameters, "size_bytes": model_size_bytes}
    metrics["flops"] = lambda model: count_flops(model, input_shape)
    if latency:
        metrics["latency_s"] = lambda model: measure_latency(
            model, input_shape, repeats=repeats, warmup=warmup, threads=threads, batch_size=batch_size
        )
    columns = {
        column: [measure(model) for measure in metrics.values()]
        for column, model in (("original", original), ("pruned", pruned))
    }
    report = pd.DataFrame(columns, index=pd.Index(list(metrics), name="metric"))
    report["reduction_pct"] = 100 * (1 - report["pruned"] / report["original"])
    return report
