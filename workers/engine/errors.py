"""The engine's exceptions.

Every error a user can cause derives from :class:`ShapfleetError`; its message says what was wrong
and what to do. The command line prints the message and exits non-zero; the HTTP API maps the class
to a problem+json status. Lower-level errors (onnx, onnxruntime, PIL, numpy) are translated with
``raise ... from e`` at the module that calls the library.

    ShapfleetError
    +-- InvalidSettingsError   a setting is out of range or malformed
    +-- ImageError             an image cannot be read or does not fit the model
    +-- ModelError             a model cannot be loaded or is not an image classifier
    +-- ModelOutputError       the model ran but returned something unusable (NaN, Inf, wrong shape)
    +-- EstimationError        the regression cannot be solved with the given budget
"""

from __future__ import annotations


class ShapfleetError(Exception):
    """Base class. Raised never directly; catch it to handle every user-facing engine error."""


class InvalidSettingsError(ShapfleetError, ValueError):
    """Raised when an explanation setting is malformed or out of range."""


class ImageError(ShapfleetError):
    """Raised when an image cannot be decoded, is empty, or does not fit the model's input."""


class ModelError(ShapfleetError):
    """Raised when a model cannot be loaded or does not have exactly one image-shaped input."""


class ModelOutputError(ShapfleetError):
    """Raised when the model's output is not finite or not of shape (batch, classes)."""


class EstimationError(ShapfleetError):
    """Raised when the KernelSHAP regression is singular for the coalitions evaluated."""


class Canceled(Exception):
    """Raised inside shard evaluation when the job was canceled; not an error of the user's input."""
