"""shapfleet's exceptions: one tree, one root.

Every exception the project raises on purpose derives from :class:`ShapfleetError`. The branches say
what the caller can do about it, and the HTTP API answers each by its branch (one handler maps the
class attributes ``http_status`` and ``title`` to problem+json), the command line prints its message
and exits 1, and the fleet fails a job with it or retries it:

    ShapfleetError                 (500) a failure of the service itself
    +-- UserError                  (422) the request, an input or a setting is wrong; never retried
    |   +-- InvalidSettingsError         a setting is malformed or out of range
    |   +-- ImageError                   an image cannot be read or does not fit the model
    |   +-- ModelError                   a model cannot be loaded or is not an image classifier
    |   +-- ModelOutputError             the model ran but returned something unusable (NaN, wrong shape)
    |   |   +-- ModelTimeLimit           one model call ran past SHAPFLEET_MODEL_CALL_SECONDS
    |   |   +-- ModelMemoryLimit         one model call needed more than SHAPFLEET_WORKER_MEMORY_BYTES
    |   +-- EstimationError              the regression cannot be solved with the given budget
    |   +-- SubmissionError              a job is over a limit or lacks an input it needs
    +-- NotFound                   (404) no such job or object (or another tenant's)
    |   +-- JobNotFound
    |   +-- ObjectNotFound               (also a StoreError)
    +-- TransientError             (503) a dependency is unavailable; retrying may succeed
    |   +-- TransientStoreError          (also a StoreError)
    |   +-- QueueUnavailable
    +-- StoreError                 (500) the object store refused an operation for good
    +-- Canceled                         the job was canceled while a step ran
    +-- PipelineError                    the fleet's own records are inconsistent
    +-- ApiError                         the client got an error answer (carries the problem+json)
    |   +-- ServerUnreachable            the client could not reach the server at all
    +-- StackError                       ``shapfleet up`` or a test stack could not start a server

Lower-level errors (onnx, onnxruntime, PIL, boto3, redis) are translated with ``raise ... from e``
where the project calls the library. This module imports nothing, so every layer (and a client-only
install) can use it.
"""

from __future__ import annotations

from typing import Any


class ShapfleetError(Exception):
    """Root of the tree. Raised when the service itself fails; catch it to handle every shapfleet error.

    ``http_status`` and ``title`` are what the API answers; ``public_detail`` is the text a client is
    shown (a user error's own message; for the service's failures a fixed text that holds no internals).
    """

    http_status = 500
    title = "Internal Server Error"
    retry_after: int | None = None

    def public_detail(self) -> str:
        return "an unexpected error occurred"


class UserError(ShapfleetError):
    """Raised when the request, an input or a setting is wrong; the message says what to do."""

    http_status = 422
    title = "Invalid request"

    def public_detail(self) -> str:
        return str(self)


class InvalidSettingsError(UserError, ValueError):
    """Raised when an explanation setting is malformed or out of range."""

    title = "Invalid settings"


class ImageError(UserError):
    """Raised when an image cannot be decoded, is empty, or does not fit the model's input."""

    title = "Invalid image"


class ModelError(UserError):
    """Raised when a model cannot be loaded or does not have exactly one image-shaped input."""

    title = "Invalid model"


class ModelOutputError(UserError):
    """Raised when the model's output is not finite or not of shape (batch, classes)."""

    title = "Unusable model output"


class ModelTimeLimit(ModelOutputError):
    """Raised when one model call runs longer than ``SHAPFLEET_MODEL_CALL_SECONDS``."""

    title = "Model call too slow"


class ModelMemoryLimit(ModelOutputError):
    """Raised when a model call needs more memory than ``SHAPFLEET_WORKER_MEMORY_BYTES``."""

    title = "Model needs too much memory"


class EstimationError(UserError):
    """Raised when the KernelSHAP regression is singular for the coalitions evaluated."""

    title = "Cannot estimate"


class SubmissionError(UserError):
    """Raised when a job cannot be accepted (too many images, nsamples over the limit, ...)."""

    title = "Job not accepted"


class NotFound(ShapfleetError):
    """Raised when a job or object does not exist, or belongs to another tenant (who must not learn which)."""

    http_status = 404
    title = "Not Found"
    what = "resource"

    def public_detail(self) -> str:
        return f"no such {self.what}"


class JobNotFound(NotFound, KeyError):
    """Raised when no record exists for a job id (or it belongs to another tenant)."""

    what = "job"

    def __str__(self) -> str:  # KeyError would quote the id
        return f"no such job {self.args[0]}" if self.args else "no such job"


class StoreError(ShapfleetError):
    """Raised when the object store refuses an operation for a reason retrying will not fix."""

    title = "Storage error"

    def public_detail(self) -> str:
        return "the object store refused the operation"


class ObjectNotFound(NotFound, StoreError):
    """Raised when a key does not exist in the object store."""

    what = "object"


class TransientError(ShapfleetError):
    """Raised when a dependency (store, queue, job database) is unavailable; the operation may succeed
    if retried. The fleet retries these with backoff; the API answers 503 with ``Retry-After``."""

    http_status = 503
    title = "Service unavailable"
    retry_after = 5

    def public_detail(self) -> str:
        return str(self) or "a dependency is unavailable; try again later"


class TransientStoreError(TransientError, StoreError):
    """Raised when the store is unreachable or overloaded."""

    title = "Storage unavailable"

    def public_detail(self) -> str:
        return "the object store is unavailable; try again later"


class QueueUnavailable(TransientError):
    """Raised when a job's plan task cannot be enqueued (the broker is down); the job is failed."""


class Canceled(ShapfleetError):
    """Raised inside a step when its job was canceled; not an error of the user's input."""


class PipelineError(ShapfleetError):
    """Raised when the fleet's own bookkeeping is inconsistent (for example a missing shard)."""


class ApiError(ShapfleetError):
    """Raised by the client for a 4xx/5xx answer; ``problem`` is the problem+json body (type, title,
    status, detail) and ``status`` its HTTP status."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        prefix = f"{status} " if status else ""
        super().__init__(f"{prefix}{problem.get('title', '')}: {problem.get('detail', '')}".strip())


class ServerUnreachable(ApiError):
    """Raised when the server cannot be reached at all (refused, DNS, timeout)."""


class StackError(ShapfleetError, RuntimeError):
    """Raised when a local stack (``shapfleet up``, the tests' servers) cannot start or stops early."""
