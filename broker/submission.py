"""Submitting a job: check it, store the inputs, write the record, then enqueue the plan task.

The record exists before anything is enqueued, and a job whose plan task cannot be enqueued is
failed at once, so an accepted job is never lost between the two.
"""

from __future__ import annotations

import hashlib
import json

from shapfleet.errors import ObjectNotFound, QueueUnavailable
from shapfleet.workers.engine.settings import ExplainSettings

from . import redis_keys
from .celery_app import PLAN_TASK
from .keys import background_key, input_key, model_key, reference_key, segments_key
from .records import JobRecord, new_job_id
from .services import Services
from .validation import check_job


def store_model(services: Services, model_bytes: bytes) -> str:
    """Store model bytes under their sha256 (idempotent); returns the sha256."""
    sha256 = hashlib.sha256(model_bytes).hexdigest()
    if not services.store.exists(model_key(sha256)):
        services.store.put(model_key(sha256), model_bytes)
    return sha256


def submit_job(services: Services, tenant: str, model_sha256: str, images: list[bytes],
               settings: ExplainSettings, background: bytes | None = None, model: dict | None = None,
               segments: list[bytes | None] | None = None, reference: bytes | None = None) -> JobRecord:
    """Check the job (:func:`~shapfleet.broker.validation.check_job`; ``model`` is what validation
    learnt of the model, read from its record when not given), then :func:`enqueue_job`."""
    if model is None:
        meta = services.redis.get(redis_keys.model_meta(model_sha256))
        model = json.loads(meta) if meta else {}
    segments = check_job(settings, images, background, model, services.settings.limits, segments, reference)
    return enqueue_job(services, tenant, model_sha256, images, settings, background, segments, reference)


def enqueue_job(services: Services, tenant: str, model_sha256: str, images: list[bytes],
                settings: ExplainSettings, background: bytes | None = None,
                segments: list[bytes | None] | None = None, reference: bytes | None = None) -> JobRecord:
    """Store the inputs of a checked job (its images, their label maps, the background set of a
    ``dataset:`` job, the reference of an ``image:`` one), create the record, enqueue the plan. The
    API checks a job before it stores an inline model, then calls this."""
    if not services.store.exists(model_key(model_sha256)):
        raise ObjectNotFound(f"model {model_sha256}")
    job_id = new_job_id()
    keys = []
    for index, data in enumerate(images):
        services.store.put(input_key(job_id, index), data)
        keys.append(input_key(job_id, index))
    for index, labels in enumerate(segments or []):
        if labels is not None:
            services.store.put(segments_key(job_id, index), labels)
    if background is not None:
        services.store.put(background_key(job_id), background)
    if reference is not None:
        services.store.put(reference_key(job_id), reference)
    record = services.jobs.create(tenant, settings.to_dict(), model_sha256, keys,
                                  services.settings.job_deadline, job_id=job_id)
    try:
        services.celery.send_task(PLAN_TASK, args=[job_id], queue=services.settings.queue_plan)
    except Exception as e:  # kombu raises OperationalError and others when the broker is down
        services.jobs.fail(job_id, "EnqueueFailed", f"the job could not be queued: {type(e).__name__}")
        raise QueueUnavailable("the job queue is unavailable; try again later") from e
    return record
