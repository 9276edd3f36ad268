"""Every Redis key name, in one place (object-store keys are in :mod:`shapfleet.broker.keys`).

All keys start with ``shapfleet:``. Per job: the record hash and its sets and hashes (shards done,
per-shard progress, deliveries, the plan and reduce locks, partition rounds and their parts). Per
tenant: its jobs (a sorted set by creation time), its models and images, its idempotency keys.
Fleet-wide: the active-jobs index (by deadline), the finished and expiring indexes that retention
works from, the image uploads, and the metrics counters.
"""

from __future__ import annotations

import hashlib
import json

PREFIX = "shapfleet"

#: Sorted set of every job not yet final, scored by its deadline.
ACTIVE_JOBS = f"{PREFIX}:jobs:active"
#: Sorted set of final jobs whose working state (shard statistics, plans, round records) is still
#: stored, scored by when they became final; the watchdog drops that state and moves them on.
FINISHED_JOBS = f"{PREFIX}:jobs:finished"
#: Sorted set of final jobs whose record and results are kept, scored by when they expire.
EXPIRING_JOBS = f"{PREFIX}:jobs:expiring"
#: Sorted set of uploaded images (``POST /v1/images``), scored by their latest upload.
IMAGE_UPLOADS = f"{PREFIX}:images:uploaded"
#: Hash of job counts by status (``/metrics``).
JOBS_BY_STATUS = f"{PREFIX}:metrics:jobs_by_status"
#: Hash of finished-shard counters and the duration histogram (``/metrics``).
SHARD_METRICS = f"{PREFIX}:metrics:shards"


def job(job_id: str) -> str:
    """The job's record (a hash)."""
    return f"{PREFIX}:job:{job_id}"


def job_shards(job_id: str) -> str:
    """Set of the job's finished shard names (``<image>/<shard>``): the barrier before the reduce."""
    return f"{PREFIX}:job:{job_id}:shards"


def job_progress(job_id: str) -> str:
    """Hash of each shard's evaluations in its current run."""
    return f"{PREFIX}:job:{job_id}:progress"


def job_deliveries(job_id: str) -> str:
    """Hash counting the starts of each shard-like message."""
    return f"{PREFIX}:job:{job_id}:deliveries"


def job_reduce_lock(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:reduce-lock"


def job_plan_lock(job_id: str) -> str:
    """Held by the plan task that plans the job: a duplicate plan message does nothing."""
    return f"{PREFIX}:job:{job_id}:plan-lock"


def job_rounds(job_id: str) -> str:
    """Hash of each image's current partition round."""
    return f"{PREFIX}:job:{job_id}:rounds"


def job_precision(job_id: str) -> str:
    """Hash of each image's precision after its last round (target_std / target_error jobs), JSON."""
    return f"{PREFIX}:job:{job_id}:precision"


def job_rendered(job_id: str) -> str:
    """Set of the parts of a many-image job whose artifacts are rendered and stored: its images'
    indexes, and ``collection`` for the stacked ``attributions.npz`` and ``grid.png``."""
    return f"{PREFIX}:job:{job_id}:rendered"


def job_values_stored(job_id: str) -> str:
    """Set of the images of a many-image job whose ``attributions.npz`` is stored (its collection
    can be drawn once every image's is)."""
    return f"{PREFIX}:job:{job_id}:values-stored"


def job_round_parts(job_id: str, image_index: int, round_index: int) -> str:
    """Set of the finished parts of one partition round."""
    return f"{PREFIX}:job:{job_id}:round:{image_index}:{round_index}"


def tenant_jobs(tenant: str) -> str:
    return f"{PREFIX}:tenant:{tenant}:jobs"


def tenant_models(tenant: str) -> str:
    return f"{PREFIX}:tenant:{tenant}:models"


def tenant_images(tenant: str) -> str:
    return f"{PREFIX}:tenant:{tenant}:images"


def image_tenants(sha256: str) -> str:
    """Set of the tenants that uploaded an image (whose image lists forget it when it expires)."""
    return f"{PREFIX}:image:{sha256}:tenants"


def model_meta(sha256: str) -> str:
    """What validation learnt of a stored model (JSON)."""
    return f"{PREFIX}:model:{sha256}"


def idempotency(tenant: str, key: str) -> str:
    """A tenant's Idempotency-Key: the pair hashed, so no tenant name and key can spell another's."""
    pair = hashlib.sha256(json.dumps([tenant, key]).encode()).hexdigest()
    return f"{PREFIX}:idempotency:{pair}"
