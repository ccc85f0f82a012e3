"""The OpenAI-compatible HTTP edge: `create_app(settings, engine=None) -> FastAPI`."""

from __future__ import annotations

from server.api.app import create_app

__all__ = ["create_app"]
