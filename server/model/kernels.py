"""Import shim for the optional GPU kernels: mamba-ssm's Triton ops, its CUDA extension, causal-conv1d.

`import mamba_ssm` runs the package's `__init__`, which imports `selective_scan_cuda`, the CUDA extension
that a `MAMBA_SKIP_CUDA_BUILD=TRUE` build (the pure-Python wheel) lacks. The Triton kernels we use
(`selective_state_update`, `mamba_chunk_scan_combined`, the gated and fused-add RMSNorms) need no
extension, so when it is missing we register a stub module under that name before importing: anything
that really calls the extension gets a clear error, everything else imports and runs.

`load_kernels()` imports once per process, logs one line saying what is available, and returns
`Kernels`: availability flags and the functions the GPU runner calls. Nothing here raises on a host
without CUDA or without the packages; the runner then uses the torch path.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

EXTENSION = "selective_scan_cuda"
KernelFn = Callable[..., Any]


class MissingExtensionError(RuntimeError):
    """A mamba-ssm code path that needs the CUDA extension `selective_scan_cuda`, which is not built."""


@dataclass(frozen=True)
class SsdParts:
    """The stages of mamba-ssm's chunked scan (`_mamba_chunk_scan_combined_fwd`, private API of 2.x), so that
    the GPU runner can run them with fp32 chunk-entering states: the public function rounds those to the
    inputs' dtype and returns only the final state in fp32. The outputs' stage, and a packed row's chunk
    states, are ours (`gpu_ops.chunk_scan`, `gpu_ops.chunk_state`)."""

    chunk_cumsum: KernelFn  # _chunk_cumsum_fwd: dt -> (dA cumsum, dt) per chunk
    chunk_state: KernelFn  # _chunk_state_fwd: each chunk's own end state
    state_passing: KernelFn  # _state_passing_fwd: states entering each chunk, and the final one
    bmm_chunk: KernelFn  # _bmm_chunk_fwd: C^T B within each chunk


@dataclass(frozen=True)
class Kernels:
    triton_ops: bool  # mamba_ssm's Triton kernels imported
    selective_scan_cuda: bool  # the real CUDA extension (not our stub)
    causal_conv1d: bool  # causal_conv1d's CUDA extension
    triton: bool  # triton itself (our own kernels in gpu_ops)
    selective_state_update: KernelFn | None = None
    chunk_scan: KernelFn | None = None  # mamba_chunk_scan_combined
    gated_rmsnorm: KernelFn | None = None  # layernorm_gated.rmsnorm_fn: norm(y * silu(z)) per group
    add_rmsnorm: KernelFn | None = None  # layer_norm.rms_norm_fn: fused residual add + RMSNorm
    conv_update: KernelFn | None = None  # causal_conv1d_update
    ssd_parts: SsdParts | None = None  # the chunked scan's stages (None: their private names moved)
    error: str = ""  # why the Triton ops are missing, if they are

    @property
    def gpu_ready(self) -> bool:
        """Everything the GPU runner needs (causal-conv1d is optional: our Triton conv step replaces it)."""
        return self.triton_ops and self.triton

    def summary(self) -> str:
        def yn(flag: bool) -> str:
            return "yes" if flag else "no"

        line = (
            f"mamba_ssm triton ops {yn(self.triton_ops)}, selective_scan_cuda {yn(self.selective_scan_cuda)}"
            f"{'' if self.selective_scan_cuda else ' (stubbed)' if self.triton_ops else ''}, "
            f"causal_conv1d {yn(self.causal_conv1d)}"
        )
        return line + (f" ({self.error})" if self.error else "")


def _extension_stub() -> types.ModuleType:
    """A stand-in for `selective_scan_cuda` whose every attribute raises MissingExtensionError."""
    stub = types.ModuleType(EXTENSION)
    stub.__dict__["__tssc_stub__"] = True

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingExtensionError(
            f"{EXTENSION}.{name}: mamba-ssm was installed without its CUDA extension "
            "(MAMBA_SKIP_CUDA_BUILD); only its Triton kernels are available"
        )

    stub.__dict__["__getattr__"] = __getattr__
    return stub


def ensure_extension_importable() -> bool:
    """Register the stub when the real extension is absent. Returns True when the real one exists."""
    present = sys.modules.get(EXTENSION)
    if present is not None:
        return not getattr(present, "__tssc_stub__", False)
    if importlib.util.find_spec(EXTENSION) is not None:
        try:
            importlib.import_module(EXTENSION)
            return True
        except ImportError as exc:  # built against another torch, say
            log.warning("%s is installed but does not import (%s); using the stub", EXTENSION, exc)
    sys.modules[EXTENSION] = _extension_stub()
    return False


def _import_package(name: str) -> None:
    """Import a package; if its `__init__` fails, register it bare (no `__init__` run) so that its
    submodules still import."""
    try:
        importlib.import_module(name)
    except Exception as exc:  # the Triton submodules may still work
        sys.modules.pop(name, None)
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise
        log.warning("%s/__init__ failed (%s); importing its submodules directly", name, exc)
        sys.modules[name] = importlib.util.module_from_spec(spec)


def _import_mamba_ops() -> dict[str, KernelFn]:
    _import_package("mamba_ssm")
    ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    gated = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    add_norm = importlib.import_module("mamba_ssm.ops.triton.layer_norm")
    return {
        "selective_state_update": ssu.selective_state_update,
        "chunk_scan": ssd.mamba_chunk_scan_combined,
        "gated_rmsnorm": gated.rmsnorm_fn,
        "add_rmsnorm": add_norm.rms_norm_fn,
    }


def _import_ssd_parts() -> SsdParts | None:
    """The chunked scan's stages, where this mamba-ssm version has them under their 2.x names."""
    try:
        ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        return SsdParts(
            ssd._chunk_cumsum_fwd, ssd._chunk_state_fwd, ssd._state_passing_fwd, ssd._bmm_chunk_fwd
        )
    except (ImportError, AttributeError) as exc:
        log.warning("mamba-ssm's chunked scan stages are missing (%s): captures split prefills", exc)
        return None


def _import_conv_update() -> KernelFn | None:
    if importlib.util.find_spec("causal_conv1d") is None:
        return None
    try:
        module = importlib.import_module("causal_conv1d")
        importlib.import_module("causal_conv1d_cuda")
    except ImportError as exc:
        log.debug("causal_conv1d does not import: %s", exc)
        return None
    fn: KernelFn = module.causal_conv1d_update
    return fn


def _probe() -> Kernels:
    has_triton = importlib.util.find_spec("triton") is not None
    if importlib.util.find_spec("mamba_ssm") is None:
        return Kernels(False, False, False, has_triton, error="mamba-ssm not installed")
    real_ext = ensure_extension_importable()
    conv_update = _import_conv_update()
    try:
        ops = _import_mamba_ops()
    except Exception as exc:  # any import failure means: use the torch path
        return Kernels(
            False, real_ext, conv_update is not None, has_triton, conv_update=conv_update, error=str(exc)
        )
    return Kernels(
        True,
        real_ext,
        conv_update is not None,
        has_triton,
        selective_state_update=ops["selective_state_update"],
        chunk_scan=ops["chunk_scan"],
        gated_rmsnorm=ops["gated_rmsnorm"],
        add_rmsnorm=ops["add_rmsnorm"],
        conv_update=conv_update,
        ssd_parts=_import_ssd_parts(),
    )


@functools.cache
def load_kernels() -> Kernels:
    """Import once; log one line with what is available."""
    kernels = _probe()
    cuda = torch.cuda.is_available()
    log.info("kernels: %s; cuda %s", kernels.summary(), "yes" if cuda else "no")
    return kernels
