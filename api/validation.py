"""Parsing uploads and job requests, and checking models and images uploaded on their own. A job's
own checks are :func:`shapfleet.broker.validation.check_job`'s, run once by ``submit_job``. Everything
here runs before anything is stored or enqueued; every failure is a 4xx problem whose detail names the
limit or the field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

from flask import request

from shapfleet.broker import redis_keys
from shapfleet.broker.keys import image_key, image_segments_key, model_key
from shapfleet.broker.retention import record_image_upload
from shapfleet.broker.services import Services
from shapfleet.broker.settings import Limits
from shapfleet.broker.validation import check_image, check_label_map
from shapfleet.workers.engine.inspection import ModelInfo, check_tensor_sizes, inspect_model
from shapfleet.workers.engine.sessions import trial_load
from shapfleet.workers.engine.settings import ExplainSettings

from .problems import Problem


# -- models -----------------------------------------------------------------------------------------
def validate_model(data: bytes, limits: Limits) -> ModelInfo:
    """Parse, check the single image input and external data, and load it in onnxruntime."""
    if not data:
        raise Problem(422, "Invalid model", "the model upload is empty")
    if len(data) > limits.max_model_bytes:
        raise Problem(413, "Payload Too Large", f"the model is {len(data)} bytes; the limit is {limits.max_model_bytes}")
    info = inspect_model(data)  # ModelError -> 422
    check_tensor_sizes(data, limits.max_tensor_bytes)
    # It must load, with built-in operators; nothing of it runs in this process.
    trial_load(data, limits.model_check_seconds, limits.model_check_memory_bytes)
    return info


def store_model_for(services: Services, tenant: str, data: bytes, info: ModelInfo | None = None) -> tuple[ModelInfo, bool]:
    """Validate (unless ``info`` says it was) and store a model for a tenant; returns its description
    and whether it is new *to this tenant* (whether another tenant stored the same bytes is nobody
    else's business: both answers are the same)."""
    info = info or validate_model(data, services.settings.limits)
    key = model_key(info.sha256)
    if not services.store.exists(key):
        services.store.put(key, data)
    services.redis.set(redis_keys.model_meta(info.sha256), json.dumps({**info.to_dict(), "size": len(data)}))
    created = bool(services.redis.sadd(redis_keys.tenant_models(tenant), info.sha256))
    return info, created


def model_for(services: Services, tenant: str, model_id: str) -> dict:
    """A tenant's model description, or 404 (another tenant's model is as absent as a missing one)."""
    if not isinstance(model_id, str) or not services.redis.sismember(redis_keys.tenant_models(tenant), model_id):
        raise Problem(404, "Not Found", f"no model {model_id!r} for this tenant; upload it with POST /v1/models")
    meta = services.redis.get(redis_keys.model_meta(model_id))
    return json.loads(meta) if meta else {}


def read_upload(field: str) -> bytes:
    """A file from multipart field ``field``, or the raw body for application/octet-stream."""
    if request.mimetype == "multipart/form-data":
        upload = request.files.get(field)
        if upload is None:
            raise Problem(400, "Bad Request", f"the multipart body has no file field {field!r}")
        return upload.read()
    if request.mimetype in ("application/octet-stream", "application/onnx", "image/png", "image/jpeg"):
        return request.get_data(cache=False)
    raise Problem(415, "Unsupported Media Type",
                  f"send multipart/form-data with a {field!r} file, or the raw bytes as application/octet-stream; "
                  f"got {request.mimetype or 'no content type'}")


# -- images -----------------------------------------------------------------------------------------
def store_image_for(services: Services, tenant: str, data: bytes,
                    segments: bytes | None = None) -> tuple[str, tuple[int, int]]:
    """Check and store an image (with its own label map, when given, checked against its size);
    returns its id and size. The id is content-addressed: the image's sha256, or with a label map the
    sha256 of both, so the same image with other segments is another id."""
    limits = services.settings.limits
    pixels = check_image(data, limits, "the image")
    if segments is not None:
        check_label_map(segments, None, limits, "the segments")  # its size is checked against each job's fitting
    sha256 = hashlib.sha256(data if segments is None else hashlib.sha256(data).digest() + segments).hexdigest()
    if not services.store.exists(image_key(sha256)):
        services.store.put(image_key(sha256), data)
        if segments is not None:
            services.store.put(image_segments_key(sha256), segments)
    record_image_upload(services.redis, tenant, sha256)
    return sha256, pixels.shape[:2]


# -- job submissions ------------------------------------------------------------------------------
@dataclass
class JobRequest:
    model_id: str | None
    model_bytes: bytes | None
    images: list[bytes]
    settings: ExplainSettings
    background: bytes | None = None  # the dataset: masker's background set (.npz)
    segments: list[bytes | None] | None = None  # a label map per image (.npy or label PNG), or None each
    reference: bytes | None = None  # the image: masker's reference image

    def fingerprint(self, model_sha256: str) -> str:
        """What makes two submissions the same job (for Idempotency-Key): model, images, label maps,
        background set, reference image, settings."""
        def digest(data: bytes | None) -> str | None:
            return hashlib.sha256(data).hexdigest() if data is not None else None

        content = {"model": model_sha256, "images": [digest(i) for i in self.images],
                   "segments": [digest(s) for s in self.segments or []], "settings": self.settings.to_dict(),
                   "background": digest(self.background), "reference": digest(self.reference)}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _json_document(text: str | bytes, what: str):
    """Parse JSON from a client; malformed or absurdly nested input is a 400, never a 500."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Problem(400, "Bad Request", f"{what} is not valid JSON: {e}") from e
    except RecursionError:
        raise Problem(400, "Bad Request", f"{what} nests JSON too deeply") from None


def parse_job_request(services: Services, tenant: str) -> JobRequest:
    limits = services.settings.limits
    if request.mimetype == "multipart/form-data":
        settings_text = request.form.get("settings", "{}")
        if len(settings_text) > limits.max_settings_bytes:
            raise Problem(413, "Payload Too Large", f"the settings are {len(settings_text)} bytes; the limit is "
                          f"{limits.max_settings_bytes}")
        settings_data = _json_document(settings_text, "the settings field")
        model_file = request.files.get("model")
        images = [f.read() for key in ("image", "images") for f in request.files.getlist(key)]
        image_ids = request.form.getlist("image_id")
        model_id = request.form.get("model_id")
        model_bytes = model_file.read() if model_file is not None else None
        background, reference = (_file(name) for name in ("background", "reference"))
        segments = [f.read() for f in request.files.getlist("segments")]
        if segments and len(segments) != len(images) + len(image_ids):
            raise Problem(422, "Invalid request", f"{len(segments)} segments files for {len(images) + len(image_ids)} "
                          "images: give one label map per image, in image order, or none")
        segments = segments or [None] * (len(images) + len(image_ids))
    elif request.mimetype == "application/json":
        body = _json_document(request.get_data(cache=False) or b"null", "the body")
        if not isinstance(body, dict):
            raise Problem(400, "Bad Request", "the body must be a JSON object")
        settings_data = body.get("settings", {})
        model_id = body.get("model_id")
        model_bytes = _base64(body["model"], "model") if isinstance(body.get("model"), str) else None
        background, reference = (_base64(body[name], name) if isinstance(body.get(name), str) else None
                                  for name in ("background", "reference"))
        images, image_ids = [], []
        data_segments, id_segments = [], []  # data entries come first in the job, as in a multipart request
        entries = body.get("images", [])
        if not isinstance(entries, list):
            raise Problem(422, "Invalid request", "images must be a list of {\"image_id\": ...} or {\"data\": base64}")
        for n, entry in enumerate(entries):
            labels = entry.get("segments") if isinstance(entry, dict) else None
            if labels is not None and not isinstance(labels, str):
                raise Problem(422, "Invalid request", f"images[{n}].segments must be base64 (.npy or a label PNG)")
            labels = _base64(labels, f"images[{n}].segments") if labels is not None else None
            if isinstance(entry, dict) and isinstance(entry.get("image_id"), str):
                image_ids.append(entry["image_id"])
                id_segments.append(labels)
            elif isinstance(entry, dict) and isinstance(entry.get("data"), str):
                images.append(_base64(entry["data"], f"images[{n}].data"))
                data_segments.append(labels)
            else:
                raise Problem(422, "Invalid request", f"images[{n}] must be {{\"image_id\": ...}} or {{\"data\": base64}}")
        segments = data_segments + id_segments
    else:
        raise Problem(415, "Unsupported Media Type",
                      f"send multipart/form-data or application/json; got {request.mimetype or 'no content type'}")
    if not isinstance(settings_data, dict):
        raise Problem(422, "Invalid settings", "settings must be a JSON object")
    if len(json.dumps(settings_data)) > limits.max_settings_bytes:
        raise Problem(413, "Payload Too Large", f"the settings exceed the limit of {limits.max_settings_bytes} bytes")
    if len(images) + len(image_ids) > limits.max_images_per_job:  # before any referenced image is fetched
        raise Problem(422, "Limit exceeded", f"{len(images) + len(image_ids)} images; the limit is "
                      f"{limits.max_images_per_job} per job")
    if (model_id is None) == (model_bytes is None):
        raise Problem(422, "Invalid request", "give exactly one of model_id or an inline model")
    for n, image_id in enumerate(image_ids, start=len(images)):
        if not services.redis.sismember(redis_keys.tenant_images(tenant), image_id):
            raise Problem(404, "Not Found", f"no image {image_id!r} for this tenant; upload it with POST /v1/images")
        images.append(services.store.get(image_key(image_id)))
        if segments[n] is None and services.store.exists(image_segments_key(image_id)):
            segments[n] = services.store.get(image_segments_key(image_id))  # uploaded with the image
    settings = ExplainSettings.from_dict(settings_data)  # InvalidSettingsError -> 422
    return JobRequest(model_id, model_bytes, images, settings, background,
                      segments if any(s is not None for s in segments) else None, reference)


def _file(field: str) -> bytes | None:
    upload = request.files.get(field)
    return upload.read() if upload is not None else None


def _base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Problem(422, "Invalid request", f"{what} is not valid base64") from e
