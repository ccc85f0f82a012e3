"""Hybrid checkpoints on disk (`cache.kv_disk`): a checkpoint spilled from the cold tier takes its KV blocks
along, one file per block shared by every disk copy holding it; restores from disk are exact; a restart finds
checkpoints and blocks again; a missing or corrupt block file fails cleanly, never a wrong KV."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cache import CheckpointUnavailable, KVSpec, StateCache
from tests.unit.cache.kv_helpers import (
    KV,
    KV_BLOCK,
    STATE_BLOCK,
    ListSink,
    assert_restores,
    capture,
    make_hybrid_cache,
    make_kv,
)

CONVERSATION = tuple(range(100, 200))
POSITIONS = (20, 27, 32, 45, 57, 64, 77, 100)


def _make(tmp_path: Path, **overrides: object) -> StateCache:
    """No hot tier, room for one checkpoint in the cold tier: every older one lives on disk alone."""
    fields: dict[str, object] = {
        "hot_bytes": 0,
        "cold_bytes": STATE_BLOCK + 14 * KV_BLOCK,  # the tier's capacity is whole state blocks
        "disk_dir": tmp_path,
        "disk_bytes": 1 << 22,
    }
    fields.update(overrides)
    return make_hybrid_cache(**fields)


def _block_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("*/kv/*.safetensors"))


def _conversation_on_disk(cache: StateCache) -> None:
    for p in POSITIONS:
        assert capture(cache, CONVERSATION[:p])
    cache.flush()


def test_checkpoints_spilled_to_disk_share_their_kv_block_files(tmp_path: Path) -> None:
    cache = _make(tmp_path)
    _conversation_on_disk(cache)
    disk = cache.stats().tiers["disk"]
    assert disk.checkpoints == len(POSITIONS) - 1  # all but the newest left the cold tier
    on_disk = POSITIONS[:-1]
    full = on_disk[-1] // KV.block_size  # 77: 9 full blocks, shared by all
    partial = sum(p % KV.block_size != 0 for p in on_disk)
    assert len(_block_files(tmp_path)) == full + partial  # not sum(ceil(p / s)) = 43
    assert 0 < disk.kv_bytes < disk.bytes_used <= disk.bytes_capacity
    assert disk.kv_bytes == sum(f.stat().st_size for f in _block_files(tmp_path))
    for p in on_disk:
        assert assert_restores(cache, CONVERSATION[:p]) == "disk"
    assert assert_restores(cache, CONVERSATION) == "cold"
    info = cache.session_info("ns", "s")
    assert info is not None
    chains = info["bytes"]["disk"] - (disk.bytes_used - disk.kv_bytes)  # each checkpoint's KV in full
    assert chains > 2 * disk.kv_bytes  # 43 blocks' files if unshared, 15 held


def test_a_restart_finds_checkpoints_and_their_kv_blocks_again(tmp_path: Path) -> None:
    cache = _make(tmp_path)
    _conversation_on_disk(cache)
    cache.close()  # writes the cold one too
    files = _block_files(tmp_path)
    again = _make(tmp_path)
    assert again.stats().tiers["disk"].checkpoints == len(POSITIONS)
    assert _block_files(tmp_path) == files
    for p in POSITIONS:
        assert assert_restores(again, CONVERSATION[:p]) == "disk"


def test_a_restart_drops_checkpoints_whose_block_files_are_missing_and_orphan_blocks(tmp_path: Path) -> None:
    cache = _make(tmp_path)
    _conversation_on_disk(cache)
    cache.close()
    kv = cache._book.tiers.extra  # type: ignore[attr-defined]
    deep = kv.index.chains[next(c for c, cp in cache._book.ckpts.items() if cp.position == 100)].blocks
    tail = kv.disk.files[deep[-1].slots["disk"]].path  # 100's partial block: nobody else needs it
    tail.unlink()
    again = _make(tmp_path)
    again.flush()
    positions = {c["position"] for c in again.session_info("ns", "s")["checkpoints"]}  # type: ignore[index]
    assert positions == set(POSITIONS) - {100}
    assert len(_block_files(tmp_path)) == 12 + 6 - 1 - 3  # [72, 96), only 100's, are orphans: unlinked
    assert again.lookup("ns", "s", CONVERSATION).position == 77  # type: ignore[union-attr]


def test_a_corrupt_block_file_fails_the_restore_and_drops_that_disk_copy(tmp_path: Path) -> None:
    cache = _make(tmp_path)
    _conversation_on_disk(cache)
    kv = cache._book.tiers.extra  # type: ignore[attr-defined]
    cp45 = next(cp for cp in cache._book.ckpts.values() if cp.position == 45)
    partial = kv.index.chains[cp45.cid].blocks[-1]  # [40, 45): 45's own
    path = kv.disk.files[partial.slots["disk"]].path
    path.write_bytes(path.read_bytes()[:-8] + b"\x00" * 8)
    lease = cache.lookup("ns", "s", CONVERSATION[:45])
    assert lease is not None and lease.tier == "disk"
    sink = ListSink()
    with pytest.raises(CheckpointUnavailable):
        cache.fetch(lease, kv=sink)
    assert not sink.parts  # nothing half-restored
    cache.release(lease)
    assert cache.lookup("ns", "s", CONVERSATION[:45]).position == 32  # type: ignore[union-attr]
    assert assert_restores(cache, CONVERSATION[:57]) == "disk"  # shares the blocks before 40


def test_a_pending_block_file_is_read_from_memory(tmp_path: Path) -> None:
    cache = _make(tmp_path, cold_bytes=STATE_BLOCK + 5 * KV_BLOCK)
    for p in POSITIONS[:2]:
        assert capture(cache, CONVERSATION[:p])
    assert assert_restores(cache, CONVERSATION[:20]) == "disk"  # written or not yet: exact either way
    cache.flush()
    assert assert_restores(cache, CONVERSATION[:20]) == "disk"


def test_another_kv_layout_never_reads_these_files(tmp_path: Path) -> None:
    cache = _make(tmp_path)
    _conversation_on_disk(cache)
    cache.close()
    other = KVSpec(KV.n_layers, KV.n_kv_heads, KV.head_dim, KV.dtype, block_size=4)
    again = _make(tmp_path, kv=other)
    assert again.stats().tiers["disk"].checkpoints == 0
    assert again.lookup("ns", "s", CONVERSATION) is None


def test_deleting_the_session_unlinks_every_block_file(tmp_path: Path) -> None:
    cache = _make(tmp_path)
    _conversation_on_disk(cache)
    cache.delete_session("ns", "s")
    cache.flush()
    assert not _block_files(tmp_path)
    assert cache.stats().tiers["disk"].bytes_used == 0
    assert torch.equal(make_kv(()), make_kv(()))
