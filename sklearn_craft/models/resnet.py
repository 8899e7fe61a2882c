"""ResNet-18 (He et al., 2016) with torchvision's module names.

Parameter and buffer names are those of ``torchvision.models.resnet18`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ..., ``layer2.0.downsample.0``, ``fc``), so its state dicts load with
:func:`~sklearn_craft.models.load_weights`. One difference: torchvision's ``BasicBlock`` calls a
single ``relu`` module twice, here each block has two distinct modules ``relu1`` (after
``bn1``) and ``relu2`` (after the residual addition). A module called twice cannot be told
apart by a forward hook, and :class:`~sklearn_craft.pooling.ActivationPooler` hooks the
activation that follows each convolution. ReLU has no parameters, so state dicts are unchanged.
"""

import torch
from torch import nn

from ._common import check_positive_int, check_width_mult, init_weights, scaled

__all__ = ["BasicBlock", "ResNet", "resnet18"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch normalisation and an identity (or 1x1 projection) shortcut.

    Parameters
    ----------
    in_channels : int
        Channels of the block's input.
    out_channels : int
        Channels of both convolutions and of the output.
    stride : int, default=1
        Stride of the first convolution; a projection shortcut ``downsample`` (1x1 convolution
        and BatchNorm2d) is used when it is not 1 or the channel count changes.
    """

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """ResNet made of :class:`BasicBlock` stages; build it with :func:`resnet18`.

    Parameters
    ----------
    blocks_per_stage : sequence of 4 ints
        Number of blocks in ``layer1`` ... ``layer4`` (2, 2, 2, 2 for ResNet-18).
    num_classes : int
        Outputs of ``fc``.
    in_channels : int
        Channels of the input images.
    width_mult : float
        Multiplier of the stage widths 64, 128, 256, 512.
    """

    def __init__(self, blocks_per_stage, num_classes, in_channels, width_mult):
        super().__init__()
        widths = [scaled(w, width_mult) for w in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = widths[0]
        for stage, (width, n_blocks) in enumerate(zip(widths, blocks_per_stage), start=1):
            blocks = []
            for i in range(n_blocks):
                blocks.append(BasicBlock(channels, width, stride=2 if i == 0 and stage > 1 else 1))
                channels = width
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes=1000, *, in_channels=3, width_mult=1.0):
    """Build a randomly initialised ResNet-18.

    Parameters
    ----------
    num_classes : int, default=1000
        Outputs of the final Linear layer ``fc``.
    in_channels : int, default=3
        Channels of the input images.
    width_mult : float, default=1.0
        Multiplier of the stage widths 64, 128, 256, 512 (rounded down); below 1 it gives small
        networks for tests and quick experiments.

    Returns
    -------
    model : ResNet
        The network in training mode. It ends with global average pooling, so it accepts
        any input size (the stride is 32).

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import resnet18
    >>> model = resnet18(num_classes=3).eval()
    >>> model(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 3])
    >>> sum(p.numel() for p in resnet18().parameters())  # as torchvision's resnet18
    11689512
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    in_channels = check_positive_int(in_channels, "in_channels")
    width_mult = check_width_mult(width_mult)
    model = ResNet((2, 2, 2, 2), num_classes, in_channels, width_mult)
    init_weights(model)
    return model
