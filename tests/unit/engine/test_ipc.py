"""The engine core's message protocol: messages survive pickling, failures keep their class, metric calls
recorded in the core replay to the same exposition, and the outbox sends one message per engine step."""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import random
import re
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

import pytest

from server.engine.core import EngineCore, Outbox
from server.engine.ipc import (
    Abort,
    EndAll,
    Failure,
    FromCore,
    LoadFailed,
    Query,
    Ready,
    Recorder,
    Reply,
    SentPrompts,
    Shutdown,
    Step,
    Submit,
    replay,
)
from server.engine.types import (
    EngineError,
    EngineNotReady,
    EngineShutdown,
    FinishReason,
    GenerationRequest,
    PromptLogprob,
    SamplingParams,
    TokenEvent,
    TopLogprob,
)
from server.metrics import EngineStats, Metrics
from tests.unit.engine.test_engine import _make_engine, _prompt, _req, _running

T = TypeVar("T")
_CREATED = re.compile(rb"^\S+_created(\{.*\})? .*$", re.MULTILINE)  # creation times differ per registry


def _event(rid: str = "r", finish: FinishReason | None = None) -> TokenEvent:
    top = (TopLogprob(7, -0.5), TopLogprob(9, -1.5))
    return TokenEvent(
        rid, 7, "é", -0.5, top, finish, 12, 4, 3, {"ttft_s": 0.1}, (None, PromptLogprob(3, -2.0, 5, top))
    )


MESSAGES = [
    Submit(GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=4, stop=("x",)), session_id="s")),
    Abort("r"),
    EndAll("bye"),
    Query(3, "session_info", ("anon", "s")),
    Shutdown(),
    Ready(),
    LoadFailed("/m has no config.json"),
    Step(
        (_event(), _event("q", FinishReason.STOP)),
        (Failure("z", "invalid", "bad"),),
        (("on_capture", (0.1,)),),
        1,
        2,
    ),
    Reply(3, {"checkpoints": []}),
    Reply(4, EngineStats(1, 0, None, (1, 2, 3))),
    Reply(5, error="KeyError: 'x'"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_pickling(message: object) -> None:
    assert pickle.loads(pickle.dumps(message)) == message


def test_a_prompt_crosses_as_one_packed_buffer() -> None:
    prompt = tuple(range(70_000, 70_000 + 50_000))  # ids past 2**16: no narrower packing would hold them
    message = Submit(GenerationRequest("r", prompt, SamplingParams(), session_id="s", boundaries=(7, 49_990)))
    data = pickle.dumps(message)
    assert pickle.loads(data) == message
    assert type(pickle.loads(data).req.prompt_tokens) is tuple
    assert len(data) < 4 * len(prompt) + 1_000  # a pickled tuple of these ints: 5 bytes each


@pytest.mark.parametrize("bad", [2**31, 2**40, -(2**31) - 1])
def test_ids_past_int32_cross_unchanged_for_the_engine_to_reject(bad: int) -> None:
    message = Submit(GenerationRequest("r", (1, bad, 3), SamplingParams()))
    assert pickle.loads(pickle.dumps(message)).req.prompt_tokens == (1, bad, 3)


def _across(http: SentPrompts, core: SentPrompts, req: GenerationRequest) -> tuple[GenerationRequest, bytes]:
    """`req` through both ends of the pipe: (the request the core rebuilds, the message's bytes)."""
    data = pickle.dumps(http.submit(req))
    return core.request(pickle.loads(data)), data


def test_a_follow_up_sends_only_what_its_conversation_added() -> None:
    http, core = SentPrompts(), SentPrompts()
    first = tuple(range(1000, 31_000))
    follow = (*first, *range(5, 105))
    again, data = _across(http, core, GenerationRequest("a", first, SamplingParams(), session_id="s"))
    assert again.prompt_tokens == first and len(data) > 4 * len(first)
    message = http.submit(GenerationRequest("b", follow, SamplingParams(), session_id="s"))
    assert message.reuse == len(first) and message.req.prompt_tokens == tuple(range(5, 105))
    data = pickle.dumps(message)
    assert len(data) < 2_000  # not the 30k tokens before
    assert core.request(pickle.loads(data)) == GenerationRequest(
        "b", follow, SamplingParams(), session_id="s"
    )
    # a regenerate resends the same prompt: nothing new; an edit sends what follows the change; another
    # session sends it whole
    assert http.submit(GenerationRequest("c", follow, SamplingParams(), session_id="s")).reuse == len(follow)
    assert http.submit(GenerationRequest("d", follow, SamplingParams(), session_id="t")).reuse == 0
    edit = GenerationRequest("e", (*first[:-1], 7), SamplingParams(), session_id="s")
    message = http.submit(edit)
    assert message.reuse == len(first) - 1 and message.req.prompt_tokens == (7,)
    assert core.request(pickle.loads(pickle.dumps(message))) == edit


def test_both_ends_keep_the_same_prompts_through_edits_and_forgetting() -> None:
    rng = random.Random(3)
    http, core = SentPrompts(max_tokens=300), SentPrompts(max_tokens=300)
    last: dict[str, tuple[int, ...]] = {}
    reused = 0
    for i in range(600):
        session = rng.choice(["a", "b", "c", "d", None])
        prev = last.get(str(session), ())
        cut = rng.choice([len(prev), len(prev), rng.randrange(len(prev) + 1)])  # mostly a follow-up
        prompt = (*prev[:cut], *(rng.randrange(2**31 - 1) for _ in range(rng.randrange(0, 120))))
        req = GenerationRequest(f"r{i}", prompt, SamplingParams(), namespace=rng.choice(["k", "k", "j"]),
                                session_id=session)  # fmt: skip
        message = http.submit(req)
        reused += message.reuse
        assert core.request(pickle.loads(pickle.dumps(message))) == req
        last[str(session)] = prompt
    assert reused > 0  # the deltas were exercised, not only whole prompts
    assert http.last == core.last and http.last.tokens <= 300


def test_a_core_without_the_previous_prompt_refuses_the_turn() -> None:
    message = Submit(GenerationRequest("r", (4, 5), SamplingParams(), session_id="s"), reuse=10)
    with pytest.raises(EngineError, match="previous prompt"):
        SentPrompts().request(pickle.loads(pickle.dumps(message)))


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad prompt"), EngineShutdown("closing"), EngineNotReady("later"), EngineError("boom")],
    ids=lambda e: type(e).__name__,
)
def test_a_failure_raises_the_class_the_engine_raised(exc: Exception) -> None:
    again = pickle.loads(pickle.dumps(Failure.of("r", exc))).exception()
    assert type(again) is type(exc) and str(again) == str(exc)


def test_any_other_exception_fails_as_an_engine_error() -> None:
    exc = Failure.of("r", RuntimeError("CUDA error")).exception()
    assert type(exc) is EngineError and str(exc) == "CUDA error"


def _observe(m: Metrics | Recorder) -> None:
    m.on_lookup("hot_hit", "", "session")
    m.on_lookup("miss", "evicted", "")
    m.on_fetch("cold", 0.002)
    m.on_capture(0.001)
    m.on_evict("hot")
    m.on_corrupt()
    m.on_remote_bytes("written", 1000)
    m.on_remote_error("timeout")
    m.observe_prompt(30, 5)
    m.observe_queue(0.01)
    m.observe_phase("prefill", 0.02)
    m.observe_first_token(0.2)
    m.observe_tokens(2, [0.01])
    m.observe_finish("length", 1.0)
    m.set_model_info(model="tiny", arch="mamba2", dtype="fp32", device="cpu")


def test_recorded_calls_replay_to_the_same_exposition() -> None:
    direct, replayed, recorder = (
        Metrics(process_collectors=False),
        Metrics(process_collectors=False),
        Recorder(),
    )
    _observe(direct)
    _observe(recorder)
    replay(replayed, pickle.loads(pickle.dumps(recorder.drain())))
    assert _CREATED.sub(b"", replayed.render()) == _CREATED.sub(b"", direct.render())
    assert not recorder.pending and recorder.drain() == ()


def test_replay_ignores_what_is_not_a_metrics_call() -> None:
    m = Metrics(process_collectors=False)
    replay(m, (("render", ()), ("_define_request_metrics", ()), ("observe_tokens", (1, ()))))
    assert m.registry.get_sample_value("tssc_generation_tokens_total") == 1


def test_the_recorder_keeps_every_call_from_many_threads() -> None:
    recorder = Recorder()
    threads = [
        threading.Thread(target=lambda: [recorder.on_capture(0.1) for _ in range(500)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(recorder.drain()) == 2000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_chat_model_dir

    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-ipc"), seed=3, tok_vocab=300)


async def test_the_outbox_sends_one_step_message_per_engine_step(model_dir: Path) -> None:
    sent: list[FromCore] = []
    recorder = Recorder()
    engine = _make_engine(
        model_dir, slots=4, budget=512, metrics=recorder
    )  # as build_engine does in the core
    outbox = Outbox(sent.append, recorder, engine)

    ended: asyncio.Queue[str] = asyncio.Queue()

    class Forward:  # as the core's sink does: each event to the outbox as the step delivers it
        def put_nowait(self, item: TokenEvent | BaseException) -> None:
            assert isinstance(item, TokenEvent)
            outbox.event(item)
            if item.finish_reason is not None:
                ended.put_nowait(item.request_id)

    async with _running(engine):
        for i in range(4):
            await engine.run_into(_req(f"r{i}", _prompt(6, seed=i), max_tokens=5), Forward())
        done = {await asyncio.wait_for(ended.get(), 30) for _ in range(4)}
        await asyncio.sleep(0)  # the last step's flush
    assert done == {f"r{i}" for i in range(4)}
    steps = [m for m in sent if isinstance(m, Step)]
    assert [len(s.events) for s in steps] == [4] * 5  # four requests decode together for five steps
    assert all(len({e.request_id for e in s.events}) == 4 for s in steps)
    assert steps[-1].events[0].finish_reason is FinishReason.LENGTH
    tokens = [args[0] for s in steps for name, args in s.observations if name == "observe_tokens"]
    assert tokens == [4] * 5  # one observation per step


async def _next(conn: Connection, kind: type[T], where: Callable[[T], object] = bool) -> T:
    """The next message of `kind` from the core for which `where` holds (others skipped)."""
    while True:
        message = await asyncio.wait_for(asyncio.to_thread(conn.recv), 30)
        if isinstance(message, kind) and where(message):
            return message


async def _until_finished(conn: Connection, request_id: str) -> list[TokenEvent]:
    events: list[TokenEvent] = []
    while not events or events[-1].finish_reason is None:
        events += [e for e in (await _next(conn, Step)).events if e.request_id == request_id]
    return events


async def _serving_core(
    model_dir: Path, slots: int, cache: bool = False
) -> tuple[Connection, EngineCore, asyncio.Task[None]]:
    """A core serving a tiny engine over a pipe, once it said `Ready`: (our end, the core, its serving task)."""
    (ours,), core, serving = await _serving_front_ends(model_dir, slots, cache)
    return ours, core, serving


async def _serving_front_ends(
    model_dir: Path, slots: int, cache: bool = False, front_ends: int = 1
) -> tuple[list[Connection], EngineCore, asyncio.Task[None]]:
    """A core serving a tiny engine over one pipe per front end (`--api-servers`), once it said `Ready` on each."""
    pipes = [multiprocessing.Pipe() for _ in range(front_ends)]
    recorder = Recorder()
    engine = _make_engine(model_dir, slots=slots, cache=cache, metrics=recorder)
    core = EngineCore(engine, recorder, [theirs for _, theirs in pipes])
    serving = asyncio.create_task(core.serve())
    for ours, _ in pipes:
        await _next(ours, Ready)
    return [ours for ours, _ in pipes], core, serving


def _left(core: EngineCore) -> list[tuple[dict[str, object], set[str]]]:
    """Each front end's requests on their way into the engine and in it."""
    return [(dict(link.requests), set(link.queued)) for link in core._links]


async def test_the_core_serves_requests_aborts_and_queries_over_a_pipe(model_dir: Path) -> None:
    ours, core, serving = await _serving_core(model_dir, slots=2, cache=True)
    ours.send(Submit(_req("a", _prompt(20, 5), max_tokens=3, session="s")))
    assert [e.completion_tokens for e in await _until_finished(ours, "a")] == [1, 2, 3]
    ours.send(Submit(_req("long", _prompt(8, 6), max_tokens=100_000)))
    await _next(ours, Step)
    ours.send(Abort("long"))
    ours.send(Submit(_req("empty", ())))
    failed = await _next(ours, Step, lambda step: step.failures)
    assert failed.failures == (Failure("empty", "invalid", "the prompt is empty"),)
    ours.send(Submit(_req("lost", _prompt(4, 7), session="never-seen"), reuse=3))  # a delta with no base
    failed = await _next(ours, Step, lambda step: step.failures)
    assert failed.failures[0].request_id == "lost" and failed.failures[0].kind == "error"
    ours.send(Submit(_req("b", (*_prompt(20, 5), *_prompt(3, 8)), max_tokens=1, session="s")))
    assert (await _until_finished(ours, "b"))[-1].cached_tokens >= 20  # the same session, whole prompt: a hit
    ours.send(Query(1, "stats"))
    stats = (await _next(ours, Reply)).value
    assert isinstance(stats, EngineStats) and stats.num_running == 0 and stats.cache is not None
    ours.send(Query(2, "session_info", ("anon", "s")))
    assert (await _next(ours, Reply)).value["checkpoints"]
    # the aborted request's task is gone; finished, aborted and failed requests alike: nothing left to forward to
    assert _left(core) == [({}, set())]
    ours.close()  # the HTTP process is gone: the core stops its engine
    await asyncio.wait_for(serving, 30)


async def test_an_abort_right_after_its_submit_leaves_nothing_behind(model_dir: Path) -> None:
    ours, core, serving = await _serving_core(model_dir, slots=1)
    for i in range(5):
        ours.send(Submit(_req(f"r{i}", _prompt(8, i), max_tokens=100_000)))
        ours.send(Abort(f"r{i}"))
    ours.send(Submit(_req("after", _prompt(8, 9), max_tokens=2)))
    assert len(await _until_finished(ours, "after")) == 2  # the only slot came free every time
    assert _left(core) == [({}, set())]
    ours.send(Shutdown())
    await asyncio.wait_for(serving, 30)


async def test_ending_all_fails_the_queued_requests_through_the_outbox(model_dir: Path) -> None:
    ours, core, serving = await _serving_core(model_dir, slots=2)
    ours.send(Submit(_req("long", _prompt(8, 1), max_tokens=100_000)))
    await _next(ours, Step, lambda step: any(e.request_id == "long" for e in step.events))
    ours.send(EndAll("bye"))
    failed = await _next(ours, Step, lambda step: step.failures)
    assert failed.failures == (Failure("long", "shutdown", "bye"),)
    ours.send(Submit(_req("late", _prompt(8, 2))))  # refused: the engine is closing
    refused = await _next(ours, Step, lambda step: step.failures)
    assert refused.failures[0].request_id == "late" and refused.failures[0].kind == "shutdown"
    assert _left(core) == [({}, set())]
    ours.send(Shutdown())
    await asyncio.wait_for(serving, 30)


async def test_front_ends_keep_their_requests_apart_and_one_gone_ends_only_its_own(model_dir: Path) -> None:
    (first, second), core, serving = await _serving_front_ends(model_dir, slots=2, cache=True, front_ends=2)
    try:
        first.send(Submit(_req("a", _prompt(8, 1), max_tokens=100_000)))
        second.send(Submit(_req("b", _prompt(8, 2), max_tokens=100_000)))
        await _next(first, Step, lambda step: any(e.request_id == "a" for e in step.events))
        await _next(second, Step, lambda step: any(e.request_id == "b" for e in step.events))
        second.send(Abort("a"))  # not its request: nothing happens to it
        second.send(Submit(_req("a", _prompt(8, 3))))  # an id the other front end holds: refused
        refused = await _next(second, Step, lambda step: step.failures)
        assert refused.failures[0].request_id == "a" and "duplicate" in refused.failures[0].message
        second.send(Query(1, "stats"))
        assert (
            await _next(second, Reply)
        ).value.num_running == 2  # both still decode; the asker got the reply
        second.close()  # that front end died: its request ends and frees its slot, the other one's decodes on
        deadline = asyncio.get_running_loop().time() + 30
        while _left(core)[1] != ({}, set()):
            assert asyncio.get_running_loop().time() < deadline, "the gone front end's request kept its slot"
            while first.poll():  # "a" decodes on: read its steps, or the core blocks on a full pipe
                first.recv()
            await asyncio.sleep(0.05)
        assert _left(core)[0] == ({}, {"a"})
        first.send(Submit(_req("c", _prompt(8, 4), max_tokens=2)))  # the freed slot serves the next request
        assert len(await _until_finished(first, "c")) == 2
    finally:
        first.send(Shutdown())  # the primary's: the core stops its engine, whatever is left in it
        await asyncio.wait_for(serving, 30)
