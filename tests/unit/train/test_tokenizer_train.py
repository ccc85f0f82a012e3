"""The demo tokenizer: exact byte-level round trip, special tokens, and the chat template as rendered
by transformers (the same text as the Python renderer used for training examples)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from server.train.tokenizer import (
    ASSISTANT,
    END,
    ENDOFTEXT,
    SPECIAL_TOKENS,
    render_chat,
    save_tokenizer,
    train_tokenizer,
)

_CORPUS = [
    'def add(a, b):\n    """Return a + b."""\n    return a + b\n',
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "import os\n\nfor name in os.listdir('.'):\n\tprint(name)  # tabs, too\n",
] * 20
_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "def f(x):"},
    {"role": "assistant", "content": "    return x"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(_CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def saved(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, directory)
    return directory


@pytest.mark.parametrize(
    "text",
    ["def add(a, b):\n    return a + b\n", "  \t\r\n mixed   whitespace\n\n", "ünïcödé → 名前 = '🐍'", ""],
)
def test_round_trip_is_exact(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_plain_encoding_prepends_endoftext_only_with_special_tokens(tok: Tokenizer) -> None:
    bare = tok.encode("x = 1\n", add_special_tokens=False).ids
    assert tok.encode("x = 1\n").ids == [tok.token_to_id(ENDOFTEXT), *bare]
    assert tok.decode(tok.encode("x = 1\n").ids) == "x = 1\n"


def test_special_tokens_have_the_first_ids_and_stay_whole(tok: Tokenizer) -> None:
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tok.encode(f"x{END}\n{ASSISTANT}", add_special_tokens=False).ids
    assert tok.token_to_id(END) in ids and tok.token_to_id(ASSISTANT) in ids


def test_vocab_size_is_respected(tok: Tokenizer) -> None:
    assert tok.get_vocab_size() <= 400


def test_autotokenizer_loads_with_special_tokens(saved: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(saved))
    assert hf.eos_token == END and hf.bos_token == ENDOFTEXT and hf.pad_token == ENDOFTEXT
    ids = hf.encode("def f(x):\n    pass\n")
    assert ids[0] == hf.bos_token_id and hf.decode(ids, skip_special_tokens=True) == "def f(x):\n    pass\n"
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert hf.bos_token_id not in list(chat["input_ids"])  # templates are encoded without bos


def test_chat_template_renders_like_training_text(saved: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(saved))
    rendered = hf.apply_chat_template(_MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert rendered == render_chat(_MESSAGES[:2], add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.<|end|>\n<|user|>\ndef f(x):<|end|>\n<|assistant|>\n"
    full = hf.apply_chat_template(_MESSAGES, tokenize=False)
    assert full == render_chat(_MESSAGES) and full.endswith("    return x<|end|>\n")


def test_chat_template_rejects_unknown_roles(saved: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(saved))
    with pytest.raises(Exception, match="unsupported role"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
