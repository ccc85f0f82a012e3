"""lm-eval's `local-completions` runs a loglikelihood (multiple-choice) task end to end against a real server
(issue #14), on a task built from local data (no download): its accuracy equals the one computed here from
the model's own log-softmax over each context + choice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from server.model.loader import load_model
from server.model.runner import ModelRunner
from server.model.tokenizer import Tokenizer
from tests.integration.conftest import MODEL
from tests.integration.server_proc import ServerProc

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
    {"question": "for i in range(", "choices": ["10):", "ten):", "):"], "answer": 0},
    {"question": "import", "choices": [" os", " 42", " ("], "answer": 0},
    {"question": "x = [1, 2,", "choices": [" 3]", " 3)", " }"], "answer": 0},
    {"question": "while True:\n   ", "choices": [" break", " else", " elif"], "answer": 0},
    {"question": "print(", "choices": ["'hi')", "hi'", ")("], "answer": 0},
]


def _task(tmp: Path) -> Path:
    data = tmp / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp / "tssc_mc.yaml").write_text(
        "task: tssc_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return tmp


def _loglikelihood(runner: ModelRunner, context: list[int], continuation: list[int]) -> float:
    logits = runner.prefill([*context, *continuation], 0, all_logits=True).all_logits
    assert logits is not None
    logp = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(logp[len(context) + i - 1, t]) for i, t in enumerate(continuation))


def _expected_accuracy(model_dir: Path) -> float:
    """lm-eval's rule: context tokens, then each choice's tokens (the choice text encoded after the context)."""
    tok = Tokenizer.from_pretrained(model_dir)
    runner = ModelRunner(load_model(model_dir)[1], max_slots=1)
    correct = 0
    for doc in DOCS:
        context = tok.encode(doc["question"], add_special_tokens=False)
        scores = []
        for choice in doc["choices"]:
            whole = tok.encode(doc["question"] + choice, add_special_tokens=False)
            scores.append(_loglikelihood(runner, whole[: len(context)], whole[len(context) :]))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(DOCS)


def test_lm_eval_multiple_choice_matches_the_models_own_scores(
    server: ServerProc, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = (
        f"model={MODEL},base_url={server.base_url}/v1/completions,tokenizer={tiny_model_dir},"
        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1"
    )
    results = simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["tssc_mc"],
        task_manager=TaskManager(include_path=str(_task(tmp_path))),
        batch_size=1,
    )
    assert results is not None
    acc = results["results"]["tssc_mc"]["acc,none"]
    assert acc == pytest.approx(_expected_accuracy(tiny_model_dir))
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
