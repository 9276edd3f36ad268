"""The watchdog: finds jobs that exceeded their deadline or stalled, and fails or re-drives them.

A pass looks at every job that is not final:

- past its deadline: fail it, saying so;
- no progress for ``stall_seconds`` (its plan message, a shard message or the reduce message was
  lost, for example in a Redis restart): re-drive it from what its records say. Queued: enqueue the
  plan again. Running without a plan: plan again. Running with shards missing: enqueue those shards
  again (they are idempotent); for method partition and target runs, send each unfinished image's current round
  step again (it re-sends that round's missing parts, or advances it). Running with every shard
  done: free a dead reducer's claim and enqueue the reduce again (a job still succeeds once: the
  transition to succeeded is atomic).

The periodic watchdog task runs a pass of this and one of retention
(:func:`~shapfleet.broker.retention.retention_pass`: final jobs' working state is dropped, expired
jobs and uploaded images are deleted).

Every action is safe to repeat, so several watchdogs (one per worker started with ``--beat``) may run.
"""

from __future__ import annotations

import time

from shapfleet.workers.engine.settings import ExplainSettings

from .celery_app import PLAN_TASK, REDUCE_TASK, ROUND_TASK, SHARD_TASK
from .records import JobStatus
from .services import Services


def watchdog_pass(services: Services, now: float | None = None) -> dict[str, str]:
    """One pass over the active jobs; returns what was done to each job it acted on."""
    now = now or time.time()
    jobs, settings, celery = services.jobs, services.settings, services.celery
    actions: dict[str, str] = {}
    for job_id in jobs.active_ids():
        record = jobs.get(job_id)
        if record.status.is_final:
            continue
        if record.deadline is not None and now > record.deadline:
            limit = int(record.deadline - record.created_at)
            if jobs.fail(job_id, "DeadlineExceeded", f"the job did not finish within its deadline of {limit} s"):
                actions[job_id] = "failed: deadline exceeded"
            continue
        last = jobs.last_activity(job_id) or record.created_at
        if now - last < settings.stall_seconds:
            continue
        jobs.touch(job_id)  # the next pass waits stall_seconds again before acting again
        counts = jobs.shard_counts(job_id)
        if record.status == JobStatus.QUEUED or not counts:
            celery.send_task(PLAN_TASK, args=[job_id], queue=settings.queue_plan)
            actions[job_id] = "re-planned"
            continue
        missing = jobs.missing_shards(job_id)
        if missing and ExplainSettings.from_dict(record.settings).runs_in_rounds:
            # Each unfinished image is re-driven from its current round (the step is idempotent:
            # it re-sends missing parts, or advances a round whose parts are all stored).
            for image_index, _ in missing:
                round_index = jobs.current_round(job_id, image_index)
                celery.send_task(ROUND_TASK, args=[job_id, image_index, round_index], queue=settings.queue_plan)
            actions[job_id] = f"re-sent {len(missing)} round(s)"
        elif missing:
            for image_index, shard_index in missing:
                celery.send_task(SHARD_TASK, args=[job_id, image_index, shard_index], queue=settings.queue_shards)
            actions[job_id] = f"re-sent {len(missing)} shard(s)"
        else:
            # A reducer that claimed the job and has shown nothing for stall_seconds is presumed
            # dead (its retry lost, say, in a Redis restart): free its claim for the new reduce.
            services.claims.release_reduce(job_id)
            celery.send_task(REDUCE_TASK, args=[job_id], queue=settings.queue_reduce)
            actions[job_id] = "re-sent the reduce"
    return actions
