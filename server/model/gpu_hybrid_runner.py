"""GpuHybridRunner: the hybrid runner on the GPU kernels, its decode step one CUDA graph per batch bucket.

A `HybridRunner` (same slots, KV pool reserved per slot, `PagedKV` per slot, capture / restore, kv_source /
kv_sink; the engine cannot tell them apart) whose compute runs like `GpuModelRunner`'s:
- Mamba2 mixers: `gpu_layers.Mamba2Gpu`: prefill on mamba-ssm's chunked scan from the slot's state, decode
  on the live pool in place through slot indices;
- attention: prefill through the torch module on the slot's paged views (keys and values written into its
  blocks, SDPA over the gathered prefix); decode through `paged_attention`'s Triton kernels, which write the
  new token's key and value and attend through the slot's block table;
- norms, MLPs, the MoE router and experts: the torch modules (the MoE of a decode step through
  `moe_static`, which needs no host synchronisation).

Decode runs rows at different positions in one pass. The graph reads, besides the staged tokens and slot
indices (`InputStager`), each row's position (`PositionStager.positions`, staged the same way) and the
device block tables:

    tables: (S, M) int32, M = ceil(max_model_len / s)   # tables[slot, j] = seqs[slot].blocks[j]

Before each step the host allocates the block that each row's new token lands in (the slot's reservation
guarantees it) and copies the table entries that changed since the slot's table was last synced (new
blocks, or a new `PagedKV` after reset or restore) in one small copy. After it, every slot's length moves
on by one.

Prefill runs one row at a time. A segment of up to PIECE_PREFILL_MAX tokens that needs only its last
logits runs as prefill pieces (`gpu_prefill`: one CUDA graph per power-of-two size up to PIECE_MAX, padded)
on a one-slot scratch copy of the slot's Mamba states: the Mamba layers on `prefill_rows` (dt = 0 on the
padding), the attention layers through the decode kernels with one row per token (`kv_append` writes the
piece's keys and values into the slot's blocks, then every token attends over [0, its position]: causal by
construction, each row reading the prefix). The graphs read the slot and the piece's first position from
static device scalars, and each piece moves the position on by its real length. Why: an eager pass costs the
same host time however short it is (~1 ms per Mamba layer's chunked scan on an H200 host, ~40 ms for a
Granite-4.0-H-Micro shape), which is what a follow-up turn after a cache hit prefills. Longer segments, and
segments whose every position's logits are asked for, run eagerly (the torch attention over the gathered
prefix: one row per token would read the prefix once per token); such a pass is not split by captures a
multiple of the chunk size into it (a long prompt's interval captures): their Mamba states come from the pass's
chunk states (`prefill_rows` taps), their KV from the slot's blocks. Without prefill pieces (`prefill_pieces=
False`), a segment of at most `decode_tail` tokens (by default `DECODE_TAIL` with decode graphs) runs as decode
steps instead, one graph replay per token.

`make_hybrid_runner` returns this runner on CUDA with the kernels present, else the torch `HybridRunner`.
Graphs are captured at first use of a bucket; `warmup()` captures them all (call it before serving).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from server.model.defaults import to_device
from server.model.ffn import MLP, MoE
from server.model.gpu_graphs import Captured, DecodeGraphs, InputStager, buckets_for
from server.model.gpu_hybrid_layers import AttentionGpu, ffn_static, mamba_gpu
from server.model.gpu_layers import ConvPrefill, Mamba2Gpu, SsmStep
from server.model.gpu_prefill import PieceFn, PrefillGraphs
from server.model.hybrid import HybridBlock, HybridLM
from server.model.hybrid_runner import DEFAULT_MAX_MODEL_LEN, KV_BLOCK_SIZE, HybridRunner
from server.model.kernels import Kernels, load_kernels
from server.model.layers import PaddedRows
from server.model.paged_kv import PagedKV
from server.model.runner import Captures, PrefillResult, PrefillSeg, plan_pieces

log = logging.getLogger(__name__)
DECODE_TAIL = 8  # without prefill pieces, segments this short prefill as graph-replayed decode steps
PIECE_MAX = 256  # the largest prefill piece: its attention reads the slot's prefix once per token
PIECE_PREFILL_MAX = 2 * PIECE_MAX  # longer segments prefill eagerly


class SlotPrefillGraphs(PrefillGraphs):
    """`PrefillGraphs` whose pieces also write a live slot's KV: they read the slot and the piece's first
    position from `slot` and `start` ((1,) int64 on the device), and each piece adds its real length to
    `start`. Captures (and their warm-up runs) see slot -1, whose rows every kernel skips: no slot's KV is
    touched, and `start` is put back."""

    def __init__(self, piece: PieceFn, conv: Tensor, ssm: Tensor, d_model: int, dtype: torch.dtype) -> None:
        super().__init__(piece, conv, ssm, d_model, dtype, max_len=PIECE_MAX)
        self.slot = torch.full((1,), -1, dtype=torch.long, device=conv.device)
        self.start = torch.zeros(1, dtype=torch.long, device=conv.device)

    def _capture(self, size: int) -> Captured:
        saved = self.slot.clone(), self.start.clone()
        self.slot.fill_(-1)
        try:
            return super()._capture(size)
        finally:
            self.slot.copy_(saved[0])
            self.start.copy_(saved[1])

    def run_slot(self, ids: Tensor, slot: int, start: int, conv: Tensor, ssm: Tensor) -> Tensor:
        """ids (1, n) continuing `slot` from position `start` (its blocks for them in the synced table) and
        from its Mamba states `conv` / `ssm`, which move on -> the last token's final residual row (1, d)."""
        self.slot.fill_(slot)
        self.start.fill_(start)
        return self.run_on(ids, conv, ssm)


class PositionStager(InputStager):
    """`InputStager` plus each row's position (cap,) int32, staged through the same pinned double buffer:
    `stage_positions` first, then `stage` (whose event then covers both copies)."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        super().__init__(capacity, device)
        self.positions = torch.zeros(capacity, dtype=torch.int32, device=device)  # (cap,) static
        cuda = device.type == "cuda"
        self._host_pos = [torch.zeros(capacity, dtype=torch.int32, pin_memory=cuda) for _ in range(2)]
        self._pos_np = [t.numpy() for t in self._host_pos]  # made once, as the base class's views

    def stage_positions(self, positions: Sequence[int], bucket: int) -> None:
        self.wait_buffer()
        host = self._pos_np[self._flip]
        host[:bucket] = 0
        host[: len(positions)] = positions
        self.positions[:bucket].copy_(self._host_pos[self._flip][:bucket], non_blocking=True)


class GpuHybridRunner(HybridRunner):
    def __init__(
        self,
        model: HybridLM,
        max_slots: int,
        device: str | torch.device | None = None,
        *,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        block_size: int = KV_BLOCK_SIZE,
        state_dtype: torch.dtype = torch.float32,
        kernels: Kernels | None = None,
        use_graphs: bool = True,
        ssm_step: SsmStep = "tssc",
        conv_prefill: ConvPrefill = "triton",
        decode_tail: int | None = None,
        prefill_pieces: bool | None = None,
    ) -> None:
        super().__init__(
            model,
            max_slots,
            device,
            max_model_len=max_model_len,
            block_size=block_size,
            state_dtype=state_dtype,
        )
        self.kernels = kernels or load_kernels()
        if not self.kernels.gpu_ready:
            raise RuntimeError(f"GPU kernels unavailable: {self.kernels.summary()}")
        from server.model import gpu_ops, paged_attention

        blocks = list(model.layers())
        mixers = [b.mamba for b in blocks if b.mamba is not None]
        self.mamba = [mamba_gpu(m, self.kernels, gpu_ops, ssm_step, conv_prefill) for m in mixers]
        self.attention = [
            AttentionGpu(b.attention, paged_attention) for b in blocks if b.attention is not None
        ]
        self.blocks = blocks
        # tables[slot, j]: the slot's j-th KV block; what each slot's row last synced from (its PagedKV, blocks)
        self.tables = torch.zeros(
            max_slots, self.kv.blocks_for(max_model_len), dtype=torch.int32, device=self.device
        )
        self._synced: list[tuple[PagedKV | None, int]] = [(None, 0)] * max_slots
        self.stager = PositionStager(max(buckets_for(max_slots)), self.device)
        graphs_ok = use_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(self._step, self.stager, max_slots) if graphs_ok else None
        pieces = graphs_ok if prefill_pieces is None else prefill_pieces  # off CUDA: eager pieces (tests)
        self.prefill_graphs = self._prefill_graphs() if pieces else None
        tail = DECODE_TAIL if self.graphs is not None and self.prefill_graphs is None else 0
        self.decode_tail = tail if decode_tail is None else decode_tail

    def _prefill_graphs(self) -> SlotPrefillGraphs:
        pool, cfg = self.pool, self.hybrid.cfg
        conv = torch.zeros_like(pool.conv[:, :1])  # (n_mamba, 1, c, k-1) scratch
        ssm = torch.zeros_like(pool.ssm[:, :1], dtype=torch.float32)  # (n_mamba, 1, h, p, n) fp32 scratch
        residual = torch.float32 if cfg.residual_in_fp32 else self.dtype
        return SlotPrefillGraphs(self._piece, conv, ssm, cfg.d_model, residual)

    @staticmethod
    def _norm(block: HybridBlock, residual: Tensor) -> Tensor:
        normed: Tensor = block.norm(residual.to(block.norm.weight.dtype))
        return normed

    def _run_blocks(
        self,
        residual: Tensor,
        mamba: Callable[[int, Tensor], Tensor],
        attend: Callable[[int, Tensor], Tensor],
        ffn: Callable[[MLP | MoE, Tensor], Tensor],
    ) -> Tensor:
        """The residual stream through every block: its norm, then its feed-forward, or its Mamba mixer (the
        m-th) and / or its attention (the a-th), summed, each as the caller's pass computes it."""
        model = self.hybrid
        m = a = 0
        for block in self.blocks:
            h = self._norm(block, residual)
            if block.ffn is not None:
                residual = model.add(residual, ffn(block.ffn, h))
                continue
            outs = []
            if block.mamba is not None:
                outs.append(mamba(m, h))
                m += 1
            if block.attention is not None:
                outs.append(attend(a, h))
                a += 1
            residual = model.add(residual, sum(outs[1:], outs[0]))
        return residual

    # ---- prefill -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, tokens: Sequence[int], slot: int, capture_at: Sequence[int] = (), all_logits: bool = False
    ) -> PrefillResult:
        """`ModelRunner.prefill`, except that captures a multiple of the chunk size into a segment that runs
        eagerly come out of its pass (the Mamba states at those taps, the KV read later from the slot's
        blocks, which the rest of the pass does not change) instead of splitting it: an eager pass costs
        ~1 ms of host time per Mamba layer however long it is, and the interval captures of a long prompt
        would cut it into passes of `--checkpoint-interval` tokens. Shorter segments split as before (a
        prefill piece keeps only its end state)."""
        grain = self._capture_grain()
        if all_logits or not grain or not capture_at:
            return super().prefill(tokens, slot, capture_at, all_logits)
        self._check_segs([PrefillSeg(tokens, slot, capture_at)])
        ids = self._token_ids(tokens)  # (1, n)
        result = PrefillResult(last_logits=torch.empty(0, device=self.device))
        for piece in plan_pieces(0, len(tokens), capture_at, grain):
            inner = [p - piece.start for p in piece.taps if p < piece.end]
            taps = [p - piece.start for p in piece.taps]
            if inner and (self.prefill_graphs is None or piece.length > PIECE_PREFILL_MAX):
                self._check_room(slot, piece.length)
                logits, caps = self._prefill_eager(ids[:, piece.start : piece.end], slot, False, inner)
                if piece.end in piece.taps:
                    caps[piece.length] = self.pool.read(slot)
                result.last_logits = logits[-1, : self.vocab]
            else:
                part = super().prefill(tokens[piece.start : piece.end], slot, taps)
                caps, result.last_logits = part.captures, part.last_logits
            result.captures.update({piece.start + q: state for q, state in caps.items()})
        return result

    def _capture_grain(self) -> int:
        """The Mamba chunk size where mamba-ssm's scan stages are importable (they give the chunk states the
        taps come from), else 0."""
        mamba = self.hybrid.cfg.mamba
        return mamba.chunk_size if mamba is not None and self.kernels.ssd_parts is not None else 0

    def _prefill_segment(self, ids: Tensor, slot: int, all_logits: bool) -> Tensor:
        """ids (1, l) continuing the slot -> logits (l, v), or (1, v) of the last token; the slot moves on."""
        self._check_room(slot, ids.shape[1])
        if not all_logits and ids.shape[1] <= self.decode_tail:
            for i in range(ids.shape[1] - 1):  # the tokens stay on the device: no synchronisation
                self.decode(ids[0, i : i + 1], [slot])
            return self.decode(ids[0, -1:], [slot])
        if not all_logits and self.prefill_graphs is not None and ids.shape[1] <= PIECE_PREFILL_MAX:
            return self._prefill_pieces(self.prefill_graphs, ids, slot)
        return self._prefill_eager(ids, slot, all_logits)[0]

    def _prefill_eager(
        self, ids: Tensor, slot: int, all_logits: bool, taps: Sequence[int] = ()
    ) -> tuple[Tensor, Captures]:
        """One eager pass: ids (1, l) continuing the slot -> (logits (l or 1, v), {tap: the Mamba states after
        `tap` tokens} for each of `taps`, positions in [1, l))."""
        seq = self.seqs[slot]
        views = list(seq.views())
        model, n = self.hybrid, ids.shape[1]
        points = [(0, n), *((0, t) for t in taps)]  # the row's end first, then its taps
        rows = PaddedRows.build([n], n, points, self.device) if taps else None
        tapped: list[tuple[Tensor, Tensor]] = []  # per Mamba layer: conv (t, c, k-1), ssm (t, h, p, n)
        rope = model.rope(torch.arange(seq.length, seq.length + n, device=self.device))

        def attend(a: int, h: Tensor) -> Tensor:
            out, views[a] = self.attention[a].prefill(h, views[a], rope)
            return out

        residual = self._run_blocks(
            model.embed(ids),  # (1, l, d)
            lambda m, h: self._prefill_mamba(self.mamba[m], h, m, slot, rows, tapped),
            attend,
            lambda ffn, h: ffn(h),
        )
        logits = model.head(residual if all_logits else residual[:, -1:])[0]
        return logits, dict(zip(taps, self._tap_states(tapped, 1), strict=True)) if taps else {}

    def _prefill_pieces(self, graphs: SlotPrefillGraphs, ids: Tensor, slot: int) -> Tensor:
        """ids (1, l) continuing the slot, as prefill pieces -> the last token's logits (1, v)."""
        n, seq = ids.shape[1], self.seqs[slot]
        self._grow(slot, n)
        self._sync_tables([slot])
        conv, ssm = self.pool.conv[:, slot : slot + 1], self.pool.ssm[:, slot : slot + 1]
        hidden = graphs.run_slot(ids, slot, seq.length, conv, ssm)
        seq.lengths = [length + n for length in seq.lengths]
        return self.hybrid.head(hidden)

    def _piece(self, ids: Tensor, length: Tensor, conv: Tensor, ssm: Tensor) -> Tensor:
        """What a prefill graph runs: ids (1, L) whose first `length` ((1,) on the device) are real, at
        positions [start, start + L) of the slot in the graphs' `slot` / `start`; conv / ssm (n_mamba, 1, ...)
        continued in place -> the last real token's residual row (1, d). Padding tokens are rows of slot -1
        for attention (skipped: no KV written) and dt = 0 for the Mamba layers."""
        graphs = self.prefill_graphs
        assert graphs is not None
        model, width = self.hybrid, ids.shape[1]
        offs = torch.arange(width, device=ids.device)
        pos = graphs.start + offs  # (L,)
        idx = torch.where(offs < length, graphs.slot, -1).to(torch.int32)  # (L,)
        rows = PaddedRows.at_ends(length, width)
        rope = model.rope(pos)
        pos32 = pos.to(torch.int32)

        def mamba(m: int, h: Tensor) -> Tensor:
            out, new_conv, new_ssm = self.mamba[m].prefill_rows(h.unsqueeze(0), conv[m], ssm[m], rows)
            conv[m].copy_(new_conv)
            ssm[m].copy_(new_ssm)
            return out[0]

        residual = self._run_blocks(
            model.embed(ids[0]),  # (L, d)
            mamba,
            lambda a, h: self.attention[a].step(h, self.kv.kv[a], idx, pos32, self.tables, rope),
            ffn_static,
        )
        graphs.start.add_(length)
        return residual.index_select(0, length - 1)

    def _prefill_mamba(
        self,
        layer: Mamba2Gpu,
        h: Tensor,
        i: int,
        slot: int,
        rows: PaddedRows | None,
        tapped: list[tuple[Tensor, Tensor]],
    ) -> Tensor:
        """h (1, l, d) through Mamba layer i from the slot's states, which move on; with `rows`, the states
        at its taps (after the end's) appended to `tapped`."""
        conv, ssm = self.pool.conv[i, slot : slot + 1], self.pool.ssm[i, slot : slot + 1]
        if rows is None:
            out, new_conv, new_ssm = layer.prefill(h, conv, ssm)
        else:
            out, conv_taps, ssm_taps = layer.prefill_rows(h, conv, ssm, rows)
            new_conv, new_ssm = conv_taps[:1], ssm_taps[:1]
            tapped.append((conv_taps, ssm_taps))
        conv.copy_(new_conv)
        ssm.copy_(new_ssm)
        return out

    # ---- decode ------------------------------------------------------------------------------------

    def _step(self, tokens: Tensor, idx: Tensor) -> Tensor:
        """tokens (b,) int64, idx (b,) int32 slot per row (-1 = padding), positions from the stager
        -> logits (b, v) fp32. What a decode graph captures: no host synchronisation."""
        model = self.hybrid
        pos = self.stager.positions[: tokens.shape[0]]  # (b,)
        rope = model.rope(pos)
        residual = self._run_blocks(
            model.embed(tokens),  # (b, d)
            lambda m, h: self.mamba[m].step(h, self.pool.conv[m], self.pool.ssm[m], idx),
            lambda a, h: self.attention[a].step(h, self.kv.kv[a], idx, pos, self.tables, rope),
            ffn_static,
        )
        return model.head(residual)

    def _check_slots(self, slots: Sequence[int]) -> list[int]:
        """The live slots of a decode batch, checked (distinct, in range, room for one more token)."""
        live = self._live_slots(slots)
        for s in live:
            self._check_room(s, 1)
        return live

    def _grow(self, slot: int, tokens: int = 1) -> None:
        """Give the slot the blocks its next `tokens` land in (from its reservation; never shared ones)."""
        seq, pool = self.seqs[slot], self.kv
        missing = pool.blocks_for(seq.length + tokens) - len(seq.blocks)
        if missing > 0:
            seq.blocks += pool.allocator.allocate_many(missing)
        first, last = seq.length // pool.block_size, (seq.length + tokens - 1) // pool.block_size
        if any(pool.allocator.refcount(b) != 1 for b in seq.blocks[first : last + 1]):
            raise AssertionError("copy-on-write broken: a write would reach a shared KV block")

    def _sync_tables(self, live: Sequence[int]) -> None:
        """Copy the table entries that changed since each live slot was last synced, in one transfer."""
        updates: list[tuple[int, int, int]] = []
        for s in live:
            seq = self.seqs[s]
            held, count = self._synced[s]
            start = count if held is seq else 0
            updates += [(s, j, seq.blocks[j]) for j in range(start, len(seq.blocks))]
            self._synced[s] = (seq, len(seq.blocks))
        if not updates:
            return
        # (u, 3): slot, entry, block
        dev = to_device(torch.tensor(updates, dtype=torch.int32), self.device).long()
        self.tables[dev[:, 0], dev[:, 1]] = dev[:, 2].int()

    @torch.inference_mode()
    def decode(
        self, tokens: Sequence[int] | Tensor, slots: Sequence[int] | Tensor, skip: Tensor | None = None
    ) -> Tensor:
        """One token for each slot (slot -1, or a token in `skip`: padding) -> logits (b, v) fp32 (a padding
        row's: zeros); rows at any positions in one pass. `tokens` may be a device tensor. `skip` is resolved
        on the host (a synchronisation): the host must know which slots move on."""
        slot_list = slots.tolist() if isinstance(slots, Tensor) else [int(s) for s in slots]
        count = len(slot_list) if isinstance(tokens, Tensor) else len(tokens)
        if count != len(slot_list) or (isinstance(tokens, Tensor) and tokens.dim() != 1):
            raise ValueError("tokens and slots must be 1-D and of equal length")
        if skip is not None and count:
            ids = torch.as_tensor(tokens, dtype=torch.long).to(skip.device)
            slot_list = [
                -1 if out else s for s, out in zip(slot_list, torch.isin(ids, skip).tolist(), strict=True)
            ]
        live = self._check_slots(slot_list)
        if count == 0:
            return torch.zeros(0, self.vocab, device=self.device)
        cap = self.stager.capacity
        if count > cap:
            parts = [self.decode(tokens[i : i + cap], slot_list[i : i + cap]) for i in range(0, count, cap)]
            return torch.cat(parts)
        for s in live:
            self._grow(s)
        self._sync_tables(live)
        bucket = self.graphs.bucket(count) if self.graphs is not None else count
        self.stager.stage_positions([self.seqs[s].length if s >= 0 else 0 for s in slot_list], bucket)
        if self.graphs is not None:
            logits = self.graphs.run(tokens, slot_list)
        else:
            logits = self._step(*self.stager.stage(tokens, slot_list, bucket))
        for s in live:
            seq = self.seqs[s]
            seq.lengths = [n + 1 for n in seq.lengths]
        out = logits[:count, : self.vocab].clone()
        if len(live) < count:  # padding rows' logits are zeros, as the torch runner's (no host transfer)
            out.masked_fill_((self.stager.idx[:count] < 0).unsqueeze(-1), 0.0)
        return out

    def warmup(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Capture the decode graphs and the prefill pieces now, else each is captured at first use."""
        if self.graphs is not None:
            self.graphs.capture_all(batch_sizes)
        if self.prefill_graphs is not None:
            self.prefill_graphs.capture_all()


def make_hybrid_runner(
    model: HybridLM,
    max_slots: int,
    device: str | torch.device | None = None,
    *,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    state_dtype: torch.dtype = torch.float32,
) -> HybridRunner:
    """The GPU hybrid runner on CUDA with the kernels importable, else the torch `HybridRunner`."""
    dev = torch.device(device) if device is not None else model.embedding.weight.device
    if dev.type == "cuda":
        kernels = load_kernels()
        if kernels.gpu_ready:
            return GpuHybridRunner(
                model, max_slots, dev, max_model_len=max_model_len, state_dtype=state_dtype, kernels=kernels
            )
        log.warning("CUDA without the GPU kernels (%s): hybrids run on the torch path", kernels.summary())
    return HybridRunner(model, max_slots, dev, max_model_len=max_model_len, state_dtype=state_dtype)
