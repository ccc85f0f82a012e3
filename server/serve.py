"""`tssc serve` / `python -m server serve` / `python -m server.serve`: settings -> engine -> app -> uvicorn."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from server.api import create_app
from server.api.logs import configure_logging
from server.api.shutdown import drain
from server.api.state import AppState
from server.heap import freeze_heap
from server.http_protocol import http_protocol
from server.metrics import Metrics
from server.settings import Settings, apply_switch_interval, parse_settings, resolve_engine_process

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn, whose first SIGTERM/SIGINT drains the app (`server.api.shutdown`) before shutting down."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float) -> None:
        super().__init__(config)
        self._app, self._grace = app, grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None  # held: the loop keeps only a weak reference to tasks
        self._draining = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)  # a second signal: uvicorn's own (immediate) shutdown
            return
        self._draining = True
        self._captured_signals.append(sig)  # uvicorn re-raises it once it has shut down
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        state: AppState = self._app.state.tssc
        try:
            await drain(state, self._grace)
        finally:
            self.should_exit = True


def _settings_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        flag = "--" + "-".join(str(p) for p in err.get("loc", ())).replace("_", "-")
        lines.append(f"{flag}: {err.get('msg')}")
    return "tssc serve: invalid settings\n  " + "\n  ".join(lines)


def serve(argv: Sequence[str] | None = None) -> int:
    """Run the server until interrupted. Returns the process exit code (2: bad flags, 1: the model
    could not be loaded, after one plain line on stderr naming the cause)."""
    try:
        settings = parse_settings(argv)
    except SystemExit as exc:  # --help, or an unknown flag (argparse printed why)
        return exc.code if isinstance(exc.code, int) else 2
    except ValidationError as exc:
        sys.stderr.write(_settings_error(exc) + "\n")
        return 2
    settings = resolve_engine_process(settings)  # logged as decided
    configure_logging(settings.log_level_int, session_ids=settings.log_session_ids, fmt=settings.log_format)
    apply_switch_interval(settings)
    failed: list[bool] = []
    server: DrainingServer | None = None

    def on_load_error() -> None:
        failed.append(True)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, metrics=Metrics(), on_load_error=on_load_error, on_ready=freeze_heap)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        http=http_protocol(),
    )
    server = DrainingServer(config, app, settings.shutdown_grace)
    _log_start(settings)
    server.run()
    if failed:
        _report_load_failure(app.state.tssc)
        return 1
    return 0


def _log_start(settings: Settings) -> None:
    log.info(
        "serving",
        extra={
            "model": settings.model,
            "served_model_name": settings.model_name,
            "host": settings.host,
            "port": settings.port,
            "cache": not settings.no_cache,
            "auth": settings.auth_enabled,
        },
    )


def _report_load_failure(state: AppState) -> None:
    """The last line the operator sees: the cause in plain words (the logs above have the record, and
    the traceback at --log-level debug)."""
    sys.stderr.write(f"tssc serve: cannot load the model: {state.load_error}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    raise SystemExit(serve())
