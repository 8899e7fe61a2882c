"""Cost of a network: parameters, size in bytes, FLOPs and CPU latency, and an original-vs-pruned report.

FLOPs are counted as the ETL paper counts them (section 4.1): the number of multiplications of
one forward pass of one example, ``o x i x k x k x w x h`` for a convolution with ``o`` output
and ``i`` input channels, a ``k x k`` kernel and a ``w x h`` output map (``i`` is divided by the
number of groups, so a depthwise convolution costs ``o x k x k x w x h``), and
``n_input x n_output`` for a Linear layer. Additions, biases, normalisation, activations and
pooling are not counted. ``torch.utils.flop_counter.FlopCounterMode`` reports twice these
numbers (one multiply-add is two FLOPs there).

Every function takes ``input_shape``, the shape of one example without the batch dimension,
e.g. ``(3, 224, 224)`` for an RGB image; one the model cannot run on (given with its batch
dimension, say) is a ``ValueError`` naming it. Models are never modified: each submodule's training
flag is restored and no hook is left behind.
"""

import statistics
import time
import warnings
from contextlib import contextmanager
from itertools import chain
from math import prod
from numbers import Integral

import pandas as pd
import torch
from torch import nn

from .inspection import _check_model, _evaluating, _input_dtype, _recording_leaf_calls, _runs_on

__all__ = ["compare_models", "count_flops", "count_parameters", "measure_latency", "model_size_bytes"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


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


def _module_flops(module, inputs, output):
    """Multiplications of one call of ``module`` (0 for anything but convolutions and Linear layers)."""
    if isinstance(module, _CONVS):
        return output.numel() * module.in_channels // module.groups * prod(module.kernel_size)
    if isinstance(module, _TRANSPOSED_CONVS):
        return inputs[0].numel() * module.out_channels // module.groups * prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def _leaf_calls(model, input_shape):
    """The leaf-module calls of one forward pass of one example, computing nothing when possible.

    The pass runs on the meta device (shapes only), parameters and buffers being swapped for meta
    tensors with ``torch.func.functional_call``. Models that cannot run that way (``forward``
    reads a tensor value, or uses a tensor that is neither a parameter nor a buffer) run once on
    a real zero input instead.
    """
    dtype = _input_dtype(model)
    meta_state = {
        name: torch.empty_like(t, device="meta") for name, t in chain(model.named_parameters(), model.named_buffers())
    }
    with _recording_leaf_calls(model) as calls:
        try:
            torch.func.functional_call(model, meta_state, (torch.empty((1, *input_shape), dtype=dtype, device="meta"),))
            return calls
        except (RuntimeError, NotImplementedError):
            pass
    device = next((t.device for t in chain(model.parameters(), model.buffers())), None)
    with _recording_leaf_calls(model) as calls:
        _runs_on(model, torch.zeros((1, *input_shape), dtype=dtype, device=device), "input_shape")
        return calls


def count_flops(model, input_shape, by_layer=False):
    """Multiplications of one forward pass of one example, as counted in the ETL paper.

    Convolutions cost ``out_channels x in_channels / groups x prod(kernel_size) x prod(output
    map)`` (transposed ones ``in_channels x out_channels / groups x prod(kernel_size) x
    prod(input map)``), Linear layers ``in_features x out_features`` per output row; every other
    layer costs 0. Layers are found with forward hooks on ``nn.Conv*`` and ``nn.Linear`` modules,
    so operations called as functions inside ``forward`` are not counted.

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
        The total; or, when ``by_layer=True``, one row per call of a leaf module in forward
        order, with columns ``layer`` (module name), ``type`` (class name), ``output_shape``
        (without the batch dimension; None when the output is not a tensor) and ``flops``.
        Its ``flops`` column sums to the total.

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
        calls = _leaf_calls(model, input_shape)
    rows = [
        {
            "layer": name,
            "type": type(module).__name__,
            "output_shape": tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None,
            "flops": _module_flops(module, inputs, output),
        }
        for name, module, inputs, output in calls
    ]
    counted_types = (*_CONVS, *_TRANSPOSED_CONVS, nn.Linear)
    if count_parameters(model) and not any(isinstance(module, counted_types) for _, module, _, _ in calls):
        warnings.warn(
            f"count_flops found no nn.Conv or nn.Linear module in the forward pass of {type(model).__name__}; "
            "operations outside such modules (functional calls, exported graphs) are not counted",
            UserWarning,
            stacklevel=2,
        )
    if by_layer:
        return pd.DataFrame(rows, columns=["layer", "type", "output_shape", "flops"]).astype({"flops": "int64"})
    return sum(row["flops"] for row in rows)


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
