"""Faults survived with real processes: killed workers, duplicate deliveries, a poison shard, Redis
restarts, the store going away, an API restart, and the watchdog. Every accepted job must reach
exactly one final state, with the undisturbed answer when it succeeds."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from test_pipeline import EXAMPLE_IMAGE, EXAMPLE_MODEL, in_process, wait_final

from shapfleet import ExplainSettings, Explanation
from shapfleet.broker import redis_keys
from shapfleet.broker.celery_app import SHARD_TASK
from shapfleet.broker.keys import result_prefix
from shapfleet.broker.records import JobStatus
from shapfleet.broker.submission import store_model, submit_job
from shapfleet.broker.watchdog import watchdog_pass

pytestmark = pytest.mark.service

LONG = ExplainSettings(n_segments=60, all_classes=True, nsamples=6000, seed=21, batch_size=16)


def settings_for(redis_url: str, seaweed, bucket: str, **overrides):
    """Service settings for a test that brings its own Redis or SeaweedFS (to break it)."""
    from shapfleet.broker.settings import ServiceSettings

    return ServiceSettings(redis_url=redis_url, s3_endpoint=seaweed.endpoint, s3_access_key=seaweed.access_key,
                           s3_secret_key=seaweed.secret_key, s3_bucket=bucket, ort_threads=1, **overrides)


def result_values(services, job_id: str) -> np.ndarray:
    return Explanation.load(services.store.get(f"{result_prefix(job_id)}attributions.npz")).values


def test_sigkill_workers_mid_shard_ten_times(services, start_workers, fault_report):
    """SIGKILL a pool process in the middle of a shard ten times, across as many jobs as that takes:
    every job succeeds, reduced once, with the undisturbed answer."""
    (worker,) = start_workers(1, concurrency=2)
    sha = store_model(services, EXAMPLE_MODEL)
    jobs: dict[str, ExplainSettings] = {}
    kills, deadline = 0, time.monotonic() + 180
    while kills < 10:
        assert time.monotonic() < deadline, f"only {kills} kills"
        running = [j for j in jobs if not services.jobs.get(j).status.is_final]
        if not running:
            settings = LONG.replace(seed=len(jobs))
            jobs[submit_job(services, "t", sha, [EXAMPLE_IMAGE], settings).id] = settings
            continue
        progress = services.redis.hvals(services.jobs.progress_key(running[0]))
        children = worker.children()
        if progress and children:  # a shard is being evaluated
            os.kill(children[kills % len(children)], signal.SIGKILL)
            kills += 1
        time.sleep(0.4)
    for job_id, settings in jobs.items():
        final = wait_final(services, job_id, timeout=180)
        assert final.status == JobStatus.SUCCEEDED, final.error
        assert services.claims.reductions(job_id) == 1
        np.testing.assert_allclose(result_values(services, job_id), in_process(settings).values, rtol=0, atol=1e-10)
    fault_report("SIGKILL a worker process mid-shard", kills, len(jobs), 0, 0)


def test_a_redelivered_shard_of_a_complete_set_enqueues_the_lost_reduce(services, start_workers):
    """The worker that completes a job's shards can die after recording its shard done and before
    enqueuing the reduce. Its redelivered shard finds the set complete and must enqueue the reduce
    itself: without a watchdog nothing else would, and the job would stay running forever."""
    start_workers(1, queues="plan,shards")  # nobody consumes the reduce queue yet
    record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE],
                        LONG.replace(nsamples=600))
    deadline = time.monotonic() + 120
    while not (services.jobs.get(record.id).shards_total
               and services.jobs.get(record.id).shards_done == services.jobs.get(record.id).shards_total):
        assert time.monotonic() < deadline, "the shards did not finish"
        time.sleep(0.1)
    with services.celery.connection_for_write() as connection:  # the reduce message is lost
        assert connection.default_channel.queue_purge(services.settings.queue_reduce) == 1
    start_workers(1, queues="reduce")
    services.celery.send_task(SHARD_TASK, args=[record.id, 0, 0], queue=services.settings.queue_shards)
    final = wait_final(services, record.id, timeout=60)
    assert final.status == JobStatus.SUCCEEDED, final.error
    assert services.claims.reductions(record.id) == 1


def test_duplicate_shard_messages_and_callbacks_reduce_once(services, start_workers, fault_report):
    start_workers(2)
    settings = LONG.replace(nsamples=2000)
    record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], settings)
    wait_until_running = time.monotonic() + 60
    while not services.jobs.get(record.id).shards_total:
        assert time.monotonic() < wait_until_running
        time.sleep(0.05)
    # Publish every shard a second time while the job runs: the duplicates find (or write) the same
    # statistics at the same keys.
    for index in range(services.jobs.get(record.id).shards_total):
        services.celery.send_task(SHARD_TASK, args=[record.id, 0, index], queue=services.settings.queue_shards)
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    # And the reduce message delivered again after success: a no-op.
    from shapfleet.broker.celery_app import REDUCE_TASK

    for _ in range(2):
        services.celery.send_task(REDUCE_TASK, args=[record.id], queue=services.settings.queue_reduce).get(timeout=60)
    assert services.claims.reductions(record.id) == 1
    np.testing.assert_allclose(result_values(services, record.id), in_process(settings).values, rtol=0, atol=1e-10)
    fault_report("every shard message published twice, the reduce twice more", final.shards_total + 2, 1, 0, 0)


def test_visibility_timeout_redelivery(service_settings, start_workers, fault_report):
    """A shard slower than the visibility timeout is delivered again to the other worker; the
    answer is the same and the job is reduced once."""
    from shapfleet.broker.services import Services

    settings = service_settings.replace(visibility_timeout=2, shard_evaluations=6000)
    services = Services.from_settings(settings)
    start_workers(2, settings=settings)
    explain_settings = LONG.replace(nsamples=12000, batch_size=8)
    record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], explain_settings)
    final = wait_final(services, record.id, timeout=180)
    assert final.status == JobStatus.SUCCEEDED, final.error
    assert services.claims.reductions(record.id) == 1
    np.testing.assert_allclose(result_values(services, record.id), in_process(explain_settings).values, rtol=0, atol=1e-10)
    fault_report("redelivery after the visibility timeout (2 s, shards ~5 s)", 1, 1, 0, 0)


def test_poison_shard_fails_the_job_and_the_fleet_keeps_serving(service_settings, start_workers, fault_report):
    """A shard whose worker process dies every time it runs (here: SIGKILLed each time it starts):
    the job fails after a bounded number of deliveries, saying so, and the fleet serves the next job."""
    from shapfleet.broker.services import Services

    settings = service_settings.replace(shard_evaluations=100_000, max_shard_deliveries=3)
    services = Services.from_settings(settings)
    (worker,) = start_workers(1, concurrency=1, settings=settings)
    poison = LONG.replace(nsamples=30000, batch_size=4)  # one long shard
    record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], poison)
    killed, deadline = 0, time.monotonic() + 180
    while not services.jobs.get(record.id).status.is_final:
        assert time.monotonic() < deadline, "the poison job never ended"
        starts = sum(int(v) for k, v in services.redis.hgetall(redis_keys.job_deliveries(record.id)).items()
                     if not k.startswith(b"planning"))  # the shard's starts (the plan's are counted too)
        # A start past the limit is counted and then refused: killing its process too would count 4.
        if killed < starts <= settings.max_shard_deliveries and services.jobs.get(record.id).evaluations_done > 2:
            for child in worker.children():
                os.kill(child, signal.SIGKILL)
            killed = starts
        time.sleep(0.1)
    final = services.jobs.get(record.id)
    assert final.status == JobStatus.FAILED and final.error["type"] == "ShardCrashed", final
    assert "worker process died" in final.error["message"] and killed == 3
    healthy = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], LONG.replace(nsamples=500))
    assert wait_final(services, healthy.id, timeout=120).status == JobStatus.SUCCEEDED
    fault_report("poison shard (worker killed at every start): failed after 3 deliveries; next job", killed, 2, 0, 0)


def test_a_plan_whose_worker_dies_at_every_start_fails_the_job(service_settings, start_workers):
    """Plan messages are counted like shards: a plan that kills its worker every time (a model that
    exhausts memory while planning) fails the job after the limit instead of being redelivered forever.
    Here the earlier starts are recorded as a dead worker's would be, and the next start is refused."""
    from shapfleet.broker.services import Services

    settings = service_settings.replace(max_shard_deliveries=2)
    services = Services.from_settings(settings)
    start_workers(1, settings=settings)
    sha = store_model(services, EXAMPLE_MODEL)
    record = services.jobs.create("t", LONG.replace(nsamples=300).to_dict(), sha, [], deadline_seconds=600)
    for _ in range(2):  # two starts whose worker died before finishing
        services.claims.count_delivery(record.id, "planning#0")
    services.celery.send_task("shapfleet.plan", args=[record.id], queue=settings.queue_plan)
    final = wait_final(services, record.id, timeout=60)
    assert final.status == JobStatus.FAILED and final.error["type"] == "PlanCrashed", final
    assert "planning was started 2 times" in final.error["message"]


def test_watchdog_fails_overdue_jobs_and_redrives_lost_work(services, start_workers, fault_report):
    jobs = services.jobs
    overdue = jobs.create("t", LONG.to_dict(), "0" * 64, ["jobs/x/inputs/0"], deadline_seconds=-1).id
    assert watchdog_pass(services)[overdue] == "failed: deadline exceeded"
    assert jobs.get(overdue).status == JobStatus.FAILED and "deadline" in jobs.get(overdue).error["message"]
    # A job whose plan message was lost: queued, no progress; the watchdog plans it again.
    sha = store_model(services, EXAMPLE_MODEL)
    settings = LONG.replace(nsamples=800)
    record = submit_job(services, "t", sha, [EXAMPLE_IMAGE], settings)
    services.redis.delete(services.settings.queue_plan)  # the plan message is lost
    start_workers(1)
    later = time.time() + services.settings.stall_seconds + 1
    assert watchdog_pass(services, now=later) == {record.id: "re-planned"}
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    np.testing.assert_allclose(result_values(services, record.id), in_process(settings).values, rtol=0, atol=1e-10)
    fault_report("watchdog: job past its deadline failed; lost plan message re-driven", 2, 2, 0, 0)


def test_watchdog_reduces_a_job_whose_reduce_message_was_lost(services, start_workers, fault_report):
    start_workers(1, queues="plan,shards")  # nobody consumes the reduce queue yet
    settings = LONG.replace(nsamples=800)
    record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], settings)
    deadline = time.monotonic() + 60
    while True:
        current = services.jobs.get(record.id)
        if current.shards_total and current.shards_done == current.shards_total:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    services.redis.delete(services.settings.queue_reduce)  # the reduce message is lost
    start_workers(1, queues="reduce")
    assert watchdog_pass(services, now=time.time() + services.settings.stall_seconds + 1) == {record.id: "re-sent the reduce"}
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED and services.claims.reductions(record.id) == 1
    fault_report("watchdog: lost reduce message re-driven", 1, 1, 0, 0)


def test_store_down_for_a_while_is_retried_and_a_long_outage_fails_clearly(tmp_path_factory, redis_server, start_workers,
                                                                          fault_report):
    from servers import SeaweedServer

    from shapfleet.broker.services import Services

    seaweed = SeaweedServer.start(tmp_path_factory.mktemp("flaky-seaweed"))
    try:
        settings = settings_for(redis_server.url, seaweed, "flaky", shard_evaluations=128, storage_retries=6)
        services = Services.from_settings(settings)
        (worker,) = start_workers(1, settings=settings)
        explain_settings = LONG.replace(nsamples=3000)
        record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], explain_settings)
        while services.jobs.get(record.id).shards_done < 2:
            time.sleep(0.05)
        # The store refuses connections for 10 seconds mid-job, then returns on the same port and data.
        seaweed.restart(down_seconds=10)
        final = wait_final(services, record.id, timeout=240)
        assert final.status == JobStatus.SUCCEEDED, final.error
        np.testing.assert_allclose(result_values(services, record.id), in_process(explain_settings).values, rtol=0, atol=1e-10)
        # Down for good: after its bounded retries the job fails with a clear error; it never hangs.
        # A worker allowed 2 retries (1 s and 2 s) shows it as well as 6 would, a minute sooner.
        worker.stop()
        start_workers(1, settings=settings.replace(storage_retries=2))
        record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], explain_settings)
        while services.jobs.get(record.id).shards_done < 1:
            time.sleep(0.05)
        seaweed.stop()
        final = wait_final(services, record.id, timeout=240)
        assert final.status == JobStatus.FAILED and final.error["type"] == "StorageUnavailable", final
        assert "storage unavailable after 2 retries" in final.error["message"]
        fault_report("S3 store down 10 s mid-job (retried), then down for good (clear failure)", 2, 2, 0, 0)
    finally:
        seaweed.stop()


def test_redis_restart_mid_job_loses_nothing(tmp_path_factory, seaweed, start_workers, fault_report):
    """Redis (append-only file, fsync every second) restarts mid-job: every job reaches a final
    state, the succeeded ones with the undisturbed answer; the watchdog re-drives what was lost."""
    from servers import RedisServer

    from shapfleet.broker.services import Services

    redis_server = RedisServer.start(tmp_path_factory.mktemp("aof-redis"), appendonly=True)
    try:
        settings = settings_for(redis_server.url, seaweed, "redis-restart", shard_evaluations=256, stall_seconds=5)
        services = Services.from_settings(settings)
        start_workers(2, settings=settings)
        explain_settings = LONG.replace(nsamples=4000)
        ids = [submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], explain_settings.replace(seed=s)).id
               for s in range(3)]
        while services.jobs.get(ids[0]).shards_done < 2:
            time.sleep(0.05)
        time.sleep(1.5)  # past the append-only file's one-second fsync window for the records
        redis_server.restart(down_seconds=2)
        deadline = time.monotonic() + 240
        while True:
            try:
                records = [services.jobs.get(i) for i in ids]
                if all(r.status.is_final for r in records):
                    break
                watchdog_pass(services)
            except Exception:  # Redis is still coming back
                pass
            assert time.monotonic() < deadline, [services.jobs.get(i) for i in ids]
            time.sleep(1)
        for record, seed in zip(records, range(3)):
            assert record.status == JobStatus.SUCCEEDED, record.error
            expected = in_process(explain_settings.replace(seed=seed)).values
            np.testing.assert_allclose(result_values(services, record.id), expected, rtol=0, atol=1e-10)
        fault_report("Redis (AOF) restarted mid-job", len(ids), len(ids), 0, 0)
    finally:
        redis_server.stop()


def test_api_restart_between_submit_and_poll(service_settings, start_workers, tmp_path, fault_report):
    from servers import ApiServer

    from shapfleet.api.client import Client

    settings = service_settings.replace(api_keys="restart-key:t")
    env = {**os.environ, **settings.environment()}
    start_workers(1)
    first = ApiServer.start(env, tmp_path / "api-1.log")
    client = Client(first.url, "restart-key")
    job = client.submit([EXAMPLE_IMAGE], model=EXAMPLE_MODEL, settings=LONG.replace(nsamples=1500).to_dict())
    first.stop()
    second = ApiServer.start(env, tmp_path / "api-2.log")
    try:
        final = Client(second.url, "restart-key").wait(job["id"], timeout=120)
        assert final["status"] == "succeeded" and final["id"] == job["id"] and final["created_at"] == job["created_at"]
        fault_report("API restarted between submit and poll", 1, 1, 0, 0)
    finally:
        second.stop()


def test_watchdog_frees_a_dead_reducers_claim(services, start_workers, fault_report):
    """A reducer claimed the job and died with its retry lost: the watchdog's new reduce takes over."""
    start_workers(1, queues="plan,shards")
    settings = LONG.replace(nsamples=800)
    record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], settings)
    deadline = time.monotonic() + 60
    while services.jobs.get(record.id).shards_done < services.jobs.get(record.id).shards_total or \
            not services.jobs.get(record.id).shards_total:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    services.redis.delete(services.settings.queue_reduce)  # the reducer's message is gone...
    assert services.claims.claim_reduce(record.id, "a-reducer-that-died", 3600)  # ...after it claimed the job
    start_workers(1, queues="reduce")
    assert watchdog_pass(services, now=time.time() + services.settings.stall_seconds + 1) == {record.id: "re-sent the reduce"}
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED and services.claims.reductions(record.id) == 1
    fault_report("watchdog: a dead reducer's claim freed", 1, 1, 0, 0)


def test_runaway_and_memory_hungry_models_fail_naming_their_limit_while_an_honest_job_runs(
        service_settings, services, start_workers, fault_report):
    """A model whose Loop runs for days and one that expands to 6 GB, both sized from their input, pass
    the upload checks; on the fleet each job fails with the limit it hit (ModelTimeLimit,
    ModelMemoryLimit), the pool processes go on serving, and an honest job submitted while they run
    finishes within twice its undisturbed time."""
    from dataclasses import replace

    from onnx_models import memory_hungry_model, runaway_model

    from shapfleet.api.validation import validate_model

    limits = replace(service_settings.limits, model_call_seconds=3, worker_memory_bytes=3 << 30)
    start_workers(1, concurrency=2, settings=service_settings.replace(limits=limits))
    models = {"ModelTimeLimit": runaway_model(), "ModelMemoryLimit": memory_hungry_model()}
    for model in models.values():
        validate_model(model, limits)  # what POST /v1/models checks: nothing static gives them away
    hostile = {kind: store_model(services, model) for kind, model in models.items()}
    honest = ExplainSettings(n_segments=40, all_classes=True, nsamples=50000, seed=3, batch_size=16)
    honest_sha = store_model(services, EXAMPLE_MODEL)

    def honest_seconds() -> float:
        started = time.monotonic()
        record = wait_final(services, submit_job(services, "honest", honest_sha, [EXAMPLE_IMAGE], honest).id, 180)
        assert record.status == JobStatus.SUCCEEDED, record.error
        return time.monotonic() - started

    honest_seconds()  # the pool processes load the example model once
    undisturbed = honest_seconds()
    small = ExplainSettings(n_segments=4, nsamples=64, resize="32x32")
    attacks = {kind: submit_job(services, "attacker", sha, [EXAMPLE_IMAGE], small).id for kind, sha in hostile.items()}
    time.sleep(0.5)  # both attacks are running
    disturbed = honest_seconds()
    for kind, job_id in attacks.items():
        record = wait_final(services, job_id, 60)
        assert record.status == JobStatus.FAILED and record.error["type"] == kind, record.error
    assert "SHAPFLEET_MODEL_CALL_SECONDS=3" in wait_final(services, attacks["ModelTimeLimit"]).error["message"]
    assert "SHAPFLEET_WORKER_MEMORY_BYTES" in wait_final(services, attacks["ModelMemoryLimit"]).error["message"]
    assert disturbed <= 2 * undisturbed, (disturbed, undisturbed)
    fault_report("a runaway `Loop` (failed `ModelTimeLimit` after 3 s) and a 6 GB expansion (failed `ModelMemoryLimit` "
                 "under a 3 GiB cap), both sized from their input; an honest job submitted meanwhile: "
                 f"{disturbed:.1f} s against {undisturbed:.1f} s undisturbed", 2, 1, 0, 0)


def test_a_job_queued_past_the_stall_period_is_planned_once(services, start_workers, fault_report):
    """The watchdog re-sends the plan of a job queued longer than its stall period (its message may be
    lost); when the job was only waiting, the duplicates must neither plan it twice nor count as crashed
    starts (seven plan messages exceed the delivery limit of five)."""
    settings = LONG.replace(nsamples=800)
    record = submit_job(services, "t", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], settings)
    for n in range(6):  # nobody consumes the queue: each pass finds the job stalled again
        later = time.time() + (n + 1) * (services.settings.stall_seconds + 1)
        assert watchdog_pass(services, now=later) == {record.id: "re-planned"}
    assert services.redis.llen(services.settings.queue_plan) == 7
    start_workers(1)
    final = wait_final(services, record.id)
    assert final.status == JobStatus.SUCCEEDED, final.error
    assert services.claims.reductions(record.id) == 1
    assert int(services.redis.hget(redis_keys.job_deliveries(record.id), "planning#0")) == 1
    np.testing.assert_allclose(result_values(services, record.id), in_process(settings).values, rtol=0, atol=1e-10)
    fault_report("watchdog: a job only waiting in the queue re-sent its plan 6 times; planned once", 6, 1, 0, 0)


def test_cancel_stops_a_model_call_in_flight_and_frees_the_worker(service_settings, services, start_workers, fault_report):
    """Canceling a job whose model call would run for days (the per-call limit set far away) frees the
    only pool process within seconds: the next job then runs."""
    from dataclasses import replace

    from onnx_models import runaway_model

    start_workers(1, concurrency=1, settings=service_settings.replace(
        limits=replace(service_settings.limits, model_call_seconds=3600)))
    small = ExplainSettings(n_segments=4, nsamples=64, resize="32x32")
    runaway = submit_job(services, "attacker", store_model(services, runaway_model()), [EXAMPLE_IMAGE], small).id
    deadline = time.monotonic() + 60
    while services.jobs.status(runaway) != JobStatus.RUNNING:  # its plan calls the model
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    assert services.jobs.cancel(runaway)
    honest = submit_job(services, "honest", store_model(services, EXAMPLE_MODEL), [EXAMPLE_IMAGE], LONG.replace(nsamples=400))
    final = wait_final(services, honest.id, timeout=60)  # the canceled call would hold the process for an hour
    assert final.status == JobStatus.SUCCEEDED, final.error
    assert services.jobs.status(runaway) == JobStatus.CANCELED
    fault_report("cancel of a job inside a model call that would run for an hour; the next job on the only process",
                 1, 1, 0, 0)


def test_a_cancel_landing_during_the_reduce_leaves_no_results(services, start_workers, fault_report):
    """The README promises that a canceled job writes no result: a cancel that lands while the reduce
    runs (it holds the reduce claim) must leave nothing under the job's results."""
    start_workers(1, queues="plan,shards")
    sha = store_model(services, EXAMPLE_MODEL)
    settings = LONG.replace(nsamples=400, n_segments=40)
    reducer, trials = None, 0
    while trials < 8:
        trials += 1
        record = submit_job(services, "t", sha, [EXAMPLE_IMAGE] * 16, settings)
        deadline = time.monotonic() + 120
        while not (services.jobs.get(record.id).shards_total
                   and services.jobs.get(record.id).shards_done == services.jobs.get(record.id).shards_total):
            assert time.monotonic() < deadline, "the shards did not finish"
            time.sleep(0.05)
        reducer = reducer or start_workers(1, queues="reduce")[-1]
        deadline = time.monotonic() + 60
        while not services.redis.exists(redis_keys.job_reduce_lock(record.id)):
            assert time.monotonic() < deadline and services.jobs.status(record.id) == JobStatus.RUNNING
            time.sleep(0.01)
        landed = services.jobs.cancel(record.id)
        deadline = time.monotonic() + 60
        while services.redis.exists(redis_keys.job_reduce_lock(record.id)) and \
                services.jobs.status(record.id) == JobStatus.CANCELED:
            assert time.monotonic() < deadline, "the reducer did not let go"
            time.sleep(0.05)
        if landed:
            time.sleep(0.5)
            assert services.jobs.status(record.id) == JobStatus.CANCELED
            assert services.store.list(result_prefix(record.id)) == []
            break
    else:
        pytest.fail(f"no cancel landed during a reduce in {trials} jobs")
    fault_report("cancel landing during the reduce: canceled, no result written", trials, trials - 1, 0, 0)


def test_retention_drops_working_state_at_once_and_everything_after_expiry(services, start_workers, fault_report):
    """A final job's shard statistics and plans are dropped by the next watchdog pass; after
    SHAPFLEET_RETENTION_SECONDS its record, inputs and results, and an uploaded image, are deleted, so
    Redis and the store shrink back to what they held before (the model and the metrics counters)."""
    from shapfleet.api.validation import store_image_for
    from shapfleet.broker.retention import retention_pass

    start_workers(1)
    sha = store_model(services, EXAMPLE_MODEL)

    def redis_keys_now() -> set[str]:
        return {k.decode() for k in services.redis.scan_iter("shapfleet:*") if not k.startswith(b"shapfleet:metrics:")}

    keys_before, objects_before = redis_keys_now(), set(services.store.list(""))
    image_id, _ = store_image_for(services, "t", EXAMPLE_IMAGE)
    jobs = [submit_job(services, "t", sha, [EXAMPLE_IMAGE], LONG.replace(nsamples=400, seed=s)).id for s in range(2)]
    for job_id in jobs:
        assert wait_final(services, job_id).status == JobStatus.SUCCEEDED
    assert services.store.list(f"jobs/{jobs[0]}/shards/")
    actions = retention_pass(services)
    assert all(actions[j] == "working state dropped" for j in jobs)
    for job_id in jobs:
        assert services.store.list(f"jobs/{job_id}/shards/") == [] and services.store.list(f"jobs/{job_id}/plans/") == []
        assert services.store.list(result_prefix(job_id))  # results stay until they expire
        assert not services.redis.exists(redis_keys.job_deliveries(job_id), redis_keys.job_reduce_lock(job_id))
    assert retention_pass(services, now=time.time() + 60) == {}  # nothing is due yet
    later = time.time() + services.settings.retention_seconds + 1
    actions = retention_pass(services, now=later)
    assert all(actions[j] == "expired: deleted" for j in jobs) and actions[f"image {image_id}"] == "expired: deleted"
    assert redis_keys_now() == keys_before
    assert set(services.store.list("")) == objects_before
    assert services.jobs.list_ids("t", 10) == []
    fault_report("retention: 2 jobs and an uploaded image expired; Redis and the store back to what they held before",
                 3, 2, 0, 0)
