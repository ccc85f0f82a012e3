"""Logging with the request id and session id of the current request, as text or JSON lines.

The ids live in context variables set by the request middleware and the routes; every log record
emitted while serving that request (in its task) carries them. Both formats stamp records with an
ISO 8601 UTC time to the millisecond (`2025-01-31T12:00:00.123Z`; the JSON `ts` field), drop
uvicorn's `color_message` extra and strip ANSI escape codes: the output is plain text either way.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tssc_request_id", default=None)
session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tssc_session_id", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_DROPPED = {"color_message"}  # uvicorn's copy of the message with ANSI colours
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_NEEDS_QUOTES = re.compile(r'[\s"=]')

OutputFormat = Literal["text", "json"]


def iso_time(created: float) -> str:
    """A record's `created` (epoch seconds) as ISO 8601 in UTC with milliseconds."""
    stamp = datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record carries beyond the standard ones (`extra=`, request and session ids)."""
    items = record.__dict__.items()
    return {k: v for k, v in items if k not in _STANDARD and k not in _DROPPED and not k.startswith("_")}


class ContextFilter(logging.Filter):
    """Adds `request_id` and `session_id` to every record (None outside a request). With
    `session_ids=False` (`--no-log-session-ids`) no record carries a session id, the access log included."""

    def __init__(self, session_ids: bool = True) -> None:
        super().__init__()
        self.session_ids = session_ids

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if not self.session_ids:
            record.__dict__.pop("session_id", None)
        elif getattr(record, "session_id", None) is None:
            record.session_id = session_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601), level, logger, msg, request_id, session_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": strip_ansi(record.getMessage()),
        }
        for key, value in _extras(record).items():
            out[key] = strip_ansi(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = strip_ansi(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


def _pair(key: str, value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return f"{key}={json.dumps(text) if not text or _NEEDS_QUOTES.search(text) else text}"


class TextFormatter(logging.Formatter):
    """`TIME LEVEL logger: message  key=value ...` (fields that are None left out), then any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{iso_time(record.created)} {record.levelname:<8} {record.name}: {record.getMessage()}"
        fields = " ".join(_pair(k, v) for k, v in _extras(record).items() if v is not None)
        if fields:
            line += "  " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return strip_ansi(line)


def resolve_format(fmt: str, stream: TextIO) -> OutputFormat:
    """`auto` is text when `stream` is a terminal (a person reads it), JSON otherwise (a log shipper)."""
    if fmt in ("text", "json"):
        return "text" if fmt == "text" else "json"
    if fmt != "auto":
        raise ValueError(f"unknown log format {fmt!r}: auto, text or json")
    isatty = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def configure_logging(
    level: int, session_ids: bool = True, fmt: str = "auto", stream: TextIO | None = None
) -> None:
    """Route the root logger (and uvicorn's) to `stream` (stderr), as text or JSON lines (`resolve_format`)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    text = resolve_format(fmt, stream) == "text"
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    handler.addFilter(ContextFilter(session_ids))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the app logs each request itself
