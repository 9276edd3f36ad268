"""Shard evaluation: compose masked images for a shard's coalitions, run the model, accumulate statistics.

``evaluate_shard`` is pure apart from calling ``predict``: the same plan and shard index give the same
statistics on any machine. ``predict(images) -> outputs`` takes float32 ``B x H x W x C`` pixels
(0..255) and returns ``B x classes`` outputs; onnxruntime is one such callable, a test's linear
model is another.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from shapfleet.errors import ModelOutputError

from .design import CoalitionDesign, WorkUnit
from .estimation import ShardStatistics
from .planning import ImagePlan, JobPlan
from .sessions import Finished
from .threads import one_blas_thread

Predict = Callable[[np.ndarray], np.ndarray]


def coalition_predictor(classifier, plan: JobPlan) -> Predict | None:
    """The classifier's fused ``predict(Z)`` for this plan, when its masker is one fixed background
    (constant, mean, blur, image) and the model can be fused; None otherwise (inpainting, background
    sets), and the evaluator composes images in numpy instead."""
    masker = plan.masker
    if masker.backgrounds is None or masker.n_backgrounds != 1 or not hasattr(classifier, "coalition_predictor"):
        return None
    return classifier.coalition_predictor(plan.image, masker.backgrounds[0], plan.game_segments)


def game_values(plan: JobPlan, predict: Predict, coalitions: np.ndarray,
                predict_coalitions: Predict | None = None) -> np.ndarray:
    """v(z) for a batch of coalitions (``B x P`` bool, over the plan's players): the mean model
    output over the masker's backgrounds for the explained classes, ``B x K`` float64. With
    ``predict_coalitions`` the model composes the images itself (identical values, less data moved)."""
    if predict_coalitions is not None:
        return _coalition_outputs(plan, predict_coalitions(coalitions), len(coalitions))
    return masked_values(plan, predict, coalitions[:, plan.game_segments])


def _coalition_outputs(plan: JobPlan, outputs: np.ndarray, rows: int) -> np.ndarray:
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.shape[0] != rows or not np.all(np.isfinite(outputs)):
        raise ModelOutputError("the model returned NaN or Inf outputs on masked images")
    return outputs[:, plan.classes]


class _Submitted:
    def __init__(self, plan: JobPlan, pending, rows: int) -> None:
        self.plan, self.pending, self.rows = plan, pending, rows

    def result(self) -> np.ndarray:
        return _coalition_outputs(self.plan, self.pending.result(), self.rows)

    def cancel(self) -> None:
        self.pending.cancel()


def _start_game_values(plan: JobPlan, predict: Predict, coalitions: np.ndarray, predict_coalitions: Predict | None):
    """:func:`game_values` started: with a predictor that can ``submit`` (runs side by side), its
    runs are queued and the values come from ``result()``; otherwise they are computed now."""
    submit = getattr(predict_coalitions, "submit", None)
    if submit is None:
        return Finished(game_values(plan, predict, coalitions, predict_coalitions))
    return _Submitted(plan, submit(coalitions), len(coalitions))


def masked_values(plan: ImagePlan, predict: Predict, pixel_masks: np.ndarray) -> np.ndarray:
    """The game's value for a batch of pixel masks (``B x H x W``, or per channel ``B x H x W x C``;
    True keeps the image's pixel): the mean model output over the masker's backgrounds for the
    explained classes, ``B x K`` float64. Both methods' evaluations go through here.

    The masks are composed and run ``batch_size // n_backgrounds`` at a time (at least one), so a
    background set never makes one batch of ``B x N`` images."""
    per_call = max(1, plan.settings.images_per_batch // plan.masker.n_backgrounds)
    return np.concatenate([_masked_chunk(plan, predict, pixel_masks[start:start + per_call])
                           for start in range(0, len(pixel_masks), per_call)]) if len(pixel_masks) else \
        np.zeros((0, len(plan.classes)))


def _masked_chunk(plan: ImagePlan, predict: Predict, pixel_masks: np.ndarray) -> np.ndarray:
    composites = plan.masker.compose(plan.image, pixel_masks)
    outputs = np.asarray(predict(composites), dtype=np.float64)
    if outputs.ndim != 2 or outputs.shape[0] != len(composites):
        raise ModelOutputError(f"predict returned shape {outputs.shape} for {len(composites)} images")
    if not np.all(np.isfinite(outputs)):
        raise ModelOutputError("the model returned NaN or Inf outputs on masked images")
    per_background = outputs.reshape(len(pixel_masks), plan.masker.n_backgrounds, -1)
    return per_background.mean(axis=1)[:, plan.classes]


def _full_batches(plan: JobPlan, units, size: int, design: CoalitionDesign | None = None) -> Iterator[list[tuple[WorkUnit, np.ndarray, np.ndarray]]]:
    """The shard's coalitions in batches of exactly ``size`` rows (the last may be short), crossing
    unit boundaries so the model always gets full batches; each batch is a list of (unit, rows,
    weights or raw pair positions) parts, in unit order. ``design``: whose units (default the plan's)."""
    design = plan.design if design is None else design
    pending: list[tuple[WorkUnit, np.ndarray, np.ndarray]] = []
    count = 0
    for unit in units:
        z, weights = design.coalitions(unit)
        offset = 0
        while offset < len(z):
            take = min(size - count, len(z) - offset)
            pending.append((unit, z[offset:offset + take], weights[offset:offset + take]))
            count += take
            offset += take
            if count == size:
                yield pending
                pending, count = [], 0
    if pending:
        yield pending


def evaluate_shard(plan: JobPlan, shard_index: int, predict: Predict,
                   on_progress: Callable[[int], None] | None = None,
                   predict_coalitions: Predict | None = None) -> ShardStatistics:
    """Evaluate shard ``shard_index`` of ``plan.n_shards`` and return its additive statistics.

    ``on_progress(n)`` is called after every model batch with the number of model evaluations it
    made; ``predict_coalitions`` (see :func:`coalition_predictor`) replaces numpy compositing.
    """
    return evaluate_units(plan, plan.design, plan.shard_units[shard_index], shard_index, predict, on_progress,
                          predict_coalitions)


def evaluate_units(plan: JobPlan, design: CoalitionDesign, units, index: int, predict: Predict,
                   on_progress: Callable[[int], None] | None = None,
                   predict_coalitions: Predict | None = None) -> ShardStatistics:
    """Evaluate ``design``'s ``units`` (a shard, or a round's part) for ``plan``'s image; the
    statistics carry ``index`` as their shard index."""
    with one_blas_thread():  # the statistics' small products must not spin BLAS threads beside onnxruntime
        return _evaluate_units(plan, design, units, index, predict, on_progress, predict_coalitions)


def _evaluate_units(plan: JobPlan, design: CoalitionDesign, units, index: int, predict: Predict,
                    on_progress: Callable[[int], None] | None, predict_coalitions: Predict | None) -> ShardStatistics:
    stats = ShardStatistics.zeros(index, design.n_players, len(plan.classes))
    per_batch = max(1, plan.batch_size // plan.masker.n_backgrounds)
    # One batch is started before the previous one is added up, so that runs going side by side
    # never wait for the statistics (nor the threads for the next batch's runs) but at the shard's end.
    started: list[tuple[list, object]] = []
    try:
        for parts in _full_batches(plan, units, per_batch, design):
            z = np.concatenate([rows for _, rows, _ in parts])
            started.append((parts, _start_game_values(plan, predict, z, predict_coalitions)))
            if len(started) > 1:
                _add_batch(plan, stats, *started.pop(0), on_progress)
        while started:
            _add_batch(plan, stats, *started.pop(0), on_progress)
    finally:
        for _, values in started:  # a batch failed: the runs queued behind it are not made
            values.cancel()
    return stats


def _add_batch(plan: JobPlan, stats: ShardStatistics, parts: list, values, on_progress) -> None:
    y = values.result() - plan.v_empty
    start = 0
    for unit, rows, weights in parts:
        part = y[start:start + len(rows)]
        start += len(rows)
        if unit.kind == "enumerated":
            stats.add_enumerated(rows, weights, part)
        else:
            stats.add_sampled(rows, weights, part)  # a sampled unit's "weights" are its raw pair positions
    evaluations = len(y) * plan.masker.n_backgrounds
    stats.n_evaluations += evaluations
    if on_progress is not None:
        on_progress(evaluations)
