"""ModelRunner: prefill and batched decode against the live state pool (the CPU / torch path).

All tensor work of the server happens here; the engine only passes token ids and slot indices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.model.config import ModelConfig
from server.model.lm import LayerStates, MambaLM
from server.model.state import StatePool, StateSpec


@dataclass
class PrefillResult:
    last_logits: Tensor  # (v,) fp32; for an empty segment, empty (0,)
    all_logits: Tensor | None = None  # (l, v) fp32 when asked for
    captures: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # segment position -> state copy


class ModelRunner:
    def __init__(self, model: MambaLM, max_slots: int, device: str | torch.device | None = None) -> None:
        self.model = model
        self.config: ModelConfig = model.cfg
        self.device = torch.device(device) if device is not None else model.backbone.embedding.weight.device
        self.dtype = model.dtype
        self.max_slots = max_slots
        self.pool = StatePool(self.config, max_slots, self.dtype, self.device)
        self.vocab = self.config.unpadded_vocab_size

    # ---- state handoff -------------------------------------------------------------------------

    def state_spec(self) -> StateSpec:
        return self.pool.spec()

    def capture(self, slot: int) -> dict[str, Tensor]:
        return self.pool.read(slot)

    def slot_state(self, slot: int) -> dict[str, Tensor]:
        """The live slot's state as views into the pool (named like `state_spec`): a cache fetch can decode
        straight into them (one pass over memory, no intermediate state)."""
        return self.pool.views(slot)

    def restore(self, slot: int, state: Mapping[str, Tensor]) -> None:
        self.pool.write(slot, state)

    def reset(self, slot: int) -> None:
        self.pool.reset(slot)

    def _slot_states(self, slots: Tensor) -> LayerStates:
        return [(self.pool.conv[i, slots], self.pool.ssm[i, slots]) for i in range(self.config.n_layer)]

    def _store(self, slots: Tensor, states: LayerStates) -> None:
        for i, (conv, ssm) in enumerate(states):
            self.pool.conv[i, slots] = conv.to(self.pool.conv.dtype)
            self.pool.ssm[i, slots] = ssm

    # ---- compute ------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, tokens: Sequence[int], slot: int, capture_at: Sequence[int] = (), all_logits: bool = False
    ) -> PrefillResult:
        """Continue slot's state over `tokens`, splitting at capture positions (1..len)."""
        self.pool.check_slot(slot)
        n = len(tokens)
        cuts = set(capture_at)
        bad = sorted(p for p in cuts if not 0 < p <= n)
        if bad:
            raise ValueError(f"capture positions must lie in [1, {n}], got {bad}")
        ids = self._token_ids(tokens)  # (1, l) on the device
        result = PrefillResult(last_logits=torch.empty(0, device=self.device))
        pieces: list[Tensor] = []
        start = 0
        for end in sorted(cuts | {n}):
            if end > start:
                pieces.append(self._prefill_segment(ids[:, start:end], slot, all_logits)[:, : self.vocab])
            if end in cuts:
                result.captures[end] = self.pool.read(slot)
            start = end
        if pieces:
            result.last_logits = pieces[-1][-1]
            if all_logits:
                result.all_logits = torch.cat(pieces)
        return result

    def _token_ids(self, tokens: Sequence[int]) -> Tensor:
        return torch.as_tensor(list(tokens), dtype=torch.long, device=self.device).unsqueeze(0)

    def _prefill_segment(self, ids: Tensor, slot: int, all_logits: bool) -> Tensor:
        """ids (1, l) continuing the slot's state, which it updates -> logits (l, v_padded) fp32.
        (Subclasses may return only the last row when `all_logits` is False.)"""
        slots = torch.tensor([slot], device=self.device)
        logits, states = self.model.run(ids, self._slot_states(slots))
        self._store(slots, states)
        return logits[0]

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int] | Tensor, slots: Sequence[int] | Tensor) -> Tensor:
        """One token for each slot; slot -1 is padding. Returns logits (b, v) fp32."""
        slot_t = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        tok_t = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if slot_t.shape != tok_t.shape or slot_t.dim() != 1:
            raise ValueError("tokens and slots must be 1-D and of equal length")
        valid = slot_t >= 0
        live = slot_t[valid]
        if live.numel() != torch.unique(live).numel():
            raise ValueError("a slot appears twice in one decode batch")
        if live.numel() and int(live.max()) >= self.max_slots:
            raise IndexError(f"slot index out of range [0, {self.max_slots})")
        logits = torch.zeros(slot_t.shape[0], self.vocab, device=self.device)
        if live.numel():
            step_logits, states = self.model.step(tok_t[valid], self._slot_states(live))
            self._store(live, states)
            logits[valid] = step_logits[:, : self.vocab]
        return logits
