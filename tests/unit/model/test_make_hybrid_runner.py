"""make_hybrid_runner: off CUDA (or without the kernels) the torch HybridRunner, with the KV bound it was given."""

from __future__ import annotations

from pathlib import Path

from server.model.gpu_hybrid_runner import GpuHybridRunner, make_hybrid_runner
from server.model.hybrid_loader import load_hybrid
from server.model.hybrid_runner import HybridRunner
from tests.tiny_hybrids import tiny_hybrid


def test_the_torch_runner_on_the_cpu(tmp_path: Path) -> None:
    tiny_hybrid("bamba", seed=1).save_pretrained(tmp_path, safe_serialization=True)
    runner = make_hybrid_runner(load_hybrid(tmp_path)[1], 2, "cpu", max_model_len=40)
    assert type(runner) is HybridRunner and not isinstance(runner, GpuHybridRunner)
    assert runner.max_model_len == 40 and runner.kv.allocator.num_blocks == 2 * 3
