"""The engine core process (`--engine-process`): the scheduler loop, the model worker thread, the model
runner and the state cache, in a process of their own, so that the HTTP side's work (SSE formatting,
middleware) and the model's host work no longer share one GIL (as vLLM v1 does).

`run_core` is the process's entry (started with the `spawn` context by `EngineClient`). It builds the
engine exactly as the thread mode does (`build_engine`), answers `Ready` (or `LoadFailed`), then runs
an `EngineCore` on its own asyncio loop until told to `Shutdown` or until the HTTP process is gone (the
pipe's end of file), and stops the engine, which flushes the cache's disk tier.

A thread reads the pipe and hands each message to the loop. Each request is a task only until the engine
has queued it (`Engine.run_into`: validation, and the remote tier's prefetch if any); from then on the engine
hands its events straight to the `Outbox` as each step delivers them (no queue and no task wake-up per token),
which sends one `Step` message per engine step (see `Outbox`). The core ignores SIGINT and SIGTERM: a Ctrl-C
or a SIGTERM to the process group reaches the HTTP process, which drains its requests and then stops the core
through the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from server.engine.engine import Engine
from server.engine.ipc import (
    Abort,
    EndAll,
    Failure,
    FromCore,
    LoadFailed,
    Query,
    Ready,
    Recorder,
    Reply,
    SentPrompts,
    Shutdown,
    Step,
    Submit,
    ToCore,
)
from server.engine.types import EngineError, GenerationRequest, TokenEvent
from server.heap import freeze_heap
from server.settings import Settings, apply_switch_interval

log = logging.getLogger(__name__)
FLUSH_SECONDS = 0.5  # observations recorded between steps (evictions, remote errors) wait at most this


def run_core(settings: Settings, conn: Connection) -> None:
    """The core process: load, then serve the pipe until shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from server.api.logs import configure_logging

    configure_logging(settings.log_level_int, session_ids=settings.log_session_ids, fmt=settings.log_format)
    apply_switch_interval(settings)  # the core's loop and worker thread share its interpreter lock
    recorder = Recorder()
    try:
        engine = _build(settings, recorder)
    except Exception as exc:
        from server.model.loader import load_failure

        log.debug("the model load failed", exc_info=exc)
        with contextlib.suppress(OSError):
            conn.send(LoadFailed(load_failure(exc)))
        raise SystemExit(1) from None
    freeze_heap()  # the model, torch and the imports: no full collection pauses a step to traverse them
    asyncio.run(EngineCore(engine, recorder, conn).serve())


def _build(settings: Settings, recorder: Recorder) -> Engine:
    from server.engine.factory import build_engine

    return build_engine(settings, recorder)


class Outbox:
    """What the core sends, batched per engine step.

    `Engine._apply` delivers a whole step's events synchronously, each straight to `event`; the first queues
    `flush` on the loop, so it runs once `_apply` has returned, with every event of the step: one `Step`
    message per step (the engine has handed its next step to the worker by then).
    """

    def __init__(self, send: Callable[[FromCore], None], recorder: Recorder, engine: Engine) -> None:
        self._send, self._recorder, self._engine = send, recorder, engine
        self._events: list[TokenEvent] = []
        self._failures: list[Failure] = []
        self._queued = False

    def event(self, event: TokenEvent) -> None:
        self._events.append(event)
        self._queue()

    def failed(self, request_id: str, exc: BaseException) -> None:
        self._failures.append(Failure.of(request_id, exc))
        self._queue()

    def _queue(self) -> None:
        if not self._queued:
            self._queued = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send what has collected (nothing if nothing has)."""
        self._queued = False
        observations = self._recorder.drain()
        if not (self._events or self._failures or observations):
            return
        events, failures = tuple(self._events), tuple(self._failures)
        self._events, self._failures = [], []
        engine = self._engine
        self._send(Step(events, failures, observations, engine.num_running, engine.num_waiting))


class EngineCore:
    """Serves the pipe with a started engine, on the running loop."""

    def __init__(self, engine: Engine, recorder: Recorder, conn: Connection) -> None:
        self._engine, self._recorder, self._conn = engine, recorder, conn
        self._outbox = Outbox(self._send, recorder, engine)
        self._requests: dict[str, asyncio.Task[None]] = {}  # on their way into the engine (`run_into`)
        self._queued: set[str] = set()  # in the engine, not ended yet
        self._queries: set[asyncio.Task[None]] = set()
        self._done = asyncio.Event()
        self._prompts = SentPrompts()  # the HTTP process's copy: `EngineClient`

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._engine.start()
        self._outbox.flush()  # what the load recorded (the model info) is on /metrics once the server is ready
        self._send(Ready())
        reader = threading.Thread(target=self._read, args=(loop,), name="tssc-core-pipe", daemon=True)
        reader.start()
        ticker = loop.create_task(self._tick())
        await self._done.wait()
        ticker.cancel()
        await self._engine.stop()
        self._outbox.flush()
        log.info("engine core stopped")

    def _send(self, message: FromCore) -> None:
        try:
            self._conn.send(message)
        except OSError:  # the HTTP process is gone: the reader sees the end of file and stops the core
            log.debug("engine core: the pipe is closed; dropped a %s", type(message).__name__)

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message: ToCore | None = self._conn.recv()
            except (EOFError, OSError):
                message = None  # the HTTP process exited (or was killed): stop
            try:
                loop.call_soon_threadsafe(self._handle, message)
            except RuntimeError:  # the loop is closed: the core stopped
                return
            if message is None or isinstance(message, Shutdown):
                return

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            if self._recorder.pending:
                self._outbox.flush()

    def _handle(self, message: ToCore | None) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(message, Submit):
            try:
                req = self._prompts.request(message)  # in the pipe's order, as the HTTP process sent them
            except EngineError as exc:
                self._outbox.failed(message.req.request_id, exc)
                return
            self._requests[req.request_id] = loop.create_task(self._run(req))
        elif isinstance(message, Abort):
            self._abort(message.request_id)
        elif isinstance(message, EndAll):
            self._engine.end_all(message.reason)
        elif isinstance(message, Query):
            query = loop.create_task(self._answer(message))
            self._queries.add(query)
            query.add_done_callback(self._queries.discard)
        else:
            if message is None:
                log.warning("engine core: the HTTP process is gone; stopping")
            self._done.set()

    def _abort(self, request_id: str) -> None:
        task = self._requests.pop(request_id, None)  # here: a task cancelled before it ran has no `finally`
        if task is not None:
            task.cancel()  # not queued yet: it never will be
        if request_id in self._queued:
            self._queued.discard(request_id)
            self._engine.abort(request_id)  # frees the slot

    async def _run(self, req: GenerationRequest) -> None:
        request_id = req.request_id
        try:
            await self._engine.run_into(req, _Forward(self, request_id))
            self._queued.add(request_id)
        except asyncio.CancelledError:
            pass  # aborted by the HTTP process, which forgot the request already
        except Exception as exc:
            self._outbox.failed(request_id, exc)
        finally:
            if self._requests.get(request_id) is asyncio.current_task():
                self._requests.pop(request_id)

    def _forward(self, request_id: str, item: TokenEvent | BaseException) -> None:
        """A queued request's event (or the exception that ended it), from the engine's step delivery."""
        if isinstance(item, BaseException):
            self._queued.discard(request_id)
            self._outbox.failed(request_id, item)
            return
        if item.finish_reason is not None:
            self._queued.discard(request_id)
        self._outbox.event(item)

    async def _answer(self, query: Query) -> None:
        try:
            value: Any = await getattr(self._engine, query.name)(*query.args)
            reply = Reply(query.call_id, value)
        except Exception as exc:
            log.exception("engine core: query %s failed", query.name)
            reply = Reply(query.call_id, error=f"{type(exc).__name__}: {exc}")
        self._outbox.flush()  # the observations recorded so far reach the metrics before the reply
        self._send(reply)


class _Forward:
    """A request's `EventSink` in the core: its events go straight to the `Outbox`."""

    __slots__ = ("_core", "_request_id")

    def __init__(self, core: EngineCore, request_id: str) -> None:
        self._core, self._request_id = core, request_id

    def put_nowait(self, item: TokenEvent | BaseException) -> None:
        self._core._forward(self._request_id, item)
