"""What a checkpoint capture costs the host on CPU, one at a time against a step's batch (`capture_many`).

    python -m bench.capture_batch_cpu [--captures 64] [--reps 5] [--out FILE]

The bundled demo model's state spec (about 0.9 MB of fp32 state per checkpoint), a state cache with room
for every checkpoint (FP8 hot and FP16 cold tiers, both in host memory without a GPU), `captures` random
states stored under distinct prompts: one `capture` call each, then one `capture_many` of them all stacked.
CPU time per checkpoint (`time.process_time`, torch on one thread), the median of `reps` runs. On CUDA the
batch also saves launches (three or four codec launches per capture); this CPU figure is the encode and
the bookkeeping alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import emit, markdown  # noqa: E402


def measure(captures: int, reps: int) -> dict[str, float]:
    """CPU µs per checkpoint: {"one": one `capture` call each, "batch": one `capture_many`}."""
    from cache import CacheConfig, Capture, StateCache
    from server.model.defaults import bundled_model_dir
    from server.model.loader import load_model
    from server.model.runner import ModelRunner

    torch.set_num_threads(1)
    spec = ModelRunner(load_model(bundled_model_dir())[1], max_slots=1).state_spec()
    g = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(s, generator=g).to(d) for k, (s, d) in spec.items()} for _ in range(captures)]
    stacked = {k: torch.stack([s[k] for s in states]) for k in spec}
    fresh = lambda: StateCache(CacheConfig(hot_bytes=1 << 30, cold_bytes=1 << 30, hot_window=10**6), spec)
    one: list[float] = []
    batch: list[float] = []
    for rep in range(reps):
        cache = fresh()
        t0 = time.process_time()
        for i, state in enumerate(states):
            assert cache.capture("ns", "s", [rep, i], state, reason="prompt")
        one.append((time.process_time() - t0) / captures)
        cache = fresh()
        items = [Capture("ns", "s", [rep, i], "prompt") for i in range(captures)]
        t0 = time.process_time()
        assert all(cache.capture_many(items, stacked))
        batch.append((time.process_time() - t0) / captures)
    return {"one": statistics.median(one) * 1e6, "batch": statistics.median(batch) * 1e6}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--captures", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    us = measure(args.captures, args.reps)
    title = (
        f"### A checkpoint capture's host cost on CPU (demo model, {args.captures} captures, µs of CPU each)"
    )
    header = ["one `capture` each", "one `capture_many` of all"]
    emit(f"{title}\n\n" + markdown(header, [[f"{us['one']:.0f}", f"{us['batch']:.0f}"]]), args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
