"""The engine on a tiny seeded Mamba2: continuous batching, cache resume, abort, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from cache.config import CacheConfig
from cache.manager import StateCache
from server.engine import Engine, EngineConfig, build_engine
from server.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from server.metrics import Metrics
from server.model.loader import load_model
from server.model.runner import ModelRunner
from server.model.tokenizer import Tokenizer
from server.settings import Settings
from tests.tiny_models import make_chat_model_dir

TOK_VOCAB = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-mamba2"), seed=3, tok_vocab=TOK_VOCAB)


def _lossless_cache(runner: ModelRunner, interval: int = 8) -> StateCache:
    config = CacheConfig(
        hot_bytes=2**22, cold_bytes=2**23, hot_dtype="fp32", cold_dtype="fp32", checkpoint_interval=interval
    )
    return StateCache(config, runner.state_spec())


def _make_engine(
    model_dir: Path,
    slots: int = 4,
    cache: bool = False,
    budget: int = 16,
    metrics: Metrics | None = None,
    gather: tuple[float, float] = (0.0, 0.001),
) -> Engine:
    runner = ModelRunner(load_model(model_dir)[1], max_slots=slots)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    state_cache = _lossless_cache(runner) if cache else None
    config = EngineConfig(
        max_slots=slots, prefill_budget=budget, gather_seconds=gather[0], gather_gap_seconds=gather[1]
    )
    return Engine(runner, tokenizer, state_cache, metrics=metrics, config=config)


def _prompt(n: int, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(5, TOK_VOCAB, (n,), generator=g).tolist())


def _req(
    rid: str,
    prompt: Sequence[int],
    max_tokens: int = 10,
    session: str | None = None,
    boundaries: Sequence[int] = (),
    tree: str | None = None,
    **params: object,
) -> GenerationRequest:
    fields: dict[str, object] = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    sp = SamplingParams(**{**fields, **params})  # type: ignore[arg-type]
    bounds = tuple(boundaries)
    return GenerationRequest(rid, tuple(prompt), sp, session_id=session, boundaries=bounds, tree=tree)


async def _collect(engine: Engine, req: GenerationRequest) -> list[TokenEvent]:
    return [e async for e in engine.generate(req)]


def _tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


@contextlib.asynccontextmanager
async def _running(engine: Engine) -> AsyncIterator[Engine]:
    engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def _alone(model_dir: Path, reqs: Sequence[GenerationRequest]) -> list[list[int]]:
    async with _running(_make_engine(model_dir, slots=1)) as engine:
        return [_tokens(await _collect(engine, r)) for r in reqs]


async def test_batched_continuous_decoding_matches_each_request_alone(model_dir: Path) -> None:
    prompts = [_prompt(n, seed=n) for n in (5, 23, 9, 40, 2, 17)]
    reqs = [_req(f"r{i}", p, max_tokens=6 + 3 * i) for i, p in enumerate(prompts)]
    expected = await _alone(model_dir, reqs)
    async with _running(_make_engine(model_dir, slots=3, budget=10)) as engine:

        async def staggered(i: int, r: GenerationRequest) -> list[int]:
            await asyncio.sleep(0.01 * i)  # later arrivals join a batch already decoding
            return _tokens(await _collect(engine, r))

        got = await asyncio.gather(*(staggered(i, r) for i, r in enumerate(reqs)))
        assert engine.num_running == 0 and engine.num_free_slots == 3
    assert got == expected
    assert [len(t) for t in got] == [r.params.max_tokens for r in reqs]


async def test_final_event_carries_usage_and_finish_reason(model_dir: Path) -> None:
    async with _running(_make_engine(model_dir)) as engine:
        events = await _collect(engine, _req("u", _prompt(12, 1), max_tokens=5))
    assert [e.finish_reason for e in events] == [None] * 4 + [FinishReason.LENGTH]
    last = events[-1]
    assert (last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (12, 5, 0)
    assert {"ttft_s", "queue_s", "duration_s"} <= set(last.extra)
    assert "".join(e.text for e in events) == engine.tokenizer.decode(_tokens(events))


async def test_resumed_follow_up_equals_a_cold_run_with_a_lossless_cache(model_dir: Path) -> None:
    turn1 = _prompt(30, seed=11)
    async with _running(_make_engine(model_dir, cache=True)) as engine:
        first = await _collect(engine, _req("t1", turn1, max_tokens=7, session="s"))
        reply = _tokens(first)
        turn2 = turn1 + tuple(reply) + _prompt(13, seed=12)
        second = await _collect(engine, _req("t2", turn2, max_tokens=12, session="s"))
    assert first[-1].cached_tokens == 0
    assert second[-1].cached_tokens == len(turn1) + len(reply) - 1  # the last reply token is never fed
    (cold,) = await _alone(model_dir, [_req("cold", turn2, max_tokens=12)])
    assert _tokens(second) == cold


async def test_edit_resumes_from_a_message_boundary(model_dir: Path) -> None:
    base = _prompt(26, seed=21)
    boundaries = (6, 15, 26)
    async with _running(_make_engine(model_dir, cache=True)) as engine:
        await _collect(engine, _req("a", base, max_tokens=3, session="e", boundaries=boundaries))
        edited = base[:15] + _prompt(9, seed=22)  # message 3 changed
        events = await _collect(engine, _req("b", edited, max_tokens=8, session="e"))
        other = await _collect(engine, _req("c", edited, max_tokens=8, session="other"))
        salted = await _collect(engine, _req("d", edited, max_tokens=8, session="x", tree="anon|salt-1"))
    assert events[-1].cached_tokens == 15
    # a namespace's sessions share one prefix tree: "other" resumes from what "b" captured (its prompt end
    # or boundaries; the last prompt token is always prefilled)
    assert other[-1].cached_tokens > 15
    assert salted[-1].cached_tokens == 0  # another tree shares nothing
    (cold,) = await _alone(model_dir, [_req("cold", edited, max_tokens=8)])
    assert _tokens(events) == cold == _tokens(other) == _tokens(salted)


async def test_closing_the_stream_aborts_and_frees_the_slot_at_once(model_dir: Path) -> None:
    async with _running(_make_engine(model_dir, slots=1)) as engine:
        stream = engine.generate(_req("long", _prompt(8, 2), max_tokens=10_000))
        await anext(stream)
        assert engine.num_running == 1
        await stream.aclose()
        assert engine.num_running == 0 and engine.num_free_slots == 1
        events = await asyncio.wait_for(_collect(engine, _req("next", _prompt(8, 3), max_tokens=3)), 10)
        assert events[-1].finish_reason == FinishReason.LENGTH


class _Sink:
    """An `EventSink` that keeps what it is given, as the engine core's forwarding does."""

    def __init__(self) -> None:
        self.items: list[TokenEvent | BaseException] = []
        self.ended = asyncio.Event()

    def put_nowait(self, item: TokenEvent | BaseException) -> None:
        self.items.append(item)
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.ended.set()


async def test_run_into_delivers_the_same_events_as_generate_straight_to_a_sink(model_dir: Path) -> None:
    prompts = [_prompt(n, seed=n) for n in (5, 23, 9)]
    reqs = [_req(f"r{i}", p, max_tokens=4 + 3 * i) for i, p in enumerate(prompts)]
    expected = await _alone(model_dir, reqs)
    async with _running(_make_engine(model_dir, slots=3)) as engine:
        sinks = [_Sink() for _ in reqs]
        for r, sink in zip(reqs, sinks, strict=True):
            await engine.run_into(r, sink)
        await asyncio.wait_for(asyncio.gather(*(s.ended.wait() for s in sinks)), 30)
        assert engine.num_running == 0 and engine.num_free_slots == 3
        with pytest.raises(ValueError, match="empty"):  # refused before it is queued, as by `generate`
            await engine.run_into(_req("e", ()), _Sink())
    got = [[e.token_id for e in s.items if isinstance(e, TokenEvent)] for s in sinks]
    assert got == expected
    assert all(s.items[-1].finish_reason == FinishReason.LENGTH for s in sinks)  # type: ignore[union-attr]


async def test_abort_ends_a_request_run_into_a_sink_and_frees_its_slot(model_dir: Path) -> None:
    async with _running(_make_engine(model_dir, slots=1)) as engine:
        sink = _Sink()
        await engine.run_into(_req("long", _prompt(8, 2), max_tokens=10_000), sink)
        while not sink.items:
            await asyncio.sleep(0.01)
        engine.abort("long")
        engine.abort("long")  # twice, and an unknown id: ignored
        engine.abort("nobody")
        assert engine.num_running == 0 and engine.num_free_slots == 1
        delivered = len(sink.items)
        events = await asyncio.wait_for(_collect(engine, _req("next", _prompt(8, 3), max_tokens=3)), 10)
        assert events[-1].finish_reason == FinishReason.LENGTH
        assert len(sink.items) == delivered and not sink.ended.is_set()  # nothing after the abort


async def test_cancelling_the_consumer_aborts_a_waiting_request(model_dir: Path) -> None:
    async with _running(_make_engine(model_dir, slots=1)) as engine:
        hog = engine.generate(_req("hog", _prompt(8, 2), max_tokens=10_000))
        await anext(hog)
        waiter = asyncio.create_task(_collect(engine, _req("w", _prompt(8, 4), max_tokens=3)))
        await asyncio.sleep(0.05)
        assert engine.num_waiting == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert engine.num_waiting == 0 and engine.num_running == 1
        await hog.aclose()
        assert engine.num_free_slots == 1


async def test_seeded_sampling_is_reproducible_inside_a_batch(model_dir: Path) -> None:
    prompt = _prompt(10, 5)
    sampled: dict[str, Any] = {"temperature": 1.0, "top_k": 50, "seed": 1234}
    async with _running(_make_engine(model_dir, slots=3)) as engine:
        alone = _tokens(await _collect(engine, _req("s1", prompt, max_tokens=12, **sampled)))
        crowd = await asyncio.gather(
            _collect(engine, _req("s2", prompt, max_tokens=12, **sampled)),
            _collect(engine, _req("n1", _prompt(20, 6), max_tokens=12, temperature=1.0)),
            _collect(engine, _req("n2", _prompt(3, 7), max_tokens=12, temperature=0.7)),
        )
        other_seed = _tokens(
            await _collect(engine, _req("s3", prompt, max_tokens=12, **{**sampled, "seed": 99}))
        )
    assert _tokens(crowd[0]) == alone
    assert other_seed != alone


async def test_eos_and_stop_token_ids_finish_with_stop(model_dir: Path) -> None:
    prompt = _prompt(10, 8)
    async with _running(_make_engine(model_dir)) as engine:
        free = _tokens(await _collect(engine, _req("f", prompt, max_tokens=6)))
        stop_at = free[3]
        events = await _collect(engine, _req("s", prompt, max_tokens=6, stop_token_ids=(stop_at,)))
    assert _tokens(events) == free[: free.index(stop_at) + 1]
    assert events[-1].finish_reason == FinishReason.STOP


async def test_invalid_requests_are_rejected_before_queueing(model_dir: Path) -> None:
    async with _running(_make_engine(model_dir)) as engine:
        with pytest.raises(ValueError):
            await _collect(engine, _req("bad", (5, TOK_VOCAB + 3)))
        with pytest.raises(ValueError):
            await _collect(engine, _req("empty", ()))
        assert engine.num_waiting == 0 and engine.num_running == 0


async def test_a_follow_up_is_checked_past_its_sessions_last_checked_prompt_and_no_further(
    model_dir: Path,
) -> None:
    prompt = _prompt(12, 4)
    async with _running(_make_engine(model_dir)) as engine:
        await _collect(engine, _req("ok", prompt, max_tokens=1, session="v"))
        for rid, bad in [
            ("past", (*prompt, 7, TOK_VOCAB)),
            ("neg", (*prompt, -1)),
            ("edit", (-2, *prompt[1:])),
            ("sibling", (*prompt[:-1], TOK_VOCAB)),  # past the prefix it shares with the checked prompt
        ]:
            with pytest.raises(ValueError, match="must lie in"):
                await _collect(engine, _req(rid, bad, max_tokens=1, session="v"))
        # a rejected prompt is not remembered as checked: the same bad ids with more after them still fail
        with pytest.raises(ValueError, match="must lie in"):
            await _collect(engine, _req("again", (*prompt, 7, TOK_VOCAB, 9, 10), max_tokens=1, session="v"))
        events = await _collect(engine, _req("longer", (*prompt, 7, 8), max_tokens=1, session="v"))
        assert events[-1].prompt_tokens == len(prompt) + 2
        assert engine.num_waiting == 0 and engine.num_running == 0


async def test_metrics_record_cached_and_computed_prompt_tokens(model_dir: Path) -> None:
    metrics = Metrics(process_collectors=False)
    prompt = _prompt(20, 9)
    async with _running(_make_engine(model_dir, cache=True, metrics=metrics)) as engine:
        events = await _collect(engine, _req("m1", prompt, max_tokens=4, session="m"))
        await _collect(engine, _req("m2", prompt + tuple(_tokens(events)), max_tokens=4, session="m"))
    value = lambda name, **labels: metrics.registry.get_sample_value(name, labels)
    assert value("tssc_prompt_tokens_total", source="cached") == 20 + 4 - 1
    assert value("tssc_prompt_tokens_total", source="computed") == 20 + 1
    assert value("tssc_requests_total", finish_reason="length") == 2
    assert value("tssc_generation_tokens_total") == 8
    assert value("tssc_time_to_first_token_seconds_count") == 2
    assert value("tssc_inter_token_latency_seconds_count") == 6


class _SlowDecode(ModelRunner):
    """The real runner, whose decode pass takes `DELAY` seconds more (as a long GPU pass would)."""

    DELAY = 0.3

    def decode(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        time.sleep(self.DELAY)
        return super().decode(tokens, slots)


async def test_the_prefill_phase_lasts_until_the_first_token_is_on_the_host(model_dir: Path) -> None:
    """A prompt prefilled in a step beside another request's decode has its first token once the step has
    sampled, after that decode: the wait counts in its prefill phase, and first_token is its delivery alone."""
    metrics = Metrics(process_collectors=False)
    runner = _SlowDecode(load_model(model_dir)[1], max_slots=2)
    config = EngineConfig(max_slots=2, prefill_budget=64)
    engine = Engine(runner, Tokenizer.from_pretrained(model_dir), None, metrics=metrics, config=config)
    phases = lambda: {
        p: metrics.registry.get_sample_value("tssc_request_phase_seconds_sum", {"phase": p}) or 0.0
        for p in ("prefill", "first_token")
    }
    async with _running(engine):
        decoding = engine.generate(_req("a", _prompt(8, 1), max_tokens=6))
        await anext(decoding)  # from now on every step decodes "a", DELAY seconds each
        before = phases()
        assert len(await _collect(engine, _req("b", _prompt(12, 2), max_tokens=1))) == 1
        after = phases()
        assert len([e async for e in decoding]) == 5
    assert after["prefill"] - before["prefill"] >= 0.9 * _SlowDecode.DELAY
    assert after["first_token"] - before["first_token"] < _SlowDecode.DELAY / 3


async def test_build_engine_from_settings_serves_a_chat(model_dir: Path) -> None:
    settings = Settings(
        model=str(model_dir),
        device="cpu",
        max_num_seqs=2,
        hot_dtype="fp32",
        prefill_budget=7,
        decode_prefill_budget=5,
    )
    metrics = Metrics(process_collectors=False)
    engine = await asyncio.to_thread(build_engine, settings, metrics)
    assert engine.cache is not None and not engine.ready
    assert engine.config.prefill_budget == 7 and engine.config.max_slots == 2
    assert engine.config.decode_prefill_budget == 5
    tokens, boundaries = engine.tokenizer.encode_chat([{"role": "user", "content": "hello world"}])
    async with _running(engine):
        assert engine.ready
        req = GenerationRequest(
            "chat", tuple(tokens), SamplingParams(max_tokens=4), boundaries=tuple(boundaries)
        )
        events = await _collect(engine, req)
    assert events[-1].finish_reason is not None and not engine.ready
    assert (
        metrics.registry.get_sample_value(
            "tssc_model_info",
            {"model": settings.model_name, "arch": "mamba2", "dtype": "fp32", "device": "cpu"},
        )
        == 1
    )


async def test_presence_penalty_prevents_repeats_and_logprobs_come_back(model_dir: Path) -> None:
    prompt = _prompt(6, 13)
    async with _running(_make_engine(model_dir, slots=2)) as engine:
        plain, penalised = await asyncio.gather(
            _collect(engine, _req("plain", prompt, max_tokens=40)),
            _collect(
                engine,
                _req("pen", prompt, max_tokens=40, presence_penalty=1e4, logprobs=True, top_logprobs=3),
            ),
        )
    assert len(set(_tokens(plain))) < 40  # the tiny model repeats itself without a penalty
    assert len(set(_tokens(penalised))) == 40
    assert all(e.logprob is None for e in plain)
    first = penalised[0]  # no output yet: the penalty cannot matter, so greedy = the raw argmax
    assert first.logprob is not None and len(first.top_logprobs) == 3
    assert first.top_logprobs[0].token_id == first.token_id
    assert first.top_logprobs[0].logprob == pytest.approx(first.logprob)


async def test_session_operations_and_stats_go_through_the_engine(model_dir: Path) -> None:
    async with _running(_make_engine(model_dir, cache=True)) as engine:
        await _collect(engine, _req("s1", _prompt(20, 21), max_tokens=3, session="kept"))
        info = await engine.session_info("anon", "kept")
        assert info is not None and info["checkpoints"]
        stats = await engine.stats()
        assert (stats.num_running, stats.num_waiting) == (0, 0)
        assert stats.cache is not None and stats.cache.sessions == 1
        assert (await engine.delete_session("anon", "kept") or 0) > 0
        assert await engine.session_info("anon", "kept") is None
        assert await engine.delete_session("anon", "kept") is None
    async with _running(_make_engine(model_dir, cache=False)) as uncached:
        assert await uncached.session_info("anon", "kept") is None
        assert (await uncached.stats()).cache is None


async def test_the_debug_line_of_a_prefill_step_says_where_its_time_went(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the debug log on, each step with prefill logs its admission, the worker's laps (flush, prefill,
    decode, sample, storing the captures held from the last step, wait for the tokens, finish), the worker
    round trip beyond them and the delivery, and
    those parts add up to no more than the step's wall time; with it off, the worker keeps no clock."""
    caplog.set_level(logging.DEBUG, logger="server.engine")
    async with _running(_make_engine(model_dir, cache=True)) as engine:
        await asyncio.gather(
            *(_collect(engine, _req(f"d{i}", _prompt(9, i), max_tokens=3)) for i in range(2))
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step: ")]
    assert lines, "no step line"
    for line in lines:
        wall = float(re.search(r": ([\d.]+) ms \(", line).group(1))  # type: ignore[union-attr]
        parts = dict((k, float(v)) for k, v in re.findall(r"(\w+) ([\d.-]+)", line.split("(", 1)[1]))
        assert set(parts) == {
            "admit",
            "flush",
            "prefill",
            "decode",
            "sample",
            "stored",
            "wait",
            "finish",
            "handoff",
            "apply",
        }
        assert all(v >= 0 for k, v in parts.items() if k != "handoff")
        inside = sum(v for k, v in parts.items() if k not in ("admit", "apply"))  # the worker call
        assert inside <= wall + 0.2 and parts["handoff"] > -0.2
    assert any(r.getMessage().startswith("step captures stored: ") for r in caplog.records)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="server.engine")
    async with _running(_make_engine(model_dir)) as engine:
        await _collect(engine, _req("q", _prompt(9, 5), max_tokens=2))
        assert engine._worker._clock is None
    assert not [r for r in caplog.records if r.getMessage().startswith("step: ")]


async def _first_step_rows(
    model_dir: Path, caplog: pytest.LogCaptureFixture, gather: tuple[float, float], prompts: int,
    apart: float = 0.03, slots: int = 4, budget: int = 64,
) -> tuple[int, float]:  # fmt: skip
    """Prompts of 9 tokens sent `apart` seconds apart to an idle engine -> (the rows of its first prefill step,
    seconds until every request finished)."""
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="server.engine")
    began = time.monotonic()
    async with _running(_make_engine(model_dir, slots=slots, budget=budget, gather=gather)) as engine:
        tasks = []
        for i in range(prompts):
            tasks.append(asyncio.create_task(_collect(engine, _req(f"g{i}", _prompt(9, i), max_tokens=2))))
            await asyncio.sleep(apart)
        results = await asyncio.gather(*tasks)
    assert all(len(_tokens(events)) == 2 for events in results)
    first = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step: "))
    return int(re.match(r"step: (\d+) prefill rows", first).group(1)), time.monotonic() - began  # type: ignore[union-attr]


async def test_from_idle_a_burst_shares_the_first_step(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests arriving closer together than the gap join the first step; without the wait, the first step
    starts at the first arrival and holds it alone."""
    assert (await _first_step_rows(model_dir, caplog, (10.0, 1.0), prompts=3))[0] == 3
    assert (await _first_step_rows(model_dir, caplog, (0.0, 1.0), prompts=3))[0] == 1


async def test_the_first_steps_wait_ends_at_a_gap_a_full_budget_or_full_slots(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The wait never runs to its cap of 30 s here: a lone request waits one gap (0.2 s); two prompts that
    fill the prefill budget (16 tokens), or the free slots (2), start at once although the gap is 30 s."""
    rows, took = await _first_step_rows(model_dir, caplog, (30.0, 0.2), prompts=1)
    assert rows == 1 and took < 10
    rows, took = await _first_step_rows(model_dir, caplog, (30.0, 30.0), prompts=2, budget=16)
    assert rows == 2 and took < 10
    rows, took = await _first_step_rows(model_dir, caplog, (30.0, 30.0), prompts=2, slots=2)
    assert rows == 2 and took < 10


async def test_a_request_cancelled_during_the_first_steps_wait_leaves_nothing_behind(model_dir: Path) -> None:
    """A client gone while the idle engine waits for more (a 30 s cap, 0.5 s gaps): its request leaves the
    queue, the wait ends, and the next request is served as it would be alone, every slot free after."""
    want = (await _alone(model_dir, [_req("b", _prompt(9, 2), max_tokens=4)]))[0]
    async with _running(_make_engine(model_dir, slots=2, gather=(30.0, 0.5))) as engine:
        gone = asyncio.create_task(_collect(engine, _req("a", _prompt(9, 1), max_tokens=4)))
        await asyncio.sleep(0.1)
        assert engine.num_waiting == 1 and engine.num_running == 0  # held by the wait
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert engine.num_waiting == 0
        began = time.monotonic()
        assert _tokens(await _collect(engine, _req("b", _prompt(9, 2), max_tokens=4))) == want
        assert time.monotonic() - began < 10  # one gap, not the cap
        assert engine.num_free_slots == 2
