"""VGG-16 in the VGG-Face layout (Parkhi et al., 2015): 13 convolutions and 3 fully connected layers.

Module names follow torchvision's ``vgg16`` / ``vgg16_bn`` for the convolutional part
(``features.0`` ... ``features.28``, or ``features.40`` with batch normalisation). Unlike
torchvision there is no adaptive average pooling: as in VGG-Face, the last feature map is
flattened straight into the first fully connected layer, ``classifier`` is
``Flatten -> Linear -> ReLU -> Dropout -> Linear -> ReLU -> Dropout -> Linear`` and the first
Linear layer's input size follows ``input_size``.
"""

from torch import nn

from ._common import check_dropout, check_input_size, check_positive_int, check_width_mult, init_weights, scaled

__all__ = ["VGG", "vgg16"]

#: Output channels of the 13 convolutions of VGG-16, "M" for a 2x2 max-pooling.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_HIDDEN_FEATURES = 4096


class VGG(nn.Module):
    """A VGG network: ``features`` (convolutions and pooling) then ``classifier`` (Flatten and Linear).

    Build it with :func:`vgg16`.

    Parameters
    ----------
    features : nn.Sequential
        Convolutional part, mapping the input image to a feature map.
    classifier : nn.Sequential
        Fully connected part, starting with ``nn.Flatten``.
    """

    def __init__(self, features, classifier):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg16(num_classes=2622, *, batch_norm=False, input_size=224, in_channels=3, width_mult=1.0, dropout=0.5):
    """Build a randomly initialised VGG-16 in the VGG-Face layout.

    Parameters
    ----------
    num_classes : int, default=2622
        Outputs of the last Linear layer (2622 identities in VGG-Face).
    batch_norm : bool, default=False
        Insert a BatchNorm2d after every convolution (torchvision's ``vgg16_bn`` numbering).
    input_size : int or (int, int), default=224
        Height and width of the input images, at least 32. The five 2x2 max-poolings reduce it
        by 32 (rounding down), which fixes the input size of the first Linear layer:
        ``512 * (H // 32) * (W // 32)`` at ``width_mult=1``.
    in_channels : int, default=3
        Channels of the input images.
    width_mult : float, default=1.0
        Multiplier of every layer width (convolutions and the two hidden Linear layers of 4096),
        rounded down; below 1 it gives small networks for tests and quick experiments.
    dropout : float, default=0.5
        Dropout probability before the second and third Linear layers.

    Returns
    -------
    model : VGG
        The network in training mode. The last convolution is ``features.28`` (``features.40``
        with batch normalisation); the Linear layers are ``classifier.1``, ``classifier.4`` and
        ``classifier.7``.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import vgg16
    >>> model = vgg16(num_classes=2, input_size=64, width_mult=0.125).eval()
    >>> model(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 2])
    >>> model.classifier[1].in_features  # 64 channels on a 2x2 map
    256
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    in_channels = check_positive_int(in_channels, "in_channels")
    width_mult = check_width_mult(width_mult)
    height, width = check_input_size(input_size, 32)
    dropout = check_dropout(dropout)

    layers = []
    channels = in_channels
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels = scaled(item, width_mult)
        layers.append(nn.Conv2d(channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        channels = out_channels

    hidden = scaled(_HIDDEN_FEATURES, width_mult)
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * (height // 32) * (width // 32), hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
    model = VGG(nn.Sequential(*layers), classifier)
    init_weights(model)
    return model
