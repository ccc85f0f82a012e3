"""Short completions prompts are tokenized on the event loop when the tokenizer is free, never waiting on an
encode another thread holds; longer ones, or any while the tokenizer is busy, go to a thread."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import anyio
import pytest

from server.api.protocol import CompletionRequest
from server.api.routes_openai import INLINE_ENCODE_CHARS, _encode_inline, _encode_prompts
from server.model.defaults import bundled_model_dir
from server.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(bundled_model_dir())


def test_encode_now_is_encode_when_free_and_none_while_another_thread_encodes(tok: Tokenizer) -> None:
    text = "def add(a, b):\n    return a + b\n"
    assert tok.encode_now(text) == tok.encode(text)
    with tok._lock:  # what a thread encoding a long prompt holds
        assert tok.encode_now(text) is None
    assert tok.encode_now(text) == tok.encode(text)


def test_only_short_prompts_are_encoded_inline(tok: Tokenizer) -> None:
    short = ["the state of a model " * 10, "is kept in cache"]
    assert _encode_inline(tok, short) == [tok.encode(t) for t in short]
    assert _encode_inline(tok, ["x" * (INLINE_ENCODE_CHARS + 1)]) is None
    assert _encode_inline(tok, ["y" * (INLINE_ENCODE_CHARS // 2 + 1)] * 2) is None  # the prompts together


@pytest.mark.parametrize("length", [40, INLINE_ENCODE_CHARS * 2])
def test_prompts_encode_alike_inline_in_a_thread_and_while_the_tokenizer_is_busy(
    tok: Tokenizer, length: int
) -> None:
    text = ("a cache of states " * (length // 18 + 1))[:length]
    engine = SimpleNamespace(tokenizer=tok)
    body = CompletionRequest(model="m", prompt=[text, text[: length // 2]])
    want = [tuple(tok.encode(text)), tuple(tok.encode(text[: length // 2]))]
    got = anyio.run(_encode_prompts, engine, body)
    assert [p.tokens for p in got] == want
    busy, release = threading.Event(), threading.Event()

    def hold() -> None:  # another request's encode holding the tokenizer
        with tok._lock:
            busy.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    busy.wait(10)
    threading.Timer(0.2, release.set).start()
    try:
        assert _encode_inline(tok, [text]) is None  # never waits on the loop: the thread path takes it
        got = anyio.run(_encode_prompts, engine, body)
    finally:
        release.set()
        holder.join()
    assert [p.tokens for p in got] == want
