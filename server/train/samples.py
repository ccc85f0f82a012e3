"""Sample completions for the model card, generated through the server's ModelRunner."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from server.model.lm import MambaLM
from server.model.runner import ModelRunner
from server.train.tokenizer import END, ENDOFTEXT, render_chat, special_id

COMPLETION_PROMPTS = (
    "def fibonacci(n):",
    "import os\n\n\ndef list_python_files(directory):\n",
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n',
)
CHAT_PROMPTS = (
    "Write a Python function with this signature and docstring:\n\n"
    'def is_palindrome(s):\n    """Return True if s reads the same forwards and backwards."""',
)


SAMPLE_TEMPERATURE, SAMPLE_SEED = 0.8, 0


@dataclass(frozen=True)
class Sample:
    kind: str  # "completion" | "chat"
    prompt: str
    output: str
    settings: str = "greedy"


def generate(
    model: MambaLM,
    tok: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    bos: bool = True,
) -> str:
    """Greedy (temperature 0) or sampled continuation; stops at <|end|> or <|endoftext|>.
    `bos`: prepend <|endoftext|> as plain encoding does (the server's chat path does not)."""
    runner = ModelRunner(model, max_slots=1)
    stops = {special_id(tok, END), special_id(tok, ENDOFTEXT)}
    gen = torch.Generator().manual_seed(seed)
    ids = tok.encode(prompt, add_special_tokens=bos).ids
    logits = runner.prefill(ids, slot=0).last_logits  # (v,)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = _pick(logits.float().cpu(), temperature, gen)
        if nxt in stops:
            break
        out.append(nxt)
        logits = runner.decode([nxt], [0])[0]
    return tok.decode(out)


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def card_samples(model: MambaLM, tok: Tokenizer, max_new_tokens: int = 96) -> list[Sample]:
    """Each prompt greedy and sampled; completions as plain encoding (with bos) and chat as the
    server sends it (template, no bos)."""
    t, seed = SAMPLE_TEMPERATURE, SAMPLE_SEED
    sampled = f"temperature {t}, seed {seed}"
    samples = []
    for p in COMPLETION_PROMPTS:
        samples.append(Sample("completion", p, generate(model, tok, p, max_new_tokens)))
        samples.append(Sample("completion", p, generate(model, tok, p, max_new_tokens, t, seed), sampled))
    for p in CHAT_PROMPTS:
        text = render_chat([{"role": "user", "content": p}], add_generation_prompt=True)
        samples.append(Sample("chat", p, generate(model, tok, text, max_new_tokens, bos=False)))
        out = generate(model, tok, text, max_new_tokens, t, seed, bos=False)
        samples.append(Sample("chat", p, out, sampled))
    return samples
