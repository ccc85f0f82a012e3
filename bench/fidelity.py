"""Fidelity of lossy states: the next-token distribution after an FP8 / FP16 restore vs an exact one
(`--mode restore`, the default), or decoding on a bf16 live ssm state vs the fp32 one (`--mode state`).

restore: for each prompt, prefill all but its last token, take the state (a checkpoint), then, from each
restore variant (exact, FP16 cold codec, FP8 hot codec), feed the last prompt token and a fixed continuation
(the exact path's greedy tokens) one decode step at a time. Per step: KL(exact || variant) of the next-token
distribution and whether the argmax (top-1) agrees. Reported: mean and max KL, top-1 agreement.

state: for each prompt, prefill it on a runner with an fp32 live state and on one with a bf16 live state
(`--state-dtype bf16`), then decode `--tokens` greedy tokens on the fp32 one. The bf16 one is fed the same
tokens (teacher-forced: one divergence does not cascade): per step KL(fp32 || bf16) and top-1 agreement. A
second bf16 slot decodes its own greedy tokens (free-running): reported is how many leading tokens equal the
fp32 run's. The prefill starts from a zero state, so its logits are equal; the steps compared are the decode
steps, each of which reads and rounds the bf16 state. Both runners decode batches of two rows (the fp32 one a
twin row), so that `measure_state(..., state_dtype="fp32")` is exact: KL 0, every token agrees.

    python bench/fidelity.py                      # the bundled demo model (if present) and random 130m
    python bench/fidelity.py --models random-1.3b random-2.7b --device cuda --dtype bf16
    python bench/fidelity.py --mode state --models demo --tokens 256 --prompts 8
    python bench/fidelity.py --mode state --models random-1.3b --device cuda --dtype bf16 --tokens 256

Prints a markdown table; `--append FILE` appends it (README / model card).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cache.codec import make_codec, roundtrip  # noqa: E402
from server.model.config import ModelConfig  # noqa: E402
from server.model.lm import MambaLM  # noqa: E402
from server.model.runner import ModelRunner, PrefillSeg  # noqa: E402
from server.model.state import STATE_DTYPES  # noqa: E402

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


def _load_model(name: str, device: str, dtype: str) -> MambaLM:
    if name == "demo":
        from server.model.defaults import bundled_model_dir
        from server.model.loader import load_model

        return load_model(bundled_model_dir(), device=device, dtype=dtype)[1]
    return random_model(real_config(name.removeprefix("random-")), device=device, dtype=DTYPES[dtype])


def _load(name: str, device: str, dtype: str) -> tuple[str, ModelRunner]:
    from server.model.gpu_runner import make_runner

    return name, make_runner(_load_model(name, device, dtype), max_slots=1, device=device)


# ---- --mode state: a bf16 live ssm state against the fp32 one ------------------------------------------


@dataclass(frozen=True)
class StateFidelity:
    state_dtype: str
    mean_kl: float
    max_kl: float
    top1: float  # teacher-forced: fraction of steps whose argmax equals the fp32 state's
    free_run: tuple[int, ...]  # per prompt: leading free-running greedy tokens equal to the fp32 state's
    tokens: int  # decode steps per prompt

    @property
    def steps(self) -> int:
        return self.tokens * len(self.free_run)


@dataclass
class _StateRun:
    """One prompt's comparison, step by step."""

    kl: list[float] = field(default_factory=list)
    agree: list[bool] = field(default_factory=list)
    free_run: int = 0
    diverged: bool = False

    def add(self, want: torch.Tensor, forced: torch.Tensor, free: torch.Tensor) -> None:
        """want, forced: log-probs (V,) of the fp32 state and the teacher-forced bf16 state; free: logits of
        the free-running bf16 slot, whose input equals the fp32 run's until its first divergence."""
        self.kl.append(float((want.exp() * (want - forced)).sum().clamp_min(0)))
        self.agree.append(bool(want.argmax() == forced.argmax()))
        self.diverged = self.diverged or bool(free.argmax() != want.argmax())
        self.free_run += not self.diverged


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def _compare_state(ref: ModelRunner, test: ModelRunner, prompt: Sequence[int], n: int) -> _StateRun:
    """ref: fp32 state, slot 0 (slot 1 a twin, so that both runners decode batches of 2: other matmul shapes
    alone differ by ~1e-7 nats); test: bf16 state, slot 0 teacher-forced, slot 1 free-running."""
    for runner in (ref, test):
        runner.reset(0)
    seg = [PrefillSeg(list(prompt), 0)]  # the batched path: a prompt shorter than a chunk scans a short chunk
    first = int(ref.prefill_batch(seg)[0].last_logits.argmax())
    test.prefill_batch(seg)
    for runner in (ref, test):
        runner.restore(1, runner.capture(0))
    run, forced_tok, free_tok = _StateRun(), first, first
    for _ in range(n):
        want = _log_probs(ref.decode([forced_tok, forced_tok], [0, 1])[0])
        got = test.decode([forced_tok, free_tok], [0, 1])
        run.add(want, _log_probs(got[0]), got[1])
        forced_tok, free_tok = int(want.argmax()), int(got[1].argmax())
    return run


def measure_state(
    model: MambaLM, prompts: Sequence[Sequence[int]], n_tokens: int, device: str, state_dtype: str = "bf16"
) -> StateFidelity:
    """Decoding on a `state_dtype` live ssm state against the fp32 one, over `n_tokens` steps per prompt."""
    from server.model.gpu_runner import make_runner

    ref = make_runner(model, max_slots=2, device=device)
    test = make_runner(model, max_slots=2, device=device, state_dtype=STATE_DTYPES[state_dtype])
    runs = [_compare_state(ref, test, p, n_tokens) for p in prompts]
    kl = torch.tensor([k for r in runs for k in r.kl])
    agree = torch.tensor([a for r in runs for a in r.agree], dtype=torch.float32)
    free = tuple(r.free_run for r in runs)
    return StateFidelity(state_dtype, kl.mean().item(), kl.max().item(), agree.mean().item(), free, n_tokens)


def state_table(rows: list[tuple[str, str, StateFidelity]]) -> str:
    lines = [
        "| model | dtype | live ssm state | mean KL (nats) | max KL (nats) | top-1 agreement (teacher-forced) "
        "| free-running greedy agreement, tokens (mean / min) | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, dtype, f in rows:
        run = f"{sum(f.free_run) / len(f.free_run):.1f} / {min(f.free_run)} of {f.tokens}"
        lines.append(
            f"| {model} | {dtype} | {f.state_dtype} vs fp32 | {f.mean_kl:.2e} | {f.max_kl:.2e} | {f.top1:.1%} "
            f"| {run} | {len(f.free_run)} prompts x {f.tokens} tokens |"
        )
    return "\n".join(lines)


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


def _restore_rows(args: argparse.Namespace) -> str:
    rows: list[tuple[str, str, Fidelity]] = []
    for name in args.models:
        try:
            label, runner = _load(name, args.device, args.dtype)
        except Exception as exc:  # a missing demo model must not stop the random ones
            log.warning("skipping %s: %s", name, exc)
            continue
        prompts = _prompts(runner.vocab, args.prompts, args.prompt_len, seed=1)
        rows += [(label, args.dtype, f) for f in measure(runner, prompts, args.tokens)]
    return table(rows)


def _state_rows(args: argparse.Namespace) -> str:
    rows: list[tuple[str, str, StateFidelity]] = []
    for name in args.models:
        try:
            model = _load_model(name, args.device, args.dtype)
        except Exception as exc:
            log.warning("skipping %s: %s", name, exc)
            continue
        prompts = _prompts(model.cfg.unpadded_vocab_size, args.prompts, args.prompt_len, seed=1)
        rows.append((name, args.dtype, measure_state(model, prompts, args.tokens, args.device)))
        log.info("%s", state_table(rows[-1:]))
    return state_table(rows)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="restore", choices=["restore", "state"])
    ap.add_argument("--models", nargs="+", default=["demo", "random-130m"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--append", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = _restore_rows(args) if args.mode == "restore" else _state_rows(args)
    sys.stdout.write(text + "\n")
    if args.append is not None:
        title = "Restore fidelity" if args.mode == "restore" else "bf16 live state fidelity"
        with args.append.open("a") as fh:
            fh.write(f"\n### {title} ({args.device}, {args.dtype})\n\n{text}\n")


if __name__ == "__main__":
    main()
