"""Superpixels that masking cannot change are null players: exactly 0, and left out of the game."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_models import conv_model
from shapley_reference import brute_force_shapley, onnx_value_function

from shapfleet.workers.engine.maskers import build_masker
from shapfleet.workers.engine.model import OnnxClassifier
from shapfleet.workers.engine.planning import JobPlan, null_superpixels, plan_explanation
from shapfleet.workers.engine.segmentation import segment
from shapfleet.workers.engine.settings import ExplainSettings
from shapfleet.workers.local import explain_array

GRID = dict(segmenter="grid", grid="3x3", all_classes=True, preprocess="unit")


def _digit_on_black(rng, size: int = 12) -> np.ndarray:
    """Bright strokes in the middle column of a 3x3 grid and one corner cell; the rest exactly 0."""
    image = np.zeros((size, size, 3), np.float32)
    image[:, 4:8] = rng.uniform(50, 255, (size, 4, 3))
    image[:4, :4] = rng.uniform(50, 255, (4, 4, 3))
    return image


def test_null_superpixels_are_those_equal_to_the_fill_in_every_background(rng):
    image = _digit_on_black(rng)
    segments = segment(image, ExplainSettings(**GRID))
    black = build_masker(ExplainSettings(masker="constant:0").masker_spec, image)
    assert np.flatnonzero(~null_superpixels(image, black, segments)).tolist() == [0, 1, 4, 7]
    white = build_masker(ExplainSettings(masker="constant:255").masker_spec, image)
    assert not null_superpixels(image, white, segments).any()
    # An inpainting fill depends on the whole mask: no superpixel is null under it.
    inpaint = build_masker(ExplainSettings(masker="inpaint_telea").masker_spec, image)
    assert not null_superpixels(image, inpaint, segments).any()


def test_an_image_with_null_superpixels_gets_the_brute_force_values_of_the_whole_game(rng):
    """Full enumeration over all 9 superpixels by definition against the plan over the 4 that
    masking changes: the same values, the 5 null ones exactly 0 with std 0, and 2^4 - 2
    coalitions instead of 2^9 - 2."""
    image = _digit_on_black(rng)
    model_bytes = conv_model(12, 12, classes=3, seed=2)
    settings = ExplainSettings(masker="constant:0", **GRID)
    result = explain_array(image, OnnxClassifier(model_bytes, settings).predict, settings)
    assert result.exact and result.n_coalitions == 2 ** 4 - 2
    assert result.summary()["null_superpixels"] == 5
    value_of = onnx_value_function(model_bytes, image, np.zeros_like(image), result.segments, range(3))
    expected = brute_force_shapley(value_of, 9)
    np.testing.assert_allclose(result.values, expected, rtol=0, atol=1e-6)
    assert np.all(result.values[[2, 3, 5, 6, 8]] == 0) and np.all(result.std == 0)


@pytest.mark.parametrize("fuse", [True, False])
def test_sampled_values_over_the_players_match_both_compositing_paths(rng, fuse):
    """The design's coalitions are over the players; the model (fused graph or numpy compositing)
    sees every null superpixel's own pixels whatever the coalition."""
    image = _digit_on_black(rng, 20)
    settings = ExplainSettings(segmenter="grid", grid="5x5", masker="constant:0", all_classes=True,
                               preprocess="unit", nsamples=300, seed=5)
    model = OnnxClassifier(conv_model(20, 20, classes=2, seed=1), settings)
    plan = plan_explanation(image, model.predict, settings)
    assert 0 < plan.design.n_players == len(plan.players) < 25
    result = explain_array(image, model.predict, settings, fuse=fuse)
    reference = explain_array(image, model.predict, settings, fuse=not fuse)
    np.testing.assert_allclose(result.values, reference.values, rtol=0, atol=1e-9)
    null = np.setdiff1d(np.arange(25), plan.players)
    assert np.all(result.values[null] == 0) and np.all(result.std[null] == 0)
    np.testing.assert_allclose(result.values.sum(axis=0), result.outputs - result.base_values, atol=1e-9)


def test_the_plan_keeps_its_players_through_storage(rng):
    image = _digit_on_black(rng)
    settings = ExplainSettings(masker="constant:0", nsamples=10, **GRID)
    model = OnnxClassifier(conv_model(12, 12, classes=3), settings)
    plan = plan_explanation(image, model.predict, settings)
    again = JobPlan.from_arrays(plan.to_arrays())
    assert again.players.tolist() == plan.players.tolist() == [0, 1, 4, 7]
    np.testing.assert_array_equal(again.game_segments, plan.game_segments)


def test_an_image_that_masking_cannot_change_is_explained_as_all_zeros(rng):
    image = np.zeros((12, 12, 3), np.float32)
    settings = ExplainSettings(masker="constant:0", **GRID)
    result = explain_array(image, OnnxClassifier(conv_model(12, 12), settings).predict, settings)
    assert result.exact and np.all(result.values == 0) and np.all(result.std == 0)
