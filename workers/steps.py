"""The pipeline's steps, written once: plan a job, evaluate one shard, reduce; and for method
partition, drive a round and evaluate one part of a round.

Each step is a plain function of (runtime, job id, ...): it reads the job's inputs and records through
``runtime.store`` and ``runtime.jobs`` and writes its outputs there, so it runs unchanged on the fleet
(:class:`~shapfleet.workers.runtime.ServiceRuntime`: S3 or a folder, Redis; the Celery tasks in
:mod:`shapfleet.workers.tasks` wrap each step with retries and state) and in-process
(:class:`~shapfleet.workers.runtime.LocalRuntime`: memory; :mod:`shapfleet.workers.local` drives the
steps in the order the tasks would, with a process pool for the shards). The same seed gives the same
attributions either way, whatever the shard or worker count.

Every step is idempotent: a shard or a round part whose output is stored is not evaluated again, round
records are written once, and the barriers (the job's set of finished shards, a round's set of parts)
count each name once.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from shapfleet.broker.keys import (
    background_key,
    input_key,
    partition_key,
    plan_key,
    reference_key,
    rendered_key,
    result_key,
    result_prefix,
    rounds_key,
    segments_key,
    shard_key,
)
from shapfleet.broker.records import JobRecord, JobStatus
from shapfleet.errors import Canceled, InvalidSettingsError, ObjectNotFound, PipelineError
from shapfleet.workers.engine.design import CoalitionDesign, WorkUnit
from shapfleet.workers.engine.estimation import ShardStatistics, combine, estimate, restrict
from shapfleet.workers.engine.evaluation import coalition_predictor, evaluate_shard, evaluate_units, masked_values
from shapfleet.workers.engine.images import DEFAULT_MAX_PIXELS, as_pixel_array, fit_to_model, load_image, npy_bytes
from shapfleet.workers.engine.npz import npz_bytes
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
from shapfleet.workers.engine.rendering import render_artifacts, render_collection, render_viewer_files
from shapfleet.workers.engine.result import Explanation, reduce_shards, target_extra
from shapfleet.workers.engine.rounds import INITIAL_RATES, RoundOutcome, Target, cap_coalitions, cap_of, decide
from shapfleet.workers.engine.segmentation import load_segments, segment
from shapfleet.workers.engine.settings import DEFAULT_MAX_NSAMPLES, ExplainSettings
from shapfleet.workers.runtime import Runtime, load_statistics

#: Progress is written to the records at most this often per shard (seconds), and at its end.
PROGRESS_INTERVAL = 0.25

CONTENT_TYPES = {".npz": "application/octet-stream", ".png": "image/png", ".json": "application/json"}

#: Stored inputs that start so are pixel arrays (``.npy``), which only the in-process run stores.
NPY_MAGIC = b"\x93NUMPY"


def target_cap(runtime: Runtime) -> int:
    """A target run's cap when ``nsamples`` is not given: the tenant limit on nsamples (the fleet),
    else the engine's default."""
    limits = runtime.policy.limits
    return limits.max_nsamples if limits is not None else DEFAULT_MAX_NSAMPLES


def _check_running(runtime: Runtime, job_id: str) -> None:
    if runtime.jobs.status(job_id) != JobStatus.RUNNING:
        raise Canceled(f"job {job_id} is no longer running")


def plan_job(runtime: Runtime, job_id: str) -> list[JobPlan] | list[PartitionPlan]:
    """Plan every image of the job, store the plans, set the job's totals; returns the plans.

    Method kernel: each image is segmented (or takes its stored label map), checked against the
    superpixel limit before the model runs, planned, and its coalitions split into shards. Method
    partition: each image is one unit of the job's barrier (``<image>/0``), finished when its last
    round is; its refinement starts from a stored round-0 state."""
    job = runtime.jobs.get(job_id)
    settings = ExplainSettings.from_dict(job.settings)
    classifier = runtime.classifier(job.model_sha256, settings)
    if settings.masker_spec.kind == "dataset" and not runtime.reads_local_files \
            and not runtime.store.exists(background_key(job_id)):
        raise InvalidSettingsError("masker dataset: needs the background set uploaded with the job")
    masker_inputs = {"load_reference": _reference_loader(runtime, job_id, settings, classifier),
                     "background_set": _stored(runtime, background_key(job_id))}
    with runtime.model_call_bounds(job_id):
        plans = [_plan_image(runtime, job, index, settings, classifier, masker_inputs) for index in range(job.n_images)]
    counts = [1] * len(plans) if settings.runs_in_rounds else [p.n_shards for p in plans]
    runtime.jobs.set_totals(job_id, counts, sum(p.total_evaluations for p in plans),
                            sum(p.planning_evaluations for p in plans))
    return plans


def _plan_image(runtime: Runtime, job: JobRecord, index: int, settings: ExplainSettings, classifier,
                masker_inputs: dict) -> JobPlan | PartitionPlan:
    """Plan image ``index`` of the job and store its plan (see :func:`plan_job`)."""
    job_id, store, limits = job.id, runtime.store, runtime.policy.limits
    _check_running(runtime, job_id)
    name = runtime.name_of(input_key(job_id, index), f"image {index}" if job.n_images > 1 else "the image")
    image = fitted_input(runtime, store.get(input_key(job_id, index)), name, settings, classifier)
    if settings.method == "partition":
        plan = plan_partition(image, classifier.predict, settings, **masker_inputs)
        _put_state_once(runtime, partition_key(job_id, index, "state-0.json"), PartitionState.start(plan))
    else:
        key = segments_key(job_id, index)
        labels = load_segments(store.get(key), image.shape[:2], runtime.name_of(key, f"the segments of {name}")) \
            if store.exists(key) else segment(image, settings)
        n_players = int(labels.max()) + 1
        if limits is not None and n_players > limits.max_superpixels:
            raise InvalidSettingsError(f"{name} has {n_players} superpixels; the limit is {limits.max_superpixels}")
        plan = plan_explanation(image, classifier.predict, settings, segments=labels, default_cap=target_cap(runtime),
                                **masker_inputs)
        plan.split(runtime.policy.shards_for(plan))
    if limits is not None and len(plan.classes) > limits.max_classes:
        raise InvalidSettingsError(f"{len(plan.classes)} classes to explain per image; the limit is "
                                   f"{limits.max_classes} (give labels or top_k)")
    store.put(plan_key(job_id, index), npz_bytes(plan.to_arrays()))
    runtime.remember_plan(job_id, index, plan)
    return plan


def fitted_input(runtime: Runtime, data: bytes, name: str, settings: ExplainSettings, classifier) -> np.ndarray:
    """A stored image decoded to the model's channels and fitted to its input size (resize, crop).

    The fleet stores encoded images (checked at submission against the pixel limit); the in-process
    run stores the pixel arrays it read (``.npy``), which only a runtime that reads local files takes."""
    limits = runtime.policy.limits
    if data[:6] == NPY_MAGIC and runtime.reads_local_files:
        pixels = as_pixel_array(np.load(io.BytesIO(data), allow_pickle=False), classifier.channels, name)
    else:
        pixels = load_image(data, classifier.channels,
                            max_pixels=limits.max_image_pixels if limits is not None else DEFAULT_MAX_PIXELS)
    return fit_to_model(pixels, classifier.input_size, settings.resize, settings.center_crop, name)


def _stored(runtime: Runtime, key: str) -> bytes | None:
    return runtime.store.get(key) if runtime.store.exists(key) else None


def _reference_loader(runtime: Runtime, job_id: str, settings: ExplainSettings,
                      classifier) -> Callable[[str], np.ndarray] | None:
    """The ``image:`` masker's reference, fitted like the input: the one stored with the job, else (only
    in-process, where the path is the user's own) the file the setting names; None without either."""
    if settings.masker_spec.kind != "image":
        return None
    stored = _stored(runtime, reference_key(job_id))
    if stored is not None:
        return lambda path: fitted_input(runtime, stored, f"reference image {path}", settings, classifier)
    if not runtime.reads_local_files:
        return None
    return lambda path: fit_to_model(load_image(path, classifier.channels), classifier.input_size,
                                     settings.resize, settings.center_crop, path)


def _put_once(runtime: Runtime, key: str, data: bytes, content_type: str = "application/json") -> bool:
    """A round part's outputs are stored once, like the round records (``Runtime.put_record_once``): a
    redelivered part finds the first version and keeps it, so every worker continues from the same
    bytes even if a repeated evaluation rounds differently. Returns whether this call wrote it."""
    if runtime.store.exists(key):
        return False
    runtime.store.put(key, data, content_type)
    return True


@dataclass
class RoundRecord:
    """A partition round as chosen: the state after its nodes were taken, the nodes being refined
    (two masks each) and the ``[start, stop)`` slices of its masks that parts evaluate."""

    state: PartitionState
    expansions: list
    parts: list[tuple[int, int]]


def _encode_round(record: RoundRecord) -> bytes:
    return json_bytes({"state": record.state.to_json(), "expansions": expansions_to_json(record.expansions),
                       "parts": [list(p) for p in record.parts]})


def _decode_round(data: bytes) -> RoundRecord:
    document = json.loads(data)
    return RoundRecord(PartitionState.from_json(document["state"]), expansions_from_json(document["expansions"]),
                       [tuple(p) for p in document["parts"]])


def _encode_state(state: PartitionState) -> bytes:
    return json_bytes(state.to_json())


def _decode_state(data: bytes) -> PartitionState:
    return PartitionState.from_json(json.loads(data))


def _put_state_once(runtime: Runtime, key: str, state: PartitionState) -> bool:
    return runtime.put_record_once(key, state, _encode_state)


def _state(runtime: Runtime, key: str) -> PartitionState:
    return runtime.get_record(key, _decode_state)


def round_parts(n_masks: int, target: int, max_parts: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` slices of a round's masks, about ``target`` masks each."""
    parts = max(1, min(max_parts, -(-n_masks // max(1, target))))
    bounds = np.linspace(0, n_masks, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclass
class RoundStep:
    """What a round step did: ``parts`` to evaluate (indices), or the next round to run, or the image
    finished (``finished``; ``completed`` when it completed the job's set, and the reduce is due);
    nothing when another step already moved on."""

    parts: list[int]
    next_round: int | None = None
    completed: bool = False
    finished: bool = False


@dataclass(frozen=True)
class Recorded:
    """What recording a shard (or a round-driven image) done found: the job's set complete (the
    reduce is due), and its image's (the image can be solved and rendered)."""

    job_complete: bool
    image_complete: bool


def _image_finished(runtime: Runtime, job_id: str, image_index: int) -> RoundStep:
    """Record a round-driven image finished (its one unit, ``<image>/0``)."""
    recorded = _record_done(runtime, job_id, f"{image_index}/0")
    return RoundStep([], completed=recorded.job_complete, finished=recorded.image_complete)


def partition_round(runtime: Runtime, job_id: str, image_index: int, round_index: int) -> RoundStep:
    """Drive image ``image_index`` of a partition job at round ``round_index``; idempotent.

    Finished image: record it (``<image>/0``). Round not chosen yet: choose its nodes from the stored
    state (or, when none are left, store the finished refinement). Parts missing: report them (to
    be sent). Every part stored: apply the outputs and store the state for the next round."""
    store, jobs = runtime.store, runtime.jobs
    _check_running(runtime, job_id)
    jobs.set_round(job_id, image_index, round_index)
    final = partition_key(job_id, image_index, "final.json")
    if runtime.has_record(final):
        return _image_finished(runtime, job_id, image_index)
    round_key = partition_key(job_id, image_index, f"round-{round_index}.json")
    if not runtime.has_record(round_key):
        plan = runtime.partition_plan(job_id, image_index)
        state = _state(runtime, partition_key(job_id, image_index, f"state-{round_index}.json"))
        expansions = state.pop_round()
        if not expansions:
            _put_state_once(runtime, final, state)
            jobs.set_shard_progress(job_id, f"{image_index}/0", state.eval_count)
            return _image_finished(runtime, job_id, image_index)
        policy = runtime.policy
        parts = round_parts(2 * len(expansions), max(1, policy.shard_evaluations // plan.masker.n_backgrounds),
                            policy.max_shards)
        runtime.put_record_once(round_key, RoundRecord(state, expansions, parts), _encode_round)
    record = runtime.get_record(round_key, _decode_round)
    parts = record.parts
    part_keys = [partition_key(job_id, image_index, f"round-{round_index}/part-{p}.npy") for p in range(len(parts))]
    missing = [p for p, key in enumerate(part_keys) if not store.exists(key)]
    if missing:
        return RoundStep(missing)
    outputs = np.concatenate([np.load(io.BytesIO(store.get(key)), allow_pickle=False) for key in part_keys])
    state = record.state
    state.apply(record.expansions, outputs)
    advanced = _put_state_once(runtime, partition_key(job_id, image_index, f"state-{round_index + 1}.json"), state)
    if advanced and round_index >= 1:
        _drop_round(runtime, job_id, image_index, round_index - 1)
    jobs.set_shard_progress(job_id, f"{image_index}/0", state.eval_count)
    # Send the next round unless another step already advanced this image and started it (a
    # re-driven step must not start a second chain; one whose advancer died still continues).
    if advanced or jobs.current_round(job_id, image_index) <= round_index:
        return RoundStep([], next_round=round_index + 1)
    return RoundStep([])


def _drop_round(runtime: Runtime, job_id: str, image_index: int, round_index: int) -> None:
    """Delete a round's records once the round after it has advanced too: the stored refinement stays
    linear in the rounds (two states and two rounds at most), not quadratic. One round is kept back so
    that a duplicate step of the round just advanced still finds what it reads."""
    for name in (f"state-{round_index}.json", f"round-{round_index}.json", f"round-{round_index}/"):
        runtime.drop_records(partition_key(job_id, image_index, name))


def partition_part(runtime: Runtime, job_id: str, image_index: int, round_index: int, part: int) -> bool:
    """Evaluate one slice of a round's masks and store the outputs; returns whether the round's parts
    are all stored now (then the caller sends the round step again, which advances it)."""
    _check_running(runtime, job_id)
    key = partition_key(job_id, image_index, f"round-{round_index}/part-{part}.npy")
    record = runtime.get_record(partition_key(job_id, image_index, f"round-{round_index}.json"), _decode_round)
    if not runtime.store.exists(key):
        plan = runtime.partition_plan(job_id, image_index)
        model = runtime.classifier(runtime.jobs.get(job_id).model_sha256, plan.settings)
        start, stop = record.parts[part]
        masks = record.state.masks(record.expansions, start, stop)
        with runtime.model_call_bounds(job_id):
            outputs = masked_values(plan, model.predict, masks)
        _put_once(runtime, key, npy_bytes(outputs), "application/octet-stream")
    _, done = runtime.jobs.round_part_done(job_id, image_index, round_index, part)
    # A redelivery after the round filled up reports it complete again: the worker that completed it
    # may have died before sending the round step, and the step is idempotent.
    return done == len(record.parts)


# -- method kernel with a target: rounds of growing budgets ----------------------------------------
@dataclass
class KernelRound:
    """A target run's round as planned: the design of its budget (its budget is the design's
    coalitions) and its parts (each a run of the work units this design adds to the previous round's)."""

    design: CoalitionDesign
    parts: list[tuple[WorkUnit, ...]]

    def encode(self) -> bytes:
        return json_bytes({"design": self.design.to_dict(),
                           "parts": [[dataclasses.asdict(u) for u in part] for part in self.parts]})

    @classmethod
    def decode(cls, data: bytes) -> "KernelRound":
        document = json.loads(data)
        return cls(CoalitionDesign.from_dict(document["design"]),
                   [tuple(WorkUnit(**u) for u in part) for part in document["parts"]])


def _outcome(runtime: Runtime, job_id: str, image_index: int, name: str) -> RoundOutcome:
    return runtime.get_record(rounds_key(job_id, image_index, name), lambda b: RoundOutcome.from_dict(json.loads(b)))


def _kernel_round(runtime: Runtime, job_id: str, image_index: int, round_index: int) -> KernelRound:
    return runtime.get_record(rounds_key(job_id, image_index, f"round-{round_index}.json"), KernelRound.decode)


def _round_cap(runtime: Runtime, settings: ExplainSettings) -> int:
    return cap_of(settings, target_cap(runtime))


def kernel_round(runtime: Runtime, job_id: str, image_index: int, round_index: int) -> RoundStep:
    """Drive image ``image_index`` of a kernel job with a target at round ``round_index``; idempotent.

    Finished image: record it (``<image>/0``). Round not planned yet: plan it from the last round's
    outcome (round 0: the plan's first budget) as the units its design adds to the last round's,
    split into parts. Parts missing: report them. Every part stored: estimate from every round's
    statistics restricted to this round's design, decide (stop, or the next budget), record the
    precision, and start the next round or finish the image."""
    jobs = runtime.jobs
    _check_running(runtime, job_id)
    jobs.set_round(job_id, image_index, round_index)
    final = rounds_key(job_id, image_index, "final.json")
    if runtime.has_record(final):
        return _image_finished(runtime, job_id, image_index)
    plan = runtime.plan(job_id, image_index)
    round_key = rounds_key(job_id, image_index, f"round-{round_index}.json")
    if not runtime.has_record(round_key):
        if round_index == 0:
            design, earlier = plan.design, None
        else:
            budget = _outcome(runtime, job_id, image_index, f"outcome-{round_index - 1}.json").next_budget
            earlier = _kernel_round(runtime, job_id, image_index, round_index - 1).design
            design = CoalitionDesign.create(plan.n_players, budget, plan.design.seed)
        units = design.new_units(earlier)
        evaluations = sum(u.n_coalitions for u in units) * plan.masker.n_backgrounds
        policy = runtime.policy
        n_parts = policy.fixed_shards or max(1, min(policy.max_shards, -(-evaluations // max(1, policy.shard_evaluations))))
        parts = [p for p in design.shard_units(n_parts, units) if p] if units else []
        runtime.put_record_once(round_key, KernelRound(design, parts), KernelRound.encode)
    record = _kernel_round(runtime, job_id, image_index, round_index)
    missing = [p for p in range(len(record.parts))
               if not runtime.store.exists(rounds_key(job_id, image_index, f"round-{round_index}/part-{p}.npz"))]
    if missing:
        return RoundStep(missing)
    outcome_key = rounds_key(job_id, image_index, f"outcome-{round_index}.json")
    decided = False
    if not runtime.has_record(outcome_key):
        stats = _round_statistics(runtime, job_id, image_index, round_index, record.design)
        result = estimate(record.design, stats, plan.v_empty, plan.v_full, plan.settings.estimator,
                          plan.player_adjacency)
        target = Target.of(plan.settings)
        history = [(o.budget, o.precision) for o in
                   (_outcome(runtime, job_id, image_index, f"outcome-{r}.json") for r in range(round_index))]
        history.append((record.design.n_coalitions, target.precision(result.values, result.std)))
        largest = cap_coalitions(plan.n_players, _round_cap(runtime, plan.settings), plan.design.seed)
        outcome = decide(history, target, largest, record.design.is_exact, INITIAL_RATES[result.estimator])
        decided = runtime.put_record_once(outcome_key, outcome, lambda o: json_bytes(o.to_dict()))
        precision = {**outcome.to_dict(), **target.to_dict(), "evaluations": stats.n_evaluations}
        jobs.set_shard_progress(job_id, f"{image_index}/0", stats.n_evaluations)
        jobs.set_precision(job_id, image_index, precision,
                           _evaluations_total(runtime, job_id, image_index, precision, _round_cap(runtime, plan.settings)))
    outcome = _outcome(runtime, job_id, image_index, f"outcome-{round_index}.json")
    if outcome.stopped_because is not None:
        runtime.put_record_once(final, outcome, lambda o: json_bytes(o.to_dict()))
        return _image_finished(runtime, job_id, image_index)
    # Send the next round unless another step already decided this round and started the next (a
    # re-driven step must not start a second chain; one whose decider died still continues).
    if decided or jobs.current_round(job_id, image_index) <= round_index:
        return RoundStep([], next_round=round_index + 1)
    return RoundStep([])


def _evaluations_total(runtime: Runtime, job_id: str, image_index: int, precision: dict, cap: int) -> int:
    """The job's evaluation total once image ``image_index`` reached ``precision``: per image, what it
    spent if it stopped, else the evaluations its projection needs (at most the cap's); an image
    with no round decided yet counts its first round."""
    job = runtime.jobs.get(job_id)
    total = 0
    for index in range(job.n_images):
        plan = runtime.plan(job_id, index)
        known = precision if index == image_index else job.precision.get(index)
        if known is None:
            evaluations = plan.design.n_coalitions * plan.masker.n_backgrounds
        elif known["stopped_because"] is not None:
            evaluations = known["evaluations"]
        else:
            evaluations = max(known["evaluations"], min(known["projected"], cap) * plan.masker.n_backgrounds)
        total += plan.planning_evaluations + evaluations
    return total


def _round_statistics(runtime: Runtime, job_id: str, image_index: int, round_index: int,
                      design: CoalitionDesign) -> ShardStatistics:
    """Every part of rounds 0..``round_index``, in order, restricted to ``design``."""
    parts = []
    for r in range(round_index + 1):
        for p in range(len(_kernel_round(runtime, job_id, image_index, r).parts)):
            stats = load_statistics(runtime.store.get(rounds_key(job_id, image_index, f"round-{r}/part-{p}.npz")))
            stats.shard_index = len(parts)
            parts.append(stats)
    if not parts:  # the design adds nothing: cannot happen for round 0, whose design is not empty
        raise PipelineError(f"image {image_index} of job {job_id} has no evaluated coalitions")
    return restrict(combine(parts, len(parts)), design)


def kernel_round_part(runtime: Runtime, job_id: str, image_index: int, round_index: int, part: int,
                      on_progress: Callable[[int], None] | None = None) -> bool:
    """Evaluate one part of a target run's round and store its statistics once; returns whether the
    round's parts are all stored now (then the caller sends the round step again, which decides it).
    The records count the part's evaluations when the round is decided; ``on_progress(n)`` hears of
    them batch by batch."""
    _check_running(runtime, job_id)
    key = rounds_key(job_id, image_index, f"round-{round_index}/part-{part}.npz")
    record = _kernel_round(runtime, job_id, image_index, round_index)
    if not runtime.store.exists(key):
        plan = runtime.plan(job_id, image_index)
        model = runtime.classifier(runtime.jobs.get(job_id).model_sha256, plan.settings)
        with runtime.model_call_bounds(job_id):
            stats = evaluate_units(plan, record.design, record.parts[part], part, model.predict, on_progress,
                                   predict_coalitions=coalition_predictor(model, plan))
        _put_once(runtime, key, npz_bytes(stats.to_arrays()), "application/octet-stream")
    _, done = runtime.jobs.round_part_done(job_id, image_index, round_index, part)
    return done == len(record.parts)


def image_round(runtime: Runtime, job_id: str, image_index: int, round_index: int) -> RoundStep:
    """A round step of either kind: method partition's refinement, or a kernel target run's."""
    settings = ExplainSettings.from_dict(runtime.jobs.get(job_id).settings)
    if settings.method == "partition":
        return partition_round(runtime, job_id, image_index, round_index)
    return kernel_round(runtime, job_id, image_index, round_index)


def image_round_part(runtime: Runtime, job_id: str, image_index: int, round_index: int, part: int) -> bool:
    """A part of a round step of either kind (see :func:`image_round`)."""
    settings = ExplainSettings.from_dict(runtime.jobs.get(job_id).settings)
    if settings.method == "partition":
        return partition_part(runtime, job_id, image_index, round_index, part)
    return kernel_round_part(runtime, job_id, image_index, round_index, part)


def _target_explanation(runtime: Runtime, job_id: str, index: int) -> Explanation:
    """A target run's image reduced at its final round: the statistics of that round's design, so the
    same as a fixed-budget run of that many coalitions, with how the run ended in ``extra``."""
    plan = runtime.plan(job_id, index)
    outcome = _outcome(runtime, job_id, index, "final.json")
    design = _kernel_round(runtime, job_id, index, outcome.round_index).design
    stats = _round_statistics(runtime, job_id, index, outcome.round_index, design)
    stats.shard_index = 0
    explanation = reduce_shards(dataclasses.replace(plan, design=design, n_shards=1), [stats])
    explanation.extra.update(target_extra(Target.of(plan.settings), outcome, _round_cap(runtime, plan.settings)))
    return explanation


def evaluate_job_shard(runtime: Runtime, job_id: str, image_index: int, shard_index: int,
                       on_progress: Callable[[int], None] | None = None) -> ShardStatistics:
    """Evaluate shard ``shard_index`` of image ``image_index`` from the job's stored plan, its model calls
    bounded (:meth:`Runtime.model_call_bounds`): it stops with :class:`~shapfleet.errors.Canceled`
    within about a second once the job is no longer running, inside a batch or before the next."""
    _check_running(runtime, job_id)
    plan = runtime.plan(job_id, image_index)
    model = runtime.classifier(runtime.jobs.get(job_id).model_sha256, plan.settings)
    with runtime.model_call_bounds(job_id):
        return evaluate_shard(plan, shard_index, model.predict, on_progress=on_progress,
                              predict_coalitions=coalition_predictor(model, plan))


def store_shard(runtime: Runtime, job_id: str, image_index: int, shard_index: int, stats: ShardStatistics,
                seconds: float) -> Recorded:
    """Store a shard's statistics at its deterministic key and record it done; returns whether that
    completed the job's set of shards (the reduce is due) and its image's."""
    name = f"{image_index}/{shard_index}"
    runtime.store.put(shard_key(job_id, image_index, shard_index), npz_bytes(stats.to_arrays()))
    runtime.jobs.set_shard_progress(job_id, name, stats.n_evaluations)
    return _record_done(runtime, job_id, name,
                        on_new=lambda: runtime.record_shard_metrics(seconds, stats.n_evaluations))


def run_shard(runtime: Runtime, job_id: str, image_index: int, shard_index: int) -> tuple[str, Recorded]:
    """Evaluate one shard and store its statistics (:func:`evaluate_job_shard`, :func:`store_shard`),
    writing its progress as it goes. Returns the key and what recording it found complete.

    A shard whose statistics already exist (a redelivery after the work was done) is not evaluated
    again: the stored object is the same one a rerun would write.
    """
    key = shard_key(job_id, image_index, shard_index)
    name = f"{image_index}/{shard_index}"
    _check_running(runtime, job_id)
    if runtime.store.exists(key):
        return key, _record_done(runtime, job_id, name)
    started = time.monotonic()
    done, last_write = 0, 0.0

    def on_progress(n: int) -> None:
        nonlocal done, last_write
        done += n
        now = time.monotonic()
        if now - last_write >= PROGRESS_INTERVAL:
            last_write = now
            runtime.jobs.set_shard_progress(job_id, name, done)

    stats = evaluate_job_shard(runtime, job_id, image_index, shard_index, on_progress)
    return key, store_shard(runtime, job_id, image_index, shard_index, stats, time.monotonic() - started)


def _record_done(runtime: Runtime, job_id: str, name: str, on_new=None) -> Recorded:
    """Record shard ``name`` (``<image>/<shard>``) done.

    Of shards finishing concurrently, exactly one sees the set complete, and one its image's. A
    redelivered shard of a complete set sees it complete too: the worker that completed it may have
    been killed between recording it and sending what was due, and without a watchdog nothing else
    would send it. What it sends again is harmless (one reducer claims the job, an image's
    artifacts are stored once, success is recorded once)."""
    counts = runtime.jobs.shard_counts(job_id)
    image = int(name.split("/")[0])
    image_shards = [f"{image}/{i}" for i in range(counts[image])] if image < len(counts) else []
    added, done, image_done = runtime.jobs.shard_done(job_id, name, image_shards)
    if added and on_new is not None:
        on_new()
    return Recorded(job_complete=done == sum(counts), image_complete=image_done)


def reduce_explanations(runtime: Runtime, job_id: str) -> list[Explanation]:
    """Check that every shard of every image is recorded done and stored, and reduce each image.
    (``combine`` checks again that each index arrived exactly once.)"""
    job = _reducible(runtime, job_id)
    settings = ExplainSettings.from_dict(job.settings)
    return [_reduce_image(runtime, job_id, index, settings.method, settings.has_target) for index in range(job.n_images)]


def _reducible(runtime: Runtime, job_id: str, image: int | None = None) -> JobRecord:
    """The job's record, once every shard (or round-driven image) is recorded done; with ``image``,
    every one of that image's."""
    job = runtime.jobs.get(job_id)
    missing = [f"{n}/{i}" for n, i in runtime.jobs.missing_shards(job_id) if image is None or n == image]
    if missing or not job.shards_total:
        what = f"job {job_id}" if image is None else f"image {image} of job {job_id}"
        raise PipelineError(f"cannot reduce {what}: shards {missing or 'all'} are not done")
    return job


def job_artifacts(explanations: list[Explanation], folder_of: Callable[[int], str],
                  rendered: list[dict[str, bytes]] | None = None) -> list[tuple[str, bytes, int | None]]:
    """Every artifact of a job as ``(name, bytes, image index)``: each image's own (attributions.npz,
    the PNGs, explanation.json; ``rendered[i]`` when given, else rendered here) under
    ``folder_of(index)`` (a prefix ending in ``/``; one image's go at the top), and with several
    images the stacked ``attributions.npz`` and ``grid.png`` (index None)."""
    single = len(explanations) == 1
    if rendered is None:
        rendered = [render_artifacts(explanation) for explanation in explanations]
    artifacts = [(name if single else f"{folder_of(index)}{name}", data, index)
                 for index, own in enumerate(rendered) for name, data in own.items()]
    if not single:
        artifacts += [(name, data, None) for name, data in render_collection(explanations).items()]
    return artifacts


#: Objects are stored and read this many at a time: each is a round trip to the store (one PUT or
#: GET), and an image's handful of small objects would otherwise wait on each other.
STORE_CONCURRENCY = 8


#: The object a folder's viewer files are stored in, one after the other (beside its arrays).
BUNDLE = "bundle"


def is_bundled(name: str) -> bool:
    """Whether an artifact is one of its folder's viewer files (pages, the image, ``explanation.json``),
    stored in the folder's bundle, or its arrays (``*.npz``), stored as an object of their own."""
    return not name.endswith(".npz")


def _store_artifacts(runtime: Runtime, job_id: str, artifacts: list[tuple[str, bytes, int | None]]) -> list[dict]:
    """Store ``(name, bytes, image)`` artifacts under the job's results, concurrently; returns their
    descriptions (``name``, ``key``, ``size``, ``image``) in the order given.

    Each folder's arrays (``attributions.npz``) are an object of their own, with a presigned URL.
    Its viewer files (``summary.png``, ``image.png``, ``explanation.json`` and a page per explained
    class: 13 of a 10-class image's 14 artifacts) go, where there are several, into one object,
    ``<folder>bundle``, each described with its ``offset`` in it, which the API reads as a byte
    range. Every object is a request that the store serves at a cost that hardly depends on its
    size (about 1 ms of SeaweedFS's CPU for a 10 kB PUT here, on the cores the workers use), and a
    10-image all-class job stored 131 objects of pictures, then 31 with the class pages bundled,
    and now 11 (each image's bundle and the grid)."""
    entries: list[dict] = []
    objects: list[tuple[str, bytes, str]] = []  # (key, bytes, content type)
    bundles: dict[str, list[tuple[dict, bytes]]] = {}  # folder -> its viewer files, in order
    for name, data, image in artifacts:
        entry = {"name": name, "key": result_key(job_id, name), "size": len(data), "image": image}
        entries.append(entry)
        if is_bundled(name):
            bundles.setdefault(name.rpartition("/")[0], []).append((entry, data))
        else:
            objects.append((entry["key"], data, CONTENT_TYPES[".npz"]))
    for folder, group in bundles.items():
        if len(group) == 1:  # alone in its folder (a many-image job's grid): its own object, presigned
            (entry, data), = group
            objects.append((entry["key"], data, CONTENT_TYPES.get(entry["name"][entry["name"].rfind("."):], "")))
            continue
        key = result_key(job_id, f"{folder}/{BUNDLE}" if folder else BUNDLE)
        offset = 0
        for entry, data in group:
            entry.update(key=key, offset=offset)
            offset += len(data)
        objects.append((key, b"".join(data for _, data in group), "application/octet-stream"))
    _concurrently(lambda item: runtime.store.put(*item), objects)
    return entries


def _concurrently(function: Callable, items: list) -> list:
    """``[function(item) for item in items]``, up to ``STORE_CONCURRENCY`` at a time (store round
    trips that would otherwise wait on each other)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(STORE_CONCURRENCY, len(items))) as pool:
        return list(pool.map(function, items))


def _get_all(runtime: Runtime, keys: list[str]) -> list[bytes]:
    """The objects at ``keys``, in that order, read concurrently: a reduce that waited for each
    image's objects one after the other spent most of its time on the round trips."""
    return _concurrently(runtime.store.get, keys)


def renders_images_apart(runtime: Runtime, job_id: str) -> bool:
    """Whether the job's images are each solved and rendered on their own (:func:`render_image`), by
    the step that finishes the image: jobs of several images. A one-image job's reduce renders it."""
    return runtime.jobs.get(job_id).n_images > 1


def unrendered_images(runtime: Runtime, job_id: str) -> list[int]:
    """A many-image job's images whose artifacts are not stored yet; [] for a one-image job."""
    job = runtime.jobs.get(job_id)
    if job.n_images == 1:
        return []
    return [i for i in range(job.n_images) if not runtime.store.exists(rendered_key(job_id, i))]


#: The part of a many-image job's rendering that needs every image: the stacked ``attributions.npz``
#: and ``grid.png`` (a member of its rendered set beside the images' indexes).
COLLECTION = "collection"


def render_image(runtime: Runtime, job_id: str, index: int,
                 on_values_complete: Callable[[], None] | None = None) -> bool:
    """A many-image job's image solved and rendered on its own, once its shards (or rounds) are
    done, while other images may still be evaluated: its artifacts under ``<index>/`` in the
    results, and their listing in the working state, stored once. Its ``attributions.npz`` is
    stored first, and the step whose image completes the job's set of stored values calls
    ``on_values_complete`` before drawing its own pages, so that the collection
    (:func:`render_job_collection`) can be drawn on another worker meanwhile. Returns whether the
    job's rendering is complete now (every image and the collection): then the job is due to finish."""
    _check_running(runtime, job_id)
    job = _reducible(runtime, job_id, index)
    listing_key = rendered_key(job_id, index)
    if runtime.store.exists(listing_key):  # a redelivered step: only the records may be missing
        _record_values(runtime, job_id, index, job.n_images, on_values_complete)
    else:
        settings = ExplainSettings.from_dict(job.settings)
        explanation = _reduce_image(runtime, job_id, index, settings.method, settings.has_target)
        explanation.extra["image_index"] = index
        listing = _store_artifacts(runtime, job_id, [(f"{index}/attributions.npz", explanation.to_npz_bytes(), index)])
        _record_values(runtime, job_id, index, job.n_images, on_values_complete)
        listing += _store_artifacts(runtime, job_id, [(f"{index}/{name}", data, index)
                                                      for name, data in render_viewer_files(explanation).items()])
        _keep_only_if_running(runtime, job_id)
        runtime.store.put(listing_key, json_bytes(listing), "application/json")
    _, done = runtime.jobs.image_rendered(job_id, index)
    return done == job.n_images + 1


def _record_values(runtime: Runtime, job_id: str, index: int, n_images: int,
                   on_values_complete: Callable[[], None] | None) -> None:
    """Record image ``index``'s values stored; the step that finds every image's stored (a
    redelivered one again: the collection's step is idempotent) calls ``on_values_complete``."""
    _, stored = runtime.jobs.values_stored(job_id, index)
    if stored == n_images and on_values_complete is not None:
        on_values_complete()


def _keep_only_if_running(runtime: Runtime, job_id: str) -> None:
    """After a render step stored artifacts: a job canceled (or failed) meanwhile keeps none of its
    results, and the step stops. (A job that succeeded meanwhile, found by a duplicate step, kept
    the same bytes under the same keys.)"""
    status = runtime.jobs.status(job_id)
    if status not in (JobStatus.RUNNING, JobStatus.SUCCEEDED):
        discard_results(runtime, job_id)
        raise Canceled(f"job {job_id} is no longer running")


def render_job_collection(runtime: Runtime, job_id: str) -> bool:
    """A many-image job's collection, from every image's stored ``attributions.npz`` (all stored
    before this step is sent): the stacked ``attributions.npz`` and ``grid.png`` at the top of the
    results, and their listing, stored once. Returns, as :func:`render_image`, whether the job's
    rendering is complete now."""
    _check_running(runtime, job_id)
    job = runtime.jobs.get(job_id)
    _ensure_collection(runtime, job_id, job.n_images)
    _, done = runtime.jobs.image_rendered(job_id, COLLECTION)
    return done == job.n_images + 1


def _ensure_collection(runtime: Runtime, job_id: str, n_images: int) -> None:
    """Draw and store the job's collection and its listing, unless its listing is stored already."""
    if runtime.store.exists(rendered_key(job_id, COLLECTION)):
        return
    keys = [result_key(job_id, f"{i}/attributions.npz") for i in range(n_images)]
    try:
        explanations = [Explanation.load(data) for data in _get_all(runtime, keys)]
    except ObjectNotFound as e:
        raise PipelineError(f"stored results {e} are missing from the store") from e
    listing = _store_artifacts(runtime, job_id, [(name, data, None) for name, data in render_collection(explanations).items()])
    _keep_only_if_running(runtime, job_id)
    runtime.store.put(rendered_key(job_id, COLLECTION), json_bytes(listing), "application/json")


def reduce_job(runtime: Runtime, job_id: str) -> list[dict]:
    """The fleet's reduce: one image is reduced, rendered and stored here; a many-image job's images
    and its collection were rendered by their own steps (:func:`render_image`,
    :func:`render_job_collection`), and this reads their listings (drawing the collection here
    when its step never ran: a job re-driven by the watchdog). Returns the descriptions of every
    artifact of the job (several images: ``<n>/<artifact>`` first)."""
    job = _reducible(runtime, job_id)
    if job.n_images == 1:
        (explanation,) = reduce_explanations(runtime, job_id)
        explanation.extra["image_index"] = 0
        _check_running(runtime, job_id)
        return _store_artifacts(runtime, job_id, job_artifacts([explanation], lambda index: ""))
    keys = [rendered_key(job_id, i) for i in range(job.n_images)]
    _ensure_collection(runtime, job_id, job.n_images)
    try:
        listings = [json.loads(data) for data in _get_all(runtime, keys + [rendered_key(job_id, COLLECTION)])]
    except ObjectNotFound as e:
        raise PipelineError(f"stored results {e} are missing from the store") from e
    _check_running(runtime, job_id)
    return [entry for listing in listings for entry in listing]


def discard_results(runtime: Runtime, job_id: str) -> None:
    """Delete the artifacts a reduce wrote for a job that did not succeed (canceled meanwhile)."""
    runtime.store.delete_prefix(result_prefix(job_id))


def _reduce_image(runtime: Runtime, job_id: str, index: int, method: str, target: bool) -> Explanation:
    try:
        if method == "partition":
            plan = runtime.partition_plan(job_id, index)
            state = _state(runtime, partition_key(job_id, index, "final.json"))
            return partition_explanation(plan, state)
        if target:
            return _target_explanation(runtime, job_id, index)
        plan = runtime.plan(job_id, index)
        stats = [load_statistics(data) for data in _get_all(runtime, [shard_key(job_id, index, i) for i in range(plan.n_shards)])]
    except ObjectNotFound as e:
        raise PipelineError(f"stored results {e} are missing from the store") from e
    return reduce_shards(plan, stats)
