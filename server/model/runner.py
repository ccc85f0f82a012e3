"""ModelRunner: prefill, batched prefill and batched decode against the live state pool (the CPU /
torch path).

All tensor work of the server happens here; the engine only passes token ids and slot indices.

`prefill_batch` runs many sequences' segments in one pass over the model: rows right-padded to the
longest, dt = 0 on the padding (the ssm state passes through it unchanged), each row's conv state
taken from its own last k-1 real inputs. Rows are grouped longest first so that a pass holds at most
`pad_waste` padded tokens per real token: 1.25 here, since the torch path on CPU is compute-bound
past a few dozen tokens a row, so padding costs about what it pads (bench/prefill_batch_cpu.py).

A capture at a multiple of the chunk size from the segment start (or from the split before it)
comes out of the pass: the scan's fp32 state entering that chunk and the k-1 conv inputs before it.
Any other capture position splits the segment there, as in `prefill`, so each capture costs at most
one split. Mamba1 has no chunk states: there every capture inside a segment splits it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cache.base import KVSink, KVSource
from server.model.config import ModelConfig
from server.model.layers import PaddedRows
from server.model.lm import LayerStates, MambaLM
from server.model.state import StatePool, StateSpec

PAD_ID = 0  # the token id on padded positions (their dt is zeroed, so any valid id does)
Captures = dict[int, dict[str, Tensor]]  # position -> a slot state (new tensors, named like `state_spec`)


@dataclass
class PrefillResult:
    last_logits: Tensor  # (v,) fp32; for an empty segment, empty (0,)
    all_logits: Tensor | None = None  # (l, v) fp32 when asked for
    captures: Captures = field(default_factory=dict)  # segment position -> state copy
    # the positions whose capture is the slot's live state as views (`slot_state`), not a copy: the caller
    # copies it before the slot is next written (`server.engine.worker`); a packed pass's row ends
    live: tuple[int, ...] = ()


@dataclass(frozen=True)
class PrefillSeg:
    """One row of `prefill_batch`: tokens continuing the slot's live state, captured at `capture_at`."""

    tokens: Sequence[int]
    slot: int
    capture_at: Sequence[int] = ()  # positions relative to the segment start, in [1, len(tokens)]
    # the slot holds the zero state (a prompt's first chunk, nothing restored): a packed pass may take it
    fresh: bool = False


@dataclass(frozen=True)
class _Piece:
    """What one batched pass runs of segment `seg`: its tokens [start, end), capturing at `taps`
    (segment positions in (start, end]: `end`, or multiples of the capture grain from `start`)."""

    seg: int
    start: int
    end: int
    taps: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_pieces(seg: int, n: int, capture_at: Sequence[int], grain: int) -> list[_Piece]:
    """Split a segment of n tokens at each capture that is not a multiple of `grain` (0: none is) from
    the start of its piece; every capture is a tap of exactly one piece."""
    pieces: list[_Piece] = []
    start, taps = 0, []
    for p in sorted(set(capture_at)):
        taps.append(p)
        if p < n and not (grain and (p - start) % grain == 0):
            pieces.append(_Piece(seg, start, p, tuple(taps)))
            start, taps = p, []
    return [*pieces, _Piece(seg, start, n, tuple(taps))]


def _groups(pieces: Sequence[_Piece], waste: float) -> list[list[_Piece]]:
    """Batch pieces longest first; a group closes when padding it to its longest piece would take more
    than `waste` x its real tokens."""
    groups: list[list[_Piece]] = []
    real = 0
    for pc in sorted(pieces, key=lambda q: q.length, reverse=True):
        if groups and (len(groups[-1]) + 1) * groups[-1][0].length <= waste * (real + pc.length):
            groups[-1].append(pc)
            real += pc.length
        else:
            groups.append([pc])
            real = pc.length
    return groups


class ModelRunner:
    pad_waste = 1.25  # padded tokens per real token a batched prefill pass may hold, at most
    width_grain = 1  # a batched pass's width is max(lengths) rounded up to a multiple of this
    max_model_len: int | None = None  # tokens a slot's sequence may reach (a hybrid's KV); None: no bound

    def __init__(
        self,
        model: MambaLM,
        max_slots: int,
        device: str | torch.device | None = None,
        *,
        state_dtype: torch.dtype = torch.float32,
        spare_slots: int = 0,
    ) -> None:
        """`state_dtype`: the live ssm state's dtype, fp32 or bf16 (compute stays fp32; see `StatePool`);
        `spare_slots`: pool slots past `max_slots` that the runner keeps for itself."""
        self.model = model
        dev = device if device is not None else model.backbone.embedding.weight.device
        self._setup_slots(model.cfg, max_slots, dev, model.dtype, state_dtype, spare_slots)
        self.vocab = self.config.unpadded_vocab_size

    def _setup_slots(
        self,
        config: ModelConfig,
        max_slots: int,
        device: str | torch.device,
        dtype: torch.dtype,
        state_dtype: torch.dtype,
        spare: int = 0,
    ) -> None:
        """The live slots of `config`'s Mamba layers (every runner's; a hybrid's config counts its Mamba mixers)."""
        self.config: ModelConfig = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_slots = max_slots
        self.pool = StatePool(config, max_slots, dtype, self.device, ssm_dtype=state_dtype, spare=spare)

    @property
    def computes_async(self) -> bool:
        """Whether a call returns before the device has computed it (CUDA), so that the engine gains by
        launching the next decode step before this one's tokens reach the host (decode ahead)."""
        return False

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

    def reset_many(self, slots: Sequence[int]) -> None:
        """`reset` of each slot, batched."""
        self.pool.reset_many(slots)

    def kv_source(self, slot: int) -> KVSource | None:
        """The slot's attention KV, which a capture reads its prefix from (a hybrid's); None: no KV."""
        return None

    def kv_sink(self, slot: int) -> KVSink | None:
        """The slot's attention KV emptied, for a restore to append to (a hybrid's); None: no KV."""
        return None

    def _slot_states(self, slots: Tensor) -> LayerStates:
        return [(self.pool.conv[i, slots], self.pool.ssm[i, slots]) for i in range(self.config.n_layer)]

    def _store(self, slots: Tensor, states: LayerStates) -> None:
        for i, (conv, ssm) in enumerate(states):
            self.pool.conv[i, slots] = conv.to(self.pool.conv.dtype)
            self.pool.ssm[i, slots] = ssm.to(self.pool.ssm.dtype)  # the fp32 result, rounded to a bf16 pool

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

    # ---- batched prefill ----------------------------------------------------------------------

    @torch.inference_mode()
    def prefill_batch(self, segs: Sequence[PrefillSeg]) -> list[PrefillResult]:
        """`prefill(seg.tokens, seg.slot, seg.capture_at)` for every seg (distinct slots, non-empty
        tokens), computed in batched passes. Checks every seg before writing any slot."""
        self._check_segs(segs)
        if not self._batches_prefill():
            return [self.prefill(s.tokens, s.slot, s.capture_at) for s in segs]
        grain = self._capture_grain()
        plans = [plan_pieces(i, len(s.tokens), s.capture_at, grain) for i, s in enumerate(segs)]
        results = [PrefillResult(last_logits=torch.empty(0, device=self.device)) for _ in segs]
        for rnd in range(max(map(len, plans), default=0)):  # a segment's pieces run in order
            for group in self._group([plan[rnd] for plan in plans if len(plan) > rnd]):
                self._run_pieces(group, segs, results)
        return results

    def _group(self, pieces: Sequence[_Piece]) -> list[list[_Piece]]:
        """The passes of one round of `prefill_batch`: pieces batched by padding waste (`_groups`). A
        backend whose single-row pass is cheaper for some pieces runs those alone."""
        return _groups(pieces, self.pad_waste)

    def _check_segs(self, segs: Sequence[PrefillSeg]) -> None:
        for seg in segs:
            self.pool.check_slot(seg.slot)
            n = len(seg.tokens)
            if n == 0:
                raise ValueError(f"slot {seg.slot}: a batched prefill segment needs at least one token")
            bad = sorted(p for p in set(seg.capture_at) if not 0 < p <= n)
            if bad:
                raise ValueError(f"capture positions must lie in [1, {n}], got {bad}")
        if len({seg.slot for seg in segs}) != len(segs):
            raise ValueError("a slot appears twice in one prefill batch")

    def _batches_prefill(self) -> bool:
        """Whether `_prefill_rows` computes what this runner's `_prefill_segment` does. A subclass that
        replaces `_prefill_segment` but not `_prefill_rows` gets per-row `prefill` calls instead."""
        cls = type(self)
        own_rows = cls._prefill_rows is not ModelRunner._prefill_rows
        return own_rows or cls._prefill_segment is ModelRunner._prefill_segment

    def _capture_grain(self) -> int:
        """Captures at multiples of this many tokens from a pass's start come out of the pass (0: only
        at its end); the chunk size of the SSD scan, whose chunk-entering states are at hand."""
        return self.config.chunk_size if self.config.arch == "mamba2" else 0

    def _run_pieces(
        self, group: Sequence[_Piece], segs: Sequence[PrefillSeg], out: list[PrefillResult]
    ) -> None:
        rows = [segs[pc.seg].tokens[pc.start : pc.end] for pc in group]
        taps = [[p - pc.start for p in pc.taps] for pc in group]
        slots = [segs[pc.seg].slot for pc in group]
        logits, caps = self._prefill_rows(self._padded_ids(rows), [len(r) for r in rows], slots, taps)
        for r, pc in enumerate(group):
            out[pc.seg].last_logits = logits[r, : self.vocab]
            out[pc.seg].captures.update({pc.start + q: state for q, state in caps[r].items()})

    def _padded_ids(self, rows: Sequence[Sequence[int]]) -> Tensor:
        width = -(-max(len(r) for r in rows) // self.width_grain) * self.width_grain
        padded = [[*r, *[PAD_ID] * (width - len(r))] for r in rows]
        return torch.tensor(padded, dtype=torch.long, device=self.device)  # (b, l)

    def _prefill_rows(
        self, ids: Tensor, lengths: Sequence[int], slots: Sequence[int], taps: Sequence[Sequence[int]]
    ) -> tuple[Tensor, list[Captures]]:
        """The batched prefill hook: one pass over the model for b >= 1 rows. `prefill_batch` validates,
        splits segments at captures the pass cannot take, groups rows by length and calls this once per
        group, under inference mode. A subclass that replaces `_prefill_segment` implements it (and
        `_capture_grain`) to batch its own prefill; until then `prefill_batch` calls its `prefill`.

        Inputs:
        - ids (b, l) long on the device: row r holds its lengths[r] >= 1 tokens, right-padded with
          PAD_ID up to l = max(lengths), rounded up to a multiple of `width_grain`.
        - slots: distinct, in range. Row r starts from the live state of slots[r] and leaves there its
          state after lengths[r] tokens. Padding must change no row's state and no real output.
        - taps[r]: ascending positions relative to the row start, each lengths[r] or a positive
          multiple of `_capture_grain()` below it (chunk-aligned capture requests).
        Returns:
        - logits (b, v_padded) fp32 of each row's last real token (the caller drops the vocab padding);
        - per row {tap: the row's state after that many tokens}, for every tap of the row, as new
          tensors named, shaped and typed like `state_spec()` (conv and ssm in the pool's dtypes), which
          the caller hands to the cache as they are."""
        slot_t = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        b = len(lengths)
        points = [*enumerate(lengths), *((r, p) for r, ps in enumerate(taps) for p in ps)]
        rows = PaddedRows.build(lengths, ids.shape[1], points, self.device)
        logits, states = self.model.run_rows(ids, self._slot_states(slot_t), rows)
        self._store(slot_t, [(conv[:b], ssm[:b]) for conv, ssm in states])
        caps: list[Captures] = [{} for _ in range(b)]
        for (r, p), state in zip(points[b:], self._tap_states(states, b), strict=True):
            caps[r][p] = state
        return logits, caps

    def _tap_states(self, states: LayerStates, first: int) -> list[dict[str, Tensor]]:
        """Rows `first`.. of a pass's per-layer states as slot states, conv (n_layer, c, k-1) and ssm
        (n_layer, ...): the rows of two new tensors (taps, n_layer, ...), one stack each, so that the cache
        encodes them all at once as well (`CheckpointCache.capture_many`)."""
        conv = torch.stack([c[first:] for c, _ in states], dim=1).to(self.pool.conv.dtype)
        ssm = torch.stack([s[first:] for _, s in states], dim=1).to(self.pool.ssm.dtype)
        return [{"conv": c, "ssm": s} for c, s in zip(conv, ssm, strict=True)]

    # ---- decode -------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(
        self, tokens: Sequence[int] | Tensor, slots: Sequence[int] | Tensor, skip: Tensor | None = None
    ) -> Tensor:
        """One token for each slot; slot -1 is padding, and so is a row whose token is in `skip` (a device
        tensor of token ids: the engine's decode ahead leaves a row that sampled a stop id unfed). Returns
        logits (b, v) fp32; a padding row's are zero."""
        slot_t, tok_t, valid = self._decode_rows(tokens, slots, skip)
        live = slot_t[valid]
        logits = torch.zeros(slot_t.shape[0], self.vocab, device=self.device)
        if live.numel():
            step_logits, states = self.model.step(tok_t[valid], self._slot_states(live))
            self._store(live, states)
            logits[valid] = step_logits[:, : self.vocab]
        return logits

    def _live_slots(self, slots: Sequence[int]) -> list[int]:
        """The live (non-padding) slots of a decode batch given on the host, checked: distinct, in range."""
        live = [s for s in slots if s >= 0]
        if len(live) != len(set(live)):
            raise ValueError("a slot appears twice in one decode batch")
        if any(s >= self.max_slots for s in live):
            raise IndexError(f"slot index out of range [0, {self.max_slots})")
        return live

    def _decode_rows(
        self, tokens: Sequence[int] | Tensor, slots: Sequence[int] | Tensor, skip: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """A decode batch checked: (slots (b,), tokens (b,), valid (b,) bool: the rows that are not padding,
        nor skipped)."""
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
        if skip is not None:
            valid &= ~torch.isin(tok_t, skip.to(self.device))
        return slot_t, tok_t, valid
