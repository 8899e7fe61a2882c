"""Image input shared by every estimator that runs a network: validation and batching.

Pooling, fine-tuning, BatchNorm re-estimation and task relationships all take images through
:func:`as_image_dataset` and iterate them with :func:`iter_batches`, so the accepted formats and
the error messages are the same everywhere.

Accepted input
--------------
- a numpy array N×C×H×W of floats (used as is, cast to float32);
- a numpy array N×H×W×C of ``uint8`` images (the layout of image files), converted like
  torchvision's ``ToTensor``: channels first, divided by 255;
- a torch tensor N×C×H×W (``uint8`` tensors are divided by 255 too);
- a map-style ``torch.utils.data.Dataset`` whose items are an image ``x`` or a tuple ``(x, y)``
  (only ``x`` is used); ``x`` follows the same rules for a single image (C×H×W float or tensor,
  H×W×C ``uint8`` numpy array or PIL image). :func:`iter_batches` reads it in this process, or
  in ``num_workers`` worker processes through a ``torch.utils.data.DataLoader``;
- a ``torch.utils.data.DataLoader`` over a map-style Dataset, iterated as it is (its batch size,
  workers, sampler and collate function are kept), whose batches are images or tuples
  ``(images, ...)``. Its order must be the same on every pass, or features computed in ``fit``
  and ``transform`` would not line up with ``y``: a random sampler (``shuffle=True``) is an
  error. A batch follows the rules of its items: the default collate function turns H×W×C
  ``uint8`` numpy items (those of the lazy loaders of :mod:`sklearn_craft.datasets`) into an
  N×H×W×C ``uint8`` tensor, read channels-last; otherwise a tensor batch is N×C×H×W and an array
  batch follows the array rules. Stages that need their own order (fine-tuning shuffles,
  validation splits) read the DataLoader's Dataset in that order with its collate function and
  workers.

Arrays and tensors are converted batch by batch, so a ``uint8`` data set is never held in memory
as float. They are checked for NaN and infinity up front; a Dataset or DataLoader is checked
lazily, one batch at a time, by :func:`iter_batches`. Pixels too large for float32 (beyond about
3.4e38) are reported when their batch is converted, and so is a ``preprocess`` that returns NaN
or infinity.
"""

import itertools
from numbers import Integral

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    default_collate,
)
from tqdm.auto import tqdm

from .inspection import _check_device

__all__ = ["as_image_dataset", "input_channels", "iter_batches"]

_LAYOUTS = "N×C×H×W float or N×H×W×C uint8"


class _ArrayImages(Dataset):
    """Images held in memory (numpy array or tensor), converted to float32 C×H×W on access."""

    def __init__(self, data, channels_last, name="X"):
        self.data = data
        self.channels_last = channels_last
        self.name = name

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.batch([index])[0]

    def batch(self, index):
        """Return the images at ``index`` (a slice or integer indices) as float32 N×C×H×W."""
        return _to_float(self.data[index], self.channels_last, self.name)


class _DatasetImages(Dataset):
    """A user's Dataset reduced to its validated images (the ``x`` of ``(x, y)`` items)."""

    def __init__(self, dataset, n_channels, name):
        self.dataset = dataset
        self.n_channels = n_channels
        self.name = name

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, torch.Tensor):
            item = np.asarray(item)
        if item.ndim != 3:
            raise ValueError(
                f"{self.name}[{index}] must be a 3-D image (C×H×W float or H×W×C uint8), "
                f"got shape {tuple(item.shape)}"
            )
        channels_last = _check_dtype(item, f"{self.name}[{index}]")
        image = _to_float(item[None], channels_last, f"{self.name}[{index}]")
        _check_channels(image.shape[1], self.n_channels, f"{self.name}[{index}]")
        return image[0]


class _LoaderImages(Dataset):
    """A user's DataLoader: its batches validated one by one, its samples addressable by position.

    ``indices`` holds the Dataset key of every sample in the order the DataLoader yields them
    and ``sizes`` the length of each of its batches, both read from its batch sampler.
    """

    def __init__(self, loader, n_channels, name):
        self.loader = loader
        self.n_channels = n_channels
        self.name = name
        batches = [list(batch) for batch in loader.batch_sampler]
        self.sizes = [len(batch) for batch in batches]
        self.indices = list(itertools.chain.from_iterable(batches))
        # default_collate stacks numpy items into a tensor of the same layout: H×W×C uint8 images
        # become an N×H×W×C uint8 tensor, which the tensor rule (N×C×H×W) would misread.
        first = loader.dataset[self.indices[0]] if self.indices else None
        first = first[0] if isinstance(first, (tuple, list)) else first
        self.channels_last = (
            loader.collate_fn is default_collate and isinstance(first, np.ndarray) and first.dtype == np.uint8
        )

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        batch = self.loader.collate_fn([self.loader.dataset[self.indices[position]]])
        return self.convert(batch, [position])[0]

    def reader(self, chunks):
        """A DataLoader over the same Dataset, collate function and workers, in the order ``chunks``.

        One batch (the example image of a stage) is read in this process: starting workers
        would cost more than it saves.
        """
        loader = self.loader
        workers = loader.num_workers if len(chunks) > 1 else 0
        return DataLoader(
            loader.dataset,
            batch_sampler=[[self.indices[i] for i in chunk] for chunk in chunks],
            num_workers=workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout if workers else 0,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context if workers else None,
            prefetch_factor=loader.prefetch_factor if workers else None,
            generator=loader.generator if loader.generator is not None else torch.Generator(),
        )

    def convert(self, batch, positions):
        """The float32 N×C×H×W images of one batch of the DataLoader (samples ``positions``)."""
        where = f"{self.name} (the batch of samples {positions[0]}..{positions[-1]})"
        if isinstance(batch, (tuple, list)) and len(batch) > 0:
            batch = batch[0]
        if not isinstance(batch, (np.ndarray, torch.Tensor)):
            raise TypeError(
                f"{self.name} must yield batches of images (a tensor or an array, or a tuple whose first "
                f"item is one), got {type(batch).__name__} in the batch of samples {positions[0]}..{positions[-1]}"
            )
        if batch.ndim != 4:
            raise ValueError(f"{where} must be a 4-D batch of images ({_LAYOUTS}), got shape {tuple(batch.shape)}")
        if len(batch) != len(positions):
            raise ValueError(
                f"{where} holds {len(batch)} images, its batch sampler gave {len(positions)} indices: "
                "the collate function must keep one image per sample"
            )
        channels_last = _check_dtype(batch, where)
        if isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8 and self.channels_last:
            batch = batch.permute(0, 3, 1, 2)
        images = _to_float(batch, channels_last, where)
        _check_channels(images.shape[1], self.n_channels, where)
        if _has_non_finite(images):
            raise ValueError(f"{where} contains NaN or infinity")
        return images


class _Batches(Dataset):
    """Whole batches of a Dataset as items, so that DataLoader workers also collate and check them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, index):
        return _stack(self.dataset, index)


def _check_dtype(data, name):
    """Return whether ``data`` is channels-last, raising ValueError for an unusable dtype."""
    if isinstance(data, torch.Tensor):
        if data.dtype == torch.uint8 or data.is_floating_point():
            return False
    elif data.dtype == np.uint8:
        return True
    elif np.issubdtype(data.dtype, np.floating):
        return False
    raise ValueError(f"{name} must hold float or uint8 pixels, got dtype {data.dtype}")


def _check_channels(n_found, n_channels, name):
    if n_channels is not None and n_found != n_channels:
        raise ValueError(
            f"{name} has {n_found} channels, the model expects n_channels={n_channels} " f"(arrays must be {_LAYOUTS})"
        )


def _to_float(data, channels_last, name):
    """Convert a batch to a new float32 N×C×H×W tensor, scaling uint8 pixels to [0, 1].

    Finite pixels too large for float32 (a float64 1e39) would become infinite: that is an error
    naming ``name``, reported as such rather than as the NaN a later step would find.
    """
    # Always a new, contiguous tensor: callers (preprocess) may edit batches in place, and
    # convolutions round differently on channels-last strides, which would make features
    # depend on the input format.
    if isinstance(data, torch.Tensor):
        tensor = data.detach().to("cpu", torch.float32, memory_format=torch.contiguous_format, copy=True)
        scale = data.dtype == torch.uint8
    else:
        if channels_last:
            data = data.transpose(0, 3, 1, 2)
        with np.errstate(over="ignore"):  # reported below, naming the images
            tensor = torch.from_numpy(np.array(data, dtype=np.float32, order="C"))
        scale = data.dtype == np.uint8
    if scale:
        tensor.div_(255)
    elif _has_non_finite(tensor) and not _has_non_finite(data):
        largest = float(data.abs().max() if isinstance(data, torch.Tensor) else np.abs(data).max())
        raise ValueError(
            f"{name} holds pixel values beyond the float32 range (largest magnitude {largest:.3g} > "
            f"{np.finfo(np.float32).max:.3g}), which would become infinite; rescale the images"
        )
    return tensor


def _has_non_finite(data):
    """Whether a float array or tensor holds NaN or infinity (a sum first: no mask when finite)."""
    if isinstance(data, torch.Tensor):
        if torch.isfinite(data.sum(dtype=torch.float64)):
            return False
        return not bool(torch.isfinite(data).all())
    with np.errstate(over="ignore"):
        if np.isfinite(data.sum(dtype=np.float64)):
            return False
    # The sum also overflows for huge finite float64 values: only a full check can tell.
    return not np.isfinite(data).all()


def as_image_dataset(X, *, n_channels=None, name="X"):
    """Validate images and wrap them as a Dataset of float32 C×H×W tensors.

    Parameters
    ----------
    X : ndarray, torch.Tensor, torch.utils.data.Dataset or torch.utils.data.DataLoader
        N×C×H×W float array, N×H×W×C ``uint8`` array (scaled to [0, 1]), N×C×H×W tensor
        (``uint8`` scaled to [0, 1]), a map-style Dataset whose items are ``x`` or ``(x, y)``,
        or a DataLoader over one, with a sampler that does not shuffle, whose batches are
        images or ``(images, ...)`` (see the module docstring for their layout).
    n_channels : int, default=None
        Number of channels the images must have (see :func:`input_channels`); not checked
        when None.
    name : str, default="X"
        Name of the argument, used in error messages.

    Returns
    -------
    dataset : torch.utils.data.Dataset
        Items are float32 C×H×W tensors (the samples of a DataLoader in the order it yields
        them). Arrays and tensors are converted on access, batch by batch in
        :func:`iter_batches`; passing the result back in returns it unchanged.

    Raises
    ------
    TypeError
        If ``X`` is of none of the accepted types, or is a DataLoader over an
        ``IterableDataset`` or without batching (``batch_size=None``).
    ValueError
        If ``X`` is empty, has the wrong number of dimensions or channels, an unusable dtype,
        or (arrays and tensors) NaN or infinite pixels; if ``X`` is a DataLoader whose sampler
        shuffles.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_craft.images import as_image_dataset
    >>> images = np.full((4, 8, 8, 3), 255, dtype=np.uint8)
    >>> dataset = as_image_dataset(images, n_channels=3)
    >>> len(dataset), tuple(dataset[0].shape), float(dataset[0].max())
    (4, (3, 8, 8), 1.0)
    """
    if isinstance(X, (_ArrayImages, _DatasetImages, _LoaderImages)):
        return X
    if isinstance(X, (np.ndarray, torch.Tensor)):
        return _array_dataset(X, n_channels, name)
    if isinstance(X, DataLoader):
        return _loader_dataset(X, n_channels, name)
    if isinstance(X, IterableDataset) or not isinstance(X, Dataset):
        raise TypeError(
            f"{name} must be a numpy array, a torch tensor, a map-style torch Dataset or a DataLoader, "
            f"got {type(X).__name__}"
        )
    try:
        n_samples = len(X)
    except TypeError:
        raise TypeError(f"{name} must be a Dataset with a length (define __len__), got {type(X).__name__}") from None
    if n_samples == 0:
        raise ValueError(f"{name} is empty: the Dataset has 0 items")
    dataset = _DatasetImages(X, n_channels, name)
    dataset[0]  # fail here rather than in the middle of a pass over the data
    return dataset


_RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def _loader_dataset(loader, n_channels, name):
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError(
            f"{name} must be a DataLoader over a map-style Dataset (its samples are counted and visited "
            f"in a fixed order), got one over the IterableDataset {type(loader.dataset).__name__}"
        )
    if loader.batch_sampler is None:
        raise TypeError(f"{name} must be a DataLoader that batches its samples, got batch_size=None")
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    # DistributedSampler and its kind say whether they shuffle in a ``shuffle`` attribute.
    shuffling = [s for s in samplers if isinstance(s, _RANDOM_SAMPLERS) or getattr(s, "shuffle", False) is True]
    if shuffling:
        shuffling = type(shuffling[0]).__name__
        raise ValueError(
            f"{name} must visit its samples in the same order on every pass (features must line up with "
            f"y, and fit with transform), got a DataLoader with the shuffling sampler {shuffling}: "
            "create it with shuffle=False (fine-tuning shuffles by itself)"
        )
    dataset = _LoaderImages(loader, n_channels, name)
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: the DataLoader yields no sample")
    dataset[0]  # fail here rather than in the middle of a pass over the data
    return dataset


def _array_dataset(X, n_channels, name):
    if X.ndim != 4:
        raise ValueError(f"{name} must be a 4-D array of images ({_LAYOUTS}), got shape {tuple(X.shape)}")
    if min(X.shape) == 0:
        raise ValueError(f"{name} is empty: got shape {tuple(X.shape)}")
    channels_last = _check_dtype(X, name)
    _check_channels(X.shape[3] if channels_last else X.shape[1], n_channels, name)
    if X.dtype not in (np.uint8, torch.uint8) and _has_non_finite(X):
        raise ValueError(f"{name} contains NaN or infinity")
    return _ArrayImages(X, channels_last, name)


def iter_batches(
    dataset,
    batch_size,
    *,
    device="cpu",
    preprocess=None,
    progress=False,
    desc=None,
    indices=None,
    num_workers=0,
):
    """Yield batches of images as float N×C×H×W tensors on ``device``.

    Parameters
    ----------
    dataset : Dataset from :func:`as_image_dataset`, or anything it accepts
        The images.
    batch_size : int
        Images per batch (the last batch may be smaller). A DataLoader visited in its own order
        (``indices=None``) keeps its own batches.
    device : str or torch.device, default="cpu"
        Where the batches are moved.
    preprocess : callable, default=None
        Applied to every batch tensor after the move to ``device`` (for instance a
        normalisation); its result is yielded.
    progress : bool, default=False
        Show a tqdm progress bar (on stderr) counting batches.
    desc : str, default=None
        Label of the progress bar.
    indices : array-like of int, default=None
        Samples to visit, in this order (for instance a shuffled epoch or a validation split);
        every sample in order when None.
    num_workers : int, default=0
        Worker processes that read a Dataset's items and collate them into batches, through a
        ``torch.utils.data.DataLoader``; 0 reads them in this process. Arrays and tensors,
        already in memory, are converted in this process, and a DataLoader given as input
        keeps its own workers. ``preprocess`` runs in this process. The workers are seeded by
        a generator of their own: the global torch random state is left as it is.

    Yields
    ------
    batch : torch.Tensor
        Float tensor N×C×H×W on ``device``.

    Raises
    ------
    TypeError
        If ``preprocess`` returns something else than a tensor.
    ValueError
        If a batch of a Dataset holds NaN or infinity, or its images differ in shape; if
        pixels exceed the float32 range; if ``preprocess`` returns NaN or infinity.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_craft.images import iter_batches
    >>> images = np.zeros((10, 1, 4, 4), dtype=np.float32)
    >>> [tuple(batch.shape) for batch in iter_batches(images, 4)]
    [(4, 1, 4, 4), (4, 1, 4, 4), (2, 1, 4, 4)]

    A DataLoader keeps its own batches, unless ``indices`` asks for another order:

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.from_numpy(images)), batch_size=6)
    >>> [len(batch) for batch in iter_batches(loader, 4)], [len(b) for b in iter_batches(loader, 4, indices=[9, 0])]
    ([6, 4], [2])
    """
    dataset = as_image_dataset(dataset)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, Integral):
        raise TypeError(f"num_workers must be an int, got {type(num_workers).__name__}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    device = _check_device(device)
    order = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.intp)
    if isinstance(dataset, _LoaderImages) and indices is None:
        chunks = np.split(order, np.cumsum(dataset.sizes)[:-1])
        batches = (dataset.convert(batch, chunk) for batch, chunk in zip(dataset.loader, chunks, strict=True))
    else:
        chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        if isinstance(dataset, _LoaderImages):
            batches = (dataset.convert(batch, chunk) for batch, chunk in zip(dataset.reader(chunks), chunks))
        elif isinstance(dataset, _ArrayImages):
            # A slice is a view: no copy of the batch before its conversion.
            batches = (
                dataset.batch(slice(chunk[0], chunk[-1] + 1) if indices is None else chunk) for chunk in chunks
            )
        elif num_workers == 0:
            batches = (_stack(dataset, chunk) for chunk in chunks)
        else:
            # A generator of its own seeds the workers: drawing their seeds from the global one
            # would change what dropout draws next, and the weights would depend on num_workers.
            batches = DataLoader(
                _Batches(dataset), sampler=chunks, batch_size=None, num_workers=num_workers, generator=torch.Generator()
            )
    for index, batch in zip(tqdm(chunks, desc=desc, disable=not progress, unit="batch"), batches):
        batch = batch.to(device)
        if preprocess is not None:
            batch = _preprocessed(preprocess, batch, index)
        yield batch


def _preprocessed(preprocess, batch, index):
    """``preprocess(batch)``, which must be a tensor without NaN or infinity."""
    result = preprocess(batch)
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"preprocess must return a torch.Tensor, got {type(result).__name__}")
    if result.is_floating_point() and _has_non_finite(result):
        raise ValueError(
            f"preprocess returned NaN or infinity for the batch of images {index[0]}..{index[-1]} "
            "(their pixels are finite): check it, e.g. for a division by a zero standard deviation"
        )
    return result


def _stack(dataset, index):
    """Collate the images ``index`` of a Dataset, checking what arrays were checked for up front."""
    images = [dataset[int(i)] for i in index]
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ValueError(
            f"{dataset.name} images must all have the same shape, got {sorted(shapes)} "
            f"among items {index[0]}..{index[-1]}"
        )
    batch = torch.stack(images)
    if _has_non_finite(batch):
        raise ValueError(f"{dataset.name} contains NaN or infinity (among items {index.tolist()})")
    return batch


def input_channels(model):
    """Return the number of input channels of a network: ``in_channels`` of its first Conv2d.

    Parameters
    ----------
    model : torch.nn.Module
        The network; its first ``nn.Conv2d`` in registration order is taken as the input layer.

    Returns
    -------
    n_channels : int
        ``in_channels`` of that convolution.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.
    ValueError
        If ``model`` contains no ``nn.Conv2d``.

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_craft.images import input_channels
    >>> input_channels(nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU()))
    1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError(f"model must contain an nn.Conv2d, got a {type(model).__name__} without one")
