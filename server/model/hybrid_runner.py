"""HybridRunner: the engine's runner for a hybrid Mamba2 + attention model (torch path).

It is a `ModelRunner` (same slots, slot checks, capture and handoff of the Mamba states; the engine's worker
cannot tell them apart) whose slots also carry attention KV:

    pool.conv: (n_mamba, slots, c, k-1)  model dtype   # `StatePool` over the model's Mamba mixers
    pool.ssm:  (n_mamba, slots, h, p, n) ssm dtype
    kv.kv:     (n_attention, N, 2, s, kv, dh) model dtype, N = slots * ceil(max_model_len / s)
    seqs[slot]: a `PagedKV` over `kv`, the slot's keys and values of positions [0, position)

A slot's position is its KV's length. The KV pool is reserved per slot: every slot can hold `max_model_len`
tokens, so a request the engine admitted (prompt + max_tokens <= max_model_len) never waits for blocks and
never runs out of them. `reset` (and `kv_sink`, before a restore) returns a slot's blocks to the pool.

Prefill runs one row at a time (`ModelRunner.prefill_batch` falls back to `prefill` per segment). Decode
batches the rows at one position (the rotary tables and the causal mask are per position), one pass per
distinct position. Captures hold the Mamba states (`state_spec`); the worker passes `kv_source(slot)` with
them, from which the cache reads the KV prefix [0, position).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cache import KVSpec
from server.model.hybrid import HybridLM, HybridState
from server.model.paged_kv import KVBlockPool, PagedKV, PagedLayerKV
from server.model.runner import ModelRunner

DEFAULT_MAX_MODEL_LEN = 8192  # a hybrid's sequence bound when --max-model-len is not set
KV_BLOCK_SIZE = 16  # tokens per block of the live KV pool and of the cache's KV blocks


class HybridRunner(ModelRunner):
    max_model_len: int  # always bounded: each slot's KV is reserved for this many tokens

    def __init__(
        self,
        model: HybridLM,
        max_slots: int,
        device: str | torch.device | None = None,
        *,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        block_size: int = KV_BLOCK_SIZE,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        cfg = model.cfg
        if cfg.mamba is None or cfg.attention is None or cfg.n_mamba == 0 or cfg.n_attention == 0:
            raise ValueError(f"a {cfg.arch} model needs Mamba and attention layers for the hybrid runner")
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, not {max_model_len}")
        self.hybrid = model
        dev = device if device is not None else model.embedding.weight.device
        self._setup_slots(cfg.mamba, max_slots, dev, model.dtype, state_dtype)
        self.vocab = cfg.vocab_size
        self.max_model_len = max_model_len
        blocks = max_slots * -(-max_model_len // block_size)
        self.kv = KVBlockPool.for_model(cfg, blocks, block_size, model.dtype, self.device)
        self.seqs: list[PagedKV] = [self.kv.sequence() for _ in range(max_slots)]

    def kv_spec(self) -> KVSpec:
        """The attention KV as the state cache stores it (`StateCache(kv=...)`)."""
        attn = self.hybrid.cfg.attention
        assert attn is not None
        pool = self.kv
        return KVSpec(pool.n_layers, attn.n_kv_heads, attn.head_dim, self.dtype, pool.block_size)

    # ---- slots -------------------------------------------------------------------------------

    def reset(self, slot: int) -> None:
        super().reset(slot)
        self._empty_kv(slot)

    def reset_many(self, slots: Sequence[int]) -> None:
        super().reset_many(slots)
        for slot in slots:
            self._empty_kv(slot)

    def kv_source(self, slot: int) -> PagedKV:
        self.pool.check_slot(slot)
        return self.seqs[slot]

    def kv_sink(self, slot: int) -> PagedKV:
        """The slot's KV, emptied (its blocks released): a restore appends the checkpoint's prefix."""
        self.pool.check_slot(slot)
        return self._empty_kv(slot)

    def position(self, slot: int) -> int:
        return self.seqs[slot].length

    def _empty_kv(self, slot: int) -> PagedKV:
        self.seqs[slot].release()
        self.seqs[slot] = self.kv.sequence()
        return self.seqs[slot]

    def _state(self, slots: Sequence[int]) -> HybridState:
        """The slots' state, all at one position: Mamba states gathered from the pool (copies; `_store_mamba`
        writes them back), KV as paged views that attention extends in place."""
        idx = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        mamba = tuple((self.pool.conv[i, idx], self.pool.ssm[i, idx]) for i in range(self.config.n_layer))
        rows = [self.seqs[s] for s in slots]
        return HybridState(rows[0].length, mamba, PagedLayerKV.batch(rows))

    def _store_mamba(self, slots: Sequence[int], state: HybridState) -> None:
        idx = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        self._store(idx, list(state.mamba))

    def _check_room(self, slot: int, tokens: int) -> None:
        if self.position(slot) + tokens > self.max_model_len:
            raise ValueError(
                f"slot {slot} holds {self.position(slot)} tokens; {tokens} more exceed max_model_len "
                f"{self.max_model_len}"
            )

    # ---- compute -------------------------------------------------------------------------------

    def _prefill_segment(self, ids: Tensor, slot: int, all_logits: bool) -> Tensor:
        """ids (1, l) continuing the slot -> logits (l, v) fp32; the slot's Mamba states and KV move on."""
        self._check_room(slot, ids.shape[1])
        logits, state = self.hybrid.run(ids, self._state([slot]))
        self._store_mamba([slot], state)
        return logits[0]

    @torch.inference_mode()
    def decode(
        self, tokens: Sequence[int] | Tensor, slots: Sequence[int] | Tensor, skip: Tensor | None = None
    ) -> Tensor:
        """One token for each slot (slot -1 or a token in `skip`: padding) -> logits (b, v) fp32; one pass
        per distinct position."""
        slot_t, tok_t, valid = self._decode_rows(tokens, slots, skip)
        logits = torch.zeros(slot_t.shape[0], self.vocab, device=self.device)
        slot_list = slot_t.tolist()  # one host copy, not one per row
        rows = [r for r, ok in enumerate(valid.tolist()) if ok]
        slot_of = {r: slot_list[r] for r in rows}
        for r in rows:
            self._check_room(slot_of[r], 1)
        by_position: dict[int, list[int]] = {}
        for r in rows:
            by_position.setdefault(self.position(slot_of[r]), []).append(r)
        for group in by_position.values():
            group_slots = [slot_of[r] for r in group]
            step_logits, state = self.hybrid.step(tok_t[group], self._state(group_slots))
            self._store_mamba(group_slots, state)
            logits[group] = step_logits[:, : self.vocab]
        return logits
