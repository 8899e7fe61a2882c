"""CraftPruner: CRAFT / ETL pruning of a pretrained network for a new task.

The pipeline of the ETL paper (section 3.5 and Algorithm 1) and of the Low-cost TL paper
(section 4): pool every convolution's filter responses over the new task's data
(:mod:`~sklearn_craft.pooling`), select the filters of each layer at the knee of its LASSO
characteristic curve (:mod:`~sklearn_craft.selection`), cut the other filters out of the network
in one shot (:mod:`~sklearn_craft.surgery`), attach a head, optionally fine-tune
(:mod:`~sklearn_craft.finetune`) and measure the savings (:mod:`~sklearn_craft.profiling`).
This module only composes them.
"""

import copy
import math
import time
import warnings
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, TransformerMixin, _fit_context
from sklearn.metrics import accuracy_score, r2_score
from sklearn.utils import _safe_indexing, check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, check_is_fitted
from torch import nn
from tqdm.auto import tqdm

from .images import as_image_dataset, input_channels, iter_batches
from ._prefix import GraphPrefix
from .compensation import _compensated_copy
from .finetune import (
    _network_outputs,
    _recalibrate_batchnorm,
    _validation_split,
    check_finetune_params,
    finetune,
    fit_temperature,
    recalibrate_batchnorm,
)
from .inspection import (
    _call_sequence,
    _check_device,
    _evaluating,
    _input_dtype,
    _NetworksPickleOnCpu,
    _on_device,
    _select_convs,
)
from .pooling import ActivationPooler
from .profiling import compare_models, count_flops, filter_flops
from ._lasso_path import _add_sums, _cross_sums
from .rules import RULES, FilterRule, _check_scores, check_filter_rule, top_filters
from .satellites import (
    _satellite_from_sums,
    fit_layer_satellites,
    fit_satellite,
    make_satellite,
    satellite_decision,
    satellite_head,
)
from .selection import LassoFilterSelector, _streamed_held_out
from .surgery import attach_head, channel_readers, coupled_groups, prune_channels, truncate
from .targets import CLASSIFICATION_KINDS, encode_target

#: Share of the samples held out to score each layer's satellite (``satellite_scores_``).
_SCORE_FRACTION = 0.25
#: LassoFilterSelector parameters the pruner sets itself.
_RESERVED_SELECTOR_PARAMS = ("gamma", "groups", "memory", "progress", "knee", "group_costs")
#: Largest distance between ``flops_target`` and the FLOPs share of the network it gives.
_FLOPS_TOLERANCE = 0.005


class _Stopwatch:
    """Accumulates wall-clock seconds per fit stage."""

    def __init__(self):
        self.seconds = {}
        self._stage, self._start = None, None

    def start(self, stage):
        self.stop()
        self._stage, self._start = stage, time.perf_counter()

    def stop(self):
        if self._stage is not None:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + time.perf_counter() - self._start
            self._stage = None


@dataclass
class _FitData:
    """What every stage of one fit reads: the images, the target, the weights and the seeds."""

    X: object
    dataset: object
    example: torch.Tensor
    y: np.ndarray
    Y: np.ndarray
    target_type: str
    classes: np.ndarray
    sample_weight: np.ndarray
    seeds: np.ndarray
    rule: FilterRule
    rule_random_state: np.random.RandomState
    #: Layer -> the price of one of its filters in the knees (``knee="flops"``), else None.
    group_costs: dict = None


@dataclass
class _Selection:
    """What a selection mode hands to the cut: filters, multipliers, satellites, and how it got them."""

    selected: dict
    scale: dict
    satellites: dict
    scores: object
    selectors: dict
    stages: list
    keep_ratio: float
    #: Sequential mode: the network cut stage by stage, the channels each layer kept in it, and
    #: its BatchNorm layers whose statistics the last cuts made stale.
    network: nn.Module = None
    kept: dict = None
    stale: list = None


def _columns(layers, widths):
    """Layer -> its column indices in features that hold ``layers`` side by side."""
    starts = np.cumsum([0, *widths[:-1]])
    return {layer: np.arange(start, start + width) for layer, start, width in zip(layers, starts, widths)}


def _standardized(values):
    """Columns of ``values`` that vary, centred, scaled to unit variance and by 1/sqrt(their number).

    The block then has a total variance of 1, whatever its number of columns, so that blocks mixed
    in one multi-output target weigh the same.
    """
    values = np.asarray(values, dtype=np.float64)
    std = values.std(axis=0)
    varying = std > 1e-12 * (np.abs(values).max(axis=0) + 1)
    values = (values[:, varying] - values[:, varying].mean(axis=0)) / std[varying]
    return values / np.sqrt(max(values.shape[1], 1))


def _stage_row(layers, columns, selected, seconds):
    return {
        "layers": list(layers),
        "n_filters": int(sum(len(columns[layer]) for layer in layers)),
        "n_selected": int(sum(len(selected[layer]) for layer in layers)),
        "seconds": seconds,
    }


class CraftPruner(_NetworksPickleOnCpu, TransformerMixin, BaseEstimator):
    """Prune a pretrained network for a new task with cross-task aware filters (CRAFT / ETL).

    ``fit`` pools the global-average response of every filter of the chosen convolutions over the
    task's images (once, cached by ``memory``), selects each layer's filters at the knee of its
    LASSO characteristic curve at tolerance ``gamma``, cuts all other filters out of a copy of
    the network in one shot (Algorithm 1 of the ETL paper; a channel of a residual stream is kept
    when any convolution of the stream selects it, and a depthwise convolution keeps the channels
    of its input), attaches a head, optionally fine-tunes and measures the savings. The model
    passed in is never modified.

    Targets are read like :func:`sklearn_craft.targets.encode_target` reads them: floats are
    regressed (1-D or several outputs), integer or string labels are binary or multi-class
    classes, and a 0/1 matrix is a multi-label target. Cast integer targets to float to regress
    on them, or use :class:`CraftRegressor` (and :class:`CraftClassifier` for class labels),
    which also carry scikit-learn's regressor and classifier identities.

    **Satellites.** For every pooled layer, ``satellites_[layer]`` is the satellite of the
    target's kind (:func:`sklearn_craft.satellites.make_satellite`: centring, then ridge
    regression, or a ridge classifier with a linear decision) fitted on the pooled responses of
    that layer's LASSO-selected filters ``selected_[layer]`` in the original network. The
    satellite of ``head_layer_`` is the exception (below).

    **Heads.**

    - ``head="satellite"``: the network is cut after the response of ``head_layer_`` (the last
      pooled layer, or with ``head_layer="best"`` the layer whose satellite scores best on held-out
      samples, step 1 of the Low-cost TL paper's pruning) and ends with global average pooling,
      Flatten and a Linear layer. Cutting earlier layers changes ``head_layer_``'s responses, so
      its satellite is refitted on the *pruned* network's own pooled responses (all its kept
      filters, ``keep_[head_layer_]``, i.e. ``transform(X)``), and the Linear layer computes
      exactly that satellite's decision function (centring folded into the bias). Before
      fine-tuning, ``pruned_model_(x)`` equals ``satellite_decision(satellites_[head_layer_],
      transform(x)) / head_temperature_`` (:func:`sklearn_craft.satellites.satellite_decision`;
      the temperature is 1 unless ``calibrate_head``): the class scores for classification, the
      prediction for regression.
    - ``head="original"``: the original layers after the convolutions (the classifier) are kept,
      their inputs pruned (Algorithm 1, lines 9-10). Its outputs must match the task: one per
      regression output, 1 or 2 for a binary target, one per class or label otherwise (replace
      the last layer before passing the model, e.g. ``model.fc = nn.Linear(512, 3)``). Without
      fine-tuning its predictions are those of the original layers, so this head is meant to be
      used with ``finetune_params``.

    **Selection.** ``selection="one-shot"`` (the papers' rule) selects every layer on the
    responses of the original network. ``selection="sequential"`` is aware of the cascade:
    the groups of coupled convolutions (:func:`sklearn_craft.surgery.coupled_groups`: a residual
    stream, a convolution and the depthwise one that follows it) are *stages*, taken in forward
    order; each stage's layers are pooled on the network already cut at the stages before it
    (BatchNorm statistics re-estimated first with ``recalibrate_bn``, a forward pass stopping
    after the stage's last layer, cached by ``memory``), selected, and cut before the next
    stage. It costs passes per stage instead of one (BatchNorm re-estimation, pooling and, with
    ``compensate``, compensation), but they start from the values, kept per image (up to 1
    GiB), that the previous stage's pooling saw before that stage's first layer: nothing before
    it changes in between. On MobileFaceNet with 1,476 AFLW2000 images (γ = 0.01, compensation,
    one thread) that made the fit 3.1 times faster (358 s of CPU against 1,098 s), with the same
    network bit for bit. It keeps the filters the *pruned* network needs: on MobileFaceNet with
    450 CelebA images, gender scored 0.913 before fine-tuning at 61 % of the FLOPs against 0.827
    at 57 % one-shot (issue 13's research).
    ``criterion`` sets what LASSO predicts: the task (``"task"``), or the pooled responses, in
    the original network, of the convolutions that read the layer
    (:func:`sklearn_craft.surgery.channel_readers`: the filters that rebuild the next layer, as in
    ThiNet and He et al. 2017, for layers whose own responses say little of the task), or both.
    ``filter_rule`` replaces LASSO's choice of *which* filters by another ranking
    (:mod:`sklearn_craft.rules`), keeping LASSO's counts, or with ``flops_target`` one keep
    ratio for every layer, so that baselines run through the same stages.

    **Outputs.** ``predict`` maps the network outputs to targets: the outputs themselves for
    regression; for a binary target ``classes_[1]`` where the single output is > 0 (or the
    arg-max of two outputs); the arg-max class for multi-class; 1 where an output is > 0 for
    multi-label (a probability above 0.5 after fine-tuning with binary cross-entropy).

    Parameters
    ----------
    model : torch.nn.Module
        The pretrained network, traceable by torch.fx, with float32 parameters (on any device);
        never modified (deep-copied for surgery).
    gamma : float in [0, 1], default=0.01
        Largest allowed increase in held-out RMSE at the knee of each layer's characteristic
        curve, as a fraction of its range (ETL Eq. 4). Larger values keep fewer filters;
        ``0`` keeps every filter.
    layers : "conv", list of str or callable, default="conv"
        Convolutions to pool and prune (see :class:`~sklearn_craft.pooling.ActivationPooler`).
        Convolutions not chosen keep all their filters.
    head : {"satellite", "original"}, default="satellite"
        Output layers of the pruned network (see above).
    head_layer : "last", "best" or str, default="last"
        Where a satellite head cuts the network: after the last pooled layer; after the layer
        whose satellite scores best on held-out samples (``satellite_scores_``; ties go to the
        earlier layer), dropping the convolutions after it; or after the pooled convolution of
        that name. Anything but "last" needs ``head="satellite"``.
    finetune_params : dict or None, default=None
        None keeps the pruned weights; a dict (keys ``epochs``, ``lr``, ``batch_size``,
        ``optimizer``, ``weight_decay``, ``validation_fraction``, ``early_stopping``,
        ``monitor``, see :func:`sklearn_craft.finetune.check_finetune_params`) trains the whole
        pruned network with mean squared error (regression), cross-entropy (multi-class, or binary
        with two outputs) or binary cross-entropy on logits (binary with one output, multi-label).
        With ``early_stopping`` the best epoch by validation loss is kept, or by validation
        accuracy with ``monitor="accuracy"`` (classification targets only), the satellite head
        before any training included.
    scale_filters : bool, default=False
        Multiply every selected filter's pre-activation by its LASSO coefficient at the knee (ETL
        Eq. 5), or by the L2 norm of its coefficients over the encoded targets when there are
        several. Off by default: a negative coefficient does not flip a response through ReLU
        (ReLU(-x) != -ReLU(x)), it replaces it by another one. Needs ``gamma > 0``.
    recalibrate_bn : bool, default=True
        When surgery removed filters, re-estimate the running statistics of every BatchNorm layer
        of the cut network on the training images
        (:func:`sklearn_craft.finetune.recalibrate_batchnorm`) before the satellite head is
        fitted. The statistics stored in the original network describe inputs that surgery
        changed; left stale, they distort the pruned network's responses, and fine-tuning (which
        normalises with batch statistics) starts far from the fitted head. A network that keeps
        every filter (and is not rescaled by ``scale_filters``) keeps its statistics.
    selector_params : dict or None, default=None
        Further parameters of :class:`~sklearn_craft.selection.LassoFilterSelector` (``alphas``,
        ``eps``, ``validation_fraction``, ``cv``, ``standardize``, ``n_jobs``); ``gamma``,
        ``groups``, ``memory`` and ``progress`` are set by the pruner.
    device : str or torch.device, default="cpu"
        Where forward passes and fine-tuning run; ``pruned_model_`` lives there (the selection
        itself runs on the CPU). A device this torch build cannot use is a ``ValueError``. On a
        GPU, torch lets cuDNN convolve in TF32 by default, which moves pooled responses by about
        1e-3 (relative) and can change a knee; ``torch.backends.cudnn.allow_tf32 = False`` gives
        the CPU's selection (measured equal on MobileFaceNet, see the Reproducing page). A
        pickled pruner keeps its networks on the CPU and puts them back on their device where it
        exists: one fitted on a GPU loads without one, and predicts there after
        ``set_params(device="cpu")``.
    batch_size : int, default=64
        Images per forward pass when pooling, predicting and transforming (a DataLoader given
        as ``X`` keeps its own batches there; fine-tuning has its own ``batch_size``).
    random_state : int, RandomState instance or None, default=None
        Seeds the LASSO validation split, the satellites' held-out split and fine-tuning. Fix it
        for ``memory`` to reuse the LASSO paths across fits.
    memory : None, str or joblib.Memory, default=None
        Cache of the pooled responses and of the LASSO paths, which do not depend on ``gamma``:
        a grid search over ``gamma`` pools each training set once.
    progress : bool, default=False
        Show tqdm progress bars (pooling, selection, fine-tuning).
    preprocess : callable or None, default=None
        Applied to every batch of images (float tensors in [0, 1]) before the network sees it,
        when pooling, fine-tuning and predicting, e.g. ``preset("mobilefacenet").preprocess``
        (see :func:`sklearn_craft.models.preset`). ``pruned_model_`` itself expects preprocessed
        input, like the original network.
    num_workers : int, default=0
        Worker processes that read and collate the items of a Dataset given as ``X`` in every
        pass over it (pooling, BatchNorm re-estimation, fine-tuning, predicting), through a
        ``torch.utils.data.DataLoader``; 0 reads them in this process. A DataLoader given as
        ``X`` keeps its own workers.
    streaming : bool, default=False
        Never hold the pooled responses of all the images: pool them batch by batch and feed
        each batch to :meth:`LassoFilterSelector.partial_fit
        <sklearn_craft.selection.LassoFilterSelector.partial_fit>`, whose cross-products also
        give the satellites (and the head is refitted from the cross-products of the pruned
        network's responses, again batch by batch), so memory does not grow with the number of
        images beyond the images themselves (pass a Dataset that reads them on access), the
        targets, and the activations the BatchNorm re-estimation keeps to resume its passes (at
        most 1 GiB, see :func:`~sklearn_craft.finetune.recalibrate_batchnorm`). The validation
        split is then drawn per image (see ``partial_fit``; ``cv`` must be None or an int),
        ``memory`` caches the LASSO paths but not the pooled responses, and
        the satellites choose their ridge penalty on that split instead of by leave-one-out: a
        binary or multi-label satellite thresholds its 0/1 regression at 0.5 and
        ``satellite_scores_`` are the held-out R² of every satellite's decision against the
        encoded target (the values, or the 0/1 class indicators), also for classification.
        Needs ``selection="one-shot"``, ``criterion="task"`` and ``filter_rule="lasso"``.
    selection : {"one-shot", "sequential"}, default="one-shot"
        Select every layer on the original network, or stage by stage on the network cut so far
        (see above). A sequential stage is one group of coupled convolutions and keeps the union
        of its members' selections, a depthwise convolution's included (on MobileFaceNet / CelebA
        gender this lifted the satellite before fine-tuning from 0.760 to 0.913, see the
        Reproducing page).
    criterion : {"task", "reconstruction", "both"}, default="task"
        The target of every layer's LASSO: the task; the pooled responses of the convolutions
        reading the layer in the network the head cuts (:func:`sklearn_craft.surgery.channel_readers`),
        taken in the original network and standardized; or both, each block weighing as much.
        A layer nothing reads (the head layer) is selected on the task.
    filter_rule : {"lasso", "l1_norm", "random", "lasso_rank"} or FilterRule, default="lasso"
        Which filters a layer keeps: LASSO's at the knee, or, as many per layer, the best ranked
        by the L1 norm of their weights (:class:`~sklearn_craft.rules.L1NormRule`), at random
        (:class:`~sklearn_craft.rules.RandomRule`, seeded by ``random_state``), by their entry
        in the layer's LASSO path on the task (:class:`~sklearn_craft.rules.LassoRankRule`:
        CRAFT's criterion with the counts of ``flops_target``) or by any
        :class:`~sklearn_craft.rules.FilterRule`, which receives the convolution and its pooled
        responses in the network the choice is made on.
    flops_target : float in (0, 1] or None, default=None
        With a ranking ``filter_rule`` and ``selection="one-shot"``: instead of LASSO's counts,
        every pooled layer keeps its ``ceil(r * width)`` best filters (at least one), ``r`` found
        by bisection so that the FLOPs of the network ``fit`` returns, as a share of the original
        network's (``report_``), are within 0.005 of ``flops_target`` (a warning gives the closest
        share when no ratio reaches it). Pass a fitted pruner's FLOPs share to compare rules at
        matched total FLOPs. No LASSO is fitted, and ``gamma`` is not used.
    compensate : bool, default=False
        Refit the convolutions that read the removed filters by least squares on the training
        images (:func:`sklearn_craft.compensation.compensate_readers`, as in He et al. 2017 and
        ThiNet), so that the kept filters carry the removed ones' share of their outputs before
        any fine-tuning. Cannot be combined with ``scale_filters``.
    calibrate_head : bool, default=False
        Classification targets with ``head="satellite"``: divide the satellite head by the
        temperature that minimises its fine-tuning loss on the images it was fitted on
        (:func:`sklearn_craft.finetune.fit_temperature`), ``head_temperature_``. A ridge
        satellite's class scores are under-confident logits; calibrated, they change no
        prediction, but fine-tuning starts from (and early stopping on the loss compares with)
        an untrained network whose loss is that of its predictions.
    knee : {"tolerance", "flops"}, default="tolerance"
        How every layer's knee is found: the papers' rule, the fewest filters within ``gamma`` of
        the curve's lowest held-out RMSE, whatever a filter costs; or priced by FLOPs
        (:func:`~sklearn_craft.selection.find_knee` with a cost): the point that minimises the
        curve's normalised RMSE plus ``gamma`` times the FLOPs of the filters kept
        (:func:`~sklearn_craft.profiling.filter_flops` in the network the head cuts, before any
        cut) over the mean FLOPs of a whole layer. The paper's rule spends the cut where curves
        are flat, which on MobileFaceNet is mostly in the 7x7 layers, whose filters cost 20 to 80
        times fewer FLOPs than those at 56x56; priced by FLOPs, a layer gives up a filter unless it
        lowers the normalised RMSE by at least ``gamma`` times the filter's FLOPs over the mean
        FLOPs of a whole layer.

    Attributes
    ----------
    pruned_model_before_finetune_ : torch.nn.Module
        ``pruned_model_`` as it was before fine-tuning (the same object without
        ``finetune_params``), read by :meth:`predict_before_finetune` and
        :meth:`score_before_finetune`.
    pruned_model_ : torch.nn.Module
        The pruned network, in eval mode, whose layers keep their names in ``model`` (the names
        of ``layers_`` and ``keep_``). With ``head="satellite"`` a ``torch.fx.GraphModule``: the
        cut network followed by the modules ``pool`` (global average pooling), ``flatten`` and
        ``head`` (the Linear layer), see :func:`sklearn_craft.surgery.attach_head`. Its
        ``input_shape`` attribute (one example, no batch dimension) lets
        :func:`sklearn_craft.export.save_model` save it without an example input.
    head_temperature_ : float
        What the satellite head's outputs are the satellite's decision divided by: fitted with
        ``calibrate_head``, else 1.0.
    head_layer_ : str
        The convolution whose pooled responses ``transform`` returns: the layer the satellite head
        reads, or the last pooled layer with ``head="original"``.
    layers_ : list of str
        Pooled convolutions, in forward order.
    selected_ : dict of str to ndarray
        Layer -> indices of the filters LASSO selected (knee of its characteristic curve), or
        ``filter_rule`` chose. With ``selection="sequential"`` and a satellite head at a named
        layer (or the last), only the layers up to the head's stage are selected.
    keep_ : dict of str to list of int
        Layer -> indices of the filters left in ``pruned_model_`` (``selected_`` merged over
        coupled layers with :func:`sklearn_craft.surgery.merge_keep`: a depthwise convolution
        has those of its input), for the layers it still has. A convolution followed by a
        Max-Feature-Map also keeps the partner (i ± C/2) of every listed channel (see
        :func:`sklearn_craft.surgery.prune_channels`).
    satellites_ : dict of str to sklearn.pipeline.Pipeline
        Layer -> fitted linear model on the pooled responses of ``selected_[layer]`` in the
        network the layer was selected on (the original one, or the network cut before its
        stage); for ``head_layer_`` (satellite head) on ``transform(X)`` instead, less the
        images fine-tuning validates on when ``finetune_params`` has a ``validation_fraction``
        (so that early stopping's untrained loss is a held-out one; with ``streaming=True`` on
        every image).
    satellite_scores_ : pandas.Series
        Layer -> score (R² or accuracy) on held-out samples of a satellite fitted on the others.
    selector_ : LassoFilterSelector or None
        The fitted selector when one selected every layer (one-shot with ``criterion="task"``):
        on the pooled responses of ``layers_``, ``coef_`` holding the knee coefficients. None when
        several did (see ``selectors_``) or none (``flops_target``).
    selectors_ : dict of str to LassoFilterSelector
        Layer -> the fitted selector that chose its filters (or its counts); layers selected
        together share one. Empty with ``flops_target``.
    curves_, knees_ : pandas.DataFrame or None
        Characteristic curves and knees of every selected layer, those of the selectors (column
        ``group`` is the layer); None with ``flops_target``.
    stages_ : pandas.DataFrame
        One row per stage, in the order they ran: ``layers`` (the layers selected together: all
        of them one-shot, a coupled group sequentially), ``n_filters``, ``n_selected`` (filters
        chosen, before coupled layers are merged) and ``seconds``.
    keep_ratio_ : float or None
        The share of every layer's filters kept with ``flops_target``; None otherwise.
    classes_ : ndarray
        Class labels (binary and multi-class) or label indices (multi-label); absent for
        regression.
    target_type_ : str
        ``"continuous"``, ``"continuous-multioutput"``, ``"binary"``, ``"multiclass"`` or
        ``"multilabel-indicator"``.
    n_outputs_ : int
        Number of outputs of ``pruned_model_``.
    history_ : pandas.DataFrame or None
        Fine-tuning losses per epoch (see :func:`sklearn_craft.finetune.finetune`); the row
        where ``kept`` is True is the epoch whose weights ``pruned_model_`` has (0: the
        untrained network, when early stopping found no better epoch).
    report_ : pandas.DataFrame
        Original vs pruned network (:func:`sklearn_craft.profiling.compare_models`): rows
        ``parameters``, ``size_bytes``, ``flops``, ``latency_s`` (CPU, per image); columns
        ``original``, ``pruned``, ``reduction_pct``.
    timings_ : pandas.Series
        Seconds spent in each stage of ``fit``: ``pooling``, ``selection``, ``satellites``,
        ``surgery`` (with the pooling of the pruned network that refits the satellite head),
        ``finetune`` (when run) and ``report``.

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from sklearn_craft.pruner import CraftPruner
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU())
    >>> rng = np.random.default_rng(0)
    >>> X = rng.random((120, 1, 16, 16), dtype=np.float32)
    >>> y = X[:, 0, :8].mean(axis=(1, 2)) - X[:, 0, 8:].mean(axis=(1, 2))
    >>> pruner = CraftPruner(net, gamma=0.1, random_state=0).fit(X, y)
    >>> pruner.head_layer_, pruner.pruned_model_.head.in_features == len(pruner.keep_["2"])
    ('2', True)
    >>> pruner.predict(X[:3]).shape, list(pruner.report_.index)
    ((3,), ['parameters', 'size_bytes', 'flops', 'latency_s'])

    Sequential selection runs a stage per layer here (no coupling). The L1-norm baseline at a
    quarter of the FLOPs keeps the same share of every layer's filters:

    >>> sequential = CraftPruner(net, gamma=0.1, selection="sequential", random_state=0).fit(X, y)
    >>> sequential.stages_["layers"].tolist()
    [['0'], ['2']]
    >>> l1 = CraftPruner(net, filter_rule="l1_norm", flops_target=0.24, random_state=0).fit(X, y)
    >>> l1.keep_ratio_, {layer: len(kept) for layer, kept in l1.keep_.items()}
    (0.4375, {'0': 4, '2': 7})
    >>> float(round(1 - l1.report_.loc["flops", "reduction_pct"] / 100, 3))
    0.241
    """

    _parameter_constraints = {
        "model": [nn.Module],
        "gamma": [Interval(Real, 0, 1, closed="both")],
        "layers": [StrOptions({"conv"}), list, tuple, callable],
        "head": [StrOptions({"satellite", "original"})],
        "head_layer": [str],
        "finetune_params": [dict, None],
        "scale_filters": ["boolean"],
        "recalibrate_bn": ["boolean"],
        "selector_params": [dict, None],
        "device": [str, torch.device],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "memory": [None, str, HasMethods(["cache"])],
        "progress": ["boolean"],
        "preprocess": [callable, None],
        "num_workers": [Interval(Integral, 0, None, closed="left")],
        "streaming": ["boolean"],
        "selection": [StrOptions({"one-shot", "sequential"})],
        "criterion": [StrOptions({"task", "reconstruction", "both"})],
        "filter_rule": [StrOptions({"lasso", *RULES}), FilterRule],
        "flops_target": [Interval(Real, 0, 1, closed="right"), None],
        "compensate": ["boolean"],
        "calibrate_head": ["boolean"],
        "knee": [StrOptions({"tolerance", "flops"})],
    }

    def __init__(
        self,
        model,
        gamma=0.01,
        layers="conv",
        head="satellite",
        head_layer="last",
        finetune_params=None,
        scale_filters=False,
        recalibrate_bn=True,
        selector_params=None,
        device="cpu",
        batch_size=64,
        random_state=None,
        memory=None,
        progress=False,
        preprocess=None,
        num_workers=0,
        streaming=False,
        selection="one-shot",
        criterion="task",
        filter_rule="lasso",
        flops_target=None,
        compensate=False,
        calibrate_head=False,
        knee="tolerance",
    ):
        self.model = model
        self.gamma = gamma
        self.layers = layers
        self.head = head
        self.head_layer = head_layer
        self.finetune_params = finetune_params
        self.scale_filters = scale_filters
        self.recalibrate_bn = recalibrate_bn
        self.selector_params = selector_params
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.memory = memory
        self.progress = progress
        self.preprocess = preprocess
        self.num_workers = num_workers
        self.streaming = streaming
        self.selection = selection
        self.criterion = criterion
        self.filter_rule = filter_rule
        self.flops_target = flops_target
        self.compensate = compensate
        self.calibrate_head = calibrate_head
        self.knee = knee

    def _check_options(self):
        """Validate what ``_parameter_constraints`` cannot express; return the fine-tuning settings."""
        if self.head_layer != "last" and self.head != "satellite":
            raise ValueError(
                f"head_layer={self.head_layer!r} needs head='satellite' (it drops the original head), "
                f"got head={self.head!r}"
            )
        if self.head_layer not in ("last", "best") and self.head_layer not in _select_convs(self.model, self.layers):
            raise ValueError(
                f"head_layer must be 'last', 'best' or the name of a convolution chosen by layers, got {self.head_layer!r}"
            )
        if self.calibrate_head and self.head != "satellite":
            raise ValueError(f"calibrate_head=True needs head='satellite', got head={self.head!r}")
        if self.scale_filters and self.gamma == 0:
            # gamma=0 keeps every filter, also those whose coefficient is 0: scaling would silence them.
            raise ValueError("scale_filters=True needs gamma > 0 (gamma=0 keeps filters whose LASSO coefficient is 0)")
        if self.scale_filters and (self.filter_rule != "lasso" or self.criterion != "task"):
            # The multipliers are the task LASSO's coefficients of the filters it selected.
            raise ValueError(
                "scale_filters=True needs filter_rule='lasso' and criterion='task', got "
                f"filter_rule={self.filter_rule!r} and criterion={self.criterion!r}"
            )
        if self.scale_filters and self.compensate:
            # The readers are refit for the channels as they are; scaling them afterwards undoes the fit.
            raise ValueError("compensate=True cannot be combined with scale_filters=True: choose one")
        if self.flops_target is not None:
            if self.filter_rule == "lasso":
                raise ValueError(
                    "flops_target needs a filter_rule that ranks filters ('l1_norm', 'random' or a FilterRule): "
                    "LASSO chooses its own counts at gamma, got filter_rule='lasso'"
                )
            if self.selection != "one-shot":
                raise ValueError(f"flops_target needs selection='one-shot', got selection={self.selection!r}")
            for name, default in (("criterion", "task"), ("knee", "tolerance")):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} has no effect with flops_target (no LASSO is fitted): "
                        f"use {name}={default!r}"
                    )
            if self.head_layer == "best":
                raise ValueError(
                    "flops_target needs head_layer='last' or a layer name: the FLOPs are those of the network cut "
                    "after the head layer, which head_layer='best' only chooses after the selection"
                )
        if self.streaming and (
            self.selection != "one-shot" or self.criterion != "task" or self.filter_rule != "lasso"
        ):
            # The streamed cross-products are those of the original network's responses with the task.
            raise ValueError(
                "streaming=True needs selection='one-shot', criterion='task' and filter_rule='lasso', got "
                f"selection={self.selection!r}, criterion={self.criterion!r} and filter_rule={self.filter_rule!r}"
            )
        reserved = sorted(set(self.selector_params or {}) & set(_RESERVED_SELECTOR_PARAMS))
        if reserved:
            raise ValueError(f"selector_params must not set {reserved}: CraftPruner sets {list(_RESERVED_SELECTOR_PARAMS)}")
        return None if self.finetune_params is None else check_finetune_params(self.finetune_params)

    def _pooler(self, model, layers, memory=None, progress=None):
        return ActivationPooler(
            model,
            layers=layers,
            batch_size=self.batch_size,
            device=self.device,
            preprocess=self.preprocess,
            progress=self.progress if progress is None else progress,
            memory=memory,
            num_workers=self.num_workers,
        )

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y, sample_weight=None):
        """Select filters, cut the network, attach the head, fine-tune and measure.

        Parameters
        ----------
        X : ndarray, torch.Tensor, torch.utils.data.Dataset or torch.utils.data.DataLoader
            Images: N×C×H×W float, N×H×W×C ``uint8`` (scaled to [0, 1]), a tensor N×C×H×W, a
            Dataset of ``x`` or ``(x, y)`` items or a DataLoader that does not shuffle (see
            :func:`sklearn_craft.images.as_image_dataset`).
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Continuous targets, class labels or a 0/1 multi-label matrix.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the images in the LASSO paths and curves
            (:meth:`LassoFilterSelector.fit <sklearn_craft.selection.LassoFilterSelector.fit>`),
            the satellites and their held-out scores
            (:func:`~sklearn_craft.satellites.fit_satellite`) and the fine-tuning loss
            (:func:`~sklearn_craft.finetune.finetune`). Pooling, BatchNorm re-estimation and the
            held-out splits are not weighted.

        Returns
        -------
        self : CraftPruner
            The fitted pruner.
        """
        finetune_params = self._check_options()
        _check_device(self.device)
        if _input_dtype(self.model) != torch.float32:
            raise ValueError(
                f"model must have float32 parameters (its new head and fine-tuning are float32), got "
                f"{_input_dtype(self.model)}: pass model.float()"
            )
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        dataset = as_image_dataset(X, n_channels=input_channels(self.model))
        y, Y, target_type, classes = self._check_target(y)
        if len(Y) != len(dataset):
            raise ValueError(f"y must have one row per image ({len(dataset)}), got {len(Y)} rows")
        monitor = None if finetune_params is None else finetune_params["monitor"]
        if monitor == "accuracy" and target_type not in CLASSIFICATION_KINDS:
            raise ValueError(
                f"finetune_params['monitor']='accuracy' needs a classification target, got a {target_type} y"
            )
        if self.calibrate_head and target_type not in CLASSIFICATION_KINDS:
            raise ValueError(f"calibrate_head=True needs a classification target, got a {target_type} y")
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, Y, dtype=np.float64, ensure_non_negative=True)
        example = next(iter_batches(dataset, 1, indices=[0]))
        if self.head == "original":
            n_outputs = 1 if target_type == "binary" else Y.shape[1]
            self._check_original_outputs(example, target_type, n_outputs)
        seeds = check_random_state(self.random_state).randint(np.iinfo(np.int32).max, size=4)
        data = _FitData(
            X=X,
            dataset=dataset,
            example=example,
            y=y,
            Y=Y,
            target_type=target_type,
            classes=classes,
            sample_weight=sample_weight,
            seeds=seeds,
            rule=check_filter_rule(self.filter_rule),
            # One stream for the whole fit, drawn in forward order of the layers.
            rule_random_state=np.random.RandomState(seeds[3]),
        )
        clock = _Stopwatch()

        clock.start("pooling")
        pooler = self._pooler(self.model, self.layers, None if self.streaming else self.memory).fit(X)
        # The head layer when it is known before the selection: layers after it are cut off.
        head_layer = None if self.head_layer == "best" else self._resolve_head_layer(pooler.layers_, None)
        if self.knee == "flops":
            data.group_costs = self._filter_prices(data.example, head_layer or pooler.layers_[-1], pooler)
        if self.streaming:
            selection = self._select_streaming(data, pooler, clock)
        elif self.selection == "one-shot":
            selection = self._select_one_shot(data, pooler, head_layer, clock)
        else:
            selection = self._select_sequential(data, pooler, head_layer, clock)
        head_layer = self._resolve_head_layer(list(selection.scores.index), selection.scores)
        satellites = selection.satellites

        clock.start("surgery")
        if selection.network is None:
            pruned, keep = self._cut(dataset, example, head_layer, selection.selected, selection.scale)
        else:
            pruned, keep = self._finish_sequential_cut(data, head_layer, selection)
        temperature = 1.0
        if self.head == "satellite":
            head_pooler = self._pooler(pruned, [head_layer]).fit(X)
            if self.streaming:
                rows = np.arange(len(dataset))
                satellite = self._streamed_satellite(
                    head_pooler, X, Y, target_type, classes, selection.selectors[head_layer], sample_weight
                )
            else:
                rows = self._head_rows(len(dataset), finetune_params, seeds[2])
                features = head_pooler.transform(X)[rows]
                satellite = fit_satellite(
                    make_satellite(target_type),
                    features,
                    _safe_indexing(y, rows),
                    None if sample_weight is None else sample_weight[rows],
                )
            if self.calibrate_head:
                # The satellite's scores on the images it was fitted on (a second pass when streaming).
                batches = head_pooler.iter_transform(X) if self.streaming else [features]
                scores = np.concatenate([satellite_decision(satellite, b).reshape(len(b), -1) for b in batches])
                target, loss = self._training_target(Y[rows], target_type, scores.shape[1])
                weights = None if sample_weight is None else sample_weight[rows]
                temperature = fit_temperature(scores, target, loss=loss, sample_weight=weights)
            satellites[head_layer] = satellite
            pruned = self._with_satellite_head(pruned, satellite, temperature)
        pruned.eval()
        width = self._output_width(pruned, example)
        before_finetune = pruned

        history = None
        if finetune_params is not None:
            clock.start("finetune")
            before_finetune = copy.deepcopy(pruned)
            target, loss = self._training_target(Y, target_type, width)
            history = finetune(
                pruned,
                dataset,
                target,
                loss=loss,
                device=self.device,
                preprocess=self.preprocess,
                random_state=seeds[2],
                progress=self.progress,
                sample_weight=sample_weight,
                num_workers=self.num_workers,
                **finetune_params,
            )

        clock.start("report")
        report = compare_models(_on_device(self.model, "cpu"), _on_device(pruned, "cpu"), tuple(example.shape[1:]))
        clock.stop()

        # save_model reads it, so that the pruned network can be exported without an example input.
        pruned.input_shape = before_finetune.input_shape = tuple(example.shape[1:])
        selectors = list({id(selector): selector for selector in selection.selectors.values()}.values())
        # Attributes are set only now, so that a failing fit leaves no half-fitted estimator.
        self.pruned_model_ = pruned
        self.pruned_model_before_finetune_ = before_finetune
        self.head_layer_ = head_layer
        self.head_temperature_ = temperature
        self.layers_ = list(pooler.layers_)
        self.selected_ = selection.selected
        self.selector_ = selectors[0] if len(selectors) == 1 else None
        self.selectors_ = selection.selectors
        self.stages_ = pd.DataFrame(selection.stages, columns=["layers", "n_filters", "n_selected", "seconds"])
        self.keep_ratio_ = selection.keep_ratio
        self.keep_ = keep
        self.satellites_ = satellites
        self.satellite_scores_ = selection.scores
        if len(selectors) == 1:
            self.curves_, self.knees_ = selectors[0].curves_, selectors[0].knees_
        elif selectors:
            self.curves_ = pd.concat([selector.curves_ for selector in selectors], ignore_index=True)
            self.knees_ = pd.concat([selector.knees_ for selector in selectors], ignore_index=True)
        else:
            self.curves_ = self.knees_ = None
        if target_type in CLASSIFICATION_KINDS:
            self.classes_ = classes if classes is not None else np.arange(Y.shape[1])
        elif hasattr(self, "classes_"):
            del self.classes_
        self.target_type_ = target_type
        self.n_outputs_ = width
        self.history_ = history
        self.report_ = report
        self.timings_ = pd.Series(clock.seconds, name="seconds")
        return self

    def _check_target(self, y):
        """``y`` as every stage reads it, and its encoding: ``(y, Y, target_type, classes)``.

        The encoding is :func:`sklearn_craft.targets.encode_target`'s; CraftClassifier and
        CraftRegressor restrict the kinds they accept.
        """
        return (y, *encode_target(y))

    def _work_network(self, example, head_layer):
        """The network surgery starts from, on the CPU: cut after ``head_layer`` for a satellite head.

        Not a copy when the model is already on the CPU and kept whole: it is only read.
        """
        # Surgery runs on the CPU, where ``example`` is, whatever device holds the model.
        source = _on_device(self.model, "cpu")
        return truncate(source, head_layer, example) if self.head == "satellite" else source

    def _filter_prices(self, example, head_layer, pooler):
        """Layer -> the FLOPs of one of its filters in the network cut after ``head_layer``
        (:func:`~sklearn_craft.profiling.filter_flops`; 0 for the layers cut off), over the mean
        FLOPs of all the filters of a pooled layer: the ``group_costs`` of ``knee="flops"``."""
        flops = filter_flops(self._work_network(example, head_layer), tuple(example.shape[1:]))
        per_filter = {layer: flops.get(layer, 0.0) for layer in pooler.layers_}
        mean = np.mean([per_filter[layer] * pooler.n_channels_[layer] for layer in pooler.layers_])
        return {layer: float(cost / mean) if mean > 0 else 0.0 for layer, cost in per_filter.items()}

    def _selector(self, data, groups, progress):
        """The LassoFilterSelector of a set of layers (``groups`` labels its columns by layer)."""
        return LassoFilterSelector(
            gamma=self.gamma,
            groups=groups,
            memory=self.memory,
            random_state=data.seeds[0],
            progress=progress,
            knee="tolerance" if data.group_costs is None else "cost",
            group_costs=data.group_costs,
            **(self.selector_params or {}),
        )

    def _select_one_shot(self, data, pooler, head_layer, clock):
        """Every layer selected at once on the pooled responses of the original network."""
        start = time.perf_counter()
        features = pooler.transform(data.X)
        layers = pooler.layers_
        columns = _columns(layers, [pooler.n_channels_[layer] for layer in layers])
        # On the CPU, as in the sequential stages: a filter rule sees the same convolutions either way.
        source = _on_device(self.model, "cpu")
        convs = {layer: source.get_submodule(layer) for layer in layers}

        clock.start("selection")
        selectors, scale, keep_ratio = {}, None, None
        if self.flops_target is None:
            body = None if self.criterion == "task" else self._work_network(data.example, head_layer or layers[-1])
            targets = self._selection_targets(data, body, layers, features, columns, clock)
            selected, selectors, scale = self._select_layers(data, features, columns, layers, convs, targets)
        else:
            selected, keep_ratio = self._select_at_flops(data, features, columns, layers, convs, head_layer)

        clock.start("satellites")
        satellites, scores = self._fit_satellites(data, features, columns, selected)
        stage = _stage_row(layers, columns, selected, time.perf_counter() - start)
        return _Selection(selected, scale, satellites, scores, selectors, [stage], keep_ratio)

    def _select_sequential(self, data, pooler, head_layer, clock):
        """Coupled groups selected in forward order, each on the responses of the network cut before it.

        A stage is the pooled convolutions of one coupled group (:func:`~sklearn_craft.surgery.coupled_groups`,
        ordered by their first member): the BatchNorm statistics the previous cuts made stale
        are re-estimated up to the stage's last response, the stage's layers are pooled on the
        current network (the pass stops there), selected, and cut out of it.
        """
        body = self._work_network(data.example, head_layer or pooler.layers_[-1])
        pooled = set(pooler.layers_)
        stages = [[name for name in group if name in pooled] for group in coupled_groups(body, data.example)]
        stages = [stage for stage in stages if stage]
        order = _call_sequence(body, data.example)
        position = {name: len(order) - 1 - index for index, name in enumerate(reversed(order))}
        norms = [
            name
            for name in dict.fromkeys(order)
            if isinstance(module := body.get_submodule(name), nn.modules.batchnorm._BatchNorm)
            and module.track_running_stats
        ]
        targets = self._selection_targets(data, body, [layer for stage in stages for layer in stage], None, None, clock)

        current = body
        # BatchNorm statistics describe the current network up to this position: all of them
        # before any cut; after a cut, none (they are re-estimated on the task's images, as the
        # final cut does), then up to the last stage pooled and before the next cut.
        fresh, cut = math.inf, False
        # The values before a stage's first layer, kept by its pooling pass: the passes of the
        # next stage start there (every cut, compensation and re-estimation until then changes
        # the network after it only; GraphPrefix checks that it still serves).
        prefix = GraphPrefix(data.dataset, self.batch_size, self.device, self.preprocess, self.num_workers)
        selection = _Selection({}, {} if self.scale_filters else None, {}, [], {}, [], None, kept={})
        for stage in tqdm(stages, desc="sequential selection", unit="stage", disable=not self.progress):
            start = time.perf_counter()
            clock.start("pooling")
            end = max(position[pooler.responses_[layer]] for layer in stage)
            if self.recalibrate_bn and fresh < end:
                stale = [name for name in norms if fresh < position[name] <= end]
                current = _recalibrate_batchnorm(
                    current.to(self.device),
                    data.dataset,
                    batch_size=self.batch_size,
                    device=self.device,
                    preprocess=self.preprocess,
                    layers=stale,
                    prefix=prefix,
                ).to("cpu")
                fresh = end
            stage_pooler = self._pooler(current, stage, self.memory, progress=False).fit(data.X)
            first_layer = min(stage, key=position.get)
            nodes = current.graph.nodes if isinstance(current, torch.fx.GraphModule) else ()
            first_node = next(
                (node.name for node in nodes if node.op == "call_module" and node.target == first_layer), None
            )
            features = stage_pooler._transform(data.X, prefix=prefix, keep=first_node)
            columns = _columns(stage, [stage_pooler.n_channels_[layer] for layer in stage])

            clock.start("selection")
            convs = {layer: current.get_submodule(layer) for layer in stage}
            selected, selectors, scale = self._select_layers(data, features, columns, stage, convs, targets, False)

            clock.start("satellites")
            satellites, scores = self._fit_satellites(data, features, columns, selected)

            clock.start("surgery")
            if scale is not None or any(len(selected[layer]) < convs[layer].out_channels for layer in stage):
                # A stage is one coupled group: every member's selection votes for the channels the
                # group shares, a depthwise convolution's too (alone, surgery would let it follow its
                # input). Channels kept only by another member's vote are not scaled.
                union = np.unique(np.concatenate([selected[layer] for layer in stage]))
                if scale is not None:
                    scale = {
                        layer: [dict(zip(selected[layer], scale[layer])).get(index, 1.0) for index in union]
                        for layer in stage
                    }
                keep = dict.fromkeys(stage, union)
                if self.compensate:
                    current = self._compensated(current, data.dataset, data.example, keep, prefix)
                current, kept = prune_channels(current, keep, data.example, scale=scale, return_kept=True)
                selection.kept.update(kept)
                fresh, cut = (min(fresh, position[first_layer]) if cut else -1), True
            else:
                selection.kept.update({layer: list(range(convs[layer].out_channels)) for layer in stage})
            selection.selected.update(selected)
            selection.satellites.update(satellites)
            selection.scores.append(scores)
            selection.selectors.update(selectors)
            if scale is not None:
                selection.scale.update(scale)
            selection.stages.append(_stage_row(stage, columns, selected, time.perf_counter() - start))
        scores = pd.concat(selection.scores)
        order = [layer for layer in pooler.layers_ if layer in selection.selected]
        selection.scores = scores.loc[order].rename("score")
        selection.selected = {layer: selection.selected[layer] for layer in order}
        selection.network = current
        selection.stale = [name for name in norms if position[name] > fresh]
        return selection

    def _finish_sequential_cut(self, data, head_layer, selection):
        """Surgery stage of the sequential mode: the network cut stage by stage, after ``head_layer``.

        The same network as the one-shot cut of the original with everything selected, without
        the surgery again: only the BatchNorm statistics made stale since the last stage pooled
        are re-estimated.
        """
        network = selection.network
        if network is self.model:
            # Nothing was cut and the model is on the CPU: the pruned network must still be a copy.
            network = copy.deepcopy(network)
        if self.head == "satellite" and self.head_layer == "best":
            network = truncate(network, head_layer, data.example)
        modules = dict(network.named_modules())
        network = network.to(self.device)
        stale = [name for name in selection.stale if name in modules]
        if self.recalibrate_bn and stale:
            recalibrate_batchnorm(
                network,
                data.dataset,
                batch_size=self.batch_size,
                device=self.device,
                preprocess=self.preprocess,
                progress=self.progress,
                layers=stale,
            )
        return network, {layer: selection.kept[layer] for layer in selection.selected if layer in modules}

    def _selection_targets(self, data, body, layers, features, columns, clock):
        """Layer -> the LASSO target that selects its filters, None for the task's.

        With ``criterion="reconstruction"`` the standardized pooled responses, in the original
        network, of the convolutions that read the layer in ``body``
        (:func:`~sklearn_craft.surgery.channel_readers`); with ``"both"`` those and the encoded
        task target, each block weighing as much. A layer nothing reads keeps the task's
        target. Layers sharing their readers share one array.
        """
        if self.criterion == "task":
            return dict.fromkeys(layers)
        readers = channel_readers(body, data.example)
        wanted = list(dict.fromkeys(name for layer in layers for name in readers.get(layer, [])))
        have = {name: features[:, columns[name]] for name in wanted if columns is not None and name in columns}
        missing = [name for name in wanted if name not in have]
        if missing:
            clock.start("pooling")
            extra = self._pooler(self.model, missing, self.memory).fit(data.X)
            responses = extra.transform(data.X)
            widths = [extra.n_channels_[name] for name in extra.layers_]
            have.update({name: responses[:, cols] for name, cols in _columns(extra.layers_, widths).items()})
            clock.start("selection")
        targets, shared = {}, {}
        for layer in layers:
            key = tuple(readers.get(layer, ()))
            if key not in shared:
                blocks = [_standardized(np.hstack([have[name] for name in key]))] if key else []
                blocks = [block for block in blocks if block.shape[1]]
                if blocks and self.criterion == "both":
                    blocks.insert(0, _standardized(data.Y))
                shared[key] = np.hstack(blocks) if blocks else None
            targets[layer] = shared[key]
        return targets

    def _select_layers(self, data, features, columns, layers, convs, targets, progress=None):
        """LASSO at the knee of every layer (one selector per target), then the filter rule.

        Returns the filters kept per layer, the selector of each layer and, with
        ``scale_filters``, the knee coefficients of the kept filters.
        """
        batches = {}
        for layer in layers:
            batches.setdefault(id(targets[layer]), (targets[layer], []))[1].append(layer)
        selected, selectors, scale = {}, {}, {} if self.scale_filters else None
        for target, members in batches.values():
            widths = [len(columns[layer]) for layer in members]
            groups = np.repeat(np.asarray(members, dtype=object), widths)
            selector = self._selector(data, groups, self.progress if progress is None else progress).fit(
                features[:, np.concatenate([columns[layer] for layer in members])],
                data.y if target is None else target,
                sample_weight=data.sample_weight,
            )
            support = np.split(selector.support_, np.cumsum(widths)[:-1])
            chosen = {layer: np.flatnonzero(mask) for layer, mask in zip(members, support)}
            selected.update(chosen)
            selectors.update(dict.fromkeys(members, selector))
            if scale is not None:
                scale.update(self._filter_scales(selector.coef_, chosen, _columns(members, widths)))
        if data.rule is not None:
            selected = {
                layer: top_filters(self._rule_scores(data, layer, convs[layer], features[:, columns[layer]]), len(selected[layer]))
                for layer in layers
            }
        return {layer: selected[layer] for layer in layers}, selectors, scale

    def _rule_scores(self, data, layer, conv, responses):
        scores = data.rule.score_filters(
            conv, responses, data.Y, sample_weight=data.sample_weight, random_state=data.rule_random_state
        )
        return _check_scores(data.rule, scores, layer, conv.out_channels)

    def _select_at_flops(self, data, features, columns, layers, convs, head_layer):
        """The rule's best ``ceil(r * width)`` filters of every layer, ``r`` found by bisection on the FLOPs.

        Returns the filters kept per layer and ``r``. The FLOPs are those of the network the fit
        produces (cut, with its head), as a share of the original network's, as ``report_``
        counts them.
        """
        scores = {layer: self._rule_scores(data, layer, convs[layer], features[:, columns[layer]]) for layer in layers}
        body = self._work_network(data.example, head_layer)
        in_body = {name for name, module in body.named_modules() if isinstance(module, nn.Conv2d)}
        shape = tuple(data.example.shape[1:])
        original = count_flops(_on_device(self.model, "cpu"), shape)

        def cut(ratio):
            selected = {
                layer: top_filters(scores[layer], max(1, math.ceil(ratio * len(columns[layer])))) for layer in layers
            }
            network, kept = prune_channels(
                body, {layer: selected[layer] for layer in layers if layer in in_body}, data.example, return_kept=True
            )
            if self.head == "satellite":
                network = attach_head(network, nn.Linear(len(kept[head_layer]), data.Y.shape[1]))
            return selected, count_flops(network, shape) / original

        target = self.flops_target
        selected, share = cut(1.0)
        best = (1.0, selected, share)
        low, high = 0.0, 1.0
        # Counts stop changing once the interval is narrower than a filter of the widest layer.
        finest = 1 / (2 * max(len(cols) for cols in columns.values()))
        while abs(best[2] - target) > _FLOPS_TOLERANCE and high - low > finest:
            ratio = (low + high) / 2
            selected, share = cut(ratio)
            if abs(share - target) < abs(best[2] - target):
                best = (ratio, selected, share)
            low, high = (low, ratio) if share > target else (ratio, high)
        if abs(best[2] - target) > _FLOPS_TOLERANCE:
            warnings.warn(
                f"flops_target={target!r} cannot be reached within {_FLOPS_TOLERANCE} by one keep ratio over the "
                f"pruned layers; the closest network has a FLOPs share of {best[2]:.4f}",
                UserWarning,
                stacklevel=4,
            )
        return best[1], best[0]

    def _fit_satellites(self, data, features, columns, selected):
        return fit_layer_satellites(
            features,
            data.y,
            data.target_type,
            {layer: columns[layer][indices] for layer, indices in selected.items()},
            test_size=_SCORE_FRACTION,
            random_state=data.seeds[1],
            sample_weight=data.sample_weight,
        )

    def _select_streaming(self, data, pooler, clock):
        """Every layer selected at once from cross-products accumulated batch by batch (``streaming``)."""
        start = time.perf_counter()
        layers = pooler.layers_
        widths = [pooler.n_channels_[layer] for layer in layers]
        columns = _columns(layers, widths)
        selector = self._selector(data, np.repeat(np.asarray(layers, dtype=object), widths), self.progress)
        labels, begin = np.asarray(data.y), 0
        for batch in pooler.iter_transform(data.X):
            rows = slice(begin, begin + len(batch))
            weights = None if data.sample_weight is None else data.sample_weight[rows]
            selector.partial_fit(batch, labels[rows], sample_weight=weights, classes=data.classes)
            begin += len(batch)

        clock.start("selection")
        support = np.split(selector.support_, np.cumsum(widths)[:-1])
        selected = {layer: np.flatnonzero(mask) for layer, mask in zip(layers, support)}
        scale = self._filter_scales(selector.coef_, selected, columns) if self.scale_filters else None

        clock.start("satellites")
        fitted = {
            layer: _satellite_from_sums(data.target_type, group_sums, selected[layer], data.classes)
            for layer, group_sums in zip(layers, selector._stream_["sums"])
        }
        satellites = {layer: satellite for layer, (satellite, _) in fitted.items()}
        scores = pd.Series({layer: score for layer, (_, score) in fitted.items()}, name="score", dtype=float)
        stage = _stage_row(layers, columns, selected, time.perf_counter() - start)
        return _Selection(selected, scale, satellites, scores, dict.fromkeys(layers, selector), [stage], None)

    def _streamed_satellite(self, pooler, X, Y, target_type, classes, selector, sample_weight):
        """The satellite of ``pooler``'s one layer from cross-products accumulated batch by batch,
        on the validation split the selector streamed."""
        stream = selector._stream_
        held_out = _streamed_held_out(np.arange(len(Y)), stream["seed"], stream["validation_fraction"], stream["cv"])
        sums, start = None, 0
        for batch in pooler.iter_transform(X):
            rows = slice(start, start + len(batch))
            weights = None if sample_weight is None else sample_weight[rows]
            chunk = _cross_sums(batch, Y[rows], held_out[rows], weights, shift=None if sums is None else sums["shift"])
            sums = chunk if sums is None else _add_sums(sums, chunk)
            start += len(batch)
        return _satellite_from_sums(target_type, sums, np.arange(batch.shape[1]), classes)[0]

    def _resolve_head_layer(self, layers, scores):
        """The pooled layer the head reads: ``head_layer`` resolved against the satellites' scores."""
        if self.head_layer == "last":
            return layers[-1]
        if self.head_layer == "best":
            return scores.idxmax()
        if self.head_layer not in layers:
            raise ValueError(f"head_layer must be 'last', 'best' or a pooled layer {layers}, got {self.head_layer!r}")
        return self.head_layer

    def _cut(self, dataset, example, head_layer, selected, scale):
        """Surgery stage: truncate (satellite head), remove the unselected filters, re-estimate BatchNorm.

        Returns the cut network on ``device`` and the filters each pooled layer it still has kept.
        """
        network = self._work_network(example, head_layer)
        convs = {name: module.out_channels for name, module in network.named_modules() if isinstance(module, nn.Conv2d)}
        remaining = {layer: indices for layer, indices in selected.items() if layer in convs}
        if scale is not None:
            scale = {layer: scale[layer] for layer in remaining}
        if self.compensate:
            merged = prune_channels(network, remaining, example, return_kept=True)[1]
            network = self._compensated(network, dataset, example, merged)
        pruned, kept = prune_channels(network, remaining, example, scale=scale, return_kept=True)
        pruned = pruned.to(self.device)
        changed = scale is not None or any(len(kept[name]) < convs[name] for name in kept)
        if self.recalibrate_bn and changed:
            recalibrate_batchnorm(
                pruned,
                dataset,
                batch_size=self.batch_size,
                device=self.device,
                preprocess=self.preprocess,
                progress=self.progress,
                num_workers=self.num_workers,
            )
        return pruned, {layer: kept[layer] for layer in remaining}

    def _compensated(self, network, dataset, example, kept, prefix=None):
        """A copy of ``network`` whose readers carry the channels ``kept`` removes (``compensate``)."""
        pass_args = (self.batch_size, _check_device(self.device), self.preprocess, self.num_workers)
        return _compensated_copy(network, dataset, kept, example, pass_args, prefix=prefix)

    @staticmethod
    def _head_rows(n_samples, finetune_params, seed):
        """The images the satellite head is fitted on: all, but those fine-tuning will validate on.

        Early stopping compares every epoch with the untrained network on the validation images;
        a head fitted on them would make that first loss a training loss, optimistic enough to
        stop fine-tuning before it starts.
        """
        fraction = 0.0 if finetune_params is None else finetune_params["validation_fraction"]
        if fraction == 0:
            return np.arange(n_samples)
        return np.sort(_validation_split(n_samples, fraction, seed)[3].numpy())

    def _with_satellite_head(self, body, satellite, temperature):
        """The cut network followed by global average pooling and the satellite as a Linear layer
        (its outputs divided by ``temperature``)."""
        return attach_head(body, satellite_head(satellite, temperature)).to(self.device)

    def _check_original_outputs(self, example, target_type, n_outputs):
        """Raise unless the original network's outputs fit the task (``head="original"``)."""
        width = self._output_width(self.model, example)
        allowed = (1, 2) if target_type == "binary" else (n_outputs,)
        if width not in allowed:
            raise ValueError(
                f"head='original' needs a model with {' or '.join(map(str, allowed))} outputs for this "
                f"{target_type} target, got {width}; replace its last layer or use head='satellite'"
            )

    @staticmethod
    def _output_width(model, example):
        """Number of outputs per example of ``model``, run in eval mode (its flags are restored)."""
        parameter = next(model.parameters(), None)
        with _evaluating(model), torch.inference_mode():
            output = model(example if parameter is None else example.to(parameter.device))
        return int(np.prod(output.shape[1:]))

    @staticmethod
    def _filter_scales(coef, selected, columns):
        """ETL Eq. 5 multipliers of the selected filters: the knee coefficient (its L2 norm over targets)."""
        coef = np.atleast_2d(coef)
        magnitude = coef[0] if len(coef) == 1 else np.linalg.norm(coef, axis=0)
        return {layer: magnitude[columns[layer][indices]] for layer, indices in selected.items()}

    @staticmethod
    def _training_target(Y, target_type, width):
        """Fine-tuning targets and loss name for a network with ``width`` outputs."""
        if target_type in ("continuous", "continuous-multioutput"):
            return Y, "mse"
        if target_type == "multilabel-indicator" or (target_type == "binary" and width == 1):
            return Y, "bce"
        indices = Y[:, 0].astype(np.int64) if target_type == "binary" else Y.argmax(axis=1)
        return indices, "cross_entropy"

    def _outputs(self, X, model=None):
        """Outputs of ``model`` (``pruned_model_``) on ``X``, as an (n_samples, n_outputs_) float array."""
        model = self.pruned_model_ if model is None else model
        dataset = as_image_dataset(X, n_channels=input_channels(model))
        return _network_outputs(
            model, dataset, self.batch_size, device=self.device, preprocess=self.preprocess, num_workers=self.num_workers
        )

    def decision_function(self, X):
        """Raw outputs of the pruned network (logits or scores; predictions for regression).

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.

        Returns
        -------
        outputs : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            1-D when the network has a single output.
        """
        check_is_fitted(self)
        outputs = self._outputs(X)
        return outputs[:, 0] if outputs.shape[1] == 1 else outputs

    def predict(self, X):
        """Predict targets with the pruned network.

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            Regression outputs (1-D for a single output), class labels, or a 0/1 label matrix.
        """
        check_is_fitted(self)
        return self._predictions(self._outputs(X))

    def predict_before_finetune(self, X):
        """Predict targets with the pruned network as it was before fine-tuning.

        That network is ``pruned_model_before_finetune_``: with ``head="satellite"`` the cut
        network with its satellite head, so that the effect of the selection alone is read from
        the same fit as the fine-tuned network's. Without ``finetune_params`` it is
        ``pruned_model_`` and this is :meth:`predict`.

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            As :meth:`predict` returns them.
        """
        check_is_fitted(self)
        return self._predictions(self._outputs(X, self.pruned_model_before_finetune_))

    def score_before_finetune(self, X, y, sample_weight=None):
        """:meth:`score`'s metric for the pruned network before fine-tuning (:meth:`predict_before_finetune`).

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            True targets.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        score : float
            Accuracy (subset accuracy for multi-label) or R², as :meth:`score`.
        """
        return self._score(y, self.predict_before_finetune(X), sample_weight)

    def _predictions(self, outputs):
        """Targets from the network outputs (see the class description)."""
        if self.target_type_ == "continuous":
            return outputs[:, 0]
        if self.target_type_ == "continuous-multioutput":
            return outputs
        if self.target_type_ == "multilabel-indicator":
            return (outputs > 0).astype(np.int64)
        if outputs.shape[1] == 1:
            return self.classes_[(outputs[:, 0] > 0).astype(np.int64)]
        return self.classes_[outputs.argmax(axis=1)]

    def score(self, X, y, sample_weight=None):
        """Accuracy (subset accuracy for multi-label) or R² of the pruned network's predictions.

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            True targets.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        score : float
            ``accuracy_score`` for classification targets, ``r2_score`` (uniform average over
            outputs) for regression, as scikit-learn's classifier and regressor mixins.
        """
        return self._score(y, self.predict(X), sample_weight)

    def _score(self, y, y_pred, sample_weight):
        if self.target_type_ in CLASSIFICATION_KINDS:
            return accuracy_score(y, y_pred, sample_weight=sample_weight)
        return r2_score(y, y_pred, sample_weight=sample_weight)

    def transform(self, X):
        """Pooled responses of ``head_layer_``'s kept filters in the pruned network.

        With ``head="satellite"`` these are the inputs of the Linear head (and of
        ``satellites_[head_layer_]``); with ``head="original"``, the last pooled layer's.

        Parameters
        ----------
        X : ndarray, torch.Tensor or torch.utils.data.Dataset
            Images, in any format accepted by :meth:`fit`.

        Returns
        -------
        features : ndarray of shape (n_samples, n_kept), dtype float32
            One column per filter left in ``head_layer_``.
        """
        check_is_fitted(self)
        return self._pooler(self.pruned_model_, [self.head_layer_]).fit(X).transform(X)

    def get_feature_names_out(self, input_features=None):
        """Names of the columns of :meth:`transform`, ``"<head_layer_>:<channel>"``.

        Channels are numbered as in the original network (the indices of
        ``keep_[head_layer_]``), in the format of
        :meth:`ActivationPooler.get_feature_names_out
        <sklearn_craft.pooling.ActivationPooler.get_feature_names_out>`, so that
        ``set_output(transform="pandas")`` names every column after the filter it pools.

        Parameters
        ----------
        input_features : None
            Ignored: the input is images, not named columns.

        Returns
        -------
        feature_names_out : ndarray of str objects
            One name per column of :meth:`transform`.
        """
        check_is_fitted(self)
        names = [f"{self.head_layer_}:{channel}" for channel in self.keep_[self.head_layer_]]
        return np.asarray(names, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.target_tags.multi_output = True
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


class CraftClassifier(ClassifierMixin, CraftPruner):
    """CRAFT / ETL pruning for a classification task: a :class:`CraftPruner` that is a classifier.

    Parameters, fitted attributes and methods are :class:`CraftPruner`'s; ``y`` must be class
    labels (integers, strings or booleans; binary or multi-class) or a 0/1 multi-label matrix,
    and anything else (floats to regress, in particular) is refused with a ``ValueError``. The
    estimator carries scikit-learn's classifier identity: ``is_classifier`` is True, so
    ``cross_val_score(..., cv=3)`` and ``GridSearchCV(..., cv=3)`` split with ``StratifiedKFold``,
    and :meth:`score` is the accuracy (subset accuracy for multi-label targets).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.base import is_classifier
    >>> from torch import nn
    >>> from sklearn_craft import CraftClassifier
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU())
    >>> X = np.random.default_rng(0).random((90, 1, 16, 16), dtype=np.float32)
    >>> y = np.where(X[:, 0, :8].mean(axis=(1, 2)) > X[:, 0, 8:].mean(axis=(1, 2)), "top", "bottom")
    >>> classifier = CraftClassifier(net, gamma=0.1, random_state=0).fit(X, y)
    >>> is_classifier(classifier), classifier.classes_.tolist(), classifier.predict(X[:2]).shape
    (True, ['bottom', 'top'], (2,))
    """

    def _check_target(self, y):
        y, Y, target_type, classes = super()._check_target(y)
        if target_type not in ("binary", "multiclass", "multilabel-indicator"):
            raise ValueError(
                f"{type(self).__name__} needs class labels (integers, strings or booleans) or a 0/1 label matrix, "
                f"got a {target_type} target; floats are values to regress (use CraftRegressor), "
                "cast float class labels to int"
            )
        return y, Y, target_type, classes

    # The accuracy, as ClassifierMixin's; its docstring links labels of scikit-learn's own docs.
    score = CraftPruner.score

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class CraftRegressor(RegressorMixin, CraftPruner):
    """CRAFT / ETL pruning for a regression task: a :class:`CraftPruner` that is a regressor.

    Parameters, fitted attributes and methods are :class:`CraftPruner`'s; ``y`` must be numeric
    (one or several outputs) and is always regressed: integer targets such as ages in years are
    values, not class labels, and strings are refused with a ``ValueError``. The estimator
    carries scikit-learn's regressor identity (``is_regressor`` is True, plain ``KFold`` splits),
    and :meth:`score` is R².

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.base import is_regressor
    >>> from torch import nn
    >>> from sklearn_craft import CraftRegressor
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU())
    >>> X = np.random.default_rng(0).random((90, 1, 16, 16), dtype=np.float32)
    >>> age = np.rint(40 + 100 * (X[:, 0, :8].mean(axis=(1, 2)) - X[:, 0, 8:].mean(axis=(1, 2)))).astype(int)
    >>> regressor = CraftRegressor(net, gamma=0.1, random_state=0).fit(X, age)
    >>> is_regressor(regressor), regressor.target_type_, regressor.predict(X[:2]).dtype
    (True, 'continuous', dtype('float32'))
    """

    def _check_target(self, y):
        values = np.asarray(y)
        refused = ValueError(
            f"{type(self).__name__} needs numeric targets, got an array of dtype {values.dtype}; "
            "use CraftClassifier for class labels"
        )
        if values.dtype.kind not in "biufO":
            raise refused
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError) as error:
            raise refused from error
        return super()._check_target(values)

    # R², as RegressorMixin's; its docstring links labels of scikit-learn's own docs.
    score = CraftPruner.score
