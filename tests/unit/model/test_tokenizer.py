"""Tokenizer: chat template from tokenizer_config.json, the fallback template, message boundaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.model.tokenizer import FALLBACK_STOP, ChatTemplateError, Tokenizer, normalize_message
from server.train.tokenizer import END, save_tokenizer, train_tokenizer

_CORPUS = [
    "You are a helpful assistant. Hello there! How are you today?",
    "I am fine, thank you. What is the capital of France? Paris.",
    "def add(a, b):\n    return a + b\n",
] * 10


def _make_dir(tmp_path: Path, template: bool = True) -> Path:
    directory = tmp_path / "tok"
    save_tokenizer(train_tokenizer(_CORPUS, vocab_size=400, min_frequency=1), directory)
    if not template:
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        del cfg["chat_template"]
        cfg_path.write_text(json.dumps(cfg))
    return directory


def _conversation() -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "What is the capital of France?"},
    ]


def test_template_from_tokenizer_config(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_make_dir(tmp_path))
    assert not tok.uses_fallback_template and tok.chat_stop == ()
    text = tok.render_chat(_conversation()[:2])
    assert (
        text
        == "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nHello there!<|end|>\n<|assistant|>\n"
    )
    assert tok.eos_ids == (tok.hf.convert_tokens_to_ids(END),)
    assert tok.model_name == "tok"


def test_fallback_template_is_chatml_like(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_make_dir(tmp_path, template=False), model_name="m")
    assert tok.uses_fallback_template and tok.model_name == "m"
    text = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_stop == (FALLBACK_STOP,)
    tokens, boundaries = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert tok.decode(tokens) == text and boundaries


def test_boundaries_are_message_ends_and_true_prefixes(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_make_dir(tmp_path))
    conv = _conversation()
    tokens, boundaries = tok.encode_chat(conv)
    assert len(boundaries) == len(conv) and boundaries == sorted(boundaries)
    assert tokens == tok.encode(tok.render_chat(conv), add_special_tokens=False)
    for i, b in enumerate(boundaries):
        partial = tok.render_chat(conv[: i + 1], add_generation_prompt=False)
        assert tok.decode(tokens[:b], skip_special_tokens=False) == partial
        # the same prefix is what the next request (the partial conversation) tokenizes to
        assert tok.encode_chat(conv[: i + 1], add_generation_prompt=False)[0] == tokens[:b]


def test_follow_up_turn_shares_the_previous_prompt_as_a_prefix(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_make_dir(tmp_path))
    turn1, _ = tok.encode_chat(_conversation()[:2])
    reply = tok.encode("I am fine, thank you.", add_special_tokens=False)
    turn2, b2 = tok.encode_chat([*_conversation()[:3], {"role": "user", "content": "Bye"}])
    assert turn2[: len(turn1) + len(reply)] == turn1 + reply
    assert len(turn1) + len(reply) + 2 in b2  # the assistant message ends after "<|end|>\n"


def test_content_parts_are_joined(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_make_dir(tmp_path))
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    assert tok.render_chat(parts) == tok.render_chat([{"role": "user", "content": "Hello"}])


def test_a_message_is_normalized_without_touching_the_callers_dict(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_make_dir(tmp_path))
    parts = {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}
    empty = {"role": "assistant", "content": None}
    plain = {"role": "user", "content": "again"}
    out = [normalize_message(m) for m in (parts, empty, plain)]
    assert [m["content"] for m in out] == ["Hello", "", "again"]
    assert out[2] is plain  # already a string: no copy
    assert isinstance(parts["content"], list) and empty["content"] is None  # the callers' dicts as they were
    before = [dict(m) for m in (parts, empty, plain)]
    tok.render_chat([parts, empty, plain], continue_final_message=True, add_generation_prompt=False)
    assert [parts, empty, plain] == before


def test_bad_role_and_empty_conversation_raise(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_make_dir(tmp_path))
    with pytest.raises(ChatTemplateError):
        tok.encode_chat([{"role": "wizard", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        tok.encode_chat([])


def test_encode_decode_round_trip(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_make_dir(tmp_path))
    text = "Hello there! naïve 😀"
    assert tok.decode(tok.encode(text)) == text
    assert tok.token_text(tok.eos_ids[0]) == END


def test_a_lone_tokens_decode_is_kept_and_equals_the_tokenizers_own(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_make_dir(tmp_path))
    ids = [*tok.encode("Hello there! naïve 😀"), tok.eos_ids[0]]  # a byte-level piece of the emoji, a special
    for i in ids:
        for skip in (True, False):
            own = tok.hf.decode([i], skip_special_tokens=skip)
            assert tok.decode([i], skip_special_tokens=skip) == own
            assert tok.decode((i,), skip_special_tokens=skip) == own  # from the memo, any sequence type
    assert (
        tok.decode([tok.eos_ids[0]]) == "" and tok.decode([tok.eos_ids[0]], skip_special_tokens=False) == END
    )
    assert tok.decode(ids) == tok.hf.decode(ids, skip_special_tokens=True)  # longer sequences as before
