"""`fetch(lease, out=...)` into strided live-slot views: the same state as a fetch into fresh tensors, from
every tier and codec, conv in bf16 or fp32; other slots untouched; bad outs and bad files write nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from cache import CacheConfig, CheckpointUnavailable, StateCache
from cache.base import Lease
from cache.disk import DiskStore

LAYERS, SLOTS, SLOT = 2, 3, 1
CONV, SSM = (24, 3), (4, 8, 16)  # (c, k-1), (h, p, n)
TOKENS = [5, 6, 7, 8]


def _spec(conv_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {"conv": ((LAYERS, *CONV), conv_dtype), "ssm": ((LAYERS, *SSM), torch.float32)}


def _make_state(conv_dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mags = torch.logspace(-4, 3, SSM[1]).view(1, 1, SSM[1], 1)  # rows of very different magnitudes
    ssm = torch.randn((LAYERS, *SSM), generator=g) * mags
    ssm[0, 1, 2] = 0.0  # a zero vector
    return {"conv": torch.randn((LAYERS, *CONV), generator=g).to(conv_dtype), "ssm": ssm}


def _make_pool(conv_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Like `server.model.state.StatePool`: conv (L, S, c, k-1), ssm (L, S, h, p, n), filled with junk."""
    g = torch.Generator().manual_seed(99)
    return {
        "conv": torch.randn((LAYERS, SLOTS, *CONV), generator=g).to(conv_dtype),
        "ssm": torch.randn((LAYERS, SLOTS, *SSM), generator=g),
    }


def _slot(pool: dict[str, torch.Tensor], slot: int = SLOT) -> dict[str, torch.Tensor]:
    return {name: t[:, slot] for name, t in pool.items()}


def _make_cache(tier: str, codec: str, conv_dtype: torch.dtype, disk: Path) -> StateCache:
    """A cache holding `_make_state` at TOKENS, leased from `tier`."""
    big = 1 << 20
    kw: dict[str, Any] = {"hot_bytes": big, "cold_bytes": big, "disk_dir": disk, "disk_bytes": 1 << 24}
    if tier == "hot":
        kw["hot_dtype"] = codec
    else:
        kw.update(hot_bytes=0, cold_dtype=codec)
    cache = StateCache(CacheConfig(**kw), _spec(conv_dtype))
    assert cache.capture("ns", "s", TOKENS, _make_state(conv_dtype), reason="x")
    if tier == "disk":
        cache.close()  # write the disk copy; a restart then finds it only on disk
        cache = StateCache(CacheConfig(**kw), _spec(conv_dtype))
    return cache


def _lease(cache: StateCache, tier: str) -> Lease:
    lease = cache.lookup("ns", "s", [*TOKENS, 1])
    assert lease is not None and lease.tier == tier
    return lease


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def _assert_other_slots(pool: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    for name, t in pool.items():
        for slot in range(SLOTS):
            if slot != SLOT:
                assert torch.equal(t[:, slot], before[name][:, slot]), (name, slot)


CASES = [("hot", "fp8"), ("hot", "fp16"), ("hot", "fp32"), ("cold", "fp16"), ("cold", "fp32")]
CASES += [("disk", "fp16"), ("disk", "fp32")]


@pytest.mark.parametrize("conv_dtype", [torch.float32, torch.bfloat16], ids=["conv_fp32", "conv_bf16"])
@pytest.mark.parametrize(("tier", "codec"), CASES)
def test_fetch_into_slot_views_equals_fetch_into_fresh_tensors(
    tmp_path: Path, tier: str, codec: str, conv_dtype: torch.dtype
) -> None:
    cache = _make_cache(tier, codec, conv_dtype, tmp_path)
    lease = _lease(cache, tier)
    fresh = cache.fetch(lease)
    pool = _make_pool(conv_dtype)
    before = {name: t.clone() for name, t in pool.items()}
    views = _slot(pool)
    assert not views["ssm"].is_contiguous() and not views["conv"].is_contiguous()
    got = cache.fetch(lease, out=views)
    cache.release(lease)
    assert all(got[name] is views[name] for name in views)
    _assert_equal(_slot(pool), fresh)
    _assert_other_slots(pool, before)
    if codec == "fp32":
        _assert_equal(fresh, _make_state(conv_dtype))  # lossless: the captured state itself


def test_fetch_with_a_wrong_shaped_out_raises_and_writes_nothing(tmp_path: Path) -> None:
    cache = _make_cache("hot", "fp8", torch.float32, tmp_path)
    lease = _lease(cache, "hot")
    pool = _make_pool(torch.float32)
    before = {name: t.clone() for name, t in pool.items()}
    out = {"conv": pool["conv"][:, SLOT], "ssm": pool["ssm"][:, :2]}  # two slots: broadcastable, wrong
    with pytest.raises(ValueError, match="shape"):
        cache.fetch(lease, out=out)
    cache.release(lease)
    _assert_equal(pool, before)


def _rewrite_with_bad_ssm(path: Path, root: Path, fingerprint: str) -> None:
    """Replace the file at `path` by a well-formed one (valid checksum, same tokens) whose ssm data has the
    wrong shape: only decoding can tell."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        fields = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    tokens = tuple(fields.pop("tokens").tolist())
    fields["ssm.data"] = fields["ssm.data"][..., :-1].contiguous()
    new, _ = DiskStore(root, fingerprint).write("ns", "s", tokens, fields, meta["reason"], 0.0)
    new.replace(path)


def test_a_bad_disk_file_writes_nothing_into_the_slot(tmp_path: Path) -> None:
    cache = _make_cache("disk", "fp16", torch.bfloat16, tmp_path)
    lease = _lease(cache, "disk")
    (path,) = sorted(tmp_path.glob("*/*.safetensors"))
    _rewrite_with_bad_ssm(path, tmp_path, cache.cold_layout.fingerprint())
    pool = _make_pool(torch.bfloat16)
    before = {name: t.clone() for name, t in pool.items()}
    with pytest.raises(CheckpointUnavailable):
        cache.fetch(lease, out=_slot(pool))  # conv is decoded first: checked before any write
    cache.release(lease)
    _assert_equal(pool, before)
    assert cache.stats().disk_corrupt == 1
