"""Incremental detokenizer: UTF-8 characters and stop strings split across tokens."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.detokenizer import MAX_STOP_STRINGS, IncrementalDetokenizer


class _ByteVocab:
    """A byte-level 'tokenizer' whose tokens are arbitrary byte chunks (ids assigned on first use)."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def ids(self, chunks: Sequence[bytes]) -> list[int]:
        out = []
        for c in chunks:
            if c not in self.pieces:
                self.pieces.append(c)
            out.append(self.pieces.index(c))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _stream(vocab: _ByteVocab, ids: list[int], stop: Sequence[str] = ()) -> tuple[list[str], bool]:
    detok = IncrementalDetokenizer(vocab.decode, stop=stop)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces, detok.stopped


_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=30
)


@settings(max_examples=300, deadline=None)
@given(text=_TEXT, cuts=st.lists(st.integers(0, 200), max_size=40))
def test_utf8_split_anywhere_never_emits_broken_characters(text: str, cuts: list[int]) -> None:
    vocab = _ByteVocab()
    ids = vocab.ids(_split(text.encode(), cuts))
    pieces, stopped = _stream(vocab, ids)
    assert not stopped
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_four_byte_emoji_split_into_single_bytes_is_held_until_complete() -> None:
    vocab = _ByteVocab()
    ids = vocab.ids([b"a", *(bytes([b]) for b in "😀".encode()), b"b"])
    detok = IncrementalDetokenizer(vocab.decode)
    assert [detok.push(i) for i in ids] == ["a", "", "", "", "😀", "b"]


def test_invalid_bytes_are_released_as_replacement_after_a_few_tokens() -> None:
    vocab = _ByteVocab()
    ids = vocab.ids([b"a", *([b"\xff"] * 20), b"b"])
    detok = IncrementalDetokenizer(vocab.decode)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == vocab.decode(ids)
    assert max(len(list(g)) for k, g in itertools.groupby(pieces) if k == "") < 6


def test_an_incomplete_character_at_the_end_is_flushed_as_replacement() -> None:
    vocab = _ByteVocab()
    ids = vocab.ids([b"ok", "é".encode()[:1]])
    pieces, _ = _stream(vocab, ids)
    assert pieces == ["ok", "", "\ufffd"]


@settings(max_examples=300, deadline=None)
@given(
    before=_TEXT,
    after=_TEXT,
    stop=st.text(alphabet="ab\n:é", min_size=1, max_size=5),
    other=st.text(alphabet="xyz", min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 200), max_size=40),
)
def test_stop_strings_split_across_tokens_are_never_emitted(
    before: str, after: str, stop: str, other: str, cuts: list[int]
) -> None:
    text = before + stop + after
    vocab = _ByteVocab()
    ids = vocab.ids(_split(text.encode(), cuts))
    pieces, stopped = _stream(vocab, ids, stop=[other, stop])
    first = min(i for i in (text.find(stop), text.find(other)) if i >= 0)
    assert stopped
    assert "".join(pieces) == text[:first]
    assert all(stop not in p and other not in p for p in pieces)


def test_a_stop_prefix_that_does_not_complete_is_released() -> None:
    vocab = _ByteVocab()
    ids = vocab.ids([b"x\n", b"\nU", b"ser", b"!"])
    detok = IncrementalDetokenizer(vocab.decode, stop=["\n\nUser:"])
    assert [detok.push(i) for i in ids] == ["x", "", "", "\n\nUser!"]
    assert detok.flush() == "" and not detok.stopped


def test_held_stop_prefix_is_released_at_flush() -> None:
    vocab = _ByteVocab()
    ids = vocab.ids([b"hi", b" STO"])
    pieces, stopped = _stream(vocab, ids, stop=["STOP"])
    assert pieces == ["hi", " ", "STO"] and not stopped


def test_nothing_is_emitted_after_a_stop() -> None:
    vocab = _ByteVocab()
    ids = vocab.ids([b"a", b"END", b"b"])
    detok = IncrementalDetokenizer(vocab.decode, stop=["END"])
    assert [detok.push(i) for i in ids] == ["a", "", ""]
    assert detok.stopped and detok.flush() == "" and detok.text == "a"


def test_too_many_stop_strings_are_rejected() -> None:
    IncrementalDetokenizer(lambda ids: "", stop=["a", "b", "c", "d", "<|im_end|>"])  # 4 user + 1 template
    with pytest.raises(ValueError):
        IncrementalDetokenizer(lambda ids: "", stop=[chr(ord("a") + i) for i in range(MAX_STOP_STRINGS + 1)])


def _train_bpe(tmp_path: Path) -> object:
    from transformers import AutoTokenizer

    from server.train.tokenizer import save_tokenizer, train_tokenizer

    corpus = ["hello world, naïve café 😀 日本語 テキスト"] * 20 + ["def f(x):\n    return x\n"] * 20
    save_tokenizer(train_tokenizer(corpus, vocab_size=300, min_frequency=1), tmp_path)
    return AutoTokenizer.from_pretrained(str(tmp_path))


def test_real_byte_level_bpe_stream_equals_full_decode(tmp_path: Path) -> None:
    hf = _train_bpe(tmp_path)
    text = "naïve 😀 日本語 and  spaces\n\ttabs 🎉🎉 テキスト"
    ids = hf.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    decode = lambda t: hf.decode(list(t), skip_special_tokens=True)  # type: ignore[attr-defined]
    prompt = hf.encode("hello world", add_special_tokens=False)  # type: ignore[attr-defined]
    detok = IncrementalDetokenizer(decode, prompt_tail=prompt)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_every_split_of_straddling_characters_round_trips() -> None:
    """Each token may end mid-character for many tokens in a row (found by hypothesis): text
    is released up to the last complete character, never as U+FFFD."""
    text = "\x80\U00010000\U00010000"
    data = text.encode()
    for mask in range(1 << (len(data) - 1)):
        points = [0, *(i + 1 for i in range(len(data) - 1) if mask >> i & 1), len(data)]
        vocab = _ByteVocab()
        pieces, _ = _stream(vocab, vocab.ids([data[a:b] for a, b in itertools.pairwise(points)]))
        assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces), points
