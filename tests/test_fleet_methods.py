"""Method partition and background-set (dataset:) jobs on the fleet: real Redis, SeaweedFS and
Celery worker processes, each compared with the in-process engine."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from conftest import REPO
from onnx_models import conv_model, linear_model
from PIL import Image
from test_pipeline import wait_final

from shapfleet import ExplainSettings, Explanation, explain
from shapfleet.broker.keys import partition_key, result_prefix
from shapfleet.broker.records import JobStatus
from shapfleet.broker.submission import store_model, submit_job
from shapfleet.broker.watchdog import watchdog_pass
from shapfleet.errors import SubmissionError

pytestmark = pytest.mark.service

SHAPES = ("circle", "square", "triangle")


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def result(services, job_id: str, name: str) -> bytes:
    return services.store.get(f"{result_prefix(job_id)}{name}")


def partition_settings(**changes) -> ExplainSettings:
    # 200 masks per round against the test fleet's 128 evaluations per shard: every round is split
    # into two parts, evaluated by different tasks.
    base = dict(method="partition", masker="blur:6,6", max_evals=700, batch_size=200, top_k=2)
    return ExplainSettings(**{**base, **changes})


def test_partition_job_spreads_rounds_over_workers_and_equals_in_process(services, start_workers):
    start_workers(2)
    model = (REPO / "examples" / "shapes.onnx").read_bytes()
    images = [(REPO / "examples" / f"{name}.png").read_bytes() for name in SHAPES[:2]]
    settings = partition_settings()
    record = submit_job(services, "t", store_model(services, model), images, settings)
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    rounds = services.jobs.current_round(record.id, 0)
    # later rounds (200 masks) ran as two parts each
    assert any(services.redis.scard(services.jobs.round_parts_key(record.id, 0, r)) == 2 for r in range(rounds))
    # The stored refinement stays linear in the rounds: the final state, and the last two rounds' records.
    records = sorted(k.rsplit("/", 1)[-1] for k in services.store.list(partition_key(record.id, 0, "")) if "/part-" not in k)
    assert rounds >= 3 and len(records) <= 5, records
    local = explain([np.asarray(Image.open(io.BytesIO(i)).convert("RGB")) for i in images], model, settings)
    for index, run in enumerate(local):
        fleet = Explanation.load(result(services, record.id, f"{index}/attributions.npz"))
        np.testing.assert_allclose(fleet.pixel_attributions, run.explanation.pixel_attributions, rtol=0, atol=1e-9)
        assert fleet.n_evaluations == run.explanation.n_evaluations <= 701
        assert np.abs(fleet.additivity_residual).max() < 1e-9
    assert final.evaluations_done == sum(run.explanation.n_evaluations for run in local)
    with np.load(io.BytesIO(result(services, record.id, "attributions.npz"))) as stacked:
        assert stacked["pixel_attributions"].shape[0] == 2
    assert result(services, record.id, "grid.png")[:4] == b"\x89PNG"


def job_stopped_at_round_0(services, start_workers, image_name: str, settings: ExplainSettings, round_key):
    """A one-image round-driven job whose round 0 was chosen (``round_key(job_id)`` is stored) and
    whose part messages were lost (no worker consumed the shards queue); returns the model, image
    and job record."""
    start_workers(1, queues="plan,reduce")
    model = (REPO / "examples" / "shapes.onnx").read_bytes()
    image = (REPO / "examples" / f"{image_name}.png").read_bytes()
    record = submit_job(services, "t", store_model(services, model), [image], settings)
    deadline = time.monotonic() + 60
    while not services.store.exists(round_key(record.id)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    services.redis.delete(services.settings.queue_shards)
    return model, image, record


def partition_job_stopped_at_round_0(services, start_workers, image_name: str):
    """A partition job stopped so (see :func:`job_stopped_at_round_0`); returns the model, image,
    settings and job record."""
    settings = partition_settings(max_evals=300)
    model, image, record = job_stopped_at_round_0(services, start_workers, image_name, settings,
                                                  lambda job_id: partition_key(job_id, 0, "round-0.json"))
    return model, image, settings, record


def assert_succeeds_as_in_process(services, record, model: bytes, image: bytes, settings, timeout: float = 120) -> None:
    final = wait_final(services, record.id, timeout=timeout)
    assert final.status == JobStatus.SUCCEEDED, final.error
    (local,) = explain([np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))], model, settings)
    fleet = Explanation.load(result(services, record.id, "attributions.npz"))
    np.testing.assert_allclose(fleet.pixel_attributions, local.explanation.pixel_attributions, rtol=0, atol=1e-9)


def test_watchdog_redrives_a_partition_round_whose_parts_were_lost(services, start_workers):
    model, image, settings, record = partition_job_stopped_at_round_0(services, start_workers, "triangle")
    start_workers(1, queues="shards")
    later = time.time() + services.settings.stall_seconds + 1
    assert watchdog_pass(services, now=later) == {record.id: "re-sent 1 round(s)"}
    assert_succeeds_as_in_process(services, record, model, image, settings)


def test_a_redelivered_part_of_a_complete_round_advances_it(services, start_workers):
    """The worker that stores a round's last part can die before sending the round step. Its
    redelivered part finds the round complete and sends the step itself (no watchdog runs here)."""
    from shapfleet.broker.celery_app import PART_TASK
    from shapfleet.workers import steps
    from shapfleet.workers.tasks import runtime_of

    model, image, settings, record = partition_job_stopped_at_round_0(services, start_workers, "square")
    # Every part of round 0 evaluated and recorded by a worker that then dies: no round step is sent.
    runtime = runtime_of(services.celery)
    n_parts = len(runtime.get_record(partition_key(record.id, 0, "round-0.json"), steps._decode_round).parts)
    assert [steps.partition_part(runtime, record.id, 0, 0, p) for p in range(n_parts)][-1] is True
    start_workers(1, queues="shards")
    services.celery.send_task(PART_TASK, args=[record.id, 0, 0, 0], queue=services.settings.queue_shards)
    assert_succeeds_as_in_process(services, record, model, image, settings, timeout=60)


def background_set(count: int, size: int, seed: int) -> bytes:
    images = np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, images=images)
    return buffer.getvalue()


def test_ten_images_ten_classes_against_a_background_set_equal_in_process(services, start_workers, tmp_path):
    start_workers(2)
    model = conv_model(24, 24, classes=10, seed=4)
    rng = np.random.default_rng(9)
    images = [png_bytes(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)) for _ in range(10)]
    background = background_set(4, 24, seed=1)
    settings = ExplainSettings(segmenter="grid", grid="3x3", masker="dataset:background.npz", all_classes=True,
                               nsamples=200, seed=5, batch_size=64)
    record = submit_job(services, "t", store_model(services, model), images, settings, background=background)
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    assert final.shards_total > 10  # shards span images and coalitions: (200 coalitions x 4 backgrounds) / 128 per image
    (tmp_path / "background.npz").write_bytes(background)
    local = explain([np.asarray(Image.open(io.BytesIO(i)).convert("RGB")) for i in images], model,
                    settings.replace(masker=f"dataset:{tmp_path / 'background.npz'}"))
    with np.load(io.BytesIO(result(services, record.id, "attributions.npz"))) as stacked:
        assert stacked["pixel_values"].shape == (10, 24, 24, 10)
        assert stacked["classes"].shape == (10, 10)
        for n, run in enumerate(local):
            np.testing.assert_allclose(stacked["values"][n], run.explanation.values, rtol=0, atol=1e-10)
            np.testing.assert_allclose(stacked["pixel_values"][n], run.explanation.pixel_values, rtol=0, atol=1e-10)
    grid = Image.open(io.BytesIO(result(services, record.id, "grid.png")))
    assert grid.size[1] > 1500 and 0.9 < grid.size[0] / grid.size[1] < 1.4  # ten rows of eleven pictures


def test_linear_model_against_a_background_set_gives_the_analytic_expectation(services, start_workers):
    """phi_i = sum over superpixel i's pixels of w_p (x_p - mean_n b_n,p): exact enumeration of 4
    grid cells on the fleet, a background set of 3 images."""
    start_workers(1)
    rng = np.random.default_rng(2)
    weights = rng.normal(size=(8, 8, 3, 2)) / 100
    pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    backgrounds = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, images=backgrounds)
    settings = ExplainSettings(segmenter="grid", grid="2x2", masker="dataset:bg.npz", all_classes=True, seed=0)
    record = submit_job(services, "t", store_model(services, linear_model(weights, np.zeros(2), double=True)), [png_bytes(pixels)],
                        settings, background=buffer.getvalue())
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    fleet = Explanation.load(result(services, record.id, "attributions.npz"))
    # the default preprocessing feeds the model pixel / 255
    contribution = (weights * ((pixels - backgrounds.mean(axis=0)) / 255.0)[..., None]).sum(axis=2)  # 8 x 8 x K
    expected = np.stack([contribution[fleet.segments == i].sum(axis=0) for i in range(4)])
    assert fleet.exact
    np.testing.assert_allclose(fleet.values, expected, rtol=0, atol=1e-6)


def test_a_dataset_job_without_its_background_set_is_refused(services):
    sha = store_model(services, (REPO / "examples" / "shapes.onnx").read_bytes())
    image = (REPO / "examples" / "circle.png").read_bytes()
    with pytest.raises(SubmissionError, match="needs the background set uploaded"):
        submit_job(services, "t", sha, [image], ExplainSettings(masker="dataset:bg.npz"))
    with pytest.raises(SubmissionError, match="needs masker dataset"):
        submit_job(services, "t", sha, [image], ExplainSettings(), background=background_set(2, 8, 0))
    with pytest.raises(SubmissionError, match="not a readable .npz"):
        submit_job(services, "t", sha, [image], ExplainSettings(masker="dataset:bg.npz"), background=b"not a zip")


def _label_png(labels: np.ndarray) -> bytes:
    return png_bytes(labels.astype(np.uint8))


def test_a_job_with_uploaded_segments_equals_explain_with_segments(services, start_workers, tmp_path):
    """Own label maps travel with the job (one per image, .npy or a label PNG) and give what
    ``shapfleet explain --segments`` gives with the same seed."""
    start_workers(2)
    model = (REPO / "examples" / "shapes.onnx").read_bytes()
    image = (REPO / "examples" / "triangle.png").read_bytes()
    height, width = np.asarray(Image.open(io.BytesIO(image))).shape[:2]
    rows, cols = np.mgrid[:height, :width]
    labels = (rows * 3 // height) * 4 + (cols * 4 // width) + 7  # a 3 x 4 grid, labels 7..18
    npy = io.BytesIO()
    np.save(npy, labels)
    settings = ExplainSettings(top_k=2, nsamples=900, seed=13, class_names=SHAPES)
    record = submit_job(services, "t", store_model(services, model), [image, image], settings,
                        segments=[npy.getvalue(), _label_png(labels)])
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    np.save(tmp_path / "labels.npy", labels)
    (local,) = explain([str(REPO / "examples" / "triangle.png")], model, settings, segments=str(tmp_path / "labels.npy"))
    for index in range(2):
        fleet = Explanation.load(result(services, record.id, f"{index}/attributions.npz"))
        assert fleet.values.shape[0] == 12
        np.testing.assert_array_equal(fleet.segments, local.explanation.segments)
        np.testing.assert_allclose(fleet.values, local.explanation.values, rtol=0, atol=1e-10)
        np.testing.assert_allclose(fleet.std, local.explanation.std, rtol=0, atol=1e-10)


def test_an_image_masker_job_with_its_reference_equals_in_process(services, start_workers, tmp_path):
    start_workers(1)
    model = (REPO / "examples" / "shapes.onnx").read_bytes()
    image = REPO / "examples" / "square.png"
    reference = np.full(np.asarray(Image.open(image)).shape, 255, np.uint8)
    Image.fromarray(reference).save(tmp_path / "white.png")
    settings = ExplainSettings(masker=f"image:{tmp_path / 'white.png'}", n_segments=20, nsamples=500, seed=2)
    record = submit_job(services, "t", store_model(services, model), [image.read_bytes()], settings,
                        reference=(tmp_path / "white.png").read_bytes())
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    (local,) = explain([str(image)], model, settings)
    fleet = Explanation.load(result(services, record.id, "attributions.npz"))
    np.testing.assert_allclose(fleet.values, local.explanation.values, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fleet.base_values, local.explanation.base_values, rtol=0, atol=1e-12)


def test_uploaded_segments_and_references_are_checked_before_anything_is_stored(services):
    from shapfleet.broker.validation import LimitExceeded
    from shapfleet.errors import ImageError

    sha = store_model(services, (REPO / "examples" / "shapes.onnx").read_bytes())
    image = (REPO / "examples" / "circle.png").read_bytes()
    height, width = np.asarray(Image.open(io.BytesIO(image))).shape[:2]

    def npy(array) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    before = services.store.list("jobs/")
    cases = [
        (ImageError, "is 5x4 but the image is", [npy(np.zeros((4, 5), np.int64))]),
        (ImageError, "2-D integer label image", [npy(np.zeros((height, width), np.float32))]),
        (ImageError, "neither a .npy label array nor a readable label image", [b"not labels"]),
        (LimitExceeded, "superpixels; the limit is", [npy(np.arange(height * width).reshape(height, width))]),
        (SubmissionError, "2 label maps for 1 images", [npy(np.zeros((height, width), int))] * 2),
    ]
    for error, message, segments in cases:
        with pytest.raises(error, match=message):
            submit_job(services, "t", sha, [image], ExplainSettings(), segments=segments)
    with pytest.raises(SubmissionError, match="needs the reference image uploaded"):
        submit_job(services, "t", sha, [image], ExplainSettings(masker="image:ref.png"))
    with pytest.raises(SubmissionError, match="a reference image needs masker image"):
        submit_job(services, "t", sha, [image], ExplainSettings(), reference=image)
    with pytest.raises(ImageError, match="they must fit to the same size"):
        submit_job(services, "t", sha, [image], ExplainSettings(masker="image:r.png"), reference=png_bytes(np.zeros((8, 8, 3), np.uint8)))
    assert services.store.list("jobs/") == before


def test_partition_with_a_background_set_is_one_job_and_equals_in_process(services, start_workers, tmp_path):
    """The DeepExplainer workflow as one job: 3 images x every class, method partition over a
    background set, the round's masks times the backgrounds spread over 2 workers; equal to the
    in-process run, and for a linear model to the expectation over the backgrounds per pixel."""
    from test_partition import full_refinement_evaluations

    start_workers(2)
    rng = np.random.default_rng(21)
    shape = (4, 4, 3)
    weights = rng.normal(size=shape + (3,))
    model = linear_model(weights, np.zeros(3), double=True)
    pixels = [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(3)]
    backgrounds = rng.integers(0, 256, size=(4, *shape), dtype=np.uint8)
    np.savez(tmp_path / "bg.npz", images=backgrounds)
    # every node refined: exact Owen values; 48 masks a round, 32 x 4 backgrounds a part
    settings = ExplainSettings(method="partition", masker=f"dataset:{tmp_path / 'bg.npz'}", all_classes=True,
                               max_evals=2 + full_refinement_evaluations(shape), batch_size=48)
    record = submit_job(services, "t", store_model(services, model), [png_bytes(p) for p in pixels], settings,
                        background=(tmp_path / "bg.npz").read_bytes())
    final = wait_final(services, record.id, timeout=180)
    assert final.status == JobStatus.SUCCEEDED, final.error
    assert {"grid.png", "attributions.npz", "0/attributions.npz", "2/summary.png"} <= {r["name"] for r in final.results}
    assert any(services.redis.scard(services.jobs.round_parts_key(record.id, 0, r)) >= 2
               for r in range(services.jobs.current_round(record.id, 0)))
    local = explain(pixels, model, settings)
    mean_background = backgrounds.astype(np.float64).mean(axis=0)
    for index, run in enumerate(local):
        fleet = Explanation.load(result(services, record.id, f"{index}/attributions.npz"))
        assert fleet.exact
        np.testing.assert_allclose(fleet.pixel_attributions, run.explanation.pixel_attributions, rtol=0, atol=1e-9)
        expected = weights * ((pixels[index] - mean_background) / 255.0)[..., None]
        np.testing.assert_allclose(fleet.pixel_attributions, expected, rtol=0, atol=1e-9)


# -- method kernel with a target: rounds of growing budgets ---------------------------------------
def target_settings(**changes) -> ExplainSettings:
    # The linear fit's error falls as 1/sqrt(n), so this target takes several rounds (4, about
    # 20,000 evaluations; 1% took 5 rounds and 66,000); at the test fleet's 128 evaluations per
    # shard every round after the first is split into several parts.
    base = dict(segmenter="grid", grid="4x5", masker="constant:0", top_k=2, estimator="linear", target_error=0.02, seed=3)
    return ExplainSettings(**{**base, **changes})


@pytest.mark.parametrize("workers", [1, 2])
def test_a_target_job_equals_in_process_and_the_fixed_budget_run(services, service_settings, start_workers, workers):
    from shapfleet.api.app import create_app
    from shapfleet.broker.keys import rounds_key

    start_workers(workers)
    model = (REPO / "examples" / "shapes.onnx").read_bytes()
    image = (REPO / "examples" / "triangle.png").read_bytes()
    settings = target_settings()
    record = submit_job(services, "t", store_model(services, model), [image], settings)
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    fleet = Explanation.load(result(services, record.id, "attributions.npz"))
    assert fleet.extra["stopped_because"] == "target" and fleet.extra["rounds"] >= 3
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    (local,) = explain([pixels], model, settings)
    (fixed,) = explain([pixels], model, settings.replace(target_error=None, nsamples=fleet.n_coalitions))
    for other in (local.explanation, fixed.explanation):
        np.testing.assert_allclose(fleet.values, other.values, rtol=0, atol=1e-9)
        np.testing.assert_allclose(fleet.std, other.std, rtol=0, atol=1e-9)
    assert {k: v for k, v in fleet.extra.items() if k != "image_index"} == \
        {k: v for k, v in local.explanation.extra.items() if k != "wall_seconds"}  # how it ended, its rounds
    assert final.evaluations_done == fleet.n_evaluations == local.explanation.n_evaluations
    # the job record kept each round's precision, the last one meeting the target
    (precision,) = final.precision.values()
    assert precision["stopped_because"] == "target" and precision["precision"] <= settings.target_error
    assert precision["round_index"] + 1 == fleet.extra["rounds"]
    parts = [k for k in services.store.list(rounds_key(record.id, 0, "")) if "/part-" in k]
    assert len(parts) > fleet.extra["rounds"]  # rounds were split into parts, evaluated by separate tasks
    client = create_app(service_settings.replace(api_keys="k:t")).test_client()
    progress = client.get(f"/v1/jobs/{record.id}", headers={"Authorization": "Bearer k"}).get_json()["progress"]
    assert progress["precision"] == [{"image": 0, **precision}] and progress["evaluations_total"] == fleet.n_evaluations


def test_a_redelivered_round_step_adds_nothing(services, start_workers):
    """A round step sent twice (a redelivery, the watchdog) once the round's parts are stored: the
    round is decided once, its records stay as they were, and the job ends as in-process."""
    from shapfleet.broker.keys import rounds_key
    from shapfleet.workers import steps
    from shapfleet.workers.tasks import runtime_of

    settings = target_settings(target_error=0.05)  # the square's game is noisier: 4 rounds to 5%
    model, image, record = job_stopped_at_round_0(services, start_workers, "square", settings,
                                                  lambda job_id: rounds_key(job_id, 0, "round-0.json"))
    runtime = runtime_of(services.celery)
    n_parts = len(steps._kernel_round(runtime, record.id, 0, 0).parts)
    assert [steps.kernel_round_part(runtime, record.id, 0, 0, p) for p in range(n_parts)][-1] is True
    first = steps.kernel_round(runtime, record.id, 0, 0)
    assert first.next_round == 1
    outcome = services.store.get(rounds_key(record.id, 0, "outcome-0.json"))
    before = services.jobs.get(record.id)
    again = steps.kernel_round(runtime, record.id, 0, 0)
    assert again.parts == [] and services.store.get(rounds_key(record.id, 0, "outcome-0.json")) == outcome
    after = services.jobs.get(record.id)
    assert (after.evaluations_done, after.evaluations_total, after.precision) == \
        (before.evaluations_done, before.evaluations_total, before.precision)
    # a part redelivered after its round was decided changes nothing either
    assert steps.kernel_round_part(runtime, record.id, 0, 0, 0) is True
    assert services.jobs.get(record.id).evaluations_done == before.evaluations_done
    start_workers(1, queues="shards")
    from shapfleet.broker.celery_app import ROUND_TASK

    services.celery.send_task(ROUND_TASK, args=[record.id, 0, 1], queue=services.settings.queue_plan)
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    fleet = Explanation.load(result(services, record.id, "attributions.npz"))
    (local,) = explain([np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))], model, settings)
    np.testing.assert_allclose(fleet.values, local.explanation.values, rtol=0, atol=1e-9)
    assert final.evaluations_done == local.explanation.n_evaluations


def test_cancel_mid_round_stops_the_rounds_and_writes_no_result(services, start_workers):
    from shapfleet.broker.keys import rounds_key

    start_workers(1)
    model = (REPO / "examples" / "shapes.onnx").read_bytes()
    image = (REPO / "examples" / "circle.png").read_bytes()
    # a target far below what the cap reaches: rounds would run until 40,000 coalitions
    settings = target_settings(target_error=None, target_std=1e-9, nsamples=40_000, batch_size=16)
    record = submit_job(services, "t", store_model(services, model), [image], settings)
    deadline = time.monotonic() + 60
    while not services.store.exists(rounds_key(record.id, 0, "round-2.json")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert services.jobs.cancel(record.id)
    time.sleep(3.0)
    rounds = services.jobs.current_round(record.id, 0)
    settled = services.jobs.get(record.id).evaluations_done
    time.sleep(2.0)
    assert services.jobs.current_round(record.id, 0) == rounds <= 3  # no round starts after the cancel
    assert services.jobs.get(record.id).evaluations_done == settled
    assert not services.store.exists(rounds_key(record.id, 0, "final.json"))
    assert services.store.list(result_prefix(record.id)) == []
    assert services.jobs.get(record.id).status == JobStatus.CANCELED
