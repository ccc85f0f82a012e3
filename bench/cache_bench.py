"""State-cache benchmark: hot restore and cold fetch latency against bandwidth floors, and capture cost.

    python bench/cache_bench.py                       # GPU: mamba2 130m / 1.3b / 2.7b shapes, appends BENCHMARKS.md
    python bench/cache_bench.py --device cpu --quick  # smoke test (tiny shapes, nothing appended)

Floors, measured in the same run:
- hot restore: (encoded FP8 bytes read + fp32 state bytes written) / device copy bandwidth, where the device copy
  bandwidth is (bytes read + bytes written) / time of a large device-to-device copy. Target: >= 50%.
- cold fetch: encoded FP16 bytes / pinned host-to-device bandwidth (a large pinned H2D copy). Target: >= 80%.
Efficiency = floor / measured, for the Triton codec kernels (`cache.triton_codec`; on CPU the "triton" column runs
the same torch ops as the eager one). The eager torch-ops column shows what the kernels save: an eager FP8 decode
makes ~13 bytes of memory traffic per element against a floor of 5. "restore into slot" is a hot fetch decoded
straight into strided views of one slot of pool-like tensors `(n_layer, slots, ...)`, as the engine restores.
Capture cost: mean decode step time of a random model of that shape (bf16 weights, batch `--batch`) with and
without one capture (runner.capture + cache.capture: FP8 encode into the hot arena, FP16 encode + D2H
write-through on the side stream) after every step, as a fraction of the step.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cache import CacheConfig, StateCache  # noqa: E402
from cache.codec import make_codec  # noqa: E402
from cache.layout import BlockLayout  # noqa: E402

log = logging.getLogger("cache_bench")
MIB = 1 << 20
# name -> (d_model, n_layer) of state-spaces/mamba2-*; d_state 128, headdim 64, expand 2, d_conv 4, ngroups 1
SHAPES = {"130m": (768, 24), "1.3b": (2048, 48), "2.7b": (2560, 64)}
QUICK_SHAPES = {"tiny": (128, 4)}


def state_spec(d_model: int, n_layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    d_inner, d_state, headdim = 2 * d_model, 128, 64
    conv_dim = d_inner + 2 * d_state
    return {
        "conv": ((n_layer, conv_dim, 3), torch.float32),  # (n_layer, conv_dim, d_conv - 1)
        "ssm": ((n_layer, d_inner // headdim, headdim, d_state), torch.float32),  # (n_layer, h, p, n)
    }


class Timer:
    """Mean seconds per call of `fn`, GPU-accurate (events) on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) / iters
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / iters


@dataclass(frozen=True)
class Floors:
    copy_bw: float  # bytes/s, read + write, device to device
    h2d_bw: float  # bytes/s, pinned host to device


def measure_floors(device: torch.device, nbytes: int, timer: Timer, iters: int) -> Floors:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = timer(lambda: dst.copy_(src), iters)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    t_h2d = timer(lambda: dst.copy_(host, non_blocking=True), iters)
    return Floors(copy_bw=2 * nbytes / t_copy, h2d_bw=nbytes / t_h2d)


@dataclass(frozen=True)
class TierRow:
    model: str
    state_mib: float
    hot_mib: float
    hot_eager_s: float
    hot_s: float
    hot_floor_s: float
    slot_s: float
    cold_mib: float
    cold_s: float
    cold_floor_s: float
    capture_s: float


def _random_state(
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device
) -> dict[str, torch.Tensor]:
    return {k: torch.randn(shape, device=device, dtype=dtype) for k, (shape, dtype) in spec.items()}


def _slot_views(state: dict[str, torch.Tensor], slots: int = 4, slot: int = 1) -> dict[str, torch.Tensor]:
    """Views of one slot of pool-like tensors `(n_layer, slots, ...)`, strided like `StatePool.views`."""
    return {
        k: torch.empty(v.shape[0], slots, *v.shape[1:], dtype=v.dtype, device=v.device)[:, slot]
        for k, v in state.items()
    }


def _fetch_time(
    cache: StateCache,
    state: dict[str, torch.Tensor],
    timer: Timer,
    iters: int,
    out: dict[str, torch.Tensor] | None = None,
) -> tuple[float, str]:
    """Mean seconds of `cache.fetch` of `state` into `out` (default: fresh contiguous tensors)."""
    cache.capture("bench", "s", [1, 2, 3], state, reason="bench")  # a no-op if already there
    lease = cache.lookup("bench", "s", [1, 2, 3])
    assert lease is not None
    slot = out if out is not None else {k: torch.empty_like(v) for k, v in state.items()}
    seconds = timer(lambda: cache.fetch(lease, out=slot), iters)
    cache.release(lease)
    return seconds, lease.tier


def bench_tiers(
    name: str, shape: tuple[int, int], device: torch.device, floors: Floors, timer: Timer, iters: int
) -> TierRow:
    spec = state_spec(*shape)
    state = _random_state(spec, device)
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    hot_b = BlockLayout(spec, make_codec("fp8")).block_bytes
    cold_b = BlockLayout(spec, make_codec("fp16")).block_bytes
    eager = StateCache(
        CacheConfig(hot_bytes=2 * hot_b, cold_bytes=2 * cold_b, device=str(device), fused_codecs=False), spec
    )
    hot_eager_s, _ = _fetch_time(eager, state, timer, iters)
    del eager
    hot_cache = StateCache(CacheConfig(hot_bytes=2 * hot_b, cold_bytes=2 * cold_b, device=str(device)), spec)
    hot_s, tier = _fetch_time(hot_cache, state, timer, iters)
    assert tier == "hot"
    slot_s, _ = _fetch_time(hot_cache, state, timer, iters, out=_slot_views(state))
    cold_cache = StateCache(CacheConfig(hot_bytes=0, cold_bytes=2 * cold_b, device=str(device)), spec)
    cold_s, tier = _fetch_time(cold_cache, state, timer, iters)
    assert tier == "cold"
    counter = iter(range(1 << 30))
    capture_s = timer(lambda: hot_cache.capture("bench", "c", [next(counter)], state, reason="bench"), iters)
    return TierRow(
        name,
        state_bytes / MIB,
        hot_b / MIB,
        hot_eager_s,
        hot_s,
        (hot_b + state_bytes) / floors.copy_bw,
        slot_s,
        cold_b / MIB,
        cold_s,
        cold_b / floors.h2d_bw,
        capture_s,
    )


@dataclass(frozen=True)
class StepRow:
    model: str
    batch: int
    step_s: float
    step_capture_s: float


def bench_capture_on_step(
    name: str, shape: tuple[int, int], device: torch.device, batch: int, timer: Timer, iters: int
) -> StepRow | None:
    """Decode step time with and without one capture per step (needs server.model; skipped without it)."""
    try:
        from fidelity import random_model  # bench/ is on sys.path when run as a script

        from server.model.config import ModelConfig
        from server.model.gpu_runner import make_runner
    except ImportError as exc:
        log.warning("capture-on-step skipped: %s", exc)
        return None
    cfg = ModelConfig(
        arch="mamba2", d_model=shape[0], n_layer=shape[1], vocab_size=50288, d_state=128, headdim=64
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runner = make_runner(random_model(cfg, device=str(device), dtype=dtype), max_slots=batch, device=device)
    spec = runner.state_spec()
    hot_b = BlockLayout(spec, make_codec("fp8")).block_bytes
    cold_b = BlockLayout(spec, make_codec("fp16")).block_bytes
    cache = StateCache(
        CacheConfig(hot_bytes=8 * hot_b, cold_bytes=8 * cold_b, hot_window=4, device=str(device)), spec
    )
    tokens, slots = [1] * batch, list(range(batch))
    counter = iter(range(1 << 30))

    def step() -> None:
        runner.decode(tokens, slots)

    def step_and_capture() -> None:
        runner.decode(tokens, slots)
        i = next(counter)
        cache.capture("bench", f"s{i % 16}", [i], runner.capture(0), reason="interval")

    base = timer(step, iters)
    with_capture = timer(step_and_capture, iters)
    return StepRow(name, batch, base, with_capture)


def tier_table(rows: list[TierRow], floors: Floors) -> str:
    out = [
        f"Floors: device copy {floors.copy_bw / 1e9:.0f} GB/s (read+write), pinned H2D {floors.h2d_bw / 1e9:.1f} GB/s",
        "",
        "| shape | state MiB | hot FP8 MiB | hot restore ms (eager) | hot restore ms (triton) | floor ms | eff. "
        "| restore into slot ms | cold FP16 MiB | cold fetch ms | floor ms | eff. | capture ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| mamba2-{r.model} | {r.state_mib:.1f} | {r.hot_mib:.1f} | {r.hot_eager_s * 1e3:.3f} | "
            f"{r.hot_s * 1e3:.3f} | "
            f"{r.hot_floor_s * 1e3:.3f} | {r.hot_floor_s / r.hot_s:.0%} | {r.slot_s * 1e3:.3f} | {r.cold_mib:.1f} | "
            f"{r.cold_s * 1e3:.3f} | {r.cold_floor_s * 1e3:.3f} | {r.cold_floor_s / r.cold_s:.0%} | "
            f"{r.capture_s * 1e3:.3f} |"
        )
    return "\n".join(out)


def step_table(rows: list[StepRow]) -> str:
    out = [
        "| shape | batch | decode step ms | step + 1 capture ms | capture cost / step |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        frac = (r.step_capture_s - r.step_s) / r.step_s
        out.append(
            f"| mamba2-{r.model} | {r.batch} | {r.step_s * 1e3:.3f} | {r.step_capture_s * 1e3:.3f} | {frac:+.1%} |"
        )
    return "\n".join(out)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few iterations; does not append")
    ap.add_argument("--iters", type=int, default=0, help="timed iterations (default 50, quick 3)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--append", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--no-step", action="store_true", help="skip the capture-on-decode-step section")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --quick for a smoke test")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    iters = args.iters or (3 if args.quick else 50)
    timer = Timer(device)
    floors = measure_floors(device, (16 if args.quick else 1024) * MIB, timer, max(iters // 5, 2))
    rows = [bench_tiers(name, shape, device, floors, timer, iters) for name, shape in shapes.items()]
    steps = (
        []
        if args.no_step
        else [bench_capture_on_step(n, s, device, args.batch, timer, iters) for n, s in shapes.items()]
    )
    text = "\n\n".join([tier_table(rows, floors), step_table([r for r in steps if r is not None])])
    sys.stdout.write(text + "\n")
    if args.append if args.append is not None else not args.quick:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        header = f"\n## State cache: {device_name(device)}, torch {torch.__version__}, {stamp}\n\n"
        with args.out.open("a") as fh:
            fh.write(header + text + "\n")
        log.info("appended to %s", args.out)


if __name__ == "__main__":
    main()
