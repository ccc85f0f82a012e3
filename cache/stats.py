"""Plain-number statistics of the cache (read by server/metrics.py) and the latency recorder behind them."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cache.base import TIERS, FetchTier, LookupResult, LookupScope, MissCause, Tier

LookupKey = tuple[LookupResult, MissCause, LookupScope]  # (result, cause of a miss, scope of a hit)


@dataclass(frozen=True)
class TierStats:
    """One tier. `checkpoint_bytes` is the encoded size of one checkpoint's state there (all are equal per
    model); `kv_bytes`, of `bytes_used`, the hybrid checkpoints' KV blocks (`cache.kv_blocks`)."""

    bytes_used: int
    bytes_capacity: int
    checkpoints: int
    evictions: int
    checkpoint_bytes: int
    kv_bytes: int = 0


@dataclass(frozen=True)
class CacheStats:
    """A consistent snapshot. Counters are monotonic totals since construction; `*_seconds` are the most
    recent `latency_samples` samples (the observer hook gets every sample, for histograms)."""

    tiers: dict[Tier, TierStats]
    lookups: dict[LookupKey, int]  # keyed by (result, cause, scope): `empty_lookup_counts`
    tokens_reused: int
    captures: int
    captures_skipped: int
    disk_corrupt: int
    sessions: int
    leases: int
    fetch_seconds: dict[FetchTier, tuple[float, ...]] = field(default_factory=dict)
    capture_seconds: tuple[float, ...] = ()
    trees: int = 0  # prefix trees holding a checkpoint
    captures_shared: int = 0  # of `captures_skipped`: the tokens had a checkpoint in the tree already
    remote: TierStats | None = None  # the remote tier as of this replica's last write (None: off)


Sink = Callable[[float], None]


class LatencyRecorder:
    """Durations of asynchronous GPU work without host syncs. Thread-safe.

    On CPU `start()`/`stop()` measure host time and call the sink at once. On CUDA they record timing events
    on the current stream (or `pair` takes two recorded events); a pair is resolved once its end event has
    completed, at a later `poll()`, which calls the sinks outside the recorder's lock.
    """

    def __init__(self, cuda: bool) -> None:
        self._cuda = cuda
        self._lock = threading.Lock()
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event, Sink]] = deque()

    def start(self) -> object:
        if not self._cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, token: object, sink: Sink) -> None:
        if not self._cuda:
            assert isinstance(token, float)
            sink(time.perf_counter() - token)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        assert isinstance(token, torch.cuda.Event)
        self.pair(token, end, sink)

    def pair(self, start: torch.cuda.Event, end: torch.cuda.Event, sink: Sink) -> None:
        with self._lock:
            self._pending.append((start, end, sink))

    def poll(self) -> None:
        done: list[tuple[float, Sink]] = []
        with self._lock:
            while self._pending and self._pending[0][1].query():
                start, end, sink = self._pending.popleft()
                done.append((start.elapsed_time(end) / 1000.0, sink))
        for seconds, sink in done:
            sink(seconds)


def empty_lookup_counts() -> dict[LookupKey, int]:
    """Every (result, cause, scope) a lookup can count: hits by tier and scope, misses by cause."""
    hits: tuple[LookupResult, ...] = ("hot_hit", "cold_hit", "disk_hit", "remote_hit")
    scopes: tuple[LookupScope, ...] = ("session", "shared")
    causes: tuple[MissCause, ...] = ("never_saved", "evicted")
    keys: list[LookupKey] = [(result, "", scope) for result in hits for scope in scopes]
    keys += [("miss", cause, "") for cause in causes]
    return dict.fromkeys(keys, 0)


def sample_deques(n: int) -> dict[FetchTier, deque[float]]:
    tiers: tuple[FetchTier, ...] = (*TIERS, "remote")
    return {t: deque(maxlen=n) for t in tiers}
