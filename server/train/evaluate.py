"""Held-out loss in bits per byte: total negative log-likelihood in bits over the text's UTF-8 bytes.

Bits per byte does not depend on the tokenizer, so models with different vocabularies compare:
    bpb = sum over scored tokens of -ln p(token | context) / (ln 2 * n_bytes)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from server.train.data import EvalSet, build_eval_set


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    if n_bytes <= 0:
        raise ValueError("bits per byte needs a positive byte count")
    return total_nll_nats / (math.log(2) * n_bytes)


@torch.no_grad()
def total_nll(model: nn.Module, evals: EvalSet, batch_size: int, device: torch.device) -> float:
    """Sum of -ln p(target) in nats over every scored target, in fp32."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, evals.inputs.shape[0], batch_size):
        inputs = evals.inputs[start : start + batch_size].to(device)  # (b, l)
        targets = evals.targets[start : start + batch_size].to(device)  # (b, l)
        logits: Tensor = model(inputs).float()  # (b, l, v)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        total += loss.double()
    model.train(was_training)
    return float(total)


def evaluate_bpb(model: nn.Module, evals: EvalSet, device: torch.device, batch_size: int = 16) -> float:
    return bits_per_byte(total_nll(model, evals, batch_size, device), evals.n_bytes)


def text_bpb(
    model: nn.Module, tok: Tokenizer, texts: list[str], seq_len: int, device: torch.device | str = "cpu"
) -> float:
    """Bits per byte of `texts`, each scored from a zero state in windows of `seq_len` tokens."""
    return evaluate_bpb(model, build_eval_set(tok, texts, seq_len), torch.device(device))


def file_bpb(model: nn.Module, tok: Tokenizer, path: Path, seq_len: int) -> float:
    return text_bpb(model, tok, [path.read_text(encoding="utf-8")], seq_len)
