"""The model side of an engine step; runs on the engine's single worker thread.

`ModelWorker` owns every tensor operation and every cache call of the engine:

- `admit(seqs)`: per newly admitted request, look up the deepest checkpoint of its session that is
  a prefix of `prompt[:-1]` (at least one prompt token is always prefilled: its logits give the first
  sampled token), fetch it straight into the request's live slot (decoded into the pool's views; the
  slot is zeroed on a miss or a failed fetch), release the lease, and plan the capture positions of the
  remaining prefill.
- `execute(plan)`: prefill the planned chunks (capturing at the planned positions), decode one token
  for every decoding request in one batch, sample all rows at once, apply the stop rules and
  capture the final state of each finished request.

The event loop never touches tensors and this worker never touches the scheduler: results go back
as plain values (`Admitted`, `StepResult`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cache.base import CheckpointCache
from server.engine.request import Seq
from server.engine.sampler import (
    SampleOutput,
    Sampler,
    SamplingBatch,
    TokenCounts,
    has_penalty,
    penalised_rows,
    to_device,
)
from server.engine.scheduler import StepPlan
from server.engine.types import TokenEvent, TopLogprob
from server.model.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    events: list[tuple[Seq, TokenEvent]] = field(default_factory=list)
    prefilled: list[tuple[Seq, int]] = field(default_factory=list)  # (seq, prompt tokens advanced)
    errors: list[tuple[Seq, BaseException]] = field(default_factory=list)


class ModelWorker:
    def __init__(
        self, runner: ModelRunner, cache: CheckpointCache | None, vocab_limit: int | None = None
    ) -> None:
        self.runner = runner
        self.cache = cache
        self.device = runner.device
        self.sampler = Sampler()
        self.counts = TokenCounts(runner.max_slots, runner.vocab, runner.device)
        self.vocab_limit = min(vocab_limit or runner.vocab, runner.vocab)

    # ---- admission ---------------------------------------------------------------------------

    def admit(self, seqs: Sequence[Seq]) -> list[int]:
        """Restore each request's slot; return the prompt tokens served from a checkpoint."""
        return [self._admit_one(seq) for seq in seqs]

    def _admit_one(self, seq: Seq) -> int:
        req, slot = seq.req, seq.slot
        cached = self._restore(seq) if self.cache is not None else 0
        if cached == 0:
            self.runner.reset(slot)
        if req.params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(req.params.seed)
        if has_penalty(req.params):
            self.counts.reset(slot, req.prompt_tokens)
        if self.cache is not None:
            end = len(req.prompt_tokens)
            seq.capture_plan = tuple(self.cache.capture_positions(cached, end, req.boundaries))
        return cached

    def _restore(self, seq: Seq) -> int:
        """Deepest checkpoint decoded straight into the slot's views; 0 on a miss or a failed fetch. On 0 the
        caller resets the slot, which also clears a fetch that failed after writing part of it."""
        assert self.cache is not None
        req = seq.req
        try:
            lease = self.cache.lookup(req.namespace, req.session_id, req.prompt_tokens[:-1])
        except Exception:
            log.exception("cache lookup failed", extra={"request_id": req.request_id})
            return 0
        if lease is None:
            return 0
        try:
            self.cache.fetch(lease, out=self.runner.slot_state(seq.slot))
            return lease.position
        except Exception:
            log.warning("checkpoint fetch failed; prefilling from scratch", exc_info=True)
            return 0
        finally:
            self.cache.release(lease)

    # ---- one step ----------------------------------------------------------------------------

    def execute(self, plan: StepPlan, seq_of: dict[str, Seq]) -> StepResult:
        result = StepResult()
        rows: list[Seq] = []
        logits: list[Tensor] = []
        for chunk in plan.prefills:
            seq = seq_of[chunk.entry.request_id]
            try:
                last = self._prefill(seq, chunk.start, chunk.end)
            except Exception as exc:
                log.exception("prefill failed", extra={"request_id": seq.request_id})
                result.errors.append((seq, exc))
                continue
            result.prefilled.append((seq, chunk.end - chunk.start))
            if last is not None:
                rows.append(seq)
                logits.append(last.unsqueeze(0))
        decodes = [seq_of[e.request_id] for e in plan.decodes]
        try:
            if decodes:
                slots = [s.slot for s in decodes]
                logits.append(self.runner.decode([s.output[-1] for s in decodes], slots))
                rows.extend(decodes)
            if rows:
                self._sample_and_finish(rows, torch.cat(logits), result)
        except Exception as exc:
            log.exception("decode step failed")
            result.errors.extend((s, exc) for s in rows if not any(s is e for e, _ in result.errors))
        return result

    def _prefill(self, seq: Seq, start: int, end: int) -> Tensor | None:
        """Prefill prompt[start:end]; the last logits (v,) when this chunk ends the prompt."""
        prompt = seq.req.prompt_tokens
        caps = [p - start for p in seq.capture_plan if start < p <= end]
        res = self.runner.prefill(prompt[start:end], seq.slot, capture_at=caps)
        for rel, state in sorted(res.captures.items()):
            pos = start + rel
            reason = (
                "prompt" if pos == len(prompt) else "boundary" if pos in seq.req.boundaries else "interval"
            )
            self._capture(seq, prompt[:pos], state, reason)
        return res.last_logits if end == len(prompt) else None

    def _capture(self, seq: Seq, tokens: Sequence[int], state: dict[str, Tensor], reason: str) -> None:
        if self.cache is None:
            return
        req = seq.req
        try:
            self.cache.capture(req.namespace, req.session_id, tokens, state, reason=reason)
        except Exception:
            log.exception("checkpoint capture failed", extra={"request_id": req.request_id})

    def _sample_and_finish(self, rows: list[Seq], logits: Tensor, result: StepResult) -> None:
        """logits (b, v): sample one token per row, apply the stop rules, capture finished rows."""
        if self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")
        params = [s.req.params for s in rows]
        batch = SamplingBatch.build(params, [s.generator for s in rows], self.device)
        slots = to_device(torch.tensor([s.slot for s in rows], dtype=torch.long), self.device)
        counts = prompt = None
        if batch.use_penalties:
            counts, prompt = self.counts.rows(slots)
        out = self.sampler.sample(logits, batch, counts, prompt)
        if batch.use_penalties:  # a 0/1 weight per row, on the device: no host-side row selection
            self.counts.add(slots, out.tokens, weights=penalised_rows(batch))
        tokens = out.tokens.tolist()  # the step's one host sync
        logprobs = _host_logprobs(out, len(rows))
        now = time.monotonic()
        for seq, token, (logprob, top) in zip(rows, tokens, logprobs, strict=True):
            p = seq.req.params
            event = seq.append(token, now, logprob if p.logprobs else None, top[: p.top_logprobs])
            result.events.append((seq, event))
            if seq.finish_reason is not None and len(seq.output) > 1 and not seq.aborted:
                self._capture(seq, seq.state_tokens(), self.runner.capture(seq.slot), "finish")


def _host_logprobs(out: SampleOutput, rows: int) -> list[tuple[float | None, tuple[TopLogprob, ...]]]:
    """Per row: (logprob of the chosen token, its top alternatives), copied to the host at once."""
    if out.logprobs is None:
        return [(None, ())] * rows
    chosen = out.logprobs.tolist()
    if out.top_ids is None or out.top_logprobs is None:
        return [(lp, ()) for lp in chosen]
    ids, vals = out.top_ids.tolist(), out.top_logprobs.tolist()
    return [
        (lp, tuple(TopLogprob(int(t), float(v)) for t, v in zip(i, x, strict=True)))
        for lp, i, x in zip(chosen, ids, vals, strict=True)
    ]
