"""Batched prefill of fresh rows packed back to back into one row of tokens, and its CUDA graphs: one graph per
bucket of total tokens.

Why: a burst of short prompts ran as one eager pass of right-padded rows. On mamba2-2.7b (an H200, the
engine's debug line, BENCHMARKS.md session 21) a step of 41 such rows took 150-160 ms, bound both by the
device (each row padded to the longest, 3.7 ms a ~200-token row) and by the host (its 64 layers' launches,
97-150 ms under load); the row graphs' buckets pad rows and widths further. A packed row has no padding but
its bucket's tail, and a replay no launches: our eager pass over one row of the same 12,800 tokens (one
sequence, a bound for a packed pass) took ~13 us a token against ~15 for the 64 padded rows (session 19).
Measured (session 23, an H200): the packed pass of 64 x 200 tokens takes 178 ms on the device, 15 ms over that
bound (the final states, `gpu_ops.final_states`, and the `seq_idx` masks), against 190 for the padded rows; over
HTTP a replay's launch is a few ms against 100-160 of eager launches, and a 64-prompt burst's TTFT p50 reads
152-157 ms against 194-205 with padded rows in the same call, so it is on by default.

Fresh rows only (each starts from the zero state: a prompt's first chunk, nothing restored), captured at
their ends only: mamba-ssm's varlen scan (`seq_idx`) starts every sequence from zero, and the conv reads no
input before its sequence's start (`gpu_ops.conv_prefill(start=...)`). Continued rows keep the padded
paths (`gpu_row_graphs`, the eager pass).

Layout (`PackedRows`) for S = max_slots + 1 sequences in a bucket of T tokens: rows 0..R-1 real, back to
back from token 0; sequence R the bucket's tail [sum of lengths, T) (its tokens are PAD_ID); sequences
R+1.. empty, at T. Every sequence past the real rows writes its states to the pool's spare slot, which no
request owns. The token-wise inputs (ids, `seq_idx`, each token's sequence start) and the per-sequence
ones (`cu_seqlens`, slots, ends, starts, the real rows' last tokens) are views of two flat device buffers,
filled per pass by two copies from one pinned host buffer each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor

from server.model.gpu_graphs import Captured, GraphCapturer

# bucket sizes in tokens: fine steps at the bottom (where the pass is latency bound, padding is cheap) and
# 1k steps up to a GPU step's default budget of 8,192, then coarser up to MAX_ROW_TOKENS
PACKED_BUCKETS = (128, 256, 512, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192, 10240, 12288, 16384)
PAD_ID = 0

# (ids (T,), the layout) -> logits (rows, v_padded) fp32 at each real row's last token (rows past R: junk)
PackedFn = Callable[[Tensor, "PackedRows"], Tensor]


@dataclass(frozen=True)
class PackedRows:
    """One packed pass's layout on the device (see the module doc); T tokens, S sequences, `rows` logits."""

    seq_idx: Tensor  # (1, T) int32: each token's sequence
    cu: Tensor  # (S + 1,) int32: the sequences' bounds (cu_seqlens)
    start: Tensor  # (T,) long: each token's sequence start
    slots: Tensor  # (S,) long: each sequence's slot (the spare slot past the real rows)
    seq_start: Tensor  # (S,) long: cu[:-1]
    ends: Tensor  # (S,) long: cu[1:]
    last: Tensor  # (rows,) long: the real rows' last tokens (0 past them)
    point_rows: Tensor  # (S,) long zeros: every sequence is in row 0 of the (1, T) batch

    @staticmethod
    def sizes(tokens: int, seqs: int, rows: int) -> tuple[int, int]:
        """(long, int32) elements of the flat buffers of this layout."""
        return 2 * tokens + 4 * seqs + rows, tokens + seqs + 1

    @classmethod
    def views(
        cls, flat: Tensor, flat32: Tensor, tokens: int, seqs: int, rows: int
    ) -> tuple[Tensor, PackedRows]:
        """(ids (T,), the layout) as views of the flat buffers (see `host`)."""
        t, s = tokens, seqs
        parts = flat[: 2 * t + 4 * s + rows].split([t, t, s, s, s, s, rows])
        ids, start, slots, seq_start, ends, zeros, last = parts
        seq_idx, cu = flat32[: t + s + 1].split([t, s + 1])
        return ids, cls(seq_idx[None], cu, start, slots, seq_start, ends, last, zeros)

    @staticmethod
    def host(
        tokens: Sequence[Sequence[int]], slots: Sequence[int], spare: int, width: int, seqs: int, rows: int
    ) -> tuple[Tensor, Tensor]:
        """The flat buffers' values (long, int32) on the host for real rows `tokens` on `slots`, in a bucket of
        `width` tokens with `seqs` sequences and `rows` logits."""
        lengths = torch.tensor([len(t) for t in tokens], dtype=torch.long)
        r, total = len(tokens), int(lengths.sum())
        if r == 0 or r >= seqs or r > rows or total > width or int(lengths.min()) < 1:
            raise ValueError(f"{r} rows of {total} tokens do not fit a packed bucket of {width} x {seqs}")
        longs, ints = PackedRows.sizes(width, seqs, rows)
        flat, flat32 = torch.empty(longs, dtype=torch.long), torch.empty(ints, dtype=torch.int32)
        ids, layout = PackedRows.views(flat, flat32, width, seqs, rows)  # filled in place below
        bounds = torch.full((seqs + 1,), width, dtype=torch.long)  # the tail, then empty sequences at T
        bounds[0], bounds[1 : r + 1] = 0, lengths.cumsum(0)
        seq_of = torch.full((width,), r, dtype=torch.long)
        seq_of[:total] = torch.arange(r).repeat_interleave(lengths)
        ids[:total], ids[total:] = torch.tensor(list(chain.from_iterable(tokens)), dtype=torch.long), PAD_ID
        torch.index_select(bounds, 0, seq_of, out=layout.start)
        layout.slots[:r], layout.slots[r:] = torch.tensor(slots, dtype=torch.long), spare
        layout.seq_start.copy_(bounds[:-1])
        layout.ends.copy_(bounds[1:])
        layout.point_rows.zero_()
        layout.last[:r], layout.last[r:] = bounds[1 : r + 1] - 1, 0
        layout.seq_idx[0].copy_(seq_of)
        layout.cu.copy_(bounds)
        return flat, flat32


def bucket_for(tokens: int, buckets: Sequence[int] = PACKED_BUCKETS) -> int | None:
    """The smallest bucket holding `tokens`; None when none does."""
    return next((b for b in buckets if b >= tokens), None)


class PackedGraphs:
    """One captured packed pass per bucket of `PACKED_BUCKETS`, on static flat buffers (`PackedRows.views`)."""

    def __init__(self, fn: PackedFn, max_slots: int, spare: int, device: torch.device) -> None:
        self.fn, self.spare, self.device = fn, spare, device
        self.seqs, self.rows = max_slots + 1, max_slots
        longs, ints = PackedRows.sizes(max(PACKED_BUCKETS), self.seqs, self.rows)
        self.flat = torch.zeros(longs, dtype=torch.long, device=device)
        self.flat32 = torch.zeros(ints, dtype=torch.int32, device=device)
        self._graphs: dict[int, Captured] = {}
        self._capturer = GraphCapturer()

    def _fill(self, tokens: Sequence[Sequence[int]], slots: Sequence[int], width: int) -> None:
        longs, ints = PackedRows.host(tokens, slots, self.spare, width, self.seqs, self.rows)
        cuda = self.device.type == "cuda"
        self.flat[: longs.numel()].copy_(longs.pin_memory() if cuda else longs, non_blocking=cuda)
        self.flat32[: ints.numel()].copy_(ints.pin_memory() if cuda else ints, non_blocking=cuda)

    def _run(self, width: int) -> Tensor:
        ids, rows = PackedRows.views(self.flat, self.flat32, width, self.seqs, self.rows)
        return self.fn(ids, rows)

    def _capture(self, width: int) -> Captured:
        # warm-up and capture on one row of 1 token and the tail: every state written goes to the spare slot
        self._fill([[PAD_ID]], [self.spare], width)
        return self._capturer.warm_and_capture(
            lambda: self._run(width), f"the packed prefill pass of {width} tokens"
        )

    @torch.inference_mode()
    def capture_all(self) -> None:
        for width in sorted(PACKED_BUCKETS, reverse=True):  # largest first: the smaller reuse its blocks
            if width not in self._graphs:
                self._graphs[width] = self._capture(width)

    def run(self, tokens: Sequence[Sequence[int]], slots: Sequence[int]) -> Tensor:
        """Fresh rows `tokens` (distinct live `slots`, each left with its row's final state) in one replay ->
        logits (rows, v_padded) fp32 at each row's last token."""
        width = bucket_for(sum(len(t) for t in tokens))
        if width is None:
            raise ValueError("the rows exceed the largest packed bucket")
        if width not in self._graphs:
            self._graphs[width] = self._capture(width)  # first: a capture's warm-up fills the buffers
        self._fill(tokens, slots, width)
        captured = self._graphs[width]
        if captured is None:  # the capture failed: this bucket runs eagerly
            return self._run(width)[: len(tokens)]
        graph, out = captured
        graph.replay()
        return out[: len(tokens)].clone()  # the next replay overwrites the static output


def packed_eager(fn: PackedFn, tokens: Sequence[Sequence[int]], slots: Sequence[int], spare: int,
                 device: torch.device) -> Tensor:  # fmt: skip
    """One packed pass without graphs, in a layout exactly as wide as the rows: logits (rows, v_padded)."""
    width, r = sum(len(t) for t in tokens), len(tokens)
    longs, ints = PackedRows.host(tokens, slots, spare, width, r + 1, r)
    ids, rows = PackedRows.views(longs.to(device), ints.to(device), width, r + 1, r)
    return fn(ids, rows)
