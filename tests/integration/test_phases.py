"""`tssc_request_phase_seconds`: every request that produced a first token recorded each phase once, and
the engine's phases add up to no more than the time to first token the server measured."""

from __future__ import annotations

import httpx

from tests.integration.conftest import MODEL, metric
from tests.integration.server_proc import ServerProc

PHASES = ("parse", "tokenize", "queue", "restore", "prefill", "first_token")
ENGINE = ("queue", "restore", "prefill", "first_token")


def _phase(base: str, suffix: str, phase: str) -> float:
    return metric(base, f"tssc_request_phase_seconds_{suffix}", phase=phase)


def test_each_request_records_every_phase_once(server: ServerProc) -> None:
    base = server.base_url
    before = {p: _phase(base, "count", p) for p in PHASES}
    sums = {p: _phase(base, "sum", p) for p in ENGINE}
    ttft = metric(base, "tssc_time_to_first_token_seconds_sum")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "phases"}],
        "max_tokens": 3,
        "stream": True,
    }
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert "".join(resp.iter_text()).rstrip().endswith("[DONE]")
    resp = httpx.post(
        base + "/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 2}, timeout=60
    )
    assert resp.status_code == 200
    for p in PHASES:
        assert _phase(base, "count", p) == before[p] + 2, p
    engine_time = sum(_phase(base, "sum", p) - sums[p] for p in ENGINE)
    assert 0 < engine_time <= metric(base, "tssc_time_to_first_token_seconds_sum") - ttft + 1e-3
