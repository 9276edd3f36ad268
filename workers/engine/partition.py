"""Partition explanations: Owen values over shap's hierarchy of image boxes (``--method partition``).

The hierarchy is the one shap's ``maskers.Image`` uses (see :func:`split_box`): the root is the
whole ``H x W x C`` input; a box splits in half along its rows when they are at least as many as its
columns (and more than one), else along its columns, and along its channels only once it is a
single pixel. Leaves are single pixel-channels, so the values are pixel-level.

The game is v(S) = f(image with the pixels outside S filled by the masker). For a node with context
mask ``c`` (the pixels outside the node that are present), children ``l`` and ``r``, and
f00 = v(c), f10 = v(c + l), f01 = v(c + r), f11 = v(c + l + r), the two-player Owen step gives ``l``
the credit (f10 - f00)/2 + (f11 - f01)/2 and ``r`` symmetrically, so each child is refined twice,
once in each context, at half the weight. Nodes are refined in order of ``max_k |f11 - f00| *
weight`` (largest first) in rounds of at most ``batch_size`` masked images, until ``max_evals`` is
spent; a node left unrefined keeps its credit ``(f11 - f00) * weight``, spread evenly over its
pixels. This is shap's ``PartitionExplainer.owen`` with ``fixed_context=None``, step for step
(same budget accounting, same rounds); ties in priority go first-in first-out here instead of at
random. With a budget that refines every node the result is the exact Owen value; for an additive
model Owen values equal Shapley values.

The refinement is a sequence of rounds over a :class:`PartitionState`: :meth:`PartitionState.pop_round`
chooses the round's nodes and masks, the masks are evaluated (here, or split over shard tasks on
the fleet), and :meth:`PartitionState.apply` consumes the outputs. A state round-trips through JSON
exactly, so a round can be planned on one worker and finished on another.
"""

from __future__ import annotations

import functools
import heapq
import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from shapfleet.errors import InvalidSettingsError, ModelOutputError

from .evaluation import masked_values
from .maskers import build_masker
from .planning import ImagePlan, plan_image
from .settings import ExplainSettings

Predict = Callable[[np.ndarray], np.ndarray]
#: A box of the input: (row0, row1, col0, col1, channel0, channel1), half-open.
Box = tuple[int, int, int, int, int, int]


def box_size(box: Box) -> int:
    r0, r1, c0, c1, z0, z1 = box
    return (r1 - r0) * (c1 - c0) * (z1 - z0)


def split_box(box: Box) -> tuple[Box, Box] | None:
    """shap's split of a box into (left, right) halves; None for a single pixel-channel (a leaf).

    The axis is the rows when they are at least as many as the columns (and more than one), else the
    columns, and the channels only within a single pixel. The left half is the *last* ``n // 2``
    rows (columns, channels): shap's ``maskers.Image`` builds its tree with the first half on the
    left but numbers the leaves in reverse pixel order, so the masks it applies are the mirror image
    of the tree it builds; this is the hierarchy its explanations actually use."""
    r0, r1, c0, c1, z0, z1 = box
    rows, cols = r1 - r0, c1 - c0
    if rows >= cols and rows > 1:
        mid = r1 - rows // 2
        return (mid, r1, c0, c1, z0, z1), (r0, mid, c0, c1, z0, z1)
    if cols > 1:
        mid = c1 - cols // 2
        return (r0, r1, mid, c1, z0, z1), (r0, r1, c0, mid, z0, z1)
    if z1 - z0 > 1:
        mid = z1 - (z1 - z0) // 2
        return (r0, r1, c0, c1, mid, z1), (r0, r1, c0, c1, z0, mid)
    return None


def full_refinement_evaluations(shape: tuple[int, int, int]) -> int:
    """Masked evaluations that refine every node in every context (the exact Owen values).

    A node met in c contexts costs 2c, and each half is met in twice as many; the cost per context
    depends only on a box's dimensions, so it is computed once per distinct size."""
    @functools.lru_cache(maxsize=None)
    def per_context(rows: int, cols: int, channels: int) -> int:
        halves = split_box((0, rows, 0, cols, 0, channels))
        if halves is None:
            return 0
        return 2 + sum(2 * per_context(b[1] - b[0], b[3] - b[2], b[5] - b[4]) for b in halves)
    return per_context(*shape)


@dataclass
class PartitionPlan(ImagePlan):
    """One image's partition explanation plan (K explained classes): the shared fields only."""

    @property
    def total_evaluations(self) -> int:
        """An upper bound: the budget (a small hierarchy may be refined fully with fewer)."""
        shape = self.image.shape
        return self.planning_evaluations + min(self.settings.partition_budget - 2,
                                               full_refinement_evaluations((shape[0], shape[1], shape[2])) + 1)


def plan_partition(image: np.ndarray, predict: Predict, settings: ExplainSettings,
                   load_reference: Callable[[str], np.ndarray] | None = None,
                   background_set: bytes | None = None) -> PartitionPlan:
    """Build the masker, evaluate v(full) and v(empty), and choose the classes. With a background set
    (``dataset:``) every masked image is composed over each background and v is the mean output, as
    for method kernel; ``load_reference`` and ``background_set`` are as for
    :func:`~shapfleet.workers.engine.planning.plan_explanation`."""
    if settings.method != "partition":
        raise InvalidSettingsError("plan_partition needs settings with method partition")
    masker = build_masker(settings.masker_spec, image, load_reference, background_set)
    return PartitionPlan(**plan_image(image, predict, settings, masker))


@dataclass
class Entry:
    """A node waiting to be refined: its box, its context (boxes present around it), the game's
    values without and with the node in that context, and its weight."""

    box: Box
    context: tuple[Box, ...]
    f00: np.ndarray
    f11: np.ndarray
    weight: float

    def to_json(self) -> list:
        return [list(self.box), [list(b) for b in self.context], self.f00.tolist(), self.f11.tolist(), self.weight]

    @classmethod
    def from_json(cls, data: list) -> "Entry":
        return cls(tuple(data[0]), tuple(tuple(b) for b in data[1]), np.asarray(data[2], dtype=np.float64),
                   np.asarray(data[3], dtype=np.float64), float(data[4]))


@dataclass
class Expansion:
    """A node being refined this round: its entry and its two halves; its masks are
    ``context + left`` then ``context + right``."""

    entry: Entry
    left: Box
    right: Box


class PartitionState:
    """The refinement between rounds: the priority queue, the credit given so far, the evaluations
    spent. ``budget`` counts masked evaluations (max_evals minus v(full) and v(empty), as shap)."""

    def __init__(self, shape: tuple[int, int, int], budget: int, round_size: int) -> None:
        self.shape = shape
        self.budget = budget
        self.round_size = round_size
        self.eval_count = 0
        self.rounds = 0
        self.finished = False
        self.credit: dict[Box, np.ndarray] = {}
        self._heap: list[tuple[float, int]] = []
        self._entries: dict[int, Entry] = {}
        self._order = 0

    @classmethod
    def start(cls, plan: PartitionPlan) -> "PartitionState":
        h, w, c = plan.image.shape
        state = cls((h, w, c), plan.settings.partition_budget - 2, plan.settings.images_per_batch)
        state._push(0.0, Entry((0, h, 0, w, 0, c), (), plan.v_empty.copy(), plan.v_full.copy(), 1.0))
        return state

    def _push(self, priority: float, entry: Entry) -> None:
        heapq.heappush(self._heap, (priority, self._order))
        self._entries[self._order] = entry
        self._order += 1

    def _pop(self) -> Entry:
        _, order = heapq.heappop(self._heap)
        return self._entries.pop(order)

    def _give(self, box: Box, amount: np.ndarray) -> None:
        if box in self.credit:
            self.credit[box] = self.credit[box] + amount
        else:
            self.credit[box] = amount.copy()

    def pop_round(self) -> list[Expansion]:
        """Choose the next round's nodes. An empty list means the refinement is finished: the queue
        is empty, or the budget is spent and what is left keeps its credit unrefined."""
        if self.finished:
            return []
        if self.eval_count >= self.budget:
            while self._heap:
                entry = self._pop()
                self._give(entry.box, (entry.f11 - entry.f00) * entry.weight)
            self.finished = True
            return []
        round_: list[Expansion] = []
        while self._heap and 2 * len(round_) < self.round_size and self.eval_count + 2 * len(round_) < self.budget:
            entry = self._pop()
            halves = split_box(entry.box)
            if halves is None:
                self._give(entry.box, (entry.f11 - entry.f00) * entry.weight)
                continue
            round_.append(Expansion(entry, halves[0], halves[1]))
        if not round_:
            self.finished = True
        return round_

    def masks(self, expansions: list[Expansion], start: int = 0, stop: int | None = None) -> np.ndarray:
        """The round's masks ``[start, stop)`` (two per expansion), ``n x H x W x C`` bool."""
        stop = 2 * len(expansions) if stop is None else stop
        out = np.zeros((stop - start,) + self.shape, dtype=bool)
        for row, index in enumerate(range(start, stop)):
            expansion = expansions[index // 2]
            for r0, r1, c0, c1, z0, z1 in expansion.entry.context + ((expansion.left, expansion.right)[index % 2],):
                out[row, r0:r1, c0:c1, z0:z1] = True
        return out

    def apply(self, expansions: list[Expansion], outputs: np.ndarray) -> None:
        """Consume the round's outputs (``2n x K``, in mask order): queue each half in both contexts."""
        if outputs.shape[0] != 2 * len(expansions):
            raise ModelOutputError(f"{outputs.shape[0]} outputs for a round of {2 * len(expansions)} masks")
        self.eval_count += len(outputs)
        self.rounds += 1
        for i, expansion in enumerate(expansions):
            e = expansion.entry
            f10, f01 = outputs[2 * i], outputs[2 * i + 1]
            half = e.weight / 2
            with_left = e.context + (expansion.left,)
            with_right = e.context + (expansion.right,)
            self._push(-float(np.max(np.abs(f10 - e.f00))) * half, Entry(expansion.left, e.context, e.f00, f10, half))
            self._push(-float(np.max(np.abs(f01 - e.f00))) * half, Entry(expansion.right, e.context, e.f00, f01, half))
            self._push(-float(np.max(np.abs(e.f11 - f01))) * half, Entry(expansion.left, with_right, f01, e.f11, half))
            self._push(-float(np.max(np.abs(e.f11 - f10))) * half, Entry(expansion.right, with_left, f10, e.f11, half))

    @property
    def exhausted_tree(self) -> bool:
        """True when every node was refined down to its leaves (the values are exact Owen values)."""
        return self.finished and all(box_size(b) == 1 for b in self.credit)

    # -- results -------------------------------------------------------------------------------
    def pixel_attributions(self) -> np.ndarray:
        """``H x W x C x K``: each node's credit spread evenly over its pixel-channels."""
        k = len(next(iter(self.credit.values()))) if self.credit else 0
        out = np.zeros(self.shape + (k,), dtype=np.float64)
        for (r0, r1, c0, c1, z0, z1), amount in self.credit.items():
            out[r0:r1, c0:c1, z0:z1] += amount / box_size((r0, r1, c0, c1, z0, z1))
        return out

    def regions(self) -> np.ndarray:
        """``H x W`` int32 label map of the boxes the values are uniform over (the finest boxes that
        received credit; a split inside a pixel counts as the pixel), numbered from 0."""
        labels = np.zeros(self.shape[:2], dtype=np.int64)
        for n, (r0, r1, c0, c1, _, _) in enumerate(sorted(self.credit, key=box_size, reverse=True), start=1):
            labels[r0:r1, c0:c1] = n
        return np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(np.int32)

    # -- storage -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "shape": list(self.shape), "budget": self.budget, "round_size": self.round_size,
            "eval_count": self.eval_count, "rounds": self.rounds, "finished": self.finished, "order": self._order,
            "heap": [[p, o] for p, o in self._heap],
            "entries": [[o, e.to_json()] for o, e in self._entries.items()],
            "credit": [[list(b), v.tolist()] for b, v in self.credit.items()],
        }

    @classmethod
    def from_json(cls, data: dict) -> "PartitionState":
        state = cls(tuple(data["shape"]), int(data["budget"]), int(data["round_size"]))
        state.eval_count, state.rounds = int(data["eval_count"]), int(data["rounds"])
        state.finished, state._order = bool(data["finished"]), int(data["order"])
        state._heap = [(float(p), int(o)) for p, o in data["heap"]]  # already a heap: stored in heap order
        state._entries = {int(o): Entry.from_json(e) for o, e in data["entries"]}
        state.credit = {tuple(b): np.asarray(v, dtype=np.float64) for b, v in data["credit"]}
        return state


def expansions_to_json(expansions: list[Expansion]) -> list:
    return [[e.entry.to_json(), list(e.left), list(e.right)] for e in expansions]


def expansions_from_json(data: list) -> list[Expansion]:
    return [Expansion(Entry.from_json(entry), tuple(left), tuple(right)) for entry, left, right in data]


def json_bytes(document) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def run_partition(plan: PartitionPlan, predict: Predict,
                  on_progress: Callable[[int], None] | None = None) -> PartitionState:
    """Refine in this process until the budget is spent or the tree is exhausted."""
    state = PartitionState.start(plan)
    while expansions := state.pop_round():
        outputs = masked_values(plan, predict, state.masks(expansions))
        state.apply(expansions, outputs)
        if on_progress is not None:
            on_progress(len(outputs))
    return state


def partition_explanation(plan: PartitionPlan, state: PartitionState):
    """Package a finished refinement as an :class:`~shapfleet.workers.engine.result.Explanation`: pixel-level
    values (``H x W x C x K``), and per region (the finest boxes refined) their summed value."""
    from .result import Explanation

    if not state.finished:
        raise ValueError("the partition refinement is not finished")
    pixels = state.pixel_attributions()
    regions = state.regions()
    per_pixel = pixels.sum(axis=2)  # H x W x K
    n_regions = int(regions.max()) + 1
    values = np.zeros((n_regions, pixels.shape[3]))
    np.add.at(values, regions.ravel(), per_pixel.reshape(-1, pixels.shape[3]))
    return Explanation(
        values=values, std=np.full_like(values, np.nan), segments=regions, image=plan.image,
        classes=np.asarray(plan.classes), class_names=list(plan.class_names), base_values=plan.v_empty,
        outputs=plan.v_full, all_outputs=plan.full_outputs,
        n_evaluations=plan.planning_evaluations + state.eval_count, n_coalitions=state.eval_count,
        exact=state.exhausted_tree, seed=plan.settings.seed, settings=plan.settings.to_dict(),
        pixel_attributions=pixels, extra={"rounds": state.rounds},
    )


def explain_partition(image: np.ndarray, predict: Predict, settings: ExplainSettings,
                      progress: Callable[[int], Any] | None = None):
    """Plan, refine and package in one call, for any ``predict(images) -> outputs`` callable: the
    engine's own loop, as :func:`~shapfleet.workers.local.explain_array` is for method kernel (ONNX
    models in ``shapfleet explain`` and jobs go through the steps' rounds instead, which give the same
    values). ``progress(total)``, when given, returns a progress bar (``update(n)``, ``close()``)."""
    plan = plan_partition(image, predict, settings)
    bar = progress(plan.total_evaluations) if progress is not None else None
    if bar is not None:
        bar.update(plan.planning_evaluations)
    state = run_partition(plan, predict, bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    return partition_explanation(plan, state)
