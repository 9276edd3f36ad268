"""The estimator against analytic answers and brute-force Shapley values."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_models import conv_model, linear_model
from shapley_reference import brute_force_shapley, onnx_value_function
from workers.engine.local import explain_array
from workers.engine.model import OnnxClassifier
from workers.engine.settings import ExplainSettings


def linear_shapley(weights: np.ndarray, image: np.ndarray, background: np.ndarray, segments: np.ndarray,
                   std: float = 1.0) -> np.ndarray:
    """Closed form for f(x) = sum_p w_p (x_p - mean) / std + b: phi_S = sum_{p in S} w_p (x_p - bg_p) / std."""
    n_players = int(segments.max()) + 1
    difference = (np.asarray(image, np.float64) - np.asarray(background, np.float64)) / std
    contribution = weights * difference[..., None]  # H x W x C x K
    return np.stack([contribution[segments == s].sum(axis=(0, 1)) for s in range(n_players)])


@pytest.fixture
def linear_case(rng):
    height, width, channels, classes = 12, 15, 3, 4
    weights = rng.normal(size=(height, width, channels, classes))
    bias = rng.normal(size=classes)
    image = rng.uniform(0, 255, (height, width, channels)).astype(np.float32)
    return weights, bias, image


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_linear_model_exact_path_matches_closed_form(linear_case, layout):
    weights, bias, image = linear_case
    settings = ExplainSettings(segmenter="grid", grid="3x3", masker="constant:17", all_classes=True, preprocess="raw")
    model = OnnxClassifier(linear_model(weights, bias, layout, double=True), settings)
    result = explain_array(image, model.predict, settings)
    assert result.exact and result.n_coalitions == 2 ** 9 - 2
    expected = linear_shapley(weights, image, np.full_like(image, 17), result.segments)
    np.testing.assert_allclose(result.values, expected, rtol=0, atol=1e-6)
    assert np.all(result.std == 0)


def test_linear_model_sampled_path_within_reported_errors(linear_case):
    weights, bias, image = linear_case
    settings = ExplainSettings(segmenter="grid", grid="5x6", masker="mean", all_classes=True, preprocess="unit",
                               nsamples=400, seed=3)
    model = OnnxClassifier(linear_model(weights, bias, "nchw", double=True), settings)
    result = explain_array(image, model.predict, settings)
    assert not result.exact and result.n_coalitions <= 400
    background = np.broadcast_to(image.mean(axis=(0, 1)), image.shape)
    expected = linear_shapley(weights, image, background, result.segments, std=255.0)
    error = np.abs(result.values - expected)
    # A linear game is fitted exactly by any full-rank design, so the error is round-off and the
    # jackknife spread is round-off too; both must be tiny and the error within the bars.
    assert error.max() < 1e-9
    assert np.all(error <= 1.96 * result.std + 1e-9)


@pytest.mark.parametrize("masker", ["mean", "constant:0", "blur:5,5"])
def test_nonlinear_model_equals_brute_force_shapley(rng, masker):
    height, width = 9, 9
    image = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
    model_bytes = conv_model(height, width, classes=3)
    settings = ExplainSettings(segmenter="grid", grid="3x3", masker=masker, all_classes=True, preprocess="unit")
    model = OnnxClassifier(model_bytes, settings)
    result = explain_array(image, model.predict, settings)
    assert result.exact
    from workers.engine.maskers import build_masker

    background = build_masker(settings.masker_spec, image).backgrounds[0]
    reference = brute_force_shapley(onnx_value_function(model_bytes, image, background, result.segments, [0, 1, 2]), 9)
    np.testing.assert_allclose(result.values, reference, rtol=0, atol=1e-8)


def test_additivity_holds_for_every_class(rng):
    image = rng.uniform(0, 255, (16, 16, 3)).astype(np.float32)
    settings = ExplainSettings(segmenter="grid", grid="4x5", masker="mean", all_classes=True, nsamples=300, seed=1)
    model = OnnxClassifier(conv_model(16, 16, classes=5), settings)
    result = explain_array(image, model.predict, settings)
    total = result.outputs - result.base_values
    assert np.all(np.abs(result.values.sum(axis=0) - total) <= 1e-8 * np.maximum(1.0, np.abs(total)))
    assert np.max(np.abs(result.additivity_residual)) <= 1e-8


def test_shard_count_does_not_change_the_answer(rng):
    image = rng.uniform(0, 255, (16, 16, 3)).astype(np.float32)
    settings = ExplainSettings(segmenter="grid", grid="4x4", masker="mean", all_classes=True, nsamples=1500, seed=9)
    model = OnnxClassifier(conv_model(16, 16, classes=3), settings)
    results = [explain_array(image, model.predict, settings, shards=n) for n in (1, 3, 8)]
    for other in results[1:]:
        np.testing.assert_allclose(other.values, results[0].values, rtol=0, atol=1e-10)
        np.testing.assert_allclose(other.std, results[0].std, rtol=0, atol=1e-10)
        assert other.n_evaluations == results[0].n_evaluations


def test_same_seed_same_answer_and_different_seed_different_samples(rng):
    image = rng.uniform(0, 255, (16, 16, 3)).astype(np.float32)
    settings = ExplainSettings(segmenter="grid", grid="4x4", masker="mean", all_classes=True, nsamples=400, seed=5)
    model = OnnxClassifier(conv_model(16, 16, classes=3), settings)
    first = explain_array(image, model.predict, settings)
    again = explain_array(image, model.predict, settings)
    other = explain_array(image, model.predict, settings.replace(seed=6))
    np.testing.assert_array_equal(first.values, again.values)
    assert np.abs(first.values - other.values).max() > 1e-6


def test_error_bars_cover_the_exact_values(rng):
    """Over 20 seeds, |estimate - exact| <= 1.96 std for between 85% and 99% of the values."""
    height = width = 12
    image = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
    model_bytes = conv_model(height, width, classes=3, seed=4)
    base = ExplainSettings(segmenter="grid", grid="3x4", masker="mean", all_classes=True, preprocess="unit")
    model = OnnxClassifier(model_bytes, base)
    exact = explain_array(image, model.predict, base.replace(nsamples=2 ** 12))
    assert exact.exact
    covered = []
    for seed in range(20):
        estimate = explain_array(image, model.predict, base.replace(nsamples=600, seed=seed))
        assert not estimate.exact and np.all(estimate.std > 0)
        covered.append(np.abs(estimate.values - exact.values) <= 1.96 * estimate.std)
    share = float(np.mean(covered))
    assert 0.85 <= share <= 0.99, share
