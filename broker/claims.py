"""Exactly-once guards for the fleet's Celery tasks, in Redis.

Messages are acknowledged late, so a task whose worker died runs again; these records make that
safe: a count of each shard-like message's starts (a message that kills its worker every time fails
the job instead of looping), one planner and one reducer per job (locks that their own redelivered
message keeps), and a count of completed reductions.
"""

from __future__ import annotations

from . import redis_keys


class TaskClaims:
    """``redis`` is a ``redis.Redis`` client (decode_responses=False)."""

    def __init__(self, redis) -> None:
        self.redis = redis

    def count_delivery(self, job_id: str, delivery: str) -> int:
        """Count a start of the same shard message (``delivery`` names the shard and its retry number,
        so transient-error retries are not counted as crashes); returns the count so far."""
        return int(self.redis.hincrby(redis_keys.job_deliveries(job_id), delivery, 1))

    def claim_plan(self, job_id: str, holder: str, seconds: int) -> bool:
        """True for one planner of a job, like :meth:`claim_reduce`: a duplicate plan message (the
        watchdog re-sends the plan of a job queued longer than its stall period, which may only be
        waiting) does nothing while the first one's holder plans or has planned."""
        return self._claim(redis_keys.job_plan_lock(job_id), holder, seconds)

    def claim_reduce(self, job_id: str, holder: str, seconds: int) -> bool:
        """True for one reducer of a job: the first ``holder`` (a task id), and that same holder again
        (its message redelivered after its worker died). Another holder gets it only after
        ``seconds``, when a lock whose holder vanished expires."""
        return self._claim(redis_keys.job_reduce_lock(job_id), holder, seconds)

    def _claim(self, key: str, holder: str, seconds: int) -> bool:
        if self.redis.set(key, holder, nx=True, ex=max(1, int(seconds))):
            return True
        current = self.redis.get(key)
        return current is not None and current.decode() == holder

    def count_reduction(self, job_id: str) -> int:
        """Count completed reductions (a job that succeeded was reduced exactly once)."""
        return int(self.redis.hincrby(redis_keys.job(job_id), "reductions", 1))

    def reductions(self, job_id: str) -> int:
        return int(self.redis.hget(redis_keys.job(job_id), "reductions") or 0)

    def release_reduce(self, job_id: str) -> None:
        self.redis.delete(redis_keys.job_reduce_lock(job_id))
