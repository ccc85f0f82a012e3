"""`CoreProcess`: the engine core's process and its pipe, as the HTTP process holds them (for `EngineClient`).

It spawns the core (the `spawn` context: CUDA cannot cross a fork), sends to it from the event loop (the
only sender), and reads it on a thread of its own. The reader replays each `Step`'s metric observations on
`Metrics` (thread-safe) and hands every message to the loop with one `call_soon_threadsafe`; when the core
closes its end (it exited, or died) it reaps the process and hands the exit code over the same way.

Stopping: a core that serves reads a `Shutdown` and stops its engine (which flushes the disk tier); one that
still loads reads nothing, so it is killed (it has nothing to flush). Either way the exit is awaited, and a
core that does not exit within `STOP_SECONDS` is killed. At interpreter exit without a stop, the same
happens before multiprocessing joins its children.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from server.engine.core import run_core
from server.engine.ipc import FromCore, Ready, Shutdown, Step, ToCore, replay
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)
STOP_SECONDS = 30.0  # for the core to stop its engine and exit, before it is killed


class CoreUnreachable(OSError):
    """The pipe to the core is closed: it exited or died."""


class CoreLink:
    """A front end's pipe to a running engine core; `on_message(message)` and `on_exit(exitcode)` run on the
    event loop. A further front end of `--api-servers` holds one of these (the core is not its child)."""

    def __init__(
        self,
        conn: Connection,
        metrics: Metrics,
        on_message: Callable[[FromCore], None],
        on_exit: Callable[[int | None], None],
    ) -> None:
        self._conn, self._metrics = conn, metrics
        self._on_message, self._on_exit = on_message, on_exit
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int | None] = self._loop.create_future()
        self._serving = False  # it said `Ready`: it reads the pipe (while it loads, it does not)

    def start_reading(self) -> None:
        threading.Thread(target=self._read, name="tssc-core-reader", daemon=True).start()

    def send(self, message: ToCore) -> None:
        """Send (on the event loop's thread only); raises `CoreUnreachable` once the core is gone."""
        try:
            self._conn.send(message)
        except OSError as exc:
            raise CoreUnreachable(str(exc)) from exc

    def send_quietly(self, message: ToCore) -> None:
        with contextlib.suppress(CoreUnreachable):
            self.send(message)

    def post(self, fn: Callable[[Any], None], arg: Any) -> bool:
        """`fn(arg)` on the event loop, from any thread (False once the loop is closed)."""
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            return False
        return True

    async def stop(self) -> None:
        """Detach from the core (which ends this front end's requests and closes the pipe's other end)."""
        self.send_quietly(Shutdown())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited), STOP_SECONDS)
        self._conn.close()

    # ---- reading -----------------------------------------------------------------------------

    def _read(self) -> None:
        """The reader thread: each message to the loop, until the core closes its end (exit or crash)."""
        while True:
            try:
                message: FromCore = self._conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Step):
                replay(self._metrics, message.observations)  # here: the loop only dispatches events
            if not self.post(self._dispatch, message):
                return
        self.post(self._exit, self._reap())

    def _reap(self) -> int | None:
        """The core's exit code, where this process can know it."""
        return None

    def _dispatch(self, message: FromCore) -> None:
        if isinstance(message, Ready):
            self._serving = True
        self._on_message(message)

    def _exit(self, exitcode: int | None) -> None:
        self._on_exit(exitcode)
        if not self._exited.done():
            self._exited.set_result(exitcode)


class CoreProcess(CoreLink):
    """The spawned engine core and the primary front end's pipe to it; `spare` more pipes are made for the
    further front ends of `--api-servers` (`take_spare_links`)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        on_message: Callable[[FromCore], None],
        on_exit: Callable[[int | None], None],
        spare: int = 0,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        pipes = [context.Pipe() for _ in range(1 + spare)]
        super().__init__(pipes[0][0], metrics, on_message, on_exit)
        self._spare: list[Connection] = [ours for ours, _ in pipes[1:]]
        theirs = [end for _, end in pipes]
        self._proc: BaseProcess = context.Process(
            target=run_core, args=(settings, theirs), name="tssc-engine-core"
        )
        self._start(theirs)

    def _start(self, theirs: list[Connection]) -> None:
        """On the loop, briefly (a fork and exec), with no await before the reader runs: no cancellation
        can leave a core without its reader."""
        self._proc.start()
        for end in theirs:
            end.close()
        assert self._proc.pid is not None
        self._metrics.track_engine_core(self._proc.pid)
        atexit.register(self.ask_to_stop)
        self.start_reading()
        log.info("engine core process started", extra={"pid": self._proc.pid})

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def take_spare_links(self) -> list[Connection]:
        """The further front ends' pipe ends (once: the caller hands them on and closes them)."""
        spare, self._spare = self._spare, []
        return spare

    # ---- stopping ----------------------------------------------------------------------------

    def ask_to_stop(self) -> None:
        if self._serving:
            self.send_quietly(Shutdown())
        else:
            self.kill()  # still loading: nothing to flush

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()

    async def stop(self) -> None:
        """Ask the core to stop and wait until it has exited (killing it after `STOP_SECONDS`)."""
        self.ask_to_stop()
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), STOP_SECONDS)
        except TimeoutError:
            log.warning("the engine core did not stop within %.0f s; killing it", STOP_SECONDS)
            self.kill()
            await asyncio.wait_for(asyncio.shield(self._exited), STOP_SECONDS)
        self._conn.close()
        for end in self.take_spare_links():
            end.close()
        atexit.unregister(self.ask_to_stop)

    def _reap(self) -> int | None:
        self._proc.join(timeout=10)
        return self._proc.exitcode


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running after closing its pipe"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"
