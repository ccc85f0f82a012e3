"""A bf16 ssm state spec (`--state-dtype bf16`): every tier and codec encodes a bf16 state and decodes it
into strided bf16 slot views. FP16, BF16 and fp32 storage hold a bf16 value exactly (power-of-two scales,
8 significant bits fit in 11 and 24); FP8 keeps its bound, 2**-4 of the vector's amax, plus the rounding
of the decoded value to bf16 (2**-9 of it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cache import CacheConfig, StateCache

LAYERS, SLOTS, SLOT = 2, 3, 1
CONV, SSM = (24, 3), (4, 8, 16)  # (c, k-1), (h, p, n)
TOKENS = [5, 6, 7, 8]
BF16 = torch.bfloat16
CASES = [("hot", "fp8"), ("hot", "fp16"), ("hot", "bf16"), ("hot", "fp32")]
CASES += [("cold", "fp16"), ("cold", "bf16"), ("cold", "fp32"), ("disk", "fp16")]


def _spec() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {"conv": ((LAYERS, *CONV), BF16), "ssm": ((LAYERS, *SSM), BF16)}


def _make_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mags = torch.logspace(-4, 3, SSM[1]).view(1, 1, SSM[1], 1)  # rows of very different magnitudes
    ssm = torch.randn((LAYERS, *SSM), generator=g) * mags
    ssm[0, 1, 2] = 0.0  # a zero vector
    return {"conv": torch.randn((LAYERS, *CONV), generator=g).to(BF16), "ssm": ssm.to(BF16)}


def _make_cache(tier: str, codec: str, disk: Path) -> StateCache:
    big = 1 << 20
    kw: dict[str, Any] = {"hot_bytes": big, "cold_bytes": big, "disk_dir": disk, "disk_bytes": 1 << 24}
    kw.update({"hot_dtype": codec} if tier == "hot" else {"hot_bytes": 0, "cold_dtype": codec})
    cache = StateCache(CacheConfig(**kw), _spec())
    assert cache.capture("ns", "s", TOKENS, _make_state(), reason="x")
    if tier == "disk":
        cache.close()  # a restart finds the checkpoint on disk only
        cache = StateCache(CacheConfig(**kw), _spec())
    return cache


def _fetch_into_slot(cache: StateCache, tier: str) -> dict[str, torch.Tensor]:
    """Fetch into slot SLOT of a bf16 pool filled with junk; the pool after the fetch."""
    g = torch.Generator().manual_seed(99)
    pool = {
        "conv": torch.randn((LAYERS, SLOTS, *CONV), generator=g).to(BF16),
        "ssm": torch.randn((LAYERS, SLOTS, *SSM), generator=g).to(BF16),
    }
    lease = cache.lookup("ns", "s", [*TOKENS, 1])
    assert lease is not None and lease.tier == tier
    cache.fetch(lease, out={name: t[:, SLOT] for name, t in pool.items()})
    cache.release(lease)
    return pool


def _assert_fp8_bound(got: torch.Tensor, want: torch.Tensor) -> None:
    amax = want.float().abs().amax(dim=-1, keepdim=True)
    err = (got.float() - want.float()).abs()
    assert bool((err <= 2**-4 * amax + 2**-9 * got.float().abs()).all())


@pytest.mark.parametrize(("tier", "codec"), CASES)
def test_a_bf16_state_round_trips_into_bf16_slot_views(tmp_path: Path, tier: str, codec: str) -> None:
    pool = _fetch_into_slot(_make_cache(tier, codec, tmp_path), tier)
    want = _make_state()
    for name, tensor in want.items():
        got = pool[name][:, SLOT]
        assert got.dtype == BF16
        if codec == "fp8":
            _assert_fp8_bound(got, tensor)
        else:
            assert torch.equal(got, tensor), name


def test_the_cache_reports_a_bf16_spec_and_sizes_blocks_by_storage() -> None:
    cache = StateCache(CacheConfig(hot_bytes=1 << 20, cold_bytes=1 << 20), _spec())
    assert cache.spec["ssm"] == ((LAYERS, *SSM), BF16)
    fp32 = StateCache(
        CacheConfig(hot_bytes=1 << 20, cold_bytes=1 << 20),
        {name: (shape, torch.float32) for name, (shape, _) in _spec().items()},
    )
    assert cache.cold_layout.block_bytes == fp32.cold_layout.block_bytes  # the codec sets the stored size
