"""Bits per byte: the formula, and the evaluation windows on a model whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from server.train.data import build_eval_set
from server.train.evaluate import bits_per_byte, evaluate_bpb
from server.train.tokenizer import train_tokenizer

_TEXTS = ["def add(a, b):\n    return a + b\n" * 5, "x = [i * i for i in range(10)]\n", "π ≈ 3.14159\n"]


class _Uniform(nn.Module):
    """Every next token equally likely: -ln p = ln V for every target."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: Tensor) -> Tensor:
        return torch.zeros(*input_ids.shape, self.vocab) + self.dummy  # (b, l, v)


class _Oracle(nn.Module):
    """Puts probability p on the true next token of the one sequence it was built for."""

    def __init__(self, vocab: int, targets: Tensor, p: float) -> None:
        super().__init__()
        self.vocab, self.targets, self.p = vocab, targets, p

    def forward(self, input_ids: Tensor) -> Tensor:
        rest = (1 - self.p) / (self.vocab - 1)
        probs = torch.full((*input_ids.shape, self.vocab), rest)
        t = self.targets[: input_ids.shape[0]].clamp(min=0)
        probs.scatter_(-1, t.unsqueeze(-1), self.p)
        return probs.log()


def test_bits_per_byte_formula() -> None:
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


@pytest.mark.parametrize("seq_len", [4, 7, 64])
def test_uniform_model_scores_log2_vocab_bits_per_token(seq_len: int) -> None:
    tok = train_tokenizer(_TEXTS * 4, vocab_size=300, min_frequency=1)
    evals = build_eval_set(tok, _TEXTS, seq_len)
    n_tokens = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in _TEXTS)
    n_bytes = sum(len(t.encode("utf-8")) for t in _TEXTS)
    assert evals.n_tokens == n_tokens and evals.n_bytes == n_bytes
    got = evaluate_bpb(_Uniform(311), evals, torch.device("cpu"), batch_size=3)
    assert got == pytest.approx(n_tokens * math.log2(311) / n_bytes, rel=1e-6)


def test_confident_model_scores_its_known_loss() -> None:
    tok = train_tokenizer(_TEXTS * 4, vocab_size=300, min_frequency=1)
    evals = build_eval_set(tok, _TEXTS[:1], seq_len=1000)  # one window
    model = _Oracle(300, evals.targets, p=0.5)
    got = evaluate_bpb(model, evals, torch.device("cpu"))
    assert got == pytest.approx(evals.n_tokens * 1.0 / evals.n_bytes, rel=1e-5)  # 1 bit per token
