"""Retention: nothing a job or an upload leaves behind is kept forever.

A job becomes final (succeeded, failed, canceled) in one transition that also enters it in the
finished index (:data:`~shapfleet.broker.redis_keys.FINISHED_JOBS`). From there, each watchdog pass:

1. drops the working state of every finished job at once: its shard statistics, plans, partition
   round records (store) and its delivery counts, locks and round sets (Redis), which nothing reads
   once the job is final; the job moves to the expiring index, due ``retention_seconds`` after it
   became final;
2. deletes every expired job whole: its inputs and results in the store, its record and every key
   of it in Redis, its place in its tenant's job list;
3. deletes uploaded images whose latest upload is older than ``retention_seconds``, and forgets them
   in the image lists of the tenants that uploaded them.

Models are registered by tenants and kept; idempotency keys expire on their own (48 h).
Every step is safe to repeat and to run in several watchdogs at once.
"""

from __future__ import annotations

import time

from . import redis_keys
from .keys import image_key, job_prefix, result_prefix, working_prefixes
from .records import JobStatus
from .services import Services

#: Jobs (or images) handled per pass at most, so that one pass stays short after a long outage.
BATCH = 500


def _round_keys(redis, job_id: str) -> list[str]:
    rounds = redis.hgetall(redis_keys.job_rounds(job_id))
    return [redis_keys.job_round_parts(job_id, int(image), r) for image, last in rounds.items()
            for r in range(int(last) + 1)]


def _working_keys(redis, job_id: str) -> list[str]:
    """The Redis keys of a job's working state. A message delivered after the job became final may
    create its delivery count again, so a job deleted whole deletes these again too."""
    return [redis_keys.job_deliveries(job_id), redis_keys.job_reduce_lock(job_id), redis_keys.job_plan_lock(job_id),
            *_round_keys(redis, job_id), redis_keys.job_rounds(job_id), redis_keys.job_rendered(job_id),
            redis_keys.job_values_stored(job_id)]


def drop_working_state(services: Services, job_id: str) -> None:
    """Delete a final job's working state (store and Redis); its record, inputs and results stay.
    A job that did not succeed keeps no results: artifacts an image's render task stored before a
    cancel (or a failure) landed go too."""
    for prefix in working_prefixes(job_id):
        services.store.delete_prefix(prefix)
    if services.jobs.status(job_id) not in (JobStatus.SUCCEEDED, None):
        services.store.delete_prefix(result_prefix(job_id))
    services.redis.delete(*_working_keys(services.redis, job_id))


def delete_job(services: Services, job_id: str) -> None:
    """Delete everything of a job: store objects, Redis keys, its place in its tenant's list."""
    redis = services.redis
    tenant = redis.hget(redis_keys.job(job_id), "tenant")
    services.store.delete_prefix(job_prefix(job_id))  # the working state's prefixes are inside it
    working = _working_keys(redis, job_id)
    pipe = redis.pipeline(transaction=True)
    pipe.delete(redis_keys.job(job_id), redis_keys.job_shards(job_id), redis_keys.job_progress(job_id),
                redis_keys.job_precision(job_id), *working)
    if tenant is not None:
        pipe.zrem(redis_keys.tenant_jobs(tenant.decode()), job_id)
    pipe.zrem(redis_keys.EXPIRING_JOBS, job_id)
    pipe.zrem(redis_keys.FINISHED_JOBS, job_id)
    pipe.execute()


def record_image_upload(redis, tenant: str, sha256: str, now: float | None = None) -> None:
    """An image was uploaded (again): the tenant may reference it until ``retention_seconds`` after this."""
    pipe = redis.pipeline(transaction=True)
    pipe.sadd(redis_keys.tenant_images(tenant), sha256)
    pipe.sadd(redis_keys.image_tenants(sha256), tenant)
    pipe.zadd(redis_keys.IMAGE_UPLOADS, {sha256: now or time.time()})
    pipe.execute()


def delete_image(services: Services, sha256: str) -> None:
    redis = services.redis
    tenants = redis.smembers(redis_keys.image_tenants(sha256))
    pipe = redis.pipeline(transaction=True)
    for tenant in tenants:
        pipe.srem(redis_keys.tenant_images(tenant.decode()), sha256)
    pipe.delete(redis_keys.image_tenants(sha256))
    pipe.zrem(redis_keys.IMAGE_UPLOADS, sha256)
    pipe.execute()
    services.store.delete_prefix(image_key(sha256))  # the image, and the label map uploaded with it


def retention_pass(services: Services, now: float | None = None) -> dict[str, str]:
    """One pass of the three steps above; returns what was done, by job id or image id."""
    now = now or time.time()
    redis, keep = services.redis, services.settings.retention_seconds
    actions: dict[str, str] = {}
    for member, finished_at in redis.zrange(redis_keys.FINISHED_JOBS, 0, BATCH - 1, withscores=True):
        job_id = member.decode()
        drop_working_state(services, job_id)
        pipe = redis.pipeline(transaction=True)
        pipe.zadd(redis_keys.EXPIRING_JOBS, {job_id: finished_at + keep})
        pipe.zrem(redis_keys.FINISHED_JOBS, job_id)
        pipe.execute()
        actions[job_id] = "working state dropped"
    for member in redis.zrangebyscore(redis_keys.EXPIRING_JOBS, "-inf", now, start=0, num=BATCH):
        delete_job(services, member.decode())
        actions[member.decode()] = "expired: deleted"
    for member in redis.zrangebyscore(redis_keys.IMAGE_UPLOADS, "-inf", now - keep, start=0, num=BATCH):
        delete_image(services, member.decode())
        actions[f"image {member.decode()}"] = "expired: deleted"
    return actions
