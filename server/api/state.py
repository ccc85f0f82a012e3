"""Per-app state (no globals): settings, metrics, the engine, in-flight accounting."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# A streamed response's task group makes anyio import its asyncio backend on first use: ~10-14 ms of a
# front-end process's first request (py-spy, this project's CPU; `--api-servers` starts several). Here, at
# start-up, instead.
import anyio._backends._asyncio  # noqa: F401
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import APIError
from server.api.generation import shutting_down
from server.engine.types import GenerationRequest, TokenEvent
from server.metrics import EngineStats, Metrics
from server.model.chat_encoding import ChatEncoder
from server.model.tokenizer import Tokenizer
from server.settings import Settings


class EngineLike(Protocol):
    """What the API uses of an engine: `server.engine.engine.Engine` in this process, or
    `server.engine.client.EngineClient` in front of an engine core process (`--engine-process`)."""

    @property
    def ready(self) -> bool: ...

    @property
    def failure(self) -> str | None: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]: ...

    def generate_batches(self, req: GenerationRequest) -> AsyncIterator[list[TokenEvent]]: ...

    def start(self) -> Any: ...

    def end_all(self, reason: str) -> int: ...

    async def stop(self) -> None: ...

    async def stats(self) -> EngineStats: ...

    async def session_info(self, namespace: str, session_id: str) -> dict[str, Any] | None: ...

    async def delete_session(self, namespace: str, session_id: str) -> int | None: ...

    async def start_profile(self) -> bool: ...

    async def stop_profile(self) -> str | None: ...


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine: EngineLike | None = None
    load_error: str | None = None
    inflight: int = 0
    draining: bool = False  # a shutdown began: new generation requests get 503 + Retry-After
    on_load_error: Callable[[], None] | None = None
    on_ready: Callable[[], None] | None = None  # once the engine serves (`create_app`)
    # a further front end of --api-servers answers /metrics with the primary's registry (`server.frontends`)
    render_metrics: Callable[[], Awaitable[bytes]] | None = None
    api_server: int = 0  # this front end's index (0: the primary)
    created: int = field(default_factory=lambda: int(time.time()))
    _chat_encoder: ChatEncoder | None = None

    def chat_encoder(self, tokenizer: Tokenizer) -> ChatEncoder:
        """The per-session incremental chat encoder of the served tokenizer (made on first use)."""
        if self._chat_encoder is None or self._chat_encoder.tokenizer is not tokenizer:
            self._chat_encoder = ChatEncoder(tokenizer, answer_ids=self.settings.chat_answer_ids)
        return self._chat_encoder

    @property
    def ready(self) -> bool:
        return self.engine is not None and bool(self.engine.ready)

    @property
    def failed(self) -> bool:
        """The model failed to load, or the engine stopped on its own (its core process died)."""
        return self.load_error is not None or (self.engine is not None and self.engine.failure is not None)

    def require_engine(self) -> EngineLike:
        """The engine, or 503 while the model loads (or failed to) and once a shutdown began."""
        if self.draining:
            raise shutting_down()
        if self.engine is not None and self.engine.failure is not None:
            raise APIError(503, "The engine stopped; the server needs a restart.", code="engine_failed")
        if self.engine is None or not self.engine.ready:
            message = (
                "The model is still loading." if self.load_error is None else "The model failed to load."
            )
            raise APIError(503, message, code="model_not_ready", headers={"Retry-After": "5"})
        return self.engine

    def acquire(self) -> None:
        """Count one generation request in flight, or 429 when saturated."""
        if self.inflight >= self.settings.max_concurrent_requests:
            raise APIError(
                429,
                f"Too many requests in flight (limit {self.settings.max_concurrent_requests}); retry shortly.",
                code="too_many_requests",
                headers={"Retry-After": "1"},
            )
        self.inflight += 1

    def release(self) -> None:
        self.inflight = max(0, self.inflight - 1)


def app_state(request: Request) -> AppState:
    state = request.app.state.tssc
    assert isinstance(state, AppState)
    return state


class ReleasingStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends (finished, disconnected, cancelled). It tells
    proxies not to buffer it (`X-Accel-Buffering: no`, which nginx honours whatever its config says)."""

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str]
    ) -> None:
        headers = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache", **headers}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            # A disconnect may cancel the stream while it waits in `send`: close the generator
            # now (aborting its engine requests) rather than at garbage collection.
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()
