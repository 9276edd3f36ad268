"""WSGI entry point for gunicorn: ``gunicorn shapfleet.api.wsgi:app`` (settings from SHAPFLEET_* variables)."""

from .app import create_app

app = create_app()
