"""What the state cache costs a first turn (a miss), inside the engine: two real engines (`build_engine`, as
the server builds them) in this process, one with the cache and one with `--no-cache`, take turns at first
turns of `--length` fresh random tokens (a chat prompt's message end `--tail` tokens before its end), one
engine at a time. Prints each engine's time to first token (median of `--repeats`), their ratio, and a torch
profiler table of each one's last first turn (top ops by total time), so that the capture's own work (the
chunk states kept, their FP8 stores, the hot tier's moves to the cold one) shows beside the prefill's. No
HTTP: `e2e_bench`'s first-turn row is this plus the request's way in and out (the same on both servers).

    python -m bench.first_turn_trace [--shape demo|mamba2-2.7b|...] [--length 32768] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
from pathlib import Path

import torch

from bench._common import emit, markdown, write_random_model
from bench.followup_trace import turn
from server.engine.engine import Engine
from server.engine.factory import build_engine
from server.engine.profiling import WorkerProfiler
from server.model.defaults import bundled_model_dir
from server.settings import Settings


async def first_turns(
    engines: dict[str, Engine], length: int, repeats: int, tail: int, rows: int
) -> dict[str, list[float]]:
    """Per engine, the TTFT of each of its `repeats` first turns (fresh prompts, the engines in turn); the
    last of each is profiled and its table printed."""
    rng = random.Random(0)
    vocab = int(next(iter(engines.values())).tokenizer.vocab_size)
    ttfts: dict[str, list[float]] = {name: [] for name in engines}
    for i in range(repeats):
        for name, engine in engines.items():
            prompt = tuple(rng.randrange(3, vocab) for _ in range(length))
            last = i == repeats - 1
            profiler = WorkerProfiler(Path())
            if last:
                await engine.in_worker(profiler.start)
            ttft, _, cached = await turn(engine, f"{name}-{i}", prompt, (length - tail,), 1)
            assert cached == 0, f"a first turn resumed from a checkpoint ({cached} tokens)"
            ttfts[name].append(ttft)
            if last:
                prof = await engine.in_worker(profiler.stop)
                if prof is not None:
                    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
                    print(f"### {name}: the last first turn's ops\n", flush=True)
                    print(prof.key_averages().table(sort_by=sort, row_limit=rows), flush=True)
    return ttfts


async def run(settings: Settings, length: int, repeats: int, tail: int, rows: int) -> list[list[str]]:
    engines: dict[str, Engine] = {}
    try:
        for name, extra in (("cache", {}), ("no-cache", {"no_cache": True})):
            engines[name] = await asyncio.to_thread(build_engine, settings.model_copy(update=extra))
            engines[name].start()
        ttfts = await first_turns(engines, length, repeats, tail, rows)
    finally:
        for engine in engines.values():
            await engine.stop()
    on, off = (statistics.median(ttfts[n]) for n in ("cache", "no-cache"))
    each = lambda name: " / ".join(f"{1e3 * t:.1f}" for t in ttfts[name])
    return [[f"{length:,}", f"{1e3 * on:.1f}", f"{1e3 * off:.1f}", f"{on / off:.3f}x", each("cache"),
             each("no-cache")]]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", default="demo", help="demo (the bundled model) or a random shape of bench._common"
    )
    parser.add_argument("--length", type=int, default=32_768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tail", type=int, default=3, help="tokens after the message's end")
    parser.add_argument("--rows", type=int, default=25, help="ops in each profiler table")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--hot-bytes", default="4GiB")
    parser.add_argument("--cold-bytes", default="8GiB")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = (
            bundled_model_dir()
            if args.shape == "demo"
            else write_random_model(Path(tmp) / args.shape, args.shape)
        )
        settings = Settings(
            model=str(model), max_num_seqs=args.max_num_seqs, max_prompt_tokens=args.length + 4096,
            hot_bytes=args.hot_bytes, cold_bytes=args.cold_bytes,
        )  # fmt: skip
        rows = asyncio.run(run(settings, args.length, args.repeats, args.tail, args.rows))
    header = ["prompt tokens", "cache TTFT p50 ms", "no-cache TTFT p50 ms", "cache / no-cache",
              "each, cache (ms)", "each, no-cache (ms)"]  # fmt: skip
    emit(markdown(header, rows), args.out)


if __name__ == "__main__":
    main()
