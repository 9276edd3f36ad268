"""No flag or setting is silently dropped: every engine flag of ``shapfleet explain`` given to
``shapfleet submit`` changes what the job is sent (its settings or its uploaded inputs) or is refused
before anything is uploaded; every ``ExplainSettings`` field given to the JSON API reaches the job's
settings or is refused with 422."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from shapfleet import ExplainSettings
from shapfleet.api import remote_commands
from shapfleet.api.cli import build_parser, main

#: A value other than the default for every option of `shapfleet explain`, as command-line words.
FLAG_VALUES = {
    "--segmenter": ["quickshift"], "--segments": ["{labels}"], "--n-segments": ["20"], "--compactness": ["5"],
    "--sigma": ["2"], "--grid": ["4x4"], "--kernel-size": ["3"], "--max-dist": ["5"], "--ratio": ["0.7"],
    "--scale": ["50"], "--min-size": ["20"], "--masker": ["constant:0"], "--labels": ["0,1"], "--top-k": ["2"],
    "--all-classes": [], "--class-names": ["{names}"], "--method": ["partition"], "--nsamples": ["500"],
    "--target-std": ["0.01"], "--target-error": ["0.05"],
    "--max-evals": ["300"], "--estimator": ["linear"], "--seed": ["3"], "--batch-size": ["16"],
    "--layout": ["nchw"], "--channel-order": ["bgr"], "--resize": ["64"], "--center-crop": ["32"],
    "--preprocess": ["raw"], "--mean": ["1"], "--std": ["2"], "--output": ["softmax"],
    # explain's own: where to write, and how to split the local run
    "--model": None, "--out": None, "--quiet": None, "--shards": ["2"], "--workers": ["2"], "--threads": ["2"],
}
#: Masker settings that name a file: the file must travel with the job.
FILE_MASKERS = {"dataset:{background}": "background", "image:{reference}": "reference"}


def _explain_options() -> set[str]:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return {o for a in commands.choices["explain"]._actions for o in a.option_strings if o not in ("-h", "--help")}


@pytest.fixture
def files(tmp_path):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((32, 32), np.int64))
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["circle", "square", "triangle"]))
    background = tmp_path / "bg.npz"
    np.savez(background, images=np.zeros((2, 32, 32, 3), np.uint8))
    reference = tmp_path / "ref.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(reference)
    return {"labels": str(labels), "names": str(names), "background": str(background), "reference": str(reference)}


@pytest.fixture
def sent(monkeypatch):
    """What `shapfleet submit` hands the client (nothing is sent anywhere)."""
    calls = []

    class RecordingClient:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, images, **kwargs):
            calls.append(kwargs)
            return {"id": "job", "status": "queued"}

    monkeypatch.setattr(remote_commands, "Client", RecordingClient)
    return calls


def _submit(words: list[str], files: dict) -> list[str]:
    image = str(REPO / "examples" / "triangle.png")
    return ["submit", image, "--model", str(REPO / "examples" / "shapes.onnx"), "--server", "http://127.0.0.1:9",
            *[w.format(**files) for w in words]]


def test_the_walk_covers_every_flag_of_explain():
    assert set(FLAG_VALUES) == _explain_options()


def test_every_engine_flag_reaches_the_job_or_is_refused_before_upload(files, sent, capsys):
    assert main(_submit([], files)) == 0
    baseline = sent.pop()
    assert baseline["segments"] is baseline["background"] is baseline["reference"] is None
    walked = {**{flag: words for flag, words in FLAG_VALUES.items() if words is not None},
              **{f"--masker={masker}": [] for masker in FILE_MASKERS},
              # flags refused alone must also reach the job where they are valid
              "--mean": ["1", "--std", "2"], "--max-evals": ["300", "--method", "partition"]}
    for flag, words in walked.items():
        code = main(_submit([flag, *words], files))
        err = capsys.readouterr().err
        if code != 0:
            assert code == 1 and err.startswith("shapfleet: error: ") and not sent, (flag, err)
            continue
        job = sent.pop()
        changed = {name for name in ("segments", "background", "reference") if job[name] is not None}
        changed |= {k for k, v in job["settings"].items() if baseline["settings"].get(k) != v}
        assert changed, f"{flag} {words} changed nothing the job is sent"
        if flag.startswith("--masker="):
            kind = next(v for k, v in FILE_MASKERS.items() if flag.endswith(k))
            assert job[kind] == files[kind], flag
    # explain's local-run flags are refused with what to do, not dropped
    for flag in ("--shards", "--workers", "--threads"):
        assert main(_submit([flag, "2"], files)) == 1
        assert "leave it out" in capsys.readouterr().err
    assert main(_submit(["--segments", files["labels"], "--method", "partition"], files)) == 1
    assert "applies to method kernel" in capsys.readouterr().err and not sent


#: A value other than the default for every ExplainSettings field.
SETTING_VALUES = {
    "method": "partition", "segmenter": "grid", "n_segments": 20, "compactness": 5.0, "sigma": 2.0, "grid": "4x4",
    "quickshift_kernel_size": 3.0, "quickshift_max_dist": 5.0, "quickshift_ratio": 0.7, "felzenszwalb_scale": 50.0,
    "felzenszwalb_min_size": 20, "masker": "constant:0", "labels": [0, 1], "top_k": 2, "all_classes": True,
    "nsamples": 500, "target_std": 0.01, "target_error": 0.05, "max_evals": 300, "seed": 3, "estimator": "linear", "batch_size": 16, "layout": "nchw",
    "channel_order": "bgr", "resize": "64", "center_crop": "32", "preprocess": "raw", "mean": [1.0], "std": [2.0],
    "output": "softmax", "class_names": ["circle", "square", "triangle"],
}


def test_the_settings_walk_covers_every_field():
    assert set(SETTING_VALUES) == {f.name for f in dataclasses.fields(ExplainSettings)}


@pytest.mark.service
def test_every_setting_reaches_the_job_through_the_json_api_or_is_refused(service_settings):
    import base64

    from shapfleet.api.app import create_app

    client = create_app(service_settings.replace(api_keys="k:t")).test_client()
    headers = {"Authorization": "Bearer k"}
    model_id = client.post("/v1/models", data=(REPO / "examples" / "shapes.onnx").read_bytes(), headers=headers,
                           content_type="application/octet-stream").get_json()["id"]
    image = base64.b64encode((REPO / "examples" / "triangle.png").read_bytes()).decode()
    default = ExplainSettings().to_dict()
    for name, value in SETTING_VALUES.items():
        settings = {name: value}
        if name == "mean":
            settings["std"] = [2.0]
        if name == "max_evals":
            settings["method"] = "partition"
        response = client.post("/v1/jobs", json={"model_id": model_id, "images": [{"data": image}], "settings": settings},
                               headers=headers)
        if response.status_code == 422:
            assert response.mimetype == "application/problem+json" and response.get_json()["detail"], name
            continue
        assert response.status_code == 202, (name, response.get_json())
        stored = response.get_json()["settings"]
        got = stored[name]
        assert got != default[name] and (got == value or list(got) == list(value)), (name, got)
