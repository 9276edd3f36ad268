"""The coalition design: which coalitions are evaluated, with which weights, and how they split into shards.

The Shapley kernel distribution over coalitions z in {0,1}^M with 0 < |z| < M is

    p(z) = q(|z|) / C(M, |z|),    q(s) = (M - 1) / (s (M - s)) / Q,    Q = sum_{s=1}^{M-1} (M - 1) / (s (M - s)),

so q(s) is the probability of drawing size s and every coalition of that size is equally likely.

**Enumeration.** Sizes are taken in complementary pairs (s, M - s) from the outside in, as shap's
KernelExplainer does: the pair is enumerated (every coalition, with its exact weight p(z)) when the
remaining budget would, in expectation, draw each of its coalitions at least once. When the budget
covers all 2^M - 2 coalitions, everything is enumerated and the answer is exact.

**Sampling.** The remaining sizes R (closed under s -> M - s) carry mass q_R = sum_{s in R} q(s). Pairs
(z, 1 - z) are drawn with |z| ~ q(s) / q_R over R and z uniform among coalitions of that size; since
p is symmetric, both members have the law p restricted to R. Each sampled coalition gets weight
q_R / N_S (N_S = number of sampled coalitions), so the weighted sums are unbiased for the
restricted expectations.

**Randomness and shards.** Samples come in blocks of ``pairs_per_block`` pairs; block j is drawn from
``numpy.random.default_rng(SeedSequence(seed, spawn_key=(j,)))``. Work units are enumeration chunks
followed by sample blocks; a shard takes a contiguous run of units. The coalitions therefore depend
only on (M, nsamples, seed), never on the shard count, so the reduced estimate does not either.
Blocks are also the independent groups used for error bars (block j belongs to group j mod G).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from shapfleet.errors import InvalidSettingsError

ENUMERATION_CHUNK = 256
MAX_PAIRS_PER_BLOCK = 64
TARGET_BLOCKS = 32
MAX_GROUPS = 32


def default_nsamples(n_players: int) -> int:
    """shap's ``nsamples="auto"``: 2M + 2048 coalitions."""
    return 2 * n_players + 2048


def size_distribution(n_players: int) -> np.ndarray:
    """q(s) for s = 0..M (q(0) = q(M) = 0): the Shapley kernel's probability of each coalition size."""
    m = n_players
    q = np.zeros(m + 1)
    sizes = np.arange(1, m)
    q[1:m] = (m - 1) / (sizes * (m - sizes))
    return q / q.sum()


@dataclass(frozen=True)
class WorkUnit:
    """An enumeration chunk (``start``/``stop`` into the enumerated coalitions) or a sample block."""

    kind: str  # "enumerated" or "sampled"
    start: int
    stop: int
    block: int = -1

    @property
    def n_coalitions(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class CoalitionDesign:
    """Everything needed to regenerate any shard's coalitions and weights. JSON-serialisable."""

    n_players: int
    seed: int
    enumerated_sizes: tuple[int, ...]
    n_enumerated: int
    n_pairs: int
    pairs_per_block: int

    @classmethod
    def create(cls, n_players: int, nsamples: int | None, seed: int) -> "CoalitionDesign":
        """Plan ``nsamples`` coalition evaluations (default: 2M + 2048) for M = ``n_players``."""
        m = n_players
        if m < 1:
            raise InvalidSettingsError("the image has no superpixels")
        total = 2 ** m - 2 if m < 63 else None
        budget = default_nsamples(m) if nsamples is None else int(nsamples)
        if total is not None and budget >= total:
            sizes = tuple(range(1, m))
            return cls(m, seed, sizes, total, 0, 1)
        minimum = m + 2
        if budget < minimum:
            raise InvalidSettingsError(
                f"nsamples={budget} is too small to solve for {m} superpixels: use at least {minimum} "
                f"(or fewer superpixels)"
            )
        q = size_distribution(m)
        enumerated: list[int] = []
        n_enumerated = 0
        left = budget
        remaining_mass = 1.0
        for s in range(1, m // 2 + 1):
            partner = m - s
            count = math.comb(m, s) * (1 if partner == s else 2)
            mass = q[s] * (1 if partner == s else 2)
            if left * mass / remaining_mass >= count - 1e-8:
                enumerated.extend([s] if partner == s else [s, partner])
                n_enumerated += count
                left -= count
                remaining_mass -= mass
                if remaining_mass <= 1e-12:
                    break
            else:
                break
        n_pairs = left // 2 if remaining_mass > 1e-12 else 0
        pairs_per_block = min(MAX_PAIRS_PER_BLOCK, max(1, -(-n_pairs // TARGET_BLOCKS)))
        return cls(m, int(seed), tuple(enumerated), n_enumerated, int(n_pairs), pairs_per_block)

    # -- derived quantities --------------------------------------------------------------------
    @cached_property
    def q(self) -> np.ndarray:
        return size_distribution(self.n_players)

    @cached_property
    def sampled_sizes(self) -> np.ndarray:
        return np.array([s for s in range(1, self.n_players) if s not in set(self.enumerated_sizes)], dtype=np.int64)

    @cached_property
    def _sampled_size_cdf(self) -> np.ndarray:
        # Computed as Generator.choice computes it, so that the draws are the same to the last bit.
        sizes_q = self.q[self.sampled_sizes]
        cdf = np.cumsum(sizes_q / sizes_q.sum())
        return cdf / cdf[-1]

    @property
    def sampled_mass(self) -> float:
        """q_R: the kernel probability of the sizes that are sampled rather than enumerated."""
        return float(self.q[self.sampled_sizes].sum()) if self.n_pairs else 0.0

    @property
    def n_sampled(self) -> int:
        return 2 * self.n_pairs

    @property
    def n_coalitions(self) -> int:
        return self.n_enumerated + self.n_sampled

    @property
    def is_exact(self) -> bool:
        return self.n_enumerated == 2 ** self.n_players - 2 if self.n_players < 63 else False

    @property
    def n_blocks(self) -> int:
        return -(-self.n_pairs // self.pairs_per_block) if self.n_pairs else 0

    @property
    def n_groups(self) -> int:
        """Independent groups of sample blocks for the jackknife error bars."""
        return min(MAX_GROUPS, self.n_blocks)

    def groups_of(self, blocks: np.ndarray) -> np.ndarray:
        """The jackknife group of each sample block: block j belongs to group j mod G."""
        return np.asarray(blocks) % max(1, self.n_groups)

    def kernel_probability(self, sizes: np.ndarray) -> np.ndarray:
        """p(z) = q(|z|) / C(M, |z|) for coalitions of the given sizes: an enumerated coalition's weight."""
        m = self.n_players
        return self.q[sizes] / np.array([math.comb(m, s) for s in range(m + 1)], dtype=np.float64)[sizes]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["enumerated_sizes"] = list(self.enumerated_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CoalitionDesign":
        return cls(**{**data, "enumerated_sizes": tuple(data["enumerated_sizes"])})

    # -- work units and shards -----------------------------------------------------------------
    @cached_property
    def units(self) -> tuple[WorkUnit, ...]:
        units = [
            WorkUnit("enumerated", start, min(start + ENUMERATION_CHUNK, self.n_enumerated))
            for start in range(0, self.n_enumerated, ENUMERATION_CHUNK)
        ]
        for block in range(self.n_blocks):
            first = block * self.pairs_per_block
            pairs = min(self.pairs_per_block, self.n_pairs - first)
            units.append(WorkUnit("sampled", 2 * first, 2 * (first + pairs), block))
        return tuple(units)

    def shard_units(self, n_shards: int) -> list[tuple[WorkUnit, ...]]:
        """Split the units into at most ``n_shards`` contiguous runs of about equal evaluation count."""
        units = self.units
        n = max(1, min(int(n_shards), len(units)))
        cumulative = np.cumsum([u.n_coalitions for u in units])
        total = cumulative[-1] if len(units) else 0
        bounds = [0]
        for k in range(1, n):
            # First unit index whose cumulative count reaches k/n of the total, kept so that every
            # shard gets at least one unit.
            cut = int(np.searchsorted(cumulative, total * k / n, side="left")) + 1
            bounds.append(min(max(cut, bounds[-1] + 1), len(units) - (n - k)))
        bounds.append(len(units))
        return [tuple(units[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    # -- coalitions ----------------------------------------------------------------------------
    def coalitions(self, unit: WorkUnit) -> tuple[np.ndarray, np.ndarray]:
        """The unit's coalitions as a bool ``n x M`` matrix and their weights (``n``).

        Enumerated coalitions carry p(z); sampled ones carry 1 here, and the estimator applies
        q_R / N_S when it reduces, so that shards need not know N_S's split.
        """
        if unit.kind == "enumerated":
            return self._enumerated(unit.start, unit.stop)
        return self._sample_block(unit.block), np.ones(unit.n_coalitions)

    def _enumerated(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        m = self.n_players
        combos = itertools.chain.from_iterable(
            ((s, c) for c in itertools.combinations(range(m), s)) for s in self.enumerated_sizes
        )
        z = np.zeros((stop - start, m), dtype=bool)
        for row, (_, members) in enumerate(itertools.islice(combos, start, stop)):
            z[row, list(members)] = True
        return z, self.kernel_probability(z.sum(axis=1))

    def _sample_block(self, block: int) -> np.ndarray:
        m = self.n_players
        first = block * self.pairs_per_block
        pairs = min(self.pairs_per_block, self.n_pairs - first)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(block,)))
        # |z| ~ q(s) / q_R over the sampled sizes by inverting their distribution function: the
        # draws Generator.choice(sampled_sizes, p=...) makes from the same stream, without its
        # per-call checks of p (which cost more than the rest of a block).
        sizes = self.sampled_sizes[np.searchsorted(self._sampled_size_cdf, rng.random(pairs), side="right")]
        # A uniformly random subset of size s: the s players with the smallest random keys.
        ranks = np.argsort(np.argsort(rng.random((pairs, m)), axis=1), axis=1)
        z = ranks < sizes[:, None]
        out = np.empty((2 * pairs, m), dtype=bool)
        out[0::2] = z
        out[1::2] = ~z
        return out
