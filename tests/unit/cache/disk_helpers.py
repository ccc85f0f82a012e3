"""Shared helpers of the disk-tier tests: a small state spec, seeded states and a cache whose cold tier holds
exactly one FP16 checkpoint, so a second capture spills the first to disk."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cache import CacheConfig, StateCache
from cache.codec import make_codec, roundtrip

SPEC = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 16), torch.float32)}
FP16_BLOCK = 3072


def make_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, (shape, _) in SPEC.items()}


def make_cache(disk: Path, **kw: Any) -> StateCache:
    cfg: dict[str, Any] = {"hot_bytes": 0, "cold_bytes": FP16_BLOCK, "disk_dir": disk, "disk_bytes": 10**6}
    cfg.update(kw)
    return StateCache(CacheConfig(**cfg), SPEC)


def fp16(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: roundtrip(make_codec("fp16"), v) for k, v in state.items()}


def disk_files(disk: Path) -> list[Path]:
    return sorted(disk.glob("*/*.safetensors"))
