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

With `--api-servers N` the core serves N pipes, one per front-end process (`Link`: a reader thread, the
requests, the `SentPrompts` copy and the `Outbox` of each); a step's events go out on the pipe of the front end
that sent each request, and its metric observations on the primary's (the first). The primary's end of file
or `Shutdown` stops the core; another front end's ends that front end's requests and closes its pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import signal
import threading
import time
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
# with several front ends, one whose pipe has taken nothing for this long (its process stopped, or hung) is
# dropped: its requests end, and the others' never wait on it
STALL_SECONDS = 5.0
DRAIN_SECONDS = 5.0  # at the core's stop, what the front ends' pipes still have to take, at most this long


def run_core(settings: Settings, conns: list[Connection]) -> None:
    """The core process: load, then serve the pipes until shutdown. `conns[0]` is the primary front end's
    (the process that started this one; its end of file stops the core), the others those of the further
    front ends of `--api-servers` (`server.frontends`)."""
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
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(LoadFailed(load_failure(exc)))
        raise SystemExit(1) from None
    freeze_heap()  # the model, torch and the imports: no full collection pauses a step to traverse them
    asyncio.run(EngineCore(engine, recorder, conns).serve())


def _build(settings: Settings, recorder: Recorder) -> Engine:
    from server.engine.factory import build_engine

    return build_engine(settings, recorder)


class Outbox:
    """What the core sends, batched per engine step.

    `Engine._apply` delivers a whole step's events synchronously, each straight to `event`; the first queues
    `flush` on the loop, so it runs once `_apply` has returned, with every event of the step: one `Step`
    message per step (the engine has handed its next step to the worker by then). The metric observations
    ride with the primary front end's messages only (`recorder` None for the others).
    """

    def __init__(self, send: Callable[[FromCore], None], recorder: Recorder | None, engine: Engine) -> None:
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
        observations = self._recorder.drain() if self._recorder is not None else ()
        if not (self._events or self._failures or observations):
            return
        events, failures = tuple(self._events), tuple(self._failures)
        self._events, self._failures = [], []
        engine = self._engine
        self._send(Step(events, failures, observations, engine.num_running, engine.num_waiting))


class EngineCore:
    """Serves the front ends' pipes with a started engine, on the running loop."""

    def __init__(self, engine: Engine, recorder: Recorder, conns: list[Connection]) -> None:
        self._engine, self._recorder = engine, recorder
        several = len(conns) > 1
        self._links = [
            Link(i, conn, recorder if i == 0 else None, engine, Sender(conn, i) if several else None)
            for i, conn in enumerate(conns)
        ]
        for link in self._links:
            link.on_stall = self._stalled
        self._queries: set[asyncio.Task[None]] = set()
        self._done = asyncio.Event()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._engine.start()
        primary = self._links[0]
        primary.outbox.flush()  # what the load recorded (the model info) is on /metrics once the server is ready
        for link in self._links:
            link.send(Ready())
            threading.Thread(
                target=self._read, args=(loop, link), name=f"tssc-core-pipe-{link.index}", daemon=True
            ).start()
        ticker = loop.create_task(self._tick())
        await self._done.wait()
        ticker.cancel()
        await self._engine.stop()
        for link in self._links:
            link.outbox.flush()
        deadline = time.monotonic() + DRAIN_SECONDS
        for link in self._links:
            if link.sender is not None:
                link.sender.close(max(0.0, deadline - time.monotonic()))
        log.info("engine core stopped")

    def _read(self, loop: asyncio.AbstractEventLoop, link: Link) -> None:
        while True:
            try:
                message: ToCore | None = link.conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: the core closed the pipe under the read
                message = None  # the front end exited (or was killed, or dropped)
            try:
                loop.call_soon_threadsafe(self._handle, link, message)
            except RuntimeError:  # the loop is closed: the core stopped
                return
            if message is None or isinstance(message, Shutdown):
                return

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            if self._recorder.pending:
                self._links[0].outbox.flush()

    def _stalled(self, link: Link) -> None:
        """A further front end's pipe took nothing for STALL_SECONDS: dropped as if it had exited."""
        if link.index > 0 and not link.conn.closed:
            log.warning(
                "engine core: front end %d took nothing for %.0f s; dropping it", link.index, STALL_SECONDS
            )
            self._handle(link, None)

    def _handle(self, link: Link, message: ToCore | None) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(message, Submit):
            try:
                req = link.prompts.request(message)  # in the pipe's order, as the front end sent them
            except EngineError as exc:
                link.outbox.failed(message.req.request_id, exc)
                return
            link.requests[req.request_id] = loop.create_task(self._run(link, req))
        elif isinstance(message, Abort):
            self._abort(link, message.request_id)
        elif isinstance(message, EndAll):
            self._end_all(link, message.reason)
        elif isinstance(message, Query):
            query = loop.create_task(self._answer(link, message))
            self._queries.add(query)
            query.add_done_callback(self._queries.discard)
        elif (
            link.index > 0
        ):  # a further front end stopped (or died, or was dropped): its requests end with it
            if link.conn.closed:  # dropped already (`_stalled`): its reader has seen the pipe close
                return
            log.log(
                logging.INFO if message is not None else logging.WARNING,
                "engine core: front end %d is gone",
                link.index,
            )
            for request_id in [*link.requests, *link.queued]:
                self._abort(link, request_id)
            link.conn.close()  # its reader sees the end of file: detached
        else:
            if message is None:
                log.warning("engine core: the HTTP process is gone; stopping")
            self._done.set()

    def _end_all(self, link: Link, reason: str) -> None:
        """One front end's shutdown grace ran out: with one front end, the engine ends everything (and refuses
        what may still come); with several, this front end's requests end (it failed them itself)."""
        if len(self._links) == 1:
            self._engine.end_all(reason)
            return
        for request_id in [*link.requests, *link.queued]:
            self._abort(link, request_id)

    def _abort(self, link: Link, request_id: str) -> None:
        task = link.requests.pop(request_id, None)  # here: a task cancelled before it ran has no `finally`
        if task is not None:
            task.cancel()  # not queued yet: it never will be
        if request_id in link.queued:
            link.queued.discard(request_id)
            self._engine.abort(request_id)  # frees the slot

    async def _run(self, link: Link, req: GenerationRequest) -> None:
        request_id = req.request_id
        try:
            await self._engine.run_into(req, _Forward(link, request_id))
            link.queued.add(request_id)
        except asyncio.CancelledError:
            pass  # aborted by the front end, which forgot the request already
        except Exception as exc:
            link.outbox.failed(request_id, exc)
        finally:
            if link.requests.get(request_id) is asyncio.current_task():
                link.requests.pop(request_id)

    async def _answer(self, link: Link, query: Query) -> None:
        try:
            value: Any = await getattr(self._engine, query.name)(*query.args)
            reply = Reply(query.call_id, value)
        except Exception as exc:
            log.exception("engine core: query %s failed", query.name)
            reply = Reply(query.call_id, error=f"{type(exc).__name__}: {exc}")
        link.outbox.flush()  # the observations recorded so far reach the metrics before the reply
        link.send(reply)


class Sender:
    """A front end's pipe written by a thread of its own, in order, so that the core's loop never blocks on
    a front end that stopped reading (a full pipe blocks its writer); `stalled` once one message has waited
    in the pipe's write for STALL_SECONDS. Without it, one stopped front end (SIGSTOP, a hung process) held
    the core, and with it every other front end's streams, within a second at a few streams' pace."""

    def __init__(self, conn: Connection, index: int) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[FromCore | None] = queue.SimpleQueue()
        self._since: float | None = None  # when the write under way began
        self._thread = threading.Thread(target=self._run, name=f"tssc-core-send-{index}", daemon=True)
        self._thread.start()

    def put(self, message: FromCore) -> None:
        self._queue.put(message)

    @property
    def stalled(self) -> bool:
        since = self._since
        return since is not None and time.monotonic() - since > STALL_SECONDS

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            self._since = time.monotonic()
            try:
                self._conn.send(message)
            except (OSError, TypeError):  # the front end is gone, or dropped (its pipe closed mid-write)
                pass
            finally:
                self._since = None

    def close(self, timeout: float) -> None:
        """Write what is queued (at most `timeout` seconds), then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)


class Link:
    """One front end's pipe, and what the core keeps for it: its requests on their way into the engine
    (`run_into`: validation, the remote tier's prefetch) and those in it, its copy of the prompts it sent
    (`SentPrompts`) and its `Outbox`. With several front ends, a `Sender` thread writes the pipe."""

    def __init__(
        self,
        index: int,
        conn: Connection,
        recorder: Recorder | None,
        engine: Engine,
        sender: Sender | None = None,
    ) -> None:
        self.index, self.conn, self.sender = index, conn, sender
        self.outbox = Outbox(self.send, recorder, engine)
        self.prompts = SentPrompts()
        self.requests: dict[str, asyncio.Task[None]] = {}
        self.queued: set[str] = set()  # in the engine, not ended yet
        self.on_stall: Callable[[Link], None] | None = None  # set by the core

    def send(self, message: FromCore) -> None:
        if self.sender is not None:
            if self.sender.stalled and self.on_stall is not None:
                self.on_stall(self)
            self.sender.put(message)
            return
        try:
            self.conn.send(message)
        except OSError:  # the front end is gone: the reader sees the end of file
            log.debug("engine core: pipe %d is closed; dropped a %s", self.index, type(message).__name__)

    def forward(self, request_id: str, item: TokenEvent | BaseException) -> None:
        """A queued request's event (or the exception that ended it), from the engine's step delivery."""
        if isinstance(item, BaseException):
            self.queued.discard(request_id)
            self.outbox.failed(request_id, item)
            return
        if item.finish_reason is not None:
            self.queued.discard(request_id)
        self.outbox.event(item)


class _Forward:
    """A request's `EventSink` in the core: its events go straight to the `Outbox`."""

    __slots__ = ("_link", "_request_id")

    def __init__(self, link: Link, request_id: str) -> None:
        self._link, self._request_id = link, request_id

    def put_nowait(self, item: TokenEvent | BaseException) -> None:
        self._link.forward(self._request_id, item)
