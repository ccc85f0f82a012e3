"""Follow-up-turn TTFT on CPU: state cache vs --no-cache, at conversation lengths 512, 2k and 8k tokens.

Starts two real servers (uvicorn subprocesses on loopback) on the same model, one with the cache and
one with `--no-cache`. For each length it sends turn 1 (a user message of about L tokens), then
times turn 2 (turn 1 + its answer + a short question) as a streaming request: TTFT is the time to
the first generated chunk. Cache and no-cache run in this one process, so the ratio compares like
with like. Prints a markdown table and appends it to BENCHMARKS.md.

    .venv/bin/python bench/ttft_cpu.py [--model DIR] [--lengths 512 2048 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.settings import default_model_path  # noqa: E402
from tests.integration.server_proc import ServerProc, make_tiny_model, start_server  # noqa: E402

log = logging.getLogger("bench.ttft_cpu")
WORDS = [
    "the",
    "state",
    "of",
    "a",
    "mamba",
    "model",
    "has",
    "a",
    "constant",
    "size",
    "so",
    "a",
    "long",
    "chat",
    "costs",
    "nothing",
    "to",
    "keep",
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _text_of_tokens(client: httpx.Client, model: str, n_tokens: int) -> str:
    """User text whose chat rendering is about `n_tokens` tokens (measured by the server)."""
    text = " ".join(WORDS[i % len(WORDS)] for i in range(n_tokens))
    for _ in range(4):
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
        got = client.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"]
        text = text[: max(1, int(len(text) * n_tokens / got))]
    return text


def _ttft(client: httpx.Client, body: dict[str, object], session: str) -> float:
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-Session-ID": session}) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["delta"].get("content") or choice["finish_reason"]:
                return time.perf_counter() - start
    raise RuntimeError("no token came back")


def follow_up_ttft(srv: ServerProc, model: str, text: str, session: str) -> tuple[float, int]:
    """TTFT of turn 2 of a conversation whose turn 1 is `text`; and turn 2's cached tokens."""
    with httpx.Client(base_url=srv.base_url, timeout=600) as client:
        turn1 = [{"role": "user", "content": text}]
        base = {"model": model, "temperature": 0, "max_tokens": 16, "stop_token_ids": [0, 2, 3, 4]}
        r1 = client.post(
            "/v1/chat/completions", json={**base, "messages": turn1}, headers={"X-Session-ID": session}
        )
        answer = r1.json()["choices"][0]["message"]
        turn2 = [*turn1, answer, {"role": "user", "content": "And then?"}]
        seconds = _ttft(client, {**base, "messages": turn2, "max_tokens": 1, "stream": True}, session)
        usage = client.post(
            "/v1/chat/completions",
            json={**base, "messages": turn2, "max_tokens": 1},
            headers={"X-Session-ID": session},
        ).json()["usage"]
    return seconds, int(usage["prompt_tokens_details"]["cached_tokens"])


def run(model_dir: Path, lengths: list[int], repeats: int) -> str:
    name = "bench"
    common = ["--model", str(model_dir), "--served-model-name", name, "--max-prompt-tokens", "65536"]
    rows = []
    with (
        start_server([*common], timeout=600) as cached,
        start_server([*common, "--no-cache"], timeout=600) as plain,
    ):
        with httpx.Client(base_url=plain.base_url, timeout=600) as client:
            texts = {n: _text_of_tokens(client, name, n) for n in lengths}
        for n in lengths:
            with_cache, without, hits = [], [], []
            for r in range(repeats):
                t, c = follow_up_ttft(cached, name, texts[n], f"cache-{n}-{r}")
                with_cache.append(t)
                hits.append(c)
                without.append(follow_up_ttft(plain, name, texts[n], f"plain-{n}-{r}")[0])
            a, b = statistics.median(with_cache), statistics.median(without)
            rows.append((n, a, b, b / a, min(hits)))
            log.info("length %d: cache %.4fs, no cache %.4fs (x%.1f)", n, a, b, b / a)
    return _table(model_dir, rows, repeats)


def _table(model_dir: Path, rows: list[tuple[int, float, float, float, int]], repeats: int) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        f"### Follow-up-turn TTFT on CPU ({today})",
        "",
        f"CPU: {cpu_name()}; model: `{model_dir.name}`; median of {repeats}; `bench/ttft_cpu.py`.",
        "",
        "| conversation tokens | TTFT, cache (s) | TTFT, --no-cache (s) | speed-up | cached tokens (turn 2) |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {a:.4f} | {b:.4f} | {r:.1f}x | {c} |" for n, a, b, r, c in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="model dir (default: bundled demo, else a seeded tiny)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model_dir = args.model
    if model_dir is None:
        demo = Path(default_model_path())
        model_dir = demo if (demo / "config.json").exists() else None
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            model_dir = make_tiny_model(Path(tmp) / "seeded-mamba2-d128-l4", d_model=128, n_layer=4)
        table = run(model_dir, args.lengths, args.repeats)
    print(table)
    with args.out.open("a") as out:
        out.write("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
