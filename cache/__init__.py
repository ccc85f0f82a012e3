"""Tiered cache of SSM state checkpoints (model-agnostic; never imports `server`).

The engine uses only `StateCache` (the facade in `cache.manager`) and the types re-exported here.
"""

from __future__ import annotations

from cache.base import CacheObserver, CheckpointCache, CheckpointUnavailable, Lease
from cache.config import CacheConfig, RemoteConfig
from cache.manager import StateCache
from cache.stats import CacheStats, TierStats

__all__ = [
    "CacheConfig",
    "CacheObserver",
    "CacheStats",
    "CheckpointCache",
    "CheckpointUnavailable",
    "Lease",
    "RemoteConfig",
    "StateCache",
    "TierStats",
]
