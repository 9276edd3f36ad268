"""The distributed pipeline with real Redis, SeaweedFS and Celery worker processes."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from conftest import REPO
from onnx_models import conv_model, nan_model

from shapfleet import ExplainSettings, Explanation, explain
from shapfleet.broker.keys import result_key, result_prefix, shard_key
from shapfleet.broker.records import JobStatus
from shapfleet.broker.store import artifact_bytes
from shapfleet.broker.submission import store_model, submit_job

pytestmark = pytest.mark.service

EXAMPLE_MODEL = (REPO / "examples" / "shapes.onnx").read_bytes()
EXAMPLE_IMAGE = (REPO / "examples" / "triangle.png").read_bytes()
SETTINGS = ExplainSettings(n_segments=30, all_classes=True, nsamples=1200, seed=11, batch_size=32)


def wait_final(services, job_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = services.jobs.get(job_id)
        if record.status.is_final:
            return record
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not final after {timeout}s: {services.jobs.get(job_id)}")


def in_process(settings: ExplainSettings, model: bytes = EXAMPLE_MODEL, image: bytes = EXAMPLE_IMAGE) -> Explanation:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    (run,) = explain([pixels], model, settings)
    return run.explanation


def fleet_result(services, record) -> Explanation:
    names = {r["name"] for r in record.results}
    assert {"attributions.npz", "summary.png"} <= names
    assert all(len(artifact_bytes(services.store, r)) == r["size"] for r in record.results)
    assert all(("offset" in r) == (not r["name"].endswith(".npz")) for r in record.results)  # one image: all bundled
    return Explanation.load(services.store.get(f"{result_prefix(record.id)}attributions.npz"))


@pytest.mark.parametrize("workers", [1, 2])
def test_fleet_job_equals_the_in_process_engine(services, start_workers, workers):
    start_workers(workers)
    sha = store_model(services, EXAMPLE_MODEL)
    record = submit_job(services, "tenant-a", sha, [EXAMPLE_IMAGE], SETTINGS)
    assert record.status == JobStatus.QUEUED
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    assert final.shards_total > 1 and final.shards_done == final.shards_total
    assert final.evaluations_done == final.evaluations_total
    assert final.started_at >= final.created_at and final.completed_at >= final.started_at
    fleet = fleet_result(services, final)
    local = in_process(SETTINGS)
    np.testing.assert_allclose(fleet.values, local.values, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fleet.std, local.std, rtol=0, atol=1e-10)
    assert fleet.n_evaluations == local.n_evaluations == final.evaluations_total


def test_null_superpixels_on_the_fleet_equal_the_in_process_engine(services, start_workers):
    """The example triangle on an exactly black background under constant:0: the plan leaves the
    superpixels masking cannot change out of the game, on the fleet as in-process."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(EXAMPLE_IMAGE)).convert("RGB")).copy()
    pixels[np.all(np.abs(pixels.astype(int) - pixels[0, 0]) < 30, axis=2)] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    image = buffer.getvalue()
    settings = SETTINGS.replace(masker="constant:0")
    start_workers(2)
    record = submit_job(services, "tenant-a", store_model(services, EXAMPLE_MODEL), [image], settings)
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    fleet, local = fleet_result(services, final), in_process(settings, image=image)
    assert fleet.summary()["null_superpixels"] == local.summary()["null_superpixels"] > 0
    np.testing.assert_allclose(fleet.values, local.values, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fleet.std, local.std, rtol=0, atol=1e-10)
    assert np.sum(np.all(fleet.values == 0, axis=1)) >= fleet.summary()["null_superpixels"]


def test_progress_is_visible_while_a_job_runs(services, start_workers):
    start_workers(1)
    sha = store_model(services, EXAMPLE_MODEL)
    record = submit_job(services, "t", sha, [EXAMPLE_IMAGE], SETTINGS.replace(nsamples=6000, n_segments=60))
    seen = set()
    while True:
        current = services.jobs.get(record.id)
        seen.add((current.shards_done, current.evaluations_done))
        if current.status.is_final:
            break
        time.sleep(0.05)
    assert current.status == JobStatus.SUCCEEDED, current.error
    shards_seen = sorted({s for s, _ in seen})
    assert len(shards_seen) >= 3 and shards_seen[-1] == current.shards_total  # it rose step by step
    assert any(0 < e < current.evaluations_total for _, e in seen)  # evaluations rose during the job too


def test_cancel_mid_job_stops_shards_and_writes_no_result(services, start_workers):
    start_workers(1)
    sha = store_model(services, EXAMPLE_MODEL)
    record = submit_job(services, "t", sha, [EXAMPLE_IMAGE], SETTINGS.replace(nsamples=40000, n_segments=60, batch_size=16))
    deadline = time.monotonic() + 60
    while services.jobs.get(record.id).evaluations_done < 500:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert services.jobs.cancel(record.id)
    canceled_at = time.monotonic()
    final = services.jobs.get(record.id)
    assert final.status == JobStatus.CANCELED
    # The shard in flight stops at its next batch: evaluations stop growing within seconds.
    time.sleep(2.0)
    settled = services.jobs.get(record.id).evaluations_done
    time.sleep(2.0)
    assert services.jobs.get(record.id).evaluations_done == settled < final.evaluations_total
    assert time.monotonic() - canceled_at < 30
    assert services.store.list(result_prefix(record.id)) == []
    assert services.jobs.get(record.id).status == JobStatus.CANCELED


def test_a_model_failing_in_shards_fails_the_job_quickly(services, start_workers):
    start_workers(1)
    # The planner's v(full) and v(empty) succeed only for finite outputs, so the NaN model fails the
    # job while planning, with the model's error.
    sha = store_model(services, nan_model(32, 32))
    started = time.monotonic()
    record = submit_job(services, "t", sha, [EXAMPLE_IMAGE], ExplainSettings(segmenter="grid", grid="4x4"))
    final = wait_final(services, record.id, timeout=30)
    assert final.status == JobStatus.FAILED and "NaN" in final.error["message"]
    assert final.error["type"] == "ModelOutputError" and time.monotonic() - started < 30


def test_a_model_that_fails_only_on_masked_images_fails_the_job_from_a_shard(services, start_workers):
    """A model that is finite on the image and its background but NaN on mixed images: the shard
    fails, the job fails with the model's error, and nothing hangs."""
    start_workers(1)
    sha = store_model(services, _nan_on_mixed_model())
    record = submit_job(services, "t", sha, [EXAMPLE_IMAGE],
                        ExplainSettings(segmenter="grid", grid="4x4", masker="constant:3", preprocess="raw", nsamples=500))
    final = wait_final(services, record.id, timeout=60)
    assert final.status == JobStatus.FAILED, final
    assert final.shards_total > 1  # planning succeeded: the failure came from a shard
    assert "NaN" in final.error["message"] and final.error["type"] == "ModelOutputError"


def _nan_on_mixed_model() -> bytes:
    """Outputs NaN exactly when pixel (0, 0) equals 3 (its background under ``constant:3``) while
    pixel (31, 31) does not: finite on the image and on the all-hidden image, NaN on coalitions that
    hide the top-left cell but keep the bottom-right one."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def pixel(row: int, col: int, out: str) -> list:
        return [
            helper.make_node("Gather", ["image", "i0"], [f"{out}_c"], axis=1),
            helper.make_node("Gather", [f"{out}_c", f"r{row}"], [f"{out}_r"], axis=1),
            helper.make_node("Gather", [f"{out}_r", f"r{col}"], [out], axis=1),
        ]

    nodes = pixel(0, 0, "top_left") + pixel(31, 31, "bottom_right") + [
        helper.make_node("Equal", ["top_left", "three"], ["hidden"]),
        helper.make_node("Equal", ["bottom_right", "three"], ["also_hidden"]),
        helper.make_node("Not", ["also_hidden"], ["kept"]),
        helper.make_node("And", ["hidden", "kept"], ["mixed"]),
        helper.make_node("Where", ["mixed", "nan", "one"], ["value"]),
        helper.make_node("Unsqueeze", ["value", "axis1"], ["column"]),
        helper.make_node("Mul", ["column", "ones"], ["out"]),
    ]
    scalars = {"i0": (0, np.int64), "r0": (0, np.int64), "r31": (31, np.int64), "three": (3, np.float32),
               "nan": (np.nan, np.float32), "one": (1, np.float32)}
    inits = [numpy_helper.from_array(np.array(v, t), n) for n, (v, t) in scalars.items()]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "axis1"), numpy_helper.from_array(np.ones((1, 2), np.float32), "ones")]
    graph = helper.make_graph(nodes, "mixed_nan", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_a_shard_run_twice_leaves_one_object_and_the_same_answer(services, start_workers):
    start_workers(1)
    sha = store_model(services, EXAMPLE_MODEL)
    record = submit_job(services, "t", sha, [EXAMPLE_IMAGE], SETTINGS)
    first = wait_final(services, record.id)
    assert first.status == JobStatus.SUCCEEDED
    before = services.store.list(f"jobs/{record.id}/shards/")
    key = shard_key(record.id, 0, 1)
    stored = services.store.get(key)
    # Deliver shard 1 again, by name, as a redelivery would: the stored statistics stay as they were.
    from shapfleet.broker.celery_app import SHARD_TASK

    services.redis.hset(services.jobs.key(record.id), "status", "running")  # as if it were still running
    result = services.celery.send_task(SHARD_TASK, args=[record.id, 0, 1], queue=services.settings.queue_shards)
    assert result.get(timeout=60) == key
    assert services.claims.reductions(record.id) == 1  # a redelivered shard does not reduce again
    assert services.store.list(f"jobs/{record.id}/shards/") == before and services.store.get(key) == stored
    # Rerunning the whole reduction over the stored shards gives the identical answer.
    from shapfleet.workers.steps import reduce_job
    from shapfleet.workers.tasks import runtime_of

    runtime = runtime_of(services.celery)
    reduce_job(runtime, record.id)
    again = Explanation.load(services.store.get(f"{result_prefix(record.id)}attributions.npz"))
    np.testing.assert_array_equal(again.values, fleet_result(services, first).values)


def test_conv_model_multi_image_job(services, start_workers):
    """Two images in one job: both reduced, artifacts under 0/ and 1/, each equal to in-process."""
    start_workers(1)
    model = conv_model(32, 32, classes=3)
    sha = store_model(services, model)
    settings = ExplainSettings(segmenter="grid", grid="4x4", top_k=2, nsamples=600, seed=3)
    circle = (REPO / "examples" / "circle.png").read_bytes()
    record = submit_job(services, "t", sha, [EXAMPLE_IMAGE, circle], settings)
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    assert {"0/attributions.npz", "1/attributions.npz", "0/summary.png", "1/summary.png"} <= {r["name"] for r in final.results}
    for index, image in enumerate((EXAMPLE_IMAGE, circle)):
        fleet = Explanation.load(services.store.get(f"{result_prefix(record.id)}{index}/attributions.npz"))
        np.testing.assert_allclose(fleet.values, in_process(settings, model, image).values, rtol=0, atol=1e-10)


def test_one_job_run_both_ways_gives_the_same_artifacts(services, start_workers, tmp_path):
    """The fleet and ``explain`` run the same steps: a two-image job gives the same artifact set
    (``<n>/...`` on the fleet, ``<n>-<stem>/...`` on disk) with the same arrays and the same pictures."""
    from PIL import Image

    start_workers(2)
    settings = ExplainSettings(n_segments=20, top_k=2, nsamples=400, seed=8, class_names=("circle", "square", "triangle"))
    paths = [REPO / "examples" / "triangle.png", REPO / "examples" / "circle.png"]
    record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [p.read_bytes() for p in paths], settings)
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    runs = explain([str(p) for p in paths], EXAMPLE_MODEL, settings, out_dir=tmp_path / "local")
    local = {str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*") if p.is_file()}
    stems = {"0": "0-triangle", "1": "1-circle"}
    fleet = {r["name"]: r for r in final.results}
    assert {"/".join([stems.get(n.split("/")[0], n.split("/")[0]), *n.split("/")[1:]]) for n in fleet} == local
    for name, entry in fleet.items():
        mine = tmp_path / "local" / "/".join([stems.get(name.split("/")[0], name.split("/")[0]), *name.split("/")[1:]])
        data = artifact_bytes(services.store, entry)
        if name.endswith(".npz"):
            with np.load(io.BytesIO(data)) as theirs, np.load(mine) as ours:
                assert theirs.files == ours.files
                for array in ("values", "std", "pixel_values", "segments", "base_values", "outputs"):
                    np.testing.assert_allclose(theirs[array], ours[array], rtol=0, atol=1e-10)
        elif name.endswith(".png") and "summary" not in name:  # summary.png prints the values' digits
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(Image.open(mine))), name
    assert [run.out_dir.name for run in runs] == ["0-triangle", "1-circle"]
    assert sorted(runs[1].artifacts) == sorted(p.name for p in (tmp_path / "local" / "1-circle").iterdir())


#: The settings of the many-image rendering tests: a few shards per image.
MANY_IMAGE_SETTINGS = SETTINGS.replace(nsamples=300, all_classes=False, top_k=2)


def _planned_with_shards_held(services, start_workers, images: list[bytes]):
    """A job of ``images`` planned by a plan-only worker, its shard messages deleted from the
    broker (the test runs the shards itself); returns its record and the runtime the tasks use."""
    from shapfleet.workers.tasks import runtime_of

    start_workers(1, queues="plan")
    record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), images, MANY_IMAGE_SETTINGS)
    deadline = time.monotonic() + 60
    while not services.jobs.get(record.id).shards_total:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    services.redis.delete(services.settings.queue_shards)
    return record, runtime_of(services.celery)


def test_each_image_is_rendered_by_the_shard_that_finishes_it_and_the_last_finishes_the_job(services, start_workers):
    """The step that finishes an image's shards solves and renders it there (tasks._after_image, what
    the shard task calls), while the next image is still unevaluated; the image that completes the
    job's values sends the collection's task (grid.png and the stacked npz), and that task, run by a
    worker, finishes the job with every artifact."""
    from shapfleet.broker.keys import rendered_key
    from shapfleet.workers import steps
    from shapfleet.workers.tasks import _after_image

    images = [EXAMPLE_IMAGE, (REPO / "examples" / "circle.png").read_bytes()]
    record, runtime = _planned_with_shards_held(services, start_workers, images)
    counts = services.jobs.shard_counts(record.id)
    assert counts[0] > 1  # the image completes on its last shard, not its first
    for image in range(2):
        for shard in range(counts[image]):
            _, recorded = steps.run_shard(runtime, record.id, image, shard)
            assert recorded.image_complete == (shard == counts[image] - 1)
            assert recorded.job_complete == (image == 1 and shard == counts[1] - 1)
            if recorded.image_complete:
                _after_image(runtime, record.id, image, recorded.job_complete, "test")
        assert services.store.exists(rendered_key(record.id, image))
        assert services.jobs.status(record.id) == JobStatus.RUNNING
        sent = [json.loads(m)["headers"]["task"] for m in services.redis.lrange(services.settings.queue_shards, 0, -1)]
        assert sent == ([] if image == 0 else ["shapfleet.collect"])
    start_workers(1, queues="shards")
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    names = [r["name"] for r in final.results]
    assert names[-2:] == ["grid.png", "attributions.npz"] and {n.split("/")[0] for n in names[:-2]} == {"0", "1"}


def test_a_many_image_job_renders_each_image_on_its_own_task_and_survives_lost_render_messages(services, start_workers):
    """A many-image job's images are rendered by the steps that finish them; when those are lost, a
    reduce sends one render task per image not rendered yet, and the one completing the set adds
    the stacked npz and grid.png and succeeds the job. Here the shards run outside any task (so
    nothing is rendered), one image is rendered by hand, and the watchdog's reduce sends the
    remaining images' renders only; the job ends with the in-process artifacts."""
    from PIL import Image

    from shapfleet.broker.keys import rendered_key
    from shapfleet.broker.redis_keys import job_rendered
    from shapfleet.broker.watchdog import watchdog_pass
    from shapfleet.workers import steps

    images = [EXAMPLE_IMAGE, (REPO / "examples" / "circle.png").read_bytes(), (REPO / "examples" / "square.png").read_bytes()]
    record, runtime = _planned_with_shards_held(services, start_workers, images)
    for image, count in enumerate(services.jobs.shard_counts(record.id)):
        for shard in range(count):
            steps.run_shard(runtime, record.id, image, shard)
    assert steps.unrendered_images(runtime, record.id) == [0, 1, 2]
    assert steps.render_image(runtime, record.id, 1) is False
    first = services.store.get(rendered_key(record.id, 1))
    assert steps.render_image(runtime, record.id, 1) is False  # again: stored once, counted once
    assert services.store.get(rendered_key(record.id, 1)) == first and services.redis.scard(job_rendered(record.id)) == 1
    start_workers(1, queues="shards,reduce")
    later = time.time() + services.settings.stall_seconds + 1
    assert watchdog_pass(services, now=later)[record.id].startswith("re-sent the reduce")
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    assert services.redis.scard(job_rendered(record.id)) == 4  # the images and the collection
    names = [r["name"] for r in final.results]
    assert names[-2:] == ["grid.png", "attributions.npz"] and sum(n.startswith("1/") for n in names) == 6
    pixels = [np.asarray(Image.open(io.BytesIO(i)).convert("RGB")) for i in images]
    local = explain(pixels, EXAMPLE_MODEL, MANY_IMAGE_SETTINGS)
    with np.load(io.BytesIO(services.store.get(f"{result_prefix(record.id)}attributions.npz"))) as stacked:
        for n, run in enumerate(local):  # values padded with NaN past each image's superpixels
            m = run.explanation.values.shape[0]
            np.testing.assert_allclose(stacked["values"][n, :m], run.explanation.values, rtol=0, atol=1e-10)


def test_the_step_that_stores_the_last_values_sends_the_collection_before_drawing_its_pages(services, start_workers):
    """The image whose ``attributions.npz`` completes the job's values calls for the collection
    before its own pages are stored (and a redelivered step calls again: the collection's step is
    idempotent); a reduce that finds the collection missing draws it itself, and a collection step
    after that records it without drawing it again; the job's rendering is complete only with
    every image and the collection."""
    from shapfleet.broker.keys import rendered_key
    from shapfleet.workers import steps

    images = [EXAMPLE_IMAGE, (REPO / "examples" / "circle.png").read_bytes(), (REPO / "examples" / "square.png").read_bytes()]
    record, runtime = _planned_with_shards_held(services, start_workers, images)
    for image, count in enumerate(services.jobs.shard_counts(record.id)):
        for shard in range(count):
            steps.run_shard(runtime, record.id, image, shard)
    calls = []

    def on_values_complete():  # what this image has stored when the collection is called for
        calls.append([services.store.exists(result_key(record.id, f"2/{name}")) for name in ("attributions.npz", "bundle")])

    for image in (1, 0, 2):
        assert steps.render_image(runtime, record.id, image, on_values_complete) is False
        assert calls == ([] if image != 2 else [[True, False]])
    assert steps.render_image(runtime, record.id, 2, on_values_complete) is False  # redelivered
    assert calls == [[True, False], [True, True]]
    assert not services.store.exists(rendered_key(record.id, steps.COLLECTION))
    results = steps.reduce_job(runtime, record.id)  # the collection's step never ran: drawn here
    names = [r["name"] for r in results]
    assert names[-2:] == ["grid.png", "attributions.npz"] and [n.split("/")[0] for n in names[:-2]] == \
        [str(i) for i in range(3) for _ in range(6)]
    listing = services.store.get(rendered_key(record.id, steps.COLLECTION))
    grid = services.store.get(result_key(record.id, "grid.png"))
    assert steps.render_job_collection(runtime, record.id) is True  # recorded, not drawn again
    assert services.store.get(rendered_key(record.id, steps.COLLECTION)) == listing
    assert steps.reduce_job(runtime, record.id) == results and services.store.get(result_key(record.id, "grid.png")) == grid


def test_an_images_viewer_files_are_stored_as_one_object_and_read_back_by_range():
    """Each folder's viewer files (pages, image, explanation.json) go into one object of that
    folder, in order, each listed with its offset; arrays are objects of their own, and so is a
    viewer file alone in its folder (a many-image job's grid); a listing reads back every file."""
    from types import SimpleNamespace

    from shapfleet.broker.store import MemoryStore
    from shapfleet.workers import steps

    store = MemoryStore()
    artifacts = [("0/summary.png", b"S0", 0), ("0/class-3-cat.png", b"cat", 0), ("0/attributions.npz", b"a0", 0),
                 ("0/explanation.json", b"{}", 0), ("1/class-3-cat.png", b"c1", 1), ("1/image.png", b"i1", 1),
                 ("1/attributions.npz", b"npz", 1), ("grid.png", b"grid", None), ("attributions.npz", b"all", None)]
    listing = steps._store_artifacts(SimpleNamespace(store=store), "j", artifacts)
    assert [entry["name"] for entry in listing] == [name for name, _, _ in artifacts]
    assert sorted(store.objects) == sorted(f"{result_prefix('j')}{name}" for name in (
        "0/bundle", "0/attributions.npz", "1/bundle", "1/attributions.npz", "grid.png", "attributions.npz"))
    assert store.objects[f"{result_prefix('j')}0/bundle"] == b"S0cat{}"
    bundled = {entry["name"]: (entry["offset"], entry["size"]) for entry in listing if "offset" in entry}
    assert bundled == {"0/summary.png": (0, 2), "0/class-3-cat.png": (2, 3), "0/explanation.json": (5, 2),
                       "1/class-3-cat.png": (0, 2), "1/image.png": (2, 2)}
    assert [artifact_bytes(store, entry) for entry in listing] == [data for _, data, _ in artifacts]
    assert all("data" not in entry for entry in listing)
