"""Fine-tuning of a (pruned) network on the labelled data of a new task.

The last step of ETL (section 3.5 of the ETL paper): after the unselected filters are cut out,
the sparse model is trained on the secondary task. This module is the training loop, and the
re-estimation of BatchNorm statistics that surgery makes stale; the pruner decides the loss from
the target type and builds the optimiser after surgery (surgery replaces parameters, so an
optimiser built before it would update orphaned tensors).
"""

import copy
import math
from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_parameter_constraints
from sklearn.utils.validation import _check_sample_weight
from torch import nn
from tqdm.auto import tqdm

from .images import as_image_dataset, iter_batches
from ._prefix import GraphPrefix, _Blocks, _Runner
from .inspection import _call_sequence, _check_device, _evaluating, _input_dtype, _seeded_rng

#: Default value of every key accepted in the ``finetune`` dict of :class:`~sklearn_craft.CraftPruner`.
FINETUNE_DEFAULTS = {
    "epochs": 10,
    "lr": 1e-3,
    "batch_size": 64,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "validation_fraction": 0.0,
    "early_stopping": None,
    "monitor": "loss",
}

#: Losses whose outputs are class scores, so that a validation accuracy is measured.
_CLASSIFICATION_LOSSES = ("cross_entropy", "bce")


class _CosineDistance(nn.Module):
    """``1 - cos(output, target)`` of every row, rows compared as vectors.

    The distillation loss of Vielzeuf et al. (Eq. 4, whose cosine *similarity* is to be maximised),
    used by :class:`~sklearn_craft.fusion.FusionDistiller`: only the direction of an embedding is
    learnt, not its norm. ``reduction`` is that of torch's losses; :func:`finetune` asks for
    per-sample values (``"none"``) to weight them.
    """

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, output, target):
        distance = 1 - nn.functional.cosine_similarity(output, target, dim=1)
        return distance if self.reduction == "none" else distance.mean()


_LOSSES = {
    "mse": nn.MSELoss,
    "cross_entropy": nn.CrossEntropyLoss,
    "bce": nn.BCEWithLogitsLoss,
    "cosine": _CosineDistance,
}

_CONSTRAINTS = {
    "epochs": [Interval(Integral, 1, None, closed="left")],
    "lr": [Interval(Real, 0, None, closed="neither")],
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "optimizer": [StrOptions({"sgd", "adam"})],
    "weight_decay": [Interval(Real, 0, None, closed="left")],
    "validation_fraction": [Interval(Real, 0, 1, closed="left")],
    "early_stopping": [Interval(Integral, 1, None, closed="left"), None],
    "monitor": [StrOptions({"loss", "accuracy"})],
}


def check_finetune_params(params):
    """Validate a dict of fine-tuning options and fill in the defaults.

    Parameters
    ----------
    params : dict
        Any subset of the keys of :data:`FINETUNE_DEFAULTS`: ``epochs`` (int >= 1), ``lr``
        (float > 0), ``batch_size`` (int >= 1), ``optimizer`` (``"sgd"`` with momentum 0.9, or
        ``"adam"``), ``weight_decay`` (float >= 0), ``validation_fraction`` (float in [0, 1)) and
        ``early_stopping`` (None, or the patience in epochs; needs ``validation_fraction > 0``) and
        ``monitor`` (``"loss"`` or ``"accuracy"``: what early stopping watches; ``"accuracy"``
        needs ``early_stopping`` and a classification loss, see :func:`finetune`).

    Returns
    -------
    params : dict
        A new dict with every key of :data:`FINETUNE_DEFAULTS`.

    Raises
    ------
    TypeError
        If ``params`` is not a dict.
    ValueError
        If a key is unknown or a value is out of range.

    Examples
    --------
    >>> from sklearn_craft.finetune import check_finetune_params
    >>> check_finetune_params({"epochs": 3})["epochs"], check_finetune_params({})["optimizer"]
    (3, 'adam')
    """
    if not isinstance(params, dict):
        raise TypeError(f"finetune_params must be None or a dict, got {type(params).__name__}")
    unknown = sorted(set(params) - set(FINETUNE_DEFAULTS))
    if unknown:
        raise ValueError(f"finetune_params has unknown keys {unknown}; allowed keys are {sorted(FINETUNE_DEFAULTS)}")
    merged = {**FINETUNE_DEFAULTS, **params}
    validate_parameter_constraints(_CONSTRAINTS, merged, caller_name="finetune_params")
    if merged["early_stopping"] is not None and merged["validation_fraction"] == 0:
        raise ValueError(
            "finetune_params['early_stopping'] needs finetune_params['validation_fraction'] > 0, "
            f"got validation_fraction={merged['validation_fraction']!r}"
        )
    if merged["monitor"] != "loss" and merged["early_stopping"] is None:
        raise ValueError(
            f"finetune_params['monitor']={merged['monitor']!r} needs finetune_params['early_stopping'], got None"
        )
    return merged


def finetune(
    model,
    X,
    y,
    *,
    loss,
    epochs=10,
    lr=1e-3,
    batch_size=64,
    optimizer="adam",
    weight_decay=0.0,
    validation_fraction=0.0,
    early_stopping=None,
    monitor="loss",
    device="cpu",
    preprocess=None,
    random_state=None,
    progress=False,
    sample_weight=None,
    num_workers=0,
):
    """Train ``model`` in place on images ``X`` and targets ``y``.

    Every parameter whose ``requires_grad`` is True is trained (frozen parameters stay frozen).
    Training that diverges (a loss or a weight becomes NaN or infinite, typically because
    ``lr`` is too large) stops with a ``ValueError`` naming ``lr`` rather than leaving a model
    whose every output is NaN.
    With ``early_stopping`` the weights with the lowest validation loss (or, with
    ``monitor="accuracy"``, the highest validation accuracy) are restored at the end, those before
    the first epoch included: on a few hundred images fine-tuning can make a good starting point
    worse, and then it is undone. The model is left in eval mode.

    Parameters
    ----------
    model : torch.nn.Module
        The network to train; it is modified in place (pass a copy to keep the original).
    X : array-like, torch.Tensor or torch.utils.data.Dataset
        Images, in any form accepted by :func:`sklearn_craft.images.as_image_dataset`.
    y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Targets in the form the loss expects: class indices for ``"cross_entropy"``, 0/1 values for
        ``"bce"`` and real values for ``"mse"`` and ``"cosine"``. A 1-D ``y`` is matched to a model
        output of shape (n, 1).
    loss : {"mse", "cross_entropy", "bce", "cosine"}
        Mean squared error, cross-entropy on logits, binary cross-entropy on logits, or the cosine
        distance ``1 - cos(output, y)`` between each output row and its target row (embedding
        distillation).
    epochs : int, default=10
        Number of passes over the training part of the data.
    lr : float, default=1e-3
        Learning rate.
    batch_size : int, default=64
        Images per optimisation step.
    optimizer : {"sgd", "adam"}, default="adam"
        Adam, or SGD with momentum 0.9.
    weight_decay : float, default=0.0
        L2 penalty of the optimiser.
    validation_fraction : float in [0, 1), default=0.0
        Fraction of the samples (drawn at random) held out to compute a validation loss after each
        epoch.
    early_stopping : int or None, default=None
        Stop when the monitored validation quantity has not improved for this many epochs.
    monitor : {"loss", "accuracy"}, default="loss"
        What early stopping watches and keeps the best of: the validation loss, or the validation
        accuracy (as scikit-learn's ``MLPClassifier`` watches its score): the share of validation
        samples whose largest logit is the target class for ``"cross_entropy"``, the share of
        outputs whose logit has the sign of the 0/1 target for ``"bce"`` (the mean accuracy over
        the outputs of a multi-label target), weighted with ``sample_weight``. A smooth loss can
        improve while fewer samples are right, which is what ``"accuracy"`` guards against; only
        a strictly higher accuracy replaces the kept weights, so a tie keeps the earlier epoch.
        Needs ``early_stopping`` and a classification ``loss``.
    device : str or torch.device, default="cpu"
        Device on which the model is trained; the model stays there.
    preprocess : callable or None, default=None
        Applied to every batch of images (float tensors in [0, 1]) before the model sees it, as in
        :class:`~sklearn_craft.pooling.ActivationPooler`, e.g. ``preset("mobilefacenet").preprocess``.
    random_state : int, RandomState instance or None, default=None
        Seeds the split, the shuffling and torch's random generator (dropout) so that two calls with
        the same integer give the same weights. The global torch seed is left untouched.
    progress : bool, default=False
        Show a tqdm progress bar over epochs.
    sample_weight : array-like of shape (n_samples,), default=None
        Non-negative weights of the samples in the loss. Weights are divided by their mean over
        the training samples, and each batch's loss is the mean of weight × per-sample loss (a
        per-sample loss is averaged over its outputs): a sample of weight 2 counts, in
        expectation, as that sample twice, whatever the scale of the weights. The validation
        loss is the weighted mean over the validation samples. The split is drawn over samples.
    num_workers : int, default=0
        Worker processes that read and collate the items of a Dataset ``X`` (see
        :func:`sklearn_craft.images.iter_batches`); 0 reads them in this process. A DataLoader
        ``X`` is read in the shuffled order of each epoch with its own collate function and
        workers. The weights do not depend on it.

    Returns
    -------
    history : pandas.DataFrame
        One row per epoch run: ``epoch``, ``train_loss`` and ``val_loss`` (NaN without validation),
        weighted means with ``sample_weight``, and for ``"cross_entropy"`` and ``"bce"`` with
        validation, ``val_accuracy`` (see ``monitor``); with validation, a first row ``epoch=0``
        holds the validation values before training. ``kept`` is True on the one epoch whose
        weights ``model`` ends with: the best by ``monitor`` (the first of equals, 0 for the
        untrained weights) with early stopping, the last one run without.

    Raises
    ------
    ValueError
        If an option is out of range, ``y`` does not match ``X``, or training diverges.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn_craft.finetune import finetune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    >>> X = np.random.RandomState(0).rand(20, 1, 8, 8).astype("float32")
    >>> history = finetune(net, X, np.zeros((20, 2)), loss="mse", epochs=2, random_state=0)
    >>> list(history.columns), len(history)
    (['epoch', 'train_loss', 'val_loss', 'kept'], 2)
    """
    settings = {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "validation_fraction": validation_fraction,
        "early_stopping": early_stopping,
        "monitor": monitor,
    }
    check_finetune_params(settings)
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {sorted(_LOSSES)}, got {loss!r}")
    if monitor == "accuracy" and loss not in _CLASSIFICATION_LOSSES:
        raise ValueError(f"monitor='accuracy' needs loss in {list(_CLASSIFICATION_LOSSES)}, got loss={loss!r}")
    dataset = as_image_dataset(X)
    target = torch.as_tensor(np.array(y), dtype=torch.long if loss == "cross_entropy" else torch.float32)
    n_samples = len(dataset)
    if target.shape[0] != n_samples:
        raise ValueError(f"y must have one row per image ({n_samples}), got {target.shape[0]} rows")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no parameter with requires_grad=True, so there is nothing to fine-tune")
    device = _check_device(device)

    seed, generator, val_idx, train_idx = _validation_split(n_samples, validation_fraction, random_state)
    n_val = len(val_idx)
    train_weights = val_weights = None
    if sample_weight is not None:
        weights = torch.tensor(_check_sample_weight(sample_weight, target.numpy(), ensure_non_negative=True))
        parts = {"training": train_idx, "validation": val_idx} if n_val else {"training": train_idx}
        totals = {part: weights[indices].sum().item() for part, indices in parts.items()}
        if min(totals.values()) <= 0:
            raise ValueError(
                f"sample_weight must give the training and validation samples a positive weight, got {totals}"
            )
        train_weights = (weights / weights[train_idx].mean()).float()
        val_weights = (weights / weights[val_idx].mean()).float() if n_val else None

    model.to(device)
    if optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    criterion = _LOSSES[loss](reduction="none")

    measure_accuracy = loss in _CLASSIFICATION_LOSSES and n_val > 0

    def validate():
        """``(val_loss, val_accuracy)``; the accuracy is NaN for a loss without classes."""
        model.eval()
        with torch.no_grad():
            return _run_epoch(
                model,
                criterion,
                dataset,
                target,
                val_idx,
                batch_size,
                device,
                preprocess,
                num_workers,
                weights=val_weights,
                accuracy=measure_accuracy,
            )

    def badness(val_loss, val_accuracy):
        """The monitored quantity, lower is better."""
        return -val_accuracy if monitor == "accuracy" else val_loss

    columns = ["epoch", "train_loss", "val_loss"] + (["val_accuracy"] if measure_accuracy else []) + ["kept"]
    rows = []
    best, best_state, best_epoch, stale = np.inf, None, 0, 0
    if n_val:
        val_loss, val_accuracy = validate()
        best = badness(val_loss, val_accuracy)
        rows.append({"epoch": 0, "train_loss": np.nan, "val_loss": val_loss, "val_accuracy": val_accuracy})
        if early_stopping is not None:
            best_state = copy.deepcopy(model.state_dict())
    with _seeded_rng(seed, device):
        for epoch in tqdm(range(1, epochs + 1), desc="fine-tuning", disable=not progress):
            model.train()
            shuffled = train_idx[torch.randperm(len(train_idx), generator=generator)]
            train_loss, _ = _run_epoch(
                model,
                criterion,
                dataset,
                target,
                shuffled,
                batch_size,
                device,
                preprocess,
                num_workers,
                opt,
                weights=train_weights,
            )
            val_loss, val_accuracy = validate() if n_val else (np.nan, np.nan)
            _check_converging(trainable, [train_loss, val_loss] if n_val else [train_loss], epoch, lr)
            rows.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy})
            if early_stopping is None:
                continue
            current = badness(val_loss, val_accuracy)
            if current < best:
                best, best_state, best_epoch, stale = current, copy.deepcopy(model.state_dict()), epoch, 0
            else:
                stale += 1
                if stale >= early_stopping:
                    break
    history = pd.DataFrame(rows, columns=columns)
    if best_state is not None:
        model.load_state_dict(best_state)
        history["kept"] = history["epoch"] == best_epoch
    else:
        history["kept"] = history["epoch"] == history["epoch"].max()
    model.eval()
    return history


def fit_temperature(logits, y, *, loss, sample_weight=None):
    """The temperature of ``logits`` that minimises their classification ``loss``.

    A linear satellite fitted by ridge regression to targets of plus and minus one ranks the
    classes well but its scores are not calibrated log-odds: used as the logits of a network's
    head they are under-confident, so the first epochs of fine-tuning spend themselves on
    scaling them, and an early-stopping loss judges the untrained head unfairly. Dividing the
    logits by one positive temperature (Guo et al., 2017, "On Calibration of Modern Neural
    Networks") fixes their scale without changing a single prediction: the sign of every logit
    and the largest logit of every sample stay where they are.

    Parameters
    ----------
    logits : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Scores of the samples, as the loss reads them (1-D for one output).
    y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Class indices for ``"cross_entropy"``, 0/1 values (one per output) for ``"bce"``.
    loss : {"cross_entropy", "bce"}
        Cross-entropy over the outputs, or binary cross-entropy of every output, as in
        :func:`finetune`.
    sample_weight : array-like of shape (n_samples,), default=None
        Non-negative weights of the samples in the mean loss.

    Returns
    -------
    temperature : float
        The minimiser of the weighted mean loss of ``logits / temperature``, searched on a log
        scale within [1e-2, 1e2] (logits that separate the classes perfectly have no finite
        minimiser and get the bound 1e-2).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_craft.finetune import fit_temperature
    >>> rng = np.random.default_rng(0)
    >>> logits = rng.normal(size=(5000, 3))
    >>> # Labels drawn from the softmax of three times the logits: a temperature of 1/3.
    >>> p = np.exp(3 * logits) / np.exp(3 * logits).sum(axis=1, keepdims=True)
    >>> y = (rng.random((5000, 1)) > p.cumsum(axis=1)).sum(axis=1)
    >>> round(fit_temperature(logits, y, loss="cross_entropy"), 1)
    0.3
    """
    if loss not in _CLASSIFICATION_LOSSES:
        raise ValueError(f"loss must be one of {list(_CLASSIFICATION_LOSSES)}, got {loss!r}")
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim not in (1, 2) or not np.isfinite(logits).all():
        raise ValueError(f"logits must be a finite 1-D or 2-D array, got shape {logits.shape}")
    logits = torch.as_tensor(logits.reshape(len(logits), -1))
    target = np.asarray(y)
    if len(target) != len(logits):
        raise ValueError(f"y must have one row per row of logits ({len(logits)}), got {len(target)}")
    if loss == "cross_entropy":
        target = torch.as_tensor(target.reshape(-1), dtype=torch.long)
    else:
        target = torch.as_tensor(target.reshape(logits.shape), dtype=torch.float64)
    weights = np.ones(len(logits)) if sample_weight is None else _check_sample_weight(sample_weight, logits.numpy())
    weights = torch.as_tensor(weights / weights.mean())
    criterion = _LOSSES[loss](reduction="none")

    def mean_loss(log_temperature):
        return float(_weighted_mean_loss(criterion(logits / math.exp(log_temperature), target), weights))

    # The loss of logits / T is convex in 1 / T, so unimodal in log T: a bounded scalar search.
    found = minimize_scalar(mean_loss, bounds=(math.log(1e-2), math.log(1e2)), method="bounded", options={"xatol": 1e-6})
    return math.exp(found.x)


def _weighted_mean_loss(losses, weights):
    """Mean over the samples of weight × loss, a sample's loss the mean of its outputs' ``losses``."""
    return (losses.reshape(len(weights), -1).mean(dim=1) * weights).mean()


def _validation_split(n_samples, validation_fraction, random_state):
    """The draw :func:`finetune` makes from ``random_state``: ``(seed, generator, val_idx, train_idx)``.

    The last ``1 - validation_fraction`` of a seeded permutation trains, the first
    ``ceil(validation_fraction * n_samples)`` validate; ``generator`` goes on to shuffle the
    epochs. :class:`~sklearn_craft.pruner.CraftPruner` draws the same split before fine-tuning to
    fit its satellite head on the training part only, so that the validation loss of the
    untrained network is not that of a head fitted on the validation images.
    """
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_samples, generator=generator)
    n_val = int(np.ceil(validation_fraction * n_samples)) if validation_fraction > 0 else 0
    if n_val >= n_samples:
        raise ValueError(f"validation_fraction={validation_fraction!r} leaves no training sample out of {n_samples}")
    return seed, generator, order[:n_val], order[n_val:]


def _check_converging(parameters, losses, epoch, lr):
    """Stop when training diverged: a non-finite loss or weight would make every prediction NaN."""
    finite_losses = bool(np.isfinite(losses).all())
    if finite_losses and all(bool(torch.isfinite(parameter).all()) for parameter in parameters):
        return
    raise ValueError(
        f"fine-tuning diverged: {'the weights' if finite_losses else 'the loss'} became NaN or infinite "
        f"in epoch {epoch} (losses {[float(loss) for loss in losses]}); use a smaller lr, got lr={lr!r}"
    )


class _InputRecorded(Exception):
    """Raised once every watched module has seen its input: the rest of the forward pass is not needed."""


class _ChannelMoments:
    """Count, mean and sum of squared deviations of every channel, merged batch by batch in float64.

    Merging the moments of batches (Chan, Golub and LeVeque's update) gives those of their
    union, whatever the batch size, without the cancellation of a sum of squares.
    """

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x):
        values = x.detach().to(torch.float32 if x.device.type == "mps" else torch.float64)  # MPS has no float64
        # Reduced in place over every axis but the channels': no transposed copy, no squared deviations held.
        variance, mean = torch.var_mean(values, dim=[0, *range(2, x.dim())], correction=0)
        count = x.numel() // x.shape[1]
        mean, m2 = mean.cpu().double(), variance.cpu().double() * count
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total


def _record_inputs(model, modules, dataset, batch_size, device, preprocess, num_workers, record, prefix=None):
    """Call ``record(index, input)`` with the input of every module of ``modules`` on every batch.

    The network runs in eval mode, without gradients, and each pass stops once all the modules
    have run (a module called several times in a pass records its first call). ``prefix``: a
    :class:`~sklearn_craft._prefix.GraphPrefix` over the same batches, whose values the pass
    starts from where they serve the model.
    """
    seen = set()
    if prefix is None:
        prefix = GraphPrefix(dataset, batch_size, device, preprocess, num_workers)

    def hook(index):
        def watch(module, inputs):
            if index not in seen:
                record(index, inputs[0])
                seen.add(index)
            if len(seen) == len(modules):
                raise _InputRecorded

        return watch

    with torch.no_grad():
        # ``preprocess`` runs as the next batch is drawn, outside the model's lock.
        for _, run in prefix.forwards(model, modules):
            seen.clear()
            with _evaluating(model):
                handles = [module.register_forward_pre_hook(hook(index)) for index, module in enumerate(modules)]
                try:
                    run()
                except _InputRecorded:
                    pass
                finally:
                    for handle in handles:
                        handle.remove()


def _input_moments(model, norm, dataset, batch_size, device, preprocess, num_workers):
    """Moments of the input of ``norm`` over all images, the network running in eval mode up to it."""
    moments = _ChannelMoments()
    _record_inputs(model, [norm], dataset, batch_size, device, preprocess, num_workers, lambda _, x: moments.add(x))
    return moments


#: Most bytes of activations :func:`recalibrate_batchnorm` keeps to resume its passes (beyond it,
#: every pass starts from the images).
_RESUME_BYTES = 1 << 30


def _resume_points(model, example, norms):
    """BatchNorm name -> (name of an ``nn.Sequential``, index of its child holding the layer).

    The Sequential is the outermost one of plain type (its own ``forward`` chains its children)
    that runs once per pass, every leaf under it running once too: running its children from a
    stored input of one of them then computes exactly what the whole network computes there.
    Layers under no such Sequential are left out.
    """
    sequentials = {name: module for name, module in model.named_modules() if type(module) is nn.Sequential}
    calls = dict.fromkeys(sequentials, 0)

    def count(name):
        def hook(module, args):
            calls[name] += 1

        return hook

    handles = [module.register_forward_pre_hook(count(name)) for name, module in sequentials.items()]
    try:
        leaf_calls = pd.Series(_call_sequence(model, example), dtype=object).value_counts()
    finally:
        for handle in handles:
            handle.remove()
    # Outermost first: a name is never longer than those of the modules under it.
    eligible = [
        name
        for name in sorted(sequentials, key=len)
        if calls[name] == 1 and (leaf_calls[[leaf for leaf in leaf_calls.index if _under(leaf, name)]] == 1).all()
    ]
    points = {}
    for norm in norms:
        owner = next((name for name in eligible if _under(norm, name) and norm != name), None)
        if owner is not None:
            child = norm[len(owner) + 1 :].split(".")[0] if owner else norm.split(".")[0]
            points[norm] = (owner, list(sequentials[owner]._modules).index(child))
    return points


def _graph_points(model, norms):
    """BatchNorm name -> position of the node of a ``torch.fx.GraphModule`` that calls it.

    Layers the graph calls more than once are left out, and all of them when the graph has
    another number of inputs than one.
    """
    nodes = list(model.graph.nodes)
    if [node.op for node in nodes].count("placeholder") != 1:
        return {}
    targets = pd.Series([node.target if node.op == "call_module" else None for node in nodes], dtype=object)
    counts = targets.value_counts()
    return {name: int(np.flatnonzero(targets == name)[0]) for name in norms if counts.get(name) == 1}


def _under(name, ancestor):
    """Whether module ``name`` is ``ancestor`` or inside it (``""`` is the whole model)."""
    return not ancestor or name == ancestor or name.startswith(ancestor + ".")


class _Store:
    """What one pass keeps of every batch, as long as all of it takes at most :data:`_RESUME_BYTES`.

    ``add`` is called once per batch, in order, with a dict of the values to keep and the batch's
    number of images; they are copied into one block per value for all ``n_images`` (see
    :class:`~sklearn_craft._prefix._Blocks`). The values the pass resumes from (``old_bytes``)
    are held until it ends, and count too. A pass whose first batch, scaled to all the images,
    would exceed the budget keeps nothing from the start (``batches`` is None), nor does one that
    exceeds it later; the pass goes on without storing.
    """

    def __init__(self, n_images, old_bytes=0):
        self.batches, self.blocks = [], _Blocks(n_images, _RESUME_BYTES, held=old_bytes)

    def add(self, values, n_batch, shared=None):
        """Keep copies of ``values`` (a dict), and ``shared`` (a dict of the model's own tensors) as they are."""
        if self.batches is None:
            return
        kept = self.blocks.keep(values, n_batch)
        if kept is None:
            self.batches, self.blocks = None, None
        else:
            self.batches.append({**(shared or {}), **kept})


def _released(stored):
    """The items of the list ``stored``, each dropped from it as it is handed out."""
    while stored:
        yield stored.pop(0)


class _ResumedInputs:
    """The input of one child of an ``nn.Sequential`` on every batch, moved along its children.

    ``moments((sequential, index), norm)`` runs every batch up to ``norm``, under child ``index``:
    from the kept inputs of an earlier child of the same Sequential, through the children in
    between, or else on a pass from the images. It keeps the inputs of child ``index`` for the
    next call, unless they take more than :data:`_RESUME_BYTES`.
    """

    def __init__(self, model, dataset, batch_size, device, preprocess, num_workers):
        self.model, self.pass_args = model, (dataset, batch_size, device, preprocess, num_workers)
        self.point, self.stored = None, None

    def moments(self, point, norm):
        """Moments of the input of ``norm`` over all batches."""
        sequential, index = point
        children = list(self.model.get_submodule(sequential))
        moments = _ChannelMoments()
        resume = self.stored is not None and self.point[0] == sequential and self.point[1] <= index
        start, stored = self.point, (self.stored if resume else None)
        self.point, self.stored = None, None
        store = _Store(len(self.pass_args[0]), stored.blocks.nbytes if resume else 0)
        if resume:

            def record(module, inputs):
                moments.add(inputs[0])
                raise _InputRecorded

            handle = norm.register_forward_pre_hook(record)
            try:
                with torch.no_grad():
                    for values in _released(stored.batches):
                        x = values["input"]
                        for child in children[start[1] : index]:
                            x = child(x)
                        try:
                            # A copy: an in-place operation at the start of the child must not change what is kept.
                            children[index](x.clone())
                        except _InputRecorded:
                            pass
                        store.add({"input": x}, len(x))
            finally:
                handle.remove()
        else:

            def record(which, x):
                if which == 1:
                    moments.add(x)
                else:
                    # Copied (into the store's blocks): the child goes on running on ``x``, in place maybe.
                    store.add({"input": x}, len(x))

            _record_inputs(self.model, [children[index], norm], *self.pass_args, record)
        if store.batches is not None:
            self.point, self.stored = point, store
        return moments


class _GraphValues:
    """The values a ``torch.fx.GraphModule`` computes on every batch, up to one node of its graph.

    A graph says what each node reads, so a pass can stop before any node and go on from there
    later: ``moments(position, norm)`` runs every batch up to node ``position`` (from the values
    kept at an earlier node, else from those of ``prefix``, a
    :class:`~sklearn_craft._prefix.GraphPrefix` that serves the model, else from the images, one
    batch at a time) and keeps, per batch, only the values that nodes from there on read, unless
    they take more than :data:`_RESUME_BYTES`: a later, smaller layer may then be kept again.
    """

    def __init__(self, model, dataset, batch_size, device, preprocess, num_workers, prefix=None):
        self.model, self.runner = model, _Runner(model, list(model.graph.nodes))
        self.pass_args, self.prefix = (dataset, batch_size, device, preprocess, num_workers), prefix
        self.position, self.stored = None, None

    def moments(self, position, norm):
        """Moments of the input of ``norm``, the layer of the node at ``position``, over all batches."""
        node = self.runner.nodes[position]
        moments = _ChannelMoments()
        kept_at, stored, self.position, self.stored = self.position, self.stored, None, None
        if stored is not None and kept_at <= position:
            start, envs, old_bytes = kept_at, _released(stored.batches), stored.blocks.nbytes
        elif self.prefix is not None and (served := self.prefix.values(self.model, [norm])) is not None:
            (start, envs), old_bytes, stored = served, 0, None
        else:
            start, envs, old_bytes, stored = self.runner.first, self.runner.from_images(self.pass_args), 0, None
        store = _Store(len(self.pass_args[0]), old_bytes)
        with torch.no_grad():
            for env in envs:
                self.runner.run(env, start, position)
                moments.add(env[node.args[0]])
                # Parameters and buffers read by get_attr nodes are the model's own: kept, not copied.
                values = {key: value for key, value in env.items() if key.op != "get_attr"}
                shared = {key: value for key, value in env.items() if key.op == "get_attr"}
                store.add(values, self.runner.batch_size(env), shared)
        if store.batches is not None:
            self.position, self.stored = position, store
        return moments


def recalibrate_batchnorm(
    model, X, *, batch_size=64, device="cpu", preprocess=None, progress=False, num_workers=0, layers=None
):
    """Re-estimate the running mean and variance of every BatchNorm layer of ``model`` on ``X``.

    Removing filters changes what the layers after them see, so the statistics a BatchNorm layer
    stored on the original network no longer describe its inputs: in eval mode it then shifts and
    scales them wrongly, and when fine-tuning starts (train mode, batch statistics) the responses
    jump, far from those a head was fitted on. Re-estimating the statistics on the new task's
    images ("adaptive BatchNorm", Li et al., EagleEye, ECCV 2020) fixes both; no weight changes.

    The statistics are exact and do not depend on ``batch_size``: they are those a BatchNorm
    layer in train mode would store after one batch holding all of ``X`` (mean, and unbiased
    variance, of its input over every image and position), each layer normalising what later
    layers see with the statistics of all of ``X``. Layers are estimated one after the other in
    the order they run, each over a pass of the images through the layers before it (in float64,
    merged batch by batch). The passes do not start from the images where they can resume: in
    a ``torch.fx.GraphModule`` (such as the networks :class:`~sklearn_craft.pruner.CraftPruner`
    cuts) from the values of the graph's nodes, kept per batch up to the layer's node; in other
    networks, inside an ``nn.Sequential`` that runs once per pass (MobileNet's blocks, VGG's
    features, ResNet's stages), from the stored input of the child holding the layer. The
    statistics are the same bit for bit. The values kept of all of ``X`` (one block per value,
    allocated once per pass) may take up to 1 GiB, together with those the pass resumes from: a
    pass that would keep more keeps nothing, and the next one starts from the images (and may
    keep the values of a later, smaller layer). Measured on one thread: MobileFaceNet, 50
    images, 5.9 s against 33.7 s; inside a ``CraftPruner`` fit on 240 CelebA images, 4.5 s
    against 76.4 s; in a sequential fit on 300 AFLW2000 images with the budget scaled to what
    1,476 images take, 75 s against 358 s when every layer after the first one over the budget
    started from the images. A layer called several times in a forward pass is estimated on its first
    call; one that does not run on ``X`` keeps its statistics, and so does one that does not
    track running statistics.

    Parameters
    ----------
    model : torch.nn.Module
        The network; its BatchNorm buffers are modified in place (``num_batches_tracked`` counts
        the batches of one pass) and it is moved to ``device``, as :func:`finetune` moves it.
        Every module runs in eval mode (no dropout) and every module's ``training`` flag is
        restored afterwards.
    X : array-like, torch.Tensor or torch.utils.data.Dataset
        Images, in any form accepted by :func:`sklearn_craft.images.as_image_dataset`.
    batch_size : int, default=64
        Images per forward pass; the statistics do not depend on it.
    device : str or torch.device, default="cpu"
        Where the forward passes run.
    preprocess : callable or None, default=None
        Applied to every batch of images before the model sees it.
    progress : bool, default=False
        Show a tqdm progress bar over the BatchNorm layers.
    num_workers : int, default=0
        Worker processes that read and collate the items of a Dataset ``X`` (see
        :func:`sklearn_craft.images.iter_batches`); 0 reads them in this process.
    layers : collection of str or None, default=None
        Names of the BatchNorm layers to re-estimate; the others keep their statistics. None
        re-estimates all. When the layers left out run before every layer of ``layers``, or
        their inputs did not change since they were last estimated, the result is that of
        re-estimating all (the sequential selection of
        :class:`~sklearn_craft.pruner.CraftPruner` re-estimates only the layers after a cut).

    Returns
    -------
    model : torch.nn.Module
        The same model.

    Examples
    --------
    >>> import torch
    >>> from sklearn_craft.finetune import recalibrate_batchnorm
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    >>> X = 5 + torch.randn(40, 1, 8, 8)
    >>> net = recalibrate_batchnorm(net, X, batch_size=7)
    >>> torch.allclose(net[1].running_mean, net[0](X).mean((0, 2, 3)).detach(), atol=1e-5)
    True
    """
    return _recalibrate_batchnorm(
        model,
        X,
        batch_size=batch_size,
        device=device,
        preprocess=preprocess,
        progress=progress,
        num_workers=num_workers,
        layers=layers,
    )


def _recalibrate_batchnorm(
    model, X, *, batch_size=64, device="cpu", preprocess=None, progress=False, num_workers=0, layers=None, prefix=None
):
    """:func:`recalibrate_batchnorm`; the passes of a ``GraphModule`` may start from ``prefix``'s values.

    ``prefix``: a :class:`~sklearn_craft._prefix.GraphPrefix` over ``X`` with the same batches,
    used for a layer wherever it serves the model (computed with the same network before its
    cut, which the layer runs after).
    """
    norms = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    }
    if layers is not None:
        if isinstance(layers, str):
            raise TypeError(f"layers must be a collection of BatchNorm layer names, got the string {layers!r}")
        unknown = sorted(set(layers) - set(norms))
        if unknown:
            raise ValueError(f"layers must name BatchNorm layers of the model that track running statistics, got {unknown}")
        norms = {name: module for name, module in norms.items() if name in set(layers)}
    if not norms:
        return model
    dataset = as_image_dataset(X)
    dtype = _input_dtype(model)
    device = _check_device(device)
    model.to(device)
    example = next(iter_batches(dataset, 1, device=device, preprocess=preprocess, indices=[0]))
    example = example.to(dtype)
    order = [name for name in dict.fromkeys(_call_sequence(model, example)) if name in norms]
    graph = isinstance(model, torch.fx.GraphModule)
    points = _graph_points(model, order) if graph else _resume_points(model, example, order)
    unbiased = {}
    with _evaluating(model):
        args = (model, dataset, batch_size, device, preprocess, num_workers)
        resumed = _GraphValues(*args, prefix=prefix) if graph else _ResumedInputs(*args)
        for name in tqdm(order, desc="BatchNorm statistics", disable=not progress):
            norm = norms[name]
            if name in points:
                moments = resumed.moments(points[name], norm)
            else:
                moments = _input_moments(model, norm, dataset, batch_size, device, preprocess, num_workers)
            if moments.count == 0:
                continue
            with torch.no_grad():
                norm.running_mean.copy_(moments.mean)
                # While later layers are estimated, this one normalises as it would a batch of all of
                # X, with the biased variance; it stores the unbiased one, as BatchNorm does.
                norm.running_var.copy_(moments.m2 / moments.count)
                norm.num_batches_tracked.fill_(math.ceil(len(dataset) / batch_size))
            unbiased[name] = moments.m2 / max(moments.count - 1, 1)
    with torch.no_grad():
        for name, variance in unbiased.items():
            norms[name].running_var.copy_(variance)
    return model


def _network_outputs(model, dataset, batch_size, *, device, preprocess=None, num_workers=0):
    """Outputs of ``model`` (in eval mode) on every image of ``dataset``, as an N×d float array."""
    dtype = _input_dtype(model)
    with _evaluating(model), torch.inference_mode():
        outputs = [
            model(batch.to(dtype)).reshape(len(batch), -1).float().cpu()
            for batch in iter_batches(dataset, batch_size, device=device, preprocess=preprocess, num_workers=num_workers)
        ]
    return torch.cat(outputs).numpy()


def _run_epoch(
    model,
    criterion,
    dataset,
    target,
    indices,
    batch_size,
    device,
    preprocess,
    num_workers,
    opt=None,
    weights=None,
    accuracy=False,
):
    """Mean loss over ``indices`` in batches; one optimisation step per batch when ``opt`` is given.

    ``criterion`` returns per-element losses; ``weights`` (None: all 1) weight every sample's.
    Returns ``(loss, accuracy)``: with ``accuracy``, that of class logits (cross-entropy) or of
    the signs of 0/1 logits (binary cross-entropy, averaged over the outputs), else NaN.
    """
    total = correct = 0.0
    batches = iter_batches(
        dataset, batch_size, device=device, preprocess=preprocess, indices=indices.numpy(), num_workers=num_workers
    )
    dtype = _input_dtype(model)
    for start, xb in zip(range(0, len(indices), batch_size), batches):
        output = model(xb.to(dtype))
        rows = indices[start : start + batch_size]
        yb = target[rows].to(device)
        if not isinstance(criterion, nn.CrossEntropyLoss):
            yb = yb.reshape(output.shape).to(output.dtype)
        losses = criterion(output, yb)
        if weights is None:
            batch_loss = losses.mean()
        else:
            batch_loss = _weighted_mean_loss(losses, weights[rows].to(device))
        if opt is not None:
            opt.zero_grad()
            batch_loss.backward()
            opt.step()
        total += batch_loss.item() * len(xb)
        if accuracy:
            if isinstance(criterion, nn.CrossEntropyLoss):
                right = (output.argmax(dim=1) == yb).float()
            else:
                right = ((output > 0) == (yb > 0.5)).float().reshape(len(xb), -1).mean(dim=1)
            batch_weights = torch.ones(len(xb), device=device) if weights is None else weights[rows].to(device)
            correct += (right * batch_weights).sum().item()
    return total / len(indices), (correct / len(indices) if accuracy else np.nan)
