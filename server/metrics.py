"""Every Prometheus metric of tssc, defined once, on a registry owned by a `Metrics` object.

No module-level registry: each server (and each test) builds its own `Metrics`, so two apps in one
process never collide. All names start with `tssc_` and use base units (seconds, bytes); the
standard process (`process_*`) and platform (`python_info`) collectors are registered next to them.

Who records what:
- the cache calls the observer methods (`on_lookup`, `on_fetch`, `on_capture`, `on_evict`);
- the engine calls the `observe_*` request methods (it alone sees queueing and every token);
- `set_stats(engine_stats)` sets the gauges from a snapshot of the engine's queues, its cache's stats and
  CUDA memory; the `/metrics` route takes one (`await engine.stats()`) before every scrape.

With `--engine-process` the engine and the cache record into a recorder in the core process
(`server.engine.ipc.Recorder`), which forwards the calls batched with each step's message; the HTTP
process replays them on this `Metrics`, and a scrape asks the core for its `EngineStats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from prometheus_client import CONTENT_TYPE_LATEST as _CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from cache.base import CacheObserver, FetchTier, LookupResult, MissCause, RemoteDirection, Tier
from cache.stats import CacheStats

CONTENT_TYPE_LATEST: str = _CONTENT_TYPE
LookupScope = Literal["session", "shared", ""]  # a hit's scope (`cache.base.Lease.scope`); "" for a miss
TIERS: tuple[str, ...] = ("hot", "cold", "disk")  # local tiers; "remote" series exist with --remote-url
# `tssc_state_cache_remote_errors_total{kind}` (`cache.base.CacheObserver` says what each means)
REMOTE_ERRORS: tuple[str, ...] = (
    "timeout", "connection", "auth", "response", "corrupt", "kv_missing", "queue_full", "too_large",
    "unavailable", "other",
)  # fmt: skip
GPU_MEMORY_KINDS: tuple[str, ...] = ("allocated", "reserved", "total")
# consecutive parts of a request's time to first token (`tssc_request_phase_seconds`)
PHASES: tuple[str, ...] = ("parse", "tokenize", "remote", "queue", "restore", "prefill", "first_token")

_LOOKUP_LABELS = (
    *(
        (hit, "", scope)
        for hit in ("hot_hit", "cold_hit", "disk_hit", "remote_hit")
        for scope in ("session", "shared")
    ),
    ("miss", "never_saved", ""),
    ("miss", "evicted", ""),
)
# Latency buckets (seconds): from sub-millisecond restores to multi-second CPU prefills.
_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_SLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineLike(Protocol):
    """What `Metrics.refresh` reads from the engine (duck-typed; no import of the engine)."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def cache(self) -> Any: ...


GpuMemory = tuple[int, int, int]  # bytes (allocated, reserved, total), as `GPU_MEMORY_KINDS`


@dataclass(frozen=True)
class EngineStats:
    """What the gauges show of an engine, read at scrape time (picklable: the engine core sends it)."""

    num_running: int
    num_waiting: int
    cache: CacheStats | None
    gpu_memory: GpuMemory | None  # None without CUDA


def gpu_memory() -> GpuMemory | None:
    """This process's CUDA memory (None without CUDA)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), total


def engine_stats(engine: EngineLike) -> EngineStats:
    """The snapshot of an engine in this process."""
    cache = engine.cache
    stats = cache.stats() if cache is not None else None
    return EngineStats(engine.num_running, engine.num_waiting, stats, gpu_memory())


class Metrics(CacheObserver):
    """The process's metrics, on their own `CollectorRegistry`; also the cache's observer."""

    def __init__(self, *, process_collectors: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._process_collectors = process_collectors
        if process_collectors:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._define_cache_metrics()
        self._define_request_metrics()

    # ---- definitions -----------------------------------------------------------------------

    def _define_cache_metrics(self) -> None:
        r = self.registry
        self.cache_bytes = Gauge(
            "tssc_state_cache_bytes", "Bytes of checkpoints held per tier.", ["tier"], registry=r
        )
        self.cache_capacity_bytes = Gauge(
            "tssc_state_cache_capacity_bytes", "Byte budget per tier.", ["tier"], registry=r
        )
        self.cache_kv_bytes = Gauge(
            "tssc_state_cache_kv_bytes",
            "Bytes of attention KV blocks (hybrid models) held per tier, part of tssc_state_cache_bytes.",
            ["tier"],
            registry=r,
        )
        self.cache_checkpoints = Gauge(
            "tssc_state_cache_checkpoints", "Checkpoints held per tier.", ["tier"], registry=r
        )
        self.cache_fetch_seconds = Histogram(
            "tssc_state_cache_fetch_seconds",
            "Lookup-to-live-slot latency of a restore, by the tier that served it.",
            ["tier"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.cache_capture_seconds = Histogram(
            "tssc_state_cache_capture_seconds",
            "Time to capture a checkpoint from a live slot (its batch's, for checkpoints captured together in a step).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "tssc_state_cache_lookups_total",
            "Cache lookups by result (hot_hit, cold_hit, disk_hit, remote_hit: brought from the remote tier "
            "for this request, miss), cause of a miss (never_saved, "
            "evicted) and scope of a hit (session: a checkpoint the requesting session already used; shared: "
            "one another conversation created).",
            ["result", "cause", "scope"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "tssc_state_cache_evictions_total", "Checkpoints evicted per tier.", ["tier"], registry=r
        )
        self.cache_disk_corrupt = Counter(
            "tssc_state_cache_disk_corrupt_total", "Disk checkpoints found corrupt and skipped.", registry=r
        )
        self.cache_remote_bytes = Counter(
            "tssc_state_cache_remote_bytes_total",
            "Checkpoint bytes moved to (written) and from (read) the remote tier.",
            ["direction"],
            registry=r,
        )
        self.cache_remote_errors = Counter(
            "tssc_state_cache_remote_errors_total",
            "Remote tier failures by kind (timeout, connection, auth, response, corrupt, kv_missing: a "
            "hybrid checkpoint whose KV blocks are gone, read as a miss, queue_full, "
            "too_large: a checkpoint above the whole budget, unavailable: skipped while backing off, "
            "other). None fails a request.",
            ["kind"],
            registry=r,
        )
        for direction in ("written", "read"):
            self.cache_remote_bytes.labels(direction=direction)
        for kind in REMOTE_ERRORS:
            self.cache_remote_errors.labels(kind=kind)
        self.sessions = Gauge("tssc_sessions", "Sessions holding at least one checkpoint.", registry=r)
        for result, cause, scope in _LOOKUP_LABELS:
            self.cache_lookups.labels(result=result, cause=cause, scope=scope)
        for tier in TIERS:
            self.cache_bytes.labels(tier=tier)
            self.cache_kv_bytes.labels(tier=tier)
            self.cache_capacity_bytes.labels(tier=tier)
            self.cache_checkpoints.labels(tier=tier)
            self.cache_evictions.labels(tier=tier)

    def _define_request_metrics(self) -> None:
        r = self.registry
        self.prompt_tokens = Counter(
            "tssc_prompt_tokens_total",
            "Prompt tokens, by source: served from a checkpoint (cached) or prefilled (computed).",
            ["source"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "tssc_generation_tokens_total", "Generated (completion) tokens.", registry=r
        )
        self.requests_running = Gauge("tssc_requests_running", "Requests holding a live slot.", registry=r)
        self.requests_waiting = Gauge(
            "tssc_requests_waiting", "Requests waiting for a live slot.", registry=r
        )
        self.requests = Counter(
            "tssc_requests_total", "Finished requests by finish reason.", ["finish_reason"], registry=r
        )
        self.ttft_seconds = Histogram(
            "tssc_time_to_first_token_seconds",
            "Arrival to first generated token.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.inter_token_seconds = Histogram(
            "tssc_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            buckets=(*_FAST_BUCKETS, 2.5, 5.0),
            registry=r,
        )
        self.request_duration_seconds = Histogram(
            "tssc_request_duration_seconds", "Arrival to finish.", buckets=_SLOW_BUCKETS, registry=r
        )
        self.request_queue_seconds = Histogram(
            "tssc_request_queue_seconds",
            "Time waiting for a live slot: handed to the scheduler (after any remote prefetch) to admission.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.request_phase_seconds = Histogram(
            "tssc_request_phase_seconds",
            "Where time to first token goes, per request and phase: parse (body read and validated), "
            "tokenize (chat template and tokenizer), remote (finding and fetching a deeper checkpoint from the "
            "remote tier, with --remote-url), queue (waiting for a live slot), restore (checkpoint "
            "lookup and fetch into the slot), prefill (prompt tokens computed, chunked across steps, until the "
            "first token is sampled and on the host), first_token (from there to its delivery).",
            ["phase"],
            buckets=(0.00005, *_FAST_BUCKETS, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.gpu_memory_bytes = Gauge(
            "tssc_gpu_memory_bytes", "CUDA memory (allocated, reserved, total).", ["kind"], registry=r
        )
        self.model_info = Gauge(
            "tssc_model_info", "1 for the served model.", ["model", "arch", "dtype", "device"], registry=r
        )
        for kind in GPU_MEMORY_KINDS:
            self.gpu_memory_bytes.labels(kind=kind)
        for source in ("cached", "computed"):
            self.prompt_tokens.labels(source=source)
        for reason in ("stop", "length", "abort"):
            self.requests.labels(finish_reason=reason)
        for phase in PHASES:
            self.request_phase_seconds.labels(phase=phase)

    # ---- cache observer protocol (called by cache.manager.StateCache) ----------------------

    def on_lookup(self, result: LookupResult, cause: MissCause, scope: LookupScope = "") -> None:
        """One lookup: `result` is hot_hit / cold_hit / disk_hit / miss; `cause` (misses) says why; `scope`
        (hits) whether the checkpoint was the session's own or shared from another conversation."""
        self.cache_lookups.labels(result=result, cause=cause, scope=scope).inc()

    def on_fetch(self, tier: FetchTier, seconds: float) -> None:
        """A checkpoint from `tier` reached a live slot, `seconds` after the lookup."""
        self.cache_fetch_seconds.labels(tier=tier).observe(seconds)

    def on_capture(self, seconds: float) -> None:
        self.cache_capture_seconds.observe(seconds)

    def on_evict(self, tier: Tier) -> None:
        self.cache_evictions.labels(tier=tier).inc()

    def on_corrupt(self) -> None:
        self.cache_disk_corrupt.inc()

    def on_remote_bytes(self, direction: RemoteDirection, nbytes: int) -> None:
        self.cache_remote_bytes.labels(direction=direction).inc(nbytes)

    def on_remote_error(self, kind: str) -> None:
        self.cache_remote_errors.labels(kind=kind).inc()

    # ---- request metrics (called by the engine) --------------------------------------------

    def observe_prompt(self, cached_tokens: int, computed_tokens: int) -> None:
        self.prompt_tokens.labels(source="cached").inc(cached_tokens)
        self.prompt_tokens.labels(source="computed").inc(computed_tokens)

    def observe_queue(self, seconds: float) -> None:
        self.request_queue_seconds.observe(seconds)

    def observe_phase(self, phase: str, seconds: float) -> None:
        """One request spent `seconds` in `phase` (one of `PHASES`) before its first token."""
        self.request_phase_seconds.labels(phase=phase).observe(max(seconds, 0.0))

    def observe_first_token(self, seconds: float) -> None:
        self.ttft_seconds.observe(seconds)

    def observe_tokens(self, count: int, inter_token_seconds: Sequence[float] = ()) -> None:
        """`count` generated tokens (one engine step's), and the gaps before those that were not a request's
        first: one call per step, not per token (with the engine process every call crosses the pipe)."""
        self.generation_tokens.inc(count)
        for seconds in inter_token_seconds:
            self.inter_token_seconds.observe(seconds)

    def observe_finish(self, finish_reason: str, duration_seconds: float) -> None:
        self.requests.labels(finish_reason=finish_reason).inc()
        self.request_duration_seconds.observe(duration_seconds)

    def track_engine_core(self, pid: int) -> None:
        """With `--engine-process`: the core process's CPU time, memory and file descriptors, as
        `tssc_engine_core_process_*` (the `process_*` series are this, the HTTP, process's own)."""
        if self._process_collectors:
            ProcessCollector(namespace="tssc_engine_core", pid=lambda: pid, registry=self.registry)

    def set_model_info(self, *, model: str, arch: str, dtype: str, device: str) -> None:
        """Called once the model is loaded: `model` is the served model id."""
        self.model_info.clear()
        self.model_info.labels(model=model, arch=arch, dtype=dtype, device=device).set(1)

    # ---- gauges ----------------------------------------------------------------------------

    def refresh(self, engine: EngineLike | None) -> None:
        """Set the gauges from the engine's queues, its cache's stats and CUDA memory."""
        if engine is None:
            self.set_gpu_memory(gpu_memory())
            return
        self.set_stats(engine_stats(engine))

    def set_stats(self, stats: EngineStats) -> None:
        """Copy an `EngineStats` snapshot (this process's engine, or the engine core's) into the gauges."""
        self.requests_running.set(stats.num_running)
        self.requests_waiting.set(stats.num_waiting)
        if stats.cache is not None:
            self.set_cache_stats(stats.cache)
        self.set_gpu_memory(stats.gpu_memory)

    def set_cache_stats(self, stats: CacheStats) -> None:
        """Copy a `StateCache.stats()` snapshot into the tier gauges."""
        tiers = dict(stats.tiers)
        if stats.remote is not None:
            tiers["remote"] = stats.remote  # type: ignore[index]
        for tier, tier_stats in tiers.items():
            self.cache_kv_bytes.labels(tier=tier).set(tier_stats.kv_bytes)
            self.cache_bytes.labels(tier=tier).set(tier_stats.bytes_used)
            self.cache_capacity_bytes.labels(tier=tier).set(tier_stats.bytes_capacity)
            self.cache_checkpoints.labels(tier=tier).set(tier_stats.checkpoints)
        self.sessions.set(stats.sessions)

    def set_gpu_memory(self, memory: GpuMemory | None) -> None:
        if memory is None:
            return
        for kind, value in zip(GPU_MEMORY_KINDS, memory, strict=True):
            self.gpu_memory_bytes.labels(kind=kind).set(value)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
