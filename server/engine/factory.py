"""`build_engine(settings, metrics)`: the model, tokenizer and state cache that the settings name."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from server.engine.engine import Engine, EngineConfig

if TYPE_CHECKING:
    from cache.manager import StateCache
    from server.metrics import Metrics
    from server.model.runner import ModelRunner
    from server.settings import Settings

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype != "auto":
        return dtype
    return "bf16" if device.type == "cuda" else "fp32"


def build_cache(settings: Settings, runner: ModelRunner, metrics: Metrics | None) -> StateCache | None:
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
        checkpoint_interval=settings.checkpoint_interval,
        device=str(runner.device),
    )
    return StateCache(config, runner.state_spec(), observer=metrics)


def build_engine(settings: Settings, metrics: Metrics | None = None) -> Engine:
    """Blocking (loads weights): the API calls it in a worker thread while /health answers 503."""
    from server.model.defaults import pick_device
    from server.model.gpu_runner import GpuModelRunner, make_runner
    from server.model.loader import load_model, resolve_model_dir
    from server.model.tokenizer import Tokenizer

    device = pick_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    model_dir = resolve_model_dir(settings.model)
    config, model = load_model(model_dir, device=device, dtype=dtype)
    runner = make_runner(model, settings.max_num_seqs, device)  # GPU kernels + CUDA graphs when available
    if isinstance(runner, GpuModelRunner):
        runner.warmup()  # capture the graphs before serving, not inside the first requests
    tokenizer = Tokenizer.from_pretrained(model_dir, model_name=settings.model_name)
    cache = build_cache(settings, runner, metrics)
    if cache is not None:
        cache.warmup(runner.slot_state(0))  # the codec kernels too, on the strides of a restore into a slot
        runner.reset(0)
    if metrics is not None:
        metrics.set_model_info(model=settings.model_name, arch=config.arch, dtype=dtype, device=device.type)
    log.info(
        "engine built: %s on %s (%s), %d slots, cache %s",
        settings.model_name,
        device,
        dtype,
        settings.max_num_seqs,
        "off" if cache is None else "on",
    )
    return Engine(
        runner,
        tokenizer,
        cache,
        metrics=metrics,
        config=EngineConfig(max_slots=settings.max_num_seqs),
    )
