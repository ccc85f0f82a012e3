"""Metrics: named tssc_*, defined once, own registry, observer hooks and gauges really move."""

from __future__ import annotations

import os

from prometheus_client.parser import text_string_to_metric_families

from cache.stats import CacheStats, TierStats
from server.metrics import GPU_MEMORY_KINDS, EngineStats, Metrics

ISSUE_METRICS = {
    "tssc_state_cache_bytes",
    "tssc_state_cache_capacity_bytes",
    "tssc_state_cache_checkpoints",
    "tssc_state_cache_fetch_seconds",
    "tssc_state_cache_capture_seconds",
    "tssc_state_cache_lookups",  # counters are exposed as <name>_total
    "tssc_state_cache_evictions",
    "tssc_prompt_tokens",
    "tssc_generation_tokens",
    "tssc_sessions",
    "tssc_requests_running",
    "tssc_requests_waiting",
    "tssc_requests",
    "tssc_time_to_first_token_seconds",
    "tssc_inter_token_latency_seconds",
    "tssc_request_duration_seconds",
    "tssc_request_queue_seconds",
    "tssc_gpu_memory_bytes",
}
STANDARD_PREFIXES = ("process_", "python_")


def _families(m: Metrics) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def _value(m: Metrics, sample_name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(m.render().decode()):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {sample_name}{labels}")


def test_every_issue_metric_is_exported() -> None:
    names = set(_families(Metrics()))
    assert names >= ISSUE_METRICS


def test_every_own_metric_starts_with_tssc() -> None:
    names = [n for n in _families(Metrics()) if not n.startswith(STANDARD_PREFIXES)]
    assert names
    assert all(n.startswith("tssc_") for n in names), [n for n in names if not n.startswith("tssc_")]


def test_process_and_platform_collectors_are_registered() -> None:
    names = set(_families(Metrics()))
    assert "python_info" in names
    assert any(n.startswith("process_") for n in names)


def test_each_metric_is_defined_once_and_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()  # a module-level registry would raise "Duplicated timeseries" here
    family_names = [f.name for f in text_string_to_metric_families(a.render().decode())]
    assert len(family_names) == len(set(family_names))
    a.on_lookup("hot_hit", "", "shared")
    assert _value(a, "tssc_state_cache_lookups_total", result="hot_hit", scope="shared") == 1
    assert _value(b, "tssc_state_cache_lookups_total", result="hot_hit") == 0


def test_observer_hooks_record() -> None:
    m = Metrics(process_collectors=False)
    m.on_lookup("miss", "evicted", "")
    m.on_fetch("cold", 0.002)
    m.on_capture(0.001)
    m.on_evict("hot")
    m.on_evict("hot")
    assert _value(m, "tssc_state_cache_lookups_total", result="miss", cause="evicted") == 1
    assert _value(m, "tssc_state_cache_fetch_seconds_count", tier="cold") == 1
    assert _value(m, "tssc_state_cache_capture_seconds_count") == 1
    assert _value(m, "tssc_state_cache_evictions_total", tier="hot") == 2


def test_request_observations_record() -> None:
    m = Metrics(process_collectors=False)
    m.observe_prompt(cached_tokens=30, computed_tokens=5)
    m.observe_tokens(2, [0.01])
    m.observe_first_token(0.2)
    m.observe_finish("length", 1.0)
    assert _value(m, "tssc_prompt_tokens_total", source="cached") == 30
    assert _value(m, "tssc_prompt_tokens_total", source="computed") == 5
    assert _value(m, "tssc_generation_tokens_total") == 2
    assert _value(m, "tssc_inter_token_latency_seconds_count") == 1
    assert _value(m, "tssc_requests_total", finish_reason="length") == 1


def test_cache_stats_set_tier_gauges() -> None:
    m = Metrics(process_collectors=False)
    tiers = {
        "hot": TierStats(
            bytes_used=100, bytes_capacity=1000, checkpoints=2, evictions=0, checkpoint_bytes=50
        ),
        "cold": TierStats(
            bytes_used=300,
            bytes_capacity=3000,
            checkpoints=3,
            evictions=1,
            checkpoint_bytes=100,
            kv_bytes=120,
        ),
        "disk": TierStats(bytes_used=0, bytes_capacity=0, checkpoints=0, evictions=0, checkpoint_bytes=100),
    }
    stats = CacheStats(
        tiers=tiers,  # type: ignore[arg-type]
        lookups={},
        tokens_reused=0,
        captures=5,
        captures_skipped=0,
        disk_corrupt=0,
        sessions=4,
        leases=0,
        remote=TierStats(900, 9000, 1, 0, 100, kv_bytes=700),
    )
    m.set_cache_stats(stats)
    assert _value(m, "tssc_state_cache_bytes", tier="cold") == 300
    assert _value(m, "tssc_state_cache_kv_bytes", tier="remote") == 700  # a hybrid's blocks in Redis
    assert _value(m, "tssc_state_cache_capacity_bytes", tier="hot") == 1000
    assert _value(m, "tssc_state_cache_checkpoints", tier="cold") == 3
    assert _value(m, "tssc_state_cache_kv_bytes", tier="cold") == 120  # a hybrid's KV blocks
    assert _value(m, "tssc_state_cache_kv_bytes", tier="hot") == 0
    assert _value(m, "tssc_sessions") == 4


def test_model_info_and_gpu_series_exist_on_cpu() -> None:
    m = Metrics(process_collectors=False)
    m.refresh(None)
    assert _value(m, "tssc_gpu_memory_bytes", kind="allocated") == 0
    m.set_model_info(model="tiny", arch="mamba2", dtype="fp32", device="cpu")
    assert _value(m, "tssc_model_info", model="tiny", arch="mamba2") == 1


def test_an_engine_stats_snapshot_sets_the_gauges() -> None:
    m = Metrics(process_collectors=False)
    m.set_stats(EngineStats(num_running=3, num_waiting=2, cache=None, gpu_memory=(10, 20, 30)))
    assert _value(m, "tssc_requests_running") == 3
    assert _value(m, "tssc_requests_waiting") == 2
    assert [_value(m, "tssc_gpu_memory_bytes", kind=k) for k in GPU_MEMORY_KINDS] == [10, 20, 30]
    m.set_stats(EngineStats(num_running=0, num_waiting=0, cache=None, gpu_memory=None))
    assert _value(m, "tssc_gpu_memory_bytes", kind="total") == 30  # no CUDA in the snapshot: left as is


def test_the_engine_core_process_is_tracked_under_its_own_names() -> None:
    m = Metrics()
    m.track_engine_core(os.getpid())
    assert _value(m, "tssc_engine_core_process_resident_memory_bytes") > 0
    assert _value(m, "process_resident_memory_bytes") > 0  # the serving process's own, as before
    quiet = Metrics(process_collectors=False)
    quiet.track_engine_core(os.getpid())
    assert not any(n.startswith("tssc_engine_core_") for n in _families(quiet))
