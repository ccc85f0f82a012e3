"""The router, deploy/nginx/tssc.conf: read as text (what CI can always check), then run by a real
nginx on loopback in front of two stand-in replicas (skipped where nginx is not installed), which
shows what the text promises: a session stays on one replica, requests without one spread, a POST
fails over from a replica that is down or answers 503, and a stream is not held back.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from server.settings import Settings
from tests.integration.server_proc import free_port
from tests.nginx_conf import (
    Directive,
    loopback_config,
    nginx_binary,
    nginx_command,
    router_conf,
    seconds,
    serving,
    size_bytes,
)


def _proxy_location() -> Directive:
    return router_conf().one("server").one("location", "/")


# ---- deploy/nginx/tssc.conf as text -----------------------------------------------------------


def test_router_hashes_the_session_header_consistently() -> None:
    router = router_conf()
    upstream = router.one("upstream", "tssc")
    key, *how = upstream.one("hash").args
    assert how == ["consistent"]
    routes = {d.name: d.args[0] for d in router.one("map", "$http_x_session_id", key).block}
    assert routes["default"] == "$http_x_session_id"
    fallback = {d.name: d.args[0] for d in router.one("map", "$request_uri", routes[""]).block}
    assert fallback["default"] == "$request_id", "requests without a session spread"
    names = [d.name for d in upstream.block]
    assert names.index("hash") < names.index("keepalive"), "a balancer must come before keepalive"
    for server in upstream.all("server"):
        assert {a.split("=")[0] for a in server.args[1:]} >= {"max_fails", "fail_timeout"}


def test_router_streams_unbuffered_and_fails_over_on_503() -> None:
    location = _proxy_location()
    assert location.one("proxy_pass").args == ("http://tssc",)
    for name, value in [("proxy_buffering", "off"), ("proxy_cache", "off"), ("proxy_http_version", "1.1")]:
        assert location.one(name).args == (value,), name
    assert location.one("proxy_set_header", "Connection").args == ("Connection", "")
    assert location.one("add_header", "X-Accel-Buffering").args[1] == "no"
    assert seconds(location.one("proxy_read_timeout").args[0]) >= 300
    retry = set(location.one("proxy_next_upstream").args)
    assert retry == {"error", "timeout", "http_502", "http_503", "http_504", "non_idempotent"}
    assert location.one("proxy_request_buffering").args == ("on",), "a POST is resent from the buffer"
    assert location.one("proxy_next_upstream_tries").args == ("2",)
    for header, value in [("Authorization", "$http_authorization"), ("X-Session-ID", "$http_x_session_id")]:
        assert location.one("proxy_set_header", header).args == (header, value)


def test_router_limits_match_the_server() -> None:
    server = router_conf().one("server")
    body_limit = size_bytes(server.one("client_max_body_size").args[0])
    assert body_limit == int(Settings.model_fields["max_body_bytes"].default), "the server's 413 answers"
    keepalive = seconds(router_conf().one("upstream", "tssc").one("keepalive_timeout").args[0])
    uvicorn_idle = inspect.signature(uvicorn.Config).parameters["timeout_keep_alive"].default
    assert keepalive < uvicorn_idle, "nginx must drop an idle connection before the server does"
    assert server.one("location", "=", "/nginx-health").one("return").args[0] == "200"


# ---- deploy/nginx/tssc.conf run by nginx --------------------------------------------------------


class _Replica(ThreadingHTTPServer):
    """A stand-in replica on a loopback port. It answers with its name and the request headers it got;
    503 with Retry-After while `failing`; on /stream, one SSE event, and the next once `release` is set."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _ReplicaHandler)
        self.name = name
        self.failing = False
        self.hits = 0
        self.release = threading.Event()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _ReplicaHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes
    server: _Replica

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_DELETE(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.hits += 1
        if self.server.failing:
            self._send(503, {"error": "draining"}, {"Retry-After": "5"})
        elif self.path == "/stream":
            self._stream()
        else:
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._send(200, {"replica": self.server.name, "headers": headers})

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunk(b"data: first\n\n")
        self.server.release.wait(10)
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


def _require_nginx() -> None:
    if nginx_binary() is None:
        pytest.skip("nginx not installed (Debian package: nginx): the router is only checked as text")


@contextlib.contextmanager
def _running_router(upstream_ports: list[int], workdir: Path) -> Iterator[httpx.Client]:
    """A client of nginx running the router in front of `upstream_ports`."""
    _require_nginx()
    port = free_port()
    config = loopback_config(port, upstream_ports, workdir)
    with serving(config, port) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


@pytest.fixture
def replicas() -> Iterator[dict[str, _Replica]]:
    started = {name: _Replica(name) for name in ("a", "b")}
    yield started
    for replica in started.values():
        replica.close()


@pytest.fixture
def router(replicas: dict[str, _Replica], tmp_path: Path) -> Iterator[httpx.Client]:
    with _running_router([r.port for r in replicas.values()], tmp_path / "nginx") as client:
        yield client


def _served_by(router: httpx.Client, session: str | None = None) -> str:
    headers = {"X-Session-ID": session} if session else {}
    response = router.post("/v1/chat/completions", headers=headers, json={})
    assert response.status_code == 200, response.text
    return str(response.json()["replica"])


def test_router_config_passes_nginx_t(tmp_path: Path) -> None:
    _require_nginx()
    config = loopback_config(free_port(), [free_port(), free_port()], tmp_path)
    result = subprocess.run(nginx_command(config, "-t"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "server 127.0.0.1:" in (tmp_path / "tssc.conf").read_text()


def test_router_keeps_each_session_on_one_replica_and_spreads_the_rest(router: httpx.Client) -> None:
    homes = {
        f"conversation-{i}": {_served_by(router, f"conversation-{i}") for _ in range(3)} for i in range(16)
    }
    assert all(len(home) == 1 for home in homes.values()), homes
    assert set().union(*homes.values()) == {"a", "b"}
    assert {_served_by(router) for _ in range(16)} == {"a", "b"}


def test_router_sends_a_sessions_routes_to_its_replica(router: httpx.Client) -> None:
    for session in (f"conversation-{i}" for i in range(8)):
        home = _served_by(router, session)
        for method in ("GET", "DELETE"):
            response = router.request(method, f"/v1/sessions/{session}")
            assert response.json()["replica"] == home, (session, method)


def test_router_passes_the_api_key_the_session_and_a_request_id(router: httpx.Client) -> None:
    sent = {"Authorization": "Bearer sk-test", "X-Session-ID": "s1"}
    got = router.post("/v1/completions", headers=sent, json={}).json()["headers"]
    assert got["authorization"] == "Bearer sk-test" and got["x-session-id"] == "s1"
    assert re.fullmatch(r"[0-9a-f]{32}", got["x-request-id"]), "nginx's own id when the client sends none"
    assert "connection" not in got, "HTTP/1.1 keep-alive to the replicas"
    sent["X-Request-ID"] = "req-42"
    got = router.post("/v1/completions", headers=sent, json={}).json()["headers"]
    assert got["x-request-id"] == "req-42"


def test_router_retries_a_post_on_the_other_replica_when_one_answers_503(
    router: httpx.Client, replicas: dict[str, _Replica]
) -> None:
    replicas["a"].failing = True
    assert {_served_by(router, f"conversation-{i}") for i in range(16)} == {"b"}
    assert replicas["a"].hits >= 1, "the sessions of `a` were tried there first"


def test_router_passes_the_503_on_when_every_replica_answers_it(
    router: httpx.Client, replicas: dict[str, _Replica]
) -> None:
    for replica in replicas.values():
        replica.failing = True
    response = router.post("/v1/chat/completions", headers={"X-Session-ID": "s"}, json={})
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert sum(r.hits for r in replicas.values()) == 2, "one try on each replica, no more"


def test_router_fails_over_from_a_replica_that_is_down(replicas: dict[str, _Replica], tmp_path: Path) -> None:
    with _running_router([free_port(), replicas["b"].port], tmp_path / "nginx") as router:
        assert {_served_by(router, f"conversation-{i}") for i in range(16)} == {"b"}


def test_router_streams_each_event_as_the_replica_writes_it(
    router: httpx.Client, replicas: dict[str, _Replica]
) -> None:
    """The replica holds its second event back until the client has the first. Anything on the way that
    holds data back (proxy_buffering on together with gzip, say) holds the first one too, and the read
    times out."""
    with router.stream("POST", "/stream", json={}, timeout=httpx.Timeout(10, read=3)) as response:
        assert response.headers["x-accel-buffering"] == "no"
        lines = response.iter_lines()
        assert next(lines) == "data: first"
        for replica in replicas.values():
            replica.release.set()
        assert "data: [DONE]" in list(lines)
