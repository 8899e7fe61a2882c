"""Network inspection: which module computes a convolution's response, what runs in what order.

Every stage that runs or edits a network asks this module, so that pooling, selection, surgery,
fine-tuning and profiling agree on the facts and depend on it rather than on each other:

- :func:`find_responses` decides once for the whole library where a convolution's *response*
  is read (the output of the nonlinearity that directly follows it, ``Conv -> [BatchNorm] ->
  activation``): :class:`~sklearn_craft.pooling.ActivationPooler` pools it and
  :func:`~sklearn_craft.surgery.truncate` cuts a network there;
- small shared tools: a context manager that puts a network in eval mode and restores every
  submodule's training flag, a recorder of the leaf-module calls of one forward pass, the
  selection of convolutions by name or predicate, and moving a network to a device without
  touching the user's copy.
"""

import copy
import itertools
import threading
import weakref
from collections import Counter
from contextlib import contextmanager
from functools import partial

import torch
import torch.fx
from torch import nn

__all__ = ["ACTIVATIONS", "find_responses"]

#: Elementwise nonlinearities whose output is taken as the response of the preceding conv.
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
)
_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)

#: One re-entrant lock per network (released with it). Hooks and eval() are set on the user's
#: model itself: threads running one model (joblib's threading backend) take turns, so that
#: none records another's batch or restores flags out of order. The lock is held around
#: forward passes only, never across user callbacks such as ``preprocess``: those may run the
#: same network themselves.
_MODEL_LOCKS = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def _check_model(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _select_convs(model, layers):
    """Names of the nn.Conv2d modules selected by ``layers``, in registration order."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if isinstance(layers, str):
        if layers != "conv":
            raise ValueError(f"layers must be 'conv', a list of module names or a callable, got {layers!r}")
        selected = list(convs)
    elif callable(layers):
        selected = [name for name, module in convs.items() if layers(name, module)]
    elif isinstance(layers, (list, tuple)):
        modules = dict(model.named_modules())
        for name in layers:
            if name not in modules:
                raise ValueError(
                    f"layers contains {name!r}, which is not a module of the model; "
                    f"conv layers are for instance {list(convs)[:5]}"
                )
            if not isinstance(modules[name], nn.Conv2d):
                raise ValueError(
                    f"layers must name nn.Conv2d modules, got {name!r}, " f"a {type(modules[name]).__name__}"
                )
        duplicates = [name for name, count in Counter(layers).items() if count > 1]
        if duplicates:
            raise ValueError(f"layers must not repeat a name, got {duplicates} more than once")
        selected = list(layers)
    else:
        raise TypeError("layers must be 'conv', a list of module names or a callable, " f"got {type(layers).__name__}")
    if not selected:
        raise ValueError(f"layers={layers!r} selects no nn.Conv2d of the model")
    return selected


def _model_lock(model):
    """The re-entrant lock that serialises forward passes with hooks or flag changes on ``model``."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def _evaluating(model):
    """Put ``model`` in eval mode, holding its lock, and restore every submodule's own training flag."""
    with _model_lock(model):
        flags = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            yield
        finally:
            for module, training in flags:
                module.training = training


def _leaves(model):
    """(name, module) of every module without children, in registration order."""
    return [(name, module) for name, module in model.named_modules() if next(module.children(), None) is None]


@contextmanager
def _recording_leaf_calls(model):
    """Record ``(name, module, inputs, output)`` of every call of a leaf module; the hooks go afterwards."""
    calls = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: calls.append((name, m, i, o)))
        for name, module in _leaves(model)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


class _AllCalled(Exception):
    """Raised once every module awaited by ``_call_sequence`` has run: the rest need not run."""


def _call_sequence(model, example_input, until=()):
    """Names of the leaf modules of ``model`` in the order they run on ``example_input``.

    With ``until`` (module names), the pass stops as soon as each of them has run, so that the
    layers after them (a classifier built for another input size) need not accept the input.
    """
    waiting = set(until)

    def stop(module, inputs, output, name):
        waiting.discard(name)
        if not waiting:
            raise _AllCalled

    with _evaluating(model), torch.inference_mode(), _recording_leaf_calls(model) as calls:
        handles = [model.get_submodule(name).register_forward_hook(partial(stop, name=name)) for name in waiting]
        try:
            model(example_input)
        except _AllCalled:
            pass
        finally:
            for handle in handles:
                handle.remove()
    return [name for name, _, _, _ in calls]


def _traced_graph(model):
    """The torch.fx graph of ``model`` in eval mode, or None when it does not trace."""
    try:
        with _evaluating(model):
            return torch.fx.symbolic_trace(model).graph
    # Untraceable Python (data-dependent control flow, unsupported calls) fails with many
    # exception types; any of them means "use the fallback".
    except Exception:
        return None


def _dataflow(model, example_input):
    """What runs after what: (successor of each module, calls per module, first-run order)."""
    graph = _traced_graph(model)
    if graph is not None:
        nodes = [node for node in graph.nodes if node.op == "call_module"]
        calls = Counter(node.target for node in nodes)
        following = {}
        for node in nodes:
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module":
                following[node.target] = users[0].target
        order = [node.target for node in nodes]
    else:
        if example_input is None:
            order = [name for name, _ in _leaves(model)]
        else:
            order = _call_sequence(model, example_input)
        # In registration order every module counts as run once: a shared one goes unnoticed.
        calls = Counter(order)
        following = dict(itertools.pairwise(order))
    return following, calls, order


def find_responses(model, layers="conv", *, example_input=None):
    """Locate the module whose output is the response of each convolution.

    The response of a convolution is the output of the elementwise activation that directly
    follows it (``Conv -> [BatchNorm] -> activation``, the activation being one of
    ``ACTIVATIONS``); when no activation follows, the output of its BatchNorm; else the
    convolution's own output. "Directly follows" is read from the torch.fx graph: the conv's
    only consumer is the BatchNorm or activation module, and so on. A module called more than
    once in the graph (for instance one ``self.relu`` shared by the two convolutions of a
    torchvision ResNet block) cannot be hooked for a single site, so the response stops
    before it. Activations called as functions (``F.relu``) are not modules and are not
    followed either.

    When the model does not trace with torch.fx, the order in which leaf modules run on
    ``example_input`` stands in for the graph (a module run more than once is still
    excluded), or, without ``example_input``, their registration order (which cannot detect a
    shared activation).

    Parameters
    ----------
    model : torch.nn.Module
        The network (not modified; its training flags are restored).
    layers : "conv", list of str or callable, default="conv"
        The convolutions: every ``nn.Conv2d``; their names; or a predicate
        ``(name, module) -> bool`` called on every ``nn.Conv2d``.
    example_input : torch.Tensor, default=None
        A batch the model accepts, used only when the model does not trace with torch.fx.

    Returns
    -------
    responses : dict
        Conv name -> name of the module whose output is its response, in forward order
        (convolutions that never run come last, mapped to themselves).

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module`` or ``layers`` of none of the accepted types.
    ValueError
        If a name in ``layers`` is unknown or not an ``nn.Conv2d``, or nothing is selected.

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_craft.inspection import find_responses
    >>> model = nn.Sequential(
    ...     nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...     nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
    ...     nn.Conv2d(8, 4, 3),
    ... )
    >>> find_responses(model)
    {'0': '2', '3': '4', '5': '5'}
    """
    _check_model(model)
    convs = _select_convs(model, layers)
    modules = dict(model.named_modules())
    following, calls, order = _dataflow(model, example_input)

    def next_if(name, kinds):
        successor = following.get(name) if calls[name] == 1 else None
        if successor is not None and isinstance(modules[successor], kinds):
            if calls[successor] == 1:
                return successor
        return None

    responses = {}
    for conv in convs:
        response = next_if(conv, _NORMS) or conv
        responses[conv] = next_if(response, ACTIVATIONS) or response
    first_run = {name: position for position, name in reversed(list(enumerate(order)))}
    return dict(sorted(responses.items(), key=lambda item: first_run.get(item[0], len(order))))


def _check_device(device, argument="device"):
    """``device`` as a torch.device this build of torch can run on, else a ValueError naming ``argument``."""
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{argument} must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from error
    if checked.type == "meta":
        raise ValueError(f"{argument} must be a device that computes values, got {device!r}")
    backend = {"cuda": torch.cuda, "mps": torch.backends.mps}.get(checked.type) or getattr(torch, checked.type, None)
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise ValueError(
            f"{argument}={str(checked)!r} is not available in this torch build ({torch.__version__}): "
            f"torch.{'backends.mps' if checked.type == 'mps' else checked.type}.is_available() is False; "
            f"use {argument}='cpu'"
        )
    if checked.type == "cuda" and checked.index is not None and checked.index >= torch.cuda.device_count():
        raise ValueError(f"{argument}={str(checked)!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return checked


def _input_dtype(model):
    """dtype of the first floating-point parameter of ``model`` (the default dtype when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


@contextmanager
def _seeded_rng(seed, device="cpu"):
    """Inside the block, torch's global generators of the CPU and of ``device`` start from ``seed``;
    after it, they are back where they were: dropout and default initialisations draw from our seed and
    the user's generators are left alone (``torch.manual_seed`` alone would reseed every GPU's for good)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    index = (torch.cuda.current_device() if device.index is None else device.index) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        if device.type not in ("cpu", "cuda"):  # other accelerators: every generator, as torch seeds them
            torch.manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _on_device(model, device):
    """``model`` when all its tensors live on ``device``, else a moved copy (never move the user's).

    A model on another device (a GPU, with ``device="cpu"``) is copied there; one whose tensors
    are on the meta device holds no values to copy, which is an error naming ``model``.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # Batches sent to "cuda" land on the current GPU: a model on another one is not in place.
        device = torch.device("cuda", torch.cuda.current_device())
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if any(tensor.is_meta for tensor in tensors):
        raise ValueError(
            "model has parameters or buffers on the meta device, which hold no values: materialise them "
            "(model.to_empty(device=...) then load_state_dict) before using the model"
        )

    def placed(tensor):
        return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)

    if all(placed(tensor) for tensor in tensors):
        return model
    return copy.deepcopy(model).to(device)


class _NetworksPickleOnCpu:
    """Pickling of an estimator holding networks: every network travels on the CPU and goes back to
    its device on loading where that device exists, else stays on the CPU. An estimator fitted on a
    GPU then loads on a machine without one (a dask worker, a laptop); ``set_params(device="cpu")``
    predicts there.
    """

    def __getstate__(self):
        state = dict(super().__getstate__())  # object.__getstate__ returns the live __dict__
        devices = {}
        for key, value in state.items():
            if isinstance(value, nn.Module):
                tensor = next(itertools.chain(value.parameters(), value.buffers()), None)
                if tensor is not None and tensor.device.type not in ("cpu", "meta"):
                    devices[key] = str(tensor.device)
                    state[key] = _on_device(value, "cpu")
        if devices:
            state["_network_devices"] = devices
        return state

    def __setstate__(self, state):
        for key, device in state.pop("_network_devices", {}).items():
            try:
                state[key] = state[key].to(_check_device(device))
            except ValueError:  # no such device here
                pass
        super().__setstate__(state)


def _runs_on(model, example, argument):
    """``model(example)`` in eval mode without gradients, or a ValueError naming ``argument``.

    When the model runs once the first two axes of ``example`` are merged, ``argument`` holds an
    axis too many, typically a batch dimension given in a shape that must not have one.
    """
    try:
        with _evaluating(model), torch.no_grad():
            return model(example)
    # A forward pass fails in many ways on an input it was not built for (shape, dtype, device).
    except Exception as error:
        message = f"model cannot run on {argument} (a batch of shape {tuple(example.shape)}): {error}"
        if example.ndim > 2:
            try:
                with _evaluating(model), torch.no_grad():
                    model(example.flatten(0, 1))
                message += f"; it runs without the first axis of each example: {argument} has an axis too many"
                message += " (the shape of one example must not include the batch dimension)"
            except Exception:  # the shape is wrong in another way: the first message says how
                pass
        raise ValueError(message) from error
