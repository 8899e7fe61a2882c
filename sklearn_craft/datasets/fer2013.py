"""FER2013 facial expressions in the Kaggle folder layout (one folder per emotion)."""

import pandas as pd
from sklearn.utils._param_validation import StrOptions, validate_params

from ..models.mini_xception import FER2013_CLASSES as EMOTIONS
from . import _images


@validate_params(
    {**_images.COMMON_CONSTRAINTS, "split": [StrOptions({"train", "test"})]}, prefer_skip_nested_validation=True
)
def load_fer2013(
    root,
    split="train",
    n=None,
    size=None,
    preset=None,
    random_state=None,
    cache=None,
    *,
    color=None,
    progress=False,
    lazy=False,
    n_jobs=None,
):
    """Load FER2013 expression images with their emotion.

    Expected layout (the Kaggle JPEG release, as ``torchvision.datasets.ImageFolder``)::

        root/train/<emotion>/Training_<n>.jpg
        root/test/<emotion>/PrivateTest_<n>.jpg (or PublicTest_<n>.jpg)

    where ``<emotion>`` is one of angry, disgust, fear, happy, neutral, sad, surprise. Another
    folder in the split is an error. The images are 48×48 grayscale face crops.

    Parameters
    ----------
    root : str or path-like
        Folder of the data set, e.g. ``"../shared/data/fer2013"``.
    split : {"train", "test"}, default="train"
        Sub-folder to read.
    n : int or None, default=None
        Load only ``n`` images drawn at random without replacement (in file order); None loads all.
    size : (height, width) or None, default=None
        Output size; None keeps the native 48×48.
    preset : object or None, default=None
        Any object with a ``size`` (height, width) and a ``color`` ("rgb" or "gray") attribute, such
        as :func:`sklearn_craft.models.preset`; used for whichever of ``size`` and ``color`` is None.
    random_state : int, RandomState instance or None, default=None
        Seed of the subset drawn when ``n`` is given.
    cache : str, path-like or None, default=None
        Folder where the decoded images are kept, as ``fer2013-<hash>.npy``: the first call decodes
        and writes them there, later identical calls map the file (read-only, pages loaded on
        access) instead of decoding. The hash covers the image files (paths, sizes and
        modification times) and the options, so a changed file is decoded again; a file that is
        not a plain ``uint8`` array of the expected shape is rebuilt, never unpickled. None
        decodes every time.
    color : {"rgb", "gray"} or None, default=None
        Output colour mode; None takes the preset's, else "gray" (one channel). "rgb" repeats the
        gray level on 3 channels.
    progress : bool, default=False
        Show a progress bar while decoding.
    lazy : bool, default=False
        Return a :class:`~sklearn_craft.datasets.LazyImages` Dataset that decodes each image when
        it is accessed (same crop, size and colour) instead of an array: memory holds file names,
        not pixels. Pass it to an estimator with ``num_workers`` to decode in worker processes.
        Needs ``cache=None``.
    n_jobs : int or None, default=None
        Threads that decode the images of the array (joblib's convention: None is 1 unless in a
        ``joblib.parallel_config`` context, -1 is every core); the images do not depend on it.

    Returns
    -------
    images : ndarray of shape (n_images, height, width, channels), dtype uint8, or LazyImages
        Face images, 1 channel for "gray", 3 for "rgb". A read-only memory-mapped array with
        ``cache``; with ``lazy=True`` a Dataset whose items are the rows of that array.
    labels : pandas.DataFrame
        Indexed by file name (``"Training_10118481.jpg"``), with one column ``emotion``: a pandas
        Categorical whose categories are :data:`EMOTIONS` in FER2013's order (angry, disgust,
        fear, happy, sad, surprise, neutral), so ``labels.emotion.cat.codes`` are the FER2013
        class numbers used by classifiers such as :func:`sklearn_craft.models.mini_xception`.

    Raises
    ------
    FileNotFoundError
        If ``root`` or ``root/<split>`` is missing (the message names the path).
    ValueError
        If the split holds no image or a folder that is not an emotion, or an image cannot be
        decoded (the message names the path).

    Examples
    --------
    >>> from sklearn_craft.datasets import load_fer2013
    >>> images, labels = load_fer2013("fer2013", split="test", n=8, random_state=0)  # doctest: +SKIP
    >>> images.shape, labels.emotion.cat.categories.tolist()[:3]  # doctest: +SKIP
    ((8, 48, 48, 1), ['angry', 'disgust', 'fear'])
    """
    root = _images.check_root(root, split)
    folder = root / split
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in EMOTIONS)
    if unknown:
        raise ValueError(f"folders of {folder} must be emotions {list(EMOTIONS)}, got {unknown}")
    paths = sorted(folder.glob("*/*.jpg"), key=lambda p: p.name)
    if not paths:
        raise _images.no_images_error(folder)
    emotion = pd.Categorical([p.parent.name for p in paths], categories=EMOTIONS)
    labels = pd.DataFrame({"emotion": emotion}, index=_images.file_index(paths, folder))
    size, color = _images.output_format(size, preset, color, default_size=None, default_color="gray")
    keep = _images.subset(n, random_state, len(labels), folder)
    images = _images.load_images(
        [paths[i] for i in keep],
        size=size,
        color=color,
        cache=cache,
        prefix="fer2013",
        progress=progress,
        lazy=lazy,
        n_jobs=n_jobs,
    )
    return images, labels.iloc[keep]
