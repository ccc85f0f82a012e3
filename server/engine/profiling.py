"""Torch profiler traces of the model worker thread, on demand (`--profile-dir`; POST /start_profile and
POST /stop_profile), as vLLM's `VLLM_TORCH_PROFILER_DIR` does.

The profiler records the thread it is started on, so `start` and `stop` run on the model worker thread
(`Engine.in_worker`), between steps: the trace holds every step's CPU ops and, on CUDA, their kernels and
copies, for whatever the server serves meanwhile. The Chrome trace (open it in Perfetto or
chrome://tracing) is written after the stop, off that thread. With `--engine-process` the core process
writes it, into the same directory.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class WorkerProfiler:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._running: profile | None = None
        self._count = itertools.count(1)

    def start(self) -> bool:
        """Start recording (call on the worker thread); False if a recording runs already."""
        if self._running is not None:
            return False
        cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        self._running = profile(activities=[ProfilerActivity.CPU, *cuda])
        self._running.start()
        return True

    def stop(self) -> profile | None:
        """Stop recording (call on the worker thread); the recording, or None if none ran."""
        prof, self._running = self._running, None
        if prof is not None:
            prof.stop()
        return prof

    def export(self, prof: profile) -> Path:
        """Write a stopped recording's Chrome trace; its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = self.directory / f"tssc-trace-{stamp}-{os.getpid()}-{next(self._count)}.json"
        prof.export_chrome_trace(str(path))
        return path
