"""Chat template options passed through as vLLM does: add_generation_prompt, continue_final_message,
chat_template_kwargs; ChatEncoder stays equal to `encode_chat` with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.model.chat_encoding import ChatEncoder
from server.model.tokenizer import ChatTemplateError, Tokenizer
from tests.tiny_models import make_tokenizer

# the tiny template plus a variable `suffix` rendered after the messages
SUFFIX_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{{ suffix }}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
Msg = dict[str, Any]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tiny")))


def _suffix_tok(tmp_path: Path) -> Tokenizer:
    tok = Tokenizer.from_pretrained(make_tokenizer(tmp_path / "tiny"))
    tok.chat_template = SUFFIX_TEMPLATE
    return tok


def _conversation(reply: str = "brown fox") -> list[Msg]:
    return [
        {"role": "system", "content": "hello"},
        {"role": "user", "content": "the quick"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "jumps"},
    ]


def test_add_generation_prompt_false_ends_at_the_last_message(tok: Tokenizer) -> None:
    msgs = _conversation()
    assert tok.render_chat(msgs).endswith("<|end|><|assistant|>")
    assert tok.render_chat(msgs, add_generation_prompt=False).endswith("jumps<|end|>")


def test_continue_final_message_cuts_after_its_content(tok: Tokenizer) -> None:
    msgs = [*_conversation()[:2], {"role": "assistant", "content": "def fib"}]
    text = tok.render_chat(msgs, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|assistant|>def fib")
    assert tok.render_chat(msgs, add_generation_prompt=False).startswith(text)


def test_template_kwargs_reach_the_template(tmp_path: Path) -> None:
    tok = _suffix_tok(tmp_path)
    msgs = _conversation()
    assert tok.render_chat(msgs, template_kwargs={"suffix": "[S]"}).endswith("<|end|>[S]<|assistant|>")
    assert tok.render_chat(msgs).endswith("<|end|><|assistant|>")


@pytest.mark.parametrize("name", ["messages", "tokenize", "add_generation_prompt", "tools"])
def test_reserved_template_kwargs_are_refused(tok: Tokenizer, name: str) -> None:
    with pytest.raises(ChatTemplateError, match=name):
        tok.render_chat(_conversation(), template_kwargs={name: True})


def test_encode_chat_boundaries_follow_the_template_kwargs(tmp_path: Path) -> None:
    """A suffix that is a whole special token moves the boundaries of messages followed by a user turn."""
    tok = _suffix_tok(tmp_path)
    _, plain = tok.encode_chat(_conversation())
    _, suffixed = tok.encode_chat(_conversation(), template_kwargs={"suffix": "<|user|>"})
    assert plain != suffixed


@pytest.mark.parametrize(
    "first, second",
    [({"suffix": "<|user|>"}, {"suffix": ""}), ({}, {"suffix": "<|user|>"}), ({"suffix": "x"}, None)],
)
def test_encoder_reuses_a_turn_only_with_the_same_template_kwargs(
    tmp_path: Path, first: dict[str, str], second: dict[str, str] | None
) -> None:
    tok = _suffix_tok(tmp_path)
    encoder = ChatEncoder(tok)
    encoder.encode(_conversation(), "k", template_kwargs=first)
    got = encoder.encode(_conversation(), "k", template_kwargs=second)
    assert (list(got.tokens), got.boundaries) == tuple(
        tok.encode_chat(_conversation(), template_kwargs=second)
    )
    assert got.reused_tokens == 0


def test_encoder_reuses_a_turn_with_the_same_template_kwargs(tmp_path: Path) -> None:
    tok = _suffix_tok(tmp_path)
    encoder = ChatEncoder(tok)
    kwargs = {"suffix": "<|user|>"}
    encoder.encode(_conversation()[:2], "k", template_kwargs=kwargs)
    got = encoder.encode(_conversation(), "k", template_kwargs=dict(kwargs))
    assert (list(got.tokens), got.boundaries) == tuple(
        tok.encode_chat(_conversation(), template_kwargs=kwargs)
    )
    assert got.reused_tokens > 0


@pytest.mark.parametrize("add, cont", [(True, False), (False, False), (False, True)])
def test_encoder_equals_encode_chat_with_each_option(tok: Tokenizer, add: bool, cont: bool) -> None:
    encoder = ChatEncoder(tok)
    options: dict[str, Any] = {"add_generation_prompt": add, "continue_final_message": cont}
    for reply in ("brown", "brown fox", "brown fox jumps"):  # the same conversation, the reply growing
        msgs = _conversation(reply)[:3]
        got = encoder.encode(msgs, "k", **options)
        assert (list(got.tokens), got.boundaries) == tuple(tok.encode_chat(msgs, **options))
