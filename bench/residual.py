"""How much of a game's odd part any model of it predicts (section ``residual`` of bench/run.py).

Every estimator that fits the odd part h(x) = (v(z) - v(1 - z)) / 2 to the evaluated pairs (kriging,
a surrogate, KernelSHAP's additive fit) is limited by what no model it can fit predicts: a
component of h that looks like noise at the sampled points enters the values as noise enters a
regression, with error variance proportional to its variance over the number of pairs. So if the
best predictor found leaves a share r of h's variance on held-out pairs and the additive fit a
share r_1, no such estimator's error falls much below sqrt(r / r_1) times the additive fit's
(paired KernelSHAP's) at the same design and budget.

Measured on one case (default the EfficientNet one of bench/superpixels.py, whose 4,000-evaluation
target is the one not met): the pairs of ``seeds`` designs of 4,000 evaluations (shapfleet's own
design, seeds 0..), pooled (distinct pairs only, sizes 1 and M - 1 left out: the grand coalition's
neighbours, which every fit treats alike), a quarter held out. Predictors, least squares on the
other three quarters: the additive terms x_i; with the connected triples of kriging's local terms;
with size-varying linear terms x_i t^2, x_i t^4 (t = mean(x), so that each superpixel's effect may
depend on how much of the image is shown); both. Then a gradient-boosted tree ensemble and a
two-layer perceptron (scikit-learn) fitted to the best of those fits' residual, with the data
symmetrised (x, r) and (-x, -r) so that they see an odd function; and kriging's isotropic kernel
(the degree decays rho of :data:`~shapfleet.workers.engine.kriging.RHO_GRID` around REML's usual
choice) fitted to 6,000 of the training pairs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from shapfleet.workers.engine import kriging  # noqa: E402
from shapfleet.workers.engine.evaluation import coalition_predictor, evaluate_shard  # noqa: E402
from shapfleet.workers.engine.planning import plan_explanation  # noqa: E402

BUDGET = 4000
KRIGING_TRAIN = 6000


def pooled_pairs(game, seeds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct pairs (+-1 points, first player +1) of ``seeds`` designs of :data:`BUDGET`
    evaluations and their odd parts (first class), sizes 1 and M - 1 left out; and the plan's
    adjacency of superpixels."""
    xs, odd = [], []
    for seed in range(seeds):
        plan = plan_explanation(game.image, game.classifier.predict, game.settings.replace(nsamples=BUDGET, seed=seed))
        shard = evaluate_shard(plan, 0, game.classifier.predict, predict_coalitions=coalition_predictor(game.classifier, plan))
        shard._flush()
        m = plan.design.n_players
        z = np.concatenate([np.unpackbits(shard.enumerated_bits, axis=1, count=m),
                            np.unpackbits(shard.sampled_bits, axis=1, count=m)]).astype(bool)
        x, h = kriging.pair_observations(z, np.concatenate([shard.enumerated_y, shard.sampled_y]), plan.v_full - plan.v_empty)
        xs.append(x[:-1])  # the grand coalition last: the efficiency constraint, not a pair
        odd.append(h[:-1, 0])
    x, h = np.vstack(xs), np.concatenate(odd)
    x, first = np.unique(x, axis=0, return_index=True)
    h = h[first]
    positives = (x > 0).sum(axis=1)
    inner = (positives > 1) & (positives < x.shape[1] - 1)
    return x[inner], h[inner], plan.player_adjacency


def measure_residual(seeds: int = 6, name: str = "efficientnet-M49") -> dict:
    """Each predictor's share of the held-out odd part's variance left (see the module's docstring),
    and the floor sqrt(best share / additive share) it puts under a fit of the pairs."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.neural_network import MLPRegressor
    from superpixels import Game, cases

    game = Game(cases()[name])
    x, h, adjacency = pooled_pairs(game, seeds)
    m = x.shape[1]
    test = np.random.default_rng(0).random(len(x)) < 0.25
    variance = float(np.var(h[test]))
    triples = kriging.LocalTerms.at(x, kriging.connected_triples(adjacency)).features
    t = x.mean(axis=1, keepdims=True)
    size_varying = np.hstack([x * t ** 2, x * t ** 4])

    def left(features: np.ndarray) -> tuple[float, np.ndarray]:
        coef = np.linalg.lstsq(features[~test], h[~test], rcond=None)[0]
        residual = h - features @ coef
        return float(np.mean(residual[test] ** 2) / variance), residual

    shares, residuals = {}, {}
    for label, features in (("additive", x), ("additive + connected triples", np.hstack([x, triples])),
                            ("additive + size-varying", np.hstack([x, size_varying])),
                            ("additive + connected triples + size-varying", np.hstack([x, triples, size_varying]))):
        shares[label], residuals[label] = left(features)
        print(f"[residual] {label}: {100 * shares[label]:.2f}% of the odd part's variance left", flush=True)
    residual = residuals["additive + connected triples + size-varying"]  # the richest linear family's
    inputs = np.vstack([x[~test], -x[~test]])
    targets = np.concatenate([residual[~test], -residual[~test]])
    for label, model in (("... + gradient-boosted trees on its residual", HistGradientBoostingRegressor(max_iter=500, learning_rate=0.05, random_state=0)),
                         ("... + perceptron (128, 128) on its residual",
                          MLPRegressor(hidden_layer_sizes=(128, 128), alpha=1e-3, max_iter=500, early_stopping=True, random_state=0))):
        model.fit(inputs, targets)
        predicted = (model.predict(x[test]) - model.predict(-x[test])) / 2
        shares[label] = float(np.mean((residual[test] - predicted) ** 2) / variance)
        print(f"[residual] {label}: {100 * shares[label]:.2f}%", flush=True)
    train, held = np.flatnonzero(~test)[:KRIGING_TRAIN], np.flatnonzero(test)
    agreement = np.rint((m + x @ x[train].T) / 2).astype(np.int64)  # players on which two points agree
    for rho in (0.2, 0.4, 0.7):
        # kriging's own universal-kriging solve (flat linear terms), then its posterior mean off the points
        fitted = kriging._solve(x[train], h[train, None], agreement[train], rho)
        predicted = x[held] @ fitted["beta"][:, 0] + kriging._tables(m, rho)[0][agreement[held]] @ fitted["alpha"][:, 0]
        label = f"kriging, isotropic kernel rho={rho} ({KRIGING_TRAIN:,} training pairs)"
        shares[label] = float(np.mean((h[held] - predicted) ** 2) / variance)
        print(f"[residual] {label}: {100 * shares[label]:.2f}%", flush=True)
    best = min(shares.values())
    return {"case": name, "seeds": seeds, "budget": BUDGET, "pairs": int(len(x)), "held_out": int(test.sum()),
            "share_left": shares, "best_share_left": best,
            "error_floor_over_additive": float(np.sqrt(best / shares["additive"]))}


def markdown(result: dict) -> list[str]:
    lines = [f"\n## What a model of the odd part predicts ({result['case']})\n",
             f"{result['pairs']:,} distinct pairs of {result['seeds']} designs of {result['budget']:,} evaluations, "
             f"{result['held_out']:,} held out; the share of the odd part's variance each predictor leaves on them.\n",
             "| predictor | variance left |", "|---|---|"]
    lines += [f"| {label} | {100 * share:.2f}% |" for label, share in result["share_left"].items()]
    lines.append(f"\nFloor on any fit of the odd part: about {result['error_floor_over_additive']:.2f} of the additive "
                 "fit's error at the same design (sqrt of the best share over the additive one's).\n")
    return lines
