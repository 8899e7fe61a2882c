"""Torch-Pruning's dependency graph, adapted to the networks sklearn_craft prunes (private to surgery).

:class:`_ChannelGraph` wraps Torch-Pruning's ``DependencyGraph`` and fills the gaps of version
1.6.1 that matter for face networks:

* Max-Feature-Map (LightCNN): Torch-Pruning counts the channels of ``torch.max(x[:, :C], x[:, C:])``
  as 2C, so a following Flatten -> Linear loses H·W/2 input features per channel instead of H·W,
  and it reads ``split``/``chunk`` sizes from an autograd attribute that torch >= 2 renamed;
* a frozen model (no parameter requiring grad) or a call under ``torch.no_grad`` leaves autograd
  nothing to trace, and pruned parameters come back with ``requires_grad=True`` (:func:`_traceable`);
* a group must be pruned with indices in its current numbering: here every coupled group is
  pruned in one call, so indices always refer to the original channels.

Only :mod:`sklearn_craft.surgery` imports this module.
"""

from contextlib import contextmanager

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping

from .inspection import _recording_leaf_calls


@contextmanager
def _traceable(model, example_input):
    """Eval mode, every parameter requiring grad, grad enabled; yields a traceable copy of the input.

    Torch-Pruning reads the network from the autograd graph of one forward pass: under
    ``torch.no_grad``/``inference_mode``, or when no parameter requires grad, there is none.
    Training flags and ``requires_grad`` are restored by name, because pruning replaces parameters.
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            for parameter in model.parameters():
                parameter.requires_grad_(True)
            # A clone made outside inference mode is an ordinary tensor autograd can record.
            yield example_input.detach().clone()
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
        for module, training in modes:
            module.training = training


def _record_calls(model, example_input):
    """Leaf modules in the order they run on ``example_input``, with input and output shapes."""

    def shape(value):
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    with torch.no_grad(), _recording_leaf_calls(model) as calls:
        model(example_input)
    return [(module, shape(args[0]) if args else None, shape(output)) for _, module, args, output in calls]


def _halving_modules(calls):
    """Parameter-free leaf modules mapping 2C channels to C, each run once: Max-Feature-Map candidates.

    Returns module -> C and the set of their classes (a class with an instance that does not
    halve is left out).
    """
    runs = {}
    for module, shape_in, shape_out in calls:
        runs.setdefault(module, []).append((shape_in, shape_out))
    halving, other_classes = {}, set()
    for module, shapes in runs.items():
        (shape_in, shape_out), *more = shapes
        if (
            not more
            and next(module.parameters(), None) is None
            and shape_in is not None
            and shape_out is not None
            and len(shape_in) == len(shape_out) >= 2
            and shape_in[1] == 2 * shape_out[1]
            and shape_in[:1] + shape_in[2:] == shape_out[:1] + shape_out[2:]
        ):
            halving[module] = shape_out[1]
        else:
            other_classes.add(type(module))
    classes = {type(module) for module in halving} - other_classes
    return {module: c for module, c in halving.items() if type(module) in classes}, classes


#: Torch-Pruning node types that renumber channels: only through them can two channels of one conv be coupled.
_REMAPPING = {
    tp.ops.OPTYPE.SPLIT,
    tp.ops.OPTYPE.SLICE,
    tp.ops.OPTYPE.UNBIND,
    tp.ops.OPTYPE.CONCAT,
    tp.ops.OPTYPE.CUSTOMIZED,
}


class _MaxFeatureMapPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning handler of a Max-Feature-Map module: C output channels fed by 2C.

    The module has nothing to prune; its role is to report C, from which Torch-Pruning sizes the
    Flatten -> Linear that may follow (it would otherwise count the 2C channels of the slices
    inside). Input and output pruning are the same function, so the coupling flows through:
    the slices or split inside map conv channels i and C + i onto output channel i.
    """

    TARGET_MODULES = None

    def __init__(self, channels):
        super().__init__()
        self.channels = channels

    def prune_out_channels(self, layer, idxs):
        self.channels[layer] -= len(idxs)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return self.channels[layer]

    def get_in_channels(self, layer):
        return 2 * self.channels[layer]


def _follows_input(conv):
    """Whether ``conv`` is depthwise: its output channel i is computed from its input channel i only."""
    return 1 < conv.groups == conv.in_channels == conv.out_channels


class _ChannelGraph:
    """Torch-Pruning's DependencyGraph of ``model`` (traced on ``example_input``), gaps filled.

    Build it inside :func:`_traceable`. ``order`` lists the conv names in the order they first run;
    :meth:`groups` fills ``followers``.
    """

    def __init__(self, model, example_input):
        self.names = {module: name for name, module in model.named_modules()}
        calls = _record_calls(model, example_input)
        self.order = list(dict.fromkeys(self.names[m] for m, _, _ in calls if isinstance(m, nn.Conv2d)))
        self.convs = {name: model.get_submodule(name) for name in self.order}
        self.followers = []
        self._remapped, self._halving = {}, {}
        channels, classes = _halving_modules(calls)
        pruner = _MaxFeatureMapPruner(channels)
        self.graph = tp.DependencyGraph().build_dependency(
            model,
            example_inputs=example_input,
            customized_pruners={cls: pruner for cls in classes},
            verbose=False,
        )
        self._fix_split_sizes()

    def _fix_split_sizes(self):
        # Torch-Pruning 1.6.1 looks for `_saved_self_sizes`, which torch >= 2 calls
        # `_saved_self_sym_sizes`, and then guesses split sizes from the consumers: wrong when
        # a flatten follows (an MFM written with chunk before Flatten -> Linear).
        for node in self.graph.module2node.values():
            grad_fn = node.grad_fn
            if node.type != tp.ops.OPTYPE.SPLIT or not hasattr(grad_fn, "_saved_split_size"):
                continue
            shape = grad_fn._saved_self_sym_sizes
            if grad_fn._saved_dim % len(shape) != 1:
                continue
            size, total = grad_fn._saved_split_size, shape[1]
            node.module.split_sizes = [min(size, total - start) for start in range(0, total, size)]

    def _group(self, conv, idxs):
        """Torch-Pruning group removing output channels ``idxs`` of ``conv``, from fresh index mappings."""
        for node in self.graph.module2node.values():
            if node.type == tp.ops.OPTYPE.SPLIT and node.module.split_sizes is not None:
                # Torch-Pruning's split pruner updates the sizes but stores the new offsets on itself.
                node.module.offsets = np.cumsum([0, *node.module.split_sizes]).tolist()
            for dep in node.dependencies:
                dep.index_mapping = [None, None]
        index_mapping.update_index_mapping(self.graph)
        group = self.graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(idxs))
        for dep, _ in group:
            module = dep.target.module
            depthwise = tp.ops.module2type(module) == tp.ops.OPTYPE.DEPTHWISE_CONV
            if isinstance(module, nn.Conv2d) and module.groups > 1 and not depthwise:
                raise ValueError(
                    f"{self.names[module]!r} is a grouped convolution (groups={module.groups}), which "
                    "Torch-Pruning cannot prune exactly; only depthwise convolutions are supported"
                )
        return group

    def _members(self, group):
        """Conv name -> output channels the group removes from it."""
        return {
            self.names[dep.target.module]: sorted(set(idxs))
            for dep, idxs in group
            if isinstance(dep.target.module, nn.Conv2d) and self.graph.is_out_channel_pruning_fn(dep.handler)
        }

    def groups(self):
        """Lists of conv names whose output channels are coupled one to one, in forward order.

        Also sets ``followers``: the depthwise convolutions of groups that hold another kind of
        convolution, in forward order. Their channels are those of their input, which the other
        members decide; in a group of depthwise convolutions only, none follows.
        """
        groups, seen, followers = [], set(), set()
        for name in self.order:
            if name in seen:
                continue
            conv = self.convs[name]
            pruning = self._group(conv, range(conv.out_channels))
            members = self._members(pruning)
            partial = [m for m, idxs in members.items() if m in seen or len(idxs) != self.convs[m].out_channels]
            if partial:
                raise ValueError(
                    f"the output channels of {name!r} are coupled with only part of those of {partial} "
                    "(for instance a concatenation feeding a depthwise convolution); such networks are not supported"
                )
            group = [m for m in self.order if m in members]
            seen.update(group)
            groups.append(group)
            depthwise = [m for m in group if _follows_input(self.convs[m])]
            if len(depthwise) < len(group):
                followers.update(depthwise)
            self._remapped[group[0]] = any(dep.target.type in _REMAPPING for dep, _ in pruning)
            self._halving[group[0]] = sorted(
                {self.names[dep.target.module] for dep, _ in pruning if dep.target.type == tp.ops.OPTYPE.CUSTOMIZED}
            )
        self.followers = [name for name in self.order if name in followers]
        return groups

    def readers(self, name):
        """Convolutions, not depthwise, whose input channels are the output channels of ``name`` (forward order).

        Found as the convolutions whose input channels removing one output channel of ``name``
        removes: directly, or through BatchNorm, activations, depthwise convolutions and
        residual additions.
        """
        pruning = self._group(self.convs[name], [0])
        reading = {
            self.names[dep.target.module]
            for dep, _ in pruning
            if isinstance(dep.target.module, nn.Conv2d)
            and not self.graph.is_out_channel_pruning_fn(dep.handler)
            and not _follows_input(dep.target.module)
        }
        return [conv for conv in self.order if conv in reading]

    def paired(self, name):
        """Whether output channels i and C + i of group root ``name`` are coupled (a Max-Feature-Map follows).

        Call :meth:`groups` first: only a group that passes through an op renumbering channels
        (split, slice, concatenation, Max-Feature-Map) can pair them, and the probe is costly.
        """
        n = self.convs[name].out_channels
        if n < 2 or not self._remapped[name]:
            return False
        members = self._members(self._group(self.convs[name], range(n // 2)))
        if members.get(name) != list(range(n)) and self._halving[name]:
            raise ValueError(
                f"{self._halving[name]} halve the channels of {name!r} but are not a Max-Feature-Map "
                "Torch-Pruning can follow (torch.max of the two halves, taken by slicing, split or chunk)"
            )
        return members.get(name) == list(range(n))

    def prune(self, group, removed):
        """Remove output channels ``removed`` from every conv of ``group`` in one Torch-Pruning call."""
        pruning = self._group(self.convs[group[0]], removed)
        members = self._members(pruning)
        expected = {name: removed for name in group}
        if members != expected:
            raise ValueError(
                f"Torch-Pruning couples the channels of {group} differently than expected: removing "
                f"{removed} of {group[0]!r} would remove {members}; this architecture is not supported"
            )
        pruning.prune()


def _scale_target(graph, conv):
    """The module whose weight and bias scale conv's pre-activation: its BatchNorm if that alone reads it."""
    node = graph.graph.module2node[conv]
    consumers = {out.module for out in node.outputs}
    if len(consumers) == 1:
        (consumer,) = consumers
        if isinstance(consumer, nn.modules.batchnorm._BatchNorm):
            if not consumer.affine:
                raise ValueError(
                    f"scale cannot be applied to {graph.names[conv]!r}: the BatchNorm after it has no affine parameters"
                )
            return consumer
    return conv
