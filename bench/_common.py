"""Pieces the end-to-end benches share (`bench.http_bench`, `bench.e2e_bench`).

- `stream`: one streaming chat or completions request, timed chunk by chunk (TTFT, inter-token gaps);
- `Job` / `Clients`: many such streams at once, spread over client processes so that 64 streams are
  not capped by one Python client (timestamps are `time.perf_counter`, CLOCK_MONOTONIC on Linux, so
  they compare across processes);
- `Stats`, `pct`, `ms`, `ratio`, `Report`: what rounds of samples add up to, and markdown tables printed and
  appended to a file as they are measured;
- `Texts`, `completion`, `chat_body`: random text of an exact token count, and streaming request bodies;
- `write_random_model`: a random-weight Mamba2 of a published shape with the demo model's tokenizer;
- `phase_totals` / `phase_delta`: the server's `tssc_request_phase_seconds` (where TTFT goes) over a window;
- `CpuTimes`: a server process's CPU time, all its threads and its event loop's (Linux `/proc`).

Nothing here imports torch at module level: client processes import this module only.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from server.model.lm import MambaLM

SHAPES = {
    "mamba2-tiny": (128, 2),
    "mamba2-130m": (768, 24),
    "mamba2-1.3b": (2048, 48),
    "mamba2-2.7b": (2560, 64),
}
PHASES = ("parse", "tokenize", "queue", "restore", "prefill", "first_token")
PhaseSums = dict[str, tuple[float, float]]  # phase -> (seconds, observations)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Sample:
    """One streamed response. Times in seconds; `start` and `end` on the `time.perf_counter` clock."""

    prompt_tokens: int
    ttft: float
    gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    start: float = 0.0
    end: float = 0.0
    text: str = ""
    tag: str = ""
    cached_tokens: int = 0  # of prompt_tokens, served from a checkpoint (usage.prompt_tokens_details)
    headers: float = float("nan")  # from the request's start to the response's status and headers
    token_ids: list[int] = field(default_factory=list)  # generated ids, named by logprobs as `token_id:<id>`


def pct(values: list[float], q: float) -> float:
    vals = sorted(v for v in values if v == v)
    return vals[min(len(vals) - 1, int(q * len(vals)))] if vals else float("nan")


def wall(samples: list[Sample]) -> float:
    return max(s.end for s in samples) - min(s.start for s in samples)


@dataclass(frozen=True)
class Stats:
    """Rounds of concurrent streams: median completion tok/s over rounds, TTFT and ITL over all samples."""

    tok_s: float
    ttft50: float
    ttft99: float
    itl50: float
    itl99: float
    requests: int

    @classmethod
    def of(cls, rounds: list[list[Sample]]) -> Stats:
        samples = [s for r in rounds for s in r]
        ttft, gaps = [s.ttft for s in samples], [g for s in samples for g in s.gaps]
        rates = [sum(s.completion_tokens for s in r) / wall(r) for r in rounds if r]
        rate = statistics.median(rates) if rates else float("nan")
        return cls(rate, pct(ttft, 0.5), pct(ttft, 0.99), pct(gaps, 0.5), pct(gaps, 0.99), len(samples))


def ms(seconds: float, digits: int = 1) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1e3:.{digits}f}"


def ratio(a: float, b: float) -> str:
    return "n/a" if a != a or b != b or b == 0 else f"{a / b:.2f}x"


WORDS = (
    "the", "state", "of", "a", "model", "is", "kept", "in", "cache", "so", "each", "new", "turn", "costs",
    "only", "its", "own", "tokens", "and", "server", "restores", "checkpoint", "from", "memory", "layer",
    "kernel", "graph", "decode", "prefix", "session", "token", "space",
)  # fmt: skip


class Texts:
    """Random English-word text of an exact token count under a model directory's tokenizer."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def text(self, tokens: int, rng: random.Random) -> str:
        return str(self.tok.decode(self.ids(tokens, rng)))

    def ids(self, tokens: int, rng: random.Random) -> list[int]:
        """The first `tokens` ids of random words."""
        ids = self.tok.encode(" ".join(rng.choices(WORDS, k=tokens)), add_special_tokens=False).ids
        return list(ids[:tokens])


def completion(model: str, prompt: str, max_tokens: int, per_token: bool = False) -> dict[str, Any]:
    """A streaming /v1/completions body: greedy, exactly max_tokens new tokens, usage in the last chunk.
    `per_token` turns logprobs on: every token then gets its own chunk, even one whose text is held back
    (an incomplete UTF-8 character, which random weights produce often), so that TTFT and gaps time
    tokens rather than visible text (at the cost of a heavier chunk)."""
    return {"model": model, "prompt": prompt, **_greedy(max_tokens), **({"logprobs": 0} if per_token else {})}


def completion_ids(model: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    """`completion` (per token) on a prompt of token ids, each generated token named by its id in the
    logprobs (vLLM's `return_tokens_as_token_ids`), which `stream` collects into `Sample.token_ids`."""
    return {**completion(model, "", max_tokens, True), "prompt": ids, "return_tokens_as_token_ids": True}


def chat_body(
    model: str, messages: list[dict[str, str]], max_tokens: int, per_token: bool = False
) -> dict[str, Any]:
    """A streaming /v1/chat/completions body (`per_token`: as for `completion`)."""
    return {
        "model": model,
        "messages": messages,
        **_greedy(max_tokens),
        **({"logprobs": True} if per_token else {}),
    }


def _greedy(max_tokens: int) -> dict[str, Any]:
    return {
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip


TOKEN_ID = "token_id:"  # a logprob entry's name for a token by id (vLLM's `return_tokens_as_token_ids`)


def has_token(chunk: dict[str, Any]) -> bool:
    """Does this chunk carry a generated token (its text, or its logprobs when the text is held back)?"""
    return any(c.get("logprobs") for c in chunk.get("choices") or []) or bool(chunk_text(chunk))


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text of one SSE chunk: chat `delta.content` or completions `text`."""
    parts = []
    for choice in chunk.get("choices") or []:
        parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(parts)


def chunk_token_ids(chunk: dict[str, Any]) -> list[int]:
    """The generated ids a completions chunk names in its logprobs (`return_tokens_as_token_ids`)."""
    names = [t for c in chunk.get("choices") or [] for t in (c.get("logprobs") or {}).get("tokens") or []]
    return [int(name[len(TOKEN_ID) :]) for name in names if name.startswith(TOKEN_ID)]


async def stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Sample:
    """POST a streaming request; TTFT is the first chunk carrying a token, gaps are between such chunks."""
    sample, last, text = Sample(0, float("nan"), start=time.perf_counter()), None, []
    async with client.stream("POST", path, json=body, headers=headers or {}) as r:
        sample.headers = time.perf_counter() - sample.start
        if r.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now, chunk = time.perf_counter(), json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{path}: error event {chunk['error']}")
            if chunk.get("usage"):
                sample.prompt_tokens = chunk["usage"]["prompt_tokens"]
                sample.completion_tokens = chunk["usage"]["completion_tokens"]
                details = chunk["usage"].get("prompt_tokens_details") or {}
                sample.cached_tokens = int(details.get("cached_tokens") or 0)
            text.append(chunk_text(chunk))
            sample.token_ids.extend(chunk_token_ids(chunk))
            if has_token(chunk):
                if last is None:
                    sample.ttft = now - sample.start
                else:
                    sample.gaps.append(now - last)
                last = now
    sample.end, sample.text = time.perf_counter(), "".join(text)
    return sample


@dataclass(frozen=True)
class Job:
    """One client's requests: the same body sent from `start_at` (a perf_counter time) once, or again and
    again until `until`. With `vary`, each completions prompt gets a unique prefix, so no request
    resumes from another's checkpoints."""

    path: str
    body: dict[str, Any]
    start_at: float = 0.0
    until: float = 0.0
    vary: bool = False
    tag: str = ""
    headers: dict[str, str] = field(default_factory=dict)


def _body(job: Job, n: int) -> dict[str, Any]:
    if not job.vary:
        return job.body
    return {**job.body, "prompt": f"{job.tag} {n} {time.perf_counter_ns()} {job.body['prompt']}"}


async def _run_job(client: httpx.AsyncClient, job: Job) -> list[Sample]:
    await asyncio.sleep(max(0.0, job.start_at - time.perf_counter()))
    samples: list[Sample] = []
    while not samples or time.perf_counter() < job.until:
        sample = await stream(client, job.path, _body(job, len(samples)), job.headers)
        samples.append(replace(sample, tag=job.tag, text=""))
    return samples


async def _run_jobs(base_url: str, jobs: list[Job]) -> list[Sample]:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=base_url, timeout=1800, limits=limits) as client:
        results = await asyncio.gather(*(_run_job(client, job) for job in jobs))
    return [s for r in results for s in r]


def run_jobs(base_url: str, jobs: list[Job]) -> list[Sample]:
    """All jobs concurrently in this process (the client processes' entry point)."""
    return asyncio.run(_run_jobs(base_url, jobs))


async def _get(base_url: str, path: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        (await client.get(path)).raise_for_status()


def _ready(base_url: str) -> None:
    """Warm a client process: one request through the code a job takes. A process's first request pays
    for lazy imports and set-up (25 ms on this project's CPU, ~100 ms on the GPU machine), which fell on
    whichever timed request came first to it: a lone stream's every request (its TTFT 100 ms, the server's
    phases 5 ms)."""
    time.sleep(0.3)  # long enough that each warm-up call lands on its own process
    asyncio.run(_get(base_url, "/health"))


class Clients:
    """Jobs spread round-robin over `procs` spawned client processes (in this process when procs is 1)."""

    def __init__(self, base_url: str, procs: int) -> None:
        self.base_url, self.procs = base_url, procs
        self.pool = ProcessPoolExecutor(procs, mp_context=get_context("spawn")) if procs > 1 else None
        if self.pool is not None:
            for f in [self.pool.submit(_ready, base_url) for _ in range(procs)]:
                f.result()
        else:
            asyncio.run(_get(base_url, "/health"))

    def run(self, jobs: list[Job]) -> list[Sample]:
        if self.pool is None:
            return run_jobs(self.base_url, jobs)
        parts = [jobs[i :: self.procs] for i in range(self.procs)]
        futures = [self.pool.submit(run_jobs, self.base_url, p) for p in parts if p]
        return [s for f in futures for s in f.result()]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, newline-terminated."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


@dataclass
class Report:
    """Printed and appended to `out` table by table, so a run cut short keeps what it measured."""

    out: Path

    def write(self, lines: list[str]) -> None:
        print("\n".join(lines), flush=True)
        with self.out.open("a") as f:
            f.write("\n".join(lines) + "\n")

    def table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        self.write(["", f"### {title}", "", *markdown(header, rows).splitlines()])


def copy_demo_tokenizer(directory: Path) -> Path:
    """The bundled demo model's tokenizer and chat template, next to a model written by a bench."""
    import shutil

    from server.model.defaults import bundled_model_dir

    for name in TOKENIZER_FILES:
        shutil.copy(bundled_model_dir() / name, directory / name)
    return directory


def demo_vocab() -> int:
    from server.model.defaults import bundled_model_dir

    return int(json.loads((bundled_model_dir() / "config.json").read_text())["vocab_size"])


def save_with_demo_tokenizer(model: MambaLM, directory: Path) -> Path:
    """`model` in the transformers layout (bf16 on a GPU, as it is on CPU) plus the demo tokenizer."""
    import torch

    from server.model.export import save_pretrained

    cuda = model.backbone.embedding.weight.is_cuda
    save_pretrained(model, directory, fmt="hf", dtype=torch.bfloat16 if cuda else None)
    return copy_demo_tokenizer(directory)


def write_random_model(directory: Path, shape: str = "mamba2-130m") -> Path:
    """A random-weight Mamba2 of a published shape with the bundled demo model's tokenizer and chat template
    (its tokens are nearly all ASCII, so random output still streams as text), built on the GPU when there
    is one and saved in bf16 there (fp32 on CPU)."""
    import torch

    from server.model.config import ModelConfig
    from server.model.lm import MambaLM

    d_model, n_layer = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = MambaLM(ModelConfig(arch="mamba2", d_model=d_model, n_layer=n_layer, vocab_size=demo_vocab()))
    return save_with_demo_tokenizer(model, directory)


def phase_totals(base_url: str) -> PhaseSums:
    """The server's `tssc_request_phase_seconds` so far: per phase, (sum of seconds, count)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {p: [0.0, 0.0] for p in PHASES}
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=30).text):
        for s in family.samples:
            if s.name.startswith("tssc_request_phase_seconds_") and s.labels.get("phase") in out:
                if s.name.endswith("_sum"):
                    out[s.labels["phase"]][0] = s.value
                elif s.name.endswith("_count"):
                    out[s.labels["phase"]][1] = s.value
    return {p: (v[0], v[1]) for p, v in out.items()}


def phase_delta(before: PhaseSums, after: PhaseSums) -> PhaseSums:
    """What the requests between two `phase_totals` spent per phase: (seconds, observations)."""
    return {p: (after[p][0] - before[p][0], after[p][1] - before[p][1]) for p in PHASES}


def phase_sum(windows: list[PhaseSums]) -> PhaseSums:
    """Several windows' `phase_delta`s added up, per phase."""
    return {p: (sum(w[p][0] for w in windows), sum(w[p][1] for w in windows)) for p in PHASES}


def phase_cells(sums: PhaseSums) -> list[str]:
    """Mean ms per observation of each phase ("-" where none was observed)."""
    return [f"{1000 * total / count:.2f}" if count else "-" for total, count in sums.values()]


def emit(table: str, out: Path | None) -> None:
    """Print a bench's markdown table, and append it to `out` when given."""
    print(table)
    if out is not None:
        with out.open("a") as f:
            f.write("\n" + table)


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds of a process so far: all its threads, and its main thread (the event loop)."""

    process: float
    loop: float

    @classmethod
    def of(cls, pid: int) -> CpuTimes:
        """All threads from `/proc/PID/stat` (clock ticks), the main thread from its schedstat (ns)."""
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime
        loop_ns = int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0])
        return cls(ticks, loop_ns / 1e9)

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.process - other.process, self.loop - other.loop)

    def per(self, count: int) -> CpuTimes:
        return CpuTimes(self.process / max(1, count), self.loop / max(1, count))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
