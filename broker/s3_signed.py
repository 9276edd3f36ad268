"""S3 ``PutObject``, ``GetObject`` and ``HeadObject`` signed with AWS Signature Version 4 over
kept-alive ``http.client`` connections.

A job stores and reads many small objects (a shard's statistics, an image's plan, its PNGs, one per
class); through boto3 each request costs 1.5-3 ms of client CPU (request model, validation, event
hooks, checksum), which on a busy worker is as much as drawing the picture, and a reduce that reads
an object per image waits that long for each. These three requests are built by hand: path-style
``<method> /<bucket>/<key>``, the payload's SHA-256 in ``x-amz-content-sha256`` (that of the empty
string for a GET or HEAD), signed as the S3 documentation's "Signature Calculations for the
Authorization Header" gives:

    canonical request = method \\n path \\n query \\n canonical headers \\n signed headers \\n payload hash
    string to sign    = "AWS4-HMAC-SHA256" \\n time \\n date/region/s3/aws4_request \\n SHA-256(canonical request)
    signing key       = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), "s3"), "aws4_request")

Presigned GET URLs are signed here too, by the same key, with the signature in the query string
(the documentation's "Authenticating Requests: Using Query Parameters"): the payload is
``UNSIGNED-PAYLOAD``, ``host`` the one signed header, and the canonical query the sorted, encoded
``X-Amz-*`` parameters, the same for every key signed in the same second (encoded once for them).
A succeeded job's listing holds one such URL per artifact, built on every poll: boto3 took half a
millisecond each (75 ms for the 142 of a 10-image x 10-class job), this about 7 microseconds.

Every other operation (list, delete, bucket creation) stays with boto3.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import threading
import time
import weakref
from urllib.parse import quote, urlsplit

#: Characters S3 leaves unencoded in a canonical URI (RFC 3986 unreserved, and the path's slashes).
_SAFE = "-_.~/"


def _stamp(now: float | None) -> str:
    """SigV4's request time, ``YYYYMMDDTHHMMSSZ`` in UTC, of ``now`` (default: the current time)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


class RequestFailed(Exception):
    """A request that came back with an error status: ``status`` and the body's first bytes."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}")
        self.status = status


#: Idle kept-alive connections kept for the next requests (the artifact writers use 8 threads at once).
MAX_IDLE_CONNECTIONS = 16


def _close_all(connections: list) -> None:
    while connections:
        connections.pop().close()


class SignedRequests:
    """``put``, ``get`` and ``head`` on one bucket of an S3-compatible endpoint over a pool of
    kept-alive connections (each request takes an idle one or opens one, and gives it back); a
    connection that fails is closed and the request sent once more on a new one (all three are
    idempotent: a PUT of the same bytes to the same key stores the same object)."""

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str, region: str,
                 timeout: float = 60.0) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"S3 endpoint {endpoint!r} is not an http(s) URL")
        self.scheme, self.host = parts.scheme, parts.netloc
        self.base_path = parts.path.rstrip("/")
        self.bucket, self.access_key, self.secret_key, self.region = bucket, access_key, secret_key, region
        self.timeout = timeout
        # The Host a client sends for a URL of this endpoint: no port where it is the scheme's default.
        default_port = 443 if parts.scheme == "https" else 80
        hostname = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6 in brackets
        self.url_host = hostname if parts.port in (None, default_port) else f"{hostname}:{parts.port}"
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._keys: dict[str, bytes] = {}
        self._last_query: tuple[tuple[str, int] | None, str] = (None, "")
        self._pid = os.getpid()
        weakref.finalize(self, _close_all, self._idle)

    def _take(self, fresh: bool) -> http.client.HTTPConnection:
        if not fresh:
            with self._lock:
                if self._pid != os.getpid():  # a forked child (a prefork pool process): never share a socket
                    _close_all(self._idle)
                    self._pid = os.getpid()
                if self._idle:
                    return self._idle.pop()
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.host, timeout=self.timeout)

    def _give_back(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            _close_all(self._idle)

    def _signing_key(self, date: str) -> bytes:
        key = self._keys.get(date)
        if key is None:
            key = ("AWS4" + self.secret_key).encode()
            for part in (date, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {date: key}
        return key

    def _scope(self, stamp: str) -> str:
        return f"{stamp[:8]}/{self.region}/s3/aws4_request"

    def _signature(self, stamp: str, canonical: str) -> str:
        """The hex signature of a canonical request made at ``stamp`` (``YYYYMMDDTHHMMSSZ``)."""
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, self._scope(stamp), hashlib.sha256(canonical.encode()).hexdigest()])
        return hmac.new(self._signing_key(stamp[:8]), to_sign.encode(), hashlib.sha256).hexdigest()

    def _path(self, key: str) -> str:
        return quote(f"{self.base_path}/{self.bucket}/{key}", safe=_SAFE)

    def headers(self, method: str, path: str, data: bytes = b"", content_type: str | None = None,
                now: float | None = None) -> dict[str, str]:
        """The request's headers, ``Authorization`` included, for ``method path`` (already encoded)."""
        stamp = _stamp(now)
        payload_hash = hashlib.sha256(data).hexdigest()
        signed = {"host": self.host, "x-amz-content-sha256": payload_hash, "x-amz-date": stamp}
        names = ";".join(sorted(signed))
        canonical = "\n".join([method, path, "", *(f"{n}:{signed[n]}" for n in sorted(signed)), "", names, payload_hash])
        scope, signature = self._scope(stamp), self._signature(stamp, canonical)
        headers = {"Host": self.host, "X-Amz-Content-Sha256": payload_hash, "X-Amz-Date": stamp,
                   "Authorization": f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                                    f"SignedHeaders={names}, Signature={signature}"}
        if method == "PUT":
            headers.update({"Content-Type": content_type or "application/octet-stream", "Content-Length": str(len(data))})
        return headers

    def presigned_get_url(self, key: str, expires: int, now: float | None = None) -> str:
        """A URL that GETs ``key`` without credentials for ``expires`` seconds from ``now`` (default:
        the current time), signed in its query string as boto3's ``generate_presigned_url`` signs it
        (the same URL for the same time)."""
        stamp, path = _stamp(now), self._path(key)
        query = self._presign_query(stamp, int(expires))
        canonical = "\n".join(["GET", path, query, f"host:{self.url_host}", "", "host", "UNSIGNED-PAYLOAD"])
        signature = self._signature(stamp, canonical)
        return f"{self.scheme}://{self.url_host}{path}?{query}&X-Amz-Signature={signature}"

    def _presign_query(self, stamp: str, expires: int) -> str:
        """The canonical query of a presigned URL made at ``stamp``: the same for every key, so a job
        listing's URLs (all made in the same second) encode it once."""
        cached = self._last_query
        if cached[0] == (stamp, expires):
            return cached[1]
        parameters = {"X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Credential": f"{self.access_key}/{self._scope(stamp)}",
                      "X-Amz-Date": stamp, "X-Amz-Expires": str(expires), "X-Amz-SignedHeaders": "host"}
        query = "&".join(f"{quote(name, safe='-_.~')}={quote(value, safe='-_.~')}" for name, value in sorted(parameters.items()))
        self._last_query = ((stamp, expires), query)  # one tuple, replaced whole: safe across threads
        return query

    def _request(self, method: str, key: str, data: bytes = b"", content_type: str | None = None,
                 extra: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        """``(status, headers, body)`` of one request, with ``extra`` headers (unsigned) beside the
        signed ones. Raises ``OSError`` / ``http.client.HTTPException`` when the endpoint could not be
        reached twice in a row."""
        path = self._path(key)
        for attempt in (0, 1):
            connection = self._take(fresh=attempt > 0)  # a kept-alive one may have been closed by the server
            try:
                connection.request(method, path, body=data if method == "PUT" else None,
                                   headers={**self.headers(method, path, data, content_type), **(extra or {})})
                response = connection.getresponse()
                body = response.read()  # empty for a HEAD: http.client reads no body for it
            except (OSError, http.client.HTTPException):
                connection.close()
                if attempt:
                    raise
                continue
            if response.will_close:
                connection.close()
            else:
                self._give_back(connection)
            return response.status, {name.lower(): value for name, value in response.getheaders()}, body
        raise AssertionError("unreachable")

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` at ``key``. Raises :class:`RequestFailed` (an error status) or ``OSError`` /
        ``http.client.HTTPException`` (the endpoint could not be reached twice in a row)."""
        status, _, body = self._request("PUT", key, data, content_type)
        if status >= 300:
            raise RequestFailed(status, body)

    def get(self, key: str) -> bytes:
        """The object at ``key``. Raises :class:`RequestFailed` (an error status, 404 for a missing
        key) or, as :meth:`put`, when the endpoint cannot be reached."""
        status, _, body = self._request("GET", key)
        if status != 200:
            raise RequestFailed(status, body)
        return body

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of the object at ``key`` from byte ``start`` (an HTTP Range request; a
        server that ignores the range sends the whole object, which is cut here). Raises as
        :meth:`get`, and :class:`RequestFailed` (416) when the object is shorter than the range."""
        if length <= 0:
            return b""
        status, _, body = self._request("GET", key, extra={"Range": f"bytes={start}-{start + length - 1}"})
        if status == 200:
            body = body[start:start + length]
        elif status != 206:
            raise RequestFailed(status, body)
        if len(body) != length:
            raise RequestFailed(416, b"the object is shorter than the range asked for")
        return body

    def head(self, key: str) -> int:
        """The size in bytes of the object at ``key``. Raises as :meth:`get`."""
        status, headers, _ = self._request("HEAD", key)
        if status != 200:
            raise RequestFailed(status, b"")
        return int(headers["content-length"])
