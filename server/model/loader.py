"""Load a Mamba checkpoint from a local directory or a Hugging Face Hub id, in either format.

Formats:
- state-spaces: `config.json` with d_model / n_layer / ssm_cfg / pad_vocab_size_multiple /
  tie_embeddings, and `pytorch_model.bin`.
- Hugging Face transformers: `config.json` of a `Mamba2Config` / `MambaConfig` and
  `model.safetensors`, or shards listed in `model.safetensors.index.json`.

Sizes (inner width, heads, groups, state size, dt rank, kernel) are derived from the weight shapes;
the config only settles what shapes cannot (ngroups vs d_state, epsilons, chunk size, and the gated
norm's grouping: `tssc_norm_per_group`, see `GatedRMSNorm`). The architecture comes from the weights
too (Mamba2 has `dt_bias`); a config.json that declares another one (`model_type`, `architectures`,
state-spaces' `ssm_cfg.layer`) gets a warning at load. A hybrid's config.json (Mamba2 + attention
layers) is refused with an error that says so; `hybrid_loader.py` reads those (the server picks the loader).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from server.model.config import NORM_PER_GROUP_KEY, Arch, ConfigError, Format, ModelConfig
from server.model.hybrid_config import UNSUPPORTED_MODEL_TYPES, hybrid_arch
from server.model.lm import MambaLM

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SS_WEIGHTS = "pytorch_model.bin"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"]
# what config.json keys say the architecture is
HF_MODEL_TYPES: dict[str, Arch] = {"mamba2": "mamba2", "mamba": "mamba1", "falcon_mamba": "mamba1"}
HF_CLASSES: dict[str, Arch] = {
    "Mamba2ForCausalLM": "mamba2",
    "MambaForCausalLM": "mamba1",
    "FalconMambaForCausalLM": "mamba1",
}
SS_LAYERS: dict[str, Arch] = {"Mamba2": "mamba2", "Mamba1": "mamba1"}


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be found or read; the message names what is missing."""


def load_failure(exc: BaseException) -> str:
    """A failed load's cause on one line: a checkpoint error's own message (it names what is missing),
    any other exception's type and message."""
    message = " ".join(str(exc).split())
    if message and isinstance(exc, ModelLoadError | ConfigError):
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def resolve_model_dir(path_or_id: str | os.PathLike[str]) -> Path:
    """A local directory as is; otherwise a Hub repo id, downloaded (with progress) or taken
    from the local cache when HF_HUB_OFFLINE is set."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; --model takes a checkpoint directory or a Hub id")
        return path
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelLoadError(f"model directory {text} does not exist (and it is not a Hub id 'org/name')")
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    log.info("fetching %s from the Hugging Face Hub%s", repo_id, " (offline: cache only)" if offline else "")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(f"{repo_id} is not in the local Hub cache and HF_HUB_OFFLINE is set") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"could not fetch {repo_id} from the Hub: {exc}") from exc


def read_raw_config(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{cfg_path} must hold a JSON object")
    return raw


def reject_hybrid(raw: Mapping[str, Any], model_dir: Path) -> None:
    """A clear error for a model with attention layers, which this loader (and the server) does not serve."""
    arch = hybrid_arch(raw)
    if arch is not None:
        raise ModelLoadError(
            f"{model_dir} holds a hybrid Mamba2 + attention model ({arch}); this loader reads pure Mamba2 / "
            "Mamba1 models only (server.model.hybrid_loader.load_hybrid loads hybrids, which `tssc serve` "
            "serves on the torch path)"
        )
    model_type = raw.get("model_type")
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"{model_dir} holds a {model_type} model, which is not supported")


def detect_format(raw: Mapping[str, Any]) -> Format:
    if "d_model" in raw and "n_layer" in raw:
        return "state-spaces"
    if raw.get("model_type") in ("mamba2", "mamba", "falcon_mamba") or "hidden_size" in raw:
        return "hf"
    raise ModelLoadError("config.json is neither a state-spaces nor a transformers Mamba config")


def read_weights(model_dir: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint, from safetensors (single or sharded) or pytorch_model.bin."""
    if (model_dir / HF_INDEX).is_file():
        return _read_sharded(model_dir)
    if (model_dir / HF_WEIGHTS).is_file():
        return load_file(str(model_dir / HF_WEIGHTS))
    if (model_dir / SS_WEIGHTS).is_file():
        state = torch.load(model_dir / SS_WEIGHTS, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if isinstance(v, Tensor)}
    raise ModelLoadError(f"{model_dir} has no weights: expected {HF_WEIGHTS}, {HF_INDEX} or {SS_WEIGHTS}")


def _read_sharded(model_dir: Path) -> dict[str, Tensor]:
    index = json.loads((model_dir / HF_INDEX).read_text())
    shards = sorted(set(index.get("weight_map", {}).values()))
    missing = [s for s in shards if not (model_dir / s).is_file()]
    if missing:
        raise ModelLoadError(f"{model_dir} is missing shards listed in {HF_INDEX}: {', '.join(missing)}")
    weights: dict[str, Tensor] = {}
    for shard in shards:
        weights.update(load_file(str(model_dir / shard)))
    return weights


def canonical_names(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map both formats' names onto the state-spaces layout MambaLM uses."""
    out = {}
    for name, tensor in weights.items():
        name = name.removeprefix("model.")
        out[name.replace("backbone.embeddings.", "backbone.embedding.")] = tensor
    return out


def config_from_checkpoint(raw: Mapping[str, Any], weights: Mapping[str, Tensor]) -> ModelConfig:
    fmt = detect_format(raw)
    common = _shared_fields(raw, weights, fmt)
    arch: Arch = "mamba2" if "backbone.layers.0.mixer.dt_bias" in weights else "mamba1"
    warn_declared_arch(raw, fmt, arch)
    shapes = _mamba2_shapes(raw, weights, fmt) if arch == "mamba2" else _mamba1_shapes(weights)
    try:
        return ModelConfig(arch=arch, **common, **shapes)
    except (TypeError, ConfigError) as exc:
        raise ModelLoadError(f"inconsistent checkpoint: {exc}") from exc


def declared_archs(raw: Mapping[str, Any], fmt: Format) -> dict[str, Arch]:
    """What config.json declares the architecture to be, by the key that declares it."""
    out: dict[str, Arch] = {}
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type in HF_MODEL_TYPES:
        out[f"model_type {model_type!r}"] = HF_MODEL_TYPES[model_type]
    classes = raw.get("architectures")
    for name in classes if isinstance(classes, list) else []:
        if isinstance(name, str) and name in HF_CLASSES:
            out[f"architectures {name!r}"] = HF_CLASSES[name]
    if fmt == "state-spaces":
        ssm_cfg = raw.get("ssm_cfg") or {}
        layer = ssm_cfg.get("layer", "Mamba1") if isinstance(ssm_cfg, dict) else None
        if isinstance(layer, str) and layer in SS_LAYERS:
            default = "" if isinstance(ssm_cfg, dict) and "layer" in ssm_cfg else " (the default)"
            out[f"ssm_cfg.layer {layer!r}{default}"] = SS_LAYERS[layer]
    return out


def warn_declared_arch(raw: Mapping[str, Any], fmt: Format, arch: Arch) -> None:
    """Log a warning for each config.json key that declares another architecture than the weights'."""
    for key, declared in declared_archs(raw, fmt).items():
        if declared != arch:
            log.warning(
                "config.json declares %s (%s), but the weights are %s's: loading them as %s",
                declared,
                key,
                arch,
                arch,
            )


def _norm_per_group(raw: Mapping[str, Any]) -> bool:
    value = raw.get(NORM_PER_GROUP_KEY, True)
    if not isinstance(value, bool):
        raise ModelLoadError(f"config.json's {NORM_PER_GROUP_KEY} must be true or false, got {value!r}")
    return value


def _shared_fields(raw: Mapping[str, Any], w: Mapping[str, Tensor], fmt: Format) -> dict[str, Any]:
    emb = _need(w, "backbone.embedding.weight")
    n_layer = sum(1 for k in w if k.startswith("backbone.layers.") and k.endswith(".mixer.in_proj.weight"))
    if fmt == "state-spaces":
        if raw.get("d_intermediate", 0) or raw.get("attn_layer_idx"):
            raise ModelLoadError("hybrid checkpoints (MLP or attention layers) are not supported")
        ssm_cfg = raw.get("ssm_cfg") or {}
        unpadded, eps = int(raw.get("vocab_size", emb.shape[0])), float(raw.get("norm_epsilon", 1e-5))
        dt_limit = tuple(ssm_cfg.get("dt_limit", (0.0, float("inf"))))
    else:
        unpadded, eps = emb.shape[0], float(raw.get("layer_norm_epsilon", 1e-5))
        dt_limit = tuple(raw.get("time_step_limit", (0.0, float("inf"))))
    tied = "lm_head.weight" not in w or bool(
        w["lm_head.weight"].data_ptr() == emb.data_ptr() or torch.equal(w["lm_head.weight"], emb)
    )
    return {
        "d_model": emb.shape[1],
        "n_layer": n_layer,
        "vocab_size": emb.shape[0],
        "unpadded_vocab_size": min(unpadded, emb.shape[0]),
        "norm_eps": eps,
        "residual_in_fp32": bool(raw.get("residual_in_fp32", True)),
        "tie_embeddings": tied,
        "conv_bias": "backbone.layers.0.mixer.conv1d.bias" in w,
        "proj_bias": "backbone.layers.0.mixer.in_proj.bias" in w,
        "dt_limit": (json_number(dt_limit[0]), json_number(dt_limit[1])),
        "extra": {"format": fmt},
    }


def _mamba2_shapes(raw: Mapping[str, Any], w: Mapping[str, Tensor], fmt: Format) -> dict[str, Any]:
    conv = _need(w, "backbone.layers.0.mixer.conv1d.weight")  # (c, 1, k)
    nheads = _need(w, "backbone.layers.0.mixer.A_log").shape[0]
    d_inner = _need(w, "backbone.layers.0.mixer.out_proj.weight").shape[1]
    ssm_cfg = raw.get("ssm_cfg") or {}
    ngroups = int(ssm_cfg.get("ngroups", 1) if fmt == "state-spaces" else raw.get("n_groups", 1))
    bc = conv.shape[0] - d_inner  # 2 * g * n
    if bc <= 0 or bc % (2 * ngroups):
        raise ModelLoadError(
            f"conv width {conv.shape[0]} does not fit d_inner {d_inner} and {ngroups} groups"
        )
    chunk = ssm_cfg.get("chunk_size", 256) if fmt == "state-spaces" else raw.get("chunk_size", 256)
    return {
        "d_inner": d_inner,
        "headdim": d_inner // nheads,
        "ngroups": ngroups,
        "d_state": bc // (2 * ngroups),
        "d_conv": conv.shape[-1],
        "chunk_size": int(chunk),
        "expand": max(1, d_inner // _need(w, "backbone.embedding.weight").shape[1]),
        "norm_per_group": _norm_per_group(raw),
    }


def _mamba1_shapes(w: Mapping[str, Tensor]) -> dict[str, Any]:
    a_log = _need(w, "backbone.layers.0.mixer.A_log")  # (e, n)
    return {
        "d_inner": a_log.shape[0],
        "d_state": a_log.shape[1],
        "d_conv": _need(w, "backbone.layers.0.mixer.conv1d.weight").shape[-1],
        "dt_rank": _need(w, "backbone.layers.0.mixer.dt_proj.weight").shape[1],
        "expand": max(1, a_log.shape[0] // _need(w, "backbone.embedding.weight").shape[1]),
    }


def json_number(value: Any) -> float:
    """A JSON number, string ("inf") or transformers' {"__float__": "Infinity"} encoding."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _need(w: Mapping[str, Tensor], name: str) -> Tensor:
    if name not in w:
        raise ModelLoadError(f"checkpoint lacks tensor {name}")
    return w[name]


@contextmanager
def skip_init() -> Iterator[None]:
    """Skip random initialisation of modules whose weights are about to be loaded (on the meta
    device it only costs time: the first meta normal_ imports torch._refs, ~1.5 s)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def open_checkpoint(path_or_id: str | os.PathLike[str], dtype: str) -> tuple[Path, dict[str, Any]]:
    """Check the dtype name, find the checkpoint directory and read its config.json."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model_dir = resolve_model_dir(path_or_id)
    return model_dir, read_raw_config(model_dir)


def load_model(
    path_or_id: str | os.PathLike[str], *, device: str | torch.device = "cpu", dtype: str = "fp32"
) -> tuple[ModelConfig, MambaLM]:
    model_dir, raw = open_checkpoint(path_or_id, dtype)
    reject_hybrid(raw, model_dir)
    weights = canonical_names(read_weights(model_dir))
    cfg = config_from_checkpoint(raw, weights)
    with torch.device("meta"), skip_init():
        model = MambaLM(cfg)
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    result = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"weights do not match the config: missing {missing}, unexpected {result.unexpected_keys}"
        )
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    log.info(
        "loaded %s %s (%d layers, d_model %d) from %s", cfg.arch, dtype, cfg.n_layer, cfg.d_model, model_dir
    )
    return cfg, model
