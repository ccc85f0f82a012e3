"""`Engine`: the asyncio side of continuous batching.

One asyncio task (`_run`) drives the torch-free `Scheduler` on the event loop; every model and
cache operation runs on one dedicated worker thread (`ModelWorker`), so the event loop stays
responsive while a step computes. A step is:

    admit (loop)  ->  restore slots from the cache (worker)  ->  plan (loop)
    ->  prefill chunks + one batched decode + sampling + finish captures (worker)
    ->  deliver events, free finished slots, record metrics (loop)

`generate(req)` yields `TokenEvent`s; closing or cancelling the iterator aborts the request, which
frees its slot immediately (the scheduler lives on the loop, so no step can be using a freed slot
for a new request). A step already in flight may still compute the aborted row; its results are
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from cache.base import CheckpointCache
from server.engine.events import EventQueue, event_batches, one_by_one
from server.engine.profiling import WorkerProfiler
from server.engine.prompts import LastPrompts, prompt_key
from server.engine.request import EventSink, Seq
from server.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from server.engine.types import EngineError, EngineNotReady, EngineShutdown, GenerationRequest, TokenEvent
from server.engine.worker import ModelWorker, StepResult
from server.metrics import EngineStats, engine_stats
from server.model.runner import ModelRunner
from server.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
__all__ = ["Engine", "EngineConfig", "EngineError", "EngineNotReady", "EngineShutdown"]
T = TypeVar("T")
ENGINE_PHASES = ("queue", "restore", "prefill", "first_token")
P = ParamSpec("P")


class RequestMetrics(Protocol):
    """What the engine records (implemented by `server.metrics.Metrics`)."""

    def observe_prompt(self, cached_tokens: int, computed_tokens: int) -> None: ...
    def observe_queue(self, seconds: float) -> None: ...
    def observe_phase(self, phase: str, seconds: float) -> None: ...
    def observe_first_token(self, seconds: float) -> None: ...
    def observe_tokens(self, count: int, inter_token_seconds: Sequence[float] = ()) -> None: ...
    def observe_finish(self, finish_reason: str, duration_seconds: float) -> None: ...


class _NoMetrics:
    def observe_prompt(self, cached_tokens: int, computed_tokens: int) -> None: ...
    def observe_queue(self, seconds: float) -> None: ...
    def observe_phase(self, phase: str, seconds: float) -> None: ...
    def observe_first_token(self, seconds: float) -> None: ...
    def observe_tokens(self, count: int, inter_token_seconds: Sequence[float] = ()) -> None: ...
    def observe_finish(self, finish_reason: str, duration_seconds: float) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int  # live slots, at most the runner's
    prefill_budget: int = 512  # prompt tokens prefilled per step (chunked prefill)
    decode_prefill_budget: int | None = None  # the same in a step where some request decodes (None: as above)
    short_prompt: int = 0  # while decoding, prompts this short are prefilled whole past that budget
    # from idle, the first step waits at most `gather_seconds` for further requests while they arrive less
    # than `gather_gap_seconds` apart (0: it starts at once)
    gather_seconds: float = 0.0
    gather_gap_seconds: float = 0.002
    decode_ahead: bool | None = (
        None  # launch the next decode before this one's tokens reach the host (None: CUDA)
    )


class Engine:
    """Continuous-batching generation over a `ModelRunner`, resuming prompts from a state cache."""

    profile_max_seconds = 60.0  # a profiler recording stops by itself after this long

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        cache: CheckpointCache | None,
        *,
        metrics: RequestMetrics | None = None,
        config: EngineConfig | None = None,
        profile_dir: Path | None = None,
    ) -> None:
        """`profile_dir`: where `stop_profile` writes the worker thread's torch profiler traces (None: off)."""
        self.config = config or EngineConfig(max_slots=runner.max_slots)
        if self.config.max_slots > runner.max_slots:
            raise ValueError("max_slots exceeds the runner's live slots")
        self._runner, self._tokenizer, self._cache = runner, tokenizer, cache
        self._metrics: RequestMetrics = metrics if metrics is not None else _NoMetrics()
        cfg = self.config
        self._worker = ModelWorker(
            runner, cache, vocab_limit=tokenizer.vocab_size, decode_ahead=cfg.decode_ahead
        )
        self._scheduler = Scheduler(
            SchedulerConfig(cfg.max_slots, cfg.prefill_budget, cfg.decode_prefill_budget, cfg.short_prompt)
        )
        self._seqs: dict[str, Seq] = {}
        self._checked = LastPrompts()  # each session's last prompt that passed `_validate`
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing: str | None = None  # set by `end_all`: the reason new requests are refused
        self._profiler = WorkerProfiler(profile_dir) if profile_dir is not None else None
        self._profile_timer: asyncio.Task[None] | None = None

    # ---- properties --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def cache(self) -> CheckpointCache | None:
        return self._cache

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def runner(self) -> ModelRunner:
        return self._runner

    @property
    def num_running(self) -> int:
        return self._scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self._scheduler.num_waiting

    @property
    def num_free_slots(self) -> int:
        return self._scheduler.num_free_slots

    @property
    def failure(self) -> str | None:
        """Why the engine stopped serving on its own (never, in this process: a step's bug fails its requests)."""
        return None

    async def stats(self) -> EngineStats:
        return engine_stats(self)

    # ---- sessions (the admin routes) ---------------------------------------------------------

    async def session_info(self, namespace: str, session_id: str) -> dict[str, Any] | None:
        """Checkpoints and bytes per tier of a session (None: no cache, or no such session), with every
        checkpoint of a request whose last token has gone out."""
        await self._captures_stored()
        return self._cache.session_info(namespace, session_id) if self._cache is not None else None

    async def delete_session(self, namespace: str, session_id: str) -> int | None:
        """Drop every checkpoint of a session; the bytes freed (None: no cache, or no such session). It
        waits for the captures of the steps already delivered, so that none of them brings the session back."""
        await self._captures_stored()
        cache = self._cache
        if cache is None or cache.session_info(namespace, session_id) is None:
            return None
        return int(await asyncio.to_thread(cache.delete_session, namespace, session_id))

    async def _captures_stored(self) -> None:
        """Wait until the captures of every step delivered so far are in the cache. The worker runs one call
        at a time, so this one runs after the step storing or holding them (`settle_captures`) and after the
        step that stores held ones, and stores whatever is still queued. A failure is logged; a cancelled
        wait leaves the call running."""
        if self._cache is None or self._executor is None:
            return
        try:
            await self.in_worker(self._worker.flush_captures)
        except Exception:
            log.exception("storing the queued captures failed")

    # ---- profiling (the admin routes, with --profile-dir) ------------------------------------

    async def start_profile(self) -> bool:
        """Start a torch profiler recording of the model worker thread; False if one runs already. It stops
        by itself after `profile_max_seconds` (its trace written then), so that a client that never stops
        it cannot grow the profiler's buffers without bound."""
        started = await self.in_worker(self._need_profiler().start)
        if started:
            self._profile_timer = asyncio.get_running_loop().create_task(self._stop_profile_later())
        return started

    async def stop_profile(self) -> str | None:
        """Stop the recording and write its Chrome trace; the file's path, or None if none ran."""
        profiler = self._need_profiler()
        timer, self._profile_timer = self._profile_timer, None
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        prof = await self.in_worker(profiler.stop)
        return None if prof is None else str(await asyncio.to_thread(profiler.export, prof))

    async def _stop_profile_later(self) -> None:
        await asyncio.sleep(self.profile_max_seconds)
        trace = await self.stop_profile()
        log.warning("a profile ran %.0f s without a stop: stopped, trace %s", self.profile_max_seconds, trace)

    def _need_profiler(self) -> WorkerProfiler:
        if self._profiler is None:
            raise EngineError("profiling is off: start the server with --profile-dir")
        return self._profiler

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine loop on the running event loop (idempotent)."""
        if self.ready:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tssc-model")
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tssc-engine")

    def end_all(self, reason: str) -> int:
        """Refuse new requests and end every open one with `EngineShutdown(reason)` (their streams then close
        with an error event, their non-streaming calls with an error body); returns how many were ended.
        Slots are freed at once, as for an abort. Used when a shutdown's grace period runs out."""
        self._closing = reason
        open_seqs = list(self._seqs.values())
        for seq in open_seqs:
            self._end(seq, error=EngineShutdown(reason))
        self._wake.set()
        return len(open_seqs)

    async def stop(self) -> None:
        """Fail every open request with `EngineError`, stop the loop and the worker, close the cache."""
        for task in (self._task, self._profile_timer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._profile_timer = None
        for seq in list(self._seqs.values()):
            self._end(seq, error=EngineError("the engine stopped"))
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
            await asyncio.to_thread(self._worker.flush_captures)  # what a cancelled step left queued
        close = getattr(self._cache, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    # ---- requests ----------------------------------------------------------------------------

    def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """Stream the request's events; the last one has `finish_reason` set.

        Raises ValueError for an invalid request, EngineNotReady before `start()`, EngineError if
        the engine fails the request. Closing the iterator early aborts the request.
        """
        return one_by_one(self.generate_batches(req))

    async def generate_batches(self, req: GenerationRequest) -> AsyncGenerator[list[TokenEvent], None]:
        """`generate`'s events in batches: each the next event and those already delivered behind it
        (`server.engine.events`)."""
        self._validate(req)
        await self._prefetch(req)
        queue: EventQueue = asyncio.Queue()
        seq = self._submit(req, queue)
        try:
            async for batch in event_batches(queue):
                yield batch
        finally:
            self._abort(seq)

    async def run_into(self, req: GenerationRequest, sink: EventSink) -> None:
        """Validate, prefetch and queue `req`; returns once it is queued (raising as `generate` does before its
        first event). Its events, and the exception that ends it if one does, then go to `sink.put_nowait` on
        this loop as each step delivers them: no queue and no task wake-up per token, for the engine core,
        which forwards a whole step's events at once. `abort(req.request_id)` ends it early."""
        self._validate(req)
        await self._prefetch(req)
        self._submit(req, sink)

    def abort(self, request_id: str) -> None:
        """End a request queued by `run_into` (its client went away); its slot is free on return. A request
        that already ended is ignored."""
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._abort(seq)

    def _validate(self, req: GenerationRequest) -> None:
        self._check_admissible(req)
        if not req.prompt_tokens:
            raise ValueError("the prompt is empty")
        vocab, prompt, key = self._worker.vocab_limit, req.prompt_tokens, prompt_key(req)
        # the ids it shares with the session's last checked prompt are in range: a follow-up, a regenerate or
        # an edit scans only what follows
        new = prompt[self._checked.prefix(key, prompt) :]
        if new and (min(new) < 0 or max(new) >= vocab):  # C-speed scans of the new ids only
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        self._checked.remember(key, prompt)
        if any(t >= vocab for t, _ in req.params.logit_bias):
            raise ValueError(f"logit_bias token ids must lie in [0, {vocab})")
        limit = self._runner.max_model_len  # a hybrid's KV per slot; None: no bound
        if limit is not None and len(prompt) + req.params.max_tokens > limit:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({req.params.max_tokens}) exceeds this "
                f"model's maximum length of {limit} tokens (--max-model-len); shorten the prompt or lower max_tokens"
            )

    def _check_admissible(self, req: GenerationRequest) -> None:
        """What can change while a request awaits its prefetch: the engine's state, and its id's use."""
        if not self.ready:
            raise EngineNotReady("the engine is not running")
        if self._closing is not None:
            raise EngineShutdown(self._closing)
        if req.request_id in self._seqs:
            raise ValueError(f"duplicate request id {req.request_id!r}")

    async def _prefetch(self, req: GenerationRequest) -> None:
        """With a remote tier: bring a deeper checkpoint than the local ones into them before the request
        queues (on a thread: network I/O never runs on the loop or the worker). Never fails the request."""
        cache = self._cache
        if cache is None or not cache.has_remote or req.prompt_logprobs is not None:
            return
        started = time.monotonic()
        try:
            tokens = req.prompt_tokens[:-1]  # what the worker's lookup matches
            await asyncio.to_thread(cache.prefetch, req.namespace, req.session_id, tokens, tree=req.tree)
        except Exception:
            log.exception("remote prefetch failed", extra={"request_id": req.request_id})
        self._metrics.observe_phase("remote", time.monotonic() - started)

    def _submit(self, req: GenerationRequest, sink: EventSink) -> Seq:
        self._check_admissible(req)  # again: the engine may have started closing during the prefetch
        seq = Seq.create(req, self._tokenizer.decode, self._tokenizer.eos_ids, time.monotonic(), sink)
        self._scheduler.add(seq.entry)
        self._seqs[req.request_id] = seq
        self._wake.set()
        return seq

    def _abort(self, seq: Seq) -> None:
        """Drop a still-open request (client gone); its slot is free on return."""
        if self._seqs.get(seq.request_id) is not seq:
            return
        seq.aborted = True
        del self._seqs[seq.request_id]
        self._scheduler.abort(seq.request_id)
        self._metrics.observe_finish("abort", time.monotonic() - seq.t_arrival)
        log.info("request aborted", extra={"request_id": seq.request_id, "session_id": seq.req.session_id})
        self._wake.set()

    def _end(self, seq: Seq, error: BaseException | None = None) -> None:
        """A request finished (or failed): free its slot and account for it."""
        if self._seqs.get(seq.request_id) is not seq:
            return
        del self._seqs[seq.request_id]
        self._scheduler.finish(seq.request_id)
        reason = "error" if error is not None else (seq.finish_reason.value if seq.finish_reason else "abort")
        self._metrics.observe_finish(reason, time.monotonic() - seq.t_arrival)
        if error is not None:
            seq.events.put_nowait(error if isinstance(error, EngineError) else EngineError(str(error)))

    # ---- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._scheduler.num_running and not self._scheduler.num_waiting:
                if self._worker.captures_pending and self._executor is not None:
                    # held for a step that did not come (its requests aborted): stored before idling. The
                    # worker takes them off its queue before storing, so a failure is not retried
                    try:
                        await self.in_worker(self._worker.flush_captures)
                    except Exception:
                        log.exception("storing the held captures failed")
                    continue
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._gather()  # at once unless the device is idle
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in a step must not take the server down
                log.exception("engine step failed; failing the running requests")
                for seq in [self._seqs[e.request_id] for e in self._scheduler.running()]:
                    self._end(seq, error=exc)

    async def _gather(self) -> None:
        """With nothing running: hold the step while requests keep arriving (`EngineConfig.gather_seconds`), so
        that a burst's requests share its pass. Started at the first arrival, that step would hold the few that
        came first, and every later one would wait for it to end before its own pass began: a burst of 64
        prompts on an idle GPU is a short step, then a full one, then the rest. The wait ends at the first gap
        of `gather_gap_seconds` without an arrival (a lone request waits one gap), at the cap, or once the
        waiting prompts fill the step's prefill budget or the free slots: then nothing more could join."""
        cfg, sched = self.config, self._scheduler
        deadline = time.monotonic() + cfg.gather_seconds
        seen = 0
        while (
            not sched.num_running
            and seen < sched.num_waiting < sched.num_free_slots
            and sched.waiting_tokens < sched.config.prefill_budget
            and (left := deadline - time.monotonic()) > 0
        ):
            seen = sched.num_waiting
            self._wake.clear()  # set by the next arrival (or abort): the loop reads the queues, not the event
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(cfg.gather_gap_seconds, left))

    async def in_worker(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn(*args, **kwargs) on the model worker thread, where every step's model and cache work runs, in
        turn with the steps (also for diagnostics: a profiler records the thread it is started on)."""
        if self._executor is None:
            raise EngineNotReady("the engine is not running")
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _step(self) -> None:
        began, admitted = time.monotonic(), []
        for entry in self._scheduler.admit():
            seq = self._seqs[entry.request_id]
            assert entry.slot is not None
            seq.slot = entry.slot
            admitted.append(seq)
        if admitted:
            await self._admit(admitted)
        plan = self._scheduler.plan()  # built after every abort so far: an aborted request is not in it
        if plan.empty:
            return
        seq_of = {c.entry.request_id: self._seqs[c.entry.request_id] for c in plan.prefills}
        seq_of.update((e.request_id, self._seqs[e.request_id]) for e in plan.decodes)
        started = time.monotonic()
        result = await self.in_worker(self._worker.execute, plan, seq_of, defer_captures=True)
        returned = time.monotonic()
        self._apply(result)
        if plan.prefills and log.isEnabledFor(logging.DEBUG):
            self._log_step(plan, {"admit": (started - began) * 1e3, **result.times}, started, returned)
        if self._worker.captures_pending and self._executor is not None:
            # after the step's tokens went out: not in their latency. Submitted in the same turn of the loop
            # as the delivery, so that a client woken by it queues its own worker call behind this one
            # (`_captures_stored`); shielded, so that a `stop` cancelling this step still stores them (it waits
            # for the worker). With another step to come, the worker may hold them for it to store behind its
            # launches (`ModelWorker.settle_captures`)
            more = bool(self._scheduler.num_running or self._scheduler.num_waiting)
            settle = asyncio.get_running_loop().run_in_executor(
                self._executor, self._worker.settle_captures, more
            )
            flushed = time.monotonic()
            await asyncio.shield(settle)
            if plan.prefills and log.isEnabledFor(logging.DEBUG):
                log.debug("step captures stored: %.1f ms", (time.monotonic() - flushed) * 1e3)

    def _log_step(self, plan: StepPlan, times: dict[str, float], started: float, returned: float) -> None:
        """The debug line of a step with prefill: its rows, its wall time from the worker call on, and where
        the step went ('admit': the admission before it; the worker's laps, `StepClock`; 'handoff': the worker
        round trip beyond them; 'apply': the delivery on the loop)."""
        wall, apply = (time.monotonic() - started) * 1e3, (time.monotonic() - returned) * 1e3
        handoff = (returned - started) * 1e3 - sum(
            v for k, v in times.items() if k not in ("admit", "device")
        )
        parts = " ".join(f"{k} {v:.1f}" for k, v in {**times, "handoff": handoff, "apply": apply}.items())
        log.debug(
            "step: %d prefill rows, %d prompt tokens, %d decodes, %d waiting: %.1f ms (%s)",
            len(plan.prefills),
            sum(c.end - c.start for c in plan.prefills),
            len(plan.decodes),
            self._scheduler.num_waiting,
            wall,
            parts,
        )

    async def _admit(self, seqs: list[Seq]) -> None:
        now = time.monotonic()
        for seq in seqs:
            seq.t_admitted = now
            self._metrics.observe_queue(now - seq.t_queued)
        outcomes = await self.in_worker(self._worker.admit, seqs)
        for seq, n in zip(seqs, outcomes, strict=True):
            if self._seqs.get(seq.request_id) is not seq:
                continue  # aborted while the worker restored it
            if isinstance(n, BaseException):
                self._end(seq, error=n)
                continue
            seq.cached_tokens = seq.entry.num_computed = n
            prompt = len(seq.req.prompt_tokens)
            self._metrics.observe_prompt(n, prompt - n)
            log.debug(
                "admitted into slot %d: %d of %d prompt tokens from a checkpoint",
                seq.slot,
                n,
                prompt,
                extra={"request_id": seq.request_id, "session_id": seq.req.session_id},
            )

    def _observe_phases(self, seq: Seq, now: float) -> None:
        """The engine's phases of the request's time to first token (the API records parse and tokenize),
        from its hand-over to the scheduler to `now`, its first token's delivery."""
        marks = (seq.t_queued, seq.t_admitted, seq.t_restored, seq.t_first, now)
        if any(t is None for t in marks):
            return
        for phase, (a, b) in zip(ENGINE_PHASES, itertools.pairwise(marks), strict=True):
            assert a is not None and b is not None
            self._metrics.observe_phase(phase, b - a)

    def _apply(self, result: StepResult) -> None:
        """Deliver a step's results to the still-open requests (aborted ones are skipped)."""
        live = lambda s: self._seqs.get(s.request_id) is s
        tokens, gaps = 0, []
        for seq, n in result.prefilled:
            if live(seq):
                self._scheduler.advance(seq.entry, n)
        for seq, exc in result.errors:
            self._end(seq, error=exc)
        for seq, event in result.events:
            if not live(seq):
                continue
            if seq.last_itl is None and seq.t_first is not None:
                now = time.monotonic()  # delivered: the phases and the TTFT end at the same instant
                self._metrics.observe_first_token(now - seq.t_arrival)
                self._observe_phases(seq, now)
            tokens += 1
            if seq.last_itl is not None:
                gaps.append(seq.last_itl)
            seq.events.put_nowait(event)
            if event.finish_reason is not None:
                self._end(seq)
        if tokens:
            self._metrics.observe_tokens(tokens, gaps)
