"""Hybrid Mamba2 + attention models served over HTTP (torch path, CPU), on two architectures: a follow-up
turn resumes from a checkpoint (its attention KV prefix restored), regenerate and edit with lossless tiers
generate exactly what a `--no-cache` server does, a request longer than `--max-model-len` gets a 400, KV
bytes per tier are on /metrics; with the default tiers (FP8 hot) sessions resume too."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.model.hybrid_loader import load_hybrid
from tests.integration.conftest import COMMON, chat, metric
from tests.integration.server_proc import ServerProc, make_tiny_hybrid, start_server
from tests.integration.test_sessions import STOP_IDS, _cached, _regenerate_and_edit, _text

MAX_LEN = 512
FLAGS = ["--max-num-seqs", "4", "--checkpoint-interval", "16", "--max-model-len", str(MAX_LEN)]


@pytest.fixture(scope="module", params=("bamba", "nemotron_h"))
def hybrid_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hybrid(tmp_path_factory.mktemp("hybrids") / request.param, request.param, seed=3)


def _serve(model_dir: Path, log_dir: Path, *args: str) -> Iterator[ServerProc]:
    with start_server(["--model", str(model_dir), *COMMON, *FLAGS, *args], log_dir=log_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def lossless(hybrid_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    yield from _serve(hybrid_dir, log_dir, "--hot-dtype", "fp32", "--cold-dtype", "fp32", "--hot-window", "2")


@pytest.fixture(scope="module")
def nocache(hybrid_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    yield from _serve(hybrid_dir, log_dir, "--no-cache")


def _turn(base_url: str, messages: list[dict[str, str]], session: str) -> dict[str, object]:
    return chat(base_url, messages, session, stop_token_ids=STOP_IDS, max_tokens=24)


def _follow_up(base_url: str, session: str) -> tuple[dict[str, object], dict[str, object]]:
    turn1 = [{"role": "user", "content": "Tell me about the sea."}]
    r1 = _turn(base_url, turn1, session)
    turn2 = [*turn1, {"role": "assistant", "content": _text(r1)}, {"role": "user", "content": "More."}]
    return r1, _turn(base_url, turn2, session)


def test_a_follow_up_turn_resumes_with_its_kv(lossless: ServerProc) -> None:
    r1, r2 = _follow_up(lossless.base_url, "hybrid-multi")
    usage = r1["usage"]
    assert isinstance(usage, dict)
    assert _cached(r1) == 0
    assert _cached(r2) >= usage["prompt_tokens"] + usage["completion_tokens"] - 1, r2["usage"]
    kv = sum(metric(lossless.base_url, "tssc_state_cache_kv_bytes", tier=t) for t in ("hot", "cold"))
    assert kv > 0
    assert metric(lossless.base_url, "tssc_state_cache_kv_bytes", tier="cold") <= metric(
        lossless.base_url, "tssc_state_cache_bytes", tier="cold"
    )


def test_regenerate_and_edit_lossless_tiers_match_no_cache(lossless: ServerProc, nocache: ServerProc) -> None:
    texts, cached = _regenerate_and_edit(lossless.base_url, "hybrid-regen")
    reference, ref_cached = _regenerate_and_edit(nocache.base_url, "hybrid-regen")
    assert texts == reference
    assert ref_cached == [0, 0, 0]
    assert cached[0] == 0 and cached[1] > cached[2] > 0  # regenerate resumes deeper than the edit


def test_follow_ups_match_no_cache(lossless: ServerProc, nocache: ServerProc) -> None:
    cached_turns = _follow_up(lossless.base_url, "hybrid-same")
    plain_turns = _follow_up(nocache.base_url, "hybrid-same")
    assert [_text(r) for r in cached_turns] == [_text(r) for r in plain_turns]


def test_a_request_past_max_model_len_gets_a_400(lossless: ServerProc) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": MAX_LEN}
    resp = httpx.post(lossless.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    assert "max-model-len" in resp.json()["error"]["message"]
    ok = httpx.post(lossless.base_url + "/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200  # the server goes on


def test_default_tiers_resume_sessions(hybrid_dir: Path, log_dir: Path) -> None:
    """FP8 hot / FP16 cold state; the KV is kept in the model dtype (fp32 here)."""
    for srv in _serve(hybrid_dir, log_dir):
        r1, r2 = _follow_up(srv.base_url, "hybrid-default")
        assert _cached(r2) > _cached(r1) == 0
        info = httpx.get(srv.base_url + "/v1/sessions/hybrid-default").json()
        assert info["checkpoints"]
        assert httpx.delete(srv.base_url + "/v1/sessions/hybrid-default").json()["bytes_freed"] > 0


def test_hot_kv_dtype_fp8_stores_the_same_kv_in_fewer_bytes_and_resumes(
    hybrid_dir: Path, log_dir: Path
) -> None:
    """--hot-kv-dtype fp8: after the same first turn (a miss: both servers capture the same positions), the hot
    tier's KV takes (dh + 4) / (4 dh) of the fp32 KV's bytes (an e4m3 byte per value plus an fp32 scale per token
    and head), and the follow-up resumes from it."""
    tiers = ["--hot-dtype", "fp32", "--cold-dtype", "fp32", "--hot-window", "2"]
    turn1 = [{"role": "user", "content": "Tell me about the sea."}]
    hot_kv = {}
    for dtype in ("model", "fp8"):
        for srv in _serve(hybrid_dir, log_dir, *tiers, "--hot-kv-dtype", dtype):
            r1 = _turn(srv.base_url, turn1, "hybrid-kv-dtype")
            hot_kv[dtype] = metric(srv.base_url, "tssc_state_cache_kv_bytes", tier="hot")
            turn2 = [
                *turn1,
                {"role": "assistant", "content": _text(r1)},
                {"role": "user", "content": "More."},
            ]
            assert _cached(_turn(srv.base_url, turn2, "hybrid-kv-dtype")) > 0
    attention = load_hybrid(hybrid_dir)[1].cfg.attention
    assert attention is not None
    head_dim = attention.head_dim
    assert hot_kv["model"] > 0
    assert hot_kv["fp8"] == pytest.approx(hot_kv["model"] * (head_dim + 4) / (4 * head_dim))


def test_the_disk_tier_serves_a_hybrid_session_after_a_restart(
    hybrid_dir: Path, log_dir: Path, tmp_path: Path, nocache: ServerProc
) -> None:
    """A cold tier too small for the session spills to disk (states and KV block files); a new server on
    the same directory resumes the session from disk and generates what `--no-cache` does."""
    disk = ["--disk-dir", str(tmp_path / "disk"), "--disk-bytes", "8MiB", "--hot-bytes", "0"]
    tiers = ["--hot-dtype", "fp32", "--cold-dtype", "fp32", "--cold-bytes", "48KiB", *disk]
    turn1 = [{"role": "user", "content": "Tell me about the sea, and the ships upon it."}]
    for srv in _serve(hybrid_dir, log_dir, *tiers):
        r1 = _turn(srv.base_url, turn1, "hybrid-disk")
        for i in range(6):  # other sessions push the first one's checkpoints out of the cold tier
            _turn(srv.base_url, [{"role": "user", "content": f"Filler number {i}, a long one."}], f"fill-{i}")
        assert metric(srv.base_url, "tssc_state_cache_checkpoints", tier="disk") > 0
    turn2 = [*turn1, {"role": "assistant", "content": _text(r1)}, {"role": "user", "content": "More."}]
    for srv in _serve(hybrid_dir, log_dir, *tiers):
        r2 = _turn(srv.base_url, turn2, "hybrid-disk")
        assert metric(srv.base_url, "tssc_state_cache_lookups_total", result="disk_hit") >= 1
    assert _cached(r2) > 0
    assert _text(r2) == _text(_turn(nocache.base_url, turn2, "hybrid-disk"))


def test_falcon_h1_in_an_engine_process(tmp_path: Path, log_dir: Path) -> None:
    """A third architecture (attention and Mamba2 side by side), with the engine core in its own process:
    a follow-up resumes, and the max-model-len refusal crosses the process boundary as a 400."""
    model_dir = make_tiny_hybrid(tmp_path / "falcon_h1", "falcon_h1", seed=1)
    for srv in _serve(model_dir, log_dir, "--engine-process"):
        r1, r2 = _follow_up(srv.base_url, "falcon-process")
        assert _cached(r2) > _cached(r1) == 0
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": MAX_LEN}
        resp = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert resp.status_code == 400 and "max-model-len" in resp.text


def test_hostile_clients_on_one_session_leave_the_others_whole(
    lossless: ServerProc, nocache: ServerProc
) -> None:
    """Streams cut after their first chunk and complete requests, concurrently on one odd session id (multi-byte,
    a slash, a percent sign): every request that stayed connected succeeds, no slot (nor its KV) leaks, and a
    conversation served afterwards is still exactly the `--no-cache` server's."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": "tiny", "messages": [{"role": "user", "content": "hostile"}], "max_tokens": 24}
    body |= {"session_id": "会话/a%b", "temperature": 0}

    def cut() -> int:
        url = lossless.base_url + "/v1/chat/completions"
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
            next(r.iter_bytes())  # one chunk, then the client goes away
            return r.status_code

    def complete() -> int:
        return httpx.post(lossless.base_url + "/v1/chat/completions", json=body, timeout=120).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = [f.result() for f in [pool.submit(cut if i % 2 else complete) for i in range(12)]]
    assert codes == [200] * 12
    deadline = time.monotonic() + 30
    while metric(lossless.base_url, "tssc_requests_running") != 0:  # the cut streams' slots come back
        assert time.monotonic() < deadline, "a slot leaked"
        time.sleep(0.1)
    assert httpx.get(lossless.base_url + "/health", timeout=10).status_code == 200
    after = _follow_up(lossless.base_url, "after-hostile")
    want = _follow_up(nocache.base_url, "after-hostile")
    assert [_text(r) for r in after] == [_text(r) for r in want]


def _tiers_over_budget(base: str) -> list[tuple[str, dict[str, float]]]:
    """The tiers whose bytes exceed their capacity, or whose KV exceeds their bytes, in one scrape."""
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for sample in family.samples:
            if "tier" in sample.labels:
                values[(sample.name, sample.labels["tier"])] = float(sample.value)
    names = ("tssc_state_cache_bytes", "tssc_state_cache_kv_bytes", "tssc_state_cache_capacity_bytes")
    over = []
    for tier in ("hot", "cold"):
        used, kv, cap = (values.get((name, tier), 0.0) for name in names)
        if used > cap or kv > used:
            over.append((tier, {"used": used, "kv": kv, "capacity": cap}))
    return over


def _sample_until(base: str, done: threading.Event, out: list[tuple[str, dict[str, float]]]) -> None:
    while not done.wait(0.05):
        out.extend(_tiers_over_budget(base))


def _conversation(base: str, i: int) -> list[int]:
    """3 turns of session load-i -> each turn's cached prompt tokens."""
    messages = [{"role": "user", "content": f"Tell me about the sea, number {i}."}]
    cached = []
    for turn in range(3):
        reply = _turn(base, messages, f"load-{i}")
        cached.append(_cached(reply))
        messages += [{"role": "assistant", "content": _text(reply)}, {"role": "user", "content": f"{turn}"}]
    return cached


def test_budgets_hold_under_concurrent_load(hybrid_dir: Path, log_dir: Path) -> None:
    """Tiers sized for about two conversations' checkpoints (Mamba states and KV), 6 clients holding 3-turn
    conversations at once: every request succeeds, no tier holds more than its budget at any sample taken while
    they run (its KV counted inside it, both read from one scrape), checkpoints are evicted to stay within it,
    later turns still hit, no slot leaks, and a conversation started afterwards still resumes."""
    import functools
    from concurrent.futures import ThreadPoolExecutor

    tiers = ["--hot-dtype", "fp32", "--cold-dtype", "fp32", "--hot-window", "2"]
    for srv in _serve(hybrid_dir, log_dir, *tiers):  # what one conversation's checkpoints take
        _follow_up(srv.base_url, "sizing")
        one = {t: metric(srv.base_url, "tssc_state_cache_bytes", tier=t) for t in ("hot", "cold")}
    budgets = ["--hot-bytes", str(int(2 * one["hot"])), "--cold-bytes", str(int(2 * one["cold"]))]
    for srv in _serve(hybrid_dir, log_dir, *tiers, *budgets):
        base, done = srv.base_url, threading.Event()
        samples: list[tuple[str, dict[str, float]]] = []
        sampler = threading.Thread(target=_sample_until, args=(base, done, samples))
        sampler.start()
        try:
            with ThreadPoolExecutor(6) as pool:
                results = list(pool.map(functools.partial(_conversation, base), range(6)))
        finally:
            done.set()
            sampler.join()
        assert not samples
        assert len(results) == 6 and any(c > 0 for r in results for c in r[1:])  # later turns still hit
        assert metric(base, "tssc_state_cache_evictions_total") > 0
        assert metric(base, "tssc_requests_running") == 0
        r1, r2 = _follow_up(base, "after-load")
        assert _cached(r2) > _cached(r1) == 0
