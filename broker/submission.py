"""Submitting a job: store the inputs, write the record, then enqueue the plan task.

The record exists before anything is enqueued, and a job whose plan task cannot be enqueued is
failed at once, so an accepted job is never lost between the two.
"""

from __future__ import annotations

import hashlib

from workers.engine.settings import ExplainSettings

from .celery_app import PLAN_TASK
from .jobs import JobRecord, new_job_id
from .keys import input_key, model_key
from .services import Services
from .settings import Limits
from .store import ObjectNotFound


class SubmissionError(Exception):
    """Raised when a job cannot be accepted (too many images, nsamples over the limit, ...)."""


class QueueUnavailable(SubmissionError):
    """Raised when the job's plan task cannot be enqueued (the broker is down); the job is failed."""


def store_model(services: Services, model_bytes: bytes) -> str:
    """Store model bytes under their sha256 (idempotent); returns the sha256."""
    sha256 = hashlib.sha256(model_bytes).hexdigest()
    if not services.store.exists(model_key(sha256)):
        services.store.put(model_key(sha256), model_bytes)
    return sha256


def check_submission(settings: ExplainSettings, n_images: int, limits: Limits) -> None:
    """The job-level limits (images per job, nsamples) and what jobs cannot take (file-based
    maskers), each message naming the limit. Raises :class:`SubmissionError`."""
    if not n_images:
        raise SubmissionError("a job needs at least one image")
    if n_images > limits.max_images_per_job:
        raise SubmissionError(f"{n_images} images; the limit is {limits.max_images_per_job} per job")
    if settings.nsamples is not None and settings.nsamples > limits.max_nsamples:
        raise SubmissionError(f"nsamples={settings.nsamples}; the limit is {limits.max_nsamples}")
    if settings.masker_spec.kind in ("image", "dataset"):
        raise SubmissionError(f"masker {settings.masker_spec.kind}: is available in `shapfleet explain` only")


def submit_job(services: Services, tenant: str, model_sha256: str, images: list[bytes],
               settings: ExplainSettings) -> JobRecord:
    check_submission(settings, len(images), services.settings.limits)
    if not services.store.exists(model_key(model_sha256)):
        raise ObjectNotFound(f"model {model_sha256}")
    job_id = new_job_id()
    keys = []
    for index, data in enumerate(images):
        services.store.put(input_key(job_id, index), data)
        keys.append(input_key(job_id, index))
    record = services.jobs.create(tenant, settings.to_dict(), model_sha256, keys,
                                  services.settings.job_deadline, job_id=job_id)
    try:
        services.celery.send_task(PLAN_TASK, args=[job_id], queue=services.settings.queue_plan)
    except Exception as e:  # kombu raises OperationalError and others when the broker is down
        services.jobs.fail(job_id, "EnqueueFailed", f"the job could not be queued: {type(e).__name__}")
        raise QueueUnavailable("the job queue is unavailable; try again later") from e
    return record
