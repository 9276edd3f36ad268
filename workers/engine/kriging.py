"""Shapley values by kriging: a Gaussian-process model of the game's odd part, fitted to the pairs.

**Only the odd part matters.** Write players as x = 2z - 1 in {-1, +1}^M and split the game into
its parts that are even and odd under complementation, v(z) = e(x) + h(x) with
h(x) = (v(z) - v(1 - z)) / 2. The even part has Shapley value zero (its marginal contributions
cancel between a coalition and its complement, which the Shapley weights treat alike), so
phi(v) = phi(h). In the Fourier basis chi_T(x) = prod_{i in T} x_i, h has only odd-degree terms,
h = sum_{|T| odd} f_T chi_T, and each term's Shapley value is known:

    phi_i(chi_T) = 2 / |T|   for i in T,   so   phi_i = sum_{T odd, i in T} 2 f_T / |T|.

The design evaluates coalitions in complementary pairs, so every pair gives one exact observation
h(x) = (y(z) - y(1 - z)) / 2 (y = v - v(0)), and the grand coalition gives h(1) = (v(1) - v(0)) / 2,
which is the efficiency constraint.

**The model.** The degree-1 coefficients (the additive part, what KernelSHAP fits) scatter about
a common mean with a flat prior, beta_i ~ N(mu, s^2 (1 / M + t)), t chosen by REML (see
:func:`_shrink`; a large t is KernelSHAP's flat prior); the higher odd degrees are a zero-mean
Gaussian process with independent coefficients, f_T ~ N(0, s^2 rho^((|T| - 3) / 2) / C(M, |T|))
for |T| = 3, 5, ...: each degree carries total variance s^2 rho^((d-3)/2) spread evenly over its
C(M, d) terms, so higher orders are assumed smaller by a factor rho per step. (The kernel's degree-1
part is the 1 / M above; see :func:`_coefficient_variance`.) The covariance of h at two points
depends only on how many players they agree on, a (a Krawtchouk polynomial per degree), so the n x n kernel matrix costs
nothing to form and the fit costs O(n^3) in the number of distinct pairs n, whatever M is. The
estimate is the posterior mean (universal kriging): with flat linear terms, generalised least
squares for them and then the interpolating residual, alpha = K^-1 (d - X beta),

    phi = 2 beta + A^T alpha,   A_ji = x_ji sum_{d odd} (2 w_d / d) e_{d-1}(x_j without i),

with w_d the per-coefficient variance and e_k the elementary symmetric polynomials; with the
shrinkage t, beta becomes its posterior mean w and alpha follows (:func:`_shrink`). The decay rho
is chosen per job by restricted maximum likelihood (REML, shared by the classes, each with its own
scale s^2) over :data:`RHO_GRID`, together with the product kernel's candidates below, all with
flat linear terms; then t for the chosen kernel, by REML again, over :data:`LINEAR_PRIOR_GRID`.

**Relevance (the product kernel).** Superpixels differ: on a digit, the strokes' superpixels carry
the interactions and the background's none. The second family of priors gives each player a weight
a_l in (0, 1) and each odd set the product of its members' weights, f_T ~ N(0, s^2 prod_{l in T} a_l),
so interactions among relevant players are expected and those involving an irrelevant one are not.
Its kernel is again closed form: with u_l = x_l x'_l in {-1, +1},

    k(x, x') = (prod_l (1 + a_l u_l) - prod_l (1 - a_l u_l)) / 2 = C sinh(sum_l atanh(a_l) u_l),

one matrix product (C a constant the scale absorbs). The Shapley map and the prior variance of phi_i
sum (2 / |T|) w_T over the sets holding i, which the identity 1 / |T| = int_0^1 t^(|T| - 1) dt turns
into a one-dimensional integral of a product, taken by Gauss-Legendre quadrature
(:data:`QUADRATURE_NODES`):

    A_ji = 2 a_i x_ji int_0^1 even_{l != i}[prod_l (1 + t a_l x_jl)] dt,

with even[.] the part of even degree, (prod(1 + .) + prod(1 - .)) / 2. The weights are
a_l = min(0.95, c theta_l / M) with theta_l proportional to (|phi_l| / mean |phi| + 0.05)^gamma, phi
being the isotropic fit's values on REML's subset (a pilot estimate from the same evaluations), and
(gamma, c) taken from :data:`RELEVANCE_GRID`. REML chooses among both families' candidates at once:
their restricted likelihoods are those of the same observations under the same fixed effects.

**Edge pairs.** The pairs of sizes 1 and M - 1 (a single superpixel shown, or a single one hidden)
lie next to the grand coalition, whose h is known exactly, so under any of these kernels each is
taken for a near-exact measurement of one additive term. On a photo under a convnet it is not one:
removing one superpixel from the full image moves the output by much else than that superpixel's
Shapley value. These points may therefore carry independent noise of variance nu times the
kernel's own (noise of the observation, not part of h: the Shapley map is unchanged), nu chosen by
REML with the isotropic kernel from :data:`EDGE_NOISE_GRID` (0 among them); the product kernels
take the chosen nu. On EfficientNet-Lite0 at 49 superpixels REML chose nu = 0.1 in 10 of 12 fits
(4 seeds, 3 budgets) and the error fell by 9-18% (README, "At 49 and 196 superpixels").

**Local terms.** On a photo, superpixels that touch interact more than far ones. Given the label
map's adjacency, the S connected triples (sets {i, j, k} whose superpixels form a path or a
triangle in it, :func:`connected_triples`) get extra prior variance on top of either kernel's:
f_T gains lam v / S for each of them, v the kernel's variance at a point and lam chosen by REML
from :data:`LOCAL_WEIGHT_GRID` (0 among them) for the chosen kernel and edge noise. With
F_jT = chi_T(x_j) the kernel matrix gains (lam v / S) F F^T, the Shapley map (lam v / S) F G with
G_Ti = 2/3 for i in T, and phi_i's prior variance (lam v / S) (2/3)^2 times the triples holding i
(:class:`LocalTerms`). Pooling 11,641 pairs of the benchmark's EfficientNet case, the additive fit
left 6.4% of the odd part's variance on held-out pairs, of which the connected triples explained
1.7 points and as many random triples 1.3 (README, "At 49 and 196 superpixels").

**Properties.** The fit interpolates every pair it keeps exact: all but the edge pairs where REML
gives those noise, and all of them when every coalition is evaluated (no noise is tried then). So
with every coalition evaluated it returns the game's own Shapley values, and a game whose odd
part is additive (a linear model) is recovered from any design that determines its M linear
terms (REML then takes the largest t, a flat prior in all but name: to 1e-8, tested). With
sampled coalitions it is the Bayes estimate under the prior above, which, unlike a
truncated surrogate (:mod:`shapfleet.workers.engine.interactions`), also accounts for the terms of degree 5
and more instead of letting them alias into the fitted ones.

**Error bars** are the posterior standard deviations of phi at the chosen kernel and t and each
class's REML scale (:func:`_posterior_std`). A delete-a-group jackknife, as the other fits use, was tried
and rejected: this estimate's error falls faster than 1/sqrt(n) as pairs are added, so the
jackknife's spread overstated it about 1.5-fold (1.96 std covered 99.9% of exact values on the
tests' conv model, against 92-97% for the posterior's).

All arithmetic is float64.
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from . import interactions
from .cholesky import Cholesky
from .design import CoalitionDesign
from .sessions import available_cpus

#: The decays rho that REML chooses among (higher odd orders smaller by rho per step of two). Finer
#: between 0.1 and 1, where photos under convnets fall: on EfficientNet-Lite0 at 49 superpixels
#: REML chose 0.4 or 0.5 in 11 of 12 fits (6 seeds, 1,000 and 4,000 evaluations; 0.3 before, the
#: nearest step), and the error fell 6% at 1,000 evaluations (README, "At 49 and 196 superpixels").
RHO_GRID = (0.003, 0.01, 0.03, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
#: The product kernel's (gamma, c): how strongly relevance follows the pilot's |phi|, and the
#: players' weights' scale (about c / M each, so that the expected interaction order stays low).
RELEVANCE_GRID = tuple((gamma, c) for gamma in (0.5, 1.0, 2.0) for c in (1.0, 2.0, 4.0, 8.0))
#: The linear terms' prior variances that REML chooses among, t M (see :func:`_shrink`): each
#: beta_i ~ N(mu, s^2 (1 / M + t)) about a common mean mu with a flat prior, from the kernel's own
#: degree-1 variance alone (t M = 0.001) to a flat prior in all but name (t M = 10^12).
LINEAR_PRIOR_GRID = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e4, 1e12)
#: Gauss-Legendre nodes for the product kernel's integrals over t in [0, 1] (the integrands are
#: products of (1 +- t a_l) with a_l <= 0.95: 24 nodes agree with 128 to 1e-14 at M = 196).
QUADRATURE_NODES = 24
#: Largest M kriging accepts, explicitly and in ``auto`` (the benchmark's cases reach 196; the
#: kernel's tables are exact integer sums over C(M, d), the fit's cost grows as n^3 in the pairs
#: and only as n^2 M in the players).
MAX_PLAYERS = 256
#: Most pairs one kriging fit takes (the fit is O(n^3) in the pairs n). A design with more is fitted
#: by a committee: its sampled pairs split into ceil(n / MAX_PAIRS) chunks by jackknife group, each
#: chunk fitted with the enumerated pairs, the chunks' values combined by inverse posterior variance.
MAX_PAIRS = 2048
#: Most pairs kriging (and ``auto``) fits at all, in committees of up to 8 fits; planning refuses
#: more for an explicit ``kriging`` before evaluating anything. Beyond it ``auto`` uses the
#: cubic surrogate (M <= 16) or the additive fit, whose costs grow only as n.
MAX_COMMITTEE_PAIRS = 8 * MAX_PAIRS
#: REML chooses rho on at most this many of the points (a fixed pseudo-random subset, the grand
#: coalition always in it), then one fit on all of them follows: on the benchmark's cases the subset
#: chose the same rho as all the points in 39 of 42 fits, with the same median errors.
REML_POINTS = 512
#: The noise variances, relative to the kernel's, that REML chooses among for the edge points (the
#: pairs of sizes 1 and M - 1), together with the isotropic kernel's rho (see :func:`_reml_choice`).
EDGE_NOISE_GRID = (0.0, 0.03, 0.1, 0.3, 1.0)
#: The local terms' weights lam that REML chooses among (see :class:`LocalTerms`): the connected
#: triples' total extra prior variance, relative to the kernel's variance at a point.
LOCAL_WEIGHT_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
#: Most local terms a fit takes: they cost an n x S matrix and an n x n x S product (at n = 2,048
#: pairs and S = 4,096, 64 MiB and 34 GFLOP). SLIC's superpixels touch about 6 others, which gives
#: about 15 triples a superpixel (371 at M = 49 on the benchmark's photo); a label map where one
#: region touches hundreds (a frame around a grid) has more, and is fitted without local terms.
MAX_LOCAL_SETS = 4096
#: Relative jitter on the kernel's diagonal, for round-off only.
JITTER = 1e-10


def n_pairs(design: CoalitionDesign) -> int:
    """The complementary pairs a design evaluates (distinct ones may be fewer: sampled pairs can repeat)."""
    return design.n_enumerated // 2 + design.n_pairs


def use_kriging(design: CoalitionDesign, estimator: str) -> bool:
    """Whether the reduce fits by kriging: for ``kriging`` and ``auto`` when 3 <= M <= 256
    (planning refuses an explicit ``kriging`` beyond), the design is not already exact (every fit
    then gives the exact values, the additive one soonest) and has at most
    :data:`MAX_COMMITTEE_PAIRS` pairs; ``auto`` leaves designs with more than :data:`MAX_PAIRS`
    pairs and at most 16 players to the cubic surrogate."""
    m = design.n_players
    if m < 3 or design.is_exact or n_pairs(design) > MAX_COMMITTEE_PAIRS:
        return False
    if estimator == "auto" and m <= interactions.MAX_PLAYERS and n_pairs(design) > MAX_PAIRS:
        return False  # the cubic surrogate's turn: as accurate there, and cheaper
    return m <= MAX_PLAYERS and estimator in ("kriging", "auto")


@lru_cache(maxsize=16)
def _symmetric_sums(n_players: int) -> np.ndarray:
    """E[a, k] = e_k, the k-th elementary symmetric polynomial, of a +-1 vector of length M with a
    entries +1 (a, k = 0..M): sum_r (-1)^r C(M - a, r) C(a, k - r), summed exactly in integers."""
    m = n_players
    # Row a holds the coefficients of (1 + t)^a (1 - t)^(M - a); the next row multiplies by
    # (1 + t) / (1 - t), that is by (1 + t) and then a running sum (dividing by 1 - t), in integers.
    row = [(-1) ** k * math.comb(m, k) for k in range(m + 1)]
    rows = [row]
    for _ in range(m):
        times = [row[k] + (row[k - 1] if k else 0) for k in range(m + 1)]
        row = list(itertools.accumulate(times))
        rows.append(row)
    return np.array([[float(value) for value in row] for row in rows])


@lru_cache(maxsize=64)
def _tables(n_players: int, rho: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For decay ``rho``: the kernel k(a) for two points agreeing on a players (a = 0..M), and the
    Shapley map's factors for an entry x_ji = +1 and = -1 as functions of the number of +1 entries
    in row j (0..M)."""
    m = n_players
    degrees = np.arange(1, m + 1, 2)
    variance = _coefficient_variance(m, rho)[degrees]
    kernel = _symmetric_sums(m)[:, degrees] @ variance
    # e_{d-1} over the other M - 1 players of row j with c entries +1: c - 1 of them +1 when x_ji = +1.
    others = _symmetric_sums(m - 1)[:, degrees - 1] @ (2 * variance / degrees)  # by count of +1 among the M - 1
    plus = np.zeros(m + 1)
    minus = np.zeros(m + 1)
    plus[1:] = others[: m]  # row with c >= 1 entries +1, x_ji = +1: c - 1 of the others are +1
    minus[: m] = -others[: m]  # x_ji = -1: c of the others are +1 (c <= M - 1)
    return kernel, plus, minus


def connected_triples(adjacency: np.ndarray) -> np.ndarray:
    """The sets {i, j, k} of players whose superpixels are connected in the adjacency graph
    (``P x P`` bool): a path i - j - k or a triangle, each set once as a sorted row (S x 3)."""
    adjacency = np.asarray(adjacency, dtype=bool)
    triples = set()
    for middle in range(len(adjacency)):
        for first, last in itertools.combinations(np.flatnonzero(adjacency[middle]).tolist(), 2):
            triples.add(tuple(sorted((first, middle, last))))
    return np.array(sorted(triples), dtype=np.int64).reshape(-1, 3)


class LocalTerms:
    """A fixed family of odd Fourier terms given extra prior variance: the S sets T of one odd size
    d in the rows of ``sets`` (player indices, of ``n_players``), seen at n points through their
    ``features`` F_jT = chi_T(x_j) = prod_{i in T} x_ji (n x S; :meth:`at` forms them). At weight
    c per set (c = lam v / S, see :func:`_with_local`) the kernel matrix gains c F F^T, the Shapley
    map c F G (G_Ti = 2 / d for i in T) and phi_i's prior variance c (2 / d)^2 #{T : i in T}."""

    def __init__(self, sets: np.ndarray, features: np.ndarray, n_players: int) -> None:
        self.sets = np.asarray(sets, dtype=np.int64)
        self.features = features
        self.n_players = n_players
        self._gram: np.ndarray | None = None

    @classmethod
    def at(cls, x: np.ndarray, sets: np.ndarray) -> "LocalTerms":
        """The sets' terms at the points ``x`` (n x M, entries +-1)."""
        sets = np.asarray(sets, dtype=np.int64)
        features = np.ones((len(x), len(sets)))
        for column in sets.T:
            features *= x[:, column]
        return cls(sets, features, x.shape[1])

    def subset(self, points: np.ndarray) -> "LocalTerms":
        """The same sets at the points ``x[points]``."""
        return LocalTerms(self.sets, self.features[points], self.n_players)

    @property
    def gram(self) -> np.ndarray:
        """F F^T (n x n), formed once."""
        if self._gram is None:
            self._gram = self.features @ self.features.T
        return self._gram

    def shapley_map(self) -> np.ndarray:
        """F G (n x M)."""
        membership = np.zeros((len(self.sets), self.n_players))
        np.put_along_axis(membership, self.sets, 2.0 / self.sets.shape[1], axis=1)
        return self.features @ membership

    def prior(self) -> np.ndarray:
        """(2 / d)^2 #{T : i in T} per player."""
        counts = np.bincount(self.sets.ravel(), minlength=self.n_players)
        return (2.0 / self.sets.shape[1]) ** 2 * counts


def _with_local(k: np.ndarray, shapley_map, prior, local: LocalTerms | None, weight: float):
    """The kernel matrix ``k``, Shapley map and prior variances (callables) with the local terms
    added at weight ``weight`` (lam): c = lam v / S per set, v the largest of k's diagonal."""
    if local is None or weight == 0:
        return k, shapley_map, prior
    per_set = weight * float(np.max(np.diag(k))) / len(local.sets)
    return (k + per_set * local.gram, lambda: shapley_map() + per_set * local.shapley_map(),
            lambda: prior() + per_set * local.prior())


def pair_observations(z: np.ndarray, y: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pairs as +-1 points with their first player +1 (n x M) and their odd parts
    h = (y(z) - y(1 - z)) / 2 (n x K), the grand coalition last with h = total / 2. ``z``: every
    evaluated coalition, each with its complement; a pair sampled more than once is one point."""
    flip = ~z[:, 0]
    canonical = np.where(flip[:, None], ~z, z)
    sign = np.where(flip, -1.0, 1.0)
    keys, inverse = np.unique(np.packbits(canonical, axis=1), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    sums = np.zeros((len(keys), y.shape[1]))
    np.add.at(sums, inverse, sign[:, None] * y)
    counts = np.bincount(inverse, minlength=len(keys))
    # A pair seen once gives y(z) - y(1 - z) over 2 rows: the mean of the signed values is h.
    odd = sums / counts[:, None]
    x = np.unpackbits(keys, axis=1, count=z.shape[1]).astype(np.float64) * 2.0 - 1.0
    return np.vstack([x, np.ones((1, z.shape[1]))]), np.vstack([odd, np.asarray(total, np.float64)[None, :] / 2.0])


def fit(design: CoalitionDesign, z_enumerated: np.ndarray, y_enumerated: np.ndarray, z_sampled: np.ndarray,
        y_sampled: np.ndarray, sampled_group: np.ndarray, total: np.ndarray,
        adjacency: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Shapley values (M x K) and posterior standard deviations by kriging, from every evaluated
    coalition with ``y = v(z) - v(0)``. None when the pairs do not determine the linear terms or a
    matrix is singular (the caller then uses the additive fit). ``sampled_group`` is unused: the
    signature is the cubic surrogate's, whose error bars need the groups. ``adjacency`` (M x M
    bool, which players' superpixels touch) gives the local terms' triples; None, or more than
    :data:`MAX_LOCAL_SETS` of them: no local terms. Its caller,
    :func:`shapfleet.workers.engine.estimation.estimate`, keeps BLAS on one thread.

    More than :data:`MAX_PAIRS` pairs are fitted by a committee (see there): chunk c takes the
    sampled rows of the groups g with g mod C = c, and value i of class k is
    sum_c phi_c / var_c / sum_c 1 / var_c, with standard deviation (sum_c 1 / var_c)^-1/2, the
    chunks' errors being independent draws."""
    triples = connected_triples(adjacency) if adjacency is not None else None
    if triples is not None and len(triples) > MAX_LOCAL_SETS:
        triples = None
    chunks = -(-n_pairs(design) // MAX_PAIRS)
    if chunks > 1 and len(z_sampled):
        fits = []
        for chunk in range(chunks):
            rows = sampled_group % chunks == chunk
            fitted = _fit_one(design, z_enumerated, y_enumerated, z_sampled[rows], y_sampled[rows], total, triples)
            if fitted is None:
                return None
            fits.append(fitted)
        return combine_committee(np.stack([values for values, _ in fits]), np.stack([std for _, std in fits]))
    return _fit_one(design, z_enumerated, y_enumerated, z_sampled, y_sampled, total, triples)


def combine_committee(values: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chunks' values and standard deviations (C x M x K) combined by inverse variance: sum_c phi_c /
    var_c / sum_c 1 / var_c with std (sum_c 1 / var_c)^-1/2. A value some chunk has with std 0 (it
    determines it exactly) is the mean of those chunks' values, with std 0."""
    variance = std ** 2
    known = variance <= 0
    precision = np.where(known, 0.0, 1.0 / np.where(known, 1.0, variance))
    any_known = known.any(axis=0)
    total_precision = np.where(any_known, 1.0, precision.sum(axis=0))
    weighted = (values * precision).sum(axis=0) / total_precision
    exact = (values * known).sum(axis=0) / np.maximum(known.sum(axis=0), 1)
    return np.where(any_known, exact, weighted), np.where(any_known, 0.0, 1.0 / np.sqrt(total_precision))


def _fit_one(design: CoalitionDesign, z_enumerated: np.ndarray, y_enumerated: np.ndarray, z_sampled: np.ndarray,
             y_sampled: np.ndarray, total: np.ndarray,
             triples: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """One kriging fit to every given coalition (see :func:`fit`), with local terms on ``triples``
    (S x 3 player indices) unless None or empty."""
    m = design.n_players
    x, odd = pair_observations(np.concatenate([z_enumerated, z_sampled]), np.concatenate([y_enumerated, y_sampled]),
                               total)
    if len(x) <= m:
        return None
    agreement = np.rint((m + x @ x.T) / 2).astype(np.int64)  # players on which two points agree
    local = LocalTerms.at(x, triples) if triples is not None and len(triples) else None
    chosen = _reml_choice(x, odd, agreement, len(z_sampled) > 0, local)
    if chosen is None:
        return None
    points = chosen["points"]
    best = min((_shrink(chosen, x[points], odd[points], t / m) for t in LINEAR_PRIOR_GRID),
               key=lambda fitted: fitted["objective"])
    if len(points) < len(x):  # chosen on REML's subset: the same kernel, noise and t on every point
        flat = _refit(chosen, x, odd, agreement, local)
        if flat is None:
            return None
        best = _shrink(flat, x, odd, best["t"])
    values = 2.0 * best["w"] + best["map"].T @ best["alpha"]
    std = _posterior_std(best, m, len(z_sampled) > 0)
    return values, std


def _reml_choice(x: np.ndarray, odd: np.ndarray, agreement: np.ndarray, sampled: bool = True,
                 local: LocalTerms | None = None) -> dict | None:
    """The fit with the best REML objective among the isotropic kernels of :data:`RHO_GRID`, each
    with every edge noise of :data:`EDGE_NOISE_GRID`, and the product kernels of
    :data:`RELEVANCE_GRID` at the best isotropic fit's edge noise (relevance from that fit), then
    the best of these with the ``local`` terms at each weight of :data:`LOCAL_WEIGHT_GRID`, on all
    the points or, when there are more than :data:`REML_POINTS`, on a fixed pseudo-random subset of
    them (``points`` says which). Without ``sampled`` pairs (every coalition enumerated) the edge
    points stay exact, so that the fit interpolates the whole game. None when no kernel gives a
    solvable system."""
    n = len(x)
    points = np.arange(n)
    if n > REML_POINTS:
        # The same subset for the same points: the answer depends only on the evaluations.
        points = np.append(np.sort(np.random.default_rng(0).choice(n - 1, REML_POINTS - 1, replace=False)), n - 1)
    sub_x, sub_odd, sub_agreement = x[points], odd[points], agreement[np.ix_(points, points)]
    sub_local = local.subset(points) if local is not None and len(points) < n else local
    noises = EDGE_NOISE_GRID if sampled and edge_points(sub_x).any() else (0.0,)
    with ThreadPoolExecutor(min(available_cpus(), len(RELEVANCE_GRID)), thread_name_prefix="reml") as pool:
        best = _best(pool.map(lambda grid: _solve(sub_x, sub_odd, sub_agreement, *grid),
                              itertools.product(RHO_GRID, noises)))
        if best is None:
            return None
        pilot = 2.0 * best["beta"] + best["map"].T @ best["alpha"]
        product = _best(pool.map(lambda grid: _solve_product(sub_x, sub_odd, relevance_weights(pilot, *grid),
                                                             best["edge_noise"]), RELEVANCE_GRID))
        if product is not None and product["objective"] < best["objective"]:
            best = product
        if sub_local is not None:
            sub_local.gram  # formed here once, not by each weight's thread at the same time
            weighted = _best(pool.map(lambda weight: _refit({**best, "local_weight": weight}, sub_x, sub_odd,
                                                            sub_agreement, sub_local),
                                      [weight for weight in LOCAL_WEIGHT_GRID if weight > 0]))
            if weighted is not None and weighted["objective"] < best["objective"]:
                best = weighted
    best["points"] = points
    return best


def edge_points(x: np.ndarray) -> np.ndarray:
    """Which points (pairs, first player +1) are coalitions of size 1 and their complements, M - 1:
    one entry +1 or one entry -1, each a neighbour of the grand coalition."""
    positives = (x > 0).sum(axis=1)
    return (positives == 1) | (positives == x.shape[1] - 1)


def _refit(chosen: dict, x: np.ndarray, odd: np.ndarray, agreement: np.ndarray,
           local: LocalTerms | None = None) -> dict | None:
    """The kernel, edge noise and local weight of ``chosen`` solved again on these points (flat
    linear terms; ``local``: the local terms at these points)."""
    weight = chosen.get("local_weight", 0.0)
    if "rho" in chosen:
        return _solve(x, odd, agreement, chosen["rho"], chosen["edge_noise"], local, weight)
    return _solve_product(x, odd, chosen["weights"], chosen["edge_noise"], local, weight)


def _best(fits) -> dict | None:
    """The first of the solved ``fits`` (None where unsolvable) with the smallest REML objective.
    The candidates are solved side by side (their factorisations let go of the GIL), and the choice
    is the same as one after the other."""
    return min((solved for solved in fits if solved is not None), key=lambda solved: solved["objective"], default=None)


def relevance_weights(pilot: np.ndarray, gamma: float, scale: float) -> np.ndarray:
    """The product kernel's a_l = min(0.95, c theta_l / M): theta_l proportional to
    (|phi_l| / mean |phi| + 0.05)^gamma summed over the classes (each class's |phi| over its mean,
    so that no class's units dominate), with mean theta 1."""
    magnitude = np.abs(pilot)
    mean = magnitude.mean(axis=0)
    relative = (magnitude / np.where(mean > 0, mean, 1.0)).sum(axis=1) / pilot.shape[1]
    theta = (relative + 0.05) ** gamma
    return np.minimum(0.95, scale * theta / theta.mean() / len(theta))


def _solve(x: np.ndarray, odd: np.ndarray, agreement: np.ndarray, rho: float, edge_noise: float = 0.0,
           local: LocalTerms | None = None, local_weight: float = 0.0) -> dict | None:
    """Universal kriging with the isotropic kernel at decay ``rho``: beta (M x K), alpha (n x K),
    the Shapley map A (n x M), each phi_i's prior variance and the REML objective (smaller is better).
    ``edge_noise``: the edge points' noise variance, relative to the kernel's variance (see
    :data:`EDGE_NOISE_GRID`); ``local``, ``local_weight``: local terms (:func:`_with_local`)."""
    m = x.shape[1]
    kernel, plus, minus = _tables(m, rho)
    positives = (x > 0).sum(axis=1)
    k, shapley_map, prior = _with_local(
        kernel[agreement], lambda: np.where(x > 0, plus[positives][:, None], minus[positives][:, None]),
        lambda: np.full(m, _prior_variance(m, rho)), local, local_weight)
    solved = _gls(x, odd, k, shapley_map, prior, edge_noise)
    if solved is not None:
        solved.update(rho=rho, edge_noise=edge_noise, local_weight=local_weight)
    return solved


def _solve_product(x: np.ndarray, odd: np.ndarray, weights: np.ndarray, edge_noise: float = 0.0,
                   local: LocalTerms | None = None, local_weight: float = 0.0) -> dict | None:
    """Universal kriging with the product kernel of player weights ``weights`` (a_l); the same
    fields and arguments as :func:`_solve`. Every quantity is divided by the same
    C sinh(sum atanh a_l), which the REML scale absorbs."""
    strength = np.arctanh(weights)
    total = strength.sum()
    # log of the common divisor: prod_l sqrt(1 - a_l^2) (the constant C) times sinh(sum atanh a_l).
    log_divisor = 0.5 * np.log1p(-weights * weights).sum() + np.log(np.sinh(total))
    kernel = np.sinh((x * strength) @ x.T) / np.sinh(total)
    k, shapley_map, prior = _with_local(kernel, lambda: _product_map(x, weights, log_divisor),
                                        lambda: _product_prior(weights, log_divisor), local, local_weight)
    solved = _gls(x, odd, k, shapley_map, prior, edge_noise)
    if solved is not None:
        solved.update(weights=weights, edge_noise=edge_noise, local_weight=local_weight)
    return solved


@lru_cache(maxsize=1)
def _quadrature() -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(QUADRATURE_NODES)
    return (nodes + 1.0) / 2.0, weights / 2.0


def _even_products(log_plus: np.ndarray, log_minus: np.ndarray, log_divisor: float) -> np.ndarray:
    """even_{l != i}[prod (1 + c_l)] / divisor for every i, from log(1 + c_l) and log(1 - c_l)
    along the last axis: (prod_{l != i} (1 + c_l) + prod_{l != i} (1 - c_l)) / 2."""
    without_plus = log_plus.sum(axis=-1, keepdims=True) - log_plus - log_divisor
    without_minus = log_minus.sum(axis=-1, keepdims=True) - log_minus - log_divisor
    return 0.5 * (np.exp(without_plus) + np.exp(without_minus))


def _product_map(x: np.ndarray, weights: np.ndarray, log_divisor: float, rows: int = 256) -> np.ndarray:
    """A_ji = 2 a_i x_ji int_0^1 even_{l != i}[prod_l (1 + t a_l x_jl)] dt, per divisor; rows at a
    time, so that the n x nodes x M temporaries stay small."""
    nodes, node_weights = _quadrature()
    scaled = nodes[:, None] * weights[None, :]  # nodes x M
    up, down = np.log1p(scaled), np.log1p(-scaled)
    out = np.empty_like(x)
    for start in range(0, len(x), rows):
        positive = x[start:start + rows, None, :] > 0
        even = _even_products(np.where(positive, up, down), np.where(positive, down, up), log_divisor)
        out[start:start + rows] = np.einsum("q,nqm->nm", node_weights, even)
    return 2.0 * weights[None, :] * x * out


def _product_prior(weights: np.ndarray, log_divisor: float) -> np.ndarray:
    """phi_i's prior variance per unit s^2 and divisor: sum_{T odd, i in T} (2 / |T|)^2 w_T =
    4 a_i int_0^1 int_0^1 even_{l != i}[prod_l (1 + s t a_l)] ds dt."""
    nodes, node_weights = _quadrature()
    products = (nodes[:, None] * nodes[None, :]).ravel()
    pair_weights = (node_weights[:, None] * node_weights[None, :]).ravel()
    scaled = products[:, None] * weights[None, :]
    even = _even_products(np.log1p(scaled), np.log1p(-scaled), log_divisor)
    return 4.0 * weights * (pair_weights @ even)


def _gls(x: np.ndarray, odd: np.ndarray, k: np.ndarray, shapley_map, prior, edge_noise: float = 0.0) -> dict | None:
    """Generalised least squares and the interpolating residual for kernel matrix ``k`` (changed
    in place); ``shapley_map`` and ``prior`` (callables) are computed only when asked for. The edge
    points' observations get noise of variance ``edge_noise`` times the kernel's largest variance
    (noise, not game: it adds to their covariance with themselves and not to the Shapley map)."""
    n, m = x.shape
    scale = float(np.max(np.diag(k)))
    k[np.diag_indices(n)] += JITTER * scale
    if edge_noise > 0:
        edges = np.flatnonzero(edge_points(x))
        k[edges, edges] += edge_noise * scale
    try:
        factor = Cholesky(k)
    except np.linalg.LinAlgError:
        return None
    k_inv_x = factor.solve(x)
    k_inv_odd = factor.solve(odd)
    normal = x.T @ k_inv_x
    try:
        normal_factor = Cholesky(normal)
    except np.linalg.LinAlgError:
        return None
    beta = normal_factor.solve(x.T @ k_inv_odd)
    alpha = k_inv_odd - k_inv_x @ beta
    # REML with each class's scale s^2 profiled out: (n - M) sum_k log(r_k^T K^-1 r_k) + K log|K| |X^T K^-1 X|.
    quadratic = np.einsum("nk,nk->k", odd - x @ beta, alpha)
    if np.any(quadratic <= 0):  # the odd parts are exactly linear: any kernel interpolates them
        quadratic = np.maximum(quadratic, np.finfo(float).tiny)
    log_det = factor.log_det() + normal_factor.log_det()
    objective = (n - m) * np.log(quadratic).sum() + odd.shape[1] * log_det
    return _Fit(beta=beta, alpha=alpha, objective=objective, quadratic=quadratic, factor=factor, k_inv_x=k_inv_x,
                k_inv_odd=k_inv_odd, normal=normal, normal_factor=normal_factor, _map=shapley_map, _prior=prior)


def _shrink(flat: dict, x: np.ndarray, odd: np.ndarray, t: float) -> dict:
    """The kernel of a flat-prior fit ``flat`` (from :func:`_gls` on these ``x``, ``odd``), with a
    proper prior on the linear terms instead: beta ~ N(mu 1, s^2 t I) on top of the kernel's own
    degree-1 part, mu a fixed effect with a flat prior. The odd parts then have covariance
    s^2 K' = s^2 (K + t X X^T) and one fixed effect, F = X 1, and by Woodbury
    K'^-1 = P - P X N^-1 X^T P with P = K^-1, Q = X^T P X and N = Q + I / t, an M x M matrix:
    each t costs one small factorisation. With u = N^-1 X^T P d,

        mu = 1^T u / (M - 1^T N^-1 1 / t),   w = N^-1 (X^T P d + 1 mu / t),
        alpha = P d - P X w,   phi = 2 w + A^T alpha,

    w being beta's posterior mean (as t grows, w -> the flat fit's beta and alpha -> its alpha).
    The REML objective, comparable across t and kernels with this fixed effect, is
    (n - 1) sum_k log(r_k^T K'^-1 r_k) + K log(|K'| F^T K'^-1 F), with |K'| = |K| t^M |N| and
    F^T K'^-1 F = (M - 1^T N^-1 1 / t) / t. Shrinking the linear terms towards their mean is what
    sampling noise in them calls for when pairs are few and the game is far from additive (a photo
    under a large convnet; the README's accuracy section has the measurements)."""
    n, m = x.shape
    normal = flat["normal"] + np.eye(m) / t
    factor = Cholesky(normal)
    ones_solved = factor.solve(np.ones(m))
    denominator = m - ones_solved.sum() / t  # t (F^T K'^-1 F) > 0
    xtpd = x.T @ flat["k_inv_odd"]
    u = factor.solve(xtpd)
    mu = u.sum(axis=0) / denominator
    w = u + ones_solved[:, None] * mu[None, :] / t
    alpha = flat["k_inv_odd"] - flat["k_inv_x"] @ w
    quadratic = np.einsum("nk,nk->k", odd - x.sum(axis=1, keepdims=True) * mu[None, :], alpha)
    quadratic = np.maximum(quadratic, np.finfo(float).tiny)
    log_det = flat["factor"].log_det() + (m - 1) * np.log(t) + factor.log_det() + np.log(denominator)
    objective = (n - 1) * np.log(quadratic).sum() + odd.shape[1] * log_det
    shrunk = _Fit(w=w, alpha=alpha, mu=mu, t=t, objective=objective, quadratic=quadratic, factor=flat["factor"],
                  k_inv_x=flat["k_inv_x"], shrink_factor=factor, ones_solved=ones_solved, denominator=denominator)
    for key in ("map", "prior"):  # shared with the flat fit, still computed only when asked for
        shrunk["_" + key] = (lambda key=key: flat[key])
    return shrunk


class _Fit(dict):
    """A solved kernel: its fields by key, the Shapley map (``map``) and the prior variances
    (``prior``) computed on first use, since REML compares many candidates and needs neither."""

    def __missing__(self, key: str):
        if key in ("map", "prior"):
            self[key] = self.pop("_" + key)()
            return self[key]
        raise KeyError(key)


def _posterior_std(fitted: dict, n_players: int, sampled: bool) -> np.ndarray:
    """The posterior standard deviation of each phi_i for each class k, under the shrunk model of
    :func:`_shrink` with its t and the class's REML scale s_k^2 = r_k^T K'^-1 r_k / (n - 1).

    phi_i's prior covariance with the odd parts is b_i = A e_i + 2 t X e_i (A the kernel's Shapley
    map, per unit s^2), its prior variance c_i + 4 t (c_i: ``prior``, sum_{T odd, i in T} (2 / |T|)^2
    w_T), and its fixed-effect regressor 2; universal kriging's variance
    c_i + 4 t - b_i^T K'^-1 b_i + (2 - F^T K'^-1 b_i)^2 / (F^T K'^-1 F) then reduces, with
    W = X^T P A - 2 I, to

        Var(phi_i) = s^2 (c_i - (A^T P A)_ii + (W^T N^-1 W)_ii + (1^T N^-1 W)_i^2 / (t M - 1^T N^-1 1)),

    in which t no longer multiplies anything large (as t grows it becomes the flat prior's variance).
    Zero when no pair was sampled (every fit is then exact)."""
    m = n_players
    if not sampled:
        return np.zeros((m, fitted["w"].shape[1]))
    n = len(fitted["alpha"])
    shapley_map, t = fitted["map"], fitted["t"]
    k_inv_map = fitted["factor"].solve(shapley_map)  # P A
    spread = fitted["k_inv_x"].T @ shapley_map - 2.0 * np.eye(m)  # W
    solved = fitted["shrink_factor"].solve(spread)  # N^-1 W
    mean_row = fitted["ones_solved"] @ spread  # 1^T N^-1 W
    variance_per_unit = (fitted["prior"] - np.einsum("ni,ni->i", shapley_map, k_inv_map)
                         + np.einsum("ji,ji->i", spread, solved) + mean_row ** 2 / (t * fitted["denominator"]))
    scale = fitted["quadratic"] / max(1, n - 1)  # K
    variance = np.maximum(variance_per_unit, 0.0)[:, None] * scale[None, :]
    return np.sqrt(variance)


def _coefficient_variance(n_players: int, rho: float) -> np.ndarray:
    """w_d, each degree-d coefficient's prior variance per unit s^2 (d = 0..M; zero for even d):
    rho^((d-3)/2) / C(M, d) for odd d >= 3, and 1 / M for d = 1. The degree-1 part is also a
    fixed effect with a flat prior, which absorbs it: it changes neither the estimate, the REML
    choice nor the posterior variance, and it keeps K non-singular where the points outnumber the
    terms of degree 3 and more (a complete design has 2^(M-1) points and 2^(M-1) - M such terms)."""
    m = n_players
    variance = np.zeros(m + 1)
    variance[1] = 1.0 / m
    for d in range(3, m + 1, 2):
        variance[d] = rho ** ((d - 3) // 2) / math.comb(m, d)
    return variance


@lru_cache(maxsize=64)
def _prior_variance(n_players: int, rho: float) -> float:
    """phi_i's prior variance per unit s^2: over odd d, C(M-1, d-1) terms with i, each (2/d)^2 w_d."""
    m = n_players
    variance = _coefficient_variance(m, rho)
    return float(sum((2.0 / d) ** 2 * variance[d] * math.comb(m - 1, d - 1) for d in range(1, m + 1, 2)))
