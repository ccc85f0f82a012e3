"""Where the real server's host time goes under concurrent streaming load (issue #12 item 8).

    python -m bench.serve_profile --shape mamba2-130m --streams 64 --seconds 20 \
        --flags " --engine-process" --out results/profile

Starts `tssc serve` on a random-weight model of `--shape` (the GPU when there is one), warms it with one
round, then keeps `--streams` completions streams busy (128-token prompts, 128 new tokens, ignore_eos)
while `py-spy record --subprocesses --threads` samples the server and its engine process, if any (with
`--rounds`, rounds of `--streams` requests sent at once instead, as `bench.e2e_bench` measures throughput). Writes
`py-spy.txt` (collapsed stacks, one line per distinct stack: `process;thread;frame;...;frame count`) and
`summary.md`: per process and thread, the share of samples in which each function is on the stack
(inclusive) and at its top (self), with the load's completion tok/s under the profiler beside it. Without
py-spy on PATH it measures the load alone. Read the shares, not the times: sampling slows the server.
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import SHAPES, Clients, Job, Stats, Texts, completion, write_random_model  # noqa: E402
from tests.integration.server_proc import start_server  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS, TOP = 128, 128, 25


def load(clients: Clients, texts: Texts, model: str, streams: int, until: float) -> Stats:
    """`streams` clients, each sending one request after another until `until` (a perf_counter time)."""
    rng = random.Random(0)
    start = time.perf_counter() + 0.2
    jobs = [
        Job("/v1/completions", completion(model, texts.text(PROMPT_TOKENS, rng), NEW_TOKENS), start, until, True, f"s{i}")
        for i in range(streams)
    ]  # fmt: skip
    return Stats.of([clients.run(jobs)])


def rounds(
    clients: Clients, texts: Texts, model: str, streams: int, until: float, new_tokens: int = NEW_TOKENS
) -> Stats:
    """Rounds as `bench.e2e_bench`'s throughput section runs them until `until`: `streams` requests sent at
    once, the next round when the last one ended. Its ramp (taking in a round's requests and prefilling
    them) is then in the profile as often as a user's load test puts it in the throughput it reports."""
    rng, out = random.Random(0), []
    while not out or time.perf_counter() < until:
        start = time.perf_counter() + 0.05
        prompts = [texts.text(PROMPT_TOKENS, rng) for _ in range(streams)]
        out.append(
            clients.run([Job("/v1/completions", completion(model, p, new_tokens), start) for p in prompts])
        )
    return Stats.of(out)


def shares(stacks: Path) -> dict[str, tuple[int, collections.Counter[str], collections.Counter[str]]]:
    """Per process and thread: (samples, inclusive counts per function, self counts per function)."""
    out: dict[str, tuple[int, collections.Counter[str], collections.Counter[str]]] = {}
    for line in stacks.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        at = next((i for i, f in enumerate(frames) if f.startswith("thread (")), len(frames) - 1)
        procs = [f for f in frames[:at] if f.startswith("process ")]
        pid = procs[-1].split(":")[0] if procs else "process ?"
        kind = "engine process" if len(procs) > 1 else "server process"
        where = f"{kind} ({pid}), {re.sub(r'^thread [(][0-9]+[)]: ?', 'thread ', frames[at]) or 'thread'}"
        total, incl, own = out.get(where, (0, collections.Counter(), collections.Counter()))
        funcs = [re.sub(r"\s*\((.*/)?([^/:]+):\d+\)$", r" (\2)", f) for f in frames[at + 1 :]]
        for func in set(funcs):
            incl[func] += int(count)
        if funcs:
            own[funcs[-1]] += int(count)
        out[where] = (total + int(count), incl, own)
    return out


def summary(stacks: Path, stats: Stats, args: argparse.Namespace) -> str:
    lines = [
        f"# Server host profile: {args.shape}, {args.streams} streams{' in rounds' if args.rounds else ''}, "
        f"flags `{args.flags.strip()}`",
        "",
        f"completion tok/s under the profiler: {stats.tok_s:,.0f}; ITL p50 {stats.itl50 * 1e3:.2f} ms",
        "",
    ]
    if not stacks.exists():
        return "\n".join([*lines, "(no py-spy: no profile)"]) + "\n"
    parts = sorted(shares(stacks).items(), key=lambda kv: -kv[1][0])
    for where, (total, incl, own) in parts[:8]:
        lines += [f"## {where}: {total} samples", "", "| inclusive | self | function |", "|---:|---:|---|"]
        for func, n in incl.most_common(TOP):
            lines.append(f"| {100 * n / total:.1f}% | {100 * own[func] / total:.1f}% | `{func}` |")
        top_self = ", ".join(f"`{f}` {100 * n / total:.1f}%" for f, n in own.most_common(10))
        lines += ["", f"top self: {top_self}", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="mamba2-130m", choices=list(SHAPES))
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--flags", default="", help="extra server flags (start with a space)")
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument(
        "--rounds",
        action="store_true",
        help="rounds of simultaneous requests (e2e_bench's), not steady streams",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stacks = args.out / "py-spy.txt"
    spy = shutil.which("py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_model(Path(tmp) / args.shape, args.shape)
        flags = [
            "--model",
            str(model_dir),
            "--served-model-name",
            "bench",
            "--max-num-seqs",
            str(args.streams),
        ]
        with start_server([*flags, *shlex.split(args.flags)], timeout=900) as srv:
            clients, texts = Clients(srv.base_url, args.client_procs), Texts(model_dir)
            try:
                load(clients, texts, "bench", args.streams, 0.0)  # warm-up: one round
                record = None
                if spy is not None:
                    cmd = [spy, "record", "--subprocesses", "--threads", "--nonblocking", "-r", str(args.rate),
                           "-d", str(int(args.seconds)), "--format", "raw", "-o", str(stacks),
                           "-p", str(srv.proc.pid)]  # fmt: skip
                    record = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                run = rounds if args.rounds else load
                stats = run(clients, texts, "bench", args.streams, time.perf_counter() + args.seconds)
                if record is not None:
                    _, err = record.communicate(timeout=120)
                    if record.returncode:
                        print(f"py-spy failed ({record.returncode}): {err.decode(errors='replace')[-2000:]}")
            finally:
                clients.close()
    text = summary(stacks, stats, args)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
