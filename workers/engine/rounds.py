"""Precision on request: grow the budget in rounds until every standard error meets a target.

A ``target_std`` E (output units) or ``target_error`` R (the largest standard error of a class over
its largest |value|) replaces a guessed ``nsamples``, which becomes the cap. Round r evaluates the
coalitions that the design of budget n_r adds to the design of n_{r-1}
(:meth:`~shapfleet.workers.engine.design.CoalitionDesign.new_units`); designs of one seed are nested,
so after any round the statistics restricted to the design of n_r
(:func:`~shapfleet.workers.engine.estimation.restrict`) are those of a fixed-budget run of n_r
coalitions, and so is the answer. What runs, and the result, depend only on the seed and the
rounds' budgets, which depend only on those answers: never on shards or workers.

After each round the achieved precision p_r (the measure the target is stated in) is compared with
the target t. The next budget comes from the error's rate: for a sampled fit p ~ n^-a with a = 1/2,

    n_{r+1} = n_r (p_r / t)^(1/a),

with a re-fitted from the last two rounds once there are two (clamped to 0.35..1.5). Before that, a
is 1/2 for the additive fit and 1 for the fits that model the game (kriging, cubic), whose error
falls about as 1/n at the budgets where people work while they learn the game's structure (measured
on the MNIST cases: 1.2 from 256 to 564 coalitions at 61 players, 0.84 from 564 to 1,600); a rate
assumed too fast costs one more round, too slow a budget spent past the target. The step is kept within
``MIN_GROWTH``..``MAX_GROWTH`` of n_r and under the cap. The run stops when p_r <= t (``target``),
when the design is exact (``exact``: every value known, std 0) or when n_r reached the cap (``cap``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .design import CoalitionDesign, minimum_nsamples
from .settings import DEFAULT_MAX_NSAMPLES, ExplainSettings

#: The first round's budget: enough pairs for every jackknife group and a pilot fit.
FIRST_ROUND_PER_PLAYER = 4
FIRST_ROUND_MIN = 256
#: Each later round grows the budget by at least and at most these factors.
MIN_GROWTH = 1.2
MAX_GROWTH = 8.0
#: The projection aims this much past the budget it predicts meets the target, so that a
#: slightly optimistic projection does not cost a whole extra round.
MARGIN = 1.05
RATE_LIMITS = (0.35, 1.5)
#: The rate assumed before two rounds have measured one, per fit.
INITIAL_RATES = {"linear": 0.5, "cubic": 1.0, "kriging": 1.0}


@dataclass(frozen=True)
class Target:
    """What precision to stop at: ``kind`` ``std`` (absolute) or ``error`` (relative)."""

    kind: str
    value: float

    @classmethod
    def of(cls, settings: ExplainSettings) -> "Target | None":
        if settings.target_std is not None:
            return cls("std", float(settings.target_std))
        if settings.target_error is not None:
            return cls("error", float(settings.target_error))
        return None

    def precision(self, values: np.ndarray, std: np.ndarray) -> float:
        """The achieved precision in the target's units (``M x K`` values and standard errors):
        the largest std, or the largest over classes of (largest std / largest |value|). A std that
        is not known (NaN: too few sample groups) is infinitely far from any target."""
        std = np.asarray(std, dtype=np.float64)
        if std.size == 0:
            return 0.0
        if not np.all(np.isfinite(std)):
            return math.inf
        if self.kind == "std":
            return float(std.max())
        largest = np.abs(np.asarray(values, dtype=np.float64)).max(axis=0)
        worst = std.max(axis=0)
        ratios = np.where(worst == 0, 0.0, worst / np.where(largest > 0, largest, 1.0))
        ratios = np.where((largest == 0) & (worst > 0), math.inf, ratios)
        return float(ratios.max())

    def to_dict(self) -> dict:
        return {f"target_{self.kind}": self.value}


def cap_of(settings: ExplainSettings, default_cap: int = DEFAULT_MAX_NSAMPLES) -> int:
    """The most coalitions a target run may evaluate: ``nsamples``, else ``default_cap``."""
    return int(settings.nsamples) if settings.nsamples is not None else int(default_cap)


def cap_coalitions(n_players: int, cap: int, seed: int) -> int:
    """The coalitions the cap's design holds, which is what :func:`decide` compares a round's with:
    a budget's sampled pairs round down, so a design can hold one coalition fewer than its budget,
    and a run whose design holds as many as the cap's has nothing left to grow into."""
    return CoalitionDesign.create(n_players, cap, seed).n_coalitions


def first_budget(n_players: int, cap: int) -> int:
    """Round 0's budget: 4 coalitions per player, at least 256, at most the cap (and never below
    the regression's minimum: a cap under it is refused by the design)."""
    wanted = max(FIRST_ROUND_MIN, FIRST_ROUND_PER_PLAYER * (n_players + 2))
    return max(minimum_nsamples(n_players), min(cap, wanted))


@dataclass(frozen=True)
class RoundOutcome:
    """What a finished round decided: stop (``stopped_because``) or go on to ``next_budget``;
    ``projected`` is the budget the rate predicts meets the target (for the ETA)."""

    round_index: int
    budget: int
    precision: float
    stopped_because: str | None
    next_budget: int | None
    projected: int

    @property
    def target_met(self) -> bool:
        return self.stopped_because in ("target", "exact")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["precision"] = None if not math.isfinite(self.precision) else self.precision
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RoundOutcome":
        precision = data["precision"]
        return cls(**{**data, "precision": math.inf if precision is None else float(precision)})


def decide(history: list[tuple[int, float]], target: Target, cap: int, exact: bool,
           initial_rate: float = 0.5) -> RoundOutcome:
    """After a round: ``history`` holds every round's (budget: its design's coalitions, precision)
    so far, the last one just finished; ``cap`` is :func:`cap_coalitions`; ``exact`` says whether its
    design enumerates every coalition; ``initial_rate`` is the
    rate assumed until two rounds measure one (:data:`INITIAL_RATES` of the fit used)."""
    round_index = len(history) - 1
    budget, precision = history[-1]
    if precision <= target.value or exact:
        return RoundOutcome(round_index, budget, precision, "exact" if exact else "target", None, budget)
    rate = initial_rate
    if len(history) >= 2:
        (n0, p0), (n1, p1) = history[-2], history[-1]
        if n1 > n0 and 0 < p1 < p0 and math.isfinite(p0):
            rate = min(RATE_LIMITS[1], max(RATE_LIMITS[0], math.log(p0 / p1) / math.log(n1 / n0)))
    if math.isfinite(precision):
        projected = budget * (precision / target.value) ** (1 / rate)
        wanted = min(MAX_GROWTH * budget, max(MIN_GROWTH * budget, MARGIN * projected))
    else:  # no error bars yet (too few sample groups): grow as fast as allowed
        projected, wanted = math.inf, MAX_GROWTH * budget
    projected_budget = int(min(projected, 2**62)) if math.isfinite(projected) else cap
    if budget >= cap:
        return RoundOutcome(round_index, budget, precision, "cap", None, projected_budget)
    return RoundOutcome(round_index, budget, precision, None, int(min(cap, math.ceil(wanted))), projected_budget)
