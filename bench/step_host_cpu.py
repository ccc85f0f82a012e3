"""Per-step host cost of the serving path on CPU, where a tiny model makes the model's own work small
(issue #12 item 8): what the engine, the SSE formatting and the HTTP server add to each decode step.

    python -m bench.step_host_cpu [--batches 1 16 64] [--new-tokens 128] [--rounds 3] [--sections engine,http]
                                  [--flags " --engine-process"] [--profile] [--out FILE]

Both sections serve a seeded tiny Mamba2 (d_model 32, 2 layers, the character tokenizer) with 128-token
prompts, greedy, ignore_eos, the state cache on (as the e2e bench's server has it). torch runs one thread
in every process, so that the numbers do not depend on how busy the machine's other cores are.
  engine  the real `Engine` in this process, each stream consumed through `completion_stream` (the SSE
          bytes the HTTP server would send, without the socket). Per step: the period, the runner's
          decode inside it, the rest of the worker's step (sampling, stop rules, detokenization, events),
          the loop's delivery (`_apply`), and what is left (thread handoff, the streams' formatting);
  http    the real server (`python -m server.serve`, with `--flags`) with B concurrent streaming completions
          clients (raw asyncio sockets, which cost the client little): completion tok/s, ITL p50/p99, and the
          server process's CPU per streamed token (`bench._common.CpuTimes`: all threads, and the event loop), and
          with `--engine-process` the core process's (its `tssc_engine_core_process_cpu_seconds_total`).
Beside both: the runner's own decode step at batch B, timed in this process on the same weights (chained
greedy steps), and the ratio ITL (or step period) / runner step, the quantity issue #12 bounds at 1.5x.
`--profile` prints the top functions (cProfile, by own time) of the loop and of the worker thread at the
largest batch. Timings on a shared machine are noisy: compare variants back to back in one call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import itertools
import json
import os
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._common import CpuTimes, emit, pct  # noqa: E402

T = TypeVar("T")
PROMPT_TOKENS = 128
VOCAB_LOW, VOCAB_HIGH = 10, 100  # printable characters of the character tokenizer


# ---- the model and the runner's own step ---------------------------------------------------------


def tiny_model_dir(tmp: Path) -> Path:
    from tests.integration.server_proc import make_tiny_model

    return make_tiny_model(tmp / "tiny")


def runner_step_ms(model_dir: Path, batch: int, steps: int = 200, reps: int = 5) -> float:
    """Median over `reps` of the mean CPU time of `steps` chained greedy decode steps of a fresh runner (one
    torch thread: its CPU time is its time on an idle core)."""
    from server.model.loader import load_model
    from server.model.runner import ModelRunner

    runner = ModelRunner(load_model(model_dir)[1], max_slots=batch)
    tokens, slots = torch.randint(VOCAB_LOW, VOCAB_HIGH, (batch,)), list(range(batch))
    times = []
    for _ in range(reps + 1):
        t0 = time.process_time()
        for _ in range(steps):
            tokens = runner.decode(tokens, slots).argmax(-1)
        times.append((time.process_time() - t0) / steps)
    return statistics.median(times[1:]) * 1e3


def prompts(batch: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(32, 127, (batch, PROMPT_TOKENS), generator=g)
    return ["".join(chr(c) for c in row) for row in ids.tolist()]


# ---- engine section ------------------------------------------------------------------------------


@dataclass
class Clock:
    """CPU seconds of the calling thread spent in each wrapped call (`time.thread_time`: a thread waiting for
    the GIL or for a core taken by another process is not counted), and how many calls."""

    total: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def wrap(self, name: str, fn: Callable[..., T]) -> Callable[..., T]:
        def timed(*args: Any, **kwargs: Any) -> T:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] = self.total.get(name, 0.0) + time.thread_time() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()


@dataclass(frozen=True)
class EngineRow:
    """Per decode step, in seconds: its wall-clock period and the process's CPU time, split by part."""

    batch: int
    period: float  # wall clock, end to end in the engine (all streams consumed as SSE)
    cpu: float  # CPU time of the process (both threads)
    decode: float  # the runner's decode inside it
    sample: float  # sampling the batch (the worker's `_sample`)
    rows: float  # per-row bookkeeping after it: stop rules, detokenization, events, finish captures
    worker: float  # the rest of the worker's step
    apply: float  # the loop's delivery of the step's events
    tok_s: float

    @property
    def streams(self) -> float:
        """The rest of the loop thread's CPU: the streams' SSE chunks, queues, scheduling, the handoff."""
        return self.cpu - self.decode - self.sample - self.rows - self.worker - self.apply


def _instrument(engine: Any, clock: Clock) -> None:
    runner = engine._worker.runner
    runner.decode = clock.wrap("decode", runner.decode)
    runner.prefill_batch = clock.wrap("prefill", runner.prefill_batch)
    worker = engine._worker
    worker.execute = clock.wrap("execute", worker.execute)
    worker.admit = clock.wrap("admit", worker.admit)
    worker._sample = clock.wrap("sample", worker._sample)
    worker._sample_rows = clock.wrap("rows", worker._sample_rows)
    engine._apply = clock.wrap("apply", engine._apply)


def _request(i: int, text_ids: tuple[int, ...], new_tokens: int) -> Any:
    from server.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(f"bench-{i}-{time.perf_counter_ns()}", text_ids, params)


async def _consume(engine: Any, req: Any) -> int:
    """One stream as the HTTP server produces it: SSE chunk bytes from `completion_stream`."""
    from server.api.streaming import StreamSpec, completion_stream

    spec = StreamSpec("cmpl-bench", 0, "tiny", 1, True, False, str)
    n = 0
    async for chunk in completion_stream(engine, [req], spec, [""]):
        n += len(chunk) > 0
    return n


async def _engine_round(engine: Any, batch: int, seed: int, new_tokens: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of one round of `batch` concurrent streams."""
    tok = engine.tokenizer
    reqs = [_request(i, tuple(tok.encode(p)), new_tokens) for i, p in enumerate(prompts(batch, seed))]
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(_consume(engine, r) for r in reqs))
    return time.perf_counter() - t0, time.process_time() - c0


def build_engine(model_dir: Path, max_seqs: int) -> Any:
    from server.engine.factory import build_engine as build
    from server.metrics import Metrics
    from server.settings import Settings

    return build(Settings(model=str(model_dir), max_num_seqs=max_seqs), Metrics())


async def engine_rows(model_dir: Path, batches: list[int], new_tokens: int, rounds: int) -> list[EngineRow]:
    engine, clock = build_engine(model_dir, max(batches)), Clock()
    _instrument(engine, clock)
    engine.start()
    rows = []
    try:
        for batch in batches:
            await _engine_round(engine, batch, 0, new_tokens)  # warm-up
            samples = []
            for r in range(rounds):
                clock.reset()
                wall, cpu = await _engine_round(engine, batch, r + 1, new_tokens)
                samples.append(_row(batch, wall, cpu, clock, new_tokens))
            rows.append(min(samples, key=lambda s: s.cpu))
    finally:
        await engine.stop()
    return rows


def _row(batch: int, wall: float, cpu: float, clock: Clock, new_tokens: int) -> EngineRow:
    """Per decode step; the prompts' prefill and admission (restores) are left out of the CPU parts, not out
    of the wall-clock period."""
    steps = clock.calls.get("decode", 1)
    per = lambda name: clock.total.get(name, 0.0) / steps
    return EngineRow(
        batch,
        wall / steps,
        cpu / steps - per("prefill") - per("admit"),
        per("decode"),
        per("sample"),
        per("rows") - per("sample"),
        per("execute") - per("decode") - per("rows") - per("prefill"),
        per("apply"),
        batch * new_tokens / wall,
    )


@contextlib.contextmanager
def profiled(engine: Any) -> Iterator[tuple[cProfile.Profile, cProfile.Profile]]:
    """cProfile of the loop thread (the caller's) and of the worker's steps."""
    loop_prof, worker_prof = cProfile.Profile(), cProfile.Profile()
    execute = engine._worker.execute

    def traced(*args: Any, **kwargs: Any) -> Any:
        worker_prof.enable()
        try:
            return execute(*args, **kwargs)
        finally:
            worker_prof.disable()

    engine._worker.execute = traced
    loop_prof.enable()
    try:
        yield loop_prof, worker_prof
    finally:
        loop_prof.disable()
        engine._worker.execute = execute


async def engine_profile(model_dir: Path, batch: int, new_tokens: int) -> None:
    engine = build_engine(model_dir, batch)
    engine.start()
    try:
        await _engine_round(engine, batch, 0, new_tokens)  # warm-up
        with profiled(engine) as (loop_prof, worker_prof):
            await _engine_round(engine, batch, 1, new_tokens)
    finally:
        await engine.stop()
    for name, prof in (("event loop", loop_prof), ("worker thread", worker_prof)):
        print(f"\n## {name}, batch {batch}: top functions by own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


# ---- http section --------------------------------------------------------------------------------


@dataclass
class Stream:
    start: float = 0.0
    stamps: list[float] = field(default_factory=list)  # arrival of each chunk that carries text


def _has_text(event: bytes) -> bool:
    return event.startswith(b"data: {") and b'"text":""' not in event and b'"text":' in event


async def _stream(port: int, body: bytes, out: Stream) -> None:
    """One streaming POST over a raw socket; a chunk's time is when its bytes arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    out.start = time.perf_counter()
    writer.write(head + body)
    buf = b""
    while data := await reader.read(65536):
        now = time.perf_counter()
        buf += data
        *events, buf = buf.split(b"\n\n")
        out.stamps.extend(now for e in events if _has_text(e.rpartition(b"\r\n")[2]))
    writer.close()


def _bodies(texts: list[str], new_tokens: int) -> list[bytes]:
    return [
        json.dumps(
            {"model": "tiny", "prompt": t, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
             "stream": True}
        ).encode()
        for t in texts
    ]  # fmt: skip


@dataclass(frozen=True)
class HttpRow:
    batch: int
    tok_s: float
    itl50: float
    itl99: float
    cpu: CpuTimes  # the server process's, per streamed token (seconds)
    core: float | None = None  # the core process's CPU seconds per streamed token (None: no core process)


async def _http_round(port: int, bodies: list[bytes]) -> list[Stream]:
    streams = [Stream() for _ in bodies]
    await asyncio.gather(*(_stream(port, b, s) for b, s in zip(bodies, streams, strict=True)))
    return streams


def http_rows(
    model_dir: Path, batches: list[int], new_tokens: int, rounds: int, flags: Sequence[str] = ()
) -> list[HttpRow]:
    from tests.integration.server_proc import start_server

    args = ["--model", str(model_dir), "--max-num-seqs", str(max(batches)), "--log-level", "warning", *flags]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    with start_server(args, env=env) as srv:
        for batch in batches:
            asyncio.run(_http_round(srv.port, _bodies(prompts(batch, 0), new_tokens)))  # warm-up
            before, core_before = CpuTimes.of(srv.proc.pid), core_cpu_seconds(srv.port)
            per_round = [
                asyncio.run(_http_round(srv.port, _bodies(prompts(batch, r + 1), new_tokens)))
                for r in range(rounds)
            ]
            spent, core_after = CpuTimes.of(srv.proc.pid) - before, core_cpu_seconds(srv.port)
            tokens = batch * new_tokens * rounds
            row = _http_row(batch, per_round, spent.per(tokens))
            if core_before is not None and core_after is not None:
                row = replace(row, core=(core_after - core_before) / tokens)
            rows.append(row)
    return rows


def core_cpu_seconds(port: int) -> float | None:
    """The engine core process's CPU seconds so far, as the server exports them
    (`tssc_engine_core_process_cpu_seconds_total`); None without a core process."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tssc_engine_core_process_cpu_seconds_total":
                return float(sample.value)
    return None


def _http_row(batch: int, per_round: list[list[Stream]], cpu: CpuTimes) -> HttpRow:
    rates = []
    for streams in per_round:
        end = max(s.stamps[-1] for s in streams if s.stamps)
        rates.append(sum(len(s.stamps) for s in streams) / (end - min(s.start for s in streams)))
    gaps = [b - a for streams in per_round for s in streams for a, b in itertools.pairwise(s.stamps)]
    return HttpRow(batch, statistics.median(rates), pct(gaps, 0.5), pct(gaps, 0.99), cpu)


# ---- tables --------------------------------------------------------------------------------------


def engine_table(rows: list[EngineRow], steps: dict[int, float]) -> str:
    lines = [
        "| batch | runner step | engine step, CPU | CPU / runner step | host CPU per row µs | decode in step "
        "| sample | rows | worker rest | loop delivery | SSE streams + handoff | wall period | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = steps[r.batch]
        parts = (r.decode, r.sample, r.rows, r.worker, r.apply, r.streams, r.period)
        per_row = (r.cpu - r.decode) / r.batch * 1e6
        lines.append(
            f"| {r.batch} | {step:.3f} | {r.cpu * 1e3:.3f} | {r.cpu * 1e3 / step:.2f}x | {per_row:.1f} | "
            + " | ".join(f"{x * 1e3:.3f}" for x in parts)
            + f" | {r.tok_s:,.0f} |"
        )
    return "\n".join(lines)


def http_table(rows: list[HttpRow], steps: dict[int, float]) -> str:
    lines = [
        "| streams | runner step ms | ITL p50 ms | ITL p99 ms | ITL p50 / runner step | completion tok/s "
        "| server CPU µs / token | loop CPU µs / token | core CPU µs / token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = steps[r.batch]
        lines.append(
            f"| {r.batch} | {step:.3f} | {r.itl50 * 1e3:.3f} | {r.itl99 * 1e3:.3f} | {r.itl50 * 1e3 / step:.2f}x "
            f"| {r.tok_s:,.0f} | {r.cpu.process * 1e6:.1f} | {r.cpu.loop * 1e6:.1f} "
            f"| {'n/a' if r.core is None else f'{r.core * 1e6:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per batch (the best one counts)")
    parser.add_argument("--sections", default="engine,http")
    parser.add_argument(
        "--flags", default="", help="extra server flags of the http section (start with a space)"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the engine at the largest batch")
    parser.add_argument("--out", type=Path, default=None, help="append the tables to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sections = set(args.sections.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(Path(tmp))
        steps = {b: runner_step_ms(model_dir, b) for b in args.batches}
        if "engine" in sections:
            rows = asyncio.run(engine_rows(model_dir, args.batches, args.new_tokens, args.rounds))
            emit(
                "\n### Engine step on CPU (tiny model; ms of CPU per decode step)\n\n"
                + engine_table(rows, steps),
                args.out,
            )
        if "http" in sections:
            flags = shlex.split(args.flags)
            rows_http = http_rows(model_dir, args.batches, args.new_tokens, args.rounds, flags)
            emit("\n### Over HTTP on CPU (tiny model)\n\n" + http_table(rows_http, steps), args.out)
        if args.profile:
            asyncio.run(engine_profile(model_dir, max(args.batches), args.new_tokens))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
