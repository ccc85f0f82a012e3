"""Host time of one SSE text chunk, side by side in one process: the pydantic round trip per chunk (the
old path, kept here as `_legacy_*`) against the per-response templates (`server.api.streaming`).

    python bench/sse_format.py [--chunks 100000] [--rounds 5]

Formats `--chunks` content chunks per variant and chunk kind, split into rounds that alternate the
variants so that drift hits both; first checks that both give the same bytes. Prints a markdown table
of the median per-chunk time of each and their ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.api.responses import (  # noqa: E402
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
)
from server.api.streaming import StreamSpec, chat_text_chunks, completion_text_chunks  # noqa: E402

TEXTS = (" the", " model", ",", " wörld", "\n", " 日本", " said", ' "', "🙂", " of", "\\", " a")
Format = Callable[[int, str], bytes]


def _legacy_sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _legacy_chat_chunk(spec: StreamSpec, index: int, text: str) -> bytes:
    choice = ChatChunkChoice(index=index, delta=ChatDelta(content=text))
    chunk = ChatCompletionChunk(id=spec.response_id, created=spec.created, model=spec.model, choices=[choice])
    data = chunk.model_dump(mode="json")
    for choice_data in data["choices"]:
        choice_data["delta"] = {k: v for k, v in choice_data["delta"].items() if v is not None}
    if not spec.include_usage:
        data.pop("usage")
    return _legacy_sse(data)


def _legacy_completion_chunk(spec: StreamSpec, index: int, text: str) -> bytes:
    choice = CompletionChoice(index=index, text=text)
    chunk = Completion(id=spec.response_id, created=spec.created, model=spec.model, choices=[choice])
    data = chunk.model_dump(mode="json", exclude={"session_id"})
    if not spec.include_usage:
        data.pop("usage")
    return _legacy_sse(data)


def _spec(prefix: str, include_usage: bool) -> StreamSpec:
    return StreamSpec(prefix + "7f3a9c2e51b04d6a", 1700000000, "mamba2-130m", 1, include_usage, False, str)


def _kinds() -> dict[str, tuple[Format, Format]]:
    chat, chat_usage, cmpl = _spec("chatcmpl-", False), _spec("chatcmpl-", True), _spec("cmpl-", False)
    return {
        "chat content delta": (lambda i, t: _legacy_chat_chunk(chat, i, t), chat_text_chunks(chat)),
        "chat content delta, include_usage": (
            lambda i, t: _legacy_chat_chunk(chat_usage, i, t),
            chat_text_chunks(chat_usage),
        ),
        "completions text": (lambda i, t: _legacy_completion_chunk(cmpl, i, t), completion_text_chunks(cmpl)),
    }


def per_chunk(fmt: Format, n: int) -> float:
    texts = itertools.islice(itertools.cycle(TEXTS), n)
    t0 = time.perf_counter()
    for text in texts:
        fmt(0, text)
    return (time.perf_counter() - t0) / n


def _check(legacy: Format, new: Format) -> None:
    for index, text in itertools.product((0, 3), TEXTS):
        if legacy(index, text) != new(index, text):
            raise SystemExit(f"the two paths differ for choice {index}, text {text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=100_000, help="chunks per variant and kind")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    per_round = max(1, args.chunks // args.rounds)
    print("| chunk | pydantic per chunk (µs) | templates (µs) | speed-up |")
    print("|---|---|---|---|")
    for name, (legacy, new) in _kinds().items():
        _check(legacy, new)
        times: dict[Format, list[float]] = {legacy: [], new: []}
        for fmt in (legacy, new):
            per_chunk(fmt, 1000)  # warm-up
        for _ in range(args.rounds):
            for fmt in (legacy, new):
                times[fmt].append(per_chunk(fmt, per_round))
        old_us, new_us = (statistics.median(times[f]) * 1e6 for f in (legacy, new))
        print(f"| {name} | {old_us:.2f} | {new_us:.3f} | {old_us / new_us:.1f}x |")


if __name__ == "__main__":
    main()
