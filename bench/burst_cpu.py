"""A burst of simultaneous short completions over HTTP on the bundled demo model (CPU): the client's TTFT
and time to the response headers, the server process's CPU time per request (and per streamed token), and
the server's mean TTFT phases (`tssc_request_phase_seconds`), per round. What it isolates is the HTTP side
of a burst (parse, tokenize, the SSE stream), which the GPU benches cannot time apart from the model.

    python -m bench.burst_cpu [--prompts 64] [--tokens 200] [--new-tokens 1] [--rounds 4]
                              [--flags " --engine-process"] [--out BENCHMARKS.md]

The CPU columns are the server process's (all its threads: `/proc/PID/stat`, in clock ticks) and its
event loop's (the main thread: `/proc/PID/task/PID/schedstat`, in ns) over the round, divided by the
round's requests and by its streamed tokens. With `--engine-process` that process is the front end alone
(the engine core is a process of its own); in thread mode it includes the model's work.
"""

from __future__ import annotations

import argparse
import random
import shlex
import time
from pathlib import Path

import httpx

from bench._common import (
    PHASES,
    Clients,
    CpuTimes,
    Job,
    Sample,
    Stats,
    Texts,
    completion,
    emit,
    markdown,
    ms,
    pct,
    phase_cells,
    phase_delta,
    phase_totals,
)
from server.model.defaults import bundled_model_dir
from tests.integration.server_proc import start_server

COMPLETIONS = "/v1/completions"


def rounds(
    prompts: int, tokens: int, count: int, procs: int, new_tokens: int = 1, flags: list[str] | None = None
) -> list[list[str]]:
    texts, rng, rows = Texts(bundled_model_dir()), random.Random(0), []
    with start_server(["--max-num-seqs", str(prompts), *(flags or [])]) as srv:
        model = httpx.get(srv.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
        clients = Clients(srv.base_url, procs)
        try:
            for r in range(count):
                start = time.perf_counter() + 0.5
                jobs = [
                    Job(COMPLETIONS, completion(model, texts.text(tokens, rng), new_tokens), start)
                    for _ in range(prompts)
                ]
                before, cpu = phase_totals(srv.base_url), CpuTimes.of(srv.proc.pid)
                samples = clients.run(jobs)
                cpu = CpuTimes.of(srv.proc.pid) - cpu
                sums = phase_delta(before, phase_totals(srv.base_url))
                rows.append(
                    [str(r + 1), *_client_cells(samples), *_cpu_cells(cpu, samples), *phase_cells(sums)]
                )
        finally:
            clients.close()
    return rows


def _client_cells(samples: list[Sample]) -> list[str]:
    ttft, heads = pct([s.ttft for s in samples], 0.5), pct([s.headers for s in samples], 0.5)
    stats = Stats.of([samples])
    return [ms(ttft), ms(heads), f"{stats.tok_s:,.0f}", ms(stats.itl50, 2)]


def _cpu_cells(cpu: CpuTimes, samples: list[Sample]) -> list[str]:
    """Per request (ms) and per streamed token (µs): the process's, then the event loop's."""
    req, tok = cpu.per(len(samples)), cpu.per(sum(s.completion_tokens for s in samples))
    return [
        f"{req.process * 1e3:.2f}",
        f"{req.loop * 1e3:.2f}",
        f"{tok.process * 1e6:.0f}",
        f"{tok.loop * 1e6:.0f}",
    ]


HEADER = [
    "round", "client TTFT p50 ms", "client headers p50 ms", "completion tok/s", "ITL p50 ms",
    "server CPU ms / request", "loop CPU ms / request", "server CPU µs / token", "loop CPU µs / token",
    *PHASES,
]  # fmt: skip


def table(rows: list[list[str]]) -> str:
    return markdown(HEADER, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=1, help="max_tokens of each streamed completion")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--flags", default="", help="extra server flags (start with a space)")
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    flags = shlex.split(args.flags)
    rows = rounds(args.prompts, args.tokens, args.rounds, args.client_procs, args.new_tokens, flags)
    emit(table(rows), args.out)


if __name__ == "__main__":
    main()
