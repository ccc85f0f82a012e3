"""`build_engine(settings, metrics)`: the model, tokenizer and state cache that the settings name."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from server.engine.engine import Engine, EngineConfig

if TYPE_CHECKING:
    from cache.base import KVSpec
    from cache.config import RemoteConfig
    from cache.manager import StateCache
    from server.engine.ipc import Recorder
    from server.metrics import Metrics
    from server.model.runner import ModelRunner
    from server.model.tokenizer import Tokenizer
    from server.settings import Settings

    EngineMetrics = Metrics | Recorder  # the core process records into a `Recorder` (server.engine.ipc)

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype != "auto":
        return dtype
    return "bf16" if device.type == "cuda" else "fp32"


SHORT_PROMPT = 1023  # below GpuModelRunner.graph_row_min (1024): the rows of one eager padded pass


@dataclass(frozen=True)
class ServingDefaults:
    """Per-device defaults of the flags left unset. CPU: small prefill chunks keep decode steady on a few
    cores. CUDA: a step's fixed cost (launches, graph replays) is amortised over 8k prompt tokens, and
    checkpoints every 4k tokens; both multiples of the model's scan chunk (256 for published Mamba2), so that
    interval checkpoints fall on the scan's chunk boundaries."""

    prefill_budget: int
    checkpoint_interval: int
    decode_prefill_budget: int  # the prefill budget of a step in which some request decodes
    # prompts prefilled whole past that budget, within the full one: on CUDA those below the length at
    # which a row runs alone as graph pieces, since shorter rows share one eager pass whatever their number
    short_prompt: int = 0
    gather_seconds: float = 0.0  # from idle, the first step's wait for a burst's further requests

    @classmethod
    def resolve(cls, settings: Settings, device: torch.device, chunk: int) -> ServingDefaults:
        cuda = device.type == "cuda"
        budget = settings.prefill_budget or (8192 if cuda else 512)
        interval = settings.checkpoint_interval or (4096 if cuda else 256)
        decoding = settings.decode_prefill_budget or (min(budget, 2048) if cuda else budget)
        gather = settings.gather_ms if settings.gather_ms is not None else (20.0 if cuda else 0.0)
        return cls(budget, -(-interval // chunk) * chunk, decoding, SHORT_PROMPT if cuda else 0, gather / 1e3)


def build_cache(
    settings: Settings, runner: ModelRunner, metrics: EngineMetrics | None, interval: int
) -> StateCache | None:
    if settings.no_cache:
        return None
    from cache.config import CacheConfig
    from cache.manager import StateCache

    config = CacheConfig(
        hot_bytes=int(settings.hot_bytes),
        cold_bytes=int(settings.cold_bytes),
        disk_dir=settings.disk_dir,
        disk_bytes=int(settings.disk_bytes) if settings.disk_dir is not None else 0,
        hot_window=settings.hot_window,
        hot_dtype=settings.hot_dtype,
        cold_dtype=settings.cold_dtype,
        hot_kv_dtype=settings.hot_kv_dtype,
        checkpoint_interval=interval,
        max_captures=settings.max_checkpoints_per_request,
        device=str(runner.device),
        remote=remote_config(settings, runner.device),
    )
    cache = StateCache(config, runner.state_spec(), observer=metrics, kv=_kv_spec(runner))
    for line in budget_report(cache, settings.max_num_seqs):
        log.log(logging.WARNING if line.startswith("raise") else logging.INFO, line)
    return cache


def _kv_spec(runner: ModelRunner) -> KVSpec | None:
    """A hybrid model's attention KV as its checkpoints hold it; None for a pure SSM."""
    from server.model.hybrid_runner import HybridRunner

    return runner.kv_spec() if isinstance(runner, HybridRunner) else None


# capture reasons written through to the remote tier, per --remote-checkpoints
REMOTE_REASONS = {
    "ends": {"boundary", "prompt", "finish"},
    "finish": {"finish"},
    "all": {"boundary", "prompt", "finish", "interval"},
}


def remote_config(settings: Settings, device: torch.device) -> RemoteConfig | None:
    """The remote tier's configuration from the `--remote-*` flags (None: no `--remote-url`). On CUDA a
    fetch below 16k tokens of gain is not made by default: an H200 prefills that faster than it fetches
    a 2.7b checkpoint (BENCHMARKS.md, session 4)."""
    if settings.remote_url is None:
        return None
    from cache.config import RemoteConfig

    reasons = REMOTE_REASONS[settings.remote_checkpoints]
    return RemoteConfig(
        settings.remote_url,
        budget=int(settings.remote_bytes),
        ttl=settings.remote_ttl,
        dtype=settings.remote_dtype,
        password=settings.remote_secret(),
        tls_ca_file=settings.remote_tls_ca_file,
        tls_cert_file=settings.remote_tls_cert_file,
        tls_key_file=settings.remote_tls_key_file,
        timeout=settings.remote_timeout,
        reasons=frozenset(reasons),
        min_tokens=(
            settings.remote_min_tokens
            if settings.remote_min_tokens is not None
            else (16384 if device.type == "cuda" else 0)
        ),
    )


_BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_bytes(n: int, round_up: bool = False) -> str:
    """`n` bytes in the largest binary unit it fills, to one decimal ("512 MiB", "1.5 GiB", "24.3 KiB",
    "900 B"); `round_up` never shows less than `n` (for a budget that must hold it)."""
    for unit, size in _BYTE_UNITS:
        if n >= size:
            tenths = -(-n * 10 // size) if round_up else round(n * 10 / size)
            return f"{tenths / 10:,.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} B"


def budget_report(cache: StateCache, slots: int) -> list[str]:
    """What each tier's byte budget holds for this model, and advice when it is too small to keep at least
    one checkpoint per live slot (hot) or two (cold): then sessions evict each other's checkpoints."""
    cfg = cache.config
    tiers = [
        ("hot", "--hot-bytes", cfg.hot_bytes, cache.hot_layout.block_bytes, cfg.hot_dtype, slots),
        ("cold", "--cold-bytes", cfg.cold_bytes, cache.cold_layout.block_bytes, cfg.cold_dtype, 2 * slots),
    ]
    lines = []
    for name, flag, budget, block, dtype, want in tiers:
        held = budget // block
        lines.append(
            f"{name} tier: {format_bytes(budget)} holds {held} checkpoints of {format_bytes(block)} ({dtype})"
        )
        if budget > 0 and held < want:
            lines.append(
                f"raise {flag}: {held} {name} checkpoints for {slots} live slots; "
                f"{format_bytes(want * block, round_up=True)} keeps {want}"
            )
    return lines


def load_tokenizer(settings: Settings) -> Tokenizer:
    """The served model's tokenizer (the HTTP process loads its own with `--engine-process`)."""
    from server.model.loader import resolve_model_dir
    from server.model.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(resolve_model_dir(settings.model), model_name=settings.model_name)


@dataclass(frozen=True)
class LoadedModel:
    runner: ModelRunner
    arch: str  # "mamba2", "mamba1", or a hybrid's ("bamba", "nemotron_h", ...)
    chunk: int  # the scan chunk of the Mamba layers (1 for Mamba1): checkpoint intervals round up to it


def load_runner(
    settings: Settings, model_dir: Path, device: torch.device, dtype: str, state_dtype: torch.dtype
) -> LoadedModel:
    """The model in `model_dir` and its runner: a hybrid's (its KV reserved for `--max-model-len` tokens per
    slot) or a pure SSM's; either on the GPU kernels with CUDA graphs when available, else the torch path."""
    from server.model.gpu_runner import make_runner
    from server.model.hybrid_config import hybrid_arch
    from server.model.loader import load_model, read_raw_config

    if hybrid_arch(read_raw_config(model_dir)) is None:
        config, model = load_model(model_dir, device=device, dtype=dtype)
        runner = make_runner(
            model, settings.max_num_seqs, device, state_dtype=state_dtype, batch_graphs=settings.batch_graphs,
            packed_prefill=settings.packed_prefill,
        )  # fmt: skip
        return LoadedModel(runner, config.arch, config.chunk_size if config.arch == "mamba2" else 1)
    from server.model.gpu_hybrid_runner import make_hybrid_runner
    from server.model.hybrid_loader import load_hybrid
    from server.model.hybrid_runner import DEFAULT_MAX_MODEL_LEN

    cfg, hybrid = load_hybrid(model_dir, device=device, dtype=dtype)
    max_len = settings.max_model_len or DEFAULT_MAX_MODEL_LEN
    hybrid_runner = make_hybrid_runner(
        hybrid, settings.max_num_seqs, device, max_model_len=max_len, state_dtype=state_dtype
    )
    kv = hybrid_runner.kv
    log.info(
        "%s, KV pool: %d blocks of %d tokens, %s (%d tokens per slot, --max-model-len)",
        type(hybrid_runner).__name__,
        kv.allocator.num_blocks,
        kv.block_size,
        format_bytes(kv.allocator.num_blocks * kv.block_bytes),
        max_len,
    )
    assert cfg.mamba is not None  # a hybrid runner has Mamba layers
    return LoadedModel(hybrid_runner, cfg.arch, cfg.mamba.chunk_size)


def build_engine(settings: Settings, metrics: EngineMetrics | None = None) -> Engine:
    """Blocking (loads weights): the API calls it in a worker thread while /health answers 503."""
    from server.model.defaults import pick_device
    from server.model.gpu_hybrid_runner import GpuHybridRunner
    from server.model.gpu_runner import GpuModelRunner
    from server.model.loader import resolve_model_dir
    from server.model.state import STATE_DTYPES
    from server.model.tokenizer import Tokenizer

    device = pick_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    model_dir = resolve_model_dir(settings.model)
    state_dtype = STATE_DTYPES[settings.state_dtype]
    loaded = load_runner(settings, model_dir, device, dtype, state_dtype)
    runner = loaded.runner
    if isinstance(runner, GpuModelRunner | GpuHybridRunner):
        runner.warmup()  # capture the graphs before serving, not inside the first requests
    tokenizer = Tokenizer.from_pretrained(model_dir, model_name=settings.model_name)
    chunk = loaded.chunk
    defaults = ServingDefaults.resolve(settings, device, chunk)
    if (
        _kv_spec(runner) is not None
    ):  # a hybrid prefills one request a pass: bundling short ones saves nothing
        defaults = replace(defaults, short_prompt=0)
    cache = build_cache(settings, runner, metrics, defaults.checkpoint_interval)
    if cache is not None:
        cache.warmup(runner.slot_state(0))  # the codec kernels too, on the strides of a restore into a slot
        runner.reset(0)
    if metrics is not None:
        metrics.set_model_info(model=settings.model_name, arch=loaded.arch, dtype=dtype, device=device.type)
    log.info(
        "engine built: %s on %s (%s, ssm state %s), %d slots, prefill budget %d (%d while decoding), "
        "checkpoint interval %d, decode ahead %s, cache %s",
        settings.model_name,
        device,
        dtype,
        settings.state_dtype,
        settings.max_num_seqs,
        defaults.prefill_budget,
        defaults.decode_prefill_budget,
        defaults.checkpoint_interval,
        settings.decode_ahead,
        "off" if cache is None else "on",
    )
    return Engine(
        runner,
        tokenizer,
        cache,
        metrics=metrics,
        config=EngineConfig(
            max_slots=settings.max_num_seqs,
            prefill_budget=defaults.prefill_budget,
            decode_prefill_budget=defaults.decode_prefill_budget,
            short_prompt=defaults.short_prompt,
            gather_seconds=defaults.gather_seconds,
            gather_gap_seconds=settings.gather_gap_ms / 1e3,
            decode_ahead=None if settings.decode_ahead == "auto" else settings.decode_ahead == "on",
        ),
        profile_dir=settings.profile_dir,
    )
