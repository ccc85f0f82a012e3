"""Fidelity of lossy checkpoint restores: the next-token distribution after an FP8 / FP16 restore vs an exact one.

For each prompt: prefill all but its last token, take the state (a checkpoint), then, from each restore
variant (exact, FP16 cold codec, FP8 hot codec), feed the last prompt token and a fixed continuation (the
exact path's greedy tokens) one decode step at a time. Per step: KL(exact || variant) of the next-token
distribution and whether the argmax (top-1) agrees. Reported: mean and max KL, top-1 agreement.

    python bench/fidelity.py                      # the bundled demo model (if present) and random 130m
    python bench/fidelity.py --models random-1.3b random-2.7b --device cuda --dtype bf16

Prints a markdown table; `--append FILE` appends it (README / model card).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cache.codec import make_codec, roundtrip  # noqa: E402
from server.model.config import ModelConfig  # noqa: E402
from server.model.lm import MambaLM  # noqa: E402
from server.model.runner import ModelRunner  # noqa: E402

log = logging.getLogger("fidelity")

# Mamba2 reference shapes (state-spaces/mamba2-*): d_model, n_layer. All: d_state 128, headdim 64, expand 2.
REAL_SHAPES: dict[str, tuple[int, int]] = {
    "130m": (768, 24),
    "370m": (1024, 48),
    "780m": (1536, 48),
    "1.3b": (2048, 48),
    "2.7b": (2560, 64),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Fidelity:
    codec: str
    mean_kl: float
    max_kl: float
    top1: float  # fraction of steps whose argmax equals the exact restore's
    steps: int


def real_config(size: str, vocab: int = 50288) -> ModelConfig:
    d_model, n_layer = REAL_SHAPES[size]
    return ModelConfig(
        arch="mamba2", d_model=d_model, n_layer=n_layer, vocab_size=vocab, d_state=128, headdim=64
    )


@torch.no_grad()
def random_model(
    cfg: ModelConfig, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> MambaLM:
    """A model of real shapes with the reference initialisation (A in [1, 16], dt log-uniform in [1e-3, 0.1]).

    Parameters are drawn on `device` (fast for multi-billion-parameter shapes on a GPU)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        model = MambaLM(cfg)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        val = torch.empty(p.shape, device=device, dtype=torch.float32)
        if leaf == "A_log":
            val = val.uniform_(1.0, 16.0, generator=gen).log()
        elif leaf == "dt_bias":
            dt = torch.exp(val.uniform_(math.log(1e-3), math.log(0.1), generator=gen))
            val = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif leaf == "D" or "norm" in name:
            val = val.fill_(1.0)
        elif leaf == "bias":
            val = val.zero_()
        else:
            val = val.normal_(0.0, 0.02, generator=gen)
        p.copy_(val)
    return model.to(dtype=dtype).eval()


def _decode_path(runner: ModelRunner, state: dict[str, torch.Tensor], tokens: Sequence[int]) -> torch.Tensor:
    """Restore `state` into slot 0 and decode `tokens` one at a time: log-probs (len(tokens), V) fp32."""
    runner.restore(0, state)
    rows = [torch.log_softmax(runner.decode([t], [0])[0].float(), dim=-1) for t in tokens]
    return torch.stack(rows)


def measure(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    n_tokens: int,
    codecs: Sequence[str] = ("fp16", "fp8"),
) -> list[Fidelity]:
    """Fidelity of each codec's restore against the exact restore, over `n_tokens` steps per prompt."""
    kls: dict[str, list[torch.Tensor]] = {c: [] for c in codecs}
    agree: dict[str, list[torch.Tensor]] = {c: [] for c in codecs}
    for prompt in prompts:
        runner.reset(0)
        runner.prefill(list(prompt[:-1]), 0)
        state = runner.capture(0)
        exact = _greedy_reference(runner, state, prompt[-1], n_tokens)
        feed = [prompt[-1], *exact.argmax(-1)[:-1].tolist()]
        for name in codecs:
            codec = make_codec(name)
            lossy = {k: roundtrip(codec, v) for k, v in state.items()}
            got = _decode_path(runner, lossy, feed)
            kls[name].append((exact.exp() * (exact - got)).sum(-1).clamp_min(0))  # (n,)
            agree[name].append(exact.argmax(-1) == got.argmax(-1))
    out = []
    for name in codecs:
        kl, ok = torch.cat(kls[name]), torch.cat(agree[name])
        out.append(Fidelity(name, kl.mean().item(), kl.max().item(), ok.float().mean().item(), kl.numel()))
    return out


def _greedy_reference(
    runner: ModelRunner, state: dict[str, torch.Tensor], first: int, n: int
) -> torch.Tensor:
    """Exact restore, greedy continuation: log-probs (n, V) of each step."""
    runner.restore(0, state)
    rows, tok = [], first
    for _ in range(n):
        row = torch.log_softmax(runner.decode([tok], [0])[0].float(), dim=-1)
        rows.append(row)
        tok = int(row.argmax())
    return torch.stack(rows)


def _prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def _load(name: str, device: str, dtype: str) -> tuple[str, ModelRunner]:
    from server.model.gpu_runner import make_runner

    if name == "demo":
        from server.model.defaults import bundled_model_dir
        from server.model.loader import load_model

        _, model = load_model(bundled_model_dir(), device=device, dtype=dtype)
    else:
        model = random_model(real_config(name.removeprefix("random-")), device=device, dtype=DTYPES[dtype])
    return name, make_runner(model, max_slots=1, device=device)


def table(rows: list[tuple[str, str, Fidelity]]) -> str:
    lines = [
        "| model | dtype | restore | mean KL (nats) | max KL (nats) | top-1 agreement | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, dtype, f in rows:
        lines.append(
            f"| {model} | {dtype} | {f.codec} | {f.mean_kl:.2e} | {f.max_kl:.2e} | {f.top1:.1%} | {f.steps} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo", "random-130m"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--append", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows: list[tuple[str, str, Fidelity]] = []
    for name in args.models:
        try:
            label, runner = _load(name, args.device, args.dtype)
        except Exception as exc:  # a missing demo model must not stop the random ones
            log.warning("skipping %s: %s", name, exc)
            continue
        prompts = _prompts(runner.vocab, args.prompts, args.prompt_len, seed=1)
        rows += [(label, args.dtype, f) for f in measure(runner, prompts, args.tokens)]
    text = table(rows)
    sys.stdout.write(text + "\n")
    if args.append is not None:
        with args.append.open("a") as fh:
            fh.write(f"\n### Restore fidelity ({args.device}, {args.dtype})\n\n{text}\n")


if __name__ == "__main__":
    main()
