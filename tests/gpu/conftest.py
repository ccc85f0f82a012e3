"""GPU tests: marked `gpu`, skipped cleanly (not failed) where CUDA or the kernels are missing.

Tests marked `triton_interpret` run the GPU runner's Triton kernels on CPU tensors under Triton's
interpreter instead (see test_interpret.py for the venv and the command); they are skipped unless
TRITON_INTERPRET=1 with triton, mamba-ssm and numpy < 2.4 importable.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

INTERPRET = "triton_interpret"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{INTERPRET}: Triton kernels on CPU tensors (TRITON_INTERPRET=1)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # one config per autotuned mamba-ssm kernel: the interpreter has no benchmarker (read at import)
        os.environ.setdefault("MAMBA_DETERMINISTIC", "1")


def _gpu_skip() -> pytest.MarkDecorator | None:
    if not torch.cuda.is_available():
        return pytest.mark.skip(reason="needs CUDA")
    from server.model.kernels import load_kernels

    kernels = load_kernels()
    if not kernels.gpu_ready:
        return pytest.mark.skip(reason=f"GPU kernels unavailable: {kernels.summary()}")
    return None


def _interpret_skip() -> pytest.MarkDecorator | None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return pytest.mark.skip(reason="runs under TRITON_INTERPRET=1 only")
    missing = [m for m in ("triton", "mamba_ssm") if importlib.util.find_spec(m) is None]
    if missing:
        return pytest.mark.skip(reason=f"needs {', '.join(missing)}")
    import numpy

    if tuple(int(v) for v in numpy.__version__.split(".")[:2]) >= (2, 4):
        # Triton 3.6's interpreter calls int() on 1-element arrays, which numpy 2.4 refuses
        return pytest.mark.skip(reason="the Triton interpreter needs numpy < 2.4")
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if "tests/gpu/" in str(item.fspath).replace("\\", "/")]
    interpreted = [item for item in ours if item.get_closest_marker(INTERPRET)]
    on_gpu = [item for item in ours if not item.get_closest_marker(INTERPRET)]
    skip = _interpret_skip() if interpreted else None
    for item in interpreted:
        if skip is not None:
            item.add_marker(skip)
    skip = _gpu_skip() if on_gpu else None
    for item in on_gpu:
        item.add_marker(pytest.mark.gpu)
        if skip is not None:
            item.add_marker(skip)


@pytest.fixture
def compiles() -> Iterator[list[str]]:
    """Names of the Triton kernels compiled or loaded (a miss of Triton's in-memory cache) meanwhile."""
    import triton

    seen: list[str] = []
    knobs = triton.knobs.runtime

    def on_compile(**kw: Any) -> bool:
        seen.append(str(kw.get("repr")))
        return False  # go on compiling

    old = knobs.jit_cache_hook
    knobs.jit_cache_hook = on_compile
    yield seen
    knobs.jit_cache_hook = old
