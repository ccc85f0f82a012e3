"""Host time of a hot fetch, side by side in one process: an arena block's views made at every fetch (the
old path) against views reused per block (`BlockLayout.views(arena=True)`, what the cache does now).

    python bench/fetch_host.py [--device cpu|cuda] [--iters 5000]

Runs the decode of a small mamba2-shaped state (24 layers, 4 heads) from a hot block into pool-slot views,
alternating the two variants in rounds so that drift hits both; prints the median per-fetch time of each
and their ratio. On CPU this is host time plus a small decode; on CUDA the decode is a launch per tensor.
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

from cache.codec import make_codec  # noqa: E402
from cache.layout import BlockLayout  # noqa: E402

SPEC = {"conv": ((24, 192, 3), torch.float32), "ssm": ((24, 4, 16, 16), torch.float32)}


def per_fetch(
    layout: BlockLayout, block: torch.Tensor, out: dict[str, torch.Tensor], arena: bool, n: int
) -> float:
    sync = torch.cuda.synchronize if block.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        layout.decode_into(block, out, arena=arena)
    sync()
    return (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    layout = BlockLayout(SPEC, make_codec("fp8", fused=device.type == "cuda"))
    block = torch.zeros(layout.block_bytes, dtype=torch.uint8, device=device)
    layout.encode_into({k: torch.randn(s, device=device) for k, (s, _) in SPEC.items()}, block)
    pool = {k: torch.empty(s[0], 4, *s[1:], device=device) for k, (s, _) in SPEC.items()}
    out = {k: v[:, 1] for k, v in pool.items()}  # slot 1's strided views, as a restore writes
    times: dict[bool, list[float]] = {False: [], True: []}
    for arena in (False, True):
        per_fetch(layout, block, out, arena, 200)  # warm-up
    for _ in range(args.rounds):
        for arena in (False, True):
            times[arena].append(per_fetch(layout, block, out, arena, args.iters))
    old, new = statistics.median(times[False]), statistics.median(times[True])
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"| device | views per fetch (old) us | views reused (new) us | old / new |\n|---|---|---|---|\n"
          f"| {name} | {old * 1e6:.1f} | {new * 1e6:.1f} | {old / new:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
