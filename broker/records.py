"""Job records: the record, its states, and the interface the pipeline's steps keep them through.

    queued --start--> running --succeed--> succeeded
       |                 |----fail-------> failed
       |                 +----cancel-----> canceled
       +--fail / cancel--------------------^

:class:`JobRecords` is what :mod:`shapfleet.workers.steps` needs of a job's records: its state, the
totals set at planning, per-shard progress, the barrier of finished shards, and method partition's
rounds. The fleet keeps them in Redis (:class:`~shapfleet.broker.jobs.JobStore`, atomic across
processes); the in-process run keeps them in :class:`MemoryJobs`. Both give the same answers to the
same calls, so the steps cannot tell which they run on.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol, Sequence

from shapfleet.errors import JobNotFound


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    status: JobStatus
    created_at: float
    started_at: float | None
    completed_at: float | None
    settings: dict[str, Any]
    model_sha256: str
    inputs: list[str]
    shards_total: int
    shards_done: int
    evaluations_total: int
    evaluations_done: int
    error: dict[str, Any] | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    deadline: float | None = None
    precision: dict[int, dict[str, Any]] = field(default_factory=dict)  # per image, for target_std/target_error

    @property
    def n_images(self) -> int:
        return len(self.inputs)


def new_job_id() -> str:
    """Time-ordered ids: 12 hex digits of milliseconds, then 16 random hex digits."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:16]}"


class JobRecords(Protocol):
    """The records the steps read and write. Shard names are ``<image>/<shard>``."""

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord: ...

    def status(self, job_id: str) -> JobStatus | None: ...

    def set_totals(self, job_id: str, shard_counts: list[int], evaluations_total: int,
                   planning_evaluations: int) -> None: ...

    def shard_counts(self, job_id: str) -> list[int]: ...

    def set_shard_progress(self, job_id: str, shard_name: str, evaluations: int) -> None: ...

    def shard_done(self, job_id: str, shard_name: str, image_shards: Sequence[str] = ()) -> tuple[bool, int, bool]:
        """Record a finished shard; returns whether it was new, how many shards of the job are done,
        and whether all of ``image_shards`` are (atomically: one caller sees each completion)."""

    def missing_shards(self, job_id: str) -> list[tuple[int, int]]: ...

    def set_round(self, job_id: str, image_index: int, round_index: int) -> None: ...

    def current_round(self, job_id: str, image_index: int) -> int: ...

    def round_part_done(self, job_id: str, image_index: int, round_index: int, part: int) -> tuple[bool, int]: ...

    def image_rendered(self, job_id: str, part: int | str) -> tuple[bool, int]:
        """Record a part of a many-image job rendered (an image's index, or ``"collection"``);
        returns, like :meth:`shard_done`, whether it was new and how many parts are rendered now."""

    def values_stored(self, job_id: str, image_index: int) -> tuple[bool, int]:
        """Record a many-image job's image's values stored; returns whether it was new and how many
        images' values are stored now."""

    def set_precision(self, job_id: str, image_index: int, precision: dict[str, Any], evaluations_total: int) -> None:
        """A target run's state after a round of image ``image_index`` (rounds done, the achieved
        precision against the target, the projected coalitions) and the job's new evaluation total."""


_ALLOWED = {
    JobStatus.RUNNING: (JobStatus.QUEUED,),
    JobStatus.SUCCEEDED: (JobStatus.RUNNING,),
    JobStatus.FAILED: (JobStatus.QUEUED, JobStatus.RUNNING),
    JobStatus.CANCELED: (JobStatus.QUEUED, JobStatus.RUNNING),
}


class MemoryJobs:
    """Job records in this process's memory, for the in-process run (one process owns them)."""

    def __init__(self) -> None:
        self._records: dict[str, JobRecord] = {}
        self._shard_counts: dict[str, list[int]] = {}
        self._planning: dict[str, int] = {}
        self._progress: dict[str, dict[str, int]] = {}
        self._done: dict[str, set[str]] = {}
        self._rounds: dict[str, dict[int, int]] = {}
        self._parts: dict[tuple[str, int, int], set[int]] = {}
        self._precision: dict[str, dict[int, dict[str, Any]]] = {}
        self._rendered: dict[str, set[int | str]] = {}
        self._values_stored: dict[str, set[int]] = {}

    def create(self, tenant: str, settings: dict[str, Any], model_sha256: str, inputs: list[str],
               deadline_seconds: float | None = None, job_id: str | None = None) -> JobRecord:
        job_id = job_id or new_job_id()
        now = time.time()
        self._records[job_id] = JobRecord(
            id=job_id, tenant=tenant, status=JobStatus.QUEUED, created_at=now, started_at=None, completed_at=None,
            settings=settings, model_sha256=model_sha256, inputs=list(inputs), shards_total=0, shards_done=0,
            evaluations_total=0, evaluations_done=0,
            deadline=None if deadline_seconds is None else now + deadline_seconds)
        for table in (self._progress, self._rounds):
            table[job_id] = {}
        self._done[job_id] = set()
        return self.get(job_id)

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        record = self._records.get(job_id)
        if record is None or (tenant is not None and record.tenant != tenant):
            raise JobNotFound(job_id)
        return replace(record, shards_done=len(self._done[job_id]),
                       evaluations_done=self._planning.get(job_id, 0) + sum(self._progress[job_id].values()),
                       precision=dict(self._precision.get(job_id, {})))

    def status(self, job_id: str) -> JobStatus | None:
        record = self._records.get(job_id)
        return record.status if record is not None else None

    def _move(self, job_id: str, to: JobStatus, **fields: Any) -> bool:
        record = self._records.get(job_id)
        if record is None or record.status not in _ALLOWED[to]:
            return False
        self._records[job_id] = replace(record, status=to, **fields)
        return True

    def start(self, job_id: str) -> bool:
        return self._move(job_id, JobStatus.RUNNING, started_at=time.time())

    def succeed(self, job_id: str, results: list[dict[str, Any]]) -> bool:
        return self._move(job_id, JobStatus.SUCCEEDED, results=results, completed_at=time.time())

    def fail(self, job_id: str, error_type: str, message: str) -> bool:
        return self._move(job_id, JobStatus.FAILED, error={"type": error_type, "message": message},
                          completed_at=time.time())

    def cancel(self, job_id: str) -> bool:
        return self._move(job_id, JobStatus.CANCELED, completed_at=time.time())

    def set_totals(self, job_id: str, shard_counts: list[int], evaluations_total: int,
                   planning_evaluations: int) -> None:
        self._records[job_id] = replace(self._records[job_id], shards_total=sum(shard_counts),
                                        evaluations_total=evaluations_total)
        self._shard_counts[job_id] = list(shard_counts)
        self._planning[job_id] = planning_evaluations

    def shard_counts(self, job_id: str) -> list[int]:
        return list(self._shard_counts.get(job_id, []))

    def image_rendered(self, job_id: str, part: int | str) -> tuple[bool, int]:
        return self._add_counted(self._rendered.setdefault(job_id, set()), part)

    def values_stored(self, job_id: str, image_index: int) -> tuple[bool, int]:
        return self._add_counted(self._values_stored.setdefault(job_id, set()), int(image_index))

    @staticmethod
    def _add_counted(members: set, member) -> tuple[bool, int]:
        added = member not in members
        members.add(member)
        return added, len(members)

    def set_precision(self, job_id: str, image_index: int, precision: dict[str, Any], evaluations_total: int) -> None:
        self._precision.setdefault(job_id, {})[int(image_index)] = dict(precision)
        self._records[job_id] = replace(self._records[job_id], evaluations_total=int(evaluations_total))

    def set_shard_progress(self, job_id: str, shard_name: str, evaluations: int) -> None:
        self._progress[job_id][shard_name] = int(evaluations)

    def shard_done(self, job_id: str, shard_name: str, image_shards: Sequence[str] = ()) -> tuple[bool, int, bool]:
        done = self._done[job_id]
        added = shard_name not in done
        done.add(shard_name)
        return added, len(done), bool(image_shards) and all(name in done for name in image_shards)

    def missing_shards(self, job_id: str) -> list[tuple[int, int]]:
        done = self._done[job_id]
        return [(n, i) for n, count in enumerate(self.shard_counts(job_id)) for i in range(count)
                if f"{n}/{i}" not in done]

    def set_round(self, job_id: str, image_index: int, round_index: int) -> None:
        rounds = self._rounds[job_id]
        rounds[image_index] = max(rounds.get(image_index, round_index), round_index)

    def current_round(self, job_id: str, image_index: int) -> int:
        return self._rounds[job_id].get(image_index, 0)

    def round_part_done(self, job_id: str, image_index: int, round_index: int, part: int) -> tuple[bool, int]:
        parts = self._parts.setdefault((job_id, image_index, round_index), set())
        added = part not in parts
        parts.add(part)
        return added, len(parts)
