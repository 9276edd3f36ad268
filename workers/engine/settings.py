"""Explanation settings: one frozen, validated object shared by the CLI, the API and the workers.

Every field has the meaning of the same-named ``shapfleet explain`` flag. ``to_dict``/``from_dict``
round-trip through JSON, which is how settings travel in job records and land in ``attributions.npz``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from shapfleet.errors import InvalidSettingsError

SEGMENTERS = ("slic", "quickshift", "felzenszwalb", "grid")
LAYOUTS = ("auto", "nchw", "nhwc")
CHANNEL_ORDERS = ("rgb", "bgr")
OUTPUT_TRANSFORMS = ("raw", "softmax", "logit")
METHODS = ("kernel", "partition")
#: How method kernel turns evaluations into Shapley values (see shapfleet.workers.engine.interactions and
#: shapfleet.workers.engine.kriging).
ESTIMATORS = ("auto", "linear", "cubic", "kriging")
#: shap's PartitionExplainer default budget.
DEFAULT_MAX_EVALS = 500
#: The cap on coalitions a ``target_std``/``target_error`` run may spend when ``nsamples`` is not
#: given (the fleet's default ``SHAPFLEET_MAX_NSAMPLES`` too).
DEFAULT_MAX_NSAMPLES = 100_000

#: The most threads one process runs a model on (``--threads``, ``SHAPFLEET_ORT_THREADS``): on the
#: CPU that many runs go side by side, each on a thread of its own.
MAX_THREADS = 256


def check_threads(threads: int | None, name: str) -> None:
    """Refuse a thread count outside 1..``MAX_THREADS`` (None: one per CPU this process may use)."""
    if threads is not None and (not _is_int(threads) or not 1 <= threads <= MAX_THREADS):
        raise InvalidSettingsError(f"{name} must be a whole number in 1..{MAX_THREADS}, got {threads!r}")


#: The smoothing before segmenting, in pixels (every segmenter's): its kernel reaches 4 sigma to
#: each side, and SLIC's pads each axis by that much and sums tap by tap, so sigma is what bounds the
#: smoothing's memory and time.
MAX_SIGMA = 32.0

#: The masked images composed per batch when ``batch_size`` is not given (partition: per round).
DEFAULT_BATCH_SIZE = 64

#: quickshift's Gaussian kernel, in pixels (scikit-image refuses below 1). Its density and parent
#: searches visit a window of (2 ceil(3 k) + 1)^2 pixels around every pixel, so the cost grows with
#: the kernel's square: 6 s for a 512 x 512 image (the service's segmenter limit) at 10 on this
#: project's 2-core machine, and minutes beyond.
MAX_QUICKSHIFT_KERNEL = 10.0

#: ``(pixel - mean) / std`` per channel, on 0..255 pixels.
PREPROCESS_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "unit": ((0.0,), (255.0,)),
    "raw": ((0.0,), (1.0,)),
    "centered": ((127.0,), (128.0,)),
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
}

#: Maskers that need no argument; the others are ``kind:argument``.
PLAIN_MASKERS = ("mean", "inpaint_telea", "inpaint_ns")
ARGUMENT_MASKERS = ("constant", "blur", "image", "dataset")
#: Maskers that fill every coalition from one fixed background image (which the fused masking serves).
FIXED_BACKGROUND_MASKERS = ("mean", "constant", "blur", "image")

_SIZE_RE = re.compile(r"^(\d+)(?:x(\d+))?$")


@dataclass(frozen=True)
class MaskerSpec:
    """A parsed masker string: ``kind`` and its argument (a number list or a path)."""

    kind: str
    values: tuple[float, ...] = ()
    path: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "MaskerSpec":
        """Parse ``mean``, ``constant:V`` or ``constant:R,G,B``, ``blur:KX,KY``, ``inpaint_telea``,
        ``inpaint_ns``, ``image:PATH`` or ``dataset:PATH.npz``."""
        kind, sep, argument = spec.partition(":")
        if kind in PLAIN_MASKERS and not sep:
            return cls(kind)
        if kind in ("constant", "blur") and sep:
            try:
                values = tuple(float(v) for v in argument.split(","))
            except ValueError:
                raise InvalidSettingsError(
                    f"masker {spec!r}: {kind} takes comma-separated numbers, e.g. "
                    + ("constant:0 or constant:255,255,255" if kind == "constant" else "blur:128,128")
                ) from None
            if not all(math.isfinite(v) for v in values):
                raise InvalidSettingsError(f"masker {spec!r}: {kind} takes finite numbers")
            if kind == "constant" and (len(values) not in (1, 3) or not all(0 <= v <= 255 for v in values)):
                raise InvalidSettingsError(
                    f"masker {spec!r}: constant takes one value or R,G,B, each in 0..255 pixel units"
                )
            if kind == "blur" and (len(values) != 2 or not all(v >= 1 and v == int(v) for v in values)):
                raise InvalidSettingsError(f"masker {spec!r}: blur takes two positive integer kernel sizes KX,KY")
            return cls(kind, values=values)
        if kind in ("image", "dataset") and argument:
            return cls(kind, path=argument)
        raise InvalidSettingsError(
            f"unknown masker {spec!r}; use one of: mean, constant:V, constant:R,G,B, blur:KX,KY, "
            "inpaint_telea, inpaint_ns, image:PATH, dataset:PATH.npz"
        )

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.kind}:{self.path}"
        if self.values:
            return f"{self.kind}:" + ",".join(f"{v:g}" for v in self.values)
        return self.kind


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_type(name: str, value: Any, annotation: str) -> None:
    if value is None:
        if "None" not in annotation:
            raise InvalidSettingsError(f"{name} must not be null")
        return
    if annotation.startswith("tuple"):
        element = annotation[annotation.index("[") + 1:annotation.index(",")]
        if not isinstance(value, (list, tuple)):
            raise InvalidSettingsError(f"{name} must be a list, got {type(value).__name__}")
        for item in value:
            _check_type(name + "[]", item, element)
        return
    base = annotation.split("|")[0].strip()
    ok = {"int": _is_int(value), "float": _is_int(value) or isinstance(value, float),
          "bool": isinstance(value, bool), "str": isinstance(value, str)}[base]
    if not ok:
        kind = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[base]
        raise InvalidSettingsError(f"{name} must be {kind}, got {value!r}")


def parse_size(text: str, what: str) -> tuple[int, int] | int:
    """``"256"`` -> 256 (a short side or a square), ``"224x200"`` -> (224, 200) as (height, width)."""
    match = _SIZE_RE.match(text.strip())
    if not match or int(match.group(1)) == 0 or (match.group(2) is not None and int(match.group(2)) == 0):
        raise InvalidSettingsError(f"{what} {text!r} is not a size; write N or HxW with positive integers")
    if match.group(2) is None:
        return int(match.group(1))
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class ExplainSettings:
    """What to explain and how. Validated on construction; raises :class:`InvalidSettingsError`.

    ``method`` ``kernel`` estimates Shapley values of superpixels (segmenter settings, ``nsamples``);
    ``partition`` computes Owen values over shap's axis-aligned hierarchy of pixel boxes
    (``max_evals``; ``batch_size`` is then also the number of masked images per refinement round,
    as in shap's PartitionExplainer). ``estimator`` (kernel only) picks the regression that turns
    evaluations into Shapley values: ``linear`` (KernelSHAP's), ``cubic`` (a third-order surrogate,
    see :mod:`shapfleet.workers.engine.interactions`), ``kriging`` (a Gaussian-process model of the game, see
    :mod:`shapfleet.workers.engine.kriging`) or ``auto``. ``batch_size`` is the number of masked
    images per model call when given; unset, batches of :data:`DEFAULT_BATCH_SIZE` are composed and
    the model layer picks its call size (see :attr:`~shapfleet.workers.engine.model.OnnxClassifier.run_rows`).
    """

    method: str = "kernel"
    # Superpixels
    segmenter: str = "slic"
    n_segments: int = 50
    compactness: float = 10.0
    sigma: float = 1.0
    grid: str = "8x8"
    quickshift_kernel_size: float = 4.0
    quickshift_max_dist: float = 10.0
    quickshift_ratio: float = 0.5
    felzenszwalb_scale: float = 100.0
    felzenszwalb_min_size: int = 50
    # Masker
    masker: str = "mean"
    # Classes: labels, else top_k, else all_classes; top-1 when none is given
    labels: tuple[int, ...] | None = None
    top_k: int | None = None
    all_classes: bool = False
    # Estimation
    nsamples: int | None = None
    target_std: float | None = None
    target_error: float | None = None
    max_evals: int | None = None
    seed: int = 0
    estimator: str = "auto"
    batch_size: int | None = None
    # Model adapter
    layout: str = "auto"
    channel_order: str = "rgb"
    resize: str | None = None
    center_crop: str | None = None
    preprocess: str | None = "unit"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    output: str = "raw"
    class_names: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
        for name in ("mean", "std", "class_names"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise InvalidSettingsError(message)

        require(self.segmenter in SEGMENTERS, f"unknown segmenter {self.segmenter!r}; use one of {', '.join(SEGMENTERS)}")
        require(self.n_segments > 0, f"n_segments must be a positive integer, got {self.n_segments}")
        require(self.compactness > 0, f"compactness must be positive, got {self.compactness}")
        require(self.sigma >= 0, f"sigma must be >= 0, got {self.sigma}")
        require(self.sigma <= MAX_SIGMA, f"sigma must be at most {MAX_SIGMA:g} pixels, got {self.sigma}")
        for name in ("compactness", "sigma", "quickshift_kernel_size", "quickshift_max_dist", "quickshift_ratio",
                     "felzenszwalb_scale"):
            require(math.isfinite(getattr(self, name)), f"{name} must be a finite number, got {getattr(self, name)}")
        require(1 <= self.quickshift_kernel_size <= MAX_QUICKSHIFT_KERNEL,
                f"quickshift_kernel_size must be in 1..{MAX_QUICKSHIFT_KERNEL:g} pixels, got {self.quickshift_kernel_size}")
        require(self.quickshift_max_dist > 0, f"quickshift_max_dist must be positive, got {self.quickshift_max_dist}")
        require(0 <= self.quickshift_ratio <= 1, f"quickshift_ratio must be in 0..1, got {self.quickshift_ratio}")
        require(self.felzenszwalb_scale > 0, f"felzenszwalb_scale must be positive, got {self.felzenszwalb_scale}")
        require(self.felzenszwalb_min_size >= 1, f"felzenszwalb_min_size must be >= 1, got {self.felzenszwalb_min_size}")
        require(0 <= self.seed < 2**63, f"seed must be an integer in 0..2^63-1, got {self.seed}")
        grid = parse_size(self.grid, "grid")
        require(not isinstance(grid, int) or grid > 0, "grid must be ROWSxCOLS")
        MaskerSpec.parse(self.masker)
        if self.labels is not None:
            require(len(self.labels) > 0, "labels must name at least one class")
            require(all(v >= 0 for v in self.labels), f"labels must be class indices >= 0, got {list(self.labels)}")
            require(len(set(self.labels)) == len(self.labels), f"labels repeat a class: {list(self.labels)}")
        if self.top_k is not None:
            require(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        chosen = sum([self.labels is not None, self.top_k is not None, bool(self.all_classes)])
        require(chosen <= 1, "choose the classes one way only: labels, top_k or all_classes")
        require(self.method in METHODS, f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.nsamples is not None:
            require(self.nsamples >= 1, f"nsamples must be a positive integer, got {self.nsamples}")
            require(self.method == "kernel", "nsamples applies to method kernel; method partition takes max_evals")
        for name in ("target_std", "target_error"):
            value = getattr(self, name)
            if value is not None:
                require(math.isfinite(value) and value > 0, f"{name} must be a positive finite number, got {value}")
                require(self.method == "kernel", f"{name} applies to method kernel: method partition has no error "
                        "bars to stop on (give max_evals)")
        require(self.target_std is None or self.target_error is None,
                "give one of target_std (absolute) and target_error (relative to the largest |value|), not both")
        if self.target_error is not None:
            require(self.target_error < 1, f"target_error is a fraction of the largest |value| and must be below 1, "
                    f"got {self.target_error}")
        if self.max_evals is not None:
            require(self.method == "partition", "max_evals applies to method partition; method kernel takes nsamples")
            require(self.max_evals >= 3, f"max_evals must be at least 3 (v(full), v(empty) and one pair), got {self.max_evals}")
        require(self.estimator in ESTIMATORS, f"unknown estimator {self.estimator!r}; use one of {', '.join(ESTIMATORS)}")
        require(self.estimator == "auto" or self.method == "kernel", "estimator applies to method kernel")
        require(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.layout in LAYOUTS, f"unknown layout {self.layout!r}; use one of {', '.join(LAYOUTS)}")
        require(self.channel_order in CHANNEL_ORDERS, f"channel_order must be rgb or bgr, got {self.channel_order!r}")
        require(self.output in OUTPUT_TRANSFORMS, f"output must be one of {', '.join(OUTPUT_TRANSFORMS)}, got {self.output!r}")
        if self.resize is not None:
            parse_size(self.resize, "resize")
        if self.center_crop is not None:
            parse_size(self.center_crop, "center_crop")
        if self.mean is None and self.std is None:
            require(self.preprocess in PREPROCESS_PRESETS,
                    f"unknown preprocessing preset {self.preprocess!r}; use one of {', '.join(PREPROCESS_PRESETS)} or mean/std")
        else:
            require(self.mean is not None and self.std is not None, "give both mean and std, or a preprocessing preset")
            require(len(self.mean) in (1, 3) and len(self.std) in (1, 3), "mean and std take 1 or 3 values")
            require(all(s != 0 for s in self.std), "std values must be non-zero")
            require(all(math.isfinite(v) for v in (*self.mean, *self.std)), "mean and std values must be finite")

    # -- derived views -------------------------------------------------------------------------
    @property
    def masker_spec(self) -> MaskerSpec:
        return MaskerSpec.parse(self.masker)

    @property
    def partition_budget(self) -> int:
        """Model evaluations a partition explanation may spend, v(full) and v(empty) included."""
        return self.max_evals if self.max_evals is not None else DEFAULT_MAX_EVALS

    @property
    def has_target(self) -> bool:
        """Whether the run stops on precision (``target_std`` or ``target_error``) rather than a
        fixed ``nsamples``, which is then its cap."""
        return self.target_std is not None or self.target_error is not None

    @property
    def runs_in_rounds(self) -> bool:
        """Whether each image runs in rounds (method partition; method kernel with a target) rather
        than as one set of shards: each image is then one unit of the job's barrier, ``<image>/0``."""
        return self.method == "partition" or self.has_target

    @property
    def grid_shape(self) -> tuple[int, int]:
        grid = parse_size(self.grid, "grid")
        return (grid, grid) if isinstance(grid, int) else grid

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The per-channel ``(mean, std)`` applied to 0..255 pixels before the model."""
        if self.mean is not None and self.std is not None:
            return self.mean, self.std
        return PREPROCESS_PRESETS[self.preprocess or "unit"]

    @property
    def images_per_batch(self) -> int:
        """The masked images composed per batch: ``batch_size``, or :data:`DEFAULT_BATCH_SIZE`."""
        return DEFAULT_BATCH_SIZE if self.batch_size is None else self.batch_size

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("labels", "mean", "std", "class_names"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExplainSettings":
        """Build from JSON-like data, checking each value's type (so ``"nsamples": "abc"`` is a
        clear :class:`InvalidSettingsError`, not a ``TypeError`` deep inside)."""
        if not isinstance(data, dict):
            raise InvalidSettingsError("settings must be a JSON object")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise InvalidSettingsError(f"unknown setting(s): {', '.join(unknown)}; known: {', '.join(sorted(types))}")
        for name, value in data.items():
            _check_type(name, value, types[name])
        return cls(**data)

    def replace(self, **changes: Any) -> "ExplainSettings":
        return dataclasses.replace(self, **changes)
