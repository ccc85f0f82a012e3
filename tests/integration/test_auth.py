"""API keys: 401 without a valid one; sessions are invisible across keys."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, chat
from tests.integration.server_proc import ServerProc


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, _auth("wrong"), {"Authorization": "key-a"}])
def test_requests_without_a_valid_key_get_401(one_slot_server: ServerProc, headers: dict[str, str]) -> None:
    base = one_slot_server.base_url
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for resp in (
        httpx.post(base + "/v1/chat/completions", json=body, headers=headers),
        httpx.get(base + "/v1/models", headers=headers),
        httpx.get(base + "/v1/sessions/any", headers=headers),
    ):
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
    assert httpx.get(base + "/health").status_code == 200  # probes need no key


def test_openai_client_with_a_wrong_key_raises(one_slot_server: ServerProc) -> None:
    oai = openai.OpenAI(base_url=one_slot_server.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        oai.models.list()
    good = openai.OpenAI(base_url=one_slot_server.base_url + "/v1", api_key="key-b")
    assert [m.id for m in good.models.list()] == [MODEL]


def test_sessions_are_isolated_between_keys(one_slot_server: ServerProc) -> None:
    base = one_slot_server.base_url
    turn1 = [{"role": "user", "content": "A secret conversation."}]
    r1 = chat(base, turn1, "shared-name", headers=_auth("key-a"), stop_token_ids=[0, 2, 3, 4])
    assert httpx.get(base + "/v1/sessions/shared-name", headers=_auth("key-a")).status_code == 200
    assert httpx.get(base + "/v1/sessions/shared-name", headers=_auth("key-b")).status_code == 404
    assert httpx.delete(base + "/v1/sessions/shared-name", headers=_auth("key-b")).status_code == 404
    turn2 = [*turn1, {"role": "assistant", "content": r1["choices"][0]["message"]["content"]}]  # type: ignore[index]
    turn2.append({"role": "user", "content": "Go on."})
    other = chat(base, turn2, "shared-name", headers=_auth("key-b"))
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # type: ignore[index]
    mine = chat(base, turn2, "shared-name", headers=_auth("key-a"))
    assert mine["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # type: ignore[index]
