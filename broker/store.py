"""The object store: S3 (boto3, path-style, any endpoint), a local folder, or memory (the
in-process run), behind one small interface.

Key layout::

    models/<sha256>.onnx                 uploaded models, content-addressed
    images/<sha256>                      images uploaded with POST /v1/images, content-addressed
    jobs/<id>/inputs/<n>                 the job's images; <n>.segments a label map, when given
    jobs/<id>/inputs/background.npz      the dataset: masker's background set; inputs/reference the image: one
    jobs/<id>/plans/<n>.npz              each image's plan (image, segments, backgrounds, design)
    jobs/<id>/shards/<n>/<i>.npz         shard i's statistics for image n (deterministic: a rerun overwrites)
    jobs/<id>/partition/<n>/...          method partition's round records
    jobs/<id>/results/...                attributions.npz and bundle: the image's summary.png, image.png,
                                         explanation.json and class-*.png one after the other (each
                                         listed with its offset in the job's results); <n>/ for each
                                         image of a many-image job, and at the top its stacked
                                         attributions.npz and grid.png

The functions that build these keys are in :mod:`shapfleet.broker.keys`.

Errors: :class:`ObjectNotFound` for a missing key; :class:`TransientStoreError` for failures worth
retrying (connection refused, timeouts, 5xx, throttling); anything else is :class:`StoreError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from shapfleet.errors import ObjectNotFound, StoreError, TransientStoreError

from .settings import ServiceSettings


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def get(self, key: str) -> bytes: ...

    def get_range(self, key: str, start: int, length: int) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def list(self, prefix: str) -> list[str]: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def presigned_url(self, key: str, expires: int) -> str | None: ...

    def check(self) -> None: ...


def _safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid object key {key!r}")
    return key


def _exact(key: str, data: bytes, length: int) -> bytes:
    if len(data) != length:
        raise StoreError(f"object {key!r} is shorter than the {length} bytes asked for")
    return data


def artifact_bytes(store: ObjectStore, entry: dict) -> bytes:
    """The bytes of one listed artifact (an entry of a job's results): the object at its ``key``, or,
    where the entry has an ``offset`` (a file stored with its image's other viewer files in one
    object), its ``size`` bytes from there."""
    if "offset" in entry:
        return store.get_range(entry["key"], int(entry["offset"]), int(entry["size"]))
    return store.get(entry["key"])


class LocalStore:
    """Objects as files under a folder; writes are atomic (write to a temporary name, then rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with self._path(key).open("rb") as file:
                file.seek(start)
                return _exact(key, file.read(length), length)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        folder = base if base.is_dir() else base.parent
        if not folder.exists():
            return []
        keys = [str(p.relative_to(self.root)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
        return sorted(k for k in keys if k.startswith(prefix))

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self._path(key).unlink(missing_ok=True)

    def presigned_url(self, key: str, expires: int) -> str | None:
        return None  # a folder has no URLs; the API streams artifacts instead

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"the store folder {self.root} is not writable")


class MemoryStore:
    """Objects in a dict: the in-process run's store (``shapfleet explain``), nothing on disk."""

    def __init__(self, objects: dict[str, bytes] | None = None) -> None:
        self.objects: dict[str, bytes] = dict(objects or {})

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.objects[_safe_key(key)] = bytes(data)

    def get(self, key: str) -> bytes:
        try:
            return self.objects[key]
        except KeyError:
            raise ObjectNotFound(key) from None

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return _exact(key, self.get(key)[start:start + length], length)

    def exists(self, key: str) -> bool:
        return key in self.objects

    def size(self, key: str) -> int:
        return len(self.get(key))

    def list(self, prefix: str) -> list[str]:
        return sorted(key for key in self.objects if key.startswith(prefix))

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            del self.objects[key]

    def presigned_url(self, key: str, expires: int) -> str | None:
        return None

    def check(self) -> None:
        return None


class S3Store:
    """An S3-compatible bucket (AWS, SeaweedFS, ...), created if missing."""

    def __init__(self, settings: ServiceSettings) -> None:
        import boto3
        from botocore.config import Config

        from .s3_signed import SignedRequests

        config = Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                        retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60)
        credentials = dict(aws_access_key_id=settings.s3_access_key, aws_secret_access_key=settings.s3_secret_key,
                           region_name=settings.s3_region)
        self.bucket = settings.s3_bucket
        self.client = boto3.client("s3", endpoint_url=settings.s3_endpoint, config=config, **credentials)
        self._bucket_ready = False
        signing = (self.bucket, settings.s3_access_key or "", settings.s3_secret_key or "", settings.s3_region)
        self._signed = SignedRequests(settings.s3_endpoint, *signing, timeout=60)
        # Presigned URLs name the endpoint clients reach; nothing is sent through this one.
        self._public = SignedRequests(settings.s3_public_endpoint or settings.s3_endpoint, *signing)

    def _call(self, operation: str, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        if not self._bucket_ready and operation != "create_bucket":
            self._ensure_bucket()
        try:
            return getattr(self.client, operation)(**kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(kwargs.get("Key", "")) from e
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"):
                raise TransientStoreError(f"object store {operation} failed ({code or status}); retry later") from e
            raise StoreError(f"object store {operation} refused: {code or status}") from e
        except (BotoConnectionError, BotoCoreError, OSError) as e:
            raise TransientStoreError(f"object store unreachable during {operation}: {type(e).__name__}") from e

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise StoreError(f"cannot create bucket {self.bucket}: {e}") from e
        except Exception as e:
            raise TransientStoreError(f"object store unreachable: {type(e).__name__}") from e
        self._bucket_ready = True

    def _signed_call(self, method: str, key: str, *args):
        """A PUT, GET or HEAD signed here (:mod:`shapfleet.broker.s3_signed`): a fifth of boto3's
        client CPU per request, errors mapped as :meth:`_call` maps boto3's."""
        import http.client  # here, not at the top: the in-process engine's store is a folder

        from .s3_signed import RequestFailed

        if not self._bucket_ready:
            self._ensure_bucket()
        try:
            return getattr(self._signed, method)(key, *args)
        except RequestFailed as e:
            if e.status == 404:
                raise ObjectNotFound(key) from e
            if e.status >= 500 or e.status in (408, 429):
                raise TransientStoreError(f"object store {method} failed (HTTP {e.status}); retry later") from e
            raise StoreError(f"object store {method} refused: {e}") from e
        except (OSError, http.client.HTTPException) as e:
            raise TransientStoreError(f"object store unreachable during {method}: {type(e).__name__}") from e

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._signed_call("put", _safe_key(key), data, content_type)

    def get(self, key: str) -> bytes:
        return self._signed_call("get", _safe_key(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._signed_call("get_range", _safe_key(key), start, length)

    def exists(self, key: str) -> bool:
        try:
            self._signed_call("head", _safe_key(key))
            return True
        except ObjectNotFound:
            return False

    def size(self, key: str) -> int:
        return self._signed_call("head", _safe_key(key))

    def list(self, prefix: str) -> list[str]:
        keys, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self._call("list_objects_v2", **kwargs)
            keys += [item["Key"] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = page["NextContinuationToken"]

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys a request
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            reply = self._call("delete_objects", Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if reply.get("Errors"):
                first = reply["Errors"][0]
                raise TransientStoreError(f"object store could not delete {len(reply['Errors'])} objects under "
                                          f"{prefix!r} ({first.get('Code')}: {first.get('Key')}); retry later")

    def presigned_url(self, key: str, expires: int) -> str | None:
        return self._public.presigned_get_url(_safe_key(key), expires)

    def check(self) -> None:
        self._bucket_ready = False
        self._ensure_bucket()


def open_store(settings: ServiceSettings) -> ObjectStore:
    """S3 when ``s3_endpoint`` is set, else the local folder ``store_dir``."""
    return S3Store(settings) if settings.s3_endpoint else LocalStore(settings.store_dir)
