"""Where the bundled demo model lives, device selection shared by the CLI and the server, and host tensors
copied to the device without a host synchronisation."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

DEMO_MODEL_PACKAGE_DIR = "assets/demo-mamba2"


def bundled_model_dir() -> Path:
    """The demo Mamba2 model shipped as package data (server/assets/demo-mamba2)."""
    return Path(str(resources.files("server").joinpath(DEMO_MODEL_PACKAGE_DIR)))


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device`: pinned and copied non_blocking on CUDA (no host synchronisation, so work
    queued before is not waited for)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
