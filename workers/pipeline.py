"""The fleet's three steps as plain functions of (runtime, job): plan, evaluate one shard, reduce.

They call the same engine functions as the in-process path (``plan_explanation``, ``evaluate_shard``,
``reduce_shards``); the Celery tasks in :mod:`workers.tasks` only wrap them with retries and state.
"""

from __future__ import annotations

import time

from broker.jobs import JobStatus, record_shard_metrics
from broker.keys import input_key, parse_shard_key, plan_key, result_key, shard_key
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

CONTENT_TYPES = {".npz": "application/octet-stream", ".png": "image/png"}


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
    services.jobs.set_totals(job_id, sum(p.n_shards for p in plans), sum(p.total_evaluations for p in plans),
                             sum(p.planning_evaluations for p in plans))
    return plans


def run_shard(runtime: WorkerRuntime, job_id: str, image_index: int, shard_index: int) -> str:
    """Evaluate one shard and store its statistics at its deterministic key; returns the key.

    A shard whose statistics already exist (a redelivery after the work was done) is not evaluated
    again: the stored object is the same one a rerun would write.
    """
    services = runtime.services
    key = shard_key(job_id, image_index, shard_index)
    name = f"{image_index}/{shard_index}"
    if services.jobs.status(job_id) != JobStatus.RUNNING:
        raise Canceled(f"job {job_id} is no longer running")
    if services.store.exists(key):
        services.jobs.shard_done(job_id, name)
        return key
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
    if services.jobs.shard_done(job_id, name):
        record_shard_metrics(services.redis, time.monotonic() - started, stats.n_evaluations)
    return key


def reduce_job(runtime: WorkerRuntime, job_id: str, shard_keys: list[str]) -> list[dict]:
    """Check that every shard of every image arrived once, reduce, render, store; returns the results."""
    services = runtime.services
    job = services.jobs.get(job_id)
    arrived: dict[int, set[int]] = {}
    for key in set(shard_keys):
        owner, image_index, shard_index = parse_shard_key(key)
        if owner != job_id:
            raise PipelineError(f"shard {key} does not belong to job {job_id}")
        arrived.setdefault(image_index, set()).add(shard_index)
    results = []
    for index in range(job.n_images):
        plan = runtime.plan(job_id, index)
        if arrived.get(index, set()) != set(range(plan.n_shards)):
            raise PipelineError(f"image {index}: expected shards 0..{plan.n_shards - 1}, got {sorted(arrived.get(index, []))}")
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
