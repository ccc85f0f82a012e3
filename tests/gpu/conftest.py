"""GPU tests: marked `gpu`, skipped cleanly (not failed) where CUDA or the kernels are missing."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = None
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
    else:
        from server.model.kernels import load_kernels

        kernels = load_kernels()
        if not kernels.gpu_ready:
            skip = pytest.mark.skip(reason=f"GPU kernels unavailable: {kernels.summary()}")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)
