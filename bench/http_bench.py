"""End to end over HTTP: `tssc serve` in a subprocess, N concurrent multi-turn chat sessions with edits and
regenerates, run with the state cache and with `--no-cache`.

    python -m bench.http_bench [--model DIR] [--sessions 8] [--turns 8] [--out BENCHMARKS.md] [--plot ttft.png]

Without --model a random-weight checkpoint of the `--shape` (mamba2-130m by default; bf16 on a GPU) with a tiny
byte-level tokenizer is written to a temporary directory. Reported per mode: TTFT p50/p99, inter-token latency p50/p99, completion tokens/s,
and the cache's hit rate per tier (from /metrics); the plot shows TTFT against the conversation length.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._common import SHAPES, Sample, pct, stream, write_random_model

WORDS = [
    "state",
    "space",
    "model",
    "cache",
    "token",
    "session",
    "prefix",
    "restore",
    "checkpoint",
    "layer",
    "kernel",
    "graph",
    "decode",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_ready(client: httpx.AsyncClient, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(1)
    raise TimeoutError("server did not become healthy")


async def chat(client: httpx.AsyncClient, model: str, session: str, messages: list[dict[str, str]]) -> Sample:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": 32,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sample = await stream(client, "/v1/chat/completions", body, {"X-Session-ID": session})
    messages.append({"role": "assistant", "content": sample.text})
    return sample


async def session(
    client: httpx.AsyncClient, model: str, sid: str, turns: int, rng: random.Random, scale: float = 1.0
) -> list[Sample]:
    """Multi-turn chat; every 4th turn regenerates the last answer, every 5th edits an earlier message.
    Message lengths are multiplied by `scale` (1.0: a 200-word system prompt, user turns of 40-200 words)."""

    def words(n: int) -> str:
        return " ".join(rng.choices(WORDS, k=max(1, round(n * scale))))

    messages = [{"role": "system", "content": words(200)}]
    samples = []
    for turn in range(turns):
        if turn % 4 == 3 and len(messages) > 2:
            messages.pop()  # regenerate: drop the last answer and resend
        elif turn % 5 == 4 and len(messages) > 3:
            messages[1]["content"] = words(60)  # edit an early user message
            messages.append({"role": "user", "content": words(40)})
        else:
            messages.append({"role": "user", "content": words(rng.randint(40, 200))})
        samples.append(await chat(client, model, sid, messages))
    return samples


async def warm_up(client: httpx.AsyncClient, model: str, n: int) -> dict[str, float]:
    """One two-turn throwaway session per slot, concurrently, then deleted: first-call costs (op
    warm-up, arena pages, graph capture) stay out of the timed run. Returns the lookup counters."""
    rngs = [random.Random(1000 + i) for i in range(n)]
    await asyncio.gather(*(session(client, model, f"warm{i}", 2, rngs[i]) for i in range(n)))
    for i in range(n):
        await client.delete(f"/v1/sessions/warm{i}")
    return lookups((await client.get("/metrics")).text)


def lookups(metrics_text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("tssc_state_cache_lookups_total{"):
            result = line.split('result="')[1].split('"')[0]
            out[result] = out.get(result, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def run_mode(
    args: argparse.Namespace, model_dir: Path, no_cache: bool
) -> tuple[list[Sample], dict[str, float], float]:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--max-num-seqs", str(args.sessions)] + (["--no-cache"] if no_cache else args.cache_args.split())
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            await wait_ready(client, proc)
            name = (await client.get("/v1/models")).json()["data"][0]["id"]
            before = await warm_up(client, name, args.sessions)
            t0 = time.perf_counter()
            rngs = [random.Random(i) for i in range(args.sessions)]
            results = await asyncio.gather(
                *(
                    session(client, name, f"s{i}", args.turns, rngs[i], args.scale)
                    for i in range(args.sessions)
                )
            )
            wall = time.perf_counter() - t0
            after = lookups((await client.get("/metrics")).text)
            hits = {k: v - before.get(k, 0.0) for k, v in after.items()}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return [s for r in results for s in r], hits, wall


def row(mode: str, samples: list[Sample], hits: dict[str, float], wall: float) -> str:
    ttft = [s.ttft for s in samples]
    gaps = [g for s in samples for g in s.gaps]
    total = sum(hits.values()) or 1.0
    rates = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(hits.items())) or "n/a"
    tokens = sum(s.completion_tokens for s in samples)
    return (
        f"| {mode} | {len(samples)} | {pct(ttft, 0.5) * 1e3:.1f} | {pct(ttft, 0.99) * 1e3:.1f} | "
        f"{pct(gaps, 0.5) * 1e3:.2f} | {pct(gaps, 0.99) * 1e3:.2f} | {tokens / wall:,.0f} | {rates} |"
    )


def plot(results: dict[str, list[Sample]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, samples in results.items():
        ax.scatter([s.prompt_tokens for s in samples], [s.ttft * 1e3 for s in samples], s=10, label=mode)
    ax.set_xlabel("conversation length (prompt tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument(
        "--shape", choices=list(SHAPES), default="mamba2-130m", help="random model without --model"
    )
    parser.add_argument(
        "--cache-args", default="", help="extra `tssc serve` flags of the cache mode, e.g. budgets"
    )
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument(
        "--scale", type=float, default=1.0, help="message length multiplier (longer conversations)"
    )
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--plot", type=Path, default=Path("bench/ttft_vs_length.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_random_model(Path(tmp) / f"random-{args.shape}", args.shape)
        results, lines = {}, []
        for mode, no_cache in (("cache", False), ("no-cache", True)):
            samples, hits, wall = asyncio.run(run_mode(args, model_dir, no_cache))
            results[mode] = samples
            lines.append(row(mode, samples, hits, wall))
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    text = [
        "",
        f"### (d) end to end over HTTP: {card}, {args.model or 'random ' + args.shape}, "
        f"{args.sessions} sessions x {args.turns} turns, message scale {args.scale:g}",
        "",
        f"cache mode flags: `{args.cache_args or '(defaults)'}`",
        "",
        "| mode | requests | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | completion tok/s | lookups |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        f"![TTFT vs conversation length]({args.plot.name})",
    ]
    print("\n".join(text))
    plot(results, args.plot)
    with args.out.open("a") as f:
        f.write("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
