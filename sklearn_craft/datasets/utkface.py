"""UTKFace aligned and cropped faces with age, gender and race read from the file names."""

import warnings

import numpy as np
import pandas as pd
from sklearn.utils._param_validation import validate_params

from . import _images

#: UTKFace's published meaning of the gender and race codes.
GENDERS = ("male", "female")
RACES = ("White", "Black", "Asian", "Indian", "Others")


def _parse(name):
    """``(age, gender, race)`` from ``age_gender_race_datetime.jpg...``, or None if malformed."""
    fields = name.split("_")
    if len(fields) < 4 or not all(f.isdigit() for f in fields[:3]):
        return None
    age, gender, race = (int(f) for f in fields[:3])
    if gender >= len(GENDERS) or race >= len(RACES):
        return None
    return age, gender, race


@validate_params(dict(_images.COMMON_CONSTRAINTS), prefer_skip_nested_validation=True)
def load_utkface(
    root,
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
    """Load UTKFace face crops with the age, gender and race encoded in their file names.

    Every ``*.jpg`` under ``root`` (searched recursively, e.g. in ``crop_part1/`` or ``UTKFace/``)
    is one image named ``<age>_<gender>_<race>_<date&time>.jpg.chip.jpg``. Files whose name lacks a
    field or holds an invalid code are skipped with a warning that names them: the original
    release has two (``61_1_20170109142408075.jpg.chip.jpg`` has no race,
    ``61_3_20170109150557335.jpg.chip.jpg`` no gender).

    Parameters
    ----------
    root : str or path-like
        Folder of the data set, e.g. ``"../shared/data/utkface"``.
    n : int or None, default=None
        Load only ``n`` images drawn at random without replacement (in file order); None loads all.
    size : (height, width) or None, default=None
        Output size; None keeps the native 200×200. The images are already aligned face crops,
        so they are only resized.
    preset : object or None, default=None
        Any object with a ``size`` (height, width) and a ``color`` ("rgb" or "gray") attribute, such
        as :func:`sklearn_craft.models.preset`; used for whichever of ``size`` and ``color`` is None.
    random_state : int, RandomState instance or None, default=None
        Seed of the subset drawn when ``n`` is given.
    cache : str, path-like or None, default=None
        Folder where the decoded images are kept, as ``utkface-<hash>.npy``: the first call decodes
        and writes them there, later identical calls map the file (read-only, pages loaded on
        access) instead of decoding. The hash covers the image files (paths, sizes and
        modification times) and the options, so a changed file is decoded again; a file that is
        not a plain ``uint8`` array of the expected shape is rebuilt, never unpickled. None
        decodes every time.
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
        Indexed by file name, sorted, with the columns ``age`` (int, years), ``gender`` (int:
        0 male, 1 female, see :data:`GENDERS`) and ``race`` (int: 0 White, 1 Black, 2 Asian,
        3 Indian, 4 Others, see :data:`RACES`).

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist.
    ValueError
        If ``root`` holds no well-named image, file names repeat, or an image cannot be decoded
        (the message names the path).

    Examples
    --------
    >>> from sklearn_craft.datasets import load_utkface
    >>> images, labels = load_utkface("utkface", n=8, size=(64, 64), random_state=0)  # doctest: +SKIP
    >>> images.shape, labels.columns.tolist()  # doctest: +SKIP
    ((8, 64, 64, 3), ['age', 'gender', 'race'])
    """
    root = _images.check_root(root)
    paths = sorted(root.rglob("*.jpg"), key=lambda p: p.name)
    parsed = [_parse(p.name) for p in paths]
    skipped = [p.name for p, fields in zip(paths, parsed) if fields is None]
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} file(s) in {root} whose name is not age_gender_race_datetime: {skipped}",
            UserWarning,
            stacklevel=3,
        )
    paths = [p for p, fields in zip(paths, parsed) if fields is not None]
    if not paths:
        raise _images.no_images_error(root)
    labels = pd.DataFrame(
        [fields for fields in parsed if fields is not None],
        index=_images.file_index(paths, root),
        columns=["age", "gender", "race"],
        dtype=np.int64,
    )
    size, color = _images.output_format(size, preset, color, default_size=None, default_color="rgb")
    keep = _images.subset(n, random_state, len(labels), root)
    images = _images.load_images(
        [paths[i] for i in keep],
        size=size,
        color=color,
        cache=cache,
        prefix="utkface",
        progress=progress,
        lazy=lazy,
        n_jobs=n_jobs,
    )
    return images, labels.iloc[keep]
