"""The explanation engine: pure functions from (image, model, settings) to Shapley values.

Stages, one module each: ``segmentation`` -> ``maskers`` -> ``design`` (coalitions) -> ``model``
(onnxruntime adapter) -> ``evaluation`` (shards) -> ``estimation`` (regression) -> ``rendering``.
``planning`` and ``result`` tie them into plan / shard / reduce steps; ``local`` runs those in-process.
"""

from .errors import (
    Canceled,
    EstimationError,
    ImageError,
    InvalidSettingsError,
    ModelError,
    ModelOutputError,
    ShapfleetError,
)
from .local import ExplainRun, explain, explain_array
from .result import Explanation
from .settings import ExplainSettings

__all__ = [
    "Canceled",
    "EstimationError",
    "ExplainRun",
    "ExplainSettings",
    "Explanation",
    "ImageError",
    "InvalidSettingsError",
    "ModelError",
    "ModelOutputError",
    "ShapfleetError",
    "explain",
    "explain_array",
]
