"""Pooled filter responses: the features on which CRAFT selects filters.

For every pooled convolution, each image is summarised by one number per filter: the mean over
H×W of that filter's *response* (equation 1 of the ETL paper). The response of a convolution is
the output of the elementwise nonlinearity that directly follows it, ``Conv -> [BatchNorm] ->
activation``, because that is the signal the next layer sees; when no activation follows, it is
the BatchNorm output, else the convolution output.
:func:`~sklearn_craft.inspection.find_responses` decides this once for the whole library
(``surgery.truncate`` cuts a network at the same place).
"""

import dis
import functools
import itertools
import marshal
import pickle
import types
import warnings
from collections import Counter
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import fx, nn

from ._cache import cache_folder, cached_arrays, digest
from ._prefix import GraphPrefix
from .images import as_image_dataset, input_channels, iter_batches
from .inspection import (
    _call_sequence,
    _check_device,
    _evaluating,
    _input_dtype,
    _model_lock,
    _NetworksPickleOnCpu,
    _on_device,
    _select_convs,
    _traced_graph,
    find_responses,
)


def _spatial_mean(maps):
    """Mean over H×W of N×C×H×W maps, as N×C.

    A matrix-vector product with a 1/(HW) vector is one BLAS call; on a busy CPU it was 10-100
    times faster than ``maps.mean(dim=(2, 3))``, whose parallel reduction waits for threads to
    be scheduled, which cost 5-10 % of a VGG16 forward pass with every layer pooled.
    """
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()  # half precision cannot even hold 1/(HW) accurately
    height, width = maps.shape[2:]
    weights = maps.new_full((height * width,), 1.0 / (height * width))
    return maps.flatten(2) @ weights


class _AllRecorded(Exception):
    """Raised by the last hook of a batch: later layers need not run."""


class _ChannelMeans:
    """Forward hooks writing each response's channel means into the rows of one batch.

    Maps are reduced as soon as they are produced, so memory holds one batch of activations
    plus the batch's B×ΣC means.
    """

    def __init__(self, widths):
        self.bounds = list(itertools.pairwise(itertools.accumulate(widths, initial=0)))
        self.features = None
        self.pending = 0

    def hook(self, index):
        low, high = self.bounds[index]

        def record(module, inputs, output):
            self.features[:, low:high] = _spatial_mean(output)
            self.pending -= 1
            if self.pending == 0:
                raise _AllRecorded

        return record

    def run(self, forward, n_images, start):
        """The B×ΣC float32 channel means of the batch ``forward()`` runs, the samples from ``start`` on."""
        self.features = torch.empty(n_images, self.bounds[-1][1], dtype=torch.float32)
        self.pending = len(self.bounds)
        try:
            forward()
        except _AllRecorded:
            return self.features
        raise RuntimeError(f"{self.pending} pooled layer(s) did not run on samples {start}..{start + n_images - 1}")


def _iter_pooled(
    model, responses, dataset, *, batch_size, device, preprocess, progress, num_workers=0, prefix=None, keep=None
):
    """Channel means of every response, one B×ΣC float32 array per batch.

    ``prefix``: a :class:`~sklearn_craft._prefix.GraphPrefix` over the same batches, whose
    values the passes start from where they serve the model, and which keeps those before the
    node named ``keep`` for the next passes.
    """
    model = _on_device(model, device)
    modules = dict(model.named_modules())
    means = _ChannelMeans([modules[conv].out_channels for conv in responses])
    if prefix is None:
        prefix = GraphPrefix(dataset, batch_size, device, preprocess, num_workers)
    watched = [modules[response] for response in responses.values()]
    start = 0
    # ``preprocess`` runs as the next batch is drawn, outside the model's lock: it may pool
    # this very model itself. Inference mode is entered per batch, so that it does not leak
    # into the caller's code while the generator waits between batches.
    for n_images, run in prefix.forwards(model, watched, keep=keep, progress=progress, desc="pooling"):
        with torch.inference_mode(), _evaluating(model):
            handles = [
                modules[response].register_forward_hook(means.hook(index))
                for index, response in enumerate(responses.values())
            ]
            try:
                features = means.run(run, n_images, start)
            finally:
                for handle in handles:
                    handle.remove()
        start += n_images
        yield features.numpy()


def _pool_features(model, responses, dataset, **options):
    """Channel means of every response, N×ΣC float32 (``options``: those of :func:`_iter_pooled`)."""
    modules = dict(model.named_modules())
    features = np.empty((len(dataset), sum(modules[conv].out_channels for conv in responses)), dtype=np.float32)
    start = 0
    for batch in _iter_pooled(model, responses, dataset, **options):
        features[start : start + len(batch)] = batch
        start += len(batch)
    return features


def _tensor_token(tensor):
    """Hashable view of a tensor's bytes, without a copy when it is contiguous on the CPU."""
    tensor = tensor.detach().cpu().contiguous()
    return str(tensor.dtype), tuple(tensor.shape), tensor.reshape(-1).view(torch.uint8).numpy()


def _callable_token(func):
    """Plain functions and lambdas pickle by name (or not at all): key them on their code."""
    if not isinstance(func, types.FunctionType):
        return func
    closure = tuple(cell.cell_contents for cell in func.__closure__ or ())
    return (
        func.__module__,
        func.__qualname__,
        marshal.dumps(func.__code__),
        func.__defaults__,
        tuple(_callable_token(value) for value in closure),
    )


#: Attributes every nn.Module has: parameters and buffers are keyed by value, children by their
#: own entries, forward hooks by their code; the others do not change an eval-mode forward pass.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
#: What a torch.fx GraphModule keeps beside the source of its forward (``_code``, keyed).
_GRAPH_MODULE_INTERNALS = frozenset(vars(fx.GraphModule(nn.Module(), fx.Graph()))) - {"_code"}


def _value_token(value):
    """Hashable stand-in for a module attribute: tensors by value, functions by code, containers item by item."""
    if isinstance(value, torch.Tensor):
        return _tensor_token(value)
    if isinstance(value, types.FunctionType):
        return _callable_token(value)
    if isinstance(value, (list, tuple)):
        return type(value).__name__, [_value_token(item) for item in value]
    if isinstance(value, dict):
        return "dict", [(key, _value_token(item)) for key, item in value.items()]
    return value


@functools.cache
def _assigned_by_forward(cls):
    """Attribute names the ``forward`` of ``cls`` assigns: per-call state (counters, caches), not settings."""
    code = getattr(cls.forward, "__code__", None)
    if code is None:
        return frozenset()
    return frozenset(op.argval for op in dis.get_instructions(code) if op.opname == "STORE_ATTR")


def _module_token(module):
    """The state of one module beyond its parameters and buffers: plain attributes and forward hooks.

    Attributes its own ``forward`` assigns change with every call and are left out: keyed, they
    would make every call a cache miss.
    """
    internal = _GRAPH_MODULE_INTERNALS if isinstance(module, fx.GraphModule) else _MODULE_INTERNALS
    internal = internal | _assigned_by_forward(type(module))
    attributes = {name: _value_token(value) for name, value in vars(module).items() if name not in internal}
    hooks = [
        [_callable_token(hook) for hook in registry.values()]
        for registry in (module._forward_pre_hooks, module._forward_hooks)
    ]
    return type(module).__module__, type(module).__qualname__, attributes, hooks


def _cache_key(model, responses, X, preprocess):
    """Digest of everything the pooled features depend on, or None when something is unhashable.

    The model is keyed on its architecture, every parameter and buffer (persistent or not) and
    every module's plain attributes and forward hooks, read under its lock (no pooling hook of
    another thread is attached then).
    """
    if isinstance(X, torch.Tensor):
        X = _tensor_token(X)
    try:
        with _model_lock(model):
            tensors = itertools.chain(model.named_parameters(), model.named_buffers())
            state = (
                repr(model),
                [(name, _tensor_token(value)) for name, value in tensors],
                [(name, _module_token(module)) for name, module in model.named_modules()],
            )
            return digest((state, list(responses.items()), X, _callable_token(preprocess)))
    except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError) as error:
        warnings.warn(f"memory is not used: the model or the input cannot be hashed ({error})", UserWarning)
        return None


class ActivationPooler(_NetworksPickleOnCpu, TransformerMixin, BaseEstimator):
    """Global-average-pooled filter responses of a network's convolutions.

    ``transform`` maps each image to one feature per filter of every pooled convolution: the
    mean over H×W of the filter's response, where the response is the output of the
    nonlinearity directly following the convolution (``Conv -> [BatchNorm] -> activation``),
    falling back to the BatchNorm or convolution output when none follows (see
    :func:`~sklearn_craft.inspection.find_responses`, and ``responses_`` for what was chosen). These are the features on
    which :class:`~sklearn_craft.selection.LassoFilterSelector` selects filters.

    The network runs in eval mode under ``torch.inference_mode()``, batch by batch; forward
    hooks reduce every map to its channel means at once, so peak memory is one batch of
    activations plus the N×ΣC output. A forward pass, in ``fit`` as in ``transform``, stops
    after the last pooled layer, so the layers after it (a classifier built for another image
    size) never run. Batches are cast to the dtype of the model's parameters (float64 and
    float16 models work; features are float32). The model passed in is never modified: its
    training flags are restored and no hook is left.

    Parameters
    ----------
    model : torch.nn.Module
        The pretrained network.
    layers : "conv", list of str or callable, default="conv"
        Convolutions to pool: every ``nn.Conv2d``; a list of ``nn.Conv2d`` module names; or a
        predicate ``(name, module) -> bool`` called on every ``nn.Conv2d``. With "conv" or a
        predicate, convolutions that do not run exactly once per forward pass are left out
        with a warning; a named one is an error.
    batch_size : int, default=64
        Images per forward pass (a DataLoader given as ``X`` keeps its own batches).
    device : str or torch.device, default="cpu"
        Where the forward passes run (a model elsewhere, say on a GPU, is copied there, not
        moved). A device this torch build cannot use is a ``ValueError``.
    preprocess : callable, default=None
        Applied to every float batch tensor (N×C×H×W, [0, 1] for ``uint8`` images) before the
        network, for instance a normalisation. When given, the channel count of the input is
        not checked against the network's first convolution (``preprocess`` may change it).
    progress : bool, default=False
        Show a tqdm progress bar over batches in ``transform``.
    memory : None, str or joblib.Memory, default=None
        Cache of pooled features, keyed on the model's architecture, parameters and buffers
        (persistent or not), the plain attributes and forward hooks of its modules, the pooled
        layers, ``preprocess`` and the input, so that repeated transforms of the same data (a
        grid search over later steps) skip the forward passes. A function ``preprocess`` or
        hook is keyed on its code, defaults and closure (not on globals it reads); a Dataset on
        its pickled state (file names, say, not file contents); attributes a module's own
        ``forward`` assigns (counters) are left out. A model with an attribute that cannot be
        hashed is pooled without the cache, with a warning. The features are stored as ``.npy``
        arrays in a ``sklearn_craft`` folder under the path (or the joblib.Memory's location),
        never as pickles: a corrupt or tampered entry is recomputed, never executed.
    num_workers : int, default=0
        Worker processes that read and collate the items of a Dataset given as ``X`` (through a
        ``torch.utils.data.DataLoader``, see :func:`sklearn_craft.images.iter_batches`); 0
        reads them in this process. Arrays and tensors are in memory already, and a DataLoader
        given as ``X`` keeps its own workers. The features do not depend on it.

    Attributes
    ----------
    layers_ : list of str
        Pooled convolutions, in forward order.
    responses_ : dict
        Conv name -> name of the module whose output is pooled.
    n_channels_ : dict
        Conv name -> number of filters (features contributed).
    n_features_out_ : int
        Number of output features, the sum of ``n_channels_``.

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from sklearn_craft.pooling import ActivationPooler
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> images = np.random.default_rng(0).integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    >>> pooler = ActivationPooler(model).fit(images)
    >>> pooler.responses_
    {'0': '2', '3': '3'}
    >>> pooler.transform(images).shape
    (10, 12)
    >>> pooler.get_feature_names_out()[:3].tolist()
    ['0:0', '0:1', '0:2']
    """

    _parameter_constraints = {
        "model": [nn.Module],
        "layers": [StrOptions({"conv"}), list, tuple, callable],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "preprocess": [callable, None],
        "progress": ["boolean"],
        "memory": [None, str, HasMethods(["cache"])],
        "num_workers": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(
        self,
        model,
        layers="conv",
        batch_size=64,
        device="cpu",
        preprocess=None,
        progress=False,
        memory=None,
        num_workers=0,
    ):
        self.model = model
        self.layers = layers
        self.batch_size = batch_size
        self.device = device
        self.preprocess = preprocess
        self.progress = progress
        self.memory = memory
        self.num_workers = num_workers

    def _device(self):
        return _check_device(self.device)

    def _dataset(self, X):
        n_channels = input_channels(self.model) if self.preprocess is None else None
        return as_image_dataset(X, n_channels=n_channels, name="X")

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Resolve the pooled layers, running the first image through the network.

        Parameters
        ----------
        X : ndarray, torch.Tensor, torch.utils.data.Dataset or torch.utils.data.DataLoader
            Images: N×C×H×W float, N×H×W×C ``uint8``, a tensor N×C×H×W, a Dataset of ``x``
            or ``(x, y)`` items, or a DataLoader that does not shuffle (see
            :func:`sklearn_craft.images.as_image_dataset`).
        y : None
            Ignored.

        Returns
        -------
        self : ActivationPooler
            The fitted pooler.
        """
        device = self._device()
        _select_convs(self.model, self.layers)
        dataset = self._dataset(X)
        model = _on_device(self.model, device)
        example = next(iter_batches(dataset, 1, device=device, preprocess=self.preprocess, indices=[0]))
        example = example.to(_input_dtype(model))
        responses = find_responses(model, self.layers, example_input=example)
        # As in transform, the pass stops once every response has run: later layers (a
        # classifier sized for other images) need not accept these. The traced graph still
        # counts the calls the pass stopped before.
        calls = Counter(_call_sequence(model, example, until=responses.values()))
        graph = _traced_graph(model)
        if graph is not None:
            static = Counter(node.target for node in graph.nodes if node.op == "call_module")
            calls = Counter({name: max(count, static[name]) for name, count in calls.items()})
        ran_once = {conv: calls[response] == 1 for conv, response in responses.items()}
        skipped = [conv for conv, once in ran_once.items() if not once]
        if skipped and isinstance(self.layers, (list, tuple)):
            raise ValueError(
                f"layers must run exactly once per forward pass to be pooled, but {skipped} "
                f"run {[calls[responses[conv]] for conv in skipped]} times"
            )
        if skipped:
            warnings.warn(f"not pooling {skipped}: they do not run exactly once per forward pass")
        pooled = {conv: response for conv, response in responses.items() if ran_once[conv]}
        if not pooled:
            raise ValueError(f"layers={self.layers!r} selects no conv that runs in a forward pass")
        modules = dict(self.model.named_modules())
        self.responses_ = pooled
        self.layers_ = list(pooled)
        self.n_channels_ = {conv: modules[conv].out_channels for conv in self.layers_}
        self.n_features_out_ = sum(self.n_channels_.values())
        return self

    def transform(self, X):
        """Pool the responses of every fitted layer over H×W, image by image.

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.

        Returns
        -------
        features : ndarray of shape (n_samples, sum of the pooled channels), dtype float32
            Columns follow :meth:`get_feature_names_out`: layers in forward order, channels
            in order within a layer.
        """
        check_is_fitted(self)
        return self._transform(X)

    def _transform(self, X, prefix=None, keep=None):
        """:meth:`transform`; a pass, when one runs, starts from ``prefix`` and keeps its values at
        ``keep`` (see :func:`_iter_pooled`)."""
        dataset = self._dataset(X)
        options = dict(
            batch_size=self.batch_size,
            device=self._device(),
            preprocess=self.preprocess,
            progress=self.progress,
            num_workers=self.num_workers,
            prefix=prefix,
            keep=keep,
        )
        key = None
        if cache_folder(self.memory, _pool_features) is not None:
            key = _cache_key(self.model, self.responses_, X, self.preprocess)
        if key is None:
            return _pool_features(self.model, self.responses_, dataset, **options)
        shape = (len(dataset), self.n_features_out_)
        features = cached_arrays(
            self.memory,
            _pool_features,
            key,
            lambda: {"features": _pool_features(self.model, self.responses_, dataset, **options)},
            valid=lambda stored: stored.keys() == {"features"}
            and stored["features"].shape == shape
            and stored["features"].dtype == np.float32,
        )
        return features["features"]

    def iter_transform(self, X, batch_size=None):
        """Pool the responses batch by batch: :meth:`transform`'s rows, one batch at a time.

        For data sets whose N×ΣC responses do not fit in memory: only one batch of images,
        activations and pooled rows is held at a time, e.g. to feed
        :meth:`LassoFilterSelector.partial_fit <sklearn_craft.selection.LassoFilterSelector.partial_fit>`.
        ``memory`` is not used (nothing of the whole data set is ever stored).

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.
        batch_size : int, default=None
            Images per forward pass and per yielded array; None uses ``batch_size``.

        Returns
        -------
        batches : iterator of ndarray of shape (n_batch, sum of the pooled channels), dtype float32
            The rows of :meth:`transform`, ``batch_size`` images at a time, in order; the images
            are checked now, the network runs as the batches are drawn.

        Examples
        --------
        >>> import numpy as np
        >>> from torch import nn
        >>> from sklearn_craft.pooling import ActivationPooler
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> images = np.random.default_rng(0).integers(0, 256, size=(10, 16, 16, 3), dtype=np.uint8)
        >>> pooler = ActivationPooler(model).fit(images)
        >>> [batch.shape for batch in pooler.iter_transform(images, batch_size=4)]
        [(4, 12), (4, 12), (2, 12)]
        """
        check_is_fitted(self)
        dataset = self._dataset(X)
        batch_size = self.batch_size if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        return _iter_pooled(
            self.model,
            self.responses_,
            dataset,
            batch_size=batch_size,
            device=self._device(),
            preprocess=self.preprocess,
            progress=self.progress,
            num_workers=self.num_workers,
        )

    def get_feature_names_out(self, input_features=None):
        """Names of the output features, ``"<layer>:<channel>"``.

        Parameters
        ----------
        input_features : None
            Ignored: the input is images, not named columns.

        Returns
        -------
        feature_names_out : ndarray of str objects
            One name per output column.
        """
        check_is_fitted(self)
        return np.asarray(
            [f"{layer}:{channel}" for layer in self.layers_ for channel in range(self.n_channels_[layer])],
            dtype=object,
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags
