"""The HTTP API through Flask's test client: validation, auth, tenants, idempotency, pagination, problems."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from conftest import REPO
from onnx_models import conv_model, two_input_model, vector_input_model
from PIL import Image

from shapfleet.api.app import create_app
from shapfleet.broker.records import JobStatus

pytestmark = pytest.mark.service

MODEL = (REPO / "examples" / "shapes.onnx").read_bytes()
IMAGE = (REPO / "examples" / "triangle.png").read_bytes()
KEYS = {"alpha": "key-alpha-123", "beta": "key-beta-456"}


@pytest.fixture
def app(service_settings):
    from shapfleet.broker.settings import Limits

    settings = service_settings.replace(api_keys=",".join(f"{k}:{t}" for t, k in KEYS.items()),
                                        limits=Limits(max_superpixels=1500, max_nsamples=50_000))
    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


def auth(tenant: str = "alpha") -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def png(width: int, height: int, value: int = 120) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client, data: bytes = MODEL, tenant: str = "alpha"):
    return client.post("/v1/models", data={"model": (io.BytesIO(data), "m.onnx")}, headers=auth(tenant),
                       content_type="multipart/form-data")


def submit(client, model_id: str, images=(IMAGE,), settings=None, tenant="alpha", headers=None):
    data = {"model_id": model_id, "settings": json.dumps(settings or {"nsamples": 200}),
            "image": [(io.BytesIO(i), f"i{n}.png") for n, i in enumerate(images)]}
    return client.post("/v1/jobs", data=data, headers={**auth(tenant), **(headers or {})}, content_type="multipart/form-data")


def assert_problem(response, status: int, fragment: str = ""):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert {"type", "title", "status", "detail"} <= set(body) and body["status"] == status
    assert fragment in body["detail"], body["detail"]
    return body


def test_upload_model_is_content_addressed(client):
    first = upload(client)
    assert first.status_code == 201
    body = first.get_json()
    assert body["id"] == body["sha256"] and body["channels"] == 3 and body["height"] == 32 and body["n_classes"] == 3
    again = client.post("/v1/models", data=MODEL, headers={**auth(), "Content-Type": "application/octet-stream"})
    assert again.status_code == 200 and again.get_json()["id"] == body["id"]
    assert client.get(f"/v1/models/{body['id']}", headers=auth()).status_code == 200


def test_submit_poll_and_list(client):
    model_id = upload(client).get_json()["id"]
    response = submit(client, model_id, settings={"nsamples": 300, "top_k": 2, "seed": 3})
    assert response.status_code == 202
    job = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}" and response.headers["Retry-After"] == "1"
    assert job["status"] == "queued" and job["settings"]["top_k"] == 2 and job["images"] == 1
    assert job["created_at"].endswith("Z") and job["progress"]["evaluations_total"] == 0
    polled = client.get(f"/v1/jobs/{job['id']}", headers=auth())
    assert polled.status_code == 200 and polled.get_json()["id"] == job["id"] and "Retry-After" in polled.headers
    listed = client.get("/v1/jobs", headers=auth()).get_json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]] and listed["next_cursor"] is None


def test_json_submission_with_base64_and_uploaded_image_references(client):
    model_id = upload(client).get_json()["id"]
    image_id = client.post("/v1/images", data=IMAGE, headers={**auth(), "Content-Type": "image/png"}).get_json()["id"]
    body = {"model_id": model_id, "images": [{"image_id": image_id}, {"data": base64.b64encode(IMAGE).decode()}],
            "settings": {"segmenter": "grid", "grid": "4x4"}}
    response = client.post("/v1/jobs", json=body, headers=auth())
    assert response.status_code == 202 and response.get_json()["images"] == 2
    other = client.post("/v1/jobs", json={**body, "images": [{"image_id": image_id}]}, headers=auth("beta"))
    assert_problem(other, 404)  # beta cannot reference alpha's model or image


def test_pagination_newest_first(client):
    model_id = upload(client).get_json()["id"]
    ids = [submit(client, model_id).get_json()["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        page = client.get("/v1/jobs", query_string={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=auth()).get_json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert_problem(client.get("/v1/jobs?limit=0", headers=auth()), 400, "limit")
    assert_problem(client.get("/v1/jobs?cursor=%%%", headers=auth()), 400, "cursor")


def test_tenant_isolation_is_404_not_403(client):
    model_id = upload(client, tenant="alpha").get_json()["id"]
    job_id = submit(client, model_id).get_json()["id"]
    assert_problem(client.get(f"/v1/jobs/{job_id}", headers=auth("beta")), 404)
    assert_problem(client.post(f"/v1/jobs/{job_id}/cancel", headers=auth("beta")), 404)
    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts/attributions.npz", headers=auth("beta")), 404)
    assert_problem(client.get(f"/v1/models/{model_id}", headers=auth("beta")), 404)
    assert_problem(submit(client, model_id, tenant="beta"), 404, "no model")
    assert client.get("/v1/jobs", headers=auth("beta")).get_json()["jobs"] == []


def test_auth_is_required_and_keys_never_echoed(client):
    assert_problem(client.get("/v1/jobs"), 401)
    bad = client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert_problem(bad, 401) and bad.headers["WWW-Authenticate"].startswith("Bearer")
    assert_problem(client.get("/v1/jobs", headers={"Authorization": KEYS["alpha"]}), 401)  # not Bearer
    assert KEYS["alpha"] not in client.get("/v1/jobs", headers=auth()).get_data(as_text=True)
    assert client.get("/healthz").status_code == 200


def test_auth_disabled_must_be_explicit(service_settings):
    with pytest.raises(ValueError, match="no API keys configured"):
        create_app(service_settings)
    dev = create_app(service_settings.replace(auth_disabled=True)).test_client()
    assert dev.get("/v1/jobs").status_code == 200


def test_idempotency_key(client):
    model_id = upload(client).get_json()["id"]
    first = submit(client, model_id, headers={"Idempotency-Key": "abc"})
    again = submit(client, model_id, headers={"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    assert len(client.get("/v1/jobs", headers=auth()).get_json()["jobs"]) == 1
    different = submit(client, model_id, settings={"nsamples": 999}, headers={"Idempotency-Key": "abc"})
    assert_problem(different, 422, "different request")
    # Keys are per tenant: the same key from another tenant is a different request.
    beta_model = upload(client, tenant="beta").get_json()["id"]
    assert submit(client, beta_model, tenant="beta", headers={"Idempotency-Key": "abc"}).status_code == 202


def test_cancel(client, services):
    model_id = upload(client).get_json()["id"]
    job_id = submit(client, model_id).get_json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth())
    assert response.status_code == 202 and response.get_json()["status"] == "canceled"
    assert services.jobs.get(job_id).status == JobStatus.CANCELED
    assert_problem(client.post(f"/v1/jobs/{job_id}/cancel", headers=auth()), 409, "already canceled")


@pytest.mark.parametrize("case, status, fragment", [
    ("corrupt_onnx", 422, "not an ONNX model"),
    ("two_inputs", 422, "has 2 inputs"),
    ("vector_input", 422, "image input"),
    ("empty_model", 422, "empty"),
    ("wrong_content_type", 415, "multipart/form-data"),
])
def test_bad_models(client, case, status, fragment):
    data = {"corrupt_onnx": b"\x08\x01garbage", "two_inputs": two_input_model(8, 8), "vector_input": vector_input_model(),
            "empty_model": b""}.get(case)
    if case == "wrong_content_type":
        response = client.post("/v1/models", data="x", headers={**auth(), "Content-Type": "text/plain"})
    else:
        response = upload(client, data)
    assert_problem(response, status, fragment)


def test_external_data_model_is_refused(client):
    from onnx import TensorProto, helper

    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[3])
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../etc/passwd")
    node = helper.make_node("Mul", ["image", "W"], ["out"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 8, 3])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert_problem(upload(client, model.SerializeToString()), 422, "external data")


@pytest.mark.parametrize("settings, images, status, fragment", [
    ({"nsamples": -5}, None, 422, "nsamples must be a positive integer"),
    ({"nsamples": 10 ** 9}, None, 422, "nsamples=1000000000; the limit is 50000"),
    ({"nsamples": "many"}, None, 422, "nsamples must be an integer"),
    ({"n_segments": 0}, None, 422, "n_segments"),
    ({"n_segments": 2000}, None, 422, "2000 superpixels requested; the limit is 1500"),
    ({"n_segments": 1200}, None, 422, "exceeds image 0's 1024 pixels"),
    ({"masker": "nonsense"}, None, 422, "unknown masker"),
    ({"masker": "image:../../etc/passwd"}, None, 422, "needs the reference image uploaded"),  # never read
    ({"masker": "constant:1;rm -rf /"}, None, 422, "constant takes comma-separated numbers"),
    ({"labels": [0, 7]}, None, 422, "out of range"),
    ({"top_k": 4}, None, 422, "exceeds the model's 3 classes"),
    ({"bogus": 1}, None, 422, "unknown setting"),
    ({}, [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"], 422, "image 0"),
    ({}, ["big"], 422, "the model takes 32x32"),
    ({}, ["zero"], 422, "image 0"),
    ({}, [], 422, "at least one image"),
])
def test_bad_job_requests(client, services, settings, images, status, fragment):
    model_id = upload(client).get_json()["id"]
    payloads = {"big": png(64, 48), "zero": b""}
    images = [IMAGE] if images is None else [payloads.get(i, i) if isinstance(i, str) else i for i in images]
    before = services.store.list("jobs/")
    response = submit(client, model_id, images=images, settings=settings)
    assert_problem(response, status, fragment)
    assert services.store.list("jobs/") == before  # nothing stored, nothing enqueued
    assert client.get("/v1/jobs", headers=auth()).get_json()["jobs"] == []


def test_malformed_bodies(client):
    model_id = upload(client).get_json()["id"]
    assert_problem(client.post("/v1/jobs", data="{not json", headers={**auth(), "Content-Type": "application/json"}), 400, "not valid JSON")
    assert_problem(client.post("/v1/jobs", data="x", headers={**auth(), "Content-Type": "text/plain"}), 415)
    assert_problem(client.post("/v1/jobs", json={"model_id": model_id, "images": "x"}, headers=auth()), 422, "images must be")
    assert_problem(client.post("/v1/jobs", json={"model_id": model_id, "images": [{"data": "***"}]}, headers=auth()), 422, "base64")
    assert_problem(client.post("/v1/jobs", json={"images": []}, headers=auth()), 422, "model_id")
    form = {"model_id": model_id, "settings": "{oops", "image": [(io.BytesIO(IMAGE), "a.png")]}
    assert_problem(client.post("/v1/jobs", data=form, headers=auth(), content_type="multipart/form-data"), 400, "settings")


def test_flask_errors_are_problems_too(service_settings):
    small = create_app(service_settings.replace(api_keys="k:t", limits=service_settings.limits.__class__(max_upload_bytes=1000)))
    client = small.test_client()
    assert_problem(client.post("/v1/models", data=b"x" * 5000, headers={"Authorization": "Bearer k",
                                                                      "Content-Type": "application/octet-stream"}), 413, "1000 bytes")
    assert_problem(client.get("/v1/nothing", headers={"Authorization": "Bearer k"}), 404)
    response = client.delete("/v1/jobs", headers={"Authorization": "Bearer k"})
    assert_problem(response, 405) and "GET" in response.headers["Allow"]


def test_artifact_names_cannot_traverse(client):
    model_id = upload(client).get_json()["id"]
    job_id = submit(client, model_id).get_json()["id"]
    for name in ("../../models/x.onnx", "..%2F..%2Fmodels", "attributions.npz"):
        assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=auth()), 404)


def test_health_readiness_metrics(client, service_settings):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"] == {"redis": "ok", "store": "ok"}
    model_id = upload(client).get_json()["id"]
    submit(client, model_id)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'shapfleet_jobs{status="queued"} 1' in text
    assert 'shapfleet_queue_length{queue="plan"} 1' in text and "shapfleet_shard_seconds_count" in text
    broken = create_app(service_settings.replace(api_keys="k:t", redis_url="redis://127.0.0.1:1/0")).test_client()
    body = assert_problem(broken.get("/readyz"), 503, "redis")
    assert body["checks"]["store"] == "ok"


def test_openapi_document_is_valid_and_covers_every_route(app, client):
    from openapi_spec_validator import validate

    document = client.get("/openapi.json").get_json()
    validate(document)
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<path:", "{").replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in documented, (path, method)


def test_inline_model_submission(client):
    model = conv_model(32, 32)
    data = {"model": (io.BytesIO(model), "m.onnx"), "settings": json.dumps({"segmenter": "grid", "grid": "4x4"}),
            "image": [(io.BytesIO(IMAGE), "a.png")]}
    response = client.post("/v1/jobs", data=data, headers=auth(), content_type="multipart/form-data")
    assert response.status_code == 202
    assert client.get(f"/v1/models/{response.get_json()['model_id']}", headers=auth()).status_code == 200


def test_keys_file_in_both_formats(service_settings, tmp_path):
    lines = tmp_path / "keys.txt"
    lines.write_text("# tenant key\nteam-a secret-a\nteam-b secret-b\n")
    as_json = tmp_path / "keys.json"
    as_json.write_text('{"secret-c": "team-c"}')
    for path, key in ((lines, "secret-b"), (as_json, "secret-c")):
        client = create_app(service_settings.replace(api_keys_file=str(path))).test_client()
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert_problem(client.get("/v1/jobs", headers={"Authorization": "Bearer secret-x"}), 401)


def test_a_broker_outage_at_submit_is_a_503_and_the_job_is_failed_not_lost(service_settings):
    """The record is written before the plan task is enqueued; when enqueueing fails the job is
    failed at once (no job stays queued forever) and the client gets 503 with Retry-After."""
    from shapfleet.broker.services import Services

    broken = service_settings.replace(api_keys="k:t", broker_url="redis://127.0.0.1:1/0")
    services = Services.from_settings(broken)
    services.celery.conf.broker_connection_retry = False
    services.celery.conf.broker_connection_max_retries = 0
    services.celery.conf.broker_transport_options = {"max_retries": 0}
    client = create_app(broken, services).test_client()
    model_id = client.post("/v1/models", data=MODEL, headers={"Authorization": "Bearer k",
                                                              "Content-Type": "application/octet-stream"}).get_json()["id"]
    data = {"model_id": model_id, "settings": "{}", "image": [(io.BytesIO(IMAGE), "a.png")]}
    response = client.post("/v1/jobs", data=data, headers={"Authorization": "Bearer k"}, content_type="multipart/form-data")
    body = assert_problem(response, 503, "queue is unavailable")
    assert response.headers["Retry-After"] == "5" and body["title"] == "Service unavailable"
    (job_id, _), = services.jobs.list_ids("t", 10)
    record = services.jobs.get(job_id)
    assert record.status == JobStatus.FAILED and record.error["type"] == "EnqueueFailed"


def background_npz(count: int, height: int = 32, width: int = 32, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.random.default_rng(seed).integers(0, 256, size=(count, height, width, 3), dtype=np.uint8))
    return buffer.getvalue()


def submit_with_background(client, model_id: str, background: bytes | None, settings: dict, headers=None):
    data = {"model_id": model_id, "settings": json.dumps(settings), "image": [(io.BytesIO(IMAGE), "i.png")]}
    if background is not None:
        data["background"] = (io.BytesIO(background), "background.npz")
    return client.post("/v1/jobs", data=data, headers={**auth(), **(headers or {})}, content_type="multipart/form-data")


DATASET = {"masker": "dataset:bg.npz", "nsamples": 100}


@pytest.mark.parametrize("background, settings, fragment", [
    (None, DATASET, "needs the background set uploaded"),
    ("three", {"nsamples": 100}, "a background set needs masker dataset"),
    ("wrong size", DATASET, "the background images are 16x20; the model takes 32x32"),
    ("too many", DATASET, "holds 101 images; the limit is 100"),
    ("garbage", DATASET, "not a readable .npz"),
    ("wrong size", {"masker": "dataset:bg.npz", "method": "partition"}, "the background images are 16x20"),
    (None, {"method": "partition", "max_evals": 10 ** 7}, "max_evals=10000000; the limit is 100000"),
    (None, {"method": "partition", "nsamples": 100}, "nsamples applies to method kernel"),
])
def test_bad_background_and_method_requests(client, services, background, settings, fragment):
    model_id = upload(client).get_json()["id"]
    payloads = {"three": background_npz(3), "wrong size": background_npz(2, 16, 20), "too many": background_npz(101),
                "garbage": b"PK\x03\x04 not really"}
    response = submit_with_background(client, model_id, payloads.get(background), settings)
    assert_problem(response, 422, fragment)
    assert services.store.list("jobs/") == []


def test_background_set_jobs_are_accepted_and_fingerprinted(client, services):
    model_id = upload(client).get_json()["id"]
    first = submit_with_background(client, model_id, background_npz(3), DATASET, headers={"Idempotency-Key": "bg-1"})
    assert first.status_code == 202, first.get_json()
    job_id = first.get_json()["id"]
    assert services.store.exists(f"jobs/{job_id}/inputs/background.npz")
    again = submit_with_background(client, model_id, background_npz(3), DATASET, headers={"Idempotency-Key": "bg-1"})
    assert again.status_code == 202 and again.get_json()["id"] == job_id
    other = submit_with_background(client, model_id, background_npz(3, seed=1), DATASET, headers={"Idempotency-Key": "bg-1"})
    assert_problem(other, 422, "different request")
    body = {"model_id": model_id, "settings": DATASET, "background": base64.b64encode(background_npz(2)).decode(),
            "images": [{"data": base64.b64encode(IMAGE).decode()}]}
    as_json = client.post("/v1/jobs", json=body, headers=auth())
    assert as_json.status_code == 202, as_json.get_json()
    partition = submit_with_background(client, model_id, None, {"method": "partition", "max_evals": 300})
    assert partition.status_code == 202 and partition.get_json()["settings"]["method"] == "partition"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_segments_and_reference_travel_with_jobs_in_every_form(client, services):
    """Label maps: multipart ``segments`` (one per image), base64 ``images[].segments``, or uploaded
    with the image; the image: masker's ``reference`` likewise. Each lands in the job's inputs."""
    model_id = upload(client).get_json()["id"]
    labels = npy_bytes(np.repeat(np.arange(4), 8)[None].repeat(32, axis=0))  # 32 x 32, 4 stripes
    data = {"model_id": model_id, "settings": json.dumps({"nsamples": 100}),
            "image": [(io.BytesIO(IMAGE), "a.png"), (io.BytesIO(IMAGE), "b.png")],
            "segments": [(io.BytesIO(labels), "a.npy"), (io.BytesIO(labels), "b.npy")]}
    multipart = client.post("/v1/jobs", data=data, headers=auth(), content_type="multipart/form-data")
    assert multipart.status_code == 202, multipart.get_json()
    job_id = multipart.get_json()["id"]
    assert [services.store.get(f"jobs/{job_id}/inputs/{n}.segments") for n in range(2)] == [labels, labels]

    uploaded = client.post("/v1/images", data={"image": (io.BytesIO(IMAGE), "i.png"), "segments": (io.BytesIO(labels), "s.npy")},
                           headers=auth(), content_type="multipart/form-data")
    assert uploaded.status_code == 201, uploaded.get_json()
    plain = client.post("/v1/images", data={"image": (io.BytesIO(IMAGE), "i.png")}, headers=auth(),
                        content_type="multipart/form-data").get_json()
    assert uploaded.get_json()["id"] != plain["id"]  # the same image with other segments is another image
    body = {"model_id": model_id, "settings": {"nsamples": 100, "masker": "image:white.png"},
            "reference": base64.b64encode(png(32, 32, 255)).decode(),
            "images": [{"image_id": uploaded.get_json()["id"]},
                       {"data": base64.b64encode(IMAGE).decode(), "segments": base64.b64encode(labels).decode()},
                       {"image_id": plain["id"]}]}
    as_json = client.post("/v1/jobs", json=body, headers=auth())
    assert as_json.status_code == 202, as_json.get_json()
    job_id = as_json.get_json()["id"]
    # data entries come first in the job, then the referenced images
    assert services.store.get(f"jobs/{job_id}/inputs/0.segments") == labels
    assert services.store.get(f"jobs/{job_id}/inputs/1.segments") == labels
    assert not services.store.exists(f"jobs/{job_id}/inputs/2.segments")
    assert services.store.get(f"jobs/{job_id}/inputs/reference") == png(32, 32, 255)


@pytest.mark.parametrize("segments, settings, fragment", [
    ([npy_bytes(np.zeros((16, 32), np.int64))], {}, "is 32x16 but the image is 32x32"),
    ([npy_bytes(np.zeros((32, 32), np.float64))], {}, "must be a 2-D integer label image"),
    ([npy_bytes(np.arange(1024).reshape(32, 32))], {"nsamples": 100}, None),
    ([b"\x93NUMPY garbage"], {}, "not a readable .npy label map"),
    ([npy_bytes(np.zeros((32, 32), np.int64))] * 2, {}, "2 segments files for 1 images"),
    ([npy_bytes(np.zeros((32, 32), np.int64))], {"method": "partition"}, "segments apply to method kernel"),
])
def test_bad_segments_are_refused_with_422(client, services, segments, settings, fragment):
    model_id = upload(client).get_json()["id"]
    data = {"model_id": model_id, "settings": json.dumps(settings), "image": [(io.BytesIO(IMAGE), "i.png")],
            "segments": [(io.BytesIO(s), f"s{n}.npy") for n, s in enumerate(segments)]}
    before = services.store.list("jobs/")
    response = client.post("/v1/jobs", data=data, headers=auth(), content_type="multipart/form-data")
    if fragment is None:  # 1,024 superpixels: within this app's limit of 1,500
        assert response.status_code == 202, response.get_json()
        return
    assert_problem(response, 422, fragment)
    assert services.store.list("jobs/") == before


def test_idempotency_keys_cannot_collide_across_tenants_and_a_dead_claim_expires(client, services, monkeypatch):
    from shapfleet.api import views
    from shapfleet.broker import redis_keys

    assert redis_keys.idempotency("a:b", "c") != redis_keys.idempotency("a", "b:c")
    model_id = upload(client).get_json()["id"]
    key = redis_keys.idempotency("alpha", "fresh")
    seen = []
    enqueue = views.enqueue_job

    def enqueue_and_look(*args, **kwargs):  # the claim as an API process dying right here would leave it
        seen.append(services.redis.ttl(key))
        return enqueue(*args, **kwargs)

    monkeypatch.setattr(views, "enqueue_job", enqueue_and_look)
    assert submit(client, model_id, headers={"Idempotency-Key": "fresh"}).status_code == 202
    assert 0 < seen[0] <= views.IDEMPOTENCY_CLAIM_TTL  # a dead claim lapses within minutes
    assert services.redis.ttl(key) > views.IDEMPOTENCY_CLAIM_TTL  # a finished key is kept (48 h)


HOSTILE_VALUES = ["", "0", "-1", "nan", "inf", "1e400", "9" * 40, "a" * 5000, "../../etc/passwd", "..%2F..",
                  "x:shards", "%00", "\u202e\u0000", "名前", "$\\frac{1}{0}$", "[" * 50, '{"a":', "null", "true"]
HOSTILE_BODIES = [b"", b"null", b"[]", b"{}", b'"x"', b"1e999", b"NaN", b'{"model_id": 5, "images": "x"}',
                  b'{"model_id": "m", "images": [{"data": 5}], "settings": []}',
                  b'{"settings": {"nsamples": {"$gt": 1}}, "images": [{"image_id": ["x"]}]}',
                  b"[" * 5000 + b"]" * 5000, bytes(range(256)) * 4]
HOSTILE_TYPES = ["application/json", "multipart/form-data", "multipart/form-data; boundary=", "text/plain",
                 "application/x-www-form-urlencoded", "image/png", "application/json; charset=utf-32"]


def test_every_route_survives_fuzzed_parameters_headers_and_bodies(app, client):
    """Every route the app serves, with hostile path values, query parameters, headers and bodies
    (a fixed seed, so a failure reproduces): never a 5xx, and every /v1 error is problem+json."""
    import random
    import re

    rng = random.Random(17)
    model_id = upload(client).get_json()["id"]
    queries = ["cursor", "limit", "status", "tenant", "page", "expires", "download"]
    seen = 0
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            for trial in range(24):
                path = re.sub(r"<(?:[^:>]+:)?([^>]+)>",
                              lambda m: rng.choice(HOSTILE_VALUES + [model_id]).replace("/", "%2F"), rule.rule)
                params = {name: rng.choice(HOSTILE_VALUES) for name in rng.sample(queries, rng.randint(0, 3))}
                headers = {**(auth() if trial % 5 else {"Authorization": rng.choice(["Bearer", "Basic x", "Bearer " + "k" * 3000])}),
                           "Idempotency-Key": rng.choice(HOSTILE_VALUES + ["k" * 300])}
                kwargs = {"query_string": params, "headers": headers}
                if method == "POST":
                    kwargs["data"] = rng.choice(HOSTILE_BODIES)
                    kwargs["content_type"] = rng.choice(HOSTILE_TYPES)
                    if trial % 4 == 0:  # a well-formed multipart with hostile fields
                        kwargs["data"] = {"model_id": rng.choice(HOSTILE_VALUES + [model_id]),
                                          "settings": rng.choice(HOSTILE_VALUES + ['{"nsamples": 1e400}']),
                                          "image": (io.BytesIO(rng.choice(HOSTILE_BODIES)), rng.choice(HOSTILE_VALUES) + ".png")}
                        kwargs["content_type"] = "multipart/form-data"
                response = client.open(path, method=method, **kwargs)
                seen += 1
                assert response.status_code < 500, (method, path, params, kwargs.get("data"), response.get_data(as_text=True)[:500])
                if response.status_code >= 400 and path.startswith("/v1/"):
                    assert response.mimetype == "application/problem+json", (method, path, response.status_code)
                response.close()  # a static file's response holds the file open
    assert seen > 300
