"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status codes.

Every failure the API can foresee is an `APIError`; FastAPI's request-validation errors become 400
(never FastAPI's 422 shape); Starlette's HTTP errors (404 route, 405 method) keep their status; any
other exception is logged and answered with a 500 in the same shape (a bug, never expected).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """A request the API refuses, with everything the client needs to know why."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPE_BY_STATUS.get(status, "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _is_field(part: int | str) -> bool:
    text = str(part)
    return not ("[" in text or "(" in text or text in _TYPE_TAGS)


def _loc_to_param(loc: Sequence[int | str]) -> str | None:
    """`("body", "messages", 0, "role")` -> `messages[0].role` (union member tags dropped)."""
    parts = [str(p) for p in loc if p not in ("body", "header", "query", "path") and _is_field(p)]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def _code_of(error_type: str) -> str:
    if error_type == "missing":
        return "missing_required_parameter"
    if error_type.endswith(("_type", "_parsing")) or error_type in (
        "literal_error",
        "enum",
        "union_tag_invalid",
    ):
        return "invalid_type"
    return "invalid_value"


def validation_error(exc: RequestValidationError) -> APIError:
    """The first validation error, as an OpenAI 400."""
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request.")
    first = errors[0]
    error_type = str(first.get("type", ""))
    if error_type == "json_invalid":
        return bad_request("The request body is not valid JSON.", code="invalid_json")
    param = _loc_to_param(first.get("loc", ()))
    msg = str(first.get("msg", "Invalid value"))
    if param is None and len(first.get("loc", ())) <= 1 and error_type.endswith("_type"):
        msg = "The request body must be a JSON object."
    message = f"{param}: {msg}" if param else msg
    return bad_request(message, param=param, code=_code_of(error_type))


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    if exc.status >= 500:
        log.warning("request refused: %s", exc.message, extra={"status": exc.status})
    return error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    message = str(exc.detail) if exc.detail else "HTTP error"
    err = APIError(status, message, code=None, headers=exc.headers or None)
    return error_response(err)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("Internal server error.", "server_error", None, "internal_error"), 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
