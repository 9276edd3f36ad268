"""Operational routes: liveness, readiness, Prometheus metrics and the OpenAPI document."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from shapfleet.broker.jobs import SHARD_SECONDS_BUCKETS
from shapfleet.broker.redis_keys import SHARD_METRICS

from .openapi import openapi_document
from .problems import Problem

ops = Blueprint("ops", __name__)


@ops.get("/healthz")
def healthz():
    return {"status": "ok"}


@ops.get("/readyz")
def readyz():
    services = current_app.extensions["shapfleet"]
    checks = {}
    try:
        services.redis.ping()
        checks["redis"] = "ok"
    except Exception as e:
        checks["redis"] = f"unavailable ({type(e).__name__})"
    try:
        services.store.check()
        checks["store"] = "ok"
    except Exception as e:
        checks["store"] = f"unavailable ({type(e).__name__})"
    if any(v != "ok" for v in checks.values()):
        failing = ", ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
        raise Problem(503, "Not ready", f"dependencies unavailable: {failing}", checks=checks)
    return {"status": "ready", "checks": checks}


@ops.get("/metrics")
def metrics():
    services = current_app.extensions["shapfleet"]
    lines = ["# HELP shapfleet_jobs Jobs by status.", "# TYPE shapfleet_jobs gauge"]
    for status, count in services.jobs.counts_by_status().items():
        lines.append(f'shapfleet_jobs{{status="{status}"}} {count}')
    raw = {k.decode(): v.decode() for k, v in services.redis.hgetall(SHARD_METRICS).items()}
    count = int(raw.get("count", 0))
    seconds = float(raw.get("seconds_sum", 0.0))
    evaluations = int(raw.get("evaluations", 0))
    lines += ["# HELP shapfleet_shard_seconds Shard evaluation time.", "# TYPE shapfleet_shard_seconds histogram"]
    for bound in SHARD_SECONDS_BUCKETS:
        lines.append(f'shapfleet_shard_seconds_bucket{{le="{bound}"}} {int(raw.get(f"le_{bound}", 0))}')
    lines += [f'shapfleet_shard_seconds_bucket{{le="+Inf"}} {count}', f"shapfleet_shard_seconds_sum {seconds}",
              f"shapfleet_shard_seconds_count {count}",
              "# HELP shapfleet_evaluations_total Model evaluations made by shards.",
              "# TYPE shapfleet_evaluations_total counter", f"shapfleet_evaluations_total {evaluations}",
              "# HELP shapfleet_evaluations_per_second Evaluations per second of shard time, fleet-wide.",
              "# TYPE shapfleet_evaluations_per_second gauge",
              f"shapfleet_evaluations_per_second {evaluations / seconds if seconds else 0.0}",
              "# HELP shapfleet_queue_length Messages waiting in each queue (Redis broker).",
              "# TYPE shapfleet_queue_length gauge"]
    settings = services.settings
    for queue in (settings.queue_plan, settings.queue_shards, settings.queue_reduce):
        lines.append(f'shapfleet_queue_length{{queue="{queue}"}} {_queue_length(services, queue)}')
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")


def _queue_length(services, queue: str) -> int:
    """Kombu's Redis transport keeps a queue as a list named after it (priority lists suffixed)."""
    if not services.settings.celery_broker_url.startswith("redis"):
        return -1
    import redis

    client = redis.Redis.from_url(services.settings.celery_broker_url, socket_timeout=5)
    try:
        return sum(int(client.llen(name)) for name in [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)])
    finally:
        client.close()


@ops.get("/openapi.json")
def openapi():
    return openapi_document()
