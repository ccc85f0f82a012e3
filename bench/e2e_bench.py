"""End to end over HTTP next to upstream mamba_ssm, in one command (issue #12 item 7).

    python -m bench.e2e_bench [--shape mamba2-2.7b mamba2-130m] [--sections step,tput,burst,itl,followup]
                              [--quick | --smoke] [--cache-args "--hot-bytes 4GiB ..."] [--out BENCHMARKS.md]
                              [--deadline SECONDS] [--commit SHA] [--client-procs N] [--variants ...]
                              [--profile-followups DIR]

For each shape a random-weight model of that shape (vocab: the demo tokenizer's, so that it streams text)
is written once; on a GPU upstream's `MambaLMHeadModel` holds the same weights in this process. Then:
  step      the runner's own decode step (`GpuModelRunner`, CUDA-event timed; the torch runner on CPU) at
            batch 1/16/64, in this process, before any server starts;
  tput      upstream `generate(cg=True)` at batch 1/16/64 (128-token prompts, 128 new tokens, greedy), then
            the real server (`python -m server.serve`) with 1/16/64 concurrent streaming clients of the same
            lengths (random text, temperature 0, ignore_eos): completion tok/s and the ratio to upstream,
            TTFT and ITL p50/p99; then TTFT of a burst of 64 simultaneous ~200-token prompts;
  burst     that burst again, a warm-up and 5 timed (3 with --quick), each of fresh prompts: TTFT p50 / p99,
            the response headers' p50 and, with `--variants " --log-level debug"`, the server's prefill steps
            meanwhile, each with where its time went (the engine's debug line); then the timed bursts' medians
            and how many p50s are within the 150 ms target;
  itl       ITL p50/p99 of 16 streams alone, then while 2 more clients send 8k-token prompts in a loop
            (target: p99 <= 3x p50 with prefills in flight);
  followup  8k / 32k / 128k-token conversations: TTFT of the first turn and of a follow-up turn (+64
            tokens) on the cache server and on a second server started with `--no-cache`, each server's
            conversations on one kept connection; with `--profile-followups DIR`, a torch profiler trace
            of each follow-up's steps on the cache server (its TTFT then includes the profiler's cost).
            Then the same on token ids over /v1/completions, the follow-up sending the answer's own ids
            (`return_tokens_as_token_ids`): it resumes at the first turn's finish checkpoint, which a
            random-weight model's chat follow-up misses (its answer's text re-tokenizes to other ids);
            `--variants "" " --chat-answer-ids"` sets the chat follow-up that takes the answer's ids beside.
The step table sets the runner's step beside the server's ITL p50 (target at batch 64: ITL <= 1.5x step).
Each table is printed and appended to `--out` as soon as it is measured, under a header with the card,
shape, dtype, commit and both servers' flags. Without CUDA or mamba_ssm the upstream column says why it is
empty; `--shape demo --smoke` serves the bundled demo model on CPU in about half a minute (the unit test).
Clients run in `--client-procs` processes so that 64 streams are not limited by one Python client.
Measured on an H200: about 3.5 minutes for mamba2-2.7b's tput section with --quick and two variants, 3.5
for its followup section with two variants (the full plan), 3 for step and itl with --quick.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from bench._common import (
    PHASES,
    SHAPES,
    Clients,
    Job,
    PhaseSums,
    Report,
    Sample,
    Stats,
    Texts,
    chat_body,
    completion,
    completion_ids,
    ms,
    pct,
    phase_cells,
    phase_delta,
    phase_sum,
    phase_totals,
    ratio,
    stream,
)
from tests.integration.server_proc import ServerProc, start_server

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("step", "tput", "burst", "itl", "followup")
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
Runs = dict[tuple[int, int], "Turns"]  # (conversation length, seed) -> its two turns


@dataclass(frozen=True)
class Plan:
    """What one run measures. Lengths are tokens; times are seconds."""

    concurrencies: tuple[int, ...] = (1, 16, 64)
    prompt_tokens: int = 128
    new_tokens: int = 128
    rounds: int = 3  # timed rounds per concurrency, after one warm-up round
    burst: int = 64
    burst_tokens: int = 200
    itl_streams: int = 16
    long_clients: int = 2
    long_tokens: int = 8192
    itl_seconds: float = 20.0
    followup_lengths: tuple[int, ...] = (8192, 32768, 131072)
    followup_new: int = 64
    answer_tokens: int = 16
    repeats: int = 3
    max_prompt_tokens: int = 140_000
    client_procs: int = 4
    section_seconds: float = 150.0
    step_reps: int = 50  # decode steps timed per batch
    bursts: int = 5  # timed bursts of the burst section, after a warm-up one

    @property
    def max_num_seqs(self) -> int:
        return max(*self.concurrencies, self.burst, self.itl_streams + self.long_clients)


PLANS = {
    "full": Plan(),
    "quick": Plan(rounds=2, itl_seconds=8.0, repeats=1, section_seconds=60.0, bursts=3),
    "smoke": Plan(
        concurrencies=(1, 2), prompt_tokens=16, new_tokens=8, rounds=1, burst=4, burst_tokens=24,
        itl_streams=2, long_clients=1, long_tokens=512, itl_seconds=1.5, followup_lengths=(256, 512),
        followup_new=16, answer_tokens=4, repeats=1, max_prompt_tokens=4096, client_procs=1,
        section_seconds=30.0, step_reps=3, bursts=2,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Budget:
    """A wall-clock deadline (a perf_counter time): the whole run's, or one section's within it."""

    deadline: float

    def section(self, seconds: float) -> Budget:
        return Budget(min(self.deadline, time.perf_counter() + seconds))

    def over(self) -> bool:
        return time.perf_counter() >= self.deadline


# ---- the model, upstream and the runner's step (in this process) -----------------------------------


@dataclass(frozen=True)
class Prepared:
    model_dir: Path
    upstream: Any  # mamba_ssm MambaLMHeadModel on the same weights, or None
    note: str  # why there is no upstream column, if there is none


def prepare(shape: str, tmp: Path) -> Prepared:
    """The served model: the bundled demo, or random weights of `shape` (shared with upstream on CUDA)."""
    from bench._common import demo_vocab, save_with_demo_tokenizer, write_random_model
    from bench.gpu_bench import SHAPES as UPSTREAM_SHAPES
    from server.model.defaults import bundled_model_dir

    if shape == "demo":
        return Prepared(bundled_model_dir(), None, "demo model")
    reason = upstream_missing() or ("" if shape in UPSTREAM_SHAPES else "shape")
    if reason:
        return Prepared(write_random_model(tmp / shape, shape), None, reason)
    from bench.gpu_bench import build_pair

    upstream, ours = build_pair(shape, vocab=demo_vocab())
    return Prepared(save_with_demo_tokenizer(ours, tmp / shape), upstream, "")


def upstream_missing() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA"
    from server.model.kernels import load_kernels

    kernels = load_kernels()
    return "" if kernels.gpu_ready else f"no mamba_ssm kernels: {kernels.error}"


def upstream_tok_s(upstream: Any, batches: tuple[int, ...], plan: Plan) -> dict[int, float]:
    """tok/s of upstream `generate(cg=True)`, its prefill included as the server's rate includes ours."""
    import torch

    from bench.gpu_bench import free, sync_time

    out, length = {}, plan.prompt_tokens + plan.new_tokens
    for batch in batches:
        ids = torch.randint(0, upstream.config.vocab_size, (batch, plan.prompt_tokens), device="cuda")
        run = lambda ids=ids: upstream.generate(ids, max_length=length, cg=True, top_k=1)
        run()  # captures the decoding graph
        out[batch] = batch * plan.new_tokens / sync_time(run, reps=3)
        upstream._decoding_cache = None
        free()
    return out


def upstream_prefill_ms(upstream: Any, plan: Plan) -> float:
    """Milliseconds of upstream's forward over the burst's prompts (`plan.burst` rows of `plan.burst_tokens`
    tokens, the last token's logits only; the second of two runs): how fast its kernels prefill that batch,
    a reference for the runner's `prefill_batch` of the same rows (which also keeps every row's state). Its
    mixers take the path `generate()`'s prefill takes (not the fused one, which needs causal-conv1d's CUDA
    extension)."""
    import torch

    ids = torch.randint(0, upstream.config.vocab_size, (plan.burst, plan.burst_tokens), device="cuda")
    for layer in upstream.backbone.layers:
        layer.mixer.use_mem_eff_path = False
    with torch.inference_mode():
        for _ in range(2):
            elapsed = _timed_ms(ids.device, lambda: upstream(ids, num_last_tokens=1))
    return elapsed


def runner_timings(model_dir: Path, plan: Plan) -> tuple[dict[int, float], float]:
    """The runner's own decode step per batch, and its batched prefill of the burst's prompts (`plan.burst`
    rows of `plan.burst_tokens` tokens, one `prefill_batch`), on the weights and dtype the server loads."""
    import torch

    from server.model.gpu_runner import GpuModelRunner, make_runner
    from server.model.loader import load_model

    batches = tuple(sorted(set(plan.concurrencies)))
    cuda = torch.cuda.is_available()
    _, model = load_model(model_dir, device="cuda" if cuda else "cpu", dtype="bf16" if cuda else "fp32")
    runner = make_runner(model, max(*batches, plan.burst))
    if isinstance(runner, GpuModelRunner):
        runner.warmup(list(batches))
    steps = {b: _step_ms(runner, b, plan.step_reps) for b in batches}
    return steps, _burst_prefill_ms(runner, plan.burst, plan.burst_tokens)


def _burst_prefill_ms(runner: Any, rows: int, tokens: int) -> float:
    """Milliseconds of one `prefill_batch` of `rows` fresh rows of `tokens` tokens (the second of two runs)."""
    from server.model.runner import PrefillSeg

    gen = random.Random(0)
    segs = [PrefillSeg([gen.randrange(runner.vocab) for _ in range(tokens)], slot) for slot in range(rows)]
    for _ in range(2):
        for slot in range(rows):
            runner.reset(slot)
        elapsed = _timed_ms(runner.device, lambda: runner.prefill_batch(segs))
    return elapsed


def _timed_ms(device: Any, fn: Callable[[], object]) -> float:
    """Milliseconds of fn(): wall time on CPU, CUDA events on a GPU."""
    import torch

    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def _step_ms(runner: Any, batch: int, steps: int) -> float:
    """Milliseconds per step of `steps` greedy steps chained on the device (CUDA events on a GPU)."""
    import torch

    tokens, slots = torch.randint(0, runner.vocab, (batch,), device=runner.device), list(range(batch))

    def run() -> None:
        nonlocal tokens
        for _ in range(steps):
            tokens = runner.decode(tokens, slots).argmax(-1)

    run()
    return _timed_ms(runner.device, run) / steps


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    """Prints how long a phase took (to stdout only: the log, not the tables)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        print(f"[e2e] {what}: {time.perf_counter() - t0:.1f} s", flush=True)


def free_device() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- servers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    proc: ServerProc
    model: str
    clients: Clients

    @property
    def url(self) -> str:
        return self.proc.base_url


def server_flags(plan: Plan, cache_args: str, cache: bool) -> list[str]:
    flags = ["--max-num-seqs", str(plan.max_num_seqs), "--max-prompt-tokens", str(plan.max_prompt_tokens)]
    return [*flags, "--shutdown-grace", "1", *(shlex.split(cache_args) if cache else ["--no-cache"])]


@contextlib.contextmanager
def servers(model_dir: Path, flag_sets: list[list[str]], procs: int) -> Iterator[list[Server]]:
    """Every server started at once (their loads and graph captures overlap), all stopped on exit. Only
    the first (the cache server) gets `procs` client processes: the others serve one client at a time."""
    managers = [start_server(["--model", str(model_dir), *flags], timeout=900) for flags in flag_sets]
    with contextlib.ExitStack() as stack:
        with timed(f"{len(managers)} server(s) started"), ThreadPoolExecutor(len(managers)) as pool:
            futures = [pool.submit(m.__enter__) for m in managers]
        for manager, future in zip(managers, futures, strict=True):
            if future.exception() is None:
                stack.push(manager.__exit__)
                stack.callback(report_errors, future.result())
        started = [f.result() for f in futures]  # the first start that failed raises here
        out = [
            Server(p, served_name(p), Clients(p.base_url, procs if i == 0 else 1))
            for i, p in enumerate(started)
        ]
        for server in out:
            stack.callback(server.clients.close)
        yield out


def served_name(proc: ServerProc) -> str:
    return str(httpx.get(proc.base_url + "/v1/models", timeout=30).json()["data"][0]["id"])


def report_errors(proc: ServerProc) -> None:
    lines = [ln for ln in proc.log_path.read_text(errors="replace").splitlines() if "ERROR" in ln]
    if lines:
        print(f"server on :{proc.port}: {len(lines)} ERROR lines, the last:\n" + "\n".join(lines[-10:]))


# ---- sections ------------------------------------------------------------------------------------


def one_round(server: Server, prompts: list[str], max_tokens: int) -> list[Sample]:
    """One stream per prompt, all sent at the same moment."""
    start = time.perf_counter() + 0.5
    return server.clients.run(
        [Job(COMPLETIONS, completion(server.model, p, max_tokens), start) for p in prompts]
    )


def section_tput(server: Server, texts: Texts, plan: Plan, budget: Budget) -> Tput:
    """Per concurrency: a warm-up round, then up to `rounds` timed ones; then the burst of long prompts.
    Also the samples and the server's phases of each concurrency's timed rounds and of the burst."""
    rng, out, samples, phases = random.Random(1), {}, {}, {}
    for c in plan.concurrencies:
        prompts = lambda c=c: [texts.text(plan.prompt_tokens, rng) for _ in range(c)]
        one_round(server, prompts(), plan.new_tokens)
        before = phase_totals(server.url)
        rounds = [one_round(server, prompts(), plan.new_tokens)]
        while len(rounds) < plan.rounds and not budget.over():
            rounds.append(one_round(server, prompts(), plan.new_tokens))
        out[c], phases[str(c)] = Stats.of(rounds), phase_delta(before, phase_totals(server.url))
        samples[str(c)] = [s for r in rounds for s in r]
    burst = [texts.text(plan.burst_tokens, rng) for _ in range(plan.burst)]
    before = phase_totals(server.url)
    samples[burst_label(plan)] = one_round(server, burst, plan.answer_tokens)
    phases[burst_label(plan)] = phase_delta(before, phase_totals(server.url))
    return Tput(out, Stats.of([samples[burst_label(plan)]]), samples, phases)


def section_burst(server: Server, texts: Texts, plan: Plan) -> list[list[str]]:
    """A warm-up burst, then `plan.bursts` timed ones, each of fresh prompts: per burst its TTFT p50 / p99,
    the response headers' p50, and the server's step lines logged meanwhile (with `--log-level debug`); then
    the medians over the timed bursts, and how many of their p50s are within `BURST_TARGET_MS` (one burst's
    p50 varies by 10-40 ms from burst to burst on an H200: BENCHMARKS.md session 25)."""
    rng, rows, timed = random.Random(3), [], []
    for i in range(plan.bursts + 1):
        seen = len(server.proc.log_path.read_text(errors="replace").splitlines())
        samples = one_round(
            server, [texts.text(plan.burst_tokens, rng) for _ in range(plan.burst)], plan.answer_tokens
        )
        time.sleep(0.2)  # the last step's line
        steps = step_lines(server.proc.log_path.read_text(errors="replace").splitlines()[seen:])
        heads = pct([s.headers for s in samples], 0.5)
        ttft = [s.ttft for s in samples]
        row = (pct(ttft, 0.5), pct(ttft, 0.99), heads)
        if i:
            timed.append(row)
        rows.append(["warm-up" if i == 0 else str(i), *map(ms, row), steps])
    medians = [ms(statistics.median(column)) for column in zip(*timed, strict=True)]
    within = sum(p50 * 1e3 <= BURST_TARGET_MS for p50, _, _ in timed)
    rows.append(
        ["median of the timed", *medians, f"{within} of {len(timed)} p50s at or under {BURST_TARGET_MS:g} ms"]
    )
    return rows


def step_lines(lines: list[str]) -> str:
    """The engine's debug lines of steps with prefill, shortened: 'rows (tokens) [+ decodes] wall (parts)',
    each followed by ' [stored X]' when the engine stored that step's captures before the next one (X ms)."""
    out = []
    for line in lines:
        stored = re.search(r"step captures stored: ([\d.]+) ms", line)
        if stored and out and not out[-1].endswith("]"):
            out[-1] += f" [stored {stored.group(1)}]"
            continue
        m = re.search(
            r"step: (\d+) prefill rows, (\d+) prompt tokens, (\d+) decodes, \d+ waiting: ([\d.]+) ms(?: \(([^)]*)\))?",
            line,
        )
        if m:
            rows, tokens, decodes, wall, parts = m.groups()
            extra = f" + {decodes} decodes" if decodes != "0" else ""
            out.append(f"{rows} ({tokens}){extra} {wall}" + (f" ({parts})" if parts else ""))
    return "; ".join(out) or "-"


@dataclass(frozen=True)
class Tput:
    stats: dict[int, Stats]  # per concurrency
    burst: Stats
    samples: dict[str, list[Sample]]  # per row of the tables: the concurrency, or the burst's label
    phases: dict[str, PhaseSums]  # the same rows' server phases


def burst_label(plan: Plan) -> str:
    return f"{plan.burst} at once, {plan.burst_tokens}-token prompts"


def itl_jobs(server: Server, texts: Texts, plan: Plan, seconds: float, long_extra: float | None) -> list[Job]:
    """`itl_streams` clients of short requests for `seconds`; with `long_extra`, also the long-prompt
    clients, which go on that much longer so that the streams' last requests still overlap them."""
    rng, start = random.Random(2), time.perf_counter() + 0.5
    until = start + seconds
    short = lambda i: completion(server.model, texts.text(plan.prompt_tokens, rng), plan.new_tokens, True)
    jobs = [Job(COMPLETIONS, short(i), start, until, vary=True, tag=f"s{i}") for i in range(plan.itl_streams)]
    if long_extra is None:
        return jobs
    body = completion(server.model, texts.text(plan.long_tokens, rng), 1)
    end = until + long_extra
    return jobs + [
        Job(COMPLETIONS, body, start, end, vary=True, tag=f"long{i}") for i in range(plan.long_clients)
    ]


def itl_row(load: str, st: Stats, longs: list[Sample] | None = None) -> list[str]:
    extra = ["", ""] if longs is None else [str(len(longs)), ms(pct([s.ttft for s in longs], 0.5))]
    return [load, ms(st.itl50, 2), ms(st.itl99, 2), ratio(st.itl99, st.itl50), *extra]


def section_itl(server: Server, texts: Texts, plan: Plan) -> list[list[str]]:
    base = Stats.of([server.clients.run(itl_jobs(server, texts, plan, plan.itl_seconds / 2, None))])
    extra = 1.5 * plan.new_tokens * base.itl50
    mixed = server.clients.run(itl_jobs(server, texts, plan, plan.itl_seconds, extra))
    short = Stats.of([[s for s in mixed if s.tag.startswith("s")]])
    load = f"+ {plan.long_clients} clients of {plan.long_tokens:,}-token prompts"
    longs = [s for s in mixed if s.tag.startswith("long")]
    return [itl_row(f"{plan.itl_streams} streams alone", base), itl_row(load, short, longs)]


@dataclass(frozen=True)
class Turns:
    first: Sample
    followup: Sample
    phases: tuple[PhaseSums, PhaseSums]  # the server's phases of each turn (nothing else runs meanwhile)


async def _talk(client: httpx.AsyncClient, server: Server, texts: Texts, plan: Plan, length: int,
                seed: int, profile: bool = False) -> Turns:  # fmt: skip
    """Turn 1: one user message of `length` tokens; turn 2, the follow-up, adds ~`followup_new` more. Both on
    `client`'s open connection, as a chat client sends its turns. With `profile`, the server (started with
    --profile-dir) records the follow-up's steps (its TTFT then includes the profiler's cost)."""
    # text seeded by the session, not by `seed` alone: the same seed at two lengths would share a prefix, and
    # the longer first turn would resume from the shorter one's checkpoints (cross-session prefix sharing),
    # which is not the miss the first-turn row measures
    session = f"e2e-{length}-{seed}"
    rng = random.Random(session)
    headers = {"X-Session-ID": session}
    messages = [{"role": "user", "content": texts.text(length, rng)}]
    before = phase_totals(server.url)
    first = await stream(client, CHAT, chat_body(server.model, messages, plan.answer_tokens, True), headers)
    between = phase_totals(server.url)
    messages += [{"role": "assistant", "content": first.text}]
    messages += [{"role": "user", "content": texts.text(plan.followup_new, rng)}]
    if profile:
        (await client.post("/start_profile")).raise_for_status()
    second = await stream(client, CHAT, chat_body(server.model, messages, plan.answer_tokens, True), headers)
    if profile:
        stopped = await client.post("/stop_profile")
        stopped.raise_for_status()
        print(f"[e2e] follow-up of {length:,} tokens traced: {stopped.json()['trace']}", flush=True)
    phases = (phase_delta(before, between), phase_delta(between, phase_totals(server.url)))
    print(
        f"[e2e] {length:,} #{seed}: {run_line(first, phases[0])}; follow-up {run_line(second, phases[1])}",
        flush=True,
    )
    return Turns(first, second, phases)


async def _talk_ids(client: httpx.AsyncClient, server: Server, texts: Texts, plan: Plan, length: int,
                    seed: int) -> Turns:  # fmt: skip
    """`_talk`'s conversation as token ids over /v1/completions, kept as an evaluation harness or an agent
    framework keeps it (token in, token out): the follow-up's prompt is the first prompt's ids, the answer's
    ids as generated (`return_tokens_as_token_ids`) and ~`followup_new` new ids, so that it resumes at the
    first turn's finish checkpoint whatever the answer's text would re-tokenize to. A random-weight model's
    chat answers never re-tokenize to the ids generated, so `_talk`'s follow-up resumes at the first prompt's
    end and prefills the answer too."""
    session = f"e2e-ids-{length}-{seed}"
    rng = random.Random(session)
    headers = {"X-Session-ID": session}
    body = lambda ids: completion_ids(server.model, ids, plan.answer_tokens)
    prompt = texts.ids(length, rng)
    before = phase_totals(server.url)
    first = await stream(client, COMPLETIONS, body(prompt), headers)
    between = phase_totals(server.url)
    if len(first.token_ids) != plan.answer_tokens:
        raise RuntimeError(f"the answer named {len(first.token_ids)} of {plan.answer_tokens} ids")
    prompt += [*first.token_ids, *texts.ids(plan.followup_new, rng)]
    second = await stream(client, COMPLETIONS, body(prompt), headers)
    phases = (phase_delta(before, between), phase_delta(between, phase_totals(server.url)))
    print(
        f"[e2e] ids {length:,} #{seed}: {run_line(first, phases[0])}; follow-up {run_line(second, phases[1])}",
        flush=True,
    )
    return Turns(first, second, phases)


def run_line(turn: Sample, phases: PhaseSums) -> str:
    """One turn's client TTFT, its checkpoint hit and its server phases (ms): where one run's time went."""
    cells = " ".join(f"{p} {c}" for p, c in zip(PHASES, phase_cells(phases), strict=True))
    return f"TTFT {turn.ttft * 1e3:.1f} ms, {turn.cached_tokens:,} of {turn.prompt_tokens:,} cached ({cells})"


async def _talks(
    server: Server,
    texts: Texts,
    plan: Plan,
    keys: list[tuple[int, int]],
    budget: Budget | None,
    profile: bool,
    ids: bool = False,
) -> Runs:
    """The conversations on one client, warmed by a short completion first: a client's first request pays for
    its connection and its own set-up (4-11 ms on a 2-core CPU), which no follow-up of a chat client that keeps
    its connection pays (the bench's earlier fresh client per turn put that into every TTFT)."""
    runs: Runs = {}
    async with httpx.AsyncClient(base_url=server.url, timeout=1800) as client:
        warm = {"model": server.model, "prompt": "warm up", "max_tokens": 1, "stream": True}
        await stream(client, COMPLETIONS, warm)
        for key in keys:
            if runs and budget is not None and budget.over():
                break
            if ids:  # the chat conversations' follow-ups are the profiled ones
                runs[key] = await _talk_ids(client, server, texts, plan, *key)
            else:
                runs[key] = await _talk(client, server, texts, plan, *key, profile=profile)
    return runs


def conversations(
    server: Server,
    texts: Texts,
    plan: Plan,
    keys: list[tuple[int, int]],
    budget: Budget | None = None,
    profile: bool = False,
    ids: bool = False,
) -> Runs:
    """Per (length, seed) key, a conversation of that many tokens and its follow-up (session
    e2e-{length}-{seed}), one after another while the budget lasts; `profile`: see `_talk`; `ids`: on token
    ids over /v1/completions (`_talk_ids`), not chat messages."""
    return asyncio.run(_talks(server, texts, plan, keys, budget, profile, ids))


def conversation(server: Server, texts: Texts, plan: Plan, length: int, seed: int) -> Turns:
    """One conversation and its follow-up (`conversations`)."""
    return conversations(server, texts, plan, [(length, seed)])[(length, seed)]


def section_followup(server: Server, texts: Texts, plan: Plan, budget: Budget, profile: bool) -> Runs:
    """Each conversation length `repeats` times (fresh text and session each) while the budget lasts."""
    keys = [(length, seed) for length in plan.followup_lengths for seed in range(plan.repeats)]
    return conversations(server, texts, plan, keys, budget, profile)


# ---- tables --------------------------------------------------------------------------------------

TPUT_HEADER = ["streams", "completion tok/s", "upstream generate tok/s", "ratio", "TTFT p50 ms", "TTFT p99 ms",
               "ITL p50 ms", "ITL p99 ms", "requests"]  # fmt: skip
BURST_TARGET_MS = 150.0  # issue #12's target for this burst's TTFT p50 on mamba2-2.7b
BURST_STEPS_HEADER = [
    "burst",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "headers p50 ms",
    "the server's prefill steps: rows (prompt tokens) + decodes, wall ms (where it went, ms)",
]
STEP_HEADER = ["batch", "runner step ms", "server ITL p50 ms", "ITL / step", "target"]
BURST_HEADER = ["prompts x tokens", "upstream forward ms", "runner prefill_batch ms", "server TTFT p50 ms",
                "TTFT / prefill"]  # fmt: skip
ITL_HEADER = ["load", "ITL p50 ms", "ITL p99 ms", "p99 / p50 (target <= 3x)", "long prefills",
              "their TTFT p50 ms"]  # fmt: skip
FOLLOWUP_HEADER = ["conversation tokens", "measured prompt tokens", "cache TTFT p50 ms",
                   "no-cache TTFT p50 ms"]  # fmt: skip
# `followup_rows(first=False)`'s columns
FOLLOWUP_TURN_HEADER = [*FOLLOWUP_HEADER, "speed-up", "runs", "resumed after the answer"]


def tput_rows(
    stats: dict[int, Stats], upstream: dict[int, float], burst: Stats, plan: Plan, note: str
) -> list[list[str]]:
    rows = []
    for c, st in stats.items():
        up = upstream.get(c, float("nan"))
        rows.append([
            str(c), f"{st.tok_s:,.0f}", f"{up:,.0f}" if up == up else f"n/a ({note})", ratio(st.tok_s, up),
            ms(st.ttft50), ms(st.ttft99), ms(st.itl50, 2), ms(st.itl99, 2), str(st.requests),
        ])  # fmt: skip
    burst_row = [burst_label(plan), "", "", "", ms(burst.ttft50)]
    return [*rows, [*burst_row, ms(burst.ttft99), "", "", str(burst.requests)]]


def tput_phase_rows(samples: dict[str, list[Sample]], phases: dict[str, PhaseSums]) -> list[list[str]]:
    """Per throughput row: the client's TTFT p50 and time to the response's headers p50 (the server sends
    them once the prompt is tokenized), and the server's mean ms per TTFT phase."""
    rows = []
    for load, sums in phases.items():
        ttft, heads = pct([s.ttft for s in samples[load]], 0.5), pct([s.headers for s in samples[load]], 0.5)
        rows.append([load, ms(ttft, 2), ms(heads, 2), *phase_cells(sums)])
    return rows


def burst_row(plan: Plan, done: InProcess, burst: Stats | None) -> list[str]:
    ttft = burst.ttft50 if burst is not None else float("nan")
    shape = f"{plan.burst} x {plan.burst_tokens}"
    upstream = f"{done.upstream_burst_ms:.1f}" if done.upstream_burst_ms == done.upstream_burst_ms else "-"
    return [shape, upstream, f"{done.burst_ms:.1f}", ms(ttft), ratio(ttft * 1e3, done.burst_ms)]


def step_rows(steps: dict[int, float], stats: dict[int, Stats]) -> list[list[str]]:
    rows = []
    for batch, step in steps.items():
        itl = stats[batch].itl50 if batch in stats else float("nan")
        target = "<= 1.5x" if batch == max(steps) else ""
        rows.append([str(batch), f"{step:.3f}", ms(itl, 2), ratio(itl * 1e3, step), target])
    return rows


def phase_rows(runs: dict[str, Runs]) -> list[list[str]]:
    """Per length, server and turn: the server's mean ms per TTFT phase (`tssc_request_phase_seconds`)."""
    rows = []
    for length in sorted({k[0] for r in runs.values() for k in r}):
        for name, by_key in runs.items():
            turns = [t for k, t in by_key.items() if k[0] == length]
            for turn, label in ((0, "first turn"), (1, "follow-up")):
                ttft = pct([(t.followup if turn else t.first).ttft for t in turns], 0.5)
                sums = phase_sum([t.phases[turn] for t in turns])
                rows.append([f"{length:,}", name, label, ms(ttft, 2), *phase_cells(sums)])
    return rows


def followup_rows(cache: Runs, plain: Runs, first: bool) -> list[list[str]]:
    """Per length: median prompt tokens, TTFT p50 with and without the cache, and their ratio."""
    rows = []
    for length in sorted({k[0] for k in cache}):
        on = [t.first if first else t.followup for k, t in cache.items() if k[0] == length]
        off = [t.first if first else t.followup for k, t in plain.items() if k[0] == length]
        a, b = pct([s.ttft for s in on], 0.5), pct([s.ttft for s in off], 0.5)
        tokens = statistics.median(s.prompt_tokens for s in on)
        speed = ratio(a, b) if first else ratio(b, a)
        row = [f"{length:,}", f"{tokens:,.0f}", ms(a), ms(b), speed, str(len(on))]
        if not first:
            turns = [t for k, t in cache.items() if k[0] == length]
            row.append(f"{sum(resumed_after_answer(t) for t in turns)} of {len(turns)}")
        rows.append(row)
    return rows


def resumed_after_answer(turns: Turns) -> bool:
    """The follow-up resumed at the first turn's finish checkpoint (its prompt and answer, less the answer's
    last token) or deeper, rather than before the answer."""
    first = turns.first
    return turns.followup.cached_tokens >= first.prompt_tokens + first.completion_tokens - 1


# ---- one shape -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    args: argparse.Namespace
    plan: Plan
    budget: Budget
    rep: Report


def commit() -> str:
    """The short commit (+dirty) from git, else ./COMMIT, else 'unknown'."""
    with contextlib.suppress(OSError):
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        head, dirty = run("rev-parse", "--short", "HEAD"), run("status", "--porcelain", "-uno")
        if head.returncode == 0:
            return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    path = REPO / "COMMIT"
    return path.read_text().strip() if path.exists() else "unknown"


def header(ctx: Context, shape: str, model_dir: Path, flag_sets: list[list[str]]) -> None:
    import torch

    cfg = json.loads((model_dir / "config.json").read_text())
    cuda = torch.cuda.is_available()
    desc = f"d_model {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}"
    lines = [
        "", f"## End to end over HTTP vs upstream mamba_ssm: {torch.cuda.get_device_name() if cuda else 'cpu'}, "
        f"{shape} ({desc}), {'bf16' if cuda else 'fp32'}",
        "", f"commit {ctx.args.commit or commit()}, {datetime.date.today()}, torch {torch.__version__}, "
        f"plan `{ctx.args.plan}`: {ctx.plan}",
    ]  # fmt: skip
    for name, flags in zip(("cache server", "no-cache server"), flag_sets, strict=False):
        lines += ["", f"{name}: `python -m server.serve --model <{shape}> {shlex.join(flags)}`"]
    ctx.rep.write(lines)


@dataclass(frozen=True)
class InProcess:
    """What was measured in this process before the servers started."""

    upstream: dict[int, float]  # batch -> upstream generate tok/s
    steps: dict[int, float]  # batch -> the runner's step, ms
    burst_ms: float  # the runner's batched prefill of the burst's prompts, ms (nan: not measured)
    upstream_burst_ms: float  # upstream's forward over the same rows, ms (nan: not measured)
    note: str  # why upstream is missing, if it is


def in_process(ctx: Context, shape: str, tmp: Path) -> tuple[Path, InProcess]:
    batches, sections = tuple(sorted(set(ctx.plan.concurrencies))), ctx.args.sections
    with timed(f"{shape}: model written"):
        prep = prepare(shape, tmp)
    upstream: dict[int, float] = {}
    steps: dict[int, float] = {}
    upstream_burst = float("nan")
    if prep.upstream is not None and "tput" in sections:
        with timed(f"{shape}: upstream generate"):
            upstream = upstream_tok_s(prep.upstream, batches, ctx.plan)
    if prep.upstream is not None and "step" in sections:
        upstream_burst = upstream_prefill_ms(prep.upstream, ctx.plan)
    model_dir, note = prep.model_dir, prep.note
    del prep
    free_device()
    burst = float("nan")
    if "step" in sections:
        with timed(f"{shape}: runner step"):
            steps, burst = runner_timings(model_dir, ctx.plan)
    free_device()
    return model_dir, InProcess(upstream, steps, burst, upstream_burst, note)


def run_shape(ctx: Context, shape: str, tmp: Path) -> None:
    """In-process phases first (upstream, the runner's step), then the servers with the GPU to themselves:
    once per `--variants` entry (extra flags of the cache server), each variant's servers in turn."""
    model_dir, done = in_process(ctx, shape, tmp)
    for variant in ctx.args.variants or [""]:
        if ctx.budget.over():
            print(f"skipped variant {variant!r}: past --deadline", flush=True)
            continue
        cache_args = f"{ctx.args.cache_args} {variant}".strip()
        if ctx.args.profile_followups is not None:
            cache_args += f" --profile-dir {shlex.quote(str(ctx.args.profile_followups))}"
        flag_sets = [server_flags(ctx.plan, cache_args, cache=True)]
        if "followup" in ctx.args.sections:
            flag_sets.append(server_flags(ctx.plan, cache_args, cache=False))
        header(ctx, shape, model_dir, flag_sets)
        if ctx.args.sections <= {"step"}:
            ctx.rep.table("the runner's own decode step", STEP_HEADER, step_rows(done.steps, {}))
            title = "the runner's own batched prefill of the burst against the server's TTFT"
            ctx.rep.table(title, BURST_HEADER, [burst_row(ctx.plan, done, None)])
            return
        with servers(model_dir, flag_sets, ctx.plan.client_procs) as started, timed(f"{shape}: {variant}"):
            serve_sections(ctx, started, Texts(model_dir), done)


def serve_sections(ctx: Context, started: list[Server], texts: Texts, done: InProcess) -> None:
    plan, sections, rep, budget = ctx.plan, ctx.args.sections, ctx.rep, ctx.budget
    stats: dict[int, Stats] = {}
    burst: Stats | None = None
    if "tput" in sections and not budget.over():
        with timed("tput"):
            tput = section_tput(started[0], texts, plan, budget.section(plan.section_seconds))
        stats, burst = tput.stats, tput.burst
        title = f"throughput and latency: {plan.prompt_tokens}-token prompts, {plan.new_tokens} new tokens"
        rep.table(title, TPUT_HEADER, tput_rows(stats, done.upstream, burst, plan, done.note))
        title = "where the throughput rounds' TTFT goes: the server's phases (`tssc_request_phase_seconds`, mean ms)"
        header = ["load", "client TTFT p50 ms", "client headers p50 ms", *PHASES]
        rep.table(title, header, tput_phase_rows(tput.samples, tput.phases))
    if "burst" in sections and not budget.over():
        with timed("burst"):
            rows = section_burst(started[0], texts, plan)
        title = f"bursts of {plan.burst} simultaneous {plan.burst_tokens}-token prompts, one after another"
        rep.table(title, BURST_STEPS_HEADER, rows)
    if done.steps:
        title = "the runner's own decode step against the server's ITL"
        rep.table(title, STEP_HEADER, step_rows(done.steps, stats))
    if done.burst_ms == done.burst_ms:
        title = "the runner's own batched prefill of the burst against the server's TTFT"
        rep.table(title, BURST_HEADER, [burst_row(plan, done, burst)])
    if "itl" in sections and not budget.over():
        with timed("itl"):
            rows = section_itl(started[0], texts, plan)
        rep.table("ITL with long prefills in flight", ITL_HEADER, rows)
    if "followup" in sections and not budget.over():
        with timed("followup"):
            followup_tables(ctx, started, texts)


def followup_tables(ctx: Context, started: list[Server], texts: Texts) -> None:
    plan = ctx.plan
    profile = ctx.args.profile_followups is not None
    on = section_followup(started[0], texts, plan, ctx.budget.section(plan.section_seconds), profile)
    off = conversations(started[1], texts, plan, list(on))
    title = f"follow-up turn (+{plan.followup_new} tokens) TTFT, state cache vs --no-cache"
    ctx.rep.table(title, FOLLOWUP_TURN_HEADER, followup_rows(on, off, first=False))
    title = "first-turn TTFT (a miss: what capturing costs), state cache vs --no-cache"
    ctx.rep.table(title, [*FOLLOWUP_HEADER, "cache / no-cache", "runs"], followup_rows(on, off, first=True))
    on_ids = conversations(started[0], texts, plan, list(on), ids=True)
    off_ids = conversations(started[1], texts, plan, list(on), ids=True)
    title = (
        f"follow-up on token ids (+{plan.followup_new} tokens, /v1/completions, the answer's own ids: resumes at"
        " the first turn's finish checkpoint) TTFT, state cache vs --no-cache"
    )
    ctx.rep.table(title, FOLLOWUP_TURN_HEADER, followup_rows(on_ids, off_ids, first=False))
    title = "where TTFT goes: the server's phases (`tssc_request_phase_seconds`, mean ms)"
    header = ["conversation tokens", "server", "turn", "client TTFT p50 ms", *PHASES]
    servers = {"cache": on, "no-cache": off, "cache, token ids": on_ids, "no-cache, token ids": off_ids}
    ctx.rep.table(title, header, phase_rows(servers))


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", nargs="+", default=["mamba2-2.7b"], choices=[*SHAPES, "tiny", "demo"])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="a comma-separated subset")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", dest="plan", action="store_const", const="quick", help="fewer rounds, repeats"
    )
    mode.add_argument("--smoke", dest="plan", action="store_const", const="smoke", help="tiny sizes, for CPU")
    parser.set_defaults(plan="full")
    parser.add_argument(
        "--cache-args", help="extra flags of the cache server (GPU default: 4GiB hot, 8GiB cold)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        help="served sections once per entry, each entry extra flags of the cache server ('' for none), "
        "against the same upstream and runner step; start an entry with a space (' --engine-process'), or "
        "argparse takes it for an option of this bench",
    )
    parser.add_argument("--client-procs", type=int, help="client processes (default: the plan's)")
    parser.add_argument(
        "--profile-followups",
        type=Path,
        metavar="DIR",
        help="record each follow-up turn on the cache server with the torch profiler (--profile-dir DIR), "
        "its Chrome trace into DIR; those turns' TTFTs include the profiler's cost",
    )
    parser.add_argument("--deadline", type=float, default=3600.0, help="seconds; no section starts after it")
    parser.add_argument("--commit", default="", help="the commit to print (default: git, else ./COMMIT)")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    args.sections = set(args.sections.split(","))
    if unknown := args.sections - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the `with` blocks: the servers are stopped, not orphaned


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    plan = replace(PLANS[args.plan], client_procs=args.client_procs or PLANS[args.plan].client_procs)
    if args.cache_args is None:
        import torch

        args.cache_args = "--hot-bytes 4GiB --cold-bytes 8GiB" if torch.cuda.is_available() else ""
    ctx = Context(args, plan, Budget(time.perf_counter() + args.deadline), Report(args.out))
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shape:
            if ctx.budget.over():
                print(f"skipped {shape}: past --deadline", flush=True)
                continue
            with timed(f"{shape}: everything"):
                run_shape(ctx, "mamba2-tiny" if shape == "tiny" else shape, Path(tmp))
            free_device()


if __name__ == "__main__":
    main(sys.argv[1:])
