"""Session resume through the HTTP API: multi-turn, regenerate, edit, cold resume, session routes."""

from __future__ import annotations

from typing import Any

import httpx

from tests.integration.conftest import chat, metric
from tests.integration.server_proc import ServerProc

# Special tokens other than the EOS: stopping on them keeps every completion re-tokenizable.
STOP_IDS = [0, 2, 3, 4]
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Name another one, please."},
    {"role": "assistant", "content": "Green."},
    {"role": "user", "content": "And a third?"},
]


def _text(resp: dict[str, Any]) -> str:
    return str(resp["choices"][0]["message"]["content"])


def _cached(resp: dict[str, Any]) -> int:
    return int(resp["usage"]["prompt_tokens_details"]["cached_tokens"])


def _turn(base_url: str, messages: list[dict[str, str]], session: str, **fields: object) -> dict[str, Any]:
    return chat(base_url, messages, session, stop_token_ids=STOP_IDS, max_tokens=24, **fields)


def test_multi_turn_resumes_from_turn_one(server: ServerProc) -> None:
    # a prefix tree of its own (`cache_salt`): other tests' conversations, hypothesis' among them, share the
    # chat template's first tokens, and a checkpoint of theirs there would be a (correct) hit on turn 1
    hot_before = metric(server.base_url, "tssc_state_cache_lookups_total", result="hot_hit")
    turn1 = [{"role": "user", "content": "Tell me about the sea."}]
    r1 = _turn(server.base_url, turn1, "multi-turn-1", cache_salt="multi-turn")
    assert _cached(r1) == 0
    turn2 = [*turn1, {"role": "assistant", "content": _text(r1)}, {"role": "user", "content": "More."}]
    r2 = _turn(server.base_url, turn2, "multi-turn-1", cache_salt="multi-turn")
    covered = r1["usage"]["prompt_tokens"] + r1["usage"]["completion_tokens"] - 1
    assert _cached(r2) >= covered, (r1["usage"], r2["usage"])
    assert metric(server.base_url, "tssc_state_cache_lookups_total", result="hot_hit") > hot_before
    assert metric(server.base_url, "tssc_prompt_tokens_total", source="cached") >= _cached(r2)


def _regenerate_and_edit(base_url: str, session: str) -> tuple[list[str], list[int]]:
    """Send the 6-message conversation, regenerate it, then edit message 2 of 6."""
    edited = [dict(m) for m in CONVERSATION]
    edited[1]["content"] = "Name a fruit."
    out = [_turn(base_url, CONVERSATION, session), _turn(base_url, CONVERSATION, session)]
    out.append(_turn(base_url, edited, session))
    return [_text(r) for r in out], [_cached(r) for r in out]


def test_regenerate_and_edit_lossless_tiers_match_no_cache(
    lossless_server: ServerProc, nocache_server: ServerProc
) -> None:
    texts, cached = _regenerate_and_edit(lossless_server.base_url, "regen-lossless")
    reference, ref_cached = _regenerate_and_edit(nocache_server.base_url, "regen-lossless")
    assert texts == reference
    assert ref_cached == [0, 0, 0]
    first_prompt = chat(nocache_server.base_url, CONVERSATION)["usage"]["prompt_tokens"]  # type: ignore[index]
    assert cached[0] == 0
    # Regenerate resumes at the last message's end: only the generation prompt ("<|assistant|>\n",
    # two tokens) is prefilled again (the last prompt token always is: its logits start decoding).
    assert cached[1] >= first_prompt - 2
    assert 0 < cached[2] < first_prompt  # edit of message 2: resumes after message 1


def _agreement(a: str, b: str) -> float:
    same = sum(x == y for x, y in zip(a, b, strict=False))
    return same / max(len(a), len(b), 1)


def test_regenerate_and_edit_default_tiers_agreement(server: ServerProc, nocache_server: ServerProc) -> None:
    texts, cached = _regenerate_and_edit(server.base_url, "regen-default")
    reference, _ = _regenerate_and_edit(nocache_server.base_url, "regen-default")
    assert cached[1] > 0 and cached[2] > 0
    scores = [_agreement(a, b) for a, b in zip(texts, reference, strict=True)]
    print(f"\ngreedy agreement with --no-cache (FP8 hot / FP16 cold): {[round(s, 3) for s in scores]}")
    assert texts[0] == reference[0]  # the first request restores nothing: exact


def test_cold_resume_after_the_hot_window_moved_on(lossless_server: ServerProc) -> None:
    base = lossless_server.base_url
    cold_before = metric(base, "tssc_state_cache_lookups_total", result="cold_hit")
    fetch_before = metric(base, "tssc_state_cache_fetch_seconds_count", tier="cold")
    turn1 = [{"role": "user", "content": "Count to three."}]
    r1 = _turn(base, turn1, "cold-1")
    history = [*turn1, {"role": "assistant", "content": _text(r1)}]
    _turn(base, [*history, {"role": "user", "content": "Now count to five, slowly."}], "cold-1")
    # Editing the last user message resumes from turn 1's checkpoints, which left the hot window.
    r3 = _turn(base, [*history, {"role": "user", "content": "Now count backwards."}], "cold-1")
    assert _cached(r3) >= r1["usage"]["prompt_tokens"]
    assert metric(base, "tssc_state_cache_lookups_total", result="cold_hit") > cold_before
    assert metric(base, "tssc_state_cache_fetch_seconds_count", tier="cold") > fetch_before


def test_session_info_and_delete(server: ServerProc) -> None:
    base = server.base_url
    _turn(base, [{"role": "user", "content": "Remember me."}], "info-1")
    info = httpx.get(base + "/v1/sessions/info-1").json()
    assert info["id"] == "info-1" and info["checkpoints"]
    assert metric(base, "tssc_sessions") >= 1
    deleted = httpx.delete(base + "/v1/sessions/info-1")
    assert deleted.status_code == 200 and deleted.json()["bytes_freed"] > 0
    assert httpx.get(base + "/v1/sessions/info-1").status_code == 404
    assert httpx.delete(base + "/v1/sessions/info-1").status_code == 404


def test_session_id_in_the_body_equals_the_header(server: ServerProc) -> None:
    base = server.base_url
    turn1 = [{"role": "user", "content": "Body session."}]
    r1 = chat(base, turn1, session_id="body-1", stop_token_ids=STOP_IDS)
    turn2 = [*turn1, {"role": "assistant", "content": _text(r1)}, {"role": "user", "content": "Again."}]
    r2 = chat(base, turn2, session="body-1", stop_token_ids=STOP_IDS)
    assert _cached(r2) >= r1["usage"]["prompt_tokens"]  # type: ignore[index]
