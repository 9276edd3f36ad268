"""KernelSHAP as a constrained regression, from shard-additive statistics.

With A = E_p[z z^T] and b = E_p[z (v(z) - v(0))] (one column per class), the Shapley values solve

    min_phi E_p[(v(z) - v(0) - z^T phi)^2]   subject to   1^T phi = v(1) - v(0),

    phi = A^-1 (b - 1 (1^T A^-1 b - (v(1) - v(0))) / (1^T A^-1 1)).

A and b are expectations, so shards return sums: exactly weighted sums over enumerated coalitions
(weights p(z)) and w(|z|)-weighted sums over sampled ones (the importance weight of the sampling
law, :func:`~shapfleet.workers.engine.design.sampling_weights`; the reducer scales them by share / N_S). Summing the
shards in index order gives the single-process statistics, hence the same phi. Sampled rows are also
kept (as packed bits and their centred values) so that the reducer can form per-group statistics for
the delete-a-group jackknife: with G groups of sampled pairs,

    Var(phi) ~ (G - 1) / G * sum_g (phi_(-g) - mean_g phi_(-g))^2.

Enumerated coalitions are not random and contribute no variance: an exact answer has std 0.
Enumerated rows are kept too (packed bits and values), for the third-order surrogate of
:mod:`shapfleet.workers.engine.interactions`, which ``estimate`` fits instead of the additive one when the
``estimator`` setting asks for it. All arithmetic is float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from shapfleet.errors import EstimationError

from . import interactions, kriging
from .design import CoalitionDesign, sampling_weights
from .threads import one_blas_thread

#: Above this condition number the regression is treated as singular.
MAX_CONDITION = 1e12


@dataclass
class ShardStatistics:
    """One shard's additive statistics (M players, K classes)."""

    shard_index: int
    n_coalitions: int
    n_evaluations: int
    enumerated_zz: np.ndarray  # M x M, sum of p(z) z z^T over enumerated coalitions
    enumerated_zy: np.ndarray  # M x K, sum of p(z) z (v(z) - v(0))
    sampled_zz: np.ndarray  # M x M, sum of w(|z|) z z^T over sampled coalitions
    sampled_zy: np.ndarray  # M x K, sum of w(|z|) z (v(z) - v(0))
    sampled_count: int
    sampled_pair: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # n_s, each row's raw pair position
    sampled_bits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))  # n_s x ceil(M/8)
    sampled_y: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # n_s x K
    enumerated_bits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))  # n_e x ceil(M/8)
    enumerated_y: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # n_e x K
    _pending: list = field(default_factory=list, init=False, repr=False)
    _pending_enumerated: list = field(default_factory=list, init=False, repr=False)

    @classmethod
    def zeros(cls, shard_index: int, n_players: int, n_classes: int) -> "ShardStatistics":
        m, k = n_players, n_classes
        return cls(shard_index, 0, 0, np.zeros((m, m)), np.zeros((m, k)), np.zeros((m, m)), np.zeros((m, k)), 0,
                   np.zeros(0, np.int64), np.zeros((0, (m + 7) // 8), np.uint8), np.zeros((0, k)),
                   np.zeros((0, (m + 7) // 8), np.uint8), np.zeros((0, k)))

    def add_enumerated(self, z: np.ndarray, weights: np.ndarray, y: np.ndarray) -> None:
        zf = z.astype(np.float64)
        weighted = zf * weights[:, None]
        self.enumerated_zz += weighted.T @ zf
        self.enumerated_zy += weighted.T @ y
        self.n_coalitions += len(z)
        self._pending_enumerated.append((np.packbits(z, axis=1), y))

    def add_sampled(self, z: np.ndarray, pairs: np.ndarray, y: np.ndarray) -> None:
        zf = z.astype(np.float64)
        weighted = zf * sampling_weights(z.shape[1], z.sum(axis=1))[:, None]
        self.sampled_zz += weighted.T @ zf
        self.sampled_zy += weighted.T @ y
        self.sampled_count += len(z)
        self.n_coalitions += len(z)
        self._pending.append((np.asarray(pairs, np.int64), np.packbits(z, axis=1), y))

    def _flush(self) -> None:
        """Append the rows added since the last flush (one concatenation, not one per batch)."""
        if self._pending:
            pairs, bits, ys = zip(*self._pending)
            self.sampled_pair = np.concatenate([self.sampled_pair, *pairs])
            self.sampled_bits = np.concatenate([self.sampled_bits, *bits])
            self.sampled_y = np.concatenate([self.sampled_y, *ys])
            self._pending = []
        if self._pending_enumerated:
            bits, ys = zip(*self._pending_enumerated)
            self.enumerated_bits = np.concatenate([self.enumerated_bits, *bits])
            self.enumerated_y = np.concatenate([self.enumerated_y, *ys])
            self._pending_enumerated = []

    def to_arrays(self) -> dict[str, np.ndarray]:
        self._flush()
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self) if f.init}

    @classmethod
    def from_arrays(cls, arrays) -> "ShardStatistics":
        values = {f.name: arrays[f.name] for f in fields(cls) if f.init}
        for name in ("shard_index", "n_coalitions", "n_evaluations", "sampled_count"):
            values[name] = int(values[name])
        return cls(**values)


def combine(shards: list[ShardStatistics], n_shards: int) -> ShardStatistics:
    """Sum shard statistics in shard-index order after checking that indices 0..n_shards-1 each
    arrived exactly once (a duplicate or a missing shard is an error, never silently absorbed)."""
    indices = sorted(s.shard_index for s in shards)
    if indices != list(range(n_shards)):
        raise EstimationError(f"expected shard statistics 0..{n_shards - 1} once each, got indices {indices}")
    ordered = sorted(shards, key=lambda s: s.shard_index)
    for shard in ordered:
        shard._flush()
    total = ordered[0]
    total = ShardStatistics(-1, total.n_coalitions, total.n_evaluations, total.enumerated_zz.copy(),
                            total.enumerated_zy.copy(), total.sampled_zz.copy(), total.sampled_zy.copy(),
                            total.sampled_count, total.sampled_pair, total.sampled_bits, total.sampled_y,
                            total.enumerated_bits, total.enumerated_y)
    for shard in ordered[1:]:
        total.n_coalitions += shard.n_coalitions
        total.n_evaluations += shard.n_evaluations
        total.enumerated_zz += shard.enumerated_zz
        total.enumerated_zy += shard.enumerated_zy
        total.sampled_zz += shard.sampled_zz
        total.sampled_zy += shard.sampled_zy
        total.sampled_count += shard.sampled_count
        total.sampled_pair = np.concatenate([total.sampled_pair, shard.sampled_pair])
        total.sampled_bits = np.concatenate([total.sampled_bits, shard.sampled_bits])
        total.sampled_y = np.concatenate([total.sampled_y, shard.sampled_y])
        total.enumerated_bits = np.concatenate([total.enumerated_bits, shard.enumerated_bits])
        total.enumerated_y = np.concatenate([total.enumerated_y, shard.enumerated_y])
    return total


def restrict(stats: ShardStatistics, design: CoalitionDesign) -> ShardStatistics:
    """The statistics of ``design``'s coalitions alone, from combined statistics whose rows may
    include more: the rounds of a ``--target-std`` run evaluate the designs of growing budgets, and a
    row sampled for an earlier design is dropped when its size has been enumerated since (the
    enumerated row replaces it) or it lies past the final design's raw positions. The sums are
    rebuilt from the rows kept, in their order; ``n_evaluations`` keeps every evaluation spent."""
    stats._flush()
    m, k = design.n_players, stats.sampled_zy.shape[1]
    z_e = np.unpackbits(stats.enumerated_bits, axis=1, count=m).astype(bool)
    z_s = np.unpackbits(stats.sampled_bits, axis=1, count=m).astype(bool)
    kept = ShardStatistics.zeros(-1, m, k)
    if len(z_e):
        kept.add_enumerated(z_e, design.kernel_probability(z_e.sum(axis=1)), stats.enumerated_y)
    rows = design.keeps(stats.sampled_pair, z_s.sum(axis=1))
    if rows.any():
        kept.add_sampled(z_s[rows], stats.sampled_pair[rows], stats.sampled_y[rows])
    kept.n_evaluations = stats.n_evaluations
    kept._flush()
    return kept


def solve_constrained(a: np.ndarray, b: np.ndarray, total: np.ndarray, check: bool = True) -> np.ndarray:
    """phi = A^-1 (b - 1 (1^T A^-1 b - total) / (1^T A^-1 1)): the minimiser of the quadratic form
    phi^T A phi - 2 b^T phi subject to 1^T phi = total, column by column. Arrays in, array out.

    ``check`` tests A's condition number first (an SVD: the jackknife's replicates skip it, since
    their A differs from the checked one by a small fraction of the samples)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    m = a.shape[0]
    if m == 0:
        raise EstimationError("there are no superpixels to explain")
    condition = np.linalg.cond(a) if check else 1.0
    if not np.isfinite(condition) or condition > MAX_CONDITION:
        raise EstimationError(
            "the coalitions evaluated do not determine every superpixel's value (the regression is "
            f"singular, condition number {condition:.3g}); increase nsamples or use fewer superpixels"
        )
    try:
        solved = np.linalg.solve(a, np.column_stack([b, np.ones(m)]))
    except np.linalg.LinAlgError as e:
        raise EstimationError("the regression is singular; increase nsamples or use fewer superpixels") from e
    a_inv_b, a_inv_1 = solved[:, :-1], solved[:, -1]
    correction = (a_inv_b.sum(axis=0) - np.asarray(total, dtype=np.float64)) / a_inv_1.sum()
    return a_inv_b - np.outer(a_inv_1, correction)


def _regression(design: CoalitionDesign, stats: ShardStatistics, sampled_zz: np.ndarray,
                sampled_zy: np.ndarray, n_sampled: int) -> tuple[np.ndarray, np.ndarray]:
    scale = design.sampled_share / n_sampled if n_sampled else 0.0
    return stats.enumerated_zz + scale * sampled_zz, stats.enumerated_zy + scale * sampled_zy


@dataclass(frozen=True)
class Estimate:
    values: np.ndarray  # M x K
    std: np.ndarray  # M x K (0 where exact; NaN where fewer than 2 sample groups)
    additivity_residual: np.ndarray  # K: sum(values) - (v(1) - v(0))
    estimator: str = "linear"  # the fit used: "linear" (additive), "cubic" (third-order surrogate) or "kriging"


def estimate(design: CoalitionDesign, stats: ShardStatistics, v_empty: np.ndarray, v_full: np.ndarray,
             estimator: str = "linear", adjacency: np.ndarray | None = None) -> Estimate:
    """Shapley values and standard errors from combined statistics (the delete-a-group jackknife;
    kriging's are its posterior standard deviations).

    ``estimator``: ``linear`` is KernelSHAP's additive fit (shap's KernelExplainer); ``cubic`` fits
    the third-order surrogate of :mod:`shapfleet.workers.engine.interactions`; ``kriging`` the Gaussian-process
    model of :mod:`shapfleet.workers.engine.kriging`; ``auto`` picks kriging where
    :func:`~shapfleet.workers.engine.kriging.use_kriging` allows it, else the surrogate where
    :func:`~shapfleet.workers.engine.interactions.use_interactions` says it is determined. A fit too
    ill-conditioned to solve falls back to the additive one. ``adjacency`` (M x M bool, which
    players' superpixels touch; the plan's ``player_adjacency``) gives kriging its local terms."""
    with one_blas_thread():  # see shapfleet.workers.engine.threads: spinning BLAS threads would slow the next model calls
        return _estimate(design, stats, v_empty, v_full, estimator, adjacency)


def _estimate(design: CoalitionDesign, stats: ShardStatistics, v_empty: np.ndarray, v_full: np.ndarray,
              estimator: str, adjacency: np.ndarray | None) -> Estimate:
    v_empty = np.asarray(v_empty, dtype=np.float64)
    v_full = np.asarray(v_full, dtype=np.float64)
    total = v_full - v_empty
    m = design.n_players
    stats._flush()  # every fit, and the additive fit's jackknife, reads the rows
    if m == 1:
        values = total[None, :].copy()
        return Estimate(values, np.zeros_like(values), np.zeros_like(total))
    for name, module, chosen in (("kriging", kriging, kriging.use_kriging(design, estimator)),
                                 ("cubic", interactions, interactions.use_interactions(design, estimator))):
        if not chosen:
            continue
        fitted = module.fit(
            design, np.unpackbits(stats.enumerated_bits, axis=1, count=m).astype(bool), stats.enumerated_y,
            np.unpackbits(stats.sampled_bits, axis=1, count=m).astype(bool), stats.sampled_y,
            design.groups_of(stats.sampled_pair), total, **({"adjacency": adjacency} if module is kriging else {}))
        if fitted is not None:
            values, std = fitted
            return Estimate(values, std, values.sum(axis=0) - total, name)
        break  # the chosen fit was singular: the additive fit follows
    a, b = _regression(design, stats, stats.sampled_zz, stats.sampled_zy, stats.sampled_count)
    values = solve_constrained(a, b, total)
    std = np.zeros_like(values) if stats.sampled_count == 0 else _jackknife_std(design, stats, total)
    return Estimate(values, std, values.sum(axis=0) - total)


def _jackknife_std(design: CoalitionDesign, stats: ShardStatistics, total: np.ndarray) -> np.ndarray:
    groups = design.n_groups
    m, k = stats.sampled_zy.shape
    if groups < 2:
        return np.full((m, k), np.nan)
    z = np.unpackbits(stats.sampled_bits, axis=1, count=m).astype(np.float64)
    weighted = z * sampling_weights(m, z.sum(axis=1).astype(np.int64))[:, None]
    membership = design.groups_of(stats.sampled_pair)
    replicates = []
    for g in range(groups):
        rows = membership == g
        zg, wg = z[rows], weighted[rows]
        a, b = _regression(design, stats, stats.sampled_zz - wg.T @ zg, stats.sampled_zy - wg.T @ stats.sampled_y[rows],
                           stats.sampled_count - int(rows.sum()))
        replicates.append(solve_constrained(a, b, total, check=False))
    replicates = np.stack(replicates)
    variance = (groups - 1) / groups * ((replicates - replicates.mean(axis=0)) ** 2).sum(axis=0)
    return np.sqrt(variance)
