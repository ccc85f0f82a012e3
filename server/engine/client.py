"""`EngineClient`: the engine as the API sees it when the engine runs in a core process (`--engine-process`).

It implements the API's `EngineLike` (`server.api.state`) over the pipe to the core (`server.engine.core`,
messages in `server.engine.ipc`):

- `start()` spawns the core (the `spawn` context: CUDA cannot cross a fork) and waits for its `Ready`; a
  load failure in the core is raised here as a `ModelLoadError` carrying the core's one-line cause, so
  that the server reports it exactly as the thread mode does. The tokenizer (the chat template, the vocab
  size, token names) is loaded here too: the HTTP process encodes prompts itself.
- `generate(req)` submits the request and reads its events from an asyncio queue; closing the iterator
  early sends an `Abort`, which frees the slot in the core.
- one reader thread receives the core's messages, replays their metric observations on `Metrics`, and
  hands each message to the event loop with one `call_soon_threadsafe`, where a step's events are
  dispatched to the requests' queues.
- if the core dies, every open request fails with `EngineError`, `failure` says why and `/health`
  answers 503 (`failed`); the server does not restart it.
- `stop()` asks the core to stop (it stops its engine, flushing the disk tier) and waits for it to exit,
  killing it after `STOP_SECONDS`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import multiprocessing
import signal
import threading
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from server.engine.core import run_core
from server.engine.ipc import (
    Abort,
    EndAll,
    FromCore,
    LoadFailed,
    Query,
    QueryName,
    Ready,
    Reply,
    Shutdown,
    Step,
    Submit,
    ToCore,
    replay,
)
from server.engine.types import EngineError, EngineNotReady, EngineShutdown, GenerationRequest, TokenEvent
from server.metrics import EngineStats, Metrics
from server.model.tokenizer import Tokenizer
from server.settings import Settings

log = logging.getLogger(__name__)
STOP_SECONDS = 30.0  # for the core to stop its engine and exit, before it is killed
QUERY_SECONDS = 30.0
EventItem = TokenEvent | BaseException


class EngineClient:
    """The engine in a core process, behind the same interface as `Engine`."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings, self._metrics = settings, metrics
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loaded: asyncio.Future[None] | None = None
        self._exited: asyncio.Future[int | None] | None = None
        self._tokenizer: Tokenizer | None = None
        self._open: dict[str, asyncio.Queue[EventItem]] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._running = self._waiting = 0
        self._closing: str | None = None  # set by `end_all`
        self._stopping = False
        self._serving = False  # the core said `Ready`: it reads the pipe (while it loads, it does not)
        self._failure: str | None = None

    # ---- properties --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._tokenizer is not None and not self._stopping and self._failure is None

    @property
    def failure(self) -> str | None:
        """Why the core stopped on its own (None while it runs, and after a requested stop)."""
        return self._failure

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise EngineNotReady("the engine is not running")
        return self._tokenizer

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return self._waiting

    @property
    def pid(self) -> int | None:
        """The core process's id (None before `start`)."""
        return self._proc.pid if self._proc is not None else None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the core and wait until its model is loaded (raises the load's failure)."""
        if self._proc is not None:
            return
        loaded = self._spawn(asyncio.get_running_loop())
        from server.engine.factory import load_tokenizer

        tokenizer = self._in_daemon_thread(load_tokenizer, self._settings)  # while the core loads
        try:
            await loaded
        except BaseException:
            tokenizer.add_done_callback(_retrieved)  # the core's load error is the one reported
            raise
        self._tokenizer = await tokenizer

    def _spawn(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Start the core process and the thread that reads its pipe (on the loop, briefly: a fork and exec,
        with no await between the two, so that no cancellation can leave a core without its reader).
        Returns the future of its load."""
        self._loop = loop
        self._loaded, self._exited = loop.create_future(), loop.create_future()
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._proc = context.Process(target=run_core, args=(self._settings, theirs), name="tssc-engine-core")
        self._proc.start()
        theirs.close()
        assert self._proc.pid is not None
        self._metrics.track_engine_core(self._proc.pid)
        atexit.register(self._stop_at_exit)
        threading.Thread(target=self._read, name="tssc-core-reader", daemon=True).start()
        log.info("engine core process started", extra={"pid": self._proc.pid})
        return self._loaded

    def _in_daemon_thread(
        self, fn: Callable[[Settings], Tokenizer], arg: Settings
    ) -> asyncio.Future[Tokenizer]:
        """`fn(arg)` on a daemon thread: a load that failed in the core does not hold up the exit."""
        future: asyncio.Future[Tokenizer] = asyncio.get_running_loop().create_future()

        def run() -> None:
            try:
                result: Tokenizer | BaseException = fn(arg)
            except BaseException as exc:
                result = exc
            self._post(lambda value: _resolve(future, value), result)

        threading.Thread(target=run, name="tssc-tokenizer-load", daemon=True).start()
        return future

    def end_all(self, reason: str) -> int:
        """Refuse new requests and end every open one with `EngineShutdown(reason)` (the core frees their
        slots); returns how many were ended."""
        self._closing = reason
        ended = self._fail_open(lambda: EngineShutdown(reason))
        self._send_quietly(EndAll(reason))
        return ended

    async def stop(self) -> None:
        """Fail every open request, stop the core (its engine flushes the cache) and wait for it to exit."""
        if self._proc is None or self._stopping:
            return
        self._stopping = True
        self._fail_open(lambda: EngineError("the engine stopped"))
        self._ask_to_stop()
        await self._wait_exit()
        atexit.unregister(self._stop_at_exit)

    async def _wait_exit(self) -> None:
        assert self._exited is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), STOP_SECONDS)
        except TimeoutError:
            log.warning("the engine core did not stop within %.0f s; killing it", STOP_SECONDS)
            self._kill()
            await asyncio.wait_for(asyncio.shield(self._exited), STOP_SECONDS)
        if self._conn is not None:
            self._conn.close()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()

    def _ask_to_stop(self) -> None:
        if self._serving:
            self._send_quietly(Shutdown())
        else:
            self._kill()  # still loading (it reads no message until it serves): nothing to flush

    def _stop_at_exit(self) -> None:
        """At interpreter exit without `stop()` (runs before multiprocessing joins its children)."""
        self._ask_to_stop()

    # ---- requests ----------------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's events, as `Engine.generate` does; closing early aborts it in the core."""
        self._check_admissible(req)
        queue: asyncio.Queue[EventItem] = asyncio.Queue()
        self._open[req.request_id] = queue
        try:
            self._send(Submit(req))
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if self._open.get(req.request_id) is queue:
                del self._open[req.request_id]
                self._send_quietly(Abort(req.request_id))

    def _check_admissible(self, req: GenerationRequest) -> None:
        if not self.ready:
            raise EngineNotReady("the engine is not running")
        if self._closing is not None:
            raise EngineShutdown(self._closing)
        if req.request_id in self._open:
            raise ValueError(f"duplicate request id {req.request_id!r}")

    def _fail_open(self, error: Callable[[], BaseException]) -> int:
        """End every open request with its own `error()` (one exception object per raising task)."""
        open_queues, self._open = list(self._open.values()), {}
        for queue in open_queues:
            queue.put_nowait(error())
        return len(open_queues)

    # ---- queries -----------------------------------------------------------------------------

    async def stats(self) -> EngineStats:
        stats: EngineStats = await self._query("stats")
        self._running, self._waiting = stats.num_running, stats.num_waiting
        return stats

    async def session_info(self, namespace: str, session_id: str) -> dict[str, Any] | None:
        info: dict[str, Any] | None = await self._query("session_info", namespace, session_id)
        return info

    async def delete_session(self, namespace: str, session_id: str) -> int | None:
        freed: int | None = await self._query("delete_session", namespace, session_id)
        return freed

    async def _query(self, name: QueryName, *args: str) -> Any:
        if not self.ready:
            raise EngineNotReady("the engine is not running")
        assert self._loop is not None
        call_id = next(self._call_ids)
        future = self._calls[call_id] = self._loop.create_future()
        try:
            self._send(Query(call_id, name, args))
            return await asyncio.wait_for(future, QUERY_SECONDS)
        finally:
            self._calls.pop(call_id, None)

    # ---- the pipe ----------------------------------------------------------------------------

    def _send(self, message: ToCore) -> None:
        """Send on the event loop's thread (the only sender); a dead core raises `EngineError`."""
        if self._conn is None or self._failure is not None:
            raise EngineError(self._failure or "the engine is not running")
        try:
            self._conn.send(message)
        except OSError as exc:
            raise EngineError(f"the engine core is unreachable: {exc}") from exc

    def _send_quietly(self, message: ToCore) -> None:
        with contextlib.suppress(EngineError):
            self._send(message)

    def _read(self) -> None:
        """The reader thread: each message to the loop, until the core closes its end (exit or crash)."""
        assert self._conn is not None and self._proc is not None
        while True:
            try:
                message: FromCore = self._conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Step):
                replay(self._metrics, message.observations)  # here: the loop only dispatches events
            if not self._post(self._on_message, message):
                return
        self._proc.join(timeout=10)
        self._post(self._on_exit, self._proc.exitcode)

    def _post(self, fn: Callable[[Any], None], arg: Any) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the loop is closed: the server is gone
            return False
        return True

    def _on_message(self, message: FromCore) -> None:
        if isinstance(message, Step):
            self._deliver(message)
        elif isinstance(message, Reply):
            self._answer(message)
        elif isinstance(message, Ready):
            self._serving = True
            _resolve(self._loaded, None)
        elif isinstance(message, LoadFailed):
            from server.model.loader import ModelLoadError

            _resolve(self._loaded, ModelLoadError(message.message))

    def _deliver(self, step: Step) -> None:
        self._running, self._waiting = step.num_running, step.num_waiting
        for event in step.events:
            queue = self._open.get(event.request_id)
            if queue is None:
                continue  # aborted here already
            if event.finish_reason is not None:
                del self._open[event.request_id]
            queue.put_nowait(event)
        for failure in step.failures:
            failed = self._open.pop(failure.request_id, None)
            if failed is not None:
                failed.put_nowait(failure.exception())

    def _answer(self, reply: Reply) -> None:
        future = self._calls.get(reply.call_id)
        if reply.error is not None:
            _resolve(future, EngineError(f"the engine core failed a query: {reply.error}"))
        else:
            _resolve(future, reply.value)

    def _on_exit(self, exitcode: int | None) -> None:
        """The core closed the pipe: it exited (asked to stop), or died."""
        if not self._stopping:
            self._failure = f"the engine core process exited unexpectedly ({_describe_exit(exitcode)})"
            log.error("%s; failing the open requests", self._failure)
        message = self._failure or "the engine stopped"
        self._fail_open(lambda: EngineError(message))
        for future in [*self._calls.values(), self._loaded]:
            _resolve(future, EngineError(message))
        _resolve(self._exited, exitcode)


def _resolve(future: asyncio.Future[Any] | None, value: Any) -> None:
    """Set a future's result, or its exception if `value` is one (no-op once done)."""
    if future is None or future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running after closing its pipe"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"
