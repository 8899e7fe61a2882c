"""Multi-source embedding fusion and its distillation into one light network.

Vielzeuf et al., "Towards a General Model of Knowledge for Facial Analysis by Multi-Source
Transfer Learning" (2019). M source networks, each trained for its own face task, map an image
``x`` to embeddings ``h_i``. Section 3.2 builds one compact embedding ``h_G`` of their
concatenation with an auto-encoder trained on unlabelled images (:class:`EmbeddingFusion`,
Eqs. 1-3); section 3.3 distils the stack of sources and encoder into a single small network that
maps ``x`` to ``h_G`` directly, with a cosine loss (:class:`FusionDistiller`, Eq. 4). That student
is an ordinary ``nn.Module``: it can be fine-tuned for a target task, or pruned for it with
:class:`~sklearn_craft.pruner.CraftPruner`. Table 6 compares the fused embedding with selecting
the best single source (BT, :func:`best_transfer`) or the best concatenation of sources (BCT,
:func:`best_concatenation`), each scored with the library's linear satellites
(:func:`~sklearn_craft.relationships.task_relationship_matrix`).
"""

import copy
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context, clone
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from .finetune import finetune
from .images import as_image_dataset, input_channels, iter_batches
from .inspection import _check_device, _NetworksPickleOnCpu, _seeded_rng
from .pooling import ActivationPooler
from .relationships import best_rows, task_relationship_matrix

__all__ = [
    "EmbeddingFusion",
    "EmbeddingSource",
    "FusionDistiller",
    "best_concatenation",
    "best_transfer",
    "extract_embeddings",
]


@dataclass(frozen=True)
class EmbeddingSource:
    """A source network, the module whose output is its embedding, and how to prepare its input.

    Parameters
    ----------
    model : torch.nn.Module
        The source network. It is never modified: embeddings are read from an eval-mode copy.
    layer : str or None, default=None
        Name of the module whose output is the embedding ``h_i``; None reads the network's own
        output. An ``nn.Conv2d`` is read as its pooled response, the mean over H×W of the output
        of the activation that follows it (as :class:`~sklearn_craft.pooling.ActivationPooler`
        reads every convolution); any other module's output is flattened, after a mean over H×W
        when it is a 4-D map.
    preprocess : callable or None, default=None
        Applied to every batch of images (float N×C×H×W in [0, 1]) before the network sees it;
        ``preset(name).adapt`` (:meth:`~sklearn_craft.models.presets.InputPreset.adapt`) brings
        any image set to a pretrained network's size, colour mode and normalisation.

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_craft.fusion import EmbeddingSource
    >>> from sklearn_craft.models import preset
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    >>> source = EmbeddingSource(net, layer="1", preprocess=preset("mini_xception").adapt)
    >>> source.layer
    '1'
    """

    model: nn.Module
    layer: str = None
    preprocess: object = None

    def __post_init__(self):
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.layer is not None:
            if not isinstance(self.layer, str):
                raise TypeError(f"layer must be None or a module name, got {type(self.layer).__name__}")
            names = [name for name, _ in self.model.named_modules() if name]
            if self.layer not in names:
                raise ValueError(f"layer must name a module of the model, got {self.layer!r}; modules are e.g. {names[:6]}")
        if self.preprocess is not None and not callable(self.preprocess):
            raise TypeError(f"preprocess must be None or a callable, got {type(self.preprocess).__name__}")


def _network_sources(sources, name="sources"):
    """``sources`` as a dict name -> EmbeddingSource, raising for anything but networks."""
    if not isinstance(sources, Mapping) or not sources:
        raise TypeError(f"{name} must be a non-empty mapping name -> network, got {sources!r:.80}")
    resolved = {}
    for key, value in sources.items():
        if isinstance(value, nn.Module):
            value = EmbeddingSource(value)
        if not isinstance(value, EmbeddingSource):
            raise TypeError(
                f"{name}[{key!r}] must be an nn.Module or an EmbeddingSource, got {type(value).__name__}"
            )
        resolved[key] = value
    return resolved


def _frozen_copy(source, device):
    """An eval-mode copy of the source's network on ``device``: reading it never touches the user's."""
    model = copy.deepcopy(source.model).to(device).eval().requires_grad_(False)
    return EmbeddingSource(model, source.layer, source.preprocess)


class _Output(Exception):
    """Raised by a forward hook with the output it caught: later layers need not run."""

    def __init__(self, output):
        super().__init__()
        self.output = output


def _raise_output(module, inputs, output):
    raise _Output(output)


def _as_rows(output, name):
    """A module output as an N×d float32 tensor: 4-D maps averaged over H×W, the rest flattened."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the embedding of source {name!r} must be a tensor, got {type(output).__name__}")
    if output.ndim == 4:
        output = output.mean(dim=(2, 3))
    return output.reshape(len(output), -1).float()


def _embed(name, source, dataset, batch_size, device, progress):
    """Embedding of one (copied, eval-mode) source on every image of ``dataset``, N×d float32."""
    module = None if source.layer is None else source.model.get_submodule(source.layer)
    if isinstance(module, nn.Conv2d):
        pooler = ActivationPooler(
            source.model,
            layers=[source.layer],
            batch_size=batch_size,
            device=device,
            preprocess=source.preprocess,
            progress=progress,
        )
        return pooler.fit(dataset).transform(dataset)
    batches = iter_batches(
        dataset, batch_size, device=device, preprocess=source.preprocess, progress=progress, desc=f"embedding {name}"
    )
    handle = None if module is None else module.register_forward_hook(_raise_output)
    rows = []
    try:
        with torch.inference_mode():
            for batch in batches:
                try:
                    output = source.model(batch)
                except _Output as caught:
                    output = caught.output
                else:
                    if module is not None:
                        raise RuntimeError(f"layer {source.layer!r} of source {name!r} did not run in a forward pass")
                rows.append(_as_rows(output, name).cpu())
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(rows).numpy()


def _embed_all(sources, X, batch_size, device, progress):
    dataset = as_image_dataset(X, name="X")
    return {name: _embed(name, source, dataset, batch_size, device, progress) for name, source in sources.items()}


def extract_embeddings(sources, X, *, batch_size=64, device="cpu", progress=False):
    """Embedding ``h_i`` of every source network on a set of images.

    Parameters
    ----------
    sources : mapping of str to nn.Module or EmbeddingSource
        Source networks: a network's output is its embedding; an :class:`EmbeddingSource` names
        the module to read and the preprocessing of the network's input. The networks are
        copied, never modified.
    X : ndarray, torch.Tensor or torch.utils.data.Dataset
        Images (see :func:`sklearn_craft.images.as_image_dataset`), before any source's
        ``preprocess``.
    batch_size : int, default=64
        Images per forward pass.
    device : str or torch.device, default="cpu"
        Where the forward passes run.
    progress : bool, default=False
        Show a progress bar per source.

    Returns
    -------
    embeddings : dict of str to ndarray of shape (n_samples, d_i), dtype float32
        One array per source, in the order of ``sources``.

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from sklearn_craft.fusion import EmbeddingSource, extract_embeddings
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten())
    >>> images = np.random.default_rng(0).random((5, 3, 10, 10), dtype=np.float32)
    >>> h = extract_embeddings({"maps": EmbeddingSource(net, layer="1"), "flat": net}, images)
    >>> h["maps"].shape, h["flat"].shape
    ((5, 8), (5, 144))
    """
    sources = _network_sources(sources)
    device = _check_device(device)
    copies = {name: _frozen_copy(source, device) for name, source in sources.items()}
    return _embed_all(copies, X, batch_size, device, progress)


#: What a source that selects precomputed columns of X may be.
_SELECTIONS = (slice, list, tuple, np.ndarray)


def _columns(name, selection, n_features):
    """Indices of the columns of X (``n_features`` of them) that ``sources[name]`` selects."""
    if isinstance(selection, slice):
        indices = np.arange(n_features)[selection]
    else:
        indices = np.asarray(selection)
        if indices.ndim != 1 or indices.dtype == bool or not np.issubdtype(indices.dtype, np.integer):
            if len(indices):
                raise TypeError(f"sources[{name!r}] must be a slice or a list of column indices, got {selection!r:.80}")
            indices = indices.astype(np.intp)
        if np.any((indices < -n_features) | (indices >= n_features)):
            raise ValueError(f"sources[{name!r}] selects columns outside X (n_features={n_features}): {selection!r:.80}")
        indices = indices % n_features
    if len(indices) == 0:
        raise ValueError(f"sources[{name!r}] selects no column of X (n_features={n_features}): {selection!r:.80}")
    return indices


def _mlp(widths):
    """Linear layers through ``widths`` with a ReLU between two of them (none after the last)."""
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _apply(module, array, batch_size, device):
    """``module`` on the rows of a float32 array, in batches, as a float32 array."""
    with torch.inference_mode():
        chunks = [
            module(torch.from_numpy(array[start : start + batch_size]).to(device)).cpu()
            for start in range(0, len(array), batch_size)
        ]
    return torch.cat(chunks).numpy()


def _column_scale(weights, dims):
    """Factor of every standardised column: the square root of its source's weight."""
    return np.repeat(np.sqrt(np.asarray(weights, dtype=float)), np.asarray(dims)).astype(np.float32)


class EmbeddingFusion(_NetworksPickleOnCpu, TransformerMixin, BaseEstimator):
    """One compact embedding ``h_G`` of several sources' embeddings (Vielzeuf et al., section 3.2).

    Every source maps an image to an embedding ``h_i`` (for instance the 128-d identity embedding
    of a face-recognition network and the pooled last block of an emotion classifier). ``fit``
    standardises each column of the concatenation ``[h_1, ..., h_M]`` on unlabelled images
    (no label is ever used) and learns a map to ``h_G``:

    - ``"concat"``: ``h_G`` is the standardised concatenation itself, each source's columns
      times the square root of its weight (``source_weight``; ``n_components`` is ignored);
    - ``"pca"``: its first ``n_components`` principal components (scikit-learn's ``PCA``);
    - ``"autoencoder"``: the code of a symmetric MLP auto-encoder, encoder ``G`` and decoder
      ``G~``, trained to reconstruct every source, ``L_Rec = sum_i ||h~_i - h_i||^2`` (Eq. 3,
      averaged over the batch and divided by the number of columns, which leaves the minimiser
      unchanged), with Adam and early stopping on held-out images
      (:func:`sklearn_craft.finetune.finetune` is the training loop). With ``noise`` it is the
      paper's denoising auto-encoder (DAE): a random fraction of the encoder's inputs is zeroed
      at every training step, and the loss is still the reconstruction of the clean embeddings.

    The paper's encoder has three fully connected layers whose widths fall geometrically
    (5488 -> 3136 -> 1792 -> 1024), and ``h_G`` has the mean dimension of the sources
    (``n_components="mean"``); both are the defaults. ReLU sits between layers; the code and the
    reconstruction are linear. ``transform`` returns ``h_G`` centred on the training images (as
    PCA's scores are), so that the cosine loss of :class:`FusionDistiller` is not dominated by a
    common offset.

    A fraction ``validation_fraction`` of the images is held out of every method's fit and
    measures ``reconstruction_nrmse_`` (the paper's Table 5); the auto-encoder's early stopping
    holds out the same fraction again, of the remaining images.

    Parameters
    ----------
    sources : mapping of str to nn.Module, EmbeddingSource, slice or list of int
        Either every source is a network (an ``nn.Module``, whose output is the embedding, or an
        :class:`EmbeddingSource` naming the module to read and the input preprocessing) and
        ``X`` is images; or every source selects the columns of ``X`` that hold its precomputed
        embedding (a slice or a list of column indices, as in ``ColumnTransformer``) and ``X``
        is the embeddings side by side, e.g. ``np.hstack`` of :func:`extract_embeddings`'s
        arrays. Networks are copied, never modified.
    method : {"concat", "pca", "autoencoder"}, default="autoencoder"
        How ``h_G`` is built (see above).
    n_components : "mean" or int, default="mean"
        Dimension of ``h_G``: "mean" is the paper's rule, the mean of the sources' dimensions
        (rounded); an int must not exceed the total dimension. Ignored by "concat".
    source_weight : None, "balanced" or mapping of str to float, default=None
        Share of every source in what ``h_G`` keeps: the auto-encoder's reconstruction loss,
        the variance PCA keeps and the concatenation's columns (each source's standardised
        columns are multiplied by the square root of their weight). None weighs every
        standardised column alike, so that a source counts as much as its dimension (an O-Net
        embedding of 256 columns twice as much as a 128-d one). "balanced" makes every source
        count the same whatever its dimension, as ``class_weight="balanced"`` does for classes;
        a mapping gives every source (each name of ``sources``) its relative share. On the
        embeddings of 9,700 faces by MobileFaceNet (128-d), mini-Xception (128-d) and O-Net
        (256-d), "balanced" lowered the auto-encoder's mean held-out NRMSE over three seeds
        (0.405 against 0.421), the two 128-d sources reconstructed better and O-Net worse; the
        Fusion page compares the codes with the best single source.
    hidden_layer_sizes : "geometric" or tuple of int, default="geometric"
        Widths of the encoder's hidden layers (the decoder mirrors them). "geometric" is the
        paper's shape: two hidden layers whose widths fall geometrically from the concatenation's
        dimension to ``n_components``. ``()`` makes a linear encoder.
    epochs : int, default=400
        Most epochs of auto-encoder training (early stopping usually ends it sooner). On the
        embeddings of 9,300 faces by three networks, 100 epochs left the auto-encoder
        reconstructing worse than PCA (held-out NRMSE 0.489 against 0.438); early stopping
        ended training at epoch 316 with 0.418.
    lr : float, default=1e-3
        Adam's learning rate.
    batch_size : int, default=128
        Embeddings per optimisation step, and images per forward pass of the source networks.
    weight_decay : float, default=0.0
        L2 penalty of the optimiser.
    noise : float in [0, 1), default=0.0
        Fraction of the standardised inputs the auto-encoder's training zeroes at random
        (``nn.Dropout`` before the encoder, which scales the others by ``1 / (1 - noise)``; in
        eval mode, so in ``transform`` and the validation loss, no input is dropped). 0 is the
        plain auto-encoder; otherwise the code has to carry every source from part of the
        inputs. On the embeddings of 9,300 faces by three networks ``noise=0.25`` reconstructed
        worse (held-out NRMSE 0.51 against 0.42) but linear satellites read age better from its
        code, with each of three seeds (MAE 7.85 / 8.00 / 8.08 against 8.18 / 8.28 / 8.21 years),
        and with another pool of 8,800 (7.99 against 8.07; the Fusion page's benchmark). Ignored
        by "concat" and "pca".
    validation_fraction : float in [0, 1), default=0.1
        Fraction of the images held out (drawn at random) to measure ``reconstruction_nrmse_``,
        and of the rest held out for early stopping. 0 fits on every image and measures the
        reconstruction on them.
    early_stopping : int or None, default=10
        Stop training the auto-encoder after this many epochs without a lower validation loss,
        keeping the best weights; None trains for ``epochs`` epochs. Needs
        ``validation_fraction > 0``.
    device : str or torch.device, default="cpu"
        Where the source networks and the auto-encoder run.
    random_state : int, RandomState instance or None, default=None
        Seeds the held-out split, the auto-encoder's initialisation and its training, and PCA's
        randomised solver; an int makes ``fit`` reproducible.
    progress : bool, default=False
        Show progress bars (source forward passes, training epochs).

    Attributes
    ----------
    sources_ : dict
        Name -> eval-mode copy of the source (an :class:`EmbeddingSource`), or the indices of
        its columns in ``X``.
    source_dims_ : pandas.Series
        Name -> dimension of the source's embedding ``h_i``.
    n_components_ : int
        Dimension of ``h_G``.
    scaler_ : sklearn.preprocessing.StandardScaler
        Standardisation of the concatenated embeddings (fitted on the training images).
    source_weights_ : pandas.Series
        Name -> weight of each of the source's standardised columns (see ``source_weight``;
        the mean over all columns is 1): 1 for every source with ``source_weight=None``, the
        mean dimension over the source's own with "balanced".
    pca_ : sklearn.decomposition.PCA
        The fitted PCA (``method="pca"`` only).
    encoder_, decoder_ : torch.nn.Sequential
        The auto-encoder's halves, in eval mode (``method="autoencoder"`` only): the encoder maps
        standardised concatenated embeddings to the code, ``transform`` subtracts
        ``code_mean_``.
    code_mean_ : ndarray
        Mean code over the training images, one value per dimension of ``h_G``
        (``method="autoencoder"`` only).
    history_ : pandas.DataFrame or None
        Auto-encoder losses per epoch (mean squared error per standardised column, each
        weighted as ``source_weights_`` says, see
        :func:`~sklearn_craft.finetune.finetune`; with ``noise``, ``train_loss`` is that of
        the corrupted inputs and ``val_loss`` that of clean ones); None for the other methods.
    reconstruction_nrmse_ : pandas.Series
        Source -> normalised root-mean-squared error of its reconstruction from ``h_G`` on the
        held-out images: ``sqrt(mean_j MSE_j / Var_j)`` over its columns j, the variances those
        of the training images. 0 is a perfect reconstruction, 1 that of predicting the mean,
        about 1.41 that of an independent draw from the same distribution.
    n_features_in_ : int
        Number of columns of ``X`` (precomputed embeddings only).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_craft.fusion import EmbeddingFusion
    >>> rng = np.random.default_rng(0)
    >>> shared = rng.normal(size=(300, 4))
    >>> h_face, h_emotion = shared @ rng.normal(size=(4, 12)), shared @ rng.normal(size=(4, 8))
    >>> fusion = EmbeddingFusion({"face": slice(0, 12), "emotion": slice(12, 20)}, method="pca", random_state=0)
    >>> h_G = fusion.fit_transform(np.hstack([h_face, h_emotion]))
    >>> h_G.shape, fusion.n_components_
    ((300, 10), 10)
    >>> bool(fusion.reconstruction_nrmse_.max() < 1e-3)  # 4 shared factors, 10 components
    True
    """

    _parameter_constraints = {
        "sources": [Mapping],
        "method": [StrOptions({"concat", "pca", "autoencoder"})],
        "n_components": [StrOptions({"mean"}), Interval(Integral, 1, None, closed="left")],
        "source_weight": [None, StrOptions({"balanced"}), Mapping],
        "hidden_layer_sizes": [StrOptions({"geometric"}), tuple, list],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "noise": [Interval(Real, 0, 1, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "early_stopping": [Interval(Integral, 1, None, closed="left"), None],
        "device": [str, torch.device],
        "random_state": ["random_state"],
        "progress": ["boolean"],
    }

    def __init__(
        self,
        sources,
        method="autoencoder",
        n_components="mean",
        source_weight=None,
        hidden_layer_sizes="geometric",
        epochs=400,
        lr=1e-3,
        batch_size=128,
        weight_decay=0.0,
        noise=0.0,
        validation_fraction=0.1,
        early_stopping=10,
        device="cpu",
        random_state=None,
        progress=False,
    ):
        self.sources = sources
        self.method = method
        self.n_components = n_components
        self.source_weight = source_weight
        self.hidden_layer_sizes = hidden_layer_sizes
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.noise = noise
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.device = device
        self.random_state = random_state
        self.progress = progress

    def _check_sources(self):
        """Validated ``sources``: a dict of EmbeddingSource (networks), or None for column selections."""
        if not self.sources:
            raise ValueError("sources must name at least one source, got an empty mapping")
        selections = [name for name, value in self.sources.items() if isinstance(value, _SELECTIONS)]
        if len(selections) == len(self.sources):
            return None
        if selections:
            raise ValueError(
                "sources must be all networks (X: images) or all column selections of precomputed "
                f"embeddings (X: the embeddings side by side), got column selections for {selections} only"
            )
        return _network_sources(self.sources)

    def _check_hidden(self):
        if isinstance(self.hidden_layer_sizes, str):
            return None
        sizes = tuple(self.hidden_layer_sizes)
        if any(isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be 'geometric' or a tuple of ints >= 1, got {self.hidden_layer_sizes!r}")
        return tuple(int(s) for s in sizes)

    def _check_source_weight(self):
        """Validated ``source_weight`` mapping (None for None and "balanced")."""
        if not isinstance(self.source_weight, Mapping):
            return None
        if set(self.source_weight) != set(self.sources):
            raise ValueError(
                f"source_weight must give a weight to every source, {sorted(self.sources)}, and to no other; "
                f"got {sorted(self.source_weight)}"
            )
        weights = list(self.source_weight.values())
        if not all(isinstance(w, Real) and not isinstance(w, bool) and np.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"source_weight must map every source to a positive number, got {self.source_weight!r}")
        return self.source_weight

    def _source_weights(self, dims, shares):
        """Weight of each standardised column of every source (mean 1 over the columns)."""
        dims = pd.Series(dims, dtype=float)
        if shares is not None:
            shares = pd.Series({name: float(shares[name]) for name in dims.index})
        elif self.source_weight is None:
            shares = dims
        else:
            shares = pd.Series(1.0, index=dims.index)
        return (shares / dims * dims.sum() / shares.sum()).rename("weight")

    def _embeddings(self, X, sources, reset):
        """The concatenated embeddings of ``X`` (float32), each source's columns in ``X`` (or None)."""
        if sources is not None:
            embeddings = _embed_all(sources, X, self.batch_size, _check_device(self.device), self.progress)
            return np.hstack(list(embeddings.values())), {name: h.shape[1] for name, h in embeddings.items()}
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=reset)
        columns = self.sources if reset else self.sources_
        columns = {name: _columns(name, selection, X.shape[1]) for name, selection in columns.items()}
        H = np.hstack([X[:, indices] for indices in columns.values()]).astype(np.float32, copy=False)
        return H, columns

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn ``h_G`` from the sources' embeddings of unlabelled images.

        Parameters
        ----------
        X : images or array-like of shape (n_samples, n_features)
            With network sources, images in any format accepted by
            :func:`sklearn_craft.images.as_image_dataset`; with column selections, the
            precomputed embeddings side by side.
        y : None
            Ignored: the fusion is unsupervised.

        Returns
        -------
        self : EmbeddingFusion
            The fitted transformer.
        """
        sources = self._check_sources()
        shares = self._check_source_weight()
        hidden = self._check_hidden()
        if self.early_stopping is not None and self.validation_fraction == 0:
            raise ValueError(
                f"early_stopping={self.early_stopping!r} needs validation_fraction > 0, got validation_fraction=0"
            )
        device = _check_device(self.device)
        if sources is not None:
            sources = {name: _frozen_copy(source, device) for name, source in sources.items()}
        H, columns = self._embeddings(X, sources, reset=True)
        dims = {name: (len(value) if sources is None else value) for name, value in columns.items()}
        n_samples, n_features = H.shape
        n_components = n_features
        if self.method != "concat":
            n_components = self.n_components
            if n_components == "mean":
                n_components = max(1, round(float(np.mean(list(dims.values())))))
            if n_components > n_features:
                raise ValueError(
                    f"n_components must be at most the total dimension of the sources ({n_features}), got {n_components!r}"
                )

        weights = self._source_weights(dims, shares)
        scale = _column_scale(weights, list(dims.values()))

        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        n_held_out = int(np.ceil(self.validation_fraction * n_samples))
        order = rng.permutation(n_samples)
        held_out, train = order[:n_held_out], np.sort(order[n_held_out:])
        minimum = n_components if self.method == "pca" else 2
        if len(train) < max(2, minimum):
            raise ValueError(
                f"X has {n_samples} samples, of which validation_fraction={self.validation_fraction!r} leaves "
                f"{len(train)} to fit; {self.method} needs at least {max(2, minimum)}"
            )
        scaler = StandardScaler().fit(H[train])
        Z = scaler.transform(H).astype(np.float32) * scale

        pca = encoder = decoder = code_mean = history = None
        if self.method == "pca":
            pca = PCA(n_components=n_components, random_state=seed).fit(Z[train])
            reconstructed = pca.inverse_transform(pca.transform(Z)).astype(np.float32)
        elif self.method == "autoencoder":
            if hidden is None:
                hidden = tuple(
                    max(1, round(n_features * (n_components / n_features) ** (k / 3))) for k in (1, 2)
                )
            with _seeded_rng(seed):
                encoder = _mlp([n_features, *hidden, n_components])
                decoder = _mlp([n_components, *hidden[::-1], n_features])
            # 1×1 "images" of n_features channels: finetune's loop trains any module on them.
            # Dropout is only active in train mode, so the validation loss is the clean reconstruction.
            autoencoder = nn.Sequential(nn.Flatten(), nn.Dropout(self.noise), encoder, decoder)
            history = finetune(
                autoencoder,
                Z[train, :, None, None],
                Z[train],
                loss="mse",
                epochs=self.epochs,
                lr=self.lr,
                batch_size=self.batch_size,
                weight_decay=self.weight_decay,
                validation_fraction=self.validation_fraction if self.early_stopping is not None else 0.0,
                early_stopping=self.early_stopping,
                device=device,
                random_state=seed,
                progress=self.progress,
            )
            codes = _apply(encoder, Z, self.batch_size, device)
            code_mean = codes[train].mean(axis=0)
            reconstructed = _apply(decoder, codes, self.batch_size, device)
        else:
            reconstructed = Z
        rows = held_out if n_held_out else train
        bounds = itertools.pairwise(itertools.accumulate(dims.values(), initial=0))
        # In standardised units: a source's weight changes what is kept, not how its error is measured.
        error = (reconstructed[rows] - Z[rows]) / scale
        nrmse = {name: float(np.sqrt(np.mean(error[:, low:high] ** 2))) for name, (low, high) in zip(dims, bounds)}

        self.sources_ = columns if sources is None else sources
        self.source_dims_ = pd.Series(dims, name="dimension")
        self.n_components_ = int(n_components)
        self.scaler_ = scaler
        self.source_weights_ = weights
        if pca is not None:
            self.pca_ = pca
        if encoder is not None:
            self.encoder_, self.decoder_, self.code_mean_ = encoder.eval(), decoder.eval(), code_mean
        self.history_ = history
        self.reconstruction_nrmse_ = pd.Series(nrmse, name="nrmse")
        return self

    def _encode(self, Z):
        if self.method == "pca":
            return self.pca_.transform(Z).astype(np.float32)
        if self.method == "autoencoder":
            return _apply(self.encoder_, Z, self.batch_size, _check_device(self.device)) - self.code_mean_
        return Z

    def transform(self, X):
        """Map images (or precomputed embeddings) to ``h_G``.

        Parameters
        ----------
        X : images or array-like of shape (n_samples, n_features)
            As in :meth:`fit`.

        Returns
        -------
        h_G : ndarray of shape (n_samples, n_components), dtype float32
            The fused embedding (``n_components_`` columns): standardised concatenation, PCA
            scores, or the auto-encoder's code minus its mean over the training images.
        """
        check_is_fitted(self)
        networks = self.sources_ if isinstance(next(iter(self.sources_.values())), EmbeddingSource) else None
        H, _ = self._embeddings(X, networks, reset=False)
        scale = _column_scale(self.source_weights_, self.source_dims_)
        return self._encode(self.scaler_.transform(H).astype(np.float32) * scale)

    def inverse_transform(self, X):
        """Reconstruct the concatenated source embeddings from ``h_G`` (the decoder ``G~``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)
            Fused embeddings (``n_components_`` columns), from :meth:`transform` or from a
            distilled student.

        Returns
        -------
        embeddings : ndarray of shape (n_samples, n_columns), dtype float32
            The reconstruction of ``[h_1, ..., h_M]`` in the sources' own units (the sum of
            ``source_dims_`` columns).
        """
        check_is_fitted(self)
        Z = np.asarray(X, dtype=np.float32)
        if Z.ndim != 2 or Z.shape[1] != self.n_components_:
            raise ValueError(f"X must have shape (n_samples, {self.n_components_}), got {Z.shape}")
        if self.method == "pca":
            Z = self.pca_.inverse_transform(Z)
        elif self.method == "autoencoder":
            Z = _apply(self.decoder_, np.ascontiguousarray(Z + self.code_mean_), self.batch_size, _check_device(self.device))
        scale = _column_scale(self.source_weights_, self.source_dims_)
        return self.scaler_.inverse_transform(Z / scale).astype(np.float32)

    def get_feature_names_out(self, input_features=None):
        """Names of the columns of ``h_G``.

        Parameters
        ----------
        input_features : None
            Ignored.

        Returns
        -------
        feature_names_out : ndarray of str objects
            ``"<source>:<j>"`` for "concat"; ``"embeddingfusion<k>"`` otherwise.
        """
        check_is_fitted(self)
        if self.method == "concat":
            names = [f"{name}:{j}" for name, dim in self.source_dims_.items() for j in range(dim)]
        else:
            names = [f"embeddingfusion{k}" for k in range(self.n_components_)]
        return np.asarray(names, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


class FusionDistiller(_NetworksPickleOnCpu, TransformerMixin, BaseEstimator):
    """Distil a fused embedding into one light network (Vielzeuf et al., section 3.3).

    The teacher, the stack of M source networks and the encoder of an :class:`EmbeddingFusion`,
    maps an image to ``h_G`` at the cost of all of them. ``fit`` first fits a clone of the teacher
    on the unlabelled images (step 1 of the paper; a teacher fitted beforehand, on other images
    say, is kept as it is when wrapped in :class:`sklearn.frozen.FrozenEstimator`), then trains a
    copy of ``student``, any network whose output has as many features as ``h_G`` (e.g.
    ``mobilenet_v1(num_classes=fusion.n_components_, width_mult=0.5)``), to map the same images to
    ``h_G`` directly, minimising the cosine distance ``1 - cos(h_G, h^_G)`` (Eq. 4, whose cosine
    similarity is maximised) with :func:`sklearn_craft.finetune.finetune`. No label is used.

    ``student_`` is an ordinary ``nn.Module``: it can be fine-tuned for a target task or pruned
    for it, e.g. ``CraftPruner(distiller.student_, preprocess=distiller.preprocess)``, and
    :class:`~sklearn_craft.pooling.ActivationPooler` reads its filters like any other network's.

    Parameters
    ----------
    teacher : transformer
        Maps the teacher's input to ``h_G``, usually an :class:`EmbeddingFusion`. A clone of it
        is fitted on the teacher's input (``teacher_``), unless it is a
        :class:`sklearn.frozen.FrozenEstimator`, which is used as it is. With network sources
        the teacher's input is the images themselves; a teacher of precomputed embeddings is
        given them with ``fit(X, teacher_input=...)``.
    student : torch.nn.Module
        The network to train; it is copied, never modified. Its output for a batch must be
        (N, teacher dimension).
    preprocess : callable or None, default=None
        Applied to every batch of images (float N×C×H×W in [0, 1]) before the student sees it,
        e.g. the ``adapt`` method of an :class:`~sklearn_craft.models.presets.InputPreset` for
        the student's input size. ``student_`` expects preprocessed input: pass the same
        callable to ``ActivationPooler`` or ``CraftPruner``.
    epochs : int, default=20
        Most passes over the training images.
    lr : float, default=1e-3
        Learning rate.
    batch_size : int, default=64
        Images per optimisation step and per forward pass.
    optimizer : {"adam", "sgd"}, default="adam"
        Adam, or SGD with momentum 0.9.
    weight_decay : float, default=0.0
        L2 penalty of the optimiser.
    validation_fraction : float in [0, 1), default=0.1
        Fraction of the images held out to compute the validation loss after each epoch.
    early_stopping : int or None, default=5
        Stop after this many epochs without a lower validation loss, keeping the best weights
        (those before training included); None trains for ``epochs`` epochs. Needs
        ``validation_fraction > 0``.
    device : str or torch.device, default="cpu"
        Where the student is trained and run.
    random_state : int, RandomState instance or None, default=None
        Seeds the split, the shuffling and torch's random generator; an int makes ``fit``
        reproducible (the student's initial weights are those passed in).
    progress : bool, default=False
        Show progress bars (teacher forward passes, epochs).

    Attributes
    ----------
    teacher_ : transformer
        The fitted teacher (``teacher`` itself when frozen).
    student_ : torch.nn.Module
        The trained copy of ``student``, in eval mode, on ``device``.
    n_components_ : int
        Dimension of ``h_G`` and of the student's output.
    history_ : pandas.DataFrame
        Cosine distance per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``kept`` (see
        :func:`~sklearn_craft.finetune.finetune`); with validation, the row ``epoch=0`` is the
        untrained student's.

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from sklearn_craft.fusion import EmbeddingFusion, FusionDistiller
    >>> def net(width):
    ...     return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, width))
    >>> images = np.random.default_rng(0).random((64, 3, 12, 12), dtype=np.float32)
    >>> teacher = EmbeddingFusion({"a": net(6), "b": net(4)}, method="pca", random_state=0)
    >>> distiller = FusionDistiller(teacher, net(5), epochs=2, random_state=0).fit(images)
    >>> distiller.teacher_.n_components_, distiller.transform(images).shape
    (5, (64, 5))
    """

    _parameter_constraints = {
        "teacher": [HasMethods(["fit", "transform"])],
        "student": [nn.Module],
        "preprocess": [callable, None],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "optimizer": [StrOptions({"sgd", "adam"})],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "early_stopping": [Interval(Integral, 1, None, closed="left"), None],
        "device": [str, torch.device],
        "random_state": ["random_state"],
        "progress": ["boolean"],
    }

    def __init__(
        self,
        teacher,
        student,
        preprocess=None,
        epochs=20,
        lr=1e-3,
        batch_size=64,
        optimizer="adam",
        weight_decay=0.0,
        validation_fraction=0.1,
        early_stopping=5,
        device="cpu",
        random_state=None,
        progress=False,
    ):
        self.teacher = teacher
        self.student = student
        self.preprocess = preprocess
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.device = device
        self.random_state = random_state
        self.progress = progress

    def _dataset(self, X):
        n_channels = input_channels(self.student) if self.preprocess is None else None
        return as_image_dataset(X, n_channels=n_channels, name="X")

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, teacher_input=None):
        """Train a copy of the student to map the images to the teacher's ``h_G``.

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Unlabelled images (see :func:`sklearn_craft.images.as_image_dataset`).
        y : None
            Ignored: distillation needs no label.
        teacher_input : array-like or None, default=None
            The teacher's input for these images when it is not ``X`` itself: their precomputed
            source embeddings side by side, row for row, for a teacher of precomputed
            embeddings. The teacher is fitted on it and maps it to the targets ``h_G``.

        Returns
        -------
        self : FusionDistiller
            The fitted distiller.
        """
        if self.early_stopping is not None and self.validation_fraction == 0:
            raise ValueError(
                f"early_stopping={self.early_stopping!r} needs validation_fraction > 0, got validation_fraction=0"
            )
        dataset = self._dataset(X)
        teacher_X = X if teacher_input is None else teacher_input
        teacher = clone(self.teacher).fit(teacher_X, None)
        targets = np.asarray(teacher.transform(teacher_X), dtype=np.float32)
        if targets.ndim != 2 or len(targets) != len(dataset):
            raise ValueError(
                f"the teacher must give one embedding row per image ({len(dataset)}), got an array of shape {targets.shape}"
            )
        device = _check_device(self.device)
        student = copy.deepcopy(self.student).to(device).eval()
        example = next(iter_batches(dataset, 1, device=device, preprocess=self.preprocess))
        with torch.inference_mode():
            output = student(example)
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[1] != targets.shape[1]:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"student must output (N, {targets.shape[1]}), the teacher's embedding dimension, got {shape} for "
                f"one image; give it a last layer of {targets.shape[1]} outputs (e.g. mobilenet_v1(num_classes="
                f"{targets.shape[1]}))"
            )
        history = finetune(
            student,
            dataset,
            targets,
            loss="cosine",
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            validation_fraction=self.validation_fraction,
            early_stopping=self.early_stopping,
            device=device,
            preprocess=self.preprocess,
            random_state=self.random_state,
            progress=self.progress,
        )
        self.teacher_ = teacher
        self.student_ = student.eval()
        self.n_components_ = int(targets.shape[1])
        self.history_ = history
        return self

    def transform(self, X):
        """The student's embeddings ``h^_G`` of images.

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, as in :meth:`fit`.

        Returns
        -------
        h_G : ndarray of shape (n_samples, n_components), dtype float32
            The student's outputs (``n_components_`` columns).
        """
        check_is_fitted(self)
        source = EmbeddingSource(self.student_, preprocess=self.preprocess)
        return _embed("student", source, self._dataset(X), self.batch_size, _check_device(self.device), self.progress)

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns, ``"fusiondistiller<k>"``.

        Parameters
        ----------
        input_features : None
            Ignored.

        Returns
        -------
        feature_names_out : ndarray of str objects
            One name per output column.
        """
        check_is_fitted(self)
        return np.asarray([f"fusiondistiller{k}" for k in range(self.n_components_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def _best_of(features, tasks, task_types, cv, scoring, n_jobs, random_state, progress, return_details):
    """The satellite matrix of ``features`` on ``tasks``, its best row per task and, with
    ``return_details``, the per-fold scores."""
    if not isinstance(return_details, bool):
        raise TypeError(f"return_details must be a bool, got {return_details!r}")
    matrix, details = task_relationship_matrix(
        features,
        None,
        tasks,
        task_types=task_types,
        cv=cv,
        scoring=scoring,
        return_details=True,
        n_jobs=n_jobs,
        random_state=random_state,
        progress=progress,
    )
    winners = best_rows(matrix)
    best = pd.DataFrame(
        {
            "source": winners,
            "score": [matrix.at[winner, task] for task, winner in winners.items()],
            "metric": [matrix.attrs["metric"][task] for task in winners.index],
        }
    )
    best = best.rename_axis("task")
    return (best, matrix, details) if return_details else (best, matrix)


def _check_embeddings(embeddings):
    if not isinstance(embeddings, Mapping) or not embeddings:
        raise TypeError(f"embeddings must be a non-empty mapping name -> array, got {embeddings!r:.80}")
    return dict(embeddings)


def best_transfer(
    embeddings,
    tasks,
    *,
    task_types=None,
    cv=5,
    scoring=None,
    return_details=False,
    n_jobs=None,
    random_state=None,
    progress=False,
):
    """Best Transfer (BT, Vielzeuf et al. Table 6): the single source that scores best on each task.

    Every source's embedding is probed with the library's cross-validated linear satellite
    (:func:`~sklearn_craft.relationships.task_relationship_matrix`) and the best one is kept per
    task. As in the paper, the choice and the reported score come from the same folds, so the
    score is an optimistic estimate of what selection achieves.

    Parameters
    ----------
    embeddings : mapping of str to array-like of shape (n_samples, d_i)
        Each source's embedding of the task images, rows in the order of ``tasks``.
    tasks : pandas.DataFrame of shape (n_samples, n_columns)
        One column per target task (see
        :func:`~sklearn_craft.relationships.task_relationship_matrix`).
    task_types, cv, scoring, n_jobs, random_state, progress
        Passed to :func:`~sklearn_craft.relationships.task_relationship_matrix`.
    return_details : bool, default=False
        Also return every row's per-fold scores, to compare another embedding with the best one
        fold by fold (the folds depend on ``tasks``, ``cv`` and ``random_state`` only).

    Returns
    -------
    best : pandas.DataFrame
        Indexed by task, columns ``source`` (the best source), ``score`` (its satellite score)
        and ``metric``.
    matrix : pandas.DataFrame of shape (n_sources, n_tasks)
        Every source's score.
    details : pandas.DataFrame
        Only when ``return_details=True``: columns source, task, fold, metric, value (see
        :func:`~sklearn_craft.relationships.task_relationship_matrix`).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from sklearn_craft.fusion import best_transfer
    >>> rng = np.random.default_rng(0)
    >>> age, smile = rng.normal(size=(200, 1)), rng.normal(size=(200, 1))
    >>> tasks = pd.DataFrame({"age": age[:, 0], "smiling": smile[:, 0] > 0})
    >>> noise = lambda: rng.normal(size=(200, 3))
    >>> embeddings = {"age_net": np.hstack([age, noise()]), "smile_net": np.hstack([smile, noise()])}
    >>> best, matrix = best_transfer(embeddings, tasks, random_state=0)
    >>> best["source"].to_dict()
    {'age': 'age_net', 'smiling': 'smile_net'}
    """
    features = _check_embeddings(embeddings)
    return _best_of(features, tasks, task_types, cv, scoring, n_jobs, random_state, progress, return_details)


def best_concatenation(
    embeddings,
    tasks,
    *,
    max_sources=None,
    task_types=None,
    cv=5,
    scoring=None,
    return_details=False,
    n_jobs=None,
    random_state=None,
    progress=False,
):
    """Best Combination Transfer (BCT, Vielzeuf et al. Table 6): the best concatenation of sources.

    Every non-empty combination of sources (single sources included) is concatenated and probed
    with the library's cross-validated linear satellite
    (:func:`~sklearn_craft.relationships.task_relationship_matrix`); the best combination is kept
    per task. Brute force, as in the paper: ``2^M - 1`` candidates for M sources. The choice and
    the reported score come from the same folds (an optimistic estimate).

    Parameters
    ----------
    embeddings : mapping of str to array-like of shape (n_samples, d_i)
        Each source's embedding of the task images, rows in the order of ``tasks``.
    tasks : pandas.DataFrame of shape (n_samples, n_columns)
        One column per target task.
    max_sources : int or None, default=None
        Largest number of sources in a combination; None allows all of them.
    task_types, cv, scoring, n_jobs, random_state, progress
        Passed to :func:`~sklearn_craft.relationships.task_relationship_matrix`.
    return_details : bool, default=False
        Also return every row's per-fold scores, to compare another embedding with the best one
        fold by fold (the folds depend on ``tasks``, ``cv`` and ``random_state`` only).

    Returns
    -------
    best : pandas.DataFrame
        Indexed by task, columns ``source`` (the best combination, names joined by ``"+"``),
        ``score`` and ``metric``.
    matrix : pandas.DataFrame of shape (n_combinations, n_tasks)
        Every combination's score.
    details : pandas.DataFrame
        Only when ``return_details=True``: every combination's per-fold scores, columns source,
        task, fold, metric, value.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from sklearn_craft.fusion import best_concatenation
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(300, 2)), rng.normal(size=(300, 2))
    >>> tasks = pd.DataFrame({"sum": a[:, 0] + b[:, 0]})
    >>> best, matrix = best_concatenation({"a": a, "b": b}, tasks, random_state=0)
    >>> list(matrix.index), best.loc["sum", "source"]
    (['a', 'b', 'a+b'], 'a+b')
    """
    features = _check_embeddings(embeddings)
    names = list(features)
    if max_sources is None:
        max_sources = len(names)
    if isinstance(max_sources, bool) or not isinstance(max_sources, Integral) or max_sources < 1:
        raise ValueError(f"max_sources must be None or an int >= 1, got {max_sources!r}")
    combined = {}
    for size in range(1, min(max_sources, len(names)) + 1):
        for combination in itertools.combinations(names, size):
            combined["+".join(map(str, combination))] = np.hstack([np.asarray(features[name]) for name in combination])
    return _best_of(combined, tasks, task_types, cv, scoring, n_jobs, random_state, progress, return_details)
