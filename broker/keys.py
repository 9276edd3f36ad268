"""Object-store keys, in one place (the layout is documented in :mod:`shapfleet.broker.store`;
Redis key names are in :mod:`shapfleet.broker.redis_keys`)."""

from __future__ import annotations


def model_key(sha256: str) -> str:
    return f"models/{sha256}.onnx"


def image_key(sha256: str) -> str:
    """An image uploaded with ``POST /v1/images``, content-addressed."""
    return f"images/{sha256}"


def image_segments_key(sha256: str) -> str:
    """The label map uploaded with an image, when it came with one."""
    return f"images/{sha256}.segments"


def job_prefix(job_id: str) -> str:
    """Everything stored for a job starts so."""
    return f"jobs/{job_id}/"


def working_prefixes(job_id: str) -> list[str]:
    """The prefixes of a job's working state: shard statistics, round records, the render tasks'
    listings, plans (read only by its steps, deleted once the job is final)."""
    return [f"jobs/{job_id}/shards/", f"jobs/{job_id}/partition/", f"jobs/{job_id}/rounds/",
            f"jobs/{job_id}/rendered/", f"jobs/{job_id}/plans/"]


def input_key(job_id: str, image_index: int) -> str:
    return f"jobs/{job_id}/inputs/{image_index}"


def background_key(job_id: str) -> str:
    """The job's background set (``dataset:`` masker), an ``.npz`` uploaded with the job."""
    return f"jobs/{job_id}/inputs/background.npz"


def partition_key(job_id: str, image_index: int, name: str) -> str:
    """Method partition's round records for one image: ``state-<r>.json`` (the refinement before
    round r), ``round-<r>.json`` (its chosen nodes), ``round-<r>/part-<p>.npy`` (outputs of a slice of
    its masks) and ``final.json`` (the finished refinement)."""
    return f"jobs/{job_id}/partition/{image_index}/{name}"


def rounds_key(job_id: str, image_index: int, name: str) -> str:
    """A ``target_std``/``target_error`` run's round records for one image: ``round-<r>.json`` (the
    design of the round's budget, and its parts), ``round-<r>/part-<p>.npz`` (a part's statistics),
    ``outcome-<r>.json`` (what the round decided) and ``final.json`` (the last outcome)."""
    return f"jobs/{job_id}/rounds/{image_index}/{name}"


def rendered_key(job_id: str, part: int | str) -> str:
    """The artifacts a many-image job's render step stored for one image (``part`` its index) or
    for the whole job (``part`` ``"collection"``): names, keys, sizes, JSON."""
    return f"jobs/{job_id}/rendered/{part}.json"


def plan_key(job_id: str, image_index: int) -> str:
    return f"jobs/{job_id}/plans/{image_index}.npz"


def shard_key(job_id: str, image_index: int, shard_index: int) -> str:
    return f"jobs/{job_id}/shards/{image_index}/{shard_index}.npz"


def parse_shard_key(key: str) -> tuple[str, int, int]:
    """``jobs/<id>/shards/<n>/<i>.npz`` -> (id, n, i)."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != "jobs" or parts[2] != "shards" or not parts[4].endswith(".npz"):
        raise ValueError(f"not a shard key: {key!r}")
    return parts[1], int(parts[3]), int(parts[4][:-4])


def result_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/results/"


def result_key(job_id: str, name: str) -> str:
    return f"{result_prefix(job_id)}{name}"


def segments_key(job_id: str, image_index: int) -> str:
    """Image ``image_index``'s own label map (``.npy`` integers or a label PNG), when the job has one."""
    return f"jobs/{job_id}/inputs/{image_index}.segments"


def reference_key(job_id: str) -> str:
    """The ``image:`` masker's reference image, uploaded with the job."""
    return f"jobs/{job_id}/inputs/reference"
