"""The whole service over real HTTP: gunicorn API, Celery workers, Redis, SeaweedFS; and ``shapfleet up``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from servers import ApiServer, wait_until
from test_pipeline import in_process

from shapfleet import ExplainSettings, Explanation
from shapfleet.api.client import ApiError, Client
from shapfleet.api.stack import StackError

pytestmark = pytest.mark.service

WALKTHROUGH_SUBMIT = ("shapfleet submit examples/triangle.png --model examples/shapes.onnx "
                      "--class-names examples/class_names.json --n-segments 30 --top-k 2 --nsamples 1000 "
                      "--wait --out out/service")


@pytest.fixture
def api_server(service_settings, tmp_path):
    settings = service_settings.replace(api_keys="e2e-key:team")
    server = ApiServer.start({**os.environ, **settings.environment()}, tmp_path / "api.log")
    yield server
    server.stop()


def test_submit_poll_download_through_api_and_presigned_urls(api_server, start_workers, tmp_path):
    start_workers(2)
    client = Client(api_server.url, "e2e-key")
    settings = ExplainSettings(n_segments=30, top_k=2, nsamples=800, seed=5)
    model = client.upload_model(REPO / "examples" / "shapes.onnx")
    job = client.submit([REPO / "examples" / "square.png"], model_id=model["id"], settings=settings.to_dict())
    seen = []
    final = client.wait(job["id"], timeout=120, on_progress=lambda j: seen.append(j["progress"]["evaluations_done"]))
    assert final["status"] == "succeeded", final["error"]
    assert seen == sorted(seen) and final["progress"]["fraction"] == 1.0
    paths = client.download(job["id"], tmp_path / "via-api")
    assert {p.name for p in paths} >= {"attributions.npz", "summary.png", "image.png", "explanation.json"} and len(paths) == 6
    for result in final["results"]:  # the viewer files are byte ranges of one object, served by the API only
        if result["name"] != "attributions.npz":
            assert result["presigned_url"] is None
            if result["name"].endswith(".png"):
                with Image.open(tmp_path / "via-api" / result["name"]) as page:
                    assert page.format == "PNG" and (page.size[0] > 200 or result["name"] == "image.png")
            continue
        with urllib.request.urlopen(result["presigned_url"], timeout=10) as response:
            assert response.read() == (tmp_path / "via-api" / result["name"]).read_bytes()
    fleet = Explanation.load(tmp_path / "via-api" / "attributions.npz")
    local = in_process(settings, image=(REPO / "examples" / "square.png").read_bytes())
    np.testing.assert_allclose(fleet.values, local.values, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fleet.std, local.std, rtol=0, atol=1e-10)
    with Image.open(tmp_path / "via-api" / "summary.png") as summary:
        assert summary.format == "PNG"
    with pytest.raises(ApiError) as missing:
        client.get("0" * 28)
    assert missing.value.status == 404 and missing.value.problem["status"] == 404


def test_readme_walkthrough_with_shapfleet_up(tmp_path):
    """Start `shapfleet up`, run the README's submit command, stop it, and find no process left."""
    readme = (REPO / "README.md").read_text()
    assert WALKTHROUGH_SUBMIT in readme and "shapfleet up" in readme and "source .shapfleet/env" in readme
    shapfleet = str(Path(sys.executable).parent / "shapfleet")
    state = tmp_path / "stack"
    up = subprocess.Popen([shapfleet, "up", "--workers", "2", "--dir", str(state)], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up_ready() -> bool:
            if up.poll() is not None:
                raise StackError(f"shapfleet up exited with {up.returncode}:\n{up.stdout.read().decode()}")
            return (state / "env").exists()

        wait_until(up_ready, 180, "shapfleet up")
        env = dict(os.environ)
        for line in (state / "env").read_text().splitlines():
            name, value = line.removeprefix("export ").split("=", 1)
            env[name] = value
        work = tmp_path / "work"
        work.mkdir()
        os.symlink(REPO / "examples", work / "examples")
        result = subprocess.run([shapfleet, *WALKTHROUGH_SUBMIT.split()[1:]], cwd=work, env=env,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr
        assert '"status": "succeeded"' in result.stdout and "evaluations" in result.stderr
        names = sorted(p.name for p in (work / "out" / "service").iterdir())
        assert names == ["attributions.npz", "class-0-circle.png", "class-2-triangle.png", "explanation.json", "image.png",
                         "summary.png"]
        children = _descendants(up.pid)
        assert len(children) >= 5  # redis, weed, gunicorn, two workers (and their pools)
    finally:
        os.kill(up.pid, signal.SIGTERM)
        output = up.communicate(timeout=60)[0].decode()
    assert up.returncode == 0, output
    time.sleep(0.5)
    left = [pid for pid in children if _alive(pid)]
    assert left == [], f"processes left behind: {left}"


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        out = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True).stdout
        children = [int(p) for p in out.split()]
        found += children
        frontier += children
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_submit_with_segments_and_an_image_masker_equals_explain(api_server, start_workers, tmp_path, capsys):
    """`shapfleet submit --segments labels.npy --masker image:ref.png` uploads both with the job and
    gets what `shapfleet explain` gets with the same flags."""
    from shapfleet.api.cli import main

    start_workers(1)
    image = REPO / "examples" / "circle.png"
    height, width = np.asarray(Image.open(image)).shape[:2]
    rows, cols = np.mgrid[:height, :width]
    np.save(tmp_path / "labels.npy", (rows * 2 // height) * 3 + cols * 3 // width)  # 2 x 3 blocks
    Image.fromarray(np.full((height, width, 3), 255, np.uint8)).save(tmp_path / "white.png")
    flags = ["--segments", str(tmp_path / "labels.npy"), "--masker", f"image:{tmp_path / 'white.png'}",
             "--nsamples", "300", "--seed", "4", "--top-k", "2"]
    code = main(["submit", str(image), "--model", str(REPO / "examples" / "shapes.onnx"), *flags, "--wait", "--quiet",
                 "--out", str(tmp_path / "fleet"), "--server", api_server.url, "--api-key", "e2e-key"])
    assert code == 0, capsys.readouterr().err
    assert main(["explain", str(image), "--model", str(REPO / "examples" / "shapes.onnx"), *flags, "--quiet",
                 "--out", str(tmp_path / "local")]) == 0
    fleet = Explanation.load(tmp_path / "fleet" / "attributions.npz")
    local = Explanation.load(tmp_path / "local" / "attributions.npz")
    assert fleet.values.shape == (6, 2) and fleet.exact
    np.testing.assert_allclose(fleet.values, local.values, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fleet.base_values, local.base_values, rtol=0, atol=1e-12)
