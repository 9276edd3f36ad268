"""The in-process pipeline: plan, evaluate the shards (here or in a local process pool), reduce.

This is what ``shapfleet explain`` and :func:`explain` run. It calls exactly the functions the fleet's
Celery tasks call (``plan_explanation``, ``evaluate_shard``, ``reduce_shards``), so a job gives the
same attributions in-process and on the fleet for the same seed.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shapfleet.errors import InvalidSettingsError

from .estimation import ShardStatistics
from .evaluation import Predict, coalition_predictor, evaluate_shard
from .images import as_pixel_array, fit_to_model, load_image
from .model import OnnxClassifier, read_model_file
from .partition import explain_partition
from .planning import JobPlan, largest_shards_first, plan_explanation
from .rendering import render_artifacts, render_collection
from .result import Explanation, reduce_shards
from .segmentation import check_segments, load_segments
from .settings import ExplainSettings

ProgressFactory = Callable[[int, str], "object"]  # (total, label) -> object with update(n) and close()


def run_shards(plan: JobPlan, predict: Predict, on_progress: Callable[[int], None] | None = None,
               predict_coalitions: Predict | None = None) -> list[ShardStatistics]:
    """Evaluate every shard of ``plan`` in this process, in index order."""
    return [evaluate_shard(plan, i, predict, on_progress, predict_coalitions=predict_coalitions)
            for i in range(plan.n_shards)]


def explain_array(image: np.ndarray, predict: Predict, settings: ExplainSettings, *,
                  segments: np.ndarray | None = None, shards: int = 1,
                  on_progress: Callable[[int], None] | None = None, fuse: bool = True) -> Explanation:
    """Explain a float32 ``H x W x C`` pixel image for any ``predict(images) -> outputs`` callable.

    When ``predict`` is an :class:`OnnxClassifier`'s method and ``fuse`` is true, the masking runs
    inside the model (see :mod:`shapfleet.workers.engine.fused`); the values are identical either way."""
    plan = plan_explanation(image, predict, settings, segments=segments, n_shards=shards)
    owner = getattr(predict, "__self__", None)
    fused = coalition_predictor(owner, plan) if fuse and owner is not None else None
    return reduce_shards(plan, run_shards(plan, predict, on_progress, fused))


# -- the local process pool (one onnxruntime session per process, created once) -------------------
_pool_state: dict = {}


def _pool_init(model_bytes: bytes, settings: dict, plan_arrays: dict, threads: int, queue) -> None:
    settings_obj = ExplainSettings.from_dict(settings)
    _pool_state["model"] = OnnxClassifier(model_bytes, settings_obj, threads=threads)
    _pool_state["plan"] = JobPlan.from_arrays(plan_arrays)
    _pool_state["queue"] = queue


def _pool_shard(shard_index: int) -> dict:
    queue = _pool_state["queue"]
    plan, model = _pool_state["plan"], _pool_state["model"]
    stats = evaluate_shard(plan, shard_index, model.predict, on_progress=lambda n: queue.put(n),
                           predict_coalitions=coalition_predictor(model, plan))
    return stats.to_arrays()


def run_shards_in_pool(plan: JobPlan, model_bytes: bytes, workers: int,
                       on_progress: Callable[[int], None] | None = None) -> list[ShardStatistics]:
    """Evaluate the shards in ``workers`` processes, each with its own session and its share of cores."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_pool_init,
                             initargs=(model_bytes, plan.settings.to_dict(), plan.to_arrays(), threads, queue)) as pool:
        futures = {i: pool.submit(_pool_shard, i) for _, i in largest_shards_first([plan])}
        while not all(f.done() for f in futures.values()):
            _drain(queue, on_progress, timeout=0.1)
        results = [ShardStatistics.from_arrays(futures[i].result()) for i in range(plan.n_shards)]
    _drain(queue, on_progress, timeout=0.0)
    return results


def _drain(queue, on_progress, timeout: float) -> None:
    import queue as queue_module

    try:
        n = queue.get(timeout=timeout) if timeout else queue.get_nowait()
        while True:
            if on_progress is not None:
                on_progress(n)
            n = queue.get_nowait()
    except queue_module.Empty:
        pass


@dataclass
class ExplainRun:
    """One image's explanation and where its artifacts went (if anywhere)."""

    source: str
    explanation: Explanation
    wall_seconds: float
    artifacts: dict[str, bytes]
    out_dir: Path | None = None


def explain(images: Sequence[str | os.PathLike[str] | np.ndarray], model: str | os.PathLike[str] | bytes,
            settings: ExplainSettings | None = None, *, segments: str | os.PathLike[str] | np.ndarray | None = None,
            shards: int | None = None, workers: int = 1, out_dir: str | os.PathLike[str] | None = None,
            progress: ProgressFactory | None = None, threads: int | None = None) -> list[ExplainRun]:
    """Explain each image for an ONNX model, in-process. Writes artifacts only when ``out_dir`` is given
    (one image: into ``out_dir``; several: into ``out_dir/<n>-<stem>/``, plus ``out_dir/grid.png``
    and the stacked ``out_dir/attributions.npz``)."""
    settings = settings or ExplainSettings()
    if settings.method == "partition" and (segments is not None or (shards or 1) > 1 or workers > 1):
        raise InvalidSettingsError("segments, shards and workers apply to method kernel; method partition refines "
                                   "pixel boxes round by round in this process (the fleet spreads rounds over workers)")
    model_bytes = model if isinstance(model, bytes) else read_model_file(model)
    if threads is None and workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
    classifier = OnnxClassifier(model_bytes, settings, threads=threads)
    n_shards = shards if shards is not None else max(1, workers)

    def fit(source, name: str) -> np.ndarray:
        pixels = load_image(source, classifier.channels) if not isinstance(source, np.ndarray) \
            else as_pixel_array(source, classifier.channels, name)
        return fit_to_model(pixels, classifier.input_size, settings.resize, settings.center_crop, name)

    runs = []
    for index, source in enumerate(images):
        name = str(source) if not isinstance(source, np.ndarray) else f"image {index}"
        started = time.perf_counter()
        image = fit(source, name)
        label = _label(name, index, len(images))
        if settings.method == "partition":
            explanation = explain_partition(image, classifier.predict, settings,
                                            (lambda total: progress(total, label)) if progress is not None else None)
        else:
            explanation = _explain_kernel(image, classifier, model_bytes, settings, segments, n_shards, workers,
                                          progress, label, lambda path: fit(path, path))
        wall = time.perf_counter() - started
        explanation.extra["wall_seconds"] = round(wall, 3)
        artifacts = render_artifacts(explanation) if out_dir is not None else {}
        target = None
        if out_dir is not None:
            target = Path(out_dir) if len(images) == 1 else Path(out_dir) / f"{index}-{_stem(source, index)}"
            target.mkdir(parents=True, exist_ok=True)
            for artifact, data in artifacts.items():
                (target / artifact).write_bytes(data)
        runs.append(ExplainRun(name, explanation, wall, artifacts, target))
    if out_dir is not None and len(runs) > 1:
        for artifact, data in render_collection([run.explanation for run in runs]).items():
            (Path(out_dir) / artifact).write_bytes(data)
    return runs


def _explain_kernel(image: np.ndarray, classifier: OnnxClassifier, model_bytes: bytes, settings: ExplainSettings,
                    segments, n_shards: int, workers: int, progress: ProgressFactory | None, label: str,
                    load_reference: Callable[[str], np.ndarray]) -> Explanation:
    labels = None
    if segments is not None:
        labels = check_segments(segments, image.shape[:2]) if isinstance(segments, np.ndarray) \
            else load_segments(segments, image.shape[:2])
    plan = plan_explanation(image, classifier.predict, settings, segments=labels, n_shards=n_shards,
                            load_reference=load_reference)
    bar = progress(plan.total_evaluations, label) if progress else None
    if bar is not None:
        bar.update(plan.planning_evaluations)
    update = bar.update if bar is not None else None
    if workers > 1 and plan.n_shards > 1:
        shard_stats = run_shards_in_pool(plan, model_bytes, min(workers, plan.n_shards), update)
    else:
        shard_stats = run_shards(plan, classifier.predict, update, coalition_predictor(classifier, plan))
    explanation = reduce_shards(plan, shard_stats)
    if bar is not None:
        bar.close()
    return explanation


def _stem(source, index: int) -> str:
    if isinstance(source, np.ndarray):
        return f"image{index}"
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(source).stem) or f"image{index}"


def _label(name: str, index: int, count: int) -> str:
    return "evaluations" if count == 1 else f"[{index + 1}/{count}] evaluations"
