"""Least-squares compensation of the convolutions that read removed channels.

When a convolution loses output channels, the convolutions that read them (its *readers*, see
:func:`~sklearn_craft.surgery.channel_readers`) lose part of their input. He et al. (2017,
"Channel Pruning for Accelerating Very Deep Neural Networks") and ThiNet refit the reader so
that its output stays as close as possible to the original one. For a reader of weight ``W``
whose input channels split into kept ``k`` and removed ``r``, the output ``W x`` is best
approximated from ``x_k`` alone (least squares over every pixel of every image) by predicting
``x_r`` from ``x_k`` with a linear regression, ``x_r ≈ μ_r + A (x_k - μ_k)``,
``A = C_rk C_kk⁻¹`` (centred covariances of the reader's input), and folding it into the weights:
``W_k ← W_k + W_r A`` at every tap of the kernel, ``b ← b + Σ_taps W_r (μ_r - A μ_k)``. The removed
channels' share of the output is thus carried by the kept ones, before any fine-tuning.
"""

import copy

import numpy as np
import torch
from torch import nn

from .finetune import _record_inputs
from .images import as_image_dataset
from .inspection import _check_device
from .surgery import channel_readers

__all__ = ["compensate_readers"]


class _Moments:
    """Running float64 sums of one reader's input channels over pixels: count, Σx, Σxxᵀ."""

    def __init__(self, n_channels):
        self.count = 0
        self.sum = torch.zeros(n_channels, dtype=torch.float64)
        self.products = torch.zeros(n_channels, n_channels, dtype=torch.float64)

    def add(self, x):
        # To the CPU first: MPS has no float64.
        pixels = x.detach().transpose(0, 1).reshape(x.shape[1], -1).cpu().double()
        self.count += pixels.shape[1]
        self.sum += pixels.sum(dim=1)
        self.products += pixels @ pixels.T

    def mean_covariance(self):
        mean = self.sum / self.count
        return mean, self.products / self.count - torch.outer(mean, mean)


def _reader_inputs(model, kept, example_input):
    """Reader conv name -> the indices of its input channels that ``kept`` keeps.

    Only dense readers (``groups=1``) whose input channels are the output channels of the layer
    they read, one for one, and that lose some of them.
    """
    readers = channel_readers(model, example_input)
    inputs, ambiguous = {}, set()
    for layer, indices in kept.items():
        n_out = model.get_submodule(layer).out_channels
        if len(indices) == n_out:
            continue
        for name in readers.get(layer, []):
            reader = model.get_submodule(name)
            if reader.groups != 1 or reader.in_channels != n_out:
                ambiguous.add(name)
            elif inputs.setdefault(name, list(indices)) != list(indices):
                ambiguous.add(name)
    return {name: indices for name, indices in inputs.items() if name not in ambiguous}


def _moments(model, names, dataset, batch_size, device, preprocess, num_workers, prefix=None):
    """Moments of the inputs of the convolutions ``names`` of ``model`` (eval mode) over ``dataset``."""
    modules = [model.get_submodule(name) for name in names]
    moments = [_Moments(module.in_channels) for module in modules]
    _record_inputs(
        model,
        modules,
        dataset,
        batch_size,
        device,
        preprocess,
        num_workers,
        lambda index, x: moments[index].add(x),
        prefix=prefix,
    )
    return dict(zip(names, moments))


def _compensate(conv, kept, mean, covariance, ridge):
    """Fold the least-squares prediction of the removed input channels into ``conv``'s kept ones."""
    n = conv.in_channels
    kept = torch.as_tensor(kept)
    removed = torch.as_tensor(np.setdiff1d(np.arange(n), kept.numpy()))
    c_kk = covariance[kept][:, kept]
    c_rk = covariance[removed][:, kept]
    # A small ridge keeps the solve stable when kept channels are collinear (or constant).
    c_kk = c_kk + ridge * max(float(torch.diagonal(c_kk).mean()), 1e-12) * torch.eye(len(kept), dtype=c_kk.dtype)
    A = torch.linalg.solve(c_kk, c_rk.T).T  # (removed, kept)
    weight = conv.weight.detach().double()
    w_removed = weight[:, removed]
    shift = (mean[removed] - A @ mean[kept]).to(weight.dtype)
    with torch.no_grad():
        new_weight = weight.clone()
        new_weight[:, kept] += torch.einsum("orij,rk->okij", w_removed, A)
        conv.weight.copy_(new_weight.to(conv.weight.dtype))
        offset = torch.einsum("orij,r->o", w_removed, shift).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(offset.clone(), requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.add_(offset)


def compensate_readers(
    model, X, kept, example_input, *, batch_size=64, device="cpu", preprocess=None, num_workers=0, ridge=1e-4
):
    """Return a copy of ``model`` whose readers carry the channels that ``kept`` removes.

    For every convolution named in ``kept`` that loses channels, each dense convolution that
    reads its output channels (through BatchNorm, activations and depthwise convolutions, see
    :func:`~sklearn_craft.surgery.channel_readers`) gets the least-squares compensation of the
    module docstring, computed from the moments of its input over the images ``X`` in one
    forward pass (it stops after the last reader). The removed input channels' weights are left
    as they are: :func:`~sklearn_craft.surgery.prune_channels` with the same selection then
    cuts them, giving a pruned network whose readers see the kept channels only and whose
    outputs are as close as a linear fit can make them to the original ones (exactly equal
    when the removed channels are linear functions of the kept ones).

    Parameters
    ----------
    model : torch.nn.Module
        The network before surgery; it is deep-copied and never modified.
    X : ndarray, torch.Tensor, Dataset or DataLoader
        Images the moments are computed on (see :func:`sklearn_craft.images.as_image_dataset`),
        usually the task's training images.
    kept : dict of str to sequence of int
        Conv name -> the output channels it keeps, coupling resolved, as returned by
        ``prune_channels(..., return_kept=True)``.
    example_input : torch.Tensor
        A batch the model accepts, traced to find the readers.
    batch_size : int, default=64
        Images per forward pass.
    device : str or torch.device, default="cpu"
        Where the forward pass runs; the returned copy is on the CPU.
    preprocess : callable, default=None
        Applied to every batch before the network sees it.
    num_workers : int, default=0
        Worker processes that read a Dataset's images.
    ridge : float, default=1e-4
        Ridge added to the kept channels' covariance, relative to its mean diagonal.

    Returns
    -------
    compensated : torch.nn.Module
        The copy, on the CPU. A reader without bias gets one (the constant part of the
        prediction); readers of a concatenation of several layers' channels and grouped
        convolutions are left as they are.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_craft.compensation import compensate_readers
    >>> from sklearn_craft.surgery import prune_channels
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1))
    >>> X = torch.rand(32, 3, 5, 5)
    >>> # Six responses of three inputs: any three of them determine the other three exactly.
    >>> kept = {"0": [0, 2, 4]}
    >>> compensated = compensate_readers(model, X, kept, X[:1], ridge=0.0)
    >>> pruned = prune_channels(compensated, kept, X[:1])
    >>> torch.allclose(pruned(X), model(X), atol=1e-4)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(kept, dict):
        raise TypeError(f"kept must be a dict of conv name -> kept channel indices, got {type(kept).__name__}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ValueError(f"ridge must be a non-negative float, got {ridge!r}")
    device = _check_device(device)
    dataset = as_image_dataset(X, name="X")
    return _compensated_copy(model, dataset, kept, example_input, (batch_size, device, preprocess, num_workers), ridge)


def _compensated_copy(model, dataset, kept, example_input, pass_args, ridge=1e-4, prefix=None):
    """:func:`compensate_readers` of checked arguments (``pass_args``: batch size, device,
    preprocess, workers); the pass starts from ``prefix``'s values where they serve the model
    (a :class:`~sklearn_craft._prefix.GraphPrefix` over ``dataset`` with the same batches)."""
    compensated = copy.deepcopy(model).cpu()
    inputs = _reader_inputs(compensated, kept, example_input.cpu())
    if not inputs:
        return compensated
    batch_size, device, preprocess, num_workers = pass_args
    moments = _moments(
        compensated.to(device), list(inputs), dataset, batch_size, device, preprocess, num_workers, prefix
    )
    compensated = compensated.cpu()
    for name, indices in inputs.items():
        mean, covariance = moments[name].mean_covariance()
        _compensate(compensated.get_submodule(name), indices, mean, covariance, ridge)
    return compensated
