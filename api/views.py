"""The ``/v1`` routes: models, images, jobs, artifacts. Views parse, call broker functions, and
render; every error is a problem+json response (see :mod:`shapfleet.api.problems`)."""

from __future__ import annotations

import base64
import json
import math
import time
from datetime import datetime, timezone

from flask import Blueprint, Response, current_app, g, request, url_for

from shapfleet.broker import redis_keys
from shapfleet.broker.records import JobRecord, JobStatus
from shapfleet.broker.store import artifact_bytes
from shapfleet.broker.submission import enqueue_job
from shapfleet.broker.validation import check_job

from .problems import PROBLEM_BASE, Problem
from .validation import (
    model_for,
    parse_job_request,
    read_upload,
    store_image_for,
    store_model_for,
    validate_model,
)

v1 = Blueprint("v1", __name__, url_prefix="/v1")

#: Idempotency keys are kept this long (at least the 24 h the contract promises).
IDEMPOTENCY_TTL = 48 * 3600
#: A claim on a key while its request is processed lasts this long (s): a claim left by an API process
#: that died mid-request frees the key for the client's retry soon, not after IDEMPOTENCY_TTL.
IDEMPOTENCY_CLAIM_TTL = 120
MAX_PAGE = 100


def services():
    return current_app.extensions["shapfleet"]


def iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace("+00:00", "Z") if timestamp else None


def job_resource(record: JobRecord) -> dict:
    """The JSON a client sees for a job."""
    total = record.evaluations_total
    resource = {
        "id": record.id,
        "status": record.status.value,
        "created_at": iso(record.created_at),
        "started_at": iso(record.started_at),
        "completed_at": iso(record.completed_at),
        "progress": {
            "shards_done": record.shards_done, "shards_total": record.shards_total,
            "evaluations_done": min(record.evaluations_done, total) if total else record.evaluations_done,
            "evaluations_total": total,
            "fraction": round(min(1.0, record.evaluations_done / total), 4) if total else 0.0,
        },
        "model_id": record.model_sha256,
        "images": record.n_images,
        "settings": record.settings,
        "error": None,
        "results": [],
    }
    if record.precision:
        resource["progress"]["precision"] = [{"image": image, **record.precision[image]} for image in sorted(record.precision)]
        if record.status == JobStatus.RUNNING and record.started_at and total > record.evaluations_done:
            # The projection's ETA: the evaluations still projected at the rate so far.
            rate = record.evaluations_done / max(1e-9, time.time() - record.started_at)
            resource["progress"]["eta_seconds"] = round((total - record.evaluations_done) / rate, 1) if rate > 0 else None
    if record.error:
        resource["error"] = {"type": PROBLEM_BASE + "job-failed", "title": "Job failed", "status": 422,
                             "detail": record.error["message"], "error_type": record.error["type"]}
    if record.status == JobStatus.SUCCEEDED:
        store = services().store
        expiry = services().settings.presign_expiry
        resource["results"] = [
            {"name": r["name"], "size": r["size"], "image": r.get("image", 0),
             "url": url_for("v1.artifact", job_id=record.id, name=r["name"], _external=True),
             # a bundled viewer file is a byte range of its image's bundle: the API serves it, not a URL
             "presigned_url": None if "offset" in r else store.presigned_url(r["key"], expiry)}
            for r in record.results
        ]
    return resource


def job_response(record: JobRecord, status: int = 200) -> Response:
    response = current_app.json.response(job_resource(record))
    response.status_code = status
    if not record.status.is_final:
        response.headers["Retry-After"] = "1"
    if status == 202:
        response.headers["Location"] = url_for("v1.get_job", job_id=record.id)
    return response


# -- models and images ------------------------------------------------------------------------------
@v1.post("/models")
def upload_model():
    info, created = store_model_for(services(), g.tenant, read_upload("model"))
    body = {"id": info.sha256, "sha256": info.sha256, **{k: v for k, v in info.to_dict().items() if k != "sha256"}}
    return body, 201 if created else 200


@v1.get("/models")
def list_models():
    svc = services()
    ids = sorted(m.decode() for m in svc.redis.smembers(redis_keys.tenant_models(g.tenant)))
    return {"models": [{"id": model_id, **model_for(svc, g.tenant, model_id)} for model_id in ids]}


@v1.get("/models/<model_id>")
def get_model(model_id: str):
    return {"id": model_id, **model_for(services(), g.tenant, model_id)}


@v1.post("/images")
def upload_image():
    segments = request.files.get("segments") if request.mimetype == "multipart/form-data" else None
    sha256, (height, width) = store_image_for(services(), g.tenant, read_upload("image"),
                                              segments.read() if segments is not None else None)
    return {"id": sha256, "height": height, "width": width}, 201


# -- jobs -------------------------------------------------------------------------------------------
@v1.post("/jobs")
def create_job():
    svc = services()
    job = parse_job_request(svc, g.tenant)
    if job.model_bytes is not None:
        info = validate_model(job.model_bytes, svc.settings.limits)
        model_sha256, model = info.sha256, info.to_dict()
    else:
        info, model_sha256, model = None, job.model_id, model_for(svc, g.tenant, job.model_id)
    segments = check_job(job.settings, job.images, job.background, model, svc.settings.limits, job.segments,
                         job.reference)
    idempotency = request.headers.get("Idempotency-Key")
    redis_key = fingerprint = None
    if idempotency is not None:
        if not idempotency or len(idempotency) > 200:
            raise Problem(400, "Bad Request", "Idempotency-Key must be 1 to 200 characters")
        redis_key, fingerprint = redis_keys.idempotency(g.tenant, idempotency), job.fingerprint(model_sha256)
        existing = _idempotent_replay(svc, redis_key, fingerprint)
        if existing is not None:
            return job_response(existing, 202)
    try:
        if info is not None:
            store_model_for(svc, g.tenant, job.model_bytes, info)
        record = enqueue_job(svc, g.tenant, model_sha256, job.images, job.settings, job.background, segments,
                             job.reference)
    except BaseException:
        if redis_key is not None:
            svc.redis.delete(redis_key)
        raise
    if redis_key is not None:
        svc.redis.set(redis_key, json.dumps({"fingerprint": fingerprint, "job_id": record.id}), ex=IDEMPOTENCY_TTL)
    return job_response(record, 202)


def _idempotent_replay(svc, redis_key: str, fingerprint: str) -> JobRecord | None:
    """The job an earlier request with this key created, or None after claiming the key for this one."""
    claim = json.dumps({"fingerprint": fingerprint, "job_id": None})
    if svc.redis.set(redis_key, claim, nx=True, ex=IDEMPOTENCY_CLAIM_TTL):
        return None
    stored = json.loads(svc.redis.get(redis_key) or "null") or {}
    if stored.get("fingerprint") != fingerprint:
        raise Problem(422, "Idempotency key reused",
                      "this Idempotency-Key was used for a different request (model, images, background set or settings differ)")
    if stored.get("job_id") is None:
        raise Problem(409, "Conflict", "a request with this Idempotency-Key is still being processed; retry shortly",
                      headers={"Retry-After": "1"})
    return svc.jobs.get(stored["job_id"], tenant=g.tenant)


@v1.get("/jobs/<job_id>")
def get_job(job_id: str):
    return job_response(services().jobs.get(job_id, tenant=g.tenant))


@v1.get("/jobs")
def list_jobs():
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        raise Problem(400, "Bad Request", "limit must be an integer") from None
    if not 1 <= limit <= MAX_PAGE:
        raise Problem(400, "Bad Request", f"limit must be between 1 and {MAX_PAGE}")
    before = None
    if request.args.get("cursor"):
        try:
            before = float(base64.urlsafe_b64decode(request.args["cursor"].encode()).decode())
            if not math.isfinite(before):
                raise ValueError(before)
        except (ValueError, UnicodeDecodeError):
            raise Problem(400, "Bad Request", "invalid cursor") from None
    svc = services()
    rows = svc.jobs.list_ids(g.tenant, limit, before)
    jobs = [job_resource(svc.jobs.get(job_id)) for job_id, _ in rows]
    cursor = base64.urlsafe_b64encode(repr(rows[-1][1]).encode()).decode() if len(rows) == limit else None
    return {"jobs": jobs, "next_cursor": cursor}


@v1.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    svc = services()
    record = svc.jobs.get(job_id, tenant=g.tenant)
    if not svc.jobs.cancel(job_id):
        record = svc.jobs.get(job_id)
        raise Problem(409, "Conflict", f"job {job_id} is already {record.status.value}")
    return job_response(svc.jobs.get(job_id), 202)


@v1.get("/jobs/<job_id>/artifacts/<path:name>")
def artifact(job_id: str, name: str):
    svc = services()
    record = svc.jobs.get(job_id, tenant=g.tenant)
    # Only names the job itself lists are served: a path like ../../models/x cannot reach anything.
    match = next((r for r in record.results if r["name"] == name), None)
    if match is None:
        raise Problem(404, "Not Found", f"job {job_id} has no artifact {name!r}")
    data = artifact_bytes(svc.store, match)
    mimetype = {"png": "image/png", "json": "application/json"}.get(name.rsplit(".", 1)[-1], "application/octet-stream")
    response = Response(data, mimetype=mimetype)
    response.headers["Content-Disposition"] = content_disposition(name.rsplit("/", 1)[-1])
    return response


def content_disposition(filename: str) -> str:
    """An attachment header for any file name: an ASCII fallback, and the name itself in RFC 5987's
    ``filename*`` (class names are user data and may be in any script)."""
    from urllib.parse import quote

    fallback = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
