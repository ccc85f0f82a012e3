"""`EngineClient`: the engine as the API sees it when the engine runs in a core process (`--engine-process`).

It implements the API's `EngineLike` (`server.api.state`) over the pipe to the core (`server.engine.core`;
the process and its pipe: `server.engine.core_process`; the messages: `server.engine.ipc`):

- `start()` spawns the core and waits for its `Ready`; a load failure in the core is raised here as a
  `ModelLoadError` carrying the core's one-line cause, so that the server reports it exactly as the thread
  mode does. Meanwhile the tokenizer (the chat template, the vocab size, token names) loads here: the HTTP
  process encodes prompts itself.
- `generate(req)` submits the request and reads its events from an asyncio queue, to which each `Step`
  message (one per engine step) dispatches its events; closing the iterator early sends an `Abort`, which
  frees the slot in the core.
- if the core dies, every open request fails with `EngineError`, `failure` says why and `/health` answers
  503 (`failed`); the server does not restart it.
- `stop()` stops the core (its engine flushes the disk tier) and waits for it to exit.

With `--api-servers N` the primary front end's client spawns the core with N - 1 further pipes
(`spare_links`), and each further front end's client is given one (`link`): it does not own the core, its
`stop()` detaches it (the core ends its requests), and it prefixes its request ids with its index, so that
ids from different front ends never meet in the one engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any, Protocol

from server.engine.core_process import CoreLink, CoreProcess, CoreUnreachable, describe_exit
from server.engine.events import EventQueue, event_batches, one_by_one, resolve
from server.engine.ipc import (
    Abort,
    EndAll,
    FromCore,
    LoadFailed,
    Query,
    QueryName,
    Ready,
    Reply,
    SentPrompts,
    Step,
    ToCore,
)
from server.engine.types import EngineError, EngineNotReady, EngineShutdown, GenerationRequest, TokenEvent
from server.metrics import EngineStats, Metrics
from server.model.tokenizer import Tokenizer
from server.settings import Settings

log = logging.getLogger(__name__)
QUERY_SECONDS = 30.0


class FrontEndsLike(Protocol):
    """The further front ends that the primary's client starts after the core and stops before it
    (`server.frontends.FrontEnds`)."""

    async def start(self, links: list[Connection]) -> None: ...

    async def stop(self) -> None: ...


class EngineClient:
    """The engine in a core process, behind the same interface as `Engine`."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        link: Connection | None = None,
        index: int = 0,
        front_ends: FrontEndsLike | None = None,
    ) -> None:
        self._settings, self._metrics = settings, metrics
        self._front_ends = front_ends
        self._link = link  # a further front end's pipe to a core that another process started
        self._id_prefix = f"fe{index}." if index else ""
        self._core: CoreLink | None = None
        self._loaded: asyncio.Future[None] | None = None
        self._tokenizer: Tokenizer | None = None
        self._open: dict[str, EventQueue] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._running = self._waiting = 0
        self._closing: str | None = None  # set by `end_all`
        self._stopping = False
        self._failure: str | None = None
        self._prompts = SentPrompts()  # the core's copy: `EngineCore`

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
        """The core process's id (None before `start`, and in a further front end)."""
        return self._core.pid if isinstance(self._core, CoreProcess) else None

    def spare_links(self) -> list[Connection]:
        """The further front ends' pipes to the core (once, after `start`; the caller closes them)."""
        return self._core.take_spare_links() if isinstance(self._core, CoreProcess) else []

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the core (or attach to it: `link`) and wait until its model is loaded (raises the load's
        failure)."""
        if self._core is not None:
            return
        loaded = self._loaded = asyncio.get_running_loop().create_future()
        if self._link is None:
            spare = self._settings.api_servers - 1
            self._core = CoreProcess(self._settings, self._metrics, self._on_message, self._on_exit, spare)
        else:
            self._core = CoreLink(self._link, self._metrics, self._on_message, self._on_exit)
            self._core.start_reading()
        tokenizer = self._load_tokenizer(self._core)  # while the core loads
        try:
            await loaded
        except BaseException:
            tokenizer.add_done_callback(_retrieved)  # the core's load error is the one reported
            raise
        loaded_tokenizer = await tokenizer
        if self._front_ends is not None:
            await self._front_ends.start(self.spare_links())  # ready once every front end serves
        self._tokenizer = loaded_tokenizer

    def _load_tokenizer(self, core: CoreLink) -> asyncio.Future[Tokenizer]:
        """On a daemon thread: a load that failed in the core does not hold up the exit."""
        from server.engine.factory import load_tokenizer

        future: asyncio.Future[Tokenizer] = asyncio.get_running_loop().create_future()

        def run() -> None:
            try:
                result: Tokenizer | BaseException = load_tokenizer(self._settings)
            except BaseException as exc:
                result = exc
            core.post(lambda value: resolve(future, value), result)

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
        """Stop the further front ends (they drain), fail every open request, stop the core and wait for it to
        exit (a further front end's client only detaches from it)."""
        if self._core is None or self._stopping:
            return
        self._stopping = True
        if self._front_ends is not None:
            await self._front_ends.stop()
        self._fail_open(lambda: EngineError("the engine stopped"))
        await self._core.stop()

    # ---- requests ----------------------------------------------------------------------------

    def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """Stream the request's events, as `Engine.generate` does; closing early aborts it in the core."""
        return one_by_one(self.generate_batches(req))

    async def generate_batches(self, req: GenerationRequest) -> AsyncGenerator[list[TokenEvent], None]:
        """`generate`'s events in batches, as `Engine.generate_batches` gives them."""
        if self._id_prefix:
            req = replace(req, request_id=self._id_prefix + req.request_id)
        self._check_admissible(req)
        queue: EventQueue = asyncio.Queue()
        self._open[req.request_id] = queue
        try:
            self._send(self._prompts.submit(req))
            async for batch in event_batches(queue):
                yield batch
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

    async def start_profile(self) -> bool:
        started: bool = await self._query("start_profile")
        return started

    async def stop_profile(self) -> str | None:
        trace: str | None = await self._query("stop_profile")
        return trace

    async def _query(self, name: QueryName, *args: str) -> Any:
        if not self.ready:
            raise EngineNotReady("the engine is not running")
        call_id = next(self._call_ids)
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        try:
            self._send(Query(call_id, name, args))
            return await asyncio.wait_for(future, QUERY_SECONDS)
        finally:
            self._calls.pop(call_id, None)

    # ---- the core's messages (on the event loop) ---------------------------------------------

    def _send(self, message: ToCore) -> None:
        """A dead core raises `EngineError`."""
        if self._core is None or self._failure is not None:
            raise EngineError(self._failure or "the engine is not running")
        try:
            self._core.send(message)
        except CoreUnreachable as exc:
            raise EngineError(f"the engine core is unreachable: {exc}") from exc

    def _send_quietly(self, message: ToCore) -> None:
        if self._core is not None:
            self._core.send_quietly(message)

    def _on_message(self, message: FromCore) -> None:
        if isinstance(message, Step):
            self._deliver(message)
        elif isinstance(message, Reply):
            self._answer(message)
        elif isinstance(message, Ready):
            resolve(self._loaded, None)
        elif isinstance(message, LoadFailed):
            from server.model.loader import ModelLoadError

            resolve(self._loaded, ModelLoadError(message.message))

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
            resolve(future, EngineError(f"the engine core failed a query: {reply.error}"))
        else:
            resolve(future, reply.value)

    def _on_exit(self, exitcode: int | None) -> None:
        """The core closed the pipe: it exited (asked to stop), or died."""
        if not self._stopping:
            how = describe_exit(exitcode) if self._link is None else "it closed this front end's pipe"
            self._failure = f"the engine core process exited unexpectedly ({how})"
            log.error("%s; failing the open requests", self._failure)
        message = self._failure or "the engine stopped"
        self._fail_open(lambda: EngineError(message))
        for future in [*self._calls.values(), self._loaded]:
            resolve(future, EngineError(message))


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
