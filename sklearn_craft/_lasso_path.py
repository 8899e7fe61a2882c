"""LASSO paths of one group of features from its cross-products: the numerical core of selection.

Each path is solved from the group's cross-products ``C = [X Y]ᵀ[X Y]`` (centred, features
scaled), computed once with a single matrix product; the cross-products of every training part
are those of all samples minus those of its held-out rows. One target goes to scikit-learn's
:func:`~sklearn.linear_model.lasso_path` with the Gram matrix; several targets (outputs or
one-hot classes) give the multi-task (L2,1) path, which selects filters jointly for all of them,
solved by an accelerated proximal gradient on the Gram matrix with scikit-learn's duality-gap
stopping rule (``lasso_path`` with 2-D ``y`` ignores the Gram matrix and is many times slower).

Sample weights enter through the cross-products alone: with weighted means, ``C = Σ_i w_i z_i z_iᵀ``
and ``Σ_i w_i`` in place of the number of samples, a sample of weight 2 counts exactly as the same
sample twice, in every fit and in the held-out errors.
"""

import warnings

import numpy as np
import pandas as pd
import scipy.linalg
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import lasso_path


def _group_path(X, Y, splits, alphas, eps, standardize, sample_weight=None):
    """Characteristic curve and all-sample coefficient path of one group (what ``memory`` caches).

    The cross-products of every training part are those of all samples minus those of its
    held-out part, so the n×p data are multiplied once, plus once more over the held-out rows.
    ``sample_weight`` (None: every sample weighs 1) weights the cross-products and the means.
    Returns the curve DataFrame (alpha, n_selected, rmse) and the path of shape
    (n_targets, n_features, n_alphas) in the original feature scale.
    """
    n_features = X.shape[1]
    Z, x_mean = _centred(X, Y, sample_weight)
    weighted, total = _weighted(Z, sample_weight)
    products = Z.T @ weighted
    full = _moments(products, total, x_mean, n_features, standardize)
    grid = _alpha_grid(full, alphas, eps)
    coefs = _solve_path(full, grid)

    rmse = np.zeros(len(grid))
    for train, test in splits:
        Z_test = Z[test]
        weighted_test, test_total = _weighted(Z_test, None if sample_weight is None else sample_weight[test])
        test_products, test_sum = Z_test.T @ weighted_test, weighted_test.sum(axis=0)
        train_total = total - test_total
        # Means of the training part relative to the all-sample means, which are zero.
        shift = -test_sum / train_total
        train_products = products - test_products - train_total * np.outer(shift, shift)
        part = _moments(train_products, train_total, x_mean + shift[:n_features], n_features, standardize)
        # Cross-products of the held-out rows centred on the training means, the fit's intercept.
        held_out = test_products - np.outer(test_sum, shift) - np.outer(shift, test_sum)
        held_out += test_total * np.outer(shift, shift)
        rmse += _held_out_rmse(held_out, test_total, _solve_path(part, grid))
    curve = pd.DataFrame(
        {"alpha": grid, "n_selected": np.count_nonzero(np.any(coefs != 0, axis=0), axis=0), "rmse": rmse / len(splits)}
    )
    return curve, coefs


def _centred(X, Y, sample_weight=None):
    """``[X Y]`` minus its (weighted) column means, and the means of ``X``."""
    x_mean = np.average(X, axis=0, weights=sample_weight)
    return np.hstack([X - x_mean, Y - np.average(Y, axis=0, weights=sample_weight)]), x_mean


def _weighted(Z, sample_weight):
    """``Z`` with every row multiplied by its weight, and the total weight (None: weights of 1)."""
    if sample_weight is None:
        return Z, len(Z)
    return Z * sample_weight[:, None], sample_weight.sum()


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


def _solve_path(stats, grid, tol=1e-4):
    """LASSO path (one target) or multi-task LASSO path, (n_targets, n_features, n_alphas).

    One target goes to :func:`~sklearn.linear_model.lasso_path` with the Gram matrix. It is
    given a square root ``F`` of the cross-products (``FᵀF = C·m/n``, ``m = p + 1`` rows) in
    place of the ``n`` samples: the objective ``‖Fy − Fx·w‖²/(2m) + α‖w‖₁`` equals the
    full-data one at every ``w`` and the tolerance (relative to ``‖y‖²``) scales alike, so the
    solver runs the very iterations it would run on the data. Coefficients are returned in the
    original feature scale.
    """
    C, n_samples = stats["C"], stats["n_samples"]
    n_features = len(stats["x_scale"])
    if len(C) - n_features == 1:
        F = _gram_root(C) * np.sqrt(len(C) / n_samples)
        Xf, yf = np.asfortranarray(F[:, :n_features]), F[:, n_features]
        _, coefs, _ = lasso_path(Xf, yf, alphas=grid, precompute=Xf.T @ Xf, Xy=Xf.T @ yf, tol=tol)
        coefs = coefs[None]
    else:
        coefs = _multitask_path(C, n_samples, n_features, grid, tol)
    return coefs / stats["x_scale"][None, :, None]


def _multitask_path(C, n_samples, n_features, grid, tol, max_iter=1_000):
    """Multi-task (L2,1) LASSO path by accelerated proximal gradient on the Gram matrix.

    Minimises ``‖Y − XW‖²/2 + nα·Σ_j ‖W_j‖₂`` (n times scikit-learn's objective) with FISTA and
    gradient-based adaptive restart: one ``G @ W`` product (level-3 BLAS, vectorised over the
    features and outputs) and a group soft-threshold per iteration. Each α starts from the
    previous solutions extrapolated along the path, and stops on scikit-learn's rule for 2-D
    ``y``: a duality gap (its formulation) at most ``tol·‖Y‖²``. On dense paths of correlated
    filters, block coordinate descent (scikit-learn's compiled one, run on a square root of
    ``C``) took 5-10 times longer in our measurements, and stopped at its iteration limit where
    filters were nearly collinear. ``max_iter`` is scikit-learn's default for its LASSO solvers:
    on MobileFaceNet's 50 layers and a 7-class target (450 images) a cap of 10 000 gave the same
    knees in every layer and took 1.7 times longer (196 s against 113 s), the extra iterations
    going to alphas that had not converged in 1 000.
    """
    gram, xy = C[:n_features, :n_features], C[:n_features, n_features:]
    yy = np.trace(C[n_features:, n_features:])
    lipschitz = scipy.linalg.eigvalsh(gram, subset_by_index=[n_features - 1, n_features - 1])[0]
    coefs = np.zeros((xy.shape[1], n_features, len(grid)))
    if lipschitz <= 0:
        return coefs
    # The product by the Gram matrix is the cost of an iteration; in float32 it takes about half
    # the time and resolves the gradient to ~1e-7, enough until the gap nears that level (the
    # gap itself is always evaluated in float64).
    gram32 = gram.astype(np.float32)
    W = np.zeros_like(xy)
    for i, alpha in enumerate(grid):
        penalty = alpha * n_samples
        if i >= 2 and grid[i - 1] != grid[i - 2]:
            # The path is smooth in log α between changes of support.
            ratio = np.log(alpha / grid[i - 1]) / np.log(grid[i - 1] / grid[i - 2])
            W = W + ratio * (W - coefs[:, :, i - 2].T)
        V, momentum, n_iter = W, 1.0, 0
        while (gap := _multitask_gap(W, gram @ W, xy, yy, penalty)) > tol * yy and n_iter < max_iter:
            product = gram32 if gap > 1e-5 * yy else gram
            for _ in range(5):
                step = V - (product @ V.astype(product.dtype, copy=False) - xy) / lipschitz
                norms = np.sqrt(np.einsum("ij,ij->i", step, step))
                shrink = np.maximum(1 - penalty / lipschitz / np.maximum(norms, np.finfo(float).tiny), 0)
                W_next = step * shrink[:, None]
                next_momentum = (1 + np.sqrt(1 + 4 * momentum**2)) / 2
                if np.vdot(V - W_next, W_next - W) > 0:
                    V, next_momentum = W_next, 1.0
                else:
                    V = W_next + (momentum - 1) / next_momentum * (W_next - W)
                W, momentum = W_next, next_momentum
            n_iter += 5
        if n_iter >= max_iter:
            warnings.warn(
                f"Multi-task LASSO did not converge in {max_iter} iterations at alpha={alpha:.3g}; "
                "nearly collinear features make the path hard to solve.",
                ConvergenceWarning,
            )
        coefs[:, :, i] = W.T
    return coefs


def _multitask_gap(W, gram_w, xy, yy, penalty):
    """Duality gap of the multi-task LASSO, scikit-learn's formulation, from the cross-products."""
    residual_x = xy - gram_w
    residual_norm2 = yy - 2 * np.vdot(W, xy) + np.vdot(W, gram_w)
    residual_y = yy - np.vdot(W, xy)
    dual_norm = np.sqrt(np.max(np.einsum("ij,ij->i", residual_x, residual_x)))
    scale = penalty / dual_norm if dual_norm > penalty else 1.0
    primal = 0.5 * residual_norm2 + penalty * np.sum(np.sqrt(np.einsum("ij,ij->i", W, W)))
    dual = -0.5 * scale**2 * residual_norm2 + scale * residual_y
    return primal - dual


def _gram_root(C):
    """Upper factor ``F`` with ``FᵀF = C`` for a positive semi-definite ``C``."""
    try:
        return scipy.linalg.cholesky(C, lower=False)
    except np.linalg.LinAlgError:
        # Singular cross-products (constant or duplicated filters, fewer samples than features)
        # have no Cholesky factor; the eigendecomposition gives a square root all the same.
        eigenvalues, eigenvectors = np.linalg.eigh(C)
        return np.sqrt(np.clip(eigenvalues, 0, None))[:, None] * eigenvectors.T


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


def _first_to_enter(X, Y, standardize, sample_weight=None):
    """Index of the feature with the largest ``‖X_jᵀY‖₂``: the first to enter the LASSO path."""
    Z, x_mean = _centred(X, Y, sample_weight)
    weighted, total = _weighted(Z, sample_weight)
    stats = _moments(Z.T @ weighted, total, x_mean, X.shape[1], standardize)
    return int(np.argmax(_correlation_norms2(stats)))
