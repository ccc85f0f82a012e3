"""Prefill as CUDA-graph replays: a segment of n tokens runs as pieces of MAX_GRAPH_LEN tokens and then
the binary pieces of the rest (e.g. 2100 = 1024 + 1024 + 32 + 16 + 4), one captured graph per
power-of-two length, on a one-slot scratch state.

Why: eager prefill launches ~15 kernels per layer, and their host cost (~10 ms for 64 layers) dominates
short segments, which is exactly a follow-up turn after a cache hit. Splitting a segment anywhere is exact
(the handoff invariant), so the pieces compute the same function. Each graph reads its token ids from a
static buffer and continues the scratch state in place; the caller copies the slot's state into the
scratch first and back after, and applies the LM head once to the last piece's final hidden row.
Captures go through `gpu_graphs.GraphCapturer` (warm-up on the same buffers, thread-local capture; a
piece length whose capture fails runs eagerly from then on).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from server.model.gpu_graphs import Captured, GraphCapturer

MAX_GRAPH_LEN = 1024
# Segments up to this length run as graph pieces, longer ones eagerly. Eager prefill costs ~2 ms of host time
# per layer at any length (mamba-ssm's Triton launches; 140 ms for mamba2-2.7b, 88 ms for 1.3b on an H100),
# so it is host-bound until the GPU work per layer exceeds that. Measured on an H100 (bf16): a 1024-token
# piece takes 16.5 ms (2.7b) / 9.0 ms (1.3b), so 8 pieces (8k tokens) beat eager (144 / 97 ms), while at
# 32k eager wins (458 / 244 ms against 528 / 288 ms of pieces).
GRAPH_PREFILL_MAX = 8 * MAX_GRAPH_LEN
PieceFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (ids (1, L), conv, ssm) -> final normed hidden (1, d)


def pieces(n: int, largest: int = MAX_GRAPH_LEN) -> list[int]:
    """n as a sum of powers of two <= largest (repeated as often as needed), largest first."""
    out, bit = [], largest
    while n > 0:
        while bit > n:
            bit //= 2
        out.append(bit)
        n -= bit
    return out


class PrefillGraphs:
    def __init__(self, piece: PieceFn, conv: Tensor, ssm: Tensor, d_model: int, dtype: torch.dtype) -> None:
        """conv: (n_layer, 1, c, k-1), ssm: (n_layer, 1, ...) fp32 — the scratch state the graphs update."""
        self.piece, self.conv, self.ssm = piece, conv, ssm
        self.ids = torch.zeros(1, MAX_GRAPH_LEN, dtype=torch.long, device=conv.device)  # static input
        self.hidden = torch.zeros(1, d_model, dtype=dtype, device=conv.device)  # last piece's output row
        self._graphs: dict[int, Captured] = {}
        self._capturer = GraphCapturer()

    def _capture(self, length: int) -> Captured:
        saved = (self.conv.clone(), self.ssm.clone())  # warm-up runs advance the scratch state
        ids = self.ids[:, :length]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.piece(ids, self.conv, self.ssm)
            torch.cuda.current_stream().wait_stream(side)
            run = lambda: self.piece(ids, self.conv, self.ssm)
            return self._capturer.capture(run, f"the {length}-token prefill piece")
        finally:
            self.conv.copy_(saved[0])
            self.ssm.copy_(saved[1])

    @torch.inference_mode()
    def capture_all(self) -> None:
        length = MAX_GRAPH_LEN
        while length >= 1:
            self._ensure(length)
            length //= 2

    def _ensure(self, length: int) -> Captured:
        if length not in self._graphs:
            self._graphs[length] = self._capture(length)
        return self._graphs[length]

    def run(self, ids: Tensor) -> Tensor:
        """ids (1, n) on the device, n >= 1, from the scratch state -> final hidden (1, d)."""
        start, out = 0, self.hidden
        for length in pieces(ids.shape[1]):
            captured = self._ensure(length)
            self.ids[:, :length].copy_(ids[:, start : start + length])
            if captured is None:  # the capture failed: this length runs eagerly
                out = self.piece(self.ids[:, :length], self.conv, self.ssm)
            else:
                graph, out = captured
                graph.replay()
            start += length
        self.hidden.copy_(out)
        return self.hidden
