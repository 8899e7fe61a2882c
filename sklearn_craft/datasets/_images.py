"""What every real-set loader shares: root checks, subsetting, face boxes, decoding and caching.

A loader only parses its set's labels into a DataFrame, lists the image paths (and face boxes
when the images are not tight crops), and hands them to :func:`load_images`, which decodes with
Pillow (in threads), crops, resizes, converts the colour mode and caches the result in a
memory-mapped ``.npy`` file, or returns a :class:`LazyImages` Dataset that does the same one image
at a time, on access.
"""

import hashlib
import json
import numbers
import operator
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from PIL import Image, UnidentifiedImageError
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from torch.utils.data import Dataset
from tqdm.auto import tqdm

#: Bumped whenever decoding or the cache format changes, so that stale cache files are not reused.
_CACHE_VERSION = 2

_MODES = {"rgb": "RGB", "gray": "L"}

#: Parameter constraints shared by every loader (for ``validate_params``).
COMMON_CONSTRAINTS = {
    "root": [str, os.PathLike],
    "n": [Interval(numbers.Integral, 1, None, closed="left"), None],
    "size": [tuple, list, None],
    "preset": "no_validation",
    "random_state": ["random_state"],
    "cache": [str, os.PathLike, None],
    "color": [StrOptions({"rgb", "gray"}), None],
    "progress": ["boolean"],
    "lazy": ["boolean"],
    "n_jobs": [numbers.Integral, None],
}


def check_root(root, *required):
    """Return ``root`` as a Path after checking that it and its ``required`` entries exist.

    Raises FileNotFoundError naming the first missing path.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data set folder not found: {root}")
    for entry in required:
        if not (root / entry).exists():
            raise FileNotFoundError(f"{entry} not found in {root}: {root / entry}")
    return root


def no_images_error(where):
    """The error of a loader that found no image in ``where``."""
    return ValueError(f"no images found in {where}")


def output_format(size, preset, color, *, default_size, default_color):
    """Resolve the output ``(height, width)`` (or None: native size) and colour mode.

    ``preset`` is any object with a ``size`` (H, W) and a ``color`` ("rgb" or "gray") attribute,
    such as :func:`sklearn_craft.models.preset`; ``size`` and ``color`` given explicitly win over it.
    """
    if preset is not None:
        if not (hasattr(preset, "size") and hasattr(preset, "color")):
            raise TypeError(
                "preset must have a size (height, width) and a color ('rgb' or 'gray') attribute, "
                f"got {type(preset).__name__}"
            )
        size = preset.size if size is None else size
        color = preset.color if color is None else color
    if size is None:
        size = default_size
    if size is not None:
        size = tuple(size)
        if len(size) != 2 or not all(isinstance(v, numbers.Integral) and v > 0 for v in size):
            raise ValueError(f"size must be a pair (height, width) of positive integers, got {size!r}")
        size = (int(size[0]), int(size[1]))
    color = default_color if color is None else color
    if color not in _MODES:
        raise ValueError(f"color must be 'rgb' or 'gray', got {color!r}")
    return size, color


def subset(n, random_state, n_total, where):
    """Indices (sorted) of ``n`` of ``n_total`` items drawn without replacement, or all of them."""
    if n is None:
        return np.arange(n_total)
    if n > n_total:
        raise ValueError(f"n must be at most the number of images in {where} ({n_total}), got {n}")
    rng = check_random_state(random_state)
    return np.sort(rng.choice(n_total, size=n, replace=False))


def face_boxes(center_x, center_y, height, size):
    """Crop boxes (left, top, right, bottom) of the given centre and height.

    The width follows the aspect ratio of the output ``size`` (H, W), so that a crop is resized
    without distortion.
    """
    center_x, center_y, height = (np.asarray(v, dtype=float) for v in (center_x, center_y, height))
    width = height * size[1] / size[0]
    return np.column_stack([center_x - width / 2, center_y - height / 2, center_x + width / 2, center_y + height / 2])


def _decode(path, box, size, mode):
    """Read one image, crop ``box`` (padding with black outside the image) and resize to ``size``."""
    try:
        with Image.open(path) as img:
            if size is not None:
                # JPEG can decode at 1/2, 1/4 or 1/8 scale for free; ask for the smallest scale
                # that still leaves at least ``size`` pixels in the crop.
                full_w, full_h = img.size
                factor = 1.0 if box is None else max(full_w / (box[2] - box[0]), full_h / (box[3] - box[1]))
                img.draft(mode, (int(np.ceil(size[1] * factor)), int(np.ceil(size[0] * factor))))
                if box is not None:
                    sx, sy = img.size[0] / full_w, img.size[1] / full_h
                    box = np.asarray(box, dtype=float) * [sx, sy, sx, sy]
            img = img.convert(mode)
            if box is not None:
                outer = (int(np.floor(box[0])), int(np.floor(box[1])), int(np.ceil(box[2])), int(np.ceil(box[3])))
                img = img.crop(outer)
                inner = (box[0] - outer[0], box[1] - outer[1], box[2] - outer[0], box[3] - outer[1])
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=inner)
            elif size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            # A copy Pillow does not own: a read-only view would warn when torch wraps it.
            array = np.array(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc
    return array[..., None] if array.ndim == 2 else array


def _source_files(paths):
    """``[path, size, mtime]`` of every file: a cache entry is reused only for unchanged files."""
    sources = []
    for path in paths:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path}") from None
        sources.append([str(Path(path).resolve()), info.st_size, info.st_mtime_ns])
    return sources


def _cache_file(cache, prefix, paths, boxes, size, color):
    key = {
        "version": _CACHE_VERSION,
        "files": _source_files(paths),
        "boxes": None if boxes is None else np.round(np.asarray(boxes, dtype=float), 3).tolist(),
        "size": size,
        "color": color,
    }
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    return Path(cache) / f"{prefix}-{digest}.npy"


def _open_cached(path, n_images, size, color):
    """The memory-mapped images of the cache file ``path``, or None when it is absent or not what it should be.

    The file is read without unpickling (an object array or a pickle is refused) and its shape
    and dtype are checked against the request: a damaged, truncated or foreign file is rebuilt,
    never trusted.
    """
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if isinstance(images, np.lib.npyio.NpzFile):
        images.close()
        return None
    channels = 3 if color == "rgb" else 1
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[0] != n_images
        or images.shape[3] != channels
        or (size is not None and images.shape[1:3] != size)
    ):
        return None
    return images


def _decoded(paths, boxes, size, color, n_jobs, desc, progress):
    """The images of ``paths`` decoded in ``n_jobs`` threads, yielded in order.

    Pillow releases the GIL while it decodes and resizes, so threads decode in parallel without
    copying images between processes.
    """
    mode = _MODES[color]
    tasks = (delayed(_decode)(path, None if boxes is None else boxes[i], size, mode) for i, path in enumerate(paths))
    images = Parallel(n_jobs=n_jobs, require="sharedmem", return_as="generator")(tasks)
    return tqdm(images, total=len(paths), desc=desc, disable=not progress)


def _check_shape(shape, image, paths, i):
    if image.shape != shape:
        raise ValueError(
            f"images have different sizes: {shape} ({paths[0]}) and {image.shape} ({paths[i]}); "
            "pass size=(height, width)"
        )


def _decode_into_array(paths, decoded):
    """One uint8 array of the decoded images, allocated once (no list of images to stack)."""
    images = None
    for i, image in enumerate(decoded):
        if images is None:
            images = np.empty((len(paths), *image.shape), dtype=np.uint8)
        _check_shape(images.shape[1:], image, paths, i)
        images[i] = image
    return images


def _decode_into_file(target, paths, decoded):
    """Write the decoded images to the ``.npy`` file ``target``, one image at a time.

    The images go straight to a temporary file, renamed into place once complete: memory holds
    one image, and neither an interrupted run nor a concurrent reader sees a partial file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f"{target.stem}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            shape = None
            for i, image in enumerate(decoded):
                if shape is None:
                    shape = image.shape
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
                    np.lib.format.write_array_header_2_0(file, {**header, "shape": (len(paths), *shape)})
                _check_shape(shape, image, paths, i)
                file.write(np.ascontiguousarray(image).data)
        os.replace(temporary, target)
    except BaseException:
        os.remove(temporary)
        raise


class LazyImages(Dataset):
    """Face images decoded from their files on access, exactly as the eager loaders decode them.

    What a loader of :mod:`sklearn_craft.datasets` returns with ``lazy=True``: a map-style
    ``torch.utils.data.Dataset`` that holds file paths and crop boxes, never decoded images.
    Item ``i`` is the ``uint8`` H×W×C array that row ``i`` of the eager loader's array holds,
    so ``np.stack([images[i] for i in range(len(images))])`` equals it. It pickles small
    (paths and boxes), so ``torch.utils.data.DataLoader`` workers can decode in parallel, and
    every estimator of the package takes it as ``X`` (with ``num_workers``).

    Parameters
    ----------
    paths : sequence of path-like
        Image files, in item order.
    boxes : array of shape (n_images, 4) or None, default=None
        Crop box (left, top, right, bottom) of each image in its pixel coordinates, padded with
        black outside the image; requires ``size``.
    size : (height, width) or None, default=None
        Output size; None keeps each file's size.
    color : {"rgb", "gray"}, default="rgb"
        Output colour mode: 3 or 1 channels.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from sklearn_craft.datasets import LazyImages
    >>> folder = Path(tempfile.mkdtemp())
    >>> for i in range(3):
    ...     Image.fromarray(np.full((20, 16, 3), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    >>> images = LazyImages(sorted(folder.glob("*.png")), size=(10, 8), color="gray")
    >>> len(images), images[2].shape, int(images[2].max())
    (3, (10, 8, 1), 120)
    """

    def __init__(self, paths, boxes=None, size=None, color="rgb"):
        if color not in _MODES:
            raise ValueError(f"color must be 'rgb' or 'gray', got {color!r}")
        if boxes is not None:
            if size is None:
                raise ValueError("size is required to crop face boxes, got None")
            boxes = np.asarray(boxes, dtype=float)
            if boxes.shape != (len(paths), 4):
                raise ValueError(f"boxes must have shape ({len(paths)}, 4), one box per path, got {boxes.shape}")
        # Strings, not Path objects: a DataLoader sends the whole list to each of its workers.
        self.paths = [os.fspath(path) for path in paths]
        self.boxes = boxes
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.color = color

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        index = operator.index(index)
        box = None if self.boxes is None else self.boxes[index]
        return _decode(self.paths[index], box, self.size, _MODES[self.color])

    def __repr__(self):
        return f"{type(self).__name__}({len(self)} images, size={self.size}, color={self.color!r})"


def load_images(
    paths,
    *,
    boxes=None,
    size=None,
    color="rgb",
    cache=None,
    prefix="images",
    progress=False,
    lazy=False,
    n_jobs=None,
):
    """Decode images into one uint8 array N×H×W×C (or a lazy Dataset), through an optional on-disk cache.

    Parameters
    ----------
    paths : sequence of path-like
        Image files, in output order.
    boxes : array of shape (N, 4) or None
        Crop box (left, top, right, bottom) of each image in its pixel coordinates; requires ``size``.
    size : (height, width) or None
        Output size; None keeps the files' size (they must all agree).
    color : {"rgb", "gray"}
        Output colour mode: 3 or 1 channels.
    cache : path-like or None
        Folder where the decoded array is stored as ``<prefix>-<hash>.npy`` and from which it is
        memory-mapped (read-only); the hash covers the resolved file paths with their sizes and
        modification times, the boxes, size, colour and a format version.
    prefix : str
        Start of the cache file name (the loader's name).
    progress : bool
        Show a tqdm bar while decoding.
    lazy : bool
        Return a :class:`LazyImages` Dataset that decodes on access instead of an array.
    n_jobs : int or None
        Threads that decode (joblib's convention: None is 1, -1 all cores); the array does not
        depend on it.

    Returns
    -------
    images : ndarray of shape (N, H, W, C), dtype uint8, or LazyImages
        A read-only memory-mapped array when ``cache`` is given.
    """
    if boxes is not None and size is None:
        raise ValueError("size is required to crop face boxes, got None")
    if lazy:
        if cache is not None:
            raise ValueError(
                "cache must be None with lazy=True: a cached array is already read from disk on access "
                f"(memory-mapped), got cache={cache!r}"
            )
        return LazyImages(paths, boxes=boxes, size=size, color=color)
    decoded = _decoded(paths, boxes, size, color, n_jobs, f"decoding {prefix}", progress)
    if cache is None:
        return _decode_into_array(paths, decoded)
    target = _cache_file(cache, prefix, paths, boxes, size, color)
    images = _open_cached(target, len(paths), size, color)
    if images is None:
        _decode_into_file(target, paths, decoded)
        images = _open_cached(target, len(paths), size, color)
        if images is None:
            raise OSError(f"cache: cannot read back the images just written to {target}")
    return images


def file_index(names, where):
    """A DataFrame index of file names (``"file"``); duplicates would make rows ambiguous."""
    index = pd.Index([Path(name).name for name in names], name="file")
    if index.has_duplicates:
        duplicated = index[index.duplicated()].unique()[:3].tolist()
        raise ValueError(f"file names must be unique in {where}, got duplicates such as {duplicated}")
    return index
