"""Long prompts tokenized on several cores on this CPU: one whole-text encode vs pieces.

For user texts of 8k, 32k and 131k tokens (random English words, `bench._common.Texts`), under the
demo model's tokenizer:
- encode: `Tokenizer.encode_offsets`, whole (one `hf(text, return_offsets_mapping=True)`, the path before
  pieces) and in pieces (`ParallelEncoder.encode`: cut before spaces, the backend's `encode_batch` over
  the pieces on rayon's threads, ids and shifted offsets joined);
- first turn: `ChatEncoder.encode` of a conversation holding the text as its one user message, no
  previous turn (the `tokenize` phase of a long first request), with and without pieces.

Whole and pieces give the same ids and offsets; the script checks that. They are timed in alternation,
medians of `--repeats`. A second table times the 131k text with other piece sizes, and a third one the
encode with `TOKENIZERS_PARALLELISM=false` (pieces one after the other: what is not parallelism). The
script prints markdown tables and writes nothing.

    .venv/bin/python bench/parallel_encode_cpu.py [--model DIR] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import Texts  # noqa: E402
from bench.ttft_cpu import cpu_name  # noqa: E402
from server.model.chat_encoding import ChatEncoder  # noqa: E402
from server.model.parallel_encode import MAX_PIECES, MIN_CHARS, PIECE_CHARS, ParallelEncoder  # noqa: E402
from server.model.tokenizer import Tokenizer  # noqa: E402
from server.settings import default_model_path  # noqa: E402

SIZES = (8_192, 32_768, 131_072)  # tokens
PIECE_SIZES = (2_048, 4_096, 8_192, 16_384, 32_768, 65_536)  # characters, for the 131k text
PARALLELISM = "TOKENIZERS_PARALLELISM"


@dataclass(frozen=True)
class Row:
    tokens: int
    chars: int
    pieces: int
    whole_ms: float
    pieces_ms: float
    turn_whole_ms: float
    turn_pieces_ms: float


def medians_ms(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function, the functions run in turn `repeats` times."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def encoder(tok: Tokenizer, piece_chars: int = PIECE_CHARS, max_pieces: int = MAX_PIECES) -> ParallelEncoder:
    enc = ParallelEncoder.of(tok.hf, piece_chars=piece_chars, max_pieces=max_pieces)
    if enc is None:
        raise SystemExit(f"{tok.model_name}: no cut is proven exact for this tokenizer")
    return enc


def measure(tok: Tokenizer, whole: Tokenizer, text: str, tokens: int, repeats: int) -> Row:
    pieces = encoder(tok)
    expected = whole.encode_offsets(text)
    if pieces.encode(text) != expected or tok.encode_offsets(text) != expected:
        raise AssertionError("the pieces' encoding differs from the whole one")
    msgs = [{"role": "user", "content": text}]
    turn_whole, turn_pieces = ChatEncoder(whole), ChatEncoder(tok)  # no key: nothing kept between turns
    fns: list[Callable[[], object]] = [
        partial(whole.encode_offsets, text),
        partial(pieces.encode, text),
        partial(turn_whole.encode, msgs),
        partial(turn_pieces.encode, msgs),
    ]
    times = medians_ms(fns, repeats)
    return Row(tokens, len(text), len(pieces.cuts(text)) + 1, *times)


def piece_sizes(tok: Tokenizer, text: str, repeats: int) -> list[tuple[int, int, float]]:
    """(piece characters, pieces, ms) of the text cut into pieces of each size (no cap on their number)."""
    encoders = [encoder(tok, size, max_pieces=1 << 20) for size in PIECE_SIZES]
    times = medians_ms([partial(e.encode, text) for e in encoders], repeats)
    return [(s, len(e.cuts(text)) + 1, t) for s, e, t in zip(PIECE_SIZES, encoders, times, strict=True)]


def one_core(tok: Tokenizer, whole: Tokenizer, texts: list[str], repeats: int) -> list[tuple[float, float]]:
    """(whole ms, pieces ms) per text with the backend's parallelism off: the pieces one after the other."""
    pieces = encoder(tok)
    before = os.environ.get(PARALLELISM)
    os.environ[PARALLELISM] = "false"  # read by the backend at each call
    try:
        out = [
            medians_ms([partial(whole.encode_offsets, t), partial(pieces.encode, t)], repeats) for t in texts
        ]
    finally:
        if before is None:
            del os.environ[PARALLELISM]
        else:
            os.environ[PARALLELISM] = before
    return [(a, b) for a, b in out]


def table(
    model: Path,
    rows: list[Row],
    sizes: list[tuple[int, int, float]],
    serial: list[tuple[float, float]],
    repeats: int,
) -> str:
    lines = [
        "### Long texts tokenized whole vs in pieces on several cores",
        "",
        f"CPU: {cpu_name()}, {os.cpu_count()} cores; tokenizer: `{model.name}`; median of {repeats}; "
        f"`bench/parallel_encode_cpu.py`. Pieces of about {PIECE_CHARS:,} characters (at most "
        f"{MAX_PIECES}); texts under {MIN_CHARS:,} characters are encoded whole.",
        "",
        "| tokens | characters | pieces | encode whole (ms) | encode in pieces (ms) | speed-up "
        "| first turn whole (ms) | first turn in pieces (ms) | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tokens:,} | {r.chars:,} | {r.pieces} | {r.whole_ms:.1f} | {r.pieces_ms:.1f} "
            f"| {r.whole_ms / r.pieces_ms:.2f}x | {r.turn_whole_ms:.1f} | {r.turn_pieces_ms:.1f} "
            f"| {r.turn_whole_ms / r.turn_pieces_ms:.2f}x |"
        )
    lines += ["", f"`{PARALLELISM}=false` (the pieces one after the other):", ""]
    lines += ["| tokens | encode whole (ms) | encode in pieces (ms) | speed-up |", "|---:|---:|---:|---:|"]
    lines += [
        f"| {r.tokens:,} | {a:.1f} | {b:.1f} | {a / b:.2f}x |" for r, (a, b) in zip(rows, serial, strict=True)
    ]
    lines += ["", "| piece size (characters), 131k tokens | pieces | encode (ms) |", "|---:|---:|---:|"]
    lines += [f"| {s:,} | {n} | {ms:.1f} |" for s, n, ms in sizes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path(default_model_path()), help="model directory")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    tok = Tokenizer.from_pretrained(args.model)
    whole = Tokenizer(tok.hf, tok.model_name, tok.chat_template)
    whole.parallel = None
    sample = Texts(args.model)
    texts = [sample.text(n, random.Random(n)) for n in SIZES]
    rows = [measure(tok, whole, t, n, args.repeats) for t, n in zip(texts, SIZES, strict=True)]
    sizes = piece_sizes(tok, texts[-1], args.repeats)
    serial = one_core(tok, whole, texts, args.repeats)
    print(table(args.model, rows, sizes, serial, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
