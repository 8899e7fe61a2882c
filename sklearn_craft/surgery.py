"""Removing output channels from a torch network, and cutting a network after a layer.

This is the only module of sklearn_craft that edits networks. Channel dependencies (Conv ->
BatchNorm -> activation -> Conv, depthwise convolutions, residual additions, concatenations,
Flatten -> Linear) are tracked by Torch-Pruning's ``DependencyGraph``, through the private adapter
:mod:`sklearn_craft._channel_graph`, which fills the gaps of Torch-Pruning 1.6.1 that matter for
face networks (Max-Feature-Map, frozen models, index renumbering); nothing else imports
Torch-Pruning.

See ``docs/surgery.rst`` for the rules (what is removed, coupling, scaling).
"""

import copy
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import fx, nn

from ._channel_graph import _ChannelGraph, _scale_target, _traceable
from .inspection import _check_model, _runs_on, find_responses

__all__ = ["attach_head", "channel_readers", "coupled_groups", "merge_keep", "prune_channels", "truncate"]


def _check_example_input(example_input):
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(
            f"example_input must be a torch.Tensor batch the model accepts, got {type(example_input).__name__}"
        )


def _check_conv_name(model, name, argument):
    """Raise unless ``name`` names an nn.Conv2d of ``model``."""
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    if name not in modules:
        raise ValueError(
            f"{argument} names {name!r}, which is not a module of the model; its Conv2d layers are {convs}"
        )
    if not isinstance(modules[name], nn.Conv2d):
        raise ValueError(f"{argument} must name nn.Conv2d modules, got {name!r}, a {type(modules[name]).__name__}")


def _check_indices(name, indices, n_channels):
    """``keep[name]`` as a sorted list of ints, each in [0, n_channels) and given once."""
    if isinstance(indices, (set, frozenset)):
        indices = sorted(indices)
    array = np.asarray(indices)
    if array.ndim != 1:
        raise ValueError(f"keep[{name!r}] must be a 1-D sequence of channel indices, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"keep[{name!r}] is empty: at least one channel of {name!r} must be kept")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"keep[{name!r}] must hold integer channel indices, got dtype {array.dtype}")
    outside = sorted({int(i) for i in array if not 0 <= i < n_channels})
    if outside:
        raise ValueError(f"keep[{name!r}] must hold indices in [0, {n_channels}), got {outside}")
    values, counts = np.unique(array, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"keep[{name!r}] repeats channel indices {values[counts > 1].tolist()}")
    return values.tolist()


def _check_mapping(value, argument):
    if not isinstance(value, Mapping):
        raise TypeError(f"{argument} must be a dict of conv name -> channel indices, got {type(value).__name__}")


def _copy(model, class_name=None):
    """Deep copy of ``model``; a GraphModule keeps its class name (deepcopy alone drops it)."""
    # A copy made in inference mode would hold inference tensors, which autograd cannot trace.
    with torch.inference_mode(False):
        copied = copy.deepcopy(model)
    if isinstance(model, fx.GraphModule):
        training = copied.training
        copied = fx.GraphModule(copied, copied.graph, class_name=class_name or type(model).__name__)
        copied.training = training
    return copied


def _apply_scale(graph, scale, keep):
    """Multiply the pre-activation output of kept channels by ``scale`` (ETL Eq. 5), before pruning."""
    for name, multipliers in scale.items():
        if name not in keep:
            raise ValueError(f"scale names {name!r}, which is not in keep; scale applies to kept channels")
        indices = keep[name]
        indices = np.asarray(sorted(indices) if isinstance(indices, (set, frozenset)) else indices).tolist()
        if isinstance(multipliers, torch.Tensor):
            multipliers = multipliers.detach().cpu().numpy()
        try:
            factors = np.asarray(multipliers, dtype=float)
        except (TypeError, ValueError) as error:
            raise TypeError(f"scale[{name!r}] must be a sequence of numbers, got {multipliers!r}") from error
        if factors.shape != (len(indices),):
            raise ValueError(
                f"scale[{name!r}] must hold one multiplier per index of keep[{name!r}] "
                f"({len(indices)}), got shape {factors.shape}"
            )
        if not np.isfinite(factors).all():
            raise ValueError(f"scale[{name!r}] must hold finite numbers, got {factors.tolist()}")
        conv = graph.convs[name]
        vector = torch.ones(conv.out_channels, dtype=torch.float64)
        vector[indices] = torch.as_tensor(factors, dtype=torch.float64)
        target = _scale_target(graph, conv)
        with torch.no_grad():
            for parameter in (target.weight, target.bias):
                if parameter is not None:
                    shape = (-1,) + (1,) * (parameter.dim() - 1)
                    parameter.mul_(vector.to(parameter).view(shape))


def _fix_stored_split_size(model, name, old_half, new_half):
    """Update the ``out_channels`` int of the module owning conv ``name``, if it stores the MFM split.

    The reference LightCNN code splits with ``torch.split(x, self.out_channels, 1)`` in the module
    that holds the convolution; that int is invisible to the dependency graph.
    """
    owner = model.get_submodule(name.rpartition(".")[0])
    stored = getattr(owner, "out_channels", None)
    if isinstance(stored, int) and stored == old_half:
        owner.out_channels = new_half


def coupled_groups(model, example_input, *, return_followers=False):
    """Group the convolutions whose output channels are coupled.

    Two convolutions are coupled when removing output channel i of one forces removing output
    channel i of the other: their outputs are added (the convolutions feeding one residual
    stream, including 1x1 projection shortcuts), or one is a depthwise convolution, whose
    channel i is computed from channel i of its input only. Coupling is read from the autograd
    graph of one forward pass on ``example_input`` (Torch-Pruning's ``DependencyGraph``).

    The two kinds differ in who decides: the convolutions of a residual stream are true partners
    (any of them may keep a channel), whereas a depthwise convolution has no choice of its own
    and *follows* its input, keeping the channels the other members of its group keep (see
    :func:`merge_keep`).

    Parameters
    ----------
    model : torch.nn.Module
        The network. It is not modified: training flags and ``requires_grad`` are restored.
    example_input : torch.Tensor
        A batch the model accepts, for instance ``torch.zeros(1, 3, 224, 224)``.
    return_followers : bool, default=False
        Also return the followers.

    Returns
    -------
    groups : list of list of str
        Every ``nn.Conv2d`` that runs on ``example_input`` appears in exactly one group
        (alone when coupled with nothing); groups and their members in forward order.
    followers : list of str
        Only when ``return_followers``: the depthwise convolutions grouped with another kind of
        convolution, in forward order (a group of depthwise convolutions only has no follower).

    Raises
    ------
    ValueError
        If some convolution's channels are coupled with only part of another's (for instance
        through a concatenation feeding a depthwise convolution), or a grouped, non-depthwise
        convolution is coupled with others.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import resnet18
    >>> from sklearn_craft.surgery import coupled_groups
    >>> groups = coupled_groups(resnet18(width_mult=0.125), torch.zeros(1, 3, 32, 32))
    >>> len(groups), sum(len(group) for group in groups)
    (12, 20)
    >>> groups[0]
    ['conv1', 'layer1.0.conv2', 'layer1.1.conv2']
    >>> from sklearn_craft.models import mobilenet_v1
    >>> net = mobilenet_v1(width_mult=0.25)
    >>> groups, followers = coupled_groups(net, torch.zeros(1, 3, 32, 32), return_followers=True)
    >>> groups[0], followers[0]
    (['features.0.0', 'features.1.0'], 'features.1.0')
    """
    _check_model(model)
    _check_example_input(example_input)
    _runs_on(model, example_input, "example_input")
    with _traceable(model, example_input) as x:
        graph = _ChannelGraph(model, x)
        groups = graph.groups()
    return (groups, graph.followers) if return_followers else groups


def channel_readers(model, example_input):
    """The convolutions that read the output channels of each convolution.

    A convolution reads the output channels of another when its input channels are those
    channels: directly, or through BatchNorm, activations, pooling, residual additions (then it
    reads every convolution of the stream) and depthwise convolutions, which are looked through
    (they follow their input, see :func:`coupled_groups`) rather than listed. Read from one
    forward pass on ``example_input`` (Torch-Pruning's ``DependencyGraph``), like the coupling.
    The pruner's ``criterion="reconstruction"`` selects a layer's filters by how well they
    predict the responses of its readers.

    Parameters
    ----------
    model : torch.nn.Module
        The network. It is not modified: training flags and ``requires_grad`` are restored.
    example_input : torch.Tensor
        A batch the model accepts.

    Returns
    -------
    readers : dict of str to list of str
        Every ``nn.Conv2d`` that runs on ``example_input``, in forward order -> the convolutions
        that read it, in forward order (empty for the last ones, or when a Linear layer reads it).
        Coupled convolutions have the same readers; a convolution coupled with the one it reads
        (the last convolution of a residual block reads the stream it adds to) is not listed.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import mobilenet_v1
    >>> from sklearn_craft.surgery import channel_readers
    >>> readers = channel_readers(mobilenet_v1(width_mult=0.25), torch.zeros(1, 3, 32, 32))
    >>> readers["features.0.0"], readers["features.1.0"]
    (['features.1.3'], ['features.1.3'])
    """
    _check_model(model)
    _check_example_input(example_input)
    _runs_on(model, example_input, "example_input")
    with _traceable(model, example_input) as x:
        graph = _ChannelGraph(model, x)
        readers = {}
        for group in graph.groups():
            reading = [name for name in graph.readers(group[0]) if name not in group]
            readers.update({name: list(reading) for name in group})
    return {name: readers[name] for name in graph.order}


def merge_keep(keep, groups, n_channels, *, followers=()):
    """Make per-layer channel selections consistent with the coupling of ``groups``.

    Rule: a channel shared by a group of coupled convolutions is kept when *any* member that is
    not a follower keeps it (union), and every member of the group, followers included, ends up
    with the same channels. A follower (a depthwise convolution, whose channel i is computed
    from its input's channel i only) has no choice of its own: its entry in ``keep``, if any, is
    not consulted, and it need not be named for the others to lose channels. A member that is
    not a follower and is missing from ``keep`` keeps all its channels, so the whole group is
    then left intact (with a warning): only layers named in ``keep`` ever decide to drop channels.
    In a group of followers only, every member decides.

    Parameters
    ----------
    keep : dict of str to sequence of int
        Conv name -> indices of the output channels to keep (order ignored).
    groups : list of list of str
        Coupled convolutions, as returned by :func:`coupled_groups`. Layers of ``keep`` in no
        group are taken as coupled with nothing.
    n_channels : dict of str to int
        Conv name -> number of output channels, for every layer of ``keep``.
    followers : collection of str, default=()
        Convolutions that follow their input, as returned by ``coupled_groups(...,
        return_followers=True)``.

    Returns
    -------
    merged : dict of str to list of int
        For every layer of ``keep``, the sorted indices of the channels it keeps.

    Raises
    ------
    ValueError
        If ``keep`` names a layer missing from ``n_channels``, holds an empty list, repeated
        or out-of-range indices, a layer appears in two groups, or the members of a group have
        different channel counts.

    Examples
    --------
    >>> from sklearn_craft.surgery import merge_keep
    >>> merge_keep({"a": [0, 2], "b": [3], "c": [1]}, [["a", "b"], ["c"]], {"a": 4, "b": 4, "c": 2})
    {'a': [0, 2, 3], 'b': [0, 2, 3], 'c': [1]}
    >>> merge_keep({"a": [0, 2], "b": [3]}, [["a", "b"]], {"a": 4, "b": 4}, followers=["b"])
    {'a': [0, 2], 'b': [0, 2]}
    """
    _check_mapping(keep, "keep")
    if not isinstance(n_channels, Mapping):
        raise TypeError(f"n_channels must be a dict of conv name -> channel count, got {type(n_channels).__name__}")
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, (list, tuple)) for g in groups):
        raise TypeError(f"groups must be a list of lists of conv names, got {groups!r}")
    if isinstance(followers, str) or not all(isinstance(name, str) for name in followers):
        raise TypeError(f"followers must be a collection of conv names, got {followers!r}")
    followers = set(followers)
    group_of = {}
    for group in groups:
        for name in group:
            if name in group_of:
                raise ValueError(f"groups must be disjoint, but {name!r} appears in {group_of[name]} and {list(group)}")
            group_of[name] = list(group)
    unknown = [name for name in keep if name not in n_channels]
    if unknown:
        raise ValueError(f"n_channels must give the channel count of every layer of keep, missing {unknown}")
    checked = {name: _check_indices(name, indices, n_channels[name]) for name, indices in keep.items()}

    merged, incomplete = {}, {}
    for name in keep:
        group = group_of.get(name, [name])
        deciders = [member for member in group if member not in followers] or group
        missing = [member for member in deciders if member not in keep]
        if missing:
            incomplete[name] = missing
            merged[name] = list(range(n_channels[name]))
            continue
        sizes = {member: n_channels[member] for member in group if member in n_channels}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"coupled layers must have equal channel counts, got {sizes}")
        merged[name] = sorted(set().union(*(checked[member] for member in deciders)))
    if incomplete:
        warnings.warn(
            f"{list(incomplete)} keep all their channels: they are coupled with layers missing from keep "
            f"({sorted(set().union(*map(set, incomplete.values())))})",
            UserWarning,
            stacklevel=2,
        )
    return merged


def prune_channels(model, keep, example_input, scale=None, *, return_kept=False):
    """Return a copy of ``model`` without the output channels that ``keep`` drops.

    Every parameter that depends on a removed channel follows: the convolution's filters and
    bias, its BatchNorm, per-channel activations (PReLU), the input channels of the next
    convolutions, depthwise convolutions (channel i follows channel i of their input), residual
    additions, concatenations, Max-Feature-Map pairs and Flatten -> Linear (the block of H·W
    input features of a removed channel). Coupled channels are resolved first with
    :func:`merge_keep`: a channel of a residual stream is kept when any convolution feeding the
    stream keeps it, and a depthwise convolution keeps the channels of its input, whether or not
    ``keep`` names it. A Max-Feature-Map keeps its output channel i, hence both convolution
    channels i and C + i that feed it, when either is kept. Kept channels keep their original
    relative order.

    Parameters are replaced, so build optimizers after surgery. Parameters keep their
    ``requires_grad`` flags and modules their training flags.

    Parameters
    ----------
    model : torch.nn.Module
        The network; it is deep-copied and never modified.
    keep : dict of str to sequence of int
        Conv (``nn.Conv2d``) module name -> indices of its output channels to keep. Layers not
        named keep all their channels, except depthwise convolutions, which follow their input.
    example_input : torch.Tensor
        A batch the model accepts (one small image is enough), traced to find dependencies.
    scale : dict of str to sequence of float, default=None
        Conv name -> one multiplier per index of ``keep[name]`` (same order), the LASSO
        coefficients of ETL Eq. 5. The multiplier scales the convolution's pre-activation
        output: the weight and bias of the BatchNorm when one alone reads the convolution,
        else the convolution's weight and bias. Through ReLU (and Max-Feature-Map) a positive
        multiplier scales the response, a negative one does not (ReLU(-x) != -ReLU(x)).
        Channels kept only through coupling are not scaled.
    return_kept : bool, default=False
        Also return which channels every affected convolution kept, so that callers need not
        re-derive the coupling.

    Returns
    -------
    pruned : torch.nn.Module
        The pruned copy, of the same class as ``model``.
    kept : dict of str to list of int
        Only when ``return_kept``: for every convolution named in ``keep`` and every one coupled
        with them, the sorted original indices of the output channels it still has (coupled
        channels and Max-Feature-Map partners included), in forward order.

    Raises
    ------
    TypeError
        If ``model``, ``keep``, ``example_input`` or ``scale`` has the wrong type.
    ValueError
        If ``keep`` names an unknown module, a module that is not an ``nn.Conv2d`` or does not
        run on ``example_input``, holds an empty list or repeated or out-of-range indices;
        if ``scale`` does not match ``keep``; or if the architecture couples channels in a
        way that cannot be pruned exactly.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_craft.surgery import prune_channels
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> pruned = prune_channels(model, {"0": [1, 5, 6]}, torch.zeros(1, 3, 16, 16))
    >>> pruned[0].out_channels, pruned[1].num_features, pruned[3].in_channels
    (3, 3, 3)
    >>> model[0].out_channels
    8
    >>> prune_channels(model, {"0": [1, 5, 6]}, torch.zeros(1, 3, 16, 16), return_kept=True)[1]
    {'0': [1, 5, 6]}
    """
    _check_model(model)
    _check_mapping(keep, "keep")
    _check_example_input(example_input)
    if scale is not None:
        _check_mapping(scale, "scale")
    for name in keep:
        _check_conv_name(model, name, "keep")
    _runs_on(model, example_input, "example_input")

    pruned = _copy(model)
    with _traceable(pruned, example_input) as x:
        graph = _ChannelGraph(pruned, x)
        silent = [name for name in keep if name not in graph.convs]
        if silent:
            raise ValueError(f"keep names {silent}, which do not run on example_input")
        n_channels = {name: conv.out_channels for name, conv in graph.convs.items()}
        groups = graph.groups()
        merged = merge_keep(keep, groups, n_channels, followers=graph.followers)
        if scale is not None:
            _apply_scale(graph, scale, keep)
        kept_channels = {}
        for group in groups:
            named = [name for name in group if name in keep]
            if not named:
                continue
            n = n_channels[group[0]]
            # merge_keep gave every named member of the group the same channels.
            kept = set(merged[named[0]])
            if len(kept) == n:
                kept_channels.update({name: list(range(n)) for name in group})
                continue
            half = n // 2 if graph.paired(group[0]) else None
            if half is not None:
                kept = {i % half + offset for i in kept for offset in (0, half)}
            kept_channels.update({name: sorted(kept) for name in group})
            removed = [i for i in range(n) if i not in kept]
            if not removed:
                continue
            graph.prune(group, removed)
            if half is not None:
                for name in group:
                    _fix_stored_split_size(pruned, name, half, len(kept) // 2)
        try:
            with torch.no_grad():
                pruned(x)
        # Whatever the pruned forward raises (shape mismatch, a stale stored size), the cause is
        # a dependency the graph did not show: report it rather than return a broken network.
        except Exception as error:
            raise ValueError(
                f"the pruned {type(model).__name__} does not run on example_input ({error}); Torch-Pruning "
                "missed a channel dependency of this architecture. A Max-Feature-Map must read its split "
                "point from its input, e.g. torch.max(x[:, :C], x[:, C:]) with C = x.shape[1] // 2"
            ) from error
    if return_kept:
        return pruned, {name: kept_channels[name] for name in graph.order if name in kept_channels}
    return pruned


class _ResponseTracer(fx.Tracer):
    """torch.fx tracer that keeps the response module as one call, even when it is a custom module."""

    def __init__(self, response):
        super().__init__()
        self.response = response

    def is_leaf_module(self, module, qualname):
        return qualname == self.response or super().is_leaf_module(module, qualname)


def _truncated_graph_module(model, layer, response):
    """torch.fx GraphModule of ``model`` returning the first output of ``response`` after ``layer``."""
    try:
        graph = _ResponseTracer(response).trace(model)
    # torch.fx fails on data-dependent Python in many ways (TraceError, TypeError, ...).
    except Exception as error:
        raise ValueError(
            f"truncate needs a model torch.fx can trace, and {type(model).__name__} cannot be traced: {error}"
        ) from error
    downstream, output = set(), None
    for node in graph.nodes:
        if node.op == "call_module" and node.target == layer and not downstream:
            downstream.add(node)
        elif any(source in downstream for source in node.all_input_nodes):
            downstream.add(node)
        if node in downstream and node.op == "call_module" and node.target == response:
            output = node
            break
    if output is None:
        raise ValueError(
            f"the response {response!r} of layer {layer!r} is not computed in the traced graph of the model"
        )
    nodes = list(graph.nodes)
    nodes[-1].args = (output,)
    # Everything run after the response goes, including checks such as torch._assert that dead
    # code elimination keeps because they are impure.
    for node in reversed(nodes[nodes.index(output) + 1 : -1]):
        graph.erase_node(node)
    # A GraphModule keeps the class of its graph's tracer and instantiates it without arguments
    # when it is unpickled; the plain graph copy records none, so the result pickles.
    plain = fx.Graph()
    plain.output(plain.graph_copy(graph, {}))
    shared = fx.GraphModule(model, plain)
    shared.graph.eliminate_dead_code()
    # The copy unshares the parameters and takes only what the remaining graph uses.
    return _copy(shared, class_name=f"Truncated{type(model).__name__}")


def truncate(model, layer, example_input):
    """Return a copy of ``model`` ending at the response of convolution ``layer``.

    The response is the output of the module :func:`sklearn_craft.inspection.find_responses` picks
    for ``layer`` (the activation after ``Conv -> [BatchNorm]``); everything computed after it
    (later layers, pooling, classifier) is dropped. The network is traced with torch.fx, the
    response becomes the graph's output, dead code is removed, and only the parameters of the
    kept part are copied into the returned ``torch.fx.GraphModule``.

    Parameters
    ----------
    model : torch.nn.Module
        The network, traceable by ``torch.fx.symbolic_trace``; never modified.
    layer : str
        Name of an ``nn.Conv2d`` of ``model``.
    example_input : torch.Tensor
        A batch the model accepts; the truncated model's output on it is checked against the
        response recorded in the full model.

    Returns
    -------
    truncated : torch.fx.GraphModule
        Maps an input batch to the N×C×H×W response map of ``layer``, with the training flags
        of ``model``'s modules.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module`` or ``example_input`` not a tensor.
    ValueError
        If ``layer`` is not an ``nn.Conv2d`` of ``model`` or ``model`` cannot be traced by torch.fx.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_craft.surgery import truncate
    >>> model = nn.Sequential(
    ...     nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(576, 2)
    ... )
    >>> head = truncate(model, "0", torch.zeros(1, 3, 16, 16))
    >>> head(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 8, 14, 14])
    """
    _check_model(model)
    _check_example_input(example_input)
    if not isinstance(layer, str):
        raise TypeError(f"layer must be the name of an nn.Conv2d, got {type(layer).__name__}")
    _check_conv_name(model, layer, "layer")
    _runs_on(model, example_input, "example_input")
    response = find_responses(model, [layer], example_input=example_input)[layer]
    modes = {name: module.training for name, module in model.named_modules()}
    recorded = []
    try:
        model.eval()
        truncated = _truncated_graph_module(model, layer, response)
        # Registered after the copy, which would otherwise carry the hook along.
        handle = model.get_submodule(response).register_forward_hook(lambda m, i, o: recorded.append(o))
        try:
            with torch.no_grad():
                model(example_input)
                result = truncated(example_input)
        finally:
            handle.remove()
    finally:
        for name, module in model.named_modules():
            module.training = modes[name]
    if result.shape != recorded[0].shape or not torch.allclose(result, recorded[0], rtol=1e-5, atol=1e-6):
        raise ValueError(f"could not isolate the response {response!r} of layer {layer!r} in {type(model).__name__}")
    # The GraphModule keeps the model's module paths, so flags are restored by name.
    for name, module in truncated.named_modules():
        module.training = modes.get(name, model.training)
    return truncated


def _free_name(module, stem):
    """``stem``, or ``stem_1``, ``stem_2``... : the first that is not an attribute of ``module``."""
    name, number = stem, 0
    while hasattr(module, name):
        number += 1
        name = f"{stem}_{number}"
    return name


def attach_head(model, head):
    """Return a copy of ``model`` followed by global average pooling, Flatten and ``head``, as one graph.

    The result is a single ``torch.fx.GraphModule`` whose modules keep their names in ``model``
    (``features.10`` stays ``features.10``), so that everything addressing a layer by name (pooling,
    pruning, ``get_submodule``) works on the network with its head as on ``model``. Three modules
    are added at the top level: ``pool`` (``nn.AdaptiveAvgPool2d(1)``), ``flatten``
    (``nn.Flatten()``) and ``head`` (a copy of ``head``); a name ``model`` already uses gets a
    numeric suffix (``pool_1``).

    Parameters
    ----------
    model : torch.fx.GraphModule
        A network returning one N×C×H×W map, such as :func:`truncate` returns (and
        :func:`prune_channels` returns for a truncated network); never modified.
    head : torch.nn.Module
        Maps the N×C pooled responses to the outputs, e.g. an ``nn.Linear(C, n_outputs)``.

    Returns
    -------
    network : torch.fx.GraphModule
        ``head(flatten(pool(model(x))))``, with the training flags of ``model`` and ``head``.

    Raises
    ------
    TypeError
        If ``model`` is not a ``torch.fx.GraphModule`` or ``head`` not an ``nn.Module``.
    ValueError
        If ``model``'s graph does not return a single value.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_craft.surgery import attach_head, truncate
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(576, 2))
    >>> network = attach_head(truncate(model, "0", torch.zeros(1, 3, 16, 16)), nn.Linear(8, 5))
    >>> network(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 5])
    >>> [name for name, _ in network.named_children()]
    ['0', '1', 'pool', 'flatten', 'head']
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"model must be a torch.fx.GraphModule, such as truncate returns, got {type(model).__name__}")
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be a torch.nn.Module, got {type(head).__name__}")
    network = _copy(model)
    graph = network.graph
    output = next(node for node in graph.nodes if node.op == "output")
    if len(output.args) != 1 or not isinstance(output.args[0], fx.Node):
        raise ValueError(f"model must return a single tensor, its graph returns {output.args!r}")
    value = output.args[0]
    added = {
        "pool": nn.AdaptiveAvgPool2d(1).train(network.training),
        "flatten": nn.Flatten().train(network.training),
        "head": copy.deepcopy(head),
    }
    with graph.inserting_before(output):
        for stem, module in added.items():
            name = _free_name(network, stem)
            network.add_submodule(name, module)
            value = graph.call_module(name, (value,))
    output.args = (value,)
    network.recompile()
    return network
