"""Disk tier: spills, restart survival, truncated and corrupt files, hard byte budget (real files)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cache import CacheConfig, CheckpointUnavailable, StateCache
from cache.disk import DiskStore
from tests.unit.cache.disk_helpers import FP16_BLOCK, disk_files, fp16, make_cache, make_state


def _fetch(cache: StateCache, sess: str, tokens: list[int]) -> tuple[int, str, dict[str, torch.Tensor]]:
    lease = cache.lookup("ns", sess, tokens)
    assert lease is not None
    try:
        return lease.position, lease.tier, cache.fetch(lease)
    finally:
        cache.release(lease)


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_cold_eviction_spills_to_disk_exactly(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    a = make_state(1)
    cache.capture("ns", "a", [1, 2, 3], a, reason="x")
    cache.capture("ns", "b", [4, 5, 6], make_state(2), reason="x")  # a leaves RAM for disk
    cache.flush()
    assert len(disk_files(tmp_path)) == 1
    pos, tier, got = _fetch(cache, "a", [1, 2, 3, 9])
    assert (pos, tier) == (3, "disk")
    _assert_equal(got, fp16(a))
    assert cache.stats().lookups[("disk_hit", "", "session")] == 1


def test_sessions_survive_restart(tmp_path: Path) -> None:
    states = {f"s{i}": make_state(i) for i in range(4)}
    cache = make_cache(tmp_path, cold_bytes=2 * FP16_BLOCK)
    for i, (sess, st) in enumerate(states.items()):
        cache.capture("ns", sess, [i] * (i + 2), st, reason="generation_end")
    cache.close()  # flushes the two still only in RAM
    assert len(disk_files(tmp_path)) == 4
    del cache
    fresh = make_cache(tmp_path)
    assert fresh.stats().tiers["disk"].checkpoints == 4
    for i, (sess, st) in enumerate(states.items()):
        pos, tier, got = _fetch(fresh, sess, [i] * (i + 5))
        assert (pos, tier) == (i + 2, "disk")
        _assert_equal(got, fp16(st))
    info = fresh.session_info("ns", "s0")
    assert info is not None and info["checkpoints"][0]["reason"] == "generation_end"


def test_truncated_file_is_skipped_and_counted(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    cache.capture("ns", "a", [1, 2], make_state(1), reason="x")
    cache.capture("ns", "b", [3, 4], make_state(2), reason="x")
    cache.close()
    files = disk_files(tmp_path)
    assert len(files) == 2
    victim = files[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    fresh = make_cache(tmp_path)
    stats = fresh.stats()
    assert stats.disk_corrupt == 1 and stats.tiers["disk"].checkpoints == 1
    assert not victim.exists()
    found = [fresh.lookup("ns", s, t) for s, t in (("a", [1, 2]), ("b", [3, 4]))]
    assert sum(lease is not None for lease in found) == 1


def test_flipped_byte_is_detected_never_restored(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    cache.capture("ns", "a", [1, 2], make_state(1), reason="x")
    cache.capture("ns", "a", [1, 2, 3, 4], make_state(2), reason="x")  # [1, 2] spills
    cache.flush()
    (path,) = disk_files(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x40  # inside the tensor data, header still valid
    path.write_bytes(bytes(raw))
    cache.capture("ns", "b", [7], make_state(3), reason="x")  # [1, 2, 3, 4] goes to disk too
    lease = cache.lookup("ns", "a", [1, 2, 9])
    assert lease is not None and lease.tier == "disk"
    with pytest.raises(CheckpointUnavailable):
        cache.fetch(lease)
    cache.release(lease)
    assert cache.stats().disk_corrupt == 1
    assert cache.lookup("ns", "a", [1, 2, 9]) is None
    cache.flush()
    assert not path.exists()


def test_disk_budget_is_hard(tmp_path: Path) -> None:
    one = FP16_BLOCK + 16384 + 4 * 40  # the reservation for a 40-token checkpoint
    cache = make_cache(tmp_path, disk_bytes=2 * one)
    for i in range(12):
        cache.capture("ns", f"s{i}", [i] * 40, make_state(i), reason="x")
        disk = cache.stats().tiers["disk"]
        assert disk.bytes_used <= disk.bytes_capacity == 2 * one
        cache.flush()
        disk = cache.stats().tiers["disk"]
        assert sum(p.stat().st_size for p in disk_files(tmp_path)) <= disk.bytes_used
    evictions = cache.stats().tiers["disk"].evictions
    assert evictions > 0 and len(disk_files(tmp_path)) == 12 - 1 - evictions


def test_restart_with_smaller_budget_keeps_newest(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    for i in range(4):
        cache.capture("ns", f"s{i}", [i] * 10, make_state(i), reason="x")
    cache.close()
    size = max(p.stat().st_size for p in disk_files(tmp_path))
    fresh = make_cache(tmp_path, disk_bytes=2 * size)
    assert fresh.stats().tiers["disk"].checkpoints == 2
    assert len(disk_files(tmp_path)) == 2


def test_delete_session_removes_files(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    cache.capture("ns", "a", [1], make_state(1), reason="x")
    cache.capture("ns", "a", [1, 2], make_state(2), reason="x")
    cache.flush()
    assert len(disk_files(tmp_path)) == 1
    assert cache.delete_session("ns", "a") > 0
    cache.flush()
    assert disk_files(tmp_path) == []
    assert cache.stats().tiers["disk"].bytes_used == 0


def _in_thread(fn: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Run `fn` in another thread; fail (instead of hanging) if it does not finish in `timeout` seconds."""
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "blocked: the cache lock is held during file I/O"
    return out[0]


def _gate_unlinks(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold every file deletion at a gate (then run the real one): returns (entered, proceed)."""
    entered, proceed = threading.Event(), threading.Event()
    real_delete = DiskStore.delete

    def gated_delete(path: Path) -> None:
        entered.set()
        proceed.wait(10)
        real_delete(path)

    monkeypatch.setattr(DiskStore, "delete", staticmethod(gated_delete))
    return entered, proceed


def test_delete_session_unlinks_outside_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # While the session's unlinks are held up, other callers run and its checkpoints are already invisible:
    # a capture into the same session stores a new checkpoint that the late unlinks leave alone.
    cache = make_cache(tmp_path)
    for n in range(1, 4):
        cache.capture("ns", "a", list(range(n)), make_state(n), reason="x")
    cache.capture("ns", "b", [9], make_state(9), reason="x")
    cache.close()
    assert len(disk_files(tmp_path)) == 4
    entered, proceed = _gate_unlinks(monkeypatch)
    freed: list[int] = []
    deleter = threading.Thread(target=lambda: freed.append(cache.delete_session("ns", "a")))
    deleter.start()
    try:
        assert entered.wait(10)
        assert _in_thread(lambda: cache.lookup("ns", "a", [0, 1, 2])) is None
        assert _in_thread(lambda: _fetch(cache, "b", [9]))[:2] == (1, "cold")
        assert _in_thread(lambda: cache.capture("ns", "a", [0, 1, 2], make_state(7), reason="x"))
    finally:
        proceed.set()
        deleter.join(10)
    cache.flush()
    assert freed[0] > 0 and len(disk_files(tmp_path)) == 1  # a's three files gone, b's kept
    pos, tier, got = _fetch(cache, "a", [0, 1, 2])
    assert (pos, tier) == (3, "cold")
    _assert_equal(got, fp16(make_state(7)))


def test_disk_eviction_unlinks_outside_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = FP16_BLOCK + 16384 + 4 * 5  # the reservation for a 5-token checkpoint: the disk holds one
    cache = make_cache(tmp_path, disk_bytes=one)
    for i in range(3):  # s0 then s1 reach disk (s1 evicts s0), s2 stays in RAM
        cache.capture("ns", f"s{i}", [i] * 5, make_state(i), reason="x")
    cache.flush()  # s0's unlink done: the gate below holds s1's alone (else, at times, s0's)
    entered, proceed = _gate_unlinks(monkeypatch)
    capturer = threading.Thread(target=lambda: cache.capture("ns", "s3", [3] * 5, make_state(3), reason="x"))
    capturer.start()  # spilling s2 evicts s1 from disk: its unlink is held at the gate
    try:
        assert entered.wait(10)
        assert _in_thread(lambda: cache.lookup("ns", "s1", [1] * 5)) is None
        pos, tier, got = _in_thread(lambda: _fetch(cache, "s2", [2] * 5))  # its spill is queued, not written
        assert (pos, tier) == (5, "disk")
        _assert_equal(got, fp16(make_state(2)))
    finally:
        proceed.set()
        capturer.join(10)
    cache.flush()
    assert len(disk_files(tmp_path)) == 1
    assert cache.stats().tiers["disk"].evictions == 2


def test_other_model_files_are_not_mixed(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    cache.capture("ns", "a", [1], make_state(1), reason="x")
    cache.close()
    spec2 = {"conv": ((2, 24, 3), torch.float32), "ssm": ((2, 4, 8, 8), torch.float32)}
    other = StateCache(CacheConfig(cold_bytes=10**5, disk_dir=tmp_path, disk_bytes=10**6), spec2)
    assert other.lookup("ns", "a", [1]) is None
    assert other.stats().disk_corrupt == 0


def test_failed_spill_write_gives_its_disk_reservation_back(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    cache.capture("ns", "a", [1, 2, 3], make_state(1), reason="x")
    cache.capture("ns", "b", [4, 5, 6], make_state(2), reason="x")  # a spills: creates the spec dir
    cache.flush()
    spec_dir = disk_files(tmp_path)[0].parent
    used_before = cache.stats().tiers["disk"].bytes_used
    for f in spec_dir.iterdir():
        f.unlink()
    spec_dir.rmdir()
    spec_dir.write_text("not a directory")  # every write below it now fails
    cache.capture("ns", "c", [7, 8, 9], make_state(3), reason="x")  # b's spill fails
    cache.flush()
    disk = cache.stats().tiers["disk"]
    assert disk.bytes_used <= used_before
    assert disk.bytes_used <= disk.bytes_capacity


def test_checksum_covers_every_chunk_of_a_large_tensor(tmp_path: Path) -> None:
    """A tensor spanning several hash chunks: a flipped byte in any chunk, or the last, is caught."""
    from cache import disk

    store = DiskStore(tmp_path, "fp")
    big = torch.arange(3 * disk.CHUNK // 4 + 5, dtype=torch.int32)  # 3 chunks and a partial one
    fields = {"ssm.data": big.view(torch.uint8), "ssm.scale": torch.ones(4)}
    path, _ = store.write("ns", "s", (1, 2), fields, "x", 0.0)
    assert torch.equal(store.read(path, (1, 2))["ssm.data"], fields["ssm.data"])
    raw = path.read_bytes()
    for where in (disk.CHUNK + 17, 3 * disk.CHUNK + 3):  # offsets inside the data, from the file's end
        flipped = bytearray(raw)
        flipped[len(raw) - where] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(disk.CorruptFile, match="checksum"):
            store.read(path, (1, 2))
    path.write_bytes(raw)
    assert torch.equal(store.read(path, (1, 2))["ssm.data"], fields["ssm.data"])
