"""Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

Chat: each choice opens with a `{"role": "assistant", "content": ""}` delta, then content deltas,
then an empty delta carrying `finish_reason`. Completions: text chunks, then an empty chunk with
`finish_reason`. With `stream_options.include_usage`, every chunk has `"usage": null` and one last
chunk with no choices carries the usage. An engine error after the headers went out is sent as an
`{"error": ...}` event before `[DONE]`.

Several events of one stream that are ready together (the engine delivered them while the stream waited
for the event loop: `server.engine.events`) go out as one write: their chunks, still one SSE event per
token, joined; the last ones go out with the usage chunk and `[DONE]`, in one write. Text chunks, one per
token per stream, are the hot path: each response renders its chunk through the pydantic schema once
per choice with a marker for the text, and a token's chunk is then the bytes before the marker + the text
as JSON + the bytes after it (`TextChunks`). Rare chunks (role, finish, logprobs, usage, error) still go
through the schema.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from server.api.answers import AnswerLog
from server.api.errors import APIError
from server.api.formatting import (
    TokenText,
    chat_logprob_entry,
    completion_logprobs,
    finish_reason_out,
    has_logprob,
    usage_of,
)
from server.api.generation import GeneratingEngine, engine_error, merged_batches
from server.api.responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
)
from server.engine.types import GenerationRequest, TokenEvent

log = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"
_json_str = json.JSONEncoder(ensure_ascii=False).encode  # a str as `json.dumps(s, ensure_ascii=False)` has it
_SLOT = "\x00tssc-text\x00"  # stands in for the text while a choice's chunk is split into head and tail
_SLOT_JSON = _json_str(_SLOT).encode()


@dataclass(frozen=True)
class StreamSpec:
    """What every chunk of one response shares."""

    response_id: str
    created: int
    model: str
    n: int
    include_usage: bool
    logprobs: bool
    token_text: TokenText


def sse(body: BaseModel | dict[str, Any]) -> bytes:
    data = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class TextChunks:
    """One response's text chunks from bytes serialised once per choice: `head + json(text) + tail`.

    `render(index, text)` is the full chunk as the schema serialises it. It runs once per choice,
    with a marker as the text, and is split around the marker: the bytes stay the schema's.
    """

    def __init__(self, render: Callable[[int, str], bytes]) -> None:
        self._render = render
        self._frames: dict[int, tuple[bytes, bytes]] = {}

    def __call__(self, index: int, text: str) -> bytes:
        head, tail = self._frames.get(index) or self._frame(index)
        return head + _json_str(text).encode() + tail

    def _frame(self, index: int) -> tuple[bytes, bytes]:
        head, slot, tail = self._render(index, _SLOT).partition(_SLOT_JSON)
        if not slot or _SLOT_JSON in tail:
            raise ValueError("a text chunk must hold its text exactly once")
        self._frames[index] = (head, tail)
        return head, tail


def _chat_chunk(spec: StreamSpec, choice: ChatChunkChoice | None) -> bytes:
    chunk = ChatCompletionChunk(
        id=spec.response_id, created=spec.created, model=spec.model, choices=[choice] if choice else []
    )
    data = chunk.model_dump(mode="json")
    for choice_data in data["choices"]:  # OpenAI deltas carry only the fields that changed
        choice_data["delta"] = {k: v for k, v in choice_data["delta"].items() if v is not None}
    if not spec.include_usage:
        data.pop("usage")
    return sse(data)


def chat_text_chunks(spec: StreamSpec) -> TextChunks:
    """Content-delta chunks (no logprobs) of one chat response."""
    return TextChunks(
        lambda i, text: _chat_chunk(spec, ChatChunkChoice(index=i, delta=ChatDelta(content=text)))
    )


def _chat_event_chunk(spec: StreamSpec, text: TextChunks, index: int, event: TokenEvent) -> bytes | None:
    if spec.logprobs and has_logprob(event):
        logprobs = ChatLogprobs(content=[chat_logprob_entry(event, spec.token_text)])
        delta = ChatDelta(content=event.text)
        return _chat_chunk(spec, ChatChunkChoice(index=index, delta=delta, logprobs=logprobs))
    return text(index, event.text) if event.text else None


def _chat_event_bytes(
    spec: StreamSpec, text: TextChunks, index: int, event: TokenEvent, finals: list[TokenEvent | None]
) -> bytes:
    """One event's chunks: its text (or logprobs) chunk, then the finish chunk if it ends its choice."""
    chunk = _chat_event_chunk(spec, text, index, event) or b""
    if event.finish_reason is None:
        return chunk
    finals[index] = event
    reason = finish_reason_out(event.finish_reason)
    return chunk + _chat_chunk(spec, ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason))


def chat_stream(
    engine: GeneratingEngine,
    reqs: Sequence[GenerationRequest],
    spec: StreamSpec,
    answers: AnswerLog | None = None,
    answered: Callable[[], None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """`answers`: every event is also added to it; `answered` runs once every choice has finished."""
    text = chat_text_chunks(spec)
    finals: list[TokenEvent | None] = [None] * len(reqs)
    opening = [
        _chat_chunk(spec, ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")))
        for i in range(len(reqs))
    ]

    def usage() -> bytes:
        chunk = ChatCompletionChunk(
            id=spec.response_id,
            created=spec.created,
            model=spec.model,
            choices=[],
            usage=usage_of(finals, spec.n),
        )
        return sse(chunk)

    def events(index: int, event: TokenEvent) -> bytes:
        if answers is not None:
            answers.add(index, event)
        return _chat_event_bytes(spec, text, index, event, finals)

    usage_chunk = usage if spec.include_usage else None
    return _sse_stream(engine, reqs, opening, events, finals, usage_chunk, answered)


async def _sse_stream(
    engine: GeneratingEngine,
    reqs: Sequence[GenerationRequest],
    opening: Sequence[bytes],
    event_bytes: Callable[[int, TokenEvent], bytes],
    finals: list[TokenEvent | None],
    usage: Callable[[], bytes] | None,
    finished: Callable[[], None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """The opening chunks, each on its own; then each batch of events in one write (`event_bytes` fills
    `finals`), except the last (every choice finished), which goes out with the usage chunk (if any) and
    `[DONE]` in one write, after `finished` ran; an engine error as an error event before `[DONE]`."""
    for chunk in opening:
        yield chunk
    tail = b""
    try:
        async with contextlib.aclosing(merged_batches(engine, reqs)) as batches:
            async for index, batch in batches:
                joined = b"".join(event_bytes(index, event) for event in batch)
                if all(final is not None for final in finals):
                    tail = joined
                elif joined:
                    yield joined
    except Exception as exc:
        yield tail + _error_event(engine_error(exc)) + DONE
        return
    if finished is not None and all(final is not None for final in finals):
        finished()  # before the last write: a client's next turn can arrive as soon as it reads [DONE]
    yield tail + (usage() if usage is not None else b"") + DONE


def _completion_chunk(spec: StreamSpec, choice: CompletionChoice | None) -> bytes:
    chunk = Completion(
        id=spec.response_id, created=spec.created, model=spec.model, choices=[choice] if choice else []
    )
    data = chunk.model_dump(mode="json", exclude={"session_id"})
    if not spec.include_usage:
        data.pop("usage")
    return sse(data)


def completion_text_chunks(spec: StreamSpec) -> TextChunks:
    """Text chunks (no logprobs, no finish reason) of one completions response."""
    return TextChunks(lambda i, text: _completion_chunk(spec, CompletionChoice(index=i, text=text)))


def _completion_event_chunk(
    spec: StreamSpec, text: TextChunks, index: int, event: TokenEvent, offset: int
) -> bytes | None:
    if spec.logprobs and has_logprob(event):
        logprobs = completion_logprobs([event], spec.token_text, offset)
        return _completion_chunk(spec, CompletionChoice(index=index, text=event.text, logprobs=logprobs))
    return text(index, event.text) if event.text else None


def _completion_event_bytes(
    spec: StreamSpec,
    text: TextChunks,
    index: int,
    event: TokenEvent,
    offsets: list[int],
    finals: list[TokenEvent | None],
) -> bytes:
    """One event's chunks: its text (or logprobs) chunk, then the finish chunk if it ends its choice;
    `offsets[index]` moves past its text."""
    chunk = _completion_event_chunk(spec, text, index, event, offsets[index]) or b""
    offsets[index] += len(event.text)
    if event.finish_reason is None:
        return chunk
    finals[index] = event
    reason = finish_reason_out(event.finish_reason)
    return chunk + _completion_chunk(spec, CompletionChoice(index=index, text="", finish_reason=reason))


def completion_stream(
    engine: GeneratingEngine, reqs: Sequence[GenerationRequest], spec: StreamSpec, echo: Sequence[str]
) -> AsyncGenerator[bytes, None]:
    """`echo[i]` is text to send first for choice i (the prompt, with `echo`), or empty."""
    text = completion_text_chunks(spec)
    offsets = [len(e) for e in echo]
    opening = [text(index, prompt) for index, prompt in enumerate(echo) if prompt]
    finals: list[TokenEvent | None] = [None] * len(reqs)

    def usage() -> bytes:
        last = Completion(
            id=spec.response_id,
            created=spec.created,
            model=spec.model,
            choices=[],
            usage=usage_of(finals, spec.n),
        )
        return sse(last.model_dump(mode="json", exclude={"session_id"}))

    events = lambda index, event: _completion_event_bytes(spec, text, index, event, offsets, finals)
    return _sse_stream(engine, reqs, opening, events, finals, usage if spec.include_usage else None)


def _error_event(err: APIError) -> bytes:
    log.warning("stream ended by an error: %s", err.message)
    return sse(err.body())
