"""Celery tasks: thin wrappers around :mod:`shapfleet.workers.steps` that handle state, retries and errors.

- ``shapfleet.plan(job_id)``: queued -> running, plan every image, send one shard task per shard,
  largest first (see :func:`~shapfleet.workers.engine.planning.largest_shards_first`).
- ``shapfleet.shard(job_id, image, index)``: evaluate, store statistics, record the shard done; the
  shard that completes the job's set enqueues the reduce, and so does any redelivered shard that
  finds the set complete (its first worker may have died before enqueuing it). Returns the key.
- ``shapfleet.reduce(job_id)``: check every shard is done, reduce, render, store; running -> succeeded.
  A many-image job's images are each solved and rendered by the step that completes the image's
  shards, or by a ``shapfleet.render(job_id, image)`` (on the shards queue, so that the images
  render on many workers at once) that a reduce sends for each image it finds unrendered. The step
  whose image's ``attributions.npz`` completes the job's set of stored values sends
  ``shapfleet.collect(job_id)`` before drawing its own pages: the stacked ``attributions.npz`` and
  ``grid.png``, drawn on another worker meanwhile. Whichever of these steps completes the job's
  rendering (every image and the collection) succeeds the job.

Method partition, and method kernel with a target (``target_std``/``target_error``), replace the
shards with rounds, per image and in parallel across images (a kernel round evaluates what a larger
budget's design adds, and its step decides from the estimate whether to stop or grow the budget):
- ``shapfleet.partition_round(job_id, image, round)``: choose the round's nodes from the stored
  state and send one ``partition_part`` per slice of its masks; once every part is stored, apply
  the outputs and send the next round; when nothing is left to refine, record the image done (the
  one that completes the job's set enqueues the reduce). Idempotent: the watchdog re-drives a
  stalled image by sending its current round again.
- ``shapfleet.partition_part(job_id, image, round, part)``: evaluate a slice of the round's masks and
  store the outputs; a part that finds the round complete sends the round step again.

Why not a Celery chord: a chord's completion is counted in the result backend by Celery, and with
late acknowledgement a shard whose worker was killed is redelivered outside that count; we saw every
shard of a job stored and the chord's callback never sent. The job's own records (a Redis set of
shard names) are the barrier instead: idempotent under redelivery and duplicates, and what the
watchdog re-drives from.

Errors: a :class:`ShapfleetError` (bad input, a model that returns NaN) fails the job at once with its
message; transient store or Redis errors are retried with exponential backoff up to
``storage_retries`` times, then fail the job saying so. Tasks configure nothing: settings come from
the app the worker was started with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis.exceptions
from celery import current_app, group, shared_task
from celery.signals import worker_process_init

from shapfleet.broker.celery_app import (
    COLLECT_TASK,
    PART_TASK,
    PLAN_TASK,
    REDUCE_TASK,
    RENDER_TASK,
    ROUND_TASK,
    SHARD_TASK,
    WATCHDOG_TASK,
)
from shapfleet.broker.records import JobStatus
from shapfleet.broker.services import Services
from shapfleet.broker.store import TransientStoreError
from shapfleet.errors import Canceled, ShapfleetError
from shapfleet.workers import steps
from shapfleet.workers.engine.partition import PartitionPlan
from shapfleet.workers.engine.planning import largest_shards_first
from shapfleet.workers.runtime import ServiceRuntime

log = logging.getLogger(__name__)

TRANSIENT = (TransientStoreError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@worker_process_init.connect
def _prepare_pool_process(**_) -> None:
    """Record this pool process's index (it picks the GPU on multi-GPU hosts) and bound its memory."""
    from billiard.process import current_process

    from shapfleet.workers import runtime

    runtime.process_index = getattr(current_process(), "index", None)
    settings = current_app.shapfleet_settings
    limit_process_memory(settings.limits.worker_memory_bytes, settings.gpus)


def limit_process_memory(memory_bytes: int, gpus: int) -> bool:
    """Cap this process's address space at ``memory_bytes`` (RLIMIT_AS), so that an allocation past it
    fails inside the model call (and fails that job) instead of the kernel killing whatever process
    it picks on the host. Not on a GPU host: CUDA reserves far more address space than it uses; there
    the per-call bounds poll resident memory instead. Returns whether the cap was set."""
    import resource

    import onnxruntime

    if not memory_bytes or gpus > 0 or "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return False
    _limit_malloc_arenas(4)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return True


def _limit_malloc_arenas(count: int) -> None:
    """glibc reserves 64 MiB of address space for each thread's malloc arena (up to 8 per core): on a
    many-core host that alone would approach the cap. A few arenas serve onnxruntime and numpy as well."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, count)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: its allocator reserves no such arenas


def runtime_of(app) -> ServiceRuntime:
    """The process's runtime, built once from the settings the app was created with."""
    runtime = getattr(app, "_shapfleet_runtime", None)
    if runtime is None:
        runtime = ServiceRuntime(Services.from_settings(app.shapfleet_settings, app))
        app._shapfleet_runtime = runtime
    return runtime


def _handle_failure(task, runtime: ServiceRuntime, job_id: str, error: Exception, what: str):
    """Retry transient errors with backoff; fail the job on anything else (and raise). A step stopped
    because its job was canceled (or failed elsewhere) just ends: there is nothing to record."""
    if isinstance(error, Canceled):
        log.info("%s of job %s stopped: %s", what, job_id, error)
        return None
    retries = runtime.services.settings.storage_retries
    if isinstance(error, TRANSIENT) and task.request.retries < retries:
        delay = min(30, 2 ** task.request.retries)
        log.warning("%s of job %s hit a transient error (%s); retry %d in %ss", what, job_id, error,
                    task.request.retries + 1, delay)
        raise task.retry(exc=error, countdown=delay, max_retries=retries)
    if isinstance(error, TRANSIENT):
        message = f"{what} failed: storage unavailable after {retries} retries ({error})"
        kind = "StorageUnavailable"
    elif isinstance(error, ShapfleetError):
        message, kind = str(error), type(error).__name__
    else:
        log.exception("%s of job %s failed", what, job_id)
        message, kind = f"{what} failed unexpectedly: {type(error).__name__}: {error}", "InternalError"
    try:
        runtime.services.jobs.fail(job_id, kind, message)
    except TRANSIENT:
        log.error("could not record the failure of job %s: %s", job_id, message)
    raise error


@shared_task(name=PLAN_TASK, bind=True)
def plan(self, job_id: str) -> int:
    runtime = runtime_of(self.app)
    jobs = runtime.services.jobs
    try:
        status = jobs.status(job_id)
        if status is None or status.is_final:
            return 0
        settings = runtime.services.settings
        # One planner per job: a duplicate message (the watchdog's, for a job that was only waiting in
        # the queue) must neither plan it twice nor count as a crashed start of the first.
        if not runtime.services.claims.claim_plan(job_id, self.request.id or "", settings.visibility_timeout):
            return 0
        if _crashed_too_often(self, runtime.services, job_id, "planning", settings.max_shard_deliveries):
            return 0
        jobs.start(job_id)
        plans = steps.plan_job(runtime, job_id)
        if isinstance(plans[0], PartitionPlan) or plans[0].settings.has_target:
            group([partition_round.s(job_id, index, 0) for index in range(len(plans))]).apply_async()
            return len(plans)
        group([shard.s(job_id, index, i) for index, i in largest_shards_first(plans)]).apply_async()
        return sum(p.n_shards for p in plans)
    except Exception as error:
        _handle_failure(self, runtime, job_id, error, "planning")


def _crashed_too_often(task, services: Services, job_id: str, name: str, limit: int) -> bool:
    """Count this start of a plan or shard-like message; past ``limit`` starts fail the job and say so.

    The same message starting again means its last worker died mid-task (acks are late, so it was
    redelivered). A message that kills its worker every time must not loop forever."""
    starts = services.claims.count_delivery(job_id, f"{name}#{task.request.retries}")
    if starts <= limit:
        return False
    what = name if name == "planning" else f"shard {name}"
    services.jobs.fail(job_id, "ShardCrashed" if name != "planning" else "PlanCrashed",
                       f"{what} was started {starts - 1} times and its worker process died each time (the model may "
                       "crash onnxruntime, or exhaust memory); the job was stopped")
    return True


@shared_task(name=SHARD_TASK, bind=True)
def shard(self, job_id: str, image_index: int, shard_index: int) -> str | None:
    runtime = runtime_of(self.app)
    limit = runtime.services.settings.max_shard_deliveries
    try:
        if _crashed_too_often(self, runtime.services, job_id, f"{image_index}/{shard_index}", limit):
            return None
        key, recorded = steps.run_shard(runtime, job_id, image_index, shard_index)
        if recorded.image_complete:
            _after_image(runtime, job_id, image_index, recorded.job_complete, self.request.id or "")
        return key
    except Exception as error:
        _handle_failure(self, runtime, job_id, error, f"shard {image_index}/{shard_index}")


@shared_task(name=ROUND_TASK, bind=True)
def partition_round(self, job_id: str, image_index: int, round_index: int) -> int:
    runtime = runtime_of(self.app)
    try:
        step = steps.image_round(runtime, job_id, image_index, round_index)
        if step.parts:
            group([partition_part.s(job_id, image_index, round_index, p) for p in step.parts]).apply_async()
        elif step.next_round is not None:
            partition_round.apply_async(args=[job_id, image_index, step.next_round])
        elif step.finished:
            _after_image(runtime, job_id, image_index, step.completed, self.request.id or "")
        return len(step.parts)
    except Exception as error:
        _handle_failure(self, runtime, job_id, error, f"partition round {image_index}/{round_index}")


@shared_task(name=PART_TASK, bind=True)
def partition_part(self, job_id: str, image_index: int, round_index: int, part: int) -> bool:
    runtime = runtime_of(self.app)
    limit = runtime.services.settings.max_shard_deliveries
    name = f"{image_index}/r{round_index}/{part}"
    try:
        if _crashed_too_often(self, runtime.services, job_id, name, limit):
            return False
        completed = steps.image_round_part(runtime, job_id, image_index, round_index, part)
        if completed:
            partition_round.apply_async(args=[job_id, image_index, round_index])
        return completed
    except Exception as error:
        _handle_failure(self, runtime, job_id, error, f"partition part {name}")


@shared_task(name=REDUCE_TASK, bind=True)
def reduce(self, job_id: str) -> int:
    runtime = runtime_of(self.app)
    try:
        if runtime.services.jobs.status(job_id) != JobStatus.RUNNING:
            return 0  # canceled or failed meanwhile, or a duplicate reduce after success: write nothing
        if _send_renders(runtime, job_id):
            return 0
        return _finish(runtime, job_id, self.request.id or "")
    except Exception as error:
        _handle_failure(self, runtime, job_id, error, "reduce")


def _send_renders(runtime: ServiceRuntime, job_id: str) -> bool:
    """A many-image job's images not rendered yet each get a render task (the one that completes the
    set finishes the job); returns whether any was sent. Sent again by a redelivered or re-driven
    reduce, a render task finds its image stored and only records it."""
    unrendered = steps.unrendered_images(runtime, job_id)
    if unrendered:
        group([render.s(job_id, index) for index in unrendered]).apply_async()
    return bool(unrendered)


def _after_image(runtime: ServiceRuntime, job_id: str, image_index: int, job_complete: bool, holder: str) -> None:
    """What the step that finishes an image does. In a many-image job it solves and renders that
    image itself, on the worker that is free now and while other images' shards may still run, and
    the step that completes the job's rendering (every image and the collection) finishes the job
    (a redelivered step does it again; what is stored already is kept). A one-image job's last step sends the reduce."""
    if steps.renders_images_apart(runtime, job_id):
        if steps.render_image(runtime, job_id, image_index, _sender_of_collection(job_id)):
            _finish(runtime, job_id, holder)
    elif job_complete:
        reduce.apply_async(args=[job_id])


def _finish(runtime: ServiceRuntime, job_id: str, holder: str) -> int:
    """Reduce (what is left of it), store the results and succeed the job, once: one reducer per
    job, even when the reduce is enqueued twice; the same message redelivered after its worker died
    keeps the claim (it has the same task id). Returns the number of results."""
    jobs, claims = runtime.services.jobs, runtime.services.claims
    if not claims.claim_reduce(job_id, holder, runtime.services.settings.visibility_timeout):
        return 0
    jobs.touch(job_id)  # activity: the watchdog leaves a job alone while its reducer works
    try:
        results = steps.reduce_job(runtime, job_id)
        if jobs.succeed(job_id, results):
            claims.count_reduction(job_id)
        else:  # canceled (or failed) while reducing: no result of it is kept
            steps.discard_results(runtime, job_id)
            return 0
    except BaseException:
        try:
            if jobs.status(job_id) != JobStatus.RUNNING:  # canceled (or failed) meanwhile: keep no result
                steps.discard_results(runtime, job_id)
        finally:  # let go only once nothing of it is left (a waiting reducer would find a half-deleted job)
            claims.release_reduce(job_id)
        raise
    return len(results)


@shared_task(name=RENDER_TASK, bind=True)
def render(self, job_id: str, image_index: int) -> bool:
    """Solve and render one image of a many-image job (sent by a reduce that found it unrendered)."""
    return _rendering_step(self, job_id, f"rendering image {image_index}",
                           lambda runtime: steps.render_image(runtime, job_id, image_index, _sender_of_collection(job_id)))


def _rendering_step(task, job_id: str, what: str, step: Callable[[ServiceRuntime], bool]) -> bool:
    """Run a rendering ``step`` of a running job; the step that completes the job's rendering (it
    returns true) finishes the job. Returns whether it did; a job no longer running renders nothing."""
    runtime = runtime_of(task.app)
    try:
        if runtime.services.jobs.status(job_id) != JobStatus.RUNNING:
            return False
        completed = step(runtime)
        if completed:  # the job's last rendering: this task finishes the job
            _finish(runtime, job_id, task.request.id or "")
        return completed
    except Exception as error:
        _handle_failure(task, runtime, job_id, error, what)


def _sender_of_collection(job_id: str) -> Callable[[], object]:
    """What a render step calls once every image's values are stored: send the job's collect step."""
    return lambda: collect.apply_async(args=[job_id])


@shared_task(name=COLLECT_TASK, bind=True)
def collect(self, job_id: str) -> bool:
    """Draw a many-image job's collection (stacked ``attributions.npz``, ``grid.png``) once every
    image's values are stored; the step that completes the job's rendering succeeds the job.
    Returns whether this step did."""
    return _rendering_step(self, job_id, "drawing the job's collection",
                           lambda runtime: steps.render_job_collection(runtime, job_id))


@shared_task(name=WATCHDOG_TASK)
def watchdog() -> dict:
    """Periodic (``shapfleet worker --beat``): fail overdue jobs, re-drive stalled ones, apply retention."""
    from shapfleet.broker.retention import retention_pass
    from shapfleet.broker.watchdog import watchdog_pass

    services = runtime_of(current_app).services
    return {**watchdog_pass(services), **retention_pass(services)}
