"""The fleet's three steps as plain functions of (runtime, job): plan, evaluate one shard, reduce.

They call the same engine functions as the in-process path (``plan_explanation``, ``evaluate_shard``,
``reduce_shards``); the Celery tasks in :mod:`workers.tasks` only wrap them with retries and state.
"""

from __future__ import annotations

import time

from broker.jobs import JobStatus, record_shard_metrics
from broker.keys import input_key, plan_key, result_key, shard_key
from broker.store import ObjectNotFound
from workers.engine.errors import Canceled, InvalidSettingsError, ShapfleetError
from workers.engine.evaluation import coalition_predictor, evaluate_shard
from workers.engine.images import fit_to_model, load_image
from workers.engine.planning import JobPlan, plan_explanation
from workers.engine.rendering import render_artifacts
from workers.engine.result import reduce_shards
from workers.engine.settings import ExplainSettings
from workers.runtime import WorkerRuntime, load_statistics, npz_bytes

#: Progress is written to Redis at most this often per shard (seconds), and at its end.
PROGRESS_INTERVAL = 0.25

CONTENT_TYPES = {".npz": "application/octet-stream", ".png": "image/png", ".json": "application/json"}


class PipelineError(ShapfleetError):
    """Raised when the pipeline's own bookkeeping is inconsistent (for example a missing shard)."""


def plan_job(runtime: WorkerRuntime, job_id: str) -> list[JobPlan]:
    """Plan every image of the job, store the plans, set the job's totals; returns the plans."""
    services = runtime.services
    job = services.jobs.get(job_id)
    settings = ExplainSettings.from_dict(job.settings)
    limits = services.settings.limits
    if settings.masker_spec.kind in ("image", "dataset"):
        raise InvalidSettingsError(f"masker {settings.masker_spec.kind}: is available in `shapfleet explain` only, "
                                   "not in fleet jobs")
    classifier = runtime.classifier(job.model_sha256, settings)
    plans = []
    for index in range(job.n_images):
        name = f"image {index}" if job.n_images > 1 else "the image"
        pixels = load_image(services.store.get(input_key(job_id, index)), classifier.channels,
                            max_pixels=limits.max_image_pixels)
        image = fit_to_model(pixels, classifier.input_size, settings.resize, settings.center_crop, name)
        plan = plan_explanation(image, classifier.predict, settings)
        if plan.n_players > limits.max_superpixels:
            raise InvalidSettingsError(f"{name} has {plan.n_players} superpixels; the limit is {limits.max_superpixels}")
        plan.split(plan.shards_for(services.settings.shard_evaluations, services.settings.max_shards))
        services.store.put(plan_key(job_id, index), npz_bytes(plan.to_arrays()))
        plans.append(plan)
    services.jobs.set_totals(job_id, [p.n_shards for p in plans], sum(p.total_evaluations for p in plans),
                             sum(p.planning_evaluations for p in plans))
    return plans


def run_shard(runtime: WorkerRuntime, job_id: str, image_index: int, shard_index: int) -> tuple[str, bool]:
    """Evaluate one shard and store its statistics at its deterministic key. Returns the key and
    whether this shard completed the job's set of shards (true for exactly one shard of a job).

    A shard whose statistics already exist (a redelivery after the work was done) is not evaluated
    again: the stored object is the same one a rerun would write.
    """
    services = runtime.services
    key = shard_key(job_id, image_index, shard_index)
    name = f"{image_index}/{shard_index}"
    if services.jobs.status(job_id) != JobStatus.RUNNING:
        raise Canceled(f"job {job_id} is no longer running")
    if services.store.exists(key):
        return key, _record_done(services, job_id, name)
    plan = runtime.plan(job_id, image_index)
    job = services.jobs.get(job_id)
    model = runtime.classifier(job.model_sha256, plan.settings)
    started = time.monotonic()
    done, last_write = 0, 0.0

    def on_progress(n: int) -> None:
        nonlocal done, last_write
        done += n
        now = time.monotonic()
        if now - last_write >= PROGRESS_INTERVAL:
            last_write = now
            services.jobs.set_shard_progress(job_id, name, done)

    stats = evaluate_shard(plan, shard_index, model.predict, on_progress=on_progress,
                           should_stop=lambda: services.jobs.status(job_id) != JobStatus.RUNNING,
                           predict_coalitions=coalition_predictor(model, plan))
    services.store.put(key, npz_bytes(stats.to_arrays()))
    services.jobs.set_shard_progress(job_id, name, stats.n_evaluations)
    completed = _record_done(services, job_id, name,
                             on_new=lambda: record_shard_metrics(services.redis, time.monotonic() - started, stats.n_evaluations))
    return key, completed


def _record_done(services, job_id: str, name: str, on_new=None) -> bool:
    added, done = services.jobs.shard_done(job_id, name)
    if added and on_new is not None:
        on_new()
    return added and done == sum(services.jobs.shard_counts(job_id))


def expected_shards(runtime: WorkerRuntime, job_id: str) -> list[tuple[int, int]]:
    return [(n, i) for n, count in enumerate(runtime.services.jobs.shard_counts(job_id)) for i in range(count)]


def reduce_job(runtime: WorkerRuntime, job_id: str) -> list[dict]:
    """Check that every shard of every image is recorded done and stored, reduce, render, store;
    returns the results. (``combine`` checks again that each index arrived exactly once.)"""
    services = runtime.services
    job = services.jobs.get(job_id)
    done = services.jobs.done_shards(job_id)
    missing = [f"{n}/{i}" for n, i in expected_shards(runtime, job_id) if f"{n}/{i}" not in done]
    if missing or not job.shards_total:
        raise PipelineError(f"cannot reduce job {job_id}: shards {missing or 'all'} are not done")
    results = []
    for index in range(job.n_images):
        plan = runtime.plan(job_id, index)
        try:
            stats = [load_statistics(services.store.get(shard_key(job_id, index, i))) for i in range(plan.n_shards)]
        except ObjectNotFound as e:
            raise PipelineError(f"shard statistics {e} are missing from the store") from e
        explanation = reduce_shards(plan, stats)
        explanation.extra["image_index"] = index
        for artifact, data in render_artifacts(explanation).items():
            name = artifact if job.n_images == 1 else f"{index}/{artifact}"
            services.store.put(result_key(job_id, name), data, CONTENT_TYPES.get(artifact[artifact.rfind("."):], ""))
            results.append({"name": name, "key": result_key(job_id, name), "size": len(data), "image": index})
    return results
