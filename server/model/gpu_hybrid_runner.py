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
on by one. Prefill runs one row at a time, eagerly, except a segment of at most `decode_tail` tokens (by
default `DECODE_TAIL` with graphs, else 0) that does not need every position's logits: it runs as decode
steps, one graph replay per token. Such segments are what a capture cuts off a prompt's end (its last
message's end lies 3 tokens before it in a chat template), and an eager pass of the whole model costs the
same host time however short it is (~1 ms per Mamba layer's chunked scan on an H200 host).

`make_hybrid_runner` returns this runner on CUDA with the kernels present, else the torch `HybridRunner`.
Graphs are captured at first use of a bucket; `warmup()` captures them all (call it before serving).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from server.model.gpu_graphs import DecodeGraphs, InputStager, buckets_for
from server.model.gpu_hybrid_layers import AttentionGpu, ffn_static, mamba_gpu
from server.model.gpu_layers import ConvPrefill, Mamba2Gpu, SsmStep
from server.model.hybrid import HybridBlock, HybridLM
from server.model.hybrid_runner import DEFAULT_MAX_MODEL_LEN, KV_BLOCK_SIZE, HybridRunner
from server.model.kernels import Kernels, load_kernels
from server.model.paged_kv import PagedKV

log = logging.getLogger(__name__)
DECODE_TAIL = 8  # segments this short prefill as graph-replayed decode steps


class PositionStager(InputStager):
    """`InputStager` plus each row's position (cap,) int32, staged through the same pinned double buffer:
    `stage_positions` first, then `stage` (whose event then covers both copies)."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        super().__init__(capacity, device)
        self.positions = torch.zeros(capacity, dtype=torch.int32, device=device)  # (cap,) static
        cuda = device.type == "cuda"
        self._host_pos = [torch.zeros(capacity, dtype=torch.int32, pin_memory=cuda) for _ in range(2)]

    def stage_positions(self, positions: Sequence[int], bucket: int) -> None:
        event = self._events[self._flip]
        if event is not None:
            event.synchronize()
        host = self._host_pos[self._flip]
        host.numpy()[:bucket] = 0
        host.numpy()[: len(positions)] = positions
        self.positions[:bucket].copy_(host[:bucket], non_blocking=True)


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
        tail = DECODE_TAIL if self.graphs is not None else 0
        self.decode_tail = tail if decode_tail is None else decode_tail

    @staticmethod
    def _norm(block: HybridBlock, residual: Tensor) -> Tensor:
        normed: Tensor = block.norm(residual.to(block.norm.weight.dtype))
        return normed

    # ---- prefill -----------------------------------------------------------------------------------

    def _prefill_segment(self, ids: Tensor, slot: int, all_logits: bool) -> Tensor:
        """ids (1, l) continuing the slot -> logits (l, v), or (1, v) of the last token; the slot moves on."""
        self._check_room(slot, ids.shape[1])
        if not all_logits and ids.shape[1] <= self.decode_tail:
            for i in range(ids.shape[1] - 1):  # the tokens stay on the device: no synchronisation
                self.decode(ids[0, i : i + 1], [slot])
            return self.decode(ids[0, -1:], [slot])
        seq = self.seqs[slot]
        views = list(seq.views())
        model = self.hybrid
        rope = model.rope(torch.arange(seq.length, seq.length + ids.shape[1], device=self.device))
        residual = model.embed(ids)  # (1, l, d)
        m = a = 0
        for block in self.blocks:
            h = self._norm(block, residual)
            if block.ffn is not None:
                residual = model.add(residual, block.ffn(h))
                continue
            outs = []
            if block.mamba is not None:
                outs.append(self._prefill_mamba(self.mamba[m], h, m, slot))
                m += 1
            if block.attention is not None:
                out, views[a] = self.attention[a].prefill(h, views[a], rope)
                outs.append(out)
                a += 1
            residual = model.add(residual, sum(outs[1:], outs[0]))
        return model.head(residual if all_logits else residual[:, -1:])[0]

    def _prefill_mamba(self, layer: Mamba2Gpu, h: Tensor, i: int, slot: int) -> Tensor:
        conv, ssm = self.pool.conv[i, slot : slot + 1], self.pool.ssm[i, slot : slot + 1]
        out, new_conv, new_ssm = layer.prefill(h, conv, ssm)
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
        residual = model.embed(tokens)  # (b, d)
        m = a = 0
        for block in self.blocks:
            h = self._norm(block, residual)
            if block.ffn is not None:
                residual = model.add(residual, ffn_static(block.ffn, h))
                continue
            outs = []
            if block.mamba is not None:
                outs.append(self.mamba[m].step(h, self.pool.conv[m], self.pool.ssm[m], idx))
                m += 1
            if block.attention is not None:
                outs.append(self.attention[a].step(h, self.kv.kv[a], idx, pos, self.tables, rope))
                a += 1
            residual = model.add(residual, sum(outs[1:], outs[0]))
        return model.head(residual)

    def _check_slots(self, slots: Sequence[int]) -> list[int]:
        """The live slots of a decode batch, checked (distinct, in range, room for one more token)."""
        live = self._live_slots(slots)
        for s in live:
            self._check_room(s, 1)
        return live

    def _grow(self, slot: int) -> None:
        """Give the slot the block its next token lands in (from its reservation; never a shared one)."""
        seq, pool = self.seqs[slot], self.kv
        missing = pool.blocks_for(seq.length + 1) - len(seq.blocks)
        if missing > 0:
            seq.blocks += pool.allocator.allocate_many(missing)
        if pool.allocator.refcount(seq.blocks[seq.length // pool.block_size]) != 1:
            raise AssertionError("copy-on-write broken: a decode would write a shared KV block")

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
        host = torch.tensor(updates, dtype=torch.int32)  # (u, 3): slot, entry, block
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True).long()
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
        """Capture the decode graphs now, else each is captured at first use of its bucket."""
        if self.graphs is not None:
            self.graphs.capture_all(batch_sizes)


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
