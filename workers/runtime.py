"""Per-worker-process state: the services, onnxruntime sessions cached by model sha256, recent plans.

Sessions are created lazily, in the process that uses them (after Celery's fork), once per model.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict

import numpy as np

from shapfleet.broker.keys import model_key, plan_key
from shapfleet.broker.services import Services
from shapfleet.workers.engine.estimation import ShardStatistics
from shapfleet.workers.engine.model import (
    ModelInfo,
    ModelSessions,
    OnnxClassifier,
    inspect_model,
)
from shapfleet.workers.engine.partition import PartitionPlan
from shapfleet.workers.engine.planning import JobPlan
from shapfleet.workers.engine.settings import ExplainSettings

PLAN_CACHE_SIZE = 8


#: The prefork pool index of this process (set by the worker at fork); None outside a pool.
process_index: int | None = None


def session_providers(index: int | None, gpus: int, available: list[str]) -> list | None:
    """Execution providers for a worker process: with ``gpus`` > 0 and the CUDA provider available,
    pool process ``index`` runs on GPU ``index mod gpus``; otherwise the defaults (CUDA first if any)."""
    if gpus > 0 and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": (index or 0) % gpus}), "CPUExecutionProvider"]
    return None


class WorkerRuntime:
    def __init__(self, services: Services) -> None:
        self.services = services
        self._pid = os.getpid()
        self._models: dict[str, tuple[bytes, ModelSessions]] = {}
        self._infos: dict[tuple[str, str], ModelInfo] = {}
        self._plans: OrderedDict[tuple[str, int], JobPlan | PartitionPlan] = OrderedDict()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():  # never share sessions across a fork
            self.__init__(self.services)

    def classifier(self, sha256: str, settings: ExplainSettings) -> OnnxClassifier:
        """An adapter for the job's settings around this process's one session for the model."""
        self._check_fork()
        if sha256 not in self._models:
            import onnxruntime

            data = self.services.store.get(model_key(sha256))
            service = self.services.settings
            providers = session_providers(process_index, service.gpus, onnxruntime.get_available_providers())
            self._models[sha256] = (data, ModelSessions(data, providers=providers, threads=service.ort_threads))
        data, sessions = self._models[sha256]
        info_key = (sha256, settings.layout)
        if info_key not in self._infos:
            self._infos[info_key] = inspect_model(data, settings.layout)
        return OnnxClassifier(data, settings, sessions=sessions, info=self._infos[info_key])

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
        plan = from_npz(self.services.store.get(plan_key(job_id, image_index)), kind)
        self._plans[key] = plan
        while len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def from_npz(data: bytes, kind):
    """``kind.from_arrays`` of an ``.npz`` written by :func:`npz_bytes` (no pickles)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return kind.from_arrays({name: arrays[name] for name in arrays.files})


def load_statistics(data: bytes) -> ShardStatistics:
    return from_npz(data, ShardStatistics)
