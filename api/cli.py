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
from shapfleet.workers.engine.settings import (
    CHANNEL_ORDERS,
    DEFAULT_MAX_EVALS,
    ESTIMATORS,
    LAYOUTS,
    METHODS,
    OUTPUT_TRANSFORMS,
    PREPROCESS_PRESETS,
    SEGMENTERS,
    ExplainSettings,
)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The explanation settings, shared by every command that runs or submits an explanation."""
    seg = parser.add_argument_group("superpixels")
    seg.add_argument("--segmenter", choices=SEGMENTERS, default="slic")
    seg.add_argument("--segments", metavar="FILE", help="a label image (.npy or .png) instead of a segmenter")
    seg.add_argument("--n-segments", type=int, default=50, help="slic: approximate number of superpixels")
    seg.add_argument("--compactness", type=float, default=10.0, help="slic: colour versus space (higher: squarer)")
    seg.add_argument("--sigma", type=float, default=1.0, help="Gaussian smoothing before segmenting")
    seg.add_argument("--grid", default="8x8", metavar="ROWSxCOLS", help="grid: cells")
    seg.add_argument("--kernel-size", type=float, default=4.0, help="quickshift: kernel size")
    seg.add_argument("--max-dist", type=float, default=10.0, help="quickshift: cut-off distance")
    seg.add_argument("--ratio", type=float, default=0.5, help="quickshift: colour versus space")
    seg.add_argument("--scale", type=float, default=100.0, help="felzenszwalb: scale (higher: larger segments)")
    seg.add_argument("--min-size", type=int, default=50, help="felzenszwalb: minimum segment size")
    game = parser.add_argument_group("masking and classes")
    game.add_argument("--masker", default="mean",
                      help="mean | constant:V | constant:R,G,B | blur:KX,KY | inpaint_telea | inpaint_ns | "
                           "image:PATH | dataset:PATH.npz (default: mean)")
    classes = game.add_mutually_exclusive_group()
    classes.add_argument("--labels", type=_int_list, metavar="I,J", help="explain these class indices")
    classes.add_argument("--top-k", type=int, metavar="K", help="explain the K highest-scoring classes")
    classes.add_argument("--all-classes", action="store_true", help="explain every class")
    game.add_argument("--class-names", metavar="FILE", help="class names: a JSON list or one name per line")
    est = parser.add_argument_group("estimation")
    est.add_argument("--method", choices=METHODS, default="kernel",
                     help="kernel: Shapley values of superpixels (KernelSHAP); partition: Owen values over shap's "
                          "hierarchy of image boxes, pixel-level (PartitionExplainer)")
    est.add_argument("--nsamples", type=int, help="kernel: coalition evaluations (default 2M + 2048, as shap's auto)")
    est.add_argument("--max-evals", type=int,
                     help=f"partition: model evaluations in all (default {DEFAULT_MAX_EVALS}, as shap)")
    est.add_argument("--estimator", choices=ESTIMATORS, default="auto",
                     help="kernel: linear is KernelSHAP's additive fit (as shap); cubic also fits every pair and "
                          "triple of superpixels, far less noisy for the same nsamples; kriging models the game as "
                          "a Gaussian process over the evaluated pairs, less noisy still; auto (default): kriging "
                          "when M <= 16 and nsamples <= about 4096, else cubic when M <= 16 and nsamples covers "
                          "its terms, else linear")
    est.add_argument("--seed", type=int, default=0)
    est.add_argument("--batch-size", type=int, default=64,
                     help="images per model call; partition: also masked images per refinement round")
    mod = parser.add_argument_group("model input")
    mod.add_argument("--layout", choices=LAYOUTS, default="auto")
    mod.add_argument("--channel-order", choices=CHANNEL_ORDERS, default="rgb")
    mod.add_argument("--resize", metavar="N|HxW", help="resize the short side to N, or to exactly HxW")
    mod.add_argument("--center-crop", metavar="N|HxW", help="crop the centre after resizing")
    mod.add_argument("--preprocess", choices=sorted(PREPROCESS_PRESETS), default=None,
                     help="(pixel - mean) / std presets: unit (0, 255), raw (0, 1), centered (127, 128), "
                          "imagenet; default unit")
    mod.add_argument("--mean", type=_float_list, metavar="M[,M,M]", help="explicit per-channel mean (0..255 units)")
    mod.add_argument("--std", type=_float_list, metavar="S[,S,S]", help="explicit per-channel std (0..255 units)")
    mod.add_argument("--output", choices=OUTPUT_TRANSFORMS, default="raw", help="transform the model's outputs")


def read_class_names(path: str) -> tuple[str, ...]:
    """A JSON list of names, or one name per line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidSettingsError(f"cannot read the class names file {path}: {e.strerror or e}") from e
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            names = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise InvalidSettingsError(f"{path} is not a JSON list: {e}") from e
        if not isinstance(names, list) or not all(isinstance(n, (str, int, float)) for n in names):
            raise InvalidSettingsError(f"{path} must hold a JSON list of names")
        return tuple(str(n) for n in names)
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def settings_from_args(args: argparse.Namespace) -> ExplainSettings:
    if args.preprocess is not None and (args.mean is not None or args.std is not None):
        raise InvalidSettingsError("give either --preprocess or --mean/--std, not both")
    return ExplainSettings(
        segmenter=args.segmenter, n_segments=args.n_segments, compactness=args.compactness, sigma=args.sigma,
        grid=args.grid, quickshift_kernel_size=args.kernel_size, quickshift_max_dist=args.max_dist,
        quickshift_ratio=args.ratio, felzenszwalb_scale=args.scale, felzenszwalb_min_size=args.min_size,
        masker=args.masker, labels=args.labels, top_k=args.top_k, all_classes=args.all_classes,
        method=args.method, nsamples=args.nsamples, max_evals=args.max_evals, estimator=args.estimator, seed=args.seed, batch_size=args.batch_size, layout=args.layout,
        channel_order=args.channel_order, resize=args.resize, center_crop=args.center_crop,
        preprocess=None if args.mean is not None else (args.preprocess or "unit"), mean=args.mean, std=args.std,
        output=args.output, class_names=read_class_names(args.class_names) if args.class_names else None,
    )


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
    explain.add_argument("--threads", type=int, help="onnxruntime threads per process")
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

    add_remote_commands(commands, add_engine_arguments)
    return parser


def run_explain(args: argparse.Namespace) -> int:
    from shapfleet.workers.engine.progress import ProgressBar
    from shapfleet.workers.local import explain

    if args.workers < 1:
        raise InvalidSettingsError(f"--workers must be >= 1, got {args.workers}")
    if args.shards is not None and args.shards < 1:
        raise InvalidSettingsError(f"--shards must be >= 1, got {args.shards}")
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
           "cv2": "engine", "PIL": "engine", "matplotlib": "engine", "threadpoolctl": "engine",
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
