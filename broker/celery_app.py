"""The Celery app, built by a function from :class:`ServiceSettings` (creating it connects to nothing).

Queues: ``plan`` (CPU: segment, plan, send the shards; method partition's round steps), ``shards``
(GPU or CPU: evaluate coalitions, or a part of a partition round's masks) and ``reduce`` (CPU: sum,
solve, render). Tasks are looked up by name, so the API can enqueue a plan
without importing the engine.
"""

from __future__ import annotations

from celery import Celery

from .settings import ServiceSettings

PLAN_TASK = "shapfleet.plan"
SHARD_TASK = "shapfleet.shard"
REDUCE_TASK = "shapfleet.reduce"
RENDER_TASK = "shapfleet.render"
COLLECT_TASK = "shapfleet.collect"
ROUND_TASK = "shapfleet.partition_round"
PART_TASK = "shapfleet.partition_part"
WATCHDOG_TASK = "shapfleet.watchdog"


def create_celery(settings: ServiceSettings) -> Celery:
    app = Celery("shapfleet", broker=settings.celery_broker_url, backend=settings.celery_result_backend,
                 include=["shapfleet.workers.tasks"])
    transport = {"visibility_timeout": settings.visibility_timeout}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A task is acknowledged after it finishes, and requeued if its worker dies mid-task:
        # shards are idempotent, so a redelivery costs time, never correctness.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A pool process whose resident memory grew past half its ceiling (a model's arena, say) is
        # replaced after its task, so that memory one tenant's model took is given back.
        worker_max_memory_per_child=(settings.limits.worker_memory_bytes // 2048) or None,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        result_expires=24 * 3600,
        task_routes={
            PLAN_TASK: {"queue": settings.queue_plan},
            WATCHDOG_TASK: {"queue": settings.queue_plan},
            SHARD_TASK: {"queue": settings.queue_shards},
            # A round step is bookkeeping (choose nodes, apply outputs): CPU work beside planning.
            ROUND_TASK: {"queue": settings.queue_plan},
            PART_TASK: {"queue": settings.queue_shards},
            REDUCE_TASK: {"queue": settings.queue_reduce},
            # A many-image job's images render on the shard workers, the many, in parallel.
            RENDER_TASK: {"queue": settings.queue_shards},
            COLLECT_TASK: {"queue": settings.queue_shards},
        },
        task_default_queue=settings.queue_plan,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # Used by workers started with --beat (embedded scheduler): the watchdog every interval.
        beat_schedule={"shapfleet-watchdog": {"task": WATCHDOG_TASK, "schedule": float(settings.watchdog_interval)}},
    )
    app.shapfleet_settings = settings
    return app
