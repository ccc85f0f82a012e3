"""Token streams for training and fixed windows for evaluation.

Training reads random windows of one long token stream, `<|endoftext|> doc <|endoftext|> doc ...`,
where the documents are, in a seeded shuffle: every library file `library_repeats` times, every chat
example once and every test-suite file once. Evaluation scores each document on its own, cut into
non-overlapping windows of `seq_len` tokens that each start from a zero state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor

from server.train.chat_examples import ChatExample
from server.train.corpus import Corpus, Document
from server.train.tokenizer import ENDOFTEXT, special_id


@dataclass(frozen=True)
class StreamStats:
    library_tokens: int
    chat_tokens: int
    test_tokens: int

    @property
    def total(self) -> int:
        return self.library_tokens + self.chat_tokens + self.test_tokens


def _encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]  # no bos: added here


def build_train_stream(
    tok: Tokenizer, corpus: Corpus, examples: list[ChatExample], seed: int, library_repeats: int = 1
) -> tuple[Tensor, StreamStats]:
    """Returns (stream (N,) int64, token counts by source; repeats counted once each)."""
    eot = special_id(tok, ENDOFTEXT)
    library = _encode(tok, [d.text for d in corpus.train])
    chat = _encode(tok, [ex.render() for ex in examples])
    tests = _encode(tok, [d.text for d in corpus.tests])
    docs = library * library_repeats + chat + tests
    random.Random(seed).shuffle(docs)
    flat: list[int] = []
    for ids in docs:
        flat.append(eot)
        flat.extend(ids)
    flat.append(eot)
    stats = StreamStats(sum(map(len, library)) * library_repeats, sum(map(len, chat)), sum(map(len, tests)))
    return torch.tensor(flat, dtype=torch.long), stats


class BatchSampler:
    """Random windows of the stream: inputs (b, l) and next-token targets (b, l)."""

    def __init__(
        self, stream: Tensor, seq_len: int, batch_size: int, seed: int, device: torch.device
    ) -> None:
        if stream.numel() < seq_len + 2:
            raise ValueError(f"stream of {stream.numel()} tokens is shorter than one window of {seq_len + 1}")
        self.stream = stream.to(device)  # (N,)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.span = torch.arange(seq_len + 1, device=device)  # (l+1,)

    def next(self) -> tuple[Tensor, Tensor]:
        high = self.stream.numel() - self.seq_len - 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self.gen).to(self.stream.device)
        windows = self.stream[starts.unsqueeze(1) + self.span]  # (b, l+1)
        return windows[:, :-1], windows[:, 1:]


@dataclass(frozen=True)
class EvalSet:
    """Windows that cover every token of the documents exactly once as a target."""

    inputs: Tensor  # (w, l) int64
    targets: Tensor  # (w, l) int64, -100 where padded
    n_bytes: int  # UTF-8 bytes of the documents
    n_tokens: int  # scored tokens


def _windows(ids: list[int], eot: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """[eot] + ids scored on ids: windows of seq_len inputs, the last one right-padded."""
    seq = [eot, *ids]
    out = []
    for start in range(0, len(ids), seq_len):
        inp = seq[start : start + seq_len]
        tgt = seq[start + 1 : start + seq_len + 1]
        pad = seq_len - len(tgt)
        out.append((inp + [eot] * (seq_len - len(inp)), tgt + [-100] * pad))
    return out


def build_eval_set(tok: Tokenizer, texts: list[str], seq_len: int) -> EvalSet:
    eot = special_id(tok, ENDOFTEXT)
    pairs = [w for ids in _encode(tok, texts) for w in _windows(ids, eot, seq_len)]
    if not pairs:
        raise ValueError("nothing to evaluate: the texts are empty")
    inputs = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    targets = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return EvalSet(inputs, targets, n_bytes, int((targets != -100).sum()))


def doc_texts(docs: tuple[Document, ...]) -> list[str]:
    return [d.text for d in docs]
