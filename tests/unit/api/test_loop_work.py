"""Per-request work that runs on the event loop, with no hop to a worker thread."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import create_app, routes_openai
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


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


def test_a_front_end_imports_anyios_backend_at_start_not_on_its_first_streamed_response() -> None:
    """Starlette's first streamed response made anyio import its asyncio backend: 25-90 ms of each front-end
    process's first request on this project's CPU (`--api-servers`), 3-8 ms once the API imports it."""
    code = "import sys, server.api; print('anyio._backends._asyncio' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stdout.strip() == "True", done.stderr
