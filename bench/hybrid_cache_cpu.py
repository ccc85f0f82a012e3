"""Hybrid checkpoints' KV: capture and restore time per position and tier, without a model (issue #16).

    python -m bench.hybrid_cache_cpu                                   # CPU, small shape, 8k / 16k / 32k
    python -m bench.hybrid_cache_cpu --device cuda --shape granite     # GPU: Granite-4.0-H-Micro's KV shape

A live `PagedKV` (`server.model.paged_kv`, 16-token blocks) holding random keys and values of P tokens is the
`KVSource` of the captures and a fresh one the `KVSink` of each restore, as the engine's worker passes them
(`runner.kv_source(slot)`, `runner.kv_sink(slot)`); the Mamba states are random tensors of the shape's spec.
Per position P (each with a fresh cache, so that arenas grow as a server's first conversation makes them):
  turn     the captures of a first turn: one every `--interval` tokens up to P (hot + cold, write-through),
           total ms, and the last one's;
  restore  lookup + fetch of the checkpoint at P into an empty sink, from the hot tier, then from the cold
           tier (a cache with no hot tier), median of `--reps`;
  cold     a capture at P alone into that cold-only cache, whose KV arena grows for it (on CUDA: pinned host
           memory allocated as it fills, `cache.storage.GROW_BYTES` at a time); `cold_capture_grown` the
           same capture again, into the grown arena, after deleting the session.
`--ops` also counts each call's top-level torch ops (each a kernel launch or a copy on a GPU; the profiler
slows the timed calls). The first restore of each tier is checked against the source (bit-exact from the
hot tier in the model dtype, within the FP16 codec's rounding from the cold one). The device is
synchronised around every timed call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cache import CacheConfig, KVSpec, StateCache  # noqa: E402
from server.model.paged_kv import KVBlockPool, PagedKV  # noqa: E402

GIB = 1 << 30
COUNT = False  # --ops
# name -> (attention layers, kv heads, head dim, dtype, Mamba layers, Mamba heads, head dim, d_state, conv dim)
SHAPES: dict[str, tuple[int, int, int, torch.dtype, int, int, int, int, int]] = {
    "granite": (4, 8, 128, torch.bfloat16, 36, 48, 64, 128, 3328),  # Granite-4.0-H-Micro
    "small": (2, 8, 64, torch.float32, 6, 8, 32, 16, 320),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


OPS: list[int] = []  # with --ops: the torch ops of each timed call, in order


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Milliseconds of one call of fn, the device synchronised on each side (with --ops, under the profiler:
    its top-level torch ops, each a kernel launch or a copy on a GPU, are counted in `OPS`)."""
    _sync(device)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if COUNT else None
    t0 = time.perf_counter()
    if profiler is None:
        fn()
    else:
        with profiler:
            fn()
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    if profiler is not None:
        OPS.append(sum(1 for e in profiler.events() if e.name.startswith("aten::") and _top(e)))
    return ms


def _top(event: Any) -> bool:
    parent = event.cpu_parent
    return parent is None or not parent.name.startswith("aten::")


class Bench:
    def __init__(self, shape: str, device: torch.device, block: int) -> None:
        layers, heads, dim, dtype, n_mamba, mh, mp, mn, conv = SHAPES[shape]
        self.device, self.dtype, self.block = device, dtype, block
        self.kv_spec = KVSpec(layers, heads, dim, dtype, block)
        self.spec = {
            "conv": ((n_mamba, conv, 3), dtype),
            "ssm": ((n_mamba, mh, mp, mn), torch.float32),
        }

    def cache(self, hot: bool) -> StateCache:
        config = CacheConfig(
            hot_bytes=4 * GIB if hot else 0,
            cold_bytes=8 * GIB,
            hot_window=4 if hot else 0,
            device=str(self.device),
        )
        return StateCache(config, self.spec, kv=self.kv_spec)

    def source(self, tokens: int, seed: int) -> PagedKV:
        """A live sequence holding random KV of `tokens` tokens (and room for a sink of as many)."""
        s = self.kv_spec
        pool = KVBlockPool(
            s.n_layers,
            2 * -(-tokens // self.block) + 2,
            self.block,
            s.n_kv_heads,
            s.head_dim,
            self.dtype,
            self.device,
        )
        g = torch.Generator(device=self.device).manual_seed(seed)
        seq = pool.sequence()
        kv = torch.randn((s.n_layers, 2, tokens, s.n_kv_heads, s.head_dim), generator=g, device=self.device)
        seq.append(kv.to(self.dtype))
        return seq

    def state(self) -> dict[str, torch.Tensor]:
        return {n: torch.randn(shape, device=self.device).to(dt) for n, (shape, dt) in self.spec.items()}


def capture(bench: Bench, cache: StateCache, tokens: list[int], source: PagedKV, session: str) -> float:
    def run() -> None:
        ok = cache.capture("ns", session, tokens, bench.state(), reason="interval", kv=source)
        assert ok, "capture refused"

    return timed(bench.device, run)


def restore(
    bench: Bench, cache: StateCache, tokens: list[int], source: PagedKV, tier: str, check: bool
) -> float:
    """Lookup + fetch into an empty sink (`check`: compared with the source)."""
    sink = source.pool.sequence()

    def run() -> None:
        lease = cache.lookup("ns", "reader", tokens)
        assert lease is not None and lease.position == len(tokens) and lease.tier == tier, lease
        try:
            cache.fetch(lease, kv=sink)
        finally:
            cache.release(lease)

    ms = timed(bench.device, run)
    if not check:
        sink.release()
        return ms
    want, got = source.read(0, len(tokens)).float(), sink.read(0, len(tokens)).float()
    tol = 0.0 if tier == "hot" else 2e-3
    assert torch.allclose(got, want, rtol=tol, atol=tol), f"{tier} restore differs"
    sink.release()
    return ms


def measure(bench: Bench, position: int, interval: int, reps: int) -> dict[str, Any]:
    tokens = [(7 * i + position) % 4093 for i in range(position)]
    source = bench.source(position, seed=position)
    hot = bench.cache(hot=True)
    marks = [len(OPS)]
    turn = [capture(bench, hot, tokens[:p], source, "s") for p in range(interval, position + 1, interval)]
    if position % interval:
        turn.append(capture(bench, hot, tokens, source, "s"))
    marks.append(len(OPS))
    hot_ms = [restore(bench, hot, tokens, source, "hot", i == 0) for i in range(reps)]
    hot.close()
    cold = bench.cache(hot=False)
    marks.append(len(OPS))
    cold_capture = capture(bench, cold, tokens, source, "s")
    marks.append(len(OPS))
    cold_ms = [restore(bench, cold, tokens, source, "cold", i == 0) for i in range(reps)]
    for session in ("s", "reader"):  # the checkpoint freed: the arenas hold what a capture at P needs
        cold.delete_session("ns", session)
    cold_again = capture(bench, cold, tokens, source, "s")
    cold.close()
    row: dict[str, Any] = {
        "position": position,
        "turn_captures": len(turn),
        "turn_ms": sum(turn),
        "first_capture_ms": turn[0],
        "last_capture_ms": turn[-1],
        "hot_restore_ms": statistics.median(hot_ms),
        "cold_capture_ms": cold_capture,
        "cold_restore_ms": statistics.median(cold_ms),
        "cold_capture_grown_ms": cold_again,
    }
    if COUNT:  # ops: the whole turn's, the last capture's, one restore's
        row.update(
            turn_ops=sum(OPS[marks[0] : marks[1]]),
            last_capture_ops=OPS[marks[1] - 1],
            hot_restore_ops=OPS[marks[1]],
            cold_capture_ops=OPS[marks[2]],
            cold_restore_ops=OPS[marks[3]],
        )
    return row


def main(argv: list[str] | None = None) -> None:
    global COUNT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--positions", default="8192,16384,32768")
    p.add_argument("--interval", type=int, default=4096)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ops", action="store_true", help="count each call's torch ops (under the profiler)")
    p.add_argument(
        "--profile", type=int, default=0, help="then measure this position again under the torch profiler "
        "(CPU and CUDA activities) and print its ops by self CPU time",
    )  # fmt: skip
    args = p.parse_args(argv)
    COUNT = args.ops
    bench = Bench(args.shape, torch.device(args.device), args.block)
    print(f"# hybrid KV capture / restore ms, shape {args.shape} ({bench.kv_spec}), device {args.device}")
    header = False
    for position in (int(x) for x in args.positions.split(",")):
        row = measure(bench, position, args.interval, args.reps)
        if not header:
            print("| " + " | ".join(row) + " |")
            print("|" + "---|" * len(row))
            header = True
        cells = (f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values())
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if bench.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            measure(bench, args.profile, args.interval, 1)
        print(f"\n## position {args.profile} again, under the profiler: ops by self CPU time\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
