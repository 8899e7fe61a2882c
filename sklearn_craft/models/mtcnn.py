"""The output network (O-Net) of MTCNN face detection (Zhang et al., 2016).

Re-implemented from the description of ``ONet`` in ``timesler/facenet-pytorch``
(``models/mtcnn.py``); module names follow it so that facenet-pytorch's ``onet.pt`` loads with
``strict=True``. The one deliberate difference: facenet-pytorch flattens the last feature map
in channels-last order (a legacy of the TensorFlow weights) before ``dense5``; this port
flattens channels-first, the layout that channel surgery understands, and reorders the columns
of ``dense5.weight`` when it reads facenet-pytorch's file. The network computes the same
function as the original.
"""

import torch
from torch import nn

from ._common import init_weights

__all__ = ["ONet", "mtcnn_onet"]


class ONet(nn.Module):
    """MTCNN O-Net: RGB 48x48 candidate window -> face score, box regression, 5 landmarks.

    Four convolutions with PReLU (32, 64, 64, 128 filters) and three max-pools, then a
    256-unit dense layer and three linear heads. ``forward`` returns one tensor of shape
    (N, 16) whose columns are given by :attr:`output_slices`:

    - ``"face_logits"`` (columns 0-1): non-face / face logits; ``softmax`` gives the
      probabilities facenet-pytorch returns.
    - ``"box"`` (2-5): regression of the window's corners (x1, y1, x2, y2) as fractions of
      its width / height.
    - ``"landmarks"`` (6-15): x of the 5 points (left eye, right eye, nose, left and right
      mouth corner), then their y, as fractions of the window (multiply by 48 for pixels).

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models.mtcnn import ONet
    >>> out = ONet().eval()(torch.zeros(2, 3, 48, 48))
    >>> out.shape, out[:, ONet.output_slices["landmarks"]].shape
    (torch.Size([2, 16]), torch.Size([2, 10]))
    """

    output_slices = {"face_logits": slice(0, 2), "box": slice(2, 6), "landmarks": slice(6, 16)}

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.flatten = nn.Flatten()
        self.dense5 = nn.Linear(128 * 3 * 3, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)
        init_weights(self)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.flatten(self.prelu4(self.conv4(x)))
        x = self.prelu5(self.dense5(x))
        return torch.cat([self.dense6_1(x), self.dense6_2(x), self.dense6_3(x)], dim=1)


def _channels_last_to_first(state_dict, key="dense5.weight", map_size=(3, 3)):
    """Reorder the input columns of ``key`` from (H, W, C) flattening to (C, H, W) flattening."""
    weight = state_dict[key]
    n_out, n_in = weight.shape
    height, width = map_size
    n_channels = n_in // (height * width)
    converted = dict(state_dict)
    converted[key] = (
        weight.reshape(n_out, height, width, n_channels).permute(0, 3, 1, 2).reshape(n_out, n_in).contiguous()
    )
    return converted


def mtcnn_onet(weights=None):
    """Build the MTCNN O-Net, randomly initialised or with facenet-pytorch's weights.

    Parameters
    ----------
    weights : str, path-like or None, default=None
        None for random initialisation; otherwise the path of facenet-pytorch's O-Net state
        dict (``onet.pt``, facenet-pytorch 2.6.0), loaded on CPU with ``strict=True``. Its
        ``dense5`` columns are converted from channels-last to channels-first flattening (see
        the module docstring), so the state dict of the returned model is not byte-identical
        to the file; save a fine-tuned or pruned O-Net with :func:`sklearn_craft.export.save_model`.
        Nothing is downloaded.

    Returns
    -------
    model : ONet
        The network in eval mode. Input: RGB 48x48 normalised as ``(pixel - 127.5) / 128``
        (see ``preset("mtcnn_onet")``); output: (N, 16), see :class:`ONet`.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.models import mtcnn_onet
    >>> model = mtcnn_onet()
    >>> face_probability = model(torch.zeros(1, 3, 48, 48))[:, :2].softmax(dim=1)[:, 1]
    >>> face_probability.shape
    torch.Size([1])
    """
    from .weights import load_weights

    model = ONet()
    if weights is not None:
        load_weights(model, weights, transform=_channels_last_to_first)
    return model.eval()
