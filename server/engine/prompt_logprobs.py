"""Prompt logprobs: each prompt token's log-probability given the tokens before it (lm-eval's loglikelihood,
OpenAI's legacy `echo` + `logprobs`, vLLM's `prompt_logprobs`).

They need the logits at every prompt position, so a request that asks for them is prefilled from the start
(never from a restored checkpoint, which has no logits for the positions it covers) and its chunks run with
`all_logits=True`: a vocabulary-wide row per prompt token (l x v fp32) is materialised for each chunk, on
top of what a prefill costs. The logprobs are those of the model's raw distribution (log-softmax of the
logits), like the sampled tokens' logprobs.

Shapes: l positions of one prefill chunk, v vocabulary entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from server.engine.types import PromptLogprob, TopLogprob


def chunk_logprobs(logits: Tensor, targets: Sequence[int], k: int) -> list[PromptLogprob]:
    """logits (l, v): row j predicts `targets[j]` (the prompt token after position j); len(targets) <= l.
    Returns one entry per target: its logprob, its rank and the `k` best alternatives."""
    n = len(targets)
    if n == 0:
        return []
    logp = torch.log_softmax(logits[:n].float(), dim=-1)  # (n, v)
    ids = torch.as_tensor(list(targets), dtype=torch.long, device=logp.device)  # (n,)
    chosen = logp.gather(1, ids[:, None])  # (n, 1)
    ranks = (logp > chosen).sum(-1) + 1  # (n,)
    top_vals, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], ids[:, None][:, :0])
    host = [t.tolist() for t in (chosen[:, 0], ranks, top_vals, top_ids)]  # one transfer per tensor
    return [
        PromptLogprob(tok, lp, rank, tuple(TopLogprob(int(i), float(v)) for i, v in zip(ti, tv, strict=True)))
        for tok, lp, rank, tv, ti in zip(targets, *host, strict=True)
    ]
