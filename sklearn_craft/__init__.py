"""Cross-task aware filters (CRAFT / ETL) as scikit-learn estimators.

:class:`ActivationPooler` pools every conv layer's filter responses over a labelled data set of a
new task, :class:`LassoFilterSelector` keeps each layer's filters at the knee of its LASSO
characteristic curve, and :class:`CraftPruner` cuts the other filters out of the network, attaches
a head and fine-tunes it (:class:`CraftClassifier` and :class:`CraftRegressor` are its forms with
scikit-learn's classifier and regressor identities). :class:`MultiAttributeClassifier` trains a
network on many binary attributes at once (the 40 of CelebA).
"""

from .attributes import MultiAttributeClassifier
from .export import load_model, save_model, save_onnx
from .pooling import ActivationPooler
from .pruner import CraftClassifier, CraftPruner, CraftRegressor
from .selection import LassoFilterSelector

__version__ = "0.1.0"

__all__ = [
    "ActivationPooler",
    "CraftClassifier",
    "CraftPruner",
    "CraftRegressor",
    "LassoFilterSelector",
    "MultiAttributeClassifier",
    "load_model",
    "save_model",
    "save_onnx",
    "__version__",
]
