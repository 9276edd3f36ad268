"""The Flask application factory.

``create_app(settings=None, services=None)``: settings default to :meth:`ServiceSettings.from_env`
(read once, here); tests pass their own. Every request under ``/v1`` is authenticated; ``/healthz``,
``/readyz``, ``/metrics`` and ``/openapi.json`` are not.
"""

from __future__ import annotations

from flask import Flask, g, request

from shapfleet.broker.services import Services
from shapfleet.broker.settings import ServiceSettings

from . import problems
from .auth import KeyRing
from .problems import Problem

PUBLIC_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json")


def create_app(settings: ServiceSettings | None = None, services: Services | None = None) -> Flask:
    settings = settings or (services.settings if services else ServiceSettings.from_env())
    app = Flask("shapfleet")
    # Flask refuses larger bodies with 413 before reading them into memory.
    app.config["MAX_CONTENT_LENGTH"] = settings.limits.max_upload_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.limits.max_upload_bytes
    app.json.sort_keys = False
    app.extensions["shapfleet"] = services or Services.from_settings(settings)
    keyring = KeyRing.from_settings(settings)
    problems.register(app)

    @app.before_request
    def authenticate():
        if request.path in PUBLIC_PATHS or request.path == "/" or request.path.startswith("/ui/"):
            return None
        tenant = keyring.tenant_for(request.headers.get("Authorization"))
        if tenant is None:
            raise Problem(401, "Unauthorized", "send a valid API key as 'Authorization: Bearer <key>'",
                          headers={"WWW-Authenticate": 'Bearer realm="shapfleet"'})
        g.tenant = tenant
        return None

    from .ops_views import ops
    from .views import v1
    from .web import web

    app.register_blueprint(v1)
    app.register_blueprint(ops)
    app.register_blueprint(web)
    return app


def services_of(app: Flask) -> Services:
    return app.extensions["shapfleet"]
