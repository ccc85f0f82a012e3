"""Does the state cache change the model's answers? An offline evaluation against real servers (issue #14).

Tasks (`bench/eval_tasks.py`), built from the held-out standard-library files the demo model was evaluated
on, locally: a 4-way multiple-choice question at the start of a line ("which of these four lines of the
same file comes next", decided at the lines' first token), and at a subset of the same places a 64-token
greedy continuation (the next lines). The same requests, in the same order, one at a time, go to one
server per cache setting: `--no-cache` (the reference), the default tiers (FP8 hot, FP16 cold),
`--hot-dtype fp16`, and `--hot-dtype fp32 --cold-dtype fp32`, a lossless control that must give the
reference's answers and tokens.

Why the requests are sent directly, not through lm-eval's loglikelihood:
- a request that asks for prompt logprobs (`echo` + `logprobs`, what lm-eval's loglikelihood sends) is
  prefilled from the start and never restores a checkpoint (it needs every position's logits), so it
  would measure nothing about the cache;
- lm-eval's `local-completions` sends no per-request `logit_bias` and keeps no top logprobs of generated
  tokens, which the multiple-choice scoring and the KL below need; it also reorders requests (longest
  context first), so contexts no longer grow request by request.
So every question is one `/v1/completions` request on token ids: `max_tokens` 1, `temperature` 0,
`logit_bias` +100 on the four choices and `logprobs` 20. The server's logprobs are those of the raw
distribution (before the bias), so the sampled token is the choice with the highest raw logprob (exactly
lm-eval's `acc` for one-token choices), and the top-20 raw logprobs come back for the KL. `--lm-eval`
adds the next-line task run through lm-eval itself (`local-completions`, `generate_until` until the end
of the line, exact match against the true line; the body's `session_id` travels in the task's
`generation_kwargs`), which needs no logprobs.

Sessions: every request carries one `session_id` per server, and each file's questions go in file order,
so a question's context extends the previous one's and (all but a file's first) resumes from that
request's checkpoint, prefilling the lines between. Reported is the share of requests that restored
(`usage.prompt_tokens_details.cached_tokens` > 0) and, from `tssc_state_cache_lookups_total`, which tier
served them: the FP8 codec only matters for hot-tier hits. The FP8 error enters the state at the restore and
fades as the following tokens are prefilled on the exact live state, so the distance from the restore to
the answer matters: `--restore-gap N` sends, before each question, a priming request of its context minus
the last N tokens, so that the question resumes N tokens short of its answer (N=1: the worst case, a
one-token follow-up); the table reports the mean tokens prefilled after a restore.

Measures, per server against `--no-cache`, each with a 95% confidence interval:
- accuracy (Wilson), its paired difference from the reference (paired bootstrap over questions) and the
  number of answers that changed;
- KL(reference || server) of the next-token distribution, from the top-20 logprobs with the rest of the
  vocabulary lumped into one bin (`bench.eval_stats.topk_kl`: a lower bound, exact on that partition):
  at each question, and at each continuation position up to the first token where the two greedy
  continuations differ (after it their contexts differ); mean with a bootstrap interval over questions /
  continuations, and the max (a max has no useful interval);
- the share of continuations identical to the reference over all 64 tokens (Wilson), and the mean number
  of leading tokens they agree on;
- the share of requests that restored from a checkpoint (Wilson), and the hot / cold split of the hits.

    .venv/bin/python bench/eval_cache.py --questions 300 --continuations 50 --out BENCHMARKS.md   # CPU
    python bench/eval_cache.py --model runs/m130 --questions 1000 --continuations 200               # GPU
    python bench/eval_cache.py --train-130m runs/m130 --train-minutes 6 --questions 1000          # GPU

`--train-130m DIR` first trains a mamba2-130m-shape model (d_model 768, 24 layers, d_state 128) on the same
corpus split with `server/train` for `--train-minutes` (the schedule decays over the time budget), writes it
to DIR (about 180 MB in fp16: not for the repo), then evaluates it like `--model DIR`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import emit, write_random_model  # noqa: E402
from bench.eval_stats import Interval, bootstrap_mean, bootstrap_paired_diff, topk_kl, wilson  # noqa: E402
from bench.eval_tasks import Question, build_questions, heldout_documents  # noqa: E402
from server.settings import default_model_path  # noqa: E402
from tests.integration.conftest import metric  # noqa: E402
from tests.integration.server_proc import ServerProc, start_server  # noqa: E402

log = logging.getLogger("eval_cache")
MODEL = "eval"
TOP = 20  # the server's most top logprobs
BIAS = 100.0
SERVERS: dict[str, list[str]] = {
    "no-cache": ["--no-cache"],
    "fp8 hot / fp16 cold (default)": [],
    "fp16 hot / fp16 cold": ["--hot-dtype", "fp16"],
    "fp32 / fp32 (lossless control)": ["--hot-dtype", "fp32", "--cold-dtype", "fp32"],
}
REFERENCE = "no-cache"
LOOKUP_RESULTS = ("hot_hit", "cold_hit", "disk_hit", "miss")

TopLogprobs = dict[int, float]  # token id -> raw logprob


@dataclass
class Reply:
    """One completion: generated token ids, their top logprobs, and the prompt tokens restored."""

    tokens: list[int]
    top: list[TopLogprobs]
    cached: int  # prompt tokens restored from a checkpoint
    prompt: int  # prompt tokens


@dataclass
class Run:
    """One server's replies to every question (and continuation), in order."""

    name: str
    answers: list[Reply] = field(default_factory=list)
    continuations: list[Reply] = field(default_factory=list)
    lookups: dict[str, float] = field(default_factory=dict)  # tssc_state_cache_lookups_total by result

    @property
    def replies(self) -> list[Reply]:
        return self.answers + self.continuations


def _token_id(name: str) -> int:
    return int(name.removeprefix("token_id:"))


def _reply(body: dict[str, Any]) -> Reply:
    lp = body["choices"][0]["logprobs"]
    tops = [{_token_id(k): float(v) for k, v in top.items()} for top in lp["top_logprobs"]]
    usage = body["usage"]
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    return Reply([_token_id(t) for t in lp["tokens"]], tops, cached, int(usage["prompt_tokens"]))


def _complete(client: httpx.Client, prompt: Sequence[int], session: str, **fields: Any) -> Reply:
    body = {"model": MODEL, "prompt": list(prompt), "temperature": 0, "logprobs": TOP}
    body |= {"return_tokens_as_token_ids": True, "session_id": session, **fields}
    resp = client.post("/v1/completions", json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:500]}")
    return _reply(resp.json())


def ask(client: httpx.Client, q: Question, session: str) -> Reply:
    """The multiple-choice question: the greedy pick among the choices (raw logprobs decide)."""
    return _complete(client, q.context, session, max_tokens=1, logit_bias={str(c): BIAS for c in q.choices})


def continue_(client: httpx.Client, q: Question, session: str, tokens: int) -> Reply:
    return _complete(client, q.context, session, max_tokens=tokens, ignore_eos=True)


def prime(client: httpx.Client, q: Question, session: str, gap: int) -> None:
    """Leave a checkpoint `gap` tokens short of the question's context (its prompt end), to resume from."""
    if gap > 0 and len(q.context) > gap:
        _complete(client, q.context[:-gap], session, max_tokens=1)


def _lookups(srv: ServerProc) -> dict[str, float]:
    return {r: metric(srv.base_url, "tssc_state_cache_lookups_total", result=r) for r in LOOKUP_RESULTS}


@dataclass(frozen=True)
class Plan:
    """How the requests go: continuation length, priming gap (0: none), extra server flags."""

    tokens: int = 64
    restore_gap: int = 0
    server_args: tuple[str, ...] = ()


def run_server(name: str, model: Path, questions: Sequence[Question], plan: Plan) -> Run:
    """Start one server, send every question in order (and its continuation, where marked), stop it."""
    args = ["--model", str(model), "--served-model-name", MODEL, *SERVERS[name], *plan.server_args]
    run, session = Run(name), "eval-" + name.split()[0]
    with start_server(args, timeout=600) as srv, httpx.Client(base_url=srv.base_url, timeout=600) as client:
        before = _lookups(srv)
        for i, q in enumerate(questions):
            prime(client, q, session, plan.restore_gap)
            run.answers.append(ask(client, q, session))
            if q.continuation:
                run.continuations.append(continue_(client, q, session, plan.tokens))
            if (i + 1) % 50 == 0:
                log.info("%s: %d / %d questions", name, i + 1, len(questions))
        run.lookups = {k: v - before[k] for k, v in _lookups(srv).items()}
    return run


# ---- comparison -------------------------------------------------------------------------------------


def _agree_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def continuation_kls(ref: Reply, got: Reply) -> list[float]:
    """KL at each position whose context the two continuations share: up to and with the first fork."""
    shared = min(_agree_len(ref.tokens, got.tokens) + 1, len(ref.top), len(got.top))
    return [topk_kl(ref.top[i], got.top[i]) for i in range(shared)]


@dataclass(frozen=True)
class Comparison:
    server: str
    accuracy: Interval
    delta: Interval  # accuracy minus the reference's, paired
    changed: int  # answers that differ from the reference's
    questions: int
    answer_kl: Interval
    answer_kl_max: float
    step_kl: Interval
    step_kl_max: float
    identical: Interval  # continuations equal to the reference's over every token
    agree_mean: float  # leading tokens equal to the reference's, mean
    restored: Interval  # requests with cached_tokens > 0
    cached_share: float  # prompt tokens restored / prompt tokens, over all requests
    prefilled: float  # prompt tokens prefilled after a restore, mean over the requests that restored
    hits: dict[str, float]


def _correct(run: Run, questions: Sequence[Question]) -> list[bool]:
    return [r.tokens[0] == q.choices[q.answer] for r, q in zip(run.answers, questions, strict=True)]


def compare(ref: Run, run: Run, questions: Sequence[Question]) -> Comparison:
    ok, ref_ok = _correct(run, questions), _correct(ref, questions)
    answer_kls = [topk_kl(a.top[0], b.top[0]) for a, b in zip(ref.answers, run.answers, strict=True)]
    pairs = list(zip(ref.continuations, run.continuations, strict=True))
    step_kls = [continuation_kls(a, b) for a, b in pairs]
    agree = [_agree_len(a.tokens, b.tokens) for a, b in pairs]
    flat = [k for ks in step_kls for k in ks]
    hits = [r for r in run.replies if r.cached > 0]
    return Comparison(
        server=run.name,
        accuracy=wilson(sum(ok), len(ok)),
        delta=bootstrap_paired_diff(ok, ref_ok),
        changed=sum(a.tokens[0] != b.tokens[0] for a, b in zip(ref.answers, run.answers, strict=True)),
        questions=len(ok),
        answer_kl=bootstrap_mean([[k] for k in answer_kls]),
        answer_kl_max=max(answer_kls, default=float("nan")),
        step_kl=bootstrap_mean(step_kls),
        step_kl_max=max(flat, default=float("nan")),
        identical=wilson(sum(a.tokens == b.tokens for a, b in pairs), len(pairs)),
        agree_mean=sum(agree) / len(agree) if agree else float("nan"),
        restored=wilson(len(hits), len(run.replies)),
        cached_share=sum(r.cached for r in run.replies) / max(1, sum(r.prompt for r in run.replies)),
        prefilled=sum(r.prompt - r.cached for r in hits) / len(hits) if hits else float("nan"),
        hits=run.lookups,
    )


# ---- tables -----------------------------------------------------------------------------------------


def _hits(c: Comparison) -> str:
    hot, cold = c.hits.get("hot_hit", 0.0), c.hits.get("cold_hit", 0.0) + c.hits.get("disk_hit", 0.0)
    return f"{hot:.0f} / {cold:.0f}" if hot + cold else "-"


def tables(rows: Sequence[Comparison], title: str, about: str, tokens: int) -> str:
    mc = [
        "| server | accuracy [95% CI] | vs --no-cache, paired [95% CI] | answers changed | KL at the answer, mean "
        "[95% CI] | max | requests restored [95% CI] | prompt tokens restored | prefilled after a restore, mean "
        "| hits hot / cold |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gen = [
        f"| server | identical {tokens}-token continuations [95% CI] | leading tokens equal, mean | KL per position "
        "(to the first fork), mean [95% CI] | max |",
        "|---|---|---|---|---|",
    ]
    for c in rows:
        mc.append(
            f"| {c.server} | {c.accuracy.percent()} | {c.delta.signed_percent()} | {c.changed} / {c.questions} "
            f"| {c.answer_kl.sci()} | {c.answer_kl_max:.2e} | {c.restored.percent()} | {c.cached_share:.1%} "
            f"| {'-' if c.prefilled != c.prefilled else f'{c.prefilled:.0f}'} | {_hits(c)} |"
        )
        gen.append(
            f"| {c.server} | {c.identical.percent()} | {c.agree_mean:.1f} | {c.step_kl.sci()} "
            f"| {c.step_kl_max:.2e} |"
        )
    return "\n".join([f"### {title}", "", about, "", *mc, "", *gen, ""])


def verdict(rows: Sequence[Comparison]) -> list[str]:
    """One plain line per lossy server: does its accuracy differ measurably from the reference's?"""
    out = []
    for c in rows:
        if c.server == REFERENCE:
            continue
        word = (
            "differs measurably (the interval excludes 0)"
            if c.delta.excludes_zero()
            else "no measurable change"
        )
        out.append(f"- {c.server}: accuracy {c.delta.signed_percent()} vs --no-cache: {word}.")
    return out


# ---- the run ----------------------------------------------------------------------------------------


def evaluate(
    model: Path, questions: Sequence[Question], servers: Sequence[str], plan: Plan, parallel: bool = False
) -> list[Comparison]:
    """Every server's run, one after another or (`parallel`) all at once, each server still answering its
    own requests one at a time in order: a server's answers do not depend on what else runs on the device."""
    if parallel:
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            futures = {name: pool.submit(run_server, name, model, questions, plan) for name in servers}
            runs = {name: f.result() for name, f in futures.items()}
    else:
        runs = {name: run_server(name, model, questions, plan) for name in servers}
    ref = runs[REFERENCE]
    return [compare(ref, r, questions) for r in runs.values()]


def load_questions(model: Path, args: argparse.Namespace) -> list[Question]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    docs = heldout_documents(model)
    return build_questions(
        tok, docs, args.questions, args.continuations, args.max_context, args.min_gap, args.seed
    )


def report(model: Path, args: argparse.Namespace) -> tuple[str, list[Comparison]]:
    """The markdown tables (and the lm-eval one with `--lm-eval`), and the comparisons behind them."""
    questions = load_questions(model, args)
    servers = [REFERENCE, *(s for s in args.servers if s != REFERENCE)]
    plan = Plan(args.tokens, args.restore_gap, tuple(args.server_args))
    rows = evaluate(model, questions, servers, plan, args.parallel)
    files = len({q.path for q in questions})
    conts = sum(q.continuation for q in questions)
    title = f"Cache effect on answers: {model.name} ({_machine()}, {datetime.date.today().isoformat()})"
    about = (
        f"`bench/eval_cache.py`: {len(questions)} four-way questions from {files} held-out stdlib files and "
        f"{conts} greedy {args.tokens}-token continuations, one session per server, questions in file order "
        "(each resumes from the previous one's checkpoint). KL is from top-20 logprobs, tail lumped."
    )
    text = tables(rows, title, about, args.tokens) + "\n".join(verdict(rows)) + "\n"
    if args.lm_eval:
        from bench.eval_lm import lm_eval_table

        log.info("direct requests:\n%s", text)

        text += "\n" + lm_eval_table(model, questions, servers, args.server_args) + "\n"
    return text, rows


def to_json(rows: Sequence[Comparison]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2, default=str)


def _machine() -> str:
    import torch

    from bench.ttft_cpu import cpu_name

    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()


def train_130m(out: Path, minutes: float) -> Path:
    """A mamba2-130m-shape model trained on the stdlib corpus for `minutes` (on the GPU; on CPU only as a
    smoke test of this path), with the demo tokenizer."""
    import time

    import torch

    from server.model.defaults import bundled_model_dir
    from server.train.config import TrainConfig
    from server.train.run import RunPaths, train_and_export

    reserve = 90.0  # evaluation, samples and saving
    cfg = TrainConfig(
        d_model=768, n_layer=24, d_state=128, headdim=64, lr=1e-3, warmup_steps=200, max_steps=1_000_000,
        time_budget_s=minutes * 60 + reserve, reserve_s=reserve, eval_every=250,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    paths = RunPaths(out, tokenizer_dir=bundled_model_dir())
    train_and_export(cfg, paths, f"bench/eval_cache.py --train-130m {out}", time.monotonic())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(default_model_path()))
    ap.add_argument("--shape", help="random weights of this shape (bench/_common.py SHAPES) instead")
    ap.add_argument(
        "--train-130m", type=Path, help="train a mamba2-130m-shape model into this dir first (GPU)"
    )
    ap.add_argument("--train-minutes", type=float, default=6.0)
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--continuations", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=64, help="continuation length")
    ap.add_argument(
        "--max-context", type=int, default=2048, help="questions only in each file's first N tokens"
    )
    ap.add_argument("--min-gap", type=int, default=32, help="fewest tokens between a file's questions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--restore-gap", type=int, default=0, help="prime a checkpoint N tokens before each answer (0: off)"
    )
    ap.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    ap.add_argument(
        "--server-args", nargs=argparse.REMAINDER, default=[], help="passed to every server (last)"
    )
    ap.add_argument(
        "--parallel",
        action="store_true",
        help="run the servers side by side (each still one request at a time)",
    )
    ap.add_argument("--lm-eval", action="store_true", help="also run the next-line task through lm-eval")
    ap.add_argument("--json", type=Path, help="write the comparisons here as JSON")
    ap.add_argument("--out", type=Path, help="append the tables to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.train_130m is not None:
            model = train_130m(args.train_130m, args.train_minutes)
        elif args.shape:
            model = write_random_model(Path(tmp) / args.shape, args.shape)
        text, rows = report(model, args)
    emit(text, args.out)
    if args.json is not None:
        args.json.write_text(to_json(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
