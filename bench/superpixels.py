"""Accuracy where users work: 49 and 196 superpixels (section ``superpixels`` of bench/run.py).

The settings people use are shap's VGG16 notebook (SLIC with 50 segments, 1,000 evaluations) and
dianna's MNIST tutorial (200 segments, 1,000 evaluations). No exact values exist there, so each case
gets a reference computed once and cached in bench/models/references/: paired Shapley-kernel
sampling with the additive fit over every superpixel (no tool's own model of the game), whose own
error is estimated from four independent quarters of its evaluations (the spread of their values
around the whole run's, over sqrt(4)) and reported beside the errors it judges.

Tools, side by side at each budget, round s running every tool with seed s: shapfleet as shipped
(``auto``), with KernelSHAP's additive fit (``linear``) and on its previous design (sizes drawn by
the kernel, ``shapfleet_kernel_sizes``), shap's KernelExplainer, and shapiq's
OddSHAP, LeverageSHAP and PolySHAP in their own interpreter (bench/.peers, made by bench/setup.sh;
see bench/peers.py), each class with the full budget (the model runs once for the coalitions every class asks for); their clock starts once that interpreter has
imported shapiq, as shap's starts with shap imported. Figures: the median relative L2 error and
time per budget, the time to 2% and 1% error (the median time at the smallest budget whose median
error is below it), and the coverage of shapfleet's error bars (the share of estimated values
within 1.96 std of the reference, over ``coverage_seeds`` seeds; values it knows exactly, with std
0, are left out).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from peers import receive, send  # noqa: E402  (the pipe's codec, on both of its ends)
from run import shap_value_function  # noqa: E402

from shapfleet.workers.engine.design import size_distribution  # noqa: E402
from shapfleet.workers.engine.estimation import solve_constrained  # noqa: E402
from shapfleet.workers.engine.evaluation import coalition_predictor, evaluate_shard  # noqa: E402
from shapfleet.workers.engine.images import fit_to_model  # noqa: E402
from shapfleet.workers.engine.model import OnnxClassifier  # noqa: E402
from shapfleet.workers.engine.planning import plan_explanation  # noqa: E402
from shapfleet.workers.engine.result import reduce_shards  # noqa: E402
from shapfleet.workers.engine.settings import ExplainSettings  # noqa: E402
from shapfleet.workers.local import explain_array  # noqa: E402

MODELS = HERE / "models"
REFERENCES = MODELS / "references"
PEERS_PYTHON = HERE / ".peers" / "bin" / "python"
SHAPFLEET_TOOLS = {"shapfleet": "auto", "shapfleet_linear": "linear", "shapfleet_kernel_sizes": "auto"}
PEER_TOOLS = ("shapiq_oddshap", "shapiq_leverageshap", "shapiq_polyshap")
TOOLS = (*SHAPFLEET_TOOLS, "shap", *PEER_TOOLS)


def cases() -> dict:
    """The cases: dianna's binary-MNIST model on X_test[1] (SLIC on the 28x28 image, fill 0,
    classes 0 and 1) at 50 and 200 segments, and EfficientNet-Lite0 on skimage's chelsea with the
    VGG16 notebook's SLIC (50 segments, compactness 30, sigma 3), fill 255, top class."""
    import skimage.data

    digit = np.load(MODELS / "binary-mnist.npz")["X_test"][1].reshape(28, 28, 1).astype(np.float32)
    mnist = dict(sigma=0, masker="constant:0", labels=(0, 1), preprocess="unit")
    return {
        "mnist-M49": {"model": MODELS / "mnist_model_tf.onnx", "image": digit, "reference_evaluations": 2_000_000,
                      "settings": ExplainSettings(n_segments=50, **mnist)},
        "mnist-M196": {"model": MODELS / "mnist_model_tf.onnx", "image": digit, "reference_evaluations": 4_000_000,
                       "settings": ExplainSettings(n_segments=200, **mnist)},
        "efficientnet-M49": {"model": MODELS / "efficientnet_lite0.onnx", "image": skimage.data.chelsea().astype(np.float32),
                             "reference_evaluations": 400_000,
                             "settings": ExplainSettings(n_segments=50, compactness=30, sigma=3, masker="constant:255",
                                                         top_k=1, preprocess="centered", resize="256", center_crop="224")},
    }


class Game:
    """One case's game over all M superpixels: v(z) = the model's explained outputs on the image
    with the superpixels outside z filled (``n x K``), and the plan shapfleet makes for it."""

    def __init__(self, case: dict) -> None:
        settings = case["settings"]
        self.classifier = OnnxClassifier(case["model"].read_bytes(), settings)
        self.image = fit_to_model(case["image"], self.classifier.input_size, settings.resize, settings.center_crop)
        self.settings = settings.replace(nsamples=1000)
        plan = plan_explanation(self.image, self.classifier.predict, self.settings)
        self.segments, self.classes = plan.segments, list(plan.classes)
        self.n_players = int(self.segments.max()) + 1
        self.fill = float(settings.masker_spec.values[0])
        self.v_empty, self.v_full = plan.v_empty, plan.v_full
        self._value = shap_value_function(self.classifier, self.image, self.segments, self.fill, True, self.classes)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(self._value(np.asarray(z, dtype=bool)), dtype=np.float64)


def reference(name: str, case: dict, game: Game) -> dict:
    """The case's cached reference values (computed on first use): ``values`` (M x K) and
    ``own_error`` (relative L2, estimated from four independent quarters)."""
    evaluations = case["reference_evaluations"]
    fingerprint = hashlib.sha256(json.dumps([name, case["settings"].to_dict(), evaluations, str(case["model"].stat().st_size)],
                                            sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = REFERENCES / f"{name}-{fingerprint}.npz"
    if path.exists():
        cached = np.load(path)
        return {"values": cached["values"], "own_error": float(cached["own_error"]), "evaluations": evaluations}
    started = time.perf_counter()
    m, k = game.n_players, len(game.classes)
    q = size_distribution(m)
    rng = np.random.default_rng(20261201)
    quarters = []
    for quarter in range(4):
        a, b, count = np.zeros((m, m)), np.zeros((m, k)), 0
        while count < evaluations // 4:
            sizes = rng.choice(m + 1, size=2048, p=q)
            z = np.argsort(np.argsort(rng.random((2048, m)), axis=1), axis=1) < sizes[:, None]
            pairs = np.concatenate([z, ~z])
            y = game(pairs) - game.v_empty
            zf = pairs.astype(np.float64)
            a += zf.T @ zf
            b += zf.T @ y
            count += len(pairs)
        quarters.append((a / count, b / count))
        print(f"[superpixels] {name}: reference quarter {quarter + 1}/4 ({time.perf_counter() - started:.0f}s)", flush=True)
    total = game.v_full - game.v_empty
    values = solve_constrained(sum(a for a, _ in quarters) / 4, sum(b for _, b in quarters) / 4, total)
    spread = np.std([solve_constrained(a, b, total) for a, b in quarters], axis=0, ddof=1) / 2
    own_error = float(np.linalg.norm(spread) / np.linalg.norm(values))
    REFERENCES.mkdir(parents=True, exist_ok=True)
    np.savez(path, values=values, own_error=own_error)
    return {"values": values, "own_error": own_error, "evaluations": evaluations}


def start_peer() -> subprocess.Popen:
    """A peer process that has imported shapiq (bench/peers.py says ``ready`` then)."""
    process = subprocess.Popen([str(PEERS_PYTHON), str(HERE / "peers.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    if process.stdout.readline() != b"ready\n":
        raise RuntimeError("bench/peers.py did not start")
    return process


def run_peer(process: subprocess.Popen, tool: str, game: Game, budget: int, seed: int) -> np.ndarray:
    """A shapiq approximator's values (M x K) from a started peer ``process``, the game served to
    it over the pipe."""
    request = {"tool": tool, "players": game.n_players, "budget": budget, "seed": seed, "classes": len(game.classes)}
    process.stdin.write((json.dumps(request) + "\n").encode())
    process.stdin.flush()
    # Each class asks for the same coalitions (same seed): the model runs once for all of them, as
    # shapfleet's and shap's evaluations serve every class.
    answered: dict = {}
    while len(coalitions := receive(process.stdout)):
        key = hashlib.sha256(np.packbits(coalitions, axis=1).tobytes() + str(coalitions.shape).encode()).digest()
        if key not in answered:
            answered[key] = game(coalitions)
        send(process.stdin, answered[key])
    values = receive(process.stdout)
    if process.wait() != 0:
        raise RuntimeError(f"{tool} failed")
    return values


@contextlib.contextmanager
def kernel_sized_design():
    """shapfleet's previous coalition design, for ``shapfleet_kernel_sizes``: sampled sizes drawn
    by the Shapley kernel q (inverting its distribution function) instead of uniformly, with flat
    weights q_R / N_S instead of importance weights. Patched into the design for the duration."""
    from shapfleet.workers.engine import design as module

    def kernel_stream(self, block: int):
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(block,)))
        cdf = np.cumsum(self.q[1:self.n_players])
        sizes = 1 + np.searchsorted(cdf / cdf[-1], rng.random(module.RAW_PAIRS_PER_BLOCK), side="right")
        return np.minimum(sizes, self.n_players - 1), rng

    saved = module.CoalitionDesign._block_stream, module._sampling_weight_table, module.CoalitionDesign.sampled_share
    module.CoalitionDesign._block_stream = kernel_stream
    module._sampling_weight_table = lambda m: np.ones(m + 1)
    module.CoalitionDesign.sampled_share = property(lambda self: self.sampled_mass)
    try:
        yield
    finally:
        module.CoalitionDesign._block_stream, module._sampling_weight_table, module.CoalitionDesign.sampled_share = saved


def run_tool(tool: str, game: Game, budget: int, seed: int) -> tuple[np.ndarray, float, float | None]:
    """One tool's values, seconds, and (shapfleet's) seconds of the fit alone."""
    from run import shap_kernel

    peer = start_peer() if tool in PEER_TOOLS else None
    started = time.perf_counter()
    fit_seconds = None
    if tool in SHAPFLEET_TOOLS:
        # explain_array's steps, with the reduce (the fit) timed on its own.
        settings = game.settings.replace(nsamples=budget, seed=seed, estimator=SHAPFLEET_TOOLS[tool])
        with kernel_sized_design() if tool == "shapfleet_kernel_sizes" else contextlib.nullcontext():
            plan = plan_explanation(game.image, game.classifier.predict, settings)
            shards = [evaluate_shard(plan, 0, game.classifier.predict,
                                     predict_coalitions=coalition_predictor(game.classifier, plan))]
            fitting = time.perf_counter()
            result = reduce_shards(plan, shards)
            fit_seconds = time.perf_counter() - fitting
        values = result.values
    elif tool == "shap":
        values = shap_kernel(game.classifier, game.image, game.segments, game.fill, game.classes, budget, True, seed)
    else:
        values = run_peer(peer, tool, game, budget, seed)
    return values, time.perf_counter() - started, fit_seconds


def coverage(game: Game, truth: np.ndarray, budget: int, seeds: int) -> dict:
    """The share of shapfleet's estimated values (std > 0) within 1.96 std of ``truth``, and the
    fit ``auto`` used."""
    covered = []
    for seed in range(seeds):
        result = explain_array(game.image, game.classifier.predict, game.settings.replace(nsamples=budget, seed=1000 + seed))
        estimated = result.std > 0
        covered.append(np.abs(result.values - truth)[estimated] <= 1.96 * result.std[estimated])
    return {"share": float(np.mean(np.concatenate(covered))), "estimator": result.summary()["estimator"]}


#: Per case: the budgets, the seeds (rounds) per budget, and the budgets whose coverage is measured.
#: MNIST's evaluations cost 0.15 ms, EfficientNet's 5-7 ms here, hence fewer budgets of those; 6 seeds,
#: since its errors vary more from seed to seed (2 seeds put `auto` at 0.52 of shap's error at 4,000
#: evaluations, 6 at 0.60).
PLAN = {
    # Coverage where auto fits one kriging (1,000 and 4,000), a committee (8,000) and, past 16,384
    # pairs, the additive fit (40,000).
    "mnist-M49": ((500, 1000, 2000, 4000, 8000, 16000), 3, (1000, 4000, 8000, 40000)),
    "mnist-M196": ((500, 1000, 2000, 4000, 8000), 3, (1000, 4000, 8000, 40000)),
    "efficientnet-M49": ((1000, 2000, 4000), 6, (1000,)),
}


def measure_superpixels(coverage_seeds: int = 20, names: list[str] | None = None) -> dict:
    """Every case of :data:`PLAN` (or those in ``names``)."""
    results = {}
    tools = TOOLS if PEERS_PYTHON.exists() else tuple(t for t in TOOLS if t not in PEER_TOOLS)
    if tools != TOOLS:
        print("[superpixels] bench/.peers is missing (bash bench/setup.sh makes it): shapiq's tools are left out", flush=True)
    for name, case in cases().items():
        if names and name not in names:
            continue
        game = Game(case)
        ref = reference(name, case, game)
        truth, norm = ref["values"], np.linalg.norm(ref["values"])
        rows = []
        budgets, rounds, coverage_budgets = PLAN[name]
        for budget in budgets:
            errors: dict = {tool: [] for tool in tools}
            times: dict = {tool: [] for tool in tools}
            fits: dict = {tool: [] for tool in SHAPFLEET_TOOLS}
            for seed in range(rounds):
                order = tools[seed % len(tools):] + tools[:seed % len(tools)]
                for tool in order:
                    values, seconds, fit_seconds = run_tool(tool, game, budget, seed)
                    errors[tool].append(float(np.linalg.norm(values - truth) / norm))
                    times[tool].append(seconds)
                    if tool in fits:
                        fits[tool].append(fit_seconds)
            for tool in tools:
                rows.append({"tool": tool, "nsamples": budget, "relative_l2_error": statistics.median(errors[tool]),
                             "seconds": statistics.median(times[tool])})
                if tool in fits:
                    rows[-1]["fit_seconds"] = statistics.median(fits[tool])
                print(f"[superpixels] {name} {tool} n={budget}: error {rows[-1]['relative_l2_error']:.4f} "
                      f"in {rows[-1]['seconds']:.2f}s", flush=True)
        covered = {budget: coverage(game, truth, budget, coverage_seeds) for budget in coverage_budgets}
        print(f"[superpixels] {name} coverage: {covered}", flush=True)
        results[name] = {"superpixels": game.n_players, "seeds": rounds, "reference_evaluations": ref["evaluations"],
                         "reference_own_error": ref["own_error"], "rows": rows, "time_to_error": time_to_error(rows),
                         "coverage": {str(b): c for b, c in covered.items()}, "coverage_seeds": coverage_seeds}
    return results


def time_to_error(rows: list[dict]) -> dict:
    """Per tool and target: the median time at the smallest budget whose median error is below it."""
    out = {}
    for tool in dict.fromkeys(r["tool"] for r in rows):
        mine = sorted((r for r in rows if r["tool"] == tool), key=lambda r: r["nsamples"])
        out[tool] = {f"{t:.0%}": next((r["seconds"] for r in mine if r["relative_l2_error"] <= t), None) for t in (0.02, 0.01)}
    return out


def markdown(results: dict) -> list[str]:
    lines = ["\n## Error at 49 and 196 superpixels, against high-budget references\n",
             "Median relative L2 error (and seconds) per budget; shapiq's tools spend the budget on each class. "
             "`auto` is shapfleet as shipped; `shapfleet_kernel_sizes` is `auto` on the previous design, which "
             "drew sampled sizes by the Shapley kernel instead of uniformly.\n"]
    for name, r in results.items():
        tools = list(dict.fromkeys(row["tool"] for row in r["rows"]))
        budgets = sorted({row["nsamples"] for row in r["rows"]})
        cell = {(row["tool"], row["nsamples"]): row for row in r["rows"]}
        lines += [f"\n**{name}** (M = {r['superpixels']}; reference: {r['reference_evaluations']:,} evaluations, own error "
                  f"{100 * r['reference_own_error']:.2f}%; medians of {r['seeds']} seeds)\n",
                  "| tool | " + " | ".join(f"{b:,} evals" for b in budgets) + " | time to 2% | time to 1% |",
                  "|---|" + "---|" * (len(budgets) + 2)]
        for tool in tools:
            cells = [f"{100 * cell[tool, b]['relative_l2_error']:.2f}% ({cell[tool, b]['seconds']:.2f}s)" for b in budgets]
            reach = [f"{r['time_to_error'][tool][t]:.2f}s" if r["time_to_error"][tool][t] is not None else "-" for t in ("2%", "1%")]
            lines.append(f"| {tool} | " + " | ".join(cells) + " | " + " | ".join(reach) + " |")
        fits = [row for row in r["rows"] if row["tool"] == "shapfleet" and "fit_seconds" in row]
        if fits:
            lines.append("\nshapfleet's fit (the reduce) took " + ", ".join(
                f"{row['fit_seconds']:.2f}s ({100 * row['fit_seconds'] / row['seconds']:.0f}% of the run) at {row['nsamples']:,}"
                for row in fits) + ".")
        lines.append("\nCoverage of shapfleet's 1.96 std bars over " + f"{r['coverage_seeds']} seeds: "
                     + ", ".join(f"{100 * c['share']:.0f}% at {int(b):,} evaluations ({c['estimator']})"
                                 for b, c in r["coverage"].items()) + ".")
    return lines
