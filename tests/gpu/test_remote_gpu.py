"""The remote tier on CUDA against a real redis-server: a checkpoint one replica's cache (hot tier in VRAM,
cold in pinned RAM) writes through is restored by another's, into live-slot views, exactly as a local
restore of the same copies would be."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cache import CacheConfig, RemoteConfig, StateCache
from cache.codec import make_codec, roundtrip
from tests.redis_proc import RedisProc, redis_server

pytestmark = pytest.mark.gpu
SPEC = {"conv": ((4, 96, 3), torch.float32), "ssm": ((4, 8, 64, 128), torch.float32)}


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[RedisProc]:
    with redis_server(tmp_path) as proc:
        yield proc


def _cache(url: str, **dtypes: str) -> StateCache:
    cfg = CacheConfig(
        hot_bytes=64 * 2**20, cold_bytes=64 * 2**20, device="cuda", remote=RemoteConfig(url), **dtypes
    )  # type: ignore[arg-type]
    return StateCache(cfg, SPEC)


@pytest.mark.parametrize("lossless", [True, False])
def test_remote_restore_into_slot_views_on_cuda(rds: RedisProc, lossless: bool) -> None:
    dtypes = {"hot_dtype": "fp32", "cold_dtype": "fp32"} if lossless else {}
    a, b = _cache(rds.url, **dtypes), _cache(rds.url, **dtypes)
    g = torch.Generator(device="cuda").manual_seed(0)
    state = {n: torch.randn(s, generator=g, device="cuda") for n, (s, _) in SPEC.items()}
    tokens = list(range(500))
    assert a.capture("ns", "s", tokens[:400], {n: t.clone() for n, t in state.items()}, reason="prompt")
    a.flush()
    assert b.prefetch("ns", "s", tokens) == 400
    slots = {n: torch.zeros((3, *s), device="cuda") for n, (s, _) in SPEC.items()}
    views = {n: t[1] for n, t in slots.items()}
    lease = b.lookup("ns", "s", tokens)
    assert lease is not None and lease.position == 400
    b.fetch(lease, out=views)
    b.release(lease)
    torch.cuda.synchronize()
    for name in SPEC:
        expected = state[name]
        if not lossless:
            expected = roundtrip(make_codec("fp8"), roundtrip(make_codec("fp16"), expected.cpu())).cuda()
        assert torch.equal(slots[name][1], expected), name
        assert not slots[name][0].any() and not slots[name][2].any()
