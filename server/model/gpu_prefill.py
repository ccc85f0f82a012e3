"""Prefill as CUDA-graph replays: a segment of n tokens runs as pieces of MAX_GRAPH_LEN tokens and then
the rest as the cheapest run of power-of-two pieces, whole ones largest first and the last one padded to the
next power of two, where each replay costs PIECE_COST tokens' worth of fixed latency on top of its padded size
(e.g. 2100 = 1024 + 1024 + 52 in a 64-token piece; 1021 in one 1024-token piece, not 512 + 256 + 253 in a
256-token piece; 600 = 512 + 88 in a 128-token piece), one captured graph per power-of-two size from
MIN_GRAPH_LEN up, on a one-slot scratch state.

Why: eager prefill launches ~15 kernels per layer, and their host cost (~10 ms for 64 layers) dominates
short segments, which is exactly a follow-up turn after a cache hit; and a short piece costs a replay of
the whole model's small-kernel latency (~3 ms for mamba2-2.7b) whatever its length, so a follow-up's ~90
tokens in binary pieces (64 + 16 + 8 + 2) cost four replays where one padded piece costs one. A piece
runs the batched pass's padded layers (`prefill_rows`: dt = 0 on the padding, so the ssm state passes
it unchanged, and the conv state taken at the real end), with its real length a static device input.
Splitting a segment anywhere is exact (the handoff invariant), so the pieces compute the same function.
Each graph reads its token ids and length from static buffers and continues the scratch state in place;
the caller copies the slot's state into the scratch first and back after, and applies the LM head once
to the last piece's final hidden row. Captures go through `gpu_graphs.GraphCapturer` (warm-up on the
same buffers, thread-local capture; a piece size whose capture fails runs eagerly from then on). A family of
graphs may stop at a smaller largest piece (`max_len`: the hybrid runner's, whose attention rows read the
whole prefix); on a CPU device the pieces run eagerly (what the Triton-interpreter tests check).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from server.model.gpu_graphs import Captured, GraphCapturer

MAX_GRAPH_LEN = 1024
MIN_GRAPH_LEN = 16  # the smallest piece: shorter tails run padded to it
# A replay's fixed cost in tokens of work: ~3 ms of small-kernel latency on mamba2-2.7b, where a 1024-token piece
# takes 16.5 ms (H100, bf16): ~13 us a token, so a replay costs about what ~230 tokens of padding do.
PIECE_COST = 256
# Segments up to this length run as graph pieces, longer ones eagerly. Eager prefill costs ~2 ms of host time
# per layer at any length (mamba-ssm's Triton launches; 140 ms for mamba2-2.7b, 88 ms for 1.3b on an H100),
# so it is host-bound until the GPU work per layer exceeds that. Measured on an H100 (bf16): a 1024-token
# piece takes 16.5 ms (2.7b) / 9.0 ms (1.3b), so 8 pieces (8k tokens) beat eager (144 / 97 ms), while at
# 32k eager wins (458 / 244 ms against 528 / 288 ms of pieces).
GRAPH_PREFILL_MAX = 8 * MAX_GRAPH_LEN
# (ids (1, L), real length (1,) on the device, conv, ssm) -> the last real token's final normed hidden (1, d)
PieceFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def pieces(n: int, top: int = MAX_GRAPH_LEN) -> list[tuple[int, int]]:
    """n tokens as graph pieces (size, real tokens), in order: whole pieces of `top` (a power of two, at
    most MAX_GRAPH_LEN), then `_rest`."""
    return [(top, top)] * (n // top) + list(_rest(n % top))


@functools.cache
def _rest(n: int) -> tuple[tuple[int, int], ...]:
    """n (< MAX_GRAPH_LEN) tokens as the pieces of least cost (each piece PIECE_COST + its size): one piece
    padded to the next power of two (>= MIN_GRAPH_LEN), or the largest power of two <= n whole and the rest
    so; on a tie, the fewer pieces."""
    if n == 0:
        return ()
    padded = ((max(MIN_GRAPH_LEN, 1 << (n - 1).bit_length()), n),)
    whole = 1 << (n.bit_length() - 1)
    if whole == n or whole < MIN_GRAPH_LEN:
        return padded
    split = ((whole, whole), *_rest(n - whole))
    return split if _cost(split) < _cost(padded) else padded


def _cost(parts: tuple[tuple[int, int], ...]) -> int:
    return sum(PIECE_COST + size for size, _ in parts)


class PrefillGraphs:
    def __init__(
        self,
        piece: PieceFn,
        conv: Tensor,
        ssm: Tensor,
        d_model: int,
        dtype: torch.dtype,
        max_len: int = MAX_GRAPH_LEN,
    ) -> None:
        """conv: (n_layer, 1, c, k-1), ssm: (n_layer, 1, ...) fp32 — the scratch state the graphs update;
        pieces of up to `max_len` tokens (a power of two). Off CUDA, every piece runs eagerly (no capture)."""
        assert MIN_GRAPH_LEN <= max_len <= MAX_GRAPH_LEN and max_len & (max_len - 1) == 0
        self.piece, self.conv, self.ssm, self.max_len = piece, conv, ssm, max_len
        self.ids = torch.zeros(1, max_len, dtype=torch.long, device=conv.device)  # static inputs
        self.length = torch.zeros(1, dtype=torch.long, device=conv.device)  # the piece's real tokens
        self.hidden = torch.zeros(1, d_model, dtype=dtype, device=conv.device)  # last piece's output row
        self._graphs: dict[int, Captured] = {}
        self._capturer = GraphCapturer() if conv.is_cuda else None

    def _capture(self, size: int) -> Captured:
        saved = (self.conv.clone(), self.ssm.clone())  # warm-up runs advance the scratch state
        ids = self.ids[:, :size]
        self.length.fill_(size)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.piece(ids, self.length, self.conv, self.ssm)
            torch.cuda.current_stream().wait_stream(side)
            run = lambda: self.piece(ids, self.length, self.conv, self.ssm)
            assert self._capturer is not None
            return self._capturer.capture(run, f"the {size}-token prefill piece")
        finally:
            self.conv.copy_(saved[0])
            self.ssm.copy_(saved[1])

    @torch.inference_mode()
    def capture_all(self) -> None:
        size = self.max_len
        while size >= MIN_GRAPH_LEN:
            self._ensure(size)
            size //= 2

    def _ensure(self, size: int) -> Captured:
        if size not in self._graphs:
            self._graphs[size] = self._capture(size) if self._capturer is not None else None
        return self._graphs[size]

    def run_on(self, ids: Tensor, conv: Tensor, ssm: Tensor) -> Tensor:
        """`run` from the state in `conv` / `ssm` (a slot's views, shaped like the scratch), which it moves on:
        copied into the scratch first and back after."""
        self.conv.copy_(conv)
        self.ssm.copy_(ssm)
        hidden = self.run(ids)
        conv.copy_(self.conv)
        ssm.copy_(self.ssm)
        return hidden

    def run(self, ids: Tensor) -> Tensor:
        """ids (1, n) on the device, n >= 1, from the scratch state -> final hidden (1, d)."""
        start, out = 0, self.hidden
        for size, real in pieces(ids.shape[1], self.max_len):
            captured = self._ensure(size)
            self.ids[:, :real].copy_(ids[:, start : start + real])  # the padding keeps stale, valid ids
            self.length.fill_(real)
            if captured is None:  # the capture failed: this size runs eagerly
                out = self.piece(self.ids[:, :size], self.length, self.conv, self.ssm)
            else:
                graph, out = captured
                graph.replay()
            start += real
        self.hidden.copy_(out)
        return self.hidden
