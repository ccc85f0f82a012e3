"""`tssc serve` / `python -m server serve` / `python -m server.serve`: settings -> engine -> app -> uvicorn."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from server.api import create_app
from server.api.logs import configure_logging
from server.metrics import Metrics
from server.settings import parse_settings

log = logging.getLogger(__name__)


def _settings_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        flag = "--" + "-".join(str(p) for p in err.get("loc", ())).replace("_", "-")
        lines.append(f"{flag}: {err.get('msg')}")
    return "tssc serve: invalid settings\n  " + "\n  ".join(lines)


def serve(argv: Sequence[str] | None = None) -> int:
    """Run the server until interrupted. Returns the process exit code (2: bad flags, 1: the model
    could not be loaded)."""
    try:
        settings = parse_settings(argv)
    except SystemExit as exc:  # --help, or an unknown flag (argparse printed why)
        return exc.code if isinstance(exc.code, int) else 2
    except ValidationError as exc:
        sys.stderr.write(_settings_error(exc) + "\n")
        return 2
    configure_logging(settings.log_level_int)
    failed: list[bool] = []
    server: uvicorn.Server | None = None

    def on_load_error() -> None:
        failed.append(True)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, metrics=Metrics(), on_load_error=on_load_error)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    log.info(
        "serving",
        extra={
            "model": settings.model,
            "served_model_name": settings.model_name,
            "host": settings.host,
            "port": settings.port,
            "cache": not settings.no_cache,
            "auth": settings.auth_enabled,
        },
    )
    server.run()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(serve())
