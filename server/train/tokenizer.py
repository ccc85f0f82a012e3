"""Byte-level BPE tokenizer with a chat template, saved so `transformers.AutoTokenizer` loads it.

Special tokens (ids 0..4, in this order):
    <|endoftext|>  document separator; also bos and pad
    <|end|>        ends a chat turn; the eos token (generation stops on it)
    <|system|> <|user|> <|assistant|>   open a turn of that role

Plain encoding prepends <|endoftext|> (see `add_bos`). A rendered conversation looks like
    <|system|>\\nYou are ...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ENDOFTEXT = "<|endoftext|>"
END = "<|end|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = (ENDOFTEXT, END, SYSTEM, USER, ASSISTANT)

# Jinja, rendered by transformers' apply_chat_template; roles other than these three are an error.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def render_chat(messages: Iterable[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The same text as CHAT_TEMPLATE, in Python (used to build training examples)."""
    parts = [f"<|{m['role']}|>\n{m['content']}{END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{ASSISTANT}\n")
    return "".join(parts)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE (GPT-2 style pre-tokenization, no normalizer: exact round trip)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    add_bos(tok)
    return tok


def add_bos(tok: Tokenizer) -> None:
    """Encoding with special tokens (the default) prepends <|endoftext|>: in training every document
    follows one, so a raw prompt reads as the start of a file. Chat templates encode without."""
    eot = special_id(tok, ENDOFTEXT)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{ENDOFTEXT} $A", pair=f"{ENDOFTEXT} $A {ENDOFTEXT} $B", special_tokens=[(ENDOFTEXT, eot)]
    )


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tok: Tokenizer, directory: Path, model_max_length: int = 1_000_000) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = tokenizer_config(model_max_length)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer(directory: Path) -> Tokenizer:
    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def special_id(tok: Tokenizer, token: str) -> int:
    idx = tok.token_to_id(token)
    if idx is None:
        raise KeyError(f"tokenizer has no special token {token!r}")
    return int(idx)
