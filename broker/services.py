"""The shared handles a process needs: settings, Redis, the object store, job records, the Celery app.

Built once per process from settings; connections open lazily on first use (and are rebuilt after a
fork, since Redis pools and boto3 clients must not cross one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from celery import Celery

from .celery_app import create_celery
from .claims import TaskClaims
from .jobs import JobStore
from .settings import ServiceSettings
from .store import ObjectStore, open_store


@dataclass
class Services:
    settings: ServiceSettings
    celery: Celery
    _pid: int = field(default=-1, repr=False)
    _redis: object = field(default=None, repr=False)
    _store: ObjectStore | None = field(default=None, repr=False)
    _jobs: JobStore | None = field(default=None, repr=False)
    _claims: TaskClaims | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: ServiceSettings, celery: Celery | None = None) -> "Services":
        return cls(settings, celery or create_celery(settings))

    def _fresh(self) -> None:
        if self._pid != os.getpid():
            import redis

            self._pid = os.getpid()
            self._redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=10, socket_connect_timeout=5,
                                               health_check_interval=30)
            self._store = open_store(self.settings)
            self._jobs = JobStore(self._redis)
            self._claims = TaskClaims(self._redis)

    @property
    def redis(self):
        self._fresh()
        return self._redis

    @property
    def store(self) -> ObjectStore:
        self._fresh()
        return self._store

    @property
    def jobs(self) -> JobStore:
        self._fresh()
        return self._jobs

    @property
    def claims(self) -> TaskClaims:
        self._fresh()
        return self._claims
