"""Tiered cache of SSM state checkpoints (model-agnostic; never imports `server`).

The engine uses only `StateCache` (the facade in `cache.manager`) and the types re-exported here (a hybrid
model's too: `KVSpec`, `KVSource`, `KVSink`).
"""

from __future__ import annotations

from cache.base import (
    CacheObserver,
    Capture,
    CheckpointCache,
    CheckpointUnavailable,
    KVSink,
    KVSource,
    KVSpec,
    Lease,
)
from cache.config import CacheConfig, RemoteConfig
from cache.manager import StateCache
from cache.stats import CacheStats, TierStats

__all__ = [
    "CacheConfig",
    "CacheObserver",
    "CacheStats",
    "Capture",
    "CheckpointCache",
    "CheckpointUnavailable",
    "KVSink",
    "KVSource",
    "KVSpec",
    "Lease",
    "RemoteConfig",
    "StateCache",
    "TierStats",
]
