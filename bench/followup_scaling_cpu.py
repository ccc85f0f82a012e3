"""Does a follow-up turn cost O(new tokens)? TTFT of a follow-up to a ~2k-token, ~13-message conversation
against one to a ~15k-token, ~100-message conversation, on the bundled model over HTTP (issue #12).

One real server (cache on). Each conversation is built turn by turn in its own session, the way a chat
client sends it (the whole conversation every turn, the server's own replies included); then follow-ups
(the conversation plus one short user message, streamed, max_tokens 1) are timed, alternating between the
two conversations so that both see the same machine. The slope, (TTFT_long - TTFT_short) per 1k extra
conversation tokens, is what must stay small: the prompt's new tokens are the same in both. Also prints
the server's own mean per phase (`tssc_request_phase_seconds`) over the timed follow-ups.

    .venv/bin/python bench/followup_scaling_cpu.py [--repeats 21] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import PHASES, PhaseSums, emit, phase_cells, phase_delta, phase_sum, phase_totals  # noqa: E402
from bench.ttft_cpu import WORDS, cpu_name  # noqa: E402
from server.settings import default_model_path  # noqa: E402
from tests.integration.server_proc import start_server  # noqa: E402

MODEL = "bench"
SHAPES = {"short": (13, 2_000), "long": (100, 15_000)}  # (messages, conversation tokens)


def _words(n: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i) % len(WORDS)] for i in range(n))


def _post(client: httpx.Client, messages: list[dict[str, str]], session: str, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 12, **extra}
    resp = client.post("/v1/chat/completions", json=body, headers={"X-Session-ID": session})
    resp.raise_for_status()
    out: dict[str, Any] = resp.json()
    return out


def build(client: httpx.Client, messages: int, tokens: int, session: str) -> tuple[list[dict[str, str]], int]:
    """A conversation of `messages` messages (user, assistant, ...; ends with an assistant reply) of about
    `tokens` prompt tokens, grown turn by turn on the server; returns it and its prompt tokens."""
    words = max(1, int(tokens / (messages // 2) * 0.8))  # the demo BPE: ~1.2 tokens a word, plus replies
    conv: list[dict[str, str]] = []
    prompt = 0
    for turn in range(messages // 2):
        conv.append({"role": "user", "content": _words(words, turn)})
        reply = _post(client, conv, session, stop_token_ids=[0, 2, 3, 4])
        conv.append(reply["choices"][0]["message"])
        prompt = int(reply["usage"]["prompt_tokens"])
    return conv, prompt


def ttft(client: httpx.Client, messages: list[dict[str, str]], session: str) -> tuple[float, int]:
    """(seconds to the first streamed token, cached prompt tokens) of one follow-up."""
    body = {"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    first, cached = 0.0, -1
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-Session-ID": session}) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if not first and any(c["delta"].get("content") or c["finish_reason"] for c in chunk["choices"]):
                first = time.perf_counter() - start  # the first token (not the opening role chunk)
            if chunk.get("usage"):
                cached = int(chunk["usage"]["prompt_tokens_details"]["cached_tokens"])
    return first or time.perf_counter() - start, cached


def run(model_dir: Path, repeats: int) -> str:
    args = ["--model", str(model_dir), "--served-model-name", MODEL, "--max-prompt-tokens", "32768"]
    with start_server(args, timeout=600) as srv, httpx.Client(base_url=srv.base_url, timeout=600) as client:
        convs = {name: build(client, m, t, f"scaling-{name}") for name, (m, t) in SHAPES.items()}
        times: dict[str, list[float]] = {name: [] for name in SHAPES}
        windows: dict[str, list[PhaseSums]] = {name: [] for name in SHAPES}
        cached: dict[str, int] = {}
        for name in SHAPES:  # warm-up turn of each (first follow-up pays one-time costs)
            ttft(client, [*convs[name][0], {"role": "user", "content": "warm up"}], f"scaling-{name}")
        for r in range(repeats):
            for name in SHAPES:
                before = phase_totals(srv.base_url)
                question = {"role": "user", "content": f"And then? ({r})"}
                seconds, cached[name] = ttft(client, [*convs[name][0], question], f"scaling-{name}")
                times[name].append(seconds)
                windows[name].append(phase_delta(before, phase_totals(srv.base_url)))
    phases = {name: " | ".join(phase_cells(phase_sum(windows[name]))) for name in SHAPES}
    return _table(model_dir, convs, times, cached, phases, repeats)


def _table(
    model_dir: Path,
    convs: dict[str, tuple[list[dict[str, str]], int]],
    times: dict[str, list[float]],
    cached: dict[str, int],
    phases: dict[str, str],
    repeats: int,
) -> str:
    med = {n: statistics.median(t) * 1000 for n, t in times.items()}
    tokens = {n: c[1] for n, c in convs.items()}
    # the median of paired differences: each long follow-up ran right after its short one, so drift in the
    # machine's speed cancels out
    diff = statistics.median(1000 * (b - a) for a, b in zip(times["short"], times["long"], strict=True))
    slope = diff / ((tokens["long"] - tokens["short"]) / 1000)
    lines = [
        f"### Follow-up TTFT against conversation length on CPU ({datetime.date.today().isoformat()})",
        "",
        f"CPU: {cpu_name()}; model `{model_dir.name}`, cache on; median of {repeats} follow-ups each, "
        "interleaved; `bench/followup_scaling_cpu.py`. Phase columns: the server's mean per phase "
        "(`tssc_request_phase_seconds`) over the timed follow-ups, ms.",
        "",
        "| conversation | messages | prompt tokens | cached | follow-up TTFT p50 (ms) | "
        + " | ".join(PHASES)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(PHASES),
    ]
    for name in SHAPES:
        n_msgs = len(convs[name][0]) + 1
        lines.append(
            f"| {name} | {n_msgs} | {tokens[name]} | {cached[name]} | {med[name]:.2f} | {phases[name]} |"
        )
    lines += [
        "",
        f"Growth (median of the {repeats} paired differences, {diff:.2f} ms): "
        f"**{slope:.3f} ms per 1k conversation tokens** (target <= 0.25).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path(default_model_path()))
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args(argv)
    table = run(args.model, args.repeats)
    emit(table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
