"""A model that cannot load: one error record naming the cause, the traceback only at debug level. An engine
that starts: `on_ready` runs once, after its start."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.api.app import load_failure
from server.api.state import AppState
from server.model.loader import ModelLoadError
from server.settings import Settings


def _failed_load(
    model: Path, caplog: pytest.LogCaptureFixture, on_ready: Callable[[], None] | None = None
) -> AppState:
    """Start an app on `model` and wait until its load has failed."""
    failed = threading.Event()
    app = create_app(Settings(model=str(model)), on_load_error=failed.set, on_ready=on_ready)
    with caplog.at_level(logging.DEBUG, logger="server.api.app"), TestClient(app):
        assert failed.wait(60), "the load did not fail"
    state: AppState = app.state.tssc
    return state


def test_a_failed_load_records_the_plain_cause(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = _failed_load(tmp_path, caplog)
    assert state.load_error == f"{tmp_path} has no config.json"


def test_a_failed_load_logs_one_error_without_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _failed_load(tmp_path, caplog)
    records = [r for r in caplog.records if r.name == "server.api.app"]
    (error,) = [r for r in records if r.levelno >= logging.ERROR]
    assert error.getMessage() == f"cannot load the model: {tmp_path} has no config.json"
    assert error.exc_info is None
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in records)


def test_a_failed_load_does_not_call_on_ready(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    _failed_load(tmp_path, caplog, on_ready=lambda: calls.append("ready"))
    assert calls == []


class _StartingEngine:
    """Just enough of an engine for the lifespan: it records its start and stop in `calls`."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    @property
    def ready(self) -> bool:
        return "start" in self.calls

    def start(self) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")


def test_on_ready_runs_once_after_the_engine_started() -> None:
    calls: list[str] = []
    engine = _StartingEngine(calls)
    app = create_app(Settings(), engine=engine, on_ready=lambda: calls.append("ready"))  # type: ignore[arg-type]
    with TestClient(app):
        pass
    assert calls == ["start", "ready", "stop"]


def test_load_failure_is_a_checkpoint_errors_message_or_the_exceptions_type() -> None:
    assert load_failure(ModelLoadError("/m has no weights")) == "/m has no weights"
    assert load_failure(KeyError("x")) == "KeyError: 'x'"
    assert load_failure(MemoryError()) == "MemoryError"
    assert load_failure(RuntimeError("CUDA out of memory.\n  Tried 2 GiB")) == (
        "RuntimeError: CUDA out of memory. Tried 2 GiB"
    )
