"""LightCNN-9 (Wu et al., 2018) and its Max-Feature-Map (MFM) activation.

An MFM 2/1 layer is a convolution (or Linear layer) producing 2C channels followed by
:class:`MaxFeatureMap`, which keeps the element-wise maximum of channel i and channel C + i.
Parameter names follow the reference implementation (``AlfredXiangWu/LightCNN``,
``network_9layers``): ``features.0.filter``, ``features.2.conv_a.filter``,
``features.2.conv.filter``, ..., ``fc1.filter``, ``fc2``, so its checkpoints load with
:func:`~sklearn_craft.models.load_weights` (which strips the ``module.`` prefix of
``DataParallel``). Unlike the reference, ``forward`` returns only the logits, not the pair
(logits, fc1 features).

Pruning note (Low-cost TL paper, section 4): keeping output channel i of an MFM layer keeps both
halves feeding it, filters i and C + i of the preceding convolution. :class:`MaxFeatureMap` reads
C from its input at run time, so it keeps working after such channel surgery.
"""

import torch
import torch.fx
from torch import nn

from ._common import check_dropout, check_input_size, check_positive_int, check_width_mult, init_weights, scaled

__all__ = ["LightCNN9", "MaxFeatureMap", "MFMLayer", "lightcnn9"]


class MaxFeatureMap(nn.Module):
    """Max-Feature-Map 2/1: the element-wise max of the two halves of dimension 1.

    For an input of 2C channels (N x 2C x H x W, or N x 2C after a Linear layer) the output has C
    channels, ``out[:, i] = max(x[:, i], x[:, C + i])``. C is read from the input on every call,
    never stored, so the module has no parameters and follows channel pruning of the layer
    before it.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import MaxFeatureMap
    >>> MaxFeatureMap()(torch.tensor([[1.0, 5.0, 3.0, 2.0]]))
    tensor([[3., 5.]])
    """

    def forward(self, x):
        # Under torch.fx symbolic tracing the channel count is unknown; it is checked when the graph runs.
        if not isinstance(x, torch.fx.Proxy) and x.shape[1] % 2:
            raise ValueError(f"MaxFeatureMap needs an even number of channels, got {x.shape[1]}")
        half = x.shape[1] // 2
        return torch.max(x[:, :half], x[:, half:])


class MFMLayer(nn.Module):
    """An MFM 2/1 layer: ``filter`` (Conv2d or Linear with 2C outputs) then ``mfm`` (:class:`MaxFeatureMap`).

    Parameters
    ----------
    in_channels : int
        Input channels (or input features when ``linear=True``).
    out_channels : int
        C, the output channels after the max; ``filter`` has 2C outputs.
    kernel_size, stride, padding : int, default=3, 1, 1
        Of the convolution; ignored when ``linear=True``.
    linear : bool, default=False
        Use a Linear layer instead of a convolution (LightCNN's ``fc1``).
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, linear=False):
        super().__init__()
        if linear:
            self.filter = nn.Linear(in_channels, 2 * out_channels)
        else:
            self.filter = nn.Conv2d(in_channels, 2 * out_channels, kernel_size, stride, padding)
        self.mfm = MaxFeatureMap()

    def forward(self, x):
        return self.mfm(self.filter(x))


class _Group(nn.Module):
    """LightCNN "group": a 1x1 MFM layer ``conv_a`` keeping the width, then a k x k MFM layer ``conv``."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv_a = MFMLayer(in_channels, in_channels, 1, 1, 0)
        self.conv = MFMLayer(in_channels, out_channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(self.conv_a(x))


def _pooled(size, n_pools):
    """Side length after ``n_pools`` 2x2 max-poolings with ``ceil_mode=True``."""
    for _ in range(n_pools):
        size = -(-size // 2)
    return size


class LightCNN9(nn.Module):
    """LightCNN-9; build it with :func:`lightcnn9`.

    Parameters
    ----------
    num_classes : int
        Outputs of ``fc2``.
    in_channels : int
        Channels of the input images.
    input_size : (int, int)
        Height and width of the input images.
    width_mult : float
        Multiplier of every layer width.
    dropout : float
        Dropout probability between ``fc1`` and ``fc2``.
    """

    def __init__(self, num_classes, in_channels, input_size, width_mult, dropout):
        super().__init__()
        c1, c2, c3, c4, hidden = (scaled(c, width_mult) for c in (48, 96, 192, 128, 256))
        self.features = nn.Sequential(
            MFMLayer(in_channels, c1, 5, 1, 2),
            nn.MaxPool2d(2, 2, ceil_mode=True),
            _Group(c1, c2),
            nn.MaxPool2d(2, 2, ceil_mode=True),
            _Group(c2, c3),
            nn.MaxPool2d(2, 2, ceil_mode=True),
            _Group(c3, c4),
            _Group(c4, c4),
            nn.MaxPool2d(2, 2, ceil_mode=True),
        )
        height, width = (_pooled(s, 4) for s in input_size)
        self.flatten = nn.Flatten()
        self.fc1 = MFMLayer(c4 * height * width, hidden, linear=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.dropout(self.fc1(self.flatten(self.features(x)))))


def lightcnn9(num_classes=79077, *, in_channels=1, input_size=128, width_mult=1.0, dropout=0.5):
    """Build a randomly initialised LightCNN-9.

    Parameters
    ----------
    num_classes : int, default=79077
        Outputs of the final Linear layer ``fc2`` (79077 identities of MS-Celeb-1M in the
        reference model).
    in_channels : int, default=1
        Channels of the input images (grayscale in the reference model).
    input_size : int or (int, int), default=128
        Height and width of the input images, at least 1. Four 2x2 max-poolings with
        ``ceil_mode=True`` reduce it to ``ceil(size / 16)``, which fixes the input size of
        ``fc1``: ``128 * 8 * 8`` at 128x128.
    width_mult : float, default=1.0
        Multiplier of every layer width (48, 96, 192, 128 MFM channels and 256 fc1 features),
        rounded down; below 1 it gives small networks for tests.
    dropout : float, default=0.5
        Dropout probability between ``fc1`` and ``fc2``.

    Returns
    -------
    model : LightCNN9
        The network in training mode, returning the logits of ``fc2``. Its 10 MFM layers are
        ``features.0``, ``features.{2,4,6,7}.conv_a`` and ``features.{2,4,6,7}.conv`` (the 9
        convolutions that name the network) and ``fc1``.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import lightcnn9
    >>> model = lightcnn9(num_classes=10, input_size=32, width_mult=0.25).eval()
    >>> model(torch.zeros(1, 1, 32, 32)).shape
    torch.Size([1, 10])
    >>> model.features[0].filter.out_channels  # 2 x 12 filters feed 12 MFM channels
    24
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    in_channels = check_positive_int(in_channels, "in_channels")
    width_mult = check_width_mult(width_mult)
    dropout = check_dropout(dropout)
    input_size = check_input_size(input_size, 1)
    model = LightCNN9(num_classes, in_channels, input_size, width_mult, dropout)
    init_weights(model)
    return model
