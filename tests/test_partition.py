"""Method partition: Owen values over shap's image hierarchy.

Checked against (1) the closed form for an additive model (Owen values equal Shapley values,
w_p * (x_p - b_p) per pixel-channel), (2) the Owen value by its recursive definition, computed here
independently of the engine's queue and budget, and (3) shap's own PartitionExplainer with
``maskers.Image`` on the same model, image, masker, max_evals and batch_size.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import REPO
from onnx_models import conv_model, linear_model
from PIL import Image

from shapfleet import Explanation, explain
from shapfleet.api.cli import main
from shapfleet.errors import InvalidSettingsError
from shapfleet.workers.engine.evaluation import masked_values
from shapfleet.workers.engine.model import OnnxClassifier
from shapfleet.workers.engine.partition import (
    PartitionState,
    explain_partition,
    full_refinement_evaluations,
    partition_explanation,
    plan_partition,
    run_partition,
    split_box,
)
from shapfleet.workers.engine.settings import ExplainSettings


def linear_predict(weights: np.ndarray):
    """f_k(x) = sum_p W[p, k] x_p: additive in every pixel-channel."""
    flat = weights.reshape(-1, weights.shape[-1])
    return lambda images: np.asarray(images, dtype=np.float64).reshape(len(images), -1) @ flat


def tanh_predict(shape: tuple[int, int, int], classes: int = 3, seed: int = 0):
    """A non-additive model: tanh features, then a linear read-out."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(int(np.prod(shape)), 6)) / 40
    b = rng.normal(size=(6, classes))
    return lambda images: np.tanh(np.asarray(images, dtype=np.float64).reshape(len(images), -1) @ a) @ b


def random_image(shape: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    return np.rint(np.random.default_rng(seed).uniform(0, 255, size=shape)).astype(np.float32)


def owen_by_definition(predict, image: np.ndarray, background: np.ndarray, classes) -> np.ndarray:
    """phi_leaf = average over the 2-player games met on the way down: at a node with halves L, R in
    context c, L's share is (v(c+L) - v(c) + v(c+L+R) - v(c+R)) / 2. Recursion over explicit masks."""
    shape = image.shape

    def v(mask: np.ndarray) -> np.ndarray:
        return np.asarray(predict(np.where(mask, image, background)[None]), dtype=np.float64)[0, classes]

    out = np.zeros(shape + (len(classes),))

    def node_mask(box) -> np.ndarray:
        m = np.zeros(shape, dtype=bool)
        m[box[0]:box[1], box[2]:box[3], box[4]:box[5]] = True
        return m

    def recurse(box, context: np.ndarray, weight: float) -> None:
        halves = split_box(box)
        if halves is None:
            out[box[0], box[2], box[4]] += weight * (v(context | node_mask(box)) - v(context))
            return
        left, right = (node_mask(h) for h in halves)
        recurse(halves[0], context, weight / 2)
        recurse(halves[0], context | right, weight / 2)
        recurse(halves[1], context, weight / 2)
        recurse(halves[1], context | left, weight / 2)

    recurse((0, shape[0], 0, shape[1], 0, shape[2]), np.zeros(shape, dtype=bool), 1.0)
    return out


@pytest.mark.parametrize("shape", [(4, 4, 1), (3, 5, 2), (2, 3, 3)])
def test_additive_model_owen_values_are_the_shapley_closed_form(shape):
    weights = np.random.default_rng(7).normal(size=shape + (2,))
    image = random_image(shape)
    settings = ExplainSettings(method="partition", masker="constant:40", all_classes=True,
                               max_evals=2 + full_refinement_evaluations(shape), batch_size=16)
    explanation = explain_partition(image, linear_predict(weights), settings)
    expected = weights * (image - 40.0)[..., None]
    assert explanation.exact
    np.testing.assert_allclose(explanation.pixel_attributions, expected, atol=1e-9, rtol=0)


def test_additive_model_is_exact_under_any_budget_at_the_region_level():
    """Unrefined boxes keep f11 - f00, which for an additive model is exactly their pixels' sum, so
    the per-region totals are exact Shapley sums even when the budget stops early."""
    shape = (8, 8, 3)
    weights = np.random.default_rng(3).normal(size=shape + (1,))
    image = random_image(shape)
    settings = ExplainSettings(method="partition", masker="blur:3,3", max_evals=60, batch_size=8, labels=(0,))
    explanation = explain_partition(image, linear_predict(weights), settings)
    plan = plan_partition(image, linear_predict(weights), settings)
    contribution = (weights[..., 0] * (image - plan.masker.backgrounds[0])).sum(axis=2)
    for region in range(explanation.values.shape[0]):
        np.testing.assert_allclose(explanation.values[region, 0], contribution[explanation.segments == region].sum(),
                                   atol=1e-8)
    assert not explanation.exact and explanation.n_evaluations <= 61


@pytest.mark.parametrize("shape", [(4, 2, 1), (3, 3, 2)])
def test_full_budget_equals_the_owen_value_by_definition(shape):
    predict = tanh_predict(shape)
    image = random_image(shape)
    settings = ExplainSettings(method="partition", masker="constant:0", labels=(0, 2),
                               max_evals=2 + full_refinement_evaluations(shape), batch_size=10)
    explanation = explain_partition(image, predict, settings)
    expected = owen_by_definition(predict, image, np.zeros(shape, dtype=np.float32), [0, 2])
    assert explanation.exact
    np.testing.assert_allclose(explanation.pixel_attributions, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("masker", ["blur:3,3", "constant:255", "inpaint_telea"])
def test_additivity_holds_for_every_class_under_a_small_budget(masker):
    shape = (12, 10, 3)
    predict = tanh_predict(shape, classes=4)
    settings = ExplainSettings(method="partition", masker=masker, all_classes=True, max_evals=90, batch_size=10)
    explanation = explain_partition(random_image(shape), predict, settings)
    total = explanation.pixel_attributions.sum(axis=(0, 1, 2))
    np.testing.assert_allclose(total, explanation.outputs - explanation.base_values, atol=1e-12)
    np.testing.assert_allclose(explanation.values.sum(axis=0), total, atol=1e-12)
    assert explanation.pixel_attributions.shape == shape + (4,)
    assert explanation.n_evaluations <= 91  # shap's accounting: a round may end one over the budget


def test_state_survives_a_json_round_trip_between_every_round():
    """The fleet stores the state between rounds; reloading it must not change a single bit."""
    shape = (9, 7, 3)
    predict = tanh_predict(shape)
    settings = ExplainSettings(method="partition", masker="blur:2,2", top_k=2, max_evals=120, batch_size=12)
    plan = plan_partition(random_image(shape), predict, settings)
    state = PartitionState.start(plan)
    while True:
        state = PartitionState.from_json(json.loads(json.dumps(state.to_json())))
        expansions = state.pop_round()
        if not expansions:
            break
        state.apply(expansions, masked_values(plan, predict, state.masks(expansions)))
    reloaded = partition_explanation(plan, state).pixel_attributions
    direct = partition_explanation(plan, run_partition(plan, predict)).pixel_attributions
    assert np.array_equal(reloaded, direct)


@pytest.fixture(scope="module")
def shap_module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba and tqdm announce themselves on import
        import shap
    return shap


@pytest.mark.parametrize("masker, shap_masker, max_evals, batch_size", [
    ("blur:4,4", "blur(4,4)", 100, 10),
    ("blur:3,3", "blur(3,3)", 400, 50),
    ("inpaint_telea", "inpaint_telea", 200, 20),
    ("constant:0", None, 300, 64),
])
def test_matches_shap_partition_explainer(shap_module, masker, shap_masker, max_evals, batch_size):
    """Same ONNX model, image, masker, hierarchy, max_evals and batch_size: shap's values and ours
    agree to round-off (measured: relative L2 difference below 1e-15; asserted below 1e-9)."""
    shape = (20, 14, 3)
    classifier = OnnxClassifier(conv_model(20, 14, classes=4, seed=2), ExplainSettings(preprocess="unit"))
    image = random_image(shape, seed=5)
    settings = ExplainSettings(method="partition", masker=masker, max_evals=max_evals, batch_size=batch_size,
                               top_k=2, preprocess="unit")
    ours = explain_partition(image, classifier.predict, settings)
    mask_value = shap_masker if shap_masker is not None else np.zeros(shape)
    explainer = shap_module.PartitionExplainer(classifier.predict, shap_module.maskers.Image(mask_value, shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = explainer(image[None], max_evals=max_evals, batch_size=batch_size,
                           outputs=np.asarray(ours.classes), silent=True)
    reference = theirs.values[0]
    difference = np.linalg.norm(ours.pixel_attributions - reference) / np.linalg.norm(reference)
    assert difference < 1e-9
    np.testing.assert_allclose(ours.base_values, theirs.base_values[0], atol=1e-6)
    assert ours.n_coalitions == explainer.last_eval_count


def test_cli_partition_writes_pixel_level_values(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["explain", str(REPO / "examples" / "circle.png"), "--model", str(REPO / "examples" / "shapes.onnx"),
                 "--method", "partition", "--max-evals", "200", "--batch-size", "20", "--masker", "blur:8,8",
                 "--top-k", "2", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["method"] == "partition" and summary["evaluations"] <= 201
    assert summary["additivity_residual"] < 1e-9
    explanation = Explanation.load(out / "attributions.npz")
    assert explanation.pixel_attributions.shape == explanation.image.shape + (2,)
    np.testing.assert_allclose(explanation.pixel_values, explanation.pixel_attributions.sum(axis=2))
    assert {"summary.png", "image.png", "explanation.json"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("argv, message", [
    (["--method", "partition", "--nsamples", "100"], "nsamples applies to method kernel"),
    (["--max-evals", "100"], "max_evals applies to method partition"),
    (["--method", "partition", "--max-evals", "2"], "max_evals must be at least 3"),
    (["--method", "partition", "--masker", "dataset:missing.npz"], "missing.npz"),  # the set is read, not refused
    (["--method", "partition", "--workers", "2"], "apply to method kernel"),
    (["--method", "partition", "--estimator", "cubic"], "estimator applies to method kernel"),
])
def test_cli_partition_refuses_settings_that_do_not_apply(capsys, argv, message):
    code = main(["explain", str(REPO / "examples" / "circle.png"), "--model", str(REPO / "examples" / "shapes.onnx"),
                 "--quiet", *argv])
    assert code != 0
    assert message in capsys.readouterr().err


def test_settings_refuse_partition_with_kernel_only_options():
    with pytest.raises(InvalidSettingsError, match="unknown method"):
        ExplainSettings(method="deep")
    with pytest.raises(InvalidSettingsError, match="max_evals must be an integer"):
        ExplainSettings.from_dict({"method": "partition", "max_evals": "many"})
    with pytest.raises(InvalidSettingsError, match="unknown estimator 'quadratic'"):
        ExplainSettings.from_dict({"estimator": "quadratic"})


def test_explain_many_images_writes_a_grid_and_one_stacked_npz(tmp_path):
    images = [REPO / "examples" / f"{name}.png" for name in ("circle", "square", "triangle")]
    runs = explain(images, REPO / "examples" / "shapes.onnx",
                   ExplainSettings(method="partition", max_evals=80, batch_size=16, all_classes=True), out_dir=tmp_path)
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    with np.load(tmp_path / "attributions.npz") as stacked:
        assert stacked["pixel_values"].shape == (3,) + runs[0].explanation.image.shape[:2] + (3,)
        assert stacked["pixel_attributions"].shape[0] == 3
        for n, run in enumerate(runs):
            np.testing.assert_array_equal(stacked["pixel_values"][n], run.explanation.pixel_values)
            np.testing.assert_array_equal(stacked["classes"][n], run.explanation.classes)


def test_background_set_owen_values_are_the_expectation_over_the_backgrounds(tmp_path):
    """With a background set, v is the mean output over the backgrounds: for an additive model each
    pixel-channel's value is w (x - mean background), the DeepExplainer-style expectation."""
    shape = (4, 4, 3)
    weights = np.random.default_rng(5).normal(size=shape + (2,))
    image = random_image(shape)
    backgrounds = np.stack([random_image(shape, seed) for seed in (11, 12, 13)]).astype(np.float64)
    np.savez(tmp_path / "bg.npz", images=backgrounds)
    settings = ExplainSettings(method="partition", masker=f"dataset:{tmp_path / 'bg.npz'}", all_classes=True,
                               max_evals=2 + full_refinement_evaluations(shape), batch_size=7)
    explanation = explain_partition(image, linear_predict(weights), settings)
    expected = weights * (image - backgrounds.mean(axis=0))[..., None]
    assert explanation.exact
    np.testing.assert_allclose(explanation.pixel_attributions, expected, atol=1e-9, rtol=0)
    np.testing.assert_allclose(explanation.base_values, (backgrounds.reshape(3, -1) @ weights.reshape(-1, 2)).mean(axis=0))


def test_deep_explainer_workflow_is_one_command(tmp_path, capsys):
    """DeepExplainer's users explain a few test images for every class against a background set and
    plot ``shap.image_plot``: here that is one ``explain`` with method partition and a dataset: masker."""

    shape = (8, 8, 1)
    weights = np.random.default_rng(2).normal(size=shape + (3,))
    model = tmp_path / "linear.onnx"
    model.write_bytes(linear_model(weights, np.zeros(3), layout="nhwc", double=True))
    images = []
    for n in range(3):
        path = tmp_path / f"x{n}.png"
        Image.fromarray(random_image(shape, 20 + n)[:, :, 0].astype(np.uint8)).save(path)
        images.append(str(path))
    backgrounds = np.stack([random_image(shape, 30 + n) for n in range(5)]).astype(np.float64)
    np.savez(tmp_path / "bg.npz", images=backgrounds)
    code = main(["explain", *images, "--model", str(model), "--method", "partition", "--masker",
                 f"dataset:{tmp_path / 'bg.npz'}", "--all-classes", "--max-evals", str(2 + full_refinement_evaluations(shape)),
                 "--batch-size", "40",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    with np.load(tmp_path / "out" / "attributions.npz") as stacked:
        assert stacked["pixel_attributions"].shape == (3, 8, 8, 1, 3)
        for n, path in enumerate(images):
            pixels = np.asarray(Image.open(path), dtype=np.float64)[:, :, None]
            expected = weights * ((pixels - backgrounds.mean(axis=0)) / 255.0)[..., None]  # unit preprocessing
            np.testing.assert_allclose(stacked["pixel_attributions"][n], expected, rtol=0, atol=1e-9)
