"""100 conversations opening with the same ~1k-token system prompt, with and without prefix sharing (#13).

One real server. Phase "isolated" sends each conversation's first turn with its own `cache_salt` (its own
prefix tree: what every conversation got before #13); phase "shared" sends them plainly (one tree for the
API key). For each phase: first-turn TTFT p50/p99 (streamed), the conversations that reported
`cached_tokens` >= the system prompt's tokens, prompt tokens prefilled (`tssc_prompt_tokens_total{source=
"computed"}`), and the checkpoints and bytes the cache added (`tssc_state_cache_checkpoints`,
`tssc_state_cache_bytes`, hot + cold). Runs on CPU with the bundled model, or with `--model` anywhere.

    .venv/bin/python bench/shared_prefix.py [--conversations 100] [--out BENCHMARKS.md]
    python -m bench.shared_prefix --shape mamba2-2.7b     # on a GPU: random weights of a published shape
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import emit, write_random_model  # noqa: E402
from bench.ttft_cpu import WORDS, cpu_name  # noqa: E402
from server.settings import default_model_path  # noqa: E402
from tests.integration.conftest import metric  # noqa: E402
from tests.integration.server_proc import ServerProc, start_server  # noqa: E402

MODEL = "bench"


def system_prompt(client: httpx.Client, tokens: int) -> tuple[str, int]:
    """A system prompt of about `tokens` tokens, and its exact count (a request of it alone, minus the
    generation prompt, measured against a one-word one)."""
    text = " ".join(WORDS[i % len(WORDS)] for i in range(tokens))
    count = lambda t: int(_post(client, [{"role": "system", "content": t}], None)["usage"]["prompt_tokens"])
    for _ in range(3):
        text = text[: max(1, int(len(text) * tokens / count(text)))]
    return text, count(text) - count("x")


def _post(client: httpx.Client, messages: list[dict[str, str]], salt: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0}
    if salt is not None:
        body["cache_salt"] = salt
    resp = client.post("/v1/chat/completions", json=body)
    resp.raise_for_status()
    out: dict[str, Any] = resp.json()
    return out


def first_turn(client: httpx.Client, system: str, i: int, salt: str | None) -> tuple[float, int]:
    """(TTFT in seconds, cached prompt tokens) of conversation i's first turn, streamed."""
    question = f"Question {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(12))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0}
    body |= {"stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
    if salt is not None:
        body["cache_salt"] = salt
    start, ttft, cached = time.perf_counter(), 0.0, -1
    with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"X-Session-ID": f"c{i}-{salt}"}
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if not ttft and any(c.get("logprobs") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                cached = int(chunk["usage"]["prompt_tokens_details"]["cached_tokens"])
    return ttft, cached


def _cache_totals(srv: ServerProc) -> tuple[float, float, float]:
    """(prompt tokens computed, checkpoints, bytes) over the hot and cold tiers."""
    tiers = ("hot", "cold")
    checkpoints = max(metric(srv.base_url, "tssc_state_cache_checkpoints", tier=t) for t in tiers)
    held = sum(metric(srv.base_url, "tssc_state_cache_bytes", tier=t) for t in tiers)
    return metric(srv.base_url, "tssc_prompt_tokens_total", source="computed"), checkpoints, held


def phase(
    srv: ServerProc, client: httpx.Client, system: str, n: int, sys_tokens: int, salted: bool
) -> list[str]:
    before = _cache_totals(srv)
    runs = [first_turn(client, system, i, f"conv-{i}" if salted else None) for i in range(n)]
    after = _cache_totals(srv)
    ttfts = sorted(1000 * t for t, _ in runs)
    reused = sum(1 for _, c in runs if c >= sys_tokens)
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
    computed, checkpoints, held = (a - b for a, b in zip(after, before, strict=True))
    name = "isolated (a cache_salt per conversation)" if salted else "shared (one tree per key)"
    return [name, f"{statistics.median(ttfts):.1f}", f"{p99:.1f}", f"{reused} / {n}", f"{computed:,.0f}",
            f"{checkpoints:,.0f}", f"{held / 2**20:,.1f}"]  # fmt: skip


def run(model_dir: Path, n: int, tokens: int) -> str:
    args = ["--model", str(model_dir), "--served-model-name", MODEL, "--max-num-seqs", "8"]
    with start_server(args, timeout=600) as srv, httpx.Client(base_url=srv.base_url, timeout=600) as client:
        system, sys_tokens = system_prompt(client, tokens)
        rows = [phase(srv, client, system, n, sys_tokens, salted) for salted in (True, False)]
    head = ["phase", "first-turn TTFT p50 (ms)", "p99 (ms)", "cached >= system prompt", "prompt tokens prefilled",
            "checkpoints added", "MiB added (hot + cold)"]  # fmt: skip
    lines = [
        f"### {n} conversations sharing a {sys_tokens}-token system prompt ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {_machine()}; model `{model_dir.name}`; one server, `bench/shared_prefix.py`; TTFT is to the "
        "first token (logprobs on).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    return "\n".join(lines) + "\n"


def _machine() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path(default_model_path()))
    parser.add_argument(
        "--shape", help="serve random weights of this shape (bench/_common.py SHAPES) instead"
    )
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_random_model(Path(tmp) / args.shape, args.shape) if args.shape else args.model
        table = run(model, args.conversations, args.system_tokens)
    emit(table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
