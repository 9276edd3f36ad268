"""Precision on request (``target_std`` / ``target_error``): the rounds' decisions as pure functions,
the in-process run against fixed-budget runs of the same seed, and refusals; the fleet's rounds are
in test_fleet_methods.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import REPO
from onnx_models import conv_model, linear_model

from shapfleet import ExplainSettings, explain
from shapfleet.errors import InvalidSettingsError
from shapfleet.workers.engine.rounds import MAX_GROWTH, MIN_GROWTH, Target, decide, first_budget

TRIANGLE = str(REPO / "examples" / "triangle.png")


def test_precision_is_the_largest_std_or_the_largest_relative_error():
    values = np.array([[1.0, -4.0], [0.5, 2.0]])
    std = np.array([[0.1, 0.2], [0.3, 0.1]])
    assert Target("std", 0.5).precision(values, std) == pytest.approx(0.3)
    assert Target("error", 0.5).precision(values, std) == pytest.approx(max(0.3 / 1.0, 0.2 / 4.0))
    assert Target("std", 1).precision(values, std * np.nan) == math.inf  # no error bars: never met
    assert Target("error", 0.1).precision(np.zeros((2, 1)), np.zeros((2, 1))) == 0.0  # an exactly null class
    assert Target("error", 0.1).precision(np.zeros((2, 1)), np.full((2, 1), 0.1)) == math.inf


def test_decisions_stop_on_target_exactness_or_cap_and_project_from_the_rate():
    target = Target("std", 0.01)
    assert decide([(300, 0.009)], target, 10_000, exact=False).stopped_because == "target"
    assert decide([(300, 0.5)], target, 10_000, exact=True).stopped_because == "exact"
    capped = decide([(300, 0.02), (1000, 0.015)], target, 1000, exact=False)
    assert capped.stopped_because == "cap" and capped.next_budget is None and capped.projected > 1000
    # error ~ n^-1/2: twice the target needs four times the budget (and a small margin)
    step = decide([(1000, 0.02)], target, 100_000, exact=False)
    assert step.stopped_because is None and 4000 <= step.next_budget <= 4400 and step.projected == 4000
    # a rate measured over two rounds replaces 1/2: here error ~ n^-1, so twice the target needs 2x
    fast = decide([(500, 0.04), (1000, 0.02)], target, 100_000, exact=False)
    assert 2000 <= fast.next_budget <= 2200
    # before two rounds, a fit that models the game (kriging, cubic) is assumed to improve as 1/n
    assert 2000 <= decide([(1000, 0.02)], target, 100_000, exact=False, initial_rate=1.0).next_budget <= 2200
    assert decide([(1000, 0.0101)], target, 100_000, exact=False).next_budget == math.ceil(MIN_GROWTH * 1000)
    assert decide([(1000, 5.0)], target, 10**9, exact=False).next_budget == MAX_GROWTH * 1000
    assert decide([(1000, 5.0)], target, 3000, exact=False).next_budget == 3000  # never past the cap
    assert first_budget(49, 100_000) == 256 and first_budget(196, 100_000) == 792 and first_budget(49, 100) == 100


def _settings(**changes) -> ExplainSettings:
    return ExplainSettings(**{**dict(segmenter="grid", grid="4x5", masker="constant:0", top_k=2), **changes})


def test_a_linear_model_meets_the_target_in_the_first_round():
    """A linear model's game is additive: the additive fit is exact at any budget, and its jackknife
    std is round-off, so the first round already meets any sensible target."""
    rng = np.random.default_rng(0)
    model = linear_model(rng.normal(size=(32, 32, 3, 3)) * 0.01, rng.normal(size=3), double=True)
    (run,) = explain([TRIANGLE], model, _settings(target_std=1e-6, estimator="linear"))
    extra = run.explanation.extra
    assert extra["rounds"] == 1 and extra["stopped_because"] == "target" and extra["target_met"] is True
    assert extra["achieved"] <= 1e-6 and run.explanation.n_coalitions == first_budget(20, 100_000)


@pytest.mark.parametrize("shards, estimator, target", [(1, "linear", 0.01), (3, "linear", 0.01), (2, "auto", 0.002)])
def test_a_target_run_equals_the_fixed_budget_run_it_stopped_at(shards, estimator, target):
    """Same seed: the values and standard errors of a target run are those of a fixed nsamples run
    of the coalitions it ended with, whatever the rounds and their parts (shards)."""
    model = conv_model(32, 32, seed=2)
    (run,) = explain([TRIANGLE], model, _settings(target_error=target, seed=5, estimator=estimator), shards=shards)
    e = run.explanation
    assert e.extra["stopped_because"] == "target" and e.extra["rounds"] >= 2 and e.extra["achieved"] <= target
    (fixed,) = explain([TRIANGLE], model, _settings(nsamples=e.n_coalitions, seed=5, estimator=estimator))
    np.testing.assert_allclose(e.values, fixed.explanation.values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(e.std, fixed.explanation.std, rtol=0, atol=1e-12)
    assert e.extra["estimator"] == fixed.explanation.extra["estimator"]
    # what it spent: at least the design's coalitions (raw pairs of sizes enumerated since are spent twice)
    assert e.n_coalitions + 1 <= e.n_evaluations <= 1.2 * (e.n_coalitions + 1)
    summary = e.summary()
    assert summary["target_error"] == target and summary["stopped_because"] == "target"


def test_the_cap_stops_a_run_that_cannot_meet_its_target(tmp_path):
    from shapfleet.workers.engine.result import Explanation

    model = conv_model(32, 32, seed=2)
    (run,) = explain([TRIANGLE], model, _settings(target_std=1e-9, nsamples=700), out_dir=tmp_path)
    e = run.explanation
    assert e.extra["stopped_because"] == "cap" and e.extra["target_met"] is False and e.n_coalitions == 700
    assert e.extra["achieved"] > 1e-9
    saved = Explanation.load((tmp_path / "attributions.npz").read_bytes())
    assert saved.extra["stopped_because"] == "cap" and saved.extra["target_std"] == 1e-9
    import json

    assert json.loads((tmp_path / "explanation.json").read_text())["summary"]["target_met"] is False


def test_a_cap_its_design_cannot_fill_still_stops_the_run():
    """Sampled pairs round down: nsamples=701 holds 700 coalitions. The run stops there with
    stopped_because cap, in the round steps (explain) and in memory (explain_array) alike, instead
    of asking again and again for the one coalition no design adds."""
    from PIL import Image

    from shapfleet.workers.engine.model import OnnxClassifier
    from shapfleet.workers.local import explain_array

    model = conv_model(32, 32, seed=2)
    settings = _settings(target_std=1e-9, nsamples=701)
    (run,) = explain([TRIANGLE], model, settings)
    pixels = np.asarray(Image.open(TRIANGLE).convert("RGB"), dtype=np.float32)
    alone = explain_array(pixels, OnnxClassifier(model, settings).predict, settings)
    for e in (run.explanation, alone):
        assert e.extra["stopped_because"] == "cap" and e.extra["cap"] == 701 and e.n_coalitions == 700


def test_a_small_game_is_enumerated_when_the_target_asks_for_it():
    model = conv_model(32, 32, seed=2)
    (run,) = explain([TRIANGLE], model, _settings(grid="2x4", target_std=1e-12))
    e = run.explanation
    assert e.exact and e.extra["stopped_because"] == "exact" and e.extra["target_met"] is True
    assert e.n_coalitions == 2 ** 8 - 2 and np.all(e.std == 0)


@pytest.mark.parametrize("settings, message", [
    (dict(method="partition", target_std=0.1), "method partition has no error bars"),
    (dict(target_std=0.1, target_error=0.1), "not both"),
    (dict(target_error=1.5), "below 1"),
    (dict(target_std=-1.0), "positive finite"),
    (dict(target_std=math.inf), "positive finite"),
])
def test_settings_a_target_run_cannot_honour_are_refused(settings, message):
    with pytest.raises(InvalidSettingsError, match=message):
        ExplainSettings(**settings)


def test_in_process_refusals_name_what_to_change():
    model = (REPO / "examples" / "shapes.onnx").read_bytes()
    with pytest.raises(InvalidSettingsError, match="workers applies to a fixed nsamples"):
        explain([TRIANGLE], model, _settings(target_std=0.1), workers=2)
    with pytest.raises(InvalidSettingsError, match="too small"):
        explain([TRIANGLE], model, _settings(target_std=0.1, nsamples=10))
    with pytest.raises(InvalidSettingsError, match="lower nsamples"):
        explain([TRIANGLE], model, _settings(target_std=0.1, estimator="kriging"))  # its default cap is too large


def test_the_cli_takes_target_flags_and_reports_how_the_run_ended(tmp_path, capsys):
    import json

    from shapfleet.api.cli import main

    code = main(["explain", TRIANGLE, "--model", str(REPO / "examples" / "shapes.onnx"), "--grid", "4x4",
                 "--segmenter", "grid", "--target-error", "0.05", "--nsamples", "5000", "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target_error"] == 0.05 and summary["stopped_because"] in ("target", "exact", "cap")
    assert summary["cap"] == 5000 and summary["rounds"] >= 1
    assert main(["explain", TRIANGLE, "--model", str(REPO / "examples" / "shapes.onnx"), "--method", "partition",
                 "--target-std", "0.1"]) == 1
    assert "method partition has no error bars" in capsys.readouterr().err


def test_the_engine_alone_honours_a_target_as_the_in_process_run_does():
    """explain_array (any predict callable, no runtime) runs the same rounds and ends the same."""
    from PIL import Image

    from shapfleet.workers.engine.model import OnnxClassifier
    from shapfleet.workers.local import explain_array

    model = conv_model(32, 32, seed=2)
    settings = _settings(target_error=0.01, estimator="linear", seed=1)
    (run,) = explain([TRIANGLE], model, settings)
    pixels = np.asarray(Image.open(TRIANGLE).convert("RGB"), dtype=np.float32)
    alone = explain_array(pixels, OnnxClassifier(model, settings).predict, settings, shards=2)
    np.testing.assert_allclose(alone.values, run.explanation.values, rtol=0, atol=1e-12)
    assert alone.n_coalitions == run.explanation.n_coalitions and alone.extra["rounds"] == run.explanation.extra["rounds"] >= 2
    assert alone.extra["stopped_because"] == "target"


def test_the_progress_bar_follows_the_projection_and_shows_the_precision():
    import io

    from shapfleet.workers.engine.progress import ProgressBar, precision_note

    bar = ProgressBar(1000, stream=io.StringIO())
    bar.update(1000)
    bar.retarget(4000, precision_note({"target_error": 0.02, "precision": 0.04}))
    assert bar.total == 4000 and "error 0.04 > 0.02" in bar.line() and "( 25.0%)" in bar.line()
    bar.retarget(10, precision_note({"target_std": 0.5, "precision": 0.25}))
    assert bar.total == 1000 and "std 0.25 <= 0.5" in bar.line()  # never below what is done
    assert precision_note({"target_std": 0.5, "precision": None}) == "std ? > 0.5"
