"""The in-process run: ``shapfleet explain`` and :func:`shapfleet.explain`.

Each image is one job on a :class:`~shapfleet.workers.runtime.LocalRuntime` (a memory store and memory
records): its inputs are stored under the same keys a fleet job's are, then the steps of
:mod:`shapfleet.workers.steps` run in the order the Celery tasks would run them: ``plan_job``, every
shard (here, or in a local process pool whose processes evaluate and hand the statistics back to be
stored), ``reduce_explanations``; for method partition, ``partition_round`` and ``partition_part`` until
the image is done. So a job gives the same attributions in-process and on the fleet for the same seed.

:func:`explain_array` is the engine without any of that: plan, evaluate, reduce for any
``predict(images) -> outputs`` callable.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shapfleet.broker.keys import input_key, model_key, plan_key, segments_key
from shapfleet.errors import InvalidSettingsError
from shapfleet.workers import steps
from shapfleet.workers.engine.estimation import ShardStatistics
from shapfleet.workers.engine.evaluation import Predict, coalition_predictor, evaluate_shard, evaluate_units
from shapfleet.workers.engine.images import as_pixel_array, load_image, npy_bytes
from shapfleet.workers.engine.inspection import read_model_file
from shapfleet.workers.engine.planning import JobPlan, largest_shards_first, plan_explanation
from shapfleet.workers.engine.progress import precision_note
from shapfleet.workers.engine.rendering import render_artifacts
from shapfleet.workers.engine.result import Explanation, explain_to_target, reduce_shards
from shapfleet.workers.engine.rounds import cap_of
from shapfleet.workers.engine.settings import ExplainSettings, check_threads
from shapfleet.workers.runtime import LocalRuntime, StepPolicy

ProgressFactory = Callable[[int, str], "object"]  # (total, label) -> object with update(n) and close()


def explain_array(image: np.ndarray, predict: Predict, settings: ExplainSettings, *,
                  segments: np.ndarray | None = None, shards: int = 1,
                  on_progress: Callable[[int], None] | None = None, fuse: bool = True) -> Explanation:
    """Explain a float32 ``H x W x C`` pixel image for any ``predict(images) -> outputs`` callable.

    When ``predict`` is an :class:`OnnxClassifier`'s method and ``fuse`` is true, the masking runs
    inside the model (see :mod:`shapfleet.workers.engine.fused`); the values are identical either way.
    With ``target_std``/``target_error`` it runs in rounds until the target, exactness or the cap
    (``nsamples``, default :data:`~shapfleet.workers.engine.settings.DEFAULT_MAX_NSAMPLES`)."""
    plan = plan_explanation(image, predict, settings, segments=segments, n_shards=shards)
    owner = getattr(predict, "__self__", None)
    fused = coalition_predictor(owner, plan) if fuse and owner is not None else None
    if settings.has_target:
        return explain_to_target(
            plan, lambda design, units, index: evaluate_units(plan, design, units, index, predict, on_progress, fused),
            cap_of(settings), n_parts=shards)
    return reduce_shards(plan, [evaluate_shard(plan, i, predict, on_progress, predict_coalitions=fused)
                                for i in range(plan.n_shards)])


@dataclass
class ExplainRun:
    """One image's explanation and where its artifacts went (if anywhere)."""

    source: str
    explanation: Explanation
    wall_seconds: float
    artifacts: dict[str, bytes]
    out_dir: Path | None = None


def explain(images: Sequence[str | os.PathLike[str] | np.ndarray], model: str | os.PathLike[str] | bytes,
            settings: ExplainSettings | None = None, *, segments: str | os.PathLike[str] | np.ndarray | None = None,
            shards: int | None = None, workers: int = 1, out_dir: str | os.PathLike[str] | None = None,
            progress: ProgressFactory | None = None, threads: int | None = None) -> list[ExplainRun]:
    """Explain each image for an ONNX model, in-process. Writes artifacts only when ``out_dir`` is given
    (one image: into ``out_dir``; several: into ``out_dir/<n>-<stem>/``, plus ``out_dir/grid.png``
    and the stacked ``out_dir/attributions.npz``)."""
    settings = settings or ExplainSettings()
    if settings.method == "partition" and (segments is not None or (shards or 1) > 1 or workers > 1):
        raise InvalidSettingsError("segments, shards and workers apply to method kernel; method partition refines "
                                   "pixel boxes round by round in this process (the fleet spreads rounds over workers)")
    if settings.has_target and workers > 1:
        raise InvalidSettingsError("workers applies to a fixed nsamples; with target_std or target_error the rounds run "
                                   "one after another in this process (the fleet spreads each round over workers)")
    check_threads(threads, "threads")
    model_bytes = model if isinstance(model, bytes) else read_model_file(model)
    if threads is None and workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
    # One part per partition round and the shard count asked for: the in-process run needs no sizing.
    runtime = LocalRuntime(StepPolicy(shard_evaluations=2**62, max_shards=1, fixed_shards=shards or max(1, workers)),
                           ort_threads=threads)
    sha256 = hashlib.sha256(model_bytes).hexdigest()
    runtime.store.put(model_key(sha256), model_bytes)
    # The sessions, made once for every image, are built on a thread while the first image is
    # decoded and segmented; its first model run waits for them.
    channels = runtime.classifier(sha256, settings, build_ahead=True).channels
    segments_data = _segments_bytes(segments)

    runs: list[ExplainRun] = []
    # Each image's artifacts are rendered on a thread while the next image is explained: PNG
    # compression and numpy's larger operations let go of the GIL.
    renderer = ThreadPoolExecutor(1, thread_name_prefix="render") if out_dir is not None else None
    rendering: list[Future[dict[str, bytes]]] = []
    try:
        for index, source in enumerate(images):
            runs.append(_explain_image(runtime, settings, sha256, channels, index, len(images), source,
                                       segments, segments_data, workers, progress))
            if renderer is not None:
                rendering.append(renderer.submit(render_artifacts, runs[-1].explanation))
        if out_dir is not None:
            _write_artifacts(Path(out_dir), images, runs, [future.result() for future in rendering])
        return runs
    finally:
        if renderer is not None:
            renderer.shutdown(cancel_futures=True)


def _explain_image(runtime: LocalRuntime, settings: ExplainSettings, sha256: str, channels: int, index: int,
                   count: int, source, segments, segments_data: bytes | None, workers: int,
                   progress: ProgressFactory | None) -> ExplainRun:
    """One image as a one-image job, through the fleet's steps."""
    name = str(source) if not isinstance(source, np.ndarray) else f"image {index}"
    started = time.perf_counter()
    pixels = load_image(source, channels) if not isinstance(source, np.ndarray) \
        else as_pixel_array(source, channels, name)
    job = runtime.jobs.create("local", settings.to_dict(), sha256, [name])
    runtime.names[input_key(job.id, 0)] = name
    runtime.store.put(input_key(job.id, 0), npy_bytes(pixels))
    if segments_data is not None:
        runtime.names[segments_key(job.id, 0)] = str(segments) if not isinstance(segments, np.ndarray) else "segments"
        runtime.store.put(segments_key(job.id, 0), segments_data)
    runtime.jobs.start(job.id)
    (plan,) = steps.plan_job(runtime, job.id)
    bar = progress(plan.total_evaluations, _label(index, count)) if progress is not None else None
    if bar is not None:
        bar.update(plan.planning_evaluations)
    update = bar.update if bar is not None else None
    if settings.method == "partition":
        _run_rounds(runtime, job.id, update)
    elif settings.has_target:
        _run_target_rounds(runtime, job.id, bar)
    elif workers > 1 and plan.n_shards > 1:
        _run_shards_in_pool(runtime, job.id, plan, min(workers, plan.n_shards), update)
    else:
        for _, shard in largest_shards_first([plan]):
            shard_started = time.monotonic()
            stats = steps.evaluate_job_shard(runtime, job.id, 0, shard, update)
            steps.store_shard(runtime, job.id, 0, shard, stats, time.monotonic() - shard_started)
    (explanation,) = steps.reduce_explanations(runtime, job.id)
    runtime.jobs.succeed(job.id, [])
    runtime.forget(job.id)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - started
    explanation.extra["wall_seconds"] = round(wall, 3)
    return ExplainRun(name, explanation, wall, {})


def _write_artifacts(out_dir: Path, images: Sequence, runs: list[ExplainRun], rendered: list[dict[str, bytes]]) -> None:
    """The job's artifacts as files (one image: into ``out_dir``; several: into ``out_dir/<n>-<stem>/``,
    plus the collection's at the top), and each run's own in ``run.artifacts``."""
    folders = [f"{index}-{_stem(source, index)}/" for index, source in enumerate(images)]
    for name, data, index in steps.job_artifacts([run.explanation for run in runs], folders.__getitem__, rendered):
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if index is not None:
            runs[index].artifacts[name.removeprefix(folders[index]) if len(runs) > 1 else name] = data
    for index, run in enumerate(runs):
        run.out_dir = out_dir if len(runs) == 1 else out_dir / folders[index].rstrip("/")


def _run_rounds(runtime: LocalRuntime, job_id: str, on_progress: Callable[[int], None] | None) -> None:
    """Method partition: the round steps, in the order the fleet's messages would run them."""
    round_index, reported = 0, runtime.jobs.get(job_id).evaluations_done
    while True:
        step = steps.partition_round(runtime, job_id, 0, round_index)
        for part in step.parts:
            steps.partition_part(runtime, job_id, 0, round_index, part)
        done = runtime.jobs.get(job_id).evaluations_done
        if on_progress is not None and done > reported:
            on_progress(done - reported)
        reported = done
        if step.parts:
            continue  # the round step again: it applies the outputs
        if step.next_round is None:
            return
        round_index = step.next_round


def _run_target_rounds(runtime: LocalRuntime, job_id: str, bar) -> None:
    """Method kernel with a target: the round steps, in the order the fleet's messages would run them;
    the bar follows each part's batches and moves its total to the projection after each round."""
    update = bar.update if bar is not None else None
    round_index = 0
    while True:
        step = steps.kernel_round(runtime, job_id, 0, round_index)
        for part in step.parts:
            steps.kernel_round_part(runtime, job_id, 0, round_index, part, on_progress=update)
        if step.parts:
            continue  # the round step again: it decides the round
        job = runtime.jobs.get(job_id)
        if bar is not None and hasattr(bar, "retarget") and 0 in job.precision:
            bar.retarget(job.evaluations_total, precision_note(job.precision[0]))
        if step.next_round is None:
            return
        round_index = step.next_round


# -- the local process pool (one onnxruntime session per process, created once) -------------------
_pool_state: dict = {}


def _pool_init(job: dict, objects: dict[str, bytes], threads: int, queue) -> None:
    runtime = LocalRuntime(StepPolicy(), ort_threads=threads)
    runtime.store.objects.update(objects)
    record = runtime.jobs.create(job["tenant"], job["settings"], job["model_sha256"], job["inputs"], job_id=job["id"])
    runtime.jobs.start(record.id)
    _pool_state.update(runtime=runtime, job_id=record.id, queue=queue)


def _pool_shard(shard_index: int) -> dict:
    runtime, queue = _pool_state["runtime"], _pool_state["queue"]
    stats = steps.evaluate_job_shard(runtime, _pool_state["job_id"], 0, shard_index, on_progress=queue.put)
    return stats.to_arrays()


def _run_shards_in_pool(runtime: LocalRuntime, job_id: str, plan: JobPlan, workers: int,
                        on_progress: Callable[[int], None] | None) -> None:
    """Evaluate the shards in ``workers`` processes, each with its own session and its share of cores;
    each returns its statistics, which this process stores and records as the fleet's shards do."""
    import multiprocessing  # here, with the pool: a one-process run imports neither
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    record = runtime.jobs.get(job_id)
    job = {"id": job_id, "tenant": record.tenant, "settings": record.settings, "model_sha256": record.model_sha256,
           "inputs": record.inputs}
    objects = {key: runtime.store.get(key) for key in (model_key(record.model_sha256), plan_key(job_id, 0))}
    started = time.monotonic()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_pool_init,
                             initargs=(job, objects, threads, queue)) as pool:
        futures = {i: pool.submit(_pool_shard, i) for _, i in largest_shards_first([plan])}
        while not all(f.done() for f in futures.values()):
            _drain(queue, on_progress, timeout=0.1)
        for i in range(plan.n_shards):
            stats = ShardStatistics.from_arrays(futures[i].result())
            steps.store_shard(runtime, job_id, 0, i, stats, time.monotonic() - started)
    _drain(queue, on_progress, timeout=0.0)


def _drain(queue, on_progress, timeout: float) -> None:
    import queue as queue_module

    try:
        n = queue.get(timeout=timeout) if timeout else queue.get_nowait()
        while True:
            if on_progress is not None:
                on_progress(n)
            n = queue.get_nowait()
    except queue_module.Empty:
        pass


def _segments_bytes(segments: str | os.PathLike[str] | np.ndarray | None) -> bytes | None:
    """The user's label map as stored with the job: the file's bytes, or an array as ``.npy``."""
    if segments is None:
        return None
    if isinstance(segments, np.ndarray):
        return npy_bytes(segments)
    try:
        return Path(segments).read_bytes()
    except OSError as e:
        from shapfleet.errors import ImageError

        raise ImageError(f"cannot read the segments file {segments}: {e.strerror or e}") from e


def _stem(source, index: int) -> str:
    if isinstance(source, np.ndarray):
        return f"image{index}"
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(source).stem) or f"image{index}"


def _label(index: int, count: int) -> str:
    return "evaluations" if count == 1 else f"[{index + 1}/{count}] evaluations"

