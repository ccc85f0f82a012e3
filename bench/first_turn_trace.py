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
import itertools
import json
import random
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from bench._common import emit, markdown
from bench.followup_trace import add_engine_args, engine_settings, turn
from server.engine.engine import Engine
from server.engine.factory import build_engine
from server.engine.profiling import WorkerProfiler
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
                    if torch.cuda.is_available():
                        with tempfile.TemporaryDirectory() as tmp:
                            prof.export_chrome_trace(f"{tmp}/trace.json")
                            print(timeline(json.loads(Path(f"{tmp}/trace.json").read_text())), flush=True)
    return ttfts


def timeline(trace: dict[str, Any], gaps: int = 8) -> str:
    """Where the GPU time went in time, from a Chrome trace: per stream, its ops' busy time and span; the
    busiest stream's idle gaps (the largest, and their sum); the host's CUDA runtime calls by total time
    (a long `cudaStreamSynchronize` or `cudaMemcpyAsync` to pageable memory is the host waiting)."""
    gpu = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return "(no GPU events)"
    streams: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for e in gpu:
        streams[int(e["args"].get("stream", -1))].append((float(e["ts"]), float(e["dur"]), e["name"]))
    lines = ["stream | ops | busy ms | span ms (first start to last end) | top op by time"]
    for sid, ops in sorted(streams.items(), key=lambda kv: -sum(d for _, d, _ in kv[1])):
        start, end = min(t for t, _, _ in ops), max(t + d for t, d, _ in ops)
        by: dict[str, float] = defaultdict(float)
        for _, d, name in ops:
            by[name[:60]] += d
        top = max(by.items(), key=lambda kv: kv[1])
        lines.append(f"{sid} | {len(ops)} | {sum(d for _, d, _ in ops) / 1e3:.2f} | {(end - start) / 1e3:.2f} | "
                     f"{top[0]} ({top[1] / 1e3:.2f} ms)")  # fmt: skip
    main = sorted(max(streams.values(), key=lambda ops: sum(d for _, d, _ in ops)))
    holes = [(t - (pt + pd), pt + pd, pn, n) for (pt, pd, pn), (t, _, n) in itertools.pairwise(main)]
    origin = main[0][0]
    lines.append(
        f"busiest stream: idle gaps over 20 us sum to {sum(h for h, *_ in holes if h > 20) / 1e3:.2f} ms"
    )
    for h, at, before, after in sorted(holes, reverse=True)[:gaps]:
        lines.append(
            f"  gap {h / 1e3:.2f} ms at +{(at - origin) / 1e3:.1f} ms, after {before[:50]}, before {after[:50]}"
        )
    runtime: dict[str, list[float]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            runtime[e["name"]].append(float(e.get("dur", 0.0)))
    lines.append("host CUDA calls by total ms (calls):")
    for name, durs in sorted(runtime.items(), key=lambda kv: -sum(kv[1]))[:gaps]:
        lines.append(f"  {name}: {sum(durs) / 1e3:.2f} ({len(durs)}; longest {max(durs) / 1e3:.2f})")
    return "\n".join(lines)


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
    add_engine_args(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tail", type=int, default=3, help="tokens after the message's end")
    parser.add_argument("--rows", type=int, default=25, help="ops in each profiler table")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = engine_settings(args, Path(tmp))
        rows = asyncio.run(run(settings, args.length, args.repeats, args.tail, args.rows))
    header = ["prompt tokens", "cache TTFT p50 ms", "no-cache TTFT p50 ms", "cache / no-cache",
              "each, cache (ms)", "each, no-cache (ms)"]  # fmt: skip
    emit(markdown(header, rows), args.out)


if __name__ == "__main__":
    main()
