"""The coalition design: which coalitions are evaluated, with which weights, and how they split into shards.

The Shapley kernel distribution over coalitions z in {0,1}^M with 0 < |z| < M is

    p(z) = q(|z|) / C(M, |z|),    q(s) = (M - 1) / (s (M - s)) / Q,    Q = sum_{s=1}^{M-1} (M - 1) / (s (M - s)),

so q(s) is the probability of drawing size s and every coalition of that size is equally likely.

**Enumeration.** Sizes are taken in complementary pairs (s, M - s) from the outside in, as shap's
KernelExplainer does: the pair is enumerated (every coalition, with its exact weight p(z)) when the
remaining budget would, in expectation, draw each of its coalitions at least once. When the budget
covers all 2^M - 2 coalitions, everything is enumerated and the answer is exact.

**Sampling.** The remaining sizes R (closed under s -> M - s) carry mass q_R = sum_{s in R} q(s). Pairs
(z, 1 - z) are drawn with |z| uniform over R and z uniform among coalitions of that size (the
leverage-score law of the Shapley regression, as LeverageSHAP samples): the middle sizes, which the
kernel q makes rare, hold most of the coalitions and so most of what is unknown about the game, and
a design that reaches them leaves less of the Shapley values undetermined (bench/results, "Error at
49 and 196 superpixels", has the figures). Since the law is symmetric, both members of a pair have
it. A sampled coalition of size s stands for the kernel's restricted law with the importance weight
p(z) / r_R(z) = q(s) |R|, and gets

    q(s) |R| / N_S = w(s) * share / N_S,    w(s) = (M - 1) q(s),    share = |R| / (M - 1)

(N_S = number of sampled coalitions), so the weighted sums are unbiased for the restricted
expectations. Shards sum w(s)-weighted rows (w depends on M alone), the reducer applies
share / N_S.

**One stream, nested designs.** Sampled pairs come from one infinite stream of *raw* pairs: raw pair
i draws |z| uniformly from every size 1..M-1 and a uniform subset of that size; a raw pair whose size
is enumerated is skipped (rejection sampling, which leaves exactly the uniform law over R). A design
takes the first ``n_pairs`` kept pairs, that is the raw pairs before position ``raw_pairs``. The
stream does not depend on the budget, and the enumerated sizes only grow with it, so the design for
a budget n contains, after dropping the raw pairs of newly enumerated sizes, every coalition of the
design for any smaller budget: a run that grows its budget in rounds (``--target-std``) evaluates
only what the larger design adds and ends with exactly the design, hence the answer, of a fixed
budget run at its final size (:meth:`CoalitionDesign.new_units`, :meth:`CoalitionDesign.keeps`).

**Randomness and shards.** The raw stream comes in blocks of ``RAW_PAIRS_PER_BLOCK`` pairs; block j is
drawn from ``numpy.random.default_rng(SeedSequence(seed, spawn_key=(j,)))``: first the block's sizes,
then its subsets' random keys. Work units are enumeration chunks (never straddling a size pair)
followed by sample blocks; a shard takes a contiguous run of units. The coalitions therefore depend
only on (M, nsamples, seed), never on the shard count, so the reduced estimate does not either.
Raw pairs are iid, so the jackknife's independent groups are pairs too: raw pair i belongs to group
i mod G, G = min(32, n_pairs).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache

import numpy as np

from shapfleet.errors import InvalidSettingsError, PipelineError

ENUMERATION_CHUNK = 256
#: The sampling law of sizes, stored with every design: a plan made by a shapfleet that drew sizes
#: otherwise (earlier ones drew them by the kernel, with flat weights) is refused, never finished
#: with this law's coalitions and weights.
SIZE_LAW = "uniform"
RAW_PAIRS_PER_BLOCK = 64
MAX_GROUPS = 32


def default_nsamples(n_players: int) -> int:
    """shap's ``nsamples="auto"``: 2M + 2048 coalitions."""
    return 2 * n_players + 2048


def minimum_nsamples(n_players: int) -> int:
    """The fewest coalitions a regression over M players accepts (M + 2), unless the game is smaller."""
    return min(n_players + 2, 2 ** n_players - 2) if n_players < 63 else n_players + 2


def size_distribution(n_players: int) -> np.ndarray:
    """q(s) for s = 0..M (q(0) = q(M) = 0): the Shapley kernel's probability of each coalition size."""
    m = n_players
    q = np.zeros(m + 1)
    sizes = np.arange(1, m)
    q[1:m] = (m - 1) / (sizes * (m - sizes))
    return q / q.sum()


@lru_cache(maxsize=64)
def _sampling_weight_table(n_players: int) -> np.ndarray:
    table = (n_players - 1) * size_distribution(n_players)
    table.flags.writeable = False
    return table


def sampling_weights(n_players: int, sizes: np.ndarray) -> np.ndarray:
    """w(s) = (M - 1) q(s) for sampled coalitions of the given sizes: the kernel's probability of
    the size over the sampling law's (uniform over 1..M-1). Its mean over sizes drawn uniformly from
    R is (M - 1) q_R / |R|, which :attr:`CoalitionDesign.sampled_share` / N_S turns into q_R."""
    return _sampling_weight_table(int(n_players))[np.asarray(sizes)]


@dataclass(frozen=True)
class WorkUnit:
    """An enumeration chunk (``start``/``stop`` into the enumerated coalitions) or a sample block
    (``start``/``stop`` raw pair positions, in block ``block``; ``n_coalitions`` its kept coalitions)."""

    kind: str  # "enumerated" or "sampled"
    start: int
    stop: int
    block: int = -1
    kept: int = -1  # sampled: coalitions kept in [start, stop)

    @property
    def n_coalitions(self) -> int:
        return self.stop - self.start if self.kind == "enumerated" else self.kept


@dataclass(frozen=True)
class CoalitionDesign:
    """Everything needed to regenerate any shard's coalitions and weights. JSON-serialisable."""

    n_players: int
    seed: int
    enumerated_sizes: tuple[int, ...]
    n_enumerated: int
    n_pairs: int
    raw_pairs: int  # the raw pair positions [0, raw_pairs) whose kept pairs are the design's samples
    size_law: str = SIZE_LAW

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
            return cls(m, int(seed), sizes, total, 0, 0)
        minimum = minimum_nsamples(m)
        if budget < minimum:
            raise InvalidSettingsError(
                f"nsamples={budget} is too small to solve for {m} superpixels: use at least {minimum} "
                f"(or fewer superpixels)"
            )
        enumerated, n_enumerated, remaining_mass = enumerated_sizes(m, budget)
        n_pairs = (budget - n_enumerated) // 2 if remaining_mass > 1e-12 else 0
        design = cls(m, int(seed), tuple(enumerated), n_enumerated, int(n_pairs), 0)
        return cls(m, int(seed), tuple(enumerated), n_enumerated, int(n_pairs), design._raw_pairs_needed())

    # -- derived quantities --------------------------------------------------------------------
    @cached_property
    def q(self) -> np.ndarray:
        return size_distribution(self.n_players)

    @cached_property
    def sampled_sizes(self) -> np.ndarray:
        return np.array([s for s in range(1, self.n_players) if s not in set(self.enumerated_sizes)], dtype=np.int64)

    @cached_property
    def _is_enumerated(self) -> np.ndarray:
        enumerated = np.zeros(self.n_players + 1, dtype=bool)
        enumerated[list(self.enumerated_sizes)] = True
        return enumerated

    @property
    def sampled_mass(self) -> float:
        """q_R: the kernel probability of the sizes that are sampled rather than enumerated."""
        return float(self.q[self.sampled_sizes].sum()) if self.n_pairs else 0.0

    @property
    def sampled_share(self) -> float:
        """|R| / (M - 1): the share of sizes that are sampled, which times the mean of w(s) over
        the sampled coalitions is q_R (the scale, over N_S, of the w-weighted sampled sums)."""
        return len(self.sampled_sizes) / (self.n_players - 1) if self.n_pairs else 0.0

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
        return -(-self.raw_pairs // RAW_PAIRS_PER_BLOCK)

    @property
    def n_groups(self) -> int:
        """Independent groups of sampled pairs for the jackknife error bars."""
        return min(MAX_GROUPS, self.n_pairs)

    def groups_of(self, pairs: np.ndarray) -> np.ndarray:
        """The jackknife group of each sampled row, from its raw pair position i: i mod G."""
        return np.asarray(pairs) % max(1, self.n_groups)

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
        law = data.get("size_law", "kernel")
        if law != SIZE_LAW:
            raise PipelineError(f"this job's coalitions were planned with sizes drawn by law {law!r}, which this "
                                f"shapfleet no longer evaluates (it draws them by {SIZE_LAW!r}): submit the job again")
        return cls(**{**data, "enumerated_sizes": tuple(data["enumerated_sizes"])})

    # -- the raw stream ------------------------------------------------------------------------
    def _block_stream(self, block: int) -> tuple[np.ndarray, np.random.Generator]:
        """Block ``block``'s raw sizes, and its generator positioned at the subsets' keys."""
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(block,)))
        return rng.integers(1, self.n_players, RAW_PAIRS_PER_BLOCK), rng  # |z| uniform over 1..M-1

    def _raw_pairs_needed(self) -> int:
        """The raw positions needed to keep ``n_pairs`` pairs (only the blocks' sizes are drawn)."""
        kept, block = 0, 0
        while kept < self.n_pairs:
            keep = ~self._is_enumerated[self._block_stream(block)[0]]
            if kept + int(keep.sum()) >= self.n_pairs:
                last = int(np.flatnonzero(keep)[self.n_pairs - kept - 1])
                return block * RAW_PAIRS_PER_BLOCK + last + 1
            kept += int(keep.sum())
            block += 1
        return 0

    def keeps(self, pairs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Which sampled rows (raw pair positions, coalition sizes) belong to this design: a row drawn
        for a smaller design of the same stream may since have been enumerated, or lie past the
        design's raw positions (a larger budget can enumerate more and so need fewer raw pairs)."""
        return (np.asarray(pairs) < self.raw_pairs) & ~self._is_enumerated[np.asarray(sizes)]

    # -- work units and shards -----------------------------------------------------------------
    @cached_property
    def units(self) -> tuple[WorkUnit, ...]:
        units = []
        start = 0
        for group in self._size_groups():
            count = sum(math.comb(self.n_players, s) for s in group)
            units += [WorkUnit("enumerated", a, min(a + ENUMERATION_CHUNK, start + count))
                      for a in range(start, start + count, ENUMERATION_CHUNK)]
            start += count
        for block in range(self.n_blocks):
            first = block * RAW_PAIRS_PER_BLOCK
            stop = min(first + RAW_PAIRS_PER_BLOCK, self.raw_pairs)
            sizes = self._block_stream(block)[0][:stop - first]
            units.append(WorkUnit("sampled", first, stop, block, 2 * int((~self._is_enumerated[sizes]).sum())))
        return tuple(units)

    def _size_groups(self) -> list[tuple[int, ...]]:
        """The enumerated sizes as enumerated: complementary pairs (s, M - s), or s alone at M / 2."""
        sizes = list(self.enumerated_sizes)
        groups = []
        while sizes:
            s = sizes.pop(0)
            if sizes and sizes[0] == self.n_players - s != s:
                groups.append((s, sizes.pop(0)))
            else:
                groups.append((s,))
        return groups

    def new_units(self, earlier: "CoalitionDesign | None") -> tuple[WorkUnit, ...]:
        """The units whose coalitions ``earlier`` (a design of the same stream, a smaller budget)
        did not evaluate: the chunks of newly enumerated sizes and the raw positions past its own.
        (Raw pairs of sizes enumerated since are evaluated again as enumerated coalitions.)"""
        if earlier is None:
            return self.units
        units = []
        for unit in self.units:
            if unit.kind == "enumerated" and unit.start >= earlier.n_enumerated:
                units.append(unit)
            elif unit.kind == "sampled" and unit.stop > earlier.raw_pairs:
                start = max(unit.start, earlier.raw_pairs)
                sizes = self._block_stream(unit.block)[0][start - unit.block * RAW_PAIRS_PER_BLOCK:
                                                           unit.stop - unit.block * RAW_PAIRS_PER_BLOCK]
                units.append(WorkUnit("sampled", start, unit.stop, unit.block,
                                      2 * int((~self._is_enumerated[sizes]).sum())))
        return tuple(units)

    def shard_units(self, n_shards: int, units: tuple[WorkUnit, ...] | None = None) -> list[tuple[WorkUnit, ...]]:
        """Split ``units`` (default: all) into at most ``n_shards`` contiguous runs of about equal
        evaluation count."""
        units = self.units if units is None else units
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
        """The unit's coalitions as a bool ``n x M`` matrix, and for enumerated ones their weights
        p(z); for sampled ones, each row's raw pair position (the statistics weight a sampled row
        by w(|z|), and the estimator applies share / N_S when it reduces, so that shards need not
        know N_S's split)."""
        if unit.kind == "enumerated":
            return self._enumerated(unit.start, unit.stop)
        return self._sample_block(unit)

    def _enumerated(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        m = self.n_players
        combos = itertools.chain.from_iterable(
            ((s, c) for c in itertools.combinations(range(m), s)) for s in self.enumerated_sizes
        )
        z = np.zeros((stop - start, m), dtype=bool)
        for row, (_, members) in enumerate(itertools.islice(combos, start, stop)):
            z[row, list(members)] = True
        return z, self.kernel_probability(z.sum(axis=1))

    def _sample_block(self, unit: WorkUnit) -> tuple[np.ndarray, np.ndarray]:
        m = self.n_players
        sizes, rng = self._block_stream(unit.block)
        # A uniformly random subset of size s: the s players with the smallest random keys.
        ranks = np.argsort(np.argsort(rng.random((RAW_PAIRS_PER_BLOCK, m)), axis=1), axis=1)
        first = unit.block * RAW_PAIRS_PER_BLOCK
        positions = np.arange(unit.start, unit.stop)
        rows = positions - first
        keep = ~self._is_enumerated[sizes[rows]]
        rows, positions = rows[keep], positions[keep]
        z = ranks[rows] < sizes[rows, None]
        out = np.empty((2 * len(rows), m), dtype=bool)
        out[0::2] = z
        out[1::2] = ~z
        return out, np.repeat(positions, 2)


def enumerated_sizes(n_players: int, budget: int) -> tuple[list[int], int, float]:
    """The sizes a budget enumerates (outside in, in complementary pairs), their coalition count,
    and the kernel mass left to sample. Grows with the budget: every size a budget enumerates, a
    larger one enumerates too."""
    m = n_players
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
    return enumerated, n_enumerated, remaining_mass
