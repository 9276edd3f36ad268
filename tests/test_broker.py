"""Job records, the object stores, settings and the RabbitMQ broker, against real servers."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from shapfleet.broker.jobs import JobStore
from shapfleet.broker.records import JobStatus, MemoryJobs, new_job_id
from shapfleet.broker.settings import ServiceSettings
from shapfleet.broker.store import (
    LocalStore,
    MemoryStore,
    ObjectNotFound,
    S3Store,
    StoreError,
    TransientStoreError,
    artifact_bytes,
)
from shapfleet.errors import JobNotFound

pytestmark = pytest.mark.service


@pytest.fixture(params=["redis", "memory"])
def jobs(request) -> JobStore | MemoryJobs:
    """Both kinds of job records: the steps run on either, so they must answer every call alike."""
    if request.param == "memory":
        return MemoryJobs()
    return request.getfixturevalue("services").jobs


@pytest.fixture
def redis_jobs(services) -> JobStore:
    return services.jobs


def fetch(url: str) -> tuple[int, bytes]:
    """GET a URL; (status, body), closing the connection whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def make(jobs: JobStore, tenant: str = "t") -> str:
    return jobs.create(tenant, {"seed": 1}, "0" * 64, ["jobs/x/inputs/0"], deadline_seconds=60).id


def test_state_machine_reaches_exactly_one_final_state(jobs):
    job_id = make(jobs)
    assert jobs.get(job_id).status == JobStatus.QUEUED
    assert not jobs.succeed(job_id, [])  # queued cannot succeed
    assert jobs.start(job_id) and not jobs.start(job_id)
    record = jobs.get(job_id)
    assert record.status == JobStatus.RUNNING and record.started_at >= record.created_at
    assert jobs.succeed(job_id, [{"name": "a"}])
    # Once final, nothing moves it: not a late failure, a cancel, or a second success.
    assert not jobs.fail(job_id, "X", "late") and not jobs.cancel(job_id) and not jobs.succeed(job_id, [])
    final = jobs.get(job_id)
    assert final.status == JobStatus.SUCCEEDED and final.error is None and final.results == [{"name": "a"}]
    assert final.completed_at >= final.started_at
    if isinstance(jobs, JobStore):
        assert job_id not in jobs.overdue(now=time.time() + 3600)  # final jobs leave the active set


def test_cancel_and_fail_from_queued_and_concurrent_transitions(jobs):
    a, b = make(jobs), make(jobs)
    assert jobs.cancel(a) and jobs.get(a).status == JobStatus.CANCELED
    assert jobs.fail(b, "ModelError", "bad model") and jobs.get(b).error == {"type": "ModelError", "message": "bad model"}
    c = make(jobs)
    jobs.start(c)
    outcomes = [jobs.succeed(c, []), jobs.fail(c, "X", "y"), jobs.cancel(c)]
    assert outcomes == [True, False, False]


def test_progress_counts_each_shard_once(jobs):
    job_id = make(jobs)
    jobs.set_totals(job_id, shard_counts=[2, 1], evaluations_total=300, planning_evaluations=2)
    assert jobs.shard_counts(job_id) == [2, 1] and jobs.get(job_id).shards_total == 3
    jobs.set_shard_progress(job_id, "0/0", 50)
    jobs.set_shard_progress(job_id, "0/0", 98)  # the same shard later (or rerun): overwritten, not added
    image_0 = ["0/0", "0/1"]
    assert jobs.shard_done(job_id, "0/0", image_0) == (True, 1, False)
    assert jobs.shard_done(job_id, "0/0", image_0) == (False, 1, False)  # a redelivered shard is not counted again
    assert jobs.shard_done(job_id, "0/1", image_0) == (True, 2, True)  # its image's shards are all done
    assert jobs.shard_done(job_id, "0/1", image_0) == (False, 2, True)  # and stay so for a redelivery
    record = jobs.get(job_id)
    assert (record.shards_done, record.evaluations_done) == (2, 100)
    assert jobs.missing_shards(job_id) == [(1, 0)]


def test_partition_rounds_and_parts_are_counted_once(jobs):
    job_id = make(jobs)
    assert jobs.current_round(job_id, 0) == 0
    jobs.set_round(job_id, 0, 2)
    jobs.set_round(job_id, 0, 1)  # a late step of an earlier round never moves it back
    assert (jobs.current_round(job_id, 0), jobs.current_round(job_id, 1)) == (2, 0)
    assert jobs.round_part_done(job_id, 0, 2, 0) == (True, 1)
    assert jobs.round_part_done(job_id, 0, 2, 0) == (False, 1)
    assert jobs.round_part_done(job_id, 0, 2, 1) == (True, 2) and jobs.round_part_done(job_id, 1, 2, 0) == (True, 1)


def test_tenant_listing_and_isolation(redis_jobs):
    jobs = redis_jobs
    ids = [make(jobs, "alpha") for _ in range(5)]
    other = make(jobs, "beta")
    listed = [i for i, _ in jobs.list_ids("alpha", limit=10)]
    assert listed == list(reversed(ids))
    first_page = jobs.list_ids("alpha", limit=2)
    second_page = jobs.list_ids("alpha", limit=2, before=first_page[-1][1])
    assert [i for i, _ in first_page + second_page] == list(reversed(ids))[:4]
    with pytest.raises(JobNotFound):
        jobs.get(other, tenant="alpha")
    with pytest.raises(JobNotFound):
        jobs.get(new_job_id())


def test_deadline_index(redis_jobs):
    jobs = redis_jobs
    job_id = jobs.create("t", {}, "0" * 64, [], deadline_seconds=-1).id
    assert job_id in jobs.overdue()


@pytest.mark.parametrize("kind", ["s3", "local", "memory"])
def test_object_store_round_trip(kind, service_settings, tmp_path):
    store = {"s3": lambda: S3Store(service_settings), "local": lambda: LocalStore(tmp_path / "store"),
             "memory": MemoryStore}[kind]()
    store.put("jobs/a/results/x.npz", b"abc")
    store.put("jobs/a/results/1/y.png", b"defg")
    store.put("jobs/b/inputs/0", b"z")
    assert store.get("jobs/a/results/x.npz") == b"abc" and store.size("jobs/a/results/1/y.png") == 4
    assert store.exists("jobs/b/inputs/0") and not store.exists("jobs/b/inputs/1")
    assert store.list("jobs/a/") == ["jobs/a/results/1/y.png", "jobs/a/results/x.npz"]
    with pytest.raises(ObjectNotFound):
        store.get("jobs/a/nothing")
    # byte ranges: what a class page stored in its image's pages object is read as
    assert store.get_range("jobs/a/results/1/y.png", 1, 2) == b"ef" and store.get_range("jobs/a/results/x.npz", 0, 3) == b"abc"
    assert artifact_bytes(store, {"key": "jobs/a/results/1/y.png", "offset": 3, "size": 1}) == b"g"
    assert artifact_bytes(store, {"key": "jobs/a/results/1/y.png", "size": 4}) == b"defg"
    with pytest.raises(StoreError):  # past the object's end: refused, never a short page
        store.get_range("jobs/a/results/1/y.png", 2, 3)
    with pytest.raises(ObjectNotFound):
        store.get_range("jobs/a/nothing", 0, 1)
    for bad in ("../etc/passwd", "jobs/../../x", "/abs", "jobs//x"):
        with pytest.raises(StoreError):
            store.put(bad, b"")
    store.delete_prefix("jobs/a/")
    assert store.list("jobs/a/") == [] and store.exists("jobs/b/inputs/0")
    store.check()


def test_s3_bucket_is_created_and_presigned_urls_work_and_expire(service_settings):
    settings = service_settings.replace(s3_bucket="fresh-bucket-" + new_job_id()[-8:])
    store = S3Store(settings)
    store.put("jobs/j/results/a.png", b"png bytes")  # creates the bucket on first use
    url = store.presigned_url("jobs/j/results/a.png", expires=60)
    assert fetch(url) == (200, b"png bytes")
    assert fetch(url.split("?")[0])[0] == 403  # no signature, no access
    short = store.presigned_url("jobs/j/results/a.png", expires=1)
    time.sleep(2.5)
    assert fetch(short)[0] == 403


def test_signed_requests_store_and_read_any_key_the_store_accepts_and_a_wrong_secret_is_refused(service_settings):
    """S3Store signs its own PUT, GET and HEAD requests (broker/s3_signed.py): the server checks each
    signature, so bytes and content type read back through boto3 (which signs its own), and boto3's
    writes read back through ours, prove the canonical requests right, keys with spaces, non-ASCII
    and reserved characters included. A missing key is ObjectNotFound for GET and HEAD; a wrong
    secret gets the server's 403 as a StoreError for each method."""
    store = S3Store(service_settings)
    data = bytes(range(256)) * 10
    keys = ("jobs/s/results/a b/ü+x=1&y.png", "jobs/s/results/~tilde_(1)!*'.png", "jobs/s/results/plain.npz")
    for key in keys:
        store.put(key, data, "image/png")
        assert store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read() == data, key
        assert store.get(key) == data and store.exists(key) and store.size(key) == len(data), key
        store.client.put_object(Bucket=store.bucket, Key=key + ".boto3", Body=data[::-1])
        assert store.get(key + ".boto3") == data[::-1] and store.size(key + ".boto3") == len(data), key
    head = store.client.head_object(Bucket=store.bucket, Key="jobs/s/results/plain.npz")
    assert head["ContentType"] == "image/png" and head["ContentLength"] == len(data)
    store.put("jobs/s/results/empty", b"")
    assert store.get("jobs/s/results/empty") == b"" and store.size("jobs/s/results/empty") == 0
    with pytest.raises(ObjectNotFound):
        store.get("jobs/s/results/missing")
    with pytest.raises(ObjectNotFound):
        store.size("jobs/s/results/missing")
    assert not store.exists("jobs/s/results/missing")
    wrong = S3Store(service_settings.replace(s3_secret_key="not-the-secret"))
    wrong._bucket_ready = True  # the bucket exists; only the signed requests are tried
    for attempt in (lambda: wrong.put("jobs/s/results/x", b"x"), lambda: wrong.get(keys[2]), lambda: wrong.exists(keys[2])):
        with pytest.raises(StoreError, match="403"):
            attempt()
    assert not store.exists("jobs/s/results/x")


def test_a_request_to_an_unreachable_store_is_a_transient_error(service_settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3Store(service_settings.replace(s3_endpoint=f"http://127.0.0.1:{port}"))
    store._bucket_ready = True  # past the bucket check: the signed requests themselves meet the closed port
    with pytest.raises(TransientStoreError, match="unreachable during put"):
        store.put("jobs/x", b"x")
    with pytest.raises(TransientStoreError, match="unreachable during get"):
        store.get("jobs/x")
    with pytest.raises(TransientStoreError, match="unreachable during head"):
        store.exists("jobs/x")


def test_presigned_urls_use_the_public_endpoint(service_settings):
    public = service_settings.replace(s3_public_endpoint="http://files.example.test:9000")
    url = S3Store(public).presigned_url("jobs/j/results/a.png", 60)
    assert url.startswith("http://files.example.test:9000/")


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8333", "https://files.example.test", "http://files.example.test:9000/base",
                                      "http://[::1]:8333"])
def test_presigned_urls_are_the_urls_boto3_signs_for_the_same_time(endpoint):
    """Presigned URLs are signed by hand (broker/s3_signed.py); at a fixed clock each is exactly the
    URL boto3's generate_presigned_url gives, for keys with spaces, non-ASCII and reserved characters."""
    import datetime
    from unittest import mock

    import boto3
    from botocore.config import Config

    settings = ServiceSettings(s3_endpoint="http://127.0.0.1:1", s3_public_endpoint=endpoint,
                               s3_access_key="key/with+odd", s3_secret_key="secret")
    boto = boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
                        aws_access_key_id=settings.s3_access_key, aws_secret_access_key=settings.s3_secret_key,
                        region_name=settings.s3_region)
    signer = S3Store(settings)._public
    # One signer, keys signed at the same time (which share their query) and at other times and
    # expiries in between (which do not).
    for now, expires in ((1796300000.0, 900), (1796300000.0, 900), (1796300001.0, 900), (1796300001.0, 60),
                         (1796386400.0, 60), (1796300000.0, 900)):
        clock = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(tzinfo=None)
        for key in ("jobs/j/results/a.png", "jobs/j/results/a b/ü+x=1&y~(1)!*'.png"):
            with mock.patch("botocore.auth.get_current_datetime", return_value=clock):
                expected = boto.generate_presigned_url("get_object", Params={"Bucket": settings.s3_bucket, "Key": key},
                                                       ExpiresIn=expires)
            assert signer.presigned_get_url(key, expires, now=now) == expected


def test_presigned_urls_of_awkward_keys_are_served_by_the_store(service_settings):
    store = S3Store(service_settings)
    for key in ("jobs/p/results/a b/ü+x=1&y.png", "jobs/p/results/~tilde_(1)!*'.png"):
        store.put(key, key.encode(), "image/png")
        assert fetch(store.presigned_url(key, expires=60)) == (200, key.encode()), key


def test_unreachable_store_is_a_transient_error(service_settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3Store(service_settings.replace(s3_endpoint=f"http://127.0.0.1:{port}"))
    with pytest.raises(TransientStoreError):
        store.get("jobs/x")


def test_settings_from_environment():
    settings = ServiceSettings.from_env({"SHAPFLEET_REDIS_URL": "redis://h:1/2", "SHAPFLEET_SHARD_EVALUATIONS": "99",
                                         "SHAPFLEET_MAX_NSAMPLES": "5", "SHAPFLEET_S3_SECRET_KEY": "hidden"})
    assert settings.redis_url == settings.celery_broker_url == "redis://h:1/2"
    assert settings.shard_evaluations == 99 and settings.limits.max_nsamples == 5
    assert "hidden" not in repr(settings)
    assert ServiceSettings.from_env(settings.environment()) == settings
    with pytest.raises(ValueError, match="SHAPFLEET_MAX_SHARDS must be an integer"):
        ServiceSettings.from_env({"SHAPFLEET_MAX_SHARDS": "many"})
    with pytest.raises(ValueError, match=r"SHAPFLEET_ORT_THREADS must be a whole number in 1..256, got 0"):
        ServiceSettings.from_env({"SHAPFLEET_ORT_THREADS": "0"})
    assert ServiceSettings.from_env({"SHAPFLEET_ORT_THREADS": "2"}).ort_threads == 2


def _rabbitmq_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _rabbitmq_reachable(), reason="no RabbitMQ on 127.0.0.1:5672 (the broker test needs one)")
def test_rabbitmq_as_broker(service_settings, start_workers):
    from test_pipeline import EXAMPLE_IMAGE, EXAMPLE_MODEL, in_process, wait_final

    from shapfleet import ExplainSettings, Explanation
    from shapfleet.broker.services import Services
    from shapfleet.broker.submission import store_model, submit_job

    # RabbitMQ keeps queues between runs: private queue names keep this run's messages apart.
    suffix = new_job_id()[-6:]
    settings = service_settings.replace(broker_url="amqp://guest:guest@127.0.0.1:5672//", queue_plan=f"plan-{suffix}",
                                        queue_shards=f"shards-{suffix}", queue_reduce=f"reduce-{suffix}")
    services = Services.from_settings(settings)
    start_workers(1, settings=settings, queues=f"plan-{suffix},shards-{suffix},reduce-{suffix}")
    explain_settings = ExplainSettings(n_segments=20, top_k=1, nsamples=300, seed=2)
    try:
        record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], explain_settings)
        final = wait_final(services, record.id)
    finally:
        with services.celery.connection_for_write() as connection:
            for queue in (settings.queue_plan, settings.queue_shards, settings.queue_reduce):
                connection.default_channel.queue_delete(queue)
    assert final.status == JobStatus.SUCCEEDED, final.error
    fleet = Explanation.load(services.store.get(f"jobs/{record.id}/results/attributions.npz"))
    np.testing.assert_allclose(fleet.values, in_process(explain_settings).values, rtol=0, atol=1e-10)
