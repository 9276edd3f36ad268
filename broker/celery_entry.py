"""Entry point for the ``celery`` command (``celery -A shapfleet.broker.celery_entry flower``, ``... inspect``).

It reads ``SHAPFLEET_*`` from the environment when imported, so import it only from such commands;
``shapfleet worker`` builds its app itself.
"""

from .celery_app import create_celery
from .settings import ServiceSettings

app = create_celery(ServiceSettings.from_env())
