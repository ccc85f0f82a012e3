"""Issue #11's reproducers through a real server: odd session ids (one grammar for header, body and path),
requests whose cost must stay bounded (messages, checkpoints, one key against another), and a session
registry that forgets what the tiers no longer hold."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.integration.conftest import COMMON, MODEL, metric
from tests.integration.server_proc import ServerProc, start_server

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tight_server(tiny_model_dir: Path, log_dir: Path) -> Iterator[ServerProc]:
    """Tiny tiers (a handful of checkpoints each), two API keys, few checkpoints per request."""
    args = ["--model", str(tiny_model_dir), *COMMON, "--max-num-seqs", "4", "--checkpoint-interval", "16"]
    args += ["--hot-bytes", "24KiB", "--cold-bytes", "48KiB", "--max-checkpoints-per-request", "4"]
    args += ["--api-key", "key-a", "--api-key", "key-b", "--max-messages", "1000"]
    with start_server(args, log_dir=log_dir) as srv:
        yield srv


def _post(base: str, body: dict[str, object], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", json=body, headers=headers or {}, timeout=120)


def _chat_body(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": MSG, "max_tokens": 4, "temperature": 0, **extra}


# ---- session ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sid", ["会话", "café", "a/b", "x:y@z", "50%", "emoji-🙂"])
def test_any_valid_id_works_in_body_and_round_trips_through_the_header(server: ServerProc, sid: str) -> None:
    for path, body in (
        ("/v1/chat/completions", _chat_body(session_id=sid)),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "session_id": sid}),
    ):
        resp = httpx.post(server.base_url + path, json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        echoed = resp.headers["x-session-id"]
        assert echoed.isascii() and echoed == quote(
            sid, safe="".join(chr(c) for c in range(33, 127) if c != 37)
        )
    with httpx.stream(
        "POST", server.base_url + "/v1/chat/completions", json=_chat_body(session_id=sid, stream=True)
    ) as r:
        assert r.status_code == 200
        assert "".join(r.iter_text()).rstrip().endswith("data: [DONE]")
    header = {"X-Session-ID": quote(sid, safe="")}
    assert _post(server.base_url, _chat_body(), header).status_code == 200
    info = httpx.get(server.base_url + "/v1/sessions/" + quote(sid, safe=""), timeout=30)
    assert info.status_code == 200, info.text
    assert info.json()["id"] == sid
    gone = httpx.delete(server.base_url + "/v1/sessions/" + quote(sid, safe=""), timeout=30)
    assert gone.status_code == 200 and gone.json()["bytes_freed"] > 0
    assert httpx.get(server.base_url + "/v1/sessions/" + quote(sid, safe=""), timeout=30).status_code == 404


@pytest.mark.parametrize("sid", [" x ", "", "a b", "tab\there", "zero\u200bwidth", "x" * 129])
def test_invalid_ids_get_a_400_naming_the_rule(server: ServerProc, sid: str) -> None:
    resp = _post(server.base_url, _chat_body(session_id=sid))
    assert resp.status_code == 400, resp.text
    assert "session id is 1 to 128 printable characters" in resp.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b"caf\xc3\xa9", b"50%zz", b"%C3", b"a b", b"%E2%80%8B"])
def test_header_ids_are_ascii_percent_encoded_never_latin1(server: ServerProc, raw: bytes) -> None:
    resp = _post(server.base_url, _chat_body(), {"X-Session-ID": raw})  # type: ignore[dict-item]
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "X-Session-ID"


def test_header_and_body_ids_are_validated_and_compared_alike(server: ServerProc) -> None:
    header = {"X-Session-ID": "caf%C3%A9"}
    assert _post(server.base_url, _chat_body(session_id="café"), header).status_code == 200
    assert _post(server.base_url, _chat_body(session_id="cafe"), header).status_code == 400


# ---- bounded cost ------------------------------------------------------------------------------------


def _many_messages(n: int) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(n)]


def test_too_many_messages_is_refused_before_any_work(tight_server: ServerProc) -> None:
    auth = {"Authorization": "Bearer key-a"}
    start = time.monotonic()
    resp = _post(tight_server.base_url, _chat_body(messages=_many_messages(8000)), auth)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "too_many_messages"
    assert time.monotonic() - start < 10


def test_a_thousand_messages_store_few_checkpoints(tight_server: ServerProc) -> None:
    auth = {"Authorization": "Bearer key-a", "X-Session-ID": "thousand"}
    before = metric(tight_server.base_url, "tssc_state_cache_capture_seconds_count")
    resp = _post(tight_server.base_url, _chat_body(messages=_many_messages(1000)), auth)
    assert resp.status_code in (200, 400), resp.text  # 400 if the rendering exceeds the token limit
    if resp.status_code == 200:
        stored = metric(tight_server.base_url, "tssc_state_cache_capture_seconds_count") - before
        assert 1 <= stored <= 4 + 1  # the per-request cap, plus the finish capture


def _checkpoints_of(base: str, key: str, sessions: list[str]) -> int:
    auth = {"Authorization": f"Bearer {key}"}
    held = 0
    for s in sessions:
        resp = httpx.get(base + "/v1/sessions/" + s, headers=auth, timeout=30)
        held += resp.status_code == 200
    return held


def test_one_key_cannot_evict_the_other_keys_sessions(tight_server: ServerProc) -> None:
    base = tight_server.base_url
    mine = [f"b-{i}" for i in range(2)]
    for s in mine:
        headers = {"Authorization": "Bearer key-b", "X-Session-ID": s}
        assert _post(base, _chat_body(), headers).status_code == 200
    assert _checkpoints_of(base, "key-b", mine) == 2
    for i in range(40):  # key-a floods the tiers with one-shot sessions
        headers = {"Authorization": "Bearer key-a", "X-Session-ID": f"a-{i}"}
        body = _chat_body(messages=[{"role": "user", "content": f"flood {i} " * 5}])
        assert _post(base, body, headers).status_code == 200
    assert _checkpoints_of(base, "key-b", mine) == 2
    for tier in ("hot", "cold"):
        used = metric(base, "tssc_state_cache_bytes", tier=tier)
        assert used <= metric(base, "tssc_state_cache_capacity_bytes", tier=tier)


def test_the_session_registry_counts_live_sessions_only(tight_server: ServerProc) -> None:
    base = tight_server.base_url
    for i in range(60):  # distinct conversations: no checkpoint is shared between them
        headers = {"Authorization": "Bearer key-a", "X-Session-ID": f"once-{i}"}
        body = _chat_body(messages=[{"role": "user", "content": f"{i:03d} once only"}])
        assert _post(base, body, headers).status_code == 200
    sessions = metric(base, "tssc_sessions")
    checkpoints = max(metric(base, "tssc_state_cache_checkpoints", tier=t) for t in ("hot", "cold"))
    assert 0 < sessions <= checkpoints < 60
    alive = _checkpoints_of(base, "key-a", [f"once-{i}" for i in range(60)])
    for i in range(60):
        httpx.delete(base + f"/v1/sessions/once-{i}", headers={"Authorization": "Bearer key-a"}, timeout=30)
    assert metric(base, "tssc_sessions") <= sessions - alive


# ---- the HTTP parser ---------------------------------------------------------------------------------


def _raw(server: ServerProc, data: bytes) -> bytes:
    """Send `data` on a fresh connection, read until the server closes it (a reset ends the read too)."""
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                out += chunk
        return out


def test_a_request_head_is_bounded_and_the_server_keeps_serving(server: ServerProc) -> None:
    """httptools keeps any header a client sends (h11 stopped at 16 KiB): past 64 KiB the head gets a 400
    and the connection closes, before an endless header can fill the server's memory."""
    line = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
    assert _raw(server, line + b"a" * 48_000 + b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    answer = _raw(server, line + b"a" * 100_000 + b"\r\n\r\n")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:80]  # a reset may beat the 400
    host, port = server.base_url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock, contextlib.suppress(OSError):
        sock.sendall(line)
        while sent < 256 << 20:  # an endless header
            sock.sendall(b"a" * (1 << 20))
            sent += 1 << 20
    assert sent < 64 << 20, "the server kept reading an endless header"
    assert _raw(server, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _post(server.base_url, _chat_body()).status_code == 200


# ---- logs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--log-session-ids", "--no-log-session-ids"])
def test_session_ids_in_logs_follow_the_flag(tiny_model_dir: Path, tmp_path: Path, flag: str) -> None:
    args = ["--model", str(tiny_model_dir), *COMMON, flag]
    with start_server(args, log_dir=tmp_path) as srv:
        headers = {"X-Session-ID": "secret-session-4711"}
        assert _post(srv.base_url, _chat_body(), headers).status_code == 200
        assert httpx.get(srv.base_url + "/v1/sessions/secret-session-4711", timeout=30).status_code == 200
        text = srv.log_path.read_text()
    assert ('"tssc.access"' in text) and ("POST /v1/chat/completions 200" in text)
    assert ("secret-session-4711" in text) == (flag == "--log-session-ids")
