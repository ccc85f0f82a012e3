"""Per-request work that runs on the event loop, with no hop to a worker thread."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from server.api import create_app, routes_openai
from server.settings import Settings


class _IdleEngine:
    ready = True

    def start(self) -> None: ...

    async def stop(self) -> None: ...


def test_authentication_runs_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    on_loop: list[bool] = []
    authenticate = routes_openai.authenticate

    def recording(header: str | None, keys: list[str]) -> str:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # a worker thread runs no loop
            on_loop.append(False)
        return authenticate(header, keys)

    monkeypatch.setattr(routes_openai, "authenticate", recording)
    app = create_app(Settings(api_key=["k"]), engine=_IdleEngine())  # type: ignore[arg-type]
    with TestClient(app) as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
        assert client.get("/v1/models").status_code == 401
    assert on_loop == [True, True]
