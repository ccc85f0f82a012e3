"""The app factory: `create_app(settings, engine=None) -> FastAPI`. No module-level app.

Without an engine, the lifespan builds one in a worker thread (`build_engine(settings, metrics)`,
which loads the model) while the server already answers: `/health` is 503 until the engine is
ready. A given engine is started the same way; `on_ready` runs once it serves (`serve` freezes the
startup heap then: `server.heap`). Shutdown stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable

import anyio.to_thread
from fastapi import FastAPI

from server.api import routes_admin, routes_openai
from server.api.errors import install_error_handlers
from server.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from server.api.state import AppState, EngineLike
from server.metrics import Metrics
from server.settings import Settings, resolve_engine_process

log = logging.getLogger(__name__)


def _build(settings: Settings, metrics: Metrics) -> EngineLike:
    if settings.engine_process:  # the model loads in the core process, when the client starts it
        from server.engine.client import EngineClient

        return EngineClient(settings, metrics)
    from server.engine.factory import build_engine

    engine: EngineLike = build_engine(settings, metrics)
    return engine


async def _start(state: AppState) -> None:
    """Build (if needed) and start the engine; record a failure instead of raising: one error record
    with the cause (`state.load_error`), the traceback at debug level."""
    try:
        if state.engine is None:
            state.engine = await anyio.to_thread.run_sync(_build, state.settings, state.metrics)
        started = state.engine.start()
        if inspect.isawaitable(started):
            await started
        log.info("engine ready", extra={"model": state.settings.model_name})
    except Exception as exc:
        state.load_error = load_failure(exc)
        log.error("cannot load the model: %s", state.load_error)
        log.debug("the model load failed", exc_info=exc)
        if state.on_load_error is not None:
            state.on_load_error()
        return
    if state.on_ready is not None:
        state.on_ready()


def load_failure(exc: BaseException) -> str:
    """A failed load's cause on one line (`server.model.loader.load_failure`)."""
    from server.model.loader import load_failure as describe

    return describe(exc)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.tssc
    loader = asyncio.create_task(_start(state))
    app.state.loader = loader
    try:
        yield
    finally:
        loader.cancel()
        await asyncio.gather(loader, return_exceptions=True)
        if state.engine is not None:
            try:
                await state.engine.stop()
            except Exception:
                log.exception("engine stop failed")


def create_app(
    settings: Settings,
    engine: EngineLike | None = None,
    metrics: Metrics | None = None,
    on_load_error: Callable[[], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """A FastAPI app serving `settings.model_name` through `engine` (built at startup when None).

    `metrics` defaults to a fresh `Metrics`; pass the one the engine was built with.
    `on_load_error` runs if the engine fails to build or start (`serve` uses it to exit); `on_ready`, on
    the event loop, once it has started. Without `engine`, an unset `--engine-process` is decided for the
    device (`resolve_engine_process`)."""
    if engine is None:
        settings = resolve_engine_process(settings)
    app = FastAPI(
        title="tssc",
        summary="OpenAI-compatible Mamba server with a tiered cache of state checkpoints",
        version="0.1.0",
        lifespan=_lifespan,
    )
    app.state.tssc = AppState(
        settings=settings,
        metrics=metrics or Metrics(),
        engine=engine,
        on_load_error=on_load_error,
        on_ready=on_ready,
    )
    install_error_handlers(app)
    app.include_router(routes_openai.router)
    app.include_router(routes_admin.router)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=int(settings.max_body_bytes))
    # outermost: every response gets a request id
    app.add_middleware(RequestContextMiddleware, log_session_ids=settings.log_session_ids)
    return app
