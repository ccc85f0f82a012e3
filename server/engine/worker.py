"""The model side of an engine step; runs on the engine's single worker thread.

`ModelWorker` owns every tensor operation and every cache call of the engine:

- `admit(seqs)`: per newly admitted request, look up the deepest checkpoint of its session that is
  a prefix of `prompt[:-1]` (at least one prompt token is always prefilled: its logits give the first
  sampled token), fetch it straight into the request's live slot (decoded into the pool's views; the
  slot is zeroed on a miss or a failed fetch), release the lease, and plan the capture positions of the
  remaining prefill. A hybrid model's slot also gets the checkpoint's attention KV (`runner.kv_sink`), and
  every capture of a hybrid reads its KV prefix from the slot (`runner.kv_source`).
- `execute(plan)`: prefill the planned chunks (capturing at the planned positions), decode one token
  for every decoding request in one batch, sample all rows at once, apply the stop rules and
  capture the final state of each finished request. With decode ahead (`server.engine.ahead`; on by
  default where the runner computes asynchronously, CUDA), the next step's decode of the sampled rows is
  launched before their tokens are copied to the host, and the next `execute` takes its logits.
- `settle_captures(carry)`: once a step's tokens went out, store its captures, or hold them for the next
  `execute` to store while its device work runs.

The event loop never touches tensors and this worker never touches the scheduler: results go back
as plain values (`Admitted`, `StepResult`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from cache.base import Capture, CheckpointCache
from server.engine.ahead import Ahead, DecodeAhead
from server.engine.prompt_logprobs import chunk_logprobs
from server.engine.request import Seq
from server.engine.sampler import (
    SampleOutput,
    Sampler,
    SamplingBatch,
    TokenCounts,
    has_penalty,
    penalised_rows,
)
from server.engine.scheduler import StepPlan
from server.engine.types import TokenEvent, TopLogprob
from server.model.defaults import to_device
from server.model.runner import ModelRunner, PrefillSeg

log = logging.getLogger(__name__)
Sampled = tuple[int, float | None, tuple[TopLogprob, ...]]  # (token, its logprob, top alternatives)


@dataclass
class StepResult:
    events: list[tuple[Seq, TokenEvent]] = field(default_factory=list)
    prefilled: list[tuple[Seq, int]] = field(default_factory=list)  # (seq, prompt tokens advanced)
    errors: list[tuple[Seq, BaseException]] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)  # where the step went, ms (`StepClock`; debug only)


class StepClock:
    """Where one step's time goes on the worker, for the engine's debug line: host milliseconds between
    `lap`s, and on CUDA the device's span from the step's first launch to its sampling (events; read once
    the step's one sync has passed). A launch-bound step shows its time in the laps that launch (the
    prefill), a device-bound one in the wait for the sampled tokens."""

    def __init__(self, cuda: bool) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()
        self._events = (
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        )
        self._ended = False
        if self._events is not None:
            self._events[0].record()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self._t) * 1e3
        self._t = now

    def device_done(self) -> None:
        """Mark the end of the step's device work (after sampling is launched)."""
        if self._events is not None:
            self._events[1].record()
            self._ended = True

    def read(self) -> dict[str, float]:
        """The laps, and 'device' where measured (call after the step's sync)."""
        if self._events is not None and self._ended and self._events[1].query():
            self.ms["device"] = self._events[0].elapsed_time(self._events[1])
        return self.ms


class ModelWorker:
    def __init__(
        self,
        runner: ModelRunner,
        cache: CheckpointCache | None,
        vocab_limit: int | None = None,
        *,
        decode_ahead: bool | None = None,
    ) -> None:
        """`decode_ahead`: launch each step's next decode before its tokens reach the host (None: where
        the runner computes asynchronously)."""
        self.runner = runner
        self.cache = cache
        self.device = runner.device
        self.sampler = Sampler()
        self.counts = TokenCounts(runner.max_slots, runner.vocab, runner.device)
        self.vocab_limit = min(vocab_limit or runner.vocab, runner.vocab)
        ahead = runner.computes_async if decode_ahead is None else decode_ahead
        self.ahead = DecodeAhead(runner) if ahead else None
        self._ahead: Ahead | None = None  # the decode step launched by the last `execute`, if any
        self._batch: tuple[tuple[Seq, ...], SamplingBatch] | None = None  # `_sampling_batch`'s last, by rows
        self._pending: list[_Pending] = []  # the step's captures (`_capture`)
        self._carried: list[_Pending] = []  # the last step's, held for this one (`settle_captures`)
        self._clock: StepClock | None = None  # the running step's, when the debug log is on

    # ---- admission ---------------------------------------------------------------------------

    def admit(self, seqs: Sequence[Seq]) -> list[int | BaseException]:
        """Restore each request's slot; per request, the prompt tokens served from a checkpoint, or the
        exception that failed that request alone (the others are admitted all the same)."""
        if self._pending or self._may_serve(seqs):
            self.flush_captures()  # a deferred capture reads its slot before a restore may write it
        out: list[int | BaseException] = []
        for seq in seqs:
            try:
                out.append(self._admit_one(seq))
            except Exception as exc:
                log.exception("admission failed", extra={"request_id": seq.request_id})
                out.append(exc)
        # the slots that start from the zero state, zeroed together (a miss, or a fetch that failed after
        # writing part of its slot)
        fresh = [i for i, n in enumerate(out) if n == 0]
        try:
            self.runner.reset_many([seqs[i].slot for i in fresh])
        except Exception as exc:
            log.exception("resetting the admitted slots failed")
            for i in fresh:
                out[i] = exc
        now = time.monotonic()
        for seq in seqs:
            seq.t_restored = now
        return out

    def _admit_one(self, seq: Seq) -> int:
        """Restore the request's slot from its deepest checkpoint and prepare its prefill; the prompt tokens
        restored (0: the caller zeroes the slot)."""
        req = seq.req
        # prompt logprobs need every position's logits: such a request is prefilled from the start
        restore = self.cache is not None and req.prompt_logprobs is None
        cached = self._restore(seq) if restore else 0
        if req.params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(req.params.seed)
        if has_penalty(req.params):
            self.counts.reset(seq.slot, req.prompt_tokens)
        if req.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # nothing precedes the first prompt token
        if self.cache is not None:
            end = len(req.prompt_tokens)
            seq.capture_plan = tuple(self.cache.capture_positions(cached, end, req.boundaries))
        return cached

    def _restore(self, seq: Seq) -> int:
        """Deepest checkpoint decoded straight into the slot's views; 0 on a miss or a failed fetch. On 0 the
        slot is reset (`admit`), which also clears a fetch that failed after writing part of it."""
        assert self.cache is not None
        req = seq.req
        try:
            lease = self.cache.lookup(req.namespace, req.session_id, req.prompt_tokens[:-1], tree=req.tree)
        except Exception:
            log.exception("cache lookup failed", extra={"request_id": req.request_id})
            return 0
        if lease is None:
            return 0
        try:
            # a hybrid's KV, emptied for the restore to append to; None for a pure SSM
            self.cache.fetch(lease, out=self.runner.slot_state(seq.slot), kv=self.runner.kv_sink(seq.slot))
            return lease.position
        except Exception:
            log.warning("checkpoint fetch failed; prefilling from scratch", exc_info=True)
            return 0
        finally:
            self.cache.release(lease)

    # ---- one step ----------------------------------------------------------------------------

    def execute(self, plan: StepPlan, seq_of: dict[str, Seq], *, defer_captures: bool = False) -> StepResult:
        """Run one step. A failure is confined to the rows it concerns: a prefill error fails that request,
        a sampling error is retried row by row so that only the failing row fails; only an error of the
        shared decode pass itself (the model failing) fails every decoding row.

        `defer_captures`: the step's captures stay queued for `flush_captures`, which the engine calls once it
        has delivered the step's tokens, so that a capture's host work (~4 ms for a 2.7b follow-up's on an
        H200's host) is not in the time to first token. The next `admit` or `execute` flushes what is still
        queued before anything else, so a capture always reads its slot before the slot is written again;
        captures held by `settle_captures` are stored once this step's device work is launched."""
        self._clock = StepClock(self.device.type == "cuda") if log.isEnabledFor(logging.DEBUG) else None
        self._flush_pending()
        self._lap("flush")
        try:
            result = self._execute(plan, seq_of)
            if self._clock is not None:
                result.times = self._clock.read()
            return result
        finally:
            self._clock = None
            self._store_carried()  # a step that sampled nothing, or failed
            if not defer_captures:
                self.flush_captures()

    def _lap(self, name: str) -> None:
        if self._clock is not None:
            self._clock.lap(name)

    @property
    def captures_pending(self) -> bool:
        """Whether captures wait for `flush_captures` (after an `execute` with `defer_captures`, or held by
        `settle_captures`)."""
        return bool(self._pending or self._carried)

    def _execute(self, plan: StepPlan, seq_of: dict[str, Seq]) -> StepResult:
        result = StepResult()
        rows: list[Seq] = []
        logits: list[Tensor] = []
        chunks = [(seq_of[c.entry.request_id], c.start, c.end) for c in plan.prefills]
        for (seq, _, _), last in zip(chunks, self._prefill_all(chunks, result), strict=True):
            if last is not None:
                rows.append(seq)
                logits.append(last.unsqueeze(0))
        self._lap("prefill")
        ahead, self._ahead = self._ahead, None
        decodes = [seq_of[e.request_id] for e in plan.decodes]
        early, early_logits, decodes = ahead.take(decodes) if ahead is not None else ([], None, decodes)
        if early_logits is not None:
            logits.append(early_logits)
            rows.extend(early)
        if decodes:
            try:
                logits.append(self.runner.decode([s.output[-1] for s in decodes], [s.slot for s in decodes]))
                rows.extend(decodes)
            except Exception as exc:
                log.exception("decode step failed")
                result.errors.extend((s, exc) for s in decodes)
        self._lap("decode")
        if rows:
            self._sample_rows(rows, torch.cat(logits), result)
        self._copy_live()  # a step that sampled nothing, or whose batched sampling failed
        return result

    def _sample_rows(self, rows: list[Seq], logits: Tensor, result: StepResult) -> None:
        """Sample all rows at once (if that fails, each row alone, so that a bad row fails by itself), then
        apply each row's stop rules and finish capture, a failure there ending that row only."""
        sampled: list[tuple[Seq, Sampled]] = []
        try:
            out = self._sample_device(rows, logits)
        except Exception:
            log.exception("batched sampling failed; sampling row by row")
            for i, seq in enumerate(rows):
                try:
                    sampled.append((seq, self._sample([seq], logits[i : i + 1])[0]))
                except Exception as exc:
                    log.exception("sampling failed", extra={"request_id": seq.request_id})
                    result.errors.append((seq, exc))
        else:  # the copy to the host is queued before the step launched ahead, which it need not wait for
            if self._clock is not None:
                self._clock.device_done()
            host = _HostCopy(out)
            self._copy_live()
            launched = self.ahead.launch(rows, out.tokens) if self.ahead is not None else None
            self._lap("sample")
            self._store_carried()  # the last step's captures: host work while this step's device work runs
            self._lap("stored")
            sampled = list(zip(rows, host.wait(), strict=True))
            self._lap("wait")
            if launched is not None:
                self._ahead = launched.resolve([token for _, (token, _, _) in sampled])
        now = time.monotonic()
        for seq, (token, logprob, top) in sampled:
            try:
                self._finish_row(seq, token, logprob, top, now, result)
            except Exception as exc:
                log.exception("token bookkeeping failed", extra={"request_id": seq.request_id})
                result.errors.append((seq, exc))
        self._lap("finish")

    def _prefill_all(self, chunks: list[tuple[Seq, int, int]], result: StepResult) -> list[Tensor | None]:
        """Prefill every chunk of the step in one batched call (`ModelRunner.prefill_batch`), capture at the
        planned positions, and return per chunk the last logits (v,) when it ends its prompt, else None.
        Chunks of requests that asked for prompt logprobs run one by one with every position's logits.
        If a pass fails, the rows it computed fail (their slots may hold partial work)."""
        scored = [c[0].req.prompt_logprobs is not None for c in chunks]
        batched = iter(
            self._prefill_batched([c for c, s in zip(chunks, scored, strict=True) if not s], result)
        )
        return [
            self._prefill_scored(c, result) if s else next(batched)
            for c, s in zip(chunks, scored, strict=True)
        ]

    def _prefill_batched(self, chunks: list[tuple[Seq, int, int]], result: StepResult) -> list[Tensor | None]:
        if not chunks:
            return []
        segs = [  # a chunk from position 0 starts from the zero state: nothing was restored (`_admit_one`)
            PrefillSeg(seq.req.prompt_tokens[a:b], seq.slot, self._caps(seq, a, b), fresh=a == 0)
            for seq, a, b in chunks
        ]
        try:
            outs = self.runner.prefill_batch(segs)
        except Exception as exc:
            log.exception(
                "batched prefill failed", extra={"request_ids": [s.request_id for s, _, _ in chunks]}
            )
            result.errors.extend((seq, exc) for seq, _, _ in chunks)
            return [None] * len(chunks)
        return [
            self._prefilled(chunk, out.captures, out.last_logits, result, out.live)
            for chunk, out in zip(chunks, outs, strict=True)
        ]

    def _prefill_scored(self, chunk: tuple[Seq, int, int], result: StepResult) -> Tensor | None:
        """One chunk with every position's logits: its prompt tokens' logprobs (`server.engine.prompt_logprobs`)."""
        seq, start, end = chunk
        prompt, k = seq.req.prompt_tokens, seq.req.prompt_logprobs or 0
        try:
            out = self.runner.prefill(
                prompt[start:end], seq.slot, self._caps(seq, start, end), all_logits=True
            )
            assert out.all_logits is not None
            seq.prompt_logprobs.extend(chunk_logprobs(out.all_logits, prompt[start + 1 : end + 1], k))
        except Exception as exc:
            log.exception("prefill failed", extra={"request_id": seq.request_id})
            result.errors.append((seq, exc))
            return None
        return self._prefilled(chunk, out.captures, out.last_logits, result)

    def _prefilled(
        self,
        chunk: tuple[Seq, int, int],
        captures: dict[int, dict[str, Tensor]],
        last: Tensor,
        result: StepResult,
        live: tuple[int, ...] = (),
    ) -> Tensor | None:
        """A chunk computed: record it, capture, and hand back the last logits when it ends the prompt."""
        seq, start, end = chunk
        result.prefilled.append((seq, end - start))
        self._capture_prefill(seq, start, captures, live)
        return last if end == len(seq.req.prompt_tokens) else None

    @staticmethod
    def _caps(seq: Seq, start: int, end: int) -> list[int]:
        return [p - start for p in seq.capture_plan if start < p <= end]

    def _capture_prefill(
        self, seq: Seq, start: int, captures: dict[int, dict[str, Tensor]], live: tuple[int, ...] = ()
    ) -> None:
        """Queue a chunk's captures; those at positions `live` are views of the slot (`PrefillResult.live`),
        copied by `_copy_live` before anything writes the slot again."""
        prompt = seq.req.prompt_tokens
        for rel, state in sorted(captures.items()):
            pos = start + rel
            reason = (
                "prompt" if pos == len(prompt) else "boundary" if pos in seq.req.boundaries else "interval"
            )
            view = rel in live
            self._capture(_Pending(seq, prompt, pos, (), state, reason, owned=not view, early=view))

    def _copy_live(self) -> None:
        """The step's prefill captures that are still views of their slots, copied in one stack per state
        name (rows of one tensor: `flush_captures` stores them without another copy). Called once the step's
        sampled tokens are queued to the host, so that on a GPU the copy (168 MB a 2.7b row, 41 rows in a
        burst's packed step) is not in their time to first token, and before a decode launched ahead, or
        anything else, writes those slots."""
        live = [i for i, p in enumerate(self._pending) if p.early]
        if not live:
            return
        try:
            stacked = _stack_states([self._pending[i].state for i in live])
        except Exception:  # a capture never fails a request: these checkpoints are lost, the step goes on
            log.exception("copying the step's prefill captures failed; %d are dropped", len(live))
            self._pending = [p for p in self._pending if not p.early]
            return
        for row, i in enumerate(live):
            state = {name: tensor[row] for name, tensor in stacked.items()}
            self._pending[i] = replace(self._pending[i], state=state, owned=True, early=False)

    def _capture(self, pending: _Pending) -> None:
        """Queue a capture; the step's captures go to the cache together at its end (`flush_captures`)."""
        if self.cache is not None:
            self._pending.append(pending)

    def flush_captures(self) -> None:
        """Store every queued capture: those held from an earlier step first, then the step's own. The
        step's are stored in batches of at most `CAPTURE_BATCH_BYTES` of states: the cache encodes a batch
        in about as many launches as one capture (`CheckpointCache.capture_many`). At 64 streams one
        capture at a time took a quarter of the model worker's time (py-spy on an H200's host), most of it
        the codec's launches. A batch that fails is retried one capture at a time, so that a bad capture
        loses only its own checkpoint; a capture never fails a request."""
        self._store_carried()
        self._flush_pending()

    def settle_captures(self, carry: bool) -> None:
        """The end of a step whose captures were deferred (`execute(defer_captures=True)`), once its tokens
        went out. With `carry` (another step follows), hold them for that step to store once its device
        work is launched, so that their host work (~4 ms a 2.7b capture on an H200's host) overlaps it
        rather than delaying it: a burst's second step, which holds the median request, no longer waits for
        the first step's captures. Held only when that is safe and cheap: every capture owns its state (no
        slot views, which the next step may write), none reads a slot's attention KV (a hybrid's, which an
        abort may free), and their states total at most `CARRY_BYTES` (held one step longer). Else, and
        without `carry`, they are stored now. `admit` stores held captures before its lookups when one of
        them may be the checkpoint an admitted request resumes from."""
        if carry and not self._carried and self._carryable():
            self._carried, self._pending = self._pending, []
            return
        self.flush_captures()

    def _carryable(self) -> bool:
        nbytes = sum(t.numel() * t.element_size() for p in self._pending for t in p.state.values())
        return nbytes <= CARRY_BYTES and all(
            p.owned and self.runner.kv_source(p.seq.slot) is None for p in self._pending
        )

    def _may_serve(self, seqs: Sequence[Seq]) -> bool:
        """Whether a held capture may be a checkpoint that one of `seqs` resumes from: its tokens a prefix of
        the prompt before its last token (a lookup's key; namespaces and trees are not compared)."""
        for p in self._carried:
            tokens = p.tokens()
            for seq in seqs:
                prompt = seq.req.prompt_tokens
                if len(tokens) < len(prompt) and prompt[: len(tokens)] == tokens:
                    return True
        return False

    def _flush_pending(self) -> None:
        """Store the step's queued captures (its live ones copied first)."""
        if not self._pending:  # most decode steps capture nothing
            return
        self._copy_live()
        pending, self._pending = self._pending, []
        self._store_all(pending)

    def _store_carried(self) -> None:
        carried, self._carried = self._carried, []
        self._store_all(carried)

    def _store_all(self, pending: list[_Pending]) -> None:
        if self.cache is None or not pending:
            return
        for batch in _batches(pending, CAPTURE_BATCH_BYTES):
            if not self._store(batch) and len(batch) > 1:
                for one in batch:
                    self._store([one])

    def _store(self, batch: list[_Pending]) -> bool:
        """One `capture_many` of `batch`; False (logged) if it raised."""
        assert self.cache is not None
        captures = [
            Capture(
                p.seq.req.namespace, p.seq.req.session_id, p.tokens(), p.reason, p.seq.req.tree,
                self.runner.kv_source(p.seq.slot),  # a hybrid's KV (the cache reads its prefix); else None
            )
            for p in batch
        ]  # fmt: skip
        try:
            owned = all(p.owned for p in batch)
            states = {name: _stack([p.state[name] for p in batch], owned) for name in batch[0].state}
            self.cache.capture_many(captures, states)
            return True
        except Exception:
            ids = [p.seq.request_id for p in batch]
            log.exception("checkpoint capture failed", extra={"request_ids": ids})
            return False

    def _sample(self, rows: list[Seq], logits: Tensor) -> list[Sampled]:
        """logits (b, v): one (token, logprob, top logprobs) per row. Mutates no request."""
        return _HostCopy(self._sample_device(rows, logits)).wait()

    def _sample_device(self, rows: list[Seq], logits: Tensor) -> SampleOutput:
        """logits (b, v): the rows' samples, on the device (the token counts of penalised rows updated)."""
        if self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")
        batch = self._sampling_batch(rows)
        if not batch.use_penalties:
            return self.sampler.sample(logits, batch)
        slots = to_device(torch.tensor([s.slot for s in rows], dtype=torch.long), self.device)
        counts, prompt = self.counts.rows(slots)
        out = self.sampler.sample(logits, batch, counts, prompt)
        # a 0/1 weight per row, on the device: no host-side row selection
        self.counts.add(slots, out.tokens, weights=penalised_rows(batch))
        return out

    def _sampling_batch(self, rows: list[Seq]) -> SamplingBatch:
        """The rows' sampling parameters as tensors; the last step's again when its rows are the same requests
        in the same order and none has banned tokens (a decode step's usual case: building them anew, a
        pinned copy included, was ~12% of the worker thread's time at 64 streams on an H200's host)."""
        banned = [s.banned_ids(self.vocab_limit) for s in rows]  # stop ids before min_tokens
        key = tuple(rows)  # `Seq` compares by identity
        if self._batch is not None and not any(banned) and self._batch[0] == key:
            return self._batch[1]
        params = [s.req.params for s in rows]
        batch = SamplingBatch.build(params, [s.generator for s in rows], self.device, banned)
        self._batch = None if any(banned) else (key, batch)
        return batch

    def _finish_row(
        self,
        seq: Seq,
        token: int,
        logprob: float | None,
        top: tuple[TopLogprob, ...],
        now: float,
        result: StepResult,
    ) -> None:
        """Append the token (stop rules), queue its event, capture the final state of a finished row."""
        p = seq.req.params
        event = seq.append(token, now, logprob if p.logprobs else None, top[: p.top_logprobs])
        result.events.append((seq, event))
        if seq.finish_reason is not None and len(seq.output) > 1 and not seq.aborted:
            self._capture_finish(seq)

    def _capture_finish(self, seq: Seq) -> None:
        # the live slot's views, stacked at the step's end: after a step launched ahead (it sees its write),
        # before the engine frees the slot
        state = self.runner.slot_state(seq.slot)
        fed = self._ahead is not None and self._ahead.fed(seq)
        prompt = seq.req.prompt_tokens
        self._capture(_Pending(seq, prompt, len(prompt), seq.state_output(fed), state, "finish", owned=False))


CAPTURE_BATCH_BYTES = 512 << 20  # states stacked for one `capture_many` (a copy, unless already stacked)
CARRY_BYTES = 1 << 30  # a step's captures held for the next step to store (`settle_captures`), at most


@dataclass(frozen=True, slots=True)
class _Pending:
    """A capture queued for the step's end, of the tokens `base[:end] + extra`. The tuple is built when the
    capture is stored (`tokens`), after the step's tokens went out: a slice of a long prompt is a copy of it
    (0.9 ms at 131k tokens on this project's 2-core CPU), and one of all of it is the prompt itself."""

    seq: Seq
    base: tuple[int, ...]
    end: int
    extra: tuple[int, ...]  # what follows base[:end] (a finish's output)
    state: Mapping[str, Tensor]
    reason: str
    owned: bool  # `state` is the capture's own copy (else live-slot views, copied when stacked)
    early: bool = False  # views to copy before a decode launched ahead writes the slot (`_copy_live`)

    def tokens(self) -> tuple[int, ...]:
        return self.base[: self.end] + self.extra


def _batches(pending: list[_Pending], limit: int) -> list[list[_Pending]]:
    """`pending` in order, cut into runs of at most `limit` bytes of states (at least one capture each)."""
    out: list[list[_Pending]] = []
    size = 0
    for p in pending:
        nbytes = sum(t.numel() * t.element_size() for t in p.state.values())
        if not out or size + nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(p)
        size += nbytes
    return out


def _stack_states(states: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The states, each name's stacked into one new tensor (rows of it: `_stack` keeps them in place)."""
    return {name: torch.stack([state[name] for state in states]) for name in states[0]}


def _stack(tensors: list[Tensor], owned: bool) -> Tensor:
    """`torch.stack(tensors)`, a copy; without one when they are `owned` (copies nothing else writes) and
    already equally spaced contiguous rows of one tensor (the taps of one prefill pass: `_tap_states`)."""
    first, n = tensors[0], len(tensors)
    if owned and n > 1 and first.is_contiguous():
        size, base = first.element_size(), first.untyped_storage().data_ptr()
        step = tensors[1].data_ptr() - first.data_ptr()
        same = all(
            t.shape == first.shape and t.dtype == first.dtype and t.is_contiguous()
            and t.untyped_storage().data_ptr() == base and t.data_ptr() - first.data_ptr() == i * step
            for i, t in enumerate(tensors)
        )  # fmt: skip
        if same and step >= first.numel() * size and step % size == 0:
            return first.as_strided(
                (n, *first.shape), (step // size, *first.stride()), first.storage_offset()
            )
    return torch.stack(tensors)


class _HostCopy:
    """A step's samples copied to the host: queued at once (non-blocking on CUDA, into pinned memory), so
    that work queued afterwards (a decode launched ahead) is not waited for by `wait`, the step's one sync."""

    def __init__(self, out: SampleOutput) -> None:
        cuda = out.tokens.device.type == "cuda"
        move = lambda t: t.to("cpu", non_blocking=True) if cuda and t is not None else t
        self.out = SampleOutput(
            move(out.tokens), move(out.logprobs), move(out.top_ids), move(out.top_logprobs)
        )
        self.done = torch.cuda.Event() if cuda else None
        if self.done is not None:
            self.done.record()

    def wait(self) -> list[Sampled]:
        if self.done is not None:
            self.done.synchronize()
        out = self.out
        tokens = out.tokens.tolist()
        return [(t, lp, top) for t, (lp, top) in zip(tokens, _host_logprobs(out, len(tokens)), strict=True)]


def _host_logprobs(out: SampleOutput, rows: int) -> list[tuple[float | None, tuple[TopLogprob, ...]]]:
    """Per row: (logprob of the chosen token, its top alternatives), as Python values."""
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
