"""LASSO paths of one group of features from its cross-products: the numerical core of selection.

Each path is solved from the group's cross-products ``C = [X Y]ᵀ[X Y]`` (centred, features
scaled), computed once with a single matrix product; the cross-products of every training part
are those of all samples minus those of its held-out rows. One target goes to scikit-learn's
LARS on the Gram matrix (:func:`~sklearn.linear_model.lars_path_gram`), exact between its
changes of support; several targets (outputs or one-hot classes) give the multi-task (L2,1)
path, which selects filters jointly for all of them, solved by an accelerated proximal
gradient on the Gram matrix with scikit-learn's duality-gap stopping rule (``lasso_path``
with 2-D ``y`` ignores the Gram matrix and is many times slower).

Sample weights enter through the cross-products alone: with weighted means, ``C = Σ_i w_i z_i z_iᵀ``
and ``Σ_i w_i`` in place of the number of samples, a sample of weight 2 counts exactly as the same
sample twice, in every fit and in the held-out errors.
"""

import math
import warnings

import numpy as np
import pandas as pd
import scipy.linalg
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import lars_path_gram


def _group_paths(blocks, Y, splits, alphas, eps, standardize, sample_weight=None):
    """Characteristic curves and all-sample coefficient paths of groups (what ``memory`` caches).

    ``blocks`` holds the features of every group. The cross-products of every training part
    are those of all samples minus those of its held-out part, so the n×p data are multiplied
    once, plus once more over the held-out rows. ``sample_weight`` (None: every sample weighs 1)
    weights the cross-products and the means. The paths of all the groups and parts are solved
    together (see :func:`_multitask_paths`). Returns, per group, the curve DataFrame (alpha,
    n_selected, rmse) and the path of shape (n_targets, n_features, n_alphas) in the original
    feature scale.
    """
    held_out = _held_out_masks(len(Y), splits)
    return _sum_paths([_cross_sums(X, Y, held_out, sample_weight) for X in blocks], alphas, eps, standardize)


def _sum_paths(sums, alphas, eps, standardize):
    """:func:`_group_paths` of groups given by their :func:`_cross_sums` (all samples seen)."""
    problems = [_sum_problems(group_sums, alphas, eps, standardize) for group_sums in sums]
    grids = [grid for grid, parts, _ in problems for _ in parts]
    paths = iter(_solve_paths([part for _, parts, _ in problems for part in parts], grids))
    results = []
    for grid, parts, held_out in problems:
        coefs, *part_coefs = [next(paths) for _ in parts]
        rmse = sum(_held_out_rmse(products, n_test, path) for (products, n_test), path in zip(held_out, part_coefs))
        n_selected = np.count_nonzero(np.any(coefs != 0, axis=0), axis=0)
        results.append((pd.DataFrame({"alpha": grid, "n_selected": n_selected, "rmse": rmse / len(held_out)}), coefs))
    return results


def _group_problems(X, Y, splits, alphas, eps, standardize, sample_weight=None):
    """The α grid of one group, the moments of its paths (all samples, then the training part of
    every split) and the held-out cross-products and total weights of the splits."""
    sums = _cross_sums(X, Y, _held_out_masks(len(Y), splits), sample_weight)
    return _sum_problems(sums, alphas, eps, standardize)


def _held_out_masks(n_samples, splits):
    """(n_samples, n_splits) bool: whether each sample is held out by each (train, test) split."""
    masks = np.zeros((n_samples, len(splits)), dtype=bool)
    for k, (_, test) in enumerate(splits):
        masks[test, k] = True
    return masks


def _cross_sums(X, Y, held_out, sample_weight=None, shift=None):
    """Weighted sums of ``Z = [X Y] − shift`` over all rows and over every split's held-out rows.

    Returns a dict: ``n_features`` (of ``X``) and float64 arrays ``shift`` (the all-sample weighted mean when None), and for
    the parts (all rows, then the held-out rows of each column of ``held_out``) along the first
    axis, ``total`` (Σw), ``sum`` (Σw·z) and ``products`` (Σw·zzᵀ). Sums of chunks with one
    shift add up to those of their concatenation (:func:`_add_sums`); :func:`_centred_sums`
    turns them into the moments about the mean. A shift near the mean (the first chunk's) keeps
    the uncentred products from cancelling catastrophically when they are centred. ``X`` may be
    float32: it becomes float64 one group at a time, here.
    """
    Z = np.hstack([np.asarray(X, dtype=np.float64), Y])
    weights = np.ones(len(Z)) if sample_weight is None else sample_weight
    if shift is None:
        shift = np.average(Z, axis=0, weights=sample_weight)
    Z -= shift
    parts = [slice(None), *(held_out[:, k] for k in range(held_out.shape[1]))]
    weighted = Z * weights[:, None]
    return {
        "n_features": X.shape[1],
        "shift": shift,
        "total": np.array([weights[part].sum() for part in parts]),
        "sum": np.stack([weighted[part].sum(axis=0) for part in parts]),
        "products": np.stack([Z[part].T @ weighted[part] for part in parts]),
    }


def _add_sums(sums, more):
    """:func:`_cross_sums` of two chunks with the same shift, as of their concatenation."""
    return {**sums, **{name: sums[name] + more[name] for name in ("total", "sum", "products")}}


def _centred_sums(sums):
    """The cross-products about the all-sample weighted mean: ``(products, total, mean)`` of
    all samples, and ``(products, total, sum)`` of every split's held-out samples."""
    total, offset = sums["total"][0], sums["sum"][0] / sums["total"][0]
    products = sums["products"][0] - total * np.outer(offset, offset)
    held_out = []
    for test_total, test_sum, test_products in zip(sums["total"][1:], sums["sum"][1:], sums["products"][1:]):
        centred_sum = test_sum - test_total * offset
        test_products = (
            test_products - np.outer(test_sum, offset) - np.outer(offset, test_sum) + test_total * np.outer(offset, offset)
        )
        held_out.append((test_products, test_total, centred_sum))
    return products, total, sums["shift"] + offset, held_out


def _sum_problems(sums, alphas, eps, standardize):
    """:func:`_group_problems` from the group's :func:`_cross_sums`."""
    products, total, mean, splits = _centred_sums(sums)
    n_features = sums["n_features"]
    x_mean = mean[:n_features]
    full = _moments(products, total, x_mean, n_features, standardize)
    parts, held_out = [full], []
    for split in splits:
        train_products, train_total, shift, test_products = _split_parts(products, total, *split)
        parts.append(_moments(train_products, train_total, x_mean + shift[:n_features], n_features, standardize))
        held_out.append((test_products, split[1]))
    return _alpha_grid(full, alphas, eps), parts, held_out


def _split_parts(products, total, test_products, test_total, test_sum):
    """A split's training part from the all-sample cross-products (about the all-sample mean)
    and its held-out part's (:func:`_centred_sums`): the training cross-products about their
    own mean, their total weight, that mean minus the all-sample mean, and the held-out
    cross-products about the training mean (where a model fitted on the training part has its
    intercept)."""
    train_total = total - test_total
    shift = -test_sum / train_total
    train_products = products - test_products - train_total * np.outer(shift, shift)
    test_products = test_products - np.outer(test_sum, shift) - np.outer(shift, test_sum)
    return train_products, train_total, shift, test_products + test_total * np.outer(shift, shift)


def _moments(products, n_samples, x_mean, n_features, standardize):
    """What a path is solved from: ``C``, the cross-products of the centred ``[X Y]`` (features
    scaled to unit variance when ``standardize``), the number of samples and the feature scales."""
    x_scale = np.ones(n_features)
    C = products
    if standardize:
        x_scale = np.sqrt(np.clip(np.diag(products)[:n_features], 0, None) / n_samples)
        # A constant column leaves rounding noise after centring; scaling it up would turn the
        # noise into a feature (the same guard as StandardScaler's).
        x_scale[x_scale <= 10 * np.finfo(np.float64).eps * np.maximum(np.abs(x_mean), 1.0)] = 1.0
        scale = np.concatenate([x_scale, np.ones(len(products) - n_features)])
        C = products / np.outer(scale, scale)
    return {"C": C, "n_samples": n_samples, "x_scale": x_scale}


def _alpha_grid(stats, alphas, eps):
    """scikit-learn's grid: geometric from α_max = max_j ‖X_jᵀY‖₂ / n down to α_max·eps."""
    if not isinstance(alphas, int):
        return np.sort(alphas)[::-1]
    alpha_max = np.sqrt(np.max(_correlation_norms2(stats))) / stats["n_samples"]
    resolution = np.finfo(np.float64).resolution
    if alpha_max <= resolution:
        return np.full(alphas, resolution)
    return np.geomspace(alpha_max, alpha_max * eps, num=alphas)


def _correlation_norms2(stats):
    """``‖X_jᵀY‖₂²`` of every (centred, scaled) feature: the first to enter the path has the largest."""
    n_features = len(stats["x_scale"])
    return np.sum(stats["C"][:n_features, n_features:] ** 2, axis=1)


#: Duality-gap tolerances (relative to ``‖Y‖²``) of the two solvers. One target: scikit-learn's
#: default, which LARS's points miss only where filters outnumber samples (Newton steps close
#: those gaps). Several targets: at 1e-4 the knees of MobileFaceNet's 50 layers on a 7-class target
#: (450 images) depended on the solver (two solvers that both met the gap disagreed by 1-3
#: filters in 6 to 10 layers); at 1e-6 they are those of the paths solved to 1e-8, and the Newton
#: steps of :func:`_multitask_paths` make the tighter gap cheap.
TOL = 1e-4
MULTITASK_TOL = 1e-6


def _solve_path(stats, grid, tol=None):
    """LASSO path (one target) or multi-task LASSO path of one problem, see :func:`_solve_paths`."""
    return _solve_paths([stats], [grid], tol)[0]


def _solve_paths(parts, grids, tol=None):
    """LASSO paths (one target) or multi-task LASSO paths of problems with as many targets and
    α (``grids`` holds each one's), each (n_targets, n_features, n_alphas) in the original
    feature scale. ``tol``: the duality-gap tolerance, None for :data:`TOL` (one target) or
    :data:`MULTITASK_TOL` (several).

    One target goes to :func:`_lars_path`, several to :func:`_multitask_paths`, all problems
    with as many features at once.
    """
    paths = [None] * len(parts)
    widths = np.array([len(stats["x_scale"]) for stats in parts])
    for n_features in np.unique(widths):
        same = np.flatnonzero(widths == n_features)
        if len(parts[same[0]]["C"]) - n_features == 1:
            for k in same:
                paths[k] = _lars_path(parts[k], grids[k], TOL if tol is None else tol)[None]
        else:
            Cs = np.stack([parts[k]["C"] for k in same])
            n_samples = np.array([parts[k]["n_samples"] for k in same])
            grid = np.stack([grids[k] for k in same])
            multitask_tol = MULTITASK_TOL if tol is None else tol
            for k, coefs in zip(same, _multitask_paths(Cs, n_samples, n_features, grid, multitask_tol)):
                paths[k] = coefs
    return [coefs / stats["x_scale"][None, :, None] for stats, coefs in zip(parts, paths)]


def _lars_path(stats, grid, tol):
    """LASSO path of one target at the α of ``grid`` (n_features, n_alphas): scikit-learn's LARS
    on the cross-products, polished by Newton steps where it misses the duality-gap tolerance.

    LARS (:func:`~sklearn.linear_model.lars_path_gram`, ``method="lasso"``) follows the path from
    one change of support to the next, exactly, and the path is linear in α between them, so every
    α of the grid is read off the segment it falls on. Where filters outnumber samples it drops
    and re-adds nearly collinear filters many times and its points can miss the tolerance; a
    Newton step on the support (:func:`_newton_steps`) closes those gaps. On MobileFaceNet's 50
    layers (450 images, one target) this took 12.3 s of CPU against 48.2 s for coordinate
    descent, which left 4,141 of the 10,000 fits at its iteration limit and 3 knees off the
    paths solved to :math:`10^{-9}` (this: 1, a tie at rounding level).
    """
    C, n_features = stats["C"], len(stats["x_scale"])
    gram, xy, yy = C[:n_features, :n_features], C[:n_features, n_features:], C[n_features, n_features]
    # In units of the penalty nα (n_samples=1), since a total sample weight need not be an integer.
    penalties = grid * stats["n_samples"]
    with warnings.catch_warnings():
        # Degenerate steps among collinear filters: the gaps below tell what they cost.
        warnings.simplefilter("ignore", ConvergenceWarning)
        knots, _, breakpoints = lars_path_gram(
            xy[:, 0].copy(), gram.copy(), n_samples=1, alpha_min=penalties.min(), method="lasso",
            max_iter=100 * n_features,
        )
    coefs = np.array([np.interp(penalties, knots[::-1], row[::-1], left=row[-1], right=0.0) for row in breakpoints])
    gaps = _multitask_gaps(
        coefs.T[:, :, None], (gram @ coefs).T[:, :, None], np.broadcast_to(xy, (len(grid),) + xy.shape),
        np.full(len(grid), yy), penalties,
    )
    for i in np.flatnonzero(gaps > tol * yy):
        polished, gap = _newton_steps(gram, xy, yy, coefs[:, i : i + 1], penalties[i], gaps[i], tol)
        if polished is not None:
            coefs[:, i] = polished[:, 0]
        if polished is None or gap > tol * yy:
            warnings.warn(
                f"LASSO did not reach its duality-gap tolerance at alpha={grid[i]:.3g}; "
                "nearly collinear features make the path hard to solve.",
                ConvergenceWarning,
            )
    return coefs


def _multitask_paths(Cs, n_samples, n_features, grids, tol, max_iter=1_000):
    """Multi-task (L2,1) LASSO paths of several problems: accelerated proximal gradient, polished
    by Newton steps on the support.

    Problem ``k`` has the cross-products ``Cs[k]`` of ``n_samples[k]`` samples and the α grid
    ``grids[k]``. Each path minimises ``‖Y − XW‖²/2 + nα·Σ_j ‖W_j‖₂`` (n times scikit-learn's
    objective) along its grid with FISTA and gradient-based adaptive restart: one product by the
    Gram matrix (level-3 BLAS, vectorised over the features and outputs) and a group
    soft-threshold per iteration. Each α starts from the previous solutions extrapolated along
    the path, and stops on scikit-learn's rule for 2-D ``y``: a duality gap (its formulation) at
    most ``tol·‖Y‖²``, or ``max_iter`` iterations. The proximal gradient finds the support quickly
    but closes the gap slowly where the path is dense and the filters nearly collinear (the gap
    needs the residual far more accurately than the objective does: on MobileFaceNet's 512-filter
    layers it took 1 000 to 3 600 iterations per α). So every α begins with damped Newton steps
    from the extrapolated start, each on the support of the proximal-gradient point of the last
    (:func:`_newton_steps`, :func:`_newton_step`), in a row while each at least halves the gap,
    which closes it in one to three steps where the support stays. Where they stall (filters
    entering or leaving, filters near zero), FISTA iterations follow, the gap checked every 5,
    and Newton steps again once the support is the same at two consecutive checks. (Against
    Newton steps from the iterate itself and only after such checks, 5 to 10 iterations into
    every α, a fit of MobileFaceNet's 7-class case took 20-22 s instead of 24-26 s, the two
    versions run in turn on one machine.) On dense
    paths of correlated filters, block coordinate descent (scikit-learn's compiled one, run on a
    square root of ``C``) took 5-10 times longer in our measurements, and stopped at its
    iteration limit where filters were nearly collinear. ``max_iter`` is scikit-learn's default
    for its LASSO solvers; with the Newton steps it is reached only where a Newton step finds no
    descent (a Gram matrix so close to singular that the quadratic model fails, as in a first
    layer of 64 nearly collinear filters). The Newton steps are most of a fit's time (on
    MobileFaceNet's 7-class case about 18,900 steps, half of 22 CPU seconds under a profiler in
    their factorisations); conjugate gradients preconditioned by the last step's factors on the
    same support replaced a fifth of them but needed about 5 iterations each (no gain measured),
    and PyTorch's Cholesky factor and inverse (MKL) for supports of 256 or more filters were
    faster alone (3.5 against 4.8 ms at 490 filters) but not over a fit (20.0-21.7 against
    20.0-21.2 s).

    The problems (the all-sample path and the training part of every split, of every group
    of one width) advance side by side, each at its own α with its own iterate, momentum,
    iteration count and stopping test, so that every path is exactly the one it would be alone
    while NumPy's per-call overhead, which dominates an iteration on a layer of a few hundred
    filters, is paid once for all of them.
    """
    grams, xy = Cs[:, :n_features, :n_features], Cs[:, :n_features, n_features:]
    yy = np.trace(Cs[:, n_features:, n_features:], axis1=1, axis2=2)
    n_targets = xy.shape[2]
    lipschitz = np.array([scipy.linalg.eigvalsh(gram, subset_by_index=[n_features - 1] * 2)[0] for gram in grams])
    coefs = np.zeros((len(Cs), n_targets, n_features, grids.shape[1]))
    # State of the problems still on their path (a problem without signal keeps zeros).
    live = np.flatnonzero(lipschitz > 0)
    grams, xy, yy, lipschitz = grams[live], xy[live], yy[live], lipschitz[live]
    n_samples, grids = n_samples[live], grids[live]
    # The product by the Gram matrix is the cost of an iteration; in float32 it takes about half
    # the time and resolves the gradient to ~1e-7, enough until the gap nears that level (the
    # gap itself is always evaluated in float64).
    grams32 = grams.astype(np.float32)
    position = np.zeros(len(live), dtype=int)
    W = np.zeros((len(live), n_features, n_targets))
    V, momentum, n_iter = W, np.ones(len(live)), np.zeros(len(live), dtype=int)
    penalties = grids[:, 0] * n_samples
    gaps = _multitask_gaps(W, np.zeros_like(W), xy, yy, penalties)
    # The support at the last gap check, and the iterations since the last Newton step.
    support, since_newton = np.zeros((len(live), n_features), dtype=bool), np.zeros(len(live), dtype=int)
    while len(live):
        stopped = (gaps <= tol * yy) | (n_iter >= max_iter)
        if stopped.any():
            # V is W itself at the start of an α: copies, so that each gets its own update.
            W, V = W.copy(), V.copy()
            for k in np.flatnonzero(stopped):
                i, grid = position[k], grids[k]
                coefs[live[k], :, :, i] = W[k].T
                if gaps[k] > tol * yy[k]:
                    warnings.warn(
                        f"Multi-task LASSO did not converge in {max_iter} iterations at alpha={grid[i]:.3g}; "
                        "nearly collinear features make the path hard to solve.",
                        ConvergenceWarning,
                    )
                if i + 1 < len(grid) and i >= 1 and grid[i] != grid[i - 1]:
                    # The path is smooth in log α between changes of support: the next α starts
                    # from the line through the last two solutions, or from the parabola through
                    # the last three where they share a support (a tenth fewer Newton steps on
                    # MobileFaceNet's 7-class target).
                    known, support_now = [coefs[live[k], :, :, i - 1].T, W[k]], W[k] != 0
                    if i >= 2 and grid[i - 1] != grid[i - 2]:
                        earlier = coefs[live[k], :, :, i - 2].T
                        if np.array_equal(earlier != 0, support_now) and np.array_equal(known[0] != 0, support_now):
                            known.insert(0, earlier)
                    W[k] = _extrapolate(np.log(grid[i + 1 - len(known) : i + 2]), known)
                V[k], momentum[k], n_iter[k], position[k] = W[k], 1.0, 0, i + 1
            on = position < grids.shape[1]
            if not on.all():
                # Copies (of every Gram matrix): only where a path has ended.
                support, since_newton, stopped = support[on], since_newton[on], stopped[on]
                live, position, W, V, momentum, n_iter = live[on], position[on], W[on], V[on], momentum[on], n_iter[on]
                grams, grams32, xy, yy, lipschitz = grams[on], grams32[on], xy[on], yy[on], lipschitz[on]
                n_samples, grids, gaps = n_samples[on], grids[on], gaps[on]
            restarted = np.flatnonzero(stopped)
            penalties = grids[np.arange(len(live)), position] * n_samples
            # One product per restarted problem: fancy-indexing the stack would copy its Gram matrices.
            gram_w = np.zeros_like(W)
            for k in restarted:
                gram_w[k] = grams[k] @ W[k]
            gaps[restarted] = _multitask_gaps(
                W[restarted], gram_w[restarted], xy[restarted], yy[restarted], penalties[restarted]
            )
            # Newton steps straight from the extrapolated start: where the support stays, they
            # solve the new α without the proximal-gradient iterations that settled it before.
            for k in restarted[(gaps[restarted] > tol * yy[restarted]) & np.any(W[restarted] != 0, axis=(1, 2))]:
                polished, gaps[k] = _newton_steps(
                    grams[k], xy[k], yy[k], W[k], penalties[k], gaps[k], tol, lipschitz[k], gram_w[k]
                )
                if polished is not None:
                    W[k] = V[k] = polished
                    since_newton[k] = 0
            continue
        threshold = (penalties / lipschitz)[:, None, None]
        single = gaps > 1e-5 * yy
        for _ in range(5):
            if single.all():
                gradient = np.matmul(grams32, V.astype(np.float32))
            else:
                gradient = np.empty_like(V)
                gradient[single] = np.matmul(grams32[single], V[single].astype(np.float32))
                gradient[~single] = np.matmul(grams[~single], V[~single])
            W_next = _group_soft_threshold(V - (gradient - xy) / lipschitz[:, None, None], threshold)
            next_momentum = (1 + np.sqrt(1 + 4 * momentum**2)) / 2
            change = W_next - W
            restart = np.einsum("kij,kij->k", V - W_next, change) > 0
            next_momentum[restart] = 1.0
            # A restarted problem goes on from W_next itself (plus 0·change).
            V = W_next + np.where(restart, 0.0, (momentum - 1) / next_momentum)[:, None, None] * change
            W, momentum = W_next, next_momentum
        n_iter += 5
        since_newton += 5
        gram_w = np.matmul(grams, W)
        gaps = _multitask_gaps(W, gram_w, xy, yy, penalties)
        active = np.any(W != 0, axis=2)
        settled = np.all(active == support, axis=1) & active.any(axis=1) & (since_newton >= 5) & (gaps > tol * yy)
        support = active
        since_newton[settled] = 0
        for k in np.flatnonzero(settled):
            polished, gaps[k] = _newton_steps(
                grams[k], xy[k], yy[k], W[k], penalties[k], gaps[k], tol, lipschitz[k], gram_w[k]
            )
            if polished is not None:
                W[k] = V[k] = polished
                momentum[k] = 1.0
    return coefs


def _extrapolate(log_alphas, solutions):
    """Value at ``log_alphas[-1]`` of the polynomial in log α through ``solutions`` at the
    others (Lagrange's form)."""
    *knots, target = log_alphas.tolist()
    value = 0.0
    for j, solution in enumerate(solutions):
        # Python floats: two or three knots, where NumPy's per-call overhead is the whole cost.
        weight = math.prod((target - other) / (knots[j] - other) for i, other in enumerate(knots) if i != j)
        value = value + weight * solution
    return value


def _newton_steps(gram, xy, yy, W, penalty, gap, tol, lipschitz=None, gram_w=None, max_steps=4):
    """Newton steps in a row on one multi-task LASSO problem, while each at least halves the
    duality gap and leaves it above ``tol·yy``: the point reached (None if no step was taken) and
    its gap. Going on with Newton steps saves the proximal-gradient iterations in between where
    the support is right; a gap that stops falling says that the support is not, or that the step
    is too far from the solution for the quadratic model (filters near zero), which proximal-gradient
    iterations settle first.

    With ``lipschitz`` (the Gram matrix's largest eigenvalue; ``gram_w``: ``gram @ W`` where
    known), every step starts from the proximal-gradient point of the current one, of step
    ``t =`` :data:`NEWTON_PROX_STEP` / ``lipschitz``: the Newton step there is the semi-smooth
    Newton step on the fixed-point equation ``W = prox(W − t∇f(W))`` (its system is that of
    :func:`_newton_step` on the prox point's support, with the prox point's norms and
    directions), so filters that the gradient calls in enter the support, and filters on their
    way out leave it, in the same step. Without it (LARS points, exact on their support) the
    steps start from ``W`` itself.
    """
    polished, point = None, W
    if lipschitz is not None:
        step_size = NEWTON_PROX_STEP / lipschitz
        gram_point = gram @ W if gram_w is None else gram_w
    for _ in range(max_steps):
        if lipschitz is not None:
            point = _group_soft_threshold(point - step_size * (gram_point - xy), step_size * penalty)
            if not point.any():
                break
        step = _newton_step(gram, xy, point, penalty)
        if step is None:
            break
        # The gap's product by the Gram matrix is also the next prox point's.
        polished, point, gram_point, previous = step, step, gram @ step, gap
        gap = _multitask_gaps(step[None], gram_point[None], xy[None], np.array([yy]), np.array([penalty]))[0]
        if gap <= tol * yy or gap > previous / 2:
            break
    return polished, gap


#: Step, in units of 1/L, to the proximal-gradient point every Newton step of
#: :func:`_newton_steps` starts from. A step longer than the descent-safe 1/L moves more filters
#: in and out of the support per Newton step. On MobileFaceNet's 7-class case (Newton steps at
#: every α's start) 1, 10, 20 and 30 took 21,265, 18,881, 18,105 and 26,661 Newton steps (30:
#: one 128-filter layer's paths stalled, thousands more steps): 10 keeps a margin.
NEWTON_PROX_STEP = 10.0


def _group_soft_threshold(W, threshold):
    """Proximal map of ``threshold·Σ_j ‖W_j‖₂`` (rows of the last two axes): every row shrunk
    towards zero by ``threshold`` (broadcast against ``W``'s rows), zero where shorter."""
    norms = _row_norms(W)[..., None]
    return W * np.maximum(1 - threshold / np.maximum(norms, np.finfo(float).tiny), 0)


def _newton_step(gram, xy, W, penalty, retries=1):
    """One damped Newton step of a multi-task LASSO problem on the support of ``W``, or None.

    On a fixed support the objective ``½⟨W, GW⟩ − ⟨W, XᵀY⟩ + penalty·Σ_j ‖W_j‖`` is smooth; its
    Hessian is ``G_AA ⊗ I + ⊕_j (penalty/‖W_j‖)(I − u_j u_jᵀ)`` (``u_j = W_j/‖W_j‖``): the Gram
    matrix plus a diagonal ``D`` times the identity, less one rank-one term per feature, so the
    Woodbury identity solves the Newton system with two factorisations of the support's size
    instead of one of (support × targets). Near the solution of a dense, ill-conditioned problem,
    where the proximal gradient needs thousands of iterations to close the duality gap, one to
    three such steps close it. Groups that the full step carries through zero leave the support
    (set to zero) when that decreases the objective more than the full step. When neither that
    nor the full step descends enough, and ``retries`` is left, those groups leave the support
    all the same and a Newton step on the rest follows (from ``W`` with them at zero), taken if it
    ends below ``W``'s objective: correlated filters compensate for the leaving ones, which zeroing
    them alone does not. (Backtracking would creep along the crossing direction a factorisation
    per step; on MobileFaceNet's 7-class target this halved the Newton steps of its 64-filter
    layers.) Otherwise backtracking (Armijo) on the objective keeps every step a descent; None
    when no step decreases it (the proximal gradient then goes on).
    """
    A = np.flatnonzero(np.any(W != 0, axis=1))
    # take() copies the submatrix in a third of the time of gram[np.ix_(A, A)].
    WA, gram_a, xy_a = W[A], gram.take(A, axis=0).take(A, axis=1), xy[A]
    norms = _row_norms(WA)
    U, curvature = WA / norms[:, None], penalty / norms
    smooth_gradient = gram_a @ WA - xy_a
    gradient = smooth_gradient + penalty * U
    direction = None
    for dtype in (np.float32, np.float64) if len(A) >= FLOAT32_SUPPORT else (np.float64,):
        try:
            direction = _newton_direction(gram_a, U, curvature, gradient, dtype)
            break
        except (np.linalg.LinAlgError, ValueError):
            continue
    if direction is None:
        return None
    # The smooth part along the direction is a quadratic in the step: backtracking costs no product.
    linear, quadratic = np.vdot(direction, smooth_gradient), np.vdot(direction, gram_a @ direction)
    slope, step, penalty_now = np.vdot(gradient, direction), 1.0, penalty * np.sum(norms)
    while slope < 0 and step > 1e-6:
        candidate = WA + step * direction
        change = step * linear + 0.5 * step**2 * quadratic
        change += penalty * np.sum(_row_norms(candidate)) - penalty_now
        if step == 1.0:
            # A full step that carries groups through zero says that they leave the support.
            # Backtracking only creeps towards that, a factorisation per step (about one step in
            # five on MobileFaceNet's 512-filter layers, 7-class target); the full step with those
            # groups at zero is taken instead when it decreases the objective more.
            crossing = np.einsum("ij,ij->i", U, candidate) <= 0
            if crossing.any():
                dropped = np.where(crossing[:, None], 0.0, candidate)
                delta = dropped - WA
                drop_change = np.vdot(delta, smooth_gradient) + 0.5 * np.vdot(delta, gram_a @ delta)
                drop_change += penalty * np.sum(_row_norms(dropped)) - penalty_now
                if drop_change < min(change, 0):
                    candidate, change = dropped, -np.inf
                elif change > 1e-4 * slope and retries and not crossing.all():
                    reduced = W.copy()
                    reduced[A[crossing]] = 0
                    polished = _newton_step(gram, xy, reduced, penalty, retries - 1)
                    objective_now = penalty_now + np.vdot(WA, 0.5 * (smooth_gradient + xy_a) - xy_a)
                    if polished is not None and _objective(gram, xy, polished, penalty) < objective_now:
                        return polished
        if change <= 1e-4 * step * slope:
            polished = np.zeros_like(W)
            polished[A] = candidate
            return polished
        step /= 2
    return None


def _objective(gram, xy, W, penalty):
    """``½⟨W, GW⟩ − ⟨W, XᵀY⟩ + penalty·Σ_j ‖W_j‖``, from the rows of ``W``'s support."""
    A = np.flatnonzero(np.any(W != 0, axis=1))
    WA = W[A]
    quadratic = np.vdot(WA, gram.take(A, axis=0).take(A, axis=1) @ WA)
    return 0.5 * quadratic - np.vdot(WA, xy[A]) + penalty * np.sum(_row_norms(WA))


def _row_norms(W):
    """Euclidean norm of every row of ``W`` (every feature's coefficients over the targets; the
    last two axes, so also of a stack of problems)."""
    return np.sqrt(np.einsum("...ij,...ij->...i", W, W))


#: Supports of at least this many filters solve the Newton system in float32 (float64 where the
#: float32 factorisation fails). The direction need not be exact: the line search and the duality
#: gap, in float64, judge the step. On MobileFaceNet's 7-class case a fit took 31.4 s against 39.4 s
#: in float64 (medians of three) and the knees stayed those of the paths solved to 1e-8 and 1e-10.
FLOAT32_SUPPORT = 64


def _newton_direction(gram_a, U, curvature, gradient, dtype):
    """``−H⁻¹·gradient`` for the Hessian of :func:`_newton_step` on a support, by the Woodbury
    identity, its factorisations in ``dtype`` (float64 result). Raises LinAlgError where a
    factorisation fails (not numerically positive definite)."""
    potrf, potri, potrs = scipy.linalg.lapack.get_lapack_funcs(("potrf", "potri", "potrs"), dtype=dtype)
    syrk, symm = scipy.linalg.blas.get_blas_funcs(("syrk", "symm"), dtype=dtype)
    U_d = U.astype(dtype, copy=False)
    # potrf/potri read and write the upper triangle only, without scipy.linalg's copies and checks.
    matrix = gram_a.astype(dtype)  # a copy: potrf overwrites it
    matrix.flat[:: len(U) + 1] += curvature
    factor, info = potrf(matrix, lower=False, clean=False, overwrite_a=True)
    if info == 0:
        inverse, info = potri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"Newton system not positive definite (LAPACK info {info})")
    x = symm(1.0, inverse, np.asfortranarray(gradient, dtype=dtype), side=0, lower=0)
    # The Schur complement of a positive definite Hessian is positive definite; only its upper
    # triangle, all that the factorisation reads, is formed (syrk).
    schur = syrk(-1.0, U_d)
    schur *= inverse
    schur.flat[:: len(U) + 1] += (1 / curvature).astype(dtype)
    schur_factor, info = potrf(schur, lower=False, clean=False, overwrite_a=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"Newton system not positive definite (LAPACK info {info})")
    z = potrs(schur_factor, np.einsum("ij,ij->i", U_d, x), lower=False)[0]
    direction = -(x + symm(1.0, inverse, np.asfortranarray(z[:, None] * U_d), side=0, lower=0))
    return direction.astype(np.float64, copy=False)


def _multitask_gaps(W, gram_w, xy, yy, penalties):
    """Duality gaps of multi-task LASSO problems, scikit-learn's formulation, from the
    cross-products and the products ``gram_w`` of the Gram matrices by ``W``; one problem per
    leading index of every argument."""
    residual_x = xy - gram_w
    w_xy = np.einsum("kij,kij->k", W, xy)
    residual_norm2 = yy - 2 * w_xy + np.einsum("kij,kij->k", W, gram_w)
    residual_y = yy - w_xy
    dual_norm = np.sqrt(np.max(np.einsum("kij,kij->ki", residual_x, residual_x), axis=1))
    scale = np.minimum(1.0, penalties / np.maximum(dual_norm, np.finfo(float).tiny))
    primal = 0.5 * residual_norm2 + penalties * np.sum(_row_norms(W), axis=1)
    dual = -0.5 * scale**2 * residual_norm2 + scale * residual_y
    return primal - dual


def _held_out_rmse(products, n_test, coefs):
    """RMSE over all outputs of every α's model, from the held-out cross-products ``[X Y]ᵀ[X Y]``.

    ``n_test`` is the number (or the total weight) of the held-out samples.

    ``‖Y − XW‖² = tr(YᵀY) − 2·tr(WᵀXᵀY) + tr(WᵀXᵀXW)``: a p×p product per output instead of
    predicting every held-out sample at every α.
    """
    n_targets, n_features, _ = coefs.shape
    xx, xy = products[:n_features, :n_features], products[:n_features, n_features:]
    cross = np.einsum("tja,jt->a", coefs, xy)
    quadratic = np.einsum("tja,tja->a", coefs, np.matmul(xx, coefs))
    squared = (np.trace(products[n_features:, n_features:]) - 2 * cross + quadratic) / (n_test * n_targets)
    return np.sqrt(np.clip(squared, 0, None))


def _first_to_enter(sums, standardize):
    """Index of the feature with the largest ``‖X_jᵀY‖₂``: the first to enter the LASSO path.

    ``sums`` are the group's :func:`_cross_sums`.
    """
    products, total, mean, _ = _centred_sums(sums)
    n_features = sums["n_features"]
    stats = _moments(products, total, mean[:n_features], n_features, standardize)
    return int(np.argmax(_correlation_norms2(stats)))
