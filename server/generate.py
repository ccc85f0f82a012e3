"""`tssc generate`: one completion from the command line, with prefill and decode speeds."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from server.engine.detokenizer import IncrementalDetokenizer
from server.model.defaults import bundled_model_dir, pick_device
from server.model.loader import load_model, resolve_model_dir
from server.model.runner import ModelRunner
from server.model.tokenizer import Tokenizer


@dataclass
class Speeds:
    prefill_tokens: int
    prefill_s: float
    decode_tokens: int
    decode_s: float

    def line(self) -> str:
        pre = self.prefill_tokens / max(self.prefill_s, 1e-9)
        dec = self.decode_tokens / max(self.decode_s, 1e-9)
        return (
            f"prefill: {self.prefill_tokens} tokens, {pre:.1f} tok/s | "
            f"decode: {self.decode_tokens} tokens, {dec:.1f} tok/s"
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="checkpoint directory or Hub id (default: bundled demo model)"
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])


def sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> int:
    model_ref = args.model or str(bundled_model_dir())
    device = pick_device(args.device)
    _, model = load_model(model_ref, device=device, dtype=args.dtype)
    tok = Tokenizer.from_pretrained(resolve_model_dir(model_ref))
    runner = ModelRunner(model, max_slots=1)
    prompt = tok.encode(args.prompt)
    gen = torch.Generator().manual_seed(args.seed)
    detok = IncrementalDetokenizer(tok.decode, prompt_tail=prompt[-4:])
    sys.stdout.write(args.prompt)
    t0 = time.perf_counter()
    logits = runner.prefill(prompt, 0).last_logits
    _sync(device)
    t1 = time.perf_counter()
    produced = 0
    for _ in range(args.max_tokens):
        token = sample(logits, args.temperature, gen)
        produced += 1
        if token in tok.eos_ids:
            break
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
        logits = runner.decode([token], [0])[0]
    _sync(device)
    t2 = time.perf_counter()
    sys.stdout.write(detok.flush() + "\n")
    print(Speeds(len(prompt), t1 - t0, produced, t2 - t1).line(), file=sys.stderr)
    return 0
