"""Decode inputs and CUDA graphs: pinned staging buffers and one captured decode step per batch bucket.

`InputStager` owns the static device inputs (tokens (cap,) int64, slot indices (cap,) int32) that every
graph reads, and double-buffered pinned host copies of them: a batch is written into the host buffer
whose previous copy has completed (an event per buffer), then copied `non_blocking`. Rows past the batch
are padding: slot -1, which every kernel of the step skips.

`DecodeGraphs` captures `step(tokens, idx)` once per bucket size on first use (or all at once in
`capture_all`), after two warm-up runs on all-padding rows (which leave the live pool untouched). All
graphs share one memory pool.

`capture_graph` is how every graph here and in `gpu_prefill` is captured; no kernel may compile inside a
capture and a failed capture must not fail requests:
- the warm-up runs call the captured function on the very tensors the capture uses (same shapes,
  strides, dtypes, data pointers; the intermediates come from the caching allocator, whose blocks are
  aligned alike in either pool), so every Triton kernel is compiled and autotuned for the exact
  specialisation (dtypes, 16-byte pointer alignment, integers equal to 1 or divisible by 16) before it;
- the capture is thread-local: work of the server's other threads (the cache's disk writer, pinned
  copies) cannot invalidate it; the garbage collector is paused during it, since a finalizer freeing CUDA
  objects (a dropped runner's graphs or events) would invalidate it from inside;
- if it raises all the same, a warning is logged, the allocator's recording into the graph pool
  stopped, the device synchronized, and that bucket / piece runs eagerly from then on; later captures go
  to a fresh pool (`GraphCapturer`), since torch refuses to record into a failed capture's pool again
  ("beginAllocateToPool: already recording to mempool_id", seen on torch 2.11).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.cuda.graphs import _POOL_HANDLE as GraphPool  # torch.cuda.graph_pool_handle()

log = logging.getLogger(__name__)

StepFn = Callable[[Tensor, Tensor], Tensor]  # (tokens (b,), idx (b,)) -> logits (b, v)
Captured = tuple[torch.cuda.CUDAGraph, Tensor] | None  # (graph, its static output); None: runs eagerly
MAX_BUCKET = 256


def capture_graph(
    run: Callable[[], Tensor], pool: GraphPool, stream: torch.cuda.Stream, what: str
) -> Captured:
    """Capture `run()`, already warmed up on the same inputs, into a CUDA graph on `stream` (one per pool)
    -> (graph, run's static output), or None if the capture raised (logged; the device synchronized)."""
    graph = torch.cuda.CUDAGraph()
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        # the outer context restores the caller's stream even when the capture's exit raises
        capture = torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local")
        with torch.cuda.stream(stream), capture:
            out = run()
        return graph, out
    except Exception as exc:  # any failure: the caller runs eagerly instead
        log.warning("CUDA graph capture of %s failed, running it eagerly from now on: %r", what, exc)
        _stop_recording(pool)
        torch.cuda.synchronize()
        return None
    finally:
        if collecting:
            gc.enable()


class GraphCapturer:
    """The memory pool and capture stream of a family of graphs (captured largest first, smaller ones
    reuse the pool's blocks)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()  # every capture into a pool on one stream

    def capture(self, run: Callable[[], Tensor], what: str) -> Captured:
        captured = capture_graph(run, self.pool, self.stream, what)
        if captured is None:  # torch cannot record into the failed capture's pool again
            self.pool = torch.cuda.graph_pool_handle()
        return captured

    def warm_and_capture(self, run: Callable[[], Tensor], what: str) -> Captured:
        """`run()` once on a side stream (every kernel compiled and autotuned for its shapes), then captured."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        return self.capture(run, what)


def _stop_recording(pool: GraphPool) -> None:
    """Torch's capture_end raises on a failed capture before it stops the caching allocator recording
    into the graph's pool; stop it here (the recording holds a filter of the dead graph). Torch refuses
    that pool all the same afterwards: `GraphCapturer` moves on to a fresh one."""
    with contextlib.suppress(RuntimeError):  # not recording (a torch that stops first, or never began)
        torch._C._cuda_endAllocateToPool(torch.cuda.current_device(), pool)


def buckets_for(max_slots: int) -> list[int]:
    """1, 2, 4, ... below min(max_slots, 256), then min(max_slots, 256) itself."""
    top = max(1, min(max_slots, MAX_BUCKET))
    sizes = [1 << i for i in range(9) if (1 << i) < top]
    return [*sizes, top]


class InputStager:
    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity, self.device = capacity, device
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)  # (cap,) static
        self.idx = torch.full((capacity,), -1, dtype=torch.int32, device=device)  # (cap,) static
        cuda = device.type == "cuda"
        self._host_tok = [torch.zeros(capacity, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._host_idx = [torch.zeros(capacity, dtype=torch.int32, pin_memory=cuda) for _ in range(2)]
        # numpy views of the host buffers, and one event per buffer recorded again each use: made once, not
        # per step (at 64 streams on the 130m shape `stage` was 5% of the worker thread, most of it these)
        self._tok_np = [t.numpy() for t in self._host_tok]
        self._idx_np = [t.numpy() for t in self._host_idx]
        self._events = [torch.cuda.Event() for _ in range(2)] if cuda else None  # never recorded: no wait
        self._flip = 0

    def wait_buffer(self) -> None:
        """Until the copies that last read the current host buffer have finished (before writing it)."""
        if self._events is not None:
            self._events[self._flip].synchronize()

    def slices(self, bucket: int) -> tuple[Tensor, Tensor]:
        return self.tokens[:bucket], self.idx[:bucket]

    def stage(
        self, tokens: Sequence[int] | Tensor, slots: Sequence[int], bucket: int
    ) -> tuple[Tensor, Tensor]:
        """Write one batch (padded to `bucket`) into the static inputs; returns their bucket slices."""
        n, k = len(slots), self._flip
        self.wait_buffer()
        idx = self._idx_np[k]
        idx[:bucket] = -1
        idx[:n] = slots
        if isinstance(tokens, Tensor) and tokens.device.type != "cpu":
            self.tokens[:n].copy_(tokens)
        else:
            self._tok_np[k][:n] = tokens.cpu().numpy() if isinstance(tokens, Tensor) else tokens
            self.tokens[:n].copy_(self._host_tok[k][:n], non_blocking=True)
        self.idx[:bucket].copy_(self._host_idx[k][:bucket], non_blocking=True)
        if self._events is not None:
            self._events[k].record()
        self._flip = 1 - k
        return self.slices(bucket)

    def skip(self, n: int, token_ids: Tensor) -> None:
        """Make the staged rows whose token is in `token_ids` (device) padding, on the device."""
        self.idx[:n].masked_fill_(torch.isin(self.tokens[:n], token_ids), -1)


class DecodeGraphs:
    def __init__(self, step: StepFn, stager: InputStager, max_slots: int) -> None:
        self.step, self.stager = step, stager
        self.buckets = buckets_for(max_slots)
        self._graphs: dict[int, Captured] = {}
        self._capturer = GraphCapturer()

    def bucket(self, n: int) -> int:
        for size in self.buckets:
            if size >= n:
                return size
        raise ValueError(f"batch of {n} exceeds the largest bucket {self.buckets[-1]}")

    @torch.inference_mode()
    def capture_all(self, sizes: Sequence[int] | None = None) -> None:
        for size in sorted(sizes or self.buckets, reverse=True):  # largest first: smaller ones reuse its pool
            self._ensure(self.bucket(size))

    def _ensure(self, bucket: int) -> Captured:
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        return self._graphs[bucket]

    def _capture(self, bucket: int) -> Captured:
        tokens, idx = self.stager.slices(bucket)
        idx.fill_(-1)  # warm-up rows are all padding: the pool is not touched
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(tokens, idx)
        torch.cuda.current_stream().wait_stream(side)
        return self._capturer.capture(lambda: self.step(tokens, idx), f"decode bucket {bucket}")

    def run(self, tokens: Sequence[int] | Tensor, slots: Sequence[int], skip: Tensor | None = None) -> Tensor:
        """Stage the batch into the bucket's static inputs (rows whose token is in `skip`: padding) and
        replay (or run eagerly where the capture failed); logits (bucket, v), static when replayed."""
        bucket = self.bucket(len(slots))
        captured = self._ensure(bucket)
        staged = self.stager.stage(tokens, slots, bucket)
        if skip is not None:
            self.stager.skip(len(slots), skip)
        if captured is None:
            return self.step(*staged)
        graph, logits = captured
        graph.replay()
        return logits
