"""shapfleet benchmarks, measured side by side in one run (run bench/setup.sh first).

    .venv/bin/python bench/run.py [--repeats 5] [--only limit,accuracy,service,scaling,overhead]

Writes bench/results/results.json, bench/results/error_vs_time.png and bench/results/README.md.
What is measured (medians over --repeats, every figure a ratio against a number from the same run;
the tools compared in a section are timed in alternating rounds, so that the machine's drift over
minutes falls on all of them alike):

limit     the inference limit: onnxruntime alone on the same masked images at its best batch size,
          one run at a time or one-thread runs side by side, whichever is faster,
          against shapfleet's engine (plan + shards + reduce, model loaded) and shap.KernelExplainer
          (l1_reg=False) with a vectorised masking function and with the VGG16 notebook's per-row,
          per-segment loop, all at the seed notebooks' settings.
accuracy  relative L2 error against exact Shapley values (full enumeration) for shapfleet (estimator
          auto, cubic and linear), and shap.KernelExplainer at nsamples 256..4096 on 12- and 16-superpixel
          cases, and the time each needs to reach 5%, 2% and 1% error (medians over --seeds seeds;
          by default 9 on the MNIST cases and 3 on EfficientNet).
service   a ~2000-evaluation job through the API, Redis, SeaweedFS and 2 workers against the same job
          in-process.
scaling   the same job on 1 and on 2 worker processes with one inference thread each (two stacks up
          at once, their jobs alternating).
superpixels  error and time at 49 and 196 superpixels (dianna's MNIST model, EfficientNet-Lite0 with the
          VGG16 notebook's SLIC) against cached high-budget references, beside shap and shapiq's
          OddSHAP, LeverageSHAP and PolySHAP; coverage of the error bars (bench/superpixels.py).
          ``--cases`` picks some of its cases.
targets   --target-error on the exact M <= 16 cases and the 49/196-superpixel cases over 20 seeds: the
          largest error against the truth over the target, and the evaluations spent over the fewest a
          fixed-budget run of the same seed needs (bench/targets.py; ``--cases`` applies too).
residual  how much of the EfficientNet 49-superpixel game's odd part any model fitted to pairs
          predicts on held-out pairs, and the floor that puts under every such fit's error
          (bench/residual.py).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from shapfleet.workers.engine.images import fit_to_model  # noqa: E402
from shapfleet.workers.engine.model import OnnxClassifier  # noqa: E402
from shapfleet.workers.engine.planning import plan_explanation  # noqa: E402
from shapfleet.workers.engine.sessions import available_cpus  # noqa: E402
from shapfleet.workers.engine.settings import ExplainSettings  # noqa: E402
from shapfleet.workers.local import explain_array  # noqa: E402

MODELS = HERE / "models"
RESULTS = HERE / "results"
BATCH_SIZES = (1, 8, 16, 32, 64, 128)


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved_times(functions: dict, repeats: int, first_round: int = 0) -> dict:
    """Seconds of each run of each function, timed in rounds that run every function once (round r
    starting r functions later; rounds are numbered from ``first_round``). This machine's speed
    drifts over minutes; timing one function's repeats and then the next's puts that drift into
    their ratio, rounds spread it over all."""
    names = list(functions)
    times: dict = {name: [] for name in names}
    for round_index in range(first_round, first_round + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - started)
    return times


def interleaved_medians(functions: dict, repeats: int) -> dict:
    """Median seconds of each function over :func:`interleaved_times`' rounds."""
    return {name: statistics.median(values) for name, values in interleaved_times(functions, repeats).items()}


# -- cases ----------------------------------------------------------------------------------------
def mnist_image(index: int = 0) -> np.ndarray:
    data = np.load(MODELS / "binary-mnist.npz")
    return data["X_test"][index].reshape(28, 28, 1).astype(np.float32)


def photo(name: str = "chelsea") -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)().astype(np.float32)


def cases() -> dict:
    mnist = ExplainSettings(n_segments=200, sigma=0, masker="constant:0", labels=(0, 1), nsamples=1000, preprocess="unit")
    efficientnet = ExplainSettings(n_segments=50, compactness=30, sigma=3, masker="constant:255", top_k=3, nsamples=1000,
                                   preprocess="centered", resize="256", center_crop="224")
    return {
        "mnist": {"model": MODELS / "mnist_model_tf.onnx", "image": mnist_image(), "settings": mnist},
        "efficientnet": {"model": MODELS / "efficientnet_lite0.onnx", "image": photo("chelsea"), "settings": efficientnet},
    }


def load_case(case: dict, threads: int | None = None):
    settings = case["settings"]
    model_bytes = case["model"].read_bytes()
    classifier = OnnxClassifier(model_bytes, settings, threads=threads)
    image = fit_to_model(case["image"], classifier.input_size, settings.resize, settings.center_crop)
    return model_bytes, classifier, image


# -- 1. the inference limit against shapfleet and shap ------------------------------------------------
def masked_inputs(classifier, image, settings) -> tuple[np.ndarray, object]:
    """The model-ready inputs of every coalition shapfleet evaluates (the limit runs exactly these)."""
    plan = plan_explanation(image, classifier.predict, settings)
    batches = []
    for shard in plan.shard_units:
        for unit in shard:
            z, _ = plan.design.coalitions(unit)
            composites = plan.masker.compose(image, z[:, plan.game_segments])  # z is over the players
            batches.append(classifier.to_model_input(composites))
    return np.concatenate(batches), plan


def raw_runners(model_bytes: bytes, input_name: str) -> dict:
    """Ways onnxruntime alone runs a batch of inputs, ``run(inputs, batch)``, in runs of ``batch``:
    one run at a time on every thread with its default options (threads spin between runs) and
    without spinning, and one-thread runs side by side on a thread per CPU, each thread taking every
    W-th run (what shapfleet does on the CPU; see ``ConcurrentRuns``). The limit is the fastest."""
    import onnxruntime as ort

    runners = {}
    for spinning in ("1", "0"):
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

        def one_at_a_time(inputs, batch, session=session):
            for start in range(0, len(inputs), batch):
                session.run(None, {input_name: inputs[start:start + batch]})

        runners[f"spinning={spinning}"] = one_at_a_time
    workers = available_cpus()
    if workers > 1:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        single = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

        def side_by_side(inputs, batch):
            starts = list(range(0, len(inputs), batch))

            def work(mine):
                for start in mine:
                    single.run(None, {input_name: inputs[start:start + batch]})

            threads = [threading.Thread(target=work, args=(starts[k::workers],)) for k in range(workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        runners[f"side_by_side={workers}"] = side_by_side
    return runners


def best_batch_size(run, inputs: np.ndarray) -> tuple[int, dict]:
    sample = inputs[:min(len(inputs), 256)]
    per_image = {}
    for size in BATCH_SIZES:
        run(sample, size)  # warm-up: onnxruntime allocates per shape on first use
        per_image[size] = median_time(lambda: run(sample, size), 2) / len(sample)
    return min(per_image, key=per_image.get), per_image


def limit_candidates(model_bytes: bytes, input_name: str, inputs: np.ndarray) -> dict:
    """Each of :func:`raw_runners` at its best batch size: label -> (seconds per image there, the
    batch size, seconds per image by batch size, the runner)."""
    candidates = {}
    for label, run in raw_runners(model_bytes, input_name).items():
        size, per_image = best_batch_size(run, inputs)
        candidates[label] = (per_image[size], size, per_image, run)
    return candidates


def fastest(candidates: dict, labels=None) -> tuple[str, int, dict, object]:
    """The fastest of ``candidates`` (of those whose label is in ``labels``, when given): (its
    label, the batch size, seconds per image by batch size, the runner)."""
    label = min((k for k in candidates if labels is None or k in labels), key=lambda k: candidates[k][0])
    _, batch, per_image, run = candidates[label]
    return label, batch, per_image, run


def shap_value_function(classifier, image, segments, background: float, vectorised: bool, classes):
    def vectorised_mask(z: np.ndarray) -> np.ndarray:
        keep = z.astype(bool)[:, segments]
        return np.where(keep[..., None], image[None], np.float32(background))

    def notebook_mask(z: np.ndarray) -> np.ndarray:
        # The VGG16 notebook's mask_image: a Python loop over rows and segments.
        out = np.zeros((z.shape[0],) + image.shape, dtype=np.float32)
        for i in range(z.shape[0]):
            out[i] = image
            for j in range(z.shape[1]):
                if z[i, j] == 0:
                    out[i][segments == j, :] = background
        return out

    mask = vectorised_mask if vectorised else notebook_mask

    def f(z: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(z), 64):
            outputs.append(classifier.predict(mask(z[start:start + 64])))
        return np.concatenate(outputs)[:, classes]

    return f


def shap_kernel(classifier, image, segments, background, classes, nsamples: int, vectorised: bool, seed: int = 0):
    import shap

    m = int(segments.max()) + 1
    f = shap_value_function(classifier, image, segments, background, vectorised, classes)
    np.random.seed(seed)  # shap's KernelExplainer samples with the global generator
    explainer = shap.KernelExplainer(f, np.zeros((1, m)))
    values = explainer.shap_values(np.ones((1, m)), nsamples=nsamples, l1_reg=False, silent=True)
    return np.stack([v[0] for v in values], axis=1) if isinstance(values, list) else values[0]


def measure_limit(repeats: int) -> dict:
    results = {}
    for name, case in cases().items():
        model_bytes, classifier, image = load_case(case)
        settings = case["settings"]
        inputs, plan = masked_inputs(classifier, image, settings)
        label, batch, per_image, raw = fastest(limit_candidates(model_bytes, classifier.info.input_name, inputs))
        # shapfleet at its own best batch size too: its default (None: runs sized by the model
        # input's bytes) or one a user sets with --batch-size.
        engine_candidates = {size: (lambda size=size: explain_array(image, classifier.predict,
                                                                    settings.replace(batch_size=size)))
                             for size in [None, *sorted({batch, 16, 64})]}
        for run_engine in engine_candidates.values():
            run_engine()  # warm-up: onnxruntime allocates per shape on first use
        engine_times = interleaved_medians(engine_candidates, 2)
        engine_batch = min(engine_times, key=engine_times.get)
        tuned = settings.replace(batch_size=engine_batch)

        def limit():
            raw(inputs, batch)

        def engine():
            explain_array(image, classifier.predict, tuned)

        def engine_with_load():
            fresh = OnnxClassifier(model_bytes, tuned)
            explain_array(image, fresh.predict, tuned)

        background = float(settings.masker_spec.values[0])
        classes = list(plan.classes)
        segments = plan.segments

        def shap_vectorised():
            shap_kernel(classifier, image, segments, background, classes, settings.nsamples, vectorised=True)

        def shap_loop():
            shap_kernel(classifier, image, segments, background, classes, settings.nsamples, vectorised=False)

        engine()  # warm-up
        timings = interleaved_medians({"limit": limit, "shapfleet": engine, "shapfleet_with_model_load": engine_with_load,
                                       "shap_vectorised": shap_vectorised, "shap_notebook_loop": shap_loop}, repeats)
        results[name] = {
            "superpixels": int(plan.n_players), "classes": classes, "evaluations": int(len(inputs)) + plan.planning_evaluations,
            "best_batch_size": batch, "shapfleet_batch_size": engine_batch, "limit_session": label,
            "seconds_per_image_by_batch": per_image, "seconds": timings,
            "ratio_to_limit": {k: v / timings["limit"] for k, v in timings.items()},
            "evaluations_per_second_limit": len(inputs) / timings["limit"],
        }
        print(f"[limit] {name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()), flush=True)
    return results


# -- 2. accuracy against exact values ---------------------------------------------------------------
def exact_cases() -> dict:
    """The accuracy study's cases. ``seeds``: how many seeds (rounds) each budget gets. The MNIST
    runs take well under a second, so their medians are taken over more runs, which the noise of
    this shared machine calls for; EfficientNet's are long enough to be steadier."""
    grid = dict(segmenter="grid", preprocess="unit")
    return {
        "mnist-M12": {"model": MODELS / "mnist_model_tf.onnx", "image": mnist_image(1), "seeds": 9,
                      "settings": ExplainSettings(grid="3x4", masker="constant:0", labels=(0, 1), **grid)},
        "mnist-M16": {"model": MODELS / "mnist_model_tf.onnx", "image": mnist_image(2), "seeds": 9,
                      "settings": ExplainSettings(grid="4x4", masker="constant:0", labels=(0, 1), **grid)},
        "efficientnet-M12": {"model": MODELS / "efficientnet_lite0.onnx", "image": photo("coffee"), "seeds": 3,
                             "settings": ExplainSettings(segmenter="grid", grid="3x4", masker="constant:255", top_k=2,
                                                         preprocess="centered", resize="256", center_crop="224")},
    }


#: shapfleet as shipped (estimator auto: kriging on these cases, short of exact), shapfleet with
#: the third-order surrogate (estimator cubic) and with KernelSHAP's additive fit (estimator linear),
#: and shap's KernelExplainer.
TOOLS = ("shapfleet", "shapfleet_cubic", "shapfleet_linear", "shap_vectorised")
ESTIMATOR_OF_TOOL = {"shapfleet": "auto", "shapfleet_cubic": "cubic", "shapfleet_linear": "linear"}


def measure_accuracy(budgets: list[int], seeds: int | None) -> dict:
    """``seeds``: rounds per budget for every case (None: each case's own ``seeds``)."""
    results = {}
    for name, case in exact_cases().items():
        rounds = seeds or case["seeds"]
        _, classifier, image = load_case(case)
        settings = case["settings"].replace(batch_size=64)
        exact = explain_array(image, classifier.predict, settings.replace(nsamples=2 ** 20))
        assert exact.exact
        m = exact.values.shape[0]
        reference = exact.values
        norm = np.linalg.norm(reference)
        background = float(settings.masker_spec.values[0])
        classes = list(exact.classes)
        rows = []
        for budget in budgets:
            errors: dict[str, list[float]] = {tool: [] for tool in TOOLS}

            def run(tool: str, seed: int) -> None:
                if tool.startswith("shapfleet"):
                    values = explain_array(image, classifier.predict, settings.replace(
                        nsamples=budget, seed=seed, estimator=ESTIMATOR_OF_TOOL[tool])).values
                else:
                    values = shap_kernel(classifier, image, exact.segments, background, classes, budget, True, seed)
                errors[tool].append(float(np.linalg.norm(values - reference) / norm))

            # Round s runs every tool with seed s.
            times: dict[str, list[float]] = {tool: [] for tool in TOOLS}
            for seed in range(rounds):
                timed = interleaved_times({tool: functools.partial(run, tool, seed) for tool in TOOLS}, 1, first_round=seed)
                for tool in TOOLS:
                    times[tool] += timed[tool]
            for tool in TOOLS:
                rows.append({"tool": tool, "nsamples": budget, "relative_l2_error": statistics.median(errors[tool]),
                             "seconds": statistics.median(times[tool])})
                print(f"[accuracy] {name} {tool} n={budget}: error {rows[-1]['relative_l2_error']:.4f} "
                      f"in {rows[-1]['seconds']:.2f}s", flush=True)
        results[name] = {"superpixels": m, "exact_evaluations": exact.n_evaluations, "seeds": rounds, "rows": rows,
                         "time_to_error": time_to_error(rows)}
    return results


def time_to_error(rows: list[dict]) -> dict:
    """For each tool and target, the shortest measured time at which the median error is below it."""
    out = {}
    for tool in sorted({r["tool"] for r in rows}):
        mine = [r for r in rows if r["tool"] == tool]
        out[tool] = {}
        for target in (0.05, 0.02, 0.01):
            reached = [r["seconds"] for r in mine if r["relative_l2_error"] <= target]
            out[tool][f"{target:.0%}"] = min(reached) if reached else None
    return out


# -- 3. service against in-process, and scale-out ---------------------------------------------------------
def _stack(tmp: Path, workers: int, worker_program: list[str] | None = None):
    from shapfleet.api.stack import ApiServer, RedisServer, SeaweedServer, WorkerProcess
    from shapfleet.broker.settings import ServiceSettings

    redis_server = RedisServer.start(tmp / "redis")
    seaweed = SeaweedServer.start(tmp / "seaweed")
    settings = ServiceSettings(redis_url=redis_server.url, s3_endpoint=seaweed.endpoint, s3_access_key=seaweed.access_key,
                               s3_secret_key=seaweed.secret_key, api_keys="bench:bench", ort_threads=1,
                               shard_evaluations=128)
    env = {**os.environ, **settings.environment()}
    api = ApiServer.start(env, tmp / "api.log")
    started = [WorkerProcess.start(env, tmp / f"worker{n}.log", name=f"bench{n}", program=worker_program)
               for n in range(workers)]
    _stack.settings = settings  # the last stack's, for a bench that reads its records itself
    return [redis_server, seaweed, api, *started], api.url


def _fleet_job(url: str, model_id: str, image_png: bytes, settings: ExplainSettings) -> dict:
    """Submit one job for an uploaded model and wait for it (what a timed service run is)."""
    from shapfleet.api.client import Client

    client = Client(url, "bench")
    job = client.submit([image_png], model_id=model_id, settings=settings.to_dict())
    final = client.wait(job["id"], poll_interval=0.05, max_interval=0.2)
    assert final["status"] == "succeeded", final
    return final


def _upload_and_warm(url: str, model: Path, image_png: bytes, settings: ExplainSettings) -> str:
    """Upload the model and run a small job, so every worker's session exists; returns the model id."""
    from shapfleet.api.client import Client

    model_id = Client(url, "bench").upload_model(model)["id"]
    _fleet_job(url, model_id, image_png, settings.replace(nsamples=200))
    return model_id


def _service_job() -> tuple[dict, object, bytes]:
    """The EfficientNet case at 2000 evaluations, and its image as PNG bytes, for the service runs."""
    from PIL import Image

    case = cases()["efficientnet"]
    settings = case["settings"].replace(nsamples=2000, batch_size=32)
    buffer = io.BytesIO()
    Image.fromarray(case["image"].astype(np.uint8)).save(buffer, format="PNG")
    return case, settings, buffer.getvalue()


def measure_service(repeats: int) -> dict:
    from shapfleet.workers.local import explain

    case, settings, png = _service_job()
    with tempfile.TemporaryDirectory() as tmp:
        parts, url = _stack(Path(tmp), workers=2)
        try:
            model_id = _upload_and_warm(url, case["model"], png, settings)
            explain([case["image"]], case["model"], settings.replace(nsamples=200))
            # The stack idles while the in-process runs (its workers wait on the broker).
            seconds = interleaved_medians({
                "service": lambda: _fleet_job(url, model_id, png, settings),
                "in_process": lambda: explain([case["image"]], case["model"], settings),
            }, repeats)
        finally:
            for part in reversed(parts):
                part.stop()
    results = {"in_process_seconds": seconds["in_process"], "service_2_workers_seconds": seconds["service"],
               "ratio_service_to_in_process": seconds["service"] / seconds["in_process"]}
    print(f"[service] in-process {seconds['in_process']:.2f}s, service {seconds['service']:.2f}s", flush=True)
    return results


def measure_scaling(repeats: int) -> dict:
    """The same job on a 1-worker and a 2-worker stack, both up at once and their jobs alternating
    (the idle stack's workers wait on their broker), so both see the same machine."""
    case, settings, png = _service_job()
    with tempfile.TemporaryDirectory() as tmp:
        stacks, jobs, finals = [], {}, []

        def job(url: str, model_id: str) -> None:
            finals.append(_fleet_job(url, model_id, png, settings))

        try:
            for workers in (1, 2):
                parts, url = _stack(Path(tmp) / f"{workers}-workers", workers=workers)
                stacks.append(parts)
                jobs[workers] = functools.partial(job, url, _upload_and_warm(url, case["model"], png, settings))
            runs = interleaved_times(jobs, repeats)
            evaluations = finals[0]["progress"]["evaluations_total"]
        finally:
            for parts in reversed(stacks):
                for part in reversed(parts):
                    part.stop()
    seconds = {workers: statistics.median(times) for workers, times in runs.items()}
    efficiency = seconds[1] / (2 * seconds[2])
    print(f"[scaling] 1 worker {seconds[1]:.2f}s, 2 workers {seconds[2]:.2f}s, efficiency {efficiency:.2f} "
          f"(runs: {runs})", flush=True)
    return {"evaluations": evaluations, "seconds_1_worker": seconds[1], "seconds_2_workers": seconds[2],
            "efficiency": efficiency, "evaluations_per_second_per_worker": evaluations / seconds[1],
            "runs_seconds": {f"{workers}_worker{'s' if workers > 1 else ''}": times for workers, times in runs.items()}}


# -- report -----------------------------------------------------------------------------------------
#: The fleet job's two stacks share this machine's cores with each other, the store, the API and the
#: client, and its ratio moves most from run to run (17-36% in runs of one code): it takes this many
#: rounds per repeat (each under a second a job).
FLEET_ROUNDS_PER_REPEAT = 3


def measure_overhead(repeats: int) -> dict:
    """Whole-process costs around inference, with the shipped example model only (no downloads):
    ``shapfleet --help``, and a 10-image job of every class (grid 4x4, 200 evaluations) with and
    without ``--out``, each a fresh ``shapfleet`` process, in interleaved rounds."""
    import subprocess

    _compile_project()
    command = str(Path(sys.executable).with_name("shapfleet"))
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for n in range(10):
            path = Path(tmp) / f"triangle{n}.png"
            path.write_bytes((REPO / "examples" / "triangle.png").read_bytes())
            images.append(str(path))
        job = [command, "explain", *images, "--model", str(REPO / "examples" / "shapes.onnx"), "--all-classes",
               "--segmenter", "grid", "--grid", "4x4", "--nsamples", "200", "--quiet"]

        def run(args: list[str]):
            return lambda: subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        medians = interleaved_medians({"help": run([command, "--help"]), "job": run(job),
                                       "job_with_out": run([*job, "--out", str(Path(tmp) / "out")])}, repeats)
    return {"help_seconds": medians["help"], "job_seconds": medians["job"],
            "job_with_out_seconds": medians["job_with_out"],
            "artifacts_added": medians["job_with_out"] / medians["job"] - 1, "repeats": repeats,
            "whole_process": measure_whole_process(repeats), "fleet_rendering": measure_fleet_rendering(FLEET_ROUNDS_PER_REPEAT * repeats)}


def _compile_project() -> None:
    """Write the project's bytecode before timing fresh processes, as an install does: where
    ``PYTHONDONTWRITEBYTECODE`` is set, every ``shapfleet`` process would otherwise compile the
    project's modules from source (about 50 ms here), a cost no installed copy pays."""
    import compileall

    for package in ("shapfleet", "api", "broker", "workers"):
        compileall.compile_dir(str(REPO / package), quiet=1)


#: The seed cases as ``shapfleet explain`` flags (the same settings as :func:`cases`).
CASE_FLAGS = {
    "mnist": ["--n-segments", "200", "--sigma", "0", "--masker", "constant:0", "--labels", "0,1", "--nsamples", "1000",
              "--preprocess", "unit"],
    "efficientnet": ["--n-segments", "50", "--compactness", "30", "--sigma", "3", "--masker", "constant:255", "--top-k", "3",
                     "--nsamples", "1000", "--preprocess", "centered", "--resize", "256", "--center-crop", "224"],
}

#: A bare script that does nothing but the inference: import numpy and onnxruntime, load the model
#: and the prepared masked images, run them in batches of 64.
BARE_SCRIPT = """
import sys, numpy, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
inputs = numpy.load(sys.argv[2])
name = session.get_inputs()[0].name
for start in range(0, len(inputs), 64):
    session.run(None, {name: inputs[start:start + 64]})
"""


def measure_whole_process(repeats: int) -> dict:
    """Whole ``shapfleet explain`` processes on the seed cases, with ``--out``, beside what the same
    evaluations cost without shapfleet: the inference limit (onnxruntime alone in this process on
    the same masked images at its best batch size, as in the ``limit`` section) and a bare script
    (a fresh process importing numpy and onnxruntime and running those images), in interleaved rounds."""
    import subprocess

    from PIL import Image

    command = str(Path(sys.executable).with_name("shapfleet"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in cases().items():
            model_bytes, classifier, image = load_case(case)
            inputs, plan = masked_inputs(classifier, image, case["settings"])
            pixels = np.clip(case["image"], 0, 255).astype(np.uint8)
            image_path = Path(tmp) / f"{name}.png"
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(image_path)
            inputs_path = Path(tmp) / f"{name}-inputs.npy"
            np.save(inputs_path, inputs)
            candidates = limit_candidates(model_bytes, classifier.info.input_name, inputs)
            label, batch, _, raw = fastest(candidates)
            # The fastest way of running one run at a time too: the limit before shapfleet ran its
            # runs side by side (runs of earlier commits compare against it).
            _, one_batch, _, one_raw = fastest(candidates, [k for k in candidates if k.startswith("spinning")])

            def limit():
                raw(inputs, batch)

            def limit_one_at_a_time():
                one_raw(inputs, one_batch)

            def run(args: list[str]):
                return lambda: subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            explain_command = [command, "explain", str(image_path), "--model", str(case["model"]), *CASE_FLAGS[name],
                               "--quiet", "--out", str(Path(tmp) / f"{name}-out")]
            limit()  # warm-up
            medians = interleaved_medians({"limit": limit, "limit_one_run_at_a_time": limit_one_at_a_time,
                                           "bare_script": run([sys.executable, "-c", BARE_SCRIPT, str(case["model"]),
                                                               str(inputs_path)]),
                                           "shapfleet_explain_with_out": run(explain_command)}, repeats)
            results[name] = {"evaluations": int(len(inputs)) + plan.planning_evaluations, "seconds": medians,
                             "limit_runner": f"{label}, batch {batch}",
                             "explain_over_limit": medians["shapfleet_explain_with_out"] / medians["limit"],
                             "explain_over_limit_one_run_at_a_time":
                                 medians["shapfleet_explain_with_out"] / medians["limit_one_run_at_a_time"],
                             "explain_over_bare_script": medians["shapfleet_explain_with_out"] / medians["bare_script"],
                             "repeats": repeats}
            print(f"[overhead] {name}: {results[name]}", flush=True)
    return results


def measure_fleet_rendering(repeats: int) -> dict:
    """A 10-image x 10-class job (a 10-class conv model, grid 4x4, 200 coalitions) on two 2-worker
    stacks side by side, in interleaved rounds (each stack first in every other round): plain
    workers, and workers that store the arrays only (``bench/arrays_only_worker.py``: each image's
    ``attributions.npz`` and the stacked one, no picture, no ``explanation.json``). Each job's wall time from submission and the part after its
    last shard, polled by the client every 20 ms; what the artifacts add is the ratio of the two
    wall times. Also, in this process against a stored job: rendering every artifact one after the
    other (what one reducer did before images were rendered apart)."""
    from PIL import Image

    from shapfleet.api.client import Client
    from shapfleet.broker.services import Services
    from shapfleet.workers import steps
    from shapfleet.workers.runtime import ServiceRuntime

    sys.path.insert(0, str(REPO / "tests"))
    from onnx_models import conv_model

    settings = ExplainSettings(segmenter="grid", grid="4x4", all_classes=True, nsamples=200, masker="constant:0")
    shapes = [np.asarray(Image.open(REPO / "examples" / f"{name}.png").convert("RGB")) for name in ("triangle", "circle", "square")]
    pngs = []
    for n in range(10):
        buffer = io.BytesIO()
        Image.fromarray(np.roll(shapes[n % 3], n, axis=1)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    model = conv_model(32, 32, classes=10, seed=4)

    def run_job(client: Client, model_id: str) -> tuple[float, float, str]:
        """One job: (wall seconds, seconds after its last shard, its id)."""
        started = time.perf_counter()
        job_id = client.submit(pngs, model_id=model_id, settings=settings.to_dict())["id"]
        shards_done = None
        while True:
            job = client.get(job_id)
            now = time.perf_counter()
            progress = job["progress"]
            if shards_done is None and progress["shards_total"] and progress["shards_done"] == progress["shards_total"]:
                shards_done = now
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.02)
        assert job["status"] == "succeeded", job
        return now - started, now - (shards_done or now), job_id

    with tempfile.TemporaryDirectory() as tmp:
        parts, stacks = [], {}
        try:
            for name, program in (("arrays_only", [sys.executable, str(REPO / "bench" / "arrays_only_worker.py")]),
                                  ("with_artifacts", None)):
                started, url = _stack(Path(tmp) / name, workers=2, worker_program=program)
                parts += started
                client = Client(url, "bench")
                model_id = client.upload_model(model)["id"]
                client.wait(client.submit(pngs[:2], model_id=model_id, settings=settings.to_dict())["id"])  # warm-up
                stacks[name] = (client, model_id)
            settings_of_plain = _stack.settings  # the last stack started: the plain one
            walls = {name: [] for name in stacks}
            after = {name: [] for name in stacks}
            job_id = None
            for round_index in range(repeats):
                names = list(stacks) if round_index % 2 == 0 else list(reversed(stacks))  # neither always first
                for name in names:
                    wall, reduce_phase, ran = run_job(*stacks[name])
                    walls[name].append(wall)
                    after[name].append(reduce_phase)
                    if name == "with_artifacts":
                        job_id = ran  # a job of the plain stack, whose records the rendering below reads
            runtime = ServiceRuntime(Services.from_settings(settings_of_plain))
            explanations = steps.reduce_explanations(runtime, job_id)
            render = median_time(lambda: steps.job_artifacts(explanations, lambda index: f"{index}/"), repeats)
        finally:
            for part in reversed(parts):
                part.stop()
    wall = {name: statistics.median(v) for name, v in walls.items()}
    return {"wall_seconds": wall["with_artifacts"], "arrays_only_wall_seconds": wall["arrays_only"],
            "after_last_shard_seconds": statistics.median(after["with_artifacts"]),
            "arrays_only_after_last_shard_seconds": statistics.median(after["arrays_only"]),
            "rendering_in_one_process_seconds": render,
            "artifacts_added": wall["with_artifacts"] / wall["arrays_only"] - 1, "repeats": repeats}


def plot(accuracy: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(accuracy), figsize=(5 * len(accuracy), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], accuracy.items()):
        for tool, style in (("shapfleet", "o-"), ("shapfleet_cubic", "d-."), ("shapfleet_linear", "^:"),
                            ("shap_vectorised", "s--")):
            rows = [r for r in result["rows"] if r["tool"] == tool]
            ax.plot([r["seconds"] for r in rows], [max(r["relative_l2_error"], 1e-6) for r in rows], style, label=tool)
        for target in (0.05, 0.02, 0.01):
            ax.axhline(target, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{name} (M={result['superpixels']})")
        ax.set_xlabel("seconds")
        ax.set_ylabel("relative L2 error")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(results: dict) -> str:
    lines = [f"# Benchmark results\n\nMachine: {results['machine']}. Command: `.venv/bin/python bench/run.py` "
             "(`--only SECTION` re-runs one section and keeps the others' figures). Every ratio compares figures "
             "from one run of its section.\n"]
    if "limit" in results:
        lines += ["## Against the inference limit (seed notebooks' settings)\n",
                  "| case | M | evaluations | batch (limit / shapfleet) | limit s | shapfleet s (x limit) | with model load (x) | "
                  "shap vectorised s (x) | shap notebook loop s (x) |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in results["limit"].items():
            s, q = r["seconds"], r["ratio_to_limit"]
            lines.append(f"| {name} | {r['superpixels']} | {r['evaluations']} | {r['best_batch_size']} / {r['shapfleet_batch_size'] or 'default'} | {s['limit']:.2f} ({r['limit_session']}) | "
                         f"{s['shapfleet']:.2f} ({q['shapfleet']:.2f}x) | {s['shapfleet_with_model_load']:.2f} "
                         f"({q['shapfleet_with_model_load']:.2f}x) | {s['shap_vectorised']:.2f} ({q['shap_vectorised']:.2f}x) | "
                         f"{s['shap_notebook_loop']:.2f} ({q['shap_notebook_loop']:.2f}x) |")
    if "accuracy" in results:
        seeds = ", ".join(f"{name} {r['seeds']}" for name, r in results["accuracy"].items() if "seeds" in r)
        lines += ["\n## Error against exact Shapley values\n", "![error against time](error_vs_time.png)\n",
                  "Errors and times are medians over seeds (round s runs every tool with seed s)"
                  + (f": {seeds} seeds.\n" if seeds else ".\n"),
                  "| case | tool | nsamples | relative L2 error | seconds |", "|---|---|---|---|---|"]
        for name, r in results["accuracy"].items():
            for row in r["rows"]:
                lines.append(f"| {name} | {row['tool']} | {row['nsamples']} | {row['relative_l2_error']:.4f} | {row['seconds']:.2f} |")
        lines += ["\nTime to reach an error (seconds; `-`: not reached at the largest budget):\n",
                  "| case | tool | 5% | 2% | 1% | speed-up at 1% |", "|---|---|---|---|---|---|"]
        for name, r in results["accuracy"].items():
            tte = r["time_to_error"]
            mine, theirs = tte["shapfleet"]["1%"], tte["shap_vectorised"]["1%"]
            speedup = f"{theirs / mine:.1f}x" if mine and theirs else ("shap did not reach 1%" if mine else "-")
            for tool in TOOLS:
                cells = [f"{tte[tool][t]:.2f}" if tte[tool][t] is not None else "-" for t in ("5%", "2%", "1%")]
                lines.append(f"| {name} | {tool} | {' | '.join(cells)} | {speedup if tool == 'shapfleet' else ''} |")
    if "service" in results:
        r = results["service"]
        lines += ["\n## Service against in-process (EfficientNet-Lite0, ~2000 evaluations)\n",
                  f"In-process {r['in_process_seconds']:.2f} s; through the API, Redis, SeaweedFS and 2 workers "
                  f"{r['service_2_workers_seconds']:.2f} s: **{r['ratio_service_to_in_process']:.2f}x**."]
    if "scaling" in results:
        r = results["scaling"]
        lines += ["\n## Scale-out (one inference thread per worker process)\n",
                  f"1 worker {r['seconds_1_worker']:.2f} s, 2 workers {r['seconds_2_workers']:.2f} s: efficiency "
                  f"**{r['efficiency']:.2f}**; {r['evaluations_per_second_per_worker']:.1f} evaluations/s per worker "
                  "process (one CPU core, EfficientNet-Lite0)."]
        if "runs_seconds" in r:
            rounds = zip(r["runs_seconds"]["1_worker"], r["runs_seconds"]["2_workers"])
            lines.append("Efficiency of each round (a 1-worker job and a 2-worker job, one after the other): "
                         + ", ".join(f"{one / (2 * two):.2f}" for one, two in rounds) + ".")
    if "overhead" in results:
        r = results["overhead"]
        lines += ["\n## Costs around inference (whole `shapfleet` processes, the example model)\n",
                  f"`shapfleet --help` {r['help_seconds']:.2f} s. 10 images x every class (grid 4x4, 200 evaluations): "
                  f"{r['job_seconds']:.2f} s without `--out`, {r['job_with_out_seconds']:.2f} s with it: writing "
                  f"the artifacts adds **{100 * r['artifacts_added']:.0f}%** (medians of {r['repeats']} rounds)."]
        if "fleet_rendering" in r:
            f = r["fleet_rendering"]
            lines.append(f"\nOn a 2-worker stack, a 10-image x 10-class job took {f['wall_seconds']:.2f} s "
                         f"({f['after_last_shard_seconds']:.2f} s of it after its last shard), against "
                         f"{f['arrays_only_wall_seconds']:.2f} s ({f['arrays_only_after_last_shard_seconds']:.2f} s) on a "
                         f"stack beside it whose workers store the arrays only: writing the artifacts adds "
                         f"**{100 * f['artifacts_added']:.0f}%** to the job's wall time (medians of {f['repeats']} "
                         f"interleaved rounds). Rendering every artifact in one process takes "
                         f"{f['rendering_in_one_process_seconds']:.2f} s.")
        if "whole_process" in r:
            lines += ["\nWhole `shapfleet explain --out` processes on the seed cases, against the inference limit (onnxruntime "
                      "alone in the bench's process on the same masked images, the fastest way; and the fastest one run at a "
                      "time) and a bare script (a fresh process that imports numpy and onnxruntime and runs those images):\n",
                      "| case | evaluations | limit s (how) | one run at a time s | bare script s | shapfleet explain --out s | "
                      "/ limit | / one at a time | / bare script |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for name, w in r["whole_process"].items():
                t = w["seconds"]
                lines.append(f"| {name} | {w['evaluations']} | {t['limit']:.2f} ({w.get('limit_runner', '')}) | "
                             f"{t.get('limit_one_run_at_a_time', float('nan')):.2f} | {t['bare_script']:.2f} | "
                             f"{t['shapfleet_explain_with_out']:.2f} | {w['explain_over_limit']:.2f}x | "
                             f"{w.get('explain_over_limit_one_run_at_a_time', float('nan')):.2f}x | "
                             f"{w['explain_over_bare_script']:.2f}x |")
    if "superpixels" in results:
        from superpixels import markdown as superpixels_markdown

        lines += superpixels_markdown(results["superpixels"])
    if "targets" in results:
        from targets import markdown as targets_markdown

        lines += targets_markdown(results["targets"])
    if "residual" in results:
        from residual import markdown as residual_markdown

        lines += residual_markdown(results["residual"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per budget in the accuracy study (default: 9 on the MNIST cases, 3 on EfficientNet)")
    parser.add_argument("--budgets", default="256,384,512,768,1024,1536,2048,3072,4096")
    parser.add_argument("--only", default="limit,accuracy,service,scaling,overhead,superpixels,targets,residual")
    parser.add_argument("--cases", default=None, help="the superpixels and targets sections' cases (default: all)")
    args = parser.parse_args()
    import onnxruntime

    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "results.json"
    results: dict = json.loads(previous.read_text()) if previous.exists() else {}
    results |= {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                f"onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}"}
    parts = args.only.split(",")
    if "limit" in parts:
        results["limit"] = measure_limit(args.repeats)
    if "accuracy" in parts:
        results["accuracy"] = measure_accuracy([int(b) for b in args.budgets.split(",")], args.seeds)
        plot(results["accuracy"], RESULTS / "error_vs_time.png")
    if "service" in parts:
        results["service"] = measure_service(args.repeats)
    if "scaling" in parts:
        results["scaling"] = measure_scaling(args.repeats)
    if "overhead" in parts:
        results["overhead"] = measure_overhead(args.repeats)
    if "superpixels" in parts:
        from superpixels import measure_superpixels

        measured = measure_superpixels(names=args.cases.split(",") if args.cases else None)
        results["superpixels"] = {**results.get("superpixels", {}), **measured}
    case_sections = {}
    if "targets" in parts:
        from targets import measure_targets

        case_sections["targets"] = measure_targets(names=args.cases.split(",") if args.cases else None)
        results["targets"] = {**results.get("targets", {}), **case_sections["targets"]}
    if "superpixels" in parts:
        case_sections["superpixels"] = measured
    if "residual" in parts:
        from residual import measure_residual

        results["residual"] = measure_residual()
    if previous.exists():  # another run may have written since this one began: keep what it measured
        latest = json.loads(previous.read_text())
        for section, fresh in case_sections.items():  # only the cases this run measured replace the file's
            results[section] = {**latest.get(section, {}), **fresh}
        results = {**latest, **{part: results[part] for part in parts + ["machine"] if part in results}}
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / "README.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
