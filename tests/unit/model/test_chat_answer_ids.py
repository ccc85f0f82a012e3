"""ChatEncoder with `answer_ids`: a follow-up takes the model's previous answer as the ids it generated, not
as its text re-tokenized, so that it continues what the model saw; everything else stays `encode_chat`'s."""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any

import pytest

from server.model.chat_encoding import Answer, ChatEncoder, ChatEncoding
from server.model.tokenizer import Tokenizer
from tests.unit.model.test_chat_encoding import _bpe

Msg = dict[str, Any]
FIRST: list[Msg] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
ANSWER = "Paris, the capital"


@pytest.fixture
def tok(tmp_path: Path) -> Tokenizer:
    return _bpe(tmp_path)


def _spelled(tok: Tokenizer, text: str) -> array[int]:
    """Ids of `text` one character at a time: its text, but not the ids a tokenizer makes of it."""
    ids = [i for ch in text for i in tok.encode_offsets(ch)[0]]  # type: ignore[index]
    assert tok.decode(ids) == text and ids != tok.encode_offsets(text)[0]  # type: ignore[index]
    return array("i", ids)


def _rest(tok: Tokenizer, text: str) -> list[int]:
    encoded = tok.encode_offsets(text)
    assert encoded is not None
    return encoded[0]


def _follow(answer: str, question: str = "And of Italy?") -> list[Msg]:
    return [*FIRST, {"role": "assistant", "content": answer}, {"role": "user", "content": question}]


def test_a_follow_up_takes_the_answers_own_ids(tok: Tokenizer) -> None:
    enc = ChatEncoder(tok, answer_ids=True)
    first = enc.encode(FIRST, "k")
    ids = _spelled(tok, ANSWER)
    assert enc.answered("k", first.tokens, [Answer(ANSWER, ids)])
    out = enc.encode(_follow(ANSWER), "k")
    before = tok.render_chat(FIRST, True)
    after = tok.render_chat(_follow(ANSWER), True)[len(before) + len(ANSWER) :]
    assert list(out.tokens) == [*first.tokens, *ids, *_rest(tok, after)]
    assert out.reused_tokens == len(first.tokens) and out.answer_tokens == len(ids)
    assert all(a is b for a, b in zip(first.tokens, out.tokens, strict=False))  # the previous turn's ints
    # the same boundaries as a full encoding, shifted by the answer's extra ids past the answer
    tokens, boundaries = tok.encode_chat(_follow(ANSWER))
    extra = len(ids) - len(_rest(tok, ANSWER))
    assert out.boundaries == [b if b <= len(first.tokens) else b + extra for b in boundaries]
    assert tokens[: len(first.tokens)] == list(first.tokens) and tokens[-len(_rest(tok, after)) :] == _rest(
        tok, after
    )


def test_the_next_turn_keeps_the_earlier_answers_ids_and_takes_its_own(tok: Tokenizer) -> None:
    enc = ChatEncoder(tok, answer_ids=True)
    first = enc.encode(FIRST, "k")
    ids = _spelled(tok, ANSWER)
    enc.answered("k", first.tokens, [Answer(ANSWER, ids)])
    second = enc.encode(_follow(ANSWER), "k")
    third_msgs = [
        *_follow(ANSWER),
        {"role": "assistant", "content": "the capital"},
        {"role": "user", "content": "ok"},
    ]
    third = enc.encode(third_msgs, "k")  # the second answer was not recorded: re-tokenized
    n = len(first.tokens)
    assert list(third.tokens[: n + len(ids)]) == [*first.tokens, *ids]
    assert third.answer_tokens == 0 and third.reused_tokens >= n + len(ids)
    capital = _spelled(tok, "the capital")
    assert enc.answered("k", third.tokens, [Answer("the capital", capital)])
    fourth = enc.encode(
        [*third_msgs, {"role": "assistant", "content": "the capital"}, {"role": "user", "content": "!"}], "k"
    )
    assert list(fourth.tokens[: len(third.tokens) + len(capital)]) == [*third.tokens, *capital]
    assert fourth.answer_tokens == len(capital) and second.answer_tokens == len(ids)


@pytest.mark.parametrize("sent", [ANSWER + "!", "Paris", " " + ANSWER, ""])
def test_an_answer_the_client_changed_is_tokenized_as_text(tok: Tokenizer, sent: str) -> None:
    """Another text than the one recorded (an edit, a cut, a prefix of it): `encode_chat`'s tokens."""
    enc = ChatEncoder(tok, answer_ids=True)
    first = enc.encode(FIRST, "k")
    enc.answered("k", first.tokens, [Answer(ANSWER, _spelled(tok, ANSWER))])
    msgs = _follow(sent)
    out = enc.encode(msgs, "k")
    if sent.startswith(ANSWER):  # the recorded text, then more: the recorded ids, then the rest as text
        assert out.answer_tokens > 0
        return
    assert list(out.tokens) == tok.encode_chat(msgs)[0] and out.answer_tokens == 0


def test_the_longest_of_several_answers_is_taken(tok: Tokenizer) -> None:
    """n > 1 choices: the one the client sent back (the longest whose text matches)."""
    enc = ChatEncoder(tok, answer_ids=True)
    first = enc.encode(FIRST, "k")
    short, full = _spelled(tok, "Paris"), _spelled(tok, ANSWER)
    enc.answered("k", first.tokens, [Answer("Paris", short), Answer(ANSWER, full), Answer("", array("i"))])
    assert enc.encode(_follow(ANSWER), "k").answer_tokens == len(full)


def test_off_by_default_and_only_for_the_keys_last_turn(tok: Tokenizer) -> None:
    off = ChatEncoder(tok)
    first = off.encode(FIRST, "k")
    assert not off.answered("k", first.tokens, [Answer(ANSWER, _spelled(tok, ANSWER))])
    assert list(off.encode(_follow(ANSWER), "k").tokens) == tok.encode_chat(_follow(ANSWER))[0]
    on = ChatEncoder(tok, answer_ids=True)
    stale = on.encode(FIRST, "k")
    on.encode(FIRST, "k")  # the same conversation's next request: its own tuple (or the same one, reused)
    latest: ChatEncoding = on.encode([*FIRST, {"role": "user", "content": "?"}], "k")
    assert not on.answered("k", stale.tokens, [Answer(ANSWER, _spelled(tok, ANSWER))])
    assert not on.answered("other", latest.tokens, [Answer(ANSWER, _spelled(tok, ANSWER))])
    assert on.answered("k", latest.tokens, [Answer(ANSWER, _spelled(tok, ANSWER))])
    assert on.stats().nbytes > 0


def test_answers_count_toward_the_byte_bound(tok: Tokenizer) -> None:
    """An entry that its answers push past `max_bytes` is dropped, as one that large would not be kept."""
    probe = ChatEncoder(tok, answer_ids=True)
    probe.encode(FIRST, "k")
    room = probe.stats().nbytes + 1000
    enc = ChatEncoder(tok, answer_ids=True, max_bytes=room)
    first = enc.encode(FIRST, "k")
    assert enc.answered("k", first.tokens, [Answer(ANSWER, _spelled(tok, ANSWER))])
    assert enc.stats().conversations == 1 and enc.stats().nbytes <= room
    long = "a" * 2000
    assert enc.answered("k", first.tokens, [Answer(long, array("i", [1] * 2000))])
    assert enc.stats().conversations == 0 and enc.stats().nbytes == 0
