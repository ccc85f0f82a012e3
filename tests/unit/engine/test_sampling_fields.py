"""logit_bias and min_tokens: the sampler's sparse per-row additions, the stop rules of `Seq`, and both
through the engine on a seeded tiny Mamba2."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from server.engine import Engine, EngineConfig
from server.engine.request import Seq
from server.engine.sampler import Sampler, SamplingBatch
from server.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from server.model.loader import load_model
from server.model.runner import ModelRunner
from server.model.tokenizer import Tokenizer
from tests.tiny_models import make_chat_model_dir

CPU = torch.device("cpu")
TOK_VOCAB = 300


def _logits(b: int = 3, v: int = 40, seed: int = 0) -> Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def _sample(logits: Tensor, params: Sequence[SamplingParams], banned: Sequence[set[int]] = ()) -> Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(len(params))]
    return Sampler().sample(logits, SamplingBatch.build(params, gens, CPU, banned)).tokens


# ---- the sampler -------------------------------------------------------------------------------


def test_no_bias_and_no_ban_adds_nothing() -> None:
    assert SamplingBatch.build([SamplingParams()] * 2, [None, None], CPU, [set(), set()]).logit_adds is None


def test_logit_bias_forces_a_token_in_its_row_only() -> None:
    logits = _logits()
    params = [SamplingParams(temperature=0.0, logit_bias=((5, 100.0),)), SamplingParams(temperature=0.0)]
    tokens = _sample(logits[:2], params)
    assert tokens.tolist() == [5, int(logits[1].argmax())]


def test_logit_bias_forces_a_token_when_sampling() -> None:
    params = [SamplingParams(temperature=1.5, top_p=0.9, logit_bias=((7, 100.0),))] * 3
    for seed in range(5):
        assert _sample(_logits(seed=seed), params).tolist() == [7, 7, 7]


def test_negative_bias_excludes_the_argmax() -> None:
    logits = _logits(b=1)
    best, second = logits[0].topk(2).indices.tolist()
    params = [SamplingParams(temperature=0.0, logit_bias=((best, -100.0),))]
    assert _sample(logits, params).tolist() == [second]


def test_banned_tokens_are_never_sampled_even_with_a_bias() -> None:
    logits = _logits()
    first, second = logits[0].topk(2).indices.tolist()
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias=((3, 100.0),)),
        SamplingParams(temperature=0.0),
    ]
    tokens = _sample(logits, params, banned=[{first}, {3}, set()]).tolist()
    without_3 = logits[1].index_fill(0, torch.tensor([3]), float("-inf"))
    assert tokens == [second, int(without_3.argmax()), int(logits[2].argmax())]


def test_logprobs_stay_those_of_the_raw_logits() -> None:
    logits = _logits(b=2)
    before = logits.clone()
    params = [SamplingParams(temperature=0.0, logprobs=True, logit_bias=((9, 50.0),))] * 2
    batch = SamplingBatch.build(params, [None, None], CPU, [{1}, set()])
    out = Sampler().sample(logits, batch)
    assert out.tokens.tolist() == [9, 9] and out.logprobs is not None
    torch.testing.assert_close(out.logprobs, logits.log_softmax(-1)[:, 9])
    assert torch.equal(logits, before)


# ---- the stop rules (no model) -----------------------------------------------------------------


def _seq(stop: tuple[str, ...] = (), **params: object) -> Seq:
    """A request over a letter vocabulary (token i is chr(97 + i)), token 25 ('z') its EOS."""
    sp = SamplingParams(**{"max_tokens": 10, "stop": stop, **params})  # type: ignore[arg-type]
    decode = lambda ids: "".join(chr(97 + i) for i in ids)
    return Seq.create(GenerationRequest("r", (0,), sp), decode, eos_ids=(25,), now=0.0)


def _append(seq: Seq, tokens: Sequence[int]) -> list[TokenEvent]:
    return [seq.append(t, now=1.0) for t in tokens]


def test_stop_ids_are_banned_until_min_tokens() -> None:
    seq = _seq(min_tokens=2, stop_token_ids=(3, 400))
    assert seq.banned_ids(vocab=300) == {3, 25}
    _append(seq, [0, 1])
    assert seq.banned_ids(vocab=300) == frozenset()


def test_a_stop_string_before_min_tokens_is_text() -> None:
    seq = _seq(stop=("bc",), min_tokens=3)
    events = _append(seq, [0, 1, 2, 1, 2])  # "abc" (the first three tokens), then "bc" stops
    assert [e.finish_reason for e in events[:4]] == [None] * 4
    assert events[-1].finish_reason == FinishReason.STOP
    assert "".join(e.text for e in events) == "abc"  # the first "bc" is text, the second is cut


def test_a_stop_string_stops_at_once_without_min_tokens() -> None:
    events = _append(_seq(stop=("bc",)), [0, 1, 2])
    assert events[-1].finish_reason == FinishReason.STOP and "".join(e.text for e in events) == "a"


def test_a_stop_string_completed_past_min_tokens_stops() -> None:
    """Begun inside the first min_tokens tokens, completed after them: it ends the request."""
    events = _append(_seq(stop=("bc",), min_tokens=2), [0, 1, 2])
    assert events[-1].finish_reason == FinishReason.STOP and "".join(e.text for e in events) == "a"


def test_min_tokens_must_not_exceed_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)


# ---- through the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-mamba2"), seed=3, tok_vocab=TOK_VOCAB)


@contextlib.asynccontextmanager
async def _engine(model_dir: Path) -> AsyncIterator[Engine]:
    runner = ModelRunner(load_model(model_dir)[1], max_slots=4)
    engine = Engine(runner, Tokenizer.from_pretrained(model_dir), None, config=EngineConfig(max_slots=4))
    engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def _req(rid: str, **params: object) -> GenerationRequest:
    fields: dict[str, object] = {"max_tokens": 8, "temperature": 0.0, **params}
    return GenerationRequest(rid, (5, 17, 40, 99, 12), SamplingParams(**fields))  # type: ignore[arg-type]


async def _run(engine: Engine, req: GenerationRequest) -> list[TokenEvent]:
    return [e async for e in engine.generate(req)]


def _ids(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


async def test_engine_logit_bias_forces_the_second_choice_with_its_raw_logprob(model_dir: Path) -> None:
    async with _engine(model_dir) as engine:
        plain = await _run(engine, _req("p", ignore_eos=True, logprobs=True, top_logprobs=2))
        second = plain[0].top_logprobs[1]
        biased = await _run(
            engine, _req("b", ignore_eos=True, logprobs=True, logit_bias=((second.token_id, 100.0),))
        )
    assert _ids(biased) == [second.token_id] * 8
    assert biased[0].logprob == pytest.approx(second.logprob, abs=1e-5)


async def test_engine_min_tokens_delays_a_forced_eos(model_dir: Path) -> None:
    """EOS biased to certainty: without min_tokens it is the first token; with min_tokens 4, the fifth."""
    async with _engine(model_dir) as engine:
        eos = engine.tokenizer.eos_ids[0]
        at_once = await _run(engine, _req("a", logit_bias=((eos, 100.0),)))
        delayed = await _run(engine, _req("d", logit_bias=((eos, 100.0),), min_tokens=4))
    assert _ids(at_once) == [eos] and at_once[-1].finish_reason == FinishReason.STOP
    assert eos not in _ids(delayed)[:4] and _ids(delayed)[4] == eos
    assert delayed[-1].finish_reason == FinishReason.STOP and delayed[-1].completion_tokens == 5


async def test_engine_refuses_a_bias_outside_the_vocabulary(model_dir: Path) -> None:
    async with _engine(model_dir) as engine:
        with pytest.raises(ValueError, match="logit_bias"):
            await _run(engine, _req("x", logit_bias=((TOK_VOCAB, 1.0),)))
