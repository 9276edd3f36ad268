"""Bad and hostile input against the running service (gunicorn API, a worker, Redis, SeaweedFS):
each case gets a 4xx problem+json that says what was wrong, nothing is half-created, and the
service keeps serving. Plus the security rules: keys and S3 credentials never leak."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import time
import zlib

import numpy as np
import pytest
import requests
from conftest import REPO
from onnx_models import expanding_model, nan_model, two_input_model, vector_input_model
from PIL import Image
from servers import ApiServer, WorkerProcess

from shapfleet.broker.settings import Limits, ServiceSettings

pytestmark = pytest.mark.service

MODEL = (REPO / "examples" / "shapes.onnx").read_bytes()
IMAGE = (REPO / "examples" / "triangle.png").read_bytes()
KEYS = {"alpha": "hostile-alpha-key", "beta": "hostile-beta-key"}


@pytest.fixture(scope="module")
def stack(redis_server, seaweed, tmp_path_factory):
    settings = ServiceSettings(
        redis_url=redis_server.url.replace("/0", "/3"), s3_endpoint=seaweed.endpoint, s3_access_key=seaweed.access_key,
        s3_secret_key=seaweed.secret_key, s3_bucket="hostile", ort_threads=1,
        api_keys=",".join(f"{k}:{t}" for t, k in KEYS.items()),
        limits=Limits(max_upload_bytes=3_000_000, max_image_pixels=1_000_000, max_nsamples=20_000))
    env = {**os.environ, **settings.environment()}
    logs = tmp_path_factory.mktemp("hostile")
    api = ApiServer.start(env, logs / "api.log")
    worker = WorkerProcess.start(env, logs / "worker.log")
    model_id = requests.post(f"{api.url}/v1/models", files={"model": ("m.onnx", MODEL)},
                             headers=auth()).json()["id"]
    yield {"url": api.url, "model_id": model_id, "logs": logs, "settings": settings}
    worker.stop()
    api.stop()


def auth(tenant: str = "alpha") -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's shape) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def external_data_model() -> bytes:
    from onnx import TensorProto, helper

    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[3])
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../etc/passwd")
    graph = helper.make_graph([helper.make_node("Mul", ["image", "W"], ["out"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 8, 3])], initializer=[weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def custom_op_model() -> bytes:
    """A model that needs an operator from a custom domain (a library onnxruntime would have to load)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Exploit", ["image"], ["out"], domain="com.example.custom")], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.example.custom", 1)]).SerializeToString()


def int_input_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.INT32, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.INT32, ["N", 3, 8, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def zero_input_model() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Identity", ["c"], ["out"])], "g", [],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
                              initializer=[numpy_helper.from_array(np.ones(2, np.float32), "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def model_upload(data: bytes):
    return lambda url, model_id: requests.post(f"{url}/v1/models", files={"model": ("m.onnx", data)}, headers=auth())


def job(settings=None, images=None, headers=None, tenant="alpha", model_id=None):
    def send(url, default_model):
        files = [("image", (f"i{n}.png", data)) for n, data in enumerate([IMAGE] if images is None else images)]
        form = {"model_id": model_id or default_model, "settings": json.dumps(settings or {"nsamples": 200})}
        return requests.post(f"{url}/v1/jobs", data=form, files=files, headers={**auth(tenant), **(headers or {})})
    return send


def noise_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def background_job(images: np.ndarray):
    """A ``dataset:`` job whose background set holds ``images`` (only its header is read at submission)."""
    def send(url, default_model):
        buffer = io.BytesIO()
        np.savez(buffer, images=images.astype(np.float32))
        form = {"model_id": default_model, "settings": json.dumps({"nsamples": 200, "masker": "dataset:bg.npz"})}
        files = [("image", ("i.png", IMAGE)), ("background", ("bg.npz", buffer.getvalue()))]
        return requests.post(f"{url}/v1/jobs", data=form, files=files, headers=auth())
    return send


CASES = {
    "corrupt ONNX": (model_upload(b"\x08\x07garbage-not-a-model"), 422, "not an ONNX model"),
    "external data path": (model_upload(external_data_model()), 422, "external data"),
    "zero inputs": (model_upload(zero_input_model()), 422, "0 inputs"),
    "two inputs": (model_upload(two_input_model(8, 8)), 422, "2 inputs"),
    "non-image input": (model_upload(vector_input_model()), 422, "image input"),
    "wrong input dtype": (model_upload(int_input_model()), 422, "INT32"),
    "custom operator": (model_upload(custom_op_model()), 422, "onnxruntime cannot load"),
    # constants that expand to gigabytes if folded: refused from their inferred shapes, nothing runs
    **{f"expanding constants ({op})": (model_upload(expanding_model(op)), 422, "bytes per tensor")
       for op in ("tile", "expand", "matmul", "constant_of_shape")},
    "oversized upload": (model_upload(b"\0" * 4_000_000), 413, "3000000 bytes"),
    "wrong content type": (lambda url, m: requests.post(f"{url}/v1/models", data=b"x",
                                                        headers={**auth(), "Content-Type": "text/csv"}), 415, "multipart"),
    "decompression bomb": (job(images=[png_header_only(60000, 60000)]), 422, "limit of 1000000"),
    "bomb under PIL's own guard": (job(images=[png_header_only(5000, 5000)]), 422, "the limit is 1000000"),
    "enormous dimensions": (job(images=[png_header_only(2 ** 31 - 1, 2 ** 31 - 1)]), 422, "image 0"),
    "truncated PNG": (job(images=[IMAGE[: len(IMAGE) // 2]]), 422, "image 0"),
    "0x0 image": (job(images=[png_header_only(0, 0)]), 422, "image 0"),
    "empty image": (job(images=[b""]), 422, "empty"),
    "image too big for the model": (job(images=[png(64, 40)]), 422, "the model takes 32x32"),
    "nsamples negative": (job({"nsamples": -3}), 422, "nsamples must be a positive integer"),
    "nsamples huge": (job({"nsamples": 10 ** 12}), 422, "the limit is 20000"),
    "nsamples a string": (job({"nsamples": "lots"}), 422, "nsamples must be an integer"),
    "n_segments zero": (job({"n_segments": 0}), 422, "n_segments"),
    "superpixels above the limit": (job({"n_segments": 5000}), 422, "5000 superpixels requested; the limit is 1000"),
    "unknown masker": (job({"masker": "gaussian"}), 422, "unknown masker"),
    "masker with shell characters": (job({"masker": "constant:1;rm -rf /"}), 422, "masker"),
    "masker with a path": (job({"masker": "image:../../etc/passwd"}), 422, "needs the reference image uploaded"),
    "labels out of range": (job({"labels": [5]}), 422, "out of range"),
    "top-k above class count": (job({"top_k": 9}), 422, "3 classes"),
    "unknown setting": (job({"exec": "true"}), 422, "unknown setting"),
    "malformed JSON": (lambda url, m: requests.post(f"{url}/v1/jobs", data=b"{nope", headers={**auth(), "Content-Type": "application/json"}),
                       400, "not valid JSON"),
    "bad base64 image": (lambda url, m: requests.post(f"{url}/v1/jobs", json={"model_id": m, "images": [{"data": "%%%"}]},
                                                      headers=auth()), 422, "base64"),
    "path traversal in artifact name": (lambda url, m: requests.get(f"{url}/v1/jobs/x/artifacts/..%2F..%2Fmodels%2Fx.onnx",
                                                                    headers=auth()), 404, ""),
    "missing API key": (lambda url, m: requests.get(f"{url}/v1/jobs"), 401, "API key"),
    "invalid API key": (lambda url, m: requests.get(f"{url}/v1/jobs", headers={"Authorization": "Bearer guess"}), 401, "API key"),
    "another tenant's model": (job(tenant="beta"), 404, "no model"),
    "unknown job": (lambda url, m: requests.get(f"{url}/v1/jobs/{'f' * 28}", headers=auth()), 404, "no such job"),
    "method not allowed": (lambda url, m: requests.put(f"{url}/v1/jobs", headers=auth()), 405, "PUT"),
    # sizes a request implies, checked before the work
    "resize to a huge image": (job({"resize": "100000x100000"}), 422, "the limit is 1000000"),
    "referenced images over the count": (lambda url, m: requests.post(
        f"{url}/v1/jobs", json={"model_id": m, "images": [{"image_id": "f" * 64}] * 500}, headers=auth()),
        422, "500 images; the limit is 16"),
    "too many classes": (job({"labels": list(range(101))}), 422, "101 classes to explain per image; the limit is 100"),
    "huge batches": (job({"batch_size": 10 ** 7}), 422, "batch_size=10000000; the limit is 1024"),
    "huge settings": (job({"class_names": ["x" * 70_000] * 3}), 413, "the limit is 65536"),
    # numbers that once reached a 500
    "cursor of nan": (lambda url, m: requests.get(f"{url}/v1/jobs", params={"cursor": base64.urlsafe_b64encode(b"nan")},
                                                  headers=auth()), 400, "invalid cursor"),
    "blur of inf": (job({"masker": "blur:inf,1"}), 422, "finite numbers"),
    "deeply nested JSON": (lambda url, m: requests.post(f"{url}/v1/jobs", data=b"[" * 100_000 + b"]" * 100_000,
                                                        headers={**auth(), "Content-Type": "application/json"}),
                           400, "nests JSON too deeply"),
    "negative seed": (job({"seed": -1}), 422, "seed must be an integer"),
    "quickshift kernel size 0": (job({"segmenter": "quickshift", "quickshift_kernel_size": 0}), 422, "must be in 1..10"),
    "quickshift kernel under scikit-image's 1": (job({"segmenter": "quickshift", "quickshift_kernel_size": 0.5}), 422,
                                                 "quickshift_kernel_size must be in 1..10 pixels, got 0.5"),
    "quickshift kernel whose window spans any image": (job({"segmenter": "quickshift", "quickshift_kernel_size": 1e6}),
                                                       422, "quickshift_kernel_size must be in 1..10 pixels"),
    "sigma whose smoothing kernel outgrows any image": (job({"sigma": 1e9}), 422, "sigma must be at most 32 pixels"),
    "mean of nan": (job({"mean": [float("nan")], "std": [1.0]}), 422, "finite"),
    "odd job id": (lambda url, m: requests.get(f"{url}/v1/jobs/abc:shards", headers=auth()), 404, "no such job"),
    # settings a worker would reject, refused at submission
    "felzenszwalb over the superpixel limit": (job({"segmenter": "felzenszwalb", "felzenszwalb_scale": 1,
                                                    "felzenszwalb_min_size": 1}, images=[noise_png(32, 32)]),
                                               422, "gives image 0 1024 superpixels; the limit is 1000"),
    "quickshift over the superpixel limit": (job({"segmenter": "quickshift", "quickshift_kernel_size": 1,
                                                  "quickshift_max_dist": 1}, images=[noise_png(32, 32)]),
                                             422, "superpixels; the limit is 1000"),
    "background set of another size than the image": (background_job(np.zeros((2, 16, 16, 3))), 422, "16x16"),
    "background set of 2 channels": (background_job(np.zeros((2, 32, 32, 2))), 422, "2 channels"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_clearly_and_nothing_is_half_created(stack, case):
    send, status, fragment = CASES[case]
    before = requests.get(f"{stack['url']}/v1/jobs", headers=auth()).json()["jobs"]
    response = send(stack["url"], stack["model_id"])
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and fragment in body["detail"], body
    assert requests.get(f"{stack['url']}/v1/jobs", headers=auth()).json()["jobs"] == before
    assert requests.get(f"{stack['url']}/healthz").status_code == 200


def test_replayed_idempotency_key_with_a_different_body(stack):
    url, model_id = stack["url"], stack["model_id"]
    first = job({"nsamples": 200}, headers={"Idempotency-Key": "replay-1"})(url, model_id)
    again = job({"nsamples": 300}, headers={"Idempotency-Key": "replay-1"})(url, model_id)
    assert first.status_code == 202 and again.status_code == 422 and "different request" in again.json()["detail"]


def test_model_returning_nan_or_inf_fails_the_job_with_that_reason(stack):
    from shapfleet.api.client import Client

    client = Client(stack["url"], KEYS["alpha"])
    final = client.wait(client.submit([IMAGE], model=nan_model(32, 32), settings={"segmenter": "grid", "grid": "4x4"})["id"],
                        timeout=60)
    assert final["status"] == "failed" and "NaN" in final["error"]["detail"]


def test_the_service_keeps_serving_and_nothing_leaks(stack):
    from shapfleet.api.client import Client

    client = Client(stack["url"], KEYS["alpha"])
    final = client.wait(client.submit([IMAGE], model_id=stack["model_id"], settings={"nsamples": 300})["id"], timeout=120)
    assert final["status"] == "succeeded"
    settings = stack["settings"]
    responses = json.dumps(final) + requests.get(f"{stack['url']}/openapi.json").text + \
        requests.get(f"{stack['url']}/metrics").text + requests.get(f"{stack['url']}/readyz").text
    logs = "".join(p.read_text(errors="replace") for p in stack["logs"].glob("*.log"))
    for secret in (*KEYS.values(), settings.s3_secret_key):
        assert secret not in responses and secret not in logs
    assert settings.s3_access_key not in logs  # presigned URLs name the access key by design; logs must not
    assert base64.b64encode(KEYS["alpha"].encode()).decode() not in logs
    assert "X-Amz-Expires=900" in final["results"][0]["presigned_url"]  # short by default


def test_a_model_upload_answers_the_same_whoever_stored_the_bytes_first(stack):
    """201 means new to this tenant: a tenant cannot learn that another uploaded the same model."""
    # MODEL: the bytes tenant alpha uploaded when the stack started
    first = requests.post(f"{stack['url']}/v1/models", files={"model": ("m.onnx", MODEL)}, headers=auth("beta"))
    again = requests.post(f"{stack['url']}/v1/models", files={"model": ("m.onnx", MODEL)}, headers=auth("beta"))
    assert (first.status_code, again.status_code) == (201, 200)


def test_any_class_name_renders_and_downloads(stack):
    """Class names are user data: TeX-looking and non-Latin names render and serve."""
    names = ["$x^2$ \\frac{a}{b}", "猫 кот", "triangle"]
    response = requests.post(f"{stack['url']}/v1/jobs", json={
        "model_id": stack["model_id"], "images": [{"data": base64.b64encode(IMAGE).decode()}],
        "settings": {"class_names": names, "all_classes": True, "nsamples": 150, "n_segments": 10}}, headers=auth())
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    for _ in range(600):
        job = requests.get(f"{stack['url']}/v1/jobs/{job_id}", headers=auth()).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded", job.get("error")
    for result in job["results"]:
        download = requests.get(result["url"], headers=auth())
        assert download.status_code == 200 and len(download.content) == result["size"], result["name"]
    assert any("猫" in r["name"] for r in job["results"])
