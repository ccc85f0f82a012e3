"""Restores decode straight into the request's live slot: a follow-up turn admitted into a slot other than
0, with other slots live, gets the checkpoint and leaves the other slots untouched; a failed fetch (a
corrupt disk file) leaves a reset slot; through the engine, concurrent requests are unaffected."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from cache.config import CacheConfig
from cache.manager import StateCache
from server.engine import Engine, EngineConfig, EngineNotReady
from server.engine.request import Seq
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from server.engine.worker import ModelWorker
from server.model.lm import MambaLM
from server.model.loader import load_model
from server.model.runner import ModelRunner
from server.model.tokenizer import Tokenizer
from tests.tiny_models import make_chat_model_dir

SLOTS, SLOT = 4, 2  # the follow-up lands in slot 2; 0, 1 and 3 hold other live sequences
TOK_VOCAB = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-mamba2-restore"), seed=5, tok_vocab=TOK_VOCAB)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> MambaLM:
    return load_model(model_dir)[1]


def _prompt(n: int, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(5, TOK_VOCAB, (n,), generator=g).tolist())


def _req(
    rid: str, prompt: Sequence[int], max_tokens: int = 4, session: str | None = None
) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(rid, tuple(prompt), params, session_id=session)


def _seq(req: GenerationRequest, slot: int) -> Seq:
    seq = Seq.create(req, lambda ids: "", (), time.monotonic())
    seq.entry.slot = seq.slot = slot
    return seq


def _make_cache(runner: ModelRunner, **kw: Any) -> StateCache:
    cfg: dict[str, Any] = {"hot_bytes": 1 << 22, "cold_bytes": 1 << 22}
    cfg.update(kw)
    return StateCache(CacheConfig(**cfg), runner.state_spec())


def _fill_slots(runner: ModelRunner) -> dict[str, torch.Tensor]:
    """Live, distinct states in every slot (the follow-up's slot too: it must be overwritten); a copy."""
    for slot in range(SLOTS):
        runner.prefill(_prompt(9 + slot, seed=100 + slot), slot)
    return {"conv": runner.pool.conv.clone(), "ssm": runner.pool.ssm.clone()}


def _assert_others_untouched(runner: ModelRunner, before: dict[str, torch.Tensor]) -> None:
    pool = {"conv": runner.pool.conv, "ssm": runner.pool.ssm}
    for name, t in pool.items():
        for slot in range(SLOTS):
            if slot != SLOT:
                assert torch.equal(t[:, slot], before[name][:, slot]), (name, slot)


@pytest.mark.parametrize(("hot", "cold"), [("fp32", "fp32"), ("fp8", "fp16")])
def test_follow_up_restores_into_its_slot_and_nowhere_else(model: MambaLM, hot: str, cold: str) -> None:
    runner = ModelRunner(model, max_slots=SLOTS)
    cache = _make_cache(runner, hot_dtype=hot, cold_dtype=cold)
    turn1 = _prompt(21, seed=1)
    runner.prefill(turn1, 0)
    exact = runner.capture(0)
    assert cache.capture("anon", "s", turn1, exact, reason="prompt")
    before = _fill_slots(runner)
    turn2 = turn1 + _prompt(7, seed=2)
    worker = ModelWorker(runner, cache)
    assert worker.admit([_seq(_req("t2", turn2, session="s"), SLOT)]) == [len(turn1)]
    _assert_others_untouched(runner, before)
    lease = cache.lookup("anon", "s", turn2)
    assert lease is not None
    expected = cache.fetch(lease)  # the same checkpoint decoded into fresh tensors
    cache.release(lease)
    for name, tensor in runner.slot_state(SLOT).items():
        assert torch.equal(tensor, expected[name]), name
        if hot == "fp32":
            assert torch.equal(tensor, exact[name]), name
    if hot == "fp32":  # the handoff: resuming in slot 2 == one prefill of the whole prompt
        resumed = runner.prefill(turn2[len(turn1) :], SLOT).last_logits
        whole = ModelRunner(model, max_slots=1).prefill(turn2, 0).last_logits
        torch.testing.assert_close(resumed, whole, atol=1e-5, rtol=1e-4)


def test_a_failed_fetch_leaves_a_reset_slot(model: MambaLM, tmp_path: Path) -> None:
    runner = ModelRunner(model, max_slots=SLOTS)
    kw: dict[str, Any] = {"hot_bytes": 0, "disk_dir": tmp_path, "disk_bytes": 1 << 24}
    turn1 = _prompt(17, seed=3)
    runner.prefill(turn1, 0)
    writer = _make_cache(runner, **kw)
    assert writer.capture("anon", "s", turn1, runner.capture(0), reason="prompt")
    writer.close()  # to disk; the restarted cache below finds the checkpoint only there
    (path,) = sorted(tmp_path.glob("*/*.safetensors"))
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x40  # a flipped bit inside the tensor data (the header stays valid)
    path.write_bytes(bytes(raw))
    cache = _make_cache(runner, **kw)
    before = _fill_slots(runner)
    assert before["ssm"][:, SLOT].abs().sum() > 0
    worker = ModelWorker(runner, cache)
    assert worker.admit([_seq(_req("t2", (*turn1, 9, 9), session="s"), SLOT)]) == [0]
    for name, tensor in runner.slot_state(SLOT).items():
        assert not tensor.any(), name  # reset: prefilled from scratch
    _assert_others_untouched(runner, before)
    assert cache.stats().disk_corrupt == 1


def test_one_admission_zeroes_its_misses_together_and_restores_its_hits(model: MambaLM) -> None:
    """A batch of admissions: the slots of misses are zeroed (with one `reset_many`), hits hold their
    checkpoints, and the slots outside the batch, and the spare, are untouched."""
    runner = ModelRunner(model, max_slots=SLOTS, spare_slots=1)
    cache = _make_cache(runner, hot_dtype="fp32")
    turn1 = _prompt(21, seed=11)
    runner.prefill(turn1, 0)
    exact = runner.capture(0)
    assert cache.capture("anon", "s", turn1, exact, reason="prompt")
    before = _fill_slots(runner)
    runner.pool.conv[:, SLOTS] = 3.0  # the spare row
    resets: list[list[int]] = []
    batched = runner.reset_many

    def reset_many(slots: Sequence[int]) -> None:
        resets.append(list(slots))
        batched(slots)

    runner.reset_many = reset_many  # type: ignore[method-assign]
    seqs = [
        _seq(_req("miss-a", _prompt(9, seed=12)), 0),
        _seq(_req("hit", (*turn1, 5, 6), session="s"), SLOT),
        _seq(_req("miss-b", _prompt(9, seed=13)), 3),
    ]
    assert ModelWorker(runner, cache).admit(seqs) == [0, len(turn1), 0]
    assert resets == [[0, 3]]
    for name, tensor in runner.pool.views(0).items():
        assert not tensor.any() and not runner.pool.views(3)[name].any(), name
        assert torch.equal(runner.slot_state(SLOT)[name], exact[name]), name
        assert torch.equal(runner.pool.views(1)[name], before[name][:, 1]), name
    assert bool((runner.pool.conv[:, SLOTS] == 3.0).all())


def test_a_failed_reset_fails_the_fresh_admissions_alone(model: MambaLM) -> None:
    """The batched reset raising (a device error): the requests that needed it fail with that error; the one
    restored from a checkpoint is admitted."""
    runner = ModelRunner(model, max_slots=SLOTS)
    cache = _make_cache(runner, hot_dtype="fp32")
    turn1 = _prompt(21, seed=14)
    runner.prefill(turn1, 0)
    assert cache.capture("anon", "s", turn1, runner.capture(0), reason="prompt")
    error = RuntimeError("device lost")

    def reset_many(slots: Sequence[int]) -> None:
        raise error

    runner.reset_many = reset_many  # type: ignore[method-assign]
    seqs = [_seq(_req("miss", _prompt(9, seed=15)), 1), _seq(_req("hit", (*turn1, 5), session="s"), SLOT)]
    assert ModelWorker(runner, cache).admit(seqs) == [error, len(turn1)]


def _make_engine(model_dir: Path, slots: int, cache: bool) -> Engine:
    runner = ModelRunner(load_model(model_dir)[1], max_slots=slots)
    config = CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32", cold_dtype="fp32")
    state_cache = StateCache(config, runner.state_spec()) if cache else None
    tokenizer = Tokenizer.from_pretrained(model_dir)
    return Engine(runner, tokenizer, state_cache, config=EngineConfig(max_slots=slots, prefill_budget=64))


async def _run_each_alone(model_dir: Path, reqs: Sequence[GenerationRequest]) -> list[list[int]]:
    engine = _make_engine(model_dir, slots=1, cache=False)
    engine.start()
    try:
        return [_tokens([e async for e in engine.generate(r)]) for r in reqs]
    finally:
        await engine.stop()


async def _drain(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [e async for e in stream]


def _tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


async def test_engine_follow_up_beside_live_requests(model_dir: Path) -> None:
    turn1 = _prompt(19, seed=7)
    engine = _make_engine(model_dir, slots=3, cache=True)
    engine.start()
    try:
        reply = _tokens([e async for e in engine.generate(_req("t1", turn1, max_tokens=5, session="s"))])
        turn2 = turn1 + tuple(reply) + _prompt(6, seed=8)
        long_a, long_b = (
            _req("a", _prompt(11, seed=9), max_tokens=40),
            _req("b", _prompt(8, 10), max_tokens=40),
        )
        streams = [engine.generate(long_a), engine.generate(long_b)]
        firsts = [await anext(s) for s in streams]  # both decoding in slots 0 and 1 now
        follow = [e async for e in engine.generate(_req("t2", turn2, max_tokens=8, session="s"))]
        rests = await asyncio.gather(*(_drain(s) for s in streams))
    finally:
        await engine.stop()
    assert follow[-1].cached_tokens == len(turn1) + len(reply) - 1
    assert all(e.finish_reason is None for e in firsts)
    cold = await _run_each_alone(model_dir, [_req("cold", turn2, max_tokens=8), long_a, long_b])
    assert _tokens(follow) == cold[0]
    assert [_tokens([f, *r]) for f, r in zip(firsts, rests, strict=True)] == cold[1:]


def test_in_worker_runs_on_the_model_thread_between_steps(model_dir: Path) -> None:
    """`Engine.in_worker` runs a call on the thread that runs every step (what a profiler must start on), and
    refuses once the engine has stopped."""

    async def go() -> tuple[str, str]:
        engine = _make_engine(model_dir, slots=2, cache=False)
        engine.start()
        try:
            step_thread = await engine.in_worker(lambda: threading.current_thread().name)
            tokens = _tokens([e async for e in engine.generate(_req("a", _prompt(12, 1)))])
            assert len(tokens) == 4
        finally:
            await engine.stop()
        with pytest.raises(EngineNotReady):
            await engine.in_worker(lambda: None)
        return step_thread, threading.current_thread().name

    worker, caller = asyncio.run(go())
    assert worker.startswith("tssc-model") and worker != caller
