"""The model card (README.md in the model directory), rendered from JSON reports kept beside it.

    train_report.json   written by the training run (config, corpus, tokens, time, GPU, bpb, samples)
    cpu_report.json     written by `python -m server.train.measure_cpu MODEL_DIR`
    other_runs.json     list of other seeds' train_report.json, for the reproducibility table
    fidelity.md         optional: the FP8/FP16 restore-fidelity section, from bench/fidelity.py
    selection.md        optional: how the run's settings were chosen (other runs, sweeps)

`python -m server.train.card MODEL_DIR [--other-run REPORT.json ...]` re-renders README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from server.train.card_template import TEMPLATE

log = logging.getLogger(__name__)

TRAIN_REPORT = "train_report.json"
CPU_REPORT = "cpu_report.json"
OTHER_RUNS = "other_runs.json"
FIDELITY = "fidelity.md"
SELECTION = "selection.md"
FIDELITY_PLACEHOLDER = """\
<!-- FIDELITY-PLACEHOLDER: replace with the table printed by bench/fidelity.py -->
**Not measured yet.** To be filled from `bench/fidelity.py`: the mean and max KL divergence of the
next-token distribution over the 256 tokens that follow a restore from an FP8 (e4m3, scaled per
row) copy of the state, and from an FP16 copy, against an exact restore, with greedy top-1
agreement.
"""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _summary(r: dict[str, Any]) -> list[str]:
    res, m = r["result"], r["model_config"]
    return [
        "| | |",
        "|---|---|",
        f"| architecture | Mamba2, {m['n_layer']} layers, d_model {m['d_model']}, d_state {m['d_state']}, "
        f"headdim {m['headdim']}, expand {m['expand']}, vocab {m['vocab_size']}, tied embeddings |",
        f"| parameters | {r['parameters']:,} |",
        f"| weights | `model.safetensors`, {r['weights_dtype']}, {_mb(r['weights_bytes'])} |",
        f"| tokens seen | {res['tokens_seen']:,} ({res['steps']:,} steps of {r['config']['batch_size']} x "
        f"{r['config']['seq_len']} tokens) |",
        f"| training time | {res['train_seconds']:.0f} s of optimisation, {r['total_seconds']:.0f} s end to end |",
        f"| GPU | {r['device_name']} |",
        f"| held-out loss | **{r['heldout_bpb']:.4f} bits per byte** ({r['heldout_bytes']:,} bytes, "
        f"{r['corpus']['heldout_files']} files) |",
    ]


def _runs_table(r: dict[str, Any], others: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| seed | held-out bpb | valid bpb | slice bpb | tokens seen | train s | GPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in [r, *others]:
        res = run["result"]
        lines.append(
            f"| {run['config']['seed']} | {run['heldout_bpb']:.4f} | {run['valid_bpb']:.4f} | {run['slice_bpb']:.4f} "
            f"| {res['tokens_seen']:,} | {res['train_seconds']:.0f} | {run['device_name']} |"
        )
    if others:
        spread = max(abs(o["heldout_bpb"] - r["heldout_bpb"]) / r["heldout_bpb"] for o in others)
        lines += ["", f"Largest relative difference in held-out bpb from this model: {spread:.2%}."]
    return lines


def _samples(r: dict[str, Any]) -> list[str]:
    lines = []
    shown: set[str] = set()
    for s in r["samples"]:
        how = s.get("settings", "greedy")
        if s["kind"] == "completion":
            lines += [f"Completion, {how} (the prompt, then the model's text):", "", "```python"]
            lines += [s["prompt"] + s["output"], "```", ""]
            continue
        if s["prompt"] not in shown:
            lines += ["Chat, user turn (through the chat template):", "", "```text", s["prompt"], "```", ""]
            shown.add(s["prompt"])
        lines += [f"Assistant, {how}:", "", "```python", s["output"], "```", ""]
    return lines


def _cpu(cpu: dict[str, Any] | None) -> list[str]:
    if cpu is None:
        return ["Not measured yet: run `python -m server.train.measure_cpu MODEL_DIR`."]
    return [
        f"Measured by `python -m server.train.measure_cpu` on {cpu['machine']} ({cpu['threads']} torch threads, "
        f"torch {cpu['torch_version']}, Python {cpu['python_version']}). The machine was shared with other "
        "work, so these are lower bounds on its speed.",
        "",
        "| | |",
        "|---|---|",
        f"| `load_model` (fp32, CPU), median of {cpu['load_repeats']} | {cpu['load_seconds']:.3f} s |",
        f"| first `load_model` in a fresh process, best of {cpu['repeats']} | {cpu['cold_load_seconds']:.3f} s |",
        f"| `import torch` and the loader in that process, before it | {cpu['cold_import_seconds']:.2f} s |",
        f"| prefill, {cpu['prefill_tokens']} tokens, best of {cpu['repeats']} | "
        f"{cpu['prefill_tokens_per_s']:.0f} tokens/s |",
        f"| greedy decode, batch 1, {cpu['decode_tokens']} tokens, best of {cpu['repeats']} | "
        f"{cpu['decode_tokens_per_s']:.1f} tokens/s |",
    ]


def _reproduce(r: dict[str, Any]) -> list[str]:
    return [
        f"Python {r['python_version']} (its standard library is the corpus: another version gives another "
        f"corpus), torch {r['torch_version']}, tokenizers {r['tokenizers_version']}, seed {r['config']['seed']}.",
        "",
        "```bash",
        r["command"],
        "```",
        "",
        "The cosine schedule ends at the wall-clock budget (or at `--max-steps`, whichever comes first), so "
        f"a GPU of another speed sees another number of tokens. This run took {r['result']['steps']:,} steps; "
        f"for a run that repeats it step for step on any GPU, use `--max-steps {r['result']['steps']}` "
        "with a `--time-budget-s` large enough not to bind.",
    ]


def render_card(model_dir: Path) -> str:
    r = _read_json(model_dir / TRAIN_REPORT)
    if r is None:
        raise FileNotFoundError(f"{model_dir} has no {TRAIN_REPORT}")
    others = _read_json(model_dir / OTHER_RUNS) or []
    fidelity = (
        (model_dir / FIDELITY).read_text() if (model_dir / FIDELITY).is_file() else FIDELITY_PLACEHOLDER
    )
    selection = (model_dir / SELECTION).read_text().strip() if (model_dir / SELECTION).is_file() else ""
    return TEMPLATE.format(
        selection=selection + "\n" if selection else "",
        summary="\n".join(_summary(r)),
        params=f"{r['parameters']:,}",
        corpus=r["corpus"],
        stream=r["stream"],
        cfg=r["config"],
        repeats="once"
        if r["config"].get("library_repeats", 1) == 1
        else f"{r['config']['library_repeats']} times",
        runs="\n".join(_runs_table(r, others)),
        samples="\n".join(_samples(r)),
        cpu="\n".join(_cpu(_read_json(model_dir / CPU_REPORT))),
        fidelity=fidelity.strip(),
        reproduce="\n".join(_reproduce(r)),
        r=r,
    )


def write_card(model_dir: Path) -> Path:
    out = model_dir / "README.md"
    out.write_text(render_card(model_dir))
    return out


def add_other_runs(model_dir: Path, reports: list[Path]) -> None:
    runs = [json.loads(p.read_text()) for p in reports]
    (model_dir / OTHER_RUNS).write_text(json.dumps(runs, indent=2) + "\n")


def resample(model_dir: Path) -> None:
    """Regenerate train_report.json's samples with the saved model on CPU (deterministic)."""
    from dataclasses import asdict

    from server.model.loader import load_model
    from server.train.samples import card_samples
    from server.train.tokenizer import load_tokenizer

    report = json.loads((model_dir / TRAIN_REPORT).read_text())
    _, model = load_model(model_dir)
    report["samples"] = [asdict(s) for s in card_samples(model, load_tokenizer(model_dir))]
    report["samples_note"] = (
        "generated on CPU from the saved fp16 weights by `python -m server.train.card --resample`"
    )
    (model_dir / TRAIN_REPORT).write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.train.card", description="Render the model card.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--other-run", type=Path, action="append", default=[], help="another seed's report")
    parser.add_argument("--resample", action="store_true", help="regenerate the sample completions on CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.other_run:
        add_other_runs(args.model_dir, args.other_run)
    if args.resample:
        resample(args.model_dir)
    log.info("wrote %s", write_card(args.model_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
