"""Per-device defaults of the engine's step budgets (`ServingDefaults.resolve`)."""

from __future__ import annotations

import torch

from server.engine.factory import ServingDefaults
from server.settings import Settings

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def _resolve(device: torch.device, **flags: float) -> ServingDefaults:
    return ServingDefaults.resolve(Settings(**flags), device, chunk=256)


def test_cuda_prefills_less_while_requests_decode() -> None:
    d = _resolve(CUDA)
    assert (d.prefill_budget, d.decode_prefill_budget, d.checkpoint_interval) == (8192, 2048, 4096)
    assert d.short_prompt == 1023  # rows shorter than a graph piece share one eager pass: not split


def test_cpu_uses_one_budget_for_every_step() -> None:
    d = _resolve(CPU)
    assert d.prefill_budget == d.decode_prefill_budget == 512
    assert d.short_prompt == 0


def test_cuda_gathers_a_burst_from_idle_and_the_cpu_does_not_unless_asked() -> None:
    assert _resolve(CUDA).gather_seconds == 0.02 and _resolve(CPU).gather_seconds == 0.0
    assert _resolve(CPU, gather_ms=5).gather_seconds == 0.005
    assert _resolve(CUDA, gather_ms=0).gather_seconds == 0.0


def test_the_decode_budget_never_exceeds_a_smaller_prefill_budget_unless_asked() -> None:
    assert _resolve(CUDA, prefill_budget=1024).decode_prefill_budget == 1024
    assert _resolve(CUDA, prefill_budget=1024, decode_prefill_budget=4096).decode_prefill_budget == 4096
    assert _resolve(CPU, decode_prefill_budget=64).decode_prefill_budget == 64


def test_the_interval_rounds_up_to_the_scan_chunk() -> None:
    assert _resolve(CPU, checkpoint_interval=300).checkpoint_interval == 512
