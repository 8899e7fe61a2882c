"""Filter rules: which filters of a layer to keep once the number to keep is known.

CRAFT's own rule, LASSO at the knee of each layer's characteristic curve, chooses both how many
filters a layer keeps and which (:mod:`~sklearn_craft.selection`). The rules here only *rank* the
filters of one convolution; :class:`~sklearn_craft.pruner.CraftPruner` (``filter_rule=``) keeps
the best ``n`` of every layer, ``n`` being the number LASSO selected at ``gamma`` or the one a
FLOPs budget gives (``flops_target=``). Everything after the choice (satellites, surgery, head,
fine-tuning, report) is the pruner's, so rules are compared with all else identical.

A new rule subclasses :class:`FilterRule` and implements :meth:`FilterRule.score_filters`.
"""

import numpy as np

from ._lasso_path import _cross_sums, _solve_paths, _sum_problems

__all__ = ["FilterRule", "L1NormRule", "LassoRankRule", "RandomRule", "check_filter_rule", "top_filters"]


class FilterRule:
    """Base class of the rules that rank the filters of a convolution.

    A rule gives every output filter of a convolution a score; the filters with the highest scores
    are kept (ties go to the lower index, see :func:`top_filters`). Subclasses implement
    :meth:`score_filters`, must not modify what they are given, and should be deterministic
    given ``random_state`` (:class:`~sklearn_craft.pruner.CraftPruner` passes one seeded by its
    own ``random_state``). A rule holds no fitted state: one instance may serve several pruners.

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from sklearn_craft.rules import FilterRule, top_filters
    >>> class ResponseVariance(FilterRule):
    ...     '''Keep the filters whose pooled responses vary most over the images.'''
    ...     def score_filters(self, conv, responses, Y, *, sample_weight=None, random_state=None):
    ...         return responses.var(axis=0)
    >>> responses = np.array([[0.0, 1.0, 5.0], [0.0, 3.0, 5.5]])
    >>> scores = ResponseVariance().score_filters(nn.Conv2d(1, 3, 3), responses, None)
    >>> top_filters(scores, 2).tolist()
    [1, 2]
    """

    def score_filters(self, conv, responses, Y, *, sample_weight=None, random_state=None):
        """One score per output filter of ``conv``: the higher, the sooner it is kept.

        Parameters
        ----------
        conv : torch.nn.Conv2d
            The convolution, as it is in the network the choice is made on: the original
            network, or with ``selection="sequential"`` the network already cut at the layers
            before it (its input channels may be fewer than the original's).
        responses : ndarray of shape (n_samples, conv.out_channels)
            Pooled responses of its filters over the training images, in that network.
        Y : ndarray of shape (n_samples, n_targets)
            The task target, encoded by :func:`sklearn_craft.targets.encode_target`.
        sample_weight : ndarray of shape (n_samples,) or None, default=None
            Weights of the images.
        random_state : numpy.random.RandomState or None, default=None
            The source of randomness a random rule must use.

        Returns
        -------
        scores : array-like of shape (conv.out_channels,)
            Finite scores.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement score_filters")

    def __repr__(self):
        return f"{type(self).__name__}()"


class L1NormRule(FilterRule):
    """Rank filters by the L1 norm of their weights (Li et al., "Pruning Filters for Efficient ConvNets", 2017).

    The score of output filter ``i`` is ``conv.weight[i].abs().sum()``: the data are not read.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_craft.rules import L1NormRule
    >>> conv = nn.Conv2d(1, 3, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = conv.weight.copy_(torch.tensor([1.0, -4.0, 2.0]).view(3, 1, 1, 1))
    >>> L1NormRule().score_filters(conv, None, None).tolist()
    [1.0, 4.0, 2.0]
    """

    def score_filters(self, conv, responses, Y, *, sample_weight=None, random_state=None):
        return conv.weight.detach().abs().flatten(1).sum(dim=1).double().cpu().numpy()


class RandomRule(FilterRule):
    """Rank filters at random: every subset of a given size is equally likely to be kept.

    The draw comes from ``random_state`` (the pruner's, so a fixed ``random_state`` gives the
    same filters).

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from sklearn_craft.rules import RandomRule
    >>> conv = nn.Conv2d(1, 8, 3)
    >>> first = RandomRule().score_filters(conv, None, None, random_state=np.random.RandomState(0))
    >>> again = RandomRule().score_filters(conv, None, None, random_state=np.random.RandomState(0))
    >>> np.array_equal(first, again), sorted(first.tolist()) == list(range(8))
    (True, True)
    """

    def score_filters(self, conv, responses, Y, *, sample_weight=None, random_state=None):
        if random_state is None:
            random_state = np.random.RandomState()
        return random_state.permutation(conv.out_channels).astype(np.float64)


class LassoRankRule(FilterRule):
    """Rank filters by how early they enter their layer's LASSO path on the task.

    CRAFT's criterion without its counts: the same path as the selection (standardized pooled
    responses, ``alphas`` values from α_max down to ``eps``·α_max, every sample), and a filter
    ranks higher the larger the first α at which its coefficient is non-zero; filters entering at
    the same α are ranked by the size of their coefficient at the smallest α (standardized
    scale). With ``flops_target`` the counts come from the FLOPs budget (one ratio for all
    layers) and the choice of filters from the task.

    Parameters
    ----------
    alphas : int, default=100
        Length of the path.
    eps : float, default=1e-4
        Smallest α of the path as a fraction of α_max.

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from sklearn_craft.rules import LassoRankRule, top_filters
    >>> rng = np.random.default_rng(0)
    >>> responses = rng.normal(size=(200, 4))
    >>> Y = (3 * responses[:, 2] + responses[:, 0]).reshape(-1, 1)
    >>> scores = LassoRankRule().score_filters(nn.Conv2d(1, 4, 1), responses, Y)
    >>> top_filters(scores, 1).tolist(), top_filters(scores, 2).tolist()
    ([2], [0, 2])
    """

    def __init__(self, alphas=100, eps=1e-4):
        self.alphas = alphas
        self.eps = eps

    def score_filters(self, conv, responses, Y, *, sample_weight=None, random_state=None):
        responses = np.asarray(responses, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64).reshape(len(responses), -1)
        sums = _cross_sums(responses, Y, np.zeros((len(Y), 0), dtype=bool), sample_weight)
        grid, parts, _ = _sum_problems(sums, self.alphas, self.eps, True)
        coefs = _solve_paths(parts[:1], [grid])[0]  # (n_targets, n_filters, n_alphas), original scale
        active = np.any(coefs != 0, axis=0)
        entered = np.where(active.any(axis=1), active.argmax(axis=1), active.shape[1])
        mean = np.average(responses, axis=0, weights=sample_weight)
        spread = np.sqrt(np.average((responses - mean) ** 2, axis=0, weights=sample_weight))
        size = np.linalg.norm(coefs[:, :, -1], axis=0) * spread
        # Entry first; the coefficient's size, scaled into [0, 1), only breaks ties.
        return (active.shape[1] - entered) + 0.999 * size / max(size.max(), np.finfo(float).tiny)

    def __repr__(self):
        return f"{type(self).__name__}(alphas={self.alphas!r}, eps={self.eps!r})"


#: The rules named by a string in ``CraftPruner(filter_rule=...)``, besides "lasso".
RULES = {"l1_norm": L1NormRule, "random": RandomRule, "lasso_rank": LassoRankRule}


def check_filter_rule(filter_rule):
    """``filter_rule`` as a :class:`FilterRule`, or None for ``"lasso"`` (LASSO's own choice).

    Parameters
    ----------
    filter_rule : {"lasso", "l1_norm", "random"} or FilterRule
        A rule's name or instance.

    Returns
    -------
    rule : FilterRule or None

    Raises
    ------
    ValueError
        For an unknown name.
    TypeError
        For anything else than a string or a FilterRule.

    Examples
    --------
    >>> from sklearn_craft.rules import check_filter_rule
    >>> check_filter_rule("l1_norm"), check_filter_rule("lasso")
    (L1NormRule(), None)
    """
    if isinstance(filter_rule, FilterRule):
        return filter_rule
    if isinstance(filter_rule, str):
        if filter_rule == "lasso":
            return None
        if filter_rule in RULES:
            return RULES[filter_rule]()
        raise ValueError(f"filter_rule must be 'lasso', {', '.join(map(repr, RULES))} or a FilterRule, got {filter_rule!r}")
    raise TypeError(f"filter_rule must be a string or a FilterRule instance, got {type(filter_rule).__name__}")


def top_filters(scores, n_keep):
    """Sorted indices of the ``n_keep`` highest ``scores``; ties go to the lower index.

    Parameters
    ----------
    scores : array-like of shape (n_filters,)
        One finite score per filter, as :meth:`FilterRule.score_filters` returns.
    n_keep : int
        Number of filters to keep, in [1, n_filters].

    Returns
    -------
    indices : ndarray of int
        Sorted filter indices.

    Examples
    --------
    >>> from sklearn_craft.rules import top_filters
    >>> top_filters([0.5, 2.0, 0.5, 1.0], 3).tolist()
    [0, 1, 3]
    """
    return np.sort(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:n_keep])


def _check_scores(rule, scores, conv_name, n_filters):
    """``scores`` as a float array, or a ValueError naming the rule and the layer."""
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (n_filters,) or not np.isfinite(values).all():
        raise ValueError(
            f"{rule!r}.score_filters must return {n_filters} finite scores for {conv_name!r}, got "
            f"an array of shape {values.shape}" + ("" if values.shape != (n_filters,) else " with non-finite values")
        )
    return values
