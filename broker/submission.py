"""Submitting a job: store the inputs, write the record, then enqueue the plan task.

The record exists before anything is enqueued, and a job whose plan task cannot be enqueued is
failed at once, so an accepted job is never lost between the two.
"""

from __future__ import annotations

import hashlib

from shapfleet.errors import QueueUnavailable, SubmissionError
from shapfleet.workers.engine.settings import ExplainSettings

from .celery_app import PLAN_TASK
from .keys import background_key, input_key, model_key
from .records import JobRecord, new_job_id
from .services import Services
from .settings import Limits
from .store import ObjectNotFound


def store_model(services: Services, model_bytes: bytes) -> str:
    """Store model bytes under their sha256 (idempotent); returns the sha256."""
    sha256 = hashlib.sha256(model_bytes).hexdigest()
    if not services.store.exists(model_key(sha256)):
        services.store.put(model_key(sha256), model_bytes)
    return sha256


def check_submission(settings: ExplainSettings, n_images: int, limits: Limits,
                     background: bytes | None = None) -> tuple[int, ...] | None:
    """The job-level limits (images per job, nsamples, max_evals, background images) and what jobs
    cannot take (a reference-image file), each message naming the limit. Raises :class:`SubmissionError`.
    Returns the background set's array shape (see :func:`check_background_set`), or None without one."""
    if not n_images:
        raise SubmissionError("a job needs at least one image")
    if n_images > limits.max_images_per_job:
        raise SubmissionError(f"{n_images} images; the limit is {limits.max_images_per_job} per job")
    if settings.nsamples is not None and settings.nsamples > limits.max_nsamples:
        raise SubmissionError(f"nsamples={settings.nsamples}; the limit is {limits.max_nsamples}")
    if settings.max_evals is not None and settings.max_evals > limits.max_evals:
        raise SubmissionError(f"max_evals={settings.max_evals}; the limit is {limits.max_evals}")
    if settings.masker_spec.kind == "image":
        raise SubmissionError("masker image: is available in `shapfleet explain` only; in a job, upload the "
                              "reference as a background set of one image (masker dataset:)")
    if (settings.masker_spec.kind == "dataset") != (background is not None):
        raise SubmissionError("masker dataset: needs the background set uploaded with the job (file field "
                              "'background', an .npz of N x H x W (x C) images), and a background set needs masker dataset:")
    return check_background_set(background, limits) if background is not None else None


def check_background_set(data: bytes, limits: Limits) -> tuple[int, ...]:
    """Check the uploaded background set from its array header alone (nothing is decompressed, so a
    small upload cannot expand into a huge array here): an ``.npz`` whose ``images`` array (or only
    array) is N x H x W (x C) numbers, N within the limit. Returns the shape."""
    import io
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [member[:-4] for member in archive.namelist() if member.endswith(".npy")]
            name = "images" if "images" in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise SubmissionError(f"the background set holds arrays {names}; name the image array 'images'")
            with archive.open(f"{name}.npy") as member:
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(member)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise SubmissionError(f"the background set is not a readable .npz of images: {e}") from None
    if len(shape) not in (3, 4) or shape[0] == 0 or not np.issubdtype(dtype, np.number):
        raise SubmissionError(f"the background set must be N x H x W (x C) numbers with N >= 1, got {dtype} {list(shape)}")
    if shape[0] > limits.max_background_images:
        raise SubmissionError(f"the background set holds {shape[0]} images; the limit is {limits.max_background_images}")
    return tuple(shape)


def submit_job(services: Services, tenant: str, model_sha256: str, images: list[bytes],
               settings: ExplainSettings, background: bytes | None = None) -> JobRecord:
    """Store the inputs (and the background set of a ``dataset:`` job), create the record, enqueue."""
    check_submission(settings, len(images), services.settings.limits, background)
    if not services.store.exists(model_key(model_sha256)):
        raise ObjectNotFound(f"model {model_sha256}")
    job_id = new_job_id()
    keys = []
    for index, data in enumerate(images):
        services.store.put(input_key(job_id, index), data)
        keys.append(input_key(job_id, index))
    if background is not None:
        services.store.put(background_key(job_id), background)
    record = services.jobs.create(tenant, settings.to_dict(), model_sha256, keys,
                                  services.settings.job_deadline, job_id=job_id)
    try:
        services.celery.send_task(PLAN_TASK, args=[job_id], queue=services.settings.queue_plan)
    except Exception as e:  # kombu raises OperationalError and others when the broker is down
        services.jobs.fail(job_id, "EnqueueFailed", f"the job could not be queued: {type(e).__name__}")
        raise QueueUnavailable("the job queue is unavailable; try again later") from e
    return record
