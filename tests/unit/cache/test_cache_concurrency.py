"""Concurrent use from many asyncio tasks and worker threads: no lost pins, exact restores, budgets held."""

from __future__ import annotations

import asyncio
import random
import threading
import zlib
from pathlib import Path

import torch

from cache import CacheConfig, StateCache

SPEC = {"conv": ((2, 6, 3), torch.float32), "ssm": ((2, 2, 4, 8), torch.float32)}
BLOCK = 512 + 768


def _state_for(tree: str, tokens: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The state after `tokens` in `tree`: whichever session captured it, every session of the tree gets it."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((tree, tokens)).encode()))
    return {name: torch.randn(shape, generator=g) for name, (shape, _) in SPEC.items()}


def _make_cache(disk: Path) -> StateCache:
    cfg = CacheConfig(
        hot_bytes=6 * BLOCK,
        cold_bytes=8 * BLOCK,
        disk_dir=disk,
        disk_bytes=200_000,
        hot_window=2,
        hot_dtype="fp32",
        cold_dtype="fp32",
    )
    return StateCache(cfg, SPEC)


def _one_op(cache: StateCache, rng: random.Random, errors: list[str]) -> None:
    session, tree = rng.choice("abcd"), rng.choice(["ns", "salted"])  # two trees, four sessions in each
    tokens = tuple(rng.randrange(3) for _ in range(rng.randrange(1, 8)))
    op = rng.random()
    if op < 0.45:
        cache.capture("ns", session, tokens, _state_for(tree, tokens), reason="x", tree=tree)
    elif op < 0.95:
        lease = cache.lookup("ns", session, tokens, tree=tree)
        if lease is None:
            return
        try:
            got = cache.fetch(lease)
            want = _state_for(tree, tokens[: lease.position])
            if not all(torch.equal(got[k], want[k]) for k in want):
                errors.append(f"wrong state for {tree} {tokens[: lease.position]}")
        finally:
            cache.release(lease)
    else:
        cache.delete_session("ns", session)


def _assert_consistent(cache: StateCache, disk: Path) -> None:
    stats = cache.stats()
    assert stats.leases == 0
    for tier, ts in stats.tiers.items():
        assert ts.bytes_used <= ts.bytes_capacity, tier
    cache.close()  # queued writes land, queued unlinks run: the files are within the accounted bytes
    on_disk = sum(p.stat().st_size for p in disk.glob("*/*.safetensors"))
    assert on_disk <= cache.stats().tiers["disk"].bytes_used


async def test_many_asyncio_tasks(tmp_path: Path) -> None:
    cache = _make_cache(tmp_path)
    errors: list[str] = []

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            _one_op(cache, rng, errors)
            await asyncio.sleep(0)

    await asyncio.gather(*(worker(i) for i in range(16)))
    assert errors == []
    _assert_consistent(cache, tmp_path)


async def test_asyncio_tasks_mixed_with_worker_threads(tmp_path: Path) -> None:
    cache = _make_cache(tmp_path)
    errors: list[str] = []

    def thread_worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            _one_op(cache, rng, errors)

    async def task_worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(30):
            _one_op(cache, rng, errors)
            await asyncio.sleep(0)

    threads = [asyncio.to_thread(thread_worker, 100 + i) for i in range(4)]
    await asyncio.gather(*threads, *(task_worker(i) for i in range(8)))
    assert errors == []
    _assert_consistent(cache, tmp_path)


def test_plain_threads_hammer(tmp_path: Path) -> None:
    cache = _make_cache(tmp_path)
    errors: list[str] = []

    def run(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(80):
            _one_op(cache, rng, errors)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _assert_consistent(cache, tmp_path)
