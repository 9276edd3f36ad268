"""The Python client of the shapfleet HTTP API.

    client = Client("http://127.0.0.1:8000", api_key="...")
    job = client.submit(["cat.png"], model="model.onnx", settings={"top_k": 3, "nsamples": 1000})
    job = client.wait(job["id"], on_progress=print)
    client.download(job["id"], "out/")

Errors from the API raise :class:`ApiError` carrying the problem+json body.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from shapfleet.errors import ApiError, ServerUnreachable

if TYPE_CHECKING:
    import requests

FINAL = ("succeeded", "failed", "canceled")


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        import requests  # here, not at the top: the command line's start and `explain` need no HTTP

        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        import requests

        try:
            response = self.session.request(method, self.base_url + path, timeout=self.timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as e:
            reason = "timed out" if isinstance(e, requests.Timeout) else "connection refused or host unknown"
            raise ServerUnreachable(0, {"title": "Server unreachable",
                                        "detail": f"cannot reach {self.base_url} ({reason}); is shapfleet up?"}) from e
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason, "detail": response.text[:500]}
            raise ApiError(response.status_code, problem)
        return response

    def upload_model(self, model: str | os.PathLike[str] | bytes) -> dict[str, Any]:
        data = model if isinstance(model, bytes) else Path(model).read_bytes()
        return self._request("POST", "/v1/models", files={"model": ("model.onnx", data)}).json()

    def submit(self, images: Iterable[str | os.PathLike[str] | bytes], model: str | os.PathLike[str] | bytes | None = None,
               model_id: str | None = None, settings: dict[str, Any] | None = None,
               idempotency_key: str | None = None,
               background: str | os.PathLike[str] | bytes | None = None,
               segments: str | os.PathLike[str] | bytes | Sequence[str | os.PathLike[str] | bytes] | None = None,
               reference: str | os.PathLike[str] | bytes | None = None) -> dict[str, Any]:
        """Submit a job. The model is uploaded first (once: uploads are content-addressed) unless
        ``model_id`` names one already uploaded. ``background`` is the ``.npz`` background set that
        a ``dataset:`` masker needs, ``reference`` the image an ``image:`` masker needs. ``segments``
        is a label map (``.npy`` or a label PNG) for every image, or a sequence of one per image.
        Returns the job resource."""
        if model_id is None:
            if model is None:
                raise ValueError("give model or model_id")
            model_id = self.upload_model(model)["id"]
        images = list(images)
        files = [("image", _named(image, f"image{n}")) for n, image in enumerate(images)]
        if segments is not None:
            per_image = list(segments) if isinstance(segments, (list, tuple)) else [segments] * len(images)
            if len(per_image) != len(images):
                raise ValueError(f"{len(per_image)} label maps for {len(images)} images: give one, or one per image")
            files += [("segments", _named(labels, f"segments{n}")) for n, labels in enumerate(per_image)]
        if background is not None:
            files.append(("background", _named(background, "background.npz")))
        if reference is not None:
            files.append(("reference", _named(reference, "reference")))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        form = {"model_id": model_id, "settings": json.dumps(settings or {})}
        return self._request("POST", "/v1/jobs", data=form, files=files, headers=headers).json()

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, timeout: float | None = None, on_progress: Callable[[dict], None] | None = None,
             poll_interval: float = 0.25, max_interval: float = 5.0) -> dict[str, Any]:
        """Poll until the job is final (with backoff); returns the final job resource."""
        deadline = time.monotonic() + timeout if timeout else None
        interval = poll_interval
        while True:
            job = self.get(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in FINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout}s")
            time.sleep(interval)
            interval = min(max_interval, interval * 1.5)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def list(self, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return self._request("GET", "/v1/jobs", params=params).json()

    def artifact(self, job_id: str, name: str) -> bytes:
        return self._request("GET", f"/v1/jobs/{job_id}/artifacts/{name}").content

    def download(self, job_id: str, dest: str | os.PathLike[str]) -> list[Path]:
        """Write every artifact of a succeeded job under ``dest``; returns the paths written."""
        job = self.get(job_id)
        if job["status"] != "succeeded":
            raise ApiError(409, {"title": "Not ready", "detail": f"job {job_id} is {job['status']}"})
        written = []
        root = Path(dest).resolve()
        for result in job["results"]:
            target = (root / result["name"]).resolve()
            if root not in target.parents:
                raise ApiError(502, {"title": "Bad artifact name", "detail": result["name"]})
            target.parent.mkdir(parents=True, exist_ok=True)
            data = self.artifact(job_id, result["name"])
            if len(data) != result["size"]:
                raise ApiError(502, {"title": "Truncated download", "detail": f"{result['name']}: {len(data)} of {result['size']} bytes"})
            target.write_bytes(data)
            written.append(target)
        return written


def _named(source: str | os.PathLike[str] | bytes, default: str) -> tuple[str, bytes]:
    """A multipart file part: (file name, bytes) of a path, or of bytes under ``default``."""
    if isinstance(source, bytes):
        return default, source
    return Path(source).name, Path(source).read_bytes()
