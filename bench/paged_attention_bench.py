"""The hybrid decode step's attention kernel alone, on a GPU: `paged_attention.decode_attention` at
Granite-4.0-H-Micro's attention shape (32 query heads, 8 kv heads, head dim 64, KV blocks of 16) with its
keys split as the kernel picks, against the same kernel unsplit (`splits=1`: one program per row and kv
head), SDPA over each row's gathered keys (not a paged kernel: the gather is outside its time) and, with
`--baseline`, another version of the module (a path to its file: `git show REV:server/model/paged_attention.py`),
all timed in one process.

    python -m bench.paged_attention_bench [--contexts 1024 8192 32768] [--batches 1 16 64]
        [--baseline FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from bench._common import emit, markdown

HEADS, KV, DH, BLOCK = 32, 8, 64, 16


def cuda_ms(fn: Callable[[], object], reps: int = 50) -> float:
    """Median ms of `fn` over `reps` runs, each timed with CUDA events after 5 warm-up runs."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def load_baseline(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("paged_attention_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(context: int, batch: int, baseline: ModuleType | None) -> list[str]:
    from server.model import paged_attention as ops

    dev, dtype = torch.device("cuda"), torch.bfloat16
    per_row = -(-(context + 1) // BLOCK)
    pages = torch.randn(per_row * batch, 2, BLOCK, KV, DH, device=dev, dtype=dtype)
    tables = torch.randperm(per_row * batch, device=dev).int().view(batch, per_row)
    q = torch.randn(batch, HEADS, DH, device=dev, dtype=dtype)
    idx = torch.arange(batch, device=dev, dtype=torch.int32)
    pos = torch.full((batch,), context, device=dev, dtype=torch.int32)
    scale = DH**-0.5
    keys = pages[tables.long()].transpose(1, 2).flatten(2, 3)[:, :, : context + 1]  # (b, 2, n, kv, dh)
    k, v = keys[:, 0].transpose(1, 2), keys[:, 1].transpose(1, 2)  # (b, kv, n, dh)
    split = cuda_ms(lambda: ops.decode_attention(q, pages, idx, pos, tables, scale))
    whole = cuda_ms(lambda: ops.decode_attention(q, pages, idx, pos, tables, scale, splits=1))
    sdpa = cuda_ms(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True))
    splits = ops.split_count(batch * KV, per_row * BLOCK, dev)
    cells = [f"{context:,}", str(batch), str(splits), f"{split:.3f}", f"{whole:.3f}", f"{sdpa:.3f}"]
    if baseline is not None:
        base = cuda_ms(lambda: baseline.decode_attention(q, pages, idx, pos, tables, scale))
        cells += [f"{base:.3f}", f"{base / split:.1f}x"]
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--baseline", type=Path, help="another paged_attention.py to time beside this one")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    rows = [row(c, b, baseline) for c in args.contexts for b in args.batches]
    header = ["context", "rows", "splits", "ms", "unsplit ms", "SDPA (gathered) ms"]
    if baseline is not None:
        header += ["baseline ms", "baseline / ms"]
    title = f"decode attention, {torch.cuda.get_device_name()}, bf16, {HEADS} q / {KV} kv heads, dh {DH}"
    emit(f"{title}\n\n{markdown(header, rows)}", args.out)


if __name__ == "__main__":
    main()
