"""A hybrid Mamba2 + attention model measured side by side in one run (issue #16 item 5).

    python -m bench.hybrid_bench [--shape granite-4.0-h-micro | tiny] [--plan full | smoke]
                                 [--sections followup,bytes,runner] [--deadline SECONDS]
                                 [--cache-args "--hot-bytes 4GiB ..."] [--out FILE.json]

On one H200, from the repo root, in one call of at most 600 s (no network needed; the deadline leaves room
for device_env, a step that overruns its estimate and the servers' stops):

    . scripts/device_env.sh && HF_HUB_OFFLINE=1 python3 -m bench.hybrid_bench --deadline 450 \
        --out $OUT/hybrid_bench.json

A random-weight `GraniteMoeHybridForCausalLM` of Granite-4.0-H-Micro's published shape (`bench.hybrid_model`;
the demo tokenizer's 4,096-token vocab instead of 100,352) is written as a Hugging Face checkpoint, then
a cache server and a `--no-cache` server (`python -m server.serve`, `--max-model-len` above the longest
conversation) serve it while these steps run, most valuable first, each only when its estimate still fits
before `--deadline` (else it is skipped with a note):
  followup  8k-token conversations (2 each): first-turn and follow-up (+64 tokens) TTFT on both servers,
            and the prompt tokens each prefilled (cache: only what follows its checkpoint);
  bytes     one 32k-token conversation on the cache server: per tier (hot / cold), its checkpoints' SSM
            state and attention KV bytes (deltas of tssc_state_cache_bytes / _kv_bytes), against the KV
            that one full copy per checkpoint would take (GET /v1/sessions/{id}: each checkpoint's blocks
            counted in full; and sum of position x KV bytes per token in the model dtype);
  runner    in this process: decode tok/s at batch 1 and 16 and prefill of 2k / 8k tokens, of our runner
            (what `server.engine.factory.load_runner` picks: `HybridRunner`, the torch path, on CPU; the
            GPU runner on CUDA when there is one; its class is printed) against transformers' own
            implementation of the same checkpoint on the same device (`generate` / `forward` with its
            cache; the kernels it resolved for the Mamba layers are printed: without causal_conv1d or
            mamba_ssm it runs its torch reference);
  long      the 32k conversation on the --no-cache server (its cache side is the `bytes` one).
Tables are printed and appended, as measured, to the markdown file next to `--out`; `--out` gets every
number as JSON, rewritten after each step, so that a run cut short keeps what it measured.
`--shape tiny --plan smoke` runs it all on CPU in about half a minute (tests/unit/test_hybrid_bench.py).
`bench.hybrid_model` writes the model and measures in process; `bench.hybrid_serving` is the HTTP side.

Expected on one H200, not yet measured: writing the 3B checkpoint ~40 s, both servers up and warm ~60-90 s,
followup ~40 s, bytes ~30 s, runner ~120 s (two loads, Triton autotuning of transformers' mamba_ssm
kernels when they import, or the torch reference's 8k prefill), long ~30 s: about 6 minutes with the
stops; `--deadline 450` skips what would not fit in a 600 s call.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import e2e_bench as e2e
from bench._common import Report, Texts, ms, ratio
from bench.hybrid_model import PUBLISHED_VOCAB, SHAPES, Numbers, model_dtype, write_hybrid
from bench.hybrid_serving import Served, bytes_table, checkpoint_bytes, followup_tables, hybrid_cfg

SECTIONS = ("followup", "bytes", "runner")  # `long` runs with followup or bytes
# The long conversation's seed. Texts of one seed share their first tokens whatever their length, so the
# long conversation's seed is no short one's: its first turn is a miss, and its KV blocks are its own.
LONG_SEED = 1000


@dataclass(frozen=True)
class Plan:
    """What one run measures. Lengths are tokens; `estimates` are each step's expected seconds on the
    device the plan is for (a step starts only if it fits before the deadline)."""

    short_lengths: tuple[int, ...] = (8192,)
    repeats: int = 2
    long_length: int = 32768
    followup_new: int = 64
    answer_tokens: int = 16
    batches: tuple[int, ...] = (1, 16)
    prompt: int = 128  # decode: each row's prompt
    steps: int = 32  # decode: timed steps
    prefill_lengths: tuple[int, ...] = (2048, 8192)
    reps: int = 2
    warm_tokens: int = 8192  # an untimed conversation first on each server: kernels tuned at prefill's shapes
    checkpoint_interval: int = 0  # 0: the server's default
    max_num_seqs: int = 2
    estimates: dict[str, float] = field(
        default_factory=lambda: {"serve": 100, "followup": 40, "bytes": 30, "runner": 150, "long": 40}
    )

    @property
    def max_model_len(self) -> int:
        return max(self.long_length * 5 // 4, self.long_length + 1024)

    def e2e(self) -> e2e.Plan:
        """e2e_bench's plan, for its `conversation`."""
        return e2e.Plan(followup_new=self.followup_new, answer_tokens=self.answer_tokens)


PLANS = {
    "full": Plan(),
    "smoke": Plan(
        short_lengths=(256,), repeats=1, long_length=512, followup_new=16, answer_tokens=4, batches=(1, 4),
        prompt=16, steps=8, prefill_lengths=(128, 512), reps=1, warm_tokens=32, checkpoint_interval=64,
        estimates={"serve": 30, "followup": 10, "bytes": 10, "runner": 20, "long": 10},
    ),
}  # fmt: skip


@dataclass
class Context:
    args: argparse.Namespace
    plan: Plan
    budget: e2e.Budget
    rep: Report
    out: Path
    results: dict[str, Any] = field(default_factory=dict)
    attempted: set[str] = field(default_factory=set)

    def save(self) -> None:
        self.out.write_text(json.dumps(self.results, indent=1, default=str))

    def note(self, line: str) -> None:
        self.results.setdefault("notes", []).append(line)
        self.rep.write(["", f"_{line}_"])
        self.save()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[bool]:
        """Yields whether step `name` runs: selected, and fitting before the deadline by its estimate. A
        step that fails is noted (with its traceback on stderr) and the run goes on. A step runs once."""
        if not self.selected(name) or name in self.attempted:
            yield False
            return
        left = self.budget.deadline - time.perf_counter()
        if left < self.plan.estimates[name]:
            self.note(
                f"skipped {name}: {left:.0f} s left before --deadline, it needs ~{self.plan.estimates[name]:.0f} s"
            )
            yield False
            return
        self.attempted.add(name)
        try:
            with e2e.timed(name):
                yield True
        except Exception as exc:
            traceback.print_exc()
            self.note(f"{name} failed: {type(exc).__name__}: {exc}")
        self.save()

    def selected(self, name: str) -> bool:
        sections = self.args.sections
        return name in sections or (name == "long" and bool({"followup", "bytes"} & sections))


# ---- (b) follow-up TTFT and (c) bytes, over HTTP ---------------------------------------------------


def server_flags(plan: Plan, cache_args: str, cache: bool) -> list[str]:
    length = str(plan.max_model_len)
    flags = [
        "--max-num-seqs",
        str(plan.max_num_seqs),
        "--max-model-len",
        length,
        "--max-prompt-tokens",
        length,
    ]
    if plan.checkpoint_interval:
        flags += ["--checkpoint-interval", str(plan.checkpoint_interval)]
    return [*flags, "--shutdown-grace", "1", *(shlex.split(cache_args) if cache else ["--no-cache"])]


def step_followup(plan: Plan, served: Served) -> None:
    for length in plan.short_lengths:
        for seed in range(plan.repeats):
            served.talk(length, seed, cache=True)
            served.talk(length, seed, cache=False)


def step_long(plan: Plan, served: Served) -> None:
    key = (plan.long_length, LONG_SEED)
    if key not in served.on:
        served.talk(*key, cache=True)
    served.talk(*key, cache=False)


# ---- tables ---------------------------------------------------------------------------------------

RUNNER_HEADER = ["measure", "ours", "transformers", "ours vs transformers"]


def runner_rows(ours: Numbers, theirs: Numbers) -> list[list[str]]:
    rows = []
    for batch, rate in ours.decode.items():
        other = theirs.decode.get(batch, math.nan)
        rows.append([f"decode tok/s, batch {batch}", _num(rate), _num(other), ratio(rate, other)])
    for length, sec in ours.prefill.items():
        other = theirs.prefill.get(length, math.nan)
        rows.append([f"prefill {length:,} tokens, ms", ms(sec), ms(other), ratio(other, sec)])
    return rows


def _num(x: float) -> str:
    return "n/a" if x != x else f"{x:,.1f}"


# ---- the run --------------------------------------------------------------------------------------


def header(ctx: Context, model_dir: Path, flag_sets: list[list[str]]) -> None:
    import torch
    import transformers

    from bench.hybrid_model import transformers_paths

    shape, cuda = ctx.args.shape, torch.cuda.is_available()
    card = torch.cuda.get_device_name() if cuda else "cpu"
    cfg = json.loads((model_dir / "config.json").read_text())
    attn = hybrid_cfg(model_dir).n_attention
    vocab = f"vocab {cfg['vocab_size']:,}" + (
        f" (the demo tokenizer's; published {PUBLISHED_VOCAB[shape]:,})" if PUBLISHED_VOCAB[shape] else ""
    )
    desc = f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers ({attn} attention), {vocab}"
    paths = transformers_paths()
    ctx.results["header"] = {
        "card": card, "shape": shape, "config": {k: v for k, v in cfg.items() if k != "layer_types"},
        "attention_layers": attn, "dtype": str(model_dtype()), "commit": ctx.args.commit or e2e.commit(),
        "date": str(datetime.date.today()), "torch": torch.__version__, "transformers": transformers.__version__,
        "transformers_paths": paths, "plan": asdict(ctx.plan), "servers": flag_sets,
    }  # fmt: skip
    lines = [
        "", f"## Hybrid {cfg['architectures'][0]} ({shape} shape, random weights): {card}, {model_dtype()}",
        "", f"{desc}; commit {ctx.results['header']['commit']}, {datetime.date.today()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__} ({paths})",
    ]  # fmt: skip
    for name, flags in zip(("cache server", "no-cache server"), flag_sets, strict=False):
        lines += ["", f"{name}: `python -m server.serve --model <{shape}> {shlex.join(flags)}`"]
    ctx.rep.write(lines)
    ctx.save()


def run_runner(ctx: Context, model_dir: Path, hf_model: Any) -> None:
    from bench.hybrid_model import Measure, our_numbers, their_numbers

    p = ctx.plan
    m = Measure(p.batches, p.prefill_lengths, p.prompt, p.steps, p.reps, ctx.budget.deadline)
    ours = our_numbers(model_dir, m)
    e2e.free_device()
    theirs = their_numbers(hf_model, m)
    e2e.free_device()
    ctx.results["runner"] = {"ours": asdict(ours), "transformers": asdict(theirs)}
    title = (
        f"decode ({p.prompt}-token prompts, {p.steps} steps) and prefill in process: our runner "
        f"`{ours.name}` vs transformers `{theirs.name}`, same weights and device"
    )
    ctx.rep.table(title, RUNNER_HEADER, runner_rows(ours, theirs))
    paths = ctx.results["header"]["transformers_paths"]
    ctx.rep.write(
        [
            "",
            f"transformers' kernels for the Mamba layers (a torch reference where its package is missing): {paths}",
        ]
    )
    for note in [*(f"ours: {n}" for n in ours.notes), *(f"transformers: {n}" for n in theirs.notes)]:
        ctx.note(note)


def serve_steps(ctx: Context, model_dir: Path, flag_sets: list[list[str]], hf_model: Any) -> None:
    """The servers up for every step that needs them; `runner` in between, in this process."""
    with e2e.servers(model_dir, flag_sets, 1) as (cache, plain):
        served = Served(cache, plain, Texts(model_dir), ctx.plan.e2e())
        for server in (cache, plain):  # first requests: lazy initialisation and autotuning, untimed
            e2e.conversation(server, served.texts, ctx.plan.e2e(), ctx.plan.warm_tokens, 99)
        with ctx.step("followup") as go:
            if go:
                step_followup(ctx.plan, served)
        with ctx.step("bytes") as go:
            if go:
                ctx.results["bytes"] = data = checkpoint_bytes(
                    served, model_dir, ctx.plan.long_length, LONG_SEED
                )
                bytes_table(ctx.rep, data)
        with ctx.step("runner") as go:
            if go:
                run_runner(ctx, model_dir, hf_model)
        with ctx.step("long") as go:
            if go:
                step_long(ctx.plan, served)
        if served.on:
            ctx.results["followup"] = followup_tables(ctx.rep, served)


def run(ctx: Context, tmp: Path) -> None:
    """The checkpoint, then the servers' steps (with `runner` among them), then `runner` alone if the
    servers were not needed, did not fit, or failed before it."""
    with e2e.timed("checkpoint written"):
        model_dir, hf_model = write_hybrid(tmp / ctx.args.shape, ctx.args.shape)
    flag_sets = [server_flags(ctx.plan, ctx.args.cache_args, cache) for cache in (True, False)]
    header(ctx, model_dir, flag_sets)
    left, serve = ctx.budget.deadline - time.perf_counter(), ctx.plan.estimates["serve"]
    if not ctx.args.sections <= {"runner"}:
        if left < serve:
            ctx.note(
                f"skipped the servers: {left:.0f} s left before --deadline, starting them takes ~{serve:.0f} s"
            )
        else:
            try:
                serve_steps(ctx, model_dir, flag_sets, hf_model)
            except Exception as exc:  # the servers did not start, or a request outside a step failed
                traceback.print_exc()
                ctx.note(f"serving failed: {type(exc).__name__}: {exc}")
    with ctx.step("runner") as go:
        if go:
            run_runner(ctx, model_dir, hf_model)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="granite-4.0-h-micro", choices=list(SHAPES))
    parser.add_argument("--plan", default="full", choices=list(PLANS))
    parser.add_argument("--sections", default=",".join(SECTIONS), help="a comma-separated subset")
    parser.add_argument(
        "--cache-args", help="extra flags of the cache server (GPU default: 4GiB hot, 8GiB cold)"
    )
    parser.add_argument(
        "--deadline", type=float, default=450.0, help="seconds; no step starts unless it fits"
    )
    parser.add_argument("--commit", default="", help="the commit to print (default: git, else ./COMMIT)")
    parser.add_argument(
        "--out", type=Path, default=Path("hybrid_bench.json"), help="JSON; markdown beside it"
    )
    args = parser.parse_args(argv)
    args.sections = set(args.sections.split(","))
    if unknown := args.sections - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, e2e._terminate)
    if args.cache_args is None:
        import torch

        args.cache_args = "--hot-bytes 4GiB --cold-bytes 8GiB" if torch.cuda.is_available() else ""
    plan = PLANS[args.plan]
    budget = e2e.Budget(time.perf_counter() + args.deadline)
    ctx = Context(args, plan, budget, Report(args.out.with_suffix(".md")), args.out)
    with tempfile.TemporaryDirectory() as tmp:
        run(ctx, Path(tmp))
    ctx.save()


if __name__ == "__main__":
    main(sys.argv[1:])
