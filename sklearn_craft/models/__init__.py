"""Network architectures (VGG, ResNet, MobileNet, LightCNN, face networks) and safe weight loading.

No weights are downloaded: every constructor returns a randomly initialised network, and
:func:`load_weights` fills it from a local state dict.
"""

from .lightcnn import MaxFeatureMap, lightcnn9
from .mobilenet import mobilenet_v1, mobilenet_v1_costs, mobilenet_v2
from .resnet import resnet18
from .vgg import vgg16
from .weights import load_weights
from .mini_xception import mini_xception
from .mobilefacenet import mobilefacenet
from .mtcnn import mtcnn_onet
from .presets import preset

__all__ = [
    "MaxFeatureMap",
    "lightcnn9",
    "load_weights",
    "mini_xception",
    "mobilefacenet",
    "mobilenet_v1",
    "mobilenet_v1_costs",
    "mobilenet_v2",
    "mtcnn_onet",
    "preset",
    "resnet18",
    "vgg16",
]
