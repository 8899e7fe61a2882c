"""Multi-attribute classification: one network predicting many binary attributes at once.

The facial-attributes setting of Wang & Wong ("Facial Attributes Classification: a Light Weight
Deep Neural Network"): every image carries 40 independent yes/no attributes (CelebA's
``Male``, ``Smiling``, ``Eyeglasses``, ...), one network has one output per attribute, and it is
trained with binary cross-entropy on a 0/1 label matrix. :class:`MultiAttributeClassifier` trains
such a network (a MobileNet, or a student network distilled elsewhere whose last Linear layer is
replaced), and :func:`attribute_report` gives the per-attribute accuracies and their mean, the
paper's Table II.
"""

import copy
from numbers import Integral

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .finetune import _CONSTRAINTS as _FINETUNE_CONSTRAINTS
from .finetune import FINETUNE_DEFAULTS, _network_outputs, check_finetune_params, finetune
from .images import as_image_dataset, input_channels, iter_batches
from .inspection import _check_device, _evaluating, _NetworksPickleOnCpu, _seeded_rng

__all__ = ["MultiAttributeClassifier", "attribute_report"]

#: Name of the row of :func:`attribute_report` that averages the attributes.
MEAN_ROW = "mean"


def _check_labels(y, name):
    """A 0/1 label matrix as an int8 array (n_samples, n_attributes), and its column names or None."""
    columns = list(y.columns) if isinstance(y, pd.DataFrame) else None
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    labels = np.asarray(y)
    if labels.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D 0/1 matrix of shape (n_samples, n_attributes), got shape {labels.shape}; "
            "reshape a single attribute with y.reshape(-1, 1)"
        )
    if labels.size == 0:
        raise ValueError(f"{name} is empty: got shape {labels.shape}")
    if labels.dtype != bool:
        if not np.issubdtype(labels.dtype, np.number):
            raise ValueError(f"{name} must hold 0/1 (or bool) values, got dtype {labels.dtype}")
        wrong = ~np.isin(labels, (0, 1))
        if wrong.any():
            raise ValueError(
                f"{name} must hold 0/1 (or bool) values, got {np.unique(labels[wrong])[:5].tolist()}; "
                "convert +-1 labels such as CelebA's with (y > 0)"
            )
    return labels.astype(np.int8), columns


def attribute_report(y_true, y_pred, *, attributes=None):
    """Accuracy of every attribute of a multi-label prediction, and their mean.

    The report of the facial-attributes papers (Wang & Wong, Table II): one accuracy per
    attribute, then the mean over attributes (which equals ``1 - hamming_loss``). Attributes are
    often unbalanced (in CelebA 4 % of the faces are bald), so each row also gives the accuracy of
    always answering the attribute's more frequent value in ``y_true``: an accuracy is only
    informative next to it.

    Parameters
    ----------
    y_true : array-like or pandas.DataFrame of shape (n_samples, n_attributes)
        True 0/1 (or bool) labels.
    y_pred : array-like or pandas.DataFrame of shape (n_samples, n_attributes)
        Predicted 0/1 (or bool) labels, e.g. ``MultiAttributeClassifier.predict``.
    attributes : sequence of str or None, default=None
        Names of the attributes, in column order. None takes the columns of ``y_true`` or
        ``y_pred`` when one is a DataFrame, else the column indices 0, 1, ...

    Returns
    -------
    report : pandas.DataFrame
        Index ``attribute``: one row per attribute, then a row ``"mean"`` averaging each column
        over the attributes. Columns ``accuracy`` (share of samples whose prediction is right),
        ``majority_accuracy`` (share of the more frequent value of ``y_true``) and
        ``positive_rate`` (share of samples with the attribute in ``y_true``).

    Raises
    ------
    ValueError
        If a label matrix is not 2-D or holds values other than 0 and 1, the shapes differ, the
        names do not match the columns, or an attribute is called ``"mean"``.

    Examples
    --------
    >>> import pandas as pd
    >>> from sklearn_craft.attributes import attribute_report
    >>> y_true = pd.DataFrame({"Smiling": [1, 0, 1, 1], "Bald": [0, 0, 0, 1]})
    >>> y_pred = [[1, 0], [0, 0], [0, 0], [1, 1]]
    >>> attribute_report(y_true, y_pred)  # doctest: +NORMALIZE_WHITESPACE
               accuracy  majority_accuracy  positive_rate
    attribute
    Smiling       0.750               0.75           0.75
    Bald          1.000               0.75           0.25
    mean          0.875               0.75           0.50
    """
    true, true_columns = _check_labels(y_true, "y_true")
    pred, pred_columns = _check_labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred must have the same shape, got {true.shape} and {pred.shape}")
    if true_columns is not None and pred_columns is not None and true_columns != pred_columns:
        raise ValueError(
            f"y_true and y_pred must have the same columns in the same order, got {true_columns[:5]}... "
            f"and {pred_columns[:5]}..."
        )
    if attributes is None:
        attributes = true_columns or pred_columns or list(range(true.shape[1]))
    elif isinstance(attributes, str) or len(attributes) != true.shape[1]:
        raise ValueError(
            f"attributes must be a sequence of {true.shape[1]} names (one per column), got {attributes!r}"
        )
    if MEAN_ROW in list(attributes):
        raise ValueError(f"attributes must not contain {MEAN_ROW!r}, the name of the averaged row")
    positive_rate = true.mean(axis=0)
    report = pd.DataFrame(
        {
            "accuracy": (true == pred).mean(axis=0),
            "majority_accuracy": np.maximum(positive_rate, 1 - positive_rate),
            "positive_rate": positive_rate,
        },
        index=pd.Index(list(attributes), name="attribute"),
    )
    report.loc[MEAN_ROW] = report.mean(axis=0)
    return report


class MultiAttributeClassifier(_NetworksPickleOnCpu, ClassifierMixin, BaseEstimator):
    """Train a network to predict many binary attributes at once (binary cross-entropy).

    ``fit`` deep-copies ``model``, gives it one output per attribute (see ``head``) and trains
    every parameter that requires a gradient with binary cross-entropy on the logits
    (:func:`sklearn_craft.finetune.finetune`, ``loss="bce"``) against a 0/1 label matrix, one
    column per attribute, as Wang & Wong train MobileNets on the 40 CelebA attributes (freeze
    layers with ``requires_grad_(False)`` to train the others only). The model passed in is never
    modified.

    **Starting from a distilled student.** A network distilled to reproduce an embedding (for
    instance a MobileNet whose ``classifier`` outputs a 128-d fused embedding) already has the
    trunk to reuse; ``head="replace"`` swaps its last ``nn.Linear`` layer (the last one in
    ``model.named_modules()`` order) for a new ``nn.Linear`` with the same inputs and one output
    per attribute, initialised by PyTorch's default rule under ``random_state``, and trains the
    whole network. The embedding projection is dropped, the features it read are kept. A model
    whose last Linear layer is followed by other layers (a BatchNorm1d of the embedding, a
    normalisation) cannot be adapted this way: the one-example forward pass run after the
    replacement fails and ``fit`` says so; replace the layers yourself and pass ``head="keep"``.

    Parameters
    ----------
    model : torch.nn.Module
        The network; its input is an image batch, its output one logit per attribute (after
        ``head``). Never modified (deep-copied).
    head : {"keep", "replace"}, default="keep"
        ``"keep"`` trains ``model`` as it is, which must already have one output per attribute
        (e.g. ``mobilenet_v1(num_classes=40)``). ``"replace"`` first replaces its last
        ``nn.Linear`` layer by a new one with one output per attribute (see above).
    epochs : int, default=10
        Passes over the training images.
    lr : float, default=1e-3
        Learning rate.
    batch_size : int, default=64
        Images per optimisation step and per forward pass when predicting.
    optimizer : {"adam", "sgd"}, default="adam"
        Adam, or SGD with momentum 0.9.
    weight_decay : float, default=0.0
        L2 penalty of the optimiser.
    validation_fraction : float in [0, 1), default=0.0
        Share of the images held out (at random) to compute a validation loss after each epoch.
    early_stopping : int or None, default=None
        Stop when the validation loss has not improved for this many epochs, and keep the
        weights with the lowest validation loss; needs ``validation_fraction > 0``.
    monitor : {"loss", "accuracy"}, default="loss"
        What early stopping watches and keeps the best of: the validation loss, or the mean
        accuracy over the attributes (see :func:`sklearn_craft.finetune.finetune`); ``"accuracy"``
        needs ``early_stopping``.
    device : str or torch.device, default="cpu"
        Where training and prediction run; ``model_`` lives there.
    preprocess : callable or None, default=None
        Applied to every batch of images (float tensors in [0, 1]) before the network sees it,
        in ``fit`` and in prediction, e.g. a normalisation. ``model_`` itself expects
        preprocessed input.
    num_workers : int, default=0
        Worker processes that read a Dataset's images, in ``fit`` and in prediction (see
        :func:`sklearn_craft.images.iter_batches`); 0 reads them in this process.
    random_state : int, RandomState instance or None, default=None
        Seeds the new head (``head="replace"``), the validation split, the shuffling and
        dropout: two fits with the same integer give the same weights. The global torch seed is
        left untouched.
    progress : bool, default=False
        Show a progress bar over epochs.

    Attributes
    ----------
    model_ : torch.nn.Module
        The trained network, in eval mode, on ``device``.
    attributes_ : ndarray of shape (n_attributes,)
        Names of the attributes: the columns of ``y`` when it is a DataFrame, else 0, 1, ...
    classes_ : ndarray of shape (n_attributes,)
        Label indices 0, 1, ..., as scikit-learn's multi-label classifiers have.
    history_ : pandas.DataFrame
        Losses per epoch (see :func:`sklearn_craft.finetune.finetune`).

    See Also
    --------
    attribute_report : per-attribute accuracy of the predictions.
    sklearn_craft.CraftPruner : prunes a network for the same 0/1 label matrix.

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from sklearn_craft.attributes import MultiAttributeClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.random((64, 3, 8, 8), dtype=np.float32)
    >>> y = np.stack([X[:, 0].mean((1, 2)) > 0.5, X[:, 1].mean((1, 2)) > 0.5], axis=1)
    >>> embedder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                          nn.Linear(8, 16))
    >>> clf = MultiAttributeClassifier(embedder, head="replace", epochs=2, random_state=0).fit(X, y)
    >>> clf.model_[-1], clf.predict(X[:3]).shape
    (Linear(in_features=8, out_features=2, bias=True), (3, 2))
    >>> 0 <= clf.score(X, y) <= 1
    True
    """

    _parameter_constraints = {
        "model": [nn.Module],
        "head": [StrOptions({"keep", "replace"})],
        **_FINETUNE_CONSTRAINTS,
        "device": [str, torch.device],
        "preprocess": [callable, None],
        "num_workers": [Interval(Integral, 0, None, closed="left")],
        "random_state": ["random_state"],
        "progress": ["boolean"],
    }

    def __init__(
        self,
        model,
        *,
        head="keep",
        epochs=FINETUNE_DEFAULTS["epochs"],
        lr=FINETUNE_DEFAULTS["lr"],
        batch_size=FINETUNE_DEFAULTS["batch_size"],
        optimizer=FINETUNE_DEFAULTS["optimizer"],
        weight_decay=FINETUNE_DEFAULTS["weight_decay"],
        validation_fraction=FINETUNE_DEFAULTS["validation_fraction"],
        early_stopping=FINETUNE_DEFAULTS["early_stopping"],
        monitor=FINETUNE_DEFAULTS["monitor"],
        device="cpu",
        preprocess=None,
        num_workers=0,
        random_state=None,
        progress=False,
    ):
        self.model = model
        self.head = head
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.monitor = monitor
        self.device = device
        self.preprocess = preprocess
        self.num_workers = num_workers
        self.random_state = random_state
        self.progress = progress

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Train a copy of the network on images ``X`` and the 0/1 label matrix ``y``.

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images: N×C×H×W float, N×H×W×C ``uint8`` (scaled to [0, 1]), a tensor N×C×H×W or a
            Dataset of ``x`` or ``(x, y)`` items (see :func:`sklearn_craft.images.as_image_dataset`).
        y : array-like or pandas.DataFrame of shape (n_samples, n_attributes)
            0/1 (or bool) labels, one column per attribute; a DataFrame's columns name them.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the images in the loss (see
            :func:`sklearn_craft.finetune.finetune`): an image of weight 2 counts, in
            expectation, as that image twice.

        Returns
        -------
        self : MultiAttributeClassifier
            The fitted classifier.
        """
        settings = check_finetune_params({key: getattr(self, key) for key in FINETUNE_DEFAULTS})
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        labels, columns = _check_labels(y, "y")
        dataset = as_image_dataset(X, n_channels=input_channels(self.model))
        if len(labels) != len(dataset):
            raise ValueError(f"y must have one row per image ({len(dataset)}), got {len(labels)} rows")
        n_attributes = labels.shape[1]
        head_seed, train_seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max, size=2)
        device = _check_device(self.device)
        network = self._network(n_attributes, next(iter_batches(dataset, 1)), int(head_seed), device)
        history = finetune(
            network,
            dataset,
            labels.astype(np.float32),
            loss="bce",
            device=device,
            preprocess=self.preprocess,
            random_state=int(train_seed),
            progress=self.progress,
            sample_weight=sample_weight,
            num_workers=self.num_workers,
            **settings,
        )

        self.model_ = network
        self.attributes_ = np.asarray(columns if columns is not None else np.arange(n_attributes))
        self.classes_ = np.arange(n_attributes)
        self.history_ = history
        return self

    def _network(self, n_attributes, example, seed, device):
        """A copy of ``model`` with ``n_attributes`` outputs (its last Linear replaced for ``head="replace"``)."""
        network = copy.deepcopy(self.model).to(device)
        replaced = None
        if self.head == "replace":
            linears = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
            if not linears:
                raise ValueError(
                    f"head='replace' needs a model with an nn.Linear layer to replace, got a "
                    f"{type(self.model).__name__} without one"
                )
            replaced = linears[-1]
            old = network.get_submodule(replaced)
            # The new layer's default initialisation draws from our seed, not the global one.
            with _seeded_rng(seed, old.weight.device):
                new = nn.Linear(
                    old.in_features, n_attributes, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
                )
            network.set_submodule(replaced, new)
        example = example.to(device)
        if self.preprocess is not None:
            example = self.preprocess(example)
        with _evaluating(network), torch.inference_mode():
            try:
                width = int(np.prod(network(example).shape[1:]))
            except RuntimeError as error:
                if replaced is None:
                    raise
                raise ValueError(
                    f"head='replace' replaced the last nn.Linear layer {replaced!r} by one with {n_attributes} "
                    f"outputs, and then the model failed on an image ({error}); a layer after {replaced!r} "
                    "expects its old width: replace the layers yourself and use head='keep'"
                ) from error
        if width != n_attributes:
            if replaced is None:
                raise ValueError(
                    f"head='keep' needs a model with one output per attribute ({n_attributes}), got {width}; "
                    "pass head='replace' to replace its last nn.Linear layer"
                )
            raise ValueError(
                f"head='replace' replaced the last nn.Linear layer {replaced!r} by one with {n_attributes} outputs, "
                f"but the model then has {width} outputs; replace the layers yourself and use head='keep'"
            )
        return network

    def decision_function(self, X):
        """Logits of the trained network, one column per attribute.

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.

        Returns
        -------
        logits : ndarray of shape (n_samples, n_attributes), dtype float32
            > 0 where the network predicts the attribute.
        """
        check_is_fitted(self)
        dataset = as_image_dataset(X, n_channels=input_channels(self.model_))
        return _network_outputs(
            self.model_, dataset, self.batch_size, device=self.device, preprocess=self.preprocess,
            num_workers=self.num_workers,
        )

    def predict_proba(self, X):
        """Probability of every attribute (the sigmoid of the logits).

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_attributes), dtype float32
            Probability that each image has each attribute (as scikit-learn's multi-label
            ``MLPClassifier``, one column per attribute, not one array per attribute).
        """
        return torch.sigmoid(torch.from_numpy(self.decision_function(X))).numpy()

    def predict(self, X):
        """Predict every attribute: 1 where its probability is above 0.5.

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.

        Returns
        -------
        y_pred : ndarray of shape (n_samples, n_attributes), dtype int64
            0/1 label matrix.
        """
        return (self.decision_function(X) > 0).astype(np.int64)

    def score(self, X, y, sample_weight=None):
        """Mean per-attribute accuracy (``attribute_report``'s mean row, ``1 - hamming_loss``).

        Not scikit-learn's default subset accuracy, which counts an image right only when all
        its attributes are: with 40 attributes that is near 0 for any model.

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.
        y : array-like or pandas.DataFrame of shape (n_samples, n_attributes)
            True 0/1 labels.
        sample_weight : array-like of shape (n_samples,), default=None
            Weights of the images.

        Returns
        -------
        score : float
            Share of right (image, attribute) predictions, images weighted by ``sample_weight``.
        """
        labels, _ = _check_labels(y, "y")
        predicted = self.predict(X)
        if labels.shape != predicted.shape:
            raise ValueError(f"y must have shape {predicted.shape} (images, attributes), got {labels.shape}")
        return float(np.average((labels == predicted).mean(axis=1), weights=sample_weight))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.target_tags.single_output = False
        tags.target_tags.multi_output = True
        tags.classifier_tags.multi_class = False
        tags.classifier_tags.multi_label = True
        return tags
