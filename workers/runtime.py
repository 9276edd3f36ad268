"""What the pipeline's steps run against, and this process's caches.

A :class:`Runtime` gives the steps of :mod:`shapfleet.workers.steps` an object store, job records, the
policy that sizes shards and the tenant limits, and caches the onnxruntime session per model (created
lazily in the process that uses it, after Celery's fork) and recent plans. :class:`ServiceRuntime` is the
fleet's (S3 or a folder store, Redis records, from :class:`~shapfleet.broker.services.Services`);
:class:`LocalRuntime` is the in-process run's (memory store, memory records, no tenant limits).
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from shapfleet.broker.keys import job_prefix, model_key, plan_key
from shapfleet.broker.records import JobRecords, JobStatus, MemoryJobs
from shapfleet.broker.settings import Limits
from shapfleet.broker.store import MemoryStore, ObjectStore
from shapfleet.errors import ObjectNotFound
from shapfleet.workers.engine.bounds import BOUNDS
from shapfleet.workers.engine.estimation import ShardStatistics
from shapfleet.workers.engine.inspection import ModelInfo, inspect_model
from shapfleet.workers.engine.model import ModelSessions, OnnxClassifier
from shapfleet.workers.engine.partition import PartitionPlan
from shapfleet.workers.engine.planning import JobPlan
from shapfleet.workers.engine.settings import ExplainSettings

if TYPE_CHECKING:
    from shapfleet.broker.services import Services

PLAN_CACHE_SIZE = 8


#: The prefork pool index of this process (set by the worker at fork); None outside a pool.
process_index: int | None = None


def session_providers(index: int | None, gpus: int, available: list[str]) -> list | None:
    """Execution providers for a worker process: with ``gpus`` > 0 and the CUDA provider available,
    pool process ``index`` runs on GPU ``index mod gpus``; otherwise the defaults (CUDA first if any)."""
    if gpus > 0 and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": (index or 0) % gpus}), "CPUExecutionProvider"]
    return None


@dataclass(frozen=True)
class StepPolicy:
    """How the steps size work and what they refuse.

    ``shard_evaluations``/``max_shards``: target evaluations per shard (or partition part) and the most
    per image; ``fixed_shards``, when set, is every image's shard count instead (``--shards``).
    ``limits``: the tenant limits a plan is checked against (None in-process: the user's own machine).
    """

    shard_evaluations: int = 512
    max_shards: int = 64
    fixed_shards: int | None = None
    limits: Limits | None = None

    def shards_for(self, plan: JobPlan) -> int:
        if self.fixed_shards is not None:
            return self.fixed_shards
        return plan.shards_for(self.shard_evaluations, self.max_shards)


class Runtime:
    """The store, records and policy the steps use, with this process's session and plan caches.

    ``reads_local_files``: whether the steps may read paths a setting names (a masker's reference image
    or background set) and take pixel arrays as stored inputs; true only in-process, where the paths
    and arrays are the user's own. A fleet worker reads nothing but the job's stored inputs.
    """

    reads_local_files = False

    def __init__(self, policy: StepPolicy, ort_threads: int | None = None, gpus: int = 0) -> None:
        self.policy = policy
        self.ort_threads = ort_threads
        self.gpus = gpus
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._models: dict[str, tuple[bytes, ModelSessions]] = {}
        self._infos: dict[tuple[str, str], ModelInfo] = {}
        self._plans: OrderedDict[tuple[str, int], JobPlan | PartitionPlan] = OrderedDict()

    @property
    def store(self) -> ObjectStore:
        raise NotImplementedError

    @property
    def jobs(self) -> JobRecords:
        raise NotImplementedError

    def record_shard_metrics(self, seconds: float, evaluations: int) -> None:
        """Count one newly finished shard in fleet-wide metrics (nothing to count in-process)."""

    def model_call_bounds(self, job_id: str):
        """A context in which the job's model calls are bounded (:mod:`~shapfleet.workers.engine.bounds`):
        each stops within a second once the job is no longer running (canceled, failed elsewhere), and
        under tenant limits also runs at most ``model_call_seconds`` in a process of at most
        ``worker_memory_bytes`` resident memory."""
        limits = self.policy.limits

        def stop() -> str | None:
            return None if self.jobs.status(job_id) == JobStatus.RUNNING else f"job {job_id} is no longer running"

        return BOUNDS.scope(seconds=limits.model_call_seconds if limits else None,
                            memory_bytes=limits.worker_memory_bytes if limits else None,
                            stop=stop, on_stuck=lambda error: self.give_up_process(job_id, error))

    def give_up_process(self, job_id: str, error: Exception) -> None:
        """A model call that its bounds stopped has not returned (one kernel that never ends): the
        fleet records the job's failure and ends this process; in-process nothing can be done but wait."""

    # -- round records (method partition's states and chosen rounds) -----------------------------
    def has_record(self, key: str) -> bool:
        return self.store.exists(key)

    def put_record_once(self, key: str, value, encode: Callable[[object], bytes]) -> bool:
        """Store a round record unless one is stored already (a redelivered step keeps the first, so
        every worker continues from the same bytes); returns whether this call stored it."""
        if self.store.exists(key):
            return False
        self.store.put(key, encode(value), "application/json")
        return True

    def get_record(self, key: str, decode: Callable[[bytes], object]):
        return decode(self.store.get(key))

    def drop_records(self, prefix: str) -> None:
        """Delete the round records (and round parts' outputs) whose keys start with ``prefix``."""
        self.store.delete_prefix(prefix)

    def name_of(self, key: str, default: str) -> str:
        """How messages name the stored input at ``key``: ``default`` (the fleet names images by their
        place in the job), or in-process the file or array the user gave."""
        return default

    def _check_fork(self) -> None:
        if self._pid != os.getpid():  # never share sessions across a fork
            self._reset()

    def classifier(self, sha256: str, settings: ExplainSettings, build_ahead: bool = False) -> OnnxClassifier:
        """An adapter for the job's settings around this process's one session for the model (with
        ``build_ahead``, its sessions are built on a thread: see :meth:`ModelSessions.build_ahead`)."""
        self._check_fork()
        if sha256 not in self._models:
            import onnxruntime

            data = self.store.get(model_key(sha256))
            providers = session_providers(process_index, self.gpus, onnxruntime.get_available_providers())
            self._models[sha256] = (data, ModelSessions(data, providers=providers, threads=self.ort_threads))
        data, sessions = self._models[sha256]
        info_key = (sha256, settings.layout)
        if info_key not in self._infos:
            self._infos[info_key] = inspect_model(data, settings.layout)
        return OnnxClassifier(data, settings, sessions=sessions, info=self._infos[info_key], build_ahead=build_ahead)

    def remember_plan(self, job_id: str, image_index: int, plan: JobPlan | PartitionPlan) -> None:
        """Cache a plan this process just made (the steps store it too)."""
        self._check_fork()
        self._plans[(job_id, image_index)] = plan
        while len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)

    def plan(self, job_id: str, image_index: int) -> JobPlan:
        return self._cached_plan(job_id, image_index, JobPlan)

    def partition_plan(self, job_id: str, image_index: int) -> PartitionPlan:
        return self._cached_plan(job_id, image_index, PartitionPlan)

    def _cached_plan(self, job_id: str, image_index: int, kind):
        self._check_fork()
        key = (job_id, image_index)
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        plan = from_npz(self.store.get(plan_key(job_id, image_index)), kind)
        self.remember_plan(job_id, image_index, plan)
        return plan


class ServiceRuntime(Runtime):
    """The fleet's runtime: the store and Redis records of :class:`Services` (reopened after a fork)."""

    def __init__(self, services: Services) -> None:
        settings = services.settings
        super().__init__(StepPolicy(settings.shard_evaluations, settings.max_shards, limits=settings.limits),
                         ort_threads=settings.ort_threads, gpus=settings.gpus)
        self.services = services

    @property
    def store(self) -> ObjectStore:
        return self.services.store

    @property
    def jobs(self) -> JobRecords:
        return self.services.jobs

    def record_shard_metrics(self, seconds: float, evaluations: int) -> None:
        from shapfleet.broker.jobs import record_shard_metrics

        record_shard_metrics(self.services.redis, seconds, evaluations)

    def give_up_process(self, job_id: str, error: Exception) -> None:
        import logging

        logging.getLogger(__name__).error("job %s: %s; the call did not stop, so this process ends", job_id, error)
        try:
            self.jobs.fail(job_id, type(error).__name__, str(error))
        finally:
            # The pool replaces the process; the task's message is redelivered and finds the job final.
            os._exit(70)


class LocalRuntime(Runtime):
    """The in-process run's runtime: a memory store and memory records owned by this process."""

    reads_local_files = True

    def __init__(self, policy: StepPolicy, ort_threads: int | None = None, store: MemoryStore | None = None) -> None:
        super().__init__(policy, ort_threads=ort_threads)
        self._store = store or MemoryStore()
        self._jobs = MemoryJobs()
        self.names: dict[str, str] = {}  # store key -> the file or array it was read from
        self._records: dict[str, object] = {}

    @property
    def store(self) -> MemoryStore:
        return self._store

    @property
    def jobs(self) -> MemoryJobs:
        return self._jobs

    def name_of(self, key: str, default: str) -> str:
        return self.names.get(key, default)

    def forget(self, job_id: str) -> None:
        """Drop a finished job's stored inputs, plans, statistics and records (a long run of many
        images keeps only the explanations it returns)."""
        prefix = job_prefix(job_id)
        self.drop_records(prefix)  # the store and the round records
        for key in [k for k in self.names if k.startswith(prefix)]:
            del self.names[key]
        for key in [k for k in self._plans if k[0] == job_id]:
            del self._plans[key]

    # One process runs every step of a job here, in order, and no record is read again once its
    # successor is written (a step turns the state it read into the next one in place): records stay
    # objects, without the encoding that the fleet's processes need between them.
    def has_record(self, key: str) -> bool:
        return key in self._records

    def put_record_once(self, key: str, value, encode: Callable[[object], bytes]) -> bool:
        if key in self._records:
            return False
        self._records[key] = value
        return True

    def get_record(self, key: str, decode: Callable[[bytes], object]):
        try:
            return self._records[key]
        except KeyError:
            raise ObjectNotFound(key) from None

    def drop_records(self, prefix: str) -> None:
        super().drop_records(prefix)
        for key in [k for k in self._records if k.startswith(prefix)]:
            del self._records[key]


def from_npz(data: bytes, kind):
    """``kind.from_arrays`` of an ``.npz`` written by :func:`~shapfleet.workers.engine.npz.npz_bytes` (no pickles)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return kind.from_arrays({name: arrays[name] for name in arrays.files})


def load_statistics(data: bytes) -> ShardStatistics:
    return from_npz(data, ShardStatistics)
