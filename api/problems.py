"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

Views raise :class:`Problem` (or a domain error that :func:`register` maps to one); Flask's own
404/405/413 pass through the same handler. Nothing else reaches the client: an unexpected error is
logged and answered with a 500 problem that holds no internals.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, json, request
from werkzeug.exceptions import HTTPException

from broker.jobs import JobNotFound
from broker.store import ObjectNotFound, StoreError, TransientStoreError
from broker.submission import QueueUnavailable, SubmissionError
from workers.engine.errors import ImageError, InvalidSettingsError, ModelError

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://shapfleet.dev/problems/"
MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """An error response: ``status``, a short ``title``, a ``detail`` a person can act on."""

    def __init__(self, status: int, title: str, detail: str, slug: str | None = None,
                 headers: dict[str, str] | None = None, **extra) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.slug = slug or title.lower().replace(" ", "-")
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict:
        return {"type": PROBLEM_BASE + self.slug, "title": self.title, "status": self.status, "detail": self.detail,
                "instance": request.path if request else None, **self.extra}


def problem_response(problem: Problem) -> Response:
    response = Response(json.dumps(problem.body()), status=problem.status, mimetype=MEDIA_TYPE)
    for name, value in problem.headers.items():
        response.headers[name] = value
    return response


def _from_http(error: HTTPException) -> Problem:
    status = error.code or 500
    detail = {
        404: "no such resource",
        405: f"{request.method} is not allowed on {request.path}",
        413: "the request body exceeds the upload limit",
    }.get(status, error.description or error.name)
    if status == 413 and request and request.max_content_length:
        detail = f"the request body exceeds the upload limit of {request.max_content_length} bytes"
    headers = {}
    if status == 405 and getattr(error, "valid_methods", None):
        headers["Allow"] = ", ".join(error.valid_methods)
    return Problem(status, error.name, detail, headers=headers)


def register(app: Flask) -> None:
    app.register_error_handler(Problem, problem_response)
    app.register_error_handler(HTTPException, lambda e: problem_response(_from_http(e)))
    app.register_error_handler(InvalidSettingsError, lambda e: problem_response(Problem(422, "Invalid settings", str(e))))
    app.register_error_handler(ImageError, lambda e: problem_response(Problem(422, "Invalid image", str(e))))
    app.register_error_handler(ModelError, lambda e: problem_response(Problem(422, "Invalid model", str(e))))
    app.register_error_handler(SubmissionError, lambda e: problem_response(Problem(422, "Job not accepted", str(e))))
    app.register_error_handler(QueueUnavailable, lambda e: problem_response(
        Problem(503, "Service unavailable", str(e), headers={"Retry-After": "5"})))
    app.register_error_handler(JobNotFound, lambda e: problem_response(Problem(404, "Not Found", "no such job")))
    app.register_error_handler(ObjectNotFound, lambda e: problem_response(Problem(404, "Not Found", "no such object")))
    app.register_error_handler(TransientStoreError, lambda e: problem_response(
        Problem(503, "Storage unavailable", "the object store is unavailable; try again later", headers={"Retry-After": "5"})))
    app.register_error_handler(StoreError, lambda e: problem_response(Problem(500, "Storage error", "the object store refused the operation")))

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        import redis.exceptions

        if isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            return problem_response(Problem(503, "Service unavailable", "the job database is unavailable; try again later",
                                            headers={"Retry-After": "5"}))
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(Problem(500, "Internal Server Error", "an unexpected error occurred"))
