"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

Views raise :class:`Problem` or any :class:`~shapfleet.errors.ShapfleetError`, which one handler
answers from its branch of the tree (``http_status``, ``title``, ``public_detail``: a user error's
message, a fixed text for the service's own failures); Flask's own 404/405/413 pass through the
same handler. Nothing else reaches the client: an unexpected error is
logged and answered with a 500 problem that holds no internals.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, json, request
from werkzeug.exceptions import HTTPException

from shapfleet.errors import ShapfleetError

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


def from_error(error: ShapfleetError) -> Problem:
    """The problem for a shapfleet error, by its class attributes (see :mod:`shapfleet.errors`)."""
    if error.http_status >= 500 and error.retry_after is None:
        log.error("%s on %s %s: %s", type(error).__name__, request.method, request.path, error)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else {}
    return Problem(error.http_status, error.title, error.public_detail(), headers=headers)


def register(app: Flask) -> None:
    app.register_error_handler(Problem, problem_response)
    app.register_error_handler(HTTPException, lambda e: problem_response(_from_http(e)))
    app.register_error_handler(ShapfleetError, lambda e: problem_response(from_error(e)))

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        import redis.exceptions

        if isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            return problem_response(Problem(503, "Service unavailable", "the job database is unavailable; try again later",
                                            headers={"Retry-After": "5"}))
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(Problem(500, "Internal Server Error", "an unexpected error occurred"))
