"""The cache's bookkeeping for one follow-up against the conversation's length, on this CPU (no model).

A session of `--turns` turns is captured the way the server captures a chat: per turn, a checkpoint a few
tokens before the turn's end (the user message's boundary) and one at its end. The conversation then has
`--lengths` tokens, and its path in the prefix tree holds 2 x turns checkpoints. Timed, as medians of
`--repeats`: `lookup` (a hit at the end, leased and released) of a follow-up, 20 tokens longer, whose ids
are the stored tuple's own int objects (what the chat encoder hands on) or equal ints of their own; and
`capture_many` of one checkpoint at the follow-up's end (a tiny state, so that the walk, not the codec,
shows). The O(conversation) part is what grows along a row.

    .venv/bin/python bench/cache_path_cpu.py [--lengths 8000,32000,131000] [--turns 100] [--repeats 31]
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import emit, markdown  # noqa: E402
from bench.ttft_cpu import cpu_name  # noqa: E402
from cache import CacheConfig, Capture, StateCache  # noqa: E402

SPEC = {"conv": ((2, 64, 3), torch.float32), "ssm": ((2, 8, 16, 16), torch.float32)}
NEW = 20  # a follow-up's new tokens


@dataclass(frozen=True)
class Row:
    tokens: int
    checkpoints: int
    lookup_shared_ms: float
    lookup_own_ms: float
    capture_ms: float


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(length: int, turns: int, repeats: int) -> Row:
    cache = StateCache(CacheConfig(hot_bytes=1 << 28, cold_bytes=1 << 28), SPEC)
    state = {name: torch.randn(1, *shape) for name, (shape, _) in SPEC.items()}
    rng = random.Random(length)
    ids: tuple[int, ...] = ()
    for _ in range(turns):
        ids += tuple(rng.randrange(50_000) for _t in range(length // turns))
        for end in (len(ids) - 5, len(ids)):
            cache.capture_many([Capture("anon", "s", ids[:end], "boundary")], state)
    follow = ids + tuple(rng.randrange(50_000) for _ in range(NEW))
    own = tuple(int(str(t)) for t in follow)  # equal ids, other int objects

    def lookup(tokens: tuple[int, ...]) -> None:
        lease = cache.lookup("anon", "s", tokens)
        assert lease is not None and lease.position == len(ids)
        cache.release(lease)

    ends = iter(range(10**9))

    def capture() -> None:  # each at a new end: admitted, not shared
        assert cache.capture_many([Capture("anon", "s", (*follow, next(ends)), "prompt")], state) == [True]

    checkpoints = 2 * turns
    return Row(
        len(ids), checkpoints, _median_ms(lambda: lookup(follow), repeats), _median_ms(lambda: lookup(own), repeats),
        _median_ms(capture, repeats),
    )  # fmt: skip


def table(rows: list[Row], turns: int, repeats: int) -> str:
    header = ["conversation tokens", "checkpoints on the path", "lookup ms (shared ids)", "lookup ms (own ids)",
              "capture_many ms"]  # fmt: skip
    cells = [
        [f"{r.tokens:,}", str(r.checkpoints), f"{r.lookup_shared_ms:.3f}", f"{r.lookup_own_ms:.3f}",
         f"{r.capture_ms:.3f}"]
        for r in rows
    ]  # fmt: skip
    title = f"#### The cache's bookkeeping per follow-up ({cpu_name()}, {turns} turns, median of {repeats})"
    return f"{title}\n\n{markdown(header, cells)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="8000,32000,131000")
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--out", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args(argv)
    rows = [measure(int(n), args.turns, args.repeats) for n in args.lengths.split(",")]
    emit(table(rows, args.turns, args.repeats), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
