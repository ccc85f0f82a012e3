"""Streams and events for the cache's copies. On CPU every method is a synchronous no-op wrapper.

- Captures (FP8 encode into the hot arena, FP16 encode + device-to-host copy into the pinned cold arena) run
  on a side `capture` stream that first waits for the compute stream's work so far; a `ready` event marks
  their end. The compute stream never waits for them.
- Cold fetches copy host-to-device on a `copy` stream into a fresh staging block; the compute stream waits
  only for that copy's event, then decodes into the live slot. The transfer overlaps queued compute.
- A block freed after a read carries a fence event; a writer reusing it waits on the fence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

Event = torch.cuda.Event


class Transfers:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._capture = torch.cuda.Stream(device) if self.cuda else None
        self._copy = torch.cuda.Stream(device) if self.cuda else None

    @contextmanager
    def on_capture_stream(self, waits: list[Event | None]) -> Iterator[None]:
        """Run the body on the capture stream, after the current stream's work and the given events."""
        with self._on(self._capture, waits):
            yield

    @contextmanager
    def on_copy_stream(self, waits: list[Event | None]) -> Iterator[None]:
        """Run the body on the copy stream after the given events (not after the compute stream)."""
        with self._on(self._copy, waits, follow_current=False):
            yield

    def record(self) -> Event | None:
        """An event on the current stream (None on CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def wait(self, event: Event | None) -> None:
        """Make the current stream wait for `event` (no host sync)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def keep_alive(self, tensors: list[torch.Tensor]) -> None:
        """Tell the caching allocator these tensors are used by the current stream too."""
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            for t in tensors:
                if t.is_cuda:
                    t.record_stream(stream)

    @contextmanager
    def _on(
        self, stream: torch.cuda.Stream | None, waits: list[Event | None], follow_current: bool = True
    ) -> Iterator[None]:
        if stream is None:
            yield
            return
        if follow_current:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        for ev in waits:
            if ev is not None:
                stream.wait_event(ev)
        with torch.cuda.stream(stream):
            yield
