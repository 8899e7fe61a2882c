"""MobileFaceNet, the face-recognition network of Chen et al. (arXiv:1804.07573).

Re-implemented from the description of ``MobileFacenet`` in ``Xiaoccer/MobileFaceNet_Pytorch``
(``core/model.py``). Module names follow that definition so that its CASIA-WebFace checkpoint
(``068.ckpt``, ``net_state_dict``) loads with ``strict=True``.
"""

from torch import nn

from ._common import init_weights

__all__ = ["MobileFaceNet", "mobilefacenet"]

#: Inverted-residual stages: expansion t, output channels c, repeats n, first stride s.
_BOTTLENECK_STAGES = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class _ConvUnit(nn.Module):
    """Conv2d -> BatchNorm2d [-> PReLU], stored as ``conv``, ``bn``, ``prelu`` (checkpoint names)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, *, depthwise=False, linear=False):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            groups=in_channels if depthwise else 1,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.prelu = None if linear else nn.PReLU(out_channels)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class _Bottleneck(nn.Module):
    """MobileNetV2 inverted residual with PReLU: 1x1 expand, 3x3 depthwise, 1x1 linear projection.

    The identity shortcut is used only when stride is 1 and the channel count is unchanged.
    """

    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        # A flat Sequential: its indices 0..7 are the checkpoint's ``blocks.<i>.conv.<j>`` names.
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet: RGB 112x96 face crop -> 128-d embedding.

    Layers: ``conv1`` (3x3, stride 2), ``dw_conv1`` (3x3 depthwise), ``blocks`` (15 inverted
    residual bottlenecks with PReLU), ``conv2`` (1x1 to 512), ``linear7`` (the 7x6 depthwise
    "global depthwise convolution", no activation) and ``linear1`` (1x1 to 128, no activation).
    The input must be exactly 112x96 because ``linear7`` consumes the whole 7x6 map.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models.mobilefacenet import MobileFaceNet
    >>> MobileFaceNet().eval()(torch.zeros(2, 3, 112, 96)).shape
    torch.Size([2, 128])
    """

    embedding_size = 128

    def __init__(self):
        super().__init__()
        self.conv1 = _ConvUnit(3, 64, 3, 2, 1)
        self.dw_conv1 = _ConvUnit(64, 64, 3, 1, 1, depthwise=True)
        blocks = []
        in_channels = 64
        for expansion, out_channels, repeats, stride in _BOTTLENECK_STAGES:
            for i in range(repeats):
                blocks.append(_Bottleneck(in_channels, out_channels, stride if i == 0 else 1, expansion))
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = _ConvUnit(in_channels, 512, 1, 1, 0)
        self.linear7 = _ConvUnit(512, 512, (7, 6), 1, 0, depthwise=True, linear=True)
        self.linear1 = _ConvUnit(512, self.embedding_size, 1, 1, 0, linear=True)
        init_weights(self)

    def forward(self, x):
        x = self.blocks(self.dw_conv1(self.conv1(x)))
        x = self.linear1(self.linear7(self.conv2(x)))
        return x.flatten(1)


def mobilefacenet(weights=None):
    """Build MobileFaceNet, randomly initialised or with pretrained weights.

    Parameters
    ----------
    weights : str, path-like or None, default=None
        None for random initialisation; otherwise the path of a checkpoint of
        ``Xiaoccer/MobileFaceNet_Pytorch`` (a dict holding ``net_state_dict``) or of a plain
        state dict with the same keys. Loaded on CPU with ``strict=True``; nothing is downloaded.

    Returns
    -------
    model : MobileFaceNet
        The network in eval mode. Input: RGB 112x96 (H x W) normalised as
        ``(pixel - 127.5) / 128`` (see ``preset("mobilefacenet")``); output: (N, 128)
        embeddings, to be compared with cosine similarity.

    Examples
    --------
    >>> from sklearn_craft.models import mobilefacenet
    >>> model = mobilefacenet()
    >>> sum(p.numel() for p in model.parameters())
    999552
    """
    from .weights import load_weights

    model = MobileFaceNet()
    if weights is not None:
        load_weights(model, weights)
    return model.eval()
