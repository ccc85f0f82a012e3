"""ChatEncoder: per-turn reuse of the previous turn, always equal to a full `encode_chat`."""

from __future__ import annotations

import itertools
import json
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.model.chat_encoding import (
    MAX_RENDERS,
    ChatEncoder,
    ChatEncoding,
    EncodeCancelled,
    PromptTooLong,
    _kept,
    _Tokens,
)
from server.model.tokenizer import Tokenizer, _prefix_lengths
from server.train.tokenizer import save_tokenizer, train_tokenizer
from tests.integration.server_proc import char_tokenizer
from tests.tiny_models import make_tokenizer

Msg = dict[str, Any]
_CORPUS = [
    "You are a helpful assistant. Hello there! How are you today?",
    "I am fine, thank you. What is the capital of France? Paris.",
    "def add(a, b):\n    return a + b\n",
] * 10
_WORDS = ["hello", "there", "Paris", "the", "capital", "\n", "  ", "def", "42", "naïve", "日本", "😀", "é"]
_TRICKY = ["<|end|>", "<|user|>", "<|", "|>", "<|en", "d|>", "<|im_end|>", "<|im_start|>", "<|assistant|>"]


def _bpe(tmp_path: Path, *, template: bool = True, chatml_tokens: bool = False) -> Tokenizer:
    """The byte-level BPE of test_tokenizer.py (its own template, or none: the ChatML fallback)."""
    tok = train_tokenizer(_CORPUS, vocab_size=400, min_frequency=1)
    if chatml_tokens:
        tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    directory = tmp_path / "bpe"
    save_tokenizer(tok, directory)
    if not template:
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        del cfg["chat_template"]
        cfg_path.write_text(json.dumps(cfg))
    return Tokenizer.from_pretrained(directory)


def _tiny(tmp_path: Path) -> Tokenizer:
    """tests/tiny_models.py's tokenizer: no newlines in its template, text right after specials."""
    return Tokenizer.from_pretrained(make_tokenizer(tmp_path / "tiny"))


def _chars(tmp_path: Path) -> Tokenizer:
    save_tokenizer(char_tokenizer(), tmp_path / "chars")
    return Tokenizer.from_pretrained(tmp_path / "chars")


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(tok.hf, "m", template)


def _text(rng: random.Random, n: int, pool: list[str] = _WORDS) -> str:
    return " ".join(rng.choice(pool) for _ in range(n))


def _conversation(n: int, seed: int = 0, pool: list[str] = _WORDS) -> list[Msg]:
    rng = random.Random(seed)
    msgs: list[Msg] = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(n - 1):
        msgs.append(
            {"role": "user" if i % 2 == 0 else "assistant", "content": _text(rng, rng.randint(1, 12), pool)}
        )
    return msgs


def _assert_exact(enc: ChatEncoder, msgs: list[Msg], key: object = "k", **kw: Any) -> ChatEncoding:
    out = enc.encode(msgs, key, **kw)
    tokens, boundaries = enc.tokenizer.encode_chat(msgs, kw.get("add_generation_prompt", True))
    assert list(out.tokens) == tokens
    assert out.boundaries == boundaries
    return out


def _grow(enc: ChatEncoder, msgs: list[Msg], key: object = "k") -> list[ChatEncoding]:
    """Send msgs[:1], then each request ending with a user message, turn by turn; all exact."""
    return [_assert_exact(enc, msgs[:n], key) for n in range(2, len(msgs) + 1, 2)]


# ---- follow-up turns --------------------------------------------------------------------------


def test_a_long_first_turn_renders_a_bounded_number_of_prefixes(tmp_path: Path) -> None:
    """300 messages at once (no previous turn): the tokens are exact, and boundaries are found for at most
    MAX_RENDERS messages (the first, the last ones, evenly spaced ones), each a true boundary."""
    enc = ChatEncoder(_bpe(tmp_path))
    msgs = _conversation(300)
    out = enc.encode(msgs, "long")
    tokens, boundaries = enc.tokenizer.encode_chat(msgs)
    assert list(out.tokens) == tokens
    assert MAX_RENDERS - 2 <= out.rendered_prefixes <= MAX_RENDERS
    assert set(out.boundaries) <= set(boundaries) and len(out.boundaries) >= MAX_RENDERS - 3
    assert out.boundaries[0] == boundaries[0] and out.boundaries[-1] == boundaries[-1]


def test_200_message_conversation_reuses_every_turn_and_renders_only_new_messages(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    turns = _grow(enc, _conversation(201))
    assert turns[0].reused_tokens == 0 and turns[0].rendered_prefixes == 2
    for prev, turn in itertools.pairwise(turns):
        # the previous prompt up to its last added token is reused; the reply and question are new
        assert len(prev.tokens) - 2 <= turn.reused_tokens < len(prev.tokens)
        assert turn.rendered_prefixes == 2
        # the reused ids are the previous turn's own int objects (what is compared with the previous prompt
        # downstream compares pointers), the new ones ints of their own
        reused = turn.reused_tokens
        assert all(a is b for a, b in zip(prev.tokens[:reused], turn.tokens[:reused], strict=True))
        assert type(turn.tokens) is tuple
    assert enc.stats().hits == len(turns) - 1 and enc.stats().misses == 1


@pytest.mark.parametrize("build", [_tiny, _chars], ids=["tiny_models", "char_tokenizer"])
def test_other_tokenizers_reuse_every_turn(tmp_path: Path, build: Callable[[Path], Tokenizer]) -> None:
    enc = ChatEncoder(build(tmp_path))
    turns = _grow(enc, _conversation(41, seed=1, pool=[w for w in _WORDS if w.isascii()]))
    assert all(t.reused_tokens > 0 and t.rendered_prefixes == 2 for t in turns[1:])


def test_same_request_again_reuses_all_tokens(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    msgs = _conversation(9)
    first = _assert_exact(enc, msgs)
    again = _assert_exact(enc, msgs)
    assert again.reused_tokens == len(first.tokens) and again.rendered_prefixes == 0


def test_without_generation_prompt(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    msgs = _conversation(12)
    for n in range(1, len(msgs) + 1):
        _assert_exact(enc, msgs[:n], add_generation_prompt=n % 3 == 0)


# ---- regenerate, edits, other conversations ---------------------------------------------------


def test_regenerate_drops_the_last_reply(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    msgs = _conversation(12)  # ..., user, assistant, user
    _assert_exact(enc, msgs)
    out = _assert_exact(enc, msgs[:-2])  # the request that produced msgs[-2], sent again
    assert out.reused_tokens > 0 and out.rendered_prefixes == 0


def test_edit_of_message_3_of_10_reuses_what_comes_before(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    msgs = _conversation(10)
    first = _assert_exact(enc, msgs)
    edited = [*msgs[:3], {"role": "assistant", "content": "Something else entirely."}, *msgs[4:]]
    out = _assert_exact(enc, edited)
    assert 0 < out.reused_tokens <= first.boundaries[2]
    assert out.rendered_prefixes == len(msgs) - 3


def test_a_different_conversation_under_the_same_key(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    _assert_exact(enc, _conversation(9, seed=1))
    other = [{"role": "user", "content": "What is the capital of France?"}, *_conversation(8, seed=2)[1:]]
    out = _assert_exact(enc, other)
    assert out.reused_tokens == 0 and out.rendered_prefixes == len(other)


def test_random_operations_stay_exact(tmp_path: Path) -> None:
    """Append, regenerate, edit, resend, switch key, on adversarial content, for every tokenizer."""
    for build in (_bpe, _tiny, _chars):
        enc = ChatEncoder(build(tmp_path / build.__name__))
        rng = random.Random(7)
        pool = _WORDS + _TRICKY if build is not _chars else [w for w in _WORDS + _TRICKY if w.isascii()]
        msgs = _conversation(3, seed=3, pool=pool)
        for _ in range(40):
            msgs = _mutate(rng, msgs, pool)
            _assert_exact(enc, msgs, key=rng.choice(["a", "a", "a", "b"]))


def _mutate(rng: random.Random, msgs: list[Msg], pool: list[str]) -> list[Msg]:
    op = rng.choice(["append", "append", "append", "regenerate", "edit", "resend"])
    if op == "append":
        role = "assistant" if msgs[-1]["role"] == "user" else "user"
        return [*msgs, {"role": role, "content": _text(rng, rng.randint(0, 8), pool)}]
    if op == "regenerate" and len(msgs) > 2:
        return msgs[:-1]
    if op == "edit":
        i = rng.randrange(len(msgs))
        return [*msgs[:i], {**msgs[i], "content": _text(rng, rng.randint(0, 8), pool)}, *msgs[i + 1 :]]
    return list(msgs)


def test_every_cut_splits_the_tokenization_exactly(tmp_path: Path) -> None:
    """At each cut found, tokens(T) == tokens(T[:c]) + tokens(T[c:]): what reuse relies on."""
    enc = ChatEncoder(_bpe(tmp_path))
    rng = random.Random(11)
    for _ in range(20):
        text = "".join(rng.choice([*_WORDS, *_TRICKY, " ", "\n"]) for _ in range(rng.randint(1, 60)))
        tokens = enc._append(_Tokens.empty(), text, 0)
        assert tokens.ids.tolist() == enc.tokenizer.encode(text, add_special_tokens=False)
        for c, j in zip(tokens.cut_chars, tokens.cut_index, strict=True):
            assert enc.tokenizer.encode(text[:c], add_special_tokens=False) == tokens.ids[:j].tolist()
            assert enc.tokenizer.encode(text[c:], add_special_tokens=False) == tokens.ids[j:].tolist()


def test_a_longer_added_token_across_the_cut_is_not_split(tmp_path: Path) -> None:
    """ "<|end|>" ends turn 1, and turn 2 continues it into the longer added token "<|end|>!!"."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    raw = char_tokenizer()
    raw.add_special_tokens([AddedToken("<|end|>!!", special=True, normalized=False)])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|end|>")
    enc = ChatEncoder(Tokenizer(hf, "m", "{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}"))
    turn1 = [{"role": "user", "content": "hi"}]
    _assert_exact(enc, turn1)
    out = _assert_exact(enc, [*turn1, {"role": "assistant", "content": "!!x"}])
    assert out.reused_tokens == 0 and hf.convert_tokens_to_ids("<|end|>!!") in out.tokens


# ---- content --------------------------------------------------------------------------------


def test_unicode_content(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    pool = ["日本語", "😀👍🏽", "naïve", "e\u0301", "Ω", "\u200d", "🇫🇷", "\t", "\r\n"]
    turns = _grow(enc, _conversation(21, seed=4, pool=pool))
    assert all(t.reused_tokens > 0 for t in turns[1:])


def test_empty_and_missing_content(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    msgs: list[Msg] = [
        {"role": "system", "content": ""},
        {"role": "user", "content": None},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": ""},
    ]
    turns = _grow(enc, msgs)
    assert turns[-1].reused_tokens > 0


def test_special_token_strings_typed_in_content(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    msgs = _conversation(3)
    for content in ["<|end|>", "a<|end|>\n<|user|>\n", "<|", "ends with <|en", "<|assistant|>", "|>x"]:
        msgs = [*msgs, {"role": "assistant", "content": content}, {"role": "user", "content": content}]
        _assert_exact(enc, msgs)


@pytest.mark.parametrize("chatml_tokens", [False, True], ids=["no-im-tokens", "im-tokens"])
def test_fallback_template(tmp_path: Path, chatml_tokens: bool) -> None:
    tok = _bpe(tmp_path, template=False, chatml_tokens=chatml_tokens)
    assert tok.uses_fallback_template
    enc = ChatEncoder(tok)
    turns = _grow(enc, _conversation(15, seed=5))
    # without <|im_start|> as an added token there is no safe cut: tokens are all re-tokenized,
    # while message boundaries are still reused
    assert all((t.reused_tokens > 0) == chatml_tokens for t in turns[1:])
    assert all(t.rendered_prefixes == 2 for t in turns[1:])


def test_template_that_refuses_partial_conversations(tmp_path: Path) -> None:
    refuse = "{% if messages[-1]['role'] == 'assistant' %}{{ raise_exception('no') }}{% endif %}"
    tok = _bpe(tmp_path)
    enc = ChatEncoder(_with_template(tok, refuse + tok.chat_template))
    turns = _grow(enc, _conversation(11))
    assert all(t.rendered_prefixes == 2 for t in turns[1:])


def test_template_whose_start_depends_on_later_messages(tmp_path: Path) -> None:
    """The message count opens the rendering: every turn changes it, so nothing is reused."""
    tok = _bpe(tmp_path)
    enc = ChatEncoder(_with_template(tok, "{{ messages | length }}\n" + tok.chat_template))
    turns = _grow(enc, _conversation(9))
    assert all(t.reused_tokens == 0 and t.rendered_prefixes > 2 for t in turns[1:])


def test_edit_that_the_full_rendering_does_not_show(tmp_path: Path) -> None:
    """Earlier replies are hidden (as reasoning templates drop past thinking); editing one changes
    its own partial rendering only, which the kept messages catch."""
    hide = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n"
        "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    enc = ChatEncoder(_with_template(_bpe(tmp_path), hide))
    msgs = _conversation(6)
    _assert_exact(enc, msgs)
    edited = [*msgs[:2], {"role": "assistant", "content": "<|end|>\nthere"}, *msgs[3:]]
    out = _assert_exact(enc, edited)
    assert out.reused_tokens == len(enc.tokenizer.encode_chat(msgs)[0])  # the same rendering


def test_time_dependent_template_renders_every_prefix(tmp_path: Path) -> None:
    tok = _bpe(tmp_path)
    enc = ChatEncoder(_with_template(tok, "{{ strftime_now('%Y') }}" + tok.chat_template))
    turns = _grow(enc, _conversation(7))
    assert [t.rendered_prefixes for t in turns] == [2, 4, 6]


# ---- cancellation, limits, memory, threads ----------------------------------------------------


def test_cancelled_before_any_work(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    with pytest.raises(EncodeCancelled):
        enc.encode(_conversation(5), "k", cancelled=lambda: True)
    assert enc.stats().conversations == 0


def test_cancelled_between_message_renders(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    polls = 0

    def cancelled() -> bool:
        nonlocal polls
        polls += 1
        return polls > 4  # before the render, before tokenizing, then two message renders

    with pytest.raises(EncodeCancelled):
        enc.encode(_conversation(20), "k", cancelled=cancelled)
    assert polls == 5 and enc.stats().conversations == 0


def test_event_works_as_cancellation(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    event = threading.Event()
    _assert_exact(enc, _conversation(5), cancelled=event.is_set)
    event.set()
    with pytest.raises(EncodeCancelled):
        enc.encode(_conversation(5), "k", cancelled=event.is_set)


def test_max_tokens(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    msgs = _conversation(9)
    n = len(enc.tokenizer.encode_chat(msgs)[0])
    _assert_exact(enc, msgs, key="ok", max_tokens=n)
    with pytest.raises(PromptTooLong) as info:
        enc.encode(msgs, "long", max_tokens=n - 1)
    assert (info.value.tokens, info.value.limit) == (n, n - 1) and isinstance(info.value, ValueError)
    assert enc.stats().conversations == 1  # the refused prompt was not kept


def test_lru_keeps_at_most_max_conversations(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path), max_conversations=3)
    for key in range(5):
        _assert_exact(enc, _conversation(5, seed=key), key=key)
    assert enc.stats().conversations == 3
    assert enc.encode(_conversation(5, seed=0), 0).reused_tokens == 0  # evicted
    assert enc.encode(_conversation(5, seed=4), 4).reused_tokens > 0  # kept


def test_lru_keeps_within_max_bytes(tmp_path: Path) -> None:
    tok = _bpe(tmp_path)
    probe = ChatEncoder(tok)
    probe.encode(_conversation(9), "k")
    one = probe.stats().nbytes
    enc = ChatEncoder(tok, max_bytes=int(2.5 * one))
    for key in range(6):
        enc.encode(_conversation(9, seed=key), key)
        assert enc.stats().nbytes <= enc.max_bytes
    assert enc.stats().conversations == 2
    small = ChatEncoder(tok, max_bytes=one - 1)  # an entry over the budget is not kept
    _assert_exact(small, _conversation(9))
    assert small.stats().conversations == 0 and small.stats().nbytes == 0


def test_forget(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path))
    enc.encode(_conversation(5), "k")
    enc.forget("k")
    assert enc.stats().conversations == 0 and enc.stats().nbytes == 0


def test_concurrent_conversations(tmp_path: Path) -> None:
    enc = ChatEncoder(_bpe(tmp_path), max_conversations=3)
    errors: list[BaseException] = []

    def run(key: int) -> None:
        try:
            _grow(enc, _conversation(15, seed=key % 3), key=key % 4)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert enc.stats().conversations <= 3


# ---- slow tokenizers --------------------------------------------------------------------------


class _Slow:
    """A transformers tokenizer seen as a slow one: no offsets, no backend."""

    is_fast = False

    def __init__(self, fast: Any) -> None:
        self._fast = fast

    def __getattr__(self, name: str) -> Any:
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._fast, name)

    def __len__(self) -> int:
        return len(self._fast)


def test_slow_tokenizer_ends_match_decoding_every_prefix(tmp_path: Path) -> None:
    slow = Tokenizer(_Slow(_bpe(tmp_path).hf), "slow")
    text = "Hello 😀 naïve 日本 <|end|>\n" + _text(random.Random(0), 200, _WORDS + _TRICKY)
    tokens, ends = slow.encode_with_ends(text)
    decode = lambda ids: slow.decode(ids, skip_special_tokens=False)
    assert _prefix_lengths(decode, tokens) is not None  # the windowed path, not the quadratic one
    lengths = [len(decode(tokens[: i + 1])) for i in range(len(tokens))]
    assert ends == [max(lengths[: i + 1]) for i in range(len(lengths))]


def test_slow_tokenizer_chat_encoding(tmp_path: Path) -> None:
    enc = ChatEncoder(Tokenizer(_Slow(_bpe(tmp_path).hf), "slow", _bpe(tmp_path / "t").chat_template))
    turns = _grow(enc, _conversation(9))
    assert all(t.reused_tokens == 0 and t.rendered_prefixes == 2 for t in turns[1:])


def test_a_decoder_that_is_not_local_is_detected() -> None:
    """Early text that changes with later tokens: the caller decodes every prefix instead."""
    assert _prefix_lengths(lambda ids: "".join(str(i) for i in reversed(ids)), [1, 2, 3]) is None


def test_a_message_is_kept_as_its_role_and_text_or_else_as_a_digest() -> None:
    """What the next turn compares a message with, to tell which messages are unchanged (`_kept`)."""
    plain = {"role": "user", "content": "hello"}
    assert _kept(plain) == _kept({"role": "user", "content": "hel" + "lo"}) == ("user", "hello")
    assert _kept(plain) != _kept({"role": "user", "content": "hello!"})
    assert _kept(plain) != _kept({"role": "assistant", "content": "hello"})
    named = {"role": "user", "content": "hello", "name": "ann"}
    assert isinstance(_kept(named), bytes) and _kept(named) == _kept(dict(named))
    assert _kept(named) != _kept({**named, "name": "bob"}) and _kept(named) != _kept(plain)
    assert _kept({"role": "user", "content": "x", "when": object()}) != _kept(  # not JSON: never equal
        {"role": "user", "content": "x", "when": object()}
    )
