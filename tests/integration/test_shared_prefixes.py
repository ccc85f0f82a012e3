"""Shared prefixes across conversations (issue #13), through real servers with two API keys: one prefix
tree per key by default, a global one with --share-prefixes-across-keys, and a tree per `cache_salt`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import COMMON, MODEL, metric
from tests.integration.server_proc import ServerProc, start_server

SYSTEM = "You are the assistant of a small bakery. " * 6  # ~240 characters: ~240 tokens (character tokenizer)
KEYS = ["--api-key", "key-a", "--api-key", "key-b"]


def _serve(model: Path, log_dir: Path, *extra: str) -> Iterator[ServerProc]:
    args = ["--model", str(model), *COMMON, "--max-num-seqs", "4", "--checkpoint-interval", "64", *KEYS]
    with start_server([*args, *extra], log_dir=log_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def per_key(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    yield from _serve(tiny_model_dir, log_dir)


@pytest.fixture(scope="module")
def across_keys(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    yield from _serve(tiny_model_dir, log_dir, "--share-prefixes-across-keys")


def _first_turn(
    srv: ServerProc, key: str, question: str, session: str | None = None, salt: str | None = None
) -> int:
    """A conversation's first turn (the shared system prompt, then `question`); its cached prompt tokens."""
    headers = {"Authorization": f"Bearer {key}", **({"X-Session-ID": session} if session else {})}
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
        **({"cache_salt": salt} if salt else {}),
    }
    resp = httpx.post(srv.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    return int(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_conversations_of_one_key_share_the_system_prompt(per_key: ServerProc) -> None:
    shared_before = metric(per_key.base_url, "tssc_state_cache_lookups_total", scope="shared")
    assert _first_turn(per_key, "key-a", "What is bread?", session="conv-1") == 0
    for i in range(2, 6):
        assert _first_turn(per_key, "key-a", f"Question {i}?", session=f"conv-{i}") >= len(SYSTEM)
    assert _first_turn(per_key, "key-a", "And without a session?") >= len(SYSTEM)
    assert metric(per_key.base_url, "tssc_state_cache_lookups_total", scope="shared") >= shared_before + 5


def test_another_key_shares_nothing_by_default(per_key: ServerProc) -> None:
    assert _first_turn(per_key, "key-a", "Warm it up.", session="warm") >= 0
    assert _first_turn(per_key, "key-b", "What is bread?", session="other-key") == 0


def test_deleting_a_session_keeps_what_others_use(per_key: ServerProc) -> None:
    auth = {"Authorization": "Bearer key-a"}
    _first_turn(per_key, "key-a", "First of all?", session="owner")
    assert _first_turn(per_key, "key-a", "Second?", session="user") >= len(SYSTEM)
    gone = httpx.delete(per_key.base_url + "/v1/sessions/owner", headers=auth, timeout=30)
    assert gone.status_code == 200
    assert httpx.get(per_key.base_url + "/v1/sessions/owner", headers=auth, timeout=30).status_code == 404
    assert _first_turn(per_key, "key-a", "Third?", session="late") >= len(SYSTEM)


def test_cache_salt_confines_sharing_to_the_same_salt(per_key: ServerProc) -> None:
    _first_turn(per_key, "key-a", "Unsalted.", session="plain")
    assert _first_turn(per_key, "key-a", "Salted?", session="salt-1", salt="tenant-x") == 0
    assert _first_turn(per_key, "key-a", "Same salt?", session="salt-2", salt="tenant-x") >= len(SYSTEM)
    assert _first_turn(per_key, "key-a", "Other salt?", session="salt-3", salt="tenant-y") == 0


def test_across_keys_one_tree_serves_every_key(across_keys: ServerProc) -> None:
    assert _first_turn(across_keys, "key-a", "What is bread?", session="a-1") == 0
    assert _first_turn(across_keys, "key-b", "What is cake?", session="b-1") >= len(SYSTEM)
    assert _first_turn(across_keys, "key-b", "Salted?", session="b-2", salt="s") == 0
