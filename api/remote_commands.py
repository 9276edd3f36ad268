"""The client side of the command line: submit, status, wait, fetch, jobs, cancel.

``--server``/``SHAPFLEET_SERVER`` and ``--api-key``/``SHAPFLEET_API_KEY`` say where and as whom.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from shapfleet.errors import InvalidSettingsError

from .client import Client
from .engine_args import add_engine_arguments, settings_from_args

DEFAULT_SERVER = "http://127.0.0.1:8000"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None, help=f"API URL (default $SHAPFLEET_SERVER or {DEFAULT_SERVER})")
    parser.add_argument("--api-key", default=None, help="API key (default $SHAPFLEET_API_KEY)")


def client_from(args: argparse.Namespace) -> Client:
    server = args.server or os.environ.get("SHAPFLEET_SERVER") or DEFAULT_SERVER
    return Client(server, args.api_key or os.environ.get("SHAPFLEET_API_KEY"))


def _print(data) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def wait_with_progress(client: Client, job_id: str, quiet: bool = False) -> dict:
    from shapfleet.workers.engine.progress import ProgressBar, precision_note

    bar: ProgressBar | None = None

    def on_progress(job: dict) -> None:
        nonlocal bar
        progress = job["progress"]
        if quiet or not progress["evaluations_total"]:
            return
        if bar is None:
            bar = ProgressBar(progress["evaluations_total"], f"job {job_id[:8]} evaluations")
        if progress.get("precision"):  # a target job: its projected total, and each image's precision
            bar.retarget(progress["evaluations_total"], ", ".join(precision_note(p) for p in progress["precision"]))
        bar.update(progress["evaluations_done"] - bar.done)

    job = client.wait(job_id, on_progress=on_progress)
    if bar is not None:
        bar.close()
    return job


def _final_exit(job: dict) -> int:
    if job["status"] != "succeeded":
        detail = (job.get("error") or {}).get("detail", "")
        print(f"shapfleet: job {job['id']} {job['status']}" + (f": {detail}" if detail else ""), file=sys.stderr)
        return 1
    return 0


def run_submit(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("--shards", args.shards), ("--workers", args.workers), ("--threads", args.threads))
             if value is not None]
    if given:
        raise InvalidSettingsError(f"{', '.join(given)} {'sizes' if len(given) == 1 else 'size'} the local run of `shapfleet explain`; a job's shards are "
                                   "sized by the fleet (SHAPFLEET_SHARD_EVALUATIONS) and run on its workers: leave "
                                   f"{'them' if len(given) > 1 else 'it'} out")
    settings = settings_from_args(args)
    if args.segments is not None and settings.method == "partition":
        raise InvalidSettingsError("--segments applies to method kernel; method partition refines shap's hierarchy "
                                   "of pixel boxes")
    # Files the settings name travel with the job: a dataset: masker's .npz as its background set, an
    # image: masker's file as its reference image, --segments as every image's label map.
    spec = settings.masker_spec
    background = spec.path if spec.kind == "dataset" else None
    reference = spec.path if spec.kind == "image" else None
    for path in (background, reference, args.segments):
        if path is not None and not os.path.isfile(path):
            raise InvalidSettingsError(f"no such file: {path}")
    client = client_from(args)
    job = client.submit(args.images, model=args.model, settings=settings.to_dict(), idempotency_key=args.idempotency_key,
                        background=background, segments=args.segments, reference=reference)
    if not args.wait:
        _print(job)
        return 0
    job = wait_with_progress(client, job["id"], args.quiet)
    if args.out and job["status"] == "succeeded":
        job["downloaded"] = [str(p) for p in client.download(job["id"], args.out)]
    _print(job)
    return _final_exit(job)


def run_status(args: argparse.Namespace) -> int:
    _print(client_from(args).get(args.job_id))
    return 0


def run_wait(args: argparse.Namespace) -> int:
    job = wait_with_progress(client_from(args), args.job_id, args.quiet)
    _print(job)
    return _final_exit(job)


def run_fetch(args: argparse.Namespace) -> int:
    paths = client_from(args).download(args.job_id, args.out)
    _print([str(p) for p in paths])
    return 0


def run_jobs(args: argparse.Namespace) -> int:
    page = client_from(args).list(limit=args.limit, cursor=args.cursor)
    for job in page["jobs"]:
        progress = job["progress"]
        print(f"{job['id']}  {job['status']:<9}  {job['created_at']}  "
              f"{progress['evaluations_done']}/{progress['evaluations_total']} evaluations")
    if page["next_cursor"]:
        print(f"more: --cursor {page['next_cursor']}")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    _print(client_from(args).cancel(args.job_id))
    return 0


def add_remote_commands(commands) -> None:
    submit = commands.add_parser("submit", help="submit images to a shapfleet server",
                                 description="Submit IMAGEs for explanation by a shapfleet server.")
    submit.add_argument("images", nargs="+", metavar="IMAGE")
    submit.add_argument("--model", required=True, metavar="MODEL.onnx")
    submit.add_argument("--wait", action="store_true", help="wait for the job, with a progress bar")
    submit.add_argument("--out", metavar="DIR", help="with --wait: download the artifacts here")
    submit.add_argument("--idempotency-key", help="a retry with the same key returns the same job")
    submit.add_argument("--quiet", action="store_true", help="no progress bar")
    for flag in ("--shards", "--workers", "--threads"):  # explain's: refused with a message, not unknown
        submit.add_argument(flag, type=int, help=argparse.SUPPRESS)
    add_connection_arguments(submit)
    add_engine_arguments(submit)
    submit.set_defaults(handler=run_submit)

    for name, handler, text in (("status", run_status, "show a job"), ("cancel", run_cancel, "cancel a job")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id", metavar="ID")
        add_connection_arguments(command)
        command.set_defaults(handler=handler)

    wait = commands.add_parser("wait", help="wait for a job, with a progress bar")
    wait.add_argument("job_id", metavar="ID")
    wait.add_argument("--quiet", action="store_true")
    add_connection_arguments(wait)
    wait.set_defaults(handler=run_wait)

    fetch = commands.add_parser("fetch", help="download a finished job's artifacts")
    fetch.add_argument("job_id", metavar="ID")
    fetch.add_argument("--out", required=True, metavar="DIR")
    add_connection_arguments(fetch)
    fetch.set_defaults(handler=run_fetch)

    jobs = commands.add_parser("jobs", help="list your jobs, newest first")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--cursor")
    add_connection_arguments(jobs)
    jobs.set_defaults(handler=run_jobs)

