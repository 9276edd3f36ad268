"""Job records in Redis: the fleet's :class:`~shapfleet.broker.records.JobRecords`.

The record and its states are in :mod:`shapfleet.broker.records`. A record is a Redis hash
``shapfleet:job:<id>``, written before anything is enqueued. Transitions run as one Lua script that checks the current status, so concurrent workers, a watchdog and a cancel
request cannot move a job out of a final state: every job reaches exactly one.

Progress is kept so that a redelivered shard is never counted twice: shards done is a set of shard
names, and evaluations done is the planning evaluations plus a per-shard counter that a shard
overwrites (not increments) as its batches finish, so a shard that restarts starts again from zero.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from shapfleet.errors import JobNotFound

from . import redis_keys
from .records import JobRecord, JobStatus, new_job_id

# KEYS[1] job hash, KEYS[2] active-jobs zset, KEYS[3] jobs-by-status counters, KEYS[4] finished-jobs
# zset; ARGV: job id, new status, now, n allowed, allowed..., then field/value pairs. Returns
# {1, status} when applied, {0, current status} when refused.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, ''} end
local n = tonumber(ARGV[4])
local allowed = false
for i = 1, n do if ARGV[4 + i] == current then allowed = true end end
if not allowed then return {0, current} end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
redis.call('HINCRBY', KEYS[3], current, -1)
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
for i = 5 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[2] == 'succeeded' or ARGV[2] == 'failed' or ARGV[2] == 'canceled' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
end
return {1, ARGV[2]}
"""


class JobStore:
    """Reads and writes job records. ``redis`` is a ``redis.Redis`` client (decode_responses=False)."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self._transition = redis.register_script(_TRANSITION)

    # -- keys ---------------------------------------------------------------------------------
    @staticmethod
    def key(job_id: str) -> str:
        return redis_keys.job(job_id)

    @staticmethod
    def shards_key(job_id: str) -> str:
        return redis_keys.job_shards(job_id)

    @staticmethod
    def progress_key(job_id: str) -> str:
        return redis_keys.job_progress(job_id)

    @staticmethod
    def tenant_key(tenant: str) -> str:
        return redis_keys.tenant_jobs(tenant)

    ACTIVE = redis_keys.ACTIVE_JOBS
    BY_STATUS = redis_keys.JOBS_BY_STATUS

    # -- creation and reading -----------------------------------------------------------------
    def create(self, tenant: str, settings: dict[str, Any], model_sha256: str, inputs: list[str],
               deadline_seconds: float, job_id: str | None = None) -> JobRecord:
        job_id = job_id or new_job_id()
        now = time.time()
        fields = {
            "id": job_id, "tenant": tenant, "status": JobStatus.QUEUED.value, "created_at": repr(now),
            "settings": json.dumps(settings), "model_sha256": model_sha256, "inputs": json.dumps(inputs),
            "shards_total": 0, "evaluations_total": 0, "evaluations_done": 0,
            "deadline": repr(now + deadline_seconds),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.key(job_id), mapping=fields)
        pipe.zadd(self.tenant_key(tenant), {job_id: now})
        pipe.zadd(self.ACTIVE, {job_id: now + deadline_seconds})
        pipe.hincrby(self.BY_STATUS, JobStatus.QUEUED.value, 1)
        pipe.execute()
        return self.get(job_id)

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The record; :class:`JobNotFound` if absent or (when ``tenant`` is given) another tenant's.
        Its four keys are read in one round trip, as one snapshot (MULTI/EXEC)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(self.key(job_id))
        pipe.scard(self.shards_key(job_id))
        pipe.hvals(self.progress_key(job_id))
        pipe.hgetall(redis_keys.job_precision(job_id))
        raw, shards_done, progress, precision = pipe.execute()
        if not raw:
            raise JobNotFound(job_id)
        data = {k.decode(): v.decode() for k, v in raw.items()}
        if tenant is not None and data["tenant"] != tenant:
            raise JobNotFound(job_id)

        def number(name: str) -> float | None:
            return float(data[name]) if data.get(name) else None

        return JobRecord(
            id=data["id"], tenant=data["tenant"], status=JobStatus(data["status"]),
            created_at=float(data["created_at"]), started_at=number("started_at"), completed_at=number("completed_at"),
            settings=json.loads(data["settings"]), model_sha256=data["model_sha256"], inputs=json.loads(data["inputs"]),
            shards_total=int(data.get("shards_total", 0)), shards_done=int(shards_done),
            evaluations_total=int(data.get("evaluations_total", 0)),
            evaluations_done=int(data.get("evaluations_done", 0)) + sum(int(v) for v in progress),
            error=json.loads(data["error"]) if data.get("error") else None,
            results=json.loads(data["results"]) if data.get("results") else [],
            deadline=number("deadline"),
            precision={int(k): json.loads(v) for k, v in precision.items()},
        )

    def status(self, job_id: str) -> JobStatus | None:
        value = self.redis.hget(self.key(job_id), "status")
        return JobStatus(value.decode()) if value else None

    def active_ids(self) -> list[str]:
        """Every job that is not final."""
        return [m.decode() for m in self.redis.zrange(self.ACTIVE, 0, -1)]

    def list_ids(self, tenant: str, limit: int, before: float | None = None) -> list[tuple[str, float]]:
        """The tenant's job ids, newest first, created strictly before ``before`` (a cursor)."""
        upper = f"({before}" if before is not None else "+inf"
        rows = self.redis.zrevrangebyscore(self.tenant_key(tenant), upper, "-inf", start=0, num=limit, withscores=True)
        return [(member.decode(), score) for member, score in rows]

    def counts_by_status(self) -> dict[str, int]:
        raw = self.redis.hgetall(self.BY_STATUS)
        counts = {status.value: 0 for status in JobStatus}
        counts.update({k.decode(): int(v) for k, v in raw.items()})
        return counts

    def overdue(self, now: float | None = None) -> list[str]:
        """Ids of jobs that are not final and past their deadline."""
        return [m.decode() for m in self.redis.zrangebyscore(self.ACTIVE, "-inf", now or time.time())]

    # -- transitions --------------------------------------------------------------------------
    def _move(self, job_id: str, to: JobStatus, allowed: tuple[JobStatus, ...], **fields: Any) -> bool:
        args: list[Any] = [job_id, to.value, repr(time.time()), len(allowed), *(s.value for s in allowed)]
        for name, value in fields.items():
            args += [name, value]
        applied, _ = self._transition(keys=[self.key(job_id), self.ACTIVE, self.BY_STATUS, redis_keys.FINISHED_JOBS],
                                      args=args)
        return bool(applied)

    def start(self, job_id: str) -> bool:
        """queued -> running."""
        return self._move(job_id, JobStatus.RUNNING, (JobStatus.QUEUED,), started_at=repr(time.time()))

    def succeed(self, job_id: str, results: list[dict[str, Any]]) -> bool:
        """running -> succeeded, with the artifacts' descriptions."""
        return self._move(job_id, JobStatus.SUCCEEDED, (JobStatus.RUNNING,), results=json.dumps(results),
                          completed_at=repr(time.time()))

    def fail(self, job_id: str, error_type: str, message: str) -> bool:
        """queued | running -> failed, with an error a person can act on."""
        error = json.dumps({"type": error_type, "message": message})
        return self._move(job_id, JobStatus.FAILED, (JobStatus.QUEUED, JobStatus.RUNNING), error=error,
                          completed_at=repr(time.time()))

    def cancel(self, job_id: str) -> bool:
        """queued | running -> canceled."""
        return self._move(job_id, JobStatus.CANCELED, (JobStatus.QUEUED, JobStatus.RUNNING),
                          completed_at=repr(time.time()))

    # -- progress -----------------------------------------------------------------------------
    def set_totals(self, job_id: str, shard_counts: list[int], evaluations_total: int, planning_evaluations: int) -> None:
        """Set when the plan is made: each image's shard count, the evaluation total, and the
        evaluations planning spent."""
        self.redis.hset(self.key(job_id), mapping={
            "shards_total": sum(shard_counts), "shard_counts": json.dumps(shard_counts),
            "evaluations_total": evaluations_total, "evaluations_done": planning_evaluations,
            "updated_at": repr(time.time())})

    def image_rendered(self, job_id: str, part: int | str) -> tuple[bool, int]:
        return self._add_counted(job_id, redis_keys.job_rendered(job_id), part if isinstance(part, str) else int(part))

    def values_stored(self, job_id: str, image_index: int) -> tuple[bool, int]:
        return self._add_counted(job_id, redis_keys.job_values_stored(job_id), int(image_index))

    def set_precision(self, job_id: str, image_index: int, precision: dict[str, Any], evaluations_total: int) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(redis_keys.job_precision(job_id), str(int(image_index)), json.dumps(precision))
        pipe.hset(self.key(job_id), mapping={"evaluations_total": int(evaluations_total), "updated_at": repr(time.time())})
        pipe.execute()

    def shard_counts(self, job_id: str) -> list[int]:
        """Each image's shard count ([] before planning finished)."""
        raw = self.redis.hget(self.key(job_id), "shard_counts")
        return json.loads(raw) if raw else []

    def touch(self, job_id: str) -> None:
        self.redis.hset(self.key(job_id), "updated_at", repr(time.time()))

    def set_shard_progress(self, job_id: str, shard_name: str, evaluations: int) -> None:
        """The evaluations shard ``shard_name`` has made so far in its current run."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.progress_key(job_id), shard_name, int(evaluations))
        pipe.hset(self.key(job_id), "updated_at", repr(time.time()))
        pipe.execute()

    def shard_done(self, job_id: str, shard_name: str, image_shards: Sequence[str] = ()) -> tuple[bool, int, bool]:
        """Record a finished shard, atomically returning whether it was new, how many shards are
        now done, and whether every shard in ``image_shards`` (its image's) is done: of shards
        finishing concurrently, exactly one sees itself complete the set, and one its image."""
        key = self.shards_key(job_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(key, shard_name)
        pipe.scard(key)
        if image_shards:
            pipe.smismember(key, list(image_shards))
        pipe.hset(self.key(job_id), "updated_at", repr(time.time()))
        replies = pipe.execute()
        return bool(replies[0]), int(replies[1]), bool(image_shards) and all(replies[2])

    def _add_counted(self, job_id: str, set_key: str, member: str | int,
                     expire_seconds: int | None = None) -> tuple[bool, int]:
        """Add ``member`` to the set at ``set_key`` and count it in one transaction (so one caller
        sees each count), marking the job as progressing; returns whether it was new and the count."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(set_key, member)
        pipe.scard(set_key)
        if expire_seconds is not None:
            pipe.expire(set_key, expire_seconds)
        pipe.hset(self.key(job_id), "updated_at", repr(time.time()))
        added, done = pipe.execute()[:2]
        return bool(added), int(done)

    # -- method partition: rounds per image ---------------------------------------------------
    @staticmethod
    def rounds_key(job_id: str) -> str:
        return redis_keys.job_rounds(job_id)

    @staticmethod
    def round_parts_key(job_id: str, image_index: int, round_index: int) -> str:
        return redis_keys.job_round_parts(job_id, image_index, round_index)

    def set_round(self, job_id: str, image_index: int, round_index: int) -> None:
        """Record that image ``image_index`` reached round ``round_index`` (never moves back)."""
        current = self.redis.hget(self.rounds_key(job_id), str(image_index))
        if current is None or int(current) < round_index:
            self.redis.hset(self.rounds_key(job_id), str(image_index), round_index)
        self.touch(job_id)

    def current_round(self, job_id: str, image_index: int) -> int:
        raw = self.redis.hget(self.rounds_key(job_id), str(image_index))
        return int(raw) if raw is not None else 0

    def round_part_done(self, job_id: str, image_index: int, round_index: int, part: int) -> tuple[bool, int]:
        """Record a finished part of a round; returns, like :meth:`shard_done`, whether it was new and
        how many parts are now done."""
        return self._add_counted(job_id, self.round_parts_key(job_id, image_index, round_index), part, 7 * 24 * 3600)

    def missing_shards(self, job_id: str) -> list[tuple[int, int]]:
        """The (image, shard) pairs of the job's plan not yet recorded done, in order."""
        done = {m.decode() for m in self.redis.smembers(self.shards_key(job_id))}
        return [(n, i) for n, count in enumerate(self.shard_counts(job_id)) for i in range(count)
                if f"{n}/{i}" not in done]

    def last_activity(self, job_id: str) -> float | None:
        """When the job last moved (created, started, or a shard reported progress)."""
        values = self.redis.hmget(self.key(job_id), "updated_at", "started_at", "created_at")
        stamps = [float(v) for v in values if v]
        return max(stamps) if stamps else None


#: Upper bounds (seconds) of the shard-duration histogram buckets.
SHARD_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def record_shard_metrics(redis, seconds: float, evaluations: int) -> None:
    """Add one finished shard to the fleet-wide counters that ``/metrics`` exposes."""
    pipe = redis.pipeline(transaction=False)
    pipe.hincrbyfloat(redis_keys.SHARD_METRICS, "seconds_sum", seconds)
    pipe.hincrby(redis_keys.SHARD_METRICS, "count", 1)
    pipe.hincrby(redis_keys.SHARD_METRICS, "evaluations", int(evaluations))
    for bound in SHARD_SECONDS_BUCKETS:
        if seconds <= bound:
            pipe.hincrby(redis_keys.SHARD_METRICS, f"le_{bound}", 1)
    pipe.execute()

