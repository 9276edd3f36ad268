"""Precision on request (section ``targets`` of bench/run.py): does ``--target-error`` stop where it should?

For each case and seed, a run with ``target_error`` R (the engine's own rounds,
:func:`~shapfleet.workers.engine.result.explain_to_target`) is judged two ways:

- **achieved error**: its largest error against the truth in the target's units, max over classes of
  max_i |phi_i - truth_i| / max_i |truth_i|, over R. The truth is the exact Shapley values (full
  enumeration) on the M <= 16 cases of the ``accuracy`` section, and the cached high-budget
  references of the ``superpixels`` section at M = 49 and 196 (their own error is reported beside).
- **evaluations spent against the fewest**: the coalitions the run evaluated (every round's, those
  evaluated twice included) over the fewest with which a fixed ``nsamples`` run of the same seed
  meets the target (its largest standard error over max |value| <= R), found on a grid of budgets
  5% apart from the first round's, refined to 1% below the first that meets it.

The model's outputs are kept per coalition (designs of one seed are nested, so the fixed-budget runs
reuse the target run's evaluations); the counts come from the engine, not from that cache.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from shapfleet.workers.engine.design import CoalitionDesign  # noqa: E402
from shapfleet.workers.engine.estimation import estimate  # noqa: E402
from shapfleet.workers.engine.evaluation import coalition_predictor, evaluate_units  # noqa: E402
from shapfleet.workers.engine.images import fit_to_model  # noqa: E402
from shapfleet.workers.engine.model import OnnxClassifier  # noqa: E402
from shapfleet.workers.engine.planning import plan_explanation  # noqa: E402
from shapfleet.workers.engine.result import explain_to_target  # noqa: E402
from shapfleet.workers.engine.rounds import Target, cap_of  # noqa: E402

#: Per case: the target_error asked for and the seeds. The targets are set where the runs stop
#: between about 1,000 and 10,000 coalitions, the budgets people use.
PLAN = {
    "mnist-M12": (0.01, 20), "mnist-M16": (0.01, 20), "efficientnet-M12": (0.02, 20),
    "mnist-M49": (0.005, 20), "mnist-M196": (0.02, 20), "efficientnet-M49": (0.15, 20),
}


class CachedGame:
    """The fused model call of one case's plan, remembered per coalition (packed bits)."""

    def __init__(self, classifier: OnnxClassifier, plan) -> None:
        self.predict = coalition_predictor(classifier, plan)
        self.known: dict[bytes, np.ndarray] = {}
        self.model_rows = 0

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        keys = [row.tobytes() for row in np.packbits(coalitions, axis=1)]
        missing = [i for i, key in enumerate(keys) if key not in self.known]
        if missing:
            outputs = np.asarray(self.predict(coalitions[missing]), dtype=np.float64)
            self.model_rows += len(missing)
            for i, row in zip(missing, outputs):
                self.known[keys[i]] = row
        return np.stack([self.known[key] for key in keys])


def _cases() -> dict:
    from run import exact_cases
    from superpixels import cases as superpixel_cases

    return {**{name: {**case, "exact": True} for name, case in exact_cases().items()},
            **{name: {**case, "exact": False} for name, case in superpixel_cases().items()}}


def _truth(name: str, case: dict, classifier, image, settings) -> tuple[np.ndarray, float]:
    """The case's truth (M x K over every superpixel) and its own relative error."""
    if case["exact"]:
        from shapfleet.workers.local import explain_array

        exact = explain_array(image, classifier.predict, settings.replace(target_error=None, nsamples=2 ** 20))
        assert exact.exact
        return exact.values, 0.0
    from superpixels import Game, reference

    ref = reference(name, case, Game(case))
    return ref["values"], ref["own_error"]


def _largest_error(values: np.ndarray, truth: np.ndarray) -> float:
    """In the target's units: max over classes of max_i |phi_i - truth_i| / max_i |truth_i|."""
    return float((np.abs(values - truth).max(axis=0) / np.abs(truth).max(axis=0)).max())


def _rms_error(values: np.ndarray, truth: np.ndarray) -> float:
    """The same with the root mean square over the values in place of the largest: what a std target
    bounds (each value's error has a std of at most the target; the largest of M such errors is
    about 2-3 times that, for 49 to 196 values)."""
    return float((np.sqrt(((values - truth) ** 2).mean(axis=0)) / np.abs(truth).max(axis=0)).max())


def _fixed_precision(plan, game: CachedGame, classifier, budget: int, target: Target) -> float:
    """The precision a fixed ``budget`` run of ``plan``'s seed reaches (its largest std over max |value|)."""
    design = CoalitionDesign.create(plan.n_players, budget, plan.design.seed)
    stats = evaluate_units(plan, design, design.units, 0, classifier.predict, predict_coalitions=game)
    result = estimate(design, stats, plan.v_empty, plan.v_full, plan.settings.estimator, plan.player_adjacency)
    return target.precision(result.values, result.std)


def _fewest(plan, game: CachedGame, classifier, target: Target, ceiling: int) -> int:
    """The fewest coalitions (5% grid, then 1%) with which a fixed run meets the target; ``ceiling``
    (the target run's own, which met it) when none below does."""
    budget = plan.design.n_coalitions
    previous = None
    while budget < ceiling:
        if _fixed_precision(plan, game, classifier, budget, target) <= target.value:
            break
        previous, budget = budget, int(budget * 1.05) + 1
    else:
        budget = ceiling
    if previous is None:
        return budget
    for finer in range(previous + max(1, previous // 100), budget, max(1, previous // 100)):
        if _fixed_precision(plan, game, classifier, finer, target) <= target.value:
            return finer
    return budget


def measure_targets(names: list[str] | None = None, seeds: int | None = None) -> dict:
    results = {}
    for name, case in _cases().items():
        if name not in PLAN or (names and name not in names):
            continue
        target_error, case_seeds = PLAN[name]
        case_seeds = seeds or case_seeds
        settings = case["settings"].replace(target_error=target_error, nsamples=None)
        classifier = OnnxClassifier(case["model"].read_bytes(), settings)
        image = fit_to_model(case["image"], classifier.input_size, settings.resize, settings.center_crop)
        truth, own_error = _truth(name, case, classifier, image, settings)
        runs = []
        started = time.perf_counter()
        for seed in range(case_seeds):
            plan = plan_explanation(image, classifier.predict, settings.replace(seed=seed))
            game = CachedGame(classifier, plan)
            target = Target.of(plan.settings)
            explanation = explain_to_target(
                plan, lambda design, units, index: evaluate_units(plan, design, units, index, classifier.predict,
                                                                  predict_coalitions=game),
                cap_of(plan.settings))
            spent = explanation.n_evaluations - plan.planning_evaluations
            fewest = _fewest(plan, game, classifier, target, explanation.n_coalitions)
            runs.append({"seed": seed, "coalitions": explanation.n_coalitions, "spent": spent, "fewest": fewest,
                         "rounds": explanation.extra["rounds"], "stopped_because": explanation.extra["stopped_because"],
                         "estimator": explanation.extra["estimator"], "achieved_std": explanation.extra["achieved"],
                         "largest_error": _largest_error(explanation.values, truth),
                         "rms_error": _rms_error(explanation.values, truth)})
            print(f"[targets] {name} seed {seed}: {runs[-1]}", flush=True)
        ratios = [r["largest_error"] / target_error for r in runs]
        spending = [r["spent"] / r["fewest"] for r in runs]
        results[name] = {
            "superpixels": int(truth.shape[0]), "target_error": target_error, "seeds": case_seeds,
            "truth": "exact" if case["exact"] else "reference", "truth_own_error": own_error,
            "share_error_within_1.5x": float(np.mean([r <= 1.5 for r in ratios])),
            "median_error_over_target": statistics.median(ratios),
            "share_rms_error_within_target": float(np.mean([r["rms_error"] <= target_error for r in runs])),
            "median_largest_error_over_achieved_std": statistics.median(
                r["largest_error"] / r["achieved_std"] for r in runs if r["achieved_std"]) if any(r["achieved_std"] for r in runs) else None,
            "share_spent_within_1.3x": float(np.mean([s <= 1.3 for s in spending])),
            "median_spent_over_fewest": statistics.median(spending),
            "median_rounds": statistics.median(r["rounds"] for r in runs),
            "median_coalitions": statistics.median(r["coalitions"] for r in runs),
            "seconds": time.perf_counter() - started, "runs": runs,
        }
        print(f"[targets] {name}: {({k: v for k, v in results[name].items() if k != 'runs'})}", flush=True)
    return results


def markdown(results: dict) -> list[str]:
    lines = ["\n## Precision on request: `--target-error`\n",
             "Per case, over its seeds: the share of runs whose largest error against the truth (max over "
             "classes of max |error| / max |truth|) is within 1.5x the target, and whose evaluations spent are "
             "within 1.3x of the fewest with which a fixed-budget run of the same seed meets the target.\n",
             "| case | M | target_error | seeds | largest error <= 1.5x target | median largest error / target | "
             "median largest error / achieved std | RMS error <= target | spent <= 1.3x fewest | median spent / fewest | "
             "median rounds | median coalitions |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        over_std = r.get("median_largest_error_over_achieved_std")
        lines.append(f"| {name} ({r['truth']}) | {r['superpixels']} | {r['target_error']} | {r['seeds']} | "
                     f"{r['share_error_within_1.5x']:.0%} | {r['median_error_over_target']:.2f} | "
                     f"{'-' if over_std is None else f'{over_std:.2f}'} | {r.get('share_rms_error_within_target', 0):.0%} | "
                     f"{r['share_spent_within_1.3x']:.0%} | {r['median_spent_over_fewest']:.2f} | "
                     f"{r['median_rounds']:g} | {r['median_coalitions']:g} |")
    return lines


if __name__ == "__main__":
    import json

    chosen = sys.argv[1].split(",") if len(sys.argv) > 1 else None
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in
                      measure_targets(chosen, int(sys.argv[2]) if len(sys.argv) > 2 else None).items()}, indent=1))
