"""The explanation result: what the reducer produces, what ``attributions.npz`` holds.

``reduce_shards`` turns a plan and its shards' statistics into an :class:`Explanation`; it is the
same function in-process and in the fleet's reduce task.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .design import CoalitionDesign, WorkUnit
from .estimation import Estimate, ShardStatistics, combine, estimate, restrict
from .npz import npz_bytes
from .planning import JobPlan
from .rounds import INITIAL_RATES, RoundOutcome, Target, cap_coalitions, decide


@dataclass
class Explanation:
    """Attributions of one image's M regions for K classes.

    Method kernel: Shapley values of M superpixels with standard errors. Method partition: Owen
    values per pixel-channel in ``pixel_attributions`` (``H x W x C x K``); ``values`` then holds
    their sums over the M finest boxes refined (``segments``), and ``std`` is NaN (no error bars).
    """

    values: np.ndarray  # M x K
    std: np.ndarray  # M x K
    segments: np.ndarray  # H x W
    image: np.ndarray  # H x W x C pixels (the image as the model saw it, before normalisation)
    classes: np.ndarray  # K
    class_names: list[str]
    base_values: np.ndarray  # K, v(empty)
    outputs: np.ndarray  # K, v(full)
    all_outputs: np.ndarray  # every class's output on the unmasked image
    n_evaluations: int
    n_coalitions: int
    exact: bool
    seed: int
    settings: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    pixel_attributions: np.ndarray | None = None  # H x W x C x K (method partition)

    @property
    def method(self) -> str:
        return str(self.settings.get("method", "kernel"))

    @property
    def pixel_values(self) -> np.ndarray:
        """H x W x K: kernel, each pixel carries its superpixel's value; partition, each pixel's own
        value summed over its channels (as ``shap.image_plot`` shows it)."""
        if self.pixel_attributions is not None:
            return self.pixel_attributions.sum(axis=2)
        return self.values[self.segments]

    @property
    def additivity_residual(self) -> np.ndarray:
        """K: sum of values minus (v(full) - v(empty)); zero up to round-off by construction."""
        return self.values.sum(axis=0) - (self.outputs - self.base_values)

    def probabilities(self) -> np.ndarray:
        """The explained classes' probabilities: the outputs themselves when they already form a
        distribution, else their softmax over all classes."""
        out = self.all_outputs
        if np.all(out >= 0) and abs(out.sum() - 1) < 1e-3:
            probs = out
        else:
            e = np.exp(out - out.max())
            probs = e / e.sum()
        return probs[self.classes]

    def to_shap(self):
        """This explanation as a ``shap.Explanation`` of one image, so ``shap.image_plot(e.to_shap())``
        draws it: values ``1 x H x W x C x K`` (method kernel spreads each pixel's value evenly over
        its C channels, since image_plot sums them back), base values ``1 x K``, the image scaled to
        0..1 as data, and the class names as output names. Needs shap installed."""
        try:
            import shap
        except ModuleNotFoundError as e:
            raise ImportError("Explanation.to_shap() needs shap: pip install shap") from e
        channels = self.image.shape[2]
        values = self.pixel_attributions if self.pixel_attributions is not None else \
            np.repeat(self.pixel_values[:, :, None, :] / channels, channels, axis=2)
        return shap.Explanation(values=values[None], base_values=np.asarray(self.base_values)[None],
                                data=self.image[None] / 255.0, output_names=list(self.class_names))

    def to_npz_bytes(self) -> bytes:
        optional = {} if self.pixel_attributions is None else {"pixel_attributions": self.pixel_attributions}
        return npz_bytes(dict(
            **optional,
            values=self.values, std=self.std, pixel_values=self.pixel_values, segments=self.segments,
            image=self.image, classes=self.classes, class_names=np.array(self.class_names, dtype=str),
            base_values=self.base_values, outputs=self.outputs, all_outputs=self.all_outputs,
            n_evaluations=np.int64(self.n_evaluations), n_coalitions=np.int64(self.n_coalitions),
            exact=np.bool_(self.exact), seed=np.int64(self.seed),
            additivity_residual=self.additivity_residual,
            settings=np.array(json.dumps(self.settings)),
            extra=np.array(json.dumps(self.extra)),  # the summary's extra fields: the fit used, null superpixels
        ))

    @classmethod
    def load(cls, source: str | Path | bytes) -> "Explanation":
        """Read an ``attributions.npz`` written by :meth:`to_npz_bytes`."""
        data = np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False)
        return cls(
            values=data["values"], std=data["std"], segments=data["segments"], image=data["image"],
            classes=data["classes"], class_names=[str(n) for n in data["class_names"]],
            base_values=data["base_values"], outputs=data["outputs"], all_outputs=data["all_outputs"],
            n_evaluations=int(data["n_evaluations"]), n_coalitions=int(data["n_coalitions"]),
            exact=bool(data["exact"]), seed=int(data["seed"]), settings=json.loads(str(data["settings"])),
            pixel_attributions=data["pixel_attributions"] if "pixel_attributions" in data.files else None,
            extra=json.loads(str(data["extra"])) if "extra" in data.files else {},
        )

    def to_json_bytes(self) -> bytes:
        """What a viewer needs to show values on hover: the summary, the label map, and each
        superpixel's value and standard error per class."""
        document = {
            "summary": self.summary(), "class_names": list(self.class_names), "classes": [int(c) for c in self.classes],
            "height": int(self.segments.shape[0]), "width": int(self.segments.shape[1]),
            "segments": self.segments.tolist(), "values": np.round(self.values, 8).tolist(),
            "std": np.round(np.nan_to_num(self.std, nan=-1.0), 8).tolist(),
            "probabilities": [float(p) for p in self.probabilities()],
        }
        return json.dumps(document, separators=(",", ":")).encode()

    def summary(self, top: int = 3) -> dict[str, Any]:
        """A short JSON-able description: classes, the strongest superpixels, additivity, cost."""
        probabilities = self.probabilities()
        classes = []

        def region(i: int, k: int) -> dict[str, Any]:
            entry = {"superpixel": int(i), "value": float(self.values[i, k])}
            if np.isfinite(self.std[i, k]):
                entry["std"] = float(self.std[i, k])
            return entry

        for k, c in enumerate(self.classes):
            order = np.argsort(self.values[:, k])
            classes.append({
                "class": int(c), "name": self.class_names[k], "output": float(self.outputs[k]),
                "probability": float(probabilities[k]), "base_value": float(self.base_values[k]),
                "most_positive": [region(i, k) for i in order[::-1][:top] if self.values[i, k] > 0],
                "most_negative": [region(i, k) for i in order[:top] if self.values[i, k] < 0],
            })
        return {
            "method": self.method, "superpixels": int(self.values.shape[0]), "classes": classes,
            "additivity_residual": float(np.max(np.abs(self.additivity_residual))),
            "evaluations": self.n_evaluations, "coalitions": self.n_coalitions, "exact": self.exact,
            "seed": self.seed, **self.extra,
        }


def collection_npz_bytes(explanations: list[Explanation]) -> bytes:
    """One ``attributions.npz`` for N images of one size, each explained for K classes:
    ``pixel_values`` N x H x W x K, ``images`` N x H x W x C, ``segments`` N x H x W, ``classes``,
    ``class_names``, ``base_values``, ``outputs`` N x K, and per region ``values``/``std``
    N x M_max x K padded with NaN beyond each image's ``n_superpixels``; method partition adds
    ``pixel_attributions`` N x H x W x C x K. ``pixel_values[n, ..., k]`` is what row n, column k of
    ``grid.png`` shows."""
    m_max = max(e.values.shape[0] for e in explanations)
    k = len(explanations[0].classes)

    def padded(name: str) -> np.ndarray:
        out = np.full((len(explanations), m_max, k), np.nan)
        for n, e in enumerate(explanations):
            out[n, :e.values.shape[0]] = getattr(e, name)
        return out

    optional = {}
    if all(e.pixel_attributions is not None for e in explanations):
        optional["pixel_attributions"] = np.stack([e.pixel_attributions for e in explanations])
    return npz_bytes(dict(
        **optional,
        pixel_values=np.stack([e.pixel_values for e in explanations]),
        images=np.stack([e.image for e in explanations]),
        segments=np.stack([e.segments for e in explanations]),
        values=padded("values"), std=padded("std"),
        n_superpixels=np.array([e.values.shape[0] for e in explanations], dtype=np.int64),
        classes=np.stack([e.classes for e in explanations]),
        class_names=np.array([e.class_names for e in explanations], dtype=str),
        base_values=np.stack([e.base_values for e in explanations]),
        outputs=np.stack([e.outputs for e in explanations]),
        n_evaluations=np.array([e.n_evaluations for e in explanations], dtype=np.int64),
        settings=np.array(json.dumps(explanations[0].settings)),
    ))


def reduce_shards(plan: JobPlan, shards: list[ShardStatistics]) -> Explanation:
    """Sum the shards' statistics in index order, solve, and package the result."""
    total = combine(shards, plan.n_shards)
    return explanation_of(plan, total, estimate(plan.design, total, plan.v_empty, plan.v_full, plan.settings.estimator,
                                                 plan.player_adjacency))


def explanation_of(plan: JobPlan, total: ShardStatistics, result: Estimate) -> Explanation:
    """Package an estimate of ``plan``'s design from the combined statistics ``total``."""
    return Explanation(
        values=plan.superpixel_values(result.values), std=plan.superpixel_values(result.std),
        segments=plan.segments, image=plan.image,
        classes=np.asarray(plan.classes), class_names=list(plan.class_names), base_values=plan.v_empty,
        outputs=plan.v_full, all_outputs=plan.full_outputs,
        n_evaluations=plan.planning_evaluations + total.n_evaluations, n_coalitions=total.n_coalitions,
        exact=plan.design.is_exact, seed=plan.design.seed, settings=plan.settings.to_dict(),
        extra={"estimator": result.estimator, "null_superpixels": plan.n_superpixels - len(plan.players)},
    )


def explain_to_target(plan: JobPlan, evaluate: Callable[[CoalitionDesign, tuple[WorkUnit, ...], int], ShardStatistics],
                      cap: int, n_parts: int = 1,
                      on_round: Callable[[RoundOutcome, int], None] | None = None) -> Explanation:
    """A target run (``plan.settings`` has ``target_std`` or ``target_error``) in this process, from
    round 0 (``plan.design``) until :func:`~shapfleet.workers.engine.rounds.decide` stops it.

    ``evaluate(design, units, index)`` evaluates a run of ``design``'s units as part ``index``;
    each round's new units are split into ``n_parts`` such runs. ``on_round(outcome, evaluations)``
    hears of every round decided. The fleet's round steps (:mod:`shapfleet.workers.steps`) make the
    same decisions from stored records; both end with the fixed-budget answer of the last design."""
    target = Target.of(plan.settings)
    largest = cap_coalitions(plan.n_players, cap, plan.design.seed)
    design, earlier = plan.design, None
    parts: list[ShardStatistics] = []
    history: list[tuple[int, float]] = []
    while True:
        units = design.new_units(earlier)
        for chunk in (design.shard_units(n_parts, units) if units else []):
            parts.append(evaluate(design, chunk, len(parts)))
        total = restrict(combine(parts, len(parts)), design)
        result = estimate(design, total, plan.v_empty, plan.v_full, plan.settings.estimator, plan.player_adjacency)
        history.append((design.n_coalitions, target.precision(result.values, result.std)))
        outcome = decide(history, target, largest, design.is_exact, INITIAL_RATES[result.estimator])
        if on_round is not None:
            on_round(outcome, total.n_evaluations)
        if outcome.stopped_because is not None:
            break
        earlier, design = design, CoalitionDesign.create(plan.n_players, outcome.next_budget, plan.design.seed)
    explanation = explanation_of(dataclasses.replace(plan, design=design, n_shards=1), total, result)
    explanation.extra.update(target_extra(target, outcome, cap))
    return explanation


def target_extra(target: Target, outcome: RoundOutcome, cap: int) -> dict[str, Any]:
    """How a target run ended, for the summary, ``explanation.json`` and ``attributions.npz``."""
    return {**target.to_dict(), "target_met": outcome.target_met, "stopped_because": outcome.stopped_because,
            "rounds": outcome.round_index + 1, "achieved": None if math.isinf(outcome.precision) else outcome.precision,
            "cap": int(cap)}
