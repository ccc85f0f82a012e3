"""Per-turn chat encoding on this CPU: `ChatEncoder` (reuses the previous turn) vs full `encode_chat`.

A conversation of N messages (system, user, assistant, ..., user) is grown turn by turn. The
timed turn is the last one: the request of all N messages, sent after the request of the first
N - 2 messages, as a chat client sends a follow-up. Full is `Tokenizer.encode_chat`. It renders
every message prefix and tokenizes everything. Incremental is `ChatEncoder.encode` with the
previous turn cached. Both give the same tokens and boundaries, and the script checks that. The
render column is one jinja rendering of the whole conversation, a cost both pay. Medians of
`--repeats`. The script prints a markdown table and writes nothing.

    .venv/bin/python bench/chat_encode_cpu.py [--model DIR] [--repeats 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ttft_cpu import cpu_name  # noqa: E402
from server.model.chat_encoding import ChatEncoder, ChatEncoding  # noqa: E402
from server.model.tokenizer import Tokenizer  # noqa: E402
from server.settings import default_model_path  # noqa: E402

_PROSE = (
    "the state of a mamba model has constant size so a long chat costs nothing to keep but every "
    "follow up turn resends the whole conversation and the server must not redo all of it def return "
    "import self value list dict 42 3.14 None True"
)
WORDS = _PROSE.split(" ")
SIZES = ((13, 2_000), (100, 15_000), (200, 30_000))  # (messages, target tokens)


@dataclass(frozen=True)
class Row:
    messages: int
    tokens: int
    full_ms: float
    incremental_ms: float
    render_ms: float
    reused: int
    rendered: int


def conversation(tok: Tokenizer, n_messages: int, n_tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    """N messages whose rendering is about `n_tokens` tokens."""
    rng = random.Random(seed)
    words = max(1, n_tokens // n_messages)
    for _ in range(4):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}]
        for i in range(n_messages - 1):
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        got = len(tok.encode_chat(msgs[:3])[0]) * (n_messages - 1) / 2
        words = max(1, int(words * n_tokens / got))
    return msgs


def median_ms(fn: Callable[[], object], repeats: int, setup: Callable[[int], None] = lambda r: None) -> float:
    times = []
    for r in range(repeats):
        setup(r)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(tok: Tokenizer, n_messages: int, n_tokens: int, repeats: int) -> Row:
    msgs = conversation(tok, n_messages, n_tokens)
    enc = ChatEncoder(tok)
    tokens, boundaries = tok.encode_chat(msgs)
    full_ms = median_ms(lambda: tok.encode_chat(msgs), repeats)
    render_ms = median_ms(lambda: tok.render_chat(msgs), repeats)
    key = [0]

    def prime(r: int) -> None:  # the previous turn, cached under a fresh key
        key[0] = r
        enc.encode(msgs[:-2], r)

    outs: list[ChatEncoding] = []
    inc_ms = median_ms(lambda: outs.append(enc.encode(msgs, key[0])), repeats, prime)
    out = outs[-1]
    # tokens are always identical; a first turn of more than MAX_RENDERS messages (the prime here) finds a
    # subset of the message boundaries, each a true one
    if out.tokens != tuple(tokens) or not set(out.boundaries) <= set(boundaries):  # a tuple against a list
        raise AssertionError("incremental encoding differs from encode_chat")
    return Row(n_messages, len(tokens), full_ms, inc_ms, render_ms, out.reused_tokens, out.rendered_prefixes)


def table(model: Path, rows: list[Row], repeats: int, fallback: bool) -> str:
    template = " with the ChatML fallback template" if fallback else ""
    lines = [
        "### Per-turn chat encoding on CPU: incremental vs full",
        "",
        f"CPU: {cpu_name()}; tokenizer: `{model.name}`{template}; median of {repeats}; "
        "`bench/chat_encode_cpu.py`.",
        "",
        "| messages | prompt tokens | full encode_chat (ms) | incremental (ms) | speed-up "
        "| jinja render, whole conversation (ms) | tokens reused | prefixes rendered |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = r.full_ms / r.incremental_ms
        lines.append(
            f"| {r.messages} | {r.tokens} | {r.full_ms:.2f} | {r.incremental_ms:.2f} | {speedup:.1f}x "
            f"| {r.render_ms:.2f} | {r.reused} | {r.rendered} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path(default_model_path()), help="tokenizer directory")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--fallback-template", action="store_true", help="use the ChatML fallback template instead"
    )
    args = parser.parse_args(argv)
    tok = Tokenizer.from_pretrained(args.model)
    if args.fallback_template:
        tok = Tokenizer(tok.hf, tok.model_name)
    rows = [measure(tok, n, t, args.repeats) for n, t in SIZES]
    print(table(args.model, rows, args.repeats, args.fallback_template))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
