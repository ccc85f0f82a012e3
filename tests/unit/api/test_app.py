"""A model that cannot load: one error record naming the cause, the traceback only at debug level."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.api.app import load_failure
from server.api.state import AppState
from server.model.loader import ModelLoadError
from server.settings import Settings


def _failed_load(model: Path, caplog: pytest.LogCaptureFixture) -> AppState:
    """Start an app on `model` and wait until its load has failed."""
    failed = threading.Event()
    app = create_app(Settings(model=str(model)), on_load_error=failed.set)
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


def test_load_failure_is_a_checkpoint_errors_message_or_the_exceptions_type() -> None:
    assert load_failure(ModelLoadError("/m has no weights")) == "/m has no weights"
    assert load_failure(KeyError("x")) == "KeyError: 'x'"
    assert load_failure(MemoryError()) == "MemoryError"
    assert load_failure(RuntimeError("CUDA out of memory.\n  Tried 2 GiB")) == (
        "RuntimeError: CUDA out of memory. Tried 2 GiB"
    )
