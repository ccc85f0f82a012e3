"""`--api-servers N`: N HTTP front-end processes in front of the one engine core, on one port.

One front end parses, validates, tokenizes and streams every request of the server, and a burst of 64
simultaneous requests queues on its event loop: on an H200 host the median one's response headers came
63-88 ms after it was sent (BENCHMARKS.md session 19), before its prompt reached the engine. With N front
ends each takes its share of the connections (vLLM's API server count does the same):

- the primary front end (the process that `serve` runs) spawns the engine core with N - 1 further pipes
  (`EngineClient.spare_links`) and then, through `FrontEnds`, the N - 1 further front ends, each given one of
  them (`run_front_end`); it reports ready (`/health`) once every front end serves;
- every front end binds the same host and port with `SO_REUSEPORT`, so the kernel spreads new connections
  over them (a connection stays with the front end that accepted it);
- the engine core keeps each front end's requests apart (`server.engine.core.Link`); a further front end's
  request ids carry its index;
- `/metrics` is one registry, the primary's: a further front end sends its own observations (the parse and
  tokenize phases) to the primary over a control pipe every `FLUSH_SECONDS`, and answers a scrape with the
  primary's rendering, asked over the same pipe after sending what it had pending;
- a SIGTERM to the primary is forwarded: every front end drains its own streams, the further ones exit,
  and the primary then stops the core; a further front end whose primary is gone drains and exits too.
  One that dies is not restarted: the core ends its requests, and the others serve on.

Each front end keeps its own sessions' incremental chat encodings, so a session whose turns arrive on
different connections may be encoded whole on a front end that has not seen it (the output is the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from server.engine.events import resolve
from server.engine.ipc import Observation, Recorder, replay
from server.metrics import Metrics
from server.settings import Settings

if TYPE_CHECKING:
    from server.engine.client import EngineClient

log = logging.getLogger(__name__)
FLUSH_SECONDS = 0.5  # a further front end's observations reach the primary's registry within this
START_SECONDS = 300.0  # for a further front end to load its tokenizer and serve
STOP_SECONDS = 30.0  # past the shutdown grace, for a further front end to exit before it is killed
RENDER_SECONDS = 30.0


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port) that other sockets with `SO_REUSEPORT` may share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def front_end_settings(settings: Settings) -> Settings:
    """One front end's settings: its share of the in-flight limit (each counts its own requests)."""
    share = math.ceil(settings.max_concurrent_requests / settings.api_servers)
    return settings.model_copy(update={"max_concurrent_requests": share})


# ---- the primary's side --------------------------------------------------------------------------


class FrontEnds:
    """The further front ends, as the primary spawns, serves and stops them. `render` is the primary's fresh
    `/metrics` body (set by `serve` once the app exists)."""

    def __init__(self, settings: Settings, metrics: Metrics, sock: socket.socket) -> None:
        self._settings, self._metrics, self.socket = settings, metrics, sock
        self._port: int = sock.getsockname()[1]  # the one bound, with --port 0
        self.render: Callable[[], Coroutine[Any, Any, bytes]] | None = None
        self._procs: list[BaseProcess] = []
        self._ready: list[asyncio.Future[None]] = []
        self._controls: list[tuple[Connection, threading.Lock]] = []  # sent on from the loop and the threads
        self._stopping = False

    @classmethod
    def listen(cls, settings: Settings, metrics: Metrics) -> FrontEnds:
        """The primary's listening socket, bound now (raises `OSError`: the port is taken)."""
        return cls(settings, metrics, reuseport_socket(settings.host, settings.port))

    def engine(self, settings: Settings) -> EngineClient:
        """The primary's engine client, which starts the further front ends once the core serves."""
        from server.engine.client import EngineClient

        return EngineClient(settings, self._metrics, front_ends=self)

    async def start(self, links: list[Connection]) -> None:
        """Spawn one front end per pipe to the core and wait until each serves (raises if one cannot)."""
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        settings = front_end_settings(self._settings)
        for index, link in enumerate(links, start=1):
            ours, theirs = context.Pipe()
            proc = context.Process(
                target=run_front_end,
                args=(settings, index, link, theirs, self._port),
                name=f"tssc-front-end-{index}",
                daemon=True,
            )
            proc.start()
            link.close()
            theirs.close()
            ready: asyncio.Future[None] = loop.create_future()
            control = (ours, threading.Lock())
            self._procs.append(proc)
            self._ready.append(ready)
            self._controls.append(control)
            args = (loop, index, control, proc, ready)
            threading.Thread(
                target=self._serve, args=args, name=f"tssc-front-end-{index}", daemon=True
            ).start()
        await asyncio.wait_for(asyncio.gather(*self._ready), START_SECONDS)
        for control in self._controls:  # each answers /health "ok" from now on: all at once, not one by one
            _send(control, ("serving",))
        log.info("front ends serving", extra={"api_servers": len(self._procs) + 1, "port": self._port})

    def forward(self, sig: int = signal.SIGTERM) -> None:
        """The primary is stopping (on a SIGTERM or a SIGINT): every further front end drains too (a SIGTERM,
        as they ignore SIGINT, which a Ctrl-C sends the whole process group)."""
        for proc in self._procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    async def stop(self) -> None:
        """Wait for every further front end to exit (after `forward`, or sending it now)."""
        self._stopping = True
        self.forward()
        limit = self._settings.shutdown_grace + STOP_SECONDS
        for proc in self._procs:
            await asyncio.to_thread(proc.join, limit)
            if proc.is_alive():
                log.warning("front end %s did not stop; killing it", proc.name)
                proc.kill()
                await asyncio.to_thread(proc.join, 10)

    def _serve(
        self,
        loop: asyncio.AbstractEventLoop,
        index: int,
        control: tuple[Connection, threading.Lock],
        proc: BaseProcess,
        ready: asyncio.Future[None],
    ) -> None:
        """A thread per further front end: its readiness, its observations, its scrapes."""
        conn = control[0]
        while True:
            try:
                message: tuple[Any, ...] = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "ready":
                loop.call_soon_threadsafe(resolve, ready, None)
            elif kind == "observe":
                replay(self._metrics, message[1])
            elif kind == "render":
                _send(control, ("metrics", message[1], self._render(loop)))
        proc.join(timeout=10)
        failed = RuntimeError(f"front end {index} exited (exit code {proc.exitcode}) before it served")
        loop.call_soon_threadsafe(resolve, ready, failed)
        if not self._stopping:
            log.warning("front end %d exited (exit code %s); the others serve on", index, proc.exitcode)

    def _render(self, loop: asyncio.AbstractEventLoop) -> bytes:
        if self.render is None:
            return self._metrics.render()
        try:
            return asyncio.run_coroutine_threadsafe(self.render(), loop).result(RENDER_SECONDS)
        except Exception:
            log.exception("rendering the metrics for a front end failed")
            return self._metrics.render()


def _send(control: tuple[Connection, threading.Lock], message: tuple[Any, ...]) -> None:
    conn, lock = control
    with lock, contextlib.suppress(OSError):
        conn.send(message)


# ---- a further front end's side --------------------------------------------------------------------


class ForwardedMetrics(Metrics):
    """A further front end's metrics: what its routes record goes to the primary's registry (`Primary`)."""

    def __init__(self) -> None:
        super().__init__(process_collectors=False)
        self.pending = Recorder()

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.pending.observe_phase(phase, seconds)


class Primary:
    """A further front end's control pipe to the primary, used from its event loop (the only sender) and read on
    a thread; its engine client's start hook (`FrontEndsLike`): the front end says it is ready, then serves
    once the primary says every front end is ready. Its end of file means the primary is gone: this front
    end drains and exits (SIGTERM to itself)."""

    def __init__(self, conn: Connection, metrics: ForwardedMetrics) -> None:
        self._conn, self._metrics = conn, metrics
        self._calls: dict[int, asyncio.Future[bytes]] = {}
        self._call_ids = itertools.count()
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by `start`

    async def start(self, links: list[Connection]) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._serving: asyncio.Future[None] = loop.create_future()
        threading.Thread(target=self._read, args=(loop,), name="tssc-primary-reader", daemon=True).start()
        self._ticker = loop.create_task(self._tick())
        self.send(("ready",))
        await self._serving

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self.flush()

    def send(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(message)

    def flush(self) -> None:
        observations: tuple[Observation, ...] = self._metrics.pending.drain()
        if observations:
            self.send(("observe", observations))

    async def render(self) -> bytes:
        """The primary's `/metrics` body, with what this front end recorded so far counted in it."""
        if self._loop is None:  # still loading: it has recorded nothing
            return self._metrics.render()
        self.flush()
        call_id = next(self._call_ids)
        future = self._calls[call_id] = self._loop.create_future()
        try:
            self.send(("render", call_id))
            return await asyncio.wait_for(future, RENDER_SECONDS)
        finally:
            self._calls.pop(call_id, None)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.flush()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message: tuple[Any, ...] = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "serving":
                loop.call_soon_threadsafe(resolve, self._serving, None)
            elif message[0] == "metrics":
                loop.call_soon_threadsafe(self._answer, message[1], message[2])
        loop.call_soon_threadsafe(resolve, self._serving, RuntimeError("the primary front end is gone"))
        log.warning("front end: the primary is gone; draining")
        os.kill(os.getpid(), signal.SIGTERM)

    def _answer(self, call_id: int, body: bytes) -> None:
        future = self._calls.get(call_id)
        if future is not None and not future.done():
            future.set_result(body)


def run_front_end(settings: Settings, index: int, link: Connection, control: Connection, port: int) -> None:
    """A further front end's process: the app over an engine client on `link`, served on the shared port."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the primary, which forwards SIGTERM
    from server.api import create_app
    from server.api.logs import configure_logging
    from server.draining import DrainingServer, uvicorn_config
    from server.engine.client import EngineClient
    from server.heap import freeze_heap
    from server.settings import apply_switch_interval

    configure_logging(settings.log_level_int, session_ids=settings.log_session_ids, fmt=settings.log_format)
    apply_switch_interval(settings)
    metrics = ForwardedMetrics()
    primary = Primary(control, metrics)
    engine = EngineClient(settings, metrics, link=link, index=index, front_ends=primary)
    app = create_app(settings, engine=engine, metrics=metrics, on_ready=freeze_heap)
    state = app.state.tssc
    state.api_server = index
    state.render_metrics = primary.render
    state.on_load_error = lambda: os.kill(os.getpid(), signal.SIGTERM)
    sock = reuseport_socket(settings.host, port)
    server = DrainingServer(uvicorn_config(app, settings), app, settings.shutdown_grace)
    server.run(sockets=[sock])
