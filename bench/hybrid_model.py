"""The model `bench.hybrid_bench` serves, and what it measures in process (issue #16 item 5 (a)).

- `SHAPES`: Granite-4.0-H-Micro's published shape (`GraniteMoeHybridForCausalLM`, 3.19B parameters with its
  100,352-token vocab) and a tiny one of the same architecture for CPU;
- `write_hybrid`: seeded random weights of a shape, written as a Hugging Face checkpoint (config.json +
  safetensors) with the demo model's tokenizer and chat template; the transformers model that wrote it is
  returned too, so that the oracle runs the very weights the server loads;
- `our_numbers` / `their_numbers`: decode tok/s per batch and prefill seconds per length of our runner
  (whatever `server.engine.factory.load_runner` picks for the device) and of transformers (`generate` and
  `forward` with its own cache), on the same device and dtype;
- `transformers_paths`: which implementation transformers resolved for the Mamba layers' kernels
  (mamba_ssm / causal_conv1d, or its torch reference when they do not import).

Granite-4.0-H-Micro's values are those of the Hugging Face config.json of a GraniteMoeHybridForCausalLM
upload of that shape (40 layers, attention at 5/15/25/35, hidden 2048, 32 query / 8 kv heads, Mamba2 64
heads of 64, state 128, one group, chunk 256, MLP 8192, multipliers 12 / 0.015625 / 0.22 / logits 8, no
RoPE, tied embeddings) and the family's vocab of 100,352 (its GGUF metadata). The bench writes it with the
demo tokenizer's 4,096-token vocab instead (random weights stream text then; the full vocab's embedding
adds 0.2B parameters to the lm_head), and says so in its tables.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench._common import copy_demo_tokenizer, demo_vocab

_MICRO_LAYERS = ["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)]
SHAPES: dict[str, dict[str, Any]] = {
    "granite-4.0-h-micro": {
        "hidden_size": 2048, "num_hidden_layers": 40, "layer_types": _MICRO_LAYERS,
        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192,
        "shared_intermediate_size": 8192, "num_local_experts": 0, "num_experts_per_tok": 0,
        "mamba_n_heads": 64, "mamba_d_head": 64, "mamba_d_state": 128, "mamba_n_groups": 1,
        "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256, "mamba_conv_bias": True,
        "mamba_proj_bias": False, "embedding_multiplier": 12.0, "attention_multiplier": 0.015625,
        "residual_multiplier": 0.22, "logits_scaling": 8.0, "rms_norm_eps": 1e-5,
        "position_embedding_type": None, "tie_word_embeddings": True, "max_position_embeddings": 131072,
    },
    "tiny": {
        "hidden_size": 64, "num_hidden_layers": 4, "layer_types": ["mamba", "attention", "mamba", "mamba"],
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "shared_intermediate_size": 128, "num_local_experts": 0, "num_experts_per_tok": 0,
        "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16, "mamba_n_groups": 1,
        "mamba_chunk_size": 32, "embedding_multiplier": 12.0, "attention_multiplier": 0.0625,
        "residual_multiplier": 0.22, "logits_scaling": 8.0, "position_embedding_type": None,
        "tie_word_embeddings": True,
    },
}  # fmt: skip
PUBLISHED_VOCAB = {"granite-4.0-h-micro": 100_352, "tiny": 0}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype() -> torch.dtype:
    """What the server loads with `--dtype auto`: bf16 on CUDA, fp32 on CPU."""
    return torch.bfloat16 if device().type == "cuda" else torch.float32


def write_hybrid(directory: Path, shape: str) -> tuple[Path, Any]:
    """Seeded random weights (std 0.02) of `shape` with the demo vocab, built on the device, saved in the
    model dtype with the demo tokenizer -> (the directory, the transformers model, in eval mode)."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    torch.manual_seed(0)
    cfg = GraniteMoeHybridConfig(**SHAPES[shape], vocab_size=demo_vocab(), initializer_range=0.02)
    with torch.device(device()):
        built: Any = GraniteMoeHybridForCausalLM(cfg)
    model = built.to(model_dtype()).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return copy_demo_tokenizer(directory), model


def transformers_paths() -> str:
    """The implementation transformers resolved for each Mamba kernel of GraniteMoeHybrid, e.g.
    'causal_conv1d_fn: torch reference, mamba2_chunk_scan: mamba_ssm, ...'."""
    import inspect

    from transformers.models.granitemoehybrid import modeling_granitemoehybrid as hf

    parts = []
    for name in (
        "causal_conv1d_fn",
        "causal_conv1d_update",
        "mamba2_chunk_scan",
        "mamba2_selective_state_update",
    ):
        fn = getattr(hf, name, None)
        impl = inspect.getclosurevars(fn).nonlocals.get("implementation") if callable(fn) else None
        module = str(getattr(impl, "__module__", "") or "")
        where = (
            "unknown" if impl is None else "torch reference" if module.startswith("transformers") else module
        )
        parts.append(f"{name}: {where.split('.')[0] if where.startswith('mamba') else where}")
    return ", ".join(parts)


# ---- timing ----------------------------------------------------------------------------------------


def sync_seconds(fn: Callable[[], object], reps: int, before: Callable[[], object] | None = None) -> float:
    """Median wall seconds of fn() over `reps` calls, the device synchronized on each side; `before` runs
    untimed ahead of each call."""
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Measure:
    """What the in-process step measures: decode tok/s of `batches` rows (each after a `prompt`-token
    prompt, `steps` timed steps), prefill of each of `lengths` tokens, `reps` timed runs (medians); no
    measurement starts after `deadline` (a time.perf_counter time)."""

    batches: tuple[int, ...]
    lengths: tuple[int, ...]
    prompt: int
    steps: int
    reps: int
    deadline: float = math.inf


@dataclass
class Numbers:
    """One implementation's decode tok/s per batch and prefill seconds per length (NaN: not measured, with
    the reason in `notes`)."""

    name: str
    deadline: float = math.inf  # a time.perf_counter time: no measurement starts after it
    decode: dict[int, float] = field(default_factory=dict)
    prefill: dict[int, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _guarded(numbers: Numbers, what: str, fn: Callable[[], float]) -> float:
    """fn(), or NaN with a note when the device runs out of memory (transformers' torch reference scan
    materialises (chunks, chunk, chunk, heads, state) products: tens of GB at 8k tokens), or when fn raises
    ValueError; NaN too once the deadline has passed."""
    if time.perf_counter() > numbers.deadline:
        numbers.notes.append(f"{what}: skipped, past --deadline")
        return math.nan
    try:
        return fn()
    except torch.OutOfMemoryError:
        numbers.notes.append(f"{what}: out of device memory")
    except ValueError as exc:
        numbers.notes.append(f"{what}: {exc}")
    finally:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return math.nan


# ---- our runner -----------------------------------------------------------------------------------


def load_ours(model_dir: Path, slots: int, max_len: int) -> Any:
    """The runner the server builds for `model_dir` on this device (`load_runner`), warmed up as
    `build_engine` warms it (its CUDA graphs captured before it is timed)."""
    from server.engine.factory import load_runner, resolve_dtype
    from server.model.defaults import pick_device
    from server.model.state import STATE_DTYPES
    from server.settings import Settings

    settings = Settings.model_validate(
        {"model": str(model_dir), "max_num_seqs": slots, "max_model_len": max_len}
    )
    dev = pick_device(settings.device)
    dtype, state_dtype = resolve_dtype(settings.dtype, dev), STATE_DTYPES[settings.state_dtype]
    runner = load_runner(settings, model_dir, dev, dtype, state_dtype).runner
    warmup = getattr(runner, "warmup", None)
    if callable(warmup):
        warmup()
    return runner


def our_numbers(model_dir: Path, m: Measure) -> Numbers:
    runner = load_ours(model_dir, max(m.batches), max(*m.lengths, m.prompt + 2 * m.steps + 1))
    out = Numbers(type(runner).__name__, m.deadline)
    ids = torch.randint(0, runner.vocab, (max(*m.lengths, m.prompt),)).tolist()
    for b in m.batches:
        out.decode[b] = _guarded(
            out, f"decode {b}", partial(_our_decode, runner, b, ids[: m.prompt], m.steps)
        )
    for n in m.lengths:
        out.prefill[n] = _guarded(out, f"prefill {n}", partial(_our_prefill, runner, ids[:n], m.reps))
    return out


def _our_decode(runner: Any, batch: int, prompt: list[int], steps: int) -> float:
    """tok/s of `steps` greedy decode steps of `batch` rows, each after `prompt` (e2e_bench's step timing)."""
    from bench.e2e_bench import _step_ms

    for slot in range(batch):
        runner.reset(slot)
        runner.prefill(prompt, slot)
    return batch * 1e3 / _step_ms(runner, batch, steps)


def _our_prefill(runner: Any, ids: list[int], reps: int) -> float:
    return _warm_then_time(lambda: runner.prefill(ids, 0), reps, lambda: runner.reset(0))


def _warm_then_time(fn: Callable[[], object], reps: int, before: Callable[[], object] | None = None) -> float:
    """One untimed call first (kernel autotuning and graph capture at this shape), then the median of reps."""
    sync_seconds(fn, 1, before)
    return sync_seconds(fn, reps, before)


# ---- transformers -----------------------------------------------------------------------------------


def their_numbers(model: Any, m: Measure) -> Numbers:
    """transformers on `model`: decode tok/s from `generate` (greedy, its tokens timed as it streams them,
    the prefill left out), prefill as one `forward` over the prompt with its cache."""
    out, vocab, dev = Numbers(type(model).__name__, m.deadline), model.config.vocab_size, model.device
    with torch.inference_mode():
        for b in m.batches:
            ids = torch.randint(0, vocab, (b, m.prompt), device=dev)
            out.decode[b] = _guarded(
                out, f"decode {b}", partial(_generate_tok_s, model, ids, m.steps, m.reps)
            )
        for n in m.lengths:
            ids = torch.randint(0, vocab, (1, n), device=dev)
            run = partial(model, input_ids=ids, use_cache=True, logits_to_keep=1)
            out.prefill[n] = _guarded(out, f"prefill {n}", partial(_warm_then_time, run, m.reps))
    return out


def _generate_tok_s(model: Any, ids: torch.Tensor, steps: int, reps: int) -> float:
    """Rows x steps / the time between the first and the last new token of a greedy `generate` of steps + 1
    tokens (each token's time: when generate hands it to its streamer), median over reps after a warm-up."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:  # the prompt first, then each step's tokens
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def rate() -> float:
        clock = Clock()
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1, min_new_tokens=steps + 1,
            do_sample=False, pad_token_id=0, streamer=clock,
        )  # fmt: skip
        return ids.shape[0] * steps / (clock.times[-1] - clock.times[1])

    rate()
    return sorted(rate() for _ in range(reps))[reps // 2]
