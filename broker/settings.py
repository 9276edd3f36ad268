"""Service settings: one frozen object, read from ``SHAPFLEET_*`` environment variables once.

Each default below is what a local run needs (a Redis on 127.0.0.1:6379, artifacts in a local folder).
Entry points (``shapfleet worker``, ``shapfleet api``, ``shapfleet up``, the API factory) call
:func:`ServiceSettings.from_env` once and pass the object on; nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Mapping

from shapfleet.workers.engine.settings import DEFAULT_MAX_NSAMPLES, check_threads

#: Redis for job records; also the default Celery broker and result backend.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Bucket holding models, inputs, shard statistics and artifacts.
DEFAULT_BUCKET = "shapfleet"
#: Without an S3 endpoint, objects live in this folder (the in-process and single-host mode).
DEFAULT_STORE_DIR = "./shapfleet-store"
#: Target model evaluations per shard task: small enough to spread over a fleet and to report
#: progress often, large enough that per-task overhead (a broker round trip, a plan read) stays small.
DEFAULT_SHARD_EVALUATIONS = 512
#: Upper bound on shards per image, whatever the budget.
DEFAULT_MAX_SHARDS = 64
#: Redis visibility timeout (seconds): an unacknowledged task is redelivered after this long, so it
#: must exceed the longest shard.
DEFAULT_VISIBILITY_TIMEOUT = 3600
#: A job not final after this many seconds is failed by the watchdog.
DEFAULT_JOB_DEADLINE = 6 * 3600
#: Final jobs (records, inputs, results) and uploaded images are deleted this long after they became
#: final (were last uploaded).
DEFAULT_RETENTION = 7 * 24 * 3600
#: Presigned URLs expire after this many seconds.
DEFAULT_PRESIGN_EXPIRY = 900


@dataclass(frozen=True)
class Limits:
    """Input limits, enforced before anything is stored or enqueued."""

    max_upload_bytes: int = 200 * 1024 * 1024
    max_model_bytes: int = 200 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    max_images_per_job: int = 16
    max_nsamples: int = DEFAULT_MAX_NSAMPLES  # also a target_std/target_error job's default cap
    max_superpixels: int = 1_000
    max_evals: int = 100_000  # method partition's budget per image
    max_background_images: int = 100  # images in a dataset: masker's background set
    max_classes: int = 100  # explained classes per image (each is a picture and a column of values)
    max_batch_size: int = 1024  # images per model call (each call composes that many masked images)
    max_settings_bytes: int = 65_536  # a job's settings, as JSON
    max_segmenter_pixels: int = 512 * 512  # quickshift/felzenszwalb run at submission on images of at most this
    max_tensor_bytes: int = 512 << 20  # any statically sized tensor of an uploaded model (all of them: twice this)
    model_check_seconds: int = 30  # loading an uploaded model in a child process, at most
    model_check_memory_bytes: int = 4 << 30  # that child's address space
    model_call_seconds: int = 120  # one model call (a batch of batch_size masked images) on a worker, at most
    worker_memory_bytes: int = 8 << 30  # a worker process's memory (address space on CPU hosts); 0: unbounded


@dataclass(frozen=True)
class ServiceSettings:
    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str | None = None  # default: redis_url
    result_backend: str | None = None  # default: redis_url
    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:8333; None: local folder store
    s3_public_endpoint: str | None = None  # host clients use in presigned URLs; default s3_endpoint
    s3_bucket: str = DEFAULT_BUCKET
    s3_access_key: str | None = field(default=None, repr=False)
    s3_secret_key: str | None = field(default=None, repr=False)
    s3_region: str = "us-east-1"
    store_dir: str = DEFAULT_STORE_DIR
    queue_plan: str = "plan"
    queue_shards: str = "shards"
    queue_reduce: str = "reduce"
    shard_evaluations: int = DEFAULT_SHARD_EVALUATIONS
    max_shards: int = DEFAULT_MAX_SHARDS
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    job_deadline: int = DEFAULT_JOB_DEADLINE
    presign_expiry: int = DEFAULT_PRESIGN_EXPIRY
    ort_threads: int | None = None  # onnxruntime intra-op threads per worker process
    gpus: int = 0  # GPUs on this worker host: pool process i uses GPU i mod gpus (0: onnxruntime's default)
    storage_retries: int = 5  # bounded retries for transient store errors
    max_shard_deliveries: int = 5  # a shard whose worker died this many times fails the job (poison)
    stall_seconds: int = 120  # the watchdog re-drives a running job with no progress for this long
    watchdog_interval: int = 30  # seconds between watchdog passes (workers started with --beat)
    retention_seconds: int = DEFAULT_RETENTION  # final jobs and uploaded images are deleted after this (watchdog)
    # API authentication: "KEY:TENANT,KEY:TENANT" and/or a file of "TENANT KEY" lines (or a JSON
    # object {"KEY": "TENANT"}). auth_disabled=1 is the explicit development mode (tenant "default").
    api_keys: str | None = field(default=None, repr=False)
    api_keys_file: str | None = None
    auth_disabled: bool = False
    limits: Limits = field(default_factory=Limits)

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def celery_result_backend(self) -> str:
        return self.result_backend or self.redis_url

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServiceSettings":
        """Read every ``SHAPFLEET_<FIELD>`` (upper case) variable; limits as ``SHAPFLEET_<LIMIT>``."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in dataclasses.fields(cls):
            if f.name == "limits":
                continue
            raw = env.get(f"SHAPFLEET_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _convert(f.name, raw, f.type)
        limit_values = {}
        for f in dataclasses.fields(Limits):
            raw = env.get(f"SHAPFLEET_{f.name.upper()}")
            if raw:
                limit_values[f.name] = _convert(f.name, raw, "int")
        check_threads(values.get("ort_threads"), "SHAPFLEET_ORT_THREADS")
        return cls(**values, limits=Limits(**limit_values))

    def environment(self) -> dict[str, str]:
        """The ``SHAPFLEET_*`` variables that reproduce these settings (for child processes)."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "limits":
                env.update({f"SHAPFLEET_{k.upper()}": str(v) for k, v in dataclasses.asdict(value).items()})
            elif value is not None:
                env[f"SHAPFLEET_{f.name.upper()}"] = str(value)
        return env

    def replace(self, **changes) -> "ServiceSettings":
        return dataclasses.replace(self, **changes)


def _convert(name: str, raw: str, type_name) -> object:
    text = str(type_name)
    if text == "bool":
        if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"SHAPFLEET_{name.upper()} must be 1/0, true/false or yes/no, got {raw!r}")
        return raw.strip().lower() in ("1", "true", "yes")
    if "int" in text:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"SHAPFLEET_{name.upper()} must be an integer, got {raw!r}") from None
    return raw
