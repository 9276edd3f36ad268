"""onnxruntime sessions: providers (CUDA first where there is one, TF32 off), threads, runs side by
side on the CPU, and running a model whose batch size is fixed. Only onnxruntime's built-in
operators run."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from typing import Callable, Sequence

import numpy as np

from shapfleet.errors import ModelError

log = logging.getLogger(__name__)


def split_runs(batch: np.ndarray, fixed: int | None, at_most: int | None = None,
               at_least: int = 1) -> tuple[list[np.ndarray], list[int]]:
    """The onnxruntime runs of one batch, and how many output rows of each to keep.

    For a model whose batch dimension is ``fixed``, chunks of exactly that size, the last padded by
    repeating its final row (whose outputs are dropped). Otherwise consecutive chunks of at most
    ``at_most`` rows (None: no bound) and at least ``at_least`` of them where there are that many
    rows, as even as they divide (64 rows at most 13 at a time: 13, 13, 13, 13, 12)."""
    if fixed is None:
        parts = -(-len(batch) // at_most) if at_most is not None and len(batch) > at_most else 1
        parts = max(parts, min(at_least, len(batch)))
        chunks = [batch] if parts <= 1 else np.array_split(batch, parts)
        return chunks, [len(chunk) for chunk in chunks]
    chunks, keep = [], []
    for start in range(0, len(batch), fixed):
        chunk = batch[start:start + fixed]
        pad = fixed - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        chunks.append(chunk)
        keep.append(fixed - pad)
    return chunks, keep


def _joined(outputs: list[np.ndarray], keep: list[int]) -> np.ndarray:
    """The runs' outputs in order, each cut to the rows it keeps (a fixed batch's padding dropped)."""
    kept = [np.asarray(out)[:rows] for out, rows in zip(outputs, keep)]
    return kept[0] if len(kept) == 1 else np.concatenate(kept)


class Finished:
    """A batch's outputs, already computed, behind the interface of :class:`PendingRuns`."""

    def __init__(self, value: np.ndarray) -> None:
        self._value = value

    def result(self) -> np.ndarray:
        return self._value

    def cancel(self) -> None:
        pass


class PendingRuns:
    """The runs of one batch, submitted; :meth:`result` waits for them and joins their outputs."""

    def __init__(self, futures: list[Future], keep: list[int], finish: Callable[[np.ndarray], np.ndarray]) -> None:
        self._futures = futures
        self._keep = keep
        self._finish = finish

    def result(self) -> np.ndarray:
        try:
            outputs = [future.result() for future in self._futures]
        except BaseException:
            self.cancel()  # one run failed: the batch's others that have not started are not made
            raise
        return self._finish(_joined(outputs, self._keep))

    def cancel(self) -> None:
        """Drop the runs not yet started (those running finish on their own)."""
        for future in self._futures:
            future.cancel()


class ConcurrentRuns:
    """``workers`` threads that run one model's onnxruntime runs side by side, each run on a single
    intra-op thread of its own.

    On the CPU, W one-thread runs at once do more per second than one run on W threads, which
    synchronise at every operator (the README's "Runs side by side" gives the measurement). Runs of
    one session may be made from several threads at once (onnxruntime's ``Run`` is thread-safe),
    so the weights are held once. A run's result does not depend on which thread made it."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._pid != os.getpid():  # a forked child starts its own threads
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="shapfleet-run")
                self._pid = os.getpid()
            return self._executor

    def submit(self, run: Callable[[np.ndarray], np.ndarray], chunks: list[np.ndarray], keep: list[int],
               finish: Callable[[np.ndarray], np.ndarray] = lambda out: out) -> PendingRuns:
        """Queue ``run`` on every chunk; the runs of later submissions queue behind these."""
        pool = self._pool()
        return PendingRuns([pool.submit(run, chunk) for chunk in chunks], keep, finish)


def submit_runs(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, fixed: int | None,
                at_most: int | None = None, runs: ConcurrentRuns | None = None,
                finish: Callable[[np.ndarray], np.ndarray] = lambda out: out) -> PendingRuns | Finished:
    """``finish(run(batch))`` in the runs :func:`split_runs` gives, side by side on ``runs`` when it
    is given (at least one run per thread), else one after the other in this thread, done when this
    returns."""
    chunks, keep = split_runs(batch, fixed, at_most, runs.workers if runs is not None else 1)
    if runs is not None and len(chunks) > 1:
        return runs.submit(run, chunks, keep, finish)
    return Finished(finish(_joined([run(chunk) for chunk in chunks], keep)))


def run_in_fixed_batches(run, batch: np.ndarray, fixed: int | None, at_most: int | None = None,
                         runs: ConcurrentRuns | None = None) -> np.ndarray:
    """``run(batch)`` in the runs :func:`split_runs` gives (side by side on ``runs``), outputs joined
    in order and a fixed batch's padding dropped."""
    return submit_runs(run, batch, fixed, at_most, runs).result()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@cache
def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu's CUDA provider links against, once.

    Installed as pip packages (``onnxruntime-gpu[cuda,cudnn]``, as the GPU image does) they are not
    on the loader's path, and without this the provider fails to load and onnxruntime silently runs
    on the CPU. ``preload_dlls`` also falls back to the system's libraries (a CUDA base image), and
    does nothing in a CPU-only onnxruntime."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def cuda_provider(provider: str | tuple[str, dict]) -> str | tuple[str, dict]:
    """The CUDA provider with TF32 off unless its options say otherwise; other providers unchanged.

    onnxruntime lets float32 convolutions and matrix products use TF32 on Ampere and newer GPUs
    (10-bit mantissa): model outputs then change by about 1e-3 relative with the batch's shape and
    composition, the same coalition gives different outputs in different batches, and exact
    Shapley values are off by far more than float32 rounding (measured on an H100: 1.8e-5 on values
    of 4e-3). Explanations are differences of outputs, so shapfleet keeps float32 arithmetic."""
    name, options = provider if isinstance(provider, tuple) else (provider, {})
    if name != "CUDAExecutionProvider":
        return provider
    return name, {"use_tf32": "0", **options}


def session_device(session) -> tuple[str, int]:
    """Where the session's graph runs: ``("cuda", device_id)`` when the CUDA provider comes first,
    else ``("cpu", 0)``."""
    providers = session.get_providers()
    if providers and providers[0] == "CUDAExecutionProvider":
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0


def create_session(model_bytes: bytes, providers: Sequence[str | tuple[str, dict]] | None = None,
                   threads: int | None = None):
    """An onnxruntime session for already-inspected model bytes (built-in operators only)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The engine does numpy work between model calls; spinning onnxruntime threads would fight it for
    # the cores (a model batch followed by a small matmul takes about twice as long with spinning on).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    providers = [cuda_provider(p) for p in (providers or default_providers())]
    if any(isinstance(p, tuple) and p[0] == "CUDAExecutionProvider" for p in providers):
        load_cuda_libraries()
    try:
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ModelError(f"onnxruntime cannot load the model: {e}") from e
    wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if session.get_providers()[0] != wanted:
        # onnxruntime falls back to the next provider (the CPU) when one cannot start, saying nothing
        # at our log level: a GPU worker running on its CPU must be visible in its log.
        log.warning("onnxruntime could not start %s and runs this model on %s", wanted, session.get_providers()[0])
    return session


_TRIAL_LOAD = """
import sys
import onnxruntime as ort
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
options.log_severity_level = 3
try:
    ort.InferenceSession(sys.stdin.buffer.read(), sess_options=options, providers=["CPUExecutionProvider"])
except Exception as e:
    sys.stderr.write(str(e)[:2000])
    sys.exit(3)
"""


def trial_load(model_bytes: bytes, seconds: float, memory_bytes: int) -> None:
    """Check that onnxruntime loads the model with its built-in operators, without running anything
    of it where it could hurt: in a child process with graph optimisation off (no constant folding),
    at most ``memory_bytes`` of address space (RLIMIT_AS) and ``seconds`` of wall time. Raises
    :class:`ModelError` saying which failed."""
    import resource
    import subprocess
    import sys

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    try:
        result = subprocess.run([sys.executable, "-c", _TRIAL_LOAD], input=model_bytes, capture_output=True,
                                timeout=seconds, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        raise ModelError(f"loading the model took longer than {seconds:g} s") from None
    if result.returncode == 3:
        raise ModelError(f"onnxruntime cannot load the model: {result.stderr.decode(errors='replace').strip()}")
    if result.returncode != 0:
        raise ModelError(f"loading the model needs more than {memory_bytes} bytes of memory, or crashed onnxruntime "
                         f"(exit status {result.returncode})")
