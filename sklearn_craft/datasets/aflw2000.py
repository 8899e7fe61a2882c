"""AFLW2000-3D head-pose images (pitch, yaw, roll), cropped around their landmarks."""

import numbers

import numpy as np
import pandas as pd
import scipy.io
from sklearn.utils._param_validation import Interval, validate_params

from . import _images

#: Output size when neither ``size`` nor ``preset`` is given (the crops vary in size).
DEFAULT_SIZE = (128, 128)
#: Crop height relative to the larger side of the visible landmarks' bounding box.
CROP_SCALE = 1.4
#: Upward shift of the crop centre relative to the landmarks' height: they span brows to chin,
#: and the forehead is above them.
CROP_LIFT = 0.1

_ANGLES = ["pitch", "yaw", "roll"]


def _read_mat(path):
    """Pose (degrees) and crop geometry from one AFLW2000-3D ``.mat`` file."""
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    try:
        mat = scipy.io.loadmat(path, variable_names=["Pose_Para", "pt2d"])
        pose = np.degrees(np.asarray(mat["Pose_Para"], dtype=float).ravel()[:3])
        points = np.asarray(mat["pt2d"], dtype=float)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"cannot read pose and landmarks from {path}: {exc}") from exc
    # Landmarks hidden in the image are stored as (-1, ...).
    visible = points[:, (points >= 0).all(axis=0)]
    if visible.shape[1] < 2:
        raise ValueError(f"{path} has fewer than 2 visible landmarks in pt2d; cannot place the face crop")
    (x0, y0), (x1, y1) = visible.min(axis=1), visible.max(axis=1)
    geometry = ((x0 + x1) / 2, (y0 + y1) / 2 - CROP_LIFT * (y1 - y0), CROP_SCALE * max(x1 - x0, y1 - y0))
    return pose, geometry


def _read_labels(paths):
    pose, geometry = zip(*(_read_mat(p.with_suffix(".mat")) for p in paths))
    labels = pd.DataFrame(np.array(pose), index=_images.file_index(paths, paths[0].parent), columns=_ANGLES)
    return labels, np.array(geometry)


@validate_params(
    {
        **_images.COMMON_CONSTRAINTS,
        "crop": ["boolean"],
        "max_angle": [Interval(numbers.Real, 0, None, closed="neither"), None],
    },
    prefer_skip_nested_validation=True,
)
def load_aflw2000(
    root,
    n=None,
    size=None,
    preset=None,
    random_state=None,
    cache=None,
    *,
    crop=True,
    max_angle=None,
    color=None,
    progress=False,
    lazy=False,
    n_jobs=None,
):
    """Load AFLW2000-3D images with their head pose (pitch, yaw, roll in degrees).

    Expected layout (the original release)::

        root/AFLW2000/image00002.jpg, image00002.mat, ...    (or these files directly in root)

    Each ``.mat`` file holds ``Pose_Para`` (pitch, yaw, roll in radians, then 4 unused numbers)
    and ``pt2d`` (2×21 landmarks, hidden ones stored as -1). Only the ``.mat`` files of the
    requested images are read.

    The 450×450 images are not face crops. With ``crop=True`` the face is cut out around the
    visible ``pt2d`` landmarks: a box centred on their bounding box, lifted by 0.1 of its height
    (the landmarks start at the brows) and :data:`CROP_SCALE` = 1.4 times its larger side high,
    padded with black where it leaves the image.

    The data set keeps its 31 samples with an angle beyond ±99° (yaw reaches -351° and +188°, from
    the 3D fitting). Head-pose papers usually drop them: pass ``max_angle=99``.

    Parameters
    ----------
    root : str or path-like
        Folder of the data set, e.g. ``"../shared/data/aflw2000"``.
    n : int or None, default=None
        Load only ``n`` images drawn at random without replacement (in file order); None loads all.
    size : (height, width) or None, default=None
        Output size; None gives 128×128 (:data:`DEFAULT_SIZE`) when cropping, the native
        450×450 otherwise.
    preset : object or None, default=None
        Any object with a ``size`` (height, width) and a ``color`` ("rgb" or "gray") attribute, such
        as :func:`sklearn_craft.models.preset`; used for whichever of ``size`` and ``color`` is None.
    random_state : int, RandomState instance or None, default=None
        Seed of the subset drawn when ``n`` is given.
    cache : str, path-like or None, default=None
        Folder where the decoded images are kept, as ``aflw2000-<hash>.npy``: the first call decodes
        and writes them there, later identical calls map the file (read-only, pages loaded on
        access) instead of decoding. The hash covers the image files (paths, sizes and
        modification times) and the options, so a changed file is decoded again; a file that is
        not a plain ``uint8`` array of the expected shape is rebuilt, never unpickled. None
        decodes every time.
    crop : bool, default=True
        Crop the face around the landmarks (see above); False resizes the whole image.
    max_angle : float or None, default=None
        Drop the samples with ``|pitch|``, ``|yaw|`` or ``|roll|`` above this many degrees before
        subsetting. This reads every ``.mat`` file (about a second for the 2,000).
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
        Indexed by file name (``"image00002.jpg"``), with the float columns ``pitch``, ``yaw`` and
        ``roll`` in degrees. Positive yaw: the face turns toward the image's left side.

    Raises
    ------
    FileNotFoundError
        If ``root`` or the ``.mat`` file of a requested image is missing (the message names it).
    ValueError
        If ``root`` holds no ``.jpg`` image, a ``.mat`` file lacks the pose or landmarks, or an image
        cannot be decoded (the message names the path).

    Examples
    --------
    >>> from sklearn_craft.datasets import load_aflw2000
    >>> images, labels = load_aflw2000("aflw2000", n=8, random_state=0,
    ...                                max_angle=99)  # doctest: +SKIP
    >>> images.shape, labels.columns.tolist()  # doctest: +SKIP
    ((8, 128, 128, 3), ['pitch', 'yaw', 'roll'])
    """
    root = _images.check_root(root)
    folder = root / "AFLW2000" if (root / "AFLW2000").is_dir() else root
    paths = sorted(folder.glob("*.jpg"))
    if not paths:
        raise _images.no_images_error(folder)
    size, color = _images.output_format(
        size, preset, color, default_size=DEFAULT_SIZE if crop else None, default_color="rgb"
    )
    if max_angle is None:
        paths = [paths[i] for i in _images.subset(n, random_state, len(paths), folder)]
        labels, geometry = _read_labels(paths)
    else:
        labels, geometry = _read_labels(paths)
        inside = (labels.abs() <= max_angle).all(axis=1).to_numpy()
        if not inside.any():
            raise ValueError(f"no image in {folder} has all angles within max_angle={max_angle!r}")
        keep = np.flatnonzero(inside)[_images.subset(n, random_state, int(inside.sum()), folder)]
        paths, labels, geometry = [paths[i] for i in keep], labels.iloc[keep], geometry[keep]
    boxes = _images.face_boxes(*geometry.T, size) if crop else None
    images = _images.load_images(
        paths,
        boxes=boxes,
        size=size,
        color=color,
        cache=cache,
        prefix="aflw2000",
        progress=progress,
        lazy=lazy,
        n_jobs=n_jobs,
    )
    return images, labels
