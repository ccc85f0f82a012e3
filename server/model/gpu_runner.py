"""GpuModelRunner: the ModelRunner interface on mamba-ssm's Triton kernels, our Triton steps and CUDA graphs.

Same contract as `server.model.runner.ModelRunner` (prefill / decode / capture / restore / reset /
state_spec; live ssm state fp32 or bf16 (`state_dtype`, computed in fp32 either way), conv state in the
model dtype). What differs is how the work runs:
- residual add + RMSNorm fused (mamba-ssm's Triton `rms_norm_fn`), the gated norm on its Triton kernel;
- prefill: the chunked SSD scan from the slot's state, split at the capture positions, logits of the
  last token only unless all are asked for; each segment replays as CUDA graphs of power-of-two pieces,
  its tail padded (`gpu_prefill`), up to GRAPH_PREFILL_MAX tokens, which removes the host launch cost
  (~1.3 ms a layer eager) of short segments; longer segments and `all_logits=True` run eagerly (there the
  GPU work hides the launches, while each graph piece adds a few ms of small-kernel latency);
- batched prefill (`prefill_batch`): a group of several rows of up to 512 tokens, captured at their ends
  only, replays a CUDA graph of its (rows, width) bucket (`gpu_row_graphs`); any other group of several
  rows runs as one eager padded pass (embedding,
  fused add + norm, `prefill_slots` per layer, whose scan reads each row's state from its slot and writes the
  new one there, logits at each row's last real token), so the launch cost is paid once for all rows; a group of
  one row takes the single-row path above (graph pieces, split at its captures). Captures at multiples of
  the chunk size come out of the pass as fp32 chunk states (Mamba2; `_capture_grain`);
- a lone segment of up to 512 tokens with one to MAX_FORKS captures inside it (a chat follow-up, captured at
  the user message's end, a few tokens before the prompt's end, and at the answer's end when the previous
  turn's finish checkpoint did not match) replays one bucket of up to four rows: the segment, and per capture
  a fork of its first tokens up to it on one of the pool's spare slots, all from the slot's state
  (`_prefill_forked`): one replay instead of one per capture and the end;
- decode: each layer updates the live pool in place through slot indices (no gather / scatter), and the
  whole step (embedding to logits) replays as one CUDA graph per batch bucket (1, 2, 4, ..., 256, up to
  max_slots); rows past the batch are padding (slot -1). Inputs go through pinned host buffers copied
  `non_blocking`; a token tensor already on the device (the sampler's output) is copied device-to-device.

`make_runner(model, max_slots, device)` returns this runner on CUDA with the kernels present, else the
torch runner. Graphs are captured lazily at first use of a bucket / piece length; `warmup()` captures
them all up front (call it before serving). Memory: the pool (fp32 ssm state: n_layer*h*p*n*4 bytes
a slot, 168 MB for mamba2-2.7b; half that in bf16) plus MAX_FORKS spare slots for the forked rows (with the
batched graphs) and one scratch slot (fp32 ssm) for the prefill graphs, and the graphs' activations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from server.model.defaults import to_device
from server.model.gpu_graphs import DecodeGraphs, InputStager, buckets_for
from server.model.gpu_layers import ConvPrefill, Mamba1Gpu, Mamba2Gpu, SsmStep
from server.model.gpu_packed import PACKED_BUCKETS, PackedGraphs, PackedRows, packed_eager
from server.model.gpu_prefill import GRAPH_PREFILL_MAX, MAX_GRAPH_LEN, PrefillGraphs
from server.model.gpu_row_graphs import Bucket, RowGraphs, launch_tokens, replays_win
from server.model.kernels import Kernels, load_kernels
from server.model.layers import PaddedRows
from server.model.lm import MambaLM
from server.model.mamba1 import Mamba1Mixer
from server.model.mamba2 import Mamba2Mixer
from server.model.runner import Captures, ModelRunner, PrefillResult, PrefillSeg, _Piece

log = logging.getLogger(__name__)
# the captures inside a lone segment that its forked replay serves (one spare slot each): a follow-up holds one,
# or two when it resumes before the previous answer; 3 forks and the segment fill a 4-row bucket, as 2 would
MAX_FORKS = 3


class GpuModelRunner(ModelRunner):
    # A batched pass may hold as many padded tokens as real ones. An eager pass costs ~2 ms of host
    # launches a layer whatever its size, and the GPU idles under that until its work outgrows the
    # launches: below that, padding is free and each extra group costs a whole pass of launches; above,
    # padding costs GPU time, at most 2x here (the torch path's 1.25 is for a compute-bound CPU).
    pad_waste = 2.0
    graph_row_min = MAX_GRAPH_LEN  # prefill pieces this long run alone, as graph pieces (`_group`)
    # Triton specialises an integer argument on == 1 and on divisibility by 16: widths that are multiples of
    # 16 make the sequence length and every stride that holds it one case, which `warm_batched` compiles
    width_grain = 16
    warm_tokens = 16_384  # the largest batched pass `warm_batched` runs (rows x width)

    def __init__(
        self,
        model: MambaLM,
        max_slots: int,
        device: str | torch.device | None = None,
        *,
        kernels: Kernels | None = None,
        use_graphs: bool = True,
        prefill_graphs: bool = True,
        batch_graphs: bool = True,
        ssm_step: SsmStep = "tssc",
        conv_prefill: ConvPrefill = "triton",
        state_dtype: torch.dtype = torch.float32,
        packed_prefill: bool = False,
    ) -> None:
        packed_prefill = packed_prefill and model.cfg.arch == "mamba2"  # Mamba1 keeps the padded paths
        forks = use_graphs and prefill_graphs and batch_graphs  # a forked row's state goes to a spare slot
        # the packed pass writes the states of its padding sequences to spare slot 0
        spare = MAX_FORKS if forks else 1 if packed_prefill else 0
        super().__init__(model, max_slots, device, state_dtype=state_dtype, spare_slots=spare)
        self.kernels = kernels or load_kernels()
        if not self.kernels.gpu_ready:
            raise RuntimeError(f"GPU kernels unavailable: {self.kernels.summary()}")
        from server.model import gpu_ops

        self.ops: ModuleType = gpu_ops
        self.layers = [self._wrap(b.mixer, ssm_step, conv_prefill) for b in model.blocks()]
        self.packed_layers = self._packed_layers(conv_prefill) if packed_prefill else None
        self.norms = [b.norm for b in model.blocks()]
        self.stager = InputStager(max(buckets_for(max_slots)), self.device)
        graphs_ok = use_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(self._step, self.stager, max_slots) if graphs_ok else None
        self.prefill_graphs = self._prefill_graphs() if graphs_ok and prefill_graphs else None
        ok = graphs_ok and prefill_graphs and batch_graphs
        self.row_graphs = RowGraphs(self._rows_pass, max_slots, self.device) if ok else None
        # a batched pass replays graphs when `replays_win` (their buckets against the eager pass's tokens)
        self.hidden_tokens = launch_tokens(sum(p.numel() for p in model.blocks()[0].parameters()))
        packed_graphs = graphs_ok and self.packed_layers is not None
        self.packed_graphs = (
            PackedGraphs(self._packed_pass, max_slots, self.pool.slots, self.device)
            if packed_graphs
            else None
        )

    def _packed_layers(self, conv: ConvPrefill) -> list[Mamba2Gpu] | None:
        """The (Mamba2) layers, where the kernels can run a packed pass (mamba-ssm's chunked scan stages, our
        Triton conv); else None (logged): such a runner prefills fresh rows on the padded paths."""
        if self.kernels.ssd_parts is not None and conv == "triton":
            return [layer for layer in self.layers if isinstance(layer, Mamba2Gpu)]
        log.warning("packed prefill needs mamba-ssm's chunked scan stages and the Triton conv")
        return None

    def _prefill_graphs(self) -> PrefillGraphs:
        pool = self.pool
        conv = torch.zeros_like(pool.conv[:, :1])  # (n_layer, 1, c, k-1) scratch
        ssm = torch.zeros_like(pool.ssm[:, :1], dtype=torch.float32)  # (n_layer, 1, ...) fp32 scratch
        return PrefillGraphs(self._piece, conv, ssm, self.config.d_model, self.dtype)

    def _wrap(
        self, mixer: Mamba2Mixer | Mamba1Mixer, ssm_step: SsmStep, conv: ConvPrefill
    ) -> Mamba2Gpu | Mamba1Gpu:
        if isinstance(mixer, Mamba2Mixer):
            return Mamba2Gpu(mixer, self.kernels, self.ops, ssm_step, conv)
        return Mamba1Gpu(mixer, self.kernels, self.ops, conv)

    # ---- shared pieces ---------------------------------------------------------------------------

    def _add_norm(self, i: int, out: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """residual += out; return (rmsnorm_i(residual) in the model dtype, residual)."""
        norm = self.norms[i]
        fn = self.kernels.add_rmsnorm
        assert fn is not None
        normed, res = fn(
            out, norm.weight, None, residual=residual, eps=norm.eps, prenorm=True,
            residual_in_fp32=self.config.residual_in_fp32,
        )  # fmt: skip
        return normed, out if res is None else res

    def _final_norm(self, out: Tensor, residual: Tensor) -> Tensor:
        """Final add + norm_f -> hidden (..., d) in the model dtype."""
        norm = self.model.backbone.norm_f
        fn = self.kernels.add_rmsnorm
        assert fn is not None
        normed: Tensor = fn(
            out, norm.weight, None, residual=residual, eps=norm.eps, prenorm=False,
            residual_in_fp32=self.config.residual_in_fp32,
        )  # fmt: skip
        return normed

    def _logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., d) -> fp32 logits over the padded vocab."""
        logits: Tensor = self.model.lm_head(hidden).float()
        return logits

    def _embed(self, ids: Tensor) -> Tensor:
        emb: Tensor = self.model.backbone.embedding(ids)
        return emb

    # ---- prefill ---------------------------------------------------------------------------------

    def _run_layers(self, ids: Tensor, conv: Tensor, ssm: Tensor) -> tuple[Tensor, Tensor]:
        """ids (1, l); conv (n_layer, 1, c, k-1) and ssm (n_layer, 1, ...) fp32 continued in place
        -> (last mixer output, residual), both (1, l, d)."""
        out, residual = self._embed(ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = self._add_norm(i, out, residual)
            out, new_conv, new_ssm = layer.prefill(hidden, conv[i], ssm[i])
            conv[i].copy_(new_conv)
            ssm[i].copy_(new_ssm)
        assert residual is not None
        return out, residual

    def _piece(self, ids: Tensor, length: Tensor, conv: Tensor, ssm: Tensor) -> Tensor:
        """What a prefill graph runs: ids (1, L) whose first `length` ((1,) on the device) are real, from the
        state in conv / ssm (n_layer, 1, ...), continued in place to the state after them -> the last real
        token's final hidden (1, d). The batched pass's padded layers, on one row."""
        rows = PaddedRows.at_ends(length, ids.shape[1])
        out, residual = self._embed(ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = self._add_norm(i, out, residual)
            out, new_conv, new_ssm = layer.prefill_rows(hidden, conv[i], ssm[i], rows)
            conv[i].copy_(new_conv)
            ssm[i].copy_(new_ssm)
        assert residual is not None
        last = length - 1  # (1,)
        return self._final_norm(out[0, last], residual[0, last])

    def _prefill_segment(self, ids: Tensor, slot: int, all_logits: bool) -> Tensor:
        """ids (1, l) from the slot's state; updates the slot; logits (l or 1, v) fp32."""
        conv, ssm = self.pool.conv[:, slot : slot + 1], self.pool.ssm[:, slot : slot + 1]
        graphs = self.prefill_graphs
        if graphs is not None and not all_logits and ids.shape[1] <= GRAPH_PREFILL_MAX:
            return self._logits(graphs.run_on(ids, conv, ssm))
        out, residual = self._run_layers(ids, conv, ssm)
        if not all_logits:
            out, residual = out[:, -1:], residual[:, -1:]
        return self._logits(self._final_norm(out, residual))[0]

    # ---- batched prefill --------------------------------------------------------------------------

    def _capture_grain(self) -> int:
        """Mamba2's chunk size where mamba-ssm's scan stages are importable (their fp32 chunk states
        are the captures); else 0 (the public scan rounds chunk states to bf16: every capture splits)."""
        return super()._capture_grain() if self.kernels.ssd_parts is not None else 0

    def _group(self, pieces: Sequence[_Piece]) -> list[list[_Piece]]:
        """Pieces of at least `graph_row_min` tokens run alone, as graph pieces; the rest batch. An eager
        pass costs ~2 ms of launches per layer whatever its size, while a 1024-token graph piece keeps the
        GPU busy for about as long (mamba2-2.7b, 16.5 ms on an H100): so long rows, which are what a step
        with prompts arriving holds, no longer wait on the host, and short ones still share one pass."""
        if self.prefill_graphs is None:
            return super()._group(pieces)
        solo = lambda pc: self.graph_row_min <= pc.length <= GRAPH_PREFILL_MAX
        return [*([pc] for pc in pieces if solo(pc)), *super()._group([pc for pc in pieces if not solo(pc)])]

    def _prefill_rows(
        self, ids: Tensor, lengths: Sequence[int], slots: Sequence[int], taps: Sequence[Sequence[int]]
    ) -> tuple[Tensor, list[Captures]]:
        """The base class's hook (contract there): one row on the single-row path (graph pieces); several
        short ones captured at their ends at most as replays of batched graphs (`gpu_row_graphs`: the rows
        longest first, in parts of a bucket each); others in one eager padded pass."""
        if len(lengths) == 1 and self.prefill_graphs is not None and lengths[0] <= GRAPH_PREFILL_MAX:
            return self._prefill_one(ids, lengths[0], slots[0], taps[0])
        ends_only = all(set(tp) <= {n} for tp, n in zip(taps, lengths, strict=True))
        ranked = sorted(range(len(lengths)), key=lambda r: -lengths[r])
        parts = self.row_graphs.parts([lengths[r] for r in ranked]) if self.row_graphs and ends_only else None
        graph_tokens = sum(b * w for _, (b, w) in parts) if parts else 0
        if parts is None or not replays_win(graph_tokens, ids.numel(), self.hidden_tokens):
            return self._prefill_padded(ids, lengths, slots, taps)
        assert self.row_graphs is not None
        # one asynchronous copy of the rows' order: a `torch.tensor(..., device=cuda)` per part would wait
        # for the GPU before each replay after the first
        order = self._to_device(ranked)
        done, outs = 0, []
        for count, bucket in parts:
            rows = ranked[done : done + count]
            part_ids = ids[order[done : done + count], : bucket[1]]
            outs.append(
                self.row_graphs.run(part_ids, [lengths[r] for r in rows], [slots[r] for r in rows], bucket)
            )
            done += count
        inverse = order.argsort()
        caps = [{n: self.pool.read(s)} if tp else {} for n, s, tp in zip(lengths, slots, taps, strict=True)]
        return torch.cat(outs)[inverse], caps

    @torch.inference_mode()
    def prefill_batch(self, segs: Sequence[PrefillSeg]) -> list[PrefillResult]:
        """The base class's (contract there); a lone short segment with captures inside it runs as one replay
        with a forked row per capture (`_prefill_forked`) instead of passes split at the captures; with
        packed prefill, fresh segments run as one packed pass (`_prefill_packed`) and the others as before."""
        self._check_segs(segs)
        fork = self._fork_point(segs)
        if fork is not None:
            return [self._prefill_forked(segs[0], *fork)]
        packed = self._packable(segs)
        if not packed:
            return super().prefill_batch(segs)
        out = dict(zip(packed, self._prefill_packed([segs[i] for i in packed]), strict=True))
        rest = [i for i in range(len(segs)) if i not in out]
        if rest:
            out.update(zip(rest, super().prefill_batch([segs[i] for i in rest]), strict=True))
        return [out[i] for i in range(len(segs))]

    def _packable(self, segs: Sequence[PrefillSeg]) -> list[int]:
        """The segments a packed pass takes: fresh ones captured at their ends at most, in order while they fit
        its largest bucket; none unless two or more (a lone row has the single-row graph pieces)."""
        if self.packed_layers is None:
            return []
        chosen: list[int] = []
        total = 0
        for i, seg in enumerate(segs):
            n = len(seg.tokens)
            if seg.fresh and set(seg.capture_at) <= {n} and total + n <= max(PACKED_BUCKETS):
                chosen.append(i)
                total += n
        return chosen if len(chosen) >= 2 else []

    def _prefill_packed(self, segs: Sequence[PrefillSeg]) -> list[PrefillResult]:
        """Fresh segments packed back to back into one pass (`gpu_packed`): a replay of its token bucket's
        graph, or one eager pass without graphs; a segment's end capture is its slot's live state after it
        (views: the worker copies them once the step's tokens are on their way to the host)."""
        tokens, slots = [seg.tokens for seg in segs], [seg.slot for seg in segs]
        if self.packed_graphs is not None:
            logits = self.packed_graphs.run(tokens, slots)
        else:
            logits = packed_eager(self._packed_pass, tokens, slots, self.pool.slots, self.device)
        ends = [len(seg.tokens) if len(seg.tokens) in seg.capture_at else None for seg in segs]
        return [  # a row's end capture is its slot's live state, not a copy (`PrefillResult.live`)
            PrefillResult(logits[r, : self.vocab], None, {end: self.pool.views(seg.slot)}, (end,))
            if end is not None
            else PrefillResult(logits[r, : self.vocab])
            for r, (seg, end) in enumerate(zip(segs, ends, strict=True))
        ]

    def _packed_pass(self, ids: Tensor, rows: PackedRows) -> Tensor:
        """What a packed graph runs: ids (T,) of the sequences laid out in `rows`, all on the device -> logits
        (rows, v_padded) fp32 at each real row's last token; every sequence leaves its final state in its slot."""
        assert self.packed_layers is not None
        pool = self.pool
        out, residual = self._embed(ids[None]), None  # (1, T, d)
        for i, layer in enumerate(self.packed_layers):
            hidden, residual = self._add_norm(i, out, residual)
            out = layer.prefill_packed(hidden, pool.conv[i], pool.ssm[i], rows, pool.slots)
        assert residual is not None
        last = rows.last
        return self._logits(self._final_norm(out[0, last], residual[0, last]))

    def _fork_point(self, segs: Sequence[PrefillSeg]) -> tuple[list[int], Bucket] | None:
        """(the capture positions before the end, descending; the bucket of their rows and the segment's) when
        `segs` is one segment of at most a row bucket's width with 1 to MAX_FORKS captures before its end: a
        chat follow-up, captured at the user message's end, a few tokens before the generation prompt's (and
        at the previous answer's end when it resumes before it). Split there, it costs a replay of the whole
        model per piece (a 128-token piece is ~9 ms of GPU work on mamba2-2.7b, mostly small kernels' fixed
        latency, and the 3-token rest a 16-token piece); forked, one replay of a 2 or 4 x 128 bucket (2 x 128:
        ~10.5 ms). Else None."""
        if len(segs) != 1 or self.row_graphs is None:
            return None
        n = len(segs[0].tokens)
        inside = sorted({p for p in segs[0].capture_at if p < n}, reverse=True)
        if not 1 <= len(inside) <= MAX_FORKS:
            return None
        parts = self.row_graphs.parts([n, *inside])
        return (inside, parts[0][1]) if parts is not None and len(parts) == 1 else None

    def _prefill_forked(self, seg: PrefillSeg, ats: Sequence[int], bucket: Bucket) -> PrefillResult:
        """The segment and, per position in `ats`, its first tokens up to there, as rows of one batched replay,
        all from the slot's state: fork i runs on the pool's spare slot i (a copy of the slot's state first),
        whose state after it is the capture at ats[i]; the segment's row continues the slot as one unsplit pass
        would."""
        pool, n = self.pool, len(seg.tokens)
        assert self.row_graphs is not None
        forks = [pool.spare_views(i) for i in range(len(ats))]
        for name, view in pool.views(seg.slot).items():
            for fork in forks:
                fork[name].copy_(view)
        ids = self._padded_ids([seg.tokens, *(seg.tokens[:at] for at in ats)])  # (1 + forks, w)
        spares = [pool.slots + i for i in range(len(ats))]  # spare slot i is the pool's row `slots + i`
        logits = self.row_graphs.run(ids, [n, *ats], [seg.slot, *spares], bucket)
        caps: Captures = {
            at: {name: view.clone() for name, view in fork.items()}
            for at, fork in zip(ats, forks, strict=True)
        }
        if n in seg.capture_at:
            caps[n] = pool.read(seg.slot)
        return PrefillResult(last_logits=logits[0, : self.vocab], captures=caps)

    def _rows_pass(self, ids: Tensor, lengths: Tensor, slots: Tensor) -> Tensor:
        """What a batched prefill graph runs: rows ids (B, W), their real lengths (B,) and slots (B,), all on
        the device; each row continues its slot's state and leaves there its state after its real tokens
        (a length-0 row leaves it as it was) -> logits (B, v_padded) fp32 at each row's last real token."""
        pool, b = self.pool, ids.shape[0]
        rows = PaddedRows.at_ends(lengths, ids.shape[1])
        out, residual = self._embed(ids), None  # (B, W, d)
        for i, layer in enumerate(self.layers):
            hidden, residual = self._add_norm(i, out, residual)
            out, _, _ = layer.prefill_slots(hidden, pool.conv[i], pool.ssm[i], slots, rows)
        assert residual is not None
        last = (torch.arange(b, device=ids.device), (lengths - 1).clamp(min=0))
        return self._logits(self._final_norm(out[last], residual[last]))

    def _prefill_one(
        self, ids: Tensor, length: int, slot: int, taps: Sequence[int]
    ) -> tuple[Tensor, list[Captures]]:
        """ids (1, length) as graph pieces, split at the taps (exact: the handoff invariant)."""
        caps: Captures = {}
        start, logits = 0, torch.empty(0)
        for end in sorted({*taps, length}):
            logits = self._prefill_segment(ids[:, start:end], slot, False)  # (1, v_padded)
            if end in taps:
                caps[end] = self.pool.read(slot)
            start = end
        return logits, [caps]

    def _prefill_padded(
        self, ids: Tensor, lengths: Sequence[int], slots: Sequence[int], taps: Sequence[Sequence[int]]
    ) -> tuple[Tensor, list[Captures]]:
        """One eager pass over right-padded rows ids (b, l); see `ModelRunner._prefill_rows`."""
        b, pool = len(lengths), self.pool
        slot_t = torch.tensor(list(slots), dtype=torch.long, device=self.device)  # (b,)
        points = [*enumerate(lengths), *((r, p) for r, ps in enumerate(taps) for p in ps)]
        rows = PaddedRows.build(lengths, ids.shape[1], points, self.device)  # row ends first, then taps
        out, residual = self._embed(ids), None  # (b, l, d)
        t = len(points) - b
        # the taps' states as slot states, stacked (t, n_layer, ...): the cache encodes them in one launch
        tap_conv = pool.conv.new_empty((t, *pool.conv[:, 0].shape)) if t else None
        tap_ssm = pool.ssm.new_empty((t, *pool.ssm[:, 0].shape)) if t else None
        for i, layer in enumerate(self.layers):
            hidden, residual = self._add_norm(i, out, residual)
            out, conv, ssm = layer.prefill_slots(hidden, pool.conv[i], pool.ssm[i], slot_t, rows)
            if tap_conv is not None and tap_ssm is not None:
                tap_conv[:, i] = conv
                tap_ssm[:, i] = ssm
        assert residual is not None
        last = (torch.arange(b, device=self.device), rows.lengths - 1)
        logits = self._logits(self._final_norm(out[last], residual[last]))  # (b, v_padded)
        caps: list[Captures] = [{} for _ in range(b)]
        if tap_conv is not None and tap_ssm is not None:
            for (r, p), c, s in zip(points[b:], tap_conv, tap_ssm, strict=True):
                caps[r][p] = {"conv": c, "ssm": s}
        return logits, caps

    def _token_ids(self, tokens: Sequence[int]) -> Tensor:
        return self._to_device(tokens)[None]  # (1, l)

    def _to_device(self, values: Sequence[int]) -> Tensor:
        """Integers as a (n,) long device tensor, through pinned memory on CUDA: a non-blocking copy."""
        return to_device(torch.as_tensor(list(values), dtype=torch.long), self.device)

    @property
    def computes_async(self) -> bool:
        return self.device.type == "cuda"

    # ---- decode ----------------------------------------------------------------------------------

    def _step(self, tokens: Tensor, idx: Tensor) -> Tensor:
        """tokens (b,) int64, idx (b,) int32 slot per row (-1 = padding) -> logits (b, v_padded) fp32."""
        out, residual = self._embed(tokens), None
        for i, layer in enumerate(self.layers):
            hidden, residual = self._add_norm(i, out, residual)
            out = layer.step(hidden, self.pool.conv[i], self.pool.ssm[i], idx)
        assert residual is not None
        return self._logits(self._final_norm(out, residual))

    @torch.inference_mode()
    def decode(
        self, tokens: Sequence[int] | Tensor, slots: Sequence[int] | Tensor, skip: Tensor | None = None
    ) -> Tensor:
        """One token for each slot; slot -1 is padding, and so is a row whose token is in `skip` (device
        token ids, masked on the device). Returns logits (b, v) fp32 (a padding row's: meaningless).

        `tokens` may be a device tensor (no host round trip); `slots` are checked on the host."""
        slot_list = slots.tolist() if isinstance(slots, Tensor) else [int(s) for s in slots]
        count = len(slot_list) if isinstance(tokens, Tensor) else len(tokens)
        if count != len(slot_list) or (isinstance(tokens, Tensor) and tokens.dim() != 1):
            raise ValueError("tokens and slots must be 1-D and of equal length")
        self._live_slots(slot_list)
        if count == 0:
            return torch.zeros(0, self.vocab, device=self.device)
        if count > self.stager.capacity:
            return torch.cat(
                [self.decode(tokens[i : i + 256], slot_list[i : i + 256], skip) for i in range(0, count, 256)]
            )
        if self.graphs is not None:
            logits = self.graphs.run(tokens, slot_list, skip)
        else:
            bucket = count
            tok, idx = self.stager.stage(tokens, slot_list, bucket)
            if skip is not None:
                self.stager.skip(count, skip)
            logits = self._step(tok, idx)
        return logits[:count, : self.vocab].clone()

    def warmup(self, batch_sizes: Sequence[int] | None = None, prefill: bool = True) -> None:
        """Capture the decode graphs (and the prefill graphs) now, else each is captured at first use; with
        `prefill`, also compile the batched pass's kernels (`warm_batched`) and capture the batched graphs."""
        if self.graphs is not None:
            self.graphs.capture_all(batch_sizes)
        if prefill and self.prefill_graphs is not None:
            self.prefill_graphs.capture_all()
        if prefill:
            self.warm_batched()
        if prefill and self.row_graphs is not None:  # after warm_batched: the kernels are compiled
            self.row_graphs.capture_all()
        if prefill and self.packed_graphs is not None:  # each bucket warmed up before its capture
            self.packed_graphs.capture_all()

    @torch.inference_mode()
    def warm_batched(self) -> None:
        """Run the batched eager pass once per Triton specialisation that serving meets, so that no request
        waits on a compile (50-500 ms each: under 64 streams on the 130m shape a fifth of the model
        thread went to them, `bench/serve_profile.py`). Widths being multiples of 16, the kernels'
        integer arguments vary in two ways only: the row count and the chunk count, each 1, a multiple
        of 16, or neither. Each (rows, chunks) pair up to `warm_tokens` runs once, on slots 0.. (reset
        after), with a chunk-aligned capture where the pass has one."""
        chunk = self.config.chunk_size
        grain = self._capture_grain()
        for b in (1, 2, 16):
            for chunks in (1, 2, 16):
                width = -(-chunks * chunk // self.width_grain) * self.width_grain  # that many chunks
                if b > self.max_slots or b * width > self.warm_tokens:
                    continue
                lengths = [width - (r % 2) * self.width_grain // 2 for r in range(b)]  # some rows padded
                # every row's end; row 0 also at its first chunk boundary, where the pass holds one
                taps = [[grain, n] if r == 0 and 0 < grain < n else [n] for r, n in enumerate(lengths)]
                ids = torch.randint(0, self.vocab, (b, width), device=self.device)
                self._prefill_padded(ids, lengths, list(range(b)), taps)
        for slot in range(min(16, self.max_slots)):
            self.reset(slot)


def make_runner(
    model: MambaLM,
    max_slots: int,
    device: str | torch.device | None = None,
    *,
    state_dtype: torch.dtype = torch.float32,
    batch_graphs: bool = True,
    packed_prefill: bool = False,
) -> ModelRunner:
    """The GPU runner on CUDA with the kernels importable, else the torch runner (same interface);
    `batch_graphs`: short rows' batched prefill passes replay CUDA graphs (`gpu_row_graphs`); `packed_prefill`:
    fresh rows' passes run packed (`gpu_packed`)."""
    dev = torch.device(device) if device is not None else model.backbone.embedding.weight.device
    if dev.type == "cuda":
        kernels = load_kernels()
        if kernels.gpu_ready:
            return GpuModelRunner(
                model, max_slots, dev, kernels=kernels, state_dtype=state_dtype, batch_graphs=batch_graphs,
                packed_prefill=packed_prefill,
            )  # fmt: skip
        log.warning("CUDA without the GPU kernels (%s): using the torch path", kernels.summary())
    return ModelRunner(model, max_slots, dev, state_dtype=state_dtype)
