"""CelebA aligned faces with their 40 binary attributes and identities."""

import numpy as np
import pandas as pd
from sklearn.utils._param_validation import validate_params

from . import _images

#: Centre (x, y) and height of the face crop in CelebA's aligned 178×218 images. With a 7:6
#: (height:width) output, e.g. MobileFaceNet's 112×96, it is the box (35, 70, 143, 196): eyes in the
#: upper third, chin near the bottom edge, little hair or background.
FACE_CENTER = (89.0, 133.0)
FACE_HEIGHT = 126.0


def _read_labels(root):
    attributes = pd.read_csv(root / "list_attr_celeba.txt", sep=r"\s+", skiprows=1)
    values = attributes.to_numpy()
    if not np.isin(values, (-1, 1)).all():
        raise ValueError(f"attributes must be 1 or -1 in {root / 'list_attr_celeba.txt'}")
    labels = pd.DataFrame(values == 1, index=attributes.index, columns=attributes.columns)
    identity = pd.read_csv(
        root / "identity_CelebA.txt", sep=r"\s+", header=None, names=["file", "identity"], index_col="file"
    )["identity"]
    identity = identity[~identity.index.duplicated()].reindex(labels.index)
    if identity.isna().any():
        missing = identity.index[identity.isna()][:3].tolist()
        raise ValueError(f"{root / 'identity_CelebA.txt'} has no identity for images such as {missing}")
    labels["identity"] = identity.astype(np.int64)
    labels.index = _images.file_index(labels.index, root / "list_attr_celeba.txt")
    return labels


@validate_params({**_images.COMMON_CONSTRAINTS, "crop": ["boolean"]}, prefer_skip_nested_validation=True)
def load_celeba(
    root,
    n=None,
    size=None,
    preset=None,
    random_state=None,
    cache=None,
    *,
    crop=True,
    color=None,
    progress=False,
    lazy=False,
    n_jobs=None,
):
    """Load CelebA aligned face images with their attributes and identities.

    Expected layout (the original CelebA file names and formats)::

        root/img_align_celeba/000001.jpg ...     aligned 178×218 JPEG images
        root/list_attr_celeba.txt                count line, header of attribute names, one row
                                                 per image: file name and 1 / -1 per attribute
        root/identity_CelebA.txt                 one row per image: file name and identity number

    The rows of ``list_attr_celeba.txt`` define the data set; ``identity_CelebA.txt`` may list more
    images (the full file has 202,599 rows).

    Parameters
    ----------
    root : str or path-like
        Folder of the data set, e.g. ``"../shared/data/celeba"``.
    n : int or None, default=None
        Load only ``n`` images drawn at random without replacement (in file order); None loads all.
    size : (height, width) or None, default=None
        Output size. None gives the native size: the face crop's 126×108 with ``crop=True``, the
        full 218×178 image otherwise.
    preset : object or None, default=None
        Any object with a ``size`` (height, width) and a ``color`` ("rgb" or "gray") attribute, such
        as :func:`sklearn_craft.models.preset`; used for whichever of ``size`` and ``color`` is None.
    random_state : int, RandomState instance or None, default=None
        Seed of the subset drawn when ``n`` is given.
    cache : str, path-like or None, default=None
        Folder where the decoded images are kept, as ``celeba-<hash>.npy``: the first call decodes
        and writes them there, later identical calls map the file (read-only, pages loaded on
        access) instead of decoding. The hash covers the image files (paths, sizes and
        modification times) and the options, so a changed file is decoded again; a file that is
        not a plain ``uint8`` array of the expected shape is rebuilt, never unpickled. None
        decodes every time.
    crop : bool, default=True
        Crop the face: a box of height 126 px centred at (89, 133), as wide as the output aspect
        ratio needs (108 px for a 7:6 output such as 112×96), padded with black if it leaves the
        image. False resizes the whole aligned image.
    color : {"rgb", "gray"} or None, default=None
        Output colour mode; None takes the preset's, else "rgb".
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
        Face images, 3 channels for "rgb", 1 for "gray". A read-only memory-mapped array with
        ``cache``; with ``lazy=True`` a Dataset whose items are the rows of that array.
    labels : pandas.DataFrame
        Indexed by file name (``"000001.jpg"``), one bool column per attribute of the file, in the
        file's order (CelebA: ``5_o_Clock_Shadow`` ... ``Young``; e.g. ``Male``, ``Smiling``,
        ``Eyeglasses``), then ``identity`` (int).

    Raises
    ------
    FileNotFoundError
        If ``root``, one of the label files or an image is missing (the message names the path).
    ValueError
        If the attribute file has no rows or values other than 1 / -1, an image lacks an identity,
        or an image cannot be decoded (the message names the path).

    Examples
    --------
    >>> from sklearn_craft.datasets import load_celeba
    >>> from sklearn_craft.models import preset
    >>> images, labels = load_celeba("celeba", n=8, preset=preset("mobilefacenet"),
    ...                              random_state=0)  # doctest: +SKIP
    >>> images.shape, labels[["Male", "Smiling", "identity"]].dtypes.tolist()  # doctest: +SKIP
    ((8, 112, 96, 3), [dtype('bool'), dtype('bool'), dtype('int64')])
    """
    root = _images.check_root(root, "list_attr_celeba.txt", "identity_CelebA.txt", "img_align_celeba")
    labels = _read_labels(root)
    if labels.empty:
        raise _images.no_images_error(root / "list_attr_celeba.txt")
    default_size = (int(FACE_HEIGHT), int(FACE_HEIGHT * 6 / 7)) if crop else None
    size, color = _images.output_format(size, preset, color, default_size=default_size, default_color="rgb")
    labels = labels.iloc[_images.subset(n, random_state, len(labels), root)]
    boxes = None
    if crop:
        count = len(labels)
        boxes = _images.face_boxes(
            np.full(count, FACE_CENTER[0]), np.full(count, FACE_CENTER[1]), np.full(count, FACE_HEIGHT), size
        )
    paths = [root / "img_align_celeba" / name for name in labels.index]
    images = _images.load_images(
        paths,
        boxes=boxes,
        size=size,
        color=color,
        cache=cache,
        prefix="celeba",
        progress=progress,
        lazy=lazy,
        n_jobs=n_jobs,
    )
    return images, labels
