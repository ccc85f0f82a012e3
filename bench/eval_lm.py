"""The next-line task of `bench/eval_cache.py` run through lm-eval (`--lm-eval`), against one server per setting.

lm-eval's `local-completions` model, a `generate_until` task written to a temporary directory and loaded with
`TaskManager(include_path=...)` (no download): the prompt is a question's context (the tokenizer adds the
leading `<|endoftext|>`), greedy generation stops at the end of the line, and `exact_match` compares the
line with the file's true line (surrounding whitespace ignored). The task's `generation_kwargs` carry the
body's `session_id`, so every request lands in one session per server. lm-eval sends the longest contexts
first, so a request resumes from an interval checkpoint of a longer context of the same file that was sent
before it (rather than from the previous question's prompt end): these servers capture one every
`INTERVAL` prompt tokens. The share of requests that restored comes from the server's
`tssc_state_cache_lookups_total` (lm-eval keeps no `usage`).

Reported per server: exact match (Wilson interval), its paired difference from `--no-cache` (paired
bootstrap), the lines that differ from `--no-cache`'s, and the restored share (Wilson).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.eval_stats import bootstrap_paired_diff, wilson
from bench.eval_tasks import Question
from tests.integration.conftest import metric
from tests.integration.server_proc import ServerProc, start_server

TASK = "tssc_nextline"
MAX_LINE_TOKENS = 48
INTERVAL = ["--checkpoint-interval", "64"]  # a request resumes at most ~64 tokens short of its shared prefix


def write_task(directory: Path, questions: Sequence[Question], decode: Any, session: str) -> Path:
    """The task YAML and its JSONL data: one doc per question, the context without its <|endoftext|>."""
    data = directory / "nextline.jsonl"
    rows = [{"context": decode(list(q.context[1:])), "target": q.next_line.strip()} for q in questions]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = {"until": ["\n"], "max_gen_toks": MAX_LINE_TOKENS, "temperature": 0, "session_id": session}
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
        "target_delimiter": "",
        "generation_kwargs": gen,
        "metric_list": [{"metric": "exact_match", "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
    }
    (directory / f"{TASK}.yaml").write_text(json.dumps(task))  # JSON is YAML
    return directory


def _run_lm_eval(srv: ServerProc, model: Path, task_dir: Path, model_name: str) -> list[tuple[str, bool]]:
    """(generated line, exact match) per doc, in doc order."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = {
        "model": model_name, "base_url": f"{srv.base_url}/v1/completions", "tokenizer": str(model),
        "tokenizer_backend": "huggingface", "tokenized_requests": True, "add_bos_token": True,
        "num_concurrent": 1, "max_retries": 1, "max_length": 1 << 16,
    }  # fmt: skip
    results = simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=1,
        log_samples=True,
    )
    assert results is not None
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [(str(s["filtered_resps"][0]), bool(s["exact_match"])) for s in samples]


def _restores(srv: ServerProc) -> tuple[int, int]:
    """(hits, lookups) so far."""
    hits = sum(
        metric(srv.base_url, "tssc_state_cache_lookups_total", result=r) for r in ("hot_hit", "cold_hit")
    )
    miss = metric(srv.base_url, "tssc_state_cache_lookups_total", result="miss")
    return int(hits), int(hits + miss)


def lm_eval_table(
    model: Path, questions: Sequence[Question], servers: Sequence[str], extra: Sequence[str]
) -> str:
    """Run the task on each server (the first is the reference) and return a markdown table."""
    from tokenizers import Tokenizer

    from bench.eval_cache import MODEL, SERVERS

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    decode = Tokenizer.from_file(str(model / "tokenizer.json")).decode
    out: dict[str, tuple[list[tuple[str, bool]], tuple[int, int]]] = {}
    for name in servers:
        args = ["--model", str(model), "--served-model-name", MODEL, *SERVERS[name], *INTERVAL, *extra]
        with tempfile.TemporaryDirectory() as tmp, start_server(args, timeout=600) as srv:
            os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "datasets")
            task_dir = write_task(Path(tmp), questions, decode, "lm-eval-" + name.split()[0])
            out[name] = (_run_lm_eval(srv, model, task_dir, MODEL), _restores(srv))
    return _table(out, servers[0], len(questions))


def _table(out: dict[str, tuple[list[tuple[str, bool]], tuple[int, int]]], ref_name: str, n: int) -> str:
    ref = out[ref_name][0]
    lines = [
        f"lm-eval `local-completions`, `generate_until` next line ({n} lines, greedy, exact match):",
        "",
        "| server | exact match [95% CI] | vs --no-cache, paired [95% CI] | lines changed | requests restored "
        "[95% CI] |",
        "|---|---|---|---|---|",
    ]
    for name, (rows, (hits, lookups)) in out.items():
        ok = [m for _, m in rows]
        delta = bootstrap_paired_diff(ok, [m for _, m in ref])
        changed = sum(a != b for (a, _), (b, _) in zip(rows, ref, strict=True))
        restored = wilson(hits, lookups).percent() if lookups else "-"
        lines.append(
            f"| {name} | {wilson(sum(ok), len(ok)).percent()} | {delta.signed_percent()} | {changed} / {n} "
            f"| {restored} |"
        )
    return "\n".join(lines)
