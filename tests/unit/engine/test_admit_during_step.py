"""Requests that arrive while a step runs are slotted at once and admitted by the worker within that step,
once its device work is launched and before it waits for its sampled tokens (`ModelWorker.admit_soon`); those
the step does not reach are admitted before the next one (`take_arrivals`). Each ends with its slot restored
or zeroed, whatever else the step or an abort did to that slot."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from cache import CacheConfig, StateCache
from cache.base import Lease
from server.engine import Engine, EngineConfig
from server.engine import worker as worker_module
from server.engine.request import Seq
from server.engine.scheduler import PrefillChunk, StepPlan
from server.engine.types import EngineError, GenerationRequest, SamplingParams
from server.engine.worker import ModelWorker, StepResult
from server.model.loader import load_model
from server.model.runner import ModelRunner
from server.model.tokenizer import Tokenizer
from tests.tiny_models import make_chat_model_dir
from tests.unit.engine.test_restore_into_slot import _seq
from tests.unit.engine.test_worker_captures import _Order, _prompt, _tokens

SLOTS = 4
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-arrivals"), seed=12, tok_vocab=300)


class _LookupOrder(StateCache):
    def __init__(self, *args: Any, log: list[str]) -> None:
        super().__init__(*args)
        self.log = log

    def lookup(
        self, namespace: str, session_id: str | None, tokens: Sequence[int], **kw: Any
    ) -> Lease | None:
        self.log.append("lookup")
        return super().lookup(namespace, session_id, tokens, **kw)


def _setup(model_dir: Path) -> tuple[ModelRunner, StateCache, ModelWorker, list[str]]:
    log: list[str] = []
    runner = _Order(load_model(model_dir)[1], max_slots=SLOTS, log=log)
    config = CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32", checkpoint_interval=1024)
    cache = _LookupOrder(config, runner.state_spec(), log=log)
    return runner, cache, ModelWorker(runner, cache, decode_ahead=False), log


def _req(rid: str, prompt: Sequence[int], session: str | None = None) -> GenerationRequest:
    return GenerationRequest(rid, tuple(prompt), PARAMS, session_id=session)


def _checkpoint(
    runner: ModelRunner, cache: StateCache, session: str, prompt: tuple[int, ...]
) -> dict[str, Any]:
    """A prompt checkpoint of `session` in the cache (prefilled in the last slot); its state."""
    runner.prefill(prompt, SLOTS - 1)
    state = runner.capture(SLOTS - 1)
    assert cache.capture("anon", session, prompt, state, reason="prompt")
    return state


def _decoding(worker: ModelWorker, slot: int, seed: int) -> Seq:
    """A request prefilled in `slot` (its first token sampled), ready to decode."""
    seq = _seq(_req(f"d{slot}", _prompt(12, seed)), slot)
    worker.admit([seq])
    plan = StepPlan((PrefillChunk(seq.entry, 0, 12),), ())
    worker.execute(plan, {seq.request_id: seq})
    seq.entry.num_computed = 12
    return seq


def test_arrivals_are_admitted_after_the_steps_launches_and_before_its_wait(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, cache, worker, log = _setup(model_dir)
    turn1 = _prompt(15, seed=1)
    saved = _checkpoint(runner, cache, "s", turn1)
    running = _decoding(worker, 0, seed=2)
    for slot in (1, 2):
        runner.prefill(_prompt(9, seed=10 + slot), slot)  # what an earlier request left there
    wait = worker_module._HostCopy.wait
    monkeypatch.setattr(worker_module._HostCopy, "wait", lambda self: (log.append("wait"), wait(self))[1])
    hit, miss = _seq(_req("hit", (*turn1, 7, 8), "s"), 1), _seq(_req("miss", _prompt(9, seed=3)), 2)
    worker.admit_soon([hit, miss])
    log.clear()
    result = worker.execute(StepPlan((), (running.entry,)), {running.request_id: running})
    assert log == ["decode", "lookup", "lookup", "wait"]
    assert result.admitted == [(hit, len(turn1)), (miss, 0)] and worker.take_arrivals() == []
    assert hit.t_restored is not None and miss.t_restored is not None
    for name, tensor in runner.slot_state(1).items():
        assert torch.equal(tensor, saved[name]) and not runner.slot_state(2)[name].any(), name


def test_a_step_that_samples_nothing_leaves_its_arrivals_to_the_next_admission(model_dir: Path) -> None:
    _, _, worker, _ = _setup(model_dir)
    long = _seq(_req("long", _prompt(30, seed=4)), 0)
    worker.admit([long])
    late = _seq(_req("late", _prompt(9, seed=5)), 1)
    worker.admit_soon([late])
    result = worker.execute(StepPlan((PrefillChunk(long.entry, 0, 10),), ()), {"long": long})  # no prompt end
    assert result.admitted == [] and not result.events
    assert worker.take_arrivals() == [late] and worker.take_arrivals() == []


@pytest.mark.parametrize("later_hits", [True, False])
def test_a_slot_named_twice_belongs_to_the_later_request(model_dir: Path, later_hits: bool) -> None:
    """An arrival aborted before its admission frees its slot, which the next arrival takes: both reach the
    worker in one batch, and the slot ends as the later one's (its checkpoint, or zero), whatever the
    earlier one would have done to it."""
    runner, cache, worker, _ = _setup(model_dir)
    turn1 = _prompt(15, seed=6)
    saved = _checkpoint(runner, cache, "s", turn1)
    runner.prefill(_prompt(9, seed=7), 1)
    hit, miss = _seq(_req("hit", (*turn1, 7), "s"), 1), _seq(_req("miss", _prompt(9, seed=8)), 1)
    earlier, later = (miss, hit) if later_hits else (hit, miss)
    out = worker.admit([earlier, later])
    assert isinstance(out[0], EngineError) and out[1] == (len(turn1) if later_hits else 0)
    for name, tensor in runner.slot_state(1).items():
        assert torch.equal(tensor, saved[name]) if later_hits else not tensor.any(), name


def test_an_arrival_extending_a_prompt_of_the_step_resumes_from_its_checkpoint(model_dir: Path) -> None:
    """A shared prefix within a burst: the step prefills a prompt, and a request that arrived meanwhile with a
    longer prompt of the same session resumes from that prompt's checkpoint, stored before its lookup."""
    _, cache, worker, _ = _setup(model_dir)
    prompt = _prompt(20, seed=9)
    first = _seq(_req("first", prompt, "s"), 0)
    worker.admit([first])
    longer = _seq(_req("longer", (*prompt, *_prompt(5, seed=10)), "s"), 1)
    worker.admit_soon([longer])
    plan = StepPlan((PrefillChunk(first.entry, 0, len(prompt)),), ())
    result = worker.execute(plan, {"first": first}, defer_captures=True)
    assert result.admitted == [(longer, len(prompt))]
    assert cache.session_info("anon", "s") is not None


def test_a_busy_step_admits_what_arrives_until_its_device_work_is_done(model_dir: Path) -> None:
    """While the device is busy, a step that admitted arrivals waits for more: one that comes from the loop's
    thread meanwhile is admitted in the same step. With nothing waiting, the step does not wait at all."""
    _, _, worker, _ = _setup(model_dir)
    result, polls = StepResult(), []
    worker._admit_arrivals(lambda: polls.append(1) or True, result)  # nothing arrived: returns at once
    assert polls == [] and result.admitted == []
    first, second = (_seq(_req(f"a{i}", _prompt(9, seed=20 + i)), i) for i in range(2))
    deadline = time.monotonic() + 10

    def busy() -> bool:  # the device stays busy until both are admitted
        return len(result.admitted) < 2 and time.monotonic() < deadline

    late = threading.Timer(0.05, worker.admit_soon, args=([second],))
    worker.admit_soon([first])
    late.start()
    worker._admit_arrivals(busy, result)
    late.join()
    assert [seq for seq, _ in result.admitted] == [first, second] and time.monotonic() < deadline


class _Gated(ModelRunner):
    """The torch runner whose next decode, once armed, waits for `release` (a step held in flight)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed, self.entered, self.release = False, threading.Event(), threading.Event()

    def decode(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.release.wait(20)
        return super().decode(tokens, slots)


async def test_a_request_that_arrives_during_a_step_is_admitted_by_that_step(model_dir: Path) -> None:
    """Through the engine: a request sent while a decode step runs is slotted at once and admitted within
    that step (never by a separate admission), and its tokens are those it gets alone."""
    model = load_model(model_dir)[1]
    tokenizer = Tokenizer.from_pretrained(model_dir)
    runner = _Gated(model, max_slots=SLOTS)
    config = CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32")
    cache = StateCache(config, runner.state_spec())
    engine = Engine(runner, tokenizer, cache, config=EngineConfig(max_slots=SLOTS, prefill_budget=256))
    separately: list[str] = []
    admit = engine._worker.admit
    engine._worker.admit = lambda seqs: (separately.extend(s.request_id for s in seqs), admit(seqs))[1]  # type: ignore[method-assign]
    late_req = _req("late", _prompt(17, seed=31), "s")
    engine.start()
    try:
        stream = engine.generate(_req("long", _prompt(11, seed=30)))
        await anext(stream)  # decoding now
        runner.armed = True
        await asyncio.to_thread(runner.entered.wait, 20)  # the worker is inside a decode step
        late = asyncio.ensure_future(_tokens(engine.generate(late_req)))
        while "late" not in engine._seqs:
            await asyncio.sleep(0.001)
        runner.release.set()
        got = await asyncio.wait_for(late, 20)
        await stream.aclose()
    finally:
        await engine.stop()
    assert separately == ["long"]  # the late request was never admitted on its own
    alone = Engine(ModelRunner(model, max_slots=1), tokenizer, None, config=EngineConfig(max_slots=1))
    alone.start()
    try:
        assert got == await _tokens(alone.generate(late_req)) and len(got) == 4
    finally:
        await alone.stop()


def assert_restored_after_the_decode_ahead(runner: ModelRunner, cache: StateCache) -> None:
    """A request aborted once its step launched the decode ahead of its row (which writes its slot) frees the
    slot, which an arrival takes at once: the arrival's restore, after that decode within the step, leaves the
    slot holding exactly the arrival's checkpoint."""
    turn1 = _prompt(23, seed=700)
    runner.prefill(turn1, 3)
    assert cache.capture("anon", "s", turn1, runner.capture(3), reason="prompt")
    worker = ModelWorker(runner, cache, decode_ahead=True)
    a, x = (_seq(_req(rid, _prompt(9, seed=701 + i)), i) for i, rid in enumerate("ax"))
    worker.admit([a, x])
    worker.execute(StepPlan(tuple(PrefillChunk(s.entry, 0, 9) for s in (a, x)), ()), {"a": a, "x": x})
    for s in (a, x):
        s.entry.num_computed = 9
    follow = _seq(_req("follow", (*turn1, 5, 6), "s"), 1)
    assert worker.ahead is not None
    launch, fed = worker.ahead.launch, []

    def launch_then_abort(rows: list[Seq], tokens: torch.Tensor) -> Any:
        launched = launch(rows, tokens)  # x's row fed: this decode ahead writes slot 1
        fed.extend(launched.slots if launched is not None else ())
        x.aborted = True  # then the engine frees slot 1 and slots the follow-up there
        worker.admit_soon([follow])
        return launched

    worker.ahead.launch = launch_then_abort  # type: ignore[method-assign]
    result = worker.execute(StepPlan((), (a.entry, x.entry)), {"a": a, "x": x})
    assert fed == [0, 1] and result.admitted == [(follow, len(turn1))]
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    lease = cache.lookup("anon", "s", follow.req.prompt_tokens)
    assert lease is not None
    try:
        want = cache.fetch(lease)
    finally:
        cache.release(lease)
    for name, tensor in runner.slot_state(1).items():
        assert torch.equal(tensor, want[name]), name


def test_a_slot_freed_during_a_step_is_restored_after_the_steps_decode_ahead(model_dir: Path) -> None:
    runner = ModelRunner(load_model(model_dir)[1], max_slots=SLOTS)
    config = CacheConfig(hot_bytes=1 << 22, cold_bytes=1 << 22, hot_dtype="fp32")
    assert_restored_after_the_decode_ahead(runner, StateCache(config, runner.state_spec()))
