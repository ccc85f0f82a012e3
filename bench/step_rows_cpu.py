"""The per-row and per-step host costs of a decode step that do not depend on the model, on CPU (issue #12
item 8): what the engine core spends on each row's token and on sending a step's events to the HTTP process.

    python -m bench.step_rows_cpu [--rows 64] [--steps 500] [--out FILE]

On the bundled demo model's tokenizer, `rows` greedy requests without stop strings (128-token prompts of
random ids) each take one token per step:
  append      `Seq.append` per row: stop rules, incremental detokenization, the row's `TokenEvent`;
  event       making one `TokenEvent` alone;
  pickle      one `Step` of `rows` events and the step's token metrics, pickled (the core's loop, per step);
  unpickle    the same, unpickled (the HTTP process's pipe reader, per step).
CPU time (`time.process_time`), the median of 5 runs of `steps` steps each. A shared machine's timings are
noisy: compare trees back to back in one shell.
"""

from __future__ import annotations

import argparse
import pickle
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import emit  # noqa: E402

DEMO = ROOT / "server" / "assets" / "demo-mamba2"


def per_call_us(fn: Callable[[], object], calls: int, reps: int = 5) -> float:
    """Median over `reps` of the CPU microseconds of one of `calls` calls of `fn`."""
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        times.append((time.process_time() - t0) / calls)
    return statistics.median(times) * 1e6


def measure(rows: int, steps: int) -> dict[str, float]:
    from server.engine.ipc import Step
    from server.engine.request import Seq
    from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
    from server.model.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(DEMO)
    rng = random.Random(0)
    ids = [rng.randrange(100, tok.vocab_size - 100) for _ in range(rows * steps * 6 + 128)]
    params = SamplingParams(max_tokens=10**9, temperature=0.0, ignore_eos=True)
    seqs = [
        Seq.create(GenerationRequest(f"r{i}", tuple(ids[:128]), params), tok.decode, tok.eos_ids, 0.0)
        for i in range(rows)
    ]
    feed = iter(ids[128:])

    def step() -> list[TokenEvent]:
        return [s.append(next(feed), 1.0) for s in seqs]

    events = step()
    make = lambda: TokenEvent("cmpl-0123456789abcdef", 7, " word", None, (), None, 128, 0, 5, {}, None)
    message = Step(tuple(events), (), (("observe_tokens", (rows, (0.001,) * rows)),), rows, 0)
    packed = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return {
        "append": per_call_us(step, steps) / rows,
        "event": per_call_us(make, steps * rows),
        "pickle": per_call_us(lambda: pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), steps),
        "unpickle": per_call_us(lambda: pickle.loads(packed), steps),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    us = measure(args.rows, args.steps)
    lines = [
        f"### Per-row and per-step host costs on CPU ({args.rows} rows, µs of CPU)",
        "",
        "| Seq.append per row | TokenEvent | Step pickle | Step unpickle |",
        "|---|---|---|---|",
        f"| {us['append']:.2f} | {us['event']:.2f} | {us['pickle']:.1f} | {us['unpickle']:.1f} |",
    ]
    emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
