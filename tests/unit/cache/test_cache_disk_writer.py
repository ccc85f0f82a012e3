"""The disk tier's background writer: queued spills stay readable, close flushes, failures stay inside (real files).

A write is held at a gate where a test needs it still queued: on CPU a fetch decodes about as fast as a file
is written, so a big state alone cannot keep a write in flight for as long as a test needs it (the real write
runs once the gate opens).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from cache import StateCache
from cache.disk import DiskStore
from cache.io_worker import IoWorker
from tests.unit.cache.disk_helpers import FP16_BLOCK, disk_files, fp16, make_cache, make_state

WRITER = "tssc-cache-io"


def _assert_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in b:
        assert torch.equal(a[k], b[k]), k


def _fetch(cache: StateCache, sess: str, tokens: list[int]) -> tuple[str, dict[str, torch.Tensor]]:
    lease = cache.lookup("ns", sess, tokens)
    assert lease is not None
    try:
        return lease.tier, cache.fetch(lease)
    finally:
        cache.release(lease)


def _writer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == WRITER}


def _gate_writes(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold every spill write at a gate (then run the real one): returns (entered, proceed)."""
    entered, proceed = threading.Event(), threading.Event()
    real_write = DiskStore.write

    def gated_write(self: DiskStore, *args: Any) -> tuple[Path, int]:
        entered.set()
        assert proceed.wait(10), "gate never opened"
        return real_write(self, *args)

    monkeypatch.setattr(DiskStore, "write", gated_write)
    return entered, proceed


def test_queued_spill_is_fetched_exactly_before_its_file_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache(tmp_path)
    entered, proceed = _gate_writes(monkeypatch)
    states = [make_state(i) for i in range(3)]
    try:
        for i, st in enumerate(states):  # s0 then s1 leave RAM; s0's write is held, s1's queued behind it
            cache.capture("ns", f"s{i}", [i, i], st, reason="x")
        assert entered.wait(10)
        for i in (0, 1):
            tier, got = _fetch(cache, f"s{i}", [i, i, 7])
            assert tier == "disk"
            _assert_equal(got, fp16(states[i]))
        assert disk_files(tmp_path) == []
    finally:
        proceed.set()
    cache.flush()
    assert len(disk_files(tmp_path)) == 2
    for i in (0, 1):  # now read back from the files
        tier, got = _fetch(cache, f"s{i}", [i, i])
        assert tier == "disk"
        _assert_equal(got, fp16(states[i]))


def test_close_flushes_every_spill_and_a_restart_finds_them(tmp_path: Path) -> None:
    states = {f"s{i}": make_state(i) for i in range(6)}
    before = _writer_threads()
    cache = make_cache(tmp_path, cold_bytes=2 * FP16_BLOCK)
    for i, (sess, st) in enumerate(states.items()):  # four spills queued back to back, two left in RAM
        cache.capture("ns", sess, [i] * 3, st, reason="x")
    cache.close()
    assert len(disk_files(tmp_path)) == 6
    assert _writer_threads() <= before  # this cache's writer is gone
    fresh = make_cache(tmp_path)
    assert fresh.stats().tiers["disk"].checkpoints == 6
    for i, (sess, st) in enumerate(states.items()):
        tier, got = _fetch(fresh, sess, [i] * 3)
        assert tier == "disk"
        _assert_equal(got, fp16(st))
    fresh.close()


def test_a_failed_write_gives_its_budget_back_and_misses_as_evicted(tmp_path: Path) -> None:
    before = _writer_threads()
    cache = make_cache(tmp_path)
    cache.capture("ns", "a", [1, 2], make_state(1), reason="x")
    cache.capture("ns", "b", [3, 4], make_state(2), reason="x")  # a spills: creates the model's folder
    cache.flush()
    (a_file,) = disk_files(tmp_path)
    used = cache.stats().tiers["disk"].bytes_used
    shutil.rmtree(a_file.parent)  # every write below it now fails (a's file goes too)
    assert cache.capture("ns", "c", [5, 6], make_state(3), reason="x")  # b's spill is queued, then fails
    cache.flush()
    assert cache.stats().tiers["disk"].bytes_used == used  # b's reservation came back
    assert cache.lookup("ns", "b", [3, 4]) is None
    assert cache.stats().lookups[("miss", "evicted", "")] == 1
    tier, got = _fetch(cache, "c", [5, 6])  # the cache carries on
    assert tier == "cold"
    _assert_equal(got, fp16(make_state(3)))
    cache.close()
    assert _writer_threads() <= before


def test_a_write_failing_under_a_lease_is_dropped_at_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache(tmp_path)
    cache.capture("ns", "a", [1], make_state(1), reason="x")
    used = cache.stats().tiers["disk"].bytes_used
    entered, proceed = _gate_writes(monkeypatch)
    cache.capture("ns", "b", [2], make_state(2), reason="x")  # a's spill is held at the gate
    assert entered.wait(10)
    shutil.rmtree(tmp_path)  # the held write will fail
    lease = cache.lookup("ns", "a", [1])
    assert lease is not None and lease.tier == "disk"
    proceed.set()
    cache.flush()
    _assert_equal(cache.fetch(lease), fp16(make_state(1)))  # still served from memory
    cache.release(lease)
    assert cache.lookup("ns", "a", [1]) is None
    assert cache.stats().tiers["disk"].bytes_used == used


def test_writer_thread_runs_only_while_io_is_queued(tmp_path: Path) -> None:
    before = _writer_threads()
    cache = make_cache(tmp_path)
    for i in range(4):
        cache.capture("ns", f"s{i}", [i], make_state(i), reason="x")
    assert len(_writer_threads() - before) <= 1  # one writer, however many spills are queued
    cache.close()
    assert _writer_threads() <= before
    cache.capture("ns", "t", [9], make_state(9), reason="x")  # still usable: the writer starts again
    cache.close()
    assert len(disk_files(tmp_path)) == 5
    assert _writer_threads() <= before


def test_io_worker_runs_jobs_in_order_and_survives_a_failing_one() -> None:
    before = _writer_threads()
    worker = IoWorker()
    done: list[int] = []

    def fail() -> None:
        raise OSError("disk gone")

    def nested() -> None:
        done.append(2)
        worker.submit(lambda: done.append(4))  # queued behind job 3

    for job in (lambda: done.append(1), fail, nested, lambda: done.append(3)):
        worker.submit(job)
    worker.close()
    assert done == [1, 2, 3, 4]
    assert _writer_threads() <= before
