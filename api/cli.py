"""The ``shapfleet`` command line.

``shapfleet explain`` runs the whole pipeline in this process. Engine flags are defined once
(:func:`add_engine_arguments`) so that every command that takes them means the same thing.
Errors a user can cause print ``shapfleet: error: ...`` and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from shapfleet.errors import InvalidSettingsError, ShapfleetError

from .engine_args import add_engine_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shapfleet", description="SHAP explanations of ONNX image classifiers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    explain = commands.add_parser("explain", help="explain images in this process (no services needed)",
                                  description="Explain each IMAGE for an ONNX classifier, in this process.")
    explain.add_argument("images", nargs="+", metavar="IMAGE")
    explain.add_argument("--model", required=True, metavar="MODEL.onnx")
    explain.add_argument("--out", metavar="DIR", help="write attributions.npz and PNGs here")
    explain.add_argument("--shards", type=int, help="split the coalitions into this many shards (default: --workers)")
    explain.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    explain.add_argument("--threads", type=int, help="threads per process that run the model (default: the CPUs shared among --workers; "
                         "on the CPU each runs onnxruntime runs of its own, side by side)")
    explain.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_arguments(explain)
    explain.set_defaults(handler=run_explain)

    worker = commands.add_parser("worker", help="run a Celery worker of the fleet",
                                 description="Run a Celery worker for the plan, shards and/or reduce queues, "
                                             "configured from SHAPFLEET_* environment variables.")
    worker.add_argument("--queues", default="plan,shards,reduce",
                        help="comma-separated queues to consume (default: all three)")
    worker.add_argument("--concurrency", type=int, default=1,
                        help="worker processes; on GPU hosts one per GPU (default 1)")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--hostname", help="Celery node name (default: shapfleet-<queues>@<host>)")
    worker.add_argument("--beat", action="store_true",
                        help="also run the watchdog every SHAPFLEET_WATCHDOG_INTERVAL seconds (embedded scheduler)")
    worker.set_defaults(handler=run_worker)

    api = commands.add_parser("api", help="run the HTTP API (development server; deploy with gunicorn shapfleet.api.wsgi:app)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(handler=run_api)

    up = commands.add_parser("up", help="run the whole service on this machine (Redis, SeaweedFS, API, workers)")
    up.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    up.add_argument("--port", type=int, help="API port (default: a free one)")
    up.add_argument("--dir", default=".shapfleet", help="state, logs and the env file (default .shapfleet)")
    up.add_argument("--api-key", help="the API key to accept (default: a new random one)")
    up.set_defaults(handler=run_up_command)

    from .remote_commands import add_remote_commands

    add_remote_commands(commands)
    return parser


def run_explain(args: argparse.Namespace) -> int:
    from shapfleet.workers.engine.progress import ProgressBar
    from shapfleet.workers.engine.settings import check_threads
    from shapfleet.workers.local import explain

    if args.workers < 1:
        raise InvalidSettingsError(f"--workers must be >= 1, got {args.workers}")
    if args.shards is not None and args.shards < 1:
        raise InvalidSettingsError(f"--shards must be >= 1, got {args.shards}")
    check_threads(args.threads, "--threads")
    settings = settings_from_args(args)
    runs = explain(args.images, args.model, settings, segments=args.segments, shards=args.shards,
                   workers=args.workers, out_dir=args.out, threads=args.threads,
                   progress=None if args.quiet else (lambda total, label: ProgressBar(total, label)))
    summaries = []
    for run in runs:
        summary = {"image": run.source, **run.explanation.summary()}
        if run.out_dir is not None:
            summary["out"] = str(run.out_dir)
            summary["artifacts"] = sorted(run.artifacts)
        summaries.append(summary)
    json.dump(summaries[0] if len(summaries) == 1 else summaries, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from shapfleet.broker.celery_app import create_celery
    from shapfleet.broker.settings import ServiceSettings

    settings = ServiceSettings.from_env()
    known = {settings.queue_plan, settings.queue_shards, settings.queue_reduce}
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in queues if q not in known]
    if not queues or unknown:
        raise InvalidSettingsError(f"unknown queue(s) {unknown or args.queues!r}; use some of {', '.join(sorted(known))}")
    if args.concurrency < 1:
        raise InvalidSettingsError(f"--concurrency must be >= 1, got {args.concurrency}")
    if settings.ort_threads is None:
        # Each process gets its share of the cores, so that processes do not fight over them.
        settings = settings.replace(ort_threads=max(1, (os.cpu_count() or 1) // args.concurrency))
    app = create_celery(settings)
    hostname = args.hostname or f"shapfleet-{'-'.join(queues)}@%h"
    app.worker_main(["worker", f"--queues={','.join(queues)}", f"--concurrency={args.concurrency}",
                     f"--loglevel={args.loglevel}", "--pool=prefork", f"--hostname={hostname}",
                     "--without-gossip", "--without-mingle",
                     *(["--beat", f"--schedule={os.path.join(tempfile.gettempdir(), f'shapfleet-beat-{os.getpid()}')}"]
                       if args.beat else [])])
    return 0


def run_api(args: argparse.Namespace) -> int:
    from .app import create_app

    create_app().run(host=args.host, port=args.port, threaded=True)
    return 0


def run_up_command(args: argparse.Namespace) -> int:
    from .up import run_up

    if args.workers < 1:
        raise InvalidSettingsError(f"--workers must be >= 1, got {args.workers}")
    return run_up(Path(args.dir), args.workers, args.port, args.api_key)


#: The extra that provides each top-level module a command may miss in a partial install.
_EXTRAS = {"numpy": "engine", "scipy": "engine", "onnx": "engine", "onnxruntime": "engine", "skimage": "engine",
           "cv2": "engine", "PIL": "engine", "threadpoolctl": "engine",
           "celery": "service", "redis": "service", "boto3": "service", "flask": "service", "gunicorn": "service"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ModuleNotFoundError as e:
        extra = _EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"shapfleet: error: `shapfleet {args.command}` needs {e.name}: pip install 'shapfleet[{extra}]'",
              file=sys.stderr)
        return 1
    except (ShapfleetError, ValueError) as e:
        print(f"shapfleet: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # requests' ConnectionError is an OSError too
        text = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e.strerror or e)
        print(f"shapfleet: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shapfleet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
