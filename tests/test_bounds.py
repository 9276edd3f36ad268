"""Every model call is bounded in time, memory and by cancellation (:mod:`shapfleet.workers.engine.bounds`),
on models built to run for days or allocate without end from sizes computed from their input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx_models import memory_hungry_model, runaway_model

from shapfleet.errors import Canceled, ModelTimeLimit
from shapfleet.workers.engine import bounds
from shapfleet.workers.engine.bounds import BOUNDS, run_bounded

IMAGE = {"image": np.ones((1, 3, 32, 32), np.float32)}


def _session(model: bytes):
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def _in_thread(call, timeout: float = 60.0):
    """Run ``call`` in a thread and return what it raised; fail if it is still running after ``timeout``
    (a bound that does not hold would hang the test otherwise)."""
    outcome: list = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - the outcome is what the test checks
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"the call was still running after {timeout} s"
    return outcome[0]


def test_a_runaway_loop_is_terminated_at_the_time_bound_and_the_session_runs_again():
    session = _session(runaway_model())

    def call():
        with BOUNDS.scope(seconds=0.5):
            run_bounded(lambda options: session.run(None, IMAGE, options), "a batch of 1")

    error = _in_thread(call)
    assert isinstance(error, ModelTimeLimit), error
    assert "SHAPFLEET_MODEL_CALL_SECONDS=0.5" in str(error) and "a batch of 1" in str(error)
    # The same session serves the next call normally (a terminated run leaves nothing behind).
    quick = _session(runaway_model(iterations=10))
    with BOUNDS.scope(seconds=5):
        assert run_bounded(lambda options: quick.run(None, IMAGE, options), "x")[0].shape == (1, 3)


def test_a_stop_reason_cancels_the_call_in_flight_and_every_later_one():
    session = _session(runaway_model())
    canceled = threading.Event()

    def call():
        with BOUNDS.scope(stop=lambda: "job j is no longer running" if canceled.is_set() else None):
            try:
                run_bounded(lambda options: session.run(None, IMAGE, options), "a batch of 1")
            finally:
                # Later calls of the scope stop before they start.
                with pytest.raises(Canceled):
                    run_bounded(lambda options: pytest.fail("a canceled scope ran a call"), "a batch of 1")

    threading.Timer(0.5, canceled.set).start()
    error = _in_thread(call)
    assert isinstance(error, Canceled) and "no longer running" in str(error)


def test_runs_side_by_side_are_each_terminated_at_the_time_bound():
    """On the CPU a model's runs go side by side (:class:`ConcurrentRuns`): every call in flight is
    watched, not only the latest one to start."""
    from shapfleet.workers.engine.sessions import ConcurrentRuns

    session = _session(runaway_model())
    runs = ConcurrentRuns(2)
    started = threading.Barrier(3)

    def run(chunk):
        started.wait()
        return run_bounded(lambda options: session.run(None, {"image": chunk}, options), "a batch of 1")[0]

    outcomes: list = []

    def call():
        with BOUNDS.scope(seconds=0.5):
            pending = runs.submit(run, [IMAGE["image"], IMAGE["image"]], [1, 1])
            started.wait()
            for future in pending._futures:
                outcomes.append(future.exception(timeout=60))

    assert _in_thread(call) is None
    assert len(outcomes) == 2 and all(isinstance(e, ModelTimeLimit) for e in outcomes), outcomes


def test_a_call_that_ignores_termination_is_handed_to_on_stuck(monkeypatch):
    monkeypatch.setattr(bounds, "GRACE_SECONDS", 0.3)
    stuck: list = []
    release = threading.Event()

    def call():
        with BOUNDS.scope(seconds=0.2, on_stuck=lambda error: (stuck.append(error), release.set())):
            run_bounded(lambda options: release.wait(30), "one enormous kernel")

    _in_thread(call)
    assert len(stuck) == 1 and isinstance(stuck[0], ModelTimeLimit)


def test_without_a_scope_calls_run_unwatched():
    session = _session(runaway_model(iterations=3))
    assert run_bounded(lambda options: session.run(None, IMAGE, options), "x")[0].shape == (1, 3)


def test_an_allocation_past_the_process_memory_cap_fails_the_call_naming_the_ceiling(tmp_path: Path):
    """In a child process capped as a worker's pool process is (``limit_process_memory``), a model that
    expands to 6 GB fails its call with the error naming SHAPFLEET_WORKER_MEMORY_BYTES, and the process
    goes on to run an honest call."""
    model = tmp_path / "hungry.onnx"
    model.write_bytes(memory_hungry_model())
    script = textwrap.dedent(f"""
        import numpy as np, onnxruntime as ort
        from shapfleet.errors import ModelMemoryLimit
        from shapfleet.workers.engine.bounds import BOUNDS, run_bounded
        from shapfleet.workers.tasks import limit_process_memory
        session = ort.InferenceSession({str(model)!r}, providers=["CPUExecutionProvider"])
        cap = 2 << 30
        assert limit_process_memory(cap, gpus=0)
        image = {{"image": np.ones((1, 3, 32, 32), np.float32)}}
        with BOUNDS.scope(memory_bytes=cap):
            try:
                run_bounded(lambda o: session.run(None, image, o), "a batch of 1")
                raise SystemExit("the 6 GB expansion ran")
            except ModelMemoryLimit as e:
                print("refused:", e)
            small = np.zeros((1000, 1000))
            print("still serving", small.sum())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout
    assert "SHAPFLEET_WORKER_MEMORY_BYTES=2147483648" in result.stdout and "still serving 0.0" in result.stdout


def test_resident_memory_is_read():
    assert bounds.resident_bytes() > 10 << 20
