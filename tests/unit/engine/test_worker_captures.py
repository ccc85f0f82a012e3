"""The model worker hands a step's captures to the cache together (one `capture_many` per step: the prompt
ends of a batched prefill, the finishes of rows that end in the same step), and each checkpoint holds its own
request's state at its own position: a fresh prefill of those tokens gives the same state."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from cache import CacheConfig, Capture, StateCache
from cache.base import State
from server.engine import Engine, EngineConfig
from server.engine.scheduler import PrefillChunk, StepPlan
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from server.engine.worker import ModelWorker, _Pending, _stack
from server.model.loader import load_model
from server.model.runner import ModelRunner, PrefillResult, PrefillSeg
from server.model.tokenizer import Tokenizer
from tests.tiny_models import make_chat_model_dir
from tests.unit.engine.test_restore_into_slot import _seq

TOK_VOCAB = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-captures"), seed=11, tok_vocab=TOK_VOCAB)


class _Recording(StateCache):
    """The real cache, recording the reasons of each `capture_many` call."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.batches: list[list[str]] = []

    def capture_many(self, captures: Sequence[Capture], states: State) -> list[bool]:
        self.batches.append([c.reason for c in captures])
        return super().capture_many(captures, states)


def _prompt(n: int, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(5, TOK_VOCAB, (n,), generator=g).tolist())


async def _tokens(stream: AsyncIterator[TokenEvent]) -> list[int]:
    return [e.token_id async for e in stream if e.token_id is not None]


def _exact(cache: StateCache, tokens: Sequence[int]) -> dict[str, torch.Tensor]:
    lease = cache.lookup("anon", None, [*tokens, 0])
    assert lease is not None and lease.position == len(tokens)
    try:
        return cache.fetch(lease)
    finally:
        cache.release(lease)


async def _serve_together(
    model_dir: Path,
    runner: ModelRunner,
    cache: StateCache,
    prompts: list[tuple[int, ...]],
    decode_ahead: bool | None = None,
) -> list[list[int]]:
    """Each prompt's 4 greedy tokens from one engine over `runner` and `cache`, all requests sent at once."""
    engine = Engine(
        runner,
        Tokenizer.from_pretrained(model_dir),
        cache,
        config=EngineConfig(max_slots=4, prefill_budget=256, decode_ahead=decode_ahead),
    )
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.start()
    try:
        return list(
            await asyncio.gather(
                *(
                    _tokens(engine.generate(GenerationRequest(f"r{i}", p, params)))
                    for i, p in enumerate(prompts)
                )
            )
        )
    finally:
        await engine.stop()


async def test_a_steps_captures_reach_the_cache_together_each_its_own_state(model_dir: Path) -> None:
    model = load_model(model_dir)[1]
    runner = ModelRunner(model, max_slots=4)
    config = CacheConfig(
        hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32", cold_dtype="fp32", checkpoint_interval=1024
    )
    cache = _Recording(config, runner.state_spec())
    prompts = [_prompt(20, seed=i) for i in range(3)]
    outs = await _serve_together(model_dir, runner, cache, prompts)
    assert ["prompt"] * 3 in cache.batches and ["finish"] * 3 in cache.batches
    assert sum(map(len, cache.batches)) == 6
    fresh = ModelRunner(model, max_slots=1)
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out) == 4
        # the prompt's end, and the finish: the state after every token but the last sampled one
        for tokens in (prompt, (*prompt, *out[:-1])):
            fresh.reset(0)
            fresh.prefill(tokens, 0)
            want = fresh.capture(0)
            for name, got in _exact(cache, tokens).items():
                torch.testing.assert_close(got, want[name], atol=1e-5, rtol=1e-4)


class _Failing(_Recording):
    """The real cache, failing every batch that holds a capture of `poison`'s tokens (a fault injected)."""

    def __init__(self, poison: Sequence[int], *args: Any) -> None:
        super().__init__(*args)
        self.poison = tuple(poison)

    def capture_many(self, captures: Sequence[Capture], states: State) -> list[bool]:
        if any(tuple(c.tokens) == self.poison for c in captures):
            self.batches.append(["failed"])
            raise RuntimeError("injected capture failure")
        return super().capture_many(captures, states)


async def test_a_failed_batch_loses_only_its_bad_capture(model_dir: Path) -> None:
    model = load_model(model_dir)[1]
    runner = ModelRunner(model, max_slots=4)
    config = CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22, checkpoint_interval=1024)
    prompts = [_prompt(20, seed=10 + i) for i in range(3)]
    cache = _Failing(prompts[1], config, runner.state_spec())  # the second request's prompt end fails
    outs = await _serve_together(model_dir, runner, cache, prompts)
    assert [len(o) for o in outs] == [4, 4, 4]  # no request failed
    assert ["failed"] in cache.batches and ["prompt"] in cache.batches  # the batch, then one at a time
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        lease = cache.lookup("anon", None, [*prompt, 0])
        assert (lease is None) == (i == 1)  # only the poisoned checkpoint is missing
        if lease is not None:
            cache.release(lease)
        finish = cache.lookup("anon", None, [*prompt, *out])
        assert finish is not None and finish.position == len(prompt) + len(out) - 1
        cache.release(finish)


def test_stacking_keeps_a_passes_taps_in_place_and_copies_live_slots() -> None:
    taps = torch.randn(3, 2, 4, 5)  # a pass's taps: (taps, n_layer, ...)
    stacked = _stack(list(taps), owned=True)
    assert stacked.data_ptr() == taps.data_ptr() and torch.equal(stacked, taps)  # no copy
    copied = _stack(list(taps), owned=False)
    assert copied.data_ptr() != taps.data_ptr() and torch.equal(copied, taps)
    for layers in (2, 1):  # one layer: a slot's view is contiguous and equally spaced, still copied
        pool = torch.randn(layers, 3, 4, 5)  # (n_layer, slots, ...)
        live = [pool[:, slot] for slot in range(3)]
        out = _stack(live, owned=False)
        assert out.untyped_storage().data_ptr() != pool.untyped_storage().data_ptr()
        assert torch.equal(out, pool.transpose(0, 1))
    spaced = torch.randn(6, 4)
    assert torch.equal(_stack([spaced[0], spaced[2], spaced[5]], owned=True), spaced[[0, 2, 5]])  # uneven


class _Held(_Recording):
    """The real cache, whose captures for one of `reasons` wait until the test lets them through."""

    def __init__(self, *args: Any, reasons: frozenset[str] = frozenset({"prompt"})) -> None:
        super().__init__(*args)
        self.gate = threading.Event()
        self.reasons = reasons

    def capture_many(self, captures: Sequence[Capture], states: State) -> list[bool]:
        if any(c.reason in self.reasons for c in captures) and not self.gate.wait(timeout=30):
            raise RuntimeError("the gate was never opened")
        return super().capture_many(captures, states)


async def test_a_steps_tokens_are_delivered_before_its_captures_are_stored(model_dir: Path) -> None:
    """The first token reaches the client while the step's prompt capture is still to be stored: a
    capture's host work is not in the time to first token. The checkpoint is stored all the same."""
    model = load_model(model_dir)[1]
    runner = ModelRunner(model, max_slots=2)
    cache = _Held(CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32"), runner.state_spec())
    engine = Engine(runner, Tokenizer.from_pretrained(model_dir), cache, config=EngineConfig(max_slots=2))
    prompt = _prompt(20, seed=30)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.start()
    try:
        stream = engine.generate(GenerationRequest("r", prompt, params))
        first = await asyncio.wait_for(anext(stream), timeout=20)  # before the gate opens
        assert first.token_id is not None and cache.batches == []
        cache.gate.set()
        rest = [e.token_id async for e in stream]
    finally:
        cache.gate.set()
        await engine.stop()
    assert len(rest) == 2 and cache.batches[0] == ["prompt"]
    _assert_fresh_prefill_state(cache, model, prompt)


async def test_a_session_deleted_after_its_last_token_stays_deleted(model_dir: Path) -> None:
    """A client that deletes its session as soon as its request ended: the delete waits for that step's
    captures, still being stored, so that none of them brings the session back (CI caught this race)."""
    model = load_model(model_dir)[1]
    runner = ModelRunner(model, max_slots=1)
    config = CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22)
    cache = _Held(config, runner.state_spec(), reasons=frozenset({"prompt", "finish"}))
    engine = Engine(runner, Tokenizer.from_pretrained(model_dir), cache, config=EngineConfig(max_slots=1))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.start()
    try:
        stream = engine.generate(GenerationRequest("r", _prompt(20, seed=33), params, session_id="s"))
        assert len(await asyncio.wait_for(_tokens(stream), timeout=20)) == 1  # ended; captures held
        assert cache.batches == []
        delete = asyncio.create_task(engine.delete_session("anon", "s"))
        await asyncio.sleep(0.05)
        assert not delete.done()  # waiting for the held captures
        cache.gate.set()
        freed = await asyncio.wait_for(delete, timeout=20)
        assert cache.batches and freed is not None and freed > 0
        assert await engine.session_info("anon", "s") is None
    finally:
        cache.gate.set()
        await engine.stop()


def test_captures_deferred_by_a_step_are_stored_before_the_next_admission_writes_the_slot(
    model_dir: Path,
) -> None:
    """`execute(defer_captures=True)` leaves the captures queued; the next `admit` (which resets or restores
    the same slot) stores them first, so the checkpoint holds the state of its own tokens."""
    model = load_model(model_dir)[1]
    runner = ModelRunner(model, max_slots=1)
    cache = StateCache(
        CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32"), runner.state_spec()
    )
    worker = ModelWorker(runner, cache)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prompt = _prompt(20, seed=31)
    first = _seq(GenerationRequest("a", prompt, params), 0)
    assert worker.admit([first]) == [0]
    plan = StepPlan((PrefillChunk(first.entry, 0, len(prompt)),), ())
    result = worker.execute(plan, {"a": first}, defer_captures=True)
    assert len(result.events) == 1 and worker.captures_pending
    assert cache.lookup("anon", None, [*prompt, 0]) is None  # not stored yet
    other = _seq(GenerationRequest("b", _prompt(9, seed=32), params), 0)
    assert worker.admit([other]) == [0]  # a miss: the slot is reset
    assert not worker.captures_pending
    assert not any(t.any() for t in runner.slot_state(0).values())
    _assert_fresh_prefill_state(cache, model, prompt)


def test_a_queued_capture_builds_its_tokens_when_stored_and_copies_no_whole_prompt() -> None:
    prompt = tuple(range(1000, 1100))
    seq = _seq(GenerationRequest("q", prompt, SamplingParams()), 0)
    state = {"ssm": torch.zeros(1)}
    end = _Pending(seq, prompt, len(prompt), (), state, "prompt", owned=True)
    assert end.tokens() is prompt  # the prompt itself, not a copy
    assert _Pending(seq, prompt, 40, (), state, "boundary", owned=True).tokens() == prompt[:40]
    finish = _Pending(seq, prompt, len(prompt), (7, 8), state, "finish", owned=False)
    assert finish.tokens() == (*prompt, 7, 8)


def _assert_fresh_prefill_state(cache: StateCache, model: Any, tokens: tuple[int, ...]) -> None:
    """The cache's checkpoint at exactly `tokens` holds the state a fresh prefill of them leaves."""
    fresh = ModelRunner(model, max_slots=1)
    fresh.prefill(tokens, 0)
    for name, got in _exact(cache, tokens).items():
        torch.testing.assert_close(got, fresh.capture(0)[name], atol=1e-6, rtol=1e-6)


class _Segments(ModelRunner):
    """The torch runner, recording each batched prefill's segments as (slot, tokens, fresh)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.segs: list[tuple[int, int, bool]] = []

    def prefill_batch(self, segs: Sequence[PrefillSeg]) -> list[PrefillResult]:
        self.segs.extend((s.slot, len(s.tokens), s.fresh) for s in segs)
        return super().prefill_batch(segs)


async def test_only_a_prompts_first_chunk_without_a_restore_is_fresh(model_dir: Path) -> None:
    """A segment is marked fresh (its slot at the zero state, which a packed pass assumes) only when it starts
    the prompt with nothing restored: not a later chunk of the same prompt, not a follow-up resumed from a
    checkpoint."""
    runner = _Segments(load_model(model_dir)[1], max_slots=4)
    cache = _Recording(CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22), runner.state_spec())
    engine = Engine(
        runner, Tokenizer.from_pretrained(model_dir), cache, config=EngineConfig(4, prefill_budget=16)
    )
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    first = _prompt(40, seed=30)
    engine.start()
    try:
        out = await _tokens(engine.generate(GenerationRequest("a", first, params)))
        assert [(n, fresh) for _, n, fresh in runner.segs] == [(16, True), (16, False), (8, False)]
        runner.segs.clear()
        await _tokens(engine.generate(GenerationRequest("b", (*first, *out, *_prompt(5, seed=31)), params)))
    finally:
        await engine.stop()
    assert runner.segs and not any(
        fresh for _, _, fresh in runner.segs
    )  # resumed from the first turn's state


class _LiveEnds(ModelRunner):
    """The torch runner handing back its segments' end captures as the slots' live views
    (`PrefillResult.live`), as the GPU runner's packed pass does."""

    def prefill_batch(self, segs: Sequence[PrefillSeg]) -> list[PrefillResult]:
        ends = [len(s.tokens) if len(s.tokens) in s.capture_at else None for s in segs]
        inner = [
            PrefillSeg(s.tokens, s.slot, [p for p in s.capture_at if p != end], s.fresh)
            for s, end in zip(segs, ends, strict=True)
        ]
        return [
            out
            if end is None
            else PrefillResult(
                out.last_logits, out.all_logits, {**out.captures, end: self.slot_state(s.slot)}, (end,)
            )
            for out, s, end in zip(super().prefill_batch(inner), segs, ends, strict=True)
        ]


def _live_setup(model_dir: Path) -> tuple[ModelRunner, CacheConfig, list[tuple[int, ...]]]:
    runner = _LiveEnds(load_model(model_dir)[1], max_slots=4)
    config = CacheConfig(
        hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32", cold_dtype="fp32", checkpoint_interval=1024
    )
    return runner, config, [_prompt(20, seed=30 + i) for i in range(3)]


async def test_live_prompt_captures_are_copied_before_the_decode_launched_ahead(model_dir: Path) -> None:
    """The prompt-end checkpoints of a runner that hands them back as live views hold the state after the
    prompt, though the decode launched ahead in the same step writes those slots right after the sampling."""
    runner, config, prompts = _live_setup(model_dir)
    cache = _Recording(config, runner.state_spec())
    outs = await _serve_together(model_dir, runner, cache, prompts, decode_ahead=True)
    assert ["prompt"] * 3 in cache.batches  # one step's three live captures, stored together
    fresh = ModelRunner(load_model(model_dir)[1], max_slots=1)
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out) == 4
        fresh.reset(0)
        fresh.prefill(prompt, 0)
        for name, got in _exact(cache, prompt).items():
            torch.testing.assert_close(got, fresh.capture(0)[name], atol=1e-5, rtol=1e-4)


async def test_a_failed_copy_of_live_captures_loses_them_and_fails_no_request(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.engine import worker

    def failing(states: Any) -> Any:
        raise RuntimeError("injected copy failure")

    monkeypatch.setattr(worker, "_stack_states", failing)  # a fault injected (out of memory, say)
    runner, config, prompts = _live_setup(model_dir)
    cache = _Recording(config, runner.state_spec())
    outs = await _serve_together(model_dir, runner, cache, prompts, decode_ahead=True)
    assert [len(o) for o in outs] == [4, 4, 4]  # every request answered
    for prompt, out in zip(prompts, outs, strict=True):
        assert cache.lookup("anon", None, [*prompt, 0]) is None  # the prompt's checkpoint was dropped
        finish = cache.lookup("anon", None, [*prompt, *out])  # the finish's, stacked at the flush, was not
        assert finish is not None and finish.position == len(prompt) + len(out) - 1
        cache.release(finish)


class _Order(ModelRunner):
    """The torch runner, logging its decode launches into `log` (shared with an `_OrderCache`)."""

    def __init__(self, *args: Any, log: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = log

    def decode(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        self.log.append("decode")
        return super().decode(tokens, slots)


class _OrderCache(StateCache):
    def __init__(self, *args: Any, log: list[str]) -> None:
        super().__init__(*args)
        self.log = log

    def capture_many(self, captures: Sequence[Capture], states: State) -> list[bool]:
        self.log.extend(f"store {c.reason}" for c in captures)
        return super().capture_many(captures, states)


def _held_setup(model_dir: Path) -> tuple[Any, ModelRunner, StateCache, ModelWorker, list[str]]:
    model, log = load_model(model_dir)[1], []
    runner = _Order(model, max_slots=2, log=log)
    config = CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32", checkpoint_interval=1024)
    cache = _OrderCache(config, runner.state_spec(), log=log)
    return model, runner, cache, ModelWorker(runner, cache, decode_ahead=False), log


def _prefill_step(worker: ModelWorker, seq: Any) -> None:
    """Admit `seq` and prefill its whole prompt in one step, its captures deferred."""
    prompt = seq.req.prompt_tokens
    worker.admit([seq])
    plan = StepPlan((PrefillChunk(seq.entry, 0, len(prompt)),), ())
    assert len(worker.execute(plan, {seq.request_id: seq}, defer_captures=True).events) == 1


def test_a_steps_captures_held_for_the_next_step_are_stored_after_its_launches(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`settle_captures(carry=True)` holds a step's owned captures; the next step stores them once its own
    device work is launched (its decode here) and before it waits for its sampled tokens, and each holds
    its own tokens' state."""
    from server.engine import worker as worker_module

    model, _, cache, worker, log = _held_setup(model_dir)
    wait = worker_module._HostCopy.wait
    monkeypatch.setattr(worker_module._HostCopy, "wait", lambda self: (log.append("wait"), wait(self))[1])
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompt = _prompt(20, seed=40)
    seq = _seq(GenerationRequest("a", prompt, params), 0)
    _prefill_step(worker, seq)
    log.clear()
    worker.settle_captures(carry=True)
    assert worker.captures_pending and log == []  # held, not stored
    assert cache.lookup("anon", None, [*prompt, 0]) is None
    worker.execute(StepPlan((), (seq.entry,)), {"a": seq}, defer_captures=True)
    assert log == ["decode", "store prompt", "wait"]  # stored behind the next step's launch
    assert not worker.captures_pending
    _assert_fresh_prefill_state(cache, model, prompt)


def test_a_held_capture_an_admitted_prompt_extends_is_stored_before_its_lookup(model_dir: Path) -> None:
    """A request admitted while a prompt's checkpoint is held, whose prompt extends that prompt (a shared
    system prompt, a follow-up), resumes from it: `admit` stores what may serve it before the lookup. An
    unrelated request leaves it held."""
    _, _, _, worker, log = _held_setup(model_dir)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompt = _prompt(20, seed=41)
    _prefill_step(worker, _seq(GenerationRequest("a", prompt, params), 0))
    worker.settle_captures(carry=True)
    other = _seq(GenerationRequest("b", _prompt(30, seed=42), params), 1)
    assert worker.admit([other]) == [0] and worker.captures_pending and log == []
    worker.runner.reset(1)
    longer = _seq(GenerationRequest("c", (*prompt, *_prompt(6, seed=43)), params), 1)
    assert worker.admit([longer]) == [len(prompt)]  # resumed from the held checkpoint
    assert log == ["store prompt"] and not worker.captures_pending


def test_captures_that_are_views_or_too_big_or_last_are_stored_at_once(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not held: a finish's capture (the slot's live views, which the next admission may overwrite),
    captures above `CARRY_BYTES`, and any when no step follows (`carry=False`)."""
    from server.engine import worker as worker_module

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    _, _, _, worker, log = _held_setup(model_dir)
    seq = _seq(GenerationRequest("a", _prompt(20, seed=44), params), 0)
    _prefill_step(worker, seq)
    worker.settle_captures(carry=False)
    log.clear()
    worker.execute(StepPlan((), (seq.entry,)), {"a": seq}, defer_captures=True)  # ends: a finish
    worker.settle_captures(carry=True)
    assert log == ["decode", "store finish"] and not worker.captures_pending
    longer = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for limit, carry in ((0, True), (1 << 30, False)):
        monkeypatch.setattr(worker_module, "CARRY_BYTES", limit)
        log.clear()
        _prefill_step(worker, _seq(GenerationRequest(f"b{limit}", _prompt(20, seed=45 + limit), longer), 1))
        worker.settle_captures(carry=carry)
        assert log == ["store prompt"] and not worker.captures_pending


async def test_a_checkpoint_held_for_the_next_step_is_waited_for_and_survives_an_abort(
    model_dir: Path,
) -> None:
    """`session_info` waits for a prompt checkpoint held for the next step (stored in it); and one held
    for a step that never comes, its request aborted after the first token, is still stored."""
    model = load_model(model_dir)[1]
    runner = ModelRunner(model, max_slots=2)
    cache = _Held(CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32"), runner.state_spec())
    engine = Engine(
        runner,
        Tokenizer.from_pretrained(model_dir),
        cache,
        config=EngineConfig(max_slots=2, decode_ahead=False),
    )
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    first, second = _prompt(20, seed=46), _prompt(24, seed=47)
    engine.start()
    try:
        stream = engine.generate(GenerationRequest("a", first, params, session_id="s"))
        assert (await asyncio.wait_for(anext(stream), timeout=20)).token_id is not None
        info = asyncio.create_task(engine.session_info("anon", "s"))
        await asyncio.sleep(0.1)
        assert not info.done() and cache.batches == []  # waiting for the held capture
        cache.gate.set()
        got = await asyncio.wait_for(info, timeout=20)
        assert got is not None and cache.batches[0] == ["prompt"]
        await stream.aclose()
        cache.gate.clear()
        cache.batches.clear()
        stream = engine.generate(GenerationRequest("b", second, params))
        assert (await asyncio.wait_for(anext(stream), timeout=20)).token_id is not None
        await stream.aclose()  # aborted: no further step, the held capture is stored before idling
        cache.gate.set()
        for _ in range(200):
            if cache.batches:
                break
            await asyncio.sleep(0.01)
        assert cache.batches == [["prompt"]]
    finally:
        cache.gate.set()
        await engine.stop()
    _assert_fresh_prefill_state(cache, model, first)
    _assert_fresh_prefill_state(cache, model, second)
