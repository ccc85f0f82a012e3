"""Where the bundled demo model lives, and device selection shared by the CLI and the server."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

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
