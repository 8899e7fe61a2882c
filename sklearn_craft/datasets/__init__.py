"""Face data: a synthetic labelled face generator and loaders of real face sets.

:func:`make_faces` draws labelled face-like images with numpy alone (the data of the embedded
demo). The loaders read real sets from a local folder, never download anything, and all return
``(images, labels)``: a uint8 array N×H×W×C and a pandas DataFrame indexed by file name. They
share the options ``n`` / ``random_state`` (subset), ``size`` / ``preset`` / ``color`` (output
format), ``cache`` (decoded arrays kept on disk, memory-mapped when read back), ``n_jobs``
(threads that decode), ``lazy`` (a :class:`LazyImages` Dataset that decodes on access instead of
an array) and ``progress``.
"""

from ._images import LazyImages
from .aflw2000 import load_aflw2000
from .celeba import load_celeba
from .fer2013 import load_fer2013
from .pointing04 import load_pointing04
from .synthetic import make_faces
from .utkface import load_utkface

__all__ = [
    "LazyImages",
    "load_aflw2000",
    "load_celeba",
    "load_fer2013",
    "load_pointing04",
    "load_utkface",
    "make_faces",
]
