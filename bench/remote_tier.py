"""The remote tier (#15) over HTTP: a follow-up turn on the replica that served the conversation (local
hit), on a replica that never saw it (remote hit, restored from Redis), and on a `--no-cache` server
(re-prefill of the whole conversation), side by side in one run against one real redis-server.

Three real servers of one model: A and B share the Redis tier (`--remote-url`), C has no cache. For each
conversation length: `--rounds` conversations each get a first turn on A (a user message of that many
tokens), whose checkpoints A writes through to Redis; then the same follow-up is timed on A, on B and on C.
A follow-up's time is a whole `max_tokens: 1` request (its TTFT plus one token's delivery). B's
`tssc_state_cache_fetch_seconds{tier="remote"}` gives the remote fetch itself (find, GET, checksum and
token check, decode into the local tiers), `tssc_state_cache_remote_bytes_total` the blob size.

    .venv/bin/python bench/remote_tier.py [--lengths 2000] [--out BENCHMARKS.md]       # CPU, bundled model
    python -m bench.remote_tier --shape mamba2-2.7b --lengths 8000 32000 --redis-server PATH  # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import SHAPES, Texts, emit, write_random_model  # noqa: E402
from bench.ttft_cpu import cpu_name  # noqa: E402
from server.settings import default_model_path  # noqa: E402
from tests.integration.conftest import metric  # noqa: E402
from tests.integration.server_proc import ServerProc, free_port, start_server  # noqa: E402

MODEL = "bench"


@contextlib.contextmanager
def redis(binary: str, workdir: Path) -> Iterator[str]:
    """A redis-server on a loopback port (no persistence); yields its URL."""
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    try:
        import redis as client

        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(client.RedisError):
                if client.Redis(port=port).ping():
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(10)


def ask(base: str, messages: list[dict[str, str]], session: str) -> tuple[float, dict[str, Any]]:
    body = {"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    resp = httpx.post(
        base + "/v1/chat/completions", json=body, headers={"X-Session-ID": session}, timeout=600
    )
    resp.raise_for_status()
    return time.perf_counter() - started, resp.json()


def settle(base: str) -> None:
    """Until the replica's remote writes have stopped for a second (its writer thread is idle)."""
    last, still = -1.0, 0
    while still < 10:
        now = metric(base, "tssc_state_cache_remote_bytes_total", direction="written")
        still = still + 1 if now == last else 0
        last = now
        time.sleep(0.1)


def measure(a: ServerProc, b: ServerProc, c: ServerProc, texts: Texts, length: int, rounds: int) -> list[str]:
    rng = random.Random(length)
    times: dict[str, list[float]] = {"local": [], "remote": [], "prefill": []}
    cached: dict[str, list[int]] = {"local": [], "remote": [], "prefill": []}
    fetch_before = _remote_fetch(b)
    for r in range(rounds):
        session = f"len{length}-r{r}"
        first = [{"role": "user", "content": texts.text(length, rng)}]
        _, reply = ask(a.base_url, first, session)
        settle(a.base_url)
        follow = [
            *first,
            {"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
            {"role": "user", "content": texts.text(32, rng)},
        ]
        for name, srv in (("remote", b), ("local", a), ("prefill", c)):
            seconds, out = ask(srv.base_url, follow, session)
            times[name].append(seconds)
            cached[name].append(int(out["usage"]["prompt_tokens_details"]["cached_tokens"]))
    fetches, fetch_sum, read = (x - y for x, y in zip(_remote_fetch(b), fetch_before, strict=True))
    p50 = {k: statistics.median(v) for k, v in times.items()}
    blob = read / fetches if fetches else float("nan")
    return [
        f"{length:,}",
        f"{p50['local'] * 1e3:.1f} ms",
        f"{p50['remote'] * 1e3:.1f} ms",
        f"{p50['prefill'] * 1e3:.1f} ms",
        f"{fetch_sum / fetches * 1e3:.1f} ms" if fetches else "-",
        f"{blob / 2**20:.2f} MiB",
        f"{p50['prefill'] / p50['remote']:.1f}x",
        f"{min(cached['remote'])}-{max(cached['remote'])}",
    ]


def _remote_fetch(srv: ServerProc) -> tuple[float, float, float]:
    base = srv.base_url
    return (
        metric(base, "tssc_state_cache_fetch_seconds_count", tier="remote"),
        metric(base, "tssc_state_cache_fetch_seconds_sum", tier="remote"),
        metric(base, "tssc_state_cache_remote_bytes_total", direction="read"),
    )


def breakdown(url: str, shape: str, rounds: int, length: int = 32000, dtype: str | None = None) -> list[str]:
    """The remote fetch of one checkpoint of `shape`, step by step, at the cache level (no server): the
    write-through (capture until it is in Redis), a raw GET, verification (checksum, tokens, parse) and the
    whole `prefetch` (find, GET, verify, decode into the local tiers), then the restore into a slot."""
    import torch

    from bench._common import demo_vocab
    from cache import CacheConfig, RemoteConfig, StateCache
    from cache.remote import decode_blob, prefix_hashes
    from server.model.config import ModelConfig
    from server.model.state import StatePool

    d_model, n_layer = SHAPES[shape]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = ModelConfig(arch="mamba2", d_model=d_model, n_layer=n_layer, vocab_size=demo_vocab())
    pool = StatePool(cfg, 1, torch.bfloat16 if cuda else torch.float32, device)
    spec = pool.spec()
    remote = RemoteConfig(url, budget=16 * 2**30, prefix="tssc-breakdown", dtype=dtype)  # type: ignore[arg-type]

    def cache() -> StateCache:
        return StateCache(CacheConfig(2**30, 4 * 2**30, device=str(device), remote=remote), spec)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    steps: dict[str, list[float]] = {k: [] for k in ("write", "get", "verify", "prefetch", "restore")}
    nbytes = 0
    for r in range(rounds):
        writer, reader = cache(), cache()
        tokens = [r, *range(length - 1)]
        state = {n: torch.randn(shape_, device=device).to(dt) for n, (shape_, dt) in spec.items()}
        t0 = time.perf_counter()
        writer.capture("ns", "s", tokens, state, reason="finish")
        writer.flush()
        steps["write"].append(time.perf_counter() - t0)
        store = writer._remote
        assert store is not None
        client = store.client
        key = store.blob_key("ns", length, prefix_hashes(tokens, [length])[length])
        t0 = time.perf_counter()
        blob = client.get(key)
        steps["get"].append(time.perf_counter() - t0)
        assert isinstance(blob, bytes)
        nbytes = len(blob)
        t0 = time.perf_counter()
        decode_blob(blob, tokens)
        steps["verify"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert reader.prefetch("ns", "s", [*tokens, 7]) == length
        sync()
        steps["prefetch"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lease = reader.lookup("ns", "s", [*tokens, 7])
        assert lease is not None
        reader.fetch(lease, out=pool.views(0))
        reader.release(lease)
        sync()
        steps["restore"].append(time.perf_counter() - t0)
        client.delete(key)
    p50 = {k: statistics.median(v) * 1e3 for k, v in steps.items()}
    return [f"{nbytes / 2**20:.1f} MiB", *(f"{p50[k]:.1f} ms" for k in steps)]


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu_name()})"


def http_table(args: argparse.Namespace, url: str, tmp: Path) -> str:
    """Three real servers: the follow-up table over HTTP."""
    model = Path(default_model_path()) if args.shape == "demo" else write_random_model(tmp, args.shape)
    common = ["--model", str(model), "--served-model-name", MODEL]
    common += ["--max-prompt-tokens", str(max(args.lengths) + 1000), "--shutdown-grace", "1"]
    flag_sets = [[*common, "--remote-url", url, "--remote-min-tokens", "0"]] * 2 + [[*common, "--no-cache"]]
    managers = [start_server(flags, timeout=900) for flags in flag_sets]
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(m.__enter__) for m in managers]
        for manager in managers:
            stack.push(manager.__exit__)
        a, b, c = (f.result() for f in futures)
        texts = Texts(model)
        rows = [measure(a, b, c, texts, n, args.rounds) for n in args.lengths]
    header = (
        "| conversation tokens | follow-up, local hit | follow-up, remote hit | re-prefill (`--no-cache`) "
        "| remote fetch (find + GET + verify + restore) | checkpoint blob | re-prefill / remote hit "
        "| cached tokens on the remote hit |"
    )
    lines = [header, "|" + "---|" * 8, *("| " + " | ".join(r) + " |" for r in rows)]
    title = (
        f"Remote tier, {args.shape} on {device_name()}, {datetime.date.today()}: p50 of {args.rounds} "
        "follow-ups (`max_tokens` 1, whole request), replicas A and B on one local redis-server"
    )
    return f"**{title}**\n\n" + "\n".join(lines) + "\n"


def breakdown_table(args: argparse.Namespace, url: str) -> str:
    size = args.shape if args.shape in SHAPES else "mamba2-130m"
    head = (
        f"| checkpoint blob ({args.remote_dtype or 'fp16'} + tokens) | write-through (capture to in Redis) | GET "
        "| verify (parse, checksum, tokens) | prefetch (find + GET + verify + decode into local tiers) "
        "| then lookup + fetch into a slot |"
    )
    steps = breakdown(url, size, args.breakdown_rounds, dtype=args.remote_dtype)
    table = "\n".join([head, "|" + "---|" * 6, "| " + " | ".join(steps) + " |"])
    note = (
        f"Remote fetch step by step on {device_name()}: one 32k-token checkpoint of the {size} shape, "
        f"p50 of {args.breakdown_rounds}"
    )
    return f"**{note}**\n\n{table}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--shape", default="demo", help="demo (the bundled model) or a random-weight shape")
    ap.add_argument("--lengths", type=int, nargs="*", default=[2000], help="none: no HTTP part")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    ap.add_argument("--breakdown-rounds", type=int, default=3, help="cache-level rounds (0: none)")
    ap.add_argument("--remote-dtype", choices=["fp8", "fp16", "bf16", "fp32"], help="of the breakdown's blob")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, redis(args.redis_server, Path(tmp)) as url:
        if args.lengths:
            emit(http_table(args, url, Path(tmp)), args.out)
        if args.breakdown_rounds:
            emit(breakdown_table(args, url), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
