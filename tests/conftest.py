"""Shared fixtures. Service fixtures (Redis, SeaweedFS, Celery workers) live in ``service_fixtures``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def write_file(tmp_path):
    """Write bytes to a file under tmp_path and return its path as a string."""

    def write(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    return write


# -- real servers ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from servers import RedisServer

    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    from servers import SeaweedServer

    server = SeaweedServer.start(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


@pytest.fixture
def service_settings(redis_server, seaweed, request):
    """Settings for one test: a fresh Redis database state and its own bucket."""
    import re

    import redis

    from shapfleet.broker.settings import ServiceSettings

    redis.Redis.from_url(redis_server.url).flushdb()
    bucket = "t-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return ServiceSettings(
        redis_url=redis_server.url, s3_endpoint=seaweed.endpoint, s3_access_key=seaweed.access_key,
        s3_secret_key=seaweed.secret_key, s3_bucket=bucket, shard_evaluations=128, ort_threads=1,
        visibility_timeout=600,
    )


@pytest.fixture
def services(service_settings):
    from shapfleet.broker.services import Services

    return Services.from_settings(service_settings)


@pytest.fixture
def start_workers(service_settings, tmp_path):
    """start_workers(count, concurrency=1, queues=...) -> list of running worker processes."""
    import os

    from servers import WorkerProcess

    started = []

    def start(count: int = 1, concurrency: int = 1, queues: str = "plan,shards,reduce", settings=None):
        env = {**os.environ, **(settings or service_settings).environment()}
        for _ in range(count):
            index = len(started)
            started.append(WorkerProcess.start(env, tmp_path / f"worker-{index}.log", queues, concurrency, f"w{index}"))
        return started

    yield start
    for worker in started:
        worker.stop()


# -- the reliability table ------------------------------------------------------------------------------
_fault_rows: list[dict] = []


@pytest.fixture
def fault_report():
    """fault_report(fault, trials, completed, lost, differing): one row of the reliability table,
    written to $SHAPFLEET_FAULT_REPORT (markdown) at the end of the session when that is set."""

    def report(fault: str, trials: int, completed: int, lost: int, differing: int) -> None:
        _fault_rows.append({"fault": fault, "trials": trials, "jobs completed": completed, "jobs lost": lost,
                            "results differing": differing})

    return report


def pytest_sessionfinish(session, exitstatus):
    import os

    target = os.environ.get("SHAPFLEET_FAULT_REPORT")
    if target and _fault_rows:
        lines = ["| fault | trials | jobs completed | jobs lost | results differing |", "|---|---|---|---|---|"]
        lines += [f"| {r['fault']} | {r['trials']} | {r['jobs completed']} | {r['jobs lost']} | {r['results differing']} |"
                  for r in _fault_rows]
        Path(target).write_text("\n".join(lines) + "\n")
