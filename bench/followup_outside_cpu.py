"""How much of a follow-up's TTFT lies outside the server's phases, with the engine in a thread and in its own
process (`--engine-process`), on the bundled model over HTTP (CPU).

One real server per mode (cache on). Per conversation length, one first turn of that many tokens, then
`--repeats` follow-ups, each the conversation so far plus its answer and a short user message (a chat
client's chain of turns, streamed, max_tokens 1). Each follow-up's client TTFT is split into the server's
phases (`tssc_request_phase_seconds`: parse, tokenize, queue, restore, prefill, first_token) and the rest:
the client's JSON, the HTTP round trip, and with the process the prompt's way to the core and the first
token's way back. That rest should not grow with the conversation.

    .venv/bin/python bench/followup_outside_cpu.py [--lengths 2048,32768] [--repeats 5] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (  # noqa: E402
    PHASES,
    PhaseSums,
    Texts,
    chat_body,
    emit,
    markdown,
    phase_delta,
    phase_totals,
    stream,
)
from bench.e2e_bench import CHAT, COMPLETIONS  # noqa: E402
from bench.ttft_cpu import cpu_name  # noqa: E402
from server.settings import default_model_path  # noqa: E402
from tests.integration.server_proc import start_server  # noqa: E402

MODES = {"thread": [], "process": ["--engine-process"]}
SHOWN = ("parse", "tokenize", "restore")  # the phases that grew with the conversation


async def follow_ups(
    url: str, model: str, texts: Texts, length: int, repeats: int
) -> list[tuple[float, PhaseSums]]:
    """(client TTFT, the server's phases) of each follow-up, in seconds."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        await stream(client, COMPLETIONS, {"model": model, "prompt": "warm", "max_tokens": 1, "stream": True})
        session = f"outside-{length}"
        rng, headers = random.Random(session), {"X-Session-ID": session}
        messages = [{"role": "user", "content": texts.text(length, rng)}]
        first = await stream(client, CHAT, chat_body(model, messages, 4, True), headers)
        messages.append({"role": "assistant", "content": first.text})
        for _ in range(repeats):
            messages.append({"role": "user", "content": texts.text(16, rng)})
            before = phase_totals(url)
            turn = await stream(client, CHAT, chat_body(model, messages, 1, True), headers)
            phases = phase_delta(before, phase_totals(url))
            out.append((turn.ttft, phases))
            messages.append({"role": "assistant", "content": turn.text})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,32768", help="comma-separated conversation tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    model = Path(default_model_path())
    texts = Texts(model)
    rows = []
    for mode, flags in MODES.items():
        limit = str(max(lengths) + 8192)
        with start_server(["--model", str(model), "--max-prompt-tokens", limit, *flags], timeout=600) as srv:
            name = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["id"]
            for length in lengths:
                runs = asyncio.run(follow_ups(srv.base_url, name, texts, length, args.repeats))
                inside = [sum(ph[p][0] for p in PHASES) for _, ph in runs]
                cells = [
                    statistics.median(t for t, _ in runs),
                    *(statistics.median(ph[p][0] for _, ph in runs) for p in SHOWN),
                    statistics.median(inside),
                    statistics.median(t - s for (t, _), s in zip(runs, inside, strict=True)),
                ]
                rows.append([mode, f"{length:,}", *(f"{1e3 * c:.1f}" for c in cells)])
    header = ["engine", "conversation tokens", "follow-up TTFT p50 ms", *(f"{p} p50 ms" for p in SHOWN),
              "server phases p50 ms", "outside p50 ms"]  # fmt: skip
    title = (
        f"#### Follow-up TTFT outside the server's phases ({cpu_name()}, demo-mamba2, {args.repeats} each)"
    )
    table = f"{title}\n\n{markdown(header, rows)}"
    emit(table, args.out)


if __name__ == "__main__":
    main()
