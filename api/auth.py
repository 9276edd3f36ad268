"""API keys -> tenants.

Keys come from ``SHAPFLEET_API_KEYS`` (``KEY:TENANT,KEY:TENANT``) and/or ``SHAPFLEET_API_KEYS_FILE``
(lines ``TENANT KEY``, or a JSON object ``{"KEY": "TENANT"}``). Only SHA-256 digests of keys are kept
in memory; a presented key is hashed and compared against every known digest in constant time.
Keys are never logged. ``SHAPFLEET_AUTH_DISABLED=1`` is the explicit development mode: every request
is tenant ``default``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from shapfleet.broker.settings import ServiceSettings

DEV_TENANT = "default"


class KeyRing:
    def __init__(self, keys: dict[str, str], disabled: bool = False) -> None:
        self._digests = [(hashlib.sha256(k.encode()).digest(), tenant) for k, tenant in keys.items()]
        self.disabled = disabled

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> "KeyRing":
        keys: dict[str, str] = {}
        if settings.api_keys:
            for pair in settings.api_keys.split(","):
                key, sep, tenant = pair.strip().partition(":")
                if not sep or not key or not tenant:
                    raise ValueError("SHAPFLEET_API_KEYS must be KEY:TENANT pairs separated by commas")
                keys[key] = tenant
        if settings.api_keys_file:
            text = Path(settings.api_keys_file).read_text(encoding="utf-8")
            if text.strip().startswith("{"):
                keys.update({str(k): str(v) for k, v in json.loads(text).items()})
            else:
                for line in text.splitlines():
                    if line.strip() and not line.lstrip().startswith("#"):
                        tenant, key = line.split()
                        keys[key] = tenant
        if not keys and not settings.auth_disabled:
            raise ValueError("no API keys configured: set SHAPFLEET_API_KEYS or SHAPFLEET_API_KEYS_FILE, "
                             "or SHAPFLEET_AUTH_DISABLED=1 for local development")
        return cls(keys, disabled=settings.auth_disabled)

    def tenant_for(self, authorization: str | None) -> str | None:
        """The tenant of an ``Authorization: Bearer <key>`` header, or None."""
        if self.disabled:
            return DEV_TENANT
        if not authorization or not authorization.startswith("Bearer "):
            return None
        digest = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found = None
        for known, tenant in self._digests:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(digest, known):
                found = tenant
        return found
