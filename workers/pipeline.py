"""The fleet's steps as plain functions of (runtime, job): plan, evaluate one shard, reduce; and for
method partition, drive a round and evaluate one part of a round.

They call the same engine functions as the in-process path (``plan_explanation``, ``evaluate_shard``,
``reduce_shards``, :class:`~shapfleet.workers.engine.partition.PartitionState`); the Celery tasks in
:mod:`shapfleet.workers.tasks` only wrap them with retries and state.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

import numpy as np

from shapfleet.broker.jobs import JobStatus, record_shard_metrics
from shapfleet.broker.keys import (
    background_key,
    input_key,
    partition_key,
    plan_key,
    result_key,
    shard_key,
)
from shapfleet.broker.store import ObjectNotFound
from shapfleet.errors import (
    Canceled,
    InvalidSettingsError,
    PipelineError,
    ShapfleetError,
)
from shapfleet.workers.engine.evaluation import (
    coalition_predictor,
    evaluate_shard,
    masked_values,
)
from shapfleet.workers.engine.images import fit_to_model, load_image
from shapfleet.workers.engine.partition import (
    PartitionPlan,
    PartitionState,
    expansions_from_json,
    expansions_to_json,
    json_bytes,
    partition_explanation,
    plan_partition,
)
from shapfleet.workers.engine.planning import JobPlan, plan_explanation
from shapfleet.workers.engine.rendering import render_artifacts, render_collection
from shapfleet.workers.engine.result import Explanation, reduce_shards
from shapfleet.workers.engine.settings import ExplainSettings
from shapfleet.workers.runtime import WorkerRuntime, load_statistics, npz_bytes

#: Progress is written to Redis at most this often per shard (seconds), and at its end.
PROGRESS_INTERVAL = 0.25

CONTENT_TYPES = {".npz": "application/octet-stream", ".png": "image/png", ".json": "application/json"}


def plan_job(runtime: WorkerRuntime, job_id: str) -> list[JobPlan] | list[PartitionPlan]:
    """Plan every image of the job, store the plans, set the job's totals; returns the plans.

    Method kernel: each image's coalitions are split into shards. Method partition: each image is
    one unit of the job's barrier (``<image>/0``), finished when its last round is; its refinement
    starts from a stored round-0 state."""
    services = runtime.services
    job = services.jobs.get(job_id)
    settings = ExplainSettings.from_dict(job.settings)
    limits = services.settings.limits
    if settings.masker_spec.kind == "image":
        raise InvalidSettingsError("masker image: is available in `shapfleet explain` only, not in fleet jobs")
    background = services.store.get(background_key(job_id)) if settings.masker_spec.kind == "dataset" else None
    classifier = runtime.classifier(job.model_sha256, settings)
    if settings.method == "partition":
        return _plan_partition_job(runtime, job_id, job.n_images, settings, classifier)
    plans = []
    for index in range(job.n_images):
        name = f"image {index}" if job.n_images > 1 else "the image"
        image = _fitted_image(runtime, job_id, index, name, settings, classifier)
        plan = plan_explanation(image, classifier.predict, settings, background_set=background)
        if plan.n_players > limits.max_superpixels:
            raise InvalidSettingsError(f"{name} has {plan.n_players} superpixels; the limit is {limits.max_superpixels}")
        plan.split(plan.shards_for(services.settings.shard_evaluations, services.settings.max_shards))
        services.store.put(plan_key(job_id, index), npz_bytes(plan.to_arrays()))
        plans.append(plan)
    services.jobs.set_totals(job_id, [p.n_shards for p in plans], sum(p.total_evaluations for p in plans),
                             sum(p.planning_evaluations for p in plans))
    return plans


def _fitted_image(runtime: WorkerRuntime, job_id: str, index: int, name: str, settings: ExplainSettings, classifier):
    pixels = load_image(runtime.services.store.get(input_key(job_id, index)), classifier.channels,
                        max_pixels=runtime.services.settings.limits.max_image_pixels)
    return fit_to_model(pixels, classifier.input_size, settings.resize, settings.center_crop, name)


def _plan_partition_job(runtime: WorkerRuntime, job_id: str, n_images: int, settings: ExplainSettings,
                        classifier) -> list[PartitionPlan]:
    services = runtime.services
    plans = []
    for index in range(n_images):
        name = f"image {index}" if n_images > 1 else "the image"
        plan = plan_partition(_fitted_image(runtime, job_id, index, name, settings, classifier), classifier.predict, settings)
        services.store.put(plan_key(job_id, index), npz_bytes(plan.to_arrays()))
        _put_once(services, partition_key(job_id, index, "state-0.json"), json_bytes(PartitionState.start(plan).to_json()))
        plans.append(plan)
    services.jobs.set_totals(job_id, [1] * n_images, sum(p.total_evaluations for p in plans),
                             sum(p.planning_evaluations for p in plans))
    return plans


def _put_once(services, key: str, data: bytes, content_type: str = "application/json") -> bool:
    """Round records are written once: a redelivered step finds the first version and keeps it, so
    every worker continues from the same bytes even if a repeated evaluation rounds differently.
    Returns whether this call wrote it."""
    if services.store.exists(key):
        return False
    services.store.put(key, data, content_type)
    return True


def _json(services, key: str):
    return json.loads(services.store.get(key))


def round_parts(n_masks: int, target: int, max_parts: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` slices of a round's masks, about ``target`` masks each."""
    parts = max(1, min(max_parts, -(-n_masks // max(1, target))))
    bounds = np.linspace(0, n_masks, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclass
class RoundStep:
    """What a round step did: ``parts`` to evaluate (indices), or the next round to run, or the image
    finished and ``completed`` the job's set (then the reduce is due); nothing when another step
    already moved on."""

    parts: list[int]
    next_round: int | None = None
    completed: bool = False


def partition_round(runtime: WorkerRuntime, job_id: str, image_index: int, round_index: int) -> RoundStep:
    """Drive image ``image_index`` of a partition job at round ``round_index``; idempotent.

    Finished image: record it (``<image>/0``). Round not chosen yet: choose its nodes from the stored
    state (or, when none are left, store the finished refinement). Parts missing: report them (to
    be sent). Every part stored: apply the outputs and store the state for the next round."""
    services = runtime.services
    if services.jobs.status(job_id) != JobStatus.RUNNING:
        raise Canceled(f"job {job_id} is no longer running")
    services.jobs.set_round(job_id, image_index, round_index)
    final = partition_key(job_id, image_index, "final.json")
    if services.store.exists(final):
        return RoundStep([], completed=_record_done(services, job_id, f"{image_index}/0"))
    round_key = partition_key(job_id, image_index, f"round-{round_index}.json")
    if not services.store.exists(round_key):
        plan = runtime.partition_plan(job_id, image_index)
        state = PartitionState.from_json(_json(services, partition_key(job_id, image_index, f"state-{round_index}.json")))
        expansions = state.pop_round()
        if not expansions:
            _put_once(services, final, json_bytes(state.to_json()))
            services.jobs.set_shard_progress(job_id, f"{image_index}/0", state.eval_count)
            return RoundStep([], completed=_record_done(services, job_id, f"{image_index}/0"))
        settings = services.settings
        parts = round_parts(2 * len(expansions), max(1, settings.shard_evaluations // plan.masker.n_backgrounds),
                            settings.max_shards)
        _put_once(services, round_key, json_bytes({"state": state.to_json(), "expansions": expansions_to_json(expansions),
                                                   "parts": parts}))
    document = _json(services, round_key)
    parts = [tuple(p) for p in document["parts"]]
    part_keys = [partition_key(job_id, image_index, f"round-{round_index}/part-{p}.npy") for p in range(len(parts))]
    missing = [p for p, key in enumerate(part_keys) if not services.store.exists(key)]
    if missing:
        return RoundStep(missing)
    outputs = np.concatenate([np.load(io.BytesIO(services.store.get(key)), allow_pickle=False) for key in part_keys])
    state = PartitionState.from_json(document["state"])
    state.apply(expansions_from_json(document["expansions"]), outputs)
    advanced = _put_once(services, partition_key(job_id, image_index, f"state-{round_index + 1}.json"),
                         json_bytes(state.to_json()))
    services.jobs.set_shard_progress(job_id, f"{image_index}/0", state.eval_count)
    # Send the next round unless another step already advanced this image and started it (a
    # re-driven step must not start a second chain; one whose advancer died still continues).
    if advanced or services.jobs.current_round(job_id, image_index) <= round_index:
        return RoundStep([], next_round=round_index + 1)
    return RoundStep([])


def partition_part(runtime: WorkerRuntime, job_id: str, image_index: int, round_index: int, part: int) -> bool:
    """Evaluate one slice of a round's masks and store the outputs; returns whether the round's parts
    are all stored now (then the caller sends the round step again, which advances it)."""
    services = runtime.services
    if services.jobs.status(job_id) != JobStatus.RUNNING:
        raise Canceled(f"job {job_id} is no longer running")
    key = partition_key(job_id, image_index, f"round-{round_index}/part-{part}.npy")
    document = _json(services, partition_key(job_id, image_index, f"round-{round_index}.json"))
    if not services.store.exists(key):
        plan = runtime.partition_plan(job_id, image_index)
        model = runtime.classifier(services.jobs.get(job_id).model_sha256, plan.settings)
        start, stop = document["parts"][part]
        state = PartitionState.from_json(document["state"])
        masks = state.masks(expansions_from_json(document["expansions"]), start, stop)
        buffer = io.BytesIO()
        np.save(buffer, masked_values(plan, model.predict, masks), allow_pickle=False)
        _put_once(services, key, buffer.getvalue(), "application/octet-stream")
    _, done = services.jobs.round_part_done(job_id, image_index, round_index, part)
    # A redelivery after the round filled up reports it complete again: the worker that completed it
    # may have died before sending the round step, and the step is idempotent.
    return done == len(document["parts"])


def run_shard(runtime: WorkerRuntime, job_id: str, image_index: int, shard_index: int) -> tuple[str, bool]:
    """Evaluate one shard and store its statistics at its deterministic key. Returns the key and
    whether the job's set of shards is complete now (then the caller enqueues the reduce).

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
    """Record shard ``name`` done; true when the job's set is complete.

    Of shards finishing concurrently, exactly one sees the set complete. A redelivered shard of a
    complete set sees it complete too: the worker that completed it may have been killed between
    recording it and enqueuing the reduce, and without a watchdog nothing else would enqueue it.
    A second reduce is harmless (one reducer claims the job; success is recorded once)."""
    added, done = services.jobs.shard_done(job_id, name)
    if added and on_new is not None:
        on_new()
    return done == sum(services.jobs.shard_counts(job_id))


def reduce_job(runtime: WorkerRuntime, job_id: str) -> list[dict]:
    """Check that every shard of every image is recorded done and stored, reduce, render, store;
    returns the results. (``combine`` checks again that each index arrived exactly once.)"""
    services = runtime.services
    job = services.jobs.get(job_id)
    missing = [f"{n}/{i}" for n, i in services.jobs.missing_shards(job_id)]
    if missing or not job.shards_total:
        raise PipelineError(f"cannot reduce job {job_id}: shards {missing or 'all'} are not done")
    results, explanations = [], []

    def store(name: str, data: bytes, image: int | None) -> None:
        services.store.put(result_key(job_id, name), data, CONTENT_TYPES.get(name[name.rfind("."):], ""))
        results.append({"name": name, "key": result_key(job_id, name), "size": len(data), "image": image})

    method = ExplainSettings.from_dict(job.settings).method
    for index in range(job.n_images):
        explanation = _reduce_image(runtime, job_id, index, method)
        explanation.extra["image_index"] = index
        explanations.append(explanation)
        for artifact, data in render_artifacts(explanation).items():
            store(artifact if job.n_images == 1 else f"{index}/{artifact}", data, index)
    if job.n_images > 1:
        for artifact, data in render_collection(explanations).items():
            store(artifact, data, None)
    return results


def _reduce_image(runtime: WorkerRuntime, job_id: str, index: int, method: str) -> Explanation:
    services = runtime.services
    try:
        if method == "partition":
            plan = runtime.partition_plan(job_id, index)
            state = PartitionState.from_json(_json(services, partition_key(job_id, index, "final.json")))
            return partition_explanation(plan, state)
        plan = runtime.plan(job_id, index)
        stats = [load_statistics(services.store.get(shard_key(job_id, index, i))) for i in range(plan.n_shards)]
    except ObjectNotFound as e:
        raise PipelineError(f"stored results {e} are missing from the store") from e
    return reduce_shards(plan, stats)
