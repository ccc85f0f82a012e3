"""Per-request state of the engine and the per-token bookkeeping (no torch).

A `Seq` is created when a request is submitted and lives until it finishes or is aborted. The model
worker appends sampled tokens with `Seq.append`, which applies the stop rules in order:

1. an EOS token (unless `ignore_eos`) or one of `stop_token_ids`: finish `stop`; the token counts
   as generated but its text is not emitted;
2. a stop string completed by the detokenizer: finish `stop`; text up to the stop string only;
3. `max_tokens` generated: finish `length`.

Rules 1 and 2 apply only past the first `min_tokens` tokens: until then the sampler never picks a
stop token (`banned_ids`), and a stop string completed by one of those tokens is ordinary text.

Timestamps are `time.monotonic()` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.engine.detokenizer import DecodeFn, IncrementalDetokenizer
from server.engine.scheduler import Entry
from server.engine.types import (
    FinishReason,
    GenerationRequest,
    PromptLogprob,
    SamplingParams,
    TokenEvent,
    TopLogprob,
)

EventItem = TokenEvent | BaseException


def stop_ids(params: SamplingParams, eos_ids: Collection[int]) -> frozenset[int]:
    """The ids that end a request with `params` (stop rule 1): its stop_token_ids, and the EOS ids unless
    it ignores them."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_ids))


class EventSink(Protocol):
    """Where a request's events go, on the event loop, as each step delivers them (the last one finishes it;
    an exception ends it instead): an `asyncio.Queue`, or the engine core's outbox (`Engine.run_into`)."""

    def put_nowait(self, item: EventItem) -> None: ...


@dataclass(eq=False)
class Seq:
    req: GenerationRequest
    entry: Entry
    detok: IncrementalDetokenizer
    stop_ids: frozenset[int]
    events: EventSink
    t_arrival: float
    t_queued: float  # handed to the scheduler (after a remote prefetch, if any)
    output: list[int] = field(default_factory=list)
    # The live slot this request was admitted into. Set on the event loop at admission and never cleared:
    # an abort frees the scheduler's slot at once, while a step already running on the worker keeps
    # reading this value (no new request can take the slot before that step has returned).
    slot: int = -1
    cached_tokens: int = 0
    capture_plan: tuple[int, ...] = ()  # absolute prompt positions to capture during prefill
    prompt_logprobs: list[PromptLogprob | None] = field(default_factory=list)  # filled by the prefill
    generator: Any = None  # torch.Generator of a seeded request (created by the worker)
    finish_reason: FinishReason | None = None
    aborted: bool = False
    t_admitted: float | None = None  # given a slot (event loop)
    t_restored: float | None = None  # its checkpoint restored, or none found (worker)
    t_first: float | None = None  # its first token on the host: the prompt computed and the token sampled
    t_last: float | None = None
    last_itl: float | None = None  # seconds between the last two tokens (None after the first)

    @classmethod
    def create(
        cls,
        req: GenerationRequest,
        decode: DecodeFn,
        eos_ids: tuple[int, ...],
        now: float,
        events: EventSink | None = None,
    ) -> Seq:
        """`events`: where its events go (None: a new `asyncio.Queue`)."""
        p = req.params
        arrival = req.arrival_time if 0 < req.arrival_time <= now else now
        return cls(
            req=req,
            entry=Entry(req.request_id, num_prompt=len(req.prompt_tokens)),
            detok=IncrementalDetokenizer(decode, stop=p.stop, prompt_tail=req.prompt_tokens),
            stop_ids=stop_ids(p, eos_ids),
            events=asyncio.Queue() if events is None else events,
            t_arrival=arrival,
            t_queued=now,
        )

    @property
    def request_id(self) -> str:
        return self.req.request_id

    def banned_ids(self, vocab: int) -> frozenset[int]:
        """Token ids the next sample may not be (below `vocab`): the stop ids while short of min_tokens."""
        if len(self.output) >= self.req.params.min_tokens:
            return frozenset()
        return frozenset(t for t in self.stop_ids if t < vocab)

    def state_output(self, fed_last: bool = False) -> tuple[int, ...]:
        """The output tokens the slot's state covers once generation ended, after the prompt: all but the last
        sample, unless a decode step computed ahead fed it too (`server.engine.ahead`)."""
        return tuple(self.output if fed_last else self.output[:-1])

    def append(
        self,
        token: int,
        now: float,
        logprob: float | None = None,
        top: tuple[TopLogprob, ...] = (),
    ) -> TokenEvent:
        """Record one sampled token; return its event (the last one carries finish and usage). Runs once per
        row per decode step on the engine's worker thread, so it is written for speed."""
        output, p, detok = self.output, self.req.params, self.detok
        output.append(token)
        may_stop = len(output) > p.min_tokens
        finish: FinishReason | None = None
        if may_stop and token in self.stop_ids:
            text, finish = detok.flush(), FinishReason.STOP
        else:
            text = detok.push(token, stop=may_stop)
            if detok.stopped:
                finish = FinishReason.STOP
            elif len(output) >= p.max_tokens:
                text, finish = text + detok.flush(), FinishReason.LENGTH
        last = self.t_last
        self.last_itl = None if last is None else now - last
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.finish_reason = finish
        return self._event(token, text, logprob, top, now)

    def _event(
        self, token: int, text: str, logprob: float | None, top: tuple[TopLogprob, ...], now: float
    ) -> TokenEvent:
        req, finish = self.req, self.finish_reason
        prompt_logprobs = None
        if req.prompt_logprobs is not None and len(self.output) == 1:
            prompt_logprobs = tuple(self.prompt_logprobs)  # on the first event only
        return TokenEvent(
            req.request_id,
            token,
            text,
            logprob,
            top,
            finish,
            len(req.prompt_tokens),
            self.cached_tokens,
            len(self.output),
            {} if finish is None else self.timings(now),
            prompt_logprobs,
        )

    def timings(self, now: float) -> dict[str, float]:
        out = {"duration_s": now - self.t_arrival}
        if self.t_admitted is not None:
            out["queue_s"] = self.t_admitted - self.t_arrival
        if self.t_first is not None:
            out["ttft_s"] = self.t_first - self.t_arrival
        return out
