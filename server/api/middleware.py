"""Pure ASGI middleware (never BaseHTTPMiddleware: it would hide client disconnects from streams).

- `RequestContextMiddleware`: a request id per request (the client's `X-Request-ID` when sane),
  set in the logging context and echoed in the response; one access-log record per request.
- `BodyLimitMiddleware`: bodies over `max_body_bytes` get 413 before any parsing. The body is read
  up front (it is bounded) and replayed; after it, `receive` is the server's again, so disconnects
  still reach the app.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_body
from server.api.logs import request_id_var, session_id_var

log = logging.getLogger("tssc.access")
SESSION_ROUTE = "/v1/sessions/"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class RequestContextMiddleware:
    """`log_session_ids=False` keeps session ids out of the access log, paths of the session routes too."""

    def __init__(self, app: ASGIApp, log_session_ids: bool = True) -> None:
        self.app = app
        self.log_session_ids = log_session_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and _SANE_ID.match(given) else "req-" + uuid.uuid4().hex[:20]
        scope.setdefault("state", {})["request_id"] = request_id
        scope["state"]["t_start"] = (
            time.monotonic()
        )  # the request phases (`tssc_request_phase_seconds`) start here
        rid_token = request_id_var.set(request_id)
        sid_token = session_id_var.set(None)
        status = {"code": 0}
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._log(scope, status["code"], time.perf_counter() - start)
            request_id_var.reset(rid_token)
            session_id_var.reset(sid_token)

    def _log(self, scope: Scope, status: int, seconds: float) -> None:
        state: dict[str, Any] = scope.get("state", {})
        path = str(scope.get("path"))
        if not self.log_session_ids and path.startswith(SESSION_ROUTE):
            path = SESSION_ROUTE + "{session_id}"
        log.info(
            "%s %s %d",
            scope.get("method"),
            path,
            status,
            extra={
                "status": status,
                "duration_s": round(seconds, 6),
                "session_id": state.get("session_id"),
                "namespace": state.get("namespace"),
            },
        )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(send)
            return
        body, disconnected = await self._read(receive)
        if body is None:
            await self._too_large(send)
            return
        await self.app(scope, _replay(body, disconnected, receive), send)

    async def _read(self, receive: Receive) -> tuple[bytes | None, bool]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    async def _too_large(self, send: Send) -> None:
        body = error_body(
            f"Request body too large (limit {self.max_body_bytes} bytes).",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _replay(body: bytes, disconnected: bool, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnected:
            return {"type": "http.disconnect"}
        return await receive()

    return replay
