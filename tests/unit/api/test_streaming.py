"""SSE streams: byte-for-byte what clients received before the chunk templates (golden streams, compared
event by event: how the bytes are split into writes is not the format), template text chunks equal to the
schema's serialisation for every character, and the events the engine delivers together written at once.

`tests/data/sse_streams.json` holds the streams the pydantic-per-chunk implementation produced at
commit 508a50e for the scenarios below. To re-record after a deliberate format change:
`TSSC_WRITE_GOLDEN=1 pytest tests/unit/api/test_streaming.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest

from server.api.responses import ChatChunkChoice, ChatDelta, CompletionChoice
from server.api.streaming import (
    StreamSpec,
    _chat_chunk,
    _completion_chunk,
    chat_stream,
    chat_text_chunks,
    completion_stream,
    completion_text_chunks,
)
from server.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenEvent, TopLogprob

GOLDEN = Path(__file__).resolve().parents[2] / "data" / "sse_streams.json"
TEXTS = (
    "Hello",
    " wörld",
    "日本語",
    "emoji 🙂",
    'quote " and \\ backslash',
    "line\nbreak\ttab\rcr",
    "\x00\x01\x1f\x7f",
    "\u2028\u2029",
    "",
    "</script>",
)
TOKENS = {1: "Hé", 2: '"q\\', 3: "\n", 4: "🙂", 5: ""}

Script = Sequence[TokenEvent | Exception]


class _FakeEngine:
    """Replays a script of events (or an exception) per request id, one event per batch, yielding to the
    loop in between; with `together`, all the script's events before its end (or error) in one batch."""

    def __init__(self, scripts: dict[str, Script], together: bool = False) -> None:
        self._scripts, self._together = scripts, together

    async def generate_batches(self, req: GenerationRequest) -> AsyncIterator[list[TokenEvent]]:
        batch: list[TokenEvent] = []
        for item in self._scripts[req.request_id]:
            await asyncio.sleep(0)
            if isinstance(item, Exception):
                if batch:
                    yield batch
                raise item
            batch.append(item)
            if not self._together:
                yield batch
                batch = []
        if batch:
            yield batch


def _event(text: str, token: int | None = 1, **kw: object) -> TokenEvent:
    return TokenEvent("r", token, text, **kw)  # type: ignore[arg-type]


def _final(text: str, reason: FinishReason = FinishReason.STOP, completion: int = 7) -> TokenEvent:
    return _event(text, finish_reason=reason, prompt_tokens=11, cached_tokens=4, completion_tokens=completion)


def _logprob_event(text: str, token: int, logprob: float, tops: Sequence[tuple[int, float]]) -> TokenEvent:
    return _event(text, token, logprob=logprob, top_logprobs=tuple(TopLogprob(t, lp) for t, lp in tops))


def _plain(reason: FinishReason = FinishReason.STOP) -> list[TokenEvent | Exception]:
    return [*(_event(t) for t in TEXTS), _final("end.", reason)]


def _with_logprobs() -> list[TokenEvent | Exception]:
    return [
        _logprob_event("Hé", 1, -0.25, [(1, -0.25), (2, -1.5), (4, -math.inf)]),
        _logprob_event("", 5, -3.0, [(5, -3.0)]),  # a token that completes no character yet
        _logprob_event('"q\\', 2, math.nan, []),
        _event("no logprob", None),
        _logprob_event("\n", 3, -1e-9, [(3, -1e-9), (1, -20.0)]),
        _final(""),
    ]


def _spec(kind: str, n: int = 1, usage: bool = False, logprobs: bool = False) -> StreamSpec:
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return StreamSpec(prefix + "abc123", 1700000000, 'tssc/mämba "2"', n, usage, logprobs, TOKENS.__getitem__)


def _reqs(count: int) -> list[GenerationRequest]:
    return [GenerationRequest(f"req-{i}", (1, 2, 3), SamplingParams()) for i in range(count)]


async def _chat(spec: StreamSpec, scripts: Sequence[Script], together: bool = False) -> list[bytes]:
    engine = _FakeEngine({f"req-{i}": s for i, s in enumerate(scripts)}, together)
    return [chunk async for chunk in chat_stream(engine, _reqs(len(scripts)), spec)]


async def _completion(
    spec: StreamSpec, scripts: Sequence[Script], echo: Sequence[str], together: bool = False
) -> list[bytes]:
    engine = _FakeEngine({f"req-{i}": s for i, s in enumerate(scripts)}, together)
    return [chunk async for chunk in completion_stream(engine, _reqs(len(scripts)), spec, echo)]


SCENARIOS: dict[str, Callable[[], Coroutine[Any, Any, list[bytes]]]] = {
    "chat_plain": lambda: _chat(_spec("chat"), [_plain()]),
    "chat_usage_length": lambda: _chat(_spec("chat", usage=True), [_plain(FinishReason.LENGTH)]),
    "chat_n2_usage": lambda: _chat(_spec("chat", n=2, usage=True), [_plain(), _plain(FinishReason.LENGTH)]),
    "chat_logprobs": lambda: _chat(_spec("chat", logprobs=True), [_with_logprobs()]),
    "chat_logprobs_usage": lambda: _chat(_spec("chat", usage=True, logprobs=True), [_with_logprobs()]),
    "chat_bad_input": lambda: _chat(_spec("chat", usage=True), [[_event("a"), ValueError('bad "x"')]]),
    "chat_engine_error": lambda: _chat(_spec("chat"), [[_event("a"), RuntimeError("boom")]]),
    "completion_plain": lambda: _completion(_spec("cmpl"), [_plain()], [""]),
    "completion_echo_usage": lambda: _completion(_spec("cmpl", usage=True), [_plain()], ['Say "hi"\n🙂']),
    "completion_n2_echo": lambda: _completion(
        _spec("cmpl", n=2, usage=True), [_plain(), _plain(FinishReason.LENGTH)], ["p\\1", "p\\1"]
    ),
    "completion_logprobs_echo": lambda: _completion(
        _spec("cmpl", logprobs=True), [_with_logprobs()], ["echo ü"]
    ),
    "completion_error": lambda: _completion(
        _spec("cmpl", usage=True), [[_event("a"), ValueError("bad")]], [""]
    ),
}


def _events(chunks: Sequence[str]) -> list[str]:
    """A stream's SSE events, whichever writes carried them."""
    return [event + "\n\n" for event in "".join(chunks).split("\n\n") if event]


def _run(name: str) -> list[str]:
    chunks = asyncio.run(SCENARIOS[name]())
    return _events([chunk.decode() for chunk in chunks])


def _golden() -> dict[str, list[str]]:
    if os.environ.get("TSSC_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps({name: _run(name) for name in SCENARIOS}, indent=1) + "\n")
    data: dict[str, list[str]] = json.loads(GOLDEN.read_text())
    return data


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_stream_bytes_match_the_golden_stream(name: str) -> None:
    assert _run(name) == _events(_golden()[name])


@pytest.mark.parametrize("kind", ["chat", "cmpl"])
def test_events_delivered_together_are_written_at_once_with_one_sse_event_each(kind: str) -> None:
    scripts = [_plain()]
    if kind == "chat":
        apart, together = (asyncio.run(_chat(_spec("chat"), scripts, t)) for t in (False, True))
    else:
        apart, together = (asyncio.run(_completion(_spec("cmpl"), scripts, [""], t)) for t in (False, True))
    assert b"".join(apart) == b"".join(together)
    head = 1 if kind == "chat" else 0  # chat opens with its role chunk
    assert len(together) == head + 1  # every token, the finish and [DONE] in one write
    texts = [t for t in TEXTS if t]
    assert len(apart) == head + len(texts) + 1  # a write per text token; the last token with the end
    assert len(_events([together[-1].decode()])) == len(texts) + 1 + 1 + 1


@pytest.mark.parametrize("kind", ["chat", "cmpl"])
def test_the_last_tokens_finish_usage_and_done_go_out_in_one_write(kind: str) -> None:
    if kind == "chat":
        chunks = asyncio.run(_chat(_spec("chat", usage=True), [_plain()]))
    else:
        chunks = asyncio.run(_completion(_spec("cmpl", usage=True), [_plain()], [""]))
    last = _events([chunks[-1].decode()])
    assert ['"end."' in last[0], '"finish_reason":"stop"' in last[1], '"prompt_tokens":11' in last[2]] == [
        True
    ] * 3
    assert last[3] == "data: [DONE]\n\n" and len(last) == 4


def test_an_error_after_events_delivered_together_sends_them_first() -> None:
    chunks = asyncio.run(
        _completion(_spec("cmpl"), [[_event("a"), _event("b"), ValueError("bad")]], [""], True)
    )
    events = _events([c.decode() for c in chunks])
    assert ['"text":"a"' in events[0], '"text":"b"' in events[1], '"error"' in events[2]] == [True] * 3
    assert len(chunks) == 2 and events[-1] == "data: [DONE]\n\n"  # the batch; the error with [DONE]


def _tricky_texts() -> list[str]:
    singles = [chr(c) for c in range(0x800)]
    others = ["\u2028", "\u2029", "\ufeff", "\ufffd", "\uffff", "\U0001f642", "\U0010ffff", "é\u0301"]
    return [*singles, *others, *TEXTS, "".join(TEXTS) * 3]


def _schema_text_chunk(spec: StreamSpec, index: int, text: str) -> bytes:
    if spec.response_id.startswith("chatcmpl-"):
        return _chat_chunk(spec, ChatChunkChoice(index=index, delta=ChatDelta(content=text)))
    return _completion_chunk(spec, CompletionChoice(index=index, text=text))


@pytest.mark.parametrize("kind", ["chat", "cmpl"])
@pytest.mark.parametrize("usage", [False, True])
def test_text_chunks_are_the_schema_bytes_for_every_character(kind: str, usage: bool) -> None:
    spec = _spec(kind, n=4, usage=usage)
    fast = chat_text_chunks(spec) if kind == "chat" else completion_text_chunks(spec)
    for index, text in itertools.product((0, 3), _tricky_texts()):
        assert fast(index, text) == _schema_text_chunk(spec, index, text), (index, text)
