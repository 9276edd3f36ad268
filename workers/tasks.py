"""Celery tasks: thin wrappers around :mod:`workers.pipeline` that handle state, retries and errors.

- ``shapfleet.plan(job_id)``: queued -> running, plan every image, launch a flat chord of shard tasks
  with the reduce task as its body and ``shapfleet.job_failed`` as the body's errback.
- ``shapfleet.shard(job_id, image, index)``: evaluate, store statistics, return the key.
- ``shapfleet.reduce(keys, job_id)``: reduce, render, store; running -> succeeded.

Errors: a :class:`ShapfleetError` (bad input, a model that returns NaN) fails the job at once with its
message; transient store or Redis errors are retried with exponential backoff up to
``storage_retries`` times, then fail the job saying so. Tasks configure nothing: settings come from
the app the worker was started with.
"""

from __future__ import annotations

import logging

import redis.exceptions
from celery import chord, current_app, shared_task
from celery.signals import worker_process_init

from broker.celery_app import JOB_FAILED_TASK, PLAN_TASK, REDUCE_TASK, SHARD_TASK
from broker.jobs import JobStatus
from broker.services import Services
from broker.store import TransientStoreError
from workers import pipeline
from workers.engine.errors import Canceled, ShapfleetError
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)

TRANSIENT = (TransientStoreError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@worker_process_init.connect
def _remember_pool_index(**_) -> None:
    """Record this pool process's index, which picks its GPU on multi-GPU hosts."""
    from billiard.process import current_process

    from workers import runtime

    runtime.process_index = getattr(current_process(), "index", None)


def runtime_of(app) -> WorkerRuntime:
    """The process's runtime, built once from the settings the app was created with."""
    runtime = getattr(app, "_shapfleet_runtime", None)
    if runtime is None:
        runtime = WorkerRuntime(Services.from_settings(app.shapfleet_settings, app))
        app._shapfleet_runtime = runtime
    return runtime


def _handle_failure(task, runtime: WorkerRuntime, job_id: str, error: Exception, what: str):
    """Retry transient errors with backoff; fail the job on anything else. Always raises."""
    if isinstance(error, Canceled):
        raise error
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
        jobs.start(job_id)
        plans = pipeline.plan_job(runtime, job_id)
        header = [shard.s(job_id, index, i) for index, p in enumerate(plans) for i in range(p.n_shards)]
        body = reduce.s(job_id).on_error(job_failed.s(job_id))
        chord(header)(body)
        return len(header)
    except Exception as error:
        _handle_failure(self, runtime, job_id, error, "planning")


@shared_task(name=SHARD_TASK, bind=True)
def shard(self, job_id: str, image_index: int, shard_index: int) -> str:
    runtime = runtime_of(self.app)
    try:
        return pipeline.run_shard(runtime, job_id, image_index, shard_index)
    except Exception as error:
        _handle_failure(self, runtime, job_id, error, f"shard {image_index}/{shard_index}")


@shared_task(name=REDUCE_TASK, bind=True)
def reduce(self, shard_keys: list[str], job_id: str) -> int:
    runtime = runtime_of(self.app)
    jobs = runtime.services.jobs
    try:
        if jobs.status(job_id) != JobStatus.RUNNING:
            return 0  # canceled or failed meanwhile, or a duplicate reduce after success: write nothing
        results = pipeline.reduce_job(runtime, job_id, shard_keys)
        jobs.succeed(job_id, results)
        return len(results)
    except Exception as error:
        _handle_failure(self, runtime, job_id, error, "reduce")


@shared_task(name=JOB_FAILED_TASK)
def job_failed(request, exc, traceback, job_id: str) -> None:
    """The chord's errback: a shard failed in a way its own handler could not record (its worker
    died, say); fail the job with what Celery reports, unless it already reached a final state.

    Not bound: Celery calls an errback in-process with (request, exc, traceback) only when the
    task's signature takes them directly, which a bound task's does not."""
    runtime = runtime_of(current_app)
    message = str(exc) or type(exc).__name__
    runtime.services.jobs.fail(job_id, "ShardFailed", f"a shard failed: {message}")
