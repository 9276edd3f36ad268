"""Planning an explanation: segment, build the masker, evaluate v(full) and v(empty), pick the classes,
and fix the coalition design and its split into shards.

A :class:`JobPlan` is everything a shard needs. It converts to plain arrays plus a JSON-able dict
(``to_arrays``/``metadata``) so that the distributed pipeline can store it once and every worker can
rebuild it, and so that the in-process path hands the very same object to its shard functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from shapfleet.errors import InvalidSettingsError, ModelOutputError

from . import interactions, kriging, rounds
from .design import CoalitionDesign, WorkUnit
from .maskers import Masker, build_masker, masker_from_arrays
from .model import transform_outputs
from .segmentation import adjacent_superpixels, segment
from .settings import DEFAULT_MAX_NSAMPLES, ExplainSettings


@dataclass
class ImagePlan:
    """What every method plans for one image: the image, its masker, the K explained classes, and
    the model's outputs on the full image and with everything hidden. Stored as plain arrays plus
    JSON metadata (``to_arrays``/``from_arrays``), extended by each method's plan."""

    settings: ExplainSettings
    image: np.ndarray  # H x W x C float32 pixels, 0..255
    masker: Masker
    classes: np.ndarray  # K class indices
    class_names: list[str]  # K names
    full_outputs: np.ndarray  # all classes' outputs on the unmasked image
    empty_outputs: np.ndarray  # all classes' outputs with everything hidden

    @property
    def v_full(self) -> np.ndarray:
        return self.full_outputs[self.classes]

    @property
    def v_empty(self) -> np.ndarray:
        return self.empty_outputs[self.classes]

    @property
    def planning_evaluations(self) -> int:
        """Model evaluations spent on v(full) and v(empty)."""
        return 1 + self.masker.n_backgrounds

    def metadata(self) -> dict:
        return {"settings": self.settings.to_dict(), "masker_kind": self.masker.kind,
                "class_names": list(self.class_names)}

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "image": self.image,
            "classes": np.asarray(self.classes, dtype=np.int64),
            "full_outputs": self.full_outputs,
            "empty_outputs": self.empty_outputs,
            "metadata": np.array(json.dumps(self.metadata())),
        }
        if self.masker.backgrounds is not None:
            arrays["backgrounds"] = self.masker.backgrounds
        return arrays

    @staticmethod
    def fields_from_arrays(arrays) -> tuple[dict, dict]:
        """The shared fields rebuilt from :meth:`to_arrays`' output, and the metadata for the rest."""
        meta = json.loads(str(arrays["metadata"]))
        backgrounds = arrays["backgrounds"] if "backgrounds" in arrays else None
        fields = dict(
            settings=ExplainSettings.from_dict(meta["settings"]),
            image=np.asarray(arrays["image"], dtype=np.float32),
            masker=masker_from_arrays(meta["masker_kind"], backgrounds),
            classes=np.asarray(arrays["classes"], dtype=np.int64),
            class_names=list(meta["class_names"]),
            full_outputs=np.asarray(arrays["full_outputs"], dtype=np.float64),
            empty_outputs=np.asarray(arrays["empty_outputs"], dtype=np.float64),
        )
        return fields, meta

    @classmethod
    def from_arrays(cls, arrays) -> "ImagePlan":
        return cls(**cls.fields_from_arrays(arrays)[0])


@dataclass
class JobPlan(ImagePlan):
    """One image's KernelSHAP plan (M superpixels, K explained classes).

    The game's players are the superpixels that masking can change (``players``, P <= M of them):
    a superpixel whose every pixel equals the masker's fill in every background (black background
    under ``constant:0``, a white page under ``constant:255``) gives every coalition the same model
    inputs whether it is in or out, so it is a null player, its Shapley value is exactly 0, and
    leaving it out of the game changes no other value while the design's budget goes to the P
    players that matter. The design is over those P players."""

    segments: np.ndarray  # H x W int32, labels 0..M-1
    design: CoalitionDesign
    n_shards: int = 1
    players: np.ndarray | None = None  # P labels (sorted) that the game's players are; None: all M

    def __post_init__(self) -> None:
        if self.players is None:
            self.players = np.arange(self.n_superpixels, dtype=np.int64)
        self.players = np.asarray(self.players, dtype=np.int64)

    @property
    def n_superpixels(self) -> int:
        return int(self.segments.max()) + 1

    @cached_property
    def game_segments(self) -> np.ndarray:
        """Each pixel's player (0..P-1), ``H x W`` int32: what a coalition over the players indexes.
        A null superpixel's pixels go to player 0; which player does not matter, since they look
        the same in or out."""
        lookup = np.zeros(self.n_superpixels, dtype=np.int32)
        lookup[self.players] = np.arange(len(self.players), dtype=np.int32)
        return lookup[self.segments]

    @cached_property
    def player_adjacency(self) -> np.ndarray:
        """``P x P`` bool: which players' superpixels touch in the label map (see
        :func:`~shapfleet.workers.engine.segmentation.adjacent_superpixels`); what kriging's local
        terms are built on."""
        return adjacent_superpixels(self.segments)[np.ix_(self.players, self.players)]

    def superpixel_values(self, values: np.ndarray) -> np.ndarray:
        """Per-player rows (``P x K``) as per-superpixel rows (``M x K``), null superpixels 0."""
        out = np.zeros((self.n_superpixels,) + values.shape[1:], dtype=values.dtype)
        out[self.players] = values
        return out

    @property
    def batch_size(self) -> int:
        return self.settings.images_per_batch

    @property
    def n_players(self) -> int:
        return self.design.n_players

    @property
    def total_evaluations(self) -> int:
        return self.planning_evaluations + self.design.n_coalitions * self.masker.n_backgrounds

    @cached_property
    def shard_units(self) -> list[tuple[WorkUnit, ...]]:
        return self.design.shard_units(self.n_shards)

    def split(self, n_shards: int) -> None:
        """Split the design into (at most) ``n_shards`` shards; the coalitions do not change."""
        self.n_shards = len(self.design.shard_units(n_shards))
        self.__dict__.pop("shard_units", None)

    def shards_for(self, target_evaluations: int, max_shards: int) -> int:
        """How many shards give about ``target_evaluations`` model evaluations each."""
        evaluations = self.design.n_coalitions * self.masker.n_backgrounds
        return max(1, min(max_shards, -(-evaluations // max(1, target_evaluations))))

    def shard_evaluations(self, shard_index: int) -> int:
        return sum(u.n_coalitions for u in self.shard_units[shard_index]) * self.masker.n_backgrounds

    # -- storage -------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {**super().metadata(), "design": self.design.to_dict(), "n_shards": self.n_shards}

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {**super().to_arrays(), "segments": self.segments, "players": self.players}

    @classmethod
    def from_arrays(cls, arrays) -> "JobPlan":
        fields, meta = cls.fields_from_arrays(arrays)
        return cls(**fields, segments=np.asarray(arrays["segments"], dtype=np.int32),
                   design=CoalitionDesign.from_dict(meta["design"]), n_shards=int(meta["n_shards"]),
                   players=arrays["players"] if "players" in arrays else None)  # a plan stored before players: all


def largest_shards_first(plans: "list[JobPlan]") -> list[tuple[int, int]]:
    """Every ``(image, shard)`` of ``plans`` by decreasing evaluation count (ties in image, then
    shard order): the order to hand shards to workers that each take the next one when free.
    Work units make shards unequal (the enumerated sizes, whole sampled blocks), and a large shard
    left for last keeps one worker busy while the others idle; largest first leaves the small ones
    to even out the end."""
    shards = [(index, i) for index, plan in enumerate(plans) for i in range(plan.n_shards)]
    return sorted(shards, key=lambda s: (-plans[s[0]].shard_evaluations(s[1]), s))


def choose_classes(settings: ExplainSettings, full_outputs: np.ndarray) -> np.ndarray:
    """The explained classes: ``labels``, else the ``top_k`` by output, else all; top-1 by default."""
    n_classes = len(full_outputs)
    if settings.labels is not None:
        bad = [c for c in settings.labels if c >= n_classes]
        if bad:
            raise InvalidSettingsError(f"label(s) {bad} out of range: the model has {n_classes} classes (0..{n_classes - 1})")
        return np.asarray(settings.labels, dtype=np.int64)
    if settings.all_classes:
        return np.arange(n_classes, dtype=np.int64)
    k = settings.top_k or 1
    if k > n_classes:
        raise InvalidSettingsError(f"top_k={k} exceeds the model's {n_classes} classes")
    return np.argsort(-full_outputs, kind="stable")[:k].astype(np.int64)


def names_of_classes(settings: ExplainSettings, classes: np.ndarray, n_classes: int) -> list[str]:
    """The explained classes' names: from ``class_names`` (one per model class), else ``class <i>``."""
    names = settings.class_names
    if names is not None and len(names) != n_classes:
        raise InvalidSettingsError(f"{len(names)} class names were given but the model has {n_classes} classes")
    return [names[c] if names is not None else f"class {c}" for c in classes]


def plan_explanation(image: np.ndarray, predict: Callable[[np.ndarray], np.ndarray], settings: ExplainSettings,
                     segments: np.ndarray | None = None, n_shards: int = 1,
                     load_reference: Callable[[str], np.ndarray] | None = None,
                     background_set: bytes | None = None, default_cap: int = DEFAULT_MAX_NSAMPLES) -> JobPlan:
    """Plan the explanation of ``image`` (float32 ``H x W x C`` pixels) for ``predict``.

    ``segments`` overrides the segmenter (already validated and renumbered); ``load_reference``
    reads and fits the ``image:PATH`` masker's reference image; ``background_set`` is a fleet job's
    uploaded ``.npz`` for the ``dataset:`` masker. With a target (``target_std``/``target_error``) the
    design is the first round's, and ``default_cap`` the cap when ``nsamples`` is not given.
    """
    if segments is None:
        segments = segment(image, settings)
    masker = build_masker(settings.masker_spec, image, load_reference, background_set)
    players = np.flatnonzero(~null_superpixels(image, masker, segments))
    if len(players) == 0:  # nothing can change: one player keeps the design well defined (its value is 0)
        players = np.zeros(1, dtype=np.int64)
    n_players = len(players)
    if settings.estimator == "cubic" and n_players > interactions.MAX_CUBIC_PLAYERS:
        # Refused before any model evaluation: C(M, 3) terms make the fit's matrix grow as M^6.
        raise InvalidSettingsError(
            f"estimator cubic fits every triple of superpixels and allows at most {interactions.MAX_CUBIC_PLAYERS} "
            f"of them; this image has {n_players} that masking changes: use fewer superpixels, or estimator "
            f"auto or linear")
    if settings.has_target:
        # The first round's design (see shapfleet.workers.engine.rounds); the rounds grow it up to the cap.
        cap = rounds.cap_of(settings, default_cap)
        largest = CoalitionDesign.create(n_players, cap, settings.seed)  # refuses a cap too small to solve
        design = CoalitionDesign.create(n_players, rounds.first_budget(n_players, cap), settings.seed)
        if settings.estimator == "kriging":
            _check_kriging(largest)
    else:
        design = CoalitionDesign.create(n_players, settings.nsamples, settings.seed)
        if settings.estimator == "kriging":
            _check_kriging(design)
    plan = JobPlan(**plan_image(image, predict, settings, masker), segments=segments, design=design,
                   players=players)
    plan.split(n_shards)
    return plan


def null_superpixels(image: np.ndarray, masker: Masker, segments: np.ndarray) -> np.ndarray:
    """Which superpixels (``M`` bool) no coalition can change: every pixel equals the fill in every
    background, bit for bit. Only fixed-background maskers compose pixel by pixel
    (``where(mask, image, background)``); an inpainting fill depends on the whole mask, so under it
    no superpixel is null."""
    n_superpixels = int(segments.max()) + 1
    if masker.backgrounds is None:
        return np.zeros(n_superpixels, dtype=bool)
    changed = np.any(masker.backgrounds != image[None], axis=(0, 3))  # H x W
    return np.bincount(segments.ravel(), weights=changed.ravel(), minlength=n_superpixels) == 0


def plan_image(image: np.ndarray, predict: Callable[[np.ndarray], np.ndarray], settings: ExplainSettings,
               masker: Masker) -> dict:
    """The :class:`ImagePlan` fields every method shares: evaluate v(full) and v(empty) (the mean
    over the masker's backgrounds with everything hidden), then choose and name the classes."""
    full_outputs = checked_outputs(predict, image[None])[0]
    empty = masker.compose(image, np.zeros((1,) + image.shape[:2], dtype=bool))
    empty_outputs = checked_outputs(predict, empty).mean(axis=0)
    classes = choose_classes(settings, full_outputs)
    return dict(settings=settings, image=image, masker=masker, classes=classes,
                class_names=names_of_classes(settings, classes, len(full_outputs)),
                full_outputs=full_outputs, empty_outputs=empty_outputs)


def checked_outputs(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """``predict(images)`` as float64, checked to be batch x classes and finite."""
    out = np.asarray(predict(images), dtype=np.float64)
    if out.ndim != 2 or out.shape[0] != len(images):
        raise ModelOutputError(f"the model returned shape {list(out.shape)} for {len(images)} images; expected batch x classes")
    return transform_outputs(out, "raw")  # checks finiteness; the adapter already applied --output


def _check_kriging(design: CoalitionDesign) -> None:
    """Refuse, before any model evaluation, a kriging fit that would be too large: its kernel
    tables are exact integer sums over C(M, d), and its fit is O(n^3) in the pairs."""
    if design.n_players > kriging.MAX_PLAYERS:
        raise InvalidSettingsError(
            f"estimator kriging allows at most {kriging.MAX_PLAYERS} superpixels; this image has "
            f"{design.n_players} that masking changes: use fewer superpixels, or estimator auto or linear")
    if not design.is_exact and kriging.n_pairs(design) > kriging.MAX_COMMITTEE_PAIRS:  # an exact design needs no fit
        raise InvalidSettingsError(
            f"estimator kriging fits at most {2 * kriging.MAX_COMMITTEE_PAIRS} coalitions ({kriging.MAX_COMMITTEE_PAIRS} complementary "
            f"pairs); this job's nsamples gives {design.n_coalitions}: lower nsamples, or use "
            f"estimator auto or linear")
