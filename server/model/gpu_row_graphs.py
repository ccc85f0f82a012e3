"""Batched prefill passes of short rows as CUDA graphs: one graph per bucket of (rows, width), each running
the padded batched layers (`prefill_slots`) on the pool's states, read and written in place through static
slot indices.

Why: an eager pass costs about 1.3-2 ms of host launches per layer (mamba-ssm's Triton launchers), 30 ms
on a 24-layer model and 130 ms on a 64-layer one, whatever its size. Under many streams, prompts arrive
nearly every step, so those launches, not the GPU, bounded the step (a py-spy profile of the 130m shape at
64 streams: half the model thread in eager prefill passes, `bench/serve_profile.py`); and a burst of short
prompts waited on them. A replay launches once.

A bucket (B, W) holds b <= B rows of at most W tokens. The static inputs are token ids (B, W), lengths (B,)
and slots (B,). Rows past b are padding: length 0, which passes a row's state through unchanged (dt = 0 and
the conv state taken before its first input), on a slot outside the batch, so writing their states back
rewrites that slot's own bytes. Captures inside a row are not taken here (a row's end is: its slot's new
state); rows with interior captures run the eager pass, except a lone segment's one capture, which a forked
row on a spare slot takes (`GpuModelRunner._prefill_forked`). A pass of more rows than a bucket holds well is
cut into parts of consecutive rows (longest first), one replay each (`plan_parts`). Captures go through
`gpu_graphs.GraphCapturer`, largest first so that smaller graphs reuse the pool's blocks; warm-up and
capture runs have every length 0, so they change no slot.

Measured on an H200 (BENCHMARKS.md, session 8): the 130m shape's 16 streams 0.70x -> 0.84x upstream and its
64-prompt burst's TTFT p50 185 -> 134 ms; the 2.7b shape's 16 streams 1.14x -> 1.24x, its burst 381 -> 362 ms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from server.model.gpu_graphs import Captured, GraphCapturer, buckets_for

# bucket widths: powers of two, so a row is padded by less than 2x (4x below 32 tokens, where the pass is
# all launch cost); longer rows run eagerly
ROW_WIDTHS = (32, 128, 256, 512)
MAX_ROW_TOKENS = 16_384  # B x W of the largest bucket (its activations live in the graphs' pool)
# (ids (B, W), lengths (B,), slots (B,)) -> logits (B, v) fp32 at each row's last real token
RowsFn = Callable[[Tensor, Tensor, Tensor], Tensor]
Bucket = tuple[int, int]  # (rows, width)


def row_buckets(max_slots: int) -> list[Bucket]:
    """(rows, width) buckets: rows 2, 4, ... up to max_slots, widths ROW_WIDTHS, at most MAX_ROW_TOKENS."""
    rows = [b for b in buckets_for(max_slots) if b >= 2]
    return [(b, w) for b in rows for w in ROW_WIDTHS if b * w <= MAX_ROW_TOKENS]


# An eager pass's host launches (mamba-ssm's Triton launchers, ~1.8 ms a layer) hide the GPU work of about
# LAUNCH_PARAM_TOKENS / (parameters a layer) tokens. On an H200 a batched pass costs mamba2-2.7b ~14 us of GPU
# a token (40M parameters a layer: ~8k tokens); mamba2-130m (3.7M a layer) ~86k: every bucket.
LAUNCH_PARAM_TOKENS = 3.2e11


def launch_tokens(layer_params: int, floor: int = 4096) -> int:
    """The tokens whose GPU work an eager pass's launches hide, for layers of `layer_params` parameters."""
    return max(floor, int(LAUNCH_PARAM_TOKENS / max(layer_params, 1)))


def replays_win(graph_tokens: int, eager_tokens: int, hidden_tokens: int) -> bool:
    """Whether replays of buckets holding `graph_tokens` (rows x widths) beat one eager pass over
    `eager_tokens`, when the eager pass's launches hide `hidden_tokens` of GPU work. Padding costs the GPU what
    real tokens do: below the hidden tokens the eager pass waits on its launches, so replays win up to there;
    above, the wider buckets cost more than the eager pass (2.7b, H200: 64 rows of ~200 tokens, eager 64 x 208
    190 ms, replays of 64 x 256 230 ms)."""
    return graph_tokens <= max(hidden_tokens, eager_tokens)


def plan_parts(lengths: Sequence[int], buckets: Sequence[Bucket]) -> list[tuple[int, Bucket]] | None:
    """Rows sorted longest first -> consecutive parts (rows in the part, its bucket) covering them; None when
    a row is wider than every bucket. Each part takes the narrowest width its first row fits; it takes all the
    rows left when a bucket holds them with at most half as many padding rows, else the largest bucket that
    they fill: 40 rows are 32 + 8, not 64 (graph rows cost the GPU what real ones do)."""
    parts: list[tuple[int, Bucket]] = []
    i = 0
    while i < len(lengths):
        widths = [w for _, w in buckets if w >= lengths[i]]
        if not widths:
            return None
        width, left = min(widths), len(lengths) - i
        rows = sorted(b for b, w in buckets if w == width)
        fits = [b for b in rows if left <= b <= left + max(1, left // 2)]
        filled = [b for b in rows if b <= left]
        if fits or not filled:  # all the rows left, in the smallest bucket that holds them
            parts.append((left, (fits[0] if fits else min(b for b in rows if b >= left), width)))
            break
        parts.append((filled[-1], (filled[-1], width)))
        i += filled[-1]
    return parts


class RowGraphs:
    def __init__(self, fn: RowsFn, max_slots: int, device: torch.device) -> None:
        self.fn, self.max_slots, self.device = fn, max_slots, device
        self.buckets = row_buckets(max_slots)
        top_b = max((b for b, _ in self.buckets), default=2)
        self.ids = torch.zeros(top_b, max(ROW_WIDTHS), dtype=torch.long, device=device)  # static inputs
        self.lengths = torch.zeros(top_b, dtype=torch.long, device=device)
        self.slots = torch.zeros(top_b, dtype=torch.long, device=device)
        self._graphs: dict[Bucket, Captured] = {}
        self._capturer = GraphCapturer()

    def parts(self, lengths: Sequence[int]) -> list[tuple[int, Bucket]] | None:
        """`plan_parts` over this pool's buckets (lengths sorted longest first)."""
        return plan_parts(lengths, self.buckets)

    def _inputs(self, b: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.ids[:b, :w], self.lengths[:b], self.slots[:b]

    def _capture(self, b: int, w: int) -> Captured:
        self.lengths.zero_()  # warm-up runs change no slot
        # the kernels are compiled (warm_batched): the warm-up run sets up the rest
        return self._capturer.warm_and_capture(
            lambda: self.fn(*self._inputs(b, w)), f"the {b} x {w} prefill pass"
        )

    @torch.inference_mode()
    def capture_all(self) -> None:
        for b, w in sorted(self.buckets, key=lambda bw: -bw[0] * bw[1]):
            self._ensure(b, w)

    def _ensure(self, b: int, w: int) -> Captured:
        if (b, w) not in self._graphs:
            self._graphs[(b, w)] = self._capture(b, w)
        return self._graphs[(b, w)]

    def run(self, ids: Tensor, lengths: Sequence[int], slots: Sequence[int], bucket: Bucket) -> Tensor:
        """ids (b, l) on the device, rows right-padded, l <= the bucket's width; distinct live `slots`, fewer
        than the pool's when b < the bucket's rows -> logits (b, v) fp32 at each row's last real token."""
        b, (rows, width) = len(lengths), bucket
        captured = self._ensure(rows, width)  # first: a capture's warm-up zeroes the static lengths
        taken = set(slots)
        spare = next(s for s in range(self.max_slots) if s not in taken) if b < rows else 0
        host = torch.tensor(
            [*lengths, *[0] * (rows - b), *slots, *[spare] * (rows - b)], dtype=torch.long
        ).pin_memory()  # (2 * rows,)
        staged = host.to(self.device, non_blocking=True)
        self.lengths[:rows].copy_(staged[:rows])
        self.slots[:rows].copy_(staged[rows:])
        self.ids[:b, : ids.shape[1]].copy_(ids)  # the rest keeps stale, valid ids
        if captured is None:  # the capture failed: this bucket runs eagerly
            return self.fn(*self._inputs(rows, width))[:b]
        graph, out = captured
        graph.replay()
        return out[:b].clone()  # the next replay overwrites the static output
