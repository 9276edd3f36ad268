"""``shapfleet explain``: outputs on disk, the JSON summary, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from onnx_models import conv_model, nan_model, two_input_model, vector_input_model
from PIL import Image

from shapfleet import ExplainSettings, Explanation, explain
from shapfleet.api.cli import main

EXAMPLE_MODEL = REPO / "examples" / "shapes.onnx"
EXAMPLE_IMAGE = REPO / "examples" / "triangle.png"
EXAMPLE_NAMES = REPO / "examples" / "class_names.json"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_writes_npz_pngs_and_a_json_summary(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        capsys, "explain", str(EXAMPLE_IMAGE), "--model", str(EXAMPLE_MODEL), "--out", str(out),
        "--class-names", str(EXAMPLE_NAMES), "--n-segments", "30", "--top-k", "2", "--nsamples", "500", "--seed", "4")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert [c["name"] for c in summary["classes"]][0] == "triangle"
    assert summary["evaluations"] == 502 and summary["additivity_residual"] < 1e-8
    assert "wall_seconds" in summary and summary["classes"][0]["most_positive"]
    assert "evaluations" in stderr and "502/502" in stderr  # the progress bar's final line
    assert sorted(p.name for p in out.iterdir()) == ["attributions.npz", "class-0-circle.png", "class-2-triangle.png",
                                                     "explanation.json", "image.png", "summary.png"]
    document = json.loads((out / "explanation.json").read_text())
    assert len(document["segments"]) == 32 and len(document["values"][0]) == 2 and document["class_names"] == ["triangle", "circle"]
    for png in out.glob("*.png"):
        with Image.open(png) as picture:
            assert picture.format == "PNG"
            assert picture.size == (32, 32) if png.name == "image.png" else picture.size[0] > 100
    data = np.load(out / "attributions.npz")
    m = int(data["segments"].max()) + 1
    assert data["values"].shape == data["std"].shape == (m, 2)
    assert data["pixel_values"].shape == (32, 32, 2)
    assert list(data["classes"]) == [2, 0] and list(data["class_names"]) == ["triangle", "circle"]
    assert int(data["seed"]) == 4 and int(data["n_evaluations"]) == 502
    assert json.loads(str(data["settings"]))["n_segments"] == 30
    np.testing.assert_allclose(data["values"].sum(axis=0), data["outputs"] - data["base_values"], atol=1e-10)
    loaded = Explanation.load(out / "attributions.npz")
    np.testing.assert_array_equal(loaded.pixel_values, data["pixel_values"])


def test_several_images_each_get_a_folder_and_the_python_api_writes_nothing(tmp_path, capsys):
    code, stdout, stderr = run_cli(
        capsys, "explain", str(EXAMPLE_IMAGE), str(REPO / "examples" / "circle.png"), "--model", str(EXAMPLE_MODEL),
        "--out", str(tmp_path), "--segmenter", "grid", "--grid", "4x4", "--nsamples", "300", "--quiet")
    assert code == 0, stderr
    summaries = json.loads(stdout)
    assert len(summaries) == 2 and stderr == ""
    assert (tmp_path / "0-triangle" / "attributions.npz").exists() and (tmp_path / "1-circle" / "summary.png").exists()
    runs = explain([str(EXAMPLE_IMAGE)], str(EXAMPLE_MODEL))
    assert runs[0].out_dir is None and runs[0].artifacts == {}
    assert runs[0].explanation.values.shape[1] == 1  # top-1 by default


def test_local_process_pool_gives_the_single_process_answer(tmp_path, capsys):
    common = [str(EXAMPLE_IMAGE), "--model", str(EXAMPLE_MODEL), "--n-segments", "40", "--nsamples", "1200",
              "--all-classes", "--quiet", "--seed", "2"]
    assert run_cli(capsys, "explain", *common, "--out", str(tmp_path / "one"))[0] == 0
    assert run_cli(capsys, "explain", *common, "--out", str(tmp_path / "two"), "--workers", "2", "--shards", "5")[0] == 0
    one = np.load(tmp_path / "one" / "attributions.npz")
    two = np.load(tmp_path / "two" / "attributions.npz")
    np.testing.assert_allclose(two["values"], one["values"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(two["std"], one["std"], rtol=0, atol=1e-10)


def _image(tmp_path, size=(12, 12)) -> str:
    """A noisy image: on a flat one every superpixel equals the mean masker's fill, so none could
    change the model's input and no nsamples would be too small."""
    path = tmp_path / f"img-{size[0]}x{size[1]}.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("not_onnx", "not an ONNX model"),
    ("two_inputs", "has 2 inputs"),
    ("vector_input", "image input is"),
    ("does_not_fit", "but the model takes 12x12; pass --resize 12x12"),
    ("unreadable_image", "cannot read"),
    ("missing_image", "no such image file"),
    ("n_segments_zero", "n_segments must be a positive integer"),
    ("nsamples_too_small", "too small to solve"),
    ("labels_out_of_range", "out of range: the model has 3 classes"),
    ("top_k_too_large", "exceeds the model's 3 classes"),
    ("nan_model", "returned NaN"),
    ("bad_masker", "unknown masker"),
    ("missing_model", "cannot read the model file"),
    ("no_threads", "--threads must be a whole number in 1..256, got 0"),
    ("too_many_threads", "--threads must be a whole number in 1..256, got 100000"),
])
def test_bad_input_gives_a_message_and_a_non_zero_exit(tmp_path, capsys, write_file, case, expected):
    model = write_file("m.onnx", conv_model(12, 12))
    image = _image(tmp_path)
    args = {
        "not_onnx": ["explain", image, "--model", write_file("x.onnx", b"this is not a model")],
        "two_inputs": ["explain", image, "--model", write_file("two.onnx", two_input_model(12, 12))],
        "vector_input": ["explain", image, "--model", write_file("vec.onnx", vector_input_model())],
        "does_not_fit": ["explain", _image(tmp_path, (20, 16)), "--model", model],
        "unreadable_image": ["explain", write_file("broken.png", b"\x89PNG\r\n\x1a\nbroken"), "--model", model],
        "missing_image": ["explain", str(tmp_path / "nope.png"), "--model", model],
        "n_segments_zero": ["explain", image, "--model", model, "--n-segments", "0"],
        "nsamples_too_small": ["explain", image, "--model", model, "--segmenter", "grid", "--grid", "6x6", "--nsamples", "10"],
        "labels_out_of_range": ["explain", image, "--model", model, "--labels", "0,7"],
        "top_k_too_large": ["explain", image, "--model", model, "--top-k", "4"],
        "nan_model": ["explain", image, "--model", write_file("nan.onnx", nan_model(12, 12))],
        "bad_masker": ["explain", image, "--model", model, "--masker", "$(rm -rf /)"],
        "missing_model": ["explain", image, "--model", str(tmp_path / "absent.onnx")],
        "no_threads": ["explain", image, "--model", model, "--threads", "0"],
        "too_many_threads": ["explain", image, "--model", model, "--threads", "100000"],
    }[case]
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 1
    assert stderr.startswith("shapfleet: error: ") and expected in stderr, stderr
    assert "Traceback" not in stderr and stdout == ""


def test_the_installed_command_exits_cleanly_on_bad_input(tmp_path, write_file):
    """Through a real process: a message on stderr, exit status 1, no traceback."""
    result = subprocess.run([sys.executable, "-m", "shapfleet.api.cli", "explain", _image(tmp_path), "--model",
                             write_file("x.onnx", b"garbage")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert "not an ONNX model" in result.stderr and "Traceback" not in result.stderr


def test_the_readme_example_makes_sense_by_eye(tmp_path, capsys):
    """`examples/run-example.sh`'s own command: the predicted class's top superpixels lie on the drawn
    shape (the top one mostly inside it, the other two touching it), and the fully masked image is not
    the predicted class to the model, so the shape earns the credit."""
    import shlex

    script = (REPO / "examples" / "run-example.sh").read_text().replace("\\\n", " ")
    command = next(line for line in script.splitlines() if "shapfleet explain" in line)
    words = shlex.split(command.split("shapfleet explain", 1)[1])
    words = words[:words.index("--out")]
    code, stdout, stderr = run_cli(capsys, "explain", *[str(REPO / w) if w.startswith("examples/") else w for w in words],
                                   "--out", str(tmp_path), "--quiet")
    assert code == 0, stderr
    explanation = Explanation.load(tmp_path / "attributions.npz")
    image = explanation.image
    drawn = np.abs(image - np.median(image.reshape(-1, 3), axis=0)).sum(axis=2) > 120  # the shape's pixels
    assert 0.05 < drawn.mean() < 0.5
    top = np.argsort(-explanation.values[:, 0])[:3]
    inside = [float(drawn[explanation.segments == s].mean()) for s in top]
    assert inside[0] > 0.5 and all(f > 0 for f in inside), inside
    assert explanation.outputs[0] > 0.9 and explanation.base_values[0] < 1 / 3


def test_pictures_are_drawn_as_arrays_in_image_plots_convention(tmp_path):
    """Red where a superpixel pushes the class up, blue where it pushes it down, the greyscale image
    faintly under near-zero values; the same inputs give the same bytes; no plotting library loads."""
    import io

    from shapfleet.workers.engine import rendering

    settings = ExplainSettings(segmenter="grid", grid="2x2", all_classes=True, nsamples=100, seed=1,
                               class_names=("circle", "square", "triangle"))
    (run,) = explain([str(EXAMPLE_IMAGE)], EXAMPLE_MODEL, settings)
    e = run.explanation
    rgb = rendering.attribution_rgb(e.image, e.pixel_values[:, :, 0], float(np.abs(e.values[:, 0]).max()))
    strongest, weakest = int(np.argmax(e.values[:, 0])), int(np.argmin(e.values[:, 0]))
    up, down = rgb[e.segments == strongest].mean(axis=0), rgb[e.segments == weakest].mean(axis=0)
    assert up[0] > up[2] and e.values[strongest, 0] > 0  # red
    if e.values[weakest, 0] < 0:
        assert down[2] > down[0]  # blue
    quiet = rendering.attribution_rgb(e.image, np.zeros(e.segments.shape), 1.0)
    assert quiet.min() >= int(255 * 0.85) - 1  # grey image at alpha 0.15 over white
    first, again = rendering.render_artifacts(e), rendering.render_artifacts(e)
    assert first == again
    with Image.open(io.BytesIO(first["summary.png"])) as summary:
        assert summary.size[0] > 4 * 200 and summary.mode == "RGB"  # image + 3 classes, upscaled
    # the pages' own PNG writer: what a decoder reads back is the array, pixel for pixel
    pixels = np.random.default_rng(0).integers(0, 256, (37, 23, 3), dtype=np.uint8)
    pixels[10:20] = pixels[10]  # repeated rows, as upscaled panels have
    with Image.open(io.BytesIO(rendering.png_bytes(pixels))) as decoded:
        assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), pixels)
    probe = subprocess.run([sys.executable, "-c", "import sys; from shapfleet.workers.engine import rendering; "
                            "print('matplotlib' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", probe.stderr
