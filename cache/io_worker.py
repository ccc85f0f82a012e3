"""`IoWorker`: one background thread that runs the cache's file I/O (spill writes, unlinks) in FIFO order.

Jobs are plain callables queued by `StateCache` after it releases its lock, so a caller never waits for a
disk. One job runs at a time, in submission order: a file queued for unlink was named by a write that has
already finished, so an unlink never races its own write. A job may submit further jobs (a write whose
checkpoint went meanwhile queues its file for unlink); they run after everything queued before them.

The thread starts on the first submission and exits once the queue is empty, so an idle cache holds no
thread and a dropped one leaks none; the next submission starts a fresh one (never two at once). A job that
raises is logged and skipped; the thread carries on. `flush` waits until every submitted job, and every job
those submitted, has run; `close` also waits for the thread to exit. `throttle` lets a producer wait while the queue is long.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)
Job = Callable[[], None]


class IoWorker:
    def __init__(self, name: str = "tssc-cache-io") -> None:
        self.name = name
        self._jobs: deque[Job] = deque()
        self._unfinished = 0  # submitted jobs not yet run to the end
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        """Queue `job` behind everything already queued; start the thread if none is running."""
        with self._cond:
            self._jobs.append(job)
            self._unfinished += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()

    def flush(self) -> None:
        """Block until the queue is empty and no job is running (not callable from a job)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("IoWorker.flush called from its own thread")
        with self._cond:
            self._cond.wait_for(lambda: self._unfinished == 0)

    def close(self) -> None:
        """`flush`, then wait for the thread to exit. Submitting again later starts a new one."""
        self.flush()
        with self._cond:
            thread = self._thread
        if thread is not None:
            thread.join()

    def backlog(self) -> int:
        """Jobs submitted and not yet run to the end."""
        with self._cond:
            return self._unfinished

    def throttle(self, limit: int) -> None:
        """Backpressure: block while more than `limit` jobs are unfinished (no-op on the worker thread)."""
        if threading.current_thread() is self._thread:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._unfinished <= limit)

    def _loop(self) -> None:
        try:
            while (job := self._next()) is not None:
                try:
                    job()
                except Exception:
                    log.exception("background cache I/O job failed")
                finally:
                    self._finished()
        finally:
            self._exit()

    def _next(self) -> Job | None:
        with self._cond:
            return self._jobs.popleft() if self._jobs else None

    def _finished(self) -> None:
        with self._cond:
            self._unfinished -= 1
            self._cond.notify_all()

    def _exit(self) -> None:
        """Hand over (or give up) the thread slot. Exiting with jobs left (only after a BaseException in a
        job) starts a successor so the queue never stalls."""
        with self._cond:
            if self._thread is not threading.current_thread():
                return
            self._thread = None
            if self._jobs:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
