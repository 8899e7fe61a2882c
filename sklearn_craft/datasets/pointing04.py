"""Head Pose Image Database (Pointing'04): 15 persons, tilt and pan, cropped with the face boxes."""

import numpy as np
import pandas as pd
from sklearn.utils._param_validation import validate_params

from . import _images

#: Output size when neither ``size`` nor ``preset`` is given (the crops vary in size).
DEFAULT_SIZE = (128, 128)
#: Crop height relative to the larger side of the annotated face box, which is tight on the face.
CROP_SCALE = 1.2

_COLUMNS = ["image", "person", "series", "tilt_deg", "pan_deg", "face_cx", "face_cy", "face_w", "face_h"]


def _read_labels(root):
    table_path = root / "labels.csv"
    try:
        table = pd.read_csv(table_path)
    except pd.errors.EmptyDataError:
        raise _images.no_images_error(table_path) from None
    missing = [c for c in _COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{table_path} lacks the columns {missing}")
    labels = pd.DataFrame(
        {
            "person": table["person"].astype(np.int64).to_numpy(),
            "series": table["series"].astype(np.int64).to_numpy(),
            "tilt": table["tilt_deg"].astype(np.int64).to_numpy(),
            "pan": table["pan_deg"].astype(np.int64).to_numpy(),
        },
        index=_images.file_index(table["image"], table_path),
    )
    return labels, table["image"].tolist(), table[["face_cx", "face_cy", "face_w", "face_h"]].to_numpy(float)


@validate_params({**_images.COMMON_CONSTRAINTS, "crop": ["boolean"]}, prefer_skip_nested_validation=True)
def load_pointing04(
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
    """Load the Head Pose Image Database (Pointing'04) with person, tilt and pan.

    Expected layout::

        root/Person01/person01146+0+0.jpg ...    384×288 full frames
        root/labels.csv                          image (path relative to root), person, series,
                                                 index, tilt_deg, pan_deg, face_cx, face_cy,
                                                 face_w, face_h

    ``labels.csv`` gathers the file-name pose and the per-image ``.txt`` face box of the original
    release (centre x, centre y, width, height in pixels).

    The images are full frames of a person in front of a wall. With ``crop=True`` the face is cut
    out with the annotated box: same centre, :data:`CROP_SCALE` = 1.2 times its larger side high,
    padded with black where it leaves the image.

    Parameters
    ----------
    root : str or path-like
        Folder of the data set, e.g. ``"../shared/data/pointing04"``.
    n : int or None, default=None
        Load only ``n`` images drawn at random without replacement (in ``labels.csv`` order); None
        loads all.
    size : (height, width) or None, default=None
        Output size; None gives 128×128 (:data:`DEFAULT_SIZE`) when cropping, the native 288×384
        otherwise.
    preset : object or None, default=None
        Any object with a ``size`` (height, width) and a ``color`` ("rgb" or "gray") attribute, such
        as :func:`sklearn_craft.models.preset`; used for whichever of ``size`` and ``color`` is None.
    random_state : int, RandomState instance or None, default=None
        Seed of the subset drawn when ``n`` is given.
    cache : str, path-like or None, default=None
        Folder where the decoded images are kept, as ``pointing04-<hash>.npy``: the first call decodes
        and writes them there, later identical calls map the file (read-only, pages loaded on
        access) instead of decoding. The hash covers the image files (paths, sizes and
        modification times) and the options, so a changed file is decoded again; a file that is
        not a plain ``uint8`` array of the expected shape is rebuilt, never unpickled. None
        decodes every time.
    crop : bool, default=True
        Crop the face with the annotated box (see above); False resizes the whole frame.
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
        Indexed by file name (``"person01146+0+0.jpg"``), with the int columns ``person`` (1-15),
        ``series`` (1-2), ``tilt`` (vertical angle, degrees) and ``pan`` (yaw, degrees, -90 to 90;
        positive: the face turns toward the image's left side, as AFLW2000's yaw).

    Raises
    ------
    FileNotFoundError
        If ``root``, ``labels.csv`` or a requested image is missing (the message names the path).
    ValueError
        If ``labels.csv`` has no rows or lacks a column, or an image cannot be decoded (the
        message names the path).

    Examples
    --------
    >>> from sklearn_craft.datasets import load_pointing04
    >>> images, labels = load_pointing04("pointing04", n=8, random_state=0)  # doctest: +SKIP
    >>> images.shape, labels.columns.tolist()  # doctest: +SKIP
    ((8, 128, 128, 3), ['person', 'series', 'tilt', 'pan'])
    """
    root = _images.check_root(root, "labels.csv")
    labels, files, face = _read_labels(root)
    if labels.empty:
        raise _images.no_images_error(root / "labels.csv")
    size, color = _images.output_format(
        size, preset, color, default_size=DEFAULT_SIZE if crop else None, default_color="rgb"
    )
    keep = _images.subset(n, random_state, len(labels), root)
    face = face[keep]
    boxes = _images.face_boxes(face[:, 0], face[:, 1], CROP_SCALE * face[:, 2:].max(axis=1), size) if crop else None
    images = _images.load_images(
        [root / files[i] for i in keep],
        boxes=boxes,
        size=size,
        color=color,
        cache=cache,
        prefix="pointing04",
        progress=progress,
        lazy=lazy,
        n_jobs=n_jobs,
    )
    return images, labels.iloc[keep]
