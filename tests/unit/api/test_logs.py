"""Log formats: text and JSON lines, ISO 8601 UTC timestamps, no uvicorn `color_message`, no ANSI codes."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from server.api.logs import (
    JsonFormatter,
    TextFormatter,
    configure_logging,
    iso_time,
    request_id_var,
    resolve_format,
)

CREATED = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z
ANSI = "\x1b["
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _make_record(msg: str = "engine ready", exc: bool = False, **extra: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("server.api.app", logging.INFO, __file__, 1, msg, (), exc_info)
    record.created = CREATED
    record.__dict__.update(extra)
    return record


def _uvicorn_style_record() -> logging.LogRecord:
    """What uvicorn logs at start-up: a plain message plus a coloured copy in `extra`."""
    url = "http://127.0.0.1:8000"
    return _make_record(f"Uvicorn running on {url}", color_message=f"Uvicorn running on \x1b[1m{url}\x1b[0m")


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    """A buffer standing for stderr; the loggers `configure_logging` changes are restored after."""
    root, access = logging.getLogger(), logging.getLogger("uvicorn.access")
    saved = (root.handlers[:], root.level, access.disabled)
    yield io.StringIO()
    root.handlers[:], root.level, access.disabled = saved


def test_iso_time_is_utc_with_milliseconds() -> None:
    assert iso_time(CREATED) == "2023-11-14T22:13:20.250Z"
    assert ISO.fullmatch(iso_time(0.0001)) and iso_time(0.0001).startswith("1970-01-01T00:00:00.000")


def test_json_ts_is_an_iso_string() -> None:
    out = json.loads(JsonFormatter().format(_make_record()))
    assert out["ts"] == "2023-11-14T22:13:20.250Z"
    assert datetime.fromisoformat(out["ts"]).timestamp() == pytest.approx(CREATED)


def test_json_keeps_extras_and_drops_color_message() -> None:
    line = JsonFormatter().format(_uvicorn_style_record())
    out = json.loads(line)
    assert "color_message" not in out and out["msg"] == "Uvicorn running on http://127.0.0.1:8000"
    assert json.loads(JsonFormatter().format(_make_record(status=200)))["status"] == 200


def test_json_strips_ansi_codes_from_messages_and_extras() -> None:
    record = _make_record("\x1b[32mgreen\x1b[0m", path="\x1b[1m/v1/models\x1b[0m")
    out = json.loads(JsonFormatter().format(record))
    assert (out["msg"], out["path"]) == ("green", "/v1/models")


def test_text_line_reads_time_level_logger_message_fields() -> None:
    line = TextFormatter().format(_make_record(status=200, request_id="r1", session_id=None))
    assert line == "2023-11-14T22:13:20.250Z INFO     server.api.app: engine ready  status=200 request_id=r1"


def test_text_quotes_values_with_spaces_and_renders_others_as_json() -> None:
    line = TextFormatter().format(_make_record(model="my model", cache=True, empty=""))
    assert line.endswith('model="my model" cache=true empty=""')


def test_text_drops_color_message_and_has_no_ansi_codes() -> None:
    line = TextFormatter().format(_uvicorn_style_record())
    assert "color_message" not in line and ANSI not in line
    assert line.endswith("Uvicorn running on http://127.0.0.1:8000")


def test_text_appends_the_traceback() -> None:
    lines = TextFormatter().format(_make_record("failed", exc=True)).splitlines()
    assert lines[0].endswith("server.api.app: failed") and lines[-1] == "ValueError: boom"


@pytest.mark.parametrize(
    ("fmt", "stream", "expected"),
    [
        ("auto", _Tty(), "text"),
        ("auto", io.StringIO(), "json"),
        ("json", _Tty(), "json"),
        ("text", io.StringIO(), "text"),
    ],
)
def test_auto_is_text_on_a_terminal_and_json_otherwise(fmt: str, stream: io.StringIO, expected: str) -> None:
    assert resolve_format(fmt, stream) == expected


def test_an_unknown_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="auto, text or json"):
        resolve_format("xml", io.StringIO())


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configured_logging_carries_the_request_id_without_ansi(stderr: io.StringIO, fmt: str) -> None:
    configure_logging(logging.INFO, fmt=fmt, stream=stderr)
    token = request_id_var.set("req-7")
    try:
        logging.getLogger("uvicorn.error").handle(_uvicorn_style_record())
    finally:
        request_id_var.reset(token)
    (line,) = stderr.getvalue().splitlines()
    assert "req-7" in line and "color_message" not in line and ANSI not in line and "\\u001b" not in line
    ts = line.split(" ", 1)[0] if fmt == "text" else json.loads(line)["ts"]
    assert ts == "2023-11-14T22:13:20.250Z"


def test_configured_auto_logging_writes_json_when_stderr_is_not_a_terminal(stderr: io.StringIO) -> None:
    configure_logging(logging.INFO, stream=stderr)
    logging.getLogger("tssc.test").info("hello")
    out = json.loads(stderr.getvalue())
    assert out["msg"] == "hello" and ISO.fullmatch(out["ts"])
