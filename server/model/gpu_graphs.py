"""Decode inputs and CUDA graphs: pinned staging buffers and one captured decode step per batch bucket.

`InputStager` owns the static device inputs (tokens (cap,) int64, slot indices (cap,) int32) that every
graph reads, and double-buffered pinned host copies of them: a batch is written into the host buffer
whose previous copy has completed (an event per buffer), then copied `non_blocking`. Rows past the batch
are padding: slot -1, which every kernel of the step skips.

`DecodeGraphs` captures `step(tokens, idx)` once per bucket size on first use (or all at once in
`capture_all`), after two warm-up runs on all-padding rows (which leave the live pool untouched and
compile / autotune every Triton kernel outside the capture). All graphs share one memory pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Tensor], Tensor]  # (tokens (b,), idx (b,)) -> logits (b, v)
MAX_BUCKET = 256


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
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._flip = 0

    def slices(self, bucket: int) -> tuple[Tensor, Tensor]:
        return self.tokens[:bucket], self.idx[:bucket]

    def stage(
        self, tokens: Sequence[int] | Tensor, slots: Sequence[int], bucket: int
    ) -> tuple[Tensor, Tensor]:
        """Write one batch (padded to `bucket`) into the static inputs; returns their bucket slices."""
        n, k = len(slots), self._flip
        event = self._events[k]
        if event is not None:
            event.synchronize()  # the copy that last read this host buffer has finished
        host_idx = self._host_idx[k]
        host_idx.numpy()[:bucket] = -1
        host_idx.numpy()[:n] = slots
        if isinstance(tokens, Tensor) and tokens.device.type != "cpu":
            self.tokens[:n].copy_(tokens)
        else:
            host_tok = self._host_tok[k]
            host_tok.numpy()[:n] = tokens.cpu().numpy() if isinstance(tokens, Tensor) else tokens
            self.tokens[:n].copy_(host_tok[:n], non_blocking=True)
        self.idx[:bucket].copy_(host_idx[:bucket], non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._events[k] = event
        self._flip = 1 - k
        return self.slices(bucket)


class DecodeGraphs:
    def __init__(self, step: StepFn, stager: InputStager, max_slots: int) -> None:
        self.step, self.stager = step, stager
        self.buckets = buckets_for(max_slots)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def bucket(self, n: int) -> int:
        for size in self.buckets:
            if size >= n:
                return size
        raise ValueError(f"batch of {n} exceeds the largest bucket {self.buckets[-1]}")

    @torch.inference_mode()
    def capture_all(self, sizes: Sequence[int] | None = None) -> None:
        for size in sorted(sizes or self.buckets, reverse=True):  # largest first: smaller ones reuse its pool
            self._ensure(self.bucket(size))

    def _ensure(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        return self._graphs[bucket]

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        tokens, idx = self.stager.slices(bucket)
        idx.fill_(-1)  # warm-up rows are all padding: the pool is not touched
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(tokens, idx)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.step(tokens, idx)
        return graph, logits

    def run(self, tokens: Sequence[int] | Tensor, slots: Sequence[int]) -> Tensor:
        """Stage the batch into the bucket's static inputs and replay; logits (bucket, v) (static)."""
        graph, logits = self._ensure(self.bucket(len(slots)))
        self.stager.stage(tokens, slots, self.bucket(len(slots)))
        graph.replay()
        return logits
