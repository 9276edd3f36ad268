"""``shapfleet up``: the whole service on this machine (Redis, SeaweedFS, the API, N workers).

It prints the URLs and the API key, writes ``<dir>/env`` (source it to point the client at the
stack), and stops everything on Ctrl-C or SIGTERM, or when any part dies, leaving no process behind.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from pathlib import Path

from shapfleet.broker.settings import ServiceSettings

from .stack import ApiServer, RedisServer, SeaweedServer, StackError, WorkerProcess


class _Stop(Exception):
    pass


def run_up(directory: Path, workers: int, port: int | None, api_key: str | None, out=sys.stdout) -> int:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    running: list = []

    def stop(signum, frame):
        raise _Stop()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting redis-server, SeaweedFS, the API and {workers} worker(s) in {directory}", file=sys.stderr)
        redis_server = RedisServer.start(directory / "redis", appendonly=True)
        running.append(redis_server)
        seaweed = SeaweedServer.start(directory / "seaweed")
        running.append(seaweed)
        key = api_key or secrets.token_urlsafe(24)
        settings = ServiceSettings.from_env().replace(
            redis_url=redis_server.url, broker_url=None, result_backend=None, s3_endpoint=seaweed.endpoint,
            s3_public_endpoint=None, s3_access_key=seaweed.access_key, s3_secret_key=seaweed.secret_key,
            api_keys=f"{key}:local", api_keys_file=None, auth_disabled=False)
        env = {**os.environ, **settings.environment()}
        api = ApiServer.start(env, logs / "api.log", port=port)
        running.append(api)
        for n in range(workers):
            # The first worker also runs the watchdog (deadlines, stalled jobs, retention).
            running.append(WorkerProcess.start(env, logs / f"worker-{n}.log", name=f"up{n}", beat=n == 0))
        env_file = directory / "env"
        env_file.write_text(f"export SHAPFLEET_SERVER={api.url}\nexport SHAPFLEET_API_KEY={key}\n")
        env_file.chmod(0o600)
        print(f"shapfleet is up\n  API:      {api.url}  (OpenAPI: {api.url}/openapi.json)\n"
              f"  API key:  {key}  (tenant 'local')\n  S3:       {seaweed.endpoint}\n  Redis:    {redis_server.url}\n"
              f"  workers:  {workers}\n  logs:     {logs}\n"
              f"Point the client at it with:  source {env_file}\nStop with Ctrl-C.", file=out, flush=True)
        while True:
            for part in running:
                if part.process.poll() is not None:
                    raise StackError(f"{type(part).__name__} exited with status {part.process.returncode}; "
                                     f"see the logs in {logs}")
            time.sleep(0.5)
    except _Stop:
        print("stopping", file=sys.stderr)
        return 0
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        for part in reversed(running):
            part.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
