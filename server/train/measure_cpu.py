"""CPU load time and tokens/s of a model directory, written to cpu_report.json; re-renders the card.

    python -m server.train.measure_cpu MODEL_DIR [--threads 2] [--decode-tokens 128]

Load time is `load_model(dir, device="cpu", dtype="fp32")` in this process (median of a few), and
the first load in a fresh process, timed apart from `import torch`. Speed goes through the server's
ModelRunner: one prefill of a code prompt, then batch-1 greedy decode. On a shared machine other
work slows any one measurement down, so fresh-process loads and speeds are the best of 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from server.model.loader import load_model
from server.model.runner import ModelRunner
from server.train.card import CPU_REPORT, TRAIN_REPORT, write_card
from server.train.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
PROMPT = 'import os\nimport sys\n\n\ndef main(argv=None):\n    """Parse the command line and run."""\n'
COLD_LOAD = (
    "import time; t0 = time.perf_counter(); import torch; from server.model.loader import load_model; "
    "t1 = time.perf_counter(); load_model({path!r}); t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
)


def _load_seconds(model_dir: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        load_model(model_dir, device="cpu", dtype="fp32")
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _cold_load_seconds(model_dir: Path, threads: int) -> tuple[float, float]:
    """In a fresh process: (import torch and the loader, first load_model) in seconds."""
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the `server` package
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
    code = COLD_LOAD.format(path=str(model_dir))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    imports, load = out.stdout.strip().splitlines()[-1].split()
    return float(imports), float(load)


def _speed(model_dir: Path, decode_tokens: int, prompt_repeat: int) -> dict[str, Any]:
    _, model = load_model(model_dir, device="cpu", dtype="fp32")
    tok = load_tokenizer(model_dir)
    runner = ModelRunner(model, max_slots=1, device="cpu")
    ids = tok.encode(PROMPT * prompt_repeat).ids
    runner.prefill(ids[:16], slot=0)  # warm-up
    runner.reset(0)
    started = time.perf_counter()
    logits = runner.prefill(ids, slot=0).last_logits
    prefill_s = time.perf_counter() - started
    nxt = int(logits.argmax())
    runner.decode([nxt], [0])  # warm-up step, not timed
    started = time.perf_counter()
    for _ in range(decode_tokens):
        nxt = int(runner.decode([nxt], [0])[0].argmax())
    decode_s = time.perf_counter() - started
    return {
        "prefill_tokens": len(ids),
        "prefill_tokens_per_s": len(ids) / prefill_s,
        "decode_tokens": decode_tokens,
        "decode_tokens_per_s": decode_tokens / decode_s,
    }


def measure(
    model_dir: Path, threads: int, decode_tokens: int, load_repeats: int = 5, repeats: int = 3
) -> dict[str, Any]:
    """Shared machines are noisy: fresh-process loads and speeds are the best of `repeats`."""
    torch.set_num_threads(threads)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "threads": threads,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "load_repeats": load_repeats,
        "load_seconds": _load_seconds(model_dir, load_repeats),
    }
    colds = [_cold_load_seconds(model_dir, threads) for _ in range(repeats)]
    report["cold_import_seconds"] = min(c[0] for c in colds)
    report["cold_load_seconds"] = min(c[1] for c in colds)
    speeds = [_speed(model_dir, decode_tokens, prompt_repeat=8) for _ in range(repeats)]
    best = {k: max(s[k] for s in speeds) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    return report | speeds[0] | best | {"repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.train.measure_cpu", description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = measure(args.model_dir, args.threads, args.decode_tokens)
    (args.model_dir / CPU_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    log.info("%s", json.dumps(report))
    if (args.model_dir / TRAIN_REPORT).is_file():
        log.info("re-rendered %s", write_card(args.model_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
