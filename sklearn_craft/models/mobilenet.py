"""MobileNet V1 (Howard et al., 2017) and MobileNet V2 (Sandler et al., 2018).

MobileNet V1 follows Table I of the MobileNets facial-attributes paper: a 3x3 convolution then 13
depthwise separable blocks (3x3 depthwise convolution, BatchNorm, ReLU, 1x1 pointwise
convolution, BatchNorm, ReLU), global average pooling and one Linear layer. Block ``i`` is
``features.i``: its depthwise convolution is ``features.i.0`` and its pointwise one
``features.i.3``. Its two hyper-parameters are the width multiplier alpha (channels) and the
resolution multiplier rho (input size ``round(rho * 224)``); :func:`mobilenet_v1_costs` compares
its multiply-adds and parameters with those of the same network built from standard
convolutions, for any alpha and rho.

MobileNet V2 uses the module names of ``torchvision.models.mobilenet_v2`` (``features.0.0``,
``features.1.conv.0.0``, ..., ``classifier.1``), so its state dicts load with
:func:`~sklearn_craft.models.load_weights`. Every activation is a module of its own (no module is
called twice) and none works in place.
"""

import math
from numbers import Real

import pandas as pd
import torch
from torch import nn

from ..profiling import count_flops, count_parameters
from ._common import check_dropout, check_positive_int, check_width_mult, init_weights, scaled

__all__ = ["MobileNetV1", "MobileNetV2", "InvertedResidual", "mobilenet_v1", "mobilenet_v1_costs", "mobilenet_v2"]

#: Input side of MobileNet V1 at resolution multiplier 1 (the MobileNets paper's 224x224).
BASE_RESOLUTION = 224

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
    resolution_mult : float, default=1.0
        Resolution multiplier rho, already checked by :func:`mobilenet_v1`; it sets
        ``input_size`` only (global average pooling accepts any input size).
    separable : bool, default=True
        False replaces every depthwise separable block by one standard 3x3 convolution with the
        same stride and output channels, followed by BatchNorm and ReLU (``features.i.0``): the
        "Conv MobileNet" the MobileNets paper compares against.

    Attributes
    ----------
    width_mult, resolution_mult : float
        The multipliers the network was built with.
    input_size : int
        Side of the square input images it is meant for, ``round(resolution_mult * 224)``.
    input_shape : tuple of int
        ``(in_channels, input_size, input_size)``, the shape of one example as
        :mod:`sklearn_craft.profiling` takes it.
    """

    def __init__(self, num_classes, width_mult, in_channels, resolution_mult=1.0, *, separable=True):
        super().__init__()
        self.width_mult = width_mult
        self.resolution_mult = resolution_mult
        self.input_size = _resolution(resolution_mult)
        channels = scaled(32, width_mult)
        blocks = [_conv_bn_act(in_channels, channels, stride=2)]
        for out_channels, stride in _V1_BLOCKS:
            out_channels = scaled(out_channels, width_mult)
            if separable:
                depthwise = _conv_bn_act(channels, channels, stride=stride, groups=channels)
                pointwise = _conv_bn_act(channels, out_channels, kernel_size=1)
                blocks.append(nn.Sequential(*depthwise, *pointwise))
            else:
                blocks.append(_conv_bn_act(channels, out_channels, stride=stride))
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    @property
    def input_shape(self):
        return (self.features[0][0].in_channels, self.input_size, self.input_size)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _resolution(resolution_mult):
    """Input side ``round(resolution_mult * 224)``, halves rounded up (rho = 6/7 gives 192)."""
    return math.floor(resolution_mult * BASE_RESOLUTION + 0.5)


def _check_resolution_mult(resolution_mult):
    """Return ``resolution_mult`` as a float if it is a real number in (0, 1] giving at least 1 pixel."""
    if isinstance(resolution_mult, bool) or not isinstance(resolution_mult, Real):
        raise TypeError(
            f"resolution_mult must be a real number, got {type(resolution_mult).__name__} {resolution_mult!r}"
        )
    if not 0 < resolution_mult <= 1:
        raise ValueError(f"resolution_mult must be in (0, 1], got {resolution_mult!r}")
    if _resolution(resolution_mult) < 1:
        raise ValueError(
            f"resolution_mult must give an input of at least 1 pixel (round(rho * {BASE_RESOLUTION}) >= 1), "
            f"got {resolution_mult!r}"
        )
    return float(resolution_mult)


def mobilenet_v1(num_classes=1000, *, width_mult=1.0, resolution_mult=1.0, in_channels=3):
    """Build a randomly initialised MobileNet V1.

    Parameters
    ----------
    num_classes : int, default=1000
        Outputs of the final Linear layer ``classifier`` (40 for the CelebA attributes).
    width_mult : float, default=1.0
        The width multiplier alpha of the MobileNets paper: every layer has
        ``int(alpha * channels)`` channels (at least 1); 0.25, 0.5 and 0.75 are the usual
        values.
    resolution_mult : float in (0, 1], default=1.0
        The resolution multiplier rho of the MobileNets paper: the network is meant for
        square inputs of side ``round(rho * 224)`` (halves rounded up), so 1, 6/7, 5/7 and 4/7
        give 224, 192, 160 and 128; 2/7 gives 64. The layers do not depend on it: it is
        recorded as ``model.input_size`` and ``model.input_shape``, which the profiling
        functions take, e.g. ``count_flops(model, model.input_shape)``.
    in_channels : int, default=3
        Channels of the input images.

    Returns
    -------
    model : MobileNetV1
        The network in training mode. It ends with global average pooling, so it accepts any
        input size (the stride is 32); multiply-adds scale with ``rho ** 2``.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``num_classes`` or ``in_channels`` is < 1, ``width_mult <= 0``, or
        ``resolution_mult`` is outside (0, 1] or gives less than 1 pixel.

    See Also
    --------
    mobilenet_v1_costs : multiply-adds and parameters against standard convolutions.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import mobilenet_v1
    >>> model = mobilenet_v1(num_classes=40, width_mult=0.25, resolution_mult=4 / 7).eval()
    >>> model.input_size, model.input_shape
    (128, (3, 128, 128))
    >>> model(torch.zeros(1, *model.input_shape)).shape
    torch.Size([1, 40])
    >>> model.features[1][0].groups, model.features[1][3].kernel_size  # depthwise, pointwise
    (8, (1, 1))
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    in_channels = check_positive_int(in_channels, "in_channels")
    width_mult = check_width_mult(width_mult)
    resolution_mult = _check_resolution_mult(resolution_mult)
    model = MobileNetV1(num_classes, width_mult, in_channels, resolution_mult)
    init_weights(model)
    return model


def mobilenet_v1_costs(
    width_mults=(1.0, 0.75, 0.5, 0.25), resolution_mults=(1.0, 6 / 7, 5 / 7, 4 / 7), *, num_classes=1000, in_channels=3
):
    """Multiply-adds and parameters of MobileNet V1 against the same network with standard convolutions.

    The comparison of the MobileNets papers (Howard et al. 2017, Tables 4, 6 and 7; Wang & Wong,
    section III-B): each of the 13 depthwise separable blocks, which costs
    ``D_K * D_K * M * D_F * D_F + M * N * D_F * D_F`` multiply-adds (a ``D_K x D_K`` depthwise
    convolution of ``M`` channels, then a 1x1 convolution to ``N`` channels, on a
    ``D_F x D_F`` output map), is replaced by one standard ``D_K x D_K`` convolution costing
    ``D_K * D_K * M * N * D_F * D_F``; the first convolution, the BatchNorm layers and the
    classifier are the same in both. Their ratio is ``1 / N + 1 / D_K ** 2`` per block.
    Multiply-adds are :func:`sklearn_craft.profiling.count_flops` (which counts one per
    multiplication, the classifier included) at ``model.input_shape``; parameters are
    :func:`sklearn_craft.profiling.count_parameters` (BatchNorm weights included). The networks
    are built on the meta device: nothing is allocated.

    Parameters
    ----------
    width_mults : sequence of float, default=(1.0, 0.75, 0.5, 0.25)
        Width multipliers alpha.
    resolution_mults : sequence of float, default=(1.0, 6/7, 5/7, 4/7)
        Resolution multipliers rho (inputs 224, 192, 160 and 128).
    num_classes : int, default=1000
        Outputs of the classifier (1000 as in the MobileNets paper, 40 for the CelebA
        attributes).
    in_channels : int, default=3
        Channels of the input images.

    Returns
    -------
    costs : pandas.DataFrame
        One row per (alpha, rho), alpha varying slowest; columns ``width_mult``,
        ``resolution_mult``, ``input_size``, ``mult_adds`` and ``parameters`` (MobileNet),
        ``standard_mult_adds`` and ``standard_parameters`` (standard convolutions), and
        ``mult_adds_ratio`` and ``parameters_ratio`` (standard / MobileNet).

    Examples
    --------
    >>> from sklearn_craft.models import mobilenet_v1_costs
    >>> costs = mobilenet_v1_costs(width_mults=[1.0], resolution_mults=[1.0])
    >>> row = costs.iloc[0]
    >>> int(row["input_size"]), int(row["mult_adds"]), int(row["parameters"])  # 569 M, 4.2 M
    (224, 568740352, 4231976)
    >>> int(row["standard_mult_adds"]), int(row["standard_parameters"])  # 4866 M, 29.3 M in the paper
    (4867293184, 29294088)
    >>> round(float(row["mult_adds_ratio"]), 2)  # standard convolutions do 8.6 times the work
    8.56
    """
    width_mults = [check_width_mult(alpha) for alpha in _as_list(width_mults, "width_mults")]
    resolution_mults = [_check_resolution_mult(rho) for rho in _as_list(resolution_mults, "resolution_mults")]
    num_classes = check_positive_int(num_classes, "num_classes")
    in_channels = check_positive_int(in_channels, "in_channels")
    rows = []
    for alpha in width_mults:
        for rho in resolution_mults:
            with torch.device("meta"):
                separable = MobileNetV1(num_classes, alpha, in_channels, rho)
                standard = MobileNetV1(num_classes, alpha, in_channels, rho, separable=False)
            row = {"width_mult": alpha, "resolution_mult": rho, "input_size": separable.input_size}
            for prefix, model in (("", separable), ("standard_", standard)):
                row[f"{prefix}mult_adds"] = count_flops(model, model.input_shape)
                row[f"{prefix}parameters"] = count_parameters(model)
            rows.append(row)
    costs = pd.DataFrame(rows)
    costs["mult_adds_ratio"] = costs["standard_mult_adds"] / costs["mult_adds"]
    costs["parameters_ratio"] = costs["standard_parameters"] / costs["parameters"]
    return costs


def _as_list(values, name):
    """``values`` as a non-empty list (a single number is refused: it is easy to pass by mistake)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__} {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    return values


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
