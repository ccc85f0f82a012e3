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


def is_json_media_type(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this Content-Type as JSON: application/json or application/*+json."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _content_type_error(content_type: str | None) -> APIError:
    got = f"got {content_type!r}" if content_type else "none was sent"
    message = f"The Content-Type must be application/json ({got}); the body must be a JSON object."
    return bad_request(message, code="invalid_content_type")


def _unsupported_part(errors: Sequence[Mapping[str, Any]]) -> APIError | None:
    """A chat content part whose `type` is not 'text' (the only part type served), if any."""
    for err in errors:
        loc, value = tuple(err.get("loc", ())), err.get("input")
        part_type = err.get("type") == "literal_error" and loc[-1:] == ("type",) and "content" in loc
        if part_type and isinstance(value, str) and value != "text":
            param = _loc_to_param(loc)
            message = f"content part type '{value}' is not supported; only 'text' parts are."
            return bad_request(f"{param}: {message}", param=param, code="unsupported_content_part")
    return None


def _most_specific(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The first error, or for message content given as a list (which fails the plain-string branch
    first) the first error inside the list: that is where the client's mistake is."""
    first = errors[0]
    param = _loc_to_param(first.get("loc", ()))
    if param is None or not param.endswith("content") or not isinstance(first.get("input"), list):
        return first
    inside = [e for e in errors if (_loc_to_param(e.get("loc", ())) or "").startswith(param + "[")]
    return inside[0] if inside else first


def validation_error(exc: RequestValidationError, content_type: str | None = "application/json") -> APIError:
    """The validation error that names the client's mistake, as an OpenAI 400. `content_type` is the
    request's header: a body that is not JSON because it was not declared JSON says so."""
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request.")
    if tuple(errors[0].get("loc", ())) == ("body",) and not is_json_media_type(content_type):
        return _content_type_error(content_type)
    if (part := _unsupported_part(errors)) is not None:
        return part
    first = _most_specific(errors)
    error_type = str(first.get("type", ""))
    if error_type == "json_invalid":
        return bad_request("The request body is not valid JSON.", code="invalid_json")
    param = _loc_to_param(first.get("loc", ()))
    msg = str(first.get("msg", "Invalid value"))
    if param is None and len(first.get("loc", ())) <= 1:
        msg = _body_message(error_type, msg)
    message = f"{param}: {msg}" if param else msg
    return bad_request(message, param=param, code=_code_of(error_type))


def _body_message(error_type: str, msg: str) -> str:
    """The message of an error about the body as a whole."""
    if error_type == "missing":
        return "The request body is missing; send a JSON object."
    return "The request body must be a JSON object." if error_type.endswith("_type") else msg


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    if exc.status >= 500:
        log.warning("request refused: %s", exc.message, extra={"status": exc.status})
    return error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc, request.headers.get("content-type")))


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
