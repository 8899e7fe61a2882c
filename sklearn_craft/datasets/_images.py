"""What every real-set loader shares: root checks, subsetting, face boxes, decoding and caching.

A loader only parses its set's labels into a DataFrame, lists the image paths (and face boxes
when the images are not tight crops), and hands them to :func:`load_images`, which decodes with
Pillow, crops, resizes, converts the colour mode and caches the result.
"""

import hashlib
import json
import numbers
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from tqdm.auto import tqdm

#: Bumped whenever decoding changes, so that stale cache files are not reused.
_CACHE_VERSION = 1

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
            array = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc
    return array[..., None] if array.ndim == 2 else array


def _cache_file(cache, prefix, paths, boxes, size, color):
    key = {
        "version": _CACHE_VERSION,
        "files": [str(Path(p).resolve()) for p in paths],
        "boxes": None if boxes is None else np.round(np.asarray(boxes, dtype=float), 3).tolist(),
        "size": size,
        "color": color,
    }
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    return Path(cache) / f"{prefix}-{digest}.npz"


def load_images(paths, *, boxes=None, size=None, color="rgb", cache=None, prefix="images", progress=False):
    """Decode images into one uint8 array N×H×W×C, through an optional on-disk cache.

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
        Folder where the decoded array is stored as ``<prefix>-<hash>.npz``; the hash covers the
        resolved file paths, boxes, size, colour and a format version, not the file contents.
    prefix : str
        Start of the cache file name (the loader's name).
    progress : bool
        Show a tqdm bar while decoding.

    Returns
    -------
    images : ndarray of shape (N, H, W, C), dtype uint8
    """
    if boxes is not None and size is None:
        raise ValueError("size is required to crop face boxes, got None")
    target = None
    if cache is not None:
        target = _cache_file(cache, prefix, paths, boxes, size, color)
        if target.is_file():
            with np.load(target) as stored:
                return stored["images"]
    mode = _MODES[color]
    arrays = []
    for i, path in enumerate(tqdm(paths, desc=f"decoding {prefix}", disable=not progress)):
        arrays.append(_decode(path, None if boxes is None else boxes[i], size, mode))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)[:3]}...; pass size=(height, width)")
    images = np.stack(arrays)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file first so that an interrupted run never leaves a truncated cache.
        partial = target.with_name(target.stem + f".{os.getpid()}.tmp.npz")
        np.savez(partial, images=images)
        os.replace(partial, target)
    return images


def file_index(names, where):
    """A DataFrame index of file names (``"file"``); duplicates would make rows ambiguous."""
    index = pd.Index([Path(name).name for name in names], name="file")
    if index.has_duplicates:
        duplicated = index[index.duplicated()].unique()[:3].tolist()
        raise ValueError(f"file names must be unique in {where}, got duplicates such as {duplicated}")
    return index
