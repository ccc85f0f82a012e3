"""Error shapes and status codes of the HTTP edge, on an app whose model cannot load.

Validation, auth, limits and routing are all decided before the engine is needed, so these run
without a model; anything that needs the engine answers 503 with Retry-After.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.settings import Settings

MODEL = "tiny"
MSG = [{"role": "user", "content": "hi"}]


def _make_client(**overrides: Any) -> Iterator[TestClient]:
    settings = Settings(model=f"/nonexistent/{MODEL}", max_body_bytes=4096, **overrides)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    yield from _make_client()


@pytest.fixture(scope="module")
def auth_client() -> Iterator[TestClient]:
    yield from _make_client(api_key=["key-a", "key-b"])


def _assert_openai_error(resp: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return dict(body["error"])


def _chat(client: TestClient, **fields: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": MSG, **fields})


def test_malformed_json_is_400(client: TestClient) -> None:
    resp = client.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert _assert_openai_error(resp, 400)["code"] == "invalid_json"


def test_non_object_body_is_400(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json=[1, 2])
    _assert_openai_error(resp, 400)


BODY = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.mark.parametrize(
    ("content_type", "named"),
    [(None, "none was sent"), ("text/plain", "'text/plain'"), ("application/x-www-form-urlencoded", "form")],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_body_not_declared_json_is_400_naming_the_content_type(
    client: TestClient, content_type: str | None, named: str, path: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    err = _assert_openai_error(client.post(path, content=BODY, headers=headers), 400)
    assert "Content-Type must be application/json" in err["message"] and named in err["message"]
    assert err["code"] == "invalid_content_type"


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_content_type_variants_are_accepted(client: TestClient, content_type: str) -> None:
    resp = client.post("/v1/chat/completions", content=BODY, headers={"content-type": content_type})
    assert resp.status_code == 503, resp.text  # valid: only the model (not loaded here) is missing


def test_an_empty_json_body_says_it_is_missing(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", content=b"", headers={"content-type": "application/json"})
    assert "body is missing" in _assert_openai_error(resp, 400)["message"]


@pytest.mark.parametrize("part_type", ["image_url", "input_audio", "file"])
def test_an_unsupported_content_part_names_its_type(client: TestClient, part_type: str) -> None:
    parts = [{"type": "text", "text": "what is this?"}, {"type": part_type, part_type: {"url": "x"}}]
    resp = _chat(client, messages=[{"role": "user", "content": parts}])
    err = _assert_openai_error(resp, 400, "messages[0].content[1].type")
    assert f"content part type '{part_type}' is not supported; only 'text' parts are" in err["message"]
    assert "valid string" not in err["message"] and err["code"] == "unsupported_content_part"


def test_a_text_part_without_text_names_the_missing_field(client: TestClient) -> None:
    resp = _chat(client, messages=[{"role": "user", "content": [{"type": "text"}]}])
    err = _assert_openai_error(resp, 400, "messages[0].content[0].text")
    assert err["code"] == "missing_required_parameter"


def test_lists_of_text_parts_pass_validation(client: TestClient) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert _chat(client, messages=[{"role": "user", "content": parts}]).status_code == 503


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"n": 1.5}, "n"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ],
)
def test_wrong_types_are_400(client: TestClient, fields: dict[str, Any], param: str) -> None:
    _assert_openai_error(_chat(client, **fields), 400, param)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
        ({"n": 10**6}, "n"),
        ({"n": 0}, "n"),
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 9.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
        ({"seed": -5}, "seed"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ],
)
def test_out_of_range_values_are_400(client: TestClient, fields: dict[str, Any], param: str) -> None:
    _assert_openai_error(_chat(client, **fields), 400, param)


@pytest.mark.parametrize(
    "fields",
    [{"top_logprobs": 2}, {"stream_options": {"include_usage": True}}],
)
def test_inconsistent_fields_are_400(client: TestClient, fields: dict[str, Any]) -> None:
    _assert_openai_error(_chat(client, **fields), 400)


def test_nan_is_400(client: TestClient) -> None:
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    resp = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    _assert_openai_error(resp, 400, "temperature")


def test_lone_surrogate_is_400(client: TestClient) -> None:
    body = b'{"model": "tiny", "prompt": "ab\\ud800"}'
    resp = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    _assert_openai_error(resp, 400, "prompt")


@pytest.mark.parametrize(
    "fields",
    [{"prompt": []}, {"prompt": [[]]}, {"prompt": [-3]}, {"prompt": 7}, {"suffix": "x"}, {"best_of": 3}],
)
def test_bad_completion_prompts_are_400(client: TestClient, fields: dict[str, Any]) -> None:
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", **fields})
    _assert_openai_error(resp, 400)


@pytest.mark.parametrize(
    ("prompt", "param", "words"),
    [
        (7, "prompt", "prompt must be a string, a list of strings, a list of token ids"),
        ({"ids": [1]}, "prompt", "prompt must be a string"),
        ([1, "a"], "prompt[1]", "integer"),
        (["a", 1], "prompt[1]", "string"),
        ([[1], ["x"]], "prompt[1][0]", "integer"),
        ([5, -3], "prompt[1]", "greater than or equal to 0"),
    ],
)
def test_a_bad_prompt_is_one_error_at_its_bad_element(
    client: TestClient, prompt: Any, param: str, words: str
) -> None:
    """The prompt's form is read from its first element, so the error names the element that breaks it,
    not one failure per form the prompt might have taken."""
    err = _assert_openai_error(
        client.post("/v1/completions", json={"model": MODEL, "prompt": prompt}), 400, param
    )
    assert words in err["message"]


def test_unknown_model_is_404(client: TestClient) -> None:
    err = _assert_openai_error(_chat(client, model="gpt-17"), 404, "model")
    assert err["code"] == "model_not_found"
    _assert_openai_error(client.get("/v1/models/gpt-17"), 404)


def test_body_too_large_is_413(client: TestClient) -> None:
    resp = _chat(client, messages=[{"role": "user", "content": "x" * 10_000}])
    _assert_openai_error(resp, 413)


def test_conflicting_session_ids_are_400(client: TestClient) -> None:
    resp = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": MSG, "session_id": "a"},
        headers={"X-Session-ID": "b"},
    )
    _assert_openai_error(resp, 400, "session_id")


def test_model_not_loaded_is_503_with_retry_after(client: TestClient) -> None:
    resp = _chat(client)
    _assert_openai_error(resp, 503)
    assert int(resp.headers["retry-after"]) > 0
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] in ("loading", "failed")


def test_unknown_route_and_method_keep_openai_shape(client: TestClient) -> None:
    _assert_openai_error(client.get("/v1/nothing-here"), 404)
    _assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_models_lists_the_served_model(client: TestClient) -> None:
    resp = client.get("/v1/models")
    assert resp.status_code == 200
    assert [m["id"] for m in resp.json()["data"]] == [MODEL]


def test_every_response_has_a_request_id(client: TestClient) -> None:
    assert client.get("/v1/models").headers["x-request-id"]
    assert client.get("/v1/models", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"


def test_metrics_are_served_without_auth(auth_client: TestClient) -> None:
    resp = auth_client.get("/metrics")
    assert resp.status_code == 200
    assert "tssc_state_cache_lookups_total" in resp.text


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic a2V5LWE=", "Bearer "])
def test_auth_rejects_missing_or_wrong_keys(auth_client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    resp = auth_client.get("/v1/models", headers=headers)
    assert _assert_openai_error(resp, 401)["type"] == "authentication_error"
    _assert_openai_error(auth_client.post("/v1/chat/completions", json={}, headers=headers), 401)


def test_auth_accepts_each_key(auth_client: TestClient) -> None:
    for key in ("key-a", "key-b"):
        assert auth_client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
