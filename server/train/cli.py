"""`python -m server.train`: train the demo model (the lead wires `tssc train` to `main`)."""

from __future__ import annotations

import argparse
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from server.train.config import TrainConfig, smoke_config

log = logging.getLogger(__name__)

# flag -> TrainConfig field, for the knobs worth exposing
OVERRIDES: dict[str, type] = {
    "seed": int,
    "time_budget_s": float,
    "max_steps": int,
    "batch_size": int,
    "seq_len": int,
    "lr": float,
    "d_model": int,
    "n_layer": int,
    "vocab_size": int,
    "eval_every": int,
    "warmup_steps": int,
    "weight_decay": float,
    "library_repeats": int,
    "device": str,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server.train",
        description="Train the bundled Mamba2 demo model on the running Python's standard library.",
    )
    p.add_argument("--out-dir", type=Path, required=True, help="model directory to write (HF format + card)")
    p.add_argument("--smoke", action="store_true", help="tiny model and corpus: a few seconds on CPU")
    p.add_argument("--slice-out", type=Path, help="also write a few KB of held-out text here (for the tests)")
    p.add_argument("--tokenizer-dir", type=Path, help="reuse the tokenizer in this directory")
    p.add_argument("--test-suites", choices=["train", "exclude"], help="stdlib test suites as training data")
    for name, kind in OVERRIDES.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, dest=name)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    changes: dict[str, Any] = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    if args.test_suites is not None:
        changes["test_suites"] = args.test_suites
    return smoke_config(**changes) if args.smoke else TrainConfig().with_(**changes)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.train.run import RunPaths, train_and_export  # torch import after argument errors

    cfg = config_from_args(args)
    raw = argv if argv is not None else __import__("sys").argv[1:]
    command = "python -m server.train " + " ".join(shlex.quote(a) for a in raw)
    paths = RunPaths(args.out_dir, args.slice_out, args.tokenizer_dir)
    log.info("config: %s", cfg)
    train_and_export(cfg, paths, command, started)
    return 0
