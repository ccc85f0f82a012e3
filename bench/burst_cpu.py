"""A burst of simultaneous short completions over HTTP on the bundled demo model (CPU): the client's TTFT
and time to the response headers, and the server's mean TTFT phases (`tssc_request_phase_seconds`), per
round. What it isolates is the HTTP side of a burst (parse, tokenize), which the GPU benches cannot time
apart from the model.

    python -m bench.burst_cpu [--prompts 64] [--tokens 200] [--rounds 4] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import httpx

from bench._common import (
    PHASES,
    Clients,
    Job,
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


def rounds(prompts: int, tokens: int, count: int, procs: int) -> list[list[str]]:
    texts, rng, rows = Texts(bundled_model_dir()), random.Random(0), []
    with start_server(["--max-num-seqs", str(prompts)]) as srv:
        model = httpx.get(srv.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
        clients = Clients(srv.base_url, procs)
        try:
            for r in range(count):
                start = time.perf_counter() + 0.5
                jobs = [
                    Job(COMPLETIONS, completion(model, texts.text(tokens, rng), 1), start)
                    for _ in range(prompts)
                ]
                before = phase_totals(srv.base_url)
                samples = clients.run(jobs)
                sums = phase_delta(before, phase_totals(srv.base_url))
                ttft, heads = pct([s.ttft for s in samples], 0.5), pct([s.headers for s in samples], 0.5)
                rows.append([str(r + 1), ms(ttft), ms(heads), *phase_cells(sums)])
        finally:
            clients.close()
    return rows


def table(rows: list[list[str]]) -> str:
    return markdown(["round", "client TTFT p50 ms", "client headers p50 ms", *PHASES], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    emit(table(rounds(args.prompts, args.tokens, args.rounds, args.client_procs)), args.out)


if __name__ == "__main__":
    main()
