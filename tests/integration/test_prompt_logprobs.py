"""Prompt logprobs through a real server (issue #14): OpenAI's legacy `echo` + `logprobs` (what lm-eval's
loglikelihood sends), `max_tokens: 0`, and vLLM's `prompt_logprobs`; checked against the model's own
log-softmax over a one-pass prefill, and never served from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from server.model.loader import load_model
from server.model.runner import ModelRunner
from tests.integration.conftest import MODEL
from tests.integration.server_proc import ServerProc

IDS = [5, 40, 41, 42, 77, 78, 79, 80, 81, 90, 91, 92, 60, 61, 62, 63, 64, 65, 66, 67]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> list[float]:
    """log p(IDS[i] | IDS[:i]) for i >= 1, from one prefill of the whole prompt."""
    runner = ModelRunner(load_model(tiny_model_dir)[1], max_slots=1)
    logits = runner.prefill(IDS, 0, all_logits=True).all_logits
    assert logits is not None
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [float(logp[i - 1, t]) for i, t in enumerate(IDS) if i > 0]


def _complete(server: ServerProc, **fields: object) -> dict[str, object]:
    body = {"model": MODEL, "prompt": IDS, "temperature": 0, **fields}
    resp = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out: dict[str, object] = resp.json()
    return out


def test_echo_with_logprobs_scores_the_prompt(server: ServerProc, reference: list[float]) -> None:
    out = _complete(server, echo=True, logprobs=2, max_tokens=1)
    choice = out["choices"][0]  # type: ignore[index]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(IDS) + 1  # the prompt, then the generated token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(IDS)] == pytest.approx(reference, abs=1e-4)
    for i, top in enumerate(lp["top_logprobs"][1 : len(IDS)], start=1):
        assert lp["tokens"][i] in top and len(top) >= 2  # the prompt token and its best alternatives
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_max_tokens_zero_returns_only_the_prompt(server: ServerProc, reference: list[float]) -> None:
    out = _complete(server, echo=True, logprobs=0, max_tokens=0)
    choice = out["choices"][0]  # type: ignore[index]
    assert choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(IDS)
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(reference, abs=1e-4)
    assert out["usage"]["completion_tokens"] == 0  # type: ignore[index]
    bad = httpx.post(
        server.base_url + "/v1/completions", json={"model": MODEL, "prompt": IDS, "max_tokens": 0}
    )
    assert bad.status_code == 400


def test_vllm_prompt_logprobs_ignore_the_cache(server: ServerProc, reference: list[float]) -> None:
    headers = {"X-Session-ID": "scored"}
    body = {"model": MODEL, "prompt": IDS, "max_tokens": 2, "temperature": 0}
    httpx.post(server.base_url + "/v1/completions", json=body, headers=headers, timeout=60).raise_for_status()
    resp = httpx.post(
        server.base_url + "/v1/completions", json={**body, "prompt_logprobs": 1}, headers=headers, timeout=60
    )
    out = resp.json()
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # scored from the start
    entries = out["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(IDS) and entries[0] is None
    for i, entry in enumerate(entries[1:], start=1):
        own = entry[str(IDS[i])]
        assert own["logprob"] == pytest.approx(reference[i - 1], abs=1e-4) and own["rank"] >= 1
    chat = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
            "prompt_logprobs": 0,
        },
        timeout=60,
    ).json()
    assert (
        chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    )
    streamed = httpx.post(
        server.base_url + "/v1/completions", json={**body, "prompt_logprobs": 1, "stream": True}
    )
    assert streamed.status_code == 400
