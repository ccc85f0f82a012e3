"""The two tasks of `bench/eval_cache.py`, built from the held-out standard-library files (no download).

The files are the held-out split of `server.train.corpus`, the split the demo model's held-out bits per
byte were measured on (a deterministic hash of each path, so the same paths on every machine; the split
fractions are read from the model's `train_report.json` when it has one).

Each file is tokenized once, as training saw it: `<|endoftext|>` then the text. A *question* sits at the
start of a line: its context is the file's tokens up to the line's first content token (the indentation
token is part of the context), and its answer is that token. The choices are the true token and three
distractors: the first tokens of other lines of the same file that have the same indentation (so every
choice is a plausible statement start in that place: `return` / `if` / `self` / `for` ...), all distinct.
That is "which of these four lines comes next", decided where the lines first differ. Questions of a file
are kept in file order at least `min_gap` tokens apart, so each question's context extends the previous
one's: sent in order in one session, every question but a file's first resumes from the previous one's
checkpoint and prefills only the lines between. A chosen subset of questions also gets a free-running
continuation (the next-line task: greedy tokens from the same context).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from server.train.corpus import Document, load_corpus
from server.train.tokenizer import ENDOFTEXT, special_id

CHOICES = 4


@dataclass(frozen=True)
class Question:
    path: str  # the file, relative to the stdlib root
    line: int  # 0-based line number of the answer's line
    context: tuple[int, ...]  # token ids: <|endoftext|> and the file up to the line's first content token
    choices: tuple[int, ...]  # CHOICES distinct token ids, shuffled
    answer: int  # index into choices of the true next token
    next_line: str  # the rest of the true line, from its first content token (for exact match)
    continuation: bool = False  # also ask for a free-running greedy continuation here


@dataclass(frozen=True)
class _LineStart:
    line: int
    index: int  # token index of the line's first content token
    token: int
    kind: tuple[int, bool]  # (indentation, whether the content token carries the last indent space)
    text: str


def heldout_documents(model_dir: Path) -> tuple[Document, ...]:
    """The held-out files, with the split fractions the model was trained with (defaults otherwise)."""
    fractions = {"heldout_fraction": 0.05, "valid_fraction": 0.03}
    report = model_dir / "train_report.json"
    if report.is_file():
        config = json.loads(report.read_text()).get("config", {})
        fractions |= {k: config[k] for k in fractions if k in config}
    corpus = load_corpus(fractions["heldout_fraction"], fractions["valid_fraction"], with_tests=False)
    return corpus.heldout


def _line_starts(tok: Tokenizer, text: str, eot: int, max_context: int) -> tuple[list[int], list[_LineStart]]:
    enc = tok.encode(text, add_special_tokens=False)
    ids = [eot, *enc.ids]
    starts, token_at, out = [0], {}, []
    for i, (lo, hi) in enumerate(enc.offsets):
        for c in range(lo, hi):
            token_at[c] = i + 1  # +1: the leading <|endoftext|>
    lines = text.split("\n")
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    for n, (start, line) in enumerate(zip(starts, lines, strict=True)):
        body = line.lstrip(" ")
        indent = len(line) - len(body)
        if not body.strip() or body[0] == "\t" or start + indent not in token_at:
            continue
        j = token_at[start + indent]
        lo = enc.offsets[j - 1][0]
        if lo < start or j >= max_context:  # the token swallows the newline, or the context is too long
            continue
        out.append(_LineStart(n, j, ids[j], (indent, lo < start + indent), text[lo : start + len(line)]))
    return ids, out


def _file_questions(
    tok: Tokenizer, doc: Document, eot: int, max_context: int, min_gap: int, rng: random.Random
) -> list[Question]:
    ids, starts = _line_starts(tok, doc.text, eot, max_context)
    pools: dict[tuple[int, bool], set[int]] = {}
    for s in starts:
        pools.setdefault(s.kind, set()).add(s.token)
    questions, last = [], 0
    for s in starts:
        others = sorted(pools[s.kind] - {s.token})
        if len(others) < CHOICES - 1 or s.index - last < min_gap:
            continue
        choices = [s.token, *rng.sample(others, CHOICES - 1)]
        rng.shuffle(choices)
        context = tuple(ids[: s.index])
        questions.append(Question(doc.path, s.line, context, tuple(choices), choices.index(s.token), s.text))
        last = s.index
    return questions


def build_questions(
    tok: Tokenizer,
    docs: Sequence[Document],
    n_questions: int,
    n_continuations: int,
    max_context: int = 2048,
    min_gap: int = 32,
    seed: int = 0,
) -> list[Question]:
    """Up to n_questions questions (a seeded sample of every eligible line start), in file order, with
    n_continuations of them (evenly spread) marked for a continuation."""
    eot = special_id(tok, ENDOFTEXT)
    rng = random.Random(seed)
    pool = [q for d in docs for q in _file_questions(tok, d, eot, max_context, min_gap, rng)]
    keep = sorted(rng.sample(range(len(pool)), min(n_questions, len(pool))))
    chosen = [pool[i] for i in keep]
    step = max(1, len(chosen) // max(1, n_continuations))
    marked = set(range(0, len(chosen), step)[:n_continuations])
    return [Question(**{**q.__dict__, "continuation": i in marked}) for i, q in enumerate(chosen)]
