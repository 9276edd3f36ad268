"""shapfleet: SHAP explanations of ONNX image classifiers, in-process or on a Celery fleet.

The public surface, importable from here::

    import shapfleet

    (run,) = shapfleet.explain(["cat.png"], "model.onnx", shapfleet.ExplainSettings(top_k=2))
    run.explanation.values               # M x K Shapley values; .std their standard errors
    shap.image_plot(run.explanation.to_shap())

    client = shapfleet.Client("http://127.0.0.1:8000", api_key="...")

Names resolve on first use, so ``import shapfleet`` loads no numerics: a client-only install
(``pip install shapfleet``, requests alone) has :class:`Client` and the exceptions, and the engine's
names need ``pip install shapfleet[engine]``. The folders ``api/``, ``broker/`` and ``workers/`` of the
repository install as ``shapfleet.api``, ``shapfleet.broker`` and ``shapfleet.workers``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import ShapfleetError, UserError

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_LAZY = {
    "explain": "shapfleet.workers.local",
    "explain_array": "shapfleet.workers.local",
    "ExplainRun": "shapfleet.workers.local",
    "ExplainSettings": "shapfleet.workers.engine.settings",
    "Explanation": "shapfleet.workers.engine.result",
    "Client": "shapfleet.api.client",
    "ApiError": "shapfleet.errors",
}

__all__ = [
    "ApiError",
    "Client",
    "ExplainRun",
    "ExplainSettings",
    "Explanation",
    "ShapfleetError",
    "UserError",
    "__version__",
    "explain",
    "explain_array",
]

if TYPE_CHECKING:
    from .api.client import Client
    from .errors import ApiError
    from .workers.engine.result import Explanation
    from .workers.engine.settings import ExplainSettings
    from .workers.local import ExplainRun, explain, explain_array


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shapfleet' has no attribute {name!r}")
    try:
        value = getattr(import_module(module), name)
    except ModuleNotFoundError as e:
        raise ImportError(f"shapfleet.{name} needs the engine: pip install 'shapfleet[engine]' ({e})") from e
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
