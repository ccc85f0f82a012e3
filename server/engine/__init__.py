"""The engine: request lifecycle, torch-free scheduler, async continuous-batching loop, sampler,
detokenizer. `build_engine(settings, metrics)` builds one from the server settings."""

from __future__ import annotations

from server.engine.engine import Engine, EngineConfig, EngineError, EngineNotReady
from server.engine.factory import build_engine

__all__ = ["Engine", "EngineConfig", "EngineError", "EngineNotReady", "build_engine"]
