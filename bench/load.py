"""Load: 200 jobs submitted concurrently by 20 clients against a local stack (Redis, SeaweedFS, the API
under gunicorn, 2 workers), all on loopback; bounded in count and time.

    .venv/bin/python bench/load.py [--jobs 200] [--clients 20] [--workers 2]

Checks that every job succeeds and none is lost or duplicated, and reports submit latency p50/p99 and
jobs per minute; writes bench/results/load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from shapfleet.api.client import Client  # noqa: E402
from shapfleet.api.stack import ApiServer, RedisServer, SeaweedServer, WorkerProcess  # noqa: E402
from shapfleet.broker.settings import ServiceSettings  # noqa: E402

MODEL = HERE.parent / "examples" / "shapes.onnx"
IMAGES = [HERE.parent / "examples" / f"{name}.png" for name in ("circle", "square", "triangle")]
SETTINGS = {"n_segments": 20, "nsamples": 200, "top_k": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        redis_server = RedisServer.start(tmp / "redis", appendonly=True)
        seaweed = SeaweedServer.start(tmp / "seaweed")
        settings = ServiceSettings(redis_url=redis_server.url, s3_endpoint=seaweed.endpoint, s3_access_key=seaweed.access_key,
                                   s3_secret_key=seaweed.secret_key, api_keys="load:load", ort_threads=1)
        env = {**os.environ, **settings.environment()}
        parts = [redis_server, seaweed]
        try:
            api = ApiServer.start(env, tmp / "api.log", workers=4)
            parts.append(api)
            parts += [WorkerProcess.start(env, tmp / f"worker{n}.log", name=f"load{n}") for n in range(args.workers)]
            model_id = Client(api.url, "load").upload_model(MODEL)["id"]
            latencies: list[float] = []

            def client_run(index: int) -> list[str]:
                client = Client(api.url, "load")
                ids = []
                for n in range(index, args.jobs, args.clients):
                    started = time.perf_counter()
                    job = client.submit([IMAGES[n % len(IMAGES)]], model_id=model_id, settings={**SETTINGS, "seed": n})
                    latencies.append(time.perf_counter() - started)
                    ids.append(job["id"])
                return ids

            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                ids = [i for chunk in pool.map(client_run, range(args.clients)) for i in chunk]
            submitted = time.perf_counter() - started
            client = Client(api.url, "load")
            deadline = time.monotonic() + args.timeout
            statuses = {}
            while time.monotonic() < deadline:
                statuses = {i: client.get(i)["status"] for i in ids}
                if all(s in ("succeeded", "failed", "canceled") for s in statuses.values()):
                    break
                time.sleep(1)
            elapsed = time.perf_counter() - started
            listed, cursor = [], None
            while True:
                page = client.list(limit=100, cursor=cursor)
                listed += [j["id"] for j in page["jobs"]]
                cursor = page["next_cursor"]
                if not cursor:
                    break
        finally:
            for part in reversed(parts):
                part.stop()
    latencies.sort()
    result = {
        "jobs": args.jobs, "clients": args.clients, "workers": args.workers,
        "succeeded": sum(s == "succeeded" for s in statuses.values()),
        "not_succeeded": {i: s for i, s in statuses.items() if s != "succeeded"},
        "distinct_ids": len(set(ids)), "listed": len(listed), "listed_distinct": len(set(listed)),
        "submit_latency_p50_ms": round(1000 * statistics.median(latencies), 1),
        "submit_latency_p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "submit_seconds": round(submitted, 2), "total_seconds": round(elapsed, 2),
        "jobs_per_minute": round(60 * args.jobs / elapsed, 1),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = result["succeeded"] == args.jobs and result["distinct_ids"] == args.jobs and result["listed_distinct"] == args.jobs
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
