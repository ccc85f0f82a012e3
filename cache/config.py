"""Configuration of the state cache (frozen, validated at construction)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

HotDtype = Literal["fp8", "fp16", "bf16", "fp32"]
HotKVDtype = Literal["model", "fp8"]
ColdDtype = Literal["fp16", "bf16", "fp32"]
_HOT: tuple[str, ...] = ("fp8", "fp16", "bf16", "fp32")
_COLD: tuple[str, ...] = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class CacheConfig:
    """Budgets are bytes (hard limits); a hybrid model's tier counts its KV blocks with its states
    (`cache.kv_blocks`), and its hot and cold capacities are whole state blocks. `hot_window` W: checkpoints per session kept in the hot tier (of those
    the session references alone; shared ones are left to the eviction policy).
    `checkpoint_interval` K: capture every K tokens (0 = off). `min_gap`: admission skips a capture less than
    `min_gap` tokens deeper than an existing checkpoint on the same token path of its prefix tree (0 = only
    exact duplicates, which the capturing session then shares).
    `disk_dir=None` or `disk_bytes=0` disables the disk tier. `device`: where the hot tier lives ("cuda",
    "cuda:1", "cpu"); the cold tier is always host memory, pinned when CUDA is available.
    `max_sessions`: sessions tracked at most; beyond, the least recently used one is forgotten as if deleted
    (its references dropped; a checkpoint no other session references is freed), so the registry stays bounded
    even when many one-shot sessions share one checkpoint.
    `max_captures`: at most this many captures per prefill of one request (0 = no limit), thinned by
    `cache.policy.thin`, so that one request (say 1,000 one-line messages) cannot fill a tier.
    `max_ghosts`: evicted-checkpoint markers kept per prefix tree (or as many as the tree holds checkpoints,
    if more: `cache.index`) to tell `evicted` misses from `never_saved`.
    `fused_codecs`: on CUDA, run the FP8/FP16 codecs as Triton kernels (`cache.triton_codec`; torch ops where
    triton is missing or a kernel fails); ignored on CPU.
    `remote`: the shared remote tier (Redis), off when None (`RemoteConfig`).
    `hot_kv_dtype`: a hybrid model's KV blocks in the hot tier, "model" (its dtype, lossless) or "fp8" (e4m3
    with a power-of-two scale per token and head, half the bytes of bf16; its fidelity is measured in
    tests/unit/model/test_hybrid_checkpoints.py). Cold and disk KV use the cold tier's codec."""

    hot_bytes: int = 0
    cold_bytes: int = 0
    disk_dir: Path | None = None
    disk_bytes: int = 0
    hot_window: int = 4
    hot_dtype: HotDtype = "fp8"
    cold_dtype: ColdDtype = "fp16"
    checkpoint_interval: int = 0
    min_gap: int = 0
    max_captures: int = 0
    device: str = "cpu"
    max_ghosts: int = 64
    max_sessions: int = 100_000
    latency_samples: int = 1024
    fused_codecs: bool = True
    remote: RemoteConfig | None = None
    hot_kv_dtype: HotKVDtype = "model"

    def __post_init__(self) -> None:
        for name in (
            "hot_bytes",
            "cold_bytes",
            "disk_bytes",
            "hot_window",
            "checkpoint_interval",
            "min_gap",
            "max_captures",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.hot_dtype not in _HOT:
            raise ValueError(f"hot_dtype must be one of {_HOT}")
        if self.cold_dtype not in _COLD:
            raise ValueError(f"cold_dtype must be one of {_COLD}")
        if self.hot_kv_dtype not in ("model", "fp8"):
            raise ValueError("hot_kv_dtype must be 'model' or 'fp8'")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if self.max_ghosts < 0 or self.latency_samples < 1:
            raise ValueError("max_ghosts must be >= 0 and latency_samples >= 1")
        if self.disk_dir is not None and not isinstance(self.disk_dir, Path):
            object.__setattr__(self, "disk_dir", Path(self.disk_dir))

    @property
    def disk_enabled(self) -> bool:
        return self.disk_dir is not None and self.disk_bytes > 0


RemoteDtype = Literal["fp8", "fp16", "bf16", "fp32"]
_REMOTE_REASONS = frozenset({"boundary", "prompt", "finish"})


@dataclass(frozen=True)
class RemoteConfig:
    """The remote tier (`cache.remote`): a Redis or Valkey server shared by replicas.

    `url`: `redis://[user@]host:port/db` (`rediss://` for TLS); `password` overrides the URL's. `budget`: bytes
    the tier may hold for this model (accounted in Redis by every replica together); `ttl`: seconds a
    checkpoint lives after its last write or hit. `dtype`: storage precision of the blobs (None: the cold
    tier's). `reasons`: the capture reasons written through (message boundaries, prompt ends and finishes;
    add "interval" for every checkpoint). `timeout`: seconds per Redis call before it counts as failed.
    `queue`: writes queued at most (more are dropped and counted). `prefix`: the key prefix.
    `min_tokens`: a remote checkpoint is fetched only if it covers at least this many tokens more than the
    deepest local one (a smaller gain is cheaper to prefill than to fetch)."""

    url: str
    budget: int = 4 * 2**30
    ttl: float = 86_400.0
    dtype: RemoteDtype | None = None
    password: str | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    timeout: float = 2.0
    reasons: frozenset[str] = _REMOTE_REASONS
    queue: int = 8
    prefix: str = "tssc"
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("remote url must start with redis://, rediss:// or unix://")
        if self.budget < 0 or self.ttl <= 0 or self.timeout <= 0 or self.queue < 1 or self.min_tokens < 0:
            raise ValueError("remote budget and min_tokens must be >= 0, ttl and timeout > 0, queue >= 1")
