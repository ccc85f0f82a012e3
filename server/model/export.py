"""Save a MambaLM in either checkpoint format (tests, the demo model, conversions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from server.model.lm import MambaLM


def save_pretrained(
    model: MambaLM,
    directory: str | Path,
    fmt: Literal["hf", "state-spaces"] = "hf",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json plus model.safetensors (hf) or pytorch_model.bin (state-spaces)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state = {
        k: v.detach().to("cpu", dtype or v.dtype).contiguous().clone() for k, v in model.state_dict().items()
    }
    if fmt == "hf":
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}
        (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        (out / "config.json").write_text(json.dumps(cfg.to_state_spaces(), indent=2))
        torch.save(state, out / "pytorch_model.bin")
    return out
