"""Real servers for the service tests: a private redis-server, SeaweedFS (``weed mini``) and Celery
worker processes, each on free loopback ports, started and stopped by the tests themselves.

A missing server binary is a test failure, not a skip: CI installs them (``tests/run.sh``).
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(also_free_offsets: tuple[int, ...] = ()) -> int:
    """A free loopback port p such that p + offset is free too for every offset given (SeaweedFS
    puts each gRPC port at its HTTP port + 10000)."""
    for _ in range(500):
        port = random.randint(20000, 39000)
        if all(port_is_free(port + offset) for offset in (0, *also_free_offsets)):
            return port
    raise RuntimeError("no free port found")


def binary(name: str) -> str:
    """A server binary from the virtual environment or PATH; fails (never skips) when absent."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed; run the tests through tests/run.sh, which installs it")
    return found


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # the server is still starting
            last_error = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s ({last_error})")


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen
    directory: Path

    @classmethod
    def start(cls, directory: Path, appendonly: bool = False) -> "RedisServer":
        import redis

        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        args = [binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
                "--dir", str(directory), "--logfile", str(directory / "redis.log")]
        process = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: redis.Redis.from_url(url).ping(), 20, "redis-server")
        return cls(url, port, process, directory)

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class SeaweedServer:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    directory: Path

    @classmethod
    def start(cls, directory: Path) -> "SeaweedServer":
        import boto3
        from botocore.config import Config

        directory.mkdir(parents=True, exist_ok=True)
        access_key, secret_key = "sf" + secrets.token_hex(8), secrets.token_hex(20)
        config = directory / "s3.json"
        config.write_text('{"identities":[{"name":"shapfleet","credentials":[{"accessKey":"%s","secretKey":"%s"}],'
                          '"actions":["Admin","Read","Write","List","Tagging"]}]}' % (access_key, secret_key))
        ports = {name: free_port((10000,)) for name in ("master", "volume", "filer", "s3", "admin")}
        args = [binary("weed"), "mini", f"-dir={directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
                f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}", f"-s3.config={config}",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=64"]
        with open(directory / "weed.log", "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(args, start_new_session=True, stdout=log, stderr=subprocess.STDOUT, cwd=directory)
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                              region_name="us-east-1", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"weed exited with {process.returncode}; see {directory / 'weed.log'}")
            client.list_buckets()
            return True

        wait_until(ready, 60, "SeaweedFS S3", interval=0.3)
        return cls(endpoint, access_key, secret_key, process, directory)

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, env: dict[str, str], log_path: Path, queues: str = "plan,shards,reduce", concurrency: int = 1,
              name: str = "w") -> "WorkerProcess":
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "worker", "--queues", queues, "--concurrency", str(concurrency),
                 "--hostname", f"{name}-{secrets.token_hex(3)}@%h"],
                env=env, cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        worker = cls(process, log_path)

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            return b" ready." in log_path.read_bytes()

        wait_until(ready, 60, "celery worker", interval=0.2)
        return worker

    def children(self) -> list[int]:
        """Pids of the prefork pool's child processes."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        stop_process(self.process, timeout=20)
