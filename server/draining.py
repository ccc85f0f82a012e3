"""uvicorn as `serve` runs it: `uvicorn_config(app, settings)` and `DrainingServer`, whose first SIGTERM/SIGINT
drains the app (`server.api.shutdown`) before shutting down."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.api.shutdown import drain
from server.api.state import AppState
from server.http_protocol import http_protocol
from server.settings import Settings


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        http=http_protocol(),
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, whose first SIGTERM/SIGINT drains the app before shutting down; `on_signal(sig)` runs first
    (the primary front end forwards it to the others: `server.frontends`)."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: FastAPI,
        grace: float,
        on_signal: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._app, self._grace, self._on_signal = app, grace, on_signal
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
        if self._on_signal is not None:
            self._on_signal(sig)
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
