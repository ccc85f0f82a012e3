"""Where a follow-up turn's time goes inside the engine: the real engine (`build_engine`: runner, cache,
worker, graphs captured as the server captures them) in this process, one first turn of `--length` prompt
tokens, then `--repeats` follow-ups of `--new` more tokens each resuming its checkpoint; the follow-ups'
time to first token, and a torch profiler trace of the last one (CPU and CUDA ops, top by total time; with
`--trace-dir`, the Chrome trace too). No HTTP: what it isolates is the engine's step, which
`e2e_bench`'s phase table shows as the `prefill` phase (~20 ms for ~96 new tokens of a 2.7b follow-up on an
H200 in session 8).

    python -m bench.followup_trace [--shape demo|mamba2-2.7b|...] [--length 32768] [--new 96] [--repeats 5]
        [--answer 16] [--tail 3] [--max-num-seqs 64]

The defaults mirror `e2e_bench`'s follow-up: 16-token answers, the new message's end a capture candidate 3
tokens before the prompt's end (where a chat template's generation prompt starts), the server's slot count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._common import emit, markdown, write_random_model
from bench.hybrid_model import SHAPES as HYBRID_SHAPES
from bench.hybrid_model import write_hybrid
from server.engine.engine import Engine
from server.engine.factory import build_engine
from server.engine.profiling import WorkerProfiler
from server.engine.types import GenerationRequest, SamplingParams
from server.model.defaults import bundled_model_dir
from server.settings import Settings

ANSWER = 16  # the first turn's answer, greedy


async def turn(
    engine: Engine, rid: str, prompt: tuple[int, ...], ends: tuple[int, ...], n: int
) -> tuple[float, list[int], int]:
    """(seconds to the first token, the tokens, prompt tokens served from a checkpoint) of one request in
    session `trace`."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    req = GenerationRequest(rid, prompt, params, session_id="trace", boundaries=ends)
    start, first, out, cached = time.perf_counter(), float("nan"), [], 0
    async for event in engine.generate(req):
        if first != first:
            first = time.perf_counter() - start
        out.append(event.token_id)
        cached = max(cached, event.cached_tokens)
    return first, out, cached


async def run(
    settings: Settings,
    length: int,
    new: int,
    repeats: int,
    trace_dir: Path | None,
    answer_tokens: int,
    tail: int,
) -> list[list[str]]:
    engine = await asyncio.to_thread(build_engine, settings)
    engine.start()
    rng, vocab = random.Random(0), int(engine.tokenizer.vocab_size)
    words = lambda n: tuple(rng.randrange(3, vocab) for _ in range(n))
    try:
        prompt = words(length)
        first_ttft, answer, _ = await turn(engine, "first", prompt, (length,), ANSWER)
        history = (*prompt, *answer)
        ttfts, cached, prof = [], [], None
        profiler = WorkerProfiler(trace_dir or Path())  # what the server's --profile-dir records
        for i in range(repeats):
            follow = (*history, *words(new))
            # a chat prompt's message ends: the first prompt, the answer, and the new message, `tail` tokens (a
            # generation prompt) before the end
            ends = (length, len(history), len(follow) - tail)
            last = i == repeats - 1
            if last:  # the profiler records the thread it starts on: the engine's worker
                await engine.in_worker(profiler.start)
            ttft, _, hit = await turn(engine, f"follow-{i}", follow, ends, answer_tokens)
            cached.append(hit)
            if last:
                prof = await engine.in_worker(profiler.stop)
            ttfts.append(ttft)
    finally:
        await engine.stop()
    if prof is not None:
        report(prof, trace_dir, length)
    each = " / ".join(f"{1e3 * t:.1f}" for t in ttfts)
    return [[f"{length:,}", str(new), f"{1e3 * first_ttft:.1f}", f"{1e3 * statistics.median(ttfts):.1f}",
             f"{1e3 * min(ttfts):.1f}", each, str(min(cached)), str(len(ttfts))]]  # fmt: skip


def report(prof: torch.profiler.profile, trace_dir: Path | None, length: int) -> None:
    """The profiled follow-up's ops by CPU time (and on CUDA by GPU time, then each stream's timeline);
    its Chrome trace in `trace_dir`."""
    cuda = torch.cuda.is_available()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30), flush=True)
    if cuda:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30), flush=True)
    if trace_dir is None and not cuda:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(trace_dir or tmp) / f"followup-{length}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        if cuda:
            from bench.first_turn_trace import timeline  # it imports this module

            print(timeline(json.loads(path.read_text())), flush=True)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The model and cache options the in-process engine benches share (`--shape`, `--length`, budgets)."""
    parser.add_argument(
        "--shape",
        default="demo",
        help="demo (the bundled model), a random shape of bench._common or of bench.hybrid_model",
    )
    parser.add_argument("--length", type=int, default=32_768)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--hot-bytes", default="4GiB")
    parser.add_argument("--cold-bytes", default="8GiB")


def engine_settings(args: argparse.Namespace, tmp: Path) -> Settings:
    """Settings for `add_engine_args`'s options: the bundled model, or a random one of `--shape` in `tmp`
    (a Mamba shape of bench._common, or a hybrid one of bench.hybrid_model, whose KV needs a model length)."""
    hybrid = args.shape in HYBRID_SHAPES
    if args.shape == "demo":
        model = bundled_model_dir()
    elif hybrid:
        model, _ = write_hybrid(tmp / args.shape, args.shape)
    else:
        model = write_random_model(tmp / args.shape, args.shape)
    return Settings(
        model=str(model), max_num_seqs=args.max_num_seqs, max_prompt_tokens=args.length + 4096,
        hot_bytes=args.hot_bytes, cold_bytes=args.cold_bytes,
        max_model_len=args.length + 8192 if hybrid else None,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser)
    parser.add_argument("--new", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--answer", type=int, default=16, help="tokens each follow-up generates (e2e_bench: 16)"
    )
    parser.add_argument(
        "--tail",
        type=int,
        default=3,
        help="tokens after the new message's end (a generation prompt; 0: none)",
    )
    parser.add_argument("--trace-dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = engine_settings(args, Path(tmp))
        rows = asyncio.run(
            run(settings, args.length, args.new, args.repeats, args.trace_dir, args.answer, args.tail)
        )
    header = [
        "prompt tokens",
        "new tokens",
        "first turn TTFT ms",
        "follow-up TTFT p50 ms",
        "min ms",
        "each follow-up ms",
        "fewest cached tokens",
        "follow-ups",
    ]
    emit(markdown(header, rows), args.out)


if __name__ == "__main__":
    main()
