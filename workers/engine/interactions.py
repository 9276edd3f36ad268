"""Shapley values of a fitted third-order surrogate: KernelSHAP that also models interactions.

KernelSHAP fits an additive surrogate g(z) = z^T phi to the game under the Shapley kernel's weights.
Here the surrogate also carries every pair and triple of players,

    g(z) = sum_T c_T prod_{i in T} z_i     over the p = M + C(M,2) + C(M,3) sets T with 1 <= |T| <= 3,

fitted by the same weighted least squares with the same constraint g(1) = sum_T c_T = v(1) - v(0),
and the answer is the Shapley value of the fitted surrogate, known in closed form:

    phi_i = sum_{T containing i} c_T / |T|.

**Why this is still KernelSHAP.** With every coalition in the regression, the residual v - g is
orthogonal (under the kernel weights) to all of g's terms, the linear ones included, so its own
KernelSHAP regression -- which equals its Shapley values -- is zero: phi(v) = phi(g). The estimate is
therefore exact when the design is complete, like the additive fit. With sampled coalitions it is
much less noisy whenever the game's interactions are mostly of low order, since they are fitted
rather than left in the residual. (Pair terms alone change nothing: with complementary pairs the
additive fit already has the Shapley values of the best pairwise surrogate, which is why the
surrogate jumps from order 1 to order 3.)

**Regularisation.** Triples are many (C(12,3) = 220 for 12 superpixels), so a ridge penalty
lambda * ||c_triples||^2 keeps them from fitting noise when the coalitions are few:
lambda = RIDGE * (p / n) * (1 - n / (2^M - 2)) * mean(A_ii over players), which vanishes as the
design approaches complete enumeration, so the exactness above holds. Pairs and single players are
not penalised (penalising them too made the errors on the benchmark's cases 1.5 to 2 times larger).

**Error bars** are the delete-a-group jackknife of the sampled rows' groups, as for the additive fit,
without refitting: dropping a group changes the coefficients by dc_g = H_g^-1 (r_g - 1 dmu), with r_g
the change in the weighted residual sums and H_g^-1 from H's factorisation by the Woodbury identity
(a first-order shortcut that skipped the Woodbury term underestimated the spread by half).

All arithmetic is float64.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

from .cholesky import Cholesky
from .design import CoalitionDesign, sampling_weights

#: The ridge strength on triple terms relative to the mean diagonal of the players' block, per unit
#: of p / n (chosen on the benchmark's exact cases; 0.003 to 0.03 all beat the additive fit there).
RIDGE = 0.01
#: Largest M for which ``auto`` fits the third-order surrogate (p = 696 terms at M = 16).
MAX_PLAYERS = 16
#: Largest M that ``cubic`` accepts (p = 2,324 terms at M = 24: a 43 MB normal matrix; at M = 49 it
#: would be 3 GB). Planning refuses more, before any evaluation.
MAX_CUBIC_PLAYERS = 24
#: Above this (estimated) condition number the surrogate is not used.
MAX_CONDITION = 1e12


def n_terms(n_players: int) -> int:
    """p = M + C(M,2) + C(M,3)."""
    m = n_players
    return m + math.comb(m, 2) + math.comb(m, 3)


def use_interactions(design: CoalitionDesign, estimator: str) -> bool:
    """Whether the reduce fits the third-order surrogate: for ``cubic`` when 3 <= M <= 24 (planning
    refuses more), never for ``linear`` or ``kriging``; for ``auto`` (where kriging was not chosen)
    when M <= 16, the design is not already exact (both fits then give the exact values, the
    additive one sooner), and there are at least as many coalitions as terms.
    (With fewer, the penalised fit still beat the additive one on the benchmark's cases, but by
    less than its solve costs on a fast model.)"""
    m = design.n_players
    if estimator not in ("auto", "cubic") or m < 3:
        return False
    if estimator == "cubic":
        return m <= MAX_CUBIC_PLAYERS
    return m <= MAX_PLAYERS and not design.is_exact and design.n_coalitions >= n_terms(m)


@lru_cache(maxsize=8)
def _triples(n_players: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.array(np.triu_indices(n_players, 1))
    triples = np.array(list(itertools.combinations(range(n_players), 3)), dtype=np.int64).reshape(-1, 3).T
    return pairs, triples


def features(z: np.ndarray) -> np.ndarray:
    """The surrogate's terms for coalitions ``z`` (``n x M`` bool): ``n x p`` float64, columns in the
    order players, pairs (i < j), triples (i < j < k)."""
    zf = np.asarray(z, dtype=np.float64)
    pairs, triples = _triples(zf.shape[1])
    pair_terms = zf[:, pairs[0]] * zf[:, pairs[1]]
    triple_terms = zf[:, triples[0]] * zf[:, triples[1]] * zf[:, triples[2]]
    return np.hstack([zf, pair_terms, triple_terms])


def shapley_map(n_players: int) -> np.ndarray:
    """T (M x p) with phi = T c: each term's coefficient shared equally among its members."""
    m = n_players
    pairs, triples = _triples(m)
    t = np.zeros((m, n_terms(m)))
    t[np.arange(m), np.arange(m)] = 1.0
    columns = np.arange(m, m + pairs.shape[1])
    t[pairs[0], columns] = t[pairs[1], columns] = 0.5
    columns = np.arange(m + pairs.shape[1], n_terms(m))
    for row in triples:
        t[row, columns] = 1.0 / 3.0
    return t


def fit(design: CoalitionDesign, z_enumerated: np.ndarray, y_enumerated: np.ndarray, z_sampled: np.ndarray,
        y_sampled: np.ndarray, sampled_group: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Shapley values (M x K) and jackknife standard errors of the third-order surrogate fitted to
    the enumerated rows (weights p(z)) and the sampled rows (weights w(|z|) share / N_S each), with
    ``y = v(z) - v(0)``. None when the penalised normal matrix is singular or too ill-conditioned
    (the caller then uses the additive fit).

    Its caller, :func:`shapfleet.workers.engine.estimation.estimate`, keeps BLAS on one thread: at these
    sizes (p <= 696) more threads make the fit slower, not faster."""
    m = design.n_players
    enumerated_weight = design.kernel_probability(z_enumerated.sum(axis=1))
    n_sampled = len(z_sampled)
    importance = sampling_weights(m, z_sampled.sum(axis=1))  # w(|z|) of each sampled row
    sampled_weight = importance * (design.sampled_share / n_sampled if n_sampled else 0.0)
    x = features(np.concatenate([z_enumerated, z_sampled]))
    weights = np.concatenate([enumerated_weight, sampled_weight])
    root_weighted = x * np.sqrt(weights)[:, None]
    h = root_weighted.T @ root_weighted  # X^T W X, as one symmetric product
    b = (x * weights[:, None]).T @ np.concatenate([y_enumerated, y_sampled])

    p, n = h.shape[0], len(x)
    strength = RIDGE * p / n * max(0.0, 1.0 - n / (2.0 ** m - 2)) * float(np.mean(np.diag(h)[:m]))
    first_triple = m + math.comb(m, 2)
    h[np.arange(first_triple, p), np.arange(first_triple, p)] += strength

    try:
        factor = Cholesky(h)
    except np.linalg.LinAlgError:
        return None
    diagonal = np.abs(np.diag(factor.lower))
    if not np.all(np.isfinite(diagonal)) or diagonal.min() <= 0 or (diagonal.max() / diagonal.min()) ** 2 > MAX_CONDITION:
        return None
    solved = factor.solve(np.column_stack([b, np.ones(p)]))
    coefficients = _constrain(solved[:, :-1], solved[:, -1], np.asarray(total, dtype=np.float64))
    t = shapley_map(m)
    values = t @ coefficients
    # The jackknife takes the sampled rows with their importance folded in (sqrt(w) x, sqrt(w) y),
    # so that every row's weight is the common scale share / N_S it assumes.
    root = np.sqrt(importance)[:, None]
    x_sampled = x[len(z_enumerated):] * root
    std = _jackknife_std(design, factor, solved[:, -1], x_sampled, y_sampled * root, sampled_group, coefficients, t)
    return values, std


def _constrain(h_inv_rhs: np.ndarray, h_inv_1: np.ndarray, target: np.ndarray) -> np.ndarray:
    """H^-1 (rhs - 1 mu) from H^-1 rhs and H^-1 1, with mu chosen so each column sums to ``target``."""
    return h_inv_rhs - np.outer(h_inv_1, (h_inv_rhs.sum(axis=0) - target) / h_inv_1.sum())


def _jackknife_std(design: CoalitionDesign, factor: Cholesky, h_inv_1: np.ndarray, x_sampled: np.ndarray,
                   y_sampled: np.ndarray, sampled_group: np.ndarray, coefficients: np.ndarray,
                   t: np.ndarray) -> np.ndarray:
    """Delete-a-group jackknife of the sampled rows without refitting: replicate g's coefficients
    are c + dc_g with H_g dc_g = r_g - 1 dmu exactly, where r_g is the change of the weighted
    residual sums X^T W (y - X c) when group g is dropped (and the others reweighted to share / (N_S - n_g);
    ``x_sampled`` and ``y_sampled`` carry each row's sqrt(w(|z|)), so one scale serves every row),
    and H_g^-1 = (H - s_g X_g^T X_g)^-1 comes from H's factorisation by the Woodbury identity.
    (It neglects only the reweighting's effect on H, a relative change of n_g / N_S.)

    Every product with H^-1 goes through U = H^-1 X_S^T and ``h_inv_1`` = H^-1 1: since
    r_g = (s_g - s) X_S^T e - s_g X_g^T e_g, with e the residuals, H^-1 r_g = (s_g - s) U e - s_g U_g e_g."""
    m, k = t.shape[0], coefficients.shape[1]
    n_sampled = len(x_sampled)
    if n_sampled == 0:
        return np.zeros((m, k))
    groups = design.n_groups
    if groups < 2:
        return np.full((m, k), np.nan)
    residual = y_sampled - x_sampled @ coefficients  # n x K
    scale = design.sampled_share / n_sampled
    # U = H^-1 X_S^T through H^-1 itself (p solves) and one product: on one BLAS thread 1.4-1.6
    # times as fast as two triangular solves with N_S right-hand sides (p = 696, N_S = 4,000).
    h_inv = factor.solve(np.eye(len(factor.lower)))
    p = len(h_inv)
    u_all = h_inv @ x_sampled.T  # p x n
    # Every group at once: its rows gathered into G x n_max arrays, padded with an all-zero row
    # (index n_sampled), which drops out of every product below.
    members = [np.flatnonzero(sampled_group == g) for g in range(groups)]
    index = np.full((groups, max(len(rows) for rows in members)), n_sampled)
    for g, rows in enumerate(members):
        index[g, :len(rows)] = rows
    x_groups = np.vstack([x_sampled, np.zeros((1, p))])[index]  # G x n x p
    u = np.hstack([u_all, np.zeros((p, 1))])[:, index].transpose(1, 0, 2)  # G x p x n: U_g = H^-1 X_g^T
    residual_groups = np.vstack([residual, np.zeros((1, k))])[index]  # G x n x K
    scale_without = design.sampled_share / (n_sampled - np.array([len(rows) for rows in members]))  # G
    # r_g = (s_g - s) X_S^T e - s_g X_g^T e_g: the other rows' weight goes from s to s_g, the group's to 0.
    dropped, kept = scale_without[:, None, None], (scale_without - scale)[:, None, None]
    change = kept * (x_sampled.T @ residual)[None] - dropped * (x_groups.transpose(0, 2, 1) @ residual_groups)
    h_inv_change = kept * (u_all @ residual)[None] - dropped * (u @ residual_groups)  # G x p x K
    rhs = np.concatenate([change, np.ones((groups, p, 1))], axis=2)  # G x p x (K + 1)
    h_inv_rhs = np.concatenate([h_inv_change, np.broadcast_to(h_inv_1[None, :, None], (groups, p, 1))], axis=2)
    # Woodbury: H_g^-1 v = H^-1 v + U_g (I / s_g - X_g U_g)^-1 U_g^T v.
    inner = np.eye(index.shape[1])[None] / scale_without[:, None, None] - x_groups @ u
    solved = h_inv_rhs + u @ np.linalg.solve(inner, u.transpose(0, 2, 1) @ rhs)
    change_g, ones_g = solved[:, :, :k], solved[:, :, k]  # H_g^-1 r_g and H_g^-1 1
    shifts = change_g - ones_g[:, :, None] * (change_g.sum(axis=1) / ones_g.sum(axis=1)[:, None])[:, None, :]
    replicates = t @ shifts  # G x M x K: each replicate minus the estimate
    variance = (groups - 1) / groups * ((replicates - replicates.mean(axis=0)) ** 2).sum(axis=0)
    return np.sqrt(variance)
