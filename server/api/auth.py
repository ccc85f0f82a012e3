"""Bearer-key authentication and per-key session namespaces.

With no `--api-key`, every request is allowed and lives in the namespace "anon". With keys, a
request must carry `Authorization: Bearer <key>` for one of them (compared in constant time), and
its namespace is a hash of the key: a session id used under key A is invisible under key B, and the
key itself never reaches the cache, the logs or the metrics.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from server.api.errors import APIError

ANON_NAMESPACE = "anon"


def namespace_of(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(authorization: str | None, keys: Sequence[str]) -> str:
    """The request's namespace, or a 401 `APIError`."""
    if not keys:
        return ANON_NAMESPACE
    token = _bearer(authorization)
    if token is None:
        raise _unauthorized("Missing bearer token: send 'Authorization: Bearer <key>'.")
    token_bytes = token.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:  # no early exit: the time does not depend on which key matched
        matched |= hmac.compare_digest(token_bytes, key.encode())
    if not matched:
        raise _unauthorized("Invalid API key.")
    return namespace_of(token)


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
