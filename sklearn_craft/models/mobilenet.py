"""MobileNet V1 (Howard et al., 2017) and MobileNet V2 (Sandler et al., 2018).

MobileNet V1 follows Table I of the MobileNets facial-attributes paper: a 3x3 convolution then 13
depthwise separable blocks (3x3 depthwise convolution, BatchNorm, ReLU, 1x1 pointwise
convolution, BatchNorm, ReLU), global average pooling and one Linear layer. Block ``i`` is
``features.i``: its depthwise convolution is ``features.i.0`` and its pointwise one
``features.i.3``.

MobileNet V2 uses the module names of ``torchvision.models.mobilenet_v2`` (``features.0.0``,
``features.1.conv.0.0``, ..., ``classifier.1``), so its state dicts load with
:func:`~sklearn_craft.models.load_weights`. Every activation is a module of its own (no module is
called twice) and none works in place.
"""

import torch
from torch import nn

from ._common import check_dropout, check_positive_int, check_width_mult, init_weights, scaled

__all__ = ["MobileNetV1", "MobileNetV2", "InvertedResidual", "mobilenet_v1", "mobilenet_v2"]

#: (output channels, stride) of the 13 depthwise separable blocks of MobileNet V1.
_V1_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)

#: (expansion t, output channels c, repeats n, first stride s) of the MobileNet V2 stages.
_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_act(in_channels, out_channels, kernel_size=3, stride=1, groups=1, activation=nn.ReLU):
    """Conv2d (no bias, "same" padding) -> BatchNorm2d -> activation, as an indexable Sequential."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        activation(),
    )


class MobileNetV1(nn.Module):
    """MobileNet V1; build it with :func:`mobilenet_v1`.

    Parameters
    ----------
    num_classes : int
        Outputs of ``classifier``.
    width_mult : float
        Width multiplier alpha of every layer.
    in_channels : int
        Channels of the input images.
    """

    def __init__(self, num_classes, width_mult, in_channels):
        super().__init__()
        channels = scaled(32, width_mult)
        blocks = [_conv_bn_act(in_channels, channels, stride=2)]
        for out_channels, stride in _V1_BLOCKS:
            out_channels = scaled(out_channels, width_mult)
            depthwise = _conv_bn_act(channels, channels, stride=stride, groups=channels)
            pointwise = _conv_bn_act(channels, out_channels, kernel_size=1)
            blocks.append(nn.Sequential(*depthwise, *pointwise))
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v1(num_classes=1000, *, width_mult=1.0, in_channels=3):
    """Build a randomly initialised MobileNet V1.

    Parameters
    ----------
    num_classes : int, default=1000
        Outputs of the final Linear layer ``classifier`` (40 for the CelebA attributes).
    width_mult : float, default=1.0
        The width multiplier alpha of the MobileNets paper: every layer has
        ``int(alpha * channels)`` channels (at least 1); 0.25, 0.5 and 0.75 are the usual
        values.
    in_channels : int, default=3
        Channels of the input images.

    Returns
    -------
    model : MobileNetV1
        The network in training mode. It ends with global average pooling, so it accepts any
        input size (the resolution multiplier of the paper is the choice of input size; the
        stride is 32).

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import mobilenet_v1
    >>> model = mobilenet_v1(num_classes=40, width_mult=0.25).eval()
    >>> model(torch.zeros(1, 3, 128, 128)).shape
    torch.Size([1, 40])
    >>> model.features[1][0].groups, model.features[1][3].kernel_size  # depthwise, pointwise
    (8, (1, 1))
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    in_channels = check_positive_int(in_channels, "in_channels")
    width_mult = check_width_mult(width_mult)
    model = MobileNetV1(num_classes, width_mult, in_channels)
    init_weights(model)
    return model


def _make_divisible(value, divisor=8):
    """Round ``value`` to the nearest multiple of ``divisor``, losing at most 10% (MobileNet V2's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """MobileNet V2 block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection, identity shortcut.

    Parameters
    ----------
    in_channels : int
        Channels of the block's input.
    out_channels : int
        Channels of the projection.
    stride : int
        Stride of the depthwise convolution; the shortcut is used only when it is 1 and the
        channel count is unchanged.
    expand_ratio : int
        Expansion factor t; with t = 1 there is no expansion convolution.
    """

    def __init__(self, in_channels, out_channels, stride, expand_ratio):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(in_channels, hidden, kernel_size=1, activation=nn.ReLU6))
        layers += [
            _conv_bn_act(hidden, hidden, stride=stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNet V2; build it with :func:`mobilenet_v2`.

    Parameters
    ----------
    num_classes : int
        Outputs of ``classifier.1``.
    width_mult : float
        Width multiplier of every layer (rounded to multiples of 8).
    in_channels : int
        Channels of the input images.
    dropout : float
        Dropout probability before the Linear layer.
    """

    def __init__(self, num_classes, width_mult, in_channels, dropout):
        super().__init__()
        channels = _make_divisible(32 * width_mult)
        last_channels = _make_divisible(1280 * max(1.0, width_mult))
        layers = [_conv_bn_act(in_channels, channels, stride=2, activation=nn.ReLU6)]
        for expand_ratio, out_channels, repeats, stride in _V2_STAGES:
            out_channels = _make_divisible(out_channels * width_mult)
            for i in range(repeats):
                layers.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, expand_ratio))
                channels = out_channels
        layers.append(_conv_bn_act(channels, last_channels, kernel_size=1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v2(num_classes=1000, *, width_mult=1.0, in_channels=3, dropout=0.2):
    """Build a randomly initialised MobileNet V2.

    Parameters
    ----------
    num_classes : int, default=1000
        Outputs of the final Linear layer ``classifier.1``.
    width_mult : float, default=1.0
        Width multiplier; channel counts are rounded to multiples of 8 as in torchvision, and
        the last 1x1 convolution keeps 1280 channels when ``width_mult < 1``.
    in_channels : int, default=3
        Channels of the input images.
    dropout : float, default=0.2
        Dropout probability before the Linear layer.

    Returns
    -------
    model : MobileNetV2
        The network in training mode; it accepts any input size (global average pooling).

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import mobilenet_v2
    >>> model = mobilenet_v2(num_classes=5, width_mult=0.5).eval()
    >>> model(torch.zeros(1, 3, 96, 96)).shape
    torch.Size([1, 5])
    >>> sum(p.numel() for p in mobilenet_v2().parameters())  # as torchvision's mobilenet_v2
    3504872
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    in_channels = check_positive_int(in_channels, "in_channels")
    width_mult = check_width_mult(width_mult)
    dropout = check_dropout(dropout)
    model = MobileNetV2(num_classes, width_mult, in_channels, dropout)
    init_weights(model)
    return model
