"""The engine's flags, defined once: every command that runs or submits an explanation takes them
(:func:`add_engine_arguments`) and turns them into the same :class:`ExplainSettings` (:func:`settings_from_args`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shapfleet.errors import InvalidSettingsError
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
    seg.add_argument("--sigma", type=float, default=1.0, help="slic, quickshift, felzenszwalb: Gaussian smoothing before segmenting, in pixels (0 to 32)")
    seg.add_argument("--grid", default="8x8", metavar="ROWSxCOLS", help="grid: cells")
    seg.add_argument("--kernel-size", type=float, default=4.0, help="quickshift: Gaussian kernel size, in pixels (1 to 10; its cost grows with the square)")
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
    est.add_argument("--nsamples", type=int, help="kernel: coalition evaluations (default 2M + 2048, as shap's auto); "
                                                  "with --target-std/--target-error, the cap")
    est.add_argument("--target-std", type=float, metavar="E",
                     help="kernel: evaluate in rounds until every value's standard error is <= E (output units), or "
                          "--nsamples (default: the nsamples limit) is spent")
    est.add_argument("--target-error", type=float, metavar="R",
                     help="kernel: as --target-std, relative: until each class's largest standard error is <= R "
                          "times its largest |value| (e.g. 0.05)")
    est.add_argument("--max-evals", type=int,
                     help=f"partition: model evaluations in all (default {DEFAULT_MAX_EVALS}, as shap)")
    est.add_argument("--estimator", choices=ESTIMATORS, default="auto",
                     help="kernel: linear is KernelSHAP's additive fit (as shap); cubic also fits every pair and "
                          "triple of superpixels, far less noisy for the same nsamples; kriging models the game as "
                          "a Gaussian process over the evaluated pairs, less noisy still; auto (default): kriging "
                          "up to 256 superpixels (up to about 4096 coalitions at M <= 16, 32768 above), else "
                          "cubic when M <= 16 and nsamples covers its terms, else linear")
    est.add_argument("--seed", type=int, default=0)
    est.add_argument("--batch-size", type=int, default=None,
                     help="images per model call (default: 64 composed at a time, on the CPU run at most 4 MiB of "
                          "model input at a time); partition: also masked images per refinement round (default 64)")
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
        method=args.method, nsamples=args.nsamples, target_std=args.target_std, target_error=args.target_error,
        max_evals=args.max_evals, estimator=args.estimator, seed=args.seed, batch_size=args.batch_size, layout=args.layout,
        channel_order=args.channel_order, resize=args.resize, center_crop=args.center_crop,
        preprocess=None if args.mean is not None else (args.preprocess or "unit"), mean=args.mean, std=args.std,
        output=args.output, class_names=read_class_names(args.class_names) if args.class_names else None,
    )
