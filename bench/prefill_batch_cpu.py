"""Batched prefill on the torch (CPU) runner: one `prefill` per row vs one `prefill_batch` for all rows.

A small random Mamba2 (d_model 256, 4 layers) on CPU. For each case (N rows of L tokens, or rows of
mixed lengths) three ways run in this one process on the same runner, from zeroed slots: `prefill`
per row (today's engine), `prefill_batch` called per row, and one `prefill_batch` of all rows. The
middle column separates the gain of batching from what the batched path does differently for a
single row (a row shorter than a chunk is scanned in a chunk of its own length, and only its last
token's logits are computed). Times are medians over `--repeats` runs after a warm-up.

    .venv/bin/python bench/prefill_batch_cpu.py [--threads 1] [--repeats 5] [--chunk 256] [--vocab 1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ttft_cpu import cpu_name  # noqa: E402
from server.model.config import ModelConfig  # noqa: E402
from server.model.lm import MambaLM  # noqa: E402
from server.model.runner import ModelRunner, PrefillSeg  # noqa: E402

UNIFORM = [(16, 32), (64, 16), (8, 200)]  # (rows, tokens per row)


def _model(chunk: int, vocab: int) -> MambaLM:
    cfg = ModelConfig(
        arch="mamba2", d_model=256, n_layer=4, vocab_size=vocab, d_state=64, headdim=64, chunk_size=chunk
    )
    torch.manual_seed(0)
    model = MambaLM(cfg).eval()
    with torch.no_grad():
        for block in model.blocks():
            block.mixer.A_log.uniform_(-1.0, 1.0)
            block.mixer.dt_bias.uniform_(-3.0, 0.0)
    return model


def _rows(lengths: Sequence[int], vocab: int) -> list[PrefillSeg]:
    g = torch.Generator().manual_seed(1)
    return [PrefillSeg(torch.randint(0, vocab, (n,), generator=g).tolist(), i) for i, n in enumerate(lengths)]


def _median_ms(fn: Callable[[], object], runner: ModelRunner, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        runner.pool.conv.zero_()
        runner.pool.ssm.zero_()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _case(model: MambaLM, label: str, lengths: Sequence[int], repeats: int) -> str:
    segs = _rows(lengths, model.cfg.vocab_size)
    runner = ModelRunner(model, max_slots=len(segs))
    seq = _median_ms(lambda: [runner.prefill(s.tokens, s.slot) for s in segs], runner, repeats)
    one = _median_ms(lambda: [runner.prefill_batch([s]) for s in segs], runner, repeats)
    bat = _median_ms(lambda: runner.prefill_batch(segs), runner, repeats)
    return f"| {label} | {sum(lengths)} | {seq:.1f} | {one:.1f} | {bat:.1f} | {seq / bat:.2f}x | {one / bat:.2f}x |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = _model(args.chunk, args.vocab)
    g = torch.Generator().manual_seed(2)
    mixed = {
        "48 x 1..32": torch.randint(1, 33, (48,), generator=g).tolist(),
        "32 x 4..128": torch.randint(4, 129, (32,), generator=g).tolist(),
    }
    print(
        f"Mamba2 d_model 256, 4 layers, d_state 64, headdim 64, chunk {args.chunk}, vocab {args.vocab}; "
        f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}; median of {args.repeats}\n"
    )
    print(
        "| rows x tokens | tokens | `prefill` per row (ms) | `prefill_batch` per row (ms) "
        "| `prefill_batch` of all (ms) | speed-up vs `prefill` | speed-up from batching |"
    )
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for n, length in UNIFORM:
            print(_case(model, f"{n} x {length}", [length] * n, args.repeats))
        for label, lengths in mixed.items():
            print(_case(model, label, lengths, args.repeats))


if __name__ == "__main__":
    main()
